// Peak memory and time of one LoRA training step at 512 px on small-sd (random weights from its configs):
// plain, with memory-efficient attention (--enable_xformers_memory_efficient_attention), with gradient
// checkpointing (--gradient_checkpointing), and both. One case per process, so the peak RSS is the case's own:
//   for c in plain me ckpt me+ckpt; do node bench/train_memory.mjs $c; done      — after `npm run build:ts`
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  torch, AutoencoderKL, CLIPTextModel, UNet2DConditionModel, DDPMScheduler, attachLora, AdamW, loraTrainingStep, optimizerStep,
  setMemoryEfficientAttention,
} from '../dist/index.js';

const name = process.argv[2] ?? 'plain';
const resolution = Number(process.argv[3] ?? 512);
torch.setNumThreads(Number(process.env.THREADS ?? 2));
const dir = join(dirname(fileURLToPath(import.meta.url)), 'fixtures/small-sd');
const cfg = (sub, file = 'config.json') => JSON.parse(readFileSync(join(dir, sub, file), 'utf8'));

torch.manualSeed(0);
const vae = new AutoencoderKL(cfg('vae')).eval().requiresGrad_(false);
const textEncoder = new CLIPTextModel(cfg('text_encoder')).eval().requiresGrad_(false);
const unet = UNet2DConditionModel.fromConfig(cfg('unet')).requiresGrad_(false);
const scheduler = DDPMScheduler.fromConfig(cfg('scheduler', 'scheduler_config.json'));
const params = attachLora(unet, { rank: 4 }).parameters();
unet.train();
if (name.includes('me')) setMemoryEfficientAttention(unet);
if (name.includes('ckpt')) unet.enableGradientCheckpointing();

const opt = new AdamW(params, { lr: 1e-4 });
const step = () => torch.tidy(() => {
  const pixelValues = torch.rand([1, 3, resolution, resolution]).mul(2).sub(1);
  const inputIds = torch.randint(0, 1000, [1, 77]);
  loraTrainingStep({ unet, vae, textEncoder, scheduler, batch: { pixelValues, inputIds }, mixedPrecision: 'no' });
  optimizerStep({ optimizer: opt, params, maxGradNorm: 1.0 });
});
step(); // warm-up
const times = [];
for (let i = 0; i < 3; i++) {
  const t0 = process.hrtime.bigint();
  step();
  times.push(Number(process.hrtime.bigint() - t0) / 1e9);
}
times.sort((a, b) => a - b);
console.log(JSON.stringify({ case: name, resolution, batch: 1, median_s: +times[1].toFixed(2), peak_rss_mib: Math.round(process.resourceUsage().maxRSS / 1024) }));
