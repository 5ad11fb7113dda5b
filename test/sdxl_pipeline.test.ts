// StableDiffusionXLPipeline against diffusers 0.31 on tiny-sdxl: encode_prompt (goldens/sdxl_text), _get_add_time_ids
// (goldens/sdxl_unet), and full generations (goldens/sdxl_inference: Euler 4 steps, CFG 5, given latents) — base,
// negative None, with the trained UNet LoRA at scale 1 and 0.5, with the UNet + both text encoders LoRA, and with
// a Kohya SDXL file (goldens/sdxl_kohya) — per-step latents and images; bad inputs.
import { mkdirSync, mkdtempSync, copyFileSync, rmSync, writeFileSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { loraLayers } from '../lib/lora/attach.js';
import type { Module } from '../lib/nn/module.js';
import { StableDiffusionPipeline } from '../lib/pipelines/stable_diffusion.js';
import { StableDiffusionXLPipeline, type StableDiffusionXLGenerateOptions } from '../lib/pipelines/stable_diffusion_xl.js';
import { dispose, memory, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { fixtures, goldenEqual, goldenFile, relErr, sameLibtorchAsGoldens } from './helpers.js';

const tinySdxl = join(fixtures, 'tiny-sdxl');
const goldens = join(fixtures, 'goldens');
const text = goldenFile('sdxl_text.safetensors');
const unetGolden = goldenFile('sdxl_unet.safetensors');
const golden = goldenFile('sdxl_inference.safetensors');
const kohya = goldenFile('sdxl_kohya.safetensors');
const prompts = ['a photo of a cat!', 'Wow!! A Pokémon — café naïve 日本語 🐱'];
const negatives = ['blurry, low quality', ''];
const kwargs = { prompt: prompts, negativePrompt: negatives, guidanceScale: 5, numInferenceSteps: 4, height: 64, width: 64 };
const TOL = 1e-4;

let pipe: StableDiffusionXLPipeline;
beforeAll(() => { pipe = StableDiffusionXLPipeline.fromPretrained(tinySdxl); });
const made: Tensor[] = [];
afterEach(() => { dispose(made.splice(0)); });
afterAll(() => {
  pipe.dispose();
  for (const g of [text, unetGolden, golden, kohya]) g.dispose();
});

function expectClose(label: string, ours: Tensor, ref: Tensor, tol: number): number {
  const e = relErr(ours, ref);
  console.log(`${label}: relErr ${e.toExponential(2)}`);
  expect(e, label).toBeLessThan(tol);
  return e;
}

/** Runs the golden's generation: the image [2, 64, 64, 3] and the latents after every step. */
async function generateLikeGolden(extra: Partial<StableDiffusionXLGenerateOptions> = {}): Promise<{ image: Tensor; steps: Tensor[]; timesteps: number[] }> {
  const steps: Tensor[] = [];
  const out = await pipe.generate({
    ...kwargs, latents: golden.get('latents'), outputType: 'array', ...extra,
    callbackOnStepEnd: ({ latents }) => { steps.push(latents.clone()); },
  });
  const { data, shape } = out.array!;
  const image = torch.tensor(data, { shape });
  made.push(image, ...steps);
  return { image, steps, timesteps: out.timesteps };
}

function expectSteps(label: string, ours: Tensor[], ref: Tensor, tol = TOL): void {
  expect(ours.length).toBe(ref.shape[0]);
  let worst = 0;
  ours.forEach((t, i) => { worst = Math.max(worst, tidy(() => relErr(t, ref.select(0, i)))); });
  console.log(`${label} per-step latents: worst relErr ${worst.toExponential(2)}`);
  expect(worst, label).toBeLessThan(tol);
}

async function expectGeneration(label: string, variant: string, extra: Partial<StableDiffusionXLGenerateOptions> = {}, ref = golden): Promise<void> {
  const { image, steps, timesteps } = await generateLikeGolden(extra);
  expect(timesteps).toEqual([751, 501, 251, 1]);
  expectSteps(label, steps, ref.get(`${variant}/step_latents`));
  expectClose(`${label} image`, image, ref.get(`${variant}/image`), TOL);
}

describe('StableDiffusionXLPipeline.encodePrompt vs diffusers (tiny-sdxl)', () => {
  it('prompts and negatives: both encoders\' penultimate states concatenated, pooled text_embeds of encoder 2', () => {
    tidy(() => {
      const e = pipe.encodePrompt(prompts, { negativePrompt: negatives });
      expectClose('prompt_embeds', e.promptEmbeds, text.get('cfg_neg/prompt_embeds'), 1e-5);
      expectClose('negative_prompt_embeds', e.negativePromptEmbeds!, text.get('cfg_neg/negative_prompt_embeds'), 1e-5);
      expectClose('pooled_prompt_embeds', e.pooledPromptEmbeds, text.get('cfg_neg/pooled_prompt_embeds'), 1e-5);
      expectClose('negative_pooled_prompt_embeds', e.negativePooledPromptEmbeds!, text.get('cfg_neg/negative_pooled_prompt_embeds'), 1e-5);
    });
  });

  it('negative "" is encoded; no negative gives zeros (force_zeros_for_empty_prompt); prompt2; clipSkip 1', () => {
    tidy(() => {
      expect(pipe.forceZerosForEmptyPrompt).toBe(true);
      const empty = pipe.encodePrompt(prompts, { negativePrompt: ['', ''] });
      expectClose('negative "" embeds', empty.negativePromptEmbeds!, text.get('cfg_negEmpty/negative_prompt_embeds'), 1e-5);
      expectClose('negative "" pooled', empty.negativePooledPromptEmbeds!, text.get('cfg_negEmpty/negative_pooled_prompt_embeds'), 1e-5);
      const none = pipe.encodePrompt(prompts);
      expect(none.negativePromptEmbeds!.abs().sum().item()).toBe(0);
      expect(none.negativePooledPromptEmbeds!.abs().sum().item()).toBe(0);
      expect(none.negativePromptEmbeds!.shape).toEqual([2, 77, 20]);
      const p2 = pipe.encodePrompt(prompts, { prompt2: ['an oil painting', 'a watercolor of a dog'], doClassifierFreeGuidance: false });
      expect(p2.negativePromptEmbeds).toBeNull();
      expectClose('prompt_2 embeds', p2.promptEmbeds, text.get('prompt_2/prompt_embeds'), 1e-5);
      expectClose('prompt_2 pooled', p2.pooledPromptEmbeds, text.get('prompt_2/pooled_prompt_embeds'), 1e-5);
      const skip = pipe.encodePrompt(prompts, { clipSkip: 1, negativePrompt: negatives });
      expectClose('clip_skip 1 embeds', skip.promptEmbeds, text.get('clip_skip1/prompt_embeds'), 1e-5);
      expect(goldenEqual(skip.pooledPromptEmbeds, text.get('cfg_neg/pooled_prompt_embeds')), 'clip_skip 1 pooled = the pooled without').toBe(true);
    });
  });

  it('numImagesPerPrompt repeats each prompt in place ([p0, p0, p1, p1])', () => {
    tidy(() => {
      const e = pipe.encodePrompt(prompts, { negativePrompt: negatives, numImagesPerPrompt: 2 });
      expect(e.promptEmbeds.shape).toEqual([4, 77, 20]);
      expect(e.pooledPromptEmbeds.shape).toEqual([4, 16]);
      const ref = text.get('cfg_neg/pooled_prompt_embeds');
      for (const [row, src] of [[0, 0], [1, 0], [2, 1], [3, 1]] as const) expect(goldenEqual(e.pooledPromptEmbeds.select(0, row), ref.select(0, src)), `row ${row}`).toBe(true);
    });
  });

  it('_get_add_time_ids: (h, w, top, left, h, w) and the add_embedding width check', () => {
    tidy(() => {
      expect(relErr(pipe.getAddTimeIds([64, 64], [0, 0], [64, 64]), unetGolden.get('add_time_ids/default_64'))).toBe(0);
      expect(relErr(pipe.getAddTimeIds([96, 80], [8, 0], [64, 64]), unetGolden.get('add_time_ids/a'))).toBe(0);
      expect(relErr(pipe.getAddTimeIds([64, 128], [0, 32], [64, 64]), unetGolden.get('add_time_ids/b'))).toBe(0);
      expect(() => pipe.getAddTimeIds([64, 64], [0, 0], [64, 64], { textEncoderProjectionDim: 12 }))
        .toThrow(/expects an added time embedding vector of length 64, but a vector of 60 was created/);
    });
  });
});

describe('StableDiffusionXLPipeline vs diffusers (tiny-sdxl, Euler leading, 4 steps, CFG 5, fp32 CPU)', () => {
  it('base: timesteps, every step\'s latents and the images', async () => {
    await expectGeneration('base', 'base');
  });

  it('negative prompt None: zero negative conditioning', async () => {
    const { steps } = await generateLikeGolden({ negativePrompt: undefined });
    expectSteps('base_negNone', steps, golden.get('base_negNone/step_latents'));
  });

  it('the same with the tensors given directly (promptEmbeds + pooled), and a PNG of the requested size', async () => {
    const e = pipe.encodePrompt(prompts, { negativePrompt: negatives });
    made.push(e.promptEmbeds, e.negativePromptEmbeds!, e.pooledPromptEmbeds, e.negativePooledPromptEmbeds!);
    const { promptEmbeds, negativePromptEmbeds, pooledPromptEmbeds, negativePooledPromptEmbeds } = e;
    const { steps } = await generateLikeGolden({
      prompt: undefined, negativePrompt: undefined, promptEmbeds, negativePromptEmbeds: negativePromptEmbeds!, pooledPromptEmbeds, negativePooledPromptEmbeds: negativePooledPromptEmbeds!,
    });
    expectSteps('base from embeds', steps, golden.get('base/step_latents'));
    await expect(pipe.generate({ prompt: 'x', promptEmbeds })).rejects.toThrow(/give `prompt` or `promptEmbeds`, not both/);
    await expect(pipe.generate({ promptEmbeds })).rejects.toThrow(/give `pooledPromptEmbeds` too/);
    const png = await pipe.generate({ prompt: 'a cat', numInferenceSteps: 2, height: 48, width: 32, seed: 1 });
    expect(png.images).toHaveLength(1);
    expect(png.images![0]!.subarray(1, 4).toString()).toBe('PNG');
    expect(png.images![0]!.readUInt32BE(16)).toBe(32);
    expect(png.images![0]!.readUInt32BE(20)).toBe(48);
  });

  it('with the UNet LoRA (diffusers file), at scale 1 and 0.5', async () => {
    const r = pipe.loadLoraWeights(join(goldens, 'sdxl-lora-diffusers'));
    try {
      expect(r).toEqual({ adapterName: 'default_0', unetLayers: 136, textEncoderLayers: 0, textEncoder2Layers: 0, formats: ['diffusers'] });
      await expectGeneration('lora', 'lora');
      await expectGeneration('lora scale 0.5', 'lora_scale0.5', { crossAttentionKwargs: { scale: 0.5 } });
    } finally {
      pipe.unloadLoraWeights();
    }
  });

  it('with the UNet + both text encoders LoRA: encodings at scale 1 and 0.5, generations', async () => {
    const r = pipe.loadLoraWeights(join(goldens, 'sdxl-lora-diffusers-te'));
    try {
      expect(r).toMatchObject({ unetLayers: 136, textEncoderLayers: 12, textEncoder2Layers: 16 });
      expect(pipe.getListAdapters()).toEqual({ unet: ['default_0'], text_encoder: ['default_0'], text_encoder_2: ['default_0'] });
      tidy(() => {
        for (const scale of [1, 0.5]) {
          const e = pipe.encodePrompt(prompts, { negativePrompt: negatives, loraScale: scale });
          expectClose(`te lora encode ${scale}`, e.promptEmbeds, golden.get(`lora_te_encode_scale${scale.toFixed(1)}/prompt_embeds`), 1e-5);
          expectClose(`te lora pooled ${scale}`, e.pooledPromptEmbeds, golden.get(`lora_te_encode_scale${scale.toFixed(1)}/pooled_prompt_embeds`), 1e-5);
        }
      });
      await expectGeneration('lora_te', 'lora_te');
      await expectGeneration('lora_te scale 0.5', 'lora_te_scale0.5', { crossAttentionKwargs: { scale: 0.5 } });
      // disable / enable, fuse / unfuse give the same numbers back
      pipe.disableLora();
      await expectGeneration('lora_te disabled = base', 'base');
      pipe.enableLora();
      pipe.fuseLora();
      await expectGeneration('lora_te fused', 'lora_te');
      pipe.unfuseLora();
      await expectGeneration('lora_te unfused', 'lora_te');
    } finally {
      pipe.unloadLoraWeights();
    }
  });

  it('with a Kohya SDXL file (SGM UNet names, lora_te1_/lora_te2_, per-layer alphas): merged weights and generation', async () => {
    const meta = JSON.parse(readFileSync(join(goldens, 'sdxl_kohya.json'), 'utf8')) as { merged_weight_modules: Record<string, string>; num_lora_modules: Record<string, number> };
    const r = pipe.loadLoraWeights(join(goldens, 'sdxl-lora-kohya', 'tiny_sdxl_kohya_lora.safetensors'));
    try {
      expect(r).toMatchObject({ unetLayers: meta.num_lora_modules.unet, textEncoderLayers: meta.num_lora_modules.text_encoder, textEncoder2Layers: meta.num_lora_modules.text_encoder_2, formats: ['kohya'] });
      await expectGeneration('kohya', 'kohya', {}, kohya);
      pipe.fuseLora();
      const models: Record<string, Module> = { unet: pipe.unet, text_encoder: pipe.textEncoder, text_encoder_2: pipe.textEncoder2 };
      for (const [name, target] of Object.entries(meta.merged_weight_modules)) {
        const [part, ...rest] = target.split('.');
        const layer = loraLayers(models[part!]!).find(([p]) => p === rest.join('.'))?.[1];
        expect(layer, target).toBeDefined();
        expectClose(`merged ${name}`, (layer!.base_layer as unknown as { weight: Tensor }).weight, kohya.get(`merged_weight/${name}`), 1e-6);
      }
      await expectGeneration('kohya fused', 'kohya', {}, kohya);
      pipe.unfuseLora();
    } finally {
      pipe.unloadLoraWeights();
    }
  });

  it('a float16 VAE with force_upcast decodes in float32 (as diffusers\' upcast_vae) and is float16 again afterwards', async () => {
    const p = StableDiffusionXLPipeline.fromPretrained(tinySdxl);
    try {
      p.vae.to({ dtype: 'float16' });
      expect(p.vae.forceUpcast).toBe(true);
      // libtorch 1.13's CPU has no float16 convolutions (2.x's has): there, this decode works only upcast
      if (sameLibtorchAsGoldens) expect(() => tidy(() => p.vae.decode(torch.zeros([1, 4, 16, 16], { dtype: 'float16' })))).toThrow();
      const out = await p.generate({ ...kwargs, latents: golden.get('latents'), outputType: 'array' });
      expect(p.vae.decoder.conv_in.weight.dtype).toBe('float16');
      const image = torch.tensor(out.array!.data, { shape: out.array!.shape });
      made.push(image);
      expectClose('fp16 VAE (upcast) image vs fp32', image, golden.get('base/image'), 5e-3);
    } finally {
      p.dispose();
    }
  });

  it('generates in bfloat16 on CPU close to float32', async () => {
    const p = StableDiffusionXLPipeline.fromPretrained(tinySdxl, { dtype: 'bfloat16' });
    try {
      const out = await p.generate({ ...kwargs, latents: golden.get('latents'), outputType: 'tensor' });
      made.push(out.tensor!);
      // 7.5e-3 here; 2.8e-2 while libtorch's CPU group_norm got the VAE decoder's bf16 channels-last tensors as they were
      tidy(() => expectClose('bf16 image vs fp32', out.tensor!.permute(0, 2, 3, 1), golden.get('base/image'), 1.5e-2));
    } finally {
      p.dispose();
    }
  });

  it('leaves no tensor behind after a generation', async () => {
    await generateLikeGolden();
    dispose(made.splice(0));
    const before = memory().numTensors;
    await pipe.generate({ ...kwargs, latents: golden.get('latents'), outputType: 'png' });
    expect(memory().numTensors).toBe(before);
  });
});

describe('StableDiffusionXLPipeline bad input', () => {
  let tmp: string;
  beforeAll(() => { tmp = mkdtempSync(join(tmpdir(), 'difflora-sdxl-')); });
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  /** A copy of tiny-sdxl's model_index.json (changed by `edit`) with the named component folders, empty. */
  function folder(name: string, parts: string[], edit: (index: Record<string, unknown>) => void = () => {}): string {
    const dir = join(tmp, name);
    mkdirSync(dir, { recursive: true });
    const index = JSON.parse(readFileSync(join(tinySdxl, 'model_index.json'), 'utf8')) as Record<string, unknown>;
    edit(index);
    writeFileSync(join(dir, 'model_index.json'), JSON.stringify(index));
    for (const p of parts) mkdirSync(join(dir, p), { recursive: true });
    return dir;
  }

  it('an SDXL folder without text_encoder_2 (folder missing, or not in model_index.json) names it', () => {
    const all = ['text_encoder', 'tokenizer', 'tokenizer_2', 'unet', 'vae', 'scheduler'];
    const noFolder = folder('no-te2-folder', all);
    expect(() => StableDiffusionXLPipeline.fromPretrained(noFolder)).toThrow(/has no text_encoder_2: the folder '.*text_encoder_2' is missing/);
    const noEntry = folder('no-te2-entry', [...all, 'text_encoder_2'], (i) => { delete i.text_encoder_2; });
    expect(() => StableDiffusionXLPipeline.fromPretrained(noEntry)).toThrow(/has no text_encoder_2: model_index.json does not list it/);
  });

  it('an SD 1.x folder, and an SDXL folder given to StableDiffusionPipeline, name the pipeline to use', () => {
    expect(() => StableDiffusionXLPipeline.fromPretrained(join(fixtures, 'tiny-sd'))).toThrow(/holds a StableDiffusionPipeline, not an SDXL pipeline \(load it with StableDiffusionPipeline\)/);
    expect(() => StableDiffusionPipeline.fromPretrained(tinySdxl)).toThrow(/holds a StableDiffusionXLPipeline.*load it with StableDiffusionXLPipeline/);
  });

  it('a UNet config with an unsupported addition_embed_type names the field', () => {
    const dir = folder('bad-unet', []);
    for (const p of ['text_encoder', 'text_encoder_2', 'tokenizer', 'tokenizer_2', 'vae', 'scheduler']) {
      mkdirSync(join(dir, p), { recursive: true });
      for (const f of ['config.json', 'model.safetensors', 'vocab.json', 'merges.txt', 'tokenizer_config.json', 'special_tokens_map.json', 'scheduler_config.json', 'diffusion_pytorch_model.safetensors']) {
        try { copyFileSync(join(tinySdxl, p, f), join(dir, p, f)); } catch { /* not in this component */ }
      }
    }
    mkdirSync(join(dir, 'unet'), { recursive: true });
    const config = JSON.parse(readFileSync(join(tinySdxl, 'unet', 'config.json'), 'utf8')) as Record<string, unknown>;
    writeFileSync(join(dir, 'unet', 'config.json'), JSON.stringify({ ...config, addition_embed_type: 'image_hint' }));
    copyFileSync(join(tinySdxl, 'unet', 'diffusion_pytorch_model.safetensors'), join(dir, 'unet', 'diffusion_pytorch_model.safetensors'));
    expect(() => StableDiffusionXLPipeline.fromPretrained(dir)).toThrow(/UNet2DConditionModel config '.*config.json': 'addition_embed_type' "image_hint" is not supported \(supported: text_time\)/);
  });

  it('an SD 1.x LoRA file: refused, naming the keys, and the pipeline is unchanged', () => {
    const before = pipe.unet.stateDict().size;
    expect(() => pipe.loadLoraWeights(join(goldens, 'lora-diffusers'))).toThrow(/loadLoraWeights \(.*pytorch_lora_weights.safetensors\): .*key\(s\) match no Linear\/Conv2d layer of the UNet or the text encoder or the second text encoder \(SDXL\) — a LoRA for another architecture \(SD 1.x\/2.x and SDXL LoRAs do not fit each other's models\)/s);
    expect(pipe.getListAdapters()).toEqual({ unet: [], text_encoder: [], text_encoder_2: [] });
    expect(pipe.unet.stateDict().size).toBe(before);
  });
});
