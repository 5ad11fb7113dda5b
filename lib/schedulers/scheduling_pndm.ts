// PNDMScheduler (diffusers 0.31 schedulers/scheduling_pndm.py), the default of Stable Diffusion 1.x, with
// skip_prk_steps: the pseudo linear multistep (PLMS) method of Liu et al. 2022, "Pseudo Numerical Methods for
// Diffusion Models on Manifolds". The Runge-Kutta warm-up (skip_prk_steps false) is not implemented and is
// refused. PLMS warms up on its own: the second timestep is repeated, and the first step is redone from the
// same sample with the average of two model outputs.
//
// Coefficients are float32 numbers computed as diffusers' 0-dim float32 tensors; the model outputs kept
// for the multistep formula (`ets`) are kept tensors, freed when they fall out of the window.
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import {
  SAMPLER_BETA_SCHEDULES, SCHEDULER_DEFAULTS, SchedulerBase, TIMESTEP_SPACINGS, configError, resolveSchedulerConfig, sqrt32,
  type BetaScheduleConfig, type TimestepSpacing,
} from './scheduling_utils.js';

export type PNDMSchedulerConfig = BetaScheduleConfig & {
  skip_prk_steps: boolean;
  set_alpha_to_one: boolean;
  prediction_type: 'epsilon' | 'v_prediction';
  timestep_spacing: TimestepSpacing;
  steps_offset: number;
};

/** PNDMScheduler.__init__'s defaults. */
export const PNDM_SCHEDULER_DEFAULTS: Readonly<PNDMSchedulerConfig> = Object.freeze({
  ...SCHEDULER_DEFAULTS,
  skip_prk_steps: false,
  set_alpha_to_one: false,
  timestep_spacing: 'leading',
});

const CLASS = 'PNDMScheduler';

/** What difflora implements of the values diffusers accepts. */
const SUPPORTED = {
  beta_schedule: SAMPLER_BETA_SCHEDULES,
  // diffusers' _get_prev_sample raises for 'sample'
  prediction_type: ['epsilon', 'v_prediction'],
  timestep_spacing: TIMESTEP_SPACINGS,
};

/** The config, with skip_prk_steps false refused (PLMS only). */
function resolvePNDMConfig(rawConfig: object, overrides: Record<string, unknown>): PNDMSchedulerConfig {
  const c = resolveSchedulerConfig(CLASS, PNDM_SCHEDULER_DEFAULTS as PNDMSchedulerConfig, rawConfig, overrides, SUPPORTED);
  if (!c.skip_prk_steps) {
    configError(CLASS, 'skip_prk_steps', false, "is not supported: difflora implements PLMS only (the Runge-Kutta warm-up steps are not implemented); use skip_prk_steps true, as Stable Diffusion's configs do");
  }
  return c;
}

export class PNDMScheduler extends SchedulerBase<PNDMSchedulerConfig> {
  readonly name = 'pndm';
  /** ᾱ after the last step: 1 with set_alpha_to_one, else ᾱ_0. */
  private readonly finalAlphaCumprod: number;
  private schedule: number[] = [];
  private numInferenceSteps: number | null = null;
  // PLMS state: the last (up to 4) model outputs, the step counter, the sample the first step started from
  private ets: Tensor[] = [];
  private counter = 0;
  private curSample: Tensor | null = null;

  constructor(rawConfig: object = {}, overrides: Record<string, unknown> = {}) {
    super(CLASS, resolvePNDMConfig(rawConfig, overrides));
    this.finalAlphaCumprod = this.config.set_alpha_to_one ? 1 : (this.acp[0] as number);
  }

  get timesteps(): number[] { return this.schedule; }

  setTimesteps(numInferenceSteps: number): void {
    const n = numInferenceSteps;
    // 1. the base timesteps (ascending)
    const base = this.spacedSchedule(n).reverse();
    // 2. PLMS: the second-to-last base timestep repeated, then all descending
    this.schedule = [...base.slice(0, -1), ...base.slice(-2, -1), ...base.slice(-1)].reverse();
    this.numInferenceSteps = n;
    this.resetState();
  }

  /** One PLMS step (diffusers' step_plms). */
  step(modelOutput: Tensor, timestep: number, sample: Tensor): Tensor {
    this.checkAlive();
    if (this.numInferenceSteps === null) return this.timestepsNotSet();
    this.checkTimestep(timestep);
    const stride = Math.floor(this.config.num_train_timesteps / this.numInferenceSteps);
    let t = timestep;
    let prevT = t - stride;
    const result = tidy(() => {
      // 1. update the window of model outputs (the redone first step does not add to it)
      if (this.counter !== 1) {
        while (this.ets.length > 3) this.ets.shift()?.dispose();
        this.ets.push(keep(modelOutput.clone()));
      } else {
        prevT = t;
        t = t + stride;
        // the redone first step goes back to the first timestep: out of range only when the caller skipped it
        this.checkTimestep(t);
      }
      // 2. the linear multistep combination
      const e = (k: number): Tensor => this.ets[this.ets.length - k] as Tensor;
      let eps: Tensor;
      let x = sample;
      if (this.ets.length === 1 && this.counter === 0) {
        eps = modelOutput;
        this.curSample = keep(sample.clone());
      } else if (this.ets.length === 1 && this.counter === 1) {
        eps = modelOutput.add(e(1)).div(2);
        x = this.curSample ?? sample;
      } else if (this.ets.length === 2) {
        eps = e(1).mul(3).sub(e(2)).div(2);
      } else if (this.ets.length === 3) {
        eps = e(1).mul(23).sub(e(2).mul(16)).add(e(3).mul(5)).div(12);
      } else {
        eps = e(1).mul(55).sub(e(2).mul(59)).add(e(3).mul(37)).sub(e(4).mul(9)).mul(1 / 24);
      }
      return this.prevSample(x, t, prevT, eps);
    });
    if (this.counter === 1 && this.curSample !== null) {
      this.curSample.dispose();
      this.curSample = null;
    }
    this.counter += 1;
    return result;
  }

  /** x_{t−δ} from x_t and ε, formula (9) of the PNDM paper (diffusers' _get_prev_sample). */
  private prevSample(sample: Tensor, t: number, prevT: number, modelOutput: Tensor): Tensor {
    const f = Math.fround;
    const alphaProdT = this.acp[t] as number;
    const alphaProdTPrev = prevT >= 0 ? (this.acp[prevT] as number) : this.finalAlphaCumprod;
    const betaProdT = f(1 - alphaProdT);
    const betaProdTPrev = f(1 - alphaProdTPrev);
    const eps = this.config.prediction_type === 'v_prediction'
      ? modelOutput.mul(sqrt32(alphaProdT)).add(sample.mul(sqrt32(betaProdT)))
      : modelOutput;
    const sampleCoeff = sqrt32(f(alphaProdTPrev / alphaProdT));
    const denom = f(f(alphaProdT * sqrt32(betaProdTPrev)) + sqrt32(f(f(alphaProdT * betaProdT) * alphaProdTPrev)));
    return sample.mul(sampleCoeff).sub(eps.mul(f(alphaProdTPrev - alphaProdT)).div(denom));
  }

  private resetState(): void {
    for (const t of this.ets) t.dispose();
    this.ets = [];
    this.curSample?.dispose();
    this.curSample = null;
    this.counter = 0;
  }

  protected override releaseState(): void {
    this.resetState();
  }
}
