// Aspect-ratio bucketing's throughput on a folder of mixed aspect ratios (short).
//   npm run build:ts && node bench/buckets.mjs [--resolution 512] [--images 48] [--batch 4]
// Generates --images pictures (JPEG q90 / PNG, smooth colour fields plus grain) of six aspect ratios (768×512,
// 512×768, 640×640, 896×448, 448×896, 700×525), then times, through ImageCaptionLoader with 2 workers and a random
// crop and flip:
//   1. the bucket plan: reading every image's size from its header and assigning buckets (sd-scripts' defaults
//      256…1024 in steps of 64 around --resolution²);
//   2. images/s over 2 epochs (after a warm-up epoch) with --enable_bucket vs the square crop at --resolution.
// Pixels per image differ (a bucket holds about resolution² pixels, a square crop exactly), so both are shown.
import { mkdtempSync, rmSync } from 'node:fs';
import { availableParallelism, cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { planBuckets, readImageSizes, bucketTableLines } from '../dist/data/buckets.js';
import { ImageCaptionLoader } from '../dist/data/loader.js';

const arg = (name, dflt) => { const i = process.argv.indexOf(`--${name}`); return i < 0 ? dflt : process.argv[i + 1]; };
const resolution = Number(arg('resolution', 512));
const count = Number(arg('images', 48));
const batchSize = Number(arg('batch', 4));
const SHAPES = [[768, 512], [512, 768], [640, 640], [896, 448], [448, 896], [700, 525]];

const tmp = mkdtempSync(join(tmpdir(), 'difflora-bench-buckets-'));
try {
  let s = 12345;
  const rand = () => { s = (Math.imul(s, 1103515245) + 12345) >>> 0; return s / 4294967296; };
  const items = [];
  for (let i = 0; i < count; i++) {
    const [w, h] = SHAPES[i % SHAPES.length];
    const small = Buffer.alloc(12 * 10 * 3);
    for (let k = 0; k < small.length; k++) small[k] = Math.floor(rand() * 256);
    const field = await sharp(small, { raw: { width: 12, height: 10, channels: 3 } }).resize(w, h, { kernel: 'cubic' }).raw().toBuffer();
    for (let k = 0; k < field.length; k++) field[k] = Math.max(0, Math.min(255, field[k] + Math.floor(rand() * 17) - 8));
    const img = sharp(field, { raw: { width: w, height: h, channels: 3 } });
    const file = join(tmp, `${i}.${i % 2 ? 'png' : 'jpg'}`);
    await (i % 2 ? img.png() : img.jpeg({ quality: 90 })).toFile(file);
    items.push({ imagePath: file, captions: [`picture ${i}`] });
  }
  const dataset = { length: items.length, columns: ['image', 'text'], get: (i) => items[i] };

  console.log(`machine: ${cpus()[0]?.model ?? 'unknown CPU'}, ${availableParallelism()} cores, Node ${process.version}; ${new Date().toISOString()}`);
  console.log(`${count} images of 6 aspect ratios (JPEG q90 / PNG), resolution ${resolution}, batch ${batchSize}, 2 workers, lanczos, random crop + flip`);
  const t0 = process.hrtime.bigint();
  const sizes = await readImageSizes(items.map((it) => it.imagePath));
  const plan = planBuckets(sizes, { resolution, minBucketReso: 256, maxBucketReso: 1024, bucketResoSteps: 64, bucketNoUpscale: false });
  const planMs = Number(process.hrtime.bigint() - t0) / 1e6;
  console.log(`bucket plan: ${planMs.toFixed(1)} ms (${(planMs / count).toFixed(2)} ms per image)`);
  for (const line of bucketTableLines(plan)) console.log(line);

  for (const [name, extra] of [['square crop', {}], ['--enable_bucket', { buckets: plan }]]) {
    const loader = new ImageCaptionLoader(dataset, { batchSize, resolution, randomFlip: true, interpolation: 'lanczos', seed: 0, numWorkers: 2, ...extra });
    for (let i = 0; i < loader.batchesPerEpoch; i++) await loader.next(); // warm-up epoch
    let images = 0;
    let pixels = 0;
    const t = process.hrtime.bigint();
    for (let i = 0; i < 2 * loader.batchesPerEpoch; i++) {
      const b = await loader.next();
      images += b.shape[0];
      pixels += b.shape[0] * b.shape[2] * b.shape[3];
    }
    const sec = Number(process.hrtime.bigint() - t) / 1e9;
    console.log(`${name}: ${(images / sec).toFixed(1)} images/s, ${(pixels / sec / 1e6).toFixed(2)} Mpixel/s (${loader.batchesPerEpoch} batches per epoch)`);
  }
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
