// The flags of diffusers' examples/dreambooth/train_dreambooth_lora.py (0.31), same names, defaults and meaning,
// parsed into the library's DreamBoothOptions. The flags it shares with train_text_to_image_lora.py keep their
// help from train_args.ts; flags that cannot act here are refused (exit 2), every problem listed at once.
import { CACHE_FLAGS } from './cache_flags.js';
import {
  DREAMBOOTH_DEFAULTS as D, DREAMBOOTH_OPTION_RULES, PRIOR_GENERATION_PRECISION_CHOICES, dreamBoothProblems, dreamBoothWarnings, type DreamBoothOptions,
} from '../training/dreambooth_options.js';
import { OPTIM_FLAGS } from './optim_flags.js';
import { DIFFLORA_FLAGS, flagParser, type FlagSpec, type FlagTable } from './train_args.js';
import { BUCKETS_CAPTIONS_FLAGS } from './buckets_captions_flags.js';
import { bucketsCaptionsProblems } from '../training/buckets_captions_options.js';
import { LORA_VARIANT_FLAGS } from './lora_variant_flags.js';
import { parseScriptFlags, refusedHubAndReport, sharedFlag as shared, sharedFlags, type ScriptArgs } from './script_flags.js';
const dflt = (key: string): string | number | boolean => D[key] as string | number | boolean;

/** Every flag of the script, in its order. */
export const DREAMBOOTH_FLAGS: Readonly<Record<string, FlagSpec>> = Object.freeze({
  ...sharedFlags('pretrained_model_name_or_path', 'revision', 'variant'),
  tokenizer_name: { kind: 'string', group: 'Model', describe: "A tokenizer folder or id, if not the model's tokenizer/." },
  instance_data_dir: { kind: 'string', group: 'Data', describe: 'A folder of pictures of the subject (the instance images). Required.' },
  class_data_dir: { kind: 'string', group: 'Data', describe: 'A folder of class images for prior preservation; the missing ones are generated there.' },
  instance_prompt: { kind: 'string', group: 'Data', describe: "The prompt with the subject's identifier, e.g. 'a photo of sks dog'. Required." },
  class_prompt: { kind: 'string', group: 'Data', describe: "The prompt of the class images, e.g. 'a photo of dog'." },
  validation_prompt: shared('validation_prompt'),
  num_validation_images: shared('num_validation_images'),
  validation_epochs: shared('validation_epochs', { default: dflt('validationEpochs') }),
  with_prior_preservation: { kind: 'boolean', group: 'Prior preservation', default: false, describe: 'Add the prior-preservation loss on class images.' },
  prior_loss_weight: { kind: 'float', group: 'Prior preservation', default: dflt('priorLossWeight'), describe: 'The weight of the prior-preservation loss.' },
  num_class_images: { kind: 'int', group: 'Prior preservation', default: dflt('numClassImages'), describe: 'Class images wanted; when --class_data_dir holds fewer, the rest are generated from --class_prompt.' },
  output_dir: shared('output_dir', { default: dflt('outputDir') }),
  ...sharedFlags('seed', 'resolution', 'center_crop'),
  train_text_encoder: { kind: 'boolean', group: 'LoRA', default: false, describe: "Train LoRA on the text encoder's attention (q/k/v/out_proj) too." },
  train_batch_size: shared('train_batch_size', { default: dflt('trainBatchSize') }),
  sample_batch_size: { kind: 'int', group: 'Prior preservation', default: dflt('sampleBatchSize'), describe: 'Batch size of the class-image generation.' },
  num_train_epochs: shared('num_train_epochs', { default: dflt('numTrainEpochs') }),
  ...sharedFlags('max_train_steps', 'checkpointing_steps', 'checkpoints_total_limit', 'resume_from_checkpoint', 'gradient_accumulation_steps', 'gradient_checkpointing'),
  learning_rate: shared('learning_rate', { default: dflt('learningRate') }),
  ...sharedFlags('scale_lr', 'lr_scheduler', 'lr_warmup_steps'),
  lr_num_cycles: { kind: 'int', group: 'Optimisation', default: dflt('lrNumCycles'), describe: 'Hard resets of --lr_scheduler=cosine_with_restarts.' },
  lr_power: { kind: 'float', group: 'Optimisation', default: dflt('lrPower'), describe: 'Power factor of --lr_scheduler=polynomial.' },
  ...sharedFlags('dataloader_num_workers', 'use_8bit_adam', 'adam_beta1', 'adam_beta2', 'adam_weight_decay', 'adam_epsilon'),
  max_grad_norm: shared('max_grad_norm', { describe: 'Clip the total gradient norm to this (as the script, which clips for real).' }),
  ...sharedFlags('push_to_hub', 'hub_token', 'hub_model_id', 'logging_dir', 'allow_tf32', 'report_to', 'mixed_precision'),
  prior_generation_precision: { kind: 'string', group: 'Prior preservation', choices: PRIOR_GENERATION_PRECISION_CHOICES, describe: 'Precision of the class-image generation (unset: fp16 on a GPU, fp32 on a CPU; fp16 needs CUDA).' },
  local_rank: shared('local_rank'),
  enable_xformers_memory_efficient_attention: shared('enable_xformers_memory_efficient_attention'),
  pre_compute_text_embeddings: { kind: 'boolean', group: 'Text encoder', default: false, describe: 'Encode the prompts once before training (not with --train_text_encoder).' },
  tokenizer_max_length: { kind: 'int', group: 'Text encoder', describe: "The prompts' token length (default the tokenizer's 77)." },
  text_encoder_use_attention_mask: { kind: 'boolean', group: 'Text encoder', default: false, describe: "Pass the tokenizer's attention mask to the text encoder." },
  validation_images: { kind: 'string', group: 'Validation', describe: 'Images for image-conditioned validation (DeepFloyd IF). Refused: difflora has no such pipeline.' },
  class_labels_conditioning: { kind: 'string', group: 'Model', describe: "'timesteps': the timesteps as the UNet's class labels (only UNets with a class embedding use them; SD's have none)." },
  rank: shared('rank'),
  cuda_graphs: DIFFLORA_FLAGS.cuda_graphs!,
  ...BUCKETS_CAPTIONS_FLAGS,
  ...OPTIM_FLAGS,
  ...LORA_VARIANT_FLAGS,
  ...CACHE_FLAGS,
} satisfies Record<string, FlagSpec>);

const TABLE: FlagTable = { command: 'difflora train-dreambooth', flags: DREAMBOOTH_FLAGS };
const USAGE = 'Usage: difflora train-dreambooth --pretrained_model_name_or_path=<model> --instance_data_dir=<dir> --instance_prompt=<prompt> [flags]\n\n'
  + "DreamBooth LoRA fine-tuning: the flags of diffusers' train_dreambooth_lora.py, same names and defaults.";

export async function dreamBoothHelp(): Promise<string> {
  return flagParser([], TABLE, USAGE).getHelp();
}

/** The parsed command line: the library's options, and what the CLI shows before training. */
export type DreamBoothArgs = ScriptArgs<DreamBoothOptions>;

/**
 * Parses the flags of `difflora train-dreambooth`. `env` supplies LOCAL_RANK as in the script. Throws a
 * UsageError listing every problem: unknown flags, bad values, the script's own checks, refused flags.
 */
export function parseDreamBoothArgs(argv: readonly string[], env: NodeJS.ProcessEnv = process.env): DreamBoothArgs {
  return parseScriptFlags<DreamBoothOptions>(argv, env, TABLE, USAGE, DREAMBOOTH_OPTION_RULES, (r, options, warnings) => {
    warnings.push(...dreamBoothWarnings(options));
    if (r.class_labels_conditioning !== undefined) warnings.push(`--class_labels_conditioning=${String(r.class_labels_conditioning)}: no effect on this UNet (it has no class embedding; diffusers ignores the labels the same way)`);
    return [
      ...dreamBoothProblems(options, 'flag'), ...refusedHubAndReport(r), ...bucketsCaptionsProblems({ resolution: D.resolution, ...options }, 'flag'),
      ...(r.validation_images !== undefined ? ['--validation_images is for image-conditioned pipelines (DeepFloyd IF super-resolution), which difflora does not have'] : []),
    ];
  });
}
