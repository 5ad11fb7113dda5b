// LoRA: adapters on Linear and Conv2d layers (PEFT's layout), attaching them to a model for training, their
// weight files, and diffusers-style loading for inference (named adapters, weights, fuse/unfuse, unload).
export { LoraLinear } from './lora_linear.js';
export type { LoraInit, LoraLinearOptions } from './lora_linear.js';
export { LoraConv2d } from './lora_conv2d.js';
export { LoraLayer, LoraBranch, LoraBranches } from './lora_layer.js';
export type { LoraAdapterView, WeightLayer } from './lora_layer.js';
export {
  attachLora, attachLoraToPaths, detachLora, getLoraHandle, loraLayers, mergeLora, unmergeLora, setLoraEnabled, setLoraScale,
  DEFAULT_TARGET_MODULES,
} from './attach.js';
export type { LoraConfig, LoraHandle } from './attach.js';
export {
  loraStateDictDiffusers, loraStateDictKohya, saveLoraWeights, loadLoraIntoModel, kohyaName, LORA_WEIGHT_NAME,
} from './save.js';
export type { SaveLoraOptions, LoadLoraOptions, LoadLoraResult, LoraFileFormat } from './save.js';
export {
  loadLoraWeights, setAdapters, getActiveAdapters, getListAdapters, deleteAdapters, disableLora, enableLora, fuseLora, unfuseLora,
  unloadLoraWeights, withLoraScale,
} from './adapters.js';
export type { LoraTargets, LoadLoraWeightsOptions, LoadLoraWeightsResult } from './adapters.js';
