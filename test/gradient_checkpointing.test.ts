// Gradient checkpointing: gradients equal the plain computation's (bit for bit on CPU), also with dropout
// (random state replayed), autocast, parameters captured by closure, and inputs that need no grad.
import { describe, expect, it } from 'vitest';
import { checkpoint } from '../lib/gradient_checkpointing.js';
import { autocast } from '../lib/autograd.js';
import * as F from '../lib/functional.js';
import { Linear } from '../lib/nn/layers.js';
import { dispose, keep, memory, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { bitEqual } from './helpers.js';

function block(l1: Linear, l2: Linear, p = 0) {
  return (x: Tensor): Tensor => {
    let h = l1.forward(x).gelu();
    if (p) h = F.dropout(h, p, true);
    return l2.forward(h).add(x);
  };
}

function grads(params: Tensor[], run: () => Tensor): Tensor[] {
  for (const p of params) p.grad = null;
  tidy(() => { run().square().mean().backward(); });
  return params.map((p) => keep(p.grad!));
}

describe('checkpoint', () => {
  torch.manualSeed(0);
  const l1 = new Linear(16, 32);
  const l2 = new Linear(32, 16);
  const params = [...l1.parameters(), ...l2.parameters()];

  it.each([['input requires grad', true], ['only parameters require grad (LoRA case)', false]])('%s: same gradients as without checkpointing', (_, inputGrad) => {
    const x = keep(torch.randn([4, 16], { requiresGrad: inputGrad as boolean }));
    const f = block(l1, l2);
    const plain = grads(params, () => f(f(x)));
    const xPlain = inputGrad ? keep(x.grad!) : null;
    x.grad = null;
    const ckpt = grads(params, () => checkpoint(f, checkpoint(f, x)));
    plain.forEach((g, i) => expect(bitEqual(g, ckpt[i]!)).toBe(true));
    if (xPlain) expect(bitEqual(xPlain, x.grad!)).toBe(true);
    dispose([...plain, ...ckpt, x, xPlain]);
  });

  it('follows ops that return several tensors (chunk, as in GEGLU)', () => {
    const x = keep(torch.randn([4, 16], { requiresGrad: true }));
    const f = (t: Tensor) => {
      const [a, b] = l1.forward(t).chunk(2, -1) as [Tensor, Tensor];
      return a.mul(b.gelu());
    };
    const plain = grads(params.slice(0, 2), () => f(x));
    const ckpt = grads(params.slice(0, 2), () => checkpoint(f, x));
    plain.forEach((g, i) => expect(bitEqual(g, ckpt[i]!)).toBe(true));
    dispose([...plain, ...ckpt, x]);
  });

  it('replays dropout with the forward random state', () => {
    const x = keep(torch.randn([8, 16], { requiresGrad: true }));
    const f = block(l1, l2, 0.5);
    torch.manualSeed(7);
    const plain = grads(params, () => f(x));
    torch.manualSeed(7);
    const ckpt = grads(params, () => checkpoint(f, x));
    plain.forEach((g, i) => expect(bitEqual(g, ckpt[i]!)).toBe(true));
    dispose([...plain, ...ckpt, x]);
  });

  it('recomputes under the forward autocast state (bf16 on CPU)', () => {
    const x = keep(torch.randn([4, 16], { requiresGrad: true }));
    const f = block(l1, l2);
    const plain = grads(params, () => autocast({ deviceType: 'cpu' }, () => f(x)));
    const ckpt = grads(params, () => autocast({ deviceType: 'cpu' }, () => checkpoint(f, x)));
    plain.forEach((g, i) => expect(bitEqual(g, ckpt[i]!)).toBe(true));
    dispose([...plain, ...ckpt, x]);
  });

  it('keeps no activations of the block alive between forward and backward', () => {
    const big = new Linear(256, 1024);
    const x = keep(torch.randn([512, 256], { requiresGrad: true }));
    const f = (t: Tensor) => big.forward(t).gelu().gelu().gelu().sum(1);
    const held = (run: () => Tensor) => tidy(() => {
      const before = memory().cpu.allocatedBytes;
      const y = run();
      const after = memory().cpu.allocatedBytes;
      y.sum().backward();
      return after - before;
    });
    const plainBytes = held(() => f(x));
    const ckptBytes = held(() => checkpoint(f, x));
    // plain keeps three 512x1024 fp32 activations (2 MiB each) for backward; checkpoint keeps ~none
    expect(plainBytes).toBeGreaterThan(5 * 1024 * 1024);
    expect(ckptBytes).toBeLessThan(64 * 1024);
    expect(big.weight.grad).not.toBeNull();
    big.dispose();
    x.dispose();
  });

  it('refuses a captured tensor with autograd history, and runs plainly under noGrad', () => {
    const a = keep(torch.randn([4], { requiresGrad: true }));
    const b = keep(torch.randn([4], { requiresGrad: true }));
    tidy(() => {
      const hist = a.mul(2);
      expect(() => checkpoint((t) => t.add(hist), b)).toThrow(/autograd history.*pass it as an input/);
      // the recorder was reset: the next checkpoint works
      const y = checkpoint((t, u) => t.add(u!), b, hist);
      y.sum().backward();
      expect(Array.from(a.grad!.toFloat64Array())).toEqual([2, 2, 2, 2]);
    });
    dispose([a, b]);
  });

  it('does not leak tensor handles', () => {
    const x = keep(torch.randn([4, 16], { requiresGrad: true }));
    const f = block(l1, l2);
    tidy(() => { checkpoint(f, x).sum().backward(); });
    const base = memory().numTensors;
    for (let i = 0; i < 50; i++) tidy(() => { checkpoint(f, x).sum().backward(); });
    for (const p of params) p.grad = null;
    x.grad = null;
    expect(memory().numTensors).toBe(base);
    x.dispose();
  });
});
