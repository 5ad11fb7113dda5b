// --cache_text_embeddings (issue #19): each distinct caption encoded once by the frozen text encoder(s), a cached run
// equal to the uncached run bit for bit on CPU for train (captions picked at random from lists), train-sdxl (both
// encoders and the pooled embedding) and train-dreambooth; refused with --train_text_encoder; with --cache_latents
// too, the VAE and the text encoder leave memory (the live tensors during training shrink by their weights).
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { memory } from '../lib/scope.js';
import { ParkedModel } from '../lib/training/cache_run.js';
import { validateDreamBoothOptions } from '../lib/training/dreambooth_options.js';
import { validateSdxlTrainOptions } from '../lib/training/sdxl_options.js';
import { cacheProblems } from '../lib/training/cache_options.js';
import { distinctCaptions, textCacheStats } from '../lib/training/text_cache.js';
import { runTraining, type TrainOptions } from '../lib/training/train.js';
import { runSdxlTraining } from '../lib/training/train_sdxl.js';
import { runDreamBoothTraining } from '../lib/training/train_dreambooth.js';
import { fixtures } from './helpers.js';

let tmp: string;
let data: string;
beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-textcache-'));
  data = join(tmp, 'data');
  mkdirSync(data);
  const lines: string[] = [];
  for (let i = 0; i < 4; i++) {
    await sharp({ create: { width: 40, height: 36, channels: 3, background: { r: 60 * i, g: 200 - 40 * i, b: 90 } } }).png().toFile(join(data, `${i}.png`));
    // lists: one caption picked at random per item and epoch; one caption shared by two items
    lines.push(JSON.stringify({ file_name: `${i}.png`, text: i % 2 ? 'a shared caption' : [`a photo ${i}`, `an image ${i}`, ''] }));
  }
  writeFileSync(join(data, 'metadata.jsonl'), lines.join('\n'));
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const lossesOf = (dir: string) => readFileSync(join(dir, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => (JSON.parse(l) as { loss: number }).loss);
const loraBytes = (dir: string) => readFileSync(join(dir, 'pytorch_lora_weights.safetensors'));

const sd = (outputDir: string, more: Partial<TrainOptions> = {}): TrainOptions => ({
  pretrainedModelNameOrPath: join(fixtures, 'tiny-sd'), trainDataDir: data, outputDir, resolution: 32, centerCrop: true, randomFlip: true,
  trainBatchSize: 2, maxTrainSteps: 6, learningRate: 1e-3, seed: 2, checkpointingSteps: null, device: 'cpu', reportTo: null, ...more,
});

describe('--cache_text_embeddings', () => {
  it('train: cached equals uncached bit for bit; each distinct caption encoded once; with --cache_latents the VAE and text encoder are freed', async () => {
    const live: Record<string, number[]> = { plain: [], cached: [] };
    await runTraining(sd(join(tmp, 'sd-plain')), { onProgress: () => live.plain!.push(memory().cpu.allocatedBytes) });
    const before = textCacheStats.encodes;
    const notices: string[] = [];
    await runTraining(sd(join(tmp, 'sd-cached'), { cacheTextEmbeddings: true, cacheLatents: true }), {
      onNotice: (m) => notices.push(m), onProgress: () => live.cached!.push(memory().cpu.allocatedBytes),
    });
    expect(textCacheStats.encodes - before).toBe(6); // a photo 0/2, an image 0/2, '', a shared caption
    expect(notices).toContain('caching text embeddings 6/6');
    expect(lossesOf(join(tmp, 'sd-cached'))).toEqual(lossesOf(join(tmp, 'sd-plain')));
    expect(loraBytes(join(tmp, 'sd-cached')).equals(loraBytes(join(tmp, 'sd-plain')))).toBe(true);
    // the VAE and the text encoder are gone from the allocator while training (the kept latents and embeddings are far smaller)
    const weightBytes = statSync(join(fixtures, 'tiny-sd', 'vae', 'diffusion_pytorch_model.safetensors')).size + statSync(join(fixtures, 'tiny-sd', 'text_encoder', 'model.safetensors')).size;
    expect(live.plain!.at(-1)! - live.cached!.at(-1)!).toBeGreaterThan(0.9 * weightBytes);
  });

  it('train-sdxl: cached (both encoders, pooled) equals uncached bit for bit, also with --cache_latents', async () => {
    const base = {
      pretrainedModelNameOrPath: join(fixtures, 'tiny-sdxl'), trainDataDir: data, resolution: 32, centerCrop: true, randomFlip: true,
      trainBatchSize: 2, maxTrainSteps: 3, learningRate: 1e-3, seed: 5, checkpointingSteps: null, device: 'cpu', reportTo: null,
    };
    await runSdxlTraining({ ...base, outputDir: join(tmp, 'xl-plain') });
    await runSdxlTraining({ ...base, outputDir: join(tmp, 'xl-cached'), cacheTextEmbeddings: true, cacheLatents: true });
    expect(lossesOf(join(tmp, 'xl-cached'))).toEqual(lossesOf(join(tmp, 'xl-plain')));
    expect(loraBytes(join(tmp, 'xl-cached')).equals(loraBytes(join(tmp, 'xl-plain')))).toBe(true);
  });

  it('train-dreambooth: cached equals uncached bit for bit', async () => {
    const base = {
      pretrainedModelNameOrPath: join(fixtures, 'tiny-sd'), instanceDataDir: data, instancePrompt: 'a photo of sks thing', resolution: 32, centerCrop: true,
      trainBatchSize: 2, maxTrainSteps: 3, learningRate: 1e-3, seed: 3, checkpointingSteps: null, device: 'cpu', reportTo: null,
    };
    await runDreamBoothTraining({ ...base, outputDir: join(tmp, 'db-plain') });
    await runDreamBoothTraining({ ...base, outputDir: join(tmp, 'db-cached'), cacheTextEmbeddings: true, cacheLatents: true });
    expect(lossesOf(join(tmp, 'db-cached'))).toEqual(lossesOf(join(tmp, 'db-plain')));
    expect(loraBytes(join(tmp, 'db-cached')).equals(loraBytes(join(tmp, 'db-plain')))).toBe(true);
  });

  it('is refused with --train_text_encoder, naming both', () => {
    const sdxl = { pretrainedModelNameOrPath: 'x', trainDataDir: data, trainTextEncoder: true, cacheTextEmbeddings: true };
    expect(() => validateSdxlTrainOptions(sdxl)).toThrow(/cacheTextEmbeddings \(--cache_text_embeddings\) cannot be used with trainTextEncoder \(--train_text_encoder\)/);
    const db = { pretrainedModelNameOrPath: 'x', instanceDataDir: data, instancePrompt: 'p', trainTextEncoder: true, cacheTextEmbeddings: true };
    expect(() => validateDreamBoothOptions(db)).toThrow(/--cache_text_embeddings\) cannot be used with trainTextEncoder/);
  });

  it('caption transforms: a shuffled caption is refused (naming both flags); caption dropout adds the empty caption to those cached', () => {
    expect(cacheProblems({ cacheTextEmbeddings: true, shuffleCaption: true }, 'flag')).toEqual([
      '--cache_text_embeddings cannot be used with --shuffle_caption: a shuffled caption differs at every epoch',
    ]);
    expect(cacheProblems({ cacheTextEmbeddings: true, shuffleCaption: false }, 'flag')).toEqual([]);
    const items = [{ captions: ['a', 'b'] }, { captions: ['a'] }];
    expect(distinctCaptions(items)).toEqual(['a', 'b']);
    expect(distinctCaptions(items, { captionDropoutRate: 0.1 })).toEqual(['a', 'b', '']);
  });

  it('ParkedModel: parked on the CPU and brought back around a use on a GPU device; disposed when not kept; a no-op on the CPU', async () => {
    const calls: string[] = [];
    const model = { to: (t: { device: string }) => { calls.push(`to ${t.device}`); }, dispose: () => { calls.push('dispose'); } };
    const kept = new ParkedModel(model, 'cuda:0');
    kept.park(true);
    expect(await kept.use(async () => { calls.push('validate'); return 7; })).toBe(7);
    expect(calls).toEqual(['to cpu', 'to cuda:0', 'validate', 'to cpu']);
    calls.length = 0;
    const gone = new ParkedModel(model, 'cuda:0');
    gone.park(false);
    expect(calls).toEqual(['dispose']);
    await expect(gone.use(async () => 1)).rejects.toThrow(/freed after caching/);
    calls.length = 0;
    const cpu = new ParkedModel(model, 'cpu');
    cpu.park(true);
    await cpu.use(async () => calls.push('validate'));
    expect(calls).toEqual(['validate']);
  });
});
