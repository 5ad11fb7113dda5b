// LoRA: adapters on Linear and Conv2d layers (PEFT's layout), attaching them to a model for training, their
// weight files in every layout (one parser: formats.ts; one check-then-apply loader: load.ts), and diffusers'
// vocabulary for inference (loadLoraWeights, setAdapters, fuseLora/unfuseLora, disableLora/enableLora,
// unloadLoraWeights), on a model or on a pipeline's { unet, textEncoder[, textEncoder2 (SDXL)] }.
export { LoraLinear } from './lora_linear.js';
export type { LoraInit, LoraLinearOptions } from './lora_linear.js';
export { LoraConv2d } from './lora_conv2d.js';
export { LoraLayer, LoraBranch, LoraBranches } from './lora_layer.js';
export type { LoraAdapterView, WeightLayer } from './lora_layer.js';
export { attachLora, getLoraHandle, loraLayers, DEFAULT_TARGET_MODULES } from './attach.js';
export type { LoraConfig, LoraHandle } from './attach.js';
export { attachLoraVariant, variantTargets, factorization, LORA_TYPES, LOCON_TARGET_MODULES } from './variants.js';
export type { LoraType, LoraVariantConfig, VariantTarget } from './variants.js';
export { loraStateDictDiffusers, loraStateDictKohya, saveLoraWeights } from './save.js';
export type { SaveLoraOptions } from './save.js';
export {
  kohyaName, kohyaPrefix, kohyaToModulePath, parseLoraFile, parseLoraKey, sgmToDiffusersPath, toDiffusersKeys, toKohyaKeys,
} from './formats.js';
export type {
  LoraComponent, LoraDescription, LoraEntry, LoraKeyLayout, LoraLayout, LoraWeights, RejectedLoraEntry,
} from './formats.js';
export { LORA_WEIGHT_NAME, setPeftModelStateDict } from './load.js';
export type { ApplyLoraResult, LoraTarget, LoraTargets, SetPeftModelStateDictOptions } from './load.js';
export {
  loadLoraWeights, setAdapters, getActiveAdapters, getListAdapters, deleteAdapters, disableLora, enableLora, fuseLora, unfuseLora,
  unloadLoraWeights, withLoraScale,
} from './adapters.js';
export type { LoadLoraWeightsOptions, LoadLoraWeightsResult } from './adapters.js';
export { convertLoraFile } from './convert.js';
