// --cache_latents' effect (run by hand, not a test): `runTraining` on small-sd (random weights from
// ../shared/fixtures/small-sd's configs) at 128 px, batch 4, --center_crop --random_flip, with and without
// --cache_latents, each in a fresh child process.
//   node --import tsx bench/cache_latents.mjs [steps=8] [warmup=2] [images=16]
// Prints one JSON line per configuration: steps/s over the steps after the warm-up (metrics.jsonl's step times), the
// caching time, the CPU allocator's bytes in use at the last step (what training holds: the VAE is gone when cached),
// the allocator's peak and the process's peak RSS; then the ratios.
import { spawn } from 'node:child_process';
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import sharp from 'sharp';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');

if (process.argv[2] === '--child') {
  // one configuration in this process: { model, data, out, steps, cache }
  const c = JSON.parse(process.argv[3]);
  const { runTraining } = await import('../lib/training/train.ts');
  const { memory } = await import('../lib/scope.ts');
  let held = 0;
  let cachingStarted = 0;
  let cachingSeconds = 0;
  const t0 = Date.now();
  await runTraining({
    pretrainedModelNameOrPath: c.model, trainDataDir: c.data, outputDir: c.out, resolution: 128, centerCrop: true, randomFlip: true,
    trainBatchSize: 4, maxTrainSteps: c.steps, checkpointingSteps: null, seed: 0, device: 'cpu', reportTo: null, cacheLatents: c.cache,
  }, {
    onNotice: (m) => {
      if (m.startsWith('caching latents 1/')) cachingStarted = Date.now();
      const done = /^caching latents (\d+)\/(\d+)/.exec(m);
      if (done && done[1] === done[2]) cachingSeconds = (Date.now() - cachingStarted) / 1000;
    },
    onProgress: () => { held = memory().cpu.allocatedBytes; },
  });
  const m = memory().cpu;
  console.log(JSON.stringify({ heldBytesAtLastStep: held, peakAllocatedBytes: m.peakAllocatedBytes, maxRssBytes: process.resourceUsage().maxRSS * 1024, cachingSeconds, totalSeconds: (Date.now() - t0) / 1000 }));
  process.exit(0);
}

const steps = Number(process.argv[2] ?? 8);
const warmup = Number(process.argv[3] ?? 2);
const images = Number(process.argv[4] ?? 16);
const smallSd = process.env.SMALL_SD ?? join(root, '..', 'shared', 'fixtures', 'small-sd');
const tmp = mkdtempSync(join(tmpdir(), 'difflora-bench-cache-'));

/** small-sd's configs and tokenizer with random weights (the fixture has no weights). */
async function writeModel(dir) {
  const { AutoencoderKL, CLIPTextModel, UNet2DConditionModel, saveSafetensors, torch } = await import('../lib/index.ts');
  cpSync(smallSd, dir, { recursive: true });
  const cfg = (sub) => JSON.parse(readFileSync(join(dir, sub, 'config.json'), 'utf8'));
  torch.manualSeed(0);
  for (const [sub, stem, model] of [
    ['unet', 'diffusion_pytorch_model', UNet2DConditionModel.fromConfig(cfg('unet'))],
    ['vae', 'diffusion_pytorch_model', new AutoencoderKL(cfg('vae'))],
    ['text_encoder', 'model', new CLIPTextModel(cfg('text_encoder'))],
  ]) {
    saveSafetensors(join(dir, sub, `${stem}.safetensors`), model.stateDict(), { format: 'pt' });
    model.dispose();
  }
}

async function writeData(dir, n) {
  mkdirSync(dir, { recursive: true });
  const lines = [];
  for (let i = 0; i < n; i++) {
    const [w, h] = [160 + (i % 5) * 8, 144 + (i % 3) * 8];
    const raw = Buffer.alloc(w * h * 3);
    for (let p = 0; p < w * h; p++) raw.set([(p * 7 + i * 31) % 256, ((p % w) * 3) % 256, (Math.floor(p / w) * 5 + i) % 256], 3 * p);
    await sharp(raw, { raw: { width: w, height: h, channels: 3 } }).png().toFile(join(dir, `${i}.png`));
    lines.push(JSON.stringify({ file_name: `${i}.png`, text: `a benchmark picture number ${i}` }));
  }
  writeFileSync(join(dir, 'metadata.jsonl'), lines.join('\n'));
}

function child(config) {
  const p = spawn(process.execPath, ['--import', 'tsx', fileURLToPath(import.meta.url), '--child', JSON.stringify(config)], { cwd: root, stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  p.stdout.setEncoding('utf8').on('data', (s) => { out += s; });
  return new Promise((resolve, reject) => {
    p.on('error', reject);
    p.on('close', (code) => (code === 0 ? resolve(JSON.parse(out.trim().split('\n').at(-1))) : reject(new Error(`child exited ${code}`))));
  });
}

/** Steps/s between the end of step `warmup` and the last step, from metrics.jsonl's per-step times. */
function stepsPerSecond(out) {
  const lines = readFileSync(join(out, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
  return (lines.length - warmup) / (lines.at(-1).time - lines[warmup - 1].time);
}

try {
  const model = join(tmp, 'small-sd');
  const data = join(tmp, 'data');
  await writeModel(model);
  await writeData(data, images);
  const results = {};
  for (const cache of [false, true]) {
    const out = join(tmp, cache ? 'cached' : 'plain');
    const r = await child({ model, data, out, steps: steps + warmup, cache });
    results[cache ? 'cached' : 'plain'] = { ...r, stepsPerSecond: stepsPerSecond(out) };
    console.log(JSON.stringify({ cacheLatents: cache, resolution: 128, batch: 4, steps, warmup, images, ...results[cache ? 'cached' : 'plain'], cpu: cpus()[0]?.model, cores: cpus().length }));
  }
  const { plain, cached } = results;
  console.log(JSON.stringify({
    stepsPerSecondRatio: +(cached.stepsPerSecond / plain.stepsPerSecond).toFixed(3),
    heldBytesSaved: plain.heldBytesAtLastStep - cached.heldBytesAtLastStep,
    peakRssRatio: +(cached.maxRssBytes / plain.maxRssBytes).toFixed(3),
  }));
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
