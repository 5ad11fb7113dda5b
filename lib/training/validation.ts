// Validation images during and after training, as the script's log_validation: the current LoRA (or, at the
// end, the saved file loaded into a fresh pipeline) generates `numValidationImages` images of the prompt
// with 30 steps, one generator seeded with --seed drawn across the images, in the models' dtype. Images go to disk (output_dir/validation/…) and to TensorBoard as one grid per call.
//
// The generator is a dedicated one: the training's random streams are untouched, so a run with validation
// trains exactly as one without it, and resuming stays exact.
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import sharp from 'sharp';
import { writeFileAtomic } from '../io/atomic.js';
import type { TensorBoardWriter } from '../logging/tensorboard.js';
import { StableDiffusionPipeline, type StableDiffusionComponents } from '../pipelines/stable_diffusion.js';
import { Generator } from '../random.js';
import type { FromPretrainedOptions } from '../models/loading.js';
import type { UNet2DConditionModel } from '../models/unet_2d_condition.js';
import type { PipelineOutput } from '../pipelines/pipeline_utils.js';
import { loadScheduler } from '../schedulers/scheduler.js';
import type { DType } from '../dtype.js';

/** The script runs its validation pipeline with 30 inference steps. */
export const VALIDATION_INFERENCE_STEPS = 30;

export interface ValidationOptions {
  prompt: string;
  numImages: number;
  seed: number | null | undefined;
  /** 'validation' during training, 'test' for the final run (the script's phase names). */
  phase: 'validation' | 'test';
  /** Epoch (the TensorBoard step of the grid, as the script logs it). */
  epoch: number;
  /** Folder the PNGs are written into. */
  dir: string;
  /** File name stem: `${stem}${i}.png`. */
  stem?: string;
  logs?: TensorBoardWriter | null;
  height?: number;
  width?: number;
  numInferenceSteps?: number;
  /** Hears the run start and end (the CLI prints a line for each). */
  onEvent?: (e: ValidationEvent) => void;
}

/** A validation run starting, or ending with its images and how long it took. */
export type ValidationEvent =
  | { event: 'start'; phase: 'validation' | 'test'; epoch: number; prompt: string; numImages: number; dir: string }
  | { event: 'end'; phase: 'validation' | 'test'; epoch: number; prompt: string; numImages: number; dir: string; images: string[]; seconds: number };

/**
 * Validation runs still to come at `epoch` (its own included): one per epoch left that is a multiple of
 * --validation_epochs, and the final one with the saved LoRA; 0 when validation is off.
 */
export function validationRunsLeft(o: { epoch: number; numTrainEpochs: number; validationEpochs: number; enabled: boolean }): number {
  if (!o.enabled) return 0;
  let n = 1;
  for (let e = o.epoch; e < o.numTrainEpochs; e++) if (e % o.validationEpochs === 0) n++;
  return n;
}

/** Generates, writes and logs the validation images; returns their paths. Does not dispose the models. */
export async function runValidation(components: StableDiffusionComponents, o: ValidationOptions): Promise<string[]> {
  return runPipelineValidation(new StableDiffusionPipeline(components), o);
}

/** A pipeline validation can run (SD 1.x/2.x or SDXL): its UNet, and generate. */
export interface ValidationPipeline {
  unet: UNet2DConditionModel;
  generate(o: { prompt: string; numInferenceSteps: number; generator: Generator; height?: number; width?: number; outputType: 'png' }): Promise<PipelineOutput>;
}

/** runValidation with any pipeline; its UNet is in eval mode for the call. Does not dispose the pipeline. */
export async function runPipelineValidation(pipe: ValidationPipeline, o: ValidationOptions): Promise<string[]> {
  const started = performance.now();
  const about = { phase: o.phase, epoch: o.epoch, prompt: o.prompt, numImages: o.numImages, dir: o.dir };
  o.onEvent?.({ event: 'start', ...about });
  const device = pipe.unet.conv_in.weight.device;
  const generator = new Generator(device.startsWith('cuda') ? device : 'cpu');
  generator.manualSeed(o.seed ?? Math.floor(Math.random() * 2 ** 31));
  const wasTraining = pipe.unet.training;
  pipe.unet.eval();
  const pngs: Buffer[] = [];
  try {
    for (let i = 0; i < o.numImages; i++) {
      const out = await pipe.generate({
        prompt: o.prompt, numInferenceSteps: o.numInferenceSteps ?? VALIDATION_INFERENCE_STEPS, generator, height: o.height, width: o.width, outputType: 'png',
      });
      pngs.push(...(out.images ?? []));
    }
  } finally {
    if (wasTraining) pipe.unet.train();
  }
  mkdirSync(o.dir, { recursive: true });
  const paths = pngs.map((png, i) => {
    const path = join(o.dir, `${o.stem ?? 'image_'}${i}.png`);
    writeFileAtomic(path, png);
    return path;
  });
  if (o.logs && pngs.length) {
    const grid = await imageRow(pngs);
    o.logs.addImagePng(o.phase, grid.png, grid, o.epoch);
  }
  o.onEvent?.({ event: 'end', ...about, images: paths, seconds: (performance.now() - started) / 1000 });
  return paths;
}

/** The images side by side in one PNG (TensorBoard's add_images shows a batch as one grid). */
async function imageRow(pngs: Buffer[]): Promise<{ png: Buffer; height: number; width: number }> {
  const metas = await Promise.all(pngs.map((p) => sharp(p).metadata()));
  const height = Math.max(...metas.map((m) => m.height ?? 0));
  const widths = metas.map((m) => m.width ?? 0);
  const width = widths.reduce((a, b) => a + b, 0);
  let left = 0;
  const png = await sharp({ create: { width, height, channels: 3, background: { r: 0, g: 0, b: 0 } } })
    .composite(pngs.map((input, i) => { const c = { input, left, top: 0 }; left += widths[i] as number; return c; }))
    .png()
    .toBuffer();
  return { png, height, width };
}

/**
 * Where the pretrained model is (its path or Hub id and how it was loaded), for loading more of it; `scheduler`:
 * the sampler validation uses instead of the model's (DreamBooth's log_validation swaps in DPM-Solver++).
 */
export interface PretrainedSource { model: string; load: FromPretrainedOptions; scheduler?: string }

/**
 * Validation with the current LoRA in the training models themselves (the script wraps the same UNet in a
 * pipeline), with a sampling scheduler loaded from the model for the call.
 */
export async function validateTrainingModels(
  models: Omit<StableDiffusionComponents, 'scheduler'>, source: PretrainedSource, o: ValidationOptions,
): Promise<string[]> {
  const scheduler = loadScheduler(source.model, { ...source.load, subfolder: 'scheduler', kind: source.scheduler });
  try {
    return await runValidation({ ...models, scheduler }, o);
  } finally {
    scheduler.dispose();
  }
}

/**
 * The final validation, as the script: the base pipeline loaded afresh in `dtype` on `device`, with the saved
 * LoRA file of `loraDir` through loadLoraWeights.
 */
export async function validateSavedLora(
  source: PretrainedSource & { variant: string | null; dtype: DType; device: string; memoryEfficientAttention: boolean }, loraDir: string, o: ValidationOptions,
): Promise<string[]> {
  const pipe = StableDiffusionPipeline.fromPretrained(source.model, { ...source.load, variant: source.variant ?? undefined, dtype: source.dtype, device: source.device, scheduler: source.scheduler });
  try {
    pipe.loadLoraWeights(loraDir);
    // same images either way; keeps the final run within the memory the training was given
    if (source.memoryEfficientAttention) pipe.enableMemoryEfficientAttention();
    return await runValidation(pipe, o);
  } finally {
    pipe.dispose();
  }
}
