// LoRA files between layouts without a model: diffusers/PEFT (`unet.<path>.lora.down.weight`, `lora_A`)
// ⇄ Kohya/A1111 (`lora_unet_<path with '_'>.lora_down.weight` + `.alpha`). What is kept is each layer's
// effective update B·A·alpha/rank: diffusers reads its files with one alpha per model, its first layer's rank
// (formats.ts's diffusersAlphas; alpha = rank when all ranks are equal), so going there folds alpha/that into the
// up matrix; going to Kohya writes that alpha unless the file carried alphas.
// Reading and checking is load.ts's readLora and formats.ts's parseLoraFile, as for every LoRA load: a refused
// file writes nothing.
import { noGrad } from '../autograd.js';
import { saveSafetensors } from '../io/safetensors.js';
import { tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import {
  assertValidLora, lycorisKohyaKeys, sgmToDiffusersPath, sortedByKey, toDiffusersKeys, toKohyaKeys, withDiffusersAlphas,
  type LoraDescription, type LoraEntry, type LoraLayout, type LoraPairEntry, type LycorisEntry,
} from './formats.js';
import { readLora } from './load.js';

export { kohyaToModulePath, type LoraLayout } from './formats.js';

const WHAT = 'convert-lora';

export interface ConvertLoraOptions {
  /**
   * layers_per_block of the UNet the file is for, to map Kohya names in the original LDM blocks
   * (input_blocks/middle_block/output_blocks) to diffusers' (default 2: every SD 1.x/2.x and SDXL UNet).
   */
  layersPerBlock?: number;
}

/** Kohya UNet paths in LDM/SGM blocks mapped to diffusers' blocks, as loading maps them with the UNet's config. */
function diffusersPaths(d: LoraDescription, layersPerBlock: number): LoraEntry[] {
  return d.entries.map((e) => {
    if (e.layout !== 'kohya' || e.component !== 'unet') return e;
    const path = sgmToDiffusersPath(e.path, layersPerBlock);
    if (path === null) throw new Error(`${WHAT} (${d.file}): '${e.keys[0] ?? ''}' names no block of a UNet with ${layersPerBlock} layers per block`);
    return { ...e, path };
  });
}

/** Reads `input`, writes `output` in `to` layout (atomically); returns the layer count and the source layout. */
export function convertLoraFile(input: string, output: string, to: LoraLayout, options: ConvertLoraOptions = {}): { layers: number; from: LoraLayout } {
  const layersPerBlock = options.layersPerBlock ?? 2;
  if (!Number.isInteger(layersPerBlock) || layersPerBlock < 1) throw new RangeError(`${WHAT}: layersPerBlock must be a whole number ≥ 1, got ${layersPerBlock}`);
  const read = readLora(input, WHAT);
  try {
    const d = read.description;
    assertValidLora(d, WHAT);
    // a diffusers/PEFT file without alphas as diffusers reads it (diffusersAlphas: alpha = rank unless ranks differ)
    const entries = withDiffusersAlphas(diffusersPaths(d, layersPerBlock));
    const pairs = entries.filter((e): e is LoraPairEntry => e.type === 'lora');
    const lycoris = entries.filter((e): e is LycorisEntry => e.type !== 'lora');
    if (to === 'diffusers' && lycoris.length) {
      const kinds = [...new Set(lycoris.map((e) => (e.type === 'loha' ? 'LoHa' : 'LoKr')))].join(' and ');
      throw new Error(`${WHAT} (${d.file}): ${lycoris.length} layer(s) are LyCORIS ${kinds} (e.g. ${lycoris[0]?.keys.join(', ') ?? ''}), which the diffusers/PEFT LoRA layout cannot express (a LoRA is B·A; ${kinds} is not); convert to kohya, or load the file as it is`);
    }
    tidy(() => noGrad(() => {
      let out: Map<string, Tensor>;
      if (to === 'kohya') {
        const sdxl = entries.some((e) => e.component === 'text_encoder_2');
        out = new Map([...toKohyaKeys(pairs), ...lycorisKohyaKeys(lycoris, sdxl)]);
      } else out = toDiffusersKeys(pairs);
      saveSafetensors(output, sortedByKey(out), to === 'kohya' ? { ss_network_module: lycoris.length ? 'lycoris.kohya' : 'networks.lora' } : { format: 'pt' });
    }));
    const from: LoraLayout = d.entries.some((e) => e.layout === 'kohya') ? 'kohya' : 'diffusers';
    return { layers: d.entries.length, from };
  } finally {
    read.dispose();
  }
}
