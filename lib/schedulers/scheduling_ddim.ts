// DDIMScheduler (diffusers 0.31 schedulers/scheduling_ddim.py): the sampler of Song et al. 2021, "Denoising
// Diffusion Implicit Models", formula (12): deterministic with η = 0 (the default), with noise of standard
// deviation η·σ_t drawn with the step's generator for η > 0. Coefficients are float32 numbers computed as
// diffusers' 0-dim float32 tensors.
import { randnTensor } from '../random.js';
import { tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import {
  SAMPLER_BETA_SCHEDULES, SCHEDULER_DEFAULTS, PREDICTION_TYPES, SAMPLE_CLIPPING_DEFAULTS, SchedulerBase, TIMESTEP_SPACINGS, resolveSchedulerConfig, sqrt32,
  type BetaScheduleConfig, type PredictionType, type SampleClippingConfig, type StepOptions, type TimestepSpacing,
} from './scheduling_utils.js';

export type DDIMSchedulerConfig = BetaScheduleConfig & SampleClippingConfig & {
  set_alpha_to_one: boolean;
  steps_offset: number;
  prediction_type: PredictionType;
  timestep_spacing: TimestepSpacing;
  rescale_betas_zero_snr: boolean;
};

/** DDIMScheduler.__init__'s defaults. */
export const DDIM_SCHEDULER_DEFAULTS: Readonly<DDIMSchedulerConfig> = Object.freeze({
  ...SCHEDULER_DEFAULTS,
  ...SAMPLE_CLIPPING_DEFAULTS,
  set_alpha_to_one: true,
  timestep_spacing: 'leading',
  rescale_betas_zero_snr: false,
});

const CLASS = 'DDIMScheduler';

/** What difflora implements of the values diffusers accepts. */
const SUPPORTED = {
  beta_schedule: SAMPLER_BETA_SCHEDULES,
  prediction_type: PREDICTION_TYPES,
  thresholding: [false],
  timestep_spacing: TIMESTEP_SPACINGS,
};

export class DDIMScheduler extends SchedulerBase<DDIMSchedulerConfig> {
  readonly name = 'ddim';
  /** ᾱ after the last step: 1 with set_alpha_to_one, else ᾱ_0. */
  private readonly finalAlphaCumprod: number;
  private schedule: number[];
  private numInferenceSteps: number | null = null;

  constructor(rawConfig: object = {}, overrides: Record<string, unknown> = {}) {
    super(CLASS, resolveSchedulerConfig(CLASS, DDIM_SCHEDULER_DEFAULTS as DDIMSchedulerConfig, rawConfig, overrides, SUPPORTED));
    const c = this.config;
    this.finalAlphaCumprod = c.set_alpha_to_one ? 1 : (this.acp[0] as number);
    this.schedule = Array.from({ length: c.num_train_timesteps }, (_, i) => c.num_train_timesteps - 1 - i);
  }

  get timesteps(): number[] { return this.schedule; }

  setTimesteps(numInferenceSteps: number): void {
    this.schedule = this.spacedSchedule(numInferenceSteps);
    this.numInferenceSteps = numInferenceSteps;
  }

  /**
   * One DDIM step: x_{t−δ} = sqrt(ᾱ_{t−δ})·x̂₀ + sqrt(1 − ᾱ_{t−δ} − σ_t²)·ε̂ + σ_t·z, σ_t = η·sqrt(variance),
   * z from randn_tensor(generator) when η > 0.
   */
  step(modelOutput: Tensor, timestep: number, sample: Tensor, options: StepOptions = {}): Tensor {
    const eta = options.eta ?? 0;
    if (!(eta >= 0 && Number.isFinite(eta))) throw new Error(`${CLASS}: eta must be a finite number ≥ 0, got ${eta}`);
    this.checkAlive();
    if (this.numInferenceSteps === null) return this.timestepsNotSet();
    this.checkTimestep(timestep);
    const c = this.config;
    const f = Math.fround;
    // 1. the previous timestep
    const prevT = timestep - Math.floor(c.num_train_timesteps / this.numInferenceSteps);
    // 2. alphas, betas
    const alphaProdT = this.acp[timestep] as number;
    const alphaProdTPrev = prevT >= 0 ? (this.acp[prevT] as number) : this.finalAlphaCumprod;
    const betaProdT = f(1 - alphaProdT);
    // 5. the variance and σ_t = η·sqrt(variance)
    const variance = f(f(f(1 - alphaProdTPrev) / betaProdT) * f(1 - f(alphaProdT / alphaProdTPrev)));
    const stdDevT = f(f(eta) * sqrt32(variance));
    const directionCoeff = sqrt32(f(f(1 - alphaProdTPrev) - f(stdDevT * stdDevT)));
    return tidy(() => {
      // 3. predicted x₀ and ε
      let predOriginal: Tensor;
      let predEpsilon: Tensor;
      if (c.prediction_type === 'epsilon') {
        predOriginal = sample.sub(modelOutput.mul(sqrt32(betaProdT))).div(sqrt32(alphaProdT));
        predEpsilon = modelOutput;
      } else if (c.prediction_type === 'sample') {
        predOriginal = modelOutput;
        predEpsilon = sample.sub(predOriginal.mul(sqrt32(alphaProdT))).div(sqrt32(betaProdT));
      } else {
        predOriginal = sample.mul(sqrt32(alphaProdT)).sub(modelOutput.mul(sqrt32(betaProdT)));
        predEpsilon = modelOutput.mul(sqrt32(alphaProdT)).add(sample.mul(sqrt32(betaProdT)));
      }
      // 4. clip x₀
      if (c.clip_sample) predOriginal = predOriginal.clamp(-c.clip_sample_range, c.clip_sample_range);
      // 6.–7. the direction pointing to x_t, and x_{t−δ}
      const direction = predEpsilon.mul(directionCoeff);
      const prev = predOriginal.mul(sqrt32(alphaProdTPrev)).add(direction);
      return eta > 0 ? prev.add(randnTensor(modelOutput, options.generator).mul(stdDevT)) : prev;
    });
  }
}
