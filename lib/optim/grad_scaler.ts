// Dynamic loss scaling for float16 training, with torch.cuda.amp.GradScaler's semantics: the loss is
// multiplied by `scale` before backward; gradients are unscaled before the step; a step whose gradients
// hold inf/NaN is skipped and the scale halves; after `growthInterval` good steps in a row it doubles.
import { native } from '../native.js';
import type { Tensor } from '../tensor.js';

export interface GradScalerOptions {
  initScale?: number;
  growthFactor?: number;
  backoffFactor?: number;
  growthInterval?: number;
  enabled?: boolean;
}

interface Steppable { params: Tensor[]; step(): void }

export class GradScaler {
  scale: number;
  growthTracker = 0;
  readonly growthFactor: number;
  readonly backoffFactor: number;
  readonly growthInterval: number;
  readonly enabled: boolean;
  private unscaled = false;
  private foundInf = false;

  constructor(o: GradScalerOptions = {}) {
    this.scale = o.initScale ?? 2 ** 16;
    this.growthFactor = o.growthFactor ?? 2;
    this.backoffFactor = o.backoffFactor ?? 0.5;
    this.growthInterval = o.growthInterval ?? 2000;
    this.enabled = o.enabled ?? true;
  }

  /** loss × scale (a new tensor), to call backward on. */
  scaleLoss(loss: Tensor): Tensor {
    return this.enabled ? loss.mul(this.scale) : loss.mul(1);
  }

  /** Divides the optimizer's gradients by the scale in place and records whether any is inf/NaN. */
  unscale_(optimizer: Steppable): void {
    if (!this.enabled || this.unscaled) return;
    const grads = optimizer.params.map((p) => p.grad).filter((g): g is Tensor => g !== null);
    try {
      // float32 reciprocal, as GradScaler's scale.double().reciprocal().float()
      this.foundInf = native.unscaleGrads(grads, Math.fround(1 / this.scale));
    } finally {
      for (const g of grads) g.dispose();
    }
    this.unscaled = true;
  }

  /** Unscales if not done yet, then steps unless a gradient overflowed. Returns whether it stepped. */
  step(optimizer: Steppable): boolean {
    if (!this.enabled) {
      optimizer.step();
      return true;
    }
    this.unscale_(optimizer);
    if (this.foundInf) return false;
    optimizer.step();
    return true;
  }

  /** Adjusts the scale after a step (backoff on overflow, growth after growthInterval good steps). */
  update(): void {
    if (!this.enabled) return;
    if (this.foundInf) {
      this.scale *= this.backoffFactor;
      this.growthTracker = 0;
    } else if (this.growthTracker + 1 === this.growthInterval) {
      const grown = this.scale * this.growthFactor;
      if (Number.isFinite(grown)) this.scale = grown;
      this.growthTracker = 0;
    } else {
      this.growthTracker += 1;
    }
    this.unscaled = false;
    this.foundInf = false;
  }

  /** A device-side step's update (device_step.ts), its overflow flag read on the host: the scale follows as update() would. */
  recordStep(foundInf: boolean): void {
    if (!this.enabled) return;
    this.foundInf = foundInf;
    this.update();
  }

  /** Whether the last unscale found inf/NaN gradients (the step was or will be skipped). */
  get overflowed(): boolean { return this.foundInf; }

  stateDict(): { scale: number; growthTracker: number; growthFactor: number; backoffFactor: number; growthInterval: number } {
    return { scale: this.scale, growthTracker: this.growthTracker, growthFactor: this.growthFactor, backoffFactor: this.backoffFactor, growthInterval: this.growthInterval };
  }

  loadStateDict(s: { scale: number; growthTracker: number }): void {
    this.scale = s.scale;
    this.growthTracker = s.growthTracker;
  }
}
