// Finding models: local diffusers folders, hub ids resolved offline in a fake Hugging Face cache (refs,
// named revisions, commit hashes, blobs behind symlinks), variants, sharded checkpoints, pickled files
// refused, and errors that say where they looked.
import { execFileSync } from 'node:child_process';
import { lstatSync, mkdirSync, mkdtempSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { saveSafetensors } from '../lib/io/safetensors.js';
import { loadModelWeights, loadWeights, readConfig, readModelIndex, weightFiles } from '../lib/models/loading.js';
import { hubCacheDir, isHubId, resolvePretrained } from '../lib/io/hub.js';
import { Linear } from '../lib/nn/layers.js';
import { dispose, memory, tidy } from '../lib/scope.js';
import type { Tensor } from '../lib/tensor.js';
import { repoRoot } from './cli_helpers.js';
import * as torch from '../lib/torch.js';

let root: string;
const COMMIT_MAIN = 'a'.repeat(40);
const COMMIT_V1 = 'b'.repeat(40);
const COMMIT_ONLY = 'c'.repeat(40);

function write(path: string, text: string): void {
  mkdirSync(dirname(path), { recursive: true });
  writeFileSync(path, text);
}
/** A safetensors file with the given tensors, each filled with `value`. */
function weights(path: string, shapes: Record<string, number[]>, value: number, dtype: 'float32' | 'float16' = 'float32'): void {
  mkdirSync(dirname(path), { recursive: true });
  const m = new Map<string, Tensor>(Object.entries(shapes).map(([k, s]) => [k, torch.full(s, value, { dtype })]));
  saveSafetensors(path, m);
  dispose([...m.values()]);
}
const valueOf = (t: Tensor): number => tidy(() => (t.to({ dtype: 'float32' }).flatten().tolist() as number[])[0] ?? NaN);

/** A diffusers pipeline folder with a unet component. */
function pipeline(dir: string, value: number): void {
  write(join(dir, 'model_index.json'), JSON.stringify({ _class_name: 'StableDiffusionPipeline', unet: ['diffusers', 'UNet2DConditionModel'] }));
  write(join(dir, 'unet', 'config.json'), JSON.stringify({ sample_size: 8, value }));
  weights(join(dir, 'unet', 'diffusion_pytorch_model.safetensors'), { 'conv_in.weight': [2, 2] }, value);
}

/** A cache entry laid out as huggingface_hub does: snapshot files are relative symlinks into blobs/. */
function cachedSnapshot(cache: string, id: string, commit: string, value: number, refs: string[] = []): string {
  const repo = join(cache, `models--${id.replace('/', '--')}`);
  const staging = join(root, 'staging', `${id.replace('/', '_')}-${commit}`);
  pipeline(staging, value);
  const snap = join(repo, 'snapshots', commit);
  mkdirSync(join(repo, 'blobs'), { recursive: true });
  for (const rel of ['model_index.json', 'unet/config.json', 'unet/diffusion_pytorch_model.safetensors']) {
    const blob = join(repo, 'blobs', `${commit.slice(0, 8)}${rel.replace(/\W/g, '')}`);
    renameSync(join(staging, rel), blob);
    const link = join(snap, rel);
    mkdirSync(dirname(link), { recursive: true });
    symlinkSync(relative(dirname(link), blob), link);
  }
  for (const r of refs) write(join(repo, 'refs', r), `${commit}\n`);
  return snap;
}

beforeAll(() => { root = mkdtempSync(join(tmpdir(), 'difflora-load-')); });
afterAll(() => { rmSync(root, { recursive: true, force: true }); });

describe('local folders', () => {
  it('resolves a diffusers pipeline folder and its components', () => {
    const dir = join(root, 'pipe');
    pipeline(dir, 1.5);
    expect(resolvePretrained(dir)).toBe(dir);
    const unet = resolvePretrained(dir, { subfolder: 'unet' });
    expect(unet).toBe(join(dir, 'unet'));
    expect(readConfig(unet).sample_size).toBe(8);
    const w = loadWeights(unet, 'diffusion_pytorch_model');
    expect([...w.keys()]).toEqual(['conv_in.weight']);
    expect(valueOf(w.get('conv_in.weight')!)).toBe(1.5);
    dispose([...w.values()]);
  });

  it('says which component is missing and which exist', () => {
    const dir = join(root, 'pipe-missing');
    pipeline(dir, 1);
    expect(() => resolvePretrained(dir, { subfolder: 'vae' })).toThrow(/has no 'vae' folder \(it has: unet\)/);
    expect(() => resolvePretrained(dir, { subfolder: '../pipe' })).toThrow(/must be a relative path inside/);
    expect(() => resolvePretrained(join(dir, 'model_index.json'))).toThrow(/is a file/);
    expect(() => resolvePretrained(join(root, 'nowhere', 'model'))).toThrow(/no folder '.*nowhere.model'/);
    expect(() => readConfig(dir)).toThrow(/missing config\.json/);
  });

  it('loads into a module strictly and frees what it loaded', () => {
    const dir = join(root, 'linear');
    weights(join(dir, 'model.safetensors'), { weight: [3, 2], bias: [3] }, 0.25);
    const lin = new Linear(2, 3);
    const before = memory().numTensors;
    loadModelWeights(lin, dir, 'model');
    expect(memory().numTensors).toBe(before);
    expect(valueOf(lin.weight)).toBe(0.25);
  });
});

describe('hub ids from the local Hugging Face cache', () => {
  let cache: string;
  const env = { ...process.env };
  beforeAll(() => {
    cache = join(root, 'hf', 'hub');
    cachedSnapshot(cache, 'org/name', COMMIT_MAIN, 1, ['main']);
    cachedSnapshot(cache, 'org/name', COMMIT_V1, 2, ['v1.0']);
    cachedSnapshot(cache, 'org/name', COMMIT_ONLY, 3);
    cachedSnapshot(cache, 'solo', COMMIT_MAIN, 4, ['main']);
  });
  afterEach(() => {
    for (const k of ['HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE', 'HF_HOME', 'XDG_CACHE_HOME']) {
      if (env[k] === undefined) delete process.env[k];
      else process.env[k] = env[k];
    }
  });

  it('follows refs/main by default, a named revision, or a commit hash', () => {
    const snaps = join(cache, 'models--org--name', 'snapshots');
    expect(resolvePretrained('org/name', { cacheDir: cache })).toBe(join(snaps, COMMIT_MAIN));
    expect(resolvePretrained('org/name', { cacheDir: cache, subfolder: 'unet' })).toBe(join(snaps, COMMIT_MAIN, 'unet'));
    expect(resolvePretrained('org/name', { cacheDir: cache, revision: 'v1.0', subfolder: 'unet' })).toBe(join(snaps, COMMIT_V1, 'unet'));
    expect(resolvePretrained('org/name', { cacheDir: cache, revision: COMMIT_ONLY, subfolder: 'unet' })).toBe(join(snaps, COMMIT_ONLY, 'unet'));
    expect(resolvePretrained('solo', { cacheDir: cache })).toBe(join(cache, 'models--solo', 'snapshots', COMMIT_MAIN));
  });

  it('reads weights and configs through the snapshot symlinks', () => {
    const unet = resolvePretrained('org/name', { cacheDir: cache, revision: 'v1.0', subfolder: 'unet' });
    expect(lstatSync(join(unet, 'config.json')).isSymbolicLink()).toBe(true);
    expect(readConfig(unet).value).toBe(2);
    const w = loadWeights(unet, 'diffusion_pytorch_model');
    expect(valueOf(w.get('conv_in.weight')!)).toBe(2);
    dispose([...w.values()]);
  });

  it('finds the cache as huggingface_hub does: cacheDir, HF_HUB_CACHE, HF_HOME/hub, ~/.cache', () => {
    for (const k of ['HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE', 'HF_HOME', 'XDG_CACHE_HOME']) delete process.env[k];
    expect(hubCacheDir().dir).toBe(join(homedir(), '.cache', 'huggingface', 'hub'));
    process.env.HF_HOME = join(root, 'hf');
    expect(hubCacheDir()).toEqual({ dir: cache, from: '$HF_HOME/hub' });
    expect(resolvePretrained('org/name')).toBe(join(cache, 'models--org--name', 'snapshots', COMMIT_MAIN));
    process.env.HF_HOME = join(root, 'elsewhere');
    process.env.HF_HUB_CACHE = cache;
    expect(hubCacheDir().from).toBe('HF_HUB_CACHE');
    expect(resolvePretrained('org/name', { subfolder: 'unet' })).toBe(join(cache, 'models--org--name', 'snapshots', COMMIT_MAIN, 'unet'));
    expect(hubCacheDir({ cacheDir: '/x/y' })).toEqual({ dir: '/x/y', from: 'the cacheDir option' });
  });

  it('prefers a local folder that exists over the hub id', () => {
    const cwd = process.cwd();
    const work = join(root, 'cwd');
    pipeline(join(work, 'org', 'name'), 9);
    process.chdir(work);
    try {
      expect(resolvePretrained('org/name', { cacheDir: cache, subfolder: 'unet' })).toBe(join(work, 'org', 'name', 'unet'));
    } finally {
      process.chdir(cwd);
    }
  });

  it('tells where it looked and how to get a missing model', () => {
    let msg = '';
    try { resolvePretrained('org/missing', { cacheDir: cache, subfolder: 'unet' }); } catch (e) { msg = (e as Error).message; }
    expect(msg).toContain("model 'org/missing' (subfolder 'unet') at revision 'main' not found offline");
    expect(msg).toContain(`${join(process.cwd(), 'org', 'missing')} (local folder): does not exist`);
    expect(msg).toContain(`${join(cache, 'models--org--missing')}: does not exist`);
    expect(msg).toContain(`Hugging Face cache: ${cache} (from the cacheDir option)`);
    expect(msg).toContain('`huggingface-cli download org/missing`, then copy its cache folder models--org--missing/');
    expect(msg).toContain('or pass the path of a local diffusers folder');
  });

  it('lists the refs and snapshots it has when a revision is missing', () => {
    const repo = join(cache, 'models--org--name');
    let msg = '';
    try { resolvePretrained('org/name', { cacheDir: cache, revision: 'v2' }); } catch (e) { msg = (e as Error).message; }
    expect(msg).toContain(`${join(repo, 'refs', 'v2')}: does not exist`);
    expect(msg).toContain(`${join(repo, 'snapshots', 'v2')}: does not exist (cached refs: main, v1.0; cached snapshots: ${COMMIT_MAIN}, ${COMMIT_V1}, ${COMMIT_ONLY})`);
    expect(msg).toContain('huggingface-cli download org/name --revision v2');
    expect(() => resolvePretrained('org/name', { cacheDir: cache, revision: 'd'.repeat(40) })).toThrow(/taken as a commit hash/);
    expect(() => resolvePretrained('org/name', { cacheDir: cache, revision: '../../x' })).toThrow(/relative path inside/);
  });

  it('names the missing component of a partly downloaded snapshot', () => {
    const snap = join(cache, 'models--org--name', 'snapshots', COMMIT_MAIN);
    let msg = '';
    try { resolvePretrained('org/name', { cacheDir: cache, subfolder: 'vae' }); } catch (e) { msg = (e as Error).message; }
    expect(msg).toContain("the cached snapshot has no 'vae' folder");
    expect(msg).toContain(`${join(cache, 'models--org--name', 'refs', 'main')}: names commit ${COMMIT_MAIN}`);
    expect(msg).toContain(`${snap}: exists (folders: unet)`);
    expect(msg).toContain(`${join(snap, 'vae')}: does not exist`);
    expect(msg).toContain('--include "vae/*"');
  });

  it('tells hub ids from paths', () => {
    for (const id of ['org/name', 'runwayml/stable-diffusion-v1-5', 'CompVis/stable-diffusion-v1-4', 'gpt2', 'a.b_c/d-e.f']) expect(isHubId(id), id).toBe(true);
    for (const p of ['./org/name', '/abs/path', 'a/b/c', 'org--x/name', 'org/..', '.hidden', 'org/name-', '']) expect(isHubId(p), p).toBe(false);
  });
});

describe('weight files', () => {
  it('picks the variant file when asked, the plain one otherwise', () => {
    const dir = join(root, 'variant');
    weights(join(dir, 'diffusion_pytorch_model.safetensors'), { w: [2] }, 1);
    weights(join(dir, 'diffusion_pytorch_model.fp16.safetensors'), { w: [2] }, 2, 'float16');
    expect(weightFiles(dir, 'diffusion_pytorch_model')).toEqual([join(dir, 'diffusion_pytorch_model.safetensors')]);
    expect(weightFiles(dir, 'diffusion_pytorch_model', 'fp16')).toEqual([join(dir, 'diffusion_pytorch_model.fp16.safetensors')]);
    const w = loadWeights(dir, 'diffusion_pytorch_model', { variant: 'fp16' });
    expect(w.get('w')!.dtype).toBe('float16');
    expect(valueOf(w.get('w')!)).toBe(2);
    dispose([...w.values()]);
    const cast = loadWeights(dir, 'diffusion_pytorch_model', { variant: 'fp16', dtype: 'float32' });
    expect(cast.get('w')!.dtype).toBe('float32');
    dispose([...cast.values()]);
    expect(() => weightFiles(dir, 'diffusion_pytorch_model', 'ema')).toThrow(/variant 'ema'.*drop variant 'ema'/s);
  });

  it('loads a sharded checkpoint through its index', () => {
    const dir = join(root, 'sharded');
    weights(join(dir, 'diffusion_pytorch_model-00001-of-00002.safetensors'), { a: [2], b: [3] }, 1);
    weights(join(dir, 'diffusion_pytorch_model-00002-of-00002.safetensors'), { c: [4] }, 2);
    write(join(dir, 'diffusion_pytorch_model.safetensors.index.json'), JSON.stringify({
      metadata: { total_size: 36 },
      weight_map: { a: 'diffusion_pytorch_model-00001-of-00002.safetensors', b: 'diffusion_pytorch_model-00001-of-00002.safetensors', c: 'diffusion_pytorch_model-00002-of-00002.safetensors' },
    }));
    expect(weightFiles(dir, 'diffusion_pytorch_model')).toHaveLength(2);
    const before = memory().numTensors;
    const w = loadWeights(dir, 'diffusion_pytorch_model');
    expect([...w.keys()].sort()).toEqual(['a', 'b', 'c']);
    expect(valueOf(w.get('c')!)).toBe(2);
    dispose([...w.values()]);
    expect(memory().numTensors).toBe(before);
  });

  it('finds variant indexes under the names diffusers and transformers write', () => {
    const names = ['diffusion_pytorch_model.safetensors.fp16.index.json', 'diffusion_pytorch_model.safetensors.index.fp16.json'];
    for (const [i, name] of names.entries()) {
      const dir = join(root, `sharded-variant-${i}`);
      weights(join(dir, 'diffusion_pytorch_model.fp16-00001-of-00001.safetensors'), { a: [2] }, 3, 'float16');
      write(join(dir, name), JSON.stringify({ weight_map: { a: 'diffusion_pytorch_model.fp16-00001-of-00001.safetensors' } }));
      expect(weightFiles(dir, 'diffusion_pytorch_model', 'fp16')).toEqual([join(dir, 'diffusion_pytorch_model.fp16-00001-of-00001.safetensors')]);
    }
  });

  it('rejects broken indexes: missing shards, absent keys, duplicates, paths outside', () => {
    const dir = join(root, 'bad-index');
    weights(join(dir, 's1.safetensors'), { a: [2] }, 1);
    weights(join(dir, 's2.safetensors'), { a: [2] }, 1);
    const index = join(dir, 'model.safetensors.index.json');
    write(index, JSON.stringify({ weight_map: { a: 's1.safetensors', b: 'gone.safetensors' } }));
    expect(() => weightFiles(dir, 'model')).toThrow(/missing: .*gone\.safetensors/);
    write(index, JSON.stringify({ weight_map: { a: 's1.safetensors', b: 's1.safetensors' } }));
    const before = memory().numTensors;
    expect(() => loadWeights(dir, 'model')).toThrow(/lists tensors its shards lack: b/);
    write(index, JSON.stringify({ weight_map: { a: 's1.safetensors', x: 's2.safetensors' } }));
    expect(() => loadWeights(dir, 'model')).toThrow(/'a' is in more than one shard/);
    expect(memory().numTensors).toBe(before);
    write(index, JSON.stringify({ weight_map: { a: '../s1.safetensors' } }));
    expect(() => weightFiles(dir, 'model')).toThrow(/outside the model folder/);
    write(index, JSON.stringify({ nope: 1 }));
    expect(() => weightFiles(dir, 'model')).toThrow(/has no weight_map/);
  });

  it('refuses pickled checkpoints with a way out', () => {
    const dir = join(root, 'bin-only');
    write(join(dir, 'diffusion_pytorch_model.bin'), 'PK\u0003\u0004 not really a zip');
    expect(() => weightFiles(dir, 'diffusion_pytorch_model')).toThrow(/diffusion_pytorch_model\.bin' is a pickled PyTorch checkpoint; difflora reads only \.safetensors.*safetensors\.torch\.save_file/s);
    const te = join(root, 'bin-text-encoder');
    write(join(te, 'pytorch_model.bin'), 'x');
    expect(() => weightFiles(te, 'model')).toThrow(/pytorch_model\.bin' is a pickled/);
  });

  it('says what it expected and what it found when there are no weights', () => {
    const dir = join(root, 'empty');
    write(join(dir, 'other.safetensors'), '');
    expect(() => weightFiles(dir, 'diffusion_pytorch_model')).toThrow(/expected diffusion_pytorch_model\.safetensors or diffusion_pytorch_model\.safetensors\.index\.json\. Found: other\.safetensors/);
  });
});

describe('hostile names and files (issue #12)', () => {
  const fifo = (path: string): void => {
    mkdirSync(dirname(path), { recursive: true });
    rmSync(path, { force: true });
    execFileSync('mkfifo', [path]);
  };

  it("variant '/../../elsewhere/x' is refused before a path is built from it (it loaded a file outside the model)", () => {
    const dir = join(root, 'escape', 'model', 'unet');
    weights(join(dir, 'diffusion_pytorch_model.safetensors'), { w: [2] }, 1);
    // the file the variant pointed at: join(dir, 'diffusion_pytorch_model./../../elsewhere/x.safetensors')
    weights(join(root, 'escape', 'model', 'elsewhere', 'x.safetensors'), { w: [2] }, 666);
    const variant = '/../../elsewhere/x';
    expect(() => weightFiles(dir, 'diffusion_pytorch_model', variant)).toThrow(/variant '\/\.\.\/\.\.\/elsewhere\/x' contains a path separator: it must be a plain name, not a path/);
    expect(() => loadWeights(dir, 'diffusion_pytorch_model', { variant })).toThrow(/variant '.*' contains a path separator/);
    expect(() => resolvePretrained(join(root, 'escape', 'model'), { subfolder: 'unet', variant })).toThrow(/variant '.*' contains a path separator/);
  });

  it.each([
    ['variant', 'a\\b', /variant 'a\\b' contains a path separator/],
    ['variant', '..', /variant '\.\.' contains '\.\.'/],
    ['variant', 'fp16..x', /variant 'fp16\.\.x' contains '\.\.'/],
    ['variant', '', /variant '' is empty/],
    ['variant', 'fp\0', /variant 'fp\\0' contains a NUL character/],
    ['subfolder', '/etc', /subfolder '\/etc' must be a relative path inside the model folder, not an absolute path/],
    ['subfolder', 'unet/../../x', /subfolder 'unet\/\.\.\/\.\.\/x' must be a relative path inside the model folder/],
    ['subfolder', 'unet//x', /subfolder 'unet\/\/x' must be a relative path inside/],
    ['subfolder', '..\\x', /subfolder '\.\.\\x' must be a relative path inside/],
    ['revision', '../../x', /revision '\.\.\/\.\.\/x' must be a relative path inside/],
    ['revision', 'main\0', /revision 'main\\0' must be a relative path inside/],
  ])('%s %j is refused, naming the option and the value', (option, value, message) => {
    expect(() => resolvePretrained(join(root, 'pipe'), { [option]: value })).toThrow(message);
  });

  it('a revision with slashes (refs/pr/1) still resolves through its ref file', () => {
    const cache = join(root, 'hf-pr');
    cachedSnapshot(cache, 'org/pr', COMMIT_V1, 5, ['refs/pr/1']);
    expect(resolvePretrained('org/pr', { cacheDir: cache, revision: 'refs/pr/1' })).toBe(join(cache, 'models--org--pr', 'snapshots', COMMIT_V1));
  });

  it('a ref file naming a path, or a FIFO as a ref file, is an error naming the ref file', () => {
    const cache = join(root, 'hf-bad-ref');
    cachedSnapshot(cache, 'org/ref', COMMIT_MAIN, 6, ['main']);
    const refs = join(cache, 'models--org--ref', 'refs');
    write(join(refs, 'evil'), '../../../../elsewhere\n');
    expect(() => resolvePretrained('org/ref', { cacheDir: cache, revision: 'evil' })).toThrow(/the commit named by ref file '.*refs\/evil' '\.\.\/\.\.\/\.\.\/\.\.\/elsewhere' contains a path separator/);
    fifo(join(refs, 'piped'));
    expect(() => resolvePretrained('org/ref', { cacheDir: cache, revision: 'piped' })).toThrow(/hub cache ref file '.*refs\/piped' is a (socket or )?FIFO/);
  });

  it('config.json must be a regular file holding a JSON object; errors name the file', () => {
    const dir = join(root, 'configs');
    for (const [text, message] of [
      ['[]', /config\.json '.*configs\/config\.json' must hold a JSON object, not an array/],
      ['null', /must hold a JSON object, not null/],
      ['42', /must hold a JSON object, not a number/],
      ['{"a": 1,\n  "b": }', /config\.json '.*' is not valid JSON: unexpected '}' at line 2 column 8/],
      ['['.repeat(100_000), /config\.json '.*' is not valid JSON/],
    ] as const) {
      write(join(dir, 'config.json'), text);
      expect(() => readConfig(dir)).toThrow(message);
    }
    fifo(join(dir, 'config.json'));
    expect(() => readConfig(dir)).toThrow(/config\.json '.*configs\/config\.json' is a (socket or )?FIFO, not a regular file/);
  });

  it('model_index.json: an object of [library, class] pairs under plain names, each error naming the file and entry', () => {
    const dir = join(root, 'index');
    const good = { _class_name: 'StableDiffusionPipeline', requires_safety_checker: false, safety_checker: [null, null], unet: ['diffusers', 'UNet2DConditionModel'] };
    write(join(dir, 'model_index.json'), JSON.stringify(good));
    expect(readModelIndex(dir)).toEqual(good);
    for (const [index, message] of [
      [[], /model_index\.json '.*index\/model_index\.json' must hold a JSON object, not an array/],
      [null, /must hold a JSON object, not null/],
      [{ _class_name: 42 }, /model_index\.json '.*': entry '_class_name' must be the pipeline's class name \(a string\), got 42/],
      [{ unet: 'diffusers' }, /entry 'unet' must be a component's \[library, class\] pair \(or \[null, null\]\), got "diffusers"/],
      [{ unet: ['diffusers', null] }, /entry 'unet' must be a component's \[library, class\] pair/],
      [{ '../unet': ['diffusers', 'UNet2DConditionModel'] }, /entry '\.\.\/unet' \(a component folder name\) '\.\.\/unet' contains a path separator/],
      [{ requires_safety_checker: { deep: [] } }, /entry 'requires_safety_checker' must be a scalar option/],
    ] as const) {
      write(join(dir, 'model_index.json'), JSON.stringify(index));
      expect(() => readModelIndex(dir)).toThrow(message);
    }
  });

  it('weights that do not fit the config name the folder and the config', () => {
    const dir = join(root, 'mismatch');
    weights(join(dir, 'model.safetensors'), { weight: [4, 2], bias: [3] }, 0.5);
    expect(() => loadModelWeights(new Linear(2, 3), dir, 'model', {}, undefined, join(dir, 'config.json')))
      .toThrow(/the weights in '.*mismatch' do not fit the model described by '.*mismatch\/config\.json': Error\(s\) in loading state dict for Linear:\nsize mismatch for 1 key\(s\):\n {2}weight: checkpoint \[4, 2\] vs model \[3, 2\]/);
  });

  it('a sharded index that is a FIFO or not an object is refused, naming it', () => {
    const dir = join(root, 'shard-fifo');
    fifo(join(dir, 'model.safetensors.index.json'));
    expect(() => weightFiles(dir, 'model')).toThrow(/sharded checkpoint index '.*model\.safetensors\.index\.json' is a (socket or )?FIFO/);
    rmSync(join(dir, 'model.safetensors.index.json')); // writing into the FIFO would wait for a reader
    write(join(dir, 'model.safetensors.index.json'), '[]');
    expect(() => weightFiles(dir, 'model')).toThrow(/sharded checkpoint index '.*' must hold a JSON object, not an array/);
  });
});

describe('fromPretrained validates its options like the CLI (issue #13)', () => {
  const sd = join(repoRoot, 'test', 'fixtures', 'tiny-sd');
  it('refuses unknown option names, naming each and the option meant, before anything is loaded', async () => {
    const { UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer, StableDiffusionPipeline } = await import('../lib/index.js');
    const bad = { torch_dtype: 'float16', subfolder: 'unet' } as never;
    expect(() => UNet2DConditionModel.fromPretrained(sd, bad))
      .toThrow("UNet2DConditionModel.fromPretrained: unknown option 'torch_dtype' (did you mean 'dtype'?)");
    expect(() => AutoencoderKL.fromPretrained(sd, { subfolder: 'vae', torchDtype: 'float32' } as never)).toThrow("unknown option 'torchDtype' (did you mean 'dtype'?)");
    expect(() => CLIPTextModel.fromPretrained(sd, { subfolder: 'text_encoder', cache_dir: '/x', revison: 'main' } as never))
      .toThrow(/CLIPTextModel\.fromPretrained: unknown option 'cache_dir' \(did you mean 'cacheDir'\?\); unknown option 'revison' \(did you mean 'revision'\?\) \(known: /);
    expect(() => CLIPTokenizer.fromPretrained(sd, { subfolder: 'tokenizer', Variant: 'fp16' } as never)).toThrow("unknown option 'Variant' (did you mean 'variant'?)");
    expect(() => StableDiffusionPipeline.fromPretrained(sd, { subfolder: 'unet' } as never)).toThrow("StableDiffusionPipeline.fromPretrained: unknown option 'subfolder'");
    expect(() => StableDiffusionPipeline.fromPretrained(sd, { schedulerOverride: {} } as never)).toThrow("unknown option 'schedulerOverride'");
    expect(() => UNet2DConditionModel.fromPretrained(sd, 'unet' as never)).toThrow('UNet2DConditionModel.fromPretrained: the options must be an object');
    const { StableDiffusionXLPipeline, CLIPTextModelWithProjection } = await import('../lib/index.js');
    const sdxl = join(repoRoot, 'test', 'fixtures', 'tiny-sdxl');
    expect(() => StableDiffusionXLPipeline.fromPretrained(sdxl, { torch_dtype: 'float16' } as never))
      .toThrow("StableDiffusionXLPipeline.fromPretrained: unknown option 'torch_dtype' (did you mean 'dtype'?)");
    expect(() => CLIPTextModelWithProjection.fromPretrained(sdxl, { subfolder: 'text_encoder_2', Dtype: 'float32' } as never))
      .toThrow("CLIPTextModelWithProjection.fromPretrained: unknown option 'Dtype' (did you mean 'dtype'?)");
  });
  it('known options still load', async () => {
    const { CLIPTokenizer } = await import('../lib/index.js');
    expect(CLIPTokenizer.fromPretrained(sd, { subfolder: 'tokenizer', variant: undefined }).config.modelMaxLength).toBe(77);
  });
});
