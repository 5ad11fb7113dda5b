// The training step of train_text_to_image_lora.py against goldens/lora_train (tiny-sd UNet + PEFT LoRA):
// per variant the loss, every LoRA gradient, the grad norm, the clipped gradients and the parameters after
// clip(1e-3) + AdamW; then accumulation, mixed precision, the GradScaler's skipped step, memory, and the
// sampling helpers.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { noGrad } from '../lib/autograd.js';
import { attachLora, type LoraHandle } from '../lib/lora/attach.js';
import { AutoencoderKL } from '../lib/models/autoencoder_kl.js';
import { UNet2DConditionModel } from '../lib/models/unet_2d_condition.js';
import { AdamW } from '../lib/optim/adamw.js';
import { GradScaler } from '../lib/optim/grad_scaler.js';
import { Generator } from '../lib/random.js';
import { DDPMScheduler } from '../lib/schedulers/scheduling_ddpm.js';
import { dispose, memory, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import {
  Accumulator, encodeLatents, loraTrainingStep, sampleNoise, sampleTimesteps, type TrainingStep,
} from '../lib/training/step.js';
import { bitEqual, fixtures, relErr, goldenFile } from './helpers.js';

const TOL = 1e-4;
const tinySd = join(fixtures, 'tiny-sd');
const goldens = join(fixtures, 'goldens');
interface Variant { loss: number; grad_norm_preclip: number; prediction_type: string; snr_gamma: number | null }
const meta = JSON.parse(readFileSync(join(goldens, 'lora_train.json'), 'utf8')) as { variants: Record<string, Variant> };
const VARIANTS = ['eps_mse', 'eps_snr5', 'vpred_mse', 'vpred_snr5'] as const;
const variant = (name: string): Variant => {
  const v = meta.variants[name];
  if (!v) throw new Error(`variant '${name}' missing`);
  return v;
};

const golden = goldenFile('lora_train.safetensors');
let scheduler: DDPMScheduler;
let unet: UNet2DConditionModel;
let h: LoraHandle;
const g = (name: string): Tensor => golden.get(name);

/** LoRA back to lora_init, no gradients. */
function resetLora(): void {
  noGrad(() => { for (const [n, p] of h.namedParameters()) p.copy_(g(`lora_init/${n}`)); });
  unet.zeroGrad();
  for (const p of h.parameters()) p.grad = null;
}

const adamw = (): AdamW => new AdamW(h.parameters(), { lr: 1e-4, betas: [0.9, 0.999], weightDecay: 1e-2, eps: 1e-8 });

function stepFor(name: string, over: Partial<TrainingStep> = {}): TrainingStep {
  const v = variant(name);
  return {
    unet, scheduler,
    batch: { latents: g('inputs/latents'), encoderHiddenStates: g('inputs/encoder_hidden_states') },
    noise: g('inputs/noise'), timesteps: g('inputs/timesteps'),
    predictionType: v.prediction_type, snrGamma: v.snr_gamma, accumulationSteps: 1, mixedPrecision: 'no',
    ...over,
  };
}

/** Worst relative error of every LoRA gradient against `prefix/<name>`. */
function worstGrad(prefix: string, grads?: Map<string, Tensor>): { err: number; name: string } {
  let err = 0;
  let name = '';
  tidy(() => {
    for (const [n, p] of h.namedParameters()) {
      const grad = grads ? grads.get(n) ?? null : p.grad;
      if (!grad) throw new Error(`no gradient for ${n}`);
      const e = relErr(grad, g(`${prefix}/${n}`));
      if (e > err) [err, name] = [e, n];
    }
  });
  return { err, name };
}

/** Copies of the LoRA gradients (the caller disposes them). */
function gradCopies(): Map<string, Tensor> {
  return new Map(h.namedParameters().map(([n, p]) => {
    const grad = p.grad;
    if (!grad) throw new Error(`no gradient for ${n}`);
    const c = grad.clone();
    grad.dispose();
    return [n, c];
  }));
}

beforeAll(() => {
  scheduler = DDPMScheduler.fromPretrained(tinySd, { subfolder: 'scheduler' });
  unet = UNet2DConditionModel.fromPretrained(tinySd, { subfolder: 'unet' });
  h = attachLora(unet, { rank: 4, alpha: 4, init: 'gaussian' });
  unet.train();
});

afterAll(() => {
  unet.dispose();
  scheduler.dispose();
  golden.dispose();
});

describe('loraTrainingStep + Accumulator vs diffusers/PEFT (goldens/lora_train)', () => {
  for (const name of VARIANTS) {
    it(`${name}: loss, every gradient, grad norm, clipped gradients and params after clip(1e-3) + AdamW`, () => {
      resetLora();
      const opt = adamw();
      const acc = new Accumulator({ optimizer: opt, maxGradNorm: 1e-3, lrScheduler: 'constant', lrOptions: { baseLr: 1e-4 } });
      const loss = loraTrainingStep(stepFor(name));
      const lossErr = Math.abs(loss - variant(name).loss) / variant(name).loss;
      const grad = worstGrad(`${name}/grad`);
      // what AdamW sees: the gradients after clipping
      let clipped: Map<string, Tensor> | null = null;
      const step = opt.step.bind(opt);
      opt.step = () => { clipped = gradCopies(); step(); };
      const r = acc.afterBackward();
      if (!r || !clipped) throw new Error('no optimizer step at the boundary');
      const clippedErr = worstGrad(`${name}/grad_clipped_1e-3`, clipped);
      dispose([...(clipped as Map<string, Tensor>).values()]);
      const normErr = Math.abs((r.gradNorm ?? NaN) - variant(name).grad_norm_preclip) / variant(name).grad_norm_preclip;
      let updErr = 0;
      for (const [n, p] of h.namedParameters()) updErr = Math.max(updErr, relErr(p, g(`${name}/updated_clipped_1e-3/${n}`)));
      // and the update moved the weights by much more than the tolerance
      let moved = 0;
      for (const [n, p] of h.namedParameters()) moved = Math.max(moved, relErr(p, g(`lora_init/${n}`)));
      console.log(name, { lossErr, grad, clippedErr, normErr, updErr, moved });
      expect(lossErr).toBeLessThan(TOL);
      expect(grad.err).toBeLessThan(TOL);
      expect(clippedErr.err).toBeLessThan(TOL);
      expect(normErr).toBeLessThan(TOL);
      expect(updErr).toBeLessThan(TOL);
      expect(moved).toBeGreaterThan(1e-3);
      expect(r.stepped).toBe(true);
      expect(acc.state).toEqual({ globalStep: 1, lrStep: 1, microStep: 0 });
      for (const p of h.parameters()) expect(p.grad).toBeNull();
      opt.dispose();
    });
  }

  it('without clipping the update equals the script\'s (updated_noclip)', () => {
    resetLora();
    const opt = adamw();
    const acc = new Accumulator({ optimizer: opt, lrScheduler: 'constant', lrOptions: { baseLr: 1e-4 } });
    loraTrainingStep(stepFor('eps_mse'));
    expect(acc.afterBackward()?.gradNorm).toBeNull();
    let err = 0;
    for (const [n, p] of h.namedParameters()) err = Math.max(err, relErr(p, g(`eps_mse/updated_noclip/${n}`)));
    expect(err).toBeLessThan(TOL);
    opt.dispose();
  });

  it('2 micro-batches with accumulationSteps 2 = one batch of both; the optimizer steps only at the boundary', () => {
    const half = (t: Tensor, i: number): Tensor => t.narrow(0, i, 1).contiguous();
    const name = 'eps_snr5';
    // one batch of two
    resetLora();
    loraTrainingStep(stepFor(name));
    const whole = gradCopies();
    // two micro-batches of one
    resetLora();
    const opt = adamw();
    let steps = 0;
    let atBoundary: Map<string, Tensor> | null = null;
    const step = opt.step.bind(opt);
    opt.step = () => { steps += 1; atBoundary = gradCopies(); step(); };
    const acc = new Accumulator({ optimizer: opt, accumulationSteps: 2, maxGradNorm: 1.0, lrScheduler: 'constant', lrOptions: { baseLr: 1e-4 } });
    const losses: number[] = [];
    for (const i of [0, 1]) {
      expect(acc.syncGradients).toBe(i === 1);
      const l = tidy(() => loraTrainingStep(stepFor(name, {
        batch: { latents: half(g('inputs/latents'), i), encoderHiddenStates: half(g('inputs/encoder_hidden_states'), i) },
        noise: half(g('inputs/noise'), i), timesteps: half(g('inputs/timesteps'), i), accumulationSteps: 2,
      })));
      losses.push(l);
      const r = acc.afterBackward();
      if (i === 0) {
        expect(r).toBeNull();
        expect(steps).toBe(0);
        expect(acc.state).toEqual({ globalStep: 0, lrStep: 0, microStep: 1 });
        for (const [n, p] of h.namedParameters()) expect([n, bitEqual(p, g(`lora_init/${n}`))]).toEqual([n, true]);
      } else {
        expect(r?.stepped).toBe(true);
        expect(steps).toBe(1);
        expect(acc.state).toEqual({ globalStep: 1, lrStep: 1, microStep: 0 });
      }
    }
    // the returned losses are the undivided per-micro-batch losses, whose mean is the batch loss
    expect(Math.abs((losses[0]! + losses[1]!) / 2 - variant(name).loss) / variant(name).loss).toBeLessThan(TOL);
    if (!atBoundary) throw new Error('no step');
    let worst = 0;
    for (const [n, t] of whole) worst = Math.max(worst, relErr((atBoundary as Map<string, Tensor>).get(n) as Tensor, t));
    // the same two micro-batches as separate accumulationSteps-1 backward passes, averaged by hand
    resetLora();
    const parts = [0, 1].map((i) => {
      tidy(() => loraTrainingStep(stepFor(name, {
        batch: { latents: half(g('inputs/latents'), i), encoderHiddenStates: half(g('inputs/encoder_hidden_states'), i) },
        noise: half(g('inputs/noise'), i), timesteps: half(g('inputs/timesteps'), i),
      })));
      const m = gradCopies();
      resetLora();
      return m;
    });
    let worstManual = 0;
    for (const [n, t] of parts[0]!) {
      const avg = t.add(parts[1]!.get(n) as Tensor).div(2);
      worstManual = Math.max(worstManual, relErr((atBoundary as Map<string, Tensor>).get(n) as Tensor, avg));
      avg.dispose();
    }
    console.log('accumulated gradients, worst rel err: vs the whole batch', worst, 'vs the averaged micro-batches', worstManual);
    // vs the whole batch: the batch-1 and batch-2 kernels round differently (fp32 noise, ~4e-6 at worst on
    // the smallest LoRA gradients, the same level as ours vs PEFT); a wrong division would be off by 2×
    expect(worst).toBeLessThan(1e-5);
    expect(worstManual).toBeLessThan(1e-6);
    dispose([...whole.values(), ...(atBoundary as Map<string, Tensor>).values(), ...parts.flatMap((m) => [...m.values()])]);
    opt.dispose();
  });
});

describe('mixed precision and loss scaling', () => {
  it('fp16 on CPU is refused with a clear error', () => {
    resetLora();
    expect(() => loraTrainingStep(stepFor('eps_mse', { mixedPrecision: 'fp16', scaler: new GradScaler() })))
      .toThrow(/fp16.*CUDA.*libtorch has no fp16 matmul on CPU/);
    expect(() => loraTrainingStep(stepFor('eps_mse', { mixedPrecision: 'fp16' }))).toThrow(/GradScaler/);
    for (const p of h.parameters()) expect(p.grad).toBeNull();
  });

  it('a bf16 step on CPU runs under autocast; its loss is within bf16 tolerance of fp32', () => {
    resetLora();
    const loss = loraTrainingStep(stepFor('eps_mse', { mixedPrecision: 'bf16' }));
    const rel = Math.abs(loss - variant('eps_mse').loss) / variant('eps_mse').loss;
    const gradErr = worstGrad('eps_mse/grad');
    console.log('bf16 vs fp32', { lossRel: rel, worstGrad: gradErr });
    expect(rel).toBeLessThan(2e-2);
    expect(rel).toBeGreaterThan(0); // autocast really ran in bf16
    // LoRA master weights stay fp32, with fp32 gradients close to the fp32 ones
    for (const p of h.parameters()) expect([p.dtype, p.grad?.dtype]).toEqual(['float32', 'float32']);
    expect(gradErr.err).toBeLessThan(0.1);
  });

  it('an overflow makes the GradScaler skip the step: scale halves, weights unchanged and finite, LR schedule not advanced', () => {
    resetLora();
    const opt = adamw();
    const scaler = new GradScaler({ initScale: 1024 });
    const lrOptions = { baseLr: 1e-4, warmupSteps: 10 };
    const acc = new Accumulator({ optimizer: opt, scaler, maxGradNorm: 1.0, lrScheduler: 'constant_with_warmup', lrOptions });
    expect(opt.lr).toBe(0);
    // a good step first: the scaled gradients are unscaled exactly (÷ 1024 is exact in binary)
    loraTrainingStep(stepFor('eps_mse', { scaler }));
    const gradErr = worstGrad('eps_mse/grad', (() => {
      const m = gradCopies();
      for (const t of m.values()) t.mul_(1 / 1024);
      return m;
    })());
    expect(gradErr.err).toBeLessThan(TOL);
    const good = acc.afterBackward();
    expect([good?.stepped, scaler.scale, acc.state.lrStep, opt.lr]).toEqual([true, 1024, 1, 1e-5]);
    const before = new Map(h.namedParameters().map(([n, p]) => [n, p.clone()]));
    // then an inf in one gradient
    loraTrainingStep(stepFor('eps_mse', { scaler }));
    tidy(() => noGrad(() => { h.parameters()[7]?.grad?.fill_(Infinity); }));
    const bad = acc.afterBackward();
    expect(bad?.stepped).toBe(false);
    expect(scaler.scale).toBe(512);
    expect(acc.state).toEqual({ globalStep: 2, lrStep: 1, microStep: 0 });
    expect(opt.lr).toBe(1e-5);
    for (const [n, p] of h.namedParameters()) {
      expect([n, bitEqual(p, before.get(n) as Tensor)]).toEqual([n, true]);
      expect(tidy(() => p.isfinite().all().item())).toBeTruthy();
      expect(p.grad).toBeNull();
    }
    dispose([...before.values()]);
    opt.dispose();
  });
});

describe('memory and sampling', () => {
  it('20 steps inside tidy keep the live tensor count flat', () => {
    resetLora();
    const opt = adamw();
    const acc = new Accumulator({ optimizer: opt, accumulationSteps: 2, maxGradNorm: 1.0, lrScheduler: 'cosine', lrOptions: { baseLr: 1e-4, warmupSteps: 2, totalSteps: 10 } });
    const gen = new Generator().manualSeed(0);
    const run = (): void => {
      tidy(() => {
        const latents = g('inputs/latents');
        loraTrainingStep({
          unet, scheduler, batch: { latents, encoderHiddenStates: g('inputs/encoder_hidden_states') },
          noise: sampleNoise(latents, { noiseOffset: 0.1, generator: gen }),
          timesteps: sampleTimesteps(2, 1000, gen), snrGamma: 5, accumulationSteps: 2,
        });
        acc.afterBackward();
      });
    };
    run(); run(); // the optimizer's state is created at the first real step
    const live = memory().numTensors;
    for (let i = 0; i < 20; i++) run();
    expect(memory().numTensors).toBe(live);
    expect(acc.state.globalStep).toBe(11);
    for (const p of h.parameters()) expect(tidy(() => p.isfinite().all().item())).toBeTruthy();
    opt.dispose();
  });

  it('sampleNoise adds a per-channel offset; sampleTimesteps draws int64 in [0, T)', () => {
    tidy(() => {
      const latents = torch.zeros([3, 4, 8, 8]);
      const a = sampleNoise(latents, { generator: new Generator().manualSeed(5) });
      const b = sampleNoise(latents, { noiseOffset: 0.5, generator: new Generator().manualSeed(5) });
      const gen = new Generator().manualSeed(5);
      const base = torch.randn([3, 4, 8, 8], { generator: gen });
      const offset = torch.randn([3, 4, 1, 1], { generator: gen }).mul(0.5);
      expect(bitEqual(a, base)).toBe(true);
      expect(relErr(b, base.add(offset))).toBe(0);
      expect(() => sampleNoise(latents, { noiseOffset: -1 })).toThrow(RangeError);
      const t = sampleTimesteps(4096, 1000, new Generator().manualSeed(1));
      expect([t.dtype, t.shape]).toEqual(['int64', [4096]]);
      expect([t.min().item(), t.max().item()]).toEqual([0, 999]);
      expect(bitEqual(t, sampleTimesteps(4096, 1000, new Generator().manualSeed(1)))).toBe(true);
    });
  });

  it('encodeLatents = vae.encode(x).sample(generator) × scaling_factor, without gradients', () => {
    const vae = AutoencoderKL.fromPretrained(tinySd, { subfolder: 'vae' });
    tidy(() => {
      const pixels = torch.rand([1, 3, 64, 64], { generator: new Generator().manualSeed(3) }).mul(2).sub(1);
      const z = encodeLatents(vae, pixels, new Generator().manualSeed(7));
      const ref = noGrad(() => vae.encode(pixels).sample(new Generator().manualSeed(7)).mul(vae.scalingFactor));
      expect(bitEqual(z, ref)).toBe(true);
      expect(z.requiresGrad).toBe(false);
      expect(vae.scalingFactor).not.toBe(1);
      // and a step from pixels uses it (same generator → same latents)
      resetLora();
      const fromPixels = loraTrainingStep({
        unet, scheduler, vae, batch: { pixelValues: pixels, encoderHiddenStates: g('inputs/encoder_hidden_states').narrow(0, 0, 1) },
        generator: new Generator().manualSeed(7), noise: torch.zerosLike(z), timesteps: torch.tensor([10], { dtype: 'int64' }),
      });
      resetLora();
      const fromLatents = loraTrainingStep({
        unet, scheduler, batch: { latents: z, encoderHiddenStates: g('inputs/encoder_hidden_states').narrow(0, 0, 1) },
        noise: torch.zerosLike(z), timesteps: torch.tensor([10], { dtype: 'int64' }),
      });
      expect(fromPixels).toBe(fromLatents);
    });
    vae.dispose();
  });
});
