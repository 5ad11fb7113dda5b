// trainTextToImageLora: the library's entry to training. It starts the loop (train.ts's runTraining) and
// returns a handle: listen to its progress, abort it, await it (it is a promise of the result and the run's
// metrics). The CLI runs the same loop.
//
//   const run = trainTextToImageLora({ pretrainedModelNameOrPath, trainDataDir, maxTrainSteps: 100 });
//   run.on('progress', (p) => console.log(p.step, p.loss));
//   setTimeout(() => run.abort(), 60_000);
//   const { outputFile, metrics } = await run;
import { EventEmitter } from 'node:events';
import type { ProcessGroupOption } from '../distributed/data_parallel.js';
import { validateDreamBoothOptions, type DreamBoothOptions } from './dreambooth_options.js';
import { validateTrainOptions } from './options.js';
import { runTraining, type TrainOptions, type TrainProgress, type TrainResult } from './train.js';
import { runDreamBoothTraining, type ClassImagesProgress, type DreamBoothHooksInternal } from './train_dreambooth.js';
import { validateSdxlTrainOptions, type SdxlTrainOptions } from './sdxl_options.js';
import { runSdxlTraining } from './train_sdxl.js';
import type { ValidationEvent } from './validation.js';

export interface TrainMetrics {
  /** Optimizer steps done in this run (a resumed run counts from where it resumed). */
  steps: number;
  seconds: number;
  stepsPerSecond: number;
  /** Loss of every optimizer step of this run, in order. */
  losses: number[];
  /** Mean loss over the last 10 % of the steps (at least one). */
  finalLoss: number;
}

export type TrainOutcome = TrainResult & { metrics: TrainMetrics };

/** A running training: awaitable (the result), abortable, and an emitter of 'progress' events. */
export interface TrainingRun extends PromiseLike<TrainOutcome> {
  /** Resolves with the run's result and metrics; rejects with an AbortError after abort(), or with the failure. */
  readonly result: Promise<TrainOutcome>;
  /** Stops the run between two steps; nothing after the last checkpoint is saved. */
  abort(reason?: string): void;
  readonly signal: AbortSignal;
  on(event: 'progress', listener: (p: TrainProgress) => void): this;
  on(event: 'validation', listener: (e: ValidationEvent) => void): this;
  /** DreamBooth with prior preservation: after each batch of generated class images. */
  on(event: 'classImages', listener: (p: ClassImagesProgress) => void): this;
  off(event: 'progress', listener: (p: TrainProgress) => void): this;
  off(event: 'validation', listener: (e: ValidationEvent) => void): this;
  off(event: 'classImages', listener: (p: ClassImagesProgress) => void): this;
}

export interface TrainHooks {
  /** Aborts the run between two steps, as abort(). */
  signal?: AbortSignal;
  /** Called after every optimizer step (the same as a 'progress' listener). */
  onProgress?: (p: TrainProgress) => void;
  /** Called when a validation run starts and ends (the same as a 'validation' listener). */
  onValidation?: (e: ValidationEvent) => void;
  /** Called with what the run did to files already there (an earlier metrics.jsonl moved aside), and the script's warnings. */
  onNotice?: (message: string) => void;
  /** DreamBooth: called after each batch of generated class images (the same as a 'classImages' listener). */
  onClassImages?: (p: ClassImagesProgress) => void;
  /**
   * Data-parallel training (README "Several GPUs or machines"): by default the run joins the process group that a
   * launcher (difflora launch, torchrun, srun) describes in the environment, and trains alone without one; give a
   * ProcessGroup to train in it (you keep it and destroy it), or null to train alone whatever the environment says.
   * Every process calls trainTextToImageLora with the same options; rank 0 alone logs, validates and writes files.
   * trainDreamBoothLora trains in one process only: it refuses a group (or a launcher's environment) of several.
   */
  processGroup?: ProcessGroupOption;
}

class Run extends EventEmitter implements TrainingRun {
  readonly result: Promise<TrainOutcome>;
  private readonly controller = new AbortController();

  constructor(start: (hooks: DreamBoothHooksInternal) => Promise<TrainResult>, outer?: AbortSignal, private readonly onNotice?: (message: string) => void, processGroup?: ProcessGroupOption) {
    super();
    if (outer) {
      if (outer.aborted) this.controller.abort(outer.reason);
      else outer.addEventListener('abort', () => this.controller.abort(outer.reason), { once: true });
    }
    const losses: number[] = [];
    const started = Date.now();
    const run = async () => {
      // started on the next turn, so listeners attached right after startTraining() see every event
      await new Promise<void>((resolve) => setImmediate(resolve));
      try {
        const r = await start({
          signal: this.controller.signal,
          onProgress: (p) => { losses.push(p.loss); this.emit('progress', p); },
          onValidation: (e) => { this.emit('validation', e); },
          onClassImages: (p) => { this.emit('classImages', p); },
          onNotice: (m) => this.onNotice?.(m),
          processGroup,
        });
        const seconds = (Date.now() - started) / 1000;
        const tail = losses.slice(-Math.max(1, Math.ceil(losses.length / 10)));
        const finalLoss = tail.reduce((a, b) => a + b, 0) / (tail.length || 1);
        return { ...r, metrics: { steps: losses.length, seconds, stepsPerSecond: losses.length / Math.max(seconds, 1e-9), losses, finalLoss } };
      } catch (e) {
        if (this.controller.signal.aborted) throw new DOMException(`training aborted${losses.length ? ` after step ${losses.length}` : ''}: ${String(this.controller.signal.reason ?? 'abort()')}`, 'AbortError');
        throw e;
      }
    };
    this.result = run();
  }

  get signal(): AbortSignal { return this.controller.signal; }

  then<A = TrainOutcome, B = never>(onFulfilled?: ((r: TrainOutcome) => A | PromiseLike<A>) | null, onRejected?: ((e: unknown) => B | PromiseLike<B>) | null): Promise<A | B> {
    return this.result.then(onFulfilled, onRejected);
  }

  abort(reason = 'abort()'): void { this.controller.abort(reason); }
}

/**
 * Trains a LoRA as diffusers' train_text_to_image_lora.py (options = its flags in camelCase). Returns at once
 * with the run's handle; `await` it for the result and metrics. Options outside their domains throw a
 * TrainOptionsError at once.
 */
export function trainTextToImageLora(options: TrainOptions, hooks: TrainHooks = {}): TrainingRun {
  validateTrainOptions(options); // a mistake in the options throws here, at the call, naming every problem
  return started(new Run((h) => runTraining(options, h), hooks.signal, hooks.onNotice, hooks.processGroup), hooks);
}

function started(run: Run, hooks: TrainHooks): TrainingRun {
  if (hooks.onProgress) run.on('progress', hooks.onProgress);
  if (hooks.onValidation) run.on('validation', hooks.onValidation);
  if (hooks.onClassImages) run.on('classImages', hooks.onClassImages);
  return run;
}

/**
 * Trains a DreamBooth LoRA as diffusers' train_dreambooth_lora.py (options = its flags in camelCase), with the
 * same handle as trainTextToImageLora (and 'classImages' events while class images are generated). Options
 * outside their domains, or against the script's rules, throw a TrainOptionsError at once.
 */
export function trainDreamBoothLora(options: DreamBoothOptions, hooks: TrainHooks = {}): TrainingRun {
  validateDreamBoothOptions(options);
  return started(new Run((h) => runDreamBoothTraining(options, h), hooks.signal, hooks.onNotice, hooks.processGroup), hooks);
}

/**
 * Trains an SDXL LoRA as diffusers' train_text_to_image_lora_sdxl.py (options = its flags in camelCase), with the
 * same handle as trainTextToImageLora. Options outside their domains throw a TrainOptionsError at once.
 */
export function trainTextToImageLoraSdxl(options: SdxlTrainOptions, hooks: TrainHooks = {}): TrainingRun {
  validateSdxlTrainOptions(options);
  return started(new Run((h) => runSdxlTraining(options, h), hooks.signal, hooks.onNotice), hooks);
}

/** The same as trainTextToImageLora (a name for code that reads better as "start, then await"). */
export const startTraining = trainTextToImageLora;
