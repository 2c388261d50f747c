// `gangway install-unit` as an operator runs it, into a temporary root: the shipped unit with
// ExecStart on this installation, the documented config when missing, nothing written by a
// dry run, an operator's edits never overwritten without --force (the config never).
import { afterEach, describe, expect, it } from 'vitest';
import { mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa, execaSync } from 'execa';
import { execStartFor } from '../../agent/cli/install-unit.js';
import { builtAgent, mainJs } from '../helpers/cluster.js';

const gangway = (args: string[]) => execa(process.execPath, [mainJs, ...args], { reject: false, timeout: 60_000 });
const shipped = (name: string) => readFileSync(join(import.meta.dirname, '..', '..', 'agent', 'systemd', name), 'utf8');
const hasAnalyze = execaSync('sh', ['-c', 'command -v systemd-analyze'], { reject: false }).exitCode === 0;

describe.skipIf(!builtAgent)('gangway install-unit', () => {
  const roots: string[] = [];
  afterEach(() => {
    for (const root of roots.splice(0)) rmSync(root, { recursive: true, force: true });
  });
  const tempRoot = () => {
    const root = mkdtempSync(join(tmpdir(), 'gangway-install-'));
    roots.push(root);
    return root;
  };
  const execStart = () => `ExecStart=${realpathSync(process.execPath)} --single-threaded-gc --no-flush-bytecode --no-lazy ${realpathSync(mainJs)} agent --config /etc/gangway/agent.yaml`;
  const unitPath = (root: string) => join(root, 'etc/systemd/system/gangway-agent.service');
  const configPath = (root: string) => join(root, 'etc/gangway/agent.yaml');

  it('--dry-run prints the unit with ExecStart on this installation and writes nothing', async () => {
    const root = tempRoot();
    const run = await gangway(['install-unit', '--root', root, '--dry-run']);
    expect(run.exitCode, run.stderr).toBe(0);
    expect(run.stdout).toContain(`\n${execStart()}\n`);
    expect(run.stdout).toContain('KillMode=mixed');
    expect(run.stdout).toMatch(/gangway-agent\.service: would write\n/);
    expect(readdirSync(root)).toEqual([]);
  });

  it('writes the shipped unit with only its ExecStart changed, and the config, then leaves both alone', async () => {
    const root = tempRoot();
    const first = await gangway(['install-unit', '--root', root]);
    expect(first.exitCode, first.stderr).toBe(0);
    expect(first.stdout).toMatch(/gangway-agent\.service: written\n/);
    expect(first.stdout).toContain('next: set listen and tls in /etc/gangway/agent.yaml, then systemctl daemon-reload && systemctl enable --now gangway-agent');

    const written = readFileSync(unitPath(root), 'utf8');
    const settings = (text: string) => text.split('\n').filter((line) => line !== '' && !line.startsWith('#'));
    expect(settings(written)).toEqual(settings(shipped('gangway-agent.service')).map((line) => (line.startsWith('ExecStart=') ? execStart() : line)));
    expect(statSync(unitPath(root)).mode & 0o777).toBe(0o644);
    expect(readFileSync(configPath(root), 'utf8')).toBe(shipped('agent.yaml'));
    expect(statSync(configPath(root)).mode & 0o777).toBe(0o640);
    expect(statSync(join(root, 'etc/gangway')).mode & 0o777).toBe(0o750);
    if (hasAnalyze) {
      const verify = await execa('systemd-analyze', ['verify', unitPath(root)], { reject: false });
      expect(verify.exitCode, verify.stderr).toBe(0);
    }

    // The operator's config stays; the same unit again is left as it is.
    writeFileSync(configPath(root), 'listen: 10.0.0.1:7401\n');
    const again = await gangway(['install-unit', '--root', root, '--json']);
    expect(again.exitCode, again.stderr).toBe(0);
    expect(JSON.parse(again.stdout)).toMatchObject({ unit: { action: 'unchanged' }, config: { action: 'kept' }, execStart: execStart() });
    expect(readFileSync(configPath(root), 'utf8')).toBe('listen: 10.0.0.1:7401\n');
  });

  it('refuses to replace a unit that was edited, unless --force', async () => {
    const root = tempRoot();
    expect((await gangway(['install-unit', '--root', root])).exitCode).toBe(0);
    writeFileSync(unitPath(root), 'Environment=EDITED=1\n');
    const refused = await gangway(['install-unit', '--root', root]);
    expect(refused.exitCode).toBe(1);
    expect(refused.stderr).toContain(`${unitPath(root)} exists and differs from what install-unit writes; --force replaces it`);
    expect(readFileSync(unitPath(root), 'utf8')).toBe('Environment=EDITED=1\n');
    const forced = await gangway(['install-unit', '--root', root, '--force']);
    expect(forced.exitCode, forced.stderr).toBe(0);
    expect(readFileSync(unitPath(root), 'utf8')).toContain(`\n${execStart()}\n`);
  });

  it.each([
    ['/root/gangway/dist/agent/main.js', /gangway is at \/root\/gangway\/dist\/agent\/main\.js, under \/root, which the unit hides .*ProtectHome=yes/],
    ['/tmp/gangway/dist/agent/main.js', /under \/tmp, which the unit hides .*PrivateTmp=yes/],
    ['/opt/my gangway/dist/agent/main.js', /white space/],
  ])('refuses an installation the unit could not run: %s', (mainPath, message) => {
    expect(() => execStartFor('/usr/bin/node', mainPath)).toThrow(message);
  });
});
