// The training loop itself, as the script's `for epoch …: for step, batch in enumerate(dataloader)`, knowing
// nothing of the model: epochs and steps, one micro-step per batch, the accumulation window's mean loss, and
// what happens at each optimizer step and each epoch's end, all given by the caller. runTraining (SD 1.x)
// passes its parts; an SDXL or DreamBooth trainer passes its own micro-step and data.

/** What the accumulator reports at an optimizer step (null from afterBackward: still inside the window). */
export interface StepOutcome { lr: number; gradNorm: number | null; stepped: boolean }

export interface OptimizerStepEvent extends StepOutcome {
  /** The optimizer step just done (1-based). */
  step: number;
  epoch: number;
  /** The mean loss over the accumulation window (what is logged). */
  loss: number;
  /** The loss of the window's last micro-batch. */
  stepLoss: number;
}

export interface TrainLoopParts<B> {
  maxTrainSteps: number;
  numTrainEpochs: number;
  /** The epoch to start from (a resumed run continues its checkpoint's). */
  startEpoch: number;
  accumulationSteps: number;
  /** Optimizer steps done so far. */
  globalStep(): number;
  /** The next batch of this epoch, or null when the epoch is done. */
  nextBatch(epoch: number): Promise<B | null>;
  /** Forward and backward of one batch (the loss divided by the accumulation steps); returns its loss. Owns the batch. */
  microStep(batch: B): number;
  /** After each backward: the optimizer step at a window's end, else null (may wait, e.g. for a gradient all-reduce). */
  afterBackward(): StepOutcome | null | Promise<StepOutcome | null>;
  /** After each optimizer step: logging, progress, checkpoints (may wait, e.g. for the processes' mean loss). */
  onOptimizerStep(e: OptimizerStepEvent): void | Promise<void>;
  /** After each epoch's batches (validation). */
  onEpochEnd(epoch: number): Promise<void>;
  /** Moves the data to its next epoch (not called after the last step). */
  nextEpoch(): void;
  signal?: AbortSignal;
  /** Appended to a failure's message: where the run can be resumed from. */
  failureContext(): string;
}

/**
 * Runs the epochs until maxTrainSteps optimizer steps are done. Returns the last epoch that ran (as
 * Python's loop variable after the loop) and the last micro-batch loss. A non-finite loss stops the run.
 */
export async function trainLoop<B>(p: TrainLoopParts<B>): Promise<{ lastEpoch: number; lastLoss: number }> {
  let lastEpoch = p.startEpoch;
  let lastLoss = NaN;
  let windowLoss = 0;
  for (let epoch = p.startEpoch; epoch < p.numTrainEpochs && p.globalStep() < p.maxTrainSteps; epoch++) {
    lastEpoch = epoch;
    while (p.globalStep() < p.maxTrainSteps) {
      if (p.signal?.aborted) throw new Error('training aborted');
      const batch = await p.nextBatch(epoch);
      if (!batch) break; // end of epoch
      const loss = p.microStep(batch);
      if (!Number.isFinite(loss)) {
        throw new Error(`loss is ${loss} at step ${p.globalStep() + 1} (epoch ${epoch}); nothing more was saved${p.failureContext()}`);
      }
      lastLoss = loss;
      windowLoss += loss / p.accumulationSteps;
      const r = await p.afterBackward();
      if (!r) continue;
      const mean = windowLoss;
      windowLoss = 0;
      await p.onOptimizerStep({ step: p.globalStep(), epoch, loss: mean, stepLoss: loss, ...r });
    }
    await p.onEpochEnd(epoch);
    if (p.globalStep() < p.maxTrainSteps) p.nextEpoch();
  }
  return { lastEpoch, lastLoss };
}
