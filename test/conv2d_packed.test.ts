// difflora::conv2d (native/conv.cc): F.conv2d keeps frozen float32 CPU weights in oneDNN's layout between calls
// where the weight is at least as large as the output. Outputs and input gradients equal aten::conv2d's to
// float32 rounding, on the packed path and off it; a weight changed in place is packed again.
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import * as F from '../lib/functional.js';
import { noGrad } from '../lib/autograd.js';
import { op } from '../lib/ops.js';
import { Conv2d } from '../lib/nn/layers.js';
import { native } from '../lib/native.js';
import { dispose, keep, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { relErr } from './helpers.js';

const atenConv2d = op('aten::conv2d');

interface Case { input: number[]; out: number; k: number; stride: number; padding: number; bias: boolean }

function run(c: Case, how: 'F' | 'aten', w: Tensor, b: Tensor | null): Tensor[] {
  return tidy(() => {
    torch.manualSeed(3);
    const x = torch.randn(c.input).requiresGrad_(true);
    const y = how === 'F'
      ? F.conv2d(x, w, b, { stride: c.stride, padding: c.padding })
      : atenConv2d(x, w, b, c.stride, c.padding, 1, 1) as Tensor;
    y.mul(torch.randnLike(y)).sum().backward();
    return [y.detach(), x.grad!].map((t) => keep(t.clone()));
  });
}

describe('F.conv2d with frozen CPU weights', () => {
  const cases: [string, Case][] = [
    ['256→256 3×3 at 1×1 (packed)', { input: [4, 256, 1, 1], out: 256, k: 3, stride: 1, padding: 1, bias: true }],
    ['192→128 3×3 at 2×2, batch 1 (packed)', { input: [1, 192, 2, 2], out: 128, k: 3, stride: 1, padding: 1, bias: false }],
    ['128→128 3×3 stride 2 at 4×4 (packed forward, aten input gradient)', { input: [2, 128, 4, 4], out: 128, k: 3, stride: 2, padding: 1, bias: true }],
    ['64→96 5×5 padding 2 at 3×3 (packed)', { input: [2, 64, 3, 3], out: 96, k: 5, stride: 1, padding: 2, bias: true }],
    ['32→32 3×3 at 16×16 (output larger than the weight: aten)', { input: [2, 32, 16, 16], out: 32, k: 3, stride: 1, padding: 1, bias: true }],
    ['256→64 1×1 (aten)', { input: [4, 256, 2, 2], out: 64, k: 1, stride: 1, padding: 0, bias: true }],
  ];
  for (const [name, c] of cases) {
    it(`${name}: output and input gradient equal aten::conv2d`, () => {
      const w = keep(torch.randn([c.out, c.input[1]!, c.k, c.k]).mul(0.05));
      const b = c.bias ? keep(torch.randn([c.out])) : null;
      const ours = run(c, 'F', w, b);
      const ref = run(c, 'aten', w, b);
      ours.forEach((t, i) => {
        expect(t.shape).toEqual(ref[i]!.shape);
        expect(relErr(t, ref[i]!), `tensor ${i}`).toBeLessThan(1e-6);
      });
      // a second call reuses the packed weight and gives the same bits
      const again = run(c, 'F', w, b);
      again.forEach((t, i) => expect(relErr(t, ours[i]!)).toBe(0));
      dispose([...ours, ...ref, ...again, w, ...(b ? [b] : [])]);
    });
  }

  it('a weight changed in place is packed again', () => {
    tidy(() => {
      const w = torch.randn([256, 256, 3, 3]).mul(0.05);
      const x = torch.randn([4, 256, 1, 1]);
      const before = noGrad(() => F.conv2d(x, w, null, { padding: 1 }));
      noGrad(() => w.mul_(2));
      const after = noGrad(() => F.conv2d(x, w, null, { padding: 1 }));
      expect(relErr(after, before.mul(2))).toBeLessThan(1e-6);
      expect(relErr(after, atenConv2d(x, w, null, 1, 1, 1, 1) as Tensor)).toBeLessThan(1e-6);
    });
  });

  it("a disposed module's kept layouts go with it (Module.dispose trims the cache)", () => {
    const trim = op('difflora::conv_cache_trim') as unknown as () => number;
    const conv = new Conv2d(256, 256, 3, { padding: 1 }).requiresGrad_(false);
    const base = trim();
    tidy(() => noGrad(() => conv.forward(torch.randn([4, 256, 1, 1]))));
    const packs = native.info().torchVersion.startsWith('1.') ? 1 : 0; // libtorch 2.x keeps none
    expect(trim()).toBe(base + packs);
    conv.dispose();
    expect(trim()).toBe(base);
  });

  it('a weight that trains gets its gradient (aten path)', () => {
    tidy(() => {
      const w = torch.randn([256, 256, 3, 3]).mul(0.05).requiresGrad_(true);
      F.conv2d(torch.randn([4, 256, 1, 1]), w, null, { padding: 1 }).sum().backward();
      expect(w.grad!.shape).toEqual([256, 256, 3, 3]);
    });
  });

  it('keeps copies within DIFFLORA_CONV_CACHE_MB (two copies of a weight are counted); 0 keeps none; the results are the same', () => {
    // a fresh process per budget: the budget is read once
    const lib = fileURLToPath(new URL('../lib/', import.meta.url));
    const script = `
      const F = await import('${lib}functional.ts');
      const { op } = await import('${lib}ops.ts');
      const torch = await import('${lib}torch.ts');
      const trim = op('difflora::conv_cache_trim');
      const aten = op('aten::conv2d');
      const base = trim();
      const counts = [];
      let worst = 0;
      for (const c of [64, 256, 64]) { // 2 × 147 KiB, then 2 × 2.25 MiB, then another 2 × 147 KiB
        torch.manualSeed(c);
        const w = torch.randn([c, c, 3, 3]).mul(0.05), x = torch.randn([1, c, 1, 1]);
        const a = F.conv2d(x, w, null, { padding: 1 }).toFloat64Array(), b = aten(x, w, null, 1, 1, 1, 1).toFloat64Array();
        worst = Math.max(worst, ...a.map((v, i) => Math.abs(v - b[i])));
        counts.push(trim() - base);
        globalThis.keepAlive = [...(globalThis.keepAlive ?? []), w];
      }
      console.log(JSON.stringify({ counts, worst }));`;
    const packs = native.info().torchVersion.startsWith('1.');
    const expected: Record<string, number[]> = { 0: [0, 0, 0], 1: [1, 1, 2], 5: [1, 2, 2], 6: [1, 2, 3] }; // 0.29, 4.79, 5.08 MiB in all
    for (const [mb, counts] of Object.entries(expected)) {
      const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
        encoding: 'utf8', timeout: 60_000, env: { ...process.env, DIFFLORA_CONV_CACHE_MB: mb },
      });
      expect(r.status, r.stderr).toBe(0);
      const out = JSON.parse(r.stdout.trim().split('\n').at(-1)!) as { counts: number[]; worst: number };
      expect(out.counts, `DIFFLORA_CONV_CACHE_MB=${mb}`).toEqual(packs ? counts : [0, 0, 0]);
      expect(out.worst).toBeLessThan(1e-4);
    }
  });
});
