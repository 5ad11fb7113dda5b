// KDPM2DiscreteScheduler (diffusers 0.31 schedulers/scheduling_k_dpm_2_discrete.py): k-diffusion's
// sample_dpm_2, A1111's "DPM2": a second-order step that evaluates the model again at the geometric mean
// σ_interpol = sqrt(σ_i·σ_{i+1}) (the midpoint in log σ) and takes the full step with that derivative. Two
// model evaluations per step: `timesteps` interleaves the midpoints' timesteps (found by _sigma_to_t, in float32).
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import { SAMPLER_SUPPORTED_NO_SAMPLE, resolveSchedulerConfig } from './scheduling_utils.js';
import {
  K_DIFFUSION_DEFAULTS, TwoStageSchedulerBase, doubledWithLast, dpm2Stage, inputScale, logMidpoints, midpointInterleaved, type KDiffusionConfig,
} from './scheduling_utils_sigmas.js';

export type KDPM2DiscreteSchedulerConfig = KDiffusionConfig & { prediction_type: 'epsilon' | 'v_prediction' };

/** KDPM2DiscreteScheduler.__init__'s defaults. */
export const KDPM2_DISCRETE_SCHEDULER_DEFAULTS: Readonly<KDPM2DiscreteSchedulerConfig> = Object.freeze({
  ...K_DIFFUSION_DEFAULTS,
  timestep_spacing: 'linspace',
});

const CLASS = 'KDPM2DiscreteScheduler';

/** What difflora implements ('sample' prediction: diffusers raises NotImplementedError). */
const SUPPORTED = SAMPLER_SUPPORTED_NO_SAMPLE;

/** The first stage keeps the sample the step started from. */
export class KDPM2DiscreteScheduler extends TwoStageSchedulerBase<KDPM2DiscreteSchedulerConfig, { sample: Tensor }> {
  readonly name = 'kdpm2';
  /** σ_interpol per entry of the schedule (as `sigmas`, each stage after the first twice). */
  private sigmasInterpol: Float32Array = new Float32Array(0);

  constructor(rawConfig: object = {}, overrides: Record<string, unknown> = {}) {
    super(CLASS, resolveSchedulerConfig(CLASS, KDPM2_DISCRETE_SCHEDULER_DEFAULTS as KDPM2DiscreteSchedulerConfig, rawConfig, overrides, SUPPORTED),
      'descending');
  }

  /** The k-diffusion σ (Karras timesteps rounded), their log-midpoints, and both stages' timesteps interleaved. */
  override setTimesteps(numInferenceSteps: number): void {
    const { timesteps: ts, sigmas: s } = this.kDiffusionSchedule(numInferenceSteps, true);
    // σ_interpol: exp(lerp(log σ_i, log σ_{i−1}, 0.5)) (σ.roll(1))
    const interpol = logMidpoints(s, Float32Array.from([s[s.length - 1] as number, ...s.slice(0, -1)]));
    this.sigmasInterpol = doubledWithLast(interpol);
    this.setSchedule(midpointInterleaved(ts, interpol.subarray(1), this.logSigmas), doubledWithLast(s));
    this.clearStage();
  }

  /** sample / sqrt(σ² + 1) at σ (first stage) or σ_interpol (second). */
  override scaleModelInput(sample: Tensor, timestep: number): Tensor {
    this.checkAlive();
    const i = this.initStepIndex(timestep);
    return sample.div(inputScale((this.firstStage === null ? this.sigmaValues[i] : this.sigmasInterpol[i]) as number));
  }

  /** First stage: Euler to σ_interpol; second: the full step from the kept sample with the midpoint's derivative. */
  step(modelOutput: Tensor, timestep: number, sample: Tensor): Tensor {
    const i = this.nextStepIndex(timestep);
    const first = this.firstStage;
    const { sigma, sigmaNext } = this.stepSigmas(i);
    const sigmaInterpol = (first === null ? this.sigmasInterpol[i + 1] : this.sigmasInterpol[i]) as number;
    const out = tidy(() => {
      const prev = dpm2Stage(this.config.prediction_type, modelOutput, sample, first?.sample ?? null, sigma, sigmaInterpol, sigmaNext);
      if (first === null) this.firstStage = { sample: keep(sample.clone()) };
      return prev;
    });
    this.endStage(i, first);
    return out;
  }
}
