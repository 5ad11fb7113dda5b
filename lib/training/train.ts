// runTraining: the loop of diffusers' train_text_to_image_lora.py over the tested parts — models
// (fromPretrained), LoRA (attachLora), data (imagefolder + sharp transforms), the step (loraTrainingStep,
// Accumulator), checkpoints with exact resume, and the final pytorch_lora_weights.safetensors.
import { cudaDeviceCount, cudaIsAvailable, setAllowTF32 } from '../device.js';
import { AutoencoderKL } from '../models/autoencoder_kl.js';
import { CLIPTextModel } from '../models/clip_text_model.js';
import { CLIPTokenizer } from '../models/clip_tokenizer.js';
import { UNet2DConditionModel } from '../models/unet_2d_condition.js';
import { setMemoryEfficientAttention } from '../models/attention_processor.js';
import type { FromPretrainedOptions } from '../models/loading.js';
import { saveLoraWeights } from '../lora/save.js';
import { setPeftModelStateDict } from '../lora/load.js';
import { AdamW } from '../optim/adamw.js';
import { GradScaler } from '../optim/grad_scaler.js';
import { DDPMScheduler } from '../schedulers/scheduling_ddpm.js';
import { defaultGenerator, manualSeed } from '../random.js';
import { dispose, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import type { DType } from '../dtype.js';
import { Accumulator, loraTrainingStep, type MixedPrecision } from './step.js';
import {
  checkOutputDir, checkTensors, disposeCheckpoint, ensureWritableDir, firstNonFinite, loadCheckpoint, pruneCheckpoints,
  readTrainingState, removeEmptyDirs, resolveCheckpoint, saveCheckpoint, type ExpectedTensor, type ResumingRun, type TrainingState,
} from './checkpoint.js';
import { MetricsLog } from '../logging/metrics.js';
import {
  TrainOptionsError, checkDeviceAvailable, resolveTrainOptions, validateTrainOptions, type ResolvedTrainOptions, type TrainOptions,
} from './options.js';
import { DEFAULT_TARGET_MODULES, attachLora, matchesTarget, type LoraHandle } from '../lora/attach.js';
import { Linear } from '../nn/layers.js';
import type { Module } from '../nn/module.js';
import { openTrainData, type TrainData } from './train_data.js';
import { TensorBoardWriter } from '../logging/tensorboard.js';
import { saveModelCard } from './model_card.js';
import { runValidation, validationRunsLeft, type ValidationEvent } from './validation.js';
import { StableDiffusionPipeline } from '../pipelines/stable_diffusion.js';
import { loadScheduler } from '../schedulers/scheduler.js';
import { saveLossPlot } from '../logging/loss_plot.js';
import { basename, join } from 'node:path';

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
}
export interface TrainResult { validationImages: string[]; outputFile: string; globalStep: number; lastLoss: number; checkpoints: string[]; skippedImages: { count: number; files: string[] } }

/** Steps arithmetic of the script: optimizer steps per epoch, total steps and epochs. */
export function stepsArithmetic(batchesPerEpoch: number, accumulation: number, numTrainEpochs: number, maxTrainSteps?: number | null) {
  const updateStepsPerEpoch = Math.ceil(batchesPerEpoch / accumulation);
  const maxSteps = maxTrainSteps ?? numTrainEpochs * updateStepsPerEpoch;
  return { updateStepsPerEpoch, maxTrainSteps: maxSteps, numTrainEpochs: Math.ceil(maxSteps / updateStepsPerEpoch) };
}


/**
 * Trains a LoRA as the script's main(): options checked (validateTrainOptions), --output_dir checked and
 * created, then the loop (trainIn). A run that fails before writing anything leaves no folder it created.
 */
export async function runTraining(options: TrainOptions, hooks: TrainHooksInternal = {}): Promise<TrainResult> {
  validateTrainOptions(options);
  const o = resolveTrainOptions(options);
  const device = o.device ?? (cudaIsAvailable() ? 'cuda:0' : 'cpu');
  checkDeviceAvailable(device, { cudaAvailable: cudaIsAvailable(), cudaDeviceCount: cudaDeviceCount() }, 'device');
  if (o.mixedPrecision === 'fp16' && !device.startsWith('cuda')) {
    throw new Error("--mixed_precision=fp16 needs a CUDA GPU: libtorch has no fp16 matmul on CPU; use --mixed_precision=bf16 or no");
  }
  const outputDir = o.outputDir;
  checkOutputDir(outputDir); // an existing file, FIFO or device there is named, and nothing is created
  const created = ensureWritableDir(outputDir); // a read-only or full disk fails here, before anything is loaded
  try {
    return await trainIn(outputDir, device, o, hooks);
  } catch (e) {
    removeEmptyDirs(created);
    throw e;
  }
}

/**
 * The LoRA rank must fit the smallest layer it adapts: B·A has rank at most min(in, out), so a larger rank
 * adds nothing but memory (and --rank=100000 crashed allocating it).
 */
function checkRankFits(unet: Module, rank: number): void {
  let smallest: { path: string; layer: Linear; size: number } | undefined;
  for (const [path, m] of unet.namedModules()) {
    if (!(m instanceof Linear) || !matchesTarget(path, DEFAULT_TARGET_MODULES)) continue;
    const size = Math.min(m.inFeatures, m.outFeatures);
    if (!smallest || size < smallest.size) smallest = { path, layer: m, size };
  }
  if (smallest && rank > smallest.size) {
    throw new TrainOptionsError([`--rank ${rank} is larger than the smallest layer LoRA adapts, ${smallest.path} ` +
      `(Linear ${smallest.layer.inFeatures} → ${smallest.layer.outFeatures}): --rank must be at most ${smallest.size} for this model`]);
  }
}

/** What a resume restores into. */
interface Resumable {
  unet: Module;
  lora: LoraHandle;
  optimizer: AdamW;
  accumulator: Accumulator;
  scaler: GradScaler | null;
  data: TrainData;
  generators: ReturnType<typeof defaultGenerator>[];
}

/** The tensors a checkpoint of this run holds: LoRA weights and Adam moments (finite), generator states. */
function expectedTensors(state: TrainingState, t: Resumable): ExpectedTensor[] {
  const params = t.lora.namedParameters();
  const rng = t.generators.map((g, i) => {
    const s = g.getState();
    try { return { name: `rng.${i}`, shape: s.shape, dtype: s.dtype }; } finally { s.dispose(); }
  });
  return [
    ...params.map(([n, p]) => ({ name: `lora.${n}`, shape: p.shape, dtype: p.dtype, finite: true })),
    ...params.flatMap(([, p], i) => ((state.optimizer.steps[i] ?? 0) > 0
      ? ['exp_avg', 'exp_avg_sq'].map((k) => ({ name: `optimizer.${i}.${k}`, shape: p.shape, dtype: p.dtype, finite: true }))
      : [])),
    ...rng,
  ];
}

/**
 * Resumes from checkpoint `path`: its state and tensors are checked in full against this run first, so a
 * corrupt checkpoint is refused (naming its file and field) before any of the run's state changes.
 * Returns the epoch and step to continue from.
 */
function restoreCheckpoint(path: string, run: ResumingRun, t: Resumable): { epoch: number; globalStep: number } {
  const { tensors, state } = loadCheckpoint(path, run);
  try {
    checkTensors(tensors, expectedTensors(state, t), join(path, 'training_state.safetensors'));
    const get = (k: string): Tensor => tensors.get(k)!; // present: checked above
    // the trained adapter through the one LoRA loader (checked against the layers before any copy)
    setPeftModelStateDict(t.unet, tensors, { keyPrefix: 'lora.', file: join(path, 'training_state.safetensors') });
    const optTensors = new Map([...tensors].filter(([k]) => k.startsWith('optimizer.')).map(([k, v]) => [k.slice('optimizer.'.length), v]));
    t.optimizer.loadStateDict({ tensors: optTensors, meta: state.optimizer });
    Object.assign(t.accumulator.state, state.accumulator);
    t.optimizer.lr = t.accumulator.lr;
    if (t.scaler && state.scaler) t.scaler.loadStateDict(state.scaler);
    t.data.restore(state.data);
    t.generators.forEach((g, i) => g.setState(get(`rng.${i}`)));
    return { epoch: state.epoch, globalStep: state.accumulator.globalStep };
  } finally {
    disposeCheckpoint({ tensors, state });
  }
}

async function trainIn(outputDir: string, device: string, o: ResolvedTrainOptions, hooks: TrainHooksInternal): Promise<TrainResult> {
  const mixedPrecision: MixedPrecision = o.mixedPrecision;
  const weightDtype: DType = mixedPrecision === 'fp16' ? 'float16' : mixedPrecision === 'bf16' ? 'bfloat16' : 'float32';
  const metrics = new MetricsLog(join(outputDir, 'metrics.jsonl'), hooks.onNotice); // a FIFO there is refused now
  // a checkpoint to resume from is read and checked before the models load (again against the data later)
  const resumeFrom = o.resumeFromCheckpoint ? resolveCheckpoint(outputDir, o.resumeFromCheckpoint) : undefined;
  if (resumeFrom !== undefined) readTrainingState(resumeFrom);
  if (o.seed !== null) manualSeed(o.seed);
  if (o.allowTf32) setAllowTF32(true);

  const owned: { dispose(): void }[] = [];
  const own = <T extends { dispose(): void }>(x: T): T => { owned.push(x); return x; };
  let opened: TrainData | undefined;
  let logsWriter: TensorBoardWriter | null = null;
  try {
    // 1. models: frozen, in the weight dtype; LoRA parameters in fp32 (attached after the cast)
    const load: FromPretrainedOptions = { revision: o.revision ?? undefined, cacheDir: o.cacheDir ?? undefined };
    const model = o.pretrainedModelNameOrPath;
    const tokenizer = CLIPTokenizer.fromPretrained(model, { ...load, subfolder: 'tokenizer' });
    const scheduler = own(DDPMScheduler.fromPretrained(model, { ...load, subfolder: 'scheduler' }));
    const textEncoder = own(CLIPTextModel.fromPretrained(model, { ...load, subfolder: 'text_encoder', dtype: weightDtype, device }));
    const vae = own(AutoencoderKL.fromPretrained(model, { ...load, subfolder: 'vae', variant: o.variant ?? undefined, dtype: weightDtype, device }));
    const unet = own(UNet2DConditionModel.fromPretrained(model, { ...load, subfolder: 'unet', variant: o.variant ?? undefined, dtype: weightDtype, device }));
    const rank = o.rank;
    checkRankFits(unet, rank);
    const lora = attachLora(unet, { rank, alpha: rank, init: 'gaussian' });
    unet.train();
    if (o.gradientCheckpointing) unet.enableGradientCheckpointing();
    if (o.enableXformersMemoryEfficientAttention) setMemoryEfficientAttention(unet);
    const params = lora.parameters();

    // 2. data and steps arithmetic
    const data = await openTrainData(o, { tokenizer, device });
    opened = data;
    const accumulation = o.gradientAccumulationSteps;
    const steps = stepsArithmetic(data.batchesPerEpoch, accumulation, o.numTrainEpochs, o.maxTrainSteps);

    // 3. optimisation
    const baseLr = o.learningRate * (o.scaleLr ? accumulation * o.trainBatchSize : 1);
    const optimizer = own(new AdamW(params, {
      lr: baseLr, betas: [o.adamBeta1, o.adamBeta2], weightDecay: o.adamWeightDecay, eps: o.adamEpsilon,
    }));
    const scaler = mixedPrecision === 'fp16' ? new GradScaler() : null;
    const accumulator = new Accumulator({
      optimizer, params, scaler, maxGradNorm: o.maxGradNorm, accumulationSteps: accumulation,
      lrScheduler: o.lrScheduler,
      lrOptions: { baseLr, warmupSteps: o.lrWarmupSteps, totalSteps: steps.maxTrainSteps },
    });
    const generators = [defaultGenerator('cpu'), ...(device.startsWith('cuda') ? [defaultGenerator(device)] : [])];

    // 4. resume: every piece of state checked, then restored, so the run continues as if never stopped
    let epoch = 0;
    /** The newest whole checkpoint (this run's, or the one it resumed from): named when the run fails. */
    let lastSaved: string | undefined;
    if (resumeFrom !== undefined) {
      const path = resumeFrom;
      const run = { maxTrainSteps: steps.maxTrainSteps, numTrainEpochs: steps.numTrainEpochs, accumulationSteps: accumulation, numParams: params.length, datasetLength: data.datasetLength };
      const resumed = restoreCheckpoint(path, run, { unet, lora, optimizer, accumulator, scaler, data, generators });
      epoch = resumed.epoch;
      lastSaved = path;
      metrics.resumedFrom(resumed.globalStep);
    }

    // 5. the loop; train_loss is the mean over the accumulation window, logged per optimizer step as the script
    const saved: string[] = [];
    const lastCheckpoint = () => (lastSaved ? `; the last checkpoint is ${lastSaved}` : '');
    // TensorBoard's event file is created with the first value logged: a run failing before it writes nothing
    const logs = (): TensorBoardWriter | null => (o.reportTo === 'tensorboard'
      ? (logsWriter ??= new TensorBoardWriter(join(outputDir, o.loggingDir))) : null);
    // a log write that fails (full disk) names its file and where the run can be resumed from
    const logged = (file: () => string | undefined, write: () => void) => {
      try { write(); } catch (e) { throw new Error(`cannot write ${file() ?? 'the logs'}: ${(e as Error).message}${lastCheckpoint()}`); }
    };
    // nothing non-finite is ever saved: a diverged update with a still-finite loss stops here, naming the step
    const assertFiniteWeights = (atEpoch: number) => {
      const bad = firstNonFinite(lora.namedParameters());
      if (bad !== undefined) {
        throw new Error(`LoRA weight '${bad}' is NaN or infinite after step ${accumulator.state.globalStep} (epoch ${atEpoch}): ` +
          `the training diverged (lower --learning_rate?); nothing more was saved${lastCheckpoint()}`);
      }
    };
    const checkpointNow = () => {
      assertFiniteWeights(epoch);
      const tensors = new Map<string, Tensor>();
      const opt = optimizer.stateDict();
      for (const [k, t] of opt.tensors) tensors.set(`optimizer.${k}`, t);
      for (const [n, p] of lora.namedParameters()) tensors.set(`lora.${n}`, p);
      const rng = generators.map((g) => g.getState());
      rng.forEach((s, i) => tensors.set(`rng.${i}`, s));
      try {
        const state: TrainingState = { accumulator: { ...accumulator.state }, optimizer: opt.meta, scaler: scaler?.stateDict() ?? null, data: data.state(), epoch };
        lastSaved = saveCheckpoint(outputDir, accumulator.state.globalStep, { tensors, state }, (dir) => saveLoraWeights(dir, unet));
        saved.push(lastSaved);
      } catch (e) {
        throw new Error(`${(e as Error).message}${lastCheckpoint()}`);
      } finally {
        dispose(rng);
      }
      pruneCheckpoints(outputDir, o.checkpointsTotalLimit); // after the save: a failed save loses no older checkpoint
    };
    let lastLoss = NaN;
    let trainLoss = 0;
    // the last epoch that ran, as Python's loop variable after `for epoch in range(...)` (the final images' step)
    let lastEpoch = epoch;
    for (; epoch < steps.numTrainEpochs && accumulator.state.globalStep < steps.maxTrainSteps; epoch++) {
      lastEpoch = epoch;
      while (accumulator.state.globalStep < steps.maxTrainSteps) {
        if (hooks.signal?.aborted) throw new Error('training aborted');
        let batch: Awaited<ReturnType<TrainData['next']>>;
        try { batch = await data.next(); } catch (e) {
          throw new Error(`${(e as Error).message} (at step ${accumulator.state.globalStep + 1}, epoch ${epoch})${lastCheckpoint()}; ` +
            'replace the file and resume with --resume_from_checkpoint latest, or pass --skip_broken_images to skip and count unreadable images');
        }
        if (!batch) break; // end of epoch
        const loss = tidy(() => loraTrainingStep({
          unet, vae, textEncoder, scheduler, batch: { pixelValues: batch.pixelValues, inputIds: batch.inputIds },
          accumulationSteps: accumulation, mixedPrecision, scaler, noiseOffset: o.noiseOffset,
          snrGamma: o.snrGamma, predictionType: o.predictionType,
        }));
        dispose([batch.pixelValues, batch.inputIds]);
        if (!Number.isFinite(loss)) {
          throw new Error(`loss is ${loss} at step ${accumulator.state.globalStep + 1} (epoch ${epoch}); nothing more was saved${lastCheckpoint()}`);
        }
        lastLoss = loss;
        trainLoss += loss / accumulation;
        let r: ReturnType<Accumulator['afterBackward']>;
        try { r = accumulator.afterBackward(); } catch (e) {
          // e.g. a step size lr / (1 − β1^t) beyond float32: name the settings that produced it
          throw new Error(`the optimizer step ${accumulator.state.globalStep + 1} failed with learning rate ${baseLr}${o.scaleLr ? ' (--learning_rate scaled by --scale_lr)' : ''} --adam_beta1=${o.adamBeta1} ` +
            `--adam_beta2=${o.adamBeta2} --adam_weight_decay=${o.adamWeightDecay}: ${(e as Error).message}${lastCheckpoint()}`);
        }
        if (!r) continue;
        const step = accumulator.state.globalStep;
        logged(() => logs()?.path, () => logs()?.addScalar('train_loss', trainLoss, step));
        const line = { step, epoch, loss: trainLoss, lr: r.lr, grad_norm: r.gradNorm, skipped: !r.stepped, time: Date.now() / 1000 };
        logged(() => metrics.file, () => metrics.append(line));
        logged(() => logs()?.path, () => logs()?.addScalar('lr', r.lr, step));
        trainLoss = 0;
        const validationsLeft = validationRunsLeft({ epoch, numTrainEpochs: steps.numTrainEpochs, validationEpochs: o.validationEpochs, enabled: o.validationPrompt !== null });
        hooks.onProgress?.({ step, maxTrainSteps: steps.maxTrainSteps, epoch, loss: line.loss, stepLoss: loss, lr: r.lr, gradNorm: r.gradNorm, validationsLeft });
        if (o.checkpointingSteps !== null && step % o.checkpointingSteps === 0) checkpointNow();
      }
      if (o.validationPrompt && epoch % o.validationEpochs === 0) {
        // the current LoRA, in the training models themselves (the script wraps the same unet in a pipeline)
        const sampler = loadScheduler(model, { ...load, subfolder: 'scheduler' });
        try {
          await runValidation({ unet, vae, textEncoder, tokenizer, scheduler: sampler }, {
            prompt: o.validationPrompt, numImages: o.numValidationImages, seed: o.seed, phase: 'validation', epoch,
            dir: join(outputDir, 'validation', `epoch-${epoch}`), logs: logs(), onEvent: hooks.onValidation,
          });
        } finally {
          sampler.dispose();
        }
      }
      if (accumulator.state.globalStep < steps.maxTrainSteps) data.nextEpoch();
    }
    // 6. the result, in diffusers' format
    assertFiniteWeights(lastEpoch);
    const outputFile = saveLoraWeights(outputDir, unet);
    // final inference as the script: the base pipeline loaded afresh, with the saved file through loadLoraWeights
    let validationImages: string[] = [];
    if (o.validationPrompt) {
      const pipe = StableDiffusionPipeline.fromPretrained(model, { ...load, variant: o.variant ?? undefined, dtype: weightDtype, device });
      try {
        pipe.loadLoraWeights(outputDir);
        // same images either way; keeps the final run within the memory the training was given
        if (o.enableXformersMemoryEfficientAttention) pipe.enableMemoryEfficientAttention();
        validationImages = await runValidation(pipe, {
          prompt: o.validationPrompt, numImages: o.numValidationImages, seed: o.seed, phase: 'test', epoch: lastEpoch, dir: outputDir, logs: logs(),
          onEvent: hooks.onValidation,
        });
      } finally {
        pipe.dispose();
      }
    }
    saveModelCard(outputDir, {
      baseModel: o.pretrainedModelNameOrPath, dataset: o.datasetName ?? o.trainDataDir ?? '', rank, steps: accumulator.state.globalStep,
      learningRate: baseLr, resolution: o.resolution, validationPrompt: o.validationPrompt,
      images: validationImages.map((p) => basename(p)),
    });
    await saveLossPlot(join(outputDir, 'loss.png'), metrics.read());
    return { validationImages, outputFile, globalStep: accumulator.state.globalStep, lastLoss, checkpoints: saved, skippedImages: data.skipped() };
  } finally {
    (logsWriter as TensorBoardWriter | null)?.close();
    await opened?.close();
    for (const x of owned.reverse()) x.dispose();
  }
}
