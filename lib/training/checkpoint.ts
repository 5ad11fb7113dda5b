// Training checkpoints: `output_dir/checkpoint-N/` holds everything needed to continue exactly — the LoRA
// weights, optimizer moments and master weights, loss-scaler state, the step counters, the data position and
// every random generator's state. A checkpoint is written to a temporary folder and renamed into place, so
// it is never half-written; older ones are pruned to --checkpoints_total_limit after a new one is saved.
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { loadSafetensors, saveSafetensors } from '../io/safetensors.js';
import type { Tensor } from '../tensor.js';
import { dispose } from '../scope.js';

export interface CheckpointContents {
  /** Tensors by name (LoRA parameters, optimizer state, generator states). */
  tensors: Map<string, Tensor>;
  /** Plain JSON state (counters, scaler, data position, optimizer meta). */
  state: Record<string, unknown>;
}

const TENSORS = 'training_state.safetensors';
const STATE = 'training_state.json';

export function checkpointDirs(outputDir: string): { step: number; path: string }[] {
  if (!existsSync(outputDir)) return [];
  return readdirSync(outputDir)
    .map((name) => /^checkpoint-(\d+)$/.exec(name))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => ({ step: Number(m[1]), path: join(outputDir, m[0]) }))
    .sort((a, b) => a.step - b.step);
}

/**
 * Removes the oldest checkpoints so that at most `limit` remain. Called after a new checkpoint is saved (not
 * before, as the Python script does): if the save fails, e.g. on a full disk, the older ones are still there.
 * Also removes temporary folders (`checkpoint-N.tmp-<pid>`) left by a process that was killed while saving.
 */
export function pruneCheckpoints(outputDir: string, limit: number | null | undefined): string[] {
  if (!existsSync(outputDir)) return [];
  const stale = readdirSync(outputDir).filter((n) => /^checkpoint-\d+\.tmp-\d+$/.test(n) && !n.endsWith(`.tmp-${process.pid}`));
  for (const n of stale) rmSync(join(outputDir, n), { recursive: true, force: true });
  if (!limit || limit < 1) return [];
  const all = checkpointDirs(outputDir);
  const remove = all.slice(0, Math.max(0, all.length - limit));
  for (const c of remove) rmSync(c.path, { recursive: true, force: true });
  return remove.map((c) => c.path);
}

/**
 * Creates `dir` and checks that a file can be written in it (read-only mount, full disk, a file in the way),
 * so that a run fails at once with a clear message instead of after loading the models or at its first save.
 */
export function ensureWritableDir(dir: string, flag = '--output_dir'): void {
  const probe = join(dir, `.difflora-write-test-${process.pid}`);
  try {
    // one level at a time: a recursive mkdir reports ENOENT, not EROFS, under a read-only mount
    const missing: string[] = [];
    for (let d = resolve(dir); !existsSync(d) && dirname(d) !== d; d = dirname(d)) missing.unshift(d);
    for (const d of missing) mkdirSync(d);
    writeFileSync(probe, Buffer.alloc(4096));
  } catch (e) {
    try { rmSync(probe, { force: true }); } catch { /* the folder itself is the problem */ }
    throw new Error(`${flag} '${dir}' is not writable: ${(e as Error).message}`);
  }
  rmSync(probe, { force: true });
}

export function saveCheckpoint(outputDir: string, step: number, c: CheckpointContents, extraFiles: (dir: string) => void = () => {}): string {
  mkdirSync(outputDir, { recursive: true });
  const final = join(outputDir, `checkpoint-${step}`);
  const tmp = `${final}.tmp-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp);
  try {
    saveSafetensors(join(tmp, TENSORS), c.tensors);
    writeFileSync(join(tmp, STATE), JSON.stringify(c.state, null, 1));
    extraFiles(tmp);
    rmSync(final, { recursive: true, force: true });
    renameSync(tmp, final);
  } catch (e) {
    rmSync(tmp, { recursive: true, force: true });
    throw new Error(`cannot save checkpoint ${final}: ${(e as Error).message}`);
  }
  return final;
}

/** `path` or 'latest' (the highest checkpoint-N in outputDir). The caller owns the returned tensors. */
export function loadCheckpoint(outputDir: string, which: string): { path: string; contents: CheckpointContents } {
  let path = which;
  if (which === 'latest') {
    const last = checkpointDirs(outputDir).pop();
    if (!last) throw new Error(`--resume_from_checkpoint latest: no checkpoint-N folder in '${outputDir}'`);
    path = last.path;
  }
  if (!existsSync(join(path, STATE)) || !existsSync(join(path, TENSORS))) {
    throw new Error(`--resume_from_checkpoint: '${path}' is not a difflora checkpoint (expected ${STATE} and ${TENSORS})`);
  }
  const state = JSON.parse(readFileSync(join(path, STATE), 'utf8')) as Record<string, unknown>;
  const { tensors } = loadSafetensors(join(path, TENSORS));
  return { path, contents: { tensors, state } };
}

export function disposeCheckpoint(c: CheckpointContents): void {
  dispose([...c.tensors.values()]);
}
