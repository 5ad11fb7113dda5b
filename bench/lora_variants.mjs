// Trainable parameters and UNet forward+backward time per --lora_type on small-sd (random weights from its configs):
// rank 16 (alpha 16) on the scripts' to_q/to_k/to_v/to_out.0, conv rank 8 where the type adapts convs.
// node bench/lora_variants.mjs [threads] [device] — after `npm run build:ts`. Median of 5 steps after 2 warm-up, 64 px, batch 1.
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { torch, UNet2DConditionModel, attachLoraVariant, unloadLoraWeights } from '../dist/index.js';

const threads = Number(process.argv[2] ?? 2);
const device = process.argv[3] ?? 'cpu';
torch.setNumThreads(threads);
const dir = join(dirname(fileURLToPath(import.meta.url)), 'fixtures/small-sd');
const cfg = JSON.parse(readFileSync(join(dir, 'unet', 'config.json'), 'utf8'));
torch.manualSeed(0);
const unet = UNet2DConditionModel.fromConfig(cfg).to({ device });
unet.train().requiresGrad_(false);
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const configs = [
  { type: 'lora' }, { type: 'locon', convRank: 8 }, { type: 'dora' }, { type: 'loha' }, { type: 'loha', convRank: 8 }, { type: 'lokr' }, { type: 'lokr', convRank: 8 },
];
for (const c of configs) {
  const handle = attachLoraVariant(unet, { rank: 16, alpha: 16, ...c });
  const params = handle.parameters();
  const step = () => torch.tidy(() => {
    const x = torch.randn([1, 4, 8, 8], { device });
    const ehs = torch.randn([1, 77, cfg.cross_attention_dim], { device });
    const out = unet.forward(x, 500, ehs);
    out.square().mean().backward();
    for (const p of params) { p.grad?.dispose(); p.grad = null; }
    torch.synchronize();
  });
  for (let i = 0; i < 2; i++) step();
  const times = [];
  for (let i = 0; i < 5; i++) {
    const t0 = process.hrtime.bigint();
    step();
    times.push(Number(process.hrtime.bigint() - t0) / 1e9);
  }
  console.log(JSON.stringify({ device, threads, ...c, layers: handle.layers.length, trainable: params.reduce((n, p) => n + p.numel(), 0), median_s: +median(times).toFixed(4) }));
  unloadLoraWeights(unet);
}
