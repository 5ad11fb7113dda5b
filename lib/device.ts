// Device names, checked before they reach libtorch: asking a CPU-only libtorch for 'cuda' otherwise fails deep in
// the dispatcher with a page of backend names. The check is a string test unless the name asks for CUDA.
import { native } from './native.js';
import type { Device } from './tensor.js';

let cuda: { compiled: boolean; count: number; version: string } | undefined;

/** Throws a clear error when `device` names a CUDA device this libtorch or this machine cannot provide. */
export function checkDevice(device: Device | null | undefined): void {
  if (typeof device !== 'string' || !device.startsWith('cuda')) return;
  if (!cuda) {
    const info = native.info();
    cuda = { compiled: info.cudaCompiled, count: info.cudaDeviceCount, version: info.torchVersion };
  }
  if (!cuda.compiled) {
    throw new Error(`device '${device}': this libtorch (${cuda.version}) has no CUDA — it is a CPU build. ` +
      'Build difflora against a CUDA libtorch (LIBTORCH=/path/to/libtorch, or a PyTorch with CUDA importable by python3) to use a GPU.');
  }
  const index = device === 'cuda' ? 0 : Number(device.slice(5));
  if (cuda.count === 0) throw new Error(`device '${device}': libtorch ${cuda.version} was built with CUDA, but no CUDA GPU is visible`);
  if (!/^cuda(:\d+)?$/.test(device) || index >= cuda.count) {
    throw new Error(`device '${device}': expected 'cuda' or 'cuda:N' with N < ${cuda.count} (GPUs visible: ${cuda.count})`);
  }
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
