// runTraining: the loop of diffusers' train_text_to_image_lora.py as a TrainerSpec for the shared trainer
// skeleton (trainer.ts: logs, resume, optimization, checkpoints, the loop, the saved file): the options
// resolved (options.ts), the models with the LoRA attached (models.ts), the data (train_data.ts), the micro-step
// (step.ts's loraTrainingStep), validation (validation.ts), and at the end the final images and the model card.
import { basename, join } from 'node:path';
import { dispose, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import { resolveCacheOptions } from './cache_options.js';
import { latentCaching, textCaching } from './cache_run.js';
import { saveModelCard } from './model_card.js';
import { loadTrainingModels } from './models.js';
import { resolveTrainOptions, validateTrainOptions, type ResolvedTrainOptions, type TrainOptions } from './options.js';
import type { SampleKey } from './sample_rng.js';
import { drawStepInputs, loraTrainingStep, lossAndBackward } from './step.js';
import { stepInputs } from './graphed_step.js';
import { openTrainData } from './train_data.js';
import { runTrainer, type TrainerContext, type TrainerSpec, type TrainHooksInternal, type TrainResult } from './trainer.js';
import { validateSavedLora, validateTrainingModels } from './validation.js';

export type { TrainOptions };
export { stepsArithmetic, type TrainHooksInternal, type TrainProgress, type TrainResult } from './trainer.js';

/**
 * Trains a LoRA as the script's main(): options checked (validateTrainOptions) and resolved, then the shared
 * skeleton (trainer.ts) runs the text-to-image spec. A run that fails before writing anything leaves no folder it created.
 */
export async function runTraining(options: TrainOptions, hooks: TrainHooksInternal = {}): Promise<TrainResult> {
  validateTrainOptions(options);
  const o = resolveTrainOptions(options);
  return runTrainer(o, hooks, (ctx) => textToImageSpec(o, ctx, hooks), { command: 'difflora train', dataParallel: true });
}

type TextToImageBatch = { pixelValues?: Tensor; latentDist?: Tensor; inputIds?: Tensor; encoderHiddenStates?: Tensor; keys: SampleKey[] };

/** train_text_to_image_lora.py's parts: UNet LoRA, captioned images, the plain diffusion loss, 30-step validation. */
async function textToImageSpec(o: ResolvedTrainOptions, ctx: TrainerContext, hooks: TrainHooksInternal): Promise<TrainerSpec<TextToImageBatch>> {
  const models = loadTrainingModels(o, ctx.device, ctx.weightDtype, ctx.own);
  const { unet, vae, textEncoder, tokenizer } = models;
  const cacheOptions = resolveCacheOptions(o);
  const keep = o.validationPrompt !== null; // epoch validation decodes with the VAE and encodes the prompt
  const caching = latentCaching(cacheOptions, vae, { device: ctx.device, fallbackDir: join(o.outputDir, 'latent_cache'), onNotice: hooks.onNotice, signal: hooks.signal, keepVae: keep });
  const textCache = textCaching(cacheOptions, [textEncoder], (caption) => [textEncoder.forward(tokenizer.inputIdsTensor([caption], { device: ctx.device })).lastHiddenState], {
    device: ctx.device, onNotice: hooks.onNotice, signal: hooks.signal, keepEncoders: keep, vae: caching.vae,
  });
  if (textCache.cache) ctx.own(textCache.cache);
  // this process's share of each epoch
  const data = await openTrainData(o, { tokenizer, device: ctx.device, shard: ctx.shard, onNotice: hooks.onNotice, latentCache: caching.source, textCache });
  const source = { model: o.pretrainedModelNameOrPath, load: models.load };
  const validation = (prompt: string, phase: 'validation' | 'test', epoch: number, dir: string) =>
    ({ prompt, numImages: o.numValidationImages, seed: o.seed, phase, epoch, dir, logs: ctx.logs.tensorboard(), onEvent: hooks.onValidation });
  return {
    lora: [['unet', unet]],
    data,
    microStep: (batch) => {
      try {
        return tidy(() => loraTrainingStep({
          unet, vae, scalingFactor: vae.scalingFactor, textEncoder, scheduler: models.noiseScheduler, batch, accumulationSteps: o.gradientAccumulationSteps, generator: ctx.sampleDraws(batch.keys),
          mixedPrecision: o.mixedPrecision, scaler: ctx.scaler(), noiseOffset: o.noiseOffset, snrGamma: o.snrGamma, predictionType: o.predictionType,
        }));
      } finally {
        dispose([batch.pixelValues, batch.latentDist, batch.inputIds, batch.encoderHiddenStates]);
      }
    },
    graphable: {
      // the batch and the draws loraTrainingStep would make (same generators, same order), then the step on them
      inputs: (batch) => stepInputs(
        { pixelValues: batch.pixelValues, latentDist: batch.latentDist, inputIds: batch.inputIds, encoderHiddenStates: batch.encoderHiddenStates },
        () => drawStepInputs({ batch, vae, scheduler: models.noiseScheduler, generator: ctx.sampleDraws(batch.keys), noiseOffset: o.noiseOffset }, ctx.device),
      ),
      lossAndBackward: (t, lossScale) => lossAndBackward({
        unet, vae, scalingFactor: vae.scalingFactor, textEncoder, scheduler: models.noiseScheduler,
        batch: { pixelValues: t.pixelValues, latentDist: t.latentDist, inputIds: t.inputIds, encoderHiddenStates: t.encoderHiddenStates },
        noise: t.noise, timesteps: t.timesteps, latentNoise: t.latentNoise, accumulationSteps: 1, mixedPrecision: o.mixedPrecision, scaler: ctx.scaler(), lossScale,
        snrGamma: o.snrGamma, predictionType: o.predictionType,
      }),
    },
    validate: async (epoch) => {
      const prompt = o.validationPrompt;
      if (prompt === null) return;
      await textCache.use(() => validateTrainingModels({ unet, vae, textEncoder, tokenizer }, source, validation(prompt, 'validation', epoch, join(o.outputDir, 'validation', `epoch-${epoch}`))));
    },
    finish: async ({ outputDir, lastEpoch, globalStep, baseLr }) => {
      // final inference as the script: the base pipeline loaded afresh, with the saved file through loadLoraWeights
      const images = o.validationPrompt === null ? [] : await validateSavedLora(
        { ...source, variant: o.variant, dtype: ctx.weightDtype, device: ctx.device, memoryEfficientAttention: o.enableXformersMemoryEfficientAttention },
        outputDir, validation(o.validationPrompt, 'test', lastEpoch, outputDir));
      saveModelCard(outputDir, {
        baseModel: o.pretrainedModelNameOrPath, dataset: o.datasetName ?? o.trainDataDir ?? '', rank: o.rank, steps: globalStep,
        learningRate: baseLr, resolution: o.resolution, validationPrompt: o.validationPrompt, images: images.map((p) => basename(p)),
      });
      return images;
    },
  };
}
