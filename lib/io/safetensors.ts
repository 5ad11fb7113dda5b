// safetensors files (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
// N bytes of UTF-8 JSON (tensor name → {dtype, shape, data_offsets}, plus an optional "__metadata__"
// string → string map), then the data section, which the tensors' byte ranges tile exactly.
//
// Loading treats the file as untrusted. It is opened once, non-blocking and fstat-checked (a FIFO or a device
// is refused, never waited on). The header is validated in full before any tensor exists. It is read by a
// bounded JSON reader (./bounded_json.ts), not JSON.parse: the format is flat, so nesting deeper than
// {name: {shape: [...]}}, a shape of over 1,024 dimensions, more than 65,536 metadata keys or MAX_TENSORS
// tensors are refused at the first byte past the limit (100 MB of '[' fails in milliseconds instead of ending
// in a V8 heap abort), and each entry's name, dtype, shape and byte range is checked as soon as it is read,
// then the ranges' tiling of the data section. Each tensor's bytes are then read (pread, in the native addon)
// from that same descriptor into memory the tensor owns. Nothing maps the file, so a file truncated or
// rewritten while or after it is loaded can never raise SIGBUS: a short read, or a size or mtime that changed
// between opening and the last read, is an error naming the file, and tensors already loaded stay valid
// whatever happens to the file later. (Measured: ~80 ms more per 500 MB from the page cache than mapping.)
//
// Saving writes a new private temporary file next to the target, fsyncs it and renames it over the target,
// so a failed save never touches an existing file; the target must be absent or a regular file (a device, a
// FIFO, a directory or a symlink at the path is refused, not replaced).
import { closeSync, fstatSync, readSync } from 'node:fs';
import { native } from '../native.js';
import { dtypeCode, elementSize, isFloatingPoint, type DType } from '../dtype.js';
import { tidy } from '../scope.js';
import { Tensor, type Device } from '../tensor.js';
import { outputMode } from './atomic.js';
import { BoundedJsonError, isJsonObject, parseBoundedJson, type Json, type JsonLimits } from './bounded_json.js';
import { checkOutputTarget, openRegularFile } from './files.js';

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

/**
 * The most tensors one file may declare. Real checkpoints hold a few thousand (SD 1.5's UNet ~700, a whole
 * single-file SDXL ~2,500; the largest unsharded LLM files tens of thousands); loading costs ~10 µs per tensor,
 * so this bounds a hostile file of empty tensors to seconds.
 */
export const MAX_TENSORS = 1 << 18;

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
  /** Move every tensor to this device (default: the CPU). */
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

/** A message of lib/io/files.ts without its quoted path: fail() already puts the path first. */
function withoutPath(path: string, message: string): string {
  return message.replace(`: '${path}'`, '').replace(` '${path}'`, '');
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

/** Past this many elements a shape cannot match any file, and the exact product no longer matters. */
const NUMEL_CAP = 2n ** 96n;

/**
 * Product of the dimensions, exact (BigInt: untrusted shapes may overflow a double) up to NUMEL_CAP; above it,
 * undefined. Stopping there keeps a hostile shape of a million 2s from costing a million ever-larger products.
 */
function numelOf(shape: number[]): bigint | undefined {
  if (shape.includes(0)) return 0n;
  let n = 1n;
  for (const d of shape) {
    n *= BigInt(d);
    if (n > NUMEL_CAP) return undefined;
  }
  return n;
}

/** "tensor <name>" for a message (built only on failure: a header may hold many entries). */
function tensorName(name: string): string {
  return `tensor ${short(name)}`;
}

const isCount = (v: Json): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;

function parseEntry(path: string, name: string, value: Json, dataSize: number): SafetensorsTensorInfo {
  if (!isJsonObject(value)) fail(path, `${tensorName(name)}: entry must be an object with dtype, shape and data_offsets, got ${describe(value)}`);
  const { dtype: format, shape, data_offsets: offsets } = value;
  if (typeof format !== 'string') fail(path, `${tensorName(name)}: dtype must be a string, got ${describe(format)}`);
  if (!Object.hasOwn(fromFormat, format)) {
    fail(path, knownUnsupported.has(format)
      ? `${tensorName(name)}: unsupported dtype "${format}" (supported: ${Object.keys(fromFormat).join(', ')})`
      : `${tensorName(name)}: unknown dtype ${short(format)} (supported: ${Object.keys(fromFormat).join(', ')})`);
  }
  const dtype = fromFormat[format as SafetensorsDType];
  if (!Array.isArray(shape) || !shape.every(isCount)) {
    fail(path, `${tensorName(name)}: shape must be an array of non-negative integers, got ${short(shape)}`);
  }
  if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isCount)) {
    fail(path, `${tensorName(name)}: data_offsets must be two non-negative integers [begin, end], got ${short(offsets)}`);
  }
  const [begin, end] = offsets as [number, number];
  if (begin > end) fail(path, `${tensorName(name)}: data_offsets [${begin}, ${end}] have begin > end`);
  const numel = numelOf(shape);
  const expected = numel === undefined ? undefined : numel * BigInt(elementSize(dtype));
  if (expected === undefined || BigInt(end - begin) !== expected) {
    const dims = shape.length > 16 ? `${shape.slice(0, 16).join(', ')}, ...` : shape.join(', ');
    const needs = expected === undefined ? `more than ${NUMEL_CAP}` : `${expected}`;
    fail(path, `${tensorName(name)}: data_offsets [${begin}, ${end}] hold ${end - begin} bytes but shape [${dims}] of ${format} needs ${needs}`);
  }
  if (end > dataSize) {
    fail(path, `${tensorName(name)}: data_offsets [${begin}, ${end}] run past the end of the data section (${dataSize} bytes)`);
  }
  return { name, dtype, formatDtype: format as SafetensorsDType, shape: [...shape], begin, end };
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
 * What the header's JSON may hold: the format is flat ({name: {dtype, shape: [...], data_offsets: [...]}},
 * "__metadata__": {key: value}), so depth 3 at most; shapes of at most 1,024 dimensions (PyTorch's own limit
 * is far lower); at most 65,536 metadata entries or fields of one tensor; at most MAX_TENSORS entries.
 * Anything beyond is refused at the first byte past the limit, before it costs time or memory.
 */
const HEADER_LIMITS: JsonLimits = { maxDepth: 3, maxItems: [MAX_TENSORS + 1, 65_536, 1024] };

/** Where in the header a JSON problem is, in words: "the header", "tensor "w"", "__metadata__". */
function placeOf(keys: readonly string[]): string {
  const [top, field] = keys;
  if (top === undefined) return 'the header';
  const owner = top === '__metadata__' ? '__metadata__' : `tensor ${short(top)}`;
  return field === undefined ? owner : `${owner} ${top === '__metadata__' ? 'key ' : ''}${short(field)}`;
}

const tooManyTensors = `the header declares more than ${MAX_TENSORS} tensors (the limit on tensors in one file)`;

function jsonProblem(e: BoundedJsonError): string {
  switch (e.kind) {
    case 'utf8': return `header is not valid UTF-8 (${e.message})`;
    case 'syntax': return `header is not valid JSON (${e.message})`;
    case 'duplicate': return `duplicate key ${short(e.key)} in ${e.keys.length === 0 ? 'the header' : `entry ${short(e.keys[0])}`}`;
    case 'depth': return `header nests deeper than the format allows (${e.message}; a header is {name: {dtype, shape: [...], data_offsets: [...]}})`;
    case 'items': return e.keys.length === 0 ? tooManyTensors : `${placeOf(e.keys)}: ${e.message}`;
  }
}

function parseMetadata(path: string, value: Json): Record<string, string> {
  if (!isJsonObject(value)) fail(path, `__metadata__ must be an object mapping strings to strings, got ${describe(value)}`);
  const entries = Object.entries(value);
  for (const [k, v] of entries) {
    if (typeof v !== 'string') fail(path, `__metadata__ must map strings to strings: key ${short(k)} holds ${describe(v)}`);
  }
  return Object.fromEntries(entries) as Record<string, string>; // a plain object; a "__proto__" key stays a key
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
  let metadata: Record<string, string> = {};
  const tensors: SafetensorsTensorInfo[] = [];
  // Each top-level member is validated as soon as it is read: a hostile header fails at its first bad entry.
  const onMember = (key: string, value: Json): void => {
    if (key === '__metadata__') metadata = parseMetadata(path, value);
    else if (tensors.length === MAX_TENSORS) fail(path, tooManyTensors);
    else tensors.push(parseEntry(path, key, value, dataSize));
  };
  let json: Json;
  try {
    json = parseBoundedJson(headerBytes, HEADER_LIMITS, 8, onMember);
  } catch (e) {
    if (e instanceof BoundedJsonError) fail(path, jsonProblem(e));
    throw e;
  }
  if (!isJsonObject(json)) fail(path, `header must be a JSON object, got ${describe(json)}`);
  checkTiling(path, tensors, dataSize);
  return { tensors, metadata, fileSize, headerSize, dataOffset };
}

/**
 * Opens a safetensors file for reading: non-blocking and fstat-checked, so a FIFO, a socket, a device or a
 * directory is refused at once instead of blocking or reading forever. Errors name the file.
 */
function openSafetensors(path: string): number {
  try {
    return openRegularFile(path, 'file').fd;
  } catch (e) {
    fail(path, withoutPath(path, (e as Error).message));
  }
}

/** Reads and validates the header of the open file `fd` (`fileSize` bytes long). */
function readHeaderFrom(path: string, fd: number, fileSize: number): SafetensorsHeader {
  if (fileSize < 8) fail(path, `file is ${fileSize} bytes, shorter than the 8-byte header length`);
  const prefix = Buffer.alloc(8);
  readExactly(path, fd, prefix, 0);
  const n = prefix.readBigUInt64LE(0);
  if (n > BigInt(MAX_HEADER_BYTES)) fail(path, `header length ${n} exceeds the ${MAX_HEADER_BYTES}-byte limit`);
  if (n > BigInt(fileSize - 8)) fail(path, `header length ${n} runs past the end of the file (${fileSize} bytes)`);
  const header = Buffer.alloc(Number(n));
  readExactly(path, fd, header, 8);
  return parseSafetensorsHeader(path, header, fileSize);
}

/** Reads and validates a file's header (names, dtypes, shapes, offsets, metadata) without reading any tensor data. */
export function readSafetensorsHeader(path: string): SafetensorsHeader {
  const fd = openSafetensors(path);
  try {
    return readHeaderFrom(path, fd, fstatSync(fd).size);
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

/** What identifies the file's contents between the open and the last read: a writer changes size or mtime. */
function versionOf(fd: number): string {
  const st = fstatSync(fd, { bigint: true });
  return `${st.size} bytes, modified ${st.mtimeNs} ns`;
}

/**
 * Loads every tensor of a safetensors file, after validating the whole header.
 *
 * Each tensor owns its memory (read from the file, never mapped): later changes to the file cannot affect
 * or invalidate it. A file that changes while it is read is an error naming it, and no tensor is left behind.
 * With `dtype` or `device`, each tensor is converted right after it is read, so at most one unconverted
 * tensor is alive at a time. The tensors are ordinary Tensors, created in the caller's current tidy() scope
 * (disposed with it unless returned or keep()-ed); outside any scope the caller owns them and should dispose them.
 */
export function loadSafetensors(path: string, options: LoadSafetensorsOptions = {}): SafetensorsContents {
  if (options.dtype !== undefined) dtypeCode(options.dtype); // throws on an unknown dtype name
  const fd = openSafetensors(path);
  try {
    const before = versionOf(fd);
    const header = readHeaderFrom(path, fd, fstatSync(fd).size);
    const tensors = tidy(() => {
      const out = new Map<string, Tensor>();
      for (const info of header.tensors) out.set(info.name, readOne(path, fd, header.dataOffset, info, options));
      const after = versionOf(fd);
      if (after !== before) fail(path, `the file changed while it was loaded (${before} when opened, ${after} after reading)`);
      return out;
    });
    return { tensors, metadata: header.metadata };
  } finally {
    closeSync(fd);
  }
}

/** Reads one tensor's bytes into a new CPU tensor, then casts and moves it as the options ask. */
function readOne(path: string, fd: number, dataOffset: number, info: SafetensorsTensorInfo, options: LoadSafetensorsOptions): Tensor {
  let t: Tensor;
  try {
    t = native.readTensor(fd, dataOffset + info.begin, dtypeCode(info.dtype), info.shape) as unknown as Tensor;
  } catch (e) {
    fail(path, `tensor ${short(info.name)}: ${(e as Error).message}`);
  }
  const { device, dtype } = options;
  const castTo = dtype !== undefined && dtype !== info.dtype && isFloatingPoint(info.dtype) ? dtype : undefined;
  const moveTo = device !== undefined && device !== 'cpu' ? device : undefined;
  if (castTo === undefined && moveTo === undefined) return t;
  const converted = t.to({ dtype: castTo, device: moveTo });
  t.dispose(); // free the file's copy now, not at the end of the load
  return converted;
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
 * the CPU as contiguous data while writing. The file is written to a new private `<path>.tmp-<pid>-<random>`,
 * fsynced and renamed over `path`: on any failure an existing file at `path` is left as it was and no
 * temporary file remains. Something other than a regular file at `path` (a symlink, a device, a FIFO, a
 * directory) is refused and left alone. An existing file keeps its permission bits.
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
    checkOutputTarget(path, 'file', 'output file');
  } catch (e) {
    fail(path, `cannot save: ${withoutPath(path, (e as Error).message)}`);
  }
  try {
    native.writeFileAtomic(path, header, handles, outputMode(path));
  } catch (e) {
    fail(path, `cannot save: ${(e as Error).message}`);
  }
}
