// The SDXL parts of train_text_to_image_lora_sdxl.py's loop body; the rest (latents, noise, timesteps, forward
// diffusion, target, loss, backward) is step.ts's, as for SD 1.x:
//
//   add_time_ids = cat([original_size + crop_top_left + (resolution, resolution)]) in weight_dtype   sdxlTimeIds
//   prompt_embeds, pooled = encode_prompt([te1, te2], ids=[ids1, ids2])                              sdxlCondition
//   model_pred = unet(noisy, t, prompt_embeds, added_cond_kwargs={time_ids, text_embeds: pooled})   step.ts
import type { DType } from '../dtype.js';
import type { CLIPTextModel, CLIPTextModelWithProjection } from '../models/clip_text_model.js';
import { encodeSdxlIds } from '../pipelines/stable_diffusion_xl.js';
import type { Device, Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import type { Conditioning } from './step.js';

/**
 * The script's compute_time_ids for a batch: one row [orig_h, orig_w, crop_top, crop_left, target_h, target_w] per
 * image, [B, 6] in `dtype` (its weight_dtype) on `device`; the target size is (resolution, resolution), or each
 * image's own [h, w] (its aspect-ratio bucket, as sd-scripts' target_size).
 */
export function sdxlTimeIds(
  originalSizes: readonly (readonly [number, number])[], cropTopLefts: readonly (readonly [number, number])[],
  resolution: number | readonly (readonly [number, number])[],
  o: { dtype?: DType; device?: Device } = {},
): Tensor {
  if (originalSizes.length !== cropTopLefts.length) throw new RangeError(`sdxlTimeIds: ${originalSizes.length} original sizes but ${cropTopLefts.length} crop offsets`);
  if (typeof resolution !== 'number' && resolution.length !== originalSizes.length) throw new RangeError(`sdxlTimeIds: ${originalSizes.length} original sizes but ${resolution.length} target sizes`);
  const target = (i: number) => (typeof resolution === 'number' ? [resolution, resolution] : resolution[i]!);
  const rows = originalSizes.flatMap((size, i) => [...size, ...cropTopLefts[i]!, ...target(i)]);
  const ids = torch.tensor(Float32Array.from(rows), { shape: [originalSizes.length, 6] });
  const dtype = o.dtype ?? 'float32';
  const device = o.device ?? 'cpu';
  return dtype === 'float32' && device === 'cpu' ? ids : ids.to({ dtype, device });
}

/** Token ids of both tokenizers ([B, 77] int64 each) and the batch's time ids [B, 6]. */
export interface SdxlPromptBatch { inputIds: Tensor; inputIds2: Tensor; timeIds: Tensor }

/**
 * The UNet's conditioning for a batch: the script's encode_prompt (both encoders' penultimate hidden states,
 * concatenated; pooled from the second encoder) and added_cond_kwargs { time_ids, text_embeds: pooled }. Give
 * it to loraTrainingStep as `condition`, which runs it frozen or, with trainTextEncoder, with gradients.
 */
export function sdxlCondition(textEncoder: CLIPTextModel, textEncoder2: CLIPTextModelWithProjection, b: SdxlPromptBatch): () => Conditioning {
  return () => {
    const { embeds, pooled } = encodeSdxlIds(textEncoder, textEncoder2, b.inputIds, b.inputIds2);
    return { encoderHiddenStates: embeds, addedCond: { timeIds: b.timeIds, textEmbeds: pooled } };
  };
}
