// --optimizer prodigy|lion and --use_ema through the commands, on the tiny pipeline at 32 px: the files written
// (pytorch_lora_weights_ema.safetensors beside the trained LoRA, same keys), the optimizer's kind and state and the
// EMA in the checkpoints, exact resume per optimizer (N steps straight == resumed from checkpoint k, byte for byte on
// CPU), the notices diffusers gives, and bad input: refused with exit 2 naming the flag, nothing written.
import { cpSync, existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadSafetensors, readSafetensorsHeader } from '../lib/io/safetensors.js';
import { dispose, tidy } from '../lib/scope.js';
import { makeImageFolder, runMain as run, tinySd } from './cli_helpers.js';
import { fixtures } from './helpers.js';

let tmp: string;
let data: string;
let instances: string;
beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-cli-optim-'));
  data = join(tmp, 'data');
  instances = join(tmp, 'instances');
  await makeImageFolder(data, 4);
  await makeImageFolder(instances, 2);
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const STEPS = 4;
const train = (out: string, ...more: string[]) => ['train', `--pretrained_model_name_or_path=${tinySd}`, `--train_data_dir=${data}`,
  '--resolution=32', '--random_flip', '--train_batch_size=1', '--checkpointing_steps=2', `--max_train_steps=${STEPS}`, '--seed=11',
  `--output_dir=${out}`, ...more];

const bytes = (f: string) => readFileSync(f);
const state = (dir: string) => JSON.parse(readFileSync(join(dir, 'training_state.json'), 'utf8')) as Record<string, Record<string, unknown>>;
const keysOf = (f: string) => readSafetensorsHeader(f).tensors.map((t) => t.name).sort();

/** The largest |a − b| over two LoRA files' tensors. */
function maxDiff(a: string, b: string): number {
  const x = loadSafetensors(a).tensors;
  const y = loadSafetensors(b).tensors;
  try {
    return Math.max(...[...x].map(([k, t]) => tidy(() => t.sub(y.get(k)!).abs().max().item())));
  } finally { dispose([...x.values(), ...y.values()]); }
}

/** Runs `argv` straight, then again resumed from checkpoint-2 of a copy: the final files must be byte-identical. */
async function straightAndResumed(name: string, argv: (out: string) => string[]): Promise<{ out: string; err: string }> {
  const out = join(tmp, `${name}-straight`);
  const ref = await run(argv(out));
  expect(ref.code, ref.err).toBe(0);
  const resumed = join(tmp, `${name}-resumed`);
  const partial = await run([...argv(resumed), '--max_train_steps=2']); // the first half, then resumed to STEPS
  expect(partial.code, partial.err).toBe(0);
  rmSync(join(resumed, 'pytorch_lora_weights.safetensors'));
  rmSync(join(resumed, 'pytorch_lora_weights_ema.safetensors'), { force: true });
  const second = await run([...argv(resumed), '--resume_from_checkpoint=latest']);
  expect(second.code, second.err).toBe(0);
  for (const f of ['pytorch_lora_weights.safetensors', ...(existsSync(join(out, 'pytorch_lora_weights_ema.safetensors')) ? ['pytorch_lora_weights_ema.safetensors'] : [])]) {
    expect(bytes(join(resumed, f)).equals(bytes(join(out, f))), `${name}: ${f}`).toBe(true);
  }
  return { out, err: ref.err };
}

describe('difflora train --optimizer prodigy --use_ema', () => {
  it('writes the LoRA and its EMA, checkpoints Prodigy state and the EMA, and resumes exactly', async () => {
    const { out, err } = await straightAndResumed('prodigy', (o) => train(o, '--optimizer=Prodigy', '--learning_rate=1.0', '--use_ema', '--ema_decay=0.9',
      '--prodigy_use_bias_correction=True', '--adam_weight_decay=0.01', '--lr_scheduler=constant_with_warmup', '--lr_warmup_steps=1'));
    expect(err).not.toMatch(/generally better around 1\.0/);
    expect(err).toMatch(/saved the EMA of the LoRA weights .*pytorch_lora_weights_ema\.safetensors; validation used the trained weights/);
    const lora = join(out, 'pytorch_lora_weights.safetensors');
    const ema = join(out, 'pytorch_lora_weights_ema.safetensors');
    expect(keysOf(ema)).toEqual(keysOf(lora));
    expect(keysOf(lora).length).toBeGreaterThan(10);
    expect(readSafetensorsHeader(ema).metadata).toEqual(readSafetensorsHeader(lora).metadata);
    expect(maxDiff(ema, lora)).toBeGreaterThan(0); // an average of the steps, not the last weights
    const s = state(join(out, `checkpoint-${STEPS}`));
    expect(s.optimizer!.kind).toBe('prodigy');
    expect(s.optimizer!.useBiasCorrection).toBe(true);
    expect(s.optimizer!.dNumerator as number).toBeGreaterThan(0); // the d estimate's sums accumulated (d grows after more steps)
    expect(s.optimizer!.d as number).toBeGreaterThanOrEqual(1e-6);
    expect(s.optimizer!.k).toBe(STEPS - 1); // the warm-up's first step has lr 0: Prodigy skips it, as prodigy.py
    expect(s.ema).toEqual({ decay: 0.9, optimizationStep: STEPS });
    const tensors = keysOf(join(out, `checkpoint-${STEPS}`, 'training_state.safetensors'));
    for (const k of ['optimizer.0.exp_avg', 'optimizer.0.exp_avg_sq', 'optimizer.0.s', 'optimizer.0.p0', 'ema.0']) expect(tensors).toContain(k);

    // another optimizer, or the EMA setting changed, is refused naming both, and nothing is written
    const other = await run([...train(out, '--optimizer=lion', '--use_ema'), '--resume_from_checkpoint=latest', `--max_train_steps=${STEPS + 2}`]);
    expect(other.code).not.toBe(0);
    expect(other.err).toMatch(/was trained with --optimizer prodigy, this run has --optimizer lion/);
    const noEma = await run([...train(out, '--optimizer=prodigy'), '--resume_from_checkpoint=latest', `--max_train_steps=${STEPS + 2}`]);
    expect(noEma.code).not.toBe(0);
    expect(noEma.err).toMatch(/holds an EMA of the weights \(--use_ema\) and this run has no --use_ema/);
    expect(existsSync(join(out, `checkpoint-${STEPS + 2}`))).toBe(false);
  });
});

describe('difflora train --optimizer lion', () => {
  it('trains, resumes exactly, and says that Prodigy flags are ignored', async () => {
    const { out, err } = await straightAndResumed('lion', (o) => train(o, '--optimizer=lion', '--learning_rate=1e-4', '--adam_beta2=0.99', '--prodigy_beta3=0.9'));
    expect(err).toMatch(/--prodigy_beta3 is ignored with --optimizer lion/);
    expect(existsSync(join(out, 'pytorch_lora_weights_ema.safetensors'))).toBe(false);
    const s = state(join(out, 'checkpoint-2'));
    expect(s.optimizer).toMatchObject({ kind: 'lion', betas: [0.9, 0.99], weightDecay: 0.01 });
    // an AdamW checkpoint (no kind) is refused by a Lion run, naming both
    const adamw = join(tmp, 'adamw');
    cpSync(join(out, 'checkpoint-2'), join(adamw, 'checkpoint-2'), { recursive: true });
    const json = state(join(adamw, 'checkpoint-2'));
    json.optimizer = { steps: json.optimizer!.steps, lr: 1e-4, betas: [0.9, 0.999], eps: 1e-8, weightDecay: 0.01 };
    const { writeFileSync } = await import('node:fs');
    writeFileSync(join(adamw, 'checkpoint-2', 'training_state.json'), JSON.stringify(json));
    const r = await run([...train(adamw, '--optimizer=lion'), '--resume_from_checkpoint=latest']);
    expect(r.code).not.toBe(0);
    expect(r.err).toMatch(/was trained with --optimizer adamw, this run has --optimizer lion/);
  });
});

describe('difflora train-dreambooth --optimizer prodigy --use_ema', () => {
  it('writes both files and gives the learning-rate notice', async () => {
    const out = join(tmp, 'dreambooth');
    const r = await run(['train-dreambooth', `--pretrained_model_name_or_path=${tinySd}`, `--instance_data_dir=${instances}`, '--instance_prompt=a photo of sks dog',
      '--resolution=32', '--train_batch_size=1', '--max_train_steps=2', '--seed=3', `--output_dir=${out}`, '--optimizer=prodigy', '--use_ema',
      '--prodigy_safeguard_warmup=true', '--prodigy_decouple=false']);
    expect(r.code, r.err).toBe(0);
    expect(r.err).toMatch(/--learning_rate=0\.0005 with --optimizer prodigy: .*better around 1\.0/);
    expect(keysOf(join(out, 'pytorch_lora_weights_ema.safetensors'))).toEqual(keysOf(join(out, 'pytorch_lora_weights.safetensors')));
  });
});

describe('difflora train-sdxl --optimizer lion --use_ema --train_text_encoder', () => {
  it('trains both text encoders\' and the UNet\'s LoRA with Lion and writes the EMA beside it', async () => {
    const out = join(tmp, 'sdxl');
    const r = await run(['train-sdxl', `--pretrained_model_name_or_path=${join(fixtures, 'tiny-sdxl')}`, `--train_data_dir=${data}`, '--resolution=64',
      '--train_text_encoder', '--train_batch_size=2', '--max_train_steps=2', '--checkpointing_steps=2', '--learning_rate=1e-4', '--seed=5',
      `--output_dir=${out}`, '--optimizer=lion', '--use_ema', '--ema_decay=0.5']);
    expect(r.code, r.err).toBe(0);
    const keys = keysOf(join(out, 'pytorch_lora_weights_ema.safetensors'));
    expect(keys).toEqual(keysOf(join(out, 'pytorch_lora_weights.safetensors')));
    expect(keys.some((k) => k.startsWith('text_encoder_2.'))).toBe(true);
    expect(state(join(out, 'checkpoint-2')).optimizer!.kind).toBe('lion');
    expect(state(join(out, 'checkpoint-2')).ema).toEqual({ decay: 0.5, optimizationStep: 2 });
  });
});

describe('bad input', () => {
  it.each([
    [['--optimizer=sgd'], /--optimizer must be one of adamw, prodigy, lion, got "sgd"/],
    [['--ema_decay=0', '--use_ema'], /--ema_decay must be in \(0, 1\), got 0/],
    [['--ema_decay=1', '--use_ema'], /--ema_decay must be a number in \[0, 1\), got 1/],
    [['--prodigy_decouple=maybe', '--optimizer=prodigy'], /--prodigy_decouple must be true or false, got "maybe"/],
    [['--prodigy_beta3=1.5', '--optimizer=prodigy'], /--prodigy_beta3 must be a number in \[0, 1\), got 1\.5/],
  ])('%j is refused with exit 2, naming the flag, before anything is written', async (flags, message) => {
    for (const command of ['train', 'train-sdxl']) {
      const out = join(tmp, `bad-${command}`);
      const argv = command === 'train' ? train(out, ...flags) : ['train-sdxl', `--pretrained_model_name_or_path=${tinySd}`, `--train_data_dir=${data}`, `--output_dir=${out}`, ...flags];
      const r = await run(argv);
      expect(r.code, `${command}: ${r.err}`).toBe(2);
      expect(r.err).toMatch(message);
      expect(existsSync(out)).toBe(false);
    }
  });
});

describe('flag parsing (all three commands)', () => {
  it('takes --optimizer case-insensitively and the --prodigy_* values as Python users write them', async () => {
    const { parseTrainArgs } = await import('../lib/cli/train_args.js');
    const { parseSdxlTrainArgs } = await import('../lib/cli/train_sdxl_args.js');
    const { parseDreamBoothArgs } = await import('../lib/cli/dreambooth_args.js');
    const env = {};
    const flags = ['--optimizer=Prodigy', '--prodigy_decouple=False', '--prodigy_use_bias_correction', 'True', '--prodigy_safeguard_warmup=1', '--prodigy_beta3=0.99', '--use_ema', '--ema_decay=0.995'];
    const want = { optimizer: 'prodigy', prodigyDecouple: false, prodigyUseBiasCorrection: true, prodigySafeguardWarmup: true, prodigyBeta3: 0.99, useEma: true, emaDecay: 0.995 };
    expect(parseTrainArgs(['--pretrained_model_name_or_path=m', '--train_data_dir=d', ...flags], env)).toMatchObject(want);
    expect(parseSdxlTrainArgs(['--pretrained_model_name_or_path=m', '--train_data_dir=d', ...flags], env).options).toMatchObject(want);
    expect(parseDreamBoothArgs(['--pretrained_model_name_or_path=m', '--instance_data_dir=d', '--instance_prompt=p', ...flags], env).options).toMatchObject(want);
    expect(parseSdxlTrainArgs(['--pretrained_model_name_or_path=m', '--train_data_dir=d', '--optimizer', 'AdamW'], env).options.optimizer).toBe('adamw');
    expect(parseDreamBoothArgs(['--pretrained_model_name_or_path=m', '--instance_data_dir=d', '--instance_prompt=p', '--optimizer=LION'], env).options.optimizer).toBe('lion');
    // not given: the defaults (AdamW, no EMA)
    const plain = parseTrainArgs(['--pretrained_model_name_or_path=m', '--train_data_dir=d'], env);
    expect(plain.optimizer ?? 'adamw').toBe('adamw');
    expect(plain.useEma ?? false).toBe(false);
  });

  it('the library refuses what the CLI refuses, naming the option', async () => {
    const { validateTrainOptions } = await import('../lib/training/options.js');
    const base = { pretrainedModelNameOrPath: 'm', trainDataDir: 'd' };
    expect(() => validateTrainOptions({ ...base, optimizer: 'Prodigy' })).toThrow(/optimizer \(--optimizer\) must be one of adamw, prodigy, lion, got "Prodigy"/);
    expect(() => validateTrainOptions({ ...base, emaDecay: 0 })).toThrow(/emaDecay \(--ema_decay\) must be in \(0, 1\), got 0/);
    expect(() => validateTrainOptions({ ...base, prodigyDecouple: 'yes' })).toThrow(/prodigyDecouple \(--prodigy_decouple\) must be true or false, got "yes"/);
    expect(() => validateTrainOptions({ ...base, optimizer: 'lion', prodigyBeta3: null, useEma: true, emaDecay: 0.5 })).not.toThrow();
  });

  it('notices: Prodigy flags with another optimizer, --ema_decay without --use_ema, Prodigy far from lr 1', async () => {
    const { optimNotices } = await import('../lib/training/optim_options.js');
    const none = { optimizer: 'adamw', prodigyBeta3: null, prodigyDecouple: null, prodigyUseBiasCorrection: null, prodigySafeguardWarmup: null, useEma: false, emaDecay: 0.9999, learningRate: 1e-4 } as const;
    expect(optimNotices(none)).toEqual([]);
    expect(optimNotices({ ...none, prodigyDecouple: false, prodigySafeguardWarmup: true })).toEqual(['--prodigy_decouple, --prodigy_safeguard_warmup are ignored with --optimizer adamw (Prodigy\'s only)']);
    expect(optimNotices({ ...none, emaDecay: 0.99 })).toEqual(['--ema_decay=0.99 is ignored without --use_ema']);
    expect(optimNotices({ ...none, useEma: true, emaDecay: 0.99 })).toEqual([]);
    expect(optimNotices({ ...none, optimizer: 'prodigy', learningRate: 1 })).toEqual([]);
    expect(optimNotices({ ...none, optimizer: 'prodigy', learningRate: 20 })[0]).toMatch(/--learning_rate=20 with --optimizer prodigy/);
  });
});
