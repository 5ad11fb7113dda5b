// The transformer of transformers' CLIP text model (modeling_clip.py, 4.45): CLIPAttention, CLIPMLP,
// CLIPEncoderLayer (pre-LayerNorm) and CLIPEncoder. Field names are the checkpoint's
// (`layers.N.self_attn.q_proj.weight`, `layers.N.mlp.fc1.bias`, ...).
import { isGradEnabled } from '../autograd.js';
import * as F from '../functional.js';
import { checkpoint } from '../gradient_checkpointing.js';
import { Module } from '../nn/module.js';
import { ModuleList } from '../nn/container.js';
import { LayerNorm, Linear } from '../nn/layers.js';
import type { Tensor } from '../tensor.js';
import type { TensorOptions } from '../torch.js';

export type Init = Pick<TensorOptions, 'dtype' | 'device'>;

/** A projection LoRA may replace with a wrapper of the same forward. */
export type Projection = Module & { forward(x: Tensor): Tensor };

/** transformers' ACT2FN entries CLIP text encoders use (SD 1.x: quick_gelu; SD 2.x: gelu). */
export const CLIP_ACTIVATIONS = {
  // x·σ(1.702x), OpenAI's original CLIP approximation
  quick_gelu: (x: Tensor): Tensor => x.mul(x.mul(1.702).sigmoid()),
  gelu: (x: Tensor): Tensor => x.gelu('none'),
  // NewGELUActivation spells the tanh form out op by op; keep its order of operations
  gelu_new: (x: Tensor): Tensor => x.mul(0.5).mul(x.pow(3).mul(0.044715).add(x).mul(Math.sqrt(2 / Math.PI)).tanh().add(1)),
  gelu_pytorch_tanh: (x: Tensor): Tensor => x.gelu('tanh'),
} as const;
export type CLIPActivation = keyof typeof CLIP_ACTIVATIONS;

export interface CLIPEncoderConfig {
  hidden_size: number;
  intermediate_size: number;
  num_attention_heads: number;
  num_hidden_layers: number;
  hidden_act: CLIPActivation;
  layer_norm_eps: number;
  attention_dropout: number;
}

/** Multi-head self-attention with biased q/k/v/out projections; the mask is additive. */
export class CLIPAttention extends Module {
  // Declared in transformers' order (k, v, q, out) so stateDict() lists keys as the checkpoint does.
  k_proj: Projection;
  v_proj: Projection;
  q_proj: Projection;
  out_proj: Projection;
  readonly numHeads: number;
  readonly headDim: number;
  readonly scale: number;
  readonly dropout: number;

  constructor(c: CLIPEncoderConfig, o: Init = {}) {
    super();
    const dim = c.hidden_size;
    this.numHeads = c.num_attention_heads;
    this.headDim = dim / this.numHeads;
    this.scale = this.headDim ** -0.5;
    this.dropout = c.attention_dropout;
    this.k_proj = new Linear(dim, dim, true, o);
    this.v_proj = new Linear(dim, dim, true, o);
    this.q_proj = new Linear(dim, dim, true, o);
    this.out_proj = new Linear(dim, dim, true, o);
  }

  /** x: [B, L, D]; mask: additive, broadcastable to [B, heads, L, L]. */
  forward(x: Tensor, mask: Tensor | null): Tensor {
    const [b, l, d] = x.shape as [number, number, number];
    const heads = (t: Tensor): Tensor => t.view(b, l, this.numHeads, this.headDim).transpose(1, 2);
    const q = heads(this.q_proj.forward(x));
    const k = heads(this.k_proj.forward(x));
    const v = heads(this.v_proj.forward(x));
    const out = F.scaledDotProductAttention(q, k, v, { attnMask: mask, scale: this.scale, dropoutP: this.training ? this.dropout : 0 });
    return this.out_proj.forward(out.transpose(1, 2).reshape(b, l, d));
  }
}

export class CLIPMLP extends Module {
  fc1: Projection;
  fc2: Projection;
  readonly act: (x: Tensor) => Tensor;

  constructor(c: CLIPEncoderConfig, o: Init = {}) {
    super();
    this.act = CLIP_ACTIVATIONS[c.hidden_act];
    this.fc1 = new Linear(c.hidden_size, c.intermediate_size, true, o);
    this.fc2 = new Linear(c.intermediate_size, c.hidden_size, true, o);
  }

  forward(x: Tensor): Tensor {
    return this.fc2.forward(this.act(this.fc1.forward(x)));
  }
}

/** Pre-norm residual block: x + attn(ln1(x)), then x + mlp(ln2(x)). */
export class CLIPEncoderLayer extends Module {
  self_attn: CLIPAttention;
  layer_norm1: LayerNorm;
  mlp: CLIPMLP;
  layer_norm2: LayerNorm;

  constructor(c: CLIPEncoderConfig, o: Init = {}) {
    super();
    this.self_attn = new CLIPAttention(c, o);
    this.layer_norm1 = new LayerNorm(c.hidden_size, c.layer_norm_eps, true, o);
    this.mlp = new CLIPMLP(c, o);
    this.layer_norm2 = new LayerNorm(c.hidden_size, c.layer_norm_eps, true, o);
  }

  forward(x: Tensor, mask: Tensor | null): Tensor {
    const h = x.add(this.self_attn.forward(this.layer_norm1.forward(x), mask));
    return h.add(this.mlp.forward(this.layer_norm2.forward(h)));
  }
}

export class CLIPEncoder extends Module {
  layers: ModuleList<CLIPEncoderLayer>;
  /** Recompute each layer in backward (transformers' gradient_checkpointing_enable); in train mode with grad enabled. */
  gradientCheckpointing = false;

  constructor(c: CLIPEncoderConfig, o: Init = {}) {
    super();
    this.layers = new ModuleList(Array.from({ length: c.num_hidden_layers }, () => new CLIPEncoderLayer(c, o)));
  }

  /**
   * Runs every layer. `hiddenStates`, when given, receives the input and each layer's output
   * (num_hidden_layers + 1 tensors, as transformers' `hidden_states`).
   */
  forward(x: Tensor, mask: Tensor | null, hiddenStates?: Tensor[]): Tensor {
    let h = x;
    hiddenStates?.push(h);
    const checkpointed = this.gradientCheckpointing && this.training && isGradEnabled();
    for (const layer of this.layers) {
      // the mask has no autograd history, so the checkpointed layer may capture it
      h = checkpointed ? checkpoint((xi) => layer.forward(xi, mask), h) : layer.forward(h, mask);
      hiddenStates?.push(h);
    }
    return h;
  }
}
