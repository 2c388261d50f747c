// The agent's log as journald and an operator read it: levels by name, a syslog priority
// prefix only when stdout is the journal (JOURNAL_STREAM names its device and inode), and
// every line of a migration carries the guest's name (and, once it has one, the migration id).
import { mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { builtAgent, Cluster, uniqueName } from '../helpers/cluster.js';

/** The agent's log lines, as it wrote them. */
const linesOf = (path: string) => readFileSync(path, 'utf8').split('\n').filter((line) => line !== '');

describe.skipIf(!builtAgent)('agent logs', () => {
  let cluster: Cluster | undefined;
  afterEach(async () => {
    await cluster?.cleanup();
    cluster = undefined;
  });

  it('start with the syslog priority when stdout is the journal, so that journalctl -p warning finds the warnings', async () => {
    cluster = new Cluster();
    // The agent's stdout is this file (startLocalAgent appends to it): JOURNAL_STREAM names it
    // as systemd names the journal's socket.
    const stateDir = `${cluster.dir}/journal`;
    mkdirSync(stateDir, { mode: 0o755 });
    writeFileSync(`${stateDir}/agent.log`, '', { mode: 0o600 });
    const { dev, ino } = statSync(`${stateDir}/agent.log`, { bigint: true });
    const a = await cluster.agent('journal', [], { JOURNAL_STREAM: `${dev}:${ino}` });
    await a.stop();
    const lines = linesOf(a.logPath);
    // The state dir was created 0755: the agent tightens it and warns.
    const warning = lines.find((line) => line.includes('state dir was open to more than the agent'));
    expect(warning).toMatch(/^<4>\{"level":"warn",/);
    expect(lines.find((line) => line.includes('"msg":"agent listening"'))).toMatch(/^<6>\{"level":"info",/);
    for (const line of lines) {
      const match = /^<(\d)>(\{.*\})$/.exec(line);
      expect(match, line).not.toBeNull();
      const { level } = JSON.parse(match![2]!) as { level: string };
      expect({ level, priority: Number(match![1]) }).toEqual({ level, priority: { debug: 7, info: 6, warn: 4, error: 3, fatal: 2 }[level] });
    }
  });

  it('are plain JSON with level names when stdout is not the journal, even with JOURNAL_STREAM inherited', async () => {
    cluster = new Cluster();
    // A JOURNAL_STREAM that names another file (the parent's journal, say) is not this stdout.
    const other = statSync(cluster.dir, { bigint: true });
    const a = await cluster.agent('plain', [], { JOURNAL_STREAM: `${other.dev}:${other.ino}` });
    await a.stop();
    const lines = linesOf(a.logPath);
    expect(lines.length).toBeGreaterThan(2);
    for (const line of lines) expect(line, line).toMatch(/^\{"level":"(debug|info|warn|error|fatal)",/);
  });

  it('name the guests on every line of a migration, and the migration id on each once it has one', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a');
    const b = await cluster.agent('b');
    const name = uniqueName('vm');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '16MiB', '--dirty-rate', '1MiB/s'])).exitCode).toBe(0);
    const run = await cluster.cli(a, ['migrate', name, '--to', b.listen, '--json']);
    expect(run.exitCode, run.stderr).toBe(0);
    const { migrationId } = JSON.parse(run.stdout).guests[0];
    await a.stop();
    const entries = linesOf(a.logPath).map((line) => JSON.parse(line) as Record<string, unknown>);
    const started = entries.findIndex((e) => e.msg === 'migration started');
    const committed = entries.findIndex((e) => e.msg === 'migration committed');
    expect(started).toBeGreaterThanOrEqual(0);
    expect(committed).toBeGreaterThan(started);
    const named = (e: Record<string, unknown>) => e.guest === name || (Array.isArray(e.guests) && e.guests.includes(name));
    // From the dedup group's opening (before the migration has an id) to the commit.
    const group = entries.find((e) => e.msg === 'dedup group open');
    expect(group && named(group)).toBe(true);
    for (const entry of entries.slice(started, committed + 1)) {
      if (entry.msg === 'session established' || entry.msg === 'dedup group open') continue;
      expect(entry, JSON.stringify(entry)).toMatchObject({ migrationId, guest: name });
    }
  });
});
