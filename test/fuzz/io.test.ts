// Fuzzing the file I/O layer (issue #12): malformed safetensors files, files that are not regular files, files
// that change while they are read, and output paths that hold something other than a regular file. Every case
// runs in its own child process (test/fuzz/harness.ts): a crash (signal, V8 abort, stack trace), a hang or a
// silent acceptance fails the suite. Random inputs come from fixed seeds, so a failure reproduces; the seeded
// variants of one kind share a child that loads each input and reports per input.
import { execFileSync } from 'node:child_process';
import {
  copyFileSync, lstatSync, mkdirSync, readFileSync, readlinkSync, readdirSync, rmSync, statSync, symlinkSync, writeFileSync,
} from 'node:fs';
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeFileAtomic } from '../../lib/io/atomic.js';
import { BoundedJsonError, parseBoundedJson, type JsonLimits } from '../../lib/io/bounded_json.js';
import { makePrivateTempDir } from '../../lib/io/files.js';
import { fixtures } from '../helpers.js';
import { tinySd } from '../cli_helpers.js';
import { report, rng, runCases, type CaseResult, type FuzzCase } from './harness.js';

let dir: string;
let socket: Server;
beforeAll(async () => {
  dir = makePrivateTempDir('difflora-fuzz-io-');
  socket = createServer();
  await new Promise<void>((resolve) => socket.listen(join(dir, 'weights.sock'), resolve));
});
afterAll(() => {
  socket.close();
  rmSync(dir, { recursive: true, force: true });
});

// ---- building files

/** Length prefix + header bytes + data; `length` overrides the prefix. */
function stFile(header: string | Uint8Array, data: Uint8Array = new Uint8Array(0), length?: bigint): Buffer {
  const h = typeof header === 'string' ? Buffer.from(header, 'utf8') : Buffer.from(header);
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(length ?? BigInt(h.length));
  return Buffer.concat([prefix, h, Buffer.from(data)]);
}

const entry = (dtype: unknown, shape: unknown, offsets: unknown): string => JSON.stringify({ dtype, shape, data_offsets: offsets });

/** A small valid file: two F32 tensors and a U8 one, with metadata. */
function validFile(): Buffer {
  const header = `{"__metadata__":{"format":"pt"},"a":${entry('F32', [2, 2], [0, 16])},"b":${entry('F32', [3], [16, 28])},"c":${entry('U8', [4], [28, 32])}}`;
  return stFile(header, Uint8Array.from({ length: 32 }, (_, i) => i));
}

type Random = ReturnType<typeof rng>;

/** Hostile values for a shape dimension or an offset. */
const badNumbers = [-1, 1.5, 2 ** 53, 2 ** 64, 1e308, -0.5, '3', null, true, [], {}, 'NaN'];

/** Each generator returns one malformed file (as bytes) and a short description; all must be refused. */
const generators: Record<string, (r: Random) => Buffer> = {
  'random bytes': (r) => Buffer.from(r.bytes(r.int(0, 300))),
  'truncated file': (r) => { const f = validFile(); return f.subarray(0, r.int(0, f.length - 1)); },
  'header length lies': (r) => {
    const f = validFile();
    const n = f.readBigUInt64LE(0);
    const lies = [0n, 1n, n - 1n, n + 1n, n + 7n, BigInt(f.length), 2n ** 63n, 2n ** 64n - 1n, BigInt(r.int(0, 1 << 30))];
    f.writeBigUInt64LE(r.pick(lies), 0);
    return f;
  },
  'nested arrays': (r) => {
    const depth = r.int(2, 40);
    const shape = `${'['.repeat(depth)}1${']'.repeat(depth)}`;
    const where = r.pick(['shape', 'offsets', 'metadata', 'entry']);
    if (where === 'shape') return stFile(`{"w":{"dtype":"F32","shape":${shape},"data_offsets":[0,4]}}`, new Uint8Array(4));
    if (where === 'offsets') return stFile(`{"w":{"dtype":"F32","shape":[1],"data_offsets":[${shape},4]}}`, new Uint8Array(4));
    if (where === 'metadata') return stFile(`{"__metadata__":{"k":${shape}}}`);
    return stFile(`{"w":{"x":{"y":${shape}}}}`);
  },
  'huge or bad dims': (r) => {
    const shape = Array.from({ length: r.int(1, 6) }, () => (r.next() < 0.5 ? r.pick(badNumbers) : r.int(0, 2 ** 31)));
    if (shape.every((d) => typeof d === 'number' && Number.isSafeInteger(d) && d >= 0)) shape.push(-7);
    return stFile(`{"w":${entry(r.pick(['F32', 'U8', 'F64']), shape, [0, 8])}}`, new Uint8Array(8));
  },
  'bad dtypes': (r) => {
    const dtype = r.pick(['f32', 'F128', 'U32', 'F8_E4M3', '', ' F32', 'F32\u0000', 7, null, ['F32'], { F: 32 }, 'I64'.repeat(50)]);
    return stFile(`{"w":${entry(dtype, [2], [0, 8])}}`, new Uint8Array(8));
  },
  'overlapping or out-of-range offsets': (r) => {
    const a = r.int(0, 12);
    const kind = r.pick(['overlap', 'past-end', 'hole', 'reversed', 'bad-number']);
    if (kind === 'overlap') return stFile(`{"a":${entry('U8', [8], [0, 8])},"b":${entry('U8', [4], [a % 8, (a % 8) + 4])}}`, new Uint8Array(12));
    if (kind === 'past-end') return stFile(`{"a":${entry('U8', [8], [a, a + 8])}}`, new Uint8Array(r.int(0, a + 7)));
    if (kind === 'hole') return stFile(`{"a":${entry('U8', [4], [0, 4])},"b":${entry('U8', [4], [5 + a, 9 + a])}}`, new Uint8Array(9 + a));
    if (kind === 'reversed') return stFile(`{"a":${entry('U8', [0], [a + 1, a])}}`, new Uint8Array(a + 1));
    return stFile(`{"a":${entry('U8', [4], [r.pick(badNumbers), 4])}}`, new Uint8Array(4));
  },
  'non-UTF-8 header': (r) => {
    const bad = r.pick([[0xff], [0xc0, 0x80], [0xed, 0xa0, 0x80], [0xe2, 0x82], [0xf8, 0x88, 0x80, 0x80, 0x80], [0x80]]);
    const name = Buffer.concat([Buffer.from('"w'), Buffer.from(bad), Buffer.from('"')]);
    return stFile(Buffer.concat([Buffer.from('{'), name, Buffer.from(`:${entry('U8', [1], [0, 1])}}`)]), new Uint8Array(1));
  },
  '__metadata__ values that are not strings': (r) => {
    const v = r.pick([1, 1.5, null, true, [], ['a'], {}, { a: 'b' }, -0]);
    return stFile(`{"__metadata__":{"format":"pt","k":${JSON.stringify(v)}}}`);
  },
  'duplicate keys': (r) => {
    const e = entry('U8', [1], [0, 1]);
    const dup = r.pick([
      `{"w":${e},"w":${e}}`, `{"w":${e},"\\u0077":${e}}`, '{"__metadata__":{},"__metadata__":{}}',
      '{"w":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}', '{"__metadata__":{"k":"a","k":"b"}}',
    ]);
    return stFile(dup, new Uint8Array(1));
  },
};

/** Byte flips in a valid file: may still load (a flip in the data) or must be refused cleanly. */
function flipped(r: Random): Buffer {
  const f = validFile();
  for (let k = r.int(1, 4); k > 0; k--) f[r.int(0, f.length - 1)] = r.int(0, 255);
  return f;
}

// ---- child scripts

interface BatchInput { path: string; mayAccept: boolean }

/** Writes a generated file into the suite's folder and returns its path. */
function put(name: string, bytes: Uint8Array): string {
  const path = join(dir, name);
  writeFileSync(path, bytes);
  return path;
}

/** The case fields of a batch child over `inputs` (listed in a JSON file the child reads). */
function batch(name: string, inputs: BatchInput[]): Pick<FuzzCase, 'script' | 'mayAccept' | 'check'> {
  const list = join(dir, `${name}.json`);
  writeFileSync(list, JSON.stringify(inputs));
  return { script: batchScript(list), mayAccept: true, check: batchCheck };
}

/**
 * A child that loads each listed file (loadSafetensors and readSafetensorsHeader) and prints one JSON line:
 * how many were refused or accepted, and every problem (an accepted file that must be refused, an error that
 * does not start with "safetensors: <its path>: ", a non-Error throw, or a tensor left behind by a refusal).
 */
function batchScript(list: string): (lib: string) => string {
  return (lib) => `
    const { readFileSync } = await import('node:fs');
    const { loadSafetensors, readSafetensorsHeader } = await import('${lib}/io/safetensors.js');
    const { dispose, memory } = await import('${lib}/scope.js');
    const inputs = JSON.parse(readFileSync(${JSON.stringify(list)}, 'utf8'));
    const out = { refused: 0, accepted: 0, problems: [] };
    for (const { path, mayAccept } of inputs) {
      process.stderr.write('trying ' + path + '\\n');
      for (const [how, read] of [['load', () => loadSafetensors(path)], ['header', () => readSafetensorsHeader(path)]]) {
        const base = memory().numTensors;
        try {
          const got = read();
          if (got.tensors instanceof Map) dispose([...got.tensors.values()]);
          if (mayAccept) out.accepted++; else out.problems.push(how + ' accepted ' + path);
        } catch (e) {
          out.refused++;
          if (!(e instanceof Error)) out.problems.push(how + ' threw a non-Error for ' + path);
          else if (!e.message.startsWith('safetensors: ' + path + ': ')) out.problems.push(how + ' error does not name ' + path + ': ' + e.message);
          if (memory().numTensors !== base) out.problems.push(how + ' left tensors behind for ' + path);
        }
      }
    }
    console.log(JSON.stringify(out));`;
}

function batchCheck(r: { stdout: string }): true | string {
  const line = r.stdout.trim().split('\n').pop() ?? '';
  let parsed: { refused: number; accepted: number; problems: string[] };
  try { parsed = JSON.parse(line) as typeof parsed; } catch { return `no report: ${line.slice(0, 200)}`; }
  return parsed.problems.length === 0 ? true : parsed.problems.slice(0, 5).join(' | ');
}

/** A child that runs `call` (an expression using loadSafetensors/readSafetensorsHeader/saveSafetensors/writeFileAtomic/torch). */
function call(body: string): (lib: string) => string {
  return (lib) => `
    const { loadSafetensors, readSafetensorsHeader, saveSafetensors } = await import('${lib}/io/safetensors.js');
    const { writeFileAtomic } = await import('${lib}/io/atomic.js');
    const torch = await import('${lib}/torch.js');
    ${body}`;
}

const re = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

// ---- the suite

describe('fuzz: safetensors loading and output targets', () => {
  it('0 crashes, 0 hangs, 0 silent acceptances', { timeout: 180_000 }, async () => {
    const cases: FuzzCase[] = [];
    const seeds: Record<string, number> = {};

    // Seeded malformed files: 12 of each kind, in two children (each child costs a second of start-up).
    const kinds = Object.entries(generators);
    for (const [half, group] of [kinds.slice(0, 5), kinds.slice(5)].entries()) {
      const inputs: BatchInput[] = [];
      for (const [kind, gen] of group) {
        const seed = 0x5afe + kinds.findIndex(([k]) => k === kind);
        seeds[kind] = seed;
        const r = rng(seed);
        for (let i = 0; i < 12; i++) inputs.push({ path: put(`${kind.replace(/\W+/g, '-')}-${i}.safetensors`, gen(r)), mayAccept: false });
      }
      cases.push({ name: `malformed files: ${group.map(([k]) => k).join(', ')} (12 each)`, ...batch(`malformed-${half}`, inputs) });
    }
    const flipRandom = rng(0xf11);
    seeds['byte flips'] = 0xf11;
    const flips = Array.from({ length: 30 }, (_, i) => ({ path: put(`flip-${i}.safetensors`, flipped(flipRandom)), mayAccept: true }));
    cases.push({ name: 'byte flips in a valid file (30 files; a flip in the data may load)', ...batch('flips', flips) });

    // The examples from the issue, each in its own child.
    const nested = join(dir, 'nested-98mb.safetensors');
    const n = 98_000_000;
    const big = Buffer.alloc(8 + n, 0x5b);
    big.writeBigUInt64LE(BigInt(n), 0);
    writeFileSync(nested, big);
    cases.push({
      name: '98 MB header of nested [ (was: V8 heap abort after two minutes)',
      script: call(`const t0 = performance.now();
        try { loadSafetensors(${JSON.stringify(nested)}); } finally { if (performance.now() - t0 > 1000) throw new Error('slow: ' + (performance.now() - t0) + ' ms'); }`),
      error: new RegExp(`${re(nested)}: header nests deeper than the format allows \\('\\[' at byte 11`),
      timeoutMs: 30_000,
    });

    const fifo = join(dir, 'lora.fifo');
    execFileSync('mkfifo', [fifo]);
    cases.push({ name: 'FIFO as the weights file (was: blocked forever in open)', script: call(`loadSafetensors(${JSON.stringify(fifo)});`), error: new RegExp(`${re(fifo)}: file is a FIFO, not a regular file`), timeoutMs: 20_000 });
    const validLora = join(fixtures, 'goldens', 'lora-diffusers', 'pytorch_lora_weights.safetensors');
    cases.push({ name: 'convert-lora --input=<FIFO>', cli: ['convert-lora', `--input=${fifo}`, `--output=${join(dir, 'never.safetensors')}`, '--to=kohya'], error: /lora\.fifo'? (: file )?is a FIFO, not a regular file/, timeoutMs: 20_000 });
    const notRegular = [fifo, '/dev/zero', '/dev/null', dir, join(dir, 'weights.sock'), join(dir, 'missing.safetensors')];
    cases.push({ name: 'FIFO, devices, a directory, a socket, a missing file: load and header read', ...batch('not-regular', notRegular.map((path) => ({ path, mayAccept: false }))), timeoutMs: 20_000 });

    // Changes under a reader (was: SIGBUS, exit 135).
    const changing = join(dir, 'changing.safetensors');
    copyFileSync(join(tinySd, 'unet', 'diffusion_pytorch_model.safetensors'), changing);
    cases.push({
      name: 'file truncated between the header and the data',
      script: (lib) => `${call('')(lib)}
        const { native } = await import('${lib}/native.js');
        const { truncateSync, copyFileSync } = await import('node:fs');
        const path = ${JSON.stringify(changing)};
        const read = native.readTensor;
        native.readTensor = (...a) => { truncateSync(path, 4096); native.readTensor = read; return read(...a); };
        try { loadSafetensors(path); } finally { copyFileSync(${JSON.stringify(join(tinySd, 'unet', 'diffusion_pytorch_model.safetensors'))}, path); }`,
      error: new RegExp(`${re(changing)}: tensor ".*": cannot read bytes .*: the file now ends at byte 4096 \\(it changed while loading\\)`),
    });
    const shrunk = join(dir, 'shrunk-after-load.safetensors');
    copyFileSync(join(tinySd, 'unet', 'diffusion_pytorch_model.safetensors'), shrunk);
    cases.push({
      name: 'file truncated after loading, then every tensor read',
      script: call(`const { truncateSync } = await import('node:fs');
        const { tensors } = loadSafetensors(${JSON.stringify(shrunk)});
        truncateSync(${JSON.stringify(shrunk)}, 0);
        let total = 0; for (const t of tensors.values()) total += t.abs().sum().item();
        console.log(tensors.size, total > 0);`),
      mayAccept: true,
      check: (r) => r.stdout.trim() === '304 true' || `got ${r.stdout}`,
    });
    const unetCopy = join(dir, 'unet-copy');
    mkdirSync(unetCopy);
    copyFileSync(join(tinySd, 'unet', 'config.json'), join(unetCopy, 'config.json'));
    copyFileSync(join(tinySd, 'unet', 'diffusion_pytorch_model.safetensors'), join(unetCopy, 'diffusion_pytorch_model.safetensors'));
    cases.push({
      name: 'UNet fromPretrained 25 times while another process copies over its weights (was: SIGBUS in 9 of 40)',
      script: (lib) => `
        const { spawn } = await import('node:child_process');
        const { UNet2DConditionModel } = await import('${lib}/models/unet_2d_condition.js');
        const file = ${JSON.stringify(join(unetCopy, 'diffusion_pytorch_model.safetensors'))};
        const src = ${JSON.stringify(join(tinySd, 'unet', 'diffusion_pytorch_model.safetensors'))};
        const writer = spawn('sh', ['-c', 'while :; do cp "$0" "$1"; done', src, file], { stdio: 'ignore' });
        const out = { ok: 0, refused: 0, problems: [] };
        for (let i = 0; i < 25; i++) {
          try { const m = UNet2DConditionModel.fromPretrained(${JSON.stringify(unetCopy)}); m.dispose?.(); out.ok++; }
          catch (e) { out.refused++; if (!String(e.message).includes(file)) out.problems.push(e.message); }
        }
        writer.kill('SIGKILL');
        console.log(JSON.stringify(out));`,
      mayAccept: true,
      check: (r) => {
        const out = JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as { ok: number; refused: number; problems: string[] };
        return out.problems?.length === 0 && out.ok + out.refused === 25 ? true : `problems: ${JSON.stringify(out).slice(0, 400)}`;
      },
      timeoutMs: 90_000,
    });

    // Output targets: each must be refused and left exactly as it was (checked with lstat after the run).
    const targets = join(dir, 'targets');
    mkdirSync(targets);
    const t = {
      toDevNull: join(targets, 'to-dev-null.png'),
      fifo: join(targets, 'out.fifo'),
      directory: join(targets, 'a-directory'),
      device: join(targets, 'full-device'),
      toRegular: join(targets, 'to-regular.safetensors'),
      dangling: join(targets, 'dangling.safetensors'),
      regular: join(targets, 'regular.safetensors'),
    };
    symlinkSync('/dev/null', t.toDevNull);
    execFileSync('mkfifo', [t.fifo]);
    mkdirSync(t.directory);
    writeFileSync(join(t.directory, 'inside'), 'x');
    execFileSync('mknod', [t.device, 'c', '1', '7']); // a /dev/full of our own: replacing it harms nothing outside
    writeFileSync(t.regular, 'keep me');
    symlinkSync(t.regular, t.toRegular);
    symlinkSync(join(targets, 'nowhere'), t.dangling);
    const refusal: Record<string, string> = {
      toDevNull: 'is a symbolic link (to a character device)', fifo: 'exists and is a FIFO', directory: 'exists and is a directory',
      device: 'exists and is a character device', toRegular: 'is a symbolic link (to a regular file)', dangling: 'is a symbolic link (to a broken link)',
    };
    cases.push({
      name: 'writeFileAtomic and saveSafetensors onto a symlink (to /dev/null, a file, nothing), a FIFO, a directory, a device',
      script: call(`const out = { problems: [] };
        for (const [path, why] of ${JSON.stringify(Object.entries(refusal).map(([key, why]) => [t[key as keyof typeof t], why]))}) {
          for (const [how, write, expected] of [
            ['writeFileAtomic', () => writeFileAtomic(path, new Uint8Array([1, 2, 3]), 'output image'), "output image '" + path + "' " + why],
            ['saveSafetensors', () => saveSafetensors(path, { w: torch.ones([4]) }), path + ': cannot save: output file ' + why],
          ]) {
            try { write(); out.problems.push(how + ' wrote ' + path); }
            catch (e) { if (!e.message.includes(expected)) out.problems.push(how + ': ' + e.message); }
          }
        }
        console.log(JSON.stringify(out));`),
      mayAccept: true,
      check: (r) => {
        const out = JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as { problems?: string[] };
        return out.problems?.length === 0 ? true : `problems: ${JSON.stringify(out.problems).slice(0, 600)}`;
      },
    });
    cases.push({ name: 'convert-lora --force onto a symlink to /dev/null', cli: ['convert-lora', `--input=${validLora}`, `--output=${t.toDevNull}`, '--to=kohya', '--force'], error: /to-dev-null\.png: cannot save: output file is a symbolic link/, timeoutMs: 60_000 });
    cases.push({ name: 'convert-lora --force onto a device node', cli: ['convert-lora', `--input=${validLora}`, `--output=${t.device}`, '--to=kohya', '--force'], error: /full-device: cannot save: output file exists and is a character device/, timeoutMs: 60_000 });
    cases.push({
      name: 'generate --output=<device node> (was: the device replaced by a PNG)',
      cli: ['generate', `--pretrained_model_name_or_path=${tinySd}`, '--prompt=x', '--num_inference_steps=1', '--height=64', '--width=64', `--output=${t.device}`],
      error: /full-device' exists and is a character device, not a regular file/, timeoutMs: 120_000,
    });

    const results = await runCases(cases, 2);
    const { counts, failures } = report(results);
    console.log(`fuzz io: ${results.length} children, seeds ${JSON.stringify(seeds)}:`, counts);
    logBatches(results);
    expect(counts.crash + counts.hang + counts.silent, failures).toBe(0);

    // Nothing at an output path was replaced, and no temporary file was left next to it.
    expect(readlinkSync(t.toDevNull)).toBe('/dev/null');
    expect(lstatSync(t.fifo).isFIFO()).toBe(true);
    expect(readdirSync(t.directory)).toEqual(['inside']);
    expect(lstatSync(t.device).isCharacterDevice()).toBe(true);
    expect(readlinkSync(t.toRegular)).toBe(t.regular);
    expect(readFileSync(t.regular, 'utf8')).toBe('keep me');
    expect(readlinkSync(t.dangling)).toBe(join(targets, 'nowhere'));
    expect(readdirSync(targets).sort()).toEqual(Object.values(t).map((p) => p.slice(targets.length + 1)).sort());
    expect(lstatSync(fifo).isFIFO()).toBe(true);
  });
});

function logBatches(results: readonly CaseResult[]): void {
  for (const r of results) {
    const line = r.stdout.trim().split('\n').pop() ?? '';
    if (line.startsWith('{"refused"') || line.startsWith('{"ok"')) console.log(`  ${r.name}: ${line.slice(0, 160)} (${r.ms} ms)`);
  }
}

describe('writeFileAtomic', () => {
  it('creates a new file with 0666 less the umask and keeps the mode of a file it replaces', () => {
    const path = join(dir, 'mode.png');
    writeFileAtomic(path, new Uint8Array([1]));
    expect(statSync(path).mode & 0o777).toBe(0o666 & ~process.umask());
    execFileSync('chmod', ['600', path]);
    writeFileAtomic(path, new Uint8Array([2, 3]));
    expect(statSync(path).mode & 0o777).toBe(0o600);
    expect([...readFileSync(path)]).toEqual([2, 3]);
    expect(readdirSync(dir).filter((f) => f.endsWith('.tmp'))).toEqual([]);
  });

  it('refuses a symlink to a regular file without writing through it, naming the output', () => {
    const real = join(dir, 'real.png');
    writeFileSync(real, 'old');
    const link = join(dir, 'link.png');
    symlinkSync(real, link);
    expect(() => writeFileAtomic(link, new Uint8Array([1]), 'output image')).toThrow(`output image '${link}' is a symbolic link (to a regular file); refusing to replace it`);
    expect(readFileSync(real, 'utf8')).toBe('old');
    expect(lstatSync(link).isSymbolicLink()).toBe(true);
  });

  it('names the path when the folder does not exist, and leaves nothing behind', () => {
    const path = join(dir, 'missing', 'x.png');
    expect(() => writeFileAtomic(path, new Uint8Array([1]))).toThrow(new RegExp(`^cannot write output file '${re(path)}': ENOENT`));
  });
});

describe('parseBoundedJson against JSON.parse', () => {
  const wide: JsonLimits = { maxDepth: 64, maxItems: [1e6] };
  const bytes = (s: string): Uint8Array => Buffer.from(s, 'utf8');
  const agree = (text: string): string | undefined => {
    let ours: { ok: true; json: string } | { ok: false; kind: string };
    try {
      ours = { ok: true, json: JSON.stringify(parseBoundedJson(bytes(text), wide)) };
    } catch (e) {
      if (!(e instanceof BoundedJsonError)) return `${JSON.stringify(text)}: threw ${String(e)}`;
      ours = { ok: false, kind: e.kind };
    }
    let theirs: string | undefined;
    try { theirs = JSON.stringify(JSON.parse(text)); } catch { theirs = undefined; }
    if (ours.ok) return ours.json === theirs ? undefined : `${JSON.stringify(text)}: ours ${ours.json}, JSON.parse ${theirs ?? 'refused'}`;
    if (ours.kind === 'duplicate') return undefined; // JSON.parse keeps the last of a repeated key; refusing it is the point
    return theirs === undefined ? undefined : `${JSON.stringify(text)}: we refused (${ours.kind}) what JSON.parse reads as ${theirs}`;
  };

  it('accepts and refuses the same texts, with the same values (seeded token soup and random values)', () => {
    const tokens = ['{', '}', '[', ']', ',', ':', ' ', '\n', '\t', '"a"', '"b"', '"\\u0041"', '"\\x"', '"\\"', '"é✓"', '"\\ud83d\\ude00"',
      '0', '1', '-0', '01', '1.5', '1e5', '1E+2', '1.', '.5', '-', '+1', '2e', '123456789012345678901234567890', 'true', 'tru', 'null', 'nul', 'false', '"\t"'];
    const r = rng(0x150);
    const problems: string[] = [];
    for (let k = 0; k < 20_000; k++) {
      const text = Array.from({ length: r.int(1, 12) }, () => r.pick(tokens)).join('');
      const p = agree(text);
      if (p) problems.push(p);
    }
    const value = (depth: number): unknown => {
      const kind = r.int(0, depth > 3 ? 3 : 5);
      if (kind === 0) return r.pick([0, -1, 1.25, 1e21, -2.5e-7, 9007199254740993, 42]);
      if (kind === 1) return r.pick(['', 'x', 'é', '"q"', '\\', '\u0000', '\u2028', '😀', '__proto__']);
      if (kind === 2) return r.pick([true, false, null]);
      if (kind === 3) return r.pick([[], {}]);
      if (kind === 4) return Array.from({ length: r.int(0, 4) }, () => value(depth + 1));
      return Object.fromEntries(Array.from({ length: r.int(0, 4) }, (_, i) => [r.pick(['a', 'b', '1', '__proto__', 'é']) + i, value(depth + 1)]));
    };
    for (let k = 0; k < 2000; k++) {
      const p = agree(JSON.stringify(value(0), null, r.pick([0, 1, '\t'])));
      if (p) problems.push(p);
    }
    expect(problems.slice(0, 10)).toEqual([]);
  });

  it('enforces its limits at the first byte past them and names where', () => {
    const limits: JsonLimits = { maxDepth: 2, maxItems: [3, 2] };
    const error = (text: string): BoundedJsonError => {
      try { parseBoundedJson(bytes(text), limits, 8); } catch (e) { return e as BoundedJsonError; }
      throw new Error(`accepted ${text}`);
    };
    expect(error('{"a":[[1]]}')).toMatchObject({ kind: 'depth', offset: 14, keys: ['a'], message: "'[' at byte 14 is at depth 3" });
    expect(error('{"a":1,"b":2,"c":3,"d":4}')).toMatchObject({ kind: 'items', offset: 8, keys: [] });
    expect(error('{"a":[1,2,3]}')).toMatchObject({ kind: 'items', offset: 13, keys: ['a'], message: 'the array at byte 13 has more than 2 items' });
    expect(error('{"a":{"x":1,"\\u0078":2}}')).toMatchObject({ kind: 'duplicate', key: 'x', keys: ['a'] });
    const bad = Buffer.from('{"a":"..."}');
    bad[6] = 0xff;
    expect(() => parseBoundedJson(bad, limits)).toThrow(expect.objectContaining({ kind: 'utf8' }) as Error);
    const seen: string[] = [];
    parseBoundedJson(bytes('{"z":1,"__proto__":[2],"a":{}}'), limits, 0, (k) => seen.push(k));
    expect(seen).toEqual(['z', '__proto__', 'a']);
  });
});
