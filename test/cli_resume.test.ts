// `difflora train` killed with SIGKILL right after a checkpoint appears, then resumed with
// `--resume_from_checkpoint latest` (twice): the final pytorch_lora_weights.safetensors is byte-identical to
// an uninterrupted run's, only the --checkpoints_total_limit newest checkpoints remain (no temporary
// folders left by the kills), metrics.jsonl has each step once, and the file's keys are the diffusers
// golden's (goldens/lora-diffusers.json). The CLI runs as a real child process on the tiny pipeline.
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readSafetensorsHeader } from '../lib/io/safetensors.js';
import { checkpointNames, makeImageFolder, runCli, spawnCli, tinySd, type CliResult } from './cli_helpers.js';
import { fixtures } from './helpers.js';

let tmp: string;
let data: string;
beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-resume-'));
  data = join(tmp, 'data');
  await makeImageFolder(data, 6);
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const MAX_STEPS = 12;
// 6 images, batch 1, accumulation 2: 3 optimizer steps per epoch, so the run crosses 4 epoch boundaries;
// random crop and flip, so the data order and every per-item draw must be restored exactly.
const args = (out: string, ...more: string[]) => ['train', `--pretrained_model_name_or_path=${tinySd}`, `--train_data_dir=${data}`,
  '--resolution=32', '--random_flip', '--train_batch_size=1', '--gradient_accumulation_steps=2', '--checkpointing_steps=3',
  '--checkpoints_total_limit=2', `--max_train_steps=${MAX_STEPS}`, '--learning_rate=1e-3', '--lr_scheduler=cosine', '--lr_warmup_steps=2',
  '--seed=4242', `--output_dir=${out}`, ...more];

/**
 * Runs the CLI and SIGKILLs it as soon as a checkpoint-N folder newer than `after` is in the output dir
 * (checkpoints are renamed into place whole, so its appearance means it is complete).
 */
async function killAfterCheckpoint(argv: string[], out: string, after: number): Promise<{ result: CliResult; killedAt: number }> {
  const { child, done } = spawnCli(argv);
  let killedAt = -1;
  const timer = setInterval(() => {
    if (!existsSync(out)) return;
    const steps = readdirSync(out).map((n) => /^checkpoint-(\d+)$/.exec(n)).filter((m) => m !== null).map((m) => Number(m[1]));
    const fresh = steps.filter((s) => s > after);
    if (fresh.length > 0 && killedAt < 0) {
      killedAt = Math.max(...fresh);
      child.kill('SIGKILL');
    }
  }, 2);
  try {
    return { result: await done, killedAt };
  } finally {
    clearInterval(timer);
  }
}

const stepsOf = (stderr: string): number[] => [...stderr.matchAll(/^step (\d+)\//gm)].map((m) => Number(m[1]));

describe('difflora train: SIGKILL and resume', () => {
  it('ends bit-identical to an uninterrupted run, with only the newest checkpoints kept', async () => {
    const straight = join(tmp, 'straight');
    const ref = await runCli(args(straight));
    expect(ref.code, ref.stderr).toBe(0);
    expect(stepsOf(ref.stderr)).toEqual(Array.from({ length: MAX_STEPS }, (_, i) => i + 1));

    const out = join(tmp, 'killed');
    // first kill: right after the first checkpoint (step 3) appears
    const first = await killAfterCheckpoint(args(out), out, 0);
    expect(first.result.signal, first.result.stderr).toBe('SIGKILL');
    expect(first.killedAt).toBeGreaterThanOrEqual(3);
    expect(first.killedAt).toBeLessThan(MAX_STEPS);
    expect(existsSync(join(out, 'pytorch_lora_weights.safetensors'))).toBe(false);

    // resumed, and killed again after its next checkpoint
    const second = await killAfterCheckpoint(args(out, '--resume_from_checkpoint', 'latest'), out, first.killedAt);
    expect(second.result.signal, second.result.stderr).toBe('SIGKILL');
    const latest = Math.max(...readdirSync(out).map((n) => /^checkpoint-(\d+)$/.exec(n)).filter((m) => m !== null).map((m) => Number(m[1])));
    expect(stepsOf(second.result.stderr)[0]).toBe(first.killedAt + 1);
    expect(existsSync(join(out, 'pytorch_lora_weights.safetensors'))).toBe(false);

    // resumed to the end
    const last = await runCli(args(out, '--resume_from_checkpoint', 'latest'));
    expect(last.code, last.stderr).toBe(0);
    expect(stepsOf(last.stderr)[0]).toBe(latest + 1);
    expect(stepsOf(last.stderr).at(-1)).toBe(MAX_STEPS);

    // the result: byte for byte the uninterrupted run's file
    const a = readFileSync(join(straight, 'pytorch_lora_weights.safetensors'));
    const b = readFileSync(join(out, 'pytorch_lora_weights.safetensors'));
    expect(b.equals(a)).toBe(true);
    // only the 2 newest checkpoints, no temporary folder left by the kills; the same as the straight run's
    expect(checkpointNames(out)).toEqual(['checkpoint-9', 'checkpoint-12']);
    expect(checkpointNames(straight)).toEqual(['checkpoint-9', 'checkpoint-12']);
    for (const c of ['checkpoint-9', 'checkpoint-12']) {
      for (const f of readdirSync(join(straight, c))) {
        expect(readFileSync(join(out, c, f)).equals(readFileSync(join(straight, c, f))), `${c}/${f}`).toBe(true);
      }
    }
    expect(readdirSync(out).filter((n) => n.includes('.tmp-'))).toEqual([]);
    // metrics.jsonl spans the three processes with each step once (the steps a killed run logged after its
    // last checkpoint are dropped on resume and logged again)
    const metrics = readFileSync(join(out, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { step: number; loss: number });
    expect(metrics.map((m) => m.step)).toEqual(Array.from({ length: MAX_STEPS }, (_, i) => i + 1));
    const refMetrics = readFileSync(join(straight, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { loss: number });
    expect(metrics.map((m) => m.loss)).toEqual(refMetrics.map((m) => m.loss));

    // the keys are diffusers' (save_lora_weights on the same UNet), in its file order
    const golden = JSON.parse(readFileSync(join(fixtures, 'goldens', 'lora-diffusers.json'), 'utf8')) as { keys_in_file_order: string[] };
    const header = readSafetensorsHeader(join(out, 'pytorch_lora_weights.safetensors'));
    expect(header.tensors.map((t) => t.name)).toEqual(golden.keys_in_file_order);
    expect(header.metadata).toEqual({ format: 'pt' });
  }, 120_000);
});
