// What the noise schedulers share, as diffusers' schedulers/scheduling_utils.py (the interface and base
// behaviour of SchedulerMixin, config loading) plus what diffusers copies into each scheduler file
// ("# Copied from …"): betas_for_alpha_bar, rescale_zero_terminal_snr, the timestep spacings and the σ helpers
// of the k-diffusion-style schedulers. Every scheduling_*.ts imports this file and lib core only; no scheduler
// imports another scheduler's file.
//
// 1. the interface  2. config: reading, resolution, validation  3. the beta schedule  4. numpy's float64
// helpers and float32 scalars  5. timestep spacings  6. the base class (SchedulerBase: the schedule tensors,
// checks, add_noise, dispose). The σ schedulers' bases (SigmaSchedulerBase, TwoStageSchedulerBase,
// SolverSchedulerBase), their config groups and the σ schedules (Karras, exponential, beta) are in
// scheduling_utils_sigmas.ts.
//
// The arithmetic copies diffusers op for op, in float32 as it does (linspace in float32, then squared, for
// 'scaled_linear'; the cosine schedule in float64 Python floats then cast), so the schedules are
// bit-identical to the reference on the same libtorch.
import { join } from 'node:path';
import { readJsonObject, readTextFile } from '../io/files.js';
import { op, opVoid } from '../ops.js';
import type { Generator } from '../random.js';
import { dispose, keep, tidy } from '../scope.js';
import type { Device, Tensor } from '../tensor.js';
import * as torch from '../torch.js';

// ---- 1. the interface ------------------------------------------------------------------------------------

export type SchedulerName = 'pndm' | 'ddim' | 'ddpm' | 'euler' | 'euler_a' | 'dpmpp_2m' | 'dpm_singlestep' | 'unipc' | 'heun'
  | 'lms' | 'kdpm2' | 'kdpm2_a' | 'deis' | 'dpm_sde';

/**
 * What a step may take besides the model output (diffusers' step() keyword arguments): the generator of the
 * stochastic schedulers (DDPM, Euler ancestral, KDPM2 ancestral, SDE DPM-Solver, DDIM with η > 0, Euler with
 * churn, DPMSolverSDE), DDIMScheduler's `eta`, EulerDiscreteScheduler's s_churn, s_tmin, s_tmax, s_noise.
 * A scheduler ignores what it does not take, as StableDiffusionPipeline's prepare_extra_step_kwargs passes
 * only what a step accepts.
 */
export interface StepOptions {
  generator?: Generator;
  /** DDIM's η: 0 is deterministic DDIM, 1 the DDPM posterior variance. */
  eta?: number;
  sChurn?: number;
  sTmin?: number;
  sTmax?: number;
  sNoise?: number;
}

/**
 * The inference schedulers behind one interface, as diffusers' SchedulerMixin: a pipeline calls
 * setTimesteps(n), then for each t of `timesteps` scaleModelInput → UNet → step.
 */
export interface Scheduler {
  readonly name: SchedulerName;
  /** diffusers' class name: 'PNDMScheduler', … */
  readonly className: string;
  /** The resolved config (defaults filled), diffusers' field names. */
  readonly config: Readonly<Record<string, unknown>>;
  readonly numTrainTimesteps: number;
  /**
   * After setTimesteps: the timesteps the UNet is called with, in order (PNDM repeats one; Euler's are
   * fractional float32 values, stored as Math.fround numbers).
   */
  readonly timesteps: number[];
  readonly initNoiseSigma: number;
  /**
   * diffusers' `order`: model evaluations per step of the underlying method (2 for Heun and KDPM2, which
   * list each of their timesteps after the first twice in `timesteps`; a pipeline runs the model once per
   * entry of `timesteps` either way).
   */
  readonly order: number;
  /** The scheduler_config.json it was loaded from, if any: errors the config causes later (setTimesteps) name it. */
  readonly configPath?: string;
  /** Also resets any multistep state (PNDM's ets, DPM-Solver's history, Heun's first half-step, the step index). */
  setTimesteps(numInferenceSteps: number): void;
  /** May return `sample` itself when no scaling applies. */
  scaleModelInput(sample: Tensor, timestep: number): Tensor;
  /**
   * One denoising step: the previous (less noisy) sample. Stochastic schedulers draw noise with
   * `options.generator` (torch's randn, as diffusers' randn_tensor).
   */
  step(modelOutput: Tensor, timestep: number, sample: Tensor, options?: StepOptions): Tensor;
  addNoise(originalSamples: Tensor, noise: Tensor, timesteps: Tensor): Tensor;
  /**
   * diffusers' set_begin_index, on the schedulers that have it (the σ schedulers): a pipeline that starts part
   * way through the schedule (img2img) says where, and the step index and add_noise follow the position.
   */
  setBeginIndex?(index: number): void;
  /** Frees the scheduler's own tensors (alphas_cumprod, sigmas, history). */
  dispose(): void;
}

// ---- 2. config -------------------------------------------------------------------------------------------

export type BetaSchedule = 'linear' | 'scaled_linear' | 'squaredcos_cap_v2' | 'sigmoid';
export type PredictionType = 'epsilon' | 'v_prediction' | 'sample';
export type TimestepSpacing = 'linspace' | 'leading' | 'trailing';

/** The config fields that define the beta schedule: every scheduler class has them, same names and defaults. */
export type BetaScheduleConfig = {
  num_train_timesteps: number;
  beta_start: number;
  beta_end: number;
  beta_schedule: BetaSchedule;
  trained_betas: number[] | null;
};
/** The same, with the zero-terminal-SNR switch most classes have. */
export type ScheduleConfig = BetaScheduleConfig & { rescale_betas_zero_snr?: boolean };

/**
 * Defaults every class shares in diffusers: the beta schedule's, prediction_type 'epsilon' and steps_offset 0
 * (each class adds its own fields, timestep_spacing among them: its default differs between classes).
 */
export const SCHEDULER_DEFAULTS: Readonly<BetaScheduleConfig & { prediction_type: 'epsilon'; steps_offset: number }> = Object.freeze({
  num_train_timesteps: 1000,
  beta_start: 0.0001,
  beta_end: 0.02,
  beta_schedule: 'linear',
  trained_betas: null,
  prediction_type: 'epsilon',
  steps_offset: 0,
});

/**
 * The dynamic thresholding fields (Imagen's, diffusers' _threshold_sample), same defaults in every class that has
 * them: DDPM and DDIM refuse thresholding, the exponential-integrator solvers implement it.
 */
export type ThresholdingConfig = {
  thresholding: boolean;
  dynamic_thresholding_ratio: number;
  sample_max_value: number;
};

export const THRESHOLDING_DEFAULTS: Readonly<ThresholdingConfig> = Object.freeze({
  thresholding: false,
  dynamic_thresholding_ratio: 0.995,
  sample_max_value: 1.0,
});

/** The x̂₀ clipping and dynamic thresholding fields of DDPMScheduler and DDIMScheduler (thresholding is refused). */
export type SampleClippingConfig = { clip_sample: boolean; clip_sample_range: number } & ThresholdingConfig;

export const SAMPLE_CLIPPING_DEFAULTS: Readonly<SampleClippingConfig> = Object.freeze({
  clip_sample: true,
  clip_sample_range: 1.0,
  ...THRESHOLDING_DEFAULTS,
});

export const BETA_SCHEDULES: readonly BetaSchedule[] = ['linear', 'scaled_linear', 'squaredcos_cap_v2', 'sigmoid'];
/** The beta schedules of diffusers' classes other than DDPMScheduler (only it has 'sigmoid'). */
export const SAMPLER_BETA_SCHEDULES: readonly BetaSchedule[] = ['linear', 'scaled_linear', 'squaredcos_cap_v2'];
export const PREDICTION_TYPES: readonly PredictionType[] = ['epsilon', 'v_prediction', 'sample'];
export const TIMESTEP_SPACINGS: readonly TimestepSpacing[] = ['linspace', 'leading', 'trailing'];
/** What difflora implements of beta_schedule, prediction_type and timestep_spacing in a sampler that takes every prediction type. */
export const SAMPLER_SUPPORTED: SupportedValues = Object.freeze({
  beta_schedule: SAMPLER_BETA_SCHEDULES,
  prediction_type: PREDICTION_TYPES,
  timestep_spacing: TIMESTEP_SPACINGS,
});
/**
 * The same for the classes whose step raises NotImplementedError on prediction_type 'sample' in diffusers
 * (PNDM, Euler ancestral, KDPM2, KDPM2 ancestral, DPMSolverSDE).
 */
export const SAMPLER_SUPPORTED_NO_SAMPLE: SupportedValues = Object.freeze({
  ...SAMPLER_SUPPORTED,
  prediction_type: ['epsilon', 'v_prediction'],
});
/** A sanity cap on num_train_timesteps (diffusers' schedules use 1000; the tensors are that long). */
export const MAX_TRAIN_TIMESTEPS = 100_000;

export const SCHEDULER_CONFIG_NAME = 'scheduler_config.json';
// a config with trained_betas for MAX_TRAIN_TIMESTEPS steps is ~3 MB of JSON
const MAX_CONFIG_BYTES = 16 * 1024 * 1024;

/**
 * `<dir>/scheduler_config.json`, parsed through lib/io (a FIFO or device is refused without blocking; the
 * JSON must be an object). Python's json writes -Infinity, Infinity and NaN bare (DPM-Solver's
 * lambda_min_clipped), which JSON.parse refuses: such tokens in value position are read as those numbers.
 */
export function readSchedulerConfig(dir: string): { path: string; config: Record<string, unknown> } {
  const path = join(dir, SCHEDULER_CONFIG_NAME);
  const what = 'scheduler config';
  const text = readTextFile(path, what, MAX_CONFIG_BYTES);
  const marker = '__difflora_python_float__:';
  const quoted = text.replace(/([:[,]\s*)(-?Infinity|NaN)(?=\s*[,\]}])/g, (_, pre: string, tok: string) => `${pre}"${marker}${tok}"`);
  let parsed: unknown;
  try {
    parsed = JSON.parse(quoted, (_k, v: unknown) => (typeof v === 'string' && v.startsWith(marker) ? Number(v.slice(marker.length)) : v));
  } catch {
    parsed = undefined;
  }
  // anything else (bad syntax, an array, null; or a string value the quoting above broke): the shared reader
  // says where the file goes wrong, or parses what is plain JSON after all
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) return { path, config: readJsonObject(path, what, MAX_CONFIG_BYTES) };
  return { path, config: parsed as Record<string, unknown> };
}

/** Runs `fn`, prefixing any error with the config file it came from. */
export function namingFile<T>(path: string, fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    const message = e instanceof Error ? e.message : String(e);
    throw new Error(message.includes(path) ? message : `${path}: ${message}`, { cause: e });
  }
}

/** How a config value is shown in errors (JSON, except non-finite numbers, which JSON cannot write). */
function showValue(v: unknown): string {
  if (typeof v === 'number' && !Number.isFinite(v)) return String(v);
  const s = JSON.stringify(v) ?? String(v);
  return s.length > 80 ? `${s.slice(0, 77)}...` : s;
}

/** Throws `<Class> config: '<field>' = <value> <why>`. */
export function configError(className: string, field: string, value: unknown, why: string): never {
  throw new Error(`${className} config: '${field}' = ${showValue(value)} ${why}`);
}

/** For each field, the values difflora implements (a value outside is refused, naming the field and the list). */
export type SupportedValues = Readonly<Record<string, readonly unknown[]>>;

/**
 * `<Class>.from_config(raw, **overrides)`: the keys the class knows, its defaults for the rest (keys it does
 * not know are ignored, as diffusers does), then every value checked: its type against the default's (a null
 * default accepts null, a number, a string or a list), the enumerations in `supported`, the numeric domains
 * (see DOMAINS) and the beta schedule. Errors name the class, the field and the value.
 */
export function resolveSchedulerConfig<T extends BetaScheduleConfig>(
  className: string, defaults: T, raw: object, overrides: Record<string, unknown> = {}, supported: SupportedValues = {},
): T {
  const given = { ...definedEntries(raw), ...definedEntries(overrides) };
  const c: Record<string, unknown> = { ...defaults };
  for (const [k, v] of Object.entries(given)) if (Object.hasOwn(defaults, k)) c[k] = v;
  for (const [k, d] of Object.entries(defaults)) checkType(className, k, c[k], d);
  checkTrainedBetas(className, c as BetaScheduleConfig);
  for (const [k, allowed] of Object.entries(supported)) {
    // diffusers ignores beta_schedule when trained_betas are given
    if (k === 'beta_schedule' && c.trained_betas !== null) continue;
    checkOneOf(className, c, k, allowed);
  }
  for (const [k, rule] of DOMAINS) {
    const why = Object.hasOwn(c, k) ? rule(c[k], c) : null;
    if (why !== null) configError(className, k, c[k], why);
  }
  return c as T;
}

/** The keys of a config that a class with these defaults does not take (`_class_name` and other `_` keys aside). */
export function unknownConfigKeys(defaults: object, raw: object, overrides: object = {}): string[] {
  const keys = new Set([...Object.keys(definedEntries(raw)), ...Object.keys(definedEntries(overrides))]);
  return [...keys].filter((k) => !k.startsWith('_') && !Object.hasOwn(defaults, k));
}

function definedEntries(o: object): Record<string, unknown> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined));
}

function checkType(className: string, k: string, v: unknown, d: unknown): void {
  const ok = d === null ? v === null || ['number', 'string'].includes(typeof v) || Array.isArray(v)
    : typeof d === 'number' ? typeof v === 'number' && !Number.isNaN(v)
      : typeof v === typeof d;
  if (!ok) configError(className, k, v, `must be ${d === null ? 'null or a value' : `a ${typeof d}`}`);
}

/** Throws unless c[field] is one of `allowed` (what difflora implements of what diffusers accepts). */
export function checkOneOf(className: string, c: Record<string, unknown>, field: string, allowed: readonly unknown[]): void {
  if (!allowed.includes(c[field])) {
    const list = allowed.map((a) => (typeof a === 'string' ? `'${a}'` : showValue(a))).join(', ');
    configError(className, field, c[field], `is not supported (difflora implements ${list})`);
  }
}

/** trained_betas: null, or one β in (0, 1) per training timestep. */
function checkTrainedBetas(className: string, c: BetaScheduleConfig): void {
  const b: unknown = c.trained_betas;
  if (b === null) return;
  if (!Array.isArray(b)) return configError(className, 'trained_betas', b, 'must be null or a list of numbers');
  const bad = b.findIndex((x) => typeof x !== 'number' || !(x > 0 && x < 1));
  if (bad >= 0) configError(className, `trained_betas[${bad}]`, b[bad], 'must be a number in (0, 1)');
  // diffusers would only fail later, indexing past the end with a sampled timestep
  if (b.length !== c.num_train_timesteps) {
    throw new Error(`${className} config: 'trained_betas' has ${b.length} values but num_train_timesteps is ${showValue(c.num_train_timesteps)}`);
  }
}

type Rule = (v: unknown, c: Record<string, unknown>) => string | null;
const num = (v: unknown): number => v as number;
const inOpenUnit = (v: unknown): boolean => num(v) > 0 && num(v) < 1;
const positiveFinite: Rule = (v) => (num(v) > 0 && Number.isFinite(v) ? null : 'must be a positive finite number');
const nullOrPositiveFinite: Rule = (v) => (v === null ? null : typeof v !== 'number' ? 'must be null or a number' : positiveFinite(v, {}));

/**
 * The domain of each numeric field, where the class has it (types are checked first). Outside these the
 * schedule or a step divides by zero, takes the root of a negative number, or indexes past the schedule.
 */
const DOMAINS: ReadonlyMap<string, Rule> = new Map<string, Rule>([
  ['num_train_timesteps', (v) => (Number.isInteger(v) && num(v) >= 1 && num(v) <= MAX_TRAIN_TIMESTEPS ? null : `must be an integer from 1 to ${MAX_TRAIN_TIMESTEPS}`)],
  // linear, sigmoid and scaled_linear (linear in sqrt β) all keep every β between beta_start and beta_end,
  // so these bounds keep every α = 1 − β in (0, 1)
  ['beta_start', (v) => (inOpenUnit(v) ? null : 'must be in (0, 1)')],
  ['beta_end', (v, c) => (!inOpenUnit(v) ? 'must be in (0, 1)' : num(v) < num(c.beta_start) ? `must not be below beta_start (${showValue(c.beta_start)})` : null)],
  ['steps_offset', (v, c) => (Number.isInteger(v) && num(v) >= 0 && num(v) < num(c.num_train_timesteps)
    ? null : `must be an integer from 0 to num_train_timesteps − 1 (${num(c.num_train_timesteps) - 1})`)],
  ['clip_sample_range', positiveFinite],
  ['sample_max_value', positiveFinite],
  ['dynamic_thresholding_ratio', (v) => (num(v) > 0 && num(v) <= 1 ? null : 'must be in (0, 1]')],
  ['sigma_min', nullOrPositiveFinite],
  ['sigma_max', nullOrPositiveFinite],
  // Lin et al.'s rescaling pins the first and the last ᾱ: with one timestep it divides 0 by 0
  ['rescale_betas_zero_snr', (v, c) => (v === true && num(c.num_train_timesteps) < 2 ? 'needs num_train_timesteps of 2 or more' : null)],
  // -Infinity (diffusers' default) clips nothing; +Infinity would clip every timestep
  ['lambda_min_clipped', (v) => (num(v) < Infinity ? null : 'must be a number below Infinity (-Infinity: no clipping)')],
]);

// ---- 3. the beta schedule --------------------------------------------------------------------------------

const cumprodOp = op('cumprod');
const rsubOp = op('rsub.Scalar');
/** torch.cumprod(x, dim) */
export const cumprod = (x: Tensor, dim: number): Tensor => cumprodOp(x, dim, null) as Tensor;
/** `value - x`, Python's `1.0 - tensor` (aten::rsub). */
export const rsub = (x: Tensor, value: number): Tensor => rsubOp(x, value, 1) as Tensor;

/**
 * The Glide cosine schedule (betas_for_alpha_bar, alpha_transform_type 'cosine'): betas that discretise
 * alpha_bar(t) = cos²((t + 0.008) / 1.008 · π/2), capped at maxBeta. Computed in float64 as Python floats,
 * then cast to float32 as diffusers' torch.tensor(betas, dtype=torch.float32).
 */
export function betasForAlphaBar(numDiffusionTimesteps: number, maxBeta = 0.999): Tensor {
  const alphaBar = (t: number): number => Math.cos(((t + 0.008) / 1.008) * Math.PI / 2) ** 2;
  const betas = new Float64Array(numDiffusionTimesteps);
  for (let i = 0; i < numDiffusionTimesteps; i++) {
    const t1 = i / numDiffusionTimesteps;
    const t2 = (i + 1) / numDiffusionTimesteps;
    betas[i] = Math.min(1 - alphaBar(t2) / alphaBar(t1), maxBeta);
  }
  return torch.tensor(Float32Array.from(betas));
}

/**
 * Rescales betas to zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps
 * are Flawed", Algorithm 1), as diffusers' rescale_zero_terminal_snr: sqrt(alphas_cumprod) is shifted so its
 * last value is 0 and scaled so its first is unchanged. alphas_cumprod[-1] becomes exactly 0.
 */
function rescaleZeroTerminalSnr(betas: Tensor): Tensor {
  return tidy(() => {
    // 1. betas → sqrt(alphas_cumprod)
    const alphasBarSqrt = cumprod(rsub(betas, 1), 0).sqrt();
    // 2. keep the first and last values
    const n = alphasBarSqrt.shape[0] ?? 0;
    const first = alphasBarSqrt.select(0, 0).clone();
    const last = alphasBarSqrt.select(0, n - 1).clone();
    // 3. shift so the last is zero, scale so the first is back to its old value
    alphasBarSqrt.sub_(last);
    alphasBarSqrt.mul_(first.div(first.sub(last)));
    // 4. back to betas: square, undo the cumprod
    const alphasBar = alphasBarSqrt.pow(2);
    const alphas = torch.cat([alphasBar.slice(0, 0, 1), alphasBar.slice(0, 1).div(alphasBar.slice(0, 0, n - 1))]);
    return rsub(alphas, 1);
  });
}

/** The config's betas (float32, CPU), before any zero-SNR rescaling. */
function betasFromConfig(c: BetaScheduleConfig): Tensor {
  const n = c.num_train_timesteps;
  if (c.trained_betas !== null) return torch.tensor(Float32Array.from(c.trained_betas));
  switch (c.beta_schedule) {
    case 'linear':
      return torch.linspace(c.beta_start, c.beta_end, n, { dtype: 'float32' });
    case 'scaled_linear':
      // latent diffusion's schedule: linear in sqrt(beta), in float32 before squaring as diffusers
      return tidy(() => torch.linspace(Math.sqrt(c.beta_start), Math.sqrt(c.beta_end), n, { dtype: 'float32' }).pow(2));
    case 'squaredcos_cap_v2':
      return betasForAlphaBar(n);
    case 'sigmoid':
      // GeoDiff's schedule
      return tidy(() => torch.linspace(-6, 6, n, { dtype: 'float32' }).sigmoid().mul(c.beta_end - c.beta_start).add(c.beta_start));
    default:
      return configError('scheduler', 'beta_schedule', c.beta_schedule, 'is not implemented');
  }
}

/**
 * β, α = 1 − β and ᾱ = cumprod(α) of a config (float32, CPU; the caller owns them), β optionally rescaled to
 * zero terminal SNR. With `clampLast` (Euler, DPM-Solver) a zero-SNR schedule's last ᾱ becomes 2⁻²⁴ instead
 * of 0, as those diffusers classes do so that σ stays finite.
 */
function scheduleTensors(c: ScheduleConfig, clampLast = false): { betas: Tensor; alphas: Tensor; alphasCumprod: Tensor } {
  return tidy(() => {
    const raw = betasFromConfig(c);
    const betas = c.rescale_betas_zero_snr ? rescaleZeroTerminalSnr(raw) : raw;
    const alphas = rsub(betas, 1);
    const alphasCumprod = cumprod(alphas, 0);
    if (clampLast && c.rescale_betas_zero_snr) alphasCumprod.select(0, c.num_train_timesteps - 1).fill_(2 ** -24);
    return { betas, alphas, alphasCumprod };
  });
}

// float32's smallest normal number: below it σ = sqrt((1 − ᾱ)/ᾱ) overflows float32
const MIN_ALPHA_CUMPROD = 2 ** -126;

/**
 * Refuses a schedule a sampler cannot run without dividing by zero: every α must be in (0, 1) as float32 (a
 * β below float32's resolution gives α = 1, and 1 − ᾱ = 0 in the step's denominators), and ᾱ must stay a
 * normal float32 (a β near 1 makes it underflow to 0: no signal left, σ infinite). The last ᾱ of a
 * zero-terminal-SNR schedule is 0 by design and is exempt.
 */
function checkBetaSchedule(className: string, c: ScheduleConfig, alphas: Float32Array, acp: Float32Array): void {
  const T = alphas.length;
  for (let t = 0; t < T; t++) {
    const a = alphas[t] as number;
    const p = acp[t] as number;
    const zeroSnrEnd = c.rescale_betas_zero_snr === true && t === T - 1;
    if (zeroSnrEnd ? a >= 0 && a < 1 && p >= 0 : a > 0 && a < 1 && p >= MIN_ALPHA_CUMPROD) continue;
    const source = c.trained_betas !== null ? 'trained_betas'
      : `beta_schedule '${String(c.beta_schedule)}' with beta_start ${showValue(c.beta_start)}, beta_end ${showValue(c.beta_end)}, num_train_timesteps ${c.num_train_timesteps}${c.rescale_betas_zero_snr ? ', rescale_betas_zero_snr' : ''}`;
    const what = a >= 1
      ? `a beta at timestep ${t} below float32's resolution (1 − beta rounds to 1, so 1 − alphas_cumprod is 0 and a step divides by it); use a larger beta_start`
      : a > 0 && a < 1
        ? `alphas_cumprod ${p} at timestep ${t}: the signal has vanished (σ is infinite and a step divides by zero); use a smaller beta_end or fewer num_train_timesteps`
        : `alpha = 1 − beta = ${a} at timestep ${t}, outside (0, 1)`;
    throw new Error(`${className} config: ${source} gives ${what}`);
  }
}

// ---- 4. numpy's float64 helpers and float32 scalars -----------------------------------------------------

/** Python's round() and numpy's .round(): halves to even. */
export function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** np.linspace(start, stop, num) in float64: start + i·step, the last element exactly stop. */
export function linspace64(start: number, stop: number, num: number): number[] {
  if (num === 1) return [start];
  const step = (stop - start) / (num - 1);
  return Array.from({ length: num }, (_, i) => (i === num - 1 ? stop : i * step + start));
}

/** np.arange(start, stop, step) for a negative step (as numpy: ceil((stop − start) / step) elements). */
export function arangeDown(start: number, stop: number, step: number): number[] {
  const n = Math.max(0, Math.ceil((stop - start) / step));
  return Array.from({ length: n }, (_, i) => start + i * step);
}

/** np.interp(x, arange(len(fp)), fp) in float64, as numpy's C loop computes it (slope·(x − x_j) + f_j). */
export function interpOnIndex(x: readonly number[], fp: ArrayLike<number>): number[] {
  const last = fp.length - 1;
  return x.map((v) => {
    if (Number.isNaN(v)) return v;
    if (v <= 0) return fp[0] as number;
    if (v >= last) return fp[last] as number;
    const j = Math.floor(v);
    const fj = fp[j] as number;
    if (j === v) return fj;
    const slope = ((fp[j + 1] as number) - fj) / 1;
    return slope * (v - j) + fj;
  });
}

/** x ** 0.5 of a float32 (torch's pow(0.5) is sqrt, correctly rounded). */
export const sqrt32 = (x: number): number => Math.fround(Math.sqrt(x));
/** torch.log of a float32 0-dim tensor (libm's, not JavaScript's). */
export const log32 = (x: number): number => tidy(() => torch.scalarTensor(x).log().item());
/** torch.exp of a float32 0-dim tensor. */
export const exp32 = (x: number): number => tidy(() => torch.scalarTensor(x).exp().item());

/** Appends trailing size-1 dimensions until x has `rank` dimensions (diffusers' `while ...: unsqueeze(-1)`). */
export function unsqueezeTo(x: Tensor, rank: number): Tensor {
  let out = x;
  while (out.ndim < rank) out = out.unsqueeze(-1);
  return out;
}

// ---- 5. timestep spacings --------------------------------------------------------------------------------

/**
 * The timesteps of set_timesteps for 'linspace' (np.linspace(0, T − 1, n), rounded unless `round` is false:
 * Euler keeps them fractional), 'leading' (multiples of T // n plus steps_offset) and 'trailing'
 * (np.arange(T, 0, −T / n) rounded, minus 1), descending. The callers check n first.
 */
function spacedTimesteps(className: string, spacing: string, numTrain: number, n: number, stepsOffset: number, round = true): number[] {
  switch (spacing) {
    case 'linspace': {
      const ts = linspace64(0, numTrain - 1, n);
      return (round ? ts.map(roundHalfEven) : ts).reverse();
    }
    case 'leading': {
      const ratio = Math.floor(numTrain / n);
      return Array.from({ length: n }, (_, i) => i * ratio + stepsOffset).reverse();
    }
    case 'trailing':
      return arangeDown(numTrain, 0, -numTrain / n).map((t) => roundHalfEven(t) - 1);
    default:
      return configError(className, 'timestep_spacing', spacing, `is not supported (difflora implements ${TIMESTEP_SPACINGS.map((s) => `'${s}'`).join(', ')})`);
  }
}

// ---- 6. the base class ------------------------------------------------------------------------------------

/**
 * What every scheduler has: its config, β, α and ᾱ (diffusers' betas, alphas, alphas_cumprod), the checks on
 * what callers pass in, add_noise of the ᾱ schedulers (DDPM, DDIM, PNDM), and an idempotent dispose.
 */
export abstract class SchedulerBase<C extends ScheduleConfig = ScheduleConfig> implements Scheduler {
  abstract readonly name: SchedulerName;
  abstract readonly timesteps: number[];
  readonly className: string;
  readonly order: number = 1;
  readonly config: Readonly<C>;
  /** β_t, float32 [num_train_timesteps] on the CPU. */
  readonly betas: Tensor;
  /** 1 − β_t. */
  readonly alphas: Tensor;
  /** ᾱ_t = ∏_{s≤t} α_s. */
  readonly alphasCumprod: Tensor;
  /** ᾱ as float32 numbers, for the scalar arithmetic of the steps. */
  protected readonly acp: Float32Array;
  // diffusers moves alphas_cumprod to the sample's device once and keeps it there; so do we, per device
  private readonly onDevice = new Map<Device, Tensor>();
  private disposed = false;
  /** Set by loadScheduler and fromPretrained. */
  configPath: string | undefined = undefined;

  /** `config` is resolved and checked (resolveSchedulerConfig); the schedule built from it is checked here. */
  protected constructor(className: string, config: C, o: { clampLastAlphaCumprod?: boolean } = {}) {
    this.className = className;
    this.config = Object.freeze(config);
    const t = scheduleTensors(config, o.clampLastAlphaCumprod);
    try {
      this.acp = t.alphasCumprod.dataSync() as Float32Array;
      checkBetaSchedule(className, config, t.alphas.dataSync() as Float32Array, this.acp);
    } catch (e) {
      dispose([t.betas, t.alphas, t.alphasCumprod]);
      throw e;
    }
    this.betas = keep(t.betas);
    this.alphas = keep(t.alphas);
    this.alphasCumprod = keep(t.alphasCumprod);
  }

  get numTrainTimesteps(): number { return this.config.num_train_timesteps; }
  get initNoiseSigma(): number { return 1.0; }

  abstract setTimesteps(numInferenceSteps: number): void;
  abstract step(modelOutput: Tensor, timestep: number, sample: Tensor, options?: StepOptions): Tensor;

  scaleModelInput(sample: Tensor, _timestep: number): Tensor {
    return sample;
  }

  /** alphas_cumprod on a device (the CPU original, or a kept copy made once per device). */
  alphasCumprodOn(device: Device): Tensor {
    this.checkAlive();
    if (device === this.alphasCumprod.device) return this.alphasCumprod;
    let t = this.onDevice.get(device);
    if (t === undefined) {
      t = keep(this.alphasCumprod.to({ device }));
      this.onDevice.set(device, t);
    }
    return t;
  }

  /**
   * q(x_t | x_0): sqrt(ᾱ_t)·original + sqrt(1 − ᾱ_t)·noise, one timestep per batch item (diffusers'
   * add_noise: ᾱ in the sample's dtype and device, indexed, flattened, unsqueezed to the sample's rank).
   */
  addNoise(originalSamples: Tensor, noise: Tensor, timesteps: Tensor): Tensor {
    return tidy(() => {
      const [sqrtAlphaProd, sqrtOneMinusAlphaProd] = this.coefficients(originalSamples, timesteps);
      return sqrtAlphaProd.mul(originalSamples).add(sqrtOneMinusAlphaProd.mul(noise));
    });
  }

  /** sqrt(ᾱ_t) and sqrt(1 − ᾱ_t) shaped [B, 1, …, 1] to broadcast over `like`. */
  protected coefficients(like: Tensor, timesteps: Tensor): [Tensor, Tensor] {
    const alphasCumprod = this.alphasCumprodOn(like.device).to(like.dtype);
    checkTimestepIndices(this.className, timesteps, this.numTrainTimesteps);
    const ts = timesteps.to({ device: like.device });
    // alphas_cumprod[timesteps].flatten() (index_select on the flattened index gives the same elements)
    const picked = alphasCumprod.indexSelect(0, ts.flatten());
    return [unsqueezeTo(picked.pow(0.5), like.ndim), unsqueezeTo(rsub(picked, 1).pow(0.5), like.ndim)];
  }

  /** Frees the schedule tensors, the per-device copies and any state of the subclass (idempotent). */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.releaseState();
    dispose([this.betas, this.alphas, this.alphasCumprod, ...this.onDevice.values()]);
    this.onDevice.clear();
  }
  [Symbol.dispose](): void { this.dispose(); }
  get isDisposed(): boolean { return this.disposed; }

  /** Frees what a subclass holds besides the schedule (multistep history, σ); called once by dispose. */
  protected releaseState(): void {}

  /** An error the config causes (found only once the step count is known), naming the config file when known. */
  protected configFault(message: string): never {
    throw new Error(this.configPath === undefined ? message : `${this.configPath}: ${message}`);
  }

  protected checkAlive(): void {
    if (this.disposed) throw new Error(`${this.className}: used after dispose()`);
  }

  /** set_timesteps' argument: an integer from 1 to num_train_timesteps (diffusers raises above it). */
  protected checkInferenceSteps(n: number): void {
    const T = this.numTrainTimesteps;
    if (!Number.isInteger(n) || n < 1 || n > T) {
      throw new Error(`${this.className}: numInferenceSteps must be an integer from 1 to num_train_timesteps (${T}), got ${showValue(n)}`);
    }
  }

  /** step() before setTimesteps in a scheduler that needs it (diffusers raises the same). */
  protected timestepsNotSet(): never {
    throw new Error(`${this.className}: number of inference steps is not set; call setTimesteps(n) before step()`);
  }

  /** A step's timestep: an integer in [0, num_train_timesteps), where ᾱ_t exists. */
  protected checkTimestep(t: number): void {
    const T = this.numTrainTimesteps;
    if (!Number.isInteger(t) || t < 0 || t >= T) throw new Error(`${this.className}: timestep must be an integer in [0, ${T}), got ${showValue(t)}`);
  }

  /**
   * set_timesteps' timesteps for the config's timestep_spacing and steps_offset (descending; Euler's unrounded
   * float32 values with `round` false), after checking the scheduler is alive and n is in range, and checked.
   */
  protected spacedSchedule(n: number, round = true): number[] {
    this.checkAlive();
    this.checkInferenceSteps(n);
    const c = this.config as unknown as { timestep_spacing: string; steps_offset: number };
    const timesteps = spacedTimesteps(this.className, c.timestep_spacing, this.numTrainTimesteps, n, c.steps_offset, round);
    const out = round ? timesteps : timesteps.map(Math.fround);
    this.checkInferenceSchedule(out, n);
    return out;
  }

  /**
   * The schedule set_timesteps computed (for n steps) must lie in [0, T − 1]: 'leading' spacing adds
   * steps_offset, which with many steps pushes the first timestep past the last trained one (diffusers fails
   * with an IndexError). And under zero terminal SNR ᾱ_{T−1} = 0, where an ε-prediction cannot give x̂₀
   * ((x − ε)/0: diffusers returns inf and NaN).
   */
  protected checkInferenceSchedule(timesteps: readonly number[], n: number): void {
    const T = this.numTrainTimesteps;
    const c = this.config as unknown as Record<string, unknown>;
    const outside = timesteps.find((t) => !(t >= 0 && t <= T - 1));
    if (outside !== undefined) {
      this.configFault(`${this.className}: ${n} inference steps with timestep_spacing ${showValue(c.timestep_spacing)} and steps_offset ${showValue(c.steps_offset)} give timestep ${outside}, outside the trained [0, ${T - 1}]; use fewer steps or another spacing`);
    }
    const signalless = c.prediction_type === 'epsilon' ? timesteps.find((t) => this.acp[t] === 0) : undefined;
    if (signalless !== undefined) {
      this.configFault(`${this.className}: timestep ${signalless} has alphas_cumprod 0 (rescale_betas_zero_snr true), where prediction_type 'epsilon' cannot recover x0; use prediction_type 'v_prediction', as zero-terminal-SNR models are trained, or timestep_spacing 'leading'`);
    }
  }
}

/** Timesteps given as a tensor (add_noise, compute_snr) must be integers in [0, T) to index ᾱ. */
export function checkTimestepIndices(className: string, timesteps: Tensor, numTrainTimesteps: number): void {
  if (!['int64', 'int32', 'int16', 'int8', 'uint8'].includes(timesteps.dtype)) {
    throw new Error(`${className}: timesteps must be an integer tensor (int64), got ${timesteps.dtype}`);
  }
  if (timesteps.device !== 'cpu') {
    // on a GPU, reading the values back would stall the training step (add_noise and compute_snr run every
    // step): the range is asserted on the device instead, failing at the next synchronisation
    tidy(() => assertAsync(timesteps.ge(0).logicalAnd(timesteps.lt(numTrainTimesteps)).all()));
    return;
  }
  const bad = Array.from(timesteps.toFloat64Array()).find((t) => t < 0 || t >= numTrainTimesteps);
  if (bad !== undefined) throw new Error(`${className}: timestep ${bad} is outside [0, ${numTrainTimesteps})`);
}
const assertAsync = opVoid('_assert_async');

/** A timestep the schedule does not contain (diffusers fails with an IndexError). */
export function timestepNotFound(className: string, t: number, timesteps: readonly number[]): never {
  throw new Error(`${className}: timestep ${t} is not in the schedule (timesteps: ${timesteps.slice(0, 6).join(', ')}${timesteps.length > 6 ? ', …' : ''})`);
}
