// Finding and reading a model the way users have it: a local diffusers folder (model_index.json +
// components), a single component folder, or a hub id ("org/name") already in the local Hugging Face cache
// (difflora never downloads); `variant` weight files and sharded checkpoints. Pickled .bin/.ckpt files are
// refused: unpickling runs arbitrary code. Hostile input: every option or entry that becomes a path component
// (variant, subfolder, revision, the commit a ref names, model_index.json's component names) must be a plain
// name, checked before a path is built; every file is read without blocking (a FIFO or device is refused) and
// every JSON file must hold an object, errors naming the file.
import { existsSync, readdirSync, statSync } from 'node:fs';
import { homedir } from 'node:os';
import { isAbsolute, join, normalize, resolve } from 'node:path';
import type { DType } from '../dtype.js';
import { assertRegularFile, readJsonObject, readTextFile } from '../io/files.js';
import { loadSafetensors } from '../io/safetensors.js';
import { show } from './config.js';
import type { Module } from '../nn/module.js';
import { dispose } from '../scope.js';
import type { Device, Tensor } from '../tensor.js';

export interface FromPretrainedOptions {
  /** Component folder inside a pipeline folder: 'unet', 'vae', 'text_encoder', 'tokenizer'. */
  subfolder?: string;
  /** Hub revision: a branch or tag name (looked up in the cache's refs/) or a commit hash. Default 'main'. */
  revision?: string;
  /** e.g. 'fp16' → diffusion_pytorch_model.fp16.safetensors */
  variant?: string;
  dtype?: DType;
  device?: Device;
  /** The Hugging Face hub cache (the folder holding models--org--name/), as diffusers' cache_dir. */
  cacheDir?: string;
}

const isDir = (p: string): boolean => existsSync(p) && statSync(p).isDirectory();
const isFile = (p: string): boolean => existsSync(p) && statSync(p).isFile();
/** Whether a file is there; something there that is not a regular file (a FIFO, a device) is an error naming it. */
const present = (p: string, what: string): boolean => {
  if (!existsSync(p) || isDir(p)) return false;
  assertRegularFile(p, what);
  return true;
};
const expandHome = (p: string): string => (p === '~' || p.startsWith('~/') ? join(homedir(), p.slice(1)) : p);

/** The hub cache folder and what chose it, in huggingface_hub's order. */
export function hubCacheDir(o: Pick<FromPretrainedOptions, 'cacheDir'> = {}): { dir: string; from: string } {
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
function checkRelativePath(option: string, value: unknown): string {
  if (typeof value !== 'string') throw new Error(`${option} must be a string, got ${show(value)}`);
  if (isAbsolute(value) || value.startsWith('/')) throw new Error(`${option} '${value}' must be a relative path inside the model folder, not an absolute path`);
  for (const segment of value.split('/')) {
    try {
      checkPlainName(option, segment);
    } catch {
      throw new Error(`${option} '${value.replace(/\0/g, '\\0')}' must be a relative path inside the model folder (plain names separated by '/', no '..', '\\', empty parts or NUL)`);
    }
  }
  return value;
}

/** The options that become path components, checked before any path is built from them. */
function checkPathOptions(o: FromPretrainedOptions): void {
  if (o.subfolder !== undefined && o.subfolder !== '') checkRelativePath('subfolder', o.subfolder);
  if (o.revision !== undefined) checkRelativePath('revision', o.revision);
  if (o.variant !== undefined) checkPlainName('variant', o.variant);
}

const list = (dir: string, filter: (name: string) => boolean = () => true): string[] =>
  isDir(dir) ? readdirSync(dir).filter(filter).sort() : [];
const subfolders = (dir: string): string => {
  const names = list(dir, (n) => isDir(join(dir, n)) && !n.startsWith('.'));
  return names.length ? names.join(', ') : 'none';
};

/**
 * The component folder for pathOrId (+ subfolder). A local folder that exists wins; otherwise a hub id is
 * looked up, offline, in the Hugging Face cache: models--org--name/refs/<revision> names the commit,
 * snapshots/<commit>/ holds the files. Throws an error listing every path looked at and how to get the
 * files there.
 */
export function resolvePretrained(pathOrId: string, o: FromPretrainedOptions = {}): string {
  checkPathOptions(o);
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
    throw new Error(`model not found: no folder '${local}'. Pass a local diffusers folder (model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/) or a hub id ("org/name") that is in the local Hugging Face cache.`);
  }
  return resolveFromCache(pathOrId, local, o);
}

function resolveFromCache(id: string, local: string, o: FromPretrainedOptions): string {
  const cache = hubCacheDir(o);
  const revision = o.revision ?? 'main';
  const repoFolder = `models--${id.replace('/', '--')}`;
  const repo = join(cache.dir, repoFolder);
  const looked: string[] = [`${local} (local folder): does not exist`];
  const fail = (reason: string, partial = false): never => {
    const include = partial && o.subfolder ? ` --include "${o.subfolder}/*"` : '';
    const rev = o.revision ? ` --revision ${o.revision}` : '';
    throw new Error([
      `model '${id}'${o.subfolder ? ` (subfolder '${o.subfolder}')` : ''} at revision '${revision}' not found offline: ${reason}.`,
      'Looked at:',
      ...looked.map((l) => `  - ${l}`),
      `Hugging Face cache: ${cache.dir} (from ${cache.from}).`,
      'difflora does not download models. To use this one, either:',
      `  - on a machine with network run \`huggingface-cli download ${id}${rev}${include}\`, then copy its cache folder ${repoFolder}/ (in ~/.cache/huggingface/hub/ there) into ${cache.dir}/ here, or point HF_HUB_CACHE or cacheDir at the copy;`,
      `  - or pass the path of a local diffusers folder (model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/), e.g. one made with \`huggingface-cli download ${id}${rev} --local-dir <folder>\`.`,
    ].join('\n'));
  };

  if (!isDir(repo)) {
    looked.push(`${repo}: does not exist`);
    fail(`'${id}' is not in the Hugging Face cache`);
  }
  // As huggingface_hub: a ref file names the commit; otherwise the revision is taken as a commit hash.
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
  if (!o.subfolder) return snapshot;
  const dir = join(snapshot, o.subfolder);
  if (isDir(dir)) return dir;
  looked.push(`${snapshot}: exists (folders: ${subfolders(snapshot)})`);
  looked.push(`${dir}: does not exist`);
  return fail(`the cached snapshot has no '${o.subfolder}' folder (downloaded only in part?)`, true);
}

/**
 * The component's config.json: a JSON object (arrays, null and scalars are refused; syntax errors give the
 * line and column). Read without blocking: a FIFO or device in its place is an error, not a hang.
 */
export function readConfig(dir: string, name = 'config.json'): Record<string, unknown> {
  const path = join(dir, name);
  if (!existsSync(path)) throw new Error(`missing ${name} in '${dir}'`);
  return readJsonObject(path, name, 16 * 1024 * 1024);
}

/** What model_index.json may hold besides components: diffusers' pipeline-level options. */
const MODEL_INDEX_OPTIONS = new Set(['requires_safety_checker', 'force_zeros_for_empty_prompt', 'add_watermarker', 'is_cosxl_edit']);

/**
 * A pipeline's model_index.json, checked: `_class_name` a string; every component a [library, class] pair
 * (both null for an absent optional component) under a plain name, since diffusers loads each from the
 * folder of that name; pipeline options scalars. Errors name the file and the entry.
 */
export function readModelIndex(dir: string): Record<string, unknown> {
  const index = readConfig(dir, 'model_index.json');
  const path = join(dir, 'model_index.json');
  for (const [key, value] of Object.entries(index)) {
    const entry = `model_index.json '${path}': entry '${key}'`;
    if (key.startsWith('_')) {
      if (key === '_class_name' && typeof value !== 'string') throw new Error(`${entry} must be the pipeline's class name (a string), got ${show(value)}`);
      continue;
    }
    if (MODEL_INDEX_OPTIONS.has(key)) {
      if (value !== null && typeof value === 'object') throw new Error(`${entry} must be a scalar option, got ${show(value)}`);
      continue;
    }
    const pair = Array.isArray(value) && value.length === 2 && value.every((v) => v === null || typeof v === 'string') && (value[0] === null) === (value[1] === null);
    if (!pair) throw new Error(`${entry} must be a component's [library, class] pair (or [null, null]), got ${show(value)}`);
    checkPlainName(`${entry} (a component folder name)`, key);
  }
  return index;
}

/** Index file names for a sharded checkpoint, with a variant as diffusers (old and new) and transformers write them. */
function indexNames(stem: string, variant?: string): string[] {
  if (!variant) return [`${stem}.safetensors.index.json`];
  return [
    `${stem}.safetensors.${variant}.index.json`, // diffusers ≥ 0.27 (_add_variant before ".index.json")
    `${stem}.safetensors.index.${variant}.json`, // transformers and older diffusers
    `${stem}.${variant}.safetensors.index.json`,
  ];
}

/** A sharded checkpoint's weight_map (tensor name → shard file), validated. */
function readIndex(index: string): Record<string, string> {
  const map = readJsonObject(index, 'sharded checkpoint index').weight_map;
  if (!map || typeof map !== 'object' || Array.isArray(map)) throw new Error(`'${index}' has no weight_map`);
  for (const [key, file] of Object.entries(map)) {
    if (typeof file !== 'string') throw new Error(`'${index}': weight_map['${key}'] is not a file name`);
    if (isAbsolute(file) || normalize(file).split(/[\\/]/).includes('..')) throw new Error(`'${index}': shard '${file}' is outside the model folder`);
  }
  return map as Record<string, string>;
}

/** Weight files of a component: one safetensors file or the shards listed by its index. */
export function weightFiles(dir: string, stem: string, variant?: string): string[] {
  return findWeights(dir, stem, variant).files;
}

function findWeights(dir: string, stem: string, variant?: string): { files: string[]; map?: Record<string, string> } {
  if (variant !== undefined) checkPlainName('variant', variant);
  const base = variant ? `${stem}.${variant}` : stem;
  const single = join(dir, `${base}.safetensors`);
  if (present(single, 'weights file')) return { files: [single] };
  for (const name of indexNames(stem, variant)) {
    const index = join(dir, name);
    if (!present(index, 'sharded checkpoint index')) continue;
    const map = readIndex(index);
    const files = [...new Set(Object.values(map))].map((f) => join(dir, f));
    const missing = files.filter((f) => !present(f, `shard listed by '${index}'`));
    if (missing.length) throw new Error(`'${index}' lists shards that are missing: ${missing.join(', ')}`);
    if (!files.length) throw new Error(`'${index}' has an empty weight_map`);
    return { files, map };
  }
  const pickled = [`${base}.bin`, `${base}.ckpt`, `${base}.pt`, `${base}.pth`, `${base}.bin.index.json`, `pytorch_${base}.bin`, `pytorch_${base}.bin.index.json`]
    .map((f) => join(dir, f)).find(isFile);
  if (pickled) {
    throw new Error(`'${pickled}' is a pickled PyTorch checkpoint; difflora reads only .safetensors (unpickling can run arbitrary code). Convert it once in Python: safetensors.torch.save_file(torch.load(path, weights_only=True), '${base}.safetensors') (for shards, save each and write ${base}.safetensors.index.json), or download the model's .safetensors files.`);
  }
  const found = list(dir, (n) => n.endsWith('.safetensors') || n.endsWith('.index.json'));
  const expected = [`${base}.safetensors`, ...indexNames(stem, variant)].join(' or ');
  let hint = found.length ? ` Found: ${found.join(', ')}.` : ' The folder has no .safetensors files.';
  if (variant && (isFile(join(dir, `${stem}.safetensors`)) || isFile(join(dir, `${stem}.safetensors.index.json`)))) {
    hint += ` The non-variant weights are there: drop variant '${variant}' to load them.`;
  }
  throw new Error(`no weights in '${dir}': expected ${expected}${variant ? ` (variant '${variant}')` : ''}.${hint}`);
}

/** All tensors of a component's weight files, cast/moved as asked (caller owns them). */
export function loadWeights(dir: string, stem: string, o: FromPretrainedOptions = {}): Map<string, Tensor> {
  const { files, map } = findWeights(dir, stem, o.variant);
  const out = new Map<string, Tensor>();
  try {
    for (const file of files) {
      const { tensors } = loadSafetensors(file, { dtype: o.dtype, device: o.device });
      const dup = [...tensors.keys()].find((k) => out.has(k));
      if (dup !== undefined) {
        dispose([...tensors.values()]);
        throw new Error(`tensor '${dup}' is in more than one shard (again in '${file}')`);
      }
      for (const [k, t] of tensors) out.set(k, t);
    }
    if (map) {
      const absent = Object.keys(map).filter((k) => !out.has(k));
      if (absent.length) throw new Error(`the index of '${dir}' lists tensors its shards lack: ${absent.slice(0, 5).join(', ')}${absent.length > 5 ? ` and ${absent.length - 5} more` : ''}`);
    }
  } catch (e) {
    dispose([...out.values()]);
    throw e;
  }
  return out;
}

/**
 * Loads a component's weights into a model strictly (every key present, none unexpected, shapes equal),
 * after `rename` maps legacy names (e.g. the VAE's old query/key/value) onto the model's. A mismatch is an
 * error naming the weights' folder and `configFile`, the config the model was built from.
 */
export function loadModelWeights(model: Module, dir: string, stem: string, o: FromPretrainedOptions = {}, rename?: (key: string) => string, configFile?: string): void {
  const loaded = loadWeights(dir, stem, o);
  try {
    const sd = rename ? new Map([...loaded].map(([k, t]) => [rename(k), t])) : loaded;
    loadStateDictChecked(model, sd, dir, configFile);
  } finally {
    dispose([...loaded.values()]);
  }
}

/** model.loadStateDict, its error naming where the weights and the config came from. */
export function loadStateDictChecked(model: Module, sd: Map<string, Tensor>, dir: string, configFile?: string): void {
  try {
    model.loadStateDict(sd);
  } catch (e) {
    const config = configFile ? ` do not fit the model described by '${configFile}'` : ' do not fit the model';
    throw new Error(`the weights in '${dir}'${config}: ${(e as Error).message}`);
  }
}
