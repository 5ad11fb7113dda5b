// LoRA on the real tiny-sd UNet against PEFT 0.13 / diffusers 0.31 (goldens/lora_train, lora-diffusers,
// kohya): parameter names and order, one training forward/backward (prediction, MSE loss, every LoRA
// gradient), the seeded PEFT initialisation, the saved diffusers file, Kohya loading, and detaching.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { noGrad } from '../lib/autograd.js';
import * as F from '../lib/functional.js';
import { loadSafetensors } from '../lib/io/safetensors.js';
import { UNet2DConditionModel } from '../lib/models/unet_2d_condition.js';
import { Generator, manualSeed } from '../lib/random.js';
import { dispose, memory, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { fuseLora, loadLoraWeights, unloadLoraWeights } from '../lib/lora/adapters.js';
import { attachLora, loraLayers, type LoraHandle } from '../lib/lora/attach.js';
import { saveLoraWeights } from '../lib/lora/save.js';
import { bitEqual, fixtures, relErr } from './helpers.js';

const TOL = 1e-4;
const tinySd = join(fixtures, 'tiny-sd');
const goldens = join(fixtures, 'goldens');
const trainMeta = JSON.parse(readFileSync(join(goldens, 'lora_train.json'), 'utf8')) as {
  lora_param_order: string[]; variants: { plain: { loss: number; grad_norm_preclip: number } };
};
const kohyaMeta = JSON.parse(readFileSync(join(goldens, 'kohya.json'), 'utf8')) as {
  per_layer_scaling: Record<string, { peft_scaling: number; alpha: number; rank: number }>;
};

let golden: Map<string, Tensor>;
let tmp: string;
const g = (name: string): Tensor => {
  const t = golden.get(name);
  if (!t) throw new Error(`golden '${name}' missing`);
  return t;
};

beforeAll(() => {
  golden = loadSafetensors(join(goldens, 'lora_train.safetensors')).tensors;
  tmp = mkdtempSync(join(tmpdir(), 'difflora-lora-unet-'));
});

afterAll(() => {
  dispose([...golden.values()]);
  rmSync(tmp, { recursive: true, force: true });
});

function unetWithLoraInit(): { unet: UNet2DConditionModel; h: LoraHandle } {
  const unet = UNet2DConditionModel.fromPretrained(tinySd, { subfolder: 'unet' });
  const h = attachLora(unet, { rank: 4, alpha: 4, init: 'gaussian' });
  noGrad(() => { for (const [n, p] of h.namedParameters()) p.copy_(g(`lora_init/${n}`)); });
  return { unet, h };
}

describe('LoRA on the tiny-sd UNet (PEFT r=4, alpha=4, to_q/to_k/to_v/to_out.0)', () => {
  it('48 layers; parameter names and order equal PEFT\'s named_parameters', () => {
    const { unet, h } = unetWithLoraInit();
    expect(h.layers.length).toBe(48);
    expect(h.namedParameters().map(([n]) => n)).toEqual(trainMeta.lora_param_order);
    const trainable = unet.namedParameters().filter(([, p]) => p.requiresGrad).map(([n]) => n);
    expect(trainable).toEqual(trainMeta.lora_param_order);
    unet.dispose();
  });

  it('train-mode forward, MSE loss and every LoRA gradient match PEFT (plain variant)', () => {
    const { unet, h } = unetWithLoraInit();
    unet.train();
    const errs = tidy(() => {
      const pred = unet.forward(g('inputs/sample'), g('inputs/timesteps'), g('inputs/encoder_hidden_states'));
      const loss = F.mseLoss(pred.float(), g('inputs/plain_target').float());
      const predErr = relErr(pred, g('plain/model_pred'));
      const lossErr = relErr(loss, g('plain/loss'));
      loss.backward();
      let worst = 0;
      let worstName = '';
      let sq = 0;
      for (const [n, p] of h.namedParameters()) {
        const grad = p.grad;
        if (!grad) throw new Error(`no gradient for ${n}`);
        const e = relErr(grad, g(`plain/grad/${n}`));
        if (e > worst) [worst, worstName] = [e, n];
        sq += grad.square().sum().item();
      }
      const total = relErr(torch.scalarTensor(Math.sqrt(sq)), g('plain/grad_norm_preclip'));
      return { predErr, lossErr, loss: loss.item(), worstGradErr: worst, worstGrad: worstName, gradNormErr: total };
    });
    console.log('UNet+LoRA vs PEFT', errs);
    expect(errs.predErr).toBeLessThan(TOL);
    expect(errs.lossErr).toBeLessThan(TOL);
    expect(Math.abs(errs.loss - trainMeta.variants.plain.loss) / trainMeta.variants.plain.loss).toBeLessThan(TOL);
    expect(errs.worstGradErr).toBeLessThan(TOL);
    expect(errs.gradNormErr).toBeLessThan(TOL);
    // base weights stay frozen: no gradient anywhere else
    for (const [n, p] of unet.namedParameters()) {
      if (h.parameters().includes(p)) continue;
      expect([n, p.grad]).toEqual([n, null]);
    }
    unet.dispose();
  });

  it('manual_seed(1234) then attach draws PEFT\'s initial A exactly', () => {
    const unet = UNet2DConditionModel.fromPretrained(tinySd, { subfolder: 'unet' });
    manualSeed(1234);
    const h = attachLora(unet, { rank: 4, init: 'gaussian' });
    const gen = new Generator().manualSeed(42);
    tidy(() => noGrad(() => { for (const [n, p] of h.namedParameters()) if (n.includes('lora_B')) p.copy_(torch.randn(p.shape, { generator: gen }).mul(0.01)); }));
    const exact = h.namedParameters().filter(([n, p]) => bitEqual(p, g(`lora_init/${n}`))).length;
    expect(exact).toBe(96);
    unet.dispose();
  });

  it('saveLoraWeights writes the bytes of diffusers\' save_lora_weights', () => {
    const { unet } = unetWithLoraInit();
    const file = saveLoraWeights(join(tmp, 'out'), unet);
    expect(readFileSync(file).equals(readFileSync(join(goldens, 'lora-diffusers', 'pytorch_lora_weights.safetensors')))).toBe(true);
    // and it loads back into a fresh UNet with the same prediction
    const other = UNet2DConditionModel.fromPretrained(tinySd, { subfolder: 'unet' });
    const r = loadLoraWeights(other, file);
    expect([r.unetLayers, loraLayers(other).length]).toEqual([48, 48]);
    const err = noGrad(() => tidy(() => {
      const args = [g('inputs/sample'), g('inputs/timesteps'), g('inputs/encoder_hidden_states')] as const;
      return relErr(other.forward(...args), unet.forward(...args));
    }));
    expect(err).toBe(0);
    unet.dispose();
    other.dispose();
  });

  it('the Kohya golden loads with per-layer alpha (2, mid block 8) onto 50 layers; merged weights equal PEFT\'s', () => {
    const unet = UNet2DConditionModel.fromPretrained(tinySd, { subfolder: 'unet' });
    const kohya = loadSafetensors(join(goldens, 'kohya.safetensors')).tensors;
    const r = loadLoraWeights(unet, join(goldens, 'lora-kohya', 'tiny_sd_kohya_lora.safetensors'));
    expect([r.formats, r.unetLayers]).toEqual([['kohya'], 50]);
    const layers = new Map(loraLayers(unet));
    for (const [path, s] of Object.entries(kohyaMeta.per_layer_scaling)) {
      const l = layers.get(path);
      expect([path, l?.rank, l?.alpha, l?.scaling]).toEqual([path, s.rank, s.alpha, s.peft_scaling]);
    }
    for (const [k, t] of kohya) {
      if (!k.startsWith('base_weight/')) continue;
      expect(bitEqual(layers.get(k.slice('base_weight/'.length))?.base_layer.weight as Tensor, t)).toBe(true);
    }
    fuseLora(unet);
    const params = new Map(loraLayers(unet).map(([p, l]) => [`${p}.weight`, l.base_layer.weight]));
    let worst = 0;
    for (const [k, t] of kohya) {
      if (!k.startsWith('merged_weight/')) continue;
      worst = Math.max(worst, relErr(params.get(`${k.slice('merged_weight/'.length)}.weight`) as Tensor, t));
    }
    console.log('Kohya fuse vs PEFT merged weights, worst rel err', worst);
    expect(worst).toBeLessThan(1e-6);
    dispose([...kohya.values()]);
    unet.dispose();
  });

  it('unloadLoraWeights gives back the plain UNet: state dict bit for bit, same prediction, no tensors left', () => {
    const unet = UNet2DConditionModel.fromPretrained(tinySd, { subfolder: 'unet' });
    const args = [g('inputs/sample'), g('inputs/timesteps'), g('inputs/encoder_hidden_states')] as const;
    const before = noGrad(() => tidy(() => unet.forward(...args)));
    const sd = new Map([...unet.stateDict()].map(([k, t]) => [k, t.clone()]));
    const live = memory().numTensors;
    attachLora(unet, { rank: 4 });
    tidy(() => noGrad(() => { for (const [, l] of loraLayers(unet)) l.lora_B.weight.copy_(torch.randnLike(l.lora_B.weight)); }));
    const withLora = noGrad(() => tidy(() => unet.forward(...args)));
    expect(relErr(withLora, before)).toBeGreaterThan(1e-3);
    unloadLoraWeights(unet);
    expect(memory().numTensors).toBe(live + 1);
    expect([...unet.stateDict().keys()]).toEqual([...sd.keys()]);
    for (const [k, t] of unet.stateDict()) expect([k, bitEqual(t, sd.get(k) as Tensor)]).toEqual([k, true]);
    const after = noGrad(() => tidy(() => unet.forward(...args)));
    expect(bitEqual(after, before)).toBe(true);
    dispose([before, withLora, after, ...sd.values()]);
    unet.dispose();
  });
});
