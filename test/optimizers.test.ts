// Prodigy, Lion and the EMA against their published update rules, written out here with plain tensor ops
// (konstmish/prodigy's prodigyopt/prodigy.py, lucidrains/lion-pytorch's update_fn, diffusers' EMAModel), over 20
// steps of a toy problem (≤ 1e-6); the fp16 GradScaler's unscale and skip path for each optimizer; exact resume
// from a saved state (bit for bit); native memory flat over many steps.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { noGrad } from '../lib/autograd.js';
import { loadSafetensors, saveSafetensors } from '../lib/io/safetensors.js';
import { AdamW } from '../lib/optim/adamw.js';
import { EMAModel } from '../lib/optim/ema.js';
import { GradScaler } from '../lib/optim/grad_scaler.js';
import { Lion } from '../lib/optim/lion.js';
import type { Optimizer } from '../lib/optim/optimizer.js';
import { Prodigy, type ProdigyOptions } from '../lib/optim/prodigy.js';
import { manualSeed } from '../lib/random.js';
import { dispose, keep, memory, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { bitEqual } from './helpers.js';

const tmp = mkdtempSync(join(tmpdir(), 'difflora-optimizers-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const SHAPES = [[4, 3], [3], [2, 5]] as const;
const STEPS = 20;

/** The toy problem: parameters (the last starts at zero, as a LoRA B), targets, and 20 steps of gradient noise. */
function toyProblem(seed = 7): { init: Tensor[]; targets: Tensor[]; noise: Tensor[][] } {
  manualSeed(seed);
  const init = SHAPES.map((s, i) => keep(i === SHAPES.length - 1 ? torch.zeros([...s]) : torch.randn([...s])));
  const targets = SHAPES.map((s) => keep(torch.randn([...s])));
  const noise = Array.from({ length: STEPS + 5 }, () => SHAPES.map((s) => keep(torch.randn([...s]).mul(0.3))));
  return { init, targets, noise };
}
const toy = toyProblem();
afterAll(() => dispose([...toy.init, ...toy.targets, ...toy.noise.flat()]));

/** ∇ of Σ (p − target)² plus the step's noise: a function of the parameters, so both implementations see their own. */
const gradOf = (p: Tensor, i: number, step: number): Tensor => tidy(() => p.detach().sub(toy.targets[i]!).mul(2).add(toy.noise[step]![i]!));

function freshParams(): Tensor[] {
  return toy.init.map((t) => {
    const p = keep(t.clone());
    p.requiresGrad = true;
    return p;
  });
}

function setGrads(params: Tensor[], step: number, scale = 1): void {
  params.forEach((p, i) => {
    const g = tidy(() => gradOf(p, i, step).mul(scale));
    p.grad = g;
    g.dispose(); // the parameter holds its own reference
  });
}

const maxAbsDiff = (a: Tensor, b: Tensor): number => tidy(() => a.detach().sub(b.detach()).abs().max().item());

/** Prodigy as prodigyopt/prodigy.py writes it (one group, slice_p 1), on plain float32 tensors. */
class ReferenceProdigy {
  d: number; dMax: number; dNumerator = 0; k = 0;
  readonly o: Required<Omit<ProdigyOptions, 'beta3'>> & { beta3: number };
  private st: { expAvg: Tensor; expAvgSq: Tensor; s: Tensor; p0: Tensor }[] = [];
  constructor(public params: Tensor[], o: ProdigyOptions) {
    const betas = o.betas ?? [0.9, 0.999];
    this.o = {
      lr: o.lr ?? 1, betas, beta3: o.beta3 ?? Math.sqrt(betas[1]), eps: o.eps ?? 1e-8, weightDecay: o.weightDecay ?? 0, decouple: o.decouple ?? true,
      useBiasCorrection: o.useBiasCorrection ?? false, safeguardWarmup: o.safeguardWarmup ?? false, d0: o.d0 ?? 1e-6, dCoef: o.dCoef ?? 1, growthRate: o.growthRate ?? Infinity,
    };
    this.d = this.o.d0;
    this.dMax = this.o.d0;
  }

  step(grads: Tensor[]): void {
    const { lr, betas: [beta1, beta2], beta3, eps, weightDecay: decay, decouple, d0 } = this.o;
    let d = this.d;
    const biasCorrection = this.o.useBiasCorrection ? ((1 - beta2 ** (this.k + 1)) ** 0.5) / (1 - beta1 ** (this.k + 1)) : 1;
    const dlr = d * lr * biasCorrection;
    const dNumerator = this.dNumerator * beta3;
    let deltaNumerator = 0;
    let dDenom = 0;
    const gs = grads.map((g, i) => keep(decay !== 0 && !decouple ? g.clone().add_(this.params[i]!.detach(), decay) : g.clone()));
    this.params.forEach((p, i) => {
      const grad = gs[i]!;
      if (!this.st[i]) {
        this.st[i] = { expAvg: keep(torch.zerosLike(p)), expAvgSq: keep(torch.zerosLike(p)), s: keep(torch.zeros([grad.reshape(-1).shape[0]!])), p0: keep(p.detach().reshape(-1).clone()) };
      }
      const st = this.st[i]!;
      tidy(() => {
        const sliced = grad.reshape(-1);
        deltaNumerator += (d / d0) * dlr * sliced.matmul(st.p0.sub(p.detach().reshape(-1))).item(); // torch.dot
        st.expAvg.mul_(beta1).add_(grad, d * (1 - beta1));
        st.expAvgSq.mul_(beta2).addcmul_(grad, grad, d * d * (1 - beta2));
        st.s.mul_(beta3).add_(sliced, this.o.safeguardWarmup ? (d / d0) * d : (d / d0) * dlr);
        dDenom += st.s.abs().sum().item();
      });
    });
    if (dDenom === 0) { dispose(gs); return; }
    const globalNumerator = dNumerator + deltaNumerator;
    const dHat = this.o.dCoef * globalNumerator / dDenom;
    if (d === d0) d = Math.max(d, dHat);
    this.dMax = Math.max(this.dMax, dHat);
    d = Math.min(this.dMax, d * this.o.growthRate);
    this.dNumerator = globalNumerator;
    this.d = d;
    this.params.forEach((p, i) => tidy(() => noGrad(() => {
      const st = this.st[i]!;
      const denom = st.expAvgSq.sqrt().add_(d * eps);
      if (decay !== 0 && decouple) p.add_(p, -decay * dlr);
      if (beta1 > 0) p.addcdiv_(st.expAvg, denom, -dlr);
      else p.addcdiv_(gs[i]!, denom, -dlr * d);
    })));
    this.k += 1;
    dispose(gs);
  }

  dispose(): void { for (const s of this.st) dispose([s.expAvg, s.expAvgSq, s.s, s.p0]); }
}

/** Lion as lion-pytorch's update_fn writes it. */
function referenceLion(params: Tensor[], expAvg: Tensor[], grads: Tensor[], lr: number, wd: number, beta1: number, beta2: number): void {
  params.forEach((p, i) => tidy(() => {
    const m = expAvg[i]!;
    const g = grads[i]!;
    noGrad(() => {
      p.mul_(1 - lr * wd);
      const update = m.clone().mul_(beta1).add(g.mul(1 - beta1)).sign();
      p.add_(update, -lr);
    });
    m.mul_(beta2).add_(g, 1 - beta2);
  }));
}

/** Runs `steps` steps of an optimizer on the toy problem from step `from`. */
function run(opt: Optimizer, from: number, steps: number): void {
  for (let t = from; t < from + steps; t++) {
    setGrads(opt.params, t);
    opt.step();
    opt.zeroGrad();
  }
}

const PRODIGY_VARIANTS: [string, ProdigyOptions][] = [
  ['the published defaults', {}],
  ['decoupled weight decay and bias correction', { weightDecay: 0.1, useBiasCorrection: true }],
  ['L2 weight decay (decouple false) and safeguard warm-up', { weightDecay: 0.1, decouple: false, safeguardWarmup: true, beta3: 0.95 }],
  ['beta1 = 0, growth rate 1.5, lr 0.5', { betas: [0, 0.99], growthRate: 1.5, lr: 0.5 }],
];

describe('Prodigy', () => {
  it.each(PRODIGY_VARIANTS)('matches prodigy.py over 20 steps (%s) within 1e-6, d and its sums too', (_, o) => {
    const ours = freshParams();
    const theirs = freshParams();
    const opt = new Prodigy(ours, o);
    const ref = new ReferenceProdigy(theirs, o);
    try {
      let worst = 0;
      for (let t = 0; t < STEPS; t++) {
        setGrads(ours, t);
        const grads = theirs.map((p, i) => keep(gradOf(p, i, t)));
        opt.step();
        opt.zeroGrad();
        ref.step(grads);
        dispose(grads);
        ours.forEach((p, i) => { worst = Math.max(worst, maxAbsDiff(p, theirs[i]!)); });
        expect(Math.abs(opt.d - ref.d) / ref.d).toBeLessThan(1e-6);
      }
      expect(worst).toBeLessThanOrEqual(1e-6);
      expect(opt.k).toBe(STEPS);
      expect(Math.abs(opt.dMax - ref.dMax) / ref.dMax).toBeLessThan(1e-6);
      expect(Math.abs(opt.dNumerator - ref.dNumerator)).toBeLessThanOrEqual(1e-6 * Math.abs(ref.dNumerator));
      expect(opt.d).toBeGreaterThan(1e-6); // d adapted away from d0
      // the parameters moved towards the targets
      const loss = (ps: Tensor[]) => ps.reduce((a, p, i) => a + tidy(() => p.detach().sub(toy.targets[i]!).square().sum().item()), 0);
      expect(loss(ours)).toBeLessThan(loss(toy.init));
    } finally {
      opt.dispose(); ref.dispose(); dispose([...ours, ...theirs]);
    }
  });

  it('does nothing but count the parameter while the learning rate is 0 (a warm-up start), as prodigy.py returns early', () => {
    const ps = freshParams();
    const opt = new Prodigy(ps, {});
    try {
      opt.lr = 0;
      run(opt, 0, 1);
      expect(opt.k).toBe(0);
      expect(opt.d).toBe(1e-6);
      ps.forEach((p, i) => expect(bitEqual(p, toy.init[i]!)).toBe(true));
      expect(opt.stateDict().meta.steps).toEqual([1, 1, 1]); // p0 was taken
    } finally { opt.dispose(); dispose(ps); }
  });

  it('refuses bad hyper-parameters and non-float32 parameters', () => {
    const ps = freshParams();
    try {
      expect(() => new Prodigy(ps, { lr: 0 })).toThrow(/invalid lr 0/);
      expect(() => new Prodigy(ps, { betas: [0.9, 1] })).toThrow(/invalid beta2 1/);
      expect(() => new Prodigy(ps, { beta3: -0.1 })).toThrow(/invalid beta3/);
      const half = keep(torch.zeros([2], { dtype: 'bfloat16' }));
      expect(() => new Prodigy([half], {})).toThrow(/parameter 0 is bfloat16/);
      half.dispose();
    } finally { dispose(ps); }
  });
});

describe('Lion', () => {
  it.each([[0, 0.9, 0.99], [0.1, 0.9, 0.999], [0.5, 0.5, 0.9]])('matches lion-pytorch over 20 steps within 1e-6 (weight decay %s, betas %s/%s)', (wd, beta1, beta2) => {
    const lr = 3e-3;
    const ours = freshParams();
    const theirs = freshParams();
    const expAvg = theirs.map((p) => keep(torch.zerosLike(p)));
    const opt = new Lion(ours, { lr, betas: [beta1, beta2], weightDecay: wd });
    try {
      let worst = 0;
      for (let t = 0; t < STEPS; t++) {
        setGrads(ours, t);
        const grads = theirs.map((p, i) => keep(gradOf(p, i, t)));
        opt.step();
        opt.zeroGrad();
        referenceLion(theirs, expAvg, grads, lr, wd, beta1, beta2);
        dispose(grads);
        ours.forEach((p, i) => { worst = Math.max(worst, maxAbsDiff(p, theirs[i]!)); });
      }
      expect(worst).toBeLessThanOrEqual(1e-6);
      // every entry moved by about lr per step (sign updates)
      expect(maxAbsDiff(ours[0]!, toy.init[0]!)).toBeGreaterThan(lr);
    } finally {
      opt.dispose(); dispose([...ours, ...theirs, ...expAvg]);
    }
  });
});

describe('EMAModel', () => {
  it("follows diffusers' EMAModel: decay min(ema_decay, t / (t + 9)), 0 at step 1, s ← s − (1 − decay)(s − p)", () => {
    for (const maxDecay of [0.9999, 0.6]) {
      const ps = freshParams();
      const ema = new EMAModel(ps, { decay: maxDecay });
      const ref = ps.map((p) => keep(p.detach().clone()));
      const opt = new AdamW(ps, { lr: 0.05 });
      try {
        let worst = 0;
        for (let t = 1; t <= STEPS; t++) {
          run(opt, t, 1);
          ema.step();
          const decay = t === 1 ? 0 : Math.min(maxDecay, t / (t + 9));
          expect(ema.curDecayValue).toBeCloseTo(decay, 15);
          ref.forEach((r, i) => tidy(() => r.copy_(r.sub(r.sub(ps[i]!.detach()).mul(1 - decay)))));
          ref.forEach((r, i) => { worst = Math.max(worst, maxAbsDiff(ema.shadow[i]!, r)); });
        }
        expect(worst).toBeLessThanOrEqual(1e-6);
        expect(ema.optimizationStep).toBe(STEPS);
        // withAveragedWeights swaps the EMA in and puts the trained weights back
        const trained = ps.map((p) => keep(p.detach().clone()));
        ema.withAveragedWeights(() => ps.forEach((p, i) => expect(bitEqual(p.detach(), ema.shadow[i]!)).toBe(true)));
        ps.forEach((p, i) => expect(bitEqual(p.detach(), trained[i]!)).toBe(true));
        dispose(trained);
      } finally {
        ema.dispose(); opt.dispose(); dispose([...ps, ...ref]);
      }
    }
  });

  it('refuses a decay outside (0, 1)', () => {
    const ps = freshParams();
    try {
      for (const decay of [0, 1, -0.5, NaN]) expect(() => new EMAModel(ps, { decay })).toThrow(/decay must be in \(0, 1\)/);
    } finally { dispose(ps); }
  });
});

const makers: [string, (ps: Tensor[]) => Optimizer][] = [
  ['adamw', (ps) => new AdamW(ps, { lr: 1e-2 })],
  ['prodigy', (ps) => new Prodigy(ps, { weightDecay: 0.01, useBiasCorrection: true })],
  ['lion', (ps) => new Lion(ps, { lr: 1e-3, weightDecay: 0.1 })],
];

describe('fp16 loss scaling with every optimizer', () => {
  it.each(makers)('%s: a step with an inf gradient is skipped (weights and state unchanged, scale halved); a finite one equals the unscaled step', (_, make) => {
    const scaled = freshParams();
    const plain = freshParams();
    const a = make(scaled);
    const b = make(plain);
    const scaler = new GradScaler({ initScale: 1024 });
    try {
      run(a, 0, 2); // some state first
      run(b, 0, 2);
      const before = scaled.map((p) => keep(p.detach().clone()));
      const stateBefore = JSON.stringify(a.stateDict().meta);
      // an overflowed backward: one inf in the scaled gradients
      setGrads(scaled, 2, 1024);
      const inf = torch.full([3], Infinity);
      scaled[1]!.grad = inf;
      inf.dispose();
      expect(scaler.step(a)).toBe(false);
      scaler.update();
      a.zeroGrad();
      expect(scaler.scale).toBe(512);
      scaled.forEach((p, i) => expect(bitEqual(p.detach(), before[i]!)).toBe(true));
      expect(JSON.stringify(a.stateDict().meta)).toBe(stateBefore);
      // a good step: unscaled by 1/512 (exact, a power of two), the same update as without the scaler
      setGrads(scaled, 2, 512);
      expect(scaler.step(a)).toBe(true);
      scaler.update();
      a.zeroGrad();
      run(b, 2, 1);
      scaled.forEach((p, i) => expect(bitEqual(p.detach(), plain[i]!.detach())).toBe(true));
      dispose(before);
    } finally {
      a.dispose(); b.dispose(); dispose([...scaled, ...plain]);
    }
  });
});

describe('exact resume from a saved optimizer state', () => {
  it.each(makers)('%s: 20 steps straight == 8 steps, state saved to a file and loaded into a new optimizer, 12 steps (bit for bit)', (kind, make) => {
    const N = 20;
    const K = 8;
    const straight = freshParams();
    const first = freshParams();
    const second = freshParams();
    const a = make(straight);
    const b = make(first);
    const c = make(second);
    try {
      run(a, 0, N);
      run(b, 0, K);
      const sd = b.stateDict();
      const file = join(tmp, `${kind}.safetensors`);
      saveSafetensors(file, new Map([...sd.tensors, ...first.map((p, i) => [`param.${i}`, p] as [string, Tensor])]));
      const meta = JSON.parse(JSON.stringify(sd.meta)) as typeof sd.meta; // through JSON, as a checkpoint
      const { tensors } = loadSafetensors(file);
      second.forEach((p, i) => noGrad(() => p.copy_(tensors.get(`param.${i}`)!)));
      c.loadStateDict({ tensors, meta });
      dispose([...tensors.values()]);
      run(c, K, N - K);
      straight.forEach((p, i) => expect(bitEqual(p.detach(), second[i]!.detach()), `param ${i}`).toBe(true));
      expect(JSON.stringify(c.stateDict().meta)).toBe(JSON.stringify(a.stateDict().meta));
    } finally {
      a.dispose(); b.dispose(); c.dispose(); dispose([...straight, ...first, ...second]);
    }
  });

  it('refuses the state of another optimizer', () => {
    const ps = freshParams();
    const lion = new Lion(ps, {});
    const prodigy = new Prodigy(ps, {});
    try {
      run(lion, 0, 1);
      expect(() => prodigy.loadStateDict(lion.stateDict())).toThrow(/state is of optimizer 'lion'/);
      expect(() => lion.loadStateDict(prodigy.stateDict())).toThrow(/state is of optimizer 'prodigy'/);
    } finally { lion.dispose(); prodigy.dispose(); dispose(ps); }
  });
});

describe('native memory', () => {
  it.each(makers)('%s (+ EMA): the live tensor count and bytes stay flat over 300 steps', (_, make) => {
    const ps = freshParams();
    const opt = make(ps);
    const ema = new EMAModel(ps, { decay: 0.99 });
    try {
      run(opt, 0, 2);
      ema.step();
      const start = memory();
      for (let i = 0; i < 300; i++) {
        run(opt, i % STEPS, 1);
        ema.step();
      }
      const end = memory();
      expect(end.numTensors).toBe(start.numTensors);
      expect(end.cpu.allocatedBytes).toBe(start.cpu.allocatedBytes);
    } finally { opt.dispose(); ema.dispose(); dispose(ps); }
  });
});

describe('checkpoint state of the optimizers (parseTrainingState)', () => {
  const base = (optimizer: unknown, more: Record<string, unknown> = {}) => ({
    accumulator: { globalStep: 4, lrStep: 4, microStep: 0 }, optimizer, scaler: null,
    data: { epoch: 0, loader: { epoch: 0, position: 2, seed: 1 } }, epoch: 0, ...more,
  });
  const prodigy = {
    kind: 'prodigy', steps: [4, 4], lr: 1, betas: [0.9, 0.999], beta3: 0.9994, eps: 1e-8, weightDecay: 0, decouple: true, useBiasCorrection: false,
    safeguardWarmup: false, d: 2e-6, d0: 1e-6, dMax: 2e-6, dNumerator: 1e-9, dCoef: 1, growthRate: null, k: 4,
  };

  it('reads Prodigy, Lion, AdamW (with or without kind) and the EMA, and checks every field', async () => {
    const { parseTrainingState, checkResumeOptimizer } = await import('../lib/training/checkpoint.js');
    const run = { maxTrainSteps: 10, numTrainEpochs: 2, accumulationSteps: 1, numParams: 2, datasetLength: 4 };
    const ok = parseTrainingState(base(prodigy, { ema: { decay: 0.999, optimizationStep: 4 } }), 'f.json', run);
    expect(ok.optimizer).toEqual(prodigy);
    expect(ok.ema).toEqual({ decay: 0.999, optimizationStep: 4 });
    expect(parseTrainingState(base({ kind: 'lion', steps: [1, 1], lr: 1e-4, betas: [0.9, 0.99], weightDecay: 0.1 }), 'f.json', run).optimizer.kind).toBe('lion');
    const adamw = { steps: [4, 4], lr: 1e-4, betas: [0.9, 0.999], eps: 1e-8, weightDecay: 0.01 };
    expect(parseTrainingState(base(adamw), 'f.json', run).optimizer).toEqual(adamw);
    expect(parseTrainingState(base({ kind: 'adamw', ...adamw }), 'f.json', run).optimizer).toEqual({ kind: 'adamw', ...adamw });
    const bad: [unknown, RegExp][] = [
      [base({ ...prodigy, d: -1 }), /'f\.json': optimizer\.d must be a finite number > 0, got -1/],
      [base({ ...prodigy, k: 5 }), /optimizer\.k is 5, more than accumulator\.globalStep \(4\)/],
      [base({ ...prodigy, decouple: 'yes' }), /optimizer\.decouple must be true or false, got "yes"/],
      [base({ ...prodigy, kind: 'sgd' }), /optimizer\.kind must be 'adamw', 'prodigy' or 'lion', got "sgd"/],
      [base({ kind: 'lion', steps: [1, 1], lr: 1e-4, betas: [0.9, 0.99], weightDecay: 0.1, eps: 1e-8 }), /optimizer has unexpected key\(s\) "eps"/],
      [base(prodigy, { ema: { decay: 1, optimizationStep: 4 } }), /ema\.decay must be in \(0, 1\), got 1/],
      [base(prodigy, { ema: { decay: 0.9, optimizationStep: 5 } }), /ema\.optimizationStep is 5, more than accumulator\.globalStep/],
    ];
    for (const [json, message] of bad) expect(() => parseTrainingState(json, 'f.json', run)).toThrow(message);
    expect(() => checkResumeOptimizer(ok, 'ckpt', { optimizer: 'adamw', useEma: true })).toThrow(/'ckpt' was trained with --optimizer prodigy, this run has --optimizer adamw/);
    expect(() => checkResumeOptimizer(ok, 'ckpt', { optimizer: 'prodigy', useEma: false })).toThrow(/holds an EMA of the weights \(--use_ema\) and this run has no --use_ema/);
    expect(() => checkResumeOptimizer(ok, 'ckpt', { optimizer: 'prodigy', useEma: true })).not.toThrow();
  });
});

describe('native entry points', () => {
  it('refuse mismatched lists and bad options with errors naming the op', async () => {
    const { native } = await import('../lib/native.js');
    const ps = freshParams();
    const m = ps.map((p) => keep(torch.zerosLike(p)));
    try {
      expect(() => native.lionStep(ps, ps.slice(1), m, { lr: 1, beta1: 0.9, beta2: 0.99, weightDecay: 0 })).toThrow(/lionStep: grads has 2 tensors, params has 3/);
      expect(() => native.lionStep(ps, ps, m, { lr: 1, beta1: 0.9, beta2: 0.99 } as never)).toThrow(/lionStep: option 'weightDecay' must be a number/);
      expect(() => native.emaStep(m.slice(1), ps, 0.1)).toThrow(/emaStep: shadow has 2 tensors, params has 3/);
      const o = { lr: 1, beta1: 0.9, beta2: 0.999, beta3: 0.99, eps: 1e-8, weightDecay: 0, decouple: 1, useBiasCorrection: false, safeguardWarmup: false,
        d: 1e-6, d0: 1e-6, dMax: 1e-6, dNumerator: 0, dCoef: 1, growthRate: Infinity, k: 0 };
      expect(() => native.prodigyStep(ps, ps, m, m, m, m, o as never)).toThrow(/prodigyStep: option 'decouple' must be a boolean/);
      expect(() => native.prodigyStep(ps, ps, m, m, m.slice(2), m, { ...o, decouple: true })).toThrow(/prodigyStep: s has 1 tensors, params has 3/);
    } finally { dispose([...ps, ...m]); }
  });
});
