// The seeded fuzz harness (issue #12): each case runs in its own child process with a timeout and is
// classified as
//   clean     — exited 1 or 2 with a one-line-per-problem message matching what the case expects, no stack trace
//   accepted  — exited 0 and the case's own check of the result passed
//   crash     — killed by a signal, exit code ≥ 3 (V8 aborts, segfaults, SIGBUS), or a JS stack trace / TypeError
//   hang      — still running at the timeout (killed)
//   silent    — exited 0 but the result is wrong (the check failed), or an error that does not name the culprit
// The suites assert 0 crash, 0 hang, 0 silent. Cases are generated from a seed, so a failure reproduces.
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { NODE_CLI, repoRoot } from '../cli_helpers.js';

export type Verdict = 'clean' | 'accepted' | 'crash' | 'hang' | 'silent';

/** A small, fast, seeded PRNG (mulberry32): the same seed gives the same cases on every machine. */
export function rng(seed: number): { next(): number; int(lo: number, hi: number): number; pick<T>(xs: readonly T[]): T; bytes(n: number): Uint8Array } {
  let s = seed >>> 0;
  const next = (): number => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return {
    next,
    int: (lo, hi) => lo + Math.floor(next() * (hi - lo + 1)),
    pick: (xs) => xs[Math.floor(next() * xs.length)]!,
    bytes: (n) => Uint8Array.from({ length: n }, () => Math.floor(next() * 256)),
  };
}

export interface FuzzCase {
  /** Shown in the report: what was tried. */
  name: string;
  /** Either CLI arguments (`difflora …`) … */
  cli?: string[];
  /** … or an ES module body run with top-level await; `lib` is the path of lib/ (import from `${lib}/…`). */
  script?: (lib: string) => string;
  /** Regexp the error output must match for a refusal to count as clean (it should name the file/flag/value). */
  error?: RegExp;
  /** Whether exiting 0 is acceptable; `check` then decides whether the result is right. Default: refusal expected. */
  mayAccept?: boolean;
  check?: (r: RawResult) => boolean | string;
  timeoutMs?: number;
  env?: Record<string, string>;
  cwd?: string;
}

export interface RawResult { code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string; timedOut: boolean; ms: number }
export interface CaseResult extends RawResult { name: string; verdict: Verdict; why: string }

/** The wrapper a script case runs in: a thrown Error becomes `error: message` on stderr and exit 1, as the CLI does. */
function wrapScript(body: string): string {
  return `try {\n${body}\n} catch (e) { process.stderr.write('error: ' + (e instanceof Error ? e.message : String(e)) + '\\n'); process.exitCode = 1; }`;
}

export function runRaw(c: FuzzCase): Promise<RawResult> {
  const lib = join(repoRoot, 'lib');
  const argv = c.cli
    ? [...NODE_CLI.slice(1), ...c.cli]
    : ['--import', 'tsx', '--input-type=module', '-e', wrapScript(c.script!(lib))];
  const t0 = Date.now();
  const child = spawn(NODE_CLI[0], argv, {
    cwd: c.cwd ?? repoRoot,
    env: { ...process.env, DIFFLORA_DEBUG: '', ...c.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (s: string) => { if (stdout.length < 1 << 20) stdout += s; });
  child.stderr.setEncoding('utf8').on('data', (s: string) => { if (stderr.length < 1 << 20) stderr += s; });
  let timedOut = false;
  const timer = setTimeout(() => { timedOut = true; child.kill('SIGKILL'); }, c.timeoutMs ?? 30_000);
  return new Promise((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, timedOut, ms: Date.now() - t0 });
    });
  });
}

const STACK = /^\s+at .+:\d+:\d+\)?$/m;
const CRASH_TEXT = /FATAL ERROR|Segmentation fault|Aborted|std::bad_alloc|terminate called|RangeError: Maximum call stack|Zone Allocation failed|^TypeError|^ReferenceError|Cannot read properties of (undefined|null)|is not a function|Cannot convert undefined or null/m;

export function classify(c: FuzzCase, r: RawResult): { verdict: Verdict; why: string } {
  if (r.timedOut) return { verdict: 'hang', why: `no exit after ${c.timeoutMs ?? 30_000} ms` };
  if (r.signal) return { verdict: 'crash', why: `killed by ${r.signal}` };
  if (r.code !== 0 && r.code !== 1 && r.code !== 2) return { verdict: 'crash', why: `exit code ${r.code}` };
  if (CRASH_TEXT.test(r.stderr) || STACK.test(r.stderr)) return { verdict: 'crash', why: `internal error text: ${lastLines(r.stderr)}` };
  if (r.code === 0) {
    if (!c.mayAccept) return { verdict: 'silent', why: 'exited 0 where a refusal was expected' };
    const ok = c.check ? c.check(r) : true;
    return ok === true ? { verdict: 'accepted', why: '' } : { verdict: 'silent', why: typeof ok === 'string' ? ok : 'result check failed' };
  }
  if (c.error && !c.error.test(r.stderr)) return { verdict: 'silent', why: `error does not name the culprit (${c.error}): ${lastLines(r.stderr)}` };
  return { verdict: 'clean', why: '' };
}

function lastLines(s: string): string {
  return s.trim().split('\n').slice(-3).join(' | ').slice(0, 400);
}

/** Runs the cases, `concurrency` at a time, and returns every result with its verdict. */
export async function runCases(cases: readonly FuzzCase[], concurrency = 2): Promise<CaseResult[]> {
  const out: CaseResult[] = new Array(cases.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < cases.length) {
      const i = next++;
      const c = cases[i]!;
      const r = await runRaw(c);
      out[i] = { name: c.name, ...r, ...classify(c, r) };
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, cases.length) }, worker));
  return out;
}

/** The counts by verdict, and the failures (crash, hang, silent) listed one per line for the assertion message. */
export function report(results: readonly CaseResult[]): { counts: Record<Verdict, number>; failures: string } {
  const counts: Record<Verdict, number> = { clean: 0, accepted: 0, crash: 0, hang: 0, silent: 0 };
  for (const r of results) counts[r.verdict]++;
  const failures = results
    .filter((r) => r.verdict === 'crash' || r.verdict === 'hang' || r.verdict === 'silent')
    .map((r) => `${r.verdict}: ${r.name} — ${r.why}`)
    .join('\n');
  return { counts, failures };
}
