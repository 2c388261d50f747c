// Help that teaches, as a user meets it: every command's --help ends in examples that name
// real commands and options, defaults read in one style and in human units, and the man page
// holds every command and renders without warnings. The tree comes from `gangway man --json`,
// what the CLI itself runs with, so a command added later without examples fails here.
import { describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { execa, execaSync } from 'execa';
import type { CommandInfo } from '../../agent/cli/command-tree.js';
import { EXAMPLES } from '../../agent/cli/help.js';
import { builtAgent, mainJs } from '../helpers/cluster.js';

const gangway = (args: string[], input?: string) => execa(process.execPath, [mainJs, ...args], { reject: false, timeout: 60_000, stripFinalNewline: false, ...(input !== undefined ? { input } : {}) });

function flatten(info: CommandInfo): CommandInfo[] {
  return [info, ...info.subcommands.flatMap(flatten)];
}

const has = (binary: string) => execaSync('sh', ['-c', `command -v ${binary}`], { reject: false }).exitCode === 0;

describe.skipIf(!builtAgent)('gangway help', async () => {
  const tree = builtAgent ? (JSON.parse((await gangway(['man', '--json'])).stdout) as CommandInfo) : undefined;
  const commands = tree ? flatten(tree) : [];
  const byPath = new Map(commands.map((c) => [c.path, c]));

  it('knows the commands a user types', () => {
    for (const path of ['', 'agent', 'guest start', 'vm start', 'migrate', 'status', 'certs issue', 'completion', 'man']) expect(byPath.has(path), path).toBe(true);
  });

  it('has examples for every command, and none for a command that does not exist', () => {
    expect(commands.filter((c) => c.examples.length === 0).map((c) => c.path || 'gangway')).toEqual([]);
    expect(Object.keys(EXAMPLES).filter((path) => !byPath.has(path))).toEqual([]);
  });

  it('names only real commands and their own options in its examples', () => {
    const problems: string[] = [];
    for (const [path, lines] of Object.entries(EXAMPLES)) {
      for (const line of lines.filter((l) => l.startsWith('gangway '))) {
        const words = line.replace(/#.*$/, '').replace(/"[^"]*"/g, 'X').trim().split(/\s+/).slice(1);
        // The longest run of leading words that names a command: `gangway guest start vm1` is 'guest start'.
        let command = byPath.get('')!;
        for (const word of words) {
          const sub = command.subcommands.find((s) => s.path.split(' ').at(-1) === word);
          if (!sub) break;
          command = sub;
        }
        const unknown = words.filter((w) => w.startsWith('--') && !command.options.some((o) => o.name === w));
        if (unknown.length > 0) problems.push(`${path || 'gangway'}: "${line}" uses ${unknown.join(', ')}, not options of gangway ${command.path}`);
      }
    }
    expect(problems).toEqual([]);
  });

  it('shows every default one way, "(default: x)", in the units a person types', () => {
    const problems: string[] = [];
    for (const command of commands) {
      for (const option of command.options) {
        const where = `gangway ${command.path} ${option.name}`.replace(/ +/g, ' ');
        // The old style: "[10s]" in the description instead of commander's "(default: 10s)".
        if (/\[[^\]]*\]/.test(option.description)) problems.push(`${where}: a default in brackets in "${option.description}"; give it with .default(value, text)`);
        const shown = option.defaultText;
        if (shown === undefined) continue;
        // 536870912 for 512MiB: a number that large is bytes or a rate unless the flag names its unit.
        if (/^\d{4,}$/.test(shown) && !/(-ms|days)$/.test(option.name)) problems.push(`${where}: default ${shown} shown as a raw number; describe it (512MiB, 40MiB/s)`);
        if (/^["[{]/.test(shown)) problems.push(`${where}: default ${shown} shown as JSON`);
      }
    }
    expect(problems).toEqual([]);
  });

  it('prints the examples and the human defaults in --help, exit 0', async () => {
    // commander wraps descriptions at 80 columns: compare words, not lines.
    const words = (text: string) => text.replace(/\s+/g, ' ');
    const migrate = await gangway(['migrate', '--help']);
    expect(migrate.exitCode).toBe(0);
    expect(migrate.stdout).toMatch(/\nExamples:\n {2}gangway migrate vm1 --to 10\.0\.0\.2:7401\n/);
    expect(words(migrate.stdout)).toMatch(/--technique <technique> precopy: rounds, .* else precopy \(choices: precopy, postcopy, hybrid, auto; default: precopy\)/);
    const start = await gangway(['guest', 'start', '--help']);
    expect(words(start.stdout)).toMatch(/--memory <sizes> guest memory, .* as 256MiB,256MiB \(default: 512MiB\)/);
    expect(start.stdout).not.toMatch(/536870912/);
    const agent = await gangway(['agent', '--help']);
    expect(words(agent.stdout)).toMatch(/--shutdown-grace <duration> on SIGTERM, how long running migrations may finish \(default: 10s\)/);
    // A shown default of the agent's is the config's: the flag itself stays unset.
    const check = await gangway(['agent', '--check-config', '--insecure-plaintext-loopback', '--state-dir', '/tmp/gangway-help-check']);
    expect(check.exitCode, check.stderr).toBe(0);
    expect(JSON.parse(check.stdout)).toMatchObject({ shutdownGraceMs: 10_000, listenHost: '127.0.0.1', listenPort: 7401 });
  });

  it('writes a man page with every command that groff renders without a warning', async () => {
    const page = (await gangway(['man'])).stdout;
    expect(page).toMatch(/^\.TH GANGWAY 1 /);
    const missing = commands.filter((c) => c.path !== '' && !page.includes(`.SS "gangway ${c.path.replace(/-/g, '\\-')} `)).map((c) => c.path);
    expect(missing).toEqual([]);
    // The build's copy (npm run build:ts runs npm run man) is this page, not an older one.
    expect(readFileSync(join(dirname(mainJs), '..', 'gangway.1'), 'utf8')).toBe(page);
    if (!has('groff')) return console.warn('groff not installed: the man page was not rendered');
    const render = await execa('groff', ['-man', '-Tutf8', '-ww'], { input: page, reject: false });
    expect(render.exitCode).toBe(0);
    expect(render.stderr).toBe('');
    const text = render.stdout.replace(/.\x08/g, '');
    expect(text).toMatch(/gangway migrate \[options\] <guests\.\.\.>/);
    expect(text).toMatch(/--technique <technique>/);
  });
});
