// LoRA weight files, every layout in one place: reading keys into one description, and writing it back.
//
//   diffusers  [unet.|text_encoder.|text_encoder_2.]<module path>.lora.down.weight (A, [r, in]) / .lora.up.weight (B, [out, r]),
//              also `…lora_linear_layer.up.weight` and the old attention processors
//              `…attn1.processor.to_q_lora.down.weight`; no alpha unless `<path>.alpha`: diffusers then gives every
//              layer of a model one lora_alpha, the rank of its first layer (diffusersAlphas), so alpha = rank when
//              all ranks are equal
//   PEFT       [unet.][base_model.model.]<module path>.lora_A[.<adapter>].weight / .lora_B…
//   Kohya      lora_unet_<path, '.' → '_'>.lora_down.weight / .lora_up.weight / .alpha (0-dim), lora_te[1]_…, and
//              for SDXL lora_te1_… / lora_te2_… and UNet paths in the original LDM/SGM naming (input_blocks_4_1_… →
//              down_blocks.1.attentions.0…, mapped with the UNet's layers per block when loading)
//   DoRA       a LoRA plus its magnitude: diffusers/PEFT `<path>.lora_magnitude_vector` [out], Kohya/LyCORIS `.dora_scale` [out, 1]
//   LyCORIS    Kohya names with LoHa factors (.hada_w1_a, .hada_w1_b, .hada_w2_a, .hada_w2_b[, .hada_t1, .hada_t2]) or LoKr
//              factors (.lokr_w1 | .lokr_w1_a + .lokr_w1_b, .lokr_w2 | .lokr_w2_a + .lokr_w2_b[, .lokr_t2]), and .alpha
//
// Conv layers (LoCon, SD 1.x's 1×1 proj_in/proj_out) have 4-D weights: A [r, in, kh, kw], B [out, r, 1, 1].
// Renaming happens here, at the edge; the models only ever see module paths. Nothing here knows a model:
// parseLoraFile checks what a file can be checked for alone (key names, dtypes, dimensions, ranks, alphas,
// finite values) and load.ts checks the description against the layers.
import { isFloatingPoint } from '../dtype.js';
import { noGrad } from '../autograd.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import { LOHA_FACTORS, LOKR_FACTORS, lycorisShape, type LycorisFactor, type LycorisFactors, type LycorisType } from './lycoris.js';

/** The model a LoRA layer belongs to: the UNet, the (first) text encoder, SDXL's second text encoder. */
export type LoraComponent = 'unet' | 'text_encoder' | 'text_encoder_2';
/** The key layout of one entry: diffusers' own, PEFT's (lora_A/lora_B), Kohya's (lora_unet_…). */
export type LoraKeyLayout = 'diffusers' | 'peft' | 'kohya';
/** Files are written in one of two layouts. */
export type LoraLayout = 'diffusers' | 'kohya';

interface LoraEntryBase {
  component: LoraComponent;
  /** Module path in diffusers' naming ('down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'). */
  path: string;
  /** The file's alpha; null when it carries none (diffusers then means diffusersAlphas' alpha; PEFT: the adapter's own). */
  alpha: number | null;
  rank: number;
  kind: 'linear' | 'conv';
  layout: LoraKeyLayout;
  /** The file's keys of this entry (down, up[, alpha]), for error messages. */
  keys: string[];
}

/** One layer's LoRA (DoRA when it has a magnitude) as a file gives it. */
export interface LoraPairEntry extends LoraEntryBase {
  type: 'lora';
  /** A [rank, in] or [rank, in, kh, kw]. */
  down: Tensor;
  /** B [out, rank] or [out, rank, 1, 1]. */
  up: Tensor;
  /** DoRA's magnitude, out numbers (lora_magnitude_vector [out], dora_scale [out, 1]; the file's tensor); null for plain LoRA. */
  magnitude: Tensor | null;
}

/**
 * One layer's LyCORIS LoHa or LoKr adapter. `rank` and `alpha` give its scale alpha/rank: a missing alpha is the
 * rank (scale 1), and a LoKr with both factors full has rank = alpha = 1 (LyCORIS ignores its alpha).
 */
export interface LycorisEntry extends LoraEntryBase {
  type: LycorisType;
  factors: LycorisFactors;
  /** Shape of ΔW as the factors build it ([out, in], [out, in·kh·kw] or [out, in, kh, kw]). */
  deltaShape: number[];
}

export type LoraEntry = LoraPairEntry | LycorisEntry;

/** A layer's keys that parseLoraFile refused, with why (one line per problem, naming the keys). */
export interface RejectedLoraEntry { component: LoraComponent; path: string; layout: LoraKeyLayout; keys: string[]; problems: string[] }

/** A whole LoRA file as one list. Valid when unknownKeys, rejected and problems are all empty. */
export interface LoraDescription {
  /** The file ('' for an in-memory state dict), named in every error. */
  file: string;
  entries: LoraEntry[];
  /** Keys in no known layout. */
  unknownKeys: string[];
  /** Layers whose keys were refused (a loader reports them as unmatched when the model has no such layer). */
  rejected: RejectedLoraEntry[];
  /** Problems of the file as a whole (mixed layouts, no weights). */
  problems: string[];
}

/**
 * The Kohya prefix of a component: lora_unet, lora_te (SD 1.x/2.x) or, when the file also has SDXL's second text
 * encoder (`sdxl`), lora_te1 and lora_te2.
 */
export function kohyaPrefix(component: LoraComponent, sdxl = false): string {
  return component === 'unet' ? 'lora_unet' : component === 'text_encoder_2' ? 'lora_te2' : sdxl ? 'lora_te1' : 'lora_te';
}

/** Kohya/A1111 name of a module: prefix + '_' + the path with every '.' replaced by '_'. */
export function kohyaName(modulePath: string, prefix = 'lora_unet'): string {
  return `${prefix}_${modulePath.replace(/\./g, '_')}`;
}

// Multi-word module names of SD UNets and CLIP text encoders, longest first.
const COMPOUNDS = [
  'final_layer_norm', 'time_emb_proj', 'conv_norm_out', 'position_embedding', 'token_embedding',
  'down_blocks', 'up_blocks', 'mid_block', 'transformer_blocks', 'to_q', 'to_k', 'to_v', 'to_out', 'proj_in', 'proj_out',
  'conv_shortcut', 'conv_in', 'conv_out', 'time_embedding', 'linear_1', 'linear_2', 'text_model', 'self_attn',
  'q_proj', 'k_proj', 'v_proj', 'out_proj', 'layer_norm1', 'layer_norm2', 'input_blocks', 'middle_block', 'output_blocks',
].map((c) => c.split('_')).sort((a, b) => b.length - a.length);

/**
 * Kohya names replaced every '.' of the module path by '_'; the path is rebuilt from the names SD 1.x/2.x UNets
 * and CLIP text encoders use: 'down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q' →
 * 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'. (A loader can also match kohyaName(path) against
 * a model's own paths: kohyaName of the result is always the name it came from.)
 */
export function kohyaToModulePath(name: string): string {
  const tokens = name.split('_');
  const parts: string[] = [];
  for (let i = 0; i < tokens.length;) {
    const hit = COMPOUNDS.find((c) => c.every((w, j) => tokens[i + j] === w));
    parts.push(hit ? hit.join('_') : (tokens[i] as string));
    i += hit ? hit.length : 1;
  }
  return parts.join('.');
}

const SGM = /^(input_blocks|output_blocks)\.(\d+)\.(\d+)(\..*)?$/;
const SGM_MIDDLE = /^middle_block\.(\d+)(\..*)?$/;

/**
 * A UNet path in SGM naming (Stability's original code, which Kohya's SDXL files use) as diffusers' path, as
 * diffusers' _maybe_map_sgm_blocks_to_diffusers maps it: `input_blocks.i.j` (i ≥ 1) is down block (i−1)/(L+1),
 * layer (i−1)%(L+1), j = 0 resnets / 1 attentions (`.0.op`: the downsampler); `middle_block.0/1/2` resnets.0,
 * attentions.0, resnets.1; `output_blocks.i.j` up block i/(L+1), layer i%(L+1), j = 0 resnets / 1 attentions /
 * 2 upsamplers.0. L = layers_per_block. Paths in no SGM block are returned unchanged; null for an index diffusers
 * refuses.
 */
export function sgmToDiffusersPath(path: string, layersPerBlock: number): string | null {
  const mid = SGM_MIDDLE.exec(path);
  if (mid) {
    const part = [['resnets', 0], ['attentions', 0], ['resnets', 1]][Number(mid[1])];
    return part ? `mid_block.${part[0]}.${part[1]}${mid[2] ?? ''}` : null;
  }
  const m = SGM.exec(path);
  if (!m) return path;
  const kind = m[1] as string;
  const i = Number(m[2]);
  const j = Number(m[3]);
  const rest = m[4] ?? '';
  const per = layersPerBlock + 1;
  const inner = ['resnets', 'attentions', 'upsamplers'][j];
  if (kind === 'input_blocks') {
    if (i < 1) return null;
    const block = Math.floor((i - 1) / per);
    if (j === 0 && (rest === '.op' || rest.startsWith('.op.'))) return `down_blocks.${block}.downsamplers.0.conv${rest.slice(3)}`;
    return inner && j < 2 ? `down_blocks.${block}.${inner}.${(i - 1) % per}${rest}` : null;
  }
  return inner ? `up_blocks.${Math.floor(i / per)}.${inner}.${j < 2 ? i % per : 0}${rest}` : null;
}

/**
 * A diffusers UNet path in SGM naming, the inverse of sgmToDiffusersPath (Kohya's SDXL files name the UNet so):
 * down block b's layer l is `input_blocks.(1 + b(L+1) + l)` (.0 resnet, .1 attention), its downsampler
 * `input_blocks.((b+1)(L+1)).0.op`; the mid block's resnets.0 / attentions.0 / resnets.1 are middle_block.0/1/2;
 * up block b's layer l is `output_blocks.(b(L+1) + l)` (.0 resnet, .1 attention), its upsampler
 * `output_blocks.(b(L+1) + L).2`. L = layers_per_block. Other paths are returned unchanged.
 */
export function diffusersToSgmPath(path: string, layersPerBlock: number): string {
  const per = layersPerBlock + 1;
  const mid = /^mid_block\.(resnets|attentions)\.(\d+)(\..*)?$/.exec(path);
  if (mid) return `middle_block.${mid[1] === 'attentions' ? 1 : 2 * Number(mid[2])}${mid[3] ?? ''}`;
  const down = /^down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)(\..*)?$/.exec(path);
  if (down) {
    const [b, kind, l, rest] = [Number(down[1]), down[2], Number(down[3]), down[4] ?? ''];
    if (kind === 'downsamplers') return `input_blocks.${(b + 1) * per}.0.op${rest.replace(/^\.conv/, '')}`;
    return `input_blocks.${1 + b * per + l}.${kind === 'resnets' ? 0 : 1}${rest}`;
  }
  const up = /^up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)(\..*)?$/.exec(path);
  if (up) {
    const [b, kind, l, rest] = [Number(up[1]), up[2], Number(up[3]), up[4] ?? ''];
    if (kind === 'upsamplers') return `output_blocks.${b * per + layersPerBlock}.2${rest}`;
    return `output_blocks.${b * per + l}.${kind === 'resnets' ? 0 : 1}${rest}`;
  }
  return path;
}

type Slot = 'down' | 'up' | 'alpha' | 'magnitude' | LycorisFactor;
interface ParsedKey { component: LoraComponent; path: string; slot: Slot; layout: LoraKeyLayout }

const KOHYA = /^lora_(unet|te[12]?)_([^.]+)\.(lora_down\.weight|lora_up\.weight|alpha|dora_scale|hada_(?:w[12]_[ab]|t[12])|lokr_(?:w[12](?:_[ab])?|t2))$/;
const MAGNITUDE = /^(.+)\.lora_magnitude_vector(?:\.(?!weight$)[^.]+)?(?:\.weight)?$/;
const KOHYA_SLOTS: Record<string, Slot> = { 'lora_down.weight': 'down', 'lora_up.weight': 'up', alpha: 'alpha', dora_scale: 'magnitude' };
const PROCESSOR = /^(.+)\.processor\.(to_q|to_k|to_v|to_out(?:\.0)?)[._]lora\.(down|up)\.weight$/;
const TE_PROCESSOR = /^(.+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$/;
const DIFFUSERS = /^(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$/;
const PEFT = /^(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight$/;
const ALPHA = /^(.+)\.alpha$/;
/** PEFT's LoHa/LoKr parameter names (`<path>.hada_w1_a[.<adapter>]`), as training checkpoints name them. */
const PEFT_LYCORIS = /^(.+)\.(hada_(?:w[12]_[ab]|t[12])|lokr_(?:w[12](?:_[ab])?|t2))(?:\.[^.]+)?$/;
const TE_PROCS: Record<string, string> = { to_q: 'q_proj', to_k: 'k_proj', to_v: 'v_proj', to_out: 'out_proj' };

/** The component, module path, slot and layout a key names; null when it is no LoRA key of a known layout. */
export function parseLoraKey(key: string): ParsedKey | null {
  let m = KOHYA.exec(key);
  if (m) {
    const slot = KOHYA_SLOTS[m[3] as string] ?? (m[3] as LycorisFactor);
    const component: LoraComponent = m[1] === 'unet' ? 'unet' : m[1] === 'te2' ? 'text_encoder_2' : 'text_encoder';
    return { component, path: kohyaToModulePath(m[2] as string), slot, layout: 'kohya' };
  }
  let component: LoraComponent = 'unet';
  let rest = key;
  if (rest.startsWith('unet.')) rest = rest.slice('unet.'.length);
  else if (rest.startsWith('text_encoder.')) [component, rest] = ['text_encoder', rest.slice('text_encoder.'.length)];
  else if (rest.startsWith('text_encoder_2.')) [component, rest] = ['text_encoder_2', rest.slice('text_encoder_2.'.length)];
  if (rest.startsWith('base_model.model.')) rest = rest.slice('base_model.model.'.length);
  const downUp = (s: string | undefined): Slot => (s === 'down' || s === 'A' ? 'down' : 'up');
  if ((m = PROCESSOR.exec(rest))) {
    const proj = m[2] === 'to_out' ? 'to_out.0' : (m[2] as string);
    return { component, path: `${m[1] as string}.${proj}`, slot: downUp(m[3]), layout: 'diffusers' };
  }
  if (component !== 'unet' && (m = TE_PROCESSOR.exec(rest))) {
    return { component, path: `${m[1] as string}.${TE_PROCS[m[2] as string] as string}`, slot: downUp(m[3]), layout: 'diffusers' };
  }
  if ((m = DIFFUSERS.exec(rest))) return { component, path: m[1] as string, slot: downUp(m[2]), layout: 'diffusers' };
  if ((m = PEFT.exec(rest))) return { component, path: m[1] as string, slot: downUp(m[2]), layout: 'peft' };
  if ((m = MAGNITUDE.exec(rest))) return { component, path: m[1] as string, slot: 'magnitude', layout: rest.includes('.lora_A') ? 'peft' : 'diffusers' };
  if ((m = ALPHA.exec(rest))) return { component, path: m[1] as string, slot: 'alpha', layout: 'diffusers' };
  if ((m = PEFT_LYCORIS.exec(rest))) return { component, path: m[1] as string, slot: m[2] as LycorisFactor, layout: 'peft' };
  return null;
}

const shapeOf = (t: Tensor): string => `[${t.shape.join(', ')}]`;

/** Problems of one weight tensor alone: dtype, dimensions, finite values. */
function weightProblems(key: string, t: Tensor): string[] {
  if (!isFloatingPoint(t.dtype)) return [`${key}: dtype ${t.dtype}; LoRA weights must be floating point`];
  if (t.ndim !== 2 && t.ndim !== 4) return [`${key}: shape ${shapeOf(t)} has ${t.ndim} dimensions; LoRA weights have 2 (Linear) or 4 (Conv2d)`];
  if (t.numel() === 0) return [`${key}: shape ${shapeOf(t)} is empty`];
  return finiteProblems(key, t);
}

/** A tensor holding NaN or inf, as a problem naming its key. */
function finiteProblems(key: string, t: Tensor): string[] {
  const finite = noGrad(() => {
    const f = t.isfinite();
    const all = f.all();
    const ok = Boolean(all.item()); // a bool tensor's item() is true/false
    f.dispose();
    all.dispose();
    return ok;
  });
  return finite ? [] : [`${key}: holds NaN or infinite values`];
}

/** An alpha tensor's value, or the problem with it (it must be one finite positive number). */
function readAlpha(key: string, t: Tensor): number | string {
  if (t.numel() !== 1 || t.ndim > 1) return `${key}: alpha must be a scalar, has shape ${shapeOf(t)}`;
  if (t.dtype === 'bool') return `${key}: alpha of dtype bool`;
  const v = t.item();
  if (!Number.isFinite(v) || v <= 0) return `${key}: alpha ${v}; it must be a finite number > 0`;
  return v;
}

interface Group {
  component: LoraComponent; path: string; slots: Map<Slot, [string, Tensor]>;
  layouts: Set<LoraKeyLayout>; duplicates: string[]; keys: string[];
}

/** Problems of a complete down/up pair: matching dimensions and ranks, a 1×1 up for convs. */
function pairProblems(at: string, down: Tensor, up: Tensor): string[] {
  if (down.ndim !== up.ndim) return [`${at}: down ${shapeOf(down)} and up ${shapeOf(up)} differ in dimensions`];
  const rank = down.shape[0] as number;
  if (up.shape[1] !== rank) return [`${at}: down has rank ${rank} (${shapeOf(down)}) but up has rank ${up.shape[1]} (${shapeOf(up)})`];
  if (up.ndim === 4 && (up.shape[2] !== 1 || up.shape[3] !== 1)) return [`${at}: up ${shapeOf(up)} must be a 1×1 convolution`];
  return [];
}

/**
 * Reads a LoRA state dict (a file's tensors, `file` naming it) into one description in diffusers' module paths.
 * Refused, each with the key named: keys of no known layout, non-floating weights, weights that are not 2-D or
 * 4-D, NaN/inf values, down/up pairs of different ranks or dimensions, half pairs, an alpha that is not one
 * finite positive number, two keys for the same slot of a layer (two layouts naming one target), and a file
 * that mixes Kohya with diffusers/PEFT keys. The tensors are the state dict's own (not copied).
 * `keyPrefix`: only keys under it are read, with it stripped (a training checkpoint's `lora.` entries).
 */
export function parseLoraFile(tensors: Map<string, Tensor>, file = '', options: { keyPrefix?: string } = {}): LoraDescription {
  const groups = new Map<string, Group>();
  const unknownKeys: string[] = [];
  const problems: string[] = [];
  const families = new Map<'kohya' | 'diffusers', string>();
  for (const [fullKey, t] of tensors) {
    if (options.keyPrefix && !fullKey.startsWith(options.keyPrefix)) continue;
    const key = options.keyPrefix ? fullKey.slice(options.keyPrefix.length) : fullKey;
    const k = parseLoraKey(key);
    if (!k) {
      unknownKeys.push(fullKey);
      continue;
    }
    const family = k.layout === 'kohya' ? 'kohya' : 'diffusers';
    if (!families.has(family)) families.set(family, fullKey);
    const id = `${k.component}:${k.path}`;
    let g = groups.get(id);
    if (!g) groups.set(id, (g = { component: k.component, path: k.path, slots: new Map(), layouts: new Set(), duplicates: [], keys: [] }));
    g.keys.push(fullKey);
    const had = g.slots.get(k.slot);
    if (had) g.duplicates.push(`${k.component} ${k.path}: two keys give its ${k.slot}: ${had[0]}, ${fullKey}`);
    else g.slots.set(k.slot, [fullKey, t]);
    if (k.slot !== 'alpha' && k.slot !== 'magnitude') g.layouts.add(k.layout);
  }
  if (families.size > 1) {
    problems.push(`mixes the Kohya and diffusers/PEFT layouts (e.g. ${families.get('kohya') as string} and ${families.get('diffusers') as string}); a file holds one`);
  }
  const entries: LoraEntry[] = [];
  const rejected: RejectedLoraEntry[] = [];
  for (const g of groups.values()) {
    const entry = checkGroup(g);
    if ('problems' in entry) rejected.push(entry);
    else entries.push(entry);
  }
  if (!groups.size && !unknownKeys.length) problems.push('holds no LoRA weights');
  return { file, entries, unknownKeys, rejected, problems };
}

/** The type a group's keys describe, or the problem when they mix LoRA, LoHa and LoKr keys. */
function groupType(g: Group, at: string): LoraEntry['type'] | string {
  const slots = [...g.slots.keys()];
  const types = new Set(slots.map((n) => ((LOHA_FACTORS as readonly string[]).includes(n) ? 'loha' : (LOKR_FACTORS as readonly string[]).includes(n) ? 'lokr'
    : n === 'down' || n === 'up' ? 'lora' : null)).filter((t) => t !== null));
  if (types.size > 1) return `${at}: keys of several adapter kinds (${[...types].join(', ')}): ${g.keys.join(', ')}`;
  return [...types][0] ?? 'lora';
}

/** A DoRA magnitude of out numbers ([out], [out, 1], [1, out, 1, 1] or [out, 1, 1, 1]), or the problem. */
function readMagnitude(key: string, t: Tensor, out: number): Tensor | string {
  if (!isFloatingPoint(t.dtype)) return `${key}: dtype ${t.dtype}; a DoRA magnitude must be floating point`;
  const ok = t.numel() === out && t.shape.filter((d) => d !== 1).length <= 1 && (t.ndim === 1 || t.shape[0] === out || (t.ndim === 4 && t.shape[1] === out));
  if (!ok) {
    const hint = t.ndim === 2 && t.shape[0] === 1 ? ' (a LyCORIS wd_on_output=False magnitude, one per input column, which PEFT cannot express)' : '';
    return `${key}: DoRA magnitude of shape ${shapeOf(t)}; the layer has ${out} output rows, so it must be [${out}] or [${out}, 1]${hint}`;
  }
  const finite = finiteProblems(key, t);
  return finite.length ? finite[0] as string : t;
}

/** A group as a checked entry, or as rejected with its problems. */
function checkGroup(g: Group): LoraEntry | RejectedLoraEntry {
  const at = `${g.component} ${g.path}`;
  const keys = g.keys;
  const layout = (g.layouts.size ? [...g.layouts][0] : 'diffusers') as LoraKeyLayout;
  const found: string[] = [...g.duplicates];
  if (g.layouts.size > 1) found.push(`${at}: keys of several layouts (${[...g.layouts].join(', ')}): ${keys.join(', ')}`);
  const alphaSlot = g.slots.get('alpha');
  const alpha = alphaSlot ? readAlpha(alphaSlot[0], alphaSlot[1]) : null;
  if (typeof alpha === 'string') found.push(alpha);
  const type = groupType(g, at);
  if (type !== 'lora' && type !== 'loha' && type !== 'lokr') return { component: g.component, path: g.path, layout, keys, problems: [...found, type] };
  if (type !== 'lora') return checkLycoris(g, type, alpha, found, layout);
  const down = g.slots.get('down');
  const up = g.slots.get('up');
  if (!down || !up) found.push(`${at}: ${down ? 'up/B' : 'down/A'} weight missing (have ${keys.join(', ')})`);
  for (const e of [down, up]) if (e) found.push(...weightProblems(e[0], e[1]));
  if (!found.length) found.push(...pairProblems(`${at} (${keys.join(', ')})`, (down as [string, Tensor])[1], (up as [string, Tensor])[1]));
  let magnitude: Tensor | null = null;
  const mag = g.slots.get('magnitude');
  if (!found.length && mag) {
    const m = readMagnitude(mag[0], mag[1], (up as [string, Tensor])[1].shape[0] as number);
    if (typeof m === 'string') found.push(m);
    else magnitude = m;
  }
  if (found.length) {
    return { component: g.component, path: g.path, layout, keys, problems: found };
  }
  const d = (down as [string, Tensor])[1];
  return {
    type: 'lora', component: g.component, path: g.path, down: d, up: (up as [string, Tensor])[1], magnitude,
    alpha: alpha as number | null, rank: d.shape[0] as number, kind: d.ndim === 2 ? 'linear' : 'conv', layout, keys,
  };
}

/** A LoHa/LoKr group as a checked entry (factors, ΔW's shape, rank and alpha), or rejected. */
function checkLycoris(g: Group, type: LycorisType, alpha: number | string | null, found: string[], layout: LoraKeyLayout): LycorisEntry | RejectedLoraEntry {
  const at = `${g.component} ${g.path}`;
  const mag = g.slots.get('magnitude');
  if (mag) found.push(`${at}: ${mag[0]}: DoRA on a ${type === 'loha' ? 'LoHa' : 'LoKr'} adapter is not supported (PEFT has no such adapter)`);
  const factors: LycorisFactors = {};
  for (const [slot, [key, t]] of g.slots) {
    if (slot === 'alpha' || slot === 'magnitude') continue;
    if (slot === 'down' || slot === 'up') continue; // groupType refused the mix already
    found.push(...weightProblems(key, t));
    factors[slot] = t;
  }
  const shape = found.length ? null : lycorisShape(type, factors, `${at} (${g.keys.join(', ')})`);
  if (Array.isArray(shape)) found.push(...shape);
  if (found.length || !shape || Array.isArray(shape)) return { component: g.component, path: g.path, layout, keys: g.keys, problems: found };
  const rank = shape.rank ?? 1;
  const a = shape.rank === null ? 1 : (alpha as number | null) ?? rank;
  return {
    type, component: g.component, path: g.path, factors, deltaShape: shape.deltaShape, alpha: a, rank,
    kind: shape.deltaShape.length === 4 || g.path.includes('conv') ? 'conv' : 'linear', layout, keys: g.keys,
  };
}

function listLines(lines: readonly string[]): string {
  const shown = lines.slice(0, 30).join('\n  ');
  return lines.length > 30 ? `${shown}\n  ... (${lines.length - 30} more)` : shown;
}

/** The error for a description's own problems and any further ones (`what`: the operation, e.g. 'convert-lora'). */
export function loraError(what: string, file: string, sections: { unmatched?: string[]; unmatchedWhat?: string; problems: string[] }): Error {
  const where = file ? ` (${file})` : '';
  const parts: string[] = [];
  if (sections.unmatched?.length) parts.push(`${sections.unmatched.length} key(s) ${sections.unmatchedWhat ?? 'are not LoRA weights in a known layout (diffusers, PEFT, Kohya)'}:\n  ${listLines(sections.unmatched)}`);
  if (sections.problems.length) parts.push(`cannot load:\n  ${listLines(sections.problems)}`);
  return new Error(`${what}${where}: ${parts.join('\n')}`);
}

/** Throws the description's problems, if any. */
export function assertValidLora(d: LoraDescription, what: string): void {
  const problems = [...d.problems, ...d.rejected.flatMap((r) => r.problems)];
  if (d.unknownKeys.length || problems.length) throw loraError(what, d.file, { unmatched: d.unknownKeys, problems });
}

/** What a writer needs of a layer: its place, A, B, alpha (null: rank) and DoRA's magnitude (out numbers). */
export interface LoraWeights { component: LoraComponent; path: string; down: Tensor; up: Tensor; alpha: number | null; magnitude?: Tensor | null }

/** Keys sorted by name, as the safetensors writers of Python and Rust order them. */
export function sortedByKey(m: Map<string, Tensor>): Map<string, Tensor> {
  return new Map([...m].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}

const TE_ATTN = /^text_model\.encoder\.layers\.(\d+)\.self_attn\.(out_proj|q_proj|k_proj|v_proj)$/;
const TE_MLP = /^text_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)$/;
const TE_MODULES = ['out_proj', 'q_proj', 'k_proj', 'v_proj', 'fc1', 'fc2'];

/** A text-encoder layer's place in diffusers' rank dict (attention modules of every layer first, then the MLPs); null: not in it. */
function teRankOrder(path: string): number[] | null {
  const m = TE_ATTN.exec(path) ?? TE_MLP.exec(path);
  return m ? [TE_MLP.test(path) ? 1 : 0, Number(m[1]), TE_MODULES.indexOf(m[2] as string)] : null;
}
const before = (a: number[], b: number[]): boolean => {
  const i = a.findIndex((v, j) => v !== b[j]);
  return i >= 0 && (a[i] as number) < (b[i] as number);
};

/**
 * The alpha diffusers (0.31, and every version without `lora_adapter_metadata`) gives the layers of a diffusers- or
 * PEFT-named file, per model: get_peft_kwargs sets one lora_alpha, the rank of the first lora_B of its rank dict,
 * and a layer of another rank only gets its rank in rank_pattern, so its scale is that alpha / its own rank. The
 * rank dict's first layer is, for the UNet, the one whose up key comes first in the file's key order as
 * safetensors' load_file returns it (sorted by name); for a text encoder, the first in text_encoder_attn_modules'
 * order (layer 0's out_proj, q_proj, k_proj, v_proj, …, then the MLPs' fc1, fc2). `upKey`: the layer's up/lora_B key.
 */
export function diffusersAlphas(layers: readonly { component: LoraComponent; path: string; rank: number; upKey: string }[]): Map<LoraComponent, number> {
  const first = new Map<LoraComponent, { key: string; order: number[] | null; rank: number }>();
  for (const l of layers) {
    const order = l.component === 'unet' ? null : teRankOrder(l.path);
    const had = first.get(l.component);
    const wins = !had || (order && had.order ? before(order, had.order) : order ? true : had.order ? false : l.upKey < had.key);
    if (wins) first.set(l.component, { key: l.upKey, order, rank: l.rank });
  }
  return new Map([...first].map(([c, f]) => [c, f.rank]));
}

/**
 * Entries as diffusers' load_lora_weights reads them: a diffusers/PEFT-named LoRA layer without an alpha gets its
 * model's diffusersAlphas alpha (= its rank when every layer of that model has the same rank). Others unchanged.
 */
export function withDiffusersAlphas<E extends LoraEntry>(entries: readonly E[]): E[] {
  const pairs = entries.filter((e) => e.type === 'lora' && e.layout !== 'kohya');
  const upKey = (e: LoraEntry) => e.keys.find((k) => parseLoraKey(k)?.slot === 'up') ?? e.keys[0] ?? '';
  const alphas = diffusersAlphas(pairs.map((e) => ({ component: e.component, path: e.path, rank: e.rank, upKey: upKey(e) })));
  return entries.map((e) => (e.type === 'lora' && e.layout !== 'kohya' && e.alpha === null ? { ...e, alpha: alphas.get(e.component) ?? e.rank } : e));
}

/** The module under a layer's path in diffusers' files: convert_state_dict_to_diffusers names text encoders' differently. */
const DIFFUSERS_INFIX: Readonly<Record<LoraComponent, string>> = { unet: 'lora', text_encoder: 'lora_linear_layer', text_encoder_2: 'lora_linear_layer' };

/**
 * diffusers' keys, in the given order: `unet.<path>.lora.down.weight` / `.lora.up.weight` for the UNet and
 * `text_encoder.<path>.lora_linear_layer.down.weight` / `.up.weight` for a text encoder, as save_lora_weights
 * writes them after convert_state_dict_to_diffusers. These files carry no alphas: diffusers scales each layer by
 * A₀/rank, A₀ its model's first layer's rank (diffusersAlphas), so alpha/A₀ is folded into the up weight (a scaled
 * copy, in up's dtype) when it is not 1 — alpha/rank when all ranks are equal; with LoCon's conv rank ≠ rank the
 * convs' up weights are also corrected for diffusers' A₀/conv rank. Every tensor is a new handle (a detached view
 * or a copy): dispose them or work inside tidy().
 * `prefix` replaces each layer's component as the key prefix ('' for none).
 */
export function toDiffusersKeys(layers: readonly LoraWeights[], prefix?: string): Map<string, Tensor> {
  const out = new Map<string, Tensor>();
  const keyOf = (l: LoraWeights) => {
    const p = prefix ?? l.component;
    return `${p ? `${p}.${l.path}` : l.path}.${DIFFUSERS_INFIX[l.component]}`;
  };
  const alphas = diffusersAlphas(layers.map((l) => ({ component: l.component, path: l.path, rank: l.down.shape[0] as number, upKey: `${keyOf(l)}.up.weight` })));
  noGrad(() => {
    for (const l of layers) {
      const rank = l.down.shape[0] as number;
      const fold = (l.alpha ?? rank) / (alphas.get(l.component) ?? rank);
      const p = prefix ?? l.component;
      const key = keyOf(l);
      out.set(`${key}.down.weight`, l.down.detach());
      // DoRA too: s·B·A is all its norm and its output see, so s folds into B as for LoRA
      out.set(`${key}.up.weight`, fold === 1 ? l.up.detach() : l.up.mul(fold));
      // PEFT's shapes: [out] for a Linear, [1, out, 1, 1] for a Conv2d (DoraConv2dLayer's weight norm)
      if (l.magnitude) out.set(`${p ? `${p}.${l.path}` : l.path}.lora_magnitude_vector`, l.magnitude.reshape(l.down.ndim === 4 ? [1, -1, 1, 1] : [-1]));
    }
  });
  return out;
}

/**
 * Kohya/sd-scripts keys (`lora_unet_…`, `lora_te_…`) in sd-scripts' order per layer (alpha, lora_down, lora_up);
 * alpha is a 0-dim float32 tensor (rank when the layer has none). New handles, as toDiffusersKeys. With
 * sgmLayersPerBlock (an SDXL UNet's layers_per_block) the UNet is named in SGM paths and the encoders
 * lora_te1_/lora_te2_, as Kohya's SDXL files.
 */
export function toKohyaKeys(layers: readonly LoraWeights[], o: { sgmLayersPerBlock?: number } = {}): Map<string, Tensor> {
  const out = new Map<string, Tensor>();
  const sdxl = o.sgmLayersPerBlock !== undefined || layers.some((l) => l.component === 'text_encoder_2');
  const unetPath = (p: string) => (o.sgmLayersPerBlock === undefined ? p : diffusersToSgmPath(p, o.sgmLayersPerBlock));
  noGrad(() => {
    for (const l of layers) {
      const name = kohyaName(l.component === 'unet' ? unetPath(l.path) : l.path, kohyaPrefix(l.component, sdxl));
      out.set(`${name}.alpha`, torch.scalarTensor(l.alpha ?? (l.down.shape[0] as number), { dtype: 'float32' }));
      out.set(`${name}.lora_down.weight`, l.down.detach());
      out.set(`${name}.lora_up.weight`, l.up.detach());
      // LyCORIS' DoRA layout (wd_on_output): one magnitude per output row, [out, 1] ([out, 1, 1, 1] for a conv)
      if (l.magnitude) out.set(`${name}.dora_scale`, l.magnitude.reshape(l.down.ndim === 4 ? [-1, 1, 1, 1] : [-1, 1]));
    }
  });
  return out;
}

/** What the LyCORIS writer needs of a trained LoHa/LoKr layer: its place, factors and alpha. */
export interface LycorisWeights { component: LoraComponent; path: string; factors: LycorisFactors; alpha: number }

/**
 * Trained LoHa/LoKr layers under LyCORIS' Kohya keys (`lora_unet_<path>.alpha`, `.hada_w1_a`, … / `.lokr_w1`, …), as
 * LyCORIS saves them and A1111/ComfyUI read them; with sgmLayersPerBlock the SDXL names of toKohyaKeys. New handles.
 */
export function lycorisWeightsToKohyaKeys(layers: readonly LycorisWeights[], o: { sgmLayersPerBlock?: number; sdxl?: boolean } = {}): Map<string, Tensor> {
  const out = new Map<string, Tensor>();
  const sdxl = o.sdxl ?? (o.sgmLayersPerBlock !== undefined || layers.some((l) => l.component === 'text_encoder_2'));
  const unetPath = (p: string) => (o.sgmLayersPerBlock === undefined ? p : diffusersToSgmPath(p, o.sgmLayersPerBlock));
  noGrad(() => {
    for (const l of layers) {
      const name = kohyaName(l.component === 'unet' ? unetPath(l.path) : l.path, kohyaPrefix(l.component, sdxl));
      out.set(`${name}.alpha`, torch.scalarTensor(l.alpha, { dtype: 'float32' }));
      for (const [k, t] of Object.entries(l.factors)) out.set(`${name}.${k}`, t.detach());
    }
  });
  return out;
}

/** A LoHa/LoKr entry under its Kohya/LyCORIS keys (alpha, then the factors). New handles, as toKohyaKeys. */
export function lycorisKohyaKeys(entries: readonly LycorisEntry[], sdxl: boolean): Map<string, Tensor> {
  const out = new Map<string, Tensor>();
  noGrad(() => {
    for (const e of entries) {
      const name = kohyaName(e.path, kohyaPrefix(e.component, sdxl));
      out.set(`${name}.alpha`, torch.scalarTensor(e.alpha ?? e.rank, { dtype: 'float32' }));
      for (const [k, t] of Object.entries(e.factors)) out.set(`${name}.${k}`, t.detach());
    }
  });
  return out;
}
