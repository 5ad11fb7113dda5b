// The UNet's blocks (diffusers' unets/unet_2d_blocks.py) that SD 1.x/2.x configs name: CrossAttnDownBlock2D,
// DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D, CrossAttnUpBlock2D. A closed union per position, picked
// from the config's type strings; `kind` is that string, so the UNet branches on it rather than on shape.
import * as torch from '../torch.js';
import { Module } from '../nn/module.js';
import { ModuleList } from '../nn/container.js';
import type { Tensor } from '../tensor.js';
import { Downsample2D, ResnetBlock2D, Upsample2D } from './resnet.js';
import { Transformer2DModel } from './transformer_2d.js';

/** What every block needs (the UNet fills it from its config, per block). */
export interface UNetBlockConfig {
  numLayers: number;
  inChannels: number;
  outChannels: number;
  tembChannels: number;
  resnetEps: number;
  resnetGroups: number;
  dropout: number;
}

/** The attention blocks' extra settings. */
export interface CrossAttnConfig {
  /** Heads per attention; each head is outChannels / heads wide. */
  numAttentionHeads: number;
  crossAttentionDim: number;
  transformerLayersPerBlock: number;
  useLinearProjection: boolean;
  upcastAttention: boolean;
}

export interface DownBlockConfig extends UNetBlockConfig { addDownsample: boolean; downsamplePadding: number }
export interface UpBlockConfig extends UNetBlockConfig { prevOutputChannel: number; addUpsample: boolean }

function resnet(inChannels: number, outChannels: number, c: UNetBlockConfig, outputScaleFactor = 1): ResnetBlock2D {
  return new ResnetBlock2D({
    inChannels, outChannels, tembChannels: c.tembChannels, eps: c.resnetEps, groups: c.resnetGroups,
    dropout: c.dropout, nonLinearity: 'silu', outputScaleFactor,
  });
}

function transformer(channels: number, c: UNetBlockConfig & CrossAttnConfig): Transformer2DModel {
  return new Transformer2DModel({
    numAttentionHeads: c.numAttentionHeads,
    attentionHeadDim: Math.floor(channels / c.numAttentionHeads),
    inChannels: channels,
    numLayers: c.transformerLayersPerBlock,
    crossAttentionDim: c.crossAttentionDim,
    normNumGroups: c.resnetGroups,
    useLinearProjection: c.useLinearProjection,
    upcastAttention: c.upcastAttention,
  });
}

function downsamplers(c: DownBlockConfig): ModuleList<Downsample2D> | null {
  return c.addDownsample ? new ModuleList([new Downsample2D(c.outChannels, c.outChannels, c.downsamplePadding)]) : null;
}

function upsamplers(c: UpBlockConfig): ModuleList<Upsample2D> | null {
  return c.addUpsample ? new ModuleList([new Upsample2D(c.outChannels, c.outChannels)]) : null;
}

/** Up-block resnet i takes the previous output concatenated with skip connection i. */
function upResnets(c: UpBlockConfig): ResnetBlock2D[] {
  const out: ResnetBlock2D[] = [];
  for (let i = 0; i < c.numLayers; i++) {
    // the last resnet's skip is the down path's block input (inChannels); the others are block outputs
    const skip = i === c.numLayers - 1 ? c.inChannels : c.outChannels;
    const input = i === 0 ? c.prevOutputChannel : c.outChannels;
    out.push(resnet(input + skip, c.outChannels, c));
  }
  return out;
}

/** The skip for up-block resnet i: they are consumed from the end, as diffusers pops them. */
function skipFor(res: Tensor[], i: number): Tensor {
  const r = res[res.length - 1 - i];
  if (!r) throw new Error(`up block: ${res.length} skip connection(s) given, resnet ${i} needs one more`);
  return r;
}

// ---- down

/** numLayers × (resnet, transformer), then a stride-2 conv; returns the output and every skip connection. */
export class CrossAttnDownBlock2D extends Module {
  readonly kind = 'CrossAttnDownBlock2D';
  attentions: ModuleList<Transformer2DModel>;
  resnets: ModuleList<ResnetBlock2D>;
  downsamplers: ModuleList<Downsample2D> | null;

  constructor(c: DownBlockConfig & CrossAttnConfig) {
    super();
    const resnets: ResnetBlock2D[] = [];
    const attentions: Transformer2DModel[] = [];
    for (let i = 0; i < c.numLayers; i++) {
      resnets.push(resnet(i === 0 ? c.inChannels : c.outChannels, c.outChannels, c));
      attentions.push(transformer(c.outChannels, c));
    }
    this.attentions = new ModuleList(attentions);
    this.resnets = new ModuleList(resnets);
    this.downsamplers = downsamplers(c);
  }

  forward(hiddenStates: Tensor, temb: Tensor, encoderHiddenStates: Tensor): [Tensor, Tensor[]] {
    const skips: Tensor[] = [];
    let h = hiddenStates;
    for (let i = 0; i < this.resnets.length; i++) {
      h = this.resnets.at(i).forward(h, temb);
      h = this.attentions.at(i).forward(h, encoderHiddenStates);
      skips.push(h);
    }
    if (this.downsamplers) {
      for (const down of this.downsamplers) h = down.forward(h);
      skips.push(h);
    }
    return [h, skips];
  }
}

/** numLayers resnets, then a stride-2 conv; returns the output and every skip connection. */
export class DownBlock2D extends Module {
  readonly kind = 'DownBlock2D';
  resnets: ModuleList<ResnetBlock2D>;
  downsamplers: ModuleList<Downsample2D> | null;

  constructor(c: DownBlockConfig) {
    super();
    const resnets: ResnetBlock2D[] = [];
    for (let i = 0; i < c.numLayers; i++) resnets.push(resnet(i === 0 ? c.inChannels : c.outChannels, c.outChannels, c));
    this.resnets = new ModuleList(resnets);
    this.downsamplers = downsamplers(c);
  }

  forward(hiddenStates: Tensor, temb: Tensor): [Tensor, Tensor[]] {
    const skips: Tensor[] = [];
    let h = hiddenStates;
    for (const r of this.resnets) {
      h = r.forward(h, temb);
      skips.push(h);
    }
    if (this.downsamplers) {
      for (const down of this.downsamplers) h = down.forward(h);
      skips.push(h);
    }
    return [h, skips];
  }
}

// ---- mid

/** resnet, then numLayers × (transformer, resnet), all at one channel count. */
export class UNetMidBlock2DCrossAttn extends Module {
  readonly kind = 'UNetMidBlock2DCrossAttn';
  attentions: ModuleList<Transformer2DModel>;
  resnets: ModuleList<ResnetBlock2D>;

  constructor(c: Omit<UNetBlockConfig, 'outChannels'> & CrossAttnConfig & { outputScaleFactor: number }) {
    super();
    const channels = { ...c, outChannels: c.inChannels };
    const resnets = [resnet(c.inChannels, c.inChannels, channels, c.outputScaleFactor)];
    const attentions: Transformer2DModel[] = [];
    for (let i = 0; i < c.numLayers; i++) {
      attentions.push(transformer(c.inChannels, channels));
      resnets.push(resnet(c.inChannels, c.inChannels, channels, c.outputScaleFactor));
    }
    this.attentions = new ModuleList(attentions);
    this.resnets = new ModuleList(resnets);
  }

  forward(hiddenStates: Tensor, temb: Tensor, encoderHiddenStates: Tensor): Tensor {
    let h = this.resnets.at(0).forward(hiddenStates, temb);
    for (let i = 0; i < this.attentions.length; i++) {
      h = this.attentions.at(i).forward(h, encoderHiddenStates);
      h = this.resnets.at(i + 1).forward(h, temb);
    }
    return h;
  }
}

// ---- up

/** numLayers × (concat skip, resnet, transformer), then nearest ×2 (or to upsampleSize) + conv. */
export class CrossAttnUpBlock2D extends Module {
  readonly kind = 'CrossAttnUpBlock2D';
  attentions: ModuleList<Transformer2DModel>;
  resnets: ModuleList<ResnetBlock2D>;
  upsamplers: ModuleList<Upsample2D> | null;

  constructor(c: UpBlockConfig & CrossAttnConfig) {
    super();
    const resnets = upResnets(c);
    this.attentions = new ModuleList(resnets.map(() => transformer(c.outChannels, c)));
    this.resnets = new ModuleList(resnets);
    this.upsamplers = upsamplers(c);
  }

  forward(hiddenStates: Tensor, skips: Tensor[], temb: Tensor, encoderHiddenStates: Tensor, upsampleSize?: [number, number]): Tensor {
    let h = hiddenStates;
    for (let i = 0; i < this.resnets.length; i++) {
      h = this.resnets.at(i).forward(torch.cat([h, skipFor(skips, i)], 1), temb);
      h = this.attentions.at(i).forward(h, encoderHiddenStates);
    }
    if (this.upsamplers) for (const up of this.upsamplers) h = up.forward(h, upsampleSize);
    return h;
  }
}

/** numLayers × (concat skip, resnet), then nearest ×2 (or to upsampleSize) + conv. */
export class UpBlock2D extends Module {
  readonly kind = 'UpBlock2D';
  resnets: ModuleList<ResnetBlock2D>;
  upsamplers: ModuleList<Upsample2D> | null;

  constructor(c: UpBlockConfig) {
    super();
    this.resnets = new ModuleList(upResnets(c));
    this.upsamplers = upsamplers(c);
  }

  forward(hiddenStates: Tensor, skips: Tensor[], temb: Tensor, upsampleSize?: [number, number]): Tensor {
    let h = hiddenStates;
    for (let i = 0; i < this.resnets.length; i++) h = this.resnets.at(i).forward(torch.cat([h, skipFor(skips, i)], 1), temb);
    if (this.upsamplers) for (const up of this.upsamplers) h = up.forward(h, upsampleSize);
    return h;
  }
}

// ---- the closed unions and their constructors from type strings

export type DownBlock = CrossAttnDownBlock2D | DownBlock2D;
export type UpBlock = CrossAttnUpBlock2D | UpBlock2D;
export type MidBlock = UNetMidBlock2DCrossAttn;
export const DOWN_BLOCK_TYPES = ['CrossAttnDownBlock2D', 'DownBlock2D'] as const;
export const UP_BLOCK_TYPES = ['UpBlock2D', 'CrossAttnUpBlock2D'] as const;
export const MID_BLOCK_TYPES = ['UNetMidBlock2DCrossAttn'] as const;

/** diffusers accepts the old "UNetRes" prefix (UNetResDownBlock2D) for the same blocks. */
const stripPrefix = (type: string): string => (type.startsWith('UNetRes') ? type.slice(7) : type);

function unknownType(field: string, type: unknown, supported: readonly string[]): Error {
  return new Error(`UNet2DConditionModel config: '${field}' names block type ${JSON.stringify(type)}, which is not implemented (supported: ${supported.join(', ')})`);
}

export function getDownBlock(type: string, c: DownBlockConfig & CrossAttnConfig): DownBlock {
  switch (stripPrefix(type)) {
    case 'CrossAttnDownBlock2D': return new CrossAttnDownBlock2D(c);
    case 'DownBlock2D': return new DownBlock2D(c);
    default: throw unknownType('down_block_types', type, DOWN_BLOCK_TYPES);
  }
}

export function getUpBlock(type: string, c: UpBlockConfig & CrossAttnConfig): UpBlock {
  switch (stripPrefix(type)) {
    case 'CrossAttnUpBlock2D': return new CrossAttnUpBlock2D(c);
    case 'UpBlock2D': return new UpBlock2D(c);
    default: throw unknownType('up_block_types', type, UP_BLOCK_TYPES);
  }
}

export function getMidBlock(type: string, c: ConstructorParameters<typeof UNetMidBlock2DCrossAttn>[0]): MidBlock {
  if (type === 'UNetMidBlock2DCrossAttn') return new UNetMidBlock2DCrossAttn(c);
  throw unknownType('mid_block_type', type, MID_BLOCK_TYPES);
}
