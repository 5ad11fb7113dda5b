// Shared test helpers: fixture paths and the relative error used for every parity check.
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import sharp from 'sharp';
import { loadSafetensors } from '../lib/io/safetensors.js';
import { native } from '../lib/native.js';
import { dispose, keep, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';

export const fixtures = join(dirname(fileURLToPath(import.meta.url)), 'fixtures');

/** ‖ours − ref‖ / ‖ref‖ in float64 (0 when both are all zeros). */
export function relErr(ours: Tensor, ref: Tensor): number {
  return tidy(() => {
    const a = ours.detach().to({ dtype: 'float64', device: 'cpu' });
    const b = ref.detach().to({ dtype: 'float64', device: 'cpu' });
    if (a.shape.join() !== b.shape.join()) throw new Error(`shape mismatch: [${a.shape}] vs [${b.shape}]`);
    const num = a.sub(b).norm().item();
    const den = b.norm().item();
    return den === 0 ? num : num / den;
  });
}

/**
 * Whether this libtorch is the one the goldens were made with (torch 1.13: every golden's JSON, "versions"). Our
 * arithmetic follows diffusers' op for op, so a golden equals ours bit for bit there; libtorch 2.x's kernels
 * (linspace, pow, reductions, fused attention) round differently in the last bits, so there the same comparison
 * is held to float32 rounding instead (goldenEqual).
 */
export const sameLibtorchAsGoldens = native.info().torchVersion.startsWith('1.13');

/** ours = golden: bit for bit on the goldens' libtorch, else within float32 rounding (relErr ≤ 1e-6). */
export function goldenEqual(ours: Tensor, golden: Tensor): boolean {
  return sameLibtorchAsGoldens ? bitEqual(ours, golden) : relErr(ours, golden) <= 1e-6;
}

/** A float32 scalar = the golden's: exactly on the goldens' libtorch, else within float32 rounding. */
export function goldenScalarEqual(ours: number, golden: number): boolean {
  const a = Math.fround(ours);
  const b = Math.fround(golden);
  return sameLibtorchAsGoldens ? Object.is(a, b) : Math.abs(a - b) <= 1e-6 * Math.max(Math.abs(b), 1e-30);
}

/** True when both tensors hold exactly the same bits. */
export function bitEqual(a: Tensor, b: Tensor): boolean {
  const x = new Uint8Array(a._toBuffer());
  const y = new Uint8Array(b._toBuffer());
  return x.length === y.length && x.every((v, i) => v === y[i]);
}

/** A golden file's tensors, loaded on first use: `get` names a missing key, `dispose` frees them all. */
export function goldenFile(file: string): { get(name: string): Tensor; dispose(): void } {
  let tensors: Map<string, Tensor> | undefined;
  return {
    get(name: string): Tensor {
      // kept: the first use may be inside a test's tidy(), which must not free the goldens
      tensors ??= new Map([...loadSafetensors(join(fixtures, 'goldens', file)).tensors].map(([k, t]) => [k, keep(t)]));
      const t = tensors.get(name);
      if (!t) throw new Error(`golden '${name}' missing from ${file}`);
      return t;
    },
    dispose(): void {
      if (tensors) dispose([...tensors.values()]);
      tensors = undefined;
    },
  };
}

/** An imagefolder dataset of `n` small pictures (40×36 … , different colours) with metadata.jsonl. */
export async function makeImageFolder(dir: string, n: number): Promise<string[]> {
  mkdirSync(dir, { recursive: true });
  const lines: string[] = [];
  const files: string[] = [];
  for (let i = 0; i < n; i++) {
    const file = `${i}.png`;
    await sharp({ create: { width: 40 + 2 * i, height: 36, channels: 3, background: { r: (50 * i) % 256, g: 120, b: 255 - ((40 * i) % 256) } } })
      .png().toFile(join(dir, file));
    lines.push(JSON.stringify({ file_name: file, text: `a test picture number ${i}` }));
    files.push(join(dir, file));
  }
  writeFileSync(join(dir, 'metadata.jsonl'), lines.join('\n'));
  return files;
}

/**
 * The worst relative error of the gradients of `named` against the golden ones (`goldenGrad(name)`; undefined: the
 * golden has none), and the names that have no gradient here.
 */
export function worstGradError(named: [string, Tensor][], goldenGrad: (name: string) => Tensor): { err: number; name: string; withoutGrad: string[] } {
  const worst = { err: 0, name: '', withoutGrad: [] as string[] };
  tidy(() => {
    for (const [n, p] of named) {
      if (!p.grad) { worst.withoutGrad.push(n); continue; }
      const e = relErr(p.grad, goldenGrad(n));
      if (e > worst.err) { worst.err = e; worst.name = n; }
    }
  });
  return worst;
}

/** The parameters after an update against the golden ones: worst relative error and worst absolute element difference. */
export function updateError(named: [string, Tensor][], golden: (name: string) => Tensor): { rel: number; abs: number } {
  let rel = 0;
  let abs = 0;
  tidy(() => {
    for (const [n, p] of named) {
      const ref = golden(n);
      rel = Math.max(rel, relErr(p, ref));
      abs = Math.max(abs, p.sub(ref).abs().max().item());
    }
  });
  return { rel, abs };
}
