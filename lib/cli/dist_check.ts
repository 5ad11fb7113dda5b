// `difflora dist-check`: joins the process group its launcher describes (difflora launch, torchrun, srun) and checks
// each collective against the value it must give, printing one line per rank. A quick test of a multi-process or
// multi-machine setup (addresses, ports, firewalls, backend) before a long training run:
//   difflora launch --num_processes 2 dist-check
// --seconds S keeps all-reducing 4 MiB buffers for S seconds and reports the throughput (a network soak test).
import { hostname } from 'node:os';
import { commandParser } from './parser.js';
import { DistributedEnvError, ProcessGroup, initProcessGroupFromEnv } from '../distributed/process_group.js';
import type { Tensor } from '../tensor.js';
import type { Io } from './main.js';

const USAGE = 'Usage: difflora launch --num_processes N dist-check [--seconds S]\n\n'
  + 'Joins the process group described by RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT and checks all-reduce (sum, avg), '
  + 'broadcast, all-gather and barrier, one line per rank. Run alone, it checks a group of one (that this build has distributed support).';

function parser(argv: readonly string[]) {
  return commandParser(argv, USAGE)
    .options({
      seconds: { type: 'number', default: 0, describe: 'Then keep all-reducing 4 MiB buffers this long and report the throughput' },
    });
}

function close(a: ArrayLike<number>, b: readonly number[]): boolean {
  return a.length === b.length && b.every((v, i) => Math.abs((a[i] ?? NaN) - v) <= 1e-6 * Math.max(1, Math.abs(v)));
}

/** Each collective once, against the value it must give; returns the failures. */
async function checkCollectives(pg: ProcessGroup, torch: typeof import('../torch.js')): Promise<string[]> {
  const { rank, worldSize: w } = pg;
  const failures: string[] = [];
  const owned: Tensor[] = [];
  const t = <T extends Tensor>(x: T): T => { owned.push(x); return x; };
  try {
    // sum over ranks of (rank + 1) = w(w+1)/2; two dtypes in one call (two buckets)
    const a = t(torch.full([3], rank + 1));
    const b = t(torch.full([2, 2], 2 * (rank + 1), { dtype: 'float64' }));
    await pg.allReduce([a, b], 'sum').wait();
    const sum = (w * (w + 1)) / 2;
    if (!close(a.toFloat64Array(), [sum, sum, sum]) || !close(b.toFloat64Array(), [2 * sum, 2 * sum, 2 * sum, 2 * sum])) failures.push(`all-reduce sum gave ${a.toFloat64Array().join(',')} (expected ${sum})`);
    const c = t(torch.full([4], rank));
    await pg.allReduce(c, 'avg').wait();
    if (!close(c.toFloat64Array(), Array(4).fill((w - 1) / 2))) failures.push(`all-reduce avg gave ${c.toFloat64Array().join(',')} (expected ${(w - 1) / 2})`);
    const d = t(torch.full([5], rank * 10));
    await pg.broadcast(d, w - 1).wait();
    if (!close(d.toFloat64Array(), Array(5).fill((w - 1) * 10))) failures.push(`broadcast from rank ${w - 1} gave ${d.toFloat64Array().join(',')}`);
    const gathered = await pg.allGather([rank, process.pid]);
    if (gathered.length !== w || gathered.some((row, i) => row[0] !== i)) failures.push(`all-gather gave ${JSON.stringify(gathered)}`);
    await pg.barrier();
    return failures;
  } finally {
    for (const x of owned) x.dispose();
  }
}

/** All-reduces 4 MiB for `seconds`; rank 0 decides when to stop (every rank must run the same number of rounds). */
async function soak(pg: ProcessGroup, seconds: number, torch: typeof import('../torch.js')): Promise<string> {
  const buf = torch.zeros([1 << 20]);
  const flag = torch.zeros([1]);
  try {
    const started = performance.now();
    let rounds = 0;
    for (;;) {
      flag.fill_(pg.rank === 0 && performance.now() - started < seconds * 1000 ? 1 : 0);
      await pg.allReduce([buf, flag]).wait();
      if (flag.item() < 0.5) break;
      rounds++;
    }
    const s = (performance.now() - started) / 1000;
    return `${rounds} all-reduces of 4 MiB in ${s.toFixed(1)} s (${((rounds * 4) / Math.max(s, 1e-9)).toFixed(1)} MiB/s)`;
  } finally {
    buf.dispose();
    flag.dispose();
  }
}

export async function runDistCheck(argv: readonly string[], io: Io): Promise<number> {
  let failure: string | undefined;
  const p = (await parser(argv).fail((msg: string | undefined, err: Error | undefined) => { failure = msg ?? err?.message ?? 'invalid arguments'; }).parseAsync()) as Record<string, unknown>;
  if (argv.includes('--help') || argv.includes('-h')) {
    io.stdout.write(`${await parser([]).getHelp()}\n`);
    return 0;
  }
  const seconds = p.seconds as number;
  if (failure === undefined && (!Number.isFinite(seconds) || seconds < 0)) failure = `--seconds must be a number ≥ 0, got '${String(p.seconds)}'`;
  if (failure !== undefined) {
    io.stderr.write(`difflora dist-check: ${failure}\nRun 'difflora dist-check --help' for the flags.\n`);
    return 2;
  }
  const started = performance.now();
  let pg: ProcessGroup;
  let alone = false;
  try {
    // ranks started with different flags fail to join, naming both (as train's flags will)
    const joined = await initProcessGroupFromEnv({ env: io.env, fingerprint: `dist-check ${argv.join(' ')}` });
    alone = joined === null;
    pg = joined ?? await ProcessGroup.create({ masterAddr: '127.0.0.1', masterPort: 0, worldSize: 1, rank: 0 });
  } catch (e) {
    io.stderr.write(`difflora dist-check: ${e instanceof Error ? e.message : String(e)}\n`);
    return e instanceof DistributedEnvError ? 2 : 1;
  }
  const torch = await import('../torch.js');
  const tag = `dist-check: rank ${pg.rank}/${pg.worldSize}`;
  try {
    io.stdout.write(`${tag} joined in ${((performance.now() - started) / 1000).toFixed(2)} s: ${pg.where.replace(/^rank \S+ /, '')}, ` +
      `local rank ${pg.localRank}/${pg.localWorldSize}, host ${hostname()}, pid ${process.pid}` +
      `${alone ? " — a group of one: run 'difflora launch --num_processes 2 dist-check' to check several processes" : ''}\n`);
    const failures = await checkCollectives(pg, torch);
    if (failures.length > 0) {
      io.stderr.write(`${tag}: FAILED: ${failures.join('; ')}\n`);
      return 1;
    }
    io.stdout.write(`${tag}: all-reduce sum ok, avg ok, broadcast ok, all-gather ok, barrier ok\n`);
    if (seconds > 0) io.stdout.write(`${tag}: ${await soak(pg, seconds, torch)}\n`);
    await pg.barrier();
    return 0;
  } catch (e) {
    io.stderr.write(`${tag}: error: ${e instanceof Error ? e.message : String(e)}\n`);
    return 1;
  } finally {
    pg.destroy();
  }
}
