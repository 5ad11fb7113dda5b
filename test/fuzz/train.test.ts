// Seeded fuzz suite for `difflora train` and `difflora generate` (issue #12): flags outside their domains
// (NaN, Infinity, 1e309, -1, 0, fractions, huge numbers, words, empty values) for every numeric flag, the
// issue's own examples as real CLI runs, library options of the wrong type, and a real checkpoint's
// training_state.json / training_state.safetensors corrupted in many ways and resumed with
// `--resume_from_checkpoint latest`. Every case must be refused cleanly (exit 1 or 2, a message naming the
// flag, file or field, no stack trace) — never a crash, a hang, or a silent success — and the output folder
// must be byte-identical afterwards.
import { spawnSync } from 'node:child_process';
import { cpSync, mkdtempSync, readFileSync, rmSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadSafetensors, saveSafetensors } from '../../lib/io/safetensors.js';
import { dispose, tidy } from '../../lib/scope.js';
import type { Tensor } from '../../lib/tensor.js';
import { makeImageFolder, runCli, tinySd, treeHashes } from '../cli_helpers.js';
import { report, rng, runCases, type FuzzCase, type RawResult } from './harness.js';

const SEED = 1212;
let tmp: string;
let data: string;
/** A finished 2-step run with checkpoint-2: what every resume case starts from. */
let reference: string;

const trainBase = (out: string) => ['train', `--pretrained_model_name_or_path=${tinySd}`, `--train_data_dir=${data}`,
  '--resolution=32', '--train_batch_size=1', '--seed=5', `--output_dir=${out}`];
const generateBase = ['generate', `--pretrained_model_name_or_path=${tinySd}`, '--prompt', 'x', '--num_inference_steps=2', '--height=64', '--width=64'];

beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-fuzz-train-'));
  data = join(tmp, 'data');
  await makeImageFolder(data, 3);
  reference = join(tmp, 'reference');
  const r = await runCli([...trainBase(reference), '--max_train_steps=2', '--checkpointing_steps=2']);
  if (r.code !== 0) throw new Error(`the reference run failed: ${r.stderr}`);
}, 120_000);
afterAll(() => rmSync(tmp, { recursive: true, force: true }));


/** A copy of the reference output to run into, and its hashes before. */
function copyOfReference(name: string): string {
  const dir = join(tmp, name);
  cpSync(reference, dir, { recursive: true });
  return dir;
}

/**
 * A character device like /dev/full (1, 7) of our own, in the temp folder, when we may make one (root), and
 * otherwise a symbolic link to /dev/full. Never the real /dev/full: were a refusal to regress, the atomic
 * writer would rename a file over the machine's device node.
 */
function privateFullDevice(path: string): string {
  if (spawnSync('mknod', ['-m', '666', path, 'c', '1', '7']).status !== 0) symlinkSync('/dev/full', path);
  return path;
}

const mkfifo = (path: string) => {
  const r = spawnSync('mkfifo', [path]);
  if (r.status !== 0) throw new Error(`mkfifo ${path} failed`);
};

// ---- flags: every numeric flag with values outside its domain

const POSITIVE_INT = ['0', '-1', '1.5', '1e309', 'NaN', 'Infinity', 'abc', '', '99999999999999999999', '1e3'];
const NON_NEGATIVE_INT = ['-1', '1.5', '1e309', 'NaN', 'abc', '', '99999999999999999999'];
const POSITIVE_FLOAT = ['0', '-1', '1e309', '-1e309', 'NaN', 'Infinity', 'abc', '', '1e39', '-0'];
const NON_NEGATIVE_FLOAT = ['-1', '-1e-9', '1e309', 'NaN', 'abc', '', '1e39'];
const UNIT_INTERVAL = ['1', '-0.1', '1.5', '1e309', 'NaN', 'abc', '', '2'];

const TRAIN_FLAG_POOLS: Record<string, string[]> = {
  resolution: [...POSITIVE_INT, '30', '8192', '4'],
  train_batch_size: POSITIVE_INT, num_train_epochs: POSITIVE_INT, max_train_steps: POSITIVE_INT,
  gradient_accumulation_steps: POSITIVE_INT, checkpointing_steps: POSITIVE_INT, checkpoints_total_limit: POSITIVE_INT,
  validation_epochs: POSITIVE_INT, max_train_samples: POSITIVE_INT, rank: POSITIVE_INT,
  dataloader_num_workers: [...NON_NEGATIVE_INT, '1000000', '65'],
  lr_warmup_steps: NON_NEGATIVE_INT, seed: NON_NEGATIVE_INT,
  num_validation_images: [...NON_NEGATIVE_INT, '1000'],
  learning_rate: POSITIVE_FLOAT, adam_epsilon: POSITIVE_FLOAT, max_grad_norm: POSITIVE_FLOAT, snr_gamma: POSITIVE_FLOAT,
  adam_weight_decay: NON_NEGATIVE_FLOAT, noise_offset: NON_NEGATIVE_FLOAT,
  adam_beta1: UNIT_INTERVAL, adam_beta2: UNIT_INTERVAL,
  local_rank: ['1.5', 'abc', '99999999999999999999', ''],
};
const GENERATE_FLAG_POOLS: Record<string, string[]> = {
  num_inference_steps: ['0', '-1', '1.5', '1e309', '1001', 'NaN', 'abc', ''],
  guidance_scale: ['1e309', '-1', '101', 'NaN', 'abc', 'Infinity', ''],
  lora_scale: ['1e309', '-101', 'NaN', 'abc'],
  seed: ['-1', '1.5', '1e309', 'abc', '99999999999999999999'],
  height: ['0', '7', '30', '1e309', '8192', '-8', 'abc'],
  width: ['0', '7', '30', '1e309', '8192', '-8', 'abc'],
  num_images: ['0', '65', '1.5', 'abc', '1e309'],
  clip_skip: ['-1', '1.5', 'abc'],
};

interface SweepInput { argv: string[]; flags: string[] }

/** `picks` random bad values per flag, as --flag=value or --flag value; and a few with several bad flags at once. */
function sweepInputs(seed: number, pools: Record<string, string[]>, base: string[], picks: number): SweepInput[] {
  const r = rng(seed);
  const token = (flag: string, value: string) => (value === '' || r.next() < 0.5 ? [`--${flag}=${value}`] : [`--${flag}`, value]);
  const inputs: SweepInput[] = [];
  for (const [flag, pool] of Object.entries(pools)) {
    for (let i = 0; i < picks; i++) inputs.push({ argv: [...base, ...token(flag, r.pick(pool))], flags: [flag] });
  }
  const names = Object.keys(pools);
  for (let i = 0; i < 3; i++) {
    const flags = [...new Set([r.pick(names), r.pick(names), r.pick(names)])];
    inputs.push({ argv: [...base, ...flags.flatMap((f) => token(f, r.pick(pools[f]!)))], flags });
  }
  return inputs;
}

/**
 * One child running the CLI's main() in-process on many inputs (each a full command line): every input must
 * exit 2 naming its flag(s). The trainer is a stub that would report success: reaching it means the bad
 * value was accepted.
 */
function sweepCase(name: string, inputs: SweepInput[]): FuzzCase {
  return {
    name,
    script: (lib) => `
      const { main } = await import(${JSON.stringify(`${lib}/cli/main.ts`)});
      const inputs = ${JSON.stringify(inputs)};
      const results = [];
      for (const { argv, flags } of inputs) {
        let err = '';
        const code = await main(argv, {
          stdout: { write: () => {} }, stderr: { write: (s) => { err += s; } }, env: {},
          loadTrainer: async () => () => ({ outputFile: 'accepted' }),
        });
        process.stderr.write(err); // scanned by the harness for stack traces and TypeErrors
        results.push({ argv, flags, code, err });
      }
      process.stdout.write(JSON.stringify(results));`,
    mayAccept: true,
    check: (r: RawResult) => {
      const results = JSON.parse(r.stdout) as { argv: string[]; flags: string[]; code: number; err: string }[];
      const wrong = results.filter((x) => x.code !== 2 || !x.flags.every((f) => x.err.includes(`--${f}`)));
      return wrong.length === 0 || `${wrong.length} of ${results.length} not refused naming the flag: ${wrong.slice(0, 3).map((x) => `[${x.argv.slice(-2).join(' ')}] → ${x.code} ${x.err.split('\n')[0]}`).join('; ')}`;
    },
    timeoutMs: 30_000,
  };
}

/**
 * One child resuming (`difflora train … --resume_from_checkpoint latest`, the CLI's main() in-process) from
 * several corrupted copies in turn: each must exit 1 with its expected message.
 */
function resumeSweepCase(name: string, items: { name: string; argv: string[]; error: RegExp }[]): FuzzCase {
  return {
    name,
    script: (lib) => `
      const { main } = await import(${JSON.stringify(`${lib}/cli/main.ts`)});
      const results = [];
      for (const argv of ${JSON.stringify(items.map((i) => i.argv))}) {
        let err = '';
        const code = await main(argv, { stdout: { write: () => {} }, stderr: { write: (s) => { err += s; } }, env: {} });
        process.stderr.write(err); // scanned by the harness for stack traces and TypeErrors
        results.push({ code, err });
      }
      process.stdout.write(JSON.stringify(results));`,
    mayAccept: true,
    check: (r: RawResult) => {
      const results = JSON.parse(r.stdout) as { code: number; err: string }[];
      const wrong = items.map((item, i) => ({ item, got: results[i]! })).filter(({ item, got }) => got.code !== 1 || !item.error.test(got.err));
      return wrong.length === 0 || wrong.map(({ item, got }) => `${item.name}: exit ${got.code}, ${got.err.split('\n')[0]} (expected ${item.error})`).join('; ');
    },
    timeoutMs: 60_000,
  };
}

/** Library options of the wrong type or out of range (a JSON config with a null, a string, NaN): refused, naming the option. */
function libraryOptionsCase(out: string): FuzzCase {
  const good = { pretrainedModelNameOrPath: tinySd, trainDataDir: data, outputDir: out, resolution: 32, trainBatchSize: 1, maxTrainSteps: 1, device: 'cpu' };
  const bad: [Record<string, unknown> | null, string][] = [
    [null, 'options'],
    [{ ...good, resolution: null }, 'resolution'],
    [{ ...good, learningRate: '1e-4' }, 'learningRate'],
    [{ ...good, maxGradNorm: 'NaN' }, 'maxGradNorm'],
    [{ ...good, outputDir: 42 }, 'outputDir'],
    [{ ...good, trainBatchSize: [1] }, 'trainBatchSize'],
    [{ ...good, centerCrop: 'yes' }, 'centerCrop'],
    [{ ...good, lrScheduler: 'cosine_annealing' }, 'lrScheduler'],
    [{ ...good, mixedPrecision: 'fp8' }, 'mixedPrecision'],
    [{ ...good, device: 'gpu' }, 'device'],
    [{ ...good, pretrainedModelNameOrPath: undefined }, 'pretrainedModelNameOrPath'],
    [{ ...good, seed: -5 }, 'seed'],
  ];
  return {
    name: 'library: runTraining with options of the wrong type or range',
    script: (lib) => `
      const { runTraining } = await import(${JSON.stringify(`${lib}/training/train.ts`)});
      const inputs = ${JSON.stringify(bad)};
      const results = [];
      for (const [options, key] of inputs) {
        const message = await runTraining(options).then(() => 'accepted', (e) => e instanceof Error ? e.name + ': ' + e.message : String(e));
        process.stderr.write(message + '\\n');
        results.push({ key, message });
      }
      process.stdout.write(JSON.stringify(results));`,
    mayAccept: true,
    check: (r: RawResult) => {
      const results = JSON.parse(r.stdout) as { key: string; message: string }[];
      const wrong = results.filter((x) => !x.message.startsWith('TrainOptionsError: ') || !x.message.includes(x.key));
      return wrong.length === 0 || wrong.map((x) => `${x.key}: ${x.message}`).join('; ');
    },
    timeoutMs: 30_000,
  };
}

// ---- checkpoint corruptions

/** Raw JSON values that are invalid for a field of the given kind. */
const BAD_VALUES = {
  int: ['"abc"', '1e999', '-1', '1.5', 'null', '[]', '{}', 'true', '9007199254740993'],
  float: ['"abc"', '1e999', '-1', 'null', '[]', '{}', 'true', '-1e-9'],
  array: ['"abc"', '1e999', 'null', '[]', '{}', '[1,2,3]'],
  scaler: ['"abc"', '1', '[]', '{}', '{"scale": -1}'],
} as const;
const FIELDS: [string[], keyof typeof BAD_VALUES][] = [
  [['accumulator', 'globalStep'], 'int'], [['accumulator', 'lrStep'], 'int'], [['accumulator', 'microStep'], 'int'],
  [['optimizer', 'lr'], 'float'], [['optimizer', 'eps'], 'float'], [['optimizer', 'weightDecay'], 'float'],
  [['optimizer', 'steps'], 'array'], [['optimizer', 'betas'], 'array'], [['scaler'], 'scaler'],
  [['data', 'epoch'], 'int'], [['data', 'loader', 'epoch'], 'int'], [['data', 'loader', 'position'], 'int'], [['data', 'loader', 'seed'], 'int'],
  [['epoch'], 'int'],
];

type Json = Record<string, unknown>;
const at = (o: Json, path: string[]): Json => path.slice(0, -1).reduce((x, k) => x[k] as Json, o);

/** A way to corrupt checkpoint-2; `example`: one of the issue's own, run as a CLI child of its own. */
interface Corruption { name: string; apply: (checkpoint: string) => void; error: RegExp; example?: boolean }

const STATE_ERROR = (field: string) => new RegExp(`training state '[^']*checkpoint-2/training_state\\.json'.*${field}`);

/** The state file's JSON with `path` set to the raw text `value`. */
function withValue(text: string, path: string[], value: string): string {
  const o = JSON.parse(text) as Json;
  at(o, path)[path[path.length - 1]!] = '__FUZZ__';
  return JSON.stringify(o, null, 1).replace('"__FUZZ__"', value);
}

function corruptions(seed: number, stateText: string): Corruption[] {
  const r = rng(seed);
  const state = join('training_state.json');
  const write = (text: string | Buffer) => (dir: string) => writeFileSync(join(dir, state), text);
  const list: Corruption[] = [
    // the issue's examples
    { name: 'globalStep "abc"', example: true, apply: write(withValue(stateText, ['accumulator', 'globalStep'], '"abc"')), error: STATE_ERROR('accumulator\\.globalStep must be a whole number') },
    { name: 'globalStep 1e9', example: true, apply: write(withValue(stateText, ['accumulator', 'globalStep'], '1e9')), error: STATE_ERROR("accumulator\\.globalStep is 1000000000, more than this run's 3 steps") },
    { name: 'negative data position', example: true, apply: write(withValue(stateText, ['data', 'loader', 'position'], '-2')), error: STATE_ERROR('data\\.loader\\.position must be at least 0') },
    { name: 'extra garbage key', example: true, apply: write(stateText.replace(/\}\s*$/, ', "garbage": [1, 2]}')), error: STATE_ERROR('unexpected key\\(s\\) "garbage"') },
    { name: 'trailing garbage', apply: write(`${stateText}\n}{ garbage`), error: /training state '.*training_state\.json' is not valid JSON: unexpected .* at line \d+ column \d+/ },
    { name: 'not JSON (cut short)', example: true, apply: write(stateText.slice(0, r.int(1, stateText.length - 2))), error: /training state '.*training_state\.json' is not valid JSON: .*line \d+ column \d+/ },
    { name: 'empty file', apply: write(''), error: /training state '.*training_state\.json' is not valid JSON/ },
    { name: 'random bytes', apply: write(Buffer.from(r.bytes(300))), error: /training state '.*training_state\.json' is not valid JSON/ },
    { name: 'an array', apply: write('[1, 2]'), error: /training state '.*training_state\.json' must hold a JSON object, not an array/ },
    { name: 'deeply nested', apply: write(`{"accumulator": ${'['.repeat(100_000)}${']'.repeat(100_000)}}`), error: /training state '.*training_state\.json'/ },
    { name: 'a FIFO', example: true, apply: (d) => { rmSync(join(d, state)); mkfifo(join(d, state)); }, error: /training state '.*training_state\.json' is a FIFO, not a regular file/ },
    { name: 'a directory', apply: (d) => { rmSync(join(d, state)); cpSync(data, join(d, state), { recursive: true }); }, error: /training state '.*training_state\.json' is a directory/ },
    // the tensors
    { name: 'tensors cut short', apply: (d) => truncateSync(join(d, 'training_state.safetensors'), r.int(8, 5000)), error: /training_state\.safetensors/ },
    { name: 'tensors missing', apply: (d) => rmSync(join(d, 'training_state.safetensors')), error: /is not a difflora checkpoint \(expected training_state\.json and training_state\.safetensors\)/ },
    { name: 'NaN in a LoRA weight', apply: (d) => editTensors(d, (k, t) => (k.endsWith('lora_B.weight') ? t.add(Number.NaN) : t)), error: /checkpoint tensors '.*training_state\.safetensors': 'lora\..*lora_B\.weight' holds NaN or infinite values/ },
    { name: 'Inf in an Adam moment', apply: (d) => editTensors(d, (k, t) => (k === 'optimizer.3.exp_avg_sq' ? t.add(Number.POSITIVE_INFINITY) : t)), error: /'optimizer\.3\.exp_avg_sq' holds NaN or infinite values/ },
    { name: 'a LoRA weight of another rank', apply: (d) => editTensors(d, (k, t) => (k.endsWith('.lora_A.weight') ? t.narrow(0, 0, 2) : t)), error: /'lora\..*lora_A\.weight' is float32 \[2, \d+\], expected float32 \[4, \d+\]/ },
    { name: 'metrics.jsonl a FIFO', apply: (d) => { rmSync(join(d, '..', 'metrics.jsonl')); mkfifo(join(d, '..', 'metrics.jsonl')); }, error: /metrics file '.*metrics\.jsonl' is a FIFO/ },
  ];
  // random invalid values in random fields, a missing key and an unknown one somewhere in the tree
  for (let i = 0; i < 8; i++) {
    const [path, kind] = r.pick(FIELDS);
    const value = r.pick(BAD_VALUES[kind]);
    list.push({ name: `${path.join('.')} = ${value}`, apply: write(withValue(stateText, path, value)), error: STATE_ERROR(`\\b${path[path.length - 1]}\\b`) });
  }
  for (let i = 0; i < 2; i++) {
    const [path] = r.pick(FIELDS);
    const example = i === 0; // "a missing key", one of the issue's examples
    const o = JSON.parse(stateText) as Json;
    delete at(o, path)[path[path.length - 1]!];
    list.push({ name: `missing ${path.join('.')}`, example, apply: write(JSON.stringify(o)), error: STATE_ERROR(`is missing '${path[path.length - 1]}'`) });
  }
  return list;
}

/** Rewrites a checkpoint's training_state.safetensors, each tensor through `edit`. */
function editTensors(dir: string, edit: (name: string, t: Tensor) => Tensor): void {
  const file = join(dir, 'training_state.safetensors');
  const { tensors } = loadSafetensors(file);
  tidy(() => saveSafetensors(file, new Map([...tensors].map(([k, t]) => [k, edit(k, t).contiguous()]))));
  dispose([...tensors.values()]);
}

describe('fuzz: difflora train and generate refuse hostile flags and corrupt checkpoints', () => {
  it('0 crash, 0 hang, 0 silent; the output folder unchanged after every refusal', async () => {
    const cases: FuzzCase[] = [];
    const untouched: { dir: string; before: Record<string, string>; cases: string[] }[] = [];

    // the issue's examples, each as a real CLI run into a copy of a finished run
    const flagsOut = copyOfReference('flags-out');
    const fifo = join(tmp, 'fifo');
    mkfifo(fifo);
    const fullDevice = privateFullDevice(join(tmp, 'full-device'));
    const fullLink = join(tmp, 'full-link');
    symlinkSync('/dev/full', fullLink);
    const cli: [string, string[], RegExp][] = [
      ['train --learning_rate=1e309', [...trainBase(flagsOut), '--learning_rate=1e309', '--max_train_steps=1'], /--learning_rate must be a finite number > 0, got Infinity/],
      ['train --max_grad_norm=0', [...trainBase(flagsOut), '--max_grad_norm=0'], /--max_grad_norm must be a finite number > 0, got 0/],
      ['train --max_grad_norm=-1', [...trainBase(flagsOut), '--max_grad_norm', '-1'], /--max_grad_norm must be a finite number > 0, got -1/],
      ['train --dataloader_num_workers=1000000', [...trainBase(flagsOut), '--dataloader_num_workers=1000000'], /--dataloader_num_workers must be at most 64/],
      ['train --rank=100000 (checked against the loaded UNet)', [...trainBase(flagsOut), '--rank=100000', '--max_train_steps=3'], /--rank 100000 is larger than .*Linear 32 → 32.*at most 32/],
      ['train: several bad flags at once', [...trainBase(flagsOut), '--seed=-1', '--resolution=33', '--adam_beta1=1'], /3 problems with the flags:[\s\S]*--resolution[\s\S]*--adam_beta1[\s\S]*--seed/],
      ['train --output_dir=<a FIFO>', trainBase(fifo), /--output_dir '.*fifo' exists and is a FIFO/],
      ['train --output_dir=/dev/null', trainBase('/dev/null'), /--output_dir '\/dev\/null' exists and is a character device/],
      ['generate --guidance_scale=1e309', [...generateBase, '--guidance_scale=1e309', `--output=${join(flagsOut, 'g.png')}`], /--guidance_scale must be a number from 0 to 100 .*got Infinity/],
      ['generate --output=<a device like /dev/full>', [...generateBase, `--output=${fullDevice}`], /--output '.*full-device' (exists and is a character device|is a symbolic link \(to a character device\))/],
      ['generate --output=<a link to /dev/full>', [...generateBase, `--output=${fullLink}`], /--output '.*full-link' is a symbolic link \(to a character device\)/],
      ['generate --output=<a FIFO>', [...generateBase, `--output=${fifo}`], /--output '.*fifo' exists and is a FIFO/],
    ];
    for (const [name, argv, error] of cli) cases.push({ name, cli: argv, error, timeoutMs: 30_000 });

    // every numeric flag with random values outside its domain, many per child
    cases.push(sweepCase('train: random bad values for every numeric flag', sweepInputs(SEED, TRAIN_FLAG_POOLS, trainBase(flagsOut), 3)));
    cases.push(sweepCase('generate: random bad values for every numeric flag', sweepInputs(SEED + 1, GENERATE_FLAG_POOLS, [...generateBase, `--output=${join(flagsOut, 'g.png')}`], 3)));
    cases.push(libraryOptionsCase(flagsOut));
    untouched.push({ dir: flagsOut, before: treeHashes(flagsOut), cases: cases.map((c) => c.name) });

    // a real checkpoint, corrupted per case, resumed from 'latest'
    const stateText = readFileSync(join(reference, 'checkpoint-2', 'training_state.json'), 'utf8');
    const batches: { name: string; argv: string[]; error: RegExp }[][] = [[], []];
    for (const [i, c] of corruptions(SEED + 2, stateText).entries()) {
      const out = copyOfReference(`resume-${i}`);
      c.apply(join(out, 'checkpoint-2'));
      untouched.push({ dir: out, before: treeHashes(out), cases: [c.name] });
      const argv = [...trainBase(out), '--max_train_steps=3', '--resume_from_checkpoint', 'latest'];
      if (c.example) cases.push({ name: `resume: ${c.name}`, cli: argv, error: c.error, timeoutMs: 30_000 });
      else batches[i % 2]!.push({ name: c.name, argv, error: c.error });
    }
    batches.forEach((b, i) => cases.push(resumeSweepCase(`resume: ${b.length} more corruptions (batch ${i + 1})`, b)));

    const started = Date.now();
    const results = await runCases(cases, 2);
    const { counts, failures } = report(results);
    console.log(`fuzz train/generate: ${cases.length} cases in ${((Date.now() - started) / 1000).toFixed(1)} s:`, counts);
    if (process.env.FUZZ_TIMES) for (const r of results) console.log(`${(r.ms / 1000).toFixed(1)} s  ${r.verdict}  ${r.name}`);
    expect(counts.crash + counts.hang + counts.silent, failures).toBe(0);
    expect(counts.clean + counts.accepted).toBe(cases.length);
    for (const u of untouched) expect(treeHashes(u.dir), `${u.cases.join(', ')} changed ${u.dir}`).toEqual(u.before);
  }, 300_000);
});
