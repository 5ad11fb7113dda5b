import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import sharp from 'sharp';
import { parquetWriteBuffer } from 'hyparquet-writer';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadParquetDataset, trainSplitFiles } from '../lib/data/parquet_dataset.js';

let tmp: string;
let imagesDir: string;
const COLORS: readonly [number, number, number][] = [[255, 0, 0], [0, 255, 0], [0, 0, 255]];

async function png(rgb: [number, number, number]): Promise<Uint8Array> {
  const buf = await sharp({ create: { width: 4, height: 3, channels: 3, background: { r: rgb[0], g: rgb[1], b: rgb[2] } } }).png().toBuffer();
  return new Uint8Array(buf);
}

/** The pokemon-blip-captions layout: image = struct {bytes, path}, text = string, plus a list<string> column. */
function writeStructParquet(file: string, images: Uint8Array[]): void {
  const buf = parquetWriteBuffer({
    columnData: [
      { name: 'image', data: images.map((bytes, i) => ({ bytes, path: i === 0 ? `img${i}.png` : null })) },
      { name: 'text', data: ['a red square', 'a green square', 'a blue square'] },
      { name: 'captions', data: [['red'], ['green'], ['blue one', 'blue two']] },
    ],
    schema: [
      { name: 'root', num_children: 3 },
      { name: 'image', repetition_type: 'OPTIONAL', num_children: 2 },
      { name: 'bytes', type: 'BYTE_ARRAY', repetition_type: 'OPTIONAL' },
      { name: 'path', type: 'BYTE_ARRAY', converted_type: 'UTF8', repetition_type: 'OPTIONAL' },
      { name: 'text', type: 'BYTE_ARRAY', converted_type: 'UTF8', repetition_type: 'OPTIONAL' },
      { name: 'captions', repetition_type: 'OPTIONAL', converted_type: 'LIST', num_children: 1 },
      { name: 'list', repetition_type: 'REPEATED', num_children: 1 },
      { name: 'element', type: 'BYTE_ARRAY', converted_type: 'UTF8', repetition_type: 'OPTIONAL' },
    ],
  });
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, new Uint8Array(buf));
}

async function pixel(file: string): Promise<number[]> {
  const { data, info } = await sharp(file).raw().toBuffer({ resolveWithObject: true });
  expect([info.width, info.height]).toEqual([4, 3]);
  return [data[0]!, data[1]!, data[2]!];
}

beforeAll(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'difflora-pq-test-'));
  imagesDir = path.join(tmp, 'images-out');
  const images = await Promise.all(COLORS.map(png));
  writeStructParquet(path.join(tmp, 'local', 'data', 'train-00000-of-00001.parquet'), images);
  // A test split next to it must not be read.
  writeStructParquet(path.join(tmp, 'local', 'data', 'test-00000-of-00001.parquet'), images);
  // Fake hub cache: datasets--org--name/{refs/main, snapshots/abc/data/…}.
  const repo = path.join(tmp, 'hub', 'datasets--org--name');
  writeStructParquet(path.join(repo, 'snapshots', 'abc', 'data', 'train-00000-of-00001.parquet'), images);
  fs.mkdirSync(path.join(repo, 'refs'), { recursive: true });
  fs.writeFileSync(path.join(repo, 'refs', 'main'), 'abc\n');
  // Raw binary image column.
  fs.mkdirSync(path.join(tmp, 'raw'));
  fs.writeFileSync(path.join(tmp, 'raw', 'part.parquet'), new Uint8Array(parquetWriteBuffer({
    columnData: [
      { name: 'img', data: images.slice(0, 2), type: 'BYTE_ARRAY' },
      { name: 'caption', data: ['r', 'g'], type: 'STRING' },
    ],
  })));
});

afterAll(() => { fs.rmSync(tmp, { recursive: true, force: true }); });

async function checkRows(ds: Awaited<ReturnType<typeof loadParquetDataset>>, captions: string[][]): Promise<void> {
  expect(ds.length).toBe(3);
  for (let i = 0; i < 3; i++) {
    const item = ds.get(i);
    expect(item.captions).toEqual(captions[i]);
    expect(item.imagePath.startsWith(imagesDir)).toBe(true);
    expect(path.basename(path.dirname(item.imagePath))).toMatch(/^difflora-parquet-[0-9a-f]+$/);
    expect(path.extname(item.imagePath)).toBe('.png');
    expect(await pixel(item.imagePath)).toEqual(COLORS[i]);
  }
  expect(() => ds.get(3)).toThrow(RangeError);
}

describe('loadParquetDataset', () => {
  it('reads a local folder (train split only), struct image cells and string captions', async () => {
    const ds = await loadParquetDataset(path.join(tmp, 'local'), { tmpDir: imagesDir });
    expect(ds.columns).toEqual(['image', 'text', 'captions']);
    await checkRows(ds, [['a red square'], ['a green square'], ['a blue square']]);
  });

  it('reads list-of-string captions', async () => {
    const ds = await loadParquetDataset(path.join(tmp, 'local'), { captionColumn: 'captions', tmpDir: imagesDir });
    await checkRows(ds, [['red'], ['green'], ['blue one', 'blue two']]);
  });

  it('resolves a dataset id from the HF cache (cacheDir and HF_HUB_CACHE)', async () => {
    const ds = await loadParquetDataset('org/name', { cacheDir: path.join(tmp, 'hub'), tmpDir: imagesDir });
    await checkRows(ds, [['a red square'], ['a green square'], ['a blue square']]);
    const saved = process.env.HF_HUB_CACHE;
    process.env.HF_HUB_CACHE = path.join(tmp, 'hub');
    try {
      const again = await loadParquetDataset('org/name', { revision: 'abc', tmpDir: imagesDir });
      expect(again.get(2).imagePath).toBe(ds.get(2).imagePath); // same files → same image folder, reused
    } finally {
      if (saved === undefined) delete process.env.HF_HUB_CACHE; else process.env.HF_HUB_CACHE = saved;
    }
  });

  it('reads raw binary image cells', async () => {
    const ds = await loadParquetDataset(path.join(tmp, 'raw'), { imageColumn: 'img', captionColumn: 'caption', tmpDir: imagesDir });
    expect(ds.length).toBe(2);
    expect(ds.get(1).captions).toEqual(['g']);
    expect(await pixel(ds.get(1).imagePath)).toEqual(COLORS[1]);
  });

  it('names the columns when a column is wrong', async () => {
    await expect(loadParquetDataset(path.join(tmp, 'local'), { imageColumn: 'x', tmpDir: imagesDir }))
      .rejects.toThrow("--image_column' value 'x' needs to be one of: image, text, captions");
    await expect(loadParquetDataset(path.join(tmp, 'local'), { captionColumn: 'caption', tmpDir: imagesDir }))
      .rejects.toThrow("--caption_column' value 'caption' needs to be one of: image, text, captions");
    await expect(loadParquetDataset(path.join(tmp, 'local'), { captionColumn: 'image', tmpDir: imagesDir }))
      .rejects.toThrow('Caption column `image` should contain either strings or lists of strings');
  });

  it('explains a missing dataset: where it looked and how to put it there', async () => {
    const hub = path.join(tmp, 'hub');
    const err = await loadParquetDataset('org/missing', { cacheDir: hub }).then(() => null, (e: Error) => e);
    expect(err?.message).toContain(`${path.resolve('org/missing')} (local folder): does not exist`);
    expect(err?.message).toContain(`${path.join(hub, 'datasets--org--missing')}: does not exist`);
    expect(err?.message).toContain('huggingface-cli download --repo-type dataset org/missing');
    const rev = await loadParquetDataset('org/name', { cacheDir: hub, revision: 'v2' }).then(() => null, (e: Error) => e);
    expect(rev?.message).toContain(path.join(hub, 'datasets--org--name', 'refs', 'v2'));
    expect(rev?.message).toContain(`${path.join(hub, 'datasets--org--name', 'snapshots', 'v2')}: does not exist`);
    fs.mkdirSync(path.join(tmp, 'empty'));
    await expect(loadParquetDataset(path.join(tmp, 'empty'))).rejects.toThrow('no *.parquet files');
  });

  it('picks train split files', () => {
    const r = '/d';
    expect(trainSplitFiles(['/d/data/test-0.parquet', '/d/data/train-0.parquet', '/d/train/x.parquet'], r))
      .toEqual(['/d/data/train-0.parquet', '/d/train/x.parquet']);
    expect(trainSplitFiles(['/d/a.parquet', '/d/b.parquet'], r)).toEqual(['/d/a.parquet', '/d/b.parquet']);
  });
});
