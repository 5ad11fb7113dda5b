// difflora's side of the side-by-side table of issue #15: the train_text_to_image_lora.py step on SD 1.5 shapes
// with random weights, timed with the configuration keys of ../shared/gpu-reference/ref_step_cuda.py
// (`prec:res:bs[:gc][:cached]`) so the two JSON files join row by row, then one 512×512 image with the
// pipeline (30 steps, CFG 7.5) with and without a LoRA. A `:graph` row is the same step recorded in a CUDA graph
// and replayed (--cuda_graphs, lib/training/graphed_step.ts); join.mjs compares it with diffusers' row without `:graph`.
//
//   node bench/gpu/sd15_step.mjs --out $OUT/difflora-gpu.json [--budget 240] [--configs fp16:512:1,...] [--no-pipeline]
//   node bench/gpu/sd15_step.mjs --device cpu --tiny --out /tmp/x.json      # the CPU dry run (tiny-sd at 64 px)
//
// The step, as ref_step_cuda.py's: VAE encode (or cached latents) → noise, timesteps, add_noise → frozen text
// encoder → UNet under autocast → fp32 MSE → loss.item() → (GradScaler for fp16) backward → clip_grad_norm_(1.0)
// → AdamW → zero_grad. Median seconds over `--steps` after `--warmup`; peak CUDA memory over warm-up and timed
// steps; MFU against a bf16 n³ matmul measured in this run; FLOP per sample as ref_step_cuda.py's model.
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  torch, AutoencoderKL, CLIPTextModel, CLIPTokenizer, UNet2DConditionModel, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline,
  attachLora, AdamW, GradScaler, loraTrainingStep, optimizerStep, encodeLatents, saveLoraWeights,
} from '../../dist/index.js';
import { native } from '../../dist/native.js';
import { GraphedTrainStep } from '../../dist/training/graphed_step.js';
import { graphFactory } from '../../dist/cuda_graph.js';
import { Accumulator, drawStepInputs, lossAndBackward } from '../../dist/training/step.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '../..');
const arg = (name, dflt) => { const i = process.argv.indexOf(`--${name}`); return i < 0 ? dflt : process.argv[i + 1]; };
const flag = (name) => process.argv.includes(`--${name}`);
const device = arg('device', 'cuda:0');
const tiny = flag('tiny');
const out = arg('out', 'difflora-gpu.json');
const budgetS = Number(arg('budget', 300));
const warmup = Number(arg('warmup', tiny ? 2 : 5));
const steps = Number(arg('steps', tiny ? 4 : 20));
const matmulN = Number(arg('matmul-n', tiny ? 256 : 8192));
const cuda = device.startsWith('cuda');
const started = Date.now();
const left = () => budgetS - (Date.now() - started) / 1000;

// ref_step_cuda.py's FLOP model (per sample at 512 px, scaled by area)
const FLOP_PER_SAMPLE_512 = { uncached: 2.7e12, cached: 1.6e12 };
const WEIGHT_DTYPE = { fp16: 'float16', bf16: 'bfloat16', fp32: 'float32' };
const MIXED = { fp16: 'fp16', bf16: 'bf16', fp32: 'no' };

function defaultPlan() {
  if (tiny) return ['fp32:64:1', 'fp32:64:2:gc', 'bf16:64:2:cached'];
  const rows = [];
  for (const p of ['fp16', 'bf16']) for (const b of [1, 4]) for (const gc of [false, true]) rows.push(`${p}:512:${b}${gc ? ':gc' : ''}`);
  rows.push('fp16:512:4:cached', 'bf16:512:4:cached');
  for (const p of ['fp16', 'bf16']) for (const b of [1, 4]) rows.push(`${p}:512:${b}:graph`);
  rows.push('bf16:512:4:cached:graph');
  return rows;
}
function parseKey(key) {
  const [prec, res, bs, ...rest] = key.split(':');
  if (!WEIGHT_DTYPE[prec] || !(Number(res) > 0) || !(Number(bs) > 0) || rest.some((f) => f !== 'gc' && f !== 'cached' && f !== 'graph')) {
    throw new Error(`bad configuration '${key}' (want prec:res:bs[:gc][:cached][:graph], prec in fp16|bf16|fp32)`);
  }
  return { key, prec, res: Number(res), bs: Number(bs), gc: rest.includes('gc'), cached: rest.includes('cached'), graph: rest.includes('graph') };
}
const plan = (arg('configs') ?? defaultPlan().join(',')).split(',').map(parseKey);

const configs = tiny ? join(root, 'test/fixtures/tiny-sd') : join(root, '../shared/fixtures/sd15-shape');
const configsDir = process.env.SD15_CONFIGS ?? configs;
const cfg = (sub, file = 'config.json') => JSON.parse(readFileSync(join(configsDir, sub, file), 'utf8'));
const schedulerCfg = JSON.parse(readFileSync(join(root, 'test/fixtures/tiny-sd/scheduler/scheduler_config.json'), 'utf8'));

const sync = () => torch.synchronize();
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; };
const peakBytes = () => (cuda ? torch.memory().cuda[Number(device.split(':')[1] ?? 0)]?.peakAllocatedBytes ?? null : null);
const result = { tool: 'bench/gpu/sd15_step.mjs', device, tiny, torch: torch.info().torchVersion, date: new Date().toISOString(), rows: [], pipeline: [], matmul: null, notes: [] };
const save = () => writeFileSync(out, `${JSON.stringify(result, null, 1)}\n`);

function matmulPeak() {
  return torch.tidy(() => {
    const dtype = 'bfloat16';
    const a = torch.randn([matmulN, matmulN], { device }).to({ dtype });
    const b = torch.randn([matmulN, matmulN], { device }).to({ dtype });
    for (let i = 0; i < 3; i++) torch.tidy(() => { a.matmul(b); });
    sync();
    const iters = tiny ? 5 : 20;
    const per = [];
    for (let t = 0; t < 5; t++) {
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < iters; i++) torch.tidy(() => { a.matmul(b); });
      sync();
      per.push(Number(process.hrtime.bigint() - t0) / 1e9 / iters);
    }
    const flop = 2 * matmulN ** 3;
    return { n: matmulN, dtype, tflops_median: flop / median(per) / 1e12, tflops_best: flop / Math.min(...per) / 1e12 };
  });
}

/** The frozen models in `prec`'s weight dtype with a fresh LoRA r=4 (fp32 LoRA params, as difflora trains). */
function build(prec) {
  torch.manualSeed(0);
  const dtype = WEIGHT_DTYPE[prec];
  const place = (m) => m.to({ dtype, device }).eval().requiresGrad_(false);
  const vae = place(new AutoencoderKL(cfg('vae')));
  const textEncoder = place(new CLIPTextModel(cfg('text_encoder')));
  const unet = place(UNet2DConditionModel.fromConfig(cfg('unet')));
  const lora = attachLora(unet, { rank: 4, alpha: 4, init: 'gaussian' });
  unet.train();
  const scheduler = DDPMScheduler.fromConfig(schedulerCfg);
  return { prec, vae, textEncoder, unet, lora, scheduler, dispose: () => { for (const m of [vae, textEncoder, unet]) m.dispose(); scheduler.dispose?.(); } };
}

/** The CPU dry run's stand-in for a CUDA graph: a replay reruns the recorded step (what the capture would compute). */
function rerunGraph() {
  let fn = null;
  return { run: (f) => f(), capture: (f) => { fn = f; }, replay: () => fn(), dispose: () => { fn = null; } };
}

if (!cuda) graphFactory.make = rerunGraph; // the CPU dry run walks the graphed pipeline's code path too

function timeConfig(m, c) {
  const vocab = cfg('text_encoder').vocab_size ?? 49408;
  const batch = torch.tidy(() => {
    const pixelValues = torch.rand([c.bs, 3, c.res, c.res], { device }).mul(2).sub(1);
    const inputIds = torch.randint(0, vocab, [c.bs, 77], { device });
    if (!c.cached) return { pixelValues, inputIds };
    return { latents: encodeLatents(m.vae, pixelValues), inputIds };
  });
  for (const t of Object.values(batch)) torch.keep(t);
  m.unet.enableGradientCheckpointing(c.gc);
  const optimizer = new AdamW(m.lora.parameters(), { lr: 1e-4, betas: [0.9, 0.999], weightDecay: 1e-2, eps: 1e-8 });
  const scaler = c.prec === 'fp16' ? new GradScaler() : null;
  const eager = () => {
    const loss = loraTrainingStep({ unet: m.unet, vae: m.vae, textEncoder: m.textEncoder, scheduler: m.scheduler, batch, mixedPrecision: MIXED[c.prec], scaler });
    optimizerStep({ optimizer, maxGradNorm: 1.0, scaler });
    return loss;
  };
  let graphed = null;
  if (c.graph) {
    // the same step split for capture: the draws on the host side (the device's generator here), the rest recorded
    const params = optimizer.params;
    const accumulator = new Accumulator({ optimizer, params, scaler, maxGradNorm: 1.0, lrScheduler: 'constant', lrOptions: { baseLr: 1e-4, warmupSteps: 0, totalSteps: warmup + steps } });
    graphed = new GraphedTrainStep({
      inputs: () => {
        const own = Object.fromEntries(Object.entries(batch).map(([k, t]) => [k, t.clone()]));
        return { ...own, ...drawStepInputs({ batch, vae: m.vae, scheduler: m.scheduler }, device) };
      },
      lossAndBackward: (t, lossScale) => lossAndBackward({
        unet: m.unet, vae: m.vae, textEncoder: m.textEncoder, scheduler: m.scheduler, batch: { pixelValues: t.pixelValues, latents: t.latents, inputIds: t.inputIds },
        noise: t.noise, timesteps: t.timesteps, latentNoise: t.latentNoise, mixedPrecision: MIXED[c.prec], scaler, lossScale,
      }),
    }, { device, params, optimizer, scaler, maxGradNorm: 1.0, accumulator, warmupSteps: Math.min(3, Math.max(0, warmup - 1)),
      onNotice: (msg) => result.notes.push(`${c.key}: ${msg}`), makeGraph: cuda ? undefined : rerunGraph });
  }
  const step = () => (graphed ? graphed.run(null).loss : eager());
  sync();
  if (cuda) { torch.emptyCache(); native.resetPeakMemory(); }
  const losses = [];
  const tw = Date.now();
  for (let i = 0; i < warmup; i++) losses.push(step());
  sync();
  const warmupS = (Date.now() - tw) / 1000;
  const times = [];
  if (graphed) {
    // as the trainer runs it: each step launched before the last one is read (its loss a step late); a step's time is
    // from one launch's return to the next's, the last one's to its read
    let t0 = process.hrtime.bigint();
    const lap = () => { const t = process.hrtime.bigint(); times.push(Number(t - t0) / 1e9); t0 = t; };
    for (let i = 0; i < steps; i++) {
      const previous = graphed.launch(null);
      if (previous) { losses.push(previous.loss); lap(); }
    }
    losses.push(graphed.settle().loss);
    sync();
    lap();
  } else {
    for (let i = 0; i < steps; i++) {
      const t0 = process.hrtime.bigint();
      losses.push(step()); // loss.item() inside: the script's per-step host sync
      sync();
      times.push(Number(process.hrtime.bigint() - t0) / 1e9);
    }
  }
  const med = median(times);
  const fps = FLOP_PER_SAMPLE_512[c.cached ? 'cached' : 'uncached'] * (c.res / 512) ** 2;
  graphed?.dispose();
  const row = {
    id: c.key, prec: c.prec, res: c.res, bs: c.bs, gc: c.gc, cached: c.cached, graph: c.graph, status: 'ok', warmup, steps, warmup_total_s: warmupS,
    median_s: med, min_s: Math.min(...times), max_s: Math.max(...times), samples_per_s: c.bs / med, times_s: times.map((t) => +t.toFixed(6)),
    peak_mem_bytes: peakBytes(), loss_first: losses[0], loss_last: losses.at(-1), nonfinite_losses: losses.filter((l) => !Number.isFinite(l)).length,
    flops_per_sample: fps, achieved_tflops: (fps * c.bs) / med / 1e12, grad_scale_end: scaler?.scale ?? null,
  };
  if (result.matmul) row.mfu = row.achieved_tflops / result.matmul.tflops_median;
  optimizer.dispose();
  torch.dispose(Object.values(batch));
  return row;
}

async function timePipeline(withLora, graphs = false) {
  const dtype = cuda ? 'float16' : 'float32';
  torch.manualSeed(0);
  const tokenizer = CLIPTokenizer.fromPretrained(join(root, 'test/fixtures/tiny-sd'), { subfolder: 'tokenizer' });
  const place = (m) => m.to({ dtype, device }).eval().requiresGrad_(false);
  const pipe = new StableDiffusionPipeline({
    unet: place(UNet2DConditionModel.fromConfig(cfg('unet'))), vae: place(new AutoencoderKL(cfg('vae'))),
    textEncoder: place(new CLIPTextModel(cfg('text_encoder'))), tokenizer, scheduler: new PNDMScheduler(schedulerCfg),
  });
  if (withLora) {
    const lora = attachLora(pipe.unet, { rank: 4, alpha: 4, init: 'gaussian' }); // a trained-looking LoRA: B ≠ 0
    torch.noGrad(() => { for (const p of lora.parameters()) p.normal_(0, 0.01); });
    const dir = join(process.env.OUT ?? '/tmp', 'bench-lora');
    saveLoraWeights(dir, pipe.unet);
    pipe.unloadLoraWeights();
    pipe.loadLoraWeights(dir);
  }
  const res = tiny ? 64 : 512;
  const numSteps = tiny ? 4 : 30;
  const run = async () => {
    const r = await pipe.generate({ prompt: 'a photo of an astronaut riding a horse', height: res, width: res, numInferenceSteps: numSteps, guidanceScale: 7.5, seed: 0, outputType: 'latent', cudaGraphs: graphs });
    sync();
    r.tensor?.dispose();
  };
  await run();
  if (cuda) native.resetPeakMemory();
  const times = [];
  for (let i = 0; i < (tiny ? 2 : 3); i++) {
    const t0 = process.hrtime.bigint();
    await run();
    times.push(Number(process.hrtime.bigint() - t0) / 1e9);
  }
  pipe.dispose();
  return { id: `pipe:${dtype}:${res}:${numSteps}${withLora ? ':lora' : ''}${graphs ? ':graph' : ''}`, lora: withLora, graphs, dtype, res, steps: numSteps, cfg: 7.5, median_s: median(times), times_s: times, peak_mem_bytes: peakBytes() };
}

try {
  result.matmul = matmulPeak();
  console.log(`bf16 ${matmulN}³ matmul: ${result.matmul.tflops_median.toFixed(1)} TFLOP/s`);
  save();
  const byPrec = new Map();
  for (const p of new Set(plan.map((c) => c.prec))) byPrec.set(p, plan.filter((c) => c.prec === p));
  for (const [prec, rows] of byPrec) {
    if (left() < 30) { for (const c of rows) result.rows.push({ id: c.key, status: 'skipped (budget)' }); continue; }
    const m = build(prec);
    try {
      for (const c of rows) {
        if (left() < 20) { result.rows.push({ id: c.key, status: 'skipped (budget)' }); continue; }
        try {
          const row = torch.tidy(() => timeConfig(m, c));
          result.rows.push(row);
          console.log(`${c.key.padEnd(20)} ${(row.median_s * 1000).toFixed(1)} ms/step  ${row.samples_per_s.toFixed(2)} samples/s  peak ${row.peak_mem_bytes === null ? '-' : (row.peak_mem_bytes / 2 ** 30).toFixed(2)} GiB  MFU ${row.mfu === undefined ? '-' : (100 * row.mfu).toFixed(1)}%`);
        } catch (e) {
          result.rows.push({ id: c.key, status: `error: ${String(e?.message ?? e).slice(0, 300)}` });
          console.log(`${c.key}: error ${String(e?.message ?? e).slice(0, 300)}`);
        }
        save();
      }
    } finally {
      m.dispose();
      if (cuda) torch.emptyCache();
    }
  }
  if (!flag('no-pipeline')) {
    for (const [withLora, graphs] of [[false, false], [true, false], [false, true], [true, true]]) {
      if (left() < 30) { result.pipeline.push({ lora: withLora, graphs, status: 'skipped (budget)' }); continue; }
      try {
        const r = await timePipeline(withLora, graphs);
        result.pipeline.push(r);
        console.log(`${r.id.padEnd(20)} ${r.median_s.toFixed(3)} s/image`);
      } catch (e) {
        result.pipeline.push({ lora: withLora, status: `error: ${String(e?.message ?? e).slice(0, 300)}` });
        console.log(`pipeline${withLora ? ' +lora' : ''}: error ${String(e?.message ?? e).slice(0, 300)}`);
      }
      save();
    }
  }
} finally {
  save();
  console.log(`wrote ${out} in ${((Date.now() - started) / 1000).toFixed(0)} s`);
}
