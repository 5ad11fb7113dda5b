// The trainer skeleton every LoRA training command shares (text-to-image, DreamBooth, and later SDXL): the
// part of the scripts' main() that does not depend on the models. It owns the output folder, the logs, the
// resume (checked, then restored), seeding, the optimization, the checkpointed run, the loop (loop.ts) with its
// NaN and abort handling, checkpoint saving and pruning, and at the end the finite check, the saved
// pytorch_lora_weights.safetensors and the loss plot. A command supplies a TrainerSpec: its models (the
// LoRA-carrying ones in the optimizer's order), its data, its micro-step, its validation and its finish
// (final images, model card).
import { join } from 'node:path';
import { checkDevice, cudaIsAvailable, setAllowTF32 } from '../device.js';
import type { DType } from '../dtype.js';
import { saveLossPlot } from '../logging/loss_plot.js';
import { RunLogs } from '../logging/run_logs.js';
import { saveLoraWeights } from '../lora/save.js';
import { defaultGenerator, manualSeed } from '../random.js';
import {
  assertFiniteWeights, checkOutputDir, ensureWritableDir, pruneCheckpoints, readTrainingState, removeEmptyDirs, resolveCheckpoint,
  restoreTrainingCheckpoint, saveTrainingCheckpoint, type CheckpointedRun,
} from './checkpoint.js';
import { loraNamedParameters, loraParameters, loraTargets, type LoraComponents } from './lora_components.js';
import { trainLoop } from './loop.js';
import { makeOptimization, optimizerStepError, type Optimization, type OptimizationOptions } from './optimization.js';
import type { ResolvedTrainOptions } from './options.js';
import type { GradScaler } from '../optim/grad_scaler.js';
import type { TrainData } from './train_data.js';
import { validationRunsLeft, type ValidationEvent } from './validation.js';

/** One optimizer step done. */
export interface TrainProgress {
  step: number;
  maxTrainSteps: number;
  epoch: number;
  /** The loss logged for this step (metrics.jsonl, TensorBoard's train_loss): the mean over the accumulation window. */
  loss: number;
  /** The loss of the window's last micro-batch alone. */
  stepLoss: number;
  lr: number;
  gradNorm: number | null;
  /** Validation runs still to come, the final one with the saved LoRA included (0 without --validation_prompt). */
  validationsLeft: number;
}

/** What a run tells its caller besides progress (the CLI prints these lines). */
export interface TrainHooksInternal {
  onProgress?: (p: TrainProgress) => void;
  /** A validation run starting and ending (images of the prompt; 'test' is the final one, with the saved LoRA). */
  onValidation?: (e: ValidationEvent) => void;
  signal?: AbortSignal;
  onNotice?: (message: string) => void;
}

export interface TrainResult { validationImages: string[]; outputFile: string; globalStep: number; lastLoss: number; checkpoints: string[]; skippedImages: { count: number; files: string[] } }

/** Steps arithmetic of the script: optimizer steps per epoch, total steps and epochs. */
export function stepsArithmetic(batchesPerEpoch: number, accumulation: number, numTrainEpochs: number, maxTrainSteps?: number | null) {
  const updateStepsPerEpoch = Math.ceil(batchesPerEpoch / accumulation);
  const maxSteps = maxTrainSteps ?? numTrainEpochs * updateStepsPerEpoch;
  return { updateStepsPerEpoch, maxTrainSteps: maxSteps, numTrainEpochs: Math.ceil(maxSteps / updateStepsPerEpoch) };
}

/** The options the skeleton reads: every command's resolved options have them (the scripts share these flags). */
export type TrainerOptions = OptimizationOptions & Pick<ResolvedTrainOptions,
  'outputDir' | 'reportTo' | 'loggingDir' | 'resumeFromCheckpoint' | 'seed' | 'allowTf32' | 'device' | 'numTrainEpochs' | 'maxTrainSteps' |
  'checkpointingSteps' | 'checkpointsTotalLimit' | 'validationPrompt' | 'validationEpochs'>;

/** A command's data: batches of any shape, and a position a checkpoint saves. */
export type TrainerData<B> = Pick<TrainData, 'batchesPerEpoch' | 'datasetLength' | 'nextEpoch' | 'state' | 'restore' | 'close'> & {
  /** The next batch of this epoch, or null when the epoch is done. The micro-step owns it. */
  next(): Promise<B | null>;
  /** Images skipped so far, for data that can skip unreadable images (--skip_broken_images). */
  skipped?(): { count: number; files: string[] };
};

/** What the skeleton gives a command while it builds its spec and while the run goes on. */
export interface TrainerContext {
  device: string;
  /** The dtype of the frozen weights (--mixed_precision); LoRA weights stay float32. */
  weightDtype: DType;
  /** Hands over something with native memory, disposed when the run ends (in reverse order). */
  own<T extends { dispose(): void }>(x: T): T;
  logs: RunLogs;
  /** The fp16 loss scaler once the optimization exists (null otherwise). */
  scaler(): GradScaler | null;
  /** Optimizer steps done (the script's global_step; 0 before the optimization exists). */
  globalStep(): number;
}

/** What a command supplies: its models, data, micro-step, validation and finish. */
export interface TrainerSpec<B> {
  /** The models carrying the trained LoRA, in the optimizer's order (UNet first). */
  lora: LoraComponents;
  data: TrainerData<B>;
  /** Forward and backward of one batch (loss ÷ accumulation steps, × the loss scale); returns the undivided loss. Frees the batch. */
  microStep(batch: B): number;
  /** Validation with the models being trained, after each epoch where epoch % --validation_epochs == 0. */
  validate(epoch: number): Promise<void>;
  /** After the LoRA file is saved: the final validation and the model card; returns the validation images. */
  finish(end: { outputDir: string; lastEpoch: number; globalStep: number; baseLr: number }): Promise<string[]>;
}

const WEIGHT_DTYPES: Record<ResolvedTrainOptions['mixedPrecision'], DType> = { no: 'float32', fp16: 'float16', bf16: 'bfloat16' };

/**
 * Runs a command's training: the device and --output_dir checked (and the folder created) before anything is
 * loaded, then the run. A run that fails before writing anything leaves no folder it created.
 */
export async function runTrainer<B>(o: TrainerOptions, hooks: TrainHooksInternal, build: (ctx: TrainerContext) => Promise<TrainerSpec<B>>): Promise<TrainResult> {
  const device = o.device ?? (cudaIsAvailable() ? 'cuda:0' : 'cpu');
  checkDevice(device, 'device');
  if (o.mixedPrecision === 'fp16' && !device.startsWith('cuda')) {
    throw new Error("--mixed_precision=fp16 needs a CUDA GPU: libtorch has no fp16 matmul on CPU; use --mixed_precision=bf16 or no");
  }
  checkOutputDir(o.outputDir); // an existing file, FIFO or device there is named, and nothing is created
  const created = ensureWritableDir(o.outputDir); // a read-only or full disk fails here, before anything is loaded
  try {
    return await trainIn(o, device, hooks, build);
  } catch (e) {
    removeEmptyDirs(created);
    throw e;
  }
}

async function trainIn<B>(o: TrainerOptions, device: string, hooks: TrainHooksInternal, build: (ctx: TrainerContext) => Promise<TrainerSpec<B>>): Promise<TrainResult> {
  const outputDir = o.outputDir;
  /** The newest whole checkpoint (this run's, or the one it resumed from): named when the run fails. */
  let lastSaved: string | undefined;
  const lastCheckpoint = () => (lastSaved ? `; the last checkpoint is ${lastSaved}` : '');
  const logs = new RunLogs(outputDir, o, hooks.onNotice, lastCheckpoint); // a FIFO as metrics.jsonl is refused now
  // a checkpoint to resume from is read and checked before the models load (again against the data later)
  const resumeFrom = o.resumeFromCheckpoint ? resolveCheckpoint(outputDir, o.resumeFromCheckpoint) : undefined;
  if (resumeFrom !== undefined) readTrainingState(resumeFrom);
  if (o.seed !== null) manualSeed(o.seed);
  if (o.allowTf32) setAllowTF32(true);

  const owned: { dispose(): void }[] = [];
  let optimization: Optimization | undefined;
  const ctx: TrainerContext = {
    device, weightDtype: WEIGHT_DTYPES[o.mixedPrecision], logs, scaler: () => optimization?.scaler ?? null,
    globalStep: () => optimization?.accumulator.state.globalStep ?? 0,
    own: (x) => { owned.push(x); return x; },
  };
  let spec: TrainerSpec<B> | undefined;
  try {
    // 1. the command's models and data, the steps arithmetic, the optimization
    spec = await build(ctx);
    const { data } = spec;
    const steps = stepsArithmetic(data.batchesPerEpoch, o.gradientAccumulationSteps, o.numTrainEpochs, o.maxTrainSteps);
    const params = loraParameters(spec.lora);
    optimization = makeOptimization(o, params, steps.maxTrainSteps);
    const { optimizer, scaler, accumulator, baseLr } = optimization;
    ctx.own(optimizer);
    const generators = [defaultGenerator('cpu'), ...(device.startsWith('cuda') ? [defaultGenerator(device)] : [])];
    const run: CheckpointedRun = { lora: spec.lora, optimizer, accumulator, scaler, data, generators };

    // 2. resume: every piece of state checked, then restored, so the run continues as if never stopped
    let startEpoch = 0;
    if (resumeFrom !== undefined) {
      const resuming = { maxTrainSteps: steps.maxTrainSteps, numTrainEpochs: steps.numTrainEpochs, accumulationSteps: o.gradientAccumulationSteps, numParams: params.length, datasetLength: data.datasetLength };
      startEpoch = restoreTrainingCheckpoint(resumeFrom, resuming, run).epoch;
      lastSaved = resumeFrom;
      logs.metrics.resumedFrom(accumulator.state.globalStep);
    }

    const s = spec;
    const assertFinite = (epoch: number) => assertFiniteWeights(loraNamedParameters(s.lora), { step: accumulator.state.globalStep, epoch }, lastCheckpoint());
    const checkpoints: string[] = [];
    const skipHint = data.skipped ? ', or pass --skip_broken_images to skip and count unreadable images' : '';

    // 3. the loop; train_loss is the mean over the accumulation window, logged per optimizer step as the script
    const { lastEpoch, lastLoss } = await trainLoop({
      ...steps, startEpoch, accumulationSteps: o.gradientAccumulationSteps, signal: hooks.signal, failureContext: lastCheckpoint,
      globalStep: () => accumulator.state.globalStep,
      nextBatch: async (epoch) => {
        try { return await data.next(); } catch (e) {
          throw new Error(`${(e as Error).message} (at step ${accumulator.state.globalStep + 1}, epoch ${epoch})${lastCheckpoint()}; ` +
            `replace the file and resume with --resume_from_checkpoint latest${skipHint}`);
        }
      },
      microStep: (batch) => s.microStep(batch),
      afterBackward: () => {
        try { return accumulator.afterBackward(); } catch (e) {
          throw new Error(`${optimizerStepError(e, accumulator.state.globalStep + 1, o, baseLr).message}${lastCheckpoint()}`);
        }
      },
      onOptimizerStep: (e) => {
        logs.step({ step: e.step, epoch: e.epoch, loss: e.loss, lr: e.lr, grad_norm: e.gradNorm, skipped: !e.stepped, time: Date.now() / 1000 });
        const validationsLeft = validationRunsLeft({ epoch: e.epoch, numTrainEpochs: steps.numTrainEpochs, validationEpochs: o.validationEpochs, enabled: o.validationPrompt !== null });
        hooks.onProgress?.({ step: e.step, maxTrainSteps: steps.maxTrainSteps, epoch: e.epoch, loss: e.loss, stepLoss: e.stepLoss, lr: e.lr, gradNorm: e.gradNorm, validationsLeft });
        if (o.checkpointingSteps === null || e.step % o.checkpointingSteps !== 0) return;
        assertFinite(e.epoch);
        try { lastSaved = saveTrainingCheckpoint(outputDir, run, e.epoch); } catch (err) { throw new Error(`${(err as Error).message}${lastCheckpoint()}`); }
        checkpoints.push(lastSaved);
        pruneCheckpoints(outputDir, o.checkpointsTotalLimit); // after the save: a failed save loses no older checkpoint
      },
      onEpochEnd: async (epoch) => {
        if (o.validationPrompt === null || epoch % o.validationEpochs !== 0) return;
        await s.validate(epoch);
      },
      nextEpoch: () => data.nextEpoch(),
    });

    // 4. the result, in diffusers' format, then the command's final validation and model card, and the loss plot
    assertFinite(lastEpoch);
    const outputFile = saveLoraWeights(outputDir, loraTargets(s.lora));
    const validationImages = await s.finish({ outputDir, lastEpoch, globalStep: accumulator.state.globalStep, baseLr });
    await saveLossPlot(join(outputDir, 'loss.png'), logs.metrics.read());
    const skippedImages = data.skipped?.() ?? { count: 0, files: [] };
    return { validationImages, outputFile, globalStep: accumulator.state.globalStep, lastLoss, checkpoints, skippedImages };
  } finally {
    logs.close();
    await spec?.data.close();
    for (const x of owned.reverse()) x.dispose();
  }
}
