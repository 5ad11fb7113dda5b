// Aspect-ratio buckets, as kohya sd-scripts' BucketManager (library/train_util.py) and
// make_bucket_resolutions (library/model_util.py): instead of cropping every picture square, each image goes to
// the bucket (w, h) whose aspect ratio is closest to its own, at about the training area (resolution²), is
// resized to cover it and cropped to it; a batch holds images of one bucket, so every batch has one shape.
//
//   make_bucket_resolutions: (s, s) with s = ⌊√area / steps⌋·steps, and for every width w = min, min+steps, … ≤ max
//     h = min(max, ⌊(area // w) / steps⌋·steps); (w, h) and (h, w) when h ≥ min. Sorted, no duplicates.
//   select_bucket: the predefined bucket of least |w/h − aspect| (the first in sorted order on a tie; an image
//     exactly a bucket's size keeps it); resized so the bucket is covered: scale = bucket h / image h when the image
//     is wider than the bucket, else bucket w / image w, each side int(x·scale + 0.5).
//   --bucket_no_upscale: no predefined buckets; an image larger than the area shrinks to it (its side rounded to
//     steps the way that keeps the aspect best), a smaller one keeps its size; the bucket is the resized size
//     rounded down to steps (cropped, never padded).
import * as fs from 'node:fs';
import sharp from 'sharp';
import { openRegularFile } from '../io/files.js';

/** A bucket's size, [width, height] (sd-scripts' (w, h) tuples). */
export type Reso = readonly [number, number];

/** make_bucket_resolutions(max_reso = (R, R), min_size, max_size, divisible): every bucket, sorted by (w, h). */
export function makeBucketResolutions(resolution: number, minSize: number, maxSize: number, steps: number): [number, number][] {
  const maxArea = resolution * resolution;
  const resos = new Map<string, [number, number]>();
  const add = (w: number, h: number) => resos.set(`${w}x${h}`, [w, h]);
  const square = Math.floor(Math.sqrt(maxArea) / steps) * steps;
  add(square, square);
  for (let width = minSize; width <= maxSize; width += steps) {
    const height = Math.min(maxSize, Math.floor(Math.floor(maxArea / width) / steps) * steps);
    if (height >= minSize) { add(width, height); add(height, width); }
  }
  return [...resos.values()].sort((a, b) => a[0] - b[0] || a[1] - b[1]);
}

export interface BucketOptions {
  /** --resolution: buckets hold about resolution² pixels. */
  resolution: number;
  /** --min_bucket_reso / --max_bucket_reso: each side within [min, max] (multiples of steps). */
  minBucketReso: number;
  maxBucketReso: number;
  /** --bucket_reso_steps: sides are multiples of it. */
  bucketResoSteps: number;
  /** --bucket_no_upscale: buckets from the images' own sizes, never enlarged. */
  bucketNoUpscale: boolean;
}

/** Where one image goes: its bucket and the size it is resized to before the crop (≥ the bucket on both sides). */
export interface BucketChoice { bucket: Reso; resized: Reso; arError: number }

/** Python's int(x + 0.5) for x ≥ 0. */
const roundHalfUp = (x: number): number => Math.floor(x + 0.5);

/** The cover resize of sd-scripts' select_bucket: the side whose ratio decides matches the bucket, the other is at least its. */
export function coverSize(width: number, height: number, bucket: Reso): [number, number] {
  const aspect = width / height;
  const scale = aspect > bucket[0] / bucket[1] ? bucket[1] / height : bucket[0] / width;
  return [Math.max(bucket[0], roundHalfUp(width * scale)), Math.max(bucket[1], roundHalfUp(height * scale))];
}

/** sd-scripts' BucketManager.select_bucket for one image of width × height. */
export class BucketSelector {
  readonly predefined: [number, number][] | null;
  private readonly predefinedSet: Set<string>;

  constructor(readonly o: BucketOptions) {
    this.predefined = o.bucketNoUpscale ? null : makeBucketResolutions(o.resolution, o.minBucketReso, o.maxBucketReso, o.bucketResoSteps);
    this.predefinedSet = new Set((this.predefined ?? []).map(([w, h]) => `${w}x${h}`));
    if (this.predefined !== null && this.predefined.length === 0) throw new RangeError('no bucket fits --min_bucket_reso, --max_bucket_reso and --resolution');
  }

  select(width: number, height: number): BucketChoice {
    const aspect = width / height;
    let bucket: Reso;
    let resized: Reso;
    if (this.predefined !== null) {
      if (this.predefinedSet.has(`${width}x${height}`)) {
        bucket = [width, height];
      } else {
        let best = 0;
        let bestErr = Infinity;
        this.predefined.forEach(([w, h], i) => {
          const err = Math.abs(w / h - aspect);
          if (err < bestErr) { bestErr = err; best = i; } // argmin: the first of equal errors
        });
        bucket = this.predefined[best]!;
      }
      resized = coverSize(width, height, bucket);
    } else {
      const steps = this.o.bucketResoSteps;
      const maxArea = this.o.resolution * this.o.resolution;
      const toSteps = (x: number) => { const r = roundHalfUp(x); return r - (r % steps); };
      if (width * height > maxArea) {
        const rw = Math.sqrt(maxArea * aspect);
        const rh = maxArea / rw;
        const bw = toSteps(rw);
        const bhInW = toSteps(bw / aspect);
        const bh = toSteps(rh);
        const bwInH = toSteps(bh * aspect);
        resized = Math.abs(bw / bhInW - aspect) < Math.abs(bwInH / bh - aspect)
          ? [bw, roundHalfUp(bw / aspect)] : [roundHalfUp(bh * aspect), bh];
      } else {
        resized = [width, height];
      }
      bucket = [resized[0] - (resized[0] % steps), resized[1] - (resized[1] % steps)];
      if (bucket[0] === 0 || bucket[1] === 0) {
        throw new RangeError(`an image of ${width}×${height} is smaller than --bucket_reso_steps=${steps} on a side: with --bucket_no_upscale it fits no bucket`);
      }
    }
    return { bucket, resized, arError: bucket[0] / bucket[1] - aspect };
  }
}

/** Every item's bucket: the bucket table (sorted by size, as sd-scripts shows it) and each item's bucket and resized size. */
export interface BucketPlan {
  /** The buckets holding at least one item, sorted by (w, h). */
  readonly resos: readonly Reso[];
  /** Dataset index → index into resos. */
  readonly bucketOf: Int32Array;
  /** Dataset index → the size it is resized to before the crop. */
  readonly resized: readonly Reso[];
  /** sd-scripts' "mean ar error (without repeats)": mean |bucket aspect − image aspect| over distinct images. */
  readonly meanArError: number;
}

/** Assigns every item (its image size, [width, height]) a bucket. `imageKey` identifies repeats of one image for the mean error. */
export function planBuckets(sizes: readonly Reso[], o: BucketOptions, imageKey?: (i: number) => string): BucketPlan {
  const selector = new BucketSelector(o);
  const choices = sizes.map(([w, h]) => selector.select(w, h));
  const keys = new Map<string, number>();
  for (const c of choices) { const k = `${c.bucket[0]}x${c.bucket[1]}`; if (!keys.has(k)) keys.set(k, keys.size); }
  const resos = [...new Set(choices.map((c) => `${c.bucket[0]}x${c.bucket[1]}`))]
    .map((k) => k.split('x').map(Number) as [number, number]).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  const id = new Map(resos.map((r, i) => [`${r[0]}x${r[1]}`, i]));
  const bucketOf = Int32Array.from(choices, (c) => id.get(`${c.bucket[0]}x${c.bucket[1]}`)!);
  const seen = new Set<string>();
  let sum = 0;
  choices.forEach((c, i) => {
    const k = imageKey ? imageKey(i) : String(i);
    if (seen.has(k)) return;
    seen.add(k);
    sum += Math.abs(c.arError);
  });
  return { resos, bucketOf, resized: choices.map((c) => c.resized), meanArError: seen.size ? sum / seen.size : 0 };
}

/** The lines sd-scripts logs for the buckets: each bucket's resolution and image count (repeats included), then the mean aspect error. */
export function bucketTableLines(plan: BucketPlan): string[] {
  const counts = new Array<number>(plan.resos.length).fill(0);
  for (const b of plan.bucketOf) counts[b]! += 1;
  return [
    `buckets: ${plan.resos.length}, images (including repeats) per bucket:`,
    ...plan.resos.map((r, i) => `  bucket ${i}: resolution (${r[0]}, ${r[1]}), count: ${counts[i]}`),
    `  mean ar error (without repeats): ${plan.meanArError.toFixed(6)}`,
  ];
}

/**
 * An image's display size, [width, height], from its header (EXIF orientations 5–8 swap the sides, as the
 * decoder applies them); BMP headers read directly (libvips cannot read BMP).
 */
export async function readImageSize(file: string): Promise<[number, number]> {
  try {
    if (file.toLowerCase().endsWith('.bmp')) {
      const { fd } = openRegularFile(file, 'image'); // a FIFO or device is refused, never waited on
      try {
        const head = Buffer.alloc(26);
        if (fs.readSync(fd, head, 0, 26, 0) < 26 || head.toString('latin1', 0, 2) !== 'BM') throw new Error('not a BMP file');
        const w = head.readInt32LE(18);
        const h = Math.abs(head.readInt32LE(22));
        if (w <= 0 || h === 0) throw new Error(`bad BMP size ${w}×${h}`);
        return [w, h];
      } finally {
        fs.closeSync(fd);
      }
    }
    const st = fs.statSync(file);
    if (!st.isFile()) throw new Error('not a regular file');
    const m = await sharp(file).metadata();
    if (!m.width || !m.height) throw new Error('no size in its header');
    return (m.orientation ?? 1) >= 5 ? [m.height, m.width] : [m.width, m.height];
  } catch (e) {
    throw new Error(`cannot read image '${file}': ${(e as Error).message}`);
  }
}

/**
 * Reads the sizes of many images, 8 at a time (libuv's pool), reporting progress every `every` images; an image whose
 * size cannot be read fails the call, or takes `fallback`'s size when given.
 */
export async function readImageSizes(
  files: readonly string[], o: { onProgress?: (done: number, total: number) => void; every?: number; fallback?: [number, number] } = {},
): Promise<[number, number][]> {
  const { onProgress, every = 500, fallback } = o;
  const out = new Array<[number, number]>(files.length);
  const unique = new Map<string, Promise<[number, number]>>();
  let done = 0;
  const LIMIT = 8;
  let next = 0;
  const worker = async () => {
    while (next < files.length) {
      const i = next++;
      const f = files[i]!;
      let p = unique.get(f);
      if (!p) { p = fallback ? readImageSize(f).catch(() => fallback) : readImageSize(f); unique.set(f, p); }
      out[i] = await p;
      done += 1;
      if (onProgress && (done % every === 0 || done === files.length)) onProgress(done, files.length);
    }
  };
  await Promise.all(Array.from({ length: Math.min(LIMIT, files.length) }, worker));
  return out;
}
