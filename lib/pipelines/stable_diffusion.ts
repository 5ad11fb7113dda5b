// StableDiffusionPipeline (diffusers 0.31 pipelines/stable_diffusion/pipeline_stable_diffusion.py), text to
// image: CLIP encodes the prompt, the UNet denoises latents under classifier-free guidance while a scheduler
// walks the timesteps, the VAE decodes. The order of operations is diffusers' so that the same latents,
// prompt and scheduler give the same image (tests compare every step's latents with the reference).
//
// Tensor lifetime: the models, the scheduler's tables and the prompt embeddings live for the call; each
// denoising step runs in its own tidy() so a step leaves only the new latents behind.
import { noGrad } from '../autograd.js';
import type { DType } from '../dtype.js';
import { AutoencoderKL } from '../models/autoencoder_kl.js';
import { CLIPTextModel } from '../models/clip_text_model.js';
import { CLIPTokenizer } from '../models/clip_tokenizer.js';
import { readModelIndex } from '../models/loading.js';
import { resolvePretrained } from '../io/hub.js';
import { UNet2DConditionModel } from '../models/unet_2d_condition.js';
import { Generator } from '../random.js';
import { keep, tidy } from '../scope.js';
import { loadScheduler, type Scheduler } from '../schedulers/scheduler.js';
import type { Device, Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import type { LoraTargets } from '../lora/adapters.js';
import {
  DiffusionPipelineBase, PIPELINE_OPTIONS, checkHalfDevice, finishOutput, release, repeatPerPrompt, resolveSettings, textList,
  type GenerateOptions, type PipelineFromPretrainedOptions, type PipelineOutput, type ResolvedSettings,
} from './pipeline_utils.js';

export type { GenerateOptions, OutputType, PipelineFromPretrainedOptions, PipelineOutput, StepInfo } from './pipeline_utils.js';

export interface StableDiffusionComponents {
  vae: AutoencoderKL;
  textEncoder: CLIPTextModel;
  tokenizer: CLIPTokenizer;
  unet: UNet2DConditionModel;
  scheduler: Scheduler;
}

const NAME = 'StableDiffusionPipeline';

export class StableDiffusionPipeline extends DiffusionPipelineBase {
  vae: AutoencoderKL;
  textEncoder: CLIPTextModel;
  tokenizer: CLIPTokenizer;
  unet: UNet2DConditionModel;
  scheduler: Scheduler;

  constructor(c: StableDiffusionComponents) {
    super();
    this.vae = c.vae;
    this.textEncoder = c.textEncoder;
    this.tokenizer = c.tokenizer;
    this.unet = c.unet;
    this.scheduler = c.scheduler;
  }

  /**
   * A diffusers pipeline folder (model_index.json with unet/, vae/, text_encoder/, tokenizer/, scheduler/),
   * or a model id in the offline Hugging Face cache. `dtype`/`device` place the three models.
   */
  static fromPretrained(pathOrId: string, o: PipelineFromPretrainedOptions = {}): StableDiffusionPipeline {
    const dir = resolvePretrained(pathOrId, o, { known: PIPELINE_OPTIONS, where: 'StableDiffusionPipeline.fromPretrained' });
    const index = readModelIndex(dir); // checked: a JSON object of [library, class] pairs under plain names
    const cls = index._class_name;
    if (typeof cls === 'string' && !['StableDiffusionPipeline', 'StableDiffusionImg2ImgPipeline', 'StableDiffusionInpaintPipeline'].includes(cls)) {
      const hint = cls.startsWith('StableDiffusionXL') ? ' (load it with StableDiffusionXLPipeline)' : '';
      throw new Error(`${NAME}: '${dir}' holds a ${cls}; only Stable Diffusion 1.x/2.x pipelines (UNet2DConditionModel + CLIP) are supported${hint}`);
    }
    checkHalfDevice(NAME, o.dtype, o.device);
    const { scheduler: kind, schedulerOverrides, ...load } = o;
    const parts: Partial<StableDiffusionComponents> = {};
    try {
      parts.tokenizer = CLIPTokenizer.fromPretrained(dir, { ...load, subfolder: 'tokenizer' });
      parts.scheduler = loadScheduler(dir, { ...load, subfolder: 'scheduler', kind, overrides: schedulerOverrides });
      parts.textEncoder = CLIPTextModel.fromPretrained(dir, { ...load, subfolder: 'text_encoder' });
      parts.vae = AutoencoderKL.fromPretrained(dir, { ...load, subfolder: 'vae' });
      parts.unet = UNet2DConditionModel.fromPretrained(dir, { ...load, subfolder: 'unet' });
    } catch (e) {
      parts.textEncoder?.dispose();
      parts.vae?.dispose();
      parts.scheduler?.dispose();
      throw e;
    }
    return new StableDiffusionPipeline(parts as StableDiffusionComponents);
  }

  /** The token embedding: where and in what dtype the text encoder runs. */
  private get textEncoderWeight(): Tensor { return this.textEncoder.text_model.embeddings.token_embedding.weight; }
  protected get loraTargets(): LoraTargets { return { unet: this.unet, textEncoder: this.textEncoder }; }

  /** Moves/casts the three models (diffusers' pipe.to). */
  to(o: { device?: Device; dtype?: DType }): this {
    if (o.dtype === 'float16' && (o.device ?? this.device) === 'cpu') throw new Error(`${NAME}.to: float16 needs a CUDA device; use 'bfloat16' on CPU`);
    for (const m of [this.unet, this.vae, this.textEncoder]) m.to(o);
    return this;
  }

  /** Frees the models' and the scheduler's tensors. */
  dispose(): void {
    for (const m of [this.unet, this.vae, this.textEncoder]) m.dispose();
    this.scheduler.dispose();
  }

  // ---- prompt

  /**
   * Text conditioning as diffusers' encode_prompt: [B·n, 77, D] for the prompts and, with guidance, for the
   * negative prompts ('' when none). Both are returned to the caller's scope.
   */
  encodePrompt(
    prompt: string | string[] | undefined,
    o: { numImagesPerPrompt?: number; doClassifierFreeGuidance?: boolean; negativePrompt?: string | string[]; promptEmbeds?: Tensor; negativePromptEmbeds?: Tensor; clipSkip?: number; loraScale?: number } = {},
  ): { promptEmbeds: Tensor; negativePromptEmbeds: Tensor | null } {
    const n = o.numImagesPerPrompt ?? 1;
    const cfg = o.doClassifierFreeGuidance ?? true;
    const encode = () => noGrad(() => tidy(() => {
      let cond = o.promptEmbeds;
      if (!cond) {
        if (prompt === undefined) throw new TypeError(`${NAME}: give \`prompt\` or \`promptEmbeds\``);
        cond = this.encodeText(typeof prompt === 'string' ? [prompt] : prompt, o.clipSkip);
      }
      const batch = cond.shape[0] ?? 1;
      let uncond: Tensor | null = null;
      if (cfg) {
        uncond = o.negativePromptEmbeds ?? null;
        if (!uncond) {
          uncond = this.encodeText(textList(NAME, 'negative prompt', o.negativePrompt ?? '', batch), undefined);
        }
        if (uncond.shape.join() !== cond.shape.join()) throw new RangeError(`${NAME}: negative prompt embeddings [${uncond.shape}] and prompt embeddings [${cond.shape}] differ in shape`);
      }
      const place = (t: Tensor) => repeatPerPrompt(t.to({ dtype: this.textEncoderWeight.dtype, device: this.device }), n);
      return { promptEmbeds: place(cond), negativePromptEmbeds: uncond ? place(uncond) : null };
    }));
    // diffusers scales the text encoder's LoRA layers by lora_scale while encoding
    return this.withLoraScale(o.loraScale ?? 1, encode);
  }

  private encodeText(texts: string[], clipSkip: number | undefined): Tensor {
    const ids = this.tokenizer.inputIdsTensor(texts, { device: this.textEncoderWeight.device });
    if (clipSkip === undefined || clipSkip === 0) return this.textEncoder.forward(ids).lastHiddenState;
    const out = this.textEncoder.forward(ids, { outputHiddenStates: true });
    const hidden = out.hiddenStates as Tensor[];
    const h = hidden[hidden.length - 1 - clipSkip];
    if (!h) throw new RangeError(`StableDiffusionPipeline: clipSkip ${clipSkip} is more than the text encoder's ${hidden.length - 1} layers`);
    return this.textEncoder.text_model.final_layer_norm.forward(h);
  }

  // ---- generation

  /** The UNet's text conditioning for a call: [uncond, cond] in one batch when guiding (diffusers' order), kept. */
  protected guidanceContext(o: Omit<GenerateOptions, 'height' | 'width' | 'latents'>, v: ResolvedSettings): Tensor {
    const { promptEmbeds, negativePromptEmbeds } = this.encodePrompt(o.prompt, {
      numImagesPerPrompt: v.n, doClassifierFreeGuidance: v.cfg, negativePrompt: o.negativePrompt,
      promptEmbeds: o.promptEmbeds, negativePromptEmbeds: o.negativePromptEmbeds, clipSkip: o.clipSkip, loraScale: v.loraScale,
    });
    const context = keep(negativePromptEmbeds ? tidy(() => torch.cat([negativePromptEmbeds, promptEmbeds])) : promptEmbeds);
    if (negativePromptEmbeds) { promptEmbeds.dispose(); negativePromptEmbeds.dispose(); }
    return context;
  }

  /** Text to image: `await pipe.generate({ prompt: 'a pokemon with blue eyes', seed: 0 })`. */
  async generate(o: GenerateOptions): Promise<PipelineOutput> {
    const v = resolveSettings(NAME, o, this.defaultSize(), 7.5, (seed) => new Generator('cpu').manualSeed(seed));
    o.signal?.throwIfAborted();
    // 1. conditioning, [uncond, cond] in one batch when guiding (diffusers' order)
    const context = this.guidanceContext(o, v);
    try {
      const batch = (context.shape[0] ?? 1) / (v.cfg ? 2 : 1);
      // 2. timesteps, 3. initial latents × initNoiseSigma, 4. denoising loop
      const { latents, timesteps } = await this.sample(NAME, v, o, batch, (input, t) => this.unet.forward(input, t, context));
      // 5. decode
      return await finishOutput(latents, v.outputType, timesteps, (z) => this.vae.decode(z.to(this.vae.decoder.conv_in.weight.dtype).div(this.vae.scalingFactor)));
    } finally {
      release(context);
    }
  }
}
