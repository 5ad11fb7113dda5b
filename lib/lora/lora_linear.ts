// A LoRA adapter around a frozen Linear, laid out as PEFT's `lora.Linear` so parameter names are PEFT's
// (`to_q.base_layer.weight`, `to_q.lora_A.weight`, `to_q.lora_B.weight`, adapter name dropped):
//
//   y = base_layer(x) + lora_B(lora_A(lora_dropout(x))) · scale · alpha / rank
//
// The LoRA weights are kept in their own dtype (float32 by default) whatever the base's: the input is cast
// to it and the sum back to the base output's dtype, as PEFT does outside autocast. Under autocast the
// matmuls run in the autocast dtype and the gradients still land on the fp32 weights.
import { noGrad } from '../autograd.js';
import type { DType } from '../dtype.js';
import type { Generator } from '../random.js';
import { Module } from '../nn/module.js';
import { Dropout, Linear } from '../nn/layers.js';
import { tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';

/**
 * 'gaussian': A ~ N(0, (1/rank)²) (PEFT's init_lora_weights="gaussian", what diffusers' training script
 * uses); 'kaiming': A ~ kaiming_uniform(a=√5) = U(±1/√in) (PEFT's default, as Kohya's sd-scripts).
 * B = 0 in both, so a fresh adapter leaves the output unchanged.
 */
export type LoraInit = 'gaussian' | 'kaiming';

export interface LoraLinearOptions {
  rank: number;
  /** lora_alpha; default rank (scaling 1). */
  alpha?: number;
  /** Dropout on the LoRA branch's input (default 0: none). */
  dropout?: number;
  init?: LoraInit;
  /** dtype of lora_A/lora_B (default float32, even for a half-precision base). */
  dtype?: DType;
  generator?: Generator;
}

export class LoraLinear extends Module {
  base_layer: Linear;
  lora_dropout: Dropout;
  lora_A: Linear;
  lora_B: Linear;
  readonly rank: number;
  /** lora_alpha: the branch is scaled by alpha / rank (settable: a Kohya file carries one per layer). */
  alpha: number;
  /** Run-time multiplier (diffusers' cross_attention_kwargs={"scale": s}, set_adapters weights). */
  scale = 1;
  /** false: the base layer alone (disable_adapters). */
  enabled = true;
  /** The scaling folded into base_layer.weight by merge(), or null when not merged. */
  private mergedScaling: number | null = null;

  constructor(base: Linear, o: LoraLinearOptions) {
    super();
    if (!Number.isInteger(o.rank) || o.rank <= 0) throw new RangeError(`LoraLinear: rank must be a positive integer, got ${o.rank}`);
    this.rank = o.rank;
    this.alpha = o.alpha ?? o.rank;
    this.base_layer = base;
    this.lora_dropout = new Dropout(o.dropout ?? 0);
    this.lora_dropout.training = base.training;
    const device = base.weight.device;
    const dtype = o.dtype ?? 'float32';
    // As PEFT: two default-initialised nn.Linear, then reset_lora_parameters re-draws A and zeroes B (the
    // same draws in the same order, so a seeded CPU run reproduces PEFT's initial A).
    this.lora_A = new Linear(base.inFeatures, o.rank, false, { dtype, device });
    this.lora_B = new Linear(o.rank, base.outFeatures, false, { dtype, device });
    this.training = base.training;
    this.resetLoraParameters(o.init ?? 'gaussian', o.generator);
  }

  get inFeatures(): number { return this.base_layer.inFeatures; }
  get outFeatures(): number { return this.base_layer.outFeatures; }

  /** alpha / rank · scale: the factor on the LoRA branch. */
  get scaling(): number { return (this.scale * this.alpha) / this.rank; }

  get merged(): boolean { return this.mergedScaling !== null; }

  resetLoraParameters(init: LoraInit, generator?: Generator): void {
    noGrad(() => {
      if (init === 'gaussian') this.lora_A.weight.normal_(0, 1 / this.rank, generator);
      else if (init === 'kaiming') {
        // kaiming_uniform_(a=√5): gain √(2/(1+5)), bound gain·√(3/fan_in) = 1/√fan_in
        const bound = Math.sqrt(2 / 6) * Math.sqrt(3 / this.inFeatures);
        this.lora_A.weight.uniform_(-bound, bound, generator);
      } else throw new TypeError(`LoraLinear: unknown init '${String(init)}' (expected 'gaussian' or 'kaiming')`);
      this.lora_B.weight.zero_();
    });
  }

  forward(x: Tensor): Tensor {
    // Disabled while merged: take the delta out first, as PEFT does.
    if (!this.enabled && this.merged) this.unmerge();
    const result = this.base_layer.forward(x);
    if (!this.enabled || this.merged) return result;
    const s = this.scaling;
    if (s === 0) return result;
    const loraDtype = this.lora_A.weight.dtype;
    const xl = x.dtype === loraDtype ? x : x.to(loraDtype);
    let delta = this.lora_B.forward(this.lora_A.forward(this.lora_dropout.forward(xl)));
    if (s !== 1) delta = delta.mul(s);
    const out = result.add(delta);
    return out.dtype === result.dtype ? out : out.to(result.dtype);
  }

  /** B·A·scaling, [out, in], in the base weight's dtype (PEFT's get_delta_weight). */
  deltaWeight(): Tensor {
    return noGrad(() => tidy(() => {
      const w = this.lora_B.weight.matmul(this.lora_A.weight).mul(this.scaling);
      return w.dtype === this.base_layer.weight.dtype ? w : w.to(this.base_layer.weight.dtype);
    }));
  }

  /**
   * Folds the branch into base_layer.weight (faster inference; forward then skips the branch). The
   * current scale is used; unmerge() subtracts the same amount (exact up to rounding, as PEFT).
   */
  merge(): void {
    if (this.merged || !this.enabled) return;
    const s = this.scaling;
    tidy(() => noGrad(() => {
      const delta = this.deltaWeight();
      if (!delta.isfinite().all().item()) throw new Error('LoraLinear.merge: the LoRA delta holds NaN or inf; not merged');
      this.base_layer.weight.add_(delta);
    }));
    this.mergedScaling = s;
  }

  unmerge(): void {
    const s = this.mergedScaling;
    if (s === null) return;
    tidy(() => noGrad(() => {
      const w = this.lora_B.weight.matmul(this.lora_A.weight).mul(s);
      this.base_layer.weight.sub_(w.dtype === this.base_layer.weight.dtype ? w : w.to(this.base_layer.weight.dtype));
    }));
    this.mergedScaling = null;
  }
}
