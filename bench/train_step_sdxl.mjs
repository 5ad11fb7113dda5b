// One SDXL-shaped LoRA training step on CPU: the UNet of test/fixtures/sdxl-shape (SDXL base's config) scaled down
// in width by 8 (block_out_channels 40/80/160, the same 5/10/20 heads of 8 channels, 8 groups), its depth kept
// (transformer_layers_per_block 1/2/10, cross_attention_dim 2048, the text_time added conditions 6·256 + 1280),
// random weights; LoRA r=4 on to_q/k/v/out.0 (as train_text_to_image_lora_sdxl.py), forward + backward from given
// latents and conditioning (the frozen VAE and text encoders are not timed), clip + AdamW.
// node bench/train_step_sdxl.mjs [threads]   — after `npm run build:ts`. Median of 5 steps after 2 warm-up;
// peak RSS (getrusage maxrss) after each configuration, so it only grows.
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { torch, UNet2DConditionModel, DDPMScheduler, attachLora, AdamW, loraTrainingStep, optimizerStep } from '../dist/index.js';

const threads = Number(process.argv[2] ?? 2);
torch.setNumThreads(threads);
const here = dirname(fileURLToPath(import.meta.url));
const config = JSON.parse(readFileSync(join(here, '..', 'test', 'fixtures', 'sdxl-shape', 'unet', 'config.json'), 'utf8'));
const WIDTH_DIVISOR = 8;
config.block_out_channels = config.block_out_channels.map((c) => c / WIDTH_DIVISOR);
config.norm_num_groups = 8;

torch.manualSeed(0);
const unet = UNet2DConditionModel.fromConfig(config).requiresGrad_(false);
const scheduler = DDPMScheduler.fromConfig({ num_train_timesteps: 1000, beta_start: 0.00085, beta_end: 0.012, beta_schedule: 'scaled_linear' });
const lora = attachLora(unet, { rank: 4, alpha: 4, init: 'gaussian' });
unet.train();
const params = lora.parameters();
const count = (ps) => ps.reduce((n, p) => n + p.numel(), 0);
console.error(JSON.stringify({ width_divisor: WIDTH_DIVISOR, block_out_channels: config.block_out_channels, params: { unet: count(unet.parameters()) - count(params), lora: count(params) } }));

const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; };
const rssMiB = () => Math.round(process.resourceUsage().maxRSS / 1024);

for (const gradientCheckpointing of [false, true]) {
  if (gradientCheckpointing) unet.enableGradientCheckpointing();
  for (const resolution of [64, 128]) {
    const batch = 1;
    const opt = new AdamW(params, { lr: 1e-4 });
    const step = () => torch.tidy(() => {
      const latents = torch.randn([batch, 4, resolution / 8, resolution / 8]);
      const context = torch.randn([batch, 77, 2048]);
      const addedCond = { textEmbeds: torch.randn([batch, 1280]), timeIds: torch.tensor(Float32Array.from([resolution, resolution, 0, 0, resolution, resolution]), { shape: [1, 6] }) };
      loraTrainingStep({ unet, scheduler, batch: { latents }, condition: () => ({ encoderHiddenStates: context, addedCond }) });
      optimizerStep({ optimizer: opt, params, maxGradNorm: 1.0 });
    });
    for (let i = 0; i < 2; i++) step();
    const times = [];
    for (let i = 0; i < 5; i++) {
      const t0 = process.hrtime.bigint();
      step();
      times.push(Number(process.hrtime.bigint() - t0) / 1e9);
    }
    console.log(JSON.stringify({ threads, gradient_checkpointing: gradientCheckpointing, resolution, batch, median_s: +median(times).toFixed(3), min_s: +Math.min(...times).toFixed(3), peak_rss_mib: rssMiB() }));
    opt.dispose();
  }
}
