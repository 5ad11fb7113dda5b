// `difflora train` end to end through the CLI entry: the guide's flags on the tiny pipeline and an
// imagefolder dataset, progress on stderr, the LoRA file and a checkpoint on disk, exit code 0.
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { main } from '../lib/cli/main.js';
import { readSafetensorsHeader } from '../lib/io/safetensors.js';
import { readTensorBoardEvents } from '../lib/logging/tensorboard.js';
import { fixtures } from './helpers.js';

let tmp: string;
beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-cli-'));
  mkdirSync(join(tmp, 'data'));
  const lines: string[] = [];
  for (let i = 0; i < 4; i++) {
    await sharp({ create: { width: 48, height: 40, channels: 3, background: { r: 60 * i, g: 100, b: 200 - 40 * i } } }).png().toFile(join(tmp, 'data', `${i}.png`));
    lines.push(JSON.stringify({ file_name: `${i}.png`, text: `a test image ${i}` }));
  }
  writeFileSync(join(tmp, 'data', 'metadata.jsonl'), lines.join('\n'));
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function capture() {
  let out = '';
  let err = '';
  return { io: { stdout: { write: (s: string) => { out += s; } }, stderr: { write: (s: string) => { err += s; } } }, out: () => out, err: () => err };
}

describe('difflora train', () => {
  it('runs the guide\'s command on local files', async () => {
    const c = capture();
    const out = join(tmp, 'out');
    const code = await main(['train', `--pretrained_model_name_or_path=${join(fixtures, 'tiny-sd')}`, '--train_data_dir', join(tmp, 'data'),
      '--resolution=32', '--center_crop', '--random_flip', '--train_batch_size=2', '--gradient_accumulation_steps=2', '--max_train_steps=3',
      '--learning_rate=1e-04', '--max_grad_norm=1', '--lr_scheduler=cosine', '--lr_warmup_steps=0', `--output_dir=${out}`,
      '--checkpointing_steps=2', '--seed=1337'], c.io);
    expect(code, c.err()).toBe(0);
    expect(c.err()).toMatch(/step 1\/3 epoch 0 loss \d+\.\d{4} lr 1\.000e-4 grad_norm/);
    expect(c.err()).toMatch(/step 3\/3 .* \d+\.\d\d it\/s eta 0m00s/);
    // --report_to=tensorboard (the default): event files with train_loss and lr per optimizer step
    const logDir = join(out, 'logs');
    const events = readTensorBoardEvents(join(logDir, readdirSync(logDir)[0]!));
    const losses = events.flatMap((e) => e.scalars.filter((s) => s.tag === 'train_loss').map((s) => [e.step, s.value]));
    expect(losses.map(([step]) => step)).toEqual([1, 2, 3]);
    expect(losses.every(([, v]) => Number.isFinite(v) && v! > 0)).toBe(true);
    expect(c.out()).toContain('pytorch_lora_weights.safetensors');
    expect(existsSync(join(out, 'checkpoint-2'))).toBe(true);
    expect(readSafetensorsHeader(join(out, 'pytorch_lora_weights.safetensors')).tensors.length).toBe(96);
  }, 120_000);

  it('exits 1 with the reason when the model folder is missing', async () => {
    const c = capture();
    const code = await main(['train', `--pretrained_model_name_or_path=${join(tmp, 'missing')}`, '--train_data_dir', join(tmp, 'data'), `--output_dir=${join(tmp, 'o2')}`], c.io);
    expect(code).toBe(1);
    expect(c.err()).toContain('missing');
  });
});

describe('difflora train with no model or data flags', () => {
  it('trains the built-in default (generated tiny model and pictures) for real', async () => {
    const c = capture();
    const out = join(tmp, 'builtin');
    // fewer steps than the default run to keep the suite fast; everything else is the built-in setting
    const code = await main(['train', `--output_dir=${out}`, '--max_train_steps=20', '--checkpointing_steps=10'], c.io);
    expect(code, c.err()).toBe(0);
    expect(c.err()).toContain('training the built-in default');
    expect(c.err()).toMatch(/step 20\/20 /);
    const header = readSafetensorsHeader(join(out, 'pytorch_lora_weights.safetensors'));
    expect(header.metadata).toEqual({ format: 'pt' });
    expect(header.tensors.length).toBeGreaterThan(0);
    expect(existsSync(join(out, 'checkpoint-20'))).toBe(true);
    expect(existsSync(join(out, 'loss.png'))).toBe(true);
  }, 120_000);

  it('still requires both model and data once either is given', async () => {
    const c = capture();
    expect(await main(['train', '--train_data_dir=x'], c.io)).toBe(2);
    expect(c.err()).toContain('--pretrained_model_name_or_path is required');
  });
});
