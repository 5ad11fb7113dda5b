// UNet2DConditionModel forward and forward+backward on small-sd (random weights from its config).
// node bench/unet.mjs [device] [threads]   — after `npm run build:ts`. One JSON line per case (median of 5).
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { torch } from '../dist/index.js';
import { UNet2DConditionModel } from '../dist/models/unet_2d_condition.js';

const device = process.argv[2] ?? 'cpu';
const threads = Number(process.argv[3] ?? 2);
torch.setNumThreads(threads);
const here = dirname(fileURLToPath(import.meta.url));
const config = JSON.parse(readFileSync(join(here, 'fixtures/small-sd/unet/config.json'), 'utf8'));

torch.manualSeed(0);
const unet = UNet2DConditionModel.fromConfig(config).to({ device });
unet.requiresGrad_(false);

function median(xs) { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; }

function bench(name, dtype, latent, batch, backward) {
  unet.to(dtype);
  const run = () => torch.tidy(() => {
    const x = torch.randn([batch, 4, latent, latent], { device, dtype, requiresGrad: backward });
    const ctx = torch.randn([batch, 77, config.cross_attention_dim], { device, dtype });
    const y = backward ? unet.forward(x, 500, ctx) : torch.noGrad(() => unet.forward(x, 500, ctx));
    if (backward) y.float().square().mean().backward();
    torch.synchronize();
  });
  run(); run();
  const times = [];
  for (let i = 0; i < 5; i++) {
    const t0 = process.hrtime.bigint();
    run();
    times.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  console.log(JSON.stringify({ case: name, device, threads, dtype, latent, batch, median_ms: +median(times).toFixed(1) }));
}

const latents = device === 'cpu' ? [8, 16] : [8, 16, 64];
for (const dtype of ['float32', 'bfloat16']) {
  for (const latent of latents) {
    for (const batch of [1, 4]) {
      bench('forward', dtype, latent, batch, false);
      bench('forward+backward', dtype, latent, batch, true);
    }
  }
}
