// safetensors files (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
// N bytes of UTF-8 JSON (tensor name → {dtype, shape, data_offsets}, plus an optional "__metadata__"
// string → string map), then the data section, which the tensors' byte ranges tile exactly.
//
// Loading treats the file as untrusted: the header is read and validated here, in full, before anything is
// mapped; then the native side maps the file once (private, copy-on-write) and every tensor is a view into
// that mapping, so a multi-GB checkpoint is not copied into the allocator. Saving writes a temporary file
// next to the target, fsyncs it and renames it over the target, so a failed save never touches an
// existing file.
import { closeSync, fstatSync, openSync, readSync } from 'node:fs';
import { native, type SafetensorsEntry } from '../native.js';
import { dtypeCode, elementSize, isFloatingPoint, type DType } from '../dtype.js';
import { tidy } from '../scope.js';
import { Tensor, type Device } from '../tensor.js';

/** The dtype names of the safetensors format that difflora reads and writes. */
export type SafetensorsDType = 'F64' | 'F32' | 'F16' | 'BF16' | 'I64' | 'I32' | 'I16' | 'I8' | 'U8' | 'BOOL';

const fromFormat: Record<SafetensorsDType, DType> = {
  F64: 'float64', F32: 'float32', F16: 'float16', BF16: 'bfloat16',
  I64: 'int64', I32: 'int32', I16: 'int16', I8: 'int8', U8: 'uint8', BOOL: 'bool',
};
const toFormat = new Map<DType, SafetensorsDType>(
  Object.entries(fromFormat).map(([format, dtype]) => [dtype, format as SafetensorsDType]),
);
/** Valid in the format but without a libtorch 1.13 counterpart here. */
const knownUnsupported = new Set(['U16', 'U32', 'U64', 'F8_E4M3', 'F8_E5M2', 'F8_E8M0', 'F6_E2M3', 'F6_E3M2', 'F4', 'C64']);

/** The cap on the header length, as in the reference (Rust) implementation. */
export const MAX_HEADER_BYTES = 100_000_000;

/** One tensor's header entry. Offsets are relative to the start of the data section, as in the file. */
export interface SafetensorsTensorInfo {
  name: string;
  dtype: DType;
  /** The dtype as written in the file ('F32', 'BF16', ...). */
  formatDtype: SafetensorsDType;
  shape: number[];
  begin: number;
  end: number;
}

/** A parsed and validated header. */
export interface SafetensorsHeader {
  /** Tensors in the order their keys appear in the file's header (not necessarily data order). */
  tensors: SafetensorsTensorInfo[];
  /** `__metadata__` ({} when absent). */
  metadata: Record<string, string>;
  fileSize: number;
  /** N, the JSON header's length in bytes (padding included). */
  headerSize: number;
  /** 8 + N: where the data section starts in the file. */
  dataOffset: number;
}

export interface LoadSafetensorsOptions {
  /** Move every tensor to this device (default: stay on the CPU, as views into the mapped file). */
  device?: Device;
  /**
   * Cast floating-point tensors to this dtype (integer and bool tensors keep theirs, as with diffusers'
   * `torch_dtype`). Default: the file's dtypes.
   */
  dtype?: DType;
}

export interface SafetensorsContents {
  /** Tensors by name, in the order of the file's header. */
  tensors: Map<string, Tensor>;
  metadata: Record<string, string>;
}

function fail(path: string, problem: string): never {
  throw new Error(`safetensors: ${path}: ${problem}`);
}

/** JSON of an untrusted value for a message, cut short (a hostile header may hold huge arrays). */
function short(v: unknown): string {
  const s = JSON.stringify(v) ?? 'nothing';
  return s.length > 80 ? `${s.slice(0, 77)}...` : s;
}

function describe(v: unknown): string {
  if (v === undefined) return 'nothing';
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'string') return `the string ${JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}...` : v)}`;
  if (typeof v === 'object') return 'an object';
  return `${typeof v} ${String(v)}`;
}

const isPlainObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === 'object' && v !== null && !Array.isArray(v);

/**
 * Walks JSON text that JSON.parse has already accepted and returns the top-level keys in file order; throws
 * on a key repeated within one object (JSON.parse would silently keep the last one). Keys are compared
 * after unescaping, so "a" and "\u0061" are the same key.
 */
function scanKeys(path: string, text: string): string[] {
  interface Frame { isObject: boolean; keys: Set<string>; expectKey: boolean; name: string }
  const stack: Frame[] = [];
  const topKeys: string[] = [];
  let lastKey = '';
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === '{' || c === '[') {
      const parent = stack[stack.length - 1];
      const name = parent === undefined ? 'the header' : short(lastKey);
      stack.push({ isObject: c === '{', keys: new Set(), expectKey: c === '{', name });
    } else if (c === '}' || c === ']') {
      stack.pop();
    } else if (c === ',') {
      const top = stack[stack.length - 1];
      if (top?.isObject) top.expectKey = true;
    } else if (c === '"') {
      let j = i + 1;
      while (text[j] !== '"') j += text[j] === '\\' ? 2 : 1;
      const top = stack[stack.length - 1];
      if (top?.isObject && top.expectKey) {
        const key = JSON.parse(text.slice(i, j + 1)) as string;
        if (top.keys.has(key)) {
          fail(path, `duplicate key ${short(key)} in ${top.name === 'the header' ? 'the header' : `entry ${top.name}`}`);
        }
        top.keys.add(key);
        top.expectKey = false;
        lastKey = key;
        if (stack.length === 1) topKeys.push(key);
      }
      i = j;
    }
  }
  return topKeys;
}

/** Product of the dimensions, exact (BigInt: untrusted shapes may overflow a double). */
function numelOf(shape: number[]): bigint {
  let n = 1n;
  for (const d of shape) n *= BigInt(d);
  return n;
}

function parseEntry(path: string, name: string, value: unknown, dataSize: number): SafetensorsTensorInfo {
  const where = `tensor ${short(name)}`;
  if (!isPlainObject(value)) fail(path, `${where}: entry must be an object with dtype, shape and data_offsets, got ${describe(value)}`);
  const { dtype: format, shape, data_offsets: offsets } = value;
  if (typeof format !== 'string') fail(path, `${where}: dtype must be a string, got ${describe(format)}`);
  if (!Object.hasOwn(fromFormat, format)) {
    fail(path, knownUnsupported.has(format)
      ? `${where}: unsupported dtype "${format}" (supported: ${Object.keys(fromFormat).join(', ')})`
      : `${where}: unknown dtype ${short(format)} (supported: ${Object.keys(fromFormat).join(', ')})`);
  }
  const dtype = fromFormat[format as SafetensorsDType];
  if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    fail(path, `${where}: shape must be an array of non-negative integers, got ${short(shape)}`);
  }
  if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every((o) => Number.isSafeInteger(o) && o >= 0)) {
    fail(path, `${where}: data_offsets must be two non-negative integers [begin, end], got ${short(offsets)}`);
  }
  const [begin, end] = offsets as [number, number];
  if (begin > end) fail(path, `${where}: data_offsets [${begin}, ${end}] have begin > end`);
  const expected = numelOf(shape as number[]) * BigInt(elementSize(dtype));
  if (BigInt(end - begin) !== expected) {
    fail(path, `${where}: data_offsets [${begin}, ${end}] hold ${end - begin} bytes but shape [${(shape as number[]).join(', ')}] of ${format} needs ${expected}`);
  }
  if (end > dataSize) {
    fail(path, `${where}: data_offsets [${begin}, ${end}] run past the end of the data section (${dataSize} bytes)`);
  }
  return { name, dtype, formatDtype: format as SafetensorsDType, shape: [...(shape as number[])], begin, end };
}

/** Checks that the tensors' byte ranges, sorted by begin, tile the data section exactly from 0 to its end. */
function checkTiling(path: string, tensors: SafetensorsTensorInfo[], dataSize: number): void {
  const sorted = [...tensors].sort((a, b) => a.begin - b.begin || a.end - b.end);
  let pos = 0;
  let prev: SafetensorsTensorInfo | undefined;
  for (const t of sorted) {
    if (t.begin < pos) {
      fail(path, `tensor ${short(t.name)} [${t.begin}, ${t.end}] overlaps tensor ${short(prev?.name)} [${prev?.begin}, ${prev?.end}]`);
    }
    if (t.begin > pos) {
      fail(path, `the data section has a hole: bytes [${pos}, ${t.begin}) belong to no tensor (before tensor ${short(t.name)})`);
    }
    pos = t.end;
    prev = t;
  }
  if (pos !== dataSize) fail(path, `the data section has ${dataSize - pos} trailing bytes that belong to no tensor (tensors end at ${pos}, the section at ${dataSize})`);
}

/**
 * Validates a header given its JSON bytes (without the 8-byte length) and the file size. Exported for
 * tools that already hold the bytes; readSafetensorsHeader is the usual entry point.
 */
export function parseSafetensorsHeader(path: string, headerBytes: Uint8Array, fileSize: number): SafetensorsHeader {
  const headerSize = headerBytes.length;
  const dataOffset = 8 + headerSize;
  const dataSize = fileSize - dataOffset;
  if (dataSize < 0) fail(path, `header length ${headerSize} runs past the end of the file (${fileSize} bytes)`);
  let text: string;
  try {
    // ignoreBOM keeps a byte-order mark in the text, where JSON.parse rejects it (as the reference does).
    text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(headerBytes);
  } catch {
    fail(path, 'header is not valid UTF-8');
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    fail(path, `header is not valid JSON (${(e as Error).message})`);
  }
  if (!isPlainObject(json)) fail(path, `header must be a JSON object, got ${describe(json)}`);
  const keys = scanKeys(path, text);

  let metadata: Record<string, string> = {};
  const tensors: SafetensorsTensorInfo[] = [];
  for (const key of keys) {
    const value = json[key];
    if (key === '__metadata__') {
      if (!isPlainObject(value)) fail(path, `__metadata__ must be an object mapping strings to strings, got ${describe(value)}`);
      for (const [k, v] of Object.entries(value)) {
        if (typeof v !== 'string') fail(path, `__metadata__ must map strings to strings: key ${short(k)} holds ${describe(v)}`);
      }
      metadata = value as Record<string, string>;
    } else {
      tensors.push(parseEntry(path, key, value, dataSize));
    }
  }
  checkTiling(path, tensors, dataSize);
  return { tensors, metadata, fileSize, headerSize, dataOffset };
}

/** Reads and validates a file's header (names, dtypes, shapes, offsets, metadata) without reading any tensor data. */
export function readSafetensorsHeader(path: string): SafetensorsHeader {
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch (e) {
    fail(path, `cannot open: ${(e as Error).message}`);
  }
  try {
    const stat = fstatSync(fd);
    if (!stat.isFile()) fail(path, 'not a regular file');
    const fileSize = stat.size;
    if (fileSize < 8) fail(path, `file is ${fileSize} bytes, shorter than the 8-byte header length`);
    const prefix = Buffer.alloc(8);
    readExactly(path, fd, prefix, 0);
    const n = prefix.readBigUInt64LE(0);
    if (n > BigInt(MAX_HEADER_BYTES)) fail(path, `header length ${n} exceeds the ${MAX_HEADER_BYTES}-byte limit`);
    if (n > BigInt(fileSize - 8)) fail(path, `header length ${n} runs past the end of the file (${fileSize} bytes)`);
    const header = Buffer.alloc(Number(n));
    readExactly(path, fd, header, 8);
    return parseSafetensorsHeader(path, header, fileSize);
  } finally {
    closeSync(fd);
  }
}

function readExactly(path: string, fd: number, buf: Buffer, position: number): void {
  let done = 0;
  while (done < buf.length) {
    let n: number;
    try {
      n = readSync(fd, buf, done, buf.length - done, position + done);
    } catch (e) {
      fail(path, `cannot read: ${(e as Error).message}`);
    }
    if (n === 0) fail(path, 'file ended while reading the header (truncated while loading?)');
    done += n;
  }
}

/**
 * Loads every tensor of a safetensors file, after validating the whole header.
 *
 * On the CPU with no dtype change, the tensors are views into one private (copy-on-write) mapping of the
 * file: nothing is copied and the allocator does not grow; the mapping is released with the last of them.
 * The tensors are ordinary Tensors, created in the caller's current tidy() scope (disposed with it unless
 * returned or keep()-ed); outside any scope the caller owns them and should dispose them.
 */
export function loadSafetensors(path: string, options: LoadSafetensorsOptions = {}): SafetensorsContents {
  const header = readSafetensorsHeader(path);
  const { device, dtype } = options;
  if (dtype !== undefined) dtypeCode(dtype); // throws on an unknown dtype name
  const entries: SafetensorsEntry[] = header.tensors.map((t) => ({ dtype: dtypeCode(t.dtype), shape: t.shape, begin: t.begin, end: t.end }));
  const tensors = tidy(() => {
    let mapped: Tensor[];
    try {
      mapped = native.mapTensors(path, header.fileSize, header.dataOffset, entries) as unknown as Tensor[];
    } catch (e) {
      fail(path, `cannot map: ${(e as Error).message}`);
    }
    const out = new Map<string, Tensor>();
    header.tensors.forEach((info, i) => {
      let t = mapped[i] as Tensor;
      const castTo = dtype !== undefined && dtype !== info.dtype && isFloatingPoint(info.dtype) ? dtype : undefined;
      const moveTo = device !== undefined && device !== 'cpu' ? device : undefined;
      if (castTo !== undefined || moveTo !== undefined) {
        const converted = t.to({ dtype: castTo, device: moveTo });
        t.dispose(); // drop the view now; the tidy would do it too, later
        t = converted;
      }
      out.set(info.name, t);
    });
    return out;
  });
  return { tensors, metadata: header.metadata };
}

/** The bytes written before the data: 8-byte length, JSON, spaces up to a multiple of 8. Exported for tests and tools. */
export function encodeSafetensorsHeader(
  entries: { name: string; dtype: DType; shape: readonly number[] }[], metadata?: Record<string, string>,
): Uint8Array {
  const parts: string[] = [];
  if (metadata !== undefined) {
    parts.push(`"__metadata__":{${Object.entries(metadata).map(([k, v]) => `${JSON.stringify(k)}:${JSON.stringify(v)}`).join(',')}}`);
  }
  let offset = 0;
  for (const e of entries) {
    const format = toFormat.get(e.dtype);
    if (format === undefined) throw new TypeError(`safetensors: unsupported dtype '${e.dtype}'`);
    const nbytes = e.shape.reduce((a, b) => a * b, 1) * elementSize(e.dtype);
    parts.push(`${JSON.stringify(e.name)}:{"dtype":"${format}","shape":[${e.shape.join(',')}],"data_offsets":[${offset},${offset + nbytes}]}`);
    offset += nbytes;
  }
  const json = Buffer.from(`{${parts.join(',')}}`, 'utf8');
  const padded = Math.ceil(json.length / 8) * 8; // as the Rust writer: keeps the data section 8-byte aligned
  const out = Buffer.alloc(8 + padded, 0x20);
  out.writeBigUInt64LE(BigInt(padded), 0);
  json.copy(out, 8);
  return out;
}

/**
 * Writes tensors (Map or plain object, in insertion order; data packed in that order) and optional string
 * metadata (written first, as "__metadata__") to a safetensors file. Tensors on any device are copied to
 * the CPU as contiguous data while writing. The file is written to `<path>.tmp-<pid>`, fsynced and renamed
 * over `path`: on any failure an existing file at `path` is left as it was and no temporary file remains.
 */
export function saveSafetensors(
  path: string, tensors: Map<string, Tensor> | Record<string, Tensor>, metadata?: Record<string, string>,
): void {
  if (metadata !== undefined) {
    if (!isPlainObject(metadata)) fail(path, `metadata must be an object mapping strings to strings, got ${describe(metadata)}`);
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== 'string') fail(path, `metadata values must be strings: key ${JSON.stringify(k)} holds ${describe(v)}`);
    }
  }
  const list: [unknown, unknown][] = tensors instanceof Map ? [...tensors.entries()] : Object.entries(tensors);
  const entries: { name: string; dtype: DType; shape: number[] }[] = [];
  const handles: Tensor[] = [];
  for (const [name, t] of list) {
    if (typeof name !== 'string') fail(path, `tensor names must be strings, got ${describe(name)}`);
    if (name === '__metadata__') fail(path, 'a tensor cannot be named "__metadata__" (reserved for metadata)');
    if (!(t instanceof Tensor)) fail(path, `tensor ${JSON.stringify(name)} is not a Tensor (got ${describe(t)})`);
    if (t.isDisposed) fail(path, `tensor ${JSON.stringify(name)} is disposed`);
    if (!toFormat.has(t.dtype)) fail(path, `tensor ${JSON.stringify(name)} has unsupported dtype ${t.dtype}`);
    entries.push({ name, dtype: t.dtype, shape: t.shape });
    handles.push(t);
  }
  const header = encodeSafetensorsHeader(entries, metadata);
  try {
    native.writeFileAtomic(path, header, handles);
  } catch (e) {
    fail(path, `cannot save: ${(e as Error).message}`);
  }
}
