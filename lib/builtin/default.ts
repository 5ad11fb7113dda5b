// The built-in default of `difflora train` (and `difflora train-sdxl`) with no model or data flags: a tiny Stable
// Diffusion (or SDXL) pipeline with random weights in diffusers layout and a small set of synthetic captioned
// pictures, both generated here (nothing is downloaded), so a newcomer sees the whole job run in about a minute
// on 2 CPU cores.
import { existsSync, lstatSync, mkdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { saveSafetensors } from '../io/safetensors.js';
import { AutoencoderKL } from '../models/autoencoder_kl.js';
import { CLIPTextModel, CLIPTextModelWithProjection } from '../models/clip_text_model.js';
import { bytesToUnicode } from '../models/clip_tokenizer.js';
import { UNet2DConditionModel } from '../models/unet_2d_condition.js';
import { manualSeed } from '../random.js';
import type { Tensor } from '../tensor.js';

/** The generated pipeline: Stable Diffusion 1.x-like (`difflora train`) or SDXL-like (`difflora train-sdxl`). */
export type BuiltinKind = 'sd' | 'sdxl';
const VERSIONS: Record<BuiltinKind, string> = { sd: 'builtin-v1', sdxl: 'builtin-sdxl-v1' };

// A byte-level vocabulary (every byte, alone and word-final) and no merges: any caption tokenizes, and the
// text encoder stays tiny. '<|endoftext|>' has the largest id, as CLIP's legacy pooling (eos id 2) assumes.
function tokenizerFiles(): Record<string, string> {
  const chars = bytesToUnicode();
  const vocab: Record<string, number> = {};
  for (const c of chars) vocab[c] = Object.keys(vocab).length;
  for (const c of chars) vocab[`${c}</w>`] = Object.keys(vocab).length;
  vocab['<|startoftext|>'] = Object.keys(vocab).length;
  vocab['<|endoftext|>'] = Object.keys(vocab).length;
  return {
    'vocab.json': JSON.stringify(vocab),
    'merges.txt': '#version: 0.2\n',
    'tokenizer_config.json': JSON.stringify({ model_max_length: 77, bos_token: '<|startoftext|>', eos_token: '<|endoftext|>', unk_token: '<|endoftext|>', pad_token: '<|endoftext|>', tokenizer_class: 'CLIPTokenizer' }),
    'special_tokens_map.json': JSON.stringify({ bos_token: '<|startoftext|>', eos_token: '<|endoftext|>', unk_token: '<|endoftext|>', pad_token: '<|endoftext|>' }),
  };
}

const configs = {
  unet: {
    _class_name: 'UNet2DConditionModel', sample_size: 16, in_channels: 4, out_channels: 4, layers_per_block: 1,
    block_out_channels: [32, 64], down_block_types: ['CrossAttnDownBlock2D', 'DownBlock2D'], up_block_types: ['UpBlock2D', 'CrossAttnUpBlock2D'],
    cross_attention_dim: 32, attention_head_dim: 4, norm_num_groups: 32,
  },
  vae: {
    _class_name: 'AutoencoderKL', in_channels: 3, out_channels: 3, latent_channels: 4, block_out_channels: [32, 64], layers_per_block: 1,
    down_block_types: ['DownEncoderBlock2D', 'DownEncoderBlock2D'], up_block_types: ['UpDecoderBlock2D', 'UpDecoderBlock2D'], norm_num_groups: 32, sample_size: 32,
  },
  text_encoder: {
    architectures: ['CLIPTextModel'], hidden_size: 32, intermediate_size: 37, num_attention_heads: 4, num_hidden_layers: 2,
    max_position_embeddings: 77, vocab_size: 514, hidden_act: 'quick_gelu', layer_norm_eps: 1e-5, bos_token_id: 0, eos_token_id: 2, pad_token_id: 1,
  },
  scheduler: {
    _class_name: 'DDPMScheduler', num_train_timesteps: 1000, beta_start: 0.00085, beta_end: 0.012, beta_schedule: 'scaled_linear',
    prediction_type: 'epsilon', clip_sample: false,
  },
};

/**
 * The SDXL pipeline's parts, shaped like SDXL base (DownBlock2D then cross-attention blocks, the 'text_time'
 * added conditions, a second text encoder with a projection) at toy width: 8 + 16 = 24 wide prompt embeddings,
 * pooled 16, 6 time ids × 8.
 */
const sdxlConfigs = {
  unet: {
    _class_name: 'UNet2DConditionModel', sample_size: 16, in_channels: 4, out_channels: 4, layers_per_block: 2, block_out_channels: [16, 32, 32],
    down_block_types: ['DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'], up_block_types: ['CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'],
    transformer_layers_per_block: [1, 1, 2], attention_head_dim: [1, 2, 4], use_linear_projection: true, cross_attention_dim: 24, norm_num_groups: 8,
    addition_embed_type: 'text_time', addition_time_embed_dim: 8, projection_class_embeddings_input_dim: 6 * 8 + 16,
  },
  text_encoder: { ...configs.text_encoder, hidden_size: 8, intermediate_size: 16, num_attention_heads: 2, num_hidden_layers: 3 },
  text_encoder_2: {
    ...configs.text_encoder, architectures: ['CLIPTextModelWithProjection'], hidden_size: 16, intermediate_size: 32, num_attention_heads: 2,
    num_hidden_layers: 3, hidden_act: 'gelu', projection_dim: 16,
  },
};

function writeModel(dir: string, kind: BuiltinKind): void {
  manualSeed(0);
  const sdxl = kind === 'sdxl';
  const unetConfig = sdxl ? sdxlConfigs.unet : configs.unet;
  const textConfig = sdxl ? sdxlConfigs.text_encoder : configs.text_encoder;
  const files: [string, Record<string, string>][] = [
    ['tokenizer', tokenizerFiles()],
    ...(sdxl ? [['tokenizer_2', tokenizerFiles()] as [string, Record<string, string>]] : []),
    ['scheduler', { 'scheduler_config.json': JSON.stringify(configs.scheduler) }],
    ['unet', { 'config.json': JSON.stringify(unetConfig) }],
    ['vae', { 'config.json': JSON.stringify(configs.vae) }],
    ['text_encoder', { 'config.json': JSON.stringify(textConfig) }],
    ...(sdxl ? [['text_encoder_2', { 'config.json': JSON.stringify(sdxlConfigs.text_encoder_2) }] as [string, Record<string, string>]] : []),
  ];
  for (const [sub, contents] of files) {
    mkdirSync(join(dir, sub), { recursive: true });
    for (const [name, text] of Object.entries(contents)) writeFileSync(join(dir, sub, name), text);
  }
  const pipeline = sdxl ? 'StableDiffusionXLPipeline' : 'StableDiffusionPipeline';
  const components = Object.fromEntries(files.map(([sub]) => [sub, sub.startsWith('tokenizer') ? ['transformers', 'CLIPTokenizer'] : sub === 'scheduler' ? ['diffusers', 'DDPMScheduler']
    : sub === 'text_encoder_2' ? ['transformers', 'CLIPTextModelWithProjection'] : sub === 'text_encoder' ? ['transformers', 'CLIPTextModel'] : ['diffusers', sub === 'unet' ? 'UNet2DConditionModel' : 'AutoencoderKL']]));
  writeFileSync(join(dir, 'model_index.json'), JSON.stringify({ _class_name: pipeline, _difflora: VERSIONS[kind], ...(sdxl ? components : {}) }));
  const models: [string, string, { stateDict(): Map<string, Tensor>; dispose(): void }][] = [
    ['unet', 'diffusion_pytorch_model', UNet2DConditionModel.fromConfig(unetConfig)],
    ['vae', 'diffusion_pytorch_model', new AutoencoderKL(configs.vae)],
    ['text_encoder', 'model', new CLIPTextModel(textConfig)],
    ...(sdxl ? [['text_encoder_2', 'model', new CLIPTextModelWithProjection(sdxlConfigs.text_encoder_2)] as [string, string, CLIPTextModelWithProjection]] : []),
  ];
  for (const [sub, stem, m] of models) {
    saveSafetensors(join(dir, sub, `${stem}.safetensors`), m.stateDict(), { format: 'pt' });
    m.dispose();
  }
}

const COLORS = { red: '#d62728', green: '#2ca02c', blue: '#1f77b4', yellow: '#e7ba00' } as const;
const SHAPES = ['circle', 'square'] as const;

async function writeData(dir: string): Promise<void> {
  mkdirSync(dir, { recursive: true });
  const lines: string[] = [];
  let i = 0;
  for (const [fg, fgHex] of Object.entries(COLORS)) {
    for (const shape of SHAPES) {
      const bg = fg === 'yellow' ? '#202020' : '#f0f0f0';
      const body = shape === 'circle' ? `<circle cx="32" cy="32" r="20" fill="${fgHex}"/>` : `<rect x="14" y="14" width="36" height="36" fill="${fgHex}"/>`;
      const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64" fill="${bg}"/>${body}</svg>`;
      const file = `${String(i++).padStart(2, '0')}_${fg}_${shape}.png`;
      await sharp(Buffer.from(svg)).png().toFile(join(dir, file));
      lines.push(JSON.stringify({ file_name: file, text: [`a ${fg} ${shape}`, `a simple picture of a ${fg} ${shape}`] }));
    }
  }
  writeFileSync(join(dir, 'metadata.jsonl'), `${lines.join('\n')}\n`);
}

/**
 * The default home of the built-in files: <tmpdir>/difflora-builtin-<uid>. The temp folder is shared by every
 * user of the machine, so the name is per user: two users never collide, and a folder at that name that is
 * not this user's own is not an accident (see checkOwnPrivateDir).
 */
export function defaultBuiltinRoot(): string {
  const uid = process.getuid?.();
  return join(tmpdir(), uid === undefined ? 'difflora-builtin' : `difflora-builtin-${uid}`);
}

/**
 * Refuses `dir` unless it is a real folder (not a symbolic link), owned by this user and not writable by group
 * or others: in a shared temp folder, anyone else could have made it first and planted the model or the
 * pictures that difflora would then load and train on. The error names the folder and what is wrong. (Where
 * there are no user ids, on Windows, only the symlink and folder checks apply.)
 */
export function checkOwnPrivateDir(dir: string, what = 'built-in default folder'): void {
  const st = lstatSync(dir);
  const fix = `remove it (or set TMPDIR to a folder of your own) and run again`;
  if (st.isSymbolicLink()) throw new Error(`${what} '${dir}' is a symbolic link, not a folder of its own: ${fix}`);
  if (!st.isDirectory()) throw new Error(`${what} '${dir}' exists and is not a folder: ${fix}`);
  const uid = process.getuid?.();
  if (uid !== undefined && st.uid !== uid) throw new Error(`${what} '${dir}' belongs to user id ${st.uid}, not to you (${uid}): ${fix}`);
  if (uid !== undefined && (st.mode & 0o022) !== 0) {
    const who = [st.mode & 0o020 ? 'its group' : '', st.mode & 0o002 ? 'others' : ''].filter(Boolean).join(' and ');
    throw new Error(`${what} '${dir}' is writable by ${who} (mode ${(st.mode & 0o777).toString(8)}): ${fix}`);
  }
}

/**
 * Creates (once) the built-in model and dataset under `root` (default: defaultBuiltinRoot()) and returns their
 * folders. `root` is made private (0700) if new, and refused unless it is this user's own, unwritable by
 * others. Written to a temporary folder inside it and renamed, so a half-made default is never used.
 */
export async function prepareBuiltinDefault(root = defaultBuiltinRoot(), kind: BuiltinKind = 'sd'): Promise<{ model: string; data: string }> {
  try {
    mkdirSync(root, { mode: 0o700 });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw new Error(`cannot create the built-in default folder '${root}': ${(e as Error).message}`);
  }
  checkOwnPrivateDir(root);
  const dir = join(root, VERSIONS[kind]);
  const out = { model: join(dir, 'model'), data: join(dir, 'data') };
  if (existsSync(join(out.model, 'model_index.json')) && existsSync(join(out.data, 'metadata.jsonl'))) return out;
  const tmp = `${dir}.tmp-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  writeModel(join(tmp, 'model'), kind);
  await writeData(join(tmp, 'data'));
  try {
    renameSync(tmp, dir);
  } catch (e) {
    // another process finished first: use its copy
    rmSync(tmp, { recursive: true, force: true });
    if (!existsSync(join(out.model, 'model_index.json'))) throw e;
  }
  return out;
}

/** The settings of the built-in run (used for flags the user did not give). */
export const BUILTIN_SETTINGS = {
  resolution: 32, trainBatchSize: 4, maxTrainSteps: 300, learningRate: 1e-3, checkpointingSteps: 100, seed: 0,
  outputDir: 'difflora-builtin-lora', lrWarmupSteps: 0, randomFlip: true,
} as const;
