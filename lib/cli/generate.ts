// `difflora generate`: text to image with a Stable Diffusion pipeline and any number of LoRA files, and
// `difflora convert-lora`: a LoRA file between the diffusers/PEFT and Kohya layouts. Flags are snake_case
// like the training script's; mistakes are UsageErrors (exit 2) naming the flag.
import { existsSync, mkdirSync, statSync } from 'node:fs';
import { basename, dirname, extname, join } from 'node:path';
import yargs from 'yargs';
import { writeFileAtomic } from '../io/atomic.js';
import { UsageError } from './train_args.js';

export const SCHEDULER_CHOICES = ['pndm', 'ddim', 'ddpm', 'euler', 'euler_a', 'dpmpp_2m'] as const;

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
  numInferenceSteps: number;
  guidanceScale: number;
  scheduler: (typeof SCHEDULER_CHOICES)[number] | undefined;
  seed: number | undefined;
  latents: string | undefined;
  height: number | undefined;
  width: number | undefined;
  numImages: number;
  output: string;
  device: string;
  mixedPrecision: 'no' | 'fp16' | 'bf16';
  clipSkip: number | undefined;
  memoryEfficientAttention: boolean;
}

const GENERATE_USAGE = 'Usage: difflora generate --prompt "<text>" [--pretrained_model_name_or_path=<model>] [--lora=<file>[:<weight>] ...] [flags]\n\n'
  + 'Text to image with a Stable Diffusion 1.x/2.x pipeline (a local diffusers folder or a model id in the offline Hugging Face cache), '
  + 'with any number of LoRA files (diffusers, PEFT or Kohya format). Without --pretrained_model_name_or_path it uses the built-in tiny model '
  + "that 'difflora train' trains by default.";

function generateParser(argv: readonly string[]) {
  return yargs([...argv])
    .scriptName('difflora')
    .usage(GENERATE_USAGE)
    .parserConfiguration({ 'camel-case-expansion': false, 'dot-notation': false, 'boolean-negation': false, 'duplicate-arguments-array': true })
    .exitProcess(false)
    .strict()
    .version(false)
    .help(false)
    .wrap(Math.min(120, process.stdout.columns ?? 100))
    .options({
      pretrained_model_name_or_path: { type: 'string', describe: 'Pipeline folder or model id in the offline HF cache (default: the built-in tiny model)' },
      revision: { type: 'string', describe: 'Revision of the model in the HF cache' },
      variant: { type: 'string', describe: "Weight variant, e.g. 'fp16' (diffusion_pytorch_model.fp16.safetensors)" },
      cache_dir: { type: 'string', describe: 'Hugging Face cache folder (default $HF_HUB_CACHE / ~/.cache/huggingface/hub)' },
      lora: { type: 'string', array: true, describe: 'LoRA file or folder, optionally with a weight: --lora=style.safetensors:0.7 (repeatable: adapters are combined)' },
      lora_scale: { type: 'number', default: 1, describe: "Scale of all LoRA adapters at run time (diffusers' cross_attention_kwargs={'scale': s})" },
      prompt: { type: 'string', describe: 'The prompt (required)' },
      negative_prompt: { type: 'string', describe: 'What not to draw (default: empty)' },
      num_inference_steps: { type: 'number', default: 50, describe: 'Denoising steps' },
      guidance_scale: { type: 'number', default: 7.5, describe: 'Classifier-free guidance weight (≤ 1: off)' },
      scheduler: { type: 'string', choices: SCHEDULER_CHOICES as unknown as string[], describe: "Sampler (default: the pipeline's scheduler_config.json, PNDM for SD 1.x)" },
      seed: { type: 'number', describe: 'Seed of the initial noise (CPU generator: the same image on every device)' },
      latents: { type: 'string', describe: "Initial latents from a .safetensors file (its 'latents' tensor, or its only tensor)" },
      height: { type: 'number', describe: 'Image height, a multiple of 8 (default: the model\'s, 512 for SD 1.5)' },
      width: { type: 'number', describe: 'Image width, a multiple of 8' },
      num_images: { type: 'number', default: 1, describe: 'Images per prompt' },
      output: { type: 'string', default: 'image.png', describe: 'PNG file to write (several images: name-0.png, name-1.png, …); an existing folder gets image-<i>.png' },
      device: { type: 'string', default: 'cpu', describe: "'cpu' or 'cuda' / 'cuda:N'" },
      mixed_precision: { type: 'string', choices: ['no', 'fp16', 'bf16'], default: 'no', describe: 'Weights and compute in fp16 (CUDA) or bf16' },
      clip_skip: { type: 'number', describe: 'Condition on the text encoder layer this many before the last' },
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

function positiveInt(r: Record<string, unknown>, key: string): number | undefined {
  const v = single<number>(r, key);
  if (v === undefined) return undefined;
  if (!Number.isInteger(v) || v < 1) throw new UsageError(`--${key} must be a positive integer, got ${v}`);
  return v;
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
  const positional = (r._ as unknown[]) ?? [];
  if (positional.length) throw new UsageError(`unexpected argument '${String(positional[0])}': difflora generate takes flags only (put the prompt in --prompt "…")`);
  const prompt = single<string>(r, 'prompt');
  if (prompt === undefined || prompt === '') throw new UsageError('--prompt is required');
  for (const k of ['num_inference_steps', 'guidance_scale', 'lora_scale', 'seed', 'height', 'width', 'num_images', 'clip_skip']) {
    const v = single<number>(r, k);
    if (v !== undefined && Number.isNaN(v)) throw new UsageError(`--${k} expects a number`);
  }
  const seed = single<number>(r, 'seed');
  if (seed !== undefined && (!Number.isInteger(seed) || seed < 0)) throw new UsageError(`--seed must be a non-negative integer, got ${seed}`);
  const loras = ((r.lora as string[] | undefined) ?? []).map(parseLoraSpec);
  for (const l of loras) if (!existsSync(l.path)) throw new UsageError(`--lora: '${l.path}' does not exist`);
  const latents = single<string>(r, 'latents');
  if (latents !== undefined && !existsSync(latents)) throw new UsageError(`--latents: '${latents}' does not exist`);
  for (const k of ['height', 'width']) {
    const v = positiveInt(r, k);
    if (v !== undefined && v % 8 !== 0) throw new UsageError(`--${k} must be a multiple of 8, got ${v}`);
  }
  const clipSkip = single<number>(r, 'clip_skip');
  if (clipSkip !== undefined && (!Number.isInteger(clipSkip) || clipSkip < 0)) throw new UsageError(`--clip_skip must be a non-negative integer, got ${clipSkip}`);
  return {
    pretrainedModelNameOrPath: single<string>(r, 'pretrained_model_name_or_path'),
    revision: single<string>(r, 'revision'),
    variant: single<string>(r, 'variant'),
    cacheDir: single<string>(r, 'cache_dir'),
    loras,
    loraScale: single<number>(r, 'lora_scale') ?? 1,
    prompt,
    negativePrompt: single<string>(r, 'negative_prompt'),
    numInferenceSteps: positiveInt(r, 'num_inference_steps') ?? 50,
    guidanceScale: single<number>(r, 'guidance_scale') ?? 7.5,
    scheduler: single<GenerateArgs['scheduler']>(r, 'scheduler'),
    seed,
    latents,
    height: single<number>(r, 'height'),
    width: single<number>(r, 'width'),
    numImages: positiveInt(r, 'num_images') ?? 1,
    output: single<string>(r, 'output') ?? 'image.png',
    device: single<string>(r, 'device') ?? 'cpu',
    mixedPrecision: single<GenerateArgs['mixedPrecision']>(r, 'mixed_precision') ?? 'no',
    clipSkip,
    memoryEfficientAttention: single<boolean>(r, 'enable_xformers_memory_efficient_attention') === true,
  };
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
  const { StableDiffusionPipeline } = await import('../pipelines/stable_diffusion.js');
  const { loadSafetensors } = await import('../io/safetensors.js');
  const { dispose } = await import('../scope.js');
  let model = a.pretrainedModelNameOrPath;
  if (model === undefined) {
    const { prepareBuiltinDefault } = await import('../builtin/default.js');
    model = (await prepareBuiltinDefault()).model;
    io.stderr.write(`difflora generate: no --pretrained_model_name_or_path: using the built-in tiny random-weight model (${model})\n`);
  }
  const dtype = a.mixedPrecision === 'fp16' ? 'float16' : a.mixedPrecision === 'bf16' ? 'bfloat16' : 'float32';
  const pipe = StableDiffusionPipeline.fromPretrained(model, {
    revision: a.revision, variant: a.variant, cacheDir: a.cacheDir, dtype, device: a.device, scheduler: a.scheduler,
  });
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
      io.stderr.write(`difflora generate: LoRA '${l.path}' (${loaded.formats.join('/')}, ${loaded.unetLayers} UNet + ${loaded.textEncoderLayers} text-encoder layers) weight ${l.weight}\n`);
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
      prompt: a.prompt, negativePrompt: a.negativePrompt, numInferenceSteps: a.numInferenceSteps, guidanceScale: a.guidanceScale,
      seed: a.seed, latents, height: a.height, width: a.width, numImagesPerPrompt: a.numImages, clipSkip: a.clipSkip,
      crossAttentionKwargs: { scale: a.loraScale }, outputType: 'png',
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
  return yargs([...argv])
    .scriptName('difflora')
    .usage('Usage: difflora convert-lora --input=<file> --output=<file.safetensors> --to=<diffusers|kohya>\n\n'
      + 'Rewrites a LoRA file between the diffusers/PEFT layout (unet.….lora_A/lora_B, what diffusers\' load_lora_weights reads) '
      + 'and the Kohya/A1111 layout (lora_unet_…/lora_te_… with lora_down/lora_up and a per-layer alpha). The effective weights '
      + '(B·A·alpha/rank) are kept; converting to diffusers folds a per-layer alpha into the up matrix.')
    .parserConfiguration({ 'camel-case-expansion': false, 'dot-notation': false, 'boolean-negation': false })
    .exitProcess(false)
    .strict()
    .version(false)
    .help(false)
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
