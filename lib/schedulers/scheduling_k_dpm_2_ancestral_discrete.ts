// KDPM2AncestralDiscreteScheduler (diffusers 0.31 schedulers/scheduling_k_dpm_2_ancestral_discrete.py):
// k-diffusion's sample_dpm_2_ancestral, A1111's "DPM2 a": KDPM2's midpoint step aimed at σ_down, then fresh
// noise of scale σ_up (σ_down² + σ_up² = σ_{i+1}², as Euler ancestral), drawn with the step's generator at the
// second stage. σ, σ_up, σ_down and the midpoints are computed on float32 tensors as diffusers does.
import { randnTensor } from '../random.js';
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import { SAMPLER_SUPPORTED_NO_SAMPLE, resolveSchedulerConfig, type StepOptions } from './scheduling_utils.js';
import {
  K_DIFFUSION_DEFAULTS, TwoStageSchedulerBase, doubledWithLast, dpm2Stage, inputScale, logMidpoints, midpointInterleaved, type KDiffusionConfig,
} from './scheduling_utils_sigmas.js';

export type KDPM2AncestralDiscreteSchedulerConfig = KDiffusionConfig & { prediction_type: 'epsilon' | 'v_prediction' };

/** KDPM2AncestralDiscreteScheduler.__init__'s defaults. */
export const KDPM2_ANCESTRAL_DISCRETE_SCHEDULER_DEFAULTS: Readonly<KDPM2AncestralDiscreteSchedulerConfig> = Object.freeze({
  ...K_DIFFUSION_DEFAULTS,
  timestep_spacing: 'linspace',
});

const CLASS = 'KDPM2AncestralDiscreteScheduler';

/** What difflora implements ('sample' prediction: diffusers raises NotImplementedError). */
const SUPPORTED = SAMPLER_SUPPORTED_NO_SAMPLE;

/** σ_up and σ_down of each σ towards the next (the last σ_down 0), float32 tensor arithmetic. */
function ancestralSigmas(s: Float32Array): { up: Float32Array; down: Float32Array } {
  return tidy(() => {
    const sigmas = torch.tensor(s);
    const next = torch.tensor(Float32Array.from([...s.slice(1), 0]));
    const up = next.pow(2).mul(sigmas.pow(2).sub(next.pow(2))).div(sigmas.pow(2)).pow(0.5);
    const down = next.pow(2).sub(up.pow(2)).pow(0.5);
    const d = down.dataSync() as Float32Array;
    d[d.length - 1] = 0;
    return { up: up.dataSync() as Float32Array, down: d };
  });
}

/** The first stage keeps the sample the step started from. */
export class KDPM2AncestralDiscreteScheduler extends TwoStageSchedulerBase<KDPM2AncestralDiscreteSchedulerConfig, { sample: Tensor }> {
  readonly name = 'kdpm2_a';
  // per entry of the schedule, as `sigmas`: the midpoints, σ_up, σ_down
  private sigmasInterpol: Float32Array = new Float32Array(0);
  private sigmasUp: Float32Array = new Float32Array(0);
  private sigmasDown: Float32Array = new Float32Array(0);

  constructor(rawConfig: object = {}, overrides: Record<string, unknown> = {}) {
    super(CLASS, resolveSchedulerConfig(CLASS, KDPM2_ANCESTRAL_DISCRETE_SCHEDULER_DEFAULTS as KDPM2AncestralDiscreteSchedulerConfig, rawConfig, overrides, SUPPORTED),
      'descending');
  }

  override setTimesteps(numInferenceSteps: number): void {
    const { timesteps: ts, sigmas: s } = this.kDiffusionSchedule(numInferenceSteps, true);
    const { up, down } = ancestralSigmas(s);
    // midpoints in log σ between σ_i and σ_down,i; the last two are 0
    const interpol = logMidpoints(s, down);
    interpol.fill(0, -2);
    this.sigmasInterpol = doubledWithLast(interpol);
    this.sigmasUp = doubledWithLast(up);
    this.sigmasDown = doubledWithLast(down);
    this.setSchedule(midpointInterleaved(ts, interpol, this.logSigmas), doubledWithLast(s));
    this.clearStage();
  }

  /** sample / sqrt(σ² + 1) at σ (first stage) or the previous entry's σ_interpol (second). */
  override scaleModelInput(sample: Tensor, timestep: number): Tensor {
    this.checkAlive();
    const i = this.initStepIndex(timestep);
    return sample.div(inputScale((this.firstStage === null ? this.sigmaValues[i] : this.sigmasInterpol[i - 1]) as number));
  }

  /** First stage: Euler to σ_interpol; second: from the kept sample to σ_down with the midpoint's derivative, plus σ_up·noise. */
  step(modelOutput: Tensor, timestep: number, sample: Tensor, options: StepOptions = {}): Tensor {
    const i = this.nextStepIndex(timestep);
    const first = this.firstStage;
    const j = first === null ? i : i - 1;
    const { sigma } = this.stepSigmas(i);
    const sigmaInterpol = this.sigmasInterpol[j] as number;
    const sigmaUp = this.sigmasUp[j] as number;
    const sigmaDown = this.sigmasDown[i - 1] as number;
    const out = tidy(() => {
      const prev = dpm2Stage(this.config.prediction_type, modelOutput, sample, first?.sample ?? null, sigma, sigmaInterpol, sigmaDown);
      if (first !== null) return prev.add(randnTensor(modelOutput, options.generator).mul(sigmaUp));
      this.firstStage = { sample: keep(sample.clone()) };
      return prev;
    });
    this.endStage(i, first);
    return out;
  }
}
