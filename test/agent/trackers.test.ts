// The two dirty trackers against each other: for the same writes, uffd-wp (write-protect
// faults read with PAGEMAP_SCAN) and hash-scan (content fingerprints) report the same pages.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { guestBinaryPath, trackShimPath } from '../../agent/native.js';
import { HashScanTracker } from '../../agent/tracker/hash-scan.js';
import { PageSet } from '../../agent/tracker/page-set.js';
import { UffdWpTracker } from '../../agent/tracker/uffd-wp.js';
import { launchProcessGuest, ProcessGuest } from '../../agent/guest/process-guest.js';

const PAGE = 4096;
const built = existsSync(guestBinaryPath) && existsSync(trackShimPath);

interface Poker {
  child: ChildProcess;
  command(line: string): Promise<void>;
}

async function startPoker(memoryPath: string, reportPath: string, bytes: number): Promise<Poker> {
  const child = spawn(guestBinaryPath, ['poke', '--memory-file', memoryPath, '--memory-bytes', String(bytes)], {
    stdio: ['pipe', 'pipe', 'inherit'],
    env: { ...process.env, LD_PRELOAD: trackShimPath, GANGWAY_TRACK_PATH: memoryPath, GANGWAY_TRACK_REPORT: reportPath },
  });
  let buffered = '';
  const waiters: (() => void)[] = [];
  child.stdout!.on('data', (data: Buffer) => {
    buffered += data.toString();
    let newline: number;
    while ((newline = buffered.indexOf('\n')) >= 0) {
      const line = buffered.slice(0, newline);
      buffered = buffered.slice(newline + 1);
      if (line === 'ok' || line.startsWith('running')) waiters.shift()?.();
    }
  });
  await new Promise<void>((resolve) => waiters.push(resolve));
  return {
    child,
    command: (line) =>
      new Promise<void>((resolve) => {
        waiters.push(resolve);
        child.stdin!.write(`${line}\n`);
      }),
  };
}

function pages(runs: Uint32Array, pageCount: number): number[] {
  const set = new PageSet(pageCount);
  set.addRuns(runs);
  return [...Array(pageCount).keys()].filter((page) => set.has(page));
}

describe.skipIf(!built)('dirty trackers', () => {
  const cleanups: (() => void)[] = [];
  afterEach(() => {
    for (const cleanup of cleanups.splice(0)) cleanup();
  });

  function files(tag: string) {
    const id = `${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
    const paths = { memoryPaths: [`/dev/shm/gangway-test-${tag}-${id}`], trackReportPath: join(tmpdir(), `gangway-test-${id}.track`), logPath: join(tmpdir(), `gangway-test-${id}.log`) };
    cleanups.push(() => [...paths.memoryPaths, paths.trackReportPath, paths.logPath].forEach((path) => rmSync(path, { force: true })));
    return paths;
  }

  it('uffd-wp and hash-scan find the same pages for the same content-changing writes', async () => {
    const bytes = 256 * PAGE;
    const { memoryPaths, trackReportPath } = files('poke');
    const memoryPath = memoryPaths[0]!;
    const poker = await startPoker(memoryPath, trackReportPath, bytes);
    cleanups.push(() => poker.child.kill('SIGKILL'));
    expect(readFileSync(trackReportPath, 'utf8')).toMatch(/^ok /);
    const uffd = UffdWpTracker.open(poker.child.pid!, trackReportPath, bytes, PAGE);
    const hash = await HashScanTracker.open(memoryPath, bytes, PAGE);
    cleanups.push(() => (uffd.close(), hash.close()));
    await uffd.arm();
    await hash.arm();

    for (const [page, value] of [[3, 1], [7, 2], [8, 3], [40, 4], [255, 9], [0, 7]]) await poker.command(`fill ${page} ${value}`);
    await poker.command('read 100');
    const first = { uffd: pages(await uffd.collect(), 256), hash: pages(await hash.collect(), 256) };
    expect(first.uffd).toEqual([0, 3, 7, 8, 40, 255]);
    expect(first.hash).toEqual(first.uffd);

    // hash-scan compares with what was sent; tell it the pages were sent as they are now.
    const sendAsIs = (sent: number[]) => {
      const memory = readFileSync(memoryPath);
      for (const page of sent) hash.noteSent(Uint32Array.of(2, page, 1), 1, memory.subarray(page * PAGE, (page + 1) * PAGE));
    };
    sendAsIs(first.hash);
    await poker.command('fill 7 5');
    await poker.command('fill 50 6');
    const second = { uffd: pages(await uffd.collect(), 256), hash: pages(await hash.collect(), 256) };
    expect(second.uffd).toEqual([7, 50]);
    expect(second.hash).toEqual([7, 50]);
    sendAsIs(second.hash);

    // A write that leaves the bytes as they were: uffd-wp sees the write, hash-scan no change.
    await poker.command('touch 50');
    expect(pages(await uffd.collect(), 256)).toEqual([50]);
    expect(pages(await hash.collect(), 256)).toEqual([]);
  });

  it('on a running guest, uffd-wp reports every page whose content changed (and maybe more)', async () => {
    const memoryBytes = 32 * 1024 * 1024;
    const paths = files('run');
    const launched = launchProcessGuest({
      name: 'run',
      files: paths,
      create: { memoryBytes, profile: 'os-image', dirtyRateBytesPerSec: 16 * 1024 * 1024, seed: 3, imageSeed: 0, sharedFraction: 0, hotFraction: 0.25 },
    });
    cleanups.push(() => {
      try {
        process.kill(launched.pid, 'SIGKILL');
      } catch {}
    });
    await launched.running;
    const guest = new ProcessGuest('t', launched.pid, memoryBytes, paths);
    const { trackers: [uffd] } = await guest.openTrackers('uffd-wp');
    if (!uffd) throw new Error('no tracker');
    const hash = await HashScanTracker.open(paths.memoryPaths[0]!, memoryBytes, PAGE);
    cleanups.push(() => (uffd.close(), hash.close()));
    for (let round = 0; round < 3; round++) {
      guest.resume();
      await uffd.arm();
      await hash.arm();
      await new Promise((resolve) => setTimeout(resolve, 300));
      await guest.pause();
      const byUffd = new Set(pages(await uffd.collect(), memoryBytes / PAGE));
      const byHash = pages(await hash.collect(), memoryBytes / PAGE);
      expect(byHash.length).toBeGreaterThan(100);
      expect(byHash.filter((page) => !byUffd.has(page))).toEqual([]);
    }
  });
});
