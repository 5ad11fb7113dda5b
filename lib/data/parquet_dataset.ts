// A dataset given to `--dataset_name` as in diffusers' train_text_to_image_lora.py: a local folder of
// *.parquet files, or a Hugging Face dataset id ("org/name") already in the local Hugging Face cache
// (datasets--org--name/snapshots/<commit>/…; difflora never downloads). Rows are read with hyparquet; the
// image column holds `{bytes, path}` structs (the datasets `Image` feature, e.g. lambdalabs/pokemon-blip-captions)
// or raw binary. The `Dataset` contract hands out file paths, so the image bytes are written once, at load,
// to os.tmpdir()/difflora-parquet-<hash>/<row>.<ext>.
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parquetMetadata, parquetReadObjects, parquetSchema } from 'hyparquet';
import { hubCacheDir, isHubId } from '../models/loading.js';
import { captionsOf, columnError, type Dataset, type DatasetItem } from './imagefolder.js';

export interface ParquetDatasetOptions {
  /** Default 'image'. */
  imageColumn?: string;
  /** Default 'text'. */
  captionColumn?: string;
  /** The Hugging Face hub cache (the folder holding datasets--org--name/), as datasets' cache_dir. */
  cacheDir?: string;
  /** Hub revision: a branch or tag name (looked up in the cache's refs/) or a commit hash. Default 'main'. */
  revision?: string;
  /** Where image files are written; default os.tmpdir(). */
  tmpDir?: string;
}

class ParquetDataset implements Dataset {
  constructor(readonly columns: readonly string[], private readonly items: readonly DatasetItem[], readonly imageDir: string) {}
  get length(): number { return this.items.length; }
  get(i: number): DatasetItem {
    const item = this.items[i];
    if (!Number.isInteger(i) || item === undefined) throw new RangeError(`dataset index ${i} out of range [0, ${this.items.length})`);
    return item;
  }
}

const expandHome = (p: string): string => (p === '~' || p.startsWith('~/') ? path.join(os.homedir(), p.slice(1)) : p);
const isDir = (p: string): boolean => fs.existsSync(p) && fs.statSync(p).isDirectory();
const isFile = (p: string): boolean => fs.existsSync(p) && fs.statSync(p).isFile();

/** Every *.parquet file under dir (following symlinks, as the hub cache's snapshot files are), sorted. */
export function findParquetFiles(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string): void => {
    for (const name of fs.readdirSync(d).sort()) {
      if (name.startsWith('.')) continue;
      const p = path.join(d, name);
      let st: fs.Stats;
      try { st = fs.statSync(p); } catch { continue; } // a dangling symlink
      if (st.isDirectory()) walk(p);
      else if (st.isFile() && name.toLowerCase().endsWith('.parquet')) out.push(p);
    }
  };
  walk(dir);
  return out;
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

function checkInside(what: string, value: string): void {
  if (path.isAbsolute(value) || path.normalize(value).split(/[\\/]/).includes('..')) {
    throw new Error(`${what} '${value}' must be a plain name, not a path`);
  }
}

/** The folder holding the dataset's parquet files: a local folder, or the cached snapshot of a hub id. */
export function resolveDatasetDir(nameOrPath: string, o: Pick<ParquetDatasetOptions, 'cacheDir' | 'revision'> = {}): string {
  const local = path.resolve(expandHome(nameOrPath));
  if (fs.existsSync(local)) {
    if (!fs.statSync(local).isDirectory()) throw new Error(`--dataset_name '${nameOrPath}' is a file; pass a folder holding *.parquet files or a dataset id ("org/name")`);
    return local;
  }
  const looked: string[] = [`${local} (local folder): does not exist`];
  if (!isHubId(nameOrPath)) {
    throw new Error(`dataset '${nameOrPath}' not found: no folder '${local}', and it is not a Hugging Face dataset id ("org/name").`);
  }
  const cache = hubCacheDir(o);
  const revision = o.revision ?? 'main';
  checkInside('revision', revision);
  const repoFolder = `datasets--${nameOrPath.replace('/', '--')}`;
  const repo = path.join(cache.dir, repoFolder);
  const fail = (reason: string): never => {
    const rev = o.revision ? ` --revision ${o.revision}` : '';
    throw new Error([
      `dataset '${nameOrPath}' at revision '${revision}' not found offline: ${reason}.`,
      'Looked at:',
      ...looked.map((l) => `  - ${l}`),
      `Hugging Face cache: ${cache.dir} (from ${cache.from}).`,
      'difflora does not download datasets. To use this one, either:',
      `  - on a machine with network run \`huggingface-cli download --repo-type dataset ${nameOrPath}${rev}\`, then copy its cache folder ${repoFolder}/ (in ~/.cache/huggingface/hub/ there) into ${cache.dir}/ here, or point HF_HUB_CACHE or cacheDir at the copy;`,
      `  - or pass a local folder holding the *.parquet files, e.g. one made with \`huggingface-cli download --repo-type dataset ${nameOrPath}${rev} --local-dir <folder>\`.`,
    ].join('\n'));
  };
  if (!isDir(repo)) {
    looked.push(`${repo}: does not exist`);
    fail(`'${nameOrPath}' is not in the Hugging Face cache`);
  }
  const refFile = path.join(repo, 'refs', revision);
  let commit = revision;
  if (isFile(refFile)) {
    commit = fs.readFileSync(refFile, 'utf8').trim();
    looked.push(`${refFile}: names commit ${commit}`);
  } else {
    looked.push(`${refFile}: does not exist, so the revision is taken as a commit hash`);
  }
  checkInside('commit', commit);
  const snapshot = path.join(repo, 'snapshots', commit);
  if (!isDir(snapshot)) {
    looked.push(`${snapshot}: does not exist`);
    fail(`revision '${revision}' is not in the cache`);
  }
  return snapshot;
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

function imageBytesOf(value: unknown, imageColumn: string, where: string): { bytes: Uint8Array; cellPath?: string } {
  if (value instanceof Uint8Array) return { bytes: value };
  if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
    const { bytes, path: p } = value as { bytes?: unknown; path?: unknown };
    const cellPath = typeof p === 'string' ? p : undefined;
    if (bytes instanceof Uint8Array) return cellPath === undefined ? { bytes } : { bytes, cellPath };
    if ((bytes === null || bytes === undefined) && cellPath !== undefined && path.isAbsolute(cellPath) && isFile(cellPath)) {
      return { bytes: fs.readFileSync(cellPath), cellPath };
    }
    throw new Error(`${where}: image column '${imageColumn}' has no image bytes${cellPath ? ` (path '${cellPath}' is not a readable absolute file)` : ''}`);
  }
  throw new Error(`${where}: image column '${imageColumn}' should hold {bytes, path} structs or binary, got ${value === null ? 'null' : typeof value}`);
}

/** Writes bytes to file unless a file of that size is already there (written by an earlier load). */
function writeOnce(file: string, bytes: Uint8Array): void {
  if (isFile(file) && fs.statSync(file).size === bytes.byteLength) return;
  const tmp = `${file}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, bytes);
  fs.renameSync(tmp, file);
}

/**
 * Loads a parquet dataset (train split) from a local folder or the offline Hugging Face cache, checks the image
 * and caption columns, and writes every row's image to a temp file so that `get(i).imagePath` is a real path.
 */
export async function loadParquetDataset(nameOrPath: string, o: ParquetDatasetOptions = {}): Promise<Dataset> {
  const imageColumn = o.imageColumn ?? 'image';
  const captionColumn = o.captionColumn ?? 'text';
  const root = resolveDatasetDir(nameOrPath, o);
  const all = findParquetFiles(root);
  if (all.length === 0) throw new Error(`dataset '${nameOrPath}': no *.parquet files in '${root}' or its subfolders`);
  const files = trainSplitFiles(all, root);

  // Same files (path, size, mtime) and image column → same folder, so a reload reuses the written images.
  const hash = createHash('sha256');
  hash.update(imageColumn);
  for (const f of files) {
    const st = fs.statSync(f);
    hash.update(`\0${fs.realpathSync(f)}\0${st.size}\0${st.mtimeMs}`);
  }
  const imageDir = path.join(o.tmpDir ?? os.tmpdir(), `difflora-parquet-${hash.digest('hex').slice(0, 16)}`);

  let columns: string[] | undefined;
  const items: DatasetItem[] = [];
  for (const file of files) {
    const rel = path.relative(root, file);
    const buf = fs.readFileSync(file);
    const ab = buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength) as ArrayBuffer;
    let metadata;
    try { metadata = parquetMetadata(ab); } catch (e) { throw new Error(`${file}: not a readable parquet file: ${(e as Error).message}`); }
    const fileColumns = parquetSchema(metadata).children.map((c) => c.element.name);
    if (columns === undefined) {
      columns = fileColumns;
      if (!columns.includes(imageColumn)) throw columnError('image_column', imageColumn, columns);
      if (!columns.includes(captionColumn)) throw columnError('caption_column', captionColumn, columns);
      fs.mkdirSync(imageDir, { recursive: true });
    } else if (!fileColumns.includes(imageColumn) || !fileColumns.includes(captionColumn)) {
      throw new Error(`${file}: columns ${fileColumns.join(', ')} lack '${imageColumn}' or '${captionColumn}' (the first file has ${columns.join(', ')})`);
    }
    // utf8: false keeps unannotated binary (image bytes) as Uint8Array; UTF8-annotated strings stay strings.
    const rows = await parquetReadObjects({ file: ab, metadata, columns: [imageColumn, captionColumn], utf8: false });
    rows.forEach((row, k) => {
      const where = `${rel}: row ${k}`;
      const { bytes, cellPath } = imageBytesOf(row[imageColumn], imageColumn, where);
      const captions = captionsOf(row[captionColumn], captionColumn, where);
      const imagePath = path.join(imageDir, `${items.length}${imageExtension(bytes, cellPath)}`);
      writeOnce(imagePath, bytes);
      items.push({ imagePath, captions });
    });
  }
  if (items.length === 0) throw new Error(`dataset '${nameOrPath}': the parquet files under '${root}' have no rows`);
  return new ParquetDataset(columns ?? [], items, imageDir);
}
