// The factory: any scheduler from any scheduler_config.json, the way `OtherScheduler.from_config(config)`
// does (keys a class does not know are ignored, its own defaults fill the rest), so an SD 1.x folder's PNDM
// config gives an Euler or DPM++ 2M scheduler with diffusers' defaults for that class. The interface and what
// the classes share are in scheduling_utils.ts.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { resolvePretrained, type HubOptions } from '../io/hub.js';
import { DDIMScheduler } from './scheduling_ddim.js';
import { DDPMScheduler } from './scheduling_ddpm.js';
import { DEISMultistepScheduler } from './scheduling_deis_multistep.js';
import { DPMSolverMultistepScheduler } from './scheduling_dpmsolver_multistep.js';
import { DPMSolverSDEScheduler } from './scheduling_dpmsolver_sde.js';
import { DPMSolverSinglestepScheduler } from './scheduling_dpmsolver_singlestep.js';
import { EulerAncestralDiscreteScheduler } from './scheduling_euler_ancestral_discrete.js';
import { EulerDiscreteScheduler } from './scheduling_euler_discrete.js';
import { HeunDiscreteScheduler } from './scheduling_heun_discrete.js';
import { KDPM2AncestralDiscreteScheduler } from './scheduling_k_dpm_2_ancestral_discrete.js';
import { KDPM2DiscreteScheduler } from './scheduling_k_dpm_2_discrete.js';
import { LMSDiscreteScheduler } from './scheduling_lms_discrete.js';
import { PNDMScheduler } from './scheduling_pndm.js';
import { UniPCMultistepScheduler } from './scheduling_unipc_multistep.js';
import { CLASS_NAMES, SCHEDULER_NAMES, lookupScheduler, schedulerName } from './names.js';
import {
  SCHEDULER_CONFIG_NAME, namingFile, readSchedulerConfig, type Scheduler, type SchedulerBase, type SchedulerName,
} from './scheduling_utils.js';

export type { Scheduler, SchedulerName } from './scheduling_utils.js';
export { A1111_SAMPLERS, SCHEDULER_NAMES, schedulerName } from './names.js';

type Make = (rawConfig: object, overrides: Record<string, unknown>) => Scheduler;

/** The constructor of each scheduler (a Record over SchedulerName: none can be missing). */
const MAKERS: Readonly<Record<SchedulerName, Make>> = {
  pndm: (r, o) => new PNDMScheduler(r, o),
  ddim: (r, o) => new DDIMScheduler(r, o),
  ddpm: makeDDPM,
  euler: (r, o) => new EulerDiscreteScheduler(r, o),
  euler_a: (r, o) => new EulerAncestralDiscreteScheduler(r, o),
  dpmpp_2m: (r, o) => new DPMSolverMultistepScheduler(r, o),
  dpm_singlestep: (r, o) => new DPMSolverSinglestepScheduler(r, o),
  unipc: (r, o) => new UniPCMultistepScheduler(r, o),
  heun: (r, o) => new HeunDiscreteScheduler(r, o),
  lms: (r, o) => new LMSDiscreteScheduler(r, o),
  kdpm2: (r, o) => new KDPM2DiscreteScheduler(r, o),
  kdpm2_a: (r, o) => new KDPM2AncestralDiscreteScheduler(r, o),
  deis: (r, o) => new DEISMultistepScheduler(r, o),
  dpm_sde: (r, o) => new DPMSolverSDEScheduler(r, o),
};

const BY_CLASS_NAME: ReadonlyMap<string, SchedulerName> = new Map([...CLASS_NAMES].map(([n, cls]) => [cls, n]));

/**
 * A scheduler of `kind` from a scheduler_config.json's contents, as diffusers'
 * `<Class>.from_config(rawConfig, **overrides)`; an A1111 name adds the config it stands for ('DPM++ 2M
 * Karras': use_karras_sigmas true), which wins over `overrides`. Throws, naming the field and value, on a
 * value out of its domain or one difflora does not implement rather than sample differently from diffusers.
 */
export function schedulerFromConfig(kind: SchedulerName | string, rawConfig: object, overrides: Record<string, unknown> = {}): Scheduler {
  const name = schedulerName(kind);
  const implied = lookupScheduler(kind)?.config ?? {};
  return MAKERS[name](rawConfig, { ...overrides, ...implied });
}

function makeDDPM(rawConfig: object, overrides: Record<string, unknown>): Scheduler {
  const s = new DDPMScheduler(rawConfig as Record<string, unknown>, overrides);
  try {
    s.checkSamplingConfig();
  } catch (e) {
    s.dispose();
    throw e;
  }
  return s;
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
  // a diffusers class name, as from_pretrained reads it (our short names and the A1111 names are for `kind`)
  const name = typeof className === 'string' ? BY_CLASS_NAME.get(className) : undefined;
  if (name === undefined) throw new Error(`unknown scheduler class ${showClass(className)} in ${path}; known: ${known} (or pass kind)`);
  return name;
}

function showClass(v: unknown): string {
  return typeof v === 'string' ? `'${v.slice(0, 80)}'` : `${JSON.stringify(v)?.slice(0, 80)} (not a string)`;
}
