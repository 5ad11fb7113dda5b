// Inference on small-sd (random weights from its configs, the real CLIP tokenizer of tiny-sd):
//  1. seconds per image, 64×64 latents (512×512 pixels), PNDM, CFG 7.5, fp32 and bf16;
//  2. LoRA load time for a diffusers file with 128 layers (small-sd has SD 1.5's 16 transformer blocks ×
//     to_q/to_k/to_v/to_out.0), and memory across 100 load/unload cycles.
// node bench/pipeline.mjs [threads] [steps] [cases]   — after `npm run build:ts`. One JSON line per case.
// cases: comma-separated of fp32, fp32-me (memory-efficient attention), bf16, lora (default: fp32,bf16,lora);
// each line carries the process's peak RSS so far: run fp32 and fp32-me in separate processes to compare it.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  torch, AutoencoderKL, CLIPTextModel, CLIPTokenizer, UNet2DConditionModel, StableDiffusionPipeline, attachLora, unloadLoraWeights,
  saveLoraWeights, schedulerFromConfig,
} from '../dist/index.js';

const threads = Number(process.argv[2] ?? 2);
const steps = Number(process.argv[3] ?? 10);
const cases = (process.argv[4] ?? 'fp32,bf16,lora').split(',');
const peakMiB = () => +(process.resourceUsage().maxRSS / 1024).toFixed(0);
torch.setNumThreads(threads);
const here = dirname(fileURLToPath(import.meta.url));
const dir = join(here, 'fixtures/small-sd');
const cfg = (sub, file = 'config.json') => JSON.parse(readFileSync(join(dir, sub, file), 'utf8'));

torch.manualSeed(0);
const unet = UNet2DConditionModel.fromConfig(cfg('unet')).eval().requiresGrad_(false);
const pipe = new StableDiffusionPipeline({
  unet,
  vae: new AutoencoderKL(cfg('vae')).eval().requiresGrad_(false),
  textEncoder: new CLIPTextModel(cfg('text_encoder')).eval().requiresGrad_(false),
  tokenizer: CLIPTokenizer.fromPretrained(join(here, '..', 'test', 'fixtures', 'tiny-sd'), { subfolder: 'tokenizer' }),
  scheduler: schedulerFromConfig('pndm', cfg('scheduler', 'scheduler_config.json')),
});

// 1. seconds per image
const generateCases = { fp32: ['float32', false], 'fp32-me': ['float32', true], bf16: ['bfloat16', false] };
for (const [name, [dtype, memoryEfficient]] of Object.entries(generateCases)) {
  if (!cases.includes(name)) continue;
  pipe.to({ dtype });
  pipe.enableMemoryEfficientAttention(memoryEfficient);
  const run = async () => {
    const t0 = process.hrtime.bigint();
    let unetSteps = 0;
    await pipe.generate({ prompt: 'a pokemon with blue eyes', numInferenceSteps: steps, height: 512, width: 512, seed: 0, outputType: 'png', callbackOnStepEnd: () => { unetSteps++; } });
    return { s: Number(process.hrtime.bigint() - t0) / 1e9, unetSteps };
  };
  await run(); // warm-up
  const { s, unetSteps } = await run();
  console.log(JSON.stringify({ case: 'generate 512x512 (64x64 latents), CFG 7.5, PNDM', dtype, memoryEfficient, peak_rss_mib: peakMiB(), threads, inference_steps: steps, unet_evaluations: unetSteps, seconds_per_image: +s.toFixed(2), seconds_per_step: +(s / unetSteps).toFixed(3) }));
}
pipe.to({ dtype: 'float32' });
pipe.enableMemoryEfficientAttention(false);
if (!cases.includes('lora')) process.exit(0);

// 2. a 128-layer LoRA file, loaded and unloaded 100 times
const tmp = mkdtempSync(join(tmpdir(), 'difflora-bench-'));
attachLora(unet, { rank: 4 });
const file = saveLoraWeights(tmp, unet);
unloadLoraWeights(unet);
const once = () => {
  const t0 = process.hrtime.bigint();
  const r = pipe.loadLoraWeights(file);
  const t1 = process.hrtime.bigint();
  pipe.unloadLoraWeights();
  return { layers: r.unetLayers, loadMs: Number(t1 - t0) / 1e6, unloadMs: Number(process.hrtime.bigint() - t1) / 1e6 };
};
for (let i = 0; i < 5; i++) once();
const before = { tensors: torch.memory().numTensors, rss: process.memoryUsage().rss };
const times = [];
let layers = 0;
for (let i = 0; i < 100; i++) { const r = once(); times.push(r.loadMs); layers = r.layers; }
const after = { tensors: torch.memory().numTensors, rss: process.memoryUsage().rss };
times.sort((a, b) => a - b);
console.log(JSON.stringify({
  case: 'loadLoraWeights + unloadLoraWeights × 100', layers, load_ms_median: +times[50].toFixed(2), load_ms_max: +times[99].toFixed(2),
  live_tensors_before: before.tensors, live_tensors_after: after.tensors, rss_growth_mib: +((after.rss - before.rss) / 2 ** 20).toFixed(1),
}));
rmSync(tmp, { recursive: true, force: true });
pipe.dispose();
