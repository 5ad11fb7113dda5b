// `difflora train-dreambooth` as a real child process on the tiny pipeline: 4 instance pictures, prior
// preservation with class images the command generates, --train_text_encoder, 6 steps, checkpoints. Killed with
// SIGKILL during the class-image generation and again during training, then resumed: the class images and the
// final pytorch_lora_weights.safetensors are byte-identical to an uninterrupted run's, and the file has the keys
// of diffusers' save_lora_weights (goldens/dreambooth-lora.json). Then bad input (usage errors listed at once,
// exit 2; a missing instance folder and a broken class image named, exit 1; several processes refused) and the library handle.
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ProcessGroup } from '../lib/distributed/process_group.js';
import { readSafetensorsHeader } from '../lib/io/safetensors.js';
import { trainDreamBoothLora } from '../lib/training/handle.js';
import { killWhen, makeImageFolder, runCli, runMain as run, tinySd } from './cli_helpers.js';
import { fixtures } from './helpers.js';

let tmp: string;
let instances: string;
beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-dreambooth-'));
  instances = join(tmp, 'instances');
  await makeImageFolder(instances, 4);
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const MAX_STEPS = 6;
const args = (out: string, classes: string, ...more: string[]) => ['train-dreambooth', `--pretrained_model_name_or_path=${tinySd}`,
  `--instance_data_dir=${instances}`, '--instance_prompt=a photo of sks dog', '--with_prior_preservation', `--class_data_dir=${classes}`,
  '--class_prompt=a photo of dog', '--num_class_images=2', '--sample_batch_size=1', '--train_text_encoder', '--resolution=32',
  '--train_batch_size=1', `--max_train_steps=${MAX_STEPS}`, '--checkpointing_steps=2', '--learning_rate=1e-3', '--seed=7', `--output_dir=${out}`, ...more];

const jpgs = (dir: string): string[] => (existsSync(dir) ? readdirSync(dir).filter((n) => n.endsWith('.jpg')).sort() : []);
const stepsOf = (stderr: string): number[] => [...stderr.matchAll(/^step (\d+)\//gm)].map((m) => Number(m[1]));


describe('difflora train-dreambooth: prior preservation, text-encoder LoRA, SIGKILL and resume', () => {
  it('generates the class images, trains, and ends byte-identical to an uninterrupted run after two kills', async () => {
    const straight = join(tmp, 'straight');
    const straightClasses = join(tmp, 'classes-straight');
    const ref = await runCli(args(straight, straightClasses));
    expect(ref.code, ref.stderr).toBe(0);
    expect(ref.stderr).toMatch(/generating class images: 0\/2 in .*classes-straight/);
    expect(ref.stderr).toMatch(/generating class images: 2\/2/);
    expect(stepsOf(ref.stderr)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(jpgs(straightClasses)).toHaveLength(2);
    expect(jpgs(straightClasses).every((n) => /^[01]-[0-9a-f]{40}\.jpg$/.test(n))).toBe(true);

    const out = join(tmp, 'killed');
    const classes = join(tmp, 'classes-killed');
    // 1. killed during the class-image generation, once the first image is written
    const first = await killWhen(args(out, classes), () => jpgs(classes).length >= 1);
    expect(first.signal, first.stderr).toBe('SIGKILL');
    expect(jpgs(classes)).toHaveLength(1);
    // 2. run again (no checkpoint yet): the generation continues at the missing image; killed after checkpoint-2
    const second = await killWhen(args(out, classes), () => existsSync(join(out, 'checkpoint-2')));
    expect(second.signal, second.stderr).toBe('SIGKILL');
    expect(second.stderr).toMatch(/generating class images: 1\/2/);
    expect(second.stderr).toMatch(/generating class images: 2\/2 in .* \(1 by this run\)/);
    // the class images are the uninterrupted run's, byte for byte, and nothing half-written is left
    expect(jpgs(classes)).toEqual(jpgs(straightClasses));
    for (const n of jpgs(classes)) expect(readFileSync(join(classes, n)).equals(readFileSync(join(straightClasses, n))), n).toBe(true);
    expect(readdirSync(classes).filter((n) => n.startsWith('.'))).toEqual([]);
    // 3. resumed to the end
    const last = await runCli(args(out, classes, '--resume_from_checkpoint=latest'));
    expect(last.code, last.stderr).toBe(0);
    expect(last.stderr).not.toMatch(/generating class images/);
    expect(stepsOf(last.stderr).at(-1)).toBe(MAX_STEPS);
    const a = readFileSync(join(straight, 'pytorch_lora_weights.safetensors'));
    const b = readFileSync(join(out, 'pytorch_lora_weights.safetensors'));
    expect(b.equals(a)).toBe(true);
    // the file diffusers' save_lora_weights writes for the UNet and the text encoder
    const golden = JSON.parse(readFileSync(join(fixtures, 'goldens', 'dreambooth-lora.json'), 'utf8')) as { keys_in_file_order: string[] };
    const header = readSafetensorsHeader(join(out, 'pytorch_lora_weights.safetensors'));
    expect(header.tensors.map((t) => t.name)).toEqual(golden.keys_in_file_order);
    expect(header.metadata).toEqual({ format: 'pt' });
    // the checkpoint holds both components; the model card is DreamBooth's
    expect(readSafetensorsHeader(join(out, 'checkpoint-6', 'training_state.safetensors')).tensors.some((t) => t.name.startsWith('lora.text_encoder.'))).toBe(true);
    expect(readFileSync(join(out, 'README.md'), 'utf8')).toMatch(/LoRA DreamBooth[\s\S]*trained on a photo of sks dog[\s\S]*text encoder was enabled: True/);
  }, 600_000);
});


describe('difflora train-dreambooth: bad input', () => {
  it('the script\'s flag errors, refused flags and bad values are listed at once (exit 2), before anything is written', async () => {
    const out = join(tmp, 'never');
    const r = await run(['train-dreambooth', `--pretrained_model_name_or_path=${tinySd}`, `--instance_data_dir=${instances}`, '--instance_prompt=sks',
      '--with_prior_preservation', '--train_text_encoder', '--pre_compute_text_embeddings', '--report_to=wandb', '--validation_images=a.png',
      '--prior_loss_weight=-1', '--prior_generation_precision=fp8', `--output_dir=${out}`]);
    expect(r.code, r.err).toBe(2);
    for (const line of [
      /--with_prior_preservation needs --class_data_dir: You must specify a data directory for class images\./,
      /--with_prior_preservation needs --class_prompt: You must specify prompt for class images\./,
      /--train_text_encoder cannot be used with --pre_compute_text_embeddings/,
      /--report_to=wandb is not supported/, /--validation_images is for image-conditioned pipelines/,
      /--prior_loss_weight must be a finite number ≥ 0, got -1/, /prior_generation_precision/,
    ]) expect(r.err).toMatch(line);
    expect(existsSync(out)).toBe(false);
    const typo = await run(['train-dreambooth', '--instance_prompts=x']);
    expect(typo.code).toBe(2);
    expect(typo.err).toMatch(/unknown flag '--instance_prompts' \(did you mean '--instance_prompt'\?\)/);
  });

  it('a missing instance folder is named before any model loads (exit 1, no output folder left)', async () => {
    const out = join(tmp, 'no-instances');
    const r = await run(['train-dreambooth', `--pretrained_model_name_or_path=${tinySd}`, `--instance_data_dir=${join(tmp, 'nope')}`, '--instance_prompt=sks', `--output_dir=${out}`]);
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/--instance_data_dir '.*nope': Instance images root doesn't exist/);
    expect(existsSync(out)).toBe(false);
  });

  it('several processes are refused (one process only), before anything is generated or written', async () => {
    const out = join(tmp, 'several');
    const classes = join(tmp, 'several-classes');
    const options = {
      pretrainedModelNameOrPath: tinySd, instanceDataDir: instances, instancePrompt: 'sks', withPriorPreservation: true, classDataDir: classes,
      classPrompt: 'dog', numClassImages: 2, resolution: 32, maxTrainSteps: 1, outputDir: out,
    };
    // a caller's group of 2 (only its size is read before the refusal)
    const group = { rank: 0, worldSize: 2 } as unknown as ProcessGroup;
    await expect(trainDreamBoothLora(options, { processGroup: group })).rejects.toThrow(/difflora train-dreambooth trains in one process only, not on several \(2\)/);
    expect(existsSync(out)).toBe(false);
    expect(existsSync(classes)).toBe(false);
  });

  it('a broken class image stops the run naming the file (exit 1)', async () => {
    const classes = join(tmp, 'broken-classes');
    await makeImageFolder(classes, 1);
    writeFileSync(join(classes, '1-broken.png'), 'not a png');
    const r = await run(['train-dreambooth', `--pretrained_model_name_or_path=${tinySd}`, `--instance_data_dir=${instances}`, '--instance_prompt=sks',
      '--with_prior_preservation', `--class_data_dir=${classes}`, '--class_prompt=dog', '--num_class_images=2', '--resolution=32', '--train_batch_size=2',
      '--max_train_steps=2', `--output_dir=${join(tmp, 'broken-out')}`]);
    expect(r.code, r.err).toBe(1);
    expect(r.err).toMatch(/1-broken\.png/);
    expect(r.err).not.toMatch(/generating class images/);
  });
});

describe('trainDreamBoothLora (library)', () => {
  it('the same handle as trainTextToImageLora: progress events and metrics; pre-computed embeddings without prior preservation', async () => {
    const steps: number[] = [];
    const run = trainDreamBoothLora({
      pretrainedModelNameOrPath: tinySd, instanceDataDir: instances, instancePrompt: 'a photo of sks dog', preComputeTextEmbeddings: true,
      textEncoderUseAttentionMask: true, tokenizerMaxLength: 16, resolution: 32, trainBatchSize: 2, maxTrainSteps: 3, checkpointingSteps: null,
      seed: 1, outputDir: join(tmp, 'lib'),
    });
    run.on('progress', (p) => steps.push(p.step));
    const r = await run;
    expect(steps).toEqual([1, 2, 3]);
    expect(r.metrics.steps).toBe(3);
    expect(Number.isFinite(r.metrics.finalLoss)).toBe(true);
    const keys = readSafetensorsHeader(r.outputFile).tensors.map((t) => t.name);
    expect(keys).toHaveLength(96);
    expect(keys.every((k) => k.startsWith('unet.'))).toBe(true);
    expect(() => trainDreamBoothLora({ pretrainedModelNameOrPath: tinySd, instanceDataDir: instances, instancePrompt: 'x', withPriorPreservation: true }))
      .toThrow(/classDataDir \(--class_data_dir\)/);
  }, 120_000);
});
