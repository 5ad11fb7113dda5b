// One full LoRA training step on small-sd (random weights from its configs), as train_text_to_image_lora.py:
// VAE encode + text encoder (frozen, noGrad) + UNet forward/backward with LoRA r=4 + clip + AdamW.
// node bench/train_step.mjs [threads] [device]   — after `npm run build:ts`. Median of 10 steps after 3 warm-up,
// the protocol of ../shared/fixtures/reference-bench.json (whose numbers are the Python reference's).
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  torch, AutoencoderKL, CLIPTextModel, UNet2DConditionModel, DDPMScheduler, attachLora, AdamW, loraTrainingStep, optimizerStep,
} from '../dist/index.js';

const threads = Number(process.argv[2] ?? 2);
const device = process.argv[3] ?? 'cpu';
torch.setNumThreads(threads);
const dir = join(dirname(fileURLToPath(import.meta.url)), 'fixtures/small-sd');
const cfg = (sub, file = 'config.json') => JSON.parse(readFileSync(join(dir, sub, file), 'utf8'));

torch.manualSeed(0);
const vae = new AutoencoderKL(cfg('vae')).to({ device }).eval().requiresGrad_(false);
const textEncoder = new CLIPTextModel(cfg('text_encoder')).to({ device }).eval().requiresGrad_(false);
const unet = UNet2DConditionModel.fromConfig(cfg('unet')).to({ device }).requiresGrad_(false);
const scheduler = DDPMScheduler.fromConfig(cfg('scheduler', 'scheduler_config.json'));
const lora = attachLora(unet, { rank: 4 });
unet.train();
const params = lora.parameters();
const count = (m) => m.parameters().reduce((n, p) => n + p.numel(), 0);
console.error(JSON.stringify({ params: { unet: count(unet) - params.reduce((n, p) => n + p.numel(), 0), lora: params.reduce((n, p) => n + p.numel(), 0), vae: count(vae), text_encoder: count(textEncoder) } }));

function median(xs) { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; }

for (const mixedPrecision of ['no', 'bf16']) {
  for (const resolution of [64, 128]) {
    for (const batch of [1, 4]) {
      const opt = new AdamW(params, { lr: 1e-4 });
      const step = () => torch.tidy(() => {
        const pixelValues = torch.rand([batch, 3, resolution, resolution], { device }).mul(2).sub(1);
        const inputIds = torch.randint(0, 1000, [batch, 77], { device });
        loraTrainingStep({ unet, vae, textEncoder, scheduler, batch: { pixelValues, inputIds }, mixedPrecision });
        optimizerStep({ optimizer: opt, params, maxGradNorm: 1.0 });
        torch.synchronize();
      });
      for (let i = 0; i < 3; i++) step();
      const times = [];
      for (let i = 0; i < 10; i++) {
        const t0 = process.hrtime.bigint();
        step();
        times.push(Number(process.hrtime.bigint() - t0) / 1e9);
      }
      console.log(JSON.stringify({ device, threads, mixed_precision: mixedPrecision, resolution, batch, median_s: +median(times).toFixed(4), min_s: +Math.min(...times).toFixed(4) }));
      opt.dispose();
    }
  }
}
