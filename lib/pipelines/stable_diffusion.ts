// StableDiffusionPipeline (diffusers 0.31 pipelines/stable_diffusion/pipeline_stable_diffusion.py), text to
// image: CLIP encodes the prompt, the UNet denoises latents under classifier-free guidance while a scheduler
// walks the timesteps, the VAE decodes. The order of operations is diffusers' so that the same latents,
// prompt and scheduler give the same image (tests compare every step's latents with the reference).
//
// Tensor lifetime: the models, the scheduler's tables and the prompt embeddings live for the call; each
// denoising step runs in its own tidy() so a step leaves only the new latents behind.
import sharp from 'sharp';
import { noGrad } from '../autograd.js';
import type { DType } from '../dtype.js';
import { AutoencoderKL } from '../models/autoencoder_kl.js';
import { CLIPTextModel } from '../models/clip_text_model.js';
import { CLIPTokenizer } from '../models/clip_tokenizer.js';
import { FROM_PRETRAINED_OPTIONS, readModelIndex, type FromPretrainedOptions } from '../models/loading.js';
import { resolvePretrained } from '../io/hub.js';
import { UNet2DConditionModel } from '../models/unet_2d_condition.js';
import { Generator } from '../random.js';
import { dispose, keep, tidy } from '../scope.js';
import { loadScheduler, type Scheduler, type SchedulerName } from '../schedulers/scheduler.js';
import { setMemoryEfficientAttention } from '../models/attention_processor.js';
import type { Device, Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import {
  deleteAdapters, disableLora, enableLora, fuseLora, getActiveAdapters, getListAdapters, loadLoraWeights,
  setAdapters, unfuseLora, unloadLoraWeights, withLoraScale, type LoadLoraWeightsOptions, type LoadLoraWeightsResult, type LoraTargets,
} from '../lora/adapters.js';

export interface StableDiffusionComponents {
  vae: AutoencoderKL;
  textEncoder: CLIPTextModel;
  tokenizer: CLIPTokenizer;
  unet: UNet2DConditionModel;
  scheduler: Scheduler;
}

export interface PipelineFromPretrainedOptions extends Omit<FromPretrainedOptions, 'subfolder'> {
  /** Another scheduler than model_index.json's, built from the same scheduler_config.json ('euler', 'dpmpp_2m', …). */
  scheduler?: SchedulerName | string;
  /** scheduler_config.json overrides (e.g. { timestep_spacing: 'trailing' }). */
  schedulerOverrides?: Record<string, unknown>;
}

/** The names of PipelineFromPretrainedOptions (any other key is an error naming it). */
export const PIPELINE_OPTIONS: readonly string[] = [...FROM_PRETRAINED_OPTIONS.filter((k) => k !== 'subfolder'), 'scheduler', 'schedulerOverrides'];

export type OutputType = 'png' | 'tensor' | 'array' | 'latent';

export interface StepInfo {
  /** 0-based index of the step just finished, out of `numSteps` UNet evaluations. */
  step: number;
  numSteps: number;
  timestep: number;
  /** The latents after this step (valid during the callback only: clone what you keep). */
  latents: Tensor;
}

export interface GenerateOptions {
  prompt?: string | string[];
  negativePrompt?: string | string[];
  /** Precomputed conditioning [B, 77, D] instead of `prompt` (and of `negativePrompt`). */
  promptEmbeds?: Tensor;
  negativePromptEmbeds?: Tensor;
  /** Default: the UNet's sample_size × the VAE's scale factor (512 for SD 1.5). Multiples of 8. */
  height?: number;
  width?: number;
  numInferenceSteps?: number;
  /** Classifier-free guidance weight; ≤ 1 turns guidance off (one UNet batch instead of two). */
  guidanceScale?: number;
  /** diffusers' guidance_rescale (Lin et al. 2023, §3.4); 0 = off. */
  guidanceRescale?: number;
  numImagesPerPrompt?: number;
  /** Random source for the initial latents and stochastic schedulers. */
  generator?: Generator;
  /** Shorthand for a CPU generator seeded with this value (the same image on CPU and CUDA). */
  seed?: number;
  /** Initial latents [B, 4, H/8, W/8] (multiplied by the scheduler's initNoiseSigma, as diffusers does). */
  latents?: Tensor;
  /** 'png' (default): PNG Buffers; 'tensor': [B, 3, H, W] in [0, 1]; 'array': NHWC float32 in [0, 1] (diffusers' 'np'); 'latent': the final latents. */
  outputType?: OutputType;
  /** diffusers' cross_attention_kwargs; `scale` multiplies every active LoRA adapter (UNet and text encoder). */
  crossAttentionKwargs?: { scale?: number };
  /** Use the output of the layer `clipSkip` before the last (then final_layer_norm), as diffusers. */
  clipSkip?: number;
  /** Called after every denoising step (diffusers' callback_on_step_end). */
  callbackOnStepEnd?: (info: StepInfo) => void;
  /** Aborting stops between two steps with an AbortError; nothing is left allocated. */
  signal?: AbortSignal;
}

export interface PipelineOutput {
  /** PNG files ('png'). */
  images?: Buffer[];
  /** [B, 3, H, W] in [0, 1] ('tensor') or the latents ('latent'); the caller disposes it. */
  tensor?: Tensor;
  /** NHWC float32 in [0, 1] ('array'). */
  array?: { data: Float32Array; shape: [number, number, number, number] };
  /** The timesteps the UNet was called with. */
  timesteps: number[];
}

export class StableDiffusionPipeline {
  vae: AutoencoderKL;
  textEncoder: CLIPTextModel;
  tokenizer: CLIPTokenizer;
  unet: UNet2DConditionModel;
  scheduler: Scheduler;

  constructor(c: StableDiffusionComponents) {
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
      throw new Error(`StableDiffusionPipeline: '${dir}' holds a ${cls}; only Stable Diffusion 1.x/2.x pipelines (UNet2DConditionModel + CLIP) are supported`);
    }
    if (o.dtype === 'float16' && (o.device ?? 'cpu') === 'cpu') {
      throw new Error("StableDiffusionPipeline: float16 needs a CUDA device (CPU half-precision kernels are missing in libtorch); use dtype 'bfloat16' or 'float32' on CPU");
    }
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

  /** 2^(number of VAE blocks − 1): 8 for SD. */
  get vaeScaleFactor(): number { return 2 ** (this.vae.config.block_out_channels.length - 1); }
  get device(): Device { return this.unet.conv_in.weight.device; }
  get dtype(): DType { return this.unet.conv_in.weight.dtype; }
  /** The token embedding: where and in what dtype the text encoder runs. */
  private get textEncoderWeight(): Tensor { return this.textEncoder.text_model.embeddings.token_embedding.weight; }
  private get loraTargets(): LoraTargets { return { unet: this.unet, textEncoder: this.textEncoder }; }

  /** Moves/casts the three models (diffusers' pipe.to). */
  to(o: { device?: Device; dtype?: DType }): this {
    if (o.dtype === 'float16' && (o.device ?? this.device) === 'cpu') throw new Error("StableDiffusionPipeline.to: float16 needs a CUDA device; use 'bfloat16' on CPU");
    for (const m of [this.unet, this.vae, this.textEncoder]) m.to(o);
    return this;
  }

  /** Frees the models' and the scheduler's tensors. */
  dispose(): void {
    for (const m of [this.unet, this.vae, this.textEncoder]) m.dispose();
    this.scheduler.dispose();
  }

  // ---- LoRA (diffusers' StableDiffusionLoraLoaderMixin)

  /**
   * A LoRA file or folder in diffusers, PEFT or Kohya format, as a named adapter (UNet and text encoder keys).
   * Everything is checked first: a refused file names the key and leaves the pipeline as it was.
   */
  loadLoraWeights(source: string | Map<string, Tensor>, o: LoadLoraWeightsOptions = {}): LoadLoraWeightsResult {
    return loadLoraWeights(this.loraTargets, source, o);
  }
  setAdapters(names: string | string[], weights?: number | number[]): void { setAdapters(this.loraTargets, names, weights); }
  getActiveAdapters(): string[] { return getActiveAdapters(this.loraTargets); }
  getListAdapters(): { unet: string[]; text_encoder: string[] } { return getListAdapters(this.loraTargets); }
  deleteAdapters(names: string | string[]): void { deleteAdapters(this.loraTargets, names); }
  disableLora(): void { disableLora(this.loraTargets); }
  enableLora(): void { enableLora(this.loraTargets); }
  fuseLora(o: { loraScale?: number; adapterNames?: string[] } = {}): void { fuseLora(this.loraTargets, o); }
  unfuseLora(): void { unfuseLora(this.loraTargets); }
  unloadLoraWeights(): void { unloadLoraWeights(this.loraTargets); }

  /**
   * Memory-efficient attention in the UNet and the VAE (diffusers' enable_xformers_memory_efficient_attention;
   * `false` turns it off): see setMemoryEfficientAttention. Returns how many attention layers were set.
   */
  enableMemoryEfficientAttention(on: boolean | { maxScoresBytes?: number } = true): number {
    return setMemoryEfficientAttention(this.unet, on) + setMemoryEfficientAttention(this.vae, on);
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
        if (prompt === undefined) throw new TypeError('StableDiffusionPipeline: give `prompt` or `promptEmbeds`');
        cond = this.encodeText(typeof prompt === 'string' ? [prompt] : prompt, o.clipSkip);
      }
      const batch = cond.shape[0] ?? 1;
      let uncond: Tensor | null = null;
      if (cfg) {
        uncond = o.negativePromptEmbeds ?? null;
        if (!uncond) {
          const neg = o.negativePrompt ?? '';
          const negs = typeof neg === 'string' ? Array<string>(batch).fill(neg) : neg;
          if (negs.length !== batch) throw new RangeError(`StableDiffusionPipeline: ${negs.length} negative prompt(s) for ${batch} prompt(s); give one per prompt or a single string`);
          uncond = this.encodeText(negs, undefined);
        }
        if (uncond.shape.join() !== cond.shape.join()) throw new RangeError(`StableDiffusionPipeline: negative prompt embeddings [${uncond.shape}] and prompt embeddings [${cond.shape}] differ in shape`);
      }
      const place = (t: Tensor) => repeatPerPrompt(t.to({ dtype: this.textEncoderWeight.dtype, device: this.device }), n);
      return { promptEmbeds: place(cond), negativePromptEmbeds: uncond ? place(uncond) : null };
    }));
    // diffusers scales the text encoder's LoRA layers by lora_scale while encoding
    return o.loraScale !== undefined && o.loraScale !== 1 ? withLoraScale(this.loraTargets, o.loraScale, encode) : encode();
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

  /** Text to image: `await pipe.generate({ prompt: 'a pokemon with blue eyes', seed: 0 })`. */
  async generate(o: GenerateOptions): Promise<PipelineOutput> {
    const steps = o.numInferenceSteps ?? 50;
    const guidance = o.guidanceScale ?? 7.5;
    const outputType = o.outputType ?? 'png';
    const n = o.numImagesPerPrompt ?? 1;
    const defaultSize = this.defaultSize();
    const height = o.height ?? defaultSize;
    const width = o.width ?? defaultSize;
    checkInputs(o, { steps, height, width, n, outputType });
    o.signal?.throwIfAborted();
    const cfg = guidance > 1;
    const loraScale = o.crossAttentionKwargs?.scale ?? 1;
    const generator = o.generator ?? (o.seed !== undefined ? new Generator('cpu').manualSeed(o.seed) : undefined);

    const held: Tensor[] = [];
    const hold = (t: Tensor): Tensor => { held.push(keep(t)); return t; };
    try {
      // 1. conditioning, [uncond, cond] in one batch when guiding (diffusers' order)
      const { promptEmbeds, negativePromptEmbeds } = this.encodePrompt(o.prompt, {
        numImagesPerPrompt: n, doClassifierFreeGuidance: cfg, negativePrompt: o.negativePrompt,
        promptEmbeds: o.promptEmbeds, negativePromptEmbeds: o.negativePromptEmbeds, clipSkip: o.clipSkip, loraScale,
      });
      const context = hold(negativePromptEmbeds ? torch.cat([negativePromptEmbeds, promptEmbeds]) : promptEmbeds);
      if (negativePromptEmbeds) dispose([promptEmbeds, negativePromptEmbeds]);
      const batch = (context.shape[0] ?? 1) / (cfg ? 2 : 1);

      // 2. timesteps, 3. initial latents × initNoiseSigma
      this.scheduler.setTimesteps(steps);
      const timesteps = [...this.scheduler.timesteps];
      let latents = hold(this.prepareLatents(batch, height, width, generator, o.latents));

      // 4. denoising loop
      for (let i = 0; i < timesteps.length; i++) {
        const t = timesteps[i] as number;
        const next = keep(withLoraScale(this.loraTargets, loraScale, () => tidy(() => this.denoiseStep(latents, context, t, guidance, o.guidanceRescale ?? 0, generator))));
        latents.dispose();
        held[held.indexOf(latents)] = next;
        latents = next;
        o.callbackOnStepEnd?.({ step: i, numSteps: timesteps.length, timestep: t, latents });
        // let progress reach the terminal, abort signals fire, and finalizers run
        await new Promise<void>((resolve) => setImmediate(resolve));
        o.signal?.throwIfAborted();
      }

      // 5. decode
      if (outputType === 'latent') {
        held.splice(held.indexOf(latents), 1);
        latents.kept = false;
        return { tensor: latents, timesteps };
      }
      const images = noGrad(() => tidy(() => {
        const z = latents.to(this.vae.decoder.conv_in.weight.dtype).div(this.vae.scalingFactor);
        return this.vae.decode(z).div(2).add(0.5).clamp(0, 1).float();
      }));
      if (outputType === 'tensor') return { tensor: images, timesteps };
      try {
        const nhwc = tidy(() => images.permute(0, 2, 3, 1).contiguous().cpu());
        const data = nhwc.dataSync() as Float32Array;
        const shape = nhwc.shape as [number, number, number, number];
        nhwc.dispose();
        if (outputType === 'array') return { array: { data, shape }, timesteps };
        return { images: await toPngs(data, shape), timesteps };
      } finally {
        images.dispose();
      }
    } finally {
      for (const t of held) { t.kept = false; t.dispose(); }
    }
  }

  /** One UNet evaluation (two batches under guidance) and one scheduler step. */
  private denoiseStep(latents: Tensor, context: Tensor, t: number, guidance: number, rescale: number, generator: Generator | undefined): Tensor {
    return noGrad(() => {
      const cfg = guidance > 1;
      const input = this.scheduler.scaleModelInput(cfg ? torch.cat([latents, latents]) : latents, t);
      let noise = this.unet.forward(input.to(this.dtype), t, context).float();
      if (cfg) {
        const [uncond, cond] = noise.chunk(2) as [Tensor, Tensor];
        const guided = uncond.add(cond.sub(uncond).mul(guidance));
        noise = rescale > 0 ? rescaleNoiseCfg(guided, cond, rescale) : guided;
      }
      return this.scheduler.step(noise, t, latents, { generator });
    });
  }

  private prepareLatents(batch: number, height: number, width: number, generator: Generator | undefined, given: Tensor | undefined): Tensor {
    const shape = [batch, this.unet.config.inChannels, height / this.vaeScaleFactor, width / this.vaeScaleFactor];
    return tidy(() => {
      let latents: Tensor;
      if (given) {
        if (given.shape.join() !== shape.join()) throw new RangeError(`StableDiffusionPipeline: latents have shape [${given.shape}], expected [${shape}] (batch × channels × height/${this.vaeScaleFactor} × width/${this.vaeScaleFactor})`);
        latents = given.to({ dtype: 'float32', device: this.device });
      } else {
        // drawn on the generator's device then moved, so a CPU seed gives the same image on every device
        const device = generator?.device ?? this.device;
        latents = torch.randn(shape, { generator, device, dtype: 'float32' }).to({ device: this.device });
      }
      const sigma = this.scheduler.initNoiseSigma;
      return sigma === 1 ? latents.clone() : latents.mul(sigma);
    });
  }

  private defaultSize(): number {
    const s = this.unet.config.sampleSize;
    const side = Array.isArray(s) ? s[0] : s;
    return (side ?? 64) * this.vaeScaleFactor;
  }
}

/** [B, L, D] → [B·n, L, D], each prompt's rows repeated n times in place (diffusers' repeat + view). */
function repeatPerPrompt(t: Tensor, n: number): Tensor {
  if (n === 1) return t;
  const [b, l, d] = t.shape as [number, number, number];
  return t.repeat(1, n, 1).view(b * n, l, d);
}

/** diffusers' rescale_noise_cfg: match the guided prediction's std to the conditional one's, then blend. */
function rescaleNoiseCfg(guided: Tensor, cond: Tensor, phi: number): Tensor {
  const dims = Array.from({ length: cond.ndim - 1 }, (_, i) => i + 1);
  const stdCond = cond.var(dims, true, true).sqrt();
  const stdGuided = guided.var(dims, true, true).sqrt();
  const rescaled = guided.mul(stdCond.div(stdGuided));
  return rescaled.mul(phi).add(guided.mul(1 - phi));
}

function checkInputs(o: GenerateOptions, v: { steps: number; height: number; width: number; n: number; outputType: string }): void {
  const bad = (what: string): never => { throw new RangeError(`StableDiffusionPipeline: ${what}`); };
  if (!Number.isInteger(v.steps) || v.steps < 1) bad(`numInferenceSteps must be a positive integer, got ${v.steps}`);
  if (!Number.isInteger(v.height) || !Number.isInteger(v.width) || v.height % 8 !== 0 || v.width % 8 !== 0 || v.height <= 0 || v.width <= 0) {
    bad(`height and width must be positive multiples of 8, got ${v.height}×${v.width}`);
  }
  if (!Number.isInteger(v.n) || v.n < 1) bad(`numImagesPerPrompt must be a positive integer, got ${v.n}`);
  if (!['png', 'tensor', 'array', 'latent'].includes(v.outputType)) bad(`outputType must be 'png', 'tensor', 'array' or 'latent', got '${v.outputType}'`);
  if (o.prompt === undefined && !o.promptEmbeds) bad('give `prompt` or `promptEmbeds`');
  if (o.prompt !== undefined && o.promptEmbeds) bad('give `prompt` or `promptEmbeds`, not both');
  if (o.generator && o.seed !== undefined) bad('give `generator` or `seed`, not both');
}

/** numpy's round: halves go to the even neighbour. */
function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** NHWC float [0, 1] → PNG files; rounding as diffusers' numpy_to_pil ((x·255).round() as uint8). */
async function toPngs(data: Float32Array, [b, h, w, c]: [number, number, number, number]): Promise<Buffer[]> {
  const size = h * w * c;
  const out: Buffer[] = [];
  for (let i = 0; i < b; i++) {
    const pixels = Buffer.alloc(size);
    for (let j = 0; j < size; j++) pixels[j] = roundHalfEven((data[i * size + j] as number) * 255);
    out.push(await sharp(pixels, { raw: { width: w, height: h, channels: c as 3 } }).png().toBuffer());
  }
  return out;
}
