// DDPMScheduler (diffusers 0.31 schedulers/scheduling_ddpm.py): the noise schedule built from a pipeline's
// scheduler/scheduler_config.json, the two things a training step asks of it, add_noise (the forward process
// q(x_t | x_0)) and get_velocity (the v-prediction target), and ancestral sampling (set_timesteps/step). Plus
// compute_snr from diffusers' training_utils, the signal-to-noise ratio that Min-SNR loss weighting needs.
//
// The arithmetic copies diffusers op for op, in float32 as it does (linspace in float32, then squared, for
// 'scaled_linear'; the cosine schedule in float64 Python floats then cast), so alphas_cumprod is
// bit-identical to the reference on the same libtorch.
//
// This file also holds what every sampling scheduler shares (lib/schedulers/scheduling_*.ts import it from
// here rather than from scheduler.ts, which imports them all): config resolution, the betas → alphas_cumprod
// schedule, numpy's rounding/linspace/interp in float64, float32 scalar arithmetic, and randn_tensor.
import { op } from '../ops.js';
import { dispose, keep, tidy } from '../scope.js';
import type { Device, Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import { readConfig, resolvePretrained, type FromPretrainedOptions } from '../models/loading.js';
import type { Generator } from '../random.js';
import type { Scheduler } from './scheduler.js';

export type BetaSchedule = 'linear' | 'scaled_linear' | 'squaredcos_cap_v2' | 'sigmoid';
export type PredictionType = 'epsilon' | 'v_prediction' | 'sample';

/** scheduler_config.json of a DDPMScheduler: diffusers 0.31's __init__ arguments, same names. */
export type DDPMSchedulerConfig = {
  num_train_timesteps: number;
  beta_start: number;
  beta_end: number;
  beta_schedule: BetaSchedule;
  trained_betas: number[] | null;
  variance_type: string;
  clip_sample: boolean;
  prediction_type: PredictionType;
  thresholding: boolean;
  dynamic_thresholding_ratio: number;
  clip_sample_range: number;
  sample_max_value: number;
  timestep_spacing: string;
  steps_offset: number;
  rescale_betas_zero_snr: boolean;
};

/** diffusers' defaults (DDPMScheduler.__init__), used for fields a config leaves out. */
export const DDPM_SCHEDULER_DEFAULTS: Readonly<DDPMSchedulerConfig> = Object.freeze({
  num_train_timesteps: 1000,
  beta_start: 0.0001,
  beta_end: 0.02,
  beta_schedule: 'linear',
  trained_betas: null,
  variance_type: 'fixed_small',
  clip_sample: true,
  prediction_type: 'epsilon',
  thresholding: false,
  dynamic_thresholding_ratio: 0.995,
  clip_sample_range: 1.0,
  sample_max_value: 1.0,
  timestep_spacing: 'leading',
  steps_offset: 0,
  rescale_betas_zero_snr: false,
});

const BETA_SCHEDULES: readonly BetaSchedule[] = ['linear', 'scaled_linear', 'squaredcos_cap_v2', 'sigmoid'];
const PREDICTION_TYPES: readonly PredictionType[] = ['epsilon', 'v_prediction', 'sample'];

export interface ParsedDDPMSchedulerConfig {
  config: DDPMSchedulerConfig;
  /**
   * Keys of the JSON that DDPMScheduler does not take (e.g. PNDM's skip_prk_steps in SD 1.x's
   * scheduler_config.json). diffusers ignores them the same way; `_class_name` and other `_` keys are
   * not listed.
   */
  ignoredKeys: string[];
}

/**
 * Fills diffusers' defaults, applies overrides (as `DDPMScheduler.from_config(config, **overrides)`), and
 * refuses values the training math would get wrong. Fields that only matter for sampling are kept as given.
 */
export function parseDDPMSchedulerConfig(raw: object, overrides: Partial<DDPMSchedulerConfig> = {}): ParsedDDPMSchedulerConfig {
  const known = new Set(Object.keys(DDPM_SCHEDULER_DEFAULTS));
  const given = { ...definedEntries(raw), ...definedEntries(overrides) };
  const ignoredKeys = Object.keys(given).filter((k) => !k.startsWith('_') && !known.has(k));
  const picked = Object.fromEntries(Object.entries(given).filter(([k]) => known.has(k)));
  const c = { ...DDPM_SCHEDULER_DEFAULTS, ...picked } as DDPMSchedulerConfig;
  const bad = (field: string, want: string): never => {
    throw new Error(`DDPMScheduler config: '${field}' must be ${want}, got ${JSON.stringify((c as unknown as Record<string, unknown>)[field])}`);
  };
  if (!Number.isInteger(c.num_train_timesteps) || c.num_train_timesteps < 1) bad('num_train_timesteps', 'a positive integer');
  for (const k of ['beta_start', 'beta_end'] as const) if (typeof c[k] !== 'number' || !Number.isFinite(c[k])) bad(k, 'a finite number');
  if (c.trained_betas !== null) {
    if (!Array.isArray(c.trained_betas) || !c.trained_betas.every((b) => typeof b === 'number' && Number.isFinite(b))) bad('trained_betas', 'null or a list of numbers');
    // diffusers would only fail later, indexing past the end with a sampled timestep
    if (c.trained_betas.length !== c.num_train_timesteps) {
      throw new Error(`DDPMScheduler config: 'trained_betas' has ${c.trained_betas.length} values but num_train_timesteps is ${c.num_train_timesteps}`);
    }
  } else if (!BETA_SCHEDULES.includes(c.beta_schedule)) {
    // diffusers: NotImplementedError(f"{beta_schedule} is not implemented for DDPMScheduler")
    throw new Error(`DDPMScheduler config: beta_schedule ${JSON.stringify(c.beta_schedule)} is not implemented (DDPMScheduler knows ${BETA_SCHEDULES.map((s) => `'${s}'`).join(', ')})`);
  }
  if (!PREDICTION_TYPES.includes(c.prediction_type)) bad('prediction_type', `one of ${PREDICTION_TYPES.map((s) => `'${s}'`).join(', ')}`);
  if (typeof c.rescale_betas_zero_snr !== 'boolean') bad('rescale_betas_zero_snr', 'true or false');
  return { config: c, ignoredKeys };
}

function definedEntries(o: object): Record<string, unknown> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined));
}

const cumprodOp = op('cumprod');
const rsubOp = op('rsub.Scalar');
/** torch.cumprod(x, dim) */
const cumprod = (x: Tensor, dim: number): Tensor => cumprodOp(x, dim, null) as Tensor;
/** `value - x`, Python's `1.0 - tensor` (aten::rsub). */
const rsub = (x: Tensor, value: number): Tensor => rsubOp(x, value, 1) as Tensor;

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
export function rescaleZeroTerminalSnr(betas: Tensor): Tensor {
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

/** The config fields that define the beta schedule (every scheduler class has them, same names). */
export type BetaScheduleConfig = Pick<DDPMSchedulerConfig, 'num_train_timesteps' | 'beta_start' | 'beta_end' | 'beta_schedule' | 'trained_betas'>
  & { rescale_betas_zero_snr?: boolean };

/** The config's betas (float32, CPU), before any zero-SNR rescaling. */
export function betasFromConfig(c: BetaScheduleConfig): Tensor {
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
      throw new Error(`DDPMScheduler: beta_schedule ${JSON.stringify(c.beta_schedule)} is not implemented`);
  }
}

/**
 * alphas_cumprod of a beta schedule (float32, CPU; the caller owns it): betas, optionally rescaled to zero
 * terminal SNR, then cumprod(1 − β). With `clampLast` (Euler, DPM-Solver) a zero-SNR schedule's last value
 * becomes 2⁻²⁴ instead of 0, as those diffusers classes do so that σ stays finite.
 */
export function alphasCumprodFromConfig(c: BetaScheduleConfig, clampLast = false): Tensor {
  return tidy(() => {
    const raw = betasFromConfig(c);
    const betas = c.rescale_betas_zero_snr ? rescaleZeroTerminalSnr(raw) : raw;
    const acp = cumprod(rsub(betas, 1), 0);
    if (clampLast && c.rescale_betas_zero_snr) acp.select(0, c.num_train_timesteps - 1).fill_(2 ** -24);
    return acp;
  });
}

// ---- shared by every sampling scheduler ------------------------------------------------------------------

/** How a config value is shown in errors (JSON, except non-finite numbers, which JSON cannot write). */
export function showValue(v: unknown): string {
  return typeof v === 'number' && !Number.isFinite(v) ? String(v) : JSON.stringify(v);
}

/** Throws `<Class> config: '<field>' = <value> <why>`. */
export function configError(className: string, field: string, value: unknown, why: string): never {
  throw new Error(`${className} config: '${field}' = ${showValue(value)} ${why}`);
}

/**
 * `<Class>.from_config(raw, **overrides)`: the keys the class knows, its defaults for the rest (keys it does
 * not know are ignored, as diffusers does). Values are type-checked against the defaults' types (a null
 * default accepts null, a number, a string or a list); `-Infinity`/`Infinity` numbers pass.
 */
export function resolveSchedulerConfig<T extends Record<string, unknown>>(className: string, defaults: T, raw: object, overrides: Record<string, unknown> = {}): T {
  const given = { ...definedEntries(raw), ...definedEntries(overrides) };
  const c: Record<string, unknown> = { ...defaults };
  for (const [k, v] of Object.entries(given)) if (Object.hasOwn(defaults, k)) c[k] = v;
  for (const [k, d] of Object.entries(defaults)) {
    const v = c[k];
    const ok = d === null ? v === null || ['number', 'string'].includes(typeof v) || Array.isArray(v)
      : typeof d === 'number' ? typeof v === 'number' && !Number.isNaN(v)
        : typeof v === typeof d;
    if (!ok) configError(className, k, v, `must be ${d === null ? 'null or a value' : `a ${typeof d}`}`);
  }
  if (!Number.isInteger(c.num_train_timesteps) || (c.num_train_timesteps as number) < 1) configError(className, 'num_train_timesteps', c.num_train_timesteps, 'must be a positive integer');
  if ('steps_offset' in c && !Number.isInteger(c.steps_offset)) configError(className, 'steps_offset', c.steps_offset, 'must be an integer');
  return c as T;
}

/** Throws unless c[field] is one of `allowed` (what difflora implements of what diffusers accepts). */
export function checkOneOf(className: string, c: Record<string, unknown>, field: string, allowed: readonly unknown[]): void {
  if (!allowed.includes(c[field])) {
    configError(className, field, c[field], `is not supported (difflora implements ${allowed.map(showValue).join(', ')})`);
  }
}

/** The beta-schedule checks of every class but DDPMScheduler (only DDPMScheduler has 'sigmoid'). */
export function checkBetaConfig(className: string, c: BetaScheduleConfig): void {
  if (c.trained_betas !== null) {
    if (!Array.isArray(c.trained_betas) || !c.trained_betas.every((b) => typeof b === 'number' && Number.isFinite(b))) configError(className, 'trained_betas', c.trained_betas, 'must be null or a list of numbers');
    if (c.trained_betas.length !== c.num_train_timesteps) configError(className, 'trained_betas', `${c.trained_betas.length} values`, `but num_train_timesteps is ${c.num_train_timesteps}`);
  } else {
    checkOneOf(className, c, 'beta_schedule', ['linear', 'scaled_linear', 'squaredcos_cap_v2']);
  }
}

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

/**
 * diffusers' randn_tensor: a CPU generator draws on the CPU and the result moves to `like`'s device; no
 * generator draws on that device with its default generator. Same shape and dtype as `like`.
 */
export function randnTensor(like: Tensor, generator?: Generator): Tensor {
  const device = generator?.device ?? like.device;
  const noise = torch.randn(like.shape, { dtype: like.dtype, device, generator });
  return device === like.device ? noise : noise.to({ device: like.device });
}

/** The scheduler's state was used before set_timesteps (diffusers raises the same). */
export function needTimesteps(className: string): never {
  throw new Error(`${className}: number of inference steps is not set; call setTimesteps(n) before step()`);
}

/** A timestep the schedule does not contain (diffusers fails with an IndexError). */
export function timestepNotFound(className: string, t: number, timesteps: readonly number[]): never {
  throw new Error(`${className}: timestep ${t} is not in the schedule (timesteps: ${timesteps.slice(0, 6).join(', ')}${timesteps.length > 6 ? ', …' : ''})`);
}

/**
 * The timesteps of DDPMScheduler and DDIMScheduler.set_timesteps (descending integers): 'linspace' rounds
 * np.linspace(0, T − 1, n); 'leading' takes multiples of T // n plus steps_offset; 'trailing' rounds
 * np.arange(T, 0, −T / n) and subtracts 1.
 */
export function spacedTimesteps(className: string, spacing: string, numTrain: number, n: number, stepsOffset: number): number[] {
  if (!Number.isInteger(n) || n < 1) throw new Error(`${className}: numInferenceSteps must be a positive integer, got ${n}`);
  if (n > numTrain) throw new Error(`${className}: numInferenceSteps (${n}) cannot be larger than num_train_timesteps (${numTrain}): the unet model trained with this scheduler can only handle maximal ${numTrain} timesteps`);
  switch (spacing) {
    case 'linspace':
      return linspace64(0, numTrain - 1, n).map(roundHalfEven).reverse();
    case 'leading': {
      const ratio = Math.floor(numTrain / n);
      return Array.from({ length: n }, (_, i) => i * ratio + stepsOffset).reverse();
    }
    case 'trailing':
      return arangeDown(numTrain, 0, -numTrain / n).map((t) => roundHalfEven(t) - 1);
    default:
      return configError(className, 'timestep_spacing', spacing, "is not supported (difflora implements 'linspace', 'leading', 'trailing')");
  }
}

export class DDPMScheduler implements Scheduler {
  readonly name = 'ddpm';
  readonly className = 'DDPMScheduler';
  readonly order = 1;
  readonly initNoiseSigma = 1.0;
  readonly config: DDPMSchedulerConfig;
  /** Keys of the config JSON this scheduler does not use (see parseDDPMSchedulerConfig). */
  readonly ignoredKeys: readonly string[];
  /** β_t, float32 [num_train_timesteps] on the CPU. */
  readonly betas: Tensor;
  /** 1 − β_t. */
  readonly alphas: Tensor;
  /** ᾱ_t = ∏_{s≤t} α_s. */
  readonly alphasCumprod: Tensor;
  // diffusers moves alphas_cumprod to the sample's device once and keeps it there; so do we, per device
  private readonly onDevice = new Map<Device, Tensor>();
  private disposed = false;
  // sampling: alphas_cumprod as float32 numbers, the schedule, and set_timesteps' step count
  private acp: Float32Array | null = null;
  private schedule: number[] | null = null;
  private numInferenceSteps: number | null = null;

  constructor(config: Partial<DDPMSchedulerConfig> | Record<string, unknown> = {}, overrides: Partial<DDPMSchedulerConfig> = {}) {
    const parsed = parseDDPMSchedulerConfig(config, overrides);
    this.config = Object.freeze(parsed.config);
    this.ignoredKeys = Object.freeze(parsed.ignoredKeys);
    const t = tidy(() => {
      const raw = betasFromConfig(this.config);
      const betas = this.config.rescale_betas_zero_snr ? rescaleZeroTerminalSnr(raw) : raw;
      const alphas = rsub(betas, 1);
      return { betas, alphas, alphasCumprod: cumprod(alphas, 0) };
    });
    this.betas = keep(t.betas);
    this.alphas = keep(t.alphas);
    this.alphasCumprod = keep(t.alphasCumprod);
  }

  /** `DDPMScheduler.from_config(json, **overrides)`: e.g. overrides `{ prediction_type: 'v_prediction' }`. */
  static fromConfig(config: object, overrides: Partial<DDPMSchedulerConfig> = {}): DDPMScheduler {
    return new DDPMScheduler(config as Record<string, unknown>, overrides);
  }

  /**
   * From a diffusers folder: `fromPretrained('path/to/sd', { subfolder: 'scheduler' })` (or a scheduler
   * folder itself, or a cached hub id) reads scheduler_config.json.
   */
  static fromPretrained(pathOrId: string, o: Pick<FromPretrainedOptions, 'subfolder' | 'revision' | 'cacheDir'> = {}, overrides: Partial<DDPMSchedulerConfig> = {}): DDPMScheduler {
    const dir = resolvePretrained(pathOrId, o);
    return DDPMScheduler.fromConfig(readConfig(dir, 'scheduler_config.json'), overrides);
  }

  get numTrainTimesteps(): number { return this.config.num_train_timesteps; }
  get predictionType(): PredictionType { return this.config.prediction_type; }

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

  /** The v-prediction target (Salimans & Ho 2022): sqrt(ᾱ_t)·noise − sqrt(1 − ᾱ_t)·sample. */
  getVelocity(sample: Tensor, noise: Tensor, timesteps: Tensor): Tensor {
    return tidy(() => {
      const [sqrtAlphaProd, sqrtOneMinusAlphaProd] = this.coefficients(sample, timesteps);
      return sqrtAlphaProd.mul(noise).sub(sqrtOneMinusAlphaProd.mul(sample));
    });
  }

  /** sqrt(ᾱ_t) and sqrt(1 − ᾱ_t) shaped [B, 1, …, 1] to broadcast over `like`. */
  private coefficients(like: Tensor, timesteps: Tensor): [Tensor, Tensor] {
    const alphasCumprod = this.alphasCumprodOn(like.device).to(like.dtype);
    const ts = timesteps.to({ device: like.device });
    // alphas_cumprod[timesteps].flatten() (index_select on the flattened index gives the same elements)
    const picked = alphasCumprod.indexSelect(0, ts.flatten());
    return [unsqueezeTo(picked.pow(0.5), like.ndim), unsqueezeTo(rsub(picked, 1).pow(0.5), like.ndim)];
  }

  // ---- sampling (diffusers' set_timesteps / step, variance_type fixed_small[_log] / fixed_large)

  /** Refuses the config values sampling does not implement (training ignores them); the factory calls it. */
  checkSamplingConfig(): void {
    const c = this.config as unknown as Record<string, unknown>;
    checkOneOf('DDPMScheduler', c, 'thresholding', [false]);
    checkOneOf('DDPMScheduler', c, 'variance_type', ['fixed_small', 'fixed_small_log', 'fixed_large']);
    checkOneOf('DDPMScheduler', c, 'timestep_spacing', ['linspace', 'leading', 'trailing']);
    checkOneOf('DDPMScheduler', c, 'clip_sample', [true, false]);
  }

  /** After setTimesteps the sampling schedule; before it, every training timestep (T − 1 … 0) as diffusers. */
  get timesteps(): number[] {
    this.schedule ??= Array.from({ length: this.config.num_train_timesteps }, (_, i) => this.config.num_train_timesteps - 1 - i);
    return this.schedule;
  }

  setTimesteps(numInferenceSteps: number): void {
    this.checkAlive();
    this.checkSamplingConfig();
    const c = this.config;
    this.schedule = spacedTimesteps('DDPMScheduler', c.timestep_spacing, c.num_train_timesteps, numInferenceSteps, c.steps_offset);
    this.numInferenceSteps = numInferenceSteps;
  }

  scaleModelInput(sample: Tensor, _timestep: number): Tensor {
    return sample;
  }

  /** The timestep after t: the next in the schedule (−1 after the last), or t − 1 without setTimesteps. */
  private previousTimestep(t: number): number {
    if (this.numInferenceSteps === null) return t - 1;
    const ts = this.timesteps;
    const i = ts.indexOf(t);
    if (i < 0) return timestepNotFound('DDPMScheduler', t, ts);
    return i === ts.length - 1 ? -1 : (ts[i + 1] as number);
  }

  /**
   * One ancestral step: x₀ from the model output, the posterior mean μ̃(x_t, x₀), plus σ_t·z for t > 0 (z
   * from randn_tensor with `generator`). Coefficients in float32 as diffusers' 0-dim tensors.
   */
  step(modelOutput: Tensor, timestep: number, sample: Tensor, options: { generator?: Generator } = {}): Tensor {
    this.checkAlive();
    this.checkSamplingConfig();
    const c = this.config;
    const t = timestep;
    if (!Number.isInteger(t) || t < 0 || t >= c.num_train_timesteps) throw new Error(`DDPMScheduler: timestep must be an integer in [0, ${c.num_train_timesteps}), got ${t}`);
    const prevT = this.previousTimestep(t);
    const f = Math.fround;
    this.acp ??= this.alphasCumprod.dataSync() as Float32Array;
    // 1. alphas, betas
    const alphaProdT = this.acp[t] as number;
    const alphaProdTPrev = prevT >= 0 ? (this.acp[prevT] as number) : 1;
    const betaProdT = f(1 - alphaProdT);
    const betaProdTPrev = f(1 - alphaProdTPrev);
    const currentAlphaT = f(alphaProdT / alphaProdTPrev);
    const currentBetaT = f(1 - currentAlphaT);
    // 2.–6. on the sample, in a scope
    return tidy(() => {
      // 2. predicted x₀
      let predOriginal: Tensor;
      if (c.prediction_type === 'epsilon') predOriginal = sample.sub(modelOutput.mul(sqrt32(betaProdT))).div(sqrt32(alphaProdT));
      else if (c.prediction_type === 'sample') predOriginal = modelOutput;
      else predOriginal = sample.mul(sqrt32(alphaProdT)).sub(modelOutput.mul(sqrt32(betaProdT)));
      // 3. clip
      if (c.clip_sample) predOriginal = predOriginal.clamp(-c.clip_sample_range, c.clip_sample_range);
      // 4. coefficients of x₀ and x_t in μ̃ (formula (7) of the DDPM paper)
      const predOriginalCoeff = f(f(sqrt32(alphaProdTPrev) * currentBetaT) / betaProdT);
      const currentSampleCoeff = f(f(sqrt32(currentAlphaT) * betaProdTPrev) / betaProdT);
      // 5. μ̃
      const predPrev = predOriginal.mul(predOriginalCoeff).add(sample.mul(currentSampleCoeff));
      // 6. noise
      if (t <= 0) return predPrev;
      const noise = randnTensor(modelOutput, options.generator);
      let variance = Math.max(f(f(betaProdTPrev / betaProdT) * currentBetaT), f(1e-20));
      if (c.variance_type === 'fixed_small_log') return predPrev.add(noise.mul(exp32(f(0.5 * log32(variance)))));
      if (c.variance_type === 'fixed_large') variance = currentBetaT;
      return predPrev.add(noise.mul(sqrt32(variance)));
    });
  }

  /** Frees betas, alphas, alphasCumprod and the per-device copies (idempotent). */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    dispose([this.betas, this.alphas, this.alphasCumprod, ...this.onDevice.values()]);
    this.onDevice.clear();
  }
  [Symbol.dispose](): void { this.dispose(); }
  get isDisposed(): boolean { return this.disposed; }

  private checkAlive(): void {
    if (this.disposed) throw new Error('DDPMScheduler: used after dispose()');
  }
}

/** Appends trailing size-1 dimensions until x has `rank` dimensions (diffusers' `while ...: unsqueeze(-1)`). */
function unsqueezeTo(x: Tensor, rank: number): Tensor {
  let out = x;
  while (out.ndim < rank) out = out.unsqueeze(-1);
  return out;
}

/**
 * SNR(t) = ᾱ_t / (1 − ᾱ_t), shaped like timesteps, float32, as diffusers.training_utils.compute_snr (Min-SNR
 * weighting, Hang et al. 2023): computed as (sqrt(ᾱ_t) / sqrt(1 − ᾱ_t))², in that order, for the same bits.
 */
export function computeSnr(scheduler: DDPMScheduler, timesteps: Tensor): Tensor {
  return tidy(() => {
    const alphasCumprod = scheduler.alphasCumprodOn(timesteps.device);
    const index = timesteps.flatten();
    const alpha = alphasCumprod.pow(0.5).indexSelect(0, index).float().reshape(timesteps.shape);
    const sigma = rsub(alphasCumprod, 1).pow(0.5).indexSelect(0, index).float().reshape(timesteps.shape);
    return alpha.div(sigma).pow(2);
  });
}

/**
 * diffusers' add_noise of the alphas_cumprod schedulers (DDPM, DDIM, PNDM): sqrt(ᾱ_t)·x₀ + sqrt(1 − ᾱ_t)·noise,
 * ᾱ in the sample's dtype and device, one timestep per batch item.
 */
export function addNoiseWithAlphasCumprod(alphasCumprod: Tensor, originalSamples: Tensor, noise: Tensor, timesteps: Tensor): Tensor {
  return tidy(() => {
    const acp = alphasCumprod.to({ dtype: originalSamples.dtype, device: originalSamples.device });
    const picked = acp.indexSelect(0, timesteps.to({ device: originalSamples.device }).flatten());
    const sqrtAlphaProd = unsqueezeTo(picked.pow(0.5), originalSamples.ndim);
    const sqrtOneMinusAlphaProd = unsqueezeTo(rsub(picked, 1).pow(0.5), originalSamples.ndim);
    return sqrtAlphaProd.mul(originalSamples).add(sqrtOneMinusAlphaProd.mul(noise));
  });
}
