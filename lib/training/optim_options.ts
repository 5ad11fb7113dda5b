// The options of the optimizer and the EMA (issue #19), shared by `train`, `train-sdxl` and `train-dreambooth`:
// --optimizer adamw|prodigy|lion (diffusers' train_dreambooth_lora_sdxl.py has --optimizer AdamW/prodigy and the
// --prodigy_* flags; Lion is sd-scripts'), --use_ema and --ema_decay (diffusers' EMAModel). Each optimizer reads the
// Adam flags as diffusers maps them: betas (--adam_beta1, --adam_beta2), --adam_epsilon (not Lion) and
// --adam_weight_decay. The Prodigy flags are null when not given (the published defaults apply), so a run can say
// that they were given to another optimizer.
import { OPTIMIZER_KINDS, type OptimizerKind } from '../optim/optimizer.js';
import type { OptionNaming, Rule } from './options.js'; // types only: options.ts imports this file

export const OPTIMIZER_CHOICES = OPTIMIZER_KINDS;

export interface OptimOptions {
  /** 'adamw' (default), 'prodigy' or 'lion'. */
  optimizer?: OptimizerKind;
  /** Prodigy's beta3 (the d estimate's EMA); null: √adamBeta2. */
  prodigyBeta3?: number | null;
  /** Prodigy's AdamW-style decoupled weight decay; null: true. */
  prodigyDecouple?: boolean | null;
  /** Prodigy with Adam's bias correction; null: false. */
  prodigyUseBiasCorrection?: boolean | null;
  /** Prodigy's safeguard against a small d during warm-up; null: false. */
  prodigySafeguardWarmup?: boolean | null;
  /** Keep an EMA of the LoRA weights, saved as pytorch_lora_weights_ema.safetensors beside the trained ones. */
  useEma?: boolean;
  /** The EMA's largest decay (diffusers' EMAModel decay), in (0, 1). */
  emaDecay?: number;
}

export const OPTIM_RULES: Readonly<Record<keyof OptimOptions, Rule>> = {
  optimizer: { kind: 'string', choices: OPTIMIZER_CHOICES },
  prodigyBeta3: { kind: 'float', domain: 'unitInterval', nullable: true },
  prodigyDecouple: { kind: 'boolean', nullable: true },
  prodigyUseBiasCorrection: { kind: 'boolean', nullable: true },
  prodigySafeguardWarmup: { kind: 'boolean', nullable: true },
  useEma: { kind: 'boolean' },
  emaDecay: { kind: 'float', domain: 'unitInterval' },
};

export const OPTIM_DEFAULTS = Object.freeze({ optimizer: 'adamw', useEma: false, emaDecay: 0.9999 } as const);

/** The Prodigy options, null when not given. */
export const PRODIGY_OPTION_KEYS = ['prodigyBeta3', 'prodigyDecouple', 'prodigyUseBiasCorrection', 'prodigySafeguardWarmup'] as const;
export type ProdigyOptionKey = (typeof PRODIGY_OPTION_KEYS)[number];

export type ResolvedOptimOptions = {
  readonly optimizer: OptimizerKind;
  readonly prodigyBeta3: number | null;
  readonly prodigyDecouple: boolean | null;
  readonly prodigyUseBiasCorrection: boolean | null;
  readonly prodigySafeguardWarmup: boolean | null;
  readonly useEma: boolean;
  readonly emaDecay: number;
};

const flagName = (key: string) => `--${key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)}`;
const named = (key: string, naming: OptionNaming) => (naming === 'flag' ? flagName(key) : `${key} (${flagName(key)})`);

/** What the rules cannot say: --ema_decay in (0, 1), 0 excluded (the EMA would be the weights). */
export function optimProblems(o: Readonly<Record<string, unknown>>, naming: OptionNaming): string[] {
  const problems: string[] = [];
  if (o.emaDecay === 0) problems.push(`${named('emaDecay', naming)} must be in (0, 1), got 0`);
  return problems;
}

/**
 * The notices of a run's optimizer choice, as diffusers warns: Prodigy flags given to another optimizer (ignored),
 * --ema_decay without --use_ema (ignored), and Prodigy with a learning rate far from 1 (it multiplies the learned step).
 */
export function optimNotices(o: ResolvedOptimOptions & { readonly learningRate: number }): string[] {
  const notices: string[] = [];
  const given = PRODIGY_OPTION_KEYS.filter((k) => o[k] !== null);
  if (o.optimizer !== 'prodigy' && given.length) {
    notices.push(`${given.map(flagName).join(', ')} ${given.length === 1 ? 'is' : 'are'} ignored with --optimizer ${o.optimizer} (Prodigy's only)`);
  }
  if (!o.useEma && o.emaDecay !== OPTIM_DEFAULTS.emaDecay) notices.push(`--ema_decay=${o.emaDecay} is ignored without --use_ema`);
  if (o.optimizer === 'prodigy' && (o.learningRate <= 0.1 || o.learningRate >= 10)) {
    notices.push(`--learning_rate=${o.learningRate} with --optimizer prodigy: Prodigy learns its step size and --learning_rate multiplies it; it is generally better around 1.0`);
  }
  return notices;
}

/** Parses a true/false flag value as Python users write it (true, false, True, False, 1, 0); anything else unchanged. */
function boolValue(v: unknown): unknown {
  if (typeof v !== 'string') return v;
  const t = v.trim().toLowerCase();
  return t === 'true' || t === '1' ? true : t === 'false' || t === '0' ? false : v;
}

/**
 * The options among a command line's parsed flags (yargs' record, snake_case), those that differ from the defaults
 * (the library applies the same defaults; so the parsed flags compare equal with or without these): --optimizer
 * case-insensitive (AdamW, Prodigy, as diffusers), the --prodigy_* values true/false. A value that is neither stays
 * as given, for the rules to refuse naming the flag.
 */
export function optimOptionsFromFlags(r: Readonly<Record<string, unknown>>): Partial<OptimOptions> {
  const out: Record<string, unknown> = {};
  if (typeof r.optimizer === 'string' && r.optimizer !== OPTIM_DEFAULTS.optimizer) out.optimizer = r.optimizer.toLowerCase();
  if (r.prodigy_beta3 !== undefined) out.prodigyBeta3 = r.prodigy_beta3;
  for (const key of ['prodigyDecouple', 'prodigyUseBiasCorrection', 'prodigySafeguardWarmup'] as const) {
    const flag = flagName(key).slice(2);
    if (r[flag] !== undefined) out[key] = boolValue(r[flag]);
  }
  if (r.use_ema === true) out.useEma = true;
  if (r.ema_decay !== undefined && r.ema_decay !== OPTIM_DEFAULTS.emaDecay) out.emaDecay = r.ema_decay;
  return out as Partial<OptimOptions>;
}
