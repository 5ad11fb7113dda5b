// Saving a model's LoRA: its state dict in diffusers' or Kohya's layout (the key writers are formats.ts's) and
// the file, as diffusers' save_lora_weights writes it. Reading files back: load.ts.
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { checkPlainName } from '../io/hub.js';
import { saveSafetensors } from '../io/safetensors.js';
import { Module } from '../nn/module.js';
import { tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import { loraLayers } from './attach.js';
import { sortedByKey, toDiffusersKeys, toKohyaKeys, type LoraWeights } from './formats.js';
import { LORA_WEIGHT_NAME, targetModels, type LoraTarget } from './load.js';
import type { LoraLayer } from './lora_layer.js';

function requireLayers(model: Module, what: string): [string, LoraLayer][] {
  const layers = loraLayers(model);
  if (!layers.length) throw new Error(`${what}: ${model.constructor.name} has no LoRA layers (call attachLora first)`);
  return layers;
}

/**
 * Each LoRA layer's first adapter (the trained one) as the key writers take it: the UNet's (which must have
 * LoRA), then the text encoder's when it has any.
 */
function layerWeights(target: LoraTarget, what: string): LoraWeights[] {
  const models = targetModels(target);
  return models.flatMap(([component, model]) => {
    const layers = component === 'unet' ? requireLayers(model, what) : loraLayers(model);
    return layers.map(([path, l]) => ({ component, path, down: l.lora_A.weight, up: l.lora_B.weight, alpha: l.alpha }));
  });
}

/**
 * The LoRA weights under diffusers' names, in module order (A = down, B = up), as `save_lora_weights` writes
 * them for a PEFT-trained UNet (`unet.<path>.lora.down.weight`) and text encoder
 * (`text_encoder.<path>.lora_linear_layer.down.weight`). diffusers reads such a file with alpha = rank,
 * so a layer with alpha ≠ rank has alpha/rank folded into its up weight (same output, portable file).
 * The tensors are new handles (views of the weights, or scaled copies): dispose them or work inside tidy().
 * `prefix` (a single model only) replaces 'unet'.
 */
export function loraStateDictDiffusers(target: LoraTarget, options: { prefix?: string } = {}): Map<string, Tensor> {
  return toDiffusersKeys(layerWeights(target, 'loraStateDictDiffusers'), target instanceof Module ? options.prefix ?? 'unet' : undefined);
}

/**
 * The LoRA weights under Kohya/sd-scripts names (`lora_unet_…`), with each layer's alpha as a 0-dim float32
 * tensor, in sd-scripts' state-dict order (alpha, lora_down, lora_up). New handles, as loraStateDictDiffusers.
 */
export function loraStateDictKohya(target: LoraTarget, options: { sgmLayersPerBlock?: number } = {}): Map<string, Tensor> {
  return toKohyaKeys(layerWeights(target, 'loraStateDictKohya'), options);
}

export interface SaveLoraOptions {
  /** 'diffusers' (default) or 'kohya'. */
  format?: 'diffusers' | 'kohya';
  /** File name inside dir (default pytorch_lora_weights.safetensors). */
  weightName?: string;
  /** Extra safetensors metadata (string → string). */
  metadata?: Record<string, string>;
  /** Kohya format of an SDXL UNet: its layers_per_block, for the SGM names (`input_blocks_4_1_…`) Kohya's SDXL files use. */
  sgmLayersPerBlock?: number;
}

/**
 * Writes the LoRA of a model, or of a pipeline's { unet, textEncoder }, to dir/pytorch_lora_weights.safetensors
 * (creating dir) atomically, keys sorted by name as the
 * safetensors writers of Python and Rust do. diffusers format: metadata {"format": "pt"}; Kohya format:
 * sd-scripts' ss_network_* entries when every layer has the same rank and alpha. Returns the file's path.
 */
export function saveLoraWeights(dir: string, target: LoraTarget, options: SaveLoraOptions = {}): string {
  const format = options.format ?? 'diffusers';
  if (format !== 'diffusers' && format !== 'kohya') throw new TypeError(`saveLoraWeights: unknown format '${String(format)}'`);
  const file = join(dir, checkPlainName('weightName', options.weightName ?? LORA_WEIGHT_NAME));
  let metadata: Record<string, string> = { format: 'pt' };
  if (format === 'kohya') {
    metadata = { ss_network_module: 'networks.lora' };
    const layers = targetModels(target).flatMap(([, m]) => loraLayers(m));
    const ranks = new Set(layers.map(([, l]) => l.rank));
    const alphas = new Set(layers.map(([, l]) => l.alpha));
    if (ranks.size === 1) metadata.ss_network_dim = String([...ranks][0]);
    if (alphas.size === 1) metadata.ss_network_alpha = formatAlpha([...alphas][0] as number);
  }
  metadata = { ...metadata, ...options.metadata };
  mkdirSync(dir, { recursive: true });
  tidy(() => {
    const sd = format === 'diffusers' ? loraStateDictDiffusers(target) : loraStateDictKohya(target, { sgmLayersPerBlock: options.sgmLayersPerBlock });
    saveSafetensors(file, sortedByKey(sd), metadata);
  });
  return file;
}

/** Python's str(float) for the usual alphas (2 → "2.0"). */
function formatAlpha(a: number): string {
  return Number.isInteger(a) ? `${a}.0` : String(a);
}
