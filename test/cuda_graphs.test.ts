// --cuda_graphs (issue #15), what can be checked without a GPU: the device-side optimizer step (no host sync) equals
// the host-side one bit for bit, overflow skips and loss-scale changes included; the capture driver, run with a stand-in
// graph that reruns the recorded step on each replay, trains what the eager loop trains, bit for bit (train,
// train-dreambooth, train-sdxl; warm-up, capture, replays, a smaller last batch run eagerly, a failed capture,
// checkpoints and resume); the fallbacks say why; the graphed pipeline; the CLI flags. The real capture is checked on a
// GPU by bench/gpu/graphs.mjs.
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseGenerateArgs } from '../lib/cli/generate.js';
import { parseTrainArgs } from '../lib/cli/train_args.js';
import { CudaGraph, graphFactory, type StepGraph } from '../lib/cuda_graph.js';
import { StableDiffusionPipeline } from '../lib/pipelines/stable_diffusion.js';
import { cudaIsAvailable } from '../lib/device.js';
import { AdamW } from '../lib/optim/adamw.js';
import { DeviceOptimizerStep } from '../lib/optim/device_step.js';
import { GradScaler } from '../lib/optim/grad_scaler.js';
import { Generator } from '../lib/random.js';
import { dispose, memory, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import { loadSafetensors } from '../lib/io/safetensors.js';
import * as torch from '../lib/torch.js';
import { GraphedTrainStep } from '../lib/training/graphed_step.js';
import { Accumulator } from '../lib/training/step.js';
import { runTraining, type TrainOptions } from '../lib/training/train.js';
import { runSdxlTraining } from '../lib/training/train_sdxl.js';
import { runDreamBoothTraining } from '../lib/training/train_dreambooth.js';
import { fixtures, makeImageFolder } from './helpers.js';

/** Replays by running the recorded function again: on the CPU this computes what a CUDA graph's replay would. */
class RerunGraph implements StepGraph {
  runs = 0;
  captures = 0;
  replays = 0;
  private fn: (() => void) | null = null;
  constructor(private readonly failCapture = false) {}
  run<T>(fn: () => T): T { this.runs += 1; return fn(); }
  capture(fn: () => void): void {
    this.captures += 1;
    if (this.failCapture) throw new Error('operation not permitted when stream is capturing');
    this.fn = fn;
  }
  replay(): void { this.replays += 1; this.fn!(); }
  dispose(): void { this.fn = null; }
}

const relErr = (a: Float64Array, b: Float64Array) => {
  let num = 0, den = 0;
  for (let i = 0; i < a.length; i++) { num += (a[i]! - b[i]!) ** 2; den += b[i]! ** 2; }
  return Math.sqrt(num / Math.max(den, 1e-30));
};

describe('the device-side optimizer step', () => {
  /** Ten steps of random gradients (one overflowing) through the host path or the device path. */
  function steps(onDevice: boolean, scaled: boolean) {
    const g = new Generator('cpu');
    g.manualSeed(3);
    const params = [torch.randn([6, 5], { generator: g }), torch.randn([5], { generator: g }), torch.randn([3, 4, 2], { generator: g })];
    const optimizer = new AdamW(params, { lr: 1e-2, weightDecay: 0.05 });
    const scaler = scaled ? new GradScaler({ initScale: 2 ** 10, growthInterval: 3 }) : null;
    const accumulator = new Accumulator({ optimizer, params, scaler, maxGradNorm: 0.7, lrScheduler: 'cosine', lrOptions: { baseLr: 1e-2, warmupSteps: 3, totalSteps: 10 } });
    const device = onDevice ? new DeviceOptimizerStep({ optimizer, params, scaler, maxGradNorm: 0.7, device: 'cpu' }) : null;
    const log: { gradNorm: number | null; stepped: boolean; lr: number }[] = [];
    for (let i = 0; i < 10; i++) {
      params.forEach((p) => {
        const grad = torch.randn(p.shape, { generator: g }).mul(scaler ? scaler.scale : 1);
        if (scaled && i === 4 && p === params[1]) grad.narrow(0, 2, 1).fill_(Infinity);
        p.grad = grad;
        grad.dispose();
      });
      if (device) {
        device.setLr(optimizer.lr);
        device.enqueue();
        const r = device.commit();
        params.forEach((p) => { p.grad = null; });
        log.push(accumulator.recordDeviceStep(r));
      } else {
        log.push(accumulator.afterBackward()!);
      }
    }
    const out = { values: params.map((p) => p.toFloat64Array()), log, state: { ...accumulator.state }, scaler: scaler?.stateDict(), steps: optimizer.stateDict().meta.steps };
    device?.dispose();
    optimizer.dispose();
    dispose(params);
    return out;
  }

  for (const scaled of [false, true]) {
    it(`equals the host-side step bit for bit over 10 steps (clipping, cosine schedule${scaled ? ', a GradScaler with an overflow and growth' : ''})`, () => {
      const host = steps(false, scaled);
      const device = steps(true, scaled);
      host.values.forEach((v, i) => expect(device.values[i]).toEqual(v)); // on the CPU the same bits (addcdiv's order)
      expect(device.state).toEqual(host.state);
      expect(device.steps).toEqual(host.steps);
      expect(device.scaler).toEqual(host.scaler);
      expect(device.log.map((l) => l.stepped)).toEqual(host.log.map((l) => l.stepped));
      expect(device.log.map((l) => l.lr)).toEqual(host.log.map((l) => l.lr));
      expect(device.log.map((l) => l.gradNorm)).toEqual(host.log.map((l) => l.gradNorm));
      if (scaled) {
        expect(host.log[4]!.stepped).toBe(false); // the overflow skipped step 5 on both
        expect(host.scaler!.scale).not.toBe(2 ** 10); // and the scale moved (backoff, then growth)
      }
    });
  }

  it('refuses another optimizer and a parameter without a gradient', () => {
    const p = torch.zeros([2]);
    const optimizer = new AdamW([p]);
    expect(() => new DeviceOptimizerStep({ optimizer: { ...optimizer, kind: 'lion' } as unknown as AdamW, device: 'cpu' })).toThrow(/AdamW only, not lion/);
    const d = new DeviceOptimizerStep({ optimizer, device: 'cpu' });
    expect(() => d.setLr(Infinity)).toThrow(/learning rate must be a finite number ≥ 0, got Infinity/);
    expect(() => d.enqueue()).toThrow(/needs a gradient for every parameter \(0 of 1\)/);
    d.dispose();
    optimizer.dispose();
    p.dispose();
  });
});

let tmp: string;
let data: string;
beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-graphs-'));
  data = join(tmp, 'data');
  await makeImageFolder(data, 5);
});
afterAll(() => { if (!process.env.KEEP_TMP) rmSync(tmp, { recursive: true, force: true }); else console.log(tmp); });

describe('GraphedTrainStep: each step launched before the last is read', () => {
  /**
   * Ten steps of a toy loss (x·p)² with a GradScaler, clipping and a cosine schedule; step 5's batch overflows. `mode`:
   * the host-side step (accumulator.afterBackward), the driver one step at a time (run), or pipelined (launch, settle).
   */
  function train(mode: 'host' | 'run' | 'pipelined') {
    const g = new Generator('cpu');
    g.manualSeed(11);
    const params = [torch.randn([4], { generator: g }).requiresGrad_(), torch.randn([3], { generator: g }).requiresGrad_()];
    const optimizer = new AdamW(params, { lr: 1e-2, weightDecay: 0.05 });
    const scaler = new GradScaler({ initScale: 2 ** 8, growthInterval: 3 });
    const accumulator = new Accumulator({ optimizer, params, scaler, maxGradNorm: 0.5, lrScheduler: 'cosine', lrOptions: { baseLr: 1e-2, warmupSteps: 2, totalSteps: 10 } });
    const batches = Array.from({ length: 10 }, (_, i) => ({ i, x: torch.randn([7], { generator: g }).mul(i === 4 ? Infinity : 1) }));
    const loss = (x: Tensor) => { const [a, b] = params as [Tensor, Tensor]; return torch.cat([a, b]).mul(x).sum().square(); };
    const order: string[] = [];
    const out: { loss: number; lr: number; stepped: boolean; gradNorm: number | null }[] = [];
    if (mode === 'host') {
      for (const b of batches) {
        const l = tidy(() => { const v = loss(b.x); scaler.scaleLoss(v).backward(); return v.item(); });
        const r = accumulator.afterBackward()!;
        out.push({ loss: l, lr: r.lr, stepped: r.stepped, gradNorm: r.gradNorm });
      }
    } else {
      const driver = new GraphedTrainStep<(typeof batches)[number]>({
        inputs: (b) => { order.push(`inputs ${b.i}`); return { x: b.x.clone() }; },
        lossAndBackward: (t, lossScale) => { const v = loss(t.x!); v.mul(lossScale!).backward(); return v; },
        onLoss: (_, b) => order.push(`read ${b.i}`),
      }, { device: 'cpu', params, optimizer, scaler, maxGradNorm: 0.5, accumulator, warmupSteps: 2, makeGraph: () => new RerunGraph() });
      const push = (r: { loss: number; outcome: { lr: number; stepped: boolean; gradNorm: number | null } } | null) => {
        if (r) out.push({ loss: r.loss, lr: r.outcome.lr, stepped: r.outcome.stepped, gradNorm: r.outcome.gradNorm });
      };
      for (const b of batches) push(mode === 'run' ? driver.run(b) : driver.launch(b));
      push(driver.settle());
      expect(driver.settle()).toBeNull();
      driver.dispose();
    }
    const result = { values: params.map((p) => p.toFloat64Array()), out, order, state: { ...accumulator.state }, scaler: scaler.stateDict() };
    optimizer.dispose();
    dispose([...params, ...batches.map((b) => b.x)]);
    return result;
  }

  it('trains what the host-side step trains, bit for bit, with the skipped step and its learning rate; batch k+1 is prepared before step k is read', () => {
    const host = train('host');
    expect(host.out[4]!.stepped).toBe(false); // the overflow skipped step 5: the schedule does not advance for it
    expect(host.out[5]!.lr).toBe(host.out[4]!.lr);
    for (const mode of ['run', 'pipelined'] as const) {
      const r = train(mode);
      r.values.forEach((v, i) => expect(v, mode).toEqual(host.values[i]));
      expect(r.out, mode).toEqual(host.out);
      expect(r.state, mode).toEqual(host.state);
      expect(r.scaler, mode).toEqual(host.scaler);
    }
    expect(train('run').order.slice(0, 4)).toEqual(['inputs 0', 'read 0', 'inputs 1', 'read 1']);
    const pipelined = train('pipelined').order;
    expect(pipelined.slice(0, 5)).toEqual(['inputs 0', 'inputs 1', 'read 0', 'inputs 2', 'read 1']);
    expect(pipelined.at(-1)).toBe('read 9');
  });

  it('run() refuses while a launched step is unread', () => {
    const p = torch.zeros([2]).requiresGrad_();
    const optimizer = new AdamW([p]);
    const accumulator = new Accumulator({ optimizer, params: [p], scaler: null, maxGradNorm: null, lrScheduler: 'constant', lrOptions: { baseLr: 1e-3, warmupSteps: 0, totalSteps: 2 } });
    const driver = new GraphedTrainStep<number>({
      inputs: (v) => ({ x: torch.full([2], v) }),
      lossAndBackward: (t) => { const l = p.mul(t.x!).sum(); l.backward(); return l; },
    }, { device: 'cpu', params: [p], optimizer, scaler: null, maxGradNorm: null, accumulator, makeGraph: () => new RerunGraph() });
    expect(driver.launch(1)).toBeNull();
    expect(() => driver.run(2)).toThrow(/still in flight \(settle\(\) it first\)/);
    expect(driver.settle()!.outcome.stepped).toBe(true);
    driver.dispose();
    optimizer.dispose();
    p.dispose();
  });
});

const lossesOf = (dir: string) => readFileSync(join(dir, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { loss: number; grad_norm: number; lr: number; step: number });
const loraOf = (dir: string) => {
  const { tensors } = loadSafetensors(join(dir, 'pytorch_lora_weights.safetensors'));
  const out = new Map([...tensors].map(([k, t]) => [k, t.toFloat64Array()]));
  dispose([...tensors.values()]);
  return out;
};
const expectSameRun = (dir: string, reference: string, tol: number) => {
  const a = lossesOf(dir), b = lossesOf(reference);
  expect(a.map((l) => l.step)).toEqual(b.map((l) => l.step));
  a.forEach((l, i) => {
    expect(Math.abs(l.loss - b[i]!.loss)).toBeLessThanOrEqual(tol * Math.abs(b[i]!.loss));
    expect(l.lr).toBe(b[i]!.lr);
  });
  const la = loraOf(dir), lb = loraOf(reference);
  expect([...la.keys()].sort()).toEqual([...lb.keys()].sort());
  for (const [k, v] of lb) expect(relErr(la.get(k)!, v), k).toBeLessThanOrEqual(tol);
};

// 5 images, batch 2: 3 batches an epoch, the last of 1 image (another shape: it runs eagerly); 8 steps = 3 epochs
const sd = (outputDir: string, more: Partial<TrainOptions> = {}): TrainOptions => ({
  pretrainedModelNameOrPath: join(fixtures, 'tiny-sd'), trainDataDir: data, outputDir, resolution: 32, centerCrop: true, randomFlip: true,
  trainBatchSize: 2, maxTrainSteps: 8, learningRate: 1e-3, lrScheduler: 'cosine', lrWarmupSteps: 2, maxGradNorm: 1, seed: 5,
  checkpointingSteps: null, device: 'cpu', reportTo: null, ...more,
});

describe('--cuda_graphs, the capture driver with a stand-in graph', () => {
  let eager: string;
  beforeAll(async () => {
    eager = join(tmp, 'eager');
    await runTraining(sd(eager));
  });

  it('trains what the eager loop trains, bit for bit on the CPU: 3 warm-up steps, one capture, replays; the smaller last batches eagerly', async () => {
    const out = join(tmp, 'graphed');
    const graphs: RerunGraph[] = [];
    const notices: string[] = [];
    const live = memory().numTensors;
    await runTraining(sd(out, { cudaGraphs: true }), { makeGraph: () => { const g = new RerunGraph(); graphs.push(g); return g; }, onNotice: (m) => notices.push(m) });
    expect(memory().numTensors).toBe(live); // static inputs, gradients, report and device state all freed
    expectSameRun(out, eager, 0);
    expect(graphs).toHaveLength(1);
    // steps 1, 2 full; 3 the 1-image batch; 4, 5 full; 6 small; 7, 8 full → 6 full-batch steps: 3 warm-ups, 1 capture + replay, 2 replays
    expect({ runs: graphs[0]!.runs, captures: graphs[0]!.captures, replays: graphs[0]!.replays }).toEqual({ runs: 3, captures: 1, replays: 3 });
    expect(notices).toContain('CUDA graphs: the training step is recorded after 3 warm-up steps and replayed');
    expect(notices.filter((m) => m.includes('such batches run eagerly'))).toHaveLength(1);
    expect(notices.find((m) => m.includes('such batches run eagerly'))).toMatch(/pixelValues:float32\[1×3×32×32\].*differs from the captured .*pixelValues:float32\[2×3×32×32\]/);
  });

  it('a failed capture says why once and the run goes on eagerly, to the same result bit for bit', async () => {
    const out = join(tmp, 'failed-capture');
    const notices: string[] = [];
    await runTraining(sd(out, { cudaGraphs: true }), { makeGraph: () => new RerunGraph(true), onNotice: (m) => notices.push(m) });
    expectSameRun(out, eager, 0);
    expect(notices.filter((m) => m.includes('could not be captured'))).toEqual(['CUDA graphs: the step could not be captured (operation not permitted when stream is capturing); the steps run eagerly']);
  });

  it('checkpoints and resume: stopped at step 4 and resumed, it ends where the uninterrupted graphed run ends, bit for bit', async () => {
    const whole = join(tmp, 'graphed-whole');
    const stopped = join(tmp, 'graphed-resumed');
    const hooks = { makeGraph: () => new RerunGraph() };
    await runTraining(sd(whole, { cudaGraphs: true, checkpointingSteps: 4 }), hooks);
    const stop = new AbortController(); // stopped after step 4's checkpoint, as a killed run
    await expect(runTraining(sd(stopped, { cudaGraphs: true, checkpointingSteps: 4 }), { ...hooks, signal: stop.signal, onProgress: (p) => { if (p.step === 4) stop.abort(); } }))
      .rejects.toThrow(/training aborted/);
    await runTraining(sd(stopped, { cudaGraphs: true, checkpointingSteps: 4, resumeFromCheckpoint: 'latest' }), hooks);
    expect(readFileSync(join(stopped, 'pytorch_lora_weights.safetensors')).equals(readFileSync(join(whole, 'pytorch_lora_weights.safetensors')))).toBe(true);
    expect(lossesOf(stopped).map((l) => l.loss)).toEqual(lossesOf(whole).map((l) => l.loss));
  });

  it('train-dreambooth: with prior preservation and the text encoder trained, it trains what the eager loop trains', async () => {
    const classes = join(tmp, 'classes');
    mkdirSync(classes);
    for (let i = 0; i < 2; i++) await sharp({ create: { width: 36, height: 40, channels: 3, background: { r: 90 * i, g: 30, b: 200 } } }).png().toFile(join(classes, `c${i}.png`));
    const base = {
      pretrainedModelNameOrPath: join(fixtures, 'tiny-sd'), instanceDataDir: data, instancePrompt: 'a photo of sks thing', resolution: 32, centerCrop: true,
      withPriorPreservation: true, classDataDir: classes, classPrompt: 'a photo of a thing', numClassImages: 2, trainTextEncoder: true,
      trainBatchSize: 2, maxTrainSteps: 7, learningRate: 1e-3, seed: 3, checkpointingSteps: null, device: 'cpu', reportTo: null,
    };
    const eagerDb = join(tmp, 'db-eager');
    const graphedDb = join(tmp, 'db-graphed');
    await runDreamBoothTraining({ ...base, outputDir: eagerDb });
    const graphs: RerunGraph[] = [];
    const notices: string[] = [];
    await runDreamBoothTraining({ ...base, outputDir: graphedDb, cudaGraphs: true }, { makeGraph: () => { const g = new RerunGraph(); graphs.push(g); return g; }, onNotice: (m) => notices.push(m) });
    expectSameRun(graphedDb, eagerDb, 0);
    expect(loraOf(graphedDb).size).toBeGreaterThan(loraOf(join(tmp, 'eager')).size); // the text encoder's layers too
    expect(graphs[0]!.captures).toBe(1);
    expect(graphs[0]!.replays).toBeGreaterThan(0);
    expect(notices.some((m) => m.includes('such batches run eagerly'))).toBe(true); // 5 instance images, batch 2
  });

  it('falls back to eager steps, saying why: the CPU, accumulation, another optimizer, gradient checkpointing', async () => {
    const cases: [Partial<TrainOptions>, RegExp, boolean][] = [
      [{}, /CUDA graphs: off \(the device is cpu, not a CUDA GPU\); the steps run eagerly/, false],
      [{ gradientAccumulationSteps: 2, maxTrainSteps: 1 }, /off \(--gradient_accumulation_steps is 2/, true],
      [{ optimizer: 'lion', maxTrainSteps: 1 }, /off \(--optimizer lion/, true],
      [{ gradientCheckpointing: true, maxTrainSteps: 1 }, /off \(--gradient_checkpointing is not verified under capture yet\)/, true],
    ];
    for (const [more, why, standIn] of cases) {
      const notices: string[] = [];
      const graphs: RerunGraph[] = [];
      const out = join(tmp, `fallback-${notices.length}-${Math.random().toString(36).slice(2)}`);
      await runTraining(sd(out, { cudaGraphs: true, ...more }), { onNotice: (m) => notices.push(m), ...(standIn ? { makeGraph: () => { const g = new RerunGraph(); graphs.push(g); return g; } } : {}) });
      expect(notices.join('\n')).toMatch(why);
      expect(graphs).toHaveLength(0);
      if (Object.keys(more).length === 0) expect(readFileSync(join(out, 'pytorch_lora_weights.safetensors')).equals(readFileSync(join(eager, 'pytorch_lora_weights.safetensors')))).toBe(true);
    }
  });

  it('train-sdxl: it trains what the eager loop trains (the VAE in float32, the noise in the weight dtype, --debug_loss)', async () => {
    const base = {
      pretrainedModelNameOrPath: join(fixtures, 'tiny-sdxl'), trainDataDir: data, resolution: 32, centerCrop: true, randomFlip: true, trainBatchSize: 2,
      maxTrainSteps: 8, learningRate: 1e-3, noiseOffset: 0.05, debugLoss: true, seed: 1, checkpointingSteps: null, device: 'cpu', reportTo: 'tensorboard' as const,
    };
    const eagerXl = join(tmp, 'xl-eager');
    const graphedXl = join(tmp, 'xl-graphed');
    await runSdxlTraining({ ...base, outputDir: eagerXl });
    const graphs: RerunGraph[] = [];
    await runSdxlTraining({ ...base, outputDir: graphedXl, cudaGraphs: true }, { makeGraph: () => { const g = new RerunGraph(); graphs.push(g); return g; } });
    expectSameRun(graphedXl, eagerXl, 0);
    expect({ runs: graphs[0]!.runs, captures: graphs[0]!.captures, replays: graphs[0]!.replays }).toEqual({ runs: 3, captures: 1, replays: 3 });
    // --debug_loss: one loss_for_<file> scalar per image and step in both runs' event files, in the same order (each
    // step's own files, though its loss is read a step late)
    const tags = (dir: string) => {
      const logs = join(dir, 'logs');
      const files = readdirSync(logs, { recursive: true }).map(String).filter((f) => f.includes('tfevents'));
      return files.flatMap((f) => readFileSync(join(logs, f)).toString('latin1').match(/loss_for_\d\.png/g) ?? []);
    };
    expect(tags(graphedXl)).toEqual(tags(eagerXl));
    expect(tags(eagerXl)).toHaveLength(8 * 2 - 2); // 8 steps of 2 images but two 1-image batches (5 images, batch 2)
    expect(new Set(tags(eagerXl)).size).toBe(5);
  });
});

describe('--cuda_graphs on the command line', () => {
  const base = ['--pretrained_model_name_or_path=m', '--train_data_dir=d'];
  it('difflora generate --cuda_graphs sets the option (only when given)', () => {
    expect(parseGenerateArgs(['--prompt=a cat'])).not.toHaveProperty('cudaGraphs');
    expect(parseGenerateArgs(['--prompt=a cat', '--cuda_graphs'])).toMatchObject({ cudaGraphs: true });
  });

  it('is off by default (until checked on a GPU) and on with --cuda_graphs', () => {
    expect(parseTrainArgs(base)).not.toHaveProperty('cudaGraphs');
    expect(parseTrainArgs([...base, '--cuda_graphs']).cudaGraphs).toBe(true);
  });
});

describe('generate({ cudaGraphs: true }): the UNet call recorded and replayed', () => {
  it('gives the image of the eager loop (a stand-in graph): 1 warm-up call, 1 capture, replays; a LoRA loaded too', async () => {
    const pipe = StableDiffusionPipeline.fromPretrained(join(fixtures, 'tiny-sd'));
    const graphs: RerunGraph[] = [];
    const saved = graphFactory.make;
    try {
      const o = { prompt: 'a red square', negativePrompt: '', numInferenceSteps: 5, height: 32, width: 32, seed: 3, outputType: 'array' as const };
      for (const lora of [false, true]) {
        if (lora) pipe.loadLoraWeights(join(fixtures, 'goldens', 'lora-diffusers'));
        graphFactory.make = saved;
        const eager = await pipe.generate(o);
        graphFactory.make = () => { const g = new RerunGraph(); graphs.push(g); return g; };
        const live = memory().numTensors;
        const graphed = await pipe.generate({ ...o, cudaGraphs: true });
        expect(memory().numTensors).toBe(live); // the static inputs and output freed with the graph
        expect(Buffer.from(graphed.array!.data.buffer).equals(Buffer.from(eager.array!.data.buffer))).toBe(true);
      }
      expect(graphs.map((g) => [g.runs, g.captures, g.replays])).toEqual([[1, 1, 5], [1, 1, 5]]); // PNDM: 6 UNet calls for 5 steps
    } finally {
      graphFactory.make = saved;
      pipe.dispose();
    }
  });

  it('where no graph can be made (the CPU) one warning says why and the image is the same', async () => {
    const pipe = StableDiffusionPipeline.fromPretrained(join(fixtures, 'tiny-sd'));
    const warnings: string[] = [];
    const onWarning = (w: Error) => { warnings.push(w.message); };
    process.on('warning', onWarning);
    try {
      const o = { prompt: 'a red square', numInferenceSteps: 3, height: 32, width: 32, seed: 4, outputType: 'array' as const };
      const eager = await pipe.generate(o);
      const graphed = await pipe.generate({ ...o, cudaGraphs: true });
      await new Promise((r) => setImmediate(r)); // warnings are emitted on the next tick
      expect(Buffer.from(graphed.array!.data.buffer).equals(Buffer.from(eager.array!.data.buffer))).toBe(true);
      await expect(pipe.generate({ ...o, cudaGraphs: 'yes' as unknown as boolean })).rejects.toThrow(/cudaGraphs must be true or false, got "yes"/);
      expect(warnings).toEqual([expect.stringMatching(/^CUDA graphs off for this generation: no graph could be made \(CUDA graphs need a CUDA device, not 'cpu'\)/)]);
    } finally {
      process.off('warning', onWarning);
      pipe.dispose();
    }
  });
});

if (!cudaIsAvailable()) {
  it('a CUDA graph on a machine without CUDA is refused by name', () => {
    expect(() => new CudaGraph('cuda:0')).toThrow(/cuda graph: (this addon was built against a libtorch without CUDA|no CUDA device)/);
    expect(() => new CudaGraph('cpu')).toThrow(/CUDA graphs need a CUDA device, not 'cpu'/);
  });
}

