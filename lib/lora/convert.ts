// LoRA files between layouts without a model: diffusers/PEFT (`unet.<path>.lora.down.weight`, `lora_A`)
// ⇄ Kohya/A1111 (`lora_unet_<path with '_'>.lora_down.weight` + `.alpha`). What is kept is each layer's
// effective update B·A·alpha/rank: diffusers reads its files with alpha = rank, so going there folds
// alpha/rank into the up matrix; going to Kohya writes alpha = rank unless the file carried alphas.
//
// Kohya names replaced every '.' of the module path by '_', so the path is rebuilt from the names SD 1.x/2.x
// UNets and CLIP text encoders use (`to_q`, `transformer_blocks`, `self_attn`, …).
import { saveSafetensors, loadSafetensors } from '../io/safetensors.js';
import { noGrad } from '../autograd.js';
import { dispose, tidy } from '../scope.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';

export type LoraLayout = 'diffusers' | 'kohya';
type Component = 'unet' | 'text_encoder';

/** One layer's LoRA: A (down) [r, in, …], B (up) [out, r, …], alpha (null: rank). */
interface LayerLora { component: Component; path: string; A?: Tensor; B?: Tensor; alpha: number | null; keys: string[] }

// Multi-word module names of SD UNets and CLIP text encoders, longest first per start word.
const COMPOUNDS = [
  'final_layer_norm', 'time_emb_proj', 'conv_norm_out', 'position_embedding', 'token_embedding',
  'down_blocks', 'up_blocks', 'mid_block', 'transformer_blocks', 'to_q', 'to_k', 'to_v', 'to_out', 'proj_in', 'proj_out',
  'conv_shortcut', 'conv_in', 'conv_out', 'time_embedding', 'linear_1', 'linear_2', 'text_model', 'self_attn',
  'q_proj', 'k_proj', 'v_proj', 'out_proj', 'layer_norm1', 'layer_norm2',
].map((c) => c.split('_')).sort((a, b) => b.length - a.length);

/** 'down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q' → 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'. */
export function kohyaToModulePath(name: string): string {
  const tokens = name.split('_');
  const parts: string[] = [];
  for (let i = 0; i < tokens.length;) {
    const hit = COMPOUNDS.find((c) => c.every((w, j) => tokens[i + j] === w));
    parts.push(hit ? hit.join('_') : (tokens[i] as string));
    i += hit ? hit.length : 1;
  }
  return parts.join('.');
}

const KOHYA_PREFIX: Record<string, Component> = { lora_unet: 'unet', lora_te: 'text_encoder', lora_te1: 'text_encoder' };
const KOHYA_KEY = /^(lora_unet|lora_te1?)_([^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)$/;
const DIFFUSERS_KEY = /^(?:(unet|text_encoder)\.)?(?:base_model\.model\.)?(.+?)\.(lora\.down|lora\.up|lora_A|lora_B)(?:\.[^.]+)?\.weight$/;
const DIFFUSERS_ALPHA = /^(?:(unet|text_encoder)\.)?(.+)\.alpha$/;

function parseLayers(tensors: Map<string, Tensor>, file: string): { layers: Map<string, LayerLora>; from: LoraLayout } {
  const layers = new Map<string, LayerLora>();
  const unknown: string[] = [];
  const layouts = new Set<LoraLayout>();
  const layer = (component: Component, path: string): LayerLora => {
    const id = `${component}:${path}`;
    let l = layers.get(id);
    if (!l) layers.set(id, (l = { component, path, alpha: null, keys: [] }));
    return l;
  };
  for (const [key, t] of tensors) {
    let m = KOHYA_KEY.exec(key);
    if (m) {
      if (/^(input_blocks|middle_block|output_blocks)_/.test(m[2] as string)) {
        throw new Error(`convert-lora: ${file}: '${key}' uses the original LDM block names (input_blocks/middle_block/output_blocks); only diffusers-style Kohya names (down_blocks/mid_block/up_blocks) are converted`);
      }
      layouts.add('kohya');
      const l = layer(KOHYA_PREFIX[m[1] as string] as Component, kohyaToModulePath(m[2] as string));
      if (m[3] === 'alpha') l.alpha = t.item();
      else if (m[3] === 'lora_down.weight') l.A = t;
      else l.B = t;
      l.keys.push(key);
      continue;
    }
    if ((m = DIFFUSERS_KEY.exec(key))) {
      layouts.add('diffusers');
      const l = layer((m[1] as Component | undefined) ?? 'unet', (m[2] as string).replace(/\.processor\.(to_q|to_k|to_v)$/, '.$1'));
      if (m[3] === 'lora.down' || m[3] === 'lora_A') l.A = t;
      else l.B = t;
      l.keys.push(key);
      continue;
    }
    if ((m = DIFFUSERS_ALPHA.exec(key))) {
      const l = layer((m[1] as Component | undefined) ?? 'unet', m[2] as string);
      l.alpha = t.item();
      l.keys.push(key);
      continue;
    }
    unknown.push(key);
  }
  if (unknown.length) throw new Error(`convert-lora: ${file}: ${unknown.length} key(s) are not LoRA weights in a known layout:\n  ${unknown.slice(0, 20).join('\n  ')}`);
  if (layouts.size !== 1) throw new Error(`convert-lora: ${file}: ${layouts.size ? 'mixes the diffusers and Kohya layouts' : 'holds no LoRA weights'}`);
  const incomplete = [...layers.values()].filter((l) => !l.A || !l.B).map((l) => `${l.component}.${l.path} (${l.keys.join(', ')})`);
  if (incomplete.length) throw new Error(`convert-lora: ${file}: layer(s) without both down and up weights:\n  ${incomplete.join('\n  ')}`);
  return { layers, from: [...layouts][0] as LoraLayout };
}

/** Reads `input`, writes `output` in `to` layout (atomically); returns the layer count and the source layout. */
export function convertLoraFile(input: string, output: string, to: LoraLayout): { layers: number; from: LoraLayout } {
  const { tensors } = loadSafetensors(input);
  try {
    const { layers, from } = parseLayers(tensors, input);
    tidy(() => noGrad(() => {
      const out = new Map<string, Tensor>();
      for (const l of layers.values()) {
        const A = l.A as Tensor;
        const B = l.B as Tensor;
        const rank = A.shape[0] ?? 1;
        if (to === 'kohya') {
          const name = `${l.component === 'unet' ? 'lora_unet' : 'lora_te'}_${l.path.replace(/\./g, '_')}`;
          out.set(`${name}.alpha`, torch.scalarTensor(l.alpha ?? rank, { dtype: 'float32' }));
          out.set(`${name}.lora_down.weight`, A);
          out.set(`${name}.lora_up.weight`, B);
        } else {
          const fold = (l.alpha ?? rank) / rank;
          const key = `${l.component}.${l.path}`;
          out.set(`${key}.lora.down.weight`, A);
          out.set(`${key}.lora.up.weight`, fold === 1 ? B : B.mul(fold).to(B.dtype));
        }
      }
      const sorted = new Map([...out].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
      saveSafetensors(output, sorted, to === 'kohya' ? { ss_network_module: 'networks.lora' } : { format: 'pt' });
    }));
    return { layers: layers.size, from };
  } finally {
    dispose([...tensors.values()]);
  }
}
