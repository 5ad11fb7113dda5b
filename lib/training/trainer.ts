// The trainer skeleton every LoRA training command shares (text-to-image, DreamBooth, and later SDXL): the
// part of the scripts' main() that does not depend on the models. It owns the output folder, the logs, the
// resume (checked, then restored), seeding, the optimization, the checkpointed run, the loop (loop.ts) with its
// NaN and abort handling, checkpoint saving and pruning, and at the end the finite check, the saved
// pytorch_lora_weights.safetensors and the loss plot. A command supplies a TrainerSpec: its models (the
// LoRA-carrying ones in the optimizer's order), its data, its micro-step, its validation and its finish
// (final images, model card).
//
// Data-parallel training (issue #14, lib/distributed/data_parallel.ts) lives here too, for every command that
// declares it (runTrainer's `parallel`): the skeleton joins the processes, gives the command its shard of the data
// (ctx.shard) and each sample's own generators (ctx.sampleDraws), broadcasts rank 0's LoRA, averages the gradients
// once per optimizer step, logs the losses' mean, saves every rank's data position and RNG in checkpoints, and lets
// rank 0 alone log, validate and write. A command that does not declare it is refused under several processes.
import { join } from 'node:path';
import { checkDevice, cudaIsAvailable, setAllowTF32 } from '../device.js';
import { DataParallel, type ProcessGroupOption } from '../distributed/data_parallel.js';
import type { DType } from '../dtype.js';
import { saveLossPlot } from '../logging/loss_plot.js';
import { RunLogs } from '../logging/run_logs.js';
import { LORA_WEIGHT_NAME } from '../lora/load.js';
import { hasLycorisLayers, saveLoraWeights } from '../lora/save.js';
import { loraLayers } from '../lora/attach.js';
import type { Module } from '../nn/module.js';
import type { ResolvedLoraVariantOptions } from './lora_variant_options.js';
import { defaultGenerator, manualSeed, type Generator } from '../random.js';
import { dispose } from '../scope.js';
import {
  assertFiniteWeights, checkOutputDir, checkResumeOptimizer, ensureWritableDir, pruneCheckpoints, readTrainingState, removeEmptyDirs, resolveCheckpoint,
  restoreTrainingCheckpoint, saveTrainingCheckpoint, type CheckpointedRun,
} from './checkpoint.js';
import { loraNamedParameters, loraParameters, loraTargets, type LoraComponents } from './lora_components.js';
import { trainLoop } from './loop.js';
import { saveEmaLoraWeights } from './ema_weights.js';
import { makeOptimization, optimizerStepError, type Optimization, type OptimizationOptions } from './optimization.js';
import type { ResolvedTrainOptions } from './options.js';
import type { GradScaler } from '../optim/grad_scaler.js';
import type { AdamW } from '../optim/adamw.js';
import type { StepGraph } from '../cuda_graph.js';
import { cudaGraphsBlocker, GraphedTrainStep, type GraphableStep } from './graphed_step.js';
import { SampleStreams, type SampleKey } from './sample_rng.js';
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
  /** The run's processes (lib/distributed/data_parallel.ts): default, join the group a launcher describes in the environment. */
  processGroup?: ProcessGroupOption;
  /** --cuda_graphs' graph (default a CudaGraph): tests pass a stand-in that reruns the captured step, to run the driver on the CPU. */
  makeGraph?: (device: string) => StepGraph;
}

export interface TrainResult {
  validationImages: string[]; outputFile: string; globalStep: number; lastLoss: number; checkpoints: string[]; skippedImages: { count: number; files: string[] };
  /** This process's rank and the number of processes (accelerate's process_index, num_processes); rank 0 wrote the files. */
  processIndex?: number; numProcesses?: number;
}

/** Steps arithmetic of the script: optimizer steps per epoch, total steps and epochs. */
export function stepsArithmetic(batchesPerEpoch: number, accumulation: number, numTrainEpochs: number, maxTrainSteps?: number | null) {
  const updateStepsPerEpoch = Math.ceil(batchesPerEpoch / accumulation);
  const maxSteps = maxTrainSteps ?? numTrainEpochs * updateStepsPerEpoch;
  return { updateStepsPerEpoch, maxTrainSteps: maxSteps, numTrainEpochs: Math.ceil(maxSteps / updateStepsPerEpoch) };
}

/** The options the skeleton reads: every command's resolved options have them (the scripts share these flags). */
export type TrainerOptions = OptimizationOptions & Pick<ResolvedTrainOptions,
  'outputDir' | 'reportTo' | 'loggingDir' | 'resumeFromCheckpoint' | 'seed' | 'allowTf32' | 'device' | 'numTrainEpochs' | 'maxTrainSteps' |
  'checkpointingSteps' | 'checkpointsTotalLimit' | 'validationPrompt' | 'validationEpochs'> & { skipBrokenImages?: boolean; cudaGraphs?: boolean; gradientCheckpointing?: boolean } & Partial<Pick<ResolvedLoraVariantOptions, 'exportKohya'>>;

/**
 * How a command runs on several processes. `dataParallel: true`: its data takes ctx.shard and its micro-step draws
 * from ctx.sampleDraws, so the skeleton trains it data-parallel; false: one process only, and a group (or a
 * launcher's environment) of several is refused naming `command`.
 */
export interface TrainerParallelism { command: string; dataParallel: boolean }

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
  /** The run's logs; rank 0 alone has them (validate and finish run there alone), another rank's access throws. */
  readonly logs: RunLogs;
  /** This process's share of each epoch with several processes (for the data's loader), undefined for one. */
  shard: { rank: number; worldSize: number } | undefined;
  /**
   * One CPU generator per item of a batch, from the item's key (sample_rng.ts): its noise, timestep and VAE ε are then
   * the same whichever batch or process it lands in. Only during the run (the micro-step); draw before the next call.
   */
  sampleDraws(keys: readonly SampleKey[]): Generator[];
  /** The fp16 loss scaler once the optimization exists (null otherwise). */
  scaler(): GradScaler | null;
  /** Optimizer steps done (the script's global_step; 0 before the optimization exists). */
  globalStep(): number;
}

/** What a command supplies: its models, data, micro-step, validation and finish. */
export interface TrainerSpec<B> {
  /** The models carrying the trained LoRA, in the optimizer's order (UNet first). */
  lora: LoraComponents;
  /** SDXL: the UNet's layers per block, for the SGM names of Kohya-layout files (--export_kohya, LoHa/LoKr). */
  sgmLayersPerBlock?: () => number;
  data: TrainerData<B>;
  /** Forward and backward of one batch (loss ÷ accumulation steps, × the loss scale); returns the undivided loss. Frees the batch. */
  microStep(batch: B): number;
  /** The same step split for --cuda_graphs (training/graphed_step.ts); absent: the command's steps always run eagerly. */
  graphable?: GraphableStep<B>;
  /** Validation with the models being trained, after each epoch where epoch % --validation_epochs == 0. */
  validate(epoch: number): Promise<void>;
  /** After the LoRA file is saved: the final validation and the model card; returns the validation images. */
  finish(end: { outputDir: string; lastEpoch: number; globalStep: number; baseLr: number }): Promise<string[]>;
}

/** Whether every LoRA layer of a UNet sits in a transformer (`.attentions.`): Kohya's SGM names map those alone. */
function onlyTransformerLayers(unet: Module): boolean {
  return loraLayers(unet).every(([p]) => p.includes('.attentions.'));
}

/** --export_kohya's file, next to pytorch_lora_weights.safetensors. */
export const KOHYA_WEIGHT_NAME = 'pytorch_lora_weights_kohya.safetensors';

const WEIGHT_DTYPES: Record<ResolvedTrainOptions['mixedPrecision'], DType> = { no: 'float32', fp16: 'float16', bf16: 'bfloat16' };


/**
 * Runs a command's training: its processes joined (one when there is no launcher; `parallel`), the device and
 * --output_dir checked (and the folder created, by rank 0) before anything is loaded, then the run. A run that fails
 * before writing anything leaves no folder it created.
 */
export async function runTrainer<B>(
  o: TrainerOptions, hooks: TrainHooksInternal, build: (ctx: TrainerContext) => Promise<TrainerSpec<B>>,
  parallel: TrainerParallelism = { command: 'this command', dataParallel: false },
): Promise<TrainResult> {
  const dp = parallel.dataParallel ? await DataParallel.forTraining(o, hooks.processGroup) : DataParallel.alone(parallel.command, hooks.processGroup);
  try {
    const device = o.device ?? dp.device ?? (cudaIsAvailable() ? 'cuda:0' : 'cpu'); // nccl: cuda:LOCAL_RANK
    checkDevice(device, 'device');
    if (o.mixedPrecision === 'fp16' && !device.startsWith('cuda')) {
      throw new Error("--mixed_precision=fp16 needs a CUDA GPU: libtorch has no fp16 matmul on CPU; use --mixed_precision=bf16 or no");
    }
    if (dp.isMain) checkOutputDir(o.outputDir); // rank 0 writes; an existing file, FIFO or device there is named, and nothing is created
    const created = dp.isMain ? ensureWritableDir(o.outputDir) : []; // a read-only or full disk fails here, before anything is loaded
    try {
      return await trainIn(o, device, hooks, build, dp);
    } catch (e) {
      removeEmptyDirs(created);
      throw e;
    }
  } finally {
    dp.close();
  }
}

async function trainIn<B>(o: TrainerOptions, device: string, hooks: TrainHooksInternal, build: (ctx: TrainerContext) => Promise<TrainerSpec<B>>, dp: DataParallel): Promise<TrainResult> {
  const outputDir = o.outputDir;
  /** The newest whole checkpoint (this run's, or the one it resumed from): named when the run fails. */
  let lastSaved: string | undefined;
  const lastCheckpoint = () => (lastSaved ? `; the last checkpoint is ${lastSaved}` : '');
  const logs = dp.isMain ? new RunLogs(outputDir, o, hooks.onNotice, lastCheckpoint) : undefined; // rank 0 logs; a FIFO as metrics.jsonl is refused now
  // a checkpoint to resume from is read and checked before the models load (again against the data later); another number of processes is refused
  const resumeFrom = o.resumeFromCheckpoint ? resolveCheckpoint(outputDir, o.resumeFromCheckpoint) : undefined;
  if (resumeFrom !== undefined) checkResumeOptimizer(readTrainingState(resumeFrom, undefined, dp.worldSize), resumeFrom, o);
  if (o.seed !== null) manualSeed(o.seed);
  if (o.allowTf32) setAllowTF32(true);

  const owned: { dispose(): void }[] = [];
  let optimization: Optimization | undefined;
  let streams: SampleStreams | undefined;
  const ctx: TrainerContext = {
    device, weightDtype: WEIGHT_DTYPES[o.mixedPrecision], scaler: () => optimization?.scaler ?? null,
    globalStep: () => optimization?.accumulator.state.globalStep ?? 0,
    own: (x) => { owned.push(x); return x; },
    get logs(): RunLogs {
      if (!logs) throw new Error(`rank ${dp.rank} has no logs: rank 0 alone logs, validates and writes`);
      return logs;
    },
    shard: dp.shard,
    sampleDraws: (keys) => {
      if (!streams) throw new Error('sampleDraws: the per-sample streams exist once the run starts (call it from the micro-step)');
      return streams.forBatch(keys);
    },
  };
  let spec: TrainerSpec<B> | undefined;
  try {
    // 1. the command's models and data (this process's share), the steps arithmetic, the optimization
    spec = await build(ctx);
    const { data } = spec;
    const steps = stepsArithmetic(data.batchesPerEpoch, o.gradientAccumulationSteps, o.numTrainEpochs, o.maxTrainSteps);
    const params = loraParameters(spec.lora);
    optimization = makeOptimization(o, params, steps.maxTrainSteps, dp.worldSize, dp.isMain ? hooks.onNotice : undefined);
    const { optimizer, ema, scaler, accumulator, baseLr } = optimization;
    ctx.own(optimizer);
    if (ema) ctx.own(ema);
    const runLine = dp.isMain ? dp.describeRun(o, steps) : null; // the total batch size with the processes
    if (runLine !== null) hooks.onNotice?.(runLine);
    await dp.broadcastParameters(params); // the LoRA as rank 0 initialised it
    let sampleSeed = await dp.agreeSampleSeed(o.seed); // the per-sample streams' seed
    const generators = [defaultGenerator('cpu'), ...(device.startsWith('cuda') ? [defaultGenerator(device)] : [])];
    const run: CheckpointedRun = { lora: spec.lora, optimizer, ema, accumulator, scaler, data, generators };

    // 2. resume: every piece of state checked, then restored (this rank's data position and RNG), so the run continues as if never stopped
    let startEpoch = 0;
    if (resumeFrom !== undefined) {
      const resuming = {
        maxTrainSteps: steps.maxTrainSteps, numTrainEpochs: steps.numTrainEpochs, accumulationSteps: o.gradientAccumulationSteps, numParams: params.length,
        datasetLength: data.datasetLength, worldSize: dp.worldSize,
      };
      const restored = restoreTrainingCheckpoint(resumeFrom, resuming, run, dp.rank);
      startEpoch = restored.epoch;
      sampleSeed = restored.sampleSeed ?? sampleSeed;
      lastSaved = resumeFrom;
      logs?.metrics.resumedFrom(accumulator.state.globalStep);
    }
    streams = new SampleStreams(sampleSeed); // each sample's noise, timesteps and VAE ε from its own stream
    const graphed = o.cudaGraphs ? graphedStep(o, spec, { device, worldSize: dp.worldSize, optimization, hooks, notice: dp.isMain ? hooks.onNotice : undefined }) : null;
    if (graphed) ctx.own(graphed);

    const s = spec;
    const assertFinite = (epoch: number) => assertFiniteWeights(loraNamedParameters(s.lora), { step: accumulator.state.globalStep, epoch }, lastCheckpoint());
    const checkpoints: string[] = [];
    const skipHint = data.skipped ? ', or pass --skip_broken_images to skip and count unreadable images' : '';
    const saveCheckpoint = async (epoch: number) => {
      const gathered = await dp.gatherCheckpoint(data.state(), generators, sampleSeed); // every rank's data position and RNG
      if (gathered === undefined) return; // rank 0 writes
      try {
        assertFinite(epoch);
        try { lastSaved = saveTrainingCheckpoint(outputDir, run, epoch, gathered); } catch (err) { throw new Error(`${(err as Error).message}${lastCheckpoint()}`); }
      } finally {
        dispose(gathered.others.flatMap((r) => r.rng));
      }
      checkpoints.push(lastSaved);
      pruneCheckpoints(outputDir, o.checkpointsTotalLimit); // after the save: a failed save loses no older checkpoint
    };

    // 3. the loop; train_loss is the mean over the accumulation window (and the processes), logged per optimizer step as the script
    const { lastEpoch, lastLoss } = await trainLoop({
      ...steps, startEpoch, accumulationSteps: o.gradientAccumulationSteps, signal: hooks.signal, failureContext: lastCheckpoint,
      globalStep: () => accumulator.state.globalStep,
      nextBatch: async (epoch, step) => {
        try { return await data.next(); } catch (e) {
          throw new Error(`${(e as Error).message} (at step ${step}, epoch ${epoch})${lastCheckpoint()}; ` +
            `replace the file and resume with --resume_from_checkpoint latest${skipHint}`);
        }
      },
      microStep: (batch) => s.microStep(batch),
      // --cuda_graphs: whole steps, each launched before the last is read; a checkpoint's step is read before the next launch
      pipelined: graphed ?? undefined,
      settleAfter: (step) => o.checkpointingSteps !== null && step % o.checkpointingSteps === 0,
      afterBackward: async () => {
        if (accumulator.syncGradients) await dp.reduceGradients(params); // averaged once per optimizer step, before clipping
        try { return accumulator.afterBackward(); } catch (e) {
          throw new Error(`${optimizerStepError(e, accumulator.state.globalStep + 1, o, baseLr).message}${lastCheckpoint()}`);
        }
      },
      onOptimizerStep: async (e0) => {
        const [loss, stepLoss] = await dp.meanOverProcesses([e0.loss, e0.stepLoss]); // the losses' mean over the processes
        const e = { ...e0, loss: loss!, stepLoss: stepLoss! };
        if (dp.isMain) { // rank 0 logs
          logs?.step({ step: e.step, epoch: e.epoch, loss: e.loss, lr: e.lr, grad_norm: e.gradNorm, skipped: !e.stepped, time: Date.now() / 1000 });
          const validationsLeft = validationRunsLeft({ epoch: e.epoch, numTrainEpochs: steps.numTrainEpochs, validationEpochs: o.validationEpochs, enabled: o.validationPrompt !== null });
          hooks.onProgress?.({ step: e.step, maxTrainSteps: steps.maxTrainSteps, epoch: e.epoch, loss: e.loss, stepLoss: e.stepLoss, lr: e.lr, gradNorm: e.gradNorm, validationsLeft });
        }
        if (o.checkpointingSteps !== null && e.step % o.checkpointingSteps === 0) await saveCheckpoint(e.epoch);
      },
      onEpochEnd: async (epoch) => {
        if (!dp.isMain || o.validationPrompt === null || epoch % o.validationEpochs !== 0) return; // rank 0 validates
        await s.validate(epoch);
      },
      nextEpoch: () => data.nextEpoch(),
    });

    // 4. the result, in diffusers' format (rank 0), then the command's final validation and model card, and the loss plot
    await dp.finish(); // every rank done with the collectives; the others stop here, rank 0 writes
    const ranks = { processIndex: dp.rank, numProcesses: dp.worldSize };
    const skippedImages = data.skipped?.() ?? { count: 0, files: [] };
    const globalStep = accumulator.state.globalStep;
    if (!logs) return { validationImages: [], outputFile: join(outputDir, LORA_WEIGHT_NAME), globalStep, lastLoss, checkpoints: [], skippedImages, ...ranks };
    const report = dp.report();
    if (report !== null) hooks.onNotice?.(report);
    assertFinite(lastEpoch);
    // LoRA/LoCon/DoRA in diffusers' names, LoHa/LoKr in LyCORIS' Kohya keys; --export_kohya: the Kohya layout beside it
    // (SGM names only when every UNet layer is in a transformer: a ResNet/resampler conv keeps diffusers' Kohya name, which A1111/ComfyUI also read)
    const targets = loraTargets(s.lora);
    const sgm = s.sgmLayersPerBlock && (o.exportKohya || hasLycorisLayers(targets)) && onlyTransformerLayers(targets.unet) ? { sgmLayersPerBlock: s.sgmLayersPerBlock() } : {};
    const outputFile = saveLoraWeights(outputDir, loraTargets(s.lora), sgm);
    if (o.exportKohya) saveLoraWeights(outputDir, loraTargets(s.lora), { ...sgm, format: 'kohya', weightName: KOHYA_WEIGHT_NAME });
    if (ema) saveEmaLoraWeights(ema, outputDir, loraTargets(s.lora), hooks.onNotice); // beside the trained weights, which validation uses
    const validationImages = await s.finish({ outputDir, lastEpoch, globalStep, baseLr });
    await saveLossPlot(join(outputDir, 'loss.png'), logs.metrics.read());
    return { validationImages, outputFile, globalStep, lastLoss, checkpoints, skippedImages, ...ranks };
  } finally {
    logs?.close();
    await spec?.data.close();
    for (const x of owned.reverse()) x.dispose();
  }
}

/**
 * --cuda_graphs: the driver that records the command's step (training/graphed_step.ts), or null after one line saying
 * why the steps run eagerly (not CUDA, accumulation, several processes, another optimizer, gradient checkpointing, a
 * command without a capturable step).
 */
function graphedStep<B>(o: TrainerOptions, spec: TrainerSpec<B>, r: {
  device: string; worldSize: number; optimization: Optimization; hooks: TrainHooksInternal; notice?: (m: string) => void;
}): GraphedTrainStep<B> | null {
  const { optimizer, scaler, accumulator } = r.optimization;
  const blocker = o.gradientCheckpointing ? '--gradient_checkpointing is not verified under capture yet' : cudaGraphsBlocker({
    device: r.device, accumulationSteps: o.gradientAccumulationSteps, worldSize: r.worldSize, optimizer: optimizer.kind,
    graphable: spec.graphable !== undefined, standIn: r.hooks.makeGraph !== undefined,
  });
  if (blocker !== null || !spec.graphable) {
    r.notice?.(`CUDA graphs: off (${blocker}); the steps run eagerly`);
    return null;
  }
  r.notice?.('CUDA graphs: the training step is recorded after 3 warm-up steps and replayed');
  return new GraphedTrainStep(spec.graphable, {
    device: r.device, params: optimizer.params, optimizer: optimizer as AdamW, scaler, maxGradNorm: o.maxGradNorm, accumulator,
    makeGraph: r.hooks.makeGraph, onNotice: r.notice,
  });
}
