// --mixed_precision=bf16 as the script runs it: frozen UNet in bf16, LoRA parameters in fp32 (master
// weights), autocast; the step stays within bf16 tolerance of the fp32 step.
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { noGrad } from '../lib/autograd.js';
import { loadSafetensors } from '../lib/io/safetensors.js';
import { attachLora } from '../lib/lora/attach.js';
import { UNet2DConditionModel } from '../lib/models/unet_2d_condition.js';
import { AdamW } from '../lib/optim/adamw.js';
import { DDPMScheduler } from '../lib/schedulers/scheduling_ddpm.js';
import { dispose } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import { loraTrainingStep, optimizerStep } from '../lib/training/step.js';
import { fixtures, relErr } from './helpers.js';

const tinySd = join(fixtures, 'tiny-sd');
const { tensors: golden } = loadSafetensors(join(fixtures, 'goldens/lora_train.safetensors'));
afterAll(() => dispose([...golden.values()]));
const g = (k: string): Tensor => { const t = golden.get(k); if (!t) throw new Error(`missing ${k}`); return t; };

function step(weightDtype: 'float32' | 'bfloat16', mixedPrecision: 'no' | 'bf16') {
  const unet = UNet2DConditionModel.fromPretrained(tinySd, { subfolder: 'unet', dtype: weightDtype });
  const h = attachLora(unet, { rank: 4 });
  noGrad(() => { for (const [n, p] of h.namedParameters()) p.copy_(g(`lora_init/${n}`)); });
  unet.train();
  const scheduler = DDPMScheduler.fromPretrained(tinySd, { subfolder: 'scheduler' });
  const loss = loraTrainingStep({
    unet, scheduler, mixedPrecision,
    batch: { latents: g('inputs/latents'), encoderHiddenStates: g('inputs/encoder_hidden_states') },
    noise: g('inputs/noise'), timesteps: g('inputs/timesteps'),
  });
  const grads = h.parameters().map((p) => p.grad!);
  const opt = new AdamW(h.parameters(), { lr: 1e-4 });
  const norm = optimizerStep({ optimizer: opt, params: h.parameters(), maxGradNorm: 1.0 }).gradNorm;
  return { unet, h, loss, grads, norm, opt, scheduler };
}

describe('bf16 mixed precision on CPU', () => {
  it('frozen bf16 UNet + fp32 LoRA: loss and grads within bf16 tolerance of fp32, LoRA stays fp32', () => {
    const ref = step('float32', 'no');
    const bf = step('bfloat16', 'bf16');
    expect(bf.unet.conv_in.weight.dtype).toBe('bfloat16');
    expect(bf.h.parameters().every((p) => p.dtype === 'float32')).toBe(true);
    expect(bf.grads.every((gr) => gr.dtype === 'float32')).toBe(true);
    expect(Math.abs(bf.loss - ref.loss) / ref.loss).toBeLessThan(2e-2);
    expect(bf.norm).toBeGreaterThan(0);
    expect(Math.abs(bf.norm! - ref.norm!) / ref.norm!).toBeLessThan(0.1);
    expect(bf.h.parameters().every((p) => p.isfinite().all().item())).toBe(true);
    const worst = Math.max(...bf.grads.map((gr, i) => relErr(gr, ref.grads[i]!)));
    expect(worst).toBeLessThan(0.2);
    for (const s of [ref, bf]) { dispose(s.grads); s.opt.dispose(); s.unet.dispose(); s.scheduler.dispose(); }
  });
});
