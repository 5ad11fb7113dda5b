// What the σ-based schedulers share beyond scheduling_utils.ts, as diffusers copies it into each of their files
// ("# Copied from …"): the noise schedules that replace the spaced σ (Karras et al. 2022, exponential, beta, Lu
// et al.'s uniform-λ), _sigma_to_t (the fractional training timestep of a σ), the dynamic thresholding of
// x̂₀ (_threshold_sample), α_t/σ_t/λ of a σ for the exponential-integrator solvers (DPM-Solver, UniPC, DEIS),
// and the float64 scalar arithmetic these need; and the base classes and config groups of those families:
// SigmaSchedulerBase (all σ schedulers), TwoStageSchedulerBase (the two-evaluation Heun, KDPM2, KDPM2 ancestral,
// DPMSolverSDE), SolverSchedulerBase (the multistep history of DPM-Solver, UniPC, DEIS), K_DIFFUSION_DEFAULTS and
// SOLVER_DEFAULTS. Like scheduling_utils.ts it is no one scheduler's file: every scheduling_*.ts may import it.
//
// Precision follows diffusers: numpy float64 for σ, then float32; where numpy computes in float32 (np.log of
// the float32 training σ, _sigma_to_t of a float32 σ) the arithmetic is rounded to float32 at each step. The
// transcendental functions go through libtorch's scalar path (glibc's libm, as numpy and Python use), not
// JavaScript's Math.
import { op } from '../ops.js';
import { dispose, keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import {
  SCHEDULER_DEFAULTS, SchedulerBase, THRESHOLDING_DEFAULTS, arangeDown, configError, exp32, interpOnIndex, linspace64, log32, roundHalfEven, sqrt32,
  timestepNotFound, unsqueezeTo, type BetaScheduleConfig, type PredictionType, type ScheduleConfig, type ThresholdingConfig, type TimestepSpacing,
} from './scheduling_utils.js';

// ---- float64 libm scalars --------------------------------------------------------------------------------

const scalar64 = (x: number): Tensor => torch.scalarTensor(x, { dtype: 'float64' });
/** glibc's log of a float64 (Python's math.log, numpy's np.log on a float64 scalar). */
export const log64 = (x: number): number => tidy(() => scalar64(x).log().item());
/** glibc's exp of a float64. */
export const exp64 = (x: number): number => tidy(() => scalar64(x).exp().item());
/** torch.expm1 of a float32 0-dim tensor. */
const expm1Op = op('expm1');
export const expm1 = (x: number): number => tidy(() => (expm1Op(torch.scalarTensor(x)) as Tensor).item());
/** glibc's pow of float64s (Python's `x ** y`). */
export const pow64 = (x: number, y: number): number => tidy(() => scalar64(x).pow(y).item());

// ---- the σ schedules -------------------------------------------------------------------------------------

/** Which schedule replaces the spaced σ: use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas (at most one). */
export type SigmaSchedule = 'karras' | 'exponential' | 'beta' | 'spaced';

type SigmaFlags = { use_karras_sigmas?: boolean; use_exponential_sigmas?: boolean; use_beta_sigmas?: boolean };

/** The σ schedule flags as the classes that have them declare them (all three, default false). */
export type SigmaScheduleFlags = Required<SigmaFlags>;

export const SIGMA_SCHEDULE_DEFAULTS: Readonly<SigmaScheduleFlags> = Object.freeze({
  use_karras_sigmas: false,
  use_exponential_sigmas: false,
  use_beta_sigmas: false,
});

/** The fields the k-diffusion ports (Heun, LMS, KDPM2, KDPM2 ancestral, DPMSolverSDE) share besides prediction_type. */
export type KDiffusionConfig = BetaScheduleConfig & SigmaScheduleFlags & { timestep_spacing: TimestepSpacing; steps_offset: number };

/**
 * The defaults Heun, KDPM2, KDPM2 ancestral and DPMSolverSDE share before their own fields: Stable Diffusion's
 * betas (0.00085 to 0.012, where the other classes default to 0.0001 to 0.02) and no σ schedule.
 */
export const K_DIFFUSION_DEFAULTS = Object.freeze({
  ...SCHEDULER_DEFAULTS,
  beta_start: 0.00085,
  beta_end: 0.012,
  ...SIGMA_SCHEDULE_DEFAULTS,
});

/**
 * The fields the exponential-integrator solvers (DPM-Solver multistep and single-step, UniPC, DEIS) share:
 * the order, x̂₀ thresholding, lower_order_final and the σ schedule flags.
 */
export type SolverConfig = BetaScheduleConfig & ThresholdingConfig & SigmaScheduleFlags & {
  solver_order: number;
  prediction_type: PredictionType;
  lower_order_final: boolean;
};

/** Their shared defaults up to their own fields: second order, no thresholding. */
export const SOLVER_DEFAULTS = Object.freeze({
  ...SCHEDULER_DEFAULTS,
  solver_order: 2,
  ...THRESHOLDING_DEFAULTS,
});

/** The config's σ schedule; more than one flag set is refused, as diffusers' constructors do. */
export function sigmaScheduleOf(className: string, c: SigmaFlags): SigmaSchedule {
  const on = (['karras', 'exponential', 'beta'] as const).filter((k) => c[`use_${k}_sigmas`] === true);
  if (on.length > 1) configError(className, `use_${on[1]}_sigmas`, true, `cannot be combined with use_${on[0]}_sigmas: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be used`);
  return on[0] ?? 'spaced';
}

/** The config, after refusing more than one σ schedule flag (before the scheduler allocates anything). */
function withSigmaFlagsChecked<C extends SigmaFlags>(className: string, config: C): C {
  sigmaScheduleOf(className, config);
  return config;
}

/** Karras et al.'s σ (ρ = 7) from σ_max down to σ_min, float64 (k-diffusion's get_sigmas_karras). */
export function karrasSigmas(sigmaMin: number, sigmaMax: number, n: number): number[] {
  const rho = 7.0;
  const minInvRho = pow64(sigmaMin, 1 / rho);
  const maxInvRho = pow64(sigmaMax, 1 / rho);
  return linspace64(0, 1, n).map((r) => pow64(maxInvRho + r * (minInvRho - maxInvRho), rho));
}

/** σ evenly spaced in log σ, float32 (torch.linspace(log σ_max, log σ_min, n).exp()). */
export function exponentialSigmas(sigmaMin: number, sigmaMax: number, n: number): Float32Array {
  return tidy(() => torch.linspace(log64(sigmaMax), log64(sigmaMin), n, { dtype: 'float32' }).exp().dataSync() as Float32Array);
}

/** "Beta Sampling is All You Need" (Lee et al. 2024): σ_min + ppf(1 − r)·(σ_max − σ_min) with Beta(0.6, 0.6), float32. */
export function betaSigmas(sigmaMin: number, sigmaMax: number, n: number): Float32Array {
  return Float32Array.from(linspace64(0, 1, n), (r) => sigmaMin + betaPpf(1 - r, 0.6, 0.6) * (sigmaMax - sigmaMin));
}

/** Lu et al.'s λ schedule (DPM-Solver's use_lu_lambdas): λ linear from λ_max to λ_min, float64. */
export function luLambdas(lambdaMin: number, lambdaMax: number, n: number): number[] {
  return linspace64(0, 1, n).map((r) => lambdaMax + r * (lambdaMin - lambdaMax));
}

/** np.log of the float32 training σ: float32. */
export function logSigmasOf(sigmas: Float32Array): Float32Array {
  return Float32Array.from(sigmas, (s) => log64(s));
}

/**
 * _sigma_to_t: the training timestep, fractional, at which log σ interpolated linearly between training
 * timesteps equals log `sigma`. `precision` is how numpy computes it: 'float64' for a float64 σ (Karras, Lu),
 * 'float32' for a float32 σ (exponential and beta: float32 until the final float64 sum), 'torch32' when σ and
 * log σ are torch float32 tensors (KDPM2's interpolated σ: float32 throughout).
 */
export function sigmaToT(sigma: number, logSigmas: Float32Array, precision: 'float64' | 'float32' | 'torch32'): number {
  const f = Math.fround;
  const f64 = precision === 'float64';
  const logSigma = f64 ? log64(Math.max(sigma, 1e-10)) : f(log64(Math.max(f(sigma), f(1e-10))));
  // low: the last training timestep whose log σ is ≤ log σ (0 when none), at most T − 2
  let low = 0;
  for (let i = 0; i < logSigmas.length; i++) if (logSigma - (logSigmas[i] as number) >= 0) low = i;
  low = Math.min(low, logSigmas.length - 2);
  const lo = logSigmas[low] as number;
  const hi = logSigmas[low + 1] as number;
  let w = f64 ? (lo - logSigma) / f(lo - hi) : f(f(lo - logSigma) / f(lo - hi));
  w = Math.min(Math.max(w, 0), 1);
  if (f64) return (1 - w) * low + w * (low + 1);
  const a = f(1 - w) * low;
  const b = w * (low + 1);
  return precision === 'float32' ? a + b : f(f(a) + f(b));
}

// ---- the exponential-integrator solvers (DPM-Solver, UniPC, DEIS) ---------------------------------------

/** α_t = 1/sqrt(σ² + 1) and σ_t = σ·α_t of a σ (diffusers' _sigma_to_alpha_sigma_t), float32. */
export function alphaSigma(sigma: number): [number, number] {
  const f = Math.fround;
  const alpha = f(1 / sqrt32(f(f(sigma * sigma) + 1)));
  return [alpha, f(sigma * alpha)];
}

/** λ = log α_t − log σ_t of a σ, float32 (torch.log of 0-dim float32 tensors). */
export function lambdaOfSigma(sigma: number): number {
  const [alpha, s] = alphaSigma(sigma);
  return Math.fround(log32(alpha) - log32(s));
}

const quantileOp = op('quantile.scalar');
/**
 * Dynamic thresholding (Saharia et al. 2022, Imagen): per sample, s = the `ratio` quantile of |x̂₀| clamped
 * to [1, maxValue]; x̂₀ is clipped to [−s, s] and divided by s (diffusers' _threshold_sample).
 */
export function thresholdSample(sample: Tensor, ratio: number, maxValue: number): Tensor {
  return tidy(() => {
    const [b, ...rest] = sample.shape as [number, ...number[]];
    const x = sample.to('float32').reshape([b, rest.reduce((p, d) => p * d, 1)]);
    const s = (quantileOp(x.abs(), ratio, 1, false, 'linear') as Tensor).clamp(1, maxValue).unsqueeze(1);
    return x.maximum(s.neg()).minimum(s).div(s).reshape(sample.shape).to(sample.dtype);
  });
}

// ---- the base class of the σ schedulers -------------------------------------------------------------------

/** σ_t = sqrt((1 − ᾱ_t) / ᾱ_t) for every training timestep, float32. */
function trainSigmasOf(alphasCumprod: Float32Array): Float32Array {
  const f = Math.fround;
  return alphasCumprod.map((a) => sqrt32(f(f(1 - a) / a)));
}

/** The config fields the σ schedulers read here (each class has a subset; absent ones take diffusers' fallback). */
export type SigmaSchedulerConfig = ScheduleConfig & SigmaFlags & {
  // DPMSolverSinglestepScheduler has neither
  timestep_spacing?: string;
  steps_offset?: number;
  sigma_min?: number | null;
  sigma_max?: number | null;
  final_sigmas_type?: 'zero' | 'sigma_min';
};

/** Float32Array → numbers, which the schedule arrays hold. */
export const numbers = (a: ArrayLike<number>): number[] => Array.from(a);

/**
 * The σ state of the k-diffusion-style schedulers (Euler, Euler ancestral, Heun, LMS, KDPM2, and the
 * exponential-integrator solvers DPM-Solver, UniPC, DEIS): σ of every training timestep, the schedule's σ (a
 * kept CPU tensor, replaced by each setTimesteps) and the step index. The defaults are Euler's
 * (set_timesteps, index_for_timestep, scale_model_input by sqrt(σ² + 1), add_noise x₀ + σ·noise).
 */
export abstract class SigmaSchedulerBase<C extends SigmaSchedulerConfig> extends SchedulerBase<C> {
  protected readonly trainSigmas: Float32Array;
  /** The config's σ schedule (use_karras_sigmas, …; 'spaced' without one). */
  protected readonly sigmaSchedule: SigmaSchedule;
  protected sigmaValues: Float32Array;
  protected schedule: number[];
  protected stepIndex: number | null = null;
  /** diffusers' _begin_index: where a pipeline starts in the schedule (img2img); null: found from the timestep. */
  protected beginIndex: number | null = null;
  /** Timesteps are float64 values (Heun, LMS, KDPM2 with a Karras, exponential or beta schedule), else float32 ones. */
  protected timestepsFloat64 = false;
  private logSigmasCache: Float32Array | null = null;
  private sigmaTensor: Tensor;

  /**
   * Before setTimesteps the schedule is every training timestep, descending, with σ as diffusers' __init__
   * sets them: 'descending' (Euler: the training σ reversed, then a final 0) or 'training' (DPM-Solver: as
   * they are).
   */
  protected constructor(className: string, config: C, initialSigmas: 'descending' | 'training') {
    // ᾱ's last value clamped to 2⁻²⁴ under zero terminal SNR, so that σ stays finite
    super(className, withSigmaFlagsChecked(className, config), { clampLastAlphaCumprod: true });
    this.trainSigmas = trainSigmasOf(this.acp);
    const T = config.num_train_timesteps;
    this.schedule = Array.from({ length: T }, (_, i) => T - 1 - i);
    this.sigmaValues = initialSigmas === 'descending' ? Float32Array.from([...this.trainSigmas].reverse().concat([0])) : this.trainSigmas.slice();
    this.sigmaTensor = keep(torch.tensor(this.sigmaValues));
    this.sigmaSchedule = sigmaScheduleOf(className, config);
  }

  get timesteps(): number[] { return this.schedule; }
  /** σ of each timestep and the final σ, float32, on the CPU. */
  get sigmas(): Tensor { return this.sigmaTensor; }

  /** np.log of the training σ, float32 (computed once). */
  protected get logSigmas(): Float32Array {
    this.logSigmasCache ??= logSigmasOf(this.trainSigmas);
    return this.logSigmasCache;
  }

  /**
   * Euler's set_timesteps (also Euler ancestral's): the k-diffusion σ (kDiffusionSigmas), timesteps as float32,
   * then the final σ (final_sigmas_type; 0 where the class has no such field).
   */
  setTimesteps(numInferenceSteps: number): void {
    const { timesteps, sigmas } = this.kDiffusionSigmas(numInferenceSteps);
    this.setSchedule(timesteps.map(Math.fround), [...sigmas, this.finalSigma()]);
  }

  /** The σ after the last step: 0, or the training schedule's σ_min (final_sigmas_type 'sigma_min'). */
  protected finalSigma(): number {
    return (this.config.final_sigmas_type ?? 'zero') === 'zero' ? 0 : (this.trainSigmas[0] as number);
  }

  /**
   * set_timesteps of the k-diffusion schedulers (Euler, Heun, LMS, KDPM2): the spacing's timesteps as float32
   * values ('linspace' not rounded) and σ interpolated at them in float64 (np.interp); or, with a σ schedule,
   * its σ between the interpolated (or configured) σ_min and σ_max and the timesteps _sigma_to_t finds for
   * them (float64 values). σ are returned before the final one and before the cast to float32.
   */
  protected kDiffusionSigmas(n: number): { timesteps: number[]; sigmas: number[] } {
    const spaced = this.spacedSchedule(n, false);
    const interp = interpOnIndex(spaced, this.trainSigmas);
    const min = this.config.sigma_min ?? (interp[interp.length - 1] as number);
    const max = this.config.sigma_max ?? (interp[0] as number);
    switch (this.sigmaSchedule) {
      case 'spaced':
        return { timesteps: spaced, sigmas: interp };
      case 'karras': {
        const sigmas = karrasSigmas(min, max, n);
        return { timesteps: sigmas.map((s) => sigmaToT(s, this.logSigmas, 'float64')), sigmas };
      }
      default: {
        const sigmas = numbers(this.sigmaSchedule === 'exponential' ? exponentialSigmas(min, max, n) : betaSigmas(min, max, n));
        return { timesteps: sigmas.map((s) => sigmaToT(s, this.logSigmas, 'float32')), sigmas };
      }
    }
  }

  /**
   * kDiffusionSigmas for the schedulers whose σ end in 0 (Heun, LMS, KDPM2, KDPM2 ancestral): timesteps as
   * float64 values with a σ schedule (Karras ones rounded with `roundKarras`, as KDPM2 does), else float32 ones;
   * σ with the final 0, float32.
   */
  protected kDiffusionSchedule(n: number, roundKarras = false): { timesteps: number[]; sigmas: Float32Array } {
    const { timesteps, sigmas } = this.kDiffusionSigmas(n);
    this.timestepsFloat64 = this.sigmaSchedule !== 'spaced';
    const rounded = roundKarras && this.sigmaSchedule === 'karras';
    return {
      timesteps: rounded ? timesteps.map(roundHalfEven) : this.timestepsFloat64 ? timesteps : timesteps.map(Math.fround),
      sigmas: Float32Array.from([...sigmas, 0]),
    };
  }

  /**
   * set_timesteps of the exponential-integrator solvers (DPM-Solver, UniPC, DEIS) for their integer
   * `timesteps`: σ interpolated at them; or Karras σ over the whole training range with the timesteps
   * _sigma_to_t finds, rounded. diffusers 0.31 crashes on use_exponential_sigmas and use_beta_sigmas there
   * (it passes num_inference_steps before setting it); difflora refuses them with that reason.
   */
  protected solverSigmas(timesteps: number[], n: number): { timesteps: number[]; sigmas: number[] } {
    switch (this.sigmaSchedule) {
      case 'spaced':
        return { timesteps, sigmas: interpOnIndex(timesteps, this.trainSigmas) };
      case 'karras': {
        const T = this.trainSigmas.length;
        const sigmas = karrasSigmas(this.trainSigmas[0] as number, this.trainSigmas[T - 1] as number, n);
        return { timesteps: sigmas.map((s) => roundHalfEven(sigmaToT(s, this.logSigmas, 'float64'))), sigmas };
      }
      default:
        return this.configFault(`${this.className}: use_${this.sigmaSchedule}_sigmas is not supported by this scheduler (diffusers 0.31 fails in set_timesteps with it); use use_karras_sigmas, or EulerDiscreteScheduler, HeunDiscreteScheduler, LMSDiscreteScheduler or KDPM2DiscreteScheduler with use_${this.sigmaSchedule}_sigmas`);
    }
  }

  /** diffusers' init_noise_sigma: max σ for 'linspace'/'trailing' spacing, sqrt(max σ² + 1) for 'leading'. */
  override get initNoiseSigma(): number {
    const max = this.sigmaValues.reduce((m, s) => (s > m ? s : m), -Infinity);
    const spacing = this.config.timestep_spacing;
    return spacing === 'linspace' || spacing === 'trailing' ? max : sqrt32(Math.fround(Math.fround(max * max) + 1));
  }

  /** sample / sqrt(σ² + 1), diffusers' scale_model_input of the σ schedulers. */
  override scaleModelInput(sample: Tensor, timestep: number): Tensor {
    this.checkAlive();
    return sample.div(inputScale(this.sigmaValues[this.initStepIndex(timestep)] as number));
  }

  /** add_noise of Euler: x₀ + σ_t·noise, σ_t looked up by indexFor for each batch item. */
  override addNoise(originalSamples: Tensor, noise: Tensor, timesteps: Tensor): Tensor {
    return tidy(() => originalSamples.add(noise.mul(this.sigmasAt(timesteps, originalSamples))));
  }

  /**
   * diffusers' set_begin_index: the pipeline starts at this position of the schedule (img2img's t_start · order),
   * so the step index and add_noise's σ come from the position, not from a timestep lookup. setTimesteps clears it.
   */
  setBeginIndex(index: number): void {
    if (!Number.isInteger(index) || index < 0 || index >= this.schedule.length) {
      throw new RangeError(`${this.className}: begin index ${index} is outside the ${this.schedule.length} timesteps`);
    }
    this.beginIndex = index;
  }

  /**
   * σ of each timestep, in `like`'s dtype and device, shaped [B, 1, …, 1]: looked up (indexFor) unless a begin
   * index is set, then the current step's (or the begin index's before the first step), as diffusers' add_noise.
   */
  protected sigmasAt(timesteps: Tensor, like: Tensor): Tensor {
    this.checkAlive();
    const at = this.beginIndex === null ? null : this.stepIndex ?? this.beginIndex;
    const picked = Float32Array.from(timesteps.toFloat64Array(), (t) => this.sigmaValues[at ?? this.indexFor(t)] as number);
    return unsqueezeTo(torch.tensor(picked).to({ dtype: like.dtype, device: like.device }), like.ndim);
  }

  /**
   * index_for_timestep: the position of t in the schedule, the second one when t appears twice. The
   * exponential-integrator solvers (`solverLookup`) take a timestep not in the schedule for the last step,
   * as diffusers does; one outside [0, T) is an error there too.
   */
  protected indexFor(t: number): number {
    const v = this.timestepsFloat64 ? t : Math.fround(t);
    const hits: number[] = [];
    this.schedule.forEach((s, i) => { if (s === v) hits.push(i); });
    const i = hits.length > 1 ? hits[1] : hits[0];
    if (i !== undefined) return i;
    const T = this.numTrainTimesteps;
    if (!this.solverLookup || !(t >= 0 && t < T)) return this.solverLookup ? this.outsideTraining(t) : timestepNotFound(this.className, t, this.schedule);
    return this.schedule.length - 1;
  }

  /** Whether a timestep not in the schedule means the last step (DPM-Solver, UniPC, DEIS). */
  protected get solverLookup(): boolean { return false; }

  private outsideTraining(t: number): never {
    throw new Error(`${this.className}: timestep ${t} is outside [0, ${this.numTrainTimesteps})`);
  }

  /** The step index, found from the first timestep a rollout passes (diffusers' _init_step_index). */
  protected initStepIndex(timestep: number): number {
    this.stepIndex ??= this.beginIndex ?? this.indexFor(timestep);
    return this.stepIndex;
  }

  /** The index of the step from the step index, after checking the scheduler is alive, refusing a step past the last σ. */
  protected nextStepIndex(timestep: number): number {
    this.checkAlive();
    const i = this.initStepIndex(timestep);
    if (i + 1 >= this.sigmaValues.length) throw new Error(`${this.className}: step() called after the last timestep; call setTimesteps() to start again`);
    return i;
  }

  /** A new schedule: the timesteps and their σ (with the final one), cast to float32; the step index reset. */
  protected setSchedule(timesteps: number[], sigmas: ArrayLike<number>): void {
    this.sigmaValues = Float32Array.from(sigmas);
    this.sigmaTensor.dispose();
    this.sigmaTensor = keep(torch.tensor(this.sigmaValues));
    this.schedule = timesteps;
    this.stepIndex = null;
    this.beginIndex = null;
  }

  protected override releaseState(): void {
    this.sigmaTensor.dispose();
  }
}

/** sqrt(σ² + 1) in float32: what scale_model_input divides by. */
export const inputScale = (sigma: number): number => sqrt32(Math.fround(Math.fround(sigma * sigma) + 1));

/**
 * x̂₀ of the k-diffusion schedulers from the model output at σ (σ̂ for ε): x − σ̂·ε, the v-prediction
 * c_out/c_skip combination, or the output itself for 'sample'.
 */
export function kDiffusionX0(prediction: string, modelOutput: Tensor, sample: Tensor, sigma: number): Tensor {
  const f = Math.fround;
  if (prediction === 'epsilon') return sample.sub(modelOutput.mul(sigma));
  if (prediction === 'sample') return modelOutput;
  const s2 = f(f(sigma * sigma) + 1);
  return modelOutput.mul(f(-sigma / sqrt32(s2))).add(sample.div(s2));
}

// ---- scipy.stats.beta.ppf -------------------------------------------------------------------------------

/** ln Γ(x) for x > 0 (Lanczos, g = 7, 9 terms: ~1e-15 relative). */
function lnGamma(x: number): number {
  const c = [0.99999999999980993, 676.5203681218851, -1259.1392167224028, 771.32342877765313, -176.61502916214059,
    12.507343278686905, -0.13857109526572012, 9.9843695780195716e-6, 1.5056327351493116e-7];
  if (x < 0.5) return Math.log(Math.PI / Math.sin(Math.PI * x)) - lnGamma(1 - x);
  const z = x - 1;
  let a = c[0] as number;
  const t = z + 7.5;
  for (let i = 1; i < 9; i++) a += (c[i] as number) / (z + i);
  return 0.5 * Math.log(2 * Math.PI) + (z + 0.5) * Math.log(t) - t + Math.log(a);
}

/** The continued fraction of the incomplete beta function (modified Lentz). */
function betaContinuedFraction(x: number, a: number, b: number): number {
  const tiny = 1e-300;
  let c = 1;
  let d = 1 - ((a + b) * x) / (a + 1);
  d = 1 / (Math.abs(d) < tiny ? tiny : d);
  let h = d;
  for (let m = 1; m <= 10_000; m++) {
    const m2 = 2 * m;
    for (const aa of [(m * (b - m) * x) / ((a + m2 - 1) * (a + m2)), (-(a + m) * (a + b + m) * x) / ((a + m2) * (a + m2 + 1))]) {
      d = 1 + aa * d;
      d = 1 / (Math.abs(d) < tiny ? tiny : d);
      c = 1 + aa / c;
      if (Math.abs(c) < tiny) c = tiny;
      h *= d * c;
    }
    if (Math.abs(d * c - 1) < 1e-16) break;
  }
  return h;
}

/** The regularized incomplete beta function I_x(a, b). */
function betaCdf(x: number, a: number, b: number): number {
  if (x <= 0) return 0;
  if (x >= 1) return 1;
  const front = Math.exp(lnGamma(a + b) - lnGamma(a) - lnGamma(b) + a * Math.log(x) + b * Math.log1p(-x));
  return x < (a + 1) / (a + b + 2) ? (front * betaContinuedFraction(x, a, b)) / a : 1 - (front * betaContinuedFraction(1 - x, b, a)) / b;
}

/** The quantile function of Beta(a, b), by bisection to float64 resolution (scipy.stats.beta.ppf). */
export function betaPpf(q: number, a: number, b: number): number {
  if (q <= 0) return 0;
  if (q >= 1) return 1;
  let lo = 0;
  let hi = 1;
  for (let i = 0; i < 200 && hi - lo > 0; i++) {
    const mid = (lo + hi) / 2;
    if (mid === lo || mid === hi) break;
    if (betaCdf(mid, a, b) < q) lo = mid;
    else hi = mid;
  }
  return (lo + hi) / 2;
}

// ---- more of the exponential-integrator solvers -----------------------------------------------------------

/**
 * set_timesteps' integer timesteps of DPM-Solver, UniPC and DEIS for `spacing`: 'linspace' takes the first n
 * of n + 1 points rounded over [0, last − 1] (descending), 'leading' multiples of last // (n + 1) plus
 * steps_offset, 'trailing' np.arange(last, 0, −T/n) rounded, minus 1. `last` is num_train_timesteps, or
 * fewer where λ is clipped.
 */
export function solverTimesteps(className: string, spacing: string, last: number, numTrain: number, n: number, stepsOffset: number): number[] {
  switch (spacing) {
    case 'linspace':
      return linspace64(0, last - 1, n + 1).map(roundHalfEven).reverse().slice(0, -1);
    case 'leading': {
      const ratio = Math.floor(last / (n + 1));
      return Array.from({ length: n + 1 }, (_, i) => i * ratio).reverse().slice(0, -1).map((t) => t + stepsOffset);
    }
    case 'trailing':
      return arangeDown(last, 0, -numTrain / n).map((t) => roundHalfEven(t) - 1);
    default:
      return configError(className, 'timestep_spacing', spacing, "is not supported (difflora implements 'linspace', 'leading', 'trailing')");
  }
}

/** The data prediction x̂₀ at σ from a model output (the solvers' convert_model_output for x₀-solvers). */
export function solverX0(prediction: string, modelOutput: Tensor, sample: Tensor, sigma: number): Tensor {
  const [alphaT, sigmaT] = alphaSigma(sigma);
  if (prediction === 'epsilon') return sample.sub(modelOutput.mul(sigmaT)).div(alphaT);
  if (prediction === 'sample') return modelOutput.clone();
  return sample.mul(alphaT).sub(modelOutput.mul(sigmaT));
}

/** The noise prediction ε̂ at σ from a model output (convert_model_output for ε-solvers: DPM-Solver, DEIS). */
export function solverEpsilon(prediction: string, modelOutput: Tensor, sample: Tensor, sigma: number): Tensor {
  const [alphaT, sigmaT] = alphaSigma(sigma);
  if (prediction === 'epsilon') return modelOutput.clone();
  if (prediction === 'sample') return sample.sub(modelOutput.mul(alphaT)).div(sigmaT);
  return modelOutput.mul(alphaT).add(sample.mul(sigmaT));
}

// ---- the second-order k-diffusion schedulers (Heun, KDPM2) -------------------------------------------------

/** `a[:start] + a[start:end].repeat_interleave(2) + a[end:]`: how Heun and KDPM2 list each stage's σ and t twice. */
export function doubled<T>(a: readonly T[], start: number, end: number = a.length): T[] {
  return [...a.slice(0, start), ...a.slice(start, end).flatMap((v) => [v, v]), ...a.slice(end)];
}

/** KDPM2's per-entry arrays (σ, σ_interpol, σ_up, σ_down): `cat([a[:1], a[1:].repeat_interleave(2), a[-1:]])`, float32. */
export function doubledWithLast(a: Float32Array): Float32Array {
  return Float32Array.from(doubled(numbers(a), 1).concat([a[a.length - 1] as number]));
}

/**
 * KDPM2's timesteps: t₀, then each later step's midpoint timestep (_sigma_to_t of its σ_interpol, float32
 * throughout) before its own: [t₀, m₁, t₁, m₂, t₂, …]. `interpol[k]` is the midpoint before `ts[k + 1]`.
 */
export function midpointInterleaved(ts: readonly number[], interpol: ArrayLike<number>, logSigmas: Float32Array): number[] {
  const tsInterpol = Array.from(interpol, (v) => sigmaToT(v, logSigmas, 'torch32'));
  return [ts[0] as number, ...ts.slice(1).flatMap((t, k) => [tsInterpol[k] as number, t])];
}

/** exp(lerp(log a, log b, 0.5)) elementwise, float32 through torch (KDPM2's σ_interpol: NaN or 0 where a σ is 0). */
export function logMidpoints(a: Float32Array, b: Float32Array): Float32Array {
  return tidy(() => torch.tensor(a).log().lerp_(torch.tensor(b).log(), 0.5).exp().dataSync() as Float32Array);
}

/**
 * The second-order k-diffusion schedulers (Heun, KDPM2, KDPM2 ancestral, DPMSolverSDE): two model evaluations
 * a step, `timesteps` listing each stage. What the first stage leaves for the second (the sample the step
 * started from, and what else the method needs; its tensors kept) is `firstStage`, null when a first stage
 * comes next, cleared by setTimesteps (clearStage) and dispose.
 */
export abstract class TwoStageSchedulerBase<C extends SigmaSchedulerConfig, S extends { sample: Tensor }> extends SigmaSchedulerBase<C> {
  override readonly order = 2;
  protected firstStage: S | null = null;

  /** σ where the current step starts and ends: entries i and i + 1 at the first stage, i − 1 and i at the second. */
  protected stepSigmas(i: number): { sigma: number; sigmaNext: number } {
    const j = this.firstStage === null ? i : i - 1;
    return { sigma: this.sigmaValues[j] as number, sigmaNext: this.sigmaValues[j + 1] as number };
  }

  /** After a stage: a second stage frees what the first kept (`first`: the state the stage started with); the step index moves on. */
  protected endStage(i: number, first: S | null): void {
    if (first !== null) this.clearStage();
    this.stepIndex = i + 1;
  }

  protected clearStage(): void {
    if (this.firstStage !== null) dispose(this.firstStage);
    this.firstStage = null;
  }

  protected override releaseState(): void {
    super.releaseState();
    this.clearStage();
  }
}

/**
 * One stage of KDPM2 (sample_dpm_2; `first` is the sample the step started from, null at the first stage): an
 * Euler step from σ to the log-midpoint σ_interpol with x̂₀ at σ, then from `first` to `sigmaTo` with the
 * derivative at σ_interpol (σ_{i+1}, or σ_down for the ancestral sampler).
 */
export function dpm2Stage(prediction: string, modelOutput: Tensor, sample: Tensor, first: Tensor | null, sigma: number, sigmaInterpol: number, sigmaTo: number): Tensor {
  const f = Math.fround;
  const x0 = kDiffusionX0(prediction, modelOutput, sample, first === null ? sigma : sigmaInterpol);
  if (first === null) return sample.add(sample.sub(x0).div(sigma).mul(f(sigmaInterpol - sigma)));
  return first.add(sample.sub(x0).div(sigmaInterpol).mul(f(sigmaTo - sigma)));
}

// ---- DPM-Solver's first and second-order updates (multistep, single-step, DEIS's first order) ----------------

/** α_t, σ_t and λ_t of one σ of the schedule. */
export type SolverPoint = { alpha: number; sigma: number; lambda: number };

export function solverPoint(sigma: number): SolverPoint {
  const [alpha, s] = alphaSigma(sigma);
  return { alpha, sigma: s, lambda: lambdaOfSigma(sigma) };
}

/** DPM-Solver's algorithms: on x̂₀ (++) or ε̂, as an ODE or an SDE (which adds `noise`). */
export type DPMSolverAlgorithmType = 'dpmsolver++' | 'sde-dpmsolver++' | 'dpmsolver' | 'sde-dpmsolver';

/** The first-order update from s to t with the converted model output m (dpm_solver_first_order_update). */
export function dpmFirstOrder(algorithm: DPMSolverAlgorithmType, x: Tensor, t: SolverPoint, s: SolverPoint, m: Tensor, noise: Tensor | null): Tensor {
  const f = Math.fround;
  const h = f(t.lambda - s.lambda);
  switch (algorithm) {
    case 'dpmsolver++':
      return x.mul(f(t.sigma / s.sigma)).sub(m.mul(f(t.alpha * f(exp32(-h) - 1))));
    case 'dpmsolver':
      return x.mul(f(t.alpha / s.alpha)).sub(m.mul(f(t.sigma * f(exp32(h) - 1))));
    case 'sde-dpmsolver++': {
      const e2 = f(1 - exp32(f(-2 * h)));
      return x.mul(f(f(t.sigma / s.sigma) * exp32(-h))).add(m.mul(f(t.alpha * e2))).add((noise as Tensor).mul(f(t.sigma * sqrt32(e2))));
    }
    case 'sde-dpmsolver':
      return x.mul(f(t.alpha / s.alpha)).sub(m.mul(f(2 * f(t.sigma * f(exp32(h) - 1)))))
        .add((noise as Tensor).mul(f(t.sigma * sqrt32(f(exp32(f(2 * h)) - 1)))));
  }
}

/**
 * The second-order update from s to t of step h with D0 and D1 (midpoint or Heun form): multistep
 * DPM-Solver's (s = σ_i, D0 = m0) and single-step DPM-Solver's (s = σ_{i−1}, D0 = m1).
 */
export function dpmSecondOrder(
  algorithm: DPMSolverAlgorithmType, solverType: 'midpoint' | 'heun', x: Tensor, t: SolverPoint, s: SolverPoint, d0: Tensor, d1: Tensor, h: number,
  noise: Tensor | null,
): Tensor {
  const f = Math.fround;
  const midpoint = solverType === 'midpoint';
  switch (algorithm) {
    case 'dpmsolver++': {
      const coeff = f(t.alpha * f(exp32(-h) - 1));
      const base = x.mul(f(t.sigma / s.sigma)).sub(d0.mul(coeff));
      return midpoint ? base.sub(d1.mul(f(0.5 * coeff))) : base.add(d1.mul(f(t.alpha * f(f(f(exp32(-h) - 1) / h) + 1))));
    }
    case 'dpmsolver': {
      const coeff = f(t.sigma * f(exp32(h) - 1));
      const base = x.mul(f(t.alpha / s.alpha)).sub(d0.mul(coeff));
      return midpoint ? base.sub(d1.mul(f(0.5 * coeff))) : base.sub(d1.mul(f(t.sigma * f(f(f(exp32(h) - 1) / h) - 1))));
    }
    case 'sde-dpmsolver++': {
      const e2 = f(1 - exp32(f(-2 * h)));
      const coeff = f(t.alpha * e2);
      const base = x.mul(f(f(t.sigma / s.sigma) * exp32(-h))).add(d0.mul(coeff));
      const withD1 = midpoint ? base.add(d1.mul(f(0.5 * coeff))) : base.add(d1.mul(f(t.alpha * f(f(e2 / f(-2 * h)) + 1))));
      return withD1.add((noise as Tensor).mul(f(t.sigma * sqrt32(e2))));
    }
    case 'sde-dpmsolver': {
      const coeff = f(t.sigma * f(exp32(h) - 1));
      const base = x.mul(f(t.alpha / s.alpha)).sub(d0.mul(f(2 * coeff)));
      const withD1 = midpoint ? base.sub(d1.mul(coeff)) : base.sub(d1.mul(f(2 * f(t.sigma * f(f(f(exp32(h) - 1) / h) - 1)))));
      return withD1.add((noise as Tensor).mul(f(t.sigma * sqrt32(f(exp32(f(2 * h)) - 1)))));
    }
  }
}

/** The fields DPM-Solver multistep and single-step end their configs with: the final σ, the λ clip, variance_type. */
export type DPMSolverEndConfig = {
  final_sigmas_type: 'zero' | 'sigma_min';
  lambda_min_clipped: number;
  variance_type: string | null;
};

export const DPM_SOLVER_END_DEFAULTS: Readonly<DPMSolverEndConfig> = Object.freeze({
  final_sigmas_type: 'zero',
  lambda_min_clipped: -Infinity,
  variance_type: null,
});

/**
 * The aliases DPM-Solver's __init__ (multistep and single-step) replaces after checking the given values:
 * algorithm_type 'deis' runs as 'dpmsolver++', solver_type 'logrho', 'bh1' or 'bh2' as 'midpoint'.
 */
export function mapDPMSolverAliases(c: { algorithm_type: DPMSolverAlgorithmType; solver_type: 'midpoint' | 'heun' }): void {
  if ((c.algorithm_type as string) === 'deis') c.algorithm_type = 'dpmsolver++';
  if (!['midpoint', 'heun'].includes(c.solver_type)) c.solver_type = 'midpoint';
}

/** The fields of DPM-Solver's convert_model_output (multistep and single-step). */
type ConvertConfig = {
  algorithm_type: DPMSolverAlgorithmType;
  prediction_type: string;
  thresholding: boolean;
  dynamic_thresholding_ratio: number;
  sample_max_value: number;
};

/**
 * DPM-Solver's convert_model_output at σ: x̂₀ for the ++ algorithms, ε̂ for the others; with thresholding
 * x̂₀ is thresholded (for ε̂: through x̂₀ and back).
 */
export function dpmConvertModelOutput(c: ConvertConfig, modelOutput: Tensor, sample: Tensor, sigma: number): Tensor {
  if (c.algorithm_type.endsWith('dpmsolver++')) {
    const x0 = solverX0(c.prediction_type, modelOutput, sample, sigma);
    return c.thresholding ? thresholdSample(x0, c.dynamic_thresholding_ratio, c.sample_max_value) : x0;
  }
  const eps = solverEpsilon(c.prediction_type, modelOutput, sample, sigma);
  if (!c.thresholding) return eps;
  const [alphaT, sigmaT] = alphaSigma(sigma);
  const x0 = thresholdSample(sample.sub(eps.mul(sigmaT)).div(alphaT), c.dynamic_thresholding_ratio, c.sample_max_value);
  return sample.sub(x0.mul(alphaT)).div(sigmaT);
}

// ---- the base class of the exponential-integrator solvers --------------------------------------------------

/**
 * What DPM-Solver (multistep and single-step), UniPC and DEIS share around their updates: σ as they are at
 * first ('training'), no input scaling (init_noise_sigma 1), a timestep not in the schedule taken as the last
 * step, and the model-output history: the last solver_order converted outputs (kept tensors, null before the
 * first steps) with the count of warm-up steps at lower order, both cleared by setTimesteps (resetState) and
 * dispose.
 */
export abstract class SolverSchedulerBase<C extends SigmaSchedulerConfig & SolverConfig> extends SigmaSchedulerBase<C> {
  protected modelOutputs: (Tensor | null)[];
  protected lowerOrderNums = 0;

  protected constructor(className: string, config: C) {
    super(className, config, 'training');
    this.modelOutputs = new Array<Tensor | null>(this.config.solver_order).fill(null);
  }

  override get initNoiseSigma(): number { return 1.0; }

  override scaleModelInput(sample: Tensor, _timestep: number): Tensor {
    return sample;
  }

  protected override get solverLookup(): boolean { return true; }

  /**
   * set_timesteps' integer timesteps for the config's timestep_spacing over [0, last) (solverTimesteps: `last`
   * is num_train_timesteps, or fewer where λ is clipped) and their σ (solverSigmas), after checking the
   * scheduler is alive, n and the spaced schedule.
   */
  protected solverSchedule(n: number, last: number = this.numTrainTimesteps): { timesteps: number[]; sigmas: number[] } {
    this.checkAlive();
    this.checkInferenceSteps(n);
    const c = this.config as C & { timestep_spacing: string; steps_offset: number };
    const spaced = solverTimesteps(this.className, c.timestep_spacing, last, c.num_train_timesteps, n, c.steps_offset);
    this.checkInferenceSchedule(spaced, n);
    return this.solverSigmas(spaced, n);
  }

  /** A new schedule (setSchedule), the history and any state of the subclass cleared (resetState). */
  protected setSolverSchedule(timesteps: number[], sigmas: ArrayLike<number>): void {
    this.setSchedule(timesteps, sigmas);
    this.resetState();
  }

  /** Adds a converted model output (kept) to the history, freeing the oldest. */
  protected pushModelOutput(m: Tensor): void {
    this.modelOutputs.shift()?.dispose();
    this.modelOutputs.push(m);
  }

  /** The k-th newest converted output (0: the one just pushed). */
  protected previousOutput(k: number): Tensor {
    return this.modelOutputs[this.modelOutputs.length - 1 - k] as Tensor;
  }

  /** After a multistep update: one more warm-up step (up to solver_order), and the step index moves on. */
  protected endMultistep(i: number): void {
    if (this.lowerOrderNums < this.config.solver_order) this.lowerOrderNums += 1;
    this.stepIndex = i + 1;
  }

  /** Clears the history and the step index (a subclass adds its own state). */
  protected resetState(): void {
    for (const t of this.modelOutputs) t?.dispose();
    this.modelOutputs = new Array<Tensor | null>(this.config.solver_order).fill(null);
    this.lowerOrderNums = 0;
    this.stepIndex = null;
  }

  protected override releaseState(): void {
    super.releaseState();
    this.resetState();
  }
}
