// An exponential moving average of parameters with diffusers' EMAModel semantics (training_utils.py, its defaults:
// min_decay 0, update_after_step 0, use_ema_warmup false): at optimization step t (counted from 1) the decay is
//   step = max(0, t − 1);  decay = step ≤ 0 ? 0 : min(maxDecay, (1 + step) / (10 + step))
// and every shadow weight moves s ← s − (1 − decay)·(s − p): one native call over all parameters (optim.cc's emaStep).
import { noGrad } from '../autograd.js';
import { native } from '../native.js';
import { dispose, keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';

export interface EMAOptions {
  /** The largest decay (diffusers' `decay`, --ema_decay); default 0.9999. */
  decay?: number;
}

/** The EMA's JSON state in a checkpoint (its shadow weights are tensors `${i}`). */
export interface EMAMeta { decay: number; optimizationStep: number }

export class EMAModel {
  readonly decay: number;
  optimizationStep = 0;
  /** The decay of the last step (diffusers' cur_decay_value); null before the first. */
  curDecayValue: number | null = null;
  readonly params: Tensor[];
  readonly shadow: Tensor[];

  constructor(params: Iterable<Tensor>, o: EMAOptions = {}) {
    this.params = [...params];
    this.decay = o.decay ?? 0.9999;
    if (!(this.decay > 0 && this.decay < 1)) throw new RangeError(`EMAModel: decay must be in (0, 1), got ${this.decay}`);
    this.shadow = this.params.map((p) => keep(tidy(() => p.detach().clone())));
  }

  /** diffusers' EMAModel.get_decay with update_after_step 0, no warm-up, min_decay 0. */
  getDecay(optimizationStep: number): number {
    const step = Math.max(0, optimizationStep - 1);
    if (step <= 0) return 0.0;
    return Math.max(Math.min((1 + step) / (10 + step), this.decay), 0.0);
  }

  /** One update after an optimizer step. */
  step(): void {
    this.optimizationStep += 1;
    const decay = this.getDecay(this.optimizationStep);
    this.curDecayValue = decay;
    native.emaStep(this.shadow, this.params, 1 - decay);
  }

  /**
   * Runs `fn` with the EMA weights in the parameters, then puts the trained weights back (also when `fn` throws).
   */
  withAveragedWeights<T>(fn: () => T): T {
    const saved = this.params.map((p) => keep(tidy(() => p.detach().clone())));
    try {
      noGrad(() => this.params.forEach((p, i) => p.copy_(this.shadow[i]!)));
      return fn();
    } finally {
      noGrad(() => this.params.forEach((p, i) => p.copy_(saved[i]!)));
      dispose(saved);
    }
  }

  stateDict(): { tensors: Map<string, Tensor>; meta: EMAMeta } {
    return { tensors: new Map(this.shadow.map((s, i) => [String(i), s])), meta: { decay: this.decay, optimizationStep: this.optimizationStep } };
  }

  /** Restores a stateDict() (values copied). The decay stays this EMA's (the run's --ema_decay). */
  loadStateDict(sd: { tensors: ReadonlyMap<string, Tensor>; meta: { optimizationStep: number } }): void {
    this.shadow.forEach((s, i) => {
      const src = sd.tensors.get(String(i));
      if (!src) throw new Error(`EMAModel.loadStateDict: missing shadow weight ${i}`);
      s.copy_(src);
    });
    this.optimizationStep = sd.meta.optimizationStep;
  }

  dispose(): void {
    dispose(this.shadow);
    this.shadow.length = 0;
  }
}
