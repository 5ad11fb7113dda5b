// The examples run as a user would run them, and do what they say.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { readSafetensorsHeader } from '../lib/io/safetensors.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');

describe('examples', () => {
  it('lora_basics.ts trains one step and writes a diffusers and a Kohya LoRA', () => {
    const out = mkdtempSync(join(tmpdir(), 'difflora-ex-'));
    const r = spawnSync(process.execPath, ['--import', 'tsx', 'examples/lora_basics.ts', join(root, 'test/fixtures/tiny-sd'), out], { cwd: root, encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/loss \d+\.\d{4}/);
    const header = readSafetensorsHeader(join(out, 'pytorch_lora_weights.safetensors'));
    expect(header.metadata).toEqual({ format: 'pt' });
    expect(header.tensors.length).toBe(96);
    expect(existsSync(join(out, 'lora_kohya.safetensors'))).toBe(true);
    rmSync(out, { recursive: true, force: true });
  });
});
