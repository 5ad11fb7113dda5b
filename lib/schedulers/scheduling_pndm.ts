// PNDMScheduler (diffusers 0.31 schedulers/scheduling_pndm.py), the default of Stable Diffusion 1.x: the
// pseudo linear multistep (PLMS) method of Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on
// Manifolds". With skip_prk_steps (SD's configs) PLMS warms up on its own: the second timestep is repeated,
// and the first step is redone from the same sample with the average of two model outputs. Without it, three
// pseudo Runge-Kutta steps (four model evaluations each, at t, t − δ/2 twice and t − δ) warm up the multistep
// history first, as the paper's PNDM.
//
// Coefficients are float32 numbers computed as diffusers' 0-dim float32 tensors; the model outputs kept
// for the multistep formula (`ets`) are kept tensors, freed when they fall out of the window.
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import {
  SAMPLER_SUPPORTED_NO_SAMPLE, SCHEDULER_DEFAULTS, SchedulerBase, resolveSchedulerConfig, sqrt32,
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

/** What difflora implements of the values diffusers accepts (diffusers' _get_prev_sample raises for 'sample'). */
const SUPPORTED = SAMPLER_SUPPORTED_NO_SAMPLE;


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
  // the Runge-Kutta warm-up: its timesteps (12, or none with skip_prk_steps) and the weighted output sum
  private prkTimesteps: number[] = [];
  private curModelOutput: Tensor | null = null;

  constructor(rawConfig: object = {}, overrides: Record<string, unknown> = {}) {
    super(CLASS, resolveSchedulerConfig(CLASS, PNDM_SCHEDULER_DEFAULTS as PNDMSchedulerConfig, rawConfig, overrides, SUPPORTED));
    this.finalAlphaCumprod = this.config.set_alpha_to_one ? 1 : (this.acp[0] as number);
  }

  get timesteps(): number[] { return this.schedule; }

  setTimesteps(numInferenceSteps: number): void {
    const n = numInferenceSteps;
    // 1. the base timesteps (ascending)
    const base = this.spacedSchedule(n).reverse();
    if (this.config.skip_prk_steps) {
      // 2. PLMS: the second-to-last base timestep repeated, then all descending
      this.prkTimesteps = [];
      this.schedule = [...base.slice(0, -1), ...base.slice(-2, -1), ...base.slice(-1)].reverse();
    } else {
      // 2. PRK on the last 4 base timesteps and their half steps (each stage twice but the ends), then PLMS
      const half = Math.floor(Math.floor(this.config.num_train_timesteps / n) / 2);
      const prk = base.slice(-4).flatMap((t) => [t, t + half]);
      this.prkTimesteps = prk.slice(0, -1).flatMap((t) => [t, t]).slice(1, -1).reverse();
      this.schedule = [...this.prkTimesteps, ...base.slice(0, -3).reverse()];
    }
    this.numInferenceSteps = n;
    this.resetState();
  }

  /** One step: pseudo Runge-Kutta during the warm-up (step_prk), PLMS after (step_plms). */
  step(modelOutput: Tensor, timestep: number, sample: Tensor): Tensor {
    this.checkAlive();
    if (this.numInferenceSteps === null) return this.timestepsNotSet();
    this.checkTimestep(timestep);
    return this.counter < this.prkTimesteps.length ? this.stepPrk(modelOutput, timestep, sample) : this.stepPlms(modelOutput, timestep, sample);
  }

  /**
   * One of the four stages of a pseudo Runge-Kutta step: the outputs are summed with weights 1/6, 1/3, 1/3,
   * 1/6, each stage stepping from the step's first sample (the first output joins the multistep history).
   */
  private stepPrk(modelOutput: Tensor, timestep: number, sample: Tensor): Tensor {
    const n = this.numInferenceSteps as number;
    const stage = this.counter % 4;
    const prevT = timestep - (this.counter % 2 === 1 ? 0 : Math.floor(Math.floor(this.config.num_train_timesteps / n) / 2));
    const t = this.prkTimesteps[this.counter - stage] as number;
    const sum = (w: number): Tensor => {
      const term = modelOutput.mul(w);
      return this.curModelOutput === null ? term : this.curModelOutput.add(term);
    };
    let eps = modelOutput;
    if (stage === 0) {
      this.ets.push(keep(modelOutput.clone()));
      this.curSample?.dispose();
      this.curSample = keep(sample.clone());
    }
    if (stage < 3) {
      const next = keep(tidy(() => sum(stage === 0 ? 1 / 6 : 1 / 3)));
      this.curModelOutput?.dispose();
      this.curModelOutput = next;
    } else {
      eps = sum(1 / 6);
    }
    const result = tidy(() => this.prevSample(this.curSample ?? sample, t, prevT, eps));
    if (stage === 3) {
      eps.dispose();
      this.curModelOutput?.dispose();
      this.curModelOutput = null;
    }
    this.counter += 1;
    return result;
  }

  /** One PLMS step (diffusers' step_plms). */
  private stepPlms(modelOutput: Tensor, timestep: number, sample: Tensor): Tensor {
    const stride = Math.floor(this.config.num_train_timesteps / (this.numInferenceSteps as number));
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
    this.curModelOutput?.dispose();
    this.curModelOutput = null;
    this.counter = 0;
  }

  protected override releaseState(): void {
    this.resetState();
  }
}
