// The addon set-up builds (cmake-js) loads and computes, and a missing addon fails with an actionable message.
// The node-gyp build (binding.gyp) runs the same computation in CI's scripts/check-gyp.sh.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const smoke = `
  const torch = await import(${JSON.stringify(join(root, 'lib/torch.ts'))});
  const { native } = await import(${JSON.stringify(join(root, 'lib/native.ts'))});
  const a = torch.tensor([[1, 2], [3, 4]]);
  const x = torch.ones([2], { requiresGrad: true });
  const y = a.matmul(x).sum();
  y.backward();
  console.log(JSON.stringify({ y: y.item(), grad: Array.from(x.grad.toFloat64Array()), version: native.info().torchVersion }));`;

function runWith(addon: string) {
  return spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', smoke], {
    cwd: root, env: { ...process.env, DIFFLORA_ADDON: addon }, encoding: 'utf8',
  });
}

describe('builds', () => {
  for (const [name, path] of [['cmake-js', 'build/Release/difflora.node']] as const) {
    it(`the ${name} build loads and computes`, () => {
      expect(existsSync(join(root, path)), `${path} is missing: run npm run setup`).toBe(true);
      const r = runWith(join(root, path));
      expect(r.status, r.stderr).toBe(0);
      const out = JSON.parse(r.stdout.trim().split('\n').pop()!) as { y: number; grad: number[]; version: string };
      expect(out.y).toBe(10);
      expect(out.grad).toEqual([4, 6]);
      expect(out.version).toMatch(/^\d+\.\d+/);
    });
  }

  it('a missing addon fails with what to run', () => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', `await import(${JSON.stringify(join(root, 'lib/native.ts'))})`], {
      cwd: root, env: { ...process.env, DIFFLORA_ADDON: '/nonexistent/difflora.node' }, encoding: 'utf8',
    });
    expect(r.status).not.toBe(0);
    expect(r.stderr).toContain('could not load the native addon');
    expect(r.stderr).toContain('Possible solutions');
    expect(r.stderr).toContain('npm run build:native');
  });

  it('installing without a compiler stops with what to install, before touching the build', () => {
    const bin = mkdtempSync(join(tmpdir(), 'difflora-nocc-'));
    symlinkSync(process.execPath, join(bin, 'node'));
    const r = spawnSync(join(bin, 'node'), [join(root, 'scripts/install-addon.cjs')], {
      cwd: root, env: { PATH: bin, DIFFLORA_FORCE_BUILD: '1', HOME: tmpdir() }, encoding: 'utf8',
    });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/cannot build the native addon: cmake, c\+\+, make not found/);
    expect(r.stderr).toContain('apt-get install cmake g++ make libtorch-dev');
  });
});
