// The data pipeline: imagefolder metadata (jsonl / csv, subfolders, list captions, errors), the training
// transform (resize shorter side, crops, flip, EXIF, colour modes, normalisation) and the loader (seeded
// order, exact resume, prefetch order, broken images). Images are generated here with sharp.
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadImageFolder, parseCsv, shuffleAndTruncate, type Dataset, type DatasetItem } from '../lib/data/imagefolder.js';
import { Rng, loadTrainImage, resizedSize } from '../lib/data/transforms.js';
import { ImageCaptionLoader, type Batch } from '../lib/data/loader.js';
import { MAX_CAPTION_CHARS, MAX_METADATA_BYTES, parseCsvRecords, shortenLongStrings } from '../lib/data/metadata.js';
import { checkOwnPrivateDir, defaultBuiltinRoot, prepareBuiltinDefault } from '../lib/builtin/default.js';

let tmp: string;
const p = (...parts: string[]): string => path.join(tmp, ...parts);

const RED = { r: 255, g: 0, b: 0 };
const BLUE = { r: 0, g: 0, b: 255 };

/** A w×h PNG/JPEG whose left `split` columns are `left` and the rest `right`. */
async function splitImage(w: number, h: number, split: number, left: typeof RED, right: typeof RED): Promise<sharp.Sharp> {
  const raw = Buffer.alloc(w * h * 3);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    const c = x < split ? left : right;
    raw.set([c.r, c.g, c.b], (y * w + x) * 3);
  }
  return sharp(raw, { raw: { width: w, height: h, channels: 3 } });
}

const solid = (w: number, h: number, c: { r: number; g: number; b: number; alpha?: number }, channels: 3 | 4 = 3): sharp.Sharp =>
  sharp({ create: { width: w, height: h, channels, background: c } });

beforeAll(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'difflora-data-'));
  fs.mkdirSync(p('img'));
  await (await splitImage(40, 30, 20, RED, BLUE)).png().toFile(p('img', 'split.png'));
  await solid(10, 10, { r: 10, g: 20, b: 30, alpha: 0 }, 4).png().toFile(p('img', 'rgba.png'));
  await solid(24, 20, { r: 90, g: 90, b: 90 }).toColourspace('b-w').jpeg({ quality: 95 }).toFile(p('img', 'gray.jpg'));
  // Stored 32 wide × 16 tall, red left half; orientation 6 displays it rotated 90° clockwise:
  // 16 wide × 32 tall with the red half on top.
  await (await splitImage(32, 16, 16, RED, BLUE)).withMetadata({ orientation: 6 }).jpeg({ quality: 95 }).toFile(p('img', 'exif6.jpg'));
  fs.writeFileSync(p('img', 'corrupt.png'), Buffer.from('\x89PNG\r\n\x1a\nthis is not a png at all'));

  // An imagefolder with jsonl metadata, a subfolder and list captions.
  fs.mkdirSync(p('ds_jsonl', 'sub'), { recursive: true });
  await solid(20, 20, RED).png().toFile(p('ds_jsonl', 'a.png'));
  await solid(24, 20, BLUE).jpeg().toFile(p('ds_jsonl', 'sub', 'b.JPG'));
  await solid(20, 20, BLUE).png().toFile(p('ds_jsonl', 'unlisted.png'));
  fs.writeFileSync(p('ds_jsonl', 'metadata.jsonl'), [
    JSON.stringify({ file_name: 'a.png', text: 'a red square', extra: 1 }),
    '',
    JSON.stringify({ file_name: 'sub/b.JPG', text: ['blue one', 'blue two'], extra: 2 }),
  ].join('\n') + '\n');

  // csv metadata with quoted commas, quotes and a newline in a field, in a subfolder of its own.
  fs.mkdirSync(p('ds_csv', 'part'), { recursive: true });
  await solid(20, 20, RED).png().toFile(p('ds_csv', 'part', 'x.png'));
  await solid(20, 20, BLUE).webp().toFile(p('ds_csv', 'part', 'y.webp'));
  fs.writeFileSync(p('ds_csv', 'part', 'metadata.csv'),
    'file_name,caption,score\r\n' +
    'x.png,"a red, square thing",1\r\n' +
    'y.webp,"blue ""quoted""\nsecond line",2\r\n');
});

afterAll(() => { fs.rmSync(tmp, { recursive: true, force: true }); });

// ---- imagefolder

describe('imagefolder', () => {
  it('parses CSV with quotes, commas and newlines', () => {
    expect(parseCsv('a,b,c\n1,"x, y","he said ""hi"""\r\n2,"multi\nline",\n')).toEqual([
      ['a', 'b', 'c'], ['1', 'x, y', 'he said "hi"'], ['2', 'multi\nline', ''],
    ]);
    expect(parseCsv('\ufeffh\nv')).toEqual([['h'], ['v']]);
    expect(() => parseCsv('a\n"open')).toThrow(/unterminated/);
  });

  it('reads metadata.jsonl with subfolders and list captions', () => {
    const ds = loadImageFolder(p('ds_jsonl'));
    expect(ds.length).toBe(2); // unlisted.png has no row
    expect(ds.columns).toEqual(['image', 'text', 'extra']);
    expect(ds.get(0)).toEqual({ imagePath: p('ds_jsonl', 'a.png'), captions: ['a red square'] });
    expect(ds.get(1)).toEqual({ imagePath: p('ds_jsonl', 'sub', 'b.JPG'), captions: ['blue one', 'blue two'] });
    expect(() => ds.get(2)).toThrow(RangeError);
  });

  it('reads metadata.csv (relative to its own folder) with another caption column', () => {
    const ds = loadImageFolder(p('ds_csv'), { captionColumn: 'caption' });
    expect(ds.length).toBe(2);
    expect(ds.get(0).captions).toEqual(['a red, square thing']);
    expect(ds.get(1)).toEqual({ imagePath: p('ds_csv', 'part', 'y.webp'), captions: ['blue "quoted"\nsecond line'] });
  });

  it('names the problem', () => {
    expect(() => loadImageFolder(p('nope'))).toThrow(/--train_data_dir '.*nope' does not exist/);
    const empty = p('empty');
    fs.mkdirSync(empty);
    fs.writeFileSync(path.join(empty, 'metadata.jsonl'), '{"file_name":"a.png","text":"x"}\n');
    expect(() => loadImageFolder(empty)).toThrow(/no images in/);

    expect(() => loadImageFolder(p('ds_jsonl'), { captionColumn: 'caption' }))
      .toThrow("--caption_column' value 'caption' needs to be one of: image, text, extra");
    expect(() => loadImageFolder(p('ds_jsonl'), { imageColumn: 'img' }))
      .toThrow("--image_column' value 'img' needs to be one of: image, text, extra");
    expect(() => loadImageFolder(p('img'))).toThrow("--caption_column' value 'text' needs to be one of: image");
    expect(() => loadImageFolder(p('ds_csv'), { captionColumn: 'score' })).not.toThrow(); // csv values are strings

    const missing = p('missing_file');
    fs.mkdirSync(missing);
    fs.copyFileSync(p('img', 'split.png'), path.join(missing, 'ok.png'));
    fs.writeFileSync(path.join(missing, 'metadata.jsonl'), '{"file_name":"ok.png","text":"x"}\n{"file_name":"gone.png","text":"y"}\n');
    expect(() => loadImageFolder(missing)).toThrow(/metadata.jsonl: line 2: file_name 'gone.png' does not exist/);

    fs.writeFileSync(path.join(missing, 'metadata.jsonl'), '{"file_name":"ok.png","text":3}\n');
    expect(() => loadImageFolder(missing)).toThrow(/should contain either strings or lists of strings/);
    fs.writeFileSync(path.join(missing, 'metadata.jsonl'), '{"file_name":"ok.png","text":"x"}\n{oops\n');
    expect(() => loadImageFolder(missing)).toThrow(/line 2 is not valid JSON/);
    fs.writeFileSync(path.join(missing, 'metadata.jsonl'), '{"name":"ok.png","text":"x"}\n');
    expect(() => loadImageFolder(missing)).toThrow(/no 'file_name' column/);
  });

  it('shuffleAndTruncate shuffles with the seed, then keeps the first n', () => {
    const items: DatasetItem[] = Array.from({ length: 50 }, (_, i) => ({ imagePath: `${i}.png`, captions: [`${i}`] }));
    const ds: Dataset = { length: 50, columns: ['image', 'text'], get: (i) => items[i]! };
    const a = shuffleAndTruncate(ds, 10, 42);
    const b = shuffleAndTruncate(ds, 10, 42);
    const c = shuffleAndTruncate(ds, 10, 43);
    const ids = (d: Dataset): string[] => Array.from({ length: d.length }, (_, i) => d.get(i).captions[0]!);
    expect(a.length).toBe(10);
    expect(ids(a)).toEqual(ids(b));
    expect(ids(a)).not.toEqual(ids(c));
    expect(new Set(ids(a)).size).toBe(10);
    expect(ids(a)).not.toEqual(ids(ds).slice(0, 10));
    expect(shuffleAndTruncate(ds, undefined, 1)).toBe(ds);
    expect(shuffleAndTruncate(ds, 500, 1).length).toBe(50);
  });
});

// ---- transform

/** The [r, g, b] values of pixel (y, x) of a CHW image of side R. */
const px = (d: Float32Array, R: number, y: number, x: number): number[] => [0, 1, 2].map((c) => d[c * R * R + y * R + x]!);

describe('loadTrainImage', () => {
  it('resizes the shorter side as torchvision Resize(int)', () => {
    expect(resizedSize(40, 30, 16)).toEqual([21, 16]);
    expect(resizedSize(30, 40, 16)).toEqual([16, 21]);
    expect(resizedSize(512, 512, 256)).toEqual([256, 256]);
    expect(resizedSize(1000, 3, 8)).toEqual([2666, 8]);
  });

  it('center crops the middle columns, in [-1, 1]', async () => {
    const img = await loadTrainImage(p('img', 'split.png'), { resolution: 16, centerCrop: true, interpolation: 'nearest' });
    expect(img.data.length).toBe(3 * 16 * 16);
    expect(img.cropTopLeft).toEqual([0, 2]); // 21×16, (21−16)/2 = 2.5 → 2 (round half to even)
    expect(img.originalSize).toEqual([30, 40]);
    expect(img.flipped).toBe(false);
    for (const v of img.data) { expect(v).toBeGreaterThanOrEqual(-1); expect(v).toBeLessThanOrEqual(1); }
    expect(px(img.data, 16, 5, 0)).toEqual([1, -1, -1]);
    expect(px(img.data, 16, 5, 15)).toEqual([-1, -1, 1]);

    // Without resizing (resolution 30 = shorter side), the crop starts at column 5: columns 5..19 of the
    // source are red, so exactly 15 of the 30 output columns are.
    const full = await loadTrainImage(p('img', 'split.png'), { resolution: 30, centerCrop: true, interpolation: 'bilinear' });
    expect(full.cropTopLeft).toEqual([0, 5]);
    let redColumns = 0;
    for (let x = 0; x < 30; x++) if (px(full.data, 30, 10, x)[0] === 1) redColumns++;
    expect(redColumns).toBe(15);
    expect(px(full.data, 30, 10, 14)).toEqual([1, -1, -1]);
    expect(px(full.data, 30, 10, 15)).toEqual([-1, -1, 1]);
  });

  it('every interpolation mode gives a clean image', async () => {
    for (const interpolation of ['bilinear', 'lanczos', 'nearest', 'bicubic'] as const) {
      const img = await loadTrainImage(p('img', 'split.png'), { resolution: 16, centerCrop: true, interpolation });
      expect(img.data.length).toBe(768);
      expect(px(img.data, 16, 8, 1)[0]).toBeCloseTo(1, 1);
      expect(px(img.data, 16, 8, 14)[2]).toBeCloseTo(1, 1);
    }
  });

  it('applies EXIF orientation', async () => {
    const img = await loadTrainImage(p('img', 'exif6.jpg'), { resolution: 16, centerCrop: true, interpolation: 'nearest' });
    expect(img.originalSize).toEqual([32, 16]); // displayed 16 wide × 32 tall
    expect(img.cropTopLeft).toEqual([8, 0]);
    // crop rows 8..23 of the display: rows 8..15 red (top half), 16..23 blue.
    const top = px(img.data, 16, 2, 8), bottom = px(img.data, 16, 13, 8);
    expect(top[0]).toBeGreaterThan(0.8); expect(top[2]).toBeLessThan(-0.8);
    expect(bottom[2]).toBeGreaterThan(0.8); expect(bottom[0]).toBeLessThan(-0.8);
  });

  it('drops alpha without compositing and expands grayscale to RGB', async () => {
    const rgba = await loadTrainImage(p('img', 'rgba.png'), { resolution: 10, centerCrop: true });
    expect(rgba.data.length).toBe(300);
    const f = (v: number): number => Math.fround(Math.fround(Math.fround(v / 255) - 0.5) / 0.5);
    expect(px(rgba.data, 10, 3, 3)).toEqual([f(10), f(20), f(30)]);

    const gray = await loadTrainImage(p('img', 'gray.jpg'), { resolution: 8, centerCrop: true });
    expect(gray.data.length).toBe(3 * 64);
    const [r, g, b] = px(gray.data, 8, 4, 4);
    expect(r).toBe(g); expect(g).toBe(b);
    expect(r!).toBeCloseTo(f(90), 1);
  });

  it("flipBeforeCrop (the SDXL script's order): the crop offset is in the flipped image, the pixels its mirror", async () => {
    // split.png 40×30 → 21×16; a random crop of 16 starts at column 0..5. Flipped first, the crop at `left` of the
    // flipped image is the mirror of the crop at 5 − left of the image.
    const R = 16;
    const runs = await Promise.all(Array.from({ length: 40 }, (_, s) => loadTrainImage(p('img', 'split.png'), { resolution: R, randomFlip: true, flipBeforeCrop: true, interpolation: 'nearest', rng: new Rng(s) })));
    const unflipped = new Map(runs.filter((r) => !r.flipped).map((r) => [r.cropTopLeft[1], r]));
    let compared = 0;
    for (const a of runs.filter((r) => r.flipped)) {
      const b = unflipped.get(5 - a.cropTopLeft[1]);
      if (!b) continue;
      for (let c = 0; c < 3; c++) for (let y = 0; y < R; y += 5) for (let x = 0; x < R; x++) {
        expect(a.data[c * R * R + y * R + x]).toBe(b.data[c * R * R + y * R + (R - 1 - x)]);
      }
      compared++;
    }
    expect(compared).toBeGreaterThan(3);
    // centre crop of the flipped image: offset round((21 − 16) / 2) = 2 recorded, the mirror of the image's crop at 3
    let centre = await loadTrainImage(p('img', 'split.png'), { resolution: R, centerCrop: true, randomFlip: true, flipBeforeCrop: true, interpolation: 'nearest', rng: new Rng(0) });
    for (let s = 1; !centre.flipped; s++) centre = await loadTrainImage(p('img', 'split.png'), { resolution: R, centerCrop: true, randomFlip: true, flipBeforeCrop: true, interpolation: 'nearest', rng: new Rng(s) });
    expect(centre.cropTopLeft).toEqual([0, 2]);
    const atThree = unflipped.get(3)!;
    expect(atThree).toBeDefined();
    for (let x = 0; x < R; x++) expect(centre.data[x]).toBe(atThree.data[R - 1 - x]);
  });

  it('flip mirrors the unflipped crop; same seed, same result', async () => {
    const opts = { resolution: 30, centerCrop: true, randomFlip: true, interpolation: 'bilinear' as const };
    const runs = await Promise.all(Array.from({ length: 8 }, (_, s) => loadTrainImage(p('img', 'split.png'), { ...opts, rng: new Rng(s) })));
    const flipped = runs.find((r) => r.flipped)!;
    const plain = runs.find((r) => !r.flipped)!;
    expect(flipped).toBeDefined(); expect(plain).toBeDefined();
    const R = 30;
    for (let c = 0; c < 3; c++) for (let y = 0; y < R; y += 7) for (let x = 0; x < R; x++) {
      expect(flipped.data[c * R * R + y * R + x]).toBe(plain.data[c * R * R + y * R + (R - 1 - x)]);
    }
    expect(px(flipped.data, R, 0, 0)).toEqual([-1, -1, 1]);

    const rand = { resolution: 16, randomFlip: true, interpolation: 'lanczos' as const };
    const a = await loadTrainImage(p('img', 'split.png'), { ...rand, rng: new Rng(1234) });
    const b = await loadTrainImage(p('img', 'split.png'), { ...rand, rng: new Rng(1234) });
    expect(b.cropTopLeft).toEqual(a.cropTopLeft);
    expect(b.flipped).toBe(a.flipped);
    expect(b.data).toEqual(a.data);
    const tops = new Set<string>();
    for (let s = 0; s < 40; s++) {
      const r = await loadTrainImage(p('img', 'split.png'), { resolution: 16, rng: new Rng(s) });
      expect(r.cropTopLeft[0]).toBe(0);
      expect(r.cropTopLeft[1]).toBeGreaterThanOrEqual(0);
      expect(r.cropTopLeft[1]).toBeLessThanOrEqual(5);
      tops.add(r.cropTopLeft.join());
    }
    expect(tops.size).toBe(6); // every left offset 0..5 occurs
  });

  it('reads BMP (which libvips cannot) in display orientation', async () => {
    // 24-bit bottom-up BMP, 5×2: top row red, bottom row blue (rows padded to 16 bytes).
    const w = 5, h = 2, stride = 16;
    const buf = Buffer.alloc(54 + stride * h);
    buf.write('BM', 0, 'latin1');
    buf.writeUInt32LE(buf.length, 2); buf.writeUInt32LE(54, 10); buf.writeUInt32LE(40, 14);
    buf.writeInt32LE(w, 18); buf.writeInt32LE(h, 22); buf.writeUInt16LE(1, 26); buf.writeUInt16LE(24, 28);
    for (let x = 0; x < w; x++) {
      buf.set([255, 0, 0], 54 + x * 3);          // file row 0 = bottom: blue (BGR)
      buf.set([0, 0, 255], 54 + stride + x * 3); // file row 1 = top: red
    }
    fs.writeFileSync(p('img', 'tiny.bmp'), buf);
    const img = await loadTrainImage(p('img', 'tiny.bmp'), { resolution: 2, centerCrop: true, interpolation: 'nearest' });
    expect(img.originalSize).toEqual([2, 5]);
    expect(px(img.data, 2, 0, 0)).toEqual([1, -1, -1]);
    expect(px(img.data, 2, 1, 1)).toEqual([-1, -1, 1]);
    fs.writeFileSync(p('img', 'bad.bmp'), buf.subarray(0, 60));
    await expect(loadTrainImage(p('img', 'bad.bmp'), { resolution: 2, centerCrop: true })).rejects.toThrow(/cannot read image '.*bad\.bmp': truncated BMP/);
  });

  it('names the file it cannot read', async () => {
    await expect(loadTrainImage(p('img', 'corrupt.png'), { resolution: 8, centerCrop: true }))
      .rejects.toThrow(/cannot read image '.*corrupt\.png': /);
    await expect(loadTrainImage(p('img', 'absent.png'), { resolution: 8, centerCrop: true }))
      .rejects.toThrow(/cannot read image '.*absent\.png'/);
  });

  it('Rng: reproducible, uniform enough, state round-trips', () => {
    const a = new Rng(5), b = new Rng(5);
    const xs = Array.from({ length: 100 }, () => a.nextFloat());
    expect(Array.from({ length: 100 }, () => b.nextFloat())).toEqual(xs);
    for (const x of xs) { expect(x).toBeGreaterThanOrEqual(0); expect(x).toBeLessThan(1); }
    const state = a.getState();
    const next = [a.nextInt(7), a.nextInt(1000), a.nextFloat()];
    const c = new Rng(999);
    c.setState(state);
    expect([c.nextInt(7), c.nextInt(1000), c.nextFloat()]).toEqual(next);
    const counts = new Array(4).fill(0);
    const r = new Rng(1);
    for (let i = 0; i < 4000; i++) counts[r.nextInt(4)]++;
    for (const k of counts) expect(Math.abs(k - 1000)).toBeLessThan(120);
    expect(new Rng(1).nextU32()).not.toBe(new Rng(2).nextU32());
  });
});

// ---- loader

/** A dataset of n images of distinct sizes and colours, captioned by index. */
async function makeDataset(n: number, dir: string, opts: { broken?: number[]; lists?: boolean } = {}): Promise<Dataset> {
  fs.mkdirSync(dir, { recursive: true });
  const items: DatasetItem[] = [];
  for (let i = 0; i < n; i++) {
    const file = path.join(dir, `${i}.png`);
    if (opts.broken?.includes(i)) fs.writeFileSync(file, 'not an image');
    else await (await splitImage(20 + 3 * i, 18 + (i % 4), 10, { r: 10 * i, g: 100, b: 0 }, { r: 0, g: 0, b: 255 - 10 * i })).png().toFile(file);
    items.push({ imagePath: file, captions: opts.lists ? [`${i}a`, `${i}b`, `${i}c`] : [`${i}`] });
  }
  return { length: n, columns: ['image', 'text'], get: (i) => items[i]! };
}

async function take(loader: ImageCaptionLoader, k: number): Promise<Batch[]> {
  const out: Batch[] = [];
  for (let i = 0; i < k; i++) out.push(await loader.next());
  return out;
}

describe('ImageCaptionLoader', () => {
  let ds: Dataset;
  beforeAll(async () => { ds = await makeDataset(7, p('loader')); });
  const options = { batchSize: 3, resolution: 16, randomFlip: true, interpolation: 'bilinear' as const };

  it('batches an epoch in a seeded order, last batch partial', async () => {
    const loader = new ImageCaptionLoader(ds, { ...options, seed: 3 });
    expect(loader.batchesPerEpoch).toBe(3);
    const batches = await take(loader, 6);
    expect(batches.map((b) => b.captions.length)).toEqual([3, 3, 1, 3, 3, 1]);
    const b0 = batches[0]!;
    expect(b0.shape).toEqual([3, 3, 16, 16]);
    expect(b0.pixelValues.length).toBe(3 * 3 * 16 * 16);
    const epoch0 = batches.slice(0, 3).flatMap((b) => b.captions);
    const epoch1 = batches.slice(3).flatMap((b) => b.captions);
    expect([...epoch0].sort()).toEqual(['0', '1', '2', '3', '4', '5', '6']);
    expect([...epoch1].sort()).toEqual(['0', '1', '2', '3', '4', '5', '6']);
    expect(epoch0).not.toEqual(epoch1);
    expect(loader.getState()).toEqual({ epoch: 2, position: 0, seed: 3 });

    // The same seed gives the same order, crops and flips; another seed another order.
    const again = await take(new ImageCaptionLoader(ds, { ...options, seed: 3 }), 6);
    again.forEach((b, i) => {
      expect(b.captions).toEqual(batches[i]!.captions);
      expect(b.cropTopLeft).toEqual(batches[i]!.cropTopLeft);
      expect(b.pixelValues).toEqual(batches[i]!.pixelValues);
    });
    const other = await take(new ImageCaptionLoader(ds, { ...options, seed: 4 }), 3);
    expect(other.flatMap((b) => b.captions)).not.toEqual(epoch0);
    const ordered = await take(new ImageCaptionLoader(ds, { ...options, shuffle: false }), 3);
    expect(ordered.flatMap((b) => b.captions)).toEqual(['0', '1', '2', '3', '4', '5', '6']);
  });

  it('resumes exactly from a saved state, mid-epoch and across epochs', async () => {
    const a = new ImageCaptionLoader(ds, { ...options, seed: 11, prefetch: 5 });
    await take(a, 1);
    const state = a.getState();
    expect(state).toEqual({ epoch: 0, position: 3, seed: 11 });
    const rest = await take(a, 4);
    const b = new ImageCaptionLoader(ds, { ...options, seed: 0, prefetch: 1 });
    await take(b, 2); // some other progress, then restore
    b.setState(JSON.parse(JSON.stringify(state)));
    const resumed = await take(b, 4);
    resumed.forEach((r, i) => {
      expect(r.captions).toEqual(rest[i]!.captions);
      expect(r.cropTopLeft).toEqual(rest[i]!.cropTopLeft);
      expect(r.pixelValues).toEqual(rest[i]!.pixelValues);
    });
    expect(() => b.setState({ epoch: 0, position: 99, seed: 1 })).toThrow(RangeError);
  });

  it('prefetch and concurrent next() calls keep batches in order', async () => {
    const ref = await take(new ImageCaptionLoader(ds, { ...options, seed: 5, prefetch: 1 }), 5);
    const deep = await take(new ImageCaptionLoader(ds, { ...options, seed: 5, prefetch: 20 }), 5);
    const l = new ImageCaptionLoader(ds, { ...options, seed: 5, prefetch: 4 });
    const concurrent = await Promise.all([l.next(), l.next(), l.next(), l.next(), l.next()]);
    for (const run of [deep, concurrent]) run.forEach((b, i) => {
      expect(b.captions).toEqual(ref[i]!.captions);
      expect(b.pixelValues).toEqual(ref[i]!.pixelValues);
    });
  });

  it('picks one caption of a list at random', async () => {
    const lists = await makeDataset(2, p('lists'), { lists: true });
    const loader = new ImageCaptionLoader(lists, { batchSize: 2, resolution: 8, centerCrop: true, seed: 1 });
    const seen = new Set((await take(loader, 20)).flatMap((b) => b.captions));
    expect([...seen].sort()).toEqual(['0a', '0b', '0c', '1a', '1b', '1c']);
  });

  it('broken images: an error naming the file, or skipped and counted', async () => {
    const broken = await makeDataset(5, p('broken'), { broken: [2] });
    const strict = new ImageCaptionLoader(broken, { batchSize: 5, resolution: 8, centerCrop: true });
    await expect(strict.next()).rejects.toThrow(/cannot read image '.*broken[/\\]2\.png'/);
    expect(strict.getState()).toEqual({ epoch: 0, position: 0, seed: 0 }); // nothing consumed

    const lenient = new ImageCaptionLoader(broken, { batchSize: 2, resolution: 8, centerCrop: true, skipBroken: true, seed: 2 });
    const epoch = await take(lenient, 2); // 4 good images → two full batches
    expect(epoch.map((b) => b.captions.length)).toEqual([2, 2]);
    expect(epoch.flatMap((b) => b.captions).sort()).toEqual(['0', '1', '3', '4']);
    expect(lenient.skipped).toBe(1);
    expect(lenient.skippedImages[0]!.error.message).toMatch(/2\.png/);
    expect(lenient.getState().epoch).toBe(1);

    const allBroken = await makeDataset(2, p('all_broken'), { broken: [0, 1] });
    const hopeless = new ImageCaptionLoader(allBroken, { batchSize: 1, resolution: 8, centerCrop: true, skipBroken: true });
    await expect(hopeless.next()).rejects.toThrow(/every image of the dataset failed/);
  });
});

describe('imagefolder safety', () => {
  it('refuses metadata that points outside the dataset folder', async () => {
    const { mkdtempSync, writeFileSync, rmSync } = await import('node:fs');
    const { tmpdir } = await import('node:os');
    const { join } = await import('node:path');
    const { loadImageFolder } = await import('../lib/data/imagefolder.js');
    const sharpMod = (await import('sharp')).default;
    const dir = mkdtempSync(join(tmpdir(), 'difflora-escape-'));
    await sharpMod({ create: { width: 4, height: 4, channels: 3, background: { r: 1, g: 2, b: 3 } } }).png().toFile(join(dir, 'a.png'));
    for (const bad of ['../../etc/passwd', '/etc/passwd']) {
      writeFileSync(join(dir, 'metadata.jsonl'), `${JSON.stringify({ file_name: 'a.png', text: 'ok' })}\n${JSON.stringify({ file_name: bad, text: 'x' })}\n`);
      expect(() => loadImageFolder(dir)).toThrow(/points outside the dataset folder/);
    }
    rmSync(dir, { recursive: true, force: true });
  });
});

// ---- hostile datasets (issue #12): escapes, special files, unbounded input, malformed rows

describe('imagefolder: hostile input', () => {
  let root: string;
  let secret: string;
  let png: Buffer;
  beforeAll(async () => {
    root = fs.mkdtempSync(path.join(os.tmpdir(), 'difflora-hostile-'));
    secret = path.join(root, 'outside', 'secret.png');
    fs.mkdirSync(path.dirname(secret));
    png = await solid(12, 10, RED).png().toBuffer();
    fs.writeFileSync(secret, png);
  });
  afterAll(() => { fs.rmSync(root, { recursive: true, force: true }); });

  /** A fresh dataset folder with a.png and the given metadata.jsonl lines (objects are JSON-encoded). */
  const dataset = (name: string, lines: (string | object)[], file = 'metadata.jsonl'): string => {
    const dir = path.join(root, name);
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, 'a.png'), png);
    fs.writeFileSync(path.join(dir, file), lines.map((l) => (typeof l === 'string' ? l : JSON.stringify(l))).join('\n'));
    return dir;
  };

  it('symlinks leading out of the dataset are refused like ../, naming the entry', () => {
    const link = dataset('link_file', [{ file_name: 'a.png', text: 'x' }]);
    fs.symlinkSync(secret, path.join(link, 'b.png'));
    expect(() => loadImageFolder(link)).toThrow(/dataset entry '.*link_file\/b\.png' is a symbolic link that resolves to '.*secret\.png', outside the dataset folder/);

    const dirLink = dataset('link_dir', [{ file_name: 'a.png', text: 'x' }]);
    fs.symlinkSync(path.dirname(secret), path.join(dirLink, 'more'));
    expect(() => loadImageFolder(dirLink)).toThrow(/dataset entry '.*link_dir\/more' is a symbolic link that resolves to '.*outside'/);

    const dev = dataset('link_dev', [{ file_name: 'a.png', text: 'x' }, { file_name: 'zero.png', text: 'y' }]);
    fs.symlinkSync('/dev/zero', path.join(dev, 'zero.png'));
    expect(() => loadImageFolder(dev)).toThrow(/'.*link_dev\/zero\.png' is a symbolic link that resolves to '\/dev\/zero'/);

    const meta = path.join(root, 'link_meta');
    fs.mkdirSync(meta);
    fs.writeFileSync(path.join(meta, 'a.png'), png);
    fs.writeFileSync(path.join(root, 'outside', 'metadata.jsonl'), '{"file_name":"a.png","text":"planted"}\n');
    fs.symlinkSync(path.join(root, 'outside', 'metadata.jsonl'), path.join(meta, 'metadata.jsonl'));
    expect(() => loadImageFolder(meta)).toThrow(/link_meta\/metadata\.jsonl' is a symbolic link .*outside the dataset folder/);

    // a row's other *_file_name column through a link with no image extension: checked per row too
    const row = dataset('link_row', [{ file_name: 'a.png', text: 'x', mask_file_name: 'notes' }]);
    fs.symlinkSync(secret, path.join(row, 'notes'));
    expect(() => loadImageFolder(row)).toThrow(/metadata\.jsonl: line 1: mask_file_name 'notes' resolves to '.*secret\.png', outside the dataset folder/);
  });

  it('symlink loops and dangling links are refused; a link inside the dataset is followed', () => {
    const loop = dataset('loop', [{ file_name: 'a.png', text: 'x' }]);
    fs.mkdirSync(path.join(loop, 'sub'));
    fs.symlinkSync('..', path.join(loop, 'sub', 'up'));
    expect(() => loadImageFolder(loop)).toThrow(/dataset entry '.*loop\/sub\/up' is the folder '.*loop' again \(a symbolic link loop/);
    const self = dataset('selfloop', [{ file_name: 'a.png', text: 'x' }]);
    fs.symlinkSync('self.png', path.join(self, 'self.png'));
    expect(() => loadImageFolder(self)).toThrow(/'.*selfloop\/self\.png' is a symbolic link that is a symbolic link loop/);
    const dangling = dataset('dangling', [{ file_name: 'a.png', text: 'x' }]);
    fs.symlinkSync(path.join(root, 'nowhere.png'), path.join(dangling, 'gone.png'));
    expect(() => loadImageFolder(dangling)).toThrow(/'.*dangling\/gone\.png' is a symbolic link that is a dangling symbolic link/);

    const ok = dataset('inner_link', [{ file_name: 'b.png', text: 'x' }, { file_name: 'pics/a.png', text: 'y' }]);
    fs.symlinkSync('a.png', path.join(ok, 'b.png'));
    fs.mkdirSync(path.join(ok, '.hidden'));
    fs.symlinkSync('.hidden', path.join(ok, 'pics-real')); // a hidden folder is not walked, but a link to it is
    fs.symlinkSync('.', path.join(ok, 'pics'));
    expect(() => loadImageFolder(ok)).toThrow(/'.*inner_link\/pics' is the folder/); // the dataset folder itself, again
    fs.rmSync(path.join(ok, 'pics'));
    fs.mkdirSync(path.join(ok, 'pics'));
    fs.copyFileSync(path.join(ok, 'a.png'), path.join(ok, 'pics', 'a.png'));
    const ds = loadImageFolder(ok);
    expect(ds.get(0).imagePath).toBe(path.join(ok, 'b.png'));
    expect(ds.length).toBe(2);
  });

  it('a FIFO as metadata is refused without blocking; a FIFO, a folder or a device as an image is a broken image', async () => {
    const fifoMeta = path.join(root, 'fifo_meta');
    fs.mkdirSync(fifoMeta);
    fs.writeFileSync(path.join(fifoMeta, 'a.png'), png);
    execFileSync('mkfifo', [path.join(fifoMeta, 'metadata.jsonl')]);
    expect(() => loadImageFolder(fifoMeta)).toThrow(/metadata file '.*fifo_meta\/metadata\.jsonl' is a FIFO, not a regular file/);
    fs.rmSync(path.join(fifoMeta, 'metadata.jsonl'));
    execFileSync('mkfifo', [path.join(fifoMeta, 'metadata.csv')]);
    expect(() => loadImageFolder(fifoMeta)).toThrow(/metadata file '.*fifo_meta\/metadata\.csv' is a FIFO/);

    const special = dataset('special', [{ file_name: 'a.png', text: 'good' }, { file_name: 'pipe.png', text: 'fifo' }, { file_name: 'dir.png', text: 'folder' }]);
    execFileSync('mkfifo', [path.join(special, 'pipe.png')]);
    fs.mkdirSync(path.join(special, 'dir.png'));
    const ds = loadImageFolder(special);
    const strict = new ImageCaptionLoader(ds, { batchSize: 3, resolution: 8, centerCrop: true, shuffle: false });
    await expect(strict.next()).rejects.toThrow(/cannot read image '.*special\/pipe\.png': image '.*pipe\.png' is a FIFO, not a regular file/);
    const lenient = new ImageCaptionLoader(ds, { batchSize: 3, resolution: 8, centerCrop: true, shuffle: false, skipBroken: true });
    const batch = await lenient.next();
    expect(batch.captions).toEqual(['good']);
    expect(lenient.skippedImages.map((s) => path.basename(s.file))).toEqual(['pipe.png', 'dir.png']);
    expect(lenient.skippedImages[1]!.error.message).toMatch(/dir\.png' is a directory/);
    await expect(loadTrainImage('/dev/zero', { resolution: 8, centerCrop: true })).rejects.toThrow(/cannot read image '\/dev\/zero': .*character device/);
  });

  it('metadata rows: null, lists, numbers, missing or non-string file_name and bad captions name file:line and field', () => {
    const cases: [object | string, RegExp][] = [
      ['null', /line 2 is not a JSON object \(got null\)/],
      ['[1, 2]', /line 2 is not a JSON object \(got a list of 2/],
      ['42', /line 2 is not a JSON object \(got 42 \(a number\)\)/],
      ['"a.png"', /line 2 is not a JSON object \(got "a\.png"\)/],
      ['{"text": "no file"}', /metadata\.jsonl: line 2 has no 'file_name' column \(columns: text\)/],
      [{ file_name: 3, text: 'x' }, /line 2: 'file_name' must be a relative file path, got 3 \(a number\)/],
      [{ file_name: null, text: 'x' }, /line 2: 'file_name' must be a relative file path, got null/],
      [{ file_name: ['a.png'], text: 'x' }, /line 2: 'file_name' must be a relative file path, got a list of 1/],
      [{ file_name: 'a.png\u0000.txt', text: 'x' }, /line 2: file_name 'a\.png.\.txt' contains a NUL character/],
      [{ file_name: 'x'.repeat(200_000), text: 'x' }, /line 2: 'file_name' is longer than any file path \("x{80}"… \(\d+ characters\)\)$/],
      [{ file_name: 'a.png', text: 7 }, /Caption column `text` should contain either strings or lists of strings \(.*metadata\.jsonl: line 2: got 7 \(a number\)\)/],
      [{ file_name: 'a.png', text: [] }, /line 2: got a list of 0/],
      [{ file_name: 'a.png', text: ['ok', 1] }, /line 2: got a list of 2/],
      [{ file_name: 'a.png', text: { en: 'x' } }, /line 2: got an object with keys en/],
      [{ file_name: 'a.png' }, /line 2: no value for the caption column 'text'/],
      ['{"file_name": "a.png", "text": "x"', /line 2 is not valid JSON/],
    ];
    for (const [bad, error] of cases) {
      const dir = dataset('rows', [{ file_name: 'a.png', text: 'fine' }, bad]);
      expect(() => loadImageFolder(dir), JSON.stringify(bad)).toThrow(error);
    }
    // a column named like an Object.prototype member is a column, not an inherited function
    const proto = dataset('proto', [{ file_name: 'a.png', constructor: 'caption one' }, { file_name: 'a.png', text: 'x' }]);
    expect(() => loadImageFolder(proto, { captionColumn: 'constructor' })).toThrow(/line 2: no value for the caption column 'constructor'/);
  });

  it('a BOM, CRLF line ends and blank lines are accepted (jsonl and csv); csv errors name the line', () => {
    const bom = dataset('bom', ['\ufeff{"file_name": "a.png", "text": "one"}\r', '', '   ', '{"file_name": "a.png", "text": "two"}\r', '']);
    expect([0, 1].map((i) => loadImageFolder(bom).get(i).captions[0])).toEqual(['one', 'two']);
    const csv = dataset('csv', ['\ufefffile_name,text\r', '\r', 'a.png,"multi\r\nline"\r', 'a.png,plain\r', ''], 'metadata.csv');
    const ds = loadImageFolder(csv);
    expect([ds.get(0).captions[0], ds.get(1).captions[0]]).toEqual(['multi\r\nline', 'plain']);
    const short = dataset('csv_short', ['file_name,text', 'a.png,"two\nlines"', 'a.png'], 'metadata.csv');
    expect(() => loadImageFolder(short)).toThrow(/metadata\.csv: line 4 has 1 fields, the header \(line 1\) has 2/);
    const quote = dataset('csv_quote', ['file_name,text', 'a.png,bad"quote'], 'metadata.csv');
    expect(() => loadImageFolder(quote)).toThrow(/metadata\.csv: CSV: unexpected quote inside an unquoted field \(line 2\)/);
  });

  it('a huge caption is cut to MAX_CAPTION_CHARS with ONE warning naming file and line, fast, and never called a broken image', async () => {
    const huge = 'a very long caption, '.repeat(300_000); // 6.3 MB
    // written with \u escapes below (6 bytes a unit); the cut falls on a surrogate pair, which is kept whole
    const escaped = `ZZ${'\u00e9\ud83d\ude00'.repeat(200_000)}`;
    const dir = dataset('huge', [
      JSON.stringify({ file_name: 'a.png', text: huge }),
      `{"file_name": "a.png", "text": ${JSON.stringify(escaped).replace(/[^\x20-\x7e]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`)}}`,
      { file_name: 'a.png', text: ['short', huge] },
      { file_name: 'a.png', text: 'normal' },
    ]);
    const warnings: string[] = [];
    const t0 = Date.now();
    const ds = loadImageFolder(dir, { onWarning: (w) => warnings.push(w) });
    console.log(`6 MB caption lines loaded in ${Date.now() - t0} ms`);
    expect(Date.now() - t0).toBeLessThan(5000);
    expect(ds.get(0).captions[0]).toBe(huge.slice(0, MAX_CAPTION_CHARS));
    expect(ds.get(1).captions[0]).toBe(escaped.slice(0, MAX_CAPTION_CHARS - 1)); // not cut inside an escape or a surrogate pair
    expect(ds.get(2).captions).toEqual(['short', huge.slice(0, MAX_CAPTION_CHARS)]);
    expect(ds.get(3).captions).toEqual(['normal']);
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toMatch(/^3 caption\(s\) longer than 16384 characters were cut .*huge\/metadata\.jsonl: line 1 \(column 'text'\); .*line 2 .*; .*line 3/);

    const csv = dataset('huge_csv', ['file_name,text', `a.png,"${huge}"`, `a.png,${huge.replaceAll(',', ';')}`], 'metadata.csv');
    const t1 = Date.now();
    const fromCsv = loadImageFolder(csv, { onWarning: (w) => warnings.push(w) });
    console.log(`6 MB csv fields loaded in ${Date.now() - t1} ms`);
    expect(Date.now() - t1).toBeLessThan(5000); // was 91 s for 50 MB, one character at a time
    expect(fromCsv.get(0).captions[0]).toBe(huge.slice(0, MAX_CAPTION_CHARS));
    expect(fromCsv.get(1).captions[0]).toBe(huge.replaceAll(',', ';').slice(0, MAX_CAPTION_CHARS));
    expect(warnings[1]).toMatch(/2 caption\(s\) .*metadata\.csv: line 2 \(column 'text'\); .*line 3/);

    // through the loader: a batch, nothing skipped, no error about images
    const loader = new ImageCaptionLoader(ds, { batchSize: 4, resolution: 8, centerCrop: true, shuffle: false, skipBroken: true });
    const batch = await loader.next();
    expect(batch.captions.map((c) => c.length)).toEqual([MAX_CAPTION_CHARS, MAX_CAPTION_CHARS - 1, expect.any(Number), 6]);
    expect(loader.skipped).toBe(0);

    const longKey = dataset('long_key', [`{"file_name": "a.png", "${'k'.repeat(200_000)}": "x"}`]);
    expect(() => loadImageFolder(longKey)).toThrow(/metadata\.jsonl: line 1 has a key \(column name\) longer than/);
  });

  it('a capped CSV parse keeps exactly the first maxFieldChars + 1 characters of each long field', () => {
    const alphabet = ['a', '"', ',', '\n', '\u00e9'];
    const rand = new Rng(3);
    for (let t = 0; t < 30; t++) {
      const cells = Array.from({ length: 3 }, () => Array.from({ length: rand.nextInt(120) }, () => alphabet[rand.nextInt(alphabet.length)]!).join(''));
      const text = `x,y,z\n${cells.map((c) => `"${c.replaceAll('"', '""')}"`).join(',')}\n`;
      const full = parseCsvRecords(text);
      const capped = parseCsvRecords(text, 40);
      expect(full[1]!.cells).toEqual(cells);
      expect(capped[1]!.cells).toEqual(cells.map((c) => c.slice(0, 41)));
      expect(capped[1]!.line).toBe(2);
    }
  });

  it('shortening long JSON strings never splits an escape or a UTF-8 sequence and keeps what the cut keeps', () => {
    const alphabet = ['a', '"', '\\', '\n', '\u00e9', '\u{1F600}', '\u0000', '\u2028', ' '];
    const rand = new Rng(7);
    for (let t = 0; t < 12; t++) {
      let text = '';
      while (text.length < 120_000) text += alphabet[rand.nextInt(alphabet.length)]!.repeat(1 + rand.nextInt(40));
      const line = Buffer.from(JSON.stringify({ file_name: 'a.png', text, other: text.slice(0, 50), last: text }));
      const short = shortenLongStrings(line, 6 * (MAX_CAPTION_CHARS + 1));
      expect(short).not.toBe('key');
      const row = JSON.parse(short.toString()) as { text: string; other: string; last: string };
      expect(row.text.length).toBeGreaterThan(MAX_CAPTION_CHARS);
      expect(row.text.slice(0, MAX_CAPTION_CHARS)).toBe(text.slice(0, MAX_CAPTION_CHARS));
      expect(row.other).toBe(text.slice(0, 50));
      expect(row.last.slice(0, MAX_CAPTION_CHARS)).toBe(text.slice(0, MAX_CAPTION_CHARS));
    }
  });

  it('a metadata file over MAX_METADATA_BYTES is refused with its size, before it is read', () => {
    const dir = dataset('too_big', [{ file_name: 'a.png', text: 'x' }]);
    fs.truncateSync(path.join(dir, 'metadata.jsonl'), MAX_METADATA_BYTES + 1); // sparse: nothing is written
    expect(() => loadImageFolder(dir)).toThrow(`metadata file '${path.join(dir, 'metadata.jsonl')}' is ${MAX_METADATA_BYTES + 1} bytes, more than the ${MAX_METADATA_BYTES} allowed`);
  });
});

describe('built-in default folder', () => {
  it('is used only when it is this user\'s own and not writable by others', async () => {
    const base = fs.mkdtempSync(path.join(os.tmpdir(), 'difflora-builtin-test-'));
    const shared = path.join(base, 'shared');
    fs.mkdirSync(shared);
    fs.chmodSync(shared, 0o777);
    await expect(prepareBuiltinDefault(shared)).rejects.toThrow(`built-in default folder '${shared}' is writable by its group and others (mode 777)`);
    expect(fs.readdirSync(shared)).toEqual([]); // nothing was written into it
    const link = path.join(base, 'link');
    fs.symlinkSync(base, link);
    await expect(prepareBuiltinDefault(link)).rejects.toThrow(/'.*link' is a symbolic link/);
    if (process.getuid?.() === 0) {
      const theirs = path.join(base, 'theirs');
      fs.mkdirSync(theirs, { mode: 0o755 });
      fs.chownSync(theirs, 4321, 4321);
      await expect(prepareBuiltinDefault(theirs)).rejects.toThrow(/'.*theirs' belongs to user id 4321, not to you \(0\)/);
    }
    const own = path.join(base, 'own');
    fs.mkdirSync(own, { mode: 0o755 });
    expect(() => checkOwnPrivateDir(own)).not.toThrow();
    expect(defaultBuiltinRoot()).toMatch(process.getuid ? /difflora-builtin-\d+$/ : /difflora-builtin$/);
    fs.rmSync(base, { recursive: true, force: true });
  });
});
