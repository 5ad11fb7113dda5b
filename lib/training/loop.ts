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

/** A whole optimizer step read back from the device: its loss and what the optimizer did. */
export interface SettledStep { loss: number; outcome: StepOutcome }

/**
 * Whole optimizer steps launched without waiting for them (--cuda_graphs, one micro-batch per step), so the host loads
 * and prepares the next batch while the device runs the last one, whose loss is read a step late.
 */
export interface PipelinedStep<B> {
  /** Launches the step of `batch` (owned); first waits for the step in flight, if any, and returns it, read. */
  launch(batch: B): SettledStep | null;
  /** Waits for the step in flight and returns it, read; null when none is. */
  settle(): SettledStep | null;
}

export interface TrainLoopParts<B> {
  maxTrainSteps: number;
  numTrainEpochs: number;
  /** The epoch to start from (a resumed run continues its checkpoint's). */
  startEpoch: number;
  accumulationSteps: number;
  /** Optimizer steps done (and read back) so far. */
  globalStep(): number;
  /** The next batch of this epoch (for optimizer step `step`, 1-based), or null when the epoch is done. */
  nextBatch(epoch: number, step: number): Promise<B | null>;
  /** Forward and backward of one batch (the loss divided by the accumulation steps); returns its loss. Owns the batch. */
  microStep(batch: B): number;
  /** After each backward: the optimizer step at a window's end, else null (may wait, e.g. for a gradient all-reduce). */
  afterBackward(): StepOutcome | null | Promise<StepOutcome | null>;
  /**
   * Replaces microStep and afterBackward when given (accumulationSteps must be 1): each step is launched before the
   * one before it is read. Nothing is in flight at an epoch's end, at the last step or after a step `settleAfter` names.
   */
  pipelined?: PipelinedStep<B>;
  /** With `pipelined`: the steps whose onOptimizerStep needs the device state of that step (checkpoints). */
  settleAfter?(step: number): boolean;
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
  const pipe = p.pipelined;
  if (pipe && p.accumulationSteps !== 1) throw new Error(`internal: a pipelined step is a whole optimizer step, not ${p.accumulationSteps} micro-batches`);
  let lastEpoch = p.startEpoch;
  let lastLoss = NaN;
  let windowLoss = 0;
  let inFlightEpoch: number | null = null; // pipelined: the epoch of the step launched and not read yet
  const launched = () => p.globalStep() + (inFlightEpoch === null ? 0 : 1);

  /** A micro-batch's loss for optimizer step `step` (stopping the run if it is not finite). */
  const addLoss = (loss: number, step: number, epoch: number) => {
    if (!Number.isFinite(loss)) throw new Error(`loss is ${loss} at step ${step} (epoch ${epoch}); nothing more was saved${p.failureContext()}`);
    lastLoss = loss;
    windowLoss += loss / p.accumulationSteps;
  };
  const optimizerStep = async (r: StepOutcome, epoch: number) => {
    const mean = windowLoss;
    windowLoss = 0;
    await p.onOptimizerStep({ step: p.globalStep(), epoch, loss: mean, stepLoss: lastLoss, ...r });
  };
  /** A pipelined step read back (the driver has counted it: globalStep() is its number). */
  const settled = async (s: SettledStep | null, epoch: number) => {
    if (!s) return;
    addLoss(s.loss, p.globalStep(), epoch);
    await optimizerStep(s.outcome, epoch);
  };
  const settleInFlight = async () => {
    if (!pipe || inFlightEpoch === null) return;
    const epoch = inFlightEpoch;
    inFlightEpoch = null;
    await settled(pipe.settle(), epoch);
  };

  for (let epoch = p.startEpoch; epoch < p.numTrainEpochs && p.globalStep() < p.maxTrainSteps; epoch++) {
    lastEpoch = epoch;
    while (launched() < p.maxTrainSteps) {
      if (p.signal?.aborted) throw new Error('training aborted');
      const step = launched() + 1;
      const batch = await p.nextBatch(epoch, step);
      if (!batch) break; // end of epoch
      if (pipe) {
        const previousEpoch = inFlightEpoch;
        inFlightEpoch = epoch;
        const previous = pipe.launch(batch); // this step runs on the device while the last one is logged and the next batch loads
        if (previousEpoch !== null) await settled(previous, previousEpoch);
        if (p.settleAfter?.(step)) await settleInFlight();
        continue;
      }
      const loss = p.microStep(batch);
      addLoss(loss, step, epoch);
      const r = await p.afterBackward();
      if (r) await optimizerStep(r, epoch);
    }
    await settleInFlight();
    await p.onEpochEnd(epoch);
    if (p.globalStep() < p.maxTrainSteps) p.nextEpoch();
  }
  return { lastEpoch, lastLoss };
}
