// The training image transform of train_text_to_image_lora.py, with sharp (libvips) instead of PIL:
//   image.convert('RGB') → Resize(resolution, interpolation) → CenterCrop | RandomCrop → RandomHorizontalFlip
//   → ToTensor → Normalize([0.5], [0.5])
// plus EXIF orientation (as datasets' Image feature applies it when decoding). Decoding and resizing run
// in libuv's thread pool, off the main thread. The file is read by difflora (never opened by libvips from a
// path): a FIFO, a device or a folder named like an image is refused without blocking, as a broken image.
import sharp from 'sharp';
import { readRegularFileAsync } from '../io/read_async.js';
import { DATA_DEFAULTS } from './defaults.js';
import { coverSize } from './buckets.js';

/**
 * A small seedable PRNG (mulberry32: 32-bit state, so the whole state is one number for exact resume).
 * Not for cryptography; enough for crops, flips, caption choice and shuffles.
 */
export class Rng {
  private s: number;

  constructor(seed: number = 0) { this.s = seedToU32(seed); }

  /** Uniform integer in [0, 2^32). */
  nextU32(): number {
    this.s = (this.s + 0x6d2b79f5) >>> 0;
    let t = this.s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }

  /** Uniform float in [0, 1). */
  nextFloat(): number { return this.nextU32() / 4294967296; }

  /** Uniform integer in [0, n), 1 ≤ n ≤ 2^32, without modulo bias. */
  nextInt(n: number): number {
    if (!Number.isInteger(n) || n < 1 || n > 4294967296) throw new RangeError(`Rng.nextInt: n must be an integer in [1, 2^32], got ${n}`);
    const limit = 4294967296 - (4294967296 % n); // reject draws ≥ limit
    for (;;) {
      const x = this.nextU32();
      if (x < limit) return x % n;
    }
  }

  getState(): number { return this.s; }
  setState(state: number): void { this.s = state >>> 0; }
}

/** Folds any finite number (negative, fractional, ≥ 2^32) into a well-mixed uint32 seed. */
function seedToU32(seed: number): number {
  if (!Number.isFinite(seed)) throw new RangeError(`seed must be finite, got ${seed}`);
  const lo = seed >>> 0;
  const hi = Math.floor(seed / 4294967296) >>> 0;
  return mix32(lo ^ mix32(hi + 0x9e3779b9));
}

function mix32(x: number): number {
  x = Math.imul(x ^ (x >>> 16), 0x85ebca6b);
  x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35);
  return (x ^ (x >>> 16)) >>> 0;
}

/** A seed derived from several integers (seed, epoch, position …), for independent per-item streams. */
export function deriveSeed(...parts: number[]): number {
  let h = 0x2545f491;
  for (const p of parts) h = mix32(h ^ seedToU32(p)) + 0x9e3779b9;
  return h >>> 0;
}

export type Interpolation = 'bilinear' | 'lanczos' | 'nearest' | 'bicubic';

const KERNELS: Record<Interpolation, keyof sharp.KernelEnum> = {
  bilinear: 'linear',
  lanczos: 'lanczos3',
  nearest: 'nearest',
  bicubic: 'cubic',
};

export interface TransformOptions {
  resolution: number;
  centerCrop?: boolean;
  randomFlip?: boolean;
  /**
   * train_text_to_image_lora_sdxl.py's order: the resized image is flipped, then cropped, so cropTopLeft (its
   * time ids) is the crop's offset in the flipped image. Default: crop, then flip the crop (train_text_to_image_lora.py).
   */
  flipBeforeCrop?: boolean;
  interpolation?: Interpolation;
  /** Needed for random crops and flips (draws: crop top, crop left, then flip). */
  rng?: Rng;
  /**
   * An aspect-ratio bucket (lib/data/buckets.ts) instead of the square `resolution`: the image is resized to
   * `resized` (default: just covering the bucket, sd-scripts' rule) and cropped to width × height (a center crop
   * at ⌊excess / 2⌋ as sd-scripts' trim, or a random one).
   */
  target?: { width: number; height: number; resized?: readonly [number, number] };
}

export interface TrainImage {
  /** float32 CHW, 3·H·W (H = W = R without a bucket), in [-1, 1]. */
  data: Float32Array;
  /** The size of the crop, [height, width]: [R, R], or the bucket's. */
  targetSize: [number, number];
  /** Where the crop starts in the resized image, [top, left] (the script's crop_top_left). */
  cropTopLeft: [number, number];
  flipped: boolean;
  /** Size after EXIF orientation, before resizing, [height, width] (the script's original_size). */
  originalSize: [number, number];
}

/** torchvision Resize(size) with an int: the shorter side becomes size, the longer int(size·long/short). */
export function resizedSize(width: number, height: number, resolution: number): [number, number] {
  if (width <= height) return [resolution, Math.floor((resolution * height) / width)];
  return [Math.floor((resolution * width) / height), resolution];
}

/** Python's round(): half to even (what torchvision's center_crop offsets use). */
function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// ToTensor then Normalize(0.5, 0.5) in float32, as torch computes it: ((x / 255) − 0.5) / 0.5.
const LUT = new Float32Array(256);
for (let v = 0; v < 256; v++) LUT[v] = Math.fround(Math.fround(Math.fround(v / 255) - 0.5) / 0.5);

/**
 * Decodes an uncompressed Windows BMP (1/4/8-bit palette, 24-bit, 32-bit BI_RGB) to RGB, which sharp's
 * libvips cannot read. Alpha of 32-bit files is dropped, as PIL's convert('RGB').
 */
export function decodeBmp(buf: Buffer): { data: Buffer; width: number; height: number } {
  if (buf.length < 26 || buf.toString('latin1', 0, 2) !== 'BM') throw new Error('not a BMP file');
  const offset = buf.readUInt32LE(10);
  const dib = buf.readUInt32LE(14);
  if (dib < 40) throw new Error(`unsupported BMP header (${dib} bytes)`);
  const width = buf.readInt32LE(18);
  const rawHeight = buf.readInt32LE(22);
  const bpp = buf.readUInt16LE(28);
  const compression = buf.readUInt32LE(30);
  const height = Math.abs(rawHeight);
  if (width <= 0 || height === 0) throw new Error(`bad BMP size ${width}×${rawHeight}`);
  if (compression !== 0 && !(compression === 3 && bpp === 32)) throw new Error(`compressed BMP (compression ${compression}) is not supported`);
  if (![1, 4, 8, 24, 32].includes(bpp)) throw new Error(`${bpp}-bit BMP is not supported`);
  const stride = Math.floor((bpp * width + 31) / 32) * 4;
  if (offset + stride * height > buf.length) throw new Error('truncated BMP');
  let palette: Buffer | undefined;
  if (bpp <= 8) {
    const used = buf.readUInt32LE(46) || 1 << bpp;
    palette = buf.subarray(14 + dib, 14 + dib + 4 * used);
  }
  const out = Buffer.alloc(width * height * 3);
  for (let y = 0; y < height; y++) {
    const row = offset + (rawHeight > 0 ? height - 1 - y : y) * stride;
    for (let x = 0; x < width; x++) {
      const o = (y * width + x) * 3;
      let b: number, g: number, r: number;
      if (bpp >= 24) {
        const s = row + x * (bpp / 8);
        b = buf[s]!; g = buf[s + 1]!; r = buf[s + 2]!;
      } else {
        const bit = x * bpp;
        const idx = (buf[row + (bit >> 3)]! >> (8 - bpp - (bit & 7))) & ((1 << bpp) - 1);
        if (4 * idx + 2 >= palette!.length) throw new Error(`palette index ${idx} out of range`);
        b = palette![4 * idx]!; g = palette![4 * idx + 1]!; r = palette![4 * idx + 2]!;
      }
      out[o] = r; out[o + 1] = g; out[o + 2] = b;
    }
  }
  return { data: out, width, height };
}

/**
 * Largest image file read: 1 GiB. No training picture is near it (a 16k × 16k PNG is a few hundred MB); a
 * bigger file named .png is a mistake (a disk image) or hostile, and would be read whole into memory.
 */
export const MAX_IMAGE_BYTES = 1024 * 1024 * 1024;

/** Decodes a file to 8-bit sRGB RGB in display orientation (alpha dropped without compositing). */
export async function decodeRgb(file: string): Promise<{ data: Buffer; width: number; height: number }> {
  try {
    const bytes = await readRegularFileAsync(file, 'image', MAX_IMAGE_BYTES);
    if (file.toLowerCase().endsWith('.bmp')) return decodeBmp(bytes);
    const { data, info } = await sharp(bytes, { failOn: 'error' })
      .rotate()
      .removeAlpha()
      .toColourspace('srgb')
      .raw({ depth: 'uchar' })
      .toBuffer({ resolveWithObject: true });
    if (info.channels !== 3) throw new Error(`decoded to ${info.channels} channels, expected 3`);
    return { data, width: info.width, height: info.height };
  } catch (e) {
    throw new Error(`cannot read image '${file}': ${(e as Error).message}`);
  }
}

/** Loads one training image: decode, resize shorter side, crop, flip, normalise. */
export async function loadTrainImage(file: string, options: TransformOptions): Promise<TrainImage> {
  const R = options.resolution;
  if (!Number.isInteger(R) || R < 1) throw new RangeError(`resolution must be a positive integer, got ${R}`);
  const centerCrop = options.centerCrop ?? DATA_DEFAULTS.centerCrop;
  const randomFlip = options.randomFlip ?? DATA_DEFAULTS.randomFlip;
  const interpolation = options.interpolation ?? DATA_DEFAULTS.interpolation;
  const kernel = KERNELS[interpolation];
  if (kernel === undefined) throw new Error(`unknown interpolation '${interpolation}' (one of: ${Object.keys(KERNELS).join(', ')})`);
  const rng = options.rng;
  if ((!centerCrop || randomFlip) && rng === undefined) throw new Error('loadTrainImage: random crop or flip needs an rng');

  const src = await decodeRgb(file);
  const t = options.target;
  if (t !== undefined && (!Number.isInteger(t.width) || t.width < 1 || !Number.isInteger(t.height) || t.height < 1)) {
    throw new RangeError(`bucket size must be positive integers, got ${t.width}×${t.height}`);
  }
  const TW = t ? t.width : R;
  const TH = t ? t.height : R;
  const [W, H] = t ? (t.resized ? [t.resized[0], t.resized[1]] : coverSize(src.width, src.height, [TW, TH])) : resizedSize(src.width, src.height, R);
  if (W < TW || H < TH) throw new RangeError(`internal: ${file} resized to ${W}×${H} cannot be cropped to ${TW}×${TH}`);
  let resized: Buffer;
  if (W === src.width && H === src.height) {
    resized = src.data;
  } else {
    try {
      resized = await sharp(src.data, { raw: { width: src.width, height: src.height, channels: 3 } })
        .resize(W, H, { kernel, fit: 'fill' })
        .raw()
        .toBuffer();
    } catch (e) {
      throw new Error(`cannot read image '${file}': resize failed: ${(e as Error).message}`);
    }
  }

  let top: number, left: number;
  if (centerCrop) {
    // torchvision's CenterCrop rounds half to even; sd-scripts' bucket trim floors
    top = t ? Math.floor((H - TH) / 2) : roundHalfEven((H - R) / 2);
    left = t ? Math.floor((W - TW) / 2) : roundHalfEven((W - R) / 2);
  } else {
    top = rng!.nextInt(H - TH + 1);
    left = rng!.nextInt(W - TW + 1);
  }
  const flipped = randomFlip ? rng!.nextFloat() < 0.5 : false;
  // a crop at `left` of the flipped image is the mirror of the crop at W − TW − left of the image
  const sourceLeft = flipped && options.flipBeforeCrop ? W - TW - left : left;

  const plane = TH * TW;
  const data = new Float32Array(3 * plane);
  for (let y = 0; y < TH; y++) {
    const rowBase = ((top + y) * W + sourceLeft) * 3;
    for (let x = 0; x < TW; x++) {
      const sx = flipped ? TW - 1 - x : x;
      const s = rowBase + sx * 3;
      const d = y * TW + x;
      data[d] = LUT[resized[s]!]!;
      data[plane + d] = LUT[resized[s + 1]!]!;
      data[2 * plane + d] = LUT[resized[s + 2]!]!;
    }
  }
  return { data, targetSize: [TH, TW], cropTopLeft: [top, left], flipped, originalSize: [src.height, src.width] };
}
