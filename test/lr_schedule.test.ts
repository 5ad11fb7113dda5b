// LR schedules against diffusers 0.31 optimization.py: each schedule at the steps that matter (0, the end of
// warmup, the middle, the end, past the end) vs the formulas written out again here in float64, plus
// hand-checked values and the documented quirks (constant ignores warmup, cosine rises again past the end,
// polynomial divides by the base LR).
import { describe, expect, it } from 'vitest';
import {
  LR_SCHEDULERS, constantWithWarmupSchedule, cosineSchedule, lrAt, lrMultiplier, piecewiseConstantSchedule,
  polynomialSchedule, type LrScheduleOptions,
} from '../lib/training/lr_schedule.js';

// The reference, restated from diffusers' lr_lambda functions (LambdaLR multiplies the base LR by them).
function reference(name: string, step: number, o: Required<Pick<LrScheduleOptions, 'warmupSteps' | 'totalSteps' | 'baseLr'>> & LrScheduleOptions): number {
  const { warmupSteps: w, totalSteps: T, baseLr } = o;
  const ramp = step / Math.max(1, w);
  const progress = (step - w) / Math.max(1, T - w);
  switch (name) {
    case 'constant': return 1;
    case 'constant_with_warmup': return step < w ? ramp : 1;
    case 'linear': return step < w ? ramp : Math.max(0, (T - step) / Math.max(1, T - w));
    case 'cosine': return step < w ? ramp : Math.max(0, (1 + Math.cos(Math.PI * progress)) / 2); // num_cycles 0.5
    case 'cosine_with_restarts': {
      if (step < w) return ramp;
      if (progress >= 1) return 0;
      const cycles = o.numCycles ?? 1;
      const phase = cycles * progress - Math.floor(cycles * progress);
      return Math.max(0, (1 + Math.cos(Math.PI * phase)) / 2);
    }
    case 'polynomial': {
      const end = o.lrEnd ?? 1e-7;
      if (step < w) return ramp;
      if (step > T) return end / baseLr;
      return ((baseLr - end) * (1 - (step - w) / (T - w)) ** (o.power ?? 1) + end) / baseLr;
    }
    default: throw new Error(name);
  }
}

const SETUPS: (Required<Pick<LrScheduleOptions, 'warmupSteps' | 'totalSteps' | 'baseLr'>> & LrScheduleOptions)[] = [
  { warmupSteps: 10, totalSteps: 100, baseLr: 1e-4 },
  { warmupSteps: 500, totalSteps: 15000, baseLr: 1e-4, numCycles: 3, power: 2 }, // the script's default warmup
  { warmupSteps: 0, totalSteps: 7, baseLr: 3e-4, numCycles: 2, power: 0.5 },
  { warmupSteps: 1, totalSteps: 2, baseLr: 1, lrEnd: 0.25 },
];

function stepsOf(w: number, T: number): number[] {
  const mid = Math.floor((w + T) / 2);
  return [...new Set([0, 1, w - 1, w, w + 1, mid, Math.floor(w + (T - w) / 3), T - 1, T, T + 1, 2 * T, 3 * T + 5].filter((s) => s >= 0))].sort((a, b) => a - b);
}

describe('each schedule against diffusers\' formulas', () => {
  for (const name of ['linear', 'cosine', 'cosine_with_restarts', 'polynomial', 'constant', 'constant_with_warmup']) {
    it(name, () => {
      let worst = 0;
      for (const o of SETUPS) {
        for (const step of stepsOf(o.warmupSteps, o.totalSteps)) {
          const ours = lrMultiplier(name, step, o);
          const want = reference(name, step, o);
          const err = Math.abs(ours - want);
          worst = Math.max(worst, err);
          expect(err, `${name} step ${step} ${JSON.stringify(o)}: ${ours} vs ${want}`).toBeLessThanOrEqual(1e-15);
          expect(lrAt(name, step, o)).toBe(o.baseLr * ours);
        }
      }
      console.log(`${name}: worst |ours − formula| = ${worst}`);
    });
  }
});

describe('hand-checked values (warmup 10, total 100, base LR 1e-4)', () => {
  const o = { warmupSteps: 10, totalSteps: 100, baseLr: 1e-4 };
  const at = (name: string, step: number, extra: LrScheduleOptions = {}) => lrMultiplier(name, step, { ...o, ...extra });

  it('warmup ramps from 0: the first optimizer step has LR 0', () => {
    for (const name of ['linear', 'cosine', 'cosine_with_restarts', 'polynomial', 'constant_with_warmup']) {
      expect(at(name, 0), name).toBe(0);
      expect(at(name, 5), name).toBe(0.5);
      expect(at(name, 9), name).toBe(0.9);
      expect(at(name, 10), name).toBe(1);
    }
  });

  it('constant ignores warmup', () => {
    for (const step of [0, 1, 9, 10, 499, 500, 10_000]) {
      expect(lrMultiplier('constant', step, { warmupSteps: 500, totalSteps: 1000 })).toBe(1);
      expect(lrAt('constant', step, { baseLr: 1e-4, warmupSteps: 500 })).toBe(1e-4);
    }
    expect(lrMultiplier('constant', 0)).toBe(1); // needs nothing
  });

  it('linear', () => {
    expect(at('linear', 55)).toBe(0.5);
    expect(at('linear', 100)).toBe(0);
    expect(at('linear', 150)).toBe(0);
  });

  it('cosine: half a cosine, then (not clamped) rising again past the end', () => {
    expect(at('cosine', 55)).toBeCloseTo(0.5, 15);
    expect(at('cosine', 100)).toBe(0);
    expect(at('cosine', 145)).toBeCloseTo(0.5, 15);
    expect(at('cosine', 190)).toBe(1);
    expect(at('cosine', 190, { numCycles: 7 })).toBe(1); // get_scheduler never passes num_cycles to 'cosine'
    expect(cosineSchedule(55, 10, 100, 1)).toBe(0); // the function itself takes it
  });

  it('cosine_with_restarts', () => {
    expect(at('cosine_with_restarts', 55)).toBeCloseTo(0.5, 15);
    expect(at('cosine_with_restarts', 55, { numCycles: 2 })).toBe(1); // a restart
    expect(at('cosine_with_restarts', 99, { numCycles: 2 })).toBeCloseTo(0.5 * (1 + Math.cos(Math.PI * ((2 * 89) / 90 - 1))), 15);
    expect(at('cosine_with_restarts', 100)).toBe(0);
    expect(at('cosine_with_restarts', 190)).toBe(0);
  });

  it('polynomial: an LR from baseLr to lr_end, divided by baseLr', () => {
    expect(at('polynomial', 55)).toBeCloseTo(0.5005, 15); // ((1e-4 − 1e-7)·0.5 + 1e-7) / 1e-4
    expect(at('polynomial', 55, { power: 2 })).toBeCloseTo(0.25075, 15);
    expect(at('polynomial', 100)).toBeCloseTo(0.001, 15); // lr_end / lr_init
    expect(at('polynomial', 101)).toBe(1e-7 / 1e-4);
    expect(lrAt('polynomial', 55, o)).toBeCloseTo(5.005e-5, 18);
    expect(lrAt('polynomial', 1000, o)).toBeCloseTo(1e-7, 20);
    // the multiplier depends on the base LR, unlike every other schedule
    expect(lrMultiplier('polynomial', 55, { ...o, baseLr: 1e-3 })).toBeCloseTo(0.50005, 15);
  });

  it('constant_with_warmup', () => {
    expect(at('constant_with_warmup', 100)).toBe(1);
    expect(constantWithWarmupSchedule(0, 0)).toBe(1);
  });

  it('piecewise_constant (get_scheduler\'s step_rules)', () => {
    const rules = '1:10,0.1:20,0.01:30,0.005';
    expect([0, 9, 10, 19, 20, 29, 30, 1000].map((s) => piecewiseConstantSchedule(s, rules))).toEqual([1, 1, 0.1, 0.1, 0.01, 0.01, 0.005, 0.005]);
    expect(lrMultiplier('piecewise_constant', 15, { stepRules: '0.1:20,1:10,0.5' })).toBe(0.1); // rules sorted by step
    expect(() => lrMultiplier('piecewise_constant', 0, { stepRules: '1:x,0.5' })).toThrow(/bad step_rules/);
    expect(() => lrMultiplier('piecewise_constant', 0)).toThrow(/requires stepRules/);
  });
});

describe('errors', () => {
  it('an unknown schedule is named, with the choices', () => {
    expect(() => lrMultiplier('cosine_annealing', 0)).toThrow(/unknown lr scheduler 'cosine_annealing'; choose one of linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup/);
    expect(() => lrAt('Linear', 0, { baseLr: 1 })).toThrow(/unknown lr scheduler 'Linear'/);
    expect(LR_SCHEDULERS).toContain('constant');
  });

  it('missing or bad arguments, as get_scheduler\'s checks', () => {
    expect(() => lrMultiplier('linear', 0, { totalSteps: 10 })).toThrow(/'linear' requires warmupSteps/);
    expect(() => lrMultiplier('cosine', 0, { warmupSteps: 1 })).toThrow(/'cosine' requires totalSteps/);
    expect(() => lrMultiplier('constant_with_warmup', 0)).toThrow(/requires warmupSteps/);
    expect(() => lrMultiplier('polynomial', 0, { warmupSteps: 1, totalSteps: 10 })).toThrow(/requires baseLr/);
    expect(() => lrMultiplier('polynomial', 0, { warmupSteps: 1, totalSteps: 10, baseLr: 1e-8 })).toThrow(/lr_end \(1e-7\) must be smaller than initial lr \(1e-8\)/);
    expect(() => polynomialSchedule(5, 5, 5, 1)).toThrow(/totalSteps \(5\) must exceed warmupSteps/);
    expect(() => lrMultiplier('linear', -1, { warmupSteps: 1, totalSteps: 10 })).toThrow(/non-negative integer/);
    expect(() => lrMultiplier('linear', 1.5, { warmupSteps: 1, totalSteps: 10 })).toThrow(/non-negative integer/);
    expect(() => lrMultiplier('linear', 1, { warmupSteps: -3, totalSteps: 10 })).toThrow(/warmupSteps must be a non-negative integer/);
  });
});
