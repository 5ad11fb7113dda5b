// safetensors I/O: bit-exact round trips, the real fixtures, rejection of malformed files (and of FIFOs and
// devices, without blocking), atomic saves that never replace what is not a regular file, a by-hand check of
// the written bytes, and loads that own their memory and fail cleanly when the file changes under them.
import { execFileSync, spawnSync } from 'node:child_process';
import {
  chmodSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, renameSync, rmSync, statSync,
  symlinkSync, truncateSync, utimesSync, writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  MAX_HEADER_BYTES, MAX_TENSORS, loadSafetensors, readSafetensorsHeader, saveSafetensors,
} from '../lib/io/safetensors.js';
import { native } from '../lib/native.js';
import { dispose, memory, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { repoRoot } from './cli_helpers.js';
import { bitEqual, fixtures } from './helpers.js';

let dir: string;
beforeAll(() => { dir = mkdtempSync(join(tmpdir(), 'difflora-st-')); });
afterAll(() => { rmSync(dir, { recursive: true, force: true }); });

const bytesOf = (t: Tensor): Uint8Array => new Uint8Array(t._toBuffer());
const tempFiles = (d: string): string[] => readdirSync(d).filter((f) => f.includes('.tmp-'));

/** Every supported dtype, with edge values given as raw bits where the dtype has no JS array. */
function allDtypes(): Map<string, Tensor> {
  const m = new Map<string, Tensor>();
  m.set('f64', torch.tensor(new Float64Array([1.5, -0, NaN, Infinity, -Infinity, 5e-324, 1.7976931348623157e308]), { shape: [7] }));
  m.set('f32', torch.tensor(new Float32Array([0.1, -0, NaN, Infinity, 1e-45, 3.4028234e38]), { shape: [2, 3] }));
  m.set('f16', torch.tensor(new Uint16Array([0x0000, 0x8000, 0x3c00, 0x7c00, 0xfc00, 0x7e01, 0x0001, 0x7bff]), { dtype: 'float16', shape: [2, 2, 2] }));
  m.set('bf16', torch.tensor(new Uint16Array([0x3f80, 0x8000, 0x7f80, 0x7fc1, 0x0001, 0x7f7f]), { dtype: 'bfloat16', shape: [3, 2] }));
  m.set('i64', torch.tensor(new BigInt64Array([-(2n ** 63n), 2n ** 63n - 1n, 0n, -1n, 2n ** 53n + 1n]), { shape: [5] }));
  m.set('i32', torch.tensor(new Int32Array([-(2 ** 31), 2 ** 31 - 1, 0, 7])));
  m.set('i16', torch.tensor(new Int16Array([-32768, 32767, 1])));
  m.set('i8', torch.tensor(new Int8Array([-128, 127, 0])));
  m.set('u8', torch.tensor(new Uint8Array([0, 255, 17])));
  m.set('bool', torch.tensor(new Uint8Array([1, 0, 0, 1, 1]), { dtype: 'bool' }));
  m.set('scalar', torch.scalarTensor(3.25)); // 0-dim
  m.set('empty', torch.zeros([0, 3]));
  m.set('empty_i64', torch.zeros([2, 0], { dtype: 'int64' }));
  return m;
}

describe('round trip', () => {
  it('is bit-exact for every dtype, 0-dim and zero-size tensors, keeping metadata and key order', () => {
    tidy(() => {
      const src = allDtypes();
      // Names out of alphabetical order, including integer-like ones a plain object would reorder.
      const named = new Map<string, Tensor>();
      const order = ['z.last', '10', '2', 'a.first', 'ünï/cødé ✓', ...src.keys()];
      const values = [...src.values()];
      order.forEach((name, i) => named.set(name, values[i % values.length]!));
      const metadata = { format: 'pt', note: 'ünïcode ✓ "quoted" \\ slash', '': 'empty key' };
      const path = join(dir, 'all.safetensors');
      saveSafetensors(path, named, metadata);

      const loaded = loadSafetensors(path);
      expect([...loaded.tensors.keys()]).toEqual(order);
      expect(loaded.metadata).toEqual(metadata);
      for (const [name, t] of named) {
        const u = loaded.tensors.get(name)!;
        expect(u.dtype, name).toBe(t.dtype);
        expect(u.shape, name).toEqual(t.shape);
        expect(u.device).toBe('cpu');
        expect(bitEqual(u, t), name).toBe(true);
      }
      // The header alone, without data: same names, dtypes, shapes, and data packed in insertion order.
      const h = readSafetensorsHeader(path);
      expect(h.tensors.map((t) => t.name)).toEqual(order);
      expect(h.headerSize % 8).toBe(0);
      let offset = 0;
      for (const info of h.tensors) {
        const t = named.get(info.name)!;
        expect(info.dtype).toBe(t.dtype);
        expect(info.shape).toEqual(t.shape);
        expect(info.begin).toBe(offset);
        offset = info.end;
      }
      expect(h.dataOffset + offset).toBe(statSync(path).size);
    });
  });

  it('accepts a plain object, writes no __metadata__ without metadata, and saves non-contiguous tensors contiguously', () => {
    tidy(() => {
      const base = torch.arange(0, 12, 1, { dtype: 'float32' }).reshape(3, 4);
      const path = join(dir, 'record.safetensors');
      saveSafetensors(path, { transposed: base.t(), sliced: base.slice(1, 1, 3) });
      const { tensors, metadata } = loadSafetensors(path);
      expect(metadata).toEqual({});
      expect(readFileSync(path).toString('utf8', 8, 40)).not.toContain('__metadata__');
      expect([...tensors.keys()]).toEqual(['transposed', 'sliced']);
      expect(tensors.get('transposed')!.tolist()).toEqual(base.t().tolist());
      expect(tensors.get('sliced')!.tolist()).toEqual([[1, 2], [5, 6], [9, 10]]);
    });
  });

  it('casts floating-point tensors with the dtype option, leaving integer and bool tensors alone', () => {
    tidy(() => {
      const path = join(dir, 'cast.safetensors');
      const f = torch.randn([4, 5]);
      saveSafetensors(path, { f, i: torch.arange(5), b: torch.tensor([true, false]) });
      const { tensors } = loadSafetensors(path, { dtype: 'float16' });
      expect(tensors.get('f')!.dtype).toBe('float16');
      expect(bitEqual(tensors.get('f')!, f.half())).toBe(true);
      expect(tensors.get('i')!.dtype).toBe('int64');
      expect(tensors.get('b')!.dtype).toBe('bool');
    });
  });

  // CUDA loading and saving is checked on a GPU machine by bench/gpu/check.mjs (CI has no GPU).

  it('creates loaded tensors in the caller scope like any other tensor', () => {
    const path = join(dir, 'scope.safetensors');
    tidy(() => saveSafetensors(path, { a: torch.ones([3]), b: torch.zeros([2]) }));
    const base = memory().numTensors;
    const kept = tidy(() => {
      const { tensors } = loadSafetensors(path);
      expect(memory().numTensors).toBe(base + 2);
      return tensors.get('a')!;
    });
    expect(memory().numTensors).toBe(base + 1); // 'b' was disposed with the scope
    expect(kept.tolist()).toEqual([1, 1, 1]);
    kept.dispose();
    // With a conversion, the intermediate views are released too.
    tidy(() => { loadSafetensors(path, { dtype: 'float64' }); });
    expect(memory().numTensors).toBe(base);
  });
});

describe('real files', () => {
  it('reads the tiny-sd UNet written by diffusers', () => {
    tidy(() => {
      const path = join(fixtures, 'tiny-sd/unet/diffusion_pytorch_model.safetensors');
      const { tensors, metadata } = loadSafetensors(path);
      expect(metadata).toEqual({ format: 'pt' });
      expect(tensors.size).toBe(304);
      // pipelines-params.json: the tiny-sd UNet has 1,106,212 parameters (fp32).
      let numel = 0;
      for (const t of tensors.values()) { numel += t.numel(); expect(t.dtype).toBe('float32'); }
      expect(numel).toBe(1106212);
      // config.json: in_channels 4, block_out_channels [32, 64], out_channels 4.
      expect(tensors.get('conv_in.weight')!.shape).toEqual([32, 4, 3, 3]);
      expect(tensors.get('conv_out.weight')!.shape).toEqual([4, 32, 3, 3]);
      // Key order and values against the raw file, read by hand.
      const raw = readFileSync(path);
      const n = Number(raw.readBigUInt64LE(0));
      const header = JSON.parse(raw.toString('utf8', 8, 8 + n)) as Record<string, { data_offsets: [number, number] }>;
      expect([...tensors.keys()]).toEqual(Object.keys(header).filter((k) => k !== '__metadata__'));
      for (const name of ['conv_in.weight', 'mid_block.attentions.0.proj_out.bias', 'up_blocks.1.resnets.2.conv2.weight']) {
        const [b, e] = header[name]!.data_offsets;
        expect(Buffer.from(bytesOf(tensors.get(name)!)).equals(raw.subarray(8 + n + b, 8 + n + e)), name).toBe(true);
      }
      expect(tensors.get('conv_in.weight')!.abs().sum().item()).toBeGreaterThan(0);
    });
  });

  it('reads the diffusers LoRA golden: keys, order, shapes, dtypes, metadata and values', () => {
    tidy(() => {
      const desc = JSON.parse(readFileSync(join(fixtures, 'goldens/lora-diffusers.json'), 'utf8')) as {
        num_keys: number; keys_in_file_order: string[]; shapes: Record<string, number[]>; dtypes: Record<string, string>;
        safetensors_metadata: Record<string, string>; peft_name_to_file_key: Record<string, string>;
      };
      const { tensors, metadata } = loadSafetensors(join(fixtures, 'goldens/lora-diffusers/pytorch_lora_weights.safetensors'));
      expect(metadata).toEqual({ format: 'pt' });
      expect(metadata).toEqual(desc.safetensors_metadata);
      expect(tensors.size).toBe(96);
      expect(tensors.size).toBe(desc.num_keys);
      expect([...tensors.keys()]).toEqual(desc.keys_in_file_order);
      for (const [name, t] of tensors) {
        expect(t.shape, name).toEqual(desc.shapes[name]);
        expect(t.dtype, name).toBe(desc.dtypes[name]);
      }
      // The file carries lora_train's lora_init values (written by a different writer): same bits.
      const train = loadSafetensors(join(fixtures, 'goldens/lora_train.safetensors')).tensors;
      for (const [peft, key] of Object.entries(desc.peft_name_to_file_key)) {
        expect(bitEqual(tensors.get(key)!, train.get(`lora_init/${peft}`)!), key).toBe(true);
      }
    });
  });
});

describe('malformed files', () => {
  /** Writes length prefix + header + data; `length` overrides the prefix. */
  function craft(name: string, header: string | Uint8Array, data: Uint8Array = new Uint8Array(0), length?: bigint): string {
    const h = typeof header === 'string' ? Buffer.from(header, 'utf8') : Buffer.from(header);
    const prefix = Buffer.alloc(8);
    prefix.writeBigUInt64LE(length ?? BigInt(h.length));
    const path = join(dir, `${name}.safetensors`);
    writeFileSync(path, Buffer.concat([prefix, h, data]));
    return path;
  }
  const entry = (dtype: string, shape: unknown, offsets: unknown): string =>
    JSON.stringify({ dtype, shape, data_offsets: offsets });
  const bytes = (n: number): Uint8Array => new Uint8Array(n).fill(7);

  function rejects(path: string, message: RegExp): void {
    const base = memory().numTensors;
    for (const read of [() => loadSafetensors(path), () => readSafetensorsHeader(path)]) {
      let err: unknown;
      try { read(); } catch (e) { err = e; }
      expect(err, path).toBeInstanceOf(Error);
      const msg = (err as Error).message;
      expect(msg.startsWith(`safetensors: ${path}: `), msg).toBe(true);
      expect(msg).toMatch(message);
    }
    expect(memory().numTensors).toBe(base); // nothing was mapped
  }

  it('rejects files too short for the length prefix', () => {
    const empty = join(dir, 'empty.safetensors');
    writeFileSync(empty, '');
    rejects(empty, /file is 0 bytes, shorter than the 8-byte header length/);
    const short = join(dir, 'short.safetensors');
    writeFileSync(short, Buffer.from([2, 0, 0, 0, 0]));
    rejects(short, /file is 5 bytes, shorter than the 8-byte header length/);
  });

  it('rejects header lengths over the cap or past the end of the file', () => {
    rejects(craft('huge', '{}', undefined, BigInt(MAX_HEADER_BYTES) + 1n), /header length 100000001 exceeds the 100000000-byte limit/);
    rejects(craft('huge64', '{}', undefined, 2n ** 64n - 1n), /exceeds the 100000000-byte limit/);
    rejects(craft('past', '{}', undefined, 3n), /header length 3 runs past the end of the file \(10 bytes\)/);
  });

  it('rejects headers that are not UTF-8 JSON objects', () => {
    rejects(craft('utf8', new Uint8Array([0x7b, 0x22, 0xff, 0xfe, 0x22, 0x3a, 0x31, 0x7d])), /header is not valid UTF-8/);
    rejects(craft('json', '{"a": {"dtype": "F32",'), /header is not valid JSON/);
    rejects(craft('bom', '\ufeff{}'), /header is not valid JSON/);
    rejects(craft('array', '[1, 2]'), /header must be a JSON object, got an array/);
    rejects(craft('string', '"x"'), /header must be a JSON object, got the string "x"/);
    rejects(craft('zero', ''), /header is not valid JSON/);
  });

  it('rejects __metadata__ that is not a string to string map', () => {
    rejects(craft('meta-num', '{"__metadata__":{"format":"pt","epoch":3}}'), /__metadata__ must map strings to strings: key "epoch" holds number 3/);
    rejects(craft('meta-arr', '{"__metadata__":["pt"]}'), /__metadata__ must be an object mapping strings to strings, got an array/);
    rejects(craft('meta-nested', '{"__metadata__":{"a":{"b":"c"}}}'), /key "a" holds an object/);
  });

  it('rejects unknown and unsupported dtypes', () => {
    rejects(craft('dtype-unknown', `{"w":${entry('F128', [1], [0, 16])}}`, bytes(16)), /tensor "w": unknown dtype "F128"/);
    rejects(craft('dtype-u32', `{"w":${entry('U32', [1], [0, 4])}}`, bytes(4)), /tensor "w": unsupported dtype "U32"/);
    rejects(craft('dtype-lower', `{"w":${entry('f32', [1], [0, 4])}}`, bytes(4)), /unknown dtype "f32"/);
    rejects(craft('dtype-missing', '{"w":{"shape":[1],"data_offsets":[0,4]}}', bytes(4)), /tensor "w": dtype must be a string, got nothing/);
  });

  it('rejects bad shapes', () => {
    rejects(craft('shape-neg', `{"w":${entry('F32', [-1], [0, 4])}}`, bytes(4)), /tensor "w": shape must be an array of non-negative integers, got \[-1\]/);
    rejects(craft('shape-frac', `{"w":${entry('F32', [1.5], [0, 4])}}`, bytes(4)), /shape must be an array of non-negative integers/);
    rejects(craft('shape-str', `{"w":${entry('F32', ['2'], [0, 8])}}`, bytes(8)), /shape must be an array of non-negative integers/);
    rejects(craft('shape-long', `{"w":${entry('F32', Array(1000).fill(-1), [0, 4])}}`, bytes(4)), /got \[-1,-1,.*\.\.\.$/);
    rejects(craft('shape-missing', '{"w":{"dtype":"F32","data_offsets":[0,4]}}', bytes(4)), /shape must be an array of non-negative integers, got nothing/);
  });

  it('rejects bad data_offsets and sizes that do not match the shape', () => {
    rejects(craft('off-three', `{"w":${entry('F32', [1], [0, 4, 8])}}`, bytes(4)), /tensor "w": data_offsets must be two non-negative integers/);
    rejects(craft('off-neg', `{"w":${entry('F32', [1], [-4, 0])}}`, bytes(4)), /data_offsets must be two non-negative integers/);
    rejects(craft('off-order', `{"w":${entry('F32', [0], [8, 4])}}`, bytes(8)), /tensor "w": data_offsets \[8, 4\] have begin > end/);
    rejects(craft('size', `{"w":${entry('F32', [2, 3], [0, 20])}}`, bytes(20)), /tensor "w": data_offsets \[0, 20\] hold 20 bytes but shape \[2, 3\] of F32 needs 24/);
    // 968973220 × 19037413721 = 2^64 + 4: wraps to 4 in 64-bit arithmetic, so it must be computed exactly.
    rejects(craft('overflow', `{"w":${entry('U8', [968973220, 19037413721], [0, 4])}}`, bytes(4)), /hold 4 bytes but shape \[968973220, 19037413721\] of U8 needs 18446744073709551620$/);
  });

  it('rejects offsets outside the data section, overlaps, holes and trailing bytes', () => {
    rejects(craft('outside', `{"w":${entry('F32', [2], [0, 8])}}`, bytes(4)), /tensor "w": data_offsets \[0, 8\] run past the end of the data section \(4 bytes\)/);
    rejects(craft('overlap', `{"a":${entry('F32', [2], [0, 8])},"b":${entry('F32', [1], [4, 8])}}`, bytes(8)), /tensor "b" \[4, 8\] overlaps tensor "a" \[0, 8\]/);
    rejects(craft('hole', `{"a":${entry('F32', [1], [0, 4])},"b":${entry('F32', [1], [8, 12])}}`, bytes(12)), /the data section has a hole: bytes \[4, 8\) belong to no tensor/);
    rejects(craft('hole-start', `{"a":${entry('F32', [1], [4, 8])}}`, bytes(8)), /has a hole: bytes \[0, 4\)/);
    rejects(craft('trailing', `{"a":${entry('F32', [1], [0, 4])}}`, bytes(12)), /the data section has 8 trailing bytes that belong to no tensor/);
    rejects(craft('no-tensors-trailing', '{}', bytes(3)), /3 trailing bytes/);
  });

  it('rejects duplicate keys, which JSON.parse would silently collapse', () => {
    const a = entry('F32', [1], [0, 4]);
    rejects(craft('dup', `{"a":${a},"a":${a}}`, bytes(4)), /duplicate key "a" in the header/);
    rejects(craft('dup-escaped', `{"a":${a},"\\u0061":${a}}`, bytes(4)), /duplicate key "a" in the header/);
    rejects(craft('dup-meta', `{"__metadata__":{},"__metadata__":{"x":"y"}}`), /duplicate key "__metadata__" in the header/);
    rejects(craft('dup-field', '{"a":{"dtype":"F32","dtype":"F64","shape":[1],"data_offsets":[0,4]}}', bytes(4)), /duplicate key "dtype" in entry "a"/);
    rejects(craft('dup-metakey', '{"__metadata__":{"k":"1","k":"2"}}'), /duplicate key "k" in entry "__metadata__"/);
  });

  it('rejects entries that are not objects, and files that are missing or not regular files', () => {
    rejects(craft('entry-num', '{"w":3}'), /tensor "w": entry must be an object with dtype, shape and data_offsets, got number 3/);
    rejects(join(dir, 'does-not-exist.safetensors'), /: file not found$/);
    const sub = join(dir, 'a-directory');
    mkdirSync(sub, { recursive: true });
    rejects(sub, /: file is a directory, not a regular file$/);
  });

  it('refuses a FIFO or a device at once instead of blocking on it or reading it forever', () => {
    const fifo = join(dir, 'lora.fifo');
    execFileSync('mkfifo', [fifo]); // opening it for reading the usual way blocks until a writer comes
    rejects(fifo, /: file is a FIFO, not a regular file$/);
    rejects('/dev/zero', /: file is a character device, not a regular file$/);
    const link = join(dir, 'link-to-fifo.safetensors');
    symlinkSync(fifo, link);
    rejects(link, /: file is a FIFO, not a regular file$/);
  });

  it('refuses headers nested deeper than the format, before parsing them, naming the byte', () => {
    rejects(craft('nest-shape', `{"w":{"dtype":"F32","shape":[[1]],"data_offsets":[0,4]}}`, bytes(4)), /header nests deeper than the format allows \('\[' at byte 37 is at depth 4;/);
    rejects(craft('nest-meta', '{"__metadata__":{"a":{"b":{"c":"d"}}}}'), /'\{' at byte 34 is at depth 4/);
    // Brackets inside strings are not nesting; escaped quotes do not end a string.
    tidy(() => {
      const path = craft('nest-string', `{"__metadata__":{"k":"[[[[{{{{\\"[[[["},"w":${entry('F32', [1], [0, 4])}}`, bytes(4));
      expect(loadSafetensors(path).metadata).toEqual({ k: '[[[[{{{{"[[[[' });
    });
  });

  it('refuses a 98 MB header of nested brackets in well under a second', () => {
    const path = join(dir, 'nested-98mb.safetensors');
    const n = 98_000_000;
    const file = Buffer.alloc(8 + n, 0x5b); // '['
    file.writeBigUInt64LE(BigInt(n), 0);
    writeFileSync(path, file);
    const t0 = performance.now();
    rejects(path, /'\[' at byte 11 is at depth 4/);
    expect(performance.now() - t0).toBeLessThan(1000); // both the load and the header read; before: a V8 heap abort after minutes
    rmSync(path);
  });

  it('refuses shapes whose element count is astronomically large without computing it exactly', () => {
    const path = craft('shape-2^30s', `{"w":${entry('U8', Array(1000).fill(2 ** 30), [0, 4])}}`, bytes(4));
    const t0 = performance.now();
    rejects(path, /hold 4 bytes but shape \[1073741824, 1073741824, (1073741824, ){13}1073741824, \.\.\.\] of U8 needs more than 79228162514264337593543950336$/);
    expect(performance.now() - t0).toBeLessThan(1000);
  });

  it('refuses big flat headers at the first item past a limit, fast: long shapes, many fields, many entries', () => {
    const many = (n: number, item: (i: number) => string): string => Array.from({ length: n }, (_, i) => item(i)).join(',');
    const t0 = performance.now();
    rejects(craft('shape-5000', `{"w":{"dtype":"U8","shape":[${many(5000, () => '0')}],"data_offsets":[0,0]}}`),
      /tensor "w" "shape": the array at byte 35 has more than 1024 items$/);
    rejects(craft('meta-70k', `{"__metadata__":{${many(70_000, (i) => `"k${i}":"v"`)}}}`), /__metadata__: the object at byte 24 has more than 65536 items$/);
    // 3 million entries that are not tensors: refused at the first, not after building a 3-million-key object.
    rejects(craft('keys-3m', `{${many(3_000_000, (i) => `"k${i}":1`)}}`), /tensor "k0": entry must be an object with dtype, shape and data_offsets, got number 1$/);
    expect(performance.now() - t0).toBeLessThan(3000);
  });

  it('refuses more than MAX_TENSORS entries, after reading no more of them', () => {
    const path = join(dir, 'tensors-over-cap.safetensors');
    const one = '"":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},';
    // Distinct names of a fixed width, built as bytes: MAX_TENSORS + 1 zero-size tensors.
    const n = MAX_TENSORS + 1;
    const body = Buffer.alloc(n * (one.length + 7) + 1);
    let at = 0;
    body[at++] = 0x7b;
    for (let i = 0; i < n; i++) at += body.write(`"${i.toString(36).padStart(7, '0')}${one.slice(1)}`, at, 'latin1');
    body[at - 1] = 0x7d;
    const file = Buffer.concat([Buffer.alloc(8), body.subarray(0, at)]);
    file.writeBigUInt64LE(BigInt(at), 0);
    writeFileSync(path, file);
    rejects(path, /the header declares more than 262144 tensors \(the limit on tensors in one file\)$/);
    rmSync(path);
  });

  it('keeps "__proto__" as an ordinary metadata key and tensor name', () => {
    tidy(() => {
      const path = craft('proto', `{"__metadata__":{"__proto__":"x","constructor":"y"},"__proto__":${entry('U8', [1], [0, 1])}}`, bytes(1));
      const { tensors, metadata } = loadSafetensors(path);
      expect(Object.getPrototypeOf(metadata)).toBe(Object.prototype);
      expect(Object.entries(metadata)).toEqual([['__proto__', 'x'], ['constructor', 'y']]);
      expect([...tensors.keys()]).toEqual(['__proto__']);
    });
  });

  it('accepts what other writers may legally produce: no padding, whitespace, key order unlike data order', () => {
    tidy(() => {
      // An unpadded header of odd length: the data section starts misaligned (the native side copies such tensors).
      const data = Buffer.alloc(12);
      data.writeFloatLE(1.5, 0);
      data.writeFloatLE(-2, 4);
      data.writeUInt8(1, 8);
      data.writeUInt8(9, 9);
      data.writeInt16LE(-3, 10);
      const header = ` { "c" : ${entry('I16', [1], [10, 12])}, "a":${entry('F32', [2], [0, 8])},"z":${entry('U8', [0], [8, 8])},"u":${entry('U8', [1], [9, 10])},"b":${entry('BOOL', [1], [8, 9])} }\n`;
      expect(Buffer.byteLength(header) % 2).toBe(1);
      const path = craft('lenient', header, data);
      const { tensors } = loadSafetensors(path);
      expect([...tensors.keys()]).toEqual(['c', 'a', 'z', 'u', 'b']);
      expect(tensors.get('a')!.tolist()).toEqual([1.5, -2]);
      expect(tensors.get('b')!.dtype).toBe('bool');
      expect(tensors.get('b')!.tolist()).toEqual([1]);
      expect(tensors.get('u')!.tolist()).toEqual([9]);
      expect(tensors.get('c')!.tolist()).toEqual([-3]);
      expect(tensors.get('z')!.shape).toEqual([0]);
    });
  });
});

describe('saving', () => {
  function withExisting(name: string): { path: string; before: Buffer } {
    const path = join(dir, 'atomic', name);
    mkdirSync(join(dir, 'atomic'), { recursive: true });
    tidy(() => saveSafetensors(path, { old: torch.arange(10, undefined, 1, { dtype: 'float32' }) }, { v: 'old' }));
    return { path, before: readFileSync(path) };
  }

  it('a failed save leaves an existing file unchanged and no temporary file behind', () => {
    tidy(() => {
      const { path, before } = withExisting('keep.safetensors');
      const live = torch.ones([4]);
      const dead = torch.zeros([4]);
      dead.dispose();
      expect(() => saveSafetensors(path, { live, dead })).toThrow(/^safetensors: .*keep\.safetensors: tensor "dead" is disposed/);
      expect(() => saveSafetensors(path, { live }, { epoch: 3 as unknown as string })).toThrow(/metadata values must be strings: key "epoch" holds number 3/);
      expect(() => saveSafetensors(path, { live: 'x' as unknown as Tensor })).toThrow(/tensor "live" is not a Tensor/);
      expect(() => saveSafetensors(path, { __metadata__: live })).toThrow(/reserved for metadata/);
      expect(readFileSync(path).equals(before)).toBe(true);
      expect(tempFiles(join(dir, 'atomic'))).toEqual([]);
      expect(loadSafetensors(path).metadata).toEqual({ v: 'old' });
    });
  });

  it('refuses, before writing anything, a target that is a directory, a FIFO, a device or a symlink, and leaves it as it was', () => {
    tidy(() => {
      const { path: regular } = withExisting('neighbour.safetensors');
      const atomic = join(dir, 'atomic');
      const target = join(atomic, 'is-a-dir');
      mkdirSync(target, { recursive: true });
      writeFileSync(join(target, 'inside'), 'x');
      const fifo = join(atomic, 'a.fifo');
      execFileSync('mkfifo', [fifo]);
      const toNull = join(atomic, 'to-dev-null.safetensors');
      symlinkSync('/dev/null', toNull);
      const toFile = join(atomic, 'to-regular.safetensors');
      symlinkSync(regular, toFile);
      const dangling = join(atomic, 'dangling.safetensors');
      symlinkSync(join(atomic, 'nowhere'), dangling);
      const w = { w: torch.ones([1000]) };
      expect(() => saveSafetensors(target, w)).toThrow(/^safetensors: .*is-a-dir: cannot save: output file exists and is a directory, not a regular file; refusing to replace it$/);
      expect(() => saveSafetensors(fifo, w)).toThrow(/^safetensors: .*a\.fifo: cannot save: output file exists and is a FIFO, not a regular file/);
      expect(() => saveSafetensors(toNull, w)).toThrow(/^safetensors: .*to-dev-null\.safetensors: cannot save: output file is a symbolic link \(to a character device\); refusing to replace it/);
      expect(() => saveSafetensors(toFile, w)).toThrow(/to-regular\.safetensors: cannot save: output file is a symbolic link \(to a regular file\)/);
      expect(() => saveSafetensors(dangling, w)).toThrow(/dangling\.safetensors: cannot save: output file is a symbolic link \(to a broken link\)/);
      expect(readdirSync(target)).toEqual(['inside']);
      expect(lstatSync(fifo).isFIFO()).toBe(true);
      expect(readlinkSync(toNull)).toBe('/dev/null');
      expect(readlinkSync(toFile)).toBe(regular);
      expect(readlinkSync(dangling)).toBe(join(atomic, 'nowhere'));
      expect(existsSync(join(atomic, 'nowhere'))).toBe(false);
      expect(tempFiles(atomic)).toEqual([]);
    });
  });

  it('refuses a device node at the target (a /dev/null made here with mknod) and leaves it a device', () => {
    const node = join(dir, 'atomic', 'null-device');
    mkdirSync(join(dir, 'atomic'), { recursive: true });
    execFileSync('mknod', [node, 'c', '1', '3']); // root in this project's test environment, as when /dev/full was replaced
    tidy(() => {
      expect(() => saveSafetensors(node, { w: torch.ones([4]) })).toThrow(/null-device: cannot save: output file exists and is a character device, not a regular file/);
    });
    expect(lstatSync(node).isCharacterDevice()).toBe(true);
    expect(tempFiles(join(dir, 'atomic'))).toEqual([]);
  });

  it('a save that fails while writing (file size limit) keeps the old file and removes its temporary file', () => {
    const { path, before } = withExisting('full-disk.safetensors');
    const script = `
      process.on('SIGXFSZ', () => {}); // write() then fails with EFBIG, as on a full disk
      const { saveSafetensors } = await import(${JSON.stringify(join(repoRoot, 'lib/io/safetensors.ts'))});
      const torch = await import(${JSON.stringify(join(repoRoot, 'lib/torch.ts'))});
      try { saveSafetensors(${JSON.stringify(path)}, { w: torch.ones([1 << 20]) }); console.log('saved'); }
      catch (e) { console.log(e.message); }`;
    const r = spawnSync('sh', ['-c', 'ulimit -f 256 && exec "$0" --import tsx --input-type=module -e "$1"', process.execPath, script], { cwd: repoRoot, encoding: 'utf8' });
    expect(r.signal, r.stderr).toBe(null);
    expect(r.stdout).toMatch(/full-disk\.safetensors: cannot save: cannot write '.*full-disk\.safetensors': File too large/);
    expect(readFileSync(path).equals(before)).toBe(true);
    expect(tempFiles(join(dir, 'atomic'))).toEqual([]);
  });

  it('keeps the permission bits of the file it replaces; a new file gets 0666 less the umask', () => {
    tidy(() => {
      const { path } = withExisting('private.safetensors');
      chmodSync(path, 0o600);
      saveSafetensors(path, { w: torch.ones([2]) });
      expect(statSync(path).mode & 0o777).toBe(0o600);
      const fresh = join(dir, 'atomic', 'fresh.safetensors');
      saveSafetensors(fresh, { w: torch.ones([2]) });
      expect(statSync(fresh).mode & 0o777).toBe(0o666 & ~process.umask());
    });
  });

  it('a save into a missing directory fails clearly and creates nothing', () => {
    tidy(() => {
      const path = join(dir, 'no', 'such', 'dir', 'w.safetensors');
      expect(() => saveSafetensors(path, { w: torch.ones([2]) })).toThrow(/^safetensors: .*w\.safetensors: cannot save: cannot create .*No such file or directory/);
      expect(existsSync(join(dir, 'no'))).toBe(false);
    });
  });

  it('a successful save replaces an existing file and leaves no temporary file', () => {
    tidy(() => {
      const { path, before } = withExisting('replace.safetensors');
      saveSafetensors(path, { fresh: torch.full([3], 2) }, { v: 'new' });
      expect(readFileSync(path).equals(before)).toBe(false);
      const { tensors, metadata } = loadSafetensors(path);
      expect(metadata).toEqual({ v: 'new' });
      expect([...tensors.keys()]).toEqual(['fresh']);
      expect(tempFiles(join(dir, 'atomic'))).toEqual([]);
    });
  });

  it('writes exactly the format, checked byte by byte without our reader', () => {
    tidy(() => {
      const tensors = new Map<string, Tensor>([
        ['w', torch.randn([3, 5])], ['h', torch.randn([7]).half()], ['flag', torch.tensor([true, false, true])],
        ['step', torch.tensor(new BigInt64Array([123456789012345n]), { shape: [] })], ['bf', torch.randn([2, 2]).bfloat16()],
        ['u', torch.tensor(new Uint8Array([1, 2, 3]))],
      ]);
      const path = join(dir, 'bytes.safetensors');
      saveSafetensors(path, tensors, { format: 'pt', name: 'x' });
      const raw = readFileSync(path);
      const n = Number(raw.readBigUInt64LE(0));
      expect(n % 8).toBe(0);
      const text = raw.toString('utf8', 8, 8 + n);
      expect(text.startsWith('{"__metadata__":{"format":"pt","name":"x"},"w":')).toBe(true);
      const json = text.trimEnd();
      expect(text.slice(json.length)).toMatch(/^ {0,7}$/); // padded with spaces, fewer than 8
      const header = JSON.parse(json) as Record<string, unknown>;
      expect(Object.keys(header)).toEqual(['__metadata__', 'w', 'h', 'flag', 'step', 'bf', 'u']);
      expect(header.__metadata__).toEqual({ format: 'pt', name: 'x' });
      const format: Record<string, string> = { float32: 'F32', float16: 'F16', bool: 'BOOL', int64: 'I64', bfloat16: 'BF16', uint8: 'U8' };
      let offset = 0;
      for (const [name, t] of tensors) {
        const e = header[name] as { dtype: string; shape: number[]; data_offsets: [number, number] };
        const data = t.dataSync();
        const expected = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
        expect(e).toEqual({ dtype: format[t.dtype], shape: t.shape, data_offsets: [offset, offset + expected.length] });
        expect(Buffer.from(expected).equals(raw.subarray(8 + n + offset, 8 + n + offset + expected.length)), name).toBe(true);
        offset += expected.length;
      }
      expect(raw.length).toBe(8 + n + offset);
    });
  });
});

describe('loaded tensors own their memory', () => {
  it('reads a 64 MB file into owned memory: the values are right and survive the file being truncated or rewritten', () => {
    const path = join(dir, 'big.safetensors');
    const numel = 16 * 1024 * 1024; // 64 MB of float32
    const probes = [0, 1, 4095, 4096, numel / 2 + 3, numel - 1];
    const expected = tidy(() => {
      const big = torch.rand([numel]);
      const small = torch.arange(0, 5, 1, { dtype: 'float32' });
      saveSafetensors(path, { small, big });
      return probes.map((i) => big.narrow(0, i, 1).item());
    });
    expect(statSync(path).size).toBeGreaterThan(numel * 4);
    native.emptyCache();
    const before = memory().cpu.allocatedBytes;
    const { tensors } = loadSafetensors(path);
    const big = tensors.get('big')!;
    try {
      expect(big.shape).toEqual([numel]);
      expect(memory().cpu.allocatedBytes - before).toBeGreaterThanOrEqual(numel * 4); // a copy, not a mapping
      // The file changes under the loaded tensors: with a mapping, reading them now would raise SIGBUS.
      truncateSync(path, 8);
      const sum = tidy(() => big.sum(undefined, false, 'float64').item());
      expect(sum).toBeGreaterThan(numel * 0.45);
      expect(sum).toBeLessThan(numel * 0.55);
      expect(probes.map((i) => tidy(() => big.narrow(0, i, 1).item()))).toEqual(expected);
      expect(tensors.get('small')!.tolist()).toEqual([0, 1, 2, 3, 4]);
      writeFileSync(path, Buffer.alloc(numel * 4 + 200, 0xff));
      expect(probes.map((i) => tidy(() => big.narrow(0, i, 1).item()))).toEqual(expected);
      // Writing to a tensor does not write to the file.
      tidy(() => big.narrow(0, 0, 1).fill_(-1));
      expect(tidy(() => big.narrow(0, 0, 1).item())).toBe(-1);
      expect(readFileSync(path).subarray(0, 16).every((b) => b === 0xff)).toBe(true);
    } finally {
      dispose([...tensors.values()]);
    }
  });
});

describe('a file that changes while it is loaded', () => {
  /** A file of three 1 MiB tensors whose mtime is an hour old, so any rewrite now changes it. */
  function threeTensors(name: string): string {
    const path = join(dir, name);
    tidy(() => saveSafetensors(path, { a: torch.full([1 << 18], 1), b: torch.full([1 << 18], 2), c: torch.full([1 << 18], 3) }));
    const old = new Date(Date.now() - 3_600_000);
    utimesSync(path, old, old);
    return path;
  }

  /** Loads `path` with `change` run just before the n-th tensor is read; returns the error. */
  function loadWhile(path: string, n: number, change: () => void): Error {
    const original = native.readTensor;
    let calls = 0;
    native.readTensor = (...args) => {
      if (calls++ === n) change();
      return original(...args);
    };
    const base = memory().numTensors;
    try {
      loadSafetensors(path);
    } catch (e) {
      return e as Error;
    } finally {
      native.readTensor = original;
      expect(memory().numTensors).toBe(base); // no tensor of the refused load is left behind
    }
    throw new Error('the load succeeded');
  }

  it('a file truncated between the header and the data is an error naming it', () => {
    const path = threeTensors('shrinks.safetensors');
    const err = loadWhile(path, 0, () => truncateSync(path, 100));
    expect(err.message).toMatch(new RegExp(`^safetensors: ${path}: tensor "a": cannot read bytes \\[216, 1048792\\): the file now ends at byte 100 \\(it changed while loading\\)$`));
  });

  it('a file truncated after some tensors were read is an error naming it', () => {
    const path = threeTensors('shrinks-later.safetensors');
    const err = loadWhile(path, 2, () => truncateSync(path, statSync(path).size - 4096));
    expect(err.message).toMatch(new RegExp(`^safetensors: ${path}: tensor "c": cannot read bytes \\[2097368, 3145944\\): the file now ends at byte 3141848 \\(it changed while loading\\)$`));
  });

  it('a file rewritten in place with the same size is an error naming it (the mtime changed)', () => {
    const path = threeTensors('rewritten.safetensors');
    const size = statSync(path).size;
    const err = loadWhile(path, 1, () => writeFileSync(path, Buffer.alloc(size, 0x41)));
    expect(err.message).toMatch(new RegExp(`^safetensors: ${path}: the file changed while it was loaded \\(${size} bytes, modified \\d+ ns when opened, ${size} bytes, modified \\d+ ns after reading\\)$`));
  });

  it('a file replaced by rename while it is loaded loads the version that was opened', () => {
    const path = threeTensors('renamed-over.safetensors');
    const other = join(dir, 'other.safetensors');
    tidy(() => saveSafetensors(other, { x: torch.ones([1]) }));
    const original = native.readTensor;
    native.readTensor = (...args) => { if (existsSync(other)) renameSync(other, path); return original(...args); };
    try {
      tidy(() => {
        const { tensors } = loadSafetensors(path);
        expect([...tensors.keys()]).toEqual(['a', 'b', 'c']);
        expect(tensors.get('c')!.narrow(0, 0, 2).tolist()).toEqual([3, 3]);
      });
    } finally {
      native.readTensor = original;
    }
  });

  it('in a child process: truncation after loading, then use, is fine; truncation during the load exits 1 naming the file, never by a signal', () => {
    const path = threeTensors('child.safetensors');
    const lib = join(repoRoot, 'lib');
    const script = (truncateDuring: boolean) => `
      import { truncateSync } from 'node:fs';
      const { loadSafetensors } = await import('${lib}/io/safetensors.ts');
      const { native } = await import('${lib}/native.ts');
      const path = ${JSON.stringify(path)};
      const read = native.readTensor;
      if (${truncateDuring}) native.readTensor = (...a) => { truncateSync(path, 64); return read(...a); };
      try {
        const { tensors } = loadSafetensors(path);
        truncateSync(path, 0);
        console.log(tensors.get('c').sum().item());
      } catch (e) { console.error(e.message); process.exitCode = 1; }`;
    const run = (during: boolean) => spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script(during)], { cwd: repoRoot, encoding: 'utf8' });
    const after = run(false);
    expect(after.signal, after.stderr).toBe(null);
    expect(after.status, after.stderr).toBe(0);
    expect(after.stdout.trim()).toBe(String(3 * (1 << 18)));
    tidy(() => saveSafetensors(path, { a: torch.full([1 << 18], 1), c: torch.full([4], 3) }));
    const during = run(true);
    expect(during.signal).toBe(null);
    expect(during.status).toBe(1);
    expect(during.stderr).toMatch(new RegExp(`^safetensors: ${path}: tensor "a": cannot read bytes \\[\\d+, \\d+\\): the file now ends at byte 64 \\(it changed while loading\\)\\n$`));
  });
});
