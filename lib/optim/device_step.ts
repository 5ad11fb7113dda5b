// The optimizer step with no host synchronisation inside it (issue #15), so a training step can be recorded in a
// CUDA graph and replayed: the GradScaler's scale, growth tracker and overflow flag, the learning rate (a table of
// the schedule read at a step counter) and AdamW's step count live in device tensors, clipping never reads the norm
// back, and a step whose gradients overflowed changes nothing instead of being skipped by the host. The step writes
// what the host logs (gradient norm, overflow flag) into a small report tensor that is read once, after the step;
// commit() then brings the host-side mirrors (scaler, AdamW step counts, the schedule position) up to date, so
// checkpoints and the host-side path (step.ts's optimizerStep) carry on from the same state.
import { native } from '../native.js';
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import type { AdamW } from './adamw.js';
import type { GradScaler } from './grad_scaler.js';

/** The report's layout: [loss, gradient norm (NaN without clipping), overflow flag (0/1)]. */
export const REPORT_LOSS = 0;

export interface DeviceStepOptions {
  optimizer: AdamW;
  /** The parameters to clip and step (default: the optimizer's). */
  params?: Tensor[];
  scaler?: GradScaler | null;
  /** --max_grad_norm; null: no clipping. */
  maxGradNorm?: number | null;
  /** lrTable[i]: the learning rate after i schedule steps (i = 0 … the last optimizer step). */
  lrTable: readonly number[];
  /** Schedule steps done so far (the accumulator's lrStep). */
  lrStep: number;
  device: string;
}

/** What one device-side step reported, read on the host. */
export interface DeviceStepReport { loss: number; gradNorm: number | null; stepped: boolean }

export class DeviceOptimizerStep {
  /** float32 [3]: loss (written by the caller's step), gradient norm, overflow flag. Static: captured graphs write it. */
  readonly report: Tensor;
  /** The loss scale on the device (float32 [1]) for the backward, or null without a scaler. */
  readonly lossScale: Tensor | null;
  private readonly growthTracker: Tensor | null;
  private readonly foundInf: Tensor;
  private readonly lrTable: Tensor;
  private readonly lrStep: Tensor;
  private readonly params: Tensor[];

  constructor(private readonly o: DeviceStepOptions) {
    if (o.optimizer.kind !== 'adamw') throw new Error(`the device-side optimizer step supports AdamW only, not ${o.optimizer.kind}`);
    if (o.lrStep < 0 || o.lrStep >= o.lrTable.length) throw new RangeError(`lrStep ${o.lrStep} is outside the schedule's table of ${o.lrTable.length}`);
    this.params = o.params ?? o.optimizer.params;
    const device = o.device;
    const scaler = o.scaler?.enabled ? o.scaler : null;
    // kept: they outlive any scope the step is made in (a captured graph reads and writes them)
    this.report = keep(torch.zeros([3], { dtype: 'float32', device }));
    this.foundInf = keep(torch.zeros([1], { dtype: 'float32', device }));
    this.lossScale = scaler ? keep(torch.full([1], scaler.scale, { dtype: 'float32', device })) : null;
    this.growthTracker = scaler ? keep(torch.full([1], scaler.growthTracker, { dtype: 'int32', device })) : null;
    this.lrTable = keep(torch.tensor(Float64Array.from(o.lrTable), { dtype: 'float64', device }));
    this.lrStep = keep(torch.full([1], o.lrStep, { dtype: 'int64', device }));
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
        const norm = maxNorm === null || maxNorm === undefined ? null : (native.clipGradNorm(grads, maxNorm, 2) as unknown as Tensor);
        this.report.narrow(0, 1, 1).copy_(norm ? norm.reshape([1]).to({ dtype: 'float32' }) : torch.full([1], NaN, { dtype: 'float32', device: this.o.device }));
        this.report.narrow(0, 2, 1).copy_(this.foundInf);
      });
      this.o.optimizer.stepOnDevice({ lrTable: this.lrTable, lrStep: this.lrStep, foundInf: scaler ? this.foundInf : null });
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
    for (const t of [this.report, this.foundInf, this.lossScale, this.growthTracker, this.lrTable, this.lrStep]) t?.dispose();
  }
}
