// Trainable LoRA variants, injected as PEFT's inject_adapter does (attach.ts) with one of five adapter types:
//
//   lora   y = W x + s·B A x                                   (PEFT LoraConfig; A gaussian/kaiming, B = 0)
//   locon  lora, plus the UNet's convs (Kohya's / LyCORIS' LoCon: ResNet conv1/conv2/conv_shortcut, the
//          transformers' proj_in/proj_out, the down/upsamplers' conv): A a k×k conv to r channels, B a 1×1 conv
//   dora   W' = m/‖W + s·B A‖_row · (W + s·B A), m initialised to ‖W‖_row (PEFT use_dora; the norm is detached)
//   loha   ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · α/r             (PEFT LoHaConfig; w2_b = 0, the rest kaiming)
//   lokr   ΔW = kron(w1, w2_a @ w2_b or w2) · α/r (1 when w2 is full, as LyCORIS)   (PEFT LoKrConfig; w1 = 0)
//
// s = α/r. A k×k conv (k > 1) gets the conv rank and alpha (--conv_rank/--conv_alpha), a Linear or 1×1 conv the
// linear ones, as Kohya's networks/lora.py and LyCORIS do. Parameters are float32 whatever the frozen weights' dtype.
// The forward passes and merges are lora_layer.ts's (the same code that runs loaded LoHa/LoKr/DoRA files).
import { noGrad } from '../autograd.js';
import type { DType } from '../dtype.js';
import { Conv2d, Linear } from '../nn/layers.js';
import { parameter, type Module } from '../nn/module.js';
import type { Generator } from '../random.js';
import { tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import { DEFAULT_TARGET_MODULES, loraLayers, markOnlyLoraTrainable, matchesTarget, replaceModule, type LoraHandle } from './attach.js';
import { LoraConv2d } from './lora_conv2d.js';
import type { LoraLayer } from './lora_layer.js';
import { LoraLinear, type LoraInit } from './lora_linear.js';
import { LycorisBranch, type LycorisFactors } from './lycoris.js';

export const LORA_TYPES = ['lora', 'locon', 'loha', 'lokr', 'dora'] as const;
export type LoraType = (typeof LORA_TYPES)[number];

/** The modules LoCon adds on a diffusers UNet: ResNet convs, the transformers' proj_in/proj_out, the resamplers' convs. */
export const LOCON_TARGET_MODULES: readonly string[] = ['conv1', 'conv2', 'conv_shortcut', 'proj_in', 'proj_out', 'downsamplers.0.conv', 'upsamplers.0.conv'];

/** The adapter name of the trained adapter (PEFT's default). */
const ADAPTER = 'default';

export interface LoraVariantConfig {
  type: LoraType;
  /** Rank of Linear and 1×1 conv adapters. */
  rank: number;
  /** Their alpha (default rank). */
  alpha?: number;
  /** Module-name suffixes of the adapted layers (PEFT target_modules; default the scripts' four projections). */
  targetModules?: readonly string[];
  /** Rank of k×k conv adapters (default rank); given with loha/lokr/dora it adds the LoCon convs too. */
  convRank?: number | null;
  /** Their alpha (default convRank). */
  convAlpha?: number | null;
  /** The extra (conv) targets of locon; default LOCON_TARGET_MODULES. */
  convTargetModules?: readonly string[];
  /** LoRA/DoRA A init (default 'gaussian', the scripts'). */
  init?: LoraInit;
  /** LoKr's factor of the dimensions (LyCORIS' factor; -1: the most balanced split). */
  lokrFactor?: number;
  dtype?: DType;
  generator?: Generator;
}

/** One layer an adapter goes on, with its rank and alpha. */
export interface VariantTarget { path: string; layer: Linear | Conv2d; rank: number; alpha: number; conv: boolean }

/** Whether the LoCon convs are adapted: always with locon, with loha/lokr/dora when a conv rank is given. */
export function adaptsConvs(c: Pick<LoraVariantConfig, 'type' | 'convRank'>): boolean {
  return c.type === 'locon' || (c.type !== 'lora' && c.convRank !== undefined && c.convRank !== null);
}

const isKxK = (m: Linear | Conv2d): boolean => m instanceof Conv2d && m.kernelSize > 1;

/**
 * The layers a config adapts in `model`, in module order, and the problems: target names that match nothing
 * (`checkNames`: the user's own list), matches that are not Linear/Conv2d, ranks a layer cannot hold. `names` says
 * how messages name the options (flags or library options).
 */
export function variantTargets(
  model: Module, c: LoraVariantConfig, o: { checkNames?: boolean; names?: { targets: string; rank: string; convRank: string } } = {},
): { targets: VariantTarget[]; problems: string[] } {
  const names = o.names ?? { targets: 'targetModules', rank: 'rank', convRank: 'convRank' };
  const linearTargets = c.targetModules ?? DEFAULT_TARGET_MODULES;
  const convTargets = adaptsConvs(c) ? c.convTargetModules ?? LOCON_TARGET_MODULES : [];
  const alpha = c.alpha ?? c.rank;
  const convRank = c.convRank ?? c.rank;
  const convAlpha = c.convAlpha ?? convRank;
  const problems: string[] = [];
  const targets: VariantTarget[] = [];
  const wrong: string[] = [];
  for (const [path, m] of model.namedModules()) {
    if (path === '') continue;
    const linear = matchesTarget(path, linearTargets);
    const conv = !linear && matchesTarget(path, convTargets);
    if (!linear && !conv) continue;
    if (!(m instanceof Linear) && !(m instanceof Conv2d)) {
      if (linear) wrong.push(`${path} (${m.constructor.name})`);
      continue; // a LoCon name on another module (none in diffusers' UNets): not adapted
    }
    if (m instanceof Conv2d && m.groups !== 1) {
      wrong.push(`${path} (a grouped Conv2d)`);
      continue;
    }
    const kxk = isKxK(m);
    targets.push({ path, layer: m, rank: kxk ? convRank : c.rank, alpha: kxk ? convAlpha : alpha, conv: m instanceof Conv2d });
  }
  if (wrong.length) problems.push(`${names.targets}: ${wrong.join(', ')} ${wrong.length === 1 ? 'is not a Linear or Conv2d layer' : 'are not Linear or Conv2d layers'}; LoRA adapts Linear and Conv2d layers only`);
  if (o.checkNames) {
    const all = model.namedModules().map(([p]) => p).filter((p) => p !== '');
    const none = linearTargets.filter((t) => !all.some((p) => matchesTarget(p, [t])));
    if (none.length) problems.push(`${names.targets}: ${none.map((n) => `'${n}'`).join(', ')} ${none.length === 1 ? 'matches' : 'match'} no module of the ${model.constructor.name} (module names end with e.g. to_q, to_k, to_v, to_out.0, proj_in, ff.net.2)`);
  }
  if (!targets.length && !problems.length) problems.push(`${names.targets}: no layer of the ${model.constructor.name} matches [${linearTargets.join(', ')}]`);
  // B·A (and a LoHa's factors) have rank at most min(out, in·kh·kw): a larger rank adds only memory. LoKr's w2 turns full instead.
  if (c.type !== 'lokr') {
    for (const kxk of [false, true]) {
      const group = targets.filter((t) => isKxK(t.layer) === kxk);
      let smallest: { t: VariantTarget; size: number } | undefined;
      for (const t of group) {
        const [out, inFlat] = dims(t.layer);
        const size = Math.min(out, inFlat);
        if (!smallest || size < smallest.size) smallest = { t, size };
      }
      const rank = group[0]?.rank;
      if (smallest && rank !== undefined && rank > smallest.size) {
        const l = smallest.t.layer;
        const what = l instanceof Linear ? `Linear ${l.inFeatures} → ${l.outFeatures}` : `Conv2d ${l.inChannels} → ${l.outChannels}, ${l.kernelSize}×${l.kernelSize}`;
        const flag = kxk ? names.convRank : names.rank;
        problems.push(`${flag} ${rank} is larger than the smallest layer LoRA adapts, ${smallest.t.path} (${what}): ${flag} must be at most ${smallest.size} for this model`);
      }
    }
  }
  return { targets, problems };
}

/** [out, in·kh·kw] of a layer's weight. */
function dims(m: Linear | Conv2d): [number, number] {
  return m instanceof Linear ? [m.outFeatures, m.inFeatures] : [m.outChannels, m.inChannels * m.kernelSize * m.kernelSize];
}

/** LyCORIS' / PEFT's factorization(dimension, factor): dimension = m·n with m ≤ n, m ≤ factor, m + n smallest. */
export function factorization(dimension: number, factor = -1): [number, number] {
  if (factor > 0 && dimension % factor === 0) {
    const [m, n] = [factor, dimension / factor];
    return m > n ? [n, m] : [m, n];
  }
  const limit = factor === -1 ? dimension : factor;
  let [m, n] = [1, dimension];
  const length = m + n;
  while (m < n) {
    let next = m + 1;
    while (dimension % next !== 0) next++;
    const nextN = dimension / next;
    if (next + nextN > length || next > limit) break;
    [m, n] = [next, nextN];
  }
  return m > n ? [n, m] : [m, n];
}

/** kaiming_uniform_(a=√5) of a tensor: U(±1/√fan_in), fan_in = size(1)·receptive field. */
function kaimingUniform(t: Tensor, generator?: Generator): void {
  const fanIn = t.shape.slice(1).reduce((a, b) => a * b, 1);
  const bound = 1 / Math.sqrt(fanIn);
  t.uniform_(-bound, bound, generator);
}

/** A trainable float32 factor, kaiming-uniform or zero, on `device`. */
function factor(shape: number[], init: 'kaiming' | 'zero', device: string, dtype: DType, generator?: Generator): Tensor {
  const t = torch.zeros(shape, { dtype, device });
  if (init === 'kaiming') kaimingUniform(t, generator);
  return parameter(t);
}

/** PEFT's LoHa factors for a layer (update_layer + reset_adapter_parameters): w1_a, w1_b, w2_a kaiming, w2_b = 0. */
export function lohaFactors(layer: Linear | Conv2d, rank: number, dtype: DType = 'float32', generator?: Generator): LycorisFactors {
  const [out, inFlat] = dims(layer);
  const device = layer.weight.device;
  return noGrad(() => ({
    hada_w1_a: factor([out, rank], 'kaiming', device, dtype, generator),
    hada_w1_b: factor([rank, inFlat], 'kaiming', device, dtype, generator),
    hada_w2_a: factor([out, rank], 'kaiming', device, dtype, generator),
    hada_w2_b: factor([rank, inFlat], 'zero', device, dtype, generator),
  }));
}

/**
 * PEFT's LoKr factors for a layer (decompose_both false, no Tucker): out = a·b, in = c·d by factorization; w1 [a, c]
 * full and zero; w2 [b, d(, k, k)] full (kaiming) when rank ≥ max(b, d)/2, else w2_a [b, r] @ w2_b [r, d·k·k] (kaiming).
 * `full`: whether w2 is full (the scale is then 1).
 */
export function lokrFactors(layer: Linear | Conv2d, rank: number, lokrFactor = -1, dtype: DType = 'float32', generator?: Generator): { factors: LycorisFactors; full: boolean } {
  const [inDim, outDim] = layer instanceof Linear ? [layer.inFeatures, layer.outFeatures] : [layer.inChannels, layer.outChannels];
  const k = layer instanceof Conv2d ? layer.kernelSize : 1;
  const [inM, inN] = factorization(inDim, lokrFactor);
  const [outL, outK] = factorization(outDim, lokrFactor);
  const full = !(rank < Math.max(outK, inN) / 2);
  const device = layer.weight.device;
  return noGrad(() => {
    const f: LycorisFactors = { lokr_w1: factor([outL, inM], 'zero', device, dtype, generator) };
    if (full) f.lokr_w2 = factor(layer instanceof Conv2d ? [outK, inN, k, k] : [outK, inN], 'kaiming', device, dtype, generator);
    else {
      f.lokr_w2_a = factor([outK, rank], 'kaiming', device, dtype, generator);
      f.lokr_w2_b = factor([rank, inN * k * k], 'kaiming', device, dtype, generator);
    }
    return { factors: f, full };
  });
}

/** DoRA's magnitude at the start: ‖W‖ per output row in float32 ([out]), a trainable parameter. */
function initialMagnitude(layer: LoraLayer): Tensor {
  return noGrad(() => {
    const w = layer.base_layer.weight;
    const m = tidy(() => {
      const w32 = w.to('float32');
      return w32.ndim === 4 ? w32.norm(2, [1, 2, 3]) : w32.norm(2, 1);
    });
    return parameter(m);
  });
}

/** The adapter layer for one target. */
function adapterLayer(t: VariantTarget, c: LoraVariantConfig): LoraLayer {
  const dtype = c.dtype ?? 'float32';
  const init = c.init ?? 'gaussian';
  if (c.type === 'loha' || c.type === 'lokr') {
    // a LoRA layer whose lora_A/lora_B are vacant (rank-1 placeholders no computation reads), the factors in lora_extra
    const o = { rank: 1, alpha: 1, adapterName: '' };
    const layer = t.layer instanceof Linear ? new LoraLinear(t.layer, { ...o, init: 'gaussian' as const }) : new LoraConv2d(t.layer, o);
    layer.vacant = true;
    layer.activeAdapters = [ADAPTER];
    let branch: LycorisBranch;
    if (c.type === 'loha') branch = new LycorisBranch('loha', lohaFactors(t.layer, t.rank, dtype, c.generator), t.rank, t.alpha);
    else {
      const { factors, full } = lokrFactors(t.layer, t.rank, c.lokrFactor ?? -1, dtype, c.generator);
      branch = new LycorisBranch('lokr', factors, t.rank, full ? t.rank : t.alpha); // both factors full: scale 1 (LyCORIS)
    }
    layer.addLycorisAdapter(ADAPTER, branch);
    return layer;
  }
  const layer = t.layer instanceof Linear
    ? new LoraLinear(t.layer, { rank: t.rank, alpha: t.alpha, init, dtype, generator: c.generator })
    : new LoraConv2d(t.layer, { rank: t.rank, alpha: t.alpha, dtype });
  if (layer instanceof LoraConv2d) layer.resetLoraParameters(init, c.generator);
  if (c.type === 'dora') layer.setMagnitude(layer.adapterName, initialMagnitude(layer));
  return layer;
}

/**
 * Injects trainable adapters of `c.type` into `model` (in module order, each initialised as PEFT does) and freezes
 * everything else. Throws a RangeError listing the problems (variantTargets) before changing anything.
 */
export function attachLoraVariant(model: Module, c: LoraVariantConfig, o: Parameters<typeof variantTargets>[2] = {}): LoraHandle {
  if (!(LORA_TYPES as readonly string[]).includes(c.type)) throw new RangeError(`attachLoraVariant: unknown LoRA type '${String(c.type)}' (expected one of ${LORA_TYPES.join(', ')})`);
  if (loraLayers(model).length) throw new Error(`attachLoraVariant: ${model.constructor.name} already has LoRA layers; call unloadLoraWeights first`);
  const { targets, problems } = variantTargets(model, c, o);
  if (problems.length) throw new RangeError(problems.length === 1 ? problems[0] : `${problems.length} problems:\n  - ${problems.join('\n  - ')}`);
  const flags = new Map<Tensor, boolean>();
  for (const p of model.parameters()) flags.set(p, p.requiresGrad);
  for (const t of targets) replaceModule(model, t.path, adapterLayer(t, c));
  return markOnlyLoraTrainable(model, flags);
}

/** The kind of a layer's trained adapter: 'lora' (also LoCon), 'dora', 'loha', 'lokr'. */
export function trainedAdapterKind(layer: LoraLayer): 'lora' | 'dora' | 'loha' | 'lokr' {
  if (!layer.vacant) return layer.lora_magnitude_vector ? 'dora' : 'lora';
  const first = [...(layer.lora_extra?.items.values() ?? [])][0];
  if (first instanceof LycorisBranch) return first.type;
  throw new Error(`internal: a vacant LoRA layer without a LoHa/LoKr adapter`);
}

/** A layer's trained LoHa/LoKr adapter (the first in lora_extra of a vacant layer), or undefined. */
export function trainedLycoris(layer: LoraLayer): LycorisBranch | undefined {
  if (!layer.vacant) return undefined;
  const first = [...(layer.lora_extra?.items.values() ?? [])][0];
  return first instanceof LycorisBranch ? first : undefined;
}

