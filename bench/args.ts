// The benchmarks' command lines: node's parseArgs with what an operator expects of a command.
// --help (or -h) prints the usage and exits 0; a mistyped or malformed flag says which, then
// the usage, and exits 2: never a stack trace.
import { parseArgs, type ParseArgsConfig } from 'node:util';

/** Parses process.argv by `config` (strict, no positionals); `usage` is what --help prints. */
export function benchArgs<const T extends ParseArgsConfig>(name: string, usage: string, config: T): ReturnType<typeof parseArgs<T>>['values'] {
  const argv = process.argv.slice(2);
  if (argv.includes('--help') || argv.includes('-h')) {
    console.log(usage);
    process.exit(0);
  }
  try {
    return parseArgs(config).values;
  } catch (err) {
    process.stderr.write(`${name}: ${(err as Error).message}\n\n${usage}\n`);
    process.exit(2);
  }
}
