// Data-parallel training throughput (run by hand, not a test): `difflora train` on small-sd (random weights from
// ../shared/fixtures/small-sd's configs) at 64 px, 1 process × 1 thread × batch 1 against
// `difflora launch --num_processes 2` × 1 thread × batch 1 each (global batch 2), over Gloo on this machine.
//   node --import tsx bench/distributed.mjs [steps=24] [warmup=4]
// Prints one JSON line per configuration: images/s over the steps after the warm-up (from metrics.jsonl's
// timestamps), and for 2 processes the time rank 0 waited in collectives per optimizer step (gradient all-reduce +
// losses' mean, as the run reports it) and the bytes all-reduced per step. Then the ratio.
import { spawn } from 'node:child_process';
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { cpus, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import sharp from 'sharp';
import { AutoencoderKL, CLIPTextModel, UNet2DConditionModel, saveSafetensors, torch } from '../lib/index.ts';

const steps = Number(process.argv[2] ?? 24);
const warmup = Number(process.argv[3] ?? 4);
const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const smallSd = process.env.SMALL_SD ?? join(root, '..', 'shared', 'fixtures', 'small-sd');
const tmp = mkdtempSync(join(tmpdir(), 'difflora-bench-dist-'));

/** small-sd's configs and tokenizer with random weights (the fixture has no weights). */
function writeModel(dir) {
  cpSync(smallSd, dir, { recursive: true });
  const cfg = (sub) => JSON.parse(readFileSync(join(dir, sub, 'config.json'), 'utf8'));
  torch.manualSeed(0);
  for (const [sub, stem, model] of [
    ['unet', 'diffusion_pytorch_model', UNet2DConditionModel.fromConfig(cfg('unet'))],
    ['vae', 'diffusion_pytorch_model', new AutoencoderKL(cfg('vae'))],
    ['text_encoder', 'model', new CLIPTextModel(cfg('text_encoder'))],
  ]) {
    saveSafetensors(join(dir, sub, `${stem}.safetensors`), model.stateDict(), { format: 'pt' });
    model.dispose();
  }
}

async function writeData(dir, n) {
  mkdirSync(dir, { recursive: true });
  const lines = [];
  for (let i = 0; i < n; i++) {
    const [w, h] = [80 + (i % 5) * 4, 72 + (i % 3) * 4];
    const raw = Buffer.alloc(w * h * 3);
    for (let p = 0; p < w * h; p++) raw.set([(p * 7 + i * 31) % 256, ((p % w) * 3) % 256, (Math.floor(p / w) * 5 + i) % 256], 3 * p);
    await sharp(raw, { raw: { width: w, height: h, channels: 3 } }).png().toFile(join(dir, `${i}.png`));
    lines.push(JSON.stringify({ file_name: `${i}.png`, text: `a benchmark picture number ${i}` }));
  }
  writeFileSync(join(dir, 'metadata.jsonl'), lines.join('\n'));
}

async function freePort() {
  const server = createServer();
  await new Promise((resolve) => server.listen(0, resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

const CLI = `import { main } from ${JSON.stringify(join(root, 'lib', 'cli', 'main.ts'))}; process.exitCode = await main(process.argv.slice(1));`;

function cli(args) {
  // 1 thread per process everywhere: libtorch's, OpenMP's and OpenBLAS's
  const env = { ...process.env, DIFFLORA_NUM_THREADS: '1', OMP_NUM_THREADS: '1', OPENBLAS_NUM_THREADS: '1', OMP_WAIT_POLICY: 'PASSIVE' };
  const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', CLI, ...args], { cwd: root, env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (s) => { stderr += s; });
  child.stdout.resume();
  return new Promise((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(stderr) : reject(new Error(`difflora ${args.slice(0, 4).join(' ')} … exited ${code}:\n${stderr.slice(-3000)}`))));
  });
}

/** Images/s between the end of step `warmup` and the last step, from metrics.jsonl's per-step times. */
function throughput(out, globalBatch) {
  const lines = readFileSync(join(out, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
  const t0 = lines[warmup - 1].time;
  const t1 = lines[lines.length - 1].time;
  const measured = lines.length - warmup;
  return { imagesPerSecond: (measured * globalBatch) / (t1 - t0), secondsPerStep: (t1 - t0) / measured };
}

try {
  const model = join(tmp, 'small-sd');
  const data = join(tmp, 'data');
  writeModel(model);
  await writeData(data, 32);
  const total = steps + warmup;
  const train = (out) => ['train', `--pretrained_model_name_or_path=${model}`, `--train_data_dir=${data}`, '--resolution=64', '--random_flip',
    '--train_batch_size=1', `--max_train_steps=${total}`, '--checkpointing_steps=100000', '--seed=0', `--output_dir=${out}`];
  const cpu = cpus()[0]?.model ?? 'unknown CPU';

  const one = join(tmp, 'one');
  await cli(train(one));
  const single = throughput(one, 1);
  console.log(JSON.stringify({ processes: 1, threads: 1, batch: 1, steps, ...single, cpu, cores: cpus().length }));

  const two = join(tmp, 'two');
  const stderr = await cli(['launch', '--num_processes', '2', '--main_process_port', String(await freePort()), ...train(two)]);
  const dual = throughput(two, 2);
  const report = /data-parallel: .*?([\d.]+) ms per step waiting in collectives \(gradient all-reduce of (\d+) bytes/.exec(stderr);
  console.log(JSON.stringify({
    processes: 2, threads: 1, batch: 1, steps, ...dual, collectiveMsPerStep: report ? Number(report[1]) : null,
    allReducedBytesPerStep: report ? Number(report[2]) : null, cpu, cores: cpus().length,
  }));
  console.log(JSON.stringify({ imagesPerSecondRatio: +(dual.imagesPerSecond / single.imagesPerSecond).toFixed(3) }));
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
