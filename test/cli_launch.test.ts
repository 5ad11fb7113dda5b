// `difflora launch` (lib/cli/launch.ts) and `difflora dist-check` (lib/cli/dist_check.ts): argument checks in this
// process; real launches as child processes (the CLI through tsx, as bin/difflora.js runs it), checking exit codes,
// both ranks' output, and that no worker outlives a failure.
import { createServer } from 'node:net';
import { describe, expect, it } from 'vitest';
import { main } from '../lib/cli/main.js';
import { parseLaunchArgs, splitLaunchArgv, workerEnvs, type LaunchArgs } from '../lib/cli/launch.js';
import { alive, freePort, spawnCli, type CliResult } from './cli_helpers.js';

function capture(env: NodeJS.ProcessEnv = {}) {
  const out = { stdout: '', stderr: '' };
  return {
    out,
    io: { stdout: { write: (s: string) => { out.stdout += s; } }, stderr: { write: (s: string) => { out.stderr += s; } }, env },
  };
}

const pidsOf = (stdout: string): Map<number, number> =>
  new Map([...stdout.matchAll(/dist-check: rank (\d+)\/\d+ joined .*pid (\d+)/g)].map((m) => [Number(m[1]), Number(m[2])]));

describe('difflora launch: arguments', () => {
  it('splits its own flags from the command and the command\'s flags', () => {
    expect(splitLaunchArgv(['--num_processes', '2', '--multi_gpu', 'train', '--num_processes=9', '--lr', '1'])).toEqual({
      own: ['--num_processes', '2', '--multi_gpu'], command: 'train', rest: ['--num_processes=9', '--lr', '1'],
    });
    expect(splitLaunchArgv(['--num_processes=2', 'dist-check'])).toEqual({ own: ['--num_processes=2'], command: 'dist-check', rest: [] });
  });

  it('parses accelerate\'s flags', async () => {
    const a = await parseLaunchArgs(['--num_processes', '4', '--num_machines', '2', '--machine_rank', '1', '--main_process_ip', '10.0.0.1',
      '--main_process_port', '1234', '--gpu_ids', '0,1', '--multi_gpu', '--timeout', '30', 'dist-check', '--seconds=1']);
    expect(a).toEqual({
      numProcesses: 4, numMachines: 2, machineRank: 1, mainProcessIp: '10.0.0.1', mainProcessPort: 1234, multiGpu: true,
      mixedPrecision: undefined, gpuIds: '0,1', timeout: 30, command: 'dist-check', commandArgs: ['--seconds=1'],
    });
    const t = await parseLaunchArgs(['--mixed_precision', 'bf16', 'train', '--lr=1']);
    expect(t).toMatchObject({ numProcesses: 1, mainProcessIp: '127.0.0.1', mainProcessPort: 29500, timeout: 60, command: 'train', commandArgs: ['--lr=1', '--mixed_precision=bf16'] });
    // a validating run waits accelerate's 30 min: the others stand at the next all-reduce while rank 0 validates
    expect(await parseLaunchArgs(['train', '--validation_prompt', 'a dog'])).toMatchObject({ timeout: 1800 });
    expect(await parseLaunchArgs(['train', '--validation_prompt=a dog'])).toMatchObject({ timeout: 1800 });
    expect(await parseLaunchArgs(['dist-check'])).toMatchObject({ timeout: 60 });
    expect(await parseLaunchArgs(['--timeout', '5', 'train'])).toMatchObject({ timeout: 5 });
  });

  it('gives each local worker its ranks and the rendezvous', () => {
    const a: LaunchArgs = {
      numProcesses: 4, numMachines: 2, machineRank: 1, mainProcessIp: '10.0.0.1', mainProcessPort: 1234, multiGpu: true,
      mixedPrecision: undefined, gpuIds: '2,3', timeout: 30, command: 'train', commandArgs: [],
    };
    const envs = workerEnvs(a, { PATH: '/bin' }, 99, 8);
    expect(envs.map((e) => [e.RANK, e.LOCAL_RANK, e.WORLD_SIZE, e.LOCAL_WORLD_SIZE, e.GROUP_RANK])).toEqual([['2', '0', '4', '2', '1'], ['3', '1', '4', '2', '1']]);
    expect(envs[0]).toMatchObject({
      PATH: '/bin', MASTER_ADDR: '10.0.0.1', MASTER_PORT: '1234', DIFFLORA_DIST_TIMEOUT: '30', DIFFLORA_LAUNCH_PID: '99',
      DIFFLORA_DIST_BACKEND: 'nccl', CUDA_VISIBLE_DEVICES: '2,3', DIFFLORA_NUM_THREADS: '4',
    });
  });

  it('usage errors exit 2 naming the problem, before starting anything', async () => {
    const cases: [string[], RegExp][] = [
      [['--bogus', '1', 'dist-check'], /unknown flag '--bogus' before the command/],
      [['--num_processes', '2'], /give the command to run/],
      [['--num_processes', '3', '--num_machines', '2', 'dist-check'], /--num_processes 3 is not a multiple of --num_machines 2/],
      [['--num_processes', '0', 'dist-check'], /--num_processes must be an integer in \[1, 4096\], got '0'/],
      [['--num_processes', 'two', 'dist-check'], /--num_processes must be an integer/],
      [['--num_processes', '2', '--num_machines', '2', 'dist-check'], /--main_process_ip is required with --num_machines > 1/],
      [['--machine_rank', '1', 'dist-check'], /--machine_rank must be an integer in \[0, 0\]/],
      [['--main_process_port', '70000', 'dist-check'], /--main_process_port must be an integer in \[1, 65535\]/],
      [['--mixed_precision', 'fp8', 'dist-check'], /mixed_precision/],
      [['--mixed_precision', 'bf16', 'dist-check'], /--mixed_precision applies to train and generate, not 'dist-check'/],
      [['--mixed_precision', 'bf16', 'train', '--mixed_precision=fp16'], /--mixed_precision=bf16 conflicts with the command's own --mixed_precision=fp16/],
      [['--gpu_ids', 'a,b', 'train'], /--gpu_ids 'a,b' must be 'all' or GPU indices/],
      [['--num_processes', '2', '--multi_gpu', '--gpu_ids', '0', 'dist-check'], /lists fewer GPUs than the 2 workers/],
      [['--timeout', '0', 'dist-check'], /--timeout must be a number of seconds/],
      [['launch'], /launch cannot start launch/],
      [['--num_processes', '2', 'generate', '--prompt=x'], /'generate' does not run as several processes yet \(it would run 2 independent copies\); commands that do: train, dist-check/],
      [['--num_processes', '2', 'train-dreambooth', '--instance_prompt=x'], /'train-dreambooth' does not run as several processes yet \(it would run 2 independent copies\)/],
    ];
    for (const [argv, message] of cases) {
      const { out, io } = capture();
      expect(await main(['launch', ...argv], io), argv.join(' ')).toBe(2);
      expect(out.stderr).toMatch(message);
      expect(out.stderr).toMatch(/Run 'difflora launch --help' for the flags/);
    }
    const { out, io } = capture();
    expect(await main(['launch', '--help'], io)).toBe(0);
    expect(out.stdout).toMatch(/Usage: difflora launch \[flags\] <command>/);
    expect(out.stdout).toMatch(/--num_processes/);
  });

  it('dist-check refuses a malformed environment with exit 2 naming the variable', async () => {
    const { out, io } = capture({ WORLD_SIZE: '2', RANK: 'x', MASTER_ADDR: '127.0.0.1', MASTER_PORT: '1' });
    expect(await main(['dist-check'], io)).toBe(2);
    expect(out.stderr).toMatch(/RANK='x' is not an integer in \[0, 1\]/);
    const bad = capture();
    expect(await main(['dist-check', '--bogus'], bad.io)).toBe(2);
    expect(bad.out.stderr).toMatch(/Unknown argument: bogus/);
    const help = capture();
    expect(await main(['dist-check', '--help'], help.io)).toBe(0);
    expect(help.out.stdout).toMatch(/Usage: difflora launch --num_processes N dist-check/);
  });
});

describe('difflora launch: processes', () => {
  it('launch --num_processes 2 dist-check: both ranks check every collective and the launcher exits 0', async () => {
    const port = await freePort();
    const r = await spawnCli(['launch', '--num_processes', '2', '--main_process_port', String(port), 'dist-check']).done;
    expect(r.code, r.stderr).toBe(0);
    for (const rank of [0, 1]) {
      expect(r.stdout).toMatch(new RegExp(`dist-check: rank ${rank}/2 joined in [\\d.]+ s: \\(gloo, 127\\.0\\.0\\.1:${port}\\), local rank ${rank}/2`));
      expect(r.stdout).toContain(`dist-check: rank ${rank}/2: all-reduce sum ok, avg ok, broadcast ok, all-gather ok, barrier ok`);
    }
  });

  it('a worker killed with SIGKILL: the launcher stops the others and exits non-zero naming its rank; nothing is left', async () => {
    const port = await freePort();
    let killed: number | undefined;
    let seen = '';
    const { child, done } = spawnCli(['launch', '--num_processes', '2', '--main_process_port', String(port), 'dist-check', '--seconds', '60']);
    child.stdout!.on('data', (s: string) => {
      seen += s;
      const pids = pidsOf(seen);
      if (killed === undefined && pids.size === 2 && /rank 1\/2: all-reduce sum ok/.test(seen)) {
        killed = pids.get(1)!;
        process.kill(killed, 'SIGKILL');
      }
    });
    const started = Date.now();
    const r: CliResult = await done;
    expect(killed, r.stdout + r.stderr).toBeDefined();
    expect(Date.now() - started).toBeLessThan(30_000);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(new RegExp(`difflora launch: failed: worker rank 1 \\(pid ${killed}\\) was killed by SIGKILL`));
    for (const pid of pidsOf(r.stdout).values()) expect(alive(pid), `pid ${pid} still running`).toBe(false);
  });

  /** Starts a 2-worker soak run and calls `act` with the workers' pids once both ran the checks. */
  async function soakRun(act: (pids: Map<number, number>, launcher: number) => void): Promise<CliResult> {
    let acted = false;
    let seen = '';
    const run = spawnCli(['launch', '--num_processes', '2', '--main_process_port', String(await freePort()), 'dist-check', '--seconds', '60']);
    run.child.stdout!.on('data', (s: string) => {
      seen += s;
      if (!acted && pidsOf(seen).size === 2 && (seen.match(/all-reduce sum ok/g) ?? []).length === 2) {
        acted = true;
        act(pidsOf(seen), run.child.pid!);
      }
    });
    return run.done;
  }

  it('SIGTERM to the launcher is forwarded: the workers stop and the launcher exits 128+15', async () => {
    const r = await soakRun((_pids, launcher) => process.kill(launcher, 'SIGTERM'));
    expect(r.code).toBe(143);
    expect(pidsOf(r.stdout).size).toBe(2);
    for (const pid of pidsOf(r.stdout).values()) expect(alive(pid)).toBe(false);
  });

  it('a launcher killed with SIGKILL leaves no worker behind (they watch it)', async () => {
    const started = Date.now();
    // `done` settles when the workers, which share the launcher's stdout, have exited too
    const r = await soakRun((_pids, launcher) => process.kill(launcher, 'SIGKILL'));
    expect(r.signal).toBe('SIGKILL');
    expect(r.stderr).toMatch(/the launcher \(pid \d+\) is gone; worker/);
    for (const pid of pidsOf(r.stdout).values()) expect(alive(pid)).toBe(false);
    expect(Date.now() - started).toBeLessThan(30_000);
  });

  it('two launchers (--num_machines 2, --machine_rank 0 and 1) form one group', async () => {
    const port = await freePort();
    const machine = (rank: number) => spawnCli(['launch', '--num_processes', '2', '--num_machines', '2', '--machine_rank', String(rank),
      '--main_process_ip', '127.0.0.1', '--main_process_port', String(port), 'dist-check']).done;
    const [m0, m1] = await Promise.all([machine(0), machine(1)]);
    expect(m0.code, m0.stderr).toBe(0);
    expect(m1.code, m1.stderr).toBe(0);
    expect(m0.stdout).toMatch(/dist-check: rank 0\/2 joined .*local rank 0\/1/);
    expect(m1.stdout).toMatch(/dist-check: rank 1\/2 joined .*local rank 0\/1/);
    expect(m1.stdout).toContain('dist-check: rank 1/2: all-reduce sum ok, avg ok, broadcast ok, all-gather ok, barrier ok');
  });

  it('machines started with different command flags fail to join, both naming the difference', async () => {
    const port = await freePort();
    const machine = (rank: number, seconds: string) => spawnCli(['launch', '--num_processes', '2', '--num_machines', '2', '--machine_rank', String(rank),
      '--main_process_ip', '127.0.0.1', '--main_process_port', String(port), '--timeout', '10', 'dist-check', '--seconds', seconds]).done;
    const [m0, m1] = await Promise.all([machine(0, '0'), machine(1, '1')]);
    for (const m of [m0, m1]) {
      expect(m.code).toBe(1);
      expect(m.stderr).toMatch(/the ranks were started differently: rank 0: 'dist-check --seconds 0', rank 1: 'dist-check --seconds 1'/);
    }
    expect(m1.stderr).toMatch(/difflora launch: failed: worker rank 1 \(pid \d+\) exited with code 1/);
  });

  it('a rendezvous port already in use is a clear error before any worker starts', async () => {
    const busy = createServer();
    await new Promise<void>((resolve) => busy.listen(0, resolve));
    const port = (busy.address() as { port: number }).port;
    try {
      const r = await spawnCli(['launch', '--num_processes', '2', '--main_process_port', String(port), 'dist-check']).done;
      expect(r.code).toBe(1);
      expect(r.stderr).toContain(`difflora launch: --main_process_port ${port} is already in use on this machine`);
      expect(r.stdout).not.toMatch(/joined/);
    } finally {
      busy.close();
    }
  });
});
