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
import {
  SCHEDULER_CONFIG_NAME, namingFile, readSchedulerConfig, type Scheduler, type SchedulerBase, type SchedulerName,
} from './scheduling_utils.js';

export type { Scheduler, SchedulerName } from './scheduling_utils.js';

type Make = (rawConfig: object, overrides: Record<string, unknown>) => Scheduler;

/** Every scheduler: our short name, diffusers' class name, the constructor. */
const REGISTRY: readonly { name: SchedulerName; className: string; make: Make }[] = [
  { name: 'pndm', className: 'PNDMScheduler', make: (r, o) => new PNDMScheduler(r, o) },
  { name: 'ddim', className: 'DDIMScheduler', make: (r, o) => new DDIMScheduler(r, o) },
  { name: 'ddpm', className: 'DDPMScheduler', make: makeDDPM },
  { name: 'euler', className: 'EulerDiscreteScheduler', make: (r, o) => new EulerDiscreteScheduler(r, o) },
  { name: 'euler_a', className: 'EulerAncestralDiscreteScheduler', make: (r, o) => new EulerAncestralDiscreteScheduler(r, o) },
  { name: 'dpmpp_2m', className: 'DPMSolverMultistepScheduler', make: (r, o) => new DPMSolverMultistepScheduler(r, o) },
  { name: 'dpm_singlestep', className: 'DPMSolverSinglestepScheduler', make: (r, o) => new DPMSolverSinglestepScheduler(r, o) },
  { name: 'unipc', className: 'UniPCMultistepScheduler', make: (r, o) => new UniPCMultistepScheduler(r, o) },
  { name: 'heun', className: 'HeunDiscreteScheduler', make: (r, o) => new HeunDiscreteScheduler(r, o) },
  { name: 'lms', className: 'LMSDiscreteScheduler', make: (r, o) => new LMSDiscreteScheduler(r, o) },
  { name: 'kdpm2', className: 'KDPM2DiscreteScheduler', make: (r, o) => new KDPM2DiscreteScheduler(r, o) },
  { name: 'kdpm2_a', className: 'KDPM2AncestralDiscreteScheduler', make: (r, o) => new KDPM2AncestralDiscreteScheduler(r, o) },
  { name: 'deis', className: 'DEISMultistepScheduler', make: (r, o) => new DEISMultistepScheduler(r, o) },
  { name: 'dpm_sde', className: 'DPMSolverSDEScheduler', make: (r, o) => new DPMSolverSDEScheduler(r, o) },
];

export const SCHEDULER_NAMES: readonly SchedulerName[] = Object.freeze(REGISTRY.map((e) => e.name));

const CLASS_NAMES: ReadonlyMap<SchedulerName, string> = new Map(REGISTRY.map((e) => [e.name, e.className]));
const BY_CLASS_NAME: ReadonlyMap<string, SchedulerName> = new Map(REGISTRY.map((e) => [e.className, e.name]));

/**
 * The sampler names of A1111 and ComfyUI, as diffusers' scheduler overview documents them (docs "Schedulers":
 * A1111/k-diffusion → diffusers): the class and the config it needs. DDIM, PLMS, UniPC and DEIS are the same
 * algorithms under the same names. "DPM++ 2S a" and "Euler a Karras" have no diffusers counterpart.
 */
export const A1111_SAMPLERS: ReadonlyMap<string, { name: SchedulerName; config: Readonly<Record<string, unknown>> }> = new Map([
  ['DPM++ 2M', { name: 'dpmpp_2m', config: {} }],
  ['DPM++ 2M Karras', { name: 'dpmpp_2m', config: { use_karras_sigmas: true } }],
  ['DPM++ 2M SDE', { name: 'dpmpp_2m', config: { algorithm_type: 'sde-dpmsolver++' } }],
  ['DPM++ 2M SDE Karras', { name: 'dpmpp_2m', config: { algorithm_type: 'sde-dpmsolver++', use_karras_sigmas: true } }],
  ['DPM++ SDE', { name: 'dpm_singlestep', config: {} }],
  ['DPM++ SDE Karras', { name: 'dpm_singlestep', config: { use_karras_sigmas: true } }],
  ['DPM2', { name: 'kdpm2', config: {} }],
  ['DPM2 Karras', { name: 'kdpm2', config: { use_karras_sigmas: true } }],
  ['DPM2 a', { name: 'kdpm2_a', config: {} }],
  ['DPM2 a Karras', { name: 'kdpm2_a', config: { use_karras_sigmas: true } }],
  ['Euler', { name: 'euler', config: {} }],
  ['Euler a', { name: 'euler_a', config: {} }],
  ['Heun', { name: 'heun', config: {} }],
  ['LMS', { name: 'lms', config: {} }],
  ['LMS Karras', { name: 'lms', config: { use_karras_sigmas: true } }],
  ['DDIM', { name: 'ddim', config: {} }],
  ['PLMS', { name: 'pndm', config: {} }],
  ['UniPC', { name: 'unipc', config: {} }],
  ['DEIS', { name: 'deis', config: {} }],
].map(([k, v]) => [k as string, v as { name: SchedulerName; config: Record<string, unknown> }]));

/** A1111 names diffusers has no scheduler for, with what to use instead. */
const NOT_IN_DIFFUSERS: ReadonlyMap<string, string> = new Map([
  ['dpm++2sa', "'DPM++ 2S a' has no diffusers scheduler (the docs call DPMSolverSinglestepScheduler very similar: 'DPM++ SDE')"],
  ['dpm++2sakarras', "'DPM++ 2S a Karras' has no diffusers scheduler (the docs call DPMSolverSinglestepScheduler with use_karras_sigmas very similar: 'DPM++ SDE Karras')"],
  ['eulerakarras', "'Euler a Karras' has no diffusers counterpart: EulerAncestralDiscreteScheduler 0.31 has no use_karras_sigmas; use 'Euler' with use_karras_sigmas, or 'DPM2 a Karras'"],
  ['dpmadaptive', "'DPM adaptive' has no diffusers scheduler"],
  ['dpmfast', "'DPM fast' has no diffusers scheduler"],
]);

// Lower-cased, without spaces; our names and diffusers' class names are in NAMES below.
const ALIASES: ReadonlyMap<string, SchedulerName> = new Map<string, SchedulerName>([
  ['plms', 'pndm'],
  ['euler-discrete', 'euler'], ['euler_discrete', 'euler'], ['eulerdiscrete', 'euler'],
  ['euler-a', 'euler_a'], ['euler-ancestral', 'euler_a'], ['euler_ancestral', 'euler_a'], ['eulera', 'euler_a'], ['k_euler_a', 'euler_a'],
  ['dpmpp-2m', 'dpmpp_2m'], ['dpmpp2m', 'dpmpp_2m'], ['dpm++2m', 'dpmpp_2m'], ['dpm++_2m', 'dpmpp_2m'], ['dpm++', 'dpmpp_2m'],
  ['dpmsolver++', 'dpmpp_2m'], ['dpmsolvermultistep', 'dpmpp_2m'], ['dpm-solver++', 'dpmpp_2m'],
  ['dpmsolversinglestep', 'dpm_singlestep'], ['unipcmultistep', 'unipc'], ['k_heun', 'heun'], ['k_lms', 'lms'],
  ['k_dpm_2', 'kdpm2'], ['k_dpm_2_a', 'kdpm2_a'], ['deismultistep', 'deis'], ['dpmsolversde', 'dpm_sde'],
]);

// Every accepted spelling → our name and the config the name implies: a Map, so a key like '__proto__' or
// 'constructor' finds nothing
const NAMES: ReadonlyMap<string, { name: SchedulerName; config: Readonly<Record<string, unknown>> }> = new Map([
  ...SCHEDULER_NAMES.map((n): [string, SchedulerName] => [n, n]),
  ...[...CLASS_NAMES].map(([n, cls]): [string, SchedulerName] => [cls.toLowerCase(), n]),
  ...ALIASES,
].map(([k, n]) => [k, { name: n, config: {} }] as const).concat([...A1111_SAMPLERS].map(([k, v]) => [normalise(k), v] as const)));

function normalise(kind: string): string {
  return kind.trim().toLowerCase().replace(/\s+/g, '');
}

/** The scheduler a name, alias, A1111 sampler name or diffusers class name stands for (case and spaces ignored). */
function lookupScheduler(kind: string): { name: SchedulerName; config: Readonly<Record<string, unknown>> } | undefined {
  return NAMES.get(normalise(kind));
}

/** Our name for a scheduler name, alias, A1111 sampler name or diffusers class name (case and spaces ignored). */
export function schedulerName(kind: string): SchedulerName {
  const found = typeof kind === 'string' ? lookupScheduler(kind) : undefined;
  if (found !== undefined) return found.name;
  const why = typeof kind === 'string' ? NOT_IN_DIFFUSERS.get(normalise(kind)) : undefined;
  if (why !== undefined) throw new Error(`unknown scheduler ${JSON.stringify(kind)}: ${why}`);
  const supported = SCHEDULER_NAMES.map((n) => `'${n}' (${CLASS_NAMES.get(n)})`).join(', ');
  throw new Error(`unknown scheduler ${JSON.stringify(kind)}: supported are ${supported}, the A1111 names ${[...A1111_SAMPLERS.keys()].map((a) => `'${a}'`).join(', ')}, and the aliases ${[...ALIASES.keys()].map((a) => `'${a}'`).join(', ')}`);
}

/**
 * A scheduler of `kind` from a scheduler_config.json's contents, as diffusers'
 * `<Class>.from_config(rawConfig, **overrides)`; an A1111 name adds the config it stands for ('DPM++ 2M
 * Karras': use_karras_sigmas true), which wins over `overrides`. Throws, naming the field and value, on a
 * value out of its domain or one difflora does not implement rather than sample differently from diffusers.
 */
export function schedulerFromConfig(kind: SchedulerName | string, rawConfig: object, overrides: Record<string, unknown> = {}): Scheduler {
  const name = schedulerName(kind);
  const implied = lookupScheduler(kind)?.config ?? {};
  const entry = REGISTRY.find((e) => e.name === name) as (typeof REGISTRY)[number];
  return entry.make(rawConfig, { ...overrides, ...implied });
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
