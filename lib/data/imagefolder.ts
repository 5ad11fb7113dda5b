// The Hugging Face `imagefolder` layout (what `--train_data_dir` points at): images anywhere under a folder,
// captions in `metadata.jsonl` (one JSON object per line) or `metadata.csv` (header row), each row naming its
// image by a `file_name` column relative to the metadata file's folder. As datasets' imagefolder builder,
// `file_name` becomes the image column ("image"); `<name>_file_name` becomes column `<name>`.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Rng } from './transforms.js';

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
}

export interface ImageFolderOptions {
  imageColumn?: string;
  captionColumn?: string;
}

class ArrayDataset implements Dataset {
  constructor(readonly columns: readonly string[], private readonly items: readonly DatasetItem[]) {}
  get length(): number { return this.items.length; }
  get(i: number): DatasetItem {
    const item = this.items[i];
    if (!Number.isInteger(i) || item === undefined) throw new RangeError(`dataset index ${i} out of range [0, ${this.items.length})`);
    return item;
  }
}

/**
 * Parses CSV text (RFC 4180): comma separated, fields optionally in double quotes, `""` inside quotes is a
 * quote, quoted fields may hold commas and newlines; LF or CRLF line ends; a leading BOM is ignored.
 */
export function parseCsv(text: string): string[][] {
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  const rows: string[][] = [];
  let row: string[] = [];
  let field = '';
  let inQuotes = false;
  let fieldStarted = false; // distinguishes an empty last line from a row with one empty field
  let i = 0;
  const n = text.length;
  while (i < n) {
    const c = text[i]!;
    if (inQuotes) {
      if (c === '"') {
        if (text[i + 1] === '"') { field += '"'; i += 2; continue; }
        inQuotes = false; i++; continue;
      }
      field += c; i++; continue;
    }
    if (c === '"') {
      if (field.length > 0) throw new Error(`CSV: unexpected quote inside an unquoted field (row ${rows.length + 1})`);
      inQuotes = true; fieldStarted = true; i++; continue;
    }
    if (c === ',') { row.push(field); field = ''; fieldStarted = true; i++; continue; }
    if (c === '\r' || c === '\n') {
      if (c === '\r' && text[i + 1] === '\n') i++;
      i++;
      if (fieldStarted || field.length > 0 || row.length > 0) { row.push(field); rows.push(row); }
      row = []; field = ''; fieldStarted = false;
      continue;
    }
    field += c; fieldStarted = true; i++;
  }
  if (inQuotes) throw new Error(`CSV: unterminated quoted field (row ${rows.length + 1})`);
  if (fieldStarted || field.length > 0 || row.length > 0) { row.push(field); rows.push(row); }
  return rows;
}

type Row = Record<string, unknown>;

function readJsonl(file: string): Row[] {
  const rows: Row[] = [];
  const lines = fs.readFileSync(file, 'utf8').replace(/^\ufeff/, '').split(/\r?\n/);
  lines.forEach((line, k) => {
    if (line.trim() === '') return;
    let v: unknown;
    try { v = JSON.parse(line); } catch (e) {
      throw new Error(`${file}: line ${k + 1} is not valid JSON: ${(e as Error).message}`);
    }
    if (v === null || typeof v !== 'object' || Array.isArray(v)) throw new Error(`${file}: line ${k + 1} is not a JSON object`);
    rows.push(v as Row);
  });
  return rows;
}

function readCsv(file: string): Row[] {
  let table: string[][];
  try { table = parseCsv(fs.readFileSync(file, 'utf8')); } catch (e) { throw new Error(`${file}: ${(e as Error).message}`); }
  const header = table[0];
  if (header === undefined) return [];
  return table.slice(1).map((cells, k) => {
    if (cells.length !== header.length) {
      throw new Error(`${file}: row ${k + 2} has ${cells.length} fields, the header has ${header.length}`);
    }
    const row: Row = {};
    header.forEach((h, j) => { row[h] = cells[j]; });
    return row;
  });
}

/** Every file under dir (recursive, sorted, hidden folders skipped), as absolute paths. */
function walk(dir: string, out: string[] = []): string[] {
  const entries = fs.readdirSync(dir, { withFileTypes: true }).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  for (const e of entries) {
    if (e.name.startsWith('.')) continue;
    const p = path.join(dir, e.name);
    if (e.isDirectory()) walk(p, out);
    else if (e.isFile() || e.isSymbolicLink()) out.push(p);
  }
  return out;
}

const isImage = (p: string): boolean => IMAGE_EXTENSIONS.includes(path.extname(p).toLowerCase());

/** A caption cell as the script accepts it: a string or a non-empty list of strings. */
export function captionsOf(value: unknown, captionColumn: string, where: string): string[] {
  if (typeof value === 'string') return [value];
  if (Array.isArray(value) && value.length > 0 && value.every((v) => typeof v === 'string')) return value as string[];
  throw new Error(`Caption column \`${captionColumn}\` should contain either strings or lists of strings (${where}: ${JSON.stringify(value)})`);
}

/** The script's message for a missing --image_column / --caption_column. */
export function columnError(flag: string, value: string, columns: readonly string[]): Error {
  return new Error(`--${flag}' value '${value}' needs to be one of: ${columns.join(', ')}`);
}

/**
 * Loads an imagefolder dataset. With metadata, the rows of every `metadata.jsonl`/`metadata.csv` under dir
 * are the examples (in folder then row order); images no row names are left out. Without metadata, every
 * image is an example with only the image column (so a caption column cannot be found).
 */
export function loadImageFolder(dir: string, options: ImageFolderOptions = {}): Dataset {
  const imageColumn = options.imageColumn ?? 'image';
  const captionColumn = options.captionColumn ?? 'text';
  const root = path.resolve(dir);
  if (!fs.existsSync(root)) throw new Error(`--train_data_dir '${dir}' does not exist`);
  if (!fs.statSync(root).isDirectory()) throw new Error(`--train_data_dir '${dir}' is not a folder`);

  const files = walk(root);
  const images = files.filter(isImage);
  if (images.length === 0) {
    throw new Error(`no images in '${dir}' (looked for ${IMAGE_EXTENSIONS.join(' ')} in it and its subfolders)`);
  }
  const metaFiles = files.filter((f) => ['metadata.jsonl', 'metadata.csv'].includes(path.basename(f)));
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

  // Read every row, resolving its file name column(s) to paths.
  interface Resolved { row: Row; file: string; line: number; images: Map<string, string> }
  const resolved: Resolved[] = [];
  const columns: string[] = [];
  const addColumn = (c: string): void => { if (!columns.includes(c)) columns.push(c); };
  for (const meta of metaFiles) {
    const rows = meta.endsWith('.csv') ? readCsv(meta) : readJsonl(meta);
    const base = path.dirname(meta);
    rows.forEach((row, k) => {
      const where = meta.endsWith('.csv') ? k + 2 : k + 1;
      const imgs = new Map<string, string>();
      for (const [key, value] of Object.entries(row)) {
        const col = key === 'file_name' ? 'image' : key.endsWith('_file_name') ? key.slice(0, -'_file_name'.length) : null;
        if (col === null) continue;
        if (typeof value !== 'string' || value === '') {
          throw new Error(`${meta}: row ${where}: '${key}' must be a relative file path, got ${JSON.stringify(value)}`);
        }
        const p = path.resolve(base, value.replace(/\\/g, '/'));
        // a dataset may only point at its own files (no '../../etc/passwd', no absolute paths elsewhere)
        const inside = path.relative(root, p);
        if (inside.startsWith('..') || path.isAbsolute(inside)) {
          throw new Error(`${meta}: row ${where}: ${key} '${value}' points outside the dataset folder '${root}'`);
        }
        if (!fs.existsSync(p)) throw new Error(`${meta}: row ${where}: ${key} '${value}' does not exist (looked for ${p})`);
        imgs.set(col, p);
      }
      if (imgs.size === 0) throw new Error(`${meta}: row ${where} has no 'file_name' column (columns: ${Object.keys(row).join(', ')})`);
      resolved.push({ row, file: meta, line: where, images: imgs });
    });
  }
  if (resolved.length === 0) throw new Error(`the metadata under '${dir}' has no rows`);
  for (const r of resolved) for (const c of r.images.keys()) addColumn(c);
  for (const r of resolved) for (const k of Object.keys(r.row)) if (k !== 'file_name' && !k.endsWith('_file_name')) addColumn(k);

  if (!columns.includes(imageColumn)) throw columnError('image_column', imageColumn, columns);
  if (!columns.includes(captionColumn)) throw columnError('caption_column', captionColumn, columns);

  const items: DatasetItem[] = resolved.map((r) => {
    const where = `${r.file} row ${r.line}`;
    const imagePath = r.images.get(imageColumn);
    if (imagePath === undefined) throw new Error(`${where}: no value for the image column '${imageColumn}'`);
    if (!isImage(imagePath)) throw new Error(`${where}: '${imagePath}' is not an image (${IMAGE_EXTENSIONS.join(' ')})`);
    const cap = r.images.has(captionColumn) ? undefined : r.row[captionColumn];
    if (cap === undefined) throw new Error(`${where}: no value for the caption column '${captionColumn}'`);
    return { imagePath, captions: captionsOf(cap, captionColumn, where) };
  });
  if (items.length === 0) throw new Error(`the metadata under '${dir}' has no rows`);
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
  return new ArrayDataset(dataset.columns, items);
}
