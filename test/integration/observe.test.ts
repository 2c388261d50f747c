// Following migrations as a user does, through the CLI with two real agents and a process
// guest: `gangway events` sees a migration's steps in order on both sides, `migrate` shows
// progress lines on a non-TTY stderr and, with --json-events, NDJSON events then its
// summary; `watch` follows a detached migration to its end (exit 0 completed, 130
// cancelled); `history` keeps ended migrations across an agent restart, a cancel reading
// as cancelled on both sides.
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { execa, type ResultPromise } from 'execa';
import type { AgentEvent } from '../../agent/daemon/events.js';
import type { HistoryEntry } from '../../agent/daemon/outcome.js';
import { builtAgent, Cluster, mainJs, uniqueName } from '../helpers/cluster.js';
import { waitFor } from '../helpers/wait.js';
import type { LocalAgent } from '../../agent/local-agent.js';

type History = { entries: HistoryEntry[]; unreadable: unknown };

describe.skipIf(!builtAgent)('following migrations: events, watch, history', () => {
  let cluster: Cluster | undefined;
  /** CLI processes a test left running (`events`, `watch`): killed by PID however it ends. */
  const running: ResultPromise[] = [];
  afterEach(async () => {
    for (const child of running.splice(0)) {
      child.kill('SIGKILL');
      await child.catch(() => {});
    }
    await cluster?.cleanup();
    cluster = undefined;
  });

  /** A CLI command left running, its stdout lines collected as they come. */
  function follow(agent: LocalAgent, args: string[]): { child: ResultPromise; lines: string[] } {
    const child = execa(process.execPath, [mainJs, ...args, '--state-dir', agent.stateDir], { reject: false, timeout: 120_000 });
    running.push(child);
    const lines: string[] = [];
    let partial = '';
    child.stdout!.on('data', (chunk: Buffer) => {
      partial += chunk.toString();
      const parts = partial.split('\n');
      partial = parts.pop()!;
      lines.push(...parts.filter((line) => line.trim()));
    });
    return { child, lines };
  }

  const eventsOf = (lines: string[]) => lines.map((line) => JSON.parse(line) as AgentEvent);

  async function history(agent: LocalAgent): Promise<History> {
    const run = await cluster!.cli(agent, ['history', '--json']);
    expect(run.exitCode, run.stderr).toBe(0);
    return JSON.parse(run.stdout) as History;
  }

  it('events show a migration in order on both sides; migrate prints progress lines on a non-TTY stderr, and --json-events its events then the summary', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const onA = follow(a, ['events', '--json']);
    const onB = follow(b, ['events', '--json']);
    await waitFor('both event streams to start', () => onA.lines.length > 0 && onB.lines.length > 0, 60_000);
    const name = uniqueName('vm');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '32MiB', '--dirty-rate', '2MiB/s', '--profile', 'random'])).exitCode).toBe(0);

    // execa's stderr is a pipe: not a TTY.
    const run = await cluster.cli(a, ['migrate', name, '--to', b.listen, '--bandwidth', '8MiB/s', '--codec', 'raw']);
    expect(run.exitCode, run.stderr).toBe(0);
    expect(run.stdout).toMatch(new RegExp(`^migrated ${name} to ${b.listen.replace(/\./g, '\\.')}`));
    const progress = run.stderr.split('\n').filter((line) => line.startsWith(`${name}: `));
    // About 4 s at 8 MiB/s: a line at each round's start and about one every 2 s, not one per report.
    expect(progress.length, run.stderr).toBeGreaterThanOrEqual(2);
    expect(progress.length, run.stderr).toBeLessThan(20);
    expect(progress[0]).toMatch(/^.*: round 0, [\d.]+% of 8192 pages; memory [\d.]+ \w+\/s, wire [\d.]+ \w+\/s, ETA after round 0; /);
    expect(run.stderr).not.toContain('\r');

    const ended = (lines: string[]) => eventsOf(lines).find((e) => e.type === 'migration-ended' && e.entry.guest === name);
    await waitFor('the end on both sides', () => ended(onA.lines) && ended(onB.lines), 30_000);
    const source = eventsOf(onA.lines);
    expect(source[0]).toMatchObject({ type: 'subscribed' });
    const steps = source.map((e) => (e.type === 'switchover' ? `switchover ${e.phase}` : e.type === 'round-ended' ? `round ${e.round}` : e.type));
    const started = steps.indexOf('migration-started');
    const rounds = steps.filter((s) => s.startsWith('round '));
    expect(steps.indexOf('guest-started')).toBeLessThan(started);
    expect(rounds[0]).toBe('round 0');
    expect(rounds).toEqual(rounds.map((_, i) => `round ${i}`));
    expect(steps.slice(steps.indexOf('round 0'))).toEqual([...rounds, 'switchover stopping', 'switchover verifying', 'switchover committing', 'migration-ended']);
    expect(started).toBeLessThan(steps.indexOf('round 0'));
    const outEnd = ended(onA.lines) as Extract<AgentEvent, { type: 'migration-ended' }>;
    expect(outEnd.entry).toMatchObject({ direction: 'out', guest: name, peer: b.listen, outcome: 'completed', technique: 'precopy' });
    const round1 = source.find((e) => e.type === 'round-ended' && e.round === 1);
    if (round1) expect(round1).toMatchObject({ converging: expect.any(Boolean), predictedDowntimeMs: expect.any(Number), dirtyRateBytesPerSec: expect.any(Number) });
    const dest = eventsOf(onB.lines).map((e) => (e.type === 'migration-ended' ? `ended ${e.entry.direction} ${e.entry.outcome}` : e.type === 'migration-started' ? `started ${e.direction}` : e.type));
    expect(dest).toEqual(['subscribed', 'started in', 'ended in completed']);

    // Back to a, with --json-events: NDJSON of this migration, the summary last.
    const back = await cluster.cli(b, ['migrate', name, '--to', a.listen, '--json-events']);
    expect(back.exitCode, back.stderr).toBe(0);
    const lines = back.stdout.trim().split('\n').map((line) => JSON.parse(line) as { type: string; summary?: { guests: { guest: string }[] } });
    expect(lines[0]!.type).toBe('migration-started');
    expect(lines.at(-2)).toMatchObject({ type: 'migration-ended', entry: { outcome: 'completed', guest: name } });
    expect(lines.at(-1)!.type).toBe('result');
    expect(lines.at(-1)!.summary!.guests[0]!.guest).toBe(name);
    expect(lines.filter((l) => l.type === 'round-ended').length).toBeGreaterThanOrEqual(1);
    // Events are the progress here: no progress lines on stderr.
    expect(back.stderr).not.toContain(`${name}: round`);
  }, 180_000);

  it('watch follows a detached migration to completion (exit 0, the summary), and an ended one prints its history entry', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const name = uniqueName('vm');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '64MiB', '--profile', 'random'])).exitCode).toBe(0);
    const detached = await cluster.cli(a, ['migrate', name, '--to', b.listen, '--bandwidth', '6MiB/s', '--codec', 'raw', '--detach', '--json']);
    expect(detached.exitCode, detached.stderr).toBe(0);
    const { migrationId } = JSON.parse(detached.stdout).migrations[0] as { migrationId: string };
    const watching = cluster.cli(a, ['watch', migrationId.slice(0, 8)]);
    // Meanwhile status shows the running migration's line: its round, both rates named.
    const status = await cluster.cli(a, ['status']);
    expect(status.stdout).toMatch(new RegExp(`    ${name}: (round \\d+|stopping|verifying|committing), [\\d.]+% of \\d+ pages; memory [\\d.]+ \\w+/s, wire [\\d.]+ \\w+/s, (ETA after round 0|dirty .*, (ETA [\\d.]+ m?s|not converging)); `));
    const watched = await watching;
    expect(watched.exitCode, watched.stderr).toBe(0);
    expect(watched.stdout).toMatch(new RegExp(`^migrated ${name} to `));
    expect(watched.stdout).toContain(`migration ${migrationId.slice(0, 8)} ${name} → ${b.listen}: completed (precopy, total `);
    // It followed a running migration: its rounds went by on stderr.
    expect(watched.stderr).toMatch(/round \d+ ended|: round \d+, /);

    const again = await cluster.cli(a, ['watch', migrationId, '--json']);
    expect(again.exitCode).toBe(0);
    expect(JSON.parse(again.stdout)).toMatchObject({ migrationId, outcome: 'completed', summary: { guest: name } });

    const unknown = await cluster.cli(a, ['watch', 'ffffffff']);
    expect(unknown.exitCode).toBe(1);
    expect(unknown.stderr).toContain('no migration has id ffffffff on this agent');
    const bad = await cluster.cli(a, ['watch', 'not-an-id']);
    expect(bad.exitCode).toBe(1);
    expect(bad.stderr).toContain('"not-an-id" is not a migration id');
  }, 180_000);

  it('an unreadable history file is kept aside and reported by history, in text and JSON, and logged', async () => {
    cluster = new Cluster();
    const stateDir = join(cluster.dir, 'a');
    mkdirSync(stateDir, { recursive: true, mode: 0o700 });
    writeFileSync(join(stateDir, 'history.json'), '{"version": 1, "entries": [{"migrationId": 7}]}', { mode: 0o600 });
    const a = await cluster.agent('a');
    const json = await history(a);
    expect(json.entries).toEqual([]);
    const unreadable = json.unreadable as { file: string; problem: string };
    expect(unreadable.problem).toMatch(/^entries\.0\.migrationId: /);
    expect(readFileSync(unreadable.file, 'utf8')).toBe('{"version": 1, "entries": [{"migrationId": 7}]}');
    const text = await cluster.cli(a, ['history']);
    expect(text.stdout).toContain(`UNREADABLE migration history (${unreadable.problem}): kept as ${unreadable.file}`);
    expect(readFileSync(a.logPath, 'utf8')).toMatch(/"level":"error".*the migration history cannot be read/);
  });

  it('a cancelled migration: watch exits 130, history says cancelled on both sides, and still does after both agents restart', async () => {
    cluster = new Cluster();
    let [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const name = uniqueName('vm');
    // Rewrites all of its memory at twice what the link may carry: rounds that never shrink.
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '12MiB', '--dirty-rate', '8MiB/s', '--hot', '1', '--profile', 'random'])).exitCode).toBe(0);
    const detached = await cluster.cli(a, ['migrate', name, '--to', b.listen, '--bandwidth', '4MiB/s', '--codec', 'raw', '--max-bytes-factor', '50', '--detach', '--json']);
    expect(detached.exitCode, detached.stderr).toBe(0);
    const { migrationId } = JSON.parse(detached.stdout).migrations[0] as { migrationId: string };
    const watching = follow(a, ['watch', migrationId]);
    // Once round 0 is over, status says what the policy sees: no ETA, "not converging".
    let running = '';
    for (let i = 0; i < 150 && !/not converging/.test(running); i++) {
      await sleep(100);
      running = (await cluster.cli(a, ['status'])).stdout;
    }
    expect(running).toMatch(new RegExp(`migration ${migrationId.slice(0, 8)} ${name} → \\S+: running\n    ${name}: round [1-9]\\d*, [\\d.]+% of \\d+ pages; memory [\\d.]+ \\w+/s, wire [\\d.]+ \\w+/s, dirty [\\d.]+ \\w+/s, expected downtime [\\d.]+ m?s, not converging; `));
    // Watch has shown a progress line (every 2 s) by now.
    await sleep(2500);
    const cancel = await cluster.cli(a, ['cancel', migrationId]);
    expect(cancel.exitCode, cancel.stderr).toBe(0);
    const watched = await watching.child;
    expect(watched.exitCode, String(watched.stderr)).toBe(130);
    expect(watched.stdout).toContain(`migration ${migrationId.slice(0, 8)} ${name} → ${b.listen}: cancelled by the operator`);
    // While it ran, its progress every 2 s (the running line of status) and its rounds' ends.
    expect(watched.stderr).toMatch(new RegExp(`${name}: round \\d+, [\\d.]+% of \\d+ pages; memory .*, wire .*; `));

    const sourceEntry = { migrationId, direction: 'out', guest: name, outcome: 'cancelled', cancelledBy: 'operator' };
    const destEntry = { migrationId, direction: 'in', guest: name, outcome: 'cancelled', cancelledBy: 'source' };
    expect((await history(a)).entries).toEqual([expect.objectContaining(sourceEntry)]);
    let there: History | undefined;
    for (let i = 0; i < 50 && !there?.entries.length; i++) {
      there = await history(b);
      if (!there.entries.length) await sleep(100);
    }
    expect(there!.entries).toEqual([expect.objectContaining(destEntry)]);
    expect((await history(a)).entries[0]!.error).toBeUndefined();
    const text = await cluster.cli(b, ['history']);
    expect(text.stdout).toContain(`migration ${migrationId.slice(0, 8)} ${name} ← `);
    expect(text.stdout).toContain(': cancelled at the source');
    const status = await cluster.cli(a, ['status']);
    expect(status.stdout).toContain(`migration ${migrationId.slice(0, 8)} ${name} → ${b.listen}: cancelled by the operator`);

    await a.stop();
    await b.stop();
    [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    expect((await history(a)).entries).toEqual([expect.objectContaining(sourceEntry)]);
    expect((await history(b)).entries).toEqual([expect.objectContaining(destEntry)]);
    const afterRestart = await cluster.cli(a, ['watch', migrationId.slice(0, 8)]);
    expect(afterRestart.exitCode).toBe(130);
    expect(afterRestart.stdout).toContain('cancelled by the operator');
    expect((await a.status()).guests.find((g) => g.name === name)?.state).toBe('running');
  }, 240_000);
});
