// What the training loop needs of an optimizer (AdamW, Prodigy, Lion): its parameters, a learning rate the
// schedule sets before each step, one step over every parameter with a gradient, and a state a checkpoint saves
// and restores exactly. The GradScaler (grad_scaler.ts) unscales and checks `params`' gradients for any of them.
import type { Tensor } from '../tensor.js';

export const OPTIMIZER_KINDS = ['adamw', 'prodigy', 'lion'] as const;
export type OptimizerKind = (typeof OPTIMIZER_KINDS)[number];

/** An optimizer's state for a checkpoint: its tensors by `${param index}.${name}`, and plain JSON (with its kind). */
export interface OptimizerStateDict<M> { tensors: Map<string, Tensor>; meta: M }

export interface Optimizer {
  readonly kind: OptimizerKind;
  /** The learning rate of the next step (the LR schedule sets it). */
  lr: number;
  readonly params: Tensor[];
  /** One update of every parameter that has a gradient; the gradients are left in place (zeroGrad drops them). */
  step(): void;
  zeroGrad(): void;
  /** The state tensors (the optimizer's own: do not dispose) and JSON; `meta.steps[i] > 0` where parameter i has state. */
  stateDict(): OptimizerStateDict<{ steps: number[]; lr: number }>;
  loadStateDict(sd: OptimizerStateDict<{ steps: number[]; lr: number }>): void;
  /**
   * The state tensors parameter `p` has once it has stepped, with their shapes (a checkpoint checks them before
   * restoring). AdamW's master weights are not listed (they are optional).
   */
  stateShapes(p: Tensor): Record<string, readonly number[]>;
  dispose(): void;
}

/** Refuses parameters the native steps do not update (anything but float32, duplicates). */
export function checkFloat32Params(name: string, params: readonly Tensor[]): void {
  params.forEach((p, i) => {
    if (p.dtype !== 'float32') throw new TypeError(`${name}: parameter ${i} is ${p.dtype}; ${name} updates float32 parameters only (LoRA weights train in float32)`);
  });
  if (new Set(params).size !== params.length) throw new Error(`${name}: a parameter appears twice`);
}

/** The gradients of the parameters that have one (new handles: the caller disposes them). */
export function gradsOf(params: readonly Tensor[]): { index: number; p: Tensor; g: Tensor }[] {
  const out: { index: number; p: Tensor; g: Tensor }[] = [];
  params.forEach((p, index) => {
    const g = p.grad;
    if (g !== null) out.push({ index, p, g });
  });
  return out;
}

/** The number of elements of a tensor. */
export const numelOf = (t: Tensor): number => t.shape.reduce((a, b) => a * b, 1);
