// LoRA: adapters on Linear layers (PEFT's layout), attaching them to a model, and their weight files.
export { LoraLinear } from './lora_linear.js';
export type { LoraInit, LoraLinearOptions } from './lora_linear.js';
export {
  attachLora, attachLoraToPaths, detachLora, getLoraHandle, loraLayers, mergeLora, unmergeLora, setLoraEnabled, setLoraScale,
  DEFAULT_TARGET_MODULES,
} from './attach.js';
export type { LoraConfig, LoraHandle } from './attach.js';
export {
  loraStateDictDiffusers, loraStateDictKohya, saveLoraWeights, loadLoraIntoModel, kohyaName, LORA_WEIGHT_NAME,
} from './save.js';
export type { SaveLoraOptions, LoadLoraOptions, LoadLoraResult, LoraFileFormat } from './save.js';
