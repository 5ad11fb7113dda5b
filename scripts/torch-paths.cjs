#!/usr/bin/env node
// The one place that locates libtorch, for both builds: $LIBTORCH / $TORCH_DIR, a PyTorch install, then the
// system (Debian's libtorch-dev). Prints the CMake prefix (CMakeLists.txt), or libtorch's include dirs, link
// flags, defines (C++ ABI, CUDA, c10d backends) and the addon's sources (binding.gyp), and the include dirs of the
// distributed backends' own headers (both builds).
'use strict';
const { execFileSync } = require('node:child_process');
const { existsSync, readdirSync, readFileSync } = require('node:fs');
const { join, resolve } = require('node:path');

function fromPython() {
  try {
    const out = execFileSync('python3', ['-c',
      'import torch, os, sys; sys.stdout.write(os.path.dirname(torch.__file__) + "\\n" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI)))'],
    { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
    const [root, abi] = out.trim().split('\n');
    return { root, abi: Number(abi) };
  } catch {
    return null;
  }
}

/** The cmake dir of a libtorch (Caffe2Targets.cmake lists the defines c10d's headers need). */
function caffe2Targets(t) {
  const arch = { x64: 'x86_64', arm64: 'aarch64' }[process.arch] || process.arch;
  const dirs = [join(t.lib, '..', 'share', 'cmake', 'Caffe2'), join(t.include, '..', 'share', 'cmake', 'Caffe2'),
    `/usr/lib/${arch}-linux-gnu/cmake/Caffe2`];
  return dirs.map((d) => join(d, 'Caffe2Targets.cmake')).find((f) => existsSync(f));
}

/**
 * USE_DISTRIBUTED / USE_C10D_GLOO / USE_C10D_NCCL as libtorch was built (CMake's Torch targets carry them;
 * node-gyp needs them spelled out, or c10d's headers compile to nothing).
 */
function distributedDefines(t) {
  const file = caffe2Targets(t);
  if (!file) return [];
  const text = readFileSync(file, 'utf8');
  const found = new Set();
  for (const m of text.matchAll(/INTERFACE_COMPILE_DEFINITIONS "([^"]*)"/g)) {
    for (const d of m[1].split(';')) if (/^USE_(DISTRIBUTED|C10D_[A-Z]+)$/.test(d)) found.add(d);
  }
  return [...found];
}

/**
 * Include dirs of the distributed backends' own headers, when not already beside libtorch's: $GLOO_INCLUDE_DIR,
 * $NCCL_INCLUDE_DIR, and the nccl.h of PyTorch's pip install (nvidia-nccl). Debian's gloo headers (libgloo-dev)
 * are in /usr/include and need nothing.
 */
function distributedIncludes() {
  const dirs = [process.env.GLOO_INCLUDE_DIR, process.env.NCCL_INCLUDE_DIR].filter((d) => d && existsSync(d));
  try {
    const out = execFileSync('python3', ['-c', 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "include"))'],
      { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
    if (out && existsSync(join(out, 'nccl.h'))) dirs.push(out);
  } catch {
    // no pip NCCL: a CUDA libtorch elsewhere brings nccl.h with the CUDA toolkit, or NCCL_INCLUDE_DIR says where
  }
  return dirs;
}

/** libtorch's version from its headers ([major, minor, patch]; the header moved to torch/headeronly in 2.13). */
function torchVersion(t) {
  for (const rel of ['torch/headeronly/version.h', 'torch/csrc/api/include/torch/version.h']) {
    const file = join(t.include, rel);
    if (!existsSync(file)) continue;
    const text = readFileSync(file, 'utf8');
    const part = (name) => Number((text.match(new RegExp(`#define TORCH_VERSION_${name} (\\d+)`)) ?? [])[1]);
    const v = [part('MAJOR'), part('MINOR'), part('PATCH')];
    if (v.every(Number.isInteger)) return v;
  }
  return null;
}

/**
 * The C++ standard to build with: libtorch's headers refuse anything older than C++20 from 2.13 on (2.12 already
 * builds as C++20); older ones are built as C++17, as they were tested. CMakeLists.txt decides the same from
 * Torch_VERSION.
 */
function cxxStd(t) {
  const v = torchVersion(t);
  return v && (v[0] > 2 || (v[0] === 2 && v[1] >= 12)) ? 'c++20' : 'c++17';
}

/**
 * Whether this libtorch has the fused AdamW with a tensor learning rate (2.x) that native/optim.cc uses on CUDA:
 * native/probes/fused_adamw.cc is compiled against its headers, as CMakeLists.txt's check does for the CMake build.
 */
function hasFusedAdamw(t) {
  try {
    execFileSync(process.env.CXX || 'g++', [`-std=${cxxStd(t)}`, '-fsyntax-only', `-D_GLIBCXX_USE_CXX11_ABI=${t.abi}`,
      '-I', t.include, '-I', join(t.include, 'torch/csrc/api/include'),
      resolve(__dirname, '..', 'native', 'probes', 'fused_adamw.cc')], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

function locate() {
  const env = process.env.LIBTORCH || process.env.TORCH_DIR;
  if (env) return { include: join(env, 'include'), lib: join(env, 'lib'), abi: 1, cmakePrefix: [env, join(env, 'share/cmake')] };
  const py = fromPython();
  if (py) return { include: join(py.root, 'include'), lib: join(py.root, 'lib'), abi: py.abi, cmakePrefix: [join(py.root, 'share/cmake')] };
  const arch = { x64: 'x86_64', arm64: 'aarch64' }[process.arch] || process.arch;
  const lib = `/usr/lib/${arch}-linux-gnu`;
  if (existsSync('/usr/include/torch/csrc/api/include')) return { include: '/usr/include', lib, abi: 1, cmakePrefix: [] };
  console.error('difflora: libtorch not found. Install it with `npm run setup` (Debian libtorch-dev) or set LIBTORCH.');
  process.exit(1);
}

const what = process.argv[2];
if (what === 'dist-include') {
  console.log(distributedIncludes().join(' '));
  process.exit(0);
}
if (what === 'sources') {
  const dir = resolve(__dirname, '..', 'native');
  console.log(readdirSync(dir).filter((f) => f.endsWith('.cc') && !f.startsWith('test_')).map((f) => `native/${f}`).join(' '));
  process.exit(0);
}
const t = locate();
if (what === 'cmake-prefix') {
  console.log(t.cmakePrefix.join(';'));
} else if (what === 'include') {
  const cudaHome = process.env.CUDA_HOME || '/usr/local/cuda';
  const cudaInclude = existsSync(join(t.lib, 'libtorch_cuda.so')) && existsSync(join(cudaHome, 'include')) ? [join(cudaHome, 'include')] : [];
  console.log([t.include, join(t.include, 'torch/csrc/api/include'), ...cudaInclude, ...distributedIncludes()].join(' '));
} else if (what === 'libs') {
  const libs = ['torch', 'torch_cpu', 'c10'];
  for (const extra of ['torch_cuda', 'c10_cuda']) {
    if (existsSync(join(t.lib, `lib${extra}.so`))) libs.push(extra);
  }
  // --no-as-needed: nothing references libtorch_cuda's symbols directly, but it must load to register CUDA kernels
  console.log([`-L${t.lib}`, `-Wl,-rpath,${t.lib}`, '-Wl,--no-as-needed', ...libs.map((l) => `-l${l}`)].join(' '));
} else if (what === 'defines') {
  // DIFFLORA_WITH_CUDA enables CUDA graphs and the CUDA allocator counters (needs the CUDA toolkit's headers),
  // DIFFLORA_FUSED_ADAMW the fused optimizer step on CUDA: the same defines CMakeLists.txt sets.
  const cuda = existsSync(join(t.lib, 'libtorch_cuda.so'));
  const cudaDefines = cuda ? ['DIFFLORA_WITH_CUDA', ...(hasFusedAdamw(t) ? ['DIFFLORA_FUSED_ADAMW'] : [])] : [];
  console.log([`_GLIBCXX_USE_CXX11_ABI=${t.abi}`, ...cudaDefines, ...distributedDefines(t)].join(' '));
} else if (what === 'std') {
  console.log(`-std=${cxxStd(t)}`);
} else if (what === 'version') {
  console.log((torchVersion(t) ?? ['unknown']).join('.'));
} else if (what === 'fused-adamw') {
  console.log(hasFusedAdamw(t) ? 'yes' : 'no');
} else {
  console.error('usage: torch-paths.cjs cmake-prefix|include|libs|defines|sources|dist-include|std|version|fused-adamw');
  process.exit(2);
}
