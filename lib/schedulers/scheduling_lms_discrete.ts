// LMSDiscreteScheduler (diffusers 0.31 schedulers/scheduling_lms_discrete.py): the linear multistep method
// on the probability-flow ODE in σ (k-diffusion's sample_lms, A1111's "LMS"), of order up to 4: the step
// combines the last derivatives with the integrals over [σ_i, σ_{i+1}] of their Lagrange basis polynomials
// in σ. diffusers integrates those with scipy.integrate.quad; the polynomials have degree ≤ 3, so a 4-point
// Gauss-Legendre rule integrates them exactly (the coefficients agree to float32, in which they are used).
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import { SAMPLER_SUPPORTED, SCHEDULER_DEFAULTS, resolveSchedulerConfig, type PredictionType } from './scheduling_utils.js';
import { SIGMA_SCHEDULE_DEFAULTS, SigmaSchedulerBase, kDiffusionX0, type KDiffusionConfig } from './scheduling_utils_sigmas.js';

export type LMSDiscreteSchedulerConfig = KDiffusionConfig & { prediction_type: PredictionType };

/** LMSDiscreteScheduler.__init__'s defaults. */
export const LMS_DISCRETE_SCHEDULER_DEFAULTS: Readonly<LMSDiscreteSchedulerConfig> = Object.freeze({
  ...SCHEDULER_DEFAULTS,
  ...SIGMA_SCHEDULE_DEFAULTS,
  timestep_spacing: 'linspace',
});

const CLASS = 'LMSDiscreteScheduler';
/** diffusers' default order of step(). */
const ORDER = 4;

const SUPPORTED = SAMPLER_SUPPORTED;

// 4-point Gauss-Legendre nodes and weights on [-1, 1]
const GL_NODES = [-0.8611363115940526, -0.3399810435848563, 0.3399810435848563, 0.8611363115940526];
const GL_WEIGHTS = [0.3478548451374538, 0.6521451548625461, 0.6521451548625461, 0.3478548451374538];

export class LMSDiscreteScheduler extends SigmaSchedulerBase<LMSDiscreteSchedulerConfig> {
  readonly name = 'lms';
  // the last (up to 4) derivatives, oldest first (kept tensors)
  private derivatives: Tensor[] = [];

  constructor(rawConfig: object = {}, overrides: Record<string, unknown> = {}) {
    super(CLASS, resolveSchedulerConfig(CLASS, LMS_DISCRETE_SCHEDULER_DEFAULTS as LMSDiscreteSchedulerConfig, rawConfig, overrides, SUPPORTED),
      'descending');
  }

  /** The k-diffusion σ; timesteps are float64 values with a σ schedule. */
  override setTimesteps(numInferenceSteps: number): void {
    const { timesteps, sigmas } = this.kDiffusionSchedule(numInferenceSteps);
    this.setSchedule(timesteps, sigmas);
    this.resetState();
  }

  /** ∫_{σ_i}^{σ_{i+1}} of the Lagrange basis polynomial of derivative `current` among the last `order` (get_lms_coefficient). */
  private lmsCoefficient(order: number, i: number, current: number): number {
    const s = (k: number): number => this.sigmaValues[k] as number;
    const basis = (tau: number): number => {
      let prod = 1;
      for (let k = 0; k < order; k++) if (k !== current) prod *= (tau - s(i - k)) / (s(i - current) - s(i - k));
      return prod;
    };
    const [a, b] = [s(i), s(i + 1)];
    const half = (b - a) / 2;
    return GL_NODES.reduce((acc, x, j) => acc + (GL_WEIGHTS[j] as number) * basis(a + half * (x + 1)), 0) * half;
  }

  /** One LMS step of order min(i + 1, 4). */
  step(modelOutput: Tensor, timestep: number, sample: Tensor): Tensor {
    const i = this.nextStepIndex(timestep);
    const sigma = this.sigmaValues[i] as number;
    // 1. x̂₀ and the derivative, into the window
    const derivative = keep(tidy(() => sample.sub(kDiffusionX0(this.config.prediction_type, modelOutput, sample, sigma)).div(sigma)));
    this.derivatives.push(derivative);
    if (this.derivatives.length > ORDER) this.derivatives.shift()?.dispose();
    // 2. the linear multistep combination, newest derivative first
    const order = Math.min(i + 1, ORDER);
    const out = tidy(() => {
      const newestFirst = [...this.derivatives].reverse();
      let sum: Tensor | null = null;
      // (zip: fewer derivatives than the order when a rollout starts mid-schedule)
      for (let k = 0; k < Math.min(order, newestFirst.length); k++) {
        const term = (newestFirst[k] as Tensor).mul(Math.fround(this.lmsCoefficient(order, i, k)));
        sum = sum === null ? term : sum.add(term);
      }
      return sample.add(sum as Tensor);
    });
    this.stepIndex = i + 1;
    return out;
  }

  private resetState(): void {
    for (const d of this.derivatives) d.dispose();
    this.derivatives = [];
  }

  protected override releaseState(): void {
    super.releaseState();
    this.resetState();
  }
}
