// SDXL's models against diffusers 0.31 / transformers 4.45 (goldens/sdxl_tokenizer, sdxl_text, sdxl_unet on
// tiny-sdxl): both tokenizers (tokenizer_2 pads with '!' = 0), CLIPTextModel and CLIPTextModelWithProjection
// (penultimate hidden states, text_embeds), the UNet with addition_embed_type 'text_time', the SDXL VAE; and at
// full scale on the meta device, SDXL base 1.0's key names, shapes and parameter counts (fixtures/sdxl-shape).
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { noGrad } from '../lib/autograd.js';
import { AutoencoderKL } from '../lib/models/autoencoder_kl.js';
import { CLIPTextModel, CLIPTextModelWithProjection, clipTextParameterCount, parseCLIPTextConfig } from '../lib/models/clip_text_model.js';
import { CLIPTokenizer } from '../lib/models/clip_tokenizer.js';
import { readConfig } from '../lib/models/loading.js';
import { UNet2DConditionModel, configFromJson, unetParameterCount } from '../lib/models/unet_2d_condition.js';
import { kohyaName, parseLoraKey, sgmToDiffusersPath, toKohyaKeys } from '../lib/lora/formats.js';
import { Generator } from '../lib/random.js';
import { tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { fixtures, goldenFile, relErr } from './helpers.js';

const tinySdxl = join(fixtures, 'tiny-sdxl');
const shape = join(fixtures, 'sdxl-shape');
const readJson = <T>(...parts: string[]): T => JSON.parse(readFileSync(join(fixtures, ...parts), 'utf8')) as T;
const text = goldenFile('sdxl_text.safetensors');
const unetGolden = goldenFile('sdxl_unet.safetensors');
const vaeGolden = goldenFile('vae.safetensors');
const TOL = 1e-5;

let te1: CLIPTextModel;
let te2: CLIPTextModelWithProjection;
beforeAll(() => {
  te1 = CLIPTextModel.fromPretrained(tinySdxl, { subfolder: 'text_encoder' });
  te2 = CLIPTextModelWithProjection.fromPretrained(tinySdxl, { subfolder: 'text_encoder_2' });
});
afterAll(() => {
  te1.dispose();
  te2.dispose();
  text.dispose();
  unetGolden.dispose();
  vaeGolden.dispose();
});

function expectClose(label: string, ours: Tensor, ref: Tensor, tol = TOL): void {
  const e = relErr(ours, ref);
  console.log(`${label}: relErr ${e.toExponential(2)}`);
  expect(e, label).toBeLessThan(tol);
}

interface TokenizerGolden { entries: { prompt: string; tokenizer: { input_ids: number[] }; tokenizer_2: { input_ids: number[] } }[] }

describe('SDXL tokenizers (tiny-sdxl tokenizer/ and tokenizer_2/)', () => {
  it('give the ids of transformers for every golden prompt; tokenizer_2 splits every "!" out as the pad token 0', () => {
    const tok1 = CLIPTokenizer.fromPretrained(tinySdxl, { subfolder: 'tokenizer' });
    const tok2 = CLIPTokenizer.fromPretrained(tinySdxl, { subfolder: 'tokenizer_2' });
    expect(tok2.padTokenId).toBe(0);
    expect(tok1.padTokenId).toBe(49407);
    const golden = readJson<TokenizerGolden>('goldens', 'sdxl_tokenizer.json');
    expect(golden.entries.length).toBe(9);
    for (const e of golden.entries) {
      const opts = { padding: 'max_length', truncation: true } as const;
      expect(tok1.call(e.prompt, opts).inputIds[0], `tokenizer: ${e.prompt}`).toEqual(e.tokenizer.input_ids);
      expect(tok2.call(e.prompt, opts).inputIds[0], `tokenizer_2: ${e.prompt}`).toEqual(e.tokenizer_2.input_ids);
    }
  });
});

describe('SDXL text encoders vs transformers (tiny-sdxl)', () => {
  it('CLIPTextModel: penultimate hidden state (no final_layer_norm) and last_hidden_state', () => {
    tidy(() => noGrad(() => {
      const out = te1.forward(text.get('input_ids'), { outputHiddenStates: true });
      const hs = out.hiddenStates!;
      expectClose('te1 hidden_states[-2]', hs[hs.length - 2]!, text.get('te1/hidden_states_penultimate'));
      expectClose('te1 last_hidden_state', out.lastHiddenState, text.get('te1/last_hidden_state'));
    }));
  });

  it('CLIPTextModelWithProjection: hidden states, legacy eos pooling (eos_token_id 2) and text_embeds', () => {
    tidy(() => noGrad(() => {
      const ids = text.get('input_ids_2');
      const out = te2.forward(ids, { outputHiddenStates: true });
      const hs = out.hiddenStates!;
      expect(hs.length).toBe(5);
      expectClose('te2 hidden_states[-2]', hs[hs.length - 2]!, text.get('te2/hidden_states_penultimate'));
      expectClose('te2 last_hidden_state', out.lastHiddenState, text.get('te2/last_hidden_state'));
      expectClose('te2 pooled', te2.text_model.forward(ids).poolerOutput, text.get('te2/pooled_before_projection'));
      expectClose('te2 text_embeds', out.textEmbeds, text.get('te2/text_embeds'));
      expect(te2.forward(ids).hiddenStates).toBeUndefined();
    }));
  });

  it('has exactly the checkpoint keys (text_projection.weight, no bias)', () => {
    const keys = [...te2.stateDict().keys()];
    expect(keys[keys.length - 1]).toBe('text_projection.weight');
    expect(keys).not.toContain('text_projection.bias');
    expect(te2.text_projection.weight.shape).toEqual([16, 12]);
  });
});

describe('SDXL UNet with added conditions (text_time) vs diffusers', () => {
  let unet: UNet2DConditionModel;
  beforeAll(() => { unet = UNet2DConditionModel.fromPretrained(tinySdxl, { subfolder: 'unet' }); });
  afterAll(() => unet.dispose());

  const cond = () => ({ textEmbeds: unetGolden.get('inputs/text_embeds'), timeIds: unetGolden.get('inputs/time_ids') });

  it('embeddings: time_proj, time_emb, add_time_embeds, add_embeds, aug_emb, emb_total', () => {
    tidy(() => noGrad(() => {
      const t = unetGolden.get('timesteps_vec');
      const proj = unet.time_proj.forward(t);
      expectClose('time_proj', proj, unetGolden.get('time_proj'));
      const temb = unet.time_embedding.forward(proj);
      expectClose('time_emb', temb, unetGolden.get('time_emb'));
      const timeIds = unetGolden.get('inputs/time_ids');
      const addTime = unet.add_time_proj!.forward(timeIds.flatten()).reshape(2, -1);
      expectClose('add_time_embeds', addTime, unetGolden.get('add_time_embeds'));
      expectClose('add_embeds', torch.cat([unetGolden.get('inputs/text_embeds'), addTime], -1), unetGolden.get('add_embeds'));
      const aug = unet.augEmbedding(temb, cond())!;
      expectClose('aug_emb', aug, unetGolden.get('aug_emb'));
      expectClose('emb_total', temb.add(aug), unetGolden.get('emb_total'));
    }));
  });

  it('forward: per-sample timesteps [10, 999] and a 0-dim 751.0', () => {
    tidy(() => noGrad(() => {
      const sample = unetGolden.get('inputs/sample');
      const ctx = unetGolden.get('inputs/encoder_hidden_states');
      expectClose('unet out t=[10, 999]', unet.forward(sample, unetGolden.get('timesteps_vec'), ctx, cond()), unetGolden.get('out_t_vec'));
      expectClose('unet out t=751', unet.forward(sample, unetGolden.get('timestep_scalar'), ctx, cond()), unetGolden.get('out_t751'));
      expectClose('unet out t=751 (number)', unet.forward(sample, 751, ctx, cond()), unetGolden.get('out_t751'));
      expect(relErr(unetGolden.get('out_t_vec'), unetGolden.get('out_t751'))).toBeGreaterThan(1e-2);
    }));
  });

  it('refuses a forward without the added conditions, and added conditions of the wrong width', () => {
    tidy(() => noGrad(() => {
      const sample = unetGolden.get('inputs/sample');
      const ctx = unetGolden.get('inputs/encoder_hidden_states');
      expect(() => unet.forward(sample, 10, ctx)).toThrow(/'text_time' \(SDXL\) needs addedCond \{ textEmbeds, timeIds \}/);
      const bad = { textEmbeds: torch.zeros([2, 12]), timeIds: unetGolden.get('inputs/time_ids') };
      expect(() => unet.forward(sample, 10, ctx, bad)).toThrow(/12 \+ 48 added-embedding inputs per sample; add_embedding takes 64/);
    }));
  });

  it('refuses unsupported addition_embed_type values and a text_time config without its widths, naming the field', () => {
    const config = readConfig(join(tinySdxl, 'unet'));
    expect(() => UNet2DConditionModel.fromConfig({ ...config, addition_embed_type: 'text_image' }))
      .toThrow(/'addition_embed_type' "text_image" is not supported \(supported: text_time\)/);
    expect(() => UNet2DConditionModel.fromConfig({ ...config, projection_class_embeddings_input_dim: null }))
      .toThrow(/'projection_class_embeddings_input_dim' must be a positive integer when addition_embed_type is 'text_time'/);
    expect(() => UNet2DConditionModel.fromConfig({ ...config, addition_time_embed_dim: 0 })).toThrow(/'addition_time_embed_dim'/);
    expect(() => UNet2DConditionModel.fromConfig({ ...config, upcast_attention: 'yes' })).toThrow(/'upcast_attention'/);
  });
});

describe('SDXL VAE (scaling_factor 0.13025, force_upcast) vs diffusers', () => {
  it('encode (mean, logvar, seeded sample, scaled latents) and decode', () => {
    const vae = AutoencoderKL.fromPretrained(tinySdxl, { subfolder: 'vae' });
    try {
      expect(vae.scalingFactor).toBe(0.13025);
      expect(vae.forceUpcast).toBe(true);
      tidy(() => noGrad(() => {
        const dist = vae.encode(vaeGolden.get('pixel_values'));
        expectClose('vae mean', dist.mean, unetGolden.get('vae/mean'));
        expectClose('vae logvar', dist.logvar, unetGolden.get('vae/logvar'));
        const sample = dist.sample(new Generator('cpu').manualSeed(5));
        expectClose('vae sample', sample, unetGolden.get('vae/sample_seed5'));
        expectClose('vae latents', sample.mul(vae.scalingFactor), unetGolden.get('vae/latents_scaled'));
        expectClose('vae decode', vae.decode(dist.mean), unetGolden.get('vae/decoded_from_mean'));
      }));
    } finally {
      vae.dispose();
    }
  });
});

describe('SDXL base 1.0 at full scale (meta device, fixtures/sdxl-shape)', () => {
  interface Readme { [k: string]: { num_params?: number } }
  const readme = readJson<Readme>('sdxl-shape', 'README.json');
  const keysOf = (m: { stateDict(): Map<string, Tensor> }): [string, number[]][] => [...m.stateDict()].map(([k, t]) => [k, t.shape]);

  it('UNet: diffusers keys, shapes and order; 2,567,463,684 parameters, also counted from the config', () => {
    const config = readConfig(join(shape, 'unet'));
    const model = torch.withDefaultDevice('meta', () => UNet2DConditionModel.fromConfig(config));
    try {
      expect(keysOf(model)).toEqual(Object.entries(readJson<Record<string, number[]>>('sdxl-shape', 'unet_keys.json')));
      expect(model.numParameters()).toBe(2_567_463_684);
      expect(readme.unet?.num_params).toBe(2_567_463_684);
      expect(unetParameterCount(configFromJson(config))).toBe(2_567_463_684);
      expect(model.conv_in.weight.device).toBe('meta');
    } finally {
      model.dispose();
    }
  });

  it('VAE: keys, shapes and order; 83,653,863 parameters', () => {
    const model = torch.withDefaultDevice('meta', () => new AutoencoderKL(readConfig(join(shape, 'vae'))));
    try {
      expect(keysOf(model)).toEqual(Object.entries(readJson<Record<string, number[]>>('sdxl-shape', 'vae_keys.json')));
      expect(model.numParameters()).toBe(readme.vae?.num_params);
    } finally {
      model.dispose();
    }
  });

  it('text encoders: CLIP-L (123,060,480) and OpenCLIP bigG with projection (694,659,840), keys in transformers\' order', () => {
    const c1 = readConfig(join(shape, 'text_encoder'));
    const c2 = readConfig(join(shape, 'text_encoder_2'));
    const m1 = torch.withDefaultDevice('meta', () => new CLIPTextModel(c1));
    const m2 = torch.withDefaultDevice('meta', () => new CLIPTextModelWithProjection(c2));
    try {
      expect(keysOf(m1)).toEqual(Object.entries(readJson<Record<string, number[]>>('sdxl-shape', 'text_encoder_keys.json')));
      expect(keysOf(m2)).toEqual(Object.entries(readJson<Record<string, number[]>>('sdxl-shape', 'text_encoder_2_keys.json')));
      expect(m1.numParameters()).toBe(123_060_480);
      expect(m2.numParameters()).toBe(694_659_840);
      expect(clipTextParameterCount(parseCLIPTextConfig(c1))).toBe(123_060_480);
    } finally {
      m1.dispose();
      m2.dispose();
    }
  });

  it('LoRA targets: the script\'s 560 UNet and 48 + 128 text-encoder layers are Linear modules of these paths', () => {
    const unet = torch.withDefaultDevice('meta', () => UNet2DConditionModel.fromConfig(readConfig(join(shape, 'unet'))));
    const m2 = torch.withDefaultDevice('meta', () => new CLIPTextModelWithProjection(readConfig(join(shape, 'text_encoder_2'))));
    try {
      for (const [model, file, count] of [[unet, 'lora_targets.json', 560], [m2, 'lora_targets_text_encoder_2.json', 128]] as const) {
        const targets = readJson<Record<string, { in: number; out: number }>>('sdxl-shape', file);
        expect(Object.keys(targets)).toHaveLength(count);
        const modules = new Map(model.namedModules());
        for (const [name, t] of Object.entries(targets)) {
          const l = modules.get(name) as unknown as { inFeatures: number; outFeatures: number } | undefined;
          expect(l, name).toBeDefined();
          expect([l!.inFeatures, l!.outFeatures], name).toEqual([t.in, t.out]);
        }
      }
    } finally {
      unet.dispose();
      m2.dispose();
    }
  });
});

describe('SDXL LoRA key names at full scale (fixtures/sdxl-shape lora_targets*.json)', () => {
  interface Target { kohya: string; sgm?: string }
  it('Kohya SGM UNet names (lora_unet_input_blocks_4_1_…) map to the 560 diffusers module paths (layers_per_block 2)', () => {
    const targets = readJson<Record<string, Target>>('sdxl-shape', 'lora_targets.json');
    for (const [path, t] of Object.entries(targets)) {
      const k = parseLoraKey(`${t.kohya}.lora_down.weight`);
      expect(k?.component, t.kohya).toBe('unet');
      expect(k?.path, t.kohya).toBe(t.sgm);
      expect(sgmToDiffusersPath(k!.path, 2), t.kohya).toBe(path);
    }
    // the other SGM blocks, as diffusers' _maybe_map_sgm_blocks_to_diffusers maps them
    expect(sgmToDiffusersPath('middle_block.0.emb_layers.1', 2)).toBe('mid_block.resnets.0.emb_layers.1');
    expect(sgmToDiffusersPath('middle_block.2.in_layers.2', 2)).toBe('mid_block.resnets.1.in_layers.2');
    expect(sgmToDiffusersPath('input_blocks.3.0.op', 2)).toBe('down_blocks.0.downsamplers.0.conv');
    expect(sgmToDiffusersPath('output_blocks.2.2.conv', 2)).toBe('up_blocks.0.upsamplers.0.conv');
    expect(sgmToDiffusersPath('input_blocks.0.0', 2)).toBeNull();
    expect(sgmToDiffusersPath('middle_block.3.x', 2)).toBeNull();
    expect(sgmToDiffusersPath('down_blocks.1.attentions.0.proj_in', 2)).toBe('down_blocks.1.attentions.0.proj_in');
  });

  it('lora_te1_ / lora_te2_ name the two text encoders; Kohya files with text_encoder_2 layers are written with te1/te2', () => {
    for (const [file, component] of [['lora_targets_text_encoder.json', 'text_encoder'], ['lora_targets_text_encoder_2.json', 'text_encoder_2']] as const) {
      for (const [path, t] of Object.entries(readJson<Record<string, Target>>('sdxl-shape', file))) {
        expect(parseLoraKey(`${t.kohya}.alpha`), t.kohya).toEqual({ component, path, slot: 'alpha', layout: 'kohya' });
      }
    }
    expect(parseLoraKey('text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight'))
      .toEqual({ component: 'text_encoder_2', path: 'text_model.encoder.layers.0.self_attn.q_proj', slot: 'up', layout: 'diffusers' });
    tidy(() => {
      const layer = (component: 'text_encoder' | 'text_encoder_2') => ({ component, path: 'text_model.encoder.layers.0.self_attn.q_proj', down: torch.zeros([4, 8]), up: torch.zeros([8, 4]), alpha: null });
      expect([...toKohyaKeys([layer('text_encoder'), layer('text_encoder_2')]).keys()].filter((k) => k.endsWith('.alpha')))
        .toEqual([`${kohyaName('text_model.encoder.layers.0.self_attn.q_proj', 'lora_te1')}.alpha`, 'lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha']);
      expect([...toKohyaKeys([layer('text_encoder')]).keys()][0]).toBe('lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha');
    });
  });
});
