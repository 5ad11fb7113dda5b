// One step of train_dreambooth_lora.py --with_prior_preservation --train_text_encoder against
// goldens/dreambooth_train (tiny-sd, UNet + CLIP LoRA rank 4): the forward intermediates, the instance and prior
// loss terms, every UNet and text-encoder LoRA gradient, the grad norm, the parameters after clip + AdamW
// (= goldens/dreambooth-lora), the saved file's keys/order/shapes/metadata, and the script's final inference
// with that file loaded (goldens/dreambooth_inference).
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { noGrad } from '../lib/autograd.js';
import { readSafetensorsHeader } from '../lib/io/safetensors.js';
import { attachLora } from '../lib/lora/attach.js';
import { saveLoraWeights } from '../lib/lora/save.js';
import { CLIPTextModel } from '../lib/models/clip_text_model.js';
import { UNet2DConditionModel } from '../lib/models/unet_2d_condition.js';
import { AdamW } from '../lib/optim/adamw.js';
import { StableDiffusionPipeline } from '../lib/pipelines/stable_diffusion.js';
import { DDPMScheduler } from '../lib/schedulers/scheduling_ddpm.js';
import { dispose, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { loraNamedParameters, type LoraComponents } from '../lib/training/lora_components.js';
import { DREAMBOOTH_UNET_LORA_TARGETS, attachTextEncoderLora } from '../lib/training/models.js';
import { Accumulator, predictNoise, priorPreservationStep, type TrainingStep } from '../lib/training/step.js';
import { fixtures, goldenFile, relErr, updateError, worstGradError } from './helpers.js';

const tinySd = join(fixtures, 'tiny-sd');
const goldens = join(fixtures, 'goldens');
const meta = JSON.parse(readFileSync(join(goldens, 'dreambooth_train.json'), 'utf8')) as {
  summary: { loss: number; instance_loss: number; prior_loss: number; grad_norm_preclip: number };
  lora_param_order: string[];
};
const fileMeta = JSON.parse(readFileSync(join(goldens, 'dreambooth-lora.json'), 'utf8')) as { keys_in_file_order: string[]; safetensors_metadata: Record<string, string> };
const LR = 5e-4;
const golden = goldenFile('dreambooth_train.safetensors');
const g = (n: string): Tensor => golden.get(n);
const updated = goldenFile('dreambooth-lora/pytorch_lora_weights.safetensors');

let scheduler: DDPMScheduler;
let unet: UNet2DConditionModel;
let textEncoder: CLIPTextModel;
let components: LoraComponents;
let tmp: string;

/** Our parameter name → the golden's `<component>/<PEFT name>`. */
const goldenName = (n: string): string => (n.startsWith('text_encoder.') ? `text_encoder/${n.slice('text_encoder.'.length)}` : `unet/${n}`);
/** Our parameter name → the key diffusers' save_lora_weights writes. */
const fileKey = (n: string): string => n.startsWith('text_encoder.')
  ? n.replace(/\.lora_A\.weight$/, '.lora_linear_layer.down.weight').replace(/\.lora_B\.weight$/, '.lora_linear_layer.up.weight')
  : `unet.${n.replace(/\.lora_A\.weight$/, '.lora.down.weight').replace(/\.lora_B\.weight$/, '.lora.up.weight')}`;

beforeAll(() => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-db-step-'));
  scheduler = DDPMScheduler.fromPretrained(tinySd, { subfolder: 'scheduler' });
  unet = UNet2DConditionModel.fromPretrained(tinySd, { subfolder: 'unet' });
  textEncoder = CLIPTextModel.fromPretrained(tinySd, { subfolder: 'text_encoder' });
  attachLora(unet, { rank: 4, alpha: 4, init: 'gaussian', targetModules: DREAMBOOTH_UNET_LORA_TARGETS });
  attachTextEncoderLora(textEncoder, 4);
  unet.train();
  components = [['unet', unet], ['text_encoder', textEncoder]];
  noGrad(() => { for (const [n, p] of loraNamedParameters(components)) p.copy_(g(`lora_init/${goldenName(n)}`)); });
});

afterAll(() => {
  unet.dispose();
  textEncoder.dispose();
  scheduler.dispose();
  golden.dispose();
  updated.dispose();
  rmSync(tmp, { recursive: true, force: true });
});

const step = (): TrainingStep & { priorLossWeight: number } => ({
  unet, scheduler, textEncoder, trainTextEncoder: true, priorLossWeight: 1,
  batch: { latents: g('inputs/model_input'), inputIds: g('inputs/input_ids') },
  noise: g('inputs/noise'), timesteps: g('inputs/timesteps'),
});

describe('train_dreambooth_lora.py step (goldens/dreambooth_train)', () => {
  it('LoRA on 48 UNet and 20 text-encoder modules, parameters in the script\'s optimizer order', () => {
    const names = loraNamedParameters(components).map(([n]) => goldenName(n));
    expect(names).toEqual(meta.lora_param_order);
  });

  it('forward: noisy input, text-encoder states (with its LoRA) and the UNet prediction', () => {
    tidy(() => {
      const p = predictNoise(step());
      const ehs = textEncoder.forward(g('inputs/input_ids')).lastHiddenState;
      const noisy = scheduler.addNoise(g('inputs/model_input'), g('inputs/noise'), g('inputs/timesteps'));
      const errs = { noisy: relErr(noisy, g('noisy_model_input')), ehs: relErr(ehs, g('encoder_hidden_states')), pred: relErr(p.modelPred, g('model_pred')) };
      console.log('dreambooth forward rel err', errs);
      expect(errs.noisy).toBeLessThan(1e-6);
      expect(errs.ehs).toBeLessThan(1e-5);
      expect(errs.pred).toBeLessThan(1e-5);
    });
    unet.zeroGrad();
    textEncoder.zeroGrad();
  });

  it('prior-preservation loss and its two terms ≤ 1e-6; every gradient ≤ 1e-4; params after clip + AdamW equal the saved golden', () => {
    for (const [, p] of loraNamedParameters(components)) p.grad = null;
    const opt = new AdamW(loraNamedParameters(components).map(([, p]) => p), { lr: LR, betas: [0.9, 0.999], weightDecay: 1e-2, eps: 1e-8 });
    const acc = new Accumulator({ optimizer: opt, maxGradNorm: 1.0, lrScheduler: 'constant', lrOptions: { baseLr: LR } });
    const l = priorPreservationStep(step());
    const s = meta.summary;
    const lossErr = {
      loss: Math.abs(l.loss - s.loss) / s.loss,
      instance: Math.abs(l.instanceLoss - s.instance_loss) / s.instance_loss,
      prior: Math.abs(l.priorLoss - s.prior_loss) / s.prior_loss,
    };
    const gradErr = worstGradError(loraNamedParameters(components), (n) => g(`grad/${goldenName(n)}`));
    expect(gradErr.withoutGrad).toEqual([]);
    const r = acc.afterBackward();
    const normErr = Math.abs((r?.gradNorm ?? NaN) - s.grad_norm_preclip) / s.grad_norm_preclip;
    const { rel: updRel, abs: updAbs } = updateError(loraNamedParameters(components), (n) => updated.get(fileKey(n)));
    console.log('dreambooth step', { lossErr, gradErr, normErr, updRel, updAbs, updAbsOverLr: updAbs / LR });
    expect(lossErr.loss).toBeLessThan(1e-6);
    expect(lossErr.instance).toBeLessThan(1e-6);
    expect(lossErr.prior).toBeLessThan(1e-6);
    expect(gradErr.err).toBeLessThan(1e-4);
    expect(normErr).toBeLessThan(1e-4);
    expect(updRel).toBeLessThan(1e-4);
    expect(updAbs).toBeLessThan(0.03 * LR); // AdamW's first step is ≈ lr·sign(g): an absolute bound (REFERENCE.md)
    opt.dispose();
  });

  it('the saved file: the keys of save_lora_weights in its order, shapes, {"format": "pt"}', () => {
    const file = saveLoraWeights(tmp, { unet, textEncoder });
    const ours = readSafetensorsHeader(file);
    const ref = readSafetensorsHeader(join(goldens, 'dreambooth-lora', 'pytorch_lora_weights.safetensors'));
    expect(ours.tensors.map((t) => t.name)).toEqual(fileMeta.keys_in_file_order);
    expect(ours.tensors.map((t) => [t.name, t.shape, t.dtype])).toEqual(ref.tensors.map((t) => [t.name, t.shape, t.dtype]));
    expect(ours.metadata).toEqual(fileMeta.safetensors_metadata);
  });
});

describe('the script\'s final inference with the saved file (goldens/dreambooth_inference)', () => {
  const inference = goldenFile('dreambooth_inference.safetensors');
  afterAll(() => inference.dispose());

  for (const variant of ['base', 'lora'] as const) {
    it(`${variant}: DPM-Solver++ 25 steps, step latents and image ≤ 1e-4`, async () => {
      const pipe = StableDiffusionPipeline.fromPretrained(tinySd, { scheduler: 'dpmpp_2m' });
      if (variant === 'lora') {
        const r = pipe.loadLoraWeights(join(goldens, 'dreambooth-lora'), { weightName: 'pytorch_lora_weights.safetensors' });
        expect([r.unetLayers, r.textEncoderLayers]).toEqual([48, 20]);
      }
      const kept: Tensor[] = [];
      const out = await pipe.generate({
        prompt: 'a photo of sks dog in a bucket', numInferenceSteps: 25, guidanceScale: 7.5, latents: inference.get('latents'), outputType: 'tensor',
        callbackOnStepEnd: ({ step: i, latents }) => { if ([0, 1, 24].includes(i)) kept.push(latents.clone()); },
      });
      const image = tidy(() => out.tensor!.permute([0, 2, 3, 1]).contiguous());
      const steps = torch.stack(kept);
      const errs = { image: relErr(image, inference.get(`${variant}/image`)), steps: relErr(steps, inference.get(`${variant}/step_latents`)) };
      console.log(`dreambooth inference ${variant}`, errs);
      expect(errs.image).toBeLessThan(1e-4);
      expect(errs.steps).toBeLessThan(1e-4);
      dispose([image, steps, out.tensor, ...kept]);
      pipe.dispose();
    });
  }
});
