// Guest records an agent finds at start: a real record (as the agent writes it) validates and
// brings its guest back; one that does not is kept untouched, listed by `gangway status`,
// logged at error level, and its name is refused: guest start, and a migration in.
import { mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { parseGuestRecord } from '../../agent/guest/record.js';
import { builtAgent, Cluster, uniqueName } from '../helpers/cluster.js';

const CORRUPT = '{\n  "name": "vmX",\n  "kind": "process",\n  "pid": 12';

describe.skipIf(!builtAgent)('guest records at agent start', () => {
  let cluster: Cluster | undefined;
  afterEach(async () => {
    await cluster?.cleanup();
    cluster = undefined;
  });

  it('a corrupt record is kept untouched, listed in status, logged, and its name refused', async () => {
    cluster = new Cluster();
    const guestsDir = join(cluster.dir, 'a', 'guests');
    mkdirSync(guestsDir, { recursive: true, mode: 0o700 });
    const file = join(guestsDir, 'vmX.json');
    writeFileSync(file, CORRUPT, { mode: 0o600 });
    const mtimeMs = statSync(file).mtimeMs;

    const a = await cluster.agent('a');
    const run = await cluster.cli(a, ['status', '--json']);
    expect(run.exitCode).toBe(0);
    const status = JSON.parse(run.stdout) as { unreadableRecords: { file: string; name: string; problem: string }[]; guests: unknown[] };
    expect(status.unreadableRecords).toHaveLength(1);
    const [entry] = status.unreadableRecords;
    expect(entry!.name).toBe('vmX');
    expect(entry!.file).toBe(file);
    expect(entry!.problem).toMatch(/^not valid JSON: /);
    expect(status.guests).toEqual([]);

    const start = await cluster.cli(a, ['guest', 'start', 'vmX', '--memory', '8MiB', '--json']);
    expect(start.exitCode).not.toBe(0);
    const error = JSON.parse(start.stdout).error as { code: string; message: string };
    expect(error.code).toBe('GANGWAY_ERR_GUEST_EXISTS');
    expect(error.message).toContain(file);
    expect(error.message).toContain(entry!.problem);
    expect(error.message).toMatch(/remove it or fix it, and restart the agent/);
    const stop = await cluster.cli(a, ['guest', 'stop', 'vmX', '--json']);
    expect(stop.exitCode).not.toBe(0);
    expect(JSON.parse(stop.stdout).error.message).toContain(file);

    // A migration in under that name is refused too, and the guest stays at its source.
    const b = await cluster.agent('b');
    expect((await cluster.cli(b, ['guest', 'start', 'vmX', '--memory', '8MiB'])).exitCode).toBe(0);
    const migrate = await cluster.cli(b, ['migrate', 'vmX', '--to', a.listen, '--json']);
    expect(migrate.exitCode).not.toBe(0);
    // The peer hears that the name cannot be taken, not this host's paths or problems.
    expect(migrate.stdout + migrate.stderr).toContain("guest vmX cannot be received here: this host's record of that name needs its operator");
    expect(migrate.stdout + migrate.stderr).not.toContain('vmX.json');
    expect((await b.status()).guests.find((g) => g.name === 'vmX')?.state).toBe('running');

    // Logged at error level when the agent started.
    const logged = readFileSync(a.logPath, 'utf8')
      .split('\n')
      .filter((line) => line.startsWith('{'))
      .map((line) => JSON.parse(line) as { level: string; file?: string; problem?: string })
      .find((line) => line.file === file);
    expect(logged?.level).toBe('error');
    expect(logged?.problem).toBe(entry!.problem);

    // Still there, byte for byte, after all of that.
    expect(readFileSync(file, 'utf8')).toBe(CORRUPT);
    expect(statSync(file).mtimeMs).toBe(mtimeMs);
    expect((await a.status()).unreadableRecords).toHaveLength(1);
  });

  it('a record as the agent writes it validates, and a restarted agent finds its guest beside an unreadable one', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a');
    const name = uniqueName('vm');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '8MiB', '--tap', 'gwtap0'])).exitCode).toBe(0);
    const recordFile = join(a.stateDir, 'guests', `${name}.json`);
    const written = readFileSync(recordFile, 'utf8');
    const parsed = parseGuestRecord(written, `${name}.json`);
    expect(parsed).toEqual({ record: JSON.parse(written) });
    const pid = (await a.status()).guests.find((g) => g.name === name)!.pid;

    await a.kill();
    const wrong = written.replace('"kind": "process"', '"kind": "firecracker"').replaceAll(name, 'vmX');
    writeFileSync(join(a.stateDir, 'guests', 'vmX.json'), wrong, { mode: 0o600 });
    const again = await cluster.agent('a');
    const status = await again.status();
    expect(status.guests.find((g) => g.name === name)?.pid).toBe(pid);
    expect(status.unreadableRecords.map((r) => [r.name, r.problem])).toEqual([['vmX', `'kind' must be one of: process, qemu (got "firecracker")`]]);
    expect(readFileSync(recordFile, 'utf8')).toBe(written);
    expect(readFileSync(join(a.stateDir, 'guests', 'vmX.json'), 'utf8')).toBe(wrong);
  });
});
