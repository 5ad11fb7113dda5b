// LoRA file formats beyond diffusers/PEFT/Kohya LoRA (goldens/lora_formats, PEFT 0.13.2 on tiny-sd): Kohya files
// with LDM module names, LyCORIS LoHa and LoKr, DoRA as a diffusers and as a Kohya file. Each loads through
// loadLoraWeights, gives PEFT's image and merged weights, fuses/unfuses bit-exactly, and converts where the target
// layout can express it.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadSafetensors, saveSafetensors } from '../lib/io/safetensors.js';
import { convertLoraFile } from '../lib/lora/convert.js';
import { diffusersAlphas } from '../lib/lora/formats.js';
import { loraLayers } from '../lib/lora/attach.js';
import { deleteAdapters, fuseLora, loadLoraWeights, setAdapters, unfuseLora, unloadLoraWeights } from '../lib/lora/adapters.js';
import type { LoraLayer } from '../lib/lora/lora_layer.js';
import type { Module } from '../lib/nn/module.js';
import { StableDiffusionPipeline } from '../lib/pipelines/stable_diffusion.js';
import { dispose, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { bitEqual, fixtures, goldenFile, relErr } from './helpers.js';

const tinySd = join(fixtures, 'tiny-sd');
const dir = join(fixtures, 'goldens', 'lora-formats');
const golden = goldenFile('lora_formats.safetensors');
const inference = goldenFile('inference.safetensors');
const kohya = goldenFile('kohya.safetensors');
const meta = JSON.parse(readFileSync(join(fixtures, 'goldens', 'lora_formats.json'), 'utf8')) as { tensors: Record<string, unknown> };
const kwargs = { prompt: 'a pokemon with blue eyes', negativePrompt: '', guidanceScale: 7.5, numInferenceSteps: 4, height: 64, width: 64 };

let pipe: StableDiffusionPipeline;
let tmp: string;
beforeAll(() => {
  pipe = StableDiffusionPipeline.fromPretrained(tinySd);
  tmp = mkdtempSync(join(tmpdir(), 'difflora-formats-'));
});
afterAll(() => {
  pipe.dispose();
  golden.dispose();
  inference.dispose();
  kohya.dispose();
  rmSync(tmp, { recursive: true, force: true });
});

async function image(): Promise<Tensor> {
  const out = await pipe.generate({ ...kwargs, latents: inference.get('latents'), outputType: 'array' });
  const { data, shape } = out.array!;
  return torch.tensor(data, { shape });
}

function layerAt(path: string, model: Module = pipe.unet): LoraLayer {
  const l = loraLayers(model).find(([p]) => p === path)?.[1];
  if (!l) throw new Error(`no LoRA layer at ${path}`);
  return l;
}

/** The golden's merged_weight/ entries of a section: [module path, model]. */
function mergedOf(section: string): [string, string][] {
  return Object.keys(meta.tensors).filter((k) => k.startsWith(`${section}/merged_weight/`)).map((k) => k.slice(`${section}/merged_weight/`.length))
    .map((p) => (p.startsWith('text_encoder.') ? [p.slice('text_encoder.'.length), 'te'] : [p, 'unet']) as [string, string]);
}

/** Loads a file, checks the image (unfused and fused) and the merged weights, unfuse and unload bit-exact. */
async function checkFile(file: string, section: string, ref: Tensor, opts: { te?: boolean } = {}): Promise<void> {
  const baseUnet = new Map([...pipe.unet.stateDict()].map(([k, t]) => [k, t.clone()]));
  const r = pipe.loadLoraWeights(join(dir, file));
  try {
  if (opts.te) expect(r.textEncoderLayers).toBeGreaterThan(0);
  const unfused = await image();
  const e1 = relErr(unfused, ref);
  pipe.fuseLora();
  let worst = 0;
  for (const [path, where] of mergedOf(section)) {
    const model = where === 'te' ? pipe.textEncoder : pipe.unet;
    const l = layerAt(path, model);
    worst = Math.max(worst, relErr(l.base_layer.weight, golden.get(`${section}/merged_weight/${where === 'te' ? 'text_encoder.' : ''}${path}`)));
  }
  const fused = await image();
  const e2 = relErr(fused, ref);
  pipe.unfuseLora();
  for (const [path, where] of mergedOf(section)) {
    const model = where === 'te' ? pipe.textEncoder : pipe.unet;
    expect(bitEqual(layerAt(path, model).base_layer.weight, golden.get(`${section}/base_weight/${where === 'te' ? 'text_encoder.' : ''}${path}`)), path).toBe(true);
  }
  const again = await image();
  console.log(`${file}: image rel err unfused ${e1.toExponential(2)}, fused ${e2.toExponential(2)}; merged weights worst ${worst.toExponential(2)}`);
  expect(e1).toBeLessThan(1e-4);
  expect(e2).toBeLessThan(1e-4);
  expect(worst).toBeLessThan(1e-5);
  expect(bitEqual(again, unfused)).toBe(true);
  dispose([unfused, fused, again]);
  } finally {
    pipe.unloadLoraWeights();
  }
  const sd = pipe.unet.stateDict();
  expect([...sd.keys()]).toEqual([...baseUnet.keys()]);
  expect([...sd].filter(([k, t]) => !bitEqual(t, baseUnet.get(k) as Tensor)).map(([k]) => k)).toEqual([]);
  dispose([...baseUnet.values()]);
}

describe('goldens/lora_formats: every file gives PEFT\'s image and merged weights', () => {
  it('Kohya with LDM names (input_blocks/middle_block/output_blocks), UNet only: the Kohya golden image', async () => {
    await checkFile('kohya_ldm_unet.safetensors', 'kohya_ldm_unet', kohya.get('kohya/image'));
  });
  it('Kohya with LDM names and lora_te_ keys', async () => {
    await checkFile('kohya_ldm_unet_te.safetensors', 'kohya_ldm_unet_te', golden.get('kohya_ldm_unet_te/image'), { te: true });
  });
  it('LyCORIS LoHa', async () => { await checkFile('loha.safetensors', 'loha', golden.get('loha/image')); });
  it('LyCORIS LoKr (full, half and fully decomposed factors)', async () => { await checkFile('lokr.safetensors', 'lokr', golden.get('lokr/image')); });
  it('DoRA, diffusers file (lora_magnitude_vector)', async () => { await checkFile('dora_diffusers.safetensors', 'dora', golden.get('dora/image')); });
  it('DoRA, Kohya file (dora_scale [out, 1])', async () => { await checkFile('dora_kohya.safetensors', 'dora', golden.get('dora/image')); });
});

describe('several kinds on one layer, convert-lora, bad files', () => {
  const Q = 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q';
  const unetOut = (): Tensor => tidy(() => pipe.unet.forward(inference.get('latents'), torch.scalarTensor(501, { dtype: 'int64' }), torch.zeros([1, 77, 32])));

  it('LoHa + LoKr + DoRA on one layer add up; setAdapters weights, delete, fuse/unfuse bit-exact, unload', () => {
    const base = unetOut();
    loadLoraWeights({ unet: pipe.unet }, join(dir, 'loha.safetensors'), { adapterName: 'loha' });
    const w0 = layerAt(Q).base_layer.weight.clone();
    loadLoraWeights({ unet: pipe.unet }, join(dir, 'lokr.safetensors'), { adapterName: 'lokr' });
    loadLoraWeights({ unet: pipe.unet }, join(dir, 'dora_kohya.safetensors'), { adapterName: 'dora' });
    const l = layerAt(Q);
    expect(['loha', 'lokr', 'dora'].map((n) => l.adapterKind(n))).toEqual(['loha', 'lokr', 'dora']);
    // at the layer: base(x) + Σ the adapters' own additions
    const x = torch.randn([2, 5, 32]);
    const only = (n: string): Tensor => { setAdapters({ unet: pipe.unet }, n); return l.forward(x).sub(l.base_layer.forward(x)); };
    const parts = ['loha', 'lokr', 'dora'].map(only);
    setAdapters({ unet: pipe.unet }, ['loha', 'lokr', 'dora'], [0.5, 1, 1]);
    const both = l.forward(x);
    const half = (() => { setAdapters({ unet: pipe.unet }, 'loha', 0.5); return l.forward(x).sub(l.base_layer.forward(x)); })();
    const expected = l.base_layer.forward(x).add(half).add(parts[1] as Tensor).add(parts[2] as Tensor);
    expect(relErr(both, expected)).toBeLessThan(1e-6);
    expect(relErr(half, (parts[0] as Tensor).mul(0.5))).toBeLessThan(1e-6);
    setAdapters({ unet: pipe.unet }, ['loha', 'lokr', 'dora'], [0.5, 1, 1]);
    const unfused = unetOut();
    fuseLora({ unet: pipe.unet });
    const fused = unetOut();
    console.log('LoHa + LoKr + DoRA: fused vs unfused UNet output', relErr(fused, unfused));
    expect(relErr(fused, unfused)).toBeLessThan(1e-5);
    unfuseLora({ unet: pipe.unet });
    expect(bitEqual(l.base_layer.weight, w0)).toBe(true);
    deleteAdapters({ unet: pipe.unet }, ['loha', 'dora']);
    expect(l.adapterNames()).toEqual(['lokr']);
    expect(relErr(l.forward(x).sub(l.base_layer.forward(x)), parts[1] as Tensor)).toBeLessThan(1e-6);
    unloadLoraWeights({ unet: pipe.unet });
    expect(bitEqual(unetOut(), base)).toBe(true);
    dispose([base, w0, x, ...parts, both, half, expected, unfused, fused]);
  });

  it('convert-lora: LDM Kohya → diffusers, DoRA diffusers ⇄ Kohya, LoHa → Kohya round trip; LoHa → diffusers refused', () => {
    const same = (a: string, b: string): void => {
      loadLoraWeights({ unet: pipe.unet, textEncoder: pipe.textEncoder }, a, { adapterName: 'a' });
      const x = unetOut();
      unloadLoraWeights({ unet: pipe.unet, textEncoder: pipe.textEncoder });
      loadLoraWeights({ unet: pipe.unet, textEncoder: pipe.textEncoder }, b, { adapterName: 'b' });
      const y = unetOut();
      unloadLoraWeights({ unet: pipe.unet, textEncoder: pipe.textEncoder });
      const e = relErr(y, x);
      console.log(`convert ${a.split('/').pop()} → ${b.split('/').pop()}: UNet output rel err ${e.toExponential(2)}`);
      expect(e).toBeLessThan(1e-6);
      dispose([x, y]);
    };
    const out = (n: string): string => join(tmp, n);
    expect(convertLoraFile(join(dir, 'kohya_ldm_unet_te.safetensors'), out('ldm.safetensors'), 'diffusers')).toEqual({ layers: 80, from: 'kohya' });
    const keys = [...loadSafetensors(out('ldm.safetensors')).tensors.keys()];
    expect(keys).toContain('unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight');
    same(join(dir, 'kohya_ldm_unet_te.safetensors'), out('ldm.safetensors'));
    convertLoraFile(join(dir, 'dora_diffusers.safetensors'), out('dora_k.safetensors'), 'kohya');
    convertLoraFile(out('dora_k.safetensors'), out('dora_d.safetensors'), 'diffusers');
    same(join(dir, 'dora_diffusers.safetensors'), out('dora_k.safetensors'));
    same(join(dir, 'dora_diffusers.safetensors'), out('dora_d.safetensors'));
    same(join(dir, 'dora_kohya.safetensors'), out('dora_d.safetensors'));
    convertLoraFile(join(dir, 'loha.safetensors'), out('loha_k.safetensors'), 'kohya');
    same(join(dir, 'loha.safetensors'), out('loha_k.safetensors'));
    expect(() => convertLoraFile(join(dir, 'loha.safetensors'), out('loha_d.safetensors'), 'diffusers')).toThrow(/48 layer\(s\) are LyCORIS LoHa[^]*cannot express/);
    expect(() => convertLoraFile(join(dir, 'lokr.safetensors'), out('lokr_d.safetensors'), 'diffusers')).toThrow(/LoKr/);
  });

  it('an unknown key, a missing factor or a bad magnitude in such a file is an error naming it; the UNet is unchanged', () => {
    const before = unetOut();
    const bad = (file: string, edit: (m: Map<string, Tensor>) => void, re: RegExp): void => {
      const m = loadSafetensors(join(dir, file)).tensors;
      edit(m);
      const f = join(tmp, `bad_${file}`);
      saveSafetensors(f, m);
      expect(() => loadLoraWeights({ unet: pipe.unet }, f)).toThrow(re);
      expect(loraLayers(pipe.unet)).toEqual([]);
      dispose([...m.values()]);
    };
    const K = 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q';
    bad('loha.safetensors', (m) => m.set(`${K}.hada_w3_a`, torch.zeros([2, 2])), /hada_w3_a/);
    bad('loha.safetensors', (m) => m.delete(`${K}.hada_w2_b`), new RegExp(`hada_w2_b missing`));
    bad('lokr.safetensors', (m) => m.set(`${K}.lokr_w2`, torch.zeros([8, 8])), /both lokr_w2 and lokr_w2_a/);
    bad('dora_kohya.safetensors', (m) => m.set(`${K}.dora_scale`, torch.ones([1, 32])), /dora_scale[^]*wd_on_output=False/);
    bad('kohya_ldm_unet.safetensors', (m) => m.set('lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_mid.weight', torch.zeros([2, 2])), /lora_mid/);
    bad('kohya_ldm_unet.safetensors', (m) => m.set('lora_unet_input_blocks_9_1_transformer_blocks_0_attn1_to_q.lora_down.weight', torch.zeros([4, 32])), /input_blocks_9_1/);
    expect(bitEqual(unetOut(), before)).toBe(true);
    before.dispose();
  });
});

describe("diffusersAlphas: the one lora_alpha diffusers 0.31's get_peft_kwargs gives a model of a file without alphas", () => {
  const l = (component: 'unet' | 'text_encoder', path: string, rank: number) => ({ component, path, rank, upKey: `${component}.${path}.lora.up.weight` });
  it("the UNet's first up key in sorted order; a text encoder's first in text_encoder_attn_modules order (out_proj, q, k, v of each layer, then fc1/fc2)", () => {
    const alphas = diffusersAlphas([
      l('unet', 'down_blocks.1.resnets.0.conv1', 2), l('unet', 'down_blocks.0.attentions.0.proj_in', 8), l('unet', 'mid_block.resnets.0.conv1', 2),
      l('text_encoder', 'text_model.encoder.layers.0.mlp.fc1', 16), l('text_encoder', 'text_model.encoder.layers.1.self_attn.q_proj', 2),
      l('text_encoder', 'text_model.encoder.layers.1.self_attn.out_proj', 6), l('text_encoder', 'text_model.encoder.layers.0.self_attn.v_proj', 4),
    ]);
    expect(Object.fromEntries(alphas)).toEqual({ unet: 8, text_encoder: 4 });
  });
});
