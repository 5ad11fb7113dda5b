// How big a model a config describes, before anything is built. A config is a recipe: `layers_per_block: 1e9`
// asks for a billion resnets, and building it aborts the process (V8's "Zone Allocation failed", libtorch's
// bad_alloc) instead of throwing. Each model counts its parameters from its config with these building-block
// formulas (they mirror the constructors exactly; the tests compare the count with the built model's on the
// meta device and with checkpoint shapes), and `checkModelFits` refuses a model whose weights alone exceed
// this machine's memory, naming the file and the fields that size it.
import { totalmem } from 'node:os';
import type { DType } from '../dtype.js';
import { configLabel, show, type ConfigSource } from './config.js';

export const linearParams = (inF: number, outF: number, bias = true): number => inF * outF + (bias ? outF : 0);
export const conv2dParams = (inC: number, outC: number, kernel: number, bias = true): number => inC * outC * kernel * kernel + (bias ? outC : 0);
/** GroupNorm and LayerNorm with affine weight and bias. */
export const normParams = (channels: number): number => 2 * channels;

/** diffusers' ResnetBlock2D: two norms, two 3×3 convs, the time projection (null: VAE) and a 1×1 shortcut when widths differ. */
export function resnetParams(inC: number, outC: number, tembChannels: number | null): number {
  return normParams(inC) + conv2dParams(inC, outC, 3) + (tembChannels === null ? 0 : linearParams(tembChannels, outC)) +
    normParams(outC) + conv2dParams(outC, outC, 3) + (inC !== outC ? conv2dParams(inC, outC, 1) : 0);
}

/** diffusers' Attention: to_q, to_k, to_v (biased or not), to_out.0 (biased), and an optional GroupNorm. */
export function attentionParams(queryDim: number, crossDim: number, inner: number, o: { bias?: boolean; groupNorm?: boolean } = {}): number {
  const bias = o.bias ?? false;
  return (o.groupNorm ? normParams(queryDim) : 0) + linearParams(queryDim, inner, bias) + 2 * linearParams(crossDim, inner, bias) + linearParams(inner, queryDim);
}

/** Transformer2DModel over `channels`: norm, proj_in/out (1×1 conv or Linear: the same count), `layers` BasicTransformerBlocks. */
export function transformer2dParams(channels: number, heads: number, crossDim: number, layers: number): number {
  const inner = heads * Math.floor(channels / heads);
  // BasicTransformerBlock: three LayerNorms, self- and cross-attention, GEGLU feed-forward (dim → 8·dim, 4·dim → dim)
  const block = 3 * normParams(inner) + attentionParams(inner, inner, inner) + attentionParams(inner, crossDim, inner) +
    linearParams(inner, 8 * inner) + linearParams(4 * inner, inner);
  return normParams(channels) + linearParams(channels, inner) + layers * block + linearParams(inner, channels);
}

export const BYTES_PER_ELEMENT: Record<DType, number> = {
  float32: 4, float16: 2, bfloat16: 2, float64: 8, int64: 8, int32: 4, int16: 2, int8: 1, uint8: 1, bool: 1,
};

/** Bytes in binary units, 3 significant figures ("3.20 GiB"). */
export function formatBytes(n: number): string {
  const units = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
  return u === 0 ? `${n} bytes` : `${v.toPrecision(3)} ${units[u]}`;
}

/** The memory the weights may take on this machine: all of its physical memory (a generous cap: it catches configs off by orders of magnitude). */
export function memoryLimitBytes(): number {
  return totalmem();
}

/**
 * Throws when `params` parameters at `dtype` cannot fit in this machine's memory. `sizing` lists the
 * config fields that determine the size, so the message says what to fix. The meta device holds no memory.
 */
export function checkModelFits(src: ConfigSource, params: number, dtype: DType, device: string | null | undefined, sizing: Record<string, unknown>): void {
  if (device === 'meta') return;
  const bytes = params * (BYTES_PER_ELEMENT[dtype] ?? 4);
  const limit = memoryLimitBytes();
  if (bytes <= limit && Number.isFinite(bytes)) return;
  const fields = Object.entries(sizing).map(([k, v]) => `${k} ${show(v)}`).join(', ');
  throw new Error(`${configLabel(src)} describes a model of ${params.toPrecision(3)} parameters (${formatBytes(bytes)} in ${dtype}), more than this machine's ${formatBytes(limit)} of memory; check ${fields}`);
}
