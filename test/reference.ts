// Loads test/fixtures/ops_reference.json (written by scripts/make-op-reference.py from PyTorch 1.13.1) and
// compares our results to it.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { expect } from 'vitest';
import { fixtures, relErr } from './helpers.js';
import { keep } from '../lib/scope.js';
import type { DType } from '../lib/dtype.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';

export interface RefTensor { dtype: DType; shape: number[]; data: (number | boolean | string)[] }
export type RefOut = RefTensor | RefTensor[];
export interface Reference {
  meta: Record<string, unknown>;
  inputs: Record<string, RefTensor>;
  cases: Record<string, { out: RefOut }>;
  grads: Record<string, { inputs: string[]; loss: RefTensor; out: RefTensor[] }>;
}

export const reference = JSON.parse(readFileSync(join(fixtures, 'ops_reference.json'), 'utf8')) as Reference;

const num = (x: number | boolean | string): number =>
  typeof x === 'string' ? (x === 'nan' ? NaN : x === 'inf' ? Infinity : x === '-inf' ? -Infinity : Number.NaN) : Number(x);

/** The reference tensor as one of ours (float16/bfloat16 values are exact, so the conversion is too). */
export function fromRef(r: RefTensor): Tensor {
  const shape = r.shape;
  switch (r.dtype) {
    case 'float32': return torch.tensor(Float32Array.from(r.data, num), { shape });
    case 'float64': return torch.tensor(Float64Array.from(r.data, num), { shape });
    case 'float16': case 'bfloat16': {
      const f = torch.tensor(Float32Array.from(r.data, num), { shape });
      try { return f.to(r.dtype); } finally { f.dispose(); }
    }
    case 'int64': return torch.tensor(BigInt64Array.from(r.data, (x) => BigInt(x as number)), { shape });
    case 'int32': return torch.tensor(Int32Array.from(r.data, num), { shape });
    case 'int16': return torch.tensor(Int16Array.from(r.data, num), { shape });
    case 'int8': return torch.tensor(Int8Array.from(r.data, num), { shape });
    case 'uint8': return torch.tensor(Uint8Array.from(r.data, num), { shape });
    case 'bool': return torch.tensor(Uint8Array.from(r.data, num), { shape, dtype: 'bool' });
  }
}

/** All reference inputs as kept tensors (the caller disposes them). */
export function loadInputs(): Record<string, Tensor> {
  return Object.fromEntries(Object.entries(reference.inputs).map(([name, r]) => [name, keep(fromRef(r))]));
}

const floating = new Set<DType>(['float32', 'float64', 'float16', 'bfloat16']);

function firstMismatch(a: Tensor, b: Tensor): string {
  const x = a.toFloat64Array();
  const y = b.toFloat64Array();
  for (let i = 0; i < x.length; i++) if (!Object.is(x[i], y[i])) return `first difference at flat index ${i}: ${x[i]} vs ${y[i]}`;
  return 'same values, different bits';
}

/**
 * Checks ours against the reference: same dtype and shape, then bit-for-bit equality for integer and bool
 * results (and for floats when tol is 0), else ‖ours − ref‖/‖ref‖ < tol. Returns the relative error.
 */
export function expectMatches(ours: Tensor, r: RefTensor, tol: number, label: string): number {
  const ref = fromRef(r);
  try {
    expect(ours.dtype, `${label}: dtype`).toBe(r.dtype);
    expect(ours.shape, `${label}: shape`).toEqual(r.shape);
    if (tol === 0 || !floating.has(r.dtype)) {
      const same = Buffer.from(ours._toBuffer()).equals(Buffer.from(ref._toBuffer()));
      expect(same, `${label}: not bit-identical to the reference (${same ? '' : firstMismatch(ours, ref)})`).toBe(true);
      return 0;
    }
    const err = relErr(ours, ref);
    expect(err, `${label}: relative error`).toBeLessThan(tol);
    return err;
  } finally {
    ref.dispose();
  }
}
