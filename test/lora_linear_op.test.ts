// difflora::lora_linear (native/lora.cc), what LoraLinear runs for one plain adapter: the same output and the
// same gradients (input, lora_A, lora_B) as PEFT's arithmetic op by op, to float32 rounding, on the fused CPU
// float32 path and on the composition it falls back to (float64, a base that trains).
import { describe, expect, it } from 'vitest';
import * as F from '../lib/functional.js';
import { dispose, keep, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { relErr } from './helpers.js';

interface Case { shape: number[]; out: number; rank: number; bias: boolean; scale: number; dtype?: 'float32' | 'float64'; trainBase?: boolean }

/** Output and the gradients of x, lora_A, lora_B (and of the weight when it trains), by the operator or op by op. */
function run(c: Case, how: 'op' | 'composition'): Tensor[] {
  return tidy(() => {
    torch.manualSeed(5);
    const dtype = c.dtype ?? 'float32';
    const inF = c.shape[c.shape.length - 1]!;
    const x = torch.randn(c.shape, { dtype }).requiresGrad_(true);
    const w = torch.randn([c.out, inF], { dtype }).requiresGrad_(c.trainBase ?? false);
    const b = c.bias ? torch.randn([c.out], { dtype }) : null;
    const a = torch.randn([c.rank, inF], { dtype }).requiresGrad_(true);
    const bb = torch.randn([c.out, c.rank], { dtype }).requiresGrad_(true);
    const y = how === 'op' ? F.loraLinear(x, w, b, a, bb, c.scale) : F.linear(x, w, b).add(F.linear(F.linear(x, a), bb).mul(c.scale));
    y.mul(torch.randnLike(y)).sum().backward();
    const out = [y.detach(), x.grad!, a.grad!, bb.grad!, ...(c.trainBase ? [w.grad!] : [])];
    return out.map((t) => keep(t.clone()));
  });
}

describe('F.loraLinear', () => {
  const cases: [string, Case][] = [
    ['3-D input, no bias, scale 1 (to_q)', { shape: [2, 64, 32], out: 32, rank: 4, bias: false, scale: 1 }],
    ['3-D input with bias, scale 0.5 (to_out.0)', { shape: [2, 77, 48], out: 24, rank: 4, bias: true, scale: 0.5 }],
    ['2-D input, rank 1', { shape: [5, 7], out: 3, rank: 1, bias: true, scale: 2 }],
    ['float64 (the composition)', { shape: [2, 9, 8], out: 6, rank: 2, bias: true, scale: 0.75, dtype: 'float64' }],
    ['a base weight that trains (the composition)', { shape: [3, 8], out: 6, rank: 2, bias: false, scale: 1, trainBase: true }],
  ];
  for (const [name, c] of cases) {
    it(`${name}: output and gradients equal PEFT's arithmetic`, () => {
      const a = run(c, 'op');
      const r = run(c, 'composition');
      const tol = c.dtype === 'float64' ? 1e-12 : 1e-6;
      expect(a.length).toBe(r.length);
      a.forEach((t, i) => {
        expect(t.shape).toEqual(r[i]!.shape);
        expect(relErr(t, r[i]!), `tensor ${i}`).toBeLessThan(tol);
      });
      dispose([...a, ...r]);
    });
  }

  it('its output can be modified in place, as a linear output', () => {
    tidy(() => {
      const x = torch.randn([2, 3, 4]).requiresGrad_(true);
      const y = F.loraLinear(x, torch.randn([5, 4]), null, torch.randn([2, 4]).requiresGrad_(true), torch.randn([5, 2]).requiresGrad_(true), 1);
      y.mul_(2).sum().backward();
      expect(x.grad!.shape).toEqual([2, 3, 4]);
    });
  });

  it('names the shapes that do not fit', () => {
    tidy(() => {
      expect(() => F.loraLinear(torch.randn([2, 4]), torch.randn([5, 4]), null, torch.randn([2, 3]), torch.randn([5, 2]), 1)).toThrow(/do not fit/);
    });
  });
});
