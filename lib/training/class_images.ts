// Class images for DreamBooth's prior preservation, as train_dreambooth_lora.py makes them: when --class_data_dir
// holds fewer than --num_class_images images, the base pipeline generates the missing ones from --class_prompt,
// --sample_batch_size at a time, at the model's default size and steps, in --prior_generation_precision.
//
// Resumable and never overwriting: image i is `<i>-<sha1 of its pixels>.jpg` (the script's name), i counting on
// from the images already there, so a run that was killed continues at the first missing index. Each image's
// initial latents come from its own generator (seeded by --seed and i) and batches are aligned on absolute
// indices, so an interrupted generation writes the same images as an uninterrupted one. Files are written
// atomically (a temporary file renamed into place): a kill never leaves half an image.
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, rmSync, statSync } from 'node:fs';
import { extname, join } from 'node:path';
import sharp from 'sharp';
import type { DType } from '../dtype.js';
import { writeFileAtomic } from '../io/atomic.js';
import { IMAGE_EXTENSIONS } from '../data/imagefolder.js';
import { deriveSeed } from '../data/transforms.js';
import type { FromPretrainedOptions } from '../models/loading.js';
import { StableDiffusionPipeline } from '../pipelines/stable_diffusion.js';
import { Generator } from '../random.js';
import { dispose } from '../scope.js';
import * as torch from '../torch.js';

/** The image files of a folder, sorted by name (hidden files, such as unfinished temporary files, excluded). */
export function listImages(dir: string): string[] {
  return readdirSync(dir).filter((n) => !n.startsWith('.') && IMAGE_EXTENSIONS.includes(extname(n).toLowerCase()))
    .filter((n) => statSync(join(dir, n)).isFile()).sort().map((n) => join(dir, n));
}

export interface ClassImagesOptions {
  model: string;
  load: FromPretrainedOptions;
  variant: string | null;
  classDataDir: string;
  classPrompt: string;
  numClassImages: number;
  sampleBatchSize: number;
  /** --prior_generation_precision: 'fp32' | 'fp16' | 'bf16'; 'no' or null: fp16 on CUDA, fp32 on CPU (the script's rule). */
  precision: string | null;
  device: string;
  /** --seed (0 when none): the seed of every image's own generator. */
  seed: number | null;
  /** After each batch: images there and wanted. */
  onProgress?: (p: { done: number; total: number; generated: number }) => void;
  signal?: AbortSignal;
}

/** The dtype of the class-image pipeline, as the script picks it. */
export function priorGenerationDtype(precision: string | null, device: string): DType {
  const cuda = device.startsWith('cuda');
  const dtype: DType = precision === 'fp32' ? 'float32' : precision === 'fp16' ? 'float16' : precision === 'bf16' ? 'bfloat16' : cuda ? 'float16' : 'float32';
  if (dtype === 'float16' && !cuda) throw new Error('--prior_generation_precision=fp16 needs a CUDA GPU: libtorch has no fp16 matmul on CPU; use fp32 or bf16');
  return dtype;
}

/** Removes temporary files a killed generation left in the folder (never another live process's). */
function removeStaleTemporaries(dir: string): void {
  for (const n of readdirSync(dir)) {
    const m = /^\.\d+-[0-9a-f]{40}\.jpg\.(\d+)\.[0-9a-f]{8}\.tmp$/.exec(n);
    if (m && Number(m[1]) !== process.pid) rmSync(join(dir, n), { force: true });
  }
}

/** [B, H, W, 3] floats in [0, 1] → the script's PIL images: (x · 255).round() as uint8, one buffer each. */
function toUint8(array: { data: Float32Array; shape: [number, number, number, number] }): Buffer[] {
  const [b, h, w, c] = array.shape;
  const per = h * w * c;
  return Array.from({ length: b }, (_, i) => {
    const out = Buffer.alloc(per);
    for (let j = 0; j < per; j++) out[j] = Math.min(255, Math.max(0, Math.round((array.data[i * per + j] as number) * 255)));
    return out;
  });
}

/**
 * Generates the missing class images (none when the folder already holds numClassImages images); creates the
 * folder. Returns how many it wrote.
 */
export async function generateClassImages(o: ClassImagesOptions): Promise<number> {
  mkdirSync(o.classDataDir, { recursive: true });
  removeStaleTemporaries(o.classDataDir);
  const have = listImages(o.classDataDir).length;
  if (have >= o.numClassImages) return 0;
  const dtype = priorGenerationDtype(o.precision, o.device);
  const pipe = StableDiffusionPipeline.fromPretrained(o.model, { ...o.load, variant: o.variant ?? undefined, dtype, device: o.device });
  let written = 0;
  o.onProgress?.({ done: have, total: o.numClassImages, generated: 0 });
  try {
    const S = o.sampleBatchSize;
    for (let start = Math.floor(have / S) * S; start < o.numClassImages; start += S) {
      const indices = Array.from({ length: Math.min(S, o.numClassImages - start) }, (_, j) => start + j);
      const images = await generateBatch(pipe, o, indices);
      for (const [j, i] of indices.entries()) {
        if (i < have) continue; // written by the run that was interrupted
        await writeClassImage(o.classDataDir, i, images[j]!);
        written += 1;
      }
      o.onProgress?.({ done: have + written, total: o.numClassImages, generated: written });
    }
  } finally {
    pipe.dispose();
  }
  return written;
}

/** One batch: each image from its own latents (generator seeded by --seed and its index), as raw RGB. */
async function generateBatch(pipe: StableDiffusionPipeline, o: ClassImagesOptions, indices: number[]): Promise<{ rgb: Buffer; width: number; height: number }[]> {
  const size = pipe.unet.config.sampleSize;
  const side = (Array.isArray(size) ? size[0] : size) ?? 64;
  const shape = [1, pipe.unet.config.inChannels, side, side];
  const per = indices.map((i) => torch.randn(shape, { generator: new Generator('cpu').manualSeed(deriveSeed(o.seed ?? 0, i)) }));
  const latents = torch.cat(per);
  try {
    const out = await pipe.generate({ prompt: indices.map(() => o.classPrompt), latents, outputType: 'array', signal: o.signal });
    const array = out.array!;
    const [, height, width] = array.shape;
    return toUint8(array).map((rgb) => ({ rgb, width, height }));
  } finally {
    dispose([latents, ...per]);
  }
}

/** `<index>-<sha1 of the pixels>.jpg`, as the script names it; an existing file is never replaced. */
async function writeClassImage(dir: string, index: number, image: { rgb: Buffer; width: number; height: number }): Promise<void> {
  const path = join(dir, `${index}-${createHash('sha1').update(image.rgb).digest('hex')}.jpg`);
  if (existsSync(path)) throw new Error(`class image '${path}' already exists; difflora never overwrites a class image`);
  const jpg = await sharp(image.rgb, { raw: { width: image.width, height: image.height, channels: 3 } }).jpeg({ quality: 75 }).toBuffer();
  writeFileAtomic(path, jpg, 'class image');
}
