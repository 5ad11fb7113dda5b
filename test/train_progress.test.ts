// What a run tells its caller while it runs (issue #13): one loss — onProgress's `loss` is the logged one
// (the accumulation window's mean, as metrics.jsonl and TensorBoard), `stepLoss` the last micro-batch's —
// validation runs announced as they start and end, and an ETA that counts the validation still to come.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { trainTextToImageLora, type TrainProgress, type ValidationEvent } from '../lib/index.js';
import { ProgressPrinter, estimateSecondsLeft } from '../lib/cli/progress.js';
import { validationRunsLeft } from '../lib/training/validation.js';
import { fixtures, makeImageFolder } from './helpers.js';

let tmp: string;
beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-progress-'));
  await makeImageFolder(join(tmp, 'data'), 4);
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe('onProgress', () => {
  it('gives the logged loss (the accumulation window mean) and the last micro-batch loss', async () => {
    const out = join(tmp, 'acc');
    const seen: TrainProgress[] = [];
    await trainTextToImageLora({
      pretrainedModelNameOrPath: join(fixtures, 'tiny-sd'), trainDataDir: join(tmp, 'data'), outputDir: out, resolution: 32,
      trainBatchSize: 1, gradientAccumulationSteps: 2, maxTrainSteps: 2, learningRate: 1e-3, seed: 3, device: 'cpu', imageInterpolationMode: 'bilinear',
    }, { onProgress: (p) => seen.push(p) });
    const logged = readFileSync(join(out, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => (JSON.parse(l) as { loss: number }).loss);
    expect(seen.map((p) => p.loss)).toEqual(logged);
    for (const p of seen) {
      expect(Number.isFinite(p.stepLoss)).toBe(true);
      expect(p.stepLoss).not.toBe(p.loss); // a window of 2 micro-batches: the mean is not the last one
      expect(p.validationsLeft).toBe(0);
    }
  }, 60_000);
});

describe('validation runs left', () => {
  it('counts the epochs left that validate, and the final run', () => {
    expect(validationRunsLeft({ epoch: 0, numTrainEpochs: 2, validationEpochs: 1, enabled: true })).toBe(3);
    expect(validationRunsLeft({ epoch: 1, numTrainEpochs: 2, validationEpochs: 1, enabled: true })).toBe(2);
    expect(validationRunsLeft({ epoch: 1, numTrainEpochs: 10, validationEpochs: 3, enabled: true })).toBe(4); // 3, 6, 9, final
    expect(validationRunsLeft({ epoch: 0, numTrainEpochs: 10, validationEpochs: 3, enabled: false })).toBe(0);
  });
});

describe('the CLI progress lines', () => {
  const step = (s: number, validationsLeft: number) => ({ step: s, maxTrainSteps: 10, epoch: 0, loss: 0.5, lr: 1e-4, gradNorm: null, validationsLeft });
  const event = (e: 'start' | 'end', seconds = 0): ValidationEvent => (e === 'start'
    ? { event: 'start', phase: 'validation', epoch: 0, prompt: 'a cat', numImages: 2, dir: '/o/validation/epoch-0' }
    : { event: 'end', phase: 'validation', epoch: 0, prompt: 'a cat', numImages: 2, dir: '/o/validation/epoch-0', images: ['a', 'b'], seconds });

  it('estimates training at its own rate plus the validation runs left at the last one\'s duration', () => {
    expect(estimateSecondsLeft({ stepsLeft: 10, stepsPerSecond: 2, validationsLeft: 3, validationSeconds: 60 })).toBe(185);
    expect(estimateSecondsLeft({ stepsLeft: 10, stepsPerSecond: 2, validationsLeft: 3, validationSeconds: null })).toBe(5);
  });

  it('prints validation start and end, leaves validation time out of the rate and adds it to the ETA', () => {
    let now = 0;
    const lines: string[] = [];
    const p = new ProgressPrinter((s) => lines.push(s), false, () => now);
    now = 1000;
    p.progress(step(1, 2)); // 1 step in 1 s; validation not yet measured
    expect(lines.pop()).toBe('step 1/10 epoch 0 loss 0.5000 lr 1.000e-4 1.00 it/s eta 0m09s + 2 validation run(s)\n');
    p.validation(event('start'));
    expect(lines.pop()).toBe("validation: generating 2 image(s) for 'a cat' (epoch 0)…\n");
    now = 61_000;
    p.validation(event('end', 60));
    expect(lines.pop()).toBe('validation: 2 image(s) in 60.0 s → /o/validation/epoch-0\n');
    now = 62_000;
    p.progress(step(2, 1)); // 2 steps in 2 s of training; 8 steps + one 60 s validation left
    expect(lines.pop()).toBe('step 2/10 epoch 0 loss 0.5000 lr 1.000e-4 1.00 it/s eta 1m08s\n');
  });
});
