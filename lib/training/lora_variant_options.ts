// The LoRA-variant options every training command shares (issue #19; sd-scripts' --network_module/--network_alpha/
// --network_args conv_dim…, LyCORIS' algo=): the adapter type, alpha apart from the rank, the adapted modules, the
// conv rank/alpha, LoKr's factor, and the Kohya/LyCORIS export. Domains here, the flags in lib/cli/lora_variant_flags.ts;
// the adapters themselves in lib/lora/variants.ts.
import { LORA_TYPES, adaptsConvs, type LoraType, type LoraVariantConfig } from '../lora/variants.js';
// types only: options.ts spreads these rules into its own table (a value import would be a cycle)
import type { OptionNaming, Rule } from './options.js';

export { LORA_TYPES, type LoraType };

export interface LoraVariantOptions {
  /** 'lora' (default), 'locon' (LoRA on the UNet's convs too), 'loha', 'lokr', 'dora'. */
  loraType?: LoraType;
  /** lora_alpha: the adapter is scaled by alpha / rank (default: the rank, scale 1, as the scripts). */
  loraAlpha?: number | null;
  /** Comma-separated module-name suffixes the UNet's adapters go on (default the command's: to_k,to_q,to_v,to_out.0). */
  loraTargetModules?: string | null;
  /** Rank of the adapters on k×k convs (default the rank); with loha/lokr/dora it adds the LoCon convs. */
  convRank?: number | null;
  /** Alpha of the conv adapters (default the conv rank). */
  convAlpha?: number | null;
  /** LoKr: the factor its dimensions are split by (-1: LyCORIS' most balanced split). */
  lokrFactor?: number;
  /** Also write the LoRA in the Kohya/LyCORIS layout as pytorch_lora_weights_kohya.safetensors (A1111, ComfyUI). */
  exportKohya?: boolean;
}

export const LORA_VARIANT_RULES: Readonly<Record<keyof LoraVariantOptions, Rule>> = {
  loraType: { kind: 'string', choices: LORA_TYPES },
  loraAlpha: { kind: 'float', domain: 'positive', nullable: true },
  loraTargetModules: { kind: 'string', nullable: true },
  convRank: { kind: 'int', min: 1, nullable: true },
  convAlpha: { kind: 'float', domain: 'positive', nullable: true },
  lokrFactor: { kind: 'int', min: -1 },
  exportKohya: { kind: 'boolean' },
};

export const LORA_VARIANT_DEFAULTS = Object.freeze({
  loraType: 'lora',
  lokrFactor: -1,
  exportKohya: false,
} as const satisfies { [K in keyof LoraVariantOptions]?: NonNullable<LoraVariantOptions[K]> });

/** Every option with its value: the defaulted ones set, the others the value given or null. */
export type ResolvedLoraVariantOptions =
  & { readonly [K in keyof typeof LORA_VARIANT_DEFAULTS]-?: NonNullable<LoraVariantOptions[K]> }
  & { readonly [K in Exclude<keyof LoraVariantOptions, keyof typeof LORA_VARIANT_DEFAULTS>]-?: Exclude<LoraVariantOptions[K], undefined> | null };

const nameOf = (key: string, flag: string, naming: OptionNaming): string => (naming === 'flag' ? flag : `${key} (${flag})`);

/** The module names of a --lora_target_modules value ('to_q, to_v' → ['to_q', 'to_v']). */
export function parseTargetModules(v: string): string[] {
  return v.split(',').map((s) => s.trim());
}

/** The cross-checks between these options (their domains are LORA_VARIANT_RULES'), phrased with the names of `naming`. */
export function loraVariantProblems(options: object, naming: OptionNaming): string[] {
  const o = options as Readonly<Record<string, unknown>>;
  const n = (k: keyof LoraVariantOptions, flag: string) => nameOf(k, flag, naming);
  const problems: string[] = [];
  const type = (o.loraType ?? 'lora') as string;
  if (typeof o.loraTargetModules === 'string' && o.loraTargetModules !== '') {
    const names = parseTargetModules(o.loraTargetModules);
    const bad = names.filter((s) => s === '' || /\s/.test(s));
    if (bad.length) problems.push(`${n('loraTargetModules', '--lora_target_modules')} must be a comma-separated list of module names (e.g. to_q,to_k,to_v,to_out.0), got ${JSON.stringify(o.loraTargetModules)}`);
  }
  const convRank = o.convRank ?? null;
  if (convRank !== null && type === 'lora') {
    problems.push(`${n('convRank', '--conv_rank')} puts LoRA on the UNet's convs, which ${n('loraType', '--lora_type')} lora does not adapt: use --lora_type locon (LoCon), or loha/lokr/dora with --conv_rank`);
  }
  if ((o.convAlpha ?? null) !== null && !adaptsConvs({ type: type as LoraType, convRank: convRank as number | null })) {
    problems.push(`${n('convAlpha', '--conv_alpha')} is the alpha of conv adapters, and ${n('loraType', '--lora_type')} ${type} without --conv_rank adapts no convs (use --lora_type locon, or give --conv_rank)`);
  }
  const factor = o.lokrFactor;
  if (factor === 0) problems.push(`${n('lokrFactor', '--lokr_factor')} must be -1 (LyCORIS' balanced split) or a positive factor, got 0`);
  if (typeof factor === 'number' && factor !== -1 && type !== 'lokr') problems.push(`${n('lokrFactor', '--lokr_factor')} applies to --lora_type lokr only (got --lora_type ${type})`);
  return problems;
}

/**
 * The adapter configuration of a command's UNet (its default targets `defaults`) from its resolved options: the rank,
 * alpha (default rank), targets (the given list or the command's), conv rank/alpha, LoKr factor; gaussian init as the scripts.
 */
export function unetVariantConfig(o: ResolvedLoraVariantOptions & { readonly rank: number }, defaults: readonly string[]): LoraVariantConfig {
  return {
    type: o.loraType, rank: o.rank, alpha: o.loraAlpha ?? o.rank, init: 'gaussian', lokrFactor: o.lokrFactor,
    targetModules: o.loraTargetModules !== null ? parseTargetModules(o.loraTargetModules) : defaults,
    convRank: o.convRank, convAlpha: o.convAlpha,
  };
}

/** A text encoder's adapters: the same type and alpha on its attention projections (no convs there). */
export function textEncoderVariantConfig(o: ResolvedLoraVariantOptions & { readonly rank: number }, targets: readonly string[]): LoraVariantConfig {
  return { type: o.loraType === 'locon' ? 'lora' : o.loraType, rank: o.rank, alpha: o.loraAlpha ?? o.rank, init: 'gaussian', lokrFactor: o.lokrFactor, targetModules: targets };
}

/** How the attach errors name the options: flags on the CLI and in the library (the library's options name their flag too). */
export const VARIANT_FLAG_NAMES = { targets: '--lora_target_modules', rank: '--rank', convRank: '--conv_rank' } as const;
