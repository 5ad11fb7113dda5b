// DDPMScheduler (training half) against diffusers 0.31: goldens/schedulers (betas, alphas_cumprod, add_noise,
// get_velocity from tiny-sd's scheduler config), goldens/lora_train (noisy latents, velocity targets,
// compute_snr), the other beta schedules against values from diffusers' code run on torch 1.13.1 and against
// their formulas in float64, config handling and lifetimes.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadSafetensors } from '../lib/io/safetensors.js';
import { DDPMScheduler, DDPM_SCHEDULER_DEFAULTS, parseDDPMSchedulerConfig } from '../lib/schedulers/scheduling_ddpm.js';
import { betasForAlphaBar } from '../lib/schedulers/scheduling_utils.js';
import { computeSnr } from '../lib/training/training_utils.js';
import { dispose, memory, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { bitEqual, fixtures, goldenEqual, relErr, sameLibtorchAsGoldens } from './helpers.js';

const tinySd = join(fixtures, 'tiny-sd');

interface SchedulersMeta { resolved_configs: Record<string, Record<string, unknown>> }
// Python's json writes -Infinity (DPM-Solver's lambda_min_clipped), which JSON.parse refuses
const schedulersMeta = JSON.parse(readFileSync(join(fixtures, 'goldens', 'schedulers.json'), 'utf8').replace(/-Infinity\b/g, '"-Infinity"')) as SchedulersMeta;

let scheduler: DDPMScheduler;
let sched: Map<string, Tensor>;
let lora: Map<string, Tensor>;
const from = (m: Map<string, Tensor>, name: string): Tensor => {
  const t = m.get(name);
  if (!t) throw new Error(`golden '${name}' missing`);
  return t;
};
const s = (name: string): Tensor => from(sched, name);
const l = (name: string): Tensor => from(lora, name);

beforeAll(() => {
  scheduler = DDPMScheduler.fromPretrained(tinySd, { subfolder: 'scheduler' });
  sched = loadSafetensors(join(fixtures, 'goldens', 'schedulers.safetensors')).tensors;
  lora = loadSafetensors(join(fixtures, 'goldens', 'lora_train.safetensors')).tensors;
});

afterAll(() => {
  scheduler.dispose();
  dispose([...sched.values(), ...lora.values()]);
});

/**
 * Asserts ours == ref bit for bit on the goldens' libtorch, within float32 rounding on another (reporting the
 * relative error when not), and returns the relative error.
 */
function expectExact(ours: Tensor, ref: Tensor, label: string): number {
  expect(ours.dtype, `${label}: dtype`).toBe(ref.dtype);
  expect(ours.shape, `${label}: shape`).toEqual(ref.shape);
  const err = relErr(ours, ref);
  expect(goldenEqual(ours, ref), `${label}: not bit-identical (relative error ${err})`).toBe(true);
  return err;
}

describe('config (tiny-sd scheduler_config.json, written for PNDMScheduler)', () => {
  it('resolves to the config diffusers resolved, ignoring the keys DDPMScheduler does not take', () => {
    const resolved = schedulersMeta.resolved_configs.DDPMScheduler ?? {};
    for (const key of Object.keys(DDPM_SCHEDULER_DEFAULTS)) {
      expect((scheduler.config as unknown as Record<string, unknown>)[key], key).toEqual(resolved[key]);
    }
    expect([...scheduler.ignoredKeys].sort()).toEqual(['set_alpha_to_one', 'skip_prk_steps']);
    expect(scheduler.numTrainTimesteps).toBe(1000);
    expect(scheduler.predictionType).toBe('epsilon');
  });

  it('fromConfig applies overrides (the script\'s --prediction_type) and diffusers\' defaults', () => {
    const raw = JSON.parse(readFileSync(join(tinySd, 'scheduler', 'scheduler_config.json'), 'utf8')) as object;
    const v = DDPMScheduler.fromConfig(raw, { prediction_type: 'v_prediction' });
    expect(v.config.prediction_type).toBe('v_prediction');
    expect(v.config.beta_schedule).toBe('scaled_linear');
    expect(bitEqual(v.alphasCumprod, scheduler.alphasCumprod)).toBe(true);
    v.dispose();
    const d = DDPMScheduler.fromConfig({});
    expect(d.config).toEqual(DDPM_SCHEDULER_DEFAULTS);
    expect(d.config.beta_schedule).toBe('linear');
    d.dispose();
  });

  it('refuses an unknown beta_schedule, naming it', () => {
    expect(() => DDPMScheduler.fromConfig({ beta_schedule: 'karras_linear' })).toThrow(/DDPMScheduler config: 'beta_schedule' = "karras_linear" is not supported.*'linear', 'scaled_linear', 'squaredcos_cap_v2', 'sigmoid'/);
  });

  it('refuses values the training math would get wrong', () => {
    expect(() => parseDDPMSchedulerConfig({ prediction_type: 'x0' })).toThrow(/'prediction_type' = "x0" is not supported.*'epsilon', 'v_prediction', 'sample'/);
    expect(() => parseDDPMSchedulerConfig({ num_train_timesteps: 0 })).toThrow(/num_train_timesteps/);
    expect(() => parseDDPMSchedulerConfig({ beta_end: '0.02' })).toThrow(/beta_end/);
    expect(() => parseDDPMSchedulerConfig({ trained_betas: [0.1, 0.2], num_train_timesteps: 3 })).toThrow(/trained_betas' has 2 values but num_train_timesteps is 3/);
    expect(() => parseDDPMSchedulerConfig({ rescale_betas_zero_snr: 'yes' })).toThrow(/rescale_betas_zero_snr/);
  });

  it('fromPretrained reports a missing scheduler folder', () => {
    expect(() => DDPMScheduler.fromPretrained(join(tinySd, 'unet'), { subfolder: 'scheduler' })).toThrow(/no 'scheduler' folder/);
  });
});

describe('parity with diffusers 0.31 (goldens/schedulers, scaled_linear)', () => {
  it('betas, alphas_cumprod: bit-identical, float32', () => {
    expectExact(scheduler.betas, s('ddpm/betas'), 'betas');
    expectExact(scheduler.alphasCumprod, s('ddpm/alphas_cumprod'), 'alphas_cumprod');
    expect(scheduler.alphas.dtype).toBe('float32');
  });

  it('add_noise and get_velocity at timesteps [0, 1, 10, 100, 500, 999]', () => {
    const errs = tidy(() => {
      const ts = s('ddpm/add_noise/timesteps');
      const x0 = s('ddpm/add_noise/x0');
      const noise = s('ddpm/add_noise/noise');
      return {
        addNoise: expectExact(scheduler.addNoise(x0, noise, ts), s('ddpm/add_noise/out'), 'add_noise'),
        velocity: expectExact(scheduler.getVelocity(x0, noise, ts), s('ddpm/velocity'), 'get_velocity'),
      };
    });
    console.log('ddpm add_noise / get_velocity relative errors', errs);
  });
});

describe('parity with the training goldens (goldens/lora_train, timesteps [10, 999])', () => {
  it('noisy latents of every scheduler-based variant', () => {
    const errs = tidy(() => {
      const noisy = scheduler.addNoise(l('inputs/latents'), l('inputs/noise'), l('inputs/timesteps'));
      return Object.fromEntries(['eps_mse', 'eps_snr5', 'vpred_mse', 'vpred_snr5'].map((v) => [v, expectExact(noisy, l(`${v}/noisy_latents`), `${v}/noisy_latents`)]));
    });
    console.log('lora_train noisy_latents relative errors', errs);
  });

  it('targets: noise for epsilon, get_velocity for v_prediction', () => {
    const errs = tidy(() => {
      const v = scheduler.getVelocity(l('inputs/latents'), l('inputs/noise'), l('inputs/timesteps'));
      return {
        vpred_mse: expectExact(v, l('vpred_mse/target'), 'vpred_mse/target'),
        vpred_snr5: expectExact(v, l('vpred_snr5/target'), 'vpred_snr5/target'),
        eps_mse: expectExact(l('inputs/noise'), l('eps_mse/target'), 'eps_mse/target'),
      };
    });
    console.log('lora_train target relative errors', errs);
  });

  it('computeSnr = diffusers.training_utils.compute_snr', () => {
    const errs = tidy(() => {
      const snr = computeSnr(scheduler, l('inputs/timesteps'));
      expect(snr.shape).toEqual([2]);
      return { eps_snr5: expectExact(snr, l('eps_snr5/snr'), 'eps_snr5/snr'), vpred_snr5: expectExact(snr, l('vpred_snr5/snr'), 'vpred_snr5/snr') };
    });
    console.log('compute_snr relative errors', errs);
  });

  it('computeSnr keeps the timesteps\' shape and equals ᾱ/(1−ᾱ)', () => {
    tidy(() => {
      const ts = torch.tensor([[0n, 10n, 500n], [999n, 1n, 250n]]);
      const snr = computeSnr(scheduler, ts);
      expect(snr.shape).toEqual([2, 3]);
      expect(snr.dtype).toBe('float32');
      const acp = scheduler.alphasCumprod.toFloat64Array();
      const got = snr.toFloat64Array();
      [0, 10, 500, 999, 1, 250].forEach((t, i) => {
        const a = acp[t] ?? NaN;
        expect(Math.abs((got[i] ?? NaN) / (a / (1 - a)) - 1)).toBeLessThan(1e-6);
      });
    });
  });
});

// alphas_cumprod at these indices, from diffusers' own code (DDPMScheduler.__init__, betas_for_alpha_bar,
// rescale_zero_terminal_snr) run on torch 1.13.1 CPU float32; beta_start/beta_end 0.00085/0.012 except
// 'linear', which uses diffusers' defaults 1e-4/0.02. Printed with Python's float() (exact for float32).
const INDICES = [0, 1, 10, 499, 998, 999];
const DIFFUSERS_ALPHAS_CUMPROD: Record<string, { config: object; acp: number[]; betas: number[] }> = {
  linear: {
    config: {},
    betas: [9.999999747378752e-05, 0.00011991991777904332, 0.0002991991932503879, 0.0100400410592556, 0.01998008042573929, 0.019999999552965164],
    acp: [0.9998999834060669, 0.9997800588607788, 0.9978064894676208, 0.07858724147081375, 4.118194556212984e-05, 4.0358307160204276e-05],
  },
  scaled_linear: {
    config: { beta_schedule: 'scaled_linear', beta_start: 0.00085, beta_end: 0.012 },
    betas: [0.0008499999530613422, 0.0008546985918655992, 0.0008975692908279598, 0.004803793970495462, 0.01198237482458353, 0.011999999172985554],
    acp: [0.9991499781608582, 0.9982960224151611, 0.9904313087463379, 0.2776694595813751, 0.0047166962176561356, 0.0046600960195064545],
  },
  squaredcos_cap_v2: {
    config: { beta_schedule: 'squaredcos_cap_v2' },
    betas: [4.128422369831242e-05, 4.614175122696906e-05, 8.987136243376881e-05, 0.003145886119455099, 0.7499994039535522, 0.9990000128746033],
    acp: [0.9999586939811707, 0.9999125599861145, 0.9992788434028625, 0.4938434660434723, 2.428766265438753e-06, 2.4287349909002387e-09],
  },
  sigmoid: {
    config: { beta_schedule: 'sigmoid', beta_start: 0.00085, beta_end: 0.012 },
    betas: [0.0008775697788223624, 0.0008779020863585174, 0.000881078711245209, 0.006408258806914091, 0.011972097679972649, 0.011972431093454361],
    acp: [0.9991224408149719, 0.9982452988624573, 0.9903701543807983, 0.34374701976776123, 0.001589699648320675, 0.0015706670237705112],
  },
  scaled_linear_zero_snr: {
    config: { beta_schedule: 'scaled_linear', beta_start: 0.00085, beta_end: 0.012, rescale_betas_zero_snr: true },
    betas: [0.0008500218391418457, 0.0009172558784484863, 0.0009636878967285156, 0.005515754222869873, 0.751136302947998, 1.0],
    acp: [0.9991499781608582, 0.9982334971427917, 0.9897937178611755, 0.2423589527606964, 1.9678900287090073e-07, 0.0],
  },
  linear_zero_snr: {
    config: { rescale_betas_zero_snr: true },
    betas: [0.00010001659393310547, 0.00012063980102539062, 0.00030118227005004883, 0.010271012783050537, 0.7522695064544678, 1.0],
    acp: [0.9998999834060669, 0.9997793436050415, 0.9977930188179016, 0.07602876424789429, 4.213215998305486e-09, 0.0],
  },
};

// The schedules' definitions in float64, written independently of the implementation.
const N = 1000;
function betas64(schedule: string, start: number, end: number): number[] {
  const lin = (a: number, b: number) => Array.from({ length: N }, (_, i) => a + ((b - a) * i) / (N - 1));
  switch (schedule) {
    case 'linear': return lin(start, end);
    case 'scaled_linear': return lin(Math.sqrt(start), Math.sqrt(end)).map((x) => x * x);
    case 'sigmoid': return lin(-6, 6).map((x) => (1 / (1 + Math.exp(-x))) * (end - start) + start);
    case 'squaredcos_cap_v2': {
      const f = (t: number) => Math.cos((t + 0.008) / 1.008 * Math.PI / 2) ** 2;
      return Array.from({ length: N }, (_, i) => Math.min(1 - f((i + 1) / N) / f(i / N), 0.999));
    }
    default: throw new Error(schedule);
  }
}
/** Lin et al. 2023, Algorithm 1, in float64. */
function zeroSnr64(betas: number[]): number[] {
  let p = 1;
  const sq = betas.map((b) => Math.sqrt((p *= 1 - b)));
  const [s0, sT] = [sq[0] ?? NaN, sq[N - 1] ?? NaN];
  const bar = sq.map((x) => ((x - sT) * s0 / (s0 - sT)) ** 2);
  return bar.map((ab, i) => 1 - (i === 0 ? ab : ab / (bar[i - 1] ?? NaN)));
}
const cumprod64 = (betas: number[]): number[] => {
  let p = 1;
  return betas.map((b) => (p *= 1 - b));
};
const rel = (a: ArrayLike<number>, b: ArrayLike<number>): number => {
  let num = 0;
  let den = 0;
  for (let i = 0; i < b.length; i++) { num += ((a[i] ?? NaN) - (b[i] ?? NaN)) ** 2; den += (b[i] ?? NaN) ** 2; }
  return Math.sqrt(num / den);
};

describe('every beta schedule', () => {
  for (const [name, ref] of Object.entries(DIFFUSERS_ALPHAS_CUMPROD)) {
    it(`${name}: the values diffusers' code gives on torch 1.13.1, exactly; the float64 formula within float32 rounding`, () => {
      const sch = DDPMScheduler.fromConfig(ref.config);
      try {
        const betas = sch.betas.toFloat64Array();
        const acp = sch.alphasCumprod.toFloat64Array();
        // exact on torch 1.13.1's kernels, which made these values; within float32 rounding on libtorch 2.x
        // (relative 1e-6; after the zero-SNR rescaling absolute 1e-5: β = 1 − ᾱ_t/ᾱ_{t−1} cancels, explained below,
        // and near t = 999, where ᾱ ≈ 1e-7, a last-bit difference in ᾱ moves β by a few 1e-6)
        const zero = name.endsWith('_zero_snr');
        const close = (ours: number[], want: number[]): boolean =>
          ours.every((x, i) => Math.abs(x - want[i]!) <= (zero ? 1e-5 : 1e-6 * Math.abs(want[i]!)));
        if (sameLibtorchAsGoldens) {
          expect(INDICES.map((i) => betas[i])).toEqual(ref.betas);
          expect(INDICES.map((i) => acp[i])).toEqual(ref.acp);
        } else {
          expect(close(INDICES.map((i) => betas[i]!), ref.betas), 'betas').toBe(true);
          expect(close(INDICES.map((i) => acp[i]!), ref.acp), 'alphas_cumprod').toBe(true);
        }
        const c = sch.config;
        const [schedule, zeroSnr] = name.endsWith('_zero_snr') ? [name.slice(0, -'_zero_snr'.length), true] : [name, false];
        const b64 = betas64(schedule, c.beta_start, c.beta_end);
        const want = zeroSnr ? zeroSnr64(b64) : b64;
        const errs = { betas: rel(betas, want), alphasCumprod: rel(acp, cumprod64(want)) };
        console.log(`${name} vs float64 formula: relative errors`, errs);
        // float32 storage of β and α = 1 − β (2^-24 relative each; torch's CPU cumprod itself accumulates in
        // float64 and rounds each output), so the product over 1000 steps drifts by ~1e-7; the zero-SNR
        // rescaling recovers β as 1 − ᾱ_t/ᾱ_{t−1} in float32 (diffusers' code), a cancellation that leaves
        // ~1e-7 absolute error on each β, hence the wider bound there (its exact values are pinned above)
        expect(errs.betas).toBeLessThan(zeroSnr ? 1e-5 : 1e-6);
        expect(errs.alphasCumprod).toBeLessThan(1e-6);
        if (zeroSnr) expect(acp[N - 1]).toBe(0);
      } finally {
        sch.dispose();
      }
    });
  }

  it('trained_betas are used as given (cast to float32)', () => {
    const betas = [0.1, 0.2, 0.3];
    const sch = DDPMScheduler.fromConfig({ trained_betas: betas, num_train_timesteps: 3, beta_schedule: 'anything: ignored' });
    expect(Array.from(sch.betas.toFloat64Array())).toEqual(Array.from(Float32Array.from(betas)));
    // α = fround(1 − fround(β)) in float32; torch's CPU cumprod accumulates in float64 and rounds each output
    let p = 1;
    const want = betas.map((b) => Math.fround((p *= Math.fround(1 - Math.fround(b)))));
    expect(Array.from(sch.alphasCumprod.toFloat64Array())).toEqual(want);
    sch.dispose();
  });

  it('betasForAlphaBar caps at max_beta', () => {
    const b = betasForAlphaBar(10, 0.5);
    expect(Math.max(...b.toFloat64Array())).toBe(0.5);
    b.dispose();
  });
});

describe('dtypes, shapes, lifetimes', () => {
  it('addNoise works in the sample\'s dtype (fp16 latents under mixed precision) and rank', () => {
    tidy(() => {
      const ts = torch.tensor([3n, 900n]);
      const x = torch.randn([2, 4, 8, 8]).half();
      const n = torch.randn([2, 4, 8, 8]).half();
      const out = scheduler.addNoise(x, n, ts);
      expect(out.dtype).toBe('float16');
      // diffusers: ᾱ cast to fp16 first, then indexed and square-rooted in fp16
      const acp16 = scheduler.alphasCumprod.half().indexSelect(0, ts);
      const want = acp16.pow(0.5).reshape(2, 1, 1, 1).mul(x).add(acp16.neg().add(1).pow(0.5).reshape(2, 1, 1, 1).mul(n));
      expect(bitEqual(out, want)).toBe(true);
      const flat = scheduler.addNoise(torch.randn([2, 5]), torch.randn([2, 5]), ts);
      expect(flat.shape).toEqual([2, 5]);
    });
  });

  it('frees every temporary, and dispose() frees the schedule', () => {
    const before = memory().numTensors;
    const sch = DDPMScheduler.fromConfig({ beta_schedule: 'scaled_linear', rescale_betas_zero_snr: true });
    expect(memory().numTensors - before).toBe(3);
    const x = torch.randn([2, 4, 4, 4]);
    const ts = torch.tensor([1n, 2n]);
    const outs = [sch.addNoise(x, x, ts), sch.getVelocity(x, x, ts), computeSnr(sch, ts)];
    expect(memory().numTensors - before).toBe(3 + 2 + outs.length);
    dispose([...outs, x, ts]);
    sch.dispose();
    sch.dispose();
    expect(sch.isDisposed).toBe(true);
    expect(memory().numTensors).toBe(before);
    const fresh = torch.tensor([1n]);
    expect(() => computeSnr(sch, fresh)).toThrow(/after dispose/);
    fresh.dispose();
  });
});
