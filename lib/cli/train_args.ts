// The flags of diffusers' `train_text_to_image_lora.py`, same names, defaults and meaning (REFERENCE.md),
// parsed into a typed `TrainArgs`. Flags that cannot act here (Hub upload, wandb/comet logging) are refused,
// not silently accepted; stand-ins (8-bit Adam → AdamW) are reported in `warnings`.
import yargs, { type Options } from 'yargs';
import { levenshtein } from '../options.js';
import { optimOptionsFromFlags, type OptimOptions } from '../training/optim_options.js';
import { OPTIM_FLAGS } from './optim_flags.js';
import { cacheProblems, type CacheOptions } from '../training/cache_options.js';
import { CACHE_FLAGS, cacheArgs } from './cache_flags.js';
import {
  INTERPOLATION_CHOICES, LR_SCHEDULER_CHOICES, MIXED_PRECISION_CHOICES, PREDICTION_TYPE_CHOICES, REPORT_TO_CHOICES,
  TRAIN_DEFAULTS as D, formatProblems, trainOptionProblems,
} from '../training/options.js';
import { bucketsCaptionsProblems, type BucketsCaptionsOptions } from '../training/buckets_captions_options.js';
import { BUCKETS_CAPTIONS_FLAGS, bucketsCaptionsArgs } from './buckets_captions_flags.js';
import { loraVariantProblems, type LoraVariantOptions } from '../training/lora_variant_options.js';
import { LORA_VARIANT_FLAGS, loraVariantArgs } from './lora_variant_flags.js';

/** A command-line mistake: main.ts prints the message and exits with code 2. */
export class UsageError extends Error {
  override name = 'UsageError';
}

// The choices live with the options' domains (lib/training/options.ts), shared with the library.
export { INTERPOLATION_CHOICES, LR_SCHEDULER_CHOICES, MIXED_PRECISION_CHOICES, PREDICTION_TYPE_CHOICES, REPORT_TO_CHOICES };

export type LrSchedulerChoice = (typeof LR_SCHEDULER_CHOICES)[number];
export type MixedPrecision = (typeof MIXED_PRECISION_CHOICES)[number];
export type PredictionType = (typeof PREDICTION_TYPE_CHOICES)[number];
export type InterpolationMode = (typeof INTERPOLATION_CHOICES)[number];

/** Parsed flags; `undefined` where the script's default is `None`. */
export interface TrainArgs extends BucketsCaptionsOptions, OptimOptions, LoraVariantOptions, CacheOptions {
  // model
  pretrainedModelNameOrPath: string;
  revision: string | undefined;
  variant: string | undefined;
  // data
  datasetName: string | undefined;
  datasetConfigName: string | undefined;
  trainDataDir: string | undefined;
  imageColumn: string;
  captionColumn: string;
  maxTrainSamples: number | undefined;
  cacheDir: string | undefined;
  // preprocessing
  resolution: number;
  centerCrop: boolean;
  randomFlip: boolean;
  imageInterpolationMode: InterpolationMode;
  dataloaderNumWorkers: number;
  // LoRA
  rank: number;
  // optimisation
  trainBatchSize: number;
  numTrainEpochs: number;
  maxTrainSteps: number | undefined;
  gradientAccumulationSteps: number;
  gradientCheckpointing: boolean;
  /** difflora's own --cuda_graphs (lib/training/graphed_step.ts); set only when given. */
  cudaGraphs?: boolean;
  learningRate: number;
  scaleLr: boolean;
  lrScheduler: LrSchedulerChoice;
  lrWarmupSteps: number;
  use8bitAdam: boolean;
  adamBeta1: number;
  adamBeta2: number;
  adamWeightDecay: number;
  adamEpsilon: number;
  maxGradNorm: number;
  allowTf32: boolean;
  // objective
  snrGamma: number | undefined;
  predictionType: PredictionType | undefined;
  noiseOffset: number;
  // precision
  mixedPrecision: MixedPrecision | undefined;
  enableXformersMemoryEfficientAttention: boolean;
  // validation
  validationPrompt: string | undefined;
  numValidationImages: number;
  validationEpochs: number;
  // checkpoints
  outputDir: string;
  checkpointingSteps: number;
  checkpointsTotalLimit: number | undefined;
  resumeFromCheckpoint: string | undefined;
  // logging
  loggingDir: string;
  reportTo: 'tensorboard';
  // hub (always off: refused when given)
  pushToHub: false;
  hubToken: undefined;
  hubModelId: undefined;
  // misc
  seed: number | undefined;
  localRank: number;
  /** What was accepted with a stand-in (8-bit Adam), for the caller to show. */
  warnings: string[];
  /** No model and no data flags: train the built-in default (lib/builtin/default.ts). */
  builtinDefault: boolean;
  /** difflora's own --skip_broken_images: unreadable images are skipped and counted instead of stopping the run. */
  skipBrokenImages?: boolean;
}

type Kind = 'string' | 'int' | 'float' | 'boolean';
export interface FlagSpec {
  kind: Kind;
  group: string;
  describe: string;
  default?: string | number | boolean;
  choices?: readonly string[];
}

/** Every flag of the script, in its order within each group. Help text paraphrases the script's. */
export const TRAIN_FLAGS: Readonly<Record<string, FlagSpec>> = Object.freeze({
  // model
  pretrained_model_name_or_path: { kind: 'string', group: 'Model', describe: 'Hub id of the pretrained model (read from the offline Hugging Face cache) or a local diffusers folder. Required.' },
  revision: { kind: 'string', group: 'Model', describe: 'Revision of the pretrained model (tokenizer, text_encoder, vae, unet).' },
  variant: { kind: 'string', group: 'Model', describe: "Variant of the model files, e.g. 'fp16' (vae and unet; not the text encoder)." },
  // data
  dataset_name: { kind: 'string', group: 'Data', describe: 'Dataset to train on (id in the local datasets cache, or a path). This or --train_data_dir is required.' },
  dataset_config_name: { kind: 'string', group: 'Data', describe: "The dataset's configuration; leave unset if it has only one." },
  train_data_dir: { kind: 'string', group: 'Data', describe: 'A folder of training images in imagefolder layout with a metadata.jsonl of captions. Ignored when --dataset_name is given.' },
  image_column: { kind: 'string', group: 'Data', default: D.imageColumn, describe: 'The dataset column holding the images.' },
  caption_column: { kind: 'string', group: 'Data', default: D.captionColumn, describe: 'The dataset column holding a caption or a list of captions (a list: one picked at random per sample).' },
  max_train_samples: { kind: 'int', group: 'Data', describe: 'For debugging or quicker runs: shuffle with the seed, then keep this many training examples.' },
  cache_dir: { kind: 'string', group: 'Data', describe: 'Where downloaded models and datasets are cached.' },
  // preprocessing
  resolution: { kind: 'int', group: 'Preprocessing', default: D.resolution, describe: 'Input image resolution: every image is resized (shorter side) to it, then cropped square.' },
  center_crop: { kind: 'boolean', group: 'Preprocessing', default: D.centerCrop, describe: 'Center-crop images to the resolution; without it the crop is random.' },
  random_flip: { kind: 'boolean', group: 'Preprocessing', default: D.randomFlip, describe: 'Flip images horizontally at random (p = 0.5).' },
  image_interpolation_mode: { kind: 'string', group: 'Preprocessing', default: D.imageInterpolationMode, choices: INTERPOLATION_CHOICES, describe: 'The filter used to resize images (torchvision names, lower case).' },
  dataloader_num_workers: { kind: 'int', group: 'Preprocessing', default: D.dataloaderNumWorkers, describe: 'Number of data-loading workers; 0 loads in the main thread.' },
  // LoRA
  rank: { kind: 'int', group: 'LoRA', default: D.rank, describe: 'Dimension of the LoRA update matrices (lora_alpha = rank, scale 1.0).' },
  // optimisation
  train_batch_size: { kind: 'int', group: 'Optimisation', default: D.trainBatchSize, describe: 'Batch size per device for the training dataloader.' },
  num_train_epochs: { kind: 'int', group: 'Optimisation', default: D.numTrainEpochs, describe: 'Number of training epochs (recomputed from --max_train_steps when given).' },
  max_train_steps: { kind: 'int', group: 'Optimisation', describe: 'Total number of optimizer steps; overrides --num_train_epochs when given.' },
  gradient_accumulation_steps: { kind: 'int', group: 'Optimisation', default: D.gradientAccumulationSteps, describe: 'Number of batches whose gradients are accumulated before one optimizer step.' },
  gradient_checkpointing: { kind: 'boolean', group: 'Optimisation', default: D.gradientCheckpointing, describe: 'Save memory by recomputing activations in the backward pass (slower).' },
  learning_rate: { kind: 'float', group: 'Optimisation', default: D.learningRate, describe: 'Initial learning rate (after any warmup).' },
  scale_lr: { kind: 'boolean', group: 'Optimisation', default: D.scaleLr, describe: 'Scale the learning rate by accumulation steps × batch size × number of processes.' },
  lr_scheduler: { kind: 'string', group: 'Optimisation', default: D.lrScheduler, choices: LR_SCHEDULER_CHOICES, describe: 'The learning-rate schedule.' },
  lr_warmup_steps: { kind: 'int', group: 'Optimisation', default: D.lrWarmupSteps, describe: "Warmup steps of the schedule (ignored by 'constant')." },
  use_8bit_adam: { kind: 'boolean', group: 'Optimisation', default: false, describe: '8-bit Adam (bitsandbytes in Python). Not available here: falls back to AdamW, with a warning.' },
  adam_beta1: { kind: 'float', group: 'Optimisation', default: D.adamBeta1, describe: "Adam's beta1." },
  adam_beta2: { kind: 'float', group: 'Optimisation', default: D.adamBeta2, describe: "Adam's beta2." },
  adam_weight_decay: { kind: 'float', group: 'Optimisation', default: D.adamWeightDecay, describe: 'Weight decay.' },
  adam_epsilon: { kind: 'float', group: 'Optimisation', default: D.adamEpsilon, describe: "Adam's epsilon." },
  max_grad_norm: { kind: 'float', group: 'Optimisation', default: D.maxGradNorm, describe: 'Clip the total gradient norm to this (really applied here; a no-op in the Python script).' },
  allow_tf32: { kind: 'boolean', group: 'Optimisation', default: D.allowTf32, describe: 'Allow TF32 matmuls on Ampere and newer GPUs (faster training).' },
  // objective
  snr_gamma: { kind: 'float', group: 'Objective', describe: 'Min-SNR weighting gamma for loss rebalancing (5.0 recommended); unset: plain MSE.' },
  prediction_type: { kind: 'string', group: 'Objective', choices: PREDICTION_TYPE_CHOICES, describe: "Training target, 'epsilon' or 'v_prediction'; unset: the scheduler config's." },
  noise_offset: { kind: 'float', group: 'Objective', default: D.noiseOffset, describe: 'Scale of offset noise.' },
  // precision
  mixed_precision: { kind: 'string', group: 'Precision', choices: MIXED_PRECISION_CHOICES, describe: 'Mixed precision: no, fp16 or bf16 (bf16 needs an Ampere GPU or a CPU).' },
  enable_xformers_memory_efficient_attention: { kind: 'boolean', group: 'Precision', default: D.enableXformersMemoryEfficientAttention, describe: 'Memory-efficient attention in the UNet (xformers in Python): libtorch 2.x\'s fused kernel; on libtorch 1.13, attention by query chunks of ≤ 64 MiB of scores, recomputed in backward.' },
  // validation
  validation_prompt: { kind: 'string', group: 'Validation', describe: 'A prompt sampled during training to check progress; enables validation.' },
  num_validation_images: { kind: 'int', group: 'Validation', default: D.numValidationImages, describe: 'Number of images generated from --validation_prompt.' },
  validation_epochs: { kind: 'int', group: 'Validation', default: D.validationEpochs, describe: 'Run validation every X epochs.' },
  // checkpoints
  output_dir: { kind: 'string', group: 'Checkpoints', default: D.outputDir, describe: 'Where the LoRA weights and checkpoints are written.' },
  checkpointing_steps: { kind: 'int', group: 'Checkpoints', default: D.checkpointingSteps, describe: 'Save a resumable checkpoint every X optimizer steps.' },
  checkpoints_total_limit: { kind: 'int', group: 'Checkpoints', describe: 'Keep at most this many checkpoints (the oldest are removed first).' },
  resume_from_checkpoint: { kind: 'string', group: 'Checkpoints', describe: "Resume from a checkpoint folder, or 'latest' for the newest in --output_dir." },
  // logging
  logging_dir: { kind: 'string', group: 'Logging', default: D.loggingDir, describe: 'TensorBoard log folder, under --output_dir.' },
  report_to: { kind: 'string', group: 'Logging', default: D.reportTo, choices: REPORT_TO_CHOICES, describe: "Where to report results; only 'tensorboard' is supported here (wandb, comet_ml and all are refused)." },
  // hub
  push_to_hub: { kind: 'boolean', group: 'Hub', default: false, describe: 'Push the model to the Hub. Refused: difflora runs without network access.' },
  hub_token: { kind: 'string', group: 'Hub', describe: 'Token for pushing to the Hub. Refused, as --push_to_hub.' },
  hub_model_id: { kind: 'string', group: 'Hub', describe: 'Repository to push to. Refused, as --push_to_hub.' },
  // misc
  seed: { kind: 'int', group: 'Misc', describe: 'A seed for reproducible training.' },
  local_rank: { kind: 'int', group: 'Misc', default: -1, describe: 'For distributed training: local rank (overridden by the LOCAL_RANK environment variable).' },
} satisfies Record<string, FlagSpec>);

/** Flags difflora adds to the script's (not in train_text_to_image_lora.py). */
export const DIFFLORA_FLAGS: Readonly<Record<string, FlagSpec>> = Object.freeze({
  skip_broken_images: { kind: 'boolean', group: 'difflora (not in the Python script)', default: D.skipBrokenImages, describe: 'Skip images that cannot be read (corrupt, truncated, unsupported), counting them and naming them at the end, instead of stopping the run with an error naming the file.' },
  cuda_graphs: { kind: 'boolean', group: 'difflora (not in the Python script)', default: D.cudaGraphs, describe: 'Record the whole training step in a CUDA graph after 3 warm-up steps and replay it (CUDA, AdamW, no gradient accumulation, one process; otherwise it says why and runs eagerly). Off by default until checked on a GPU.' },
  ...BUCKETS_CAPTIONS_FLAGS,
  ...OPTIM_FLAGS,
} satisfies Record<string, FlagSpec>);

/** A command's flags: its name (in messages) and its flag table. */
export interface FlagTable { command: string; flags: Readonly<Record<string, FlagSpec>> }

const TRAIN_TABLE: FlagTable = { command: 'difflora train', flags: { ...TRAIN_FLAGS, ...DIFFLORA_FLAGS, ...CACHE_FLAGS, ...LORA_VARIANT_FLAGS } };

export const INT_RE = /^[+-]?\d+$/;
const FLOAT_RE = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/;

/** The known flag closest to `name` (also matching hyphens for underscores and a known flag's prefix). */
export function closestFlag(name: string, table: FlagTable = TRAIN_TABLE): string | undefined {
  const norm = name.toLowerCase().replace(/-/g, '_');
  let best: string | undefined;
  let bestDist = Infinity;
  for (const flag of Object.keys(table.flags)) {
    const d = flag.startsWith(norm) || norm.startsWith(flag) ? Math.min(1, levenshtein(norm, flag)) : levenshtein(norm, flag);
    if (d < bestDist) { bestDist = d; best = flag; }
  }
  return best !== undefined && bestDist <= Math.max(3, Math.floor(norm.length / 3)) ? best : undefined;
}

function unknownFlag(token: string, name: string, table: FlagTable): string {
  const hint = closestFlag(name, table);
  return `unknown flag '${token}'${hint ? ` (did you mean '--${hint}'?)` : ''}`;
}

/** The problem with one flag token (and the value it takes), and how many tokens it used. */
function checkToken(argv: readonly string[], i: number, table: FlagTable): { problem?: string; used: number } {
  const token = argv[i] ?? '';
  if (token === '--') return { problem: `unexpected '--': ${table.command} takes flags only`, used: 1 };
  if (!token.startsWith('-') || token === '-') return { problem: `unexpected argument '${token}': ${table.command} takes flags only (--flag=value or --flag value)`, used: 1 };
  if (!token.startsWith('--')) return { problem: unknownFlag(token, token.replace(/^-+/, '').split('=')[0] ?? '', table), used: 1 };
  const eq = token.indexOf('=');
  const name = token.slice(2, eq < 0 ? undefined : eq);
  const spec = Object.hasOwn(table.flags, name) ? table.flags[name] : undefined;
  if (!spec) return { problem: unknownFlag(eq < 0 ? token : token.slice(0, eq), name, table), used: 1 };
  if (spec.kind === 'boolean') {
    return eq >= 0 ? { problem: `--${name} is a switch and takes no value (got '${token.slice(eq + 1)}')`, used: 1 } : { used: 1 };
  }
  let value: string;
  let used = 1;
  if (eq >= 0) {
    value = token.slice(eq + 1);
  } else {
    const next = argv[i + 1];
    const looksNumeric = next !== undefined && (spec.kind === 'int' || spec.kind === 'float') && FLOAT_RE.test(next);
    if (next === undefined || (next.startsWith('-') && !looksNumeric)) return { problem: `--${name} expects a value`, used: 1 };
    value = next;
    used = 2;
  }
  if (spec.kind === 'int' && !INT_RE.test(value.trim())) return { problem: `--${name} expects an integer, got '${value}'`, used };
  if (spec.kind === 'float' && !FLOAT_RE.test(value.trim())) return { problem: `--${name} expects a number, got '${value}'`, used };
  return { used };
}

/**
 * What yargs cannot say the way argparse does: unknown flags with a suggestion, a flag missing its value,
 * numbers that are not numbers, a value given to a switch, stray positional arguments. Throws at once for a
 * command line yargs cannot parse (unknown flags, stray arguments); returns the problems with values, which
 * the caller lists together with the other flags' domain problems.
 */
export function checkTokens(argv: readonly string[], table: FlagTable = TRAIN_TABLE): string[] {
  const problems: string[] = [];
  let unparseable = false;
  for (let i = 0; i < argv.length;) {
    const { problem, used } = checkToken(argv, i, table);
    if (problem !== undefined) {
      problems.push(problem);
      if (!problem.startsWith('--')) unparseable = true; // an unknown flag or a stray argument
    }
    i += used;
  }
  if (unparseable) throw new UsageError(formatProblems(problems, 'command line'));
  return problems;
}

/** A yargs parser for a flag table (also the source of the command's --help). */
export function flagParser(argv: readonly string[], table: FlagTable, usage: string) {
  let parser = yargs([...argv])
    .scriptName('difflora')
    .usage(usage)
    .parserConfiguration({
      'camel-case-expansion': false, 'dot-notation': false, 'boolean-negation': false,
      'duplicate-arguments-array': false, 'strip-aliased': true,
    })
    .exitProcess(false)
    .strict()
    .version(false)
    .help(false)
    .wrap(Math.min(120, process.stdout.columns ?? 100))
    .fail((msg: string | undefined, err: Error | undefined) => { throw new UsageError(msg ?? err?.message ?? 'invalid arguments'); });
  for (const [name, spec] of Object.entries(table.flags)) {
    // choices are shown, not enforced by yargs: a value outside them is a domain problem, listed with all the others
    const choices = spec.choices ? ` [choices: ${spec.choices.map((c) => `"${c}"`).join(', ')}]` : '';
    const option: Options = {
      type: spec.kind === 'boolean' ? 'boolean' : spec.kind === 'string' ? 'string' : 'number',
      describe: `${spec.describe}${choices}`,
      group: `${spec.group}:`,
    };
    if (spec.default !== undefined) option.default = spec.default;
    parser = parser.option(name, option);
  }
  return parser;
}

/** The yargs parser for the flags of `difflora train`. */
export function trainParser(argv: readonly string[] = []) {
  return flagParser(argv, TRAIN_TABLE, 'Usage: difflora train --pretrained_model_name_or_path=<model> (--dataset_name=<name> | --train_data_dir=<dir>) [flags]\n\n'
    + 'Fine-tune Stable Diffusion with LoRA: the flags of diffusers\' train_text_to_image_lora.py, same names and defaults.');
}

/** The help text of `difflora train`. */
export async function trainHelp(): Promise<string> {
  return trainParser().getHelp();
}

const str = (r: Record<string, unknown>, k: string): string | undefined => (typeof r[k] === 'string' ? r[k] : undefined);
const num = (r: Record<string, unknown>, k: string): number | undefined => (typeof r[k] === 'number' ? r[k] : undefined);
function need<T>(v: T | undefined, k: string): T {
  if (v === undefined) throw new Error(`internal: --${k} has no value after parsing`);
  return v;
}

/**
 * Parses the flags of `difflora train` (without the subcommand). `env` supplies LOCAL_RANK, as os.environ in
 * the script. Throws UsageError for anything the script would reject and for flags that cannot act here.
 */
export function parseTrainArgs(argv: readonly string[], env: NodeJS.ProcessEnv = process.env): TrainArgs {
  const tokenProblems = checkTokens(argv);
  const r = trainParser(argv).parseSync() as Record<string, unknown>;
  const warnings: string[] = [];

  const model = str(r, 'pretrained_model_name_or_path');
  const datasetName = str(r, 'dataset_name');
  const trainDataDir = str(r, 'train_data_dir');
  // no model and no data flags at all: the built-in default (a generated tiny model and picture set)
  const builtinDefault = model === undefined && datasetName === undefined && trainDataDir === undefined;
  if (!builtinDefault && (model === undefined || model === '')) throw new UsageError('--pretrained_model_name_or_path is required (a hub id in the offline cache or a local diffusers folder)');
  if (!builtinDefault && datasetName === undefined && trainDataDir === undefined) throw new UsageError('Need either a dataset name or a training folder: give --dataset_name or --train_data_dir');

  if (r.push_to_hub === true || str(r, 'hub_token') !== undefined || str(r, 'hub_model_id') !== undefined) {
    throw new UsageError('cannot push to the Hugging Face Hub: difflora runs offline (no network); drop --push_to_hub/--hub_token/--hub_model_id and upload the files in --output_dir yourself');
  }
  const reportTo = str(r, 'report_to');
  if (reportTo !== 'tensorboard') throw new UsageError(`--report_to=${reportTo} is not supported: difflora reports to 'tensorboard' only (wandb and comet_ml need their services)`);
  if (r.use_8bit_adam === true) warnings.push('--use_8bit_adam: 8-bit Adam (bitsandbytes) is not available in difflora; falling back to AdamW (fp32 optimizer state, more memory)');

  // As the script: a LOCAL_RANK in the environment wins over --local_rank.
  let localRank = need(num(r, 'local_rank'), 'local_rank');
  if (env.LOCAL_RANK !== undefined && env.LOCAL_RANK !== '') {
    if (!INT_RE.test(env.LOCAL_RANK.trim())) throw new UsageError(`LOCAL_RANK must be an integer, got '${env.LOCAL_RANK}'`);
    const envRank = Number(env.LOCAL_RANK);
    if (envRank !== -1 && envRank !== localRank) localRank = envRank;
  }

  const args: TrainArgs = {
    pretrainedModelNameOrPath: model ?? '',
    builtinDefault,
    revision: str(r, 'revision'),
    variant: str(r, 'variant'),
    datasetName,
    datasetConfigName: str(r, 'dataset_config_name'),
    trainDataDir,
    imageColumn: need(str(r, 'image_column'), 'image_column'),
    captionColumn: need(str(r, 'caption_column'), 'caption_column'),
    maxTrainSamples: num(r, 'max_train_samples'),
    cacheDir: str(r, 'cache_dir'),
    resolution: need(num(r, 'resolution'), 'resolution'),
    centerCrop: r.center_crop === true,
    randomFlip: r.random_flip === true,
    imageInterpolationMode: need(str(r, 'image_interpolation_mode'), 'image_interpolation_mode') as InterpolationMode,
    dataloaderNumWorkers: need(num(r, 'dataloader_num_workers'), 'dataloader_num_workers'),
    rank: need(num(r, 'rank'), 'rank'),
    trainBatchSize: need(num(r, 'train_batch_size'), 'train_batch_size'),
    numTrainEpochs: need(num(r, 'num_train_epochs'), 'num_train_epochs'),
    maxTrainSteps: num(r, 'max_train_steps'),
    gradientAccumulationSteps: need(num(r, 'gradient_accumulation_steps'), 'gradient_accumulation_steps'),
    gradientCheckpointing: r.gradient_checkpointing === true,
    learningRate: need(num(r, 'learning_rate'), 'learning_rate'),
    scaleLr: r.scale_lr === true,
    lrScheduler: need(str(r, 'lr_scheduler'), 'lr_scheduler') as LrSchedulerChoice,
    lrWarmupSteps: need(num(r, 'lr_warmup_steps'), 'lr_warmup_steps'),
    use8bitAdam: r.use_8bit_adam === true,
    adamBeta1: need(num(r, 'adam_beta1'), 'adam_beta1'),
    adamBeta2: need(num(r, 'adam_beta2'), 'adam_beta2'),
    adamWeightDecay: need(num(r, 'adam_weight_decay'), 'adam_weight_decay'),
    adamEpsilon: need(num(r, 'adam_epsilon'), 'adam_epsilon'),
    maxGradNorm: need(num(r, 'max_grad_norm'), 'max_grad_norm'),
    allowTf32: r.allow_tf32 === true,
    snrGamma: num(r, 'snr_gamma'),
    predictionType: str(r, 'prediction_type') as PredictionType | undefined,
    noiseOffset: need(num(r, 'noise_offset'), 'noise_offset'),
    mixedPrecision: str(r, 'mixed_precision') as MixedPrecision | undefined,
    enableXformersMemoryEfficientAttention: r.enable_xformers_memory_efficient_attention === true,
    validationPrompt: str(r, 'validation_prompt'),
    numValidationImages: need(num(r, 'num_validation_images'), 'num_validation_images'),
    validationEpochs: need(num(r, 'validation_epochs'), 'validation_epochs'),
    outputDir: need(str(r, 'output_dir'), 'output_dir'),
    checkpointingSteps: need(num(r, 'checkpointing_steps'), 'checkpointing_steps'),
    checkpointsTotalLimit: num(r, 'checkpoints_total_limit'),
    resumeFromCheckpoint: str(r, 'resume_from_checkpoint'),
    loggingDir: need(str(r, 'logging_dir'), 'logging_dir'),
    reportTo,
    pushToHub: false,
    hubToken: undefined,
    hubModelId: undefined,
    seed: num(r, 'seed'),
    localRank,
    warnings,
    // set only when given, so the parsed flags of the script compare equal with or without difflora's own
    ...(r.skip_broken_images === true ? { skipBrokenImages: true } : {}),
    ...(r.cuda_graphs === true ? { cudaGraphs: true } : {}),
    ...bucketsCaptionsArgs(r),
    ...optimOptionsFromFlags(r),
    ...loraVariantArgs(r),
    ...cacheArgs(r),
  };
  // every value in its domain (the library checks the same), all problems at once
  const domainProblems = [...trainOptionProblems(builtinDefault ? { ...args, pretrainedModelNameOrPath: undefined } : args, 'flag'), ...loraVariantProblems(args, 'flag'), ...cacheProblems(args, 'flag')];
  domainProblems.push(...bucketsCaptionsProblems({ ...args }, 'flag'));
  if (!Number.isSafeInteger(localRank)) domainProblems.push(`--local_rank must be a whole number, got ${localRank}`);
  // a flag whose value is not even a number is said once, by the token check
  const flagOfProblem = (p: string) => /^--\w+/.exec(p)?.[0];
  const named = new Set(tokenProblems.map(flagOfProblem));
  const problems = [...tokenProblems, ...domainProblems.filter((p) => !named.has(flagOfProblem(p)))];
  if (problems.length) throw new UsageError(formatProblems(problems, 'flags'));
  return args;
}
