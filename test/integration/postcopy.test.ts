// Post-copy and hybrid between two real agents, with real guests that write faster than the
// link carries: the guest moves at once (post-copy) or after pre-copy stops converging
// (hybrid), its missing pages follow on demand, and it arrives bit-identical (the digest of
// the memory received against the paused source's, and the guest's own check of every page).
import { existsSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { waitForGuestProgress } from '../../agent/cli/demo.js';
import { loadNative } from '../../agent/native.js';
import { builtAgent, Cluster, shmFilesOf, uniqueName } from '../helpers/cluster.js';

const PAGE = 4096;
const MiB = 1024 * 1024;
const canPostcopy = builtAgent && loadNative().uffdProbe();

describe.skipIf(!canPostcopy)('post-copy between two agents (needs userfaultfd: root)', () => {
  let cluster: Cluster;
  afterEach(async () => {
    await cluster?.cleanup();
  });

  async function guestOn(agent: Awaited<ReturnType<Cluster['agent']>>, name: string) {
    return (await agent.status()).guests.find((g) => g.name === name);
  }

  it('moves a guest writing 4x faster than the link: tiny downtime, every page once, digests and self-check clean', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b', ['--metrics-listen', '127.0.0.1:0'])];
    const name = uniqueName('pc');
    const memory = 96 * MiB;
    const start = await cluster.cli(a, ['guest', 'start', name, '--memory', '96MiB', '--dirty-rate', '64MiB/s', '--hot', '0.5']);
    expect(start.exitCode, start.stderr).toBe(0);
    const run = await cluster.cli(a, ['migrate', name, '--to', b.listen, '--technique', 'postcopy', '--bandwidth', '16MiB/s', '--json']);
    expect(run.exitCode, run.stderr).toBe(0);
    const summary = JSON.parse(run.stdout).guests[0];
    const context = JSON.stringify({ downtime: summary.downtime, postcopy: summary.postcopy });
    expect(summary.technique).toBe('postcopy');
    expect(summary.verified).toBe(true);
    // Stopped at once: no pre-copy round.
    expect(summary.rounds).toHaveLength(0);
    expect(summary.downtimeMs, context).toBeLessThan(1_000);
    const pc = summary.postcopy;
    expect(pc.missingPages).toBe(memory / PAGE - 1);
    // Every missing page went exactly once: by a fault (or its window) or by the push.
    expect(pc.faultPages + pc.pushedPages, context).toBe(pc.missingPages);
    expect(pc.faults, context).toBeGreaterThan(0);
    expect(pc.faultLatency.maxMs).toBeGreaterThanOrEqual(pc.faultLatency.p99Ms);
    // 96 MiB at 16 MiB/s (less compressed): the post-copy phase is where the time went.
    expect(pc.durationMs).toBeGreaterThan(1_000);

    expect(await guestOn(a, name)).toBeUndefined();
    const moved = await guestOn(b, name);
    expect(moved).toBeDefined();
    expect(existsSync(moved!.memoryPath)).toBe(true);
    expect(shmFilesOf(name)).toHaveLength(1);
    const check = await waitForGuestProgress(b, name, 2, 60_000);
    expect(check.resumeStalePages, JSON.stringify(check)).toBe(0);
    expect(check.stalePages, JSON.stringify(check)).toBe(0);
    expect(check.passesAfterResume).toBeGreaterThanOrEqual(2);

    // The destination's metrics saw the faults and the pages by how they came.
    const metrics = await fetchMetrics(b);
    expect(metric(metrics, 'gangway_postcopy_faults_total')).toBe(pc.faults);
    expect(metric(metrics, 'gangway_postcopy_pages_total{how="fetched"}') + metric(metrics, 'gangway_postcopy_pages_total{how="pushed"}')).toBe(pc.missingPages);
  });

  it('hybrid: pre-copy rounds until they stop converging, then post-copy', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const name = uniqueName('hy');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '64MiB', '--dirty-rate', '64MiB/s', '--hot', '0.5'])).exitCode).toBe(0);
    const run = await cluster.cli(a, ['migrate', name, '--to', b.listen, '--technique', 'hybrid', '--bandwidth', '16MiB/s', '--json']);
    expect(run.exitCode, run.stderr).toBe(0);
    const summary = JSON.parse(run.stdout).guests[0];
    expect(summary.technique).toBe('hybrid');
    expect(summary.verified).toBe(true);
    expect(summary.rounds.length).toBeGreaterThanOrEqual(2);
    expect(summary.postcopy?.reason, JSON.stringify(summary.rounds.map((r: { decision?: string }) => r.decision))).toMatch(/does not converge|limit/);
    // Only what the last rounds left dirty was missing, not the whole guest.
    expect(summary.postcopy.missingPages).toBeLessThan((64 * MiB) / PAGE);
    expect(summary.postcopy.faultPages + summary.postcopy.pushedPages).toBe(summary.postcopy.missingPages);
    const check = await waitForGuestProgress(b, name, 2, 60_000);
    expect(check.resumeStalePages, JSON.stringify(check)).toBe(0);
    expect(check.stalePages, JSON.stringify(check)).toBe(0);
  });

  it('hybrid on a guest that converges is a plain pre-copy', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const name = uniqueName('hc');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '32MiB', '--dirty-rate', '1MiB/s'])).exitCode).toBe(0);
    const run = await cluster.cli(a, ['migrate', name, '--to', b.listen, '--technique', 'hybrid', '--json']);
    expect(run.exitCode, run.stderr).toBe(0);
    const summary = JSON.parse(run.stdout).guests[0];
    expect(summary.technique).toBe('hybrid');
    expect(summary.postcopy).toBeUndefined();
    expect(summary.rounds.at(-1).final).toBe(true);
  });

  it('the source agent dies for good mid post-copy: the destination keeps the guest paused and says so; neither side resumes it', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a');
    const b = await cluster.agent('b', ['--peer-timeout', '1s', '--postcopy-reattach', '2s']);
    const name = uniqueName('gone');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '64MiB', '--dirty-rate', '16MiB/s', '--profile', 'random'])).exitCode).toBe(0);
    const migrating = cluster.cli(a, ['migrate', name, '--to', b.listen, '--technique', 'postcopy', '--bandwidth', '8MiB/s', '--json']);
    const deadline = performance.now() + 30_000;
    while (!(await b.status()).guests.some((g) => g.name === name && g.incoming)) {
      if (performance.now() > deadline) throw new Error('post-copy did not start within 30 s');
      await sleep(20);
    }
    await a.kill();
    await migrating;
    // The destination waits for its source, then gives up: the guest is kept, paused.
    let guest;
    while (!(guest = (await b.status()).guests.find((g) => g.name === name))?.incoming?.stranded) {
      if (performance.now() > deadline + 30_000) throw new Error(`the destination did not give up: ${JSON.stringify(guest)}`);
      await sleep(100);
    }
    expect(guest!.state).toBe('paused');
    expect(guest!.incoming!.missingPages).toBeGreaterThan(0);
    expect(guest!.incoming!.stranded).toMatch(/did not come back within 2 s/);
    expect(existsSync(guest!.memoryPath)).toBe(true);
    const text = await cluster.cli(b, ['status']);
    expect(text.stdout).toMatch(/did not complete: .*pages never came; the guest is kept paused/);
    const resumeThere = await cluster.cli(b, ['guest', 'resume', name]);
    expect(resumeThere.exitCode).not.toBe(0);
    expect(resumeThere.stderr).toMatch(/never received all of its memory/);

    // The source agent comes back: its copy is marked as running there, and stays paused.
    const again = await cluster.agent('a');
    const source = (await again.status()).guests.find((g) => g.name === name);
    expect(source?.outgoing?.to).toBe(b.listen);
    expect(source?.state).toBe('paused');
    const resumeHere = await cluster.cli(again, ['guest', 'resume', name]);
    expect(resumeHere.exitCode).not.toBe(0);
    expect(resumeHere.stderr).toMatch(/runs at .* since the post-copy switchover/);
  });
});

async function fetchMetrics(agent: Awaited<ReturnType<Cluster['agent']>>): Promise<string> {
  const at = (await agent.status()).agent.metrics;
  if (!at) throw new Error('the agent serves no metrics');
  return (await fetch(`http://${at}/metrics`)).text();
}

function metric(text: string, name: string): number {
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  return line ? Number(line.slice(name.length + 1)) : 0;
}
