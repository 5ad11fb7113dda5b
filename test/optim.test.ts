// AdamW, gradient clipping and loss scaling against the reference: the `lora_train` goldens hold the
// LoRA parameters, their gradients and the parameters after torch's clip + AdamW step.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { loadSafetensors } from '../lib/io/safetensors.js';
import { AdamW } from '../lib/optim/adamw.js';
import { clipGradNorm } from '../lib/optim/clip.js';
import { GradScaler } from '../lib/optim/grad_scaler.js';
import { dispose, keep, memory, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { bitEqual, fixtures, relErr } from './helpers.js';

const meta = JSON.parse(readFileSync(join(fixtures, 'goldens/lora_train.json'), 'utf8')) as {
  lora_param_order: string[];
  variants: Record<string, { grad_norm_preclip: number }>;
};
const golden = loadSafetensors(join(fixtures, 'goldens/lora_train.safetensors')).tensors;
for (const t of golden.values()) keep(t);
afterAll(() => dispose([...golden.values()]));

function g(name: string): Tensor {
  const t = golden.get(name);
  if (!t) throw new Error(`golden tensor ${name} missing`);
  return t;
}

/** Fresh LoRA params at their initial values, each with the variant's gradient. */
function paramsWithGrads(variant: string, gradKey = 'grad'): Tensor[] {
  return meta.lora_param_order.map((name) => {
    const p = keep(g(`lora_init/${name}`).clone());
    p.requiresGrad = true;
    p.grad = g(`${variant}/${gradKey}/${name}`).clone();
    return p;
  });
}

const hyper = { lr: 1e-4, betas: [0.9, 0.999] as [number, number], weightDecay: 1e-2, eps: 1e-8 };
const variants = Object.keys(meta.variants);

describe('AdamW against torch.optim.AdamW', () => {
  it.each(variants)('%s: one step without clipping equals updated_noclip', (variant) => {
    const params = paramsWithGrads(variant);
    const opt = new AdamW(params, hyper);
    opt.step();
    let worst = 0;
    let equalBits = 0;
    meta.lora_param_order.forEach((name, i) => {
      const ref = g(`${variant}/updated_noclip/${name}`);
      worst = Math.max(worst, relErr(params[i]!, ref));
      if (bitEqual(params[i]!, ref)) equalBits++;
    });
    expect(worst).toBeLessThan(1e-5);
    // same libtorch, same operation order: fp32 results are expected to be identical bits
    expect(equalBits).toBe(params.length);
    opt.dispose();
    dispose(params);
  });

  it.each(variants)('%s: clip to 1e-3 then step equals grad_clipped_1e-3 and updated_clipped_1e-3', (variant) => {
    const params = paramsWithGrads(variant);
    const norm = clipGradNorm(params, 1e-3);
    expect(Math.abs(norm - meta.variants[variant]!.grad_norm_preclip) / meta.variants[variant]!.grad_norm_preclip).toBeLessThan(1e-6);
    meta.lora_param_order.forEach((name, i) => {
      tidy(() => expect(relErr(params[i]!.grad!, g(`${variant}/grad_clipped_1e-3/${name}`))).toBeLessThan(1e-6));
    });
    const opt = new AdamW(params, hyper);
    opt.step();
    meta.lora_param_order.forEach((name, i) => {
      expect(relErr(params[i]!, g(`${variant}/updated_clipped_1e-3/${name}`))).toBeLessThan(1e-5);
    });
    opt.dispose();
    dispose(params);
  });

  it('clipping at 1.0 is a no-op on these small gradients (updated_clipped == updated_noclip)', () => {
    const params = paramsWithGrads('plain');
    const before = params.map((p) => keep(p.grad!));
    clipGradNorm(params, 1.0);
    params.forEach((p, i) => tidy(() => expect(bitEqual(p.grad!, before[i]!)).toBe(true)));
    dispose([...params, ...before]);
  });

  it('matches a float64 re-derivation of the AdamW formula over several steps', () => {
    torch.manualSeed(0);
    const p = keep(torch.randn([5, 7], { dtype: 'float64', requiresGrad: true }));
    const ref = p.toFloat64Array().slice();
    const m = new Float64Array(ref.length);
    const v = new Float64Array(ref.length);
    const o = { lr: 0.01, beta1: 0.8, beta2: 0.95, eps: 1e-6, wd: 0.1 };
    const opt = new AdamW([p], { lr: o.lr, betas: [o.beta1, o.beta2], eps: o.eps, weightDecay: o.wd });
    for (let step = 1; step <= 5; step++) {
      const grad = keep(torch.randn([5, 7], { dtype: 'float64' }));
      const gv = grad.toFloat64Array();
      p.grad = grad;
      opt.step();
      for (let i = 0; i < ref.length; i++) {
        ref[i]! *= 1 - o.lr * o.wd;
        m[i] = m[i]! * o.beta1 + (1 - o.beta1) * gv[i]!;
        v[i] = v[i]! * o.beta2 + (1 - o.beta2) * gv[i]! * gv[i]!;
        const denom = Math.sqrt(v[i]!) / Math.sqrt(1 - o.beta2 ** step) + o.eps;
        ref[i]! -= (o.lr / (1 - o.beta1 ** step)) * (m[i]! / denom);
      }
      grad.dispose();
    }
    const ours = p.toFloat64Array();
    let worst = 0;
    ours.forEach((x, i) => { worst = Math.max(worst, Math.abs(x - ref[i]!) / Math.max(1e-12, Math.abs(ref[i]!))); });
    expect(worst).toBeLessThan(1e-12);
    opt.dispose();
    p.dispose();
  });

  it('keeps fp32 master weights for bfloat16 params: tiny updates accumulate instead of rounding away', () => {
    const p = keep(torch.ones([64], { dtype: 'bfloat16', requiresGrad: true }));
    const q = keep(torch.ones([64], { dtype: 'bfloat16', requiresGrad: true }));
    const withMasters = new AdamW([p], { lr: 1e-4, weightDecay: 0 });
    const without = new AdamW([q], { lr: 1e-4, weightDecay: 0, masterWeights: false });
    for (let i = 0; i < 100; i++) {
      p.grad = tidy(() => torch.onesLike(p));
      q.grad = tidy(() => torch.onesLike(q));
      withMasters.step();
      without.step();
    }
    const state = withMasters.stateDict();
    const master = state.tensors.get('0.master')!;
    expect(master.dtype).toBe('float32');
    // 100 steps of ~lr each: 1 - 0.01 = 0.99; bf16 holds only 0.98828125 or 0.9921875 near it
    expect(Math.abs(master.mean().item() - 0.99)).toBeLessThan(1e-4);
    expect(p.to('float32').mean().item()).toBe(0.98828125); // nearest bf16 to 0.99
    // without masters each 1e-4 step is below bf16 resolution at 1.0 and is lost
    expect(q.to('float32').mean().item()).toBe(1);
    withMasters.dispose();
    without.dispose();
    dispose([p, q]);
  });

  it('saves and restores its state so a resumed run continues identically', () => {
    torch.manualSeed(3);
    const a = keep(torch.randn([4, 4], { requiresGrad: true }));
    const b = keep(a.detach().clone());
    b.requiresGrad = true;
    const grads = Array.from({ length: 4 }, () => keep(torch.randn([4, 4])));
    const optA = new AdamW([a], { lr: 0.1 });
    for (const gr of grads) { a.grad = gr.clone(); optA.step(); }
    const optB1 = new AdamW([b], { lr: 0.1 });
    for (const gr of grads.slice(0, 2)) { b.grad = gr.clone(); optB1.step(); }
    const saved = optB1.stateDict();
    const copies = new Map([...saved.tensors].map(([k, t]) => [k, keep(t.clone())]));
    optB1.dispose();
    const optB2 = new AdamW([b], { lr: 0.5 });
    optB2.loadStateDict({ tensors: copies, meta: saved.meta });
    expect(optB2.lr).toBe(0.1);
    for (const gr of grads.slice(2)) { b.grad = gr.clone(); optB2.step(); }
    expect(bitEqual(a, b)).toBe(true);
    dispose([a, b, ...grads, ...copies.values()]);
    optA.dispose();
    optB2.dispose();
  });

  it('rejects invalid hyper-parameters and skips params without gradients', () => {
    const p = keep(torch.ones([2], { requiresGrad: true }));
    expect(() => new AdamW([p], { lr: -1 })).toThrow(/invalid lr/);
    expect(() => new AdamW([p], { betas: [1, 0.9] })).toThrow(/invalid beta/);
    expect(() => new AdamW([p, p])).toThrow(/twice/);
    const opt = new AdamW([p], { lr: 1 });
    opt.step();
    expect(p.toFloat64Array()).toEqual(new Float64Array([1, 1]));
    opt.dispose();
    p.dispose();
  });
});

describe('GradScaler', () => {
  function setup(values: number[]) {
    const p = keep(torch.zeros([values.length], { requiresGrad: true }));
    p.grad = torch.tensor(values);
    const steps: number[] = [];
    const opt = { params: [p], step: () => { steps.push(1); } };
    return { p, opt, steps };
  }

  it('unscales gradients and steps when they are finite', () => {
    const scaler = new GradScaler({ initScale: 1024 });
    const { p, opt, steps } = setup([1024, -2048]);
    expect(scaler.step(opt)).toBe(true);
    expect(Array.from(p.grad!.toFloat64Array())).toEqual([1, -2]);
    expect(steps.length).toBe(1);
    scaler.update();
    expect(scaler.scale).toBe(1024);
    expect(scaler.growthTracker).toBe(1);
    p.dispose();
  });

  it.each([[Infinity], [NaN], [-Infinity]])('skips the step and backs off on %s', (bad) => {
    const scaler = new GradScaler({ initScale: 2 ** 16 });
    const { p, opt, steps } = setup([1, bad]);
    expect(scaler.step(opt)).toBe(false);
    expect(steps.length).toBe(0);
    scaler.update();
    expect(scaler.scale).toBe(2 ** 15);
    expect(scaler.growthTracker).toBe(0);
    p.dispose();
  });

  it('grows the scale after growthInterval good steps, and an overflow resets the count', () => {
    const scaler = new GradScaler({ initScale: 8, growthInterval: 3 });
    const { p, opt } = setup([1, 1]);
    const run = (bad: boolean) => { p.grad = torch.tensor(bad ? [1, Infinity] : [1, 1]); scaler.step(opt); scaler.update(); };
    run(false); run(false);
    expect(scaler.scale).toBe(8);
    run(true);
    expect(scaler.scale).toBe(4);
    run(false); run(false); run(false);
    expect(scaler.scale).toBe(8);
    expect(scaler.growthTracker).toBe(0);
    const s = scaler.stateDict();
    const other = new GradScaler();
    other.loadStateDict(s);
    expect(other.scale).toBe(8);
    p.dispose();
  });

  it('scales the loss', () => {
    const scaler = new GradScaler({ initScale: 4 });
    const loss = torch.tensor([1.5]);
    const scaled = scaler.scaleLoss(loss);
    expect(scaled.item()).toBe(6);
    dispose([loss, scaled]);
  });
});

describe('memory', () => {
  it('stays flat over 10,000 training-like steps', () => {
    const w = keep(torch.randn([32, 32], { requiresGrad: true }));
    const opt = new AdamW([w], { lr: 1e-3 });
    const step = () => tidy(() => {
      const x = torch.randn([16, 32]);
      const loss = x.matmul(w).silu().square().mean();
      loss.backward();
      clipGradNorm([w], 1.0);
      opt.step();
      opt.zeroGrad();
    });
    for (let i = 0; i < 100; i++) step();
    const before = memory();
    const rssBefore = process.memoryUsage().rss;
    for (let i = 0; i < 10_000; i++) step();
    const after = memory();
    expect(after.numTensors).toBe(before.numTensors);
    expect(after.cpu.allocatedBytes).toBe(before.cpu.allocatedBytes);
    expect(process.memoryUsage().rss - rssBefore).toBeLessThan(64 * 1024 * 1024);
    opt.dispose();
    w.dispose();
  });
});
