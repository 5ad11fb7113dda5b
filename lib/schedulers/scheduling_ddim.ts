// DDIMScheduler (diffusers 0.31 schedulers/scheduling_ddim.py): the deterministic sampler of Song et al.
// 2021, "Denoising Diffusion Implicit Models", with eta = 0 (formula (12) without the noise term). Coefficients
// are float32 numbers computed as diffusers' 0-dim float32 tensors.
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import type { Scheduler } from './scheduler.js';
import {
  addNoiseWithAlphasCumprod, alphasCumprodFromConfig, checkBetaConfig, checkOneOf, needTimesteps,
  resolveSchedulerConfig, spacedTimesteps, sqrt32, type BetaSchedule, type PredictionType,
} from './scheduling_ddpm.js';

export type DDIMSchedulerConfig = {
  num_train_timesteps: number;
  beta_start: number;
  beta_end: number;
  beta_schedule: BetaSchedule;
  trained_betas: number[] | null;
  clip_sample: boolean;
  set_alpha_to_one: boolean;
  steps_offset: number;
  prediction_type: PredictionType;
  thresholding: boolean;
  dynamic_thresholding_ratio: number;
  clip_sample_range: number;
  sample_max_value: number;
  timestep_spacing: 'linspace' | 'leading' | 'trailing';
  rescale_betas_zero_snr: boolean;
};

/** DDIMScheduler.__init__'s defaults. */
export const DDIM_SCHEDULER_DEFAULTS: Readonly<DDIMSchedulerConfig> = Object.freeze({
  num_train_timesteps: 1000,
  beta_start: 0.0001,
  beta_end: 0.02,
  beta_schedule: 'linear',
  trained_betas: null,
  clip_sample: true,
  set_alpha_to_one: true,
  steps_offset: 0,
  prediction_type: 'epsilon',
  thresholding: false,
  dynamic_thresholding_ratio: 0.995,
  clip_sample_range: 1.0,
  sample_max_value: 1.0,
  timestep_spacing: 'leading',
  rescale_betas_zero_snr: false,
});

const CLASS = 'DDIMScheduler';

export class DDIMScheduler implements Scheduler {
  readonly name = 'ddim';
  readonly className = CLASS;
  readonly order = 1;
  readonly initNoiseSigma = 1.0;
  readonly config: Readonly<DDIMSchedulerConfig>;
  /** ᾱ_t, float32 [num_train_timesteps] on the CPU. */
  readonly alphasCumprod: Tensor;
  private readonly acp: Float32Array;
  /** ᾱ after the last step: 1 with set_alpha_to_one, else ᾱ_0. */
  private readonly finalAlphaCumprod: number;
  private schedule: number[];
  private numInferenceSteps: number | null = null;
  private disposed = false;

  constructor(rawConfig: object = {}, overrides: Record<string, unknown> = {}) {
    const c = resolveSchedulerConfig(CLASS, DDIM_SCHEDULER_DEFAULTS as DDIMSchedulerConfig, rawConfig, overrides);
    checkBetaConfig(CLASS, c);
    checkOneOf(CLASS, c, 'prediction_type', ['epsilon', 'v_prediction', 'sample']);
    checkOneOf(CLASS, c, 'thresholding', [false]);
    checkOneOf(CLASS, c, 'timestep_spacing', ['linspace', 'leading', 'trailing']);
    this.config = Object.freeze(c);
    this.alphasCumprod = keep(alphasCumprodFromConfig(c));
    this.acp = this.alphasCumprod.dataSync() as Float32Array;
    this.finalAlphaCumprod = c.set_alpha_to_one ? 1 : (this.acp[0] as number);
    this.schedule = Array.from({ length: c.num_train_timesteps }, (_, i) => c.num_train_timesteps - 1 - i);
  }

  get numTrainTimesteps(): number { return this.config.num_train_timesteps; }
  get timesteps(): number[] { return this.schedule; }

  setTimesteps(numInferenceSteps: number): void {
    this.checkAlive();
    const c = this.config;
    this.schedule = spacedTimesteps(CLASS, c.timestep_spacing, c.num_train_timesteps, numInferenceSteps, c.steps_offset);
    this.numInferenceSteps = numInferenceSteps;
  }

  scaleModelInput(sample: Tensor, _timestep: number): Tensor {
    return sample;
  }

  /** One DDIM step with eta = 0: x_{t−δ} = sqrt(ᾱ_{t−δ})·x̂₀ + sqrt(1 − ᾱ_{t−δ})·ε̂. */
  step(modelOutput: Tensor, timestep: number, sample: Tensor): Tensor {
    this.checkAlive();
    if (this.numInferenceSteps === null) return needTimesteps(CLASS);
    const c = this.config;
    const f = Math.fround;
    // 1. the previous timestep
    const prevT = timestep - Math.floor(c.num_train_timesteps / this.numInferenceSteps);
    // 2. alphas, betas
    const alphaProdT = this.acp[timestep];
    if (alphaProdT === undefined || !Number.isInteger(timestep)) throw new Error(`${CLASS}: timestep must be an integer in [0, ${c.num_train_timesteps}), got ${timestep}`);
    const alphaProdTPrev = prevT >= 0 ? (this.acp[prevT] as number) : this.finalAlphaCumprod;
    const betaProdT = f(1 - alphaProdT);
    // 5. the variance σ_t (eta = 0 makes it 0, kept to follow diffusers' arithmetic)
    const variance = f(f(f(1 - alphaProdTPrev) / betaProdT) * f(1 - f(alphaProdT / alphaProdTPrev)));
    const stdDevT = f(0 * sqrt32(variance));
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
      return predOriginal.mul(sqrt32(alphaProdTPrev)).add(direction);
    });
  }

  addNoise(originalSamples: Tensor, noise: Tensor, timesteps: Tensor): Tensor {
    this.checkAlive();
    return addNoiseWithAlphasCumprod(this.alphasCumprod, originalSamples, noise, timesteps);
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.alphasCumprod.dispose();
  }
  [Symbol.dispose](): void { this.dispose(); }
  get isDisposed(): boolean { return this.disposed; }

  private checkAlive(): void {
    if (this.disposed) throw new Error(`${CLASS}: used after dispose()`);
  }
}
