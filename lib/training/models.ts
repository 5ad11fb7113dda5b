// The models of text-to-image LoRA training (SD 1.x/2.x), as the script loads them: tokenizer, noise
// scheduler, text encoder, VAE and UNet from one pretrained folder, frozen in the weight dtype, then the
// LoRA attached to the UNet's attention (its parameters in fp32, attached after the cast).
import { AutoencoderKL } from '../models/autoencoder_kl.js';
import { CLIPTextModel } from '../models/clip_text_model.js';
import { CLIPTokenizer } from '../models/clip_tokenizer.js';
import { UNet2DConditionModel } from '../models/unet_2d_condition.js';
import { setMemoryEfficientAttention } from '../models/attention_processor.js';
import type { FromPretrainedOptions } from '../models/loading.js';
import { DEFAULT_TARGET_MODULES, type LoraHandle } from '../lora/attach.js';
import { attachLoraVariant, variantTargets, type LoraVariantConfig } from '../lora/variants.js';
import type { Module } from '../nn/module.js';
import { DDPMScheduler } from '../schedulers/scheduling_ddpm.js';
import type { DType } from '../dtype.js';
import { TrainOptionsError, type ResolvedTrainOptions } from './options.js';
import { VARIANT_FLAG_NAMES, textEncoderVariantConfig, unetVariantConfig, type ResolvedLoraVariantOptions } from './lora_variant_options.js';

/**
 * train_dreambooth_lora.py's UNet targets: add_k_proj/add_v_proj exist only in IF-style UNets (AttnAddedKV), so
 * on SD UNets they match nothing and these are the text-to-image script's to_q/to_k/to_v/to_out.0.
 */
export const DREAMBOOTH_UNET_LORA_TARGETS: readonly string[] = ['to_k', 'to_q', 'to_v', 'to_out.0', 'add_k_proj', 'add_v_proj'];

/** The text encoders' attention projections the scripts put LoRA on (CLIP's q/k/v/out_proj). */
export const TEXT_ENCODER_LORA_TARGETS: readonly string[] = ['q_proj', 'k_proj', 'v_proj', 'out_proj'];

/**
 * LoRA on a text encoder's attention projections, as the scripts' text_encoder.add_adapter(LoraConfig(r=rank,
 * lora_alpha=rank, init_lora_weights="gaussian", target_modules=[q/k/v/out_proj])): any CLIP-like module whose
 * attention has Linear layers of these names. Everything else of the model is frozen; it is put in train mode.
 */
export function attachTextEncoderLora(textEncoder: Module, rank: number, variant: ResolvedLoraVariantOptions = PLAIN_LORA): LoraHandle {
  const lora = attachChecked(textEncoder, textEncoderVariantConfig({ ...variant, rank }, TEXT_ENCODER_LORA_TARGETS), false);
  textEncoder.train();
  return lora;
}

/** The scripts' adapter: plain LoRA, alpha = rank, the command's targets. */
const PLAIN_LORA: ResolvedLoraVariantOptions = { loraType: 'lora', loraAlpha: null, loraTargetModules: null, convRank: null, convAlpha: null, lokrFactor: -1, exportKohya: false };

/** attachLoraVariant with its problems (unmatched targets, ranks too large) as a TrainOptionsError naming the flags. */
function attachChecked(model: Module, config: LoraVariantConfig, checkNames: boolean): LoraHandle {
  const { problems } = variantTargets(model, config, { checkNames, names: VARIANT_FLAG_NAMES });
  if (problems.length) throw new TrainOptionsError(problems);
  return attachLoraVariant(model, config, { names: VARIANT_FLAG_NAMES });
}

export interface TrainingModels {
  tokenizer: CLIPTokenizer;
  noiseScheduler: DDPMScheduler;
  textEncoder: CLIPTextModel;
  vae: AutoencoderKL;
  unet: UNet2DConditionModel;
  lora: LoraHandle;
  /** How the models were found (revision, cache), for loading more of the same model later. */
  load: FromPretrainedOptions;
}

type ModelOptions = Pick<ResolvedTrainOptions, 'pretrainedModelNameOrPath' | 'revision' | 'cacheDir' | 'variant' | 'rank' | 'gradientCheckpointing' | 'enableXformersMemoryEfficientAttention'>
  & ResolvedLoraVariantOptions;

/**
 * Loads the models onto `device` in `dtype` and attaches the LoRA (rank = alpha, gaussian init). Each model
 * with native memory is handed to `own` as soon as it is loaded, so a failure later frees it.
 */
export function loadTrainingModels(
  o: ModelOptions, device: string, dtype: DType, own: <T extends { dispose(): void }>(x: T) => T,
  more: { unetTargets?: readonly string[]; tokenizerName?: string | null } = {},
): TrainingModels {
  const load: FromPretrainedOptions = { revision: o.revision ?? undefined, cacheDir: o.cacheDir ?? undefined };
  const model = o.pretrainedModelNameOrPath;
  const variant = o.variant ?? undefined;
  // --tokenizer_name (DreamBooth): another tokenizer folder or id, read as AutoTokenizer.from_pretrained(name) does
  const tokenizer = more.tokenizerName ? CLIPTokenizer.fromPretrained(more.tokenizerName, load) : CLIPTokenizer.fromPretrained(model, { ...load, subfolder: 'tokenizer' });
  const noiseScheduler = own(DDPMScheduler.fromPretrained(model, { ...load, subfolder: 'scheduler' }));
  const textEncoder = own(CLIPTextModel.fromPretrained(model, { ...load, subfolder: 'text_encoder', dtype, device }));
  const vae = own(AutoencoderKL.fromPretrained(model, { ...load, subfolder: 'vae', variant, dtype, device }));
  const unet = own(UNet2DConditionModel.fromPretrained(model, { ...load, subfolder: 'unet', variant, dtype, device }));
  const lora = attachUnetLora(unet, o, more.unetTargets);
  return { tokenizer, noiseScheduler, textEncoder, vae, unet, lora, load };
}

/**
 * The scripts' unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules)),
 * the UNet in train mode, then --gradient_checkpointing and the memory-efficient attention.
 */
export function attachUnetLora(
  unet: UNet2DConditionModel, o: Pick<ModelOptions, 'rank' | 'gradientCheckpointing' | 'enableXformersMemoryEfficientAttention'> & Partial<ResolvedLoraVariantOptions>,
  targetModules: readonly string[] = DEFAULT_TARGET_MODULES,
): LoraHandle {
  const variant = { ...PLAIN_LORA, ...o };
  // --lora_type and its options (lora_variant_options.ts); a name the user gave in --lora_target_modules must match a module
  const lora = attachChecked(unet, unetVariantConfig({ ...variant, rank: o.rank }, targetModules), variant.loraTargetModules !== null);
  unet.train();
  if (o.gradientCheckpointing) unet.enableGradientCheckpointing();
  if (o.enableXformersMemoryEfficientAttention) setMemoryEfficientAttention(unet);
  return lora;
}
