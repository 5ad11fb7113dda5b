// Gradient clipping with torch.nn.utils.clip_grad_norm_'s arithmetic.
import { native } from '../native.js';
import type { Tensor } from '../tensor.js';

/**
 * Scales the gradients of `params` in place so their total norm is at most maxNorm; returns the total
 * norm before clipping (one host sync). Parameters without a gradient are ignored.
 */
export function clipGradNorm(params: Iterable<Tensor>, maxNorm: number, normType = 2): number {
  const grads: Tensor[] = [];
  for (const p of params) {
    const g = p.grad;
    if (g !== null) grads.push(g);
  }
  try {
    const total = native.clipGradNorm(grads, maxNorm, normType) as unknown as Tensor;
    try { return total.item(); } finally { total.dispose(); }
  } finally {
    for (const g of grads) g.dispose();
  }
}
