// LoRA: the LoraLinear arithmetic and initialisation, attaching/detaching on models made of Attention
// modules, and the weight files (diffusers, Kohya, PEFT) against the goldens written by diffusers 0.31 /
// peft 0.13. The attention model here is a stand-in with the tiny-sd UNet's module paths (every Attention
// and every other Linear of the UNet, at their checkpoint paths, with its weights); test/lora_unet.test.ts
// repeats the parity checks on the real UNet.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { noGrad } from '../lib/autograd.js';
import { loadSafetensors, readSafetensorsHeader, saveSafetensors } from '../lib/io/safetensors.js';
import { Attention } from '../lib/models/attention_processor.js';
import { ModuleList } from '../lib/nn/container.js';
import { Linear } from '../lib/nn/layers.js';
import { Module } from '../lib/nn/module.js';
import { Generator, manualSeed } from '../lib/random.js';
import { dispose, memory, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import {
  disableLora, enableLora, fuseLora, getActiveAdapters, getListAdapters, loadLoraWeights, setAdapters, unfuseLora, unloadLoraWeights,
  withLoraScale,
} from '../lib/lora/adapters.js';
import { attachLora, getLoraHandle, loraLayers } from '../lib/lora/attach.js';
import { convertLoraFile } from '../lib/lora/convert.js';
import { kohyaName } from '../lib/lora/formats.js';
import { setPeftModelStateDict } from '../lib/lora/load.js';
import { LoraLinear } from '../lib/lora/lora_linear.js';
import { loraStateDictDiffusers, loraStateDictKohya, saveLoraWeights } from '../lib/lora/save.js';
import { bitEqual, fixtures, relErr } from './helpers.js';

const goldens = join(fixtures, 'goldens');
const unetFile = join(fixtures, 'tiny-sd', 'unet', 'diffusion_pytorch_model.safetensors');
const trainMeta = JSON.parse(readFileSync(join(goldens, 'lora_train.json'), 'utf8')) as { lora_param_order: string[] };
const diffusersMeta = JSON.parse(readFileSync(join(goldens, 'lora-diffusers.json'), 'utf8')) as {
  keys_in_file_order: string[]; safetensors_metadata: Record<string, string>; num_keys: number;
};
const kohyaMeta = JSON.parse(readFileSync(join(goldens, 'kohya.json'), 'utf8')) as {
  kohya_keys: string[]; per_layer_scaling: Record<string, { peft_scaling: number; alpha: number; rank: number }>;
};

let tmp: string;
beforeAll(() => { tmp = mkdtempSync(join(tmpdir(), 'difflora-lora-')); });
afterAll(() => { rmSync(tmp, { recursive: true, force: true }); });

// ---- a model with the tiny-sd UNet's Attention and Linear modules at their checkpoint paths

class Node extends Module {}

/** Puts `leaf` at a dotted path under root, creating Nodes (names) and ModuleLists (numeric names) on the way. */
function place(root: Module, path: string, leaf: Module): void {
  const parts = path.split('.');
  let cur: Module = root;
  parts.forEach((name, i) => {
    const last = i === parts.length - 1;
    const nextIsIndex = /^\d+$/.test(parts[i + 1] ?? '');
    if (cur instanceof ModuleList) {
      const idx = Number(name);
      while (cur.items.length <= idx) cur.items.push(new Node());
      if (last) cur.items[idx] = leaf;
      cur = cur.items[idx] as Module;
      return;
    }
    const fields = cur as unknown as Record<string, Module | undefined>;
    if (last) fields[name] = leaf;
    else fields[name] ??= nextIsIndex ? new ModuleList() : new Node();
    cur = fields[name] as Module;
  });
}

/**
 * Every Attention of the tiny-sd UNet (in the UNet's module order: down_blocks, up_blocks, mid_block, as
 * diffusers declares them) and, with withLinears, every other 2-D weight as a Linear, loaded from the file.
 */
function tinyAttentionModel(withLinears = false): Module {
  const root = new Node();
  const { tensors } = loadSafetensors(unetFile);
  try {
    const shape = (k: string): number[] => {
      const t = tensors.get(k);
      if (!t) throw new Error(`no ${k} in the UNet file`);
      return t.shape;
    };
    const attnPaths = [...new Set(trainMeta.lora_param_order.map((n) => n.replace(/\.(to_q|to_k|to_v|to_out\.0)\.lora_[AB]\.weight$/, '')))];
    for (const p of attnPaths) {
      const [inner, queryDim] = shape(`${p}.to_q.weight`) as [number, number];
      const cross = shape(`${p}.to_k.weight`)[1] as number;
      place(root, p, new Attention({ queryDim, crossAttentionDim: cross, heads: 8, dimHead: inner / 8 }));
    }
    if (withLinears) {
      for (const [k, t] of tensors) {
        if (!k.endsWith('.weight') || t.ndim !== 2 || k.includes('.to_') || k.includes('norm')) continue;
        const p = k.slice(0, -'.weight'.length);
        place(root, p, new Linear(t.shape[1] as number, t.shape[0] as number, tensors.has(`${p}.bias`)));
      }
    }
    const own = root.stateDict();
    root.loadStateDict(new Map([...own.keys()].map((k) => [k, tensors.get(k) as Tensor])));
  } finally {
    dispose([...tensors.values()]);
  }
  return root;
}

/** Runs every Attention of the model on fixed inputs (self- and cross-attention) and stacks the outputs. */
function attentionOutputs(model: Module): Tensor {
  return tidy(() => {
    const g = new Generator().manualSeed(7);
    const outs: Tensor[] = [];
    for (const [, m] of model.namedModules()) {
      if (!(m instanceof Attention)) continue;
      const dim = m.heads * m.dimHead;
      const x = torch.randn([2, 5, dim], { generator: g });
      const crossIn = (m.to_k instanceof LoraLinear ? m.to_k.inFeatures : (m.to_k as Linear).inFeatures);
      const ctx = crossIn === dim ? null : torch.randn([2, 3, crossIn], { generator: g });
      outs.push(m.forward(x, ctx).flatten());
    }
    return torch.cat(outs);
  });
}

function randomizeLora(model: Module, seed: number): void {
  const g = new Generator().manualSeed(seed);
  tidy(() => noGrad(() => { for (const p of getLoraHandle(model).parameters()) p.copy_(torch.randn(p.shape, { generator: g }).mul(0.1)); }));
}

function loraValues(model: Module): Map<string, Tensor> {
  return tidy(() => new Map(getLoraHandle(model).namedParameters().map(([n, t]) => [n, t.detach().clone()])));
}

// ---- LoraLinear

describe('LoraLinear', () => {
  it('forward = base(x) + B·A·x · scale · alpha/r, against a hand computation', () => {
    tidy(() => {
      const base = new Linear(6, 5);
      const l = new LoraLinear(base, { rank: 3, alpha: 6 });
      const g = new Generator().manualSeed(3);
      noGrad(() => {
        l.lora_A.weight.copy_(torch.randn([3, 6], { generator: g }));
        l.lora_B.weight.copy_(torch.randn([5, 3], { generator: g }));
      });
      l.scale = 0.5;
      const x = torch.randn([4, 6], { generator: g });
      const y = l.forward(x);
      // by hand, in float64 JS arithmetic
      const arr = (t: Tensor, r: number, c: number) => {
        const f = t.toFloat64Array();
        return Array.from({ length: r }, (_, i) => Array.from({ length: c }, (_, j) => f[i * c + j] as number));
      };
      const [X, W, A, B] = [arr(x, 4, 6), arr(base.weight, 5, 6), arr(l.lora_A.weight, 3, 6), arr(l.lora_B.weight, 5, 3)];
      const bias = Array.from(base.bias!.toFloat64Array());
      const s = 0.5 * 6 / 3;
      const want: number[] = [];
      for (let n = 0; n < 4; n++) {
        for (let o = 0; o < 5; o++) {
          let v = bias[o] as number;
          for (let i = 0; i < 6; i++) v += W[o]![i]! * X[n]![i]!;
          for (let r = 0; r < 3; r++) {
            let ax = 0;
            for (let i = 0; i < 6; i++) ax += A[r]![i]! * X[n]![i]!;
            v += s * B[o]![r]! * ax;
          }
          want.push(v);
        }
      }
      const err = relErr(y, torch.tensor(want, { dtype: 'float64', shape: [4, 5] }));
      console.log('LoraLinear forward vs hand computation, rel err', err);
      expect(err).toBeLessThan(1e-6);
      expect(l.scaling).toBe(1);
      // disabled or scale 0: the base alone, bit for bit
      const plain = base.forward(x);
      l.enabled = false;
      expect(bitEqual(l.forward(x), plain)).toBe(true);
      l.enabled = true;
      l.scale = 0;
      expect(bitEqual(l.forward(x), plain)).toBe(true);
      l.dispose();
    });
  });

  it('B = 0 at init: the output equals the base output bit for bit (both inits)', () => {
    tidy(() => {
      for (const init of ['gaussian', 'kaiming'] as const) {
        const base = new Linear(16, 8);
        const x = torch.randn([3, 16]);
        const before = base.forward(x);
        const l = new LoraLinear(base, { rank: 4, init });
        expect(l.lora_B.weight.abs().max().item()).toBe(0);
        expect(l.lora_A.weight.abs().max().item()).toBeGreaterThan(0);
        expect(bitEqual(l.forward(x), before)).toBe(true);
        l.dispose();
      }
    });
  });

  it('gaussian init: A ~ N(0, 1/r²) (std within 5 standard errors over 65,536 draws)', () => {
    tidy(() => {
      const r = 8;
      const l = new LoraLinear(new Linear(8192, 4, false), { rank: r, init: 'gaussian' });
      const a = l.lora_A.weight;
      const n = a.numel();
      const std = a.var().sqrt().item();
      const mean = a.mean().item();
      const sigma = 1 / r;
      console.log(`gaussian init: n=${n} std=${std} (want ${sigma} ± ${5 * sigma / Math.sqrt(2 * n)}) mean=${mean}`);
      expect(Math.abs(std - sigma)).toBeLessThan(5 * sigma / Math.sqrt(2 * n));
      expect(Math.abs(mean)).toBeLessThan(5 * sigma / Math.sqrt(n));
      l.dispose();
    });
  });

  it('kaiming init: A ~ U(±1/√in) (kaiming_uniform a=√5), std 1/√(3·in)', () => {
    tidy(() => {
      const fanIn = 4096;
      const l = new LoraLinear(new Linear(fanIn, 4, false), { rank: 16, init: 'kaiming' });
      const a = l.lora_A.weight;
      const bound = 1 / Math.sqrt(fanIn);
      const n = a.numel();
      const amax = a.abs().max().item();
      const std = a.var().sqrt().item();
      // the std of U(±b) is b/√3; its estimate's standard error is √((μ4 − σ⁴)/n)/(2σ) = b·√(4/15)/(2√n)
      const se = (bound * Math.sqrt(4 / 15)) / (2 * Math.sqrt(n));
      console.log(`kaiming init: max |a| = ${amax} (bound ${bound}), std ${std} (want ${bound / Math.sqrt(3)})`);
      expect(amax).toBeLessThanOrEqual(bound);
      expect(amax).toBeGreaterThan(0.99 * bound);
      expect(Math.abs(std - bound / Math.sqrt(3))).toBeLessThan(5 * se);
      expect(l.lora_B.weight.abs().max().item()).toBe(0);
      l.dispose();
    });
  });

  it('a bf16 base keeps fp32 LoRA weights: input cast up, result cast back, gradients reach A and B', () => {
    tidy(() => {
      const base = new Linear(16, 8).to('bfloat16');
      const l = new LoraLinear(base, { rank: 4 });
      expect(l.lora_A.weight.dtype).toBe('float32');
      noGrad(() => l.lora_B.weight.copy_(torch.randn([8, 4]).mul(0.1)));
      const x = torch.randn([3, 16]).bfloat16();
      const y = l.forward(x);
      expect(y.dtype).toBe('bfloat16');
      const want = base.forward(x).float().add(x.float().matmul(l.lora_A.weight.t()).matmul(l.lora_B.weight.t()));
      expect(relErr(y, want)).toBeLessThan(1e-2); // bf16 output rounding
      y.float().sum().backward();
      expect(l.lora_A.weight.grad?.dtype).toBe('float32');
      expect(l.lora_B.weight.grad?.abs().sum().item()).toBeGreaterThan(0);
      l.dispose();
    });
  });

  it('dropout applies to the LoRA branch in train mode only', () => {
    tidy(() => {
      const l = new LoraLinear(new Linear(32, 8), { rank: 4, dropout: 0.5 });
      noGrad(() => l.lora_B.weight.copy_(torch.randn([8, 4])));
      const x = torch.randn([64, 32]);
      manualSeed(1);
      const a = l.forward(x);
      manualSeed(2);
      const b = l.forward(x);
      expect(bitEqual(a, b)).toBe(false);
      l.eval();
      expect(bitEqual(l.forward(x), l.forward(x))).toBe(true);
      l.dispose();
    });
  });

  it('merge folds B·A·scaling into the base weight, unmerge takes it out', () => {
    tidy(() => {
      const base = new Linear(12, 10);
      const w0 = base.weight.clone();
      const l = new LoraLinear(base, { rank: 2, alpha: 8 });
      noGrad(() => l.lora_B.weight.copy_(torch.randn([10, 2])));
      const x = torch.randn([3, 12]);
      const y = l.forward(x);
      l.merge();
      expect(l.merged).toBe(true);
      expect(relErr(base.weight, w0.add(l.lora_B.weight.matmul(l.lora_A.weight).mul(4)))).toBeLessThan(1e-7);
      expect(relErr(l.forward(x), y)).toBeLessThan(1e-6);
      l.enabled = false; // disabling a merged layer unmerges it (PEFT)
      expect(relErr(l.forward(x), base.forward(x))).toBe(0);
      expect(l.merged).toBe(false);
      l.enabled = true;
      l.merge();
      l.unmerge();
      expect(relErr(base.weight, w0)).toBeLessThan(1e-6);
      expect(relErr(l.forward(x), y)).toBeLessThan(1e-6);
      l.dispose();
    });
  });
});

// ---- attaching to a model

describe('attachLora / unloadLoraWeights on Attention modules', () => {
  it('replaces to_q/to_k/to_v/to_out.0 of every Attention; names and order are PEFT\'s (lora_train.json)', () => {
    const model = tinyAttentionModel();
    const h = attachLora(model, { rank: 4 });
    expect(h.layers.length).toBe(48);
    expect(h.namedParameters().map(([n]) => n)).toEqual(trainMeta.lora_param_order);
    for (const [, m] of model.namedModules()) {
      if (!(m instanceof Attention)) continue;
      expect(m.to_q).toBeInstanceOf(LoraLinear);
      expect(m.to_k).toBeInstanceOf(LoraLinear);
      expect(m.to_v).toBeInstanceOf(LoraLinear);
      expect(m.to_out.at(0)).toBeInstanceOf(LoraLinear);
    }
    // the module paths: base_layer under the LoRA layer, as PEFT
    expect(model.namedParameters().map(([n]) => n)).toContain('down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.base_layer.bias');
    model.dispose();
  });

  it('only the LoRA parameters require grad; backward reaches only them', () => {
    const model = tinyAttentionModel(true);
    const h = attachLora(model, { rank: 4, init: 'kaiming' });
    const lora = new Set(h.parameters());
    for (const [n, p] of model.namedParameters()) expect([n, p.requiresGrad]).toEqual([n, lora.has(p) && /\.lora_[AB]\.weight$/.test(n)]);
    expect(lora.size).toBe(96);
    randomizeLora(model, 5);
    tidy(() => attentionOutputs(model).square().sum().backward());
    for (const [n, p] of model.namedParameters()) {
      const g = p.grad;
      expect([n, g !== null]).toEqual([n, lora.has(p)]);
      g?.dispose();
    }
    model.dispose();
  });

  it('fresh adapters leave every attention output bit-identical; enable/scale switch the branch', () => {
    const model = tinyAttentionModel();
    const before = attentionOutputs(model);
    attachLora(model, { rank: 4 });
    const fresh = attentionOutputs(model);
    expect(bitEqual(fresh, before)).toBe(true);
    randomizeLora(model, 11);
    const full = attentionOutputs(model);
    expect(relErr(full, before)).toBeGreaterThan(1e-3);
    disableLora(model);
    const off = attentionOutputs(model);
    expect(bitEqual(off, before)).toBe(true);
    enableLora(model);
    const zero = withLoraScale(model, 0, () => attentionOutputs(model));
    expect(bitEqual(zero, before)).toBe(true);
    fuseLora(model);
    const merged = attentionOutputs(model);
    expect(relErr(merged, full)).toBeLessThan(1e-5);
    unfuseLora(model);
    dispose([before, fresh, full, off, zero, merged]);
    model.dispose();
  });

  it('unloadLoraWeights puts the original Linears back, weights bit for bit, and restores requiresGrad', () => {
    const model = tinyAttentionModel(true);
    const originals = new Map(model.namedModules().filter(([, m]) => m instanceof Linear));
    const weights = new Map([...model.stateDict()].map(([k, t]) => [k, t.clone()]));
    const out0 = attentionOutputs(model);
    const live = memory().numTensors;
    attachLora(model, { rank: 4 });
    randomizeLora(model, 1);
    fuseLora(model);
    unfuseLora(model);
    expect(loraLayers(model).length).toBe(48);
    unloadLoraWeights(model);
    expect(loraLayers(model).length).toBe(0);
    expect(memory().numTensors).toBe(live); // the LoRA weights were disposed
    for (const [p, m] of model.namedModules()) if (m instanceof Linear) expect(m).toBe(originals.get(p));
    expect([...model.stateDict().keys()]).toEqual([...weights.keys()]);
    // merge + unmerge rounds the projections' weights; everything else is bit-exact
    for (const [k, t] of model.stateDict()) {
      const ref = weights.get(k) as Tensor;
      if (/\.to_(q|k|v|out\.0)\.weight$/.test(k)) expect([k, relErr(t, ref) < 1e-6]).toEqual([k, true]);
      else expect([k, bitEqual(t, ref)]).toEqual([k, true]);
    }
    // without merging, detach gives every weight back bit for bit
    const weights2 = new Map([...model.stateDict()].map(([k, t]) => [k, t.clone()]));
    const out1 = attentionOutputs(model);
    expect(relErr(out1, out0)).toBeLessThan(1e-6);
    model.requiresGrad_(true);
    model.stateDict().forEach((t, k) => { if (k.endsWith('.bias')) t.requiresGrad = false; });
    attachLora(model, { rank: 4 });
    randomizeLora(model, 2);
    unloadLoraWeights(model);
    for (const [k, t] of model.stateDict()) expect([k, bitEqual(t, weights2.get(k) as Tensor)]).toEqual([k, true]);
    for (const [k, p] of model.namedParameters()) expect([k, p.requiresGrad]).toEqual([k, !k.endsWith('.bias')]);
    const out2 = attentionOutputs(model);
    expect(bitEqual(out2, out1)).toBe(true);
    dispose([out0, out1, out2, ...weights.values(), ...weights2.values()]);
    model.dispose();
  });

  it('errors: no matching layer, a target that is not a Linear, attaching twice', () => {
    const model = tinyAttentionModel();
    expect(() => attachLora(model, { rank: 4, targetModules: ['q_proj'] })).toThrow(/no module of Node matches target modules \[q_proj\]/);
    expect(() => attachLora(model, { rank: 4, targetModules: ['to_out'] })).toThrow(/to_out \(ModuleList\).*not Linear/);
    attachLora(model, { rank: 2, targetModules: ['attn2.to_k'] });
    expect(loraLayers(model).map(([p]) => p).every((p) => p.endsWith('attn2.to_k'))).toBe(true);
    expect(() => attachLora(model, { rank: 2 })).toThrow(/already has LoRA layers/);
    unloadLoraWeights(model);
    expect(loraLayers(model).length).toBe(0);
    expect(() => setAdapters(model, 'default')).toThrow(/no adapter 'default'; the adapters are: \(none loaded\)/);
    model.dispose();
  });

  it('a seeded gaussian attach draws PEFT\'s initial A (torch.manual_seed(1234) before add_adapter)', () => {
    const model = tinyAttentionModel();
    const golden = loadSafetensors(join(goldens, 'lora_train.safetensors')).tensors;
    manualSeed(1234);
    const h = attachLora(model, { rank: 4, init: 'gaussian' });
    // B: the goldens overwrite the zeros with randn·0.01 from Generator(42), in named_parameters order
    const g = new Generator().manualSeed(42);
    noGrad(() => { for (const [n, p] of h.namedParameters()) if (n.includes('lora_B')) p.copy_(torch.randn(p.shape, { generator: g }).mul(0.01)); });
    let exact = 0;
    let worst = 0;
    for (const [n, p] of h.namedParameters()) {
      const ref = golden.get(`lora_init/${n}`) as Tensor;
      if (bitEqual(p, ref)) exact++;
      worst = Math.max(worst, relErr(p, ref));
    }
    console.log(`seeded init: ${exact}/${h.namedParameters().length} LoRA tensors bit-identical to lora_init, worst rel err ${worst}`);
    expect(exact).toBe(96);
    dispose([...golden.values()]);
    model.dispose();
  });
});

// ---- files

/** A model with LoRA set to the lora_train goldens' initial values (what lora-diffusers was saved from). */
function modelWithLoraInit(): Module {
  const model = tinyAttentionModel();
  const h = attachLora(model, { rank: 4 });
  const golden = loadSafetensors(join(goldens, 'lora_train.safetensors')).tensors;
  noGrad(() => { for (const [n, p] of h.namedParameters()) p.copy_(golden.get(`lora_init/${n}`) as Tensor); });
  dispose([...golden.values()]);
  return model;
}

describe('LoRA files', () => {
  it('diffusers layout: keys, shapes, metadata and bytes equal save_lora_weights\' file', () => {
    const model = modelWithLoraInit();
    const ref = join(goldens, 'lora-diffusers', 'pytorch_lora_weights.safetensors');
    const refHeader = readSafetensorsHeader(ref);
    const sd = loraStateDictDiffusers(model);
    expect([...sd.keys()].sort()).toEqual([...diffusersMeta.keys_in_file_order].sort());
    expect(sd.size).toBe(96);
    for (const t of refHeader.tensors) expect([t.name, sd.get(t.name)?.shape]).toEqual([t.name, t.shape]);
    dispose([...sd.values()]);
    const file = saveLoraWeights(join(tmp, 'diffusers'), model);
    expect(file).toBe(join(tmp, 'diffusers', 'pytorch_lora_weights.safetensors'));
    const header = readSafetensorsHeader(file);
    expect(header.tensors.map((t) => t.name)).toEqual(diffusersMeta.keys_in_file_order);
    expect(header.metadata).toEqual(diffusersMeta.safetensors_metadata);
    expect(header.tensors.some((t) => t.name.includes('alpha'))).toBe(false);
    const ours = readFileSync(file);
    const theirs = readFileSync(ref);
    expect(ours.equals(theirs)).toBe(true);
    model.dispose();
  });

  it('Kohya layout: lora_unet_* names (to_out.0 → to_out_0), 0-dim fp32 alpha, the names of the 128 SD 1.5 targets', () => {
    const targets = JSON.parse(readFileSync(join(fixtures, 'sd15-shape', 'lora_targets.json'), 'utf8')) as Record<string, { kohya: string }>;
    expect(Object.keys(targets).length).toBe(128);
    for (const [path, t] of Object.entries(targets)) expect(kohyaName(path)).toBe(t.kohya);
    const model = modelWithLoraInit();
    for (const [, l] of loraLayers(model)) l.alpha = 2;
    const sd = loraStateDictKohya(model);
    const attnKeys = kohyaMeta.kohya_keys.filter((k) => !k.includes('_ff_'));
    expect([...sd.keys()].sort()).toEqual([...attnKeys].sort());
    const alpha = sd.get('lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha') as Tensor;
    expect([alpha.shape, alpha.dtype, alpha.item()]).toEqual([[], 'float32', 2]);
    dispose([...sd.values()]);
    const file = saveLoraWeights(join(tmp, 'kohya'), model, { format: 'kohya', weightName: 'lora.safetensors' });
    const header = readSafetensorsHeader(file);
    const ref = readSafetensorsHeader(join(goldens, 'lora-kohya', 'tiny_sd_kohya_lora.safetensors'));
    const refShapes = new Map(ref.tensors.map((t) => [t.name, [t.formatDtype, t.shape]]));
    for (const t of header.tensors) expect([t.name, [t.formatDtype, t.shape]]).toEqual([t.name, refShapes.get(t.name)]);
    expect(header.metadata).toEqual({ ss_network_module: 'networks.lora', ss_network_dim: '4', ss_network_alpha: '2.0' });
    model.dispose();
  });

  it('save → load round trips restore identical LoRA weights and outputs (diffusers, Kohya with alpha, PEFT)', () => {
    const src = tinyAttentionModel();
    attachLora(src, { rank: 4, alpha: 4 });
    randomizeLora(src, 21);
    const want = loraValues(src);
    const wantOut = attentionOutputs(src);
    const diffusersFile = saveLoraWeights(join(tmp, 'rt-diffusers'), src);
    for (const [, l] of loraLayers(src)) l.alpha = 2;
    const wantOutHalf = attentionOutputs(src);
    const kohyaFile = saveLoraWeights(join(tmp, 'rt-kohya'), src, { format: 'kohya' });
    const peftFile = join(tmp, 'peft.safetensors');
    saveSafetensors(peftFile, new Map(getLoraHandle(src).namedParameters().map(([n, t]) => [`base_model.model.${n.replace('.weight', '.default.weight')}`, t])));

    const check = (file: string, alpha: number, out: Tensor, attachFirst: boolean) => {
      const dst = tinyAttentionModel();
      if (attachFirst) attachLora(dst, { rank: 4, init: 'kaiming' });
      // into the trained adapter (as a resume does), or as a new adapter of the plain model
      const r = attachFirst ? setPeftModelStateDict(dst, file) : loadLoraWeights(dst, file);
      expect(r.unetLayers).toBe(48);
      expect(loraLayers(dst).length).toBe(48);
      const got = loraValues(dst);
      for (const [n, t] of want) expect([n, bitEqual(got.get(n) as Tensor, t)]).toEqual([n, true]);
      for (const [, l] of loraLayers(dst)) expect([l.rank, l.alpha]).toEqual([4, alpha]);
      const o = attentionOutputs(dst);
      expect(bitEqual(o, out)).toBe(true);
      dispose([o, ...got.values()]);
      dst.dispose();
      return r.formats;
    };
    expect(check(diffusersFile, 4, wantOut, true)).toEqual(['diffusers']);
    expect(check(diffusersFile, 4, wantOut, false)).toEqual(['diffusers']);
    expect(check(kohyaFile, 2, wantOutHalf, true)).toEqual(['kohya']);
    expect(check(kohyaFile, 2, wantOutHalf, false)).toEqual(['kohya']);
    // PEFT keys carry no alpha: an attached layer keeps its own; an auto-attached one gets alpha = rank
    expect(check(peftFile, 4, wantOut, false)).toEqual(['peft']);
    dispose([wantOut, wantOutHalf, ...want.values()]);
    src.dispose();
  });

  it('diffusers files with alpha ≠ rank fold alpha/rank into lora.up: same outputs after loading', () => {
    const src = tinyAttentionModel();
    attachLora(src, { rank: 4, alpha: 1 });
    randomizeLora(src, 8);
    const out = attentionOutputs(src);
    const file = saveLoraWeights(join(tmp, 'folded'), src);
    const dst = tinyAttentionModel();
    loadLoraWeights(dst, file);
    for (const [, l] of loraLayers(dst)) expect(l.alpha).toBe(4);
    const got = attentionOutputs(dst);
    const err = relErr(got, out);
    console.log('alpha-folded diffusers round trip, rel err of the outputs', err);
    expect(err).toBeLessThan(1e-6);
    dispose([out, got]);
    src.dispose();
    dst.dispose();
  });

  it('a key that matches no layer is an error listing it; so are half layers and wrong shapes; nothing is loaded', () => {
    const model = tinyAttentionModel();
    attachLora(model, { rank: 4 });
    const before = loraValues(model);
    tidy(() => {
      const a = torch.randn([4, 32]);
      const b = torch.randn([32, 4]);
      const good = 'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q';
      expect(() => setPeftModelStateDict(model, new Map([
        [`${good}.lora.down.weight`, a], [`${good}.lora.up.weight`, b],
        ['unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_z.lora.down.weight', a],
        ['text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight', a],
        ['lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha', torch.scalarTensor(1)],
      ]))).toThrow(/3 key\(s\) match no layer of adapter 'default' in the UNet[^\n]*:\n {2}unet\.down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_z\.lora\.down\.weight\n {2}text_encoder\.text_model.*q_proj\.lora\.down\.weight\n {2}lora_te_text_model_encoder_layers_0_self_attn_q_proj\.alpha/);
      expect(() => setPeftModelStateDict(model, new Map([[`${good}.lora.down.weight`, a]]))).toThrow(/attn1\.to_q: up\/B weight missing/);
      expect(() => setPeftModelStateDict(model, new Map([[`${good}.lora.down.weight`, torch.randn([8, 32])], [`${good}.lora.up.weight`, torch.randn([32, 8])]])))
        .toThrow(/attn1\.to_q: file down\/A \[8, 32\], up\/B \[32, 8\]; the adapter 'default' needs \[4, 32\], \[32, 4\]/);
    });
    const after = loraValues(model);
    for (const [n, t] of before) expect([n, bitEqual(after.get(n) as Tensor, t)]).toEqual([n, true]);
    dispose([...before.values(), ...after.values()]);
    // a plain model: keys must name Linear layers
    const plain = tinyAttentionModel();
    const file = join(tmp, 'bad.safetensors');
    tidy(() => saveSafetensors(file, new Map([['unet.mid_block.attentions.0.norm.lora.down.weight', torch.randn([4, 64])]])));
    expect(() => loadLoraWeights(plain, file)).toThrow(/1 key\(s\) match no Linear\/Conv2d layer of the UNet[^\n]*:\n {2}unet\.mid_block\.attentions\.0\.norm\.lora\.down\.weight/);
    expect(loraLayers(plain).length).toBe(0);
    plain.dispose();
    model.dispose();
  });

  it('Kohya golden (alpha 2 / 8 per layer, ff layers too) attaches where the file says; merged weights equal PEFT\'s', () => {
    const model = tinyAttentionModel(true);
    const golden = loadSafetensors(join(goldens, 'kohya.safetensors')).tensors;
    const r = loadLoraWeights(model, join(goldens, 'lora-kohya', 'tiny_sd_kohya_lora.safetensors'));
    expect(r.formats).toEqual(['kohya']);
    expect(r.unetLayers).toBe(50);
    const layers = new Map(loraLayers(model));
    for (const [path, s] of Object.entries(kohyaMeta.per_layer_scaling)) {
      const l = layers.get(path);
      expect([path, l?.rank, l?.alpha, l?.scaling]).toEqual([path, s.rank, s.alpha, s.peft_scaling]);
    }
    fuseLora(model);
    const errs: Record<string, number> = {};
    for (const [k, t] of golden) {
      if (!k.startsWith('merged_weight/')) continue;
      const path = k.slice('merged_weight/'.length);
      const l = layers.get(path) as LoraLinear;
      expect(bitEqual(l.base_layer.weight, t) || relErr(l.base_layer.weight, t) < 1e-6).toBe(true);
      errs[path] = relErr(l.base_layer.weight, t);
    }
    console.log('Kohya merged weights vs PEFT, rel err', errs);
    expect(Object.keys(errs).length).toBe(5);
    dispose([...golden.values()]);
    model.dispose();
  });
});

// ---- hostile input (issue #12): every refusal names the key (and the file), and changes nothing

describe('bad LoRA input is refused, the model unchanged', () => {
  const Q = 'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q';
  const KQ = 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q';
  const golden = join(goldens, 'lora-diffusers', 'pytorch_lora_weights.safetensors');

  /** The weights (cloned) and the adapter lists: what must not change. */
  function snapshot(model: Module): { weights: Map<string, Tensor>; adapters: string } {
    const weights = tidy(() => new Map([...model.stateDict()].map(([k, t]) => [k, t.clone()])));
    return { weights, adapters: JSON.stringify([getListAdapters(model), getActiveAdapters(model)]) };
  }
  function expectUnchanged(model: Module, s: { weights: Map<string, Tensor>; adapters: string }, what: string): void {
    const now = model.stateDict();
    expect([what, [...now.keys()]]).toEqual([what, [...s.weights.keys()]]);
    const differ = [...now].filter(([k, t]) => !bitEqual(t, s.weights.get(k) as Tensor)).map(([k]) => k);
    expect([what, differ]).toEqual([what, []]);
    expect([what, JSON.stringify([getListAdapters(model), getActiveAdapters(model)])]).toEqual([what, s.adapters]);
  }

  it('dtypes, dimensions, ranks, shapes, alphas, NaN/inf, unknown keys, two layouts for one target: each named, nothing loaded', () => {
    const model = tinyAttentionModel();
    attachLora(model, { rank: 4 });
    randomizeLora(model, 5);
    loadLoraWeights(model, golden, { adapterName: 'a' });
    const snap = snapshot(model);
    const randn = (shape: number[]) => torch.randn(shape).mul(0.1);
    const pair = (down: Tensor, up: Tensor): Map<string, Tensor> => new Map([[`${Q}.lora.down.weight`, down], [`${Q}.lora.up.weight`, up]]);
    const kohya = (alpha: Tensor): Map<string, Tensor> => new Map([[`${KQ}.alpha`, alpha], [`${KQ}.lora_down.weight`, randn([4, 32])], [`${KQ}.lora_up.weight`, randn([32, 4])]]);
    const nan = randn([4, 32]);
    const inf = randn([32, 4]);
    tidy(() => noGrad(() => {
      nan.view(-1).narrow(0, 7, 1).fill_(Number.NaN);
      inf.view(-1).narrow(0, 3, 1).fill_(Number.POSITIVE_INFINITY);
    }));
    const cases: [string, Map<string, Tensor>, RegExp][] = [
      ['int32 weight', pair(torch.zeros([4, 32], { dtype: 'int32' }), randn([32, 4])), /attn1\.to_q\.lora\.down\.weight: dtype int32; LoRA weights must be floating point/],
      ['bool weight', pair(randn([4, 32]), torch.zeros([32, 4], { dtype: 'bool' })), /attn1\.to_q\.lora\.up\.weight: dtype bool/],
      ['71 dimensions', pair(torch.zeros(Array<number>(71).fill(1)), randn([32, 4])), /attn1\.to_q\.lora\.down\.weight: shape \[1(, 1){70}\] has 71 dimensions/],
      ['3 dimensions', pair(randn([4, 32, 1]), randn([32, 4])), /lora\.down\.weight: shape \[4, 32, 1\] has 3 dimensions/],
      ['down/up ranks differ', pair(randn([4, 32]), randn([32, 2])), /attn1\.to_q \(.*lora\.down\.weight, .*lora\.up\.weight\): down has rank 4 \(\[4, 32\]\) but up has rank 2 \(\[32, 2\]\)/],
      ['shape of another layer', pair(randn([4, 33]), randn([32, 4])), /attn1\.to_q: file down\/A \[4, 33\], up\/B \[32, 4\]; the (Linear|adapter 'default') needs \[4, 32\], \[32, 4\] \(rank 4\) \(.*to_q\.lora\.down\.weight/],
      ['conv pair on a Linear', pair(randn([4, 32, 1, 1]), randn([32, 4, 1, 1])), /attn1\.to_q: file down\/A \[4, 32, 1, 1\].*the (Linear|adapter 'default') needs \[4, 32\]/],
      ['3×3 up', pair(randn([4, 32, 3, 3]), randn([32, 4, 3, 3])), /lora\.up\.weight\): up \[32, 4, 3, 3\] must be a 1×1 convolution/],
      ['NaN', pair(nan, randn([32, 4])), /attn1\.to_q\.lora\.down\.weight: holds NaN or infinite values/],
      ['inf', pair(randn([4, 32]), inf), /attn1\.to_q\.lora\.up\.weight: holds NaN or infinite values/],
      ['alpha NaN', kohya(torch.scalarTensor(Number.NaN)), new RegExp(`${KQ}\\.alpha: alpha NaN; it must be a finite number > 0`)],
      ['alpha negative', kohya(torch.scalarTensor(-2)), new RegExp(`${KQ}\\.alpha: alpha -2`)],
      ['alpha zero', kohya(torch.scalarTensor(0)), new RegExp(`${KQ}\\.alpha: alpha 0`)],
      ['alpha of shape [2]', kohya(torch.tensor([2, 2])), new RegExp(`${KQ}\\.alpha: alpha must be a scalar, has shape \\[2\\]`)],
      ['unknown key', new Map([...pair(randn([4, 32]), randn([32, 4])), ['model.weird_thing', randn([2])]]), /1 key\(s\) match no .*:\n {2}model\.weird_thing$/m],
      ['two layouts for one target', new Map([...pair(randn([4, 32]), randn([32, 4])), [`${Q}.lora_A.weight`, randn([4, 32])]]), /attn1\.to_q: two keys give its down: unet\..*to_q\.lora\.down\.weight, unet\..*to_q\.lora_A\.weight/],
      ['Kohya and diffusers keys', new Map([...pair(randn([4, 32]), randn([32, 4])), ...kohya(torch.scalarTensor(2))]), /mixes the Kohya and diffusers\/PEFT layouts \(e\.g\. lora_unet_.*\.alpha and unet\..*\)/],
      ['no LoRA weights', new Map(), /cannot load:\n {2}holds no LoRA weights/],
    ];
    for (const [what, source, msg] of cases) {
      expect(() => loadLoraWeights(model, source), what).toThrow(msg);
      expectUnchanged(model, snap, `loadLoraWeights: ${what}`);
      expect(() => setPeftModelStateDict(model, source), what).toThrow(msg);
      expectUnchanged(model, snap, `setPeftModelStateDict: ${what}`);
    }
    // a resume file must cover the whole adapter; a fused layer takes nothing
    expect(() => setPeftModelStateDict(model, pair(randn([4, 32]), randn([32, 4])))).toThrow(/the file has no weights for 47 layer\(s\) of adapter 'default'/);
    fuseLora(model, { adapterNames: ['a'] });
    const fused = snapshot(model);
    expect(() => loadLoraWeights(model, pair(randn([4, 32]), randn([32, 4])))).toThrow(/attn1\.to_q: the layer is fused; unfuseLora first/);
    expectUnchanged(model, fused, 'fused');
    unfuseLora(model);
    expectUnchanged(model, snap, 'unfused');
    for (const [, m] of cases) dispose([...m.values()]);
    dispose([...snap.weights.values(), ...fused.weights.values()]);
    model.dispose();
  });

  it('a FIFO, an empty file and a file of int32 weights: the loaders refuse naming the file, convert-lora writes nothing', () => {
    const model = tinyAttentionModel();
    loadLoraWeights(model, golden, { adapterName: 'a' });
    const snap = snapshot(model);
    const fifo = join(tmp, 'lora.fifo');
    execFileSync('mkfifo', [fifo]);
    const empty = join(tmp, 'empty.safetensors');
    writeFileSync(empty, '');
    const ints = join(tmp, 'ints.safetensors');
    tidy(() => saveSafetensors(ints, new Map([[`${Q}.lora.down.weight`, torch.zeros([4, 32], { dtype: 'int32' })], [`${Q}.lora.up.weight`, torch.zeros([32, 4], { dtype: 'int32' })]])));
    const out = join(tmp, 'converted.safetensors');
    for (const [file, msg] of [[fifo, /lora\.fifo' is a FIFO/], [empty, /empty\.safetensors/], [ints, /ints\.safetensors\): cannot load:\n {2}unet\..*to_q\.lora\.down\.weight: dtype int32/]] as const) {
      expect(() => loadLoraWeights(model, file)).toThrow(msg);
      expectUnchanged(model, snap, file);
      expect(() => convertLoraFile(file, out, 'kohya')).toThrow(msg);
      expect(existsSync(out)).toBe(false);
    }
    dispose([...snap.weights.values()]);
    model.dispose();
  });

  it('weightName must be a plain file name: a path out of the folder is refused on load and save, the model unchanged', () => {
    const model = tinyAttentionModel();
    const snap = snapshot(model);
    const dir = join(goldens, 'lora-diffusers');
    for (const bad of ['../lora-kohya/tiny_sd_kohya_lora.safetensors', '/etc/passwd', '..', '']) {
      expect(() => loadLoraWeights(model, dir, { weightName: bad })).toThrow(/weightName '.*' (contains|is empty)/);
      expectUnchanged(model, snap, bad);
    }
    expect(() => saveLoraWeights(tmp, model, { weightName: '../escape.safetensors' })).toThrow(/weightName '\.\.\/escape\.safetensors' contains a path separator/);
    expect(existsSync(join(tmp, '..', 'escape.safetensors'))).toBe(false);
    dispose([...snap.weights.values()]);
    model.dispose();
  });
});

describe('Kohya names the rebuilt path misses', () => {
  it('match the model\'s own paths by their Kohya name (a module name with an underscore the rebuild splits)', () => {
    const model = new Node();
    place(model, 'extra_proj.inner', new Linear(6, 5, false));
    const name = kohyaName('extra_proj.inner');
    expect(name).toBe('lora_unet_extra_proj_inner');
    const down = torch.randn([2, 6]);
    const up = torch.randn([5, 2]);
    const alpha = torch.scalarTensor(1);
    const r = loadLoraWeights(model, new Map([[`${name}.alpha`, alpha], [`${name}.lora_down.weight`, down], [`${name}.lora_up.weight`, up]]));
    expect([r.unetLayers, r.formats]).toEqual([1, ['kohya']]);
    const [[path, layer]] = loraLayers(model) as [[string, LoraLinear]];
    expect([path, layer.rank, layer.alpha]).toEqual(['extra_proj.inner', 2, 1]);
    expect(bitEqual(layer.lora_A.weight, down) && bitEqual(layer.lora_B.weight, up)).toBe(true);
    dispose([down, up, alpha]);
    model.dispose();
  });
});
