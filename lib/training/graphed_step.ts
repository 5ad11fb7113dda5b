// --cuda_graphs (issue #15): the whole training step — forward, backward, unscale, clipping, AdamW, the loss scale's
// update — recorded once in a CUDA graph and replayed every step, so the host launches one graph instead of a thousand
// kernels, and reads each step's loss, gradient norm and overflow flag a step late: while the device runs step k, the
// host logs step k-1 and loads and prepares batch k+1.
//
// How a step runs: the command's `inputs(batch)` gives the batch's tensors and its random draws (made on the host
// from the per-sample generators, the same numbers the eager step draws); they are copied into static tensors of the
// first batch's shapes, and the graph reads those. The first `warmupSteps` steps run the same work without recording
// (on the graph's stream), then one step records it and replays it; every later step only replays. A batch of another
// shape (a smaller last batch, buckets) runs the same work eagerly, on the same device-side optimizer state. A capture
// that fails says why once and the run goes on eagerly. The optimizer state lives on the device (device_step.ts); the
// host's mirrors follow every step as it is read, so checkpoints, logs and resume see what the eager path would.
//
// launch(batch) prepares the batch's inputs first, then reads the step in flight (its report is about to be
// overwritten, and the next learning rate depends on whether it was skipped), then launches the batch's step: the
// device waits only for that read and a launch between two steps.
import { graphFactory, type StepGraph } from '../cuda_graph.js';
import type { AdamW } from '../optim/adamw.js';
import { DeviceOptimizerStep } from '../optim/device_step.js';
import type { GradScaler } from '../optim/grad_scaler.js';
import { dispose, keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import type { PipelinedStep, SettledStep } from './loop.js';
import type { Accumulator } from './step.js';

/** What a command gives to be captured: its step split into the host's part and the device's. */
export interface GraphableStep<B> {
  /** The batch's tensors and its random draws, by name (any device). Owns the batch; the driver disposes the result. */
  inputs(batch: B): Record<string, Tensor>;
  /**
   * Forward and backward from `inputs` (device tensors of the same names): the loss divided for accumulation and
   * × lossScale (when given) goes backward; returns the undivided fp32 loss tensor. No host sync. Runs inside tidy().
   */
  lossAndBackward(inputs: Record<string, Tensor>, lossScale: Tensor | null): Tensor;
  /**
   * After each step, with its loss read back, a step late (e.g. SDXL's --debug_loss, per file): `batch` is the one
   * given to inputs for that step; its tensors are freed by then, its other fields are as they were.
   */
  onLoss?(loss: number, batch: B): void;
}

export interface GraphedStepOptions {
  device: string;
  /** The trainable parameters (the optimizer's). */
  params: Tensor[];
  optimizer: AdamW;
  scaler: GradScaler | null;
  maxGradNorm: number | null;
  accumulator: Accumulator;
  /** Eager steps before the capture (default 3). */
  warmupSteps?: number;
  /** Makes the graph (default graphFactory's, a CudaGraph on `device`); tests pass a stand-in. */
  makeGraph?: (device: string) => StepGraph;
  onNotice?: (message: string) => void;
}

/**
 * A GraphableStep's inputs: the batch's tensors (absent ones dropped) and its draws (`draw()`, StepDraws); a draw that
 * throws frees the batch, which the inputs own.
 */
export function stepInputs(batch: Record<string, Tensor | undefined>, draw: () => object): Record<string, Tensor> {
  const all: Record<string, Tensor | undefined> = { ...batch };
  try {
    Object.assign(all, draw());
  } catch (e) {
    dispose(Object.values(batch));
    throw e;
  }
  return Object.fromEntries(Object.entries(all).filter((e): e is [string, Tensor] => e[1] !== undefined));
}

const signatureOf = (inputs: Record<string, Tensor>): string =>
  Object.keys(inputs).sort().map((k) => `${k}:${inputs[k]!.dtype}[${inputs[k]!.shape.join('×')}]`).join(' ');

/** Why --cuda_graphs cannot capture this run's step (null: it can). */
export function cudaGraphsBlocker(o: { device: string; accumulationSteps: number; worldSize: number; optimizer: string; graphable: boolean; standIn?: boolean }): string | null {
  if (!o.graphable) return 'this command has no capturable step yet';
  if (!o.standIn && !o.device.startsWith('cuda')) return `the device is ${o.device}, not a CUDA GPU`;
  if (o.accumulationSteps !== 1) return `--gradient_accumulation_steps is ${o.accumulationSteps} (a captured step is one whole optimizer step)`;
  if (o.worldSize !== 1) return `${o.worldSize} processes (the gradients' all-reduce is not captured)`;
  if (o.optimizer !== 'adamw') return `--optimizer ${o.optimizer} (the device-side step is AdamW's)`;
  return null;
}

export class GraphedTrainStep<B> implements PipelinedStep<B> {
  private readonly deviceStep: DeviceOptimizerStep;
  private readonly warmupSteps: number;
  private statics: Record<string, Tensor> | null = null;
  private signature = '';
  private graph: StepGraph | null = null;
  private captured = false;
  private warmedUp = 0;
  /** Set when a capture failed: every later step runs eagerly. */
  private broken = false;
  private shapeNoticed = false;
  /** The gradients the captured backward writes: kept alive (and out of the parameters) while the graph lives. */
  private staticGrads: Tensor[] = [];
  /** The batch of the step launched and not read yet. */
  private inFlight: { batch: B } | null = null;

  constructor(private readonly step: GraphableStep<B>, private readonly o: GraphedStepOptions) {
    if (o.accumulator.accumulationSteps !== 1) throw new Error('a captured step needs --gradient_accumulation_steps 1');
    this.warmupSteps = o.warmupSteps ?? 3;
    this.deviceStep = new DeviceOptimizerStep({
      optimizer: o.optimizer, params: o.params, scaler: o.scaler, maxGradNorm: o.maxGradNorm, device: o.device,
    });
  }

  /**
   * Launches one whole optimizer step for `batch` (owned) without waiting for it. The step before it, if one is in
   * flight, is read first (after this batch's inputs are made) and returned.
   */
  launch(batch: B): SettledStep | null {
    const host = this.step.inputs(batch);
    try {
      const signature = signatureOf(host);
      if (!this.statics) {
        this.statics = Object.fromEntries(Object.entries(host).map(([k, t]) => [k, keep(torch.zeros(t.shape, { dtype: t.dtype, device: this.o.device }))]));
        this.signature = signature;
      }
      const replayable = !this.broken && signature === this.signature;
      // stream-ordered after the step in flight, which reads the static inputs
      if (replayable) for (const [k, t] of Object.entries(host)) this.statics[k]!.copy_(t);
      const previous = this.settle();
      this.deviceStep.setLr(this.o.optimizer.lr); // the schedule's LR for this step, now that the last one is counted
      if (replayable) {
        this.graphed(this.statics);
      } else {
        if (!this.broken && !this.shapeNoticed) {
          this.shapeNoticed = true;
          this.o.onNotice?.(`CUDA graphs: a batch of ${signature} differs from the captured ${this.signature}; such batches run eagerly`);
        }
        this.eager(host);
      }
      this.inFlight = { batch };
      return previous;
    } finally {
      dispose(Object.values(host));
    }
  }

  /** Waits for the step in flight, reads its report (the one host sync) and moves the host's bookkeeping on; null when none is. */
  settle(): SettledStep | null {
    if (!this.inFlight) return null;
    const { batch } = this.inFlight;
    this.inFlight = null;
    const r = this.deviceStep.commit();
    this.step.onLoss?.(r.loss, batch);
    return { loss: r.loss, outcome: this.o.accumulator.recordDeviceStep({ stepped: r.stepped, gradNorm: r.gradNorm }) };
  }

  /** One whole optimizer step for `batch` (owned), launched and read: its loss and what the optimizer did. */
  run(batch: B): SettledStep {
    if (this.inFlight) throw new Error('GraphedTrainStep.run: a launched step is still in flight (settle() it first)');
    this.launch(batch);
    return this.settle()!;
  }

  /** The step on the static inputs: warm-up, capture then replay, or replay. */
  private graphed(statics: Record<string, Tensor>): void {
    let graph: StepGraph;
    try {
      graph = (this.graph ??= (this.o.makeGraph ?? graphFactory.make)(this.o.device));
    } catch (e) {
      this.giveUp(e, 'no graph could be made');
      this.eager(statics);
      return;
    }
    if (!this.captured && this.warmedUp < this.warmupSteps) {
      graph.run(() => this.body(statics));
      this.warmedUp += 1;
      this.dropGrads();
      return;
    }
    if (!this.captured) {
      try {
        graph.capture(() => this.body(statics));
      } catch (e) {
        this.dropGrads();
        this.graph = null; // the graph disposed itself
        this.giveUp(e, 'the step could not be captured');
        this.eager(statics);
        return;
      }
      this.captured = true;
      this.staticGrads = this.o.params.map((p) => p.grad).filter((g): g is Tensor => g !== null).map((g) => keep(g));
      this.dropGrads(); // the graph's own buffers, kept alive above; eager steps start from no gradient
    }
    graph.replay();
    this.dropGrads(); // nothing for a CUDA graph (its gradients are its own buffers); a stand-in's rerun leaves some
  }

  /** The same work, now, on the current stream. */
  private eager(inputs: Record<string, Tensor>): void {
    const onDevice = tidy(() => Object.fromEntries(Object.entries(inputs).map(([k, t]) => [k, t.device === this.o.device ? t : t.to({ device: this.o.device })])));
    try {
      this.body(onDevice);
    } finally {
      for (const [k, t] of Object.entries(onDevice)) if (t !== inputs[k]) t.dispose();
      this.dropGrads();
    }
  }

  /** Forward, backward and the device-side optimizer step; the loss into the report. No host sync. */
  private body(inputs: Record<string, Tensor>): void {
    tidy(() => {
      const loss = this.step.lossAndBackward(inputs, this.deviceStep.lossScale);
      this.deviceStep.report.narrow(0, 0, 1).copy_(loss.reshape([1]).to({ dtype: 'float32' }));
    });
    this.deviceStep.enqueue();
  }

  /** Every later step runs eagerly, after one line saying why. */
  private giveUp(e: unknown, what: string): void {
    this.broken = true;
    this.o.onNotice?.(`CUDA graphs: ${what} (${(e as Error).message.split('\n')[0]}); the steps run eagerly`);
  }

  private dropGrads(): void {
    for (const p of this.o.params) p.grad = null;
  }

  dispose(): void {
    this.inFlight = null;
    this.graph?.dispose();
    this.graph = null;
    dispose(this.staticGrads);
    this.staticGrads = [];
    if (this.statics) dispose(Object.values(this.statics));
    this.statics = null;
    this.deviceStep.dispose();
  }
}
