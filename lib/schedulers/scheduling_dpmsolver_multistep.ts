// DPMSolverMultistepScheduler (diffusers 0.31 schedulers/scheduling_dpmsolver_multistep.py): multistep
// DPM-Solver (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in
// Around 10 Steps", algorithm_type 'dpmsolver', on the noise prediction) and DPM-Solver++ ("DPM-Solver++:
// Fast Solver for Guided Sampling of Diffusion Probabilistic Models", 'dpmsolver++', on the data prediction
// x̂₀), orders 1 to 3, and their SDE variants ('sde-dpmsolver', 'sde-dpmsolver++': A1111's "DPM++ 2M SDE"),
// which add noise drawn with the step's generator. The solver works in λ = log(α/σ) and keeps the last
// solver_order converted model outputs. Karras σ and Lu's uniform-λ schedule as diffusers.
//
// Scalars are float32 numbers computed as diffusers' 0-dim float32 tensors (log and exp through torch, so
// they are libm's, not JavaScript's).
import { randnTensor } from '../random.js';
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import {
  SAMPLER_BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS, configError, exp32, resolveSchedulerConfig, roundHalfEven, type StepOptions, type TimestepSpacing,
} from './scheduling_utils.js';
import {
  DPM_SOLVER_END_DEFAULTS, SIGMA_SCHEDULE_DEFAULTS, SOLVER_DEFAULTS, SolverSchedulerBase, dpmConvertModelOutput, dpmFirstOrder, dpmSecondOrder, exp64,
  luLambdas, mapDPMSolverAliases, sigmaToT, solverPoint, type DPMSolverAlgorithmType, type DPMSolverEndConfig, type SolverConfig, type SolverPoint,
} from './scheduling_utils_sigmas.js';

export type DPMSolverAlgorithm = DPMSolverAlgorithmType;

export type DPMSolverMultistepSchedulerConfig = SolverConfig & DPMSolverEndConfig & {
  algorithm_type: DPMSolverAlgorithm;
  solver_type: 'midpoint' | 'heun';
  euler_at_final: boolean;
  use_lu_lambdas: boolean;
  timestep_spacing: TimestepSpacing;
  steps_offset: number;
  rescale_betas_zero_snr: boolean;
};

/** DPMSolverMultistepScheduler.__init__'s defaults. */
export const DPMSOLVER_MULTISTEP_SCHEDULER_DEFAULTS: Readonly<DPMSolverMultistepSchedulerConfig> = Object.freeze({
  ...SOLVER_DEFAULTS,
  algorithm_type: 'dpmsolver++',
  solver_type: 'midpoint',
  lower_order_final: true,
  euler_at_final: false,
  ...SIGMA_SCHEDULE_DEFAULTS,
  use_lu_lambdas: false,
  ...DPM_SOLVER_END_DEFAULTS,
  timestep_spacing: 'linspace',
  rescale_betas_zero_snr: false,
});

const CLASS = 'DPMSolverMultistepScheduler';

/** What difflora implements of the values diffusers accepts ('deis', 'logrho', 'bh1', 'bh2' are mapped first, as diffusers does). */
const SUPPORTED = {
  beta_schedule: SAMPLER_BETA_SCHEDULES,
  algorithm_type: ['dpmsolver++', 'sde-dpmsolver++', 'dpmsolver', 'sde-dpmsolver', 'deis'],
  solver_type: ['midpoint', 'heun', 'logrho', 'bh1', 'bh2'],
  prediction_type: PREDICTION_TYPES,
  final_sigmas_type: ['zero', 'sigma_min'],
  variance_type: [null],
  timestep_spacing: TIMESTEP_SPACINGS,
};

/**
 * The config as diffusers' __init__ leaves it: algorithm_type 'deis' becomes 'dpmsolver++' and solver_type
 * 'logrho', 'bh1' or 'bh2' becomes 'midpoint' (the noise-prediction algorithms need final_sigmas_type
 * 'sigma_min', checked on the value given, as diffusers). Third order has no SDE variant (diffusers fails at
 * the first third-order step): refused here.
 */
function resolveConfig(rawConfig: object, overrides: Record<string, unknown>): DPMSolverMultistepSchedulerConfig {
  const c = resolveSchedulerConfig(CLASS, DPMSOLVER_MULTISTEP_SCHEDULER_DEFAULTS as DPMSolverMultistepSchedulerConfig, rawConfig, overrides, SUPPORTED);
  if (!Number.isInteger(c.solver_order) || c.solver_order < 1 || c.solver_order > 4) configError(CLASS, 'solver_order', c.solver_order, 'must be 1, 2 or 3 (4 runs as 3, as in diffusers)');
  const algorithm = c.algorithm_type as string;
  if (algorithm !== 'dpmsolver++' && algorithm !== 'sde-dpmsolver++' && c.final_sigmas_type === 'zero') {
    configError(CLASS, 'final_sigmas_type', 'zero', `is not supported with algorithm_type '${algorithm}'; use final_sigmas_type 'sigma_min'`);
  }
  mapDPMSolverAliases(c);
  if (c.solver_order >= 3 && c.algorithm_type.startsWith('sde-')) {
    configError(CLASS, 'solver_order', c.solver_order, `has no third-order update for algorithm_type '${c.algorithm_type}' (diffusers fails at the first third-order step); use solver_order 2`);
  }
  return c;
}

/** The history (SolverSchedulerBase's) holds the last solver_order converted model outputs (x̂₀ or ε̂). */
export class DPMSolverMultistepScheduler extends SolverSchedulerBase<DPMSolverMultistepSchedulerConfig> {
  readonly name = 'dpmpp_2m';
  /** One past the last timestep whose λ is above lambda_min_clipped (num_train_timesteps without clipping). */
  private readonly lastTimestep: number;

  constructor(rawConfig: object = {}, overrides: Record<string, unknown> = {}) {
    super(CLASS, resolveConfig(rawConfig, overrides));
    this.lastTimestep = this.config.num_train_timesteps - this.clippedIndex();
    if (this.lastTimestep < 1) {
      this.dispose();
      throw new Error(`${CLASS} config: 'lambda_min_clipped' = ${this.config.lambda_min_clipped} is above the log-SNR λ of every training timestep, which leaves no timestep to sample`);
    }
  }

  override setTimesteps(numInferenceSteps: number): void {
    const c = this.config;
    const n = numInferenceSteps;
    // 1. the timesteps, down to the last one whose λ is above lambda_min_clipped, and their σ
    let { timesteps, sigmas } = this.solverSchedule(n, this.lastTimestep);
    // 2. Karras or Lu's λ schedule replace both; then the final σ
    if (this.sigmaSchedule === 'spaced' && c.use_lu_lambdas) {
      const T = this.trainSigmas.length;
      sigmas = luLambdas(this.logSigmas[0] as number, this.logSigmas[T - 1] as number, n).map(exp64);
      timesteps = sigmas.map((s) => roundHalfEven(sigmaToT(s, this.logSigmas, 'float64')));
    } else if (this.sigmaSchedule === 'spaced') {
      this.checkDistinct(timesteps, n);
    }
    this.setSolverSchedule(timesteps, [...sigmas, this.finalSigma()]);
  }

  /**
   * Too many steps for the usable timesteps repeat some (diffusers does too); two equal σ in a row make the
   * second-order update divide by a zero step h and return inf.
   */
  private checkDistinct(timesteps: readonly number[], n: number): void {
    if (timesteps.every((t, i) => i === 0 || t < (timesteps[i - 1] as number))) return;
    const clip = this.config.lambda_min_clipped === -Infinity ? '' : ` (lambda_min_clipped ${this.config.lambda_min_clipped} leaves ${this.lastTimestep})`;
    this.configFault(`${CLASS}: ${n} inference steps with timestep_spacing '${this.config.timestep_spacing}' repeat timesteps over the ${this.lastTimestep} usable training timesteps${clip}; use fewer steps`);
  }

  /** torch.searchsorted(flip(λ_t), lambda_min_clipped): how many training λ lie below the clip. */
  private clippedIndex(): number {
    const clip = this.config.lambda_min_clipped;
    if (clip === -Infinity) return 0;
    const lambdas = tidy(() => {
      const alphaT = this.alphasCumprod.sqrt();
      const sigmaT = this.alphasCumprod.neg().add(1).sqrt();
      return alphaT.log().sub(sigmaT.log()).dataSync() as Float32Array;
    });
    return lambdas.reduce((k, l) => (l < clip ? k + 1 : k), 0);
  }

  /**
   * One multistep step: first order at the start (and at the end: lower_order_final with fewer than 15
   * steps, euler_at_final, or a final σ of 0), second order next, third order from then on with
   * solver_order 3 (second order before the end with lower_order_final).
   */
  step(modelOutput: Tensor, timestep: number, sample: Tensor, options: StepOptions = {}): Tensor {
    const c = this.config;
    const i = this.nextStepIndex(timestep);
    const n = this.schedule.length;
    // 1. lower orders for stability at the end of short schedules
    const lowerOrderFinal = i === n - 1 && (c.euler_at_final || (c.lower_order_final && n < 15) || c.final_sigmas_type === 'zero');
    const lowerOrderSecond = i === n - 2 && c.lower_order_final && n < 15;
    // 2. the converted model output, pushed into the history
    const converted = keep(tidy(() => dpmConvertModelOutput(this.config, modelOutput, sample, this.sigmaValues[i] as number)));
    this.pushModelOutput(converted);
    // 3. the update, in float32
    const out = tidy(() => {
      const x = sample.to('float32');
      const noise = c.algorithm_type.startsWith('sde-') ? randnTensor(modelOutput.to('float32'), options.generator) : null;
      let prev: Tensor;
      if (c.solver_order === 1 || this.lowerOrderNums < 1 || lowerOrderFinal) prev = this.firstOrderUpdate(x, i, noise);
      else if (c.solver_order === 2 || this.lowerOrderNums < 2 || lowerOrderSecond) prev = this.secondOrderUpdate(x, i, noise);
      else prev = this.thirdOrderUpdate(x, i);
      return prev.to(modelOutput.dtype);
    });
    this.endMultistep(i);
    return out;
  }


  /** α, σ and λ at the schedule's σ_i. */
  private at(i: number): SolverPoint {
    return solverPoint(this.sigmaValues[i] as number);
  }

  /** The last k converted outputs, newest first. */
  private history(k: number): Tensor[] {
    return Array.from({ length: k }, (_, j) => this.previousOutput(j));
  }

  /** First order (DPM-Solver-1 = DDIM for the ODE; its SDE counterparts with noise). */
  private firstOrderUpdate(x: Tensor, i: number, noise: Tensor | null): Tensor {
    return dpmFirstOrder(this.config.algorithm_type, x, this.at(i + 1), this.at(i), this.history(1)[0] as Tensor, noise);
  }

  /** Multistep second order from the last two converted outputs: D0 = m0, D1 = (m0 − m1)/r0, from σ_i. */
  private secondOrderUpdate(x: Tensor, i: number, noise: Tensor | null): Tensor {
    const f = Math.fround;
    const t = this.at(i + 1);
    const s0 = this.at(i);
    const s1 = this.at(i - 1);
    const [m0, m1] = this.history(2) as [Tensor, Tensor];
    const h = f(t.lambda - s0.lambda);
    const r0 = f(f(s0.lambda - s1.lambda) / h);
    const d1 = m0.sub(m1).mul(f(1 / r0));
    return dpmSecondOrder(this.config.algorithm_type, this.config.solver_type, x, t, s0, m0, d1, h, noise);
  }

  /** Multistep third order from the last three converted outputs (the ODE algorithms only). */
  private thirdOrderUpdate(x: Tensor, i: number): Tensor {
    const f = Math.fround;
    const t = this.at(i + 1);
    const s0 = this.at(i);
    const s1 = this.at(i - 1);
    const s2 = this.at(i - 2);
    const [m0, m1, m2] = this.history(3) as [Tensor, Tensor, Tensor];
    const h = f(t.lambda - s0.lambda);
    const r0 = f(f(s0.lambda - s1.lambda) / h);
    const r1 = f(f(s1.lambda - s2.lambda) / h);
    const d10 = m0.sub(m1).mul(f(1 / r0));
    const d11 = m1.sub(m2).mul(f(1 / r1));
    const d1 = d10.add(d10.sub(d11).mul(f(r0 / f(r0 + r1))));
    const d2 = d10.sub(d11).mul(f(1 / f(r0 + r1)));
    const h2 = f(h * h);
    if (this.config.algorithm_type === 'dpmsolver++') {
      const em1 = f(exp32(-h) - 1);
      return x.mul(f(t.sigma / s0.sigma)).sub(m0.mul(f(t.alpha * em1)))
        .add(d1.mul(f(t.alpha * f(f(em1 / h) + 1))))
        .sub(d2.mul(f(t.alpha * f(f(f(em1 + h) / h2) - 0.5))));
    }
    const em1 = f(exp32(h) - 1);
    return x.mul(f(t.alpha / s0.alpha)).sub(m0.mul(f(t.sigma * em1)))
      .sub(d1.mul(f(t.sigma * f(f(em1 / h) - 1))))
      .sub(d2.mul(f(t.sigma * f(f(f(em1 - h) / h2) - 0.5))));
  }

  /** add_noise: α_t·x₀ + σ_t·noise with σ looked up per batch item (the last σ for unknown timesteps). */
  override addNoise(originalSamples: Tensor, noise: Tensor, timesteps: Tensor): Tensor {
    return tidy(() => {
      const sigma = this.sigmasAt(timesteps, originalSamples);
      // α_t = 1/sqrt(σ² + 1), σ_t = σ·α_t, computed on the tensor as diffusers
      const alphaT = sigma.pow(2).add(1).pow(0.5).reciprocal();
      const sigmaT = sigma.mul(alphaT);
      return alphaT.mul(originalSamples).add(sigmaT.mul(noise));
    });
  }
}
