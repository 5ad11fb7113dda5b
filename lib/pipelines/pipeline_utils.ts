// What the text-to-image pipelines share (diffusers keeps it in pipeline_utils.py and copies the rest with
// "# Copied from"): the options and outputs, the LoRA and attention switches over a pipeline's models, input
// checks, initial latents, classifier-free guidance with guidance_rescale, the denoising loop (one tidy() per step,
// callbacks, abort) and the conversion of decoded images to PNG files, arrays or tensors.
import sharp from 'sharp';
import { noGrad } from '../autograd.js';
import type { DType } from '../dtype.js';
import type { AutoencoderKL } from '../models/autoencoder_kl.js';
import { setMemoryEfficientAttention } from '../models/attention_processor.js';
import { FROM_PRETRAINED_OPTIONS, type FromPretrainedOptions } from '../models/loading.js';
import type { UNet2DConditionModel } from '../models/unet_2d_condition.js';
import type { Generator } from '../random.js';
import { GraphedCall } from '../cuda_graph.js';
import { keep, tidy } from '../scope.js';
import type { Scheduler, SchedulerName } from '../schedulers/scheduler.js';
import type { Device, Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import {
  deleteAdapters, disableLora, enableLora, fuseLora, getActiveAdapters, getListAdapters, loadLoraWeights,
  setAdapters, unfuseLora, unloadLoraWeights, withLoraScale, type LoadLoraWeightsOptions, type LoadLoraWeightsResult, type LoraTargets,
} from '../lora/adapters.js';

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

/** The generation options every pipeline takes (diffusers' __call__ arguments, camelCased). */
export interface GenerateOptions {
  prompt?: string | string[];
  negativePrompt?: string | string[];
  /** Precomputed conditioning [B, 77, D] instead of `prompt` (and of `negativePrompt`). */
  promptEmbeds?: Tensor;
  negativePromptEmbeds?: Tensor;
  /** Default: the UNet's sample_size × the VAE's scale factor (512 for SD 1.5, 1024 for SDXL). Multiples of 8. */
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
  /** Initial latents [B, 4, H/f, W/f] (multiplied by the scheduler's initNoiseSigma, as diffusers does). */
  latents?: Tensor;
  /** 'png' (default): PNG Buffers; 'tensor': [B, 3, H, W] in [0, 1]; 'array': NHWC float32 in [0, 1] (diffusers' 'np'); 'latent': the final latents. */
  outputType?: OutputType;
  /** diffusers' cross_attention_kwargs; `scale` multiplies every active LoRA adapter (UNet and text encoders). */
  crossAttentionKwargs?: { scale?: number };
  /** Use the output of the layer `clipSkip` before the one diffusers conditions on by default. */
  clipSkip?: number;
  /** Called after every denoising step (diffusers' callback_on_step_end). */
  callbackOnStepEnd?: (info: StepInfo) => void;
  /** Aborting stops between two steps with an AbortError; nothing is left allocated. */
  signal?: AbortSignal;
  /**
   * Record the UNet call in a CUDA graph after the first step and replay it for the others (lib/cuda_graph.ts's
   * GraphedCall): the host launches one graph per step instead of every kernel. Where no graph can be made or
   * recorded (not CUDA), one warning says why and the steps run as usual.
   */
  cudaGraphs?: boolean;
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

/** Adapters per model of a pipeline (diffusers' get_list_adapters). */
export interface ListAdapters { unet: string[]; text_encoder: string[]; text_encoder_2?: string[] }

/**
 * The parts of a text-to-image pipeline that do not depend on its text encoders: sizes, placement, LoRA adapters
 * (diffusers' LoraLoaderMixin vocabulary) and memory-efficient attention.
 */
export abstract class DiffusionPipelineBase {
  abstract vae: AutoencoderKL;
  abstract unet: UNet2DConditionModel;
  abstract scheduler: Scheduler;
  /** The models LoRA files load into. */
  protected abstract get loraTargets(): LoraTargets;

  /** 2^(number of VAE blocks − 1): 8 for SD and SDXL. */
  get vaeScaleFactor(): number { return 2 ** (this.vae.config.block_out_channels.length - 1); }
  get device(): Device { return this.unet.conv_in.weight.device; }
  get dtype(): DType { return this.unet.conv_in.weight.dtype; }

  /**
   * A LoRA file or folder in diffusers, PEFT or Kohya format, as a named adapter (UNet and text encoder keys).
   * Everything is checked first: a refused file names the key and leaves the pipeline as it was.
   */
  loadLoraWeights(source: string | Map<string, Tensor>, o: LoadLoraWeightsOptions = {}): LoadLoraWeightsResult {
    return loadLoraWeights(this.loraTargets, source, o);
  }
  setAdapters(names: string | string[], weights?: number | number[]): void { setAdapters(this.loraTargets, names, weights); }
  getActiveAdapters(): string[] { return getActiveAdapters(this.loraTargets); }
  getListAdapters(): ListAdapters { return getListAdapters(this.loraTargets); }
  deleteAdapters(names: string | string[]): void { deleteAdapters(this.loraTargets, names); }
  disableLora(): void { disableLora(this.loraTargets); }
  enableLora(): void { enableLora(this.loraTargets); }
  fuseLora(o: { loraScale?: number; adapterNames?: string[] } = {}): void { fuseLora(this.loraTargets, o); }
  unfuseLora(): void { unfuseLora(this.loraTargets); }
  unloadLoraWeights(): void { unloadLoraWeights(this.loraTargets); }
  /** Runs fn with every LoRA adapter scaled by `scale` (diffusers' lora_scale). */
  protected withLoraScale<T>(scale: number, fn: () => T): T {
    return scale === 1 ? fn() : withLoraScale(this.loraTargets, scale, fn);
  }

  /**
   * Memory-efficient attention in the UNet and the VAE (diffusers' enable_xformers_memory_efficient_attention;
   * `false` turns it off): see setMemoryEfficientAttention. Returns how many attention layers were set.
   */
  enableMemoryEfficientAttention(on: boolean | { maxScoresBytes?: number } = true): number {
    return setMemoryEfficientAttention(this.unet, on) + setMemoryEfficientAttention(this.vae, on);
  }

  /** The default image side: the UNet's sample_size × the VAE's scale factor. */
  protected defaultSize(): number {
    const s = this.unet.config.sampleSize;
    const side = Array.isArray(s) ? s[0] : s;
    return (side ?? 64) * this.vaeScaleFactor;
  }

  /**
   * Steps 2–4 of every text-to-image call: the scheduler's timesteps, the initial latents, and the denoising loop
   * with classifier-free guidance, `predict` being the UNet on the (scaled, cast) input. Returns the final latents,
   * kept (finishOutput takes them over).
   */
  protected async sample(name: string, v: ResolvedSettings, o: GenerateOptions, batch: number, predict: (input: Tensor, t: number | Tensor) => Tensor): Promise<{ latents: Tensor; timesteps: number[] }> {
    this.scheduler.setTimesteps(v.steps);
    const timesteps = [...this.scheduler.timesteps];
    return this.denoiseFrom(v, o, timesteps, this.prepareLatents(name, batch, v.height, v.width, v.generator, o.latents), predict);
  }

  /**
   * The denoising loop from `latents` over `timesteps` (all of the scheduler's, or img2img's tail), with
   * classifier-free guidance; `predict` is the UNet on the (scaled, cast) input. The latents are taken over.
   */
  protected async denoiseFrom(v: ResolvedSettings, o: GenerateOptions, timesteps: number[], start: Tensor, predict: (input: Tensor, t: number | Tensor) => Tensor): Promise<{ latents: Tensor; timesteps: number[] }> {
    // --cuda_graphs: the UNet call recorded once and replayed, its timestep a tensor (what the UNet makes of a number)
    const graphed = o.cudaGraphs ? new GraphedCall(([input, t]) => predict(input!, t!), {
      device: this.device, onFallback: (why) => process.emitWarning(`CUDA graphs off for this generation: ${why}`, 'DiffloraWarning'),
    }) : null;
    const unet = (input: Tensor, t: number): Tensor => (graphed ? graphed.call([input, torch.tensor([t], { device: this.device })]) : predict(input, t));
    try {
      const latents = await denoise({
        timesteps, latents: start,
        callbackOnStepEnd: o.callbackOnStepEnd, signal: o.signal, around: (fn) => this.withLoraScale(v.loraScale, fn),
        step: (x, t) => noGrad(() => {
          const input = this.scheduler.scaleModelInput(v.cfg ? torch.cat([x, x]) : x, t);
          const noise = guide(unet(input.to(this.dtype), t).float(), v.cfg, v.guidance, o.guidanceRescale ?? 0);
          return this.scheduler.step(noise, t, x, { generator: v.generator });
        }),
      });
      return { latents, timesteps };
    } finally {
      graphed?.dispose();
    }
  }

  /** Initial latents [batch, in_channels, H/f, W/f] × the scheduler's initNoiseSigma (given ones checked, else drawn). */
  protected prepareLatents(name: string, batch: number, height: number, width: number, generator: Generator | undefined, given: Tensor | undefined): Tensor {
    const f = this.vaeScaleFactor;
    const shape = [batch, this.unet.config.inChannels, Math.floor(height / f), Math.floor(width / f)];
    return tidy(() => {
      let latents: Tensor;
      if (given) {
        if (given.shape.join() !== shape.join()) throw new RangeError(`${name}: latents have shape [${given.shape}], expected [${shape}] (batch × channels × height/${f} × width/${f})`);
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
}

/** float16 has no CPU kernels in libtorch: refuse it there with what to use instead. */
export function checkHalfDevice(name: string, dtype: DType | undefined, device: Device | undefined): void {
  if (dtype === 'float16' && (device ?? 'cpu') === 'cpu') {
    throw new Error(`${name}: float16 needs a CUDA device (CPU half-precision kernels are missing in libtorch); use dtype 'bfloat16' or 'float32' on CPU`);
  }
}

/** The generation settings, resolved, checked as diffusers' check_inputs does; errors name the pipeline. */
export interface ResolvedSettings { steps: number; guidance: number; height: number; width: number; n: number; outputType: OutputType; cfg: boolean; loraScale: number; generator: Generator | undefined }

export function resolveSettings(name: string, o: GenerateOptions, defaultSize: number, defaultGuidance: number, makeGenerator: (seed: number) => Generator): ResolvedSettings {
  const v = {
    steps: o.numInferenceSteps ?? 50, guidance: o.guidanceScale ?? defaultGuidance, height: o.height ?? defaultSize, width: o.width ?? defaultSize,
    n: o.numImagesPerPrompt ?? 1, outputType: o.outputType ?? 'png',
  };
  const bad = (what: string): never => { throw new RangeError(`${name}: ${what}`); };
  if (!Number.isInteger(v.steps) || v.steps < 1) bad(`numInferenceSteps must be a positive integer, got ${v.steps}`);
  if (!Number.isInteger(v.height) || !Number.isInteger(v.width) || v.height % 8 !== 0 || v.width % 8 !== 0 || v.height <= 0 || v.width <= 0) {
    bad(`height and width must be positive multiples of 8, got ${v.height}×${v.width}`);
  }
  if (!Number.isInteger(v.n) || v.n < 1) bad(`numImagesPerPrompt must be a positive integer, got ${v.n}`);
  if (!['png', 'tensor', 'array', 'latent'].includes(v.outputType)) bad(`outputType must be 'png', 'tensor', 'array' or 'latent', got '${v.outputType}'`);
  if (o.prompt === undefined && !o.promptEmbeds) bad('give `prompt` or `promptEmbeds`');
  if (o.prompt !== undefined && o.promptEmbeds) bad('give `prompt` or `promptEmbeds`, not both');
  if (o.generator && o.seed !== undefined) bad('give `generator` or `seed`, not both');
  if (o.cudaGraphs !== undefined && typeof o.cudaGraphs !== 'boolean') bad(`cudaGraphs must be true or false, got ${JSON.stringify(o.cudaGraphs)}`);
  const generator = o.generator ?? (o.seed !== undefined ? makeGenerator(o.seed) : undefined);
  return { ...v, cfg: v.guidance > 1, loraScale: o.crossAttentionKwargs?.scale ?? 1, generator };
}

/** [B, …] → [B·n, …], each row repeated n times in place (diffusers' repeat + view). */
export function repeatPerPrompt(t: Tensor, n: number): Tensor {
  if (n === 1) return t;
  const [b, ...rest] = t.shape as number[];
  return t.unsqueeze(1).expand(b as number, n, ...rest).reshape((b as number) * n, ...rest);
}

/** The list of n texts a string or list gives, or an error naming the pipeline and what they are. */
export function textList(name: string, what: string, v: string | string[], n: number): string[] {
  const list = typeof v === 'string' ? Array<string>(n).fill(v) : v;
  if (list.length !== n) throw new RangeError(`${name}: ${list.length} ${what}(s) for ${n} prompt(s); give one per prompt or a single string`);
  return list;
}

/**
 * Classifier-free guidance on a [uncond, cond] batch of predictions: uncond + g·(cond − uncond), then diffusers'
 * rescale_noise_cfg when `rescale` > 0. Without guidance the prediction is returned as it is.
 */
export function guide(noise: Tensor, cfg: boolean, guidance: number, rescale: number): Tensor {
  if (!cfg) return noise;
  const [uncond, cond] = noise.chunk(2) as [Tensor, Tensor];
  const guided = uncond.add(cond.sub(uncond).mul(guidance));
  return rescale > 0 ? rescaleNoiseCfg(guided, cond, rescale) : guided;
}

/** diffusers' rescale_noise_cfg: match the guided prediction's std to the conditional one's, then blend. */
function rescaleNoiseCfg(guided: Tensor, cond: Tensor, phi: number): Tensor {
  const dims = Array.from({ length: cond.ndim - 1 }, (_, i) => i + 1);
  const stdCond = cond.var(dims, true, true).sqrt();
  const stdGuided = guided.var(dims, true, true).sqrt();
  const rescaled = guided.mul(stdCond.div(stdGuided));
  return rescaled.mul(phi).add(guided.mul(1 - phi));
}

export interface DenoisingLoop {
  timesteps: number[];
  /** The initial latents; the loop takes them over (kept or not) and returns the last ones, kept. */
  latents: Tensor;
  /** One step: latents at t → the next latents (run inside tidy(), under `around`). */
  step(latents: Tensor, t: number): Tensor;
  /** Wraps each step (a LoRA scale). */
  around?<T>(fn: () => T): T;
  callbackOnStepEnd?: (info: StepInfo) => void;
  signal?: AbortSignal;
}

/**
 * Runs the steps, each in its own tidy() so a step leaves only the new latents behind; between steps it yields to
 * the event loop (progress reaches the terminal, abort signals fire, finalizers run). The final latents are kept:
 * release them with `t.kept = false; t.dispose()` (finishOutput does).
 */
export async function denoise(l: DenoisingLoop): Promise<Tensor> {
  let latents = l.latents.kept ? l.latents : keep(l.latents);
  try {
    for (let i = 0; i < l.timesteps.length; i++) {
      const t = l.timesteps[i] as number;
      const run = (): Tensor => tidy(() => l.step(latents, t));
      const next = keep(l.around ? l.around(run) : run());
      release(latents);
      latents = next;
      l.callbackOnStepEnd?.({ step: i, numSteps: l.timesteps.length, timestep: t, latents });
      await new Promise<void>((resolve) => setImmediate(resolve));
      l.signal?.throwIfAborted();
    }
    return latents;
  } catch (e) {
    release(latents);
    throw e;
  }
}

/** Frees a tensor kept out of tidy(). */
export function release(t: Tensor): void {
  t.kept = false;
  t.dispose();
}

/**
 * The pipeline's result from the final (kept) latents, which it takes over: the latents themselves ('latent'),
 * or `decode(latents)` — images [B, 3, H, W] in [-1, 1] — post-processed as diffusers' VaeImageProcessor
 * ((x/2 + 0.5).clamp(0, 1)) into a tensor, an NHWC array or PNG files.
 */
export async function finishOutput(latents: Tensor, outputType: OutputType, timesteps: number[], decode: (latents: Tensor) => Tensor): Promise<PipelineOutput> {
  if (outputType === 'latent') {
    latents.kept = false;
    return { tensor: latents, timesteps };
  }
  let images: Tensor;
  try {
    images = noGrad(() => tidy(() => decode(latents).div(2).add(0.5).clamp(0, 1).float()));
  } finally {
    release(latents);
  }
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
