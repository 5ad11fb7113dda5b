// The examples run as a user would run them, and do what they say.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parquetWriteBuffer } from 'hyparquet-writer';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readSafetensorsHeader } from '../lib/io/safetensors.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const tinySd = join(root, 'test/fixtures/tiny-sd');
// diffusers' pytorch_lora_weights.safetensors for a LoRA on the UNet's attention projections
const LORA_KEY = /^unet\.(down_blocks|mid_block|up_blocks)\..+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.lora\.(down|up)\.weight$/;
const TINY_SD_LORA_TENSORS = 96;

let tmp: string;
const pictures: Uint8Array[] = [];
beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-examples-'));
  for (let i = 0; i < 4; i++) {
    pictures.push(new Uint8Array(await sharp({ create: { width: 40, height: 36, channels: 3, background: { r: 60 * i, g: 120, b: 220 - 50 * i } } }).png().toBuffer()));
  }
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function expectLoraFile(file: string): void {
  const header = readSafetensorsHeader(file);
  expect(header.metadata).toEqual({ format: 'pt' });
  expect(header.tensors.length).toBe(TINY_SD_LORA_TENSORS);
  const names = header.tensors.map((t) => t.name);
  for (const name of names) expect(name).toMatch(LORA_KEY);
  expect(names.filter((n) => n.endsWith('.lora.down.weight')).length).toBe(TINY_SD_LORA_TENSORS / 2);
}

describe('examples', () => {
  it('lora_basics.ts trains one step and writes a diffusers and a Kohya LoRA', () => {
    const out = mkdtempSync(join(tmpdir(), 'difflora-ex-'));
    const r = spawnSync(process.execPath, ['--import', 'tsx', 'examples/lora_basics.ts', tinySd, out], { cwd: root, encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/loss \d+\.\d{4}/);
    const header = readSafetensorsHeader(join(out, 'pytorch_lora_weights.safetensors'));
    expect(header.metadata).toEqual({ format: 'pt' });
    expect(header.tensors.length).toBe(96);
    expect(existsSync(join(out, 'lora_kohya.safetensors'))).toBe(true);
    rmSync(out, { recursive: true, force: true });
  });

  describe('train.ts (the library: trainTextToImageLora with onProgress and an AbortSignal)', () => {
    let data: string;
    beforeAll(() => {
      data = join(tmp, 'imagefolder');
      mkdirSync(data);
      pictures.forEach((png, i) => writeFileSync(join(data, `${i}.png`), png));
      writeFileSync(join(data, 'metadata.jsonl'), pictures.map((_, i) => JSON.stringify({ file_name: `${i}.png`, text: `a picture number ${i}` })).join('\n'));
    });
    const run = (...args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', 'examples/train.ts', `--model=${tinySd}`, `--data=${data}`, ...args], { cwd: root, encoding: 'utf8' });

    it('trains, reports every step and writes the LoRA', () => {
      const out = join(tmp, 'train-ts');
      const r = run(`--output=${out}`, '--steps=2');
      expect(r.status, r.stderr).toBe(0);
      const steps = [...r.stdout.matchAll(/^step (\d+)\/2 loss (\d+\.\d+) lr (\S+)/gm)];
      expect(steps.map((m) => Number(m[1]))).toEqual([1, 2]);
      for (const m of steps) expect(Number.isFinite(Number(m[2]))).toBe(true);
      expect(r.stdout).toMatch(/^done: 2 steps, last loss \d+\.\d{4}, LoRA weights in .*pytorch_lora_weights\.safetensors$/m);
      expectLoraFile(join(out, 'pytorch_lora_weights.safetensors'));
      expect(readFileSync(join(out, 'metrics.jsonl'), 'utf8').trim().split('\n')).toHaveLength(2);
      expect(readFileSync(join(out, 'loss.png')).subarray(1, 4).toString()).toBe('PNG');
    });

    it('stops between two steps when its AbortSignal fires, and saves nothing', () => {
      const out = join(tmp, 'train-ts-aborted');
      const r = run(`--output=${out}`, '--steps=5', '--stop-at=1');
      expect(r.status, r.stderr).toBe(130);
      expect(r.stdout).toMatch(/^step 1\/5 /m);
      expect(r.stdout).not.toMatch(/^step 2\/5 /m);
      expect(r.stdout).toMatch(/^aborted after step 1: nothing saved$/m);
      expect(existsSync(join(out, 'pytorch_lora_weights.safetensors'))).toBe(false);
    });
  });

  it('train_pokemon.sh runs the guide\'s command on a pokemon-blip-captions copy in the Hugging Face cache', () => {
    // lambdalabs/pokemon-blip-captions' layout: data/train-*.parquet, image = struct {bytes, path}, text = string
    const hub = join(tmp, 'hub');
    const repo = join(hub, 'datasets--lambdalabs--pokemon-blip-captions');
    const buf = parquetWriteBuffer({
      columnData: [
        { name: 'image', data: pictures.map((bytes) => ({ bytes, path: null })) },
        { name: 'text', data: pictures.map((_, i) => `a drawing of a pokemon number ${i}`) },
      ],
      schema: [
        { name: 'root', num_children: 2 },
        { name: 'image', repetition_type: 'OPTIONAL', num_children: 2 },
        { name: 'bytes', type: 'BYTE_ARRAY', repetition_type: 'OPTIONAL' },
        { name: 'path', type: 'BYTE_ARRAY', converted_type: 'UTF8', repetition_type: 'OPTIONAL' },
        { name: 'text', type: 'BYTE_ARRAY', converted_type: 'UTF8', repetition_type: 'OPTIONAL' },
      ],
    });
    mkdirSync(join(repo, 'snapshots', 'c0ffee', 'data'), { recursive: true });
    writeFileSync(join(repo, 'snapshots', 'c0ffee', 'data', 'train-00000-of-00001.parquet'), new Uint8Array(buf));
    mkdirSync(join(repo, 'refs'), { recursive: true });
    writeFileSync(join(repo, 'refs', 'main'), 'c0ffee');

    const out = join(tmp, 'pokemon-lora');
    const r = spawnSync('bash', ['examples/train_pokemon.sh'], {
      cwd: root, encoding: 'utf8',
      env: {
        ...process.env, HF_HUB_CACHE: hub, MODEL_NAME: tinySd, OUTPUT_DIR: out, RESOLUTION: '32', MAX_TRAIN_STEPS: '2',
        CHECKPOINTING_STEPS: '1', MIXED_PRECISION: 'no', VALIDATION_PROMPT: '',
        TMPDIR: tmp, // the parquet images are extracted under $TMPDIR/difflora-parquet-*: removed with tmp
      },
    });
    expect(r.status, r.stderr).toBe(0);
    // the guide's flags reached the CLI (set -x echoes the command)
    for (const flag of ['--dataset_name=lambdalabs/pokemon-blip-captions', '--center_crop', '--random_flip', '--gradient_accumulation_steps=4', '--lr_scheduler=cosine', '--seed=1337']) {
      expect(r.stderr).toContain(flag);
    }
    expect(r.stderr).toMatch(/step 2\/2 /);
    expectLoraFile(join(out, 'pytorch_lora_weights.safetensors'));
    expect(readdirSync(out).filter((f) => f.startsWith('checkpoint-')).sort()).toEqual(['checkpoint-1', 'checkpoint-2']);
    expect(readdirSync(join(out, 'logs')).some((f) => f.startsWith('events.out.tfevents.'))).toBe(true);
  });
  it('generate.ts combines two LoRA files with weights and writes a PNG', async () => {
    const output = join(tmp, 'generated.png');
    const lora = join(root, 'test/fixtures/goldens/lora-diffusers/pytorch_lora_weights.safetensors');
    const kohya = join(root, 'test/fixtures/goldens/lora-kohya/tiny_sd_kohya_lora.safetensors');
    const r = spawnSync(process.execPath, ['--import', 'tsx', 'examples/generate.ts', `--model=${tinySd}`, `--lora=${lora}:0.5`, `--lora=${kohya}`,
      '--steps=2', '--scheduler=euler', `--output=${output}`], { cwd: root, encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain('step 2/2');
    expect(r.stdout).toContain('adapters: lora0, lora1');
    const meta = await sharp(output).metadata();
    expect([meta.format, meta.width, meta.height]).toEqual(['png', 64, 64]);
  });
});
