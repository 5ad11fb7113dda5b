#!/usr/bin/env bash
# Builds the addon a second way, with node-gyp and binding.gyp, into build-gyp/ (cmake-js owns build/).
# Offline: node-gyp uses the headers of the installed Node (--nodedir), never downloads them.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=build-gyp
rm -rf "$out"
mkdir -p "$out"
cp -r binding.gyp native scripts "$out"/
ln -s "$root/node_modules" "$out/node_modules"
nodedir=${npm_config_nodedir:-$(dirname "$(dirname "$(command -v node)")")}
cd "$out"
JOBS=2 "$root/node_modules/.bin/node-gyp" rebuild --nodedir="$nodedir" --jobs 2
echo "node-gyp build: $root/$out/build/Release/difflora.node"
