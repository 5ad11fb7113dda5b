// DEISMultistepScheduler (diffusers 0.31 schedulers/scheduling_deis_multistep.py): the diffusion exponential
// integrator sampler of Zhang & Chen 2023 ("Fast Sampling of Diffusion Models with Exponential Integrator"),
// 'logrho' form, orders 1 to 3: a multistep method on the noise prediction whose coefficients integrate the
// Lagrange polynomials through the last ε̂ in ρ = σ_t/α_t exactly. Its last σ is the training σ_min (no
// final_sigmas_type: diffusers appends σ_min, or the last Karras σ again).
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import {
  SAMPLER_BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS, configError, resolveSchedulerConfig, type TimestepSpacing,
} from './scheduling_utils.js';
import {
  SIGMA_SCHEDULE_DEFAULTS, SOLVER_DEFAULTS, SolverSchedulerBase, alphaSigma, dpmFirstOrder, log64, solverPoint, solverX0, thresholdSample, type SolverConfig,
} from './scheduling_utils_sigmas.js';

export type DEISMultistepSchedulerConfig = SolverConfig & {
  algorithm_type: 'deis';
  solver_type: 'logrho';
  timestep_spacing: TimestepSpacing;
  steps_offset: number;
};

/** DEISMultistepScheduler.__init__'s defaults. */
export const DEIS_MULTISTEP_SCHEDULER_DEFAULTS: Readonly<DEISMultistepSchedulerConfig> = Object.freeze({
  ...SOLVER_DEFAULTS,
  algorithm_type: 'deis',
  solver_type: 'logrho',
  lower_order_final: true,
  ...SIGMA_SCHEDULE_DEFAULTS,
  timestep_spacing: 'linspace',
});

const CLASS = 'DEISMultistepScheduler';

/** What difflora implements of the values diffusers accepts (which maps the DPM-Solver names to 'deis' and 'logrho'). */
const SUPPORTED = {
  beta_schedule: SAMPLER_BETA_SCHEDULES,
  prediction_type: PREDICTION_TYPES,
  algorithm_type: ['deis', 'dpmsolver', 'dpmsolver++'],
  solver_type: ['logrho', 'midpoint', 'heun', 'bh1', 'bh2'],
  solver_order: [1, 2, 3],
  timestep_spacing: TIMESTEP_SPACINGS,
};

function resolveConfig(rawConfig: object, overrides: Record<string, unknown>): DEISMultistepSchedulerConfig {
  const c = resolveSchedulerConfig(CLASS, DEIS_MULTISTEP_SCHEDULER_DEFAULTS as DEISMultistepSchedulerConfig, rawConfig, overrides, SUPPORTED);
  if (!Number.isInteger(c.solver_order)) configError(CLASS, 'solver_order', c.solver_order, 'must be 1, 2 or 3');
  return { ...c, algorithm_type: 'deis', solver_type: 'logrho' };
}

/** float32 log as numpy computes np.log of a 0-dim float32 tensor. */
const lnf = (x: number): number => Math.fround(log64(x));

/** The history (SolverSchedulerBase's) holds the last solver_order ε̂. */
export class DEISMultistepScheduler extends SolverSchedulerBase<DEISMultistepSchedulerConfig> {
  readonly name = 'deis';

  constructor(rawConfig: object = {}, overrides: Record<string, unknown> = {}) {
    super(CLASS, resolveConfig(rawConfig, overrides));
  }

  override setTimesteps(numInferenceSteps: number): void {
    const { timesteps, sigmas } = this.solverSchedule(numInferenceSteps);
    const last = this.sigmaSchedule === 'karras' ? (sigmas[sigmas.length - 1] as number) : (this.trainSigmas[0] as number);
    this.setSolverSchedule(timesteps, [...sigmas, last]);
  }

  step(modelOutput: Tensor, timestep: number, sample: Tensor): Tensor {
    const c = this.config;
    const i = this.nextStepIndex(timestep);
    const n = this.schedule.length;
    const lowerOrderFinal = i === n - 1 && c.lower_order_final && n < 15;
    const lowerOrderSecond = i === n - 2 && c.lower_order_final && n < 15;
    // 1. ε̂ through x̂₀ (thresholded when configured)
    const eps = keep(tidy(() => {
      const [alphaT, sigmaT] = alphaSigma(this.sigmaValues[i] as number);
      let x0 = solverX0(c.prediction_type, modelOutput, sample, this.sigmaValues[i] as number);
      if (c.thresholding) x0 = thresholdSample(x0, c.dynamic_thresholding_ratio, c.sample_max_value);
      return sample.sub(x0.mul(alphaT)).div(sigmaT);
    }));
    this.pushModelOutput(eps);
    // 2. the update
    const out = tidy(() => {
      if (c.solver_order === 1 || this.lowerOrderNums < 1 || lowerOrderFinal) {
        return dpmFirstOrder('dpmsolver', sample, solverPoint(this.sigmaValues[i + 1] as number), solverPoint(this.sigmaValues[i] as number), eps, null);
      }
      return this.multistepUpdate(sample, i, c.solver_order === 2 || this.lowerOrderNums < 2 || lowerOrderSecond ? 2 : 3);
    });
    this.endMultistep(i);
    return out;
  }

  /** x_t = α_t·(x/α_s0 + Σ coef_k·ε̂_k), the coefficients integrals of the Lagrange basis in log ρ (float32). */
  private multistepUpdate(sample: Tensor, i: number, order: 2 | 3): Tensor {
    const f = Math.fround;
    const point = (k: number): [number, number] => alphaSigma(this.sigmaValues[k] as number);
    const [alphaT, sigmaT] = point(i + 1);
    const rho = (k: number): number => { const [a, s] = point(k); return f(s / a); };
    const rhoT = f(sigmaT / alphaT);
    const rhos = Array.from({ length: order }, (_, k) => rho(i - k));
    const alphaS0 = point(i)[0];
    const outputs = Array.from({ length: order }, (_, k) => this.previousOutput(k));
    const ind = order === 2 ? ind2 : ind3;
    // coef_k = ind(ρ_t; ρ_k, others) − ind(ρ_s0; ρ_k, others), the others in diffusers' cyclic order
    let acc = sample.div(alphaS0);
    for (let k = 0; k < order; k++) {
      const others = Array.from({ length: order - 1 }, (_, j) => rhos[(k + 1 + j) % order] as number);
      const coef = f(ind(rhoT, rhos[k] as number, others) - ind(rhos[0] as number, rhos[k] as number, others));
      acc = acc.add((outputs[k] as Tensor).mul(coef));
    }
    return acc.mul(alphaT);
  }
}

/** ∫ of the 2-point Lagrange basis in log ρ: t·(−log c + log t − 1)/(log b − log c), float32. */
function ind2(t: number, b: number, [c]: number[]): number {
  const f = Math.fround;
  return f(f(t * f(f(-lnf(c as number) + lnf(t)) - 1)) / f(lnf(b) - lnf(c as number)));
}

/** The 3-point version (diffusers' third-order ind_fn), float32. */
function ind3(t: number, b: number, [c, d]: number[]): number {
  const f = Math.fround;
  const [lt, lb, lc, ld] = [lnf(t), lnf(b), lnf(c as number), lnf(d as number)];
  let acc = f(lc * f(f(ld - lt) + 1));
  acc = f(f(f(f(acc - f(ld * lt)) + ld) + f(lt * lt)) - f(2 * lt));
  const numer = f(t * f(acc + 2));
  return f(numer / f(f(lb - lc) * f(lb - ld)));
}
