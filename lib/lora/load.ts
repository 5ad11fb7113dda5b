// The one LoRA loader: read a file (or a state dict) into a LoraDescription (formats.ts), check every entry
// against the models — each target exists and is the right kind of layer, shapes and ranks fit, no layer is
// fused — and only then change anything. Two ways to apply:
//   'add'   a new named adapter (diffusers' load_lora_weights; adapters.ts's loadLoraWeights), wrapping plain
//           Linear/Conv2d layers in LoRA layers or adding a branch to existing ones; undone on a failure.
//   'fill'  the weights of an existing adapter, which the file must cover exactly (PEFT's
//           set_peft_model_state_dict: what the training script's resume does).
// Training resume, loadLoraWeights and convert-lora all read through readLora.
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { noGrad } from '../autograd.js';
import { assertRegularFile } from '../io/files.js';
import { checkPlainName } from '../io/hub.js';
import { loadSafetensors } from '../io/safetensors.js';
import { Conv2d, Linear } from '../nn/layers.js';
import { Module } from '../nn/module.js';
import { defaultGenerator } from '../random.js';
import { dispose, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import { loraLayers, replaceModule } from './attach.js';
import {
  kohyaName, kohyaPrefix, loraError, parseLoraFile, sgmToDiffusersPath, withDiffusersAlphas,
  type LoraComponent, type LoraDescription, type LoraEntry, type LoraKeyLayout, type LoraPairEntry, type LycorisEntry,
} from './formats.js';
import { LycorisBranch } from './lycoris.js';
import { LoraConv2d } from './lora_conv2d.js';
import { LoraLayer } from './lora_layer.js';
import { LoraLinear } from './lora_linear.js';

export const LORA_WEIGHT_NAME = 'pytorch_lora_weights.safetensors';

/** The models of a pipeline LoRA is loaded into (SDXL: two text encoders). */
export interface LoraTargets { unet: Module; textEncoder?: Module; textEncoder2?: Module }
/** A model alone (taken as the UNet) or a pipeline's models. */
export type LoraTarget = Module | LoraTargets;

export function asTargets(t: LoraTarget): LoraTargets {
  return t instanceof Module ? { unet: t } : t;
}

export function targetModels(t: LoraTarget): [LoraComponent, Module][] {
  const { unet, textEncoder, textEncoder2 } = asTargets(t);
  const out: [LoraComponent, Module][] = [['unet', unet]];
  if (textEncoder) out.push(['text_encoder', textEncoder]);
  if (textEncoder2) out.push(['text_encoder_2', textEncoder2]);
  return out;
}

/** Layers per down block of a UNet (its down_blocks.0 resnets), for SGM names; null when it has none. */
function layersPerBlock(unet: Module): number | null {
  const n = unet.namedModules().filter(([p]) => /^down_blocks\.0\.resnets\.\d+$/.test(p)).length;
  return n || null;
}

export interface ReadLoraOptions {
  /** File inside a folder source (default pytorch_lora_weights.safetensors). */
  weightName?: string;
  /** Only keys under this prefix are read, with it stripped (a training checkpoint's 'lora.'). */
  keyPrefix?: string;
  /** For a state dict: the file it came from, named in errors (e.g. a checkpoint's tensors file). */
  file?: string;
}

/** A read LoRA: its description and a dispose() for the tensors read from a file (a Map source stays the caller's). */
export interface ReadLora { description: LoraDescription; dispose(): void }

/**
 * Reads a LoRA file, a folder holding one, or an in-memory state dict. The file must be a regular file (a FIFO or
 * a device is refused without blocking). The description may hold refused entries: check it with
 * assertValidLora, or apply it (applyLora reports them together with what does not fit the models).
 */
export function readLora(source: string | Map<string, Tensor>, what: string, options: ReadLoraOptions = {}): ReadLora {
  if (typeof source !== 'string') return { description: parseLoraFile(source, options.file ?? '', options), dispose: () => {} };
  let isDir: boolean;
  try { isDir = statSync(source).isDirectory(); } catch { throw new Error(`${what}: no file or folder ${source}`); }
  const file = isDir ? join(source, checkPlainName('weightName', options.weightName ?? LORA_WEIGHT_NAME)) : source;
  let tensors: Map<string, Tensor>;
  try {
    assertRegularFile(file, 'LoRA file');
    tensors = loadSafetensors(file).tensors;
  } catch (e) {
    throw new Error(`${what}: ${(e as Error).message}`);
  }
  const release = (): void => dispose([...tensors.values()]);
  try {
    return { description: parseLoraFile(tensors, file, options), dispose: release };
  } catch (e) {
    release();
    throw e;
  }
}

/** How applyLora changes the models: a new adapter, or the weights of an existing one. */
export type ApplyMode = { kind: 'add'; adapterName: string } | { kind: 'fill'; adapterName: string };

export interface ApplyLoraResult {
  adapterName: string;
  /** Layers of the UNet / text encoder / SDXL's second text encoder that received weights. */
  unetLayers: number;
  textEncoderLayers: number;
  textEncoder2Layers: number;
  /** Key layouts seen in the file: 'diffusers', 'peft', 'kohya'. */
  formats: LoraKeyLayout[];
}

type Target = Linear | Conv2d | LoraLayer;
interface Planned { entry: LoraEntry; model: Module; path: string; layer: Target; alpha: number | null }

/** The layers keys may name in 'add' mode: LoRA layers, and Linear/Conv2d modules not inside one. */
function addCandidates(model: Module): Map<string, Target> {
  const out = new Map<string, Target>();
  const lora = loraLayers(model).map(([p]) => `${p}.`);
  for (const [p, m] of model.namedModules()) {
    if (p === '' || lora.some((l) => p.startsWith(l))) continue;
    if (m instanceof Linear || m instanceof Conv2d || m instanceof LoraLayer) out.set(p, m);
  }
  return out;
}

/** The layers in 'fill' mode: the LoRA layers that have the adapter. */
function fillCandidates(model: Module, name: string): Map<string, Target> {
  return new Map(loraLayers(model).filter(([, l]) => l.hasAdapter(name)));
}

const shapeText = (s: readonly number[]): string => `[${s.join(', ')}]`;

/** The shapes a layer needs for an entry's rank, or why it cannot take one. */
function neededShapes(layer: Target, rank: number, mode: ApplyMode): { down: number[]; up: number[]; what: string } | string {
  if (mode.kind === 'fill') {
    const a = (layer as LoraLayer).adapter(mode.adapterName);
    if (!a) return `has no adapter '${mode.adapterName}'`;
    return { down: a.A.weight.shape, up: a.B.weight.shape, what: `the adapter '${mode.adapterName}'` };
  }
  const base = layer instanceof LoraLayer ? (layer.base_layer as Linear | Conv2d) : layer;
  if (base instanceof Linear) return { down: [rank, base.inFeatures], up: [base.outFeatures, rank], what: 'the Linear' };
  if (base.groups !== 1) return `is a grouped Conv2d (groups ${base.groups}), which cannot take LoRA`;
  return { down: [rank, base.inChannels, base.kernelSize, base.kernelSize], up: [base.outChannels, rank, 1, 1], what: 'the Conv2d' };
}

/** Problems of one matched entry against its layer. */
function entryProblems(p: Planned, mode: ApplyMode): string[] {
  const at = `${p.entry.component} ${p.path}`;
  const keys = ` (${p.entry.keys.join(', ')})`;
  if (p.layer instanceof LoraLayer && p.layer.merged) return [`${at}: the layer is fused; unfuseLora first`];
  const e = p.entry;
  if (mode.kind === 'fill') {
    // the file's adapter must be of the trained adapter's kind (a checkpoint of a LoHa run fills LoHa factors)
    const kind = (p.layer as LoraLayer).adapterKind(mode.adapterName);
    const fileKind = e.type === 'lora' ? (e.magnitude ? 'dora' : 'lora') : e.type;
    if (kind !== fileKind) return [`${at}: a ${KIND_NAMES[fileKind]} adapter cannot fill the trained ${KIND_NAMES[kind ?? 'lora']} adapter '${mode.adapterName}'${keys}`];
    if (e.type !== 'lora') return lycorisFillProblems(p.layer as LoraLayer, e, mode.adapterName, at, keys);
  }
  if (e.type !== 'lora') return lycorisProblems(p.layer, e, at, keys);
  const need = neededShapes(p.layer, e.rank, mode);
  if (typeof need === 'string') return [`${at}: ${need}${keys}`];
  const same = (t: Tensor, s: number[]): boolean => t.ndim === s.length && t.shape.every((v, i) => v === s[i]);
  if (!same(e.down, need.down) || !same(e.up, need.up)) {
    return [`${at}: file down/A ${shapeText(e.down.shape)}, up/B ${shapeText(e.up.shape)}; ${need.what} needs ${shapeText(need.down)}, ${shapeText(need.up)} (rank ${e.rank})${keys}`];
  }
  return [];
}

const KIND_NAMES = { lora: 'LoRA', dora: 'DoRA', loha: 'LoHa', lokr: 'LoKr' } as const;

/** 'fill' of a LoHa/LoKr adapter: the file must give the adapter's factors, each of its shape. */
function lycorisFillProblems(layer: LoraLayer, e: LycorisEntry, name: string, at: string, keys: string): string[] {
  const have = (layer.lycorisAdapter(name) as LycorisBranch).factors;
  const want = Object.keys(have).sort().join(', ');
  const got = Object.keys(e.factors).sort().join(', ');
  if (want !== got) return [`${at}: the file gives the factors ${got}; the adapter '${name}' has ${want}${keys}`];
  const bad = Object.entries(e.factors).filter(([k, t]) => {
    const h = have[k as keyof typeof have] as Tensor;
    return t.ndim !== h.ndim || t.shape.some((v, i) => v !== h.shape[i]);
  });
  return bad.map(([k, t]) => `${at}: ${k} ${shapeText(t.shape)}; the adapter '${name}' has ${shapeText((have[k as keyof typeof have] as Tensor).shape)}${keys}`);
}

/** A LoHa/LoKr entry's ΔW against its layer's weight: [out, in] for a Linear; a conv's shape or [out, in·kh·kw]. */
function lycorisProblems(layer: Target, e: LycorisEntry, at: string, keys: string): string[] {
  const base = layer instanceof LoraLayer ? (layer.base_layer as Linear | Conv2d) : layer;
  if (base instanceof Conv2d && base.groups !== 1) return [`${at}: is a grouped Conv2d (groups ${base.groups}), which cannot take LoRA${keys}`];
  const w = base.weight.shape;
  const fits = e.deltaShape.length === w.length ? e.deltaShape.every((v, i) => v === w[i])
    : w.length === 4 && e.deltaShape.length === 2 && e.deltaShape[0] === w[0] && e.deltaShape[1] === (w[1] as number) * (w[2] as number) * (w[3] as number);
  if (fits) return [];
  const kind = e.type === 'loha' ? 'LoHa' : 'LoKr';
  return [`${at}: the ${kind} factors give a delta of shape ${shapeText(e.deltaShape)}; the ${base instanceof Linear ? 'Linear' : 'Conv2d'} weight is ${shapeText(w)}${keys}`];
}

/**
 * Checks a description against the models and plans every change: each entry (and each refused entry) must name
 * a layer; two entries may not name one layer; in 'fill' mode the file must cover every layer of the adapter.
 * Throws one error listing everything found; changes nothing.
 */
function plan(targets: LoraTarget, d: LoraDescription, what: string, mode: ApplyMode): Planned[] {
  const models = new Map(targetModels(targets));
  const cands = new Map<LoraComponent, { byPath: Map<string, Target>; byKohya: Map<string, string> }>();
  for (const [part, model] of models) {
    const byPath = mode.kind === 'add' ? addCandidates(model) : fillCandidates(model, mode.adapterName);
    cands.set(part, { byPath, byKohya: new Map([...byPath.keys()].map((p) => [kohyaName(p, kohyaPrefix(part)), p])) });
  }
  const unetLayersPerBlock = layersPerBlock(models.get('unet') as Module);
  // Kohya names lost the dots; when the rebuilt path misses, match the name against the model's own paths.
  // Kohya's SDXL files name UNet layers in SGM blocks (input_blocks_4_1_…): mapped to diffusers' blocks first.
  const resolve = (e: { component: LoraComponent; path: string; layout: LoraKeyLayout }): string | undefined => {
    const c = cands.get(e.component);
    if (!c) return undefined;
    let path: string | null = e.path;
    if (e.layout === 'kohya' && e.component === 'unet' && unetLayersPerBlock !== null) path = sgmToDiffusersPath(path, unetLayersPerBlock);
    if (path === null) return undefined;
    if (c.byPath.has(path)) return path;
    return e.layout === 'kohya' ? c.byKohya.get(kohyaName(path, kohyaPrefix(e.component))) : undefined;
  };
  const unmatched = [...d.unknownKeys];
  const problems = [...d.problems];
  for (const r of d.rejected) {
    if (resolve(r) === undefined) unmatched.push(...r.keys);
    else problems.push(...r.problems);
  }
  const planned: Planned[] = [];
  const taken = new Map<string, LoraEntry>();
  // load_lora_weights' alphas for files that carry none (fill keeps the adapter's, as set_peft_model_state_dict)
  for (const entry of mode.kind === 'add' ? withDiffusersAlphas(d.entries) : d.entries) {
    const path = resolve(entry);
    if (path === undefined) {
      unmatched.push(...entry.keys);
      continue;
    }
    const id = `${entry.component}:${path}`;
    const other = taken.get(id);
    if (other) {
      problems.push(`${entry.component} ${path}: given twice, by ${other.keys.join(', ')} and by ${entry.keys.join(', ')}`);
      continue;
    }
    taken.set(id, entry);
    const model = models.get(entry.component) as Module;
    const p: Planned = { entry, model, path, layer: cands.get(entry.component)?.byPath.get(path) as Target, alpha: entry.alpha };
    problems.push(...entryProblems(p, mode));
    planned.push(p);
  }
  if (mode.kind === 'fill') problems.push(...coverageProblems(cands, taken, mode.adapterName));
  if (unmatched.length || problems.length) {
    const absent = [...new Set([...d.entries, ...d.rejected].map((e) => e.component))].filter((c) => !models.has(c));
    throw loraError(what, d.file, { unmatched, unmatchedWhat: unmatchedText(models, mode, absent), problems });
  }
  return planned;
}

/** Per component: how messages name the model, its keys, and the LoraTargets field that passes it. */
const MODEL_NAMES: Record<LoraComponent, [string, string, string]> = {
  unet: ['the UNet', 'UNet', 'unet'],
  text_encoder: ['the text encoder', 'text encoder', 'textEncoder'],
  text_encoder_2: ['the second text encoder (SDXL)', 'second text encoder (text_encoder_2)', 'textEncoder2'],
};

function unmatchedText(models: Map<LoraComponent, Module>, mode: ApplyMode, absent: LoraComponent[]): string {
  const where = [...models.keys()].map((c) => MODEL_NAMES[c][0]).join(' or ');
  const hint = absent.length ? ` (the file has ${absent.map((c) => `${MODEL_NAMES[c][1]} keys: pass targets.${MODEL_NAMES[c][2]}`).join('; ')})` : '';
  if (mode.kind === 'fill') return `match no layer of adapter '${mode.adapterName}' in ${where}${hint}`;
  return `match no Linear/Conv2d layer of ${where}${hint} — a LoRA for another architecture (SD 1.x/2.x and SDXL LoRAs `
    + 'do not fit each other\'s models), or a key in no known layout';
}

/** 'fill' mode: every layer of the adapter must get weights (a partial resume would silently mix two runs). */
function coverageProblems(cands: Map<LoraComponent, { byPath: Map<string, Target> }>, taken: Map<string, LoraEntry>, name: string): string[] {
  const all = [...cands].flatMap(([part, c]) => [...c.byPath.keys()].map((p) => `${part}:${p}`));
  if (!all.length) return [`no layer has an adapter '${name}' (attachLora first, or add the file as a new adapter with loadLoraWeights)`];
  const missing = all.filter((id) => !taken.has(id)).map((id) => id.replace(':', ' '));
  return missing.length ? [`the file has no weights for ${missing.length} layer(s) of adapter '${name}': ${missing.slice(0, 10).join(', ')}${missing.length > 10 ? ', …' : ''}`] : [];
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

/** Removes one adapter from the LoRA layer at path; a layer left without adapters is replaced by its base layer. */
export function removeAdapterAt(model: Module, path: string, name: string): void {
  const layer = loraLayers(model).find(([p]) => p === path)?.[1];
  if (!layer) return;
  if (!layer.hasAdapter(name)) return;
  if (!layer.deleteAdapter(name)) {
    replaceModule(model, path, layer.base_layer);
    layer.disposeAdapters();
  }
}

/** Sets the alpha of one adapter of a layer, whichever slot it is in. */
function setAdapterAlpha(layer: LoraLayer, name: string, alpha: number): void {
  if (name === layer.adapterName) layer.alpha = alpha;
  else {
    const b = layer.lora_extra?.items.get(name);
    if (b) b.alpha = alpha;
  }
}

/** A LoRA layer around a plain Linear/Conv2d (its first adapter's rank and name). */
function wrapLayer(layer: Linear | Conv2d, rank: number, alpha: number, name: string): LoraLayer {
  const o = { rank, alpha, adapterName: name };
  const wrapped = layer instanceof Linear ? new LoraLinear(layer, o) : new LoraConv2d(layer, o);
  for (const t of [...wrapped.lora_A.parameters(), ...wrapped.lora_B.parameters()]) t.requiresGrad = false;
  return wrapped;
}

/** A copy of a tensor the layer owns (the file's tensors are freed after the load), frozen, in float32 at least. */
function owned(t: Tensor): Tensor {
  return tidy(() => t.detach().to({ dtype: t.dtype === 'float64' ? 'float64' : 'float32', copy: true }));
}

/** 'add': wraps or extends each planned layer with the new adapter; everything added is removed again on a failure. */
function addAdapter(targets: LoraTarget, planned: Planned[], name: string): void {
  const done: { model: Module; path: string }[] = [];
  try {
    withRandomStateKept(asTargets(targets).unet, () => noGrad(() => {
      for (const p of planned) {
        const alpha = p.alpha ?? p.entry.rank;
        let layer: LoraLayer;
        if (p.entry.type !== 'lora') {
          // LoHa/LoKr: a branch of its own; a plain layer gets a LoRA layer whose lora_A/lora_B stay vacant
          if (p.layer instanceof LoraLayer) layer = p.layer;
          else {
            layer = wrapLayer(p.layer, 1, 1, '');
            layer.vacant = true;
            replaceModule(p.model, p.path, layer);
          }
          done.push({ model: p.model, path: p.path });
          const f = Object.fromEntries(Object.entries(p.entry.factors).map(([k, t]) => [k, owned(t)]));
          layer.addLycorisAdapter(name, new LycorisBranch(p.entry.type, f, p.entry.rank, alpha));
          continue;
        }
        const e: LoraPairEntry = p.entry;
        let view: { A: { weight: Tensor }; B: { weight: Tensor } };
        if (p.layer instanceof LoraLayer) {
          layer = p.layer;
          view = p.layer.addAdapter(name, e.rank, alpha, 'float32');
        } else {
          layer = wrapLayer(p.layer, e.rank, alpha, name);
          replaceModule(p.model, p.path, layer);
          view = { A: layer.lora_A, B: layer.lora_B };
        }
        done.push({ model: p.model, path: p.path });
        view.A.weight.copy_(e.down);
        view.B.weight.copy_(e.up);
        if (e.magnitude) layer.setMagnitude(name, tidy(() => owned(e.magnitude as Tensor).reshape([-1]).contiguous()));
      }
    }));
  } catch (e) {
    for (const { model, path } of done) removeAdapterAt(model, path, name);
    throw e;
  }
}

/** 'fill': copies the weights into the adapter; alpha from the file (diffusers' files: rank; PEFT's: kept). */
function fillAdapter(planned: Planned[], name: string): void {
  noGrad(() => {
    for (const p of planned) {
      const layer = p.layer as LoraLayer;
      if (p.entry.type !== 'lora') {
        // LoHa/LoKr (plan() checked the factors): a Kohya file's scale alpha/rank is kept; PEFT names carry no alpha
        const b = layer.lycorisAdapter(name) as LycorisBranch;
        const f = b.factors;
        for (const [k, t] of Object.entries(p.entry.factors)) (f[k as keyof typeof f] as Tensor).copy_(t);
        if (p.entry.layout === 'kohya') b.alpha = ((p.entry.alpha ?? p.entry.rank) / p.entry.rank) * b.rank;
        continue;
      }
      const a = layer.adapter(name) as NonNullable<ReturnType<LoraLayer['adapter']>>;
      const e: LoraPairEntry = p.entry;
      a.A.weight.copy_(e.down);
      a.B.weight.copy_(e.up);
      if (e.magnitude && a.magnitude) a.magnitude.copy_(tidy(() => e.magnitude!.reshape([-1]).to(a.magnitude!.dtype)));
      const alpha = p.alpha ?? (p.entry.layout === 'peft' ? null : p.entry.rank);
      if (alpha !== null) setAdapterAlpha(layer, name, alpha);
    }
  });
}

/**
 * Checks everything, then applies a description to the models (see the file header for the modes). A refused
 * load throws before any weight, layer or adapter changes.
 */
export function applyLora(targets: LoraTarget, d: LoraDescription, what: string, mode: ApplyMode): ApplyLoraResult {
  const planned = plan(targets, d, what, mode);
  if (mode.kind === 'add') addAdapter(targets, planned, mode.adapterName);
  else fillAdapter(planned, mode.adapterName);
  return {
    adapterName: mode.adapterName,
    unetLayers: planned.filter((p) => p.entry.component === 'unet').length,
    textEncoderLayers: planned.filter((p) => p.entry.component === 'text_encoder').length,
    textEncoder2Layers: planned.filter((p) => p.entry.component === 'text_encoder_2').length,
    formats: [...new Set(planned.map((p) => p.entry.layout))],
  };
}

export interface SetPeftModelStateDictOptions extends ReadLoraOptions {
  /** The adapter to fill (default 'default', what attachLora creates). */
  adapterName?: string;
}

/**
 * Loads LoRA weights (a file, a folder, or a state dict in any layout) into an existing adapter, as PEFT's
 * set_peft_model_state_dict does when the training script resumes: the file must give every layer of the
 * adapter, with the adapter's shapes. The parameters stay the same tensors (an optimizer keeps working).
 * Kohya alphas and diffusers files (alpha = rank) set the adapter's alpha; PEFT keys carry none, so it is kept.
 */
export function setPeftModelStateDict(target: LoraTarget, source: string | Map<string, Tensor>, options: SetPeftModelStateDictOptions = {}): ApplyLoraResult {
  const what = 'setPeftModelStateDict';
  const read = readLora(source, what, options);
  try {
    return applyLora(target, read.description, what, { kind: 'fill', adapterName: options.adapterName ?? 'default' });
  } finally {
    read.dispose();
  }
}

