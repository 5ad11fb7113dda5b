// Optimizer step time over LoRA-sized parameters (256 tensors, rank 4, width 640: ~655k parameters, about an SD 1.5
// UNet LoRA): AdamW, Prodigy, Lion, and the EMA update. Usage: npx tsx bench/optimizers.ts [steps]
import { AdamW } from '../lib/optim/adamw.js';
import { EMAModel } from '../lib/optim/ema.js';
import { Lion } from '../lib/optim/lion.js';
import type { Optimizer } from '../lib/optim/optimizer.js';
import { Prodigy } from '../lib/optim/prodigy.js';
import { dispose, keep } from '../lib/scope.js';
import * as torch from '../lib/torch.js';

const steps = Number(process.argv[2] ?? 50);
const device = process.env.DEVICE ?? 'cpu';
const params = Array.from({ length: 256 }, (_, i) => {
  const p = keep(torch.randn(i % 2 ? [640, 4] : [4, 640], { device }));
  p.requiresGrad = true;
  return p;
});
const grads = params.map((p) => keep(torch.randnLike(p)));

function time(name: string, step: () => void): void {
  for (let i = 0; i < 5; i++) step();
  const t0 = performance.now();
  for (let i = 0; i < steps; i++) step();
  console.log(`${name}: ${((performance.now() - t0) / steps).toFixed(2)} ms/step`);
}

for (const [name, make] of [['adamw', () => new AdamW(params, { lr: 1e-4 })], ['prodigy', () => new Prodigy(params, { weightDecay: 1e-2 })],
  ['lion', () => new Lion(params, { lr: 1e-5, weightDecay: 1e-2 })]] as [string, () => Optimizer][]) {
  const opt = make();
  time(name, () => {
    params.forEach((p, i) => { p.grad = grads[i]!; });
    opt.step();
    opt.zeroGrad();
  });
  opt.dispose();
}
const ema = new EMAModel(params, { decay: 0.9999 });
time('ema', () => ema.step());
ema.dispose();
dispose([...params, ...grads]);
