// A dataset given to `--dataset_name` as in diffusers' train_text_to_image_lora.py: a local folder of
// *.parquet files, or a Hugging Face dataset id ("org/name") already in the local Hugging Face cache
// (datasets--org--name/snapshots/<commit>/…; difflora never downloads). Rows are read with hyparquet; the
// image column holds `{bytes, path}` structs (the datasets `Image` feature, e.g. lambdalabs/pokemon-blip-captions)
// or raw binary. The `Dataset` contract hands out file paths, so image bytes are written, at load, into a
// fresh private folder (0700, files 0600) under os.tmpdir(), removed by `close()` or when the process exits.
// A cell with no bytes but a `path` names a file of the dataset itself: it must lie inside the dataset
// folder (after resolving symbolic links), and is then used where it is, never copied.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { expandHome, findSnapshot, isHubId } from '../io/hub.js';
import { makeDatasetTempDir, placeInside, realRoot, removeDatasetTempDir, walkDataset, writePrivateFile } from './dataset_files.js';
import { captionsOf, columnError, type Dataset, type DatasetItem } from './imagefolder.js';
import { CaptionCutter, describeValue, emitDataWarning, MAX_CAPTION_CHARS } from './metadata.js';
import { readParquetRows } from './parquet_reader.js';
import { DATA_DEFAULTS } from './defaults.js';

export interface ParquetDatasetOptions {
  /** Default 'image'. */
  imageColumn?: string;
  /** Default 'text'. */
  captionColumn?: string;
  /** The Hugging Face hub cache (the folder holding datasets--org--name/), as datasets' cache_dir. */
  cacheDir?: string;
  /** Hub revision: a branch or tag name (looked up in the cache's refs/) or a commit hash. Default 'main'. */
  revision?: string;
  /** Where the private image folder is made; default os.tmpdir(). */
  tmpDir?: string;
  /** Receives the warnings of the load (captions cut); default: process.emitWarning. */
  onWarning?: (message: string) => void;
  /** How long one parquet file may take to decode before it is called corrupt (default: 30 s + 1 s per 2 MiB). */
  decodeTimeoutMs?: number;
}

class ParquetDataset implements Dataset {
  /** The private folder holding the images written from the parquet bytes (undefined when none was needed). */
  readonly imageDir: string | undefined;
  constructor(readonly columns: readonly string[], private readonly items: readonly DatasetItem[], imageDir: string | undefined) {
    this.imageDir = imageDir;
  }
  get length(): number { return this.items.length; }
  get(i: number): DatasetItem {
    const item = this.items[i];
    if (!Number.isInteger(i) || item === undefined) throw new RangeError(`dataset index ${i} out of range [0, ${this.items.length})`);
    return item;
  }
  /** Removes the image folder (its paths stop working); idempotent. */
  close(): void { if (this.imageDir !== undefined) removeDatasetTempDir(this.imageDir); }
}


/**
 * Every *.parquet file under dir, depth first in name order. Symbolic links are followed only when they stay
 * inside `containRoot` (the hub cache's snapshot files link to ../../blobs/, inside the dataset's repo folder);
 * one that leads elsewhere is an error naming it.
 */
export function findParquetFiles(dir: string, containRoot = dir): string[] {
  return walkDataset(dir, (name) => name.toLowerCase().endsWith('.parquet'), containRoot);
}

/**
 * The files of the train split (the one the training script uses): those whose name starts with "train" or
 * that sit in a folder named "train", as the hub's data_files patterns; all files when none is so named.
 */
export function trainSplitFiles(files: readonly string[], root: string): string[] {
  const isTrain = (f: string): boolean => {
    const parts = path.relative(root, f).split(path.sep);
    const base = parts[parts.length - 1] ?? '';
    return parts.slice(0, -1).includes('train') || /^train([-_.]|$)/.test(base);
  };
  const train = files.filter(isTrain);
  return train.length > 0 ? train : [...files];
}

/** The folder holding the dataset's parquet files: a local folder, or the cached snapshot of a hub id. */
export function resolveDatasetDir(nameOrPath: string, o: Pick<ParquetDatasetOptions, 'cacheDir' | 'revision'> = {}): string {
  return locateDataset(nameOrPath, o).dir;
}

/**
 * The dataset's folder and the folder its files must stay inside: the folder itself, or for a hub snapshot
 * the dataset's repo folder in the cache (its snapshot files are links into blobs/).
 */
export function locateDataset(nameOrPath: string, o: Pick<ParquetDatasetOptions, 'cacheDir' | 'revision'>): { dir: string; containRoot: string } {
  const local = path.resolve(expandHome(nameOrPath));
  if (fs.existsSync(local)) {
    if (!fs.statSync(local).isDirectory()) throw new Error(`--dataset_name '${nameOrPath}' is a file; pass a folder holding *.parquet files or a dataset id ("org/name")`);
    return { dir: local, containRoot: local };
  }
  const looked: string[] = [`${local} (local folder): does not exist`];
  if (!isHubId(nameOrPath)) {
    throw new Error(`dataset '${nameOrPath}' not found: no folder '${local}', and it is not a Hugging Face dataset id ("org/name").`);
  }
  const { snapshot, repo } = findSnapshot(nameOrPath, 'dataset', o, looked, 'pass a local folder holding the *.parquet files');
  return { dir: snapshot, containRoot: repo };
}

const MAGIC: readonly [string, (b: Uint8Array) => boolean][] = [
  ['.png', (b) => b[0] === 0x89 && b[1] === 0x50 && b[2] === 0x4e && b[3] === 0x47],
  ['.jpg', (b) => b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff],
  ['.gif', (b) => b[0] === 0x47 && b[1] === 0x49 && b[2] === 0x46],
  ['.bmp', (b) => b[0] === 0x42 && b[1] === 0x4d],
  ['.webp', (b) => b[0] === 0x52 && b[1] === 0x49 && b[2] === 0x46 && b[3] === 0x46 && b[8] === 0x57 && b[9] === 0x45 && b[10] === 0x42 && b[11] === 0x50],
  ['.tif', (b) => (b[0] === 0x49 && b[1] === 0x49 && b[2] === 0x2a && b[3] === 0) || (b[0] === 0x4d && b[1] === 0x4d && b[2] === 0 && b[3] === 0x2a)],
];

/** The file extension for image bytes: from their magic number, else from the cell's path, else '.img'. */
function imageExtension(bytes: Uint8Array, cellPath: string | undefined): string {
  for (const [ext, test] of MAGIC) if (test(bytes)) return ext;
  const fromPath = cellPath ? path.extname(cellPath).toLowerCase() : '';
  return /^\.[a-z0-9]{1,5}$/.test(fromPath) ? fromPath : '.img';
}

/** What an image cell holds: bytes to write out, or the path of a file of the dataset to use where it is. */
type ImageCell = { bytes: Uint8Array; cellPath?: string } | { file: string };

/**
 * An image cell: binary, or a datasets `Image` struct `{bytes, path}`. With no bytes, `path` names a file of
 * the dataset (relative to its folder, or absolute), which must lie inside the folder once symbolic links are
 * resolved: a row never makes difflora read a file from elsewhere.
 */
function imageCellOf(value: unknown, imageColumn: string, where: string, dataset: { dir: string; contain: string; real: string }): ImageCell {
  if (value instanceof Uint8Array) return { bytes: value };
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new Error(`${where}: image column '${imageColumn}' should hold {bytes, path} structs or binary, got ${describeValue(value)}`);
  }
  const { bytes, path: p } = value as { bytes?: unknown; path?: unknown };
  if (p !== undefined && p !== null && typeof p !== 'string') {
    throw new Error(`${where}: image column '${imageColumn}': 'path' should be a string, got ${describeValue(p)}`);
  }
  const cellPath = typeof p === 'string' && p !== '' ? p : undefined;
  if (bytes instanceof Uint8Array) return cellPath === undefined ? { bytes } : { bytes, cellPath };
  if (bytes !== null && bytes !== undefined) {
    throw new Error(`${where}: image column '${imageColumn}': 'bytes' should be binary, got ${describeValue(bytes)}`);
  }
  if (cellPath === undefined) throw new Error(`${where}: image column '${imageColumn}' has no image bytes and no path`);
  const file = path.resolve(dataset.dir, cellPath);
  const refuse = (why: string): never => {
    throw new Error(`${where}: image column '${imageColumn}' has no bytes, and its path '${cellPath}' ${why}`);
  };
  // outside by its very spelling ('/home/me/.ssh/id_rsa', '../../x'): refused before anything there is looked at
  const rel = path.relative(dataset.contain, file);
  if (rel === '..' || rel.startsWith(`..${path.sep}`) || path.isAbsolute(rel)) refuse(`points outside the dataset folder '${dataset.contain}'`);
  const placed = placeInside(dataset.real, file);
  if (!placed.ok) refuse(placed.why.replace('outside the dataset folder', `outside the dataset folder '${dataset.contain}'`));
  return { file };
}

/** Where a load writes the images it extracts: a private folder made on first use. */
class ImageSink {
  dir: string | undefined;
  private count = 0;
  constructor(private readonly base: string | undefined) {}
  write(bytes: Uint8Array, cellPath: string | undefined): string {
    this.dir ??= makeDatasetTempDir('difflora-parquet-', this.base);
    const file = path.join(this.dir, `${this.count++}${imageExtension(bytes, cellPath)}`);
    writePrivateFile(file, bytes);
    return file;
  }
}

/**
 * Loads a parquet dataset (train split) from a local folder or the offline Hugging Face cache, checks the image
 * and caption columns, and writes every row's image bytes to a private temporary folder so that
 * `get(i).imagePath` is a real path (close() removes it; so does the end of the process).
 */
export async function loadParquetDataset(nameOrPath: string, o: ParquetDatasetOptions = {}): Promise<Dataset> {
  const imageColumn = o.imageColumn ?? DATA_DEFAULTS.imageColumn;
  const captionColumn = o.captionColumn ?? DATA_DEFAULTS.captionColumn;
  const { dir: root, containRoot } = locateDataset(nameOrPath, o);
  const all = findParquetFiles(root, containRoot);
  if (all.length === 0) throw new Error(`dataset '${nameOrPath}': no *.parquet files in '${root}' or its subfolders`);
  const files = trainSplitFiles(all, root);
  const dataset = { dir: root, contain: containRoot, real: realRoot(containRoot) };

  let columns: string[] | undefined;
  const items: DatasetItem[] = [];
  const sink = new ImageSink(o.tmpDir);
  const cutter = new CaptionCutter();
  try {
    for (const file of files) {
      const { columns: fileColumns, rows } = await readParquetRows(file, { imageColumn, captionColumn, maxCaptionChars: MAX_CAPTION_CHARS + 1, timeoutMs: o.decodeTimeoutMs });
      if (columns === undefined) {
        columns = fileColumns;
        if (!columns.includes(imageColumn)) throw columnError('image_column', imageColumn, columns);
        if (!columns.includes(captionColumn)) throw columnError('caption_column', captionColumn, columns);
      }
      if (rows === undefined) {
        throw new Error(`${file}: columns ${fileColumns.join(', ')} lack '${imageColumn}' or '${captionColumn}' (the first file has ${columns.join(', ')})`);
      }
      rows.forEach((row, k) => {
        const where = `${file}: row ${k}`;
        const cellValue = imageCellOf(row[imageColumn], imageColumn, where, dataset);
        const captions = captionsOf(row[captionColumn], captionColumn, where).map((c) => cutter.cap(c, `${where} (column '${captionColumn}')`));
        const imagePath = 'file' in cellValue ? cellValue.file : sink.write(cellValue.bytes, cellValue.cellPath);
        items.push({ imagePath, captions });
      });
    }
    if (items.length === 0) throw new Error(`dataset '${nameOrPath}': the parquet files under '${root}' have no rows`);
  } catch (e) {
    if (sink.dir !== undefined) removeDatasetTempDir(sink.dir); // a refused load leaves nothing behind
    throw e;
  }
  const warning = cutter.warning();
  if (warning) emitDataWarning(warning, o.onWarning);
  return new ParquetDataset(columns ?? [], items, sink.dir);
}
