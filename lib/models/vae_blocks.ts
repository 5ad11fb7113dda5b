// The VAE's blocks (diffusers' unet_2d_blocks.py: DownEncoderBlock2D, UpDecoderBlock2D, UNetMidBlock2D),
// in the variant AutoencoderKL builds: no time embedding, eps 1e-6, mid-block attention with one head over
// all channels. Field names are the checkpoint's (`down_blocks.0.resnets.0.conv1`, `mid_block.attentions.0.to_q`).
import { Module } from '../nn/module.js';
import { ModuleList } from '../nn/container.js';
import type { Tensor } from '../tensor.js';
import { Attention } from './attention_processor.js';
import { Downsample2D, ResnetBlock2D, Upsample2D } from './resnet.js';

export interface VaeBlockConfig {
  inChannels: number;
  outChannels: number;
  numLayers: number;
  resnetEps: number;
  resnetGroups: number;
}

/** A resnet the way the VAE builds them: no time embedding, silu. */
function vaeResnet(inChannels: number, outChannels: number, c: Pick<VaeBlockConfig, 'resnetEps' | 'resnetGroups'>): ResnetBlock2D {
  return new ResnetBlock2D({ inChannels, outChannels, tembChannels: null, eps: c.resnetEps, groups: c.resnetGroups, nonLinearity: 'silu' });
}

/** numLayers resnets, then (except in the last block) a stride-2 conv with diffusers' asymmetric pad. */
export class DownEncoderBlock2D extends Module {
  resnets: ModuleList<ResnetBlock2D>;
  downsamplers: ModuleList<Downsample2D> | null;

  constructor(c: VaeBlockConfig & { addDownsample: boolean }) {
    super();
    const resnets: ResnetBlock2D[] = [];
    for (let i = 0; i < c.numLayers; i++) resnets.push(vaeResnet(i === 0 ? c.inChannels : c.outChannels, c.outChannels, c));
    this.resnets = new ModuleList(resnets);
    // downsample_padding=0 in the Encoder: Downsample2D pads (0, 1, 0, 1) itself, as the LDM VAE did
    this.downsamplers = c.addDownsample ? new ModuleList([new Downsample2D(c.outChannels, c.outChannels, 0)]) : null;
  }

  forward(x: Tensor): Tensor {
    let h = x;
    for (const resnet of this.resnets) h = resnet.forward(h);
    if (this.downsamplers) for (const down of this.downsamplers) h = down.forward(h);
    return h;
  }
}

/** numLayers resnets (the Decoder passes layers_per_block + 1), then (except in the last block) nearest ×2 + conv. */
export class UpDecoderBlock2D extends Module {
  resnets: ModuleList<ResnetBlock2D>;
  upsamplers: ModuleList<Upsample2D> | null;

  constructor(c: VaeBlockConfig & { addUpsample: boolean }) {
    super();
    const resnets: ResnetBlock2D[] = [];
    for (let i = 0; i < c.numLayers; i++) resnets.push(vaeResnet(i === 0 ? c.inChannels : c.outChannels, c.outChannels, c));
    this.resnets = new ModuleList(resnets);
    this.upsamplers = c.addUpsample ? new ModuleList([new Upsample2D(c.outChannels, c.outChannels)]) : null;
  }

  forward(x: Tensor): Tensor {
    let h = x;
    for (const resnet of this.resnets) h = resnet.forward(h);
    if (this.upsamplers) for (const up of this.upsamplers) h = up.forward(h);
    return h;
  }
}

export interface UNetMidBlock2DConfig {
  channels: number;
  resnetEps: number;
  resnetGroups: number;
  /** Size of each attention head; the VAE passes the channel count, so there is one head. */
  attentionHeadDim: number;
  /** mid_block_add_attention: false leaves the attention out (no weights, no call). */
  addAttention: boolean;
  numLayers?: number;
}

/** resnet, then numLayers × (attention, resnet), all at one channel count. */
export class UNetMidBlock2D extends Module {
  attentions: ModuleList<Attention>;
  resnets: ModuleList<ResnetBlock2D>;

  constructor(c: UNetMidBlock2DConfig) {
    super();
    const layers = c.numLayers ?? 1;
    const resnets = [vaeResnet(c.channels, c.channels, c)];
    const attentions: Attention[] = [];
    for (let i = 0; i < layers; i++) {
      if (c.addAttention) attentions.push(midAttention(c));
      resnets.push(vaeResnet(c.channels, c.channels, c));
    }
    // diffusers declares attentions before resnets: keep its state-dict order
    this.attentions = new ModuleList(attentions);
    this.resnets = new ModuleList(resnets);
  }

  forward(x: Tensor): Tensor {
    let h = this.resnets.at(0).forward(x);
    for (let i = 1; i < this.resnets.length; i++) {
      // with addAttention false the list is empty: diffusers keeps None there and skips it
      if (this.attentions.length) h = this.attentions.at(i - 1).forward(h);
      h = this.resnets.at(i).forward(h);
    }
    return h;
  }
}

/**
 * The mid-block self-attention over the H·W positions: GroupNorm first, the input added back after
 * to_out (residual_connection), biased projections. upcast_softmax is set as diffusers sets it.
 */
function midAttention(c: UNetMidBlock2DConfig): Attention {
  if (c.channels % c.attentionHeadDim !== 0) throw new Error(`UNetMidBlock2D: channels (${c.channels}) must be divisible by attention_head_dim (${c.attentionHeadDim})`);
  return new Attention({
    queryDim: c.channels,
    heads: c.channels / c.attentionHeadDim,
    dimHead: c.attentionHeadDim,
    normNumGroups: c.resnetGroups,
    eps: c.resnetEps,
    bias: true,
    residualConnection: true,
    rescaleOutputFactor: 1,
    upcastSoftmax: true,
  });
}
