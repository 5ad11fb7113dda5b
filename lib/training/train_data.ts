// The training data of the loop: a dataset (imagefolder today), the prefetching loader with its resumable
// state, and each batch turned into tensors (pixel values, tokenized captions) on the training device.
import type { CLIPTokenizer } from '../models/clip_tokenizer.js';
import { loadImageFolder, shuffleAndTruncate } from '../data/imagefolder.js';
import { loadParquetDataset, locateDataset } from '../data/parquet_dataset.js';
import { ImageCaptionLoader, type Batch, type LoaderState } from '../data/loader.js';
import type { Interpolation } from '../data/transforms.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import type { TextCaching } from './cache_run.js';
import { batchViews, type LatentCache, type LatentCacheItem, type LatentCacheTransform } from './latent_cache.js';
import { distinctCaptions } from './text_cache.js';
import type { ResolvedTrainOptions } from './options.js';

export interface TrainDataOptions {
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
export async function openTrainData(o: ResolvedTrainDataOptions, ctx: { tokenizer: CLIPTokenizer; device: string; shard?: { rank: number; worldSize: number }; latentCache?: LatentCacheSource; textCache?: TextCaching }): Promise<TrainData> {
  return openCaptionedImages(o, {
    device: ctx.device, shard: ctx.shard,
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
    : loadImageFolder(o.trainDataDir!, columns);
  if (o.maxTrainSamples) dataset = shuffleAndTruncate(dataset, o.maxTrainSamples, seed);
  const transform = { resolution: o.resolution, randomFlip: o.randomFlip, flipBeforeCrop: ctx.flipBeforeCrop ?? false, interpolation: mode as Interpolation, skipBroken: o.skipBrokenImages };
  ctx.cacheCaptions?.(distinctCaptions(Array.from({ length: dataset.length }, (_, i) => dataset.get(i)), o));
  // a parquet dataset's images have no lasting path: their cache files go in a folder of the dataset's
  const placement = o.datasetName ? { sharedDir: locateDataset(o.datasetName, { cacheDir: o.cacheDir ?? undefined }).dir } : {};
  // each item's view size (with buckets: the loader's viewOf(index))
  const items = Array.from({ length: dataset.length }, (_, i) => ({ imagePath: dataset.get(i).imagePath, targetSize: [o.resolution, o.resolution] as const }));
  const cache = ctx.latentCache ? await ctx.latentCache(items, transform, placement) : undefined;
  const loader = new ImageCaptionLoader(dataset, {
    batchSize: o.trainBatchSize, resolution: o.resolution, centerCrop: o.centerCrop, randomFlip: o.randomFlip, flipBeforeCrop: ctx.flipBeforeCrop,
    interpolation: mode as Interpolation, seed, numWorkers: o.dataloaderNumWorkers, skipBroken: o.skipBrokenImages, shard: ctx.shard,
    ...(cache ? { loadImage: cache.loadImage } : {}),
  });
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
