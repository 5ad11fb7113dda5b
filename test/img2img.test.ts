// StableDiffusionImg2ImgPipeline against diffusers 0.31 (goldens/img2img: tiny-sd, the 64×64 init picture, strength
// 0.6 and 0.3, PNDM and Euler, 10 steps, CFG 7.5, torch.Generator().manual_seed(1234) fresh per run), and its
// bad input.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { main } from '../lib/cli/main.js';
import { AutoPipelineForImage2Image, AutoPipelineForText2Image, DiffusionPipeline } from '../lib/index.js';
import { StableDiffusionXLPipeline } from '../lib/pipelines/stable_diffusion_xl.js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { img2imgTimesteps, StableDiffusionImg2ImgPipeline } from '../lib/pipelines/stable_diffusion_img2img.js';
import { StableDiffusionPipeline } from '../lib/pipelines/stable_diffusion.js';
import { dispose, memory, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { fixtures, goldenFile, relErr } from './helpers.js';

const tinySd = join(fixtures, 'tiny-sd');
const initPng = join(fixtures, 'goldens', 'img2img_init.png');
const golden = goldenFile('img2img.safetensors');
const meta = JSON.parse(readFileSync(join(fixtures, 'goldens', 'img2img.json'), 'utf8')) as { runs: Record<string, { timesteps_used: number[] }> };
const base = { prompt: 'a pokemon with blue eyes', negativePrompt: '', guidanceScale: 7.5, numInferenceSteps: 10, seed: 1234 };

const pipes: Record<string, StableDiffusionImg2ImgPipeline> = {};
beforeAll(() => {
  pipes.pndm = StableDiffusionImg2ImgPipeline.fromPretrained(tinySd);
  pipes.euler = StableDiffusionImg2ImgPipeline.fromPretrained(tinySd, { scheduler: 'euler' });
});
afterAll(() => {
  for (const p of Object.values(pipes)) p.dispose();
  golden.dispose();
});

async function run(pipe: StableDiffusionImg2ImgPipeline, strength: number, image: string | Buffer | Tensor = initPng) {
  const steps: Tensor[] = [];
  const out = await pipe.generate({ ...base, image, strength, outputType: 'array', callbackOnStepEnd: ({ latents }) => { steps.push(latents.clone()); } });
  const { data, shape } = out.array!;
  return { image: torch.tensor(data, { shape }), steps, timesteps: out.timesteps };
}

describe('StableDiffusionImg2ImgPipeline', () => {
  it("keeps diffusers' get_timesteps tail of the schedule", () => {
    const pndm = [901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1];
    expect(img2imgTimesteps(pndm, 10, 0.6, 1)).toEqual({ timesteps: [601, 501, 401, 301, 201, 101, 1], start: 4 });
    expect(img2imgTimesteps(pndm, 10, 0.3, 1).timesteps).toEqual([301, 201, 101, 1]); // int(10 · 0.3) = 3
    expect(img2imgTimesteps([3, 2, 1], 3, 1, 1).start).toBe(0);
    expect(img2imgTimesteps([3, 2, 1], 3, 0, 1).timesteps).toEqual([]);
  });

  for (const sched of ['pndm', 'euler']) {
    for (const strength of [0.6, 0.3]) {
      it(`${sched}, strength ${strength}: the timesteps, every step's latents and the image of diffusers`, async () => {
        const key = `${sched}/strength${strength}`;
        const r = await run(pipes[sched]!, strength);
        expect(r.timesteps).toEqual(meta.runs[key]!.timesteps_used);
        const gold = golden.get(`${key}/step_latents`);
        expect(r.steps.length).toBe(gold.shape[0]);
        r.steps.forEach((s, i) => expect(relErr(s, gold.select(0, i)), `step ${i}`).toBeLessThan(1e-5));
        expect(relErr(r.image, golden.get(`${key}/image`))).toBeLessThan(1e-4);
        dispose([r.image, ...r.steps]);
      });
    }
  }

  it('leaves no tensor behind, whatever the strength', async () => {
    const counts: number[] = [];
    for (const strength of [0.6, 0.3, 0.6, 1]) {
      const before = memory().numTensors;
      await pipes.euler!.generate({ ...base, image: initPng, strength, outputType: 'array' });
      counts.push(memory().numTensors - before);
    }
    expect(Math.max(...counts)).toBeLessThanOrEqual(0); // (a finalizer may free an earlier test's tensor meanwhile)
  });

  it('takes the picture as bytes or as an NCHW tensor in [0, 1], with the same result as the file', async () => {
    const fromFile = await run(pipes.euler!, 0.6);
    const fromBytes = await run(pipes.euler!, 0.6, readFileSync(initPng));
    const pixels = tidy(() => golden.get('init_image_uint8').to({ dtype: 'float32' }).div(255).permute(2, 0, 1).unsqueeze(0).contiguous());
    const fromTensor = await run(pipes.euler!, 0.6, pixels);
    expect(relErr(fromBytes.image, fromFile.image)).toBe(0);
    expect(relErr(fromTensor.image, fromFile.image)).toBeLessThan(1e-6);
    dispose([pixels, fromFile.image, fromBytes.image, fromTensor.image, ...fromFile.steps, ...fromBytes.steps, ...fromTensor.steps]);
  });

  it('refuses bad input with what is wrong', async () => {
    const p = pipes.pndm!;
    await expect(p.generate({ ...base })).rejects.toThrow('StableDiffusionImg2ImgPipeline: give `image`');
    await expect(p.generate({ ...base, image: initPng, strength: 1.5 })).rejects.toThrow('strength must be in [0, 1], got 1.5');
    // PNDM lists 11 timesteps for 10 steps, so strength 0.05 still runs its last one, as diffusers; Euler's 10 leave none
    await expect(pipes.euler!.generate({ ...base, image: initPng, strength: 0.05 })).rejects.toThrow('strength 0.05 with 10 steps leaves no denoising step');
    await expect(p.generate({ ...base, image: join(fixtures, 'nope.png') })).rejects.toThrow(/image not found: .*nope\.png/);
    await expect(p.generate({ ...base, image: Buffer.from('not an image') })).rejects.toThrow('cannot decode the image bytes');
    const wrong = torch.zeros([1, 4, 64, 64]);
    await expect(p.generate({ ...base, image: wrong })).rejects.toThrow('an image tensor must be [B, 3, H, W] in [0, 1], got [1,4,64,64]');
    wrong.dispose();
  });

  it('shares the models of a text-to-image pipeline (fromPipe)', async () => {
    const t2i = StableDiffusionPipeline.fromPretrained(tinySd, { scheduler: 'euler' });
    const i2i = StableDiffusionImg2ImgPipeline.fromPipe(t2i);
    expect(i2i.unet).toBe(t2i.unet);
    const r = await run(i2i, 0.3);
    expect(relErr(r.image, golden.get('euler/strength0.3/image'))).toBeLessThan(1e-4);
    dispose([r.image, ...r.steps]);
    t2i.dispose();
  });
});

function capture() {
  let out = '';
  let err = '';
  return { io: { stdout: { write: (x: string) => { out += x; } }, stderr: { write: (x: string) => { err += x; } }, env: {} }, out: () => out, err: () => err };
}

describe('difflora generate --init_image', () => {
  const tmp = mkdtempSync(join(tmpdir(), 'difflora-img2img-'));
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));
  const cli = ['generate', `--pretrained_model_name_or_path=${tinySd}`, '--prompt', base.prompt, '--num_inference_steps=10', '--seed=1234', '--scheduler=euler'];

  it('writes the PNG the library makes from the same picture and strength', async () => {
    const c = capture();
    const file = join(tmp, 'out.png');
    expect(await main([...cli, `--init_image=${initPng}`, '--strength=0.6', `--output=${file}`], c.io), c.err()).toBe(0);
    const lib = await pipes.euler!.generate({ prompt: base.prompt, numInferenceSteps: 10, seed: 1234, image: initPng, strength: 0.6 });
    expect(readFileSync(file).equals(lib.images![0]!)).toBe(true);
  });

  it('refuses flags that do not fit image to image, all at once (exit 2)', async () => {
    const c = capture();
    expect(await main([...cli, '--init_image=/nonexistent.png', '--strength=2', '--height=64'], c.io)).toBe(2);
    expect(c.err()).toMatch(/--init_image: '\/nonexistent.png' does not exist/);
    expect(c.err()).toMatch(/--strength must be a number from 0 to 1, got 2/);
    expect(c.err()).toMatch(/--height\/--width: with --init_image the size is the picture's/);
    const c2 = capture();
    expect(await main([...cli, '--strength=0.5'], c2.io)).toBe(2);
    expect(c2.err()).toMatch(/--strength applies with --init_image only/);
    const c3 = capture();
    expect(await main(['generate', `--pretrained_model_name_or_path=${join(fixtures, 'tiny-sdxl')}`, '--prompt', 'x', `--init_image=${initPng}`, `--output=${join(tmp, 'x.png')}`], c3.io)).toBe(2);
    expect(c3.err()).toMatch(/SDXL image to image .* is not in difflora yet/);
  });
});

describe('AutoPipelineForText2Image / AutoPipelineForImage2Image / DiffusionPipeline', () => {
  it("pick SD or SDXL from model_index.json, as the guide's snippet", async () => {
    const sd = AutoPipelineForText2Image.fromPretrained(tinySd, { dtype: 'float32' });
    const sdxl = AutoPipelineForText2Image.fromPretrained(join(fixtures, 'tiny-sdxl'));
    expect(sd).toBeInstanceOf(StableDiffusionPipeline);
    expect(sd).not.toBeInstanceOf(StableDiffusionImg2ImgPipeline);
    expect(sdxl).toBeInstanceOf(StableDiffusionXLPipeline);
    const out = await sd.generate({ prompt: 'a pokemon with blue eyes', numInferenceSteps: 2, height: 64, width: 64, seed: 0 });
    expect(out.images![0]!.subarray(1, 4).toString()).toBe('PNG');
    const i2i = AutoPipelineForImage2Image.fromPretrained(tinySd);
    expect(i2i).toBeInstanceOf(StableDiffusionImg2ImgPipeline);
    expect(() => AutoPipelineForImage2Image.fromPretrained(join(fixtures, 'tiny-sdxl'))).toThrow(/SDXL image-to-image .* is not in difflora yet/);
    const dp = DiffusionPipeline.fromPretrained(join(fixtures, 'tiny-sdxl'));
    expect(dp).toBeInstanceOf(StableDiffusionXLPipeline);
    expect(() => AutoPipelineForText2Image.fromPretrained(tinySd, { torch_dtype: 'float16' } as never)).toThrow("AutoPipelineForText2Image.fromPretrained: unknown option 'torch_dtype' (did you mean 'dtype'?)");
    for (const p of [sd, sdxl, i2i, dp]) p.dispose();
  });
});
