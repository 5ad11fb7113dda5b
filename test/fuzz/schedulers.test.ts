// Fuzz: hostile scheduler_config.json files (issue #12). Seeded mutations of tiny-sd's scheduler config and of
// the config diffusers resolved for each class (goldens/schedulers.json): every field replaced by null,
// strings, NaN and ±Infinity (written bare, as Python's json does), negatives, zero, huge numbers, wrong types,
// unknown enumeration values and prototype names, alone and in seeded pairs; hostile _class_name values, step
// counts, timesteps, and files that are not JSON objects or not regular files.
//
// Each child process loads many configs in a loop (loadScheduler → setTimesteps → scaleModelInput → step, then
// the whole rollout, → addNoise) and prints one verdict line per config; the harness classifies the child (crash, hang), and the
// check below classifies each config: refused with an Error naming the culprit (and, for a load, the file),
// or accepted with finite outputs. A NaN or infinite output, or a refusal that names neither, is silent.
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { makePrivateTempDir } from '../../lib/io/files.js';
import { fixtures } from '../helpers.js';
import { report, rng, runCases, type FuzzCase, type RawResult } from './harness.js';

const SEED = 1213;
const STEPS = 20;

/** One config tried in a child: the file's text (or a special file), how it is loaded and what is expected. */
interface ConfigCase {
  name: string;
  /** The file's content; or a special file instead. */
  text?: string;
  special?: 'fifo' | 'directory' | 'devzero' | 'oversize';
  kind?: string;
  steps?: number;
  /** A timestep for step() instead of the schedule's first; `addNoise` one for addNoise. */
  timestep?: number;
  addNoise?: { values: number[]; dtype: 'int64' | 'float32' };
  /** A refusal must name one of these (field names, 'numInferenceSteps', 'timestep', …). */
  culprits: string[];
  /** The issue's examples: acceptance is a failure. */
  mustRefuse?: boolean;
}

interface Verdict { i: number; ok: boolean; phase?: string; errorName?: string; error?: string; finite?: boolean; dir: string }

// ---- the base configs

/** JSON as Python's json.dumps writes it: NaN, Infinity and -Infinity bare. */
function pythonJson(v: unknown): string {
  if (typeof v === 'number' && !Number.isFinite(v)) return String(v);
  if (Array.isArray(v)) return `[${v.map(pythonJson).join(', ')}]`;
  if (v !== null && typeof v === 'object') return `{${Object.entries(v).map(([k, x]) => `${JSON.stringify(k)}: ${pythonJson(x)}`).join(', ')}}`;
  return JSON.stringify(v);
}

const tinyConfig = JSON.parse(readFileSync(join(fixtures, 'tiny-sd', 'scheduler', 'scheduler_config.json'), 'utf8')) as Record<string, unknown>;
const resolved = (JSON.parse(readFileSync(join(fixtures, 'goldens', 'schedulers.json'), 'utf8').replace(/-Infinity\b/g, '"-Infinity"')) as {
  resolved_configs: Record<string, Record<string, unknown>>;
}).resolved_configs;
const CLASSES = ['PNDMScheduler', 'DDIMScheduler', 'DDPMScheduler', 'EulerDiscreteScheduler', 'EulerAncestralDiscreteScheduler', 'DPMSolverMultistepScheduler'];

/** The golden's resolved config of a class as a config file would hold it (with _class_name, -Infinity a number). */
function goldenConfig(className: string): Record<string, unknown> {
  const c = Object.fromEntries(Object.entries(resolved[className] ?? {}).map(([k, v]) => [k, v === '-Infinity' ? -Infinity : v]));
  return { _class_name: className, ...c };
}

// ---- the mutations

const HOSTILE: readonly unknown[] = [
  null, 'x', '', NaN, Infinity, -Infinity, -1, 0, 1, 2, 0.5, 1.5, 1e308, 1e9, -1e-300, true, false, [], {}, [0.1, 0.2],
  '__proto__', 'constructor', 'toString', 'epsilon', 'linspace', 'trailing', 'sigmoid',
];

/** A seeded number from a wide range: ± tiny to huge, fractional and integer. */
function randomNumber(r: ReturnType<typeof rng>): number {
  switch (r.int(0, 3)) {
    case 0: return (r.next() - 0.5) * 20;
    case 1: return 10 ** r.int(-40, 40) * (r.next() < 0.2 ? -1 : 1);
    case 2: return r.int(-5, 200_000);
    default: return r.next();
  }
}

function configCases(r: ReturnType<typeof rng>): Map<string, ConfigCase[]> {
  const byClass = new Map<string, ConfigCase[]>();
  for (const className of CLASSES) {
    const cases: ConfigCase[] = [];
    const bases: [string, Record<string, unknown>][] = [['tiny-sd', { ...tinyConfig }], ['golden', goldenConfig(className)]];
    for (const [baseName, base] of bases) {
      const fields = Object.keys(base).filter((k) => k !== '_class_name' && k !== '_diffusers_version');
      // the unmutated config: must load and run
      cases.push({ name: `${className} ${baseName} as is`, text: pythonJson(base), kind: className, culprits: [] });
      for (const field of fields) {
        // every field: a seeded half of the hostile values, and two seeded numbers
        const values = [...HOSTILE.filter(() => r.next() < 0.5), randomNumber(r), randomNumber(r)];
        for (const v of values) {
          cases.push({ name: `${className} ${baseName} ${field}=${pythonJson(v)}`, text: pythonJson({ ...base, [field]: v }), kind: className, culprits: [field] });
        }
      }
      // seeded pairs of mutated fields
      for (let k = 0; k < 12; k++) {
        const [f1, f2] = [r.pick(fields), r.pick(fields)];
        const [v1, v2] = [r.next() < 0.5 ? r.pick(HOSTILE) : randomNumber(r), r.next() < 0.5 ? r.pick(HOSTILE) : randomNumber(r)];
        cases.push({ name: `${className} ${baseName} ${f1}=${pythonJson(v1)} ${f2}=${pythonJson(v2)}`, text: pythonJson({ ...base, [f1]: v1, [f2]: v2 }), kind: className, culprits: [f1, f2] });
      }
    }
    // the issue's examples: NaN images before
    for (const [field, v] of [['beta_end', 2], ['beta_start', -1], ['beta_end', 0.9], ['num_train_timesteps', 1e9]] as const) {
      cases.push({ name: `${className} ${field}=${v} (issue #12)`, text: pythonJson({ ...tinyConfig, [field]: v }), kind: className, culprits: [field], mustRefuse: true });
    }
    // zero terminal SNR with trailing spacing reaches ᾱ = 0: refused for epsilon where ᾱ is not clamped, run with v_prediction
    const zeroSnr = { ...tinyConfig, rescale_betas_zero_snr: true, timestep_spacing: 'trailing' };
    cases.push({ name: `${className} zero SNR, trailing, epsilon`, text: pythonJson(zeroSnr), kind: className, culprits: ['rescale_betas_zero_snr'] });
    cases.push({ name: `${className} zero SNR, trailing, v_prediction`, text: pythonJson({ ...zeroSnr, prediction_type: 'v_prediction' }), kind: className, culprits: [] });
    // keys that would pollute a prototype if merged naively are ignored
    cases.push({ name: `${className} __proto__ and constructor keys`, text: `{"__proto__": {"beta_end": 2}, "constructor": {"beta_end": 2}, ${pythonJson(tinyConfig).slice(1)}`, kind: className, culprits: [] });
    byClass.set(className, cases);
  }
  return byClass;
}

/** _class_name values, step counts, timesteps and files, for every class. */
function callCases(): ConfigCase[] {
  const cases: ConfigCase[] = [];
  const tiny = (over: Record<string, unknown>): string => pythonJson({ ...tinyConfig, ...over });
  for (const cls of ['__proto__', 'constructor', 'toString', 'hasOwnProperty', 'valueOf', '', 'Heun', 42, null, ['PNDMScheduler'], { a: 1 }]) {
    cases.push({ name: `_class_name ${pythonJson(cls)}`, text: tiny({ _class_name: cls }), culprits: ['_class_name', 'scheduler class'], mustRefuse: true });
  }
  cases.push({ name: 'no _class_name', text: pythonJson(Object.fromEntries(Object.entries(tinyConfig).filter(([k]) => k !== '_class_name'))), culprits: ['_class_name'], mustRefuse: true });
  for (const kind of CLASSES) {
    for (const steps of [0, -1, 2.5, NaN, Infinity, 1001, 1e9]) {
      cases.push({ name: `${kind} setTimesteps(${steps})`, text: tiny({}), kind, steps, culprits: ['numInferenceSteps'], mustRefuse: true });
    }
    // every step count up to T is fine, or refused naming what it collides with (steps_offset past the end)
    cases.push({ name: `${kind} setTimesteps(1000)`, text: tiny({}), kind, steps: 1000, culprits: ['steps_offset', 'repeat timesteps'] });
    for (const t of [-1, 1000, 1e9, NaN, Infinity]) {
      cases.push({ name: `${kind} step(t=${t})`, text: tiny({}), kind, timestep: t, culprits: ['timestep'], mustRefuse: true });
    }
    for (const [values, dtype] of [[[-1], 'int64'], [[1000], 'int64'], [[1e9], 'float32'], [[NaN], 'float32']] as const) {
      cases.push({ name: `${kind} addNoise(${dtype} ${values.join(',')})`, text: tiny({}), kind, addNoise: { values: [...values], dtype }, culprits: ['timestep'], mustRefuse: true });
    }
  }
  const files: [string, Partial<ConfigCase>][] = [
    ['a FIFO', { special: 'fifo' }], ['a directory', { special: 'directory' }], ['a link to /dev/zero', { special: 'devzero' }],
    ['17 MB', { special: 'oversize' }], ['an array', { text: '[1, 2]' }], ['null', { text: 'null' }], ['a number', { text: '3' }],
    ['empty', { text: '' }], ['truncated', { text: pythonJson(tinyConfig).slice(0, 40) }], ['binary', { text: '\u0000\u00ff{' }],
    ['bare NaN as a key', { text: '{NaN: 1}' }],
  ];
  for (const [what, c] of files) cases.push({ name: `scheduler_config.json is ${what}`, kind: 'pndm', culprits: ['scheduler config'], mustRefuse: true, ...c });
  return cases;
}

// ---- the child: one verdict line per config

function childScript(casesFile: string, root: string): (lib: string) => string {
  return (lib) => `
const { execFileSync } = await import('node:child_process');
const { mkdirSync, readFileSync, symlinkSync, truncateSync, writeFileSync } = await import('node:fs');
const { join } = await import('node:path');
const { loadScheduler } = await import('${lib}/schedulers/scheduler.js');
const torch = await import('${lib}/torch.js');
const { tidy } = await import('${lib}/scope.js');

const cases = JSON.parse(readFileSync(${JSON.stringify(casesFile)}, 'utf8'), (k, v) => (v === '__NaN' ? NaN : v === '__Inf' ? Infinity : v === '__-Inf' ? -Infinity : v));
const generator = new torch.Generator().manualSeed(0);
const sample = torch.randn([1, 4, 8, 8], { generator });
const modelOutput = torch.randn([1, 4, 8, 8], { generator });
const finite = (t) => Boolean(tidy(() => t.isfinite().all().item()));

function prepare(c, dir) {
  mkdirSync(dir, { recursive: true });
  const file = join(dir, 'scheduler_config.json');
  if (c.special === 'fifo') execFileSync('mkfifo', [file]);
  else if (c.special === 'directory') mkdirSync(file);
  else if (c.special === 'devzero') symlinkSync('/dev/zero', file);
  else if (c.special === 'oversize') { writeFileSync(file, '{'); truncateSync(file, 17 * 1024 * 1024); }
  else writeFileSync(file, c.text);
}

function run(c, dir) {
  let phase = 'load';
  let s;
  try {
    s = loadScheduler(dir, c.kind === undefined ? {} : { kind: c.kind });
    phase = 'setTimesteps';
    s.setTimesteps(c.steps ?? ${STEPS});
    phase = 'step';
    const t = c.timestep ?? s.timesteps[0];
    let ok = Number.isFinite(s.initNoiseSigma) && s.timesteps.every(Number.isFinite);
    ok = tidy(() => finite(s.step(modelOutput, t, s.scaleModelInput(sample.mul(s.initNoiseSigma), t), { generator }))) && ok;
    if (c.timestep === undefined) {
      // the whole rollout too: a schedule can be finite at its first step and divide by zero at its last
      s.setTimesteps(c.steps ?? ${STEPS});
      ok = tidy(() => {
        let x = sample.mul(s.initNoiseSigma);
        for (const u of s.timesteps) x = s.step(modelOutput, u, s.scaleModelInput(x, u), { generator });
        return finite(x);
      }) && ok;
    }
    phase = 'addNoise';
    const tn = c.addNoise ?? (Number.isInteger(t) ? { values: [t], dtype: 'int64' } : { values: [t], dtype: 'float32' });
    ok = tidy(() => {
      const ts = tn.dtype === 'int64' ? torch.tensor(tn.values.map((v) => BigInt(v))) : torch.tensor(Float32Array.from(tn.values));
      return finite(s.addNoise(sample, modelOutput, ts));
    }) && ok;
    return { ok: true, finite: ok };
  } catch (e) {
    return { ok: false, phase, errorName: e?.constructor?.name, error: e instanceof Error ? e.message : String(e) };
  } finally {
    s?.dispose();
  }
}

cases.forEach((c, i) => {
  const dir = join(${JSON.stringify(root)}, String(i));
  prepare(c, dir);
  process.stdout.write(JSON.stringify({ i, dir, ...run(c, dir) }) + '\\n');
});
`;
}

/** Why a config's verdict is a failure, or null. */
function judge(c: ConfigCase, v: Verdict | undefined): string | null {
  if (v === undefined) return 'no verdict (the child stopped before it)';
  if (v.ok) {
    if (c.mustRefuse) return 'accepted where a refusal was expected';
    return v.finite ? null : 'accepted but produced non-finite values (silent NaN)';
  }
  const msg = v.error ?? '';
  if (v.errorName !== 'Error') return `${v.errorName}: ${msg}`;
  if (/undefined|Cannot read|is not a function/.test(msg)) return `internal error text: ${msg}`;
  if (c.culprits.length > 0 && !c.culprits.some((k) => msg.includes(k))) return `refusal names none of ${c.culprits.join(', ')} (${v.phase}): ${msg}`;
  if (c.culprits.length === 0) return `refused a valid config (${v.phase}): ${msg}`;
  if (v.phase === 'load' && !msg.includes(v.dir)) return `load error does not name the file: ${msg}`;
  return null;
}

function checkChild(cases: readonly ConfigCase[], tally: Map<string, number>): (r: RawResult) => boolean | string {
  return (r) => {
    const verdicts = new Map<number, Verdict>();
    for (const line of r.stdout.split('\n')) if (line.startsWith('{')) { const v = JSON.parse(line) as Verdict; verdicts.set(v.i, v); }
    const problems: string[] = [];
    cases.forEach((c, i) => {
      const v = verdicts.get(i);
      const why = judge(c, v);
      const outcome = why !== null ? 'failed' : v?.ok ? 'accepted' : 'refused';
      tally.set(outcome, (tally.get(outcome) ?? 0) + 1);
      if (why !== null) problems.push(`${c.name}: ${why}`);
    });
    return problems.length === 0 ? true : `${problems.length} configs:\n  ${problems.slice(0, 25).join('\n  ')}`;
  };
}

describe('fuzz: scheduler configs', () => {
  const root = makePrivateTempDir('difflora-fuzz-sched-');
  afterAll(() => rmSync(root, { recursive: true, force: true }));

  it('every hostile config is refused naming its culprit, or accepted with finite outputs', async () => {
    const r = rng(SEED);
    const groups: [string, ConfigCase[]][] = [...configCases(r), ['calls and files', callCases()]];
    const tally = new Map<string, number>();
    const fuzzCases: FuzzCase[] = groups.map(([group, cases], g) => {
      const dir = join(root, `g${g}`);
      mkdirSync(dir);
      const casesFile = join(dir, 'cases.json');
      writeFileSync(casesFile, JSON.stringify(cases, (_k, v: unknown) => (typeof v === 'number' && !Number.isFinite(v) ? `__${v === Infinity ? 'Inf' : v === -Infinity ? '-Inf' : 'NaN'}` : v)));
      return { name: `${group} (${cases.length} configs)`, script: childScript(casesFile, dir), mayAccept: true, check: checkChild(cases, tally), timeoutMs: 90_000 };
    });
    const results = await runCases(fuzzCases, 2);
    const { counts, failures } = report(results);
    console.log('scheduler fuzz children:', counts, 'configs:', Object.fromEntries(tally), results.map((x) => `${x.name} ${x.ms} ms`));
    expect(counts.crash + counts.hang + counts.silent, failures).toBe(0);
    expect(tally.get('failed') ?? 0).toBe(0);
  }, 300_000);
});
