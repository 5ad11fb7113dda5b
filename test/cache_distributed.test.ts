// Caching with data-parallel `train` (2 Gloo processes through `difflora launch`): each process caches every image
// (both write the same disk cache files, atomically), and the run equals the uncached 2-process run bit for bit; the
// CLI shows the caching progress line. Checkpoint/resume stays exact with caching on (the cache is rebuilt or re-read,
// never checkpointed), and a run aborted mid-caching leaves whole files that the next run re-reads.
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LATENT_CACHE_SUFFIX, latentCacheStats } from '../lib/training/latent_cache.js';
import { runTraining, type TrainOptions } from '../lib/training/train.js';
import { freePort, runCli, spawnCli, tinySd } from './cli_helpers.js';

let tmp: string;
let data: string;
beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-cache-dist-'));
  data = join(tmp, 'data');
  mkdirSync(data);
  const lines: string[] = [];
  for (let i = 0; i < 4; i++) {
    const w = 40 + 3 * i, h = 36 + i;
    const raw = Buffer.alloc(w * h * 3);
    for (let p = 0; p < w * h; p++) { raw[3 * p] = (p * 3 + 40 * i) % 256; raw[3 * p + 1] = (p % w) * 6; raw[3 * p + 2] = (p % 7) * 30; }
    await sharp(raw, { raw: { width: w, height: h, channels: 3 } }).png().toFile(join(data, `${i}.png`));
    lines.push(JSON.stringify({ file_name: `${i}.png`, text: `a striped picture number ${i}` }));
  }
  writeFileSync(join(data, 'metadata.jsonl'), lines.join('\n'));
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const losses = (out: string): number[] => readFileSync(join(out, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => (JSON.parse(l) as { loss: number }).loss);
const loraBytes = (dir: string) => readFileSync(join(dir, 'pytorch_lora_weights.safetensors'));

describe('caching with 2 processes and with resume', () => {
  it('2 processes × batch 1 with --cache_latents_to_disk equal the uncached 2-process run bit for bit', async () => {
    const args = (out: string, ...more: string[]) => ['launch', '--num_processes', '2', '--main_process_port', String(0), '--timeout', '30',
      'train', `--pretrained_model_name_or_path=${tinySd}`, `--train_data_dir=${data}`, '--resolution=32', '--center_crop', '--random_flip',
      '--train_batch_size=1', '--max_train_steps=3', '--learning_rate=1e-3', '--seed=77', `--output_dir=${out}`, ...more];
    const withPort = async (a: string[]) => { a[4] = String(await freePort()); return runCli(a); };
    const plain = await withPort(args(join(tmp, 'dp-plain')));
    expect(plain.code, plain.stderr).toBe(0);
    const cached = await withPort(args(join(tmp, 'dp-cached'), '--cache_latents_to_disk'));
    expect(cached.code, cached.stderr).toBe(0);
    expect(cached.stdout + cached.stderr).toMatch(/caching latents 4\/4 \(to disk\)/);
    expect(readdirSync(data).filter((f) => f.endsWith(LATENT_CACHE_SUFFIX))).toHaveLength(4);
    expect(losses(join(tmp, 'dp-cached'))).toEqual(losses(join(tmp, 'dp-plain')));
    expect(loraBytes(join(tmp, 'dp-cached')).equals(loraBytes(join(tmp, 'dp-plain')))).toBe(true);
    for (const f of readdirSync(data).filter((f) => f.endsWith(LATENT_CACHE_SUFFIX))) rmSync(join(data, f));
  });

  it('a resumed cached run ends bit-identical to an uninterrupted one; a run aborted mid-caching leaves whole files the next run re-reads', async () => {
    const o = (outputDir: string, more: Partial<TrainOptions> = {}): TrainOptions => ({
      pretrainedModelNameOrPath: tinySd, trainDataDir: data, outputDir, resolution: 32, centerCrop: true, randomFlip: true, trainBatchSize: 2,
      maxTrainSteps: 4, learningRate: 1e-3, seed: 9, checkpointingSteps: 2, device: 'cpu', reportTo: null, cacheLatentsToDisk: true, ...more,
    });
    // aborted after the first image is cached: its file is whole, the others absent
    const abort = new AbortController();
    await expect(runTraining(o(join(tmp, 'aborted')), { signal: abort.signal, onNotice: (m) => { if (m.startsWith('caching latents 1/')) abort.abort(); } })).rejects.toThrow(/aborted/);
    expect(readdirSync(data).filter((f) => f.endsWith(LATENT_CACHE_SUFFIX))).toHaveLength(1);
    let before = latentCacheStats.encodes;
    const straight = join(tmp, 'straight');
    await runTraining(o(straight));
    expect(latentCacheStats.encodes - before).toBe(6); // the 3 images left × 2 flips; the first one's file re-read

    const broken = join(tmp, 'resumed');
    const stop = new AbortController();
    await expect(runTraining(o(broken), { signal: stop.signal, onProgress: (p) => { if (p.step === 2) stop.abort(); } })).rejects.toThrow(/aborted/);
    before = latentCacheStats.encodes;
    await runTraining(o(broken, { resumeFromCheckpoint: 'latest' }));
    expect(latentCacheStats.encodes - before).toBe(0);
    expect(loraBytes(broken).equals(loraBytes(straight))).toBe(true);
    expect(losses(broken).slice(-2)).toEqual(losses(straight).slice(-2));

    // in memory (--cache_latents): resumed equals uninterrupted too
    const memStraight = join(tmp, 'mem-straight');
    await runTraining(o(memStraight, { cacheLatentsToDisk: false, cacheLatents: true }));
    expect(loraBytes(memStraight).equals(loraBytes(straight))).toBe(true);
    const memBroken = join(tmp, 'mem-resumed');
    const stop2 = new AbortController();
    await expect(runTraining(o(memBroken, { cacheLatentsToDisk: false, cacheLatents: true }), { signal: stop2.signal, onProgress: (p) => { if (p.step === 2) stop2.abort(); } })).rejects.toThrow(/aborted/);
    await runTraining(o(memBroken, { cacheLatentsToDisk: false, cacheLatents: true, resumeFromCheckpoint: 'latest' }));
    expect(loraBytes(memBroken).equals(loraBytes(straight))).toBe(true);
  });

  it('a SIGKILL while caching to disk leaves only whole files (no half-written one read as valid); the next run encodes only the rest', async () => {
    const many = join(tmp, 'many');
    mkdirSync(many);
    const lines: string[] = [];
    for (let i = 0; i < 40; i++) {
      await sharp({ create: { width: 36 + (i % 4), height: 34, channels: 3, background: { r: (i * 37) % 256, g: (i * 11) % 256, b: 128 } } }).png().toFile(join(many, `${i}.png`));
      lines.push(JSON.stringify({ file_name: `${i}.png`, text: `picture ${i}` }));
    }
    writeFileSync(join(many, 'metadata.jsonl'), lines.join('\n'));
    const { done } = spawnCli(['train', `--pretrained_model_name_or_path=${tinySd}`, `--train_data_dir=${many}`, '--resolution=32', '--center_crop',
      '--cache_latents_to_disk', '--max_train_steps=1', `--output_dir=${join(tmp, 'killed')}`], (chunk, child) => {
      if (chunk.includes('caching latents 1/40')) child.kill('SIGKILL');
    });
    const r = await done;
    expect(r.signal, r.stderr).toBe('SIGKILL');
    const whole = readdirSync(many).filter((f) => f.endsWith(LATENT_CACHE_SUFFIX));
    expect(whole.length).toBeGreaterThanOrEqual(1);
    const rejectedBefore = latentCacheStats.rejected;
    const before = latentCacheStats.encodes;
    await runTraining({
      pretrainedModelNameOrPath: tinySd, trainDataDir: many, outputDir: join(tmp, 'after-kill'), resolution: 32, centerCrop: true, maxTrainSteps: 1,
      checkpointingSteps: null, device: 'cpu', reportTo: null, cacheLatentsToDisk: true,
    });
    expect(latentCacheStats.rejected - rejectedBefore).toBe(0); // every file the killed run left is whole and valid
    expect(latentCacheStats.encodes - before).toBe(40 - whole.length);
    expect(readdirSync(many).filter((f) => f.endsWith(LATENT_CACHE_SUFFIX))).toHaveLength(40);
  });
});
