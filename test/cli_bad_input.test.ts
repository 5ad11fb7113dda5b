// `difflora train` on bad input, run as a real child process: each case exits non-zero with a message that
// names the problem (the file, the flag, the folder), and nothing already written is lost (an earlier
// result and checkpoint in --output_dir are byte-identical afterwards; a checkpoint saved before the failure
// survives and resumes to the same result as a run that never failed).
//
// Read-only and full disks are real here: the run happens in a private mount namespace (`unshare -m`, we
// run as root, and chmod would not stop root) on a tmpfs mounted read-only, or a small tmpfs filled up.
// Where mounting is impossible (no CAP_SYS_ADMIN, no user namespaces) those two tests are reported as
// skipped by name, and the stand-ins below still run on every machine: the same write paths, fed errors
// that can be produced without mounting — ENOSPC from /dev/full (metrics.jsonl linked to it) and ENOTDIR
// (an existing file where the output folder's parent should be).
import { spawnSync } from 'node:child_process';
import { cpSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { permutation } from '../lib/data/imagefolder.js';
import { deriveSeed } from '../lib/data/transforms.js';
import { readSafetensorsHeader } from '../lib/io/safetensors.js';
import { canMountTmpfs, checkpointNames, makeImageFolder, runCli, runInMountNamespace, tinySd, treeHashes } from './cli_helpers.js';

let tmp: string;
let data: string;
/** A finished run's output folder (result, checkpoints, logs): copied in as "what was already written". */
let previous: string;
let mountable = false;

const SEED = 99;
const base = (dataDir: string, out: string, ...more: string[]) => ['train', `--pretrained_model_name_or_path=${tinySd}`, `--train_data_dir=${dataDir}`,
  '--resolution=32', '--train_batch_size=1', '--gradient_accumulation_steps=2', `--seed=${SEED}`, `--output_dir=${out}`, ...more];

beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-badinput-'));
  data = join(tmp, 'data');
  await makeImageFolder(data, 4);
  previous = join(tmp, 'previous');
  const r = await runCli(base(data, previous, '--max_train_steps=2', '--checkpointing_steps=1'));
  if (r.code !== 0) throw new Error(`the reference run failed: ${r.stderr}`);
  mountable = canMountTmpfs(join(tmp, 'probe-mount'));
  if (!mountable) console.warn('cli_bad_input: cannot mount a tmpfs here: the read-only and full-disk tests with real mounts are skipped; the /dev/full and ENOTDIR stand-ins run');
}, 120_000);
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** A copy of the previous run's output to run into, and its hashes before the run. */
function priorOutput(name: string): { dir: string; before: Record<string, string> } {
  const dir = join(tmp, name);
  cpSync(previous, dir, { recursive: true });
  return { dir, before: treeHashes(dir) };
}

/** A copy of the dataset whose `index`-th image is cut short. */
async function datasetWithTruncated(name: string, index: number, format: 'png' | 'jpeg'): Promise<{ dir: string; broken: string }> {
  const dir = join(tmp, name);
  cpSync(data, dir, { recursive: true });
  const file = join(dir, `${index}.png`);
  const bytes = format === 'png'
    ? readFileSync(file)
    : await sharp(readFileSync(file)).jpeg({ quality: 90 }).toBuffer(); // a JPEG under a .png name: libvips sniffs the content
  writeFileSync(file, bytes.subarray(0, Math.floor(bytes.length / 2)));
  return { dir, broken: file };
}

describe('difflora train: bad input names the problem, exits non-zero, loses nothing', () => {
  it('an unknown flag: exit 2 with a suggestion, nothing created', async () => {
    const out = join(tmp, 'unknown-flag');
    const r = await runCli([...base(data, out), '--learning_rat=1e-4']);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("unknown flag '--learning_rat' (did you mean '--learning_rate'?)");
    expect(existsSync(out)).toBe(false);
  });

  it('a missing dataset folder', async () => {
    const { dir, before } = priorOutput('out-missing');
    const r = await runCli(base(join(tmp, 'no-such-data'), dir));
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`--train_data_dir '${join(tmp, 'no-such-data')}' does not exist`);
    expect(r.stderr).not.toMatch(/^\s+at /m); // a message, not a stack trace
    expect(treeHashes(dir)).toEqual(before);
  });

  it('an empty dataset: a folder without images, and metadata without rows', async () => {
    const empty = join(tmp, 'empty');
    mkdirSync(empty);
    const { dir, before } = priorOutput('out-empty');
    const r = await runCli(base(empty, dir));
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`no images in '${empty}'`);
    expect(treeHashes(dir)).toEqual(before);

    const noRows = join(tmp, 'no-rows');
    cpSync(data, noRows, { recursive: true });
    writeFileSync(join(noRows, 'metadata.jsonl'), '\n');
    const r2 = await runCli(base(noRows, dir));
    expect(r2.code).toBe(1);
    expect(r2.stderr).toContain(`the metadata under '${noRows}' has no rows`);
    expect(treeHashes(dir)).toEqual(before);
  });

  it('metadata pointing outside the dataset folder (../../etc/passwd)', async () => {
    const { dir, before } = priorOutput('out-escape');
    const escape = join(tmp, 'escape');
    cpSync(data, escape, { recursive: true });
    const meta = join(escape, 'metadata.jsonl');
    writeFileSync(meta, `${readFileSync(meta, 'utf8').trim()}\n${JSON.stringify({ file_name: '../../etc/passwd', text: 'x' })}\n`);
    const r = await runCli(base(escape, dir));
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/'\.\.\/\.\.\/etc\/passwd'.*points outside the dataset folder|points outside the dataset folder.*\.\.\/\.\.\/etc\/passwd/);
    expect(r.stderr).not.toMatch(/^\s+at /m);
    expect(treeHashes(dir)).toEqual(before);
  });

  it('a caption column that does not exist', async () => {
    const { dir, before } = priorOutput('out-caption');
    const r = await runCli([...base(data, dir), '--caption_column=prompt']);
    expect(r.code).toBe(1);
    // the script's own message (its stray quote included)
    expect(r.stderr).toContain("--caption_column' value 'prompt' needs to be one of: image, text");
    expect(treeHashes(dir)).toEqual(before);
  });

  it('a truncated PNG read by the first step: the file is named, nothing is written', async () => {
    const order = permutation(4, deriveSeed(SEED, 0));
    const { dir: bad, broken } = await datasetWithTruncated('trunc-first', order[0]!, 'png');
    const { dir, before } = priorOutput('out-trunc-first');
    const r = await runCli([...base(bad, dir), '--max_train_steps=2']);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`cannot read image '${broken}'`);
    expect(r.stderr).toContain('(at step 1, epoch 0)');
    expect(r.stderr).toContain('--skip_broken_images');
    // the earlier run's files are untouched (no metrics line, log or checkpoint was written before the failure)
    const after = treeHashes(dir);
    for (const [f, h] of Object.entries(before)) expect(after[f], f).toBe(h);
  });

  it('a truncated JPEG met after a checkpoint: the file and the surviving checkpoint are named; resuming after the fix gives the uninterrupted result', async () => {
    // 4 images, batch 1, accumulation 2: step 2 reads positions 2 and 3 of epoch 0's order
    const order = permutation(4, deriveSeed(SEED, 0));
    const { dir: bad, broken } = await datasetWithTruncated('trunc-later', order[3]!, 'jpeg');
    const out = join(tmp, 'out-trunc-later');
    const r = await runCli([...base(bad, out), '--max_train_steps=4', '--checkpointing_steps=1']);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`cannot read image '${broken}'`);
    expect(r.stderr).toContain(`(at step 2, epoch 0); the last checkpoint is ${join(out, 'checkpoint-1')}`);
    expect(checkpointNames(out)).toEqual(['checkpoint-1']);
    expect(existsSync(join(out, 'pytorch_lora_weights.safetensors'))).toBe(false);

    // the image replaced by the good one, resume: the same file as a run that never met the broken image
    cpSync(join(data, `${order[3]}.png`), broken);
    const resumed = await runCli([...base(bad, out), '--max_train_steps=4', '--checkpointing_steps=1', '--resume_from_checkpoint=latest']);
    expect(resumed.code, resumed.stderr).toBe(0);
    const straight = join(tmp, 'out-trunc-straight');
    const ref = await runCli([...base(data, straight), '--max_train_steps=4', '--checkpointing_steps=1']);
    expect(ref.code, ref.stderr).toBe(0);
    expect(readFileSync(join(out, 'pytorch_lora_weights.safetensors')).equals(readFileSync(join(straight, 'pytorch_lora_weights.safetensors')))).toBe(true);
  });

  it('--skip_broken_images: the broken image is skipped, counted and named, and training finishes', async () => {
    const order = permutation(4, deriveSeed(SEED, 0));
    const { dir: bad, broken } = await datasetWithTruncated('trunc-skip', order[1]!, 'png');
    const out = join(tmp, 'out-skip');
    // 3 optimizer steps of 2 batches: epoch 0 yields 3 good images, so the run reads the broken one in epochs 0 and 1
    const r = await runCli([...base(bad, out), '--max_train_steps=3', '--skip_broken_images']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain(`warning: skipped 2 unreadable image(s) (--skip_broken_images): ${broken}`);
    expect(existsSync(join(out, 'pytorch_lora_weights.safetensors'))).toBe(true);
  });
});

describe('difflora train: flags, checkpoints and output folders that cannot work', () => {
  it('--learning_rate=1e309 and --rank=100000: exit 2 naming the flag; no output folder is created', async () => {
    const out = join(tmp, 'lr-inf');
    const r = await runCli([...base(data, out), '--learning_rate=1e309', '--max_train_steps=1']);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('--learning_rate must be a finite number > 0, got Infinity');
    expect(existsSync(out)).toBe(false);
    // the rank is checked against the model once it is loaded: the folder the run made is removed again
    const r2 = await runCli([...base(data, out), '--rank=100000', '--max_train_steps=1']);
    expect(r2.code).toBe(2);
    expect(r2.stderr).toMatch(/--rank 100000 is larger than the smallest layer LoRA adapts, .* \(Linear 32 → 32\): --rank must be at most 32/);
    expect(existsSync(out)).toBe(false);
  });

  it('a corrupt training_state.json: exit 1 naming the file and the field, the output folder byte-identical', async () => {
    const { dir } = priorOutput('out-corrupt-state');
    const stateFile = join(dir, 'checkpoint-2', 'training_state.json');
    const state = JSON.parse(readFileSync(stateFile, 'utf8')) as { accumulator: { globalStep: unknown } };
    state.accumulator.globalStep = 'abc';
    writeFileSync(stateFile, JSON.stringify(state));
    const before = treeHashes(dir);
    const r = await runCli([...base(data, dir), '--max_train_steps=3', '--resume_from_checkpoint=latest']);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`training state '${stateFile}': accumulator.globalStep must be a whole number, got "abc"`);
    expect(treeHashes(dir)).toEqual(before);
  });

  it('a fresh run into an earlier run\'s folder: the old metrics.jsonl is moved aside and a note says so', async () => {
    const { dir, before } = priorOutput('out-fresh-again');
    const r = await runCli([...base(data, dir), '--max_train_steps=1']);
    expect(r.code, r.stderr).toBe(0);
    const aside = readdirSync(dir).filter((f) => /^metrics\.jsonl\..*\.bak$/.test(f));
    expect(aside).toHaveLength(1);
    expect(r.stderr).toContain(`difflora train: note: ${join(dir, 'metrics.jsonl')} held an earlier run's steps: moved to ${join(dir, aside[0]!)}`);
    expect(treeHashes(dir)[aside[0]!]).toBe(before['metrics.jsonl']);
    expect(readFileSync(join(dir, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => (JSON.parse(l) as { step: number }).step)).toEqual([1]);
  });

  it('an --output_dir that is a FIFO, or a metrics.jsonl that is one: named, never opened, nothing changed', async () => {
    const fifo = join(tmp, 'out-fifo');
    spawnSync('mkfifo', [fifo]);
    const r = await runCli(base(data, fifo));
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`--output_dir '${fifo}' exists and is a FIFO, not a directory`);
    const { dir, before } = priorOutput('out-metrics-fifo');
    rmSync(join(dir, 'metrics.jsonl'));
    delete before['metrics.jsonl'];
    spawnSync('mkfifo', [join(dir, 'metrics.jsonl')]);
    const r2 = await runCli([...base(data, dir), '--max_train_steps=1']);
    expect(r2.code).toBe(1);
    expect(r2.stderr).toContain(`metrics file '${join(dir, 'metrics.jsonl')}' is a FIFO, not a regular file`);
    expect(lstatSync(join(dir, 'metrics.jsonl')).isFIFO()).toBe(true);
    rmSync(join(dir, 'metrics.jsonl')); // treeHashes would block reading it
    const after = treeHashes(dir);
    for (const [f, h] of Object.entries(before)) expect(after[f], f).toBe(h);
  });
});

describe('difflora train: an output folder on a read-only or full disk', () => {
  // Stand-in for a read-only disk that needs no mount: the output folder's parent is a regular file (ENOTDIR).
  it('an output folder that cannot be created (a file in the way): the folder is named, before any model is loaded', async () => {
    const file = join(tmp, 'a-file');
    writeFileSync(file, 'keep me');
    const r = await runCli(base(data, join(file, 'out')));
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`--output_dir '${join(file, 'out')}' is not writable: ENOTDIR`);
    expect(readFileSync(file, 'utf8')).toBe('keep me');
  });

  // Stand-in for a disk that fills during training, on every machine: metrics.jsonl is a link to /dev/full,
  // whose writes fail with ENOSPC — the same write path and error as a full disk at the first log line.
  it('a log write failing with ENOSPC (/dev/full): the file is named, earlier files are intact', async () => {
    const { dir, before } = priorOutput('out-devfull');
    rmSync(join(dir, 'metrics.jsonl'));
    delete before['metrics.jsonl'];
    symlinkSync('/dev/full', join(dir, 'metrics.jsonl'));
    const r = await runCli([...base(data, dir), '--max_train_steps=2']);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`cannot write ${join(dir, 'metrics.jsonl')}: ENOSPC: no space left on device`);
    const after = treeHashes(join(dir));
    for (const [f, h] of Object.entries(before)) expect(after[f], f).toBe(h);
  });

  it('a read-only mount (an earlier run bound read-only): refused before loading, naming the folder; nothing changed', async (ctx) => {
    if (!mountable) ctx.skip();
    const { dir, before } = priorOutput('out-ro');
    // the earlier output folder bound read-only onto itself: run into it, and into a new folder under it
    const r = await runInMountNamespace(`
      mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" || exit 90
      cli train --pretrained_model_name_or_path="$2" --train_data_dir="$3" --output_dir="$1" --resolution=32 --seed=1 2>&1; echo "exit=$?"
      cli train --pretrained_model_name_or_path="$2" --train_data_dir="$3" --output_dir="$1/sub" --resolution=32 --seed=1 2>&1; echo "exit2=$?"`,
    [dir, tinySd, data]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain('exit=1');
    expect(r.stdout).toContain('exit2=1');
    expect(r.stdout).toContain(`--output_dir '${dir}' is not writable: EROFS: read-only file system`);
    expect(r.stdout).toContain(`--output_dir '${join(dir, 'sub')}' is not writable: EROFS: read-only file system`);
    expect(treeHashes(dir)).toEqual(before);
  });

  it('a disk already full (a filled tmpfs holding an earlier run): refused before loading, nothing changed', async (ctx) => {
    if (!mountable) ctx.skip();
    const { dir, before } = priorOutput('out-full-src');
    const mnt = join(tmp, 'mnt-full');
    const snapshot = join(tmp, 'out-full-after');
    mkdirSync(mnt);
    const r = await runInMountNamespace(`
      mount -t tmpfs -o size=2m tmpfs "$1" || exit 90
      cp -a "$2" "$1/out" || exit 91
      head -c 8m /dev/zero > "$1/filler" 2>/dev/null
      cli train --pretrained_model_name_or_path="$4" --train_data_dir="$5" --output_dir="$1/out" --resolution=32 --seed=1 2>&1; echo "exit=$?"
      cp -a "$1/out" "$3"`,
    [mnt, dir, snapshot, tinySd, data]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain('exit=1');
    expect(r.stdout).toContain(`--output_dir '${join(mnt, 'out')}' is not writable: ENOSPC: no space left on device`);
    expect(treeHashes(snapshot)).toEqual(before);
  });

  it('a disk that fills during training: the write is named, the checkpoints saved before survive and resume to the uninterrupted result', async (ctx) => {
    if (!mountable) ctx.skip();
    const flags = ['--max_train_steps=9', '--checkpointing_steps=3'];
    const straight = join(tmp, 'out-fill-straight');
    const ref = await runCli([...base(data, straight), ...flags]);
    expect(ref.code, ref.stderr).toBe(0);

    const mnt = join(tmp, 'mnt-fill');
    const snapshot = join(tmp, 'out-fill-after');
    mkdirSync(mnt);
    // an 8 MiB tmpfs; as soon as checkpoint-3 is in place, a filler takes every free byte
    const r = await runInMountNamespace(`
      M="$1"; S="$2"; shift 2
      mount -t tmpfs -o size=8m tmpfs "$M" || exit 90
      ( i=0; while [ ! -d "$M/out/checkpoint-3" ] && [ $i -lt 20000 ]; do i=$((i+1)); sleep 0.005; done
        head -c 64m /dev/zero > "$M/filler" 2>/dev/null ) &
      cli "$@" 2>&1; echo "exit=$?"
      wait
      cp -a "$M/out" "$S"`,
    // --checkpoints_total_limit=1: pruning must wait until the new checkpoint is saved, or the failed save
    // of checkpoint-6 would leave none (the Python script prunes first)
    [mnt, snapshot, ...base(data, join(mnt, 'out'), ...flags, '--checkpoints_total_limit=1')]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain('exit=1');
    expect(r.stdout).toMatch(/no space left on device/i);
    expect(r.stdout).toContain(join(mnt, 'out')); // the message names what could not be written
    expect(r.stdout).toContain(`the last checkpoint is ${join(mnt, 'out', 'checkpoint-3')}`);
    // the checkpoint saved before the disk filled is whole (byte-identical to the uninterrupted run's),
    // the failed save left no temporary folder, and no result file was written
    expect(checkpointNames(snapshot)).toEqual(['checkpoint-3']);
    expect(treeHashes(join(snapshot, 'checkpoint-3'))).toEqual(treeHashes(join(straight, 'checkpoint-3')));
    expect(existsSync(join(snapshot, 'pytorch_lora_weights.safetensors'))).toBe(false);
    // space freed (the folder copied to a disk with room): resuming ends where the uninterrupted run did
    const resumed = await runCli([...base(data, snapshot, ...flags), '--resume_from_checkpoint=latest']);
    expect(resumed.code, resumed.stderr).toBe(0);
    expect(readFileSync(join(snapshot, 'pytorch_lora_weights.safetensors')).equals(readFileSync(join(straight, 'pytorch_lora_weights.safetensors')))).toBe(true);
    expect(readSafetensorsHeader(join(snapshot, 'pytorch_lora_weights.safetensors')).tensors.length).toBe(96);
  });
});
