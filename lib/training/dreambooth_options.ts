// The options of DreamBooth LoRA training: the flags of diffusers' examples/dreambooth/train_dreambooth_lora.py
// (0.31), camelCased, with the script's defaults and its own checks (prior preservation needs a class folder and
// prompt; a text encoder that trains cannot have its embeddings pre-computed). The flags it shares with
// train_text_to_image_lora.py keep their domains from options.ts; only their defaults differ.
import type { MixedPrecision } from './step.js';
import {
  TrainOptionsError, bool, float, int, optionProblems, pickDefaults, pickRules, resolveOptions, showValue, str, unknownOptionProblems,
  type OptionNaming, type Rule, type TrainOptions,
} from './options.js';
import { BUCKETS_CAPTIONS_DEFAULTS, BUCKETS_CAPTIONS_RULES, bucketsCaptionsProblems, type BucketsCaptionsOptions } from './buckets_captions_options.js';
import { OPTIM_DEFAULTS, OPTIM_RULES, type OptimOptions, type ResolvedOptimOptions } from './optim_options.js';
import { LORA_VARIANT_DEFAULTS, LORA_VARIANT_RULES, loraVariantProblems, type LoraVariantOptions, type ResolvedLoraVariantOptions } from './lora_variant_options.js';
import { CACHE_RULES, cacheProblems, type CacheOptions } from './cache_options.js';

/** The flags train_dreambooth_lora.py shares with train_text_to_image_lora.py (same names, meaning and domains). */
const SHARED = [
  'pretrainedModelNameOrPath', 'revision', 'variant', 'cacheDir', 'resolution', 'centerCrop', 'dataloaderNumWorkers', 'rank', 'trainBatchSize',
  'numTrainEpochs', 'maxTrainSteps', 'gradientAccumulationSteps', 'gradientCheckpointing', 'enableXformersMemoryEfficientAttention',
  'learningRate', 'scaleLr', 'lrScheduler', 'lrWarmupSteps', 'adamBeta1', 'adamBeta2', 'adamWeightDecay', 'adamEpsilon', 'maxGradNorm',
  'allowTf32', 'mixedPrecision', 'outputDir', 'checkpointingSteps', 'checkpointsTotalLimit', 'resumeFromCheckpoint', 'validationPrompt',
  'numValidationImages', 'validationEpochs', 'reportTo', 'loggingDir', 'seed', 'device', 'cudaGraphs',
] as const satisfies readonly (keyof TrainOptions)[];
type Shared = (typeof SHARED)[number];

export const PRIOR_GENERATION_PRECISION_CHOICES = ['no', 'fp32', 'fp16', 'bf16'] as const;

/** The flags of train_dreambooth_lora.py that the run uses, camelCased (lib/cli/dreambooth_args.ts). */
export interface DreamBoothOptions extends Pick<TrainOptions, Shared>, BucketsCaptionsOptions, OptimOptions, LoraVariantOptions, CacheOptions {
  /** A tokenizer folder or Hub id other than the model's tokenizer/ (--tokenizer_name). */
  tokenizerName?: string | null;
  /** The pictures of the subject (every image file in the folder). Required. */
  instanceDataDir: string;
  /** The prompt with the identifier of the subject, e.g. 'a photo of sks dog'. Required. */
  instancePrompt: string;
  /** Class images for prior preservation; generated there when fewer than numClassImages. */
  classDataDir?: string | null;
  classPrompt?: string | null;
  withPriorPreservation?: boolean;
  priorLossWeight?: number;
  numClassImages?: number;
  /** Batch size of the class-image generation. */
  sampleBatchSize?: number;
  /** dtype of the class-image generation: 'fp32', 'fp16', 'bf16' ('no' or unset: fp16 on CUDA, fp32 on CPU). */
  priorGenerationPrecision?: string | null;
  /** LoRA on the text encoder's q/k/v/out_proj too, trained with the UNet's. */
  trainTextEncoder?: boolean;
  /** Encode the prompts once before training (the text encoder is then not kept). */
  preComputeTextEmbeddings?: boolean;
  /** Token length of the prompts (default the tokenizer's 77). */
  tokenizerMaxLength?: number | null;
  /** Pass the tokenizer's attention mask to the text encoder. */
  textEncoderUseAttentionMask?: boolean;
  /** 'timesteps': the timesteps as the UNet's class labels (only UNets with a class embedding use them). */
  classLabelsConditioning?: string | null;
  /** Cycles of --lr_scheduler=cosine_with_restarts. */
  lrNumCycles?: number;
  /** Power of --lr_scheduler=polynomial. */
  lrPower?: number;
}

/** Every option trainDreamBoothLora reads, with its domain. */
export const DREAMBOOTH_OPTION_RULES: Readonly<Record<keyof DreamBoothOptions, Rule>> = {
  ...pickRules(SHARED),
  tokenizerName: str({ nullable: true }),
  instanceDataDir: str(),
  instancePrompt: str(),
  classDataDir: str({ nullable: true }),
  classPrompt: str({ nullable: true }),
  withPriorPreservation: bool,
  priorLossWeight: float('nonNegative'),
  numClassImages: int(1),
  sampleBatchSize: int(1),
  priorGenerationPrecision: str({ choices: PRIOR_GENERATION_PRECISION_CHOICES, nullable: true }),
  trainTextEncoder: bool,
  preComputeTextEmbeddings: bool,
  tokenizerMaxLength: int(2, { nullable: true, max: 77, why: "CLIP's position embeddings" }),
  textEncoderUseAttentionMask: bool,
  classLabelsConditioning: str({ nullable: true }),
  lrNumCycles: int(1),
  lrPower: float('positive'),
  ...BUCKETS_CAPTIONS_RULES,
  ...OPTIM_RULES,
  ...LORA_VARIANT_RULES,
  ...CACHE_RULES,
};

/** The script's defaults (those of the shared flags that differ from train_text_to_image_lora.py's are marked). */
export const DREAMBOOTH_DEFAULTS = Object.freeze({
  ...pickDefaults(SHARED),
  learningRate: 5e-4, // differs
  trainBatchSize: 4, // differs
  numTrainEpochs: 1, // differs
  validationEpochs: 50, // differs
  outputDir: 'lora-dreambooth-model', // differs
  withPriorPreservation: false,
  priorLossWeight: 1.0,
  numClassImages: 100,
  sampleBatchSize: 4,
  trainTextEncoder: false,
  preComputeTextEmbeddings: false,
  textEncoderUseAttentionMask: false,
  lrNumCycles: 1,
  lrPower: 1.0,
  ...BUCKETS_CAPTIONS_DEFAULTS,
  ...OPTIM_DEFAULTS,
  ...LORA_VARIANT_DEFAULTS,
}) as Readonly<Record<string, unknown>>;

type Required3 = 'pretrainedModelNameOrPath' | 'instanceDataDir' | 'instancePrompt';
type Defaulted = Exclude<keyof DreamBoothOptions, Required3 | 'revision' | 'variant' | 'cacheDir' | 'maxTrainSteps' | 'checkpointsTotalLimit' |
  'resumeFromCheckpoint' | 'validationPrompt' | 'seed' | 'device' | 'tokenizerName' | 'classDataDir' | 'classPrompt' | 'priorGenerationPrecision' |
  'tokenizerMaxLength' | 'classLabelsConditioning' | 'maxGradNorm' | 'checkpointingSteps' | 'mixedPrecision' | 'captionExtention' | keyof OptimOptions | keyof LoraVariantOptions | keyof CacheOptions>;

/** Every option with its value: defaults filled in, the optional ones null when not given. */
export type ResolvedDreamBoothOptions =
  & { readonly [K in Required3]: string }
  & { readonly [K in Exclude<keyof DreamBoothOptions, Defaulted | Required3 | 'maxGradNorm' | 'checkpointingSteps' | 'mixedPrecision'>]-?: Exclude<DreamBoothOptions[K], undefined> | null }
  & { readonly [K in Defaulted]-?: NonNullable<DreamBoothOptions[K]> }
  & { readonly maxGradNorm: number | null; readonly checkpointingSteps: number | null; readonly mixedPrecision: MixedPrecision }
  & ResolvedOptimOptions & ResolvedLoraVariantOptions;

export function resolveDreamBoothOptions(o: DreamBoothOptions): ResolvedDreamBoothOptions {
  const r = resolveOptions(DREAMBOOTH_OPTION_RULES, DREAMBOOTH_DEFAULTS, o);
  if (r.mixedPrecision === null) r.mixedPrecision = 'no';
  return r as ResolvedDreamBoothOptions;
}

/** The script's own checks between flags (parse_args), phrased with the names of `naming`. */
export function dreamBoothProblems(o: Readonly<Record<string, unknown>>, naming: OptionNaming): string[] {
  const name = (k: string, flag: string) => (naming === 'flag' ? flag : `${k} (${flag})`);
  const problems: string[] = [];
  for (const [k, flag] of [['pretrainedModelNameOrPath', '--pretrained_model_name_or_path'], ['instanceDataDir', '--instance_data_dir'], ['instancePrompt', '--instance_prompt']] as const) {
    if (o[k] === undefined || o[k] === null) problems.push(`${name(k, flag)} is required`);
  }
  if (o.withPriorPreservation === true) {
    if ((o.classDataDir ?? null) === null) problems.push(`${name('withPriorPreservation', '--with_prior_preservation')} needs ${name('classDataDir', '--class_data_dir')}: You must specify a data directory for class images.`);
    if ((o.classPrompt ?? null) === null) problems.push(`${name('withPriorPreservation', '--with_prior_preservation')} needs ${name('classPrompt', '--class_prompt')}: You must specify prompt for class images.`);
  }
  if (o.trainTextEncoder === true && o.preComputeTextEmbeddings === true) {
    problems.push(`${name('trainTextEncoder', '--train_text_encoder')} cannot be used with ${name('preComputeTextEmbeddings', '--pre_compute_text_embeddings')}`);
  }
  return [...problems, ...loraVariantProblems(o, naming), ...cacheProblems(o, naming)];
}

/** The script's warnings: class folder or prompt given without prior preservation. */
export function dreamBoothWarnings(o: { withPriorPreservation?: boolean; classDataDir?: string | null; classPrompt?: string | null }): string[] {
  if (o.withPriorPreservation) return [];
  return [
    ...((o.classDataDir ?? null) !== null ? ['You need not use --class_data_dir without --with_prior_preservation.'] : []),
    ...((o.classPrompt ?? null) !== null ? ['You need not use --class_prompt without --with_prior_preservation.'] : []),
  ];
}

/** Options of the script that cannot act here, with why (the CLI refuses the flags the same way). */
const UNSUPPORTED_DREAMBOOTH: Readonly<Record<string, string>> = {
  validationImages: 'validation from input images is for image-conditioned pipelines (DeepFloyd IF super-resolution), which difflora does not have',
};

/** Checks trainDreamBoothLora's options before anything is loaded; throws a TrainOptionsError listing every problem. */
export function validateDreamBoothOptions(o: unknown): void {
  if (o === null || typeof o !== 'object' || Array.isArray(o)) throw new TrainOptionsError([`the DreamBooth options must be an object, got ${showValue(o)}`]);
  const opts = o as Record<string, unknown>;
  const unsupported = Object.keys(opts).filter((k) => Object.hasOwn(UNSUPPORTED_DREAMBOOTH, k) && opts[k] !== undefined && opts[k] !== null);
  const unknown = unknownOptionProblems(Object.fromEntries(Object.entries(opts).filter(([k]) => !Object.hasOwn(UNSUPPORTED_DREAMBOOTH, k))), DREAMBOOTH_OPTION_RULES);
  const problems = [
    ...unsupported.map((k) => `${k}: ${UNSUPPORTED_DREAMBOOTH[k]}`), ...unknown,
    ...dreamBoothProblems(opts, 'option'), ...optionProblems(DREAMBOOTH_OPTION_RULES, opts, 'option'),
    ...bucketsCaptionsProblems({ resolution: DREAMBOOTH_DEFAULTS.resolution, ...opts }, 'option'),
  ];
  if (problems.length) throw new TrainOptionsError(problems);
}
