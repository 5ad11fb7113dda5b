// Explicit lifetimes: tidy/keep/dispose semantics, and memory that stays flat in long loops.
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { dispose, keep, memory, tidy } from '../lib/scope.js';
import * as torch from '../lib/torch.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');

describe('tidy', () => {
  it('disposes what fn created except its result, which moves to the enclosing scope', () => {
    const base = memory().numTensors;
    let inner: ReturnType<typeof torch.ones> | undefined;
    const outer = tidy(() => {
      const r = tidy(() => {
        const a = torch.ones([4]);
        inner = a.add(1);
        return { value: a.mul(2), list: [inner] };
      });
      expect(r.value.isDisposed).toBe(false);
      expect(memory().numTensors).toBe(base + 2);
      return r.value;
    });
    expect(inner!.isDisposed).toBe(true); // not returned by the outer scope
    expect(outer.isDisposed).toBe(false);
    expect(memory().numTensors).toBe(base + 1);
    outer.dispose();
    expect(memory().numTensors).toBe(base);
  });

  it('keeps kept tensors, leaves tensors from outside alone, and cleans up when fn throws', () => {
    const base = memory().numTensors;
    const outside = torch.zeros([2]);
    const kept = tidy(() => keep(torch.ones([2])));
    tidy(() => outside); // returning an outside tensor must not hand it to any scope
    tidy(() => { tidy(() => outside); });
    expect(outside.isDisposed).toBe(false);
    expect(() => tidy(() => { torch.ones([3]); throw new Error('boom'); })).toThrow('boom');
    expect(memory().numTensors).toBe(base + 2);
    dispose([outside, kept]);
    expect(memory().numTensors).toBe(base);
  });

  it('refuses async functions', async () => {
    const base = memory().numTensors;
    expect(() => tidy(() => Promise.resolve(torch.ones([1])))).toThrow(/synchronous/);
    expect(memory().numTensors).toBe(base);
  });

  it('dispose is idempotent and using a disposed tensor is a clear error', () => {
    const t = torch.ones([2]);
    t.dispose();
    t.dispose();
    expect(t.isDisposed).toBe(true);
    expect(() => t.add(1)).toThrow(/disposed/);
    expect(() => t.shape).toThrow(/disposed/);
    {
      using u = torch.ones([2]);
      expect(u.sum().item()).toBe(2);
    }
  });

  it('reports bytes in use and returns to the same count after a loop', () => {
    const before = memory();
    for (let i = 0; i < 1000; i++) tidy(() => { torch.randn([256, 256]).matmul(torch.randn([256, 256])).sum(); });
    const after = memory();
    expect(after.numTensors).toBe(before.numTensors);
    expect(after.cpu.allocatedBytes).toBe(before.cpu.allocatedBytes);
    expect(after.cpu.cacheHits).toBeGreaterThan(before.cpu.cacheHits + 1000);
  });
});

describe('allocator', () => {
  it('keeps RSS flat for 5,000 x (1 MiB tensor with a JS handle; dispose) even when glibc would fragment', () => {
    // With MALLOC_MMAP_THRESHOLD_=4 MiB glibc keeps 1 MiB blocks on its heap, where Node's small objects
    // pin the holes: the default allocator reaches GBs within 4,000 iterations (PLATFORM.md).
    const script = `
      const { tidy } = await import(${JSON.stringify(join(root, 'lib/scope.ts'))});
      const torch = await import(${JSON.stringify(join(root, 'lib/torch.ts'))});
      for (let i = 0; i < 500; i++) torch.ones([262144]).dispose();
      const start = process.memoryUsage().rss;
      for (let i = 0; i < 5000; i++) { const t = torch.ones([262144]); t.add(1).dispose(); t.dispose(); }
      console.log(JSON.stringify({ growth: process.memoryUsage().rss - start }));`;
    const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
      cwd: root, env: { ...process.env, MALLOC_MMAP_THRESHOLD_: '4194304' }, encoding: 'utf8',
    });
    expect(r.status, r.stderr).toBe(0);
    const { growth } = JSON.parse(r.stdout.trim().split('\n').pop()!) as { growth: number };
    expect(growth).toBeLessThan(64 * 1024 * 1024);
  });
});
