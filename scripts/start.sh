#!/usr/bin/env bash
# `npm start`: the main job on the built-in default (a generated tiny SD pipeline and synthetic captioned
# pictures; see README), building the addon and the TypeScript first when they are missing or out of date.
# Extra arguments go to `difflora train` (npm start -- --max_train_steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -f build/Release/difflora.node ]] || [[ -n "$(find native CMakeLists.txt -newer build/Release/difflora.node -print -quit)" ]]; then
  npm run build:native
fi
if [[ ! -f dist/cli/main.js ]] || [[ -n "$(find lib -newer dist/cli/main.js -print -quit)" ]]; then
  npm run build:ts
fi
exec node bin/difflora.js train "$@"
