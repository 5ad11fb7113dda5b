// --cuda_graphs on a GPU (issue #15): the training step recorded in a real CUDA graph and replayed gives the same
// losses and LoRA as the same step run eagerly, and as the host-side path (loraTrainingStep + optimizerStep), with the
// device-side AdamW as libtorch's fused kernel (2.x) and op by op: tiny-sd,
// 10 steps, fp32 with TF32 off (relative error ≤ 1e-5), then bf16 and fp16 (GradScaler) against the eager device-side
// step; live tensors flat over the replays. Exits non-zero on a failure. No test runner on the device machine.
//   node bench/gpu/graphs.mjs [device]      (after the addon is built against a CUDA libtorch and `npm run build:ts`)
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { torch, AutoencoderKL, CLIPTextModel, UNet2DConditionModel, DDPMScheduler, attachLora, AdamW, GradScaler, Generator, loraTrainingStep, optimizerStep } from '../../dist/index.js';
import { GraphedTrainStep } from '../../dist/training/graphed_step.js';
import { Accumulator, drawStepInputs, lossAndBackward } from '../../dist/training/step.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '../..');
const fx = join(root, 'test/fixtures/tiny-sd');
const device = process.argv[2] ?? 'cuda:0';
const STEPS = 10;
torch.setAllowTF32(false);

let failed = 0;
const report = (ok, name, detail) => {
  if (!ok) failed++;
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${name}${detail ? `: ${detail}` : ''}`);
};
const rel = (a, b) => {
  let num = 0, den = 0;
  for (let i = 0; i < a.length; i++) { num += (a[i] - b[i]) ** 2; den += b[i] ** 2; }
  return Math.sqrt(num / Math.max(den, 1e-30));
};

const MIXED = { fp32: 'no', bf16: 'bf16', fp16: 'fp16' };
const DTYPE = { fp32: 'float32', bf16: 'bfloat16', fp16: 'float16' };

/**
 * 10 steps of one way: 'graph' (a real CUDA graph, each step launched and read), 'pipelined' (the same, each step
 * launched before the last one is read, as the trainer runs it), 'rerun' (the same device-side step, eager), 'host'
 * (the host-side optimizer step). Same models, LoRA init, batch and per-step draws for all.
 */
function train(way, prec, { gc = false } = {}) {
  torch.manualSeed(0);
  const dtype = DTYPE[prec];
  const load = (cls, sub) => cls.fromPretrained(fx, { subfolder: sub, dtype, device }).eval().requiresGrad_(false);
  const vae = load(AutoencoderKL, 'vae');
  const textEncoder = load(CLIPTextModel, 'text_encoder');
  const unet = load(UNet2DConditionModel, 'unet');
  const lora = attachLora(unet, { rank: 4, alpha: 4, init: 'gaussian' });
  unet.train();
  if (gc) unet.enableGradientCheckpointing(true);
  const scheduler = DDPMScheduler.fromPretrained(fx, { subfolder: 'scheduler' });
  const g = new Generator('cpu');
  g.manualSeed(1);
  const batch = torch.tidy(() => ({
    pixelValues: torch.rand([2, 3, 64, 64], { generator: g }).mul(2).sub(1).to({ device }),
    inputIds: torch.randint(0, 1000, [2, 77], { generator: g }).to({ device }),
  }));
  for (const t of Object.values(batch)) torch.keep(t);
  const params = lora.parameters();
  const optimizer = new AdamW(params, { lr: 1e-3, weightDecay: 1e-2 });
  const scaler = prec === 'fp16' ? new GradScaler() : null;
  const accumulator = new Accumulator({ optimizer, params, scaler, maxGradNorm: 1, lrScheduler: 'cosine', lrOptions: { baseLr: 1e-3, warmupSteps: 2, totalSteps: STEPS } });
  const draws = (step) => { const d = new Generator('cpu'); d.manualSeed(100 + step); return drawStepInputs({ batch, vae, scheduler, generator: d }, device); };
  const args = (t, lossScale) => ({
    unet, vae, textEncoder, scheduler, batch: { pixelValues: t.pixelValues, inputIds: t.inputIds }, noise: t.noise, timesteps: t.timesteps,
    latentNoise: t.latentNoise, mixedPrecision: MIXED[prec], scaler, lossScale,
  });
  let step = 0;
  let graphed = null;
  const notices = [];
  if (way !== 'host') {
    graphed = new GraphedTrainStep({
      inputs: () => ({ pixelValues: batch.pixelValues.clone(), inputIds: batch.inputIds.clone(), ...draws(step) }),
      lossAndBackward: (t, lossScale) => lossAndBackward(args(t, lossScale)),
    }, {
      device, params, optimizer, scaler, maxGradNorm: 1, accumulator, onNotice: (m) => { notices.push(m); console.log(`     ${way} ${prec}${gc ? ' gc' : ''}: ${m}`); },
      ...(way === 'rerun' ? { makeGraph: () => { let fn = null; return { run: (f) => f(), capture: (f) => { fn = f; }, replay: () => fn(), dispose: () => { fn = null; } }; } } : {}),
    });
  }
  const losses = [];
  let liveAfterCapture = null;
  for (step = 0; step < STEPS; step++) {
    if (way === 'pipelined') {
      const previous = graphed.launch(null);
      if (previous) losses.push(previous.loss);
    } else if (graphed) {
      losses.push(graphed.run(null).loss);
    } else {
      const d = draws(step);
      losses.push(torch.tidy(() => loraTrainingStep(args({ ...batch, ...d }, null))));
      torch.dispose(Object.values(d));
      const r = optimizerStep({ optimizer, params, maxGradNorm: 1, scaler });
      accumulator.recordDeviceStep(r); // the same bookkeeping (LR schedule) as the device-side way
    }
    if (step === 5) liveAfterCapture = torch.memory().numTensors;
  }
  if (way === 'pipelined') losses.push(graphed.settle().loss);
  const live = torch.memory().numTensors;
  const values = params.map((p) => p.toFloat64Array());
  graphed?.dispose();
  optimizer.dispose();
  torch.dispose(Object.values(batch));
  for (const m of [vae, textEncoder, unet]) m.dispose();
  return { losses, values, flat: liveAfterCapture === live, live, liveAfterCapture, scale: scaler?.scale, captured: !notices.some((m) => /could not|no graph/.test(m)), notices };
}

const compare = (name, a, b, tol) => {
  const lossErr = Math.max(...a.losses.map((l, i) => Math.abs(l - b.losses[i]) / Math.abs(b.losses[i])));
  const loraErr = Math.max(...a.values.map((v, i) => rel(v, b.values[i])));
  report(lossErr <= tol && loraErr <= tol && a.losses.every(Number.isFinite), name, `loss ${lossErr.toExponential(2)}, LoRA ${loraErr.toExponential(2)} (≤ ${tol})`);
};

try {
  const graph = train('graph', 'fp32');
  report(graph.flat, 'fp32 graph: live tensors flat over the replays', `${graph.liveAfterCapture} → ${graph.live}`);
  compare('fp32: captured step = the same step eager', graph, train('rerun', 'fp32'), 1e-5);
  compare('fp32: pipelined (each step launched before the last is read) = launched and read one at a time', train('pipelined', 'fp32'), graph, 1e-6);
  const host = train('host', 'fp32');
  compare('fp32: captured step = the host-side step (loraTrainingStep + optimizerStep)', graph, host, 1e-5);
  // the device-side AdamW op by op (libtorch without the fused kernel, or DIFFLORA_NO_FUSED_ADAMW=1) against the same
  process.env.DIFFLORA_NO_FUSED_ADAMW = '1';
  compare('fp32: captured step, AdamW op by op = the host-side step', train('graph', 'fp32'), host, 1e-5);
  delete process.env.DIFFLORA_NO_FUSED_ADAMW;
  report(graph.captured, 'fp32: the step was captured', graph.notices.join(' | '));
  // gradient checkpointing under capture (--cuda_graphs refuses it until this shows it works): informational
  const gc = train('graph', 'fp32', { gc: true });
  console.log(`info gradient checkpointing: ${gc.captured ? 'captured' : 'not captured'} (${gc.notices.join(' | ')})`);
  if (gc.captured) compare('fp32 + gradient checkpointing: captured step = the same step eager', gc, train('rerun', 'fp32', { gc: true }), 1e-5);
  for (const prec of ['bf16', 'fp16']) {
    const a = train('graph', prec);
    const b = train('rerun', prec);
    compare(`${prec}: captured step = the same step eager`, a, b, 1e-3);
    if (prec === 'fp16') compare('fp16: pipelined = one at a time (the scaler\'s skips and the LR read a step late)', train('pipelined', prec), a, 1e-6);
    if (prec === 'fp16') report(a.scale === b.scale, 'fp16: the loss scale follows the same steps', `${a.scale} vs ${b.scale}`);
  }
} catch (e) {
  report(false, 'graphs', String(e?.stack ?? e).slice(0, 800));
}
console.log(`\n${failed ? `${failed} failed` : 'all passed'}`);
process.exitCode = failed ? 1 : 0;
