// LyCORIS LoHa and LoKr adapters, computed as PEFT 0.13.2 computes them (tuners/loha, tuners/lokr): the adapter
// is a weight delta ΔW built from the factors, added at run time as base(x) + F.linear(x, ΔW) (F.conv2d for a
// conv), or merged into the base weight.
//
//   LoHa  ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · scale        (Tucker, convs: t1/t2 with w_a [r, out], w_b [r, in])
//   LoKr  ΔW = kron(w1, w2) · scale, w1 = lokr_w1 or w1_a @ w1_b, w2 = lokr_w2 or w2_a @ w2_b (Tucker: t2)
//
// The product is reshaped to the base weight's shape (a 2-D product of a conv is [out, in·kh·kw]).
// scale = alpha / r · the user's weight; r = hada_w1_b's rows (LoHa), lokr_w1_b's or lokr_w2_b's rows (LoKr).
// LoKr with both factors full has scale 1 whatever the alpha (LyCORIS: alpha = dim). PEFT 0.13.2 applies no LoKr
// scale at all (fixed in 0.14, huggingface/peft#2180); we apply LyCORIS' scale, which agrees when alpha = r.
import { Module } from '../nn/module.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';

export type LycorisType = 'loha' | 'lokr';

/** The factor tensors a file may give, by their LyCORIS key suffix. */
export const LOHA_FACTORS = ['hada_w1_a', 'hada_w1_b', 'hada_w2_a', 'hada_w2_b', 'hada_t1', 'hada_t2'] as const;
export const LOKR_FACTORS = ['lokr_w1', 'lokr_w1_a', 'lokr_w1_b', 'lokr_w2', 'lokr_w2_a', 'lokr_w2_b', 'lokr_t2'] as const;
export type LycorisFactor = (typeof LOHA_FACTORS)[number] | (typeof LOKR_FACTORS)[number];

/** A LoHa/LoKr adapter's factors by name. */
export type LycorisFactors = Partial<Record<LycorisFactor, Tensor>>;

/** What the factors of one layer describe: the delta's shape and the rank alpha divides by (null: scale 1). */
export interface LycorisShape { deltaShape: number[]; rank: number | null }

const dims = (t: Tensor | undefined): number[] => (t ? [...t.shape] : []);
const show = (s: readonly number[]): string => `[${s.join(', ')}]`;

/**
 * Checks the factors of one layer (which must be there, their dimensions, that the products fit) and returns
 * the delta's shape and rank, or the problems (`at` names the layer in them).
 */
export function lycorisShape(type: LycorisType, f: LycorisFactors, at: string): LycorisShape | string[] {
  const need = (names: LycorisFactor[]): string[] => names.filter((n) => !f[n]).map((n) => `${at}: ${n} missing`);
  const nd = (n: LycorisFactor, want: number[]): string[] => {
    const t = f[n];
    return t && !want.includes(t.ndim) ? [`${at}: ${n} ${show(dims(t))} must have ${want.join(' or ')} dimensions`] : [];
  };
  if (type === 'loha') {
    const tucker = Boolean(f.hada_t1 || f.hada_t2);
    const missing = need(['hada_w1_a', 'hada_w1_b', 'hada_w2_a', 'hada_w2_b', ...(tucker ? ['hada_t1', 'hada_t2'] as LycorisFactor[] : [])]);
    if (missing.length) return missing;
    const bad = [...(['hada_w1_a', 'hada_w1_b', 'hada_w2_a', 'hada_w2_b'] as const).flatMap((n) => nd(n, [2])), ...(tucker ? [...nd('hada_t1', [4]), ...nd('hada_t2', [4])] : [])];
    if (bad.length) return bad;
    const [w1a, w1b, w2a, w2b] = [dims(f.hada_w1_a), dims(f.hada_w1_b), dims(f.hada_w2_a), dims(f.hada_w2_b)] as [[number, number], [number, number], [number, number], [number, number]];
    const r = w1b[0];
    if (tucker) {
      const [t1, t2] = [dims(f.hada_t1), dims(f.hada_t2)];
      // einsum('i j k l, j r, i p -> p r k l', t, w_b, w_a): w_a [r, out], w_b [r, in]
      const ok = t1[0] === w1a[0] && t1[1] === w1b[0] && t2[0] === w2a[0] && t2[1] === w2b[0] && w1a[1] === w2a[1] && w1b[1] === w2b[1]
        && t1[2] === t2[2] && t1[3] === t2[3];
      if (!ok) return [`${at}: Tucker LoHa factors do not fit: t1 ${show(t1)}, w1_a ${show(w1a)}, w1_b ${show(w1b)}, t2 ${show(t2)}, w2_a ${show(w2a)}, w2_b ${show(w2b)}`];
      return { deltaShape: [w1a[1], w1b[1], t1[2] as number, t1[3] as number], rank: r };
    }
    const ok = w1a[1] === w1b[0] && w2a[1] === w2b[0] && w1a[0] === w2a[0] && w1b[1] === w2b[1];
    if (!ok) return [`${at}: LoHa factors do not fit: w1_a ${show(w1a)} @ w1_b ${show(w1b)} and w2_a ${show(w2a)} @ w2_b ${show(w2b)} must be matrices of one shape`];
    return { deltaShape: [w1a[0], w1b[1]], rank: r };
  }
  const problems: string[] = [];
  const w1Full = Boolean(f.lokr_w1);
  const w2Full = Boolean(f.lokr_w2);
  if (w1Full && (f.lokr_w1_a || f.lokr_w1_b)) problems.push(`${at}: both lokr_w1 and lokr_w1_a/lokr_w1_b`);
  if (w2Full && (f.lokr_w2_a || f.lokr_w2_b || f.lokr_t2)) problems.push(`${at}: both lokr_w2 and lokr_w2_a/lokr_w2_b`);
  if (problems.length) return problems;
  problems.push(...need(w1Full ? [] : ['lokr_w1_a', 'lokr_w1_b']), ...need(w2Full ? [] : ['lokr_w2_a', 'lokr_w2_b']));
  if (problems.length) return problems;
  problems.push(...(['lokr_w1', 'lokr_w1_a', 'lokr_w1_b', 'lokr_w2_a', 'lokr_w2_b'] as const).flatMap((n) => nd(n, [2])), ...nd('lokr_w2', [2, 4]), ...nd('lokr_t2', [4]));
  if (problems.length) return problems;
  let w1: number[];
  if (w1Full) w1 = dims(f.lokr_w1);
  else {
    const [a, b] = [dims(f.lokr_w1_a), dims(f.lokr_w1_b)];
    if (a[1] !== b[0]) return [`${at}: lokr_w1_a ${show(a)} @ lokr_w1_b ${show(b)} do not fit`];
    w1 = [a[0] as number, b[1] as number];
  }
  let w2: number[];
  if (w2Full) w2 = dims(f.lokr_w2);
  else if (f.lokr_t2) {
    // einsum('i j k l, i p, j r -> p r k l', t, w_a, w_b): w_a [r, b], w_b [r, d]
    const [t, a, b] = [dims(f.lokr_t2), dims(f.lokr_w2_a), dims(f.lokr_w2_b)];
    if (t[0] !== a[0] || t[1] !== b[0]) return [`${at}: Tucker LoKr factors do not fit: t2 ${show(t)}, w2_a ${show(a)}, w2_b ${show(b)}`];
    w2 = [a[1] as number, b[1] as number, t[2] as number, t[3] as number];
  } else {
    const [a, b] = [dims(f.lokr_w2_a), dims(f.lokr_w2_b)];
    if (a[1] !== b[0]) return [`${at}: lokr_w2_a ${show(a)} @ lokr_w2_b ${show(b)} do not fit`];
    w2 = [a[0] as number, b[1] as number];
  }
  const [a, c] = w1 as [number, number];
  const deltaShape = w2.length === 4 ? [a * (w2[0] as number), c * (w2[1] as number), w2[2] as number, w2[3] as number] : [a * (w2[0] as number), c * (w2[1] as number)];
  const rank = !w1Full ? dims(f.lokr_w1_b)[0] as number : !w2Full ? dims(f.lokr_w2_b)[0] as number : null;
  return { deltaShape, rank };
}

/** torch.kron of a 2-D w1 [a, c] with a 2-D [b, d] or 4-D [b, d, k, l] w2 (w1 then taken as [a, c, 1, 1], as PEFT's make_kron). */
function kron(w1: Tensor, w2: Tensor): Tensor {
  const [a, c] = w1.shape as [number, number];
  if (w2.ndim === 2) {
    const [b, d] = w2.shape as [number, number];
    return w1.reshape([a, 1, c, 1]).mul(w2.reshape([1, b, 1, d])).reshape([a * b, c * d]);
  }
  const [b, d, k, l] = w2.shape as [number, number, number, number];
  return w1.reshape([a, 1, c, 1, 1, 1]).mul(w2.reshape([1, b, 1, d, k, l])).reshape([a * b, c * d, k, l]);
}

/** ΔW of a LoHa/LoKr adapter times `scale`, unshaped (the caller reshapes it to the base weight). */
export function lycorisDelta(type: LycorisType, f: LycorisFactors, scale: number): Tensor {
  const g = (n: LycorisFactor): Tensor => f[n] as Tensor;
  if (type === 'loha') {
    const w = f.hada_t1
      ? torch.einsum('i j k l, j r, i p -> p r k l', g('hada_t1'), g('hada_w1_b'), g('hada_w1_a'))
        .mul(torch.einsum('i j k l, j r, i p -> p r k l', g('hada_t2'), g('hada_w2_b'), g('hada_w2_a')))
      : g('hada_w1_a').matmul(g('hada_w1_b')).mul(g('hada_w2_a').matmul(g('hada_w2_b')));
    return w.mul(scale);
  }
  const w1 = f.lokr_w1 ?? g('lokr_w1_a').matmul(g('lokr_w1_b'));
  const w2 = f.lokr_w2 ?? (f.lokr_t2
    ? torch.einsum('i j k l, i p, j r -> p r k l', g('lokr_t2'), g('lokr_w2_a'), g('lokr_w2_b'))
    : g('lokr_w2_a').matmul(g('lokr_w2_b')));
  const w = kron(w1, w2.contiguous());
  return scale === 1 ? w : w.mul(scale);
}

/** A LoHa or LoKr adapter of a LoRA layer: its factors as parameters under their LyCORIS names, rank and alpha. */
export class LycorisBranch extends Module {
  readonly factorNames: LycorisFactor[];
  constructor(readonly type: LycorisType, factors: LycorisFactors, readonly rank: number, public alpha: number) {
    super();
    this.factorNames = (Object.keys(factors) as LycorisFactor[]).filter((n) => factors[n]);
    for (const n of this.factorNames) (this as unknown as Record<string, Tensor>)[n] = factors[n] as Tensor;
  }

  get factors(): LycorisFactors {
    return Object.fromEntries(this.factorNames.map((n) => [n, (this as unknown as Record<string, Tensor>)[n]])) as LycorisFactors;
  }

  /** The factor names in PEFT's parameter order (its ParameterDicts' order), those this adapter has. */
  factorOrder(): LycorisFactor[] {
    const order: readonly LycorisFactor[] = this.type === 'loha' ? LOHA_FACTORS : LOKR_FACTORS;
    return order.filter((n) => this.factorNames.includes(n));
  }

  /** ΔW · scale, shaped as `shape` (the base weight's). */
  delta(scale: number, shape: readonly number[]): Tensor {
    return lycorisDelta(this.type, this.factors, scale).reshape([...shape]);
  }
}
