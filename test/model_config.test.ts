// Model configs as hostile input (issue #12): every field a model reads is checked with an error naming the
// file, the field and the value; a config describing a model larger than the machine is refused, with the
// figure, before anything is built; and the parameter counts behind that check are exact for real configs.
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { totalmem, tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readSafetensorsHeader } from '../lib/io/safetensors.js';
import { AutoencoderKL, autoencoderKLParameterCount, parseConfig } from '../lib/models/autoencoder_kl.js';
import { CLIPTextModel, clipTextParameterCount, parseCLIPTextConfig } from '../lib/models/clip_text_model.js';
import { checkModelFits, formatBytes } from '../lib/models/model_size.js';
import { UNet2DConditionModel, configFromJson, unetParameterCount } from '../lib/models/unet_2d_condition.js';
import { memory } from '../lib/scope.js';
import { fixtures } from './helpers.js';

const readJson = (...path: string[]): Record<string, unknown> => JSON.parse(readFileSync(join(fixtures, ...path), 'utf8')) as Record<string, unknown>;
const tinySd = join(fixtures, 'tiny-sd');

/** Σ Π shape over a keys file (name → shape). */
function countShapes(shapes: Iterable<readonly number[]>): number {
  let n = 0;
  for (const s of shapes) n += s.reduce((a, b) => a * b, 1);
  return n;
}
const shapesFile = (name: string): number[][] => Object.values(readJson('sd15-shape', name)) as number[][];
const checkpointShapes = (...path: string[]): number[][] => readSafetensorsHeader(join(tinySd, ...path)).tensors.map((t) => t.shape);

describe('parameter counts from a config, before building', () => {
  it('SD 1.5 (full-scale shapes): exact for the UNet, VAE and CLIP-L', () => {
    const counts = {
      unet: [unetParameterCount(configFromJson(readJson('sd15-shape', 'unet', 'config.json'))), countShapes(shapesFile('unet_keys.json'))],
      vae: [autoencoderKLParameterCount(parseConfig(readJson('sd15-shape', 'vae', 'config.json'))), countShapes(shapesFile('vae_keys.json'))],
      textEncoder: [clipTextParameterCount(parseCLIPTextConfig(readJson('sd15-shape', 'text_encoder', 'config.json'))), countShapes(shapesFile('text_encoder_keys.json'))],
    };
    console.log('SD 1.5 parameters, estimated from config vs summed from the shapes file:', counts);
    for (const [estimate, real] of Object.values(counts)) expect(Math.abs(estimate! - real!) / real!).toBeLessThan(0.01);
    // and exactly: the formulas mirror the constructors (the known totals of SD 1.5)
    expect(counts.unet[0]).toBe(859_520_964);
    expect(counts.vae[0]).toBe(83_653_863);
    expect(counts.textEncoder[0]).toBe(123_060_480);
  });

  it('tiny-sd: exact against the checkpoints', () => {
    expect(unetParameterCount(configFromJson(readJson('tiny-sd', 'unet', 'config.json')))).toBe(countShapes(checkpointShapes('unet', 'diffusion_pytorch_model.safetensors')));
    expect(autoencoderKLParameterCount(parseConfig(readJson('tiny-sd', 'vae', 'config.json')))).toBe(countShapes(checkpointShapes('vae', 'diffusion_pytorch_model.safetensors')));
    expect(clipTextParameterCount(parseCLIPTextConfig(readJson('tiny-sd', 'text_encoder', 'config.json')))).toBe(countShapes(checkpointShapes('text_encoder', 'model.safetensors')));
  });

  it('exact for SD 2.x-style variations (lists per block, stacked transformers, linear projections, odd kernels)', () => {
    const config = {
      ...readJson('tiny-sd', 'unet', 'config.json'), attention_head_dim: [2, 4], use_linear_projection: true, cross_attention_dim: [24, 16],
      layers_per_block: [1, 3], transformer_layers_per_block: 2, down_block_types: ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'],
      up_block_types: ['CrossAttnUpBlock2D', 'UpBlock2D'], conv_in_kernel: 5, conv_out_kernel: 1, time_embedding_dim: 48, norm_num_groups: 8,
    };
    const model = UNet2DConditionModel.fromConfig(config);
    try {
      expect(unetParameterCount(configFromJson(config))).toBe(model.numParameters());
    } finally {
      model.dispose();
    }
    const vaeConfig = { ...readJson('tiny-sd', 'vae', 'config.json'), layers_per_block: 3, use_quant_conv: false, mid_block_add_attention: false, latent_channels: 6 };
    const vae = new AutoencoderKL(vaeConfig);
    try {
      expect(autoencoderKLParameterCount(parseConfig(vaeConfig))).toBe(vae.numParameters());
    } finally {
      vae.dispose();
    }
  });
});

describe('a config describing more than the machine holds', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'difflora-cfg-'));
    cpSync(tinySd, join(dir, 'tiny'), { recursive: true });
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const edit = (component: string, change: Record<string, unknown>): string => {
    const model = join(dir, `m${Math.random().toString(36).slice(2)}`);
    cpSync(join(dir, 'tiny'), model, { recursive: true });
    const file = join(model, component, 'config.json');
    writeFileSync(file, JSON.stringify({ ...JSON.parse(readFileSync(file, 'utf8')) as object, ...change }));
    return model;
  };

  it('layers_per_block: 1e9 (which used to abort the process) names the file, the field and the value', () => {
    const model = edit('unet', { layers_per_block: 1e9 });
    expect(() => UNet2DConditionModel.fromPretrained(model, { subfolder: 'unet' }))
      .toThrow(/UNet2DConditionModel config '.*unet\/config\.json': 'layers_per_block' must be a positive integer \(at most 10000\), got 1000000000/);
  });

  it('a plausible-looking config too large for this machine is refused with the figure, nothing built', () => {
    // 5,000 layers per block at SD 1.5 widths: each value within its cap, the whole ~1e12 parameters
    const before = memory().numTensors;
    const model = edit('unet', { ...readJson('sd15-shape', 'unet', 'config.json'), layers_per_block: 5000, transformer_layers_per_block: 100 });
    expect(() => UNet2DConditionModel.fromPretrained(model, { subfolder: 'unet' }))
      .toThrow(new RegExp(`UNet2DConditionModel config '.*unet/config\\.json' describes a model of [\\d.]+e\\+1[2-4] parameters \\([\\d.]+ [TP]iB in float32\\), more than this machine's ${formatBytes(totalmem()).replace('.', '\\.')} of memory; check .*layers_per_block 5000`));
    expect(memory().numTensors).toBe(before);
  });

  it('num_hidden_layers: 1e9 and a vocabulary of 1e8 are refused by name; 9,000 layers of width 100,000 by size', () => {
    expect(() => CLIPTextModel.fromPretrained(edit('text_encoder', { num_hidden_layers: 1e9 }), { subfolder: 'text_encoder' }))
      .toThrow(/CLIPTextModel config '.*text_encoder\/config\.json': num_hidden_layers must be a positive integer \(at most 10000\), got 1000000000/);
    expect(() => CLIPTextModel.fromPretrained(edit('text_encoder', { vocab_size: 1e8 }), { subfolder: 'text_encoder' }))
      .toThrow(/text_encoder\/config\.json': vocab_size must be a positive integer \(at most 10000000\), got 100000000/);
    expect(() => CLIPTextModel.fromPretrained(edit('text_encoder', { num_hidden_layers: 9000, hidden_size: 100_000, num_attention_heads: 1 }), { subfolder: 'text_encoder' }))
      .toThrow(/text_encoder\/config\.json' describes a model of .* parameters .*more than this machine's .*; check .*num_hidden_layers 9000/);
  });

  it('the check counts at the requested dtype and skips the meta device', () => {
    const src = { model: 'X', file: '/m/config.json' };
    const limit = totalmem();
    expect(() => checkModelFits(src, limit / 2 + 1, 'float32', 'cpu', {})).toThrow(/X config '\/m\/config\.json' describes a model of .* \(.* in float32\)/);
    expect(() => checkModelFits(src, limit / 2 - 1, 'float16', 'cpu', {})).not.toThrow();
    expect(() => checkModelFits(src, 1e15, 'float32', 'meta', {})).not.toThrow();
  });
});

describe('every field a model reads is checked, naming the file, the field and the value', () => {
  const unet = readJson('tiny-sd', 'unet', 'config.json');
  const vae = readJson('tiny-sd', 'vae', 'config.json');
  const clip = readJson('tiny-sd', 'text_encoder', 'config.json');
  const file = '/models/x/config.json';

  it.each([
    ['in_channels', null, /'in_channels' must be a positive integer .*got null/],
    ['in_channels', 1.5, /'in_channels' must be a positive integer .*got 1\.5/],
    ['block_out_channels', [], /'block_out_channels' must be a list of 1 to 64 entries, got 0 entries/],
    ['block_out_channels', Array(100).fill(32), /'block_out_channels' must be a list of 1 to 64 entries, got 100 entries/],
    ['block_out_channels', [32, '64'], /'block_out_channels' \[1\] must be a positive integer .*got "64"/],
    ['block_out_channels', [32, 2e6], /'block_out_channels' \[1\] must be a positive integer \(at most 1000000\), got 2000000/],
    ['norm_num_groups', 24, /'norm_num_groups' = 24 does not divide block_out_channels\[0\] = 32/],
    ['attention_head_dim', 64, /'attention_head_dim' asks for 64 heads in block 0, wider than its 32 channels/],
    ['layers_per_block', [2, null], /'layers_per_block' \[1\] must be a positive integer/],
    ['down_block_types', ['CrossAttnDownBlock2D', 7], /'down_block_types' \[1\] 7 is not supported \(supported: CrossAttnDownBlock2D, DownBlock2D\)/],
    ['mid_block_scale_factor', 0, /'mid_block_scale_factor' must be a finite number > 0, got 0/],
    ['dropout', 2, /'dropout' must be a finite number ≥ 0 and ≤ 1, got 2/],
    ['freq_shift', 'x', /'freq_shift' must be a finite number, got "x"/],
    ['conv_in_kernel', 4, /'conv_in_kernel' must be odd, got 4/],
    ['conv_in_kernel', 1e5, /'conv_in_kernel' must be a positive integer \(at most 31\)/],
    ['sample_size', [64, 'x'], /'sample_size' \[1\] must be a positive integer/],
    ['flip_sin_to_cos', 'yes', /'flip_sin_to_cos' must be true or false, got "yes"/],
  ])('UNet %s = %j', (field, value, message) => {
    expect(() => UNet2DConditionModel.fromConfig({ ...unet, [field]: value }, { configFile: file })).toThrow(message);
    expect(() => UNet2DConditionModel.fromConfig({ ...unet, [field]: value }, { configFile: file })).toThrow(`UNet2DConditionModel config '${file}'`);
  });

  it('UNet: fields are own properties of the defaults, so "constructor" or "toString" are unknown fields', () => {
    expect(() => UNet2DConditionModel.fromConfig({ ...unet, constructor: 1 })).toThrow(/unknown field 'constructor'/);
    expect(() => UNet2DConditionModel.fromConfig({ ...unet, to_string: 1 })).toThrow(/unknown field 'to_string'/);
  });

  it.each([
    ['layers_per_block', 1e9, /'layers_per_block' must be a positive integer \(at most 10000\), got 1000000000/],
    ['block_out_channels', null, /'block_out_channels' must be a list of 1 to 64 entries, got null/],
    ['norm_num_groups', 3, /'norm_num_groups' = 3 does not divide block_out_channels\[0\] = 32/],
    ['scaling_factor', 0, /'scaling_factor' must be a finite number > 0, got 0/],
    ['latents_mean', [1, 2], /'latents_mean' must be null or a list of 4 numbers/],
    ['sample_size', -1, /'sample_size' must be a positive integer/],
    ['force_upcast', null, /'force_upcast' must be true or false, got null/],
  ])('VAE %s = %j', (field, value, message) => {
    expect(() => new AutoencoderKL({ ...vae, [field]: value }, { configFile: file })).toThrow(message);
    expect(() => new AutoencoderKL({ ...vae, [field]: value }, { configFile: file })).toThrow(`AutoencoderKL config '${file}'`);
  });

  it.each([
    ['hidden_size', null, /hidden_size must be a positive integer .*got null/],
    ['num_hidden_layers', 1e9, /num_hidden_layers must be a positive integer \(at most 10000\), got 1000000000/],
    ['vocab_size', 1.5, /vocab_size must be a positive integer/],
    ['eos_token_id', 49408, /eos_token_id must be a non-negative integer \(at most 49407\), got 49408/],
    ['eos_token_id', -1, /eos_token_id must be a non-negative integer/],
    ['attention_dropout', null, /attention_dropout must be a finite number ≥ 0 and ≤ 1, got null/],
    ['hidden_act', null, /hidden_act null is not supported \(supported: quick_gelu, gelu, gelu_new, gelu_pytorch_tanh\)/],
  ])('CLIP %s = %j', (field, value, message) => {
    expect(() => new CLIPTextModel({ ...clip, [field]: value }, { configFile: file })).toThrow(message);
    expect(() => new CLIPTextModel({ ...clip, [field]: value }, { configFile: file })).toThrow(`CLIPTextModel config '${file}'`);
  });

  it('a null config value is refused, not silently replaced by the default (pad_token_id may be null: unused)', () => {
    expect(() => parseCLIPTextConfig({ ...clip, max_position_embeddings: null })).toThrow(/max_position_embeddings must be a positive integer .*got null/);
    expect(parseCLIPTextConfig({ ...clip, pad_token_id: null }).pad_token_id).toBeNull();
  });
});

describe('fields no layer reads still have their types checked', () => {
  const unet = JSON.parse(readFileSync(join(fixtures, 'tiny-sd', 'unet', 'config.json'), 'utf8')) as Record<string, unknown>;
  it.each([
    ['mid_block_only_cross_attention', 'x', /'mid_block_only_cross_attention' must be true or false, got "x"/],
    ['addition_embed_type_num_heads', 1e9, /'addition_embed_type_num_heads' must be a positive integer \(at most 1000000\)/],
    ['projection_class_embeddings_input_dim', [1, 2], /'projection_class_embeddings_input_dim' must be a positive integer/],
    ['addition_time_embed_dim', 'x', /'addition_time_embed_dim' must be a positive integer/],
    ['cross_attention_norm', 3, /'cross_attention_norm' must be null or a string, got 3/],
    ['resnet_out_scale_factor', null, /'resnet_out_scale_factor' must be a finite number, got null/],
    ['resnet_skip_time_act', 0, /'resnet_skip_time_act' must be true or false, got 0/],
  ])('UNet %s = %j', (field, value, message) => {
    expect(() => UNet2DConditionModel.fromConfig({ ...unet, [field]: value })).toThrow(message);
  });

  it('a value too deeply nested for JSON.stringify is still shown, not a stack overflow', () => {
    const deep = JSON.parse(`${'{"a":'.repeat(20_000)}1${'}'.repeat(20_000)}`) as unknown;
    expect(() => UNet2DConditionModel.fromConfig({ ...unet, in_channels: deep })).toThrow(/'in_channels' must be a positive integer \(at most 1000000\), got \{…\} \(too deeply nested to show\)/);
  });
});
