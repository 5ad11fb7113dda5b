// The README.md that diffusers' script writes next to the LoRA (save_model_card), so a Hub upload or a
// human finds the base model, the data and the settings. Written atomically (temp file + rename).
import { renameSync, writeFileSync } from 'node:fs';
import { basename, isAbsolute, join } from 'node:path';

export interface ModelCardInfo {
  baseModel: string;
  dataset: string;
  rank: number;
  steps: number;
  learningRate: number;
  resolution: number;
  validationPrompt?: string | null;
  /** Validation images, relative to the output folder (shown in the card, as diffusers' save_model_card). */
  images?: string[];
  /** A DreamBooth run: the card of train_dreambooth_lora.py (trained on the instance prompt, text-encoder LoRA or not). */
  dreambooth?: { instancePrompt: string; trainTextEncoder: boolean };
  /** An SDXL run (train_text_to_image_lora_sdxl.py's card): text-encoder LoRA or not, and the VAE given apart. */
  sdxl?: { trainTextEncoder: boolean; vaePath: string | null };
}

/** The model as the card's title names it: a Hub id as given, a local folder by its name (not the machine's path). */
export function modelTitle(baseModel: string): string {
  const trimmed = baseModel.replace(/[/\\]+$/, '');
  return isAbsolute(trimmed) || trimmed.startsWith('.') ? basename(trimmed) : trimmed;
}

export function modelCard(c: ModelCardInfo): string {
  return [
    '---',
    'license: creativeml-openrail-m',
    `base_model: ${c.baseModel}`,
    'tags:',
    ...(c.sdxl ? ['stable-diffusion-xl', 'stable-diffusion-xl-diffusers'] : ['stable-diffusion', 'stable-diffusion-diffusers']),
    ...['text-to-image', 'diffusers', 'diffusers-training', 'lora', 'difflora'].map((t) => `- ${t}`),
    'inference: true',
    '---',
    '',
    ...(c.dreambooth ? dreamBoothDescription(c, c.dreambooth) : [
      `# LoRA text2image fine-tuning - ${modelTitle(c.baseModel)}`,
      '',
      `These are LoRA adaption weights for ${c.baseModel}. The weights were fine-tuned on the ${c.dataset} dataset with difflora ` +
        `(rank ${c.rank}, ${c.steps} steps, learning rate ${c.learningRate}, resolution ${c.resolution}).`,
      ...(c.sdxl ? ['', `LoRA for the text encoder was enabled: ${c.sdxl.trainTextEncoder ? 'True' : 'False'}.`, '', `Special VAE used for training: ${c.sdxl.vaePath ?? 'None'}.`] : []),
    ]),
    ...(c.validationPrompt ? ['', `Validation prompt: ${c.validationPrompt}`] : []),
    ...(c.images?.length ? ['', 'Some example images are below.', '', ...c.images.map((p, i) => `![img_${i}](./${p})`)] : []),
    '',
    '```python',
    `from diffusers import ${c.sdxl ? 'StableDiffusionXLPipeline' : 'StableDiffusionPipeline'}`,
    `pipe = ${c.sdxl ? 'StableDiffusionXLPipeline' : 'StableDiffusionPipeline'}.from_pretrained("${c.baseModel}")`,
    'pipe.load_lora_weights("path/to/this/folder")',
    '```',
    '',
  ].join('\n');
}

function dreamBoothDescription(c: ModelCardInfo, d: { instancePrompt: string; trainTextEncoder: boolean }): string[] {
  return [
    `# LoRA DreamBooth - ${modelTitle(c.baseModel)}`,
    '',
    `These are LoRA adaption weights for ${c.baseModel}. The weights were trained on ${d.instancePrompt} using [DreamBooth](https://dreambooth.github.io/) ` +
      `with difflora (rank ${c.rank}, ${c.steps} steps, learning rate ${c.learningRate}, resolution ${c.resolution}).`,
    '',
    `LoRA for the text encoder was enabled: ${d.trainTextEncoder ? 'True' : 'False'}.`,
  ];
}

export function saveModelCard(outputDir: string, c: ModelCardInfo): string {
  const path = join(outputDir, 'README.md');
  const tmp = `${path}.tmp-${process.pid}`;
  writeFileSync(tmp, modelCard(c));
  renameSync(tmp, path);
  return path;
}
