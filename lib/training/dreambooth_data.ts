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
import { ImageCaptionLoader, type Batch, type LoaderState } from '../data/loader.js';
import type { CLIPTokenizer } from '../models/clip_tokenizer.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import { listImages } from './class_images.js';
import { batchViews, type LatentCache } from './latent_cache.js';
import type { TrainerData } from './trainer.js';

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

/** A dataset of `length` items cycling through `files`, each captioned with `prompt`. */
function cycling(files: string[], prompt: string, length: number): Dataset {
  return { length, columns: ['image', 'text'], get: (i) => ({ imagePath: files[i % files.length]!, captions: [prompt] }) };
}

const SEED_WHEN_UNSEEDED = 0;

/** The instance images and (prior preservation) the class images the data reads. */
export function dreamBoothImages(o: Pick<DreamBoothDataOptions, 'instanceDataDir' | 'prior'>): { instances: string[]; classes: string[] } {
  const instances = imagesOf(o.instanceDataDir, 'Instance images', '--instance_data_dir');
  const classes = o.prior ? imagesOf(o.prior.dir, 'Class images', '--class_data_dir').slice(0, o.prior.numClassImages) : [];
  return { instances, classes };
}

export function openDreamBoothData(o: DreamBoothDataOptions, prompts: PromptSource, device: string, latentCache?: LatentCache): TrainerData<DreamBoothBatch> {
  const { instances, classes } = dreamBoothImages(o);
  const length = Math.max(instances.length, classes.length);
  const loaderOptions = {
    batchSize: o.trainBatchSize, resolution: o.resolution, centerCrop: o.centerCrop, randomFlip: false,
    interpolation: 'bilinear' as const, seed: o.seed ?? SEED_WHEN_UNSEEDED, numWorkers: o.dataloaderNumWorkers,
    ...(latentCache ? { loadImage: latentCache.loadImage } : {}),
  };
  const loaders = [new ImageCaptionLoader(cycling(instances, o.instancePrompt, length), loaderOptions)];
  if (o.prior) loaders.push(new ImageCaptionLoader(cycling(classes, o.prior.prompt, length), loaderOptions));
  const main = loaders[0]!;
  let epoch = main.getState().epoch;
  return {
    batchesPerEpoch: main.batchesPerEpoch,
    datasetLength: length,
    async next() {
      if (main.getState().epoch !== epoch) return null;
      const batches = [];
      for (const l of loaders) batches.push(await l.next()); // one after the other: the same order, positions in step
      return collate(batches, prompts, o, device, latentCache);
    },
    nextEpoch() { epoch += 1; },
    state() { return { epoch, loader: main.getState() }; },
    restore(s: { epoch: number; loader: LoaderState }) {
      for (const l of loaders) l.setState(s.loader);
      epoch = s.epoch;
    },
    async close() {},
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
