// The caching options of every training command (sd-scripts' flags, issue #19): --cache_latents (each image's
// latent distribution encoded once, before training), --cache_latents_to_disk (the same, kept in files next to the
// data and re-read by later runs) and --cache_text_embeddings (each distinct caption encoded once). The VAE, and
// the frozen text encoders, then leave the training device (latent_cache.ts, text_cache.ts).
import type { OptionNaming, Rule } from './options.js';

// (a type import only: options.ts spreads these rules, so a value import back would be a cycle)
const bool: Rule = { kind: 'boolean' };

export interface CacheOptions {
  /** Encode every image once before training and sample its latent from the kept distribution at each step (needs centerCrop). */
  cacheLatents?: boolean;
  /** cacheLatents, with the distributions kept in files next to the data (keyed by VAE, size, crop and flip) and re-read by later runs. */
  cacheLatentsToDisk?: boolean;
  /** Encode each distinct caption once with the frozen text encoder(s) (not with trainTextEncoder). */
  cacheTextEmbeddings?: boolean;
}

export const CACHE_RULES: Readonly<Record<keyof CacheOptions, Rule>> = {
  cacheLatents: bool,
  cacheLatentsToDisk: bool,
  cacheTextEmbeddings: bool,
};

/**
 * The defaults: all off. They are applied here (resolveCacheOptions), not through the commands' tables of defaults, so
 * the options and flags of a run without caching stay as they were (not given: null in the resolved options).
 */
export const CACHE_DEFAULTS = Object.freeze({ cacheLatents: false, cacheLatentsToDisk: false, cacheTextEmbeddings: false });

/** The caching options resolved: --cache_latents_to_disk implies --cache_latents. */
export interface ResolvedCacheOptions { readonly cacheLatents: boolean; readonly cacheLatentsToDisk: boolean; readonly cacheTextEmbeddings: boolean }

/** The caching options of a command's options (given or resolved: null means not given). */
export function resolveCacheOptions(o: { [K in keyof CacheOptions]?: boolean | null }): ResolvedCacheOptions {
  const toDisk = o.cacheLatentsToDisk ?? CACHE_DEFAULTS.cacheLatentsToDisk;
  return { cacheLatents: toDisk || (o.cacheLatents ?? CACHE_DEFAULTS.cacheLatents), cacheLatentsToDisk: toDisk, cacheTextEmbeddings: o.cacheTextEmbeddings ?? CACHE_DEFAULTS.cacheTextEmbeddings };
}

/**
 * The checks between flags: a random crop cannot be cached (each epoch crops elsewhere; sd-scripts refuses
 * random_crop with cache_latents), nor can a text encoder that trains. Commands without a --center_crop flag that
 * could crop at random or a --train_text_encoder flag pass what they have; absent keys are not checked.
 */
export function cacheProblems(options: object, naming: OptionNaming): string[] {
  const o = options as Readonly<Record<string, unknown>>;
  const name = (k: string, flag: string) => (naming === 'flag' ? flag : `${k} (${flag})`);
  const problems: string[] = [];
  const latents = o.cacheLatents === true || o.cacheLatentsToDisk === true;
  if (latents && o.centerCrop !== true) {
    const flag = o.cacheLatentsToDisk === true ? name('cacheLatentsToDisk', '--cache_latents_to_disk') : name('cacheLatents', '--cache_latents');
    problems.push(`${flag} needs ${name('centerCrop', '--center_crop')}: a random crop differs at every epoch, so its latents cannot be cached (as sd-scripts refuses random_crop with cache_latents)`);
  }
  if (o.cacheTextEmbeddings === true && o.trainTextEncoder === true) {
    problems.push(`${name('cacheTextEmbeddings', '--cache_text_embeddings')} cannot be used with ${name('trainTextEncoder', '--train_text_encoder')}: a text encoder that trains gives other embeddings at every step`);
  }
  problems.push(...captionCachingProblems(o, naming));
  return problems;
}

/**
 * Caption transforms that make a caption differ per epoch cannot have their embeddings cached. The place for the
 * check of --shuffle_caption (feat-data: a shuffled caption is a new caption each epoch; sd-scripts refuses
 * cache_text_encoder_outputs with shuffle_caption). An empty caption (--caption_dropout_rate) is just another
 * caption and is cached like the others.
 */
export function captionCachingProblems(o: Readonly<Record<string, unknown>>, naming: OptionNaming): string[] {
  const name = (k: string, flag: string) => (naming === 'flag' ? flag : `${k} (${flag})`);
  if (o.cacheTextEmbeddings === true && o.shuffleCaption === true) {
    return [`${name('cacheTextEmbeddings', '--cache_text_embeddings')} cannot be used with ${name('shuffleCaption', '--shuffle_caption')}: a shuffled caption differs at every epoch`];
  }
  return [];
}
