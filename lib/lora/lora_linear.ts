// A LoRA adapter around a frozen Linear, laid out as PEFT's `lora.Linear` so parameter names are PEFT's
// (`to_q.base_layer.weight`, `to_q.lora_A.weight`, `to_q.lora_B.weight`, adapter name dropped):
//
//   y = base_layer(x) + lora_B(lora_A(lora_dropout(x))) · scale · alpha / rank
//
// Further named adapters, their weights, merging: lora_layer.ts.
// The LoRA weights are kept in their own dtype (float32 by default) whatever the base's: the input is cast
// to it and the sum back to the base output's dtype, as PEFT does outside autocast. Under autocast the
// matmuls run in the autocast dtype and the gradients still land on the fp32 weights.
import { noGrad } from '../autograd.js';
import type { DType } from '../dtype.js';
import type { Generator } from '../random.js';
import * as F from '../functional.js';
import { Dropout, Linear } from '../nn/layers.js';
import type { Tensor } from '../tensor.js';
import { type LoraBranches, LoraLayer } from './lora_layer.js';

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
  /** Name of this first adapter (default 'default'; diffusers' loader names them 'default_0', …). */
  adapterName?: string;
}

export class LoraLinear extends LoraLayer {
  base_layer: Linear;
  lora_dropout: Dropout;
  lora_A: Linear;
  lora_B: Linear;
  /** Adapters after the first (loaded for inference), by name; null while there are none. */
  lora_extra: LoraBranches | null = null;

  constructor(base: Linear, o: LoraLinearOptions) {
    super();
    if (!Number.isInteger(o.rank) || o.rank <= 0) throw new RangeError(`LoraLinear: rank must be a positive integer, got ${o.rank}`);
    this.rank = o.rank;
    this.alpha = o.alpha ?? o.rank;
    this.adapterName = o.adapterName ?? 'default';
    this.activeAdapters = [this.adapterName];
    this.base_layer = base;
    this.lora_dropout = new Dropout(o.dropout ?? 0);
    this.lora_dropout.training = base.training;
    // As PEFT: two default-initialised nn.Linear, then reset_lora_parameters re-draws A and zeroes B (the
    // same draws in the same order, so a seeded CPU run reproduces PEFT's initial A).
    [this.lora_A, this.lora_B] = this.createBranch(o.rank, o.dtype ?? 'float32');
    this.training = base.training;
    this.resetLoraParameters(o.init ?? 'gaussian', o.generator);
  }

  protected createBranch(rank: number, dtype: DType): [Linear, Linear] {
    const device = this.base_layer.weight.device;
    return [
      new Linear(this.base_layer.inFeatures, rank, false, { dtype, device }),
      new Linear(rank, this.base_layer.outFeatures, false, { dtype, device }),
    ];
  }

  protected applyWeight(x: Tensor, weight: Tensor): Tensor { return F.linear(x, weight); }

  /**
   * One plain LoRA adapter (the training case): base_layer(x) + lora_B(lora_A(x)) · scaling as one operator
   * (F.loraLinear: the adapter's product accumulated into the base output by the GEMM, one autograd node), when
   * no dropout draws and x, the base and the adapter share a dtype. Several adapters, DoRA, LoHa/LoKr, dropout
   * or a dtype cast take the general path of LoraLayer.forward.
   */
  protected override fusedForward(x: Tensor): Tensor | null {
    const active = this.activeAdapters;
    if (this.vacant || this.lora_magnitude_vector || active.length !== 1 || active[0] !== this.adapterName) return null;
    if (this.lora_dropout.training && this.lora_dropout.p !== 0) return null;
    const s = this.scalingOf(this.adapterName);
    const dtype = this.lora_A.weight.dtype;
    if (s === 0 || x.dtype !== dtype || this.base_layer.weight.dtype !== dtype) return null;
    try {
      return F.loraLinear(x, this.base_layer.weight, this.base_layer.bias, this.lora_A.weight, this.lora_B.weight, s);
    } catch {
      return null; // the general path reports it as before, naming the ATen op and its inputs
    }
  }

  get inFeatures(): number { return this.base_layer.inFeatures; }
  get outFeatures(): number { return this.base_layer.outFeatures; }

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
}
