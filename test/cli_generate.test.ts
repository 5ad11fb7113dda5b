// `difflora generate` and `difflora convert-lora` through the CLI entry: images on disk equal to the
// library's, LoRA files combined with weights, conversions that keep the effective weights, bad input.
import { spawnSync } from 'node:child_process';
import { existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { main } from '../lib/cli/main.js';
import { generateHelp, parseGenerateArgs } from '../lib/cli/generate.js';
import { checkDevice } from '../lib/device.js';
import { kohyaToModulePath } from '../lib/lora/convert.js';
import { loadSafetensors, saveSafetensors } from '../lib/io/safetensors.js';
import { StableDiffusionPipeline } from '../lib/pipelines/stable_diffusion.js';
import { dispose, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import { fixtures, goldenFile, relErr } from './helpers.js';

const tinySd = join(fixtures, 'tiny-sd');
const loraFile = join(fixtures, 'goldens', 'lora-diffusers', 'pytorch_lora_weights.safetensors');
const kohyaFile = join(fixtures, 'goldens', 'lora-kohya', 'tiny_sd_kohya_lora.safetensors');
let tmp: string;
beforeAll(() => { tmp = mkdtempSync(join(tmpdir(), 'difflora-gen-')); });
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function capture() {
  let out = '';
  let err = '';
  return { io: { stdout: { write: (s: string) => { out += s; } }, stderr: { write: (s: string) => { err += s; } }, env: {} }, out: () => out, err: () => err };
}

const base = ['generate', `--pretrained_model_name_or_path=${tinySd}`, '--prompt', 'a pokemon with blue eyes', '--num_inference_steps=4', '--height=64', '--width=64'];

describe('difflora generate', () => {
  it('writes the same PNG as the library for the golden latents, with a LoRA', async () => {
    const latents = join(tmp, 'latents.safetensors');
    const golden = goldenFile('inference.safetensors');
    saveSafetensors(latents, { latents: golden.get('latents') });
    const c = capture();
    const output = join(tmp, 'cli.png');
    const code = await main([...base, `--latents=${latents}`, `--lora=${loraFile}`, `--output=${output}`], c.io);
    expect(code, c.err()).toBe(0);
    expect(c.out()).toContain(output);
    expect(c.err()).toMatch(/step 5\/5/);
    const cli = await sharp(output).raw().toBuffer({ resolveWithObject: true });
    expect([cli.info.width, cli.info.height, cli.info.channels]).toEqual([64, 64, 3]);
    // the golden image, rounded to 8 bits as diffusers' numpy_to_pil does
    const ref = golden.get('lora/image').dataSync() as Float32Array;
    let worst = 0;
    ref.forEach((v, i) => { worst = Math.max(worst, Math.abs(v * 255 - (cli.data[i] as number))); });
    expect(worst).toBeLessThanOrEqual(1);
    golden.dispose();
  }, 60_000);

  it('--enable_xformers_memory_efficient_attention: every attention layer set, the same picture', async () => {
    const run = async (name: string, ...more: string[]) => {
      const c = capture();
      const output = join(tmp, name);
      const code = await main([...base, '--seed=3', `--output=${output}`, ...more], c.io);
      expect(code, c.err()).toBe(0);
      return { err: c.err(), pixels: (await sharp(output).raw().toBuffer()) };
    };
    const plain = await run('plain.png');
    const efficient = await run('efficient.png', '--enable_xformers_memory_efficient_attention');
    // every Attention of the UNet and the VAE, counted from the model
    const pipe = StableDiffusionPipeline.fromPretrained(tinySd);
    const layers = [...pipe.unet.namedModules(), ...pipe.vae.namedModules()].filter(([, m]) => m.constructor.name === 'Attention').length;
    pipe.dispose();
    expect(plain.err).not.toMatch(/memory-efficient/);
    expect(efficient.err).toContain(`memory-efficient attention in ${layers} attention layers`);
    let worst = 0;
    plain.pixels.forEach((v, i) => { worst = Math.max(worst, Math.abs(v - (efficient.pixels[i] as number))); });
    expect(worst).toBeLessThanOrEqual(1);
  }, 60_000);

  it('combines LoRA files with weights and writes one file per image', async () => {
    const c = capture();
    const output = join(tmp, 'many.png');
    const code = await main([...base, '--num_inference_steps=2', '--seed=7', '--num_images=2', '--scheduler=euler_a',
      `--lora=${loraFile}:0.5`, `--lora=${kohyaFile}:0.8`, `--output=${output}`], c.io);
    expect(code, c.err()).toBe(0);
    expect(existsSync(join(tmp, 'many-0.png')) && existsSync(join(tmp, 'many-1.png'))).toBe(true);
    expect(c.err()).toMatch(/weight 0\.5/);
    expect(c.err()).toMatch(/weight 0\.8/);
    // an existing folder gets image-<i>.png
    mkdirSync(join(tmp, 'dir'));
    expect(await main([...base, '--num_inference_steps=1', '--seed=1', `--output=${join(tmp, 'dir')}`], capture().io)).toBe(0);
    expect(readdirSync(join(tmp, 'dir'))).toEqual(['image-0.png']);
  }, 60_000);

  it('refuses bad flags with exit 2 and a message naming them', async () => {
    const cases: [string[], RegExp][] = [
      [['generate', '--num_inference_steps=2'], /--prompt is required/],
      [[...base, '--height=60'], /--height must be a multiple of 8/],
      [[...base, '--scheduler=ipndm'], /--scheduler: unknown scheduler "ipndm"/],
      [[...base, '--lora=/nowhere/x.safetensors'], /--lora: '\/nowhere\/x.safetensors' does not exist/],
      [[...base, '--no_such_flag=1'], /no_such_flag/],
      [[...base, 'stray'], /stray/],
    ];
    for (const [argv, message] of cases) {
      const c = capture();
      expect(await main(argv, c.io), argv.join(' ')).toBe(2);
      expect(c.err()).toMatch(message);
    }
  });

  it('refuses numbers outside each flag\'s domain (1e309, NaN, negatives, fractions), all problems at once', async () => {
    const cases: [string[], RegExp][] = [
      [['--guidance_scale=1e309'], /--guidance_scale must be a number from 0 to 100 .*got Infinity/],
      [['--guidance_scale=NaN'], /--guidance_scale expects a number, got 'NaN'/],
      [['--num_inference_steps=0'], /--num_inference_steps must be a whole number from 1 to 1000/],
      [['--num_inference_steps=2.5'], /--num_inference_steps must be a whole number .*got 2.5/],
      [['--width=1e300'], /--width must be a whole number from 8 to 4096, got 1e\+300/],
      [['--height=8192'], /--height must be a whole number from 8 to 4096/],
      [['--num_images=1000'], /--num_images must be a whole number from 1 to 64/],
      [['--seed=-1'], /--seed must be a whole number from 0 to/],
      [['--seed=abc'], /--seed expects a number, got 'abc'/],
      [['--lora_scale=1e309'], /--lora_scale must be a number from -100 to 100, got Infinity/],
      [[`--lora=${loraFile}:1e309`], /--lora: the weight of '.*' must be a number from -100 to 100, got Infinity/],
      [['--device=gpu'], /--device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'/],
    ];
    for (const [flags, message] of cases) {
      const c = capture();
      expect(await main([...base, ...flags], c.io), flags.join(' ')).toBe(2);
      expect(c.err(), flags.join(' ')).toMatch(message);
    }
    const c = capture();
    expect(await main([...base, '--guidance_scale=1e309', '--num_images=0', '--seed=1.5'], c.io)).toBe(2);
    expect(c.err()).toMatch(/3 problems with the flags:\n {2}- --guidance_scale .*\n {2}- --seed .*\n {2}- --num_images /);
  });

  it('refuses an --output that is a device, a FIFO or under a file before loading anything; nothing is replaced', async () => {
    const fifo = join(tmp, 'fifo.png');
    spawnSync('mkfifo', [fifo]);
    const blocker = join(tmp, 'a-file');
    writeFileSync(blocker, 'keep');
    // a device of our own like /dev/full (or a link to it without root): never the machine's, which a
    // regressed refusal would replace with a PNG
    const device = join(tmp, 'full-device');
    if (spawnSync('mknod', ['-m', '666', device, 'c', '1', '7']).status !== 0) symlinkSync('/dev/full', device);
    const link = join(tmp, 'full-link');
    symlinkSync('/dev/full', link);
    const cases: [string, RegExp][] = [
      [device, /--output '.*full-device' (exists and is a character device, not a regular file|is a symbolic link \(to a character device\))/],
      [link, /--output '.*full-link' is a symbolic link \(to a character device\); refusing to replace it/],
      [fifo, /--output '.*fifo\.png' exists and is a FIFO/],
      [join(blocker, 'x.png'), /--output '.*a-file\/x\.png'/],
    ];
    for (const [output, message] of cases) {
      const c = capture();
      const started = Date.now();
      expect(await main([...base, `--output=${output}`], c.io), output).toBe(1);
      expect(c.err()).toMatch(message);
      expect(c.err()).not.toMatch(/step 1\//); // refused before any denoising step
      expect(Date.now() - started).toBeLessThan(5000);
    }
    expect(lstatSync(fifo).isFIFO()).toBe(true);
    expect(lstatSync(link).isSymbolicLink()).toBe(true);
    expect(readFileSync(blocker, 'utf8')).toBe('keep');
  });

  it('refuses a --device this machine does not have, naming it, instead of a kernel-dispatch error', async () => {
    const c = capture();
    expect(await main([...base, '--device=cuda:99', `--output=${join(tmp, 'nodevice.png')}`], c.io)).toBe(1);
    expect(c.err()).toMatch(/--device=cuda:99: (this libtorch \(.+\) has no CUDA|libtorch .+ no CUDA GPU is visible|there (is 1 CUDA device|are \d+ CUDA devices))/);
    // the one device check, on machines this one is not
    const gpus = (n: number) => ({ cudaCompiled: true, cudaDeviceCount: n, torchVersion: '2.11.0' });
    expect(() => checkDevice('cuda:1', '--device', gpus(1))).toThrow('--device=cuda:1: there is 1 CUDA device (cuda:0)');
    expect(() => checkDevice('cuda:3', '--device', gpus(2))).toThrow('--device=cuda:3: there are 2 CUDA devices (cuda:0…cuda:1)');
    expect(() => checkDevice('cuda', '--device', { cudaCompiled: false, cudaDeviceCount: 0, torchVersion: '1.13.1' })).toThrow(/--device=cuda: this libtorch \(1\.13\.1\) has no CUDA — it is a CPU build/);
    expect(() => checkDevice('cuda', '--device', gpus(0))).toThrow(/--device=cuda: libtorch 2\.11\.0 was built with CUDA, but no CUDA GPU is visible/);
    expect(() => checkDevice('cuda:x', '--device', gpus(1))).toThrow("--device=cuda:x: expected 'cpu', 'cuda' or 'cuda:N'");
    expect(() => checkDevice('cuda:1', '--device', gpus(2))).not.toThrow();
    expect(() => checkDevice('cpu', '--device', gpus(0))).not.toThrow();
  });

  it('--device defaults like train: unset until run time, then CUDA when available, else the CPU', async () => {
    expect(parseGenerateArgs(base.slice(1)).device).toBeUndefined();
    expect(parseGenerateArgs([...base.slice(1), '--device=cpu']).device).toBe('cpu');
    expect((await generateHelp()).replace(/\s+/g, ' ')).toMatch(/default: cuda:0 when CUDA is available, as train; else cpu/);
  });

  it('exits 1 naming the problem for a LoRA of another model, and writes nothing', async () => {
    const foreign = join(tmp, 'foreign.safetensors');
    tidy(() => {
      const { tensors } = loadSafetensors(loraFile);
      const renamed = new Map([...tensors].map(([k, t]) => [k.replace('down_blocks.0', 'down_blocks.7'), t]));
      saveSafetensors(foreign, renamed);
      dispose([...tensors.values()]);
    });
    const c = capture();
    const output = join(tmp, 'never.png');
    expect(await main([...base, `--lora=${foreign}`, `--output=${output}`], c.io)).toBe(1);
    expect(c.err()).toMatch(/down_blocks\.7/);
    expect(existsSync(output)).toBe(false);
  });
});

describe('difflora convert-lora', () => {
  it('rebuilds module paths from Kohya names', () => {
    expect(kohyaToModulePath('down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0')).toBe('down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0');
    expect(kohyaToModulePath('mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj')).toBe('mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj');
    expect(kohyaToModulePath('text_model_encoder_layers_11_self_attn_q_proj')).toBe('text_model.encoder.layers.11.self_attn.q_proj');
    expect(kohyaToModulePath('text_model_encoder_layers_3_mlp_fc1')).toBe('text_model.encoder.layers.3.mlp.fc1');
  });

  it('Kohya → diffusers → Kohya keeps every effective weight, and the pipeline loads the result the same', async () => {
    const toDiffusers = join(tmp, 'k2d.safetensors');
    const back = join(tmp, 'k2d2k.safetensors');
    const c = capture();
    expect(await main(['convert-lora', `--input=${kohyaFile}`, `--output=${toDiffusers}`, '--to=diffusers'], c.io), c.err()).toBe(0);
    expect(c.out()).toMatch(/50 layers, kohya → diffusers/);
    expect(await main(['convert-lora', `--input=${toDiffusers}`, `--output=${back}`, '--to=kohya'], capture().io)).toBe(0);
    const effective = (file: string): Map<string, Tensor> => tidy(() => {
      const { tensors } = loadSafetensors(file);
      const out = new Map<string, Tensor>();
      for (const [k, down] of tensors) {
        const m = /^(.*)\.(lora_down\.weight|lora\.down\.weight)$/.exec(k);
        if (!m) continue;
        const up = tensors.get(`${m[1]}.${m[2] === 'lora_down.weight' ? 'lora_up.weight' : 'lora.up.weight'}`)!;
        const alpha = tensors.get(`${m[1]}.alpha`)?.item() ?? down.shape[0]!;
        const name = m[1]!.startsWith('lora_unet_') ? kohyaToModulePath(m[1]!.slice('lora_unet_'.length)) : m[1]!.replace(/^unet\./, '');
        out.set(name, up.matmul(down).mul(alpha / down.shape[0]!));
      }
      return out;
    });
    const a = effective(kohyaFile);
    const b = effective(toDiffusers);
    const d = effective(back);
    expect([...b.keys()].sort()).toEqual([...a.keys()].sort());
    for (const [k, t] of a) {
      expect(relErr(b.get(k)!, t), k).toBeLessThan(1e-6);
      expect(relErr(d.get(k)!, t), k).toBeLessThan(1e-6);
    }
    dispose([...a.values(), ...b.values(), ...d.values()]);
    // diffusers reads the converted file as it reads the original
    const pipe = StableDiffusionPipeline.fromPretrained(tinySd);
    try {
      const run = async (file: string) => {
        pipe.loadLoraWeights(file);
        try {
          return (await pipe.generate({ prompt: 'x', numInferenceSteps: 1, height: 32, width: 32, seed: 0, outputType: 'tensor' })).tensor!;
        } finally {
          pipe.unloadLoraWeights();
        }
      };
      const x = await run(kohyaFile);
      const y = await run(toDiffusers);
      expect(relErr(y, x)).toBeLessThan(1e-5);
      dispose([x, y]);
    } finally {
      pipe.dispose();
    }
  }, 60_000);

  it('refuses to overwrite, unknown layouts and missing input', async () => {
    const junk = join(tmp, 'junk.safetensors');
    tidy(() => saveSafetensors(junk, { 'model.weight': loadSafetensors(loraFile).tensors.values().next().value! }));
    const cases: [string[], number, RegExp][] = [
      [['convert-lora', `--input=${loraFile}`, `--output=${junk}`, '--to=kohya'], 2, /exists; give --force/],
      [['convert-lora', `--input=${join(tmp, 'none.safetensors')}`, `--output=${join(tmp, 'o.safetensors')}`, '--to=kohya'], 2, /does not exist/],
      [['convert-lora', `--input=${loraFile}`, `--output=${join(tmp, 'o.safetensors')}`, '--to=a1111'], 2, /a1111/],
      [['convert-lora', `--input=${junk}`, `--output=${join(tmp, 'o.safetensors')}`, '--to=kohya'], 1, /model\.weight/],
    ];
    for (const [argv, code, message] of cases) {
      const c = capture();
      expect(await main(argv, c.io), argv.join(' ')).toBe(code);
      expect(c.err()).toMatch(message);
    }
    expect(existsSync(join(tmp, 'o.safetensors'))).toBe(false);
  });
});

describe('difflora generate on an SDXL pipeline (model_index.json _class_name)', () => {
  const tinySdxl = join(fixtures, 'tiny-sdxl');
  const sdxl = ['generate', `--pretrained_model_name_or_path=${tinySdxl}`, '--prompt', 'a photo of a cat!', '--num_inference_steps=2', '--height=64', '--width=64', '--seed=5', '--device=cpu'];

  it('picks StableDiffusionXLPipeline and writes the library\'s image, with an SDXL LoRA and --prompt_2', async () => {
    const { StableDiffusionXLPipeline } = await import('../lib/pipelines/stable_diffusion_xl.js');
    const c = capture();
    const output = join(tmp, 'sdxl.png');
    const lora = join(fixtures, 'goldens', 'sdxl-lora-diffusers-te');
    const code = await main([...sdxl, `--lora=${lora}`, '--prompt_2=an oil painting', `--output=${output}`], c.io);
    expect(code, c.err()).toBe(0);
    expect(c.err()).toMatch(/136 UNet \+ 12 \+ 16 text-encoder layers/);
    const pipe = StableDiffusionXLPipeline.fromPretrained(tinySdxl);
    try {
      pipe.loadLoraWeights(lora, { adapterName: 'lora_0' });
      pipe.setAdapters(['lora_0'], [1]);
      const out = await pipe.generate({ prompt: 'a photo of a cat!', prompt2: 'an oil painting', numInferenceSteps: 2, height: 64, width: 64, seed: 5, crossAttentionKwargs: { scale: 1 } });
      expect(readFileSync(output).equals(out.images![0]!)).toBe(true);
    } finally {
      pipe.dispose();
    }
    const png = await sharp(output).metadata();
    expect([png.width, png.height]).toEqual([64, 64]);
  }, 60_000);

  it('refuses --prompt_2 for SD 1.x (exit 2) and an unknown pipeline class (exit 1), naming them', async () => {
    const c = capture();
    expect(await main([...base, '--prompt_2=x', `--output=${join(tmp, 'p2.png')}`], c.io)).toBe(2);
    expect(c.err()).toMatch(/--prompt_2\/--negative_prompt_2 apply to SDXL pipelines only/);
    const other = join(tmp, 'kandinsky');
    mkdirSync(other, { recursive: true });
    writeFileSync(join(other, 'model_index.json'), JSON.stringify({ _class_name: 'KandinskyV22Pipeline', unet: ['diffusers', 'UNet2DConditionModel'] }));
    const c2 = capture();
    expect(await main(['generate', `--pretrained_model_name_or_path=${other}`, '--prompt', 'x', '--device=cpu', `--output=${join(tmp, 'k.png')}`], c2.io)).toBe(1);
    expect(c2.err()).toMatch(/holds a KandinskyV22Pipeline \(model_index.json _class_name\), which difflora cannot run; supported: StableDiffusionPipeline \(SD 1.x\/2.x\) and StableDiffusionXLPipeline \(SDXL\)/);
  });
});
