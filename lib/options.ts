// Option objects checked by name, as the CLI checks flags: a misspelt or foreign option (`torch_dtype`,
// `learning_rate`, `torchDtype`) is an error naming it and the option meant, never silently ignored.

/** Other libraries' names for difflora options, for "did you mean" (transformers/diffusers spellings). */
const FOREIGN_NAMES: Readonly<Record<string, string>> = {
  torch_dtype: 'dtype',
  torchDtype: 'dtype',
  cache_dir: 'cacheDir',
};

const camel = (k: string): string => k.replace(/[_-]([a-z0-9])/g, (_, c: string) => c.toUpperCase());
const folded = (k: string): string => k.toLowerCase().replace(/[_-]/g, '');

/** The edit distance between two strings (insertions, deletions, substitutions). */
export function levenshtein(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++) {
      const sub = (prev[j - 1] ?? 0) + (a[i - 1] === b[j - 1] ? 0 : 1);
      cur.push(Math.min((prev[j] ?? 0) + 1, (cur[j - 1] ?? 0) + 1, sub));
    }
    prev = cur;
  }
  return prev[b.length] ?? 0;
}

/**
 * The known option `name` was probably meant as, if any: its camelCase, another library's spelling, a case/underscore
 * slip, or else the one nearest by edit distance when it is near (at most 2 edits, 1 for short names) and alone there.
 */
export function meantOption(name: string, known: readonly string[]): string | undefined {
  if (known.includes(camel(name))) return camel(name);
  const foreign = FOREIGN_NAMES[name];
  if (foreign !== undefined && known.includes(foreign)) return foreign;
  const slip = known.find((k) => folded(k) === folded(name));
  if (slip !== undefined) return slip;
  const limit = folded(name).length <= 5 ? 1 : 2;
  const near = known.filter((k) => levenshtein(folded(k), folded(name)) <= limit);
  return near.length === 1 ? near[0] : undefined;
}

/** One problem line per key of `opts` not in `known`, each with the option meant when one is near. */
export function unknownOptionNames(opts: object, known: readonly string[]): string[] {
  return Object.keys(opts).filter((k) => !known.includes(k)).map((k) => {
    const meant = meantOption(k, known);
    return `unknown option '${k}'${meant ? ` (did you mean '${meant}'?)` : ''}`;
  });
}

/** Throws one error listing every unknown option of `opts` (`where` names the call, e.g. 'UNet2DConditionModel.fromPretrained'). */
export function checkOptionNames(opts: object | undefined, known: readonly string[], where: string): void {
  if (opts === undefined) return;
  if (opts === null || typeof opts !== 'object' || Array.isArray(opts)) throw new TypeError(`${where}: the options must be an object`);
  const problems = unknownOptionNames(opts, known);
  if (problems.length) throw new Error(`${where}: ${problems.join('; ')} (known: ${known.join(', ')})`);
}
