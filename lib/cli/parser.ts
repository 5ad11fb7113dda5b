// The yargs set-up every difflora sub-command shares: flags keep their snake_case names as the Python scripts
// spell them (no camel-case copies, no dot paths, no --no-x negation), parsing never exits the process, unknown
// flags are errors, and help/version are printed by difflora itself.
import yargs, { type Argv } from 'yargs';

export function commandParser(argv: readonly string[], usage: string, o: { repeatable?: boolean } = {}): Argv {
  return yargs([...argv])
    .scriptName('difflora')
    .usage(usage)
    .parserConfiguration({
      'camel-case-expansion': false, 'dot-notation': false, 'boolean-negation': false,
      // repeatable flags (generate's --lora) arrive as arrays
      ...(o.repeatable ? { 'duplicate-arguments-array': true } : {}),
    })
    .exitProcess(false)
    .strict()
    .version(false)
    .help(false)
    .wrap(Math.min(120, process.stdout.columns ?? 100));
}
