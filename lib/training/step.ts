// The inner loop of diffusers' examples/text_to_image/train_text_to_image_lora.py (0.31), as small parts:
//
//   latents = vae.encode(pixel_values.to(weight_dtype)).latent_dist.sample() * scaling_factor   encodeLatents
//   noise = randn_like(latents) (+ noise_offset * randn(B, C, 1, 1))                             sampleNoise
//   timesteps = randint(0, num_train_timesteps, (B,))                                            sampleTimesteps
//   noisy = add_noise(latents, noise, t); ehs = text_encoder(input_ids)[0]; pred = unet(...)     loraTrainingStep
//   loss = mse or Min-SNR (fp32); accelerator.backward(loss / accumulation [· scale])            loraTrainingStep
//   at the boundary: unscale, clip_grad_norm_, optimizer.step, lr_scheduler.step, zero_grad     Accumulator
//
// Differences from the script, on purpose (REFERENCE.md): the gradient clipping is real (the script's is a
// no-op), and an fp16 step skipped by the GradScaler does not advance the LR schedule (accelerate's
// AcceleratedScheduler semantics, which the script gets through accelerate).
import { autocast, noGrad } from '../autograd.js';
import type { AutoencoderKL } from '../models/autoencoder_kl.js';
import { DiagonalGaussianDistribution } from '../models/vae.js';
import type { CLIPTextModel } from '../models/clip_text_model.js';
import type { UNet2DConditionModel, UNetAddedConditions } from '../models/unet_2d_condition.js';
import type { Optimizer } from '../optim/optimizer.js';
import { clipGradNorm } from '../optim/clip.js';
import type { GradScaler } from '../optim/grad_scaler.js';
import type { Generator } from '../random.js';
import type { DDPMScheduler } from '../schedulers/scheduling_ddpm.js';
import { tidy } from '../scope.js';
import type { Device, Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import { diffusionLoss, priorPreservationLoss, resolvePredictionType, trainingTarget, type TrainablePredictionType } from './loss.js';
import { lrAt, type LrScheduleOptions } from './lr_schedule.js';

/** --mixed_precision. */
export type MixedPrecision = 'no' | 'bf16' | 'fp16';

const deviceTypeOf = (device: string): 'cpu' | 'cuda' => (device.startsWith('cuda') ? 'cuda' : 'cpu');

/**
 * Where draws come from: one generator (or the device's default) for the whole batch, or one generator per item
 * (sample_rng.ts's per-sample streams: item i's draws from generators[i], whatever the batch).
 */
export type Draws = Generator | readonly Generator[] | undefined;

const perItem = (g: Draws): g is readonly Generator[] => Array.isArray(g);

/** A tensor's dtype and device: what draws "like" it take. */
type Like = Pick<Tensor, 'dtype' | 'device'>;

/** Normal draws as diffusers' randn_tensor: on the generator's device (a CPU generator works for CUDA tensors), then moved. */
function randnOn(shape: readonly number[], like: Like, generator?: Draws): Tensor {
  if (perItem(generator)) {
    if (generator.length !== shape[0]) throw new RangeError(`${generator.length} per-item generators for a batch of ${shape[0]}`);
    const one = [1, ...shape.slice(1)];
    return tidy(() => {
      const parts = generator.map((g) => randnOn(one, like, g));
      return parts.length === 1 ? parts[0]! : torch.cat(parts);
    });
  }
  const drawOn = generator?.device ?? like.device;
  const t = torch.randn(shape, { generator, dtype: like.dtype, device: drawOn });
  return t.device === like.device ? t : t.to({ device: like.device });
}

/**
 * Images [B, 3, H, W] in [-1, 1] → scaled latents: vae.encode(pixels in the VAE's dtype).sample(generator) ×
 * scaling_factor, without gradients. Each image goes through the VAE alone (a batch of 1): batched convolutions
 * round differently from one batch size to another, and this way an item's latent distribution is the same in any
 * batch and equals the one --cache_latents keeps (latent_cache.ts), so cached and uncached runs agree bit for bit.
 */
export function encodeLatents(vae: AutoencoderKL, pixelValues: Tensor, generator?: Draws, latentNoise?: Tensor): Tensor {
  const weight = vae.parameters()[0];
  return noGrad(() => tidy(() => {
    const pixels = weight ? pixelValues.to({ dtype: weight.dtype, device: weight.device }) : pixelValues;
    const parameters = eachItem(pixels.shape[0] ?? 0, (i, k) => vae.encode(pixels.narrow(0, i, k)).parameters, pixels.device);
    return sampleLatentDist(parameters, vae.scalingFactor, generator, latentNoise);
  }));
}

/**
 * Latents from the VAE's DiagonalGaussian parameters [B, 2·C, h, w] (the encoder's output, or --cache_latents' kept
 * copy): mean + std · ε with the step's draws, × scaling_factor, without gradients.
 */
export function sampleLatentDist(parameters: Tensor, scalingFactor: number, generator?: Draws, latentNoise?: Tensor): Tensor {
  return noGrad(() => tidy(() => {
    const posterior = new DiagonalGaussianDistribution(parameters);
    // per-item generators or drawn beforehand (drawStepInputs): mean + std · ε (DiagonalGaussianDistribution.sample's arithmetic)
    const eps = latentNoise ?? (perItem(generator) ? randnOn(posterior.mean.shape, posterior.parameters, generator) : null);
    const z = eps ? posterior.mean.add(posterior.std.mul(eps)) : posterior.sample(generator as Generator | undefined);
    return z.mul(scalingFactor);
  }));
}

export interface SampleNoiseOptions {
  /** --noise_offset: adds noiseOffset · randn(B, C, 1, 1) when > 0 (offset noise). */
  noiseOffset?: number;
  generator?: Draws;
}

/** randn like the latents, plus the script's offset noise when noiseOffset > 0. */
export function sampleNoise(latents: Tensor, o: SampleNoiseOptions = {}): Tensor {
  return sampleNoiseLike(latents.shape, latents, o);
}

/** sampleNoise for latents of `shape` with `like`'s dtype and device, before they exist. */
function sampleNoiseLike(shape: readonly number[], like: Like, o: SampleNoiseOptions): Tensor {
  const offset = o.noiseOffset ?? 0;
  if (!(offset >= 0) || !Number.isFinite(offset)) throw new RangeError(`noise_offset must be a finite number ≥ 0, got ${offset}`);
  return tidy(() => {
    const noise = randnOn(shape, like, o.generator);
    if (offset === 0) return noise;
    const [b, c] = shape;
    if (b === undefined || c === undefined) throw new RangeError(`sampleNoise: latents need [B, C, ...], got [${shape.join(', ')}]`);
    const perChannel = Array.from({ length: shape.length }, (_, i) => (i === 0 ? b : i === 1 ? c : 1));
    return noise.add(randnOn(perChannel, like, o.generator).mul(offset));
  });
}

/** One timestep per item, uniform in [0, numTrainTimesteps), int64. */
export function sampleTimesteps(batch: number, numTrainTimesteps: number, generator?: Draws, device?: Device): Tensor {
  if (!Number.isInteger(batch) || batch < 1) throw new RangeError(`sampleTimesteps: batch must be a positive integer, got ${batch}`);
  if (!Number.isInteger(numTrainTimesteps) || numTrainTimesteps < 1) throw new RangeError(`sampleTimesteps: numTrainTimesteps must be a positive integer, got ${numTrainTimesteps}`);
  if (perItem(generator)) {
    if (generator.length !== batch) throw new RangeError(`sampleTimesteps: ${generator.length} per-item generators for a batch of ${batch}`);
    return tidy(() => {
      const parts = generator.map((g) => sampleTimesteps(1, numTrainTimesteps, g, device));
      return parts.length === 1 ? parts[0]! : torch.cat(parts);
    });
  }
  const target = device ?? generator?.device ?? 'cpu';
  const drawOn = generator?.device ?? target;
  return tidy(() => {
    const t = torch.randint(0, numTrainTimesteps, [batch], { generator, dtype: 'int64', device: drawOn });
    return t.device === target ? t : t.to({ device: target });
  });
}

/** One micro-batch: clean latents or images, and prompt embeddings or token ids. */
export interface TrainingBatch {
  /** Scaled latents [B, 4, h, w] (already × scaling_factor); else pixelValues and `vae` are needed. */
  latents?: Tensor;
  /** Images [B, 3, H, W] in [-1, 1]. */
  pixelValues?: Tensor;
  /** The VAE's DiagonalGaussian parameters [B, 2·C, h, w] kept by --cache_latents (latent_cache.ts); needs `scalingFactor`. */
  latentDist?: Tensor;
  /** Prompt embeddings [B, 77, D]; else inputIds and `textEncoder` are needed. */
  encoderHiddenStates?: Tensor;
  /** Token ids [B, 77], int64. */
  inputIds?: Tensor;
  /** The tokenizer's attention mask [B, 77] for the text encoder (DreamBooth's --text_encoder_use_attention_mask). */
  attentionMask?: Tensor;
}

/** Everything one forward/backward of the script needs. */
export interface TrainingStep {
  unet: UNet2DConditionModel;
  scheduler: DDPMScheduler;
  batch: TrainingBatch;
  vae?: AutoencoderKL;
  /** The VAE's scaling factor, for a batch of cached latent distributions (batch.latentDist). */
  scalingFactor?: number;
  textEncoder?: CLIPTextModel;
  /** The text encoder trains (its LoRA): it runs with gradients, under autocast for mixed precision. Default false: frozen, no gradients. */
  trainTextEncoder?: boolean;
  /**
   * The UNet's conditioning when it is not one text encoder's last_hidden_state of batch.inputIds (SDXL: two
   * encoders and the added conditions). It runs where the text encoder would: with gradients under autocast
   * when trainTextEncoder, else without gradients.
   */
  condition?: () => Conditioning;
  /** Noise like the latents; drawn with sampleNoise(generator, noiseOffset) when absent. */
  noise?: Tensor;
  /** int64 [B]; drawn with sampleTimesteps(generator) when absent. */
  timesteps?: Tensor;
  /** One generator for the batch, or one per item (sample_rng.ts): the VAE's ε, the noise and the timesteps come from it. */
  generator?: Draws;
  /** The ε of the latent distribution's sample (mean + std · ε), drawn beforehand (drawStepInputs); drawn from `generator` when absent. */
  latentNoise?: Tensor;
  /** The loss scale as a device tensor (a captured step, device_step.ts): the backward's loss is × it instead of `scaler`'s number. */
  lossScale?: Tensor | null;
  noiseOffset?: number;
  /** --prediction_type; default the scheduler config's. */
  predictionType?: string | null;
  /** --snr_gamma. */
  snrGamma?: number | null;
  /** --gradient_accumulation_steps: the loss is divided by it before backward. Default 1. */
  accumulationSteps?: number;
  /** Default 'no'. 'fp16' needs CUDA and a GradScaler. */
  mixedPrecision?: MixedPrecision;
  /** Dynamic loss scaling (required for fp16; usable in any mode). */
  scaler?: GradScaler | null;
}

function autocastDtype(mixedPrecision: MixedPrecision, device: string): 'float16' | 'bfloat16' | null {
  if (mixedPrecision === 'no') return null;
  if (mixedPrecision === 'bf16') return 'bfloat16';
  if (mixedPrecision === 'fp16') {
    if (deviceTypeOf(device) !== 'cuda') {
      throw new Error(
        `mixed_precision 'fp16' needs a CUDA device (the tensors are on '${device}'): libtorch has no fp16 matmul on CPU ` +
        `and CPU autocast is bfloat16 only; use mixed_precision 'bf16' or 'no' on CPU`,
      );
    }
    return 'float16';
  }
  throw new Error(`unknown mixed_precision ${JSON.stringify(mixedPrecision)}; choose 'no', 'bf16' or 'fp16'`);
}

/** The UNet's prediction for one batch and what it is trained towards (the loop body up to the loss). */
export interface Prediction {
  modelPred: Tensor;
  target: Tensor;
  timesteps: Tensor;
  predictionType: TrainablePredictionType;
}

/** What the UNet is conditioned on: prompt embeddings, and SDXL's added conditions (pooled embedding, time ids). */
export interface Conditioning { encoderHiddenStates: Tensor; addedCond?: UNetAddedConditions }

/** The batch's conditioning: given, s.condition's, or the text encoder's last_hidden_state (with gradients when it trains). */
function encodePrompt(s: TrainingStep, lowPrecision: 'float16' | 'bfloat16' | null, deviceType: 'cpu' | 'cuda'): Conditioning {
  if (s.batch.encoderHiddenStates) return { encoderHiddenStates: s.batch.encoderHiddenStates };
  const { inputIds, attentionMask } = s.batch;
  const textEncoder = s.textEncoder;
  const encode = s.condition ?? ((): Conditioning => {
    if (!inputIds || !textEncoder) throw new Error('loraTrainingStep: the batch needs encoderHiddenStates, or inputIds and a textEncoder');
    if (s.trainTextEncoder) return { encoderHiddenStates: textEncoder.forward(inputIds, { attentionMask }).lastHiddenState };
    // frozen: on the CPU each prompt alone (a batch of 1), so its embedding is the same in any batch and equals --cache_text_embeddings'
    const hidden = (i: number, k: number) => textEncoder.forward(inputIds.narrow(0, i, k), { attentionMask: attentionMask?.narrow(0, i, k) }).lastHiddenState;
    return { encoderHiddenStates: eachItem(inputIds.shape[0] ?? 0, hidden, inputIds.device) };
  });
  if (!s.trainTextEncoder) return noGrad(encode); // frozen: run in the weights' dtype, as the script (not prepared by accelerate)
  return lowPrecision ? autocast({ deviceType, dtype: lowPrecision }, encode) : encode();
}

/**
 * A frozen model's output for a batch of `n`, `f(start, count)` being its output for items [start, start + count).
 * On the CPU, item by item (batches of 1) concatenated along the batch: an item's output is then the same whatever
 * batch it is in (batched convolutions and matmuls round differently from one batch size to another), which is what
 * lets --cache_latents and --cache_text_embeddings match the uncached run bit for bit there. On a GPU, one batched
 * call: there the batch's speed matters more than the last bits (cached and uncached agree to float rounding).
 */
export function eachItem(n: number, f: (start: number, count: number) => Tensor, device: string): Tensor {
  if (n === 1 || device !== 'cpu') return f(0, n);
  return tidy(() => torch.cat(Array.from({ length: n }, (_, i) => f(i, 1))));
}

/**
 * Steps 1–5 of the script's loop body: clean latents, noise and timesteps, forward diffusion, prompt
 * embeddings, and the UNet's prediction (under autocast for mixed precision) with its target. Call inside tidy().
 */
export function predictNoise(s: TrainingStep): Prediction {
  const mixedPrecision = s.mixedPrecision ?? 'no';
  const predictionType = resolvePredictionType(s.scheduler, s.predictionType);
  // 1. clean latents
  let latents = s.batch.latents;
  if (!latents && s.batch.latentDist) {
    if (s.scalingFactor === undefined) throw new Error('loraTrainingStep: a batch of cached latent distributions needs scalingFactor');
    latents = sampleLatentDist(s.batch.latentDist, s.scalingFactor, s.generator, s.latentNoise);
  }
  if (!latents) {
    if (!s.batch.pixelValues || !s.vae) throw new Error('loraTrainingStep: the batch needs latents, latentDist, or pixelValues and a vae');
    latents = encodeLatents(s.vae, s.batch.pixelValues, s.generator, s.latentNoise);
  }
  const lowPrecision = autocastDtype(mixedPrecision, latents.device);
  const deviceType = deviceTypeOf(latents.device);
  const batchSize = latents.shape[0] ?? 0;
  // 2. noise and timesteps
  const noise = s.noise ?? sampleNoise(latents, { noiseOffset: s.noiseOffset, generator: s.generator });
  const timesteps = s.timesteps ?? sampleTimesteps(batchSize, s.scheduler.config.num_train_timesteps, s.generator, latents.device);
  if (noise.shape.join() !== latents.shape.join()) throw new RangeError(`noise [${noise.shape}] must have the latents' shape [${latents.shape}]`);
  if (timesteps.shape.join() !== String(batchSize)) throw new RangeError(`timesteps [${timesteps.shape}] must be [${batchSize}]`);
  // 3. forward diffusion
  const noisyLatents = s.scheduler.addNoise(latents, noise, timesteps);
  // 4. prompt embeddings
  const { encoderHiddenStates, addedCond } = encodePrompt(s, lowPrecision, deviceType);
  // 5. target and prediction (under autocast for mixed precision)
  const target = trainingTarget(s.scheduler, latents, noise, timesteps, predictionType);
  const predict = (): Tensor => s.unet.forward(noisyLatents, timesteps, encoderHiddenStates, addedCond);
  const modelPred = lowPrecision ? autocast({ deviceType, dtype: lowPrecision }, predict) : predict();
  return { modelPred, target, timesteps, predictionType };
}

function checkStep(s: TrainingStep): number {
  const accumulationSteps = s.accumulationSteps ?? 1;
  if (!Number.isInteger(accumulationSteps) || accumulationSteps < 1) throw new RangeError(`accumulationSteps must be a positive integer, got ${accumulationSteps}`);
  if ((s.mixedPrecision ?? 'no') === 'fp16' && !s.scaler) throw new Error(`mixed_precision 'fp16' needs a GradScaler (pass scaler)`);
  return accumulationSteps;
}

/** accelerator.backward: the loss divided for accumulation and scaled for fp16 (by the device scale when given), then backward. */
function backwardLoss(loss: Tensor, accumulationSteps: number, scaler: GradScaler | null | undefined, lossScale?: Tensor | null): void {
  const divided = accumulationSteps === 1 ? loss : loss.div(accumulationSteps);
  (lossScale ? divided.mul(lossScale) : scaler ? scaler.scaleLoss(divided) : divided).backward();
}

/**
 * One micro-batch forward and backward, as the script's loop body up to accelerator.backward: the LoRA
 * gradients accumulate into `.grad` (divided by accumulationSteps, × the scaler's scale when given).
 * Returns the batch loss (fp32, neither divided nor scaled). Every temporary tensor is freed.
 */
export function loraTrainingStep(s: TrainingStep): number {
  return tidy(() => lossAndBackward(s).item());
}

/**
 * loraTrainingStep without reading the loss back: returns the batch loss as a tensor (fp32, 0-dim), so nothing waits
 * for the device (a captured step). Call inside tidy().
 */
export function lossAndBackward(s: TrainingStep): Tensor {
  const accumulationSteps = checkStep(s);
  const p = predictNoise(s);
  // 6. the fp32 loss, divided for accumulation and scaled for fp16, then backward
  const loss = diffusionLoss(p.modelPred, p.target, { scheduler: s.scheduler, timesteps: p.timesteps, snrGamma: s.snrGamma, predictionType: p.predictionType });
  backwardLoss(loss, accumulationSteps, s.scaler, s.lossScale);
  return loss;
}

/** A step's random draws made beforehand: the latent distribution's ε (when latents are sampled), the noise and the timesteps. */
export interface StepDraws { latentNoise?: Tensor; noise: Tensor; timesteps: Tensor }

/**
 * The draws predictNoise would make for `s`, in its order (ε, noise, offset noise, timesteps) from the same generators,
 * so a step given them computes what it would have drawn itself; they are made where the generators are (each per-item
 * generator is a CPU one) and are placed on `device`. The latents' shape and dtype come from the batch (and the VAE's
 * config for images).
 */
export function drawStepInputs(s: Pick<TrainingStep, 'batch' | 'vae' | 'scheduler' | 'generator' | 'noiseOffset'>, device: string, o: { latentsDtype?: Tensor['dtype'] } = {}): StepDraws {
  const { latents, latentDist, pixelValues } = s.batch;
  let shape: readonly number[];
  let dtype: Tensor['dtype'];
  let sampled = true;
  if (latents) {
    [shape, dtype, sampled] = [latents.shape, latents.dtype, false];
  } else if (latentDist) {
    const [b, c2, h, w] = latentDist.shape as [number, number, number, number];
    [shape, dtype] = [[b, c2 / 2, h, w], latentDist.dtype];
  } else if (pixelValues && s.vae) {
    const [b, , h, w] = pixelValues.shape as [number, number, number, number];
    const factor = 2 ** (s.vae.config.block_out_channels.length - 1);
    [shape, dtype] = [[b, s.vae.config.latent_channels, h / factor, w / factor], s.vae.parameters()[0]?.dtype ?? pixelValues.dtype];
  } else {
    throw new Error('drawStepInputs: the batch needs latents, latentDist, or pixelValues and a vae');
  }
  const like: Like = { dtype, device: device as Device };
  return tidy(() => {
    const latentNoise = sampled ? randnOn(shape, like, s.generator) : undefined;
    // the noise is drawn like the latents the UNet gets (SDXL casts the sampled latents to the weight dtype first)
    const noise = sampleNoiseLike(shape, { dtype: o.latentsDtype ?? dtype, device: like.device }, { noiseOffset: s.noiseOffset, generator: s.generator });
    const timesteps = sampleTimesteps(shape[0] ?? 0, s.scheduler.config.num_train_timesteps, s.generator, device);
    return latentNoise ? { latentNoise, noise, timesteps } : { noise, timesteps };
  });
}

/** priorPreservationStep without reading the losses back: the total loss tensor (a captured step). Call inside tidy(). */
export function priorPreservationLossAndBackward(s: TrainingStep & { priorLossWeight: number }): Tensor {
  const accumulationSteps = checkStep(s);
  const p = predictNoise(s);
  const l = priorPreservationLoss(p.modelPred, p.target, s.priorLossWeight);
  backwardLoss(l.loss, accumulationSteps, s.scaler, s.lossScale);
  return l.loss;
}

/** The losses of a prior-preservation step (train_dreambooth_lora.py): the total and its two terms. */
export interface PriorPreservationLosses { loss: number; instanceLoss: number; priorLoss: number }

/**
 * One DreamBooth micro-batch with prior preservation, as train_dreambooth_lora.py's loop body: the batch is
 * [instance…, class…] (collate_fn), prediction and target are split with torch.chunk(2) and the loss is
 * mse(instance half) + priorLossWeight · mse(class half); then backward as loraTrainingStep.
 */
export function priorPreservationStep(s: TrainingStep & { priorLossWeight: number }): PriorPreservationLosses {
  const accumulationSteps = checkStep(s);
  return tidy(() => {
    const p = predictNoise(s);
    const l = priorPreservationLoss(p.modelPred, p.target, s.priorLossWeight);
    backwardLoss(l.loss, accumulationSteps, s.scaler);
    return { loss: l.loss.item(), instanceLoss: l.instanceLoss.item(), priorLoss: l.priorLoss.item() };
  });
}

/** Where the loop stands, as plain numbers a checkpoint can save and restore. */
export interface AccumulatorState {
  /** Optimizer steps taken, skipped fp16 steps included (the script's global_step). */
  globalStep: number;
  /** Steps the LR schedule has advanced (skipped fp16 steps excluded, as accelerate). */
  lrStep: number;
  /** Micro-batches accumulated since the last optimizer step. */
  microStep: number;
}

export interface OptimizerStepOptions {
  optimizer: Optimizer;
  /** The trainable parameters to clip (default: the optimizer's). */
  params?: Tensor[];
  /** --max_grad_norm; null/undefined: no clipping. */
  maxGradNorm?: number | null;
  scaler?: GradScaler | null;
}

export interface OptimizerStepResult {
  /** False when the GradScaler found inf/NaN gradients and skipped the update. */
  stepped: boolean;
  /** Total gradient norm before clipping (after unscaling); null without clipping. */
  gradNorm: number | null;
}

/**
 * The accumulation boundary: unscale (GradScaler), clip, step (skipped on overflow), update the scale,
 * drop the gradients.
 */
export function optimizerStep(o: OptimizerStepOptions): OptimizerStepResult {
  const { optimizer, scaler } = o;
  const params = o.params ?? optimizer.params;
  if (scaler) scaler.unscale_(optimizer);
  const gradNorm = o.maxGradNorm === undefined || o.maxGradNorm === null ? null : clipGradNorm(params, o.maxGradNorm);
  let stepped = true;
  if (scaler) {
    stepped = scaler.step(optimizer);
    scaler.update();
  } else {
    optimizer.step();
  }
  optimizer.zeroGrad();
  return { stepped, gradNorm };
}

export interface AccumulatorOptions extends OptimizerStepOptions {
  /** --gradient_accumulation_steps (default 1). */
  accumulationSteps?: number;
  /** --lr_scheduler name (lr_schedule.ts); the optimizer's LR is set from lrAt(name, state.lrStep, lrOptions). */
  lrScheduler: string;
  lrOptions: LrScheduleOptions & { baseLr: number };
  /**
   * Schedule steps per optimizer step (default 1). With N processes accelerate's AcceleratedScheduler steps the
   * schedule N times per optimizer step (its warm-up and total steps are N× too): lrAt sees lrStep · N.
   */
  lrStepsPerStep?: number;
  /** Restored state (e.g. from a checkpoint); default all zero. */
  state?: AccumulatorState;
  /** An EMA of the parameters (--use_ema), stepped after every optimizer step, skipped fp16 steps included (as diffusers' scripts). */
  ema?: { step(): void } | null;
}

/** accelerate's accumulate(): counts micro-batches and runs optimizerStep at each boundary. */
export class Accumulator {
  readonly state: AccumulatorState;
  readonly accumulationSteps: number;
  private readonly o: AccumulatorOptions;

  constructor(o: AccumulatorOptions) {
    this.o = o;
    this.accumulationSteps = o.accumulationSteps ?? 1;
    if (!Number.isInteger(this.accumulationSteps) || this.accumulationSteps < 1) throw new RangeError(`accumulationSteps must be a positive integer, got ${this.accumulationSteps}`);
    this.state = { globalStep: 0, lrStep: 0, microStep: 0, ...o.state };
    this.o.optimizer.lr = this.lr;
  }

  /** The learning rate of the next optimizer step. */
  get lr(): number {
    return lrAt(this.o.lrScheduler, this.state.lrStep * (this.o.lrStepsPerStep ?? 1), this.o.lrOptions);
  }

  /** Whether the next micro-batch ends the accumulation window (accelerate's sync_gradients). */
  get syncGradients(): boolean {
    return this.state.microStep + 1 >= this.accumulationSteps;
  }

  /**
   * After an optimizer step (the host-side one of afterBackward, or a whole step done on the device by
   * training/graphed_step.ts, its result read back): the EMA steps, the counters advance (the LR schedule not on a
   * skipped step), the next LR is set; returns the step's result with the LR it used.
   */
  recordDeviceStep(r: OptimizerStepResult): OptimizerStepResult & { lr: number } {
    const lr = this.o.optimizer.lr;
    this.o.ema?.step();
    this.state.microStep = 0;
    this.state.globalStep += 1;
    if (r.stepped) this.state.lrStep += 1;
    this.o.optimizer.lr = this.lr;
    return { ...r, lr };
  }

  /**
   * Call after each micro-batch's backward. At the boundary it steps the optimizer, advances the LR schedule
   * unless the step was skipped, sets the next LR and returns the step's result; otherwise null.
   */
  afterBackward(): (OptimizerStepResult & { lr: number }) | null {
    if (!this.syncGradients) {
      this.state.microStep += 1;
      return null;
    }
    return this.recordDeviceStep(optimizerStep(this.o)); // the host-side step, then the same bookkeeping
  }
}
