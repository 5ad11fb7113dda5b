// ATen operators by schema name, resolved lazily through the c10 dispatcher and cached by index.
// A name is "aten::op.overload" as in native_functions.yaml; arguments are positional in schema order.
// At the schema's tensor positions the native call takes tensor ids (numbers), converted here, and an op
// returning one tensor returns its id, wrapped here: no per-argument type checks in native code, and no
// native object creation per result (the per-op overhead, bench/RESULTS.md).
import { native } from './native.js';

export type OpFn = (...args: unknown[]) => unknown;
export type OpVoidFn = (...args: unknown[]) => void;

function resolve(qualified: string): number {
  const sep = qualified.indexOf('.', qualified.indexOf('::') + 2);
  const name = sep < 0 ? qualified : qualified.slice(0, sep);
  const overload = sep < 0 ? '' : qualified.slice(sep + 1);
  return native.op(name.includes('::') ? name : `aten::${name}`, overload);
}

interface TensorLike { readonly _id: number }
let tensorClass: (abstract new (...args: never[]) => TensorLike) | null = null;
let wrapId: (id: number) => unknown = () => { throw new Error('difflora: the Tensor class is not registered'); };

/** Called once by lib/tensor.ts: its class (to recognise tensor arguments) and how to wrap a result id. */
export function setTensorHooks(cls: abstract new (...args: never[]) => TensorLike, wrap: (id: number) => unknown): void {
  tensorClass = cls;
  wrapId = wrap;
}

/**
 * The value passed at a tensor position: a tensor's id (-1 when disposed: native names it), null/undefined as
 * is; a number would be read as an id, so it goes as its text, which native rejects as "expected a Tensor".
 */
function tensorArg(v: unknown): unknown {
  if (tensorClass !== null && v instanceof tensorClass) return v._id;
  return typeof v === 'number' ? String(v) : v;
}

function tensorListArg(v: unknown): unknown {
  return Array.isArray(v) ? v.map((x) => (x === null || x === undefined ? x : tensorArg(x))) : v;
}

/** fast: the op's unboxed native path (native/dispatch.cc CallFast), -1 when it has none. */
interface Resolved { index: number; tensors: number[]; lists: number[]; single: boolean; fast: number }

function resolveInfo(qualified: string): Resolved {
  const index = resolve(qualified);
  const [tensors, lists, single, fast] = native.opInfo(index);
  return { index, tensors, lists, single, fast };
}

function convertArgs(r: Resolved, args: unknown[]): void {
  const n = args.length;
  for (const i of r.tensors) if (i < n) args[i] = tensorArg(args[i]);
  for (const i of r.lists) if (i < n) args[i] = tensorListArg(args[i]);
}

/** A function calling the operator and returning its result(s). */
export function op(qualified: string): OpFn {
  let r: Resolved | null = null;
  return (...args: unknown[]) => {
    r ??= resolveInfo(qualified);
    convertArgs(r, args);
    if (r.fast >= 0) {
      const id = native.callFast(r.fast, ...args);
      if (id !== undefined) return wrapId(id as number);
    }
    const out = native.call(r.index, ...args);
    return r.single ? (out === null ? null : wrapId(out as number)) : out;
  };
}

/** A function calling an in-place operator and dropping its result (which is its first argument). */
export function opVoid(qualified: string): OpVoidFn {
  let r: Resolved | null = null;
  return (...args: unknown[]) => {
    r ??= resolveInfo(qualified);
    convertArgs(r, args);
    if (r.fast >= 0 && native.callFast(r.fast, ...args) !== undefined) return;
    native.callVoid(r.index, ...args);
  };
}

/** Whether this libtorch has the operator (e.g. scaled_dot_product_attention arrived in 2.0). */
export function hasOp(qualified: string): boolean {
  try {
    resolve(qualified);
    return true;
  } catch {
    return false;
  }
}

/** The operator's schema text, e.g. for documentation. */
export function schemaOf(qualified: string): string {
  return native.schema(resolve(qualified));
}
