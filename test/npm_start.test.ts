// `npm start` from a checkout: builds what is missing, then trains the built-in default (issue #13's two commands).
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { repoRoot } from './cli_helpers.js';

describe('npm start', () => {
  it('trains the built-in default and writes the LoRA file', () => {
    const out = join(mkdtempSync(join(tmpdir(), 'difflora-start-')), 'lora');
    const r = spawnSync('npm', ['start', '--silent', '--', '--max_train_steps=3', `--output_dir=${out}`], { cwd: repoRoot, encoding: 'utf8', timeout: 110_000 });
    expect(r.status, r.stderr).toBe(0);
    expect(existsSync(join(out, 'pytorch_lora_weights.safetensors'))).toBe(true);
    expect(r.stderr).toMatch(/built-in default/i);
  });
});
