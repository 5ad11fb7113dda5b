// StableDiffusionImg2ImgPipeline (diffusers 0.31 pipelines/stable_diffusion/pipeline_stable_diffusion_img2img.py):
// the text-to-image pipeline started part way through the schedule from a picture. The picture is encoded by the
// VAE (a posterior sample drawn with the generator, × scaling_factor), noised to the first timestep kept, then
// denoised over the tail of the schedule. `strength` says how much of the schedule runs: 1 is text to image from
// the picture's noised latents, 0.3 keeps most of the picture.
import sharp from 'sharp';
import { noGrad } from '../autograd.js';
import { decodeRgb } from '../data/transforms.js';
import { Generator } from '../random.js';
import { keep, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import { finishOutput, release, resolveSettings, type GenerateOptions, type PipelineFromPretrainedOptions, type PipelineOutput } from './pipeline_utils.js';
import { StableDiffusionPipeline, type StableDiffusionComponents } from './stable_diffusion.js';

const NAME = 'StableDiffusionImg2ImgPipeline';

export interface Img2ImgOptions extends Omit<GenerateOptions, 'height' | 'width' | 'latents'> {
  /**
   * The starting picture: an image file's path or bytes (PNG, JPEG, WebP, …; resized down to multiples of the
   * VAE's scale factor as diffusers' VaeImageProcessor does), or an NCHW tensor in [0, 1] (one picture for every
   * prompt, or one per prompt).
   */
  image: string | Buffer | Tensor;
  /** How much of the schedule runs, in [0, 1] (default 0.8, as diffusers). */
  strength?: number;
}

/** diffusers' get_timesteps: the tail of the schedule that `strength` keeps, and where it starts. */
export function img2imgTimesteps(timesteps: readonly number[], numInferenceSteps: number, strength: number, order: number): { timesteps: number[]; start: number } {
  const init = Math.min(Math.trunc(numInferenceSteps * strength), numInferenceSteps);
  const tStart = Math.max(numInferenceSteps - init, 0);
  return { timesteps: timesteps.slice(tStart * order), start: tStart * order };
}

export class StableDiffusionImg2ImgPipeline extends StableDiffusionPipeline {
  constructor(c: StableDiffusionComponents) {
    super(c);
  }

  /** A Stable Diffusion 1.x/2.x folder or cached id, as StableDiffusionPipeline.fromPretrained. */
  static override fromPretrained(pathOrId: string, o: PipelineFromPretrainedOptions = {}): StableDiffusionImg2ImgPipeline {
    return new StableDiffusionImg2ImgPipeline(StableDiffusionPipeline.fromPretrained(pathOrId, o));
  }

  /** The same models as another Stable Diffusion pipeline (diffusers' from_pipe): nothing is copied. */
  static fromPipe(pipe: StableDiffusionComponents): StableDiffusionImg2ImgPipeline {
    return new StableDiffusionImg2ImgPipeline(pipe);
  }

  /** Image to image: `await pipe.generate({ prompt, image: 'sketch.png', strength: 0.6, seed: 0 })`. */
  override async generate(o: GenerateOptions | Img2ImgOptions): Promise<PipelineOutput> {
    if (!('image' in o) || o.image === undefined) throw new TypeError(`${NAME}: give \`image\` (a file, its bytes, or an NCHW tensor in [0, 1])`);
    const strength = o.strength ?? 0.8;
    if (!(strength >= 0 && strength <= 1)) throw new RangeError(`${NAME}: strength must be in [0, 1], got ${strength}`);
    const pixels = keep(await this.preprocess(o.image));
    try {
      const [h, w] = pixels.shape.slice(2) as [number, number];
      const v = { ...resolveSettings(NAME, { ...o, height: h, width: w }, h, 7.5, (seed) => new Generator('cpu').manualSeed(seed)) };
      this.scheduler.setTimesteps(v.steps);
      const tail = img2imgTimesteps(this.scheduler.timesteps, v.steps, strength, this.scheduler.order);
      if (tail.timesteps.length === 0) throw new RangeError(`${NAME}: strength ${strength} with ${v.steps} steps leaves no denoising step; raise strength or numInferenceSteps`);
      this.scheduler.setBeginIndex?.(tail.start);
      o.signal?.throwIfAborted();
      const context = this.guidanceContext(o, v);
      try {
        const batch = (context.shape[0] ?? 1) / (v.cfg ? 2 : 1);
        const start = this.noisedLatents(pixels, batch, tail.timesteps[0] as number, v.generator);
        const { latents, timesteps } = await this.denoiseFrom(v, o, tail.timesteps, start, (input, t) => this.unet.forward(input, t, context));
        return await finishOutput(latents, v.outputType, timesteps, (z) => this.vae.decode(z.to(this.vae.decoder.conv_in.weight.dtype).div(this.vae.scalingFactor)));
      } finally {
        release(context);
      }
    } finally {
      release(pixels);
    }
  }

  /**
   * diffusers' prepare_latents: the pictures encoded (a posterior sample with the generator, × scaling_factor),
   * repeated to the batch, then scheduler.add_noise at the first timestep with noise from the same generator.
   */
  private noisedLatents(pixels: Tensor, batch: number, t0: number, generator: Generator | undefined): Tensor {
    return noGrad(() => tidy(() => {
      const weight = this.vae.encoder.conv_in.weight;
      const encoded = this.vae.encode(pixels.to({ dtype: weight.dtype, device: weight.device })).sample(generator).mul(this.vae.scalingFactor);
      const have = encoded.shape[0] as number;
      if (batch % have !== 0) throw new RangeError(`${NAME}: ${have} image(s) for a batch of ${batch}; give one image, or one per prompt`);
      const init = have === batch ? encoded : torch.cat(Array<Tensor>(batch / have).fill(encoded)); // diffusers: cat([latents] * k)
      const drawOn = generator?.device ?? init.device;
      const noise = torch.randn(init.shape, { generator, dtype: init.dtype, device: drawOn }).to({ device: init.device });
      const timesteps = torch.full([batch], t0, { dtype: 'int64', device: init.device });
      return this.scheduler.addNoise(init, noise, timesteps).float();
    }));
  }

  /** VaeImageProcessor.preprocess: [1, 3, H, W] in [-1, 1], H and W rounded down to multiples of the VAE's scale factor. */
  private async preprocess(image: string | Buffer | Tensor): Promise<Tensor> {
    const f = this.vaeScaleFactor;
    if (typeof image !== 'string' && !Buffer.isBuffer(image)) {
      if (image.ndim !== 4 || image.shape[1] !== 3) throw new RangeError(`${NAME}: an image tensor must be [B, 3, H, W] in [0, 1], got [${image.shape}]`);
      const [h, w] = image.shape.slice(2) as [number, number];
      if (h % f !== 0 || w % f !== 0) throw new RangeError(`${NAME}: an image tensor's height and width must be multiples of ${f}, got ${h}×${w}`);
      return tidy(() => image.to({ dtype: 'float32', device: this.device }).mul(2).sub(1));
    }
    const rgb = typeof image === 'string' ? await decodeRgb(image) : await decodeBytes(image);
    const w = rgb.width - (rgb.width % f);
    const h = rgb.height - (rgb.height % f);
    if (w === 0 || h === 0) throw new RangeError(`${NAME}: the image is ${rgb.width}×${rgb.height}, smaller than the VAE's ${f}×${f} cell`);
    const data = w === rgb.width && h === rgb.height ? rgb.data
      : await sharp(rgb.data, { raw: { width: rgb.width, height: rgb.height, channels: 3 } }).resize(w, h, { fit: 'fill', kernel: 'lanczos3' }).raw().toBuffer();
    return tidy(() => torch.tensor(new Uint8Array(data.buffer, data.byteOffset, data.length), { shape: [1, h, w, 3] })
      .to({ dtype: 'float32', device: this.device }).permute(0, 3, 1, 2).div(255).mul(2).sub(1).contiguous());
  }
}

async function decodeBytes(bytes: Buffer): Promise<{ data: Buffer; width: number; height: number }> {
  try {
    const { data, info } = await sharp(bytes, { failOn: 'error' }).rotate().removeAlpha().toColourspace('srgb').raw({ depth: 'uchar' }).toBuffer({ resolveWithObject: true });
    return { data, width: info.width, height: info.height };
  } catch (e) {
    throw new Error(`${NAME}: cannot decode the image bytes: ${(e as Error).message}`);
  }
}
