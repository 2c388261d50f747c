// Post-copy into a destination whose memory directory fills up in the middle (found by the
// chaos campaign, seed 20072): installing a page allocates it in the directory's tmpfs, and
// UFFDIO_COPY fails with ENOMEM when there is no room. The destination holds the frame (and
// its credit, so the source stops sending), the guest waits on its pages, and once room is
// made the pages go in and the guest completes with zero stale pages, by its own check.
// Needs root (a tmpfs, userfaultfd); skips with the reason otherwise.
import { readFileSync, rmSync, statfsSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import { describe, expect, it } from 'vitest';
import { waitForGuestProgress } from '../../agent/cli/demo.js';
import { loadNative } from '../../agent/native.js';
import { cleanupsAfterEach } from '../helpers/cleanups.js';
import { builtAgent, Cluster, uniqueName } from '../helpers/cluster.js';
import { mountTmpfs } from '../helpers/tmpfs.js';

const reason = !builtAgent ? 'the agent is not built' : process.getuid?.() !== 0 ? 'needs root (a tmpfs)' : !loadNative().uffdProbe() ? 'no userfaultfd here' : undefined;

describe.skipIf(reason !== undefined)(`post-copy into a memory directory that fills up${reason ? ` (skipped: ${reason})` : ''}`, () => {
  const cleanups = cleanupsAfterEach();

  it('the guest waits on its pages while the directory is full, and completes once room is made', async () => {
    const tmpfs = await mountTmpfs(128);
    cleanups.push(tmpfs.remove);
    const mount = tmpfs.path;
    const cluster = new Cluster();
    cleanups.push(() => cluster.cleanup());
    const a = await cluster.agent('a');
    const b = await cluster.agent('b', ['--memory-dir', mount]);

    const name = uniqueName('full');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '64MiB', '--dirty-rate', '4MiB/s', '--profile', 'random'])).exitCode).toBe(0);
    // Paced, so that the push is still under way when the directory fills.
    const migrating = cluster.cli(a, ['migrate', name, '--to', b.listen, '--technique', 'postcopy', '--bandwidth', '16MiB/s', '--json'], 180_000);
    const deadline = performance.now() + 60_000;
    for (;;) {
      const record = (await a.status()).migrations.find((m) => m.direction === 'out' && m.guest === name);
      if (record && 'progress' in record && record.progress?.phase === 'postcopy' && record.progress.roundPagesSent > 1000) break;
      if (record && record.state !== 'running') throw new Error(`the migration ended before the directory filled: ${JSON.stringify(record)}`);
      if (performance.now() > deadline) throw new Error('post-copy did not start within 60 s');
      await sleep(20);
    }
    const filler = join(mount, 'filler');
    cleanups.push(() => rmSync(filler, { force: true }));
    // The guest's file grows meanwhile: a filler that no longer fits is tried a little smaller.
    let filled = false;
    for (const keepBytes of [64, 512, 4096].map((kib) => kib * 1024)) {
      const { bavail, bsize } = statfsSync(mount);
      filled = (await execa('fallocate', ['-l', String(Math.max(0, bavail * bsize - keepBytes)), filler], { reject: false })).exitCode === 0;
      if (filled) break;
    }
    expect(filled).toBe(true);
    await sleep(3_000);
    // Full: the guest is there, waiting on the pages that cannot go in yet.
    const during = (await b.status()).guests.find((g) => g.name === name);
    expect(during?.incoming?.missingPages ?? -1).toBeGreaterThan(0);
    expect(during?.incoming?.stranded).toBeUndefined();
    expect(readFileSync(b.logPath, 'utf8')).toMatch(/post-copy: the memory directory is full; pages wait for room/);
    rmSync(filler);

    const run = await migrating;
    expect(run.exitCode, run.stderr + run.stdout).toBe(0);
    expect(JSON.parse(run.stdout).guests[0]).toMatchObject({ guest: name, verified: true, technique: 'postcopy' });
    expect(readFileSync(b.logPath, 'utf8')).toMatch(/post-copy: the memory directory has room again; pages are installed/);
    const check = await waitForGuestProgress(b, name, 1, 60_000);
    expect(check.resumeStalePages, JSON.stringify(check)).toBe(0);
    expect(check.stalePages, JSON.stringify(check)).toBe(0);
    expect((await a.status()).guests.find((g) => g.name === name)).toBeUndefined();
  }, 240_000);
});
