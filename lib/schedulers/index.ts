// The noise schedulers: the factory, the shared interface and helpers, then one class per diffusers scheduler.
export {
  loadScheduler, schedulerFromConfig, schedulerName, SCHEDULER_NAMES,
} from './scheduler.js';
export {
  SchedulerBase, type BetaSchedule, type PredictionType, type Scheduler, type SchedulerName, type StepOptions, type TimestepSpacing,
} from './scheduling_utils.js';
export { SigmaSchedulerBase } from './scheduling_utils_sigmas.js';
export {
  DDPMScheduler, DDPM_SCHEDULER_DEFAULTS, parseDDPMSchedulerConfig, type DDPMSchedulerConfig,
} from './scheduling_ddpm.js';
export { DDIMScheduler, DDIM_SCHEDULER_DEFAULTS, type DDIMSchedulerConfig } from './scheduling_ddim.js';
export { PNDMScheduler, PNDM_SCHEDULER_DEFAULTS, type PNDMSchedulerConfig } from './scheduling_pndm.js';
export {
  EulerDiscreteScheduler, EULER_DISCRETE_SCHEDULER_DEFAULTS, type EulerDiscreteSchedulerConfig,
} from './scheduling_euler_discrete.js';
export {
  EulerAncestralDiscreteScheduler, EULER_ANCESTRAL_DISCRETE_SCHEDULER_DEFAULTS, type EulerAncestralDiscreteSchedulerConfig,
} from './scheduling_euler_ancestral_discrete.js';
export {
  DPMSolverMultistepScheduler, DPMSOLVER_MULTISTEP_SCHEDULER_DEFAULTS, type DPMSolverMultistepSchedulerConfig,
} from './scheduling_dpmsolver_multistep.js';
