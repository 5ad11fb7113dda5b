// The VAE's encoder and decoder and the latent distribution between them (diffusers'
// autoencoders/vae.py: Encoder, Decoder, DiagonalGaussianDistribution).
import { Module } from '../nn/module.js';
import { ModuleList } from '../nn/container.js';
import { Conv2d, GroupNorm } from '../nn/layers.js';
import { tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import type { Generator } from '../random.js';
import { DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D } from './vae_blocks.js';

export interface EncoderConfig {
  inChannels: number;
  /** Latent channels; the encoder emits twice as many (mean and logvar) when doubleZ. */
  outChannels: number;
  blockOutChannels: readonly number[];
  layersPerBlock: number;
  normNumGroups: number;
  doubleZ?: boolean;
  midBlockAddAttention?: boolean;
}

// Every norm in the VAE uses eps 1e-6 (diffusers hard-codes it in Encoder/Decoder).
const EPS = 1e-6;

/** Image [B, in, H, W] → moments [B, 2·latent, H/2^(n-1), W/2^(n-1)]. */
export class Encoder extends Module {
  conv_in: Conv2d;
  down_blocks: ModuleList<DownEncoderBlock2D>;
  mid_block: UNetMidBlock2D;
  conv_norm_out: GroupNorm;
  conv_out: Conv2d;

  constructor(c: EncoderConfig) {
    super();
    const channels = c.blockOutChannels;
    const last = lastOf(channels);
    this.conv_in = new Conv2d(c.inChannels, firstOf(channels), 3, { padding: 1 });
    this.down_blocks = new ModuleList(channels.map((out, i) => new DownEncoderBlock2D({
      inChannels: i === 0 ? out : (channels[i - 1] ?? out),
      outChannels: out,
      numLayers: c.layersPerBlock,
      resnetEps: EPS,
      resnetGroups: c.normNumGroups,
      addDownsample: i < channels.length - 1,
    })));
    this.mid_block = vaeMidBlock(last, c.normNumGroups, c.midBlockAddAttention ?? true);
    this.conv_norm_out = new GroupNorm(c.normNumGroups, last, EPS);
    this.conv_out = new Conv2d(last, (c.doubleZ ?? true) ? 2 * c.outChannels : c.outChannels, 3, { padding: 1 });
  }

  forward(sample: Tensor): Tensor {
    // 1. stem
    let h = this.conv_in.forward(sample);
    // 2. down: resnets, then a stride-2 conv between resolutions
    for (const block of this.down_blocks) h = block.forward(h);
    // 3. mid: resnet, attention, resnet
    h = this.mid_block.forward(h);
    // 4. out: norm, silu (conv_act), conv to the moments
    return this.conv_out.forward(this.conv_norm_out.forwardSilu(h));
  }
}

export interface DecoderConfig {
  /** Latent channels. */
  inChannels: number;
  outChannels: number;
  blockOutChannels: readonly number[];
  layersPerBlock: number;
  normNumGroups: number;
  midBlockAddAttention?: boolean;
}

/** Latent [B, latent, h, w] → image [B, out, h·2^(n-1), w·2^(n-1)]. */
export class Decoder extends Module {
  conv_in: Conv2d;
  up_blocks: ModuleList<UpDecoderBlock2D>;
  mid_block: UNetMidBlock2D;
  conv_norm_out: GroupNorm;
  conv_out: Conv2d;

  constructor(c: DecoderConfig) {
    super();
    // the decoder walks the channels from the widest back to the first
    const reversed = [...c.blockOutChannels].reverse();
    const widest = firstOf(reversed);
    this.conv_in = new Conv2d(c.inChannels, widest, 3, { padding: 1 });
    // up_blocks before mid_block: diffusers registers the (then empty) up_blocks list first, and the
    // state-dict order follows registration
    this.up_blocks = new ModuleList(reversed.map((out, i) => new UpDecoderBlock2D({
      inChannels: i === 0 ? out : (reversed[i - 1] ?? out),
      outChannels: out,
      // one more resnet per block than the encoder (diffusers: layers_per_block + 1)
      numLayers: c.layersPerBlock + 1,
      resnetEps: EPS,
      resnetGroups: c.normNumGroups,
      addUpsample: i < reversed.length - 1,
    })));
    this.mid_block = vaeMidBlock(widest, c.normNumGroups, c.midBlockAddAttention ?? true);
    this.conv_norm_out = new GroupNorm(c.normNumGroups, lastOf(reversed), EPS);
    this.conv_out = new Conv2d(lastOf(reversed), c.outChannels, 3, { padding: 1 });
  }

  forward(z: Tensor): Tensor {
    // 1. stem
    let h = this.conv_in.forward(z);
    // 2. mid: resnet, attention, resnet
    h = this.mid_block.forward(h);
    // 3. up: resnets, then nearest ×2 + conv between resolutions
    for (const block of this.up_blocks) h = block.forward(h);
    // 4. out: norm, silu (conv_act), conv to pixels
    return this.conv_out.forward(this.conv_norm_out.forwardSilu(h));
  }
}

/** diffusers builds both mid blocks alike: one head spanning all channels. */
function vaeMidBlock(channels: number, groups: number, addAttention: boolean): UNetMidBlock2D {
  return new UNetMidBlock2D({ channels, resnetEps: EPS, resnetGroups: groups, attentionHeadDim: channels, addAttention });
}

function firstOf(xs: readonly number[]): number {
  const x = xs[0];
  if (x === undefined) throw new Error('block_out_channels must not be empty');
  return x;
}

function lastOf(xs: readonly number[]): number {
  return firstOf(xs.slice(-1));
}

/**
 * The encoder's posterior: a Gaussian per latent element, from moments [B, 2C, h, w] split along the
 * channels into mean and log-variance. Its tensors belong to the caller's scope: use it inside the tidy
 * that encoded, or call dispose().
 */
export class DiagonalGaussianDistribution {
  readonly parameters: Tensor;
  readonly mean: Tensor;
  /** Clamped to [-30, 20] so exp() stays finite. */
  readonly logvar: Tensor;
  readonly std: Tensor;
  readonly var: Tensor;

  constructor(parameters: Tensor) {
    this.parameters = parameters;
    // tidy: the unclamped half and logvar·0.5 are freed here, not left to the caller's scope
    [this.mean, this.logvar, this.std, this.var] = tidy(() => {
      const [mean, raw] = parameters.chunk(2, 1) as [Tensor, Tensor];
      const logvar = raw.clamp(-30, 20);
      return [mean, logvar, logvar.mul(0.5).exp(), logvar.exp()];
    });
  }

  /**
   * mean + std · ε, ε ~ N(0, 1) drawn as diffusers' randn_tensor: with the mean's shape and dtype, on the
   * generator's device when it is the CPU (then moved), so a seeded CPU generator gives the same latents anywhere.
   */
  sample(generator?: Generator): Tensor {
    const device = this.parameters.device;
    const drawOn = generator?.device ?? device;
    if (generator && deviceType(drawOn) !== deviceType(device) && deviceType(drawOn) !== 'cpu') {
      throw new Error(`DiagonalGaussianDistribution.sample: cannot draw on a '${drawOn}' generator for latents on '${device}'; use a CPU generator or one on '${device}'`);
    }
    let noise = torch.randn(this.mean.shape, { generator, dtype: this.parameters.dtype, device: generator ? drawOn : device });
    if (noise.device !== device) noise = noise.to({ device });
    return this.mean.add(this.std.mul(noise));
  }

  /** The most likely latent: the mean. */
  mode(): Tensor {
    return this.mean;
  }

  dispose(): void {
    for (const t of [this.parameters, this.mean, this.logvar, this.std, this.var]) if (!t.isDisposed) t.dispose();
  }
}

function deviceType(device: string): string {
  return device.split(':')[0] ?? device;
}
