// runTraining: the loop of diffusers' train_text_to_image_lora.py as calls into tested parts — the options
// resolved (options.ts), the models with the LoRA attached (models.ts), the data (train_data.ts), the
// optimization (optimization.ts), checkpoints with exact resume (checkpoint.ts), the loop (loop.ts) around
// the step (step.ts's loraTrainingStep), logs (lib/logging), validation (validation.ts), and at the end the
// pytorch_lora_weights.safetensors, final images, model card and loss plot.
import { basename, join } from 'node:path';
import { cudaDeviceCount, cudaIsAvailable, setAllowTF32 } from '../device.js';
import { DataParallel, type ProcessGroupOption } from '../distributed/data_parallel.js';
import type { DType } from '../dtype.js';
import { saveLossPlot } from '../logging/loss_plot.js';
import { RunLogs } from '../logging/run_logs.js';
import { saveLoraWeights } from '../lora/save.js';
import { defaultGenerator, manualSeed } from '../random.js';
import { dispose, tidy } from '../scope.js';
import {
  assertFiniteWeights, checkOutputDir, ensureWritableDir, pruneCheckpoints, readTrainingState, removeEmptyDirs, resolveCheckpoint,
  restoreTrainingCheckpoint, saveTrainingCheckpoint, type CheckpointedRun,
} from './checkpoint.js';
import { trainLoop } from './loop.js';
import { saveModelCard } from './model_card.js';
import { loadTrainingModels } from './models.js';
import { makeOptimization, optimizerStepError } from './optimization.js';
import { checkDeviceAvailable, resolveTrainOptions, validateTrainOptions, type ResolvedTrainOptions, type TrainOptions } from './options.js';
import { SampleStreams } from './sample_rng.js';
import { loraTrainingStep } from './step.js';
import { openTrainData, type TrainData } from './train_data.js';
import { validateSavedLora, validateTrainingModels, validationRunsLeft, type ValidationEvent } from './validation.js';

export type { TrainOptions };

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
/** What runTraining tells its caller besides progress (the CLI prints these lines). */
export interface TrainHooksInternal {
  onProgress?: (p: TrainProgress) => void;
  /** A validation run starting and ending (images of the prompt; 'test' is the final one, with the saved LoRA). */
  onValidation?: (e: ValidationEvent) => void;
  signal?: AbortSignal;
  onNotice?: (message: string) => void;
  /** The run's processes (lib/distributed/data_parallel.ts): default, join the group a launcher describes in the environment. */
  processGroup?: ProcessGroupOption;
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



/**
 * Trains a LoRA as the script's main(): options checked (validateTrainOptions) and resolved, --output_dir
 * checked and created, then the run (trainIn). A run that fails before writing anything leaves no folder it created.
 */
export async function runTraining(options: TrainOptions, hooks: TrainHooksInternal = {}): Promise<TrainResult> {
  validateTrainOptions(options);
  const o = resolveTrainOptions(options);
  const dp = await DataParallel.forTraining(o, hooks.processGroup); // [dp] the run's processes (one when there is no launcher)
  try {
    const device = o.device ?? dp.device ?? (cudaIsAvailable() ? 'cuda:0' : 'cpu'); // [dp] nccl: cuda:LOCAL_RANK
    checkDeviceAvailable(device, { cudaAvailable: cudaIsAvailable(), cudaDeviceCount: cudaDeviceCount() }, 'device');
    if (o.mixedPrecision === 'fp16' && !device.startsWith('cuda')) {
      throw new Error("--mixed_precision=fp16 needs a CUDA GPU: libtorch has no fp16 matmul on CPU; use --mixed_precision=bf16 or no");
    }
    if (dp.isMain) checkOutputDir(o.outputDir); // [dp] rank 0 writes; an existing file, FIFO or device there is named, and nothing is created
    const created = dp.isMain ? ensureWritableDir(o.outputDir) : []; // [dp] a read-only or full disk fails here, before anything is loaded
    try {
      return await trainIn(o.outputDir, device, o, hooks, dp);
    } catch (e) {
      removeEmptyDirs(created);
      throw e;
    }
  } finally {
    dp.close(); // [dp]
  }
}

const WEIGHT_DTYPES: Record<ResolvedTrainOptions['mixedPrecision'], DType> = { no: 'float32', fp16: 'float16', bf16: 'bfloat16' };

async function trainIn(outputDir: string, device: string, o: ResolvedTrainOptions, hooks: TrainHooksInternal, dp: DataParallel): Promise<TrainResult> {
  const weightDtype = WEIGHT_DTYPES[o.mixedPrecision];
  /** The newest whole checkpoint (this run's, or the one it resumed from): named when the run fails. */
  let lastSaved: string | undefined;
  const lastCheckpoint = () => (lastSaved ? `; the last checkpoint is ${lastSaved}` : '');
  const logs = dp.isMain ? new RunLogs(outputDir, o, hooks.onNotice, lastCheckpoint) : undefined; // [dp] rank 0 logs; a FIFO as metrics.jsonl is refused now
  // a checkpoint to resume from is read and checked before the models load (again against the data later)
  const resumeFrom = o.resumeFromCheckpoint ? resolveCheckpoint(outputDir, o.resumeFromCheckpoint) : undefined;
  if (resumeFrom !== undefined) readTrainingState(resumeFrom, undefined, dp.worldSize); // [dp] another number of processes is refused
  if (o.seed !== null) manualSeed(o.seed);
  if (o.allowTf32) setAllowTF32(true);

  const owned: { dispose(): void }[] = [];
  const own = <T extends { dispose(): void }>(x: T): T => { owned.push(x); return x; };
  let data: TrainData | undefined;
  try {
    // 1. models, data, steps arithmetic, optimization
    const models = loadTrainingModels(o, device, weightDtype, own);
    const { unet, vae, textEncoder, tokenizer, lora } = models;
    const params = lora.parameters();
    data = await openTrainData(o, { tokenizer, device, shard: dp.shard }); // [dp] this process's share of each epoch
    const steps = stepsArithmetic(data.batchesPerEpoch, o.gradientAccumulationSteps, o.numTrainEpochs, o.maxTrainSteps);
    const { optimizer, scaler, accumulator, baseLr } = makeOptimization(o, params, steps.maxTrainSteps, dp.worldSize); // [dp]
    const runLine = dp.isMain ? dp.describeRun(o, steps) : null; // [dp] the total batch size with the processes
    if (runLine !== null) hooks.onNotice?.(runLine); // [dp]
    await dp.broadcastParameters(params); // [dp] the LoRA as rank 0 initialised it
    let sampleSeed = await dp.agreeSampleSeed(o.seed); // [dp] the per-sample streams' seed
    own(optimizer);
    const generators = [defaultGenerator('cpu'), ...(device.startsWith('cuda') ? [defaultGenerator(device)] : [])];
    const run: CheckpointedRun = { model: unet, lora, optimizer, accumulator, scaler, data, generators };

    // 2. resume: every piece of state checked, then restored, so the run continues as if never stopped
    let startEpoch = 0;
    if (resumeFrom !== undefined) {
      const resuming = { maxTrainSteps: steps.maxTrainSteps, numTrainEpochs: steps.numTrainEpochs, accumulationSteps: o.gradientAccumulationSteps, numParams: params.length, datasetLength: data.datasetLength };
      const restored = restoreTrainingCheckpoint(resumeFrom, { ...resuming, worldSize: dp.worldSize }, run, dp.rank); // [dp] this rank's data position and RNG
      startEpoch = restored.epoch;
      sampleSeed = restored.sampleSeed ?? sampleSeed; // [dp]
      lastSaved = resumeFrom;
      logs?.metrics.resumedFrom(accumulator.state.globalStep);
    }
    const streams = new SampleStreams(sampleSeed); // [dp] each sample's noise, timestep and VAE ε from its own stream

    const assertFinite = (epoch: number) => assertFiniteWeights(lora.namedParameters(), { step: accumulator.state.globalStep, epoch }, lastCheckpoint());
    const checkpoints: string[] = [];
    const source = { model: o.pretrainedModelNameOrPath, load: models.load };
    const validation = (prompt: string, phase: 'validation' | 'test', epoch: number, dir: string) =>
      ({ prompt, numImages: o.numValidationImages, seed: o.seed, phase, epoch, dir, logs: logs?.tensorboard(), onEvent: hooks.onValidation });

    // 3. the loop; train_loss is the mean over the accumulation window, logged per optimizer step as the script
    const { lastEpoch, lastLoss } = await trainLoop({
      ...steps, startEpoch, accumulationSteps: o.gradientAccumulationSteps, signal: hooks.signal, failureContext: lastCheckpoint,
      globalStep: () => accumulator.state.globalStep,
      nextBatch: async (epoch) => {
        try { return await run.data.next(); } catch (e) {
          throw new Error(`${(e as Error).message} (at step ${accumulator.state.globalStep + 1}, epoch ${epoch})${lastCheckpoint()}; ` +
            'replace the file and resume with --resume_from_checkpoint latest, or pass --skip_broken_images to skip and count unreadable images');
        }
      },
      microStep: (batch) => {
        try {
          return tidy(() => loraTrainingStep({
            unet, vae, textEncoder, scheduler: models.noiseScheduler, batch, accumulationSteps: o.gradientAccumulationSteps, generator: streams.forBatch(batch.keys), // [dp]
            mixedPrecision: o.mixedPrecision, scaler, noiseOffset: o.noiseOffset, snrGamma: o.snrGamma, predictionType: o.predictionType,
          }));
        } finally {
          dispose([batch.pixelValues, batch.inputIds]);
        }
      },
      afterBackward: async () => {
        if (accumulator.syncGradients) await dp.reduceGradients(params); // [dp] averaged once per optimizer step, before clipping
        try { return accumulator.afterBackward(); } catch (e) {
          throw new Error(`${optimizerStepError(e, accumulator.state.globalStep + 1, o, baseLr).message}${lastCheckpoint()}`);
        }
      },
      onOptimizerStep: async (s0) => {
        const [loss, stepLoss] = await dp.meanOverProcesses([s0.loss, s0.stepLoss]); // [dp] the losses' mean over the processes
        const s = { ...s0, loss: loss!, stepLoss: stepLoss! }; // [dp]
        if (dp.isMain) { // [dp] rank 0 logs
          logs?.step({ step: s.step, epoch: s.epoch, loss: s.loss, lr: s.lr, grad_norm: s.gradNorm, skipped: !s.stepped, time: Date.now() / 1000 });
          const validationsLeft = validationRunsLeft({ epoch: s.epoch, numTrainEpochs: steps.numTrainEpochs, validationEpochs: o.validationEpochs, enabled: o.validationPrompt !== null });
          hooks.onProgress?.({ step: s.step, maxTrainSteps: steps.maxTrainSteps, epoch: s.epoch, loss: s.loss, stepLoss: s.stepLoss, lr: s.lr, gradNorm: s.gradNorm, validationsLeft });
        }
        if (o.checkpointingSteps === null || s.step % o.checkpointingSteps !== 0) return;
        const parallel = await dp.gatherCheckpoint(run.data.state(), generators, sampleSeed); // [dp] every rank's data position and RNG
        if (parallel === undefined) return; // [dp] rank 0 writes
        assertFinite(s.epoch);
        try { lastSaved = saveTrainingCheckpoint(outputDir, run, s.epoch, parallel); } catch (e) { throw new Error(`${(e as Error).message}${lastCheckpoint()}`); } finally { dispose(parallel.others.flatMap((r) => r.rng)); }
        checkpoints.push(lastSaved);
        pruneCheckpoints(outputDir, o.checkpointsTotalLimit); // after the save: a failed save loses no older checkpoint
      },
      onEpochEnd: async (epoch) => {
        if (!dp.isMain || o.validationPrompt === null || epoch % o.validationEpochs !== 0) return; // [dp] rank 0 validates
        await validateTrainingModels({ unet, vae, textEncoder, tokenizer }, source, validation(o.validationPrompt, 'validation', epoch, join(outputDir, 'validation', `epoch-${epoch}`)));
      },
      nextEpoch: () => run.data.nextEpoch(),
    });

    // 4. the result, in diffusers' format
    await dp.finish(); // [dp] every rank done with the collectives; the others stop here, rank 0 writes
    const ranks = { processIndex: dp.rank, numProcesses: dp.worldSize }; // [dp]
    if (!dp.isMain) return { validationImages: [], outputFile: join(outputDir, 'pytorch_lora_weights.safetensors'), globalStep: accumulator.state.globalStep, lastLoss, checkpoints: [], skippedImages: data.skipped(), ...ranks }; // [dp]
    const report = dp.report(); // [dp]
    if (report !== null) hooks.onNotice?.(report); // [dp]
    assertFinite(lastEpoch);
    const outputFile = saveLoraWeights(outputDir, unet);
    // final inference as the script: the base pipeline loaded afresh, with the saved file through loadLoraWeights
    const validationImages = o.validationPrompt === null ? [] : await validateSavedLora(
      { ...source, variant: o.variant, dtype: weightDtype, device, memoryEfficientAttention: o.enableXformersMemoryEfficientAttention },
      outputDir, validation(o.validationPrompt, 'test', lastEpoch, outputDir));
    saveModelCard(outputDir, {
      baseModel: o.pretrainedModelNameOrPath, dataset: o.datasetName ?? o.trainDataDir ?? '', rank: o.rank, steps: accumulator.state.globalStep,
      learningRate: baseLr, resolution: o.resolution, validationPrompt: o.validationPrompt, images: validationImages.map((p) => basename(p)),
    });
    if (logs) await saveLossPlot(join(outputDir, 'loss.png'), logs.metrics.read());
    return { validationImages, outputFile, globalStep: accumulator.state.globalStep, lastLoss, checkpoints, skippedImages: data.skipped(), ...ranks };
  } finally {
    logs?.close();
    await data?.close();
    for (const x of owned.reverse()) x.dispose();
  }
}
