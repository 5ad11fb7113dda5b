// diffusers-style LoRA loading for inference (lib/lora/adapters.ts) on the tiny-sd UNet and text encoder:
// the Kohya and diffusers goldens (fused weights, per-layer alpha, outputs), several named adapters and their
// weights against a hand computation, disable/enable, a run-time scale, delete/unload back to the base
// model bit for bit, 1×1 conv LoRA, text encoder keys, and bad files (which must change nothing).
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { noGrad } from '../lib/autograd.js';
import { loadSafetensors } from '../lib/io/safetensors.js';
import { CLIPTextModel } from '../lib/models/clip_text_model.js';
import { UNet2DConditionModel } from '../lib/models/unet_2d_condition.js';
import type { Module } from '../lib/nn/module.js';
import { Conv2d, Linear } from '../lib/nn/layers.js';
import { Generator } from '../lib/random.js';
import { dispose, memory, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { attachLora, getModule, loraLayers } from '../lib/lora/attach.js';
import {
  deleteAdapters, disableLora, enableLora, fuseLora, getActiveAdapters, getListAdapters, loadLoraWeights, setAdapters,
  unfuseLora, unloadLoraWeights, withLoraScale, type LoraTargets,
} from '../lib/lora/adapters.js';
import { LoraConv2d } from '../lib/lora/lora_conv2d.js';
import type { LoraLayer } from '../lib/lora/lora_layer.js';
import { loraStateDictDiffusers, loraStateDictKohya } from '../lib/lora/save.js';
import { bitEqual, fixtures, goldenFile, relErr } from './helpers.js';

const tinySd = join(fixtures, 'tiny-sd');
const goldens = join(fixtures, 'goldens');
const kohyaFile = join(goldens, 'lora-kohya', 'tiny_sd_kohya_lora.safetensors');
const diffusersDir = join(goldens, 'lora-diffusers');
const kohyaMeta = JSON.parse(readFileSync(join(goldens, 'kohya.json'), 'utf8')) as {
  per_layer_scaling: Record<string, { peft_scaling: number; alpha: number; rank: number; adapter: string }>;
  lora_layers_after_load: string[];
};
const inferenceMeta = JSON.parse(readFileSync(join(goldens, 'inference.json'), 'utf8')) as { lora_layers_after_load: number; notes: string[] };
const sd15Targets = JSON.parse(readFileSync(join(fixtures, 'sd15-shape', 'lora_targets.json'), 'utf8')) as Record<string, { in: number; out: number; kohya: string }>;
const train = goldenFile('lora_train.safetensors');
const kohyaGold = goldenFile('kohya.safetensors');

let tmp: string;
beforeAll(() => { tmp = mkdtempSync(join(tmpdir(), 'difflora-adapters-')); });
afterAll(() => {
  train.dispose();
  kohyaGold.dispose();
  rmSync(tmp, { recursive: true, force: true });
});

const loadUnet = (): UNet2DConditionModel => UNet2DConditionModel.fromPretrained(tinySd, { subfolder: 'unet' });

function unetOut(unet: UNet2DConditionModel): Tensor {
  return noGrad(() => tidy(() => unet.forward(train.get('inputs/sample'), train.get('inputs/timesteps'), train.get('inputs/encoder_hidden_states'))));
}

function teOut(te: CLIPTextModel): Tensor {
  return noGrad(() => tidy(() => te.forward(torch.tensor([[0, 5, 17, 300, 2, 1, 1]], { dtype: 'int64' })).lastHiddenState));
}

function layerAt(model: Module, path: string): LoraLayer {
  const l = loraLayers(model).find(([p]) => p === path)?.[1];
  if (!l) throw new Error(`no LoRA layer at ${path}`);
  return l;
}

/** A snapshot of the state dict (clones) for bit comparisons. */
function snapshot(model: Module): Map<string, Tensor> {
  return new Map([...model.stateDict()].map(([k, t]) => [k, t.clone()]));
}

function expectSameState(model: Module, snap: Map<string, Tensor>): void {
  const sd = model.stateDict();
  expect([...sd.keys()]).toEqual([...snap.keys()]);
  const differ = [...sd].filter(([k, t]) => !bitEqual(t, snap.get(k) as Tensor)).map(([k]) => k);
  expect(differ).toEqual([]);
}

/** Kohya LoRA weights for some layers: random A/B of the given rank with an alpha. */
function kohyaMap(model: Module, paths: string[], rank: number, alpha: number, seed: number, prefix = 'lora_unet'): Map<string, Tensor> {
  const g = new Generator().manualSeed(seed);
  const out = new Map<string, Tensor>();
  for (const p of paths) {
    const m = getModule(model, p);
    const name = `${prefix}_${p.replace(/\./g, '_')}`;
    const [down, up] = m instanceof Conv2d
      ? [[rank, m.inChannels, m.kernelSize, m.kernelSize], [m.outChannels, rank, 1, 1]]
      : [[rank, (m as Linear).inFeatures], [(m as Linear).outFeatures, rank]];
    out.set(`${name}.alpha`, torch.scalarTensor(alpha));
    out.set(`${name}.lora_down.weight`, torch.randn(down, { generator: g }).mul(0.3));
    out.set(`${name}.lora_up.weight`, torch.randn(up, { generator: g }).mul(0.3));
  }
  return out;
}

const Q = 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q';
/** The layers kohya.safetensors holds base_weight/ and merged_weight/ of. */
const KOHYA_CHECKED = [Q, 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k', 'up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v',
  'mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0', 'mid_block.attentions.0.transformer_blocks.0.ff.net.2'];
const withBias = (x: Tensor, b: Tensor | null): Tensor => (b ? x.add(b) : x);
const PROJ_IN = 'down_blocks.0.attentions.0.proj_in';

describe('loadLoraWeights: the goldens', () => {
  it('Kohya golden: per-layer alpha (2 → 0.5, mid block 8 → 2.0), fuse equals PEFT\'s merged weights, unfuse restores bit for bit', () => {
    const unet = loadUnet();
    const base = unetOut(unet);
    const snap = snapshot(unet);
    const r = loadLoraWeights({ unet }, kohyaFile);
    expect(r).toEqual({ adapterName: 'default_0', unetLayers: 50, textEncoderLayers: 0, textEncoder2Layers: 0, formats: ['kohya'] });
    expect(loraLayers(unet).map(([p]) => p).sort()).toEqual([...kohyaMeta.lora_layers_after_load].sort());
    for (const [path, s] of Object.entries(kohyaMeta.per_layer_scaling)) {
      const l = layerAt(unet, path);
      expect([path, l.adapterNames(), l.scalingOf('default_0')]).toEqual([path, [s.adapter], s.peft_scaling]);
    }
    expect(new Set(Object.values(kohyaMeta.per_layer_scaling).map((s) => s.peft_scaling))).toEqual(new Set([0.5, 2]));
    for (const path of KOHYA_CHECKED) expect(bitEqual(layerAt(unet, path).base_layer.weight, kohyaGold.get(`base_weight/${path}`))).toBe(true);
    const unfused = unetOut(unet);
    expect(relErr(unfused, base)).toBeGreaterThan(1e-4);
    fuseLora({ unet });
    let worst = 0;
    for (const path of KOHYA_CHECKED) {
      worst = Math.max(worst, relErr(layerAt(unet, path).base_layer.weight, kohyaGold.get(`merged_weight/${path}`)));
    }
    const fused = unetOut(unet);
    const outErr = relErr(unfused, fused);
    console.log('Kohya golden: fused weights vs PEFT merged, worst rel err', worst, '; unfused vs fused output', outErr);
    expect(worst).toBeLessThan(1e-6);
    expect(outErr).toBeLessThan(1e-5);
    unfuseLora({ unet });
    for (const path of KOHYA_CHECKED) expect(bitEqual(layerAt(unet, path).base_layer.weight, kohyaGold.get(`base_weight/${path}`))).toBe(true);
    expect(bitEqual(unetOut(unet), unfused)).toBe(true);
    unloadLoraWeights({ unet });
    expectSameState(unet, snap);
    expect(bitEqual(unetOut(unet), base)).toBe(true);
    dispose([base, unfused, fused, ...snap.values()]);
    unet.dispose();
  });

  it('diffusers golden: 48 layers as \'default_0\', output equal to the in-memory model it was saved from', () => {
    expect(inferenceMeta.notes.join(' ')).toContain("adapter 'default_0'");
    const src = loadUnet();
    const h = attachLora(src, { rank: 4, alpha: 4 });
    noGrad(() => { for (const [n, p] of h.namedParameters()) p.copy_(train.get(`lora_init/${n}`)); });
    const unet = loadUnet();
    const r = loadLoraWeights({ unet }, diffusersDir);
    expect(r).toEqual({ adapterName: 'default_0', unetLayers: inferenceMeta.lora_layers_after_load, textEncoderLayers: 0, textEncoder2Layers: 0, formats: ['diffusers'] });
    expect(getActiveAdapters({ unet })).toEqual(['default_0']);
    expect(getListAdapters({ unet })).toEqual({ unet: ['default_0'], text_encoder: [] });
    const [a, b] = [unetOut(unet), unetOut(src)];
    const err = relErr(a, b);
    console.log('diffusers golden loaded vs in-memory model, rel err', err);
    expect(err).toBeLessThan(1e-6);
    dispose([a, b]);
    src.dispose();
    unet.dispose();
  });

  it('round trip diffusers → Kohya → diffusers keeps every effective weight B·A·alpha/rank', () => {
    const u1 = loadUnet();
    loadLoraWeights({ unet: u1 }, diffusersDir);
    // alpha 2 on the way: the Kohya file carries it, the diffusers file folds it into lora.up
    for (const [, l] of loraLayers(u1)) l.alpha = 2;
    const kohya = loraStateDictKohya(u1);
    const u2 = loadUnet();
    expect(loadLoraWeights({ unet: u2 }, kohya, { adapterName: 'k' }).formats).toEqual(['kohya']);
    const diffusers = loraStateDictDiffusers(u2);
    const u3 = loadUnet();
    loadLoraWeights({ unet: u3 }, diffusers);
    let worst = 0;
    for (const [path, l] of loraLayers(u1)) {
      const d1 = l.deltaWeight();
      const d3 = layerAt(u3, path).deltaWeight();
      worst = Math.max(worst, relErr(d3, d1));
      dispose([d1, d3]);
    }
    console.log('diffusers → Kohya → diffusers, worst rel err of B·A·alpha/rank', worst);
    expect(worst).toBeLessThan(1e-6);
    dispose([...kohya.values(), ...diffusers.values()]);
    for (const u of [u1, u2, u3]) u.dispose();
  });
});

describe('several adapters', () => {
  it('setAdapters([a, b], [0.7, 0.3]) = base + Σ w·alpha/rank·B·A·x on a layer, by hand; 1×1 conv LoRA; delete', () => {
    const unet = loadUnet();
    const t: LoraTargets = { unet };
    const fileB = kohyaMap(unet, [Q, PROJ_IN, 'mid_block.attentions.0.transformer_blocks.0.ff.net.2'], 2, 1, 3);
    expect(loadLoraWeights(t, diffusersDir, { adapterName: 'a' }).unetLayers).toBe(48);
    expect(loadLoraWeights(t, fileB, { adapterName: 'b' }).unetLayers).toBe(3);
    expect(getActiveAdapters(t)).toEqual(['b']); // diffusers: the adapter just loaded is the active one
    expect(getListAdapters(t)).toEqual({ unet: ['a', 'b'], text_encoder: [] });
    expect(getModule(unet, PROJ_IN)).toBeInstanceOf(LoraConv2d);
    setAdapters(t, ['a', 'b'], [0.7, 0.3]);
    expect(getActiveAdapters(t)).toEqual(['a', 'b']);
    const fileA = loadSafetensors(join(diffusersDir, 'pytorch_lora_weights.safetensors')).tensors;
    const errs = tidy(() => {
      const x = torch.randn([2, 6, 32], { generator: new Generator().manualSeed(1) });
      const l = layerAt(unet, Q);
      const y = noGrad(() => l.forward(x));
      const base = l.base_layer as Linear;
      const Aa = fileA.get(`unet.${Q}.lora.down.weight`) as Tensor;
      const Ba = fileA.get(`unet.${Q}.lora.up.weight`) as Tensor;
      const kb = `lora_unet_${Q.replace(/\./g, '_')}`;
      const Ab = fileB.get(`${kb}.lora_down.weight`) as Tensor;
      const Bb = fileB.get(`${kb}.lora_up.weight`) as Tensor;
      const want = withBias(x.matmul(base.weight.t()), base.bias)
        .add(x.matmul(Aa.t()).matmul(Ba.t()).mul(0.7 * 4 / 4))
        .add(x.matmul(Ab.t()).matmul(Bb.t()).mul(0.3 * 1 / 2));
      // the 1×1 conv: base conv + 0.3·(1/2)·conv(conv(x, A), B)
      const img = torch.randn([1, 32, 4, 4], { generator: new Generator().manualSeed(2) });
      const c = layerAt(unet, PROJ_IN);
      const yc = noGrad(() => c.forward(img));
      const kc = `lora_unet_${PROJ_IN.replace(/\./g, '_')}`;
      const bc = c.base_layer as Conv2d;
      const flat = (w: Tensor): Tensor => w.reshape([w.shape[0] as number, w.shape[1] as number]);
      const tok = img.permute([0, 2, 3, 1]);
      const wantC = withBias(tok.matmul(flat(bc.weight).t()), bc.bias)
        .add(tok.matmul(flat(fileB.get(`${kc}.lora_down.weight`) as Tensor).t()).matmul(flat(fileB.get(`${kc}.lora_up.weight`) as Tensor).t()).mul(0.3 / 2))
        .permute([0, 3, 1, 2]);
      return { linear: relErr(y, want), conv: relErr(yc, wantC) };
    });
    console.log('two adapters vs the hand formula, rel err', errs);
    expect(errs.linear).toBeLessThan(1e-6);
    expect(errs.conv).toBeLessThan(1e-6);
    // fusing both bakes exactly that in
    const both = unetOut(unet);
    fuseLora(t);
    const fused = unetOut(unet);
    expect(relErr(fused, both)).toBeLessThan(1e-5);
    unfuseLora(t);
    // delete b: proj_in and ff.net.2 (b only) are plain layers again, a stays active alone
    deleteAdapters(t, 'b');
    expect(getListAdapters(t).unet).toEqual(['a']);
    expect(getActiveAdapters(t)).toEqual(['a']);
    expect(getModule(unet, PROJ_IN)).toBeInstanceOf(Conv2d);
    expect(loraLayers(unet).length).toBe(48);
    expect(() => setAdapters(t, ['a', 'b'])).toThrow(/no adapter 'b'; the adapters are: a/);
    dispose([both, fused, ...fileA.values(), ...fileB.values()]);
    unet.dispose();
  });

  it('disable/enable, withLoraScale(0.5) = half the delta (restored after a throw), unload = the base model bit for bit', () => {
    const unet = loadUnet();
    const t: LoraTargets = { unet };
    const names = unet.namedParameters().map(([n]) => n);
    const snap = snapshot(unet);
    const base = unetOut(unet);
    loadLoraWeights(t, diffusersDir);
    const full = unetOut(unet);
    disableLora(t);
    const off = unetOut(unet);
    expect(bitEqual(off, base)).toBe(true);
    enableLora(t);
    const on = unetOut(unet);
    expect(bitEqual(on, full)).toBe(true);
    // one layer: exactly base + 0.5·delta
    const halfErr = tidy(() => {
      const l = layerAt(unet, Q);
      const x = torch.randn([2, 6, 32], { generator: new Generator().manualSeed(4) });
      const b = noGrad(() => l.base_layer.forward(x));
      const d = noGrad(() => l.forward(x)).sub(b);
      const y = withLoraScale(t, 0.5, () => noGrad(() => l.forward(x)));
      return relErr(y, b.add(d.mul(0.5)));
    });
    expect(halfErr).toBeLessThan(1e-6);
    // the whole UNet: the same as adapter weight 0.5
    const half = withLoraScale(t, 0.5, () => unetOut(unet));
    setAdapters(t, 'default_0', 0.5);
    const weighted = unetOut(unet);
    expect(bitEqual(half, weighted)).toBe(true);
    expect(relErr(half, full)).toBeGreaterThan(1e-5);
    setAdapters(t, 'default_0');
    expect(() => withLoraScale(t, 0.5, () => { throw new Error('boom'); })).toThrow('boom');
    expect(loraLayers(unet).every(([, l]) => l.scale === 1)).toBe(true);
    const again = unetOut(unet);
    expect(bitEqual(again, full)).toBe(true);
    fuseLora(t, { loraScale: 0.5 });
    const fusedHalf = unetOut(unet);
    expect(relErr(fusedHalf, half)).toBeLessThan(1e-5);
    unloadLoraWeights(t);
    expect(unet.namedParameters().map(([n]) => n)).toEqual(names);
    expectSameState(unet, snap);
    expect(bitEqual(unetOut(unet), base)).toBe(true);
    expect(getListAdapters(t)).toEqual({ unet: [], text_encoder: [] });
    dispose([base, full, off, on, half, weighted, again, fusedHalf, ...snap.values()]);
    unet.dispose();
  });

  it('100 load/unload cycles leave the live tensor count where it started', () => {
    const unet = loadUnet();
    const t: LoraTargets = { unet };
    const live = memory().numTensors;
    for (let i = 0; i < 100; i++) {
      loadLoraWeights(t, diffusersDir);
      if (i % 10 === 0) { fuseLora(t); unfuseLora(t); }
      unloadLoraWeights(t);
    }
    expect(memory().numTensors).toBe(live);
    unet.dispose();
  });
});

describe('text encoder', () => {
  it('Kohya lora_te_ keys (q_proj, mlp_fc1) load into CLIPTextModel; the formula holds; unload restores', () => {
    const unet = loadUnet();
    const te = CLIPTextModel.fromPretrained(tinySd, { subfolder: 'text_encoder' });
    const t: LoraTargets = { unet, textEncoder: te };
    const tq = 'text_model.encoder.layers.0.self_attn.q_proj';
    const fc1 = 'text_model.encoder.layers.0.mlp.fc1';
    const file = kohyaMap(te, [tq, fc1], 4, 8, 9, 'lora_te');
    expect([...file.keys()]).toContain('lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight');
    expect([...file.keys()]).toContain('lora_te_text_model_encoder_layers_0_mlp_fc1.alpha');
    const unetFile = kohyaMap(unet, [Q], 2, 2, 10);
    for (const [k, v] of unetFile) file.set(k, v);
    const base = teOut(te);
    const snap = snapshot(te);
    // without the text encoder among the targets: an error that says so, nothing attached
    expect(() => loadLoraWeights({ unet }, file)).toThrow(/text encoder keys: pass targets.textEncoder/);
    expect(loraLayers(unet).length).toBe(0);
    const r = loadLoraWeights(t, file, { adapterName: 'te' });
    expect(r).toEqual({ adapterName: 'te', unetLayers: 1, textEncoderLayers: 2, textEncoder2Layers: 0, formats: ['kohya'] });
    expect(getListAdapters(t)).toEqual({ unet: ['te'], text_encoder: ['te'] });
    const err = tidy(() => {
      const l = layerAt(te, fc1);
      const x = torch.randn([1, 3, 32], { generator: new Generator().manualSeed(5) });
      const y = noGrad(() => l.forward(x));
      const k = 'lora_te_text_model_encoder_layers_0_mlp_fc1';
      const b = l.base_layer as Linear;
      const want = withBias(x.matmul(b.weight.t()), b.bias)
        .add(x.matmul((file.get(`${k}.lora_down.weight`) as Tensor).t()).matmul((file.get(`${k}.lora_up.weight`) as Tensor).t()).mul(8 / 4));
      return relErr(y, want);
    });
    expect(err).toBeLessThan(1e-6);
    const withLora = teOut(te);
    expect(relErr(withLora, base)).toBeGreaterThan(1e-4);
    const scaled = withLoraScale(t, 0, () => teOut(te));
    expect(bitEqual(scaled, base)).toBe(true);
    fuseLora(t);
    expect(relErr(teOut(te), withLora)).toBeLessThan(1e-5);
    unloadLoraWeights(t);
    expectSameState(te, snap);
    expect(bitEqual(teOut(te), base)).toBe(true);
    dispose([base, withLora, scaled, ...snap.values(), ...file.values()]);
    unet.dispose();
    te.dispose();
  });
});

describe('bad input changes nothing', () => {
  /** Loads `bad`, expects an error matching `msg`, then checks adapter 'a' (if any) still gives `ref`. */
  function expectRefused(unet: UNet2DConditionModel, bad: string | Map<string, Tensor>, msg: RegExp, ref: Tensor, layers: number): void {
    const t: LoraTargets = { unet };
    const active = getActiveAdapters(t);
    expect(() => loadLoraWeights(t, bad)).toThrow(msg);
    expect(loraLayers(unet).length).toBe(layers);
    expect(getActiveAdapters(t)).toEqual(active);
    expect(loraLayers(unet).every(([, l]) => l.adapterNames().length === 1)).toBe(true);
    const out = unetOut(unet);
    expect(bitEqual(out, ref)).toBe(true);
    out.dispose();
  }

  it('unknown keys, SDXL and SD 1.5-sized keys, rank mismatches, a truncated file, a used name: clear errors, models unchanged', () => {
    const unet = loadUnet();
    const base = unetOut(unet);
    const good = kohyaMap(unet, [Q], 2, 2, 1);
    // keys matching nothing (listed), on a bare model and on one with an adapter
    const junk = new Map([...good, ['lora_unet_foo_bar.lora_down.weight', torch.zeros([2, 32])]]);
    expectRefused(unet, junk, /1 key\(s\) match no Linear\/Conv2d layer[^]*lora_unet_foo_bar\.lora_down\.weight/, base, 0);
    loadLoraWeights({ unet }, diffusersDir, { adapterName: 'a' });
    const withA = unetOut(unet);
    expectRefused(unet, junk, /lora_unet_foo_bar/, withA, 48);
    // SDXL names
    const sdxl = new Map([['lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight', torch.zeros([4, 640])],
      ['lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight', torch.zeros([4, 768])]]);
    expectRefused(unet, sdxl, /2 key\(s\)[^]*another architecture[^]*input_blocks_4_1/, withA, 48);
    // SD 1.5-sized weights under the same module names: shape errors naming the layer
    const sd15 = new Map<string, Tensor>();
    for (const [path, s] of Object.entries(sd15Targets).slice(0, 8)) {
      sd15.set(`${s.kohya}.lora_down.weight`, torch.zeros([4, s.in]));
      sd15.set(`${s.kohya}.lora_up.weight`, torch.zeros([s.out, 4]));
      void path;
    }
    expectRefused(unet, sd15, /cannot load:[^]*attn1\.to_q: file down\/A \[4, 320\], up\/B \[320, 4\]; the Linear needs \[4, 32\], \[32, 4\]/, withA, 48);
    // rank mismatch between down and up, and a missing up
    const kq = `lora_unet_${Q.replace(/\./g, '_')}`;
    expectRefused(unet, new Map([[`${kq}.lora_down.weight`, torch.zeros([4, 32])], [`${kq}.lora_up.weight`, torch.zeros([32, 2])]]), /rank 4/, withA, 48);
    expectRefused(unet, new Map([[`${kq}.lora_down.weight`, torch.zeros([4, 32])]]), /up\/B weight missing/, withA, 48);
    // a LoCon with the wrong kernel on a 1×1 conv
    const kp = `lora_unet_${PROJ_IN.replace(/\./g, '_')}`;
    expectRefused(unet, new Map([[`${kp}.lora_down.weight`, torch.zeros([4, 32, 3, 3])], [`${kp}.lora_up.weight`, torch.zeros([32, 4, 1, 1])]]), /needs \[4, 32, 1, 1\]/, withA, 48);
    // a truncated file
    const bytes = readFileSync(join(diffusersDir, 'pytorch_lora_weights.safetensors'));
    const cut = join(tmp, 'cut.safetensors');
    writeFileSync(cut, bytes.subarray(0, Math.floor(bytes.length / 2)));
    expectRefused(unet, cut, /./, withA, 48);
    expectRefused(unet, join(tmp, 'missing'), /no file or folder/, withA, 48);
    // a name in use
    expect(() => loadLoraWeights({ unet }, good, { adapterName: 'a' })).toThrow(/'a' is already in use \(adapters: a\)/);
    // fused layers refuse a new adapter
    fuseLora({ unet });
    expect(() => loadLoraWeights({ unet }, good)).toThrow(/fused; unfuseLora first/);
    unfuseLora({ unet });
    // and the good file still loads afterwards, as default_0
    expect(loadLoraWeights({ unet }, good).adapterName).toBe('default_0');
    expect(() => setAdapters({ unet }, 'x')).toThrow(/no adapter 'x'; the adapters are: a, default_0/);
    expect(() => deleteAdapters({ unet }, ['x'])).toThrow(/no adapter 'x'/);
    expect(() => setAdapters({ unet }, ['a', 'default_0'], [1])).toThrow(/2 adapter name\(s\) but 1 weight/);
    unloadLoraWeights({ unet });
    const after = unetOut(unet);
    expect(bitEqual(after, base)).toBe(true);
    dispose([base, withA, after, ...good.values(), ...junk.values(), ...sdxl.values(), ...sd15.values()]);
    unet.dispose();
  });
});
