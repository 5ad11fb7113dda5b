// The layers of lib/ import only their neighbours (issue #13): the training loop talks to the torch layer, not to
// the addon; data and schedulers know nothing of the models; each scheduler stands on scheduling_utils.ts alone.
// Imports are read from the sources, so a new file that reaches past its layer fails here.
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { repoRoot } from './cli_helpers.js';

const lib = join(repoRoot, 'lib');

function sources(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? sources(join(dir, e.name)) : e.name.endsWith('.ts') ? [join(dir, e.name)] : []);
}

/** file (relative to lib/) → the lib/ files it imports (relative to lib/, .ts), static and dynamic imports alike. */
const graph = new Map(sources(lib).map((file) => {
  const text = readFileSync(file, 'utf8');
  const specs = [...text.matchAll(/(?:from\s+|import\s*\(\s*|import\s+)'(\.{1,2}\/[^']+)'/g)].map((m) => m[1]!);
  const targets = specs.map((s) => relative(lib, resolve(dirname(file), s)).replace(/\.js$/, '.ts'));
  return [relative(lib, file), targets] as const;
}));

function violations(from: (f: string) => boolean, to: (t: string) => boolean): string[] {
  return [...graph].flatMap(([f, ts]) => (from(f) ? ts.filter(to).map((t) => `${f} → ${t}`) : []));
}

describe('layering of lib/', () => {
  it('reads the import graph', () => {
    expect(graph.size).toBeGreaterThan(50);
    expect(graph.get('training/train.ts')?.length).toBeGreaterThan(5);
  });

  it('nothing in training/ imports the addon (native.ts)', () => {
    expect(violations((f) => f.startsWith('training/'), (t) => t === 'native.ts')).toEqual([]);
  });

  it('nothing in data/ or schedulers/ imports from models/', () => {
    expect(violations((f) => /^(data|schedulers)\//.test(f), (t) => t.startsWith('models/'))).toEqual([]);
  });

  it('no scheduler imports another scheduler\'s file', () => {
    const isScheduler = (p: string): boolean => /^schedulers\/scheduling_(?!utils)[a-z0-9_]+\.ts$/.test(p);
    expect(violations(isScheduler, isScheduler)).toEqual([]);
  });
});
