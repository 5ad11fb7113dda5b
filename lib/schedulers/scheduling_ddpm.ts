// DDPMScheduler for training (diffusers 0.31 schedulers/scheduling_ddpm.py): the noise schedule built from a
// pipeline's scheduler/scheduler_config.json, and the two things a training step asks of it, add_noise (the
// forward process q(x_t | x_0)) and get_velocity (the v-prediction target). Plus compute_snr from diffusers'
// training_utils, the signal-to-noise ratio that Min-SNR loss weighting needs.
//
// The arithmetic copies diffusers op for op, in float32 as it does (linspace in float32, then squared, for
// 'scaled_linear'; the cosine schedule in float64 Python floats then cast), so alphas_cumprod is
// bit-identical to the reference on the same libtorch. Sampling (set_timesteps/step) is the inference
// pipeline's business and is not here.
import { op } from '../ops.js';
import { dispose, keep, tidy } from '../scope.js';
import type { Device, Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import { readConfig, resolvePretrained, type FromPretrainedOptions } from '../models/loading.js';

export type BetaSchedule = 'linear' | 'scaled_linear' | 'squaredcos_cap_v2' | 'sigmoid';
export type PredictionType = 'epsilon' | 'v_prediction' | 'sample';

/** scheduler_config.json of a DDPMScheduler: diffusers 0.31's __init__ arguments, same names. */
export interface DDPMSchedulerConfig {
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
}

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

/** The config's betas (float32, CPU), before any zero-SNR rescaling. */
export function betasFromConfig(c: DDPMSchedulerConfig): Tensor {
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

export class DDPMScheduler {
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
