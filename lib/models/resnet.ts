// ResnetBlock2D, Downsample2D and Upsample2D (diffusers' resnet.py, downsampling.py, upsampling.py),
// in the variants SD 1.x/2.x UNets and VAEs use.
import * as F from '../functional.js';
import { Module } from '../nn/module.js';
import { Conv2d, Dropout, GroupNorm, Linear } from '../nn/layers.js';
import { tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';

export interface ResnetBlock2DConfig {
  inChannels: number;
  outChannels?: number;
  /** null: no time embedding (VAE). */
  tembChannels?: number | null;
  groups?: number;
  groupsOut?: number;
  eps?: number;
  dropout?: number;
  nonLinearity?: 'swish' | 'silu';
  outputScaleFactor?: number;
  timeEmbeddingNorm?: 'default';
}

/**
 * Whether t may be overwritten in place: autograd keeps nothing of it (a frozen VAE, the UNet's blocks before its
 * first LoRA layer, inference, a checkpointed block's recording, whose replay in backward redoes the same in-place
 * ops). In place saves a tensor and a pass over it per residual add; the values are the same. (The norms' silu is
 * GroupNorm.forwardSilu, one operator that needs no second pass where autograd keeps nothing.)
 */
const overwritable = (t: Tensor) => !t.requiresGrad;
const sameLayout = (a: Tensor, b: Tensor) =>
  a.dtype === b.dtype && a.shape.length === b.shape.length && a.shape.every((n, i) => n === b.shape[i]) && a.stride().every((n, i) => n === b.stride()[i]);

export class ResnetBlock2D extends Module {
  norm1: GroupNorm;
  conv1: Conv2d;
  time_emb_proj: Linear | null;
  norm2: GroupNorm;
  dropout: Dropout;
  conv2: Conv2d;
  conv_shortcut: Conv2d | null;
  readonly outputScaleFactor: number;

  constructor(c: ResnetBlock2DConfig) {
    super();
    const out = c.outChannels ?? c.inChannels;
    const groups = c.groups ?? 32;
    const eps = c.eps ?? 1e-6;
    if (c.nonLinearity !== undefined && c.nonLinearity !== 'swish' && c.nonLinearity !== 'silu') {
      throw new Error(`ResnetBlock2D: unsupported non_linearity '${String(c.nonLinearity)}'`);
    }
    if (c.timeEmbeddingNorm !== undefined && c.timeEmbeddingNorm !== 'default') {
      throw new Error(`ResnetBlock2D: unsupported resnet_time_scale_shift '${String(c.timeEmbeddingNorm)}'`);
    }
    this.norm1 = new GroupNorm(groups, c.inChannels, eps);
    this.conv1 = new Conv2d(c.inChannels, out, 3, { padding: 1 });
    const temb = c.tembChannels === undefined ? 512 : c.tembChannels;
    this.time_emb_proj = temb === null ? null : new Linear(temb, out);
    this.norm2 = new GroupNorm(c.groupsOut ?? groups, out, eps);
    this.dropout = new Dropout(c.dropout ?? 0);
    this.conv2 = new Conv2d(out, out, 3, { padding: 1 });
    this.conv_shortcut = c.inChannels !== out ? new Conv2d(c.inChannels, out, 1) : null;
    this.outputScaleFactor = c.outputScaleFactor ?? 1;
  }

  forward(input: Tensor, temb?: Tensor | null): Tensor {
    // tidy: the block's intermediates are freed when it returns, not at the end of the caller's scope (in
    // inference that bounds memory to one block's activations; autograd keeps what backward needs)
    return tidy(() => {
      let h = this.conv1.forward(this.norm1.forwardSilu(input));
      if (this.time_emb_proj && temb) {
        const t = this.time_emb_proj.forward(temb.silu());
        h = h.add(t.unsqueeze(-1).unsqueeze(-1));
      }
      h = this.conv2.forward(this.dropout.forward(this.norm2.forwardSilu(h)));
      const shortcut = this.conv_shortcut ? this.conv_shortcut.forward(input.contiguous()) : input;
      // in place only where add would give the same tensor: same dtype (a bf16 block output plus a float32 input is
      // float32), shape and layout (add's result follows its inputs' strides)
      const out = overwritable(h) && sameLayout(h, shortcut) ? h.add_(shortcut) : shortcut.add(h);
      return this.outputScaleFactor === 1 ? out : out.div(this.outputScaleFactor);
    });
  }
}

export class Downsample2D extends Module {
  conv: Conv2d;
  readonly padding: number;

  /** A stride-2 3×3 conv; padding 0 means diffusers' asymmetric (0, 1, 0, 1) pad first (VAE encoder). */
  constructor(channels: number, outChannels = channels, padding = 1) {
    super();
    this.padding = padding;
    this.conv = new Conv2d(channels, outChannels, 3, { stride: 2, padding });
  }

  forward(x: Tensor): Tensor {
    const input = this.padding === 0 ? F.pad(x, [0, 1, 0, 1], 'constant', 0) : x;
    return this.conv.forward(input);
  }
}

export class Upsample2D extends Module {
  conv: Conv2d;

  constructor(channels: number, outChannels = channels) {
    super();
    this.conv = new Conv2d(channels, outChannels, 3, { padding: 1 });
  }

  /** Nearest ×2 (or to outputSize, when the skip connection's size is odd), then a 3×3 conv. */
  forward(x: Tensor, outputSize?: [number, number]): Tensor {
    // upsample_nearest2d has no bfloat16 kernel in older libtorch: go through fp32 as diffusers does
    const input = x.dtype === 'bfloat16' ? x.float() : x;
    let up = outputSize ? F.interpolate(input, { size: outputSize, mode: 'nearest' }) : F.interpolate(input, { scaleFactor: 2, mode: 'nearest' });
    if (x.dtype === 'bfloat16') up = up.to('bfloat16');
    return this.conv.forward(up);
  }
}
