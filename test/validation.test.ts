// Validation during training (--validation_prompt, --num_validation_images, --validation_epochs): images
// of the current LoRA per epoch and of the saved file at the end, on disk, in TensorBoard and in the model
// card — and the training itself unchanged by them (same final LoRA as a run without validation).
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadSafetensors } from '../lib/io/safetensors.js';
import { readTensorBoardEvents } from '../lib/logging/tensorboard.js';
import { dispose } from '../lib/scope.js';
import { runTraining, type TrainOptions } from '../lib/training/train.js';
import { bitEqual, fixtures, makeImageFolder } from './helpers.js';

let tmp: string;
let data: string;
beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-val-'));
  data = join(tmp, 'data');
  await makeImageFolder(data, 4);
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

// 2 batches per epoch → 2 epochs of 2 steps each
const base = (outputDir: string): TrainOptions => ({
  pretrainedModelNameOrPath: join(fixtures, 'tiny-sd'), trainDataDir: data, outputDir, resolution: 32, trainBatchSize: 2,
  maxTrainSteps: 4, learningRate: 1e-3, lrScheduler: 'constant', seed: 11, device: 'cpu', imageInterpolationMode: 'bilinear',
});

describe('validation images', () => {
  it('per epoch and at the end, on disk, in TensorBoard and the model card; training unchanged', async () => {
    const plain = join(tmp, 'plain');
    const validated = join(tmp, 'validated');
    await runTraining(base(plain));
    const r = await runTraining({ ...base(validated), validationPrompt: 'a blue square', numValidationImages: 2, validationEpochs: 1 });

    // every epoch: output_dir/validation/epoch-<n>/image_<i>.png
    for (const epoch of [0, 1]) {
      const dir = join(validated, 'validation', `epoch-${epoch}`);
      expect(readdirSync(dir).sort()).toEqual(['image_0.png', 'image_1.png']);
      const meta = await sharp(join(dir, 'image_0.png')).metadata();
      expect([meta.format, meta.width, meta.height]).toEqual(['png', 64, 64]); // tiny-sd's default size (sample_size 32 × VAE factor 2)
    }
    // two images from one seeded generator differ; the final run (saved file, fresh pipeline) writes image_<i>.png
    const a = readFileSync(join(validated, 'validation', 'epoch-1', 'image_0.png'));
    expect(a.equals(readFileSync(join(validated, 'validation', 'epoch-1', 'image_1.png')))).toBe(false);
    expect(r.validationImages).toEqual([join(validated, 'image_0.png'), join(validated, 'image_1.png')]);
    // the final images come from the saved file loaded into a fresh pipeline: the same LoRA as after the
    // last epoch, the same seed → the same pictures
    expect(readFileSync(join(validated, 'image_0.png')).equals(a)).toBe(true);
    expect(readFileSync(join(validated, 'README.md'), 'utf8')).toContain('![img_1](./image_1.png)');

    // TensorBoard: one grid per call, tagged as the script ('validation' per epoch, 'test' at the end)
    const logs = join(validated, 'logs');
    const events = readdirSync(logs).flatMap((f) => readTensorBoardEvents(join(logs, f)));
    const images = events.flatMap((e) => e.images.map((im) => ({ step: e.step, tag: im.tag, width: im.width, height: im.height })));
    expect(images).toEqual([
      { step: 0, tag: 'validation', width: 128, height: 64 },
      { step: 1, tag: 'validation', width: 128, height: 64 },
      { step: 1, tag: 'test', width: 128, height: 64 },
    ]);

    // validation draws from its own generator: the trained LoRA is bit-identical to the run without it
    const x = loadSafetensors(join(plain, 'pytorch_lora_weights.safetensors')).tensors;
    const y = loadSafetensors(join(validated, 'pytorch_lora_weights.safetensors')).tensors;
    expect([...y.keys()]).toEqual([...x.keys()]);
    for (const [k, t] of x) expect(bitEqual(y.get(k)!, t), k).toBe(true);
    dispose([...x.values(), ...y.values()]);
    expect(existsSync(join(plain, 'validation'))).toBe(false);
  }, 180_000);
});
