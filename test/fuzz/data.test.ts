// Fuzz (issue #12): hostile datasets — imagefolder and parquet — through the library loaders (each in a child
// process: a crash, an abort or a hang is seen as such) and a few through `difflora train`. Generated from a
// fixed seed (DIFFLORA_FUZZ_SEED overrides it). Hostile means: paths that escape the dataset (absolute, ../,
// symbolic links to files and folders outside, link loops, /dev/zero), FIFOs as images, metadata and parquet
// files, truncated and garbage images, huge captions (a 300 MB caption line, a 50 MB CSV field), malformed
// metadata rows and parquet cells, unicode file names.
// Beyond the harness's verdicts (0 crash, hang, silent), the suite asserts that nothing outside a dataset is
// ever read or copied: a sentinel secret (a PNG of a colour no dataset uses, and a key file) lies outside every
// dataset; no decoded batch ever holds its colour, no file in the children's temp folder or the CLI outputs
// holds its bytes, every refusal names the path, and no temporary folder is left after the runs.
import { execFileSync } from 'node:child_process';
import { closeSync, existsSync, lstatSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, symlinkSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { crc32 } from 'node:zlib';
import sharp from 'sharp';
import { parquetMetadata } from 'hyparquet';
import { parquetWriteBuffer } from 'hyparquet-writer';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { tinySd } from '../cli_helpers.js';
import { report, rng, runCases, type FuzzCase, type RawResult } from './harness.js';

const SEED = Number(process.env.DIFFLORA_FUZZ_SEED ?? 12);
const SENTINEL_RGB: [number, number, number] = [13, 237, 101];
const CAP = 16384; // MAX_CAPTION_CHARS

let root: string;      // the datasets
let childTmp: string;  // TMPDIR of every child: where temporary folders would appear
let secretDir: string; // outside every dataset
let secretPng: string;
let secretKey: string;
let secretParquet: string;
let secretBytes: Buffer[];
const outputs: string[] = [];

const png = (rgb: readonly [number, number, number], w = 10, h = 8): Promise<Buffer> =>
  sharp({ create: { width: w, height: h, channels: 3, background: { r: rgb[0], g: rgb[1], b: rgb[2] } } }).png().toBuffer();

type Lines = (string | object)[];
const jsonl = (lines: Lines): string => lines.map((l) => (typeof l === 'string' ? l : JSON.stringify(l))).join('\n');

/** A dataset folder under root with the given files (Buffer or text) and symlinks. */
function folder(name: string, files: Record<string, Buffer | string>, links: Record<string, string> = {}): string {
  const dir = join(root, name);
  mkdirSync(dir, { recursive: true });
  for (const [f, body] of Object.entries(files)) {
    mkdirSync(dirname(join(dir, f)), { recursive: true });
    writeFileSync(join(dir, f), body);
  }
  for (const [f, target] of Object.entries(links)) symlinkSync(target, join(dir, f));
  return dir;
}

type ParquetArgs = Parameters<typeof parquetWriteBuffer>[0];
const STRUCT_SCHEMA: ParquetArgs['schema'] = [
  { name: 'root', num_children: 2 },
  { name: 'image', repetition_type: 'OPTIONAL', num_children: 2 },
  { name: 'bytes', type: 'BYTE_ARRAY', repetition_type: 'OPTIONAL' },
  { name: 'path', type: 'BYTE_ARRAY', converted_type: 'UTF8', repetition_type: 'OPTIONAL' },
  { name: 'text', type: 'BYTE_ARRAY', converted_type: 'UTF8', repetition_type: 'OPTIONAL' },
];

/** A parquet file of {bytes, path} image structs and text captions. */
function structParquet(cells: { bytes: Uint8Array | null; path: string | null }[], captions: (string | null)[]): Buffer {
  return Buffer.from(parquetWriteBuffer({ columnData: [{ name: 'image', data: cells }, { name: 'text', data: captions }], schema: STRUCT_SCHEMA }));
}

function columnsParquet(columnData: ParquetArgs['columnData']): Buffer {
  return Buffer.from(parquetWriteBuffer({ columnData }));
}

// ---- the child script: load, run one epoch of the loader, report

interface LoadSpec { kind: 'folder' | 'parquet'; dir: string; skipBroken?: boolean; captionColumn?: string; decodeTimeoutMs?: number }
interface LoadResult { ok: boolean; message?: string; errorName?: string; length?: number; skipped?: number; skippedFiles?: string[]; captionLengths?: number[]; sawSentinel?: boolean; warnings?: string[] }

/**
 * A child script that loads each dataset, reads one epoch through ImageCaptionLoader and prints what it saw.
 * One spec: an error propagates (the harness classifies it); several: each outcome is reported in a list.
 */
function loadScript(specs: LoadSpec[]): (lib: string) => string {
  return (lib) => `
const { loadImageFolder } = await import(${JSON.stringify(`${lib}/data/imagefolder.ts`)});
const { ImageCaptionLoader } = await import(${JSON.stringify(`${lib}/data/loader.ts`)});
const specs = ${JSON.stringify(specs)};
const target = ${JSON.stringify(SENTINEL_RGB)}.map((v) => (v / 255 - 0.5) / 0.5);
async function run(spec) {
  const warnings = [];
  const opts = { onWarning: (w) => warnings.push(w), ...(spec.captionColumn ? { captionColumn: spec.captionColumn } : {}), ...(spec.decodeTimeoutMs ? { decodeTimeoutMs: spec.decodeTimeoutMs } : {}) };
  // parquet_dataset imports the model loader (and the native addon): only when a case needs it
  const ds = spec.kind === 'parquet'
    ? await (await import(${JSON.stringify(`${lib}/data/parquet_dataset.ts`)})).loadParquetDataset(spec.dir, opts)
    : loadImageFolder(spec.dir, opts);
  try {
    const loader = new ImageCaptionLoader(ds, { batchSize: 4, resolution: 8, centerCrop: true, shuffle: false, skipBroken: !!spec.skipBroken, numWorkers: 2 });
    let sawSentinel = false;
    const captionLengths = [];
    for (let b = 0; b < loader.batchesPerEpoch && loader.getState().epoch === 0; b++) {
      const batch = await loader.next();
      captionLengths.push(...batch.captions.map((c) => c.length));
      const px = batch.pixelValues, plane = 64;
      for (let i = 0; i < batch.shape[0]; i++) for (let p = 0; p < plane; p++) {
        const o = i * 3 * plane + p;
        if ([0, 1, 2].every((c) => Math.abs(px[o + c * plane] - target[c]) < 0.03)) sawSentinel = true;
      }
    }
    return { ok: true, length: ds.length, skipped: loader.skipped, skippedFiles: loader.skippedImages.map((s) => s.file + ': ' + s.error.message), captionLengths, sawSentinel, warnings };
  } finally {
    ds.close?.();
  }
}
if (specs.length === 1) {
  process.stdout.write(JSON.stringify(await run(specs[0])));
} else {
  const out = [];
  for (const spec of specs) {
    try { out.push(await run(spec)); } catch (e) { out.push({ ok: false, message: e.message, errorName: e.name }); }
  }
  process.stdout.write(JSON.stringify(out));
}`;
}

const parse = <T>(r: RawResult): T => JSON.parse(r.stdout) as T;
const INTERNAL = /Cannot read properties|is not a function|is not iterable|Maximum call stack|Invalid (string|array) length|\[object Object\]/;

/** A check for an accepted single load: the sentinel never seen, plus the case's own condition. */
function accepted(cond: (r: LoadResult) => true | string): (r: RawResult) => true | string {
  return (raw) => {
    const r = parse<LoadResult>(raw);
    if (r.sawSentinel) return 'a batch held the sentinel picture from outside the dataset';
    return cond(r);
  };
}

/** What one input of a multi-spec case must give: an error matching `error`, or (when `mayAccept`) a clean load. */
interface Expect { what: string; error?: RegExp; names?: string[]; mayAccept?: boolean; check?: (r: LoadResult) => true | string }

function batchCase(name: string, inputs: (LoadSpec & Expect)[], timeoutMs = 30_000): FuzzCase {
  return {
    name,
    script: loadScript(inputs.map(({ kind, dir, skipBroken, captionColumn, decodeTimeoutMs }) => ({ kind, dir, skipBroken, captionColumn, decodeTimeoutMs }))),
    mayAccept: true,
    timeoutMs,
    check: (raw) => {
      const results = parse<LoadResult[]>(raw);
      const bad: string[] = [];
      results.forEach((r, i) => {
        const want = inputs[i]!;
        if (r.sawSentinel) bad.push(`${want.what}: a batch held the sentinel picture`);
        else if (!r.ok) {
          if (r.errorName !== 'Error' || INTERNAL.test(r.message ?? '')) bad.push(`${want.what}: internal error ${r.errorName}: ${r.message}`);
          else if (!want.error) bad.push(`${want.what}: refused (${r.message}) where a load was expected`);
          else if (!want.error.test(r.message ?? '') || !(want.names ?? []).every((n) => r.message!.includes(n))) {
            bad.push(`${want.what}: error does not name the culprit (${want.error} ${JSON.stringify(want.names ?? [])}): ${r.message?.slice(0, 300)}`);
          }
        } else if (!want.mayAccept) bad.push(`${want.what}: accepted where a refusal was expected`);
        else if (want.check) { const c = want.check(r); if (c !== true) bad.push(`${want.what}: ${c}`); }
      });
      return bad.length === 0 ? true : bad.join(' | ');
    },
  };
}

const esc = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

// ---- hostile inputs

/** A PNG whose header claims w × h (CRC fixed, so only the size is wrong): a decompression bomb's header. */
function patchedPng(base: Buffer, w: number, h: number): Buffer {
  const b = Buffer.from(base);
  b.writeUInt32BE(w, 16);
  b.writeUInt32BE(h, 20);
  b.writeUInt32BE(crc32(b.subarray(12, 29)), 29);
  return b;
}

/** Seeded broken images: random bytes, magic numbers then noise, truncations, empty files, lying headers. */
function garbageImages(r: ReturnType<typeof rng>, good: Buffer, n: number): Record<string, Buffer> {
  const kinds = ['random', 'pngmagic', 'truncated', 'jpegmagic', 'empty', 'bmp-huge', 'png-bomb', 'gifmagic', 'webpmagic', 'tiffmagic'] as const;
  const out: Record<string, Buffer> = {};
  for (let i = 0; i < n; i++) {
    const kind = kinds[i % kinds.length]!;
    const noise = Buffer.from(r.bytes(r.int(0, 3000)));
    let b: Buffer;
    switch (kind) {
      case 'random': b = noise; break;
      case 'pngmagic': b = Buffer.concat([good.subarray(0, 8), noise]); break;
      case 'truncated': b = good.subarray(0, r.int(8, good.length - 20)); break;
      case 'jpegmagic': b = Buffer.concat([Buffer.from([0xff, 0xd8, 0xff, 0xe0]), noise]); break;
      case 'empty': b = Buffer.alloc(0); break;
      case 'bmp-huge': {
        b = Buffer.alloc(54 + r.int(0, 200));
        b.write('BM', 0, 'latin1'); b.writeUInt32LE(54, 10); b.writeUInt32LE(40, 14);
        b.writeInt32LE(100_000, 18); b.writeInt32LE(-100_000, 22); b.writeUInt16LE(24, 28);
        break;
      }
      case 'png-bomb': b = patchedPng(good, 30_000 + r.int(0, 9), 30_000); break;
      case 'gifmagic': b = Buffer.concat([Buffer.from('GIF89a'), noise]); break;
      case 'webpmagic': b = Buffer.concat([Buffer.from('RIFF\0\0\0\0WEBPVP8 '), noise]); break;
      case 'tiffmagic': b = Buffer.concat([Buffer.from([0x49, 0x49, 0x2a, 0]), noise]); break;
    }
    out[`garbage${i}-${kind}.${kind === 'bmp-huge' ? 'bmp' : 'png'}`] = b;
  }
  return out;
}

/** Writes {"file_name": "a.png", "text": "<n × 'x'>"} without building the line in memory. */
function writeHugeJsonl(file: string, prefixLines: string, n: number): void {
  const fd = openSync(file, 'w');
  try {
    writeSync(fd, `${prefixLines}{"file_name": "a.png", "text": "`);
    const chunk = Buffer.alloc(16 << 20, 'x');
    for (let left = n; left > 0; left -= chunk.length) writeSync(fd, chunk, 0, Math.min(left, chunk.length));
    writeSync(fd, '"}\n{"file_name": "a.png", "text": "after"}\n');
  } finally {
    closeSync(fd);
  }
}

/** Malformed metadata rows, each at a seeded line; every error must name the file and that line. */
function malformedRows(r: ReturnType<typeof rng>, good: Buffer): (LoadSpec & Expect)[] {
  const ok = { file_name: 'a.png', text: 'fine' };
  type Variant = [string, string | object, RegExp | 'accept', string?];
  const variants: Variant[] = [
    ['row null', 'null', /is not a JSON object \(got null\)/],
    ['row list', '[{"file_name": "a.png"}]', /is not a JSON object \(got a list of 1/],
    ['row number', String(r.int(-1e6, 1e6)), /is not a JSON object \(got -?\d+ \(a number\)\)/],
    ['row string', '"a.png"', /is not a JSON object/],
    ['row true', 'true', /is not a JSON object \(got true \(a boolean\)\)/],
    ['file_name missing', { text: 'x' }, /has no 'file_name' column/],
    ['file_name number', { file_name: r.int(0, 99), text: 'x' }, /'file_name' must be a relative file path, got \d+/],
    ['file_name null', { file_name: null, text: 'x' }, /'file_name' must be a relative file path, got null/],
    ['file_name object', { file_name: { a: 1 }, text: 'x' }, /'file_name' must be a relative file path, got an object/],
    ['file_name empty', { file_name: '', text: 'x' }, /'file_name' must be a relative file path, got ""/],
    ['file_name NUL', { file_name: 'a.png\u0000x', text: 'x' }, /file_name 'a\.png.x' contains a NUL character/],
    ['file_name missing file', { file_name: 'nope.png', text: 'x' }, /file_name 'nope\.png' does not exist/],
    ['file_name a folder', { file_name: 'sub', text: 'x' }, /'.*sub' is not an image/],
    ['file_name escapes through a folder', { file_name: 'sub/../../../x.png', text: 'x' }, /points outside the dataset folder/],
    ['caption number', { file_name: 'a.png', text: r.next() }, /Caption column `text` should contain .*got [\d.e-]+ \(a number\)/],
    ['caption null', { file_name: 'a.png', text: null }, /Caption column `text` .*got null/],
    ['caption empty list', { file_name: 'a.png', text: [] }, /got a list of 0/],
    ['caption mixed list', { file_name: 'a.png', text: ['a', 2] }, /got a list of 2/],
    ['caption deeply nested', `{"file_name": "a.png", "text": ${'['.repeat(200_000)}${']'.repeat(200_000)}}`, /got a list of 1 \(a list of 1\)/],
    ['caption missing', { file_name: 'a.png' }, /no value for the caption column 'text'/],
    ['invalid JSON', '{"file_name": "a.png", "text": "x', /is not valid JSON/],
    ['a BOM, CRLF and blank lines', 'BOM', 'accept'],
    ['duplicate keys', '{"file_name": "a.png", "text": "one", "text": "two"}', 'accept'],
    ['csv: too few fields', 'csv:a.png', /has 1 fields, the header \(line 1\) has 2/, 'csv'],
    ['csv: unterminated quote', 'csv:a.png,"open', /unterminated quoted field \(the row starting at line/, 'csv'],
    ['csv: stray quote', 'csv:a.png,x"y', /unexpected quote inside an unquoted field \(line/, 'csv'],
  ];
  return variants.map(([what, bad, expect, format], i) => {
    const at = r.int(1, 4); // good rows before the bad one: the error must name its line
    const files: Record<string, Buffer | string> = { 'a.png': good, 'sub/b.png': good };
    let line = at + 1;
    if (format === 'csv') {
      files['metadata.csv'] = ['file_name,text', ...Array.from({ length: at }, () => 'a.png,fine'), (bad as string).slice(4)].join('\r\n');
      line = at + 2;
    } else if (bad === 'BOM') {
      files['metadata.jsonl'] = `\ufeff${jsonl(Array.from({ length: at }, () => ok)).replace(/\n/g, '\r\n\r\n  \r\n')}\r\n`;
    } else {
      files['metadata.jsonl'] = jsonl([...Array.from({ length: at }, () => ok), bad]);
    }
    const dir = folder(`rows-${i}`, files);
    if (expect === 'accept') {
      const rows = bad === 'BOM' ? at : at + 1;
      return { kind: 'folder' as const, dir, what, mayAccept: true, check: (res: LoadResult) => (res.length === rows ? true : `${res.length} rows, expected ${rows}`) };
    }
    return { kind: 'folder' as const, dir, what: `${what} (line ${line})`, error: expect, names: [join(dir, format === 'csv' ? 'metadata.csv' : 'metadata.jsonl'), `line ${line}`] };
  });
}

const cases: FuzzCase[] = [];

beforeAll(async () => {
  const r = rng(SEED);
  root = mkdtempSync(join(tmpdir(), 'difflora-fuzz-data-'));
  childTmp = join(root, 'tmp');
  mkdirSync(childTmp);
  secretDir = join(root, 'private');
  mkdirSync(secretDir);
  secretPng = join(secretDir, 'secret.png');
  secretKey = join(secretDir, 'id_rsa');
  const secretImage = await png(SENTINEL_RGB, 12, 12);
  writeFileSync(secretPng, secretImage);
  writeFileSync(secretKey, `-----BEGIN DIFFLORA SENTINEL ${SEED}-----\n`);
  secretParquet = join(secretDir, 'train.parquet');
  writeFileSync(secretParquet, columnsParquet([{ name: 'image', data: [secretImage], type: 'BYTE_ARRAY' }, { name: 'text', data: ['secret'], type: 'STRING' }]));
  writeFileSync(join(secretDir, 'metadata.jsonl'), jsonl([{ file_name: 'a.png', text: 'planted' }]));
  secretBytes = [secretImage, readFileSync(secretKey)];

  const good = await png([40, 60, 200]);
  const good2 = await png([200, 40, 60], 14, 9);
  const meta = (...names: string[]): string => jsonl(names.map((n, i) => ({ file_name: n, text: `caption ${i}` })));
  const one = (name: string, spec: LoadSpec, error: RegExp, timeoutMs = 20_000): FuzzCase => ({ name, script: loadScript([spec]), error, timeoutMs });
  const folderIn = (dir: string, what: string, error: RegExp, skipBroken = false): LoadSpec & Expect => ({ kind: 'folder', dir, what, error, skipBroken });

  // -- imagefolder: escapes (the issue's shapes first, each alone; then the variants in one child)
  const fAbs = folder('f-abs', { 'a.png': good, 'metadata.jsonl': meta('a.png', secretPng) });
  const upSteps = '../'.repeat(r.int(1, 12));
  const relSecret = relative(join(root, 'f-rel'), secretPng);
  cases.push(
    one('folder: file_name is the absolute path of a file outside', { kind: 'folder', dir: fAbs }, new RegExp(`line 2: file_name '${esc(secretPng)}' points outside the dataset folder`)),
    one('folder: an image symlink to a file outside', { kind: 'folder', dir: folder('f-link', { 'a.png': good, 'metadata.jsonl': meta('a.png', 'b.png') }, { 'b.png': secretPng }) },
      new RegExp(`dataset entry '.*f-link/b\\.png' is a symbolic link that resolves to '${esc(secretPng)}', outside`)),
    batchCase('folder: escapes: ../, symlinked folders, link loops, /dev/zero, linked metadata', [
      folderIn(folder('f-rel', { 'a.png': good, 'metadata.jsonl': meta('a.png', relSecret) }), 'file_name climbing out with ../',
        new RegExp(`file_name '${esc(relSecret)}' points outside the dataset folder`)),
      folderIn(folder('f-rel2', { 'a.png': good, 'metadata.jsonl': meta(`${upSteps}${secretPng.slice(1)}`) }), `file_name climbing ${upSteps.length / 3} ../ out then back down`,
        /points outside the dataset folder/),
      folderIn(folder('f-dirlink', { 'a.png': good, 'metadata.jsonl': meta('a.png', 'more/secret.png') }, { more: secretDir }), 'a subfolder linked to a folder outside',
        new RegExp(`dataset entry '.*f-dirlink/more' is a symbolic link that resolves to '${esc(secretDir)}'`)),
      folderIn(folder('f-loop', { 'a.png': good, 'sub/b.png': good, 'metadata.jsonl': meta('a.png') }, { 'sub/up': '..' }), 'a subfolder linking back up (a loop)',
        /dataset entry '.*f-loop\/sub\/up' is the folder '.*f-loop' again \(a symbolic link loop/),
      folderIn(folder('f-selfloop', { 'a.png': good, 'metadata.jsonl': meta('a.png') }, { 'b.png': 'b.png' }), 'an image linking to itself',
        /dataset entry '.*f-selfloop\/b\.png' is a symbolic link that is a symbolic link loop/),
      folderIn(folder('f-zero', { 'a.png': good, 'metadata.jsonl': meta('a.png', 'zero.png') }, { 'zero.png': '/dev/zero' }), '/dev/zero linked as an image',
        /dataset entry '.*f-zero\/zero\.png' is a symbolic link that resolves to '\/dev\/zero'/),
      folderIn(folder('f-metalink', { 'a.png': good }, { 'metadata.jsonl': join(secretDir, 'metadata.jsonl') }), 'metadata.jsonl linked from outside',
        /f-metalink\/metadata\.jsonl' is a symbolic link that resolves to '.*private\/metadata\.jsonl', outside/),
      folderIn(folder('f-rowlink', { 'a.png': good, 'metadata.jsonl': jsonl([{ file_name: 'a.png', mask_file_name: 'notes', text: 'x' }]) }, { notes: secretKey }),
        'another *_file_name column through a link', new RegExp(`line 1: mask_file_name 'notes' resolves to '${esc(secretKey)}', outside the dataset folder`)),
    ]),
  );

  // -- imagefolder: special files (a hang here is a hang of this one child)
  const fifoImage = folder('f-fifo', { 'a.png': good, 'b.png': good2, 'metadata.jsonl': meta('a.png', 'pipe.png', 'b.png') });
  execFileSync('mkfifo', [join(fifoImage, 'pipe.png')]);
  const fifoJsonl = folder('f-fifo-jsonl', { 'a.png': good });
  execFileSync('mkfifo', [join(fifoJsonl, 'metadata.jsonl')]);
  const fifoCsv = folder('f-fifo-csv', { 'a.png': good });
  execFileSync('mkfifo', [join(fifoCsv, 'metadata.csv')]);
  const dirImage = folder('f-dirimage', { 'a.png': good, 'dir.png/x': 'x', 'metadata.jsonl': meta('a.png', 'dir.png') });
  cases.push(batchCase('folder: FIFOs as an image and as metadata, a folder as an image', [
    folderIn(fifoImage, 'a FIFO image', /cannot read image '.*f-fifo\/pipe\.png': .*is a FIFO, not a regular file/),
    {
      kind: 'folder', dir: fifoImage, skipBroken: true, what: 'a FIFO image, --skip_broken_images', mayAccept: true,
      check: (res) => (res.skipped === 1 && /pipe\.png: .*FIFO/.test(res.skippedFiles![0]!) && res.captionLengths!.length === 2 ? true : `skipped ${JSON.stringify(res.skippedFiles)}`),
    },
    folderIn(fifoJsonl, 'a FIFO metadata.jsonl', /metadata file '.*f-fifo-jsonl\/metadata\.jsonl' is a FIFO, not a regular file/),
    folderIn(fifoCsv, 'a FIFO metadata.csv', /metadata file '.*f-fifo-csv\/metadata\.csv' is a FIFO, not a regular file/),
    folderIn(dirImage, 'a folder named like an image', /cannot read image '.*f-dirimage\/dir\.png': .*is a directory/),
  ]));

  // -- imagefolder: broken images
  const garbage = garbageImages(r, good, 10);
  const gNames = Object.keys(garbage);
  const gDir = folder('f-garbage', { 'a.png': good, 'b.png': good2, ...garbage, 'metadata.jsonl': meta('a.png', ...gNames, 'b.png') });
  cases.push(batchCase(`folder: ${gNames.length} seeded broken images (${gNames.join(', ')}), strict and skipped`, [
    folderIn(gDir, 'strict', /cannot read image '.*f-garbage\/garbage\d+-[a-z-]+\.(png|bmp)'/),
    {
      kind: 'folder', dir: gDir, skipBroken: true, what: '--skip_broken_images', mayAccept: true,
      check: (res) => (res.captionLengths!.length + res.skipped! === gNames.length + 2 && res.skipped! >= gNames.length - 2 &&
        res.skippedFiles!.every((f) => /garbage\d+/.test(f)) ? true : `decoded ${res.captionLengths!.length}, skipped ${JSON.stringify(res.skippedFiles)}`),
    },
  ]));

  // -- imagefolder: unbounded input (the issue's examples: a 300 MB caption line, a 50 MB CSV caption)
  const huge300 = folder('f-huge300', { 'a.png': good });
  writeHugeJsonl(join(huge300, 'metadata.jsonl'), `${JSON.stringify({ file_name: 'a.png', text: 'short' })}\n`, 300 * 1024 * 1024);
  const csv50 = folder('f-csv50', { 'a.png': good, 'b.png': good2 });
  {
    const fd = openSync(join(csv50, 'metadata.csv'), 'w');
    writeSync(fd, 'file_name,text\r\nb.png,"a normal caption"\r\na.png,"');
    const chunk = Buffer.alloc(10 << 20, 'word, "" '); // commas and escaped quotes inside the quoted field
    for (let i = 0; i < 5; i++) writeSync(fd, chunk);
    writeSync(fd, '"\r\n');
    closeSync(fd);
  }
  const hugeCheck = (file: string, line: number, n: number) => accepted((res) => {
    if (res.warnings!.length !== 1) return `${res.warnings!.length} warnings`;
    if (!res.warnings![0]!.includes(`${file}: line ${line} (column 'text')`)) return `warning does not name ${file} line ${line}: ${res.warnings![0]}`;
    if (res.captionLengths!.length !== n || !res.captionLengths!.includes(CAP)) return `caption lengths ${JSON.stringify(res.captionLengths)}`;
    if (res.skipped !== 0) return 'a caption problem was reported as a broken image';
    return true;
  });
  cases.push(
    { name: 'folder: a 300 MB caption line (metadata.jsonl)', script: loadScript([{ kind: 'folder', dir: huge300 }]), mayAccept: true, timeoutMs: 45_000, check: hugeCheck(join(huge300, 'metadata.jsonl'), 2, 3) },
    { name: 'folder: a 50 MB caption with quotes and commas (metadata.csv)', script: loadScript([{ kind: 'folder', dir: csv50 }]), mayAccept: true, timeoutMs: 45_000, check: hugeCheck(join(csv50, 'metadata.csv'), 3, 2) },
  );

  // -- imagefolder: malformed rows, an oversized metadata file, unicode file names (one child, each reported)
  const tooBig = folder('f-toobig', { 'a.png': good, 'metadata.jsonl': meta('a.png') });
  truncateSync(join(tooBig, 'metadata.jsonl'), 600 * 1024 * 1024); // sparse
  const names = ['\u00e9t\u00e9.png', 'e\u0301te\u0301.png', '\u{1F600} smile.png', '\u05e9\u05dc\u05d5\u05dd.png', 'new\nline.png', 'tab\tname.png', '#%?&.png', '\u00fcn\u00efc\u00f6d\u00e9/\u65e5\u672c.png', ' lead and trail .png'];
  const uni = folder('f-unicode', Object.fromEntries([...names.map((n) => [n, good] as const), ['metadata.jsonl', meta(...names)]]));
  cases.push(batchCase('folder: malformed metadata rows and csv (each at a seeded line), a 600 MB metadata file, unicode file names', [
    ...malformedRows(r, good),
    folderIn(tooBig, 'a 600 MB (sparse) metadata.jsonl', /metadata file '.*f-toobig\/metadata\.jsonl' is 629145600 bytes, more than the 524288000 allowed/),
    {
      kind: 'folder', dir: uni, what: 'unicode, NFC/NFD, emoji, RTL, newline and tab file names', mayAccept: true,
      check: (res) => (res.length === names.length && res.skipped === 0 && res.captionLengths!.length === names.length ? true : JSON.stringify(res)),
    },
  ]));

  // -- parquet: escapes (the issue's example alone; with --skip_broken_images and the variants in one child)
  const pAbs = folder('p-abs', { 'train.parquet': structParquet([{ bytes: null, path: secretKey }], ['x']) });
  const pAbsError = new RegExp(`${esc(join(pAbs, 'train.parquet'))}: row 0: image column 'image' has no bytes, and its path '${esc(secretKey)}' points outside the dataset folder`);
  const pRelPath = relative(join(root, 'p-rel'), secretPng);
  const pRel = folder('p-rel', { 'train.parquet': structParquet([{ bytes: good, path: null }, { bytes: null, path: pRelPath }], ['ok', 'x']) });
  const pLinkCell = folder('p-linkcell', { 'train.parquet': structParquet([{ bytes: null, path: 'inside.png' }], ['x']) }, { 'inside.png': secretPng });
  const pLinkFile = folder('p-linkfile', {}, { 'train.parquet': secretParquet });
  const pLinkDir = folder('p-linkdir', {}, { data: secretDir });
  const pFifo = folder('p-fifo', {});
  execFileSync('mkfifo', [join(pFifo, 'train.parquet')]);
  cases.push(
    one('parquet: {bytes: null, path: <a key file outside>}', { kind: 'parquet', dir: pAbs }, pAbsError),
    batchCase('parquet: path cells that climb or link out, files and folders linked from outside, a FIFO', [
      { kind: 'parquet', dir: pAbs, skipBroken: true, what: '{bytes: null, path: <outside>}, --skip_broken_images', error: pAbsError },
      { kind: 'parquet', dir: pRel, what: 'relative ../ path', error: new RegExp(`p-rel/train\\.parquet: row 1: .*path '${esc(pRelPath)}' points outside the dataset folder`) },
      { kind: 'parquet', dir: pLinkCell, what: 'path through a symlink', error: new RegExp(`row 0: .*path 'inside\\.png' resolves to '${esc(secretPng)}', outside the dataset folder`) },
      { kind: 'parquet', dir: pLinkFile, what: 'parquet file linked from outside', error: new RegExp(`dataset entry '.*p-linkfile/train\\.parquet' is a symbolic link that resolves to '${esc(secretParquet)}'`) },
      { kind: 'parquet', dir: pLinkDir, what: 'folder linked from outside', error: new RegExp(`dataset entry '.*p-linkdir/data' is a symbolic link that resolves to '${esc(secretDir)}'`) },
      { kind: 'parquet', dir: pFifo, what: 'a FIFO as the parquet file', error: /parquet file '.*p-fifo\/train\.parquet' is a FIFO, not a regular file/ },
    ]),
  );

  // -- parquet: garbage files (random, truncated, bit-flipped)
  const garbageParquet = (name: string, bytes: Buffer, what: string): LoadSpec & Expect => {
    const dir = folder(name, { 'train.parquet': bytes });
    return {
      kind: 'parquet', dir, skipBroken: true, decodeTimeoutMs: 4000, what, error: new RegExp(`${esc(join(dir, 'train.parquet'))}|every image of the dataset failed`),
      mayAccept: true, check: (res) => (res.length! <= 3 ? true : `${res.length} rows`),
    };
  };
  const realParquet = structParquet([{ bytes: good, path: 'a.png' }, { bytes: good2, path: null }, { bytes: good, path: null }], ['a', 'b', 'c']);
  const broken: (LoadSpec & Expect)[] = [];
  for (let i = 0; i < 8; i++) {
    let b: Buffer;
    let what: string;
    if (i === 0) { b = Buffer.from(r.bytes(r.int(0, 64))); what = 'random bytes'; } else if (i === 1) { b = Buffer.from('PAR1'); what = 'magic only'; } else if (i < 4) {
      const cut = r.int(1, realParquet.length - 1);
      b = realParquet.subarray(0, cut); what = `truncated at ${cut}`;
    } else {
      b = Buffer.from(realParquet);
      const at = i < 6 ? r.int(b.length - 200, b.length - 9) : r.int(4, b.length - 9); // in the footer, or anywhere
      b[at] = b[at]! ^ (1 << r.int(0, 7));
      what = `bit ${at} flipped`;
    }
    broken.push(garbageParquet(`p-garbage${i}`, b, what));
  }
  // a page-header byte whose change made hyparquet loop for ever (found by this fuzz): the watchdog stops it
  const pathPage = Number(parquetMetadata(new Uint8Array(realParquet).buffer).row_groups[0]!.columns[1]!.meta_data!.data_page_offset);
  const looping = Buffer.from(realParquet);
  looping[pathPage + 13] = 0x11;
  broken.push({ ...garbageParquet('p-garbage-loop', looping, 'a definition-level header that never advances'), mayAccept: false, error: /p-garbage-loop\/train\.parquet: not a readable parquet file: it is corrupt or hostile: decoding did not finish in 4 s/ });
  cases.push(batchCase('parquet: seeded garbage, truncated and bit-flipped files', broken));

  // -- parquet: wrong types and null cells, a huge caption
  const pq = (name: string, columnData: ParquetArgs['columnData']): string => folder(name, { 'train.parquet': columnsParquet(columnData) });
  const imgs = [good, good2];
  const typed = (dir: string, what: string, error: RegExp): LoadSpec & Expect => ({ kind: 'parquet', dir, what, error, names: [`${join(dir, 'train.parquet')}: row `] });
  const hugeCaption = 'a pokemon with a long caption '.repeat(200_000);
  const pHuge = pq('p-huge', [{ name: 'image', data: imgs, type: 'BYTE_ARRAY' }, { name: 'text', data: ['short', hugeCaption], type: 'STRING' }]);
  cases.push(batchCase('parquet: wrong column types, null cells, a 6 MB caption', [
    typed(pq('p-int', [{ name: 'image', data: imgs, type: 'BYTE_ARRAY' }, { name: 'text', data: [BigInt(r.int(0, 1e6)), 2n], type: 'INT64' }]), 'int64 captions', /got \d+ \(an integer\)/),
    typed(pq('p-float', [{ name: 'image', data: imgs, type: 'BYTE_ARRAY' }, { name: 'text', data: [r.next(), 2.5], type: 'DOUBLE' }]), 'double captions', /got [\d.e-]+ \(a number\)/),
    typed(pq('p-nullcap', [{ name: 'image', data: imgs, type: 'BYTE_ARRAY' }, { name: 'text', data: ['ok', null], type: 'STRING' }]), 'a null caption', /got null/),
    typed(pq('p-nullimg', [{ name: 'image', data: [null, good], type: 'BYTE_ARRAY' }, { name: 'text', data: ['a', 'b'], type: 'STRING' }]), 'a null image', /should hold \{bytes, path\} structs or binary, got null/),
    typed(pq('p-strimg', [{ name: 'image', data: ['a.png', 'b.png'], type: 'STRING' }, { name: 'text', data: ['a', 'b'], type: 'STRING' }]), 'string images', /got "a\.png"/),
    typed(pq('p-boolimg', [{ name: 'image', data: [true, false], type: 'BOOLEAN' }, { name: 'text', data: ['a', 'b'], type: 'STRING' }]), 'boolean images', /got true \(a boolean\)/),
    typed(folder('p-nullstruct', { 'train.parquet': structParquet([{ bytes: null, path: null }], ['x']) }), 'a struct with neither bytes nor path', /has no image bytes and no path|got null/),
    { kind: 'parquet', dir: pq('p-nocol', [{ name: 'img', data: imgs, type: 'BYTE_ARRAY' }, { name: 'text', data: ['a', 'b'], type: 'STRING' }]), what: 'no image column', error: /--image_column' value 'image' needs to be one of: img, text/ },
    {
      kind: 'parquet', dir: pHuge, what: 'a 6 MB caption', mayAccept: true,
      check: (res) => (res.warnings!.length === 1 && res.warnings![0]!.includes(`${join(pHuge, 'train.parquet')}: row 1 (column 'text')`) && res.captionLengths!.join() === `5,${CAP}` ? true : JSON.stringify(res).slice(0, 400)),
    },
  ]));

  // -- through `difflora train` (a few: ~3 s each)
  const train = (data: string[], out: string, ...more: string[]): string[] => {
    outputs.push(out);
    return ['train', `--pretrained_model_name_or_path=${tinySd}`, ...data, `--output_dir=${out}`, '--max_train_steps=1', '--resolution=32', '--train_batch_size=2', ...more];
  };
  const pGood = folder('p-good', { 'data/train-00000.parquet': realParquet });
  const pGoodTmp = join(root, 'tmp-pgood');
  mkdirSync(pGoodTmp);
  outputs.push(pGoodTmp);
  cases.push(
    { name: 'cli: imagefolder row naming a file outside', cli: train(['--train_data_dir', fAbs], join(root, 'out-abs')), error: new RegExp(`file_name '${esc(secretPng)}' points outside the dataset folder`), timeoutMs: 60_000 },
    { name: 'cli: parquet {bytes: null, path: <outside>} with --skip_broken_images', cli: train(['--dataset_name', pAbs], join(root, 'out-pabs'), '--skip_broken_images'), error: pAbsError, timeoutMs: 60_000 },
    {
      name: 'cli: a FIFO image skipped with --skip_broken_images', cli: train(['--train_data_dir', fifoImage], join(root, 'out-fifo'), '--skip_broken_images', '--train_batch_size=3'), mayAccept: true, timeoutMs: 60_000,
      check: (raw) => (/skipped 1 unreadable image\(s\) \(--skip_broken_images\): .*f-fifo\/pipe\.png/.test(raw.stderr) ? true : `stderr: ${raw.stderr.slice(-400)}`),
    },
    {
      name: 'cli: a 50 MB csv caption: cut with one warning, never a broken image', cli: train(['--train_data_dir', csv50], join(root, 'out-csv50')), mayAccept: true, timeoutMs: 60_000,
      check: (raw) => {
        const warnings = raw.stderr.match(/caption\(s\) longer than/g) ?? [];
        if (warnings.length !== 1) return `${warnings.length} caption warnings: ${raw.stderr.slice(-400)}`;
        if (!raw.stderr.includes(`${join(csv50, 'metadata.csv')}: line 3 (column 'text')`)) return 'the warning does not name the file and line';
        if (/broken|unreadable|cannot read image/.test(raw.stderr)) return 'a caption reported as an image problem';
        return true;
      },
    },
    {
      // train_data does not close the dataset: the folder must go when the process exits
      name: 'cli: a parquet dataset trains, its private image folder is removed at exit', cli: train(['--dataset_name', pGood], join(root, 'out-pgood')),
      env: { TMPDIR: pGoodTmp }, mayAccept: true, timeoutMs: 60_000,
      check: () => (difflora(pGoodTmp).length === 0 ? true : `left in TMPDIR: ${difflora(pGoodTmp).join(', ')}`),
    },
  );
});

afterAll(() => { if (root) rmSync(root, { recursive: true, force: true }); });

/** What difflora left in a temp folder (tsx keeps its own cache there). */
const difflora = (dir: string): string[] => readdirSync(dir).filter((n) => n.startsWith('difflora'));

/** Every case runs with TMPDIR in childTmp (unless it names its own), so that what it leaves there is seen. */
const withTmp = (c: FuzzCase): FuzzCase => ({ ...c, env: { TMPDIR: childTmp, ...c.env } });


/** Every regular file under dir (symlinks and special files are not followed or read). */
function regularFiles(dir: string, out: string[] = []): string[] {
  if (!existsSync(dir)) return out;
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    const st = lstatSync(p);
    if (st.isDirectory()) regularFiles(p, out);
    else if (st.isFile()) out.push(p);
  }
  return out;
}

describe('fuzz: hostile datasets', () => {
  it(`seed ${SEED}: no crash, hang or silent result; nothing outside a dataset is read or copied; no temp folder left`, async () => {
    const results = await runCases(cases.map(withTmp), 2);
    const { counts, failures } = report(results);
    if (process.env.DIFFLORA_FUZZ_TIMES) for (const x of results) console.log(`${x.ms} ms ${x.verdict} ${x.name}`);
    console.log(`fuzz data (seed ${SEED}): ${cases.length} cases`, counts, `${Math.round(results.reduce((s, x) => s + x.ms, 0) / 1000)} s of child time`);
    expect(counts.crash + counts.hang + counts.silent, failures).toBe(0);

    // nothing was left in the children's temp folder, and no copy of the secrets is anywhere difflora wrote
    expect(difflora(childTmp)).toEqual([]);
    for (const f of [...regularFiles(childTmp), ...outputs.flatMap((o) => regularFiles(o))]) {
      const body = readFileSync(f);
      for (const s of secretBytes) expect(body.includes(s), `${f} holds a copy of a secret`).toBe(false);
    }
  }, 300_000);
});
