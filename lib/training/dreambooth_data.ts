// The data of DreamBooth training, as train_dreambooth_lora.py's DreamBoothDataset and collate_fn: item i is the
// instance image i mod N_instance with the instance prompt and, with prior preservation, the class image
// i mod N_class with the class prompt (the dataset is as long as the larger set); each image is resized (shorter
// side, bilinear) to --resolution and center- or randomly cropped square, never flipped; a batch is
// [instance…, class…] with the prompts' token ids (or their pre-computed embeddings) in the same order.
//
// Two loaders (lib/data/loader.ts) with the same seed walk the same shuffled order, one over the instance
// images and one over their class partners, so a batch's halves always belong together and one saved position
// restores both. (A pair's random crops draw from the same per-item stream; the script draws them one after
// the other from torch's.)
import { existsSync, statSync } from 'node:fs';
import type { Dataset } from '../data/imagefolder.js';
import type { TransformOptions } from '../data/transforms.js';
import { ImageCaptionLoader, type Batch, type LoaderState } from '../data/loader.js';
import type { CLIPTokenizer } from '../models/clip_tokenizer.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import { listImages } from './class_images.js';
import { batchViews, type LatentCache } from './latent_cache.js';
import type { LatentCacheSource } from './train_data.js';
import type { TrainerData } from './trainer.js';
import { captionExtensionOf, type ResolvedBucketsCaptions } from './buckets_captions_options.js';
import { captionFileOf, readCaptionFile, varies } from '../data/captions.js';
import { bucketPlanFor, captionOptionsOf } from './train_data.js';

/** A DreamBooth batch on the training device; the micro-step disposes it. */
export interface DreamBoothBatch {
  /** [B or 2B, 3, R, R] in [-1, 1]: instance images, then class images (absent with --cache_latents). */
  pixelValues?: Tensor;
  /** --cache_latents: the images' kept latent distributions [B or 2B, 2·C, h, w], in the same order. */
  latentDist?: Tensor;
  /** Token ids [B or 2B, L], in the same order (absent with pre-computed embeddings). */
  inputIds?: Tensor;
  /** The tokenizer's attention mask [B or 2B, L], with --text_encoder_use_attention_mask. */
  attentionMask?: Tensor;
  /** Pre-computed prompt embeddings [B or 2B, L, D] (--pre_compute_text_embeddings). */
  encoderHiddenStates?: Tensor;
}

export interface DreamBoothDataOptions {
  instanceDataDir: string;
  instancePrompt: string;
  /** The class images and prompt (prior preservation); null without. */
  prior: { dir: string; prompt: string; numClassImages: number } | null;
  resolution: number;
  centerCrop: boolean;
  trainBatchSize: number;
  dataloaderNumWorkers: number;
  seed: number | null;
  tokenizerMaxLength: number | null;
  useAttentionMask: boolean;
  /**
   * Captions and buckets (sd-scripts' flags): an instance image with a caption file (--caption_extension) is
   * captioned by it instead of --instance_prompt; dropout and shuffling apply to every prompt used; with buckets the
   * class image paired with an instance image is cropped to the instance image's bucket.
   */
  features?: ResolvedBucketsCaptions;
  onNotice?: (message: string) => void;
}

/** How a prompt reaches the step: token ids (the tokenizer), or embeddings encoded once (--pre_compute_text_embeddings). */
export type PromptSource =
  | { kind: 'tokens'; tokenizer: CLIPTokenizer }
  | { kind: 'embeddings'; instance: Tensor; class: Tensor | null };

/** The images of a folder that must hold some: the script's "Instance images root doesn't exists." named. */
export function imagesOf(dir: string, what: string, flag: string): string[] {
  if (!existsSync(dir) || !statSync(dir).isDirectory()) throw new Error(`${flag} '${dir}': ${what} root doesn't exist (no such folder)`);
  const files = listImages(dir);
  if (!files.length) throw new Error(`${flag} '${dir}' holds no images (looked for .jpg .jpeg .png .webp .bmp .gif .tiff .tif)`);
  return files;
}

/** A dataset of `length` items cycling through `files`, captioned with `prompts[file]` or else `prompt`. */
function cycling(files: string[], prompt: string, length: number, prompts: readonly (string | undefined)[] = []): Dataset {
  return { length, columns: ['image', 'text'], get: (i) => ({ imagePath: files[i % files.length]!, captions: [prompts[i % files.length] ?? prompt] }) };
}

const SEED_WHEN_UNSEEDED = 0;

/** The instance images and (prior preservation) the class images the data reads. */
export function dreamBoothImages(o: Pick<DreamBoothDataOptions, 'instanceDataDir' | 'prior'>): { instances: string[]; classes: string[] } {
  const instances = imagesOf(o.instanceDataDir, 'Instance images', '--instance_data_dir');
  const classes = o.prior ? imagesOf(o.prior.dir, 'Class images', '--class_data_dir').slice(0, o.prior.numClassImages) : [];
  return { instances, classes };
}

/**
 * The data of a DreamBooth run; `latentCaching` (--cache_latents): builds the cache of every instance and class image's
 * view once the loaders know each item's view (with buckets, the instance image's bucket for both halves).
 */
export async function openDreamBoothData(o: DreamBoothDataOptions, prompts: PromptSource, device: string, latentCaching?: LatentCacheSource): Promise<TrainerData<DreamBoothBatch>> {
  const built: { cache?: LatentCache } = {}; // the latent cache, built once the loaders exist (nothing decodes before next())
  const { instances, classes } = dreamBoothImages(o);
  const length = Math.max(instances.length, classes.length);
  const loaderOptions = {
    batchSize: o.trainBatchSize, resolution: o.resolution, centerCrop: o.centerCrop, randomFlip: false,
    interpolation: 'bilinear' as const, seed: o.seed ?? SEED_WHEN_UNSEEDED, numWorkers: o.dataloaderNumWorkers,
    ...(latentCaching ? { loadImage: (file: string, t: TransformOptions) => built.cache!.loadImage(file, t) } : {}),
  };
  const f = o.features;
  // caption files next to the instance images win over the instance prompt (sd-scripts' DreamBooth datasets)
  const ext = f ? captionExtensionOf(f) : undefined;
  const captions = instances.map((file) => { const c = ext === undefined ? undefined : captionFileOf(file, ext); return c === undefined ? undefined : readCaptionFile(c); });
  const withFiles = captions.filter((c) => c !== undefined).length;
  if (withFiles > 0) o.onNotice?.(`--instance_data_dir: ${withFiles} of ${instances.length} instance images captioned by their ${ext} files (the others by --instance_prompt)`);
  if (prompts.kind === 'embeddings' && f && (withFiles > 0 || varies(captionOptionsOf(f)))) {
    throw new Error(`--pre_compute_text_embeddings encodes --instance_prompt once: it cannot be used with ${withFiles > 0 ? `caption files (${ext}, --caption_extension)` : '--shuffle_caption or --caption_dropout_rate'}`);
  }
  const instanceData = cycling(instances, o.instancePrompt, length, captions);
  const buckets = f ? await bucketPlanFor(instanceData, { ...f, resolution: o.resolution }, o.onNotice) : undefined;
  const featureOptions = f ? { captions: captionOptionsOf(f) } : {};
  const loaders = [new ImageCaptionLoader(instanceData, { ...loaderOptions, ...featureOptions, ...(buckets ? { buckets } : {}) })];
  // a class image takes its instance partner's bucket (resized to cover it), so the batch's halves have one shape
  const classBuckets = buckets ? { ...buckets, resized: [] } : undefined;
  if (o.prior) loaders.push(new ImageCaptionLoader(cycling(classes, o.prior.prompt, length), { ...loaderOptions, ...featureOptions, ...(classBuckets ? { buckets: classBuckets } : {}) }));
  const main = loaders[0]!;
  if (latentCaching) {
    const views = loaders.flatMap((l) => Array.from({ length }, (_, i) => ({ imagePath: l.dataset.get(i).imagePath, ...l.viewOf(i) })));
    built.cache = await latentCaching(views, { resolution: o.resolution, randomFlip: false, flipBeforeCrop: false, interpolation: 'bilinear' });
  }
  let epoch = main.getState().epoch;
  return {
    batchesPerEpoch: main.batchesPerEpoch,
    datasetLength: length,
    async next() {
      if (main.getState().epoch !== epoch) return null;
      const batches = [];
      for (const l of loaders) batches.push(await l.next()); // one after the other: the same order, positions in step
      return collate(batches, prompts, o, device, built.cache);
    },
    nextEpoch() { epoch += 1; },
    state() { return { epoch, loader: main.getState() }; },
    restore(s: { epoch: number; loader: LoaderState }) {
      for (const l of loaders) l.setState(s.loader);
      epoch = s.epoch;
    },
    async close() { built.cache?.dispose(); },
  };
}

/** collate_fn: pixel values and prompts of the instance half, then of the class half. */
function collate(batches: Batch[], prompts: PromptSource, o: DreamBoothDataOptions, device: string, latentCache: LatentCache | undefined): DreamBoothBatch {
  const images = latentCache ? { latentDist: latentCache.gather(batches.flatMap((b) => batchViews(b, o.resolution))) } : { pixelValues: pixelsOf(batches, device) };
  if (prompts.kind === 'embeddings') {
    const parts = batches.map((b, i) => (i === 0 ? prompts.instance : prompts.class!).expand([b.captions.length, -1, -1]));
    const encoderHiddenStates = torch.cat(parts);
    for (const p of parts) p.dispose();
    return { ...images, encoderHiddenStates };
  }
  const encoded = prompts.tokenizer.call(batches.flatMap((b) => b.captions), { maxLength: o.tokenizerMaxLength ?? undefined, padding: 'max_length', truncation: true });
  const inputIds = prompts.tokenizer.toTensor(encoded.inputIds, device);
  const attentionMask = o.useAttentionMask ? prompts.tokenizer.toTensor(encoded.attentionMask, device) : undefined;
  return { ...images, inputIds, ...(attentionMask ? { attentionMask } : {}) };
}

/** The halves' pixels, instance then class, on the device. */
function pixelsOf(batches: Batch[], device: string): Tensor {
  const onDevice = (t: Tensor): Tensor => {
    if (device === 'cpu') return t;
    try { return t.to({ device }); } finally { t.dispose(); }
  };
  const pixels = batches.map((b) => torch.tensor(b.pixelValues, { shape: b.shape }));
  const pixelValues = onDevice(pixels.length === 1 ? pixels[0]! : torch.cat(pixels));
  if (pixels.length > 1) for (const p of pixels) p.dispose();
  return pixelValues;
}
