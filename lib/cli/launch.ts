// `difflora launch [flags] <command> [its flags]`: starts the worker processes of a data-parallel run, like
// `accelerate launch` (its flag names) or torchrun. Each worker is `difflora <command> …` with RANK, WORLD_SIZE,
// LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; workers join with initProcessGroupFromEnv
// (lib/distributed/process_group.ts). The launcher forwards SIGINT/SIGTERM/SIGHUP, and when a worker fails it stops
// the others (SIGTERM, then SIGKILL after a grace period) and exits non-zero naming the worker's rank and status.
import { spawn, type ChildProcess } from 'node:child_process';
import { createServer } from 'node:net';
import { constants, cpus } from 'node:os';
import { commandParser } from './parser.js';
import type { Io } from './main.js';
import { UsageError } from './train_args.js';

export interface LaunchArgs {
  numProcesses: number;
  numMachines: number;
  machineRank: number;
  mainProcessIp: string;
  mainProcessPort: number;
  multiGpu: boolean;
  mixedPrecision: 'no' | 'fp16' | 'bf16' | undefined;
  gpuIds: string | undefined;
  /** Rendezvous and collective timeout of the workers, in seconds. */
  timeout: number;
  command: string;
  commandArgs: string[];
}

/** --timeout when none is given. */
export const DEFAULT_TIMEOUT_S = 60;
/**
 * --timeout of `train` with --validation_prompt when none is given: accelerate's (torch.distributed's default, 30
 * min). While rank 0 runs a validation (minutes on a CPU), the other processes wait at the next step's all-reduce.
 * Without validation nothing keeps a process away from the collectives for long, and DEFAULT_TIMEOUT_S applies.
 */
export const TRAIN_TIMEOUT_S = 1800;

/** The default --timeout of a launched command: TRAIN_TIMEOUT_S for a validating `train`, else DEFAULT_TIMEOUT_S. */
export function defaultTimeout(command: string, args: readonly string[]): number {
  const validates = args.some((t) => t === '--validation_prompt' || t.startsWith('--validation_prompt='));
  return command === 'train' && validates ? TRAIN_TIMEOUT_S : DEFAULT_TIMEOUT_S;
}

/** How long stopped workers get between SIGTERM and SIGKILL. */
export const KILL_GRACE_MS = 5000;
/**
 * Failures within this long of the first are one event: a worker killed by a signal makes its peers fail at once
 * (connection reset), and the report should name the killed one whichever exit the launcher saw first.
 */
const CULPRIT_WINDOW_MS = 300;

const LAUNCH_USAGE = 'Usage: difflora launch [flags] <command> [command flags]\n\n'
  + "Starts the processes of a data-parallel run (flags as accelerate launch's): each runs 'difflora <command>' with RANK, "
  + 'WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, over Gloo (CPU) or NCCL (--multi_gpu). '
  + "Check a setup with 'difflora launch --num_processes 2 dist-check'. When a worker fails, the others are stopped and "
  + 'the launcher exits with its status.';

function launchParser(argv: readonly string[]) {
  return commandParser(argv, LAUNCH_USAGE)
    .options({
      num_processes: { type: 'number', default: 1, describe: 'Processes in all, over all machines' },
      num_machines: { type: 'number', default: 1, describe: 'Machines; each starts num_processes / num_machines workers' },
      machine_rank: { type: 'number', default: 0, describe: 'This machine\'s index (0 hosts the rendezvous at --main_process_ip)' },
      main_process_ip: { type: 'string', describe: 'Address of machine 0 (default 127.0.0.1; required with several machines)' },
      main_process_port: { type: 'number', default: 29500, describe: 'Port of the rendezvous on machine 0' },
      multi_gpu: { type: 'boolean', default: false, describe: 'One GPU per worker (cuda:LOCAL_RANK), over NCCL' },
      mixed_precision: { type: 'string', choices: ['no', 'fp16', 'bf16'], describe: 'Passed to train/generate as --mixed_precision' },
      gpu_ids: { type: 'string', describe: "GPUs this machine's workers may use ('0,1' → CUDA_VISIBLE_DEVICES; default all)" },
      timeout: { type: 'number', describe: `Seconds a worker waits for the others (rendezvous and each collective) before failing (default ${DEFAULT_TIMEOUT_S}; ${TRAIN_TIMEOUT_S} for train with --validation_prompt, as accelerate: the others wait while rank 0 validates)` },
    });
}

export async function launchHelp(): Promise<string> {
  return launchParser([]).getHelp();
}

/**
 * The commands that join the process group (train: data-parallel, lib/distributed/data_parallel.ts). Several copies
 * of any other command would each run alone, so launch refuses them above one process.
 */
export const DISTRIBUTED_COMMANDS: ReadonlySet<string> = new Set(['train', 'dist-check']);

const BOOLEAN_FLAGS = new Set(['multi_gpu']);
const VALUE_FLAGS = new Set(['num_processes', 'num_machines', 'machine_rank', 'main_process_ip', 'main_process_port', 'mixed_precision', 'gpu_ids', 'timeout']);

/** Splits `launch`'s own flags from the command and its flags: the first word that is no flag or flag value. */
export function splitLaunchArgv(argv: readonly string[]): { own: string[]; command: string | undefined; rest: string[] } {
  const own: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const token = argv[i]!;
    if (!token.startsWith('-')) return { own, command: token, rest: argv.slice(i + 1) };
    if (token === '--') return { own, command: argv[i + 1], rest: argv.slice(i + 2) };
    own.push(token);
    const name = token.replace(/^--?/, '').split('=')[0]!;
    if (token.includes('=') || BOOLEAN_FLAGS.has(name) || name === 'help' || name === 'h') continue;
    if (!VALUE_FLAGS.has(name)) throw new UsageError(`unknown flag '${token}' before the command (launch's flags: ${[...VALUE_FLAGS, ...BOOLEAN_FLAGS].map((f) => `--${f}`).join(', ')})`);
    if (i + 1 < argv.length) own.push(argv[++i]!);
  }
  return { own, command: undefined, rest: [] };
}

function integer(value: unknown, flag: string, lo: number, hi = Number.MAX_SAFE_INTEGER): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < lo || value > hi) {
    throw new UsageError(`--${flag} must be an integer in [${lo}, ${hi === Number.MAX_SAFE_INTEGER ? '∞' : hi}], got '${String(value)}'`);
  }
  return value;
}

/** Adds --mixed_precision to the commands that take it; a different value already given is a conflict. */
function withMixedPrecision(command: string, rest: string[], mp: LaunchArgs['mixedPrecision']): string[] {
  if (mp === undefined) return rest;
  if (command !== 'train' && command !== 'generate') {
    throw new UsageError(`--mixed_precision applies to train and generate, not '${command}'`);
  }
  const given = rest.findIndex((a) => a === '--mixed_precision' || a.startsWith('--mixed_precision='));
  if (given < 0) return [...rest, `--mixed_precision=${mp}`];
  const value = rest[given]!.includes('=') ? rest[given]!.split('=')[1] : rest[given + 1];
  if (value !== mp) throw new UsageError(`--mixed_precision=${mp} conflicts with the command's own --mixed_precision=${value ?? ''}`);
  return rest;
}

/** Parses and checks `difflora launch`'s arguments (UsageError on any mistake); null when help was asked for. */
export async function parseLaunchArgs(argv: readonly string[]): Promise<LaunchArgs | null> {
  const { own, command, rest } = splitLaunchArgv(argv);
  if (own.includes('--help') || own.includes('-h')) return null;
  let failure: string | undefined;
  const parser = launchParser(own).fail((msg: string | undefined, err: Error | undefined) => { failure = msg ?? err?.message ?? 'invalid arguments'; });
  const p = (await parser.parseAsync()) as Record<string, unknown>;
  if (failure !== undefined) throw new UsageError(failure);
  if (p._ !== undefined && (p._ as unknown[]).length > 0) throw new UsageError(`unexpected '${(p._ as unknown[]).join(' ')}'`);
  if (command === undefined) throw new UsageError("give the command to run, e.g. 'difflora launch --num_processes 2 train --pretrained_model_name_or_path=…'");
  if (command === 'launch') throw new UsageError('launch cannot start launch');
  const numProcesses = integer(p.num_processes, 'num_processes', 1, 4096);
  if (numProcesses > 1 && !DISTRIBUTED_COMMANDS.has(command)) {
    throw new UsageError(`'${command}' does not run as several processes yet (it would run ${numProcesses} independent copies); `
      + `commands that do: ${[...DISTRIBUTED_COMMANDS].join(', ')}`);
  }
  const numMachines = integer(p.num_machines, 'num_machines', 1, numProcesses);
  if (numProcesses % numMachines !== 0) {
    throw new UsageError(`--num_processes ${numProcesses} is not a multiple of --num_machines ${numMachines} (each machine starts the same number of workers)`);
  }
  const machineRank = integer(p.machine_rank, 'machine_rank', 0, numMachines - 1);
  const ip = p.main_process_ip as string | undefined;
  if (numMachines > 1 && (ip === undefined || ip === '')) throw new UsageError('--main_process_ip is required with --num_machines > 1 (the address of machine 0)');
  if (ip !== undefined && (ip === '' || /\s/.test(ip))) throw new UsageError(`--main_process_ip '${ip}' is not a host name or address`);
  const gpuIds = p.gpu_ids as string | undefined;
  if (gpuIds !== undefined && gpuIds !== 'all' && !/^\d+(,\d+)*$/.test(gpuIds)) {
    throw new UsageError(`--gpu_ids '${gpuIds}' must be 'all' or GPU indices separated by commas, e.g. 0,1`);
  }
  const local = numProcesses / numMachines;
  if (p.multi_gpu === true && gpuIds !== undefined && gpuIds !== 'all' && gpuIds.split(',').length < local) {
    throw new UsageError(`--gpu_ids '${gpuIds}' lists fewer GPUs than the ${local} workers of this machine (--multi_gpu: one GPU each)`);
  }
  const timeout = (p.timeout as number | undefined) ?? defaultTimeout(command, rest);
  if (typeof timeout !== 'number' || !Number.isFinite(timeout) || timeout <= 0 || timeout > 86400) {
    throw new UsageError(`--timeout must be a number of seconds in (0, 86400], got '${String(p.timeout)}'`);
  }
  const mixedPrecision = p.mixed_precision as LaunchArgs['mixedPrecision'];
  return {
    numProcesses, numMachines, machineRank, mainProcessIp: ip ?? '127.0.0.1',
    mainProcessPort: integer(p.main_process_port, 'main_process_port', 1, 65535), multiGpu: p.multi_gpu === true,
    mixedPrecision, gpuIds, timeout, command, commandArgs: withMixedPrecision(command, rest, mixedPrecision),
  };
}

/** The environment of each worker this machine starts, by local rank. */
export function workerEnvs(a: LaunchArgs, base: NodeJS.ProcessEnv, launcherPid: number, cpuCount = cpus().length): NodeJS.ProcessEnv[] {
  const local = a.numProcesses / a.numMachines;
  // workers share the machine's cores: without this each would start a thread per core
  const threads = String(Math.max(1, Math.floor(cpuCount / local)));
  return Array.from({ length: local }, (_, localRank) => ({
    ...base,
    RANK: String(a.machineRank * local + localRank),
    WORLD_SIZE: String(a.numProcesses),
    LOCAL_RANK: String(localRank),
    LOCAL_WORLD_SIZE: String(local),
    GROUP_RANK: String(a.machineRank),
    MASTER_ADDR: a.mainProcessIp,
    MASTER_PORT: String(a.mainProcessPort),
    DIFFLORA_DIST_TIMEOUT: String(a.timeout),
    DIFFLORA_LAUNCH_PID: String(launcherPid),
    DIFFLORA_NUM_THREADS: base.DIFFLORA_NUM_THREADS ?? threads,
    ...(a.multiGpu ? { DIFFLORA_DIST_BACKEND: 'nccl' } : {}),
    ...(a.gpuIds !== undefined && a.gpuIds !== 'all' ? { CUDA_VISIBLE_DEVICES: a.gpuIds } : {}),
  }));
}

/**
 * How this process was started, to start workers the same way: node, its flags (tsx's loader, or `-e <code>` when run
 * from an inline script, as the tests do), and the CLI script unless the code came inline.
 */
export function selfCommand(): string[] {
  const inline = process.execArgv.some((a) => a === '-e' || a === '--eval' || a.startsWith('--eval=') || a === '-p' || a === '--print');
  const script = process.argv[1];
  if (!inline && script === undefined) throw new Error('difflora launch: cannot tell how this process was started (no script path)');
  return [process.execPath, ...process.execArgv, ...(inline ? [] : [script!])];
}

/** Whether `port` can be listened on here (the rendezvous would fail on a port in use). */
function portFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = createServer();
    server.once('error', () => resolve(false));
    server.listen({ port, exclusive: true }, () => server.close(() => resolve(true)));
  });
}

interface Exit { rank: number; pid: number | undefined; code: number | null; signal: NodeJS.Signals | null }

function describeExit(e: Exit): string {
  const who = `worker rank ${e.rank}${e.pid === undefined ? '' : ` (pid ${e.pid})`}`;
  return e.signal !== null ? `${who} was killed by ${e.signal}` : `${who} exited with code ${e.code ?? '?'}`;
}

/** Starts the workers and waits for them; returns the launcher's exit code. */
function supervise(a: LaunchArgs, io: Io, command: string[]): Promise<number> {
  const envs = workerEnvs(a, io.env, process.pid);
  const firstRank = a.machineRank * envs.length;
  const children: ChildProcess[] = envs.map((env) => spawn(command[0]!, [...command.slice(1), a.command, ...a.commandArgs], { stdio: 'inherit', env }));
  const running = new Set(children);
  const failures: Exit[] = [];
  let failure: Exit | undefined;
  let interrupted: NodeJS.Signals | undefined;
  let killTimer: NodeJS.Timeout | undefined;
  let culpritTimer: NodeJS.Timeout | undefined;

  const signalAll = (sig: NodeJS.Signals) => { for (const c of running) c.kill(sig); };
  const stopAll = () => {
    signalAll('SIGTERM');
    killTimer ??= setTimeout(() => signalAll('SIGKILL'), KILL_GRACE_MS);
  };
  const onSignal = (sig: NodeJS.Signals) => {
    if (interrupted !== undefined) { signalAll('SIGKILL'); return; }  // a second Ctrl-C: stop now
    interrupted = sig;
    signalAll(sig);
    killTimer ??= setTimeout(() => signalAll('SIGKILL'), KILL_GRACE_MS);
  };
  const signals: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
  for (const s of signals) process.on(s, onSignal);

  // the first failure, or a worker killed by a signal that failed with it
  const blame = () => {
    if (failure !== undefined) return;
    clearTimeout(culpritTimer);
    failure = failures.find((f) => f.signal !== null) ?? failures[0]!;
    io.stderr.write(`difflora launch: ${describeExit(failure)}; stopping the other workers\n`);
    stopAll();
  };

  return new Promise((resolve) => {
    const exited = (child: ChildProcess, i: number, code: number | null, signal: NodeJS.Signals | null) => {
      if (!running.delete(child)) return;
      const e: Exit = { rank: firstRank + i, pid: child.pid, code, signal };
      if (failure === undefined && interrupted === undefined && (code !== 0 || signal !== null)) {
        failures.push(e);
        culpritTimer ??= setTimeout(blame, CULPRIT_WINDOW_MS);
      }
      if (running.size > 0) return;
      if (failures.length > 0) blame();
      clearTimeout(killTimer);
      for (const s of signals) process.off(s, onSignal);
      if (interrupted !== undefined) {
        resolve(128 + (constants.signals[interrupted] ?? 1));
      } else if (failure !== undefined) {
        io.stderr.write(`difflora launch: failed: ${describeExit(failure)}\n`);
        resolve(failure.code !== null && failure.code !== 0 ? failure.code : 1);
      } else {
        resolve(0);
      }
    };
    children.forEach((child, i) => {
      child.on('exit', (code, signal) => exited(child, i, code, signal));
      child.on('error', (err) => {
        io.stderr.write(`difflora launch: could not start worker rank ${firstRank + i}: ${err.message}\n`);
        exited(child, i, 1, null);
      });
    });
  });
}

/** `difflora launch …`: returns the exit code (2 for usage errors, the failing worker's otherwise). */
export async function runLaunch(argv: readonly string[], io: Io, command: string[] = selfCommand()): Promise<number> {
  let a: LaunchArgs | null;
  try {
    a = await parseLaunchArgs(argv);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    io.stderr.write(`difflora launch: ${e.message}\nRun 'difflora launch --help' for the flags.\n`);
    return 2;
  }
  if (a === null) {
    io.stdout.write(`${await launchHelp()}\n`);
    return 0;
  }
  if (a.machineRank === 0 && !(await portFree(a.mainProcessPort))) {
    io.stderr.write(`difflora launch: --main_process_port ${a.mainProcessPort} is already in use on this machine: choose a free port\n`);
    return 1;
  }
  return supervise(a, io, command);
}

/** main.ts's entry for `launch` and `dist-check`. */
export async function runDistributedCommand(command: 'launch' | 'dist-check', argv: readonly string[], io: Io): Promise<number> {
  if (command === 'launch') return runLaunch(argv, io);
  return (await import('./dist_check.js')).runDistCheck(argv, io);
}
