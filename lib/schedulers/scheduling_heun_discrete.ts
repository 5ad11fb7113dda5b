// HeunDiscreteScheduler (diffusers 0.31 schedulers/scheduling_heun_discrete.py): Heun's second-order method
// on the probability-flow ODE in σ (Karras et al. 2022, Algorithm 1; k-diffusion's sample_heun), A1111's
// "Heun". Each step takes two model evaluations: `timesteps` lists every timestep after the first twice, the
// first visit makes an Euler step to σ_{i+1} and keeps its derivative, the second averages it with the
// derivative there and redoes the step from the kept sample. The last step is Euler's alone (σ_{i+1} = 0).
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import { SAMPLER_SUPPORTED, resolveSchedulerConfig, type PredictionType } from './scheduling_utils.js';
import {
  K_DIFFUSION_DEFAULTS, TwoStageSchedulerBase, doubled, kDiffusionX0, numbers, type KDiffusionConfig,
} from './scheduling_utils_sigmas.js';

export type HeunDiscreteSchedulerConfig = KDiffusionConfig & {
  prediction_type: PredictionType;
  clip_sample: boolean;
  clip_sample_range: number;
};

/** HeunDiscreteScheduler.__init__'s defaults. */
export const HEUN_DISCRETE_SCHEDULER_DEFAULTS: Readonly<HeunDiscreteSchedulerConfig> = Object.freeze({
  ...K_DIFFUSION_DEFAULTS,
  clip_sample: false,
  clip_sample_range: 1.0,
  timestep_spacing: 'linspace',
});

const CLASS = 'HeunDiscreteScheduler';

/** What difflora implements of the values diffusers accepts ('exp' betas are not implemented). */
const SUPPORTED = SAMPLER_SUPPORTED;

/** The first stage keeps its derivative, step size and starting sample. */
export class HeunDiscreteScheduler extends TwoStageSchedulerBase<HeunDiscreteSchedulerConfig, { derivative: Tensor; dt: number; sample: Tensor }> {
  readonly name = 'heun';

  constructor(rawConfig: object = {}, overrides: Record<string, unknown> = {}) {
    super(CLASS, resolveSchedulerConfig(CLASS, HEUN_DISCRETE_SCHEDULER_DEFAULTS as HeunDiscreteSchedulerConfig, rawConfig, overrides, SUPPORTED),
      'descending');
  }

  /** The k-diffusion σ (float64 timesteps with a σ schedule), each stage after the first listed twice. */
  override setTimesteps(numInferenceSteps: number): void {
    const { timesteps, sigmas } = this.kDiffusionSchedule(numInferenceSteps);
    const s = numbers(sigmas);
    this.setSchedule(doubled(timesteps, 1), doubled(s, 1, s.length - 1));
    this.clearStage();
  }

  /** One stage: the Euler step (first visit) or Heun's correction (second visit). */
  step(modelOutput: Tensor, timestep: number, sample: Tensor): Tensor {
    const f = Math.fround;
    const i = this.nextStepIndex(timestep);
    const first = this.firstStage;
    const { sigma, sigmaNext } = this.stepSigmas(i);
    const out = tidy(() => {
      // 1. x̂₀ at σ (first stage) or σ_next (second)
      let x0 = kDiffusionX0(this.config.prediction_type, modelOutput, sample, first === null ? sigma : sigmaNext);
      if (this.config.clip_sample) x0 = x0.clamp(-this.config.clip_sample_range, this.config.clip_sample_range);
      // 2. the derivative; the Euler step, or the averaged one from the kept sample
      if (first === null) {
        const derivative = sample.sub(x0).div(sigma);
        const dt = f(sigmaNext - sigma);
        this.firstStage = { derivative: keep(derivative), dt, sample: keep(sample.clone()) };
        return sample.add(derivative.mul(dt));
      }
      const derivative = first.derivative.add(sample.sub(x0).div(sigmaNext)).div(2);
      return first.sample.add(derivative.mul(first.dt));
    });
    this.endStage(i, first);
    return out;
  }
}
