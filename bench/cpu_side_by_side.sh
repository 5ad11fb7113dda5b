#!/usr/bin/env bash
# The CPU training step side by side with diffusers on this machine (issue #15; bench/RESULTS.md): the reference
# kit's ref_step_cuda.py (diffusers 0.31 + PEFT, Debian's python3-torch) and bench/gpu/sd15_step.mjs, both on
# small-sd's configs, fp32, 1 thread, alternating ROUNDS times; each round's two JSON files are joined by
# bench/gpu/join.mjs. Needs ../shared/gpu-reference and ../shared/fixtures/small-sd, and `npm run build:ts`.
#   bash bench/cpu_side_by_side.sh [rounds] [configs]     → .dev/cpu-sbs/{ref,difflora}N.json and tables
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
shared=$(cd "$root/.." && pwd)/shared
rounds=${1:-3}
configs=${2:-fp32:64:1,fp32:64:4,fp32:128:1,fp32:128:4}
out=$root/.dev/cpu-sbs
kit=$root/.dev/refkit-small-sd
mkdir -p "$out"

# The kit with small-sd's configs in place of SD 1.5's (ref_step_cuda.py reads configs/sd15).
if [ ! -d "$kit" ]; then
  tmp=$(mktemp -d)
  tar -xJf "$shared/gpu-reference/refkit-gpu.tar.xz" -C "$tmp"
  rm -rf "$tmp/refkit-gpu/configs/sd15"
  mkdir -p "$tmp/refkit-gpu/configs/sd15"
  for sub in unet vae text_encoder scheduler; do cp -r "$shared/fixtures/small-sd/$sub" "$tmp/refkit-gpu/configs/sd15/"; done
  mv "$tmp/refkit-gpu" "$kit"
  rmdir "$tmp"
fi

# The same threading on both sides (difflora's loader would otherwise pick an OpenBLAS core type for itself only).
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 DIFFLORA_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
if [ -z "${OPENBLAS_CORETYPE:-}" ]; then
  if grep -qw avx512f /proc/cpuinfo && grep -qw avx512bw /proc/cpuinfo && grep -qw avx512vl /proc/cpuinfo; then export OPENBLAS_CORETYPE=SkylakeX
  elif grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo; then export OPENBLAS_CORETYPE=Haswell; fi
fi
export SD15_CONFIGS=$shared/fixtures/small-sd

for r in $(seq 1 "$rounds"); do
  echo "== round $r $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
  /usr/bin/python3 -u "$shared/gpu-reference/ref_step_cuda.py" --kit "$kit" --device cpu --configs "$configs" \
    --warmup 3 --steps 10 --matmul-n 256 --no-smoke --budget 600 --out "$out/ref$r.json" > "$out/ref$r.log" 2>&1
  node "$root/bench/gpu/sd15_step.mjs" --device cpu --configs "$configs" --warmup 3 --steps 10 --matmul-n 256 \
    --no-pipeline --budget 600 --out "$out/difflora$r.json" > "$out/difflora$r.log" 2>&1
  node "$root/bench/gpu/join.mjs" "$out/ref$r.json" "$out/difflora$r.json" | tee "$out/table$r.md"
done
