// runTraining: the loop of diffusers' train_text_to_image_lora.py over the tested parts — models
// (fromPretrained), LoRA (attachLora), data (imagefolder + sharp transforms), the step (loraTrainingStep,
// Accumulator), checkpoints with exact resume, and the final pytorch_lora_weights.safetensors.
import { native } from '../native.js';
import { AutoencoderKL } from '../models/autoencoder_kl.js';
import { CLIPTextModel } from '../models/clip_text_model.js';
import { CLIPTokenizer } from '../models/clip_tokenizer.js';
import { UNet2DConditionModel } from '../models/unet_2d_condition.js';
import { setMemoryEfficientAttention } from '../models/attention_processor.js';
import type { FromPretrainedOptions } from '../models/loading.js';
import { attachLora } from '../lora/attach.js';
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
import { disposeCheckpoint, ensureWritableDir, loadCheckpoint, pruneCheckpoints, saveCheckpoint } from './checkpoint.js';
import { openTrainData, type TrainData, type TrainDataOptions } from './train_data.js';
import { TensorBoardWriter } from '../logging/tensorboard.js';
import { saveModelCard } from './model_card.js';
import { runValidation } from './validation.js';
import { StableDiffusionPipeline } from '../pipelines/stable_diffusion.js';
import { loadScheduler } from '../schedulers/scheduler.js';
import { saveLossPlot, type LossPoint } from './loss_plot.js';
import { appendFileSync, existsSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';

/** The flags of train_text_to_image_lora.py that the loop uses, camelCased (lib/cli/train_args.ts). */
export interface TrainOptions extends TrainDataOptions {
  pretrainedModelNameOrPath: string;
  revision?: string | null;
  variant?: string | null;
  cacheDir?: string | null;
  rank?: number;
  numTrainEpochs?: number;
  maxTrainSteps?: number | null;
  gradientAccumulationSteps?: number;
  gradientCheckpointing?: boolean;
  /** Memory-efficient attention in the UNet (the script's xformers flag): see setMemoryEfficientAttention. */
  enableXformersMemoryEfficientAttention?: boolean;
  learningRate?: number;
  scaleLr?: boolean;
  lrScheduler?: string;
  lrWarmupSteps?: number;
  adamBeta1?: number;
  adamBeta2?: number;
  adamWeightDecay?: number;
  adamEpsilon?: number;
  maxGradNorm?: number | null;
  allowTf32?: boolean;
  snrGamma?: number | null;
  predictionType?: string | null;
  noiseOffset?: number;
  mixedPrecision?: MixedPrecision | null;
  outputDir?: string;
  checkpointingSteps?: number;
  checkpointsTotalLimit?: number | null;
  resumeFromCheckpoint?: string | null;
  /** Validation as the script's log_validation: images of this prompt every `validationEpochs` epochs and after training. */
  validationPrompt?: string | null;
  numValidationImages?: number;
  validationEpochs?: number;
  /** 'tensorboard' writes event files (train_loss, lr) under outputDir/loggingDir; null: no logs. */
  reportTo?: string | null;
  loggingDir?: string;
  /** 'cpu' or 'cuda[:n]'; default CUDA when available. */
  device?: string;
}

export interface TrainProgress { step: number; maxTrainSteps: number; epoch: number; loss: number; lr: number; gradNorm: number | null }
export interface TrainResult { validationImages: string[]; outputFile: string; globalStep: number; lastLoss: number; checkpoints: string[]; skippedImages: { count: number; files: string[] } }

/** Steps arithmetic of the script: optimizer steps per epoch, total steps and epochs. */
export function stepsArithmetic(batchesPerEpoch: number, accumulation: number, numTrainEpochs: number, maxTrainSteps?: number | null) {
  const updateStepsPerEpoch = Math.ceil(batchesPerEpoch / accumulation);
  const maxSteps = maxTrainSteps ?? numTrainEpochs * updateStepsPerEpoch;
  return { updateStepsPerEpoch, maxTrainSteps: maxSteps, numTrainEpochs: Math.ceil(maxSteps / updateStepsPerEpoch) };
}

export async function runTraining(o: TrainOptions, hooks: { onProgress?: (p: TrainProgress) => void; signal?: AbortSignal } = {}): Promise<TrainResult> {
  const device = o.device ?? (native.info().cudaAvailable ? 'cuda:0' : 'cpu');
  const mixedPrecision: MixedPrecision = o.mixedPrecision ?? 'no';
  if (mixedPrecision === 'fp16' && !device.startsWith('cuda')) {
    throw new Error("--mixed_precision=fp16 needs a CUDA GPU: libtorch has no fp16 matmul on CPU; use --mixed_precision=bf16 or no");
  }
  const weightDtype: DType = mixedPrecision === 'fp16' ? 'float16' : mixedPrecision === 'bf16' ? 'bfloat16' : 'float32';
  const outputDir = o.outputDir ?? 'sd-model-finetuned-lora';
  ensureWritableDir(outputDir); // a read-only or full disk fails here, before anything is loaded
  if (o.seed !== null && o.seed !== undefined) manualSeed(o.seed);
  if (o.allowTf32) native.setAllowTF32(true);

  // 1. models: frozen, in the weight dtype; LoRA parameters in fp32 (attached after the cast)
  const load: FromPretrainedOptions = { revision: o.revision ?? undefined, cacheDir: o.cacheDir ?? undefined };
  const model = o.pretrainedModelNameOrPath;
  const tokenizer = CLIPTokenizer.fromPretrained(model, { ...load, subfolder: 'tokenizer' });
  const scheduler = DDPMScheduler.fromPretrained(model, { ...load, subfolder: 'scheduler' });
  const textEncoder = CLIPTextModel.fromPretrained(model, { ...load, subfolder: 'text_encoder', dtype: weightDtype, device });
  const vae = AutoencoderKL.fromPretrained(model, { ...load, subfolder: 'vae', variant: o.variant ?? undefined, dtype: weightDtype, device });
  const unet = UNet2DConditionModel.fromPretrained(model, { ...load, subfolder: 'unet', variant: o.variant ?? undefined, dtype: weightDtype, device });
  const rank = o.rank ?? 4;
  const lora = attachLora(unet, { rank, alpha: rank, init: 'gaussian' });
  unet.train();
  if (o.gradientCheckpointing) unet.enableGradientCheckpointing();
  if (o.enableXformersMemoryEfficientAttention) setMemoryEfficientAttention(unet);
  const params = lora.parameters();

  // 2. data and steps arithmetic
  const data: TrainData = await openTrainData(o, { tokenizer, device });
  const accumulation = o.gradientAccumulationSteps ?? 1;
  const batchSize = o.trainBatchSize ?? 16;
  const steps = stepsArithmetic(data.batchesPerEpoch, accumulation, o.numTrainEpochs ?? 100, o.maxTrainSteps);

  // 3. optimisation
  const baseLr = (o.learningRate ?? 1e-4) * (o.scaleLr ? accumulation * batchSize : 1);
  const optimizer = new AdamW(params, {
    lr: baseLr, betas: [o.adamBeta1 ?? 0.9, o.adamBeta2 ?? 0.999], weightDecay: o.adamWeightDecay ?? 1e-2, eps: o.adamEpsilon ?? 1e-8,
  });
  const scaler = mixedPrecision === 'fp16' ? new GradScaler() : null;
  const accumulator = new Accumulator({
    optimizer, params, scaler, maxGradNorm: o.maxGradNorm === undefined ? 1.0 : o.maxGradNorm, accumulationSteps: accumulation,
    lrScheduler: o.lrScheduler ?? 'constant',
    lrOptions: { baseLr, warmupSteps: o.lrWarmupSteps ?? 500, totalSteps: steps.maxTrainSteps },
  });

  const saved: string[] = [];
  const generators = () => [defaultGenerator('cpu'), ...(device.startsWith('cuda') ? [defaultGenerator(device)] : [])];
  const checkpointNow = () => {
    const tensors = new Map<string, Tensor>();
    const opt = optimizer.stateDict();
    for (const [k, t] of opt.tensors) tensors.set(`optimizer.${k}`, t);
    for (const [n, p] of lora.namedParameters()) tensors.set(`lora.${n}`, p);
    const rng = generators().map((g) => g.getState());
    rng.forEach((s, i) => tensors.set(`rng.${i}`, s));
    try {
      saved.push(saveCheckpoint(outputDir, accumulator.state.globalStep, {
        tensors,
        state: { accumulator: accumulator.state, optimizer: opt.meta, scaler: scaler?.stateDict() ?? null, data: data.state(), epoch },
      }, (dir) => saveLoraWeights(dir, unet)));
    } catch (e) {
      throw new Error(`${(e as Error).message}${saved.length ? `; the last checkpoint is ${saved[saved.length - 1]}` : ''}`);
    } finally {
      dispose(rng);
    }
    pruneCheckpoints(outputDir, o.checkpointsTotalLimit); // after the save: a failed save loses no older checkpoint
  };

  // 4. resume: every piece of state restored, so the run continues as if never stopped
  let epoch = 0;
  if (o.resumeFromCheckpoint) {
    const { contents } = loadCheckpoint(outputDir, o.resumeFromCheckpoint);
    try {
      setPeftModelStateDict(unet, contents.tensors, { keyPrefix: 'lora.' }); // the trained adapter, checked before any copy
      const optTensors = new Map([...contents.tensors].filter(([k]) => k.startsWith('optimizer.')).map(([k, t]) => [k.slice('optimizer.'.length), t]));
      optimizer.loadStateDict({ tensors: optTensors, meta: contents.state.optimizer as { steps: number[]; lr: number } });
      Object.assign(accumulator.state, contents.state.accumulator);
      optimizer.lr = accumulator.lr;
      if (scaler && contents.state.scaler) scaler.loadStateDict(contents.state.scaler as { scale: number; growthTracker: number });
      data.restore(contents.state.data);
      epoch = contents.state.epoch as number;
      trimMetrics(join(outputDir, 'metrics.jsonl'), accumulator.state.globalStep);
      generators().forEach((g, i) => g.setState(need(contents.tensors, `rng.${i}`)));
    } finally {
      disposeCheckpoint(contents);
    }
  }

  // 5. the loop; train_loss is the mean over the accumulation window, logged per optimizer step as the script
  const logs = (o.reportTo ?? 'tensorboard') === 'tensorboard' ? new TensorBoardWriter(join(outputDir, o.loggingDir ?? 'logs')) : null;
  const metricsFile = join(outputDir, 'metrics.jsonl');
  const lastCheckpoint = () => (saved.length ? `; the last checkpoint is ${saved[saved.length - 1]}` : '');
  // a log write that fails (full disk) names its file and where the run can be resumed from
  const logged = (file: string | undefined, write: () => void) => {
    try { write(); } catch (e) { throw new Error(`cannot write ${file ?? 'the logs'}: ${(e as Error).message}${lastCheckpoint()}`); }
  };
  let lastLoss = NaN;
  let trainLoss = 0;
  // the last epoch that ran, as Python's loop variable after `for epoch in range(...)` (the final images' step)
  let lastEpoch = epoch;
  try {
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
          accumulationSteps: accumulation, mixedPrecision, scaler, noiseOffset: o.noiseOffset ?? 0,
          snrGamma: o.snrGamma ?? null, predictionType: o.predictionType ?? null,
        }));
        dispose([batch.pixelValues, batch.inputIds]);
        if (!Number.isFinite(loss)) {
          throw new Error(`loss is ${loss} at step ${accumulator.state.globalStep + 1} (epoch ${epoch}); nothing more was saved${lastCheckpoint()}`);
        }
        lastLoss = loss;
        trainLoss += loss / accumulation;
        const r = accumulator.afterBackward();
        if (!r) continue;
        logged(logs?.path, () => logs?.addScalar('train_loss', trainLoss, accumulator.state.globalStep));
        // one JSON line per optimizer step: easy to plot or grep, and appended across resumes
        const line = `${JSON.stringify({ step: accumulator.state.globalStep, epoch, loss: trainLoss, lr: r.lr, grad_norm: r.gradNorm, skipped: !r.stepped, time: Date.now() / 1000 })}\n`;
        logged(metricsFile, () => appendFileSync(metricsFile, line));
        logged(logs?.path, () => logs?.addScalar('lr', r.lr, accumulator.state.globalStep));
        trainLoss = 0;
        hooks.onProgress?.({ step: accumulator.state.globalStep, maxTrainSteps: steps.maxTrainSteps, epoch, loss, lr: r.lr, gradNorm: r.gradNorm });
        if (o.checkpointingSteps && accumulator.state.globalStep % o.checkpointingSteps === 0) checkpointNow();
      }
      if (o.validationPrompt && epoch % (o.validationEpochs ?? 1) === 0) {
        // the current LoRA, in the training models themselves (the script wraps the same unet in a pipeline)
        const sampler = loadScheduler(model, { ...load, subfolder: 'scheduler' });
        try {
          await runValidation({ unet, vae, textEncoder, tokenizer, scheduler: sampler }, {
            prompt: o.validationPrompt, numImages: o.numValidationImages ?? 4, seed: o.seed, phase: 'validation', epoch,
            dir: join(outputDir, 'validation', `epoch-${epoch}`), logs,
          });
        } finally {
          sampler.dispose();
        }
      }
      if (accumulator.state.globalStep < steps.maxTrainSteps) data.nextEpoch();
    }
    // 6. the result, in diffusers' format
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
          prompt: o.validationPrompt, numImages: o.numValidationImages ?? 4, seed: o.seed, phase: 'test', epoch: lastEpoch, dir: outputDir, logs,
        });
      } finally {
        pipe.dispose();
      }
    }
    saveModelCard(outputDir, {
      baseModel: o.pretrainedModelNameOrPath, dataset: o.datasetName ?? o.trainDataDir ?? '', rank, steps: accumulator.state.globalStep,
      learningRate: baseLr, resolution: o.resolution ?? 512, validationPrompt: o.validationPrompt ?? null,
      images: validationImages.map((p) => basename(p)),
    });
    await saveLossPlot(join(outputDir, 'loss.png'), readMetrics(metricsFile));
    return { validationImages, outputFile, globalStep: accumulator.state.globalStep, lastLoss, checkpoints: saved, skippedImages: data.skipped() };
  } finally {
    logs?.close();
    await data.close();
    optimizer.dispose();
    for (const m of [unet, vae, textEncoder]) m.dispose();
    scheduler.dispose();
  }
}

/** The loss curve from metrics.jsonl (which spans resumed runs; a line cut short by a crash is left out). */
function readMetrics(file: string): LossPoint[] {
  if (!existsSync(file)) return [];
  return readFileSync(file, 'utf8').split('\n').filter(Boolean).flatMap((l) => { try { return [JSON.parse(l) as LossPoint]; } catch { return []; } });
}

/** On resume: drops the lines of steps after the checkpoint (a killed run logged them; they are redone). */
function trimMetrics(file: string, globalStep: number): void {
  if (!existsSync(file)) return;
  const kept = readMetrics(file).filter((m) => m.step <= globalStep);
  writeFileSync(`${file}.tmp-${process.pid}`, kept.map((m) => `${JSON.stringify(m)}\n`).join(''));
  renameSync(`${file}.tmp-${process.pid}`, file);
}

function need(m: Map<string, Tensor>, k: string): Tensor {
  const t = m.get(k);
  if (!t) throw new Error(`checkpoint is missing '${k}'`);
  return t;
}

