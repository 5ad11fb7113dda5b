// Tensor handles as ids (native/common.h TensorSlots, lib/ops.ts): a number is never mistaken for a tensor,
// a stale id frees nothing, results inside arrays are real tensors, and the GC backstop frees what nobody
// disposed.
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { native } from '../lib/native.js';
import { memory, tidy } from '../lib/scope.js';
import { op } from '../lib/ops.js';
import { Tensor } from '../lib/tensor.js';
import * as torch from '../lib/torch.js';
import * as F from '../lib/functional.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');

describe('tensor ids', () => {
  it('a number where the schema wants a tensor is an error, even when it equals a live tensor id', () => {
    const x = torch.ones([2, 2]);
    const y = torch.ones([2, 2]);
    expect(() => x.matmul(y._id as never)).toThrow(/argument 'other': expected a Tensor/);
    expect(() => torch.stack([x, y._id as never])).toThrow(/expected a Tensor/);
    expect(() => x.add(y).dispose()).not.toThrow();
    x.dispose();
    y.dispose();
  });

  it('a disposed tensor is named as disposed (receiver, operand, list element, native job)', () => {
    const x = torch.ones([2]);
    const y = torch.ones([2]);
    x.dispose();
    expect(x._id).toBe(-1);
    expect(() => y.mul(x)).toThrow(/disposed/);
    expect(() => torch.cat([y, x])).toThrow(/disposed/);
    expect(() => native.clipGradNorm([x], 1, 2)).toThrow(/disposed/);
    y.dispose();
  });

  it('a stale id frees nothing, also after its slot was reused', () => {
    const a = torch.ones([3]);
    const old = a._id;
    a.dispose();
    const b = torch.zeros([3]); // takes the freed slot (the free list is LIFO)
    expect(b._id % 2 ** 24).toBe(old % 2 ** 24);
    expect(b._id).not.toBe(old);
    expect(native.tensorRelease(old)).toBe(false);
    expect(b.isDisposed).toBe(false);
    expect(b.sum().item()).toBe(0);
    expect(native.tensorRelease(-1)).toBe(false);
    expect(native.tensorRelease(1.5)).toBe(false);
    b.dispose();
  });

  it('tensors returned inside arrays and as gradients are Tensors that own their slot', () => {
    const base = memory().numTensors;
    tidy(() => {
      const parts = torch.arange(6).chunk(3);
      expect(parts).toHaveLength(3);
      for (const p of parts) expect(p).toBeInstanceOf(Tensor);
      const [values, indices] = torch.tensor([3, 1, 2]).max(0, false);
      expect(values!.item()).toBe(3);
      expect(indices!.item()).toBe(0);
      const w = torch.ones([2]).requiresGrad_();
      w.mul(3).sum().backward();
      const g1 = w.grad!;
      const g2 = w.grad!;
      expect(g1._id).not.toBe(g2._id); // each read is a new handle sharing the gradient
      g1.dispose();
      expect(g2.tolist()).toEqual([3, 3]);
    });
    expect(memory().numTensors).toBe(base);
  });

  it('the unboxed fast paths (add, sub, mul, div, matmul, linear, ...) equal the generic path, errors included', () => {
    tidy(() => {
      const a = torch.tensor([[1, 2], [3, 4]]);
      const b = torch.tensor([[0.5, -1], [2, 0.25]]);
      const generic = (name: string, ...args: unknown[]): number[] => (op(name)(...args) as Tensor).tolist() as number[];
      expect(a.add(b, 2).tolist()).toEqual([[2, 0], [7, 4.5]]);
      expect(a.add(b, 0.5).tolist()).toEqual(generic('add.Tensor', a, b, 0.5));
      expect(a.sub(b).tolist()).toEqual([[0.5, 3], [1, 3.75]]);
      expect(a.mul(b).tolist()).toEqual([[0.5, -2], [6, 1]]);
      expect(a.div(b).tolist()).toEqual([[2, -2], [1.5, 16]]);
      expect(a.matmul(b).tolist()).toEqual([[4.5, -0.5], [9.5, -2]]);
      expect(F.linear(a, b).tolist()).toEqual(a.matmul(b.t()).tolist());
      expect(F.linear(a, b, torch.tensor([1, 2])).tolist()).toEqual(a.matmul(b.t()).add(torch.tensor([1, 2])).tolist());
      expect(a.reshape([-1]).tolist()).toEqual([1, 2, 3, 4]);
      expect(a.view(4, 1).shape).toEqual([4, 1]);
      expect(a.transpose(0, 1).tolist()).toEqual([[1, 3], [2, 4]]);
      expect(a.unsqueeze(0).shape).toEqual([1, 2, 2]);
      expect(a.silu().tolist()).toEqual(generic('silu', a));
      const c = a.clone();
      c.add_(b, 2).mul_(2).mul_(b);
      expect(c.tolist()).toEqual([[2, -0], [28, 2.25]]);
      // an error on the fast path is reported by the generic path, naming the op and the shapes
      expect(() => a.matmul(torch.ones([3, 3]))).toThrow(/matmul\(Tensor\[2, 2\] float32 cpu, Tensor\[3, 3\] float32 cpu\)/);
      expect(() => a.add(torch.ones([3]))).toThrow(/add\.Tensor\(Tensor\[2, 2\]/);
      expect(() => a.reshape([3])).toThrow(/reshape/);
      expect(() => a.transpose(0, 1.5)).toThrow(/must be an integer/);
    });
  });

  it('only difflora constructs tensors', () => {
    const Ctor = Tensor as unknown as new (id: number) => Tensor;
    expect(() => new Ctor(0)).toThrow(/created by torch functions/);
  });

  it('frees tensors nobody disposed once the GC collects their objects (the backstop)', () => {
    const script = `
      const torch = await import(${JSON.stringify(join(root, 'lib/torch.ts'))});
      const { memory } = await import(${JSON.stringify(join(root, 'lib/scope.ts'))});
      const base = memory().numTensors;
      for (let i = 0; i < 10000; i++) torch.ones([16]).add(1);
      const leaked = memory().numTensors - base;
      for (let i = 0; i < 20 && memory().numTensors > base; i++) {
        await new Promise((r) => setImmediate(r));
        globalThis.gc();
        await new Promise((r) => setTimeout(r, 10));
      }
      console.log(JSON.stringify({ leaked, left: memory().numTensors - base }));`;
    const r = spawnSync(process.execPath, ['--expose-gc', '--import', 'tsx', '--input-type=module', '-e', script], { cwd: root, encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    const { leaked, left } = JSON.parse(r.stdout.trim().split('\n').pop()!) as { leaked: number; left: number };
    expect(leaked).toBe(20000);
    expect(left).toBe(0);
  });
});
