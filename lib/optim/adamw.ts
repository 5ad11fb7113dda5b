// AdamW (torch.optim.AdamW semantics: decoupled weight decay, bias correction) on native multi-tensor
// kernels. Parameters held in float16/bfloat16 get fp32 master copies: the update happens in fp32 and is
// written back rounded, so small updates are not lost to low-precision rounding.
import { native, type NativeTensorHandle } from '../native.js';
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import type { Optimizer } from './optimizer.js';

export interface AdamWOptions {
  lr?: number;
  betas?: [number, number];
  eps?: number;
  weightDecay?: number;
  /** Keep fp32 master weights for non-fp32 params (default: yes, when any param is not fp32). */
  masterWeights?: boolean;
}

interface ParamState { expAvg: Tensor; expAvgSq: Tensor; master: Tensor | null; step: number }

export class AdamW implements Optimizer {
  readonly kind = 'adamw' as const;
  lr: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  readonly params: Tensor[];
  private readonly state = new Map<Tensor, ParamState>();
  private readonly useMasters: boolean;

  constructor(params: Iterable<Tensor>, o: AdamWOptions = {}) {
    this.params = [...params];
    this.lr = o.lr ?? 1e-3;
    [this.beta1, this.beta2] = o.betas ?? [0.9, 0.999];
    this.eps = o.eps ?? 1e-8;
    this.weightDecay = o.weightDecay ?? 1e-2;
    for (const [name, v] of Object.entries({ lr: this.lr, eps: this.eps, weightDecay: this.weightDecay })) {
      if (!(v >= 0)) throw new RangeError(`AdamW: invalid ${name} ${v}`);
    }
    for (const b of [this.beta1, this.beta2]) if (!(b >= 0 && b < 1)) throw new RangeError(`AdamW: invalid beta ${b}`);
    this.useMasters = o.masterWeights ?? this.params.some((p) => p.dtype !== 'float32' && p.dtype !== 'float64');
    if (new Set(this.params).size !== this.params.length) throw new Error('AdamW: a parameter appears twice');
  }

  private stateOf(p: Tensor): ParamState {
    let s = this.state.get(p);
    if (!s) {
      const master = this.useMasters && p.dtype !== 'float32' ? keep(tidy(() => p.detach().to('float32'))) : null;
      const like = master ?? p;
      s = {
        expAvg: keep(torch.zerosLike(like, { dtype: like.dtype })),
        expAvgSq: keep(torch.zerosLike(like, { dtype: like.dtype })),
        master,
        step: 0,
      };
      this.state.set(p, s);
    }
    return s;
  }

  /**
   * One update of every parameter that has a gradient (others are skipped, as in PyTorch). The step
   * count is per parameter; parameters are updated in groups that share it.
   */
  step(): void {
    this.deviceStepCount?.dispose(); // the host's counts move on: a later stepOnDevice starts from them
    this.deviceStepCount = null;
    const groups = new Map<number, { p: Tensor; g: Tensor; s: ParamState }[]>();
    const grads: Tensor[] = [];
    try {
      for (const p of this.params) {
        const g = p.grad;
        if (g === null) continue;
        grads.push(g);
        const s = this.stateOf(p);
        s.step += 1;
        const group = groups.get(s.step) ?? [];
        group.push({ p, g, s });
        groups.set(s.step, group);
      }
      for (const [step, group] of groups) {
        const masters = this.useMasters && group.every((e) => e.s.master) ? group.map((e) => e.s.master as NativeTensorHandle) : null;
        if (this.useMasters && !masters && group.some((e) => e.s.master)) {
          // mixed fp32 and low-precision params: update the two kinds separately
          const low = group.filter((e) => e.s.master);
          const full = group.filter((e) => !e.s.master);
          this.apply(low, step, true);
          this.apply(full, step, false);
        } else {
          this.apply(group, step, masters !== null);
        }
      }
    } finally {
      for (const g of grads) g.dispose();
    }
  }

  /** The step count on the device for stepOnDevice (float32 [1]), made from the host's counts when first needed. */
  private deviceStepCount: Tensor | null = null;

  /**
   * One update of every parameter on the device, with no host sync (device_step.ts): the learning rate (a float64 [1]
   * tensor) and the step count read there, a step flagged by foundInf changing nothing. Every parameter must have a gradient
   * and one shared step count. The host's step counts follow with commitDeviceStep() once the flag is read.
   */
  stepOnDevice(o: { lr: Tensor; foundInf: Tensor | null }): void {
    const entries = this.params.map((p) => ({ p, g: p.grad, s: this.stateOf(p) }));
    try {
      const missing = entries.findIndex((e) => e.g === null);
      if (missing >= 0) throw new Error(`AdamW.stepOnDevice: parameter ${missing} has no gradient (the device-side step updates every parameter)`);
      const steps = new Set(entries.map((e) => e.s.step));
      if (steps.size !== 1) throw new Error(`AdamW.stepOnDevice: the parameters have different step counts (${[...steps].join(', ')})`);
      if (!this.deviceStepCount) this.deviceStepCount = keep(torch.full([1], [...steps][0]!, { dtype: 'float32', device: this.params[0]!.device }));
      const withMasters = entries.every((e) => e.s.master);
      if (!withMasters && entries.some((e) => e.s.master)) throw new Error('AdamW.stepOnDevice: mixed float32 and low-precision parameters');
      native.adamwStepOnDevice(
        entries.map((e) => e.p), entries.map((e) => e.g as Tensor), entries.map((e) => e.s.expAvg), entries.map((e) => e.s.expAvgSq),
        withMasters ? entries.map((e) => e.s.master as Tensor) : null,
        { lr: o.lr, stepCount: this.deviceStepCount, foundInf: o.foundInf, beta1: this.beta1, beta2: this.beta2, eps: this.eps, weightDecay: this.weightDecay },
      );
    } finally {
      for (const e of entries) e.g?.dispose();
    }
  }

  /** After a stepOnDevice whose flag has been read: the host's step counts advance as the device's did. */
  commitDeviceStep(stepped: boolean): void {
    if (!stepped) return;
    for (const p of this.params) this.stateOf(p).step += 1;
  }

  private apply(group: { p: Tensor; g: Tensor; s: ParamState }[], step: number, withMasters: boolean): void {
    if (group.length === 0) return;
    native.adamwStep(
      group.map((e) => e.p), group.map((e) => e.g), group.map((e) => e.s.expAvg), group.map((e) => e.s.expAvgSq),
      withMasters ? group.map((e) => e.s.master as Tensor) : null,
      { lr: this.lr, beta1: this.beta1, beta2: this.beta2, eps: this.eps, weightDecay: this.weightDecay, step },
    );
  }

  /** The moments a stepped parameter has (checkpoints check them; the optional master weights are not listed). */
  stateShapes(p: Tensor): Record<string, readonly number[]> {
    return { exp_avg: p.shape, exp_avg_sq: p.shape };
  }

  /** Drops every gradient (set to None, PyTorch's default). */
  zeroGrad(): void {
    for (const p of this.params) p.grad = null;
  }

  /**
   * State by parameter index, for checkpoints: `${i}.exp_avg`, `${i}.exp_avg_sq`, `${i}.master` tensors
   * (the optimizer's own: do not dispose) and the step counts and hyper-parameters as JSON.
   */
  stateDict(): { tensors: Map<string, Tensor>; meta: { steps: number[]; lr: number; betas: [number, number]; eps: number; weightDecay: number } } {
    const tensors = new Map<string, Tensor>();
    const steps: number[] = [];
    this.params.forEach((p, i) => {
      const s = this.state.get(p);
      steps.push(s?.step ?? 0);
      if (!s) return;
      tensors.set(`${i}.exp_avg`, s.expAvg);
      tensors.set(`${i}.exp_avg_sq`, s.expAvgSq);
      if (s.master) tensors.set(`${i}.master`, s.master);
    });
    return { tensors, meta: { steps, lr: this.lr, betas: [this.beta1, this.beta2], eps: this.eps, weightDecay: this.weightDecay } };
  }

  /** Restores a stateDict() (values are copied; the caller keeps ownership of the given tensors). */
  loadStateDict(sd: { tensors: Map<string, Tensor>; meta: { steps: number[]; lr: number } }): void {
    if (sd.meta.steps.length !== this.params.length) {
      throw new Error(`AdamW.loadStateDict: state has ${sd.meta.steps.length} parameters, optimizer has ${this.params.length}`);
    }
    this.lr = sd.meta.lr;
    this.deviceStepCount?.dispose();
    this.deviceStepCount = null;
    this.params.forEach((p, i) => {
      const step = sd.meta.steps[i] ?? 0;
      if (step === 0) return;
      const s = this.stateOf(p);
      s.step = step;
      for (const [key, dst] of [['exp_avg', s.expAvg], ['exp_avg_sq', s.expAvgSq], ['master', s.master]] as const) {
        if (!dst) continue;
        const src = sd.tensors.get(`${i}.${key}`);
        if (!src) throw new Error(`AdamW.loadStateDict: missing ${i}.${key}`);
        dst.copy_(src);
      }
    });
  }

  /** Frees the optimizer state (moments and master weights). */
  dispose(): void {
    for (const s of this.state.values()) {
      s.expAvg.dispose();
      s.expAvgSq.dispose();
      s.master?.dispose();
    }
    this.state.clear();
    this.deviceStepCount?.dispose();
    this.deviceStepCount = null;
  }
}
