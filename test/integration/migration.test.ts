// Live pre-copy migration between two real agent processes with a real guest that keeps
// dirtying its memory: the guest must arrive bit-identical (digests, and its own check of
// every page) and carry on; failures must leave the source guest running and nothing behind.
import { afterEach, describe, expect, it } from 'vitest';
import { setTimeout as sleep } from 'node:timers/promises';
import { existsSync } from 'node:fs';
import { waitForGuestProgress } from '../../agent/cli/demo.js';
import { builtAgent, Cluster, shmFilesOf, uniqueName } from '../helpers/cluster.js';

const MiB = 1024 * 1024;

describe.skipIf(!builtAgent)('live migration between two agents', () => {
  let cluster: Cluster;
  afterEach(async () => {
    await cluster?.cleanup();
  });

  async function guestOn(agent: Awaited<ReturnType<Cluster['agent']>>, name: string) {
    return (await agent.status()).guests.find((g) => g.name === name);
  }

  it('moves a guest dirtying 20 MiB/s: digests match, the guest carries on with zero stale pages', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const name = uniqueName('vm');
    const start = await cluster.cli(a, ['guest', 'start', name, '--memory', '128MiB', '--dirty-rate', '20MiB/s', '--hot', '0.25', '--json']);
    expect(start.exitCode, start.stderr).toBe(0);
    await sleep(500);
    const before = await guestOn(a, name);
    expect(before?.tracker.kind).toBe('uffd-wp');

    const run = await cluster.cli(a, ['migrate', name, '--to', b.listen, '--json']);
    expect(run.exitCode, run.stderr).toBe(0);
    const summary = JSON.parse(run.stdout).guests[0];
    // On a failure, the whole summary says what happened (rounds, decisions, downtime parts).
    const context = JSON.stringify({ rounds: summary.rounds, downtime: summary.downtime, downtimeMs: summary.downtimeMs });
    expect(summary.verified, context).toBe(true);
    expect(summary.digests).toHaveLength(1);
    expect(summary.digests[0]).toMatch(/^[0-9a-f]{32}$/);
    expect(summary.rounds.length, context).toBeGreaterThanOrEqual(2);
    expect(summary.rounds[0].pages).toBe((128 * MiB) / 4096);
    expect(summary.downtimeMs, context).toBeGreaterThan(0);
    expect(summary.downtimeMs, context).toBeLessThan(2_000);
    // The budget (the default 300 ms) and whether it held, as measured.
    expect(summary.downtimeBudgetMs).toBe(300);
    expect(summary.downtimeBudgetMet).toBe(summary.downtimeMs <= 300);
    expect(summary.tracker).toBe('uffd-wp');

    // The source gave the guest up: no process, no registry entry, no memory file.
    expect(await guestOn(a, name)).toBeUndefined();
    expect(shmFilesOf(name)).toHaveLength(1);
    const moved = await guestOn(b, name);
    expect(moved).toBeDefined();
    expect(existsSync(moved!.memoryPath)).toBe(true);

    // The guest's own verdict: every page checked on resume, then more passes, nothing stale.
    const check = await waitForGuestProgress(b, name, 2, 60_000);
    expect(check.resumeStalePages, JSON.stringify(check)).toBe(0);
    expect(check.stalePages, JSON.stringify(check)).toBe(0);
    expect(check.passesAfterResume).toBeGreaterThanOrEqual(2);
    const after = await guestOn(b, name);
    expect(after!.passes!).toBeGreaterThan(before!.passes!);
    expect(after!.metaErrors).toBe(0);
  });

  it('sends raw pre-copy rounds (--no-dedup) on channels beside the session, fixed or adaptive codec: verified, the guest carries on; none where the source turns them off', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b', [], { GANGWAY_MIGRATION_CHANNELS: '0' })];
    const name = uniqueName('vm');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '64MiB', '--dirty-rate', '16MiB/s', '--hot', '0.5'])).exitCode).toBe(0);
    await sleep(300);
    const run = await cluster.cli(a, ['migrate', name, '--to', b.listen, '--codec', 'raw', '--no-dedup', '--json']);
    expect(run.exitCode, run.stderr).toBe(0);
    const summary = JSON.parse(run.stdout).guests[0];
    expect(summary.verified).toBe(true);
    // Round 0 at least went on the channels (the final round goes on the session).
    expect(summary.channels, JSON.stringify(summary.rounds)).toMatchObject({ count: 2, tls: false });
    // Every page of round 0 on a channel, but memory never written (holes of its file: known zeros, not read).
    expect(summary.channels.pages + (summary.rounds[0].holePages ?? 0)).toBeGreaterThanOrEqual((64 * MiB) / 4096);
    expect(summary.channels.wireBytes).toBeGreaterThan(0);
    const check = await waitForGuestProgress(b, name, 2, 60_000);
    expect(check.resumeStalePages, JSON.stringify(check)).toBe(0);
    expect(check.stalePages, JSON.stringify(check)).toBe(0);
    // Back, from an agent with migration.channels 0: the session carries everything.
    const back = await cluster.cli(b, ['migrate', name, '--to', a.listen, '--codec', 'raw', '--no-dedup', '--json']);
    expect(back.exitCode, back.stderr).toBe(0);
    const backSummary = JSON.parse(back.stdout).guests[0];
    expect(backSummary.verified).toBe(true);
    expect(backSummary.channels).toBeUndefined();
    const again = await waitForGuestProgress(a, name, 1, 60_000);
    expect(again.stalePages, JSON.stringify(again)).toBe(0);
    // The adaptive codec sends its raw pieces on the channels too (and its LZ4 ones on the session).
    const auto = await cluster.cli(a, ['migrate', name, '--to', b.listen, '--no-dedup', '--json']);
    expect(auto.exitCode, auto.stderr).toBe(0);
    const autoSummary = JSON.parse(auto.stdout).guests[0];
    expect(autoSummary.verified).toBe(true);
    expect(autoSummary.channels).toMatchObject({ count: 2, tls: false });
    expect(autoSummary.channels.pages).toBeGreaterThan(0);
    expect(autoSummary.codecRates.raw).toBeGreaterThan(0);
    const third = await waitForGuestProgress(b, name, 1, 60_000);
    expect(third.stalePages, JSON.stringify(third)).toBe(0);
  });

  it("deduplicates on channels: refs to a moved guest's memory on the session, the rest on the channels; verified, nothing stale", async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const first = uniqueName('vm');
    const second = uniqueName('vm');
    // Two guests of one image: 60% of their pages shared, each its own private ones.
    for (const [name, seed] of [[first, '1'], [second, '2']] as const) {
      expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '64MiB', '--image-seed', '7', '--shared', '0.6', '--seed', seed, '--dirty-rate', '8MiB/s'])).exitCode).toBe(0);
    }
    await sleep(300);
    const one = await cluster.cli(a, ['migrate', first, '--to', b.listen, '--codec', 'raw', '--json']);
    expect(one.exitCode, one.stderr).toBe(0);
    const oneSummary = JSON.parse(one.stdout).guests[0];
    expect(oneSummary.verified).toBe(true);
    expect(oneSummary.channels, JSON.stringify(oneSummary.rounds)).toMatchObject({ count: 2, tls: false });
    // B runs the first guest now and offers its memory: the second's shared pages are refs to it.
    const two = await cluster.cli(a, ['migrate', second, '--to', b.listen, '--codec', 'raw', '--json']);
    expect(two.exitCode, two.stderr).toBe(0);
    const summary = JSON.parse(two.stdout).guests[0];
    const context = JSON.stringify({ dedup: summary.dedup, channels: summary.channels, repairedPages: summary.repairedPages, round0: summary.rounds[0] });
    expect(summary.verified, context).toBe(true);
    expect(summary.repairedPages, context).toBe(0);
    expect(summary.channels, context).toMatchObject({ count: 2, tls: false });
    // About a third of its non-zero pages are the image's and found in the first guest (as
    // many as on the session alone, measured: 0.35).
    const nonZero = summary.rounds[0].pages - summary.rounds[0].zeroPages;
    expect(summary.dedup.hits.resident, context).toBeGreaterThan(0.25 * nonZero);
    // Every page of the rounds before the final one went once: a ref or nothing on the
    // session, or on a channel (the final round goes on the session), or not at all: a hole.
    type Round = { final: boolean; pages: number; refPages: number; unchangedPages: number; holePages?: number };
    const live = (summary.rounds as Round[]).filter((r) => !r.final);
    const sum = (f: (r: Round) => number) => live.reduce((total, r) => total + f(r), 0);
    expect(summary.channels.pages + sum((r) => r.refPages + r.unchangedPages + (r.holePages ?? 0)), context).toBe(sum((r) => r.pages));
    for (const name of [first, second]) {
      const check = await waitForGuestProgress(b, name, 2, 60_000);
      expect(check.resumeStalePages, JSON.stringify(check)).toBe(0);
      expect(check.stalePages, JSON.stringify(check)).toBe(0);
    }
  });

  it('survives the destination agent dying mid-migration: the source guest runs on, nothing is left behind', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const name = uniqueName('vm');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '128MiB', '--dirty-rate', '10MiB/s'])).exitCode).toBe(0);
    const before = await guestOn(a, name);
    // Capped at 16 MiB/s, round 0 alone takes 8 s: plenty of time to kill the destination.
    const migrating = cluster.cli(a, ['migrate', name, '--to', b.listen, '--bandwidth', '16MiB/s', '--json']);
    await sleep(1_500);
    expect(shmFilesOf(name)).toHaveLength(1); // the destination's file is unnamed until the commit
    await b.kill();
    const run = await migrating;
    expect(run.exitCode).not.toBe(0);
    expect(run.stderr).toMatch(/PEER_GONE|peer closed|session/i);
    expect(run.stderr).toMatch(/keeps running on this host/);
    expect(JSON.parse(run.stdout).error.code).toMatch(/^GANGWAY_ERR_/);

    const guest = await guestOn(a, name);
    expect(guest?.state).toBe('running');
    await sleep(1_000);
    const later = await guestOn(a, name);
    expect(later!.totalWrites!).toBeGreaterThan(before!.totalWrites!);
    expect(later!.stalePages).toBe(0);
    expect(shmFilesOf(name)).toEqual([guest!.memoryPath.replace('/dev/shm/', '')]);
    // The destination's hot-standby guest saw its pipe close and exited.
    const { execa } = await import('execa');
    const ps = await execa('pgrep', ['-f', `gangway-guest.*${name}`], { reject: false });
    const pids = ps.stdout.split('\n').filter(Boolean).map(Number);
    expect(pids).toEqual([guest!.pid]);
  });

  it('cancels a running migration by id prefix: the guest runs on here, nothing is left there', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const name = uniqueName('vm');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '64MiB', '--dirty-rate', '4MiB/s'])).exitCode).toBe(0);
    const migrating = cluster.cli(a, ['migrate', name, '--to', b.listen, '--bandwidth', '16MiB/s', '--json']);
    let id: string | undefined;
    for (let i = 0; i < 100 && !id; i++) {
      await sleep(50);
      id = (await a.status()).migrations.find((m) => m.direction === 'out' && m.state === 'running')?.migrationId;
    }
    expect(id).toBeDefined();
    await sleep(500);
    const cancel = await cluster.cli(a, ['cancel', id!.slice(0, 8), '--json']);
    expect(cancel.exitCode, cancel.stderr).toBe(0);
    expect(JSON.parse(cancel.stdout).cancelled).toBe(id);
    const run = await migrating;
    expect(run.exitCode).not.toBe(0);
    expect(JSON.parse(run.stdout).error.code).toBe('GANGWAY_ERR_ABORTED');
    expect(run.stderr).toMatch(/cancelled by the operator.*keeps running on this host/);
    expect((await guestOn(a, name))?.state).toBe('running');
    const there = await b.status();
    expect(there.guests).toHaveLength(0);
    await sleep(200);
    expect((await b.status()).migrations[0]).toMatchObject({ direction: 'in', state: 'aborted' });
    expect(shmFilesOf(name)).toHaveLength(1);
    // Nothing left to cancel.
    const again = await cluster.cli(a, ['cancel', id!, '--json']);
    expect(again.exitCode).toBe(1);
    expect(again.stderr).toMatch(/is failed/);
  });

  it('refuses to stop a guest that outruns the link, and with --force stops it anyway', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const name = uniqueName('vm');
    // A 16 MiB hot set rewritten at 64 MiB/s over a 16 MiB/s link: the final round cannot fit 100 ms.
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '32MiB', '--dirty-rate', '64MiB/s', '--hot', '0.5', '--profile', 'random'])).exitCode).toBe(0);
    const args = ['migrate', name, '--to', b.listen, '--bandwidth', '16MiB/s', '--downtime-ms', '100', '--max-rounds', '2', '--codec', 'raw', '--json'];
    const refused = await cluster.cli(a, args);
    expect(refused.exitCode).not.toBe(0);
    expect(JSON.parse(refused.stdout).error.code).toBe('GANGWAY_ERR_NON_CONVERGENCE');
    expect(refused.stderr).toMatch(/--force/);
    const still = await guestOn(a, name);
    expect(still?.state).toBe('running');
    expect(await guestOn(b, name)).toBeUndefined();

    const forced = await cluster.cli(a, [...args, '--force']);
    expect(forced.exitCode, forced.stderr).toBe(0);
    const summary = JSON.parse(forced.stdout).guests[0];
    expect(summary.forced).toBe(true);
    expect(summary.verified).toBe(true);
    expect(summary.downtimeMs).toBeGreaterThan(100);
    const check = await waitForGuestProgress(b, name, 1, 60_000);
    expect(check.stalePages).toBe(0);
  });

  it('repairs pages the dirty tracker missed: the destination sends its page fingerprints, the differing pages go again', async () => {
    cluster = new Cluster();
    // The source's tracker loses 200 dirty pages once (fault injection), as one that missed writes would.
    const [a, b] = [await cluster.agent('a', [], { GANGWAY_FAULT_DROP_DIRTY: '200' }), await cluster.agent('b')];
    const name = uniqueName('vm');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '64MiB', '--dirty-rate', '16MiB/s', '--hot', '0.5'])).exitCode).toBe(0);
    await sleep(300);
    const run = await cluster.cli(a, ['migrate', name, '--to', b.listen, '--json']);
    expect(run.exitCode, run.stderr + run.stdout).toBe(0);
    const summary = JSON.parse(run.stdout).guests[0];
    expect(summary.verified).toBe(true);
    expect(summary.repairedPages, JSON.stringify(summary.rounds.map((r: { round: number; pages: number; final: boolean }) => [r.round, r.pages, r.final]))).toBeGreaterThan(0);
    expect(summary.repairedPages).toBeLessThanOrEqual(200);
    // The repair is one more final round, inside the downtime.
    expect(summary.rounds.filter((r: { final: boolean }) => r.final).length).toBeGreaterThanOrEqual(2);
    const check = await waitForGuestProgress(b, name, 1, 60_000);
    expect(check.resumeStalePages, JSON.stringify(check)).toBe(0);
    expect(check.stalePages, JSON.stringify(check)).toBe(0);
  });
});
