// --cache_latents with aspect-ratio buckets (issue #19): each item's cached view is the one the bucketed loader gives
// it (its bucket and resize, loader.viewOf), so a cached bucketed run equals the uncached bucketed run bit for bit on
// CPU, for train, train-sdxl and train-dreambooth (whose class images take their instance partner's bucket).
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { latentCacheStats } from '../lib/training/latent_cache.js';
import { runTraining } from '../lib/training/train.js';
import { runSdxlTraining } from '../lib/training/train_sdxl.js';
import { runDreamBoothTraining } from '../lib/training/train_dreambooth.js';
import { fixtures } from './helpers.js';

let tmp: string;
let data: string;
let classes: string;
/** Mixed aspect ratios: at --resolution 32 with 8 px steps they fall into several buckets. */
const SIZES: [number, number][] = [[64, 32], [32, 64], [48, 40], [40, 48], [56, 32], [64, 32]];

async function png(file: string, w: number, h: number, seed: number): Promise<void> {
  const raw = Buffer.alloc(w * h * 3);
  for (let p = 0; p < w * h; p++) { raw[3 * p] = (p * (5 + seed)) % 256; raw[3 * p + 1] = (p % w) * 4; raw[3 * p + 2] = 30 * seed; }
  await sharp(raw, { raw: { width: w, height: h, channels: 3 } }).png().toFile(file);
}

beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-cache-buckets-'));
  data = join(tmp, 'data');
  classes = join(tmp, 'classes');
  mkdirSync(data);
  mkdirSync(classes);
  const lines: string[] = [];
  for (const [i, [w, h]] of SIZES.entries()) {
    await png(join(data, `${i}.png`), w, h, i);
    lines.push(JSON.stringify({ file_name: `${i}.png`, text: `picture ${i}` }));
  }
  writeFileSync(join(data, 'metadata.jsonl'), lines.join('\n'));
  for (let i = 0; i < 3; i++) await png(join(classes, `c${i}.png`), 40 + 8 * i, 40, 7 + i);
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const lossesOf = (dir: string) => readFileSync(join(dir, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => (JSON.parse(l) as { loss: number }).loss);
const loraBytes = (dir: string) => readFileSync(join(dir, 'pytorch_lora_weights.safetensors'));
const BUCKETS = { enableBucket: true, minBucketReso: 16, maxBucketReso: 64, bucketResoSteps: 8 } as const;
const RUN = { resolution: 32, centerCrop: true, trainBatchSize: 2, learningRate: 1e-3, checkpointingSteps: null, device: 'cpu', reportTo: null } as const;

/** Runs `train` twice (uncached, cached) and expects equal losses and LoRA, and at least one encode per view. */
async function expectCachedEqualsPlain(name: string, run: (outputDir: string, cached: boolean) => Promise<unknown>, views: number): Promise<void> {
  const plain = join(tmp, `${name}-plain`);
  const cached = join(tmp, `${name}-cached`);
  await run(plain, false);
  const before = latentCacheStats.encodes;
  await run(cached, true);
  expect(latentCacheStats.encodes - before).toBe(views);
  expect(lossesOf(cached)).toEqual(lossesOf(plain));
  expect(loraBytes(cached).equals(loraBytes(plain))).toBe(true);
}

describe('--cache_latents with --enable_bucket', () => {
  it('train: cached equals uncached bit for bit; each image cached at its bucket, both flips', async () => {
    const notices: string[] = [];
    await expectCachedEqualsPlain('sd', (outputDir, cacheLatents) => runTraining({
      pretrainedModelNameOrPath: join(fixtures, 'tiny-sd'), trainDataDir: data, outputDir, randomFlip: true, maxTrainSteps: 4, seed: 3, ...RUN, ...BUCKETS, cacheLatents,
    }, { onNotice: (m) => notices.push(m) }), 2 * SIZES.length); // every image, unflipped and flipped
    expect(notices.some((n) => /bucket/i.test(n))).toBe(true);
  });

  it('train-sdxl: cached equals uncached bit for bit (time ids from the bucketed views)', async () => {
    await expectCachedEqualsPlain('xl', (outputDir, cacheLatents) => runSdxlTraining({
      pretrainedModelNameOrPath: join(fixtures, 'tiny-sdxl'), trainDataDir: data, outputDir, randomFlip: false, maxTrainSteps: 3, seed: 4, ...RUN, ...BUCKETS, cacheLatents,
    }), SIZES.length);
  });

  it("train-dreambooth: cached equals uncached bit for bit with prior preservation (class images at their partner's bucket)", async () => {
    const views = await (async () => {
      const before = latentCacheStats.encodes;
      await runDreamBoothTraining({
        pretrainedModelNameOrPath: join(fixtures, 'tiny-sd'), instanceDataDir: data, instancePrompt: 'a photo of sks thing', outputDir: join(tmp, 'db-count'),
        withPriorPreservation: true, classDataDir: classes, classPrompt: 'a photo of a thing', numClassImages: 3, maxTrainSteps: 1, seed: 5, ...RUN, ...BUCKETS, cacheLatents: true,
      });
      return latentCacheStats.encodes - before;
    })();
    expect(views).toBeGreaterThanOrEqual(SIZES.length + 3); // every instance image, and every class image at least once (a class image can pair with several buckets)
    await expectCachedEqualsPlain('db', (outputDir, cacheLatents) => runDreamBoothTraining({
      pretrainedModelNameOrPath: join(fixtures, 'tiny-sd'), instanceDataDir: data, instancePrompt: 'a photo of sks thing', outputDir,
      withPriorPreservation: true, classDataDir: classes, classPrompt: 'a photo of a thing', numClassImages: 3, maxTrainSteps: 3, seed: 5, ...RUN, ...BUCKETS, cacheLatents,
    }), views);
  });
});
