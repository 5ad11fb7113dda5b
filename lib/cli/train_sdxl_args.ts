// The flags of diffusers' examples/text_to_image/train_text_to_image_lora_sdxl.py (0.31), same names, defaults and
// meaning, parsed into the library's SdxlTrainOptions. The flags it shares with train_text_to_image_lora.py keep their
// help from train_args.ts; flags that cannot act here are refused (exit 2), every problem listed at once.
import { bucketsCaptionsProblems } from '../training/buckets_captions_options.js';
import { SDXL_TRAIN_DEFAULTS as D, SDXL_TRAIN_OPTION_RULES, sdxlTrainProblems, type SdxlTrainOptions } from '../training/sdxl_options.js';
import { LORA_VARIANT_FLAGS } from './lora_variant_flags.js';
import { CACHE_FLAGS } from './cache_flags.js';
import { DIFFLORA_FLAGS, flagParser, type FlagSpec, type FlagTable } from './train_args.js';
import { parseScriptFlags, refusedHubAndReport, sharedFlag as shared, sharedFlags, type ScriptArgs } from './script_flags.js';

/** Every flag of the script, in its order, then difflora's own. */
export const SDXL_TRAIN_FLAGS: Readonly<Record<string, FlagSpec>> = Object.freeze({
  pretrained_model_name_or_path: shared('pretrained_model_name_or_path', { describe: 'Hub id of the pretrained SDXL model (read from the offline Hugging Face cache) or a local diffusers folder (StableDiffusionXLPipeline). Required.' }),
  pretrained_vae_model_name_or_path: { kind: 'string', group: 'Model', describe: "A VAE folder or Hub id to use instead of the model's (e.g. one without SDXL's fp16 NaN problem); it then runs in the weight dtype, where the model's VAE stays float32." },
  revision: shared('revision'),
  variant: shared('variant', { describe: "Variant of the model files, e.g. 'fp16' (every model, as the script)." }),
  ...sharedFlags('dataset_name', 'dataset_config_name', 'train_data_dir', 'image_column', 'caption_column', 'validation_prompt', 'num_validation_images', 'validation_epochs', 'max_train_samples', 'output_dir', 'cache_dir', 'seed'),
  resolution: shared('resolution', { default: D.resolution as number, describe: 'Input image resolution: every image is resized (shorter side, bilinear) to it, then cropped square; its size and crop offset go into the time ids.' }),
  center_crop: shared('center_crop'),
  random_flip: shared('random_flip', { describe: 'Flip images horizontally at random (p = 0.5), before the crop as the script (the crop offset is in the flipped image).' }),
  train_text_encoder: { kind: 'boolean', group: 'LoRA', default: false, describe: "Train LoRA on both text encoders' attention (q/k/v/out_proj) too." },
  ...sharedFlags('train_batch_size', 'num_train_epochs', 'max_train_steps', 'checkpointing_steps', 'checkpoints_total_limit', 'resume_from_checkpoint', 'gradient_accumulation_steps'),
  gradient_checkpointing: shared('gradient_checkpointing', { describe: 'Save memory by recomputing activations in the backward pass (slower): the UNet, and with --train_text_encoder both text encoders.' }),
  ...sharedFlags('learning_rate', 'scale_lr', 'lr_scheduler', 'lr_warmup_steps', 'snr_gamma', 'allow_tf32', 'dataloader_num_workers', 'use_8bit_adam', 'adam_beta1', 'adam_beta2', 'adam_weight_decay', 'adam_epsilon'),
  max_grad_norm: shared('max_grad_norm', { describe: 'Clip the total gradient norm to this (as the script, which clips for real).' }),
  ...sharedFlags('push_to_hub', 'hub_token', 'prediction_type', 'hub_model_id', 'logging_dir', 'report_to', 'mixed_precision', 'local_rank', 'enable_xformers_memory_efficient_attention'),
  enable_npu_flash_attention: { kind: 'boolean', group: 'Precision', default: false, describe: 'Flash attention on Ascend NPUs (torch_npu). Refused: difflora runs on CPUs and CUDA GPUs.' },
  noise_offset: shared('noise_offset'),
  rank: shared('rank'),
  debug_loss: { kind: 'boolean', group: 'Logging', default: false, describe: "Log each image's loss to TensorBoard as loss_for_<file name>." },
  ...DIFFLORA_FLAGS,
  ...CACHE_FLAGS,
  ...LORA_VARIANT_FLAGS,
} satisfies Record<string, FlagSpec>);

const TABLE: FlagTable = { command: 'difflora train-sdxl', flags: SDXL_TRAIN_FLAGS };
const USAGE = 'Usage: difflora train-sdxl --pretrained_model_name_or_path=<SDXL model> (--dataset_name=<name> | --train_data_dir=<dir>) [flags]\n\n'
  + "SDXL LoRA fine-tuning: the flags of diffusers' train_text_to_image_lora_sdxl.py, same names and defaults.";

export async function sdxlTrainHelp(): Promise<string> {
  return flagParser([], TABLE, USAGE).getHelp();
}

/** The parsed command line: the library's options, what the CLI shows before training, and whether to train the built-in default. */
export type SdxlTrainArgs = ScriptArgs<SdxlTrainOptions> & {
  /** No model and no data flags: train the built-in default (a generated tiny SDXL pipeline and pictures, lib/builtin/default.ts). */
  builtinDefault: boolean;
};

/**
 * Parses the flags of `difflora train-sdxl`. `env` supplies LOCAL_RANK as in the script. Throws a UsageError
 * listing every problem: unknown flags, bad values, the script's own checks, refused flags.
 */
export function parseSdxlTrainArgs(argv: readonly string[], env: NodeJS.ProcessEnv = process.env): SdxlTrainArgs {
  let builtinDefault = false;
  const args = parseScriptFlags<SdxlTrainOptions>(argv, env, TABLE, USAGE, SDXL_TRAIN_OPTION_RULES, (r, options, warnings) => {
    builtinDefault = [r.pretrained_model_name_or_path, r.dataset_name, r.train_data_dir].every((v) => v === undefined);
    if (r.dataset_config_name !== undefined) {
      warnings.push(`--dataset_config_name=${String(r.dataset_config_name)}: not used; difflora reads the parquet files of the train split under --dataset_name (point --dataset_name at the configuration's folder to pick one)`);
    }
    return [
      ...(builtinDefault ? [] : sdxlTrainProblems(options, 'flag')), ...refusedHubAndReport(r), ...bucketsCaptionsProblems({ resolution: D.resolution, ...options }, 'flag'),
      ...(r.enable_npu_flash_attention === true ? ['--enable_npu_flash_attention needs an Ascend NPU (torch_npu); difflora runs on CPUs and CUDA GPUs (use --enable_xformers_memory_efficient_attention)'] : []),
    ];
  });
  return { ...args, builtinDefault };
}
