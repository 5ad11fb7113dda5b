// The caching flags of `difflora train`, `train-sdxl` and `train-dreambooth` (sd-scripts' names; lib/training/cache_options.ts).
import type { CacheOptions } from '../training/cache_options.js';
import type { FlagSpec } from './train_args.js';

const GROUP = 'Caching (sd-scripts flags)';

export const CACHE_FLAGS: Readonly<Record<string, FlagSpec>> = Object.freeze({
  cache_latents: { kind: 'boolean', group: GROUP, describe: "Encode every image once with the VAE before training (both flips with --random_flip) and sample the latents from the kept distributions; the VAE then leaves the device. Needs --center_crop." },
  cache_latents_to_disk: { kind: 'boolean', group: GROUP, describe: 'As --cache_latents, with the distributions kept in files next to the data (keyed by VAE, size, crop and flip) that later runs re-read instead of encoding again.' },
  cache_text_embeddings: { kind: 'boolean', group: GROUP, describe: "Encode each distinct caption once with the frozen text encoder(s) before training; they then leave the device. Not with --train_text_encoder." },
} satisfies Record<string, FlagSpec>);

/** The caching flags given on a command line (only those set, so parsed flags compare equal without them). */
export function cacheArgs(r: Readonly<Record<string, unknown>>): CacheOptions {
  return {
    ...(r.cache_latents === true ? { cacheLatents: true } : {}),
    ...(r.cache_latents_to_disk === true ? { cacheLatentsToDisk: true } : {}),
    ...(r.cache_text_embeddings === true ? { cacheTextEmbeddings: true } : {}),
  };
}
