// Asking for a device this libtorch cannot give is a clear error, not a dispatcher dump (issue #13).
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { native } from '../lib/native.js';
import * as torch from '../lib/torch.js';
import { Generator } from '../lib/random.js';
import { cudaDeviceCount, cudaIsAvailable, setAllowTF32 } from '../lib/device.js';

const info = native.info();

describe('devices', () => {
  it('naming a CUDA device this build or machine cannot give is a clear error, wherever a device is named', () => {
    // which error depends on the build (CI: Debian's CPU libtorch; the GPU machine: PyTorch's CUDA libtorch)
    const bad = !info.cudaCompiled ? 'cuda' : info.cudaDeviceCount === 0 ? 'cuda' : `cuda:${info.cudaDeviceCount}`;
    const why = !info.cudaCompiled ? /device 'cuda(:0)?': this libtorch \(.+\) has no CUDA — it is a CPU build/
      : info.cudaDeviceCount === 0 ? /no CUDA GPU is visible/ : /there (is 1 CUDA device|are \d+ CUDA devices)/;
    const a = torch.ones([2]);
    expect(() => a.to(bad)).toThrow(why);
    expect(() => a.to({ device: bad, dtype: 'float16' })).toThrow(why);
    expect(() => torch.zeros([2], { device: bad })).toThrow(why);
    expect(() => torch.randn([2], { device: bad })).toThrow(why);
    expect(() => new Generator(bad)).toThrow(why);
    if (!info.cudaCompiled) expect(() => a.cuda()).toThrow(why);
    a.dispose();
  });

  it('cpu and meta still work', () => {
    const a = torch.ones([2], { device: 'cpu' });
    const m = torch.zeros([3], { device: 'meta' });
    expect(m.shape).toEqual([3]);
    a.dispose();
    m.dispose();
  });

  it('the torch layer answers whether CUDA is there and sets TF32', () => {
    expect(cudaIsAvailable()).toBe(info.cudaAvailable);
    expect(cudaDeviceCount()).toBe(info.cudaDeviceCount);
    const before = setAllowTF32(true);
    expect(setAllowTF32(before)).toBe(true);
  });

  it('the training code asks the torch layer, never the native addon', () => {
    const dir = join(import.meta.dirname, '..', 'lib', 'training');
    const importers = readdirSync(dir).filter((f) => f.endsWith('.ts'))
      .filter((f) => /from '\.\.\/native\.js'|import\('\.\.\/native\.js'\)/.test(readFileSync(join(dir, f), 'utf8')));
    expect(importers).toEqual([]);
  });
});
