// A LoRA adapter around a frozen Conv2d, as PEFT's `lora.Conv2d`: lora_A is a conv with the base's kernel,
// stride, padding and dilation to `rank` channels, lora_B a 1×1 conv back to the output channels. Kohya's
// files give SD 1.x's 1×1 proj_in/proj_out this way (lora_down [r, in, 1, 1], lora_up [out, r, 1, 1]), and
// LoCon files the 3×3 resnet convs (lora_down [r, in, 3, 3]).
import { noGrad } from '../autograd.js';
import type { DType } from '../dtype.js';
import type { Generator } from '../random.js';
import type { LoraInit } from './lora_linear.js';
import * as F from '../functional.js';
import { Conv2d, Dropout } from '../nn/layers.js';
import type { Tensor } from '../tensor.js';
import { type LoraBranches, LoraLayer } from './lora_layer.js';

export class LoraConv2d extends LoraLayer {
  base_layer: Conv2d;
  lora_dropout: Dropout;
  lora_A: Conv2d;
  lora_B: Conv2d;
  lora_extra: LoraBranches | null = null;

  /** A layer with one adapter of the given rank; A and B are zero until the caller fills them (loading). */
  constructor(base: Conv2d, o: { rank: number; alpha?: number; adapterName?: string; dtype?: DType }) {
    super();
    if (!Number.isInteger(o.rank) || o.rank <= 0) throw new RangeError(`LoraConv2d: rank must be a positive integer, got ${o.rank}`);
    if (base.groups !== 1) throw new Error(`LoraConv2d: grouped convolutions (groups ${base.groups}) are not supported`);
    this.rank = o.rank;
    this.alpha = o.alpha ?? o.rank;
    this.adapterName = o.adapterName ?? 'default';
    this.activeAdapters = [this.adapterName];
    this.base_layer = base;
    this.lora_dropout = new Dropout(0);
    [this.lora_A, this.lora_B] = this.createBranch(o.rank, o.dtype ?? 'float32');
    this.training = base.training;
    this.lora_dropout.training = base.training;
  }

  /**
   * A fresh trainable adapter, as PEFT's lora.Conv2d reset_lora_parameters: A ~ N(0, (1/rank)²) ('gaussian') or
   * kaiming_uniform(a=√5) = U(±1/√(in·kh·kw)) ('kaiming', Kohya's LoCon), B = 0.
   */
  resetLoraParameters(init: LoraInit, generator?: Generator): void {
    noGrad(() => {
      if (init === 'gaussian') this.lora_A.weight.normal_(0, 1 / this.rank, generator);
      else if (init === 'kaiming') {
        const k = this.base_layer.kernelSize;
        const bound = 1 / Math.sqrt(this.base_layer.inChannels * k * k);
        this.lora_A.weight.uniform_(-bound, bound, generator);
      } else throw new TypeError(`LoraConv2d: unknown init '${String(init)}' (expected 'gaussian' or 'kaiming')`);
      this.lora_B.weight.zero_();
    });
  }

  protected createBranch(rank: number, dtype: DType): [Conv2d, Conv2d] {
    const b = this.base_layer;
    const device = b.weight.device;
    const a = new Conv2d(b.inChannels, rank, b.kernelSize, { stride: b.stride, padding: b.padding, dilation: b.dilation, bias: false, dtype, device });
    const up = new Conv2d(rank, b.outChannels, 1, { bias: false, dtype, device });
    return [a, up];
  }

  protected applyWeight(x: Tensor, weight: Tensor): Tensor {
    const b = this.base_layer;
    return F.conv2d(x, weight, null, { stride: b.stride, padding: b.padding, dilation: b.dilation });
  }

  get inChannels(): number { return this.base_layer.inChannels; }
  get outChannels(): number { return this.base_layer.outChannels; }
}
