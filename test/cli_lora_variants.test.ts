// --lora_type and its flags through the training commands (lib/training/lora_variant_options.ts, lib/lora/variants.ts):
// short runs on the tiny pipelines whose saved files load back into fresh models and give the trained adapters'
// outputs; resume from a checkpoint with every type ends byte-identical to an uninterrupted run; bad input refused
// naming the flag and the value (exit 2), nothing written.
import { cpSync, existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { noGrad } from '../lib/autograd.js';
import { loadSafetensors, readSafetensorsHeader } from '../lib/io/safetensors.js';
import { loadLoraWeights } from '../lib/lora/adapters.js';
import { DEFAULT_TARGET_MODULES } from '../lib/lora/attach.js';
import { setPeftModelStateDict } from '../lib/lora/load.js';
import { attachLoraVariant, type LoraType } from '../lib/lora/variants.js';
import { CLIPTextModel, CLIPTextModelWithProjection } from '../lib/models/clip_text_model.js';
import { UNet2DConditionModel } from '../lib/models/unet_2d_condition.js';
import { Generator } from '../lib/random.js';
import { dispose, keep, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { validateDreamBoothOptions } from '../lib/training/dreambooth_options.js';
import { validateTrainOptions, type TrainOptions } from '../lib/training/options.js';
import { validateSdxlTrainOptions } from '../lib/training/sdxl_options.js';
import { runTraining } from '../lib/training/train.js';
import { makeImageFolder, runMain, tinySd } from './cli_helpers.js';
import { fixtures, relErr } from './helpers.js';

const tinySdxl = join(fixtures, 'tiny-sdxl');
const gen = (seed: number) => new Generator().manualSeed(seed);
let tmp: string;
let data: string;
let inputs: Record<string, Tensor>;
beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-lora-variants-'));
  data = join(tmp, 'data');
  await makeImageFolder(data, 4);
  inputs = {
    sample: keep(torch.randn([1, 4, 16, 16], { generator: gen(1) })),
    ehs: keep(torch.randn([1, 8, 32], { generator: gen(2) })),
    ehsXl: keep(torch.randn([1, 8, 20], { generator: gen(3) })),
    textEmbeds: keep(torch.randn([1, 16], { generator: gen(4) })),
    timeIds: keep(torch.tensor([64, 64, 0, 0, 64, 64], { shape: [1, 6] })),
    ids: keep(torch.tensor([49406, 320, 1125, 539, 320, 2368, 49407, 49407], { shape: [1, 8], dtype: 'int64' })),
  };
});
afterAll(() => {
  dispose(Object.values(inputs));
  rmSync(tmp, { recursive: true, force: true });
});

/** The outputs of a pipeline's LoRA-carrying models: UNet, and the text encoders given. */
function outputs(m: { unet: UNet2DConditionModel; te?: CLIPTextModel; te2?: CLIPTextModelWithProjection }, sdxl = false): Tensor[] {
  return noGrad(() => tidy(() => [
    sdxl ? m.unet.forward(inputs.sample!, 500, inputs.ehsXl!, { textEmbeds: inputs.textEmbeds!, timeIds: inputs.timeIds! }) : m.unet.forward(inputs.sample!, 500, inputs.ehs!),
    ...(m.te ? [m.te.forward(inputs.ids!).lastHiddenState] : []),
    ...(m.te2 ? [m.te2.forward(inputs.ids!).lastHiddenState] : []),
  ]));
}

function fresh(model: string, te: boolean, sdxl = false) {
  return {
    unet: UNet2DConditionModel.fromPretrained(model, { subfolder: 'unet' }),
    ...(te ? { te: CLIPTextModel.fromPretrained(model, { subfolder: 'text_encoder' }) } : {}),
    ...(te && sdxl ? { te2: CLIPTextModelWithProjection.fromPretrained(model, { subfolder: 'text_encoder_2' }) } : {}),
  };
}
const disposeAll = (m: ReturnType<typeof fresh>) => { m.unet.dispose(); m.te?.dispose(); m.te2?.dispose(); };
const targetsOf = (m: ReturnType<typeof fresh>) => ({ unet: m.unet, ...(m.te ? { textEncoder: m.te } : {}), ...(m.te2 ? { textEncoder2: m.te2 } : {}) });

/** Loads each file into fresh models; all give the same outputs (≤ 1e-5), which differ from the base model's. */
function expectSameModels(model: string, files: string[], o: { te?: boolean; sdxl?: boolean } = {}): void {
  const base = fresh(model, o.te ?? false, o.sdxl);
  const loaded = files.map(() => fresh(model, o.te ?? false, o.sdxl));
  try {
    files.forEach((f, i) => loadLoraWeights(targetsOf(loaded[i]!), f));
    tidy(() => {
      const ref = outputs(base, o.sdxl);
      const outs = loaded.map((m) => outputs(m, o.sdxl));
      outs[0]!.forEach((t, k) => expect(relErr(t, ref[k]!), `output ${k} moved from the base`).toBeGreaterThan(1e-6));
      for (const out of outs.slice(1)) out.forEach((t, k) => expect(relErr(t, outs[0]![k]!), `output ${k}`).toBeLessThanOrEqual(1e-5));
    });
  } finally {
    disposeAll(base);
    loaded.forEach(disposeAll);
  }
}

const libBase = (outputDir: string, more: Partial<TrainOptions>): TrainOptions => ({
  pretrainedModelNameOrPath: tinySd, trainDataDir: data, outputDir, resolution: 32, trainBatchSize: 2, maxTrainSteps: 3, learningRate: 1e-2,
  lrWarmupSteps: 0, seed: 7, checkpointingSteps: 1, device: 'cpu', rank: 4, validationPrompt: null, ...more,
});

const RUNS: [LoraType, Partial<TrainOptions>][] = [
  ['locon', { loraType: 'locon', convRank: 2, convAlpha: 3, loraAlpha: 2 }],
  ['dora', { loraType: 'dora', loraAlpha: 8, gradientCheckpointing: true }], // checkpointed activations recompute DoRA's forward
  ['loha', { loraType: 'loha', loraAlpha: 2, convRank: 2, mixedPrecision: 'bf16' }], // bf16 frozen weights, float32 factors
  ['lokr', { loraType: 'lokr', rank: 2, loraAlpha: 3, lokrFactor: 4 }],
];

describe.each(RUNS)('runTraining --lora_type %s', (type, more) => {
  it('trains; the saved file is the trained model (a checkpoint of the last step filled into fresh adapters); resume is exact', async () => {
    const straight = join(tmp, `straight-${type}`);
    const r = await runTraining(libBase(straight, more));
    expect(r.globalStep).toBe(3);
    // the trained adapters as the checkpoint of the last step holds them, in a fresh UNet with adapters of the type
    const trained = fresh(tinySd, false);
    const fromFile = fresh(tinySd, false);
    const state = loadSafetensors(join(straight, 'checkpoint-3', 'training_state.safetensors')).tensors;
    try {
      attachLoraVariant(trained.unet, {
        type, rank: more.rank ?? 4, alpha: more.loraAlpha ?? undefined, convRank: more.convRank ?? null, convAlpha: more.convAlpha ?? null,
        lokrFactor: more.lokrFactor ?? -1, targetModules: DEFAULT_TARGET_MODULES,
      });
      setPeftModelStateDict(trained.unet, state, { keyPrefix: 'lora.' });
      loadLoraWeights(fromFile.unet, straight);
      tidy(() => expect(relErr(outputs(fromFile)[0]!, outputs(trained)[0]!)).toBeLessThanOrEqual(1e-5));
    } finally {
      dispose([...state.values()]);
      disposeAll(trained);
      disposeAll(fromFile);
    }
    // resumed from checkpoint-1: the same file, byte for byte
    const resumed = join(tmp, `resumed-${type}`);
    cpSync(join(straight, 'checkpoint-1'), join(resumed, 'checkpoint-1'), { recursive: true });
    await runTraining(libBase(resumed, { ...more, resumeFromCheckpoint: 'latest' }));
    const a = loadSafetensors(join(straight, 'pytorch_lora_weights.safetensors')).tensors;
    const b = loadSafetensors(join(resumed, 'pytorch_lora_weights.safetensors')).tensors;
    try {
      expect([...b.keys()]).toEqual([...a.keys()]);
      for (const [k, t] of a) expect(relErr(b.get(k)!, t), k).toBe(0);
    } finally {
      dispose([...a.values(), ...b.values()]);
    }
  }, 300_000);
});

describe('the CLI commands with --lora_type', () => {
  it('train --lora_type locon --lora_alpha 2 --conv_rank 2 --export_kohya: both files load to the same model', async () => {
    const out = join(tmp, 'cli-locon');
    const r = await runMain(['train', `--pretrained_model_name_or_path=${tinySd}`, `--train_data_dir=${data}`, '--resolution=32', '--train_batch_size=2',
      '--max_train_steps=2', '--learning_rate=1e-2', '--lr_warmup_steps=0', '--seed=7', `--output_dir=${out}`, '--lora_type=locon', '--lora_alpha=2',
      '--conv_rank=2', '--export_kohya']);
    expect(r.code, r.err).toBe(0);
    const names = readSafetensorsHeader(join(out, 'pytorch_lora_weights.safetensors')).tensors.map((t) => t.name);
    expect(names).toContain('unet.down_blocks.0.resnets.0.conv1.lora.down.weight');
    expect(names).toContain('unet.down_blocks.0.downsamplers.0.conv.lora.up.weight');
    const kohya = readSafetensorsHeader(join(out, 'pytorch_lora_weights_kohya.safetensors'));
    expect(kohya.tensors.map((t) => t.name)).toContain('lora_unet_down_blocks_0_resnets_0_conv1.alpha');
    expect(kohya.metadata).toMatchObject({ ss_network_module: 'networks.lora' });
    expectSameModels(tinySd, [out, join(out, 'pytorch_lora_weights_kohya.safetensors')]);
  }, 300_000);

  it('train-dreambooth --lora_type loha --train_text_encoder: LyCORIS keys for the UNet and the text encoder', async () => {
    const out = join(tmp, 'cli-db-loha');
    const r = await runMain(['train-dreambooth', `--pretrained_model_name_or_path=${tinySd}`, `--instance_data_dir=${data}`, '--instance_prompt=a photo of sks dog',
      '--resolution=32', '--train_batch_size=1', '--max_train_steps=2', '--learning_rate=1e-2', '--seed=7', `--output_dir=${out}`, '--train_text_encoder',
      '--lora_type=loha', '--export_kohya']);
    expect(r.code, r.err).toBe(0);
    const header = readSafetensorsHeader(join(out, 'pytorch_lora_weights.safetensors'));
    const names = header.tensors.map((t) => t.name);
    expect(names).toContain('lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_a');
    expect(names).toContain('lora_te_text_model_encoder_layers_0_self_attn_q_proj.hada_w2_b');
    expect(header.metadata).toMatchObject({ ss_network_module: 'lycoris.kohya' });
    expectSameModels(tinySd, [out, join(out, 'pytorch_lora_weights_kohya.safetensors')], { te: true });
  }, 300_000);

  it('train-sdxl --lora_type dora --lora_alpha 2 --train_text_encoder --export_kohya: PEFT magnitudes in the diffusers file, dora_scale and SGM names in the Kohya one', async () => {
    const out = join(tmp, 'cli-sdxl-dora');
    const r = await runMain(['train-sdxl', `--pretrained_model_name_or_path=${tinySdxl}`, `--train_data_dir=${data}`, '--resolution=64', '--train_batch_size=2',
      '--max_train_steps=2', '--learning_rate=1e-2', '--seed=7', `--output_dir=${out}`, '--train_text_encoder', '--lora_type=dora', '--lora_alpha=2', '--export_kohya']);
    expect(r.code, r.err).toBe(0);
    const names = readSafetensorsHeader(join(out, 'pytorch_lora_weights.safetensors')).tensors.map((t) => t.name);
    expect(names).toContain('unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector');
    expect(names).toContain('text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_magnitude_vector');
    const kohya = readSafetensorsHeader(join(out, 'pytorch_lora_weights_kohya.safetensors')).tensors.map((t) => t.name);
    expect(kohya).toContain('lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.dora_scale');
    expect(kohya).toContain('lora_te2_text_model_encoder_layers_0_self_attn_q_proj.dora_scale');
    expectSameModels(tinySdxl, [out, join(out, 'pytorch_lora_weights_kohya.safetensors')], { te: true, sdxl: true });
  }, 300_000);
});

describe('bad input: named, exit 2, nothing written', () => {
  const train = (out: string, ...more: string[]) => ['train', `--pretrained_model_name_or_path=${tinySd}`, `--train_data_dir=${data}`, '--resolution=32',
    '--max_train_steps=1', `--output_dir=${out}`, ...more];
  it.each([
    [['--lora_type=foo'], /--lora_type must be one of lora, locon, loha, lokr, dora, got "foo"/],
    [['--lora_alpha=0'], /--lora_alpha must be a finite number > 0, got 0/],
    [['--lora_alpha=-2'], /--lora_alpha must be a finite number > 0, got -2/],
    [['--conv_alpha=0', '--lora_type=locon'], /--conv_alpha must be a finite number > 0, got 0/],
    [['--conv_rank=4'], /--conv_rank puts LoRA on the UNet's convs, which --lora_type lora does not adapt: use --lora_type locon/],
    [['--conv_alpha=2', '--lora_type=loha'], /--conv_alpha is the alpha of conv adapters, and --lora_type loha without --conv_rank adapts no convs/],
    [['--lokr_factor=4'], /--lokr_factor applies to --lora_type lokr only/],
    [['--lora_type=lokr', '--lokr_factor=0'], /--lokr_factor must be -1 .* got 0/],
    [['--lora_target_modules=to_q,,to_v'], /--lora_target_modules must be a comma-separated list of module names/],
    [['--lora_target_modules=to_q,to_kk,attn9.to_x'], /--lora_target_modules: 'to_kk', 'attn9\.to_x' match no module of the UNet2DConditionModel/],
    [['--lora_type=locon', '--conv_rank=1000'], /--conv_rank 1000 is larger than the smallest layer LoRA adapts, .*Conv2d .*3×3\): --conv_rank must be at most \d+/],
    [['--lora_type=loha', '--rank=64'], /--rank 64 is larger than the smallest layer LoRA adapts, .*\(Linear 32 → 32\): --rank must be at most 32/],
  ])('train %j', async (flags, message) => {
    const out = join(tmp, `bad-${flags.join('').replace(/\W/g, '')}`);
    const r = await runMain(train(out, ...flags));
    expect(r.code, r.err).toBe(2);
    expect(r.err).toMatch(message);
    expect(existsSync(out)).toBe(false);
  }, 120_000);

  it('train-sdxl and train-dreambooth check the same flags', async () => {
    const sdxl = await runMain(['train-sdxl', `--pretrained_model_name_or_path=${tinySdxl}`, `--train_data_dir=${data}`, '--lora_type=lycoris', '--conv_rank=2']);
    expect(sdxl.code).toBe(2);
    expect(sdxl.err).toMatch(/--lora_type must be one of lora, locon, loha, lokr, dora, got "lycoris"/);
    const db = await runMain(['train-dreambooth', `--pretrained_model_name_or_path=${tinySd}`, `--instance_data_dir=${data}`, '--instance_prompt=x', '--conv_rank=2']);
    expect(db.code).toBe(2);
    expect(db.err).toMatch(/--conv_rank puts LoRA on the UNet's convs/);
  });

  it('the library refuses the same, naming option and flag', () => {
    const o = { pretrainedModelNameOrPath: tinySd, trainDataDir: data };
    expect(() => validateTrainOptions({ ...o, loraType: 'foo' })).toThrow(/loraType \(--lora_type\) must be one of lora, locon, loha, lokr, dora, got "foo"/);
    expect(() => validateTrainOptions({ ...o, loraAlpha: 0 })).toThrow(/loraAlpha \(--lora_alpha\) must be a finite number > 0/);
    expect(() => validateTrainOptions({ ...o, convRank: 2 })).toThrow(/convRank \(--conv_rank\) puts LoRA on the UNet's convs/);
    expect(() => validateSdxlTrainOptions({ ...o, loraType: 'dora', convAlpha: 1 })).toThrow(/convAlpha \(--conv_alpha\) is the alpha of conv adapters/);
    expect(() => validateDreamBoothOptions({ pretrainedModelNameOrPath: tinySd, instanceDataDir: data, instancePrompt: 'x', loraTargetModules: 'a, ,b' }))
      .toThrow(/loraTargetModules \(--lora_target_modules\) must be a comma-separated list/);
  });
});
