// diffusers' LoRA loading for inference (StableDiffusionLoraLoaderMixin, diffusers 0.31 + PEFT 0.13): named
// adapters on the UNet and the text encoder, their weights, fuse/unfuse, unload, and a run-time scale.
//
// Every function takes a model (taken as the UNet) or a pipeline's { unet, textEncoder[, textEncoder2] }. Files in every layout
// are read by formats.ts and checked and applied by load.ts: a refused load leaves the models as they were.
//
// Active adapters after a load: the new adapter alone, as diffusers (get_active_adapters() is ['default_1']
// after a second load_lora_weights; set_adapters([...]) combines them).
import type { Module } from '../nn/module.js';
import type { Tensor } from '../tensor.js';
import { detachLora, loraLayers } from './attach.js';
import type { LoraLayer } from './lora_layer.js';
import { applyLora, readLora, removeAdapterAt, targetModels, type LoraTarget } from './load.js';

export type { LoraTarget, LoraTargets } from './load.js';

export interface LoadLoraWeightsOptions {
  /** Default 'default_N', N the smallest free number (diffusers: 'default_0' for the first). */
  adapterName?: string;
  /** File inside a folder source (default pytorch_lora_weights.safetensors). */
  weightName?: string;
}

export interface LoadLoraWeightsResult {
  adapterName: string;
  /** Layers of the UNet / text encoder / SDXL's second text encoder that received this adapter. */
  unetLayers: number;
  textEncoderLayers: number;
  textEncoder2Layers: number;
  /** Key layouts seen in the file: 'diffusers', 'peft', 'kohya'. */
  formats: string[];
}

/** Adapter names per model in load order (a layer's order can differ after deletions). */
const registry = new WeakMap<Module, string[]>();

function adapterNamesOf(model: Module): string[] {
  const known = registry.get(model) ?? [];
  const present = new Set(loraLayers(model).flatMap(([, l]) => l.adapterNames()));
  return [...known.filter((n) => present.has(n)), ...[...present].filter((n) => !known.includes(n))];
}

function allAdapterNames(targets: LoraTarget): string[] {
  return [...new Set(targetModels(targets).flatMap(([, m]) => adapterNamesOf(m)))];
}

function allLayers(targets: LoraTarget): LoraLayer[] {
  return targetModels(targets).flatMap(([, m]) => loraLayers(m).map(([, l]) => l));
}

/** The name a new adapter gets: the given one (checked), or the first free 'default_N'. */
function newAdapterName(targets: LoraTarget, given: string | undefined): string {
  const existing = allAdapterNames(targets);
  let name = given;
  if (name === undefined) {
    let i = 0;
    while (existing.includes(`default_${i}`)) i++;
    name = `default_${i}`;
  }
  if (typeof name !== 'string' || name === '' || name.includes('.')) throw new TypeError(`loadLoraWeights: bad adapter name '${String(name)}' (non-empty, no '.')`);
  if (existing.includes(name)) throw new Error(`loadLoraWeights: adapter name '${name}' is already in use (adapters: ${existing.join(', ')}); pick another adapterName or deleteAdapters first`);
  return name;
}

/**
 * Loads a LoRA file, a folder holding pytorch_lora_weights.safetensors, or a state dict, in diffusers, PEFT or
 * Kohya layout, as a new named adapter of the UNet and, for `text_encoder.`/`lora_te_` keys, the text encoder
 * (diffusers' `pipe.load_lora_weights`). `targets` is a model (taken as the UNet) or { unet, textEncoder[, textEncoder2] }. The
 * new adapter becomes the active one, with weight 1. Everything is checked first (keys, dtypes, shapes, ranks,
 * alphas, finite values, each target layer); a refused load throws naming the file and the keys and leaves the
 * models exactly as they were.
 */
export function loadLoraWeights(
  targets: LoraTarget, source: string | Map<string, Tensor>, options: LoadLoraWeightsOptions = {},
): LoadLoraWeightsResult {
  const name = newAdapterName(targets, options.adapterName);
  const read = readLora(source, 'loadLoraWeights', { weightName: options.weightName });
  let result: LoadLoraWeightsResult;
  try {
    result = applyLora(targets, read.description, 'loadLoraWeights', { kind: 'add', adapterName: name });
  } finally {
    read.dispose();
  }
  for (const [part, model] of targetModels(targets)) {
    const names = registry.get(model) ?? [];
    const got = { unet: result.unetLayers, text_encoder: result.textEncoderLayers, text_encoder_2: result.textEncoder2Layers }[part];
    if (got) registry.set(model, [...names.filter((n) => n !== name), name]);
  }
  // diffusers: the adapter just loaded is the active one
  for (const l of allLayers(targets)) l.activeAdapters = [name];
  return result;
}

function namesArg(names: string | string[], what: string): string[] {
  const list = typeof names === 'string' ? [names] : [...names];
  if (!list.length) throw new Error(`${what}: no adapter names given`);
  return list;
}

function requireKnown(targets: LoraTarget, names: string[], what: string): void {
  const known = allAdapterNames(targets);
  const unknown = names.filter((n) => !known.includes(n));
  if (unknown.length) throw new Error(`${what}: no adapter ${unknown.map((n) => `'${n}'`).join(', ')}; the adapters are: ${known.length ? known.join(', ') : '(none loaded)'}`);
}

/**
 * Activates these adapters (only these), with a weight each (default 1): diffusers' set_adapters. The output
 * is base + Σ weight_a · alpha_a/rank_a · B_a A_a x, on the UNet and the text encoder.
 */
export function setAdapters(targets: LoraTarget, names: string | string[], weights?: number | number[]): void {
  const list = namesArg(names, 'setAdapters');
  requireKnown(targets, list, 'setAdapters');
  const ws = weights === undefined ? list.map(() => 1) : typeof weights === 'number' ? list.map(() => weights) : [...weights];
  if (ws.length !== list.length) throw new Error(`setAdapters: ${list.length} adapter name(s) but ${ws.length} weight(s)`);
  const bad = ws.filter((w) => typeof w !== 'number' || !Number.isFinite(w));
  if (bad.length) throw new RangeError(`setAdapters: weights must be finite numbers, got ${bad.join(', ')}`);
  for (const l of allLayers(targets)) {
    l.activeAdapters = [...list];
    list.forEach((n, i) => l.adapterWeights.set(n, ws[i] as number));
  }
}

/** The active adapters (those of the UNet's first LoRA layer, as diffusers; else the text encoder's). */
export function getActiveAdapters(targets: LoraTarget): string[] {
  const first = allLayers(targets)[0];
  return first ? [...first.activeAdapters] : [];
}

/** The adapters of each model, in load order (diffusers' get_list_adapters); text_encoder_2 when the targets have it. */
export function getListAdapters(targets: LoraTarget): { unet: string[]; text_encoder: string[]; text_encoder_2?: string[] } {
  const models = new Map(targetModels(targets));
  const te = models.get('text_encoder');
  const te2 = models.get('text_encoder_2');
  const out = { unet: adapterNamesOf(models.get('unet') as Module), text_encoder: te ? adapterNamesOf(te) : [] };
  return te2 ? { ...out, text_encoder_2: adapterNamesOf(te2) } : out;
}

/**
 * Removes adapters and frees their weights (diffusers' delete_adapters). When no active adapter is left, the
 * first remaining one becomes active (PEFT); a layer left without adapters gets its base layer back.
 */
export function deleteAdapters(targets: LoraTarget, names: string | string[]): void {
  const list = namesArg(names, 'deleteAdapters');
  requireKnown(targets, list, 'deleteAdapters');
  const active = getActiveAdapters(targets);
  for (const [, model] of targetModels(targets)) {
    for (const [path, l] of loraLayers(model)) for (const n of list) if (l.hasAdapter(n)) removeAdapterAt(model, path, n);
    registry.set(model, (registry.get(model) ?? []).filter((n) => !list.includes(n)));
  }
  let stillActive = active.filter((n) => !list.includes(n));
  if (!stillActive.length) stillActive = allAdapterNames(targets).slice(0, 1);
  for (const l of allLayers(targets)) l.activeAdapters = [...stillActive];
}

/** Turns every LoRA branch off (the base models' outputs) / back on (diffusers' disable_lora / enable_lora). */
export function disableLora(targets: LoraTarget): void { for (const l of allLayers(targets)) l.enabled = false; }
export function enableLora(targets: LoraTarget): void { for (const l of allLayers(targets)) l.enabled = true; }

/**
 * Bakes adapters (default: the active ones) times loraScale into the base weights (diffusers' fuse_lora);
 * forward then runs the base layers alone. The original weights are kept for unfuseLora. A delta holding
 * NaN or inf is an error, and nothing stays fused.
 */
export function fuseLora(targets: LoraTarget, options: { loraScale?: number; adapterNames?: string[] } = {}): void {
  const loraScale = options.loraScale ?? 1;
  if (!Number.isFinite(loraScale)) throw new RangeError(`fuseLora: loraScale must be finite, got ${loraScale}`);
  if (options.adapterNames) requireKnown(targets, options.adapterNames, 'fuseLora');
  const layers = allLayers(targets);
  const wasMerged = new Set(layers.filter((l) => l.merged));
  try {
    for (const l of layers) l.merge(options.adapterNames, loraScale);
  } catch (e) {
    for (const l of layers) if (!wasMerged.has(l)) l.unmerge();
    throw e;
  }
}

/** Gives every fused layer its original weight back, bit for bit (diffusers' unfuse_lora); the adapters apply unfused again. */
export function unfuseLora(targets: LoraTarget): void { for (const l of allLayers(targets)) l.unmerge(); }

/** Removes every LoRA layer and adapter: the models are the base models again, same parameter names, same bits. */
export function unloadLoraWeights(targets: LoraTarget): void {
  for (const [, model] of targetModels(targets)) {
    detachLora(model);
    registry.delete(model);
  }
}

/**
 * Runs fn with every adapter's weight multiplied by scale, on the UNet and the text encoder (diffusers'
 * cross_attention_kwargs={"scale": s} / lora_scale), and puts the previous scales back afterwards, also when
 * fn throws. A promise result restores when it settles (do not run two overlapping calls then).
 */
export function withLoraScale<T>(targets: LoraTarget, scale: number, fn: () => T): T {
  if (!Number.isFinite(scale)) throw new RangeError(`withLoraScale: scale must be finite, got ${scale}`);
  const saved = allLayers(targets).map((l) => [l, l.scale] as const);
  const restore = (): void => { for (const [l, s] of saved) l.scale = s; };
  for (const [l, s] of saved) l.scale = s * scale;
  let result: T;
  try {
    result = fn();
  } catch (e) {
    restore();
    throw e;
  }
  if (result instanceof Promise) return result.finally(restore) as T;
  restore();
  return result;
}
