// The factory: any scheduler from any scheduler_config.json, the way `OtherScheduler.from_config(config)`
// does (keys a class does not know are ignored, its own defaults fill the rest), so an SD 1.x folder's PNDM
// config gives an Euler or DPM++ 2M scheduler with diffusers' defaults for that class. The interface and what
// the classes share are in scheduling_utils.ts.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { resolvePretrained, type HubOptions } from '../io/hub.js';
import { DDIMScheduler } from './scheduling_ddim.js';
import { DDPMScheduler } from './scheduling_ddpm.js';
import { DPMSolverMultistepScheduler } from './scheduling_dpmsolver_multistep.js';
import { EulerAncestralDiscreteScheduler } from './scheduling_euler_ancestral_discrete.js';
import { EulerDiscreteScheduler } from './scheduling_euler_discrete.js';
import { PNDMScheduler } from './scheduling_pndm.js';
import {
  SCHEDULER_CONFIG_NAME, namingFile, readSchedulerConfig, type Scheduler, type SchedulerBase, type SchedulerName,
} from './scheduling_utils.js';

export type { Scheduler, SchedulerName } from './scheduling_utils.js';

export const SCHEDULER_NAMES: readonly SchedulerName[] = Object.freeze(['pndm', 'ddim', 'ddpm', 'euler', 'euler_a', 'dpmpp_2m'] as const);

const CLASS_NAMES: ReadonlyMap<SchedulerName, string> = new Map<SchedulerName, string>([
  ['pndm', 'PNDMScheduler'],
  ['ddim', 'DDIMScheduler'],
  ['ddpm', 'DDPMScheduler'],
  ['euler', 'EulerDiscreteScheduler'],
  ['euler_a', 'EulerAncestralDiscreteScheduler'],
  ['dpmpp_2m', 'DPMSolverMultistepScheduler'],
]);

// Lower-cased, without spaces; our names and diffusers' class names are in NAMES below.
const ALIASES: ReadonlyMap<string, SchedulerName> = new Map<string, SchedulerName>([
  ['plms', 'pndm'],
  ['euler-discrete', 'euler'], ['euler_discrete', 'euler'], ['eulerdiscrete', 'euler'],
  ['euler-a', 'euler_a'], ['euler-ancestral', 'euler_a'], ['euler_ancestral', 'euler_a'], ['eulera', 'euler_a'], ['k_euler_a', 'euler_a'],
  ['dpmpp-2m', 'dpmpp_2m'], ['dpmpp2m', 'dpmpp_2m'], ['dpm++2m', 'dpmpp_2m'], ['dpm++_2m', 'dpmpp_2m'], ['dpm++', 'dpmpp_2m'],
  ['dpmsolver++', 'dpmpp_2m'], ['dpmsolvermultistep', 'dpmpp_2m'], ['dpm-solver++', 'dpmpp_2m'],
]);

// Every accepted spelling → our name: a Map, so a key like '__proto__' or 'constructor' finds nothing
const NAMES: ReadonlyMap<string, SchedulerName> = new Map<string, SchedulerName>([
  ...SCHEDULER_NAMES.map((n): [string, SchedulerName] => [n, n]),
  ...[...CLASS_NAMES].map(([n, cls]): [string, SchedulerName] => [cls.toLowerCase(), n]),
  ...ALIASES,
]);

/** Our name for a scheduler name, alias or diffusers class name (case and spaces ignored); undefined if none. */
function lookupSchedulerName(kind: string): SchedulerName | undefined {
  return NAMES.get(kind.trim().toLowerCase().replace(/\s+/g, ''));
}

/** Our name for a scheduler name, alias or diffusers class name (case and spaces ignored). */
export function schedulerName(kind: string): SchedulerName {
  const name = typeof kind === 'string' ? lookupSchedulerName(kind) : undefined;
  if (name !== undefined) return name;
  const supported = SCHEDULER_NAMES.map((n) => `'${n}' (${CLASS_NAMES.get(n)})`).join(', ');
  throw new Error(`unknown scheduler ${JSON.stringify(kind)}: supported are ${supported}, and the aliases ${[...ALIASES.keys()].map((a) => `'${a}'`).join(', ')}`);
}

/**
 * A scheduler of `kind` from a scheduler_config.json's contents, as diffusers'
 * `<Class>.from_config(rawConfig, **overrides)`. Throws, naming the field and value, on a value out of its
 * domain or one difflora does not implement (e.g. use_karras_sigmas true) rather than sample differently
 * from diffusers.
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
 * Errors about the config name the file.
 */
export function loadScheduler(
  pathOrId: string,
  options: HubOptions & { subfolder?: string; kind?: SchedulerName | string; overrides?: Record<string, unknown> } = {},
): Scheduler {
  const { kind, overrides, subfolder = 'scheduler', ...rest } = options;
  const direct = existsSync(join(pathOrId, SCHEDULER_CONFIG_NAME)) && !existsSync(join(pathOrId, subfolder));
  const dir = resolvePretrained(pathOrId, { ...rest, subfolder: direct ? undefined : subfolder });
  const { path, config } = readSchedulerConfig(dir);
  const scheduler = namingFile(path, () => schedulerFromConfig(kind ?? classNameOf(path, config), config, overrides));
  (scheduler as SchedulerBase).configPath = path;
  return scheduler;
}

/** The config's `_class_name`, which must name a class difflora has. */
function classNameOf(path: string, config: Record<string, unknown>): SchedulerName {
  const known = [...CLASS_NAMES.values()].join(', ');
  const className = Object.hasOwn(config, '_class_name') ? config._class_name : undefined;
  if (className === undefined) throw new Error(`${path} has no _class_name; pass kind (one of ${SCHEDULER_NAMES.join(', ')})`);
  const name = typeof className === 'string' ? lookupSchedulerName(className) : undefined;
  if (name === undefined) throw new Error(`unknown scheduler class ${showClass(className)} in ${path}; known: ${known} (or pass kind)`);
  return name;
}

function showClass(v: unknown): string {
  return typeof v === 'string' ? `'${v.slice(0, 80)}'` : `${JSON.stringify(v)?.slice(0, 80)} (not a string)`;
}
