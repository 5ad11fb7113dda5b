// The trainable LoRA variants (lib/lora/variants.ts) against their defining formulas, written out here (fp32, CPU):
// PEFT's initialisations, the delta weight and the forward ≤ 1e-6, the gradients against autograd of the written-out
// formula, DoRA against the lora_formats golden, LyCORIS' factorization.
import { afterAll, describe, expect, it } from 'vitest';
import { noGrad } from '../lib/autograd.js';
import * as F from '../lib/functional.js';
import { loraLayers } from '../lib/lora/attach.js';
import type { LoraLayer } from '../lib/lora/lora_layer.js';
import { LOCON_TARGET_MODULES, attachLoraVariant, factorization, trainedLycoris, variantTargets, type LoraType, type LoraVariantConfig } from '../lib/lora/variants.js';
import { Conv2d, Linear } from '../lib/nn/layers.js';
import { Module } from '../lib/nn/module.js';
import { Generator } from '../lib/random.js';
import { dispose, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { goldenFile, relErr } from './helpers.js';

/** A Linear to_q (12 → 10, with bias) and a 3×3 conv1 (6 → 8, padding 1), as named in a UNet. */
class Holder extends Module {
  to_q: Module = new Linear(12, 10, true);
  conv1: Module = new Conv2d(6, 8, 3, { padding: 1 });
}

const gen = (seed: number) => new Generator().manualSeed(seed);

/** A holder with adapters of `type` on both layers (rank 2, alpha 3; conv rank 3, alpha 2), seeded. */
function adapted(type: LoraType, more: Partial<LoraVariantConfig> = {}): { m: Holder; lin: LoraLayer; conv: LoraLayer } {
  const m = new Holder();
  noGrad(() => { for (const p of m.parameters()) p.copy_(tidy(() => torch.randn(p.shape, { generator: gen(p.numel()) }).mul(0.5))); });
  attachLoraVariant(m, { type, rank: 2, alpha: 3, convRank: 3, convAlpha: 2, targetModules: ['to_q', 'conv1'], generator: gen(7), ...more });
  const layers = new Map(loraLayers(m));
  return { m, lin: layers.get('to_q')!, conv: layers.get('conv1')! };
}

/** Sets every trained parameter to seeded random values (the zero factors too), so the formulas are not trivially 0. */
function randomise(layer: LoraLayer, seed: number): void {
  noGrad(() => {
    for (const [n, p] of layer.adapterParameters()) {
      const r = tidy(() => torch.randn(p.shape, { generator: gen(seed++) }).mul(0.4));
      if (n === 'lora_magnitude_vector') p.copy_(tidy(() => p.mul(r.mul(0.25).add(1))));
      else p.copy_(r);
      r.dispose();
    }
  });
}

const named = (l: LoraLayer) => Object.fromEntries(l.adapterParameters()) as Record<string, Tensor>;

/** kron(a [p, q], b [r, s]) written out: [p·r, q·s] with (i·r + k, j·s + l) = a[i, j]·b[k, l]. */
function kronWritten(a: Tensor, b: Tensor): Tensor {
  const [p, q] = a.shape as [number, number];
  const [r, s] = b.shape.slice(0, 2) as [number, number];
  const rest = b.shape.slice(2);
  if (!rest.length) return torch.einsum('ij,kl->ikjl', a, b).reshape([p * r, q * s]);
  return torch.einsum('ij,klmn->ikjlmn', a, b).reshape([p * r, q * s, ...rest]);
}

/** ΔW of the layer's trained adapter by its defining formula, from the given (leaf) tensors. */
function formulaDelta(type: LoraType, l: LoraLayer, t: Record<string, Tensor>): Tensor {
  const w = l.base_layer.weight;
  const lyc = trainedLycoris(l);
  const s = lyc ? lyc.alpha / lyc.rank : l.alpha / l.rank;
  if (type === 'loha') return t.hada_w1_a!.matmul(t.hada_w1_b!).mul(t.hada_w2_a!.matmul(t.hada_w2_b!)).mul(s).reshape(w.shape);
  if (type === 'lokr') {
    const w2 = t.lokr_w2 ?? t.lokr_w2_a!.matmul(t.lokr_w2_b!);
    return kronWritten(t.lokr_w1!, w2).reshape(w.shape).mul(s);
  }
  const [a, b] = [t['lora_A.weight']!, t['lora_B.weight']!];
  return b.reshape([b.shape[0]!, -1]).matmul(a.reshape([a.shape[0]!, -1])).reshape(w.shape).mul(s);
}

/** The layer's output by the formula: base with W + ΔW (DoRA: m/‖W + ΔW‖_row·(W + ΔW), the norm detached as PEFT). */
function formulaForward(type: LoraType, l: LoraLayer, t: Record<string, Tensor>, x: Tensor): Tensor {
  const base = l.base_layer as Linear | Conv2d;
  const w = base.weight;
  let wNew = w.add(formulaDelta(type, l, t));
  if (type === 'dora') {
    const norm = w.ndim === 4 ? wNew.detach().norm(2, [1, 2, 3]) : wNew.detach().norm(2, 1);
    const f = t.lora_magnitude_vector!.div(norm);
    wNew = wNew.mul(f.reshape(w.ndim === 4 ? [-1, 1, 1, 1] : [-1, 1]));
  }
  return base instanceof Linear ? F.linear(x, wNew, base.bias) : F.conv2d(x, wNew, base.bias, { padding: 1 });
}

const inputs = () => ({ lin: torch.randn([3, 12], { generator: gen(101) }), conv: torch.randn([2, 6, 5, 5], { generator: gen(102) }) });

const TYPES: LoraType[] = ['lora', 'locon', 'dora', 'loha', 'lokr'];

describe('LyCORIS factorization (PEFT/LyCORIS factorization(dim, factor))', () => {
  it('splits as LyCORIS does', () => {
    expect(factorization(32)).toEqual([4, 8]); // the lora_formats golden's 32 → (4, 8)
    expect(factorization(64)).toEqual([8, 8]);
    expect(factorization(320)).toEqual([16, 20]);
    expect(factorization(1280)).toEqual([32, 40]);
    expect(factorization(768)).toEqual([24, 32]);
    expect(factorization(10)).toEqual([2, 5]);
    expect(factorization(7)).toEqual([1, 7]);
    expect(factorization(320, 8)).toEqual([8, 40]);
    expect(factorization(320, 4)).toEqual([4, 80]);
    expect(factorization(320, 3)).toEqual([2, 160]); // not a divisor: the most balanced split with m ≤ 3
  });
});

describe('initialisations (PEFT): the adapter starts as the identity', () => {
  for (const type of TYPES) {
    it(`${type}: output = base output at init; the zero factor and the ranges are PEFT's`, () => {
      const { m, lin, conv } = adapted(type);
      try {
        tidy(() => {
          const x = inputs();
          for (const [l, xi] of [[lin, x.lin], [conv, x.conv]] as const) {
            const ref = l.base_layer.forward(xi);
            expect(relErr(l.forward(xi), ref)).toBeLessThanOrEqual(1e-7);
            const p = named(l);
            for (const t of Object.values(p)) expect(t.dtype).toBe('float32');
            for (const t of Object.values(p)) expect(t.requiresGrad).toBe(true);
            if (type === 'loha') {
              expect(p.hada_w2_b!.abs().max().item()).toBe(0);
              for (const k of ['hada_w1_a', 'hada_w1_b', 'hada_w2_a']) {
                const bound = 1 / Math.sqrt(p[k]!.shape[1]!);
                expect(p[k]!.abs().max().item(), k).toBeLessThanOrEqual(bound);
                expect(p[k]!.abs().max().item(), k).toBeGreaterThan(bound / 4);
              }
            } else if (type === 'lokr') {
              expect(p.lokr_w1!.abs().max().item()).toBe(0);
              for (const [k, t] of Object.entries(p).filter(([k]) => k !== 'lokr_w1')) {
                const fanIn = t.shape.slice(1).reduce((a, b) => a * b, 1);
                expect(t.abs().max().item(), k).toBeLessThanOrEqual(1 / Math.sqrt(fanIn));
              }
            } else {
              expect(p['lora_B.weight']!.abs().max().item()).toBe(0);
              expect(p['lora_A.weight']!.abs().max().item()).toBeGreaterThan(0);
              if (type === 'dora') {
                const w = l.base_layer.weight;
                expect(relErr(p.lora_magnitude_vector!, w.ndim === 4 ? w.norm(2, [1, 2, 3]) : w.norm(2, 1))).toBeLessThanOrEqual(1e-7);
              }
            }
          }
          // only the adapters train
          const trained = new Set([...lin.adapterParameters(), ...conv.adapterParameters()].map(([, t]) => t));
          for (const [n, p] of m.namedParameters()) if (!trained.has(p)) expect(p.requiresGrad, n).toBe(false);
        });
      } finally {
        m.dispose();
      }
    });
  }

  it('shapes: LoKr factors from factorization (Linear 12 → 10: w1 [2, 3], w2 [5, 4] split at rank < 2.5), LoHa conv factors flattened', () => {
    const low = adapted('lokr', { rank: 2 });
    const high = adapted('lokr', { rank: 3, alpha: 1 });
    const loha = adapted('loha');
    try {
      const shapes = (l: LoraLayer) => Object.fromEntries(l.adapterParameters().map(([n, t]) => [n, t.shape]));
      expect(shapes(low.lin)).toEqual({ lokr_w1: [2, 3], lokr_w2_a: [5, 2], lokr_w2_b: [2, 4] });
      expect(shapes(high.lin)).toEqual({ lokr_w1: [2, 3], lokr_w2: [5, 4] });
      expect(high.lin.scalingOf('default')).toBe(1); // both factors full: scale 1 whatever the alpha (LyCORIS)
      expect(shapes(low.conv)).toEqual({ lokr_w1: [2, 2], lokr_w2: [4, 3, 3, 3] }); // conv rank 3 ≥ max(4, 3)/2
      expect(shapes(loha.conv)).toEqual({ hada_w1_a: [8, 3], hada_w1_b: [3, 54], hada_w2_a: [8, 3], hada_w2_b: [3, 54] });
      expect(shapes(adapted('locon').conv)).toEqual({ 'lora_A.weight': [3, 6, 3, 3], 'lora_B.weight': [8, 3, 1, 1] });
    } finally {
      for (const h of [low, high, loha]) h.m.dispose();
    }
  });
});

describe('ΔW, forward and gradients against the written-out formulas (≤ 1e-6)', () => {
  for (const type of TYPES) {
    for (const which of ['lin', 'conv'] as const) {
      it(`${type} on a ${which === 'lin' ? 'Linear' : '3×3 Conv2d'}`, () => {
        const h = adapted(type);
        const l = h[which];
        randomise(l, 500);
        try {
          tidy(() => {
            const x = inputs()[which];
            const params = l.adapterParameters();
            // leaves of the same values for the formula's autograd
            const leaves = Object.fromEntries(params.map(([n, p]) => {
              const c = p.detach().clone();
              c.requiresGrad = true;
              return [n, c];
            })) as Record<string, Tensor>;
            // ΔW (deltaWeight is B·A·s for DoRA's LoRA part; DoRA's weight is checked through the forward)
            const ref = formulaDelta(type, l, leaves).detach();
            expect(relErr(l.deltaWeight('default'), ref)).toBeLessThanOrEqual(1e-6);
            expect(ref.abs().max().item()).toBeGreaterThan(1e-3);
            // forward
            const ours = l.forward(x);
            const theirs = formulaForward(type, l, leaves, x);
            expect(relErr(ours, theirs)).toBeLessThanOrEqual(1e-6);
            // gradients of one loss
            const g = torch.randn(ours.shape, { generator: gen(9) });
            ours.mul(g).sum().backward();
            theirs.mul(g).sum().backward();
            for (const [n, p] of params) {
              expect(p.grad, n).not.toBeNull();
              const err = relErr(p.grad!, leaves[n]!.grad!);
              expect(err, `${type} ${n}`).toBeLessThanOrEqual(1e-6);
            }
            // the frozen base gets no gradient
            expect(l.base_layer.weight.grad).toBeNull();
          });
        } finally {
          for (const [, p] of l.adapterParameters()) p.grad?.dispose();
          h.m.dispose();
        }
      });
    }
  }
});

describe('DoRA against the lora_formats golden (PEFT 0.13.2 use_dora)', () => {
  const golden = goldenFile('lora_formats.safetensors');
  afterAll(() => golden.dispose());
  it("a trainable DoRA layer holding the golden's base, A, B and magnitude gives PEFT's merged weight ≤ 1e-6", async () => {
    const { loadSafetensors } = await import('../lib/io/safetensors.js');
    const { fixtures } = await import('./helpers.js');
    const { join } = await import('node:path');
    const file = loadSafetensors(join(fixtures, 'goldens', 'lora-formats', 'dora_diffusers.safetensors')).tensors;
    try {
      for (const path of ['down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q', 'mid_block.attentions.0.transformer_blocks.0.attn2.to_k']) {
        const w = golden.get(`dora/base_weight/${path}`);
        const [out, inF] = w.shape as [number, number];
        const holder = new (class extends Module { to_q: Module = new Linear(inF, out, false); })();
        try {
          noGrad(() => (holder.to_q as Linear).weight.copy_(w));
          const down = file.get(`unet.${path}.lora.down.weight`)!;
          attachLoraVariant(holder, { type: 'dora', rank: down.shape[0]!, targetModules: ['to_q'] });
          const l = loraLayers(holder)[0]![1];
          const p = named(l);
          noGrad(() => {
            p['lora_A.weight']!.copy_(down);
            p['lora_B.weight']!.copy_(file.get(`unet.${path}.lora.up.weight`)!);
            p.lora_magnitude_vector!.copy_(file.get(`unet.${path}.lora_magnitude_vector`)!);
          });
          expect(relErr(p.lora_magnitude_vector!, golden.get(`dora/magnitude/${path}`))).toBe(0);
          // the layer's output on the identity is W'ᵀ
          tidy(() => {
            const eye = torch.tensor(Array.from({ length: inF * inF }, (_, i) => (i % (inF + 1) === 0 ? 1 : 0)), { shape: [inF, inF] });
            expect(relErr(l.forward(eye), golden.get(`dora/merged_weight/${path}`).t())).toBeLessThanOrEqual(1e-6);
          });
        } finally {
          holder.dispose();
        }
      }
    } finally {
      dispose([...file.values()]);
    }
  });
});

describe('targets', () => {
  it("LoCon's convs on the tiny UNet: ResNet conv1/conv2/conv_shortcut, proj_in/proj_out, the resamplers' convs; k×k get --conv_rank", async () => {
    const { UNet2DConditionModel } = await import('../lib/models/unet_2d_condition.js');
    const { fixtures } = await import('./helpers.js');
    const { join } = await import('node:path');
    const unet = UNet2DConditionModel.fromPretrained(join(fixtures, 'tiny-sd'), { subfolder: 'unet' });
    try {
      const { targets, problems } = variantTargets(unet, { type: 'locon', rank: 4, convRank: 2 });
      expect(problems).toEqual([]);
      const paths = targets.map((t) => t.path);
      expect(paths.filter((p) => /to_[qkv]$|to_out\.0$/.test(p))).toHaveLength(48);
      for (const suffix of LOCON_TARGET_MODULES) expect(paths.some((p) => p.endsWith(suffix)), suffix).toBe(true);
      expect(paths).not.toContain('conv_in');
      expect(paths).not.toContain('conv_out');
      for (const t of targets) expect(t.rank, t.path).toBe(t.layer instanceof Conv2d && t.layer.kernelSize > 1 ? 2 : 4);
      // plain lora and loha without --conv_rank: no convs
      expect(variantTargets(unet, { type: 'loha', rank: 4 }).targets).toHaveLength(48);
      expect(variantTargets(unet, { type: 'loha', rank: 4, convRank: 4 }).targets.length).toBe(targets.length);
      // names that match nothing, and ranks a layer cannot hold, are named
      const bad = variantTargets(unet, { type: 'lora', rank: 4, targetModules: ['to_q', 'to_qq', 'attn9'] }, { checkNames: true, names: { targets: '--lora_target_modules', rank: '--rank', convRank: '--conv_rank' } });
      expect(bad.problems.join('\n')).toMatch(/--lora_target_modules: 'to_qq', 'attn9' match no module/);
      const big = variantTargets(unet, { type: 'locon', rank: 4, convRank: 1000 }, { names: { targets: '--lora_target_modules', rank: '--rank', convRank: '--conv_rank' } });
      expect(big.problems.join('\n')).toMatch(/--conv_rank 1000 is larger than the smallest layer LoRA adapts, .*Conv2d .*3×3\): --conv_rank must be at most/);
      expect(() => attachLoraVariant(unet, { type: 'dora', rank: 4, targetModules: ['attn1'] })).toThrow(/attn1 \(Attention\).* not Linear or Conv2d/);
      expect(() => attachLoraVariant(unet, { type: 'nope' as LoraType, rank: 4 })).toThrow(/unknown LoRA type 'nope'/);
      expect(loraLayers(unet)).toHaveLength(0); // a refused attach changed nothing
    } finally {
      unet.dispose();
    }
  });
});

