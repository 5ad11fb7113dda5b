// Which files a dataset may touch. A dataset folder is untrusted input: a row naming '../../x', an absolute
// path, or a symbolic link planted in the folder must never make difflora read (and train on, or copy into a
// temporary folder) a file that lives elsewhere. Every path a dataset yields is checked here after resolving
// its symbolic links (realpath), the way files.ts's isInside does; and the temporary folders a dataset
// writes are private (0700, files 0600) and removed when the dataset is closed or the process exits.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makePrivateTempDir } from '../io/files.js';

const errnoOf = (e: unknown): string | undefined => (e as NodeJS.ErrnoException).code;
const byCodeUnit = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0);

/** True when `real` (already resolved) is `realRoot` or lies under it. */
function within(realRoot: string, real: string): boolean {
  const rel = path.relative(realRoot, real);
  return rel === '' || (rel !== '..' && !rel.startsWith(`..${path.sep}`) && !path.isAbsolute(rel));
}

/** The real path of a dataset folder (resolved once, so that checking a million rows stays cheap). */
export function realRoot(dir: string): string {
  return fs.realpathSync.native(dir);
}

/** Where a path a dataset names really is. */
export type Placement =
  | { ok: true; real: string }
  | { ok: false; why: string };

/**
 * Resolves `p` (every symbolic link on the way) and checks that it lies inside `real` (a realRoot). Never
 * opens `p`: a FIFO or a device is found out when it is read.
 */
export function placeInside(real: string, p: string): Placement {
  if (p.includes('\0')) return { ok: false, why: 'contains a NUL character' };
  let target: string;
  try {
    target = fs.realpathSync.native(p);
  } catch (e) {
    const code = errnoOf(e);
    if (code === 'ELOOP') return { ok: false, why: 'is a symbolic link loop' };
    if (code === 'ENOENT' || code === 'ENOTDIR') {
      let dangling = false;
      try { dangling = fs.lstatSync(p).isSymbolicLink(); } catch { /* absent */ }
      return { ok: false, why: dangling ? 'is a dangling symbolic link' : 'does not exist' };
    }
    return { ok: false, why: `cannot be resolved (${(e as Error).message})` };
  }
  if (!within(real, target)) return { ok: false, why: `resolves to '${target}', outside the dataset folder` };
  return { ok: true, real: target };
}

/**
 * Every entry under `root` (hidden names skipped) whose base name `wanted` accepts, depth first in name
 * order. Entries of any kind are returned (a FIFO named metadata.jsonl is refused when it is read, with its
 * name); folders are walked. A symbolic link among them is followed only when it resolves inside
 * `containRoot` (default: root; a Hugging Face snapshot's files link into the repo's blobs/); one that points
 * outside, dangles or loops is an error naming it. Linked folders are walked after the real tree, once: a
 * link to a folder already walked (a loop, or the same files twice) is an error.
 */
export function walkDataset(root: string, wanted: (name: string) => boolean, containRoot = root): string[] {
  const contain = realRoot(containRoot);
  const out: string[] = [];
  const walked = new Set<string>();
  const links: { link: string; real: string }[] = [];
  const refuse = (entry: string, why: string): never => {
    throw new Error(`dataset entry '${entry}' ${why}; a dataset may only use files inside its folder '${containRoot}' (copy the file in instead of linking to it)`);
  };

  const walkDir = (dir: string, real: string): void => {
    if (walked.has(real)) refuse(dir, `is the folder '${real}' again (a symbolic link loop, or the same files twice)`);
    walked.add(real);
    let names: string[];
    try { names = fs.readdirSync(dir); } catch (e) { throw new Error(`cannot list dataset folder '${dir}': ${(e as Error).message}`); }
    for (const name of names.sort(byCodeUnit)) {
      if (name.startsWith('.')) continue;
      const p = path.join(dir, name);
      let st: fs.Stats;
      try { st = fs.lstatSync(p); } catch { continue; } // removed while listing
      if (st.isDirectory()) walkDir(p, path.join(real, name));
      else if (st.isSymbolicLink()) followLink(p, name);
      else if (wanted(name)) out.push(p);
    }
  };

  const followLink = (p: string, name: string): void => {
    const placed = placeInside(contain, p);
    if (!placed.ok) {
      // a link the dataset would not use (a README pointing elsewhere) is never read: leave it be
      let isDir = false;
      try { isDir = fs.statSync(p).isDirectory(); } catch { /* dangling or a loop */ }
      if (wanted(name) || isDir) refuse(p, `is a symbolic link that ${placed.why}`);
      return;
    }
    let isDir = false;
    try { isDir = fs.statSync(placed.real).isDirectory(); } catch { /* vanished */ }
    if (isDir) links.push({ link: p, real: placed.real });
    else if (wanted(name)) out.push(p);
  };

  walkDir(root, realRoot(root));
  // linked folders last, each once (a link found inside one is queued too)
  for (let k = 0; k < links.length; k++) walkDir(links[k]!.link, links[k]!.real);
  return out;
}

// ---- private temporary folders

const liveTempDirs = new Set<string>();
let exitHookInstalled = false;

function removeLiveTempDirs(): void {
  for (const dir of liveTempDirs) fs.rmSync(dir, { recursive: true, force: true });
  liveTempDirs.clear();
}

/**
 * A new private (0700) folder for files a dataset writes, under `base` (default: the OS temp folder). It is
 * removed by removeDatasetTempDir, and in any case when the process exits (a run that fails, or a
 * library user who never closes the dataset, leaves nothing behind; a SIGKILL still can).
 */
export function makeDatasetTempDir(prefix: string, base?: string): string {
  let dir: string;
  if (base === undefined) {
    dir = makePrivateTempDir(prefix);
  } else {
    fs.mkdirSync(base, { recursive: true, mode: 0o700 });
    dir = fs.mkdtempSync(path.join(base, prefix)); // mkdtemp creates with mode 0700
  }
  liveTempDirs.add(dir);
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on('exit', removeLiveTempDirs);
  }
  return dir;
}

/** Removes a folder made by makeDatasetTempDir (idempotent). */
export function removeDatasetTempDir(dir: string): void {
  if (!liveTempDirs.delete(dir)) return;
  fs.rmSync(dir, { recursive: true, force: true });
}

/** Writes a new private file (0600, O_EXCL: never through an existing file or link) in such a folder. */
export function writePrivateFile(file: string, bytes: Uint8Array): void {
  fs.writeFileSync(file, bytes, { flag: 'wx', mode: 0o600 });
}
