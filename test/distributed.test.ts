// Process groups over libtorch's c10d (native/distributed.cc, lib/distributed/process_group.ts), Gloo on 127.0.0.1.
// Most cases run both ranks in this process (the rendezvous and every wait are on worker threads, so two ranks can
// meet here); the dead peer is a real child process killed with SIGKILL.
import { spawn } from 'node:child_process';
import { readdirSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  DistributedEnvError, ProcessGroup, distributedAvailable, distributedEnv, initProcessGroupFromEnv, type ProcessGroupOptions,
} from '../lib/distributed/process_group.js';
import { makePrivateTempDir } from '../lib/io/files.js';
import type { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import { repoRoot } from './cli_helpers.js';

/** A port nothing listens on right now. */
async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

async function pair(o: Partial<ProcessGroupOptions> = {}): Promise<[ProcessGroup, ProcessGroup]> {
  const masterPort = await freePort();
  const create = (rank: number) => ProcessGroup.create({ masterAddr: '127.0.0.1', masterPort, worldSize: 2, rank, timeoutMs: 5000, ...o });
  // rank 0 first, so rank 1 finds its store at once: on a loaded machine a client's connection retries can
  // outlast a short test timeout before the server listens
  const first = create(0);
  await new Promise((r) => setTimeout(r, 200));
  const [a, b] = await Promise.all([first, create(1)]);
  return [a, b];
}

const values = (t: Tensor): number[] => Array.from(t.toFloat64Array());

describe('process groups (gloo, two ranks on 127.0.0.1)', () => {
  it('this build has gloo', () => {
    expect(distributedAvailable().gloo).toBe(true);
  });

  it('allReduce sums and averages several tensors of different shapes and dtypes in one call, in place', async () => {
    const [a, b] = await pair();
    try {
      const make = (k: number) => [
        torch.full([3], k),                                         // fp32
        torch.full([2, 2], 10 * k, { dtype: 'float64' }),          // fp64: a second bucket
        torch.full([4], k + 0.5, { dtype: 'bfloat16' }),           // bf16: reduced as fp32 on Gloo
        torch.arange(6).reshape([2, 3]).mul(k).transpose(0, 1),    // fp32, not contiguous
      ];
      const x = make(1);
      const y = make(2);
      await Promise.all([a.allReduce(x, 'sum').wait(), b.allReduce(y, 'sum').wait()]);
      for (const r of [x, y]) {
        expect(values(r[0]!)).toEqual([3, 3, 3]);
        expect(values(r[1]!)).toEqual([30, 30, 30, 30]);
        expect(values(r[2]!)).toEqual([4, 4, 4, 4]);
        expect(r[2]!.dtype).toBe('bfloat16');
        expect(r[3]!.shape).toEqual([3, 2]);
        expect(r[3]!.tolist()).toEqual([[0, 9], [3, 12], [6, 15]]);
      }
      const p = torch.full([5], 1);
      const q = torch.full([5], 4);
      await Promise.all([a.allReduce(p, 'avg').wait(), b.allReduce(q, 'avg').wait()]);
      expect(values(p)).toEqual([2.5, 2.5, 2.5, 2.5, 2.5]);
      expect(values(q)).toEqual([2.5, 2.5, 2.5, 2.5, 2.5]);
      const i = torch.tensor(new BigInt64Array([1n, 2n]));
      const j = torch.tensor(new BigInt64Array([10n, 20n]));
      await Promise.all([a.allReduce(i).wait(), b.allReduce(j).wait()]);
      expect(values(i)).toEqual([11, 22]);
      for (const t of [...x, ...y, p, q, i, j]) t.dispose();
    } finally {
      a.destroy();
      b.destroy();
    }
  });

  it('a work handle returns at once; the collective completes when the peer joins it', async () => {
    const [a, b] = await pair();
    try {
      const x = torch.ones([1000]);
      const y = torch.ones([1000]);
      const wa = a.allReduce(x);
      await new Promise((r) => setTimeout(r, 200));
      expect(wa.isCompleted()).toBe(false);  // rank 1 has not called it yet
      const wb = b.allReduce(y);
      await Promise.all([wa.wait(), wb.wait()]);
      expect(wa.isCompleted()).toBe(true);
      expect(values(x).every((v) => v === 2)).toBe(true);
      await wa.wait();  // waiting again is harmless
      x.dispose();
      y.dispose();
    } finally {
      a.destroy();
      b.destroy();
    }
  });

  it('broadcast copies rank 1\'s tensors bit for bit (bf16 too, into a parameter that requires grad)', async () => {
    const [a, b] = await pair();
    try {
      const mine = [torch.zeros([2, 3]), torch.zeros([3], { dtype: 'bfloat16' })];
      mine[0]!.requiresGrad = true;
      const theirs = [torch.arange(6).reshape([2, 3]).add(0.1), torch.tensor([1.0078125, -3.5, 1e-3], { dtype: 'bfloat16' })];
      await Promise.all([a.broadcast(mine, 1).wait(), b.broadcast(theirs, 1).wait()]);
      expect(values(mine[0]!)).toEqual(values(theirs[0]!));
      expect(values(mine[1]!)).toEqual(values(theirs[1]!));
      expect(mine[0]!.requiresGrad).toBe(true);
      for (const t of [...mine, ...theirs]) t.dispose();
    } finally {
      a.destroy();
      b.destroy();
    }
  });

  it('barrier waits for every rank; allGather returns every rank\'s values, lengths may differ', async () => {
    const [a, b] = await pair();
    try {
      let passed = false;
      const first = a.barrier().then(() => { passed = true; });
      await new Promise((r) => setTimeout(r, 300));
      expect(passed).toBe(false);
      await Promise.all([first, b.barrier()]);
      expect(passed).toBe(true);
      const [ga, gb] = await Promise.all([a.allGather([0.25, 3, -1e300]), b.allGather(new Float64Array([7]))]);
      expect(ga).toEqual([[0.25, 3, -1e300], [7]]);
      expect(gb).toEqual(ga);
      expect(await Promise.all([a.allGather([]), b.allGather([])])).toEqual([[[], []], [[], []]]);
    } finally {
      a.destroy();
      b.destroy();
    }
  });

  it('refuses bad arguments with errors naming them', async () => {
    const [a, b] = await pair();
    const x = torch.ones([2]);
    const i = torch.ones([2], { dtype: 'int32' });
    try {
      expect(() => a.allReduce(x, 'max' as 'sum')).toThrow(/op must be 'sum' or 'avg', got 'max'/);
      expect(() => a.allReduce(i, 'avg')).toThrow(/avg needs floating-point tensors.*int32/);
      expect(() => a.allReduce([])).toThrow(/at least one tensor/);
      expect(() => a.broadcast(x, 2)).toThrow(/root must be a rank in \[0, 1\], got 2/);
      const gone = torch.ones([1]);
      gone.dispose();
      expect(() => a.allReduce([x, gone])).toThrow(/disposed/);
      await expect(ProcessGroup.create({ masterAddr: '127.0.0.1', masterPort: 1, worldSize: 2, rank: 2 })).rejects.toThrow(/rank must be an integer in \[0, 1\], got 2/);
      await expect(ProcessGroup.create({ masterAddr: '127.0.0.1', masterPort: 0, worldSize: 2, rank: 0 })).rejects.toThrow(/masterPort 0.*group of 1/);
    } finally {
      a.destroy();
      b.destroy();
      a.destroy();  // idempotent
    }
    expect(a.isDestroyed).toBe(true);
    expect(() => a.allReduce(x)).toThrow(/allReduce: the process group \(rank 0\/2 \(gloo, 127\.0\.0\.1:\d+\)\) was destroyed/);
    await expect(b.barrier()).rejects.toThrow(/barrier: .* was destroyed/);
    x.dispose();
    i.dispose();
  });

  it('a peer killed with SIGKILL makes the collective fail with a clear error, not hang', async () => {
    const masterPort = await freePort();
    const dir = makePrivateTempDir('difflora-dist-');
    const script = join(dir, 'peer.mts');
    writeFileSync(script, `import { ProcessGroup } from ${JSON.stringify(join(repoRoot, 'lib/distributed/process_group.ts'))};
const pg = await ProcessGroup.create({ masterAddr: '127.0.0.1', masterPort: ${masterPort}, worldSize: 2, rank: 1, timeoutMs: 5000 });
process.stdout.write('joined\\n');
setInterval(() => {}, 1000);
`);
    const child = spawn(process.execPath, ['--import', 'tsx', script], { cwd: repoRoot, stdio: ['ignore', 'pipe', 'inherit'] });
    const joined = new Promise<void>((resolve) => child.stdout.on('data', (s: Buffer) => { if (s.toString().includes('joined')) resolve(); }));
    const a = await ProcessGroup.create({ masterAddr: '127.0.0.1', masterPort, worldSize: 2, rank: 0, timeoutMs: 5000 });
    try {
      await joined;
      child.kill('SIGKILL');
      await new Promise((r) => child.once('exit', r));
      const x = torch.ones([4]);
      const started = Date.now();
      await expect(a.allReduce(x).wait()).rejects.toThrow(/allReduce\(sum\) on rank 0\/2 \(gloo, 127\.0\.0\.1:\d+\) failed \(a peer process may have died/);
      expect(Date.now() - started).toBeLessThan(8000);
      x.dispose();
    } finally {
      a.destroy();
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    }
  });

  it('a hung peer makes the collective fail after the timeout', async () => {
    const [a, b] = await pair({ timeoutMs: 3000 });
    try {
      const x = torch.ones([4]);
      const started = Date.now();
      await expect(a.allReduce(x).wait()).rejects.toThrow(/Timed out/);  // rank 1 never calls it
      expect(Date.now() - started).toBeGreaterThanOrEqual(2900);
      x.dispose();
    } finally {
      a.destroy();
      b.destroy();
    }
  });

  it('a port already in use, a missing rank, different world sizes and different flags are clear errors', async () => {
    const busy = createServer();
    await new Promise<void>((resolve) => busy.listen(0, resolve));
    const port = (busy.address() as { port: number }).port;
    try {
      await expect(ProcessGroup.create({ masterAddr: '127.0.0.1', masterPort: port, worldSize: 2, rank: 0, timeoutMs: 2000 }))
        .rejects.toThrow(new RegExp(`rank 0/2 .*while starting the rendezvous server on port ${port} \\(is the port already in use\\?\\).*Address already in use`));
    } finally {
      busy.close();
    }
    const join = async (specs: [number, number, string?][]) => {
      const masterPort = await freePort();
      // rank 0 first, so the others find its store at once (a connection retry could outlast a short timeout)
      const create = ([rank, worldSize, fingerprint]: [number, number, string?]) => ProcessGroup.create({ masterAddr: '127.0.0.1', masterPort, worldSize, rank, fingerprint, timeoutMs: 2500 });
      const first = create(specs[0]!);
      await new Promise((r) => setTimeout(r, 100));
      return Promise.allSettled([first, ...specs.slice(1).map(create)]);
    };
    const reason = (r: PromiseSettledResult<ProcessGroup>) => (r.status === 'rejected' ? String((r.reason as Error).message) : 'joined');
    const started = Date.now();
    const [missing, mismatch, flags] = await Promise.all([join([[0, 3], [1, 3]]), join([[0, 3], [1, 2]]), join([[0, 2, '--lr=1'], [1, 2, '--lr=2']])]);
    expect(Date.now() - started).toBeLessThan(9000);
    expect(reason(missing[0]!)).toMatch(/rank 0\/3 .*only 2 of 3 processes \(world size 3\) joined within 2\.5 s; missing: rank 2/);
    expect(reason(missing[1]!)).toMatch(/rank 1\/3 .*rank 0 reports: only 2 of 3 processes \(world size 3\)/);
    expect(reason(mismatch[0]!)).toMatch(/world size mismatch: rank 1 was started with world size 2, rank 0 with 3/);
    expect(reason(mismatch[1]!)).toMatch(/rank 1\/2 .*rank 0 reports: world size mismatch: rank 1 was started with world size 2, rank 0 with 3/);
    expect(reason(flags[0]!)).toMatch(/the ranks were started differently: rank 0: '--lr=1', rank 1: '--lr=2'/);
    expect(reason(flags[1]!)).toMatch(/rank 0 reports: the ranks were started differently: rank 0: '--lr=1', rank 1: '--lr=2'/);
  });

  it('creating and destroying groups 20 times leaves no threads or file descriptors behind', async () => {
    const count = () => ({ fds: readdirSync('/proc/self/fd').length, threads: readdirSync('/proc/self/task').length });
    for (let i = 0; i < 2; i++) (await pair()).forEach((g) => g.destroy());  // warm-up: libuv's pool starts its threads
    const before = count();
    for (let i = 0; i < 20; i++) {
      const [a, b] = await pair();
      const x = torch.ones([8]);
      const y = torch.ones([8]);
      await Promise.all([a.allReduce(x).wait(), b.allReduce(y).wait()]);
      x.dispose();
      y.dispose();
      a.destroy();
      b.destroy();
    }
    await new Promise((r) => setTimeout(r, 200));
    const after = count();
    expect(after.fds - before.fds).toBeLessThanOrEqual(2);
    expect(after.threads - before.threads).toBeLessThanOrEqual(1);
  });
});

describe('joining from the environment', () => {
  const base = { WORLD_SIZE: '4', RANK: '3', LOCAL_RANK: '1', LOCAL_WORLD_SIZE: '2', MASTER_ADDR: 'node0', MASTER_PORT: '29500' };

  it('reads the launcher variables; null for a single process', () => {
    expect(distributedEnv({})).toBeNull();
    expect(distributedEnv({ WORLD_SIZE: '1', RANK: '0' })).toBeNull();
    expect(distributedEnv(base)).toEqual({ rank: 3, worldSize: 4, localRank: 1, localWorldSize: 2, masterAddr: 'node0', masterPort: 29500, backend: 'gloo', timeoutMs: 60000 });
    expect(distributedEnv({ ...base, DIFFLORA_DIST_BACKEND: 'nccl', DIFFLORA_DIST_TIMEOUT: '2.5' })).toMatchObject({ backend: 'nccl', timeoutMs: 2500 });
    // srun: SLURM_* stand in, but only when MASTER_ADDR says where to meet
    const slurm = { SLURM_NTASKS: '4', SLURM_PROCID: '2', SLURM_LOCALID: '0', SLURM_NTASKS_PER_NODE: '2(x2)' };
    expect(distributedEnv(slurm)).toBeNull();
    expect(distributedEnv({ ...slurm, MASTER_ADDR: 'node0', MASTER_PORT: '29500' })).toMatchObject({ rank: 2, worldSize: 4, localRank: 0, localWorldSize: 2 });
  });

  it('names the variable and its value when one is wrong', () => {
    const bad: [Record<string, string>, RegExp][] = [
      [{ RANK: 'x' }, /RANK='x' is not an integer in \[0, 3\]/],
      [{ RANK: '4' }, /RANK='4' is not an integer in \[0, 3\]/],
      [{ WORLD_SIZE: '-2' }, /WORLD_SIZE='-2' is not an integer/],
      [{ LOCAL_RANK: '2' }, /LOCAL_RANK='2' is not an integer in \[0, 1\]/],
      [{ MASTER_ADDR: '' }, /MASTER_ADDR is not set/],
      [{ MASTER_PORT: '70000' }, /MASTER_PORT='70000' is not an integer in \[1, 65535\]/],
      [{ DIFFLORA_DIST_BACKEND: 'mpi' }, /DIFFLORA_DIST_BACKEND='mpi' is not 'gloo' or 'nccl'/],
      [{ DIFFLORA_DIST_TIMEOUT: '0' }, /DIFFLORA_DIST_TIMEOUT='0'/],
    ];
    for (const [change, message] of bad) {
      expect(() => distributedEnv({ ...base, ...change })).toThrow(DistributedEnvError);
      expect(() => distributedEnv({ ...base, ...change })).toThrow(message);
    }
    const { RANK: _r, ...noRank } = base;
    expect(() => distributedEnv(noRank)).toThrow(/RANK is not set/);
  });

  it('initProcessGroupFromEnv joins two ranks described by their environments', async () => {
    const port = String(await freePort());
    const env = (rank: number) => ({ WORLD_SIZE: '2', RANK: String(rank), LOCAL_RANK: String(rank), LOCAL_WORLD_SIZE: '2', MASTER_ADDR: '127.0.0.1', MASTER_PORT: port, DIFFLORA_DIST_TIMEOUT: '5' });
    const groups = await Promise.all([0, 1].map((r) => initProcessGroupFromEnv({ env: env(r) })));
    try {
      expect(groups.map((g) => [g?.rank, g?.worldSize, g?.localRank, g?.backend, g?.device])).toEqual([[0, 2, 0, 'gloo', 'cpu'], [1, 2, 1, 'gloo', 'cpu']]);
      expect(await Promise.all(groups.map((g) => g!.allGather([g!.rank * 2])))).toEqual([[[0], [2]], [[0], [2]]]);
    } finally {
      for (const g of groups) g?.destroy();
    }
    expect(await initProcessGroupFromEnv({ env: {} })).toBeNull();
  });
});
