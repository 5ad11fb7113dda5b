// The models of SDXL LoRA training, as train_text_to_image_lora_sdxl.py loads them: both tokenizers, the noise
// scheduler (a DDPMScheduler from SDXL's Euler config: only the betas matter for add_noise), both text encoders,
// the VAE (the model's in float32 — SDXL's VAE overflows in fp16 — or --pretrained_vae_model_name_or_path's in the
// weight dtype) and the UNet, frozen in the weight dtype; then the UNet's LoRA and, with --train_text_encoder, the
// same LoRA on both text encoders (their parameters fp32, attached after the cast).
import type { DType } from '../dtype.js';
import { resolvePretrained } from '../io/hub.js';
import { AutoencoderKL } from '../models/autoencoder_kl.js';
import { CLIPTextModel, CLIPTextModelWithProjection } from '../models/clip_text_model.js';
import { CLIPTokenizer } from '../models/clip_tokenizer.js';
import { readModelIndex, type FromPretrainedOptions } from '../models/loading.js';
import { UNet2DConditionModel } from '../models/unet_2d_condition.js';
import { DDPMScheduler } from '../schedulers/scheduling_ddpm.js';
import type { LoraComponents } from './lora_components.js';
import { attachTextEncoderLora, attachUnetLora } from './models.js';
import type { ResolvedSdxlTrainOptions } from './sdxl_options.js';
import type { ResolvedLoraVariantOptions } from './lora_variant_options.js';

/** model_index.json classes of SDXL base pipelines (the folders train-sdxl can train). */
const SDXL_CLASSES = ['StableDiffusionXLPipeline', 'StableDiffusionXLImg2ImgPipeline', 'StableDiffusionXLInpaintPipeline'];

export interface SdxlTrainingModels {
  tokenizer: CLIPTokenizer;
  tokenizer2: CLIPTokenizer;
  noiseScheduler: DDPMScheduler;
  textEncoder: CLIPTextModel;
  textEncoder2: CLIPTextModelWithProjection;
  vae: AutoencoderKL;
  unet: UNet2DConditionModel;
  /** The LoRA-carrying models in the optimizer's order (UNet, then text_encoder and text_encoder_2 with --train_text_encoder). */
  lora: LoraComponents;
  load: FromPretrainedOptions;
  /** model_index.json's force_zeros_for_empty_prompt, for the validation pipeline. */
  forceZerosForEmptyPrompt: boolean;
}

type ModelOptions = Pick<ResolvedSdxlTrainOptions, 'pretrainedModelNameOrPath' | 'pretrainedVaeModelNameOrPath' | 'revision' | 'cacheDir' | 'variant' |
  'rank' | 'trainTextEncoder' | 'gradientCheckpointing' | 'enableXformersMemoryEfficientAttention'> & ResolvedLoraVariantOptions;

/**
 * Refuses a model that is not an SDXL pipeline before anything loads, naming what it is: an SD 1.x/2.x folder
 * (StableDiffusionPipeline) has one text encoder and no added conditions, and is trained with `difflora train`.
 */
export function checkSdxlModel(model: string, load: FromPretrainedOptions): { forceZerosForEmptyPrompt: boolean } {
  const dir = resolvePretrained(model, load);
  const index = readModelIndex(dir);
  const cls = index._class_name;
  if (typeof cls === 'string' && !SDXL_CLASSES.includes(cls)) {
    const hint = cls.startsWith('StableDiffusion') ? "; train Stable Diffusion 1.x/2.x LoRAs with 'difflora train' (trainTextToImageLora)" : '';
    throw new Error(`'${model}' holds a ${cls} (model_index.json _class_name), not a StableDiffusionXLPipeline: SDXL LoRA training needs an SDXL model${hint}`);
  }
  return { forceZerosForEmptyPrompt: index.force_zeros_for_empty_prompt !== false };
}

/**
 * Loads the models onto `device` (frozen ones in `dtype`) and attaches the LoRA. Each model with native memory is
 * handed to `own` as soon as it is loaded, so a failure later frees it.
 */
export function loadSdxlTrainingModels(o: ModelOptions, device: string, dtype: DType, own: <T extends { dispose(): void }>(x: T) => T): SdxlTrainingModels {
  const load: FromPretrainedOptions = { revision: o.revision ?? undefined, cacheDir: o.cacheDir ?? undefined };
  const model = o.pretrainedModelNameOrPath;
  const variant = o.variant ?? undefined;
  const { forceZerosForEmptyPrompt } = checkSdxlModel(model, load);
  const tokenizer = CLIPTokenizer.fromPretrained(model, { ...load, subfolder: 'tokenizer' });
  const tokenizer2 = CLIPTokenizer.fromPretrained(model, { ...load, subfolder: 'tokenizer_2' });
  const noiseScheduler = own(DDPMScheduler.fromPretrained(model, { ...load, subfolder: 'scheduler' }));
  const textEncoder = own(CLIPTextModel.fromPretrained(model, { ...load, subfolder: 'text_encoder', variant, dtype, device }));
  const textEncoder2 = own(CLIPTextModelWithProjection.fromPretrained(model, { ...load, subfolder: 'text_encoder_2', variant, dtype, device }));
  // the script keeps the model's VAE in float32 (SDXL's VAE gives NaN in fp16); a VAE given apart runs in the weight dtype
  const vae = own(o.pretrainedVaeModelNameOrPath
    ? AutoencoderKL.fromPretrained(o.pretrainedVaeModelNameOrPath, { ...load, variant, dtype, device })
    : AutoencoderKL.fromPretrained(model, { ...load, subfolder: 'vae', variant, dtype: 'float32', device }));
  const unet = own(UNet2DConditionModel.fromPretrained(model, { ...load, subfolder: 'unet', variant, dtype, device }));
  if (unet.config.additionEmbedType !== 'text_time') {
    throw new Error(`'${model}': the UNet's addition_embed_type is ${JSON.stringify(unet.config.additionEmbedType ?? null)}, not 'text_time': not an SDXL UNet`);
  }
  attachUnetLora(unet, o);
  if (o.trainTextEncoder) {
    for (const te of [textEncoder, textEncoder2]) {
      attachTextEncoderLora(te, o.rank, o);
      if (o.gradientCheckpointing) te.enableGradientCheckpointing(); // as the script: the encoders too when they train
    }
  }
  const lora: LoraComponents = o.trainTextEncoder ? [['unet', unet], ['text_encoder', textEncoder], ['text_encoder_2', textEncoder2]] : [['unet', unet]];
  return { tokenizer, tokenizer2, noiseScheduler, textEncoder, textEncoder2, vae, unet, lora, load, forceZerosForEmptyPrompt };
}
