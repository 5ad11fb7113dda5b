// LoRA files between layouts without a model: diffusers/PEFT (`unet.<path>.lora.down.weight`, `lora_A`)
// ⇄ Kohya/A1111 (`lora_unet_<path with '_'>.lora_down.weight` + `.alpha`). What is kept is each layer's
// effective update B·A·alpha/rank: diffusers reads its files with alpha = rank, so going there folds
// alpha/rank into the up matrix; going to Kohya writes alpha = rank unless the file carried alphas.
// Reading and checking is load.ts's readLora and formats.ts's parseLoraFile, as for every LoRA load: a refused
// file writes nothing.
import { noGrad } from '../autograd.js';
import { saveSafetensors } from '../io/safetensors.js';
import { tidy } from '../scope.js';
import { assertValidLora, sortedByKey, toDiffusersKeys, toKohyaKeys, type LoraDescription, type LoraLayout } from './formats.js';
import { readLora } from './load.js';

export { kohyaToModulePath, type LoraLayout } from './formats.js';

const WHAT = 'convert-lora';

/** Without a model to match against, Kohya names must be diffusers-style to be renamed reliably. */
function refuseLdmNames(d: LoraDescription): void {
  const ldm = d.entries.filter((e) => e.layout === 'kohya' && /^(input_blocks|middle_block|output_blocks)\./.test(e.path));
  if (ldm.length) {
    throw new Error(`${WHAT} (${d.file}): '${ldm[0]?.keys[0] ?? ''}' uses the original LDM block names (input_blocks/middle_block/output_blocks); only diffusers-style Kohya names (down_blocks/mid_block/up_blocks) are converted`);
  }
}

/** Reads `input`, writes `output` in `to` layout (atomically); returns the layer count and the source layout. */
export function convertLoraFile(input: string, output: string, to: LoraLayout): { layers: number; from: LoraLayout } {
  const read = readLora(input, WHAT);
  try {
    const d = read.description;
    assertValidLora(d, WHAT);
    refuseLdmNames(d);
    tidy(() => noGrad(() => {
      const out = to === 'kohya' ? toKohyaKeys(d.entries) : toDiffusersKeys(d.entries);
      saveSafetensors(output, sortedByKey(out), to === 'kohya' ? { ss_network_module: 'networks.lora' } : { format: 'pt' });
    }));
    const from: LoraLayout = d.entries.some((e) => e.layout === 'kohya') ? 'kohya' : 'diffusers';
    return { layers: d.entries.length, from };
  } finally {
    read.dispose();
  }
}
