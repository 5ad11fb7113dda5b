// --dataloader_num_workers: N images decoded at once and 2 batches per worker decoded ahead (torch's
// prefetch_factor 2); 0 decodes nothing ahead. Batches are bit-identical for every worker count, across
// epochs, with broken images skipped, and after a resume.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadImageFolder, type Dataset } from '../lib/data/imagefolder.js';
import { ImageCaptionLoader, type Batch } from '../lib/data/loader.js';

let tmp: string;
let dataset: Dataset;
beforeAll(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'difflora-workers-'));
  const lines: string[] = [];
  for (let i = 0; i < 11; i++) {
    const raw = Buffer.alloc(30 * 26 * 3);
    for (let k = 0; k < raw.length; k++) raw[k] = (k * (i + 3) + 17 * i) & 255;
    const img = sharp(raw, { raw: { width: 30, height: 26, channels: 3 } });
    const name = `${i}.${i % 2 ? 'jpg' : 'png'}`;
    await (i % 2 ? img.jpeg({ quality: 90 }) : img.png()).toFile(path.join(tmp, name));
    lines.push(JSON.stringify({ file_name: name, text: i % 3 ? `picture ${i}` : [`a ${i}`, `b ${i}`, `c ${i}`] }));
  }
  fs.writeFileSync(path.join(tmp, '5.jpg'), fs.readFileSync(path.join(tmp, '5.jpg')).subarray(0, 200)); // truncated
  fs.writeFileSync(path.join(tmp, 'metadata.jsonl'), lines.join('\n'));
  dataset = loadImageFolder(tmp);
});
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

const options = { batchSize: 3, resolution: 16, randomFlip: true, seed: 5, skipBroken: true, interpolation: 'bilinear' as const };

async function batches(loader: ImageCaptionLoader, n: number): Promise<Batch[]> {
  const out: Batch[] = [];
  for (let i = 0; i < n; i++) out.push(await loader.next());
  return out;
}

const same = (a: Batch[], b: Batch[]): void => {
  expect(b.length).toBe(a.length);
  a.forEach((x, i) => {
    const y = b[i]!;
    expect([y.captions, y.imagePaths, y.cropTopLeft, y.shape]).toEqual([x.captions, x.imagePaths, x.cropTopLeft, x.shape]);
    expect(Buffer.from(y.pixelValues.buffer).equals(Buffer.from(x.pixelValues.buffer)), `batch ${i}`).toBe(true);
  });
};

describe('ImageCaptionLoader numWorkers', () => {
  it('gives bit-identical batches for 0, 1, 2, 4 and 8 workers (3 epochs, a broken image skipped)', async () => {
    const refLoader = new ImageCaptionLoader(dataset, { ...options, numWorkers: 0 });
    const ref = await batches(refLoader, 12);
    expect(refLoader.skipped).toBeGreaterThanOrEqual(2);
    expect(ref.some((b) => b.shape[0] < 3)).toBe(true); // partial last batches
    for (const numWorkers of [1, 2, 4, 8]) {
      const loader = new ImageCaptionLoader(dataset, { ...options, numWorkers });
      same(ref, await batches(loader, 12));
      expect(loader.skippedImages.map((s) => s.file)).toEqual(refLoader.skippedImages.map((s) => s.file));
    }
  });

  it('0 workers: nothing decoded ahead, one image at a time', async () => {
    const loader = new ImageCaptionLoader(dataset, { ...options, numWorkers: 0 });
    await loader.next();
    expect(loader.stats.started).toBe(3);
    expect(loader.stats.peakInFlight).toBe(1);
    await new Promise((r) => setTimeout(r, 50));
    expect(loader.stats.started).toBe(3); // still nothing ahead
  });

  it('N workers: at most N decodes at once, 2 batches per worker decoded ahead', async () => {
    for (const numWorkers of [1, 2, 3]) {
      const loader = new ImageCaptionLoader(dataset, { ...options, numWorkers });
      await loader.next();
      await new Promise((r) => setTimeout(r, 200)); // let the prefetch finish
      expect(loader.stats.peakInFlight).toBeLessThanOrEqual(numWorkers);
      expect(loader.stats.started).toBe(3 + 2 * numWorkers * 3);
      expect(loader.stats.inFlight).toBe(0);
    }
    const four = new ImageCaptionLoader(dataset, { ...options, numWorkers: 4 });
    await four.next();
    expect(four.stats.peakInFlight).toBe(4);
  });

  it('resumes exactly with a different worker count', async () => {
    const ref = await batches(new ImageCaptionLoader(dataset, { ...options, numWorkers: 2 }), 9);
    const first = new ImageCaptionLoader(dataset, { ...options, numWorkers: 4 });
    await batches(first, 5);
    const resumed = new ImageCaptionLoader(dataset, { ...options, numWorkers: 0 });
    resumed.setState(first.getState());
    same(ref.slice(5), await batches(resumed, 4));
  });

  it('refuses a negative or fractional worker count', () => {
    expect(() => new ImageCaptionLoader(dataset, { ...options, numWorkers: -1 })).toThrow(/numWorkers/);
    expect(() => new ImageCaptionLoader(dataset, { ...options, numWorkers: 1.5 })).toThrow(/numWorkers/);
  });
});
