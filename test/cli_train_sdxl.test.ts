// `difflora train-sdxl` as a real child process on tiny-sdxl at 64 px: 4 captioned pictures, --train_text_encoder
// (LoRA on both text encoders), --random_flip, 4 steps, checkpoints every 2. Killed with SIGKILL after the first
// checkpoint and resumed with `latest`: the final pytorch_lora_weights.safetensors is byte-identical to an
// uninterrupted run's (which also ran validation: it does not disturb the training), with the keys of the script's
// save_lora_weights (goldens/sdxl-lora-diffusers-te.json). Then bad input (usage errors listed at once, exit 2; a
// missing model and an SD 1.x model named, exit 1) and the library handle.
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readSafetensorsHeader } from '../lib/io/safetensors.js';
import { SDXL_TRAIN_FLAGS } from '../lib/cli/train_sdxl_args.js';
import { OPTIM_FLAGS } from '../lib/cli/optim_flags.js';
import { CACHE_FLAGS } from '../lib/cli/cache_flags.js';
import { trainTextToImageLoraSdxl } from '../lib/training/handle.js';
import { killWhen, makeImageFolder, runCli, runMain as run, tinySd } from './cli_helpers.js';
import { BUCKETS_CAPTIONS_FLAGS } from '../lib/cli/buckets_captions_flags.js';
import { fixtures } from './helpers.js';

const tinySdxl = join(fixtures, 'tiny-sdxl');
let tmp: string;
let data: string;
beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-train-sdxl-'));
  data = join(tmp, 'data');
  await makeImageFolder(data, 4);
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const MAX_STEPS = 4;
const args = (out: string, ...more: string[]) => ['train-sdxl', `--pretrained_model_name_or_path=${tinySdxl}`, `--train_data_dir=${data}`,
  '--resolution=64', '--train_text_encoder', '--random_flip', '--train_batch_size=2', `--max_train_steps=${MAX_STEPS}`, '--checkpointing_steps=2',
  '--learning_rate=1e-3', '--seed=7', `--output_dir=${out}`, ...more];
const stepsOf = (stderr: string): number[] => [...stderr.matchAll(/^step (\d+)\//gm)].map((m) => Number(m[1]));


describe('difflora train-sdxl: text-encoder LoRA, checkpoints, SIGKILL and resume', () => {
  it('trains, and a run killed after checkpoint-2 and resumed with latest ends byte-identical to an uninterrupted one', async () => {
    const straight = join(tmp, 'straight');
    const ref = await runCli(args(straight, '--validation_prompt=a photo of a cat', '--num_validation_images=1', '--export_kohya'));
    expect(ref.code, ref.stderr).toBe(0);
    expect(stepsOf(ref.stderr)).toEqual([1, 2, 3, 4]);
    expect(readdirSync(straight).filter((n) => n.startsWith('checkpoint-')).sort()).toEqual(['checkpoint-2', 'checkpoint-4']);
    expect(existsSync(join(straight, 'image_0.png'))).toBe(true); // the final validation, from the saved file
    // --export_kohya: Kohya's SDXL names next to the diffusers file (136 UNet + 12 + 16 text-encoder modules)
    const kohya = readSafetensorsHeader(join(straight, 'pytorch_lora_weights_kohya.safetensors'));
    expect(kohya.tensors.length).toBe(164 * 3);
    expect(kohya.tensors.map((t) => t.name)).toContain('lora_unet_output_blocks_2_1_transformer_blocks_1_attn2_to_out_0.lora_up.weight');
    expect(kohya.tensors.map((t) => t.name)).toContain('lora_te2_text_model_encoder_layers_3_self_attn_out_proj.alpha');
    expect(readFileSync(join(straight, 'README.md'), 'utf8')).toMatch(/stable-diffusion-xl[\s\S]*text encoder was enabled: True[\s\S]*StableDiffusionXLPipeline/);

    const out = join(tmp, 'killed');
    const killed = await killWhen(args(out), () => existsSync(join(out, 'checkpoint-2')));
    expect(killed.signal, killed.stderr).toBe('SIGKILL');
    const last = await runCli(args(out, '--resume_from_checkpoint=latest'));
    expect(last.code, last.stderr).toBe(0);
    expect(stepsOf(last.stderr)[0]).toBeGreaterThan(2); // resumed, not restarted
    expect(stepsOf(last.stderr).at(-1)).toBe(MAX_STEPS);
    const a = readFileSync(join(straight, 'pytorch_lora_weights.safetensors'));
    const b = readFileSync(join(out, 'pytorch_lora_weights.safetensors'));
    expect(b.equals(a)).toBe(true);
    // the keys, order and metadata of the script's StableDiffusionXLPipeline.save_lora_weights with both encoders
    const golden = JSON.parse(readFileSync(join(fixtures, 'goldens', 'sdxl-lora-diffusers-te.json'), 'utf8')) as { keys_in_file_order: string[] };
    const header = readSafetensorsHeader(join(out, 'pytorch_lora_weights.safetensors'));
    expect(header.tensors.map((t) => t.name)).toEqual(golden.keys_in_file_order);
    expect(header.metadata).toEqual({ format: 'pt' });
    expect(readSafetensorsHeader(join(out, 'checkpoint-4', 'training_state.safetensors')).tensors.some((t) => t.name.startsWith('lora.text_encoder_2.'))).toBe(true);
  }, 600_000);
});


describe('difflora train-sdxl: the flags of train_text_to_image_lora_sdxl.py', () => {
  it('every flag of the script (goldens/sdxl_lora_train.json script.flags), same name, order, default, type and choices; then difflora\'s own', () => {
    const ref = JSON.parse(readFileSync(join(fixtures, 'goldens', 'sdxl_lora_train.json'), 'utf8')) as {
      script: { flags: { flag: string; default: unknown; type: string | null; action: string; choices: string[] | null }[] };
    };
    const ours = Object.entries(SDXL_TRAIN_FLAGS);
    expect(ours.map(([n]) => `--${n}`).slice(0, ref.script.flags.length)).toEqual(ref.script.flags.map((f) => f.flag));
    expect(ours.slice(ref.script.flags.length).map(([n]) => n)).toEqual(['skip_broken_images', 'cuda_graphs', ...Object.keys(BUCKETS_CAPTIONS_FLAGS), ...Object.keys(OPTIM_FLAGS), ...Object.keys(CACHE_FLAGS), 'lora_type', 'lora_alpha', 'lora_target_modules', 'conv_rank', 'conv_alpha', 'lokr_factor', 'export_kohya']);
    const kinds: Record<string, string> = { str: 'string', int: 'int', float: 'float' };
    for (const f of ref.script.flags) {
      const spec = SDXL_TRAIN_FLAGS[f.flag.slice(2)]!;
      expect(spec.kind, f.flag).toBe(f.action === 'store_true' ? 'boolean' : kinds[f.type ?? '']);
      expect(spec.default ?? null, f.flag).toEqual(f.default);
      if (f.choices) expect(spec.choices, f.flag).toEqual(f.choices);
    }
  });
});

describe('difflora train-sdxl: bad input', () => {
  it('refused flags, the script\'s checks and bad values are listed at once (exit 2), before anything is written', async () => {
    const out = join(tmp, 'never');
    const r = await run(['train-sdxl', `--pretrained_model_name_or_path=${tinySdxl}`, '--report_to=wandb', '--enable_npu_flash_attention', '--push_to_hub',
      '--rank=0', '--resolution=100', '--mixed_precision=fp8', `--output_dir=${out}`]);
    expect(r.code, r.err).toBe(2);
    for (const line of [
      /Need either a dataset name or a training folder: give --dataset_name or --train_data_dir/, /--report_to=wandb is not supported/,
      /--enable_npu_flash_attention needs an Ascend NPU/, /cannot push to the Hugging Face Hub/, /--rank must be at least 1, got 0/,
      /--resolution must be a multiple of 8/, /--mixed_precision must be one of no, fp16, bf16/,
    ]) expect(r.err).toMatch(line);
    expect(r.err).toMatch(/Run 'difflora train-sdxl --help'/);
    expect(existsSync(out)).toBe(false);
    const typo = await run(['train-sdxl', '--pretrained_vae_model_name=x']);
    expect(typo.code).toBe(2);
    expect(typo.err).toMatch(/unknown flag '--pretrained_vae_model_name' \(did you mean '--pretrained_vae_model_name_or_path'\?\)/);
  });

  it('a missing model is named (exit 1, no output folder left)', async () => {
    const out = join(tmp, 'no-model');
    const r = await run(['train-sdxl', `--pretrained_model_name_or_path=${join(tmp, 'nope')}`, `--train_data_dir=${data}`, `--output_dir=${out}`]);
    expect(r.code, r.err).toBe(1);
    expect(r.err).toMatch(/nope/);
    expect(existsSync(out)).toBe(false);
  });

  it('an SD 1.x model is refused naming its pipeline class and the command that trains it (exit 1)', async () => {
    const out = join(tmp, 'sd1');
    const r = await run(['train-sdxl', `--pretrained_model_name_or_path=${tinySd}`, `--train_data_dir=${data}`, `--output_dir=${out}`]);
    expect(r.code, r.err).toBe(1);
    expect(r.err).toMatch(/holds a StableDiffusionPipeline .*not a StableDiffusionXLPipeline: SDXL LoRA training needs an SDXL model; train Stable Diffusion 1\.x\/2\.x LoRAs with 'difflora train'/);
    expect(existsSync(out)).toBe(false);
  });
});

describe('difflora train-sdxl with no model or data flags', () => {
  it('trains the built-in default: a generated tiny SDXL pipeline (both encoders, text_time UNet) and pictures', async () => {
    const out = join(tmp, 'builtin');
    const r = await run(['train-sdxl', `--output_dir=${out}`, '--max_train_steps=3', '--checkpointing_steps=3', '--train_text_encoder', '--validation_prompt=a red circle', '--num_validation_images=1']);
    expect(r.code, r.err).toBe(0);
    expect(r.err).toMatch(/difflora train-sdxl: no model or data given — training the built-in default: a tiny random-weight SDXL pipeline/);
    expect(r.err).toMatch(/step 3\/3 /);
    const header = readSafetensorsHeader(join(out, 'pytorch_lora_weights.safetensors'));
    expect(header.metadata).toEqual({ format: 'pt' });
    for (const part of ['unet.', 'text_encoder.', 'text_encoder_2.']) expect(header.tensors.some((t) => t.name.startsWith(part)), part).toBe(true);
    expect(existsSync(join(out, 'checkpoint-3'))).toBe(true);
    expect(existsSync(join(out, 'image_0.png'))).toBe(true);
    const once = await run(['train-sdxl', '--train_data_dir=x']);
    expect(once.code).toBe(2);
    expect(once.err).toMatch(/--pretrained_model_name_or_path is required/);
  }, 300_000);
});

describe('trainTextToImageLoraSdxl (library)', () => {
  it('the same handle as trainTextToImageLora: progress events, metrics, the UNet-only file of the script', async () => {
    const steps: number[] = [];
    const handle = trainTextToImageLoraSdxl({
      pretrainedModelNameOrPath: tinySdxl, trainDataDir: data, resolution: 64, trainBatchSize: 2, maxTrainSteps: 2, seed: 1, centerCrop: true,
      snrGamma: 5, noiseOffset: 0.05, debugLoss: true, outputDir: join(tmp, 'library'), device: 'cpu',
    });
    handle.on('progress', (p) => steps.push(p.step));
    const r = await handle;
    expect(steps).toEqual([1, 2]);
    expect(r.metrics.steps).toBe(2);
    expect(Number.isFinite(r.metrics.finalLoss)).toBe(true);
    const golden = JSON.parse(readFileSync(join(fixtures, 'goldens', 'sdxl-lora-diffusers.json'), 'utf8')) as { keys_in_file_order: string[] };
    expect(readSafetensorsHeader(r.outputFile).tensors.map((t) => t.name)).toEqual(golden.keys_in_file_order);
    // --debug_loss: each image's loss under loss_for_<file name> in the TensorBoard events
    const logs = join(tmp, 'library', 'logs');
    const events = readdirSync(logs, { recursive: true }).map(String).filter((f) => f.includes('tfevents')).map((f) => readFileSync(join(logs, f)).toString('latin1')).join('');
    expect(events).toMatch(/loss_for_\d\.png/);
    expect(() => trainTextToImageLoraSdxl({ pretrainedModelNameOrPath: tinySdxl, trainDataDir: data, imageInterpolationMode: 'bilinear' } as never))
      .toThrow(/imageInterpolationMode/);
  }, 300_000);

  it('bf16 with a VAE given apart (--pretrained_vae_model_name_or_path), text-encoder LoRA, checkpointing, memory-efficient attention, v-prediction', async () => {
    const r = await trainTextToImageLoraSdxl({
      pretrainedModelNameOrPath: tinySdxl, pretrainedVaeModelNameOrPath: join(tinySdxl, 'vae'), trainDataDir: data, resolution: 64, trainBatchSize: 2,
      maxTrainSteps: 2, seed: 3, mixedPrecision: 'bf16', trainTextEncoder: true, gradientCheckpointing: true, enableXformersMemoryEfficientAttention: true,
      predictionType: 'v_prediction', randomFlip: true, outputDir: join(tmp, 'bf16'), device: 'cpu',
    });
    expect(r.metrics.losses.every((l) => Number.isFinite(l))).toBe(true);
    const header = readSafetensorsHeader(r.outputFile);
    expect(header.tensors.every((t) => t.dtype === 'float32')).toBe(true); // the LoRA trains and is saved in float32
    expect(header.tensors.some((t) => t.name.startsWith('text_encoder_2.'))).toBe(true);
  }, 300_000);
});
