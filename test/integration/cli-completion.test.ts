// `gangway completion bash|zsh` as a shell uses it: the script the CLI prints is loaded into a
// real bash (and zsh where installed) and its function is called with the words typed so far.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa, execaSync } from 'execa';
import { builtAgent, mainJs } from '../helpers/cluster.js';

const gangway = (args: string[]) => execa(process.execPath, [mainJs, ...args], { reject: false, timeout: 60_000 });
const has = (binary: string) => execaSync('sh', ['-c', `command -v ${binary}`], { reject: false }).exitCode === 0;

describe.skipIf(!builtAgent)('gangway completion', () => {
  let dir: string;
  let script: string;
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'gangway-completion-'));
    // A file option offers files: this directory holds agent.yaml besides the script.
    writeFileSync(join(dir, 'agent.yaml'), '');
    script = join(dir, 'gangway.bash');
    const run = await gangway(['completion', 'bash']);
    expect(run.exitCode, run.stderr).toBe(0);
    writeFileSync(script, run.stdout);
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  /** What bash offers for the words (the last one is the word being completed). */
  async function bashComplete(words: string[]): Promise<string[]> {
    const run = await execa('bash', ['--norc', '--noprofile', '-c', 'source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); _gangway; printf "%s\\n" "${COMPREPLY[@]}"', 'bash', script, ...words], {
      cwd: dir,
    });
    return run.stdout.split('\n').filter(Boolean);
  }

  it.each([
    [['gangway', 'mig'], ['migrate-set', 'migrate']],
    [['gangway', 'guest', 's'], ['start', 'stop']],
    [['gangway', 'migrate', '--tech'], ['--technique']],
    [['gangway', 'migrate', '--technique', ''], ['precopy', 'postcopy', 'hybrid', 'auto']],
    [['gangway', 'migrate', 'vm1', '--to', '10.0.0.2:7401', '--strategy', 's'], ['serial']],
    [['gangway', 'vm', 'start', 'vm1', '--accel', ''], ['tcg', 'kvm', 'auto']],
    [['gangway', 'certs', 'issue', 'host-a', '--d'], ['--dir', '--days']],
    [['gangway', 'completion', '--j'], ['--json']],
    [['gangway', 'completion', ''], ['bash', 'zsh']],
    [['gangway', 'agent', '--config', 'ag'], ['agent.yaml']],
    // The guest names after migrate are the user's: nothing to offer, and no command either.
    [['gangway', 'migrate', 'st'], []],
  ])('bash: %j offers %j', async (words, offered) => {
    expect(await bashComplete(words)).toEqual(offered);
  });

  it('offers every command the CLI has (a command added later completes too)', async () => {
    const help = (await gangway(['--help'])).stdout;
    // The commands section of gangway --help: "  name [options] ..." lines, help excluded.
    const section = help.split('Commands:')[1]!.split('Examples:')[0]!;
    const listed = [...section.matchAll(/^ {2}([a-z][a-z-]*)/gm)].map((m) => m[1]!).filter((name) => name !== 'help');
    expect(listed.length).toBeGreaterThan(10);
    expect((await bashComplete(['gangway', ''])).sort()).toEqual(listed.sort());
  });

  it('refuses a shell it has no script for, naming the ones it has', async () => {
    const run = await gangway(['completion', 'fish']);
    expect(run.exitCode).toBe(1);
    expect(run.stderr).toMatch(/'fish' is invalid .*Allowed choices are bash, zsh/);
    expect(run.stdout).toBe('');
  });

  it.skipIf(!has('zsh'))('zsh: the script loads under compinit and offers the choices', async () => {
    const zshScript = join(dir, '_gangway');
    writeFileSync(zshScript, (await gangway(['completion', 'zsh'])).stdout);
    // compadd only works inside a completion widget: stand it in with a function that prints
    // what it was given, and call _gangway with the words zsh would have set.
    const driver = [
      'autoload -U compinit && compinit -u -D',
      `source ${zshScript}`,
      'compadd() { [[ $1 == -- ]] && shift; print -l -- "$@"; }',
      'words=(gangway migrate --technique ""); CURRENT=4; _gangway',
      'print -- ---',
      'words=(gangway gu); CURRENT=2; _gangway',
    ].join('\n');
    const run = await execa('zsh', ['-f', '-c', driver], { cwd: dir, reject: false });
    expect(run.stderr).toBe('');
    const [technique, commands] = run.stdout.split('---\n');
    expect(technique!.split('\n').filter(Boolean)).toEqual(['precopy', 'postcopy', 'hybrid', 'auto']);
    expect(commands!.split('\n').filter(Boolean)).toContain('guest');
  });
});
