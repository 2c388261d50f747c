// Guests of several memory regions, with a device state, between two real agents: by
// pre-copy, post-copy and hybrid, in a gang with dedup across regions and guests, and through
// a restart of either agent. Each arrives with a digest per region matching the paused
// source's, finds no stale page in its own check, takes back a device state that belongs
// with its memory (a lost or stale one would show in deviceErrors), and carries on.
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { waitForGuestProgress } from '../../agent/cli/demo.js';
import { isAlive, processState } from '../../agent/guest/process-guest.js';
import { loadNative } from '../../agent/native.js';
import { builtAgent, Cluster, shmFilesOf, uniqueName } from '../helpers/cluster.js';
import { waitForAsync } from '../helpers/wait.js';

type Agent = Awaited<ReturnType<Cluster['agent']>>;
const MiB = 1024 * 1024;
const PAGE = 4096;
const canPostcopy = builtAgent && loadNative().uffdProbe();

async function guestOn(agent: Agent, name: string) {
  return (await agent.status()).guests.find((g) => g.name === name);
}

/**
 * The guest runs on `here` only, all its regions there, its own check clean and its device
 * state taken back `loads` times without an error; nothing of it runs on `there`.
 */
async function arrivedIntact(here: Agent, there: Agent, name: string, regions: number[], loads = 1): Promise<void> {
  expect(await guestOn(there, name)).toBeUndefined();
  const check = await waitForGuestProgress(here, name, 1, 60_000);
  expect(check.resumeStalePages, JSON.stringify(check)).toBe(0);
  expect(check.stalePages, JSON.stringify(check)).toBe(0);
  const guest = await guestOn(here, name);
  expect(guest).toMatchObject({ state: 'running', regionBytes: regions, deviceErrors: 0, deviceLoads: loads, metaErrors: 0 });
  expect(guest!.memoryPaths).toHaveLength(regions.length);
  expect(shmFilesOf(name)).toHaveLength(regions.length);
}

async function start(cluster: Cluster, agent: Agent, name: string, memory: string, extra: string[] = []): Promise<void> {
  const run = await cluster.cli(agent, ['guest', 'start', name, '--memory', memory, ...extra, '--json']);
  expect(run.exitCode, run.stderr).toBe(0);
}

async function migrate(cluster: Cluster, agent: Agent, args: string[]) {
  const run = await cluster.cli(agent, ['migrate', ...args, '--json']);
  expect(run.exitCode, run.stderr + run.stdout).toBe(0);
  return JSON.parse(run.stdout);
}

describe.skipIf(!builtAgent)('guests of several memory regions, with device state', () => {
  let cluster: Cluster;
  afterEach(async () => {
    await cluster?.cleanup();
  });

  it('pre-copy: every region verified, the device state taken back, and a second hop back', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const name = uniqueName('r2');
    await start(cluster, a, name, '16MiB,8MiB,8MiB', ['--dirty-rate', '8MiB/s', '--hot', '0.5']);
    await sleep(300);
    const there = await migrate(cluster, a, [name, '--to', b.listen]);
    const summary = there.guests[0];
    expect(summary.digests).toHaveLength(3);
    expect(summary.memoryBytes).toBe(32 * MiB);
    expect(summary.deviceStateBytes).toBe(48);
    expect(summary.rounds[0].pages).toBe((32 * MiB) / PAGE);
    await arrivedIntact(b, a, name, [16 * MiB, 8 * MiB, 8 * MiB]);
    // And back: the second device state is the one saved at the second pause.
    await migrate(cluster, b, [name, '--to', a.listen]);
    await arrivedIntact(a, b, name, [16 * MiB, 8 * MiB, 8 * MiB], 2);
  });

  it.skipIf(!canPostcopy)('post-copy: faults and the push serve every region, each page once', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const name = uniqueName('r2pc');
    await start(cluster, a, name, '24MiB,24MiB', ['--dirty-rate', '32MiB/s', '--hot', '0.5']);
    const summary = (await migrate(cluster, a, [name, '--to', b.listen, '--technique', 'postcopy', '--bandwidth', '16MiB/s'])).guests[0];
    const pc = summary.postcopy;
    const context = JSON.stringify(pc);
    expect(summary.digests).toHaveLength(2);
    expect(pc.missingPages).toBe((48 * MiB) / PAGE - 1); // all but the header, which went before the guest started
    expect(pc.faultPages + pc.pushedPages, context).toBe(pc.missingPages);
    expect(pc.faults, context).toBeGreaterThan(0);
    await arrivedIntact(b, a, name, [24 * MiB, 24 * MiB]);
    // Arrived by post-copy, its shim reported `postcopy=1`: it is tracked by uffd-wp all the same.
    const back = (await migrate(cluster, b, [name, '--to', a.listen])).guests[0];
    expect(back.tracker, back.trackerFallbackReason).toBe('uffd-wp');
    await arrivedIntact(a, b, name, [24 * MiB, 24 * MiB], 2);
  });

  it.skipIf(!canPostcopy)('hybrid: pre-copy rounds over both regions, then post-copy when they stop converging', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const name = uniqueName('r2hy');
    await start(cluster, a, name, '16MiB,16MiB', ['--dirty-rate', '48MiB/s', '--hot', '0.5']);
    const summary = (await migrate(cluster, a, [name, '--to', b.listen, '--technique', 'hybrid', '--bandwidth', '16MiB/s'])).guests[0];
    expect(summary.technique).toBe('hybrid');
    expect(summary.postcopy?.reason, JSON.stringify(summary.rounds.map((r: { decision?: string }) => r.decision))).toBeDefined();
    expect(summary.rounds.length).toBeGreaterThanOrEqual(1);
    expect(summary.digests).toHaveLength(2);
    await arrivedIntact(b, a, name, [16 * MiB, 16 * MiB]);
  });

  it('a gang of two-region guests of one image: dedup across regions and guests, each intact', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const names = [uniqueName('r2g'), uniqueName('r2g')];
    for (const [i, name] of names.entries()) await start(cluster, a, name, '24MiB,24MiB', ['--image-seed', '7', '--shared', '0.6', '--seed', String(i + 1), '--dirty-rate', '4MiB/s']);
    const summary = await migrate(cluster, a, [...names, '--to', b.listen, '--strategy', 'gang']);
    expect(summary.failed).toEqual([]);
    expect(summary.dedupStats.hits.crossGuest, JSON.stringify(summary.dedupStats)).toBeGreaterThan(1000);
    expect(summary.wireBytes).toBeLessThan(0.85 * summary.memoryBytes);
    for (const guest of summary.guests) expect(guest.digests).toHaveLength(2);
    for (const name of names) await arrivedIntact(b, a, name, [24 * MiB, 24 * MiB]);
  });

  it('the destination agent killed right after the guest started: restarted, it finds the guest with all its regions', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a');
    let b = await cluster.agent('b', [], { GANGWAY_FAULT_CRASH: 'dest-after-start' });
    const name = uniqueName('r2rd');
    await start(cluster, a, name, '16MiB,16MiB', ['--dirty-rate', '4MiB/s']);
    const sourcePid = (await guestOn(a, name))!.pid;
    const run = await cluster.cli(a, ['migrate', name, '--to', b.listen, '--json']);
    expect(JSON.parse(run.stdout).error.code).toBe('GANGWAY_ERR_SWITCHOVER_IN_DOUBT');
    b = await cluster.agent('b', ['--listen', b.listen]);
    await waitForAsync('the source to drop its copy', async () => !(await guestOn(a, name)), 60_000);
    expect(isAlive(sourcePid) && processState(sourcePid) !== 'Z').toBe(false);
    await arrivedIntact(b, a, name, [16 * MiB, 16 * MiB]);
  });

  it.skipIf(!canPostcopy)('the source agent killed during post-copy: restarted, it serves what every region still lacks', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a');
    const b = await cluster.agent('b', ['--postcopy-reattach', '60s']);
    const name = uniqueName('r2rs');
    await start(cluster, a, name, '32MiB,32MiB', ['--dirty-rate', '8MiB/s', '--profile', 'random']);
    const migrating = cluster.cli(a, ['migrate', name, '--to', b.listen, '--technique', 'postcopy', '--bandwidth', '8MiB/s', '--json']);
    await waitForAsync('post-copy under way', async () => (await guestOn(b, name))?.incoming, 30_000);
    await sleep(500);
    await a.kill();
    await migrating;
    expect((await guestOn(b, name))?.incoming?.missingPages ?? 0).toBeGreaterThan(0);
    const again = await cluster.agent('a');
    await waitForAsync('the destination to hold every page', async () => {
      const there = await guestOn(b, name);
      return there !== undefined && !there.incoming;
    }, 60_000);
    await waitForAsync('the source to drop its copy', async () => !(await guestOn(again, name)), 30_000);
    await arrivedIntact(b, again, name, [32 * MiB, 32 * MiB]);
  });
});
