#!/usr/bin/env bash
# Executes examples/notebook.ipynb headless on the tslab TypeScript kernel (jupyter nbconvert --execute) and
# checks the executed copy: no error outputs, the loss plot and the generated pictures present as image/png.
# Needs Jupyter (Debian's jupyter-nbconvert, jupyter-client, python3-ipykernel: `npm run setup -- --jupyter`)
# and the built library (dist/). tslab comes from scripts/jupyter (its own lockfile, kept out of difflora's
# dependencies) and its kernel is registered in a temporary Jupyter data folder, so nothing of the user's
# Jupyter set-up is touched. KEEP_TMP=1 keeps the executed notebook.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
start=$SECONDS
fail() { echo "check-notebook: FAIL: $*" >&2; exit 1; }

# The Python that has Jupyter: Debian's, even when another python3 (pyenv, venv) comes first on PATH.
py=""
for cand in python3 /usr/bin/python3; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import nbconvert, nbclient, jupyter_client' >/dev/null 2>&1; then py=$(command -v "$cand"); break; fi
done
[[ -n "$py" ]] || fail "Jupyter is not installed (no python3 imports nbconvert, nbclient and jupyter_client): run \`npm run setup -- --jupyter\` (Debian: apt-get install jupyter-nbconvert jupyter-client python3-ipykernel)"
[[ -f dist/index.js ]] || npm run build:ts
# 'difflora' in the notebook resolves to this checkout, as `npm run setup -- --jupyter` links it
[[ -e node_modules/difflora ]] || ln -sfn .. node_modules/difflora

if [[ ! -x scripts/jupyter/node_modules/.bin/tslab || scripts/jupyter/package-lock.json -nt scripts/jupyter/node_modules/.package-lock.json ]]; then
  npm ci --prefix scripts/jupyter --no-audit --no-fund --loglevel=error
fi
tslab="$root/scripts/jupyter/node_modules/.bin/tslab"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/difflora-notebook-XXXXXX")
if [[ -z "${KEEP_TMP:-}" ]]; then trap 'rm -rf "$tmp"' EXIT; else echo "check-notebook: keeping $tmp"; fi
export JUPYTER_DATA_DIR="$tmp/jupyter-data" JUPYTER_CONFIG_DIR="$tmp/jupyter-config" JUPYTER_RUNTIME_DIR="$tmp/jupyter-runtime"
export JUPYTER_PLATFORM_DIRS=0 PYDEVD_DISABLE_FILE_VALIDATION=1
"$tslab" install --python="$py" --user --binary="$tslab" >/dev/null
kernels=$("$py" -m jupyter kernelspec list)
grep -q '^ *tslab ' <<<"$kernels" || fail "the tslab kernel did not register: $kernels"

# --allow-errors: every cell runs and the check below reports each failing cell with its message (tslab
# writes compile errors and exceptions to the cell's stderr, which nbconvert's own error report leaves out)
t0=$SECONDS
"$py" -m nbconvert --to notebook --execute --allow-errors examples/notebook.ipynb \
  --ExecutePreprocessor.kernel_name=tslab --ExecutePreprocessor.timeout=900 --ExecutePreprocessor.startup_timeout=300 \
  --output-dir "$tmp" --output notebook.executed.ipynb 2>&1 | grep -v -e 'frozen modules' -e 'Debugger warning' -e 'PYDEVD' -e 'Debugging will proceed' -e 'MissingIDFieldWarning' -e '^  validate(nb)' -e '^0.00s - ' || true
[[ -f "$tmp/notebook.executed.ipynb" ]] || fail "jupyter nbconvert did not write the executed notebook"
echo "check-notebook: executed in $((SECONDS - t0)) s"

"$py" - "$tmp/notebook.executed.ipynb" <<'EOF'
import base64, json, re, sys
nb = json.load(open(sys.argv[1]))
problems = []
pngs = {}
for cell in nb["cells"]:
    if cell["cell_type"] != "code":
        continue
    tags = cell.get("metadata", {}).get("tags", [])
    for out in cell.get("outputs", []):
        if out["output_type"] == "error":
            problems.append(f"cell '{cell.get('id')}': {out.get('ename')}: {out.get('evalue')}")
        if out["output_type"] == "stream" and out.get("name") == "stderr":
            text = "".join(out.get("text", ""))
            # exceptions, and tslab's compile errors ("1:10 - Module ... has no exported member ...")
            if "rror" in text or re.search(r"^\d+:\d+ - ", text, re.M):
                problems.append(f"cell '{cell.get('id')}' failed: " + text[:800].rstrip().replace("\n", "\n    "))
        data = out.get("data", {})
        if "image/png" in data:
            raw = base64.b64decode("".join(data["image/png"]) if isinstance(data["image/png"], list) else data["image/png"])
            if not raw.startswith(b"\x89PNG\r\n\x1a\n"):
                problems.append(f"cell {cell.get('id')}: image/png output is not a PNG")
            for tag in tags:
                pngs[tag] = pngs.get(tag, 0) + 1
    if "train" in tags and not any("steps, last loss" in "".join(o.get("text", "")) for o in cell.get("outputs", [])):
        problems.append("the training cell did not report its result")
    if "train" in tags:
        # the progress bar is one display entry updated in place: one output, showing the last step
        bars = [o for o in cell.get("outputs", []) if "<progress" in "".join(o.get("data", {}).get("text/html", ""))]
        if len(bars) != 1 or 'value="40" max="40"' not in "".join(bars[0]["data"]["text/html"]):
            problems.append(f"the training cell should show one progress bar updated in place to step 40, found {len(bars)}: {[''.join(b['data']['text/html'])[:120] for b in bars]}")
for tag, want in (("loss-plot", 1), ("generate", 2)):
    if pngs.get(tag, 0) < want:
        problems.append(f"cell '{tag}' shows {pngs.get(tag, 0)} PNG image(s), expected at least {want}")
if problems:
    print("check-notebook: FAIL:\n  " + "\n  ".join(problems), file=sys.stderr)
    sys.exit(1)
print(f"check-notebook: outputs ok ({sum(pngs.values())} PNG images: {pngs})")
EOF
echo "check-notebook: all good in $((SECONDS - start)) s"
