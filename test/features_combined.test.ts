// Issue #19's features together, through the CLI of each command: aspect-ratio buckets, caption dropout, cached
// latents (on disk) or text embeddings, a LoRA variant, Prodigy or Lion, and the EMA. Each run must train, write its
// files, and a run stopped at checkpoint 2 and resumed must end byte-identical to the uninterrupted one (the data
// position, the optimizer's state, the EMA, the variant's parameters and the cache all carried or rebuilt exactly).
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readSafetensorsHeader } from '../lib/io/safetensors.js';
import { runMain as run, tinySd } from './cli_helpers.js';
import { fixtures } from './helpers.js';

let tmp: string;
let data: string;
/** Mixed aspect ratios (several buckets at --resolution 32 with 8 px steps). */
const SIZES: [number, number][] = [[64, 32], [32, 64], [48, 40], [40, 48]];

beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'difflora-features-'));
  data = join(tmp, 'data');
  mkdirSync(data);
  const lines: string[] = [];
  for (const [i, [w, h]] of SIZES.entries()) {
    const raw = Buffer.alloc(w * h * 3);
    for (let p = 0; p < w * h; p++) { raw[3 * p] = (p * (3 + i)) % 256; raw[3 * p + 1] = (p % w) * 4; raw[3 * p + 2] = 50 * i; }
    await sharp(raw, { raw: { width: w, height: h, channels: 3 } }).png().toFile(join(data, `${i}.png`));
    lines.push(JSON.stringify({ file_name: `${i}.png`, text: `a picture, number ${i}, blue` }));
  }
  writeFileSync(join(data, 'metadata.jsonl'), lines.join('\n'));
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const STEPS = 4;
const COMMON = ['--resolution=32', '--center_crop', '--train_batch_size=1', '--checkpointing_steps=2', `--max_train_steps=${STEPS}`, '--seed=7',
  '--enable_bucket', '--min_bucket_reso=16', '--max_bucket_reso=64', '--bucket_reso_steps=8'];
const FILES = ['pytorch_lora_weights.safetensors', 'pytorch_lora_weights_ema.safetensors', 'pytorch_lora_weights_kohya.safetensors'];

/** Runs `argv` straight, then stopped after step 2 and resumed: every file written must be byte-identical. */
async function straightAndResumed(name: string, argv: (out: string) => string[]): Promise<string> {
  const out = join(tmp, `${name}-straight`);
  const ref = await run(argv(out));
  expect(ref.code, ref.err).toBe(0);
  const resumed = join(tmp, `${name}-resumed`);
  const half = await run([...argv(resumed), '--max_train_steps=2']);
  expect(half.code, half.err).toBe(0);
  for (const f of FILES) rmSync(join(resumed, f), { force: true });
  const rest = await run([...argv(resumed), '--resume_from_checkpoint=latest']);
  expect(rest.code, rest.err).toBe(0);
  const written = FILES.filter((f) => existsSync(join(out, f)));
  for (const f of written) expect(readFileSync(join(resumed, f)).equals(readFileSync(join(out, f))), `${name}: ${f}`).toBe(true);
  return out;
}

const keys = (f: string) => readSafetensorsHeader(f).tensors.map((t) => t.name);

describe('issue #19 features combined', () => {
  it('train: buckets + caption dropout + latents cached on disk + LoCon + Prodigy + EMA + Kohya export; resumed exactly', async () => {
    const out = await straightAndResumed('sd', (o) => ['train', `--pretrained_model_name_or_path=${tinySd}`, `--train_data_dir=${data}`, ...COMMON, '--random_flip',
      '--caption_dropout_rate=0.5', '--cache_latents_to_disk', '--lora_type=locon', '--conv_rank=2', '--optimizer=prodigy', '--learning_rate=1.0', '--use_ema',
      '--export_kohya', `--output_dir=${o}`]);
    const lora = keys(join(out, 'pytorch_lora_weights.safetensors'));
    expect(lora.some((k) => /resnets\.\d+\.conv1\.lora\.down\.weight$/.test(k))).toBe(true); // LoCon: the ResNet convs carry LoRA too
    expect(keys(join(out, 'pytorch_lora_weights_ema.safetensors')).sort()).toEqual([...lora].sort());
    expect(keys(join(out, 'pytorch_lora_weights_kohya.safetensors')).some((k) => k.startsWith('lora_unet_'))).toBe(true);
    expect(existsSync(join(data, '0.png.difflora_latents.safetensors')) || existsSync(join(out, 'latent_cache'))).toBe(true);
  });

  it('train-sdxl: buckets + caption dropout + cached text embeddings + DoRA + Lion + EMA; resumed exactly', async () => {
    const out = await straightAndResumed('xl', (o) => ['train-sdxl', `--pretrained_model_name_or_path=${join(fixtures, 'tiny-sdxl')}`, `--train_data_dir=${data}`, ...COMMON,
      '--caption_dropout_rate=0.5', '--cache_text_embeddings', '--lora_type=dora', '--optimizer=lion', '--learning_rate=1e-4', '--use_ema', `--output_dir=${o}`]);
    expect(keys(join(out, 'pytorch_lora_weights.safetensors')).some((k) => k.endsWith('lora_magnitude_vector'))).toBe(true);
  });

  it('train-dreambooth: buckets + cached latents + LoHa + AdamW + EMA; resumed exactly', async () => {
    const out = await straightAndResumed('db', (o) => ['train-dreambooth', `--pretrained_model_name_or_path=${tinySd}`, `--instance_data_dir=${data}`,
      '--instance_prompt=a photo of sks thing', ...COMMON, '--cache_latents', '--lora_type=loha', '--use_ema', '--learning_rate=1e-3', `--output_dir=${o}`]);
    expect(keys(join(out, 'pytorch_lora_weights.safetensors')).some((k) => k.endsWith('hada_w1_a'))).toBe(true);
  });
});
