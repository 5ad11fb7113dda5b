// AutoencoderKL against diffusers 0.31 (goldens/vae: encode mean/logvar/std, a seeded posterior sample,
// decode), its state-dict schema at tiny and SD 1.5 scale, legacy attention checkpoints, and lifetimes.
import { copyFileSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readSafetensorsHeader, saveSafetensors } from '../lib/io/safetensors.js';
import { AutoencoderKL, parseConfig } from '../lib/models/autoencoder_kl.js';
import { DiagonalGaussianDistribution } from '../lib/models/vae.js';
import { Generator } from '../lib/random.js';
import { dispose, memory, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import { noGrad } from '../lib/autograd.js';
import * as torch from '../lib/torch.js';
import { bitEqual, fixtures, relErr, goldenFile } from './helpers.js';

const tinySd = join(fixtures, 'tiny-sd');
const tinyVae = join(tinySd, 'vae');
const TOL = 1e-4;

interface GoldenMeta { scaling_factor: number; tensors: Record<string, { shape: number[] }> }
const goldenMeta = JSON.parse(readFileSync(join(fixtures, 'goldens', 'vae.json'), 'utf8')) as GoldenMeta;

let vae: AutoencoderKL;
const golden = goldenFile('vae.safetensors');
const g = (name: string): Tensor => golden.get(name);

beforeAll(() => {
  vae = AutoencoderKL.fromPretrained(tinySd, { subfolder: 'vae' });
});

afterAll(() => {
  vae.dispose();
  golden.dispose();
});

describe('AutoencoderKL parity with diffusers 0.31 (tiny-sd, fp32 CPU)', () => {
  it('encode: posterior mean, logvar and std', () => {
    const errs = noGrad(() => tidy(() => {
      const dist = vae.encode(g('pixel_values'));
      expect(dist.mean.shape).toEqual(goldenMeta.tensors.mean?.shape);
      return { mean: relErr(dist.mean, g('mean')), logvar: relErr(dist.logvar, g('logvar')), std: relErr(dist.std, g('std')) };
    }));
    console.log('vae encode relative errors', errs);
    expect(errs.mean).toBeLessThan(TOL);
    expect(errs.logvar).toBeLessThan(TOL);
    expect(errs.std).toBeLessThan(TOL);
  });

  it('decode(mean)', () => {
    const err = noGrad(() => tidy(() => relErr(vae.decode(g('mean')), g('decoded_from_mean'))));
    console.log('vae decode relative error', err);
    expect(err).toBeLessThan(TOL);
  });

  it('sample(Generator seeded 5) and the training latents (× scaling_factor)', () => {
    const r = noGrad(() => tidy(() => {
      const dist = vae.encode(g('pixel_values'));
      const sample = dist.sample(new Generator('cpu').manualSeed(5));
      const noise = torch.randn(dist.mean.shape, { generator: new Generator('cpu').manualSeed(5) });
      return {
        noiseBits: bitEqual(noise, g('sample_noise_seed5')),
        sample: relErr(sample, g('sample_seed5')),
        scaled: relErr(sample.mul(vae.scalingFactor), g('latents_scaled')),
      };
    }));
    console.log('vae sample relative errors', r);
    expect(vae.scalingFactor).toBe(goldenMeta.scaling_factor);
    expect(r.noiseBits).toBe(true);
    expect(r.sample).toBeLessThan(TOL);
    expect(r.scaled).toBeLessThan(TOL);
  });
});

describe('DiagonalGaussianDistribution', () => {
  it('sample(generator) is reproducible and equals mean + std·randn from the same seed', () => {
    tidy(() => {
      const moments = torch.randn([2, 8, 5, 3], { generator: new Generator().manualSeed(1) });
      const dist = new DiagonalGaussianDistribution(moments);
      const a = dist.sample(new Generator().manualSeed(42));
      const b = dist.sample(new Generator().manualSeed(42));
      const c = dist.sample(new Generator().manualSeed(43));
      const expected = dist.mean.add(dist.std.mul(torch.randn([2, 4, 5, 3], { generator: new Generator().manualSeed(42) })));
      expect(bitEqual(a, b)).toBe(true);
      expect(bitEqual(a, c)).toBe(false);
      expect(bitEqual(a, expected)).toBe(true);
      expect(bitEqual(dist.mode(), moments.narrow(1, 0, 4).contiguous())).toBe(true);
    });
  });

  it('draws on a CPU generator for latents elsewhere, then moves the noise (randn_tensor)', () => {
    tidy(() => {
      const moments = torch.withDefaultDevice('meta', () => torch.zeros([1, 8, 4, 4]));
      const s = new DiagonalGaussianDistribution(moments).sample(new Generator('cpu').manualSeed(0));
      expect([s.device, s.shape]).toEqual(['meta', [1, 4, 4, 4]]);
    });
  });

  it('clamps logvar to [-30, 20] and derives std = exp(logvar/2), var = exp(logvar)', () => {
    tidy(() => {
      const moments = torch.tensor([[[[0.5]], [[-100]]], [[[0.5]], [[100]]]]); // [2, 2, 1, 1]
      const dist = new DiagonalGaussianDistribution(moments);
      expect(dist.logvar.dataSync()).toEqual(Float32Array.from([-30, 20]));
      expect(relErr(dist.std, dist.logvar.mul(0.5).exp())).toBe(0);
      expect(relErr(dist.var, dist.logvar.exp())).toBe(0);
    });
  });
});

describe('AutoencoderKL state dict', () => {
  it('has exactly the tiny-sd checkpoint keys and shapes', () => {
    const header = readSafetensorsHeader(join(tinyVae, 'diffusion_pytorch_model.safetensors'));
    const ckpt = Object.fromEntries(header.tensors.map((t) => [t.name, t.shape]));
    const ours = Object.fromEntries([...vae.stateDict()].map(([k, t]) => [k, t.shape]));
    expect(ours).toEqual(ckpt);
  });

  it('builds SD 1.5 on the meta device with diffusers keys, shapes and order (83.7 M parameters)', () => {
    const config = JSON.parse(readFileSync(join(fixtures, 'sd15-shape', 'vae', 'config.json'), 'utf8')) as Record<string, unknown>;
    const expected = JSON.parse(readFileSync(join(fixtures, 'sd15-shape', 'vae_keys.json'), 'utf8')) as Record<string, number[]>;
    const model = torch.withDefaultDevice('meta', () => new AutoencoderKL(config));
    try {
      const ours = [...model.stateDict()].map(([k, t]) => [k, t.shape]);
      expect(ours).toEqual(Object.entries(expected));
      expect(model.numParameters()).toBe(83_653_863);
      expect(model.encoder.conv_in.weight.device).toBe('meta');
      expect(model.scalingFactor).toBe(0.18215);
      // the mid-block attention: one head over all 512 channels, softmax upcast as diffusers sets it
      const attn = model.decoder.mid_block.attentions.at(0);
      expect([attn.heads, attn.dimHead, attn.upcastSoftmax, attn.residualConnection]).toEqual([1, 512, true, true]);
    } finally {
      model.dispose();
    }
  });
});

describe('AutoencoderKL loading', () => {
  let dir: string;
  beforeAll(() => { dir = mkdtempSync(join(tmpdir(), 'difflora-vae-')); });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('loads a checkpoint with the old attention names and 1×1-conv shapes, giving identical outputs', () => {
    const old = new Map<string, Tensor>();
    const views: Tensor[] = [];
    for (const [key, t] of vae.stateDict()) {
      const renamed = key.replace(/\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\./, (_m, name: string) =>
        `.attentions.0.${({ to_q: 'query', to_k: 'key', to_v: 'value', 'to_out.0': 'proj_attn' } as Record<string, string>)[name]}.`);
      // the LDM layout stores the projections as 1×1 convs
      const conv = renamed !== key && key.endsWith('.weight');
      if (conv) views.push(t.reshape([...t.shape, 1, 1]));
      old.set(renamed, conv ? (views.at(-1) as Tensor) : t);
    }
    expect([...old.keys()]).toContain('encoder.mid_block.attentions.0.query.weight');
    expect(old.get('decoder.mid_block.attentions.0.proj_attn.weight')?.shape).toEqual([64, 64, 1, 1]);
    saveSafetensors(join(dir, 'diffusion_pytorch_model.safetensors'), old, { format: 'pt' });
    dispose(views);
    copyFileSync(join(tinyVae, 'config.json'), join(dir, 'config.json'));

    const legacy = AutoencoderKL.fromPretrained(dir);
    try {
      noGrad(() => tidy(() => {
        const x = g('pixel_values');
        const a = vae.encode(x);
        const b = legacy.encode(x);
        expect(bitEqual(a.mean, b.mean)).toBe(true);
        expect(bitEqual(a.logvar, b.logvar)).toBe(true);
        expect(bitEqual(vae.decode(a.mean), legacy.decode(b.mean))).toBe(true);
      }));
    } finally {
      legacy.dispose();
    }
  });

  it('refuses a checkpoint with a missing key, naming it', () => {
    const sub = mkdtempSync(join(dir, 'missing-'));
    const sd = new Map(vae.stateDict());
    sd.delete('decoder.conv_out.bias');
    saveSafetensors(join(sub, 'diffusion_pytorch_model.safetensors'), sd);
    copyFileSync(join(tinyVae, 'config.json'), join(sub, 'config.json'));
    const before = memory().numTensors;
    expect(() => AutoencoderKL.fromPretrained(sub)).toThrow(/missing key\(s\) \(1\): "decoder\.conv_out\.bias"/);
    expect(memory().numTensors).toBe(before);
  });

  it('casts to the requested dtype', () => {
    const half = AutoencoderKL.fromPretrained(tinySd, { subfolder: 'vae', dtype: 'bfloat16' });
    try {
      expect(new Set(half.parameters().map((p) => p.dtype))).toEqual(new Set(['bfloat16']));
      const err = noGrad(() => tidy(() => relErr(half.decode(g('mean').bfloat16()), g('decoded_from_mean'))));
      expect(err).toBeLessThan(5e-2); // bf16 has 8 mantissa bits: only a sanity check that the path runs
    } finally {
      half.dispose();
    }
  });
});

describe('AutoencoderKL config', () => {
  const tinyConfig = JSON.parse(readFileSync(join(tinyVae, 'config.json'), 'utf8')) as Record<string, unknown>;

  it('fills diffusers defaults for fields a config leaves out', () => {
    const c = parseConfig({ block_out_channels: [32] });
    expect(c.scaling_factor).toBe(0.18215);
    expect(c.shift_factor).toBeNull();
    expect(c.force_upcast).toBe(true);
    expect(c.layers_per_block).toBe(1);
    expect(c.use_quant_conv).toBe(true);
  });

  it('errors naming the field for unsupported values', () => {
    expect(() => new AutoencoderKL({ ...tinyConfig, down_block_types: ['DownEncoderBlock2D', 'AttnDownEncoderBlock2D'] }))
      .toThrow(/'down_block_types' contains unsupported block type "AttnDownEncoderBlock2D"/);
    expect(() => new AutoencoderKL({ ...tinyConfig, up_block_types: ['UpDecoderBlock2D'] }))
      .toThrow(/'up_block_types' must list one block per block_out_channels entry/);
    expect(() => new AutoencoderKL({ ...tinyConfig, act_fn: 'gelu' })).toThrow(/'act_fn' "gelu" is not supported/);
    expect(() => new AutoencoderKL({ ...tinyConfig, norm_type: 'spatial' })).toThrow(/unknown field\(s\) 'norm_type'/);
    expect(() => new AutoencoderKL({ ...tinyConfig, layers_per_block: 0 })).toThrow(/'layers_per_block' must be a positive integer/);
  });

  it('supports use_quant_conv / use_post_quant_conv false and mid_block_add_attention false', () => {
    const m = new AutoencoderKL({ ...tinyConfig, use_quant_conv: false, use_post_quant_conv: false, mid_block_add_attention: false });
    try {
      const keys = [...m.stateDict().keys()];
      expect(keys.some((k) => k.includes('quant_conv') || k.includes('attentions'))).toBe(false);
      const out = noGrad(() => tidy(() => m.decode(m.encode(g('pixel_values')).mode()).shape));
      expect(out).toEqual([1, 3, 64, 64]);
    } finally {
      m.dispose();
    }
  });
});

describe('AutoencoderKL lifetimes', () => {
  it('tidy around encode → sample → decode leaves the live tensor count unchanged', () => {
    const before = memory().numTensors;
    const shape = noGrad(() => tidy(() => {
      const latents = vae.encode(g('pixel_values')).sample(new Generator().manualSeed(0)).mul(vae.scalingFactor);
      return vae.decode(latents.div(vae.scalingFactor)).shape;
    }));
    expect(shape).toEqual([1, 3, 64, 64]);
    expect(memory().numTensors).toBe(before);
  });

  it('DiagonalGaussianDistribution.dispose frees its tensors (moments included)', () => {
    const before = memory().numTensors;
    const dist = new DiagonalGaussianDistribution(torch.randn([1, 8, 4, 4]));
    expect(memory().numTensors).toBeGreaterThan(before);
    dist.dispose();
    dist.dispose(); // idempotent
    expect(memory().numTensors).toBe(before);
  });
});
