// EulerDiscreteScheduler (diffusers 0.31 schedulers/scheduling_euler_discrete.py): Euler's method on the
// probability-flow ODE in σ (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
// Models", Algorithm 2 with s_churn = 0), as k-diffusion's sample_euler. The sample lives at scale
// sqrt(σ² + 1), so the UNet input is divided by it and the initial noise multiplied by initNoiseSigma.
//
// σ_t = sqrt((1 − ᾱ_t) / ᾱ_t) in float32, interpolated at the (fractional) inference timesteps in float64
// as np.interp, then float32 again, as diffusers; set_timesteps, scale_model_input and add_noise are
// SigmaSchedulerBase's (scheduling_utils.ts), shared with EulerAncestralDiscreteScheduler.
import { tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import {
  SAMPLER_BETA_SCHEDULES, SCHEDULER_DEFAULTS, PREDICTION_TYPES, SigmaSchedulerBase, TIMESTEP_SPACINGS, resolveSchedulerConfig,
  sqrt32, type BetaScheduleConfig, type PredictionType, type TimestepSpacing,
} from './scheduling_utils.js';

export type EulerDiscreteSchedulerConfig = BetaScheduleConfig & {
  prediction_type: PredictionType;
  interpolation_type: 'linear';
  use_karras_sigmas: boolean;
  use_exponential_sigmas: boolean;
  use_beta_sigmas: boolean;
  sigma_min: number | null;
  sigma_max: number | null;
  timestep_spacing: TimestepSpacing;
  timestep_type: 'discrete';
  steps_offset: number;
  rescale_betas_zero_snr: boolean;
  final_sigmas_type: 'zero' | 'sigma_min';
};

/** EulerDiscreteScheduler.__init__'s defaults. */
export const EULER_DISCRETE_SCHEDULER_DEFAULTS: Readonly<EulerDiscreteSchedulerConfig> = Object.freeze({
  ...SCHEDULER_DEFAULTS,
  interpolation_type: 'linear',
  use_karras_sigmas: false,
  use_exponential_sigmas: false,
  use_beta_sigmas: false,
  sigma_min: null,
  sigma_max: null,
  timestep_spacing: 'linspace',
  timestep_type: 'discrete',
  rescale_betas_zero_snr: false,
  final_sigmas_type: 'zero',
});

const CLASS = 'EulerDiscreteScheduler';

/** What difflora implements of the values diffusers accepts. */
const SUPPORTED = {
  beta_schedule: SAMPLER_BETA_SCHEDULES,
  prediction_type: PREDICTION_TYPES,
  interpolation_type: ['linear'],
  use_karras_sigmas: [false],
  use_exponential_sigmas: [false],
  use_beta_sigmas: [false],
  timestep_spacing: TIMESTEP_SPACINGS,
  timestep_type: ['discrete'],
  final_sigmas_type: ['zero', 'sigma_min'],
};

export class EulerDiscreteScheduler extends SigmaSchedulerBase<EulerDiscreteSchedulerConfig> {
  readonly name = 'euler';

  constructor(rawConfig: object = {}, overrides: Record<string, unknown> = {}) {
    super(CLASS, resolveSchedulerConfig(CLASS, EULER_DISCRETE_SCHEDULER_DEFAULTS as EulerDiscreteSchedulerConfig, rawConfig, overrides, SUPPORTED),
      'descending');
  }

  /** One Euler step from σ_i to σ_{i+1}: x + (x − x̂₀)/σ_i · (σ_{i+1} − σ_i), in float32. */
  step(modelOutput: Tensor, timestep: number, sample: Tensor): Tensor {
    this.checkAlive();
    const f = Math.fround;
    const i = this.nextStepIndex(timestep);
    const sigma = this.sigmaValues[i] as number;
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
}
