// StableDiffusionPipeline against diffusers: the same prompt, latents and scheduler give the same per-step
// latents and image (goldens/inference: base, with the trained LoRA, with LoRA scale 0.5; goldens/kohya).
import { join } from 'node:path';
import sharp from 'sharp';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { StableDiffusionPipeline, type GenerateOptions } from '../lib/pipelines/stable_diffusion.js';
import { dispose, memory, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { fixtures, goldenFile, relErr } from './helpers.js';

const tinySd = join(fixtures, 'tiny-sd');
const loraDir = join(fixtures, 'goldens', 'lora-diffusers');
const kohyaFile = join(fixtures, 'goldens', 'lora-kohya', 'tiny_sd_kohya_lora.safetensors');
const golden = goldenFile('inference.safetensors');
const kohya = goldenFile('kohya.safetensors');
const kwargs = { prompt: 'a pokemon with blue eyes', negativePrompt: '', guidanceScale: 7.5, numInferenceSteps: 4, height: 64, width: 64 };

let pipe: StableDiffusionPipeline;
beforeAll(() => { pipe = StableDiffusionPipeline.fromPretrained(tinySd); });
// every tensor a test makes is freed after it, so the memory test counts only what the pipeline holds
const made: Tensor[] = [];
afterEach(() => { dispose(made.splice(0)); });
afterAll(() => { pipe.dispose(); golden.dispose(); kohya.dispose(); });

/** Runs the golden's generation and returns the image [1, 64, 64, 3] and the latents after every step. */
async function generateLikeGolden(extra: Partial<GenerateOptions> = {}): Promise<{ image: Tensor; steps: Tensor[]; timesteps: number[] }> {
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

/** Asserts ‖ours − ref‖/‖ref‖ < tol and logs it (the figures quoted in notes come from these lines). */
function expectClose(label: string, ours: Tensor, ref: Tensor, tol: number): void {
  const e = relErr(ours, ref);
  console.log(`${label}: relErr ${e.toExponential(2)}`);
  expect(e, label).toBeLessThan(tol);
}

function expectStepsClose(ours: Tensor[], ref: Tensor, tol: number, label = 'per-step latents'): number {
  expect(ours.length).toBe(ref.shape[0]);
  let worst = 0;
  ours.forEach((t, i) => { worst = Math.max(worst, tidy(() => relErr(t, ref.select(0, i)))); });
  console.log(`${label}: worst relErr ${worst.toExponential(2)}`);
  expect(worst, label).toBeLessThan(tol);
  return worst;
}

describe('StableDiffusionPipeline vs diffusers (tiny-sd, PNDM, 4 steps, CFG 7.5, fp32 CPU)', () => {
  it('encodes the prompt and the empty negative prompt as diffusers', () => {
    const { promptEmbeds, negativePromptEmbeds } = pipe.encodePrompt(kwargs.prompt, { negativePrompt: '' });
    expect(relErr(promptEmbeds, golden.get('prompt_embeds'))).toBeLessThan(1e-5);
    expect(relErr(negativePromptEmbeds!, golden.get('negative_prompt_embeds'))).toBeLessThan(1e-5);
    promptEmbeds.dispose();
    negativePromptEmbeds!.dispose();
  });

  it('base model: the timesteps, every step\'s latents and the image match', async () => {
    const { image, steps, timesteps } = await generateLikeGolden();
    expect(timesteps).toEqual([751, 501, 501, 251, 1]);
    expectStepsClose(steps, golden.get('base/step_latents'), 1e-4);
    expectClose('base image', image, golden.get('base/image'), 1e-4);
  });

  it('base model with memory-efficient attention (query chunks in the UNet and VAE): the same steps and image', async () => {
    pipe.enableMemoryEfficientAttention({ maxScoresBytes: 32 * 1024 });
    try {
      const { image, steps } = await generateLikeGolden();
      expectStepsClose(steps, golden.get('base/step_latents'), 1e-4);
      expectClose('base image', image, golden.get('base/image'), 1e-4);
    } finally {
      pipe.enableMemoryEfficientAttention(false);
    }
  });

  it('with the trained LoRA (diffusers file) and at LoRA scale 0.5', async () => {
    const loaded = pipe.loadLoraWeights(loraDir);
    try {
      expect(loaded.unetLayers).toBe(48);
      expect(pipe.getActiveAdapters()).toEqual([loaded.adapterName]);
      const full = await generateLikeGolden();
      expectStepsClose(full.steps, golden.get('lora/step_latents'), 1e-4, 'LoRA per-step latents');
      expectClose('LoRA image', full.image, golden.get('lora/image'), 1e-4);
      const half = await generateLikeGolden({ crossAttentionKwargs: { scale: 0.5 } });
      expectStepsClose(half.steps, golden.get('lora_scale0.5/step_latents'), 1e-4, 'LoRA scale 0.5 per-step latents');
      expectClose('LoRA scale 0.5 image', half.image, golden.get('lora_scale0.5/image'), 1e-4);
      // the run-time scale does not stick
      const again = await generateLikeGolden();
      expect(relErr(again.image, full.image)).toBe(0);
    } finally {
      pipe.unloadLoraWeights();
    }
    const base = await generateLikeGolden();
    expectClose('base image after unload', base.image, golden.get('base/image'), 1e-4);
  });

  it('with a Kohya file (per-layer alpha), unfused and fused', async () => {
    pipe.loadLoraWeights(kohyaFile);
    try {
      const unfused = await generateLikeGolden();
      expectStepsClose(unfused.steps, kohya.get('kohya/step_latents'), 1e-4, 'Kohya per-step latents');
      expectClose('Kohya image', unfused.image, kohya.get('kohya/image'), 1e-4);
      pipe.fuseLora();
      const fused = await generateLikeGolden();
      expectClose('Kohya fused image', fused.image, kohya.get('kohya/image'), 1e-4);
      pipe.unfuseLora();
    } finally {
      pipe.unloadLoraWeights();
    }
  });
});

describe('StableDiffusionPipeline behaviour', () => {
  const quick = { prompt: 'a red square', numInferenceSteps: 2, height: 32, width: 32 };

  it('writes PNG files of the requested size, the same for the same seed', async () => {
    const a = await pipe.generate({ ...quick, seed: 3, numImagesPerPrompt: 2 });
    expect(a.images).toHaveLength(2);
    const meta = await sharp(a.images![0]).metadata();
    expect([meta.format, meta.width, meta.height, meta.channels]).toEqual(['png', 32, 32, 3]);
    const b = await pipe.generate({ ...quick, seed: 3, numImagesPerPrompt: 2 });
    expect(b.images![0]!.equals(a.images![0]!)).toBe(true);
    const c = await pipe.generate({ ...quick, seed: 4 });
    expect(c.images![0]!.equals(a.images![0]!)).toBe(false);
  });

  it('returns tensors and latents, and runs without guidance (one UNet batch)', async () => {
    const t = await pipe.generate({ ...quick, seed: 1, outputType: 'tensor', prompt: ['a', 'b'] });
    expect(t.tensor!.shape).toEqual([2, 3, 32, 32]);
    expect(tidy(() => t.tensor!.min().item())).toBeGreaterThanOrEqual(0);
    expect(tidy(() => t.tensor!.max().item())).toBeLessThanOrEqual(1);
    t.tensor!.dispose();
    const l = await pipe.generate({ ...quick, seed: 1, outputType: 'latent', guidanceScale: 1 });
    expect(l.tensor!.shape).toEqual([1, 4, 16, 16]); // tiny-sd's VAE downsamples by 2
    l.tensor!.dispose();
  });

  it('takes prompt embeddings directly (same image as the prompt)', async () => {
    const { promptEmbeds, negativePromptEmbeds } = pipe.encodePrompt(quick.prompt);
    const a = await pipe.generate({ ...quick, seed: 5, outputType: 'array' });
    const b = await pipe.generate({ ...quick, prompt: undefined, promptEmbeds, negativePromptEmbeds: negativePromptEmbeds!, seed: 5, outputType: 'array' });
    expect(Buffer.from(b.array!.data.buffer).equals(Buffer.from(a.array!.data.buffer))).toBe(true);
    promptEmbeds.dispose();
    negativePromptEmbeds!.dispose();
  });

  it('runs every scheduler', async () => {
    for (const kind of ['ddim', 'ddpm', 'euler', 'euler_a', 'dpmpp_2m'] as const) {
      const p = StableDiffusionPipeline.fromPretrained(tinySd, { scheduler: kind });
      try {
        const out = await p.generate({ ...quick, seed: 0, outputType: 'array' });
        expect(out.timesteps).toHaveLength(2);
        expect(out.array!.data.every(Number.isFinite)).toBe(true);
      } finally {
        p.dispose();
      }
    }
  });

  it('stops between steps when aborted, reports progress, and leaves no tensor behind', async () => {
    await pipe.generate({ ...quick, seed: 0 }); // warm caches
    const before = memory().numTensors;
    const controller = new AbortController();
    const seen: number[] = [];
    await expect(pipe.generate({
      ...quick, numInferenceSteps: 10, seed: 0, signal: controller.signal,
      callbackOnStepEnd: ({ step }) => { seen.push(step); if (step === 2) controller.abort(); },
    })).rejects.toMatchObject({ name: 'AbortError' });
    expect(seen).toEqual([0, 1, 2]);
    for (let i = 0; i < 3; i++) await pipe.generate({ ...quick, seed: i });
    expect(memory().numTensors).toBe(before);
  });

  it('refuses bad input with a message naming it, and stays usable', async () => {
    await expect(pipe.generate({ ...quick, height: 36 })).rejects.toThrow(/multiples of 8/);
    await expect(pipe.generate({ ...quick, numInferenceSteps: 0 })).rejects.toThrow(/numInferenceSteps/);
    const wrong = torch.zeros([1, 4, 8, 8]);
    made.push(wrong);
    await expect(pipe.generate({ ...quick, latents: wrong })).rejects.toThrow(/latents have shape \[1,4,8,8\], expected \[1,4,16,16\]/);
    await expect(pipe.generate({ ...quick, prompt: ['a', 'b'], negativePrompt: ['x', 'y', 'z'] })).rejects.toThrow(/3 negative prompt/);
    await expect(pipe.generate({ numInferenceSteps: 1 })).rejects.toThrow(/prompt/);
    expect(() => StableDiffusionPipeline.fromPretrained(join(fixtures, 'nowhere'))).toThrow(/nowhere/);
    expect(() => StableDiffusionPipeline.fromPretrained(tinySd, { dtype: 'float16' })).toThrow(/float16 needs a CUDA device/);
    const ok = await pipe.generate({ ...quick, seed: 0 });
    expect(ok.images).toHaveLength(1);
  });

  it('generates in bfloat16 on CPU close to float32', async () => {
    const p = StableDiffusionPipeline.fromPretrained(tinySd, { dtype: 'bfloat16' });
    try {
      const low = await p.generate({ ...kwargs, latents: golden.get('latents'), outputType: 'tensor' });
      const ref = await pipe.generate({ ...kwargs, latents: golden.get('latents'), outputType: 'tensor' });
      expect(relErr(low.tensor!, ref.tensor!)).toBeLessThan(5e-2);
      low.tensor!.dispose();
      ref.tensor!.dispose();
    } finally {
      p.dispose();
    }
  });
});
