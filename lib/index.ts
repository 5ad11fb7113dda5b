// difflora's public API, by group. Every name is listed here explicitly.

// ---- Tensors: `torch` mirrors PyTorch's namespace (creation, scopes, autograd modes, randomness)
import * as creation from './torch.js';
import * as functional from './functional.js';
import { Tensor } from './tensor.js';
import { dispose, emptyCache, keep, memory, tidy } from './scope.js';
import { autocast, enableGrad, inferenceMode, isAutocastEnabled, isGradEnabled, noGrad } from './autograd.js';
import { Generator, defaultGenerator, manualSeed } from './random.js';
import { native } from './native.js';
import { checkpoint } from './gradient_checkpointing.js';
import { cudaIsAvailable, setAllowTF32 } from './device.js';

export const torch = {
  ...creation,
  Tensor, Generator, defaultGenerator, manualSeed,
  tidy, keep, dispose, memory, emptyCache,
  noGrad, enableGrad, inferenceMode, autocast, isAutocastEnabled, isGradEnabled, checkpoint,
  setNumThreads: (n: number): void => native.setNumThreads(n),
  info: () => native.info(),
  /** TF32 math for CUDA matmul/conv (--allow_tf32); returns the previous setting. */
  setAllowTF32,
  /** Whether libtorch sees a CUDA GPU (torch.cuda.is_available()). */
  cudaIsAvailable,
  /** Waits for queued CUDA work (no-op on CPU). */
  synchronize: (): void => native.synchronize(),
  nn: { functional },
} as const;
export { functional as F, Tensor, Generator, tidy, keep, dispose, memory, noGrad, autocast, checkpoint };
export type { DType } from './dtype.js';
export type { Device, Scalar, Shape } from './tensor.js';
export type { TensorOptions, RandomOptions } from './torch.js';

// ---- nn basics
export { Module, parameter, buffer } from './nn/module.js';
export type { StateDict, LoadResult } from './nn/module.js';
export { ModuleList, Sequential } from './nn/container.js';
export { Linear, Conv2d, GroupNorm, LayerNorm, Embedding, Dropout } from './nn/layers.js';

// ---- Optimisation
export { AdamW } from './optim/adamw.js';
export type { AdamWOptions } from './optim/adamw.js';
export { Prodigy, type ProdigyOptions } from './optim/prodigy.js';
export { Lion, type LionOptions } from './optim/lion.js';
export { EMAModel, type EMAOptions } from './optim/ema.js';
export type { Optimizer, OptimizerKind } from './optim/optimizer.js';
export { GradScaler } from './optim/grad_scaler.js';
export { clipGradNorm } from './optim/clip.js';

// ---- I/O
export { loadSafetensors, saveSafetensors, readSafetensorsHeader } from './io/safetensors.js';

// ---- Models (diffusers / transformers names; fromPretrained reads local folders and the offline HF cache)
export { CLIPTokenizer } from './models/clip_tokenizer.js';
export { CLIPTextModel, CLIPTextModelWithProjection } from './models/clip_text_model.js';
export type { CLIPTextConfig, CLIPTextModelOutput, CLIPTextModelWithProjectionOutput } from './models/clip_text_model.js';
export { AutoencoderKL } from './models/autoencoder_kl.js';
export type { AutoencoderKLConfig } from './models/autoencoder_kl.js';
export { DiagonalGaussianDistribution } from './models/vae.js';
export { Attention, AttnProcessor, setMemoryEfficientAttention } from './models/attention_processor.js';
export type { AttentionProcessor } from './models/attention_processor.js';
export { resolvePretrained, hubCacheDir } from './io/hub.js';
export type { HubOptions } from './io/hub.js';
export type { FromPretrainedOptions } from './models/loading.js';
export { UNet2DConditionModel } from './models/unet_2d_condition.js';
export type { UNetAddedConditions } from './models/unet_2d_condition.js';

// ---- LoRA (PEFT layout in memory; diffusers, PEFT and Kohya files; diffusers' names, on a model or a pipeline's models)
export {
  LoraLinear, LoraConv2d, attachLora, loraStateDictDiffusers, loraStateDictKohya, saveLoraWeights, setPeftModelStateDict,
  loadLoraWeights, setAdapters, getActiveAdapters, getListAdapters, deleteAdapters, disableLora, enableLora,
  fuseLora, unfuseLora, unloadLoraWeights, withLoraScale, convertLoraFile, kohyaToModulePath,
} from './lora/index.js';
export type {
  LoraConfig, LoraHandle, LoraInit, LoraLayout, LoraTarget, LoraTargets, LoadLoraWeightsOptions, LoadLoraWeightsResult,
} from './lora/index.js';
export { attachLoraVariant, LORA_TYPES, LOCON_TARGET_MODULES } from './lora/index.js';
export type { LoraType, LoraVariantConfig } from './lora/index.js';

// ---- Schedulers (diffusers' names and configs; loadScheduler reads scheduler_config.json)
export {
  loadScheduler, schedulerFromConfig, SCHEDULER_NAMES, A1111_SAMPLERS, DDPMScheduler, DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler,
  EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, UniPCMultistepScheduler,
  HeunDiscreteScheduler, LMSDiscreteScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler, DEISMultistepScheduler,
  DPMSolverSDEScheduler,
} from './schedulers/index.js';
export type { Scheduler, SchedulerName, StepOptions } from './schedulers/index.js';

// ---- Pipelines
export { StableDiffusionPipeline } from './pipelines/stable_diffusion.js';
export type {
  GenerateOptions, PipelineOutput, PipelineFromPretrainedOptions, StableDiffusionComponents, StepInfo, OutputType,
} from './pipelines/stable_diffusion.js';
export { StableDiffusionXLPipeline } from './pipelines/stable_diffusion_xl.js';
export { StableDiffusionImg2ImgPipeline, img2imgTimesteps } from './pipelines/stable_diffusion_img2img.js';
export type { Img2ImgOptions } from './pipelines/stable_diffusion_img2img.js';
export { AutoPipelineForText2Image, AutoPipelineForImage2Image, DiffusionPipeline, pipelineFamily } from './pipelines/auto_pipeline.js';
export type { PipelineFamily } from './pipelines/auto_pipeline.js';
export type {
  StableDiffusionXLComponents, StableDiffusionXLGenerateOptions, StableDiffusionXLEncodePromptOptions, StableDiffusionXLPromptOptions,
  StableDiffusionXLPromptEmbeds, SizePair,
} from './pipelines/stable_diffusion_xl.js';
export type { ListAdapters } from './pipelines/pipeline_utils.js';

// ---- Training: the whole loop (what `difflora train` runs) and its pieces
export { trainTextToImageLora, startTraining, trainDreamBoothLora, trainTextToImageLoraSdxl } from './training/handle.js';
export { BUILTIN_SETTINGS, prepareBuiltinDefault } from './builtin/default.js';
export type { TrainingRun, TrainMetrics, TrainOutcome, TrainHooks } from './training/handle.js';
export { runTraining, stepsArithmetic } from './training/train.js';
export { TrainOptionsError, validateTrainOptions } from './training/options.js';
export type { TrainOptions, TrainProgress, TrainResult } from './training/train.js';
export { runDreamBoothTraining } from './training/train_dreambooth.js';
export type { ClassImagesProgress } from './training/train_dreambooth.js';
export { validateDreamBoothOptions } from './training/dreambooth_options.js';
export type { DreamBoothOptions } from './training/dreambooth_options.js';
export { runSdxlTraining } from './training/train_sdxl.js';
export { validateSdxlTrainOptions } from './training/sdxl_options.js';
export type { SdxlTrainOptions } from './training/sdxl_options.js';
export type { LoraVariantOptions } from './training/lora_variant_options.js';
export { sdxlCondition, sdxlTimeIds } from './training/sdxl_step.js';
export { runTrainer } from './training/trainer.js';
export type { TrainerSpec, TrainerData, TrainerContext, TrainerOptions } from './training/trainer.js';
export type { ValidationEvent } from './training/validation.js';
export { diffusionLoss, trainingTarget, minSnrLossWeights, priorPreservationLoss } from './training/loss.js';
export { computeSnr } from './training/training_utils.js';
export { lrAt, lrMultiplier, LR_SCHEDULERS } from './training/lr_schedule.js';
export { Accumulator, encodeLatents, loraTrainingStep, optimizerStep, predictNoise, priorPreservationStep, sampleNoise, sampleTimesteps } from './training/step.js';
export type { TrainingStep } from './training/step.js';

// ---- Logging
export { TensorBoardWriter, readTensorBoardEvents } from './logging/tensorboard.js';

// ---- Distributed (c10d process groups; `difflora launch` starts the processes)
export { ProcessGroup, Work, DistributedEnvError, distributedAvailable, distributedEnv, initProcessGroupFromEnv, watchLauncher, DEFAULT_TIMEOUT_MS } from './distributed/process_group.js';
export type { Backend, ReduceOp, ProcessGroupOptions, DistributedEnv, InitFromEnvOptions } from './distributed/process_group.js';
export type { ProcessGroupOption } from './distributed/data_parallel.js';
