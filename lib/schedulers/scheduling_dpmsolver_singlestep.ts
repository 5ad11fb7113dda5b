// DPMSolverSinglestepScheduler (diffusers 0.31 schedulers/scheduling_dpmsolver_singlestep.py): single-step
// DPM-Solver(++) (Lu et al. 2022), which diffusers' scheduler overview maps to A1111's "DPM++ SDE": the steps
// run in groups of solver_order (orders 1, 2, 3, 1, 2, 3, …), each group restarting from the sample at its
// first step and using the model outputs taken inside the group. Its timesteps are always spaced like
// 'linspace' (the class has no timestep_spacing). With lower_order_final false the order list is cut to the
// step count; diffusers switches lower_order_final on (with a warning) when the steps do not divide into
// groups or the final σ is 0: difflora uses the switched value and leaves the given config as it was.
import { randnTensor } from '../random.js';
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import {
  SAMPLER_BETA_SCHEDULES, PREDICTION_TYPES, configError, exp32, linspace64, resolveSchedulerConfig, roundHalfEven, type StepOptions,
} from './scheduling_utils.js';
import {
  DPM_SOLVER_END_DEFAULTS, SIGMA_SCHEDULE_DEFAULTS, SOLVER_DEFAULTS, SolverSchedulerBase, dpmConvertModelOutput, dpmFirstOrder, dpmSecondOrder,
  mapDPMSolverAliases, solverPoint, type DPMSolverEndConfig, type SolverConfig,
} from './scheduling_utils_sigmas.js';

export type DPMSolverSinglestepSchedulerConfig = SolverConfig & DPMSolverEndConfig & {
  algorithm_type: 'dpmsolver++' | 'sde-dpmsolver++' | 'dpmsolver';
  solver_type: 'midpoint' | 'heun';
};

/** DPMSolverSinglestepScheduler.__init__'s defaults. */
export const DPMSOLVER_SINGLESTEP_SCHEDULER_DEFAULTS: Readonly<DPMSolverSinglestepSchedulerConfig> = Object.freeze({
  ...SOLVER_DEFAULTS,
  algorithm_type: 'dpmsolver++',
  solver_type: 'midpoint',
  lower_order_final: false,
  ...SIGMA_SCHEDULE_DEFAULTS,
  ...DPM_SOLVER_END_DEFAULTS,
});

const CLASS = 'DPMSolverSinglestepScheduler';

/** What difflora implements ('deis' → 'dpmsolver++', 'logrho'/'bh1'/'bh2' → 'midpoint', as diffusers maps them). */
const SUPPORTED = {
  beta_schedule: SAMPLER_BETA_SCHEDULES,
  algorithm_type: ['dpmsolver++', 'sde-dpmsolver++', 'dpmsolver', 'deis'],
  solver_type: ['midpoint', 'heun', 'logrho', 'bh1', 'bh2'],
  solver_order: [1, 2, 3],
  prediction_type: PREDICTION_TYPES,
  final_sigmas_type: ['zero', 'sigma_min'],
  variance_type: [null],
};

function resolveConfig(rawConfig: object, overrides: Record<string, unknown>): DPMSolverSinglestepSchedulerConfig {
  const c = resolveSchedulerConfig(CLASS, DPMSOLVER_SINGLESTEP_SCHEDULER_DEFAULTS as DPMSolverSinglestepSchedulerConfig, rawConfig, overrides, SUPPORTED);
  const algorithm = c.algorithm_type as string;
  if (algorithm === 'dpmsolver' && c.final_sigmas_type === 'zero') {
    configError(CLASS, 'final_sigmas_type', 'zero', "is not supported with algorithm_type 'dpmsolver'; use final_sigmas_type 'sigma_min'");
  }
  mapDPMSolverAliases(c);
  if (c.solver_order === 3 && c.algorithm_type === 'sde-dpmsolver++') {
    configError(CLASS, 'solver_order', 3, "has no third-order update for algorithm_type 'sde-dpmsolver++' (diffusers fails at the first third-order step); use solver_order 2");
  }
  return c;
}

/** The order of each step (get_order_list). */
function orderList(steps: number, order: number, lowerOrderFinal: boolean): number[] {
  const rep = (pattern: number[], times: number): number[] => Array.from({ length: Math.max(times, 0) }, () => pattern).flat();
  if (order === 1) return rep([1], steps);
  if (!lowerOrderFinal) return rep(order === 3 ? [1, 2, 3] : [1, 2], Math.floor(steps / order));
  if (order === 2) return steps % 2 === 0 ? [...rep([1, 2], steps / 2 - 1), 1, 1] : [...rep([1, 2], (steps - 1) / 2), 1];
  const k = Math.floor(steps / 3);
  return steps % 3 === 0 ? [...rep([1, 2, 3], k - 1), 1, 2, 1] : steps % 3 === 1 ? [...rep([1, 2, 3], k), 1] : [...rep([1, 2, 3], k), 1, 2];
}

/**
 * The history (SolverSchedulerBase's) holds the last solver_order converted outputs; the order of each step
 * comes from the order list, not from the warm-up count.
 */
export class DPMSolverSinglestepScheduler extends SolverSchedulerBase<DPMSolverSinglestepSchedulerConfig> {
  readonly name = 'dpm_singlestep';
  private orders: number[] = [];
  // the sample the current group started from
  private groupSample: Tensor | null = null;

  constructor(rawConfig: object = {}, overrides: Record<string, unknown> = {}) {
    super(CLASS, resolveConfig(rawConfig, overrides));
  }

  override setTimesteps(numInferenceSteps: number): void {
    this.checkAlive();
    this.checkInferenceSteps(numInferenceSteps);
    const c = this.config;
    const n = numInferenceSteps;
    const clipped = c.lambda_min_clipped === -Infinity ? 0 : Array.from(this.trainSigmas, (s) => solverPoint(s).lambda).filter((l) => l < c.lambda_min_clipped).length;
    const spaced = linspace64(0, c.num_train_timesteps - 1 - clipped, n + 1).map(roundHalfEven).reverse().slice(0, -1);
    const { timesteps, sigmas } = this.solverSigmas(spaced, n);
    this.setSolverSchedule(timesteps, [...sigmas, this.finalSigma()]);
    const lowerOrderFinal = c.lower_order_final || n % c.solver_order !== 0 || c.final_sigmas_type === 'zero';
    this.orders = orderList(n, c.solver_order, lowerOrderFinal);
  }

  step(modelOutput: Tensor, timestep: number, sample: Tensor, options: StepOptions = {}): Tensor {
    const c = this.config;
    const i = this.nextStepIndex(timestep);
    const converted = keep(tidy(() => dpmConvertModelOutput(this.config, modelOutput, sample, this.sigmaValues[i] as number)));
    this.pushModelOutput(converted);
    let order = this.orders[i] ?? 1;
    while (this.modelOutputs[this.modelOutputs.length - order] === null) order -= 1;
    if (order === 1) {
      this.groupSample?.dispose();
      this.groupSample = keep(sample.clone());
    }
    const x = this.groupSample as Tensor;
    const out = tidy(() => {
      const noise = c.algorithm_type === 'sde-dpmsolver++' ? randnTensor(modelOutput, options.generator) : null;
      const m = (k: number): Tensor => this.previousOutput(k);
      const p = (k: number) => solverPoint(this.sigmaValues[k] as number);
      if (order === 1) return dpmFirstOrder(c.algorithm_type, x, p(i + 1), p(i), m(0), noise);
      const f = Math.fround;
      if (order === 2) {
        const [t, s0, s1] = [p(i + 1), p(i), p(i - 1)];
        const h = f(t.lambda - s1.lambda);
        const r0 = f(f(s0.lambda - s1.lambda) / h);
        return dpmSecondOrder(c.algorithm_type, c.solver_type, x, t, s1, m(1), m(0).sub(m(1)).mul(f(1 / r0)), h, noise);
      }
      return this.thirdOrder(x, i, m(0), m(1), m(2));
    });
    this.stepIndex = i + 1;
    return out;
  }

  /** The third-order single step from σ_{i−2} (diffusers' midpoint form uses D1_1 alone, its Heun form D1 and D2). */
  private thirdOrder(x: Tensor, i: number, m0: Tensor, m1: Tensor, m2: Tensor): Tensor {
    const f = Math.fround;
    const p = (k: number) => solverPoint(this.sigmaValues[k] as number);
    const [t, s0, s1, s2] = [p(i + 1), p(i), p(i - 1), p(i - 2)];
    const h = f(t.lambda - s2.lambda);
    const r0 = f(f(s0.lambda - s2.lambda) / h);
    const r1 = f(f(s1.lambda - s2.lambda) / h);
    const d10 = m1.sub(m2).mul(f(1 / r1));
    const d11 = m0.sub(m2).mul(f(1 / r0));
    const d1 = d10.mul(r0).sub(d11.mul(r1)).div(f(r0 - r1));
    const d2 = d11.sub(d10).mul(2).div(f(r0 - r1));
    const h2 = f(h * h);
    const midpoint = this.config.solver_type === 'midpoint';
    if (this.config.algorithm_type === 'dpmsolver++') {
      const em1 = f(exp32(-h) - 1);
      const base = x.mul(f(t.sigma / s2.sigma)).sub(m2.mul(f(t.alpha * em1)));
      const c1 = f(t.alpha * f(f(em1 / h) + 1));
      return midpoint ? base.add(d11.mul(c1)) : base.add(d1.mul(c1)).sub(d2.mul(f(t.alpha * f(f(f(em1 + h) / h2) - 0.5))));
    }
    const em1 = f(exp32(h) - 1);
    const base = x.mul(f(t.alpha / s2.alpha)).sub(m2.mul(f(t.sigma * em1)));
    const c1 = f(t.sigma * f(f(em1 / h) - 1));
    return midpoint ? base.sub(d11.mul(c1)) : base.sub(d1.mul(c1)).sub(d2.mul(f(t.sigma * f(f(f(em1 - h) / h2) - 0.5))));
  }

  protected override resetState(): void {
    super.resetState();
    this.groupSample?.dispose();
    this.groupSample = null;
  }
}
