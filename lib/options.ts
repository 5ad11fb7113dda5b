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

/** The known option `name` was probably meant as, if any: its camelCase, another library's spelling, or a case/underscore slip. */
export function meantOption(name: string, known: readonly string[]): string | undefined {
  if (known.includes(camel(name))) return camel(name);
  const foreign = FOREIGN_NAMES[name];
  if (foreign !== undefined && known.includes(foreign)) return foreign;
  return known.find((k) => folded(k) === folded(name));
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
