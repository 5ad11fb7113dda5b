// Finding and reading a model the way users have it: a diffusers folder (model_index.json + components),
// a single component folder, `variant` weight files and sharded checkpoints. Pickled .bin/.ckpt files are
// refused: unpickling runs arbitrary code.
import { existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { DType } from '../dtype.js';
import { loadSafetensors } from '../io/safetensors.js';
import type { Module } from '../nn/module.js';
import { dispose } from '../scope.js';
import type { Device, Tensor } from '../tensor.js';

export interface FromPretrainedOptions {
  /** Component folder inside a pipeline folder: 'unet', 'vae', 'text_encoder', 'tokenizer'. */
  subfolder?: string;
  revision?: string;
  /** e.g. 'fp16' → diffusion_pytorch_model.fp16.safetensors */
  variant?: string;
  dtype?: DType;
  device?: Device;
  cacheDir?: string;
}

/** The component folder for pathOrId (+ subfolder); throws an actionable error when it is not there. */
export function resolvePretrained(pathOrId: string, o: FromPretrainedOptions = {}): string {
  const dir = o.subfolder ? join(pathOrId, o.subfolder) : pathOrId;
  if (existsSync(dir) && statSync(dir).isDirectory()) return dir;
  throw new Error(`model not found: '${dir}' is not a folder. Pass a local diffusers folder (model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/).`);
}

/** The component's config.json as parsed JSON. */
export function readConfig(dir: string, name = 'config.json'): Record<string, unknown> {
  const path = join(dir, name);
  if (!existsSync(path)) throw new Error(`missing ${name} in '${dir}'`);
  try {
    return JSON.parse(readFileSync(path, 'utf8')) as Record<string, unknown>;
  } catch (e) {
    throw new Error(`cannot parse '${path}': ${(e as Error).message}`);
  }
}

/** Weight files of a component: one safetensors file or the shards listed by its index. */
export function weightFiles(dir: string, stem: string, variant?: string): string[] {
  const base = variant ? `${stem}.${variant}` : stem;
  const single = join(dir, `${base}.safetensors`);
  if (existsSync(single)) return [single];
  const index = join(dir, `${base}.safetensors.index.json`);
  if (existsSync(index)) {
    const map = (JSON.parse(readFileSync(index, 'utf8')) as { weight_map?: Record<string, string> }).weight_map;
    if (!map) throw new Error(`'${index}' has no weight_map`);
    return [...new Set(Object.values(map))].map((f) => join(dir, f));
  }
  for (const ext of ['bin', 'ckpt', 'pt', 'pth']) {
    if (existsSync(join(dir, `${base}.${ext}`))) {
      throw new Error(`'${join(dir, `${base}.${ext}`)}' is a pickled PyTorch file; difflora reads only .safetensors (unpickling can run arbitrary code). Convert it once in Python with safetensors.torch.save_file.`);
    }
  }
  throw new Error(`no weights in '${dir}': expected ${base}.safetensors or ${base}.safetensors.index.json${variant ? ` (variant '${variant}')` : ''}`);
}

/** All tensors of a component's weight files, cast/moved as asked (caller owns them). */
export function loadWeights(dir: string, stem: string, o: FromPretrainedOptions = {}): Map<string, Tensor> {
  const out = new Map<string, Tensor>();
  for (const file of weightFiles(dir, stem, o.variant)) {
    const { tensors } = loadSafetensors(file, { dtype: o.dtype, device: o.device });
    for (const [k, t] of tensors) out.set(k, t);
  }
  return out;
}

/**
 * Loads a component's weights into a model strictly (every key present, none unexpected, shapes equal),
 * after `rename` maps legacy names (e.g. the VAE's old query/key/value) onto the model's.
 */
export function loadModelWeights(model: Module, dir: string, stem: string, o: FromPretrainedOptions = {}, rename?: (key: string) => string): void {
  const loaded = loadWeights(dir, stem, o);
  try {
    const sd = rename ? new Map([...loaded].map(([k, t]) => [rename(k), t])) : loaded;
    model.loadStateDict(sd);
  } finally {
    dispose([...loaded.values()]);
  }
}
