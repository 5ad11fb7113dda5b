// The noise schedulers: the factory, the shared interface and helpers, then one class per diffusers scheduler.
export {
  A1111_SAMPLERS, loadScheduler, schedulerFromConfig, schedulerName, SCHEDULER_NAMES,
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
export {
  DPMSolverSinglestepScheduler, DPMSOLVER_SINGLESTEP_SCHEDULER_DEFAULTS, type DPMSolverSinglestepSchedulerConfig,
} from './scheduling_dpmsolver_singlestep.js';
export { UniPCMultistepScheduler, UNIPC_MULTISTEP_SCHEDULER_DEFAULTS, type UniPCMultistepSchedulerConfig } from './scheduling_unipc_multistep.js';
export { HeunDiscreteScheduler, HEUN_DISCRETE_SCHEDULER_DEFAULTS, type HeunDiscreteSchedulerConfig } from './scheduling_heun_discrete.js';
export { LMSDiscreteScheduler, LMS_DISCRETE_SCHEDULER_DEFAULTS, type LMSDiscreteSchedulerConfig } from './scheduling_lms_discrete.js';
export { KDPM2DiscreteScheduler, KDPM2_DISCRETE_SCHEDULER_DEFAULTS, type KDPM2DiscreteSchedulerConfig } from './scheduling_k_dpm_2_discrete.js';
export {
  KDPM2AncestralDiscreteScheduler, KDPM2_ANCESTRAL_DISCRETE_SCHEDULER_DEFAULTS, type KDPM2AncestralDiscreteSchedulerConfig,
} from './scheduling_k_dpm_2_ancestral_discrete.js';
export { DEISMultistepScheduler, DEIS_MULTISTEP_SCHEDULER_DEFAULTS, type DEISMultistepSchedulerConfig } from './scheduling_deis_multistep.js';
export { DPMSolverSDEScheduler, DPMSOLVER_SDE_SCHEDULER_DEFAULTS, type DPMSolverSDESchedulerConfig } from './scheduling_dpmsolver_sde.js';
