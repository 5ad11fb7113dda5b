// The optimization of a LoRA run, as the script sets it up: AdamW over the LoRA parameters (the learning
// rate scaled by --scale_lr), an fp16 loss scaler when training in fp16, and accelerate's gradient
// accumulation with the LR schedule and gradient clipping (step.ts's Accumulator).
import { AdamW } from '../optim/adamw.js';
import { GradScaler } from '../optim/grad_scaler.js';
import type { Tensor } from '../tensor.js';
import type { ResolvedTrainOptions } from './options.js';
import { Accumulator } from './step.js';

export interface Optimization {
  optimizer: AdamW;
  scaler: GradScaler | null;
  accumulator: Accumulator;
  /** The learning rate after --scale_lr (the schedule's base). */
  baseLr: number;
}

/**
 * The flags the optimization reads. `lrNumCycles` / `lrPower` are the DreamBooth script's --lr_num_cycles and
 * --lr_power, which it passes to get_scheduler; absent (train_text_to_image_lora.py passes neither), each
 * schedule's own default applies (cosine 0.5 cycles, cosine_with_restarts 1, power 1).
 */
export type OptimizationOptions = Pick<ResolvedTrainOptions, 'learningRate' | 'scaleLr' | 'gradientAccumulationSteps' | 'trainBatchSize' | 'adamBeta1' |
  'adamBeta2' | 'adamWeightDecay' | 'adamEpsilon' | 'maxGradNorm' | 'lrScheduler' | 'lrWarmupSteps' | 'mixedPrecision'> & { lrNumCycles?: number; lrPower?: number };

/**
 * The optimizer, loss scaler and accumulator of `params` for a run of `totalSteps` optimizer steps. The caller disposes
 * the optimizer. `numProcesses` (data-parallel processes) enters as in the script under accelerate: --scale_lr
 * multiplies by it, and the schedule's warm-up and total steps are N× with N schedule steps per optimizer step.
 */
export function makeOptimization(o: OptimizationOptions, params: Tensor[], totalSteps: number, numProcesses = 1): Optimization {
  const accumulation = o.gradientAccumulationSteps;
  const baseLr = o.learningRate * (o.scaleLr ? accumulation * o.trainBatchSize * numProcesses : 1);
  const optimizer = new AdamW(params, { lr: baseLr, betas: [o.adamBeta1, o.adamBeta2], weightDecay: o.adamWeightDecay, eps: o.adamEpsilon });
  try {
    const scaler = o.mixedPrecision === 'fp16' ? new GradScaler() : null;
    const accumulator = new Accumulator({
      optimizer, params, scaler, maxGradNorm: o.maxGradNorm, accumulationSteps: accumulation,
      lrScheduler: o.lrScheduler,
      lrOptions: { baseLr, warmupSteps: o.lrWarmupSteps * numProcesses, totalSteps: totalSteps * numProcesses, numCycles: o.lrNumCycles, power: o.lrPower },
      lrStepsPerStep: numProcesses,
    });
    return { optimizer, scaler, accumulator, baseLr };
  } catch (e) {
    optimizer.dispose();
    throw e;
  }
}

/** An optimizer step that failed (e.g. a step size lr / (1 − β1^t) beyond float32), with the settings that produced it. */
export function optimizerStepError(e: unknown, step: number, o: OptimizationOptions, baseLr: number): Error {
  return new Error(`the optimizer step ${step} failed with learning rate ${baseLr}${o.scaleLr ? ' (--learning_rate scaled by --scale_lr)' : ''} --adam_beta1=${o.adamBeta1} ` +
    `--adam_beta2=${o.adamBeta2} --adam_weight_decay=${o.adamWeightDecay}: ${(e as Error).message}`);
}
