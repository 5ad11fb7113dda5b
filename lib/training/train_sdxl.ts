// runSdxlTraining: diffusers' examples/text_to_image/train_text_to_image_lora_sdxl.py (0.31) as a TrainerSpec for
// the shared skeleton (trainer.ts: logs, resume, optimization with real clipping, checkpoints, the loop, the saved
// file). Its parts: the SDXL models with LoRA on the UNet and, with --train_text_encoder, on both text encoders
// (sdxl_models.ts); captioned images with their original size and crop offset, flipped before cropping as the
// script (train_data.ts); the step (step.ts with sdxl_step.ts's conditioning and time ids); validation with an
// SDXL pipeline of the training models (the pipeline's 50 steps), and at the end from the saved file.
import { basename, join } from 'node:path';
import { AutoencoderKL } from '../models/autoencoder_kl.js';
import { StableDiffusionXLPipeline, encodeSdxlIds } from '../pipelines/stable_diffusion_xl.js';
import { loadScheduler } from '../schedulers/scheduler.js';
import { dispose, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import type { UNet2DConditionModel } from '../models/unet_2d_condition.js';
import { resolveCacheOptions } from './cache_options.js';
import { latentCaching, textCaching } from './cache_run.js';
import { saveModelCard } from './model_card.js';
import { loadSdxlTrainingModels, type SdxlTrainingModels } from './sdxl_models.js';
import { resolveSdxlTrainOptions, validateSdxlTrainOptions, type ResolvedSdxlTrainOptions, type SdxlTrainOptions } from './sdxl_options.js';
import { sdxlCondition, sdxlTimeIds, type SdxlPromptBatch } from './sdxl_step.js';
import { drawStepInputs, eachItem, encodeLatents, loraTrainingStep, lossAndBackward, sampleLatentDist, type Conditioning } from './step.js';
import { stepInputs, type GraphableStep } from './graphed_step.js';
import { openCaptionedImages } from './train_data.js';
import { runTrainer, type TrainerContext, type TrainerSpec, type TrainHooksInternal, type TrainResult } from './trainer.js';
import { runPipelineValidation, type ValidationOptions } from './validation.js';

export type { SdxlTrainOptions };

export { KOHYA_WEIGHT_NAME } from './trainer.js';

/** The pipeline's default steps, which the script's log_validation uses (it passes none). */
const VALIDATION_STEPS = 50;

/** One SDXL micro-batch: the images, both tokenizers' ids, the time ids, and the image files (--debug_loss). */
type SdxlBatch = Partial<Omit<SdxlPromptBatch, 'timeIds'>> & Pick<SdxlPromptBatch, 'timeIds'> & {
  pixelValues?: Tensor; latentDist?: Tensor;
  /** --cache_text_embeddings: the kept prompt embeddings [B, 77, D1 + D2] and pooled embeddings [B, D2], instead of the ids. */
  embeds?: Tensor; pooled?: Tensor;
  files: string[];
};

/**
 * Trains an SDXL LoRA as the script's main(): options checked and resolved, then the shared skeleton runs the
 * SDXL spec. A run that fails before writing anything leaves no folder it created.
 */
export async function runSdxlTraining(options: SdxlTrainOptions, hooks: TrainHooksInternal = {}): Promise<TrainResult> {
  validateSdxlTrainOptions(options);
  const o = resolveSdxlTrainOptions(options);
  return runTrainer(o, hooks, (ctx) => sdxlSpec(o, ctx, hooks), { command: 'difflora train-sdxl', dataParallel: false });
}

async function sdxlSpec(o: ResolvedSdxlTrainOptions, ctx: TrainerContext, hooks: TrainHooksInternal): Promise<TrainerSpec<SdxlBatch>> {
  const models = loadSdxlTrainingModels(o, ctx.device, ctx.weightDtype, ctx.own);
  const { unet, vae, textEncoder, textEncoder2, tokenizer, tokenizer2 } = models;
  // the script resizes with BILINEAR (no --image_interpolation_mode) and flips before cropping
  const cacheOptions = resolveCacheOptions(o);
  const keep = o.validationPrompt !== null; // epoch validation decodes with the VAE and encodes the prompt
  const caching = latentCaching(cacheOptions, vae, { device: ctx.device, fallbackDir: join(o.outputDir, 'latent_cache'), onNotice: hooks.onNotice, signal: hooks.signal, keepVae: keep });
  // --cache_text_embeddings: both encoders' penultimate hidden states (concatenated) and the pooled embedding, per caption
  const textCache = textCaching(cacheOptions, [textEncoder, textEncoder2], (caption) => {
    const { embeds, pooled } = encodeSdxlIds(textEncoder, textEncoder2, tokenizer.inputIdsTensor([caption], { device: ctx.device }), tokenizer2.inputIdsTensor([caption], { device: ctx.device }));
    return [embeds, pooled];
  }, { device: ctx.device, onNotice: hooks.onNotice, signal: hooks.signal, keepEncoders: keep, vae: caching.vae });
  const cached = textCache.cache;
  if (cached) ctx.own(cached);
  const data = await openCaptionedImages({ ...o, imageInterpolationMode: 'bilinear' }, {
    device: ctx.device,
    flipBeforeCrop: true,
    onNotice: hooks.onNotice,
    latentCache: caching.source,
    cacheCaptions: cached ? (captions) => textCache.fill(captions) : undefined,
    collate: (b, images) => ({
      ...images,
      ...(cached ? { embeds: cached.gather(b.captions, 0), pooled: cached.gather(b.captions, 1) } : {
        inputIds: tokenizer.inputIdsTensor(b.captions, { device: ctx.device }),
        inputIds2: tokenizer2.inputIdsTensor(b.captions, { device: ctx.device }),
      }),
      timeIds: sdxlTimeIds(b.originalSizes, b.cropTopLeft, b.targetSizes, { dtype: ctx.weightDtype, device: ctx.device }),
      files: b.imagePaths.map((p) => basename(p)),
    }),
  });
  const validation = (prompt: string, phase: 'validation' | 'test', epoch: number, dir: string): ValidationOptions => ({
    // the script seeds its generator only when --seed is given and not 0 (`if args.seed`)
    prompt, numImages: o.numValidationImages, seed: o.seed || null, phase, epoch, dir, logs: ctx.logs.tensorboard(), onEvent: hooks.onValidation,
    numInferenceSteps: VALIDATION_STEPS,
  });
  return {
    lora: models.lora,
    sgmLayersPerBlock: () => uniformLayersPerBlock(unet), // Kohya's SDXL files name the UNet's layers in SGM blocks
    data,
    microStep: (batch) => {
      try {
        return tidy(() => sdxlMicroStep(o, models, ctx, batch));
      } finally {
        dispose([batch.pixelValues, batch.latentDist, batch.inputIds, batch.inputIds2, batch.embeds, batch.pooled, batch.timeIds]);
      }
    },
    graphable: sdxlGraphable(o, models, ctx),
    validate: async (epoch) => {
      if (o.validationPrompt === null) return;
      // the script's pipeline of the training models (vae, both text encoders, the UNet) with the model's scheduler
      const scheduler = loadScheduler(o.pretrainedModelNameOrPath, { ...models.load, subfolder: 'scheduler' });
      try {
        const pipe = new StableDiffusionXLPipeline({ vae, textEncoder, textEncoder2, tokenizer, tokenizer2, unet, scheduler, forceZerosForEmptyPrompt: models.forceZerosForEmptyPrompt });
        const prompt = o.validationPrompt;
        await textCache.use(() => runPipelineValidation(pipe, validation(prompt, 'validation', epoch, join(o.outputDir, 'validation', `epoch-${epoch}`))));
      } finally {
        scheduler.dispose();
      }
    },
    finish: async ({ outputDir, lastEpoch, globalStep, baseLr }) => {
      const images = o.validationPrompt === null || o.numValidationImages === 0 ? [] : await finalValidation(o, models, ctx, validation(o.validationPrompt, 'test', lastEpoch, outputDir));
      saveModelCard(outputDir, {
        baseModel: o.pretrainedModelNameOrPath, dataset: o.datasetName ?? o.trainDataDir ?? '', rank: o.rank, steps: globalStep, learningRate: baseLr,
        resolution: o.resolution, validationPrompt: o.validationPrompt, images: images.map((p) => basename(p)),
        sdxl: { trainTextEncoder: o.trainTextEncoder, vaePath: o.pretrainedVaeModelNameOrPath },
      });
      return images;
    },
  };
}

/**
 * The script's loop body: latents from the VAE (float32 unless a VAE was given apart) cast to the weight dtype,
 * then step.ts's step with the SDXL conditioning; --debug_loss logs the loss per image file at the global step.
 */
function sdxlMicroStep(o: ResolvedSdxlTrainOptions, models: SdxlTrainingModels, ctx: TrainerContext, batch: SdxlBatch): number {
  const latents = (batch.latentDist ? sampleLatentDist(batch.latentDist, models.vae.scalingFactor) : encodeLatents(models.vae, batch.pixelValues!)).to(ctx.weightDtype);
  const loss = loraTrainingStep({
    unet: models.unet, scheduler: models.noiseScheduler, batch: { latents }, trainTextEncoder: o.trainTextEncoder,
    condition: conditionOf(models, batch, o.trainTextEncoder), accumulationSteps: o.gradientAccumulationSteps,
    mixedPrecision: o.mixedPrecision, scaler: ctx.scaler(), noiseOffset: o.noiseOffset, snrGamma: o.snrGamma, predictionType: o.predictionType,
  });
  if (o.debugLoss) {
    const tb = ctx.logs.tensorboard();
    for (const f of batch.files) tb?.addScalar(`loss_for_${f}`, loss, ctx.globalStep());
  }
  return loss;
}

/**
 * The loop body split for --cuda_graphs: the batch's tensors and the draws sdxlMicroStep makes (the default generators:
 * the VAE's ε in the VAE's dtype, then noise and timesteps like the latents cast to the weight dtype), then the step on them.
 */
function sdxlGraphable(o: ResolvedSdxlTrainOptions, models: SdxlTrainingModels, ctx: TrainerContext): GraphableStep<SdxlBatch> {
  return {
    inputs: (batch) => {
      const { files: _files, ...tensors } = batch;
      return stepInputs(tensors, () => drawStepInputs({ batch, vae: models.vae, scheduler: models.noiseScheduler, noiseOffset: o.noiseOffset }, ctx.device, { latentsDtype: ctx.weightDtype }));
    },
    lossAndBackward: (t, lossScale) => {
      const sampled = t.latentDist ? sampleLatentDist(t.latentDist, models.vae.scalingFactor, undefined, t.latentNoise) : encodeLatents(models.vae, t.pixelValues!, undefined, t.latentNoise);
      const batch: SdxlBatch = { inputIds: t.inputIds, inputIds2: t.inputIds2, embeds: t.embeds, pooled: t.pooled, timeIds: t.timeIds!, files: [] };
      return lossAndBackward({
        unet: models.unet, scheduler: models.noiseScheduler, batch: { latents: sampled.to(ctx.weightDtype) }, trainTextEncoder: o.trainTextEncoder,
        condition: conditionOf(models, batch, o.trainTextEncoder), noise: t.noise, timesteps: t.timesteps, accumulationSteps: 1, lossScale,
        mixedPrecision: o.mixedPrecision, scaler: ctx.scaler(), snrGamma: o.snrGamma, predictionType: o.predictionType,
      });
    },
    onLoss: (loss, batch) => {
      if (!o.debugLoss) return;
      const tb = ctx.logs.tensorboard();
      for (const f of batch.files) tb?.addScalar(`loss_for_${f}`, loss, ctx.globalStep());
    },
  };
}

/** The batch's SDXL conditioning: from the kept embeddings (--cache_text_embeddings) or both text encoders. */
function conditionOf(models: SdxlTrainingModels, batch: SdxlBatch, trainTextEncoder: boolean): () => Conditioning {
  const { embeds, pooled, inputIds, inputIds2, timeIds } = batch;
  if (embeds && pooled) return () => ({ encoderHiddenStates: embeds, addedCond: { timeIds, textEmbeds: pooled } });
  if (!inputIds || !inputIds2) throw new Error('internal: an SDXL batch needs token ids or cached embeddings');
  if (trainTextEncoder) return sdxlCondition(models.textEncoder, models.textEncoder2, { inputIds, inputIds2, timeIds });
  // frozen: on the CPU each caption alone (step.ts's eachItem), as --cache_text_embeddings encodes it; on a GPU batched
  return () => {
    const n = inputIds.shape[0] ?? 0;
    const device = inputIds.device;
    const rows = device === 'cpu' && n > 1
      ? Array.from({ length: n }, (_, i) => encodeSdxlIds(models.textEncoder, models.textEncoder2, inputIds.narrow(0, i, 1), inputIds2.narrow(0, i, 1)))
      : [encodeSdxlIds(models.textEncoder, models.textEncoder2, inputIds, inputIds2)];
    const part = (key: 'embeds' | 'pooled') => (rows.length === 1 ? rows[0]![key] : eachItem(n, (i) => rows[i]![key], device));
    return { encoderHiddenStates: part('embeds'), addedCond: { timeIds, textEmbeds: part('pooled') } };
  };
}

/**
 * The final inference as the script: the base pipeline loaded afresh in the weight dtype with the training's VAE
 * (float32 unless given apart or fp16), and the saved LoRA file loaded into it.
 */
async function finalValidation(o: ResolvedSdxlTrainOptions, models: SdxlTrainingModels, ctx: TrainerContext, v: ValidationOptions): Promise<string[]> {
  const pipe = StableDiffusionXLPipeline.fromPretrained(o.pretrainedModelNameOrPath, { ...models.load, variant: o.variant ?? undefined, dtype: ctx.weightDtype, device: ctx.device });
  try {
    if (o.pretrainedVaeModelNameOrPath) {
      pipe.vae.dispose();
      pipe.vae = AutoencoderKL.fromPretrained(o.pretrainedVaeModelNameOrPath, { ...models.load, variant: o.variant ?? undefined, dtype: ctx.weightDtype, device: ctx.device });
    } else if (o.mixedPrecision !== 'fp16') {
      pipe.vae.to({ dtype: 'float32' });
    }
    pipe.loadLoraWeights(v.dir);
    if (o.enableXformersMemoryEfficientAttention) pipe.enableMemoryEfficientAttention();
    return await runPipelineValidation(pipe, v);
  } finally {
    pipe.dispose();
  }
}

/** The UNet's layers_per_block, which SGM naming needs the same in every block (as in SDXL). */
function uniformLayersPerBlock(unet: UNet2DConditionModel): number {
  const l = unet.config.layersPerBlock;
  const all = Array.isArray(l) ? l : [l];
  if (all.some((x) => x !== all[0]) || all[0] === undefined) throw new Error(`--export_kohya: the UNet's layers_per_block ${JSON.stringify(l)} differs between blocks; Kohya's SGM names need one value`);
  return all[0];
}
