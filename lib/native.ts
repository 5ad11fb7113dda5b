// Loads the native addon and types its whole surface. Everything the TypeScript side calls in C++ is
// declared here, in one place (the addon is small on purpose: one generic op call plus a few coarse jobs).
import { createRequire } from 'node:module';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { cpus } from 'node:os';

/**
 * What native code sees of a JS tensor: the id of its slot in the addon's tensor table (native/common.h),
 * -1 once disposed. lib/tensor.ts's Tensor is one; functions below that take tensors accept it.
 */
export interface NativeTensorHandle {
  readonly _id: number;
}

/** A native random generator, held by lib/random.ts's Generator. */
export type NativeGenerator = { readonly __nativeGenerator: unique symbol };

export interface CpuMemory {
  allocatedBytes: number; requestedBytes: number; cachedBytes: number; peakAllocatedBytes: number;
  numAllocs: number; cacheHits: number; cacheMisses: number; numLiveBlocks: number; cacheCapBytes: number;
}

/** Per CUDA device, from libtorch's CUDA caching allocator (empty on CPU-only builds). */
export interface CudaMemory { allocatedBytes: number; peakAllocatedBytes: number; reservedBytes: number }

export interface NativeInfo {
  torchVersion: string; cudaAvailable: boolean; cudaCompiled: boolean; cudaDeviceCount: number; numThreads: number;
  numInteropThreads: number; parallelInfo: string; mkldnn: boolean; allocator: string;
}

/** A c10d process group (native/distributed.cc), held by lib/distributed/process_group.ts's ProcessGroup. */
export type NativeProcessGroup = { readonly __nativeProcessGroup: unique symbol };
/** A collective in flight; workWait settles when it finished on this rank. */
export type NativeWork = { readonly __nativeWork: unique symbol };

export interface NativeProcessGroupOptions {
  backend: 'gloo' | 'nccl'; masterAddr: string; masterPort: number; worldSize: number; rank: number; timeoutMs: number;
  /** Hosts the rendezvous store (default: rank 0). */
  isServer?: boolean;
  /** A description of how this process was started; every rank must give the same one. */
  fingerprint?: string;
  /** Where barrier and allGather buffers live: 'cpu' for gloo, this rank's GPU for nccl. */
  device?: string;
}

export interface NativeAddon {
  // tensor.cc: per-tensor functions, called with the tensor's id
  /** Registers (id) => tensor object, for tensors native code returns inside arrays. */
  setTensorFactory(factory: (id: number) => NativeTensorHandle): void;
  /** Frees the tensor of a live id; false (and nothing freed) for a disposed or stale one. */
  tensorRelease(id: number): boolean;
  tensorShape(id: number): number[];
  tensorStride(id: number): number[];
  tensorDtypeCode(id: number): number;
  tensorDevice(id: number): string;
  tensorRequiresGrad(id: number): boolean;
  tensorSetRequiresGrad(id: number, on: boolean): void;
  /** The gradient as a new tensor id, or null. */
  tensorGrad(id: number): number | null;
  tensorSetGrad(id: number, grad: NativeTensorHandle | null): void;
  tensorIsLeaf(id: number): boolean;
  tensorNumel(id: number): number;
  tensorNbytes(id: number): number;
  tensorBackward(id: number, gradient: NativeTensorHandle | null, retainGraph?: boolean): void;
  tensorSetData(id: number, other: NativeTensorHandle): void;
  tensorToBuffer(id: number): ArrayBuffer;
  tensorDataPtr(id: number): bigint;
  // dispatch.cc
  op(name: string, overload: string): number;
  /**
   * [positions of Tensor/Tensor? arguments, positions of Tensor[]/Tensor?[] ones, returns exactly one Tensor,
   * code for callFast or -1].
   */
  opInfo(index: number): [number[], number[], boolean, number];
  /** An unboxed fast path (native/dispatch.cc): a tensor id, true (in place), or undefined when not handled. */
  callFast(code: number, ...args: unknown[]): number | true | undefined;
  /** Tensor arguments as ids (lib/ops.ts converts); a single-Tensor result comes back as its id (or null). */
  call(index: number, ...args: unknown[]): unknown;
  callVoid(index: number, ...args: unknown[]): void;
  schema(index: number): string;
  // autograd.cc
  autocastEnter(deviceType: 'cpu' | 'cuda', enabled: boolean, dtypeCode: number): [boolean, number];
  autocastExit(deviceType: 'cpu' | 'cuda', prevEnabled: boolean, prevDtypeCode: number): void;
  isAutocastEnabled(deviceType: 'cpu' | 'cuda'): boolean;
  setGradEnabled(enabled: boolean): boolean;
  isGradEnabled(): boolean;
  inferenceModeEnter(): number;
  inferenceModeExit(): void;
  generatorNew(device: string): NativeGenerator;
  generatorDefault(device: string): NativeGenerator;
  generatorSeed(gen: NativeGenerator, seed: number | bigint): void;
  generatorInitialSeed(gen: NativeGenerator): bigint;
  generatorGetState(gen: NativeGenerator): NativeTensorHandle;
  generatorSetState(gen: NativeGenerator, state: NativeTensorHandle): void;
  manualSeed(seed: number): void;
  // optim.cc
  adamwStep(params: NativeTensorHandle[], grads: NativeTensorHandle[], expAvg: NativeTensorHandle[],
    expAvgSq: NativeTensorHandle[], masters: NativeTensorHandle[] | null,
    options: { lr: number; beta1: number; beta2: number; eps: number; weightDecay: number; step: number }): void;
  clipGradNorm(grads: NativeTensorHandle[], maxNorm: number, normType: number): NativeTensorHandle;
  unscaleGrads(grads: NativeTensorHandle[], invScale: number): boolean;
  /** One Prodigy step over all parameters (both passes, one host sync); expAvg null when beta1 = 0. */
  prodigyStep(params: NativeTensorHandle[], grads: NativeTensorHandle[], expAvg: NativeTensorHandle[] | null, expAvgSq: NativeTensorHandle[],
    s: NativeTensorHandle[], p0: NativeTensorHandle[],
    options: { lr: number; beta1: number; beta2: number; beta3: number; eps: number; weightDecay: number; decouple: boolean; useBiasCorrection: boolean;
      safeguardWarmup: boolean; d: number; d0: number; dMax: number; dNumerator: number; dCoef: number; growthRate: number; k: number }):
    { stepped: boolean; d: number; dMax: number; dNumerator: number; dHat: number; dDenom: number };
  /** One Lion step over all parameters. */
  lionStep(params: NativeTensorHandle[], grads: NativeTensorHandle[], expAvg: NativeTensorHandle[],
    options: { lr: number; beta1: number; beta2: number; weightDecay: number }): void;
  /** shadow ← shadow − oneMinusDecay · (shadow − param), in place. */
  emaStep(shadow: NativeTensorHandle[], params: NativeTensorHandle[], oneMinusDecay: number): void;
  /** GradScaler.unscale_ on the device: foundInf ← any inf/NaN (0/1), grads × 1/scale. No host sync. */
  ampUnscale(grads: NativeTensorHandle[], scale: NativeTensorHandle, foundInf: NativeTensorHandle): void;
  /** GradScaler.update on the device (scale and growth tracker in place, from foundInf). No host sync. */
  ampUpdateScale(scale: NativeTensorHandle, growthTracker: NativeTensorHandle, foundInf: NativeTensorHandle, growthFactor: number, backoffFactor: number,
    growthInterval: number): void;
  /** adamwStep with lr and stepCount on the device, a step flagged by foundInf changing nothing; advances stepCount. */
  adamwStepOnDevice(params: NativeTensorHandle[], grads: NativeTensorHandle[], expAvg: NativeTensorHandle[], expAvgSq: NativeTensorHandle[],
    masters: NativeTensorHandle[] | null, options: { lr: NativeTensorHandle; stepCount: NativeTensorHandle;
      foundInf: NativeTensorHandle | null; beta1: number; beta2: number; eps: number; weightDecay: number }): void;
  // graph.cc (a CUDA libtorch only; elsewhere each throws)
  cudaGraphNew(deviceIndex: number): number;
  cudaGraphEnter(id: number): void;
  cudaGraphExit(id: number): void;
  cudaGraphCaptureBegin(id: number): void;
  cudaGraphCaptureEnd(id: number): void;
  cudaGraphReplay(id: number): void;
  cudaGraphRelease(id: number): void;
  // safetensors.cc
  /** A new CPU tensor read with pread from `position` of the open file `fd` (errors on a short read). */
  readTensor(fd: number, position: number, dtypeCode: number, shape: number[]): NativeTensorHandle;
  /** Header then tensor bytes into an exclusive temporary file, chmod `mode`, fsync, rename over a regular file or nothing. */
  writeFileAtomic(path: string, header: Uint8Array, tensors: NativeTensorHandle[], mode: number): void;
  // checkpoint.cc
  tapeBegin(inputs: NativeTensorHandle[]): void;
  tapeAbort(): void;
  tapeEnd(inputs: NativeTensorHandle[], outputs: NativeTensorHandle[]): NativeTensorHandle[];
  // runtime.cc
  info(): NativeInfo;
  setNumThreads(n: number): void;
  memory(): { numTensors: number; cpu: CpuMemory; cuda: CudaMemory[] };
  emptyCache(): void;
  setCacheCap(bytes: number): void;
  resetPeakMemory(): void;
  fromBuffer(data: ArrayBufferView, dtypeCode: number, shape: number[], device?: string): NativeTensorHandle;
  setAllowTF32(on: boolean): boolean;
  synchronize(): void;
  // distributed.cc (createProcessGroup rejects with what to install when this build has no distributed support)
  distributedInfo(): { gloo: boolean; nccl: boolean };
  createProcessGroup(options: NativeProcessGroupOptions): Promise<{ handle: NativeProcessGroup; where: string }>;
  allReduce(group: NativeProcessGroup, tensors: NativeTensorHandle[], op: 'sum' | 'avg'): NativeWork;
  broadcast(group: NativeProcessGroup, tensors: NativeTensorHandle[], root: number): NativeWork;
  allGather(group: NativeProcessGroup, tensor: NativeTensorHandle): NativeWork;
  barrier(group: NativeProcessGroup): NativeWork;
  /** Resolves with allGather's tensors (one per rank; [] for the other collectives). */
  workWait(work: NativeWork): Promise<NativeTensorHandle[]>;
  workIsCompleted(work: NativeWork): boolean;
  destroyProcessGroup(group: NativeProcessGroup): void;
}

const packageRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..');

/** Where the addon may be: only $DIFFLORA_ADDON when set, else the cmake-js build, then the node-gyp one. */
function candidates(): string[] {
  if (process.env.DIFFLORA_ADDON) return [resolve(process.env.DIFFLORA_ADDON)];
  return [join(packageRoot, 'build', 'Release', 'difflora.node'), join(packageRoot, 'build-gyp', 'build', 'Release', 'difflora.node')];
}

/**
 * Threading defaults, set before libtorch (and its OpenMP and OpenBLAS) load, since both read the
 * environment once at start-up. Measured here (PLATFORM.md): OpenMP's default active wait made 2-thread
 * training steps up to 16x slower; OpenBLAS misdetects AVX-512 CPUs as Prescott and runs 4x slower.
 */
function setThreadingEnv(): void {
  const env = process.env;
  env.OMP_WAIT_POLICY ??= 'PASSIVE';
  if (env.OPENBLAS_CORETYPE === undefined) {
    try {
      const flags = readFileSync('/proc/cpuinfo', 'utf8').match(/^flags\s*:(.*)$/m)?.[1] ?? '';
      const has = (f: string) => new RegExp(`\\b${f}\\b`).test(flags);
      if (has('avx512f') && has('avx512bw') && has('avx512vl')) env.OPENBLAS_CORETYPE = 'SkylakeX';
      else if (has('avx2') && has('fma')) env.OPENBLAS_CORETYPE = 'Haswell';
    } catch {
      // not Linux: leave OpenBLAS to its own detection
    }
  }
}

/**
 * The command that rebuilds the addon where the user is: inside a checkout of difflora the package's own script;
 * installed as a dependency (node_modules/difflora), `npm rebuild difflora` from the user's project.
 */
function rebuildCommand(): string {
  return /[\\/]node_modules[\\/]/.test(packageRoot) ? 'npm rebuild difflora' : 'npm run build:native';
}

function loadError(tried: string[], cause: unknown): Error {
  const message = cause instanceof Error ? cause.message : String(cause);
  const rebuild = rebuildCommand();
  const installed = rebuild === 'npm rebuild difflora';
  const lines = [`difflora: could not load the native addon (${message}).`, `Tried: ${tried.join(', ')}`, 'Possible solutions:'];
  if (/libtorch|libc10|libtorch_cpu|libtorch_cuda/.test(message)) {
    lines.push(installed
      ? `- libtorch is missing: install it (Debian/Ubuntu: \`sudo apt-get install libtorch-dev libopenblas0-pthread\`), or point LIBTORCH at a libtorch 2.x, then run \`${rebuild}\`.`
      : `- libtorch is missing: run \`npm run setup\` (installs Debian's libtorch-dev), or point LIBTORCH at a libtorch 2.x and rebuild with \`${rebuild}\`.`);
  } else if (!tried.some((p) => existsSync(p))) {
    lines.push(installed
      ? `- the addon is not built (its install step was skipped or failed): install cmake, a C++17 compiler and libtorch (Debian/Ubuntu: \`sudo apt-get install cmake g++ make libtorch-dev libopenblas0-pthread\`), then run \`${rebuild}\`.`
      : `- the addon is not built: run \`${rebuild}\` (or \`npm run setup\` on a fresh machine).`);
  } else {
    lines.push(`- rebuild the addon for this Node.js and libtorch: \`${rebuild}\`.`);
  }
  lines.push('- set DIFFLORA_ADDON=/path/to/difflora.node to use an addon built elsewhere.');
  const err = new Error(lines.join('\n'));
  (err as Error & { cause?: unknown }).cause = cause;
  return err;
}

function load(): NativeAddon {
  setThreadingEnv();
  const require = createRequire(import.meta.url);
  const tried = candidates();
  let lastError: unknown = new Error('no candidate path');
  for (const path of tried) {
    if (!existsSync(path)) continue;
    try {
      const addon = require(path) as NativeAddon;
      const threads = Number(process.env.DIFFLORA_NUM_THREADS ?? cpus().length);
      if (Number.isFinite(threads) && threads >= 1) addon.setNumThreads(threads);
      return addon;
    } catch (e) {
      lastError = e;
    }
  }
  throw loadError(tried, lastError);
}

export const native: NativeAddon = load();
