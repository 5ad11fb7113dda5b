// The training loop end to end on the tiny pipeline: an imagefolder dataset, LoRA steps, checkpoints,
// pruning, exact resume (bit-for-bit on CPU) and the final diffusers-format file.
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { parquetWriteBuffer } from 'hyparquet-writer';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadSafetensors, readSafetensorsHeader, saveSafetensors } from '../lib/io/safetensors.js';
import { dispose, tidy } from '../lib/scope.js';
import * as torch from '../lib/torch.js';
import { checkTensors, firstNonFinite, parseTrainingState, type ResumingRun } from '../lib/training/checkpoint.js';
import { TrainOptionsError, validateTrainOptions } from '../lib/training/options.js';
import { stepsArithmetic, runTraining, type TrainOptions } from '../lib/training/train.js';
import { trainTextToImageLora } from '../lib/index.js';
import { treeHashes } from './cli_helpers.js';
import { bitEqual, fixtures } from './helpers.js';

let tmp: string;
let data: string;
beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-train-'));
  data = join(tmp, 'data');
  mkdirSync(data);
  const colors = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 200, 50], [20, 120, 220]];
  const lines: string[] = [];
  for (const [i, [r, g, b]] of colors.entries()) {
    await sharp({ create: { width: 40, height: 36, channels: 3, background: { r: r!, g: g!, b: b! } } }).png().toFile(join(data, `${i}.png`));
    lines.push(JSON.stringify({ file_name: `${i}.png`, text: i % 2 ? `a picture number ${i}` : [`a photo ${i}`, `an image ${i}`] }));
  }
  writeFileSync(join(data, 'metadata.jsonl'), lines.join('\n'));
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const base = (outputDir: string): TrainOptions => ({
  pretrainedModelNameOrPath: join(fixtures, 'tiny-sd'), trainDataDir: data, outputDir, resolution: 32, centerCrop: false,
  randomFlip: true, trainBatchSize: 2, gradientAccumulationSteps: 1, maxTrainSteps: 4, learningRate: 1e-3,
  lrScheduler: 'cosine', lrWarmupSteps: 1, seed: 7, checkpointingSteps: 2, device: 'cpu', imageInterpolationMode: 'bilinear',
});

function loraOf(dir: string) {
  const { tensors, metadata } = loadSafetensors(join(dir, 'pytorch_lora_weights.safetensors'));
  return { tensors, metadata };
}

describe('runTraining', () => {
  it('follows the script\'s steps arithmetic', () => {
    expect(stepsArithmetic(3, 1, 100, null)).toEqual({ updateStepsPerEpoch: 3, maxTrainSteps: 300, numTrainEpochs: 100 });
    expect(stepsArithmetic(5, 4, 100, 15000)).toEqual({ updateStepsPerEpoch: 2, maxTrainSteps: 15000, numTrainEpochs: 7500 });
  });

  it('trains, checkpoints, prunes, and a resumed run ends bit-identical to an uninterrupted one', async () => {
    const straight = join(tmp, 'straight');
    const progress: number[] = [];
    const r = await runTraining(base(straight), { onProgress: (p) => progress.push(p.step) });
    expect(progress).toEqual([1, 2, 3, 4]);
    expect(r.globalStep).toBe(4);
    expect(Number.isFinite(r.lastLoss)).toBe(true);
    expect(readdirSync(straight).filter((f) => f.startsWith('checkpoint-')).sort()).toEqual(['checkpoint-2', 'checkpoint-4']);
    // metrics.jsonl: one line per optimizer step; README.md: the model card diffusers writes
    const metrics = readFileSync(join(straight, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { step: number; loss: number; lr: number });
    expect(metrics.map((m) => m.step)).toEqual([1, 2, 3, 4]);
    expect(metrics.every((m) => Number.isFinite(m.loss) && m.lr >= 0)).toBe(true);
    expect(metrics[0]!.lr).toBe(0); // warmup: the first update runs at LR 0, as the script
    const plot = await sharp(join(straight, 'loss.png')).metadata();
    expect([plot.format, plot.width, plot.height]).toEqual(['png', 640, 360]);
    const card = readFileSync(join(straight, 'README.md'), 'utf8');
    expect(card).toContain(`base_model: ${join(fixtures, 'tiny-sd')}`);
    expect(card).toContain('pipe.load_lora_weights');
    const header = readSafetensorsHeader(join(straight, 'pytorch_lora_weights.safetensors'));
    expect(header.metadata).toEqual({ format: 'pt' });
    expect(header.tensors.length).toBe(96);

    // interrupted after the checkpoint at step 2, then resumed from 'latest'
    const broken = join(tmp, 'resumed');
    const abort = new AbortController();
    await expect(runTraining(base(broken), { signal: abort.signal, onProgress: (p) => { if (p.step === 2) abort.abort(); } }))
      .rejects.toThrow(/aborted/);
    expect(existsSync(join(broken, 'checkpoint-2'))).toBe(true);
    expect(existsSync(join(broken, 'pytorch_lora_weights.safetensors'))).toBe(false);
    const steps: number[] = [];
    await runTraining({ ...base(broken), resumeFromCheckpoint: 'latest' }, { onProgress: (p) => steps.push(p.step) });
    expect(steps).toEqual([3, 4]);

    const a = loraOf(straight);
    const b = loraOf(broken);
    expect([...b.tensors.keys()]).toEqual([...a.tensors.keys()]);
    for (const [k, t] of a.tensors) expect(bitEqual(t, b.tensors.get(k)!), k).toBe(true);
    dispose([...a.tensors.values(), ...b.tensors.values()]);
  }, 120_000);

  it('trains on a parquet dataset (--dataset_name), the pokemon-blip-captions layout', async () => {
    const images = await Promise.all([[250, 10, 10], [10, 250, 10]].map(async ([r, g, b]) =>
      new Uint8Array(await sharp({ create: { width: 40, height: 36, channels: 3, background: { r: r!, g: g!, b: b! } } }).png().toBuffer())));
    const dir = join(tmp, 'pq', 'data');
    mkdirSync(dir, { recursive: true });
    const buf = parquetWriteBuffer({
      columnData: [
        { name: 'image', data: images.map((bytes) => ({ bytes, path: null })) },
        { name: 'text', data: ['a red thing', 'a green thing'] },
      ],
      schema: [
        { name: 'root', num_children: 2 },
        { name: 'image', repetition_type: 'OPTIONAL', num_children: 2 },
        { name: 'bytes', type: 'BYTE_ARRAY', repetition_type: 'OPTIONAL' },
        { name: 'path', type: 'BYTE_ARRAY', converted_type: 'UTF8', repetition_type: 'OPTIONAL' },
        { name: 'text', type: 'BYTE_ARRAY', converted_type: 'UTF8', repetition_type: 'OPTIONAL' },
      ],
    });
    writeFileSync(join(dir, 'train-00000-of-00001.parquet'), new Uint8Array(buf));
    const out = join(tmp, 'pq-out');
    const r = await runTraining({ ...base(out), trainDataDir: null, datasetName: join(tmp, 'pq'), maxTrainSteps: 2 });
    expect(r.globalStep).toBe(2);
    expect(existsSync(join(out, 'pytorch_lora_weights.safetensors'))).toBe(true);
  }, 120_000);

  it('keeps at most --checkpoints_total_limit checkpoints', async () => {
    const out = join(tmp, 'limited');
    await runTraining({ ...base(out), maxTrainSteps: 3, checkpointingSteps: 1, checkpointsTotalLimit: 2 });
    expect(readdirSync(out).filter((f) => f.startsWith('checkpoint-')).sort()).toEqual(['checkpoint-2', 'checkpoint-3']);
  }, 120_000);

  it('stops on a non-finite loss with the step named, keeping the last checkpoint and writing no result', async () => {
    const out = join(tmp, 'diverged');
    // an absurd learning rate makes the LoRA weights explode after the first update
    await expect(runTraining({ ...base(out), learningRate: 1e30, lrScheduler: 'constant', maxGradNorm: null, checkpointingSteps: 1 }))
      .rejects.toThrow(/loss is (NaN|Infinity) at step \d+ .*the last checkpoint is .*checkpoint-\d+/);
    expect(existsSync(join(out, 'checkpoint-1'))).toBe(true);
    expect(existsSync(join(out, 'pytorch_lora_weights.safetensors'))).toBe(false);
  }, 120_000);

  it('refuses what it cannot do with clear errors', async () => {
    await expect(runTraining({ ...base(join(tmp, 'x')), mixedPrecision: 'fp16' })).rejects.toThrow(/fp16 needs a CUDA GPU/);
    await expect(runTraining({ ...base(join(tmp, 'y')), trainDataDir: null, datasetName: 'lambdalabs/pokemon', cacheDir: join(tmp, 'empty-cache') }))
      .rejects.toThrow(/lambdalabs\/pokemon[\s\S]*huggingface-cli download --repo-type dataset/);
    await expect(runTraining({ ...base(join(tmp, 'z')), pretrainedModelNameOrPath: join(tmp, 'nope') })).rejects.toThrow(/nope/);
  });
});

describe('runTraining refuses bad input before it changes anything', () => {
  it('options outside their domain: every problem at once, naming the option and the value, nothing created', async () => {
    const out = join(tmp, 'bad-options');
    const bad = { ...base(out), learningRate: 1e309, maxGradNorm: -1, adamBeta2: 1, resolution: 30, dataloaderNumWorkers: 1_000_000, seed: 1.5, outputDir: out };
    const err = await runTraining(bad).then(() => undefined, (e: unknown) => e);
    expect(err).toBeInstanceOf(TrainOptionsError);
    const message = (err as Error).message;
    expect(message).toMatch(/^6 problems with the training options:/);
    expect(message).toContain('learningRate (--learning_rate) must be a finite number > 0, got Infinity');
    expect(message).toContain('maxGradNorm (--max_grad_norm) must be a finite number > 0, got -1');
    expect(message).toContain('adamBeta2 (--adam_beta2) must be a number in [0, 1), got 1');
    expect(message).toContain('resolution (--resolution) must be a multiple of 8');
    expect(message).toMatch(/dataloaderNumWorkers \(--dataloader_num_workers\) must be at most 64 .*got 1000000/);
    expect(message).toContain('seed (--seed) must be a whole number, got 1.5');
    expect(existsSync(out)).toBe(false);
    // wrong types (a JSON config with a null or a string) are named too, not a TypeError from deep inside
    expect(() => validateTrainOptions({ ...base(out), outputDir: null, rank: '4', maxGradNorm: 0 }))
      .toThrow(/rank \(--rank\) must be a whole number, got "4"[\s\S]*maxGradNorm \(--max_grad_norm\) must be a finite number > 0, got 0[\s\S]*outputDir \(--output_dir\) must not be null/);
    // finite as a double but not as a float32: the optimizer's arithmetic would overflow
    expect(() => validateTrainOptions({ ...base(out), learningRate: 1e39 })).toThrow(/learningRate \(--learning_rate\) must be at most 3\.4028234663852886e\+38 \(training computes in float32\), got 1e\+39/);
    expect(() => validateTrainOptions(null)).toThrow(/must be an object, got null/);
    expect(() => validateTrainOptions({ outputDir: out })).toThrow(/pretrainedModelNameOrPath \(--pretrained_model_name_or_path\) is required[\s\S]*need either datasetName/);
    expect(() => validateTrainOptions({ ...base(out), lrScheduler: 'polynomial', learningRate: 1e-8 })).toThrow(/above 1e-7/);
    expect(() => validateTrainOptions(base(out))).not.toThrow();
    // the public handle throws at the call, before any run starts
    expect(() => trainTextToImageLora({ ...base(out), learningRate: Number.NaN })).toThrow(TrainOptionsError);
    expect(() => trainTextToImageLora({ ...base(out), learningRate: Number.NaN })).toThrow('learningRate (--learning_rate) must be a finite number > 0, got NaN');
    expect(existsSync(out)).toBe(false);
  });

  it('unknown option names (a flag spelled snake_case, another library\'s name) and options that cannot act are refused, all at once', () => {
    const out = join(tmp, 'unknown-options');
    const bad = { ...base(out), learning_rate: 1e-3, torchDtype: 'float16', maxTrainStep: 3, pushToHub: true, reportTo: 'wandb' };
    const message = (() => { try { validateTrainOptions(bad); return ''; } catch (e) { return (e as Error).message; } })();
    expect(message).toMatch(/unknown option 'learning_rate' \(did you mean 'learningRate'\?\)/);
    expect(message).toMatch(/unknown option 'torchDtype'/);
    expect(message).toMatch(/unknown option 'maxTrainStep' \(did you mean 'maxTrainSteps'\?\)/); // a typo: the one option within 2 edits
    expect(message).toMatch(/pushToHub: cannot push to the Hugging Face Hub: difflora runs offline/);
    expect(message).toMatch(/reportTo \(--report_to\)/);
    expect(() => trainTextToImageLora(bad as never)).toThrow(TrainOptionsError);
    expect(() => validateTrainOptions({ ...base(out), pushToHub: false })).not.toThrow(); // off is fine
    expect(existsSync(out)).toBe(false);
    // a typo of the features' options too; a name near none (or near several) gets no guess
    const typos = (() => { try { validateTrainOptions({ ...base(out), loraTyp: 'dora', useEmaa: true, zzzzzz: 1 }); return ''; } catch (e) { return (e as Error).message; } })();
    expect(typos).toMatch(/unknown option 'loraTyp' \(did you mean 'loraType'\?\)/);
    expect(typos).toMatch(/unknown option 'useEmaa' \(did you mean 'useEma'\?\)/);
    expect(typos).toMatch(/unknown option 'zzzzzz'$|unknown option 'zzzzzz'\n/m);
  });

  it('--rank larger than the smallest adapted layer: named with the layer size; the new output folder is removed again', async () => {
    const out = join(tmp, 'rank', 'deep', 'out');
    await expect(runTraining({ ...base(out), rank: 100_000 }))
      .rejects.toThrow(/--rank 100000 is larger than the smallest layer LoRA adapts, .*to_\w+ \(Linear 32 → 32\): --rank must be at most 32/);
    expect(existsSync(join(tmp, 'rank'))).toBe(false); // every folder the run created is gone
    // a model that is not there: the same, no empty folder left
    await expect(runTraining({ ...base(join(tmp, 'nomodel')), pretrainedModelNameOrPath: join(tmp, 'nope') })).rejects.toThrow(/nope/);
    expect(existsSync(join(tmp, 'nomodel'))).toBe(false);
  });

  it('--output_dir that is a file or a device: named, nothing touched', async () => {
    const file = join(tmp, 'out-is-a-file');
    writeFileSync(file, 'keep');
    await expect(runTraining(base(file))).rejects.toThrow(`--output_dir '${file}' exists and is a regular file, not a directory`);
    expect(readFileSync(file, 'utf8')).toBe('keep');
    await expect(runTraining(base('/dev/null'))).rejects.toThrow(/--output_dir '\/dev\/null' exists and is a character device/);
  });

  it('never saves a non-finite LoRA weight: a diverged update with a finite loss stops at the save, naming the step', async () => {
    // the largest float32 learning rate with full weight decay and no momentum turns the weights infinite in
    // the first update (every setting within its domain); the loss of that step was finite
    const diverging = { learningRate: 3.4e38, adamWeightDecay: 1, adamBeta1: 0, lrScheduler: 'constant' };
    const out = join(tmp, 'inf-weights');
    await expect(runTraining({ ...base(out), ...diverging, maxTrainSteps: 1, checkpointingSteps: 1 }))
      .rejects.toThrow(/LoRA weight '.*lora_[AB]\.weight' is NaN or infinite after step 1 \(epoch 0\).*nothing more was saved/);
    expect(readdirSync(out).filter((f) => f.startsWith('checkpoint-'))).toEqual([]);
    expect(existsSync(join(out, 'pytorch_lora_weights.safetensors'))).toBe(false);
    // after a good checkpoint: resumed with the same absurd rate, the good checkpoint and result are kept as they were
    const good = join(tmp, 'inf-after-good');
    await runTraining({ ...base(good), maxTrainSteps: 2, checkpointingSteps: 2 });
    const before = treeHashes(join(good, 'checkpoint-2'));
    const result = readFileSync(join(good, 'pytorch_lora_weights.safetensors'));
    await expect(runTraining({ ...base(good), ...diverging, maxTrainSteps: 3, checkpointingSteps: 2, resumeFromCheckpoint: 'latest' }))
      .rejects.toThrow(/is NaN or infinite after step 3 \(epoch 0\).*nothing more was saved; the last checkpoint is .*checkpoint-2/);
    expect(treeHashes(join(good, 'checkpoint-2'))).toEqual(before);
    expect(readFileSync(join(good, 'pytorch_lora_weights.safetensors')).equals(result)).toBe(true);
  }, 120_000);

  it('a fresh run moves an earlier metrics.jsonl aside (and says so); a resumed run keeps the steps before its checkpoint', async () => {
    const out = join(tmp, 'metrics-fresh');
    await runTraining({ ...base(out), maxTrainSteps: 2, checkpointingSteps: 1 });
    const first = readFileSync(join(out, 'metrics.jsonl'), 'utf8');
    const notices: string[] = [];
    await runTraining({ ...base(out), maxTrainSteps: 2, checkpointingSteps: 1 }, { onNotice: (m) => notices.push(m) });
    const steps = (f: string) => readFileSync(f, 'utf8').trim().split('\n').map((l) => (JSON.parse(l) as { step: number }).step);
    expect(steps(join(out, 'metrics.jsonl'))).toEqual([1, 2]); // not 1, 2, 1, 2
    const aside = readdirSync(out).filter((f) => /^metrics\.jsonl\..+\.bak$/.test(f));
    expect(aside).toHaveLength(1);
    expect(readFileSync(join(out, aside[0]!), 'utf8')).toBe(first);
    expect(notices).toEqual([expect.stringMatching(/metrics\.jsonl held an earlier run's steps: moved to .*\.bak/)]);
    // resumed from checkpoint-1 with a longer run: step 1 kept, 2 redone, 3 added
    await runTraining({ ...base(out), maxTrainSteps: 3, checkpointingSteps: 1, resumeFromCheckpoint: join(out, 'checkpoint-1') });
    expect(steps(join(out, 'metrics.jsonl'))).toEqual([1, 2, 3]);
  }, 120_000);
});

describe('checkpoint state (training_state.json and its tensors)', () => {
  const file = '/x/checkpoint-2/training_state.json';
  const run: ResumingRun = { maxTrainSteps: 4, numTrainEpochs: 2, accumulationSteps: 1, numParams: 2, datasetLength: 5 };
  const good = () => ({
    accumulator: { globalStep: 2, lrStep: 2, microStep: 0 },
    optimizer: { steps: [2, 2], lr: 1e-3, betas: [0.9, 0.999], eps: 1e-8, weightDecay: 0.01 },
    scaler: null,
    data: { epoch: 0, loader: { epoch: 0, position: 4, seed: 7 } },
    epoch: 0,
  });

  it('parses a saved state into a typed TrainingState', () => {
    expect(parseTrainingState(good(), file, run)).toEqual(good());
  });

  it('refuses each corruption naming the file and the field', () => {
    const cases: [(s: ReturnType<typeof good>) => unknown, RegExp][] = [
      [(s) => { (s.accumulator as Record<string, unknown>).globalStep = 'abc'; return s; }, /accumulator\.globalStep must be a whole number, got "abc"/],
      [(s) => { s.accumulator.globalStep = 1e9; return s; }, /accumulator\.globalStep is 1000000000, more than this run's 4 steps/],
      [(s) => { s.accumulator.globalStep = -1; return s; }, /accumulator\.globalStep must be at least 0, got -1/],
      [(s) => { s.accumulator.lrStep = 3; return s; }, /accumulator\.lrStep is 3, more than accumulator\.globalStep \(2\)/],
      [(s) => { s.accumulator.microStep = 1; return s; }, /accumulator\.microStep is 1, more than --gradient_accumulation_steps − 1 \(0\)/],
      [(s) => { delete (s.optimizer as Partial<typeof s.optimizer>).lr; return s; }, /optimizer is missing 'lr'/],
      [(s) => { s.optimizer.steps = [2]; return s; }, /optimizer\.steps has 1 entries, expected 2/],
      [(s) => { s.optimizer.steps = [2, 3]; return s; }, /optimizer\.steps\[1\] is 3, more than accumulator\.globalStep/],
      [(s) => { s.optimizer.lr = Number.NaN; return s; }, /optimizer\.lr must be a finite number ≥ 0, got NaN/],
      [(s) => { s.optimizer.betas = [0.9, 1]; return s; }, /optimizer\.betas\[1\] must be in \[0, 1\), got 1/],
      [(s) => { s.data.loader.position = -1; return s; }, /data\.loader\.position must be at least 0, got -1/],
      [(s) => { s.data.loader.position = 6; return s; }, /data\.loader\.position is 6, more than the 5 items of the dataset/],
      [(s) => { s.data.loader.epoch = 2; return s; }, /data\.loader\.epoch is 2, more than data\.epoch \+ 1/],
      [(s) => { s.epoch = 1; return s; }, /epoch is 1 but data\.epoch is 0/],
      [(s) => { s.epoch = 2; s.data.epoch = 2; s.data.loader.epoch = 2; return s; }, /epoch is 2, not within this run's 2 epochs/],
      [(s) => ({ ...s, junk: true }), /the state has unexpected key\(s\) "junk"/],
      [(s) => ({ ...s, scaler: { scale: 0 } }), /scaler is missing 'growthTracker'/],
      [(s) => ({ ...s, scaler: { scale: -1, growthTracker: 0, growthFactor: 2, backoffFactor: 0.5, growthInterval: 2000 } }), /scaler\.scale must be a finite number > 0, got -1/],
      [() => [], /the state must be an object, got an array/],
      [(s) => ({ ...s, data: null }), /data must be an object, got null/],
    ];
    for (const [corrupt, message] of cases) {
      const state = corrupt(good());
      expect(() => parseTrainingState(state, file, run), message.source).toThrow(message);
      expect(() => parseTrainingState(state, file, run)).toThrow(`training state '${file}': `);
    }
  });

  it('checks the tensors: missing, wrong shape or dtype, and NaN values are named', () => {
    tidy(() => {
      const ok = torch.zeros([2, 3]);
      const nan = torch.tensor([0, Number.NaN, 1], { shape: [3] });
      const tensors = new Map([['a', ok], ['b', nan]]);
      const f = '/x/training_state.safetensors';
      expect(() => checkTensors(tensors, [{ name: 'a', shape: [2, 3], dtype: 'float32', finite: true }], f)).not.toThrow();
      expect(() => checkTensors(tensors, [{ name: 'c', shape: [1], dtype: 'float32' }], f)).toThrow(`checkpoint tensors '${f}': 'c' is missing`);
      expect(() => checkTensors(tensors, [{ name: 'a', shape: [3, 2], dtype: 'float32' }], f)).toThrow("'a' is float32 [2, 3], expected float32 [3, 2]");
      expect(() => checkTensors(tensors, [{ name: 'a', shape: [2, 3], dtype: 'float32', finite: true }, { name: 'b', shape: [3], dtype: 'float32', finite: true }], f))
        .toThrow("'b' holds NaN or infinite values");
      expect(firstNonFinite([['a', ok], ['b', nan]])).toBe('b');
      expect(firstNonFinite([['a', ok]])).toBeUndefined();
    });
  });

  it('a resume from a corrupt checkpoint is refused before anything changes: the output folder is byte-identical', async () => {
    const src = join(tmp, 'resume-src');
    await runTraining({ ...base(src), maxTrainSteps: 2, checkpointingSteps: 2 });
    const corruptions: [string, (dir: string) => void, RegExp][] = [
      ['globalStep "abc"', (d) => editState(d, (s) => { s.accumulator.globalStep = 'abc'; }), /training_state\.json': accumulator\.globalStep must be a whole number, got "abc"/],
      ['not JSON', (d) => writeFileSync(join(d, 'training_state.json'), '{"accumulator": {'), /training_state\.json' is not valid JSON: .*line 1 column/],
      ['NaN LoRA weights', (d) => editTensors(d, (k, t) => (k.startsWith('lora.') ? t.mul(Number.NaN) : t)), /training_state\.safetensors': 'lora\..*' holds NaN or infinite values/],
      ['a moment of the wrong shape', (d) => editTensors(d, (k, t) => (k === 'optimizer.0.exp_avg' ? t.flatten() : t)), /'optimizer\.0\.exp_avg' is float32 \[\d+\], expected float32 \[\d+, \d+\]/],
      ['no generator state', (d) => editTensors(d, (k, t) => (k === 'rng.0' ? null : t)), /'rng\.0' is missing/],
    ];
    for (const [name, corrupt, message] of corruptions) {
      const out = join(tmp, `resume-${name.replace(/\W+/g, '-')}`);
      cpSync(src, out, { recursive: true });
      corrupt(join(out, 'checkpoint-2'));
      const before = treeHashes(out);
      await expect(runTraining({ ...base(out), maxTrainSteps: 3, resumeFromCheckpoint: 'latest' }), name).rejects.toThrow(message);
      expect(treeHashes(out), name).toEqual(before);
    }
  }, 120_000);
});

/** Rewrites a checkpoint's training_state.json through `edit`. */
function editState(dir: string, edit: (s: { accumulator: Record<string, unknown> }) => void): void {
  const file = join(dir, 'training_state.json');
  const s = JSON.parse(readFileSync(file, 'utf8')) as { accumulator: Record<string, unknown> };
  edit(s);
  writeFileSync(file, JSON.stringify(s));
}

/** Rewrites a checkpoint's training_state.safetensors, each tensor through `edit` (null drops it). */
function editTensors(dir: string, edit: (name: string, t: ReturnType<typeof torch.zeros>) => ReturnType<typeof torch.zeros> | null): void {
  const file = join(dir, 'training_state.safetensors');
  const { tensors } = loadSafetensors(file);
  tidy(() => {
    const out = new Map<string, ReturnType<typeof torch.zeros>>();
    for (const [k, t] of tensors) {
      const e = edit(k, t);
      if (e) out.set(k, e.contiguous());
    }
    saveSafetensors(file, out);
  });
  dispose([...tensors.values()]);
}
