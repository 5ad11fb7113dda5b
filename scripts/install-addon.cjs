#!/usr/bin/env node
// npm's `install` script: builds the native addon (build/Release/difflora.node) with cmake-js when it is not
// there yet, so `npm install difflora` (or the packed tarball) gives a working package from nothing.
// libtorch is found as CMakeLists.txt says: $LIBTORCH / $TORCH_DIR, the PyTorch that python3 imports, then
// the system (Debian's libtorch-dev). Skipped when DIFFLORA_ADDON points at an addon built elsewhere, or with
// DIFFLORA_SKIP_BUILD=1 (then build later with `npm rebuild difflora`).
'use strict';
const { spawnSync } = require('node:child_process');
const { existsSync } = require('node:fs');
const { availableParallelism } = require('node:os');
const { join, resolve } = require('node:path');

const root = resolve(__dirname, '..');
const addon = join(root, 'build', 'Release', 'difflora.node');
const log = (s) => console.error(`difflora install: ${s}`);

if (process.env.DIFFLORA_ADDON) {
  log(`using DIFFLORA_ADDON=${process.env.DIFFLORA_ADDON}; not building the native addon`);
  process.exit(0);
}
if (process.env.DIFFLORA_SKIP_BUILD === '1') {
  log('DIFFLORA_SKIP_BUILD=1: not building the native addon (build it with `npm rebuild difflora` or `npm run build:native`)');
  process.exit(0);
}
if (existsSync(addon) && process.env.DIFFLORA_FORCE_BUILD !== '1') {
  log(`native addon already built (${addon})`);
  process.exit(0);
}

const missing = ['cmake', 'c++', 'make'].filter((tool) => spawnSync(tool, ['--version'], { stdio: 'ignore' }).error);
if (missing.length) {
  log(`cannot build the native addon: ${missing.join(', ')} not found.\n` +
    '  Needed: cmake ≥ 3.18, a C++17 compiler, make and libtorch. On Debian/Ubuntu:\n' +
    '    sudo apt-get install cmake g++ make libtorch-dev libopenblas0-pthread\n' +
    '  or set LIBTORCH=/path/to/libtorch (or have PyTorch importable by python3); then run `npm rebuild difflora`.\n' +
    '  To use an addon built elsewhere, set DIFFLORA_ADDON=/path/to/difflora.node.');
  process.exit(1);
}

let cmakeJs;
try {
  cmakeJs = require.resolve('cmake-js/bin/cmake-js', { paths: [root] });
} catch {
  log('cmake-js is not installed (it is a dependency of difflora): reinstall the package');
  process.exit(1);
}
const jobs = String(Math.max(1, Number(process.env.DIFFLORA_BUILD_JOBS) || availableParallelism()));
log(`building the native addon with cmake-js (${jobs} jobs; this takes a few minutes)…`);
const r = spawnSync(process.execPath, [cmakeJs, 'compile', '--parallel', jobs], { cwd: root, stdio: 'inherit' });
if (r.status !== 0 || !existsSync(addon)) {
  log('building the native addon failed (see above). libtorch is looked up in $LIBTORCH / $TORCH_DIR, the PyTorch ' +
    'that python3 imports, then the system (Debian: `sudo apt-get install libtorch-dev libopenblas0-pthread`). ' +
    'Fix and run `npm rebuild difflora`, or set DIFFLORA_ADDON=/path/to/difflora.node.');
  process.exit(r.status || 1);
}
log(`built ${addon}`);
