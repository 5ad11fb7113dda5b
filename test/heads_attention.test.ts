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

  // heads = 1 with k = I and v = I (the GEMMs multiply by the identity, exactly): the output is softmax(q) itself, so
  // the probabilities of the CPU kernel (native/softmax.cc, its own exp) are checked element by element against
  // float64's softmax, on row widths around the 8-wide vectors (masked tails) and with exp underflowing to 0.
  function probabilities(scores: Tensor): Tensor {
    const [rows, width] = scores.shape as [number, number];
    const eye = new Float32Array(width * width);
    for (let i = 0; i < width; i++) eye[i * width + i] = 1;
    const identity = torch.tensor(eye, { shape: [1, width, width] });
    return F.headsAttention(scores.reshape(1, rows, width), identity, identity, 1, 1).reshape(rows, width);
  }

  for (const width of [1, 3, 7, 8, 9, 16, 77, 256]) {
    it(`softmax of a ${width}-wide row: every probability within 1e-6 of float64's (relative)`, () => {
      tidy(() => {
        torch.manualSeed(width);
        const scores = torch.randn([37, width]).mul(torch.rand([37, 1]).mul(60)); // spreads up to ~200: many underflows
        const ours = probabilities(scores).to('float64');
        // the reference takes the float32 differences x − max the kernel takes (that rounding is float32 softmax's own)
        const exact = scores.sub(scores.amax([-1], true)).to('float64').softmax(-1);
        // |ours − exact| ≤ 1e-6·exact, up to the smallest normal float (below it ours is 0)
        expect(ours.sub(exact).abs().sub(exact.mul(1e-6)).max().item()).toBeLessThanOrEqual(1.2e-38);
        expect(ours.sum(-1).sub(1).abs().max().item()).toBeLessThan(1e-6);
      });
    });
  }

  it('softmax: a row with a NaN score is NaN, the other rows are not touched by it', () => {
    tidy(() => {
      const scores = torch.randn([3, 77]);
      const withNaN = torch.cat([scores.narrow(0, 0, 1), torch.full([1, 77], Number.NaN), scores.narrow(0, 2, 1)], 0);
      const p = probabilities(withNaN);
      expect(p.narrow(0, 1, 1).isnan().all().item()).toBe(true);
      expect(relErr(p.narrow(0, 0, 1), scores.narrow(0, 0, 1).softmax(-1))).toBeLessThan(1e-6);
      expect(relErr(p.narrow(0, 2, 1), scores.narrow(0, 2, 1).softmax(-1))).toBeLessThan(1e-6);
    });
  });
});
