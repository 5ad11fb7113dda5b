#!/usr/bin/env bash
# The package as a user gets it: `npm pack`, install the tarball into an empty project (its install script
# builds the native addon from nothing with cmake-js), then import the library from an ES module, type-check
# a TypeScript file against the shipped .d.ts, and run the `difflora` CLI through npx.
# Needs what `npm run setup` installs (cmake, g++, libtorch) and the npm registry (for the dependencies).
# Keep the temp folder for a look with KEEP_TMP=1; DIFFLORA_PACK_NO_BUILD=1 packs dist/ as it is (no prepack tsc).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
start=$SECONDS
tmp=$(mktemp -d "${TMPDIR:-/tmp}/difflora-pack-XXXXXX")
if [[ -z "${KEEP_TMP:-}" ]]; then trap 'rm -rf "$tmp"' EXIT; else echo "check-package: keeping $tmp"; fi
fail() { echo "check-package: FAIL: $*" >&2; exit 1; }

# 1. the tarball (prepack compiles the TypeScript into dist/)
pack_flags=()
[[ -n "${DIFFLORA_PACK_NO_BUILD:-}" ]] && pack_flags+=(--ignore-scripts)
tarball=$(npm pack --silent "${pack_flags[@]}" --pack-destination "$tmp" | tail -n 1) || fail "npm pack failed (its prepack runs npm run build:ts)"

tarball="$tmp/$tarball"
[[ -f "$tarball" ]] || fail "npm pack did not write a tarball"
listing=$(tar tzf "$tarball")
for f in package/package.json package/dist/index.js package/dist/index.d.ts package/dist/cli/main.js package/bin/difflora.js \
         package/CMakeLists.txt package/scripts/install-addon.cjs package/scripts/torch-paths.cjs package/native/addon.cc package/native/probes/fused_adamw.cc package/README.md; do
  grep -qx "$f" <<<"$listing" || fail "$f is not in the tarball"
done
if grep -E '^package/(build|build-gyp|node_modules|test|lib|\.dev)/' <<<"$listing" | head -n 3 | grep -q .; then
  fail "the tarball ships build outputs, tests or sources it should not: $(grep -E '^package/(build|build-gyp|node_modules|test|lib|\.dev)/' <<<"$listing" | head -n 3 | tr '\n' ' ')"
fi
echo "check-package: $(basename "$tarball"): $(wc -l <<<"$listing") files, $(du -k "$tarball" | cut -f1) KiB ($((SECONDS - start)) s)"

# 2. an empty project that installs it; npm ≥ 11 runs a dependency's install script only when allowed
app="$tmp/app"
mkdir -p "$app"
cd "$app"
cat >package.json <<'EOF'
{ "name": "difflora-pack-check", "version": "1.0.0", "private": true, "type": "module", "allowScripts": { "difflora": true } }
EOF
t0=$SECONDS
npm install --no-audit --no-fund --loglevel=error "$tarball"
[[ -f node_modules/difflora/build/Release/difflora.node ]] || fail "installing the tarball did not build node_modules/difflora/build/Release/difflora.node"
echo "check-package: npm install of the tarball, native build included: $((SECONDS - t0)) s"

# 3. the library from an ES module, as the README shows it
cat >check.mjs <<'EOF'
import assert from 'node:assert/strict';
import { torch, UNet2DConditionModel, loadSafetensors, saveSafetensors } from 'difflora';

assert.equal(typeof UNet2DConditionModel.fromPretrained, 'function');
const y = torch.tidy(() => {
  const a = torch.tensor([[1, 2], [3, 4]]);
  const x = torch.ones([2], { requiresGrad: true });
  const out = a.matmul(x).sum();
  out.backward();
  assert.deepEqual(Array.from(x.grad.dataSync()), [4, 6]);
  return out.item();
});
assert.equal(y, 10);
saveSafetensors('t.safetensors', new Map([['w', torch.arange(6).reshape(2, 3).to({ dtype: 'float32' })]]), { format: 'pt' });
const back = loadSafetensors('t.safetensors');
assert.deepEqual(back.tensors.get('w').shape, [2, 3]);
assert.deepEqual(back.metadata, { format: 'pt' });
console.log(`library ok: libtorch ${torch.info().torchVersion}`);
EOF
node check.mjs

# 3b. a broken addon in the user's project names the command that exists there (`npm rebuild difflora`)
msg=$(DIFFLORA_ADDON=/nonexistent/difflora.node node -e "import('difflora').catch((e) => console.log(e.message))")
grep -q 'npm rebuild difflora' <<<"$msg" || fail "the load error in an installed package does not name 'npm rebuild difflora': $msg"
grep -q 'npm run build:native' <<<"$msg" && fail "the load error in an installed package names a script the user's project lacks: $msg"
echo "check-package: the load error names npm rebuild difflora"

# 4. the shipped types, under the settings of a strict NodeNext project
cat >check.ts <<'EOF'
import { torch, type Tensor, UNet2DConditionModel } from 'difflora';
const t: Tensor = torch.zeros([2, 2]);
const shape: readonly number[] = t.shape;
export const fromPretrained: typeof UNet2DConditionModel.fromPretrained = UNet2DConditionModel.fromPretrained;
export { shape };
EOF
cat >tsconfig.json <<'EOF'
{ "compilerOptions": { "target": "ES2022", "module": "NodeNext", "moduleResolution": "NodeNext", "strict": true,
  "noUncheckedIndexedAccess": true, "lib": ["ES2023", "ESNext.Disposable"], "types": ["node"], "typeRoots": ["ROOT/node_modules/@types"],
  "skipLibCheck": false, "noEmit": true }, "files": ["check.ts"] }
EOF
sed -i "s#ROOT#$root#" tsconfig.json
node "$root/node_modules/typescript/bin/tsc" -p tsconfig.json || fail "check.ts does not type-check against the shipped .d.ts"
echo "check-package: types ok"

# 5. the CLI through npx
help=$(npx --no-install difflora --help)
for word in train env; do grep -q "$word" <<<"$help" || fail "difflora --help does not list '$word': $help"; done
env_out=$(npx --no-install difflora env)
grep -Eq '^libtorch: [0-9]+\.[0-9]+' <<<"$env_out" || fail "difflora env does not print the libtorch version: $env_out"
grep -q '^difflora ' <<<"$env_out" || fail "difflora env does not print its version: $env_out"
set +e
npx --no-install difflora no-such-command >/dev/null 2>&1
rc=$?
set -e
[[ $rc -eq 2 ]] || fail "difflora no-such-command exited $rc, expected 2"
echo "check-package: CLI ok"
echo "check-package: all good in $((SECONDS - start)) s"
