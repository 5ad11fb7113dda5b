// EulerAncestralDiscreteScheduler (diffusers 0.31 schedulers/scheduling_euler_ancestral_discrete.py):
// k-diffusion's sample_euler_ancestral with eta = 1. Each step goes deterministically from σ_i down to
// σ_down, then adds fresh noise of scale σ_up, where σ_down² + σ_up² = σ_{i+1}². The noise comes from
// randn_tensor(generator), so one seeded generator reproduces diffusers' samples exactly.
import { randnTensor, type Generator } from '../random.js';
import { tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import {
  SAMPLER_SUPPORTED_NO_SAMPLE, SCHEDULER_DEFAULTS, resolveSchedulerConfig, sqrt32, type BetaScheduleConfig, type TimestepSpacing,
} from './scheduling_utils.js';
import { SigmaSchedulerBase } from './scheduling_utils_sigmas.js';

export type EulerAncestralDiscreteSchedulerConfig = BetaScheduleConfig & {
  prediction_type: 'epsilon' | 'v_prediction';
  timestep_spacing: TimestepSpacing;
  steps_offset: number;
  rescale_betas_zero_snr: boolean;
};

/** EulerAncestralDiscreteScheduler.__init__'s defaults. */
export const EULER_ANCESTRAL_DISCRETE_SCHEDULER_DEFAULTS: Readonly<EulerAncestralDiscreteSchedulerConfig> = Object.freeze({
  ...SCHEDULER_DEFAULTS,
  timestep_spacing: 'linspace',
  rescale_betas_zero_snr: false,
});

const CLASS = 'EulerAncestralDiscreteScheduler';

/** What difflora implements of the values diffusers accepts (diffusers: NotImplementedError("prediction_type not implemented yet: sample")). */
const SUPPORTED = SAMPLER_SUPPORTED_NO_SAMPLE;

export class EulerAncestralDiscreteScheduler extends SigmaSchedulerBase<EulerAncestralDiscreteSchedulerConfig> {
  readonly name = 'euler_a';

  constructor(rawConfig: object = {}, overrides: Record<string, unknown> = {}) {
    super(CLASS, resolveSchedulerConfig(CLASS, EULER_ANCESTRAL_DISCRETE_SCHEDULER_DEFAULTS as EulerAncestralDiscreteSchedulerConfig, rawConfig, overrides, SUPPORTED),
      'descending');
  }

  /** One ancestral Euler step: the ODE step to σ_down, plus σ_up·z with z from randn_tensor(generator). */
  step(modelOutput: Tensor, timestep: number, sample: Tensor, options: { generator?: Generator } = {}): Tensor {
    const f = Math.fround;
    const i = this.nextStepIndex(timestep);
    const sigma = this.sigmaValues[i] as number;
    // 2. σ_up and σ_down (k-diffusion's get_ancestral_step, eta = 1)
    const sigmaFrom = sigma;
    const sigmaTo = this.sigmaValues[i + 1] as number;
    const from2 = f(sigmaFrom * sigmaFrom);
    const to2 = f(sigmaTo * sigmaTo);
    const sigmaUp = sqrt32(f(f(to2 * f(from2 - to2)) / from2));
    const sigmaDown = sqrt32(f(to2 - f(sigmaUp * sigmaUp)));
    const out = tidy(() => {
      const x = sample.to('float32');
      // 1. predicted x₀
      const predOriginal = this.config.prediction_type === 'epsilon'
        ? x.sub(modelOutput.mul(sigma))
        : modelOutput.mul(f(-sigma / sqrt32(f(f(sigma * sigma) + 1)))).add(x.div(f(f(sigma * sigma) + 1)));
      // 3. the ODE derivative, the deterministic step, the noise
      const derivative = x.sub(predOriginal).div(sigma);
      const dt = f(sigmaDown - sigma);
      const prev = x.add(derivative.mul(dt));
      const noise = randnTensor(modelOutput, options.generator);
      return prev.add(noise.mul(sigmaUp)).to(modelOutput.dtype);
    });
    this.stepIndex = i + 1;
    return out;
  }
}
