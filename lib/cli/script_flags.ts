// What the training commands that mirror a diffusers script share when they parse its flags (train-dreambooth,
// train-sdxl): a shared flag's spec taken from `difflora train`'s table, the parsed flags as the library's
// options, the refused Hub/report flags, LOCAL_RANK, and every problem listed at once.
import { formatProblems, optionProblems, type Rule } from '../training/options.js';
import { optimOptionsFromFlags } from '../training/optim_options.js';
import { INT_RE, TRAIN_FLAGS, UsageError, checkTokens, flagParser, type FlagSpec, type FlagTable } from './train_args.js';

/** A flag of `difflora train` (train_text_to_image_lora.py) with the same meaning here; `more` overrides its default or help. */
export function sharedFlag(name: string, more: Partial<FlagSpec> = {}): FlagSpec {
  const spec = TRAIN_FLAGS[name];
  if (!spec) throw new Error(`internal: no train flag --${name}`);
  return { ...spec, ...more };
}

/** Several flags of `difflora train` as they are there, in the given order (for a table's runs of shared flags). */
export function sharedFlags(...names: string[]): Record<string, FlagSpec> {
  return Object.fromEntries(names.map((n) => [n, sharedFlag(n)]));
}

const camel = (flag: string): string => flag.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());

/** The Hub and reporting flags every script has and difflora refuses (no network, TensorBoard only). */
export function refusedHubAndReport(r: Readonly<Record<string, unknown>>): string[] {
  const problems: string[] = [];
  if (r.push_to_hub === true || r.hub_token !== undefined || r.hub_model_id !== undefined) {
    problems.push('cannot push to the Hugging Face Hub: difflora runs offline (no network); drop --push_to_hub/--hub_token/--hub_model_id and upload the files in --output_dir yourself');
  }
  if (r.report_to !== 'tensorboard') problems.push(`--report_to=${String(r.report_to)} is not supported: difflora reports to 'tensorboard' only (wandb and comet_ml need their services)`);
  return problems;
}

/** A parsed command line: the library's options, what to show before training, and the local rank. */
export interface ScriptArgs<O> { options: O; warnings: string[]; localRank: number }

/**
 * Parses `argv` against `table`: the flags that are options of `rules` become the options (camelCased); `check`
 * adds the command's own problems and warnings (refused flags, the script's checks). Throws a UsageError listing
 * every problem: unknown flags, bad values, out-of-domain values, the command's problems.
 */
export function parseScriptFlags<O>(
  argv: readonly string[], env: NodeJS.ProcessEnv, table: FlagTable, usage: string, rules: Readonly<Record<string, Rule>>,
  check: (r: Readonly<Record<string, unknown>>, options: Readonly<Record<string, unknown>>, warnings: string[]) => string[],
): ScriptArgs<O> {
  const tokenProblems = checkTokens(argv, table);
  const r = flagParser(argv, table, usage).parseSync() as Record<string, unknown>;
  const options: Record<string, unknown> = {};
  for (const flag of Object.keys(table.flags)) {
    const key = camel(flag);
    if (Object.hasOwn(rules, key) && r[flag] !== undefined) options[key] = r[flag];
  }
  if (Object.hasOwn(rules, 'optimizer')) Object.assign(options, optimOptionsFromFlags(r)); // --optimizer case-insensitive, --prodigy_* true/false
  const warnings: string[] = [];
  const own = check(r, options, warnings);
  if (r.use_8bit_adam === true) warnings.push('--use_8bit_adam: 8-bit Adam (bitsandbytes) is not available in difflora; falling back to AdamW (fp32 optimizer state, more memory)');
  // as the scripts: a LOCAL_RANK in the environment wins over --local_rank
  let localRank = r.local_rank as number;
  if (env.LOCAL_RANK !== undefined && env.LOCAL_RANK !== '') {
    if (!INT_RE.test(env.LOCAL_RANK.trim())) throw new UsageError(`LOCAL_RANK must be an integer, got '${env.LOCAL_RANK}'`);
    const envRank = Number(env.LOCAL_RANK);
    if (envRank !== -1 && envRank !== localRank) localRank = envRank;
  }
  if (localRank !== -1) warnings.push(`--local_rank=${localRank} (or LOCAL_RANK): distributed training is not supported; this process trains alone on its device`);
  // a flag whose value is not even a number is said once, by the token check
  const flagOfProblem = (p: string) => /^--\w+/.exec(p)?.[0];
  const named = new Set(tokenProblems.map(flagOfProblem));
  const problems = [...tokenProblems, ...own, ...optionProblems(rules, options, 'flag').filter((p) => !named.has(flagOfProblem(p)))];
  if (problems.length) throw new UsageError(formatProblems(problems, 'flags'));
  return { options: options as O, warnings, localRank };
}
