// The Tensor class: a native handle (lib/native.ts) plus PyTorch-named methods. Every method is one ATen
// operator through the dispatcher; results are new tensors registered in the current tidy() scope.
import { native, type NativeTensorHandle } from './native.js';
import { dtypeCode, dtypeName, type DType } from './dtype.js';
import { op, opVoid, setTensorHooks } from './ops.js';
import { setTensorTest, track } from './scope.js';
import type { Generator } from './random.js';
import { checkDevice } from './device.js';

export type Device = string;
export type Scalar = number | boolean;
export type Shape = readonly number[];
export type TypedArray = Float32Array | Float64Array | Int32Array | Int16Array | Int8Array | Uint8Array | Uint16Array | BigInt64Array;

/** Only difflora's own code constructs tensors: `new Tensor(id, CREATE)`. */
const CREATE: unique symbol = Symbol('difflora.Tensor');

/**
 * The backstop for tensors never disposed: their ids are released when the GC collects the object (Node runs
 * the callbacks only between event-loop turns, so dispose/tidy stay the real mechanism). Registering costs
 * ~0.3 µs, so it is deferred: new tensors wait in `unregistered` and only those still alive at the end of the
 * current synchronous run (or every 4,096 creations) are registered; tidy-scoped temporaries never are. A
 * stale id (disposed, slot reused) releases nothing: ids carry a generation (native/common.h).
 */
const registry = new FinalizationRegistry<number>((id) => { native.tensorRelease(id); });
let unregistered: Tensor[] = [];
let flushQueued = false;
function registerSurvivors(): void {
  flushQueued = false;
  const list = unregistered;
  unregistered = [];
  for (const t of list) if (t._id >= 0) registry.register(t, t._id);
}
function noteCreated(t: Tensor): void {
  unregistered.push(t);
  if (unregistered.length >= 4096) registerSurvivors();
  else if (!flushQueued) { flushQueued = true; queueMicrotask(registerSurvivors); }
}

const A = {
  add: op('add.Tensor'), addScalar: op('add.Scalar'), sub: op('sub.Tensor'), subScalar: op('sub.Scalar'),
  mul: op('mul.Tensor'), mulScalar: op('mul.Scalar'), div: op('div.Tensor'), divScalar: op('div.Scalar'),
  divMode: op('div.Tensor_mode'), divScalarMode: op('div.Scalar_mode'), pow: op('pow.Tensor_Scalar'), powTensor: op('pow.Tensor_Tensor'),
  neg: op('neg'), exp: op('exp'), log: op('log'), sqrt: op('sqrt'), rsqrt: op('rsqrt'), abs: op('abs'),
  sin: op('sin'), cos: op('cos'), tanh: op('tanh'), sigmoid: op('sigmoid'), relu: op('relu'), silu: op('silu'),
  gelu: op('gelu'), reciprocal: op('reciprocal'), square: op('square'), floor: op('floor'), round: op('round'),
  sign: op('sign'), erf: op('erf'), clamp: op('clamp'), maximum: op('maximum'), minimum: op('minimum'),
  where: op('where.self'), maskedFill: op('masked_fill.Scalar'),
  eq: op('eq.Tensor'), eqScalar: op('eq.Scalar'), ne: op('ne.Tensor'), neScalar: op('ne.Scalar'),
  lt: op('lt.Tensor'), ltScalar: op('lt.Scalar'), le: op('le.Tensor'), leScalar: op('le.Scalar'),
  gt: op('gt.Tensor'), gtScalar: op('gt.Scalar'), ge: op('ge.Tensor'), geScalar: op('ge.Scalar'),
  isfinite: op('isfinite'), isnan: op('isnan'), logicalNot: op('logical_not'), logicalAnd: op('logical_and'),
  logicalOr: op('logical_or'),
  sum: op('sum'), sumDim: op('sum.dim_IntList'), mean: op('mean'), meanDim: op('mean.dim'),
  max: op('max'), maxDim: op('max.dim'), min: op('min'), minDim: op('min.dim'), amax: op('amax'), amin: op('amin'),
  argmax: op('argmax'), argmin: op('argmin'), norm: op('norm.Scalar'), normDim: op('norm.ScalarOpt_dim'),
  varDim: op('var.dim'), all: op('all'), any: op('any'), prod: op('prod'),
  matmul: op('matmul'), mm: op('mm'), bmm: op('bmm'), baddbmm: op('baddbmm'),
  toDtypeLayout: op('to.dtype_layout'), detach: op('detach'), clone: op('clone'), contiguous: op('contiguous'),
  reshape: op('reshape'), view: op('view'), permute: op('permute'), transpose: op('transpose.int'),
  flatten: op('flatten.using_ints'), unsqueeze: op('unsqueeze'), squeeze: op('squeeze'), squeezeDim: op('squeeze.dim'),
  expand: op('expand'), repeat: op('repeat'), chunk: op('chunk'), split: op('split.Tensor'),
  splitWithSizes: op('split_with_sizes'), narrow: op('narrow'), slice: op('slice.Tensor'), select: op('select.int'),
  indexSelect: op('index_select'), gather: op('gather'), t: op('t'), flip: op('flip'),
  softmax: op('softmax.int'), logSoftmax: op('log_softmax.int'), item: op('item'),
};
const I = {
  zero_: opVoid('zero_'), fill_: opVoid('fill_.Scalar'), copy_: opVoid('copy_'), add_: opVoid('add_.Tensor'),
  addScalar_: opVoid('add_.Scalar'), sub_: opVoid('sub_.Tensor'), mul_: opVoid('mul_.Tensor'), mulScalar_: opVoid('mul_.Scalar'),
  div_: opVoid('div_.Tensor'), divScalar_: opVoid('div_.Scalar'), addcmul_: opVoid('addcmul_'), addcdiv_: opVoid('addcdiv_'),
  lerp_: opVoid('lerp_.Scalar'), clamp_: opVoid('clamp_'), uniform_: opVoid('uniform_'), normal_: opVoid('normal_'),
  sqrt_: opVoid('sqrt_'), neg_: opVoid('neg_'), silu_: opVoid('silu_'),
};

export class Tensor implements NativeTensorHandle {
  /** The id of this tensor in the addon's tensor table; -1 once disposed. */
  _id: number;
  /** Set by keep(): scopes never dispose this tensor. */
  kept = false;

  /** @internal Tensors are made by torch functions; the id is a fresh native slot that this object owns. */
  constructor(id: number, key?: typeof CREATE) {
    if (key !== CREATE) throw new TypeError('Tensors are created by torch functions (torch.tensor, torch.zeros, ...), not with new');
    this._id = id;
    track(this);
    noteCreated(this);
  }

  // ---- the native handle
  /** Frees the tensor now (idempotent). */
  dispose(): void {
    const id = this._id;
    if (id >= 0) {
      this._id = -1;
      native.tensorRelease(id);
    }
  }
  get isDisposed(): boolean { return this._id < 0; }
  get shape(): number[] { return native.tensorShape(this._id); }
  stride(): number[] { return native.tensorStride(this._id); }
  get dtypeCode(): number { return native.tensorDtypeCode(this._id); }
  get device(): Device { return native.tensorDevice(this._id); }
  get requiresGrad(): boolean { return native.tensorRequiresGrad(this._id); }
  set requiresGrad(on: boolean) { native.tensorSetRequiresGrad(this._id, on); }
  get isLeaf(): boolean { return native.tensorIsLeaf(this._id); }
  numel(): number { return native.tensorNumel(this._id); }
  get nbytes(): number { return native.tensorNbytes(this._id); }
  /** The elements' bytes (row-major, copied to the host). */
  _toBuffer(): ArrayBuffer { return native.tensorToBuffer(this._id); }
  /** Address of the first element (views share it). */
  _dataPtr(): bigint { return native.tensorDataPtr(this._id); }

  // ---- metadata
  get dtype(): DType { return dtypeName(this.dtypeCode); }
  get ndim(): number { return this.shape.length; }
  dim(): number { return this.shape.length; }
  size(dim?: number): number | number[] {
    const s = this.shape;
    if (dim === undefined) return s;
    const d = dim < 0 ? dim + s.length : dim;
    const v = s[d];
    if (v === undefined) throw new RangeError(`size(${dim}): tensor has ${s.length} dimensions`);
    return v;
  }
  get isCuda(): boolean { return this.device.startsWith('cuda'); }
  toString(): string {
    return this.isDisposed ? 'Tensor(disposed)' : `Tensor[${this.shape.join(', ')}] ${this.dtype} ${this.device}`;
  }
  [Symbol.dispose](): void { this.dispose(); }

  // ---- autograd
  backward(gradient?: Tensor, options: { retainGraph?: boolean } = {}): void {
    native.tensorBackward(this._id, gradient ?? null, options.retainGraph);
  }
  /** The accumulated gradient (a new handle each read: dispose it, or read it inside tidy). */
  get grad(): Tensor | null {
    const id = native.tensorGrad(this._id);
    return id === null ? null : new Tensor(id, CREATE);
  }
  set grad(g: Tensor | null) { native.tensorSetGrad(this._id, g); }
  requiresGrad_(on = true): this { this.requiresGrad = on; return this; }
  detach(): Tensor { return A.detach(this) as Tensor; }
  /** PyTorch's `t.data = other`: keeps this handle (and its autograd flags), takes other's storage. */
  setData(other: Tensor): void { native.tensorSetData(this._id, other); }

  // ---- reading back
  /** The elements as a typed array of the dtype (float16/bfloat16 as raw Uint16 bits), on the host. */
  dataSync(): TypedArray {
    const buf = native.tensorToBuffer(this._id);
    switch (this.dtype) {
      case 'float32': return new Float32Array(buf);
      case 'float64': return new Float64Array(buf);
      case 'int64': return new BigInt64Array(buf);
      case 'int32': return new Int32Array(buf);
      case 'int16': return new Int16Array(buf);
      case 'int8': return new Int8Array(buf);
      case 'float16': case 'bfloat16': return new Uint16Array(buf);
      default: return new Uint8Array(buf);
    }
  }
  /** Elements as numbers (any dtype), flat. */
  toFloat64Array(): Float64Array {
    if (this.dtype === 'float64') return this.dataSync() as Float64Array;
    const t = this.to('float64');
    try { return t.dataSync() as Float64Array; } finally { t.dispose(); }
  }
  /** Nested arrays of numbers, as torch's tolist(). */
  tolist(): unknown {
    const flat = Array.from(this.toFloat64Array());
    const shape = this.shape;
    const build = (dim: number, offset: number): unknown => {
      if (dim === shape.length) return flat[offset];
      const n = shape[dim] ?? 0;
      const stride = shape.slice(dim + 1).reduce((a, b) => a * b, 1);
      return Array.from({ length: n }, (_, i) => build(dim + 1, offset + i * stride));
    };
    return build(0, 0);
  }
  item(): number { return A.item(this) as number; }

  // ---- conversion
  to(target: DType | Device | { dtype?: DType; device?: Device; copy?: boolean }): Tensor {
    const o = typeof target === 'string' ? (isDType(target) ? { dtype: target } : { device: target }) : target;
    checkDevice(o.device);
    return A.toDtypeLayout(this, o.dtype === undefined ? null : dtypeCode(o.dtype), null, o.device ?? null, null, false, o.copy ?? false) as Tensor;
  }
  float(): Tensor { return this.to('float32'); }
  double(): Tensor { return this.to('float64'); }
  half(): Tensor { return this.to('float16'); }
  bfloat16(): Tensor { return this.to('bfloat16'); }
  long(): Tensor { return this.to('int64'); }
  int(): Tensor { return this.to('int32'); }
  cpu(): Tensor { return this.to({ device: 'cpu' }); }
  cuda(index = 0): Tensor { return this.to({ device: `cuda:${index}` }); }
  clone(): Tensor { return A.clone(this) as Tensor; }
  contiguous(): Tensor { return A.contiguous(this) as Tensor; }

  // ---- elementwise
  add(other: Tensor | Scalar, alpha: Scalar = 1): Tensor { return (other instanceof Tensor ? A.add(this, other, alpha) : A.addScalar(this, other, alpha)) as Tensor; }
  sub(other: Tensor | Scalar, alpha: Scalar = 1): Tensor { return (other instanceof Tensor ? A.sub(this, other, alpha) : A.subScalar(this, other, alpha)) as Tensor; }
  mul(other: Tensor | Scalar): Tensor { return (other instanceof Tensor ? A.mul(this, other) : A.mulScalar(this, other)) as Tensor; }
  div(other: Tensor | Scalar, roundingMode?: 'trunc' | 'floor'): Tensor {
    if (roundingMode !== undefined) return (other instanceof Tensor ? A.divMode(this, other, roundingMode) : A.divScalarMode(this, other, roundingMode)) as Tensor;
    return (other instanceof Tensor ? A.div(this, other) : A.divScalar(this, other)) as Tensor;
  }
  pow(exponent: Tensor | Scalar): Tensor { return (exponent instanceof Tensor ? A.powTensor(this, exponent) : A.pow(this, exponent)) as Tensor; }
  neg(): Tensor { return A.neg(this) as Tensor; }
  exp(): Tensor { return A.exp(this) as Tensor; }
  log(): Tensor { return A.log(this) as Tensor; }
  sqrt(): Tensor { return A.sqrt(this) as Tensor; }
  rsqrt(): Tensor { return A.rsqrt(this) as Tensor; }
  abs(): Tensor { return A.abs(this) as Tensor; }
  sin(): Tensor { return A.sin(this) as Tensor; }
  cos(): Tensor { return A.cos(this) as Tensor; }
  tanh(): Tensor { return A.tanh(this) as Tensor; }
  sigmoid(): Tensor { return A.sigmoid(this) as Tensor; }
  relu(): Tensor { return A.relu(this) as Tensor; }
  silu(): Tensor { return A.silu(this) as Tensor; }
  /** approximate: 'none' (exact erf form) or 'tanh'. */
  gelu(approximate: 'none' | 'tanh' = 'none'): Tensor { return A.gelu(this, approximate) as Tensor; }
  reciprocal(): Tensor { return A.reciprocal(this) as Tensor; }
  square(): Tensor { return A.square(this) as Tensor; }
  floor(): Tensor { return A.floor(this) as Tensor; }
  round(): Tensor { return A.round(this) as Tensor; }
  sign(): Tensor { return A.sign(this) as Tensor; }
  erf(): Tensor { return A.erf(this) as Tensor; }
  clamp(min: Scalar | null = null, max: Scalar | null = null): Tensor { return A.clamp(this, min, max) as Tensor; }
  maximum(other: Tensor): Tensor { return A.maximum(this, other) as Tensor; }
  minimum(other: Tensor): Tensor { return A.minimum(this, other) as Tensor; }
  /** torch.where(condition, this, other) */
  where(condition: Tensor, other: Tensor): Tensor { return A.where(condition, this, other) as Tensor; }
  maskedFill(mask: Tensor, value: Scalar): Tensor { return A.maskedFill(this, mask, value) as Tensor; }
  eq(o: Tensor | Scalar): Tensor { return (o instanceof Tensor ? A.eq(this, o) : A.eqScalar(this, o)) as Tensor; }
  ne(o: Tensor | Scalar): Tensor { return (o instanceof Tensor ? A.ne(this, o) : A.neScalar(this, o)) as Tensor; }
  lt(o: Tensor | Scalar): Tensor { return (o instanceof Tensor ? A.lt(this, o) : A.ltScalar(this, o)) as Tensor; }
  le(o: Tensor | Scalar): Tensor { return (o instanceof Tensor ? A.le(this, o) : A.leScalar(this, o)) as Tensor; }
  gt(o: Tensor | Scalar): Tensor { return (o instanceof Tensor ? A.gt(this, o) : A.gtScalar(this, o)) as Tensor; }
  ge(o: Tensor | Scalar): Tensor { return (o instanceof Tensor ? A.ge(this, o) : A.geScalar(this, o)) as Tensor; }
  isfinite(): Tensor { return A.isfinite(this) as Tensor; }
  isnan(): Tensor { return A.isnan(this) as Tensor; }
  logicalNot(): Tensor { return A.logicalNot(this) as Tensor; }
  logicalAnd(o: Tensor): Tensor { return A.logicalAnd(this, o) as Tensor; }
  logicalOr(o: Tensor): Tensor { return A.logicalOr(this, o) as Tensor; }

  // ---- reductions
  sum(dim?: number | number[], keepdim = false, dtype?: DType): Tensor {
    const code = dtype === undefined ? null : dtypeCode(dtype);
    return (dim === undefined ? A.sum(this, code) : A.sumDim(this, dims(dim), keepdim, code)) as Tensor;
  }
  mean(dim?: number | number[], keepdim = false, dtype?: DType): Tensor {
    const code = dtype === undefined ? null : dtypeCode(dtype);
    return (dim === undefined ? A.mean(this, code) : A.meanDim(this, dims(dim), keepdim, code)) as Tensor;
  }
  /** max() of all elements, or max(dim) → [values, indices] as torch.max. */
  max(): Tensor;
  max(dim: number, keepdim?: boolean): [Tensor, Tensor];
  max(dim?: number, keepdim = false): Tensor | [Tensor, Tensor] {
    return (dim === undefined ? A.max(this) : A.maxDim(this, dim, keepdim)) as Tensor | [Tensor, Tensor];
  }
  min(): Tensor;
  min(dim: number, keepdim?: boolean): [Tensor, Tensor];
  min(dim?: number, keepdim = false): Tensor | [Tensor, Tensor] {
    return (dim === undefined ? A.min(this) : A.minDim(this, dim, keepdim)) as Tensor | [Tensor, Tensor];
  }
  amax(dim: number | number[] = [], keepdim = false): Tensor { return A.amax(this, dims(dim), keepdim) as Tensor; }
  amin(dim: number | number[] = [], keepdim = false): Tensor { return A.amin(this, dims(dim), keepdim) as Tensor; }
  argmax(dim?: number, keepdim = false): Tensor { return A.argmax(this, dim ?? null, keepdim) as Tensor; }
  argmin(dim?: number, keepdim = false): Tensor { return A.argmin(this, dim ?? null, keepdim) as Tensor; }
  norm(p: number = 2, dim?: number | number[], keepdim = false): Tensor {
    return (dim === undefined ? A.norm(this, p) : A.normDim(this, p, dims(dim), keepdim)) as Tensor;
  }
  var(dim?: number | number[], unbiased = true, keepdim = false): Tensor { return A.varDim(this, dim === undefined ? null : dims(dim), unbiased, keepdim) as Tensor; }
  all(): Tensor { return A.all(this) as Tensor; }
  any(): Tensor { return A.any(this) as Tensor; }
  prod(): Tensor { return A.prod(this) as Tensor; }

  // ---- linear algebra
  matmul(other: Tensor): Tensor { return A.matmul(this, other) as Tensor; }
  mm(other: Tensor): Tensor { return A.mm(this, other) as Tensor; }
  bmm(other: Tensor): Tensor { return A.bmm(this, other) as Tensor; }
  /** beta * this + alpha * (batch1 @ batch2) */
  baddbmm(batch1: Tensor, batch2: Tensor, beta: Scalar = 1, alpha: Scalar = 1): Tensor { return A.baddbmm(this, batch1, batch2, beta, alpha) as Tensor; }

  // ---- views and shapes
  reshape(...shape: number[] | [number[]]): Tensor { return A.reshape(this, shapeArg(shape)) as Tensor; }
  view(...shape: number[] | [number[]]): Tensor { return A.view(this, shapeArg(shape)) as Tensor; }
  permute(...order: number[] | [number[]]): Tensor { return A.permute(this, shapeArg(order)) as Tensor; }
  transpose(dim0: number, dim1: number): Tensor { return A.transpose(this, dim0, dim1) as Tensor; }
  t(): Tensor { return A.t(this) as Tensor; }
  flatten(startDim = 0, endDim = -1): Tensor { return A.flatten(this, startDim, endDim) as Tensor; }
  unsqueeze(dim: number): Tensor { return A.unsqueeze(this, dim) as Tensor; }
  squeeze(dim?: number): Tensor { return (dim === undefined ? A.squeeze(this) : A.squeezeDim(this, dim)) as Tensor; }
  expand(...shape: number[] | [number[]]): Tensor { return A.expand(this, shapeArg(shape)) as Tensor; }
  repeat(...repeats: number[] | [number[]]): Tensor { return A.repeat(this, shapeArg(repeats)) as Tensor; }
  chunk(chunks: number, dim = 0): Tensor[] { return A.chunk(this, chunks, dim) as Tensor[]; }
  /** split(size) into equal pieces, or split([sizes]) as torch.split. */
  split(sizeOrSizes: number | number[], dim = 0): Tensor[] {
    return (typeof sizeOrSizes === 'number' ? A.split(this, sizeOrSizes, dim) : A.splitWithSizes(this, sizeOrSizes, dim)) as Tensor[];
  }
  narrow(dim: number, start: number, length: number): Tensor { return A.narrow(this, dim, start, length) as Tensor; }
  /** this[..., start:end:step, ...] along dim. */
  slice(dim: number, start: number | null = null, end: number | null = null, step = 1): Tensor { return A.slice(this, dim, start, end, step) as Tensor; }
  select(dim: number, index: number): Tensor { return A.select(this, dim, index) as Tensor; }
  indexSelect(dim: number, index: Tensor): Tensor { return A.indexSelect(this, dim, index) as Tensor; }
  gather(dim: number, index: Tensor): Tensor { return A.gather(this, dim, index) as Tensor; }
  flip(dims: number[]): Tensor { return A.flip(this, dims) as Tensor; }
  softmax(dim: number, dtype?: DType): Tensor { return A.softmax(this, dim, dtype === undefined ? null : dtypeCode(dtype)) as Tensor; }
  logSoftmax(dim: number, dtype?: DType): Tensor { return A.logSoftmax(this, dim, dtype === undefined ? null : dtypeCode(dtype)) as Tensor; }

  // ---- in place (for optimizers and initialisation); each returns this
  zero_(): this { I.zero_(this); return this; }
  fill_(value: Scalar): this { I.fill_(this, value); return this; }
  copy_(src: Tensor): this { I.copy_(this, src); return this; }
  add_(other: Tensor | Scalar, alpha: Scalar = 1): this { if (other instanceof Tensor) I.add_(this, other, alpha); else I.addScalar_(this, other, alpha); return this; }
  sub_(other: Tensor, alpha: Scalar = 1): this { I.sub_(this, other, alpha); return this; }
  mul_(other: Tensor | Scalar): this { if (other instanceof Tensor) I.mul_(this, other); else I.mulScalar_(this, other); return this; }
  div_(other: Tensor | Scalar): this { if (other instanceof Tensor) I.div_(this, other); else I.divScalar_(this, other); return this; }
  addcmul_(t1: Tensor, t2: Tensor, value: Scalar = 1): this { I.addcmul_(this, t1, t2, value); return this; }
  addcdiv_(t1: Tensor, t2: Tensor, value: Scalar = 1): this { I.addcdiv_(this, t1, t2, value); return this; }
  lerp_(end: Tensor, weight: number): this { I.lerp_(this, end, weight); return this; }
  clamp_(min: Scalar | null = null, max: Scalar | null = null): this { I.clamp_(this, min, max); return this; }
  sqrt_(): this { I.sqrt_(this); return this; }
  neg_(): this { I.neg_(this); return this; }
  silu_(): this { I.silu_(this); return this; }
  uniform_(from = 0, to = 1, generator?: Generator): this { I.uniform_(this, from, to, generator ?? null); return this; }
  normal_(mean = 0, std = 1, generator?: Generator): this { I.normal_(this, mean, std, generator ?? null); return this; }
}

const wrap = (id: number): Tensor => new Tensor(id, CREATE);
native.setTensorFactory(wrap);
setTensorHooks(Tensor, wrap);
setTensorTest((v: unknown): v is Tensor => v instanceof Tensor);

const dtypeNames = new Set(['float32', 'float16', 'bfloat16', 'float64', 'int64', 'int32', 'int16', 'int8', 'uint8', 'bool']);
function isDType(s: string): s is DType { return dtypeNames.has(s); }

function dims(d: number | number[]): number[] { return typeof d === 'number' ? [d] : d; }

/** Accepts both f(2, 3) and f([2, 3]), as PyTorch does. */
function shapeArg(args: number[] | [number[]]): number[] {
  const first = args[0];
  return Array.isArray(first) ? first : (args as number[]);
}
