#!/usr/bin/env bash
# The device-machine script: build the addon against the PyTorch (CUDA) libtorch there, run the GPU
# checks and the per-op benchmark (ours and Python torch on the same machine). That machine has no Node
# and no network, so Node (.dev/node.xz), its N-API headers (.dev/node-include), node-addon-api and the
# compiled TypeScript (dist/) are carried. Logs go to $OUT.
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

ADDON=""
t0=$(date +%s)
if cmake -S . -B build-cuda -DCMAKE_BUILD_TYPE=Release -DCMAKE_JS_INC="$PWD/.dev/node-include" \
     -DCMAKE_PREFIX_PATH="$PREFIX" > "$OUT/cmake.log" 2>&1 && cmake --build build-cuda -j16 >> "$OUT/cmake.log" 2>&1; then
  ADDON=$PWD/build-cuda/difflora.node
  echo "cmake build ok in $(( $(date +%s) - t0 ))s"
else
  echo "cmake build failed (tail of cmake.log):"; tail -25 "$OUT/cmake.log"
  echo "trying the plain g++ build (same flags as binding.gyp)"
  mkdir -p build-manual
  inc=$(node scripts/torch-paths.cjs include | sed 's/[^ ]*/-I&/g')
  flags="-O2 -fPIC -std=c++17 -I.dev/node-include -Inode_modules/node-addon-api $inc $(node scripts/torch-paths.cjs defines | sed 's/[^ ]*/-D&/g') -DNAPI_VERSION=8 -DNODE_ADDON_API_CPP_EXCEPTIONS -DNODE_ADDON_API_CPP_EXCEPTIONS_ALL"
  ok=1
  for f in $(node scripts/torch-paths.cjs sources); do
    g++ $flags -c "$f" -o "build-manual/$(basename "$f" .cc).o" >> "$OUT/gxx.log" 2>&1 &
  done
  wait
  g++ -shared build-manual/*.o $(node scripts/torch-paths.cjs libs) -o build-manual/difflora.node >> "$OUT/gxx.log" 2>&1 || ok=0
  grep -E "error" "$OUT/gxx.log" | head -20
  [ $ok = 1 ] && ADDON=$PWD/build-manual/difflora.node
fi
[ -n "$ADDON" ] || { echo "no addon built"; exit 1; }
export DIFFLORA_ADDON=$ADDON

echo "== GPU checks"
node bench/gpu/check.mjs 2>&1 | tee "$OUT/check.log"
echo "== CUDA graph step (--cuda_graphs) vs eager"
timeout 240 node bench/gpu/graphs.mjs 2>&1 | tee "$OUT/graphs.log"
echo "== model checks"
node bench/gpu/models.mjs 2>&1 | tee "$OUT/models.log"
echo "== UNet benchmark (small-sd)"
node bench/unet.mjs cuda 2>&1 | tee "$OUT/unet.log"
if [ "${BENCH_OPS:-0}" = 1 ]; then
  echo "== per-op benchmark (1 thread)"
  for d in cuda cpu; do node bench/ops.mjs $d; python3 bench/ops_torch.py $d; done 2>&1 | tee "$OUT/bench.log"
fi

# Side by side (issue #15): the diffusers step and pipeline from the carried kit (.dev/gpu-reference, a copy of
# ../shared/gpu-reference made by prepare.sh), then difflora's with the same configuration keys, joined into one
# table. Budgets in seconds (imports and model builds included); SKIP_SIDE_BY_SIDE=1 leaves this out.
if [ "${SKIP_SIDE_BY_SIDE:-0}" != 1 ]; then
  K=$(mktemp -d)
  if [ -f .dev/gpu-reference/refkit-gpu.tar.xz ] && tar -xJf .dev/gpu-reference/refkit-gpu.tar.xz -C "$K"; then
    echo "== diffusers reference step (tier 1)"
    timeout $(( ${REF_BUDGET:-200} + 60 )) python3 -u .dev/gpu-reference/ref_step_cuda.py --kit "$K/refkit-gpu" --out "$OUT/ref-gpu.json" \
      --budget "${REF_BUDGET:-200}" --tiers 1 2>&1 | tail -25
    echo "== diffusers reference pipeline"
    timeout 150 python3 -u bench/gpu/ref_pipeline.py --kit "$K/refkit-gpu" --out "$OUT/ref-pipeline.json" 2>&1 | grep -v "^You are offline" | tail -5
    CONFIGS="$K/refkit-gpu/configs/sd15"
  else
    echo "no .dev/gpu-reference/refkit-gpu.tar.xz: difflora's rows only (run bench/gpu/prepare.sh first)"
    CONFIGS="${SD15_CONFIGS:-../shared/fixtures/sd15-shape}"
  fi
  echo "== difflora step and pipeline"
  SD15_CONFIGS="$CONFIGS" timeout $(( ${DL_BUDGET:-200} + 60 )) node bench/gpu/sd15_step.mjs --out "$OUT/difflora-gpu.json" --budget "${DL_BUDGET:-200}"
  node bench/gpu/join.mjs "$OUT/ref-gpu.json" "$OUT/difflora-gpu.json" "$OUT/ref-pipeline.json" | tee "$OUT/table.md"
fi
