// Data-parallel process groups on libtorch's c10d (native/distributed.cc): a TCPStore rendezvous, then Gloo for CPU
// tensors or NCCL for CUDA tensors. The collectives follow torch.distributed: every rank calls the same ones in the
// same order. allReduce and broadcast return a Work at once, so communication can overlap other work until wait().
//
// Lifetime is explicit: destroy() (or `using`) releases the group's threads and sockets; rank 0 hosts the store, so
// it should destroy last (after a barrier) when the others still talk to it.
import { native, type NativeProcessGroup, type NativeWork } from '../native.js';
import type { Tensor } from '../tensor.js';
import * as torch from '../torch.js';

export type Backend = 'gloo' | 'nccl';
export type ReduceOp = 'sum' | 'avg';

/** Collective and rendezvous timeout when none is given (a dead peer surfaces as an error after this long). */
export const DEFAULT_TIMEOUT_MS = 60_000;

export interface ProcessGroupOptions {
  /** 'gloo' (CPU tensors, the default) or 'nccl' (CUDA tensors; needs a CUDA libtorch with NCCL). */
  backend?: Backend;
  /** Where rank 0 hosts the rendezvous store (MASTER_ADDR / MASTER_PORT). */
  masterAddr: string;
  masterPort: number;
  worldSize: number;
  rank: number;
  /** This process's index among the processes of its machine (LOCAL_RANK); picks the GPU for nccl. */
  localRank?: number;
  localWorldSize?: number;
  timeoutMs?: number;
  /** Hosts the rendezvous store (default: rank 0). */
  isServer?: boolean;
  /** How this process was started (e.g. its flags); ranks that differ fail to join, naming both. */
  fingerprint?: string;
}

/** Whether this build of the addon can create process groups of each backend. */
export function distributedAvailable(): { gloo: boolean; nccl: boolean } {
  return native.distributedInfo();
}

/** A collective in flight. wait() resolves once this rank's tensors hold the result. */
export class Work {
  readonly #work: NativeWork;
  constructor(work: NativeWork) {
    this.#work = work;
  }
  /** Resolves when the collective finished here; rejects (naming the group) when a peer failed or the timeout passed. */
  async wait(): Promise<void> {
    await native.workWait(this.#work);
  }
  isCompleted(): boolean {
    return native.workIsCompleted(this.#work);
  }
}

export class ProcessGroup {
  readonly rank: number;
  readonly worldSize: number;
  readonly localRank: number;
  readonly localWorldSize: number;
  readonly backend: Backend;
  /** Where this group's own buffers live: 'cpu' for gloo, `cuda:<localRank>` for nccl. */
  readonly device: string;
  /** "rank 1/2 (gloo, 127.0.0.1:29500)": used in every error message. */
  readonly where: string;
  #handle: NativeProcessGroup | null;

  private constructor(handle: NativeProcessGroup, where: string, o: Required<Pick<ProcessGroupOptions, 'backend' | 'rank' | 'worldSize' | 'localRank' | 'localWorldSize'>>, device: string) {
    this.#handle = handle;
    this.where = where;
    this.rank = o.rank;
    this.worldSize = o.worldSize;
    this.localRank = o.localRank;
    this.localWorldSize = o.localWorldSize;
    this.backend = o.backend;
    this.device = device;
  }

  /**
   * Joins a group: resolves once all `worldSize` processes have joined and agree on the world size and fingerprint;
   * rejects after `timeoutMs` naming who is missing, or at once when the port is taken or a value is invalid.
   */
  static async create(o: ProcessGroupOptions): Promise<ProcessGroup> {
    const backend = o.backend ?? 'gloo';
    const localRank = o.localRank ?? 0;
    const device = backend === 'nccl' ? `cuda:${localRank}` : 'cpu';
    const { handle, where } = await native.createProcessGroup({
      backend, masterAddr: o.masterAddr, masterPort: o.masterPort, worldSize: o.worldSize, rank: o.rank,
      timeoutMs: o.timeoutMs ?? DEFAULT_TIMEOUT_MS, isServer: o.isServer, fingerprint: o.fingerprint ?? '', device,
    });
    return new ProcessGroup(handle, where, { backend, rank: o.rank, worldSize: o.worldSize, localRank, localWorldSize: o.localWorldSize ?? o.worldSize }, device);
  }

  get isDestroyed(): boolean {
    return this.#handle === null;
  }

  #live(op: string): NativeProcessGroup {
    if (this.#handle === null) throw new Error(`${op}: the process group (${this.where}) was destroyed`);
    return this.#handle;
  }

  /**
   * Sums (or averages) `tensors` over all ranks, in place. Tensors of one dtype travel as one flat buffer, so a
   * model's gradients go in one call; do not touch them until wait() resolves.
   */
  allReduce(tensors: Tensor | readonly Tensor[], op: ReduceOp = 'sum'): Work {
    const list = Array.isArray(tensors) ? [...tensors] : [tensors as Tensor];
    return new Work(native.allReduce(this.#live('allReduce'), list, op));
  }

  /** Copies rank `src`'s tensors into every rank's tensors of the same shapes, in place. */
  broadcast(tensors: Tensor | readonly Tensor[], src: number): Work {
    const list = Array.isArray(tensors) ? [...tensors] : [tensors as Tensor];
    return new Work(native.broadcast(this.#live('broadcast'), list, src));
  }

  /** Resolves once every rank has called barrier(). */
  async barrier(): Promise<void> {
    await native.workWait(native.barrier(this.#live('barrier')));
  }

  /**
   * Every rank's `values` (small: losses, counts), indexed by rank. Ranks may give different lengths.
   */
  async allGather(values: readonly number[] | Float64Array): Promise<number[][]> {
    const handle = this.#live('allGather');
    const mine = Float64Array.from(values);
    const lengths = await this.#gather(handle, Float64Array.of(mine.length));
    const longest = Math.max(...lengths.map((l) => l[0] ?? 0));
    const padded = new Float64Array(longest);
    padded.set(mine);
    const all = longest === 0 ? lengths.map(() => new Float64Array(0)) : await this.#gather(handle, padded);
    return all.map((row, i) => Array.from(row.subarray(0, lengths[i]?.[0] ?? 0)));
  }

  async #gather(handle: NativeProcessGroup, values: Float64Array): Promise<Float64Array[]> {
    const input = torch.tensor(values, { dtype: 'float64', device: this.device });
    try {
      const out = (await native.workWait(native.allGather(handle, input))) as Tensor[];
      try {
        return out.map((t) => t.cpu().toFloat64Array());
      } finally {
        for (const t of out) t.dispose();
      }
    } finally {
      input.dispose();
    }
  }

  /**
   * Releases the group (its threads and connections; on rank 0 also the rendezvous store). Collectives still in
   * flight finish or fail first. Idempotent.
   */
  destroy(): void {
    if (this.#handle === null) return;
    native.destroyProcessGroup(this.#handle);
    this.#handle = null;
  }

  [Symbol.dispose](): void {
    this.destroy();
  }
}

/** The distributed launch as a launcher describes it in the environment (torchrun, difflora launch, srun). */
export interface DistributedEnv {
  rank: number;
  worldSize: number;
  localRank: number;
  localWorldSize: number;
  masterAddr: string;
  masterPort: number;
  backend: Backend;
  timeoutMs: number;
}

/** A launcher's variables are missing or malformed (a configuration error: the CLI exits 2). */
export class DistributedEnvError extends Error {
  override name = 'DistributedEnvError';
}

function intVar(env: NodeJS.ProcessEnv, name: string, lo: number, hi: number, fallback?: number): number {
  const raw = env[name];
  if (raw === undefined || raw === '') {
    if (fallback !== undefined) return fallback;
    throw new DistributedEnvError(`${name} is not set (a distributed launch sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)`);
  }
  const n = Number(raw.trim());
  if (!/^\s*\d+\s*$/.test(raw) || !Number.isSafeInteger(n) || n < lo || n > hi) {
    throw new DistributedEnvError(`${name}='${raw}' is not an integer in [${lo}, ${hi}]`);
  }
  return n;
}

/**
 * Slurm's srun sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_NTASKS_PER_NODE instead of RANK and friends;
 * they stand in only when MASTER_ADDR is set too (a plain process inside a batch job must not try to join).
 */
function withSlurm(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  if (env.WORLD_SIZE !== undefined || env.SLURM_NTASKS === undefined || env.SLURM_PROCID === undefined || !env.MASTER_ADDR) return env;
  const perNode = env.SLURM_NTASKS_PER_NODE?.match(/^\d+/)?.[0];
  return {
    ...env, WORLD_SIZE: env.SLURM_NTASKS, RANK: env.SLURM_PROCID,
    LOCAL_RANK: env.LOCAL_RANK ?? env.SLURM_LOCALID, LOCAL_WORLD_SIZE: env.LOCAL_WORLD_SIZE ?? perNode,
  };
}

/**
 * Reads and checks RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and difflora launch's
 * DIFFLORA_DIST_BACKEND, DIFFLORA_DIST_TIMEOUT in seconds). Null when WORLD_SIZE is unset or 1: a single process.
 * Errors name the variable and its value.
 */
export function distributedEnv(envIn: NodeJS.ProcessEnv = process.env): DistributedEnv | null {
  const env = withSlurm(envIn);
  if (env.WORLD_SIZE === undefined || env.WORLD_SIZE === '') return null;
  const worldSize = intVar(env, 'WORLD_SIZE', 1, 1 << 20);
  if (worldSize === 1) return null;
  const rank = intVar(env, 'RANK', 0, worldSize - 1);
  const localWorldSize = intVar(env, 'LOCAL_WORLD_SIZE', 1, worldSize, worldSize);
  const localRank = intVar(env, 'LOCAL_RANK', 0, localWorldSize - 1, rank % localWorldSize);
  const masterAddr = env.MASTER_ADDR?.trim() ?? '';
  if (masterAddr === '' || /\s/.test(masterAddr)) {
    throw new DistributedEnvError(masterAddr === '' ? 'MASTER_ADDR is not set (the host of rank 0)' : `MASTER_ADDR='${env.MASTER_ADDR}' is not a host name or address`);
  }
  const masterPort = intVar(env, 'MASTER_PORT', 1, 65535);
  const backend = env.DIFFLORA_DIST_BACKEND ?? 'gloo';
  if (backend !== 'gloo' && backend !== 'nccl') {
    throw new DistributedEnvError(`DIFFLORA_DIST_BACKEND='${backend}' is not 'gloo' or 'nccl'`);
  }
  let timeoutMs = DEFAULT_TIMEOUT_MS;
  if (env.DIFFLORA_DIST_TIMEOUT !== undefined && env.DIFFLORA_DIST_TIMEOUT !== '') {
    const s = Number(env.DIFFLORA_DIST_TIMEOUT);
    if (!Number.isFinite(s) || s <= 0 || s > 86400) {
      throw new DistributedEnvError(`DIFFLORA_DIST_TIMEOUT='${env.DIFFLORA_DIST_TIMEOUT}' is not a number of seconds in (0, 86400]`);
    }
    timeoutMs = Math.max(1, Math.round(s * 1000));
  }
  return { rank, worldSize, localRank, localWorldSize, masterAddr, masterPort, backend, timeoutMs };
}

/**
 * Under `difflora launch`, exits this worker when the launcher is gone (killed with SIGKILL it cannot stop its
 * workers), so no process is left behind. Checks once a second without keeping the process alive.
 */
export function watchLauncher(env: NodeJS.ProcessEnv = process.env): void {
  const launcher = Number(env.DIFFLORA_LAUNCH_PID);
  if (!Number.isInteger(launcher) || launcher <= 1 || process.ppid !== launcher) return;
  setInterval(() => {
    if (process.ppid !== launcher) {
      process.stderr.write(`difflora: the launcher (pid ${launcher}) is gone; worker ${env.RANK ?? ''} exits\n`);
      process.exit(1);
    }
  }, 1000).unref();
}

export interface InitFromEnvOptions {
  env?: NodeJS.ProcessEnv;
  /** Overrides DIFFLORA_DIST_BACKEND. */
  backend?: Backend;
  /** Overrides DIFFLORA_DIST_TIMEOUT. */
  timeoutMs?: number;
  fingerprint?: string;
}

/**
 * Joins the group a launcher described in the environment (difflora launch, torchrun, srun with MASTER_ADDR set,
 * Kubernetes); null for a single process. Rejects with a DistributedEnvError for bad variables.
 */
export async function initProcessGroupFromEnv(options: InitFromEnvOptions = {}): Promise<ProcessGroup | null> {
  const env = options.env ?? process.env;
  const d = distributedEnv(env);
  if (d === null) return null;
  watchLauncher(env);
  return ProcessGroup.create({
    backend: options.backend ?? d.backend, masterAddr: d.masterAddr, masterPort: d.masterPort, worldSize: d.worldSize,
    rank: d.rank, localRank: d.localRank, localWorldSize: d.localWorldSize, timeoutMs: options.timeoutMs ?? d.timeoutMs,
    fingerprint: options.fingerprint,
  });
}
