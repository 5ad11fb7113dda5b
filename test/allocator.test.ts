// The caching CPU allocator's standalone stress test (native/test_allocator.cc: size classes, thread safety,
// cache cap, RSS flat over 65,000 × 1 MiB), built by CMakeLists.txt next to the addon and run here.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { repoRoot } from './cli_helpers.js';

describe('native/test_allocator.cc', () => {
  it('passes every check', () => {
    const exe = join(repoRoot, 'build', 'Release', 'test_allocator');
    expect(existsSync(exe), `${exe} is missing: run npm run build:native`).toBe(true);
    const r = spawnSync(exe, { encoding: 'utf8', timeout: 60_000 });
    expect(r.status, `${r.stdout}\n${r.stderr}`).toBe(0);
    expect(r.stdout.trim().split('\n').pop()).toBe('PASS');
  });
});
