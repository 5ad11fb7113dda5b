// ModuleList and Sequential: children named by index ("0", "1", ...), as in PyTorch, so `to_out.0.weight`
// and `down_blocks.1.resnets.0.conv1.weight` are walks through real fields.
import { Module } from './module.js';

export class ModuleList<T extends Module = Module> extends Module {
  readonly items: T[];

  constructor(items: T[] = []) {
    super();
    this.items = [...items];
  }

  override namedChildren(): [string, Module][] {
    return this.items.map((m, i) => [String(i), m]);
  }

  get length(): number { return this.items.length; }

  at(index: number): T {
    const m = this.items[index < 0 ? index + this.items.length : index];
    if (!m) throw new RangeError(`ModuleList index ${index} out of range (length ${this.items.length})`);
    return m;
  }

  push(m: T): void { this.items.push(m); }

  [Symbol.iterator](): Iterator<T> { return this.items[Symbol.iterator](); }
}

/** Modules applied in order; each takes the previous one's output. */
export class Sequential extends ModuleList<Module & { forward(x: unknown): unknown }> {
  forward<T>(x: T): T {
    let y: unknown = x;
    for (const m of this.items) y = m.forward(y);
    return y as T;
  }
}
