// The LoRA-variant flags of `train`, `train-sdxl` and `train-dreambooth` (lib/training/lora_variant_options.ts).
// The defaults are LORA_VARIANT_DEFAULTS (shown in --help); `train` keeps a flag at its default out of its parsed
// arguments, so the parsed script flags compare equal with or without these.
import { LORA_TYPES, LORA_VARIANT_DEFAULTS as D, type LoraVariantOptions } from '../training/lora_variant_options.js';
import type { FlagSpec } from './train_args.js';

const GROUP = 'LoRA variants (difflora; sd-scripts/LyCORIS)';

export const LORA_VARIANT_FLAGS: Readonly<Record<string, FlagSpec>> = Object.freeze({
  lora_type: { kind: 'string', group: GROUP, choices: LORA_TYPES, default: D.loraType, describe: "The adapter: lora (the scripts'), locon (LoRA on the UNet's ResNet/proj/resampler convs too), loha, lokr, dora. The text encoders (--train_text_encoder) get the same type." },
  lora_alpha: { kind: 'float', group: GROUP, describe: 'lora_alpha: adapters are scaled by alpha/rank (default: --rank, scale 1, as the scripts). Folded into the up weights of a diffusers-named file (diffusers gives such a file one alpha, the rank of its first layer), an .alpha key in Kohya/LyCORIS files.' },
  lora_target_modules: { kind: 'string', group: GROUP, describe: "Comma-separated module-name suffixes of the UNet layers to adapt (default to_k,to_q,to_v,to_out.0; each must match a module)." },
  conv_rank: { kind: 'int', group: GROUP, describe: 'Rank of the adapters on k×k convs (default --rank with locon); with loha/lokr/dora it adds the LoCon convs.' },
  conv_alpha: { kind: 'float', group: GROUP, describe: 'Alpha of the conv adapters (default --conv_rank).' },
  lokr_factor: { kind: 'int', group: GROUP, default: D.lokrFactor, describe: "LoKr: split each dimension by this factor (-1: LyCORIS' most balanced split)." },
  export_kohya: { kind: 'boolean', group: GROUP, default: D.exportKohya, describe: 'Also write the LoRA in the Kohya/LyCORIS layout (lora_unet_…, alpha, dora_scale, hada_*/lokr_*) as pytorch_lora_weights_kohya.safetensors, for A1111/ComfyUI/sd-scripts.' },
} satisfies Record<string, FlagSpec>);

/** The LoRA-variant flags of a yargs parse as options (camelCased), those not given or at their default left out. */
export function loraVariantArgs(r: Readonly<Record<string, unknown>>): LoraVariantOptions {
  const out: Record<string, unknown> = {};
  for (const [flag, spec] of Object.entries(LORA_VARIANT_FLAGS)) {
    const v = r[flag];
    if (v !== undefined && v !== spec.default) out[flag.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase())] = v;
  }
  return out as LoraVariantOptions;
}
