// DDPMScheduler (diffusers 0.31 schedulers/scheduling_ddpm.py): the noise schedule built from a pipeline's
// scheduler/scheduler_config.json, the two things a training step asks of it, add_noise (the forward process
// q(x_t | x_0), from SchedulerBase) and get_velocity (the v-prediction target), and ancestral sampling
// (set_timesteps/step). compute_snr, which Min-SNR loss weighting needs, is in lib/training/training_utils.ts
// as diffusers keeps it in training_utils.
import { resolvePretrained, type HubOptions } from '../io/hub.js';
import { randnTensor, type Generator } from '../random.js';
import { tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import {
  SCHEDULER_DEFAULTS, BETA_SCHEDULES, PREDICTION_TYPES, SAMPLE_CLIPPING_DEFAULTS, SchedulerBase, TIMESTEP_SPACINGS, checkOneOf, exp32, log32,
  namingFile, readSchedulerConfig, resolveSchedulerConfig, sqrt32, timestepNotFound, unknownConfigKeys,
  type BetaScheduleConfig, type PredictionType, type SampleClippingConfig, type TimestepSpacing,
} from './scheduling_utils.js';

export type { BetaSchedule, PredictionType } from './scheduling_utils.js';

/** scheduler_config.json of a DDPMScheduler: diffusers 0.31's __init__ arguments, same names. */
export type DDPMSchedulerConfig = BetaScheduleConfig & SampleClippingConfig & {
  variance_type: string;
  prediction_type: PredictionType;
  timestep_spacing: TimestepSpacing;
  steps_offset: number;
  rescale_betas_zero_snr: boolean;
};

/** diffusers' defaults (DDPMScheduler.__init__), used for fields a config leaves out. */
export const DDPM_SCHEDULER_DEFAULTS: Readonly<DDPMSchedulerConfig> = Object.freeze({
  ...SCHEDULER_DEFAULTS,
  ...SAMPLE_CLIPPING_DEFAULTS,
  variance_type: 'fixed_small',
  timestep_spacing: 'leading',
  rescale_betas_zero_snr: false,
});

const CLASS = 'DDPMScheduler';

// Training takes every value diffusers knows; sampling (checkSamplingConfig) refuses what difflora does not implement.
const TRAINING_VALUES = {
  beta_schedule: BETA_SCHEDULES,
  prediction_type: PREDICTION_TYPES,
  timestep_spacing: TIMESTEP_SPACINGS,
  variance_type: ['fixed_small', 'fixed_small_log', 'fixed_large', 'fixed_large_log', 'learned', 'learned_range'],
};
const SAMPLING_VALUES = {
  thresholding: [false],
  variance_type: ['fixed_small', 'fixed_small_log', 'fixed_large'],
};

export interface ParsedDDPMSchedulerConfig {
  config: DDPMSchedulerConfig;
  /**
   * Keys of the JSON that DDPMScheduler does not take (e.g. PNDM's skip_prk_steps in SD 1.x's
   * scheduler_config.json). diffusers ignores them the same way; `_class_name` and other `_` keys are
   * not listed.
   */
  ignoredKeys: string[];
}

/**
 * Fills diffusers' defaults, applies overrides (as `DDPMScheduler.from_config(config, **overrides)`), and
 * refuses values out of their domain or unknown to diffusers. Values only sampling cannot run are refused by
 * checkSamplingConfig.
 */
export function parseDDPMSchedulerConfig(raw: object, overrides: Partial<DDPMSchedulerConfig> = {}): ParsedDDPMSchedulerConfig {
  const config = resolveSchedulerConfig(CLASS, DDPM_SCHEDULER_DEFAULTS as DDPMSchedulerConfig, raw, overrides, TRAINING_VALUES);
  return { config, ignoredKeys: unknownConfigKeys(DDPM_SCHEDULER_DEFAULTS, raw, overrides) };
}

export class DDPMScheduler extends SchedulerBase<DDPMSchedulerConfig> {
  readonly name = 'ddpm';
  /** Keys of the config JSON this scheduler does not use (see parseDDPMSchedulerConfig). */
  readonly ignoredKeys: readonly string[];
  // sampling: the schedule and set_timesteps' step count
  private schedule: number[] | null = null;
  private numInferenceSteps: number | null = null;

  constructor(config: Partial<DDPMSchedulerConfig> | Record<string, unknown> = {}, overrides: Partial<DDPMSchedulerConfig> = {}) {
    const parsed = parseDDPMSchedulerConfig(config, overrides);
    super(CLASS, parsed.config);
    this.ignoredKeys = Object.freeze(parsed.ignoredKeys);
  }

  /** `DDPMScheduler.from_config(json, **overrides)`: e.g. overrides `{ prediction_type: 'v_prediction' }`. */
  static fromConfig(config: object, overrides: Partial<DDPMSchedulerConfig> = {}): DDPMScheduler {
    return new DDPMScheduler(config as Record<string, unknown>, overrides);
  }

  /**
   * From a diffusers folder: `fromPretrained('path/to/sd', { subfolder: 'scheduler' })` (or a scheduler
   * folder itself, or a cached hub id) reads scheduler_config.json; errors name that file.
   */
  static fromPretrained(pathOrId: string, o: Pick<HubOptions, 'subfolder' | 'revision' | 'cacheDir'> = {}, overrides: Partial<DDPMSchedulerConfig> = {}): DDPMScheduler {
    const { path, config } = readSchedulerConfig(resolvePretrained(pathOrId, o));
    const scheduler = namingFile(path, () => DDPMScheduler.fromConfig(config, overrides));
    scheduler.configPath = path;
    return scheduler;
  }

  get predictionType(): PredictionType { return this.config.prediction_type; }

  /** The v-prediction target (Salimans & Ho 2022): sqrt(ᾱ_t)·noise − sqrt(1 − ᾱ_t)·sample. */
  getVelocity(sample: Tensor, noise: Tensor, timesteps: Tensor): Tensor {
    return tidy(() => {
      const [sqrtAlphaProd, sqrtOneMinusAlphaProd] = this.coefficients(sample, timesteps);
      return sqrtAlphaProd.mul(noise).sub(sqrtOneMinusAlphaProd.mul(sample));
    });
  }

  // ---- sampling (diffusers' set_timesteps / step, variance_type fixed_small[_log] / fixed_large)

  /** Refuses the config values sampling does not implement (training ignores them); the factory calls it. */
  checkSamplingConfig(): void {
    for (const [field, allowed] of Object.entries(SAMPLING_VALUES)) checkOneOf(CLASS, this.config as unknown as Record<string, unknown>, field, allowed);
  }

  /** After setTimesteps the sampling schedule; before it, every training timestep (T − 1 … 0) as diffusers. */
  get timesteps(): number[] {
    this.schedule ??= Array.from({ length: this.config.num_train_timesteps }, (_, i) => this.config.num_train_timesteps - 1 - i);
    return this.schedule;
  }

  setTimesteps(numInferenceSteps: number): void {
    this.checkAlive();
    this.checkSamplingConfig();
    this.schedule = this.spacedSchedule(numInferenceSteps);
    this.numInferenceSteps = numInferenceSteps;
  }

  /** The timestep after t: the next in the schedule (−1 after the last), or t − 1 without setTimesteps. */
  private previousTimestep(t: number): number {
    if (this.numInferenceSteps === null) return t - 1;
    const ts = this.timesteps;
    const i = ts.indexOf(t);
    if (i < 0) return timestepNotFound(CLASS, t, ts);
    return i === ts.length - 1 ? -1 : (ts[i + 1] as number);
  }

  /**
   * One ancestral step: x₀ from the model output, the posterior mean μ̃(x_t, x₀), plus σ_t·z for t > 0 (z
   * from randn_tensor with `generator`). Coefficients in float32 as diffusers' 0-dim tensors.
   */
  step(modelOutput: Tensor, timestep: number, sample: Tensor, options: { generator?: Generator } = {}): Tensor {
    this.checkAlive();
    this.checkSamplingConfig();
    this.checkTimestep(timestep);
    const c = this.config;
    const t = timestep;
    const prevT = this.previousTimestep(t);
    const f = Math.fround;
    // 1. alphas, betas
    const alphaProdT = this.acp[t] as number;
    const alphaProdTPrev = prevT >= 0 ? (this.acp[prevT] as number) : 1;
    const betaProdT = f(1 - alphaProdT);
    const betaProdTPrev = f(1 - alphaProdTPrev);
    const currentAlphaT = f(alphaProdT / alphaProdTPrev);
    const currentBetaT = f(1 - currentAlphaT);
    // 2.–6. on the sample, in a scope
    return tidy(() => {
      // 2. predicted x₀
      let predOriginal: Tensor;
      if (c.prediction_type === 'epsilon') predOriginal = sample.sub(modelOutput.mul(sqrt32(betaProdT))).div(sqrt32(alphaProdT));
      else if (c.prediction_type === 'sample') predOriginal = modelOutput;
      else predOriginal = sample.mul(sqrt32(alphaProdT)).sub(modelOutput.mul(sqrt32(betaProdT)));
      // 3. clip
      if (c.clip_sample) predOriginal = predOriginal.clamp(-c.clip_sample_range, c.clip_sample_range);
      // 4. coefficients of x₀ and x_t in μ̃ (formula (7) of the DDPM paper)
      const predOriginalCoeff = f(f(sqrt32(alphaProdTPrev) * currentBetaT) / betaProdT);
      const currentSampleCoeff = f(f(sqrt32(currentAlphaT) * betaProdTPrev) / betaProdT);
      // 5. μ̃
      const predPrev = predOriginal.mul(predOriginalCoeff).add(sample.mul(currentSampleCoeff));
      // 6. noise
      if (t <= 0) return predPrev;
      const noise = randnTensor(modelOutput, options.generator);
      let variance = Math.max(f(f(betaProdTPrev / betaProdT) * currentBetaT), f(1e-20));
      if (c.variance_type === 'fixed_small_log') return predPrev.add(noise.mul(exp32(f(0.5 * log32(variance)))));
      if (c.variance_type === 'fixed_large') variance = currentBetaT;
      return predPrev.add(noise.mul(sqrt32(variance)));
    });
  }
}
