import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import sharp from 'sharp';
import { parquetMetadata } from 'hyparquet';
import { parquetWriteBuffer } from 'hyparquet-writer';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MAX_CAPTION_CHARS } from '../lib/data/metadata.js';
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
  // Fake hub cache, laid out as huggingface_hub does: datasets--org--name/{refs/main, blobs/<sha>,
  // snapshots/abc/data/… → ../../../blobs/<sha>} (the snapshot's files are links out of the snapshot folder).
  const repo = path.join(tmp, 'hub', 'datasets--org--name');
  writeStructParquet(path.join(repo, 'blobs', '0123abcd'), images);
  fs.mkdirSync(path.join(repo, 'snapshots', 'abc', 'data'), { recursive: true });
  fs.symlinkSync('../../../blobs/0123abcd', path.join(repo, 'snapshots', 'abc', 'data', 'train-00000-of-00001.parquet'));
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
    expect(path.basename(path.dirname(item.imagePath))).toMatch(/^difflora-parquet-[A-Za-z0-9]{6}$/);
    expect(fs.statSync(path.dirname(item.imagePath)).mode & 0o777).toBe(0o700); // a private folder …
    expect(fs.statSync(item.imagePath).mode & 0o777).toBe(0o600); // … of private files
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
      // each load writes into a fresh private folder (a shared, predictable one could be planted by another user)
      expect(path.dirname(again.get(2).imagePath)).not.toBe(path.dirname(ds.get(2).imagePath));
      expect(await pixel(again.get(2).imagePath)).toEqual(COLORS[2]);
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

// ---- hostile parquet datasets (issue #12): nothing outside the dataset folder is ever read or copied

/** A parquet file from column specs (hyparquet-writer's columnData), in a fresh folder of `tmp`. */
function writeColumns(name: string, columnData: Parameters<typeof parquetWriteBuffer>[0]['columnData'], schema?: Parameters<typeof parquetWriteBuffer>[0]['schema']): string {
  const dir = path.join(tmp, 'hostile', name);
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'train.parquet'), new Uint8Array(parquetWriteBuffer(schema ? { columnData, schema } : { columnData })));
  return dir;
}

const STRUCT_SCHEMA = [
  { name: 'root', num_children: 2 },
  { name: 'image', repetition_type: 'OPTIONAL', num_children: 2 },
  { name: 'bytes', type: 'BYTE_ARRAY', repetition_type: 'OPTIONAL' },
  { name: 'path', type: 'BYTE_ARRAY', converted_type: 'UTF8', repetition_type: 'OPTIONAL' },
  { name: 'text', type: 'BYTE_ARRAY', converted_type: 'UTF8', repetition_type: 'OPTIONAL' },
] as Parameters<typeof parquetWriteBuffer>[0]['schema'];

/** A dataset whose rows are image structs {bytes: null, path} with the given paths. */
function pathRows(name: string, paths: string[]): string {
  return writeColumns(name, [
    { name: 'image', data: paths.map((p) => ({ bytes: null, path: p })) },
    { name: 'text', data: paths.map((_, i) => `row ${i}`) },
  ], STRUCT_SCHEMA);
}

describe('loadParquetDataset: hostile input', () => {
  let secretDir: string;
  let secret: string;
  let out: string;
  beforeAll(async () => {
    secretDir = fs.mkdtempSync(path.join(os.tmpdir(), 'difflora-pq-secret-'));
    secret = path.join(secretDir, 'id_rsa');
    fs.writeFileSync(secret, 'SECRET-KEY-MATERIAL');
    out = path.join(tmp, 'hostile-out');
  });
  afterAll(() => { fs.rmSync(secretDir, { recursive: true, force: true }); });
  const noTempLeft = (): void => { expect(fs.existsSync(out) ? fs.readdirSync(out) : []).toEqual([]); };

  it('a {bytes: null, path} cell outside the dataset is refused, naming the file, the row and the path, and nothing is copied', async () => {
    const dir0 = path.join(tmp, 'hostile', 'abs');
    for (const bad of [secret, '../../../../../../../../../../..' + secret, path.relative(dir0, secret)]) {
      const dir = pathRows('abs', [bad]);
      const err = await loadParquetDataset(dir, { tmpDir: out }).then(() => null, (e: Error) => e);
      expect(err?.message).toContain(`${path.join(dir, 'train.parquet')}: row 0`);
      expect(err?.message).toContain(`path '${bad}'`);
      expect(err?.message).toMatch(/outside the dataset folder/);
      noTempLeft();
    }
  });

  it('a path cell through a symlink leading outside is refused; one inside is used where it is, not copied', async () => {
    const dir = pathRows('links', ['inside.png', 'escape.png']);
    fs.writeFileSync(path.join(dir, 'inside.png'), await png([1, 2, 3]));
    fs.symlinkSync(secret, path.join(dir, 'escape.png'));
    await expect(loadParquetDataset(dir, { tmpDir: out })).rejects.toThrow(/row 1: .*path 'escape\.png' resolves to '.*id_rsa', outside the dataset folder/);
    noTempLeft();
    fs.rmSync(path.join(dir, 'escape.png'));
    fs.copyFileSync(path.join(dir, 'inside.png'), path.join(dir, 'escape.png'));
    const ds = await loadParquetDataset(dir, { tmpDir: out });
    expect(ds.get(0).imagePath).toBe(path.join(dir, 'inside.png'));
    expect(ds.length).toBe(2);
    noTempLeft(); // nothing needed writing
  });

  it('a parquet file that is a symlink out of the dataset, or a FIFO, is refused by name without blocking', async () => {
    const dir = path.join(tmp, 'hostile', 'linkedfile');
    fs.mkdirSync(dir, { recursive: true });
    fs.symlinkSync(path.join(tmp, 'raw', 'part.parquet'), path.join(dir, 'train.parquet'));
    await expect(loadParquetDataset(dir, { tmpDir: out })).rejects.toThrow(/dataset entry '.*linkedfile\/train\.parquet' is a symbolic link that resolves to '.*raw\/part\.parquet', outside the dataset folder/);
    const fifoDir = path.join(tmp, 'hostile', 'fifo');
    fs.mkdirSync(fifoDir, { recursive: true });
    execFileSync('mkfifo', [path.join(fifoDir, 'train.parquet')]);
    await expect(loadParquetDataset(fifoDir, { tmpDir: out })).rejects.toThrow(/parquet file '.*fifo\/train\.parquet' is a FIFO, not a regular file/);
    noTempLeft();
  });

  it('wrong column types and null cells name the file, the row and the value', async () => {
    const images = [await png([9, 9, 9]), await png([8, 8, 8])];
    const intCaptions = writeColumns('int', [{ name: 'image', data: images, type: 'BYTE_ARRAY' }, { name: 'text', data: [1n, 2n], type: 'INT64' }]);
    await expect(loadParquetDataset(intCaptions, { tmpDir: out })).rejects.toThrow(/Caption column `text` should contain .*train\.parquet: row 0: got 1 \(an integer\)/);
    const nullCaption = writeColumns('nullcap', [{ name: 'image', data: images, type: 'BYTE_ARRAY' }, { name: 'text', data: ['ok', null], type: 'STRING' }]);
    await expect(loadParquetDataset(nullCaption, { tmpDir: out })).rejects.toThrow(/train\.parquet: row 1: got null/);
    const nullImage = writeColumns('nullimg', [{ name: 'image', data: [images[0]!, null], type: 'BYTE_ARRAY' }, { name: 'text', data: ['a', 'b'], type: 'STRING' }]);
    await expect(loadParquetDataset(nullImage, { tmpDir: out })).rejects.toThrow(/train\.parquet: row 1: image column 'image' should hold \{bytes, path\} structs or binary, got null/);
    const stringImage = writeColumns('strimg', [{ name: 'image', data: ['a.png', 'b.png'], type: 'STRING' }, { name: 'text', data: ['a', 'b'], type: 'STRING' }]);
    await expect(loadParquetDataset(stringImage, { tmpDir: out })).rejects.toThrow(/row 0: image column 'image' should hold .* got "a\.png"/);
    const garbage = path.join(tmp, 'hostile', 'garbage');
    fs.mkdirSync(garbage, { recursive: true });
    fs.writeFileSync(path.join(garbage, 'train.parquet'), 'PAR1 but not really');
    await expect(loadParquetDataset(garbage, { tmpDir: out })).rejects.toThrow(/garbage\/train\.parquet: not a readable parquet file/);
    noTempLeft(); // the refused loads removed the folders they had begun
  });

  it('a file that makes the decoder loop for ever is stopped by the watchdog and named', async () => {
    // a flipped byte in a page header (found by test/fuzz/data.test.ts): hyparquet's run-length decoder never advances
    const images = [await png([1, 1, 1]), await png([2, 2, 2]), await png([3, 3, 3])];
    const good = Buffer.from(parquetWriteBuffer({
      columnData: [{ name: 'image', data: images.map((bytes, i) => ({ bytes, path: i === 0 ? 'a.png' : null })) }, { name: 'text', data: ['a', 'b', 'c'] }],
      schema: STRUCT_SCHEMA,
    }));
    const page = Number(parquetMetadata(new Uint8Array(good).buffer).row_groups[0]!.columns[1]!.meta_data!.data_page_offset);
    good[page + 13] = 0x11;
    const dir = path.join(tmp, 'hostile', 'loop');
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, 'train.parquet'), good);
    const t0 = Date.now();
    await expect(loadParquetDataset(dir, { tmpDir: out, decodeTimeoutMs: 1500 }))
      .rejects.toThrow(`${path.join(dir, 'train.parquet')}: not a readable parquet file: it is corrupt or hostile: decoding did not finish in 2 s`);
    expect(Date.now() - t0).toBeLessThan(10_000);
    noTempLeft();
  });

  it('a huge caption is cut with one warning naming the file and row; close() removes the private folder', async () => {
    const huge = 'a cat '.repeat(400_000); // 2.4 M characters
    const dir = writeColumns('huge', [
      { name: 'image', data: [await png([1, 1, 1]), await png([2, 2, 2])], type: 'BYTE_ARRAY' },
      { name: 'text', data: ['short', huge], type: 'STRING' },
    ]);
    const warnings: string[] = [];
    const ds = await loadParquetDataset(dir, { tmpDir: out, onWarning: (w) => warnings.push(w) });
    expect(ds.get(0).captions).toEqual(['short']);
    expect(ds.get(1).captions[0]).toBe(huge.slice(0, MAX_CAPTION_CHARS));
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toMatch(/1 caption\(s\) longer than 16384 characters were cut .*huge\/train\.parquet: row 1 \(column 'text'\)/);
    const folder = path.dirname(ds.get(0).imagePath);
    expect(fs.existsSync(folder)).toBe(true);
    ds.close?.();
    expect(fs.existsSync(folder)).toBe(false);
    ds.close?.(); // idempotent
  });
});
