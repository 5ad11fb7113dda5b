// Autograd: gradients against central finite differences in float64 and against PyTorch's autograd
// (test/fixtures/ops_reference.json), accumulation and zeroing, grad modes, autocast regions and the
// random generators' replay.
import { afterAll, describe, expect, it } from 'vitest';
import { autocast, enableGrad, inferenceMode, isAutocastEnabled, isGradEnabled, noGrad } from '../lib/autograd.js';
import { dispose, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import * as F from '../lib/functional.js';
import { Generator, defaultGenerator, manualSeed } from '../lib/random.js';
import { expectMatches, loadInputs, reference } from './reference.js';
import { relErr } from './helpers.js';

// ---- finite differences

interface Arg { data: Float64Array; shape: number[] }

/** Deterministic float64 test values (scaled normal draws from a seeded generator). */
function arg(shape: number[], seed: number, scale = 1, offset = 0): Arg {
  return tidy(() => {
    const t = torch.randn(shape, { generator: new Generator().manualSeed(seed), dtype: 'float64' }).mul(scale).add(offset);
    return { data: t.dataSync() as Float64Array, shape };
  });
}

const l2 = (x: Float64Array): number => Math.sqrt(x.reduce((s, v) => s + v * v, 0));

/**
 * Compares autograd's gradient of the scalar f(...args) with central differences (step h) for every
 * argument; returns the largest ‖analytic − numeric‖/‖numeric‖.
 */
function gradcheck(f: (...xs: Tensor[]) => Tensor, args: Arg[], h = 1e-6): number {
  const analytic = tidy(() => {
    const leaves = args.map((a) => torch.tensor(a.data, { shape: a.shape, requiresGrad: true }));
    const y = f(...leaves);
    expect(y.shape).toEqual([]);
    y.backward();
    return leaves.map((l) => l.grad!.toFloat64Array());
  });
  let worst = 0;
  args.forEach((a, which) => {
    const numeric = new Float64Array(a.data.length);
    const at = (i: number, delta: number): number => noGrad(() => tidy(() => {
      const d = a.data.slice();
      d[i]! += delta;
      const xs = args.map((b, j) => torch.tensor(j === which ? d : b.data, { shape: b.shape }));
      return f(...xs).item();
    }));
    for (let i = 0; i < a.data.length; i++) numeric[i] = (at(i, h) - at(i, -h)) / (2 * h);
    const diff = analytic[which]!.map((v, i) => v - numeric[i]!);
    expect(l2(numeric), `argument ${which}: numeric gradient is zero, the check would be vacuous`).toBeGreaterThan(1e-3);
    worst = Math.max(worst, l2(diff) / l2(numeric));
  });
  return worst;
}

const FD_TOL = 1e-6; // float64 central differences with h = 1e-6 are good to ~1e-9 here
const fdErrors = new Map<string, number>();
const pyErrors = new Map<string, number>();

describe('gradients vs central finite differences (float64)', () => {
  const check = (name: string, f: (...xs: Tensor[]) => Tensor, args: Arg[]): void => {
    const err = gradcheck(f, args);
    fdErrors.set(name, err);
    expect(err, name).toBeLessThan(FD_TOL);
  };

  it('conv2d → group_norm → gelu', () => {
    const r = arg([1, 4, 5, 5], 100);
    check('conv2d_group_norm_gelu', (x, w, b, gw, gb) => tidy(() => {
      const y = F.gelu(F.groupNorm(F.conv2d(x!, w!, b!, { padding: 1 }), 2, gw!, gb!));
      return y.mul(torch.tensor(r.data, { shape: r.shape })).sum();
    }), [arg([1, 2, 5, 5], 1), arg([4, 2, 3, 3], 2, 0.4), arg([4], 3), arg([4], 4, 0.3, 1), arg([4], 5)]);
  });

  it('strided, grouped and dilated conv2d with tanh-gelu', () => {
    check('conv2d_variants', (x, w1, w2) => tidy(() => {
      const y = F.conv2d(x!, w1!, null, { stride: 2, padding: 1, groups: 2 });
      const z = F.conv2d(F.gelu(y, 'tanh'), w2!, null, { padding: 2, dilation: 2 });
      return z.square().mean();
    }), [arg([1, 4, 6, 6], 10), arg([4, 2, 3, 3], 11, 0.5), arg([2, 4, 3, 3], 12, 0.5)]);
  });

  it('layer_norm → attention (softmax, baddbmm, bmm) with a float mask', () => {
    const mask = arg([3, 5], 23);
    const r = arg([2, 3, 4], 24);
    check('layer_norm_attention', (q, k, v, w, b) => tidy(() => {
      const qn = F.layerNorm(q!, [4], w!, b!);
      const y = F.scaledDotProductAttention(qn, k!, v!, { attnMask: torch.tensor(mask.data, { shape: mask.shape }) });
      return y.mul(torch.tensor(r.data, { shape: r.shape })).sum();
    }), [arg([2, 3, 4], 20), arg([2, 5, 4], 21), arg([2, 5, 4], 22), arg([4], 25, 0.2, 1), arg([4], 26)]);
  });

  it('elementwise chain with broadcasting and softmax/log_softmax', () => {
    check('elementwise', (x, y, z) => tidy(() => {
      const p = y!.abs().add(0.5); // positive
      const a = x!.tanh().mul(p.sigmoid()).add(x!.div(3).exp().mul(p.sqrt()));
      const b = p.log().mul(F.silu(x!)).sub(x!.pow(3).div(p)).add(p.rsqrt().mul(x!.erf()));
      const c = x!.add(z!).softmax(-1).mul(y!).sum().add(x!.logSoftmax(0).mul(z!).mean());
      return a.add(b).mul(z!).sum().add(c).add(x!.maximum(y!).sum()).add(x!.clamp(-0.5, 0.5).sin().cos().sum());
    }), [arg([3, 4], 30), arg([3, 4], 31), arg([4], 32)]);
  });

  it('linear, matmul and reductions (var, norm, amax, mean, mse_loss)', () => {
    const t = arg([3, 5], 43);
    check('linear_reductions', (x, w, b, m) => tidy(() => {
      const out = F.linear(x!, w!, b!);
      const u = out.unsqueeze(0).matmul(m!).squeeze(0);
      return out.var(0).mean().add(out.norm()).add(u.amax(1).sum()).add(F.mseLoss(out, torch.tensor(t.data, { shape: t.shape })))
        .add(u.mean([0, 1]).mul(0.5)).add(out.sum(1, true).square().sum());
    }), [arg([3, 4], 40), arg([5, 4], 41), arg([5], 42), arg([5, 2], 44)]);
  });

  it('resampling: reflect/replicate pad, bilinear and nearest interpolate, avg_pool2d', () => {
    const r = arg([1, 2, 4, 4], 51);
    check('resampling', (x) => tidy(() => {
      const up = F.interpolate(F.pad(x!, [1, 1, 1, 1], 'reflect'), { scaleFactor: 2, mode: 'bilinear' });
      const pooled = F.avgPool2d(F.pad(up, [1, 0, 0, 1], 'replicate'), 3, 3, 1);
      const near = F.interpolate(x!, { size: [4, 4], mode: 'nearest' });
      return F.mseLoss(pooled.narrow(2, 0, 4).narrow(3, 0, 4).add(near), torch.tensor(r.data, { shape: r.shape }), 'sum');
    }), [arg([1, 2, 4, 4], 50)]);
  });

  it('shape ops route gradients: permute, cat, stack, split, gather, index_select, flip, expand, slice', () => {
    const r = arg([4, 6], 62);
    check('shapes', (x, y) => tidy(() => {
      const idx = torch.tensor(BigInt64Array.from([2n, 0n, 2n]));
      const gidx = torch.tensor(BigInt64Array.from([1n, 0n, 1n, 1n, 0n, 2n]), { shape: [2, 3] });
      const [p0, p1] = x!.permute(1, 0).split([1, 2], 0) as [Tensor, Tensor];
      const c = torch.cat([p1, p0.expand(2, -1)], 1).flip([1]); // [2, 4]
      const s = torch.stack([c, c.mul(y!.slice(1, 0, 4))], 0).reshape(4, 2, 2).transpose(1, 2).reshape(4, 4);
      const g = x!.gather(1, gidx).indexSelect(1, idx).sum();
      return torch.cat([s, x!.t().repeat(4, 1).narrow(1, 0, 2).slice(0, null, null, 3).reshape(4, 2).mul(3)], 1)
        .mul(torch.tensor(r.data, { shape: r.shape })).sum().add(g).add(x!.chunk(2, 1)[1]!.square().sum());
    }), [arg([2, 3], 60), arg([2, 6], 61)]);
  });

  it('embedding accumulates into repeated rows', () => {
    check('embedding', (w) => tidy(() => {
      const idx = torch.tensor(BigInt64Array.from([1n, 3n, 1n, 0n, 1n, 3n]), { shape: [2, 3] });
      return F.embedding(idx, w!).pow(3).sum();
    }), [arg([4, 3], 70)]);
  });
});

describe("gradients vs PyTorch's autograd (float32)", () => {
  const inputs = loadInputs();
  afterAll(() => dispose(Object.values(inputs)));
  const r = (name: string): Tensor => inputs[name]!;
  const fns: Record<string, (...xs: Tensor[]) => Tensor> = {
    silu_linear: (x, w, b) => F.silu(x!.matmul(w!.t()).add(b!)).pow(2).sum(),
    group_norm: (x, w, b) => F.groupNorm(x!, 2, w!, b!).mul(r('r_img')).sum(),
    conv2d: (x, w, b) => F.conv2d(x!, w!, b!, { stride: 2, padding: 1 }).mul(r('r_conv')).sum(),
    conv2d_groups: (x, w) => F.conv2d(x!, w!, null, { padding: 1, groups: 2 }).pow(2).mean(),
    attention: (q, k, v) => q!.matmul(k!.transpose(-1, -2)).div(Math.sqrt(8)).softmax(-1).matmul(v!).mul(r('r_att')).sum(),
    attention_mask: (q, k, v) => q!.matmul(k!.transpose(-1, -2)).mul(0.3).add(r('att_mask')).softmax(-1).matmul(v!).mul(r('r_att')).sum(),
    layer_norm_gelu: (x, w, b) => F.gelu(F.layerNorm(x!, [5], w!, b!)).mul(r('r_x4')).sum(),
    log_softmax: (x) => x!.logSoftmax(1).mul(r('r_x4')).sum(),
    interp_pool_mse: (x) => F.mseLoss(F.avgPool2d(F.interpolate(x!, { scaleFactor: 2, mode: 'bilinear' }), 2), r('r_img')),
    embedding: (w) => F.embedding(r('emb_idx'), w!).pow(2).sum(),
    reductions: (x) => x!.amax(-1).sum().add(x!.var(1).mean()).add(x!.norm()).add(x!.mean([2, 3]).tanh().sum()),
  };

  it('every recorded gradient case has a function here', () => {
    expect(Object.keys(fns).sort()).toEqual(Object.keys(reference.grads).sort());
  });

  for (const [name, g] of Object.entries(reference.grads)) {
    it(name, () => {
      tidy(() => {
        const leaves = g.inputs.map((n) => inputs[n]!.clone().requiresGrad_());
        const loss = fns[name]!(...leaves);
        let worst = expectMatches(loss, g.loss, 1e-5, `${name}: loss`);
        loss.backward();
        g.out.forEach((ref, j) => {
          worst = Math.max(worst, expectMatches(leaves[j]!.grad!, ref, 1e-5, `${name}: grad of ${g.inputs[j]}`));
        });
        pyErrors.set(name, worst);
      });
    });
  }

  afterAll(() => {
    const fmt = (m: Map<string, number>) => [...m].map(([n, e]) => `${n} ${e.toExponential(1)}`).join(', ');
    console.log(`finite differences, max rel err: ${fmt(fdErrors)}\nPyTorch autograd, max rel err: ${fmt(pyErrors)}`);
  });
});

describe('backward', () => {
  it('backward(gradient) on a non-scalar output gives the vector-Jacobian product', () => {
    tidy(() => {
      const x = torch.tensor([1, -2, 3], { requiresGrad: true });
      const y = x.mul(x).add(x.mul(2)); // dy/dx = 2x + 2
      y.backward(torch.tensor([1, 0.5, -1]));
      expect(x.grad!.tolist()).toEqual([4, -1, -8]);
      const z = x.mul(3);
      expect(() => z.backward()).toThrow(/grad can be implicitly created only for scalar outputs/);
    });
  });

  it('accumulates over backward calls until zeroed (grad = null or grad.zero_())', () => {
    tidy(() => {
      const w = torch.tensor([[1, 2], [3, 4]], { requiresGrad: true });
      const x = torch.tensor([1, -1]);
      const loss = () => w.matmul(x).square().sum(); // d/dw = 2 (w x) xᵀ; w x = [-1, -1]
      loss().backward();
      expect(w.grad!.tolist()).toEqual([[-2, 2], [-2, 2]]);
      loss().backward();
      expect(w.grad!.tolist()).toEqual([[-4, 4], [-4, 4]]);
      w.grad = null;
      expect(w.grad).toBeNull();
      loss().backward();
      expect(w.grad!.tolist()).toEqual([[-2, 2], [-2, 2]]);
      w.grad!.zero_();
      expect(w.grad!.tolist()).toEqual([[0, 0], [0, 0]]);
      loss().backward();
      expect(w.grad!.tolist()).toEqual([[-2, 2], [-2, 2]]);
      expect(w.isLeaf).toBe(true);
      expect(loss().isLeaf).toBe(false);
    });
  });

  it('a graph is freed after backward unless retainGraph', () => {
    tidy(() => {
      const x = torch.tensor([0.5, 1.5], { requiresGrad: true });
      const y = x.exp().sum();
      y.backward(undefined, { retainGraph: true });
      y.backward();
      expect(x.grad!.toFloat64Array()).toEqual(Float64Array.from([2 * Math.fround(Math.exp(0.5)), 2 * Math.fround(Math.exp(1.5))]));
      expect(() => y.backward()).toThrow(/backward through the graph a second time/);
    });
  });

  it('detach cuts the graph and shares storage', () => {
    tidy(() => {
      const x = torch.tensor([1, 2], { requiresGrad: true });
      const y = x.mul(2);
      const d = y.detach();
      expect(d.requiresGrad).toBe(false);
      expect(d._dataPtr()).toBe(y._dataPtr());
      const loss = y.mul(d).sum(); // d is a constant: dloss/dx = 2 d = [4, 8]
      loss.backward();
      expect(x.grad!.tolist()).toEqual([4, 8]);
      expect(() => d.sum().backward()).toThrow(/does not require grad/);
    });
  });

  it('gradients flow to requiresGrad leaves only', () => {
    tidy(() => {
      const a = torch.tensor([1, 2], { requiresGrad: true });
      const b = torch.tensor([3, 4]);
      a.mul(b).sum().backward();
      expect(a.grad!.tolist()).toEqual([3, 4]);
      expect(b.grad).toBeNull();
      expect(b.requiresGrad).toBe(false);
      b.requiresGrad_();
      expect(b.requiresGrad).toBe(true);
    });
  });
});

describe('grad modes', () => {
  it('noGrad records nothing and restores the mode, even when fn throws', () => {
    tidy(() => {
      const x = torch.ones([2], { requiresGrad: true });
      expect(isGradEnabled()).toBe(true);
      const y = noGrad(() => {
        expect(isGradEnabled()).toBe(false);
        return x.mul(2);
      });
      expect(y.requiresGrad).toBe(false);
      expect(isGradEnabled()).toBe(true);
      expect(() => noGrad(() => { throw new Error('boom'); })).toThrow('boom');
      expect(isGradEnabled()).toBe(true);
      expect(() => noGrad(() => x.matmul(torch.ones([3])))).toThrow(/aten::matmul/);
      expect(isGradEnabled()).toBe(true);
      expect(x.mul(2).requiresGrad).toBe(true);
    });
  });

  it('enableGrad turns recording back on inside noGrad', () => {
    tidy(() => {
      const x = torch.ones([2], { requiresGrad: true });
      const y = noGrad(() => {
        const inner = enableGrad(() => {
          expect(isGradEnabled()).toBe(true);
          return x.mul(3);
        });
        expect(inner.requiresGrad).toBe(true);
        expect(isGradEnabled()).toBe(false);
        expect(x.mul(3).requiresGrad).toBe(false);
        return inner;
      });
      y.sum().backward(); // the graph recorded inside enableGrad is usable afterwards
      expect(x.grad!.tolist()).toEqual([3, 3]);
    });
  });

  it('inferenceMode records nothing, nests, and is left on throw', () => {
    tidy(() => {
      const x = torch.ones([2], { requiresGrad: true });
      const y = inferenceMode(() => {
        expect(isGradEnabled()).toBe(false);
        return inferenceMode(() => x.mul(2)).add(1);
      });
      expect(y.requiresGrad).toBe(false);
      expect(y.tolist()).toEqual([3, 3]);
      expect(isGradEnabled()).toBe(true);
      expect(() => inferenceMode(() => { throw new Error('boom'); })).toThrow('boom');
      expect(isGradEnabled()).toBe(true);
      expect(x.mul(2).requiresGrad).toBe(true);
      // an inference tensor cannot be saved for a later backward
      expect(() => x.mul(y).sum().backward()).toThrow(/[Ii]nference tensors/);
    });
  });

  it('async functions are refused by noGrad, enableGrad, inferenceMode, autocast and tidy, and leave no state behind', () => {
    const asyncFn = async () => 1;
    expect(() => noGrad(asyncFn)).toThrow(/Promise/);
    expect(() => enableGrad(asyncFn)).toThrow(/Promise/);
    expect(() => inferenceMode(asyncFn)).toThrow(/Promise/);
    expect(() => autocast({ deviceType: 'cpu', dtype: 'bfloat16' }, asyncFn)).toThrow(/Promise/);
    expect(() => tidy(asyncFn)).toThrow(/Promise/);
    expect(isGradEnabled()).toBe(true);
    expect(isAutocastEnabled('cpu')).toBe(false);
    tidy(() => expect(torch.ones([2], { requiresGrad: true }).mul(2).requiresGrad).toBe(true));
  });
});

describe('autocast (CPU, bfloat16)', () => {
  it('runs matmul, linear and conv2d in bfloat16 inside the region only', () => {
    tidy(() => {
      const a = torch.randn([4, 8]);
      const b = torch.randn([8, 3]);
      expect(isAutocastEnabled('cpu')).toBe(false);
      const [mm, lin, conv, add] = autocast({ deviceType: 'cpu', dtype: 'bfloat16' }, () => {
        expect(isAutocastEnabled('cpu')).toBe(true);
        return [a.matmul(b), F.linear(a, b.t()), F.conv2d(torch.randn([1, 2, 4, 4]), torch.randn([3, 2, 3, 3])), a.add(a)];
      });
      expect([mm!.dtype, lin!.dtype, conv!.dtype]).toEqual(['bfloat16', 'bfloat16', 'bfloat16']);
      expect(add!.dtype).toBe('float32'); // elementwise ops are not autocast
      expect(relErr(mm!, a.matmul(b))).toBeLessThan(2e-2); // bf16 precision, the same product
      expect(isAutocastEnabled('cpu')).toBe(false);
      expect(a.matmul(b).dtype).toBe('float32');
    });
  });

  it('is switched off again when the function throws (also from a failing op)', () => {
    tidy(() => {
      const a = torch.randn([2, 2]);
      expect(() => autocast({ deviceType: 'cpu' }, () => { throw new Error('boom'); })).toThrow('boom');
      expect(isAutocastEnabled('cpu')).toBe(false);
      expect(() => autocast({ deviceType: 'cpu' }, () => a.matmul(torch.ones([3, 3])))).toThrow(/aten::matmul/);
      expect(isAutocastEnabled('cpu')).toBe(false);
      expect(a.matmul(a).dtype).toBe('float32');
    });
  });

  it('nests: an inner enabled:false region runs fp32, the outer region resumes after it', () => {
    tidy(() => {
      const a = torch.randn([2, 2]);
      autocast({ deviceType: 'cpu', dtype: 'bfloat16' }, () => {
        const inner = autocast({ deviceType: 'cpu', enabled: false }, () => {
          expect(isAutocastEnabled('cpu')).toBe(false);
          return a.matmul(a);
        });
        expect(inner.dtype).toBe('float32');
        expect(isAutocastEnabled('cpu')).toBe(true);
        expect(a.matmul(a).dtype).toBe('bfloat16');
      });
      expect(isAutocastEnabled('cpu')).toBe(false);
    });
  });

  it('refuses float16 on CPU with a clear error and stays off', () => {
    let called = false;
    expect(() => autocast({ deviceType: 'cpu', dtype: 'float16' }, () => { called = true; })).toThrow(/CPU autocast supports only bfloat16/);
    expect(called).toBe(false);
    expect(isAutocastEnabled('cpu')).toBe(false);
  });

  it('backward through an autocast forward gives float32 gradients for float32 leaves', () => {
    tidy(() => {
      const w = torch.randn([8, 3], { requiresGrad: true });
      const x = torch.randn([4, 8]);
      const y = autocast({ deviceType: 'cpu', dtype: 'bfloat16' }, () => x.matmul(w));
      expect(y.dtype).toBe('bfloat16');
      y.float().sum().backward();
      expect(w.grad!.dtype).toBe('float32');
      // d/dw sum(x w) = xᵀ 1: each column is the column sums of x (bf16-rounded in the product)
      const want = x.sum(0).unsqueeze(1).expand(8, 3);
      expect(relErr(w.grad!, want)).toBeLessThan(2e-2);
    });
  });
});

describe('random generators', () => {
  it('getState/setState replays a generator exactly', () => {
    tidy(() => {
      const g = new Generator().manualSeed(2024);
      torch.rand([5], { generator: g });
      const state = g.getState();
      expect(state.dtype).toBe('uint8');
      const first = [torch.randn([33], { generator: g }), torch.rand([7], { generator: g }), torch.randint(0, 100, [9], { generator: g })];
      g.setState(state);
      const again = [torch.randn([33], { generator: g }), torch.rand([7], { generator: g }), torch.randint(0, 100, [9], { generator: g })];
      first.forEach((t, i) => expect(t.eq(again[i]!).all().item()).toBe(true));
      // a state copied into another generator continues the same stream
      const h = new Generator();
      h.setState(state);
      expect(torch.randn([33], { generator: h }).eq(first[0]!).all().item()).toBe(true);
      // and the stream really moves: the next draw differs
      expect(torch.randn([33], { generator: g }).eq(first[0]!).all().item()).toBe(false);
      expect(g.initialSeed()).toBe(2024n);
    });
  });

  it('manualSeed makes the default generator repeatable (randn, rand, dropout)', () => {
    tidy(() => {
      const draw = () => [torch.randn([10]), torch.rand([4]), F.dropout(torch.ones([16]), 0.5)];
      manualSeed(31);
      const a = draw();
      manualSeed(31);
      const b = draw();
      a.forEach((t, i) => expect(t.eq(b[i]!).all().item()).toBe(true));
      manualSeed(32);
      expect(torch.randn([10]).eq(a[0]!).all().item()).toBe(false);
      expect(defaultGenerator().initialSeed()).toBe(32n);
    });
  });

  it('seeded generators are independent of the default generator', () => {
    tidy(() => {
      const g1 = new Generator().manualSeed(5);
      const x = torch.randn([6], { generator: g1 });
      manualSeed(999);
      torch.randn([100]); // consume the default generator
      const g2 = new Generator().manualSeed(5);
      expect(torch.randn([6], { generator: g2 }).eq(x).all().item()).toBe(true);
    });
  });
});
