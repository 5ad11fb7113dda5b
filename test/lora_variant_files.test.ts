// The files of trained LoRA variants (lib/lora/variants.ts, save.ts) on the tiny SD UNet and text encoder: each saved
// file (diffusers/PEFT names for LoRA, LoCon and DoRA; LyCORIS' Kohya keys for LoHa/LoKr; the --export_kohya layout)
// loads back through loadLoraWeights into a fresh model and gives the trained model's output (≤ 1e-5), alpha ≠ rank
// included; a training checkpoint's parameter names fill a fresh adapter of the same type exactly.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { noGrad } from '../lib/autograd.js';
import { loadSafetensors, readSafetensorsHeader } from '../lib/io/safetensors.js';
import { loadLoraWeights } from '../lib/lora/adapters.js';
import { loraLayers } from '../lib/lora/attach.js';
import { convertLoraFile } from '../lib/lora/convert.js';
import { setPeftModelStateDict } from '../lib/lora/load.js';
import { saveLoraWeights } from '../lib/lora/save.js';
import { attachLoraVariant, type LoraType, type LoraVariantConfig } from '../lib/lora/variants.js';
import { CLIPTextModel } from '../lib/models/clip_text_model.js';
import { UNet2DConditionModel } from '../lib/models/unet_2d_condition.js';
import { Generator } from '../lib/random.js';
import { dispose, keep, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { loraNamedParameters } from '../lib/training/lora_components.js';
import { fixtures, relErr } from './helpers.js';

const tinySd = join(fixtures, 'tiny-sd');
const gen = (seed: number) => new Generator().manualSeed(seed);
let tmp: string;
let inputs: { sample: Tensor; ehs: Tensor; ids: Tensor };
beforeAll(() => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-variants-'));
  inputs = {
    sample: keep(torch.randn([1, 4, 16, 16], { generator: gen(1) })),
    ehs: keep(torch.randn([1, 8, 32], { generator: gen(2) })),
    ids: keep(torch.tensor([49406, 320, 1125, 539, 320, 2368, 49407, 49407], { shape: [1, 8], dtype: 'int64' })),
  };
});
afterAll(() => {
  dispose(Object.values(inputs));
  rmSync(tmp, { recursive: true, force: true });
});

const loadUnet = () => UNet2DConditionModel.fromPretrained(tinySd, { subfolder: 'unet' });
const loadTe = () => CLIPTextModel.fromPretrained(tinySd, { subfolder: 'text_encoder' });

function unetOut(unet: UNet2DConditionModel): Tensor {
  return noGrad(() => unet.forward(inputs.sample, 500, inputs.ehs));
}
function teOut(te: CLIPTextModel): Tensor {
  return noGrad(() => tidy(() => te.forward(inputs.ids).lastHiddenState));
}

/** Every trained parameter to seeded random values (zero factors included), so the adapters change the outputs. */
function randomise(model: UNet2DConditionModel | CLIPTextModel, seed: number): void {
  noGrad(() => {
    for (const [, l] of loraLayers(model)) {
      for (const [n, p] of l.adapterParameters()) {
        const r = tidy(() => torch.randn(p.shape, { generator: gen(seed++) }).mul(n.startsWith('hada') || n.startsWith('lokr') ? 0.3 : 0.1));
        if (n === 'lora_magnitude_vector') p.copy_(tidy(() => p.mul(r.add(1))));
        else p.copy_(r);
        r.dispose();
      }
    }
  });
}

/** Rank 4 with alpha 2 (scale 0.5), conv rank 2 with alpha 3: alphas ≠ ranks everywhere. */
const CONFIGS: Record<LoraType, LoraVariantConfig> = {
  lora: { type: 'lora', rank: 4, alpha: 2 },
  locon: { type: 'locon', rank: 4, alpha: 2, convRank: 2, convAlpha: 3 },
  dora: { type: 'dora', rank: 4, alpha: 2, convRank: 2, convAlpha: 3 },
  loha: { type: 'loha', rank: 4, alpha: 2, convRank: 2, convAlpha: 3 },
  lokr: { type: 'lokr', rank: 2, alpha: 3, convRank: 2, convAlpha: 1 },
};

describe.each(Object.keys(CONFIGS) as LoraType[])('%s: saved files load back into a fresh UNet and text encoder', (type) => {
  let unet: UNet2DConditionModel;
  let te: CLIPTextModel;
  let ref: Tensor;
  let teRef: Tensor;
  let base: Tensor;
  const dir = () => join(tmp, type);
  beforeAll(() => {
    unet = loadUnet();
    te = loadTe();
    base = keep(unetOut(unet));
    attachLoraVariant(unet, { ...CONFIGS[type], generator: gen(3) });
    attachLoraVariant(te, { ...CONFIGS[type], type: type === 'locon' ? 'lora' : type, convRank: null, convAlpha: null, targetModules: ['q_proj', 'k_proj', 'v_proj', 'out_proj'], generator: gen(4) });
    randomise(unet, 100);
    randomise(te, 900);
    ref = keep(unetOut(unet));
    teRef = keep(teOut(te));
  });
  afterAll(() => {
    unet.dispose();
    te.dispose();
    dispose([ref, teRef, base]);
  });

  it('pytorch_lora_weights.safetensors: the layout for its type, and the same outputs after loadLoraWeights (≤ 1e-5)', () => {
    expect(relErr(base, ref)).toBeGreaterThan(1e-3); // the adapters act
    const file = saveLoraWeights(dir(), { unet, textEncoder: te });
    const header = readSafetensorsHeader(file);
    const names = header.tensors.map((t) => t.name);
    if (type === 'loha' || type === 'lokr') {
      // LyCORIS' Kohya keys: what A1111/ComfyUI/difflora read (diffusers 0.31 rejects LoHa/LoKr files)
      expect(names.every((n) => /^lora_(unet|te)_[^.]+\.(alpha|hada_w[12]_[ab]|lokr_w[12](_[ab])?)$/.test(n))).toBe(true);
      expect(names.some((n) => n.startsWith('lora_unet_down_blocks_0_resnets_0_conv1.'))).toBe(true);
      expect(names.some((n) => n.startsWith('lora_te_text_model_encoder_layers_0_self_attn_q_proj.'))).toBe(true);
      expect(header.metadata).toMatchObject({ ss_network_module: 'lycoris.kohya', ss_network_args: JSON.stringify({ algo: type }) });
    } else {
      // diffusers' names (PEFT-converted), as save_lora_weights writes them: alpha folded into up (diffusers has no alphas here)
      expect(names.every((n) => /^(unet|text_encoder)\..+\.(lora\.(down|up)\.weight|lora_linear_layer\.(down|up)\.weight|lora_magnitude_vector)$/.test(n))).toBe(true);
      expect(names.some((n) => n.endsWith('.alpha'))).toBe(false);
      expect(header.metadata).toEqual({ format: 'pt' });
      if (type !== 'lora') expect(header.tensors.find((t) => t.name === 'unet.down_blocks.0.resnets.0.conv1.lora.down.weight')?.shape).toEqual([2, 32, 3, 3]);
      if (type === 'dora') {
        expect(header.tensors.find((t) => t.name === 'unet.down_blocks.0.resnets.0.conv1.lora_magnitude_vector')?.shape).toEqual([1, 32, 1, 1]); // PEFT's conv shape
        expect(header.tensors.find((t) => t.name === 'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector')?.shape).toEqual([32]);
      }
    }
    const [u2, t2] = [loadUnet(), loadTe()];
    try {
      loadLoraWeights({ unet: u2, textEncoder: t2 }, dir());
      tidy(() => {
        expect(relErr(unetOut(u2), ref)).toBeLessThanOrEqual(1e-5);
        expect(relErr(teOut(t2), teRef)).toBeLessThanOrEqual(1e-5);
      });
    } finally {
      u2.dispose();
      t2.dispose();
    }
  });

  // only the types with conv layers of another rank (the others have one rank per model)
  if (type === 'locon' || type === 'dora') it("mixed ranks as diffusers reads them: one alpha per model, its first layer's rank A₀; each up weight holds alpha/A₀", () => {
    // diffusers 0.31's get_peft_kwargs: lora_alpha = the rank of the rank dict's first lora_B (the UNet's first up key
    // in the file's sorted order; the text encoder's layer 0 out_proj), other ranks only in rank_pattern, so a conv of
    // rank 2 is scaled A₀/2 there (checked with Python diffusers by scripts/interop/check_diffusers.py)
    const file = join(dir(), 'pytorch_lora_weights.safetensors');
    saveLoraWeights(dir(), { unet, textEncoder: te });
    const sd = loadSafetensors(file).tensors;
    const kohya = join(tmp, `${type}-converted-kohya.safetensors`);
    convertLoraFile(file, kohya, 'kohya');
    const ksd = loadSafetensors(kohya).tensors;
    try {
      const names = [...sd.keys()].sort();
      const firstUp = (prefix: string) => sd.get(names.find((n) => n.startsWith(prefix) && n.endsWith('.up.weight')) as string) as Tensor;
      const a0 = { unet: firstUp('unet.').shape[1] as number, text_encoder: firstUp('text_encoder.text_model.encoder.layers.0.self_attn.out_proj.').shape[1] as number };
      expect(a0.unet).toBe(4); // unet.down_blocks.0.attentions.0.proj_in (a 1×1 conv at --rank 4)
      const conv = 'down_blocks.0.resnets.0.conv1';
      let checked = 0;
      for (const [component, model] of [['unet', unet], ['text_encoder', te]] as const) {
        for (const [path, l] of loraLayers(model)) {
          const up = sd.get(`${component}.${path}.${component === 'unet' ? 'lora' : 'lora_linear_layer'}.up.weight`) as Tensor;
          tidy(() => expect(relErr(up, l.lora_B.weight.mul(l.alpha / a0[component])), `${component} ${path}`).toBeLessThanOrEqual(1e-6));
          checked++;
        }
      }
      expect(checked).toBe(loraLayers(unet).length + loraLayers(te).length);
      expect(loraLayers(unet).find(([p]) => p === conv)?.[1].rank).toBe(2);
      // convert-lora to Kohya writes the alpha diffusers used (A₀, not the conv's rank 2) beside the same weights
      expect((ksd.get(`lora_unet_${conv.replace(/\./g, '_')}.alpha`) as Tensor).item()).toBe(a0.unet);
      tidy(() => expect(relErr(ksd.get(`lora_unet_${conv.replace(/\./g, '_')}.lora_up.weight`) as Tensor, sd.get(`unet.${conv}.lora.up.weight`) as Tensor)).toBe(0));
    } finally {
      dispose([...sd.values(), ...ksd.values()]);
    }
  });

  it('--export_kohya layout (Kohya/LyCORIS keys with alpha, dora_scale) loads back to the same outputs (≤ 1e-5)', () => {
    const file = saveLoraWeights(dir(), { unet, textEncoder: te }, { format: 'kohya', weightName: 'kohya.safetensors' });
    const header = readSafetensorsHeader(file);
    const names = header.tensors.map((t) => t.name);
    expect(names.every((n) => n.startsWith('lora_unet_') || n.startsWith('lora_te_'))).toBe(true);
    if (type === 'dora') {
      expect(header.tensors.find((t) => t.name === 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale')?.shape).toEqual([32, 1]);
      expect(header.tensors.find((t) => t.name === 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha')).toBeDefined();
    }
    const [u2, t2] = [loadUnet(), loadTe()];
    try {
      loadLoraWeights({ unet: u2, textEncoder: t2 }, file);
      tidy(() => {
        expect(relErr(unetOut(u2), ref)).toBeLessThanOrEqual(1e-5);
        expect(relErr(teOut(t2), teRef)).toBeLessThanOrEqual(1e-5);
      });
    } finally {
      u2.dispose();
      t2.dispose();
    }
  });

  it("a checkpoint's parameters (loraNamedParameters' names) fill a fresh adapter of the type: same outputs, bit for bit", () => {
    const named = new Map(loraNamedParameters([['unet', unet], ['text_encoder', te]]).map(([n, p]) => [`lora.${n}`, p] as [string, Tensor]));
    const [u2, t2] = [loadUnet(), loadTe()];
    try {
      attachLoraVariant(u2, { ...CONFIGS[type], generator: gen(77) });
      attachLoraVariant(t2, { ...CONFIGS[type], type: type === 'locon' ? 'lora' : type, convRank: null, convAlpha: null, targetModules: ['q_proj', 'k_proj', 'v_proj', 'out_proj'], generator: gen(78) });
      const before = loraNamedParameters([['unet', u2], ['text_encoder', t2]]).map(([, p]) => p);
      setPeftModelStateDict({ unet: u2, textEncoder: t2 }, named, { keyPrefix: 'lora.' });
      const after = loraNamedParameters([['unet', u2], ['text_encoder', t2]]).map(([, p]) => p);
      expect(after.every((p, i) => p === before[i])).toBe(true); // the same tensors (an optimizer keeps working)
      tidy(() => {
        expect(relErr(unetOut(u2), ref)).toBe(0);
        expect(relErr(teOut(t2), teRef)).toBe(0);
      });
    } finally {
      u2.dispose();
      t2.dispose();
    }
  });
});

describe('a checkpoint of another adapter type is refused, naming the kinds', () => {
  it('LoHa parameters cannot fill a LoRA adapter, nor LoRA parameters a DoRA one; nothing changes', () => {
    const [a, b] = [loadUnet(), loadUnet()];
    try {
      attachLoraVariant(a, { type: 'loha', rank: 2 });
      attachLoraVariant(b, { type: 'lora', rank: 2 });
      const lohaParams = new Map(loraNamedParameters([['unet', a]]));
      expect(() => setPeftModelStateDict(b, lohaParams)).toThrow(/a LoHa adapter cannot fill the trained LoRA adapter 'default'/);
      const c = loadUnet();
      try {
        attachLoraVariant(c, { type: 'dora', rank: 2 });
        expect(() => setPeftModelStateDict(c, new Map(loraNamedParameters([['unet', b]])))).toThrow(/a LoRA adapter cannot fill the trained DoRA adapter 'default'/);
      } finally {
        c.dispose();
      }
    } finally {
      a.dispose();
      b.dispose();
    }
  });
});
