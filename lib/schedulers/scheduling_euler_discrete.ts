// EulerDiscreteScheduler (diffusers 0.31 schedulers/scheduling_euler_discrete.py): Euler's method on the
// probability-flow ODE in σ (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
// Models", Algorithm 2 with s_churn = 0), as k-diffusion's sample_euler. The sample lives at scale
// sqrt(σ² + 1), so the UNet input is divided by it and the initial noise multiplied by initNoiseSigma.
//
// σ_t = sqrt((1 − ᾱ_t) / ᾱ_t) in float32, interpolated at the (fractional) inference timesteps in float64
// as np.interp, then float32 again, as diffusers. Also home of what EulerAncestralDiscreteScheduler shares.
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import type { Scheduler } from './scheduler.js';
import {
  alphasCumprodFromConfig, arangeDown, checkBetaConfig, checkOneOf, configError, interpOnIndex, linspace64,
  resolveSchedulerConfig, roundHalfEven, sqrt32, timestepNotFound, type BetaSchedule, type PredictionType,
} from './scheduling_ddpm.js';

export type EulerDiscreteSchedulerConfig = {
  num_train_timesteps: number;
  beta_start: number;
  beta_end: number;
  beta_schedule: BetaSchedule;
  trained_betas: number[] | null;
  prediction_type: PredictionType;
  interpolation_type: 'linear';
  use_karras_sigmas: boolean;
  use_exponential_sigmas: boolean;
  use_beta_sigmas: boolean;
  sigma_min: number | null;
  sigma_max: number | null;
  timestep_spacing: 'linspace' | 'leading' | 'trailing';
  timestep_type: 'discrete';
  steps_offset: number;
  rescale_betas_zero_snr: boolean;
  final_sigmas_type: 'zero' | 'sigma_min';
};

/** EulerDiscreteScheduler.__init__'s defaults. */
export const EULER_DISCRETE_SCHEDULER_DEFAULTS: Readonly<EulerDiscreteSchedulerConfig> = Object.freeze({
  num_train_timesteps: 1000,
  beta_start: 0.0001,
  beta_end: 0.02,
  beta_schedule: 'linear',
  trained_betas: null,
  prediction_type: 'epsilon',
  interpolation_type: 'linear',
  use_karras_sigmas: false,
  use_exponential_sigmas: false,
  use_beta_sigmas: false,
  sigma_min: null,
  sigma_max: null,
  timestep_spacing: 'linspace',
  timestep_type: 'discrete',
  steps_offset: 0,
  rescale_betas_zero_snr: false,
  final_sigmas_type: 'zero',
});

const CLASS = 'EulerDiscreteScheduler';

// ---- shared with EulerAncestralDiscreteScheduler

/** σ_t = sqrt((1 − ᾱ_t) / ᾱ_t) for every training timestep, float32. */
export function trainSigmas(alphasCumprod: Float32Array): Float32Array {
  const f = Math.fround;
  return alphasCumprod.map((a) => sqrt32(f(f(1 - a) / a)));
}

/** The inference timesteps of the Euler schedulers (float32 values, descending). */
export function eulerTimesteps(className: string, spacing: string, numTrain: number, n: number, stepsOffset: number): number[] {
  if (!Number.isInteger(n) || n < 1 || n > numTrain) throw new Error(`${className}: numInferenceSteps must be an integer in [1, ${numTrain}], got ${n}`);
  const f = Math.fround;
  switch (spacing) {
    case 'linspace':
      return linspace64(0, numTrain - 1, n).map(f).reverse();
    case 'leading': {
      const ratio = Math.floor(numTrain / n);
      return Array.from({ length: n }, (_, i) => f(i * ratio + stepsOffset)).reverse();
    }
    case 'trailing':
      return arangeDown(numTrain, 0, -numTrain / n).map((t) => f(f(roundHalfEven(t)) - 1));
    default:
      return configError(className, 'timestep_spacing', spacing, "is not supported (difflora implements 'linspace', 'leading', 'trailing')");
  }
}

/** diffusers' init_noise_sigma: max σ for 'linspace'/'trailing' spacing, sqrt(max σ² + 1) for 'leading'. */
export function eulerInitNoiseSigma(sigmas: Float32Array, spacing: string): number {
  const max = sigmas.reduce((m, s) => (s > m ? s : m), -Infinity);
  return spacing === 'linspace' || spacing === 'trailing' ? max : sqrt32(Math.fround(Math.fround(max * max) + 1));
}

/** index_for_timestep: the position of t in the schedule, the second one when t appears twice. */
export function indexForTimestep(className: string, timesteps: readonly number[], t: number): number {
  const v = Math.fround(t);
  const hits: number[] = [];
  timesteps.forEach((s, i) => { if (s === v) hits.push(i); });
  const i = hits.length > 1 ? hits[1] : hits[0];
  return i ?? timestepNotFound(className, t, timesteps);
}

/** add_noise of the σ schedulers: x₀ + noise·σ_t, σ_t looked up by index_for_timestep for each batch item. */
export function addNoiseWithSigmas(className: string, sigmas: Float32Array, timesteps: readonly number[], originalSamples: Tensor, noise: Tensor, t: Tensor): Tensor {
  const picked = Float32Array.from(t.toFloat64Array(), (v) => sigmas[indexForTimestep(className, timesteps, v)] as number);
  return tidy(() => {
    let sigma = torch.tensor(picked).to({ dtype: originalSamples.dtype, device: originalSamples.device });
    while (sigma.ndim < originalSamples.ndim) sigma = sigma.unsqueeze(-1);
    return originalSamples.add(noise.mul(sigma));
  });
}

/** sample / sqrt(σ² + 1), diffusers' scale_model_input of the σ schedulers. */
export function scaleBySigma(sample: Tensor, sigma: number): Tensor {
  return sample.div(sqrt32(Math.fround(Math.fround(sigma * sigma) + 1)));
}

// ----

export class EulerDiscreteScheduler implements Scheduler {
  readonly name = 'euler';
  readonly className = CLASS;
  readonly order = 1;
  readonly config: Readonly<EulerDiscreteSchedulerConfig>;
  /** ᾱ_t, float32 [num_train_timesteps] on the CPU. */
  readonly alphasCumprod: Tensor;
  private readonly trainSigmas: Float32Array;
  /** σ of each timestep and a final σ (0), float32; a kept CPU tensor, replaced by setTimesteps. */
  sigmas: Tensor;
  private sigmaValues: Float32Array;
  private schedule: number[];
  private stepIndex: number | null = null;
  private disposed = false;

  constructor(rawConfig: object = {}, overrides: Record<string, unknown> = {}) {
    const c = resolveSchedulerConfig(CLASS, EULER_DISCRETE_SCHEDULER_DEFAULTS as EulerDiscreteSchedulerConfig, rawConfig, overrides);
    checkBetaConfig(CLASS, c);
    checkOneOf(CLASS, c, 'prediction_type', ['epsilon', 'v_prediction', 'sample']);
    checkOneOf(CLASS, c, 'interpolation_type', ['linear']);
    for (const k of ['use_karras_sigmas', 'use_exponential_sigmas', 'use_beta_sigmas'] as const) checkOneOf(CLASS, c, k, [false]);
    checkOneOf(CLASS, c, 'timestep_spacing', ['linspace', 'leading', 'trailing']);
    checkOneOf(CLASS, c, 'timestep_type', ['discrete']);
    checkOneOf(CLASS, c, 'final_sigmas_type', ['zero', 'sigma_min']);
    this.config = Object.freeze(c);
    this.alphasCumprod = keep(alphasCumprodFromConfig(c, true));
    this.trainSigmas = trainSigmas(this.alphasCumprod.dataSync() as Float32Array);
    // before setTimesteps: every training timestep, descending, as diffusers' __init__
    const T = c.num_train_timesteps;
    this.schedule = Array.from({ length: T }, (_, i) => T - 1 - i);
    this.sigmaValues = Float32Array.from([...this.trainSigmas].reverse().concat([0]));
    this.sigmas = keep(torch.tensor(this.sigmaValues));
  }

  get numTrainTimesteps(): number { return this.config.num_train_timesteps; }
  get timesteps(): number[] { return this.schedule; }
  get initNoiseSigma(): number { return eulerInitNoiseSigma(this.sigmaValues, this.config.timestep_spacing); }

  setTimesteps(numInferenceSteps: number): void {
    this.checkAlive();
    const c = this.config;
    const timesteps = eulerTimesteps(CLASS, c.timestep_spacing, c.num_train_timesteps, numInferenceSteps, c.steps_offset);
    const sigmaLast = c.final_sigmas_type === 'zero' ? 0 : (this.trainSigmas[0] as number);
    this.sigmaValues = Float32Array.from([...interpOnIndex(timesteps, this.trainSigmas), sigmaLast]);
    this.sigmas.dispose();
    this.sigmas = keep(torch.tensor(this.sigmaValues));
    this.schedule = timesteps;
    this.stepIndex = null;
  }

  private initStepIndex(timestep: number): number {
    this.stepIndex ??= indexForTimestep(CLASS, this.schedule, timestep);
    return this.stepIndex;
  }

  scaleModelInput(sample: Tensor, timestep: number): Tensor {
    this.checkAlive();
    return scaleBySigma(sample, this.sigmaValues[this.initStepIndex(timestep)] as number);
  }

  /** One Euler step from σ_i to σ_{i+1}: x + (x − x̂₀)/σ_i · (σ_{i+1} − σ_i), in float32. */
  step(modelOutput: Tensor, timestep: number, sample: Tensor): Tensor {
    this.checkAlive();
    const f = Math.fround;
    const i = this.initStepIndex(timestep);
    const sigma = this.sigmaValues[i] as number;
    if (i + 1 >= this.sigmaValues.length) throw new Error(`${CLASS}: step() called after the last timestep; call setTimesteps() to start again`);
    // s_churn = 0: γ = 0, σ̂ = σ·(γ + 1) = σ
    const sigmaHat = f(sigma * 1.0);
    const out = tidy(() => {
      const x = sample.to('float32');
      // 1. predicted x₀
      let predOriginal: Tensor;
      if (this.config.prediction_type === 'epsilon') predOriginal = x.sub(modelOutput.mul(sigmaHat));
      else if (this.config.prediction_type === 'sample') predOriginal = modelOutput;
      else predOriginal = modelOutput.mul(f(-sigma / sqrt32(f(f(sigma * sigma) + 1)))).add(x.div(f(f(sigma * sigma) + 1)));
      // 2. the ODE derivative and the step
      const derivative = x.sub(predOriginal).div(sigmaHat);
      const dt = f((this.sigmaValues[i + 1] as number) - sigmaHat);
      return x.add(derivative.mul(dt)).to(modelOutput.dtype);
    });
    this.stepIndex = i + 1;
    return out;
  }

  addNoise(originalSamples: Tensor, noise: Tensor, timesteps: Tensor): Tensor {
    this.checkAlive();
    return addNoiseWithSigmas(CLASS, this.sigmaValues, this.schedule, originalSamples, noise, timesteps);
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.alphasCumprod.dispose();
    this.sigmas.dispose();
  }
  [Symbol.dispose](): void { this.dispose(); }
  get isDisposed(): boolean { return this.disposed; }

  private checkAlive(): void {
    if (this.disposed) throw new Error(`${CLASS}: used after dispose()`);
  }
}
