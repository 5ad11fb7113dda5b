#!/usr/bin/env bash
# CI's check of the second build: binding.gyp with node-gyp (set-up builds only with cmake-js), then the same
# smoke computation as test/build.test.ts through the node-gyp addon.
set -euo pipefail
cd "$(dirname "$0")/.."
npm run build:gyp
addon=$PWD/build-gyp/build/Release/difflora.node
out=$(DIFFLORA_ADDON="$addon" node --import tsx --input-type=module -e "
  const torch = await import('$PWD/lib/torch.ts');
  const a = torch.tensor([[1, 2], [3, 4]]);
  const x = torch.ones([2], { requiresGrad: true });
  const y = a.matmul(x).sum();
  y.backward();
  console.log(JSON.stringify({ y: y.item(), grad: Array.from(x.grad.toFloat64Array()) }));")
if [[ "$(tail -n 1 <<<"$out")" != '{"y":10,"grad":[4,6]}' ]]; then
  echo "check-gyp: FAIL: the node-gyp addon computed $out" >&2
  exit 1
fi
echo "check-gyp: the node-gyp build loads and computes ($addon)"
