// TensorBoard scalar and image logging with no dependencies: a hand-rolled protobuf encoder for tensorflow.Event /
// Summary, written as TFRecord frames (length + masked CRC32C, data + masked CRC32C), one synchronous append
// per event so a crash loses nothing already logged. readTensorBoardEvents parses such files back and verifies
// every CRC.
import { closeSync, fsyncSync, mkdirSync, openSync, readFileSync, writeSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';

// ---------------------------------------------------------------------------------------------------------
// CRC32C (Castagnoli), reflected polynomial 0x82F63B78, and TFRecord masking.

const CRC32C_TABLE: Uint32Array = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

/** CRC32C of `data` (a string is hashed as its UTF-8 bytes), as an unsigned 32-bit number. */
export function crc32c(data: Uint8Array | string): number {
  const bytes = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
  let crc = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) {
    crc = CRC32C_TABLE[(crc ^ bytes[i]!) & 0xff]! ^ (crc >>> 8);
  }
  return (crc ^ 0xffffffff) >>> 0;
}

/** TFRecord's masked CRC: rotate right by 15 and add 0xa282ead8, mod 2^32. */
export function maskCrc32c(crc: number): number {
  return ((((crc >>> 15) | (crc << 17)) >>> 0) + 0xa282ead8) >>> 0;
}

/** Frames one record: uint64 LE length, masked CRC of those 8 bytes, the data, masked CRC of the data. */
export function encodeTfRecord(data: Uint8Array): Buffer {
  const out = Buffer.alloc(8 + 4 + data.length + 4);
  out.writeBigUInt64LE(BigInt(data.length), 0);
  out.writeUInt32LE(maskCrc32c(crc32c(out.subarray(0, 8))), 8);
  out.set(data, 12);
  out.writeUInt32LE(maskCrc32c(crc32c(data)), 12 + data.length);
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Minimal protobuf encoding.

const WIRE_VARINT = 0;
const WIRE_FIXED64 = 1;
const WIRE_LEN = 2;
const WIRE_FIXED32 = 5;

function varint(value: bigint): Buffer {
  // int64 semantics: negatives are sent as their 64-bit two's complement (10 bytes).
  let v = BigInt.asUintN(64, value);
  const bytes: number[] = [];
  while (v >= 0x80n) {
    bytes.push(Number(v & 0x7fn) | 0x80);
    v >>= 7n;
  }
  bytes.push(Number(v));
  return Buffer.from(bytes);
}

const key = (field: number, wire: number): Buffer => varint(BigInt((field << 3) | wire));

function lenField(field: number, payload: Uint8Array): Buffer {
  return Buffer.concat([key(field, WIRE_LEN), varint(BigInt(payload.length)), payload]);
}

function doubleField(field: number, value: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeDoubleLE(value, 0);
  return Buffer.concat([key(field, WIRE_FIXED64), b]);
}

function floatField(field: number, value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeFloatLE(value, 0);
  return Buffer.concat([key(field, WIRE_FIXED32), b]);
}

interface EventFields {
  wallTime: number;
  step?: bigint;
  fileVersion?: string;
  scalars?: readonly { tag: string; value: number }[];
  images?: readonly TensorBoardImage[];
}

/** An image summary: an encoded PNG and its size (TensorBoard's Summary.Image). */
export interface TensorBoardImage { tag: string; height: number; width: number; colorspace: number; png: Buffer }

function varintField(field: number, value: number): Buffer {
  return Buffer.concat([key(field, WIRE_VARINT), varint(BigInt(value))]);
}

/** tensorflow.Event: wall_time = 1 (double), step = 2 (int64), file_version = 3 (string), summary = 5. */
export function encodeEvent(e: EventFields): Buffer {
  const parts: Buffer[] = [doubleField(1, e.wallTime)];
  if (e.step !== undefined && e.step !== 0n) parts.push(key(2, WIRE_VARINT), varint(e.step));
  if (e.fileVersion !== undefined) parts.push(lenField(3, Buffer.from(e.fileVersion, 'utf8')));
  if (e.scalars !== undefined && e.scalars.length > 0) {
    // Summary { repeated Value value = 1 }, Value { string tag = 1; float simple_value = 2 }.
    const values = e.scalars.map((s) =>
      lenField(1, Buffer.concat([lenField(1, Buffer.from(s.tag, 'utf8')), floatField(2, s.value)])));
    parts.push(lenField(5, Buffer.concat(values)));
  }
  if (e.images !== undefined && e.images.length > 0) {
    // Value { string tag = 1; Image image = 4 }, Image { int32 height = 1; int32 width = 2; int32 colorspace = 3; bytes encoded_image_string = 4 }.
    const values = e.images.map((im) => lenField(1, Buffer.concat([
      lenField(1, Buffer.from(im.tag, 'utf8')),
      lenField(4, Buffer.concat([varintField(1, im.height), varintField(2, im.width), varintField(3, im.colorspace), lenField(4, im.png)])),
    ])));
    parts.push(lenField(5, Buffer.concat(values)));
  }
  return Buffer.concat(parts);
}

// ---------------------------------------------------------------------------------------------------------
// Writer.

let writerCounter = 0;

function toStep(step: number | bigint): bigint {
  if (typeof step === 'bigint') {
    if (step < -(2n ** 63n) || step >= 2n ** 63n) throw new RangeError(`step ${step} does not fit in int64`);
    return step;
  }
  if (!Number.isSafeInteger(step)) throw new RangeError(`step must be a safe integer, got ${step}`);
  return BigInt(step);
}

/**
 * Appends TensorBoard events to `<logDir>/events.out.tfevents.<unix seconds>.<hostname>.<pid>.<n>`, where n
 * counts the writers opened by this process (starting at 0), so several writers never share a file.
 */
export class TensorBoardWriter {
  readonly logDir: string;
  readonly path: string;
  private fd: number | null;

  constructor(logDir: string) {
    this.logDir = logDir;
    mkdirSync(logDir, { recursive: true });
    const seconds = Math.floor(Date.now() / 1000);
    const host = hostname();
    // 'wx' refuses an existing file; on a clash (another process reusing our pid, say) take the next number.
    for (;;) {
      const path = join(logDir, `events.out.tfevents.${seconds}.${host}.${process.pid}.${writerCounter++}`);
      try {
        this.fd = openSync(path, 'wx');
        this.path = path;
        break;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      }
    }
    this.writeEvent({ wallTime: Date.now() / 1000, fileVersion: 'brain.Event:2' });
  }

  /** Logs one scalar (stored as float32) at an integer step; `wallTime` in seconds defaults to now. */
  addScalar(tag: string, value: number, step: number | bigint, wallTime: number = Date.now() / 1000): void {
    if (typeof tag !== 'string' || tag.length === 0) throw new TypeError('addScalar: tag must be a non-empty string');
    if (typeof value !== 'number') throw new TypeError(`addScalar: value for '${tag}' must be a number`);
    this.writeEvent({ wallTime, step: toStep(step), scalars: [{ tag, value }] });
  }

  /**
   * Logs a PNG as an image summary (what SummaryWriter.add_image(s) writes: TensorBoard's Images tab).
   * `height`/`width` are the PNG's; colorspace 3 = RGB, 4 = RGBA.
   */
  addImagePng(tag: string, png: Buffer, size: { height: number; width: number; channels?: number }, step: number | bigint, wallTime: number = Date.now() / 1000): void {
    if (typeof tag !== 'string' || tag.length === 0) throw new TypeError('addImagePng: tag must be a non-empty string');
    if (png.subarray(0, 8).toString('latin1') !== '\x89PNG\r\n\x1a\n') throw new TypeError(`addImagePng: '${tag}' is not a PNG`);
    this.writeEvent({ wallTime, step: toStep(step), images: [{ tag, height: size.height, width: size.width, colorspace: size.channels ?? 3, png }] });
  }

  /** Forces what has been written to disk. */
  flush(): void {
    fsyncSync(this.openFd());
  }

  /** Flushes and closes the file; further writes throw. Closing twice is a no-op. */
  close(): void {
    if (this.fd === null) return;
    const fd = this.fd;
    this.fd = null;
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  }

  private openFd(): number {
    if (this.fd === null) throw new Error(`TensorBoardWriter: ${this.path} is closed`);
    return this.fd;
  }

  private writeEvent(e: EventFields): void {
    const fd = this.openFd();
    const record = encodeTfRecord(encodeEvent(e));
    let off = 0;
    while (off < record.length) off += writeSync(fd, record, off, record.length - off);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Reader.

export interface TensorBoardEvent {
  wallTime: number;
  step: number;
  fileVersion?: string;
  scalars: { tag: string; value: number }[];
  images: TensorBoardImage[];
}

class ProtoReader {
  pos = 0;
  constructor(readonly buf: Buffer, readonly what: string) {}

  get done(): boolean { return this.pos >= this.buf.length; }

  private need(n: number): void {
    if (this.pos + n > this.buf.length) throw new Error(`${this.what}: truncated protobuf`);
  }

  varint(): bigint {
    let result = 0n;
    for (let shift = 0n; shift < 70n; shift += 7n) {
      this.need(1);
      const b = this.buf[this.pos++]!;
      result |= BigInt(b & 0x7f) << shift;
      if ((b & 0x80) === 0) return result;
    }
    throw new Error(`${this.what}: malformed varint`);
  }

  bytes(): Buffer {
    const n = Number(this.varint());
    this.need(n);
    const out = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }

  fixed(n: 4 | 8): Buffer {
    this.need(n);
    const out = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }

  skip(wire: number): void {
    if (wire === WIRE_VARINT) this.varint();
    else if (wire === WIRE_FIXED64) this.fixed(8);
    else if (wire === WIRE_LEN) this.bytes();
    else if (wire === WIRE_FIXED32) this.fixed(4);
    else throw new Error(`${this.what}: unsupported wire type ${wire}`);
  }
}

function decodeImage(data: Buffer, what: string): Omit<TensorBoardImage, 'tag'> {
  const r = new ProtoReader(data, what);
  const im = { height: 0, width: 0, colorspace: 0, png: Buffer.alloc(0) };
  while (!r.done) {
    const k = Number(r.varint());
    const field = k >>> 3;
    if (field >= 1 && field <= 3 && (k & 7) === WIRE_VARINT) im[(['height', 'width', 'colorspace'] as const)[field - 1]!] = Number(r.varint());
    else if (field === 4 && (k & 7) === WIRE_LEN) im.png = Buffer.from(r.bytes());
    else r.skip(k & 7);
  }
  return im;
}

function decodeEvent(data: Buffer, what: string): TensorBoardEvent {
  const r = new ProtoReader(data, what);
  const event: TensorBoardEvent = { wallTime: 0, step: 0, scalars: [], images: [] };
  while (!r.done) {
    const k = Number(r.varint());
    const field = k >>> 3;
    const wire = k & 7;
    if (field === 1 && wire === WIRE_FIXED64) event.wallTime = r.fixed(8).readDoubleLE(0);
    else if (field === 2 && wire === WIRE_VARINT) event.step = Number(BigInt.asIntN(64, r.varint()));
    else if (field === 3 && wire === WIRE_LEN) event.fileVersion = r.bytes().toString('utf8');
    else if (field === 5 && wire === WIRE_LEN) {
      const s = new ProtoReader(r.bytes(), what);
      while (!s.done) {
        const sk = Number(s.varint());
        if (sk >>> 3 !== 1 || (sk & 7) !== WIRE_LEN) { s.skip(sk & 7); continue; }
        const v = new ProtoReader(s.bytes(), what);
        let tag = '';
        let value: number | undefined;
        let image: Omit<TensorBoardImage, 'tag'> | undefined;
        while (!v.done) {
          const vk = Number(v.varint());
          if (vk >>> 3 === 1 && (vk & 7) === WIRE_LEN) tag = v.bytes().toString('utf8');
          else if (vk >>> 3 === 2 && (vk & 7) === WIRE_FIXED32) value = v.fixed(4).readFloatLE(0);
          else if (vk >>> 3 === 4 && (vk & 7) === WIRE_LEN) image = decodeImage(v.bytes(), what);
          else v.skip(vk & 7);
        }
        // Values without simple_value or image (histograms, ...) are skipped.
        if (value !== undefined) event.scalars.push({ tag, value });
        if (image !== undefined) event.images.push({ tag, ...image });
      }
    } else r.skip(wire);
  }
  return event;
}

/**
 * Reads a TensorBoard event file, verifying both masked CRC32Cs of every TFRecord; throws naming the record
 * index on a CRC mismatch, a truncated record or malformed protobuf.
 */
export function readTensorBoardEvents(path: string): TensorBoardEvent[] {
  const buf = readFileSync(path);
  const events: TensorBoardEvent[] = [];
  let off = 0;
  for (let index = 0; off < buf.length; index++) {
    const what = `${path}: record ${index}`;
    if (off + 12 > buf.length) throw new Error(`${what}: truncated header`);
    const lenBytes = buf.subarray(off, off + 8);
    if (buf.readUInt32LE(off + 8) !== maskCrc32c(crc32c(lenBytes))) throw new Error(`${what}: length CRC mismatch`);
    const len = buf.readBigUInt64LE(off);
    if (len > BigInt(buf.length - off - 16)) throw new Error(`${what}: truncated data (length ${len})`);
    const n = Number(len);
    const data = buf.subarray(off + 12, off + 12 + n);
    if (buf.readUInt32LE(off + 12 + n) !== maskCrc32c(crc32c(data))) throw new Error(`${what}: data CRC mismatch`);
    events.push(decodeEvent(data, what));
    off += 16 + n;
  }
  return events;
}
