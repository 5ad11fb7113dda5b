// torch.nn.functional: the layers' math, one ATen operator each (attention falls back to an exact
// composition where libtorch lacks scaled_dot_product_attention).
import { native } from './native.js';
import { dtypeCode, elementSize } from './dtype.js';
import { hasOp, op } from './ops.js';
import { isRecordingCheckpoint } from './gradient_checkpointing.js';
import { Tensor } from './tensor.js';

const A = {
  linear: op('linear'), chunkedAttention: op('difflora::chunked_attention'), conv2d: op('difflora::conv2d'), atenConv2d: op('conv2d'), groupNorm: op('group_norm'), layerNorm: op('layer_norm'),
  embedding: op('embedding'), dropout: op('dropout'), nearest: op('upsample_nearest2d.vec'),
  bilinear: op('upsample_bilinear2d.vec'), avgPool2d: op('avg_pool2d'), constantPad: op('constant_pad_nd'),
  reflectionPad2d: op('reflection_pad2d'), replicationPad2d: op('replication_pad2d'), mseLoss: op('mse_loss'),
  sdpa: op('scaled_dot_product_attention'), empty: op('empty.memory_format'), headsAttention: op('difflora::heads_attention'),
  loraLinear: op('difflora::lora_linear'), groupNormSilu: op('difflora::group_norm_silu'),
};

export function linear(input: Tensor, weight: Tensor, bias?: Tensor | null): Tensor {
  return A.linear(input, weight, bias ?? null) as Tensor;
}

/**
 * PEFT's lora.Linear with one adapter: linear(x, weight, bias) + linear(linear(x, loraA), loraB) · scale, as one
 * operator (native/lora.cc). On the CPU in float32 with a frozen base and no autocast, the adapter's product is
 * accumulated into the base output by the GEMM and backward sums both branches' input gradients in one buffer;
 * elsewhere it is that composition op by op.
 */
export function loraLinear(x: Tensor, weight: Tensor, bias: Tensor | null, loraA: Tensor, loraB: Tensor, scale: number): Tensor {
  return A.loraLinear(x, weight, bias, loraA, loraB, scale) as Tensor;
}

export interface Conv2dOptions { stride?: number | number[]; padding?: number | number[]; dilation?: number | number[]; groups?: number }
/**
 * aten::conv2d through difflora::conv2d (native/conv.cc): on libtorch 1.x a frozen float32 CPU weight at least as
 * large as the output is kept in oneDNN's layout between calls instead of being reordered by every call (one more
 * copy of such a weight while it lives, two once its input gradient has been needed).
 */
export function conv2d(input: Tensor, weight: Tensor, bias?: Tensor | null, o: Conv2dOptions = {}): Tensor {
  const args = [input, weight, bias ?? null, o.stride ?? 1, o.padding ?? 0, o.dilation ?? 1, o.groups ?? 1];
  try {
    return A.conv2d(...args) as Tensor;
  } catch {
    // the error as aten::conv2d reports it, naming aten::conv2d and its inputs (what difflora::conv2d runs otherwise)
    return A.atenConv2d(...args) as Tensor;
  }
}

/**
 * Under autocast, norms run in float32 (CUDA autocast's fp32 policy for group_norm/layer_norm). libtorch
 * 1.13's CPU autocast lacks that rule, so a bf16 activation would meet fp32 affine weights and fail: upcast
 * it here, as CUDA autocast does.
 */
function normInput(input: Tensor, weight: Tensor | null | undefined): Tensor {
  if (!weight || weight.dtype !== 'float32' || (input.dtype !== 'bfloat16' && input.dtype !== 'float16')) return input;
  return native.isAutocastEnabled(input.isCuda ? 'cuda' : 'cpu') ? input.float() : input;
}

/** Whether t's strides are the row-major ones of its shape (size-1 dimensions may have any stride). */
export function isRowMajor(t: Tensor): boolean {
  const shape = t.shape, stride = t.stride();
  let expected = 1;
  for (let d = shape.length - 1; d >= 0; d--) {
    if (shape[d] !== 1 && stride[d] !== expected) return false;
    expected *= shape[d]!;
  }
  return true;
}

export function groupNorm(input: Tensor, numGroups: number, weight?: Tensor | null, bias?: Tensor | null, eps = 1e-5): Tensor {
  let x = normInput(input, weight);
  // libtorch 1.13's CPU group_norm is wrong for bfloat16 in channels-last layout (errors of ~0.5 on unit-scale
  // values), which a bf16 convolution on the CPU can hand it (the VAE decoder's upsamplers): give it row-major
  if (x.dtype === 'bfloat16' && x.device === 'cpu' && !isRowMajor(x)) {
    const rowMajor = x.contiguous();
    if (x !== input) x.dispose();
    x = rowMajor;
  }
  try {
    return A.groupNorm(x, numGroups, weight ?? null, bias ?? null, eps, true) as Tensor;
  } finally {
    if (x !== input) x.dispose();
  }
}

/**
 * silu(groupNorm(x)), the pair every ResnetBlock2D runs. On the CPU in float32 it is one operator
 * (native/group_norm.cc): where no gradient is needed (frozen models, inference) one pass per group normalizes and
 * applies silu, instead of group_norm's output and silu_'s second pass over it; with a gradient it is the two
 * operators, which autograd records. Elsewhere groupNorm then silu, in place where autograd keeps nothing.
 */
export function groupNormSilu(input: Tensor, numGroups: number, weight?: Tensor | null, bias?: Tensor | null, eps = 1e-5): Tensor {
  // a checkpointed block's recording computes what its replay in backward (with a gradient) will: the two operators
  if (input.device === 'cpu' && input.dtype === 'float32' && !isRecordingCheckpoint()) return A.groupNormSilu(input, numGroups, weight ?? null, bias ?? null, eps) as Tensor;
  const h = groupNorm(input, numGroups, weight, bias, eps);
  return h.requiresGrad ? h.silu() : h.silu_();
}

export function layerNorm(input: Tensor, normalizedShape: number[], weight?: Tensor | null, bias?: Tensor | null, eps = 1e-5): Tensor {
  const x = normInput(input, weight);
  try {
    return A.layerNorm(x, normalizedShape, weight ?? null, bias ?? null, eps, true) as Tensor;
  } finally {
    if (x !== input) x.dispose();
  }
}

export function embedding(input: Tensor, weight: Tensor): Tensor {
  return A.embedding(weight, input, -1, false, false) as Tensor;
}

export function silu(x: Tensor): Tensor { return x.silu(); }
export function gelu(x: Tensor, approximate: 'none' | 'tanh' = 'none'): Tensor { return x.gelu(approximate); }
export function sigmoid(x: Tensor): Tensor { return x.sigmoid(); }
export function softmax(x: Tensor, dim: number): Tensor { return x.softmax(dim); }

/** Inverted dropout as torch (draws from the default generator of the input's device). */
export function dropout(x: Tensor, p = 0.5, training = true): Tensor {
  if (p < 0 || p > 1) throw new RangeError(`dropout probability has to be between 0 and 1, but got ${p}`);
  return A.dropout(x, p, training) as Tensor;
}

export interface InterpolateOptions {
  size?: [number, number];
  scaleFactor?: number | [number, number];
  mode?: 'nearest' | 'bilinear';
  alignCorners?: boolean;
}
/** F.interpolate for 4-D input, modes nearest and bilinear. */
export function interpolate(x: Tensor, o: InterpolateOptions): Tensor {
  if ((o.size === undefined) === (o.scaleFactor === undefined)) throw new TypeError('interpolate: give exactly one of size and scaleFactor');
  const scales = o.scaleFactor === undefined ? null : typeof o.scaleFactor === 'number' ? [o.scaleFactor, o.scaleFactor] : o.scaleFactor;
  const size = o.size ?? null;
  const mode = o.mode ?? 'nearest';
  if (mode === 'nearest') {
    if (o.alignCorners !== undefined) throw new TypeError('interpolate: alignCorners only applies to bilinear');
    return A.nearest(x, size, scales) as Tensor;
  }
  if (mode === 'bilinear') return A.bilinear(x, size, o.alignCorners ?? false, scales) as Tensor;
  throw new TypeError(`interpolate: unsupported mode '${String(mode)}'`);
}

export function avgPool2d(x: Tensor, kernelSize: number | number[], stride?: number | number[], padding: number | number[] = 0): Tensor {
  return A.avgPool2d(x, kernelSize, stride ?? kernelSize, padding, false, true, null) as Tensor;
}

/** F.pad: pad is (left, right, top, bottom, ...) from the last dimension backwards. */
export function pad(x: Tensor, padding: number[], mode: 'constant' | 'reflect' | 'replicate' = 'constant', value = 0): Tensor {
  if (mode === 'constant') return A.constantPad(x, padding, value) as Tensor;
  if (padding.length !== 4) throw new TypeError(`pad: mode '${mode}' needs 4 padding values for 4-D input`);
  return (mode === 'reflect' ? A.reflectionPad2d(x, padding) : A.replicationPad2d(x, padding)) as Tensor;
}

const reductions = { none: 0, mean: 1, sum: 2 } as const;
export function mseLoss(input: Tensor, target: Tensor, reduction: keyof typeof reductions = 'mean'): Tensor {
  return A.mseLoss(input, target, reductions[reduction]) as Tensor;
}

let nativeSdpa: boolean | undefined;
export interface AttentionOptions {
  attnMask?: Tensor | null; isCausal?: boolean; scale?: number; dropoutP?: number;
  /**
   * Memory-efficient attention where libtorch has no fused kernel (1.13): the queries in chunks whose scores
   * take at most this many bytes; autograd keeps q, k, v, the output and a log-sum-exp per row, and backward
   * recomputes one chunk at a time (xformers' trade: memory O(chunk·Lk) instead of O(Lq·Lk), one more
   * q·kᵀ in backward). libtorch 2.x's fused kernel is memory-efficient by itself and ignores it.
   */
  memoryEfficient?: { maxScoresBytes: number };
}
/**
 * softmax(q kᵀ · scale + mask) v over the last two dims. Uses libtorch's fused kernel where it exists
 * (2.x); otherwise the classic composition diffusers' AttnProcessor uses (q kᵀ by bmm, or baddbmm onto the mask; softmax; bmm).
 */
export function scaledDotProductAttention(q: Tensor, k: Tensor, v: Tensor, o: AttentionOptions = {}): Tensor {
  const scale = o.scale ?? 1 / Math.sqrt(q.shape[q.shape.length - 1] ?? 1);
  if (hasFusedAttention() && !o.isCausal) {
    return A.sdpa(q, k, v, o.attnMask ?? null, o.dropoutP ?? 0, false, scale) as Tensor;
  }
  if (o.memoryEfficient && !o.isCausal && !o.dropoutP && sameLead(q, k, v)) {
    const chunk = queryChunk(q, k, o.memoryEfficient.maxScoresBytes);
    // native/attention.cc: chunked forward, backward recomputing one chunk at a time from the saved log-sum-exp
    if (chunk < (q.shape[q.shape.length - 2] ?? 0)) return A.chunkedAttention(q, k, v, o.attnMask ?? null, scale, chunk) as Tensor;
  }
  return attentionComposite(q, k, v, scale, o);
}

/** Whether scaledDotProductAttention runs libtorch's fused kernel (libtorch 2.x; DIFFLORA_SDPA=composite turns it off). */
export function hasFusedAttention(): boolean {
  nativeSdpa ??= hasOp('scaled_dot_product_attention') && process.env.DIFFLORA_SDPA !== 'composite';
  return nativeSdpa;
}

/**
 * softmax(scale · q kᵀ) v per head on the projections' layout: q [B, Lq, heads·d], k [B, Lk, heads·d],
 * v [B, Lk, heads·dv] → [B, Lq, heads·dv], no mask. diffusers' AttnProcessor between the projections
 * (head_to_batch_dim, baddbmm, softmax, bmm, batch_to_head_dim) as one operator (native/attention.cc): on the CPU
 * in float32 its GEMMs read and write the heads in place (no head reshape copies, the scale on the GEMM's alpha),
 * with a hand-written backward of the same arithmetic; elsewhere the same composition in ATen ops.
 */
export function headsAttention(q: Tensor, k: Tensor, v: Tensor, heads: number, scale: number): Tensor {
  return A.headsAttention(q, k, v, heads, scale) as Tensor;
}

/** q, k, v with the same leading (batch, head) dimensions, and k, v of one length: what the chunked kernel takes. */
function sameLead(q: Tensor, k: Tensor, v: Tensor): boolean {
  const lead = (t: Tensor, drop: number) => t.shape.slice(0, t.shape.length - drop).join();
  return q.ndim === k.ndim && k.ndim === v.ndim && lead(q, 2) === lead(k, 2) && lead(k, 1) === lead(v, 1);
}

/** Query rows per chunk so that one chunk's scores [batch·heads, rows, Lk] stay within `maxBytes`. */
function queryChunk(q: Tensor, k: Tensor, maxBytes: number): number {
  const lead = q.shape.slice(0, -2).reduce((a, b) => a * b, 1);
  const lk = k.shape[k.shape.length - 2] ?? 1;
  return Math.max(1, Math.floor(maxBytes / (lead * lk * elementSize(q.dtype))));
}

function attentionComposite(q: Tensor, k: Tensor, v: Tensor, scale: number, o: AttentionOptions): Tensor {
  const lead = q.shape.slice(0, -2);
  const [lq, d] = q.shape.slice(-2) as [number, number];
  const lk = k.shape[k.shape.length - 2] ?? 0;
  const dv = v.shape[v.shape.length - 1] ?? 0;
  const batch = lead.reduce((a, b) => a * b, 1);
  const q3 = q.reshape(batch, lq, d);
  const k3 = k.reshape(batch, lk, d);
  const v3 = v.reshape(batch, lk, dv);
  const kt = k3.transpose(-1, -2);
  let scores: Tensor;
  if (o.attnMask) {
    const mask = o.attnMask.expand([...lead, lq, lk]).reshape(batch, lq, lk);
    scores = mask.dtype === 'bool'
      ? (A.empty([batch, lq, lk], dtypeCode(q.dtype), null, q.device, null, null) as Tensor).fill_(0).maskedFill(mask.logicalNot(), -Infinity).baddbmm(q3, kt, 1, scale)
      : mask.baddbmm(q3, kt, 1, scale);
  } else {
    // Not baddbmm(empty, ..., beta=0): libtorch 1.13's small-batch kernel (k·m·n < 400) still reads the
    // uninitialised output as out*0 + alpha*acc, so a recycled block holding inf/NaN poisons the scores.
    scores = q3.bmm(kt).mul_(scale);
  }
  if (o.isCausal) {
    const causal = (A.empty([lq, lk], dtypeCode('bool'), null, q.device, null, null) as Tensor).fill_(true);
    scores = scores.maskedFill(triu(causal, 1), -Infinity);
  }
  let probs = scores.softmax(-1);
  // the scores are as large as the probabilities: free them now rather than at the scope's end (softmax's
  // backward needs only its output, so autograd keeps nothing of them)
  scores.dispose();
  if (o.dropoutP) probs = dropout(probs, o.dropoutP, true);
  return probs.bmm(v3).reshape([...lead, lq, dv]);
}

const triuOp = op('triu');
function triu(x: Tensor, diagonal: number): Tensor { return triuOp(x, diagonal) as Tensor; }
