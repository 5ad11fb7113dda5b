// nn.Module: a module's fields are its children. Fields holding a Module are submodules, fields holding a
// parameter or buffer Tensor are its state, so dotted paths equal PyTorch's (`to_out.0.weight`) and a
// checkpoint loads by walking names, never through a rename table.
import { keep } from '../scope.js';
import { op } from '../ops.js';
import { noGrad } from '../autograd.js';
import { Tensor, type Device } from '../tensor.js';
import { isFloatingPoint, type DType } from '../dtype.js';

/** Drops F.conv2d's kept weight layouts (native/conv.cc) whose weights are gone; returns how many are kept (0 where none are). */
const convCacheTrim = op('difflora::conv_cache_trim') as unknown as () => number;

const buffers = new WeakSet<Tensor>();
const nonPersistent = new WeakSet<Tensor>();

/** Marks t as a trainable parameter owned by a module (exempt from tidy scopes, requires grad). */
export function parameter(t: Tensor, requiresGrad = true): Tensor {
  keep(t);
  t.requiresGrad = requiresGrad;
  return t;
}

/** Marks t as a buffer (state that is not trained); non-persistent buffers stay out of stateDict. */
export function buffer(t: Tensor, persistent = true): Tensor {
  keep(t);
  buffers.add(t);
  if (!persistent) nonPersistent.add(t);
  return t;
}

export interface LoadResult { missingKeys: string[]; unexpectedKeys: string[] }
export type StateDict = Map<string, Tensor>;

export class Module {
  /** train()/eval() switch (dropout). Not a child: booleans are skipped by the field walk. */
  training = true;

  /** Submodules in declaration order, named by their field (ModuleList overrides with indices). */
  namedChildren(): [string, Module][] {
    return Object.entries(this).filter((e): e is [string, Module] => e[1] instanceof Module);
  }

  /** This module's own parameters and buffers (not its children's). */
  protected ownTensors(): [string, Tensor][] {
    return Object.entries(this).filter((e): e is [string, Tensor] => e[1] instanceof Tensor);
  }

  namedModules(prefix = ''): [string, Module][] {
    const out: [string, Module][] = [[prefix, this]];
    for (const [name, child] of this.namedChildren()) out.push(...child.namedModules(prefix ? `${prefix}.${name}` : name));
    return out;
  }

  namedParameters(prefix = ''): [string, Tensor][] {
    const out: [string, Tensor][] = [];
    for (const [path, m] of this.namedModules(prefix)) {
      for (const [name, t] of m.ownTensors()) if (!buffers.has(t)) out.push([path ? `${path}.${name}` : name, t]);
    }
    return out;
  }

  parameters(): Tensor[] { return this.namedParameters().map(([, t]) => t); }

  namedBuffers(prefix = ''): [string, Tensor][] {
    const out: [string, Tensor][] = [];
    for (const [path, m] of this.namedModules(prefix)) {
      for (const [name, t] of m.ownTensors()) if (buffers.has(t)) out.push([path ? `${path}.${name}` : name, t]);
    }
    return out;
  }

  /**
   * Parameters and persistent buffers by dotted name, in PyTorch's order (each module's own tensors,
   * then its children's). The tensors are the module's own: do not dispose them.
   */
  stateDict(): StateDict {
    const out: StateDict = new Map();
    for (const [path, m] of this.namedModules()) {
      for (const [name, t] of m.ownTensors()) if (!nonPersistent.has(t)) out.set(path ? `${path}.${name}` : name, t);
    }
    return out;
  }

  /**
   * Copies values in by name (converting dtype). Shapes must match; with strict (the default) a missing
   * or unexpected key is an error listing them all, as torch's load_state_dict.
   */
  loadStateDict(source: StateDict | Record<string, Tensor>, options: { strict?: boolean } = {}): LoadResult {
    const strict = options.strict ?? true;
    const src = source instanceof Map ? source : new Map(Object.entries(source));
    const own = this.stateDict();
    const missingKeys = [...own.keys()].filter((k) => !src.has(k));
    const unexpectedKeys = [...src.keys()].filter((k) => !own.has(k));
    const mismatched: string[] = [];
    for (const [k, t] of own) {
      const s = src.get(k);
      if (s && !sameShape(s.shape, t.shape)) mismatched.push(`${k}: checkpoint [${s.shape.join(', ')}] vs model [${t.shape.join(', ')}]`);
    }
    const problems: string[] = [];
    if (mismatched.length) problems.push(`size mismatch for ${mismatched.length} key(s):\n  ${mismatched.join('\n  ')}`);
    if (strict && missingKeys.length) problems.push(`missing key(s) (${missingKeys.length}): ${listKeys(missingKeys)}`);
    if (strict && unexpectedKeys.length) problems.push(`unexpected key(s) (${unexpectedKeys.length}): ${listKeys(unexpectedKeys)}`);
    if (problems.length) throw new Error(`Error(s) in loading state dict for ${this.constructor.name}:\n${problems.join('\n')}`);
    noGrad(() => {
      for (const [k, t] of own) {
        const s = src.get(k);
        if (s) t.copy_(s);
      }
    });
    return { missingKeys, unexpectedKeys };
  }

  /**
   * Moves/casts every parameter and buffer in place (the Tensor objects stay the same). As in PyTorch, a
   * dtype applies to floating-point tensors only: integer buffers (CLIP's position_ids) keep theirs.
   */
  to(target: DType | Device | { dtype?: DType; device?: Device }): this {
    const o = typeof target === 'string' ? (isDType(target) ? { dtype: target } : { device: target }) : target;
    noGrad(() => {
      for (const [, t] of [...this.namedParameters(), ...this.namedBuffers()]) {
        const moved = t.to(isFloatingPoint(t.dtype) ? o : { device: o.device });
        t.setData(moved);
        moved.dispose();
      }
    });
    return this;
  }

  train(mode = true): this {
    for (const [, m] of this.namedModules()) m.training = mode;
    return this;
  }

  eval(): this { return this.train(false); }

  /** Freezes (false) or unfreezes every parameter. */
  requiresGrad_(on = true): this {
    for (const p of this.parameters()) p.requiresGrad = on;
    return this;
  }

  /** Drops accumulated gradients (set to None, as PyTorch's default). */
  zeroGrad(): void {
    for (const p of this.parameters()) p.grad = null;
  }

  /** Frees every parameter and buffer; the module is unusable afterwards. */
  dispose(): void {
    for (const [, t] of [...this.namedParameters(), ...this.namedBuffers()]) t.dispose();
    convCacheTrim(); // F.conv2d's kept weight layouts (native/conv.cc) go with their weights
  }

  numParameters(): number {
    return this.parameters().reduce((n, p) => n + p.numel(), 0);
  }
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}

function listKeys(keys: string[]): string {
  const shown = keys.slice(0, 20).map((k) => `"${k}"`).join(', ');
  return keys.length > 20 ? `${shown}, ... (${keys.length - 20} more)` : shown;
}

const dtypeNames: readonly string[] = ['float32', 'float16', 'bfloat16', 'float64', 'int64', 'int32', 'int16', 'int8', 'uint8', 'bool'];
function isDType(s: string): s is DType { return dtypeNames.includes(s); }
