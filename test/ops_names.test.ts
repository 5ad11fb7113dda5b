// Every operator name that lib/ passes to op()/opVoid() resolves in this libtorch, so a typo in a schema name
// fails here and not in a user's run (names are resolved lazily, on first call). Names that lib/ guards with
// hasOp() (present only in some libtorch versions) are exempt.
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { hasOp } from '../lib/ops.js';
import { repoRoot } from './cli_helpers.js';

function sources(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? sources(join(dir, e.name)) : e.name.endsWith('.ts') ? [join(dir, e.name)] : []);
}

function literals(text: string, fn: string): string[] {
  return [...text.matchAll(new RegExp(`\\b${fn}\\(\\s*'([^']+)'`, 'g'))].map((m) => m[1]!);
}

describe('operator names used by lib/', () => {
  const texts = sources(join(repoRoot, 'lib')).map((f) => readFileSync(f, 'utf8'));
  const guarded = new Set(texts.flatMap((t) => literals(t, 'hasOp')));
  const used = [...new Set(texts.flatMap((t) => [...literals(t, 'op'), ...literals(t, 'opVoid')]))].sort();

  it('finds the op table (the scan itself works)', () => {
    expect(used.length).toBeGreaterThan(100);
    expect(used).toContain('add_.Tensor');
  });

  it('every unguarded name resolves through the dispatcher', () => {
    const missing = used.filter((name) => !guarded.has(name) && !hasOp(name));
    expect(missing, `unknown operator names: ${missing.join(', ')}`).toEqual([]);
  });

  it('a wrong name does not resolve', () => {
    expect(hasOp('add_.NoSuchOverload')).toBe(false);
    expect(hasOp('aten::definitely_not_an_op')).toBe(false);
  });
});
