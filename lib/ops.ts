// ATen operators by schema name, resolved lazily through the c10 dispatcher and cached by index.
// A name is "aten::op.overload" as in native_functions.yaml; arguments are positional in schema order.
import { native } from './native.js';

export type OpFn = (...args: unknown[]) => unknown;
export type OpVoidFn = (...args: unknown[]) => void;

function resolve(qualified: string): number {
  const sep = qualified.indexOf('.', qualified.indexOf('::') + 2);
  const name = sep < 0 ? qualified : qualified.slice(0, sep);
  const overload = sep < 0 ? '' : qualified.slice(sep + 1);
  return native.op(name.includes('::') ? name : `aten::${name}`, overload);
}

/** A function calling the operator and returning its result(s). */
export function op(qualified: string): OpFn {
  let index = -1;
  return (...args: unknown[]) => {
    if (index < 0) index = resolve(qualified);
    return native.call(index, ...args);
  };
}

/** A function calling an in-place operator and dropping its result (which is its first argument). */
export function opVoid(qualified: string): OpVoidFn {
  let index = -1;
  return (...args: unknown[]) => {
    if (index < 0) index = resolve(qualified);
    native.callVoid(index, ...args);
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
