#!/usr/bin/env bash
# Prepares what bench/gpu/run.sh needs on a GPU machine without Node or network: a compressed Node binary
# and Node's N-API headers in .dev/ (git-ignored), and the compiled TypeScript in dist/. Then carry
# .dev, dist and node_modules/node-addon-api to the machine and run `bash bench/gpu/run.sh` there.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .dev/node-include
node_bin=$(command -v node)
inc=$(dirname "$(dirname "$node_bin")")/include/node
cp "$inc"/{node_api.h,node_api_types.h,js_native_api.h,js_native_api_types.h} .dev/node-include/
xz -T2 -6 -c "$node_bin" > .dev/node.xz
npm run build:ts
# the diffusers reference kit for the side-by-side rows (git-ignored under .dev/)
mkdir -p .dev/gpu-reference
cp ../shared/gpu-reference/{refkit-gpu.tar.xz,ref_step_cuda.py} .dev/gpu-reference/ 2>/dev/null || echo "no ../shared/gpu-reference: run.sh will time difflora alone"
echo "ready: carry .dev dist node_modules/node-addon-api; run: bash bench/gpu/run.sh"
