// The local Hugging Face cache, read offline (difflora never downloads): where the cache is, what a hub id is,
// and how an id + revision becomes a snapshot folder — `<kind>s--org--name/refs/<revision>` names a commit,
// `snapshots/<commit>/` holds the files — for models (lib/models), schedulers and datasets (lib/data) alike.
// Every user value that becomes a path component is checked to be a plain name before a path is built from it.
import { existsSync, readdirSync, statSync } from 'node:fs';
import { homedir } from 'node:os';
import { isAbsolute, join, resolve } from 'node:path';
import { checkOptionNames } from '../options.js';
import { readTextFile } from './files.js';

/** Where to look: the cache folder (as diffusers' cache_dir) and the revision (branch, tag or commit). */
export interface HubOptions {
  /** The Hugging Face hub cache (the folder holding models--org--name/ and datasets--org--name/). */
  cacheDir?: string;
  /** Hub revision: a branch or tag name (looked up in the cache's refs/) or a commit hash. Default 'main'. */
  revision?: string;
  /** A folder inside the model (a pipeline's component: 'unet', 'vae', 'text_encoder', 'tokenizer'). */
  subfolder?: string;
  /** A weights variant, e.g. 'fp16' → diffusion_pytorch_model.fp16.safetensors. */
  variant?: string;
}

export const expandHome = (p: string): string => (p === '~' || p.startsWith('~/') ? join(homedir(), p.slice(1)) : p);
const isDir = (p: string): boolean => { try { return statSync(p).isDirectory(); } catch { return false; } };
const list = (dir: string, filter: (name: string) => boolean = () => true): string[] =>
  isDir(dir) ? readdirSync(dir).filter(filter).sort() : [];

/** Folders of `dir` (not hidden), for an error message. */
export function subfolders(dir: string): string {
  const names = list(dir, (n) => isDir(join(dir, n)) && !n.startsWith('.'));
  return names.length ? names.join(', ') : 'none';
}

/** The hub cache folder and what chose it, in huggingface_hub's order. */
export function hubCacheDir(o: Pick<HubOptions, 'cacheDir'> = {}): { dir: string; from: string } {
  const env = process.env;
  const pick = (dir: string, from: string) => ({ dir: resolve(expandHome(dir)), from });
  if (o.cacheDir) return pick(o.cacheDir, 'the cacheDir option');
  if (env.HF_HUB_CACHE) return pick(env.HF_HUB_CACHE, 'HF_HUB_CACHE');
  if (env.HUGGINGFACE_HUB_CACHE) return pick(env.HUGGINGFACE_HUB_CACHE, 'HUGGINGFACE_HUB_CACHE');
  if (env.HF_HOME) return pick(join(env.HF_HOME, 'hub'), '$HF_HOME/hub');
  if (env.XDG_CACHE_HOME) return pick(join(env.XDG_CACHE_HOME, 'huggingface', 'hub'), '$XDG_CACHE_HOME/huggingface/hub');
  return pick(join(homedir(), '.cache', 'huggingface', 'hub'), 'the default ~/.cache/huggingface/hub');
}

/** huggingface_hub's repo id rule: "name" or "org/name", letters, digits, '-', '_', '.', no '--' or '..'. */
export function isHubId(s: string): boolean {
  return /^(?:[\w.-]+\/)?[\w.-]+$/.test(s) && !s.includes('--') && !s.includes('..') && !/^[.-]|[.-]$|[.-]\/|\/[.-]/.test(s) && s.length <= 96;
}

/** A value for a message, cut short (a hostile value may be huge). */
function show(v: unknown): string {
  let s: string;
  try { s = JSON.stringify(v) ?? String(v); } catch { s = String(v); }
  return s.length > 80 ? `${s.slice(0, 77)}...` : s;
}

/**
 * A name that becomes one path component (variant, weight file name, component name, commit): a plain name,
 * so it can only ever name something inside the folder it is joined to. `..` anywhere is refused too (a
 * variant is spliced into a file name: 'x.<variant>.safetensors').
 */
export function checkPlainName(option: string, value: unknown): string {
  if (typeof value !== 'string') throw new Error(`${option} must be a string, got ${show(value)}`);
  const problem = value === '' ? 'is empty'
    : /[/\\]/.test(value) ? 'contains a path separator'
      : value.includes('\0') ? 'contains a NUL character'
        : value.includes('..') ? "contains '..'"
          : value === '.' ? "is '.'" : undefined;
  if (problem) throw new Error(`${option} '${value.replace(/\0/g, '\\0')}' ${problem}: it must be a plain name, not a path`);
  return value;
}

/**
 * A relative path given by a user (subfolder, revision: hub revisions may hold '/', as refs/pr/1): every
 * '/'-separated segment must be a plain name, so the path stays inside the folder it is joined to.
 */
export function checkRelativePath(option: string, value: unknown, inside = 'the model folder'): string {
  if (typeof value !== 'string') throw new Error(`${option} must be a string, got ${show(value)}`);
  if (isAbsolute(value) || value.startsWith('/')) throw new Error(`${option} '${value}' must be a relative path inside ${inside}, not an absolute path`);
  for (const segment of value.split('/')) {
    try {
      checkPlainName(option, segment);
    } catch {
      throw new Error(`${option} '${value.replace(/\0/g, '\\0')}' must be a relative path inside ${inside} (plain names separated by '/', no '..', '\\', empty parts or NUL)`);
    }
  }
  return value;
}

/** What a cache lookup is for: it names the cache folder and the download command in the error. */
export type RepoKind = 'model' | 'dataset';

/**
 * The cached snapshot of a hub id, offline. As huggingface_hub: a ref file names the commit, otherwise the
 * revision is taken as a commit hash. `looked` lists the paths tried so far (for the error). Returns the
 * snapshot folder and the repo folder (its snapshot files link into the repo's blobs/).
 */
export function findSnapshot(id: string, kind: RepoKind, o: HubOptions, looked: string[], howToUseLocal: string): { snapshot: string; repo: string; fail: (reason: string, partial?: boolean) => never } {
  const cache = hubCacheDir(o);
  const revision = o.revision ?? 'main';
  checkRelativePath('revision', revision, 'the cache');
  const repoFolder = `${kind}s--${id.replace('/', '--')}`;
  const repo = join(cache.dir, repoFolder);
  const fail = (reason: string, partial = false): never => {
    const include = partial && o.subfolder ? ` --include "${o.subfolder}/*"` : '';
    const rev = o.revision ? ` --revision ${o.revision}` : '';
    const type = kind === 'dataset' ? ' --repo-type dataset' : '';
    throw new Error([
      `${kind} '${id}'${o.subfolder ? ` (subfolder '${o.subfolder}')` : ''} at revision '${revision}' not found offline: ${reason}.`,
      'Looked at:',
      ...looked.map((l) => `  - ${l}`),
      `Hugging Face cache: ${cache.dir} (from ${cache.from}).`,
      `difflora does not download ${kind}s. To use this one, either:`,
      `  - on a machine with network run \`huggingface-cli download${type} ${id}${rev}${include}\`, then copy its cache folder ${repoFolder}/ (in ~/.cache/huggingface/hub/ there) into ${cache.dir}/ here, or point HF_HUB_CACHE or cacheDir at the copy;`,
      `  - or ${howToUseLocal}, e.g. one made with \`huggingface-cli download${type} ${id}${rev} --local-dir <folder>\`.`,
    ].join('\n'));
  };
  if (!isDir(repo)) {
    looked.push(`${repo}: does not exist`);
    fail(`'${id}' is not in the Hugging Face cache`);
  }
  const refFile = join(repo, 'refs', revision);
  let commit = revision;
  if (existsSync(refFile) && !isDir(refFile)) {
    // read without blocking (a FIFO here is refused, not waited on); a ref names one commit
    commit = readTextFile(refFile, 'hub cache ref file', 4096).trim();
    checkPlainName(`the commit named by ref file '${refFile}'`, commit);
    looked.push(`${refFile}: names commit ${commit}`);
  } else {
    looked.push(`${refFile}: does not exist${/^[0-9a-f]{40}$/.test(revision) ? ', so the revision is taken as a commit hash' : ''}`);
  }
  const snapshot = join(repo, 'snapshots', commit);
  if (!isDir(snapshot)) {
    const refs = list(join(repo, 'refs'));
    const snaps = list(join(repo, 'snapshots'));
    looked.push(`${snapshot}: does not exist (cached refs: ${refs.join(', ') || 'none'}; cached snapshots: ${snaps.join(', ') || 'none'})`);
    fail(`revision '${revision}' is not in the cache`);
  }
  return { snapshot, repo, fail };
}

const DIFFUSERS_FOLDER = 'a local diffusers folder (model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/)';

/**
 * The model folder for pathOrId (+ subfolder). A local folder that exists wins; otherwise a hub id is
 * looked up, offline, in the Hugging Face cache. Throws an error listing every path looked at and how to get
 * the files there. With `names`, an option of `o` not among `names.known` is an error first (a from_pretrained
 * option misspelt, or another library's: `torch_dtype`).
 */
export function resolvePretrained(pathOrId: string, o: HubOptions = {}, names?: { known: readonly string[]; where: string }): string {
  if (names) checkOptionNames(o, names.known, names.where);
  if (o.subfolder !== undefined && o.subfolder !== '') checkRelativePath('subfolder', o.subfolder);
  if (o.revision !== undefined) checkRelativePath('revision', o.revision, 'the cache');
  if (o.variant !== undefined) checkPlainName('variant', o.variant);
  const local = resolve(expandHome(pathOrId));
  if (existsSync(local)) {
    if (!statSync(local).isDirectory()) {
      throw new Error(`'${local}' is a file; pass a diffusers folder (model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/) or a component folder.`);
    }
    if (!o.subfolder) return local;
    const dir = join(local, o.subfolder);
    if (isDir(dir)) return dir;
    throw new Error(`'${local}' has no '${o.subfolder}' folder (it has: ${subfolders(local)}). A diffusers pipeline folder holds one folder per component: unet/ vae/ text_encoder/ tokenizer/ scheduler/.`);
  }
  if (!isHubId(pathOrId)) {
    throw new Error(`model not found: no folder '${local}'. Pass ${DIFFUSERS_FOLDER} or a hub id ("org/name") that is in the local Hugging Face cache.`);
  }
  const looked = [`${local} (local folder): does not exist`];
  const { snapshot, fail } = findSnapshot(pathOrId, 'model', o, looked, `pass the path of ${DIFFUSERS_FOLDER}`);
  if (!o.subfolder) return snapshot;
  const dir = join(snapshot, o.subfolder);
  if (isDir(dir)) return dir;
  looked.push(`${snapshot}: exists (folders: ${subfolders(snapshot)})`);
  looked.push(`${dir}: does not exist`);
  return fail(`the cached snapshot has no '${o.subfolder}' folder (downloaded only in part?)`, true);
}
