// BasicTransformerBlock and its FeedForward (diffusers' attention.py), in the variant SD 1.x/2.x UNets use:
// LayerNorm before each of self-attention, cross-attention and a GEGLU feed-forward, each added back.
// Field names are the checkpoint's: `attn1.to_q`, `attn2.to_k`, `ff.net.0.proj`, `ff.net.2`.
import { Module } from '../nn/module.js';
import { ModuleList } from '../nn/container.js';
import { Dropout, LayerNorm, Linear } from '../nn/layers.js';
import { tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import { Attention } from './attention_processor.js';

/** A Linear to twice the width; one half gated by gelu of the other (diffusers' GEGLU). */
export class GEGLU extends Module {
  proj: Linear;

  constructor(dimIn: number, dimOut: number) {
    super();
    this.proj = new Linear(dimIn, dimOut * 2);
  }

  forward(x: Tensor): Tensor {
    const [h, gate] = this.proj.forward(x).chunk(2, -1) as [Tensor, Tensor];
    // libtorch's CPU gelu and gelu_backward take a slow scalar path for a strided half of a row (3.3 vs 0.55 ns an
    // element in 1.13): one contiguous copy makes GEGLU's forward + backward 2.5× faster there (bench/RESULTS.md)
    return h.mul((gate.isCuda ? gate : gate.contiguous()).gelu());
  }
}

/** net.0 = GEGLU(dim → 4·dim), net.1 = dropout, net.2 = Linear(4·dim → dim). */
export class FeedForward extends Module {
  net: ModuleList<GEGLU | Dropout | Linear>;

  constructor(dim: number, dropout = 0, mult = 4) {
    super();
    const inner = dim * mult;
    this.net = new ModuleList<GEGLU | Dropout | Linear>([new GEGLU(dim, inner), new Dropout(dropout), new Linear(inner, dim)]);
  }

  forward(x: Tensor): Tensor {
    let h = x;
    for (const layer of this.net) h = layer.forward(h);
    return h;
  }
}

export interface BasicTransformerBlockConfig {
  dim: number;
  numAttentionHeads: number;
  attentionHeadDim: number;
  /** Width of encoder_hidden_states (the text encoder's hidden size). */
  crossAttentionDim: number;
  dropout?: number;
  upcastAttention?: boolean;
  normEps?: number;
}

export class BasicTransformerBlock extends Module {
  norm1: LayerNorm;
  attn1: Attention;
  norm2: LayerNorm;
  attn2: Attention;
  norm3: LayerNorm;
  ff: FeedForward;

  constructor(c: BasicTransformerBlockConfig) {
    super();
    const eps = c.normEps ?? 1e-5;
    const heads = { heads: c.numAttentionHeads, dimHead: c.attentionHeadDim, dropout: c.dropout ?? 0, upcastAttention: c.upcastAttention ?? false };
    this.norm1 = new LayerNorm(c.dim, eps);
    this.attn1 = new Attention({ queryDim: c.dim, ...heads });
    this.norm2 = new LayerNorm(c.dim, eps);
    this.attn2 = new Attention({ queryDim: c.dim, crossAttentionDim: c.crossAttentionDim, ...heads });
    this.norm3 = new LayerNorm(c.dim, eps);
    this.ff = new FeedForward(c.dim, c.dropout ?? 0);
  }

  /** hiddenStates [B, L, dim], encoderHiddenStates [B, S, crossAttentionDim] → [B, L, dim]. */
  forward(hiddenStates: Tensor, encoderHiddenStates: Tensor): Tensor {
    // tidy: intermediates freed when the block returns (see ResnetBlock2D.forward)
    return tidy(() => {
      // 1. self-attention over the image tokens
      let h = this.attn1.forward(this.norm1.forward(hiddenStates)).add(hiddenStates);
      // 2. cross-attention: image tokens query the text tokens
      h = this.attn2.forward(this.norm2.forward(h), encoderHiddenStates).add(h);
      // 3. feed-forward
      return this.ff.forward(this.norm3.forward(h)).add(h);
    });
  }
}
