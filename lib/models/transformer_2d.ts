// Transformer2DModel (diffusers' transformers/transformer_2d.py) for continuous input, as the SD UNets use
// it: GroupNorm, project into tokens, BasicTransformerBlocks, project back, add the input.
import { Module } from '../nn/module.js';
import { ModuleList } from '../nn/container.js';
import { Conv2d, GroupNorm, Linear } from '../nn/layers.js';
import type { Tensor } from '../tensor.js';
import { BasicTransformerBlock } from './attention.js';

export interface Transformer2DModelConfig {
  numAttentionHeads: number;
  attentionHeadDim: number;
  inChannels: number;
  /** transformer_layers_per_block: BasicTransformerBlocks in a row. */
  numLayers?: number;
  crossAttentionDim: number;
  normNumGroups?: number;
  /** Linear proj_in/proj_out on tokens (SD 2.x) instead of 1×1 convs on the image (SD 1.x). */
  useLinearProjection?: boolean;
  upcastAttention?: boolean;
  dropout?: number;
}

export class Transformer2DModel extends Module {
  norm: GroupNorm;
  proj_in: Conv2d | Linear;
  transformer_blocks: ModuleList<BasicTransformerBlock>;
  proj_out: Conv2d | Linear;
  readonly useLinearProjection: boolean;

  constructor(c: Transformer2DModelConfig) {
    super();
    const inner = c.numAttentionHeads * c.attentionHeadDim;
    this.useLinearProjection = c.useLinearProjection ?? false;
    // eps 1e-6 here, unlike the resnets' norm_eps: diffusers hard-codes it
    this.norm = new GroupNorm(c.normNumGroups ?? 32, c.inChannels, 1e-6);
    this.proj_in = this.useLinearProjection ? new Linear(c.inChannels, inner) : new Conv2d(c.inChannels, inner, 1);
    const blocks: BasicTransformerBlock[] = [];
    for (let i = 0; i < (c.numLayers ?? 1); i++) {
      blocks.push(new BasicTransformerBlock({
        dim: inner,
        numAttentionHeads: c.numAttentionHeads,
        attentionHeadDim: c.attentionHeadDim,
        crossAttentionDim: c.crossAttentionDim,
        dropout: c.dropout,
        upcastAttention: c.upcastAttention,
      }));
    }
    this.transformer_blocks = new ModuleList(blocks);
    this.proj_out = this.useLinearProjection ? new Linear(inner, c.inChannels) : new Conv2d(inner, c.inChannels, 1);
  }

  /** hiddenStates [B, C, H, W], encoderHiddenStates [B, S, crossAttentionDim] → [B, C, H, W]. */
  forward(hiddenStates: Tensor, encoderHiddenStates: Tensor): Tensor {
    const [, , height, width] = hiddenStates.shape as [number, number, number, number];
    // 1. input: normalise, then [B, C, H, W] → tokens [B, H·W, inner] (projecting before or after the reshape)
    let h = this.norm.forward(hiddenStates);
    if (this.useLinearProjection) {
      h = this.proj_in.forward(toTokens(h));
    } else {
      h = toTokens(this.proj_in.forward(h));
    }
    // 2. transformer blocks
    for (const block of this.transformer_blocks) h = block.forward(h, encoderHiddenStates);
    // 3. output: back to [B, C, H, W] and add the input
    if (this.useLinearProjection) {
      h = toImage(this.proj_out.forward(h), height, width);
    } else {
      h = this.proj_out.forward(toImage(h, height, width));
    }
    return h.add(hiddenStates);
  }
}

/** [B, C, H, W] → [B, H·W, C] */
function toTokens(x: Tensor): Tensor {
  const [b, c, h, w] = x.shape as [number, number, number, number];
  return x.permute(0, 2, 3, 1).reshape(b, h * w, c);
}

/** [B, H·W, C] → [B, C, H, W]; contiguous as diffusers makes it (the conv and the residual add read it). */
function toImage(x: Tensor, height: number, width: number): Tensor {
  const [b, , c] = x.shape as [number, number, number];
  return x.reshape(b, height, width, c).permute(0, 3, 1, 2).contiguous();
}
