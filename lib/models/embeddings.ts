// The UNet's time conditioning (diffusers' embeddings.py): Timesteps turns a timestep number into sinusoids,
// TimestepEmbedding (linear_1, act, linear_2) turns those into the vector every ResnetBlock2D adds.
import * as F from '../functional.js';
import * as torch from '../torch.js';
import { Module } from '../nn/module.js';
import { Linear } from '../nn/layers.js';
import type { Tensor } from '../tensor.js';

export interface TimestepEmbeddingOptions {
  /** [cos, sin] instead of [sin, cos] (SD checkpoints were trained with cos first). */
  flipSinToCos?: boolean;
  /** diffusers' downscale_freq_shift (the config's freq_shift): frequencies exp(-ln(maxPeriod)·i/(half − shift)). */
  downscaleFreqShift?: number;
  scale?: number;
  maxPeriod?: number;
}

/**
 * diffusers' get_timestep_embedding: timesteps [N] (any dtype) → [N, dim] float32, op for op so the
 * frequencies round exactly as the reference's.
 */
export function getTimestepEmbedding(timesteps: Tensor, dim: number, o: TimestepEmbeddingOptions = {}): Tensor {
  if (timesteps.ndim !== 1) throw new Error(`timesteps should be a 1-D tensor, got shape [${timesteps.shape.join(', ')}]`);
  const half = Math.floor(dim / 2);
  const shift = o.downscaleFreqShift ?? 1;
  // 1. frequencies: exp(-ln(max_period) · i / (half − shift)), i = 0 … half−1, in float32
  const exponent = torch.arange(0, half, 1, { dtype: 'float32', device: timesteps.device })
    .mul(-Math.log(o.maxPeriod ?? 10000)).div(half - shift);
  // 2. angles: timestep × frequency, [N, half]
  const t = timesteps.dtype === 'float32' ? timesteps : timesteps.float();
  let angles = t.unsqueeze(1).mul(exponent.exp().unsqueeze(0));
  if ((o.scale ?? 1) !== 1) angles = angles.mul(o.scale ?? 1);
  // 3. [sin, cos], or [cos, sin] when flipped (the same values diffusers gets by swapping the halves)
  const emb = o.flipSinToCos ? torch.cat([angles.cos(), angles.sin()], -1) : torch.cat([angles.sin(), angles.cos()], -1);
  // 4. an odd dim gets one zero column
  return dim % 2 === 1 ? F.pad(emb, [0, 1, 0, 0]) : emb;
}

/** Sinusoidal projection of timesteps; no weights (diffusers' Timesteps). */
export class Timesteps extends Module {
  constructor(
    readonly numChannels: number,
    readonly flipSinToCos: boolean,
    readonly downscaleFreqShift: number,
    readonly scale = 1,
  ) {
    super();
  }

  forward(timesteps: Tensor): Tensor {
    return getTimestepEmbedding(timesteps, this.numChannels, {
      flipSinToCos: this.flipSinToCos,
      downscaleFreqShift: this.downscaleFreqShift,
      scale: this.scale,
    });
  }
}

/** linear_1 → act → linear_2 (diffusers' TimestepEmbedding without cond_proj or post_act). */
export class TimestepEmbedding extends Module {
  linear_1: Linear;
  linear_2: Linear;

  constructor(inChannels: number, timeEmbedDim: number, actFn: 'silu' | 'swish' = 'silu') {
    super();
    if (actFn !== 'silu' && actFn !== 'swish') throw new Error(`TimestepEmbedding: unsupported act_fn '${String(actFn)}'`);
    this.linear_1 = new Linear(inChannels, timeEmbedDim);
    this.linear_2 = new Linear(timeEmbedDim, timeEmbedDim);
  }

  forward(sample: Tensor): Tensor {
    return this.linear_2.forward(this.linear_1.forward(sample).silu());
  }
}
