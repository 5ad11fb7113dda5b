// The EMA of a run's LoRA weights (--use_ema) as a file: pytorch_lora_weights_ema.safetensors, in the same format
// and keys as pytorch_lora_weights.safetensors (diffusers' layout), written from the EMA's shadow weights swapped
// into the adapters for the save and swapped back after it (the trained weights stay in the models).
import type { EMAModel } from '../optim/ema.js';
import type { LoraTargets } from '../lora/load.js';
import { saveLoraWeights } from '../lora/save.js';
import { firstNonFinite } from './checkpoint.js';

export const LORA_EMA_WEIGHT_NAME = 'pytorch_lora_weights_ema.safetensors';

/** Writes the EMA weights of `targets`' LoRA (the parameters `ema` averages) to outputDir; returns the file. */
export function saveEmaLoraWeights(ema: EMAModel, outputDir: string, targets: LoraTargets, onNotice?: (message: string) => void): string {
  const bad = firstNonFinite(ema.shadow.map((s, i) => [`ema.${i}`, s] as const));
  if (bad !== undefined) throw new Error(`the EMA of the LoRA weights holds NaN or infinite values (${bad}); ${LORA_EMA_WEIGHT_NAME} was not written`);
  const file = ema.withAveragedWeights(() => saveLoraWeights(outputDir, targets, { weightName: LORA_EMA_WEIGHT_NAME }));
  onNotice?.(`saved the EMA of the LoRA weights (decay ≤ ${ema.decay}, ${ema.optimizationStep} updates) to ${file}; validation used the trained weights`);
  return file;
}
