// diffusers' LoRA loading for inference (StableDiffusionLoraLoaderMixin, diffusers 0.31 + PEFT 0.13): named
// adapters on the UNet and the text encoder, their weights, fuse/unfuse, unload, and a run-time scale.
//
// Files: diffusers (`unet.…lora.down.weight`, `text_encoder.…lora_linear_layer.up.weight`, old attention
// processors `…processor.to_q_lora.down.weight`), PEFT (`…lora_A[.name].weight`), unprefixed UNet keys, and
// Kohya/A1111 (`lora_unet_…`, `lora_te_…` with a per-layer `.alpha`). Keys are renamed here, at the edge, to
// module paths; the models never see file names. A load checks every key, shape and rank before it changes
// anything, so a failed load leaves the models as they were.
//
// Active adapters after a load: the new adapter alone, as diffusers (get_active_adapters() is ['default_1']
// after a second load_lora_weights; set_adapters([...]) combines them).
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { noGrad } from '../autograd.js';
import { loadSafetensors } from '../io/safetensors.js';
import { Conv2d, Linear } from '../nn/layers.js';
import type { Module } from '../nn/module.js';
import { dispose } from '../scope.js';
import type { Tensor } from '../tensor.js';
import { detachLora, loraLayers, replaceModule } from './attach.js';
import { LoraConv2d } from './lora_conv2d.js';
import { LoraLayer } from './lora_layer.js';
import { LoraLinear } from './lora_linear.js';
import { kohyaName, LORA_WEIGHT_NAME, withRandomStateKept } from './save.js';

/** The models of a pipeline LoRA is loaded into. */
export interface LoraTargets { unet: Module; textEncoder?: Module }

export interface LoadLoraWeightsOptions {
  /** Default 'default_N', N the smallest free number (diffusers: 'default_0' for the first). */
  adapterName?: string;
  /** File inside a folder source (default pytorch_lora_weights.safetensors). */
  weightName?: string;
}

export interface LoadLoraWeightsResult {
  adapterName: string;
  /** Layers of the UNet / text encoder that received this adapter. */
  unetLayers: number;
  textEncoderLayers: number;
  /** Key layouts seen in the file: 'diffusers', 'peft', 'kohya'. */
  formats: string[];
}

type Part = 'unet' | 'text_encoder';
type Format = 'diffusers' | 'peft' | 'kohya';
interface ParsedKey { part: Part; format: Format; slot: 'A' | 'B' | 'alpha'; path?: string; kohya?: string }

const TE_PROCS: Record<string, string> = { to_q: 'q_proj', to_k: 'k_proj', to_v: 'v_proj', to_out: 'out_proj' };

/** The model, layout and module path (or Kohya name) a key names; null when it is no LoRA key we know. */
function parseKey(key: string): ParsedKey | null {
  let m = /^lora_(unet|te)_([^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)$/.exec(key);
  if (m) {
    const part: Part = m[1] === 'unet' ? 'unet' : 'text_encoder';
    const slot = m[3] === 'alpha' ? 'alpha' : m[3] === 'lora_down.weight' ? 'A' : 'B';
    return { part, format: 'kohya', slot, kohya: `lora_${m[1] as string}_${m[2] as string}` };
  }
  let part: Part = 'unet';
  let rest = key;
  if (rest.startsWith('unet.')) rest = rest.slice(5);
  else if (rest.startsWith('text_encoder.')) [part, rest] = ['text_encoder', rest.slice(13)];
  if (rest.startsWith('base_model.model.')) rest = rest.slice(17);
  if ((m = /^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$/.exec(rest))) {
    const proj = m[2] === 'to_out' ? 'to_out.0' : (m[2] as string);
    return { part, format: 'diffusers', slot: m[3] === 'down' ? 'A' : 'B', path: `${m[1] as string}.${proj}` };
  }
  if (part === 'text_encoder' && (m = /^(.+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$/.exec(rest))) {
    return { part, format: 'diffusers', slot: m[3] === 'down' ? 'A' : 'B', path: `${m[1] as string}.${TE_PROCS[m[2] as string] as string}` };
  }
  if ((m = /^(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$/.exec(rest))) {
    return { part, format: 'diffusers', slot: m[2] === 'down' ? 'A' : 'B', path: m[1] as string };
  }
  if ((m = /^(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight$/.exec(rest))) return { part, format: 'peft', slot: m[2] === 'A' ? 'A' : 'B', path: m[1] as string };
  if ((m = /^(.+)\.alpha$/.exec(rest))) return { part, format: 'diffusers', slot: 'alpha', path: m[1] as string };
  return null;
}

function listLines(lines: string[]): string {
  const shown = lines.slice(0, 30).join('\n  ');
  return lines.length > 30 ? `${shown}\n  ... (${lines.length - 30} more)` : shown;
}

/** The layers keys may name: LoRA layers, and Linear/Conv2d modules not inside one. */
function candidates(model: Module): Map<string, Linear | Conv2d | LoraLayer> {
  const out = new Map<string, Linear | Conv2d | LoraLayer>();
  const lora = loraLayers(model).map(([p]) => `${p}.`);
  for (const [p, m] of model.namedModules()) {
    if (p === '' || lora.some((l) => p.startsWith(l))) continue;
    if (m instanceof Linear || m instanceof Conv2d || m instanceof LoraLayer) out.set(p, m);
  }
  return out;
}

function isLora(m: Module): m is LoraLayer {
  return m instanceof LoraLayer;
}

/** The base layer (unwrapped) of a candidate. */
function baseOf(m: Linear | Conv2d | LoraLayer): Linear | Conv2d {
  return isLora(m) ? (m.base_layer as Linear | Conv2d) : m;
}

function parts(targets: LoraTargets): [Part, Module][] {
  return targets.textEncoder ? [['unet', targets.unet], ['text_encoder', targets.textEncoder]] : [['unet', targets.unet]];
}

/** Adapter names per model in load order (a layer's order can differ after deletions). */
const registry = new WeakMap<Module, string[]>();

function adapterNamesOf(model: Module): string[] {
  const known = registry.get(model) ?? [];
  const present = new Set(loraLayers(model).flatMap(([, l]) => l.adapterNames()));
  return [...known.filter((n) => present.has(n)), ...[...present].filter((n) => !known.includes(n))];
}

function allAdapterNames(targets: LoraTargets): string[] {
  return [...new Set(parts(targets).flatMap(([, m]) => adapterNamesOf(m)))];
}

function allLayers(targets: LoraTargets): LoraLayer[] {
  return parts(targets).flatMap(([, m]) => loraLayers(m).map(([, l]) => l));
}

const shapeOf = (t: Tensor): string => `[${t.shape.join(', ')}]`;

/**
 * Loads a LoRA file (or a Map of tensors) as a new named adapter of the UNet and, for `text_encoder.`/`lora_te_`
 * keys, the text encoder (diffusers' `pipe.load_lora_weights`). The new adapter becomes the active one, with
 * weight 1. Every key must name a Linear/Conv2d of the model with matching shapes; otherwise nothing changes
 * and the error lists the keys.
 */
export function loadLoraWeights(
  targets: LoraTargets, source: string | Map<string, Tensor>, options: LoadLoraWeightsOptions = {},
): LoadLoraWeightsResult {
  let file = '';
  if (typeof source === 'string') {
    let isDir = false;
    try { isDir = statSync(source).isDirectory(); } catch { throw new Error(`loadLoraWeights: no file or folder ${source}`); }
    file = isDir ? join(source, options.weightName ?? LORA_WEIGHT_NAME) : source;
  }
  const where = file ? ` (${file})` : '';
  const existing = allAdapterNames(targets);
  let name = options.adapterName;
  if (name === undefined) {
    let i = 0;
    while (existing.includes(`default_${i}`)) i++;
    name = `default_${i}`;
  }
  if (typeof name !== 'string' || name === '' || name.includes('.')) throw new TypeError(`loadLoraWeights: bad adapter name '${String(name)}' (non-empty, no '.')`);
  if (existing.includes(name)) throw new Error(`loadLoraWeights: adapter name '${name}' is already in use (adapters: ${existing.join(', ')}); pick another adapterName or deleteAdapters first`);
  const tensors = file ? loadSafetensors(file).tensors : (source as Map<string, Tensor>);
  try {
    return attachAdapter(targets, tensors, name, where);
  } finally {
    if (file) dispose([...tensors.values()]);
  }
}

interface Group { A?: Tensor; B?: Tensor; alpha?: Tensor; keys: string[]; formats: Set<Format> }

function attachAdapter(targets: LoraTargets, tensors: Map<string, Tensor>, name: string, where: string): LoadLoraWeightsResult {
  const models = new Map(parts(targets));
  const cands = new Map<Part, Map<string, Linear | Conv2d | LoraLayer>>();
  const kohya = new Map<Part, Map<string, string>>();
  for (const [part, model] of models) {
    const c = candidates(model);
    cands.set(part, c);
    kohya.set(part, new Map([...c.keys()].map((p) => [kohyaName(p, part === 'unet' ? 'lora_unet' : 'lora_te'), p])));
  }
  // 1. every key names a layer
  const unmatched: string[] = [];
  let noTextEncoder = false;
  const groups = new Map<Part, Map<string, Group>>([['unet', new Map()], ['text_encoder', new Map()]]);
  for (const [key, t] of tensors) {
    const k = parseKey(key);
    if (k?.part === 'text_encoder' && !models.has('text_encoder')) noTextEncoder = true;
    const path = k ? (k.kohya !== undefined ? kohya.get(k.part)?.get(k.kohya) : k.path) : undefined;
    if (!k || path === undefined || !cands.get(k.part)?.has(path)) {
      unmatched.push(key);
      continue;
    }
    const byPath = groups.get(k.part) as Map<string, Group>;
    const g = byPath.get(path) ?? { keys: [], formats: new Set<Format>() };
    if (g[k.slot] !== undefined) throw new Error(`loadLoraWeights${where}: two keys give ${k.slot} of ${k.part} ${path}: ${g.keys.join(', ')}, ${key}`);
    g[k.slot] = t;
    g.keys.push(key);
    g.formats.add(k.format);
    byPath.set(path, g);
  }
  if (unmatched.length) {
    const hint = noTextEncoder ? ' (the file has text encoder keys: pass targets.textEncoder)' : '';
    throw new Error(`loadLoraWeights${where}: ${unmatched.length} key(s) match no Linear/Conv2d layer of the UNet${models.has('text_encoder') ? ' or the text encoder' : ''}${hint} — a LoRA for another architecture (e.g. SDXL) or an unsupported kind (LoHa, LoKr, DoRA):\n  ${listLines(unmatched)}`);
  }
  if (![...groups.values()].some((g) => g.size)) throw new Error(`loadLoraWeights${where}: no LoRA weights in the file`);

  // 2. shapes, ranks, alphas; no layer fused
  const problems: string[] = [];
  const plan: { part: Part; path: string; A: Tensor; B: Tensor; rank: number; alpha: number }[] = [];
  for (const [part, byPath] of groups) {
    for (const [path, g] of byPath) {
      const at = `${part} ${path}`;
      if (!g.A || !g.B) {
        problems.push(`${at}: ${g.A ? 'up/B' : 'down/A'} weight missing (have ${g.keys.join(', ')})`);
        continue;
      }
      const layer = cands.get(part)?.get(path) as Linear | Conv2d | LoraLayer;
      const base = baseOf(layer);
      const rank = g.A.shape[0] ?? 0;
      let want: [number[], number[]];
      if (base instanceof Linear) want = [[rank, base.inFeatures], [base.outFeatures, rank]];
      else {
        if (base.groups !== 1) { problems.push(`${at}: grouped Conv2d (groups ${base.groups}) cannot take LoRA`); continue; }
        want = [[rank, base.inChannels, base.kernelSize, base.kernelSize], [base.outChannels, rank, 1, 1]];
      }
      const same = (t: Tensor, s: number[]): boolean => t.ndim === s.length && t.shape.every((v, i) => v === s[i]);
      if (rank <= 0 || !same(g.A, want[0]) || !same(g.B, want[1])) {
        problems.push(`${at}: file down/A ${shapeOf(g.A)}, up/B ${shapeOf(g.B)}; the ${base.constructor.name} needs [${want[0].join(', ')}], [${want[1].join(', ')}] (rank ${rank})`);
        continue;
      }
      if (!g.A.dtype.startsWith('float') && g.A.dtype !== 'bfloat16') problems.push(`${at}: weights of dtype ${g.A.dtype}`);
      if (g.alpha && g.alpha.numel() !== 1) problems.push(`${at}: alpha must hold one value, has shape ${shapeOf(g.alpha)}`);
      if (g.formats.size > 1) problems.push(`${at}: keys of several formats (${[...g.formats].join(', ')}): ${g.keys.join(', ')}`);
      if (isLora(layer) && layer.merged) problems.push(`${at}: the layer is fused; unfuseLora first`);
      const alpha = g.alpha && g.alpha.numel() === 1 ? g.alpha.item() : rank;
      if (!Number.isFinite(alpha)) problems.push(`${at}: alpha ${alpha}`);
      plan.push({ part, path, A: g.A, B: g.B, rank, alpha });
    }
  }
  if (problems.length) throw new Error(`loadLoraWeights${where}: cannot load:\n  ${listLines(problems)}`);

  // 3. attach; undo everything on a failure
  const done: { model: Module; path: string }[] = [];
  try {
    withRandomStateKept(targets.unet, () => noGrad(() => {
      for (const p of plan) {
        const model = models.get(p.part) as Module;
        const layer = cands.get(p.part)?.get(p.path) as Linear | Conv2d | LoraLayer;
        let view: { A: Module & { weight: Tensor }; B: Module & { weight: Tensor } };
        if (isLora(layer)) {
          view = layer.addAdapter(name, p.rank, p.alpha, 'float32');
        } else {
          const o = { rank: p.rank, alpha: p.alpha, adapterName: name };
          const wrapped = layer instanceof Linear ? new LoraLinear(layer, o) : new LoraConv2d(layer, o);
          for (const t of [...wrapped.lora_A.parameters(), ...wrapped.lora_B.parameters()]) t.requiresGrad = false;
          replaceModule(model, p.path, wrapped);
          view = { A: wrapped.lora_A, B: wrapped.lora_B };
        }
        done.push({ model, path: p.path });
        view.A.weight.copy_(p.A);
        view.B.weight.copy_(p.B);
      }
    }));
  } catch (e) {
    for (const { model, path } of done) removeAdapterAt(model, path, name);
    throw e;
  }
  for (const [, model] of models) {
    const names = registry.get(model) ?? [];
    if (done.some((d) => d.model === model)) registry.set(model, [...names.filter((n) => n !== name), name]);
  }
  // diffusers: the adapter just loaded is the active one
  for (const l of allLayers(targets)) l.activeAdapters = [name];
  const formats = new Set<string>();
  for (const byPath of groups.values()) for (const g of byPath.values()) for (const f of g.formats) formats.add(f);
  return {
    adapterName: name,
    unetLayers: plan.filter((p) => p.part === 'unet').length,
    textEncoderLayers: plan.filter((p) => p.part === 'text_encoder').length,
    formats: [...formats],
  };
}

/** Removes one adapter from the LoRA layer at path; a layer left without adapters is replaced by its base layer. */
function removeAdapterAt(model: Module, path: string, name: string): void {
  const layer = loraLayers(model).find(([p]) => p === path)?.[1];
  if (!layer) return;
  if (!layer.deleteAdapter(name)) {
    replaceModule(model, path, layer.base_layer);
    layer.disposeAdapters();
  }
}

function namesArg(names: string | string[], what: string): string[] {
  const list = typeof names === 'string' ? [names] : [...names];
  if (!list.length) throw new Error(`${what}: no adapter names given`);
  return list;
}

function requireKnown(targets: LoraTargets, names: string[], what: string): void {
  const known = allAdapterNames(targets);
  const unknown = names.filter((n) => !known.includes(n));
  if (unknown.length) throw new Error(`${what}: no adapter ${unknown.map((n) => `'${n}'`).join(', ')}; the adapters are: ${known.length ? known.join(', ') : '(none loaded)'}`);
}

/**
 * Activates these adapters (only these), with a weight each (default 1): diffusers' set_adapters. The output
 * is base + Σ weight_a · alpha_a/rank_a · B_a A_a x, on the UNet and the text encoder.
 */
export function setAdapters(targets: LoraTargets, names: string | string[], weights?: number | number[]): void {
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
export function getActiveAdapters(targets: LoraTargets): string[] {
  const first = allLayers(targets)[0];
  return first ? [...first.activeAdapters] : [];
}

/** The adapters of each model, in load order (diffusers' get_list_adapters). */
export function getListAdapters(targets: LoraTargets): { unet: string[]; text_encoder: string[] } {
  return { unet: adapterNamesOf(targets.unet), text_encoder: targets.textEncoder ? adapterNamesOf(targets.textEncoder) : [] };
}

/**
 * Removes adapters and frees their weights (diffusers' delete_adapters). When no active adapter is left, the
 * first remaining one becomes active (PEFT); a layer left without adapters gets its base layer back.
 */
export function deleteAdapters(targets: LoraTargets, names: string | string[]): void {
  const list = namesArg(names, 'deleteAdapters');
  requireKnown(targets, list, 'deleteAdapters');
  const active = getActiveAdapters(targets);
  for (const [, model] of parts(targets)) {
    for (const [path, l] of loraLayers(model)) for (const n of list) if (l.adapter(n)) removeAdapterAt(model, path, n);
    registry.set(model, (registry.get(model) ?? []).filter((n) => !list.includes(n)));
  }
  let stillActive = active.filter((n) => !list.includes(n));
  if (!stillActive.length) stillActive = allAdapterNames(targets).slice(0, 1);
  for (const l of allLayers(targets)) l.activeAdapters = [...stillActive];
}

/** Turns every LoRA branch off (the base models' outputs) / back on (diffusers' disable_lora / enable_lora). */
export function disableLora(targets: LoraTargets): void { for (const l of allLayers(targets)) l.enabled = false; }
export function enableLora(targets: LoraTargets): void { for (const l of allLayers(targets)) l.enabled = true; }

/**
 * Bakes adapters (default: the active ones) times loraScale into the base weights (diffusers' fuse_lora);
 * forward then runs the base layers alone. The original weights are kept for unfuseLora. A delta holding
 * NaN or inf is an error, and nothing stays fused.
 */
export function fuseLora(targets: LoraTargets, options: { loraScale?: number; adapterNames?: string[] } = {}): void {
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
export function unfuseLora(targets: LoraTargets): void { for (const l of allLayers(targets)) l.unmerge(); }

/** Removes every LoRA layer and adapter: the models are the base models again, same parameter names, same bits. */
export function unloadLoraWeights(targets: LoraTargets): void {
  for (const [, model] of parts(targets)) {
    detachLora(model);
    registry.delete(model);
  }
}

/**
 * Runs fn with every adapter's weight multiplied by scale, on the UNet and the text encoder (diffusers'
 * cross_attention_kwargs={"scale": s} / lora_scale), and puts the previous scales back afterwards, also when
 * fn throws. A promise result restores when it settles (do not run two overlapping calls then).
 */
export function withLoraScale<T>(targets: LoraTargets, scale: number, fn: () => T): T {
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
