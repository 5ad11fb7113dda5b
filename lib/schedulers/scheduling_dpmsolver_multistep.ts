// DPMSolverMultistepScheduler (diffusers 0.31 schedulers/scheduling_dpmsolver_multistep.py) as "DPM++ 2M":
// algorithm_type 'dpmsolver++' (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
// Probabilistic Models"), solver_order 1 or 2, solver_type 'midpoint' or 'heun', lower_order_final. The
// solver works on the data prediction x̂₀ and λ = log(α/σ); the last x̂₀ is kept for the second-order step.
//
// Scalars are float32 numbers computed as diffusers' 0-dim float32 tensors (log and exp through torch, so
// they are libm's, not JavaScript's).
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import {
  SAMPLER_BETA_SCHEDULES, SCHEDULER_DEFAULTS, PREDICTION_TYPES, SigmaSchedulerBase, TIMESTEP_SPACINGS, arangeDown, exp32, linspace64, log32,
  resolveSchedulerConfig, roundHalfEven, sqrt32, type BetaScheduleConfig, type PredictionType, type TimestepSpacing,
} from './scheduling_utils.js';

export type DPMSolverMultistepSchedulerConfig = BetaScheduleConfig & {
  solver_order: number;
  prediction_type: PredictionType;
  thresholding: boolean;
  dynamic_thresholding_ratio: number;
  sample_max_value: number;
  algorithm_type: 'dpmsolver++';
  solver_type: 'midpoint' | 'heun';
  lower_order_final: boolean;
  euler_at_final: boolean;
  use_karras_sigmas: boolean;
  use_exponential_sigmas: boolean;
  use_beta_sigmas: boolean;
  use_lu_lambdas: boolean;
  final_sigmas_type: 'zero' | 'sigma_min';
  lambda_min_clipped: number;
  variance_type: string | null;
  timestep_spacing: TimestepSpacing;
  steps_offset: number;
  rescale_betas_zero_snr: boolean;
};

/** DPMSolverMultistepScheduler.__init__'s defaults. */
export const DPMSOLVER_MULTISTEP_SCHEDULER_DEFAULTS: Readonly<DPMSolverMultistepSchedulerConfig> = Object.freeze({
  ...SCHEDULER_DEFAULTS,
  solver_order: 2,
  thresholding: false,
  dynamic_thresholding_ratio: 0.995,
  sample_max_value: 1.0,
  algorithm_type: 'dpmsolver++',
  solver_type: 'midpoint',
  lower_order_final: true,
  euler_at_final: false,
  use_karras_sigmas: false,
  use_exponential_sigmas: false,
  use_beta_sigmas: false,
  use_lu_lambdas: false,
  final_sigmas_type: 'zero',
  lambda_min_clipped: -Infinity,
  variance_type: null,
  timestep_spacing: 'linspace',
  rescale_betas_zero_snr: false,
});

const CLASS = 'DPMSolverMultistepScheduler';

/** What difflora implements of the values diffusers accepts. */
const SUPPORTED = {
  beta_schedule: SAMPLER_BETA_SCHEDULES,
  algorithm_type: ['dpmsolver++'],
  solver_order: [1, 2],
  solver_type: ['midpoint', 'heun'],
  prediction_type: PREDICTION_TYPES,
  thresholding: [false],
  use_karras_sigmas: [false],
  use_exponential_sigmas: [false],
  use_beta_sigmas: [false],
  use_lu_lambdas: [false],
  final_sigmas_type: ['zero', 'sigma_min'],
  variance_type: [null],
  timestep_spacing: TIMESTEP_SPACINGS,
};

/** α_t = 1/sqrt(σ² + 1) and σ_t = σ·α_t of a σ (diffusers' _sigma_to_alpha_sigma_t), float32. */
function alphaSigma(sigma: number): [number, number] {
  const f = Math.fround;
  const alpha = f(1 / sqrt32(f(f(sigma * sigma) + 1)));
  return [alpha, f(sigma * alpha)];
}

/** λ = log α − log σ, float32. */
const lambdaOf = (alpha: number, sigma: number): number => Math.fround(log32(alpha) - log32(sigma));

export class DPMSolverMultistepScheduler extends SigmaSchedulerBase<DPMSolverMultistepSchedulerConfig> {
  readonly name = 'dpmpp_2m';
  /** One past the last timestep whose λ is above lambda_min_clipped (num_train_timesteps without clipping). */
  private readonly lastTimestep: number;
  // the last solver_order data predictions x̂₀ (kept tensors; null before the first steps)
  private modelOutputs: (Tensor | null)[];
  private lowerOrderNums = 0;

  constructor(rawConfig: object = {}, overrides: Record<string, unknown> = {}) {
    super(CLASS, resolveSchedulerConfig(CLASS, DPMSOLVER_MULTISTEP_SCHEDULER_DEFAULTS as DPMSolverMultistepSchedulerConfig, rawConfig, overrides, SUPPORTED),
      'training');
    this.lastTimestep = this.config.num_train_timesteps - this.clippedIndex();
    this.modelOutputs = new Array<Tensor | null>(this.config.solver_order).fill(null);
    if (this.lastTimestep < 1) {
      this.dispose();
      throw new Error(`${CLASS} config: 'lambda_min_clipped' = ${this.config.lambda_min_clipped} is above the log-SNR λ of every training timestep, which leaves no timestep to sample`);
    }
  }

  override get initNoiseSigma(): number { return 1.0; }

  override setTimesteps(numInferenceSteps: number): void {
    this.checkAlive();
    this.checkInferenceSteps(numInferenceSteps);
    const c = this.config;
    const T = c.num_train_timesteps;
    const n = numInferenceSteps;
    // 1. the timesteps, down to the last one whose λ is above lambda_min_clipped
    const last = this.lastTimestep;
    let timesteps: number[];
    if (c.timestep_spacing === 'linspace') {
      timesteps = linspace64(0, last - 1, n + 1).map(roundHalfEven).reverse().slice(0, -1);
    } else if (c.timestep_spacing === 'leading') {
      const ratio = Math.floor(last / (n + 1));
      timesteps = Array.from({ length: n + 1 }, (_, i) => i * ratio).reverse().slice(0, -1).map((t) => t + c.steps_offset);
    } else {
      timesteps = arangeDown(last, 0, -T / n).map((t) => roundHalfEven(t) - 1);
    }
    this.checkInferenceSchedule(timesteps, n);
    this.checkDistinct(timesteps, n);
    // 2. σ at those timesteps (np.interp in float64 at integer points), then the final σ
    this.setSigmaSchedule(timesteps, c.final_sigmas_type);
    this.resetState();
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

  /** index_for_timestep of DPM-Solver: a timestep not in the schedule means the last step (one outside [0, T) is an error). */
  protected override indexFor(t: number): number {
    const T = this.numTrainTimesteps;
    if (!(t >= 0 && t < T)) throw new Error(`${CLASS}: timestep ${t} is outside [0, ${T})`);
    const hits: number[] = [];
    this.schedule.forEach((s, i) => { if (s === t) hits.push(i); });
    return hits.length === 0 ? this.schedule.length - 1 : hits.length > 1 ? (hits[1] as number) : (hits[0] as number);
  }

  override scaleModelInput(sample: Tensor, _timestep: number): Tensor {
    return sample;
  }

  /** One multistep DPM-Solver++ step (first order at the start, and at the end with lower_order_final). */
  step(modelOutput: Tensor, timestep: number, sample: Tensor): Tensor {
    this.checkAlive();
    const c = this.config;
    const i = this.nextStepIndex(timestep);
    const n = this.schedule.length;
    // 1. lower orders for stability at the end of short schedules
    const lowerOrderFinal = i === n - 1 && (c.euler_at_final || (c.lower_order_final && n < 15) || c.final_sigmas_type === 'zero');
    // (diffusers' lower_order_second only lowers third-order steps to second order; solver_order is ≤ 2 here)
    // 2. x̂₀, pushed into the history
    const x0 = keep(tidy(() => this.convertModelOutput(modelOutput, sample, i)));
    this.modelOutputs.shift()?.dispose();
    this.modelOutputs.push(x0);
    // 3. the update, in float32
    const out = tidy(() => {
      const x = sample.to('float32');
      const prev = c.solver_order === 1 || this.lowerOrderNums < 1 || lowerOrderFinal
        ? this.firstOrderUpdate(x0, x, i)
        : this.secondOrderUpdate(x, i);
      return prev.to(modelOutput.dtype);
    });
    if (this.lowerOrderNums < c.solver_order) this.lowerOrderNums += 1;
    this.stepIndex = i + 1;
    return out;
  }

  /** The model output as a data prediction x̂₀ (diffusers' convert_model_output for dpmsolver++). */
  private convertModelOutput(modelOutput: Tensor, sample: Tensor, i: number): Tensor {
    const [alphaT, sigmaT] = alphaSigma(this.sigmaValues[i] as number);
    switch (this.config.prediction_type) {
      case 'epsilon': return sample.sub(modelOutput.mul(sigmaT)).div(alphaT);
      case 'sample': return modelOutput.clone();
      case 'v_prediction': return sample.mul(alphaT).sub(modelOutput.mul(sigmaT));
    }
  }

  /** DPM-Solver++(1), i.e. DDIM: x_t = (σ_t/σ_s)·x − α_t·(e^{−h} − 1)·x̂₀. */
  private firstOrderUpdate(x0: Tensor, sample: Tensor, i: number): Tensor {
    const f = Math.fround;
    const [alphaT, sigmaT] = alphaSigma(this.sigmaValues[i + 1] as number);
    const [alphaS, sigmaS] = alphaSigma(this.sigmaValues[i] as number);
    const h = f(lambdaOf(alphaT, sigmaT) - lambdaOf(alphaS, sigmaS));
    return sample.mul(f(sigmaT / sigmaS)).sub(x0.mul(f(alphaT * f(exp32(-h) - 1))));
  }

  /** Multistep DPM-Solver++(2M) from the last two x̂₀. */
  private secondOrderUpdate(sample: Tensor, i: number): Tensor {
    const f = Math.fround;
    const [alphaT, sigmaT] = alphaSigma(this.sigmaValues[i + 1] as number);
    const [alphaS0, sigmaS0] = alphaSigma(this.sigmaValues[i] as number);
    const [alphaS1, sigmaS1] = alphaSigma(this.sigmaValues[i - 1] as number);
    const lambdaT = lambdaOf(alphaT, sigmaT);
    const lambdaS0 = lambdaOf(alphaS0, sigmaS0);
    const lambdaS1 = lambdaOf(alphaS1, sigmaS1);
    const m0 = this.modelOutputs[this.modelOutputs.length - 1] as Tensor;
    const m1 = this.modelOutputs[this.modelOutputs.length - 2] as Tensor;
    const h = f(lambdaT - lambdaS0);
    const h0 = f(lambdaS0 - lambdaS1);
    const r0 = f(h0 / h);
    // D1 = (1/r0)·(m0 − m1); Python's 1.0 / tensor is reciprocal() · 1.0
    const d1 = m0.sub(m1).mul(f(1 / r0));
    const expm1 = f(exp32(-h) - 1);
    const coeff = f(alphaT * expm1);
    const base = sample.mul(f(sigmaT / sigmaS0)).sub(m0.mul(coeff));
    if (this.config.solver_type === 'midpoint') return base.sub(d1.mul(f(0.5 * coeff)));
    return base.add(d1.mul(f(alphaT * f(f(expm1 / h) + 1))));
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

  private resetState(): void {
    for (const t of this.modelOutputs) t?.dispose();
    this.modelOutputs = new Array<Tensor | null>(this.config.solver_order).fill(null);
    this.lowerOrderNums = 0;
    this.stepIndex = null;
  }

  protected override releaseState(): void {
    super.releaseState();
    this.resetState();
  }
}
