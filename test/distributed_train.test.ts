// Data-parallel training (lib/distributed/data_parallel.ts) through `difflora launch … train` on the tiny pipeline:
// 2 Gloo processes × batch 1 end with the LoRA of 1 process × batch 2 (‖Δ‖/‖W‖ ≤ 1e-5; same seed, random crop and flip on; every
// sample's draws keyed by its global position), with and without gradient accumulation; a worker SIGKILLed mid-run
// makes the launcher fail naming its rank, leaves no process and an intact checkpoint, and `--resume_from_checkpoint
// latest` ends bit-identical to an uninterrupted 2-process run; another number of processes cannot resume it.
import { spawn } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ImageCaptionLoader } from '../lib/data/loader.js';
import { loadImageFolder } from '../lib/data/imagefolder.js';
import { loadSafetensors } from '../lib/io/safetensors.js';
import { readTrainingState } from '../lib/training/checkpoint.js';
import { gradientBuckets } from '../lib/distributed/data_parallel.js';
import { ProcessGroup } from '../lib/distributed/process_group.js';
import { trainTextToImageLora } from '../lib/training/handle.js';
import * as torch from '../lib/torch.js';
import { tidy } from '../lib/scope.js';
import { SampleStreams } from '../lib/training/sample_rng.js';
import { sampleNoise, sampleTimesteps } from '../lib/training/step.js';
import { alive, freePort, repoRoot, runCli, spawnCli, tinySd, type CliResult } from './cli_helpers.js';

let tmp: string;
let data: string;
let odd: string;

/** n pictures with texture (a diagonal ramp plus stripes), so random crops and flips change the pixels. */
async function texturedFolder(dir: string, n: number): Promise<void> {
  mkdirSync(dir, { recursive: true });
  const lines: string[] = [];
  for (let i = 0; i < n; i++) {
    const width = 40 + 3 * i;
    const height = 36 + i;
    const raw = Buffer.alloc(width * height * 3);
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        const o = 3 * (y * width + x);
        raw[o] = (x * 6 + i * 40) % 256;
        raw[o + 1] = (y * 7 + (x % 5) * 20) % 256;
        raw[o + 2] = ((x + y) * 3 + i * 17) % 256;
      }
    }
    await sharp(raw, { raw: { width, height, channels: 3 } }).png().toFile(join(dir, `${i}.png`));
    lines.push(JSON.stringify({ file_name: `${i}.png`, text: `a striped picture number ${i}` }));
  }
  writeFileSync(join(dir, 'metadata.jsonl'), lines.join('\n'));
}

beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-dist-train-'));
  data = join(tmp, 'data');
  odd = join(tmp, 'odd');
  await texturedFolder(data, 4);
  await texturedFolder(odd, 5);
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const trainArgs = (out: string, ...more: string[]) => ['train', `--pretrained_model_name_or_path=${tinySd}`, `--train_data_dir=${data}`,
  '--resolution=32', '--random_flip', '--learning_rate=1e-3', '--seed=77', `--output_dir=${out}`, ...more];

async function launch(processes: number, args: string[], timeout = 20): Promise<CliResult> {
  return runCli(['launch', '--num_processes', String(processes), '--main_process_port', String(await freePort()), '--timeout', String(timeout), ...args]);
}

function lora(out: string): Map<string, Float64Array> {
  const { tensors } = loadSafetensors(join(out, 'pytorch_lora_weights.safetensors'));
  const values = new Map([...tensors].map(([k, t]) => [k, t.toFloat64Array()]));
  for (const t of tensors.values()) t.dispose();
  return values;
}

/**
 * The LoRA's relative error ‖a − b‖ / ‖b‖ over all its tensors together, and the largest element difference relative
 * to the largest element (AdamW turns float rounding in near-zero gradients into differences of up to lr per element,
 * so the elementwise figure is looser: batch 2 in one process and batch 1 in two round differently).
 */
function relativeError(a: Map<string, Float64Array>, b: Map<string, Float64Array>): { norm: number; elementwise: number } {
  expect([...a.keys()].sort()).toEqual([...b.keys()].sort());
  let diff2 = 0;
  let ref2 = 0;
  let diffMax = 0;
  let refMax = 0;
  for (const [k, bv] of b) {
    const av = a.get(k)!;
    for (let i = 0; i < bv.length; i++) {
      const d = Math.abs(av[i]! - bv[i]!);
      diff2 += d * d;
      ref2 += bv[i]! * bv[i]!;
      diffMax = Math.max(diffMax, d);
      refMax = Math.max(refMax, Math.abs(bv[i]!));
    }
  }
  return { norm: Math.sqrt(diff2 / ref2), elementwise: diffMax / refMax };
}

function expectSameLora(two: string, single: string, what: string): void {
  const err = relativeError(lora(two), lora(single));
  console.log(`${what}: LoRA relative error ${err.norm.toExponential(2)} (‖Δ‖/‖W‖), largest element difference ${err.elementwise.toExponential(2)} of the largest weight`);
  expect(err.norm).toBeLessThanOrEqual(1e-5);
  expect(err.elementwise).toBeLessThanOrEqual(1e-4);
}

const losses = (out: string): number[] => readFileSync(join(out, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => (JSON.parse(l) as { loss: number }).loss);
const steps = (out: string): number[] => readFileSync(join(out, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => (JSON.parse(l) as { step: number }).step);

function expectSameCurve(a: number[], b: number[]): void {
  expect(a.length).toBe(b.length);
  a.forEach((x, i) => expect(Math.abs(x - b[i]!) / Math.abs(b[i]!), `loss of step ${i + 1}: ${x} vs ${b[i]}`).toBeLessThanOrEqual(1e-5));
}

describe('data-parallel training: the parts', () => {
  it('shards each epoch as accelerate (batches r, r + N, …; the tail padded from the epoch\'s start), keys global', async () => {
    const dataset = loadImageFolder(odd);
    const keysOf = async (rank: number, worldSize: number, batchSize: number) => {
      const loader = new ImageCaptionLoader(dataset, { batchSize, resolution: 8, seed: 3, shard: worldSize > 1 ? { rank, worldSize } : undefined });
      const batches: { keys: [number, number][]; files: string[] }[] = [];
      for (let b = 0; b < loader.batchesPerEpoch; b++) {
        const x = await loader.next();
        batches.push({ keys: x.keys, files: x.imagePaths });
      }
      expect(loader.getState()).toEqual({ epoch: 1, position: 0, seed: 3 });
      return { batches, epochLength: loader.epochLength };
    };
    const one = await keysOf(0, 1, 2);
    expect(one.batches.map((b) => b.keys.map(([, p]) => p))).toEqual([[0, 1], [2, 3], [4]]);
    const order = one.batches.flatMap((b) => b.files);
    // 5 items, 2 processes × batch 2: ceil(ceil(5/2)/2) = 2 batches each; positions 5, 6, 7 are the order's items 0, 1, 2
    const r0 = await keysOf(0, 2, 2);
    const r1 = await keysOf(1, 2, 2);
    expect(r0.epochLength).toBe(4);
    expect(r0.batches.map((b) => b.keys.map(([, p]) => p))).toEqual([[0, 1], [4, 5]]);
    expect(r1.batches.map((b) => b.keys.map(([, p]) => p))).toEqual([[2, 3], [6, 7]]);
    expect(r0.batches.flatMap((b) => b.files)).toEqual([order[0], order[1], order[4], order[0]]);
    expect(r1.batches.flatMap((b) => b.files)).toEqual([order[2], order[3], order[1], order[2]]);
  });

  it('a sample\'s noise and timestep depend on its key alone, not on the batch it is drawn in', () => {
    const streams = new SampleStreams(77);
    const draw = (keys: [number, number][]) => tidy(() => {
      const latents = torch.zeros([keys.length, 4, 2, 2]);
      const noise = sampleNoise(latents, { noiseOffset: 0.1, generator: streams.forBatch(keys) });
      const t = sampleTimesteps(keys.length, 1000, streams.forBatch(keys));
      return [Array.from(noise.toFloat64Array()), Array.from(t.toFloat64Array())] as const;
    });
    const [pairNoise, pairT] = draw([[0, 0], [0, 1]]);
    const [aNoise, aT] = draw([[0, 0]]);
    const [bNoise, bT] = draw([[0, 1]]);
    expect(pairNoise).toEqual([...aNoise, ...bNoise]);
    expect(pairT).toEqual([...aT, ...bT]);
    expect(draw([[1, 0]])[0]).not.toEqual(aNoise); // another epoch, other draws
  });

  it('buckets gradients in order, one dtype and at most the cap each', () => {
    const ts = [torch.zeros([10]), torch.zeros([10]), torch.zeros([30]), torch.zeros([4], { dtype: 'float64' }), torch.zeros([2])];
    try {
      expect(gradientBuckets(ts, 80).map((b) => b.map((t) => ts.indexOf(t)))).toEqual([[0, 1], [2], [3], [4]]);
      expect(gradientBuckets(ts).map((b) => b.length)).toEqual([3, 1, 1]);
    } finally {
      for (const t of ts) t.dispose();
    }
  });
});

describe('trainTextToImageLora({ processGroup })', () => {
  const options = (outputDir: string) => ({ pretrainedModelNameOrPath: tinySd, trainDataDir: data, resolution: 32, trainBatchSize: 2, maxTrainSteps: 1, seed: 5, outputDir });

  it('null trains alone whatever the environment says; a caller\'s group of one is used and left to the caller', async () => {
    const saved = { ...process.env };
    // a launcher's variables naming a rendezvous nobody hosts: joining would fail
    Object.assign(process.env, { WORLD_SIZE: '2', RANK: '1', MASTER_ADDR: '127.0.0.1', MASTER_PORT: String(await freePort()) });
    try {
      const alone = await trainTextToImageLora(options(join(tmp, 'lib-null')), { processGroup: null });
      expect(alone).toMatchObject({ processIndex: 0, numProcesses: 1, globalStep: 1 });
    } finally {
      for (const k of ['WORLD_SIZE', 'RANK', 'MASTER_ADDR', 'MASTER_PORT']) if (saved[k] === undefined) delete process.env[k]; else process.env[k] = saved[k];
    }
    const group = await ProcessGroup.create({ masterAddr: '127.0.0.1', masterPort: 0, worldSize: 1, rank: 0 });
    try {
      const r = await trainTextToImageLora(options(join(tmp, 'lib-group')), { processGroup: group });
      expect(r).toMatchObject({ processIndex: 0, numProcesses: 1 });
      expect(group.isDestroyed).toBe(false);
    } finally {
      group.destroy();
    }
  });
});

describe('trainTextToImageLora with a caller\'s group of 2 (no launcher)', () => {
  it('two processes that create their own ProcessGroup train the LoRA of one process × batch 2', async () => {
    const port = await freePort();
    const out = join(tmp, 'lib-two');
    const single = join(tmp, 'lib-single');
    const common = { pretrainedModelNameOrPath: tinySd, trainDataDir: data, resolution: 32, randomFlip: true, learningRate: 1e-3, maxTrainSteps: 2, seed: 9 };
    const alone = await trainTextToImageLora({ ...common, trainBatchSize: 2, outputDir: single }, { processGroup: null });
    expect(alone.numProcesses).toBe(1);
    const code = (rank: number) => `
      import { ProcessGroup } from ${JSON.stringify(join(repoRoot, 'lib', 'distributed', 'process_group.ts'))};
      import { trainTextToImageLora } from ${JSON.stringify(join(repoRoot, 'lib', 'training', 'handle.ts'))};
      const group = await ProcessGroup.create({ masterAddr: '127.0.0.1', masterPort: ${port}, worldSize: 2, rank: ${rank}, timeoutMs: 20000 });
      const r = await trainTextToImageLora(${JSON.stringify({ ...common, trainBatchSize: 1, outputDir: out })}, { processGroup: group });
      group.destroy();
      console.log(JSON.stringify({ processIndex: r.processIndex, numProcesses: r.numProcesses, globalStep: r.globalStep }));`;
    const run = (rank: number) => new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve, reject) => {
      const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code(rank)], { cwd: repoRoot, env: { ...process.env, WORLD_SIZE: '' }, stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.setEncoding('utf8').on('data', (x: string) => { stdout += x; });
      child.stderr.setEncoding('utf8').on('data', (x: string) => { stderr += x; });
      child.on('error', reject);
      child.on('close', (c) => resolve({ code: c, stdout, stderr }));
    });
    const [r0, r1] = await Promise.all([run(0), run(1)]);
    expect(r0.code, r0.stderr).toBe(0);
    expect(r1.code, r1.stderr).toBe(0);
    expect(JSON.parse(r0.stdout)).toEqual({ processIndex: 0, numProcesses: 2, globalStep: 2 });
    expect(JSON.parse(r1.stdout)).toEqual({ processIndex: 1, numProcesses: 2, globalStep: 2 });
    expectSameLora(out, single, 'library, a caller\'s group of 2');
  });
});

describe('difflora launch --num_processes 2 train', () => {
  it('2 processes × batch 1 end with the LoRA and the loss curve of 1 process × batch 2', async () => {
    const single = join(tmp, 'single');
    const two = join(tmp, 'two');
    const r1 = await runCli(trainArgs(single, '--train_batch_size=2', '--max_train_steps=4'));
    expect(r1.code, r1.stderr).toBe(0);
    const r2 = await launch(2, trainArgs(two, '--train_batch_size=1', '--max_train_steps=4'));
    expect(r2.code, r2.stderr).toBe(0);
    // rank 0 alone reports and writes
    expect(r2.stdout.match(/LoRA weights written to/g)).toHaveLength(1);
    expect(r2.stderr.match(/^step 4\/4/gm)).toHaveLength(1);
    expect(r2.stderr).toMatch(/data-parallel: 2 processes \(gloo\); batch size per process 1, total train batch size \(w\. parallel, distributed & accumulation\) 2; 4 optimization steps, 2 per epoch, 2 epochs/);
    expect(r2.stderr).toMatch(/data-parallel: 2 processes \(gloo\), 4 optimizer steps, [\d.]+ ms per step waiting in collectives/);
    expectSameLora(two, single, '2×1 vs 1×2');
    expectSameCurve(losses(two), losses(single));
    // the run changed the LoRA (the comparison is not between two untrained adapters)
    const up = [...lora(two)].filter(([k]) => k.includes('lora.up.'));
    expect(up.length).toBeGreaterThan(0);
    expect(up.every(([, v]) => v.some((x) => x !== 0))).toBe(true); // lora.up starts at zero
  });

  it('two launchers (--num_machines 2, one process each) train together and equal the 2-process run', async () => {
    const machines = join(tmp, 'machines');
    const port = await freePort();
    const machine = (rank: number) => spawnCli(['launch', '--num_processes', '2', '--num_machines', '2', '--machine_rank', String(rank),
      '--main_process_ip', '127.0.0.1', '--main_process_port', String(port), '--timeout', '60',
      ...trainArgs(machines, '--train_batch_size=1', '--max_train_steps=4')]).done;
    const [m0, m1] = await Promise.all([machine(0), machine(1)]);
    expect(m0.code, m0.stderr).toBe(0);
    expect(m1.code, m1.stderr).toBe(0);
    expect(m0.stdout).toMatch(/LoRA weights written to/);
    expect(m1.stdout).not.toMatch(/LoRA weights written to/); // rank 0 (machine 0) alone writes
    expectSameLora(machines, join(tmp, 'two'), '2 machines × 1 vs 1 launcher × 2');
    expectSameCurve(losses(machines), losses(join(tmp, 'two')));
  });

  it('with --gradient_accumulation_steps=2, --scale_lr and a warmed-up cosine schedule too', async () => {
    const more = ['--gradient_accumulation_steps=2', '--scale_lr', '--learning_rate=2e-4', '--lr_scheduler=cosine', '--lr_warmup_steps=1', '--max_train_steps=3'];
    const single = join(tmp, 'single-acc');
    const two = join(tmp, 'two-acc');
    const r1 = await runCli(trainArgs(single, '--train_batch_size=2', ...more));
    expect(r1.code, r1.stderr).toBe(0);
    const r2 = await launch(2, trainArgs(two, '--train_batch_size=1', ...more));
    expect(r2.code, r2.stderr).toBe(0);
    expectSameLora(two, single, '2×1 vs 1×2, accumulation 2');
    expectSameCurve(losses(two), losses(single));
    const lrs = (out: string) => readFileSync(join(out, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => (JSON.parse(l) as { lr: number }).lr);
    expect(lrs(two)).toEqual(lrs(single));
    expect(lrs(two)[0]).toBe(0); // warm-up: the first update at lr 0, as the script
  });
});

/** The launcher's worker whose environment has RANK=rank (its children, read from /proc). */
function workerPid(launcher: number, rank: number): number | undefined {
  let children: number[] = [];
  try {
    children = readFileSync(`/proc/${launcher}/task/${launcher}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    return undefined;
  }
  return children.find((pid) => {
    try {
      return readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0').includes(`RANK=${rank}`);
    } catch {
      return false;
    }
  });
}

/**
 * `difflora launch --num_processes 2 …` with `signal` sent to worker rank 1 once `<out>/checkpoint-2` exists: the run's
 * result, the signalled pid (undefined if it never got there), when, and every worker pid seen. A stopped worker is
 * killed at the end whatever happens, so none is left behind.
 */
async function launchAndSignal(timeoutS: number, args: string[], out: string, signal: 'SIGKILL' | 'SIGSTOP') {
  const { child, done } = spawnCli(['launch', '--num_processes', '2', '--main_process_port', String(await freePort()), '--timeout', String(timeoutS), ...args]);
  let signalled: number | undefined;
  let at = 0;
  const pids = new Set<number>();
  const timer = setInterval(() => {
    for (const r of [0, 1]) {
      const pid = workerPid(child.pid!, r);
      if (pid !== undefined) pids.add(pid);
    }
    if (signalled === undefined && existsSync(join(out, 'checkpoint-2'))) {
      signalled = workerPid(child.pid!, 1);
      if (signalled !== undefined) {
        process.kill(signalled, signal);
        at = Date.now();
      }
    }
  }, 2);
  try {
    return { r: await done, signalled, at, pids };
  } finally {
    clearInterval(timer);
    if (signalled !== undefined && alive(signalled)) process.kill(signalled, 'SIGKILL');
  }
}

describe('difflora launch … train: faults and resume', () => {
  const MAX = 8; // a checkpoint every 2 steps: the kill lands after step 2 with steps to spare
  const args = (out: string, ...more: string[]) => trainArgs(out, '--train_batch_size=1', '--checkpointing_steps=2', ...(more.some((a) => a.startsWith('--max_train_steps')) ? [] : [`--max_train_steps=${MAX}`]), ...more);

  it('a worker SIGKILLed mid-run: the launcher names it, nothing is left, the checkpoint resumes bit-identical to an uninterrupted run', async () => {
    const straight = join(tmp, 'straight');
    const ref = await launch(2, args(straight));
    expect(ref.code, ref.stderr).toBe(0);

    const out = join(tmp, 'killed');
    const { r, signalled: killed, at: killedAt, pids } = await launchAndSignal(10, args(out), out, 'SIGKILL');
    expect(killed, r.stderr).toBeDefined();
    // within the collective timeout (--timeout 10) and the launcher's SIGTERM → SIGKILL grace (5 s); a dead peer is seen at once
    console.log(`launcher exited ${Date.now() - killedAt} ms after the SIGKILL`);
    expect(Date.now() - killedAt).toBeLessThan(10_000 + 5_000);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(new RegExp(`difflora launch: failed: worker rank 1 \\(pid ${killed}\\) was killed by SIGKILL`));
    for (const pid of pids) expect(alive(pid), `pid ${pid} still running`).toBe(false);
    expect(existsSync(join(out, 'pytorch_lora_weights.safetensors'))).toBe(false);
    // the newest checkpoint is whole: its state parses and its tensors load
    const checkpoints = readdirSync(out).filter((n) => /^checkpoint-\d+$/.test(n)).sort();
    expect(checkpoints.length).toBeGreaterThan(0);
    const last = join(out, checkpoints[checkpoints.length - 1]!);
    const state = readTrainingState(last, undefined, 2);
    expect(state.parallel?.worldSize).toBe(2);
    expect(state.parallel?.ranks.map((x) => x.data.loader.position)).toHaveLength(2);
    expect(loadSafetensors(join(last, 'training_state.safetensors')).tensors.has('rank1.rng.0')).toBe(true);

    // another number of processes cannot resume it (on a copy: the refusal must not be what leaves the folder intact)
    const copy = join(tmp, 'killed-copy');
    cpSync(out, copy, { recursive: true });
    const alone = await runCli(args(copy, '--resume_from_checkpoint', 'latest'));
    expect(alone.code).toBe(1);
    expect(alone.stderr).toMatch(/--resume_from_checkpoint: '.*checkpoint-\d+' was written by a run of 2 processes, this run has 1 process: resume with the same number of processes \('difflora launch --num_processes 2 train …'\)/);

    const resumed = await launch(2, args(out, '--resume_from_checkpoint', 'latest'));
    expect(resumed.code, resumed.stderr).toBe(0);
    expect(readFileSync(join(out, 'pytorch_lora_weights.safetensors')).equals(readFileSync(join(straight, 'pytorch_lora_weights.safetensors')))).toBe(true);
    expect(steps(out)).toEqual(Array.from({ length: MAX }, (_, i) => i + 1));
    expect(losses(out)).toEqual(losses(straight));
  });

  it('a hung worker (SIGSTOP): the others fail after --timeout, the launcher exits naming the rank, nothing is left', async () => {
    const out = join(tmp, 'hung');
    const { r, signalled: stopped, at: stoppedAt, pids } = await launchAndSignal(5, args(out, '--max_train_steps=400'), out, 'SIGSTOP');
    expect(stopped, r.stderr).toBeDefined();
    console.log(`launcher exited ${Date.now() - stoppedAt} ms after the SIGSTOP (--timeout 5)`);
    expect(Date.now() - stoppedAt).toBeLessThan(5_000 + 5_000 + 10_000); // the timeout, the launcher's grace, a loaded machine
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/difflora launch: failed: worker rank 0 \(pid \d+\) exited with code 1/);
    for (const pid of pids) expect(alive(pid), `pid ${pid} still running`).toBe(false);
    expect(existsSync(join(out, 'checkpoint-2', 'training_state.json'))).toBe(true); // what was saved stays
  });

  it('a 1-process checkpoint cannot be resumed by 2 processes', async () => {
    const out = join(tmp, 'alone');
    const r = await runCli(args(out, '--max_train_steps=2'));
    expect(r.code, r.stderr).toBe(0);
    const two = await launch(2, args(out, '--max_train_steps=2', '--resume_from_checkpoint', 'latest'));
    expect(two.code).toBe(1);
    expect(two.stderr).toMatch(/was written by a run of 1 process, this run has 2 processes: resume with the same number of processes \('difflora train' alone\)/);
    expect(two.stderr).toMatch(/difflora launch: failed: worker rank \d \(pid \d+\) exited with code 1/);
  });
});
