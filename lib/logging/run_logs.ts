// A training run's logs: one line per optimizer step to metrics.jsonl, and train_loss and lr to TensorBoard
// (--report_to=tensorboard) under --logging_dir. The event file is created with the first value logged, so a
// run failing before its first step writes none; a write that fails (a full disk) names its file.
import { join } from 'node:path';
import { MetricsLog, type MetricsLine } from './metrics.js';
import { TensorBoardWriter } from './tensorboard.js';

export class RunLogs {
  readonly metrics: MetricsLog;
  private writer: TensorBoardWriter | null = null;

  /**
   * `notice` hears what was done to an earlier metrics file; `context` is appended to a write failure
   * (where the run can be resumed from). A metrics file that is not a regular file is refused here.
   */
  constructor(
    private readonly outputDir: string,
    private readonly o: { reportTo: string; loggingDir: string },
    notice: ((message: string) => void) | undefined,
    private readonly context: () => string,
  ) {
    this.metrics = new MetricsLog(join(outputDir, 'metrics.jsonl'), notice);
  }

  /** The TensorBoard writer (created on first use), or null without --report_to=tensorboard. */
  tensorboard(): TensorBoardWriter | null {
    return this.o.reportTo === 'tensorboard' ? (this.writer ??= new TensorBoardWriter(join(this.outputDir, this.o.loggingDir))) : null;
  }

  /** One optimizer step: train_loss to TensorBoard, the line to metrics.jsonl, lr to TensorBoard. */
  step(line: MetricsLine): void {
    this.logged(() => this.tensorboard()?.path, () => this.tensorboard()?.addScalar('train_loss', line.loss, line.step));
    this.logged(() => this.metrics.file, () => this.metrics.append(line));
    this.logged(() => this.tensorboard()?.path, () => this.tensorboard()?.addScalar('lr', line.lr, line.step));
  }

  close(): void {
    this.writer?.close();
  }

  private logged(file: () => string | undefined, write: () => void): void {
    try { write(); } catch (e) { throw new Error(`cannot write ${file() ?? 'the logs'}: ${(e as Error).message}${this.context()}`); }
  }
}
