// UNet2DConditionModel against diffusers 0.31 (goldens/unet: time projection, time embedding, output for the
// tiny-sd UNet), its state-dict schema at tiny and SD 1.5 scale, the LoRA seam, config handling, lifetimes.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { noGrad } from '../lib/autograd.js';
import { readSafetensorsHeader } from '../lib/io/safetensors.js';
import { Attention } from '../lib/models/attention_processor.js';
import { getTimestepEmbedding } from '../lib/models/embeddings.js';
import { Transformer2DModel } from '../lib/models/transformer_2d.js';
import type { DownBlock, MidBlock, UpBlock } from '../lib/models/unet_2d_blocks.js';
import { UNet2DConditionModel } from '../lib/models/unet_2d_condition.js';
import { Conv2d, Linear } from '../lib/nn/layers.js';
import { dispose, keep, memory, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { bitEqual, fixtures, relErr, goldenFile } from './helpers.js';

const TOL = 1e-4;
const tinySd = join(fixtures, 'tiny-sd');
const readJson = <T>(...path: string[]): T => JSON.parse(readFileSync(join(fixtures, ...path), 'utf8')) as T;
const tinyConfig = readJson<Record<string, unknown>>('tiny-sd', 'unet', 'config.json');
const sd15Config = readJson<Record<string, unknown>>('sd15-shape', 'unet', 'config.json');

interface GoldenMeta { tensors: Record<string, { shape: number[]; call: string }> }
const goldenMeta = readJson<GoldenMeta>('goldens', 'unet.json');

let unet: UNet2DConditionModel;
const golden = goldenFile('unet.safetensors');
const g = (name: string): Tensor => golden.get(name);

beforeAll(() => {
  unet = UNet2DConditionModel.fromPretrained(tinySd, { subfolder: 'unet' });
});

afterAll(() => {
  unet.dispose();
  golden.dispose();
});

/** A block's i-th Transformer2DModel (an error for the blocks without attention). */
function transformerOf(block: DownBlock | UpBlock | MidBlock, i = 0): Transformer2DModel {
  if (block.kind === 'DownBlock2D' || block.kind === 'UpBlock2D') throw new Error(`${block.kind} has no attention`);
  return block.attentions.at(i);
}

/** [heads, head size] of a block's first self-attention (all attentions of a block have the same). */
function headsOf(block: DownBlock | UpBlock | MidBlock): [number, number] {
  const attn = transformerOf(block).transformer_blocks.at(0).attn1;
  return [attn.heads, attn.dimHead];
}

describe('UNet2DConditionModel parity with diffusers 0.31 (tiny-sd, fp32 CPU)', () => {
  it('time_proj (sinusoids) and time_embedding', () => {
    const errs = noGrad(() => tidy(() => {
      const proj = unet.time_proj.forward(g('timesteps'));
      return { proj: relErr(proj, g('time_proj')), emb: relErr(unet.time_embedding.forward(proj), g('time_emb')) };
    }));
    console.log('unet time relative errors', errs);
    expect(errs.proj).toBeLessThan(TOL);
    expect(errs.emb).toBeLessThan(TOL);
  });

  it('forward(sample, timesteps, encoder_hidden_states)', () => {
    const err = noGrad(() => tidy(() => {
      const out = unet.forward(g('sample'), g('timesteps'), g('encoder_hidden_states'));
      expect(out.shape).toEqual(goldenMeta.tensors.out?.shape);
      return relErr(out, g('out'));
    }));
    console.log('unet output relative error', err);
    expect(err).toBeLessThan(TOL);
  });

  it('a number or a 0-d tensor timestep is broadcast to the batch', () => {
    const errs = noGrad(() => tidy(() => {
      const sample = g('sample').narrow(0, 1, 1).expand(2, -1, -1, -1);
      const context = g('encoder_hidden_states').narrow(0, 1, 1).expand(2, -1, -1);
      const ref = g('out').narrow(0, 1, 1).expand(2, -1, -1, -1);
      const t = g('timesteps').select(0, 1); // 999, 0-d
      return [relErr(unet.forward(sample, 999, context), ref), relErr(unet.forward(sample, t, context), ref)];
    }));
    expect(errs[0]).toBeLessThan(TOL);
    expect(errs[1]).toBeLessThan(TOL);
  });

  it('fromPretrained({ dtype: float64 }) casts every weight and still matches', () => {
    const model = UNet2DConditionModel.fromPretrained(tinySd, { subfolder: 'unet', dtype: 'float64' });
    try {
      expect(new Set(model.parameters().map((p) => p.dtype))).toEqual(new Set(['float64']));
      const err = noGrad(() => tidy(() => {
        const out = model.forward(g('sample').double(), g('timesteps'), g('encoder_hidden_states').double());
        expect(out.dtype).toBe('float64');
        return relErr(out, g('out'));
      }));
      expect(err).toBeLessThan(TOL);
    } finally {
      model.dispose();
    }
  });

  it('center_input_sample feeds 2·sample − 1', () => {
    const centred = UNet2DConditionModel.fromConfig({ ...tinyConfig, center_input_sample: true });
    try {
      centred.loadStateDict(unet.stateDict());
      const err = noGrad(() => tidy(() => relErr(
        centred.forward(g('sample'), g('timesteps'), g('encoder_hidden_states')),
        unet.forward(g('sample').mul(2).sub(1), g('timesteps'), g('encoder_hidden_states')),
      )));
      expect(err).toBe(0);
    } finally {
      centred.dispose();
    }
  });

  it('odd latent sizes: the up path interpolates to the skip connection sizes', () => {
    const shape = noGrad(() => tidy(() => {
      const sample = torch.randn([1, 4, 17, 11]);
      return unet.forward(sample, 500, g('encoder_hidden_states').narrow(0, 0, 1)).shape;
    }));
    expect(shape).toEqual([1, 4, 17, 11]);
  });

  it('a forward inside tidy leaves no tensor behind (with and without grad)', () => {
    const inputs = [g('sample'), g('timesteps'), g('encoder_hidden_states')] as const;
    const before = memory().numTensors;
    noGrad(() => tidy(() => { unet.forward(...inputs); }));
    expect(memory().numTensors).toBe(before);
    expect(unet.parameters().every((p) => !p.requiresGrad)).toBe(true); // fromPretrained freezes
    unet.requiresGrad_(true);
    tidy(() => { unet.forward(...inputs).sum().backward(); });
    unet.zeroGrad();
    unet.requiresGrad_(false);
    expect(memory().numTensors).toBe(before);
  });
});

describe('getTimestepEmbedding', () => {
  it('follows diffusers: frequencies exp(−ln(10⁴)·i/(half − shift)), [sin, cos] or flipped, odd dim padded', () => {
    tidy(() => {
      const t = torch.tensor([5n, 0n]);
      // dim 4, shift 1: half = 2, frequencies [1, 1e-4]
      const plain = getTimestepEmbedding(t, 4, { downscaleFreqShift: 1 });
      const f = [1, Math.exp(-Math.log(10000))];
      const expected = [[Math.sin(5 * f[0]!), Math.sin(5 * f[1]!), Math.cos(5 * f[0]!), Math.cos(5 * f[1]!)], [0, 0, 1, 1]];
      expect(relErr(plain, torch.tensor(expected))).toBeLessThan(1e-6);
      // flipped and odd: [cos, sin, 0]; shift 0 → frequencies exp(−ln(10⁴)·i/2)
      const flipped = getTimestepEmbedding(t, 5, { flipSinToCos: true, downscaleFreqShift: 0 });
      const g2 = [1, Math.exp(-Math.log(10000) / 2)];
      expect(relErr(flipped, torch.tensor([[Math.cos(5), Math.cos(5 * g2[1]!), Math.sin(5), Math.sin(5 * g2[1]!), 0], [1, 1, 0, 0, 0]]))).toBeLessThan(1e-6);
    });
  });
});

describe('UNet2DConditionModel schema', () => {
  it('stateDict() keys and shapes equal the tiny-sd checkpoint', () => {
    const header = readSafetensorsHeader(join(tinySd, 'unet', 'diffusion_pytorch_model.safetensors'));
    const expected = new Map(header.tensors.map((t) => [t.name, t.shape]));
    const ours = new Map([...unet.stateDict()].map(([k, t]) => [k, t.shape]));
    expect(ours).toEqual(expected);
  });

  it('builds SD 1.5 on the meta device with diffusers keys, shapes and order (859,520,964 parameters)', () => {
    const expected = readJson<Record<string, number[]>>('sd15-shape', 'unet_keys.json');
    const model = torch.withDefaultDevice('meta', () => UNet2DConditionModel.fromConfig(sd15Config));
    try {
      expect([...model.stateDict()].map(([k, t]) => [k, t.shape])).toEqual(Object.entries(expected));
      expect(model.numParameters()).toBe(859_520_964);
      expect(model.conv_in.weight.device).toBe('meta');
      // attention_head_dim 8 means 8 heads: 40, 80, 160 wide in the 320/640/1280 blocks
      expect(headsOf(model.down_blocks.at(0))).toEqual([8, 40]);
      expect(headsOf(model.mid_block)).toEqual([8, 160]);
    } finally {
      model.dispose();
    }
  });

  it('LoRA seam: the 128 attention projections of SD 1.5 are …attn1/attn2.{to_q,to_k,to_v,to_out.0}', () => {
    const targets = readJson<Record<string, { in: number; out: number }>>('sd15-shape', 'lora_targets.json');
    const model = torch.withDefaultDevice('meta', () => UNet2DConditionModel.fromConfig(sd15Config));
    try {
      const attentions = model.namedModules().filter(([, m]) => m instanceof Attention);
      expect(attentions.every(([name]) => /\.attn[12]$/.test(name))).toBe(true);
      const found: Record<string, { in: number; out: number }> = {};
      for (const [name, m] of attentions) {
        const a = m as Attention;
        for (const [proj, layer] of [['to_q', a.to_q], ['to_k', a.to_k], ['to_v', a.to_v], ['to_out.0', a.to_out.at(0)]] as const) {
          expect(layer).toBeInstanceOf(Linear);
          const l = layer as Linear;
          found[`${name}.${proj}`] = { in: l.inFeatures, out: l.outFeatures };
        }
      }
      expect(Object.keys(found)).toHaveLength(128);
      expect(found).toEqual(Object.fromEntries(Object.entries(targets).map(([k, v]) => [k, { in: v.in, out: v.out }])));
      // the names are real module paths
      const modules = new Map(model.namedModules());
      for (const name of Object.keys(targets)) expect(modules.get(name), name).toBeInstanceOf(Linear);
    } finally {
      model.dispose();
    }
  });
});

describe('UNet2DConditionModel config', () => {
  const small = {
    ...tinyConfig,
    down_block_types: ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'],
    up_block_types: ['CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
    norm_num_groups: 8,
  };

  it('a per-block attention_head_dim list gives each block its head count (up blocks reversed)', () => {
    const model = UNet2DConditionModel.fromConfig({ ...small, attention_head_dim: [2, 4] });
    try {
      expect(headsOf(model.down_blocks.at(0))).toEqual([2, 16]);
      expect(headsOf(model.down_blocks.at(1))).toEqual([4, 16]);
      expect(headsOf(model.mid_block)).toEqual([4, 16]);
      expect(headsOf(model.up_blocks.at(0))).toEqual([4, 16]);
      expect(headsOf(model.up_blocks.at(1))).toEqual([2, 16]);
      const shape = noGrad(() => tidy(() => model.forward(torch.randn([1, 4, 8, 8]), 3, torch.randn([1, 5, 32])).shape));
      expect(shape).toEqual([1, 4, 8, 8]);
    } finally {
      model.dispose();
    }
  });

  it('SD 2.x fields: linear projections, upcast attention, lists for layers and cross_attention_dim, stacked transformers', () => {
    const model = UNet2DConditionModel.fromConfig({
      ...small, attention_head_dim: [2, 4], use_linear_projection: true, upcast_attention: true,
      cross_attention_dim: [24, 16], layers_per_block: [1, 2], transformer_layers_per_block: 2,
    });
    try {
      const tr = transformerOf(model.down_blocks.at(0));
      expect(tr.proj_in).toBeInstanceOf(Linear);
      expect(tr.proj_in.weight.shape).toEqual([32, 32]);
      expect(tr.transformer_blocks.length).toBe(2);
      expect(tr.transformer_blocks.at(1).attn2.upcastAttention).toBe(true);
      expect((tr.transformer_blocks.at(0).attn2.to_k as Linear).inFeatures).toBe(24);
      expect(model.down_blocks.at(0).resnets.length).toBe(1);
      expect(model.up_blocks.at(0).resnets.length).toBe(3); // reversed layers_per_block + 1
      expect(model.up_blocks.at(1).resnets.length).toBe(2);
      expect((model.mid_block.attentions.at(0).transformer_blocks.at(0).attn2.to_k as Linear).inFeatures).toBe(16);
      const sd = model.stateDict();
      expect(sd.get('down_blocks.0.attentions.0.transformer_blocks.1.ff.net.0.proj.weight')?.shape).toEqual([256, 32]);
      expect(sd.get('up_blocks.0.attentions.2.proj_out.weight')?.shape).toEqual([64, 64]);
    } finally {
      model.dispose();
    }
    // SD 1.x (use_linear_projection false): 1×1 convs, as the tiny-sd checkpoint has them
    expect(transformerOf(unet.down_blocks.at(0)).proj_in).toBeInstanceOf(Conv2d);
  });

  it('norm_eps, mid_block_scale_factor, downsample_padding, conv kernels, time_embedding_dim reach their layers', () => {
    const model = UNet2DConditionModel.fromConfig({
      ...small, norm_eps: 1e-3, mid_block_scale_factor: 2, downsample_padding: 0, conv_in_kernel: 5, conv_out_kernel: 1,
      time_embedding_dim: 48,
    });
    try {
      const down = model.down_blocks.at(0);
      const tr = transformerOf(down);
      // resnets and conv_norm_out take norm_eps; diffusers fixes the transformer's GroupNorm at 1e-6, its LayerNorms at 1e-5
      expect([down.resnets.at(0).norm1.eps, model.conv_norm_out.eps, tr.norm.eps, tr.transformer_blocks.at(0).norm3.eps]).toEqual([1e-3, 1e-3, 1e-6, 1e-5]);
      expect(model.mid_block.resnets.items.map((r) => r.outputScaleFactor)).toEqual([2, 2]);
      expect(down.resnets.at(0).outputScaleFactor).toBe(1);
      expect(down.downsamplers?.at(0).padding).toBe(0);
      expect([model.conv_in.weight.shape, model.conv_in.padding, model.conv_out.weight.shape, model.conv_out.padding]).toEqual([[32, 4, 5, 5], 2, [4, 32, 1, 1], 0]);
      expect(model.time_embedding.linear_1.weight.shape).toEqual([48, 32]);
      expect(down.resnets.at(0).time_emb_proj?.weight.shape).toEqual([32, 48]);
      const shape = noGrad(() => tidy(() => model.forward(torch.randn([1, 4, 8, 8]), 3, torch.randn([1, 5, 32])).shape));
      expect(shape).toEqual([1, 4, 8, 8]);
    } finally {
      model.dispose();
    }
  });

  it.each([
    ['class_embed_type', 'timestep'],
    ['num_class_embeds', 10],
    ['addition_embed_type', 'text_image'],
    ['resnet_time_scale_shift', 'scale_shift'],
    ['only_cross_attention', true],
    ['only_cross_attention', [false, true]],
    ['dual_cross_attention', true],
    ['time_embedding_type', 'fourier'],
    ['encoder_hid_dim', 768],
    ['time_cond_proj_dim', 256],
    ['timestep_post_act', 'silu'],
    ['attention_type', 'gated'],
    ['class_embeddings_concat', true],
    ['num_attention_heads', 8],
    ['act_fn', 'gelu'],
    ['mid_block_type', null],
    ['mid_block_type', 'UNetMidBlock2DSimpleCrossAttn'],
    ['down_block_types', ['AttnDownBlock2D', 'DownBlock2D']],
    ['up_block_types', ['UpBlock2D', 'AttnUpBlock2D']],
    ['attention_head_dim', [8, 8, 8]],
    ['layers_per_block', 'two'],
    ['transformer_layers_per_block', [[1, 2], [1, 2]]],
    ['norm_num_groups', null],
  ])('%s = %j is an error naming the field', (field, value) => {
    const config = { ...tinyConfig, [field]: value };
    expect(() => UNet2DConditionModel.fromConfig(config)).toThrow(`'${field}'`);
  });

  it('an unknown config field is an error naming it', () => {
    expect(() => UNet2DConditionModel.fromConfig({ ...tinyConfig, made_up_option: 1 })).toThrow("'made_up_option'");
  });
});

describe('UNet gradient checkpointing', () => {
  it('gives the same gradients (to the last bits) and keeps fewer activations alive', () => {
    const dir = join(fixtures, 'tiny-sd/unet');
    const unet = UNet2DConditionModel.fromPretrained(dir);
    unet.train();
    // train a few layers in every part of the network (the rest frozen, as with LoRA)
    const trained = unet.namedParameters().filter(([n]) => /attn2\.to_q\.weight|conv_in\.weight|resnets\.0\.conv1\.weight/.test(n)).map(([, p]) => p);
    unet.requiresGrad_(false);
    for (const p of trained) p.requiresGrad = true;
    const run = (ckpt: boolean): { grads: Tensor[]; held: number } => {
      unet.enableGradientCheckpointing(ckpt);
      for (const p of trained) p.grad = null;
      torch.manualSeed(3);
      let held = 0;
      tidy(() => {
        const x = torch.randn([1, 4, 16, 16]);
        const ctx = torch.randn([1, 77, 32]);
        const before = memory().cpu.allocatedBytes;
        const y = unet.forward(x, 500, ctx);
        held = memory().cpu.allocatedBytes - before;
        y.square().mean().backward();
      });
      return { grads: trained.map((p) => keep(p.grad!)), held };
    };
    const plain = run(false);
    const ckpt = run(true);
    expect(trained.length).toBeGreaterThan(5);
    // Gradients reaching a layer through the skip connections and the main path are summed in another
    // order when blocks are replayed, so early layers differ in the last bits (as with torch.utils.checkpoint);
    // layers after the last skip fork are bit-identical.
    const errs = plain.grads.map((g, i) => relErr(g, ckpt.grads[i]!));
    for (const e of errs) expect(e).toBeLessThan(1e-6);
    expect(plain.grads.filter((g, i) => bitEqual(g, ckpt.grads[i]!)).length).toBeGreaterThan(0);
    expect(ckpt.held).toBeLessThan(plain.held / 2);
    dispose([...plain.grads, ...ckpt.grads]);
    unet.dispose();
  });
});
