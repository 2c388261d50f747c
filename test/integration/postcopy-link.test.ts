// Post-copy across a real (shaped) link between two network namespaces, cut in the middle:
// after the switchover the guest runs at the destination with pages that exist only at the
// source. The link goes down for a few seconds; both agents notice (the session falls
// silent), the destination guest waits on its faults, the source reconnects with backoff
// and reattaches, the destination says what it still lacks, and the guest completes with
// zero stale pages. Needs root, iproute2 and userfaultfd; skips with the reason otherwise.
import { rmSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import { describe, expect, it } from 'vitest';
import { initCa, issueHostCert } from '../../agent/cli/certs.js';
import { waitForGuestProgress } from '../../agent/cli/demo.js';
import { killGuestsOf, makeTempDir, startLocalAgent, type LocalAgent } from '../../agent/local-agent.js';
import { loadNative } from '../../agent/native.js';
import { createShapedLink, netnsAvailable, type ShapedLink } from '../../bench/netns-link.js';
import { cleanupsAfterEach } from '../helpers/cleanups.js';
import { builtAgent, Cluster, mainJs, uniqueName } from '../helpers/cluster.js';

const netns = await netnsAvailable();
const reason = !builtAgent ? 'the agent is not built' : !netns.ok ? netns.reason : !loadNative().uffdProbe() ? 'no userfaultfd here (root needed)' : undefined;

describe.skipIf(reason !== undefined)(`post-copy over a link that breaks${reason ? ` (skipped: ${reason})` : ''}`, () => {
  const cleanups = cleanupsAfterEach();

  async function setUp(rateBitsPerSec: number, suffix: string) {
    const link: ShapedLink = await createShapedLink({ name: `pl${suffix}${process.pid % 10000}`, rateBitsPerSec });
    cleanups.push(() => link.close());
    const dir = makeTempDir('gangway-pclink-');
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    await initCa({ dir: `${dir}/tls`, days: 1 });
    const certA = await issueHostCert({ dir: `${dir}/tls`, name: 'host-a', sans: [link.addrA], validity: { days: 1 } });
    const certB = await issueHostCert({ dir: `${dir}/tls`, name: 'host-b', sans: [link.addrB], validity: { days: 1 } });
    const tls = (own: typeof certA, peer: string) => ({ cert: own.certPath, key: own.keyPath, ca: own.caPath, allow: [peer] });
    // Both sides give up on a silent session after 1.5 s, and wait a minute for the other.
    const args = ['--peer-timeout', '1500ms', '--postcopy-reattach', '60s'];
    const start = (side: 'a' | 'b'): Promise<LocalAgent> =>
      startLocalAgent({
        stateDir: `${dir}/${side}`,
        mainPath: mainJs,
        wrap: link.netnsExecPrefix(side === 'a' ? link.nsA : link.nsB),
        listen: `${side === 'a' ? link.addrA : link.addrB}:0`,
        tls: side === 'a' ? tls(certA, 'host-b') : tls(certB, 'host-a'),
        args,
      });
    const a = await start('a');
    cleanups.push(async () => (await killGuestsOf(a), a.kill()));
    const b = await start('b');
    cleanups.push(async () => (await killGuestsOf(b), b.kill()));
    const cluster = new Cluster();
    cleanups.push(() => rmSync(cluster.dir, { recursive: true, force: true }));
    return { link, a, b, cluster };
  }

  it('the link goes down mid post-copy for 3 s: the agents reconnect, the guest completes with zero stale pages', async () => {
    const { link, a, b, cluster } = await setUp(200e6, 'c');

    const name = uniqueName('cut');
    const started = await cluster.cli(a, ['guest', 'start', name, '--memory', '128MiB', '--dirty-rate', '32MiB/s', '--hot', '0.5', '--profile', 'random']);
    expect(started.exitCode, started.stderr).toBe(0);
    const migrating = cluster.cli(a, ['migrate', name, '--to', b.listen, '--technique', 'postcopy', '--json'], 180_000);

    // Once the guest runs at the destination (post-copy under way), cut the link for 3 s.
    const deadline = performance.now() + 60_000;
    for (;;) {
      const status = await a.status();
      const record = status.migrations.find((m) => m.direction === 'out' && m.guest === name);
      if (record && 'progress' in record && record.progress?.phase === 'postcopy' && record.progress.roundPagesSent > 1000) break;
      if (record && record.state !== 'running') throw new Error(`the migration ended before the cut: ${JSON.stringify(record)}`);
      if (performance.now() > deadline) throw new Error('post-copy did not start within 60 s');
      await sleep(20);
    }
    await execa('ip', ['-n', link.nsA, 'link', 'set', 'dev', link.nsA, 'down']);
    cleanups.push(() => execa('ip', ['-n', link.nsA, 'link', 'set', 'dev', link.nsA, 'up'], { reject: false }));
    await sleep(3_000);
    // While the link is down the destination's guest is still there, waiting on its pages.
    const during = (await b.status()).guests.find((g) => g.name === name);
    expect(during?.incoming?.missingPages ?? -1).toBeGreaterThan(0);
    await execa('ip', ['-n', link.nsA, 'link', 'set', 'dev', link.nsA, 'up']);

    const run = await migrating;
    expect(run.exitCode, run.stderr).toBe(0);
    const summary = JSON.parse(run.stdout).guests[0];
    expect(summary.verified).toBe(true);
    expect(summary.postcopy.reattaches, JSON.stringify(summary.postcopy)).toBeGreaterThanOrEqual(1);
    const check = await waitForGuestProgress(b, name, 2, 90_000);
    expect(check.resumeStalePages, JSON.stringify(check)).toBe(0);
    expect(check.stalePages, JSON.stringify(check)).toBe(0);
    expect((await a.status()).guests.find((g) => g.name === name)).toBeUndefined();
  });

  it('faulted pages do not wait behind the push that fills the link (the fault lane)', async () => {
    const rate = 100e6;
    const { a, b, cluster } = await setUp(rate, 'f');
    const name = uniqueName('lat');
    // Random content does not compress: the push fills the link for the whole post-copy.
    const started = await cluster.cli(a, ['guest', 'start', name, '--memory', '64MiB', '--dirty-rate', '16MiB/s', '--hot', '0.5', '--profile', 'random']);
    expect(started.exitCode, started.stderr).toBe(0);
    const run = await cluster.cli(a, ['migrate', name, '--to', b.listen, '--technique', 'postcopy', '--json'], 180_000);
    expect(run.exitCode, run.stderr).toBe(0);
    const pc = JSON.parse(run.stdout).guests[0].postcopy;
    console.info(`post-copy of 64 MiB over ${rate / 1e6} Mbit/s: ${JSON.stringify(pc)}`);
    // The push alone needs seconds (64 MiB at 100 Mbit/s); the guest faulted all along.
    expect(pc.durationMs).toBeGreaterThan(3_000);
    expect(pc.faults).toBeGreaterThan(50);
    // The guest faulted away from the push (it checks its pages in a scattered order), so
    // pages went out on faults, ahead of the push.
    expect(pc.faultPages).toBeGreaterThan(0);
    // A faulted page waits behind what the push has on its way: about 10 ms of the link, at
    // least 256 KiB (21 ms here). Without the lane it would wait behind the socket buffers'
    // megabytes, and behind the push's whole step (2 MiB steps gave a p99 of 150 ms here).
    // Bounds of 1 MiB of the link (84 ms) for p99 and half that for p50 leave room for a
    // noisy machine.
    const mibMs = ((1024 * 1024 * 8) / rate) * 1000;
    expect(pc.faultLatency.p50Ms, JSON.stringify(pc)).toBeLessThan(mibMs / 2);
    expect(pc.faultLatency.p99Ms, JSON.stringify(pc)).toBeLessThan(mibMs);
    const check = await waitForGuestProgress(b, name, 1, 90_000);
    expect(check.resumeStalePages, JSON.stringify(check)).toBe(0);
  });
});
