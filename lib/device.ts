// Device names, checked before they reach libtorch: asking a CPU-only libtorch for 'cuda' otherwise fails deep in
// the dispatcher with a page of backend names. The check is a string test unless the name asks for CUDA.
import { native } from './native.js';
import type { Device } from './tensor.js';

/** What libtorch says of CUDA (native.info()'s fields): enough to tell why a device cannot be had. */
export interface CudaInfo { cudaCompiled: boolean; cudaDeviceCount: number; torchVersion: string }

let cached: CudaInfo | undefined;
function cudaInfo(): CudaInfo {
  cached ??= native.info();
  return cached;
}

const plural = (n: number) => (n === 1 ? 'there is 1 CUDA device (cuda:0)' : `there are ${n} CUDA devices (cuda:0…cuda:${n - 1})`);

/**
 * Why `device` cannot be had from a libtorch and a machine described by `cuda`, or null when it can (or names no
 * CUDA device: CPU and meta names are checked by libtorch itself). A pure function, so every case is testable
 * on any machine.
 */
export function deviceProblem(device: string, cuda: CudaInfo): string | null {
  if (!device.startsWith('cuda')) return null;
  const m = /^cuda(?::(\d+))?$/.exec(device);
  if (!m) return "expected 'cpu', 'cuda' or 'cuda:N'";
  if (!cuda.cudaCompiled) {
    return `this libtorch (${cuda.torchVersion}) has no CUDA — it is a CPU build; use 'cpu', or build difflora against a CUDA ` +
      'libtorch (LIBTORCH=/path/to/libtorch, or a PyTorch with CUDA importable by python3) to use a GPU';
  }
  if (cuda.cudaDeviceCount === 0) return `libtorch ${cuda.torchVersion} was built with CUDA, but no CUDA GPU is visible; use 'cpu'`;
  if (Number(m[1] ?? 0) >= cuda.cudaDeviceCount) return plural(cuda.cudaDeviceCount);
  return null;
}

/**
 * Throws a clear error when `device` names a CUDA device this libtorch or this machine cannot provide. `flag`
 * names where the device came from ('--device' → "--device=cuda:1: …"); without it the error says "device 'cuda:1': …".
 */
export function checkDevice(device: Device | null | undefined, flag?: string, cuda: CudaInfo = cudaInfo()): void {
  if (typeof device !== 'string') return;
  const problem = deviceProblem(device, cuda);
  if (problem !== null) throw new Error(flag ? `${flag}=${device}: ${problem}` : `device '${device}': ${problem}`);
}

/** Whether libtorch sees a CUDA GPU (torch.cuda.is_available()). */
export function cudaIsAvailable(): boolean {
  return native.info().cudaAvailable;
}

/** How many CUDA GPUs libtorch sees (torch.cuda.device_count()). */
export function cudaDeviceCount(): number {
  return native.info().cudaDeviceCount;
}

/** TF32 math for CUDA matmul and convolution (torch.backends.cuda.matmul.allow_tf32, --allow_tf32); returns the previous setting. */
export function setAllowTF32(on: boolean): boolean {
  return native.setAllowTF32(on);
}
