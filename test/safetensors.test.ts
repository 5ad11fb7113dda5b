// safetensors I/O: bit-exact round trips, the real fixtures, rejection of malformed files, atomic saves,
// a by-hand check of the written bytes, and zero-copy loading.
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  MAX_HEADER_BYTES, loadSafetensors, readSafetensorsHeader, saveSafetensors,
} from '../lib/io/safetensors.js';
import { native } from '../lib/native.js';
import { dispose, memory, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
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
    rejects(join(dir, 'does-not-exist.safetensors'), /cannot open: ENOENT/);
    const sub = join(dir, 'a-directory');
    mkdirSync(sub, { recursive: true });
    rejects(sub, /not a regular file/);
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

  it('a save whose final rename fails removes its temporary file', () => {
    tidy(() => {
      withExisting('neighbour.safetensors');
      // The target is a non-empty directory: the temporary file is written in full, then rename() fails.
      const target = join(dir, 'atomic', 'is-a-dir');
      mkdirSync(target, { recursive: true });
      writeFileSync(join(target, 'inside'), 'x');
      expect(() => saveSafetensors(target, { w: torch.ones([1000]) })).toThrow(/^safetensors: .*is-a-dir: cannot save: cannot rename into place/);
      expect(tempFiles(join(dir, 'atomic'))).toEqual([]);
      expect(readdirSync(target)).toEqual(['inside']);
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

describe('zero-copy load', () => {
  it('maps a 64 MB file without growing the allocator by its size', () => {
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
      // Touch every page: the sum reads the whole mapping.
      const sum = tidy(() => big.sum(undefined, false, 'float64').item());
      expect(sum).toBeGreaterThan(numel * 0.45);
      expect(sum).toBeLessThan(numel * 0.55);
      const grown = memory().cpu.allocatedBytes - before;
      expect(grown).toBeLessThan(1024 * 1024); // a copy would add 64 MB
      expect(probes.map((i) => tidy(() => big.narrow(0, i, 1).item()))).toEqual(expected);
      expect(tensors.get('small')!.tolist()).toEqual([0, 1, 2, 3, 4]);
      // Views are private copy-on-write: writing to them does not change the file.
      tidy(() => big.narrow(0, 0, 1).fill_(-1));
      expect(tidy(() => big.narrow(0, 0, 1).item())).toBe(-1);
    } finally {
      dispose([...tensors.values()]);
    }
    const again = loadSafetensors(path).tensors;
    expect(tidy(() => again.get('big')!.narrow(0, 0, 1).item())).toBe(expected[0]);
    dispose([...again.values()]);
  });
});
