// diffusers' `Attention`: owns the projections (to_q, to_k, to_v, to_out.0) and delegates the math to a
// processor. LoRA attaches to the projections; the processor stays the same.
import * as F from '../functional.js';
import { Module } from '../nn/module.js';
import { ModuleList } from '../nn/container.js';
import { Dropout, GroupNorm, Linear } from '../nn/layers.js';
import { tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';

export interface AttentionConfig {
  queryDim: number;
  /** Dimension of encoder_hidden_states (cross-attention); self-attention when omitted. */
  crossAttentionDim?: number;
  heads?: number;
  dimHead?: number;
  dropout?: number;
  /** Bias of to_q/to_k/to_v. */
  bias?: boolean;
  outBias?: boolean;
  upcastAttention?: boolean;
  /** Softmax in fp32 for half-precision inputs (the VAE's mid-block attention sets it, as diffusers does). */
  upcastSoftmax?: boolean;
  /** GroupNorm before the projections (VAE mid-block attention). */
  normNumGroups?: number;
  eps?: number;
  residualConnection?: boolean;
  rescaleOutputFactor?: number;
}

/** Computes attention from an Attention module's weights (diffusers' AttnProcessor2_0). */
export interface AttentionProcessor {
  call(attn: Attention, hiddenStates: Tensor, encoderHiddenStates?: Tensor | null, attentionMask?: Tensor | null): Tensor;
}

export class Attention extends Module {
  group_norm: GroupNorm | null;
  to_q: Module & { forward(x: Tensor): Tensor };
  to_k: Module & { forward(x: Tensor): Tensor };
  to_v: Module & { forward(x: Tensor): Tensor };
  to_out: ModuleList<Module & { forward(x: Tensor): Tensor }>;
  readonly heads: number;
  readonly dimHead: number;
  readonly scale: number;
  readonly upcastAttention: boolean;
  readonly upcastSoftmax: boolean;
  readonly residualConnection: boolean;
  readonly rescaleOutputFactor: number;
  processor: AttentionProcessor = new AttnProcessor();

  constructor(c: AttentionConfig) {
    super();
    this.heads = c.heads ?? 8;
    this.dimHead = c.dimHead ?? 64;
    this.scale = this.dimHead ** -0.5;
    this.upcastAttention = c.upcastAttention ?? false;
    this.upcastSoftmax = c.upcastSoftmax ?? false;
    this.residualConnection = c.residualConnection ?? false;
    this.rescaleOutputFactor = c.rescaleOutputFactor ?? 1;
    const inner = this.heads * this.dimHead;
    const cross = c.crossAttentionDim ?? c.queryDim;
    const bias = c.bias ?? false;
    this.group_norm = c.normNumGroups ? new GroupNorm(c.normNumGroups, c.queryDim, c.eps ?? 1e-5, true) : null;
    this.to_q = new Linear(c.queryDim, inner, bias);
    this.to_k = new Linear(cross, inner, bias);
    this.to_v = new Linear(cross, inner, bias);
    this.to_out = new ModuleList([new Linear(inner, c.queryDim, c.outBias ?? true), new Dropout(c.dropout ?? 0)]);
  }

  forward(hiddenStates: Tensor, encoderHiddenStates?: Tensor | null, attentionMask?: Tensor | null): Tensor {
    // tidy: scores and probabilities (the largest tensors of a forward) are freed as soon as attention returns
    return tidy(() => this.processor.call(this, hiddenStates, encoderHiddenStates, attentionMask));
  }

  /** [B, L, heads·d] → [B, heads, L, d] */
  headToBatchDim(x: Tensor): Tensor {
    const [b, l] = x.shape as [number, number, number];
    return x.view(b, l, this.heads, -1).transpose(1, 2);
  }

  /** [B, heads, L, d] → [B, L, heads·d] */
  batchToHeadDim(x: Tensor): Tensor {
    const [b, , l] = x.shape as [number, number, number, number];
    return x.transpose(1, 2).reshape(b, l, -1);
  }
}

/**
 * Scaled-dot-product attention over the projections: libtorch's fused kernel where it exists, else the
 * exact composition. Handles 4-D (image) input by flattening the spatial dims, as diffusers does.
 * `memoryEfficient`: on libtorch without the fused kernel, attention by query chunks recomputed in backward
 * (see F.scaledDotProductAttention) — what `--enable_xformers_memory_efficient_attention` selects.
 */
export class AttnProcessor implements AttentionProcessor {
  constructor(readonly options: { memoryEfficient?: { maxScoresBytes: number } } = {}) {}

  call(attn: Attention, hiddenStates: Tensor, encoderHiddenStates?: Tensor | null, attentionMask?: Tensor | null): Tensor {
    const residual = hiddenStates;
    const image = hiddenStates.ndim === 4;
    const [b, c, h, w] = hiddenStates.shape as [number, number, number, number];
    let x = image ? hiddenStates.view(b, c, h * w).transpose(1, 2) : hiddenStates;
    if (attn.group_norm) x = attn.group_norm.forward(x.transpose(1, 2)).transpose(1, 2);
    const context = encoderHiddenStates ?? x;
    if (this.headsOnProjections(x, attentionMask)) {
      // libtorch without a fused kernel (1.13), CPU float32, no mask: one operator on the projections' layout
      let out = F.headsAttention(attn.to_q.forward(x), attn.to_k.forward(context), attn.to_v.forward(context), attn.heads, attn.scale);
      out = attn.to_out.at(1).forward(attn.to_out.at(0).forward(out));
      return this.finish(attn, out, residual, image, [b, c, h, w]);
    }
    let q = attn.headToBatchDim(attn.to_q.forward(x));
    let k = attn.headToBatchDim(attn.to_k.forward(context));
    const v = attn.headToBatchDim(attn.to_v.forward(context));
    const dtype = q.dtype;
    // upcast_attention: scores in fp32 (SD 2.x configs), as diffusers' get_attention_scores. upcast_softmax
    // (VAE): softmax in fp32; the fused kernels do that inside for fp16, the composite path needs fp32 inputs.
    const upcast = (attn.upcastAttention || attn.upcastSoftmax) && dtype !== 'float32';
    if (upcast) {
      q = q.float();
      k = k.float();
    }
    let out = F.scaledDotProductAttention(q, k, upcast ? v.float() : v, {
      attnMask: attentionMask ?? null, scale: attn.scale, memoryEfficient: this.options.memoryEfficient,
    });
    if (out.dtype !== dtype) out = out.to(dtype);
    out = attn.batchToHeadDim(out);
    out = attn.to_out.at(0).forward(out);
    out = attn.to_out.at(1).forward(out);
    return this.finish(attn, out, residual, image, [b, c, h, w]);
  }

  /** Whether F.headsAttention's fast path applies: no fused kernel in this libtorch, CPU float32, no mask, no chunking asked. */
  private headsOnProjections(x: Tensor, attentionMask: Tensor | null | undefined): boolean {
    return !attentionMask && !this.options.memoryEfficient && x.dtype === 'float32' && x.device === 'cpu' && !F.hasFusedAttention();
  }

  /** Back to the input's layout, the residual and the rescale (the end of diffusers' AttnProcessor). */
  private finish(attn: Attention, output: Tensor, residual: Tensor, image: boolean, [b, c, h, w]: number[]): Tensor {
    let out = output;
    if (image) out = out.transpose(-1, -2).reshape(b as number, c as number, h as number, w as number);
    if (attn.residualConnection) out = out.add(residual);
    if (attn.rescaleOutputFactor !== 1) out = out.div(attn.rescaleOutputFactor);
    return out;
  }
}

/** Default budget for one chunk's attention scores under memory-efficient attention. */
export const MEMORY_EFFICIENT_SCORES_BYTES = 64 * 2 ** 20;

/**
 * Sets every Attention of `model` to memory-efficient attention (diffusers'
 * enable_xformers_memory_efficient_attention) or back to the plain processor (`false`). Returns how many
 * attention modules were set.
 */
export function setMemoryEfficientAttention(model: Module, on: boolean | { maxScoresBytes?: number } = true): number {
  const memoryEfficient = on === false ? undefined : { maxScoresBytes: (on === true ? undefined : on.maxScoresBytes) ?? MEMORY_EFFICIENT_SCORES_BYTES };
  let n = 0;
  for (const [, m] of model.namedModules()) {
    if (m instanceof Attention) {
      m.processor = new AttnProcessor({ memoryEfficient });
      n++;
    }
  }
  return n;
}
