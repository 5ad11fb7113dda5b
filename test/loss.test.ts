// The training objective against goldens/lora_train (diffusers 0.31's train_text_to_image_lora.py on tiny-sd):
// for each variant, our loss from the golden model_pred and target (and snr) vs the golden loss and
// mse_loss_weights; then the whole objective from the raw inputs (latents, noise, timesteps), and the
// refusals.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DDPMScheduler } from '../lib/schedulers/scheduling_ddpm.js';
import {
  diffusionLoss, minSnrLossWeights, resolvePredictionType, trainingTarget, weightedMseLoss,
  type TrainablePredictionType,
} from '../lib/training/loss.js';
import { memory, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { bitEqual, fixtures, goldenEqual, relErr, goldenFile } from './helpers.js';

const TOL = 1e-6;

interface Variant { loss: number; prediction_type: TrainablePredictionType; snr_gamma: number | null }
const meta = JSON.parse(readFileSync(join(fixtures, 'goldens', 'lora_train.json'), 'utf8')) as { variants: Record<string, Variant> };
const VARIANTS = ['eps_mse', 'eps_snr5', 'vpred_mse', 'vpred_snr5'] as const;
const variant = (name: string): Variant => {
  const v = meta.variants[name];
  if (!v) throw new Error(`variant '${name}' missing`);
  return v;
};

const golden = goldenFile('lora_train.safetensors');
let scheduler: DDPMScheduler;
const g = (name: string): Tensor => golden.get(name);

beforeAll(() => {
  scheduler = DDPMScheduler.fromPretrained(join(fixtures, 'tiny-sd'), { subfolder: 'scheduler' });
});

afterAll(() => {
  golden.dispose();
  scheduler.dispose();
});

describe('loss parity with the lora_train goldens', () => {
  it('the JSON describes the variants this test expects', () => {
    expect(VARIANTS.map((v) => [variant(v).prediction_type, variant(v).snr_gamma])).toEqual([
      ['epsilon', null], ['epsilon', 5], ['v_prediction', null], ['v_prediction', 5],
    ]);
  });

  for (const name of VARIANTS) {
    it(`${name}: loss from the golden model_pred, target (and snr)`, () => {
      const v = variant(name);
      const errs = tidy(() => {
        const pred = g(`${name}/model_pred`);
        const target = g(`${name}/target`);
        const out: Record<string, number> = {};
        if (v.snr_gamma === null) {
          const loss = diffusionLoss(pred, target, { scheduler, timesteps: g('inputs/timesteps') });
          expect(loss.shape).toEqual([]);
          expect(loss.dtype).toBe('float32');
          out.loss = relErr(loss, g(`${name}/loss`));
        } else {
          // from the golden snr, exactly as the script's formulas
          const weights = minSnrLossWeights(g(`${name}/snr`), v.snr_gamma, v.prediction_type);
          out.weights = relErr(weights, g(`${name}/mse_loss_weights`));
          const loss = weightedMseLoss(pred, target, weights);
          out.loss = relErr(loss, g(`${name}/loss`));
          // and end to end with our compute_snr and the prediction type from the option
          const full = diffusionLoss(pred, target, { scheduler, timesteps: g('inputs/timesteps'), snrGamma: v.snr_gamma, predictionType: v.prediction_type });
          out.lossWithOurSnr = relErr(full, g(`${name}/loss`));
          expect(goldenEqual(full, loss)).toBe(true); // the same loss as from the golden snr
        }
        return out;
      });
      console.log(`${name} relative errors`, errs);
      for (const [k, e] of Object.entries(errs)) expect(e, k).toBeLessThan(TOL);
    });
  }

  it('the whole objective from latents, noise and timesteps (target chosen by prediction type)', () => {
    const errs = tidy(() => {
      const out: Record<string, number> = {};
      for (const name of VARIANTS) {
        const v = variant(name);
        const type = resolvePredictionType(scheduler, v.prediction_type);
        const target = trainingTarget(scheduler, g('inputs/latents'), g('inputs/noise'), g('inputs/timesteps'), type);
        expect(goldenEqual(target, g(`${name}/target`)), `${name}/target`).toBe(true);
        const loss = diffusionLoss(g(`${name}/model_pred`), target, { scheduler, timesteps: g('inputs/timesteps'), snrGamma: v.snr_gamma, predictionType: type });
        out[name] = relErr(loss, g(`${name}/loss`));
      }
      return out;
    });
    console.log('end-to-end loss relative errors', errs);
    for (const [k, e] of Object.entries(errs)) expect(e, k).toBeLessThan(TOL);
  });

  it('the prediction type comes from the scheduler config unless overridden', () => {
    expect(resolvePredictionType(scheduler)).toBe('epsilon');
    expect(resolvePredictionType(scheduler, 'v_prediction')).toBe('v_prediction');
    const v = DDPMScheduler.fromPretrained(join(fixtures, 'tiny-sd'), { subfolder: 'scheduler' }, { prediction_type: 'v_prediction' });
    const errs = tidy(() => {
      const loss = diffusionLoss(g('vpred_snr5/model_pred'), g('vpred_snr5/target'), { scheduler: v, timesteps: g('inputs/timesteps'), snrGamma: 5 });
      return relErr(loss, g('vpred_snr5/loss'));
    });
    v.dispose();
    expect(errs).toBeLessThan(TOL);
  });
});

describe('semantics', () => {
  it('upcasts half-precision predictions before the difference (model_pred.float())', () => {
    tidy(() => {
      const pred = g('eps_mse/model_pred').half();
      const target = g('eps_mse/target').half();
      const loss = diffusionLoss(pred, target, { scheduler, timesteps: g('inputs/timesteps') });
      expect(loss.dtype).toBe('float32');
      const want = pred.float().sub(target.float()).square().mean();
      expect(bitEqual(loss, want)).toBe(true);
    });
  });

  it('Min-SNR weights: min(snr, γ)/snr for epsilon, min(snr, γ)/(snr+1) for v_prediction', () => {
    tidy(() => {
      const snr = torch.tensor([0.5, 5, 20]);
      expect(Array.from(minSnrLossWeights(snr, 5, 'epsilon').toFloat64Array())).toEqual([1, 1, 0.25]);
      expect(Array.from(minSnrLossWeights(snr, 5, 'v_prediction').toFloat64Array())).toEqual(
        [Math.fround(0.5 / 1.5), Math.fround(5 / 6), Math.fround(5 / 21)],
      );
    });
  });

  it('refuses what the script cannot train', () => {
    const sample = DDPMScheduler.fromConfig({ prediction_type: 'sample' });
    expect(() => resolvePredictionType(sample)).toThrow(/Unknown prediction type "sample"/);
    expect(() => resolvePredictionType(scheduler, 'x0')).toThrow(/Unknown prediction type "x0"/);
    tidy(() => {
      const x = torch.randn([2, 4]);
      const ts = torch.tensor([1n, 2n]);
      expect(() => diffusionLoss(x, x, { scheduler: sample, timesteps: ts, snrGamma: 5 })).toThrow(/Unknown prediction type/);
      expect(() => minSnrLossWeights(torch.ones([2]), 0, 'epsilon')).toThrow(/snr_gamma must be a positive number/);
      expect(() => weightedMseLoss(torch.ones([2]), torch.ones([2]), torch.ones([2]))).toThrow(/batch dimension/);
    });
    sample.dispose();
  });

  it('leaves no temporaries behind', () => {
    const before = memory().numTensors;
    const loss = diffusionLoss(g('vpred_snr5/model_pred'), g('vpred_snr5/target'), { scheduler, timesteps: g('inputs/timesteps'), snrGamma: 5, predictionType: 'v_prediction' });
    expect(memory().numTensors).toBe(before + 1);
    loss.dispose();
    expect(memory().numTensors).toBe(before);
  });

  it('backpropagates to the prediction', () => {
    tidy(() => {
      const pred = g('eps_snr5/model_pred').clone().requiresGrad_();
      const loss = diffusionLoss(pred, g('eps_snr5/target'), { scheduler, timesteps: g('inputs/timesteps'), snrGamma: 5 });
      loss.backward();
      // d/dpred of mean_b(w_b · mean((pred − t)²)) = 2·w_b·(pred − t) / (B · CHW)
      const w = minSnrLossWeights(g('eps_snr5/snr'), 5, 'epsilon').reshape(2, 1, 1, 1);
      const want = pred.detach().sub(g('eps_snr5/target')).mul(w).mul(2 / pred.shape.reduce((a, b) => a * b, 1));
      const grad = pred.grad;
      if (!grad) throw new Error('no grad');
      expect(relErr(grad, want)).toBeLessThan(TOL);
    });
  });
});
