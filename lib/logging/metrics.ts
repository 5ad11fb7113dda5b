// metrics.jsonl: one JSON line per optimizer step in --output_dir (step, epoch, loss, lr, grad norm), easy
// to plot or grep. It holds one run's steps, each once:
// - a fresh run into a folder that has one from an earlier run moves it aside (metrics.jsonl.<time>.bak) and
//   starts a new file, instead of appending steps 1, 2, … after the old run's;
// - a resumed run drops the lines of steps after its checkpoint (a killed run logged them; they are redone)
//   and appends.
// Both happen at the first line written, so a run that fails before its first step changes nothing.
// The file must be a regular file (or a link to one, or to a character device such as /dev/null): a FIFO
// would block the run and a directory cannot be written.
import { appendFileSync, existsSync, lstatSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { fileKind, readTextFile } from '../io/files.js';
import type { LossPoint } from './loss_plot.js';

export interface MetricsLine { step: number; epoch: number; loss: number; lr: number; grad_norm: number | null; skipped: boolean; time: number }

export class MetricsLog {
  private prepared = false;
  private resumedAt: number | null = null;

  /** `notice` hears what was done to an earlier file (the CLI prints it). Checks the file's kind at once. */
  constructor(readonly file: string, private readonly notice: (message: string) => void = () => {}) {
    const kind = this.kind();
    if (kind !== 'missing' && kind !== 'file' && kind !== 'device') {
      throw new Error(`metrics file '${file}' is ${kind}, not a regular file; move it away or choose another --output_dir`);
    }
  }

  /** Marks the run as resumed from the checkpoint of `step`: lines after it are dropped, the rest kept. */
  resumedFrom(step: number): void {
    this.resumedAt = step;
  }

  /** Appends one step's line (preparing the file first, once). */
  append(line: MetricsLine): void {
    if (!this.prepared) this.prepare();
    this.prepared = true;
    appendFileSync(this.file, `${JSON.stringify(line)}\n`);
  }

  /** The loss curve (a line cut short by a crash is left out). */
  read(): LossPoint[] {
    if (this.kind() !== 'file') return [];
    return parseLines(readTextFile(this.file, 'metrics file'));
  }

  /** 'missing', 'file' (regular, or a link to one), 'device' (a character device, or a link to one), or what else it is. */
  private kind(): string {
    if (!existsSync(this.file)) {
      try { lstatSync(this.file); } catch { return 'missing'; }
      return 'a broken symbolic link';
    }
    const st = statSync(this.file);
    return st.isFile() ? 'file' : st.isCharacterDevice() ? 'device' : fileKind(st);
  }

  private prepare(): void {
    if (this.kind() !== 'file') return; // nothing there yet, or a device written through as it is
    if (this.resumedAt === null) {
      const aside = `${this.file}.${new Date().toISOString().replace(/[:.]/g, '-')}.bak`;
      renameSync(this.file, aside);
      this.notice(`${this.file} held an earlier run's steps: moved to ${aside}; this run starts a new one`);
      return;
    }
    const all = parseLines(readTextFile(this.file, 'metrics file'));
    const kept = all.filter((m) => m.step <= (this.resumedAt ?? 0));
    if (kept.length === all.length) return;
    const tmp = `${this.file}.tmp-${process.pid}`;
    writeFileSync(tmp, kept.map((m) => `${JSON.stringify(m)}\n`).join(''));
    renameSync(tmp, this.file);
    this.notice(`${this.file}: dropped ${all.length - kept.length} line(s) of steps after the resumed checkpoint's step ${this.resumedAt} (they are redone)`);
  }
}

function parseLines(text: string): LossPoint[] {
  return text.split('\n').filter(Boolean).flatMap((l) => {
    try {
      const m = JSON.parse(l) as unknown;
      return m !== null && typeof m === 'object' && typeof (m as LossPoint).step === 'number' ? [m as LossPoint] : [];
    } catch {
      return [];
    }
  });
}
