// TensorBoard event files: CRC32C/masking vectors, a write/read round trip through the TFRecord framing and
// hand-encoded protobuf, byte-level checks of the encoding, corruption detection and distinct file names.
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  TensorBoardWriter, crc32c, encodeEvent, maskCrc32c, readTensorBoardEvents,
} from '../lib/logging/tensorboard.js';

let dir: string;
beforeAll(() => { dir = mkdtempSync(join(tmpdir(), 'difflora-tb-')); });
afterAll(() => { rmSync(dir, { recursive: true, force: true }); });

const escapeRe = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

describe('crc32c', () => {
  it('matches the standard check value and RFC 3720 vectors', () => {
    expect(crc32c('123456789')).toBe(0xe3069283);
    expect(crc32c(new Uint8Array(0))).toBe(0);
    expect(crc32c(new Uint8Array(32))).toBe(0x8a9136aa);
    expect(crc32c(new Uint8Array(32).fill(0xff))).toBe(0x62a8ab43);
    expect(crc32c(Uint8Array.from({ length: 32 }, (_, i) => i))).toBe(0x46dd794e);
  });

  it('masks as rotr15 + 0xa282ead8 mod 2^32', () => {
    expect(maskCrc32c(0)).toBe(0xa282ead8);
    // rotr15(0x12345678) = 0xacf02468; + 0xa282ead8 = 0x1_4f73_0f40 -> 0x4f730f40.
    expect(maskCrc32c(0x12345678)).toBe(0x4f730f40);
    // Independent BigInt reference over a few values, including ones with the top bit set.
    for (const c of [0xe3069283, 0xffffffff, 1, 0x80000000]) {
      const b = BigInt(c);
      const rot = ((b >> 15n) | (b << 17n)) & 0xffffffffn;
      expect(maskCrc32c(c)).toBe(Number((rot + 0xa282ead8n) & 0xffffffffn));
    }
  });
});

describe('event encoding', () => {
  it('encodes an Event by hand-checkable bytes', () => {
    const bytes = encodeEvent({ wallTime: 1.5, step: 300n, scalars: [{ tag: 'a', value: 2 }] });
    const wall = Buffer.alloc(8); wall.writeDoubleLE(1.5);
    const val = Buffer.alloc(4); val.writeFloatLE(2);
    const expected = Buffer.concat([
      Buffer.from([0x09]), wall, // wall_time: field 1, fixed64
      Buffer.from([0x10, 0xac, 0x02]), // step: field 2, varint 300
      Buffer.from([0x2a, 0x0a, 0x0a, 0x08, 0x0a, 0x01, 0x61, 0x15]), val, // summary{value{tag 'a', simple_value}}
    ]);
    expect(bytes.equals(expected)).toBe(true);
  });
});

describe('TensorBoardWriter', () => {
  const points: [string, number, number][] = [
    ['loss', 0.693147, 0],
    ['lr', 1e-4, 0],
    ['loss', 0.5, 1],
    ['loss', 0.125, 150],
    ['lr', 3.3e-5, 150],
    ['loss', -2.75e10, 2 ** 40],
    ['loss/val', 0.1, 2 ** 40 + 1],
  ];

  it('writes a file TensorBoard reads back: name, file_version, tags, values, steps, wall_time', () => {
    const logDir = join(dir, 'run', 'nested'); // created recursively
    const before = Date.now() / 1000;
    const w = new TensorBoardWriter(logDir);
    for (const [tag, value, step] of points) w.addScalar(tag, value, step);
    w.flush();
    w.close();
    const after = Date.now() / 1000;

    const files = readdirSync(logDir);
    expect(files).toEqual([basename(w.path)]);
    const m = new RegExp(`^events\\.out\\.tfevents\\.(\\d+)\\.${escapeRe(hostname())}\\.${process.pid}\\.(\\d+)$`)
      .exec(files[0]!);
    expect(m).not.toBeNull();
    const secs = Number(m![1]);
    expect(secs).toBeGreaterThanOrEqual(Math.floor(before));
    expect(secs).toBeLessThanOrEqual(Math.ceil(after));

    const events = readTensorBoardEvents(w.path);
    expect(events).toHaveLength(1 + points.length);
    expect(events[0]!.fileVersion).toBe('brain.Event:2');
    expect(events[0]!.scalars).toEqual([]);
    for (const e of events) {
      expect(e.wallTime).toBeGreaterThanOrEqual(before - 1e-3);
      expect(e.wallTime).toBeLessThanOrEqual(after + 1e-3);
    }
    events.slice(1).forEach((e, i) => {
      const [tag, value, step] = points[i]!;
      expect(e.fileVersion).toBeUndefined();
      expect(e.step).toBe(step);
      expect(e.scalars).toEqual([{ tag, value: Math.fround(value) }]);
    });
  });

  it('accepts bigint steps and an explicit wall time; rejects bad steps and writes after close', () => {
    const w = new TensorBoardWriter(join(dir, 'bigint'));
    w.addScalar('x', 1, 2n ** 50n, 1234.25);
    expect(() => w.addScalar('x', 1, 1.5)).toThrow(/integer/);
    expect(() => w.addScalar('x', 1, 2n ** 63n)).toThrow(/int64/);
    w.close();
    w.close(); // idempotent
    expect(() => w.addScalar('x', 1, 1)).toThrow(/closed/);
    const events = readTensorBoardEvents(w.path);
    expect(events).toHaveLength(2);
    expect(events[1]).toEqual({ wallTime: 1234.25, step: 2 ** 50, scalars: [{ tag: 'x', value: 1 }], images: [] });
  });

  it('writes each event immediately (readable before flush/close)', () => {
    const w = new TensorBoardWriter(join(dir, 'live'));
    w.addScalar('loss', 0.25, 7);
    const events = readTensorBoardEvents(w.path);
    expect(events.map((e) => e.step)).toEqual([0, 7]);
    w.close();
  });

  it('throws naming the record when a byte is corrupted', () => {
    const w = new TensorBoardWriter(join(dir, 'corrupt'));
    w.addScalar('loss', 1, 1);
    w.addScalar('loss', 2, 2);
    w.close();
    const good = readFileSync(w.path);
    const sizes = readTensorBoardEvents(w.path).length;
    expect(sizes).toBe(3);
    // Record 0 (file_version): length L0; record 1 starts at 16 + L0.
    const l0 = Number(good.readBigUInt64LE(0));
    const r1 = 16 + l0;
    const l1 = Number(good.readBigUInt64LE(r1));

    const dataByte = Buffer.from(good); dataByte[r1 + 12 + Math.floor(l1 / 2)]! ^= 0x01;
    writeFileSync(w.path, dataByte);
    expect(() => readTensorBoardEvents(w.path)).toThrow(/record 1: data CRC mismatch/);

    const lenByte = Buffer.from(good); lenByte[r1]! ^= 0x04;
    writeFileSync(w.path, lenByte);
    expect(() => readTensorBoardEvents(w.path)).toThrow(/record 1: length CRC mismatch/);

    const crcByte = Buffer.from(good); crcByte[good.length - 1]! ^= 0x80; // last record's data CRC
    writeFileSync(w.path, crcByte);
    expect(() => readTensorBoardEvents(w.path)).toThrow(/record 2: data CRC mismatch/);

    writeFileSync(w.path, good.subarray(0, good.length - 3));
    expect(() => readTensorBoardEvents(w.path)).toThrow(/record 2: truncated/);
  });

  it('writes PNG image summaries (Summary.Image) that read back byte for byte', () => {
    const w = new TensorBoardWriter(join(dir, 'images'));
    // a 1×1 PNG is enough: the writer stores the encoded bytes
    const png = Buffer.from('89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc0000003010100c9fe92ef0000000049454e44ae426082', 'hex');
    w.addImagePng('validation', png, { height: 1, width: 1 }, 3);
    expect(() => w.addImagePng('bad', Buffer.from('not a png'), { height: 1, width: 1 }, 3)).toThrow(/not a PNG/);
    w.close();
    const events = readTensorBoardEvents(w.path);
    expect(events[1]!.step).toBe(3);
    expect(events[1]!.scalars).toEqual([]);
    expect(events[1]!.images).toEqual([{ tag: 'validation', height: 1, width: 1, colorspace: 3, png }]);
  });

  it('gives two writers in one directory distinct files', () => {
    const logDir = join(dir, 'two');
    const a = new TensorBoardWriter(logDir);
    const b = new TensorBoardWriter(logDir);
    expect(a.path).not.toBe(b.path);
    a.addScalar('a', 1, 1);
    b.addScalar('b', 2, 1);
    a.close();
    b.close();
    expect(readdirSync(logDir).sort()).toEqual([basename(a.path), basename(b.path)].sort());
    expect(readTensorBoardEvents(a.path)[1]!.scalars).toEqual([{ tag: 'a', value: 1 }]);
    expect(readTensorBoardEvents(b.path)[1]!.scalars).toEqual([{ tag: 'b', value: 2 }]);
  });
});
