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
// Besides plain LoRA an adapter can be DoRA (a LoRA with a magnitude per output row, PEFT's
// lora_magnitude_vector) or LyCORIS LoHa/LoKr (a LycorisBranch in lora_extra, lycoris.ts); they add up as plain
// adapters do. A layer whose first adapter is LoHa/LoKr has no LoRA in lora_A/lora_B: `vacant`, and its
// lora_A/lora_B are rank-1 zero placeholders no computation reads.
//
// merge() keeps a copy of the base weight, so unmerge() gives back the base bit for bit.
import { noGrad } from '../autograd.js';
import { Module } from '../nn/module.js';
import type { Dropout } from '../nn/layers.js';
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import { LycorisBranch, type LycorisType } from './lycoris.js';

/** A layer with a weight and a forward: Linear or Conv2d. */
export type WeightLayer = Module & { weight: Tensor; forward(x: Tensor): Tensor };

/** One further adapter of a LoRA layer: its own A/B, rank and alpha. */
export class LoraBranch extends Module {
  lora_A: WeightLayer;
  lora_B: WeightLayer;
  /** DoRA's magnitude m, one per output row ([out]); null for plain LoRA. */
  lora_magnitude_vector: Tensor | null = null;
  constructor(a: WeightLayer, b: WeightLayer, readonly rank: number, public alpha: number) {
    super();
    this.lora_A = a;
    this.lora_B = b;
  }
}

/** The further adapters by name; the names are the children's names. */
export class LoraBranches extends Module {
  readonly items = new Map<string, LoraBranch | LycorisBranch>();
  override namedChildren(): [string, Module][] { return [...this.items]; }
}

/** A LoRA (or DoRA) adapter of a layer, whichever slot it is in. */
export interface LoraAdapterView { name: string; A: WeightLayer; B: WeightLayer; rank: number; alpha: number; magnitude: Tensor | null }

/** What kind an adapter is: 'lora', 'dora' (LoRA with a magnitude), 'loha', 'lokr'. */
export type AdapterKind = 'lora' | 'dora' | LycorisType;

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
  /** true: lora_A/lora_B hold no adapter (the layer's adapters are all in lora_extra). */
  vacant = false;
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

  /** DoRA magnitude of the lora_A/lora_B adapter ([out]); null for plain LoRA. Set only by a load. */
  lora_magnitude_vector: Tensor | null = null;

  /** Adapter names, the lora_A/lora_B one first, then in the order they were added. */
  adapterNames(): string[] {
    return [...(this.vacant ? [] : [this.adapterName]), ...(this.lora_extra?.items.keys() ?? [])];
  }

  /** The LoRA/DoRA adapter of that name (undefined for a LoHa/LoKr one: lycorisAdapter). */
  adapter(name: string): LoraAdapterView | undefined {
    if (name === this.adapterName && !this.vacant) return { name, A: this.lora_A, B: this.lora_B, rank: this.rank, alpha: this.alpha, magnitude: this.lora_magnitude_vector };
    const b = this.lora_extra?.items.get(name);
    return b instanceof LoraBranch ? { name, A: b.lora_A, B: b.lora_B, rank: b.rank, alpha: b.alpha, magnitude: b.lora_magnitude_vector } : undefined;
  }

  /** The LoHa/LoKr adapter of that name. */
  lycorisAdapter(name: string): LycorisBranch | undefined {
    const b = this.lora_extra?.items.get(name);
    return b instanceof LycorisBranch ? b : undefined;
  }

  /**
   * The trained (first) adapter's parameters under PEFT's names with the adapter name dropped, relative to the layer:
   * LoRA `lora_A.weight`, `lora_B.weight` (DoRA + `lora_magnitude_vector`); a layer whose lora_A/lora_B are vacant
   * gives its first LoHa/LoKr adapter's factors (`hada_w1_a`, …, `lokr_w1`, …) in PEFT's parameter order.
   */
  adapterParameters(): [string, Tensor][] {
    if (!this.vacant) {
      const out: [string, Tensor][] = [['lora_A.weight', this.lora_A.weight], ['lora_B.weight', this.lora_B.weight]];
      if (this.lora_magnitude_vector) out.push(['lora_magnitude_vector', this.lora_magnitude_vector]);
      return out;
    }
    const first = [...(this.lora_extra?.items.values() ?? [])][0];
    if (!(first instanceof LycorisBranch)) return [];
    const f = first.factors;
    return first.factorOrder().map((n): [string, Tensor] => [n, f[n] as Tensor]);
  }

  hasAdapter(name: string): boolean { return this.adapter(name) !== undefined || this.lycorisAdapter(name) !== undefined; }

  /** The kind of an adapter; undefined when the layer has none of that name. */
  adapterKind(name: string): AdapterKind | undefined {
    const a = this.adapter(name);
    if (a) return a.magnitude ? 'dora' : 'lora';
    return this.lycorisAdapter(name)?.type;
  }

  /** scale · weight · alpha / rank of one adapter. */
  scalingOf(name: string): number {
    const a = this.adapter(name) ?? this.lycorisAdapter(name);
    if (!a) throw new Error(`${this.constructor.name}: no adapter '${name}' (has ${this.adapterNames().join(', ')})`);
    return (this.scale * (this.adapterWeights.get(name) ?? 1) * a.alpha) / a.rank;
  }

  /** x through the base layer's operation with another weight and no bias (F.linear / F.conv2d with its stride…). */
  protected abstract applyWeight(x: Tensor, weight: Tensor): Tensor;

  /** The factor on the lora_A/lora_B branch: alpha / rank · scale (· its set_adapters weight). */
  get scaling(): number { return this.scalingOf(this.adapterName); }

  get merged(): boolean { return mergedState.has(this); }

  /** The adapters folded into the base weight ([] when not merged). */
  get mergedAdapters(): string[] { return [...(mergedState.get(this)?.adapters ?? [])]; }

  /** The layer's output by one fused operator when its case allows (LoraLinear: one plain LoRA adapter), else null. */
  protected fusedForward(_x: Tensor): Tensor | null { return null; }

  forward(x: Tensor): Tensor {
    // Disabled while merged: take the delta out first, as PEFT does.
    if (!this.enabled && this.merged) this.unmerge();
    const fused = this.enabled && !this.merged ? this.fusedForward(x) : null;
    if (fused) return fused;
    const result = this.base_layer.forward(x);
    if (!this.enabled || this.merged) return result;
    let out = result;
    for (const name of this.activeAdapters) {
      const ly = this.lycorisAdapter(name);
      const a = this.adapter(name);
      if (!a && !ly) continue;
      const s = this.scalingOf(name);
      if (s === 0 && !a?.magnitude) continue;
      const adapterDtype = a ? a.A.weight.dtype : ((ly as LycorisBranch).parameters()[0] as Tensor).dtype;
      const xl = x.dtype === adapterDtype ? x : x.to(adapterDtype);
      if (ly) {
        // PEFT's LoHa/LoKr: base(x) + F.linear(x, ΔW) (F.conv2d for a conv)
        out = out.add(this.applyWeight(xl, ly.delta(s, this.base_layer.weight.shape)));
        continue;
      }
      const lora = a as LoraAdapterView;
      const xd = this.lora_dropout.forward(xl);
      let delta = lora.B.forward(lora.A.forward(xd));
      if (lora.magnitude) {
        // PEFT's DoRA: (m/‖V‖ − 1)·(x Wᵀ) + (m/‖V‖)·s·B A x, V = W + s·B A, ‖V‖ per output row and detached
        const w = this.base_layer.weight.detach();
        const wl = w.dtype === adapterDtype ? w : w.to(adapterDtype);
        const f = this.doraFactor(lora, s, wl);
        const shape = wl.ndim === 4 ? [1, -1, 1, 1] : [-1];
        const fv = f.reshape(shape);
        out = out.add(fv.sub(1).mul(this.applyWeight(xd, wl)).add(fv.mul(delta).mul(s)));
        continue;
      }
      if (s !== 1) delta = delta.mul(s);
      out = out.add(delta);
    }
    return out.dtype === result.dtype ? out : out.to(result.dtype);
  }

  /** B·A of a LoRA adapter, unscaled, shaped as the base weight. */
  private loraProduct(a: LoraAdapterView, shape: readonly number[]): Tensor {
    const [bw, aw] = [a.B.weight, a.A.weight];
    return bw.ndim === 2 && aw.ndim === 2
      ? bw.matmul(aw)
      : bw.reshape([bw.shape[0] as number, a.rank]).matmul(aw.reshape([a.rank, -1])).reshape([...shape]);
  }

  /**
   * DoRA's m / ‖w + s·B A‖ per output row ([out]): the norm detached (PEFT's get_weight_norm(...).detach()), so the
   * gradient reaches m through the numerator and A/B only through the LoRA term, as in PEFT.
   */
  private doraFactor(a: LoraAdapterView, s: number, w: Tensor): Tensor {
    const norm = noGrad(() => tidy(() => {
      const v = w.add(this.loraProduct(a, w.shape).detach().mul(s));
      return v.ndim === 4 ? v.norm(2, [1, 2, 3]) : v.norm(2, 1);
    }));
    try {
      return (a.magnitude as Tensor).reshape([-1]).div(norm);
    } finally {
      norm.dispose();
    }
  }

  /**
   * B·A·scaling of one adapter (default: the lora_A/lora_B one), shaped and typed as the base weight (PEFT's
   * get_delta_weight); LoHa/LoKr: their ΔW·scaling. For DoRA this is the LoRA part alone (merge() applies the magnitude).
   */
  deltaWeight(name = this.adapterName, factor = 1): Tensor {
    const a = this.adapter(name);
    const ly = this.lycorisAdapter(name);
    if (!a && !ly) throw new Error(`${this.constructor.name}.deltaWeight: no adapter '${name}'`);
    const s = this.scalingOf(name) * factor;
    const base = this.base_layer.weight;
    return noGrad(() => tidy(() => {
      const w = ly ? ly.delta(s, base.shape) : this.loraProduct(a as LoraAdapterView, base.shape).mul(s);
      return w.dtype === base.dtype ? w : w.to(base.dtype);
    }));
  }

  /**
   * The weight after merging one adapter into `w`: w + ΔW; for DoRA w + (m/‖V‖)·V − W, V = W + s·B A over the
   * base weight W from before any merge, which is what the adapter adds at run time (a DoRA adapter alone:
   * PEFT's merge, (m/‖V‖)·V).
   */
  private mergedWeight(w: Tensor, base: Tensor, name: string, loraScale: number): Tensor {
    const delta = this.deltaWeight(name, loraScale);
    const a = this.adapter(name);
    if (!a?.magnitude) return w.add(delta);
    const v = base.add(delta);
    const norm = v.ndim === 4 ? v.norm(2, [1, 2, 3]) : v.norm(2, 1);
    const f = a.magnitude.reshape([-1]).to(v.dtype).div(norm);
    const dora = v.mul(f.reshape(v.ndim === 4 ? [-1, 1, 1, 1] : [-1, 1]));
    return w === base ? dora : w.add(dora).sub(base);
  }

  /**
   * Folds adapters (default: the active ones) times loraScale into base_layer.weight; forward then runs the
   * base layer alone. Merging more adapters later adds them; unmerge() restores the weight from before the
   * first merge, bit for bit. A delta holding NaN or inf is an error and nothing is merged.
   */
  merge(adapterNames?: readonly string[], loraScale = 1): void {
    if (!this.enabled) return;
    const state = mergedState.get(this);
    const names = (adapterNames ?? this.activeAdapters).filter((n) => this.hasAdapter(n) && !state?.adapters.includes(n));
    if (!names.length) return;
    tidy(() => noGrad(() => {
      // one adapter after the other, each adding what it adds at run time
      const w = this.base_layer.weight;
      const base = state?.original ?? w.detach();
      let merged = state ? w.detach() : base;
      for (const n of names) merged = this.mergedWeight(merged, base, n, loraScale);
      if (!merged.isfinite().all().item()) {
        throw new Error(`${this.constructor.name}.merge: the LoRA delta of ${names.join(', ')} holds NaN or inf; not merged`);
      }
      if (!state) mergedState.set(this, { original: keep(w.detach().clone()), adapters: [] });
      w.copy_(merged);
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
    if (this.hasAdapter(name)) throw new Error(`${this.constructor.name}: adapter '${name}' exists already`);
    if (!Number.isInteger(rank) || rank <= 0) throw new RangeError(`${this.constructor.name}: rank must be a positive integer, got ${rank}`);
    const [a, b] = this.createBranch(rank, dtype);
    for (const p of [...a.parameters(), ...b.parameters()]) p.requiresGrad = false;
    this.lora_extra ??= new LoraBranches();
    this.lora_extra.items.set(name, new LoraBranch(a, b, rank, alpha));
    return { name, A: a, B: b, rank, alpha, magnitude: null };
  }

  /** Sets a LoRA adapter's DoRA magnitude (a tensor the layer owns from now on), making it a DoRA adapter. */
  setMagnitude(name: string, magnitude: Tensor): void {
    if (name === this.adapterName && !this.vacant) {
      this.lora_magnitude_vector?.dispose();
      this.lora_magnitude_vector = magnitude;
      return;
    }
    const b = this.lora_extra?.items.get(name);
    if (!(b instanceof LoraBranch)) throw new Error(`${this.constructor.name}: no LoRA adapter '${name}' to give a DoRA magnitude`);
    b.lora_magnitude_vector?.dispose();
    b.lora_magnitude_vector = magnitude;
  }

  /** Adds a LoHa/LoKr adapter (the branch's tensors are the layer's from now on). */
  addLycorisAdapter(name: string, branch: LycorisBranch): void {
    if (this.hasAdapter(name)) throw new Error(`${this.constructor.name}: adapter '${name}' exists already`);
    this.lora_extra ??= new LoraBranches();
    this.lora_extra.items.set(name, branch);
  }

  /**
   * Removes one adapter and frees its weights (unmerging first). When it was in lora_A/lora_B, the next
   * adapter moves there. Returns false when the layer has no adapter left (the caller puts base_layer back).
   */
  deleteAdapter(name: string): boolean {
    if (!this.hasAdapter(name)) return true;
    this.unmerge();
    this.adapterWeights.delete(name);
    this.activeAdapters = this.activeAdapters.filter((n) => n !== name);
    if (name !== this.adapterName || this.vacant) {
      this.lora_extra?.items.get(name)?.dispose();
      this.lora_extra?.items.delete(name);
    } else {
      this.lora_A.dispose();
      this.lora_B.dispose();
      this.lora_magnitude_vector?.dispose();
      this.lora_magnitude_vector = null;
      const next = [...(this.lora_extra?.items ?? [])].find((e): e is [string, LoraBranch] => e[1] instanceof LoraBranch);
      if (next) {
        const [n, b] = next;
        this.lora_extra?.items.delete(n);
        this.adapterName = n;
        this.lora_A = b.lora_A;
        this.lora_B = b.lora_B;
        this.lora_magnitude_vector = b.lora_magnitude_vector;
        this.rank = b.rank;
        this.alpha = b.alpha;
      } else {
        // only LoHa/LoKr adapters left (or none): lora_A/lora_B become placeholders
        [this.lora_A, this.lora_B] = this.createBranch(1, 'float32');
        this.vacant = true;
      }
    }
    if (this.lora_extra && this.lora_extra.items.size === 0) this.lora_extra = null;
    return this.adapterNames().length > 0;
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
    this.lora_magnitude_vector?.dispose();
    this.lora_magnitude_vector = null;
    this.lora_extra?.dispose();
    this.lora_extra = null;
  }
}
