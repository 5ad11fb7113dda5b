// Per-op overhead from JavaScript: in-place add on 1 element, 8x8 matmul, linear+gelu on 64x320.
// Run after `npm run build:ts`: node bench/ops.mjs [device]. Compare with bench/ops_torch.py on the same
// machine and libtorch; both print one JSON line per case (microseconds per op, median of 5 rounds: wall time,
// and the process's CPU time, which stays comparable when other jobs load the machine).
import { torch, F } from '../dist/index.js';

const device = process.argv[2] ?? 'cpu';
torch.setNumThreads(1);

function median(xs) { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; }

function time(name, iters, fn) {
  for (let i = 0; i < Math.min(iters, 2000); i++) fn();
  torch.synchronize();
  const rounds = [];
  const cpuRounds = [];
  for (let r = 0; r < 5; r++) {
    const t0 = process.hrtime.bigint();
    const c0 = process.cpuUsage();
    for (let i = 0; i < iters; i++) fn();
    torch.synchronize();
    const c = process.cpuUsage(c0);
    rounds.push(Number(process.hrtime.bigint() - t0) / 1e3 / iters);
    cpuRounds.push((c.user + c.system) / iters);
  }
  console.log(JSON.stringify({ impl: 'difflora', device, case: name, us_per_op: +median(rounds).toFixed(3), cpu_us_per_op: +median(cpuRounds).toFixed(3) }));
}

const one = torch.ones([1], { device });
const inc = torch.ones([1], { device });
time('add_ 1 element', 200_000, () => { one.add_(inc); });

const a = torch.randn([8, 8], { device });
const b = torch.randn([8, 8], { device });
time('matmul 8x8', 100_000, () => { a.matmul(b).dispose(); });

const x = torch.randn([64, 320], { device });
const w = torch.randn([320, 320], { device });
const bias = torch.randn([320], { device });
time('linear+gelu 64x320', 20_000, () => {
  const y = F.linear(x, w, bias);
  y.gelu().dispose();
  y.dispose();
});
time('linear+gelu 64x320 (tidy)', 20_000, () => { torch.tidy(() => { F.linear(x, w, bias).gelu(); }); });
