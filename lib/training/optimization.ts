// The optimization of a LoRA run, as the script sets it up: the optimizer over the LoRA parameters (AdamW, or
// --optimizer prodigy/lion; the learning rate scaled by --scale_lr), an fp16 loss scaler when training in fp16,
// accelerate's gradient accumulation with the LR schedule and gradient clipping (step.ts's Accumulator), and with
// --use_ema an EMA of the LoRA weights updated after every optimizer step.
import { AdamW } from '../optim/adamw.js';
import { EMAModel } from '../optim/ema.js';
import { GradScaler } from '../optim/grad_scaler.js';
import { Lion } from '../optim/lion.js';
import type { Optimizer } from '../optim/optimizer.js';
import { Prodigy } from '../optim/prodigy.js';
import { optimNotices, type ResolvedOptimOptions } from './optim_options.js';
import type { Tensor } from '../tensor.js';
import type { ResolvedTrainOptions } from './options.js';
import { Accumulator } from './step.js';

export interface Optimization {
  optimizer: Optimizer;
  /** The EMA of the LoRA weights (--use_ema), else null. */
  ema: EMAModel | null;
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
  'adamBeta2' | 'adamWeightDecay' | 'adamEpsilon' | 'maxGradNorm' | 'lrScheduler' | 'lrWarmupSteps' | 'mixedPrecision'> & ResolvedOptimOptions & { lrNumCycles?: number; lrPower?: number };

/**
 * The optimizer --optimizer names, with the Adam flags as diffusers maps them: Prodigy takes the betas, epsilon and
 * weight decay (and the --prodigy_* flags, published defaults when unset), Lion the betas and weight decay.
 */
export function makeOptimizer(o: Omit<OptimizationOptions, 'learningRate'>, params: Tensor[], lr: number): Optimizer {
  const betas: [number, number] = [o.adamBeta1, o.adamBeta2];
  switch (o.optimizer) {
    case 'adamw': return new AdamW(params, { lr, betas, weightDecay: o.adamWeightDecay, eps: o.adamEpsilon });
    case 'prodigy': return new Prodigy(params, {
      lr, betas, beta3: o.prodigyBeta3, eps: o.adamEpsilon, weightDecay: o.adamWeightDecay, decouple: o.prodigyDecouple ?? true,
      useBiasCorrection: o.prodigyUseBiasCorrection ?? false, safeguardWarmup: o.prodigySafeguardWarmup ?? false,
    });
    case 'lion': return new Lion(params, { lr, betas, weightDecay: o.adamWeightDecay });
    default: throw new RangeError(`unknown optimizer ${JSON.stringify(o.optimizer)}; choose adamw, prodigy or lion`);
  }
}

/**
 * The optimizer, loss scaler and accumulator of `params` for a run of `totalSteps` optimizer steps. The caller disposes
 * the optimizer. `numProcesses` (data-parallel processes) enters as in the script under accelerate: --scale_lr
 * multiplies by it, and the schedule's warm-up and total steps are N× with N schedule steps per optimizer step.
 */
export function makeOptimization(o: OptimizationOptions, params: Tensor[], totalSteps: number, numProcesses = 1, onNotice?: (message: string) => void): Optimization {
  const accumulation = o.gradientAccumulationSteps;
  const baseLr = o.learningRate * (o.scaleLr ? accumulation * o.trainBatchSize * numProcesses : 1);
  for (const n of optimNotices(o)) onNotice?.(n);
  const optimizer = makeOptimizer(o, params, baseLr);
  let ema: EMAModel | null = null;
  try {
    ema = o.useEma ? new EMAModel(params, { decay: o.emaDecay }) : null;
    const scaler = o.mixedPrecision === 'fp16' ? new GradScaler() : null;
    const accumulator = new Accumulator({
      optimizer, params, scaler, ema, maxGradNorm: o.maxGradNorm, accumulationSteps: accumulation,
      lrScheduler: o.lrScheduler,
      lrOptions: { baseLr, warmupSteps: o.lrWarmupSteps * numProcesses, totalSteps: totalSteps * numProcesses, numCycles: o.lrNumCycles, power: o.lrPower },
      lrStepsPerStep: numProcesses,
    });
    return { optimizer, ema, scaler, accumulator, baseLr };
  } catch (e) {
    ema?.dispose();
    optimizer.dispose();
    throw e;
  }
}

/** An optimizer step that failed (e.g. a step size lr / (1 − β1^t) beyond float32), with the settings that produced it. */
export function optimizerStepError(e: unknown, step: number, o: OptimizationOptions, baseLr: number): Error {
  return new Error(`the optimizer step ${step} failed with --optimizer ${o.optimizer}, learning rate ${baseLr}${o.scaleLr ? ' (--learning_rate scaled by --scale_lr)' : ''} --adam_beta1=${o.adamBeta1} ` +
    `--adam_beta2=${o.adamBeta2} --adam_weight_decay=${o.adamWeightDecay}: ${(e as Error).message}`);
}
