// Post-copy primitives end to end: the tracking shim in a poke process registers its mapping
// for MISSING faults and sends the userfaultfd over a socket pair; the addon receives it,
// reads the faults on its thread and installs pages with UFFDIO_COPY / UFFDIO_ZEROPAGE.
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, ftruncateSync, mkdtempSync, openSync, readFileSync, readlinkSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ENTRY_DATA, ENTRY_ZERO, guestBinaryPath, loadNative, trackShimPath, type MonitorHandle } from '../../agent/native.js';
import { missingPagesOf } from '../../agent/migration/postcopy-takeover.js';
import { parseShimReport } from '../../agent/tracker/uffd-wp.js';
import { waitFor } from '../helpers/wait.js';

const PAGE = 4096;
const PAGES = 64;
const native = loadNative();
const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const cleanup of cleanups.splice(0).reverse()) {
    try {
      cleanup();
    } catch {}
  }
});

interface Poker {
  child: ChildProcess;
  send(command: string): void;
  /** Lines answered so far. */
  lines(): string[];
  running(): boolean;
  dir: string;
  memoryPath: string;
  reportPath: string;
}

/** A poke process on a sparse file of PAGES pages, its mapping handed over for post-copy. */
function startPoker(guestFdValue?: string): { poker: Poker; agentFd: number; fd: number } {
  const dir = mkdtempSync('/dev/shm/gangway-test-postcopy-');
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const memoryPath = join(dir, 'memory');
  const reportPath = join(dir, 'track');
  const fd = openSync(memoryPath, 'w+');
  cleanups.push(() => closeSync(fd));
  // Page 0 present, the rest holes.
  writeSync(fd, Buffer.alloc(PAGE, 0x11), 0, PAGE, 0);
  ftruncateSync(fd, PAGES * PAGE);
  const [agentFd, guestFd] = native.socketPair();
  cleanups.push(() => closeSync(agentFd));
  const child = spawn(guestBinaryPath, ['poke', '--memory-file', memoryPath, '--memory-bytes', String(PAGES * PAGE)], {
    stdio: ['pipe', 'pipe', 'pipe', guestFd],
    env: {
      ...process.env,
      LD_PRELOAD: trackShimPath,
      GANGWAY_TRACK_PATH: memoryPath,
      GANGWAY_TRACK_REPORT: reportPath,
      GANGWAY_UFFD_SOCKET: guestFdValue ?? '3',
    },
  });
  closeSync(guestFd);
  cleanups.push(() => child.kill('SIGKILL'));
  let out = '';
  child.stdout!.on('data', (data: Buffer) => (out += data.toString()));
  const running = () => out.includes('running');
  child.stderr!.on('data', () => {});
  return {
    poker: {
      child,
      send: (command) => child.stdin!.write(`${command}\n`),
      lines: () => out.split('\n').filter((line) => line.startsWith('ok')),
      running,
      dir,
      memoryPath,
      reportPath,
    },
    agentFd,
    fd,
  };
}

describe.skipIf(!existsSync(trackShimPath) || process.getuid?.() !== 0)('post-copy userfaultfd (needs root)', () => {
  it('hands the uffd over, reports first touches of holes only, and installs pages once', async () => {
    const { poker, agentFd, fd } = startPoker();
    const got = await native.uffdReceive(agentFd, 10_000);
    cleanups.push(() => closeSync(got.uffd));
    expect(got.length).toBe(PAGES * PAGE);
    expect(got.pid).toBe(poker.child.pid);
    expect(readFileSync(poker.reportPath, 'utf8')).toMatch(/^ok .*postcopy=1/);

    const faults: number[] = [];
    const monitor: MonitorHandle = native.uffdMonitor(got.uffd, got.start, PAGE, PAGES, (pages) => {
      if (pages) faults.push(...pages);
    });
    cleanups.push(() => native.uffdMonitorClose(monitor));
    const region = native.regionMap(fd, PAGES * PAGE, PAGE, { writable: true, trackHashes: true, initiallyZero: true });
    cleanups.push(() => native.regionClose(region));
    const out = new Uint32Array(2);

    await waitFor('running', () => poker.running());
    // Page 0 is in the file: no fault.
    poker.send('byte 0');
    await waitFor('answer for page 0', () => poker.lines().length === 1);
    expect(poker.lines()[0]).toBe('ok 17');
    expect(faults).toEqual([]);

    // Page 5 is a hole: the read blocks on a fault until the page is installed.
    poker.send('byte 5');
    await waitFor('fault on page 5', () => faults.length === 1);
    expect(faults).toEqual([5]);
    expect(poker.lines().length).toBe(1);
    const page5 = Buffer.alloc(PAGE, 0x55);
    native.uffdInstall(got.uffd, got.start, region, Uint32Array.of(ENTRY_DATA, 5, 1), 1, page5, out);
    expect([...out]).toEqual([1, 0]);
    await waitFor('answer for page 5', () => poker.lines().length === 2);
    expect(poker.lines()[1]).toBe('ok 85');

    // The guest writes page 5; a late duplicate of it must not overwrite that.
    poker.send('fill 5 99');
    await waitFor('fill', () => poker.lines().length === 3);
    native.uffdInstall(got.uffd, got.start, region, Uint32Array.of(ENTRY_DATA, 5, 1), 1, page5, out);
    expect([...out]).toEqual([0, 1]);
    poker.send('byte 5');
    await waitFor('answer', () => poker.lines().length === 4);
    expect(poker.lines()[3]).toBe('ok 99');

    // A push ahead of the guest: pages 6..9 data, 10..19 zero, in one call; then no faults there.
    const pushed = Buffer.alloc(4 * PAGE, 0x66);
    native.uffdInstall(got.uffd, got.start, region, Uint32Array.of(ENTRY_DATA, 6, 4, ENTRY_ZERO, 10, 10), 2, pushed, out);
    expect([...out]).toEqual([14, 0]);
    poker.send('byte 7');
    poker.send('byte 12');
    await waitFor('answers', () => poker.lines().length === 6);
    expect(poker.lines().slice(4)).toEqual(['ok 102', 'ok 0']);
    expect(faults).toEqual([5]);

    // The tracked fingerprints are those of the pages as installed, not as the guest changed
    // them since, and of no page not installed (page 0 came with the file).
    const fps = Buffer.concat(
      Array.from({ length: PAGES }, (_, page) =>
        native.hash128(Buffer.alloc(PAGE, page === 5 ? 0x55 : page >= 6 && page <= 9 ? 0x66 : 0)),
      ),
    );
    expect(await native.regionDigest(region, 'tracked')).toEqual(native.hash128(fps));

    // Bad entries are refused before anything is installed.
    expect(() => native.uffdInstall(got.uffd, got.start, region, Uint32Array.of(ENTRY_DATA, 63, 2), 1, Buffer.alloc(2 * PAGE), out)).toThrow(/outside the region/);
    expect(() => native.uffdInstall(got.uffd, got.start, region, Uint32Array.of(ENTRY_DATA, 30, 1), 1, Buffer.alloc(2 * PAGE), out)).toThrow(/payload/);
    expect(() => native.uffdInstall(got.uffd, got.start, region, Uint32Array.of(3, 30, 1), 1, Buffer.alloc(0), out)).toThrow(/unknown kind/);
  });

  it('an agent that died takes the uffd back from the guest (the fd its report names): the fault waiting is read, installed pages are data in the file, the fingerprints kept in their file', async () => {
    const { poker, agentFd, fd } = startPoker();
    const got = await native.uffdReceive(agentFd, 10_000);
    const fingerprintsPath = join(poker.dir, 'fingerprints');
    const fingerprintsFd = openSync(fingerprintsPath, 'w+');
    cleanups.push(() => closeSync(fingerprintsFd));
    ftruncateSync(fingerprintsFd, PAGES * 16);
    const region = native.regionMap(fd, PAGES * PAGE, PAGE, { writable: true, trackHashes: true, initiallyZero: true, fingerprintsFd });
    const out = new Uint32Array(2);
    // The first agent installs a data page (5) and a zero page (7), then dies: its copy of the uffd and its mapping go.
    native.uffdInstall(got.uffd, got.start, region, Uint32Array.of(ENTRY_DATA, 5, 1, ENTRY_ZERO, 7, 1), 2, Buffer.alloc(PAGE, 0x55), out);
    expect([...out]).toEqual([2, 0]);
    const digestBefore = await native.regionDigest(region, 'tracked');
    native.regionClose(region);
    closeSync(got.uffd);

    // No one reads the uffd: the guest's touch of a hole waits in the kernel's queue.
    await waitFor('running', () => poker.running());
    poker.send('byte 9');
    await new Promise((resolve) => setTimeout(resolve, 200));
    expect(poker.lines()).toEqual([]);

    const report = parseShimReport(readFileSync(poker.reportPath, 'utf8'));
    expect(report.uffdFd).toBeGreaterThanOrEqual(0);
    const uffd = native.pidfdGetfd(poker.child.pid!, report.uffdFd!);
    cleanups.push(() => closeSync(uffd));
    expect(readlinkSync(`/proc/self/fd/${uffd}`)).toBe('anon_inode:[userfaultfd]');
    // The missing pages, from the file alone: page 0 was there, 5 and 7 were installed.
    expect([...missingPagesOf(native, fd, PAGE, PAGES)]).toEqual([1, 4, 6, 1, 8, PAGES - 8]);
    const faults: number[] = [];
    const monitor = native.uffdMonitor(uffd, Number(report.startAddress), PAGE, PAGES, (pages) => {
      if (pages) faults.push(...pages);
    });
    cleanups.push(() => native.uffdMonitorClose(monitor));
    await waitFor('the fault that waited', () => faults.length === 1);
    expect(faults).toEqual([9]);
    // The fingerprints of what arrived, as the dead agent kept them.
    const again = native.regionMap(fd, PAGES * PAGE, PAGE, { writable: true, trackHashes: true, initiallyZero: false, fingerprintsFd, keepFingerprints: true });
    cleanups.push(() => native.regionClose(again));
    expect((await native.regionDigest(again, 'tracked')).equals(digestBefore)).toBe(true);
    native.uffdInstall(uffd, Number(report.startAddress), again, Uint32Array.of(ENTRY_DATA, 9, 1), 1, Buffer.alloc(PAGE, 0x99), out);
    expect([...out]).toEqual([1, 0]);
    await waitFor('answer for page 9', () => poker.lines().length === 1);
    expect(poker.lines()[0]).toBe('ok 153');
    expect([...missingPagesOf(native, fd, PAGE, PAGES)]).toEqual([1, 4, 6, 1, 8, 1, 10, PAGES - 10]);
  });

  it('pidfdGetfd says which process or descriptor it could not take', () => {
    expect(() => native.pidfdGetfd(process.pid, 1_000_000)).toThrow(/pidfd_getfd\(pid \d+, fd 1000000\) failed/);
    expect(() => native.pidfdGetfd(0, 1)).toThrow(/pid/);
  });

  it('punchHoles turns written pages back into missing ones', async () => {
    const { poker, agentFd, fd } = startPoker();
    const got = await native.uffdReceive(agentFd, 10_000);
    cleanups.push(() => closeSync(got.uffd));
    const faults: number[] = [];
    const monitor = native.uffdMonitor(got.uffd, got.start, PAGE, PAGES, (pages) => pages && faults.push(...pages));
    cleanups.push(() => native.uffdMonitorClose(monitor));
    // Page 0 was written before the guest mapped it; punched, its next first touch faults.
    // (The poke process has not touched it yet, so its page table holds nothing for it.)
    native.punchHoles(fd, Uint32Array.of(0, 1), PAGE);
    poker.send('byte 0');
    await waitFor('fault on page 0', () => faults.length === 1);
    expect(faults).toEqual([0]);
    const region = native.regionMap(fd, PAGES * PAGE, PAGE, { writable: true, trackHashes: true, initiallyZero: true });
    cleanups.push(() => native.regionClose(region));
    native.uffdInstall(got.uffd, got.start, region, Uint32Array.of(ENTRY_ZERO, 0, 1), 1, new Uint8Array(0), new Uint32Array(2));
    await waitFor('answer', () => poker.lines().length === 1);
    expect(poker.lines()[0]).toBe('ok 0');
  });

  it('the guest cannot map its memory when the post-copy socket is not usable', async () => {
    const { poker } = startPoker('77');
    const code = await new Promise<number | null>((resolve) => poker.child.once('exit', (c) => resolve(c)));
    expect(code).not.toBe(0);
    expect(readFileSync(poker.reportPath, 'utf8')).toMatch(/^error stage=send/);
  });

  it('uffdReceive fails clearly when the guest never sends', async () => {
    const [agentFd, guestFd] = native.socketPair();
    cleanups.push(() => closeSync(agentFd));
    await expect(native.uffdReceive(agentFd, 50)).rejects.toThrow(/sent no userfaultfd in time/);
    closeSync(guestFd);
    await expect(native.uffdReceive(agentFd, 1000)).rejects.toThrow(/closed the socket/);
  });
});

describe('regionMap with its fingerprints in a file', () => {
  it('refuses what cannot hold them, naming the option', () => {
    const dir = mkdtempSync('/dev/shm/gangway-test-fingerprints-');
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const fd = openSync(join(dir, 'memory'), 'w+');
    cleanups.push(() => closeSync(fd));
    ftruncateSync(fd, PAGES * PAGE);
    const short = openSync(join(dir, 'fingerprints'), 'w+');
    cleanups.push(() => closeSync(short));
    ftruncateSync(short, PAGES * 16 - 1);
    const options = { writable: true, trackHashes: true, initiallyZero: true };
    expect(() => native.regionMap(fd, PAGES * PAGE, PAGE, { ...options, trackHashes: false, fingerprintsFd: short })).toThrow(/options.fingerprintsFd is for a region with trackHashes/);
    expect(() => native.regionMap(fd, PAGES * PAGE, PAGE, { ...options, initiallyZero: false, keepFingerprints: true })).toThrow(/keepFingerprints needs options.fingerprintsFd/);
    expect(() => native.regionMap(fd, PAGES * PAGE, PAGE, { ...options, fingerprintsFd: short })).toThrow(/16 bytes per page/);
  });
});
