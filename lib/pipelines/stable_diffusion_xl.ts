// StableDiffusionXLPipeline (diffusers 0.31 pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py), text to
// image with SDXL: two CLIP text encoders (their penultimate hidden states concatenated; the second one's projected
// eos token as the pooled embedding), a UNet that also takes the pooled embedding and six size/crop numbers
// ("time ids") through its added conditions, a VAE that is decoded in float32 when it asks for it (force_upcast).
// The order of operations is diffusers', so the same latents, prompts and scheduler give the same images (the
// tests compare every step's latents). What it shares with StableDiffusionPipeline lives in pipeline_utils.ts.
//
// One deliberate difference: with several images per call and negative size/crop conditions that differ from the
// positive ones, diffusers pairs the time-id rows with the wrong half of the batch (it repeats [negative, positive]
// B·n times); here the negative rows go with the unconditional half and the positive rows with the conditional
// half. With the default (identical) conditions, as in every golden, the two agree.
import { join } from 'node:path';
import { existsSync, statSync } from 'node:fs';
import { noGrad } from '../autograd.js';
import type { DType } from '../dtype.js';
import { resolvePretrained } from '../io/hub.js';
import type { LoraTargets } from '../lora/adapters.js';
import { AutoencoderKL } from '../models/autoencoder_kl.js';
import { CLIPTextModel, CLIPTextModelWithProjection } from '../models/clip_text_model.js';
import { CLIPTokenizer } from '../models/clip_tokenizer.js';
import { show } from '../models/config.js';
import { readModelIndex } from '../models/loading.js';
import { UNet2DConditionModel } from '../models/unet_2d_condition.js';
import { Generator } from '../random.js';
import { keep, tidy } from '../scope.js';
import { loadScheduler, type Scheduler } from '../schedulers/scheduler.js';
import type { Device, Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import {
  DiffusionPipelineBase, PIPELINE_OPTIONS, checkHalfDevice, finishOutput, release, repeatPerPrompt, resolveSettings, textList,
  type GenerateOptions, type PipelineFromPretrainedOptions, type PipelineOutput,
} from './pipeline_utils.js';

const NAME = 'StableDiffusionXLPipeline';
/** model_index.json classes whose folders hold this pipeline's components. */
const SDXL_CLASSES = ['StableDiffusionXLPipeline', 'StableDiffusionXLImg2ImgPipeline', 'StableDiffusionXLInpaintPipeline'];

export interface StableDiffusionXLComponents {
  vae: AutoencoderKL;
  textEncoder: CLIPTextModel;
  textEncoder2: CLIPTextModelWithProjection;
  tokenizer: CLIPTokenizer;
  tokenizer2: CLIPTokenizer;
  unet: UNet2DConditionModel;
  scheduler: Scheduler;
  /** model_index.json's force_zeros_for_empty_prompt (diffusers' default true): no negative prompt → zero embeddings. */
  forceZerosForEmptyPrompt?: boolean;
}

/** (height, width) or (top, left), in pixels. */
export type SizePair = [number, number];

/** The second text encoder's prompts and the pooled embeddings: generate and encodePrompt take them alike. */
export interface StableDiffusionXLPromptOptions {
  /** The second text encoder's prompt (default: `prompt`). */
  prompt2?: string | string[];
  negativePrompt2?: string | string[];
  /** With `promptEmbeds`: the pooled embedding [B, projection_dim] (required together, as in diffusers). */
  pooledPromptEmbeds?: Tensor;
  negativePooledPromptEmbeds?: Tensor;
}

export interface StableDiffusionXLGenerateOptions extends GenerateOptions, StableDiffusionXLPromptOptions {
  /** SDXL's micro-conditioning (default: (height, width), (0, 0), (height, width)). */
  originalSize?: SizePair;
  cropsCoordsTopLeft?: SizePair;
  targetSize?: SizePair;
  /** Negative conditioning (used only when both sizes are given, as diffusers; else the positive ones). */
  negativeOriginalSize?: SizePair;
  negativeCropsCoordsTopLeft?: SizePair;
  negativeTargetSize?: SizePair;
}

/** clipSkip conditions on hidden_states[-(clipSkip + 2)] instead of the penultimate layer (prompts only, as diffusers). */
export interface StableDiffusionXLEncodePromptOptions
  extends StableDiffusionXLPromptOptions, Pick<GenerateOptions, 'negativePrompt' | 'promptEmbeds' | 'negativePromptEmbeds' | 'clipSkip'> {
  numImagesPerPrompt?: number;
  doClassifierFreeGuidance?: boolean;
  /** Scales the text encoders' LoRA layers while encoding. */
  loraScale?: number;
}

export interface StableDiffusionXLPromptEmbeds {
  /** [B·n, 77, D1 + D2]. */
  promptEmbeds: Tensor;
  negativePromptEmbeds: Tensor | null;
  /** [B·n, projection_dim]. */
  pooledPromptEmbeds: Tensor;
  negativePooledPromptEmbeds: Tensor | null;
}

export class StableDiffusionXLPipeline extends DiffusionPipelineBase {
  vae: AutoencoderKL;
  textEncoder: CLIPTextModel;
  textEncoder2: CLIPTextModelWithProjection;
  tokenizer: CLIPTokenizer;
  tokenizer2: CLIPTokenizer;
  unet: UNet2DConditionModel;
  scheduler: Scheduler;
  readonly forceZerosForEmptyPrompt: boolean;

  constructor(c: StableDiffusionXLComponents) {
    super();
    if (c.unet.config.additionEmbedType !== 'text_time') {
      throw new Error(`${NAME}: the UNet's addition_embed_type is ${show(c.unet.config.additionEmbedType)}; SDXL needs 'text_time' (an SD 1.x/2.x UNet goes with StableDiffusionPipeline)`);
    }
    this.vae = c.vae;
    this.textEncoder = c.textEncoder;
    this.textEncoder2 = c.textEncoder2;
    this.tokenizer = c.tokenizer;
    this.tokenizer2 = c.tokenizer2;
    this.unet = c.unet;
    this.scheduler = c.scheduler;
    this.forceZerosForEmptyPrompt = c.forceZerosForEmptyPrompt ?? true;
  }

  /**
   * A diffusers SDXL folder (model_index.json with unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/,
   * tokenizer_2/, scheduler/), or a model id in the offline Hugging Face cache. `dtype`/`device` place the models.
   */
  static fromPretrained(pathOrId: string, o: PipelineFromPretrainedOptions = {}): StableDiffusionXLPipeline {
    const dir = resolvePretrained(pathOrId, o, { known: PIPELINE_OPTIONS, where: 'StableDiffusionXLPipeline.fromPretrained' });
    const index = readModelIndex(dir);
    const cls = index._class_name;
    if (typeof cls === 'string' && !SDXL_CLASSES.includes(cls)) {
      const hint = cls.startsWith('StableDiffusion') && !cls.startsWith('StableDiffusionXL') ? ' (load it with StableDiffusionPipeline)' : '';
      throw new Error(`${NAME}: '${dir}' holds a ${cls}, not an SDXL pipeline${hint}`);
    }
    for (const part of ['text_encoder', 'text_encoder_2', 'tokenizer', 'tokenizer_2', 'unet', 'vae', 'scheduler']) {
      const entry = index[part];
      const folder = join(dir, part);
      const why = entry === undefined ? 'model_index.json does not list it'
        : Array.isArray(entry) && entry[0] === null ? 'model_index.json sets it to [null, null] (an SDXL refiner? it has no first text encoder; not supported)'
          : !existsSync(folder) || !statSync(folder).isDirectory() ? `the folder '${folder}' is missing` : null;
      if (why) throw new Error(`${NAME}: '${dir}' has no ${part}: ${why}. An SDXL pipeline needs both text encoders (text_encoder, text_encoder_2) and tokenizers (tokenizer, tokenizer_2), the UNet, the VAE and the scheduler.`);
    }
    const forceZeros = index.force_zeros_for_empty_prompt;
    if (forceZeros !== undefined && typeof forceZeros !== 'boolean') {
      throw new Error(`${NAME}: model_index.json '${join(dir, 'model_index.json')}': force_zeros_for_empty_prompt must be true or false, got ${show(forceZeros)}`);
    }
    checkHalfDevice(NAME, o.dtype, o.device);
    const { scheduler: kind, schedulerOverrides, ...load } = o;
    const parts: Partial<StableDiffusionXLComponents> = { forceZerosForEmptyPrompt: forceZeros ?? true };
    try {
      parts.tokenizer = CLIPTokenizer.fromPretrained(dir, { ...load, subfolder: 'tokenizer' });
      parts.tokenizer2 = CLIPTokenizer.fromPretrained(dir, { ...load, subfolder: 'tokenizer_2' });
      parts.scheduler = loadScheduler(dir, { ...load, subfolder: 'scheduler', kind, overrides: schedulerOverrides });
      parts.textEncoder = CLIPTextModel.fromPretrained(dir, { ...load, subfolder: 'text_encoder' });
      parts.textEncoder2 = CLIPTextModelWithProjection.fromPretrained(dir, { ...load, subfolder: 'text_encoder_2' });
      parts.vae = AutoencoderKL.fromPretrained(dir, { ...load, subfolder: 'vae' });
      parts.unet = UNet2DConditionModel.fromPretrained(dir, { ...load, subfolder: 'unet' });
      return new StableDiffusionXLPipeline(parts as StableDiffusionXLComponents);
    } catch (e) {
      for (const m of [parts.textEncoder, parts.textEncoder2, parts.vae, parts.unet]) m?.dispose();
      parts.scheduler?.dispose();
      throw e;
    }
  }

  protected get loraTargets(): LoraTargets { return { unet: this.unet, textEncoder: this.textEncoder, textEncoder2: this.textEncoder2 }; }
  private get models() { return [this.unet, this.vae, this.textEncoder, this.textEncoder2]; }
  /** Where and in what dtype the second text encoder runs (prompt embeddings are cast to it, as diffusers). */
  private get textEncoder2Weight(): Tensor { return this.textEncoder2.text_model.embeddings.token_embedding.weight; }

  /** Moves/casts the four models (diffusers' pipe.to). */
  to(o: { device?: Device; dtype?: DType }): this {
    if (o.dtype === 'float16' && (o.device ?? this.device) === 'cpu') throw new Error(`${NAME}.to: float16 needs a CUDA device; use 'bfloat16' on CPU`);
    for (const m of this.models) m.to(o);
    return this;
  }

  /** Frees the models' and the scheduler's tensors. */
  dispose(): void {
    for (const m of this.models) m.dispose();
    this.scheduler.dispose();
  }

  // ---- prompt

  /**
   * diffusers' encode_prompt: both encoders' hidden_states[-2] (−(clipSkip + 2) for prompts) concatenated on the
   * last dimension, and the second encoder's text_embeds as the pooled embedding; with guidance the same for the
   * negative prompts, or zeros when there is none and force_zeros_for_empty_prompt is set. Each prompt's rows are
   * repeated numImagesPerPrompt times. The tensors are returned to the caller's scope.
   */
  encodePrompt(prompt: string | string[] | undefined, o: StableDiffusionXLEncodePromptOptions = {}): StableDiffusionXLPromptEmbeds {
    const n = o.numImagesPerPrompt ?? 1;
    const cfg = o.doClassifierFreeGuidance ?? true;
    if (o.promptEmbeds && !o.pooledPromptEmbeds) throw new TypeError(`${NAME}: with \`promptEmbeds\`, give \`pooledPromptEmbeds\` too (the second text encoder's text_embeds)`);
    if (o.negativePromptEmbeds && !o.negativePooledPromptEmbeds) throw new TypeError(`${NAME}: with \`negativePromptEmbeds\`, give \`negativePooledPromptEmbeds\` too`);
    const encode = (): StableDiffusionXLPromptEmbeds => noGrad(() => tidy(() => {
      // 1. prompts: tokenizer → text_encoder and tokenizer_2 → text_encoder_2 (prompt2, default prompt)
      let cond = o.promptEmbeds;
      let pooled = o.pooledPromptEmbeds;
      if (!cond || !pooled) {
        if (prompt === undefined) throw new TypeError(`${NAME}: give \`prompt\` or \`promptEmbeds\``);
        const texts = typeof prompt === 'string' ? [prompt] : prompt;
        const texts2 = textList(NAME, 'prompt_2', o.prompt2 || texts, texts.length);
        ({ embeds: cond, pooled } = this.encodeTexts(texts, texts2, o.clipSkip, 77));
      }
      const batch = cond.shape[0] ?? 1;
      // 2. negatives: given, zeros (none given and force_zeros_for_empty_prompt), or encoded ('' when none)
      let uncond: Tensor | null = null;
      let uncondPooled: Tensor | null = null;
      if (cfg) {
        if (o.negativePromptEmbeds && o.negativePooledPromptEmbeds) {
          [uncond, uncondPooled] = [o.negativePromptEmbeds, o.negativePooledPromptEmbeds];
        } else if (o.negativePrompt === undefined && this.forceZerosForEmptyPrompt) {
          [uncond, uncondPooled] = [torch.zerosLike(cond), torch.zerosLike(pooled)];
        } else {
          const negs = textList(NAME, 'negative prompt', o.negativePrompt || '', batch);
          const negs2 = textList(NAME, 'negative_prompt_2', o.negativePrompt2 || negs, batch);
          // negatives use the penultimate layer whatever clipSkip says, and the prompt embeddings' length
          ({ embeds: uncond, pooled: uncondPooled } = this.encodeTexts(negs, negs2, undefined, cond.shape[1] ?? 77));
        }
        if (uncond.shape.join() !== cond.shape.join() || uncondPooled.shape.join() !== pooled.shape.join()) {
          throw new RangeError(`${NAME}: negative prompt embeddings [${uncond.shape}] / pooled [${uncondPooled.shape}] and prompt embeddings [${cond.shape}] / pooled [${pooled.shape}] differ in shape`);
        }
      }
      // 3. in the second encoder's dtype, on the pipeline's device, each prompt's rows n times
      const place = (t: Tensor): Tensor => repeatPerPrompt(t.to({ dtype: this.textEncoder2Weight.dtype, device: this.device }), n);
      const placePooled = (t: Tensor): Tensor => repeatPerPrompt(t.to({ device: this.device }), n);
      return {
        promptEmbeds: place(cond), negativePromptEmbeds: uncond ? place(uncond) : null,
        pooledPromptEmbeds: placePooled(pooled), negativePooledPromptEmbeds: uncondPooled ? placePooled(uncondPooled) : null,
      };
    }));
    return this.withLoraScale(o.loraScale ?? 1, encode);
  }

  /** Both encoders on their texts: concatenated hidden states [B, L, D1 + D2] and the pooled text_embeds [B, P]. */
  private encodeTexts(texts: string[], texts2: string[], clipSkip: number | undefined, maxLength: number): { embeds: Tensor; pooled: Tensor } {
    const layer = (hidden: Tensor[]): Tensor => {
      const h = hidden[hidden.length - 2 - (clipSkip ?? 0)];
      if (!h) throw new RangeError(`${NAME}: clipSkip ${clipSkip} is more than the text encoders' ${hidden.length - 2} layers below the penultimate one`);
      return h;
    };
    const device = (m: CLIPTextModel | CLIPTextModelWithProjection) => m.text_model.embeddings.token_embedding.weight.device;
    const ids1 = this.tokenizer.inputIdsTensor(texts, { device: device(this.textEncoder), maxLength });
    const ids2 = this.tokenizer2.inputIdsTensor(texts2, { device: device(this.textEncoder2), maxLength });
    return encodeSdxlIds(this.textEncoder, this.textEncoder2, ids1, ids2, layer);
  }

  /**
   * diffusers' _get_add_time_ids: [[orig_h, orig_w, crop_top, crop_left, target_h, target_w]] as a [1, 6] tensor,
   * after checking that 6 · addition_time_embed_dim + the pooled width (the second encoder's projection_dim) is
   * what the UNet's add_embedding takes.
   */
  getAddTimeIds(originalSize: SizePair, cropsCoordsTopLeft: SizePair, targetSize: SizePair, o: { dtype?: DType; textEncoderProjectionDim?: number } = {}): Tensor {
    const ids = [...originalSize, ...cropsCoordsTopLeft, ...targetSize];
    if (ids.length !== 6 || !ids.every((x) => Number.isFinite(x))) {
      throw new RangeError(`${NAME}: originalSize, cropsCoordsTopLeft and targetSize must be pairs of finite numbers, got ${show([originalSize, cropsCoordsTopLeft, targetSize])}`);
    }
    const passed = (this.unet.config.additionTimeEmbedDim ?? 0) * ids.length + (o.textEncoderProjectionDim ?? this.textEncoder2.config.projection_dim);
    const expected = this.unet.add_embedding?.linear_1.inFeatures;
    if (expected !== passed) {
      throw new Error(`${NAME}: the model expects an added time embedding vector of length ${expected}, but a vector of ${passed} was created (6 × addition_time_embed_dim ${this.unet.config.additionTimeEmbedDim} + the pooled width ${o.textEncoderProjectionDim ?? this.textEncoder2.config.projection_dim}); check the UNet's addition_time_embed_dim / projection_class_embeddings_input_dim and text_encoder_2's projection_dim`);
    }
    return torch.tensor(Float32Array.from(ids), { shape: [1, 6] }).to({ dtype: o.dtype ?? 'float32', device: this.device });
  }

  // ---- generation

  /** Text to image: `await pipe.generate({ prompt: 'an astronaut riding a horse', seed: 0 })`. */
  async generate(o: StableDiffusionXLGenerateOptions): Promise<PipelineOutput> {
    const v = resolveSettings(NAME, o, this.defaultSize(), 5, (seed) => new Generator('cpu').manualSeed(seed));
    o.signal?.throwIfAborted();
    const held: Tensor[] = [];
    const hold = (t: Tensor): Tensor => { held.push(keep(t)); return t; };
    try {
      // 1. conditioning, [uncond, cond] in one batch when guiding (diffusers' order) for embeds, pooled and time ids
      const e = this.encodePrompt(o.prompt, {
        prompt2: o.prompt2, numImagesPerPrompt: v.n, doClassifierFreeGuidance: v.cfg, negativePrompt: o.negativePrompt,
        negativePrompt2: o.negativePrompt2, promptEmbeds: o.promptEmbeds, negativePromptEmbeds: o.negativePromptEmbeds,
        pooledPromptEmbeds: o.pooledPromptEmbeds, negativePooledPromptEmbeds: o.negativePooledPromptEmbeds, clipSkip: o.clipSkip, loraScale: v.loraScale,
      });
      const rows = e.promptEmbeds.shape[0] ?? 1;
      const cond = tidy(() => {
        const projectionDim = e.pooledPromptEmbeds.shape[1];
        const size: SizePair = [v.height, v.width];
        const timeIds = this.getAddTimeIds(o.originalSize ?? size, o.cropsCoordsTopLeft ?? [0, 0], o.targetSize ?? size, { textEncoderProjectionDim: projectionDim });
        const negTimeIds = o.negativeOriginalSize && o.negativeTargetSize
          ? this.getAddTimeIds(o.negativeOriginalSize, o.negativeCropsCoordsTopLeft ?? [0, 0], o.negativeTargetSize, { textEncoderProjectionDim: projectionDim })
          : timeIds;
        const both = (neg: Tensor | null, pos: Tensor): Tensor => (neg ? torch.cat([neg, pos]) : pos);
        return {
          context: both(e.negativePromptEmbeds, e.promptEmbeds),
          textEmbeds: both(e.negativePooledPromptEmbeds, e.pooledPromptEmbeds),
          timeIds: both(v.cfg ? negTimeIds.expand(rows, 6) : null, timeIds.expand(rows, 6)).contiguous(),
        };
      });
      for (const t of [e.promptEmbeds, e.negativePromptEmbeds, e.pooledPromptEmbeds, e.negativePooledPromptEmbeds]) t?.dispose();
      const context = hold(cond.context);
      const added = { textEmbeds: hold(cond.textEmbeds), timeIds: hold(cond.timeIds) };

      // 2. timesteps, 3. initial latents × initNoiseSigma, 4. denoising loop
      const { latents, timesteps } = await this.sample(NAME, v, o, rows, (input, t) => this.unet.forward(input, t, context, added));
      // 5. decode, in float32 when a float16 VAE asks for it (force_upcast), as diffusers' upcast_vae
      if (v.outputType === 'latent') return await finishOutput(latents, v.outputType, timesteps, (z) => z);
      const vaeDtype = this.vae.decoder.conv_in.weight.dtype;
      const upcast = vaeDtype === 'float16' && this.vae.forceUpcast;
      if (upcast) this.vae.to({ dtype: 'float32' });
      try {
        return await finishOutput(latents, v.outputType, timesteps, (z) => this.vae.decode(this.unscaleLatents(z.to(upcast ? 'float32' : vaeDtype))));
      } finally {
        if (upcast) this.vae.to({ dtype: 'float16' });
      }
    } finally {
      for (const t of held) release(t);
    }
  }

  /** Latents → the VAE's input: z · std / scaling_factor + mean when the config has latents_mean/std, else z / scaling_factor. */
  private unscaleLatents(z: Tensor): Tensor {
    const { latents_mean: mean, latents_std: std } = this.vae.config;
    if (!mean || !std) return z.div(this.vae.scalingFactor);
    const column = (v: number[]) => torch.tensor(Float32Array.from(v), { shape: [1, v.length, 1, 1] }).to({ dtype: z.dtype, device: z.device });
    return z.mul(column(std)).div(this.vae.scalingFactor).add(column(mean));
  }
}

/**
 * SDXL's prompt conditioning from token ids (the training script's encode_prompt, and the pipeline's): each
 * encoder's hidden state picked by `layer` (default the penultimate, hidden_states[-2], without final_layer_norm)
 * concatenated on the last dimension [B, L, D1 + D2], and the second encoder's projected text_embeds as the pooled
 * embedding [B, projection_dim]. Gradients flow when the caller records them (LoRA training of the encoders).
 */
export function encodeSdxlIds(
  textEncoder: CLIPTextModel, textEncoder2: CLIPTextModelWithProjection, ids1: Tensor, ids2: Tensor,
  layer: (hidden: Tensor[]) => Tensor = (hidden) => hidden[hidden.length - 2]!,
): { embeds: Tensor; pooled: Tensor } {
  const out1 = textEncoder.forward(ids1, { outputHiddenStates: true });
  const out2 = textEncoder2.forward(ids2, { outputHiddenStates: true });
  const h1 = layer(out1.hiddenStates ?? []);
  const h2 = layer(out2.hiddenStates ?? []);
  return { embeds: torch.cat([h1.to({ dtype: h2.dtype, device: h2.device }), h2], -1), pooled: out2.textEmbeds };
}
