// runDreamBoothTraining: diffusers' examples/dreambooth/train_dreambooth_lora.py (0.31) as a TrainerSpec for the
// shared skeleton (trainer.ts). Its parts: class images generated when prior preservation wants more
// (class_images.ts), the instance/class data (dreambooth_data.ts), LoRA on the UNet and, with
// --train_text_encoder, on the text encoder (trained together, the text encoder's parameters after the UNet's),
// optionally pre-computed prompt embeddings, the prior-preservation step (step.ts), and validation with
// DPM-Solver++ (50 steps during training, 25 at the end from the saved file, as the script's log_validation).
import { basename, join } from 'node:path';
import { noGrad } from '../autograd.js';
import type { CLIPTextModel } from '../models/clip_text_model.js';
import type { CLIPTokenizer } from '../models/clip_tokenizer.js';
import { dispose, keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import { generateClassImages } from './class_images.js';
import { imagesOf, openDreamBoothData, type DreamBoothBatch, type PromptSource } from './dreambooth_data.js';
import {
  dreamBoothWarnings, resolveDreamBoothOptions, validateDreamBoothOptions, type DreamBoothOptions, type ResolvedDreamBoothOptions,
} from './dreambooth_options.js';
import { resolveCacheOptions } from './cache_options.js';
import { ParkedModel, latentCaching } from './cache_run.js';
import type { LoraComponents } from './lora_components.js';
import { saveModelCard } from './model_card.js';
import { DREAMBOOTH_UNET_LORA_TARGETS, attachTextEncoderLora, loadTrainingModels, type TrainingModels } from './models.js';
import { drawStepInputs, loraTrainingStep, lossAndBackward, priorPreservationLossAndBackward, priorPreservationStep, type TrainingStep } from './step.js';
import { stepInputs } from './graphed_step.js';
import { runTrainer, type TrainerContext, type TrainerSpec, type TrainHooksInternal, type TrainResult } from './trainer.js';
import { validateSavedLora, validateTrainingModels, type PretrainedSource } from './validation.js';

export type { DreamBoothOptions };

/** The class-image generation's progress: images in --class_data_dir and wanted, and how many this run generated. */
export interface ClassImagesProgress { done: number; total: number; generated: number }

export interface DreamBoothHooksInternal extends TrainHooksInternal {
  /** After each batch of generated class images (prior preservation with too few in --class_data_dir). */
  onClassImages?: (p: ClassImagesProgress) => void;
}

/** The script's sampler for validation (log_validation: DPMSolverMultistepScheduler.from_config). */
const VALIDATION_SCHEDULER = 'dpmpp_2m';
/** The pipeline's default steps (validation during training) and the final inference's 25. */
const VALIDATION_STEPS = 50;
const FINAL_STEPS = 25;

/**
 * Trains a DreamBooth LoRA as the script's main(): options checked and resolved, the script's warnings told
 * (onNotice), then the shared skeleton runs the DreamBooth spec.
 */
export async function runDreamBoothTraining(options: DreamBoothOptions, hooks: DreamBoothHooksInternal = {}): Promise<TrainResult> {
  validateDreamBoothOptions(options);
  const o = resolveDreamBoothOptions(options);
  for (const w of dreamBoothWarnings(o)) hooks.onNotice?.(w);
  // one process: its class images and data are not shared out over several (runTrainer refuses a group of several)
  return runTrainer(o, hooks, (ctx) => dreamBoothSpec(o, ctx, hooks), { command: 'difflora train-dreambooth', dataParallel: false });
}

async function dreamBoothSpec(o: ResolvedDreamBoothOptions, ctx: TrainerContext, hooks: DreamBoothHooksInternal): Promise<TrainerSpec<DreamBoothBatch>> {
  const load = { revision: o.revision ?? undefined, cacheDir: o.cacheDir ?? undefined };
  imagesOf(o.instanceDataDir, 'Instance images', '--instance_data_dir'); // a missing or empty folder fails before anything loads
  // 1. class images first, as the script (before the training models load)
  const prior = o.withPriorPreservation ? { dir: o.classDataDir!, prompt: o.classPrompt!, numClassImages: o.numClassImages } : null;
  if (prior) {
    await generateClassImages({
      model: o.pretrainedModelNameOrPath, load, variant: o.variant, classDataDir: prior.dir, classPrompt: prior.prompt, numClassImages: o.numClassImages,
      sampleBatchSize: o.sampleBatchSize, precision: o.priorGenerationPrecision, device: ctx.device, seed: o.seed, onProgress: hooks.onClassImages, signal: hooks.signal,
    });
  }
  // 2. models with LoRA: the UNet's, then (--train_text_encoder) the text encoder's, drawn in that order as the script
  const models = loadTrainingModels(o, ctx.device, ctx.weightDtype, ctx.own, { unetTargets: DREAMBOOTH_UNET_LORA_TARGETS, tokenizerName: o.tokenizerName });
  if (o.trainTextEncoder) {
    attachTextEncoderLora(models.textEncoder, o.rank, o);
    if (o.gradientCheckpointing) models.textEncoder.enableGradientCheckpointing(); // as the script
  }
  const lora: LoraComponents = o.trainTextEncoder ? [['unet', models.unet], ['text_encoder', models.textEncoder]] : [['unet', models.unet]];
  // 3. the data, with the prompts as token ids or as embeddings encoded once
  // --cache_text_embeddings: the same embeddings encoded once, then the text encoder off the device
  const cacheOptions = resolveCacheOptions(o);
  const prompts = o.preComputeTextEmbeddings || cacheOptions.cacheTextEmbeddings ? precomputedPrompts(o, models, ctx) : { kind: 'tokens' as const, tokenizer: models.tokenizer };
  const caching = latentCaching(cacheOptions, models.vae, { device: ctx.device, fallbackDir: join(o.outputDir, 'latent_cache'), onNotice: hooks.onNotice, signal: hooks.signal, keepVae: o.validationPrompt !== null });
  const textEncoder = new ParkedModel(models.textEncoder, ctx.device);
  if (cacheOptions.cacheTextEmbeddings) textEncoder.park(o.validationPrompt !== null);
  const data = await openDreamBoothData({
    instanceDataDir: o.instanceDataDir, instancePrompt: o.instancePrompt, prior, resolution: o.resolution, centerCrop: o.centerCrop,
    trainBatchSize: o.trainBatchSize, dataloaderNumWorkers: o.dataloaderNumWorkers, seed: o.seed, tokenizerMaxLength: o.tokenizerMaxLength,
    useAttentionMask: o.textEncoderUseAttentionMask, features: o, onNotice: hooks.onNotice,
  }, prompts, ctx.device, caching.source);
  const source: PretrainedSource = { model: o.pretrainedModelNameOrPath, load: models.load, scheduler: VALIDATION_SCHEDULER };
  const validation = (prompt: string, phase: 'validation' | 'test', epoch: number, dir: string, numInferenceSteps: number) => ({
    prompt, numImages: o.numValidationImages, seed: o.seed, phase, epoch, dir, logs: ctx.logs.tensorboard(), onEvent: hooks.onValidation, numInferenceSteps,
  });
  return {
    lora,
    data,
    microStep: (batch) => {
      try {
        return tidy(() => dreamBoothMicroStep(o, models, ctx, batch));
      } finally {
        dispose(batch);
      }
    },
    graphable: {
      // the batch and the draws the step would make (the default generators, in its order), then the step on them
      inputs: (batch) => stepInputs({ ...batch }, () => drawStepInputs({ batch, vae: models.vae, scheduler: models.noiseScheduler }, ctx.device)),
      lossAndBackward: (t, lossScale) => {
        const step: TrainingStep = {
          ...dreamBoothStep(o, models, ctx, { pixelValues: t.pixelValues, latentDist: t.latentDist, inputIds: t.inputIds, attentionMask: t.attentionMask, encoderHiddenStates: t.encoderHiddenStates }),
          noise: t.noise, timesteps: t.timesteps, latentNoise: t.latentNoise, lossScale,
        };
        return o.withPriorPreservation ? priorPreservationLossAndBackward({ ...step, priorLossWeight: o.priorLossWeight }) : lossAndBackward(step);
      },
    },
    validate: async (epoch) => {
      if (o.validationPrompt === null) return;
      const dir = join(o.outputDir, 'validation', `epoch-${epoch}`);
      const prompt = o.validationPrompt;
      await caching.vae.use(() => textEncoder.use(() => validateTrainingModels(models, source, validation(prompt, 'validation', epoch, dir, VALIDATION_STEPS))));
    },
    finish: async ({ outputDir, lastEpoch, globalStep, baseLr }) => {
      const images = o.validationPrompt === null || o.numValidationImages === 0 ? [] : await validateSavedLora(
        { ...source, variant: o.variant, dtype: ctx.weightDtype, device: ctx.device, memoryEfficientAttention: o.enableXformersMemoryEfficientAttention },
        outputDir, validation(o.validationPrompt, 'test', lastEpoch, outputDir, FINAL_STEPS));
      saveModelCard(outputDir, {
        baseModel: o.pretrainedModelNameOrPath, dataset: o.instanceDataDir, rank: o.rank, steps: globalStep, learningRate: baseLr, resolution: o.resolution,
        validationPrompt: o.validationPrompt, images: images.map((p) => basename(p)),
        dreambooth: { instancePrompt: o.instancePrompt, trainTextEncoder: o.trainTextEncoder },
      });
      return images;
    },
  };
}

/** The script's loop body: prior preservation splits the batch in instance and class halves; without it, plain MSE. */
function dreamBoothMicroStep(o: ResolvedDreamBoothOptions, models: TrainingModels, ctx: TrainerContext, batch: DreamBoothBatch): number {
  const step = dreamBoothStep(o, models, ctx, batch);
  return o.withPriorPreservation ? priorPreservationStep({ ...step, priorLossWeight: o.priorLossWeight }).loss : loraTrainingStep(step);
}

/** The step's models and settings for a batch (its draws from the default generators). */
function dreamBoothStep(o: ResolvedDreamBoothOptions, models: TrainingModels, ctx: TrainerContext, batch: DreamBoothBatch): TrainingStep {
  return {
    unet: models.unet, vae: models.vae, scalingFactor: models.vae.scalingFactor, textEncoder: models.textEncoder, trainTextEncoder: o.trainTextEncoder, scheduler: models.noiseScheduler,
    batch, accumulationSteps: o.gradientAccumulationSteps, mixedPrecision: o.mixedPrecision, scaler: ctx.scaler(),
  };
}

/** --pre_compute_text_embeddings: the instance and class prompts encoded once by the frozen text encoder. */
function precomputedPrompts(o: ResolvedDreamBoothOptions, models: TrainingModels, ctx: TrainerContext): PromptSource {
  const encode = (prompt: string): Tensor => ctx.own(keep(encodePrompt(models.tokenizer, models.textEncoder, prompt, o)));
  return { kind: 'embeddings', instance: encode(o.instancePrompt), class: o.classPrompt === null ? null : encode(o.classPrompt) };
}

/** The script's tokenize_prompt + encode_prompt for one prompt: last_hidden_state [1, L, D], without gradients. */
function encodePrompt(tokenizer: CLIPTokenizer, textEncoder: CLIPTextModel, prompt: string, o: ResolvedDreamBoothOptions): Tensor {
  return noGrad(() => tidy(() => {
    const device = textEncoder.parameters()[0]?.device;
    const enc = tokenizer.call([prompt], { maxLength: o.tokenizerMaxLength ?? undefined, padding: 'max_length', truncation: true });
    const ids = tokenizer.toTensor(enc.inputIds, device);
    const attentionMask = o.textEncoderUseAttentionMask ? tokenizer.toTensor(enc.attentionMask, device) : undefined;
    return textEncoder.forward(ids, { attentionMask }).lastHiddenState;
  }));
}
