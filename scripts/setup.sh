#!/usr/bin/env bash
# One command from a fresh Debian/Ubuntu machine to a working difflora checkout:
#   system packages (libtorch and the build tools) when missing, npm dependencies, the native addon (built
#   once, with cmake-js; the node-gyp build of binding.gyp is checked by CI alone: scripts/check-gyp.sh), and the
#   compiled TypeScript.
# Set LIBTORCH=/path/to/libtorch (or have PyTorch importable by python3) to build against libtorch 2.x/CUDA
# instead of Debian's CPU libtorch; apt's libtorch is then not installed.
# `npm run setup -- --jupyter` also installs Jupyter from Debian (nbconvert, jupyter-client, ipykernel) and the
# tslab TypeScript kernel (scripts/jupyter), registered for this user, for examples/notebook.ipynb.
set -euo pipefail
cd "$(dirname "$0")/.."

jupyter=0
for arg in "$@"; do
  case "$arg" in
    --jupyter) jupyter=1 ;;
    *) echo "setup: unknown option '$arg' (known: --jupyter)" >&2; exit 2 ;;
  esac
done

need_apt=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
for pkg in cmake g++ make python3; do
  command -v "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [[ -z "${LIBTORCH:-}${TORCH_DIR:-}" ]] && ! python3 -c 'import torch' >/dev/null 2>&1; then
  have_pkg libtorch-dev || need_apt+=(libtorch-dev)
  # Debian's libtorch links libblas.so.3, which is the slow reference BLAS unless OpenBLAS provides it
  # (measured: 64x320 @ 320x320 fp32 matmul 2.5 ms with reference BLAS, 71 us with OpenBLAS).
  have_pkg libopenblas0-pthread || have_pkg libopenblas0-openmp || have_pkg libopenblas0-serial || need_apt+=(libopenblas0-pthread)
  # Debian's libtorch has c10d with Gloo, but gloo's headers come apart; without them the addon builds without
  # distributed support (difflora launch, ProcessGroup).
  have_pkg libgloo-dev || need_apt+=(libgloo-dev)
fi
# Jupyter: Debian's packages live in /usr/bin/python3 (another python3 may come first on PATH)
jupyter_python() {
  for py in python3 /usr/bin/python3; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import nbconvert, nbclient, jupyter_client, ipykernel' >/dev/null 2>&1; then command -v "$py"; return 0; fi
  done
  return 1
}
if ((jupyter)) && ! jupyter_python >/dev/null; then
  need_apt+=(jupyter-nbconvert python3-nbconvert jupyter-client python3-ipykernel)
fi
if ((${#need_apt[@]})); then
  echo "setup: installing ${need_apt[*]} with apt-get"
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

if [[ -f package-lock.json ]]; then npm ci --no-audit --no-fund; else npm install --no-audit --no-fund; fi
npm run build:native
npm run build:ts
if ((jupyter)); then
  npm ci --prefix scripts/jupyter --no-audit --no-fund
  # the notebook imports 'difflora' as a user's project does; in the checkout that name is this package
  # (what `npm link difflora` would make; tslab's TypeScript does not resolve a package's own name by itself)
  ln -sfn .. node_modules/difflora
  tslab="$PWD/scripts/jupyter/node_modules/.bin/tslab"
  "$tslab" install --python="$(jupyter_python)" --user --binary="$tslab"
  echo "setup: the tslab kernel is registered; open examples/notebook.ipynb in Jupyter, or run it headless: bash scripts/check-notebook.sh"
fi
echo "setup: done. Run the tests with: npm test"
