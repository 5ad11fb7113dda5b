// How a training command uses --cache_latents (latent_cache.ts): the cache built when the data opens, with a
// progress line, then the VAE off the training device: disposed when nothing needs it later, or (validation decodes
// with it) parked on the CPU and brought back only while validating.
import type { AutoencoderKL } from '../models/autoencoder_kl.js';
import { emptyCache } from '../scope.js';
import type { ResolvedCacheOptions } from './cache_options.js';
import { LatentCache } from './latent_cache.js';
import { TextEmbeddingCache } from './text_cache.js';
import type { Tensor } from '../tensor.js';
import type { LatentCacheSource } from './train_data.js';

/** A frozen model that may leave the training device once its outputs are cached. */
export interface Parkable { to(target: { device: string }): unknown; dispose(): void }

/** A model taken off the training device: `use` brings it back around a call (validation); `gone` once disposed. */
export class ParkedModel {
  #state: 'on-device' | 'parked' | 'gone' = 'on-device';
  constructor(private readonly model: Parkable, private readonly device: string) {}

  /** Frees the device: disposed when `keep` is false, else moved to the CPU. */
  park(keep: boolean): void {
    if (this.#state !== 'on-device') return;
    if (keep) {
      if (this.device !== 'cpu') this.model.to({ device: 'cpu' });
      this.#state = 'parked';
    } else {
      this.model.dispose();
      this.#state = 'gone';
    }
    emptyCache();
  }

  /** Runs `fn` with the model back on the training device (no-op when it never left), then parks it again. */
  async use<T>(fn: () => Promise<T>): Promise<T> {
    if (this.#state === 'gone') throw new Error('internal: the model was freed after caching and cannot be used again');
    if (this.#state === 'on-device' || this.device === 'cpu') return fn();
    this.model.to({ device: this.device });
    try { return await fn(); } finally { this.model.to({ device: 'cpu' }); emptyCache(); }
  }
}

export interface LatentCachingContext {
  device: string;
  /** The folder for cache files when an image's folder is not writable (--output_dir/latent_cache). */
  fallbackDir: string;
  onNotice?: (message: string) => void;
  signal?: AbortSignal;
  /** Whether the VAE is needed after caching (validation decodes with it): parked on the CPU, else disposed. */
  keepVae: boolean;
}

/** Lines of "caching latents N/M" at most this often (plus the first and the last). */
const PROGRESS_EVERY_MS = 2000;

/**
 * The data's --cache_latents source (undefined when caching is off), and the VAE's parking: after the cache is
 * built the VAE leaves the device (disposed, or on the CPU when validation needs it).
 */
export function latentCaching(o: ResolvedCacheOptions, vae: AutoencoderKL, c: LatentCachingContext): { source: LatentCacheSource | undefined; vae: ParkedModel } {
  const parked = new ParkedModel(vae, c.device);
  if (!o.cacheLatents) return { source: undefined, vae: parked };
  const source: LatentCacheSource = async (items, transform, placement = {}) => {
    let last = 0;
    const cache = await LatentCache.build({
      ...transform, items, vae, signal: c.signal, toDisk: o.cacheLatentsToDisk ? { fallbackDir: c.fallbackDir, ...placement } : null,
      onProgress: (done, total) => {
        const now = Date.now();
        if (done === 1 || done === total || now - last >= PROGRESS_EVERY_MS) {
          last = now;
          c.onNotice?.(`caching latents ${done}/${total}${o.cacheLatentsToDisk ? ' (to disk)' : ''}`);
        }
      },
    });
    parked.park(c.keepVae);
    return cache;
  };
  return { source, vae: parked };
}

export interface TextCaching {
  /** The kept outputs (undefined when --cache_text_embeddings is off). */
  cache: TextEmbeddingCache | undefined;
  /** The text encoders, parked after the cache is filled. */
  encoders: ParkedModel[];
  /** Fills the cache with the data's captions (a progress line), then parks the text encoders. */
  fill(captions: readonly string[]): void;
  /** Runs `fn` with the VAE and text encoders back on the device (validation). */
  use<T>(fn: () => Promise<T>): Promise<T>;
}

/**
 * --cache_text_embeddings: each distinct caption encoded once by `encode` (its outputs, [1, …] each), then the text
 * encoders off the device (disposed, or on the CPU when validation needs them).
 */
export function textCaching(
  o: ResolvedCacheOptions, encoders: Parkable[], encode: (caption: string) => Tensor[], c: Omit<LatentCachingContext, 'fallbackDir' | 'keepVae'> & { keepEncoders: boolean; vae: ParkedModel },
): TextCaching {
  const parked = encoders.map((m) => new ParkedModel(m, c.device));
  const cache = o.cacheTextEmbeddings ? new TextEmbeddingCache() : undefined;
  return {
    cache,
    encoders: parked,
    fill(captions) {
      if (!cache) return;
      let last = 0;
      cache.fill(captions, encode, (done, total) => {
        const now = Date.now();
        if (done === 1 || done === total || now - last >= PROGRESS_EVERY_MS) {
          last = now;
          c.onNotice?.(`caching text embeddings ${done}/${total}`);
        }
      });
      for (const p of parked) p.park(c.keepEncoders);
    },
    use<T>(fn: () => Promise<T>): Promise<T> {
      let run = (): Promise<T> => c.vae.use(fn);
      for (const p of parked) {
        const inner = run;
        run = () => p.use(inner);
      }
      return run();
    },
  };
}
