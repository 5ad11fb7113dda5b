// The models a run trains LoRA on, as one list in the optimizer's order (the scripts' params_to_optimize: the
// UNet's LoRA parameters, then the text encoder's): their parameters under one naming, for the optimizer, the
// checkpoints and the finite check, and the same models as the LoRA loader's and writer's targets.
import { getLoraHandle } from '../lora/attach.js';
import type { LoraComponent } from '../lora/formats.js';
import type { LoraTargets } from '../lora/load.js';
import type { Module } from '../nn/module.js';
import type { Tensor } from '../tensor.js';

/** [component, model] pairs, e.g. [['unet', unet], ['text_encoder', textEncoder]]; the UNet first. */
export type LoraComponents = readonly (readonly [LoraComponent, Module])[];

/**
 * Every LoRA parameter in PEFT's order per model, models in the given order: the UNet's under PEFT's names
 * (`<module path>.lora_A.weight`), another component's prefixed with it (`text_encoder.<module path>.lora_A.weight`),
 * the names parseLoraKey reads back.
 */
export function loraNamedParameters(components: LoraComponents): [string, Tensor][] {
  return components.flatMap(([component, model]) => getLoraHandle(model).namedParameters()
    .map(([n, p]): [string, Tensor] => [component === 'unet' ? n : `${component}.${n}`, p]));
}

export function loraParameters(components: LoraComponents): Tensor[] {
  return loraNamedParameters(components).map(([, p]) => p);
}

/** The models as the LoRA loader and writer take them ({ unet, textEncoder, textEncoder2 }). */
export function loraTargets(components: LoraComponents): LoraTargets {
  const get = (c: LoraComponent) => components.find(([name]) => name === c)?.[1];
  const unet = get('unet');
  if (!unet) throw new Error("internal: the LoRA components need a 'unet'");
  const textEncoder = get('text_encoder');
  const textEncoder2 = get('text_encoder_2');
  return { unet, ...(textEncoder ? { textEncoder } : {}), ...(textEncoder2 ? { textEncoder2 } : {}) };
}
