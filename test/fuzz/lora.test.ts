// Seeded fuzz suite for LoRA files (issues #12/#13): mutations of the diffusers and Kohya goldens — dtypes
// changed to int32/bool, extra and 71 dimensions, rank mismatches, shapes that fit no layer, NaN/inf values,
// alphas NaN/negative/zero/of the wrong shape, renamed and unknown keys, mixed layouts, one target given twice,
// empty and truncated files, garbage headers and metadata, a FIFO — loaded
//   • by the tiny-sd pipeline's loadLoraWeights, in child processes that hash every weight and the adapter
//     lists before and after each load: a refusal must name the file and the key and change nothing;
//   • by `difflora convert-lora`: a refusal exits 1 naming the key and writes no output.
// Some mutations are valid files (bfloat16 weights, PEFT key names, odd metadata): they must load and be right.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fixtures } from '../helpers.js';
import { tinySd } from '../cli_helpers.js';
import { report, rng, runCases, type FuzzCase, type RawResult } from './harness.js';

const diffusersFile = join(fixtures, 'goldens', 'lora-diffusers', 'pytorch_lora_weights.safetensors');
const kohyaFile = join(fixtures, 'goldens', 'lora-kohya', 'tiny_sd_kohya_lora.safetensors');
const formatsDir = join(fixtures, 'goldens', 'lora-formats');

// ---- safetensors by hand (hostile files cannot always be made from tensors)

interface RawTensor { dtype: string; shape: number[]; data: Buffer }
interface RawFile { tensors: Map<string, RawTensor>; metadata: Record<string, unknown> | undefined }

function readRaw(file: string): RawFile {
  const bytes = readFileSync(file);
  const n = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + n).toString('utf8')) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
  const base = 8 + n;
  const tensors = new Map<string, RawTensor>();
  let metadata: Record<string, unknown> | undefined;
  for (const [k, v] of Object.entries(header)) {
    if (k === '__metadata__') metadata = v as unknown as Record<string, unknown>;
    else tensors.set(k, { dtype: v.dtype, shape: v.shape, data: Buffer.from(bytes.subarray(base + v.data_offsets[0], base + v.data_offsets[1])) });
  }
  return { tensors, metadata };
}

function encode(f: RawFile): Buffer {
  const header: Record<string, unknown> = {};
  if (f.metadata !== undefined) header.__metadata__ = f.metadata;
  let offset = 0;
  for (const [k, t] of f.tensors) {
    header[k] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.data.length] };
    offset += t.data.length;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - ((8 + Buffer.byteLength(json)) % 8)) % 8);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
  return Buffer.concat([len, Buffer.from(json), ...[...f.tensors.values()].map((t) => t.data)]);
}

const f32 = (values: number[]): Buffer => Buffer.from(new Float32Array(values).buffer);
const numel = (shape: number[]): number => shape.reduce((a, b) => a * b, 1);
const clone = (f: RawFile): RawFile => ({ metadata: f.metadata, tensors: new Map([...f.tensors].map(([k, t]) => [k, { ...t, data: Buffer.from(t.data) }])) });
const esc = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

// ---- the mutations

/** A mutated file: its bytes, what the error must name (null: a valid file that must load), and a label. */
interface Mutation { name: string; bytes: Buffer; names: string[] | null; convertNames?: string[] | null }

function mutations(seed: number): Mutation[] {
  const r = rng(seed);
  const D = readRaw(diffusersFile);
  const K = readRaw(kohyaFile);
  const dKeys = [...D.tensors.keys()];
  const downKeys = dKeys.filter((k) => k.endsWith('.lora.down.weight'));
  const kAlphas = [...K.tensors.keys()].filter((k) => k.endsWith('.alpha'));
  const out: Mutation[] = [];
  const add = (name: string, f: RawFile | Buffer, names: string[] | null, convertNames?: string[] | null): void => {
    out.push({ name, bytes: Buffer.isBuffer(f) ? f : encode(f), names, convertNames });
  };
  const withTensor = (base: RawFile, key: string, t: RawTensor): RawFile => {
    const f = clone(base);
    f.tensors.set(key, t);
    return f;
  };
  const some = (keys: string[]): string => r.pick(keys);

  // the issue's examples: int32 and bool weights, a 71-dimensional weight, a down/up pair of different ranks
  let k = some(dKeys);
  let t = D.tensors.get(k)!;
  add(`int32 weight ${k}`, withTensor(D, k, { ...t, dtype: 'I32' }), [k, 'int32']);
  k = some(dKeys);
  t = D.tensors.get(k)!;
  add(`bool weight ${k}`, withTensor(D, k, { dtype: 'BOOL', shape: t.shape, data: Buffer.alloc(numel(t.shape), 1) }), [k]);
  k = some(dKeys);
  add(`71-dim weight ${k}`, withTensor(D, k, { dtype: 'F32', shape: Array<number>(71).fill(1), data: f32([0.5]) }), [k]);
  k = some(downKeys);
  const up = k.replace('.lora.down.weight', '.lora.up.weight');
  const upShape = D.tensors.get(up)!.shape;
  add(`rank mismatch at ${up}`, withTensor(D, up, { dtype: 'F32', shape: [upShape[0]!, 2], data: f32(Array<number>(upShape[0]! * 2).fill(0.01)) }), [k, 'rank']);
  // one extra dimension; a shape that fits no layer; a 3×3 up of a 4-D pair
  k = some(downKeys);
  t = D.tensors.get(k)!;
  add(`3-D weight ${k}`, withTensor(D, k, { ...t, shape: [...t.shape, 1] }), [k, '3 dimensions']);
  k = some(downKeys);
  t = D.tensors.get(k)!;
  const wider = [t.shape[0]!, t.shape[1]! + r.int(1, 7)];
  add(`wrong in-features ${k}`, withTensor(D, k, { dtype: 'F32', shape: wider, data: f32(Array<number>(numel(wider)).fill(0.01)) }), [k, 'needs']);
  // NaN and inf in a weight
  for (const bad of [Number.NaN, Number.POSITIVE_INFINITY]) {
    k = some(dKeys);
    t = D.tensors.get(k)!;
    const data = Buffer.from(t.data);
    data.writeFloatLE(bad, 4 * r.int(0, numel(t.shape) - 1));
    add(`${bad} in ${k}`, withTensor(D, k, { ...t, data }), [k, 'NaN or infinite']);
  }
  // alphas: NaN, negative, zero, a [2] tensor, int64 (valid: a scalar of value 3)
  for (const [label, alpha] of [['NaN', { dtype: 'F32', shape: [], data: f32([Number.NaN]) }], ['negative', { dtype: 'F32', shape: [], data: f32([-r.int(1, 8)]) }],
    ['zero', { dtype: 'F32', shape: [], data: f32([0]) }], ['shape [2]', { dtype: 'F32', shape: [2], data: f32([2, 2]) }]] as const) {
    k = some(kAlphas);
    add(`alpha ${label} at ${k}`, withTensor(K, k, { ...alpha, shape: [...alpha.shape] }), [k, 'alpha']);
  }
  // renamed and unknown keys, a half pair
  k = some(downKeys);
  const renamed = clone(D);
  const renamedKey = k.replace('.to_', '.tu_');
  renamed.tensors.set(renamedKey, renamed.tensors.get(k)!);
  renamed.tensors.delete(k);
  add(`renamed key ${renamedKey}`, renamed, [renamedKey], [k.replace('.lora.down.weight', '.lora.up.weight')]);
  add('unknown key', withTensor(D, 'model.diffusion_model.weird', { dtype: 'F32', shape: [1], data: f32([1]) }), ['model.diffusion_model.weird']);
  const half = clone(D);
  k = some(downKeys);
  half.tensors.delete(k);
  const otherHalf = k.replace('.lora.down.weight', '.lora.up.weight');
  add(`half pair (no ${k})`, half, [otherHalf, 'down/A weight missing']);
  // mixed layouts; one target given by two layouts
  const kk = [...K.tensors.keys()].find((x) => x.endsWith('.lora_down.weight'))!;
  const mixed = clone(D);
  for (const [x, v] of K.tensors) if (x.startsWith(kk.replace('.lora_down.weight', ''))) mixed.tensors.set(x, v);
  add('Kohya keys in a diffusers file', mixed, [kk.replace('.lora_down.weight', ''), 'mixes']);
  k = some(downKeys);
  const peftTwin = k.replace('.lora.down.weight', '.lora_A.weight');
  add(`one target twice (${peftTwin})`, withTensor(D, peftTwin, D.tensors.get(k)!), [k, peftTwin]);
  // empty, no tensors, truncated at a seeded place, garbage header, garbage metadata
  add('empty file', Buffer.alloc(0), []);
  add('no tensors', encode({ tensors: new Map(), metadata: { format: 'pt' } }), ['no LoRA weights']);
  const full = readFileSync(diffusersFile);
  add('truncated', full.subarray(0, r.int(9, full.length - 1)), []);
  const garbage = Buffer.from(full);
  garbage.set(r.bytes(16), 8 + r.int(0, 40));
  add('garbage in the header', garbage, []);
  add('metadata not strings', encode({ ...clone(D), metadata: { format: { nested: [1, 2] } as unknown as string } }), []);
  // valid files: odd metadata, bfloat16 weights, PEFT names
  add('odd metadata', encode({ ...clone(D), metadata: { format: 'pt', note: '"\\\u{1F600} '.repeat(r.int(1, 50)) } }), null);
  const half16 = clone(K);
  for (const [x, v] of half16.tensors) {
    if (!x.endsWith('.weight')) continue;
    const f = new Float32Array(v.data.buffer.slice(v.data.byteOffset, v.data.byteOffset + v.data.length));
    const bf = Buffer.alloc(f.length * 2);
    // bfloat16: the high half of each float32
    f.forEach((val, i) => bf.writeUInt16LE(Buffer.from(new Float32Array([val]).buffer).readUInt16LE(2), 2 * i));
    half16.tensors.set(x, { dtype: 'BF16', shape: v.shape, data: bf });
  }
  add('Kohya in bfloat16', half16, null);
  const peft = { metadata: undefined, tensors: new Map([...D.tensors].map(([x, v]) => [x.replace('.lora.down.weight', '.lora_A.weight').replace('.lora.up.weight', '.lora_B.weight'), v])) };
  add('PEFT names', peft, null);
  // the other layouts (goldens/lora-formats): valid as they are; LyCORIS files cannot become diffusers files
  for (const f of ['kohya_ldm_unet_te', 'loha', 'lokr', 'dora_diffusers', 'dora_kohya']) {
    const lycoris = f === 'loha' || f === 'lokr';
    add(`${f} file`, readFileSync(join(formatsDir, `${f}.safetensors`)), null, lycoris && out.length % 2 === 0 ? ['LyCORIS'] : null);
  }
  const LH = readRaw(join(formatsDir, 'loha.safetensors'));
  const LK = readRaw(join(formatsDir, 'lokr.safetensors'));
  const DK = readRaw(join(formatsDir, 'dora_kohya.safetensors'));
  const LDM = readRaw(join(formatsDir, 'kohya_ldm_unet.safetensors'));
  k = some([...LH.tensors.keys()].filter((x) => x.endsWith('.hada_w2_b')));
  const noFactor = clone(LH);
  noFactor.tensors.delete(k);
  add(`LoHa without ${k}`, noFactor, [k.replace('.hada_w2_b', ''), 'hada_w2_b missing']);
  k = some([...LH.tensors.keys()].filter((x) => x.endsWith('.hada_w1_a')));
  t = LH.tensors.get(k)!;
  add(`LoHa factor of another rank ${k}`, withTensor(LH, k, { dtype: 'F32', shape: [t.shape[0]!, 3], data: f32(Array<number>(t.shape[0]! * 3).fill(0.01)) }), [k, 'do not fit']);
  k = some([...LK.tensors.keys()].filter((x) => x.endsWith('.lokr_w2_a')));
  add(`LoKr with lokr_w2 and ${k}`, withTensor(LK, k.replace('.lokr_w2_a', '.lokr_w2'), { dtype: 'F32', shape: [8, 8], data: f32(Array<number>(64).fill(0.01)) }), [k.replace('.lokr_w2_a', ''), 'both lokr_w2']);
  k = some([...LK.tensors.keys()].filter((x) => x.endsWith('.lokr_w1')));
  t = LK.tensors.get(k)!;
  const nan = Buffer.from(t.data);
  nan.writeFloatLE(Number.NaN, 0);
  add(`NaN in ${k}`, withTensor(LK, k, { ...t, data: nan }), [k, 'NaN or infinite']);
  k = some([...DK.tensors.keys()].filter((x) => x.endsWith('.dora_scale')));
  add(`dora_scale [1, 32] at ${k}`, withTensor(DK, k, { dtype: 'F32', shape: [1, 32], data: f32(Array<number>(32).fill(1)) }), [k, 'DoRA magnitude']);
  add('LDM name outside the UNet (input_blocks_12)', withTensor(LDM, 'lora_unet_input_blocks_12_1_proj_in.lora_down.weight', { dtype: 'F32', shape: [4, 32], data: f32(Array<number>(128).fill(0.01)) }),
    ['lora_unet_input_blocks_12_1_proj_in.lora_down.weight'], null);
  return out;
}

// ---- the child processes

/** The pipeline child: loads tiny-sd (optionally with an adapter already), then each file, hashing before and after. */
function pipelineScript(files: { path: string; names: string[] | null }[], withAdapter: boolean): (lib: string) => string {
  return (lib) => `
const { createHash } = await import('node:crypto');
const { StableDiffusionPipeline } = await import(${JSON.stringify(`${lib}/pipelines/stable_diffusion.ts`)});
const pipe = StableDiffusionPipeline.fromPretrained(${JSON.stringify(tinySd)});
${withAdapter ? `pipe.loadLoraWeights(${JSON.stringify(diffusersFile)}, { adapterName: 'base' });` : ''}
const state = () => {
  const h = createHash('sha256');
  for (const m of [pipe.unet, pipe.textEncoder]) for (const [k, t] of m.stateDict()) { h.update(k); h.update(Buffer.from(t.contiguous().dataSync().buffer)); }
  h.update(JSON.stringify([pipe.getListAdapters(), pipe.getActiveAdapters()]));
  return h.digest('hex');
};
const files = ${JSON.stringify(files)};
for (const f of files) {
  const before = state();
  try {
    const r = pipe.loadLoraWeights(f.path, { adapterName: 'fuzz' });
    const loaded = pipe.getListAdapters().unet.includes('fuzz') && r.unetLayers > 0;
    pipe.deleteAdapters('fuzz');
    console.log(JSON.stringify({ path: f.path, outcome: 'accepted', loaded, restored: state() === before }));
  } catch (e) {
    console.log(JSON.stringify({ path: f.path, outcome: 'refused', message: e.message, unchanged: state() === before }));
  }
}
`;
}

interface ChildLine { path: string; outcome: 'accepted' | 'refused'; message?: string; unchanged?: boolean; loaded?: boolean; restored?: boolean }

/** Checks every input's line: a refusal names the file and each expected part and changed nothing; an acceptance loaded and was undone. */
function checkLines(files: { path: string; names: string[] | null; name: string }[]): (r: RawResult) => true | string {
  return (r) => {
    const lines = r.stdout.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as ChildLine);
    const wrong: string[] = [];
    for (const f of files) {
      const got = lines.find((l) => l.path === f.path);
      if (!got) { wrong.push(`${f.name}: no result`); continue; }
      if (f.names === null) {
        if (got.outcome !== 'accepted' || !got.loaded || !got.restored) wrong.push(`${f.name}: a valid file was not loaded right: ${JSON.stringify(got)}`);
        continue;
      }
      if (got.outcome !== 'refused') { wrong.push(`${f.name}: accepted`); continue; }
      if (!got.unchanged) wrong.push(`${f.name}: the model changed on a refused load`);
      const msg = got.message ?? '';
      for (const n of [f.path, ...f.names]) if (!msg.includes(n)) wrong.push(`${f.name}: the error does not name '${n}': ${msg.slice(0, 300)}`);
      if (/^\s+at .+:\d+:\d+\)?$/m.test(msg)) wrong.push(`${f.name}: stack trace in the error`);
    }
    return wrong.length ? wrong.join('\n') : true;
  };
}

let tmp: string;
beforeAll(() => { tmp = mkdtempSync(join(tmpdir(), 'difflora-fuzz-lora-')); });
afterAll(() => { rmSync(tmp, { recursive: true, force: true }); });

describe('fuzz: LoRA files', () => {
  it('every mutation is refused naming the file and key with the model unchanged, or loads right; convert-lora writes nothing on refusal', async () => {
    const muts = mutations(0x10a4);
    const files = muts.map((m, i) => {
      const path = join(tmp, `m${i}.safetensors`);
      writeFileSync(path, m.bytes);
      return { path, names: m.names, name: m.name };
    });
    const fifo = join(tmp, 'fifo.safetensors');
    execFileSync('mkfifo', [fifo]);
    const half = Math.ceil(files.length / 2);
    const cases: FuzzCase[] = [
      { name: 'pipeline: first half, bare model', script: pipelineScript(files.slice(0, half), false), mayAccept: true, check: checkLines(files.slice(0, half)), timeoutMs: 60_000 },
      { name: 'pipeline: second half, bare model', script: pipelineScript(files.slice(half), false), mayAccept: true, check: checkLines(files.slice(half)), timeoutMs: 60_000 },
      { name: 'pipeline: all, with an adapter loaded', script: pipelineScript(files, true), mayAccept: true, check: checkLines(files), timeoutMs: 90_000 },
      { name: 'pipeline: a FIFO', script: pipelineScript([{ path: fifo, names: ['FIFO'] }], false), mayAccept: true, check: checkLines([{ path: fifo, names: ['FIFO'], name: 'FIFO' }]), timeoutMs: 30_000 },
    ];
    // convert-lora on every refused mutation whose names are model-free, and on the valid ones
    const outDir = join(tmp, 'out');
    mkdirSync(outDir);
    const convertOuts: { out: string; refused: boolean; name: string }[] = [];
    muts.forEach((m, i) => {
      const names = m.convertNames !== undefined ? m.convertNames : m.names;
      if (names && names.includes('needs')) return; // a shape that fits no layer is only wrong for a model
      const out = join(outDir, `o${i}.safetensors`);
      const to = i % 2 ? 'kohya' : 'diffusers';
      convertOuts.push({ out, refused: names !== null, name: m.name });
      cases.push({
        name: `convert-lora --to=${to}: ${m.name}`,
        cli: ['convert-lora', `--input=${files[i]!.path}`, `--output=${out}`, `--to=${to}`],
        error: names ? new RegExp([files[i]!.path, ...names].map((n) => `(?=[^]*${esc(n)})`).join('')) : undefined,
        mayAccept: names === null,
        check: () => existsSync(out) || 'no output written',
      });
    });
    cases.push({ name: 'convert-lora: a FIFO', cli: ['convert-lora', `--input=${fifo}`, `--output=${join(outDir, 'fifo.safetensors')}`, '--to=kohya'], error: /fifo\.safetensors[^]*FIFO/, timeoutMs: 20_000 });
    convertOuts.push({ out: join(outDir, 'fifo.safetensors'), refused: true, name: 'FIFO' });

    const results = await runCases(cases, 2);
    const { counts, failures } = report(results);
    console.log('LoRA fuzz:', cases.length, 'children,', files.length, 'mutations', counts, 'slowest (ms):', results.map((x) => [x.name.slice(0, 40), x.ms]).sort((a, b) => (b[1] as number) - (a[1] as number)).slice(0, 4));
    expect(counts.crash + counts.hang + counts.silent, failures).toBe(0);
    const written = convertOuts.filter((c) => c.refused && existsSync(c.out)).map((c) => c.name);
    expect(written, 'convert-lora wrote an output on refusal').toEqual([]);
  }, 240_000);
});
