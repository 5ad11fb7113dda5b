// The inference schedulers against diffusers 0.31 (goldens/schedulers): each built from tiny-sd's PNDM
// scheduler config as `<Class>.from_pretrained(tiny-sd, subfolder='scheduler')`, set_timesteps(20), then a
// 3-step rollout from rollout/sample0 with a fixed model output. Also the factory (names, aliases, class
// names, refused config values), add_noise of the σ schedulers, v-prediction, and flat memory.
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { makePrivateTempDir } from '../lib/io/files.js';
import { loadScheduler, schedulerFromConfig, schedulerName, SCHEDULER_NAMES, type Scheduler } from '../lib/schedulers/scheduler.js';
import { DDPMScheduler } from '../lib/schedulers/scheduling_ddpm.js';
import { DPMSolverMultistepScheduler } from '../lib/schedulers/scheduling_dpmsolver_multistep.js';
import { EulerDiscreteScheduler } from '../lib/schedulers/scheduling_euler_discrete.js';
import { memory, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { computeSnr } from '../lib/training/training_utils.js';
import { bitEqual, fixtures, goldenEqual, goldenFile, goldenScalarEqual, relErr } from './helpers.js';

const tinySd = join(fixtures, 'tiny-sd');
const TOL = 1e-6;
const golden = goldenFile('schedulers.safetensors');
const g = (name: string): Tensor => golden.get(name);
afterAll(() => golden.dispose());

interface Meta {
  init_noise_sigma: Record<string, { init_noise_sigma: number; num_timesteps: number }>;
  resolved_configs: Record<string, Record<string, unknown>>;
}
// Python's json writes -Infinity (DPM-Solver's lambda_min_clipped), which JSON.parse refuses
const meta = JSON.parse(readFileSync(join(fixtures, 'goldens', 'schedulers.json'), 'utf8').replace(/-Infinity\b/g, '"-Infinity"')) as Meta;
const rawConfig = JSON.parse(readFileSync(join(tinySd, 'scheduler', 'scheduler_config.json'), 'utf8')) as object;

// golden prefix → our kind, and whether the golden has sigmas / the step draws noise
const CASES = [
  { golden: 'ddpm', kind: 'ddpm', className: 'DDPMScheduler', sigmas: false, seeded: true },
  { golden: 'pndm', kind: 'pndm', className: 'PNDMScheduler', sigmas: false, seeded: false },
  { golden: 'ddim', kind: 'ddim', className: 'DDIMScheduler', sigmas: false, seeded: false },
  { golden: 'euler', kind: 'euler', className: 'EulerDiscreteScheduler', sigmas: true, seeded: false },
  { golden: 'euler_a', kind: 'euler_a', className: 'EulerAncestralDiscreteScheduler', sigmas: true, seeded: true },
  { golden: 'dpmpp2m', kind: 'dpmpp_2m', className: 'DPMSolverMultistepScheduler', sigmas: true, seeded: false },
] as const;

/** relErr of every compared tensor, and whether it was bit-exact, per scheduler (printed at the end). */
const report = new Map<string, { worst: number; exact: number; total: number }>();
function compare(who: string, ours: Tensor, ref: Tensor, what: string): void {
  const e = relErr(ours, ref);
  const r = report.get(who) ?? { worst: 0, exact: 0, total: 0 };
  r.worst = Math.max(r.worst, e);
  r.total += 1;
  if (bitEqual(ours.contiguous(), ref)) r.exact += 1;
  report.set(who, r);
  expect(e, `${who} ${what}`).toBeLessThan(TOL);
}
afterAll(() => {
  const lines = [...report].map(([k, r]) => `${k.padEnd(8)} worst relErr ${r.worst.toExponential(2)}, bit-exact ${r.exact}/${r.total}`);
  console.log(`scheduler parity vs diffusers 0.31:\n${lines.join('\n')}`);
});

describe.each(CASES)('$className vs diffusers 0.31 (tiny-sd PNDM config, 20 steps)', (c) => {
  it('resolves the config as from_config does, and sets the same timesteps, sigmas and init_noise_sigma', () => {
    const s = loadScheduler(tinySd, { kind: c.kind });
    try {
      expect(s.className).toBe(c.className);
      const resolved = meta.resolved_configs[c.className] ?? {};
      for (const [k, v] of Object.entries(s.config)) {
        const want = resolved[k] === '-Infinity' ? -Infinity : resolved[k];
        expect(v, `${c.className}.${k}`).toEqual(want);
      }
      s.setTimesteps(20);
      const ref = g(`${c.golden}/timesteps`);
      expect(s.timesteps.length).toBe(meta.init_noise_sigma[c.golden]?.num_timesteps);
      // exact: int64 timesteps as integers, Euler's float32 timesteps as the same float32 values
      expect(s.timesteps).toEqual(Array.from(ref.toFloat64Array()));
      if (c.sigmas) {
        const sigmas = (s as unknown as { sigmas: Tensor }).sigmas;
        expect(goldenEqual(sigmas, g(`${c.golden}/sigmas`)), 'sigmas bit-exact').toBe(true);
      }
      const initNoiseSigma = meta.init_noise_sigma[c.golden]!.init_noise_sigma;
      expect(goldenScalarEqual(s.initNoiseSigma, initNoiseSigma), `init_noise_sigma ${s.initNoiseSigma} vs ${initNoiseSigma}`).toBe(true);
    } finally {
      s.dispose();
    }
  });

  it('matches the 3-step rollout (scale_model_input and step)', () => {
    const s = loadScheduler(tinySd, { kind: c.kind });
    try {
      s.setTimesteps(20);
      const generator = c.seeded ? new torch.Generator().manualSeed(9) : undefined;
      const modelOutput = g('rollout/model_output');
      let sample = g('rollout/sample0');
      for (let i = 0; i < 3; i++) {
        const t = s.timesteps[i] as number;
        const next = tidy(() => {
          compare(c.golden, s.scaleModelInput(sample, t), g(`${c.golden}/step${i}/scaled_input`), `step${i}/scaled_input`);
          return s.step(modelOutput, t, sample, { generator });
        });
        compare(c.golden, next, g(`${c.golden}/step${i}/prev_sample`), `step${i}/prev_sample`);
        if (i > 0) sample.dispose();
        sample = next;
      }
      sample.dispose();
    } finally {
      s.dispose();
    }
  });
});

describe('addNoise', () => {
  it('of the alphas_cumprod schedulers equals the DDPM golden', () => {
    for (const kind of ['ddpm', 'pndm', 'ddim']) {
      const s = loadScheduler(tinySd, { kind });
      const out = s.addNoise(g('ddpm/add_noise/x0'), g('ddpm/add_noise/noise'), g('ddpm/add_noise/timesteps'));
      expect(relErr(out, g('ddpm/add_noise/out')), kind).toBeLessThan(TOL);
      out.dispose();
      s.dispose();
    }
  });

  it('of Euler and Euler ancestral is x₀ + σ_t·noise at the schedule\'s σ', () => {
    for (const kind of ['euler', 'euler_a']) {
      const s = loadScheduler(tinySd, { kind });
      s.setTimesteps(20);
      const sigmas = (s as unknown as { sigmas: Tensor }).sigmas;
      tidy(() => {
        const x0 = g('ddpm/add_noise/x0').slice(0, 0, 3);
        const noise = g('ddpm/add_noise/noise').slice(0, 0, 3);
        const picks = [0, 5, 19];
        const ts = torch.tensor(Float32Array.from(picks, (i) => s.timesteps[i] as number));
        const out = s.addNoise(x0, noise, ts);
        const sigma = sigmas.indexSelect(0, torch.tensor(picks.map(BigInt))).reshape(3, 1, 1, 1);
        expect(bitEqual(out, x0.add(noise.mul(sigma))), kind).toBe(true);
        // a timestep outside the schedule is an error, not a wrong σ
        expect(() => s.addNoise(x0, noise, torch.tensor([500.5, 1, 2]))).toThrow(/timestep 500.5 is not in the schedule/);
      });
      s.dispose();
    }
  });

  it('of DPM-Solver is α_t·x₀ + σ_t·noise with α_t = 1/sqrt(σ² + 1)', () => {
    const s = loadScheduler(tinySd, { kind: 'dpmpp_2m' }) as DPMSolverMultistepScheduler;
    s.setTimesteps(20);
    tidy(() => {
      const x0 = g('ddpm/add_noise/x0').slice(0, 0, 2);
      const noise = g('ddpm/add_noise/noise').slice(0, 0, 2);
      const out = s.addNoise(x0, noise, torch.tensor([BigInt(s.timesteps[0] as number), BigInt(s.timesteps[10] as number)]));
      const sig = s.sigmas.dataSync() as Float32Array;
      const expected = torch.cat([0, 10].map((i, b) => {
        const sigma = sig[i] as number;
        const alpha = 1 / Math.sqrt(sigma * sigma + 1);
        return x0.slice(0, b, b + 1).mul(alpha).add(noise.slice(0, b, b + 1).mul(sigma * alpha));
      }));
      expect(relErr(out, expected)).toBeLessThan(1e-6);
    });
    s.dispose();
  });
});

describe('factory and loader', () => {
  it('takes our names, diffusers class names and aliases', () => {
    const cases: [string, string][] = [
      ['pndm', 'PNDMScheduler'], ['PNDMScheduler', 'PNDMScheduler'], ['plms', 'PNDMScheduler'],
      ['ddim', 'DDIMScheduler'], ['DDIMScheduler', 'DDIMScheduler'],
      ['ddpm', 'DDPMScheduler'], ['DDPMScheduler', 'DDPMScheduler'],
      ['euler', 'EulerDiscreteScheduler'], ['EulerDiscreteScheduler', 'EulerDiscreteScheduler'],
      ['euler_a', 'EulerAncestralDiscreteScheduler'], ['euler-ancestral', 'EulerAncestralDiscreteScheduler'],
      ['EulerAncestralDiscreteScheduler', 'EulerAncestralDiscreteScheduler'],
      ['dpmpp_2m', 'DPMSolverMultistepScheduler'], ['dpm++2m', 'DPMSolverMultistepScheduler'],
      ['dpmsolver++', 'DPMSolverMultistepScheduler'], ['DPMSolverMultistepScheduler', 'DPMSolverMultistepScheduler'],
      ['DPM++ 2M', 'DPMSolverMultistepScheduler'],
    ];
    for (const [kind, className] of cases) {
      const s = schedulerFromConfig(kind, rawConfig);
      expect(s.className, kind).toBe(className);
      expect(SCHEDULER_NAMES).toContain(s.name);
      s.dispose();
    }
  });

  it('loadScheduler without kind uses _class_name; a scheduler folder itself works too', () => {
    const a = loadScheduler(tinySd);
    expect(a.className).toBe('PNDMScheduler');
    a.dispose();
    const b = loadScheduler(join(tinySd, 'scheduler'), { kind: 'euler', overrides: { timestep_spacing: 'leading' } });
    expect(b.config.timestep_spacing).toBe('leading');
    b.setTimesteps(20);
    // leading spacing: timesteps 951 … 1 (+ steps_offset), init_noise_sigma = sqrt(max σ² + 1)
    expect(b.timesteps[0]).toBe(951);
    const maxSigma = Math.max(...((b as EulerDiscreteScheduler).sigmas.dataSync() as Float32Array));
    expect(b.initNoiseSigma).toBe(Math.fround(Math.sqrt(Math.fround(Math.fround(maxSigma * maxSigma) + 1))));
    b.dispose();
  });

  it('refuses an unknown kind, listing the supported ones', () => {
    expect(() => schedulerFromConfig('ipndm', rawConfig)).toThrow(/unknown scheduler "ipndm": supported are 'pndm' \(PNDMScheduler\), 'ddim'.*'dpmpp_2m' \(DPMSolverMultistepScheduler\)/);
  });

  it('refuses config values it does not implement, naming the field and value', () => {
    const refused: [string, Record<string, unknown>, RegExp][] = [
      ['euler', { use_karras_sigmas: true, use_beta_sigmas: true }, /EulerDiscreteScheduler config: 'use_beta_sigmas' = true cannot be combined with use_karras_sigmas/],
      ['dpmpp_2m', { algorithm_type: 'foo' }, /'algorithm_type' = "foo" is not supported/],
      ['dpmpp_2m', { solver_order: 3, algorithm_type: 'sde-dpmsolver++' }, /'solver_order' = 3 has no third-order update/],
      ['ddim', { thresholding: true }, /DDIMScheduler config: 'thresholding' = true/],
      ['ddpm', { thresholding: true }, /DDPMScheduler config: 'thresholding' = true/],
      ['ddpm', { variance_type: 'learned_range' }, /'variance_type' = "learned_range"/],
      ['pndm', { prediction_type: 'sample' }, /'prediction_type' = "sample"/],
      ['euler_a', { prediction_type: 'sample' }, /'prediction_type' = "sample"/],
      ['euler', { timestep_spacing: 'karras' }, /'timestep_spacing' = "karras" is not supported/],
      ['euler', { timestep_type: 'continuous' }, /'timestep_type' = "continuous"/],
      ['ddim', { beta_schedule: 'sigmoid' }, /'beta_schedule' = "sigmoid"/],
      ['ddim', { steps_offset: '1' }, /'steps_offset' = "1" must be a number/],
    ];
    for (const [kind, overrides, message] of refused) {
      expect(() => schedulerFromConfig(kind, rawConfig, overrides), `${kind} ${JSON.stringify(overrides)}`).toThrow(message);
    }
  });

  it('ignores keys a class does not know and fills its own defaults (Euler from a PNDM config)', () => {
    const s = schedulerFromConfig('EulerDiscreteScheduler', rawConfig);
    expect(s.config.timestep_spacing).toBe('linspace');
    expect(s.config).not.toHaveProperty('skip_prk_steps');
    s.dispose();
  });

  it('reads a config with Python\'s bare -Infinity', () => {
    // tiny-sd has none; the DPM-Solver defaults round-trip through schedulerFromConfig instead
    const s = schedulerFromConfig('dpmpp_2m', { ...rawConfig, lambda_min_clipped: -Infinity });
    expect(s.config.lambda_min_clipped).toBe(-Infinity);
    s.dispose();
  });
});

describe('timestep spacings (diffusers\' formulas, T = 1000, 20 steps)', () => {
  const timestepsOf = (kind: string, spacing: string): number[] => {
    const s = schedulerFromConfig(kind, rawConfig, { timestep_spacing: spacing });
    s.setTimesteps(20);
    const ts = [...s.timesteps];
    s.dispose();
    return ts;
  };
  const trailing = Array.from({ length: 20 }, (_, i) => 999 - 50 * i);
  // np.linspace(0, 999, 20).round()[::-1]
  const linspace = Array.from({ length: 20 }, (_, i) => Math.round((19 - i) * (999 / 19)));

  it('DDPM and DDIM: trailing 999, 949, …, 49; linspace rounds np.linspace(0, 999, 20)', () => {
    for (const kind of ['ddpm', 'ddim']) {
      expect(timestepsOf(kind, 'trailing'), kind).toEqual(trailing);
      expect(timestepsOf(kind, 'linspace'), kind).toEqual(linspace);
    }
  });

  it('PNDM repeats the second timestep of every spacing', () => {
    const t = timestepsOf('pndm', 'trailing');
    expect(t.slice(0, 4)).toEqual([999, 949, 949, 899]);
    expect(t).toHaveLength(21);
  });

  it('Euler trailing: integers, init_noise_sigma = max σ; DPM trailing and leading', () => {
    expect(timestepsOf('euler', 'trailing')).toEqual(trailing);
    const e = schedulerFromConfig('euler', rawConfig, { timestep_spacing: 'trailing' }) as EulerDiscreteScheduler;
    e.setTimesteps(20);
    expect(e.initNoiseSigma).toBe(Math.max(...(e.sigmas.dataSync() as Float32Array)));
    e.dispose();
    expect(timestepsOf('dpmpp_2m', 'trailing')).toEqual(trailing);
    // leading: multiples of 1000 // 21 = 47 below 1000, the 0 dropped, + steps_offset 1
    expect(timestepsOf('dpmpp_2m', 'leading').slice(0, 2)).toEqual([941, 894]);
  });
});

describe('v_prediction', () => {
  it('every scheduler runs a finite 3-step rollout', () => {
    for (const kind of SCHEDULER_NAMES) {
      const s = loadScheduler(tinySd, { kind, overrides: { prediction_type: 'v_prediction' } });
      s.setTimesteps(10);
      const generator = new torch.Generator().manualSeed(1);
      let sample = g('rollout/sample0');
      for (let i = 0; i < 3; i++) {
        const t = s.timesteps[i] as number;
        const next = tidy(() => s.step(g('rollout/model_output'), t, s.scaleModelInput(sample, t), { generator }));
        expect(Boolean(tidy(() => next.isfinite().all().item())), kind).toBe(true);
        if (i > 0) sample.dispose();
        sample = next;
      }
      sample.dispose();
      s.dispose();
    }
  });

  it('DDIM v_prediction step equals the x̂₀/ε̂ formula in float64', () => {
    const s = loadScheduler(tinySd, { kind: 'ddim', overrides: { prediction_type: 'v_prediction' } });
    s.setTimesteps(20);
    const acp = (s as unknown as { alphasCumprod: Tensor }).alphasCumprod.toFloat64Array();
    const [t, tp] = [s.timesteps[0] as number, s.timesteps[1] as number];
    tidy(() => {
      const x = g('rollout/sample0').double();
      const v = g('rollout/model_output').double();
      const a = acp[t] as number;
      const ap = acp[tp] as number;
      const x0 = x.mul(Math.sqrt(a)).sub(v.mul(Math.sqrt(1 - a)));
      const eps = v.mul(Math.sqrt(a)).add(x.mul(Math.sqrt(1 - a)));
      const expected = x0.mul(Math.sqrt(ap)).add(eps.mul(Math.sqrt(1 - ap)));
      expect(relErr(s.step(g('rollout/model_output'), t, g('rollout/sample0')), expected)).toBeLessThan(1e-6);
    });
    s.dispose();
  });
});

describe('state and lifetimes', () => {
  it('setTimesteps resets the multistep state: a second rollout equals the first', () => {
    for (const kind of ['pndm', 'dpmpp_2m', 'euler']) {
      const s = loadScheduler(tinySd, { kind });
      const run = (): Tensor => {
        s.setTimesteps(20);
        let sample = g('rollout/sample0');
        for (let i = 0; i < 4; i++) {
          const t = s.timesteps[i] as number;
          const next = tidy(() => s.step(g('rollout/model_output'), t, s.scaleModelInput(sample, t)));
          if (i > 0) sample.dispose();
          sample = next;
        }
        return sample;
      };
      const a = run();
      const b = run();
      expect(bitEqual(a, b), kind).toBe(true);
      a.dispose();
      b.dispose();
      s.dispose();
    }
  });

  it('50 setTimesteps + full rollouts inside tidy leave the live tensor count flat', () => {
    for (const kind of SCHEDULER_NAMES) {
      const before = memory().numTensors;
      const s: Scheduler = loadScheduler(tinySd, { kind });
      const generator = new torch.Generator().manualSeed(0);
      const loop = (): void => tidy(() => {
        s.setTimesteps(5);
        let sample = g('rollout/sample0');
        for (const t of s.timesteps) {
          sample = tidy(() => s.step(g('rollout/model_output'), t, s.scaleModelInput(sample, t), { generator }));
        }
      });
      loop();
      const warm = memory().numTensors;
      for (let k = 0; k < 50; k++) loop();
      expect(memory().numTensors, kind).toBe(warm);
      s.dispose();
      expect(memory().numTensors, `${kind} after dispose`).toBe(before);
      expect(() => s.setTimesteps(5), kind).toThrow(/used after dispose/);
    }
  });

  it('DDPM keeps its training API next to sampling', () => {
    const s = DDPMScheduler.fromPretrained(tinySd, { subfolder: 'scheduler' });
    expect(s.timesteps[0]).toBe(999);
    s.setTimesteps(20);
    expect(s.timesteps.slice(0, 3)).toEqual([951, 901, 851]);
    const out = s.addNoise(g('ddpm/add_noise/x0'), g('ddpm/add_noise/noise'), g('ddpm/add_noise/timesteps'));
    expect(relErr(out, g('ddpm/add_noise/out'))).toBeLessThan(TOL);
    out.dispose();
    s.dispose();
  });
});

describe('hostile configs and arguments (issue #12): refused with the file, field and value', () => {
  const root = makePrivateTempDir('difflora-sched-test-');
  afterAll(() => rmSync(root, { recursive: true, force: true }));
  let n = 0;
  /** A scheduler folder holding `text` (or tiny-sd's config with `over` merged) as scheduler_config.json. */
  const folder = (over: Record<string, unknown> | string): { dir: string; file: string } => {
    const dir = join(root, String(n++));
    mkdirSync(dir);
    const file = join(dir, 'scheduler_config.json');
    writeFileSync(file, typeof over === 'string' ? over : JSON.stringify({ ...rawConfig, ...over }));
    return { dir, file };
  };
  const esc = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  /** loadScheduler must throw naming the file, and leave no tensor behind. */
  const refuses = (over: Record<string, unknown> | string, kind: string | undefined, message: RegExp): void => {
    const { dir, file } = folder(over);
    const before = memory().numTensors;
    let error = '';
    try {
      loadScheduler(dir, kind === undefined ? {} : { kind }).dispose();
    } catch (e) {
      error = (e as Error).message;
    }
    expect(error, `${kind} ${JSON.stringify(over)}`).toMatch(message);
    expect(error, 'names the file').toContain(file);
    expect(memory().numTensors, 'no tensor left by the refused load').toBe(before);
  };

  it('betas out of (0, 1) or out of order: beta_end 2 and beta_start -1 gave NaN images', () => {
    for (const kind of SCHEDULER_NAMES) {
      refuses({ beta_end: 2 }, kind, /config: 'beta_end' = 2 must be in \(0, 1\)/);
      refuses({ beta_start: -1 }, kind, /config: 'beta_start' = -1 must be in \(0, 1\)/);
      refuses({ beta_start: 0 }, kind, /'beta_start' = 0 must be in \(0, 1\)/);
      refuses({ beta_start: 0.5 }, kind, /'beta_end' = 0.012 must not be below beta_start \(0.5\)/);
      refuses({ beta_end: 'Infinity' }, kind, /'beta_end' = "Infinity" must be a number/);
    }
  });

  it('a beta schedule whose alphas_cumprod vanishes, or whose betas round away in float32', () => {
    refuses({ beta_end: 0.9 }, 'euler', /beta_schedule 'scaled_linear' with beta_start 0.00085, beta_end 0.9, num_train_timesteps 1000 gives alphas_cumprod .* at timestep \d+: the signal has vanished/);
    refuses({ beta_schedule: 'linear', beta_start: 1e-9, beta_end: 1e-9 }, 'ddim', /gives a beta at timestep 0 below float32's resolution/);
    refuses({ trained_betas: Array.from({ length: 1000 }, () => 0.5) }, 'pndm', /PNDMScheduler config: trained_betas gives alphas_cumprod/);
  });

  it('num_train_timesteps, steps_offset and trained_betas outside their domain', () => {
    refuses({ num_train_timesteps: 1e9 }, 'ddpm', /'num_train_timesteps' = 1000000000 must be an integer from 1 to 100000/);
    refuses({ num_train_timesteps: 0 }, 'ddim', /'num_train_timesteps' = 0 must be an integer from 1 to 100000/);
    refuses({ num_train_timesteps: 2.5 }, 'euler', /'num_train_timesteps' = 2.5 must be an integer/);
    refuses({ steps_offset: -1 }, 'pndm', /'steps_offset' = -1 must be an integer from 0 to num_train_timesteps − 1 \(999\)/);
    refuses({ steps_offset: 1000 }, 'dpmpp_2m', /'steps_offset' = 1000 must be an integer from 0/);
    refuses({ trained_betas: [0.1, 2] }, 'ddpm', /'trained_betas\[1\]' = 2 must be a number in \(0, 1\)/);
    refuses({ trained_betas: 'x' }, 'euler_a', /'trained_betas' = "x" must be null or a list of numbers/);
    refuses({ trained_betas: [0.1, 0.2] }, 'ddim', /'trained_betas' has 2 values but num_train_timesteps is 1000/);
    refuses({ rescale_betas_zero_snr: true, num_train_timesteps: 1, steps_offset: 0 }, 'ddpm', /'rescale_betas_zero_snr' = true needs num_train_timesteps of 2 or more/);
    refuses({ clip_sample_range: -1 }, 'ddim', /'clip_sample_range' = -1 must be a positive finite number/);
    refuses({ sigma_min: 'x' }, 'euler', /'sigma_min' = "x" must be null or a number/);
    refuses({ lambda_min_clipped: 5 }, 'dpmpp_2m', /'lambda_min_clipped' = 5 is above the log-SNR λ of every training timestep/);
  });

  it('enumerations outside the known sets, also where only training reads the config', () => {
    refuses({ timestep_spacing: 'karras' }, 'ddpm', /DDPMScheduler config: 'timestep_spacing' = "karras" is not supported \(difflora implements 'linspace', 'leading', 'trailing'\)/);
    refuses({ prediction_type: '__proto__' }, 'euler', /'prediction_type' = "__proto__" is not supported/);
    refuses({ beta_schedule: 'constructor' }, 'pndm', /'beta_schedule' = "constructor" is not supported/);
    expect(() => DDPMScheduler.fromConfig({ variance_type: 'toString' })).toThrow(/DDPMScheduler config: 'variance_type' = "toString" is not supported \(difflora implements 'fixed_small'/);
  });

  it('_class_name is looked up in a Map: prototype names are unknown classes, naming the file', () => {
    for (const cls of ['__proto__', 'constructor', 'toString', 'hasOwnProperty', 'Heun']) {
      refuses({ _class_name: cls }, undefined, new RegExp(`unknown scheduler class '${esc(cls)}' in .*scheduler_config\\.json; known: PNDMScheduler, DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler`));
      // 'Heun' is a kind (the A1111 name of HeunDiscreteScheduler), not a class name
      if (cls !== 'Heun') expect(() => schedulerName(cls)).toThrow(new RegExp(`unknown scheduler "${esc(cls)}": supported are`));
    }
    refuses({ _class_name: 42 }, undefined, /unknown scheduler class 42 \(not a string\) in/);
    // keys named like prototype properties are ignored, not merged
    const { dir } = folder(`{"__proto__": {"beta_end": 2}, "constructor": 1, ${JSON.stringify(rawConfig).slice(1)}`);
    const s = loadScheduler(dir);
    expect(s.config.beta_end).toBe(0.012);
    s.dispose();
  });

  it('the config file is read through lib/io: not an object, bad JSON, a directory, Python\'s bare -Infinity', () => {
    refuses('[1, 2]', 'pndm', /scheduler config '.*' must hold a JSON object, not an array/);
    refuses('{"beta_end": 0.012,\n "x": }', 'pndm', /scheduler config '.*' is not valid JSON: unexpected '}' at line 2 column 7/);
    const { dir, file } = folder({});
    expect(() => loadScheduler(join(dir, '..'), { subfolder: String(n - 1), kind: 'pndm' })).not.toThrow();
    const d = join(root, 'dir-config');
    mkdirSync(join(d, 'scheduler_config.json'), { recursive: true });
    expect(() => loadScheduler(d, { kind: 'pndm', subfolder: 'none' })).toThrow(/scheduler config '.*scheduler_config.json' is a directory/);
    writeFileSync(file, `{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity, "beta_schedule": "scaled_linear"}`);
    const s = loadScheduler(dir);
    expect(s.config.lambda_min_clipped).toBe(-Infinity);
    s.dispose();
  });

  it('setTimesteps refuses 0, negative, fractional, NaN and more steps than num_train_timesteps', () => {
    for (const kind of SCHEDULER_NAMES) {
      const s = loadScheduler(tinySd, { kind });
      for (const steps of [0, -1, 2.5, NaN, Infinity, 1001]) {
        expect(() => s.setTimesteps(steps), `${kind} ${steps}`).toThrow(new RegExp(`numInferenceSteps must be an integer from 1 to num_train_timesteps \\(1000\\), got ${steps}`));
      }
      s.dispose();
    }
  });

  it('a schedule the config pushes out of range is refused naming the file and the field', () => {
    const file = join(tinySd, 'scheduler', 'scheduler_config.json');
    // tiny-sd's steps_offset 1 with 'leading' spacing: 1000 steps would start at timestep 1000
    for (const kind of ['pndm', 'ddim', 'ddpm']) {
      const s = loadScheduler(tinySd, { kind });
      expect(() => s.setTimesteps(1000), kind).toThrow(`${file}: ${s.className}: 1000 inference steps with timestep_spacing "leading" and steps_offset 1 give timestep 1000, outside the trained [0, 999]`);
      s.setTimesteps(999);
      s.dispose();
    }
    // DPM-Solver's n + 1 linspace points over T timesteps repeat some when n = T
    const d = loadScheduler(tinySd, { kind: 'dpmpp_2m' });
    expect(() => d.setTimesteps(1000)).toThrow(/1000 inference steps with timestep_spacing 'linspace' repeat timesteps/);
    d.dispose();
  });

  it('zero terminal SNR: epsilon at ᾱ = 0 is refused, v_prediction runs finite', () => {
    const over = { rescale_betas_zero_snr: true, timestep_spacing: 'trailing' };
    for (const kind of ['ddim', 'ddpm']) {
      const s = schedulerFromConfig(kind, rawConfig, over);
      expect(() => s.setTimesteps(20), kind).toThrow(/timestep 999 has alphas_cumprod 0 \(rescale_betas_zero_snr true\), where prediction_type 'epsilon' cannot recover x0/);
      s.dispose();
      const v = schedulerFromConfig(kind, rawConfig, { ...over, prediction_type: 'v_prediction' });
      v.setTimesteps(20);
      const out = v.step(g('rollout/model_output'), v.timesteps[0] as number, g('rollout/sample0'), { generator: new torch.Generator().manualSeed(0) });
      expect(Boolean(tidy(() => out.isfinite().all().item())), kind).toBe(true);
      out.dispose();
      v.dispose();
    }
  });

  it('step and addNoise refuse timesteps outside [0, T) (and non-integer ones where ᾱ is indexed)', () => {
    tidy(() => {
      const x = g('rollout/sample0');
      for (const kind of SCHEDULER_NAMES) {
        const s = loadScheduler(tinySd, { kind });
        s.setTimesteps(20);
        for (const t of [-1, 1000, NaN, 1e9]) {
          expect(() => s.step(x, t, x), `${kind} step ${t}`).toThrow(/timestep/);
          expect(() => s.addNoise(x, x, torch.tensor(Float32Array.of(t))), `${kind} addNoise ${t}`).toThrow(/timestep/);
        }
        for (const t of [-1n, 1000n]) expect(() => s.addNoise(x, x, torch.tensor([t])), `${kind} addNoise ${t}`).toThrow(/timestep/);
        s.dispose();
      }
      const ddpm = loadScheduler(tinySd, { kind: 'ddpm' });
      expect(() => ddpm.addNoise(x, x, torch.tensor([1000n]))).toThrow('DDPMScheduler: timestep 1000 is outside [0, 1000)');
      expect(() => ddpm.addNoise(x, x, torch.tensor(Float32Array.of(5)))).toThrow('DDPMScheduler: timesteps must be an integer tensor (int64), got float32');
      expect(() => computeSnr(ddpm as DDPMScheduler, torch.tensor([-1n]))).toThrow('DDPMScheduler: timestep -1 is outside [0, 1000)');
      ddpm.dispose();
    });
  });
});
