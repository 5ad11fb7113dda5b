// What `difflora train` prints while it runs: one line per optimizer step (step, the logged loss, lr, grad
// norm, it/s, ETA) and a line when a validation run starts and ends. The ETA counts the validation still
// to come: the guide's command on a tiny model spent most of its time generating validation images while
// an ETA of training steps alone said seconds.
import type { TrainProgress } from '../training/train.js';
import type { ValidationEvent } from '../training/validation.js';

export function formatSeconds(s: number): string {
  const t = Math.round(s);
  const h = Math.floor(t / 3600);
  const m = Math.floor((t % 3600) / 60);
  const sec = t % 60;
  return h ? `${h}h${String(m).padStart(2, '0')}m` : `${m}m${String(sec).padStart(2, '0')}s`;
}

/**
 * Seconds left: the steps left at the training rate (validation time left out of it), plus the validation
 * runs left at the last one's duration. Null validation seconds: none has run yet, so its cost is unknown.
 */
export function estimateSecondsLeft(o: { stepsLeft: number; stepsPerSecond: number; validationsLeft: number; validationSeconds: number | null }): number {
  const training = o.stepsPerSecond > 0 ? o.stepsLeft / o.stepsPerSecond : 0;
  return training + (o.validationSeconds === null ? 0 : o.validationsLeft * o.validationSeconds);
}

/** The progress and validation lines of one run, written to `write` (rewritten in place on a terminal). */
export class ProgressPrinter {
  private readonly started: number;
  private firstStep = -1;
  private validationStarted = 0;
  /** Seconds spent in validation so far (not training: left out of the rate). */
  private validationTotal = 0;
  private lastValidation: number | null = null;

  constructor(private readonly write: (s: string) => void, private readonly tty: boolean, private readonly now: () => number = Date.now) {
    this.started = now();
  }

  progress(p: Pick<TrainProgress, 'step' | 'maxTrainSteps' | 'epoch' | 'loss' | 'lr' | 'gradNorm' | 'validationsLeft'>): void {
    // the rate counts from the start of the run (model loading included), validation time left out
    if (this.firstStep < 0) this.firstStep = p.step - 1;
    const seconds = Math.max((this.now() - this.started) / 1000 - this.validationTotal, 1e-9);
    const rate = (p.step - this.firstStep) / seconds;
    const eta = estimateSecondsLeft({ stepsLeft: p.maxTrainSteps - p.step, stepsPerSecond: rate, validationsLeft: p.validationsLeft, validationSeconds: this.lastValidation });
    const unmeasured = this.lastValidation === null && p.validationsLeft > 0 ? ` + ${p.validationsLeft} validation run(s)` : '';
    const line = `step ${p.step}/${p.maxTrainSteps} epoch ${p.epoch} loss ${p.loss.toFixed(4)} lr ${p.lr.toExponential(3)}` +
      `${p.gradNorm === null ? '' : ` grad_norm ${p.gradNorm.toExponential(3)}`} ${rate.toFixed(2)} it/s eta ${formatSeconds(eta)}${unmeasured}`;
    this.write(this.tty ? `\r${line}\x1b[K${p.step === p.maxTrainSteps ? '\n' : ''}` : `${line}\n`);
  }

  validation(e: ValidationEvent): void {
    const what = e.phase === 'test' ? 'final validation (the saved LoRA)' : 'validation';
    if (e.event === 'start') {
      this.validationStarted = this.now();
      this.line(`${what}: generating ${e.numImages} image(s) for '${e.prompt}' (epoch ${e.epoch})…`);
      return;
    }
    const seconds = (this.now() - this.validationStarted) / 1000;
    this.validationTotal += seconds;
    this.lastValidation = e.seconds;
    this.line(`${what}: ${e.images.length} image(s) in ${e.seconds.toFixed(1)} s → ${e.dir}`);
  }

  notice(message: string): void {
    this.line(`difflora train: note: ${message}`);
  }

  private line(s: string): void {
    this.write(`${this.tty ? '\r\x1b[K' : ''}${s}\n`);
  }
}
