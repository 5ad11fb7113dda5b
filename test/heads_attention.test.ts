// difflora::heads_attention (native/attention.cc), the attention between the projections that AttnProcessor runs
// on libtorch without a fused kernel: the same outputs and input gradients as the head-reshape composition
// (diffusers' AttnProcessor) to float32 rounding, on the fast CPU float32 path (one group of heads, or several: the
// 2×8 heads of 256×300 scores are 2.4 MiB) and on its ATen fallback.
import { describe, expect, it } from 'vitest';
import * as F from '../lib/functional.js';
import { dispose, keep, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { relErr } from './helpers.js';

type Shape = [b: number, lq: number, lk: number, heads: number, d: number, dv: number];

/** Output and q/k/v gradients of attention on [B, L, heads·d] projections, by the operator or by the composition. */
function run(s: Shape, how: 'op' | 'composite', dtype: 'float32' | 'float64' = 'float32'): Tensor[] {
  const [b, lq, lk, heads, d, dv] = s;
  return tidy(() => {
    torch.manualSeed(11);
    const q = torch.randn([b, lq, heads * d], { dtype }).requiresGrad_(true);
    const k = torch.randn([b, lk, heads * d], { dtype }).requiresGrad_(true);
    const v = torch.randn([b, lk, heads * dv], { dtype }).requiresGrad_(true);
    const g = torch.randn([b, lq, heads * dv], { dtype });
    const scale = d ** -0.5;
    const split = (t: Tensor, l: number) => t.view(b, l, heads, -1).transpose(1, 2);
    const out = how === 'op'
      ? F.headsAttention(q, k, v, heads, scale)
      : F.scaledDotProductAttention(split(q, lq), split(k, lk), split(v, lk), { scale }).transpose(1, 2).reshape(b, lq, heads * dv);
    out.mul(g).sum().backward();
    return [out.detach(), q.grad!, k.grad!, v.grad!].map((t) => keep(t.clone()));
  });
}

describe('F.headsAttention', () => {
  const shapes: Shape[] = [[2, 64, 64, 8, 8, 8], [2, 256, 300, 8, 8, 8], [4, 16, 77, 8, 32, 32], [3, 5, 7, 2, 4, 6], [1, 1, 1, 1, 3, 5], [1, 1, 77, 8, 32, 32]];
  for (const s of shapes) {
    it(`[${s.join(', ')}] (b, lq, lk, heads, d, dv): output and q, k, v gradients equal the composition`, () => {
      const a = run(s, 'op');
      const r = run(s, 'composite');
      a.forEach((t, i) => expect(relErr(t, r[i]!), `tensor ${i}`).toBeLessThan(1e-6));
      dispose([...a, ...r]);
    });
  }

  it('float64 takes the ATen composition and agrees too', () => {
    const a = run([2, 9, 13, 4, 8, 8], 'op', 'float64');
    const r = run([2, 9, 13, 4, 8, 8], 'composite', 'float64');
    a.forEach((t, i) => expect(relErr(t, r[i]!), `tensor ${i}`).toBeLessThan(1e-12));
    dispose([...a, ...r]);
  });

  it('reads strided projections (a narrowed q) as their contiguous copies', () => {
    tidy(() => {
      const q = torch.randn([2, 10, 64]).narrow(2, 0, 32);
      const k = torch.randn([2, 6, 32]);
      const v = torch.randn([2, 6, 16]);
      expect(relErr(F.headsAttention(q, k, v, 4, 0.3), F.headsAttention(q.contiguous(), k, v, 4, 0.3))).toBe(0);
    });
  });

  it('names the shapes it refuses', () => {
    tidy(() => {
      expect(() => F.headsAttention(torch.randn([2, 4, 30]), torch.randn([2, 5, 30]), torch.randn([2, 5, 30]), 4, 1)).toThrow(/multiples of heads = 4/);
      expect(() => F.headsAttention(torch.randn([2, 4, 32]), torch.randn([2, 5, 32]), torch.randn([2, 6, 32]), 4, 1)).toThrow(/share the batch/);
    });
  });
});
