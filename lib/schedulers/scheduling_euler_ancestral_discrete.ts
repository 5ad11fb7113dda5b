// EulerAncestralDiscreteScheduler (diffusers 0.31 schedulers/scheduling_euler_ancestral_discrete.py):
// k-diffusion's sample_euler_ancestral with eta = 1. Each step goes deterministically from σ_i down to
// σ_down, then adds fresh noise of scale σ_up, where σ_down² + σ_up² = σ_{i+1}². The noise comes from
// randn_tensor(generator), so one seeded generator reproduces diffusers' samples exactly.
import { keep, tidy } from '../scope.js';
import type { Generator } from '../random.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import type { Scheduler } from './scheduler.js';
import {
  alphasCumprodFromConfig, checkBetaConfig, checkOneOf, interpOnIndex, randnTensor, resolveSchedulerConfig,
  sqrt32, type BetaSchedule,
} from './scheduling_ddpm.js';
import {
  addNoiseWithSigmas, eulerInitNoiseSigma, eulerTimesteps, indexForTimestep, scaleBySigma, trainSigmas,
} from './scheduling_euler_discrete.js';

export type EulerAncestralDiscreteSchedulerConfig = {
  num_train_timesteps: number;
  beta_start: number;
  beta_end: number;
  beta_schedule: BetaSchedule;
  trained_betas: number[] | null;
  prediction_type: 'epsilon' | 'v_prediction';
  timestep_spacing: 'linspace' | 'leading' | 'trailing';
  steps_offset: number;
  rescale_betas_zero_snr: boolean;
};

/** EulerAncestralDiscreteScheduler.__init__'s defaults. */
export const EULER_ANCESTRAL_DISCRETE_SCHEDULER_DEFAULTS: Readonly<EulerAncestralDiscreteSchedulerConfig> = Object.freeze({
  num_train_timesteps: 1000,
  beta_start: 0.0001,
  beta_end: 0.02,
  beta_schedule: 'linear',
  trained_betas: null,
  prediction_type: 'epsilon',
  timestep_spacing: 'linspace',
  steps_offset: 0,
  rescale_betas_zero_snr: false,
});

const CLASS = 'EulerAncestralDiscreteScheduler';

export class EulerAncestralDiscreteScheduler implements Scheduler {
  readonly name = 'euler_a';
  readonly className = CLASS;
  readonly order = 1;
  readonly config: Readonly<EulerAncestralDiscreteSchedulerConfig>;
  /** ᾱ_t, float32 [num_train_timesteps] on the CPU. */
  readonly alphasCumprod: Tensor;
  private readonly trainSigmas: Float32Array;
  /** σ of each timestep and a final 0, float32; a kept CPU tensor, replaced by setTimesteps. */
  sigmas: Tensor;
  private sigmaValues: Float32Array;
  private schedule: number[];
  private stepIndex: number | null = null;
  private disposed = false;

  constructor(rawConfig: object = {}, overrides: Record<string, unknown> = {}) {
    const c = resolveSchedulerConfig(CLASS, EULER_ANCESTRAL_DISCRETE_SCHEDULER_DEFAULTS as EulerAncestralDiscreteSchedulerConfig, rawConfig, overrides);
    checkBetaConfig(CLASS, c);
    // diffusers: NotImplementedError("prediction_type not implemented yet: sample")
    checkOneOf(CLASS, c, 'prediction_type', ['epsilon', 'v_prediction']);
    checkOneOf(CLASS, c, 'timestep_spacing', ['linspace', 'leading', 'trailing']);
    this.config = Object.freeze(c);
    this.alphasCumprod = keep(alphasCumprodFromConfig(c, true));
    this.trainSigmas = trainSigmas(this.alphasCumprod.dataSync() as Float32Array);
    const T = c.num_train_timesteps;
    this.schedule = Array.from({ length: T }, (_, i) => T - 1 - i);
    this.sigmaValues = Float32Array.from([...this.trainSigmas].reverse().concat([0]));
    this.sigmas = keep(torch.tensor(this.sigmaValues));
  }

  get numTrainTimesteps(): number { return this.config.num_train_timesteps; }
  get timesteps(): number[] { return this.schedule; }
  get initNoiseSigma(): number { return eulerInitNoiseSigma(this.sigmaValues, this.config.timestep_spacing); }

  setTimesteps(numInferenceSteps: number): void {
    this.checkAlive();
    const c = this.config;
    const timesteps = eulerTimesteps(CLASS, c.timestep_spacing, c.num_train_timesteps, numInferenceSteps, c.steps_offset);
    this.sigmaValues = Float32Array.from([...interpOnIndex(timesteps, this.trainSigmas), 0]);
    this.sigmas.dispose();
    this.sigmas = keep(torch.tensor(this.sigmaValues));
    this.schedule = timesteps;
    this.stepIndex = null;
  }

  private initStepIndex(timestep: number): number {
    this.stepIndex ??= indexForTimestep(CLASS, this.schedule, timestep);
    return this.stepIndex;
  }

  scaleModelInput(sample: Tensor, timestep: number): Tensor {
    this.checkAlive();
    return scaleBySigma(sample, this.sigmaValues[this.initStepIndex(timestep)] as number);
  }

  /** One ancestral Euler step: the ODE step to σ_down, plus σ_up·z with z from randn_tensor(generator). */
  step(modelOutput: Tensor, timestep: number, sample: Tensor, options: { generator?: Generator } = {}): Tensor {
    this.checkAlive();
    const f = Math.fround;
    const i = this.initStepIndex(timestep);
    if (i + 1 >= this.sigmaValues.length) throw new Error(`${CLASS}: step() called after the last timestep; call setTimesteps() to start again`);
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

  addNoise(originalSamples: Tensor, noise: Tensor, timesteps: Tensor): Tensor {
    this.checkAlive();
    return addNoiseWithSigmas(CLASS, this.sigmaValues, this.schedule, originalSamples, noise, timesteps);
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.alphasCumprod.dispose();
    this.sigmas.dispose();
  }
  [Symbol.dispose](): void { this.dispose(); }
  get isDisposed(): boolean { return this.disposed; }

  private checkAlive(): void {
    if (this.disposed) throw new Error(`${CLASS}: used after dispose()`);
  }
}
