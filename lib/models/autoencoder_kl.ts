// AutoencoderKL (diffusers' autoencoders/autoencoder_kl.py): images ↔ latents. Built from the component's
// config.json with diffusers' field names and defaults; loaded strictly from its safetensors weights.
import { join } from 'node:path';
import { Module } from '../nn/module.js';
import { Conv2d } from '../nn/layers.js';
import { dispose } from '../scope.js';
import type { Generator } from '../random.js';
import type { Tensor } from '../tensor.js';
import { getDefaultDevice } from '../torch.js';
import { CONFIG_LIMITS, ConfigFields, refuseUnknownFields, show, type ConfigSource } from './config.js';
import { loadStateDictChecked, loadWeights, pretrainedDir, readConfig, type FromPretrainedOptions } from './loading.js';
import { attentionParams, checkModelFits, conv2dParams, normParams, resnetParams } from './model_size.js';
import { Decoder, DiagonalGaussianDistribution, Encoder } from './vae.js';

/** config.json of an AutoencoderKL, diffusers 0.31 field names. */
export interface AutoencoderKLConfig {
  in_channels: number;
  out_channels: number;
  down_block_types: string[];
  up_block_types: string[];
  block_out_channels: number[];
  layers_per_block: number;
  act_fn: string;
  latent_channels: number;
  norm_num_groups: number;
  sample_size: number | number[];
  scaling_factor: number;
  shift_factor: number | null;
  latents_mean: number[] | null;
  latents_std: number[] | null;
  force_upcast: boolean;
  use_quant_conv: boolean;
  use_post_quant_conv: boolean;
  mid_block_add_attention: boolean;
}

/** diffusers' defaults (AutoencoderKL.__init__), used for fields a config.json leaves out. */
export const AUTOENCODER_KL_DEFAULTS: AutoencoderKLConfig = {
  in_channels: 3,
  out_channels: 3,
  down_block_types: ['DownEncoderBlock2D'],
  up_block_types: ['UpDecoderBlock2D'],
  block_out_channels: [64],
  layers_per_block: 1,
  act_fn: 'silu',
  latent_channels: 4,
  norm_num_groups: 32,
  sample_size: 32,
  scaling_factor: 0.18215,
  shift_factor: null,
  latents_mean: null,
  latents_std: null,
  force_upcast: true,
  use_quant_conv: true,
  use_post_quant_conv: true,
  mid_block_add_attention: true,
};

export class AutoencoderKL extends Module {
  encoder: Encoder;
  decoder: Decoder;
  quant_conv: Conv2d | null;
  post_quant_conv: Conv2d | null;
  readonly config: AutoencoderKLConfig;

  /** `configFile` (where the config came from) is named in errors. */
  constructor(config: Partial<AutoencoderKLConfig> | Record<string, unknown> = {}, o: { configFile?: string } = {}) {
    super();
    const c = parseConfig(config, o.configFile);
    // count before building: a config asking for more than the machine holds must not abort the process
    checkModelFits(source(o.configFile), autoencoderKLParameterCount(c), 'float32', getDefaultDevice(), {
      block_out_channels: c.block_out_channels, layers_per_block: c.layers_per_block, latent_channels: c.latent_channels,
    });
    this.config = c;
    this.encoder = new Encoder({
      inChannels: c.in_channels,
      outChannels: c.latent_channels,
      blockOutChannels: c.block_out_channels,
      layersPerBlock: c.layers_per_block,
      normNumGroups: c.norm_num_groups,
      doubleZ: true,
      midBlockAddAttention: c.mid_block_add_attention,
    });
    this.decoder = new Decoder({
      inChannels: c.latent_channels,
      outChannels: c.out_channels,
      blockOutChannels: c.block_out_channels,
      layersPerBlock: c.layers_per_block,
      normNumGroups: c.norm_num_groups,
      midBlockAddAttention: c.mid_block_add_attention,
    });
    const moments = 2 * c.latent_channels;
    this.quant_conv = c.use_quant_conv ? new Conv2d(moments, moments, 1) : null;
    this.post_quant_conv = c.use_post_quant_conv ? new Conv2d(c.latent_channels, c.latent_channels, 1) : null;
  }

  /** Latents are multiplied by this before the UNet sees them (and divided before decoding). */
  get scalingFactor(): number { return this.config.scaling_factor; }
  /** Subtracted before scaling where a config sets it (SD3/Flux VAEs); null for SD 1.x/2.x. */
  get shiftFactor(): number | null { return this.config.shift_factor; }
  /** Pipelines run this VAE in fp32 even when the rest is fp16 (its activations overflow fp16). */
  get forceUpcast(): boolean { return this.config.force_upcast; }

  /** Images [B, in, H, W] in [-1, 1] → the posterior over latents [B, latent, H/f, W/f]. */
  encode(x: Tensor): DiagonalGaussianDistribution {
    // 1. encoder → moments (mean and logvar stacked on the channels)
    const h = this.encoder.forward(x);
    // 2. quant_conv mixes them (a 1×1 conv kept from the VQ-GAN lineage)
    const moments = this.quant_conv ? this.quant_conv.forward(h) : h;
    return new DiagonalGaussianDistribution(moments);
  }

  /** Latents [B, latent, h, w] (unscaled) → images [B, out, h·f, w·f], roughly in [-1, 1]. */
  decode(z: Tensor): Tensor {
    // 1. post_quant_conv, 2. decoder
    const h = this.post_quant_conv ? this.post_quant_conv.forward(z) : z;
    return this.decoder.forward(h);
  }

  /** encode then decode, through a sample of the posterior when a generator is given, else its mode. */
  forward(x: Tensor, o: { samplePosterior?: boolean; generator?: Generator } = {}): Tensor {
    const posterior = this.encode(x);
    const z = o.samplePosterior ? posterior.sample(o.generator) : posterior.mode();
    return this.decode(z);
  }

  /**
   * From a diffusers folder: `fromPretrained('path/to/sd', { subfolder: 'vae' })` or a VAE folder itself.
   * Weights load strictly (missing, unexpected or mis-shaped keys are an error); checkpoints with the old
   * attention names (query/key/value/proj_attn, 1×1-conv shapes) are converted on the way in.
   */
  static fromPretrained(pathOrId: string, o: FromPretrainedOptions = {}): AutoencoderKL {
    const dir = pretrainedDir(pathOrId, o, 'AutoencoderKL.fromPretrained');
    const configFile = join(dir, 'config.json');
    const model = new AutoencoderKL(readConfig(dir), { configFile });
    try {
      // cast/move once, after the copy: copy_ converts from the file's dtype exactly
      const loaded = loadWeights(dir, 'diffusion_pytorch_model', { variant: o.variant });
      const converted = convertDeprecatedAttention(loaded);
      try {
        loadStateDictChecked(model, converted, dir, configFile);
      } finally {
        dispose([...loaded.values(), ...converted.values()]);
      }
      if (o.dtype !== undefined || o.device !== undefined) model.to({ dtype: o.dtype, device: o.device });
      return model.eval().requiresGrad_(false); // frozen by default, as the training script freezes it
    } catch (e) {
      model.dispose();
      throw e;
    }
  }
}

// ---- config

const BLOCK_TYPES = { down_block_types: 'DownEncoderBlock2D', up_block_types: 'UpDecoderBlock2D' } as const;
const source = (file?: string): ConfigSource => ({ model: 'AutoencoderKL', file });

/** Fills diffusers' defaults and refuses what this implementation would silently get wrong; `file` is named in errors. */
export function parseConfig(raw: object, file?: string): AutoencoderKLConfig {
  const src = source(file);
  refuseUnknownFields(raw as Record<string, unknown>, new Set(Object.keys(AUTOENCODER_KL_DEFAULTS)), src, 'diffusers 0.31 AutoencoderKL');
  const c = { ...AUTOENCODER_KL_DEFAULTS, ...withoutUndefined(raw) } as AutoencoderKLConfig;
  const f = new ConfigFields(c as unknown as Record<string, unknown>, src);
  for (const k of ['in_channels', 'out_channels', 'latent_channels', 'norm_num_groups'] as const) f.int(k);
  f.int('layers_per_block', { max: CONFIG_LIMITS.layers });
  const channels = f.intList('block_out_channels');
  for (const [field, supported] of Object.entries(BLOCK_TYPES) as [keyof typeof BLOCK_TYPES, string][]) {
    const types = c[field];
    if (!Array.isArray(types) || types.length !== channels.length) {
      f.fail(field, `must list one block per block_out_channels entry (${channels.length}), got ${show(types)}`);
    }
    const bad = types.find((t) => t !== supported);
    if (bad !== undefined) f.fail(field, `contains unsupported block type ${show(bad)}; only '${supported}' is implemented`);
  }
  // every GroupNorm runs over one block's width
  const odd = channels.findIndex((ch) => ch % c.norm_num_groups !== 0);
  if (odd >= 0) f.fail('norm_num_groups', `= ${c.norm_num_groups} does not divide block_out_channels[${odd}] = ${channels[odd]} (GroupNorm needs channels divisible by groups)`);
  // swish is diffusers' other name for silu
  if (c.act_fn !== 'silu' && c.act_fn !== 'swish') f.fail('act_fn', `${show(c.act_fn)} is not supported; only 'silu' is implemented`);
  f.number('scaling_factor', { above: 0 }); // latents are divided by it before decoding
  if (c.shift_factor !== null) f.number('shift_factor');
  // read by pipelines that normalise latents per channel (SDXL-era VAEs): one number per latent channel
  for (const k of ['latents_mean', 'latents_std'] as const) {
    const v = c[k];
    if (v === null) continue;
    if (!Array.isArray(v) || v.length !== c.latent_channels || !v.every((x) => typeof x === 'number' && Number.isFinite(x))) {
      f.fail(k, `must be null or a list of ${c.latent_channels} numbers (one per latent channel), got ${show(v)}`);
    }
  }
  const size = c.sample_size;
  if (Array.isArray(size)) f.intList('sample_size', {}, 2);
  else f.int('sample_size');
  for (const k of ['force_upcast', 'use_quant_conv', 'use_post_quant_conv', 'mid_block_add_attention'] as const) f.bool(k);
  return c;
}

/** Parameters of the AutoencoderKL `c` describes, counted as the constructor builds it. */
export function autoencoderKLParameterCount(c: AutoencoderKLConfig): number {
  const ch = c.block_out_channels;
  const widest = ch[ch.length - 1] ?? 0;
  const mid = 2 * resnetParams(widest, widest, null) + (c.mid_block_add_attention ? attentionParams(widest, widest, widest, { bias: true, groupNorm: true }) : 0);
  // encoder: conv_in, per block layers resnets (the first widening) and a downsampler but in the last, mid, norm, conv_out to 2·latent
  let total = conv2dParams(c.in_channels, ch[0] ?? 0, 3) + mid + normParams(widest) + conv2dParams(widest, 2 * c.latent_channels, 3);
  ch.forEach((out, i) => {
    const input = i === 0 ? out : (ch[i - 1] ?? out);
    total += resnetParams(input, out, null) + (c.layers_per_block - 1) * resnetParams(out, out, null);
    if (i < ch.length - 1) total += conv2dParams(out, out, 3);
  });
  // decoder: the same walked back, layers + 1 resnets per block, upsamplers
  const reversed = [...ch].reverse();
  total += conv2dParams(c.latent_channels, widest, 3) + mid + normParams(ch[0] ?? 0) + conv2dParams(ch[0] ?? 0, c.out_channels, 3);
  reversed.forEach((out, i) => {
    const input = i === 0 ? out : (reversed[i - 1] ?? out);
    total += resnetParams(input, out, null) + c.layers_per_block * resnetParams(out, out, null);
    if (i < reversed.length - 1) total += conv2dParams(out, out, 3);
  });
  if (c.use_quant_conv) total += conv2dParams(2 * c.latent_channels, 2 * c.latent_channels, 1);
  if (c.use_post_quant_conv) total += conv2dParams(c.latent_channels, c.latent_channels, 1);
  return total;
}

function withoutUndefined(o: object): Record<string, unknown> {
  return Object.fromEntries(Object.entries(o).filter(([k, v]) => v !== undefined && !k.startsWith('_')));
}

// ---- legacy checkpoints (an edge converter: the model only ever sees today's names)

const OLD_ATTENTION_NAMES: Record<string, string> = { query: 'to_q', key: 'to_k', value: 'to_v', proj_attn: 'to_out.0' };
const OLD_ATTENTION_KEY = /^(.*\.mid_block\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$/;
const ATTENTION_PROJECTION = /\.mid_block\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$/;

/**
 * Maps checkpoints saved before diffusers renamed the VAE attention (query/key/value/proj_attn →
 * to_q/to_k/to_v/to_out.0) and LDM-converted ones whose projections are 1×1 convs ([C, C, 1, 1] → [C, C]).
 * Returns new map entries (views where converted); the input tensors are not disposed.
 */
export function convertDeprecatedAttention(weights: Map<string, Tensor>): Map<string, Tensor> {
  const out = new Map<string, Tensor>();
  for (const [key, t] of weights) {
    const m = OLD_ATTENTION_KEY.exec(key);
    const name = m ? `${m[1]}${OLD_ATTENTION_NAMES[m[2] ?? '']}.${m[3]}` : key;
    if (out.has(name)) throw new Error(`VAE checkpoint holds both '${key}' and its current name '${name}'`);
    const convShaped = ATTENTION_PROJECTION.test(name) && t.ndim === 4 && t.shape[2] === 1 && t.shape[3] === 1;
    out.set(name, convShaped ? t.reshape(t.shape[0] ?? 0, t.shape[1] ?? 0) : t);
  }
  return out;
}
