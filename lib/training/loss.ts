// The training objective of diffusers' examples/text_to_image/train_text_to_image_lora.py (0.31):
//   target = noise (epsilon) or noise_scheduler.get_velocity(latents, noise, timesteps) (v_prediction);
//   loss   = F.mse_loss(model_pred.float(), target.float(), reduction="mean")                 without --snr_gamma
//          = mean_b( mean_{c,h,w}((model_pred − target)²) · w_b )                            with it, where
//   w_b    = min(SNR_b, γ) / SNR_b (epsilon) or min(SNR_b, γ) / (SNR_b + 1) (v_prediction)
// (Min-SNR-γ, Hang et al. 2023, §3.4 and, for ε- and v-targets, §4.2). The loss is always float32: under
// mixed precision the UNet's fp16/bf16 output is upcast before the difference, as the script does.
import * as F from '../functional.js';
import { tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';
import type { DDPMScheduler } from '../schedulers/scheduling_ddpm.js';
import type { PredictionType } from '../schedulers/scheduling_utils.js';
import { computeSnr } from './training_utils.js';

/** The prediction types the script can train: it raises "Unknown prediction type" for any other. */
export type TrainablePredictionType = Extract<PredictionType, 'epsilon' | 'v_prediction'>;

/**
 * --prediction_type when given (the script writes it into the scheduler's config), else the scheduler
 * config's prediction_type; refuses what the script cannot train ('sample').
 */
export function resolvePredictionType(scheduler: DDPMScheduler, override?: string | null): TrainablePredictionType {
  const type = override ?? scheduler.config.prediction_type;
  if (type === 'epsilon' || type === 'v_prediction') return type;
  throw new Error(`Unknown prediction type ${JSON.stringify(type)}: train_text_to_image_lora.py trains 'epsilon' or 'v_prediction' only`);
}

/** What the UNet learns to predict: the noise itself, or the velocity sqrt(ᾱ)·noise − sqrt(1−ᾱ)·latents. */
export function trainingTarget(
  scheduler: DDPMScheduler,
  latents: Tensor,
  noise: Tensor,
  timesteps: Tensor,
  predictionType: TrainablePredictionType,
): Tensor {
  if (predictionType === 'epsilon') return noise;
  if (predictionType === 'v_prediction') return scheduler.getVelocity(latents, noise, timesteps);
  throw new Error(`Unknown prediction type ${JSON.stringify(predictionType)}`);
}

/**
 * Min-SNR-γ loss weights per batch item, written as the script does:
 * `stack([snr, γ·ones_like(timesteps)], dim=1).min(dim=1)[0]`, then ÷ snr (epsilon) or ÷ (snr + 1)
 * (v_prediction: the velocity loss already carries a factor SNR + 1 relative to the x₀ loss).
 */
export function minSnrLossWeights(snr: Tensor, snrGamma: number, predictionType: TrainablePredictionType): Tensor {
  if (!(snrGamma > 0) || !Number.isFinite(snrGamma)) throw new RangeError(`snr_gamma must be a positive number, got ${snrGamma}`);
  return tidy(() => {
    // γ·ones_like(timesteps) is float32 in torch (an integer tensor times a Python float)
    const gamma = torch.full(snr.shape, snrGamma, { dtype: 'float32', device: snr.device });
    const [clipped] = torch.stack([snr, gamma], 1).min(1);
    return predictionType === 'epsilon' ? clipped.div(snr) : clipped.div(snr.add(1));
  });
}

/** mean over everything but the batch dimension, times the per-item weights, then the batch mean. */
export function weightedMseLoss(modelPred: Tensor, target: Tensor, weights: Tensor): Tensor {
  if (modelPred.ndim < 2) throw new RangeError(`weightedMseLoss: model_pred must have a batch dimension and at least one more, got shape [${modelPred.shape.join(', ')}]`);
  return tidy(() => {
    const perElement = F.mseLoss(modelPred.float(), target.float(), 'none');
    const dims = Array.from({ length: perElement.ndim - 1 }, (_, i) => i + 1);
    return perElement.mean(dims).mul(weights).mean();
  });
}

export interface DiffusionLossOptions {
  /** The scheduler the noisy latents came from (for the SNR of each timestep). */
  scheduler: DDPMScheduler;
  /** The timesteps of the batch, int64 [B]. */
  timesteps: Tensor;
  /** --snr_gamma: Min-SNR weighting when set (5.0 is the paper's recommendation); plain MSE when absent. */
  snrGamma?: number | null;
  /** --prediction_type; default the scheduler config's. */
  predictionType?: string | null;
}

/** The scalar float32 loss of one batch, as the script computes it. */
export function diffusionLoss(modelPred: Tensor, target: Tensor, o: DiffusionLossOptions): Tensor {
  if (o.snrGamma === undefined || o.snrGamma === null) {
    return tidy(() => F.mseLoss(modelPred.float(), target.float(), 'mean'));
  }
  const predictionType = resolvePredictionType(o.scheduler, o.predictionType);
  const snrGamma = o.snrGamma;
  return tidy(() => {
    const snr = computeSnr(o.scheduler, o.timesteps);
    return weightedMseLoss(modelPred, target, minSnrLossWeights(snr, snrGamma, predictionType));
  });
}

/**
 * train_dreambooth_lora.py's prior-preservation loss: prediction and target chunked in two along the batch
 * (instance half first, as collate_fn concatenates them), each half's float32 MSE a mean over that half, and
 * loss = instance + priorLossWeight · prior (with weight 1 twice the whole batch's mean).
 */
export function priorPreservationLoss(modelPred: Tensor, target: Tensor, priorLossWeight: number): { loss: Tensor; instanceLoss: Tensor; priorLoss: Tensor } {
  const b = modelPred.shape[0] ?? 0;
  if (b < 2 || b % 2 !== 0) throw new RangeError(`prior preservation needs a batch of instance and class halves, got ${b} item(s)`);
  return tidy(() => {
    const [pred, predPrior] = modelPred.chunk(2, 0) as [Tensor, Tensor];
    const [tgt, tgtPrior] = target.chunk(2, 0) as [Tensor, Tensor];
    const instanceLoss = F.mseLoss(pred.float(), tgt.float(), 'mean');
    const priorLoss = F.mseLoss(predPrior.float(), tgtPrior.float(), 'mean');
    return { loss: instanceLoss.add(priorLoss.mul(priorLossWeight)), instanceLoss, priorLoss };
  });
}
