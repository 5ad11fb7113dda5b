// trainTextToImageLora (alias startTraining): the training loop as an awaitable handle with progress events, abort, and the run's metrics.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTraining, trainTextToImageLora } from '../lib/index.js';
import type { TrainOptions, TrainProgress } from '../lib/training/train.js';
import { fixtures, makeImageFolder } from './helpers.js';

let tmp: string;
beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-handle-'));
  await makeImageFolder(join(tmp, 'data'), 4);
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const options = (out: string, steps: number): TrainOptions => ({
  pretrainedModelNameOrPath: join(fixtures, 'tiny-sd'), trainDataDir: join(tmp, 'data'), outputDir: join(tmp, out), resolution: 32,
  trainBatchSize: 2, maxTrainSteps: steps, learningRate: 1e-3, seed: 3, device: 'cpu', imageInterpolationMode: 'bilinear',
});

describe('trainTextToImageLora', () => {
  it('emits progress per step and resolves with the result and metrics', async () => {
    const seen: TrainProgress[] = [];
    const hooked: number[] = [];
    const run = trainTextToImageLora(options('ok', 3), { onProgress: (p) => hooked.push(p.step) });
    run.on('progress', (p) => seen.push(p));
    const r = await run; // the handle is awaitable: the same as await run.result
    expect(r).toBe(await run.result);
    expect(seen.map((p) => p.step)).toEqual([1, 2, 3]);
    expect(hooked).toEqual([1, 2, 3]);
    expect(r.globalStep).toBe(3);
    expect(r.metrics.steps).toBe(3);
    expect(r.metrics.losses).toEqual(seen.map((p) => p.loss));
    expect(r.metrics.finalLoss).toBe(seen[2]!.loss);
    expect(r.metrics.stepsPerSecond).toBeGreaterThan(0);
    expect(r.outputFile).toBe(join(tmp, 'ok', 'pytorch_lora_weights.safetensors'));
  }, 60_000);

  it('abort() stops between steps with an AbortError; an outer signal does the same', async () => {
    const run = startTraining(options('aborted', 50));
    run.on('progress', (p) => { if (p.step === 2) run.abort('enough'); });
    await expect(run.result).rejects.toMatchObject({ name: 'AbortError', message: expect.stringMatching(/after step 2: enough/) });
    expect(startTraining).toBe(trainTextToImageLora);
    const outer = new AbortController();
    outer.abort('before start');
    await expect(startTraining(options('outer', 5), { signal: outer.signal }).result).rejects.toMatchObject({ name: 'AbortError' });
  }, 60_000);
});
