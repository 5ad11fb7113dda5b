// KDPM2DiscreteScheduler (diffusers 0.31 schedulers/scheduling_k_dpm_2_discrete.py): k-diffusion's
// sample_dpm_2, A1111's "DPM2": a second-order step that evaluates the model again at the geometric mean
// σ_interpol = sqrt(σ_i·σ_{i+1}) (the midpoint in log σ) and takes the full step with that derivative. Two
// model evaluations per step: `timesteps` interleaves the midpoints' timesteps (found by _sigma_to_t, in float32).
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import { SAMPLER_SUPPORTED_NO_SAMPLE, resolveSchedulerConfig, roundHalfEven } from './scheduling_utils.js';
import {
  K_DIFFUSION_DEFAULTS, SigmaSchedulerBase, doubled, inputScale, kDiffusionX0, logMidpoints, numbers, sigmaToT, type KDiffusionConfig,
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

export class KDPM2DiscreteScheduler extends SigmaSchedulerBase<KDPM2DiscreteSchedulerConfig> {
  readonly name = 'kdpm2';
  override readonly order = 2;
  /** σ_interpol per entry of the schedule (as `sigmas`, each stage after the first twice). */
  private sigmasInterpol: Float32Array = new Float32Array(0);
  // the sample the current step started from (null: first stage next)
  private firstSample: Tensor | null = null;

  constructor(rawConfig: object = {}, overrides: Record<string, unknown> = {}) {
    super(CLASS, resolveSchedulerConfig(CLASS, KDPM2_DISCRETE_SCHEDULER_DEFAULTS as KDPM2DiscreteSchedulerConfig, rawConfig, overrides, SUPPORTED),
      'descending');
  }

  /** The k-diffusion σ (Karras timesteps rounded), their log-midpoints, and both stages' timesteps interleaved. */
  override setTimesteps(numInferenceSteps: number): void {
    const { timesteps, sigmas } = this.kDiffusionSigmas(numInferenceSteps);
    this.timestepsFloat64 = this.sigmaSchedule !== 'spaced';
    const ts = this.sigmaSchedule === 'karras' ? timesteps.map(roundHalfEven) : this.timestepsFloat64 ? timesteps : timesteps.map(Math.fround);
    const s = Float32Array.from([...sigmas, 0]);
    // σ_interpol: exp(lerp(log σ_i, log σ_{i−1}, 0.5)) (σ.roll(1))
    const interpol = logMidpoints(s, Float32Array.from([s[s.length - 1] as number, ...s.slice(0, -1)]));
    const tsInterpol = numbers(interpol).map((v) => sigmaToT(v, this.logSigmas, 'torch32'));
    const interleaved = ts.slice(1).flatMap((t, k) => [tsInterpol[k + 1] as number, t]);
    this.sigmasInterpol = Float32Array.from(doubled(numbers(interpol), 1, interpol.length).concat([interpol[interpol.length - 1] as number]));
    this.setSchedule([ts[0] as number, ...interleaved], doubled(numbers(s), 1).concat([s[s.length - 1] as number]));
    this.resetStage();
  }

  /** sample / sqrt(σ² + 1) at σ (first stage) or σ_interpol (second). */
  override scaleModelInput(sample: Tensor, timestep: number): Tensor {
    this.checkAlive();
    const i = this.initStepIndex(timestep);
    return sample.div(inputScale((this.firstSample === null ? this.sigmaValues[i] : this.sigmasInterpol[i]) as number));
  }

  /** First stage: Euler to σ_interpol; second: the full step from the kept sample with the midpoint's derivative. */
  step(modelOutput: Tensor, timestep: number, sample: Tensor): Tensor {
    this.checkAlive();
    const f = Math.fround;
    const i = this.nextStepIndex(timestep);
    const kept = this.firstSample;
    const sigma = (kept === null ? this.sigmaValues[i] : this.sigmaValues[i - 1]) as number;
    const sigmaInterpol = (kept === null ? this.sigmasInterpol[i + 1] : this.sigmasInterpol[i]) as number;
    const sigmaNext = (kept === null ? this.sigmaValues[i + 1] : this.sigmaValues[i]) as number;
    const out = tidy(() => {
      const x0 = kDiffusionX0(this.config.prediction_type, modelOutput, sample, kept === null ? sigma : sigmaInterpol);
      if (kept === null) {
        this.firstSample = keep(sample.clone());
        return sample.add(sample.sub(x0).div(sigma).mul(f(sigmaInterpol - sigma)));
      }
      return kept.add(sample.sub(x0).div(sigmaInterpol).mul(f(sigmaNext - sigma)));
    });
    if (kept !== null) this.resetStage();
    this.stepIndex = i + 1;
    return out;
  }

  private resetStage(): void {
    this.firstSample?.dispose();
    this.firstSample = null;
  }

  protected override releaseState(): void {
    super.releaseState();
    this.resetStage();
  }
}
