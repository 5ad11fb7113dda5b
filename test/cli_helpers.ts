// Helpers for the tests that run `difflora train` as a real child process (test/cli_resume.test.ts,
// test/cli_bad_input.test.ts): the CLI is started from the TypeScript sources through tsx (what
// bin/difflora.js runs after `npm run build:ts`, without needing a build), small imagefolder datasets, and
// file-tree hashes to show that nothing already written was touched.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { createServer } from 'node:net';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { fixtures, makeImageFolder } from './helpers.js';

export { makeImageFolder };

export const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..');
export const tinySd = join(fixtures, 'tiny-sd');

/** `node --import tsx -e …` running lib/cli/main.ts's main() on the given arguments, as bin/difflora.js does. */
export const CLI_CODE = `import { main } from ${JSON.stringify(join(repoRoot, 'lib', 'cli', 'main.ts'))}; process.exitCode = await main(process.argv.slice(1));`;
export const NODE_CLI = [process.execPath, '--import', 'tsx', '--input-type=module', '-e', CLI_CODE] as const;

export interface CliResult { code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }

/** Starts `difflora <args>`; `onStderr` sees the progress lines as they come. */
export function spawnCli(args: readonly string[], onStderr?: (chunk: string, child: ChildProcess) => void): { child: ChildProcess; done: Promise<CliResult> } {
  const child = spawn(NODE_CLI[0], [...NODE_CLI.slice(1), ...args], { cwd: repoRoot, env: { ...process.env, DIFFLORA_DEBUG: '' }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout!.setEncoding('utf8').on('data', (s: string) => { stdout += s; });
  child.stderr!.setEncoding('utf8').on('data', (s: string) => { stderr += s; onStderr?.(s, child); });
  const done = new Promise<CliResult>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
  return { child, done };
}

export function runCli(args: readonly string[]): Promise<CliResult> {
  return spawnCli(args).done;
}

/** Runs the CLI and SIGKILLs it as soon as `ready()` holds (polled every 2 ms). */
export async function killWhen(argv: string[], ready: () => boolean): Promise<CliResult> {
  const { child, done } = spawnCli(argv);
  const timer = setInterval(() => { if (ready()) child.kill('SIGKILL'); }, 2);
  try { return await done; } finally { clearInterval(timer); }
}

/** main() in this process, its stderr captured (stack traces off). */
export async function runMain(argv: string[]): Promise<{ code: number; err: string }> {
  const { main } = await import('../lib/cli/main.js');
  let err = '';
  const sink = { write: (s: string) => { err += s; return true; } };
  const code = await main(argv, { stdout: { write: () => true }, stderr: sink, env: { ...process.env, DIFFLORA_DEBUG: '' } });
  return { code, err };
}

/**
 * Runs `script` (sh) in a private mount namespace (`unshare -m`): mounts made there vanish with it, so a
 * failing test never leaves a mount behind. In the script, `cli train …` runs difflora; `$1…` are `args`.
 */
export function runInMountNamespace(script: string, args: readonly string[] = []): Promise<CliResult> {
  const prelude = 'cli() { "$DL_NODE" --import tsx --input-type=module -e "$DL_CLI_CODE" "$@"; }\n';
  const child = spawn('unshare', ['-m', '--propagation', 'private', 'sh', '-c', prelude + script, 'sh', ...args], {
    cwd: repoRoot, env: { ...process.env, DIFFLORA_DEBUG: '', DL_NODE: process.execPath, DL_CLI_CODE: CLI_CODE }, stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (s: string) => { stdout += s; });
  child.stderr.setEncoding('utf8').on('data', (s: string) => { stderr += s; });
  return new Promise((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
}

/** Whether this machine lets us mount a tmpfs in a private mount namespace (root or user namespaces). */
export function canMountTmpfs(scratch: string): boolean {
  mkdirSync(scratch, { recursive: true });
  const r = spawnSync('unshare', ['-m', '--propagation', 'private', 'sh', '-c', 'mount -t tmpfs -o size=64k tmpfs "$1" && mount -o remount,ro "$1"', 'sh', scratch], { encoding: 'utf8' });
  return r.status === 0;
}

/** Path → sha256 of every file under dir (relative paths, sorted), to compare a tree before and after. */
export function treeHashes(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string): void => {
    for (const name of readdirSync(d).sort()) {
      const p = join(d, name);
      const st = lstatSync(p);
      if (st.isDirectory()) walk(p);
      else if (st.isSymbolicLink()) out[relative(dir, p)] = `symlink to ${readlinkSync(p)}`; // never read through (/dev/full reads forever)
      else if (!st.isFile()) out[relative(dir, p)] = `special ${st.mode}`; // FIFOs and devices by kind: never opened (a FIFO blocks)
      else out[relative(dir, p)] = createHash('sha256').update(readFileSync(p)).digest('hex');
    }
  };
  if (existsSync(dir)) walk(dir);
  return out;
}

/** The `checkpoint-N` folders of an output dir, oldest first (temporary `.tmp-<pid>` folders included, to catch leftovers). */
export function checkpointNames(outputDir: string): string[] {
  return readdirSync(outputDir).filter((n) => n.startsWith('checkpoint-'))
    .sort((a, b) => Number(/\d+/.exec(a)?.[0]) - Number(/\d+/.exec(b)?.[0]) || a.localeCompare(b));
}

/** A TCP port free on this machine now (for a launcher's --main_process_port). */
export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, resolve));
  const { port } = server.address() as { port: number };
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

/** Whether `pid` still runs (a zombie waiting for its reaper, e.g. an orphan in a container, has ended). */
export const alive = (pid: number): boolean => {
  try {
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
};
