// `difflora train` flags against REFERENCE.md's table of train_text_to_image_lora.py (names, defaults, meaning),
// the refusals of flags that cannot act here, and the `difflora` entry point (train / env / --help / exit codes).
import { describe, expect, it } from 'vitest';
import { blasReport, main, type MainOptions, type TrainFn } from '../lib/cli/main.js';
import { TRAIN_FLAGS, UsageError, closestFlag, parseTrainArgs, type TrainArgs } from '../lib/cli/train_args.js';
import { TRAIN_OPTION_NAMES, type TrainOptions } from '../lib/training/options.js';

const MODEL = '--pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5';
const DATA = '--dataset_name=lambdalabs/naruto-blip-captions';
const base = [MODEL, DATA];
const noEnv: NodeJS.ProcessEnv = {};
const parse = (...flags: string[]) => parseTrainArgs([...base, ...flags], noEnv);

function usageError(fn: () => unknown): UsageError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(UsageError);
    return e as UsageError;
  }
  throw new Error('expected a UsageError');
}

async function run(argv: string[], options: MainOptions = {}) {
  let out = '';
  let err = '';
  const code = await main(argv, {
    stdout: { write: (s: string) => { out += s; } },
    stderr: { write: (s: string) => { err += s; } },
    env: {},
    ...options,
  });
  return { code, out, err };
}

// Every flag of REFERENCE.md's table, sorted.
const TABLE_FLAGS = [
  'adam_beta1', 'adam_beta2', 'adam_epsilon', 'adam_weight_decay', 'allow_tf32', 'cache_dir', 'caption_column',
  'center_crop', 'checkpointing_steps', 'checkpoints_total_limit', 'dataloader_num_workers', 'dataset_config_name',
  'dataset_name', 'enable_xformers_memory_efficient_attention', 'gradient_accumulation_steps',
  'gradient_checkpointing', 'hub_model_id', 'hub_token', 'image_column', 'image_interpolation_mode',
  'learning_rate', 'local_rank', 'logging_dir', 'lr_scheduler', 'lr_warmup_steps', 'max_grad_norm',
  'max_train_samples', 'max_train_steps', 'mixed_precision', 'noise_offset', 'num_train_epochs',
  'num_validation_images', 'output_dir', 'prediction_type', 'pretrained_model_name_or_path', 'push_to_hub',
  'random_flip', 'rank', 'report_to', 'resolution', 'resume_from_checkpoint', 'revision', 'scale_lr', 'seed',
  'snr_gamma', 'train_batch_size', 'train_data_dir', 'use_8bit_adam', 'validation_epochs', 'validation_prompt',
  'variant',
];

// The guide's command (diffusers' text2image LoRA docs), with `=` throughout.
const GUIDE = [
  '--pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5',
  '--dataset_name=lambdalabs/naruto-blip-captions',
  '--resolution=512', '--center_crop', '--random_flip',
  '--train_batch_size=1', '--gradient_accumulation_steps=4', '--max_train_steps=15000',
  '--learning_rate=1e-04', '--max_grad_norm=1', '--lr_scheduler=cosine', '--lr_warmup_steps=0',
  '--output_dir=/tmp/naruto-lora', '--checkpointing_steps=500',
  '--validation_prompt=A naruto with blue eyes.', '--seed=1337',
];

describe('parseTrainArgs', () => {
  it("parses the guide's command", () => {
    const a = parseTrainArgs(GUIDE, noEnv);
    expect(a).toMatchObject({
      pretrainedModelNameOrPath: 'stable-diffusion-v1-5/stable-diffusion-v1-5',
      datasetName: 'lambdalabs/naruto-blip-captions', trainDataDir: undefined,
      resolution: 512, centerCrop: true, randomFlip: true, trainBatchSize: 1, gradientAccumulationSteps: 4,
      maxTrainSteps: 15000, learningRate: 1e-4, maxGradNorm: 1, lrScheduler: 'cosine', lrWarmupSteps: 0,
      outputDir: '/tmp/naruto-lora', checkpointingSteps: 500, validationPrompt: 'A naruto with blue eyes.', seed: 1337,
      warnings: [],
    });
  });

  it('accepts --flag value as well as --flag=value, the last occurrence winning', () => {
    const spaced = GUIDE.flatMap((t) => {
      const eq = t.indexOf('=');
      return eq < 0 ? [t] : [t.slice(0, eq), t.slice(eq + 1)];
    });
    expect(parseTrainArgs(spaced, noEnv)).toEqual(parseTrainArgs(GUIDE, noEnv));
    expect(parse('--rank', '8', '--rank=16').rank).toBe(16);
    expect(parse('--local_rank', '-1').localRank).toBe(-1);
    // a spaced negative number is read as the value (not as a flag), then refused by its domain: the training
    // step refuses a negative offset, so the parser does too, at once
    expect(usageError(() => parse('--noise_offset', '-0.05')).message).toMatch(/^--noise_offset must be a finite number ≥ 0, got -0.05$/);
    expect(parse('--noise_offset', '0.05').noiseOffset).toBe(0.05);
  });

  it("has the script's defaults (REFERENCE.md table)", () => {
    const a = parseTrainArgs(['--pretrained_model_name_or_path=m', '--train_data_dir=data'], noEnv);
    const expected: Omit<TrainArgs, 'pretrainedModelNameOrPath' | 'trainDataDir'> = {
      revision: undefined, variant: undefined, builtinDefault: false,
      datasetName: undefined, datasetConfigName: undefined, imageColumn: 'image', captionColumn: 'text',
      maxTrainSamples: undefined, cacheDir: undefined,
      resolution: 512, centerCrop: false, randomFlip: false, imageInterpolationMode: 'lanczos', dataloaderNumWorkers: 0,
      rank: 4,
      trainBatchSize: 16, numTrainEpochs: 100, maxTrainSteps: undefined, gradientAccumulationSteps: 1,
      gradientCheckpointing: false, learningRate: 1e-4, scaleLr: false, lrScheduler: 'constant', lrWarmupSteps: 500,
      use8bitAdam: false, adamBeta1: 0.9, adamBeta2: 0.999, adamWeightDecay: 1e-2, adamEpsilon: 1e-8,
      maxGradNorm: 1.0, allowTf32: false,
      snrGamma: undefined, predictionType: undefined, noiseOffset: 0,
      mixedPrecision: undefined, enableXformersMemoryEfficientAttention: false,
      validationPrompt: undefined, numValidationImages: 4, validationEpochs: 1,
      outputDir: 'sd-model-finetuned-lora', checkpointingSteps: 500, checkpointsTotalLimit: undefined,
      resumeFromCheckpoint: undefined,
      loggingDir: 'logs', reportTo: 'tensorboard',
      pushToHub: false, hubToken: undefined, hubModelId: undefined,
      seed: undefined, localRank: -1, warnings: [],
    };
    expect(a).toEqual({ pretrainedModelNameOrPath: 'm', trainDataDir: 'data', ...expected });
    // Every flag of REFERENCE.md's table is declared, and nothing else (51 flags).
    expect(Object.keys(TRAIN_FLAGS).sort()).toEqual(TABLE_FLAGS);
    // ... and each maps to a TrainArgs field.
    for (const flag of Object.keys(TRAIN_FLAGS)) {
      const camel = flag.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());
      expect(a, flag).toHaveProperty(camel);
    }
  });

  it('carries the flags that change nothing numerically', () => {
    const a = parse('--allow_tf32', '--gradient_checkpointing', '--cache_dir=/c', '--revision=main', '--variant=fp16',
      '--dataloader_num_workers=2', '--scale_lr', '--snr_gamma=5.0', '--prediction_type=v_prediction',
      '--mixed_precision=bf16', '--image_interpolation_mode=bilinear', '--resume_from_checkpoint=latest',
      '--checkpoints_total_limit=3', '--max_train_samples=100', '--image_column=img', '--caption_column=caption',
      '--dataset_config_name=default', '--logging_dir=tb', '--num_validation_images=2', '--validation_epochs=5',
      '--num_train_epochs=3', '--adam_beta1=0.8', '--adam_beta2=0.99', '--adam_weight_decay=0', '--adam_epsilon=1e-6');
    expect(a).toMatchObject({
      allowTf32: true, gradientCheckpointing: true, cacheDir: '/c', revision: 'main', variant: 'fp16',
      dataloaderNumWorkers: 2, scaleLr: true, snrGamma: 5, predictionType: 'v_prediction', mixedPrecision: 'bf16',
      imageInterpolationMode: 'bilinear', resumeFromCheckpoint: 'latest', checkpointsTotalLimit: 3,
      maxTrainSamples: 100, imageColumn: 'img', captionColumn: 'caption', datasetConfigName: 'default',
      loggingDir: 'tb', numValidationImages: 2, validationEpochs: 5, numTrainEpochs: 3, adamBeta1: 0.8,
      adamBeta2: 0.99, adamWeightDecay: 0, adamEpsilon: 1e-6, warnings: [],
    });
    // A prompt that looks like a number stays a string.
    expect(parse('--validation_prompt=1337').validationPrompt).toBe('1337');
  });

  it('refuses unknown flags, naming them and suggesting the closest', () => {
    expect(usageError(() => parse('--learning_rte=1e-4')).message).toMatch(/unknown flag '--learning_rte'.*did you mean '--learning_rate'/);
    expect(usageError(() => parse('--train-batch-size', '2')).message).toMatch(/'--train-batch-size'.*'--train_batch_size'/);
    expect(usageError(() => parse('--trainBatchSize=2')).message).toMatch(/'--trainBatchSize'.*'--train_batch_size'/);
    expect(usageError(() => parse('--no-center_crop')).message).toMatch(/unknown flag '--no-center_crop'/);
    expect(usageError(() => parse('--zzzzzzzzzzzzzzzzzzzz')).message).not.toMatch(/did you mean/);
    expect(usageError(() => parse('extra')).message).toMatch(/unexpected argument 'extra'/);
    expect(usageError(() => parse('-x')).message).toMatch(/unknown flag '-x'/);
    expect(closestFlag('snr_gama')).toBe('snr_gamma');
  });

  it('requires the model and a dataset, as the script does', () => {
    expect(usageError(() => parseTrainArgs([DATA], noEnv)).message).toMatch(/--pretrained_model_name_or_path is required/);
    expect(usageError(() => parseTrainArgs([MODEL], noEnv)).message).toMatch(/Need either a dataset name or a training folder/);
    expect(parseTrainArgs([MODEL, '--train_data_dir', './data'], noEnv).trainDataDir).toBe('./data');
  });

  it('checks choices, numbers and values', () => {
    expect(usageError(() => parse('--lr_scheduler=cosine_annealing')).message).toMatch(/lr_scheduler.*cosine_annealing/s);
    expect(usageError(() => parse('--mixed_precision=fp8')).message).toMatch(/mixed_precision/);
    expect(usageError(() => parse('--prediction_type=sample')).message).toMatch(/prediction_type/);
    expect(usageError(() => parse('--image_interpolation_mode=LANCZOS')).message).toMatch(/image_interpolation_mode/);
    expect(usageError(() => parse('--learning_rate=abc')).message).toMatch(/--learning_rate expects a number, got 'abc'/);
    expect(usageError(() => parse('--learning_rate', 'abc')).message).toMatch(/--learning_rate expects a number/);
    expect(usageError(() => parse('--train_batch_size=1.5')).message).toMatch(/--train_batch_size expects an integer, got '1.5'/);
    expect(usageError(() => parse('--seed=0x10')).message).toMatch(/--seed expects an integer/);
    expect(usageError(() => parse('--resolution')).message).toMatch(/--resolution expects a value/);
    expect(usageError(() => parse('--output_dir', '--center_crop')).message).toMatch(/--output_dir expects a value/);
    expect(usageError(() => parse('--center_crop=false')).message).toMatch(/--center_crop is a switch/);
    expect(usageError(() => parse('--train_batch_size=0')).message).toMatch(/--train_batch_size must be at least 1/);
    for (const s of ['linear', 'cosine', 'cosine_with_restarts', 'polynomial', 'constant', 'constant_with_warmup']) {
      expect(parse(`--lr_scheduler=${s}`).lrScheduler).toBe(s);
    }
  });

  it('refuses values outside each flag\'s domain, naming the flag and the value, every problem at once', () => {
    const cases: [string, RegExp][] = [
      ['--learning_rate=1e309', /^--learning_rate must be a finite number > 0, got Infinity$/],
      ['--learning_rate=0', /--learning_rate must be a finite number > 0, got 0/],
      ['--max_grad_norm=0', /--max_grad_norm must be a finite number > 0, got 0/],
      ['--max_grad_norm=-1', /--max_grad_norm must be a finite number > 0, got -1/],
      ['--adam_beta1=1', /--adam_beta1 must be a number in \[0, 1\), got 1/],
      ['--adam_beta2=-0.1', /--adam_beta2 must be a number in \[0, 1\), got -0.1/],
      ['--adam_epsilon=0', /--adam_epsilon must be a finite number > 0, got 0/],
      ['--adam_weight_decay=-1e-2', /--adam_weight_decay must be a finite number ≥ 0, got -0.01/],
      ['--snr_gamma=0', /--snr_gamma must be a finite number > 0, got 0/],
      ['--noise_offset=1e39', /--noise_offset must be at most 3.4028234663852886e\+38/],
      ['--resolution=30', /--resolution must be a multiple of 8 .*got 30/],
      ['--resolution=8192', /--resolution must be at most 4096/],
      ['--dataloader_num_workers=1000000', /--dataloader_num_workers must be at most 64 .*got 1000000/],
      ['--dataloader_num_workers=-1', /--dataloader_num_workers must be at least 0, got -1/],
      ['--max_train_steps=99999999999999999999', /--max_train_steps must be at most 9007199254740991, got 100000000000000000000/],
      ['--lr_warmup_steps=-1', /--lr_warmup_steps must be at least 0/],
      ['--checkpoints_total_limit=0', /--checkpoints_total_limit must be at least 1/],
      ['--validation_epochs=0', /--validation_epochs must be at least 1/],
      ['--num_validation_images=1000', /--num_validation_images must be at most 64/],
      ['--seed=-1', /--seed must be at least 0, got -1/],
      ['--output_dir=', /--output_dir must not be empty/],
      ['--rank=0', /--rank must be at least 1, got 0/],
      // the script's torchvision choices without a libvips kernel here: refused at once, not after loading the model
      ['--image_interpolation_mode=box', /--image_interpolation_mode must be one of bicubic, bilinear, lanczos, nearest, got "box"/],
    ];
    for (const [flag, message] of cases) expect(usageError(() => parse(flag)).message, flag).toMatch(message);
    const all = usageError(() => parse('--learning_rate=1e309', '--max_grad_norm=-1', '--resolution=30', '--seed=-1')).message;
    expect(all).toMatch(/^4 problems with the flags:\n {2}- --resolution .*\n {2}- --learning_rate .*\n {2}- --max_grad_norm .*\n {2}- --seed /);
    const tokens = usageError(() => parse('--learning_rte=1', '--rank=abc', 'stray')).message;
    expect(tokens).toMatch(/^3 problems with the command line:\n {2}- unknown flag '--learning_rte' \(did you mean '--learning_rate'\?\)\n {2}- --rank expects an integer, got 'abc'\n {2}- unexpected argument 'stray'/);
    // --rank has no fixed bound: it is checked against the model's layers once the UNet is loaded (train.test.ts)
    expect(parse('--rank=100000').rank).toBe(100000);
  });

  it('refuses what cannot act here and warns about stand-ins', () => {
    expect(usageError(() => parse('--push_to_hub')).message).toMatch(/cannot push/);
    expect(usageError(() => parse('--hub_token=hf_x')).message).toMatch(/cannot push/);
    expect(usageError(() => parse('--hub_model_id=me/lora')).message).toMatch(/cannot push/);
    for (const r of ['wandb', 'comet_ml', 'all']) {
      expect(usageError(() => parse(`--report_to=${r}`)).message).toMatch(new RegExp(`--report_to=${r} is not supported.*'tensorboard'`));
    }
    expect(parse('--report_to', 'tensorboard').reportTo).toBe('tensorboard');
    const adam = parse('--use_8bit_adam');
    expect(adam.use8bitAdam).toBe(true);
    expect(adam.warnings).toHaveLength(1);
    expect(adam.warnings[0]).toMatch(/--use_8bit_adam.*falling back to AdamW/);
    const xf = parse('--enable_xformers_memory_efficient_attention');
    expect(xf.enableXformersMemoryEfficientAttention).toBe(true);
    expect(xf.warnings).toEqual([]); // it acts: memory-efficient attention (test/attention_memory.test.ts)
  });

  it('lets LOCAL_RANK override --local_rank, as the script', () => {
    expect(parseTrainArgs(base, { LOCAL_RANK: '2' }).localRank).toBe(2);
    expect(parseTrainArgs([...base, '--local_rank=1'], { LOCAL_RANK: '3' }).localRank).toBe(3);
    expect(parseTrainArgs([...base, '--local_rank=1'], { LOCAL_RANK: '-1' }).localRank).toBe(1);
    expect(parseTrainArgs([...base, '--local_rank=1'], {}).localRank).toBe(1);
    expect(usageError(() => parseTrainArgs(base, { LOCAL_RANK: 'x' })).message).toMatch(/LOCAL_RANK/);
  });
});

describe('difflora main', () => {
  it('train: usage errors exit 2 with the message and a pointer to --help', async () => {
    const r = await run(['train', ...base, '--learning_rte=1']);
    expect(r.code).toBe(2);
    expect(r.err).toMatch(/unknown flag '--learning_rte'.*did you mean '--learning_rate'/);
    expect(r.err).toContain("Run 'difflora train --help' for the flags.");
    expect((await run(['train', DATA])).code).toBe(2);
    expect((await run(['train', ...base, '--push_to_hub'])).err).toMatch(/cannot push/);
  });

  it('train: hands the training options (not the CLI-only fields) to the training loop, warnings on stderr', async () => {
    let got: TrainOptions | undefined;
    const trainer: TrainFn = async (options) => {
      got = options;
      return { validationImages: [], outputFile: '/tmp/x/pytorch_lora_weights.safetensors', globalStep: 1, lastLoss: 0.1, checkpoints: [], skippedImages: { count: 0, files: [] } };
    };
    const r = await run(['train', ...GUIDE, '--use_8bit_adam'], { loadTrainer: async () => trainer });
    expect(r.code).toBe(0);
    expect(got?.maxTrainSteps).toBe(15000);
    expect(Object.keys(got ?? {}).filter((k) => !TRAIN_OPTION_NAMES.includes(k as keyof TrainOptions))).toEqual([]);
    expect(r.err).toMatch(/warning: --use_8bit_adam/);
    expect(r.out).toContain('pytorch_lora_weights.safetensors');
  });

  it('train --help documents every flag', async () => {
    const r = await run(['train', '--help']);
    expect(r.code).toBe(0);
    for (const flag of Object.keys(TRAIN_FLAGS)) expect(r.out).toContain(`--${flag}`);
    expect(r.out).toMatch(/--snr_gamma\s+Min-SNR/);
    expect(r.out).toMatch(/--rank\s+Dimension of the LoRA/);
    expect(r.out).toMatch(/\[default: 16\]/);
  });

  it('env prints the libtorch version and returns 0', async () => {
    const { native } = await import('../lib/native.js');
    const r = await run(['env']);
    expect(r.code).toBe(0);
    expect(r.out).toContain(`libtorch: ${native.info().torchVersion}`);
    expect(r.out).toMatch(/CUDA: /);
    expect(r.out).toContain(`Node.js: ${process.version}`);
    expect(r.out).toMatch(/^BLAS: /m);
    expect(r.out).toMatch(/^missing:( nothing)?$/m);
    if (!native.info().cudaAvailable) expect(r.out).toMatch(/^ {2}- CUDA: /m);
  });

  it('env names the BLAS library mapped, and the reference BLAS as missing OpenBLAS', () => {
    const line = (f: string) => `7f00-7f10 r-xp 00000000 08:01 123 ${f}`;
    expect(blasReport([line('/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3'), line('/usr/lib/x86_64-linux-gnu/libc.so.6')].join('\n')))
      .toEqual({ line: 'BLAS: OpenBLAS (/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3)', missing: null });
    const ref = blasReport(line('/usr/lib/x86_64-linux-gnu/blas/libblas.so.3'));
    expect(ref.line).toBe('BLAS: the reference BLAS (/usr/lib/x86_64-linux-gnu/blas/libblas.so.3)');
    expect(ref.missing).toMatch(/^OpenBLAS: .*36x slower.*libopenblas0-pthread/);
    expect(blasReport(line('/opt/intel/lib/libmkl_rt.so.2')).line).toMatch(/^BLAS: MKL /);
    expect(blasReport(null).missing).toBeNull();
  });

  it("env returns 1 with the loader's error when the addon does not load", async () => {
    const r = await run(['env'], { loadNativeInfo: async () => { throw new Error('difflora: could not load the native addon (x).\nPossible solutions:'); } });
    expect(r.code).toBe(1);
    expect(r.err).toContain('Possible solutions:');
  });

  it('--help, --version, unknown commands', async () => {
    const help = await run(['--help']);
    expect(help.code).toBe(0);
    expect(help.out).toMatch(/train/);
    expect(help.out).toMatch(/env/);
    expect(help.out).toMatch(/launch .*accelerate launch's flags/);
    expect(help.out).toMatch(/dist-check .*test every collective/);
    const version = await run(['--version']);
    expect(version.code).toBe(0);
    expect(version.out.trim()).toMatch(/^\d+\.\d+\.\d+/);
    const bad = await run(['trian']);
    expect(bad.code).toBe(2);
    expect(bad.err).toMatch(/trian/);
    expect((await run([])).code).toBe(2);
  });
});
