// UniPCMultistepScheduler (diffusers 0.31 schedulers/scheduling_unipc_multistep.py): UniPC (Zhao et al. 2023,
// "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models") on the data
// prediction x̂₀: each step first corrects the sample it is given with the new model output (UniC, skipped
// at the first step and for the steps in disable_corrector), then predicts the next one (UniP) from the last
// solver_order x̂₀. B(h) is h ('bh1') or e^h − 1 ('bh2'); the order-k coefficients solve a small linear system.
//
// Scalars are float32 as diffusers' 0-dim tensors; the systems are solved by torch.linalg.solve in float32.
import { op } from '../ops.js';
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import {
  SAMPLER_BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS, configError, resolveSchedulerConfig, type TimestepSpacing,
} from './scheduling_utils.js';
import {
  SIGMA_SCHEDULE_DEFAULTS, SOLVER_DEFAULTS, SolverSchedulerBase, expm1, solverPoint, solverX0, thresholdSample, type SolverPoint, type SolverConfig,
} from './scheduling_utils_sigmas.js';

export type UniPCMultistepSchedulerConfig = SolverConfig & {
  predict_x0: boolean;
  solver_type: 'bh1' | 'bh2';
  disable_corrector: number[];
  solver_p: null;
  timestep_spacing: TimestepSpacing;
  steps_offset: number;
  final_sigmas_type: 'zero' | 'sigma_min';
  rescale_betas_zero_snr: boolean;
};

/** UniPCMultistepScheduler.__init__'s defaults. */
export const UNIPC_MULTISTEP_SCHEDULER_DEFAULTS: Readonly<UniPCMultistepSchedulerConfig> = Object.freeze({
  ...SOLVER_DEFAULTS,
  predict_x0: true,
  solver_type: 'bh2',
  lower_order_final: true,
  disable_corrector: [],
  solver_p: null,
  ...SIGMA_SCHEDULE_DEFAULTS,
  timestep_spacing: 'linspace',
  final_sigmas_type: 'zero',
  rescale_betas_zero_snr: false,
});

const CLASS = 'UniPCMultistepScheduler';

/** What difflora implements of the values diffusers accepts (which maps 'midpoint', 'heun', 'logrho' to 'bh2'). */
const SUPPORTED = {
  beta_schedule: SAMPLER_BETA_SCHEDULES,
  prediction_type: PREDICTION_TYPES,
  predict_x0: [true],
  solver_type: ['bh1', 'bh2', 'midpoint', 'heun', 'logrho'],
  solver_p: [null],
  final_sigmas_type: ['zero', 'sigma_min'],
  timestep_spacing: TIMESTEP_SPACINGS,
};

function resolveConfig(rawConfig: object, overrides: Record<string, unknown>): UniPCMultistepSchedulerConfig {
  const c = resolveSchedulerConfig(CLASS, UNIPC_MULTISTEP_SCHEDULER_DEFAULTS as UniPCMultistepSchedulerConfig, rawConfig, overrides, SUPPORTED);
  if (!Number.isInteger(c.solver_order) || c.solver_order < 1 || c.solver_order > 4) configError(CLASS, 'solver_order', c.solver_order, 'must be an integer from 1 to 4');
  if (!Array.isArray(c.disable_corrector) || !c.disable_corrector.every(Number.isInteger)) configError(CLASS, 'disable_corrector', c.disable_corrector, 'must be a list of step indices');
  if (!['bh1', 'bh2'].includes(c.solver_type)) c.solver_type = 'bh2';
  // B(h) = h is −inf at a final σ of 0: diffusers returns NaN at the last step
  if (c.solver_type === 'bh1' && c.final_sigmas_type === 'zero') {
    configError(CLASS, 'final_sigmas_type', 'zero', "with solver_type 'bh1' makes the last step NaN (B(h) = h is infinite at σ = 0; diffusers returns NaN); use final_sigmas_type 'sigma_min'");
  }
  return c;
}

const solveOp = op('linalg_solve');

/** The history (SolverSchedulerBase's) holds the last solver_order x̂₀. */
export class UniPCMultistepScheduler extends SolverSchedulerBase<UniPCMultistepSchedulerConfig> {
  readonly name = 'unipc';
  // the sample the last prediction started from, that prediction's order
  private lastSample: Tensor | null = null;
  private thisOrder = 1;

  constructor(rawConfig: object = {}, overrides: Record<string, unknown> = {}) {
    super(CLASS, resolveConfig(rawConfig, overrides));
  }

  override setTimesteps(numInferenceSteps: number): void {
    const c = this.config;
    const { timesteps, sigmas } = this.solverSchedule(numInferenceSteps);
    // 'sigma_min' with Karras σ: the last Karras σ again
    const last = this.sigmaSchedule === 'karras' && c.final_sigmas_type === 'sigma_min' ? (sigmas[sigmas.length - 1] as number) : this.finalSigma();
    this.setSolverSchedule(timesteps, [...sigmas, last]);
  }

  /** UniC on the given sample (from the second step on), then UniP to the next σ. */
  step(modelOutput: Tensor, timestep: number, sample: Tensor): Tensor {
    const c = this.config;
    const i = this.nextStepIndex(timestep);
    const useCorrector = i > 0 && !c.disable_corrector.includes(i - 1) && this.lastSample !== null;
    const x0 = keep(tidy(() => {
      const x = solverX0(c.prediction_type, modelOutput, sample, this.sigmaValues[i] as number);
      return c.thresholding ? thresholdSample(x, c.dynamic_thresholding_ratio, c.sample_max_value) : x;
    }));
    // 1. the corrector, with the history before this output
    const corrected = useCorrector ? keep(tidy(() => this.correct(x0, this.lastSample as Tensor, i, this.thisOrder))) : keep(sample.clone());
    this.pushModelOutput(x0);
    // 2. the predictor's order: warm-up, and lower at the end with lower_order_final
    const order = c.lower_order_final ? Math.min(c.solver_order, this.schedule.length - i) : c.solver_order;
    this.thisOrder = Math.min(order, this.lowerOrderNums + 1);
    this.lastSample?.dispose();
    this.lastSample = corrected;
    const out = tidy(() => this.predict(corrected, i, this.thisOrder));
    this.endMultistep(i);
    return out;
  }

  /** h, B(h), h·φ₁ and the system R·ρ = b of order `order` (rks: the previous λ offsets over h, then 1). */
  private system(t: SolverPoint, s0: SolverPoint, previous: number[], order: number): { hPhi1: number; bh: number; rks: number[]; R: Tensor; b: Tensor } {
    const f = Math.fround;
    const h = f(t.lambda - s0.lambda);
    const rks = [...previous.map((k) => f(f(solverPoint(this.sigmaValues[k] as number).lambda - s0.lambda) / h)), 1];
    const hh = f(-h);
    const hPhi1 = expm1(hh);
    let hPhiK = f(f(hPhi1 / hh) - 1);
    let factorial = 1;
    const bh = this.config.solver_type === 'bh1' ? hh : expm1(hh);
    const R: Tensor[] = [];
    const b: number[] = [];
    const rksT = torch.tensor(Float32Array.from(rks));
    for (let k = 1; k <= order; k++) {
      R.push(rksT.pow(k - 1));
      b.push(f(f(hPhiK * factorial) / bh));
      factorial *= k + 1;
      hPhiK = f(f(hPhiK / hh) - f(1 / factorial));
    }
    return { hPhi1, bh, rks, R: torch.stack(R), b: torch.tensor(Float32Array.from(b)) };
  }

  /** D1s stacked on dim 1 ([B, K, …]): (m_k − m0)/r_k of the previous outputs. */
  private differences(m0: Tensor, rks: number[], count: number, offset: number): Tensor {
    const ds = Array.from({ length: count }, (_, j) => this.previousOutput(j + offset).sub(m0).div(rks[j] as number));
    return torch.stack(ds, 1);
  }

  /** UniP of `order` from σ_i to σ_{i+1} (multistep_uni_p_bh_update). */
  private predict(x: Tensor, i: number, order: number): Tensor {
    const f = Math.fround;
    const t = solverPoint(this.sigmaValues[i + 1] as number);
    const s0 = solverPoint(this.sigmaValues[i] as number);
    const m0 = this.previousOutput(0);
    const { hPhi1, bh, rks, R, b } = this.system(t, s0, Array.from({ length: order - 1 }, (_, k) => i - (k + 1)), order);
    const base = x.mul(f(t.sigma / s0.sigma)).sub(m0.mul(f(t.alpha * hPhi1)));
    if (order === 1) return base;
    const d1s = this.differences(m0, rks, order - 1, 1);
    const rhos = order === 2 ? torch.tensor(Float32Array.of(0.5))
      : (solveOp(R.slice(0, 0, -1).slice(1, 0, -1), b.slice(0, 0, -1), true) as Tensor);
    const predRes = torch.einsum('k,bkc...->bc...', rhos, d1s);
    return base.sub(predRes.mul(f(t.alpha * bh)));
  }

  /** UniC of `order` at σ_i from the last sample and σ_{i−1} (multistep_uni_c_bh_update); x0 is the new output. */
  private correct(x0: Tensor, lastSample: Tensor, i: number, order: number): Tensor {
    const f = Math.fround;
    const t = solverPoint(this.sigmaValues[i] as number);
    const s0 = solverPoint(this.sigmaValues[i - 1] as number);
    const m0 = this.previousOutput(0);
    const { hPhi1, bh, rks, R, b } = this.system(t, s0, Array.from({ length: order - 1 }, (_, k) => i - (k + 2)), order);
    const base = lastSample.mul(f(t.sigma / s0.sigma)).sub(m0.mul(f(t.alpha * hPhi1)));
    const rhos = order === 1 ? torch.tensor(Float32Array.of(0.5)) : (solveOp(R, b, true) as Tensor);
    const last = rhos.select(0, rhos.shape[0] as number - 1);
    const d1t = x0.sub(m0);
    const corr = order === 1 ? d1t.mul(last) : torch.einsum('k,bkc...->bc...', rhos.slice(0, 0, -1), this.differences(m0, rks, order - 1, 1)).add(last.mul(d1t));
    return base.sub(corr.mul(f(t.alpha * bh)));
  }

  protected override resetState(): void {
    super.resetState();
    this.lastSample?.dispose();
    this.lastSample = null;
    this.thisOrder = 1;
  }
}
