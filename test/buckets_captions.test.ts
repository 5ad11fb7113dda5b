// Captions and aspect-ratio buckets (sd-scripts' semantics): bucket lists written out by hand from
// make_bucket_resolutions, select_bucket's choices, caption shuffling/dropout with per-item streams, caption files and
// N_name repeat folders, and the bucketed loader (one shape per batch, every item once per epoch, exact resume,
// data-parallel shards), and the SDXL time ids of a bucketed batch.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BucketSelector, makeBucketResolutions, planBuckets, readImageSize } from '../lib/data/buckets.js';
import { detectLayout, loadCaptionFolder, processCaption, readCaptionFile, CAPTION_DEFAULTS, MAX_CAPTION_BYTES } from '../lib/data/captions.js';
import { spawnSync } from 'node:child_process';
import type { Dataset } from '../lib/data/imagefolder.js';
import { ImageCaptionLoader, type Batch } from '../lib/data/loader.js';
import { Rng, deriveSeed } from '../lib/data/transforms.js';
import { sdxlTimeIds } from '../lib/training/sdxl_step.js';
import { validateTrainOptions } from '../lib/training/options.js';
import { validateDreamBoothOptions } from '../lib/training/dreambooth_options.js';
import { validateSdxlTrainOptions } from '../lib/training/sdxl_options.js';

let tmp: string;
const p = (...parts: string[]) => path.join(tmp, ...parts);
const png = (file: string, w: number, h: number, shade: number) =>
  sharp({ create: { width: w, height: h, channels: 3, background: { r: shade, g: 255 - shade, b: (shade * 7) % 256 } } }).png().toFile(file);

/** 9 images of three aspect ratios: 64×32 (wide), 32×64 (tall), 48×48 (square), three each. */
const MIXED: [string, number, number][] = [];
beforeAll(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'difflora-buckets-'));
  fs.mkdirSync(p('mixed'));
  const shapes: [number, number][] = [[64, 32], [32, 64], [48, 48]];
  for (let i = 0; i < 9; i++) {
    const [w, h] = shapes[i % 3]!;
    const f = p('mixed', `${i}.png`);
    await png(f, w, h, 20 * i);
    MIXED.push([f, w, h]);
  }
  // sd-scripts' layout: 2_sks dog (two images, one with a caption file), 3_cat (one image), an unrelated empty folder
  fs.mkdirSync(p('repeats', '2_sks dog'), { recursive: true });
  fs.mkdirSync(p('repeats', '3_cat'), { recursive: true });
  fs.mkdirSync(p('repeats', 'logs'), { recursive: true });
  await png(p('repeats', '2_sks dog', 'a.png'), 40, 40, 10);
  await png(p('repeats', '2_sks dog', 'b.png'), 40, 40, 50);
  fs.writeFileSync(p('repeats', '2_sks dog', 'b.txt'), 'sks dog, running, grass\nsecond line ignored\n');
  await png(p('repeats', '3_cat', 'c.png'), 40, 40, 90);
  // a flat folder with caption files
  fs.mkdirSync(p('flat'));
  await png(p('flat', 'x.png'), 40, 40, 5);
  await png(p('flat', 'y.png'), 40, 40, 6);
  fs.writeFileSync(p('flat', 'x.caption'), 'an x');
  fs.writeFileSync(p('flat', 'y.caption'), 'a y');
});
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

describe('make_bucket_resolutions (sd-scripts model_util), written out by hand', () => {
  it('SD 1.x defaults: resolution 512, buckets 256…1024 in steps of 64', () => {
    expect(makeBucketResolutions(512, 256, 1024, 64)).toEqual([
      [256, 832], [256, 896], [256, 960], [256, 1024], [320, 704], [320, 768], [384, 640], [448, 576], [512, 512],
      [576, 448], [640, 384], [704, 320], [768, 320], [832, 256], [896, 256], [960, 256], [1024, 256],
    ]);
  });

  it('resolution 64, buckets 32…128 in steps of 16', () => {
    // square 64; w=32 → h=min(128, 128); 48 → ⌊85/16⌋·16 = 80; 64 → 64; 80 → 48; 96 → 32; 112 → 32; 128 → 32
    expect(makeBucketResolutions(64, 32, 128, 16)).toEqual([
      [32, 96], [32, 112], [32, 128], [48, 80], [64, 64], [80, 48], [96, 32], [112, 32], [128, 32],
    ]);
  });

  it('resolution 1024, buckets 512…2048 in steps of 128 (an SDXL-like setting)', () => {
    // square 1024; w=512 → 2048; 640 → ⌊1638/128⌋·128 = 1536; 768 → 1280; 896 → 1152; 1024; 1152 → 896; 1280 → 768;
    // 1408 → 640; 1536 → 640; 1664 → 512; 1792 → 512; 1920 → 512; 2048 → 512
    expect(makeBucketResolutions(1024, 512, 2048, 128)).toEqual([
      [512, 1664], [512, 1792], [512, 1920], [512, 2048], [640, 1408], [640, 1536], [768, 1280], [896, 1152], [1024, 1024],
      [1152, 896], [1280, 768], [1408, 640], [1536, 640], [1664, 512], [1792, 512], [1920, 512], [2048, 512],
    ]);
  });
});

describe('select_bucket (sd-scripts BucketManager)', () => {
  const o = { resolution: 64, minBucketReso: 32, maxBucketReso: 128, bucketResoSteps: 16, bucketNoUpscale: false };
  it('the bucket of closest aspect ratio, resized to cover it', () => {
    const s = new BucketSelector(o);
    // 100×50 (2.0): 80/48 = 1.67 is closest; wider than the bucket, so the height matches: scale 48/50 → 96×48
    expect(s.select(100, 50)).toMatchObject({ bucket: [80, 48], resized: [96, 48] });
    // an image exactly a bucket's size keeps it
    expect(s.select(48, 80)).toMatchObject({ bucket: [48, 80], resized: [48, 80] });
    // 30×31: the square bucket, scale 64/30 → 64 × int(66.13 + 0.5) = 66
    expect(s.select(30, 31)).toMatchObject({ bucket: [64, 64], resized: [64, 66] });
  });

  it('--bucket_no_upscale: small images keep their size (bucket rounded down), large ones shrink to the area', () => {
    const s = new BucketSelector({ ...o, bucketNoUpscale: true });
    expect(s.select(40, 30)).toMatchObject({ bucket: [32, 16], resized: [40, 30] });
    // 200×100: √(4096·2) = 90.5 → 80 wide gives 80/32 = 2.5; 45.25 → 32 high gives 64/32 = 2.0 (exact): 64×32
    expect(s.select(200, 100)).toMatchObject({ bucket: [64, 32], resized: [64, 32] });
    expect(() => s.select(10, 40)).toThrow(/--bucket_reso_steps=16/);
  });

  it('the plan: buckets sorted, each item its bucket, image sizes read from headers (EXIF too)', async () => {
    const sizes = await Promise.all(MIXED.map(([f]) => readImageSize(f)));
    expect(sizes).toEqual(MIXED.map(([, w, h]) => [w, h]));
    const plan = planBuckets(sizes, { ...o, bucketResoSteps: 8 });
    const resos = plan.resos.map((r) => r.join('x'));
    expect(resos).toEqual([...resos].sort((a, b) => Number(a.split('x')[0]) - Number(b.split('x')[0]) || Number(a.split('x')[1]) - Number(b.split('x')[1])));
    expect(plan.resos.length).toBe(3);
    for (let i = 0; i < 9; i++) {
      const [bw, bh] = plan.resos[plan.bucketOf[i]!]!;
      const [, w, h] = MIXED[i]!;
      expect(Math.sign(bw - bh)).toBe(Math.sign(w - h));
    }
    const exif = p('exif.jpg');
    await sharp({ create: { width: 40, height: 16, channels: 3, background: 'red' } }).withMetadata({ orientation: 6 }).jpeg().toFile(exif);
    expect(await readImageSize(exif)).toEqual([16, 40]);
    await expect(readImageSize(p('nope.png'))).rejects.toThrow(/nope\.png/);
  });
});

describe('captions: shuffle with keep_tokens, dropout, per-item streams', () => {
  const caption = 'sks, dog, running, grass, sunny day, photo';
  it('shuffling keeps the first keep_tokens tags in front and every tag once', () => {
    const o = { ...CAPTION_DEFAULTS, shuffleCaption: true, keepTokens: 2 };
    const seen = new Set<string>();
    for (let pos = 0; pos < 200; pos++) {
      const out = processCaption(caption, o, new Rng(deriveSeed(3, 0, pos)));
      const tags = out.split(', ');
      expect(tags.slice(0, 2)).toEqual(['sks', 'dog']);
      expect([...tags].sort()).toEqual(caption.split(', ').sort());
      seen.add(out);
    }
    expect(seen.size).toBeGreaterThan(20); // 4! = 24 orders of the rest
    // another separator; tags are stripped and joined with ', ' (sd-scripts)
    expect(processCaption(' a | b ', { ...o, captionSeparator: '|', keepTokens: 2 }, new Rng(1))).toBe('a, b');
  });

  it('dropout: about rate × n empty captions, and the same draws for the same (seed, epoch, position)', () => {
    const o = { ...CAPTION_DEFAULTS, captionDropoutRate: 0.3 };
    let dropped = 0;
    const n = 20000;
    for (let pos = 0; pos < n; pos++) if (processCaption(caption, o, new Rng(deriveSeed(11, 2, pos))) === '') dropped += 1;
    expect(dropped / n).toBeGreaterThan(0.28);
    expect(dropped / n).toBeLessThan(0.32);
    const both = { ...o, shuffleCaption: true };
    for (let pos = 0; pos < 50; pos++) {
      expect(processCaption(caption, both, new Rng(deriveSeed(11, 2, pos)))).toBe(processCaption(caption, both, new Rng(deriveSeed(11, 2, pos))));
    }
    expect(processCaption(caption, { ...o, captionDropoutRate: 0 }, new Rng(1))).toBe(caption);
  });
});

describe('caption files and N_name repeat folders', () => {
  it('repeat folders: each image N times, captioned by its file or its folder name; the epoch counts repeats', async () => {
    const layout = detectLayout(p('repeats'), '.txt');
    expect(layout.kind).toBe('repeat-folders');
    const ds = loadCaptionFolder(p('repeats'), layout as Exclude<typeof layout, { kind: 'imagefolder' }>, '.txt');
    expect(ds.length).toBe(2 * 2 + 3);
    expect(ds.images).toBe(3);
    const byFile = new Map<string, string[]>();
    for (let i = 0; i < ds.length; i++) { const it = ds.get(i); byFile.set(path.basename(it.imagePath), [...(byFile.get(path.basename(it.imagePath)) ?? []), it.captions[0]!]); }
    expect(Object.fromEntries(byFile)).toEqual({
      'a.png': ['sks dog', 'sks dog'], 'b.png': ['sks dog, running, grass', 'sks dog, running, grass'], 'c.png': ['cat', 'cat', 'cat'],
    });
    const loader = new ImageCaptionLoader(ds, { batchSize: 2, resolution: 32, seed: 1 });
    expect(loader.epochLength).toBe(7);
    expect(loader.batchesPerEpoch).toBe(4);
    const files: string[] = [];
    for (let b = 0; b < 4; b++) files.push(...(await loader.next()).imagePaths.map((f) => path.basename(f)));
    expect(files.sort()).toEqual(['a.png', 'a.png', 'b.png', 'b.png', 'c.png', 'c.png', 'c.png']);
  });

  it('a flat folder with a caption file per image; a metadata.jsonl keeps the imagefolder layout; mixed layouts are refused', async () => {
    expect(detectLayout(p('flat'), '.caption').kind).toBe('caption-files');
    const ds = loadCaptionFolder(p('flat'), { kind: 'caption-files' }, '.caption');
    expect([0, 1].map((i) => ds.get(i).captions[0])).toEqual(['an x', 'a y']);
    expect(detectLayout(p('flat'), '.txt').kind).toBe('imagefolder'); // no such captions: today's behaviour (and its error)
    fs.mkdirSync(p('meta', '1_x'), { recursive: true });
    await png(p('meta', '1_x', 'm.png'), 20, 20, 1);
    fs.writeFileSync(p('meta', 'metadata.jsonl'), JSON.stringify({ file_name: '1_x/m.png', text: 'meta' }) + '\n');
    expect(detectLayout(p('meta'), '.caption').kind).toBe('imagefolder');
    fs.mkdirSync(p('mixedlayout', '2_a'), { recursive: true });
    await png(p('mixedlayout', '2_a', 'i.png'), 20, 20, 1);
    await png(p('mixedlayout', 'top.png'), 20, 20, 1);
    expect(() => detectLayout(p('mixedlayout'), '.caption')).toThrow(/mixes sd-scripts' N_name repeat folders with 1 image/);
    fs.mkdirSync(p('partial'));
    await png(p('partial', 'u.png'), 20, 20, 1);
    await png(p('partial', 'v.png'), 20, 20, 1);
    fs.writeFileSync(p('partial', 'u.txt'), 'u');
    expect(() => detectLayout(p('partial'), '.txt')).toThrow(/1 of 2 images have no \.txt caption file \(--caption_extension\), e\.g\. 'v\.png'/);
 
  });

  it('a symbolic link out of the folder (an image or a caption file) is refused, naming it', async () => {
    fs.mkdirSync(p('outside'));
    await png(p('outside', 'secret.png'), 20, 20, 1);
    fs.writeFileSync(p('outside', 'secret.txt'), 'secret');
    fs.mkdirSync(p('links', '1_x'), { recursive: true });
    fs.symlinkSync(p('outside', 'secret.png'), p('links', '1_x', 'in.png'));
    const layout = detectLayout(p('links'), '.txt');
    expect(() => loadCaptionFolder(p('links'), layout as Exclude<typeof layout, { kind: 'imagefolder' }>, '.txt')).toThrow(/image '.*in\.png' resolves to '.*secret\.png', outside the dataset folder/);
    fs.rmSync(p('links', '1_x', 'in.png'));
    await png(p('links', '1_x', 'in.png'), 20, 20, 1);
    fs.symlinkSync(p('outside', 'secret.txt'), p('links', '1_x', 'in.txt'));
    expect(() => loadCaptionFolder(p('links'), layout as Exclude<typeof layout, { kind: 'imagefolder' }>, '.txt')).toThrow(/caption file '.*in\.txt' resolves to/);
  });
});

/** A dataset over the mixed images, each repeated `repeats` times. */
function mixedDataset(repeats = 1): Dataset {
  const items = MIXED.flatMap(([f], i) => Array.from({ length: repeats }, () => ({ imagePath: f, captions: [`tag${i}, b, c`] })));
  return { length: items.length, columns: ['image', 'text'], get: (i) => items[i]! };
}

async function epochOf(loader: ImageCaptionLoader): Promise<Batch[]> {
  const out: Batch[] = [];
  for (let i = 0; i < loader.batchesPerEpoch; i++) out.push(await loader.next());
  return out;
}

describe('the bucketed loader', () => {
  const bucketOptions = { resolution: 48, minBucketReso: 32, maxBucketReso: 96, bucketResoSteps: 8, bucketNoUpscale: false };
  const planFor = async (ds: Dataset) => planBuckets(await Promise.all(Array.from({ length: ds.length }, (_, i) => readImageSize(ds.get(i).imagePath))), bucketOptions);

  it('every batch one shape (its bucket), every item once per epoch, Σ ceil(n_b / B) batches, orders differ by epoch', async () => {
    const ds = mixedDataset(2); // 18 items, 6 per bucket
    const plan = await planFor(ds);
    const loader = new ImageCaptionLoader(ds, { batchSize: 4, resolution: 48, seed: 5, randomFlip: true, buckets: plan });
    // per bucket 6 items → 2 batches (4 + 2): 6 batches
    expect(loader.batchesPerEpoch).toBe(6);
    expect(loader.epochLength).toBe(18);
    const epochs = [await epochOf(loader), await epochOf(loader)];
    for (const epoch of epochs) {
      const positions: number[] = [];
      for (const b of epoch) {
        const [, , H, W] = b.shape;
        expect(b.pixelValues.length).toBe(b.shape.reduce((a, x) => a * x, 1));
        const ids = b.imagePaths.map((f) => MIXED.findIndex(([g]) => g === f));
        for (const [k, id] of ids.entries()) {
          const [bw, bh] = plan.resos[plan.bucketOf[2 * id]!]!;
          expect([H, W]).toEqual([bh, bw]);
          expect(b.targetSizes[k]).toEqual([bh, bw]);
        }
        positions.push(...b.keys.map(([, pos]) => pos));
      }
      expect(positions.sort((a, c) => a - c)).toEqual(Array.from({ length: 18 }, (_, i) => i));
      const files = epoch.flatMap((b) => b.imagePaths).sort();
      expect(files).toEqual(MIXED.flatMap(([f]) => [f, f]).sort());
    }
    expect(epochs[0]!.map((b) => b.imagePaths.join())).not.toEqual(epochs[1]!.map((b) => b.imagePaths.join()));
    expect(epochs[1]!.every((b) => b.keys.every(([e]) => e === 1))).toBe(true);
  });

  it('resume mid-epoch reproduces the same batches (pixels, captions, keys), with caption shuffling and dropout', async () => {
    const ds = mixedDataset(2);
    const plan = await planFor(ds);
    const o = { batchSize: 3, resolution: 48, seed: 9, randomFlip: true, buckets: plan, captions: { ...CAPTION_DEFAULTS, shuffleCaption: true, captionDropoutRate: 0.2 } };
    const straight = new ImageCaptionLoader(ds, o);
    const all = [...await epochOf(straight), ...await epochOf(straight)];
    const first = new ImageCaptionLoader(ds, o);
    for (let i = 0; i < 4; i++) await first.next();
    const state = first.getState();
    const resumed = new ImageCaptionLoader(ds, o);
    resumed.setState(state);
    for (let i = 4; i < all.length; i++) {
      const b = await resumed.next();
      expect(b.shape).toEqual(all[i]!.shape);
      expect(b.captions).toEqual(all[i]!.captions);
      expect(b.keys).toEqual(all[i]!.keys);
      expect(Buffer.from(b.pixelValues.buffer).equals(Buffer.from(all[i]!.pixelValues.buffer))).toBe(true);
    }
    expect(all.some((b) => b.captions.includes(''))).toBe(true);
  });

  it('data-parallel: every process the same number of full, one-shape batches; together they cover the epoch', async () => {
    const ds = mixedDataset(1); // 9 items, 3 per bucket → with B = 2: 2 batches per bucket (the second filled from its bucket)
    const plan = await planFor(ds);
    const shards = [0, 1].map((rank) => new ImageCaptionLoader(ds, { batchSize: 2, resolution: 48, seed: 3, buckets: plan, shard: { rank, worldSize: 2 } }));
    expect(shards.map((l) => l.batchesPerEpoch)).toEqual([3, 3]);
    const seen = new Set<string>();
    for (const l of shards) {
      for (const b of await epochOf(l)) {
        expect(b.shape[0]).toBe(2);
        b.imagePaths.forEach((f) => seen.add(f));
      }
    }
    expect(seen.size).toBe(9);
  });

  it("SDXL's time ids of a bucketed batch: the real original size, the crop offset and the bucket as target size", async () => {
    const ds = mixedDataset(1);
    const plan = await planFor(ds);
    const loader = new ImageCaptionLoader(ds, { batchSize: 3, resolution: 48, seed: 1, centerCrop: true, buckets: plan, flipBeforeCrop: true });
    for (const b of await epochOf(loader)) {
      const ids = sdxlTimeIds(b.originalSizes, b.cropTopLeft, b.targetSizes);
      const rows = Array.from(ids.toFloat64Array());
      ids.dispose();
      b.imagePaths.forEach((f, i) => {
        const [, w, h] = MIXED.find(([g]) => g === f)!;
        const [bh, bw] = [b.shape[2], b.shape[3]];
        const row = rows.slice(6 * i, 6 * i + 6);
        expect(row.slice(0, 2)).toEqual([h, w]);
        expect(row.slice(4)).toEqual([bh, bw]);
        // center crop of the cover resize: ⌊excess / 2⌋
        const [rw, rh] = plan.resized[MIXED.findIndex(([g]) => g === f)]!;
        expect(row.slice(2, 4)).toEqual([Math.floor((rh - bh) / 2), Math.floor((rw - bw) / 2)]);
        expect(loader.viewOf(MIXED.findIndex(([g]) => g === f))).toEqual({ targetSize: [bh, bw], resized: [rw, rh], bucketed: true });
      });
    }
  });
});

describe('bad options are refused naming the option', () => {
  const base = { pretrainedModelNameOrPath: 'm', trainDataDir: 'd' };
  it.each([
    [{ enableBucket: true, minBucketReso: 512, maxBucketReso: 256 }, /minBucketReso \(--min_bucket_reso\)=512 is larger than maxBucketReso \(--max_bucket_reso\)=256/],
    [{ bucketResoSteps: 12 }, /bucketResoSteps \(--bucket_reso_steps\) must be a multiple of 8/],
    [{ captionDropoutRate: -0.1 }, /captionDropoutRate \(--caption_dropout_rate\) must be a finite number ≥ 0, got -0.1/],
    [{ captionDropoutRate: 1.5 }, /captionDropoutRate \(--caption_dropout_rate\) must be a probability in \[0, 1\], got 1.5/],
    [{ keepTokens: 2 }, /keepTokens \(--keep_tokens\)=2 only acts with shuffleCaption \(--shuffle_caption\)/],
    [{ keepTokens: -1, shuffleCaption: true }, /keepTokens \(--keep_tokens\) must be at least 0/],
    [{ enableBucket: true, resolution: 512, minBucketReso: 640, maxBucketReso: 1024 }, /minBucketReso \(--min_bucket_reso\)=640 must be at most resolution \(--resolution\)=512/],
    [{ enableBucket: true, minBucketReso: 100 }, /minBucketReso \(--min_bucket_reso\)=100 must be a multiple of bucketResoSteps \(--bucket_reso_steps\)=64/],
    [{ captionExtension: '../x' }, /captionExtension \(--caption_extension\) must be a file name ending/],
  ])('%j', (bad, message) => {
    expect(() => validateTrainOptions({ ...base, ...bad })).toThrow(message);
    expect(() => validateSdxlTrainOptions({ ...base, ...bad })).toThrow(message);
    expect(() => validateDreamBoothOptions({ pretrainedModelNameOrPath: 'm', instanceDataDir: 'i', instancePrompt: 'p', ...bad })).toThrow(message);
  });
});

describe('hostile caption and image files', () => {
  it('a FIFO as caption file or BMP image is refused by name (never waited on); an oversized caption file is refused', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'difflora-hostile-'));
    try {
      const fifo = path.join(dir, 'a.caption');
      spawnSync('mkfifo', [fifo]);
      expect(() => readCaptionFile(fifo)).toThrow(/caption file '.*a\.caption' is a FIFO, not a regular file/);
      const bmp = path.join(dir, 'b.bmp');
      spawnSync('mkfifo', [bmp]);
      await expect(readImageSize(bmp)).rejects.toThrow(/cannot read image '.*b\.bmp': image '.*b\.bmp' is a FIFO/);
      const big = path.join(dir, 'c.caption');
      fs.writeFileSync(big, Buffer.alloc(MAX_CAPTION_BYTES + 1, 0x61));
      expect(() => readCaptionFile(big)).toThrow(/caption file/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
