// Training checkpoints: `output_dir/checkpoint-N/` holds everything needed to continue exactly — the LoRA
// weights, optimizer moments and master weights, loss-scaler state, the step counters, the data position and
// every random generator's state. A checkpoint is written to a temporary folder and renamed into place, so
// it is never half-written; older ones are pruned to --checkpoints_total_limit after a new one is saved.
//
// A checkpoint read back is untrusted: its JSON state is parsed into a typed TrainingState with every field
// checked for type, range and consistency with the resuming run (parseTrainingState), and its tensors for
// name, shape, dtype and finiteness (checkTensors), before anything of the run is changed.
import { existsSync, lstatSync, mkdirSync, readdirSync, renameSync, rmSync, rmdirSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { assertRegularFile, checkOutputTarget, readJsonObject } from '../io/files.js';
import { loadSafetensors, saveSafetensors } from '../io/safetensors.js';
import type { DType } from '../dtype.js';
import type { Tensor } from '../tensor.js';
import { dispose, tidy } from '../scope.js';
import * as torch from '../torch.js';
import { showValue } from './options.js';
import { setPeftModelStateDict } from '../lora/load.js';
import { saveLoraWeights } from '../lora/save.js';
import type { EMAModel, EMAMeta } from '../optim/ema.js';
import type { LionMeta } from '../optim/lion.js';
import type { Optimizer, OptimizerKind } from '../optim/optimizer.js';
import type { ProdigyMeta } from '../optim/prodigy.js';
import type { GradScaler } from '../optim/grad_scaler.js';
import type { Generator } from '../random.js';
import { loraNamedParameters, loraTargets, type LoraComponents } from './lora_components.js';
import type { Accumulator } from './step.js';
import type { TrainData } from './train_data.js';

/** The JSON half of a checkpoint: where the loop, the optimizer, the loss scaler and the data stand. */
export interface TrainingState {
  /** The step counters (step.ts's AccumulatorState). */
  accumulator: { globalStep: number; lrStep: number; microStep: number };
  /**
   * The optimizer's JSON state (its tensors are `optimizer.<i>.<name>`): AdamW's per-parameter step counts and
   * hyper-parameters (no `kind`: checkpoints from before --optimizer), or Prodigy's or Lion's, with their `kind`.
   */
  optimizer: AdamWMeta | ProdigyMeta | LionMeta;
  /** The EMA of the LoRA weights (--use_ema; its shadow weights are tensors `ema.<i>`); absent without it. */
  ema?: EMAMeta;
  /** The fp16 GradScaler's state; null when the run had none. */
  scaler: { scale: number; growthTracker: number; growthFactor: number; backoffFactor: number; growthInterval: number } | null;
  /** The data position: train_data.ts's epoch and the loader's (epoch, position, seed). */
  data: { epoch: number; loader: { epoch: number; position: number; seed: number } };
  /** The loop's epoch. */
  epoch: number;
  /**
   * The processes of the run (absent in checkpoints from before data-parallel training: one process): how many, the
   * seed of the per-sample streams (sample_rng.ts), and every rank's data position (rank 0's is `data` too). Ranks
   * other than 0 keep their generator states as tensors `rank<r>.rng.<i>`.
   */
  parallel?: ParallelState;
}

/** AdamW's JSON state. */
export interface AdamWMeta { kind?: 'adamw'; steps: number[]; lr: number; betas: [number, number]; eps: number; weightDecay: number }

/** The optimizer a checkpoint was trained with. */
export const checkpointOptimizer = (state: TrainingState): OptimizerKind => state.optimizer.kind ?? 'adamw';

/**
 * A checkpoint resumes only with the optimizer and the EMA setting it was trained with (the state of one optimizer
 * means nothing to another): called before the models load.
 */
export function checkResumeOptimizer(state: TrainingState, path: string, run: { optimizer: OptimizerKind; useEma: boolean }): void {
  const saved = checkpointOptimizer(state);
  if (saved !== run.optimizer) {
    throw new Error(`--resume_from_checkpoint: '${path}' was trained with --optimizer ${saved}, this run has --optimizer ${run.optimizer}: ` +
      `resume with --optimizer ${saved}, or start a new run without --resume_from_checkpoint`);
  }
  const savedEma = state.ema !== undefined;
  if (savedEma !== run.useEma) {
    throw new Error(savedEma
      ? `--resume_from_checkpoint: '${path}' holds an EMA of the weights (--use_ema) and this run has no --use_ema: resume with --use_ema`
      : `--resume_from_checkpoint: '${path}' was trained without --use_ema, so it holds no EMA to continue: resume without --use_ema, or start a new run`);
  }
}

export interface ParallelState {
  worldSize: number;
  sampleSeed: number;
  ranks: { data: TrainingState['data'] }[];
}

export interface CheckpointContents {
  /** Tensors by name (LoRA parameters, optimizer state, generator states). */
  tensors: Map<string, Tensor>;
  /** Plain JSON state (counters, scaler, data position, optimizer meta). */
  state: TrainingState;
}

const TENSORS = 'training_state.safetensors';
const STATE = 'training_state.json';

export function checkpointDirs(outputDir: string): { step: number; path: string }[] {
  if (!existsSync(outputDir)) return [];
  return readdirSync(outputDir)
    .map((name) => /^checkpoint-(\d+)$/.exec(name))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => ({ step: Number(m[1]), path: join(outputDir, m[0]) }))
    .sort((a, b) => a.step - b.step);
}

/**
 * Removes the oldest checkpoints so that at most `limit` remain. Called after a new checkpoint is saved (not
 * before, as the Python script does): if the save fails, e.g. on a full disk, the older ones are still there.
 * Also removes temporary folders (`checkpoint-N.tmp-<pid>`) left by a process that was killed while saving.
 */
export function pruneCheckpoints(outputDir: string, limit: number | null | undefined): string[] {
  if (!existsSync(outputDir)) return [];
  const stale = readdirSync(outputDir).filter((n) => /^checkpoint-\d+\.tmp-\d+$/.test(n) && !n.endsWith(`.tmp-${process.pid}`));
  for (const n of stale) rmSync(join(outputDir, n), { recursive: true, force: true });
  if (!limit || limit < 1) return [];
  const all = checkpointDirs(outputDir);
  const remove = all.slice(0, Math.max(0, all.length - limit));
  for (const c of remove) rmSync(c.path, { recursive: true, force: true });
  return remove.map((c) => c.path);
}

/**
 * Checks --output_dir before anything is created in it: when it exists it must be a directory (or a symbolic
 * link to one), never a file, a FIFO or a device that a run would write "into".
 */
export function checkOutputDir(dir: string, flag = '--output_dir'): void {
  let link = false;
  try { link = lstatSync(dir).isSymbolicLink(); } catch { return; } // missing: created by ensureWritableDir
  if (link) {
    let isDir = false;
    try { isDir = statSync(dir).isDirectory(); } catch { /* dangling: refused below */ }
    if (isDir) return; // the run writes inside the folder the link names; the link itself is never replaced
  }
  checkOutputTarget(dir, 'directory', flag);
}

/**
 * Creates `dir` and checks that a file can be written in it (read-only mount, full disk, a file in the way),
 * so that a run fails at once with a clear message instead of after loading the models or at its first save.
 * Returns the folders it created, outermost first (removeEmptyDirs takes them away again after a failure).
 */
export function ensureWritableDir(dir: string, flag = '--output_dir'): string[] {
  const probe = join(dir, `.difflora-write-test-${process.pid}`);
  const missing: string[] = [];
  try {
    // one level at a time: a recursive mkdir reports ENOENT, not EROFS, under a read-only mount
    for (let d = resolve(dir); !existsSync(d) && dirname(d) !== d; d = dirname(d)) missing.unshift(d);
    for (const d of missing) mkdirSync(d);
    writeFileSync(probe, Buffer.alloc(4096));
  } catch (e) {
    try { rmSync(probe, { force: true }); } catch { /* the folder itself is the problem */ }
    removeEmptyDirs(missing);
    throw new Error(`${flag} '${dir}' is not writable: ${(e as Error).message}`);
  }
  rmSync(probe, { force: true });
  return missing;
}

/** Removes the given folders (outermost first) from the innermost out, as long as they are empty. */
export function removeEmptyDirs(dirs: readonly string[]): void {
  for (const d of [...dirs].reverse()) {
    try { rmdirSync(d); } catch { return; } // not empty (or gone): it and its parents stay
  }
}

export function saveCheckpoint(outputDir: string, step: number, c: { tensors: Map<string, Tensor>; state: TrainingState }, extraFiles: (dir: string) => void = () => {}): string {
  mkdirSync(outputDir, { recursive: true });
  const final = join(outputDir, `checkpoint-${step}`);
  const tmp = `${final}.tmp-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp);
  try {
    saveSafetensors(join(tmp, TENSORS), c.tensors);
    writeFileSync(join(tmp, STATE), JSON.stringify(c.state, null, 1));
    extraFiles(tmp);
    rmSync(final, { recursive: true, force: true });
    renameSync(tmp, final);
  } catch (e) {
    rmSync(tmp, { recursive: true, force: true });
    throw new Error(`cannot save checkpoint ${final}: ${(e as Error).message}`);
  }
  return final;
}

/** What a resuming run is, for a saved state to be checked against. */
export interface ResumingRun {
  /** Total optimizer steps of the run (--max_train_steps, or epochs × steps per epoch). */
  maxTrainSteps: number;
  numTrainEpochs: number;
  /** --gradient_accumulation_steps. */
  accumulationSteps: number;
  /** Number of LoRA parameters (the optimizer's). */
  numParams: number;
  /** Items per epoch of this process (the loader's position counts them). */
  datasetLength: number;
  /** Processes of the resuming run (default 1): a checkpoint of another number of processes is refused. */
  worldSize?: number;
}

/** Reads fields of an untrusted JSON value; every error names the file and the field. */
class Fields {
  constructor(readonly file: string) {}

  fail(path: string, problem: string): never {
    throw new Error(`training state '${this.file}': ${path} ${problem}`);
  }

  /** An object with exactly `keys` (a missing key or an unknown one is refused). */
  object(v: unknown, path: string, keys: readonly string[]): Record<string, unknown> {
    if (v === null || typeof v !== 'object' || Array.isArray(v)) this.fail(path, `must be an object, got ${showValue(v)}`);
    const o = v as Record<string, unknown>;
    const missing = keys.filter((k) => !Object.hasOwn(o, k));
    if (missing.length) this.fail(path, `is missing ${missing.map((k) => `'${k}'`).join(', ')}`);
    const extra = Object.keys(o).filter((k) => !keys.includes(k));
    if (extra.length) this.fail(path, `has unexpected key(s) ${extra.slice(0, 5).map((k) => JSON.stringify(k)).join(', ')}`);
    return o;
  }

  /** An array, of `length` items when given. */
  array(v: unknown, path: string, length?: number, lengthWhy = ''): unknown[] {
    if (!Array.isArray(v)) this.fail(path, `must be an array, got ${showValue(v)}`);
    if (length !== undefined && v.length !== length) this.fail(path, `has ${v.length} entries, expected ${length}${lengthWhy}`);
    return v as unknown[];
  }

  /** A whole number in [min, max]; `maxWhy` says where max comes from. */
  int(v: unknown, path: string, min: number, max = Number.MAX_SAFE_INTEGER, maxWhy = ''): number {
    if (typeof v !== 'number' || !Number.isSafeInteger(v)) this.fail(path, `must be a whole number, got ${showValue(v)}`);
    if (v < min) this.fail(path, `must be at least ${min}, got ${v}`);
    if (v > max) this.fail(path, `is ${v}, more than ${maxWhy || max}`);
    return v;
  }

  /** A finite number passing `ok` (described by `text`). */
  num(v: unknown, path: string, ok: (x: number) => boolean, text: string): number {
    if (typeof v !== 'number' || !Number.isFinite(v) || !ok(v)) this.fail(path, `must be ${text}, got ${showValue(v)}`);
    return v;
  }
}

const unit = (x: number) => x >= 0 && x < 1;

/**
 * Parses a checkpoint's training_state.json (already read as JSON) into a TrainingState: every field's type
 * and range, and, given the resuming run, its consistency with it (the step within the run's steps, one
 * optimizer step count per LoRA parameter, the data position within the dataset). Throws an Error naming
 * `file` and the field.
 */
export function parseTrainingState(json: unknown, file: string, run?: ResumingRun): TrainingState {
  const f = new Fields(file);
  const withParallel = json !== null && typeof json === 'object' && Object.hasOwn(json, 'parallel');
  const withEma = json !== null && typeof json === 'object' && Object.hasOwn(json, 'ema');
  const top = f.object(json, 'the state', ['accumulator', 'optimizer', 'scaler', 'data', 'epoch', ...(withParallel ? ['parallel'] : []), ...(withEma ? ['ema'] : [])]);
  const acc = f.object(top.accumulator, 'accumulator', ['globalStep', 'lrStep', 'microStep']);
  const globalStep = f.int(acc.globalStep, 'accumulator.globalStep', 0, run?.maxTrainSteps,
    run ? `this run's ${run.maxTrainSteps} steps (--max_train_steps, or --num_train_epochs × steps per epoch)` : '');
  const accumulator = {
    globalStep,
    lrStep: f.int(acc.lrStep, 'accumulator.lrStep', 0, globalStep, `accumulator.globalStep (${globalStep})`),
    microStep: f.int(acc.microStep, 'accumulator.microStep', 0, run ? run.accumulationSteps - 1 : undefined,
      run ? `--gradient_accumulation_steps − 1 (${run.accumulationSteps - 1})` : ''),
  };
  const optimizer = parseOptimizerState(f, top.optimizer, globalStep, run);
  const data = parseDataState(f, top.data, run);
  const epoch = f.int(top.epoch, 'epoch', 0);
  if (epoch !== data.epoch) f.fail('epoch', `is ${epoch} but data.epoch is ${data.epoch}; they are saved equal`);
  if (run && globalStep < run.maxTrainSteps && epoch >= run.numTrainEpochs) {
    f.fail('epoch', `is ${epoch}, not within this run's ${run.numTrainEpochs} epochs, with steps left to train`);
  }
  const parallel = withParallel ? parseParallelState(f, top.parallel, run) : undefined;
  const ema = withEma ? parseEmaState(f, top.ema, globalStep) : undefined;
  return { accumulator, optimizer, scaler: parseScalerState(f, top.scaler), data, epoch, ...(parallel ? { parallel } : {}), ...(ema ? { ema } : {}) };
}

const OPTIMIZER_KEYS = {
  adamw: ['steps', 'lr', 'betas', 'eps', 'weightDecay'],
  prodigy: ['kind', 'steps', 'lr', 'betas', 'beta3', 'eps', 'weightDecay', 'decouple', 'useBiasCorrection', 'safeguardWarmup', 'd', 'd0', 'dMax', 'dNumerator', 'dCoef', 'growthRate', 'k'],
  lion: ['kind', 'steps', 'lr', 'betas', 'weightDecay'],
} as const;

/** The optimizer's state: AdamW's (no kind, or kind 'adamw'), Prodigy's or Lion's, every field checked. */
function parseOptimizerState(f: Fields, v: unknown, globalStep: number, run?: ResumingRun): TrainingState['optimizer'] {
  const kindOf = v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Record<string, unknown>).kind : undefined;
  if (kindOf !== undefined && kindOf !== 'adamw' && kindOf !== 'prodigy' && kindOf !== 'lion') f.fail('optimizer.kind', `must be 'adamw', 'prodigy' or 'lion', got ${showValue(kindOf)}`);
  const kind = (kindOf ?? 'adamw') as OptimizerKind;
  const opt = f.object(v, 'optimizer', kindOf === 'adamw' ? ['kind', ...OPTIMIZER_KEYS.adamw] : OPTIMIZER_KEYS[kind]);
  const stepsArray = f.array(opt.steps, 'optimizer.steps', run?.numParams, ": one per LoRA parameter of this run (a different model?)");
  const steps = stepsArray.map((s: unknown, i: number) => f.int(s, `optimizer.steps[${i}]`, 0, globalStep, `accumulator.globalStep (${globalStep})`));
  const betasArray = f.array(opt.betas, 'optimizer.betas', 2);
  const betas: [number, number] = [f.num(betasArray[0], 'optimizer.betas[0]', unit, 'in [0, 1)'), f.num(betasArray[1], 'optimizer.betas[1]', unit, 'in [0, 1)')];
  const lr = f.num(opt.lr, 'optimizer.lr', (x) => x >= 0, 'a finite number ≥ 0');
  const weightDecay = f.num(opt.weightDecay, 'optimizer.weightDecay', (x) => x >= 0, 'a finite number ≥ 0');
  const positive = (x: number) => x > 0;
  if (kind === 'lion') return { kind, steps, lr, betas, weightDecay };
  const eps = f.num(opt.eps, 'optimizer.eps', positive, 'a finite number > 0');
  if (kind === 'adamw') return { ...(kindOf === 'adamw' ? { kind } : {}), steps, lr, betas, eps, weightDecay };
  const flag = (key: string): boolean => {
    if (typeof opt[key] !== 'boolean') f.fail(`optimizer.${key}`, `must be true or false, got ${showValue(opt[key])}`);
    return opt[key] as boolean;
  };
  const growthRate = opt.growthRate === null ? null : f.num(opt.growthRate, 'optimizer.growthRate', (x) => x >= 1, 'a finite number ≥ 1, or null (unrestricted)');
  const d0 = f.num(opt.d0, 'optimizer.d0', positive, 'a finite number > 0');
  return {
    kind, steps, lr, betas, beta3: f.num(opt.beta3, 'optimizer.beta3', unit, 'in [0, 1)'), eps, weightDecay,
    decouple: flag('decouple'), useBiasCorrection: flag('useBiasCorrection'), safeguardWarmup: flag('safeguardWarmup'),
    d: f.num(opt.d, 'optimizer.d', positive, 'a finite number > 0'), d0, dMax: f.num(opt.dMax, 'optimizer.dMax', positive, 'a finite number > 0'),
    dNumerator: f.num(opt.dNumerator, 'optimizer.dNumerator', () => true, 'a finite number'), dCoef: f.num(opt.dCoef, 'optimizer.dCoef', positive, 'a finite number > 0'),
    growthRate, k: f.int(opt.k, 'optimizer.k', 0, globalStep, `accumulator.globalStep (${globalStep})`),
  };
}

function parseEmaState(f: Fields, v: unknown, globalStep: number): EMAMeta {
  const e = f.object(v, 'ema', ['decay', 'optimizationStep']);
  return {
    decay: f.num(e.decay, 'ema.decay', (x) => x > 0 && x < 1, 'in (0, 1)'),
    optimizationStep: f.int(e.optimizationStep, 'ema.optimizationStep', 0, globalStep, `accumulator.globalStep (${globalStep})`),
  };
}

function parseParallelState(f: Fields, v: unknown, run?: ResumingRun): ParallelState {
  const p = f.object(v, 'parallel', ['worldSize', 'sampleSeed', 'ranks']);
  const worldSize = f.int(p.worldSize, 'parallel.worldSize', 1, 1 << 20);
  const sampleSeed = f.int(p.sampleSeed, 'parallel.sampleSeed', 0);
  const ranks = f.array(p.ranks, 'parallel.ranks', worldSize, ': one per process').map((r, i) => {
    const rank = f.object(r, `parallel.ranks[${i}]`, ['data']);
    return { data: parseDataState(f, rank.data, run) };
  });
  return { worldSize, sampleSeed, ranks };
}

/** Processes of the run that wrote a checkpoint (1 for a checkpoint without the parallel record). */
export const checkpointWorldSize = (state: TrainingState): number => state.parallel?.worldSize ?? 1;

/** A checkpoint resumes only with the number of processes that wrote it (each holds its own data position and RNG). */
export function checkResumeWorldSize(state: TrainingState, path: string, worldSize: number): void {
  const saved = checkpointWorldSize(state);
  if (saved === worldSize) return;
  const processes = (n: number) => `${n} process${n === 1 ? '' : 'es'}`;
  throw new Error(`--resume_from_checkpoint: '${path}' was written by a run of ${processes(saved)}, this run has ${processes(worldSize)}: ` +
    `resume with the same number of processes (${saved === 1 ? "'difflora train' alone" : `'difflora launch --num_processes ${saved} train …'`}), ` +
    'or start a new run without --resume_from_checkpoint');
}

function parseDataState(f: Fields, v: unknown, run?: ResumingRun): TrainingState['data'] {
  const data = f.object(v, 'data', ['epoch', 'loader']);
  const epoch = f.int(data.epoch, 'data.epoch', 0);
  const loader = f.object(data.loader, 'data.loader', ['epoch', 'position', 'seed']);
  const loaderEpoch = f.int(loader.epoch, 'data.loader.epoch', epoch, epoch + 1, `data.epoch + 1 (${epoch + 1})`);
  const position = f.int(loader.position, 'data.loader.position', 0, run?.datasetLength, run ? `the ${run.datasetLength} items of the dataset` : '');
  return { epoch, loader: { epoch: loaderEpoch, position, seed: f.int(loader.seed, 'data.loader.seed', 0) } };
}

function parseScalerState(f: Fields, v: unknown): TrainingState['scaler'] {
  if (v === null) return null;
  const s = f.object(v, 'scaler', ['scale', 'growthTracker', 'growthFactor', 'backoffFactor', 'growthInterval']);
  const positive = (x: number) => x > 0;
  return {
    scale: f.num(s.scale, 'scaler.scale', positive, 'a finite number > 0'),
    growthTracker: f.int(s.growthTracker, 'scaler.growthTracker', 0),
    growthFactor: f.num(s.growthFactor, 'scaler.growthFactor', (x) => x > 1, 'a finite number > 1'),
    backoffFactor: f.num(s.backoffFactor, 'scaler.backoffFactor', (x) => x > 0 && x < 1, 'in (0, 1)'),
    growthInterval: f.int(s.growthInterval, 'scaler.growthInterval', 1),
  };
}

/** The checkpoint folder `which` names: a path, or 'latest' (the highest checkpoint-N in outputDir). */
export function resolveCheckpoint(outputDir: string, which: string): string {
  if (which !== 'latest') return which;
  const last = checkpointDirs(outputDir).pop();
  if (!last) throw new Error(`--resume_from_checkpoint latest: no checkpoint-N folder in '${outputDir}'`);
  return last.path;
}

/**
 * Reads and checks the state of checkpoint `path` (resolveCheckpoint) without loading its tensors: the run
 * calls it before loading any model, so a corrupt checkpoint fails fast, and again with `run` once the data
 * is known (parseTrainingState).
 */
export function readTrainingState(path: string, run?: ResumingRun, worldSize = run?.worldSize ?? 1): TrainingState {
  const stateFile = join(path, STATE);
  const tensorsFile = join(path, TENSORS);
  if (!existsSync(stateFile) || !existsSync(tensorsFile)) {
    throw new Error(`--resume_from_checkpoint: '${path}' is not a difflora checkpoint (expected ${STATE} and ${TENSORS})`);
  }
  const state = parseTrainingState(readJsonObject(stateFile, 'training state', 16 * 1024 * 1024), stateFile, run);
  checkResumeWorldSize(state, path, worldSize);
  assertRegularFile(tensorsFile, 'checkpoint tensors');
  return state;
}

/**
 * Reads checkpoint `path`: its state parsed and checked against `run` (readTrainingState) and its tensors
 * loaded (the caller checks them with checkTensors and owns them). Nothing is changed.
 */
export function loadCheckpoint(path: string, run?: ResumingRun): CheckpointContents {
  const state = readTrainingState(path, run);
  const { tensors } = loadSafetensors(join(path, TENSORS));
  return { tensors, state };
}

export function disposeCheckpoint(c: CheckpointContents): void {
  dispose([...c.tensors.values()]);
}

/** A tensor a checkpoint must hold: its shape and dtype, and whether its values must all be finite. */
export interface ExpectedTensor { name: string; shape: readonly number[]; dtype: DType; finite?: boolean }

/**
 * Checks that `tensors` (read from `file`) holds every expected tensor with its shape and dtype, and that the
 * ones marked `finite` hold no NaN or infinity. Throws one Error naming the file and each tensor at fault.
 */
export function checkTensors(tensors: ReadonlyMap<string, Tensor>, expected: readonly ExpectedTensor[], file: string): void {
  const problems: string[] = [];
  const finite: [string, Tensor][] = [];
  for (const e of expected) {
    const t = tensors.get(e.name);
    if (!t) problems.push(`'${e.name}' is missing`);
    else if (t.shape.join() !== e.shape.join() || t.dtype !== e.dtype) {
      problems.push(`'${e.name}' is ${t.dtype} [${t.shape.join(', ')}], expected ${e.dtype} [${e.shape.join(', ')}]`);
    } else if (e.finite) finite.push([e.name, t]);
  }
  const bad = problems.length ? undefined : firstNonFinite(finite);
  if (bad !== undefined) problems.push(`'${bad}' holds NaN or infinite values`);
  if (problems.length) {
    const shown = problems.slice(0, 5).join('; ') + (problems.length > 5 ? `; and ${problems.length - 5} more` : '');
    throw new Error(`checkpoint tensors '${file}': ${shown}`);
  }
}

/**
 * The name of the first tensor holding a NaN or an infinity, or undefined when all are finite: one fused
 * check (one host sync) when they are, a second pass only to name the culprit.
 */
export function firstNonFinite(named: readonly (readonly [string, Tensor])[]): string | undefined {
  if (named.length === 0) return undefined;
  const allFinite = tidy(() => torch.stack(named.map(([, t]) => t.detach().isfinite().all())).all().item());
  if (allFinite) return undefined;
  return named.find(([, t]) => !tidy(() => t.detach().isfinite().all().item()))?.[0];
}

/** What a run's checkpoint saves and a resume restores into: the adapters in their models, the optimization and the data. */
export interface CheckpointedRun {
  /** The models carrying the trained LoRA (saved with the checkpoint as pytorch_lora_weights.safetensors too). */
  lora: LoraComponents;
  optimizer: Optimizer;
  /** The EMA of the LoRA weights (--use_ema), or null/absent. */
  ema?: EMAModel | null;
  accumulator: Accumulator;
  scaler: GradScaler | null;
  /** The data position (any data with a saved state: train_data.ts's or a trainer's own). */
  data: Pick<TrainData, 'state' | 'restore'>;
  /** Every random generator the run draws from (CPU, and the GPU's). */
  generators: Generator[];
}

/** The name of rank `rank`'s generator `i` in a checkpoint (rank 0's keep the single-process names). */
const rngName = (rank: number, i: number) => (rank === 0 ? `rng.${i}` : `rank${rank}.rng.${i}`);

/** The tensors a checkpoint of this run holds: LoRA weights and Adam moments (finite), every rank's generator states. */
function expectedTensors(state: TrainingState, t: CheckpointedRun): ExpectedTensor[] {
  const params = loraNamedParameters(t.lora);
  const rng = Array.from({ length: checkpointWorldSize(state) }, (_, rank) => t.generators.map((g, i) => {
    const s = g.getState();
    try { return { name: rngName(rank, i), shape: s.shape, dtype: s.dtype }; } finally { s.dispose(); }
  })).flat();
  return [
    ...params.map(([n, p]) => ({ name: `lora.${n}`, shape: p.shape, dtype: p.dtype, finite: true })),
    ...params.flatMap(([, p], i) => ((state.optimizer.steps[i] ?? 0) > 0
      ? Object.entries(t.optimizer.stateShapes(p)).map(([k, shape]) => ({ name: `optimizer.${i}.${k}`, shape, dtype: p.dtype, finite: true }))
      : [])),
    ...(state.ema ? params.map(([, p], i) => ({ name: `ema.${i}`, shape: p.shape, dtype: p.dtype, finite: true })) : []),
    ...rng,
  ];
}

/**
 * Resumes from checkpoint `path`: its state and tensors are checked in full against this run first, so a
 * corrupt checkpoint is refused (naming its file and field) before any of the run's state changes.
 * Returns the epoch and step to continue from, and the per-sample streams' seed when the checkpoint has one.
 * `rank`: this process's rank (it restores its own data position and generators).
 */
export function restoreTrainingCheckpoint(path: string, resuming: ResumingRun, t: CheckpointedRun, rank = 0): { epoch: number; globalStep: number; sampleSeed?: number } {
  const { tensors, state } = loadCheckpoint(path, resuming);
  try {
    checkResumeOptimizer(state, path, { optimizer: t.optimizer.kind, useEma: (t.ema ?? null) !== null });
    checkTensors(tensors, expectedTensors(state, t), join(path, TENSORS));
    const get = (k: string): Tensor => tensors.get(k)!; // present: checked above
    // the trained adapter through the one LoRA loader (checked against the layers before any copy)
    setPeftModelStateDict(loraTargets(t.lora), tensors, { keyPrefix: 'lora.', file: join(path, TENSORS) });
    const optTensors = new Map([...tensors].filter(([k]) => k.startsWith('optimizer.')).map(([k, v]) => [k.slice('optimizer.'.length), v]));
    t.optimizer.loadStateDict({ tensors: optTensors, meta: state.optimizer });
    if (t.ema && state.ema) {
      const emaTensors = new Map([...tensors].filter(([k]) => k.startsWith('ema.')).map(([k, v]) => [k.slice('ema.'.length), v]));
      t.ema.loadStateDict({ tensors: emaTensors, meta: state.ema });
    }
    Object.assign(t.accumulator.state, state.accumulator);
    t.optimizer.lr = t.accumulator.lr;
    if (t.scaler && state.scaler) t.scaler.loadStateDict(state.scaler);
    t.data.restore(state.parallel?.ranks[rank]?.data ?? state.data);
    t.generators.forEach((g, i) => g.setState(get(rngName(rank, i))));
    return { epoch: state.epoch, globalStep: state.accumulator.globalStep, ...(state.parallel ? { sampleSeed: state.parallel.sampleSeed } : {}) };
  } finally {
    disposeCheckpoint({ tensors, state });
  }
}

/** What rank 0 saves for the processes of a run (lib/distributed/data_parallel.ts gathers it): ranks 1… in order. */
export interface ParallelCheckpoint {
  sampleSeed: number;
  /** Every rank's data position and generator states, rank 0 first (its own are taken from the run). */
  others: { data: TrainingState['data']; rng: Tensor[] }[];
}

/**
 * Saves the run at its current step as `outputDir/checkpoint-<step>` (with the LoRA file beside the state); returns the
 * folder. `parallel`: the per-sample seed and the other ranks' data positions and generator states.
 */
export function saveTrainingCheckpoint(outputDir: string, t: CheckpointedRun, epoch: number, parallel?: ParallelCheckpoint): string {
  const tensors = new Map<string, Tensor>();
  const opt = t.optimizer.stateDict();
  for (const [k, v] of opt.tensors) tensors.set(`optimizer.${k}`, v);
  for (const [n, p] of loraNamedParameters(t.lora)) tensors.set(`lora.${n}`, p);
  const ema = t.ema?.stateDict();
  if (ema) for (const [k, v] of ema.tensors) tensors.set(`ema.${k}`, v);
  const rng = t.generators.map((g) => g.getState());
  rng.forEach((s, i) => tensors.set(rngName(0, i), s));
  parallel?.others.forEach((r, k) => r.rng.forEach((s, i) => tensors.set(rngName(k + 1, i), s)));
  try {
    const data = t.data.state();
    const state: TrainingState = {
      accumulator: { ...t.accumulator.state }, optimizer: opt.meta as TrainingState['optimizer'], scaler: t.scaler?.stateDict() ?? null, data, epoch,
      ...(ema ? { ema: ema.meta } : {}),
      ...(parallel ? { parallel: { worldSize: parallel.others.length + 1, sampleSeed: parallel.sampleSeed, ranks: [{ data }, ...parallel.others.map((r) => ({ data: r.data }))] } } : {}),
    };
    return saveCheckpoint(outputDir, t.accumulator.state.globalStep, { tensors, state }, (dir) => saveLoraWeights(dir, loraTargets(t.lora)));
  } finally {
    dispose(rng);
  }
}

/**
 * Nothing non-finite is ever saved: a diverged update with a still-finite loss stops the run here, naming
 * the weight, the step and the epoch (`context`: where the run can be resumed from).
 */
export function assertFiniteWeights(named: readonly (readonly [string, Tensor])[], at: { step: number; epoch: number }, context: string): void {
  const bad = firstNonFinite(named);
  if (bad !== undefined) {
    throw new Error(`LoRA weight '${bad}' is NaN or infinite after step ${at.step} (epoch ${at.epoch}): ` +
      `the training diverged (lower --learning_rate?); nothing more was saved${context}`);
  }
}
