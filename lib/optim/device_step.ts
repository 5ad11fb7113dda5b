// The optimizer step with no host synchronisation inside it (issue #15), so a training step can be recorded in a
// CUDA graph and replayed: the GradScaler's scale, growth tracker and overflow flag, the learning rate and AdamW's step
// count live in device tensors, clipping never reads the norm back, and a step whose gradients overflowed changes
// nothing instead of being skipped by the host. The step writes what the host logs (gradient norm, overflow flag) into
// a small report tensor that is read once, after the step; commit() then brings the host-side mirrors (scaler, AdamW
// step counts) up to date, so checkpoints and the host-side path (step.ts's optimizerStep) carry on from the same
// state. The host knows the next learning rate once it has read the report (a skipped step does not advance the
// schedule), so it writes it into the device's lr before each step with setLr: a fill, no sync, outside any capture.
import { native } from '../native.js';
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import type { AdamW } from './adamw.js';
import type { GradScaler } from './grad_scaler.js';

export interface DeviceStepOptions {
  optimizer: AdamW;
  /** The parameters to clip and step (default: the optimizer's). */
  params?: Tensor[];
  scaler?: GradScaler | null;
  /** --max_grad_norm; null: no clipping. */
  maxGradNorm?: number | null;
  device: string;
}

/** What one device-side step reported, read on the host. */
export interface DeviceStepReport { loss: number; gradNorm: number | null; stepped: boolean }

export class DeviceOptimizerStep {
  /** float32 [3]: loss (written by the caller's step), gradient norm (NaN without clipping), overflow flag (0/1). Static: captured graphs write it. */
  readonly report: Tensor;
  /** The loss scale on the device (float32 [1]) for the backward, or null without a scaler. */
  readonly lossScale: Tensor | null;
  private readonly growthTracker: Tensor | null;
  private readonly foundInf: Tensor;
  private readonly lr: Tensor;
  private readonly params: Tensor[];

  constructor(private readonly o: DeviceStepOptions) {
    if (o.optimizer.kind !== 'adamw') throw new Error(`the device-side optimizer step supports AdamW only, not ${o.optimizer.kind}`);
    this.params = o.params ?? o.optimizer.params;
    const device = o.device;
    const scaler = o.scaler?.enabled ? o.scaler : null;
    // kept: they outlive any scope the step is made in (a captured graph reads and writes them)
    this.report = keep(torch.zeros([3], { dtype: 'float32', device }));
    this.foundInf = keep(torch.zeros([1], { dtype: 'float32', device }));
    this.lossScale = scaler ? keep(torch.full([1], scaler.scale, { dtype: 'float32', device })) : null;
    this.growthTracker = scaler ? keep(torch.full([1], scaler.growthTracker, { dtype: 'int32', device })) : null;
    this.lr = keep(torch.full([1], o.optimizer.lr, { dtype: 'float64', device }));
  }

  /** The learning rate of the next step (the optimizer's, which the schedule sets), written on the device: call before each step. */
  setLr(lr: number): void {
    if (!Number.isFinite(lr) || lr < 0) throw new RangeError(`the learning rate must be a finite number ≥ 0, got ${lr}`);
    this.lr.fill_(lr);
  }

  /**
   * Enqueues the step on the gradients the backward left in the parameters: unscale and overflow check, clipping,
   * AdamW (a flagged step changes nothing) and the scale's update; the gradient norm and the flag go into the
   * report. No host sync: safe to record in a CUDA graph.
   */
  enqueue(): void {
    const grads = this.params.map((p) => p.grad).filter((g): g is Tensor => g !== null);
    try {
      if (grads.length !== this.params.length) throw new Error(`the device-side optimizer step needs a gradient for every parameter (${grads.length} of ${this.params.length})`);
      const scaler = this.o.scaler?.enabled ? this.o.scaler : null;
      if (scaler && this.lossScale) native.ampUnscale(grads, this.lossScale, this.foundInf);
      else this.foundInf.zero_();
      tidy(() => {
        const maxNorm = this.o.maxGradNorm;
        const normSlot = this.report.narrow(0, 1, 1);
        if (maxNorm === null || maxNorm === undefined) normSlot.fill_(NaN);
        else normSlot.copy_((native.clipGradNorm(grads, maxNorm, 2) as unknown as Tensor).reshape([1]));
        this.report.narrow(0, 2, 1).copy_(this.foundInf);
      });
      this.o.optimizer.stepOnDevice({ lr: this.lr, foundInf: scaler ? this.foundInf : null });
      if (scaler && this.lossScale && this.growthTracker) {
        native.ampUpdateScale(this.lossScale, this.growthTracker, this.foundInf, scaler.growthFactor, scaler.backoffFactor, scaler.growthInterval);
      }
    } finally {
      for (const g of grads) g.dispose();
    }
  }

  /** Reads the report (one host sync) and updates the host-side mirrors; returns what the step did. */
  commit(): DeviceStepReport {
    const [loss, gradNorm, flag] = this.report.toFloat64Array();
    const stepped = flag === 0;
    this.o.optimizer.commitDeviceStep(stepped);
    this.o.scaler?.recordStep(!stepped);
    return { loss: loss!, gradNorm: Number.isNaN(gradNorm) && (this.o.maxGradNorm ?? null) === null ? null : gradNorm!, stepped };
  }

  dispose(): void {
    for (const t of [this.report, this.foundInf, this.lossScale, this.growthTracker, this.lr]) t?.dispose();
  }
}
