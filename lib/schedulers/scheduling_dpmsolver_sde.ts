// DPMSolverSDEScheduler (diffusers 0.31 schedulers/scheduling_dpmsolver_sde.py): k-diffusion's
// sample_dpmpp_sde, DPM-Solver++(2S) as a stochastic sampler: each step takes a first stage to the midpoint
// in log σ and a second from the step's start, each an ancestral exponential step (to σ_down, then noise of
// scale σ_up). Two model evaluations per step, like Heun.
//
// The noise: diffusers draws it from torchsde's Brownian tree (BrownianTreeNoiseSampler: W(σ_next) − W(σ)
// over sqrt|σ_next − σ|, one Brownian path over [σ_min, σ_max] per run, so the two stages see consistent
// increments). torchsde is not available here; difflora samples the same kind of path with Brownian bridges
// from the step's generator (or noise_sampler_seed): any set of queried σ gets jointly Gaussian values with
// Brownian covariances. The values differ from torchsde's (its tree draws with its own PRNG), so there is no
// golden; the test checks the step against its formula with the noise given.
import { Generator, randnTensor } from '../random.js';
import { dispose, keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import {
  SAMPLER_SUPPORTED_NO_SAMPLE, configError, exp32, log32, resolveSchedulerConfig, sqrt32, type StepOptions,
} from './scheduling_utils.js';
import {
  K_DIFFUSION_DEFAULTS, TwoStageSchedulerBase, doubled, exp64, expm1, inputScale, kDiffusionX0, log64, numbers, sigmaToT, type KDiffusionConfig,
} from './scheduling_utils_sigmas.js';

export type DPMSolverSDESchedulerConfig = KDiffusionConfig & {
  prediction_type: 'epsilon' | 'v_prediction';
  noise_sampler_seed: number | null;
};

/** DPMSolverSDEScheduler.__init__'s defaults. */
export const DPMSOLVER_SDE_SCHEDULER_DEFAULTS: Readonly<DPMSolverSDESchedulerConfig> = Object.freeze({
  ...K_DIFFUSION_DEFAULTS,
  noise_sampler_seed: null,
  timestep_spacing: 'linspace',
});

const CLASS = 'DPMSolverSDEScheduler';

const SUPPORTED = SAMPLER_SUPPORTED_NO_SAMPLE;

function resolveConfig(rawConfig: object, overrides: Record<string, unknown>): DPMSolverSDESchedulerConfig {
  const c = resolveSchedulerConfig(CLASS, DPMSOLVER_SDE_SCHEDULER_DEFAULTS as DPMSolverSDESchedulerConfig, rawConfig, overrides, SUPPORTED);
  const seed: unknown = c.noise_sampler_seed;
  if (seed !== null && !(Number.isSafeInteger(seed) && (seed as number) >= 0)) configError(CLASS, 'noise_sampler_seed', seed, 'must be null or a whole number ≥ 0');
  return c;
}

/** (W(σ_next) − W(σ)) / sqrt|σ_next − σ| for a Brownian path W: standard normal noise, shaped like the sample. */
export type BrownianNoise = (sigma: number, sigmaNext: number) => Tensor;

/**
 * A Brownian path over [lo, hi] sampled where it is queried: W(lo) = 0, W(hi) ~ N(0, hi − lo), and W(t)
 * between known a < t < b from the bridge N(W(a) + (t−a)/(b−a)·(W(b) − W(a)), (t−a)(b−t)/(b−a)).
 */
export class BrownianPath {
  private readonly known = new Map<number, Tensor>();

  private readonly like: Tensor;

  constructor(like: Tensor, private readonly lo: number, private readonly hi: number, private readonly generator?: Generator) {
    this.like = keep(like.to('float32').clone());
    this.known.set(lo, keep(torch.zerosLike(like)));
    this.known.set(hi, keep(tidy(() => randnTensor(like, generator).mul(Math.sqrt(hi - lo)))));
  }

  /** W(t), t clamped to [lo, hi]. */
  at(t: number): Tensor {
    const u = Math.min(Math.max(t, this.lo), this.hi);
    const hit = this.known.get(u);
    if (hit !== undefined) return hit;
    const times = [...this.known.keys()].sort((x, y) => x - y);
    const b = times.find((x) => x > u) as number;
    const a = times.filter((x) => x < u).pop() as number;
    const [wa, wb] = [this.known.get(a) as Tensor, this.known.get(b) as Tensor];
    const w = keep(tidy(() => wa.add(wb.sub(wa).mul((u - a) / (b - a))).add(randnTensor(this.like, this.generator).mul(Math.sqrt(((u - a) * (b - u)) / (b - a))))));
    this.known.set(u, w);
    return w;
  }

  /** The normalised increment between two σ (BrownianTreeNoiseSampler.__call__). */
  noise(sigma: number, sigmaNext: number): Tensor {
    const [t0, t1] = sigma < sigmaNext ? [sigma, sigmaNext] : [sigmaNext, sigma];
    const sign = sigma < sigmaNext ? 1 : -1;
    return this.at(t1).sub(this.at(t0)).mul(sign / Math.sqrt(Math.abs(sigmaNext - sigma)));
  }

  dispose(): void {
    dispose([...this.known.values(), this.like]);
    this.known.clear();
  }
}

/** The first stage keeps the sample the step started from and the midpoint σ. */
export class DPMSolverSDEScheduler extends TwoStageSchedulerBase<DPMSolverSDESchedulerConfig, { sample: Tensor; midSigma: number }> {
  readonly name = 'dpm_sde';
  /** The noise source; null: a BrownianPath made at the first step. Tests may set their own. */
  noiseSampler: BrownianNoise | null = null;
  private path: BrownianPath | null = null;

  constructor(rawConfig: object = {}, overrides: Record<string, unknown> = {}) {
    super(CLASS, resolveConfig(rawConfig, overrides), 'descending');
  }

  /** The k-diffusion σ (float64 spacing), the stage midpoints' timesteps interleaved. */
  override setTimesteps(numInferenceSteps: number): void {
    const { timesteps, sigmas } = this.kDiffusionSigmas(numInferenceSteps);
    this.timestepsFloat64 = true;
    // the midpoints in t = −log σ, and their timesteps
    const mids = sigmas.slice(0, -1).map((s, k) => {
      const t = -log64(s);
      return sigmaToT(exp64(-(t + (-log64(sigmas[k + 1] as number) - t) * 0.5)), this.logSigmas, 'float64');
    });
    const ts = doubled(timesteps, 1).map((t, k) => (k % 2 === 1 ? (mids[(k - 1) / 2] as number) : t));
    const s = numbers(Float32Array.from([...sigmas, 0]));
    this.setSchedule(ts, doubled(s, 1, s.length - 1));
    this.resetState();
  }

  override scaleModelInput(sample: Tensor, timestep: number): Tensor {
    this.checkAlive();
    const i = this.initStepIndex(timestep);
    return sample.div(inputScale(this.firstStage === null ? (this.sigmaValues[i] as number) : this.firstStage.midSigma));
  }

  /** One stage: ancestral exponential step to the midpoint (first) or to σ_next from the kept sample (second). */
  step(modelOutput: Tensor, timestep: number, sample: Tensor, options: StepOptions = {}): Tensor {
    const f = Math.fround;
    const { sNoise = 1 } = options;
    const i = this.nextStepIndex(timestep);
    const first = this.firstStage;
    const { sigma, sigmaNext } = this.stepSigmas(i);
    const tOf = (s: number): number => f(-log32(s));
    const sigmaOf = (t: number): number => exp32(-t);
    const t = tOf(sigma);
    const tProposed = f(t + f(f(tOf(sigmaNext) - t) * 0.5));
    const out = tidy(() => {
      const x0 = kDiffusionX0(this.config.prediction_type, modelOutput, sample, first === null ? sigma : sigmaOf(tProposed));
      if (sigmaNext === 0) return sample.add(sample.sub(x0).div(sigma).mul(f(sigmaNext - sigma)));
      const from = first === null ? sample : first.sample;
      const tNext = first === null ? tProposed : tOf(sigmaNext);
      const sigmaFrom = sigmaOf(t);
      const sigmaTo = sigmaOf(tNext);
      const sigmaUp = Math.min(sigmaTo, sqrt32(f(f(f(sigmaTo * sigmaTo) * f(f(sigmaFrom * sigmaFrom) - f(sigmaTo * sigmaTo))) / f(sigmaFrom * sigmaFrom))));
      const sigmaDown = sqrt32(f(f(sigmaTo * sigmaTo) - f(sigmaUp * sigmaUp)));
      const ancestralT = tOf(sigmaDown);
      const prev = from.mul(f(sigmaOf(ancestralT) / sigmaFrom)).sub(x0.mul(expm1(f(t - ancestralT))));
      return prev.add(this.noise(sample, options, sigmaFrom, sigmaTo).mul(f(sNoise * sigmaUp)));
    });
    if (sigmaNext !== 0 && first === null) this.firstStage = { sample: keep(sample.clone()), midSigma: sigmaOf(tProposed) };
    else this.clearStage();
    this.stepIndex = i + 1;
    return out;
  }

  /** The Brownian increment between two σ, from the path of this run (made on first use). */
  private noise(like: Tensor, options: StepOptions, sigma: number, sigmaNext: number): Tensor {
    if (this.noiseSampler !== null) return this.noiseSampler(sigma, sigmaNext);
    if (this.path === null) {
      const positive = [...this.sigmaValues].filter((s) => s > 0);
      const seed = this.config.noise_sampler_seed;
      const generator = seed === null ? options.generator : new Generator('cpu').manualSeed(seed);
      this.path = new BrownianPath(like, Math.min(...positive), Math.max(...positive), generator);
    }
    return this.path.noise(sigma, sigmaNext).to(like.dtype);
  }

  private resetState(): void {
    this.clearStage();
    this.path?.dispose();
    this.path = null;
  }

  protected override releaseState(): void {
    super.releaseState();
    this.resetState();
  }
}
