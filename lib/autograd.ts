// Grad mode, inference mode and autocast as scoped calls. Each restores the previous state in `finally`,
// so an op that throws inside never leaves, say, bf16 autocast switched on for the "fp32" code after it.
import { native } from './native.js';
import { dtypeCode, type DType } from './dtype.js';

function assertSync<T>(result: T, what: string): T {
  if (typeof result === 'object' && result !== null && typeof (result as { then?: unknown }).then === 'function') {
    throw new TypeError(`${what}(fn): fn returned a Promise; the mode is thread state and cannot span an await`);
  }
  return result;
}

/** Runs fn with gradient recording off (torch.no_grad). */
export function noGrad<T>(fn: () => T): T {
  const prev = native.setGradEnabled(false);
  try {
    return assertSync(fn(), 'noGrad');
  } finally {
    native.setGradEnabled(prev);
  }
}

/** Runs fn with gradient recording on (torch.enable_grad), e.g. inside noGrad. */
export function enableGrad<T>(fn: () => T): T {
  const prev = native.setGradEnabled(true);
  try {
    return assertSync(fn(), 'enableGrad');
  } finally {
    native.setGradEnabled(prev);
  }
}

export function isGradEnabled(): boolean {
  return native.isGradEnabled();
}

/** Runs fn in inference mode (torch.inference_mode): no autograd bookkeeping at all. */
export function inferenceMode<T>(fn: () => T): T {
  native.inferenceModeEnter();
  try {
    return assertSync(fn(), 'inferenceMode');
  } finally {
    native.inferenceModeExit();
  }
}

export interface AutocastOptions {
  deviceType: 'cpu' | 'cuda';
  /** CUDA: float16 (default) or bfloat16. CPU: bfloat16 only. */
  dtype?: DType;
  enabled?: boolean;
}

/** Runs fn in an autocast region (torch.autocast): matmuls and convs in the low-precision dtype. */
export function autocast<T>(options: AutocastOptions, fn: () => T): T {
  const dtype = options.dtype ?? (options.deviceType === 'cpu' ? 'bfloat16' : 'float16');
  const [prevEnabled, prevDtype] = native.autocastEnter(options.deviceType, options.enabled ?? true, dtypeCode(dtype));
  try {
    return assertSync(fn(), 'autocast');
  } finally {
    native.autocastExit(options.deviceType, prevEnabled, prevDtype);
  }
}

export function isAutocastEnabled(deviceType: 'cpu' | 'cuda' = 'cpu'): boolean {
  return native.isAutocastEnabled(deviceType);
}
