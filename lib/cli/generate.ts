// `difflora generate`: text to image with a Stable Diffusion 1.x/2.x or SDXL pipeline (picked from model_index.json's
// _class_name) and any number of LoRA files, and
// `difflora convert-lora`: a LoRA file between the diffusers/PEFT and Kohya layouts. Flags are snake_case
// like the training script's; mistakes are UsageErrors (exit 2) naming the flag.
import { existsSync, mkdirSync, statSync } from 'node:fs';
import { basename, dirname, extname, join } from 'node:path';
import { commandParser } from './parser.js';
import { writeFileAtomic } from '../io/atomic.js';
import { checkOutputTarget } from '../io/files.js';
import { formatProblems } from '../training/options.js';
import { UsageError } from './train_args.js';
import { A1111_SAMPLERS, SCHEDULER_NAMES, schedulerName } from '../schedulers/names.js';

/** What --scheduler accepts: our short names, diffusers' class names and the A1111 sampler names (checked without the addon). */
const SCHEDULER_HELP = `Sampler: ${SCHEDULER_NAMES.join(', ')}; a diffusers class name (EulerDiscreteScheduler, …); `
  + `or an A1111/ComfyUI name: ${[...A1111_SAMPLERS.keys()].map((k) => `"${k}"`).join(', ')} `
  + "(default: the pipeline's scheduler_config.json, PNDM for SD 1.x)";

export interface LoraSpec { path: string; weight: number }

export interface GenerateArgs {
  pretrainedModelNameOrPath: string | undefined;
  revision: string | undefined;
  variant: string | undefined;
  cacheDir: string | undefined;
  loras: LoraSpec[];
  loraScale: number;
  prompt: string;
  negativePrompt: string | undefined;
  /** SDXL only: the second text encoder's prompts. */
  prompt2: string | undefined;
  negativePrompt2: string | undefined;
  numInferenceSteps: number;
  /** Unset: the pipeline's default (7.5 for SD 1.x/2.x, 5 for SDXL, as diffusers). */
  guidanceScale: number | undefined;
  /** A scheduler name, class name or A1111 name (checked). */
  scheduler: string | undefined;
  seed: number | undefined;
  latents: string | undefined;
  height: number | undefined;
  width: number | undefined;
  numImages: number;
  output: string;
  /** Unset: CUDA when available (as `difflora train`), else the CPU. */
  device?: string;
  mixedPrecision: 'no' | 'fp16' | 'bf16';
  clipSkip: number | undefined;
  memoryEfficientAttention: boolean;
  /** --cuda_graphs: the UNet call recorded in a CUDA graph and replayed (GenerateOptions.cudaGraphs); set only when given. */
  cudaGraphs?: boolean;
  /** Image to image: the starting picture (StableDiffusionImg2ImgPipeline) and how much of the schedule runs. */
  initImage: string | undefined;
  strength: number | undefined;
}

const GENERATE_USAGE = 'Usage: difflora generate --prompt "<text>" [--pretrained_model_name_or_path=<model>] [--lora=<file>[:<weight>] ...] [flags]\n\n'
  + 'Text to image (or image to image with --init_image) with a Stable Diffusion 1.x/2.x or SDXL pipeline (a local diffusers folder or a model id in the offline Hugging Face cache; '
  + "the pipeline is model_index.json's _class_name), "
  + 'with any number of LoRA files (diffusers, PEFT or Kohya format). Without --pretrained_model_name_or_path it uses the built-in tiny model '
  + "that 'difflora train' trains by default.";

function generateParser(argv: readonly string[]) {
  return commandParser(argv, GENERATE_USAGE, { repeatable: true })
    .options({
      pretrained_model_name_or_path: { type: 'string', describe: 'Pipeline folder or model id in the offline HF cache (default: the built-in tiny model)' },
      revision: { type: 'string', describe: 'Revision of the model in the HF cache' },
      variant: { type: 'string', describe: "Weight variant, e.g. 'fp16' (diffusion_pytorch_model.fp16.safetensors)" },
      cache_dir: { type: 'string', describe: 'Hugging Face cache folder (default $HF_HUB_CACHE / ~/.cache/huggingface/hub)' },
      lora: { type: 'string', array: true, describe: 'LoRA file or folder, optionally with a weight: --lora=style.safetensors:0.7 (repeatable: adapters are combined)' },
      lora_scale: { type: 'number', default: 1, describe: "Scale of all LoRA adapters at run time (diffusers' cross_attention_kwargs={'scale': s})" },
      prompt: { type: 'string', describe: 'The prompt (required)' },
      negative_prompt: { type: 'string', describe: 'What not to draw (default: empty; SDXL: none, which conditions on zeros as diffusers)' },
      prompt_2: { type: 'string', describe: "SDXL: the second text encoder's prompt (default: --prompt)" },
      negative_prompt_2: { type: 'string', describe: "SDXL: the second text encoder's negative prompt (default: --negative_prompt)" },
      num_inference_steps: { type: 'number', default: 50, describe: 'Denoising steps' },
      guidance_scale: { type: 'number', describe: 'Classifier-free guidance weight (≤ 1: off; default 7.5, SDXL 5)' },
      scheduler: { type: 'string', describe: SCHEDULER_HELP },
      seed: { type: 'number', describe: 'Seed of the initial noise (CPU generator: the same image on every device)' },
      latents: { type: 'string', describe: "Initial latents from a .safetensors file (its 'latents' tensor, or its only tensor)" },
      height: { type: 'number', describe: 'Image height, a multiple of 8 (default: the model\'s, 512 for SD 1.5, 1024 for SDXL)' },
      width: { type: 'number', describe: 'Image width, a multiple of 8' },
      num_images: { type: 'number', default: 1, describe: 'Images per prompt' },
      output: { type: 'string', default: 'image.png', describe: 'PNG file to write (several images: name-0.png, name-1.png, …); an existing folder gets image-<i>.png' },
      device: { type: 'string', describe: "'cpu' or 'cuda' / 'cuda:N' (default: cuda:0 when CUDA is available, as train; else cpu)" },
      mixed_precision: { type: 'string', choices: ['no', 'fp16', 'bf16'], default: 'no', describe: 'Weights and compute in fp16 (CUDA) or bf16' },
      clip_skip: { type: 'number', describe: 'Condition on the text encoder layer this many before the last' },
      init_image: { type: 'string', describe: 'Image to image: the starting picture (PNG, JPEG, WebP…; SD 1.x/2.x), resized down to multiples of 8' },
      strength: { type: 'number', describe: 'With --init_image: how much of the schedule runs, 0–1 (default 0.8; 1 ignores most of the picture)' },
      cuda_graphs: { type: 'boolean', describe: 'Record the UNet call in a CUDA graph after the first step and replay it (CUDA; elsewhere a warning and the usual steps); the same images' },
      enable_xformers_memory_efficient_attention: { type: 'boolean', default: false, describe: 'Memory-efficient attention in the UNet and VAE (no xformers: query chunks on libtorch 1.13, the fused kernel on 2.x); less peak memory, the same images' },
    });
}

export async function generateHelp(): Promise<string> {
  return generateParser([]).getHelp();
}

/** A flag's value; given several times, the last one wins (as argparse). */
function single<T>(r: Record<string, unknown>, key: string): T | undefined {
  const v = r[key];
  return (Array.isArray(v) ? v[v.length - 1] : v) as T | undefined;
}

/** Largest --height/--width: 4096 px (8× SD 1.5's 512), beyond which one image's activations exceed any GPU. */
export const MAX_IMAGE_SIZE = 4096;
/** Most --num_inference_steps: the schedulers refuse more steps than the model's 1000 training timesteps. */
export const MAX_INFERENCE_STEPS = 1000;
/** Most --num_images per run. */
export const MAX_IMAGES = 64;
/** --guidance_scale and LoRA weights/scales beyond ±100 only saturate the image (1e309 gave a black PNG). */
export const MAX_GUIDANCE = 100;

/** The numeric flags' domains: [key, whole number?, min, max, what the max is about]. */
const NUMERIC_FLAGS: readonly [string, boolean, number, number, string][] = [
  ['num_inference_steps', true, 1, MAX_INFERENCE_STEPS, "the schedulers' 1000 training timesteps"],
  ['guidance_scale', false, 0, MAX_GUIDANCE, '≤ 1 turns guidance off; large values only saturate the image'],
  ['lora_scale', false, -MAX_GUIDANCE, MAX_GUIDANCE, ''],
  ['seed', true, 0, Number.MAX_SAFE_INTEGER, ''],
  ['height', true, 8, MAX_IMAGE_SIZE, ''],
  ['width', true, 8, MAX_IMAGE_SIZE, ''],
  ['num_images', true, 1, MAX_IMAGES, ''],
  ['clip_skip', true, 0, Number.MAX_SAFE_INTEGER, ''],
  ['strength', false, 0, 1, ''],
];

/** The text last given for `--key` (yargs has already turned it into a number, NaN for 'abc'). */
function rawValue(argv: readonly string[], key: string): string | undefined {
  let raw: string | undefined;
  argv.forEach((t, i) => {
    if (t.startsWith(`--${key}=`)) raw = t.slice(key.length + 3);
    else if (t === `--${key}`) raw = argv[i + 1] ?? '';
  });
  return raw;
}

const NUMBER_RE = /^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$/;

/** What is wrong with a numeric flag's value (not given: nothing), naming the flag and the value. */
function numericProblem(argv: readonly string[], r: Record<string, unknown>, [key, whole, min, max, why]: (typeof NUMERIC_FLAGS)[number]): string | undefined {
  const v = single<unknown>(r, key);
  if (v === undefined) return undefined;
  const what = whole ? `a whole number from ${min} to ${max}` : `a number from ${min} to ${max}`;
  const raw = rawValue(argv, key);
  if (typeof v !== 'number' || Number.isNaN(v) || (raw !== undefined && !NUMBER_RE.test(raw))) return `--${key} expects a number, got '${raw ?? String(v)}'`;
  if (!Number.isFinite(v) || (whole && !Number.isInteger(v)) || v < min || v > max) return `--${key} must be ${what}${why ? ` (${why})` : ''}, got ${v}`;
  if ((key === 'height' || key === 'width') && v % 8 !== 0) return `--${key} must be a multiple of 8 (the VAE works on 8×8 pixel blocks), got ${v}`;
  return undefined;
}

/** `path` or `path:weight` (the weight only when what follows the last ':' is a number). */
export function parseLoraSpec(spec: string): LoraSpec {
  const i = spec.lastIndexOf(':');
  if (i > 0) {
    const tail = spec.slice(i + 1);
    if (/^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$/i.test(tail)) return { path: spec.slice(0, i), weight: Number(tail) };
  }
  return { path: spec, weight: 1 };
}

export function parseGenerateArgs(argv: readonly string[]): GenerateArgs {
  let failure: string | undefined;
  const r = generateParser(argv).fail((msg: string | undefined, err: Error | undefined) => { failure = msg ?? err?.message; }).parseSync() as Record<string, unknown>;
  if (failure !== undefined) throw new UsageError(failure);
  // every problem of the command line at once, each naming its flag and value
  const problems: string[] = [];
  const positional = (r._ as unknown[]) ?? [];
  if (positional.length) problems.push(`unexpected argument '${String(positional[0])}': difflora generate takes flags only (put the prompt in --prompt "…")`);
  const prompt = single<string>(r, 'prompt');
  if (prompt === undefined || prompt === '') problems.push('--prompt is required');
  for (const flag of NUMERIC_FLAGS) {
    const p = numericProblem(argv, r, flag);
    if (p !== undefined) problems.push(p);
  }
  const loras = ((r.lora as string[] | undefined) ?? []).map(parseLoraSpec);
  for (const l of loras) {
    if (!Number.isFinite(l.weight) || Math.abs(l.weight) > MAX_GUIDANCE) problems.push(`--lora: the weight of '${l.path}' must be a number from -${MAX_GUIDANCE} to ${MAX_GUIDANCE}, got ${l.weight}`);
    else if (!existsSync(l.path)) problems.push(`--lora: '${l.path}' does not exist`);
  }
  const latents = single<string>(r, 'latents');
  if (latents !== undefined && !existsSync(latents)) problems.push(`--latents: '${latents}' does not exist`);
  const initImage = single<string>(r, 'init_image');
  if (initImage !== undefined && !existsSync(initImage)) problems.push(`--init_image: '${initImage}' does not exist`);
  const strength = single<number>(r, 'strength');
  if (strength !== undefined && initImage === undefined) problems.push('--strength applies with --init_image only');
  if (initImage !== undefined && latents !== undefined) problems.push('--init_image and --latents: give one (image to image starts from the picture)');
  if (initImage !== undefined && (single<number>(r, 'height') !== undefined || single<number>(r, 'width') !== undefined)) {
    problems.push('--height/--width: with --init_image the size is the picture\'s (rounded down to multiples of 8)');
  }
  const device = single<string>(r, 'device');
  if (device !== undefined && !/^(cpu|cuda(:\d+)?)$/.test(device)) problems.push(`--device must be 'cpu', 'cuda' or 'cuda:N', got '${device}'`);
  const output = single<string>(r, 'output') ?? 'image.png';
  if (output === '') problems.push('--output must not be empty');
  const scheduler = single<string>(r, 'scheduler');
  if (scheduler !== undefined) {
    try {
      schedulerName(scheduler);
    } catch (e) {
      problems.push(`--scheduler: ${(e as Error).message}`);
    }
  }
  if (problems.length) throw new UsageError(formatProblems(problems, 'flags'));
  return {
    pretrainedModelNameOrPath: single<string>(r, 'pretrained_model_name_or_path'),
    revision: single<string>(r, 'revision'),
    variant: single<string>(r, 'variant'),
    cacheDir: single<string>(r, 'cache_dir'),
    loras,
    loraScale: single<number>(r, 'lora_scale') ?? 1,
    prompt: prompt!,
    negativePrompt: single<string>(r, 'negative_prompt'),
    prompt2: single<string>(r, 'prompt_2'),
    negativePrompt2: single<string>(r, 'negative_prompt_2'),
    numInferenceSteps: single<number>(r, 'num_inference_steps') ?? 50,
    guidanceScale: single<number>(r, 'guidance_scale'),
    scheduler,
    seed: single<number>(r, 'seed'),
    latents,
    height: single<number>(r, 'height'),
    width: single<number>(r, 'width'),
    numImages: single<number>(r, 'num_images') ?? 1,
    output,
    device,
    mixedPrecision: single<GenerateArgs['mixedPrecision']>(r, 'mixed_precision') ?? 'no',
    clipSkip: single<number>(r, 'clip_skip'),
    memoryEfficientAttention: single<boolean>(r, 'enable_xformers_memory_efficient_attention') === true,
    ...(single<boolean>(r, 'cuda_graphs') === true ? { cudaGraphs: true } : {}),
    initImage,
    strength,
  };
}

/**
 * Refuses, before any work, outputs that cannot be written or must not be replaced: an existing target that
 * is not a regular file (a device such as /dev/full, a FIFO, a symbolic link), or a parent path that is a file.
 */
export function checkImageOutputs(paths: readonly string[]): void {
  for (const p of paths) {
    checkOutputTarget(p, 'file', '--output');
    let parent = dirname(p);
    while (!existsSync(parent) && dirname(parent) !== parent) parent = dirname(parent);
    if (existsSync(parent) && !statSync(parent).isDirectory()) throw new Error(`--output '${p}': '${parent}' is a file, not a folder`);
  }
}

/** Where image i of n goes: the file itself, name-i.png, or image-i.png inside an existing folder. */
export function outputPaths(output: string, n: number): string[] {
  if (existsSync(output) && statSync(output).isDirectory()) return Array.from({ length: n }, (_, i) => join(output, `image-${i}.png`));
  if (n === 1) return [output];
  const ext = extname(output) || '.png';
  const stem = join(dirname(output), basename(output, extname(output)));
  return Array.from({ length: n }, (_, i) => `${stem}-${i}${ext}`);
}

export interface CliIo { stdout: { write(s: string): unknown }; stderr: { write(s: string): unknown } }

export async function runGenerate(argv: string[], io: CliIo): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    io.stdout.write(`${await generateHelp()}\n`);
    return 0;
  }
  const a = parseGenerateArgs(argv);
  checkImageOutputs(outputPaths(a.output, a.numImages)); // before the model is loaded: nothing is replaced
  const info = (await import('../native.js')).native.info();
  const device = a.device ?? (info.cudaAvailable ? 'cuda:0' : 'cpu'); // as train: the GPU when there is one
  const { checkDevice } = await import('../device.js');
  checkDevice(device, '--device', info);
  const { loadSafetensors } = await import('../io/safetensors.js');
  const { dispose } = await import('../scope.js');
  let model = a.pretrainedModelNameOrPath;
  if (model === undefined) {
    const { prepareBuiltinDefault } = await import('../builtin/default.js');
    model = (await prepareBuiltinDefault()).model;
    io.stderr.write(`difflora generate: no --pretrained_model_name_or_path: using the built-in tiny random-weight model (${model})\n`);
  }
  const dtype = a.mixedPrecision === 'fp16' ? 'float16' : a.mixedPrecision === 'bf16' ? 'bfloat16' : 'float32';
  const hub = { revision: a.revision, cacheDir: a.cacheDir };
  const { pipelineFamily } = await import('../pipelines/auto_pipeline.js');
  const kind = pipelineFamily(model, hub, 'difflora generate').family;
  if (kind === 'sdxl' && a.initImage !== undefined) {
    throw new UsageError(`--init_image: SDXL image to image (StableDiffusionXLImg2ImgPipeline) is not in difflora yet; '${model}' is an SDXL pipeline`);
  }
  if (kind === 'sd' && (a.prompt2 !== undefined || a.negativePrompt2 !== undefined)) {
    throw new UsageError(`--prompt_2/--negative_prompt_2 apply to SDXL pipelines only; '${model}' is a Stable Diffusion 1.x/2.x pipeline`);
  }
  const load = { ...hub, variant: a.variant, dtype, device, scheduler: a.scheduler } as const;
  const pipe = kind === 'sdxl'
    ? (await import('../pipelines/stable_diffusion_xl.js')).StableDiffusionXLPipeline.fromPretrained(model, load)
    : a.initImage !== undefined
      ? (await import('../pipelines/stable_diffusion_img2img.js')).StableDiffusionImg2ImgPipeline.fromPretrained(model, load)
      : (await import('../pipelines/stable_diffusion.js')).StableDiffusionPipeline.fromPretrained(model, load);
  if (a.memoryEfficientAttention) {
    const n = pipe.enableMemoryEfficientAttention();
    io.stderr.write(`difflora generate: memory-efficient attention in ${n} attention layers\n`);
  }
  let latents;
  try {
    const names: string[] = [];
    for (const [i, l] of a.loras.entries()) {
      const loaded = pipe.loadLoraWeights(l.path, { adapterName: `lora_${i}` });
      names.push(loaded.adapterName);
      const te = kind === 'sdxl' ? `${loaded.textEncoderLayers} + ${loaded.textEncoder2Layers}` : `${loaded.textEncoderLayers}`;
      io.stderr.write(`difflora generate: LoRA '${l.path}' (${loaded.formats.join('/')}, ${loaded.unetLayers} UNet + ${te} text-encoder layers) weight ${l.weight}\n`);
    }
    if (names.length) pipe.setAdapters(names, a.loras.map((l) => l.weight));
    if (a.latents !== undefined) {
      const file = loadSafetensors(a.latents).tensors;
      const key = file.has('latents') ? 'latents' : file.size === 1 ? [...file.keys()][0]! : undefined;
      if (key === undefined) {
        dispose([...file.values()]);
        throw new UsageError(`--latents: '${a.latents}' holds ${file.size} tensors and none is named 'latents'`);
      }
      latents = file.get(key)!;
      file.delete(key);
      dispose([...file.values()]);
    }
    const tty = (io.stderr as { isTTY?: boolean }).isTTY === true;
    const started = Date.now();
    const out = await pipe.generate({
      ...(kind === 'sdxl' ? { prompt2: a.prompt2, negativePrompt2: a.negativePrompt2 } : {}),
      ...(a.initImage !== undefined ? { image: a.initImage, strength: a.strength } : {}),
      prompt: a.prompt, negativePrompt: a.negativePrompt, numInferenceSteps: a.numInferenceSteps, guidanceScale: a.guidanceScale,
      seed: a.seed, latents, height: a.height, width: a.width, numImagesPerPrompt: a.numImages, clipSkip: a.clipSkip,
      crossAttentionKwargs: { scale: a.loraScale }, outputType: 'png', ...(a.cudaGraphs ? { cudaGraphs: true } : {}),
      callbackOnStepEnd: ({ step, numSteps }) => {
        const rate = (step + 1) / Math.max((Date.now() - started) / 1000, 1e-9);
        const line = `step ${step + 1}/${numSteps} ${rate.toFixed(2)} it/s`;
        io.stderr.write(tty ? `\r${line}\x1b[K${step + 1 === numSteps ? '\n' : ''}` : `${line}\n`);
      },
    });
    const images = out.images ?? [];
    const paths = outputPaths(a.output, images.length);
    mkdirSync(dirname(paths[0]!), { recursive: true });
    images.forEach((png, i) => writeFileAtomic(paths[i]!, png));
    for (const p of paths) io.stdout.write(`difflora generate: wrote ${p}\n`);
    return 0;
  } finally {
    latents?.dispose();
    pipe.dispose();
  }
}

// ---- convert-lora

export interface ConvertArgs { input: string; output: string; to: 'diffusers' | 'kohya'; force: boolean }

function convertParser(argv: readonly string[]) {
  return commandParser(argv, 'Usage: difflora convert-lora --input=<file> --output=<file.safetensors> --to=<diffusers|kohya>\n\n'
      + 'Rewrites a LoRA file between the diffusers/PEFT layout (unet.….lora_A/lora_B, what diffusers\' load_lora_weights reads) '
      + 'and the Kohya/A1111 layout (lora_unet_…/lora_te_… with lora_down/lora_up and a per-layer alpha). The effective weights '
      + '(B·A·alpha/rank) are kept; converting to diffusers folds a per-layer alpha into the up matrix. Kohya files with LDM block '
      + 'names (input_blocks_…) are renamed for a UNet with 2 layers per block; DoRA magnitudes are kept either way; LyCORIS LoHa/LoKr '
      + 'files convert to kohya only (the diffusers layout cannot express them).')
    .options({
      input: { type: 'string', describe: 'LoRA file (.safetensors) in diffusers, PEFT or Kohya format' },
      output: { type: 'string', describe: 'File to write (refused if it exists, unless --force)' },
      to: { type: 'string', choices: ['diffusers', 'kohya'], describe: 'Target layout' },
      force: { type: 'boolean', default: false, describe: 'Overwrite --output' },
    });
}

export function parseConvertArgs(argv: readonly string[]): ConvertArgs {
  let failure: string | undefined;
  const r = convertParser(argv).fail((msg: string | undefined, err: Error | undefined) => { failure = msg ?? err?.message; }).parseSync() as Record<string, unknown>;
  if (failure !== undefined) throw new UsageError(failure);
  if (((r._ as unknown[]) ?? []).length) throw new UsageError(`unexpected argument '${String((r._ as unknown[])[0])}': use --input/--output/--to`);
  for (const k of ['input', 'output', 'to']) if (typeof r[k] !== 'string' || r[k] === '') throw new UsageError(`--${k} is required`);
  const input = r.input as string;
  const output = r.output as string;
  if (!existsSync(input)) throw new UsageError(`--input: '${input}' does not exist`);
  if (existsSync(output) && r.force !== true) throw new UsageError(`--output: '${output}' exists; give --force to overwrite it`);
  return { input, output, to: r.to as ConvertArgs['to'], force: r.force === true };
}

export async function runConvertLora(argv: string[], io: CliIo): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    io.stdout.write(`${await convertParser([]).getHelp()}\n`);
    return 0;
  }
  const a = parseConvertArgs(argv);
  const { convertLoraFile } = await import('../lora/convert.js');
  const result = convertLoraFile(a.input, a.output, a.to);
  io.stdout.write(`difflora convert-lora: ${result.layers} layers, ${result.from} → ${a.to}, written to ${a.output}\n`);
  return 0;
}
