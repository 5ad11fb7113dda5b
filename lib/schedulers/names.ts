// The names a scheduler goes by, with no dependencies (the CLI checks --scheduler without loading the addon):
// difflora's short names, diffusers' class names, aliases, and the A1111/ComfyUI sampler names of diffusers'
// scheduler overview ("Schedulers": A1111/k-diffusion → diffusers) with the config each implies. The
// factory that builds them is scheduler.ts.
import type { SchedulerName } from './scheduling_utils.js';

/** Every scheduler: our short name and diffusers' class name, in the order `--help` lists them. */
export const CLASS_NAMES: ReadonlyMap<SchedulerName, string> = new Map<SchedulerName, string>([
  ['pndm', 'PNDMScheduler'],
  ['ddim', 'DDIMScheduler'],
  ['ddpm', 'DDPMScheduler'],
  ['euler', 'EulerDiscreteScheduler'],
  ['euler_a', 'EulerAncestralDiscreteScheduler'],
  ['dpmpp_2m', 'DPMSolverMultistepScheduler'],
  ['dpm_singlestep', 'DPMSolverSinglestepScheduler'],
  ['unipc', 'UniPCMultistepScheduler'],
  ['heun', 'HeunDiscreteScheduler'],
  ['lms', 'LMSDiscreteScheduler'],
  ['kdpm2', 'KDPM2DiscreteScheduler'],
  ['kdpm2_a', 'KDPM2AncestralDiscreteScheduler'],
  ['deis', 'DEISMultistepScheduler'],
  ['dpm_sde', 'DPMSolverSDEScheduler'],
]);

export const SCHEDULER_NAMES: readonly SchedulerName[] = Object.freeze([...CLASS_NAMES.keys()]);

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

export function normalise(kind: string): string {
  return kind.trim().toLowerCase().replace(/\s+/g, '');
}

/** The scheduler a name, alias, A1111 sampler name or diffusers class name stands for (case and spaces ignored). */
export function lookupScheduler(kind: string): { name: SchedulerName; config: Readonly<Record<string, unknown>> } | undefined {
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
