// --cache_latents / --cache_latents_to_disk (issue #19): a cached run equals the uncached run bit for bit on CPU
// (losses and the saved LoRA) for train, train-sdxl and train-dreambooth; random crops are refused; the disk cache
// is re-read by a later run (no VAE encode), and a truncated or stale file is detected and recomputed.
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { parquetWriteBuffer } from 'hyparquet-writer';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { main } from '../lib/cli/main.js';
import { parseDreamBoothArgs } from '../lib/cli/dreambooth_args.js';
import { parseTrainArgs } from '../lib/cli/train_args.js';
import { parseSdxlTrainArgs } from '../lib/cli/train_sdxl_args.js';
import { TrainOptionsError, validateTrainOptions } from '../lib/training/options.js';
import { LATENT_CACHE_DIR, LATENT_CACHE_SUFFIX, latentCacheStats } from '../lib/training/latent_cache.js';
import { runTraining, type TrainOptions } from '../lib/training/train.js';
import { runSdxlTraining } from '../lib/training/train_sdxl.js';
import { runDreamBoothTraining } from '../lib/training/train_dreambooth.js';
import { fixtures } from './helpers.js';

let tmp: string;
let data: string;
beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-cache-'));
  data = join(tmp, 'data');
  mkdirSync(data);
  const lines: string[] = [];
  for (let i = 0; i < 5; i++) {
    // non-square and non-uniform, so the crop and the flip change the pixels
    const w = 40 + 3 * i, h = 36;
    const raw = Buffer.alloc(w * h * 3);
    for (let p = 0; p < w * h; p++) { raw[3 * p] = (p * (7 + i)) % 256; raw[3 * p + 1] = (p % w) * 5; raw[3 * p + 2] = 40 * i; }
    await sharp(raw, { raw: { width: w, height: h, channels: 3 } }).png().toFile(join(data, `${i}.png`));
    lines.push(JSON.stringify({ file_name: `${i}.png`, text: i % 2 ? `a picture number ${i}` : [`a photo ${i}`, `an image ${i}`] }));
  }
  writeFileSync(join(data, 'metadata.jsonl'), lines.join('\n'));
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const lossesOf = (dir: string) => readFileSync(join(dir, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => (JSON.parse(l) as { loss: number }).loss);
const loraBytes = (dir: string) => readFileSync(join(dir, 'pytorch_lora_weights.safetensors'));

const sd = (outputDir: string, more: Partial<TrainOptions> = {}): TrainOptions => ({
  pretrainedModelNameOrPath: join(fixtures, 'tiny-sd'), trainDataDir: data, outputDir, resolution: 32, centerCrop: true, randomFlip: true,
  trainBatchSize: 2, maxTrainSteps: 5, learningRate: 1e-3, seed: 11, checkpointingSteps: null, device: 'cpu', reportTo: null, ...more,
});

describe('--cache_latents', () => {
  it('train: a cached run equals the uncached run bit for bit (losses, LoRA), both flips cached, the VAE freed', async () => {
    const plain = join(tmp, 'sd-plain');
    const cached = join(tmp, 'sd-cached');
    await runTraining(sd(plain));
    const notices: string[] = [];
    const before = latentCacheStats.encodes;
    await runTraining(sd(cached, { cacheLatents: true }), { onNotice: (m) => notices.push(m) });
    expect(latentCacheStats.encodes - before).toBe(10); // 5 images × (unflipped, flipped)
    expect(notices).toContain('caching latents 5/5');
    expect(lossesOf(cached)).toEqual(lossesOf(plain));
    expect(loraBytes(cached).equals(loraBytes(plain))).toBe(true);
  });

  it('refuses a random crop (naming --cache_latents and --center_crop) and a training text encoder with --cache_text_embeddings', async () => {
    expect(() => validateTrainOptions({ ...sd(join(tmp, 'x')), centerCrop: false, cacheLatents: true })).toThrow(TrainOptionsError);
    expect(() => validateTrainOptions({ ...sd(join(tmp, 'x')), centerCrop: false, cacheLatents: true })).toThrow(/cacheLatents \(--cache_latents\) needs centerCrop \(--center_crop\)/);
    const err: string[] = [];
    const io = { stdout: { write: () => true }, stderr: { write: (s: string) => { err.push(s); return true; } } } as unknown as Parameters<typeof main>[1];
    const code = await main(['train', `--pretrained_model_name_or_path=${join(fixtures, 'tiny-sd')}`, `--train_data_dir=${data}`, '--cache_latents_to_disk', `--output_dir=${join(tmp, 'refused')}`], io);
    expect(code).toBe(2);
    expect(err.join('')).toMatch(/--cache_latents_to_disk needs --center_crop/);
    expect(() => readdirSync(join(tmp, 'refused'))).toThrow();
  });

  it('the three commands take the flags (library options set only when given) and refuse them without --center_crop', () => {
    const sdxl = ['--pretrained_model_name_or_path=m', '--train_data_dir=d'];
    expect(parseSdxlTrainArgs([...sdxl, '--center_crop', '--cache_latents', '--cache_text_embeddings']).options).toMatchObject({ cacheLatents: true, cacheTextEmbeddings: true });
    expect(parseSdxlTrainArgs(sdxl).options).not.toHaveProperty('cacheLatents');
    expect(() => parseSdxlTrainArgs([...sdxl, '--cache_latents'])).toThrow(/--cache_latents needs --center_crop/);
    expect(() => parseSdxlTrainArgs([...sdxl, '--train_text_encoder', '--cache_text_embeddings'])).toThrow(/--cache_text_embeddings cannot be used with --train_text_encoder/);
    const db = ['--pretrained_model_name_or_path=m', '--instance_data_dir=d', '--instance_prompt=p'];
    expect(parseDreamBoothArgs([...db, '--center_crop', '--cache_latents_to_disk']).options).toMatchObject({ cacheLatentsToDisk: true });
    expect(() => parseDreamBoothArgs([...db, '--cache_latents'])).toThrow(/--cache_latents needs --center_crop/);
    const sd = ['--pretrained_model_name_or_path=m', '--train_data_dir=d'];
    expect(parseTrainArgs([...sd, '--center_crop', '--cache_latents', '--cache_text_embeddings'])).toMatchObject({ cacheLatents: true, cacheTextEmbeddings: true });
    expect(parseTrainArgs(sd)).not.toHaveProperty('cacheLatents');
  });

  it('train-sdxl: cached equals uncached bit for bit (flip before crop, time ids from the cached views)', async () => {
    const base = {
      pretrainedModelNameOrPath: join(fixtures, 'tiny-sdxl'), trainDataDir: data, resolution: 32, centerCrop: true, randomFlip: true,
      trainBatchSize: 2, maxTrainSteps: 3, learningRate: 1e-3, seed: 5, checkpointingSteps: null, device: 'cpu', reportTo: null,
    };
    await runSdxlTraining({ ...base, outputDir: join(tmp, 'xl-plain') });
    await runSdxlTraining({ ...base, outputDir: join(tmp, 'xl-cached'), cacheLatents: true });
    expect(lossesOf(join(tmp, 'xl-cached'))).toEqual(lossesOf(join(tmp, 'xl-plain')));
    expect(loraBytes(join(tmp, 'xl-cached')).equals(loraBytes(join(tmp, 'xl-plain')))).toBe(true);
  });

  it('train-dreambooth: cached equals uncached bit for bit with prior preservation (instance and class images cached)', async () => {
    const classes = join(tmp, 'classes');
    mkdirSync(classes);
    for (let i = 0; i < 2; i++) await sharp({ create: { width: 36, height: 40, channels: 3, background: { r: 90 * i, g: 30, b: 200 } } }).png().toFile(join(classes, `c${i}.png`));
    const base = {
      pretrainedModelNameOrPath: join(fixtures, 'tiny-sd'), instanceDataDir: data, instancePrompt: 'a photo of sks thing', resolution: 32, centerCrop: true,
      withPriorPreservation: true, classDataDir: classes, classPrompt: 'a photo of a thing', numClassImages: 2,
      trainBatchSize: 2, maxTrainSteps: 3, learningRate: 1e-3, seed: 3, checkpointingSteps: null, device: 'cpu', reportTo: null,
    };
    await runDreamBoothTraining({ ...base, outputDir: join(tmp, 'db-plain') });
    await runDreamBoothTraining({ ...base, outputDir: join(tmp, 'db-cached'), cacheLatents: true });
    expect(lossesOf(join(tmp, 'db-cached'))).toEqual(lossesOf(join(tmp, 'db-plain')));
    expect(loraBytes(join(tmp, 'db-cached')).equals(loraBytes(join(tmp, 'db-plain')))).toBe(true);
  });
});

describe('--cache_latents_to_disk', () => {
  it('writes one file per image, a second run re-reads them (no encode), a truncated or stale file is recomputed, all runs equal', async () => {
    const files = () => readdirSync(data).filter((f) => f.endsWith(LATENT_CACHE_SUFFIX)).sort();
    const first = join(tmp, 'disk-1');
    let before = latentCacheStats.encodes;
    await runTraining(sd(first, { cacheLatentsToDisk: true }));
    expect(latentCacheStats.encodes - before).toBe(10);
    expect(files()).toEqual([0, 1, 2, 3, 4].map((i) => `${i}.png${LATENT_CACHE_SUFFIX}`));
    const mtimes = files().map((f) => statSync(join(data, f)).mtimeMs);

    // second run: every file re-read, nothing encoded, nothing rewritten
    before = latentCacheStats.encodes;
    const second = join(tmp, 'disk-2');
    await runTraining(sd(second, { cacheLatentsToDisk: true }));
    expect(latentCacheStats.encodes - before).toBe(0);
    expect(files().map((f) => statSync(join(data, f)).mtimeMs)).toEqual(mtimes);
    expect(lossesOf(second)).toEqual(lossesOf(first));

    // a truncated file (as a kill mid-write of a non-atomic writer would leave) and garbage: detected, recomputed
    const f0 = join(data, files()[0]!);
    writeFileSync(f0, readFileSync(f0).subarray(0, 100));
    writeFileSync(join(data, files()[1]!), 'garbage');
    before = latentCacheStats.encodes;
    const third = join(tmp, 'disk-3');
    await runTraining(sd(third, { cacheLatentsToDisk: true }));
    expect(latentCacheStats.encodes - before).toBe(4); // two images × two flips
    expect(lossesOf(third)).toEqual(lossesOf(first));

    // another view (no flip: the key differs) is recomputed, never reused
    before = latentCacheStats.encodes;
    await runTraining(sd(join(tmp, 'disk-4'), { cacheLatentsToDisk: true, randomFlip: false }));
    expect(latentCacheStats.encodes - before).toBe(5);
    // and another resolution
    before = latentCacheStats.encodes;
    await runTraining(sd(join(tmp, 'disk-5'), { cacheLatentsToDisk: true, randomFlip: false, resolution: 24 }));
    expect(latentCacheStats.encodes - before).toBe(5);
    for (const f of files()) rmSync(join(data, f));
  });

  it('a parquet dataset (--dataset_name) keeps its files in a folder of the dataset, named by image hash, re-read by the next run', async () => {
    const images = await Promise.all([[250, 10, 10], [10, 250, 10], [10, 10, 250]].map(async ([r, g, b], i) =>
      new Uint8Array(await sharp({ create: { width: 40 + i, height: 36, channels: 3, background: { r: r!, g: g!, b: b! } } }).png().toBuffer())));
    const root = join(tmp, 'pq');
    mkdirSync(join(root, 'data'), { recursive: true });
    const buf = parquetWriteBuffer({
      columnData: [
        { name: 'image', data: images.map((bytes) => ({ bytes, path: null })) },
        { name: 'text', data: ['a red thing', 'a green thing', 'a blue thing'] },
      ],
      schema: [
        { name: 'root', num_children: 2 },
        { name: 'image', repetition_type: 'OPTIONAL', num_children: 2 },
        { name: 'bytes', type: 'BYTE_ARRAY', repetition_type: 'OPTIONAL' },
        { name: 'path', type: 'BYTE_ARRAY', converted_type: 'UTF8', repetition_type: 'OPTIONAL' },
        { name: 'text', type: 'BYTE_ARRAY', converted_type: 'UTF8', repetition_type: 'OPTIONAL' },
      ],
    });
    writeFileSync(join(root, 'data', 'train-00000-of-00001.parquet'), new Uint8Array(buf));
    const o = (out: string) => sd(out, { trainDataDir: null, datasetName: root, cacheLatentsToDisk: true, maxTrainSteps: 2 });
    let before = latentCacheStats.encodes;
    await runTraining(o(join(tmp, 'pq-1')));
    expect(latentCacheStats.encodes - before).toBe(6);
    expect(readdirSync(join(root, LATENT_CACHE_DIR)).filter((f) => /^[0-9a-f]{64}\.difflora_latents\.safetensors$/.test(f))).toHaveLength(3);
    before = latentCacheStats.encodes;
    await runTraining(o(join(tmp, 'pq-2')));
    expect(latentCacheStats.encodes - before).toBe(0); // the images' temporary paths differ from run to run; their bytes do not
    expect(lossesOf(join(tmp, 'pq-2'))).toEqual(lossesOf(join(tmp, 'pq-1')));
  });

  it('--skip_broken_images: an unreadable image is left out of the cache and skipped and counted as without caching', async () => {
    const dir = join(tmp, 'with-broken');
    mkdirSync(dir);
    for (let i = 0; i < 3; i++) await sharp({ create: { width: 40, height: 36, channels: 3, background: { r: 80 * i, g: 10, b: 10 } } }).png().toFile(join(dir, `${i}.png`));
    writeFileSync(join(dir, 'broken.png'), 'not a png');
    writeFileSync(join(dir, 'metadata.jsonl'), ['0', '1', '2', 'broken'].map((n) => JSON.stringify({ file_name: `${n}.png`, text: `picture ${n}` })).join('\n'));
    const o = (out: string, cacheLatents: boolean) => sd(out, { trainDataDir: dir, skipBrokenImages: true, maxTrainSteps: 3, cacheLatents });
    const plain = await runTraining(o(join(tmp, 'broken-plain'), false));
    const cached = await runTraining(o(join(tmp, 'broken-cached'), true));
    expect(cached.skippedImages).toEqual(plain.skippedImages);
    expect(cached.skippedImages.count).toBeGreaterThan(0);
    expect(lossesOf(join(tmp, 'broken-cached'))).toEqual(lossesOf(join(tmp, 'broken-plain')));
    await expect(runTraining({ ...o(join(tmp, 'broken-refused'), true), skipBrokenImages: false })).rejects.toThrow(/broken\.png/);
  });
});
