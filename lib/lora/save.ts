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
import { lycorisWeightsToKohyaKeys, sortedByKey, toDiffusersKeys, toKohyaKeys, type LoraWeights, type LycorisWeights } from './formats.js';
import { LORA_WEIGHT_NAME, targetModels, type LoraTarget } from './load.js';
import type { LoraLayer } from './lora_layer.js';
import { trainedAdapterKind, trainedLycoris } from './variants.js';

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
    const lycoris = layers.filter(([, l]) => l.vacant);
    if (lycoris.length) {
      throw new Error(`${what}: ${component} ${lycoris[0]?.[0]} carries a LoHa/LoKr adapter, which has no diffusers/PEFT-named LoRA keys; `
        + "save it in the Kohya/LyCORIS layout (saveLoraWeights writes that layout for LoHa/LoKr by itself)");
    }
    return layers.map(([path, l]) => ({ component, path, down: l.lora_A.weight, up: l.lora_B.weight, alpha: l.alpha, magnitude: l.lora_magnitude_vector }));
  });
}

/** The trained LoHa/LoKr layers (vacant lora_A/lora_B, the adapter first in lora_extra) of every model. */
function lycorisWeights(target: LoraTarget): LycorisWeights[] {
  return targetModels(target).flatMap(([component, model]) => loraLayers(model).flatMap(([path, l]) => {
    const b = trainedLycoris(l);
    return b ? [{ component, path, factors: b.factors, alpha: b.alpha }] : [];
  }));
}

/** Whether a model (or pipeline) carries trained LoHa/LoKr adapters, which are saved in the Kohya/LyCORIS layout. */
export function hasLycorisLayers(target: LoraTarget): boolean {
  return targetModels(target).some(([, m]) => loraLayers(m).some(([, l]) => l.vacant));
}

/**
 * The LoRA weights under diffusers' names, in module order (A = down, B = up), as `save_lora_weights` writes
 * them for a PEFT-trained UNet (`unet.<path>.lora.down.weight`) and text encoder
 * (`text_encoder.<path>.lora_linear_layer.down.weight`). diffusers reads such a file with one alpha per model,
 * its first layer's rank (formats.ts's diffusersAlphas), so each layer's alpha/that is folded into its up weight
 * (same output in diffusers and difflora, portable file; alpha/rank when all ranks are equal).
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
  if (hasLycorisLayers(target)) {
    // LoHa/LoKr layers under LyCORIS keys; a model carries one adapter type (variants.ts), so nothing else is there
    const models = targetModels(target);
    if (!loraLayers(models[0]?.[1] as Module).length) requireLayers(models[0]?.[1] as Module, 'loraStateDictKohya');
    return lycorisWeightsToKohyaKeys(lycorisWeights(target), { ...options, sdxl: options.sgmLayersPerBlock !== undefined || models.some(([c]) => c === 'text_encoder_2') });
  }
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
  if (options.format !== undefined && options.format !== 'diffusers' && options.format !== 'kohya') throw new TypeError(`saveLoraWeights: unknown format '${String(options.format)}'`);
  // LoHa/LoKr have no diffusers/PEFT-named layout diffusers can load: they are written in LyCORIS' Kohya keys
  const lycoris = hasLycorisLayers(target);
  const format = lycoris ? 'kohya' : options.format ?? 'diffusers';
  const file = join(dir, checkPlainName('weightName', options.weightName ?? LORA_WEIGHT_NAME));
  let metadata: Record<string, string> = { format: 'pt' };
  if (format === 'kohya') {
    const layers = targetModels(target).flatMap(([, m]) => loraLayers(m));
    const kinds = new Set(layers.map(([, l]) => trainedAdapterKind(l)));
    const algo = [...kinds].find((k) => k === 'loha' || k === 'lokr');
    // sd-scripts' metadata; LyCORIS' own for LoHa/LoKr (ss_network_args names the algorithm), DoRA as LyCORIS' dora_wd
    metadata = algo ? { ss_network_module: 'lycoris.kohya', ss_network_args: JSON.stringify({ algo }) } : { ss_network_module: 'networks.lora' };
    if (!algo && kinds.has('dora')) metadata.ss_network_args = JSON.stringify({ dora_wd: 'True' });
    const ranks = new Set(layers.map(([, l]) => trainedLycoris(l)?.rank ?? l.rank));
    const alphas = new Set(layers.map(([, l]) => trainedLycoris(l)?.alpha ?? l.alpha));
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
