// The training data of the loop: a dataset (an imagefolder, sd-scripts' N_name repeat folders or caption files, or
// parquet files), the prefetching loader with its resumable state (caption dropout and shuffling, aspect-ratio
// buckets: lib/data/captions.ts, buckets.ts), and each batch turned into tensors (pixel values, tokenized captions)
// on the training device.
import type { CLIPTokenizer } from '../models/clip_tokenizer.js';
import { loadImageFolder, shuffleAndTruncate } from '../data/imagefolder.js';
import { loadParquetDataset, locateDataset } from '../data/parquet_dataset.js';
import { ImageCaptionLoader, type Batch, type LoaderState } from '../data/loader.js';
import type { Interpolation, TransformOptions } from '../data/transforms.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import type { TextCaching } from './cache_run.js';
import { batchViews, type LatentCache, type LatentCacheItem, type LatentCacheTransform } from './latent_cache.js';
import { distinctCaptions } from './text_cache.js';
import type { ResolvedTrainOptions } from './options.js';
import { captionExtensionOf, type BucketsCaptionsOptions, type ResolvedBucketsCaptions } from './buckets_captions_options.js';
import { bucketTableLines, planBuckets, readImageSizes, type BucketPlan } from '../data/buckets.js';
import { detectLayout, loadCaptionFolder, type CaptionOptions } from '../data/captions.js';
import type { Dataset } from '../data/imagefolder.js';

export interface TrainDataOptions extends BucketsCaptionsOptions {
  trainDataDir?: string | null;
  datasetName?: string | null;
  cacheDir?: string | null;
  imageColumn?: string;
  captionColumn?: string;
  maxTrainSamples?: number | null;
  resolution?: number;
  centerCrop?: boolean;
  randomFlip?: boolean;
  imageInterpolationMode?: string;
  trainBatchSize?: number;
  seed?: number | null;
  /** --dataloader_num_workers: images decoded at once, and 2 batches per worker decoded ahead (0: none ahead). */
  dataloaderNumWorkers?: number;
  /** --skip_broken_images: an image that cannot be read is skipped and counted instead of stopping the run. */
  skipBrokenImages?: boolean;
}

/**
 * train_text_to_image_lora.py's batch: the images and the captions' token ids; `keys`: each item's (epoch, position
 * in the epoch's global order), what its random draws are keyed by (sample_rng.ts).
 */
export interface TextToImageBatch {
  pixelValues?: Tensor; latentDist?: Tensor;
  /** Token ids, or with --cache_text_embeddings the kept last hidden states. */
  inputIds?: Tensor; encoderHiddenStates?: Tensor;
  keys: [number, number][];
}

/** A batch's images on the training device: the pixels, or with --cache_latents their kept latent distributions. */
export type BatchImages = { pixelValues: Tensor; latentDist?: undefined } | { latentDist: Tensor; pixelValues?: undefined };

export interface TrainData<B = TextToImageBatch> {
  readonly batchesPerEpoch: number;
  /** Items this process reads per epoch (the dataset's length in a single process; a saved data position counts them). */
  readonly datasetLength: number;
  /**
   * The next batch of this epoch, or null when the epoch is done. The caller disposes the tensors.
   */
  next(): Promise<B | null>;
  nextEpoch(): void;
  state(): { epoch: number; loader: LoaderState };
  /** Restores a saved state (checkpoint.ts's parseTrainingState checked it against datasetLength). */
  restore(state: { epoch: number; loader: LoaderState }): void;
  /** Images skipped so far (--skip_broken_images): how many times, and which files. */
  skipped(): { count: number; files: string[] };
  close(): Promise<void>;
}

const interpolations = new Set(['bilinear', 'lanczos', 'nearest', 'bicubic']);

/** The options the data reads, defaults filled in (resolveTrainOptions). */
export type ResolvedTrainDataOptions = Pick<ResolvedTrainOptions, keyof TrainDataOptions>;

/** Without --seed the data order is still fixed: the loader shuffles with seed 0. */
const SEED_WHEN_UNSEEDED = 0;

/**
 * `ctx.shard`: this process's share of each epoch in a data-parallel run (accelerate's BatchSamplerShard: process r
 * of N reads batches r, r + N, … of the epoch's order; loader.ts).
 */
export async function openTrainData(
  o: ResolvedTrainDataOptions,
  ctx: { tokenizer: CLIPTokenizer; device: string; shard?: { rank: number; worldSize: number }; onNotice?: (message: string) => void; latentCache?: LatentCacheSource; textCache?: TextCaching },
): Promise<TrainData> {
  return openCaptionedImages(o, {
    device: ctx.device, shard: ctx.shard, onNotice: ctx.onNotice,
    latentCache: ctx.latentCache,
    cacheCaptions: ctx.textCache ? (captions) => ctx.textCache!.fill(captions) : undefined,
    collate: (b, images) => ({
      ...images, keys: b.keys,
      ...(ctx.textCache?.cache ? { encoderHiddenStates: ctx.textCache.cache.gather(b.captions) } : { inputIds: ctx.tokenizer.inputIdsTensor(b.captions, { device: ctx.device }) }),
    }),
  });
}

/** What a command makes of the loader's batches: its batch from the images (already a tensor on the device) and the rest. */
export interface Collate<B> {
  device: string;
  collate(b: Batch, images: BatchImages): B;
  /** The SDXL script's flip-then-crop order (data/transforms.ts). */
  flipBeforeCrop?: boolean;
  /** This process's share of each epoch (a data-parallel run). */
  shard?: { rank: number; worldSize: number };
  /** The data's notices (the folder layout found, the bucket table). */
  onNotice?: (message: string) => void;
  /** --cache_latents: builds the cache of the dataset's images (latent_cache.ts); the batches then carry latentDist. */
  latentCache?: LatentCacheSource;
  /** --cache_text_embeddings: given every caption of the dataset once it is loaded (text_cache.ts). */
  cacheCaptions?: (captions: readonly string[]) => void;
}

/** Builds a latent cache for the dataset's images under the loader's transform (each process caches every image). */
export type LatentCacheSource = (items: readonly LatentCacheItem[], transform: LatentCacheTransform, placement?: { sharedDir?: string }) => Promise<LatentCache>;

/** The dataset (a folder or parquet files), shuffled and truncated as the script, behind the resumable loader. */
export async function openCaptionedImages<B>(o: ResolvedTrainDataOptions, ctx: Collate<B>): Promise<TrainData<B>> {
  if (!o.datasetName && !o.trainDataDir) throw new Error('Need either a dataset name or a training folder (--train_data_dir).');
  const mode = o.imageInterpolationMode;
  if (!interpolations.has(mode)) throw new Error(`--image_interpolation_mode '${mode}' is not supported here (use one of: ${[...interpolations].join(', ')})`);
  const seed = o.seed ?? SEED_WHEN_UNSEEDED;
  const columns = { imageColumn: o.imageColumn, captionColumn: o.captionColumn };
  // --dataset_name wins over --train_data_dir, as in the script: a local folder or a cached hub dataset of parquet files
  let dataset = o.datasetName
    ? await loadParquetDataset(o.datasetName, { ...columns, cacheDir: o.cacheDir ?? undefined })
    : openTrainFolder(o.trainDataDir!, columns, captionExtensionOf(o), ctx.onNotice);
  if (o.maxTrainSamples) dataset = shuffleAndTruncate(dataset, o.maxTrainSamples, seed);
  const buckets = await bucketPlanFor(dataset, o, ctx.onNotice);
  const transform = { resolution: o.resolution, randomFlip: o.randomFlip, flipBeforeCrop: ctx.flipBeforeCrop ?? false, interpolation: mode as Interpolation, skipBroken: o.skipBrokenImages };
  ctx.cacheCaptions?.(distinctCaptions(Array.from({ length: dataset.length }, (_, i) => dataset.get(i)), o));
  // a parquet dataset's images have no lasting path: their cache files go in a folder of the dataset's
  const placement = o.datasetName ? { sharedDir: locateDataset(o.datasetName, { cacheDir: o.cacheDir ?? undefined }).dir } : {};
  const built: { cache?: LatentCache } = {}; // the cache, built below once the loader knows each item's view (nothing decodes before next())
  const loader = new ImageCaptionLoader(dataset, {
    batchSize: o.trainBatchSize, resolution: o.resolution, centerCrop: o.centerCrop, randomFlip: o.randomFlip, flipBeforeCrop: ctx.flipBeforeCrop,
    interpolation: mode as Interpolation, seed, numWorkers: o.dataloaderNumWorkers, skipBroken: o.skipBrokenImages, shard: ctx.shard,
    captions: captionOptionsOf(o), ...(buckets ? { buckets } : {}),
    ...(ctx.latentCache ? { loadImage: (file: string, t: TransformOptions) => built.cache!.loadImage(file, t) } : {}),
  });
  // each item's view: its size (with buckets, its bucket) and the size it is resized to before the crop
  const items = Array.from({ length: dataset.length }, (_, i) => ({ imagePath: dataset.get(i).imagePath, ...loader.viewOf(i) }));
  const cache = ctx.latentCache ? (built.cache = await ctx.latentCache(items, transform, placement)) : undefined;
  let epoch = loader.getState().epoch;
  return {
    batchesPerEpoch: loader.batchesPerEpoch,
    datasetLength: loader.epochLength,
    async next() {
      if (loader.getState().epoch !== epoch) return null;
      const b = await loader.next();
      if (cache) return ctx.collate(b, { latentDist: cache.gather(batchViews(b, o.resolution)) });
      const pixels = torch.tensor(b.pixelValues, { shape: b.shape });
      const pixelValues = ctx.device === 'cpu' ? pixels : pixels.to({ device: ctx.device });
      if (pixelValues !== pixels) pixels.dispose();
      return ctx.collate(b, { pixelValues });
    },
    nextEpoch() { epoch += 1; },
    state() { return { epoch, loader: loader.getState() }; },
    restore(s: { epoch: number; loader: LoaderState }) {
      loader.setState(s.loader);
      epoch = s.epoch;
    },
    skipped() {
      return { count: loader.skipped, files: [...new Set(loader.skippedImages.map((s) => s.file))] };
    },
    async close() { cache?.dispose(); },
  };
}

/** The caption options of the loader (lib/data/captions.ts) from the resolved options. */
export function captionOptionsOf(o: Pick<ResolvedBucketsCaptions, 'shuffleCaption' | 'captionSeparator' | 'keepTokens' | 'captionDropoutRate'>): CaptionOptions {
  return { shuffleCaption: o.shuffleCaption, captionSeparator: o.captionSeparator, keepTokens: o.keepTokens, captionDropoutRate: o.captionDropoutRate };
}

/**
 * --train_data_dir as Hugging Face's imagefolder (a metadata.jsonl/csv), or, when the folder is unambiguously in
 * sd-scripts' layout (lib/data/captions.ts detectLayout), its N_name repeat folders or caption files.
 */
function openTrainFolder(dir: string, columns: { imageColumn: string; captionColumn: string }, captionExtension: string, onNotice?: (m: string) => void): Dataset {
  const layout = detectLayout(dir, captionExtension);
  if (layout.kind === 'imagefolder') return loadImageFolder(dir, columns);
  const dataset = loadCaptionFolder(dir, layout, captionExtension);
  const where = layout.kind === 'repeat-folders'
    ? `sd-scripts' repeat folders (${layout.folders.map((f) => `${f.repeats}_${f.classTokens}`).join(', ')})`
    : `images with ${captionExtension} caption files`;
  onNotice?.(`--train_data_dir: ${where}: ${dataset.images} images, ${dataset.length} per epoch with repeats`);
  return dataset;
}

/**
 * --enable_bucket: every item's bucket from its image's size (read from the headers), the table told as sd-scripts
 * logs it; undefined without buckets. An image whose size cannot be read fails here, or with --skip_broken_images is
 * given the square bucket (and skipped when it is decoded).
 */
export async function bucketPlanFor(
  dataset: Dataset, o: Pick<ResolvedBucketsCaptions, 'enableBucket' | 'minBucketReso' | 'maxBucketReso' | 'bucketResoSteps' | 'bucketNoUpscale'> & { resolution: number; skipBrokenImages?: boolean | null },
  onNotice?: (message: string) => void,
): Promise<BucketPlan | undefined> {
  if (!o.enableBucket) return undefined;
  const files = Array.from({ length: dataset.length }, (_, i) => dataset.get(i).imagePath);
  const unique = new Set(files).size;
  onNotice?.(`aspect-ratio buckets: reading the sizes of ${unique} images`);
  if (o.bucketNoUpscale) onNotice?.('--bucket_no_upscale: --min_bucket_reso and --max_bucket_reso are ignored (buckets come from the image sizes)');
  const R = o.resolution;
  const sizes = await readImageSizes(files, {
    onProgress: (done, total) => { if (total >= 2000) onNotice?.(`aspect-ratio buckets: ${done}/${total} image sizes read`); },
    ...(o.skipBrokenImages ? { fallback: [R, R] as [number, number] } : {}),
  });
  const plan = planBuckets(sizes, { resolution: R, minBucketReso: o.minBucketReso, maxBucketReso: o.maxBucketReso, bucketResoSteps: o.bucketResoSteps, bucketNoUpscale: o.bucketNoUpscale }, (i) => files[i]!);
  onNotice?.(bucketTableLines(plan).join('\n'));
  return plan;
}
