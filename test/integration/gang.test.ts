// Gang migration with content dedup between two real agents: guests built from one image
// move together (one dedup group) or one after another (each guest's group sees the ones
// already moved as resident content). Every guest must arrive bit-identical (digests) and
// find no stale page in its own check after it resumes at the destination.
import { afterEach, describe, expect, it } from 'vitest';
import { setTimeout as sleep } from 'node:timers/promises';
import { waitForGuestProgress } from '../../agent/cli/demo.js';
import type { GroupSummary } from '../../agent/migration/group-summary.js';
import { builtAgent, Cluster, uniqueName } from '../helpers/cluster.js';

const MiB = 1024 * 1024;
type Agent = Awaited<ReturnType<Cluster['agent']>>;

describe.skipIf(!builtAgent)('gang migration with dedup', () => {
  let cluster: Cluster;
  afterEach(async () => {
    await cluster?.cleanup();
  });

  async function startImageGuests(agent: Agent, count: number, extra: string[]): Promise<string[]> {
    const names = Array.from({ length: count }, () => uniqueName('g'));
    for (const [i, name] of names.entries()) {
      const run = await cluster.cli(agent, ['guest', 'start', name, '--memory', '64MiB', '--image-seed', '7', '--shared', '0.6', '--seed', String(i + 1), ...extra, '--json']);
      expect(run.exitCode, run.stderr).toBe(0);
    }
    return names;
  }

  async function migrate(agent: Agent, args: string[]): Promise<GroupSummary> {
    const run = await cluster.cli(agent, ['migrate', ...args, '--json']);
    expect(run.exitCode, run.stderr + run.stdout).toBe(0);
    return JSON.parse(run.stdout) as GroupSummary;
  }

  async function expectIntactAt(agent: Agent, names: string[]): Promise<void> {
    for (const name of names) {
      const check = await waitForGuestProgress(agent, name, 1, 60_000);
      expect(check.resumeStalePages, `${name}: ${JSON.stringify(check)}`).toBe(0);
      expect(check.stalePages, `${name}: ${JSON.stringify(check)}`).toBe(0);
    }
  }

  it('moves four guests of one image together while they dirty memory: each bit-identical, shared content sent once', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const names = await startImageGuests(a, 4, ['--dirty-rate', '4MiB/s']);
    await sleep(300);
    const summary = await migrate(a, [...names, '--to', b.listen, '--strategy', 'gang']);
    const context = JSON.stringify({ dedup: summary.dedupStats, wire: summary.wireBytes, failed: summary.failed });
    expect(summary.failed, context).toEqual([]);
    expect(summary.guests.map((g) => g.guest)).toEqual(names);
    for (const guest of summary.guests) {
      expect(guest.verified).toBe(true);
      expect(guest.dedup.enabled).toBe(true);
    }
    expect(summary.strategy).toBe('gang');
    expect(summary.dedup).toBe(true);
    // 60% of each guest's non-zero pages come from the shared image: three of the four
    // copies of it travel as refs.
    expect(summary.dedupStats.hits.crossGuest, context).toBeGreaterThan(0.3 * ((3 * 64 * MiB) / 4096) * 0.5);
    expect(summary.wireBytes, context).toBeLessThan(0.75 * summary.memoryBytes);
    // Gang times are maxima over the guests.
    expect(summary.totalMs).toBe(Math.max(...summary.guests.map((g) => g.totalMs)));
    expect(summary.downtimeMs).toBe(Math.max(...summary.guests.map((g) => g.downtimeMs)));
    await expectIntactAt(b, names);
  });

  it('moves a gang on channels (--codec raw): a channel per member, refs across members on the session, each bit-identical', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const names = await startImageGuests(a, 3, ['--dirty-rate', '8MiB/s']);
    await sleep(300);
    const summary = await migrate(a, [...names, '--to', b.listen, '--strategy', 'gang', '--codec', 'raw']);
    const context = JSON.stringify({ dedup: summary.dedupStats, channels: summary.guests.map((g) => g.channels), failed: summary.failed });
    expect(summary.failed, context).toEqual([]);
    for (const guest of summary.guests) {
      expect(guest.verified, context).toBe(true);
      expect(guest.repairedPages, context).toBe(0);
      // migration.channels (2) shared by three members: one each.
      expect(guest.channels, context).toMatchObject({ count: 1, tls: false });
      expect(guest.channels!.pages, context).toBeGreaterThan(0);
    }
    // The image's pages go once: the later members refer to them once written at b.
    expect(summary.dedupStats.hits.crossGuest, context).toBeGreaterThan(0.3 * ((2 * 64 * MiB) / 4096) * 0.5);
    await expectIntactAt(b, names);
  });

  it('moves guests one after another, each referring to the guests already moved (resident content)', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const names = await startImageGuests(a, 2, ['--dirty-rate', '2MiB/s']);
    const summary = await migrate(a, [...names, '--to', b.listen, '--strategy', 'serial']);
    expect(summary.failed).toEqual([]);
    const [first, second] = summary.guests;
    expect(first!.dedup.hits.resident).toBe(0);
    // The second guest finds the shared image in the first one, which runs at b by then.
    expect(second!.dedup.hits.resident, JSON.stringify(second!.dedup)).toBeGreaterThan(1000);
    expect(second!.wireBytes).toBeLessThan(first!.wireBytes);
    // Serial times are sums.
    expect(summary.totalMs).toBeCloseTo(first!.totalMs + second!.totalMs, 6);
    expect(summary.downtimeMs).toBeCloseTo(first!.downtimeMs + second!.downtimeMs, 6);
    await expectIntactAt(b, names);
  });

  it('asks again for resident pages that changed before they were copied, and still arrives intact', async () => {
    cluster = new Cluster();
    // The resident guest is started at b, not migrated there by a: b offers it to a only
    // under dedup.resident all (the default offers a peer the guests it migrated here).
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b', [], { GANGWAY_DEDUP_RESIDENT: 'all' })];
    // The resident guest at b rewrites all of its memory, evenly, about once a second: much
    // of what it offered has changed by the time the refs to it are applied. It starts last,
    // just before the migration, so that b hashes it before its first pass over the image
    // content is done (on a loaded host, starting the mover in between took longer than that).
    const [mover] = await startImageGuests(a, 1, ['--dirty-rate', '1MiB/s']);
    const [resident] = await startImageGuests(b, 1, ['--dirty-rate', '64MiB/s', '--hot', '1']);
    const summary = await migrate(a, [mover!, '--to', b.listen, '--bandwidth', '32MiB/s']);
    const guest = summary.guests[0]!;
    expect(guest.verified).toBe(true);
    expect(guest.dedup.hits.resident, JSON.stringify(guest.dedup)).toBeGreaterThan(0);
    expect(guest.dedup.wantedPages, JSON.stringify(guest.dedup)).toBeGreaterThan(0);
    await expectIntactAt(b, [mover!, resident!]);
  });

  it('sends every page with --no-dedup', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const names = await startImageGuests(a, 2, ['--dirty-rate', '1MiB/s']);
    const summary = await migrate(a, [...names, '--to', b.listen, '--no-dedup']);
    expect(summary.dedup).toBe(false);
    expect(summary.dedupStats.refPages + summary.dedupStats.unchangedPages).toBe(0);
    for (const guest of summary.guests) expect(guest.verified).toBe(true);
    await expectIntactAt(b, names);
  });
});
