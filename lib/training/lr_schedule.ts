// Learning-rate schedules of diffusers' optimization.get_scheduler (0.31), as pure functions of the step.
//
// `step` is what torch's LambdaLR calls last_epoch: the number of optimizer steps already taken. The
// training script calls lr_scheduler.step() after every optimizer.step(), so optimizer step k (0-based) runs
// at lr = baseLr · multiplier(k): with warmup the very first update has lr 0, as in the reference.
//
// Semantics kept on purpose (see REFERENCE.md):
// - 'constant' ignores warmup entirely (get_scheduler does not pass num_warmup_steps to it).
// - 'cosine' always uses num_cycles 0.5 through get_scheduler (its num_cycles only reaches
//   'cosine_with_restarts'), and past totalSteps it is not clamped: the cosine rises again.
// - 'polynomial' is written as an LR (lr_end … lr_init) divided by lr_init because LambdaLR multiplies by
//   it, so it needs the base LR, which must exceed lr_end (1e-7).
// All arithmetic is float64, as Python's floats.

export type LrSchedulerName =
  | 'linear'
  | 'cosine'
  | 'cosine_with_restarts'
  | 'polynomial'
  | 'constant'
  | 'constant_with_warmup'
  | 'piecewise_constant';

/** Every name get_scheduler accepts (diffusers' SchedulerType values). */
export const LR_SCHEDULERS: readonly LrSchedulerName[] = Object.freeze([
  'linear', 'cosine', 'cosine_with_restarts', 'polynomial', 'constant', 'constant_with_warmup', 'piecewise_constant',
]);

export interface LrScheduleOptions {
  /** The optimizer's initial LR (lrAt multiplies by it; 'polynomial' needs it). */
  baseLr?: number;
  /** num_warmup_steps (required by every schedule but 'constant' and 'piecewise_constant'). */
  warmupSteps?: number;
  /** num_training_steps (required by linear, cosine, cosine_with_restarts, polynomial). */
  totalSteps?: number;
  /** Hard restarts of 'cosine_with_restarts' (get_scheduler's default 1). */
  numCycles?: number;
  /** 'polynomial' power (default 1.0). */
  power?: number;
  /** 'polynomial' end LR (default 1e-7; get_scheduler never changes it). */
  lrEnd?: number;
  /** 'piecewise_constant' rules, e.g. "1:10,0.1:20,0.01:30,0.005". */
  stepRules?: string;
}

const warmup = (step: number, warmupSteps: number): number => step / Math.max(1, warmupSteps);

/** get_constant_schedule: always 1 (no warmup, whatever lr_warmup_steps says). */
export function constantSchedule(_step: number): number {
  return 1;
}

/** get_constant_schedule_with_warmup: linear 0 → 1 over warmupSteps, then 1. */
export function constantWithWarmupSchedule(step: number, warmupSteps: number): number {
  if (step < warmupSteps) return step / Math.max(1.0, warmupSteps);
  return 1.0;
}

/** get_linear_schedule_with_warmup: warmup, then linear 1 → 0 at totalSteps, 0 after. */
export function linearSchedule(step: number, warmupSteps: number, totalSteps: number): number {
  if (step < warmupSteps) return warmup(step, warmupSteps);
  return Math.max(0.0, (totalSteps - step) / Math.max(1, totalSteps - warmupSteps));
}

/** get_cosine_schedule_with_warmup: warmup, then 0.5·(1 + cos(2π·numCycles·progress)), floored at 0. */
export function cosineSchedule(step: number, warmupSteps: number, totalSteps: number, numCycles = 0.5): number {
  if (step < warmupSteps) return warmup(step, warmupSteps);
  const progress = (step - warmupSteps) / Math.max(1, totalSteps - warmupSteps);
  return Math.max(0.0, 0.5 * (1.0 + Math.cos(Math.PI * numCycles * 2.0 * progress)));
}

/** get_cosine_with_hard_restarts_schedule_with_warmup: numCycles half-cosines 1 → 0, then 0 from totalSteps. */
export function cosineWithRestartsSchedule(step: number, warmupSteps: number, totalSteps: number, numCycles = 1): number {
  if (step < warmupSteps) return warmup(step, warmupSteps);
  const progress = (step - warmupSteps) / Math.max(1, totalSteps - warmupSteps);
  if (progress >= 1.0) return 0.0;
  return Math.max(0.0, 0.5 * (1.0 + Math.cos(Math.PI * pyMod(numCycles * progress, 1.0))));
}

/**
 * get_polynomial_decay_schedule_with_warmup: warmup, then lr decays from lrInit to lrEnd as
 * (lrInit − lrEnd)·(1 − progress)^power + lrEnd, and stays at lrEnd past totalSteps; returned divided by
 * lrInit, the multiplier LambdaLR applies.
 */
export function polynomialSchedule(step: number, warmupSteps: number, totalSteps: number, lrInit: number, lrEnd = 1e-7, power = 1.0): number {
  if (!(lrInit > lrEnd)) throw new RangeError(`lr_end (${lrEnd}) must be smaller than initial lr (${lrInit})`);
  if (step < warmupSteps) return warmup(step, warmupSteps);
  if (step > totalSteps) return lrEnd / lrInit;
  const decaySteps = totalSteps - warmupSteps;
  // Python raises ZeroDivisionError here; NaN would slip into the optimizer silently
  if (decaySteps === 0) throw new RangeError(`polynomial schedule: totalSteps (${totalSteps}) must exceed warmupSteps (${warmupSteps})`);
  const pctRemaining = 1 - (step - warmupSteps) / decaySteps;
  const decay = (lrInit - lrEnd) * pctRemaining ** power + lrEnd;
  return decay / lrInit;
}

/**
 * get_piecewise_constant_schedule: rules "m1:s1,m2:s2,...,mLast" give multiplier m_i before step s_i
 * (first matching boundary in ascending order) and mLast from the last boundary on.
 */
export function piecewiseConstantSchedule(step: number, stepRules: string): number {
  const { rules, last } = parseStepRules(stepRules);
  for (const [boundary, value] of rules) if (step < boundary) return value;
  return last;
}

function parseStepRules(stepRules: string): { rules: [number, number][]; last: number } {
  const parts = stepRules.split(',');
  const bad = (why: string): never => {
    throw new Error(`piecewise_constant: bad step_rules ${JSON.stringify(stepRules)} (${why}); expected e.g. "1:10,0.1:20,0.01:30,0.005"`);
  };
  const number = (s: string, what: string): number => {
    const v = Number(s.trim());
    if (s.trim() === '' || !Number.isFinite(v)) bad(`${what} ${JSON.stringify(s)} is not a number`);
    return v;
  };
  const byStep = new Map<number, number>();
  for (const rule of parts.slice(0, -1)) {
    const pair = rule.split(':');
    if (pair.length !== 2) bad(`rule ${JSON.stringify(rule)} is not value:step`);
    const value = number(pair[0] ?? '', 'value');
    const steps = number(pair[1] ?? '', 'step');
    if (!Number.isInteger(steps)) bad(`step ${JSON.stringify(pair[1])} is not an integer`);
    byStep.set(steps, value); // a repeated step keeps the last value, as Python's dict
  }
  const rules = [...byStep].sort((a, b) => a[0] - b[0]);
  return { rules, last: number(parts[parts.length - 1] ?? '', 'last value') };
}

/** Python's float % (the sign of the divisor), for the restarts' phase. */
function pyMod(a: number, b: number): number {
  const r = a % b;
  return r !== 0 && (r < 0) !== (b < 0) ? r + b : r;
}

function isName(name: string): name is LrSchedulerName {
  return (LR_SCHEDULERS as readonly string[]).includes(name);
}

function need(value: number | undefined, option: string, name: string): number {
  if (value === undefined) throw new Error(`lr scheduler '${name}' requires ${option}`);
  if (!Number.isInteger(value) || value < 0) throw new RangeError(`lr scheduler '${name}': ${option} must be a non-negative integer, got ${value}`);
  return value;
}

/** The LR multiplier of schedule `name` after `step` optimizer steps, with get_scheduler's defaults. */
export function lrMultiplier(name: string, step: number, o: LrScheduleOptions = {}): number {
  if (!isName(name)) throw new Error(`unknown lr scheduler '${name}'; choose one of ${LR_SCHEDULERS.join(', ')}`);
  if (!Number.isInteger(step) || step < 0) throw new RangeError(`lr scheduler step must be a non-negative integer, got ${step}`);
  switch (name) {
    case 'constant':
      return constantSchedule(step);
    case 'piecewise_constant':
      if (o.stepRules === undefined) throw new Error(`lr scheduler 'piecewise_constant' requires stepRules`);
      return piecewiseConstantSchedule(step, o.stepRules);
    case 'constant_with_warmup':
      return constantWithWarmupSchedule(step, need(o.warmupSteps, 'warmupSteps', name));
  }
  const warmupSteps = need(o.warmupSteps, 'warmupSteps', name);
  const totalSteps = need(o.totalSteps, 'totalSteps', name);
  switch (name) {
    case 'linear':
      return linearSchedule(step, warmupSteps, totalSteps);
    case 'cosine':
      return cosineSchedule(step, warmupSteps, totalSteps);
    case 'cosine_with_restarts':
      return cosineWithRestartsSchedule(step, warmupSteps, totalSteps, o.numCycles ?? 1);
    case 'polynomial':
      if (o.baseLr === undefined) throw new Error(`lr scheduler 'polynomial' requires baseLr (its decay is written in absolute LRs)`);
      return polynomialSchedule(step, warmupSteps, totalSteps, o.baseLr, o.lrEnd ?? 1e-7, o.power ?? 1.0);
  }
}

/** The learning rate after `step` optimizer steps: baseLr · lrMultiplier(name, step, o). */
export function lrAt(name: string, step: number, o: LrScheduleOptions & { baseLr: number }): number {
  return o.baseLr * lrMultiplier(name, step, o);
}
