// A destination agent killed (kill -9) in the middle of a post-copy, then restarted on the
// same state dir: the guest it was receiving ran on without it (waiting on its faults), and
// the restarted agent takes its userfaultfd back, rebuilds which pages are missing from the
// memory file, lets the source reattach and completes: the guest at the destination checks
// its own pages (0 stale), the source's copy is gone, nothing is stranded.
import { readFileSync, rmSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { waitForGuestProgress } from '../../agent/cli/demo.js';
import { isAlive, processState } from '../../agent/guest/process-guest.js';
import { builtAgent, Cluster, shmFilesOf, uniqueName } from '../helpers/cluster.js';

type Agent = Awaited<ReturnType<Cluster['agent']>>;

async function guestOn(agent: Agent, name: string) {
  return (await agent.status()).guests.find((g) => g.name === name);
}

async function until<T>(what: string, probe: () => Promise<T | undefined | false>, timeoutMs = 30_000): Promise<T> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

/** The guest runs at the destination: the source had its `committed` and pushes the missing pages. */
async function runsThere(source: Agent): Promise<void> {
  await until('post-copy under way', async () => (await source.status()).migrations.some((m) => m.direction === 'out' && 'progress' in m && m.progress?.phase === 'postcopy'));
}

// pidfd_getfd takes another process's descriptor: root (ptrace access) only.
const isRoot = process.getuid?.() === 0;

describe.skipIf(!builtAgent || !isRoot)('a destination agent killed during post-copy, then restarted', () => {
  let cluster: Cluster;
  afterEach(async () => {
    await cluster?.cleanup();
  });

  it('takes the guest back: the migration completes, the guest runs with 0 stale pages by its own check, the source copy is gone', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a');
    let b = await cluster.agent('b');
    const name = uniqueName('tk1');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '64MiB', '--dirty-rate', '8MiB/s', '--profile', 'random'])).exitCode).toBe(0);
    const sourcePid = (await guestOn(a, name))!.pid;
    // 64 MiB at 8 MiB/s: post-copy lasts about 8 s.
    const migrating = cluster.cli(a, ['migrate', name, '--to', b.listen, '--technique', 'postcopy', '--bandwidth', '8MiB/s', '--json']);
    const arriving = await until('post-copy under way', async () => {
      const there = await guestOn(b, name);
      return there?.incoming ? there : undefined;
    });
    await runsThere(a);
    // Pages are still missing when the agent dies (the live count, not the switchover's).
    expect((await guestOn(b, name))?.incoming?.missingPages).toBeGreaterThan(0);
    const listen = b.listen;
    await b.kill();
    // The guest outlives its agent, waiting on its faults.
    expect(isAlive(arriving.pid) && processState(arriving.pid) !== 'Z').toBe(true);
    const journaled = JSON.parse(readFileSync(`${b.stateDir}/guests/${name}.json`, 'utf8')) as { incoming?: { missingPages: number; secret?: string } };
    expect(journaled.incoming?.missingPages).toBeGreaterThan(0);
    expect(journaled.incoming?.secret).toMatch(/^[0-9a-f]+$/);
    await sleep(500);

    b = await cluster.agent('b', ['--listen', listen]);
    const run = await migrating;
    expect(run.exitCode, run.stderr).toBe(0);
    const summary = JSON.parse(run.stdout) as { guests: { guest: string; postcopy?: { reattaches: number; missingPages: number } }[] };
    const moved = summary.guests.find((g) => g.guest === name);
    expect(moved?.postcopy?.reattaches).toBeGreaterThanOrEqual(1);

    // The same guest process, no longer receiving, nothing stranded; the migration committed here.
    const there = await until('the destination to hold every page', async () => {
      const guest = await guestOn(b, name);
      return guest && !guest.incoming ? guest : undefined;
    }, 60_000);
    expect(there.pid).toBe(arriving.pid);
    expect(there.state).toBe('running');
    const incoming = (await b.status()).migrations.filter((m) => m.direction === 'in');
    expect(incoming.map((m) => m.state)).toEqual(['committed']);
    // The source's copy is gone.
    expect(await guestOn(a, name)).toBeUndefined();
    await until('the source guest to exit', async () => !isAlive(sourcePid) || processState(sourcePid) === 'Z');
    // The guest's own check of every page it revisits.
    const check = await waitForGuestProgress(b, name, 1, 60_000);
    expect(check.resumeStalePages, JSON.stringify(check)).toBe(0);
    expect(check.stalePages, JSON.stringify(check)).toBe(0);
    // Its memory file, and no fingerprints file any more.
    expect(shmFilesOf(name)).toHaveLength(1);
  });
  it('cannot take it back without the fingerprints of what arrived: the guest is stranded here, paused, with the reason, and the source keeps its paused copy', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a');
    let b = await cluster.agent('b');
    const name = uniqueName('tk2');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '64MiB', '--dirty-rate', '8MiB/s', '--profile', 'random'])).exitCode).toBe(0);
    const migrating = cluster.cli(a, ['migrate', name, '--to', b.listen, '--technique', 'postcopy', '--bandwidth', '8MiB/s', '--json']);
    const arriving = await until('post-copy under way', async () => {
      const there = await guestOn(b, name);
      return there?.incoming ? there : undefined;
    });
    await runsThere(a);
    const listen = b.listen;
    await b.kill();
    const fingerprints = shmFilesOf(name).filter((file) => file.endsWith('.fingerprints'));
    expect(fingerprints).toHaveLength(1);
    for (const file of fingerprints) rmSync(`/dev/shm/${file}`);

    b = await cluster.agent('b', ['--listen', listen]);
    const stranded = await until('the guest to be stranded', async () => {
      const guest = await guestOn(b, name);
      return guest?.incoming?.stranded ? guest : undefined;
    });
    expect(stranded.incoming!.stranded).toMatch(/could not take it back: the fingerprints of what arrived are gone .*\.fingerprints/);
    expect(stranded.pid).toBe(arriving.pid);
    expect(processState(arriving.pid)).toMatch(/^[Tt]$/);
    expect(stranded.incoming!.missingPages).toBeGreaterThan(0);
    // The source's reattach is refused: it keeps its paused copy, which holds the missing pages.
    const run = await migrating;
    expect(run.exitCode).not.toBe(0);
    expect(JSON.parse(run.stdout).error.code).toBe('GANGWAY_ERR_POSTCOPY_INTERRUPTED');
    const source = await guestOn(a, name);
    expect(source?.state).toBe('paused');
    expect(source?.outgoing?.to).toBe(listen);
  });
});
