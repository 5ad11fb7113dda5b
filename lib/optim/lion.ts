// Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms"; lucidrains/lion-pytorch's update_fn): the
// sign of an interpolation of momentum and gradient, with decoupled weight decay —
//   p ← p·(1 − lr·wd);  p ← p − lr·sign(β1·m + (1 − β1)·g);  m ← β2·m + (1 − β2)·g
// one native call (optim.cc's lionStep) per step over every parameter.
import { native } from '../native.js';
import { keep } from '../scope.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import { checkFloat32Params, gradsOf, type Optimizer, type OptimizerStateDict } from './optimizer.js';

export interface LionOptions {
  lr?: number;
  /** Default (0.9, 0.99), the paper's and lion-pytorch's. */
  betas?: [number, number];
  weightDecay?: number;
}

/** Lion's JSON state in a checkpoint (its tensors are `${i}.exp_avg`). */
export interface LionMeta { kind: 'lion'; steps: number[]; lr: number; betas: [number, number]; weightDecay: number }

interface ParamState { expAvg: Tensor; steps: number }

export class Lion implements Optimizer {
  readonly kind = 'lion' as const;
  lr: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly weightDecay: number;
  readonly params: Tensor[];
  private readonly state = new Map<Tensor, ParamState>();

  constructor(params: Iterable<Tensor>, o: LionOptions = {}) {
    this.params = [...params];
    this.lr = o.lr ?? 1e-4;
    [this.beta1, this.beta2] = o.betas ?? [0.9, 0.99];
    this.weightDecay = o.weightDecay ?? 0;
    if (!(this.lr >= 0) || !Number.isFinite(this.lr)) throw new RangeError(`Lion: invalid lr ${this.lr}`);
    if (!(this.weightDecay >= 0) || !Number.isFinite(this.weightDecay)) throw new RangeError(`Lion: invalid weightDecay ${this.weightDecay}`);
    for (const b of [this.beta1, this.beta2]) if (!(b >= 0 && b <= 1)) throw new RangeError(`Lion: invalid beta ${b} (must be in [0, 1])`);
    checkFloat32Params('Lion', this.params);
  }

  private stateOf(p: Tensor): ParamState {
    let s = this.state.get(p);
    if (!s) {
      s = { expAvg: keep(torch.zerosLike(p)), steps: 0 };
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
      native.lionStep(withGrad.map((e) => e.p), withGrad.map((e) => e.g), states.map((s) => s.expAvg),
        { lr: this.lr, beta1: this.beta1, beta2: this.beta2, weightDecay: this.weightDecay });
    } finally {
      for (const { g } of withGrad) g.dispose();
    }
  }

  zeroGrad(): void {
    for (const p of this.params) p.grad = null;
  }

  stateShapes(p: Tensor): Record<string, readonly number[]> {
    return { exp_avg: p.shape };
  }

  stateDict(): OptimizerStateDict<LionMeta> {
    const tensors = new Map<string, Tensor>();
    const steps = this.params.map((p, i) => {
      const s = this.state.get(p);
      if (!s) return 0;
      tensors.set(`${i}.exp_avg`, s.expAvg);
      return s.steps;
    });
    return { tensors, meta: { kind: 'lion', steps, lr: this.lr, betas: [this.beta1, this.beta2], weightDecay: this.weightDecay } };
  }

  loadStateDict(sd: OptimizerStateDict<{ steps: number[]; lr: number }>): void {
    const kind = (sd.meta as { kind?: string }).kind;
    if (kind !== 'lion') throw new Error(`Lion.loadStateDict: the state is of optimizer '${kind ?? 'adamw'}'`);
    if (sd.meta.steps.length !== this.params.length) throw new Error(`Lion.loadStateDict: state has ${sd.meta.steps.length} parameters, optimizer has ${this.params.length}`);
    this.params.forEach((p, i) => {
      const steps = sd.meta.steps[i] ?? 0;
      if (steps === 0) return;
      const src = sd.tensors.get(`${i}.exp_avg`);
      if (!src) throw new Error(`Lion.loadStateDict: missing ${i}.exp_avg`);
      const s = this.stateOf(p);
      s.steps = steps;
      s.expAvg.copy_(src);
    });
    this.lr = sd.meta.lr;
  }

  dispose(): void {
    for (const s of this.state.values()) s.expAvg.dispose();
    this.state.clear();
  }
}
