// Injecting LoRA adapters into a model the way PEFT's `inject_adapter` (diffusers' `unet.add_adapter`) does:
// every Linear whose dotted path equals a target or ends with `.<target>` is replaced in place by a
// LoraLinear wrapping it, and everything that is not LoRA is frozen. With the default targets on a UNet
// these are the to_q/to_k/to_v/to_out.0 projections of every Attention module.
import type { Generator } from '../random.js';
import type { DType } from '../dtype.js';
import { Module } from '../nn/module.js';
import { ModuleList } from '../nn/container.js';
import { Linear } from '../nn/layers.js';
import type { Tensor } from '../tensor.js';
import { LoraLayer } from './lora_layer.js';
import { LoraLinear, type LoraInit } from './lora_linear.js';

export const DEFAULT_TARGET_MODULES: readonly string[] = ['to_q', 'to_k', 'to_v', 'to_out.0'];

export interface LoraConfig {
  rank: number;
  /** lora_alpha (default rank: scaling 1, as train_text_to_image_lora.py). */
  alpha?: number;
  dropout?: number;
  /** PEFT target_modules: a module matches when its path is the target or ends with '.' + target. */
  targetModules?: readonly string[];
  /** Default 'gaussian' (diffusers' training script); 'kaiming' is PEFT's own default. */
  init?: LoraInit;
  /** dtype of the LoRA weights (default float32 whatever the base's dtype). */
  dtype?: DType;
  generator?: Generator;
}

/** What attachLora returns: the injected layers and their parameters under PEFT's names. */
export interface LoraHandle {
  /** [module path, layer] in module order, e.g. ['down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q', …]. */
  readonly layers: [string, LoraLayer][];
  /** The LoRA parameters in PEFT's named_parameters order (module order, A before B), adapter name dropped. */
  namedParameters(): [string, Tensor][];
  parameters(): Tensor[];
}

/** requiresGrad of every parameter before attachLora froze it, for detachLora. */
const frozenBy = new WeakMap<Module, Map<Tensor, boolean>>();

/** PEFT's check_target_module_exists for a list of names. */
export function matchesTarget(path: string, targets: readonly string[]): boolean {
  return targets.some((t) => path === t || path.endsWith(`.${t}`));
}

/** Replaces the child at `path` (relative to root) by `replacement`. */
export function replaceModule(root: Module, path: string, replacement: Module): void {
  const dot = path.lastIndexOf('.');
  const parentPath = dot < 0 ? '' : path.slice(0, dot);
  const name = path.slice(dot + 1);
  const parent = getModule(root, parentPath);
  if (parent instanceof ModuleList) {
    const index = Number(name);
    if (!Number.isInteger(index) || parent.items[index] === undefined) throw new Error(`replaceModule: ${path}: no item ${name} in the ModuleList`);
    parent.items[index] = replacement;
  } else {
    const fields = parent as unknown as Record<string, unknown>;
    if (!(fields[name] instanceof Module)) throw new Error(`replaceModule: ${path}: '${name}' is not a submodule of ${parent.constructor.name}`);
    fields[name] = replacement;
  }
}

/** The submodule at a dotted path ('' = root). */
export function getModule(root: Module, path: string): Module {
  if (path === '') return root;
  const found = root.namedModules().find(([p]) => p === path);
  if (!found) throw new Error(`no module '${path}' in ${root.constructor.name}`);
  return found[1];
}

/** Every LoRA layer (LoraLinear, LoraConv2d) in the model, [path, layer], in module order. */
export function loraLayers(model: Module): [string, LoraLayer][] {
  return model.namedModules().filter((e): e is [string, LoraLayer] => e[1] instanceof LoraLayer);
}

function handleFor(model: Module): LoraHandle {
  const layers = loraLayers(model);
  // each layer's trained adapter: LoRA A/B (DoRA: and its magnitude), or a LoHa/LoKr adapter's factors (lora_layer.ts)
  const named = (): [string, Tensor][] => layers.flatMap(([path, l]) => l.adapterParameters().map(([n, t]): [string, Tensor] => [`${path}.${n}`, t]));
  return { layers, namedParameters: named, parameters: () => named().map(([, t]) => t) };
}

/**
 * PEFT's mark_only_lora_as_trainable after an injection: the handle's parameters train, every other parameter of
 * the model is frozen (the flags from before are kept for detachLora). Returns the handle.
 */
export function markOnlyLoraTrainable(model: Module, flags: Map<Tensor, boolean>): LoraHandle {
  const handle = handleFor(model);
  const lora = new Set(handle.parameters());
  for (const p of model.parameters()) p.requiresGrad = lora.has(p);
  frozenBy.set(model, flags);
  return handle;
}

/** The handle of a model that already carries LoRA layers (e.g. after loadLoraWeights added them). */
export function getLoraHandle(model: Module): LoraHandle {
  return handleFor(model);
}

/**
 * Wraps every Linear matching `targetModules` in a LoraLinear and freezes all other parameters. Throws when
 * nothing matches, when a target names a module that is not a Linear, or when the model already has LoRA.
 */
export function attachLora(model: Module, config: LoraConfig): LoraHandle {
  return attachTo(model, config);
}

function attachTo(model: Module, config: LoraConfig): LoraHandle {
  if (loraLayers(model).length) throw new Error(`attachLora: ${model.constructor.name} already has LoRA layers; call unloadLoraWeights first`);
  const targets = config.targetModules ?? DEFAULT_TARGET_MODULES;
  const modules = model.namedModules();
  const selected = modules.filter(([p]) => p !== '' && matchesTarget(p, targets));
  if (!selected.length) {
    throw new Error(`attachLora: no module of ${model.constructor.name} matches target modules [${targets.join(', ')}]`);
  }
  const notLinear = selected.filter(([, m]) => !(m instanceof Linear));
  if (notLinear.length) {
    throw new Error(`attachLora: target module(s) ${notLinear.map(([p, m]) => `${p} (${m.constructor.name})`).join(', ')} are not Linear layers; LoRA supports Linear only`);
  }
  const flags = new Map<Tensor, boolean>();
  for (const p of model.parameters()) flags.set(p, p.requiresGrad);
  for (const [path, m] of selected) {
    const layer = new LoraLinear(m as Linear, {
      rank: config.rank, alpha: config.alpha, dropout: config.dropout, init: config.init,
      dtype: config.dtype, generator: config.generator,
    });
    replaceModule(model, path, layer);
  }
  return markOnlyLoraTrainable(model, flags);
}

/**
 * Removes every LoRA layer with all its adapters, putting the original Linear/Conv2d objects back (their
 * weights bit for bit: fused layers are unfused first), and restores the requiresGrad flags attachLora changed.
 * Returns the paths. The public name is unloadLoraWeights (adapters.ts).
 */
export function detachLora(model: Module): string[] {
  const layers = loraLayers(model);
  for (const [path, layer] of layers) {
    layer.unmerge();
    replaceModule(model, path, layer.base_layer);
    layer.disposeAdapters();
  }
  const flags = frozenBy.get(model);
  if (flags) {
    for (const p of model.parameters()) {
      const was = flags.get(p);
      if (was !== undefined) p.requiresGrad = was;
    }
    frozenBy.delete(model);
  }
  return layers.map(([p]) => p);
}
