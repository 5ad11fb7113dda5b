// The training loop end to end on the tiny pipeline: an imagefolder dataset, LoRA steps, checkpoints,
// pruning, exact resume (bit-for-bit on CPU) and the final diffusers-format file.
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { parquetWriteBuffer } from 'hyparquet-writer';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadSafetensors, readSafetensorsHeader } from '../lib/io/safetensors.js';
import { dispose } from '../lib/scope.js';
import { stepsArithmetic, runTraining, type TrainOptions } from '../lib/training/train.js';
import { bitEqual, fixtures } from './helpers.js';

let tmp: string;
let data: string;
beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-train-'));
  data = join(tmp, 'data');
  mkdirSync(data);
  const colors = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 200, 50], [20, 120, 220]];
  const lines: string[] = [];
  for (const [i, [r, g, b]] of colors.entries()) {
    await sharp({ create: { width: 40, height: 36, channels: 3, background: { r: r!, g: g!, b: b! } } }).png().toFile(join(data, `${i}.png`));
    lines.push(JSON.stringify({ file_name: `${i}.png`, text: i % 2 ? `a picture number ${i}` : [`a photo ${i}`, `an image ${i}`] }));
  }
  writeFileSync(join(data, 'metadata.jsonl'), lines.join('\n'));
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const base = (outputDir: string): TrainOptions => ({
  pretrainedModelNameOrPath: join(fixtures, 'tiny-sd'), trainDataDir: data, outputDir, resolution: 32, centerCrop: false,
  randomFlip: true, trainBatchSize: 2, gradientAccumulationSteps: 1, maxTrainSteps: 4, learningRate: 1e-3,
  lrScheduler: 'cosine', lrWarmupSteps: 1, seed: 7, checkpointingSteps: 2, device: 'cpu', imageInterpolationMode: 'bilinear',
});

function loraOf(dir: string) {
  const { tensors, metadata } = loadSafetensors(join(dir, 'pytorch_lora_weights.safetensors'));
  return { tensors, metadata };
}

describe('runTraining', () => {
  it('follows the script\'s steps arithmetic', () => {
    expect(stepsArithmetic(3, 1, 100, null)).toEqual({ updateStepsPerEpoch: 3, maxTrainSteps: 300, numTrainEpochs: 100 });
    expect(stepsArithmetic(5, 4, 100, 15000)).toEqual({ updateStepsPerEpoch: 2, maxTrainSteps: 15000, numTrainEpochs: 7500 });
  });

  it('trains, checkpoints, prunes, and a resumed run ends bit-identical to an uninterrupted one', async () => {
    const straight = join(tmp, 'straight');
    const progress: number[] = [];
    const r = await runTraining(base(straight), { onProgress: (p) => progress.push(p.step) });
    expect(progress).toEqual([1, 2, 3, 4]);
    expect(r.globalStep).toBe(4);
    expect(Number.isFinite(r.lastLoss)).toBe(true);
    expect(readdirSync(straight).filter((f) => f.startsWith('checkpoint-')).sort()).toEqual(['checkpoint-2', 'checkpoint-4']);
    // metrics.jsonl: one line per optimizer step; README.md: the model card diffusers writes
    const metrics = readFileSync(join(straight, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { step: number; loss: number; lr: number });
    expect(metrics.map((m) => m.step)).toEqual([1, 2, 3, 4]);
    expect(metrics.every((m) => Number.isFinite(m.loss) && m.lr >= 0)).toBe(true);
    expect(metrics[0]!.lr).toBe(0); // warmup: the first update runs at LR 0, as the script
    const plot = await sharp(join(straight, 'loss.png')).metadata();
    expect([plot.format, plot.width, plot.height]).toEqual(['png', 640, 360]);
    const card = readFileSync(join(straight, 'README.md'), 'utf8');
    expect(card).toContain(`base_model: ${join(fixtures, 'tiny-sd')}`);
    expect(card).toContain('pipe.load_lora_weights');
    const header = readSafetensorsHeader(join(straight, 'pytorch_lora_weights.safetensors'));
    expect(header.metadata).toEqual({ format: 'pt' });
    expect(header.tensors.length).toBe(96);

    // interrupted after the checkpoint at step 2, then resumed from 'latest'
    const broken = join(tmp, 'resumed');
    const abort = new AbortController();
    await expect(runTraining(base(broken), { signal: abort.signal, onProgress: (p) => { if (p.step === 2) abort.abort(); } }))
      .rejects.toThrow(/aborted/);
    expect(existsSync(join(broken, 'checkpoint-2'))).toBe(true);
    expect(existsSync(join(broken, 'pytorch_lora_weights.safetensors'))).toBe(false);
    const steps: number[] = [];
    await runTraining({ ...base(broken), resumeFromCheckpoint: 'latest' }, { onProgress: (p) => steps.push(p.step) });
    expect(steps).toEqual([3, 4]);

    const a = loraOf(straight);
    const b = loraOf(broken);
    expect([...b.tensors.keys()]).toEqual([...a.tensors.keys()]);
    for (const [k, t] of a.tensors) expect(bitEqual(t, b.tensors.get(k)!), k).toBe(true);
    dispose([...a.tensors.values(), ...b.tensors.values()]);
  }, 120_000);

  it('trains on a parquet dataset (--dataset_name), the pokemon-blip-captions layout', async () => {
    const images = await Promise.all([[250, 10, 10], [10, 250, 10]].map(async ([r, g, b]) =>
      new Uint8Array(await sharp({ create: { width: 40, height: 36, channels: 3, background: { r: r!, g: g!, b: b! } } }).png().toBuffer())));
    const dir = join(tmp, 'pq', 'data');
    mkdirSync(dir, { recursive: true });
    const buf = parquetWriteBuffer({
      columnData: [
        { name: 'image', data: images.map((bytes) => ({ bytes, path: null })) },
        { name: 'text', data: ['a red thing', 'a green thing'] },
      ],
      schema: [
        { name: 'root', num_children: 2 },
        { name: 'image', repetition_type: 'OPTIONAL', num_children: 2 },
        { name: 'bytes', type: 'BYTE_ARRAY', repetition_type: 'OPTIONAL' },
        { name: 'path', type: 'BYTE_ARRAY', converted_type: 'UTF8', repetition_type: 'OPTIONAL' },
        { name: 'text', type: 'BYTE_ARRAY', converted_type: 'UTF8', repetition_type: 'OPTIONAL' },
      ],
    });
    writeFileSync(join(dir, 'train-00000-of-00001.parquet'), new Uint8Array(buf));
    const out = join(tmp, 'pq-out');
    const r = await runTraining({ ...base(out), trainDataDir: null, datasetName: join(tmp, 'pq'), maxTrainSteps: 2 });
    expect(r.globalStep).toBe(2);
    expect(existsSync(join(out, 'pytorch_lora_weights.safetensors'))).toBe(true);
  }, 120_000);

  it('keeps at most --checkpoints_total_limit checkpoints', async () => {
    const out = join(tmp, 'limited');
    await runTraining({ ...base(out), maxTrainSteps: 3, checkpointingSteps: 1, checkpointsTotalLimit: 2 });
    expect(readdirSync(out).filter((f) => f.startsWith('checkpoint-')).sort()).toEqual(['checkpoint-2', 'checkpoint-3']);
  }, 120_000);

  it('stops on a non-finite loss with the step named, keeping the last checkpoint and writing no result', async () => {
    const out = join(tmp, 'diverged');
    // an absurd learning rate makes the LoRA weights explode after the first update
    await expect(runTraining({ ...base(out), learningRate: 1e30, lrScheduler: 'constant', maxGradNorm: null, checkpointingSteps: 1 }))
      .rejects.toThrow(/loss is (NaN|Infinity) at step \d+ .*the last checkpoint is .*checkpoint-\d+/);
    expect(existsSync(join(out, 'checkpoint-1'))).toBe(true);
    expect(existsSync(join(out, 'pytorch_lora_weights.safetensors'))).toBe(false);
  }, 120_000);

  it('refuses what it cannot do with clear errors', async () => {
    await expect(runTraining({ ...base(join(tmp, 'x')), mixedPrecision: 'fp16' })).rejects.toThrow(/fp16 needs a CUDA GPU/);
    await expect(runTraining({ ...base(join(tmp, 'y')), trainDataDir: null, datasetName: 'lambdalabs/pokemon', cacheDir: join(tmp, 'empty-cache') }))
      .rejects.toThrow(/lambdalabs\/pokemon[\s\S]*huggingface-cli download --repo-type dataset/);
    await expect(runTraining({ ...base(join(tmp, 'z')), pretrainedModelNameOrPath: join(tmp, 'nope') })).rejects.toThrow(/nope/);
  });
});
