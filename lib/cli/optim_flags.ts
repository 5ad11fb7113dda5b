// The flags of the optimizer and the EMA (lib/training/optim_options.ts), in every training command's table.
import { OPTIMIZER_CHOICES, OPTIM_DEFAULTS as D } from '../training/optim_options.js';
import type { FlagSpec } from './train_args.js';

const GROUP = 'Optimizer and EMA (difflora; diffusers DreamBooth/sd-scripts flags)';
const TRUE_FALSE = ['true', 'false'] as const;

export const OPTIM_FLAGS: Readonly<Record<string, FlagSpec>> = Object.freeze({
  optimizer: { kind: 'string', group: GROUP, default: D.optimizer, choices: OPTIMIZER_CHOICES, describe: `The optimizer (case-insensitive): adamw (AdamW, decoupled weight decay), prodigy (Prodigy: learns its step size; use --learning_rate=1.0) or lion (Lion: the sign of the momentum; use a learning rate 3–10× smaller than AdamW's). Prodigy reads --adam_beta1/--adam_beta2/--adam_epsilon/--adam_weight_decay, Lion --adam_beta1/--adam_beta2/--adam_weight_decay.` },
  prodigy_beta3: { kind: 'float', group: GROUP, describe: "Prodigy's coefficient for the running averages of its step-size estimate; unset: the square root of --adam_beta2. Ignored with another optimizer." },
  prodigy_decouple: { kind: 'string', group: GROUP, choices: TRUE_FALSE, describe: 'Prodigy with AdamW-style decoupled weight decay (true, the default) or L2 weight decay added to the gradient (false). Ignored with another optimizer.' },
  prodigy_use_bias_correction: { kind: 'string', group: GROUP, choices: TRUE_FALSE, describe: "Prodigy with Adam's bias correction (default false). Ignored with another optimizer." },
  prodigy_safeguard_warmup: { kind: 'string', group: GROUP, choices: TRUE_FALSE, describe: 'Prodigy: leave the learning rate out of the step-size estimate, against issues during a warm-up (default false). Ignored with another optimizer.' },
  use_ema: { kind: 'boolean', group: GROUP, default: false, describe: 'Keep an exponential moving average of the LoRA weights (diffusers\' EMAModel), checkpointed, and saved as pytorch_lora_weights_ema.safetensors beside pytorch_lora_weights.safetensors. Validation uses the trained weights.' },
  ema_decay: { kind: 'float', group: GROUP, default: D.emaDecay, describe: `The EMA's largest decay, in (0, 1): at optimizer step t it uses min(ema_decay, t / (t + 9)) (0 at step 1).` },
} satisfies Record<string, FlagSpec>);
