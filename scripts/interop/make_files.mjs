// Trains tiny LoRA files with difflora's CLI (tiny-sd, 32 px, a few steps at lr 1e-2 so the adapters are far from
// zero) and records difflora's outputs with each file loaded, for scripts/interop/check_diffusers.py to compare with
// Python diffusers' `pipe.load_lora_weights(...)`. Not part of the test suite (CI has no Python torch).
//
// Run: npm run build:ts && node scripts/interop/make_files.mjs [outDir=/tmp/difflora-interop]
//      then python3 scripts/interop/check_diffusers.py [outDir] (see its header for PYTHONPATH)
//
// Writes <outDir>/<case>/pytorch_lora_weights.safetensors (the training output) and <outDir>/<case>/difflora_outputs.safetensors
// (inputs: sample [1,4,4,4], timestep, encoder_hidden_states [1,77,32], input_ids [1,77]; outputs: unet_out and, with a
// text-encoder LoRA, te_out = last_hidden_state; also base_unet_out / base_te_out without the LoRA).
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import sharp from 'sharp';
import { main } from '../../dist/cli/main.js';
import { Generator, StableDiffusionPipeline, saveSafetensors, torch } from '../../dist/index.js';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const model = join(root, 'test', 'fixtures', 'tiny-sd');
const out = resolve(process.argv[2] ?? '/tmp/difflora-interop');
torch.setNumThreads(2);

// a tiny imagefolder: 4 coloured pictures with captions
const data = join(out, 'data');
rmSync(out, { recursive: true, force: true });
mkdirSync(data, { recursive: true });
const lines = [];
for (let i = 0; i < 4; i++) {
  await sharp({ create: { width: 40 + 4 * i, height: 36, channels: 3, background: { r: (60 * i) % 256, g: 100 + 30 * i, b: 255 - 50 * i } } })
    .png().toFile(join(data, `${i}.png`));
  lines.push(JSON.stringify({ file_name: `${i}.png`, text: `a test picture number ${i}` }));
}
writeFileSync(join(data, 'metadata.jsonl'), lines.join('\n'));

const common = [`--pretrained_model_name_or_path=${model}`, '--resolution=32', '--train_batch_size=2', '--max_train_steps=4',
  '--learning_rate=1e-2', '--lr_warmup_steps=0', '--seed=7'];
const CASES = {
  'lora-r4-a8': ['train', ...common, `--train_data_dir=${data}`, '--lora_type=lora', '--rank=4', '--lora_alpha=8'],
  'locon-conv2-a8-ca1': ['train', ...common, `--train_data_dir=${data}`, '--lora_type=locon', '--rank=4', '--lora_alpha=8', '--conv_rank=2', '--conv_alpha=1'],
  'dora': ['train', ...common, `--train_data_dir=${data}`, '--lora_type=dora', '--rank=4', '--lora_alpha=2'],
  'dora-conv2': ['train', ...common, `--train_data_dir=${data}`, '--lora_type=dora', '--rank=4', '--lora_alpha=2', '--conv_rank=2'],
  'dreambooth-te': ['train-dreambooth', ...common, `--instance_data_dir=${data}`, '--instance_prompt=a photo of sks dog',
    '--train_text_encoder', '--rank=4', '--lora_alpha=8'],
};

const gen = (seed) => new Generator().manualSeed(seed);
const inputs = {
  sample: torch.randn([1, 4, 4, 4], { generator: gen(1) }),
  timestep: torch.tensor([10], { dtype: 'int64' }),
  encoder_hidden_states: torch.randn([1, 77, 32], { generator: gen(2) }),
  // <|startoftext|> a photo of … dog <|endoftext|>, padded with <|endoftext|>
  input_ids: torch.tensor([49406, 320, 1125, 539, 48136, 1929, 49407, ...Array(70).fill(49407)], { shape: [1, 77], dtype: 'int64' }),
};
Object.values(inputs).forEach((t) => torch.keep(t));

function outputs(pipe, withTe) {
  return torch.noGrad(() => torch.tidy(() => ({
    unet_out: pipe.unet.forward(inputs.sample, 10, inputs.encoder_hidden_states),
    ...(withTe ? { te_out: pipe.textEncoder.forward(inputs.input_ids).lastHiddenState } : {}),
  })));
}

for (const [name, argv] of Object.entries(CASES)) {
  const dir = join(out, name);
  const t0 = Date.now();
  let err = '';
  const code = await main([...argv, `--output_dir=${dir}`], { stdout: { write: () => true }, stderr: { write: (s) => { err += s; return true; } } });
  if (code !== 0) throw new Error(`${name}: exit ${code}\n${err}`);
  const withTe = name === 'dreambooth-te';
  const pipe = StableDiffusionPipeline.fromPretrained(model);
  const base = outputs(pipe, withTe);
  Object.values(base).forEach((t) => torch.keep(t));
  pipe.loadLoraWeights(dir);
  const lora = outputs(pipe, withTe);
  const rec = { ...inputs, unet_out: lora.unet_out, base_unet_out: base.unet_out };
  if (withTe) Object.assign(rec, { te_out: lora.te_out, base_te_out: base.te_out });
  saveSafetensors(join(dir, 'difflora_outputs.safetensors'), rec, { format: 'pt' });
  torch.dispose([...Object.values(base), ...Object.values(lora)]);
  pipe.dispose();
  console.log(`${name}: trained and recorded in ${((Date.now() - t0) / 1000).toFixed(1)} s → ${dir}`);
}
torch.dispose(Object.values(inputs));
