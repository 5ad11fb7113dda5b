// The options of SDXL LoRA training: the flags of diffusers' examples/text_to_image/train_text_to_image_lora_sdxl.py
// (0.31), camelCased, with the script's defaults. The flags it shares with train_text_to_image_lora.py keep their
// domains from options.ts; only --resolution's default differs (1024). Its own: --pretrained_vae_model_name_or_path,
// --train_text_encoder, --debug_loss (and --enable_npu_flash_attention, refused: no NPU here).
import {
  TrainOptionsError, bool, optionProblems, pickDefaults, pickRules, resolveOptions, showValue, str, unknownOptionProblems,
  type OptionNaming, type ResolvedTrainOptions, type Rule, type TrainOptions,
} from './options.js';
import { BUCKETS_CAPTIONS_DEFAULTS, BUCKETS_CAPTIONS_RULES, bucketsCaptionsProblems, type BucketsCaptionsOptions, type ResolvedBucketsCaptions } from './buckets_captions_options.js';
import { OPTIM_DEFAULTS, OPTIM_RULES, type OptimOptions, type ResolvedOptimOptions } from './optim_options.js';
import { LORA_VARIANT_DEFAULTS, LORA_VARIANT_RULES, loraVariantProblems, type LoraVariantOptions, type ResolvedLoraVariantOptions } from './lora_variant_options.js';
import { CACHE_RULES, cacheProblems, type CacheOptions } from './cache_options.js';

/** The flags train_text_to_image_lora_sdxl.py shares with train_text_to_image_lora.py (same names, meaning and domains). */
const SHARED = [
  'pretrainedModelNameOrPath', 'revision', 'variant', 'datasetName', 'trainDataDir', 'imageColumn', 'captionColumn', 'maxTrainSamples', 'cacheDir',
  'resolution', 'centerCrop', 'randomFlip', 'dataloaderNumWorkers', 'skipBrokenImages', 'rank', 'trainBatchSize', 'numTrainEpochs', 'maxTrainSteps',
  'gradientAccumulationSteps', 'gradientCheckpointing', 'enableXformersMemoryEfficientAttention', 'learningRate', 'scaleLr', 'lrScheduler',
  'lrWarmupSteps', 'adamBeta1', 'adamBeta2', 'adamWeightDecay', 'adamEpsilon', 'maxGradNorm', 'allowTf32', 'snrGamma', 'predictionType',
  'noiseOffset', 'mixedPrecision', 'validationPrompt', 'numValidationImages', 'validationEpochs', 'outputDir', 'checkpointingSteps',
  'checkpointsTotalLimit', 'resumeFromCheckpoint', 'reportTo', 'loggingDir', 'seed', 'device', 'cudaGraphs',
] as const satisfies readonly (keyof TrainOptions)[];
type Shared = (typeof SHARED)[number];

/** The flags of train_text_to_image_lora_sdxl.py that the run uses, camelCased (lib/cli/train_sdxl_args.ts). */
export interface SdxlTrainOptions extends Pick<TrainOptions, Shared>, BucketsCaptionsOptions, OptimOptions, LoraVariantOptions, CacheOptions {
  /**
   * A VAE folder or Hub id (its files at the top, no vae/ subfolder) used instead of the model's, e.g. one without
   * SDXL's fp16 NaN problem. With it the VAE runs in the weight dtype; without it the model's VAE stays float32.
   */
  pretrainedVaeModelNameOrPath?: string | null;
  /** LoRA on q/k/v/out_proj of both text encoders too, trained with the UNet's. */
  trainTextEncoder?: boolean;
  /** Log each image's loss to TensorBoard as loss_for_<file name> (the script's --debug_loss). */
  debugLoss?: boolean;
}

/** Every option trainTextToImageLoraSdxl reads, with its domain. */
export const SDXL_TRAIN_OPTION_RULES: Readonly<Record<keyof SdxlTrainOptions, Rule>> = {
  ...pickRules(SHARED),
  pretrainedVaeModelNameOrPath: str({ nullable: true }),
  trainTextEncoder: bool,
  debugLoss: bool,
  ...BUCKETS_CAPTIONS_RULES,
  ...OPTIM_RULES,
  ...LORA_VARIANT_RULES,
  ...CACHE_RULES,
};

/** The script's defaults: train_text_to_image_lora.py's, but --resolution 1024. */
export const SDXL_TRAIN_DEFAULTS = Object.freeze({
  ...pickDefaults(SHARED),
  resolution: 1024, // differs
  trainTextEncoder: false,
  debugLoss: false,
  ...BUCKETS_CAPTIONS_DEFAULTS,
  ...OPTIM_DEFAULTS,
  ...LORA_VARIANT_DEFAULTS,
}) as Readonly<Record<string, unknown>>;

/** Every option with its value: defaults filled in, the optional ones null when not given. */
export type ResolvedSdxlTrainOptions = Pick<ResolvedTrainOptions, Shared> & ResolvedBucketsCaptions & ResolvedOptimOptions & ResolvedLoraVariantOptions & {
  readonly pretrainedVaeModelNameOrPath: string | null;
  readonly trainTextEncoder: boolean;
  readonly debugLoss: boolean;
  /** Not given: null (off); resolveCacheOptions reads them. */
  readonly cacheLatents: boolean | null; readonly cacheLatentsToDisk: boolean | null; readonly cacheTextEmbeddings: boolean | null;
};

export function resolveSdxlTrainOptions(o: SdxlTrainOptions): ResolvedSdxlTrainOptions {
  return resolveOptions(SDXL_TRAIN_OPTION_RULES, SDXL_TRAIN_DEFAULTS, o) as ResolvedSdxlTrainOptions;
}

/** The script's own checks (parse_args): a model, and a dataset or a folder. */
export function sdxlTrainProblems(o: Readonly<Record<string, unknown>>, naming: OptionNaming): string[] {
  const name = (k: string, flag: string) => (naming === 'flag' ? flag : `${k} (${flag})`);
  const problems: string[] = [];
  if ((o.pretrainedModelNameOrPath ?? null) === null) problems.push(`${name('pretrainedModelNameOrPath', '--pretrained_model_name_or_path')} is required`);
  if ((o.datasetName ?? null) === null && (o.trainDataDir ?? null) === null) {
    problems.push(`Need either a dataset name or a training folder: give ${name('datasetName', '--dataset_name')} or ${name('trainDataDir', '--train_data_dir')}`);
  }
  return [...problems, ...loraVariantProblems(o, naming), ...cacheProblems(o, naming)];
}

/** Checks trainTextToImageLoraSdxl's options before anything is loaded; throws a TrainOptionsError listing every problem. */
export function validateSdxlTrainOptions(o: unknown): void {
  if (o === null || typeof o !== 'object' || Array.isArray(o)) throw new TrainOptionsError([`the SDXL training options must be an object, got ${showValue(o)}`]);
  const opts = o as Record<string, unknown>;
  const problems = [...unknownOptionProblems(opts, SDXL_TRAIN_OPTION_RULES), ...sdxlTrainProblems(opts, 'option'), ...optionProblems(SDXL_TRAIN_OPTION_RULES, opts, 'option'), ...bucketsCaptionsProblems({ resolution: SDXL_TRAIN_DEFAULTS.resolution, ...opts }, 'option')];
  if (problems.length) throw new TrainOptionsError(problems);
}
