// Explicit tensor lifetimes. Node runs N-API finalizers only when control returns to the event loop, so a
// synchronous training loop that merely drops tensors would free nothing: every tensor created inside
// `tidy(fn)` is disposed when fn returns, except what fn returns (handed to the enclosing scope) and what
// was `keep`-ed. Finalizers remain only as a backstop.
import { native } from './native.js';

/** The part of a tensor the scopes need; lib/tensor.ts's Tensor implements it. */
export interface Disposable {
  dispose(): void;
  readonly isDisposed: boolean;
  /** Set by keep(): never disposed by a scope. */
  kept: boolean;
}

const scopes: Disposable[][] = [];

/** Records a new tensor in the innermost scope (no scope: the caller owns it). */
export function track(t: Disposable): void {
  const top = scopes[scopes.length - 1];
  if (top !== undefined) top.push(t);
}

/** Exempts a tensor from every enclosing and future scope: its owner disposes it explicitly. */
export function keep<T extends Disposable>(t: T): T {
  t.kept = true;
  return t;
}

function isThenable(v: unknown): boolean {
  return typeof v === 'object' && v !== null && typeof (v as { then?: unknown }).then === 'function';
}

/** Visits every Disposable inside a returned value (tensor, array, plain object, Map). */
function collect(value: unknown, out: Set<Disposable>, isTensor: (v: unknown) => v is Disposable): void {
  if (isTensor(value)) {
    out.add(value);
  } else if (Array.isArray(value)) {
    for (const v of value) collect(v, out, isTensor);
  } else if (value instanceof Map) {
    for (const v of value.values()) collect(v, out, isTensor);
  } else if (typeof value === 'object' && value !== null && Object.getPrototypeOf(value) === Object.prototype) {
    for (const v of Object.values(value)) collect(v, out, isTensor);
  }
}

let tensorTest: (v: unknown) => v is Disposable = (_v): _v is Disposable => false;
/** Called once by lib/tensor.ts so this module need not import the Tensor class. */
export function setTensorTest(test: (v: unknown) => v is Disposable): void {
  tensorTest = test;
}

/**
 * Runs fn and disposes every tensor it created, except the tensors in its result (moved to the enclosing
 * scope) and kept ones. fn must be synchronous: an async fn would outlive its scope, so it throws.
 */
export function tidy<T>(fn: () => T): T {
  const scope: Disposable[] = [];
  scopes.push(scope);
  let result: T;
  try {
    result = fn();
  } catch (e) {
    scopes.pop();
    for (const t of scope) if (!t.kept) t.dispose();
    throw e;
  }
  scopes.pop();
  if (isThenable(result)) {
    for (const t of scope) if (!t.kept) t.dispose();
    throw new TypeError('tidy(fn): fn returned a Promise; tidy only accepts synchronous functions (use tidy inside the async code instead)');
  }
  const survivors = new Set<Disposable>();
  collect(result, survivors, tensorTest);
  const parent = scopes[scopes.length - 1];
  for (const t of scope) {
    if (t.kept) continue;
    if (!survivors.has(t)) t.dispose();
    else if (parent !== undefined) parent.push(t);
  }
  return result;
}

/** Disposes tensors (or arrays/objects of tensors). */
export function dispose(value: unknown): void {
  const all = new Set<Disposable>();
  collect(value, all, tensorTest);
  for (const t of all) t.dispose();
}

export interface MemoryInfo {
  /** Tensor handles alive in JS (not yet disposed). */
  numTensors: number;
  /** CPU allocator counters (bytes in use, cached, peak, hits). */
  cpu: ReturnType<typeof native.memory>['cpu'];
  /** Per CUDA device: bytes allocated, peak, and reserved by libtorch's CUDA caching allocator. */
  cuda: ReturnType<typeof native.memory>['cuda'];
}

/** Live tensor count and allocator counters. */
export function memory(): MemoryInfo {
  return native.memory();
}

/** Returns cached CPU blocks to the operating system and cached CUDA blocks to the driver. */
export function emptyCache(): void {
  native.emptyCache();
}
