// `difflora <command>`: train (the flags of train_text_to_image_lora.py), train-dreambooth (train_dreambooth_lora.py's),
// train-sdxl (train_text_to_image_lora_sdxl.py's), generate and convert-lora (lib/cli/generate.ts),
// env (what libtorch this build runs on), launch and dist-check (lib/cli/launch.ts: several processes).
// Exit codes: 0 done, 1 failure (e.g. the native addon does not load), 2 usage error.
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import yargs from 'yargs';
import type { NativeInfo } from '../native.js';
import { UsageError, parseTrainArgs, trainHelp } from './train_args.js';
import { TrainOptionsError, pickTrainOptions } from '../training/options.js';
import type { TrainProgress, runTraining } from '../training/train.js';
import type { runDreamBoothTraining } from '../training/train_dreambooth.js';
import type { runSdxlTraining } from '../training/train_sdxl.js';
import type { ValidationEvent } from '../training/validation.js';
import { ProgressPrinter } from './progress.js';

export interface Io {
  stdout: { write(s: string): unknown };
  stderr: { write(s: string): unknown };
  env: NodeJS.ProcessEnv;
}

/** The training entry point: lib/training/train.ts's runTraining (a test may pass its own). */
export type TrainFn = typeof runTraining;
/** The DreamBooth entry point: lib/training/train_dreambooth.ts's runDreamBoothTraining. */
export type DreamBoothTrainFn = typeof runDreamBoothTraining;
/** The SDXL entry point: lib/training/train_sdxl.ts's runSdxlTraining. */
export type SdxlTrainFn = typeof runSdxlTraining;

export interface MainOptions extends Partial<Io> {
  /** Finds the training loop. Default: lib/training/train.{ts,js}, imported when `train` runs. */
  loadTrainer?: () => Promise<TrainFn>;
  /** Finds the DreamBooth trainer. Default: lib/training/train_dreambooth.{ts,js}, imported when `train-dreambooth` runs. */
  loadDreamBoothTrainer?: () => Promise<DreamBoothTrainFn>;
  /** Finds the SDXL trainer. Default: lib/training/train_sdxl.{ts,js}, imported when `train-sdxl` runs. */
  loadSdxlTrainer?: () => Promise<SdxlTrainFn>;
  /** Loads the native addon's info(); default imports lib/native.js (which throws an actionable error). */
  loadNativeInfo?: () => Promise<NativeInfo>;
}

const here = dirname(fileURLToPath(import.meta.url));

function packageVersion(): string {
  try {
    // lib/cli → package root, and dist/cli → package root: both two levels up.
    const pkg = JSON.parse(readFileSync(join(here, '..', '..', 'package.json'), 'utf8')) as { version?: unknown };
    return typeof pkg.version === 'string' ? pkg.version : 'unknown';
  } catch {
    return 'unknown';
  }
}

/** The training loop (lib/training/train.ts), imported only when `train` runs (keeps --help fast). */
async function defaultLoadTrainer(): Promise<TrainFn> {
  return (await import('../training/train.js')).runTraining;
}

async function defaultLoadNativeInfo(): Promise<NativeInfo> {
  const { native } = await import('../native.js');
  return native.info();
}

/** Fills model, data and (for flags not given) the settings of the built-in default run into `target` (the parsed flags). */
async function useBuiltinDefault(target: object, argv: string[], io: Io, command: 'train' | 'train-sdxl'): Promise<void> {
  const { prepareBuiltinDefault, BUILTIN_SETTINGS, defaultBuiltinRoot } = await import('../builtin/default.js');
  const sdxl = command === 'train-sdxl';
  const { model, data } = await prepareBuiltinDefault(defaultBuiltinRoot(), sdxl ? 'sdxl' : 'sd');
  const mutable = target as Record<string, unknown>;
  mutable.pretrainedModelNameOrPath = model;
  mutable.trainDataDir = data;
  const given = (flag: string) => argv.some((a) => a === `--${flag}` || a.startsWith(`--${flag}=`));
  for (const [key, value] of Object.entries(BUILTIN_SETTINGS)) {
    const flag = key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
    if (!given(flag)) mutable[key] = value;
  }
  io.stderr.write(`difflora ${command}: no model or data given — training the built-in default: a tiny random-weight ${sdxl ? 'SDXL' : 'SD'} pipeline (${model}) ` +
    `on 8 generated captioned pictures (${data}), ${String(mutable.maxTrainSteps)} steps at ${String(mutable.resolution)} px into '${String(mutable.outputDir)}'.\n` +
    `Give --pretrained_model_name_or_path and --train_data_dir or --dataset_name to train on your own.\n`);
}

const errorMessage = (e: unknown): string => (e instanceof Error ? e.message : String(e));

async function runTrain(argv: string[], io: Io, loadTrainer: () => Promise<TrainFn>): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    io.stdout.write(`${await trainHelp()}\n`);
    return 0;
  }
  const args = parseTrainArgs(argv, io.env);
  if (args.builtinDefault) await useBuiltinDefault(args, argv, io, 'train');
  // accepted flags that do not act here are said, not silently dropped (by rank 0 alone in a launched run);
  // --local_rank / LOCAL_RANK is accepted as accelerate does: the process group comes from the launcher's environment
  const notActing = [
    ...(args.datasetConfigName !== undefined ? [`--dataset_config_name=${args.datasetConfigName}: not used; difflora reads the parquet files of the train split under --dataset_name (point --dataset_name at the configuration's folder to pick one)`] : []),
  ];
  const rankZero = !(Number(io.env.RANK) > 0);
  if (rankZero) for (const w of [...args.warnings, ...notActing]) io.stderr.write(`difflora train: warning: ${w}\n`);
  const train = await loadTrainer();
  // one line per optimizer step (rewritten in place on a terminal) and per validation start and end
  const printer = new ProgressPrinter((line) => io.stderr.write(line), (io.stderr as { isTTY?: boolean }).isTTY === true);
  const onProgress = (p: TrainProgress) => printer.progress(p);
  const onValidation = (e: ValidationEvent) => printer.validation(e);
  const onNotice = (message: string) => printer.notice(message);
  const result = await train(pickTrainOptions(args), { onProgress, onValidation, onNotice });
  const { outputFile, skippedImages: skipped } = result;
  if ((result.processIndex ?? 0) !== 0) return 0; // rank 0 reports the files it wrote
  if (skipped.count > 0) {
    io.stderr.write(`difflora train: warning: skipped ${skipped.count} unreadable image(s) (--skip_broken_images): ${skipped.files.join(', ')}\n`);
  }
  io.stdout.write(`difflora train: LoRA weights written to ${outputFile}\n`);
  return 0;
}

/**
 * Which BLAS the process mapped (from /proc/self/maps's text): OpenBLAS and MKL are fast; Debian's reference
 * libblas.so.3 (…/blas/libblas.so.3) makes fp32 matmuls ~36× slower.
 */
export function blasReport(maps: string | null): { line: string; missing: string | null } {
  if (maps === null) return { line: 'BLAS: unknown (no /proc/self/maps)', missing: null };
  const libs = [...new Set(maps.split('\n').map((l) => l.trim().split(/\s+/).pop() ?? '').filter((f) => /\/lib[^/]*(blas|mkl)[^/]*\.so/i.test(f)))];
  const fast = libs.find((f) => /openblas|mkl/i.test(f));
  if (fast) return { line: `BLAS: ${/mkl/i.test(fast) ? 'MKL' : 'OpenBLAS'} (${fast})`, missing: null };
  const ref = libs.find((f) => /libblas\.so/.test(f));
  if (ref) {
    return { line: `BLAS: the reference BLAS (${ref})`, missing: 'OpenBLAS: fp32 matmuls are ~36x slower with the reference BLAS (apt-get install libopenblas0-pthread, or npm run setup)' };
  }
  return { line: 'BLAS: linked into libtorch (no separate BLAS library mapped)', missing: null };
}

function readMaps(): string | null {
  try { return readFileSync('/proc/self/maps', 'utf8'); } catch { return null; }
}

async function runEnv(io: Io, loadNativeInfo: () => Promise<NativeInfo>): Promise<number> {
  let info: NativeInfo;
  try {
    info = await loadNativeInfo();
  } catch (e) {
    io.stderr.write(`${errorMessage(e)}\n`);
    return 1;
  }
  const blas = blasReport(readMaps());
  const missing: string[] = [];
  if (!info.cudaAvailable) missing.push('CUDA: this libtorch has no CUDA or sees no GPU (CPU only: --mixed_precision=fp16 and --device=cuda are unavailable; see README "Which libtorch")');
  if (blas.missing) missing.push(blas.missing);
  const lines = [
    `difflora ${packageVersion()}`,
    `Node.js: ${process.version} (${process.platform}-${process.arch})`,
    `libtorch: ${info.torchVersion}`,
    `CUDA: ${info.cudaAvailable ? `available, ${info.cudaDeviceCount} device(s)` : 'not available (CPU only)'}`,
    `threads: ${info.numThreads} intra-op, ${info.numInteropThreads} inter-op`,
    `MKL-DNN: ${info.mkldnn ? 'yes' : 'no'}`,
    `CPU allocator: ${info.allocator}`,
    blas.line,
    `environment: OMP_WAIT_POLICY=${io.env.OMP_WAIT_POLICY ?? '(unset)'} OPENBLAS_CORETYPE=${io.env.OPENBLAS_CORETYPE ?? '(unset)'} DIFFLORA_NUM_THREADS=${io.env.DIFFLORA_NUM_THREADS ?? '(unset)'}`,
    `missing:${missing.length ? '' : ' nothing'}`,
    ...missing.map((m) => `  - ${m}`),
    'parallel info:',
    ...info.parallelInfo.trimEnd().split('\n').map((l) => `  ${l}`),
  ];
  io.stdout.write(`${lines.join('\n')}\n`);
  return 0;
}

/** Top level: --help, --version, and unknown commands (yargs prints help/version into `output`). */
async function runTop(argv: string[], io: Io): Promise<number> {
  const parser = yargs(argv)
    .scriptName('difflora')
    .usage('Usage: difflora <command> [flags]')
    .command('train', "Fine-tune Stable Diffusion with LoRA (the flags of diffusers' train_text_to_image_lora.py; see 'difflora train --help')")
    .command('train-dreambooth', "DreamBooth LoRA fine-tuning (the flags of diffusers' train_dreambooth_lora.py; see 'difflora train-dreambooth --help')")
    .command('train-sdxl', "SDXL LoRA fine-tuning (the flags of diffusers' train_text_to_image_lora_sdxl.py; see 'difflora train-sdxl --help')")
    .command('generate', "Text to image with a Stable Diffusion pipeline and LoRA files (see 'difflora generate --help')")
    .command('convert-lora', "Convert a LoRA file between the diffusers/PEFT and Kohya layouts (see 'difflora convert-lora --help')")
    .command('env', 'Print the libtorch version, CUDA devices, threads and allocator of this build')
    .command('launch', "Start the processes of a data-parallel run (accelerate launch's flags; see 'difflora launch --help')")
    .command('dist-check', 'Check a multi-process set-up: join the group and test every collective')
    .demandCommand(1, 'Give a command: train, train-dreambooth, train-sdxl, generate, convert-lora, env, launch or dist-check')
    .strictCommands()
    .strict()
    .version(packageVersion())
    .help()
    .exitProcess(false)
    .wrap(Math.min(120, process.stdout.columns ?? 100));
  let failure: string | undefined;
  let printed = '';
  parser.fail((msg: string | undefined, err: Error | undefined) => { failure = msg ?? err?.message ?? 'invalid arguments'; });
  await new Promise<void>((resolveParse) => {
    void parser.parse(argv, {}, (_err: Error | undefined, _parsed: unknown, output: string) => { printed = output; resolveParse(); });
  });
  if (failure !== undefined) {
    io.stderr.write(`difflora: ${failure}\nRun 'difflora --help' for the commands.\n`);
    return 2;
  }
  if (printed) io.stdout.write(`${printed}\n`);
  return 0;
}

/** The DreamBooth trainer (lib/training/train_dreambooth.ts), imported when `train-dreambooth` runs. */
async function defaultLoadDreamBoothTrainer(): Promise<DreamBoothTrainFn> {
  return (await import('../training/train_dreambooth.js')).runDreamBoothTraining;
}

async function runTrainDreamBooth(argv: string[], io: Io, load: () => Promise<DreamBoothTrainFn>): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    io.stdout.write(`${await (await import('./dreambooth_args.js')).dreamBoothHelp()}\n`);
    return 0;
  }
  const { parseDreamBoothArgs } = await import('./dreambooth_args.js');
  const args = parseDreamBoothArgs(argv, io.env);
  const say = (m: string) => io.stderr.write(`difflora train-dreambooth: ${m}\n`);
  for (const w of args.warnings) say(`warning: ${w}`);
  const train = await load();
  const printer = new ProgressPrinter((line) => io.stderr.write(line), (io.stderr as { isTTY?: boolean }).isTTY === true);
  const result = await train(args.options, {
    onProgress: (p) => printer.progress(p),
    onValidation: (e) => printer.validation(e),
    onNotice: (m) => printer.notice(m),
    onClassImages: (p) => say(`generating class images: ${p.done}/${p.total} in ${args.options.classDataDir ?? ''} (${p.generated} by this run)`),
  });
  io.stdout.write(`difflora train-dreambooth: LoRA weights written to ${result.outputFile}\n`);
  return 0;
}

/** The SDXL trainer (lib/training/train_sdxl.ts), imported when `train-sdxl` runs. */
async function defaultLoadSdxlTrainer(): Promise<SdxlTrainFn> {
  return (await import('../training/train_sdxl.js')).runSdxlTraining;
}

async function runTrainSdxl(argv: string[], io: Io, load: () => Promise<SdxlTrainFn>): Promise<number> {
  const { parseSdxlTrainArgs, sdxlTrainHelp } = await import('./train_sdxl_args.js');
  if (argv.includes('--help') || argv.includes('-h')) {
    io.stdout.write(`${await sdxlTrainHelp()}\n`);
    return 0;
  }
  const args = parseSdxlTrainArgs(argv, io.env);
  if (args.builtinDefault) await useBuiltinDefault(args.options, argv, io, 'train-sdxl');
  for (const w of args.warnings) io.stderr.write(`difflora train-sdxl: warning: ${w}\n`);
  const train = await load();
  const printer = new ProgressPrinter((line) => io.stderr.write(line), (io.stderr as { isTTY?: boolean }).isTTY === true);
  const result = await train(args.options, { onProgress: (p) => printer.progress(p), onValidation: (e) => printer.validation(e), onNotice: (m) => printer.notice(m) });
  if (result.skippedImages.count > 0) {
    io.stderr.write(`difflora train-sdxl: warning: skipped ${result.skippedImages.count} unreadable image(s) (--skip_broken_images): ${result.skippedImages.files.join(', ')}\n`);
  }
  io.stdout.write(`difflora train-sdxl: LoRA weights written to ${result.outputFile}\n`);
  return 0;
}

/** Runs the CLI on `argv` (without node and the script) and returns the exit code. */
export async function main(argv: string[], options: MainOptions = {}): Promise<number> {
  const io: Io = { stdout: options.stdout ?? process.stdout, stderr: options.stderr ?? process.stderr, env: options.env ?? process.env };
  const [command, ...rest] = argv;
  try {
    if (command === 'train') return await runTrain(rest, io, options.loadTrainer ?? defaultLoadTrainer);
    if (command === 'train-dreambooth') return await runTrainDreamBooth(rest, io, options.loadDreamBoothTrainer ?? defaultLoadDreamBoothTrainer);
    if (command === 'train-sdxl') return await runTrainSdxl(rest, io, options.loadSdxlTrainer ?? defaultLoadSdxlTrainer);
    if (command === 'generate') return await (await import('./generate.js')).runGenerate(rest, io);
    if (command === 'convert-lora') return await (await import('./generate.js')).runConvertLora(rest, io);
    if (command === 'launch' || command === 'dist-check') return await (await import('./launch.js')).runDistributedCommand(command, rest, io);
    if (command === 'env') {
      if (rest.length > 0) throw new UsageError(`difflora env takes no arguments (got '${rest.join(' ')}')`);
      return await runEnv(io, options.loadNativeInfo ?? defaultLoadNativeInfo);
    }
    return await runTop(argv, io);
  } catch (e) {
    // an option outside its domain found by the library (e.g. --rank larger than the model's layers) is a usage error too
    // … and so are a launcher's malformed variables (process_group.ts's DistributedEnvError, matched by name: importing it loads the addon)
    if (e instanceof UsageError || e instanceof TrainOptionsError || (e instanceof Error && e.name === 'DistributedEnvError')) {
      const helpFor = command === 'generate' || command === 'convert-lora' || command === 'env' || command === 'train-dreambooth' || command === 'train-sdxl' ? command : 'train';
      io.stderr.write(`difflora ${command ?? ''}: ${e.message}\nRun 'difflora ${helpFor} --help' for the flags.\n`);
      return 2;
    }
    // the message names the problem (file, flag, step); the stack trace only on request
    const debug = io.env.DIFFLORA_DEBUG !== undefined && io.env.DIFFLORA_DEBUG !== '' && io.env.DIFFLORA_DEBUG !== '0';
    io.stderr.write(`difflora ${command ?? ''}: error: ${e instanceof Error ? (debug ? (e.stack ?? e.message) : e.message) : String(e)}\n` +
      (debug ? '' : '(set DIFFLORA_DEBUG=1 for the stack trace)\n'));
    return 1;
  }
}
