# The Python side of bench/ops.mjs: the same three cases with torch on the same machine.
# Run with the python that has the same libtorch (Debian: /usr/bin/python3): python3 bench/ops_torch.py [device]
import json, statistics, sys, time
import torch
import torch.nn.functional as F

device = sys.argv[1] if len(sys.argv) > 1 else 'cpu'
torch.set_num_threads(1)

def sync():
    if device.startswith('cuda'):
        torch.cuda.synchronize()

def bench(name, iters, fn):
    for _ in range(min(iters, 2000)):
        fn()
    sync()
    rounds = []
    cpu_rounds = []
    for _ in range(5):
        t0 = time.perf_counter_ns()
        c0 = time.process_time_ns()
        for _ in range(iters):
            fn()
        sync()
        cpu_rounds.append((time.process_time_ns() - c0) / 1e3 / iters)
        rounds.append((time.perf_counter_ns() - t0) / 1e3 / iters)
    print(json.dumps({'impl': 'torch ' + torch.__version__, 'device': device, 'case': name, 'us_per_op': round(statistics.median(rounds), 3),
                      'cpu_us_per_op': round(statistics.median(cpu_rounds), 3)}))

with torch.no_grad():
    one = torch.ones(1, device=device); inc = torch.ones(1, device=device)
    bench('add_ 1 element', 200_000, lambda: one.add_(inc))
    a = torch.randn(8, 8, device=device); b = torch.randn(8, 8, device=device)
    bench('matmul 8x8', 100_000, lambda: a.matmul(b))
    x = torch.randn(64, 320, device=device); w = torch.randn(320, 320, device=device); bias = torch.randn(320, device=device)
    bench('linear+gelu 64x320', 20_000, lambda: F.gelu(F.linear(x, w, bias)))
