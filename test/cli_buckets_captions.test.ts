// Captions and aspect-ratio buckets through the CLI on the tiny fixtures: `train` over sd-scripts' N_name repeat
// folders of mixed aspect ratios (64×32, 32×64, 48×48) with caption files, shuffling and dropout, resumed exactly;
// `train-sdxl` and `train-dreambooth` (prior preservation: a class image takes its partner's bucket) with buckets;
// bad flags refused naming each one, before anything is written.
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort, runCli, runMain as run, tinySd } from './cli_helpers.js';
import { fixtures } from './helpers.js';

const tinySdxl = join(fixtures, 'tiny-sdxl');
let tmp: string;
let data: string;
let instances: string;
const SHAPES: [number, number][] = [[64, 32], [32, 64], [48, 48]];
const png = (file: string, w: number, h: number, shade: number) =>
  sharp({ create: { width: w, height: h, channels: 3, background: { r: shade, g: 200 - shade, b: (shade * 5) % 256 } } }).png().toFile(file);

beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-buckets-cli-'));
  data = join(tmp, 'data');
  mkdirSync(join(data, '2_sks toy'), { recursive: true });
  mkdirSync(join(data, '1_a photo'), { recursive: true });
  for (let i = 0; i < 6; i++) {
    const [w, h] = SHAPES[i % 3]!;
    const dir = join(data, i < 3 ? '2_sks toy' : '1_a photo');
    await png(join(dir, `${i}.png`), w, h, 30 * i);
    if (i % 2 === 0) writeFileSync(join(dir, `${i}.txt`), `sks toy, picture ${i}, red, small`);
  }
  instances = join(tmp, 'instances');
  mkdirSync(instances);
  for (let i = 0; i < 3; i++) await png(join(instances, `${i}.png`), ...SHAPES[i]!, 40 * i);
  writeFileSync(join(instances, '0.txt'), 'a photo of sks toy, wide');
  // class images already there (none generated): a tall and a square one, paired with instance images of other shapes
  mkdirSync(join(tmp, 'classes'));
  await png(join(tmp, 'classes', 'c0.png'), 32, 64, 100);
  await png(join(tmp, 'classes', 'c1.png'), 40, 40, 150);
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const BUCKETS = ['--enable_bucket', '--min_bucket_reso=32', '--max_bucket_reso=128', '--bucket_reso_steps=8'];
const trainArgs = (out: string, ...more: string[]) => ['train', `--pretrained_model_name_or_path=${tinySd}`, `--train_data_dir=${data}`,
  '--resolution=48', ...BUCKETS, '--caption_extension=.txt', '--shuffle_caption', '--keep_tokens=1', '--caption_dropout_rate=0.25', '--random_flip',
  '--train_batch_size=2', '--max_train_steps=4', '--checkpointing_steps=2', '--learning_rate=1e-3', '--seed=3', `--output_dir=${out}`, ...more];

describe('difflora train with sd-scripts folders, captions and buckets', () => {
  it('reads the N_name folders (repeats in the epoch), prints the bucket table, trains, and a resumed run ends byte-identical', async () => {
    const straight = join(tmp, 'straight');
    const r = await run(trainArgs(straight));
    expect(r.err).toMatch(/sd-scripts' repeat folders \(1_a photo, 2_sks toy\): 6 images, 9 per epoch with repeats/);
    expect(r.err).toMatch(/bucket 0: resolution \(\d+, \d+\), count: \d+/);
    expect(r.code, r.err).toBe(0);
    // 9 items in 3 buckets of 3 (the 64×32, 32×64, 48×48 images, repeats included) → 2 batches each of 2: 6 batches per epoch
    const counts = [...r.err.matchAll(/count: (\d+)/g)].map((m) => Number(m[1]));
    expect(counts).toEqual([3, 3, 3]);
    const resumed = join(tmp, 'resumed');
    mkdirSync(resumed);
    cpSync(join(straight, 'checkpoint-2'), join(resumed, 'checkpoint-2'), { recursive: true });
    const again = await run(trainArgs(resumed, '--resume_from_checkpoint=latest'));
    expect(again.code, again.err).toBe(0);
    expect([...again.err.matchAll(/^step (\d+)\//gm)].map((m) => Number(m[1]))).toEqual([3, 4]);
    expect(readFileSync(join(resumed, 'pytorch_lora_weights.safetensors')).equals(readFileSync(join(straight, 'pytorch_lora_weights.safetensors')))).toBe(true);
  }, 600_000);

  it('data-parallel: `difflora launch --num_processes 2 train --enable_bucket` (every process as many batches) trains', async () => {
    const out = join(tmp, 'two');
    const r = await runCli(['launch', '--num_processes', '2', '--main_process_port', String(await freePort()), '--timeout', '60',
      ...trainArgs(out, '--max_train_steps=3').filter((a) => a !== '--max_train_steps=4')]);
    expect(r.code, r.stderr).toBe(0);
    expect(existsSync(join(out, 'pytorch_lora_weights.safetensors'))).toBe(true);
    const steps = readFileSync(join(out, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => (JSON.parse(l) as { step: number }).step);
    expect(steps).toEqual([1, 2, 3]);
  }, 600_000);

  it('train-sdxl trains on buckets (time ids from each bucket: unit-tested in buckets_captions.test.ts)', async () => {
    const out = join(tmp, 'sdxl');
    const r = await run(['train-sdxl', `--pretrained_model_name_or_path=${tinySdxl}`, `--train_data_dir=${data}`, '--resolution=48', ...BUCKETS,
      '--caption_extension=.txt', '--train_batch_size=2', '--max_train_steps=2', '--learning_rate=1e-3', '--seed=3', `--output_dir=${out}`]);
    expect(r.code, r.err).toBe(0);
    expect(r.err).toMatch(/count: 3/);
    expect(existsSync(join(out, 'pytorch_lora_weights.safetensors'))).toBe(true);
  }, 600_000);

  it('train-dreambooth: caption files over the instance prompt, buckets with prior preservation', async () => {
    const out = join(tmp, 'dreambooth');
    const r = await run(['train-dreambooth', `--pretrained_model_name_or_path=${tinySd}`, `--instance_data_dir=${instances}`, '--instance_prompt=a photo of sks toy',
      '--with_prior_preservation', `--class_data_dir=${join(tmp, 'classes')}`, '--class_prompt=a photo of a toy', '--num_class_images=2', '--sample_batch_size=2',
      '--resolution=48', ...BUCKETS, '--caption_extension=.txt', '--train_batch_size=1', '--max_train_steps=3', '--seed=3', `--output_dir=${out}`]);
    expect(r.code, r.err).toBe(0);
    expect(r.err).toMatch(/1 of 3 instance images captioned by their \.txt files/);
    expect(r.err).toMatch(/bucket 2: resolution/);
    expect(r.err).not.toMatch(/generat/i);
  }, 600_000);
});

describe('bad caption and bucket flags', () => {
  it('are listed at once, each named (exit 2), and nothing is written', async () => {
    const out = join(tmp, 'never');
    const r = await run(['train', `--pretrained_model_name_or_path=${tinySd}`, `--train_data_dir=${data}`, '--enable_bucket', '--min_bucket_reso=512',
      '--max_bucket_reso=256', '--bucket_reso_steps=12', '--caption_dropout_rate=-0.5', '--keep_tokens=2', `--output_dir=${out}`]);
    expect(r.code).toBe(2);
    for (const flag of ['--min_bucket_reso=512 is larger than --max_bucket_reso=256', '--bucket_reso_steps must be a multiple of 8', '--caption_dropout_rate must be a finite number ≥ 0',
      '--keep_tokens=2 only acts with --shuffle_caption']) expect(r.err).toContain(flag);
    expect(existsSync(out)).toBe(false);
    for (const cmd of [['train-sdxl', `--pretrained_model_name_or_path=${tinySdxl}`, `--train_data_dir=${data}`], ['train-dreambooth', `--pretrained_model_name_or_path=${tinySd}`, `--instance_data_dir=${instances}`, '--instance_prompt=x']]) {
      const bad = await run([...cmd, '--caption_dropout_rate=2', `--output_dir=${out}`]);
      expect(bad.code).toBe(2);
      expect(bad.err).toContain('--caption_dropout_rate must be a probability in [0, 1], got 2');
    }
    expect(existsSync(out)).toBe(false);
  });

  it('a folder mixing N_name folders with loose images is refused naming the folder (exit 1)', async () => {
    const mixed = join(tmp, 'mixed');
    cpSync(data, mixed, { recursive: true });
    await png(join(mixed, 'loose.png'), 20, 20, 1);
    const r = await run(['train', `--pretrained_model_name_or_path=${tinySd}`, `--train_data_dir=${mixed}`, '--resolution=32', '--max_train_steps=1', `--output_dir=${join(tmp, 'never2')}`]);
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/mixes sd-scripts' N_name repeat folders with 1 image\(s\) at its top/);
    expect(existsSync(join(tmp, 'never2'))).toBe(false);
  }, 120_000);
});
