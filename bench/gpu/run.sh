#!/usr/bin/env bash
# The device-machine script: build the addon against the PyTorch (CUDA) libtorch there, run the GPU
# checks, then the side-by-side with diffusers (issue #15). That machine has no Node and no network, so Node
# (.dev/node.xz), its N-API headers (.dev/node-include), node-addon-api, the compiled TypeScript (dist/) and the
# diffusers kit (.dev/gpu-reference, from bench/gpu/prepare.sh) are carried. Logs and JSON go to $OUT.
#
# One device call runs at most 10 minutes and a session has 15 minutes of device time, start-up included, so the
# work is split in phases (PHASE=...), each sized for one call on a warm machine (the addon built by the first is
# kept between calls):
#   PHASE=difflora   build, GPU checks (check.mjs, graphs.mjs), difflora's step and pipeline rows    ~5 min
#   PHASE=reference  diffusers' step (ref_step_cuda.py) and pipeline rows for the same keys            ~5 min
#   PHASE=all        both (the default; about 10 minutes: only with a fresh budget)
# CONFIGS (comma-separated keys) narrows both sides to the same rows; join.mjs makes the table from the JSON here.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
mkdir -p /tmp/nodebin
xz -dc .dev/node.xz > /tmp/nodebin/node 2>/dev/null || python3 -c "import lzma,shutil;shutil.copyfileobj(lzma.open('.dev/node.xz'),open('/tmp/nodebin/node','wb'))"
chmod +x /tmp/nodebin/node
export PATH=/tmp/nodebin:$PATH
echo "node $(node --version)"; date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch;print("torch", torch.__version__, "cuda", torch.version.cuda)'
PREFIX=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')

PHASE=${PHASE:-all}
K=$(mktemp -d)
KIT=""
if [ -f .dev/gpu-reference/refkit-gpu.tar.xz ] && tar -xJf .dev/gpu-reference/refkit-gpu.tar.xz -C "$K"; then KIT="$K/refkit-gpu"; fi
# both sides build SD 1.5 shapes from the same configs (the kit's, else the fixtures')
CONFIGS_DIR=${KIT:+$KIT/configs/sd15}
CONFIGS_DIR=${CONFIGS_DIR:-${SD15_CONFIGS:-../shared/fixtures/sd15-shape}}
KEYS_ARG=${CONFIGS:+--configs $CONFIGS}

if [ "$PHASE" = all ] || [ "$PHASE" = difflora ]; then
  ADDON=""
  t0=$(date +%s)
  # headers the CUDA parts need (graph.cc's ATen/cuda includes pull in cuBLAS/cuSPARSE/cuSOLVER's): say which are missing
  for h in cuda_runtime_api.h cublas_v2.h cublasLt.h cusparse.h cusolverDn.h; do
    ls "${CUDA_HOME:-/usr/local/cuda}/include/$h" > /dev/null 2>&1 || echo "note: $h is not in ${CUDA_HOME:-/usr/local/cuda}/include"
  done
  g++ --version | head -1
  if cmake -S . -B build-cuda -DCMAKE_BUILD_TYPE=Release -DCMAKE_JS_INC="$PWD/.dev/node-include" \
       -DCMAKE_PREFIX_PATH="$PREFIX" > "$OUT/cmake.log" 2>&1 && cmake --build build-cuda -j16 --target difflora >> "$OUT/cmake.log" 2>&1; then
    ADDON=$PWD/build-cuda/difflora.node
    echo "cmake build ok in $(( $(date +%s) - t0 ))s"
  else
    echo "cmake build failed (tail of cmake.log):"; tail -25 "$OUT/cmake.log"
    # a different build, not a repeat of the failed one: without the distributed backends (their c10d headers are the
    # largest never-compiled-here part), which the side-by-side does not use
    echo "trying the plain g++ build (binding.gyp's flags, without distributed: -DDIFFLORA_NO_DIST)"
    mkdir -p build-manual
    inc=$(node scripts/torch-paths.cjs include | sed 's/[^ ]*/-I&/g')
    flags="-O2 -fPIC $(node scripts/torch-paths.cjs std) -fopenmp -I.dev/node-include -Inode_modules/node-addon-api $inc $(node scripts/torch-paths.cjs defines | sed 's/[^ ]*/-D&/g') -DNAPI_VERSION=8 -DNODE_ADDON_API_CPP_EXCEPTIONS -DNODE_ADDON_API_CPP_EXCEPTIONS_ALL -DDIFFLORA_NO_DIST"
    ok=1
    for f in $(node scripts/torch-paths.cjs sources); do
      g++ $flags -c "$f" -o "build-manual/$(basename "$f" .cc).o" >> "$OUT/gxx.log" 2>&1 &
    done
    wait
    g++ -shared -fopenmp build-manual/*.o $(node scripts/torch-paths.cjs libs) -o build-manual/difflora.node >> "$OUT/gxx.log" 2>&1 || ok=0
    grep -E "error" "$OUT/gxx.log" | head -20
    [ $ok = 1 ] && ADDON=$PWD/build-manual/difflora.node
  fi
  [ -n "$ADDON" ] || { echo "no addon built"; exit 1; }
  export DIFFLORA_ADDON=$ADDON

  echo "== GPU checks"
  node bench/gpu/check.mjs 2>&1 | tee "$OUT/check.log"
  echo "== CUDA graph step (--cuda_graphs) vs eager"
  timeout 150 node bench/gpu/graphs.mjs 2>&1 | tee "$OUT/graphs.log"
  if [ "${MODEL_CHECKS:-0}" = 1 ]; then
    echo "== model checks"
    node bench/gpu/models.mjs 2>&1 | tee "$OUT/models.log"
    echo "== UNet benchmark (small-sd)"
    node bench/unet.mjs cuda 2>&1 | tee "$OUT/unet.log"
  fi
  if [ "${BENCH_OPS:-0}" = 1 ]; then
    echo "== per-op benchmark (1 thread)"
    for d in cuda cpu; do node bench/ops.mjs $d; python3 bench/ops_torch.py $d; done 2>&1 | tee "$OUT/bench.log"
  fi
  echo "== difflora step and pipeline (side by side, issue #15)"
  SD15_CONFIGS="$CONFIGS_DIR" timeout $(( ${DL_BUDGET:-200} + 60 )) node bench/gpu/sd15_step.mjs --out "$OUT/difflora-gpu.json" --budget "${DL_BUDGET:-200}" $KEYS_ARG
fi

# diffusers' side from the carried kit (.dev/gpu-reference, a copy of ../shared/gpu-reference made by prepare.sh), with
# the same keys (without difflora's :graph rows, which join.mjs compares with diffusers' eager row)
if [ "$PHASE" = all ] || [ "$PHASE" = reference ]; then
  if [ -n "$KIT" ]; then
    echo "== diffusers reference step"
    REF_KEYS=$(echo "${CONFIGS:-}" | tr ',' '\n' | grep -v ':graph$' | paste -sd, -)
    if [ -n "$REF_KEYS" ]; then ROWS=(--configs "$REF_KEYS"); else ROWS=(--tiers 1); fi
    timeout $(( ${REF_BUDGET:-200} + 60 )) python3 -u .dev/gpu-reference/ref_step_cuda.py --kit "$KIT" --out "$OUT/ref-gpu.json" \
      --budget "${REF_BUDGET:-200}" "${ROWS[@]}" 2>&1 | tail -25
    echo "== diffusers reference pipeline"
    timeout 150 python3 -u bench/gpu/ref_pipeline.py --kit "$KIT" --out "$OUT/ref-pipeline.json" 2>&1 | grep -v "^You are offline" | tail -5
  else
    echo "no .dev/gpu-reference/refkit-gpu.tar.xz: no diffusers rows (run bench/gpu/prepare.sh first)"
  fi
fi
if [ -f "$OUT/difflora-gpu.json" ]; then node bench/gpu/join.mjs "$OUT/ref-gpu.json" "$OUT/difflora-gpu.json" "$OUT/ref-pipeline.json" | tee "$OUT/table.md"; fi
