// What LoraLinear and LoraConv2d share: several named adapters on one frozen base layer, as PEFT's LoraLayer.
//
//   y = base_layer(x) + Σ_{a active} lora_B_a(lora_A_a(lora_dropout(x))) · scale · weight_a · alpha_a / rank_a
//
// The first adapter lives in the layer's own lora_A/lora_B fields, so a training adapter has PEFT's
// parameter names (`to_q.lora_A.weight`); further adapters (inference: diffusers' load_lora_weights with
// several adapter names) live under `lora_extra.<name>.lora_A.weight`. Fields holding modules are declared by
// the concrete classes, in PEFT's order (base_layer, lora_dropout, lora_A, lora_B): a base class field would
// come first in the parameter order.
//
// merge() keeps a copy of the base weight, so unmerge() gives back the base bit for bit.
import { noGrad } from '../autograd.js';
import { Module } from '../nn/module.js';
import type { Dropout } from '../nn/layers.js';
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';

/** A layer with a weight and a forward: Linear or Conv2d. */
export type WeightLayer = Module & { weight: Tensor; forward(x: Tensor): Tensor };

/** One further adapter of a LoRA layer: its own A/B, rank and alpha. */
export class LoraBranch extends Module {
  lora_A: WeightLayer;
  lora_B: WeightLayer;
  constructor(a: WeightLayer, b: WeightLayer, readonly rank: number, public alpha: number) {
    super();
    this.lora_A = a;
    this.lora_B = b;
  }
}

/** The further adapters by name; the names are the children's names. */
export class LoraBranches extends Module {
  readonly items = new Map<string, LoraBranch>();
  override namedChildren(): [string, Module][] { return [...this.items]; }
}

/** An adapter of a layer, whichever slot it is in. */
export interface LoraAdapterView { name: string; A: WeightLayer; B: WeightLayer; rank: number; alpha: number }

/** The base weight before merge(), and the adapters merged since. Not a field: it would be in stateDict(). */
const mergedState = new WeakMap<LoraLayer, { original: Tensor; adapters: string[] }>();

export abstract class LoraLayer extends Module {
  abstract base_layer: WeightLayer;
  abstract lora_dropout: Dropout;
  abstract lora_A: WeightLayer;
  abstract lora_B: WeightLayer;
  abstract lora_extra: LoraBranches | null;
  /** Name of the adapter in lora_A/lora_B ('default' for one attached for training). */
  adapterName = 'default';
  /** Rank of the adapter in lora_A/lora_B. */
  rank = 0;
  /** lora_alpha of the adapter in lora_A/lora_B: its branch is scaled by alpha / rank (a Kohya file carries one per layer). */
  alpha = 0;
  /** Run-time multiplier of every adapter (diffusers' cross_attention_kwargs={"scale": s}). */
  scale = 1;
  /** false: the base layer alone (disable_adapters). */
  enabled = true;
  /** The adapters added to the output, in order (PEFT's active_adapters); names this layer lacks are skipped. */
  activeAdapters: string[] = [];
  /** set_adapters weights by adapter name (default 1). */
  readonly adapterWeights = new Map<string, number>();

  /** A fresh (A, B) pair of the given rank for this base layer, in dtype on the base's device. */
  protected abstract createBranch(rank: number, dtype: Tensor['dtype']): [WeightLayer, WeightLayer];

  /** Adapter names, the lora_A/lora_B one first, then in the order they were added. */
  adapterNames(): string[] {
    return [this.adapterName, ...(this.lora_extra?.items.keys() ?? [])];
  }

  adapter(name: string): LoraAdapterView | undefined {
    if (name === this.adapterName) return { name, A: this.lora_A, B: this.lora_B, rank: this.rank, alpha: this.alpha };
    const b = this.lora_extra?.items.get(name);
    return b && { name, A: b.lora_A, B: b.lora_B, rank: b.rank, alpha: b.alpha };
  }

  /** scale · weight · alpha / rank of one adapter. */
  scalingOf(name: string): number {
    const a = this.adapter(name);
    if (!a) throw new Error(`${this.constructor.name}: no adapter '${name}' (has ${this.adapterNames().join(', ')})`);
    return (this.scale * (this.adapterWeights.get(name) ?? 1) * a.alpha) / a.rank;
  }

  /** The factor on the lora_A/lora_B branch: alpha / rank · scale (· its set_adapters weight). */
  get scaling(): number { return this.scalingOf(this.adapterName); }

  get merged(): boolean { return mergedState.has(this); }

  /** The adapters folded into the base weight ([] when not merged). */
  get mergedAdapters(): string[] { return [...(mergedState.get(this)?.adapters ?? [])]; }

  forward(x: Tensor): Tensor {
    // Disabled while merged: take the delta out first, as PEFT does.
    if (!this.enabled && this.merged) this.unmerge();
    const result = this.base_layer.forward(x);
    if (!this.enabled || this.merged) return result;
    let out = result;
    for (const name of this.activeAdapters) {
      const a = this.adapter(name);
      if (!a) continue;
      const s = this.scalingOf(name);
      if (s === 0) continue;
      const loraDtype = a.A.weight.dtype;
      const xl = x.dtype === loraDtype ? x : x.to(loraDtype);
      let delta = a.B.forward(a.A.forward(this.lora_dropout.forward(xl)));
      if (s !== 1) delta = delta.mul(s);
      out = out.add(delta);
    }
    return out.dtype === result.dtype ? out : out.to(result.dtype);
  }

  /** B·A·scaling of one adapter (default: the lora_A/lora_B one), shaped and typed as the base weight (PEFT's get_delta_weight). */
  deltaWeight(name = this.adapterName, factor = 1): Tensor {
    const a = this.adapter(name);
    if (!a) throw new Error(`${this.constructor.name}.deltaWeight: no adapter '${name}'`);
    const s = this.scalingOf(name) * factor;
    const base = this.base_layer.weight;
    return noGrad(() => tidy(() => {
      const [bw, aw] = [a.B.weight, a.A.weight];
      const ba = bw.ndim === 2 && aw.ndim === 2
        ? bw.matmul(aw)
        : bw.reshape([bw.shape[0] as number, a.rank]).matmul(aw.reshape([a.rank, -1])).reshape(base.shape);
      const w = ba.mul(s);
      return w.dtype === base.dtype ? w : w.to(base.dtype);
    }));
  }

  /**
   * Folds adapters (default: the active ones) times loraScale into base_layer.weight; forward then runs the
   * base layer alone. Merging more adapters later adds them; unmerge() restores the weight from before the
   * first merge, bit for bit. A delta holding NaN or inf is an error and nothing is merged.
   */
  merge(adapterNames?: readonly string[], loraScale = 1): void {
    if (!this.enabled) return;
    const state = mergedState.get(this);
    const names = (adapterNames ?? this.activeAdapters).filter((n) => this.adapter(n) && !state?.adapters.includes(n));
    if (!names.length) return;
    tidy(() => noGrad(() => {
      let delta: Tensor | null = null;
      for (const n of names) {
        const d = this.deltaWeight(n, loraScale);
        delta = delta === null ? d : delta.add(d);
      }
      if (!(delta as Tensor).isfinite().all().item()) {
        throw new Error(`${this.constructor.name}.merge: the LoRA delta of ${names.join(', ')} holds NaN or inf; not merged`);
      }
      const w = this.base_layer.weight;
      if (!state) mergedState.set(this, { original: keep(w.detach().clone()), adapters: [] });
      w.add_(delta as Tensor);
    }));
    mergedState.get(this)?.adapters.push(...names);
  }

  /** Puts the base weight from before merge() back, bit for bit. */
  unmerge(): void {
    const state = mergedState.get(this);
    if (!state) return;
    noGrad(() => this.base_layer.weight.copy_(state.original));
    state.original.dispose();
    mergedState.delete(this);
  }

  /** Adds a further adapter (zero B, as a fresh adapter); returns its (A, B) for the caller to fill. */
  addAdapter(name: string, rank: number, alpha: number, dtype: Tensor['dtype'] = this.lora_A.weight.dtype): LoraAdapterView {
    if (this.adapter(name)) throw new Error(`${this.constructor.name}: adapter '${name}' exists already`);
    if (!Number.isInteger(rank) || rank <= 0) throw new RangeError(`${this.constructor.name}: rank must be a positive integer, got ${rank}`);
    const [a, b] = this.createBranch(rank, dtype);
    for (const p of [...a.parameters(), ...b.parameters()]) p.requiresGrad = false;
    this.lora_extra ??= new LoraBranches();
    this.lora_extra.items.set(name, new LoraBranch(a, b, rank, alpha));
    return { name, A: a, B: b, rank, alpha };
  }

  /**
   * Removes one adapter and frees its weights (unmerging first). When it was in lora_A/lora_B, the next
   * adapter moves there. Returns false when the layer has no adapter left (the caller puts base_layer back).
   */
  deleteAdapter(name: string): boolean {
    if (!this.adapter(name)) return true;
    this.unmerge();
    this.adapterWeights.delete(name);
    this.activeAdapters = this.activeAdapters.filter((n) => n !== name);
    if (name !== this.adapterName) {
      const b = this.lora_extra?.items.get(name) as LoraBranch;
      b.dispose();
      this.lora_extra?.items.delete(name);
    } else {
      this.lora_A.dispose();
      this.lora_B.dispose();
      const next = this.lora_extra?.items.entries().next().value as [string, LoraBranch] | undefined;
      if (!next) return false;
      const [n, b] = next;
      this.lora_extra?.items.delete(n);
      this.adapterName = n;
      this.lora_A = b.lora_A;
      this.lora_B = b.lora_B;
      this.rank = b.rank;
      this.alpha = b.alpha;
    }
    if (this.lora_extra && this.lora_extra.items.size === 0) this.lora_extra = null;
    return true;
  }

  /** Frees the base layer, every adapter and the copy merge() kept. */
  override dispose(): void {
    mergedState.get(this)?.original.dispose();
    mergedState.delete(this);
    super.dispose();
  }

  /** Frees every adapter's weights and the copy merge() kept (the layer is unusable afterwards; base_layer is untouched). */
  disposeAdapters(): void {
    const state = mergedState.get(this);
    if (state) {
      state.original.dispose();
      mergedState.delete(this);
    }
    this.lora_A.dispose();
    this.lora_B.dispose();
    this.lora_extra?.dispose();
    this.lora_extra = null;
  }
}
