// The domains of the training options, in one place for the CLI (`difflora train --flag`, lib/cli/train_args.ts)
// and the library (runTraining / trainTextToImageLora options): each value's type, range and choices. A value
// outside its domain is refused before anything is loaded or written, with every problem of a call listed at
// once and each naming its flag and the value given. Without these checks, `--learning_rate=1e309` trained
// NaN weights, `--max_grad_norm=-1` ascended the gradient and `--dataloader_num_workers=1000000` never stepped.
//
// What needs the model or the data (the LoRA rank against the layer sizes, a checkpoint's data position)
// is checked later, by train.ts, as soon as the model or the data is known.

import { unknownOptionNames } from '../options.js';
import type { MixedPrecision } from './step.js';
import type { TrainDataOptions } from './train_data.js';
import { DATA_DEFAULTS } from '../data/defaults.js';
import { BUCKETS_CAPTIONS_DEFAULTS, BUCKETS_CAPTIONS_RULES, bucketsCaptionsProblems } from './buckets_captions_options.js';
import { OPTIM_DEFAULTS, OPTIM_RULES, optimProblems, type OptimOptions } from './optim_options.js';
import { LORA_VARIANT_DEFAULTS, LORA_VARIANT_RULES, loraVariantProblems, type LoraVariantOptions } from './lora_variant_options.js';
import { CACHE_RULES, cacheProblems, type CacheOptions } from './cache_options.js';

export const LR_SCHEDULER_CHOICES = ['linear', 'cosine', 'cosine_with_restarts', 'polynomial', 'constant', 'constant_with_warmup'] as const;
export const MIXED_PRECISION_CHOICES = ['no', 'fp16', 'bf16'] as const;
export const PREDICTION_TYPE_CHOICES = ['epsilon', 'v_prediction'] as const;
/** torchvision's `InterpolationMode` members, lower-cased (the script builds its choices the same way). */
export const INTERPOLATION_CHOICES = ['bicubic', 'bilinear', 'box', 'hamming', 'lanczos', 'nearest', 'nearest_exact'] as const;
/** The interpolations the image loader implements (libvips kernels); the script's other choices are refused. */
export const SUPPORTED_INTERPOLATIONS = ['bicubic', 'bilinear', 'lanczos', 'nearest'] as const;
export const REPORT_TO_CHOICES = ['tensorboard', 'wandb', 'comet_ml', 'all'] as const;

/** Largest --resolution: 4096 px is 8× SD 1.5's and 4× SDXL's; beyond it one image's activations exceed any GPU. */
export const MAX_RESOLUTION = 4096;
/**
 * Most --dataloader_num_workers: each worker decodes 2 batches ahead (torch's prefetch_factor), and images
 * decode on libuv's few threads, so more workers only queue decoded images in memory.
 */
export const MAX_DATALOADER_WORKERS = 64;
/** Most --num_validation_images per validation (each is a 30-step generation). */
export const MAX_VALIDATION_IMAGES = 64;
/** The largest float32: the optimizer and the loss compute in float32, so a larger value overflows there. */
const FLOAT32_MAX = 3.4028234663852886e38;
/** The polynomial schedule's end LR (get_scheduler's lr_end): the base LR must exceed it. */
const POLYNOMIAL_LR_END = 1e-7;

/** The domain of one option (its flag is the camelCase name in snake_case). */
export type Rule =
  | { kind: 'int'; min: number; max?: number; why?: string; multipleOf?: number; nullable?: boolean }
  | { kind: 'float'; domain: 'positive' | 'nonNegative' | 'unitInterval'; nullable?: boolean }
  | { kind: 'string'; choices?: readonly string[]; nullable?: boolean; pattern?: [RegExp, string] }
  | { kind: 'boolean'; nullable?: boolean };

export const int = (min: number, more: Partial<Extract<Rule, { kind: 'int' }>> = {}): Rule => ({ kind: 'int', min, ...more });
export const float = (domain: Extract<Rule, { kind: 'float' }>['domain'], nullable = false): Rule => ({ kind: 'float', domain, nullable });
export const str = (more: Partial<Extract<Rule, { kind: 'string' }>> = {}): Rule => ({ kind: 'string', ...more });
export const bool: Rule = { kind: 'boolean' };

/** Every option runTraining reads, by its camelCase name (the flag is its snake_case). */
export const TRAIN_OPTION_RULES: Readonly<Record<keyof TrainOptions, Rule>> = {
  pretrainedModelNameOrPath: str(),
  revision: str({ nullable: true }),
  variant: str({ nullable: true }),
  cacheDir: str({ nullable: true }),
  datasetName: str({ nullable: true }),
  trainDataDir: str({ nullable: true }),
  imageColumn: str(),
  captionColumn: str(),
  maxTrainSamples: int(1, { nullable: true }),
  resolution: int(8, { max: MAX_RESOLUTION, multipleOf: 8, why: 'the VAE works on 8×8 pixel blocks' }),
  centerCrop: bool,
  randomFlip: bool,
  imageInterpolationMode: str({ choices: SUPPORTED_INTERPOLATIONS }),
  dataloaderNumWorkers: int(0, { max: MAX_DATALOADER_WORKERS, why: 'each worker decodes 2 batches ahead; more only fill memory' }),
  skipBrokenImages: bool,
  rank: int(1),
  trainBatchSize: int(1),
  numTrainEpochs: int(1),
  maxTrainSteps: int(1, { nullable: true }),
  gradientAccumulationSteps: int(1),
  gradientCheckpointing: bool,
  cudaGraphs: bool,
  enableXformersMemoryEfficientAttention: bool,
  learningRate: float('positive'),
  scaleLr: bool,
  lrScheduler: str({ choices: LR_SCHEDULER_CHOICES }),
  lrWarmupSteps: int(0),
  adamBeta1: float('unitInterval'),
  adamBeta2: float('unitInterval'),
  adamWeightDecay: float('nonNegative'),
  adamEpsilon: float('positive'),
  // null (library only): no clipping. The script's default is 1.0; 0 would zero every update, < 0 ascend.
  maxGradNorm: float('positive', true),
  allowTf32: bool,
  snrGamma: float('positive', true),
  predictionType: str({ choices: PREDICTION_TYPE_CHOICES, nullable: true }),
  noiseOffset: float('nonNegative'),
  mixedPrecision: str({ choices: MIXED_PRECISION_CHOICES, nullable: true }),
  validationPrompt: str({ nullable: true }),
  numValidationImages: int(0, { max: MAX_VALIDATION_IMAGES, why: 'each image is a 30-step generation' }),
  validationEpochs: int(1),
  outputDir: str(),
  // null (library only): no checkpoints.
  checkpointingSteps: int(1, { nullable: true }),
  checkpointsTotalLimit: int(1, { nullable: true }),
  resumeFromCheckpoint: str({ nullable: true }),
  reportTo: str({ choices: ['tensorboard'], nullable: true }),
  loggingDir: str(),
  seed: int(0, { nullable: true }),
  device: str({ nullable: true, pattern: [/^(cpu|cuda(:\d+)?)$/, "'cpu', 'cuda' or 'cuda:N'"] }),
  ...BUCKETS_CAPTIONS_RULES,
  ...OPTIM_RULES,
  ...LORA_VARIANT_RULES,
  ...CACHE_RULES,
};

/** The flags of train_text_to_image_lora.py that the loop uses, camelCased (lib/cli/train_args.ts). */
export interface TrainOptions extends TrainDataOptions, OptimOptions, LoraVariantOptions, CacheOptions {
  pretrainedModelNameOrPath: string;
  revision?: string | null;
  variant?: string | null;
  cacheDir?: string | null;
  rank?: number;
  numTrainEpochs?: number;
  maxTrainSteps?: number | null;
  gradientAccumulationSteps?: number;
  gradientCheckpointing?: boolean;
  /**
   * Record the whole training step in a CUDA graph and replay it (training/graphed_step.ts); falls back to eager steps,
   * saying why, where it cannot (not CUDA, accumulation, several processes, another optimizer, a failed capture).
   * Each step is launched before the last one is read, so onProgress for step k runs while step k+1 runs on the
   * device (a checkpoint's step, an epoch's last and the run's last excepted): LoRA weights read there are a step ahead.
   */
  cudaGraphs?: boolean;
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
  /** Save a resumable checkpoint every this many optimizer steps; null: none. */
  checkpointingSteps?: number | null;
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

/**
 * The default of every option that has one: the script's flag defaults, defined here once. The CLI's flag
 * table (lib/cli/train_args.ts) shows and applies these; resolveTrainOptions fills them in for the library.
 */
export const TRAIN_DEFAULTS = Object.freeze({
  imageColumn: DATA_DEFAULTS.imageColumn,
  captionColumn: DATA_DEFAULTS.captionColumn,
  resolution: 512,
  centerCrop: DATA_DEFAULTS.centerCrop,
  randomFlip: DATA_DEFAULTS.randomFlip,
  imageInterpolationMode: DATA_DEFAULTS.interpolation,
  dataloaderNumWorkers: 0,
  skipBrokenImages: DATA_DEFAULTS.skipBroken,
  rank: 4,
  trainBatchSize: 16,
  numTrainEpochs: 100,
  gradientAccumulationSteps: 1,
  gradientCheckpointing: false,
  cudaGraphs: false,
  enableXformersMemoryEfficientAttention: false,
  learningRate: 1e-4,
  scaleLr: false,
  lrScheduler: 'constant',
  lrWarmupSteps: 500,
  adamBeta1: 0.9,
  adamBeta2: 0.999,
  adamWeightDecay: 1e-2,
  adamEpsilon: 1e-8,
  maxGradNorm: 1.0,
  allowTf32: false,
  noiseOffset: 0,
  mixedPrecision: 'no',
  numValidationImages: 4,
  validationEpochs: 1,
  outputDir: 'sd-model-finetuned-lora',
  checkpointingSteps: 500,
  reportTo: 'tensorboard',
  loggingDir: 'logs',
  ...BUCKETS_CAPTIONS_DEFAULTS,
  ...OPTIM_DEFAULTS,
  ...LORA_VARIANT_DEFAULTS,
} as const satisfies { [K in keyof TrainOptions]?: NonNullable<TrainOptions[K]> });

type Defaulted = keyof typeof TRAIN_DEFAULTS;
/** Options whose null (library only) turns the feature off: no clipping, no checkpoints. */
const NULL_MEANS_OFF = ['maxGradNorm', 'checkpointingSteps'] as const;
type NullMeansOff = (typeof NULL_MEANS_OFF)[number];

/**
 * Every option with its value: the defaulted ones set (or null where null turns the feature off: NULL_MEANS_OFF),
 * the others the value given or null.
 */
export type ResolvedTrainOptions =
  & { readonly pretrainedModelNameOrPath: string }
  & { readonly [K in Exclude<keyof TrainOptions, Defaulted | 'pretrainedModelNameOrPath'>]-?: Exclude<TrainOptions[K], undefined> | null }
  & { readonly [K in Exclude<Defaulted, NullMeansOff | 'mixedPrecision'>]-?: NonNullable<TrainOptions[K]> }
  & { readonly [K in NullMeansOff]-?: number | null }
  & { readonly mixedPrecision: MixedPrecision };

/** The options with every default filled in (TRAIN_DEFAULTS); a null maxGradNorm or checkpointingSteps stays null (off). */
export function resolveTrainOptions(o: TrainOptions): ResolvedTrainOptions {
  return resolveOptions(TRAIN_OPTION_RULES, TRAIN_DEFAULTS, o) as ResolvedTrainOptions;
}

/** Every option of `rules` with its value: the given one, else its default, else null; a null in NULL_MEANS_OFF stays null. */
export function resolveOptions(rules: Readonly<Record<string, Rule>>, defaults: Readonly<Record<string, unknown>>, o: object): Record<string, unknown> {
  const given = o as Readonly<Record<string, unknown>>;
  const out: Record<string, unknown> = {};
  for (const key of Object.keys(rules)) out[key] = given[key] ?? null;
  for (const [key, value] of Object.entries(defaults)) out[key] = given[key] ?? value;
  for (const key of NULL_MEANS_OFF) if (given[key] === null) out[key] = null;
  return out;
}

/** Options given by their flag (`--learning_rate`, the CLI) or by their library name (`learningRate (--learning_rate)`). */
export type OptionNaming = 'flag' | 'option';

export const flagOf = (key: string): string => `--${key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)}`;
const nameOf = (key: string, naming: OptionNaming): string => (naming === 'flag' ? flagOf(key) : `${key} (${flagOf(key)})`);

/** A value as an error message shows it: numbers as JS prints them, strings quoted, null, arrays and objects by kind. */
export function showValue(v: unknown): string {
  if (typeof v === 'string') return JSON.stringify(v);
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'object') return 'an object';
  return String(v);
}

const FLOAT_DOMAINS = {
  positive: { test: (v: number) => v > 0, text: 'a finite number > 0' },
  nonNegative: { test: (v: number) => v >= 0, text: 'a finite number ≥ 0' },
  unitInterval: { test: (v: number) => v >= 0 && v < 1, text: 'a number in [0, 1)' },
} as const;

/** What is wrong with one value under its rule, or undefined when it is fine. */
function problemOf(rule: Rule, v: unknown): string | undefined {
  if (v === undefined) return undefined; // not given: the default applies
  if (v === null) return 'nullable' in rule && rule.nullable ? undefined : `must not be null`;
  switch (rule.kind) {
    case 'boolean':
      return typeof v === 'boolean' ? undefined : `must be true or false, got ${showValue(v)}`;
    case 'string':
      if (typeof v !== 'string') return `must be a string, got ${showValue(v)}`;
      if (v === '') return 'must not be empty';
      if (rule.choices && !rule.choices.includes(v)) return `must be one of ${rule.choices.join(', ')}, got ${showValue(v)}`;
      if (rule.pattern && !rule.pattern[0].test(v)) return `must be ${rule.pattern[1]}, got ${showValue(v)}`;
      return undefined;
    case 'float': {
      const d = FLOAT_DOMAINS[rule.domain];
      if (typeof v !== 'number') return `must be ${d.text}, got ${showValue(v)}`;
      if (!Number.isFinite(v) || !d.test(v)) return `must be ${d.text}, got ${showValue(v)}`;
      return Math.abs(v) <= FLOAT32_MAX ? undefined : `must be at most ${FLOAT32_MAX} (training computes in float32), got ${v}`;
    }
    case 'int': {
      if (typeof v !== 'number' || !Number.isFinite(v) || !Number.isInteger(v)) return `must be a whole number, got ${showValue(v)}`;
      if (v < rule.min) return `must be at least ${rule.min}, got ${v}`;
      const max = rule.max ?? Number.MAX_SAFE_INTEGER;
      if (v > max) return `must be at most ${max}${rule.why ? ` (${rule.why})` : ''}, got ${v}`;
      if (rule.multipleOf && v % rule.multipleOf !== 0) return `must be a multiple of ${rule.multipleOf}${rule.why ? ` (${rule.why})` : ''}, got ${v}`;
      return undefined;
    }
  }
}

/**
 * Every problem with the given options' values, one line each, naming the option and the value. Options
 * not given (undefined) are not checked (their defaults are valid); keys runTraining does not read are ignored.
 */
export function trainOptionProblems(options: object, naming: OptionNaming = 'option'): string[] {
  return optionProblems(TRAIN_OPTION_RULES, options, naming);
}

/** trainOptionProblems for any table of rules (another command's options). */
export function optionProblems(rules: Readonly<Record<string, Rule>>, options: object, naming: OptionNaming = 'option'): string[] {
  const o = options as Readonly<Record<string, unknown>>;
  const problems: string[] = [];
  for (const [key, rule] of Object.entries(rules)) {
    const p = problemOf(rule, o[key]);
    if (p !== undefined) problems.push(`${nameOf(key, naming)} ${p}`);
  }
  // get_scheduler's polynomial schedule decays to lr_end = 1e-7 and refuses a base LR not above it
  problems.push(...optimProblems(o, naming));
  const lr = o.learningRate;
  if (o.lrScheduler === 'polynomial' && typeof lr === 'number' && lr > 0 && lr <= POLYNOMIAL_LR_END) {
    problems.push(`${nameOf('learningRate', naming)} must be above ${POLYNOMIAL_LR_END} (the end LR of --lr_scheduler=polynomial), got ${lr}`);
  }
  return problems;
}

/** The problems as one message: the problem itself when there is one, else a count and one line each. */
export function formatProblems(problems: readonly string[], what: string): string {
  return problems.length === 1 ? problems[0]! : `${problems.length} problems with the ${what}:\n${problems.map((p) => `  - ${p}`).join('\n')}`;
}

/** Options outside their domain (RangeError: every problem of the call, each naming its option). */
export class TrainOptionsError extends RangeError {
  override name = 'TrainOptionsError';
  constructor(readonly problems: readonly string[]) {
    super(formatProblems(problems, 'training options'));
  }
}

/**
 * Checks runTraining's options before anything is loaded: an object, a model and a dataset named, and every
 * value in its domain. Throws a TrainOptionsError listing every problem.
 */
/** The rules of some of runTraining's options (another command's flags that it shares with train_text_to_image_lora.py). */
export function pickRules<K extends keyof TrainOptions>(keys: readonly K[]): Record<K, Rule> {
  return Object.fromEntries(keys.map((k) => [k, TRAIN_OPTION_RULES[k]])) as Record<K, Rule>;
}

/** TRAIN_DEFAULTS of the given options (those that have one). */
export function pickDefaults(keys: readonly (keyof TrainOptions)[]): Record<string, unknown> {
  return Object.fromEntries(keys.filter((k) => Object.hasOwn(TRAIN_DEFAULTS, k)).map((k) => [k, (TRAIN_DEFAULTS as Record<string, unknown>)[k]]));
}

/** Every option name `runTraining` / `trainTextToImageLora` take. */
export const TRAIN_OPTION_NAMES: readonly (keyof TrainOptions)[] = Object.freeze(Object.keys(TRAIN_OPTION_RULES) as (keyof TrainOptions)[]);

/** The training options among `args` (e.g. the CLI's parsed flags, which also hold CLI-only fields). */
export function pickTrainOptions(args: object): TrainOptions {
  const from = args as Readonly<Record<string, unknown>>;
  return Object.fromEntries(TRAIN_OPTION_NAMES.filter((k) => from[k] !== undefined).map((k) => [k, from[k]])) as unknown as TrainOptions;
}

/** Options of the Python script that cannot act in a library run here, with the CLI's reason. */
const UNSUPPORTED: Readonly<Record<string, string>> = {
  pushToHub: 'cannot push to the Hugging Face Hub: difflora runs offline (no network); upload the files in outputDir yourself',
  hubToken: 'cannot push to the Hugging Face Hub: difflora runs offline (no network)',
  hubModelId: 'cannot push to the Hugging Face Hub: difflora runs offline (no network)',
};

/**
 * Option names the training does not know: a snake_case flag name (`learning_rate`), a name from another
 * library (`torchDtype`), a typo — each named, with the option meant when one is close.
 */
export function unknownOptionProblems(opts: Readonly<Record<string, unknown>>, rules: Readonly<Record<string, Rule>> = TRAIN_OPTION_RULES): string[] {
  const unsupported = Object.keys(opts).filter((k) => Object.hasOwn(UNSUPPORTED, k) && ![undefined, false, null].includes(opts[k] as never));
  const rest = Object.fromEntries(Object.entries(opts).filter(([k]) => !Object.hasOwn(UNSUPPORTED, k)));
  return [...unsupported.map((k) => `${k}: ${UNSUPPORTED[k]}`), ...unknownOptionNames(rest, Object.keys(rules))];
}

export function validateTrainOptions(o: unknown): void {
  if (o === null || typeof o !== 'object' || Array.isArray(o)) throw new TrainOptionsError([`the training options must be an object, got ${showValue(o)}`]);
  const opts = o as Record<string, unknown>;
  const problems = [...unknownOptionProblems(opts), ...trainOptionProblems(opts, 'option'), ...bucketsCaptionsProblems({ resolution: TRAIN_DEFAULTS.resolution, ...opts }, 'option'),
    ...loraVariantProblems(opts, 'option'), ...cacheProblems(opts, 'option')];
  if (opts.pretrainedModelNameOrPath === undefined) problems.unshift('pretrainedModelNameOrPath (--pretrained_model_name_or_path) is required');
  if ((opts.datasetName ?? undefined) === undefined && (opts.trainDataDir ?? undefined) === undefined) {
    problems.push('need either datasetName (--dataset_name) or trainDataDir (--train_data_dir)');
  }
  if (problems.length) throw new TrainOptionsError(problems);
}

