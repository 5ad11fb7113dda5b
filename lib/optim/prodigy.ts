// Prodigy (Mishchenko & Defazio, konstmish/prodigy's prodigyopt/prodigy.py, one parameter group, slice_p = 1):
// Adam whose step size d·lr is learned (D-adaptation). Each step is one native call (optim.cc's prodigyStep) that
// does both of the Python's passes over every parameter: the moments and s with the global sums Σ<g, p0 − p> and
// Σ|s| (one host sync), the new d, then the update. Its state — d, d_max, d_numerator, k and per parameter
// exp_avg, exp_avg_sq, s and p0 — is what a checkpoint saves and restores exactly.
import { native } from '../native.js';
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import { checkFloat32Params, gradsOf, numelOf, type Optimizer, type OptimizerStateDict } from './optimizer.js';

export interface ProdigyOptions {
  /** The multiplier of the learned step size; leave at 1 (the default) unless unstable. */
  lr?: number;
  betas?: [number, number];
  /** The EMA coefficient of the d estimate's sums; default √β2. */
  beta3?: number | null;
  eps?: number;
  weightDecay?: number;
  /** AdamW-style decoupled weight decay (default true); false adds weightDecay·p to the gradient. */
  decouple?: boolean;
  /** Adam's bias correction in the step size (default false). */
  useBiasCorrection?: boolean;
  /** Leave lr out of s's update, against a too-small d during warm-up (default false). */
  safeguardWarmup?: boolean;
  /** Initial d (default 1e-6). */
  d0?: number;
  /** Multiplies the d estimate (default 1). */
  dCoef?: number;
  /** Most growth of d per step (default Infinity: unrestricted). */
  growthRate?: number;
}

/** Prodigy's JSON state in a checkpoint (its tensors are `${i}.exp_avg`, `.exp_avg_sq`, `.s`, `.p0`). */
export interface ProdigyMeta {
  kind: 'prodigy';
  /** Per parameter: the steps it took part in (its state exists when > 0). */
  steps: number[];
  lr: number;
  betas: [number, number];
  beta3: number;
  eps: number;
  weightDecay: number;
  decouple: boolean;
  useBiasCorrection: boolean;
  safeguardWarmup: boolean;
  d: number;
  d0: number;
  dMax: number;
  dNumerator: number;
  dCoef: number;
  /** null: Infinity (JSON has none). */
  growthRate: number | null;
  /** The group's step counter (bias correction uses it). */
  k: number;
}

interface ParamState { expAvg: Tensor | null; expAvgSq: Tensor; s: Tensor; p0: Tensor; steps: number }

export class Prodigy implements Optimizer {
  readonly kind = 'prodigy' as const;
  lr: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly beta3: number;
  readonly eps: number;
  readonly weightDecay: number;
  readonly decouple: boolean;
  readonly useBiasCorrection: boolean;
  readonly safeguardWarmup: boolean;
  readonly d0: number;
  readonly dCoef: number;
  readonly growthRate: number;
  d: number;
  dMax: number;
  dNumerator = 0;
  /** The last step's estimate and Σ|s| (for logs; not needed to resume). */
  dHat = 0;
  dDenom = 0;
  k = 0;
  readonly params: Tensor[];
  private readonly state = new Map<Tensor, ParamState>();

  constructor(params: Iterable<Tensor>, o: ProdigyOptions = {}) {
    this.params = [...params];
    this.lr = o.lr ?? 1.0;
    [this.beta1, this.beta2] = o.betas ?? [0.9, 0.999];
    this.beta3 = o.beta3 ?? Math.sqrt(this.beta2);
    this.eps = o.eps ?? 1e-8;
    this.weightDecay = o.weightDecay ?? 0;
    this.decouple = o.decouple ?? true;
    this.useBiasCorrection = o.useBiasCorrection ?? false;
    this.safeguardWarmup = o.safeguardWarmup ?? false;
    this.d0 = o.d0 ?? 1e-6;
    this.dCoef = o.dCoef ?? 1.0;
    this.growthRate = o.growthRate ?? Infinity;
    for (const [name, v] of Object.entries({ d0: this.d0, lr: this.lr, eps: this.eps })) {
      if (!(v > 0) || !Number.isFinite(v)) throw new RangeError(`Prodigy: invalid ${name} ${v} (must be a finite number > 0)`);
    }
    if (!(this.weightDecay >= 0) || !Number.isFinite(this.weightDecay)) throw new RangeError(`Prodigy: invalid weightDecay ${this.weightDecay}`);
    if (!(this.dCoef > 0) || !Number.isFinite(this.dCoef)) throw new RangeError(`Prodigy: invalid dCoef ${this.dCoef}`);
    if (!(this.growthRate >= 1)) throw new RangeError(`Prodigy: invalid growthRate ${this.growthRate} (must be ≥ 1, or Infinity)`);
    for (const [name, b] of [['beta1', this.beta1], ['beta2', this.beta2], ['beta3', this.beta3]] as const) {
      if (!(b >= 0 && b < 1)) throw new RangeError(`Prodigy: invalid ${name} ${b} (must be in [0, 1))`);
    }
    checkFloat32Params('Prodigy', this.params);
    this.d = this.d0;
    this.dMax = this.d0;
  }

  /** A parameter's state, created at its first step (p0: the parameter as it was then, flattened). */
  private stateOf(p: Tensor): ParamState {
    let s = this.state.get(p);
    if (!s) {
      s = tidy(() => ({
        expAvg: this.beta1 > 0 ? keep(torch.zerosLike(p)) : null,
        expAvgSq: keep(torch.zerosLike(p)),
        s: keep(torch.zeros([numelOf(p)], { dtype: p.dtype, device: p.device })),
        p0: keep(p.detach().reshape([-1]).clone()),
        steps: 0,
      }));
      this.state.set(p, s);
    }
    return s;
  }

  step(): void {
    const withGrad = gradsOf(this.params);
    try {
      if (withGrad.length === 0) return;
      const states = withGrad.map(({ p }) => this.stateOf(p));
      for (const s of states) s.steps += 1;
      const r = native.prodigyStep(
        withGrad.map((e) => e.p), withGrad.map((e) => e.g), this.beta1 > 0 ? states.map((s) => s.expAvg as Tensor) : null,
        states.map((s) => s.expAvgSq), states.map((s) => s.s), states.map((s) => s.p0),
        {
          lr: this.lr, beta1: this.beta1, beta2: this.beta2, beta3: this.beta3, eps: this.eps, weightDecay: this.weightDecay, decouple: this.decouple,
          useBiasCorrection: this.useBiasCorrection, safeguardWarmup: this.safeguardWarmup, d: this.d, d0: this.d0, dMax: this.dMax,
          dNumerator: this.dNumerator, dCoef: this.dCoef, growthRate: this.growthRate, k: this.k,
        },
      );
      this.dDenom = r.dDenom;
      if (!r.stepped) return; // no gradient signal (Σ|s| = 0) or lr = 0: the Python returns before touching d or k
      this.d = r.d;
      this.dMax = r.dMax;
      this.dNumerator = r.dNumerator;
      this.dHat = r.dHat;
      this.k += 1;
    } finally {
      for (const { g } of withGrad) g.dispose();
    }
  }

  zeroGrad(): void {
    for (const p of this.params) p.grad = null;
  }

  stateShapes(p: Tensor): Record<string, readonly number[]> {
    const flat = [numelOf(p)];
    return { ...(this.beta1 > 0 ? { exp_avg: p.shape } : {}), exp_avg_sq: p.shape, s: flat, p0: flat };
  }

  stateDict(): OptimizerStateDict<ProdigyMeta> {
    const tensors = new Map<string, Tensor>();
    const steps = this.params.map((p, i) => {
      const s = this.state.get(p);
      if (!s) return 0;
      if (s.expAvg) tensors.set(`${i}.exp_avg`, s.expAvg);
      tensors.set(`${i}.exp_avg_sq`, s.expAvgSq);
      tensors.set(`${i}.s`, s.s);
      tensors.set(`${i}.p0`, s.p0);
      return s.steps;
    });
    return {
      tensors,
      meta: {
        kind: 'prodigy', steps, lr: this.lr, betas: [this.beta1, this.beta2], beta3: this.beta3, eps: this.eps, weightDecay: this.weightDecay,
        decouple: this.decouple, useBiasCorrection: this.useBiasCorrection, safeguardWarmup: this.safeguardWarmup, d: this.d, d0: this.d0,
        dMax: this.dMax, dNumerator: this.dNumerator, dCoef: this.dCoef, growthRate: Number.isFinite(this.growthRate) ? this.growthRate : null, k: this.k,
      },
    };
  }

  /** Restores a stateDict() (tensors copied; the caller keeps them). d, d_max, d_numerator and k come from the state. */
  loadStateDict(sd: OptimizerStateDict<{ steps: number[]; lr: number }>): void {
    const meta = sd.meta as Partial<ProdigyMeta> & { steps: number[]; lr: number };
    if (meta.kind !== 'prodigy') throw new Error(`Prodigy.loadStateDict: the state is of optimizer '${String(meta.kind ?? 'adamw')}'`);
    if (meta.steps.length !== this.params.length) {
      throw new Error(`Prodigy.loadStateDict: state has ${meta.steps.length} parameters, optimizer has ${this.params.length}`);
    }
    const need = (key: string, v: number | undefined) => {
      if (typeof v !== 'number' || !Number.isFinite(v)) throw new Error(`Prodigy.loadStateDict: ${key} must be a finite number, got ${String(v)}`);
      return v;
    };
    const scalars = { d: need('d', meta.d), dMax: need('dMax', meta.dMax), dNumerator: need('dNumerator', meta.dNumerator), k: need('k', meta.k) };
    this.params.forEach((p, i) => {
      const steps = meta.steps[i] ?? 0;
      if (steps === 0) return;
      const s = this.stateOf(p);
      s.steps = steps;
      for (const [key, dst] of [['exp_avg', s.expAvg], ['exp_avg_sq', s.expAvgSq], ['s', s.s], ['p0', s.p0]] as const) {
        if (!dst) continue;
        const src = sd.tensors.get(`${i}.${key}`);
        if (!src) throw new Error(`Prodigy.loadStateDict: missing ${i}.${key}`);
        dst.copy_(src);
      }
    });
    Object.assign(this, scalars);
    this.lr = meta.lr;
  }

  dispose(): void {
    for (const s of this.state.values()) {
      s.expAvg?.dispose();
      s.expAvgSq.dispose();
      s.s.dispose();
      s.p0.dispose();
    }
    this.state.clear();
  }
}
