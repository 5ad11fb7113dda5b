// Tensor creation and the torch.* functions, named as in PyTorch.
import { native } from './native.js';
import { dtypeCode, type DType } from './dtype.js';
import { op } from './ops.js';
import { Tensor, type Device, type Scalar, type TypedArray } from './tensor.js';
import type { Generator } from './random.js';
import { checkDevice } from './device.js';

export interface TensorOptions { dtype?: DType; device?: Device; requiresGrad?: boolean }
export interface RandomOptions extends TensorOptions { generator?: Generator }

const A = {
  zeros: op('zeros'), ones: op('ones'), full: op('full'), empty: op('empty.memory_format'),
  arange: op('arange.start_step'), linspace: op('linspace'), rand: op('rand.generator'), randn: op('randn.generator'),
  randint: op('randint.low_generator'), cat: op('cat'), stack: op('stack'), where: op('where.self'),
  zerosLike: op('zeros_like'), onesLike: op('ones_like'), einsum: op('einsum'),
};

// Device for creation functions given no device (torch.set_default_device). Building a model under
// withDefaultDevice('meta', ...) allocates no memory: shapes only, e.g. to check a full-size key set.
let defaultDevice: Device | null = null;

/** Runs fn with creation functions defaulting to `device` (restored afterwards, also on a throw). */
export function withDefaultDevice<T>(device: Device, fn: () => T): T {
  const prev = defaultDevice;
  defaultDevice = device;
  try {
    return fn();
  } finally {
    defaultDevice = prev;
  }
}

/** The device creation functions use when given none (null: libtorch's default, the CPU). */
export function getDefaultDevice(): Device | null {
  return defaultDevice;
}

function finish(t: Tensor, o: TensorOptions): Tensor {
  if (o.requiresGrad) t.requiresGrad = true;
  return t;
}
const code = (o: TensorOptions, fallback: DType = 'float32'): number => dtypeCode(o.dtype ?? fallback);
/** The device a creation function uses: the option, else the generator's, else the default; checked. */
function dev(o: TensorOptions, generatorDevice?: Device): Device | null {
  const d = o.device ?? generatorDevice ?? defaultDevice;
  checkDevice(d);
  return d;
}

export function zeros(shape: readonly number[], o: TensorOptions = {}): Tensor {
  return finish(A.zeros(shape, code(o), null, dev(o), null) as Tensor, o);
}
export function ones(shape: readonly number[], o: TensorOptions = {}): Tensor {
  return finish(A.ones(shape, code(o), null, dev(o), null) as Tensor, o);
}
export function full(shape: readonly number[], value: Scalar, o: TensorOptions = {}): Tensor {
  return finish(A.full(shape, value, code(o), null, dev(o), null) as Tensor, o);
}
export function empty(shape: readonly number[], o: TensorOptions = {}): Tensor {
  return finish(A.empty(shape, code(o), null, dev(o), null, null) as Tensor, o);
}
export function zerosLike(t: Tensor, o: TensorOptions = {}): Tensor {
  return finish(A.zerosLike(t, o.dtype ? dtypeCode(o.dtype) : null, null, o.device ?? null, null, null) as Tensor, o);
}
export function onesLike(t: Tensor, o: TensorOptions = {}): Tensor {
  return finish(A.onesLike(t, o.dtype ? dtypeCode(o.dtype) : null, null, o.device ?? null, null, null) as Tensor, o);
}

/** arange(end) or arange(start, end, step); integral arguments give int64, as in PyTorch. */
export function arange(startOrEnd: number, end?: number, step = 1, o: TensorOptions = {}): Tensor {
  const [s, e] = end === undefined ? [0, startOrEnd] : [startOrEnd, end];
  return finish(A.arange(s, e, step, o.dtype ? dtypeCode(o.dtype) : null, null, dev(o), null) as Tensor, o);
}
export function linspace(start: number, end: number, steps: number, o: TensorOptions = {}): Tensor {
  return finish(A.linspace(start, end, steps, code(o), null, dev(o), null) as Tensor, o);
}

export function rand(shape: readonly number[], o: RandomOptions = {}): Tensor {
  return finish(A.rand(shape, o.generator ?? null, code(o), null, dev(o, o.generator?.device), null) as Tensor, o);
}
export function randn(shape: readonly number[], o: RandomOptions = {}): Tensor {
  return finish(A.randn(shape, o.generator ?? null, code(o), null, dev(o, o.generator?.device), null) as Tensor, o);
}
/** Integers uniform in [low, high). */
export function randint(low: number, high: number, shape: readonly number[], o: RandomOptions = {}): Tensor {
  return A.randint(low, high, shape, o.generator ?? null, code(o, 'int64'), null, dev(o, o.generator?.device), null) as Tensor;
}
/** randn with the shape, dtype and device of t (a generator may be given, unlike torch.randn_like). */
export function randnLike(t: Tensor, o: RandomOptions = {}): Tensor {
  return randn(t.shape, { dtype: o.dtype ?? t.dtype, device: o.device ?? t.device, generator: o.generator, requiresGrad: o.requiresGrad });
}

const typedDtype = (data: TypedArray): DType | undefined => {
  if (data instanceof Float32Array) return 'float32';
  if (data instanceof Float64Array) return 'float64';
  if (data instanceof Int32Array) return 'int32';
  if (data instanceof Int16Array) return 'int16';
  if (data instanceof Int8Array) return 'int8';
  if (data instanceof Uint8Array) return 'uint8';
  if (data instanceof BigInt64Array) return 'int64';
  return undefined; // Uint16Array: raw float16/bfloat16 bits, dtype must be given
};

type Nested = number | boolean | bigint | Nested[];
/** Flattens nested arrays into out and their sizes into shape; every element must sit at the same depth. */
function flatten(data: Nested, shape: number[], out: (number | boolean | bigint)[], depth: number, leaf = { depth: -1 }): void {
  if (!Array.isArray(data)) {
    if (typeof data !== 'number' && typeof data !== 'boolean' && typeof data !== 'bigint') {
      throw new TypeError(`tensor(): elements must be numbers, booleans or bigints, got ${data === null ? 'null' : typeof data}`);
    }
    if (leaf.depth < 0) leaf.depth = depth;
    if (leaf.depth !== depth || shape.length !== depth) throw new TypeError(`tensor(): ragged nested array (a number at depth ${depth}, where the shape is [${shape.join(', ')}])`);
    out.push(data);
    return;
  }
  if (leaf.depth >= 0 && depth >= leaf.depth) throw new TypeError(`tensor(): ragged nested array (an array at depth ${depth}, where numbers were found)`);
  if (shape.length === depth) shape.push(data.length);
  else if (shape[depth] !== data.length) throw new TypeError(`tensor(): ragged nested array at depth ${depth} (expected ${shape[depth]} elements, got ${data.length})`);
  for (const x of data) flatten(x, shape, out, depth + 1, leaf);
}

function toTyped(values: (number | boolean | bigint)[], dtype: DType): TypedArray {
  switch (dtype) {
    case 'float32': return Float32Array.from(values, Number);
    case 'float64': return Float64Array.from(values, Number);
    case 'int32': return Int32Array.from(values, Number);
    case 'int16': return Int16Array.from(values, Number);
    case 'int8': return Int8Array.from(values, Number);
    case 'uint8': case 'bool': return Uint8Array.from(values, (v) => Number(v));
    case 'int64': return BigInt64Array.from(values, (v) => BigInt(v));
    default: throw new TypeError(`tensor(): cannot build ${dtype} from numbers directly; build float32 and call .to('${dtype}')`);
  }
}

/**
 * A tensor from a typed array (shape defaults to 1-D) or nested arrays. Numbers default to float32
 * (JavaScript cannot tell 1 from 1.0), booleans to bool, bigints to int64.
 */
export function tensor(data: TypedArray | Nested, o: TensorOptions & { shape?: readonly number[] } = {}): Tensor {
  let typed: TypedArray;
  let shape: number[];
  let dtype: DType;
  if (ArrayBuffer.isView(data)) {
    const inferred = typedDtype(data);
    dtype = o.dtype ?? inferred ?? 'float32';
    if (inferred === undefined && o.dtype !== 'float16' && o.dtype !== 'bfloat16') {
      throw new TypeError('tensor(): a Uint16Array holds raw float16/bfloat16 bits; pass dtype float16 or bfloat16');
    }
    if (inferred !== undefined && (dtype === 'float16' || dtype === 'bfloat16')) {
      const t = tensor(data, { shape: o.shape });
      try { return finish(t.to({ dtype, device: o.device ?? 'cpu' }), o); } finally { t.dispose(); }
    }
    typed = inferred === undefined || inferred === dtype || (dtype === 'bool' && inferred === 'uint8') ? data : toTyped(Array.from(data as ArrayLike<number>), dtype);
    shape = o.shape ? [...o.shape] : [data.length];
  } else {
    const flat: (number | boolean | bigint)[] = [];
    shape = [];
    flatten(data, shape, flat, 0);
    const first = flat[0];
    dtype = o.dtype ?? (typeof first === 'boolean' ? 'bool' : typeof first === 'bigint' ? 'int64' : 'float32');
    if (dtype === 'float16' || dtype === 'bfloat16') {
      const t = tensor(toTyped(flat, 'float32'), { shape });
      try { return finish(t.to({ dtype, device: o.device ?? 'cpu' }), o); } finally { t.dispose(); }
    }
    typed = toTyped(flat, dtype);
    if (o.shape) shape = [...o.shape];
  }
  return finish(native.fromBuffer(typed, dtypeCode(dtype), shape, o.device) as unknown as Tensor, o);
}

/** A 0-dim tensor holding one number. */
export function scalarTensor(value: number, o: TensorOptions = {}): Tensor {
  return tensor([value], { ...o, shape: [] });
}

export function cat(tensors: Tensor[], dim = 0): Tensor { return A.cat(tensors, dim) as Tensor; }
export function stack(tensors: Tensor[], dim = 0): Tensor { return A.stack(tensors, dim) as Tensor; }
export function where(condition: Tensor, x: Tensor, y: Tensor): Tensor { return A.where(condition, x, y) as Tensor; }
export function einsum(equation: string, ...tensors: Tensor[]): Tensor { return A.einsum(equation, tensors) as Tensor; }

export { Generator, defaultGenerator, manualSeed } from './random.js';
