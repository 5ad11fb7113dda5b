// Train a LoRA from TypeScript: trainTextToImageLora (the loop of diffusers' train_text_to_image_lora.py, options
// = its flags in camelCase) with progress events and an AbortSignal — Ctrl-C stops the run between two steps.
// With no --model/--data it trains difflora's built-in default (a tiny random-weight SD pipeline and 8
// generated captioned pictures, made locally).
//   npx tsx examples/train.ts [--model=dir-or-hub-id] [--data=imagefolder] [--output=dir] [--steps=N] [--stop-at=N]
// --stop-at=N aborts the run after step N (what Ctrl-C does), to show how an aborted run ends.
import { parseArgs } from 'node:util';
import { prepareBuiltinDefault, BUILTIN_SETTINGS } from '../lib/builtin/default.js';
import { trainTextToImageLora, type TrainProgress } from '../lib/index.js';

const { values } = parseArgs({
  options: {
    model: { type: 'string' }, data: { type: 'string' }, output: { type: 'string', default: 'difflora-example-lora' },
    steps: { type: 'string', default: '20' }, 'stop-at': { type: 'string' },
  },
});
const builtin = values.model === undefined || values.data === undefined ? await prepareBuiltinDefault() : null;
const model = values.model ?? builtin!.model;
const data = values.data ?? builtin!.data;
const stopAt = values['stop-at'] === undefined ? Infinity : Number(values['stop-at']);

const controller = new AbortController();
process.once('SIGINT', () => controller.abort());

const started = Date.now();
let last: TrainProgress | undefined;
try {
  const result = await trainTextToImageLora({
    pretrainedModelNameOrPath: model,
    trainDataDir: data,
    outputDir: values.output,
    resolution: BUILTIN_SETTINGS.resolution,
    trainBatchSize: 2,
    maxTrainSteps: Number(values.steps),
    learningRate: 1e-3,
    lrScheduler: 'cosine',
    lrWarmupSteps: 0,
    rank: 4,
    seed: 0,
    checkpointingSteps: null, // no resumable checkpoints for a short demo
  }, {
    signal: controller.signal,
    onProgress: (p) => {
      last = p;
      const rate = p.step / ((Date.now() - started) / 1000);
      console.log(`step ${p.step}/${p.maxTrainSteps} loss ${p.loss.toFixed(4)} lr ${p.lr.toExponential(2)} ${rate.toFixed(1)} it/s`);
      if (p.step >= stopAt) controller.abort();
    },
  });
  console.log(`done: ${result.globalStep} steps, last loss ${result.lastLoss.toFixed(4)}, LoRA weights in ${result.outputFile}`);
} catch (e) {
  if (!controller.signal.aborted) throw e;
  console.log(`aborted after step ${last?.step ?? 0}: nothing saved${last ? '' : ' (no step had finished)'}`);
  process.exitCode = 130;
}
