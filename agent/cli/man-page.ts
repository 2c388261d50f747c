// `gangway man`: the gangway(1) man page in roff, rendered from the command tree the CLI runs
// with (descriptions, options, defaults, examples), so it cannot disagree with --help. Our own
// small renderer rather than help2man: the build then needs nothing beyond Node (help2man is
// one more Debian package, and it parses --help text where we have the definitions).
// `npm run build` writes dist/gangway.1; package.json's "man" has `npm install -g` install it.
import type { Command } from 'commander';
import { GANGWAY_VERSION } from '../version.js';
import { describeCommand, type CommandInfo } from './command-tree.js';
import { EXAMPLES } from './help.js';

/** Text for a roff body line: backslashes escaped, minus signs as \-, no control line. */
function roff(text: string): string {
  const escaped = text.replace(/\\/g, '\\e').replace(/-/g, '\\-');
  // A line that starts with . or ' would be read as a request.
  return /^[.']/.test(escaped) ? `\\&${escaped}` : escaped;
}

function examplesBlock(lines: readonly string[]): string[] {
  if (lines.length === 0) return [];
  return ['.PP', 'Examples:', '.RS', '.nf', ...lines.map(roff), '.fi', '.RE'];
}

function optionsBlock(info: CommandInfo): string[] {
  return info.options.flatMap((option) => ['.TP', `.B ${roff(option.flags)}`, roff(option.help)]);
}

function commandSections(info: CommandInfo): string[] {
  const own = info.path === '' ? [] : [`.SS "${roff(info.usage.trim())}"`, roff(info.description), ...optionsBlock(info), ...examplesBlock(info.examples)];
  return [...own, ...info.subcommands.flatMap(commandSections)];
}

export function manPage(program: Command): string {
  const root = describeCommand(program, EXAMPLES);
  const lines = [
    // No date: the page is the same for the same definitions (reproducible builds).
    `.TH GANGWAY 1 "" "gangway ${roff(GANGWAY_VERSION)}" "User Commands"`,
    // Ragged right: the long option lists (--config's settings) cannot be justified.
    '.ad l',
    '.SH NAME',
    `gangway \\- ${roff(root.description)}`,
    '.SH SYNOPSIS',
    '.B gangway',
    '\\fIcommand\\fR [\\fIoptions\\fR] [\\fIarguments\\fR]',
    '.SH DESCRIPTION',
    roff('One gangway agent runs on every host (gangway agent); the other commands are its command-line client, talking to the local agent through STATE_DIR/control.sock or a loopback control port. Each command takes --help, which shows what this page does for it.'),
    '.SH OPTIONS',
    ...optionsBlock(root),
    ...examplesBlock(root.examples),
    '.SH COMMANDS',
    ...commandSections(root),
    '.SH FILES',
    '.TP',
    '.B /etc/gangway/agent.yaml',
    roff('the agent\'s configuration (gangway agent --config); GANGWAY_* environment variables and flags override it'),
    '.TP',
    '.B /var/lib/gangway',
    roff('the state directory: guest records, control.sock, control.token'),
    '.SH SEE ALSO',
    '.BR systemctl (1),',
    '.BR qemu-system-x86_64 (1)',
  ];
  return `${lines.join('\n')}\n`;
}

export function addManCommand(program: Command): void {
  program
    .command('man')
    .description('print the gangway(1) man page (roff), generated from these commands; view it with `gangway man | man -l -`')
    .option('--json', 'print the commands, their options, defaults and examples as JSON instead')
    .action((opts: { json?: boolean }) => {
      process.stdout.write(opts.json ? `${JSON.stringify(describeCommand(program, EXAMPLES))}\n` : manPage(program));
    });
}
