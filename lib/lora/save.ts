// LoRA weight files: writing diffusers' and Kohya's layouts, reading those and PEFT's back.
//
//   diffusers  unet.<module path>.lora.down.weight [r, in] (A) / .lora.up.weight [out, r] (B), metadata
//              {"format": "pt"}, no alpha (diffusers loads such a file with lora_alpha = rank)
//   PEFT       [unet.][base_model.model.]<module path>.lora_A[.<adapter>].weight / .lora_B…
//   Kohya      lora_unet_<module path, '.' → '_'>.lora_down.weight / .lora_up.weight / .alpha (0-dim fp32)
//
// Renaming happens here, at the edge; the model only ever sees module paths.
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { noGrad } from '../autograd.js';
import { loadSafetensors, saveSafetensors } from '../io/safetensors.js';
import { Linear } from '../nn/layers.js';
import type { Module } from '../nn/module.js';
import { defaultGenerator } from '../random.js';
import { dispose, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import { attachLoraToPaths, loraLayers } from './attach.js';
import type { LoraLayer } from './lora_layer.js';
import type { LoraLinear } from './lora_linear.js';

export const LORA_WEIGHT_NAME = 'pytorch_lora_weights.safetensors';

/** Kohya/A1111 name of a UNet module: 'lora_unet_' + the path with every '.' replaced by '_'. */
export function kohyaName(modulePath: string, prefix = 'lora_unet'): string {
  return `${prefix}_${modulePath.replace(/\./g, '_')}`;
}

function requireLayers(model: Module, what: string): [string, LoraLayer][] {
  const layers = loraLayers(model);
  if (!layers.length) throw new Error(`${what}: ${model.constructor.name} has no LoRA layers (call attachLora first)`);
  return layers;
}

/**
 * The LoRA weights under diffusers' names, in module order (A = lora.down, B = lora.up), as
 * `save_lora_weights` writes them for a PEFT-trained UNet. diffusers reads such a file with alpha = rank,
 * so a layer with alpha ≠ rank has alpha/rank folded into its up weight (same output, portable file).
 * The tensors are new handles (views of the weights, or scaled copies): dispose them or work inside tidy().
 */
export function loraStateDictDiffusers(model: Module, options: { prefix?: string } = {}): Map<string, Tensor> {
  const prefix = options.prefix ?? 'unet';
  const out = new Map<string, Tensor>();
  noGrad(() => {
    for (const [path, l] of requireLayers(model, 'loraStateDictDiffusers')) {
      const key = prefix ? `${prefix}.${path}` : path;
      const fold = l.alpha / l.rank;
      out.set(`${key}.lora.down.weight`, l.lora_A.weight.detach());
      out.set(`${key}.lora.up.weight`, fold === 1 ? l.lora_B.weight.detach() : l.lora_B.weight.mul(fold));
    }
  });
  return out;
}

/**
 * The LoRA weights under Kohya/sd-scripts names (`lora_unet_…`), with each layer's alpha as a 0-dim float32
 * tensor, in sd-scripts' state-dict order (alpha, lora_down, lora_up). New handles, as loraStateDictDiffusers.
 */
export function loraStateDictKohya(model: Module): Map<string, Tensor> {
  const out = new Map<string, Tensor>();
  noGrad(() => {
    for (const [path, l] of requireLayers(model, 'loraStateDictKohya')) {
      const name = kohyaName(path);
      out.set(`${name}.alpha`, torch.scalarTensor(l.alpha, { dtype: 'float32' }));
      out.set(`${name}.lora_down.weight`, l.lora_A.weight.detach());
      out.set(`${name}.lora_up.weight`, l.lora_B.weight.detach());
    }
  });
  return out;
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
  const file = join(dir, options.weightName ?? LORA_WEIGHT_NAME);
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
    const sorted = new Map([...sd.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
    saveSafetensors(file, sorted, metadata);
  });
  return file;
}

/** Python's str(float) for the usual alphas (2 → "2.0"). */
function formatAlpha(a: number): string {
  return Number.isInteger(a) ? `${a}.0` : String(a);
}

export type LoraFileFormat = 'diffusers' | 'peft' | 'kohya';

export interface LoadLoraOptions {
  /** Key prefix of the UNet in diffusers/PEFT files (default 'unet'; keys without it are accepted too). */
  prefix?: string;
}

export interface LoadLoraResult {
  /** Formats seen among the keys. */
  formats: LoraFileFormat[];
  /** Module paths that received weights, in module order. */
  loaded: string[];
  /** LoRA layers of the model the file did not cover (left as they were). */
  notInFile: string[];
  /** True when the model had no LoRA layers and they were attached from the file. */
  attached: boolean;
}

interface ParsedKey { key: string; path: string; part: 'A' | 'B' | 'alpha'; format: LoraFileFormat; kohya?: string }

const DIFFUSERS = /^(.+)\.lora\.(down|up)\.weight$/;
const DIFFUSERS_PROCS = /^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$/;
const PEFT = /^(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight$/;
const KOHYA = /^(lora_unet_[^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)$/;
const ALPHA = /^(.+)\.alpha$/;

function parseKey(key: string, prefix: string): ParsedKey | null {
  let m = KOHYA.exec(key);
  if (m) {
    const part = m[2] === 'alpha' ? 'alpha' : m[2] === 'lora_down.weight' ? 'A' : 'B';
    return { key, path: '', kohya: m[1] as string, part, format: 'kohya' };
  }
  const strip = (p: string): string => {
    let s = p;
    if (prefix && s.startsWith(`${prefix}.`)) s = s.slice(prefix.length + 1);
    if (s.startsWith('base_model.model.')) s = s.slice('base_model.model.'.length);
    return s;
  };
  if ((m = DIFFUSERS_PROCS.exec(key))) {
    const proj = m[2] === 'to_out' ? 'to_out.0' : (m[2] as string);
    return { key, path: strip(`${m[1] as string}.${proj}`), part: m[3] === 'down' ? 'A' : 'B', format: 'diffusers' };
  }
  if ((m = DIFFUSERS.exec(key))) return { key, path: strip(m[1] as string), part: m[2] === 'down' ? 'A' : 'B', format: 'diffusers' };
  if ((m = PEFT.exec(key))) return { key, path: strip(m[1] as string), part: m[2] === 'A' ? 'A' : 'B', format: 'peft' };
  if ((m = ALPHA.exec(key))) return { key, path: strip(m[1] as string), part: 'alpha', format: 'diffusers' };
  return null;
}

function listKeys(keys: string[]): string {
  const shown = keys.slice(0, 30).join('\n  ');
  return keys.length > 30 ? `${shown}\n  ... (${keys.length - 30} more)` : shown;
}

/**
 * Loads LoRA weights (a safetensors file or a Map) in diffusers, PEFT or Kohya layout into the model's
 * LoraLinear layers. A model without LoRA layers gets them attached first, exactly at the layers the file
 * names, with the file's rank per layer. Alphas: Kohya's per-layer `.alpha` (missing: rank); diffusers files
 * mean alpha = rank; PEFT state dicts carry no alpha, so layers keep theirs. Everything is checked before
 * anything is copied: a key that matches no layer, a layer with only one of A/B, or a shape that differs
 * is an error that lists them all.
 */
export function loadLoraIntoModel(model: Module, source: string | Map<string, Tensor>, options: LoadLoraOptions = {}): LoadLoraResult {
  const prefix = options.prefix ?? 'unet';
  const owned = typeof source === 'string';
  const tensors = owned ? loadSafetensors(source).tensors : source;
  const where = owned ? ` from ${source}` : '';
  try {
    const existing = loraLayers(model);
    const attached = existing.length === 0;
    // Layers the keys may name: the LoRA layers, or (nothing attached yet) every Linear.
    const candidates: [string, Module][] = attached
      ? model.namedModules().filter(([p, m]) => p !== '' && m instanceof Linear)
      : existing;
    const byPath = new Map(candidates);
    const byKohya = new Map(candidates.map(([p]) => [kohyaName(p), p]));

    const unmatched: string[] = [];
    const groups = new Map<string, { A?: Tensor; B?: Tensor; alpha?: Tensor; formats: Set<LoraFileFormat>; keys: string[] }>();
    for (const [key, t] of tensors) {
      const parsed = parseKey(key, prefix);
      const path = parsed?.kohya !== undefined ? byKohya.get(parsed.kohya) : parsed?.path;
      if (!parsed || path === undefined || !byPath.has(path)) {
        unmatched.push(key);
        continue;
      }
      const g = groups.get(path) ?? { formats: new Set<LoraFileFormat>(), keys: [] };
      if (g[parsed.part] !== undefined) throw new Error(`loadLoraIntoModel${where}: two keys give ${parsed.part} of ${path}: ${g.keys.join(', ')}, ${key}`);
      g[parsed.part] = t;
      g.formats.add(parsed.format);
      g.keys.push(key);
      groups.set(path, g);
    }
    if (unmatched.length) {
      const what = attached ? 'Linear layer' : 'LoRA layer';
      throw new Error(`loadLoraIntoModel${where}: ${unmatched.length} key(s) match no ${what} of ${model.constructor.name}:\n  ${listKeys(unmatched)}`);
    }
    if (!groups.size) throw new Error(`loadLoraIntoModel${where}: no LoRA weights in the file`);

    const problems: string[] = [];
    const perLayer = new Map<string, { rank: number; alpha: number }>();
    for (const [path, g] of groups) {
      if (!g.A || !g.B) {
        problems.push(`${path}: ${g.A ? 'up/B' : 'down/A'} weight missing (have ${g.keys.join(', ')})`);
        continue;
      }
      const base = byPath.get(path) as Linear | LoraLinear;
      const rank = g.A.shape[0] ?? 0;
      const want = attached ? { rank, in: (base as Linear).inFeatures, out: (base as Linear).outFeatures } : { rank: (base as LoraLinear).rank, in: (base as LoraLinear).inFeatures, out: (base as LoraLinear).outFeatures };
      const shape = (t: Tensor) => `[${t.shape.join(', ')}]`;
      if (g.A.ndim !== 2 || g.A.shape[0] !== want.rank || g.A.shape[1] !== want.in || g.B.ndim !== 2 || g.B.shape[0] !== want.out || g.B.shape[1] !== want.rank) {
        problems.push(`${path}: file down/A ${shape(g.A)}, up/B ${shape(g.B)}; layer needs [${want.rank}, ${want.in}], [${want.out}, ${want.rank}]`);
      }
      if (g.alpha && g.alpha.numel() !== 1) problems.push(`${path}: alpha must hold one value, has shape ${shape(g.alpha)}`);
      if (g.formats.size > 1) problems.push(`${path}: keys of several formats (${[...g.formats].join(', ')}): ${g.keys.join(', ')}`);
      const alpha = g.alpha ? g.alpha.item() : rank;
      perLayer.set(path, { rank, alpha });
    }
    if (!attached) {
      const merged = existing.filter(([p, l]) => groups.has(p) && l.merged).map(([p]) => p);
      if (merged.length) problems.push(`merged layer(s), unmerge first: ${merged.join(', ')}`);
    }
    if (problems.length) throw new Error(`loadLoraIntoModel${where}: cannot load:\n  ${listKeys(problems)}`);

    if (attached) {
      // Attaching draws an initialisation that the file then overwrites: keep the caller's random streams as they were.
      withRandomStateKept(model, () => attachLoraToPaths(model, [...groups.keys()], { rank: 1, perLayer }));
    }
    const layers = new Map(loraLayers(model));
    noGrad(() => {
      for (const [path, g] of groups) {
        const l = layers.get(path) as LoraLinear;
        l.lora_A.weight.copy_(g.A as Tensor);
        l.lora_B.weight.copy_(g.B as Tensor);
        const peftOnly = g.formats.has('peft') && !g.alpha;
        if (!peftOnly) l.alpha = (perLayer.get(path) as { alpha: number }).alpha;
      }
    });
    const formats = new Set<LoraFileFormat>();
    for (const g of groups.values()) for (const f of g.formats) formats.add(f);
    const order = loraLayers(model).map(([p]) => p);
    return { formats: [...formats], loaded: order.filter((p) => groups.has(p)), notInFile: order.filter((p) => !groups.has(p)), attached };
  } finally {
    if (owned) dispose([...tensors.values()]);
  }
}

/** Runs fn (which may draw initialisations the caller overwrites) with every generator's state put back afterwards. */
export function withRandomStateKept<T>(model: Module, fn: () => T): T {
  const devices = new Set(['cpu', ...model.parameters().map((p) => p.device).filter((d) => d.startsWith('cuda'))]);
  const saved = [...devices].map((d) => {
    const g = defaultGenerator(d);
    return [g, g.getState()] as const;
  });
  try {
    return fn();
  } finally {
    for (const [g, s] of saved) {
      g.setState(s);
      s.dispose();
    }
  }
}
