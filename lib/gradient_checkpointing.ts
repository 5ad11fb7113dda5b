// Gradient checkpointing (torch.utils.checkpoint): run a block without keeping its activations and
// recompute them in backward. The block runs once under noGrad while the native side records its ops;
// backward replays that record natively (JS cannot run on libtorch's CUDA backward threads), restoring the
// random generators and autocast state of the forward so dropout masks and precision match.
import { native } from './native.js';
import { isGradEnabled, noGrad } from './autograd.js';
import { dispose, tidy } from './scope.js';
import type { Tensor } from './tensor.js';

let recording = false;

/**
 * Whether a checkpointed block is being recorded. Its replay in backward, with grad enabled, must compute what the
 * recording computed, so an operator with a separate no-grad path (F.groupNormSilu) takes its with-grad arithmetic.
 */
export function isRecordingCheckpoint(): boolean { return recording; }

/**
 * Calls fn(...inputs) without storing intermediate activations for backward. fn must consist of tensor
 * ops only (no decisions on tensor values) and be deterministic given the random state; tensors with
 * autograd history must be passed as inputs (parameters may be captured). Returns fn's result, wired into
 * the graph so gradients reach the inputs and the captured parameters.
 */
export function checkpoint<T extends Tensor | Tensor[]>(fn: (...inputs: Tensor[]) => T, ...inputs: Tensor[]): T {
  if (!isGradEnabled()) return fn(...inputs);
  const detached = inputs.map((t) => t.detach());
  native.tapeBegin(detached);
  let result: T;
  recording = true;
  try {
    // tidy: the block's intermediates are freed as soon as it returns (backward recomputes them)
    result = tidy(() => noGrad(() => fn(...detached)));
  } catch (e) {
    native.tapeAbort();
    dispose(detached);
    throw e;
  } finally {
    recording = false;
  }
  const outputs: Tensor[] = Array.isArray(result) ? result : [result];
  let wired: Tensor[];
  try {
    wired = native.tapeEnd(inputs, outputs) as unknown as Tensor[];
  } finally {
    dispose([...detached, ...outputs.filter((o) => !inputs.includes(o))]);
  }
  return (Array.isArray(result) ? wired : wired[0]) as T;
}

