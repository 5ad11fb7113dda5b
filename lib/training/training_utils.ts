// diffusers' training_utils.py: what the training objective needs from a noise schedule beyond add_noise.
import { checkTimestepIndices, rsub, type SchedulerBase } from '../schedulers/scheduling_utils.js';
import { tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';

/**
 * SNR(t) = ᾱ_t / (1 − ᾱ_t), shaped like timesteps, float32, as diffusers.training_utils.compute_snr (Min-SNR
 * weighting, Hang et al. 2023): computed as (sqrt(ᾱ_t) / sqrt(1 − ᾱ_t))², in that order, for the same bits.
 * The timesteps must be integers in [0, num_train_timesteps).
 */
export function computeSnr(scheduler: Pick<SchedulerBase, 'alphasCumprodOn' | 'className' | 'numTrainTimesteps'>, timesteps: Tensor): Tensor {
  return tidy(() => {
    const alphasCumprod = scheduler.alphasCumprodOn(timesteps.device);
    checkTimestepIndices(scheduler.className, timesteps, scheduler.numTrainTimesteps);
    const index = timesteps.flatten();
    const alpha = alphasCumprod.pow(0.5).indexSelect(0, index).float().reshape(timesteps.shape);
    const sigma = rsub(alphasCumprod, 1).pow(0.5).indexSelect(0, index).float().reshape(timesteps.shape);
    return alpha.div(sigma).pow(2);
  });
}
