// Data loader throughput vs the training step's consumption.
//   npm run build:ts && node bench/loader.mjs [--resolution 512] [--images 64] [--skip-train]
// 1. Generates 64 pictures of 768×640 (half JPEG q90, half PNG; smooth random colour fields plus grain, so they
//    compress like photos rather than like noise or flat colour) and decodes + transforms them as training does
//    (EXIF, RGB, resize shorter side to --resolution with lanczos, random crop, random flip, normalise) through
//    ImageCaptionLoader, batch 1, for --dataloader_num_workers 0, 1, 2 and 4: images/s over 2 epochs after a
//    warm-up epoch.
// 2. Runs `difflora train` with no flags (the built-in default: tiny model, 32 px, batch 4, 300 steps) and reads
//    its steps/s from the progress lines: what one training step consumes.
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { availableParallelism, cpus, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import sharp from 'sharp';
import { loadImageFolder } from '../dist/data/imagefolder.js';
import { ImageCaptionLoader } from '../dist/data/loader.js';

const arg = (name, dflt) => { const i = process.argv.indexOf(`--${name}`); return i < 0 ? dflt : process.argv[i + 1]; };
const resolution = Number(arg('resolution', 512));
const count = Number(arg('images', 64));
const root = join(dirname(fileURLToPath(import.meta.url)), '..');

const tmp = mkdtempSync(join(tmpdir(), 'difflora-bench-loader-'));
try {
  // deterministic pseudo-random pictures
  let s = 12345;
  const rand = () => { s = (Math.imul(s, 1103515245) + 12345) >>> 0; return s / 4294967296; };
  const lines = [];
  for (let i = 0; i < count; i++) {
    const small = Buffer.alloc(12 * 10 * 3);
    for (let k = 0; k < small.length; k++) small[k] = Math.floor(rand() * 256);
    const field = await sharp(small, { raw: { width: 12, height: 10, channels: 3 } }).resize(768, 640, { kernel: 'cubic' }).raw().toBuffer();
    for (let k = 0; k < field.length; k++) field[k] = Math.max(0, Math.min(255, field[k] + Math.floor(rand() * 17) - 8));
    const img = sharp(field, { raw: { width: 768, height: 640, channels: 3 } });
    const name = `${i}.${i % 2 ? 'png' : 'jpg'}`;
    await (i % 2 ? img.png() : img.jpeg({ quality: 90 })).toFile(join(tmp, name));
    lines.push(JSON.stringify({ file_name: name, text: `picture ${i}` }));
  }
  writeFileSync(join(tmp, 'metadata.jsonl'), lines.join('\n'));
  const dataset = loadImageFolder(tmp);

  console.log(`machine: ${cpus()[0]?.model ?? 'unknown CPU'}, ${availableParallelism()} cores, Node ${process.version}, ` +
    `UV_THREADPOOL_SIZE=${process.env.UV_THREADPOOL_SIZE ?? '(default 4)'}, sharp concurrency ${sharp.concurrency()}`);
  console.log(`${count} images 768x640 (JPEG q90 / PNG), resolution ${resolution}, lanczos, random crop + flip, batch 1`);
  const results = [];
  for (const numWorkers of [0, 1, 2, 4]) {
    const loader = new ImageCaptionLoader(dataset, { batchSize: 1, resolution, randomFlip: true, interpolation: 'lanczos', seed: 0, numWorkers });
    for (let i = 0; i < count; i++) await loader.next(); // warm-up epoch
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < 2 * count; i++) await loader.next();
    const sec = Number(process.hrtime.bigint() - t0) / 1e9;
    const ips = (2 * count) / sec;
    results.push({ numWorkers, imagesPerSecond: ips });
    console.log(`num_workers ${numWorkers}: ${ips.toFixed(1)} images/s (${(1000 / ips).toFixed(1)} ms per image, peak ${loader.stats.peakInFlight} decodes at once)`);
  }

  if (!process.argv.includes('--skip-train')) {
    const out = join(tmp, 'builtin-out');
    mkdirSync(out);
    const t0 = Date.now();
    const r = spawnSync(process.execPath, [join(root, 'bin', 'difflora.js'), 'train', `--output_dir=${out}`], { encoding: 'utf8', cwd: tmp });
    const wall = (Date.now() - t0) / 1000;
    if (r.status !== 0) throw new Error(`difflora train failed: ${r.stderr}`);
    const steps = [...r.stderr.matchAll(/^step (\d+)\/(\d+) .* ([\d.]+) it\/s/gm)];
    const last = steps[steps.length - 1];
    const rate = Number(last[3]);
    console.log(`built-in default (difflora train, no flags): ${last[1]} steps, ${rate.toFixed(2)} steps/s (progress line, model loading included), ` +
      `${wall.toFixed(1)} s wall for the whole command; batch 4 at 32 px → ${(4 * rate).toFixed(1)} images/s consumed`);
  }
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
