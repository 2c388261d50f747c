// The CLI's commands as data, read from commander's definitions at run time: what the help
// examples, the shell completion and the man page are generated from, so none of them can
// fall behind a command or an option added later.
import type { Command, Option } from 'commander';

export interface OptionInfo {
  flags: string;
  /** --long, or the short flag when there is no long one. */
  name: string;
  description: string;
  /** The description with its choices, default and environment variable, as --help shows it. */
  help: string;
  /** Whether the option takes a value (`--to <host:port>`), as opposed to a switch. */
  takesValue: boolean;
  choices?: readonly string[];
  /** As the help shows it (see defaultText); absent when there is none worth showing. */
  defaultText?: string;
  env?: string;
}

export interface CommandInfo {
  /** Words after `gangway`: '' for gangway itself, 'guest start' for a subcommand. */
  path: string;
  usage: string;
  description: string;
  options: OptionInfo[];
  /** The values its first argument takes, where it lists them (`completion <shell>`). */
  argumentChoices?: readonly string[];
  /** Example lines (help.ts EXAMPLES); empty for a command that has none. */
  examples: readonly string[];
  subcommands: CommandInfo[];
}

/** The words after `gangway` that name a command: 'vm start'. */
export function commandPath(command: Command): string {
  const names: string[] = [];
  for (let c: Command | null = command; c?.parent; c = c.parent) names.unshift(c.name());
  return names.join(' ');
}

/** Every command of the tree, the root first, parents before their subcommands. */
export function* allCommands(command: Command): Generator<Command> {
  yield command;
  for (const sub of command.commands) yield* allCommands(sub);
}

/**
 * A default as the help shows it: its description when the option gives one (what a size,
 * a rate or a deferred setting reads like to a person), else the value itself, unquoted.
 * Switches show none (their default is being off), as commander does.
 */
export function defaultText(option: Option): string | undefined {
  if (option.defaultValueDescription !== undefined) return option.defaultValueDescription;
  const value: unknown = option.defaultValue;
  if (value === undefined || !(option.required || option.optional)) return undefined;
  if (value === '') return 'none';
  return typeof value === 'string' || typeof value === 'number' ? String(value) : JSON.stringify(value);
}

/**
 * The one default style: "(choices: a, b; default: x; env: Y)", unquoted, the default's
 * description when it has one, and shown also for an option whose default lives elsewhere (a
 * config setting the flag overrides): those set only the description,
 * `.default(undefined, '10s')`, so the flag stays unset unless given.
 */
export function optionHelpText(option: Option): string {
  const extra: string[] = [];
  if (option.argChoices) extra.push(`choices: ${option.argChoices.join(', ')}`);
  const shown = defaultText(option);
  if (shown !== undefined) extra.push(`default: ${shown}`);
  if (option.envVar !== undefined) extra.push(`env: ${option.envVar}`);
  return extra.length > 0 ? `${option.description} (${extra.join('; ')})`.trimStart() : option.description;
}

export function optionInfo(option: Option): OptionInfo {
  const shown = defaultText(option);
  return {
    flags: option.flags,
    name: option.long ?? option.short ?? option.flags,
    description: option.description,
    help: optionHelpText(option),
    takesValue: option.required || option.optional,
    ...(option.argChoices ? { choices: option.argChoices } : {}),
    ...(shown !== undefined ? { defaultText: shown } : {}),
    ...(option.envVar ? { env: option.envVar } : {}),
  };
}

/** The visible commands and options (commander's help and version options included). */
export function describeCommand(command: Command, examples: Readonly<Record<string, readonly string[]>>): CommandInfo {
  const help = command.createHelp();
  return {
    path: commandPath(command),
    usage: `${['gangway', commandPath(command)].filter(Boolean).join(' ')} ${command.usage()}`,
    description: command.description(),
    options: help.visibleOptions(command).map(optionInfo),
    ...(command.registeredArguments[0]?.argChoices ? { argumentChoices: command.registeredArguments[0].argChoices } : {}),
    examples: examples[commandPath(command)] ?? [],
    subcommands: help
      .visibleCommands(command)
      .filter((sub) => sub.name() !== 'help' || command.commands.includes(sub))
      .map((sub) => describeCommand(sub, examples)),
  };
}
