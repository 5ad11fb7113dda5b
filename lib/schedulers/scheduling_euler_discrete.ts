// EulerDiscreteScheduler (diffusers 0.31 schedulers/scheduling_euler_discrete.py): Euler's method on the
// probability-flow ODE in σ (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
// Models", Algorithm 2; s_churn 0 unless the step is given one), as k-diffusion's sample_euler. Karras,
// exponential and beta σ schedules as diffusers (scheduling_utils_sigmas.ts). The sample lives at scale
// sqrt(σ² + 1), so the UNet input is divided by it and the initial noise multiplied by initNoiseSigma.
//
// σ_t = sqrt((1 − ᾱ_t) / ᾱ_t) in float32, interpolated at the (fractional) inference timesteps in float64
// as np.interp, then float32 again, as diffusers; set_timesteps, scale_model_input and add_noise are
// SigmaSchedulerBase's (scheduling_utils_sigmas.ts), shared with EulerAncestralDiscreteScheduler.
import { randnTensor } from '../random.js';
import { tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import {
  SAMPLER_BETA_SCHEDULES, SCHEDULER_DEFAULTS, PREDICTION_TYPES, TIMESTEP_SPACINGS, resolveSchedulerConfig, sqrt32,
  type BetaScheduleConfig, type PredictionType, type StepOptions, type TimestepSpacing,
} from './scheduling_utils.js';
import { SIGMA_SCHEDULE_DEFAULTS, SigmaSchedulerBase, kDiffusionX0, type SigmaScheduleFlags } from './scheduling_utils_sigmas.js';

export type EulerDiscreteSchedulerConfig = BetaScheduleConfig & SigmaScheduleFlags & {
  prediction_type: PredictionType;
  interpolation_type: 'linear';
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
  ...SIGMA_SCHEDULE_DEFAULTS,
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

  /**
   * One Euler step from σ_i to σ_{i+1}: x + (x − x̂₀)/σ̂ · (σ_{i+1} − σ̂), in float32. With `sChurn` > 0
   * (Karras et al.'s Algorithm 2) σ is first raised to σ̂ = σ·(1 + γ) for σ in [sTmin, sTmax] by adding
   * noise of variance σ̂² − σ² (drawn with `generator`, scaled by sNoise).
   */
  step(modelOutput: Tensor, timestep: number, sample: Tensor, options: StepOptions = {}): Tensor {
    const { sChurn = 0, sTmin = 0, sTmax = Infinity, sNoise = 1 } = options;
    const f = Math.fround;
    const i = this.nextStepIndex(timestep);
    const sigma = this.sigmaValues[i] as number;
    const gamma = sTmin <= sigma && sigma <= sTmax ? Math.min(sChurn / (this.sigmaValues.length - 1), 2 ** 0.5 - 1) : 0;
    const sigmaHat = f(sigma * f(gamma + 1));
    const out = tidy(() => {
      let x = sample.to('float32');
      if (gamma > 0) {
        const noise = randnTensor(modelOutput, options.generator).mul(sNoise);
        x = x.add(noise.mul(sqrt32(f(f(sigmaHat * sigmaHat) - f(sigma * sigma)))));
      }
      // 1. predicted x₀ (v-prediction at σ, not σ̂, as diffusers)
      const predOriginal = kDiffusionX0(this.config.prediction_type, modelOutput, x, this.config.prediction_type === 'epsilon' ? sigmaHat : sigma);
      // 2. the ODE derivative and the step
      const derivative = x.sub(predOriginal).div(sigmaHat);
      const dt = f((this.sigmaValues[i + 1] as number) - sigmaHat);
      return x.add(derivative.mul(dt)).to(modelOutput.dtype);
    });
    this.stepIndex = i + 1;
    return out;
  }
}
