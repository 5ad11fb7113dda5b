// The Hugging Face `imagefolder` layout (what `--train_data_dir` points at): images anywhere under a folder,
// captions in `metadata.jsonl` (one JSON object per line) or `metadata.csv` (header row), each row naming its
// image by a `file_name` column relative to the metadata file's folder. As datasets' imagefolder builder,
// `file_name` becomes the image column ("image"); `<name>_file_name` becomes column `<name>`.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { placeInside, realRoot, walkDataset } from './dataset_files.js';
import { CaptionCutter, cell, describeValue, emitDataWarning, parseCsvRecords, readCsvRows, readJsonlRows } from './metadata.js';
import { Rng } from './transforms.js';
import { DATA_DEFAULTS } from './defaults.js';

export const IMAGE_EXTENSIONS: readonly string[] = ['.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tiff', '.tif'];

export interface DatasetItem {
  imagePath: string;
  /** One caption, or several when the caption column holds a list (training picks one at random). */
  captions: string[];
}

export interface Dataset {
  readonly length: number;
  /** Column names as datasets would show them: the image column first, then the metadata columns. */
  readonly columns: readonly string[];
  get(i: number): DatasetItem;
  /** Releases what the dataset holds (a parquet dataset's temporary image folder); idempotent. */
  close?(): void;
}

export interface ImageFolderOptions {
  imageColumn?: string;
  captionColumn?: string;
  /** Receives the warnings of the load (captions cut); default: process.emitWarning. */
  onWarning?: (message: string) => void;
}

class ArrayDataset implements Dataset {
  constructor(readonly columns: readonly string[], private readonly items: readonly DatasetItem[], private readonly onClose?: () => void) {}
  get length(): number { return this.items.length; }
  get(i: number): DatasetItem {
    const item = this.items[i];
    if (!Number.isInteger(i) || item === undefined) throw new RangeError(`dataset index ${i} out of range [0, ${this.items.length})`);
    return item;
  }
  close(): void { this.onClose?.(); }
}

/** Parses CSV text (RFC 4180; see parseCsvRecords) into rows of fields. */
export function parseCsv(text: string): string[][] {
  return parseCsvRecords(text).map((r) => r.cells);
}

/** Longer than Linux's PATH_MAX: no file has such a name (and an error should not quote megabytes of it). */
const MAX_PATH_CHARS = 4096;

const isImage = (p: string): boolean => IMAGE_EXTENSIONS.includes(path.extname(p).toLowerCase());
const isMetadata = (name: string): boolean => name === 'metadata.jsonl' || name === 'metadata.csv';

/** A caption cell as the script accepts it: a string or a non-empty list of strings. */
export function captionsOf(value: unknown, captionColumn: string, where: string): string[] {
  if (typeof value === 'string') return [value];
  if (Array.isArray(value) && value.length > 0 && value.every((v) => typeof v === 'string')) return value as string[];
  throw new Error(`Caption column \`${captionColumn}\` should contain either strings or lists of strings (${where}: got ${describeValue(value)})`);
}

/** The script's message for a missing --image_column / --caption_column. */
export function columnError(flag: string, value: string, columns: readonly string[]): Error {
  return new Error(`--${flag}' value '${value}' needs to be one of: ${columns.join(', ')}`);
}

/** The column a `*file_name` key fills (datasets' imagefolder: file_name → image, x_file_name → x), or null. */
function fileColumnOf(key: string): string | null {
  if (key === 'file_name') return 'image';
  return key.endsWith('_file_name') ? key.slice(0, -'_file_name'.length) : null;
}

interface Resolved { row: Record<string, unknown>; where: string; images: Map<string, string> }

/**
 * The files a metadata row names, each checked to lie inside the dataset folder after resolving symbolic
 * links (the folder's real path is `real`).
 */
function resolveRowFiles(row: Record<string, unknown>, where: string, base: string, root: string, real: string): Map<string, string> {
  const images = new Map<string, string>();
  for (const key of Object.keys(row)) {
    const col = fileColumnOf(key);
    if (col === null) continue;
    const value = row[key];
    if (typeof value !== 'string' || value === '') {
      throw new Error(`${where}: '${key}' must be a relative file path, got ${describeValue(value)}`);
    }
    if (value.length > MAX_PATH_CHARS) throw new Error(`${where}: '${key}' is longer than any file path (${describeValue(value)})`);
    const p = path.resolve(base, value.replace(/\\/g, '/'));
    // a dataset may only point at its own files (no '../../etc/passwd', no absolute paths elsewhere) …
    const inside = path.relative(root, p);
    if (inside === '..' || inside.startsWith(`..${path.sep}`) || path.isAbsolute(inside)) {
      throw new Error(`${where}: ${key} '${value}' points outside the dataset folder '${root}'`);
    }
    // … nor reach out through a symbolic link
    const placed = placeInside(real, p);
    if (!placed.ok) {
      const why = placed.why === 'does not exist' ? `does not exist (looked for ${p})` : placed.why.replace('outside the dataset folder', `outside the dataset folder '${root}'`);
      throw new Error(`${where}: ${key} '${value}' ${why}`);
    }
    images.set(col, p);
  }
  if (images.size === 0) throw new Error(`${where} has no 'file_name' column (columns: ${Object.keys(row).join(', ') || 'none'})`);
  return images;
}

/** Reads every metadata file's rows and the files they name. */
function readRows(metaFiles: readonly string[], root: string, real: string): Resolved[] {
  const resolved: Resolved[] = [];
  for (const meta of metaFiles) {
    const rows = meta.endsWith('.csv') ? readCsvRows(meta) : readJsonlRows(meta);
    for (const { row, line } of rows) {
      const where = `${meta}: line ${line}`;
      resolved.push({ row, where, images: resolveRowFiles(row, where, path.dirname(meta), root, real) });
    }
  }
  return resolved;
}

/**
 * Loads an imagefolder dataset. With metadata, the rows of every `metadata.jsonl`/`metadata.csv` under dir
 * are the examples (in folder then row order); images no row names are left out. Without metadata, every
 * image is an example with only the image column (so a caption column cannot be found). Every file it uses
 * lies inside dir (symbolic links included); captions longer than MAX_CAPTION_CHARS are cut, with one
 * warning (to `onWarning`, else a process warning).
 */
export function loadImageFolder(dir: string, options: ImageFolderOptions = {}): Dataset {
  const imageColumn = options.imageColumn ?? DATA_DEFAULTS.imageColumn;
  const captionColumn = options.captionColumn ?? DATA_DEFAULTS.captionColumn;
  const root = path.resolve(dir);
  let st: fs.Stats;
  try { st = fs.statSync(root); } catch { throw new Error(`--train_data_dir '${dir}' does not exist`); }
  if (!st.isDirectory()) throw new Error(`--train_data_dir '${dir}' is not a folder`);

  const files = walkDataset(root, (name) => isImage(name) || isMetadata(name));
  const images = files.filter(isImage);
  if (images.length === 0) {
    throw new Error(`no images in '${dir}' (looked for ${IMAGE_EXTENSIONS.join(' ')} in it and its subfolders)`);
  }
  const metaFiles = files.filter((f) => isMetadata(path.basename(f)));
  const metaDirs = new Set<string>();
  for (const m of metaFiles) {
    const d = path.dirname(m);
    if (metaDirs.has(d)) throw new Error(`both metadata.jsonl and metadata.csv in '${d}': keep one`);
    metaDirs.add(d);
  }

  if (metaFiles.length === 0) {
    const columns = ['image'];
    if (imageColumn !== 'image') throw columnError('image_column', imageColumn, columns);
    throw columnError('caption_column', captionColumn, columns);
  }

  const resolved = readRows(metaFiles, root, realRoot(root));
  if (resolved.length === 0) throw new Error(`the metadata under '${dir}' has no rows`);
  const columns: string[] = [];
  const addColumn = (c: string): void => { if (!columns.includes(c)) columns.push(c); };
  for (const r of resolved) for (const c of r.images.keys()) addColumn(c);
  for (const r of resolved) for (const k of Object.keys(r.row)) if (fileColumnOf(k) === null) addColumn(k);

  if (!columns.includes(imageColumn)) throw columnError('image_column', imageColumn, columns);
  if (!columns.includes(captionColumn)) throw columnError('caption_column', captionColumn, columns);

  const cutter = new CaptionCutter();
  const items: DatasetItem[] = resolved.map((r) => {
    const imagePath = r.images.get(imageColumn);
    if (imagePath === undefined) throw new Error(`${r.where}: no value for the image column '${imageColumn}'`);
    if (!isImage(imagePath)) throw new Error(`${r.where}: '${imagePath}' is not an image (${IMAGE_EXTENSIONS.join(' ')})`);
    const cap = r.images.has(captionColumn) ? undefined : cell(r.row, captionColumn);
    if (cap === undefined) throw new Error(`${r.where}: no value for the caption column '${captionColumn}'`);
    const captions = captionsOf(cap, captionColumn, r.where).map((c) => cutter.cap(c, `${r.where} (column '${captionColumn}')`));
    return { imagePath, captions };
  });
  const warning = cutter.warning();
  if (warning) emitDataWarning(warning, options.onWarning);
  return new ArrayDataset(columns, items);
}

/** A seeded permutation of 0..n-1 (Fisher–Yates driven by Rng). */
export function permutation(n: number, seed: number): Uint32Array {
  const perm = new Uint32Array(n);
  for (let i = 0; i < n; i++) perm[i] = i;
  const rng = new Rng(seed);
  for (let i = n - 1; i > 0; i--) {
    const j = rng.nextInt(i + 1);
    const t = perm[i]!; perm[i] = perm[j]!; perm[j] = t;
  }
  return perm;
}

/**
 * `--max_train_samples`: shuffles with the seed, then keeps the first maxTrainSamples (the script's
 * `dataset.shuffle(seed).select(range(n))`; the permutation is ours, not numpy's). More than the
 * dataset holds keeps everything (shuffled).
 */
export function shuffleAndTruncate(dataset: Dataset, maxTrainSamples: number | undefined | null, seed: number): Dataset {
  if (maxTrainSamples === undefined || maxTrainSamples === null) return dataset;
  if (!Number.isInteger(maxTrainSamples) || maxTrainSamples < 1) throw new Error(`--max_train_samples must be a positive integer, got ${maxTrainSamples}`);
  const perm = permutation(dataset.length, seed);
  const keep = Math.min(maxTrainSamples, dataset.length);
  const items: DatasetItem[] = [];
  for (let i = 0; i < keep; i++) items.push(dataset.get(perm[i]!));
  return new ArrayDataset(dataset.columns, items, dataset.close?.bind(dataset));
}
