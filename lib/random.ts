// Seedable random generators per device, with state save/restore (exact resume depends on it).
import { native, type NativeGenerator } from './native.js';
import type { Tensor } from './tensor.js';
import { checkDevice } from './device.js';
import * as torch from './torch.js';

export class Generator {
  /** Read by the dispatcher when a Generator is passed to an op. */
  readonly _native: NativeGenerator;
  readonly device: string;

  constructor(device = 'cpu', nativeGenerator?: NativeGenerator) {
    checkDevice(device);
    this.device = device;
    this._native = nativeGenerator ?? native.generatorNew(device);
  }

  /** Seeds this generator (torch.Generator.manual_seed); returns this for chaining. */
  manualSeed(seed: number | bigint): this {
    native.generatorSeed(this._native, seed);
    return this;
  }

  initialSeed(): bigint {
    return native.generatorInitialSeed(this._native);
  }

  /** The full generator state as a uint8 CPU tensor (caller owns it). */
  getState(): Tensor {
    return native.generatorGetState(this._native) as unknown as Tensor;
  }

  setState(state: Tensor): void {
    native.generatorSetState(this._native, state);
  }
}

/** The default generator of a device: what manualSeed() seeds and ops use when given none. */
export function defaultGenerator(device = 'cpu'): Generator {
  return new Generator(device, native.generatorDefault(device));
}

/** Seeds the CPU and every CUDA default generator, as torch.manual_seed. */
export function manualSeed(seed: number): void {
  native.manualSeed(seed);
}

/**
 * diffusers' randn_tensor (utils/torch_utils.py): a CPU generator draws on the CPU and the result moves to
 * `like`'s device; without a generator the draw is on that device with its default generator. Same shape
 * and dtype as `like`.
 */
export function randnTensor(like: Tensor, generator?: Generator): Tensor {
  const device = generator?.device ?? like.device;
  const noise = torch.randn(like.shape, { dtype: like.dtype, device, generator });
  return device === like.device ? noise : noise.to({ device: like.device });
}
