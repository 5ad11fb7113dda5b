// UNet2DConditionModel (diffusers' unets/unet_2d_condition.py): the noise predictor of SD 1.x/2.x and SDXL
// (addition_embed_type 'text_time': pooled text and size/crop ids added to the time embedding). Built from the
// component's config.json (diffusers 0.31 field names, camelCased); every field that SD 1.x/2.x and SDXL
// checkpoints use is honoured, and a value that would change the math in a way not implemented here is an
// error naming the field, never ignored.
import { join } from 'node:path';
import * as torch from '../torch.js';
import { isGradEnabled } from '../autograd.js';
import { checkpoint } from '../gradient_checkpointing.js';
import { Module } from '../nn/module.js';
import { ModuleList } from '../nn/container.js';
import { Conv2d, GroupNorm } from '../nn/layers.js';
import type { Tensor } from '../tensor.js';
import { CONFIG_LIMITS, ConfigFields, configLabel, show, type ConfigSource } from './config.js';
import { TimestepEmbedding, Timesteps } from './embeddings.js';
import { checkModelFits, conv2dParams, linearParams, normParams, resnetParams, transformer2dParams } from './model_size.js';
import { loadModelWeights, pretrainedDir, readConfig, type FromPretrainedOptions } from './loading.js';
import {
  DOWN_BLOCK_TYPES, MID_BLOCK_TYPES, UP_BLOCK_TYPES, getDownBlock, getMidBlock, getUpBlock, type DownBlock, type MidBlock, type UpBlock,
} from './unet_2d_blocks.js';

/** config.json of a UNet2DConditionModel: diffusers 0.31's fields, camelCased. */
export interface UNet2DConditionModelConfig {
  sampleSize: number | number[] | null;
  inChannels: number;
  outChannels: number;
  centerInputSample: boolean;
  flipSinToCos: boolean;
  freqShift: number;
  downBlockTypes: string[];
  midBlockType: string | null;
  upBlockTypes: string[];
  onlyCrossAttention: boolean | boolean[];
  blockOutChannels: number[];
  layersPerBlock: number | number[];
  downsamplePadding: number;
  midBlockScaleFactor: number;
  dropout: number;
  actFn: string;
  normNumGroups: number | null;
  normEps: number;
  crossAttentionDim: number | number[];
  transformerLayersPerBlock: number | number[];
  reverseTransformerLayersPerBlock: number[][] | null;
  encoderHidDim: number | null;
  encoderHidDimType: string | null;
  /** In SD configs this is the NUMBER OF HEADS per block (a naming slip diffusers keeps for compatibility). */
  attentionHeadDim: number | number[];
  /** Refused when set, as diffusers 0.31 refuses it (attentionHeadDim carries the head count). */
  numAttentionHeads: number | number[] | null;
  dualCrossAttention: boolean;
  useLinearProjection: boolean;
  classEmbedType: string | null;
  /** null (SD 1.x/2.x) or 'text_time' (SDXL: pooled text embedding and size/crop ids added to the time embedding). */
  additionEmbedType: 'text_time' | null;
  /** Sinusoid width of each of the six SDXL time ids ('text_time'). */
  additionTimeEmbedDim: number | null;
  numClassEmbeds: number | null;
  /** null (SDXL base's config) means false, as in diffusers. */
  upcastAttention: boolean | null;
  resnetTimeScaleShift: string;
  resnetSkipTimeAct: boolean;
  resnetOutScaleFactor: number;
  timeEmbeddingType: string;
  timeEmbeddingDim: number | null;
  timeEmbeddingActFn: string | null;
  timestepPostAct: string | null;
  timeCondProjDim: number | null;
  convInKernel: number;
  convOutKernel: number;
  /** Input width of add_embedding ('text_time': pooled width + 6 · addition_time_embed_dim). */
  projectionClassEmbeddingsInputDim: number | null;
  attentionType: string;
  classEmbeddingsConcat: boolean;
  midBlockOnlyCrossAttention: boolean | null;
  crossAttentionNorm: string | null;
  additionEmbedTypeNumHeads: number;
}

/** diffusers' defaults (UNet2DConditionModel.__init__), used for fields a config leaves out. */
export const UNET_2D_CONDITION_DEFAULTS: Readonly<UNet2DConditionModelConfig> = {
  sampleSize: null, inChannels: 4, outChannels: 4, centerInputSample: false, flipSinToCos: true, freqShift: 0,
  downBlockTypes: ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
  midBlockType: 'UNetMidBlock2DCrossAttn',
  upBlockTypes: ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
  onlyCrossAttention: false, blockOutChannels: [320, 640, 1280, 1280], layersPerBlock: 2, downsamplePadding: 1,
  midBlockScaleFactor: 1, dropout: 0, actFn: 'silu', normNumGroups: 32, normEps: 1e-5, crossAttentionDim: 1280,
  transformerLayersPerBlock: 1, reverseTransformerLayersPerBlock: null, encoderHidDim: null, encoderHidDimType: null,
  attentionHeadDim: 8, numAttentionHeads: null, dualCrossAttention: false, useLinearProjection: false,
  classEmbedType: null, additionEmbedType: null, additionTimeEmbedDim: null, numClassEmbeds: null,
  upcastAttention: false, resnetTimeScaleShift: 'default', resnetSkipTimeAct: false, resnetOutScaleFactor: 1,
  timeEmbeddingType: 'positional', timeEmbeddingDim: null, timeEmbeddingActFn: null, timestepPostAct: null,
  timeCondProjDim: null, convInKernel: 3, convOutKernel: 3, projectionClassEmbeddingsInputDim: null,
  attentionType: 'default', classEmbeddingsConcat: false, midBlockOnlyCrossAttention: null, crossAttentionNorm: null,
  additionEmbedTypeNumHeads: 64,
};

/** SDXL's added conditions (diffusers' added_cond_kwargs) for addition_embed_type 'text_time'. */
export interface UNetAddedConditions {
  /** [B, projection_dim]: the pooled embedding of the second text encoder. */
  textEmbeds: Tensor;
  /** [B, 6]: original size (h, w), crop top-left (top, left), target size (h, w). */
  timeIds: Tensor;
}

export class UNet2DConditionModel extends Module {
  conv_in: Conv2d;
  time_proj: Timesteps;
  time_embedding: TimestepEmbedding;
  /** 'text_time' only: sinusoids of the time ids, and the MLP that adds them with the pooled text to the time embedding. */
  add_time_proj: Timesteps | null = null;
  add_embedding: TimestepEmbedding | null = null;
  down_blocks: ModuleList<DownBlock>;
  up_blocks: ModuleList<UpBlock>;
  mid_block: MidBlock;
  conv_norm_out: GroupNorm;
  conv_out: Conv2d;
  readonly config: UNet2DConditionModelConfig;
  private gradientCheckpointing = false;

  /** `configFile` (where the config came from) is named in errors. */
  constructor(config: Partial<UNet2DConditionModelConfig> = {}, o: { configFile?: string } = {}) {
    super();
    const { config: c, blocks } = checkConfig(config, o.configFile);
    // count before building: a config asking for more than the machine holds must not abort the process
    checkModelFits(source(o.configFile), countParameters(c, blocks), 'float32', torch.getDefaultDevice(), {
      block_out_channels: c.blockOutChannels, layers_per_block: c.layersPerBlock, transformer_layers_per_block: c.transformerLayersPerBlock,
      cross_attention_dim: c.crossAttentionDim, conv_in_kernel: c.convInKernel, conv_out_kernel: c.convOutKernel, time_embedding_dim: c.timeEmbeddingDim,
    });
    this.config = c;
    const n = blocks.length;
    const width = item(blocks, 0).channels;
    const timeEmbedDim = c.timeEmbeddingDim ?? width * 4;
    const shared = { tembChannels: timeEmbedDim, resnetEps: c.normEps, resnetGroups: c.normNumGroups, dropout: c.dropout };
    const attention = (s: BlockSettings) => ({
      numAttentionHeads: s.heads, crossAttentionDim: s.crossAttentionDim, transformerLayersPerBlock: s.transformerLayers,
      useLinearProjection: c.useLinearProjection, upcastAttention: c.upcastAttention === true,
    });

    this.conv_in = new Conv2d(c.inChannels, width, c.convInKernel, { padding: (c.convInKernel - 1) / 2 });
    this.time_proj = new Timesteps(width, c.flipSinToCos, c.freqShift);
    this.time_embedding = new TimestepEmbedding(width, timeEmbedDim, c.actFn as 'silu' | 'swish');
    if (c.additionEmbedType === 'text_time') {
      this.add_time_proj = new Timesteps(c.additionTimeEmbedDim as number, c.flipSinToCos, c.freqShift);
      this.add_embedding = new TimestepEmbedding(c.projectionClassEmbeddingsInputDim as number, timeEmbedDim);
    }

    // down: block i goes from block i-1's width to its own; all but the last halve the resolution
    this.down_blocks = new ModuleList(c.downBlockTypes.map((type, i) => {
      const s = item(blocks, i);
      return getDownBlock(type, {
        ...shared, ...attention(s), numLayers: s.layers, inChannels: item(blocks, Math.max(i - 1, 0)).channels,
        outChannels: s.channels, addDownsample: i < n - 1, downsamplePadding: c.downsamplePadding,
      });
    }));
    // up: the down path mirrored, one more resnet per block (it also takes the downsampler's skip)
    const reversed = [...blocks].reverse();
    this.up_blocks = new ModuleList(c.upBlockTypes.map((type, i) => {
      const s = item(reversed, i);
      return getUpBlock(type, {
        ...shared, ...attention(s), numLayers: s.layers + 1, inChannels: item(reversed, Math.min(i + 1, n - 1)).channels,
        outChannels: s.channels, prevOutputChannel: item(reversed, Math.max(i - 1, 0)).channels, addUpsample: i < n - 1,
      });
    }));
    const last = item(blocks, n - 1);
    this.mid_block = getMidBlock(c.midBlockType, {
      ...shared, ...attention(last), numLayers: 1, inChannels: last.channels, outputScaleFactor: c.midBlockScaleFactor,
    });

    this.conv_norm_out = new GroupNorm(c.normNumGroups, width, c.normEps);
    this.conv_out = new Conv2d(width, c.outChannels, c.convOutKernel, { padding: (c.convOutKernel - 1) / 2 });
  }

  /** From a parsed config.json (snake_case, as diffusers writes it); unknown fields are an error. */
  static fromConfig(json: Record<string, unknown>, o: { configFile?: string } = {}): UNet2DConditionModel {
    return new UNet2DConditionModel(configFromJson(json, o.configFile), o);
  }

  /**
   * From a diffusers folder: `fromPretrained('path/to/sd', { subfolder: 'unet' })`, a UNet folder itself, or
   * a cached hub id. Weights load strictly (missing, unexpected or mis-shaped keys are an error), then the
   * model is cast/moved to dtype/device and put in eval mode.
   */
  static fromPretrained(pathOrId: string, o: FromPretrainedOptions = {}): UNet2DConditionModel {
    const dir = pretrainedDir(pathOrId, o, 'UNet2DConditionModel.fromPretrained');
    const configFile = join(dir, 'config.json');
    const model = UNet2DConditionModel.fromConfig(readConfig(dir), { configFile });
    try {
      // load in fp32 on the CPU and cast once afterwards: copy_ converts from the file's dtype exactly
      loadModelWeights(model, dir, 'diffusion_pytorch_model', { variant: o.variant }, undefined, configFile);
      if (o.dtype !== undefined || o.device !== undefined) model.to({ dtype: o.dtype, device: o.device });
      return model.eval().requiresGrad_(false); // frozen by default, as the training script freezes it
    } catch (e) {
      model.dispose();
      throw e;
    }
  }

  /**
   * Recompute each down/mid/up block in backward instead of storing its activations (diffusers'
   * enable_gradient_checkpointing): much less memory for one more forward per step. Takes effect in
   * train mode with grad enabled; gradients are identical.
   */
  enableGradientCheckpointing(on = true): this {
    this.gradientCheckpointing = on;
    return this;
  }

  /** Runs one block, through checkpoint() when checkpointing is on. */
  private run(fn: (...inputs: Tensor[]) => Tensor[], inputs: Tensor[]): Tensor[] {
    return this.gradientCheckpointing && this.training && isGradEnabled() ? checkpoint(fn, ...inputs) : fn(...inputs);
  }

  /** Up-sampling steps (one per up block but the last): inputs whose H, W it does not divide get sizes forwarded. */
  get numUpsamplers(): number { return this.up_blocks.length - 1; }

  /**
   * The predicted noise (or v) for latents `sample` [B, in, H, W] at `timestep` (a number, a 0-d tensor or
   * one per batch item), conditioned on `encoderHiddenStates` [B, S, cross_attention_dim] and, for SDXL
   * ('text_time'), on `addedCond` (diffusers' added_cond_kwargs).
   */
  forward(sample: Tensor, timestep: Tensor | number, encoderHiddenStates: Tensor, addedCond?: UNetAddedConditions): Tensor {
    // 0. centre the input when the config asks (2x − 1)
    let x = this.config.centerInputSample ? sample.mul(2).sub(1) : sample;
    // 1. time, plus the added conditions' embedding (diffusers' get_aug_embed)
    let emb = this.time_embedding.forward(this.timeProjection(x, timestep));
    const aug = this.augEmbedding(emb, addedCond);
    if (aug) emb = emb.add(aug);
    // 2. pre-process
    x = this.conv_in.forward(x);
    // 3. down, collecting the skip connections (conv_in's output first)
    const skips: Tensor[] = [x];
    for (const block of this.down_blocks) {
      const [h, ...res] = this.run((xi, e, c) => {
        const [out, states] = block.kind === 'CrossAttnDownBlock2D' ? block.forward(xi!, e!, c!) : block.forward(xi!, e!);
        return [out, ...states];
      }, [x, emb, encoderHiddenStates]);
      x = h!;
      skips.push(...res);
    }
    // 4. mid
    x = this.run((xi, e, c) => [this.mid_block.forward(xi!, e!, c!)], [x, emb, encoderHiddenStates])[0]!;
    // 5. up, each block taking its skips from the end; odd sizes need the skip's size forwarded to the upsampler
    const factor = 2 ** this.numUpsamplers;
    const forwardUpsampleSize = sample.shape.slice(-2).some((d) => d % factor !== 0);
    for (let i = 0; i < this.up_blocks.length; i++) {
      const block = this.up_blocks.at(i);
      const res = skips.splice(skips.length - block.resnets.length);
      const next = skips[skips.length - 1];
      const size = forwardUpsampleSize && next && i < this.up_blocks.length - 1 ? next.shape.slice(2) as [number, number] : undefined;
      x = this.run((xi, e, c, ...r) => [block.kind === 'CrossAttnUpBlock2D' ? block.forward(xi!, r, e!, c!, size) : block.forward(xi!, r, e!, size)],
        [x, emb, encoderHiddenStates, ...res])[0]!;
    }
    // 6. post-process
    return this.conv_out.forward(this.conv_norm_out.forwardSilu(x));
  }

  /**
   * 'text_time': each time id → addition_time_embed_dim sinusoids, flattened per sample after the pooled text
   * embedding, through add_embedding (in the time embedding's dtype). null for SD 1.x/2.x configs.
   */
  augEmbedding(emb: Tensor, addedCond: UNetAddedConditions | undefined): Tensor | null {
    if (!this.add_time_proj || !this.add_embedding) {
      if (addedCond) throw new Error(`UNet2DConditionModel: added conditions (textEmbeds, timeIds) were given, but this UNet's addition_embed_type is ${show(this.config.additionEmbedType)}, not 'text_time' (an SDXL UNet)`);
      return null;
    }
    if (!addedCond?.textEmbeds || !addedCond.timeIds) {
      throw new Error("UNet2DConditionModel: addition_embed_type 'text_time' (SDXL) needs addedCond { textEmbeds, timeIds } (diffusers' added_cond_kwargs text_embeds and time_ids)");
    }
    const { textEmbeds, timeIds } = addedCond;
    const batch = textEmbeds.shape[0] ?? 0;
    const width = (this.add_embedding.linear_1.inFeatures);
    const timeWidth = timeIds.numel() / Math.max(batch, 1) * this.add_time_proj.numChannels;
    if (textEmbeds.ndim !== 2 || timeIds.numel() % Math.max(batch, 1) !== 0 || (textEmbeds.shape[1] ?? 0) + timeWidth !== width) {
      throw new RangeError(`UNet2DConditionModel: textEmbeds [${textEmbeds.shape.join(', ')}] and timeIds [${timeIds.shape.join(', ')}] give ${(textEmbeds.shape[1] ?? 0)} + ${timeWidth} added-embedding inputs per sample; add_embedding takes ${width} (projection_class_embeddings_input_dim)`);
    }
    const timeEmbeds = this.add_time_proj.forward(timeIds.flatten().to({ device: emb.device })).reshape(batch, -1);
    const addEmbeds = torch.cat([textEmbeds.to({ dtype: emb.dtype, device: emb.device }), timeEmbeds.to(emb.dtype)], -1);
    return this.add_embedding.forward(addEmbeds);
  }

  /** Timesteps → sinusoids [B, block_out_channels[0]] in the sample's dtype (diffusers' get_time_embed). */
  private timeProjection(sample: Tensor, timestep: Tensor | number): Tensor {
    // A number becomes float32 directly: diffusers makes int64/float64 and Timesteps casts to float32, which
    // gives the same value.
    let t = typeof timestep === 'number' ? torch.tensor([timestep], { device: sample.device }) : timestep;
    if (t.ndim === 0) t = t.reshape(1);
    if (t.device !== sample.device) t = t.to({ device: sample.device });
    // broadcast to the batch (one timestep for all, or one each)
    const proj = this.time_proj.forward(t.expand(sample.shape[0] ?? 1));
    // Timesteps always computes in fp32; the embedding MLP may run in half precision
    return proj.dtype === sample.dtype ? proj : proj.to(sample.dtype);
  }
}

// ---- config

type Config = UNet2DConditionModelConfig;
const snake = (k: string): string => k.replace(/[A-Z]/g, (m) => `_${m.toLowerCase()}`);
const camel = (k: string): string => k.replace(/_([a-z0-9])/g, (_, m: string) => m.toUpperCase());
const source = (file?: string): ConfigSource => ({ model: 'UNet2DConditionModel', file });

/** config.json (snake_case) → the camelCase config; fields diffusers 0.31 does not know are an error. */
export function configFromJson(json: Record<string, unknown>, file?: string): Partial<Config> {
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(json)) {
    if (key.startsWith('_')) continue; // _class_name, _diffusers_version, _name_or_path
    const name = camel(key);
    if (!Object.hasOwn(UNET_2D_CONDITION_DEFAULTS, name)) {
      throw new Error(`${configLabel(source(file))}: unknown field '${key}' (diffusers 0.31 fields: ${Object.keys(UNET_2D_CONDITION_DEFAULTS).map(snake).join(', ')})`);
    }
    out[name] = value;
  }
  return out as Partial<Config>;
}

/** Values that change the math in ways not implemented here; the config must hold exactly these. */
const ONLY: Partial<Record<keyof Config, unknown>> = {
  dualCrossAttention: false, classEmbedType: null, numClassEmbeds: null,
  encoderHidDim: null, encoderHidDimType: null, resnetTimeScaleShift: 'default', timeEmbeddingType: 'positional',
  timeEmbeddingActFn: null, timestepPostAct: null, timeCondProjDim: null, attentionType: 'default',
  classEmbeddingsConcat: false, reverseTransformerLayersPerBlock: null,
};
// Nothing reads these (diffusers passes them only to block types or embeddings the ONLY values rule out), so
// any value of the right type is accepted; a wrong type still means a corrupt config and is refused.
function checkUnreadFields(f: ConfigFields, c: Config): void {
  f.bool('resnetSkipTimeAct');
  f.number('resnetOutScaleFactor');
  if (c.midBlockOnlyCrossAttention !== null) f.bool('midBlockOnlyCrossAttention');
  if (c.crossAttentionNorm !== null && typeof c.crossAttentionNorm !== 'string') f.fail('crossAttentionNorm', `must be null or a string, got ${show(c.crossAttentionNorm)}`);
  f.int('additionEmbedTypeNumHeads');
}

/**
 * addition_embed_type: null, or 'text_time' (SDXL) with the two widths it needs; diffusers' other kinds
 * ('text', 'text_image', 'image', 'image_hint') are not implemented. Unread when null, the widths must still be
 * integers or null.
 */
function checkAdditionEmbed(f: ConfigFields, c: Config): void {
  if (c.additionEmbedType !== null) f.checkChoice('additionEmbedType', c.additionEmbedType, ['text_time'] as const);
  for (const k of ['additionTimeEmbedDim', 'projectionClassEmbeddingsInputDim'] as const) {
    if (c[k] !== null) f.int(k);
    else if (c.additionEmbedType === 'text_time') f.fail(k, "must be a positive integer when addition_embed_type is 'text_time', got null");
  }
}

type Resolved = Config & { normNumGroups: number; midBlockType: string };

interface BlockSettings { channels: number; heads: number; crossAttentionDim: number; layers: number; transformerLayers: number }

/** Fills diffusers' defaults and refuses what this implementation would get wrong; `file` is named in errors. */
export function resolveConfig(raw: Partial<Config>, file?: string): Resolved {
  return checkConfig(raw, file).config;
}

function checkConfig(raw: Partial<Config>, file?: string): { config: Resolved; blocks: BlockSettings[] } {
  const given = Object.fromEntries(Object.entries(raw).filter(([, v]) => v !== undefined));
  const c = { ...UNET_2D_CONDITION_DEFAULTS, ...given } as Config;
  const f = new ConfigFields(c as unknown as Record<string, unknown>, source(file), {}, (k) => `'${snake(k)}'`);
  for (const [field, only] of Object.entries(ONLY)) f.only(field, only);
  if (c.numAttentionHeads !== null) {
    f.fail('numAttentionHeads', `= ${show(c.numAttentionHeads)} is refused, as diffusers 0.31 refuses it: SD configs give the number of heads as attention_head_dim`);
  }
  if (!(c.onlyCrossAttention === false || (Array.isArray(c.onlyCrossAttention) && c.onlyCrossAttention.every((v) => v === false)))) {
    f.fail('onlyCrossAttention', `= ${show(c.onlyCrossAttention)} is not supported (only false is implemented)`);
  }
  // swish is diffusers' other name for silu
  f.choice('actFn', ['silu', 'swish']);
  f.choice('midBlockType', MID_BLOCK_TYPES);
  for (const k of ['inChannels', 'outChannels', 'normNumGroups'] as const) f.int(k);
  for (const k of ['convInKernel', 'convOutKernel'] as const) if (f.int(k, { max: 31 }) % 2 !== 1) f.fail(k, `must be odd, got ${show(c[k])}`);
  f.int('downsamplePadding', { min: 0, max: 2 });
  if (c.timeEmbeddingDim !== null) f.int('timeEmbeddingDim');
  f.number('freqShift');
  f.number('normEps', { min: 0 });
  f.number('midBlockScaleFactor', { above: 0 }); // the mid block's resnets divide by it
  f.number('dropout', { min: 0, max: 1 });
  for (const k of ['centerInputSample', 'flipSinToCos', 'useLinearProjection'] as const) f.bool(k);
  if (c.upcastAttention !== null) f.bool('upcastAttention');
  checkSampleSize(f, c.sampleSize);
  checkUnreadFields(f, c);
  checkAdditionEmbed(f, c);

  const channels = f.intList('blockOutChannels');
  const n = channels.length;
  const types = (field: 'downBlockTypes' | 'upBlockTypes', supported: readonly string[]): void => {
    const list = c[field];
    if (!Array.isArray(list) || list.length !== n) f.fail(field, `must list one block type per block_out_channels entry (${n}), got ${show(list)}`);
    list.forEach((t, i) => f.checkChoice(field, typeof t === 'string' ? stripPrefix(t) : t, supported, `[${i}] `));
  };
  types('downBlockTypes', DOWN_BLOCK_TYPES);
  types('upBlockTypes', UP_BLOCK_TYPES);
  // every GroupNorm runs over a block's width (or a sum of widths): the groups must divide each
  const bad = channels.findIndex((ch) => ch % c.normNumGroups! !== 0);
  if (bad >= 0) f.fail('normNumGroups', `= ${c.normNumGroups} does not divide block_out_channels[${bad}] = ${channels[bad]} (GroupNorm needs channels divisible by groups)`);

  const heads = f.intPerBlock('attentionHeadDim', n);
  const crossDims = f.intPerBlock('crossAttentionDim', n);
  const layers = f.intPerBlock('layersPerBlock', n, { max: CONFIG_LIMITS.layers });
  const transformerLayers = f.intPerBlock('transformerLayersPerBlock', n, { max: CONFIG_LIMITS.layers });
  const blocks = channels.map((ch, i) => {
    const h = item(heads, i);
    // attention_head_dim is the head count here: each head is channels / heads wide
    if (h > ch) f.fail('attentionHeadDim', `asks for ${h} heads in block ${i}, wider than its ${ch} channels`);
    return { channels: ch, heads: h, crossAttentionDim: item(crossDims, i), layers: item(layers, i), transformerLayers: item(transformerLayers, i) };
  });
  return { config: c as Resolved, blocks };
}

/** sample_size (the pipeline's default latent size): null, an integer, or [height, width]. */
function checkSampleSize(f: ConfigFields, v: unknown): void {
  if (v === null) return;
  if (Array.isArray(v)) f.intList('sampleSize', {}, 2);
  else f.int('sampleSize');
}

/** diffusers accepts the old "UNetRes" prefix (UNetResDownBlock2D) for the same blocks. */
const stripPrefix = (type: string): string => (type.startsWith('UNetRes') ? type.slice(7) : type);

/** Parameters of the UNet a (camelCase) config describes, counted without building it; the config is checked first. */
export function unetParameterCount(config: Partial<Config>): number {
  const { config: c, blocks } = checkConfig(config);
  return countParameters(c, blocks);
}

/** The count, as the constructor builds the model: the same walk over blocks, with building-block formulas. */
function countParameters(c: Resolved, blocks: readonly BlockSettings[]): number {
  const n = blocks.length;
  const width = item(blocks, 0).channels;
  const temb = c.timeEmbeddingDim ?? width * 4;
  const cross = (type: string): boolean => stripPrefix(type).startsWith('CrossAttn');
  const attention = (s: BlockSettings, count: number): number => count * transformer2dParams(s.channels, s.heads, s.crossAttentionDim, s.transformerLayers);
  let total = conv2dParams(c.inChannels, width, c.convInKernel) + linearParams(width, temb) + linearParams(temb, temb);
  if (c.additionEmbedType === 'text_time') total += linearParams(c.projectionClassEmbeddingsInputDim as number, temb) + linearParams(temb, temb);
  blocks.forEach((s, i) => {
    const input = item(blocks, Math.max(i - 1, 0)).channels;
    total += resnetParams(input, s.channels, temb) + (s.layers - 1) * resnetParams(s.channels, s.channels, temb);
    if (cross(item(c.downBlockTypes, i))) total += attention(s, s.layers);
    if (i < n - 1) total += conv2dParams(s.channels, s.channels, 3);
  });
  const reversed = [...blocks].reverse();
  reversed.forEach((s, i) => {
    // resnet j takes the previous output (prev, then out) concatenated with a skip (out, the last one input)
    const count = s.layers + 1;
    const prev = item(reversed, Math.max(i - 1, 0)).channels;
    const input = item(reversed, Math.min(i + 1, n - 1)).channels;
    const out = s.channels;
    for (let j = 0; j < count; j++) total += resnetParams((j === 0 ? prev : out) + (j === count - 1 ? input : out), out, temb);
    if (cross(item(c.upBlockTypes, i))) total += attention(s, count);
    if (i < n - 1) total += conv2dParams(out, out, 3);
  });
  const last = item(blocks, n - 1);
  total += 2 * resnetParams(last.channels, last.channels, temb) + attention(last, 1);
  return total + normParams(width) + conv2dParams(width, c.outChannels, c.convOutKernel);
}

function item<T>(list: readonly T[], i: number): T {
  const v = list[i];
  if (v === undefined) throw new RangeError(`index ${i} out of range (length ${list.length})`);
  return v;
}
