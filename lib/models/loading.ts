// Finding and reading a model the way users have it: a local diffusers folder (model_index.json +
// components), a single component folder, or a hub id ("org/name") already in the local Hugging Face cache
// (difflora never downloads); `variant` weight files and sharded checkpoints. Pickled .bin/.ckpt files are
// refused: unpickling runs arbitrary code. Hostile input: every option or entry that becomes a path component
// (variant, subfolder, revision, the commit a ref names, model_index.json's component names) must be a plain
// name, checked before a path is built; every file is read without blocking (a FIFO or device is refused) and
// every JSON file must hold an object, errors naming the file.
import { existsSync, readdirSync, statSync } from 'node:fs';
import { isAbsolute, join, normalize } from 'node:path';
import type { DType } from '../dtype.js';
import { assertRegularFile, readJsonObject } from '../io/files.js';
import { checkPlainName, resolvePretrained, type HubOptions } from '../io/hub.js';
import { loadSafetensors } from '../io/safetensors.js';
import { show } from './config.js';
import type { Module } from '../nn/module.js';
import { dispose } from '../scope.js';
import type { Device, Tensor } from '../tensor.js';

/** Where the model is (lib/io/hub.ts: folder, subfolder, revision, cache, variant) and where its weights go. */
export interface FromPretrainedOptions extends HubOptions {
  dtype?: DType;
  device?: Device;
}

/** The names of FromPretrainedOptions: any other key given to a fromPretrained is an error naming it. */
export const FROM_PRETRAINED_OPTIONS: readonly string[] = ['cacheDir', 'revision', 'subfolder', 'variant', 'dtype', 'device'];

/** resolvePretrained for `where` (e.g. 'UNet2DConditionModel.fromPretrained'), refusing option names it does not take. */
export function pretrainedDir(pathOrId: string, o: FromPretrainedOptions, where: string, known = FROM_PRETRAINED_OPTIONS): string {
  return resolvePretrained(pathOrId, o, { known, where });
}

const isDir = (p: string): boolean => existsSync(p) && statSync(p).isDirectory();
const isFile = (p: string): boolean => existsSync(p) && statSync(p).isFile();
/** Whether a file is there; something there that is not a regular file (a FIFO, a device) is an error naming it. */
const present = (p: string, what: string): boolean => {
  if (!existsSync(p) || isDir(p)) return false;
  assertRegularFile(p, what);
  return true;
};

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
  const found = readdirSync(dir).sort().filter((n) => n.endsWith('.safetensors') || n.endsWith('.index.json'));
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
