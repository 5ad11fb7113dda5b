// Captions as kohya sd-scripts reads and varies them (library/train_util.py, config_util.py):
//
// - Caption files: `<image stem><--caption_extension>` next to each image (default '.caption'), its first line,
//   stripped. sd-scripts' DreamBooth-style folder layout for --train_data_dir: subfolders named `N_name` whose
//   images (directly inside) are repeated N times per epoch; an image without a caption file is captioned with the
//   folder's `name` part (its "class tokens"). A flat folder of images each with its caption file is the same
//   without repeats.
// - process_caption: with probability --caption_dropout_rate the whole caption becomes ""; otherwise, with
//   --shuffle_caption, the caption split at --caption_separator (each tag stripped) keeps its first --keep_tokens
//   tags in front and shuffles the rest, and is joined back with ", ".
//
// Every random choice comes from the item's own Rng (seed, epoch, position), after its crop and flip draws.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { placeInside, realRoot } from './dataset_files.js';
import { readTextFile } from '../io/files.js';
import { IMAGE_EXTENSIONS, type Dataset, type DatasetItem } from './imagefolder.js';
import type { Rng } from './transforms.js';

export interface CaptionOptions {
  /** --shuffle_caption: shuffle the tags after the first keepTokens. */
  shuffleCaption: boolean;
  /** --caption_separator (default ','). */
  captionSeparator: string;
  /** --keep_tokens: tags kept in front, unshuffled. */
  keepTokens: number;
  /** --caption_dropout_rate: probability of an empty caption. */
  captionDropoutRate: number;
}

export const CAPTION_DEFAULTS: CaptionOptions = Object.freeze({ shuffleCaption: false, captionSeparator: ',', keepTokens: 0, captionDropoutRate: 0 });

/** True when processCaption may change a caption (otherwise it is used as given and draws nothing). */
export function varies(o: CaptionOptions): boolean {
  return o.shuffleCaption || o.captionDropoutRate > 0;
}

/** sd-scripts' process_caption (dropout, then shuffle with keep_tokens), drawing from the item's rng. */
export function processCaption(caption: string, o: CaptionOptions, rng: Rng): string {
  if (o.captionDropoutRate > 0 && rng.nextFloat() < o.captionDropoutRate) return '';
  if (!o.shuffleCaption) return caption;
  const tokens = caption.trim().split(o.captionSeparator).map((t) => t.trim());
  const fixed = o.keepTokens > 0 ? tokens.slice(0, o.keepTokens) : [];
  const flex = o.keepTokens > 0 ? tokens.slice(o.keepTokens) : tokens;
  for (let i = flex.length - 1; i > 0; i--) { // Fisher–Yates
    const j = rng.nextInt(i + 1);
    const t = flex[i]!; flex[i] = flex[j]!; flex[j] = t;
  }
  return [...fixed, ...flex].join(', ');
}

const isImage = (name: string): boolean => IMAGE_EXTENSIONS.includes(path.extname(name).toLowerCase());

/** The caption file of an image (`<stem><ext>` next to it), or undefined when there is none. */
export function captionFileOf(imagePath: string, extension: string): string | undefined {
  const p = path.join(path.dirname(imagePath), path.parse(imagePath).name + extension);
  try { return fs.statSync(p).isFile() ? p : undefined; } catch { return undefined; }
}

/** The largest caption file read (sd-scripts' captions are one line of tags). */
export const MAX_CAPTION_BYTES = 1024 * 1024;

/** sd-scripts' read_caption: the first line of the caption file, stripped (an empty file is an error). */
export function readCaptionFile(file: string): string {
  // a FIFO or device is refused by name, never waited on; a caption is a line, so 1 MiB is far more than enough
  const text = readTextFile(file, 'caption file', MAX_CAPTION_BYTES);
  const lines = text.split(/\r?\n/);
  if (text.length === 0) throw new Error(`caption file is empty: ${file}`);
  return lines[0]!.trim();
}

/** The images directly inside a folder (hidden names skipped), sorted by name. */
function imagesIn(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true })
    .filter((e) => !e.name.startsWith('.') && isImage(e.name) && (e.isFile() || e.isSymbolicLink()))
    .map((e) => e.name).sort().map((n) => path.join(dir, n));
}

/** A repeat folder's name, `N_name` with N ≥ 1: its repeats and class tokens, or null. */
export function parseRepeatFolder(name: string): { repeats: number; classTokens: string } | null {
  const m = /^(\d+)_(.*)$/.exec(name);
  if (!m) return null;
  const repeats = Number(m[1]);
  return repeats >= 1 && Number.isSafeInteger(repeats) ? { repeats, classTokens: m[2]! } : null;
}

/** Which layout a --train_data_dir has. */
export type FolderLayout =
  | { kind: 'imagefolder' }
  | { kind: 'repeat-folders'; folders: { dir: string; repeats: number; classTokens: string }[] }
  | { kind: 'caption-files' };

/**
 * The layout of a training folder, decided only when unambiguous: any metadata.jsonl/metadata.csv under it means
 * Hugging Face's imagefolder (today's behaviour); otherwise subfolders named `N_name` holding images, and nothing
 * else holding images, mean sd-scripts' repeat folders; otherwise images at the top each with a caption file mean
 * caption files; anything else stays imagefolder (whose errors explain what is missing).
 */
export function detectLayout(dir: string, captionExtension: string): FolderLayout {
  const root = path.resolve(dir);
  let entries: fs.Dirent[];
  try { entries = fs.readdirSync(root, { withFileTypes: true }); } catch { return { kind: 'imagefolder' }; }
  const hasMetadata = (d: string, depth: number): boolean => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      if (e.name.startsWith('.')) continue;
      if (e.name === 'metadata.jsonl' || e.name === 'metadata.csv') return true;
      if (e.isDirectory() && depth < 8 && hasMetadata(path.join(d, e.name), depth + 1)) return true;
    }
    return false;
  };
  if (hasMetadata(root, 0)) return { kind: 'imagefolder' };
  const subdirs = entries.filter((e) => e.isDirectory() && !e.name.startsWith('.')).map((e) => e.name).sort();
  const top = imagesIn(root);
  const folders = subdirs.flatMap((name) => {
    const parsed = parseRepeatFolder(name);
    return parsed ? [{ dir: path.join(root, name), ...parsed }] : [];
  });
  if (folders.length > 0) {
    const others = subdirs.filter((n) => parseRepeatFolder(n) === null && imagesIn(path.join(root, n)).length > 0);
    if (top.length > 0 || others.length > 0) {
      const what = [...(top.length ? [`${top.length} image(s) at its top`] : []), ...others.map((n) => `folder '${n}' (not named N_name)`)].join(', ');
      throw new Error(`--train_data_dir '${dir}' mixes sd-scripts' N_name repeat folders with ${what}: move every image into an N_name folder (N = repeats per epoch), or give a metadata.jsonl`);
    }
    return { kind: 'repeat-folders', folders };
  }
  if (top.length > 0 && top.some((f) => captionFileOf(f, captionExtension) !== undefined)) {
    const missing = top.filter((f) => captionFileOf(f, captionExtension) === undefined);
    if (missing.length > 0) {
      throw new Error(`--train_data_dir '${dir}': ${missing.length} of ${top.length} images have no ${captionExtension} caption file (--caption_extension), e.g. '${path.basename(missing[0]!)}'; give every image one, or put them in an N_name folder whose name is their caption`);
    }
    return { kind: 'caption-files' };
  }
  return { kind: 'imagefolder' };
}

/** A dataset of images with captions from files (or their folder's name), each repeated as its folder says. */
export interface CaptionFileDataset extends Dataset {
  /** Distinct images (without repeats). */
  readonly images: number;
}

/**
 * The dataset of a folder in sd-scripts' layout (detectLayout's repeat-folders or caption-files): every image of
 * an `N_name` folder N times in a row (so an epoch holds N draws of it, each with its own crop, flip and caption
 * choice), captioned by its caption file or else by the folder's name.
 */
export function loadCaptionFolder(dir: string, layout: Exclude<FolderLayout, { kind: 'imagefolder' }>, captionExtension: string): CaptionFileDataset {
  const folders = layout.kind === 'repeat-folders' ? layout.folders : [{ dir: path.resolve(dir), repeats: 1, classTokens: '' }];
  const real = realRoot(path.resolve(dir));
  // a dataset only reads its own files: a symbolic link out of the folder (or dangling) is named, as imagefolder's
  const inside = (p: string, what: string) => {
    const placed = placeInside(real, p);
    if (!placed.ok) throw new Error(`--train_data_dir '${dir}': ${what} '${p}' ${placed.why}`);
  };
  const items: DatasetItem[] = [];
  let images = 0;
  for (const f of folders) {
    inside(f.dir, 'folder');
    for (const imagePath of imagesIn(f.dir)) {
      inside(imagePath, 'image');
      const file = captionFileOf(imagePath, captionExtension);
      if (file !== undefined) inside(file, 'caption file');
      const caption = file !== undefined ? readCaptionFile(file) : f.classTokens;
      images += 1;
      for (let r = 0; r < f.repeats; r++) items.push({ imagePath, captions: [caption] });
    }
  }
  if (items.length === 0) throw new Error(`no images in the N_name folders of '${dir}' (looked for ${IMAGE_EXTENSIONS.join(' ')} directly inside them)`);
  return {
    length: items.length, columns: ['image', 'text'], images,
    get(i: number) {
      const item = items[i];
      if (!Number.isInteger(i) || item === undefined) throw new RangeError(`dataset index ${i} out of range [0, ${items.length})`);
      return item;
    },
  };
}
