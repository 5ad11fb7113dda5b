// --cache_latents and --cache_latents_to_disk (sd-scripts' flags): before training, every image of the data is
// encoded once by the VAE for each of its epoch-independent *views* (the center crop, unflipped and, with
// --random_flip, flipped), and the VAE's DiagonalGaussian parameters (mean and log-variance, the encoder's raw
// output) are kept. Each step then samples mean + std·ε from the kept distribution with the very draws the uncached
// step takes (step.ts's sampleLatentDist), so a cached run equals an uncached one bit for bit on CPU: the uncached
// step encodes item by item (encodeLatents) exactly as the cache does.
//
// A view is keyed by what decides its pixels: the image, the target size (h×w), the crop's top-left and the flip
// (and, on disk, the VAE's weights and the resize). Aspect-ratio buckets plug in by giving each item its own size:
// the key and the files already carry it.
//
// While training, the loader does not decode the images: it asks this cache for each item's view (loadImage), which
// draws the flip from the item's stream as the decoder would, so every other draw (caption choice) stays in place.
//
// On disk (--cache_latents_to_disk) one safetensors file per image sits next to it, `<image>.difflora_latents.safetensors`
// (written atomically: a SIGKILL leaves the old file or none, never a half-written one; a file that cannot be read
// or whose key differs is recomputed), or under the fallback folder when the image's folder is not writable.
import { createHash } from 'node:crypto';
import { accessSync, constants, existsSync, mkdirSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { noGrad } from '../autograd.js';
import { MAX_IMAGE_BYTES, Rng, loadTrainImage, type Interpolation, type TrainImage, type TransformOptions } from '../data/transforms.js';
import { readRegularFile } from '../io/files.js';
import { loadSafetensors, saveSafetensors } from '../io/safetensors.js';
import type { AutoencoderKL } from '../models/autoencoder_kl.js';
import { dispose, keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';

/**
 * One image to cache and the size its view is cropped to, [height, width]: the square resolution, or with
 * aspect-ratio buckets its bucket (the loader's viewOf(index).targetSize), with `resized` the size it is resized to
 * first when the bucket plan fixes one ([width, height]).
 */
export interface LatentCacheItem {
  imagePath: string; targetSize: readonly [number, number]; resized?: readonly [number, number];
  /** Loaded as a bucket (the loader's `target` option: cover-resize, crop offsets floored), even when the bucket is square at the resolution. */
  bucketed?: boolean;
}

/** A batch item's view: its image, its size and whether it was flipped (the loader's Batch says which). */
export interface LatentView { imagePath: string; targetSize: readonly [number, number]; flipped: boolean }

/** The views of a loader batch (with buckets the batch's targetSizes; without, every item at resolution × resolution). */
export function batchViews(b: { imagePaths: readonly string[]; flipped: readonly boolean[]; targetSizes?: readonly (readonly [number, number])[] }, resolution: number): LatentView[] {
  return b.imagePaths.map((imagePath, i) => ({ imagePath, flipped: b.flipped[i] ?? false, targetSize: b.targetSizes?.[i] ?? [resolution, resolution] }));
}

/** The transform every item goes through (the loader's options; each item's size is its own: LatentCacheItem). */
export interface LatentCacheTransform {
  resolution: number;
  randomFlip: boolean;
  /** The SDXL script's flip-then-crop order (its flipped view is another crop). */
  flipBeforeCrop: boolean;
  interpolation: Interpolation;
  /** --skip_broken_images: an image that cannot be read is left out of the cache (the loader then skips and counts it) instead of failing. */
  skipBroken?: boolean;
}

export interface LatentCacheOptions extends LatentCacheTransform {
  /** The images to encode, with their view sizes (an image listed twice with the same size is encoded once). */
  items: readonly LatentCacheItem[];
  vae: AutoencoderKL;
  /**
   * Keep the distributions in files: next to each image, or, for images without a lasting place of their own (a
   * parquet dataset's rows, written to a temporary folder at each load), in `sharedDir` named by the image bytes'
   * hash; under `fallbackDir` when that folder is not writable.
   */
  toDisk?: { fallbackDir: string; sharedDir?: string } | null;
  /** After each image (done of total). */
  onProgress?: (done: number, total: number) => void;
  signal?: AbortSignal;
}

interface Entry { dist: Tensor; originalSize: [number, number]; cropTopLeft: [number, number] }

/** Encodes done by the VAE since the process started (tests count them: a second run from disk encodes nothing). */
export const latentCacheStats = { encodes: 0, diskHits: 0, diskWrites: 0, rejected: 0 };

/** The suffix of a cache file next to its image. */
export const LATENT_CACHE_SUFFIX = '.difflora_latents.safetensors';

const VIEW_NAMES = ['unflipped', 'flipped'] as const;

/** A fixed flip for loadTrainImage (center crop draws nothing else): nextFloat() < 0.5 is the flip. */
class FixedFlip extends Rng {
  constructor(private readonly flip: boolean) { super(0); }
  override nextFloat(): number { return this.flip ? 0 : 0.75; }
  override nextInt(): number { throw new Error('internal: a cached view has a center crop (no random crop draws)'); }
}

/**
 * The VAE's identity for the cache key: a SHA-256 of its config and of every weight's name, dtype, shape and bytes
 * (a changed or re-saved-different VAE gives another key; the same weights give the same key wherever they load from).
 */
export function vaeIdentity(vae: AutoencoderKL): string {
  const h = createHash('sha256');
  h.update(JSON.stringify(vae.config));
  for (const [name, t] of vae.namedParameters()) {
    h.update(`${name}:${t.dtype}:${t.shape.join('x')};`);
    h.update(new Uint8Array(t._toBuffer()));
  }
  return h.digest('hex');
}

const writable = (dir: string): boolean => {
  try {
    accessSync(dir, constants.W_OK);
    return true;
  } catch {
    return false;
  }
};

/**
 * Where an image's cache file goes: next to it (sd-scripts' layout), or (its folder not writable) under
 * `fallbackDir`, named by a hash of its path; with `sharedDir` (images without a lasting path), in that folder
 * (or `fallbackDir`) named by a hash of the image's bytes.
 */
export function latentCacheFile(imagePath: string, o: { fallbackDir: string; sharedDir?: string }): string {
  if (o.sharedDir !== undefined) {
    const tag = createHash('sha256').update(readRegularFile(imagePath, 'image', MAX_IMAGE_BYTES)).digest('hex');
    const dir = writable(o.sharedDir) ? join(o.sharedDir, LATENT_CACHE_DIR) : o.fallbackDir;
    return join(dir, `${tag}${LATENT_CACHE_SUFFIX}`);
  }
  if (writable(dirname(imagePath))) return imagePath + LATENT_CACHE_SUFFIX;
  const tag = createHash('sha256').update(imagePath).digest('hex').slice(0, 16);
  return join(o.fallbackDir, `${basename(imagePath)}.${tag}${LATENT_CACHE_SUFFIX}`);
}

/** The folder of cache files inside a parquet dataset's folder. */
export const LATENT_CACHE_DIR = '.difflora_latent_cache';

export class LatentCache {
  /** Each image view's [unflipped, flipped] entries, by viewKey(image, size). */
  readonly #byView = new Map<string, (Entry | undefined)[]>();
  /** Images that could not be read (skipBroken): the loader gets their error. */
  readonly #broken = new Map<string, Error>();
  readonly #randomFlip: boolean;
  /** The VAE's scaling factor (the step scales the sampled latents by it, the VAE itself may be gone). */
  readonly scalingFactor: number;

  private constructor(randomFlip: boolean, scalingFactor: number) {
    this.#randomFlip = randomFlip;
    this.scalingFactor = scalingFactor;
  }

  /** Encodes (or reads from disk) every view of every image; the distributions stay on the VAE's device. */
  static async build(o: LatentCacheOptions): Promise<LatentCache> {
    const cache = new LatentCache(o.randomFlip, o.vae.scalingFactor);
    try {
      const flips = o.randomFlip ? [false, true] : [false];
      const items = [...new Map(o.items.map((it) => [viewKey(it.imagePath, it.targetSize), it])).values()];
      const identity = o.toDisk ? vaeIdentity(o.vae) : '';
      const weight = o.vae.parameters()[0];
      const device = weight?.device ?? 'cpu';
      for (const [done, item] of items.entries()) {
        if (o.signal?.aborted) throw new Error('caching latents: aborted');
        const file = item.imagePath;
        let views: TrainImage[];
        try {
          views = await Promise.all(flips.map((flip) => loadTrainImage(file, viewTransform(o, item, flip))));
        } catch (e) {
          if (!o.skipBroken) throw e;
          cache.#broken.set(file, e as Error);
          o.onProgress?.(done + 1, items.length);
          continue;
        }
        const keyOf = (img: TrainImage): string => JSON.stringify({
          vae: identity, size: item.targetSize, resized: item.resized ?? null, crop: img.cropTopLeft, flipped: img.flipped,
          interpolation: o.interpolation, flipBeforeCrop: o.flipBeforeCrop, dtype: weight?.dtype ?? 'float32',
        });
        const path = o.toDisk ? latentCacheFile(file, o.toDisk) : null;
        const fromDisk = path ? readCacheFile(path, views.map(keyOf), device) : null;
        const dists = fromDisk ?? views.map((img) => encodeView(o.vae, img, item.targetSize));
        if (path && !fromDisk) {
          mkdirSync(dirname(path), { recursive: true });
          const tensors = Object.fromEntries(dists.map((d, i) => [VIEW_NAMES[i]!, d]));
          const metadata = Object.fromEntries(views.map((img, i) => [`key_${VIEW_NAMES[i]!}`, keyOf(img)]));
          saveSafetensors(path, tensors, { format: 'difflora-latents', ...metadata });
          latentCacheStats.diskWrites += 1;
        }
        cache.#byView.set(viewKey(file, item.targetSize), views.map((img, i) => ({ dist: dists[i]!, originalSize: img.originalSize, cropTopLeft: img.cropTopLeft })));
        o.onProgress?.(done + 1, items.length);
      }
      return cache;
    } catch (e) {
      cache.dispose();
      throw e;
    }
  }

  /**
   * The loader's image loading while training: the item's cached view, with the flip drawn from its stream as
   * loadTrainImage draws it (center crop: no crop draws), and no pixels.
   */
  readonly loadImage = (file: string, t: TransformOptions & { target?: { width: number; height: number } }): Promise<TrainImage> => {
    if (!(t.centerCrop ?? false)) return Promise.reject(new Error('internal: cached latents need a center crop'));
    const broken = this.#broken.get(file);
    if (broken) return Promise.reject(broken);
    const flipped = (t.randomFlip ?? false) ? t.rng!.nextFloat() < 0.5 : false;
    const targetSize: [number, number] = t.target ? [t.target.height, t.target.width] : [t.resolution, t.resolution];
    const e = this.entry({ imagePath: file, targetSize, flipped });
    return Promise.resolve({ data: new Float32Array(0), targetSize, cropTopLeft: [...e.cropTopLeft], flipped, originalSize: [...e.originalSize] });
  };

  /** The kept distributions of a batch's views (batchViews), [B, 2·C, h, w] on the training device (the caller disposes it). */
  gather(views: readonly LatentView[]): Tensor {
    const parts = views.map((v) => this.entry(v).dist);
    return parts.length === 1 ? parts[0]!.clone() : torch.cat(parts);
  }

  private entry(v: LatentView): Entry {
    if (v.flipped && !this.#randomFlip) throw new Error(`internal: a flipped view of '${v.imagePath}' was asked for without random flip`);
    const e = this.#byView.get(viewKey(v.imagePath, v.targetSize))?.[v.flipped ? 1 : 0];
    if (!e) throw new Error(`the latent cache has no ${v.flipped ? 'flipped' : 'unflipped'} ${v.targetSize.join('×')} view of '${v.imagePath}'`);
    return e;
  }

  /** Views kept. */
  get size(): number { return [...this.#byView.values()].reduce((n, v) => n + v.length, 0); }

  dispose(): void {
    for (const views of this.#byView.values()) for (const e of views) e?.dist.dispose();
    this.#byView.clear();
  }
}

const viewKey = (imagePath: string, [h, w]: readonly [number, number]): string => `${h}x${w}\0${imagePath}`;

/**
 * What loadTrainImage does to an item for one cached view: the center crop at the item's size, flipped or not. With
 * aspect-ratio buckets (the loader's `target` option) pass the item's bucket: target { width, height, resized }.
 */
export function viewTransform(t: LatentCacheTransform, item: LatentCacheItem, flip: boolean): TransformOptions {
  const [h, w] = item.targetSize;
  const bucketed = item.bucketed === true || h !== t.resolution || w !== t.resolution || item.resized !== undefined;
  const target = bucketed ? { target: { width: w, height: h, ...(item.resized ? { resized: item.resized } : {}) } } : {};
  return { resolution: t.resolution, ...target, centerCrop: true, randomFlip: flip, flipBeforeCrop: t.flipBeforeCrop, interpolation: t.interpolation, rng: new FixedFlip(flip) };
}

/** One view through the VAE alone (batch of 1, as encodeLatents encodes each item): its DiagonalGaussian parameters [1, 2·C, h, w]. */
function encodeView(vae: AutoencoderKL, img: TrainImage, [h, w]: readonly [number, number]): Tensor {
  const weight = vae.parameters()[0];
  latentCacheStats.encodes += 1;
  return keep(noGrad(() => tidy(() => {
    const pixels = torch.tensor(img.data, { shape: [1, 3, h, w] });
    const onVae = weight ? pixels.to({ dtype: weight.dtype, device: weight.device }) : pixels;
    const posterior = vae.encode(onVae);
    return posterior.parameters;
  })));
}

/** A cache file's views when it holds exactly the expected keys; null (recompute) when it is absent, unreadable or stale. */
function readCacheFile(path: string, keys: readonly string[], device: string): Tensor[] | null {
  if (!existsSync(path)) return null;
  let loaded: { tensors: Map<string, Tensor>; metadata: Record<string, string> } | undefined;
  try {
    loaded = tidy(() => {
      const c = loadSafetensors(path, { device });
      for (const t of c.tensors.values()) keep(t);
      return c;
    });
    const { tensors, metadata } = loaded;
    const ok = tensors.size === keys.length && keys.every((k, i) => metadata[`key_${VIEW_NAMES[i]!}`] === k && tensors.has(VIEW_NAMES[i]!));
    if (!ok) throw new Error('stale');
    latentCacheStats.diskHits += 1;
    return keys.map((_, i) => tensors.get(VIEW_NAMES[i]!)!);
  } catch {
    if (loaded) dispose([...loaded.tensors.values()]);
    latentCacheStats.rejected += 1;
    return null;
  }
}
