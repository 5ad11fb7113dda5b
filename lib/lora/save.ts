// Saving a model's LoRA: its state dict in diffusers' or Kohya's layout (the key writers are formats.ts's) and
// the file, as diffusers' save_lora_weights writes it. Reading files back: load.ts.
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { checkPlainName } from '../io/hub.js';
import { saveSafetensors } from '../io/safetensors.js';
import type { Module } from '../nn/module.js';
import { tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import { loraLayers } from './attach.js';
import { sortedByKey, toDiffusersKeys, toKohyaKeys, type LoraWeights } from './formats.js';
import { LORA_WEIGHT_NAME } from './load.js';
import type { LoraLayer } from './lora_layer.js';

function requireLayers(model: Module, what: string): [string, LoraLayer][] {
  const layers = loraLayers(model);
  if (!layers.length) throw new Error(`${what}: ${model.constructor.name} has no LoRA layers (call attachLora first)`);
  return layers;
}

/** Each LoRA layer's first adapter (the trained one) as the key writers take it. */
function layerWeights(model: Module, what: string): LoraWeights[] {
  return requireLayers(model, what).map(([path, l]) => ({ component: 'unet' as const, path, down: l.lora_A.weight, up: l.lora_B.weight, alpha: l.alpha }));
}

/**
 * The LoRA weights under diffusers' names, in module order (A = lora.down, B = lora.up), as
 * `save_lora_weights` writes them for a PEFT-trained UNet. diffusers reads such a file with alpha = rank,
 * so a layer with alpha ≠ rank has alpha/rank folded into its up weight (same output, portable file).
 * The tensors are new handles (views of the weights, or scaled copies): dispose them or work inside tidy().
 */
export function loraStateDictDiffusers(model: Module, options: { prefix?: string } = {}): Map<string, Tensor> {
  return toDiffusersKeys(layerWeights(model, 'loraStateDictDiffusers'), options.prefix ?? 'unet');
}

/**
 * The LoRA weights under Kohya/sd-scripts names (`lora_unet_…`), with each layer's alpha as a 0-dim float32
 * tensor, in sd-scripts' state-dict order (alpha, lora_down, lora_up). New handles, as loraStateDictDiffusers.
 */
export function loraStateDictKohya(model: Module): Map<string, Tensor> {
  return toKohyaKeys(layerWeights(model, 'loraStateDictKohya'));
}

export interface SaveLoraOptions {
  /** 'diffusers' (default) or 'kohya'. */
  format?: 'diffusers' | 'kohya';
  /** File name inside dir (default pytorch_lora_weights.safetensors). */
  weightName?: string;
  /** Extra safetensors metadata (string → string). */
  metadata?: Record<string, string>;
}

/**
 * Writes dir/pytorch_lora_weights.safetensors (creating dir) atomically, keys sorted by name as the
 * safetensors writers of Python and Rust do. diffusers format: metadata {"format": "pt"}; Kohya format:
 * sd-scripts' ss_network_* entries when every layer has the same rank and alpha. Returns the file's path.
 */
export function saveLoraWeights(dir: string, model: Module, options: SaveLoraOptions = {}): string {
  const format = options.format ?? 'diffusers';
  if (format !== 'diffusers' && format !== 'kohya') throw new TypeError(`saveLoraWeights: unknown format '${String(format)}'`);
  const file = join(dir, checkPlainName('weightName', options.weightName ?? LORA_WEIGHT_NAME));
  let metadata: Record<string, string> = { format: 'pt' };
  if (format === 'kohya') {
    metadata = { ss_network_module: 'networks.lora' };
    const layers = requireLayers(model, 'saveLoraWeights');
    const ranks = new Set(layers.map(([, l]) => l.rank));
    const alphas = new Set(layers.map(([, l]) => l.alpha));
    if (ranks.size === 1) metadata.ss_network_dim = String([...ranks][0]);
    if (alphas.size === 1) metadata.ss_network_alpha = formatAlpha([...alphas][0] as number);
  }
  metadata = { ...metadata, ...options.metadata };
  mkdirSync(dir, { recursive: true });
  tidy(() => {
    const sd = format === 'diffusers' ? loraStateDictDiffusers(model) : loraStateDictKohya(model);
    saveSafetensors(file, sortedByKey(sd), metadata);
  });
  return file;
}

/** Python's str(float) for the usual alphas (2 → "2.0"). */
function formatAlpha(a: number): string {
  return Number.isInteger(a) ? `${a}.0` : String(a);
}
