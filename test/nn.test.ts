// nn.Module: dotted names equal PyTorch's, strict state-dict loading, dtype moves, freezing.
import { describe, expect, it } from 'vitest';
import { Module, parameter, buffer } from '../lib/nn/module.js';
import { ModuleList, Sequential } from '../lib/nn/container.js';
import { Conv2d, Dropout, Embedding, GroupNorm, LayerNorm, Linear } from '../lib/nn/layers.js';
import { dispose, memory, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import * as F from '../lib/functional.js';
import { noGrad } from '../lib/autograd.js';
import { relErr } from './helpers.js';

// The shape of diffusers' Attention: to_out is a ModuleList [Linear, Dropout], so its weight is `to_out.0.weight`.
class Attention extends Module {
  to_q = new Linear(8, 8, false);
  to_k = new Linear(8, 8, false);
  to_v = new Linear(8, 8, false);
  to_out = new ModuleList<Module>([new Linear(8, 8), new Dropout(0)]);
}

class Block extends Module {
  norm = new LayerNorm(8);
  attn1 = new Attention();
  counter: Tensor = buffer(torch.zeros([1]));
  scratch: Tensor = buffer(torch.zeros([2]), false);
}

describe('Module', () => {
  it('names parameters with PyTorch dotted paths, in declaration order', () => {
    const b = new Block();
    expect(b.namedParameters().map(([n]) => n)).toEqual([
      'norm.weight', 'norm.bias', 'attn1.to_q.weight', 'attn1.to_k.weight', 'attn1.to_v.weight',
      'attn1.to_out.0.weight', 'attn1.to_out.0.bias',
    ]);
    expect(b.namedBuffers().map(([n]) => n)).toEqual(['counter', 'scratch']);
    // non-persistent buffers stay out of the state dict, as in PyTorch
    expect([...b.stateDict().keys()]).toEqual(['counter', 'norm.weight', 'norm.bias', 'attn1.to_q.weight', 'attn1.to_k.weight',
      'attn1.to_v.weight', 'attn1.to_out.0.weight', 'attn1.to_out.0.bias']);
    expect(b.numParameters()).toBe(8 + 8 + 64 * 4 + 8);
    b.dispose();
  });

  it('loads a state dict strictly, reporting missing, unexpected and mis-shaped keys', () => {
    const a = new Block();
    const b = new Block();
    b.loadStateDict(a.stateDict());
    for (const [k, t] of a.stateDict()) expect(tidy(() => t.eq(b.stateDict().get(k)!).all().item())).toBe(true);

    const sd = new Map(a.stateDict());
    sd.delete('norm.bias');
    const extra = torch.zeros([3]);
    sd.set('attn1.to_x.weight', extra);
    expect(() => b.loadStateDict(sd)).toThrow(/missing key\(s\) \(1\): "norm.bias"[\s\S]*unexpected key\(s\) \(1\): "attn1.to_x.weight"/);
    expect(b.loadStateDict(sd, { strict: false })).toEqual({ missingKeys: ['norm.bias'], unexpectedKeys: ['attn1.to_x.weight'] });

    const wrong = new Map(a.stateDict());
    const bad = torch.zeros([4, 8]);
    wrong.set('attn1.to_q.weight', bad);
    expect(() => b.loadStateDict(wrong)).toThrow(/size mismatch for 1 key\(s\):\n {2}attn1.to_q.weight: checkpoint \[4, 8\] vs model \[8, 8\]/);
    dispose([extra, bad]);
    a.dispose();
    b.dispose();
  });

  it('moves to another dtype in place, keeping the same tensor objects', () => {
    const l = new Linear(4, 3);
    const w = l.weight;
    const before = w.toFloat64Array();
    l.to('float64');
    expect(l.weight).toBe(w);
    expect(w.dtype).toBe('float64');
    expect(w.requiresGrad).toBe(true);
    expect(w.toFloat64Array()).toEqual(before);
    l.to('bfloat16');
    expect(l.bias!.dtype).toBe('bfloat16');
    l.dispose();
  });

  it('freezes and unfreezes, switches train/eval recursively, zeroes grads', () => {
    const b = new Block();
    b.requiresGrad_(false);
    expect(b.parameters().every((p) => !p.requiresGrad)).toBe(true);
    b.attn1.to_q.requiresGrad_(true);
    expect(b.parameters().filter((p) => p.requiresGrad).length).toBe(1);
    b.eval();
    expect(b.namedModules().every(([, m]) => !m.training)).toBe(true);
    b.train();
    expect(b.attn1.to_out.at(1).training).toBe(true);
    tidy(() => b.attn1.to_q.forward(torch.ones([1, 8])).sum().backward());
    expect(b.attn1.to_q.weight.grad).not.toBeNull();
    b.zeroGrad();
    expect(b.attn1.to_q.weight.grad).toBeNull();
    b.dispose();
  });

  it('parameters survive tidy scopes; temporaries do not', () => {
    const before = memory().numTensors;
    const l = tidy(() => new Linear(16, 16));
    expect(memory().numTensors).toBe(before + 2);
    tidy(() => { l.forward(torch.randn([2, 16])); });
    expect(memory().numTensors).toBe(before + 2);
    l.dispose();
    expect(memory().numTensors).toBe(before);
  });

  it("groupNorm of a bfloat16 channels-last input equals the row-major one's (libtorch 1.13's CPU kernel is wrong there)", () => {
    tidy(() => {
      torch.manualSeed(0);
      for (const [c, groups] of [[8, 4], [32, 32], [16, 2]] as const) {
        const x = torch.randn([2, c, 16, 16]).to({ dtype: 'bfloat16' });
        const channelsLast = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2);
        expect(F.isRowMajor(x)).toBe(true);
        expect(F.isRowMajor(channelsLast)).toBe(false);
        const w = torch.randn([c]).to({ dtype: 'bfloat16' }), b = torch.randn([c]).to({ dtype: 'bfloat16' });
        const y = F.groupNorm(x, groups, w, b, 1e-6);
        expect(F.groupNorm(channelsLast, groups, w, b, 1e-6).sub(y).abs().max().item(), `${c}/${groups}`).toBe(0);
        expect(y.float().abs().mean().item()).toBeGreaterThan(0.5);
      }
    });
  });

  // F.groupNormSilu without a gradient is native/group_norm.cc's one-pass kernel on row-major float32 CPU tensors:
  // checked against silu(group_norm) computed in float64, on spatial sizes with and without 8-wide tails, 1 to 4
  // channels a group (and 16), no affine, a strided input (ATen's path), and a mean far from 0
  it('groupNormSilu equals silu(groupNorm) in float64 without a gradient (fast and fallback paths)', () => {
    tidy(() => {
      torch.manualSeed(1);
      const cases: [number[], number, boolean, number][] = [
        [[2, 64, 9, 7], 32, true, 0], [[1, 32, 40, 40], 32, true, 0], [[3, 8, 5], 4, false, 0], [[2, 4, 1, 1], 2, true, 0],
        [[2, 128, 8, 8], 32, true, 100], [[1, 16, 3, 3], 1, true, -3],
      ];
      for (const [shape, groups, affine, offset] of cases) {
        const x = torch.randn(shape).mul(2).add(offset);
        const c = shape[1]!;
        const w = affine ? torch.randn([c]) : null, b = affine ? torch.randn([c]) : null;
        const exact = F.groupNorm(x.double(), groups, w?.double(), b?.double(), 1e-6).silu();
        const label = `[${shape}] / ${groups}${affine ? '' : ' no affine'} + ${offset}`;
        expect(relErr(noGrad(() => F.groupNormSilu(x, groups, w, b, 1e-6)), exact), label).toBeLessThan(1e-6);
        // not row-major, the same values: ATen's two operators, whose x·(rstd·γ) + (β − mean·rstd·γ) loses a few bits
        // to cancellation where the mean is far from 0 (2e-6 at a mean of 100), which the kernel's x − mean does not
        const strided = x.transpose(0, 1).contiguous().transpose(0, 1);
        const atenTolerance = offset === 0 ? 1e-6 : 1e-5;
        expect(relErr(noGrad(() => F.groupNormSilu(strided, groups, w, b, 1e-6)), exact), `${label} strided`).toBeLessThan(atenTolerance);
        expect(relErr(F.groupNorm(x, groups, w, b, 1e-6).silu(), exact), `${label} ATen`).toBeLessThan(atenTolerance);
      }
    });
  });

  it('groupNormSilu with a gradient is autograd through group_norm and silu (the same values and gradients)', () => {
    tidy(() => {
      torch.manualSeed(2);
      const x = torch.randn([2, 16, 6, 6]);
      const w = torch.randn([16]).requiresGrad_(true), b = torch.randn([16]).requiresGrad_(true);
      const ours = F.groupNormSilu(x, 4, w, b, 1e-5);
      expect(ours.requiresGrad).toBe(true);
      ours.square().sum().backward();
      const [gw, gb] = [w.grad!.clone(), b.grad!.clone()];
      w.grad = null;
      b.grad = null;
      const ref = F.groupNorm(x, 4, w, b, 1e-5).silu();
      ref.square().sum().backward();
      expect(ours.sub(ref).abs().max().item()).toBe(0);
      expect(gw.sub(w.grad!).abs().max().item()).toBe(0);
      expect(gb.sub(b.grad!).abs().max().item()).toBe(0);
    });
  });

  it('layers compute what the functional ops compute, with PyTorch init bounds', () => {
    tidy(() => {
      torch.manualSeed(0);
      const lin = new Linear(100, 10);
      expect(lin.weight.abs().max().item()).toBeLessThanOrEqual(0.1);
      const x = torch.randn([3, 100]);
      expect(lin.forward(x).sub(x.matmul(lin.weight.t()).add(lin.bias!)).abs().max().item()).toBeLessThan(1e-5);
      const conv = new Conv2d(4, 6, 3, { padding: 1 });
      const img = torch.randn([1, 4, 5, 5]);
      expect(conv.forward(img).shape).toEqual([1, 6, 5, 5]);
      const gn = new GroupNorm(2, 4);
      const y = gn.forward(img);
      expect(y.sub(F.groupNorm(img, 2, gn.weight, gn.bias)).abs().max().item()).toBe(0);
      const emb = new Embedding(10, 3);
      expect(emb.forward(torch.tensor([1n, 2n])).shape).toEqual([2, 3]);
      const seq = new Sequential([new Linear(4, 4), new Dropout(0.5)]);
      seq.eval();
      const inp = torch.ones([2, 4]);
      expect(seq.forward(inp).shape).toEqual([2, 4]);
      for (const m of [lin, conv, gn, emb, seq]) m.dispose();
    });
  });

  it('custom modules register parameters with parameter() and index children with ModuleList', () => {
    class Scale extends Module {
      gamma = parameter(torch.ones([2]));
      blocks = new ModuleList([new Linear(2, 2), new Linear(2, 2)]);
    }
    const s = new Scale();
    expect(s.namedParameters().map(([n]) => n)).toEqual(['gamma', 'blocks.0.weight', 'blocks.0.bias', 'blocks.1.weight', 'blocks.1.bias']);
    expect(() => s.blocks.at(5)).toThrow(/out of range/);
    s.dispose();
  });
});
