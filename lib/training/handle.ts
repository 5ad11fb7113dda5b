// A training run as a handle: start it, listen to its progress, abort it, await its result with the run's
// metrics. A thin layer over trainTextToImageLora for UIs and notebooks that prefer events to callbacks.
//
//   const run = startTraining({ pretrainedModelNameOrPath, trainDataDir, maxTrainSteps: 100 });
//   run.on('progress', (p) => console.log(p.step, p.loss));
//   setTimeout(() => run.abort(), 60_000);
//   const { outputFile, metrics } = await run.result;
import { EventEmitter } from 'node:events';
import { trainTextToImageLora, type TrainOptions, type TrainProgress, type TrainResult } from './train.js';

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

export interface TrainingRun {
  /** Resolves with the run's result and metrics; rejects with an AbortError after abort(), or with the failure. */
  readonly result: Promise<TrainResult & { metrics: TrainMetrics }>;
  /** Stops the run between two steps; nothing after the last checkpoint is saved. */
  abort(reason?: string): void;
  readonly signal: AbortSignal;
  on(event: 'progress', listener: (p: TrainProgress) => void): this;
  off(event: 'progress', listener: (p: TrainProgress) => void): this;
}

class Run extends EventEmitter implements TrainingRun {
  readonly result: Promise<TrainResult & { metrics: TrainMetrics }>;
  private readonly controller = new AbortController();

  constructor(options: TrainOptions, outer?: AbortSignal) {
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
        const r = await trainTextToImageLora(options, {
          signal: this.controller.signal,
          onProgress: (p) => { losses.push(p.loss); this.emit('progress', p); },
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

  abort(reason = 'abort()'): void { this.controller.abort(reason); }
}

/** Starts trainTextToImageLora in the background and returns its handle (`signal`: an outer AbortSignal). */
export function startTraining(options: TrainOptions, o: { signal?: AbortSignal } = {}): TrainingRun {
  return new Run(options, o.signal);
}
