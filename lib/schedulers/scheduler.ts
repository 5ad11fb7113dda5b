// The inference schedulers behind one interface, as diffusers' SchedulerMixin: a pipeline calls
// setTimesteps(n), then for each t of `timesteps` scaleModelInput → UNet → step. The factory builds any of
// them from any scheduler_config.json the way `OtherScheduler.from_config(config)` does (keys a class does
// not know are ignored, its own defaults fill the rest), so an SD 1.x folder's PNDM config gives an Euler or
// DPM++ 2M scheduler with diffusers' defaults for that class.
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { resolvePretrained, type FromPretrainedOptions } from '../models/loading.js';
import type { Generator } from '../random.js';
import type { Tensor } from '../tensor.js';
import { DDIMScheduler } from './scheduling_ddim.js';
import { DDPMScheduler } from './scheduling_ddpm.js';
import { DPMSolverMultistepScheduler } from './scheduling_dpmsolver_multistep.js';
import { EulerAncestralDiscreteScheduler } from './scheduling_euler_ancestral_discrete.js';
import { EulerDiscreteScheduler } from './scheduling_euler_discrete.js';
import { PNDMScheduler } from './scheduling_pndm.js';

export type SchedulerName = 'pndm' | 'ddim' | 'ddpm' | 'euler' | 'euler_a' | 'dpmpp_2m';

export interface Scheduler {
  readonly name: SchedulerName;
  /** diffusers' class name: 'PNDMScheduler', … */
  readonly className: string;
  /** The resolved config (defaults filled), diffusers' field names. */
  readonly config: Readonly<Record<string, unknown>>;
  readonly numTrainTimesteps: number;
  /**
   * After setTimesteps: the timesteps the UNet is called with, in order (PNDM repeats one; Euler's are
   * fractional float32 values, stored as Math.fround numbers).
   */
  readonly timesteps: number[];
  readonly initNoiseSigma: number;
  readonly order: number;
  /** Also resets any multistep state (PNDM's ets, DPM-Solver's history, the step index). */
  setTimesteps(numInferenceSteps: number): void;
  /** May return `sample` itself when no scaling applies. */
  scaleModelInput(sample: Tensor, timestep: number): Tensor;
  /**
   * One denoising step: the previous (less noisy) sample. Stochastic schedulers (DDPM, EulerAncestral) draw
   * noise with `generator` (torch's randn, as diffusers' randn_tensor).
   */
  step(modelOutput: Tensor, timestep: number, sample: Tensor, options?: { generator?: Generator }): Tensor;
  addNoise(originalSamples: Tensor, noise: Tensor, timesteps: Tensor): Tensor;
  /** Frees the scheduler's own tensors (alphas_cumprod, sigmas, history). */
  dispose(): void;
}

export const SCHEDULER_NAMES: readonly SchedulerName[] = Object.freeze(['pndm', 'ddim', 'ddpm', 'euler', 'euler_a', 'dpmpp_2m'] as const);

const CLASS_NAMES: Readonly<Record<SchedulerName, string>> = {
  pndm: 'PNDMScheduler',
  ddim: 'DDIMScheduler',
  ddpm: 'DDPMScheduler',
  euler: 'EulerDiscreteScheduler',
  euler_a: 'EulerAncestralDiscreteScheduler',
  dpmpp_2m: 'DPMSolverMultistepScheduler',
};

// Lower-cased, without spaces; our names and diffusers' class names are added below.
const ALIASES: Readonly<Record<string, SchedulerName>> = {
  plms: 'pndm',
  'euler-discrete': 'euler', euler_discrete: 'euler', eulerdiscrete: 'euler',
  'euler-a': 'euler_a', 'euler-ancestral': 'euler_a', euler_ancestral: 'euler_a', eulera: 'euler_a', k_euler_a: 'euler_a',
  'dpmpp-2m': 'dpmpp_2m', dpmpp2m: 'dpmpp_2m', 'dpm++2m': 'dpmpp_2m', 'dpm++_2m': 'dpmpp_2m', 'dpm++': 'dpmpp_2m',
  'dpmsolver++': 'dpmpp_2m', dpmsolvermultistep: 'dpmpp_2m', 'dpm-solver++': 'dpmpp_2m',
};

/** Our name for a scheduler name, alias or diffusers class name (case and spaces ignored). */
export function schedulerName(kind: string): SchedulerName {
  const key = kind.trim().toLowerCase().replace(/\s+/g, '');
  for (const name of SCHEDULER_NAMES) if (key === name || key === CLASS_NAMES[name].toLowerCase()) return name;
  const alias = ALIASES[key];
  if (alias !== undefined) return alias;
  const supported = SCHEDULER_NAMES.map((n) => `'${n}' (${CLASS_NAMES[n]})`).join(', ');
  throw new Error(`unknown scheduler ${JSON.stringify(kind)}: supported are ${supported}, and the aliases ${Object.keys(ALIASES).map((a) => `'${a}'`).join(', ')}`);
}

/**
 * A scheduler of `kind` from a scheduler_config.json's contents, as diffusers'
 * `<Class>.from_config(rawConfig, **overrides)`. Throws, naming the field, on a config value difflora does
 * not implement (e.g. use_karras_sigmas true) rather than sample differently from diffusers.
 */
export function schedulerFromConfig(kind: SchedulerName | string, rawConfig: object, overrides: Record<string, unknown> = {}): Scheduler {
  switch (schedulerName(kind)) {
    case 'pndm': return new PNDMScheduler(rawConfig, overrides);
    case 'ddim': return new DDIMScheduler(rawConfig, overrides);
    case 'ddpm': {
      const s = new DDPMScheduler(rawConfig as Record<string, unknown>, overrides);
      try {
        s.checkSamplingConfig();
      } catch (e) {
        s.dispose();
        throw e;
      }
      return s;
    }
    case 'euler': return new EulerDiscreteScheduler(rawConfig, overrides);
    case 'euler_a': return new EulerAncestralDiscreteScheduler(rawConfig, overrides);
    case 'dpmpp_2m': return new DPMSolverMultistepScheduler(rawConfig, overrides);
  }
}

/**
 * The scheduler of a diffusers folder, a component folder or a cached hub id: reads
 * `<subfolder>/scheduler_config.json` (subfolder 'scheduler' by default; a folder that holds
 * scheduler_config.json itself is used as is). Without `kind`, the config's `_class_name` says which.
 */
export function loadScheduler(
  pathOrId: string,
  options: FromPretrainedOptions & { subfolder?: string; kind?: SchedulerName | string; overrides?: Record<string, unknown> } = {},
): Scheduler {
  const { kind, overrides, subfolder = 'scheduler', ...rest } = options;
  const direct = existsSync(join(pathOrId, 'scheduler_config.json')) && !existsSync(join(pathOrId, subfolder));
  const dir = resolvePretrained(pathOrId, { ...rest, subfolder: direct ? undefined : subfolder });
  const raw = readSchedulerConfig(dir);
  const className = raw._class_name;
  if (kind === undefined && typeof className !== 'string') {
    throw new Error(`${join(dir, 'scheduler_config.json')} has no _class_name; pass kind (one of ${SCHEDULER_NAMES.join(', ')})`);
  }
  return schedulerFromConfig(kind ?? (className as string), raw, overrides);
}

/**
 * scheduler_config.json, parsed. Python's json writes -Infinity, Infinity and NaN bare (DPM-Solver's
 * lambda_min_clipped), which JSON.parse refuses: such tokens in value position are read as those numbers.
 */
function readSchedulerConfig(dir: string): Record<string, unknown> {
  const path = join(dir, 'scheduler_config.json');
  if (!existsSync(path)) throw new Error(`missing scheduler_config.json in '${dir}'`);
  const text = readFileSync(path, 'utf8');
  const marker = '__difflora_python_float__:';
  const quoted = text.replace(/([:[,]\s*)(-?Infinity|NaN)(?=\s*[,\]}])/g, (_, pre: string, tok: string) => `${pre}"${marker}${tok}"`);
  try {
    return JSON.parse(quoted, (_k, v: unknown) => (typeof v === 'string' && v.startsWith(marker) ? Number(v.slice(marker.length)) : v)) as Record<string, unknown>;
  } catch (e) {
    throw new Error(`cannot parse '${path}': ${(e as Error).message}`);
  }
}
