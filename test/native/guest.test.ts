// gangway-guest, the synthetic guest: its whole state is its memory file, so a copy of the
// file taken while it is stopped is a copy of the guest, and a guest resumed on the copy
// checks every page. These tests drive the built binary and read its header with fs.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import {
  closeSync,
  copyFileSync,
  existsSync,
  openSync,
  readFileSync,
  readSync,
  statSync,
  unlinkSync,
  writeSync,
} from 'node:fs';
import { compressSync } from 'lz4-napi';
import { afterEach, describe, expect, it } from 'vitest';
import { processState } from '../../agent/guest/process-guest.js';
import { waitFor } from '../helpers/wait.js';
import { guestBinaryPath } from '../../agent/native.js';

const guestBin = guestBinaryPath;
const PAGE = 4096;
const MiB = 1 << 20;
const NO_INFLIGHT = 0xffffffffffffffffn;

interface Header {
  magic: string;
  layoutVersion: number;
  pageSize: number;
  memoryBytes: number;
  pageCount: number;
  seed: number;
  imageSeed: number;
  sharedPermille: number;
  hotPermille: number;
  profile: number;
  firstDataPage: number;
  dirtyRate: number;
  totalWrites: number;
  passes: number;
  passCursor: number;
  stalePages: number;
  checkedPages: number;
  inflightPage: bigint;
  inflightVersion: number;
  resumes: number;
  resumeStalePages: number;
  resumeCheckedPages: number;
  resumeCheckDone: number;
  metaErrors: number;
  hotPageCount: number;
  passesAtResume: number;
  regionCount: number;
  deviceLoads: number;
  deviceSaves: number;
  deviceErrors: number;
  regionBytes: number[];
}

function parseHeader(b: Buffer): Header {
  const u64 = (o: number) => Number(b.readBigUInt64LE(o));
  return {
    magic: b.toString('latin1', 0, 8),
    layoutVersion: b.readUInt32LE(8),
    pageSize: b.readUInt32LE(12),
    memoryBytes: u64(16),
    pageCount: u64(24),
    seed: u64(32),
    imageSeed: u64(40),
    sharedPermille: b.readUInt32LE(48),
    hotPermille: b.readUInt32LE(52),
    profile: b.readUInt32LE(56),
    firstDataPage: b.readUInt32LE(60),
    dirtyRate: u64(64),
    totalWrites: u64(72),
    passes: u64(80),
    passCursor: u64(88),
    stalePages: u64(96),
    checkedPages: u64(104),
    inflightPage: b.readBigUInt64LE(112),
    inflightVersion: b.readUInt32LE(120),
    resumes: b.readUInt32LE(124),
    resumeStalePages: u64(128),
    resumeCheckedPages: u64(136),
    resumeCheckDone: b.readUInt32LE(144),
    metaErrors: b.readUInt32LE(148),
    hotPageCount: u64(152),
    passesAtResume: u64(160),
    regionCount: b.readUInt32LE(168),
    deviceLoads: b.readUInt32LE(172),
    deviceSaves: u64(176),
    deviceErrors: b.readUInt32LE(192),
    regionBytes: Array.from({ length: 16 }, (_, r) => u64(200 + 8 * r)).filter((n) => n > 0),
  };
}

function readHeader(path: string): Header {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(328);
    readSync(fd, b, 0, 328, 0);
    return parseHeader(b);
  } finally {
    closeSync(fd);
  }
}

/** Patches bytes of a (stopped or exited) guest's file in place. */
function patchFile(path: string, offset: number, bytes: Buffer): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

function u64le(v: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(v);
  return b;
}

function u32le(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v);
  return b;
}

function versionOf(file: Buffer, page: number): number {
  return file.readUInt32LE(PAGE + 4 * page);
}

function versionSum(file: Buffer, h: Header): number {
  let sum = 0;
  for (let p = h.firstDataPage; p < h.pageCount; p++) sum += versionOf(file, p);
  return sum;
}

function isZeroPage(file: Buffer, page: number): boolean {
  const view = file.subarray(page * PAGE, (page + 1) * PAGE);
  for (let i = 0; i < PAGE; i += 8) if (view.readBigUInt64LE(i) !== 0n) return false;
  return true;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// Everything a test starts or creates, released in afterEach even when the test fails.
const startedPids = new Set<number>();
const createdFiles = new Set<string>();

function shmPath(): string {
  const path = `/dev/shm/gangway-test-${randomBytes(6).toString('hex')}`;
  createdFiles.add(path);
  return path;
}

interface Guest {
  child: ChildProcess;
  pid: number;
  out(): string;
  err(): string;
  running: Promise<void>;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

function startGuest(args: string[], options: { standbyPipe?: boolean; stdinPipe?: boolean } = {}): Guest {
  const stdin = options.stdinPipe ? 'pipe' : 'ignore';
  const child = spawn(guestBin, args, {
    stdio: options.standbyPipe ? [stdin, 'pipe', 'pipe', 'pipe'] : [stdin, 'pipe', 'pipe'],
  });
  if (child.pid === undefined) throw new Error('spawn failed');
  startedPids.add(child.pid);
  let out = '';
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((res) =>
    child.once('exit', (code, signal) => res({ code, signal })),
  );
  const running = new Promise<void>((res, rej) => {
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      if (/^running pid=\d+ mono_ns=\d+\n/.test(out)) res();
    });
    void exit.then(({ code, signal }) => rej(new Error(`guest exited (${signal ?? code}) before running: ${err}`)));
  });
  running.catch(() => {});
  return { child, pid: child.pid, out: () => out, err: () => err, running, exit };
}

async function stopGuest(g: Guest): Promise<number | null> {
  process.kill(g.pid, 'SIGTERM');
  process.kill(g.pid, 'SIGCONT'); // a stopped process only acts on SIGTERM once continued
  const { code } = await g.exit;
  startedPids.delete(g.pid);
  return code;
}

async function pause(g: Guest): Promise<void> {
  process.kill(g.pid, 'SIGSTOP');
  await waitFor('SIGSTOP to take effect', () => processState(g.pid) === 'T');
}

/** Creates a guest file (the guest exits right after printing `running`). */
async function createGuestFile(path: string, args: string[]): Promise<Buffer> {
  const g = startGuest(['run', '--memory-file', path, '--create', ...args]);
  await g.running;
  expect(await stopGuest(g)).toBe(0);
  return readFileSync(path);
}

function pageHashes(file: Buffer, h: Header): { nonZero: string[]; set: Set<string> } {
  const nonZero: string[] = [];
  for (let p = h.firstDataPage; p < h.pageCount; p++) {
    if (isZeroPage(file, p)) continue;
    nonZero.push(createHash('sha1').update(file.subarray(p * PAGE, (p + 1) * PAGE)).digest('hex'));
  }
  return { nonZero, set: new Set(nonZero) };
}

afterEach(() => {
  for (const pid of startedPids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  startedPids.clear();
  for (const path of createdFiles) {
    for (const p of [path, `${path}.copy`, `${path}.copy2`, `${path}.dev`, `${path}.dev1`, `${path}.dev2`, `${path}.tmp`]) {
      try {
        unlinkSync(p);
      } catch {
        // never created
      }
    }
  }
  createdFiles.clear();
});

const built = existsSync(guestBin);

describe.skipIf(!built)(built ? 'gangway-guest' : `gangway-guest (skipped: ${guestBin} is not built; run node native/build.mjs)`, () => {
  it('creates a guest with the documented header and writes at the dirty rate', async () => {
    const path = shmPath();
    const rate = 8 * MiB;
    const g = startGuest([
      'run', '--memory-file', path, '--create', '--memory-bytes', String(16 * MiB),
      '--profile', 'os-image', '--seed', '42', '--hot', '0.25', '--dirty-rate', String(rate),
    ]);
    await g.running;
    expect(g.out()).toMatch(new RegExp(`^running pid=${g.pid} mono_ns=\\d+\n$`));
    const h0 = readHeader(path);
    expect(h0).toMatchObject({
      magic: 'GWGUEST1',
      layoutVersion: 2,
      regionCount: 1,
      regionBytes: [16 * MiB],
      pageSize: PAGE,
      memoryBytes: 16 * MiB,
      pageCount: 4096,
      seed: 42,
      hotPermille: 250,
      profile: 2,
      firstDataPage: 5, // header + 4 pages of u32 versions for 4096 pages
      dirtyRate: rate,
      resumes: 0,
      metaErrors: 0,
    });
    const dataPages = 4096 - 5;
    expect(h0.hotPageCount).toBeGreaterThan(dataPages * 0.2);
    expect(h0.hotPageCount).toBeLessThan(dataPages * 0.3);

    await sleep(200);
    const a = readHeader(path);
    const t0 = performance.now();
    await sleep(1000);
    const b = readHeader(path);
    const seconds = (performance.now() - t0) / 1000;
    const pagesPerSec = (b.totalWrites - a.totalWrites) / seconds;
    expect(pagesPerSec).toBeGreaterThan((rate / PAGE) * 0.8);
    expect(pagesPerSec).toBeLessThan((rate / PAGE) * 1.2);
    // ~2048 writes/s over ~1000 hot pages: about two passes a second
    expect(b.passes).toBeGreaterThanOrEqual(2);
    expect(b.stalePages).toBe(0);
    expect(b.checkedPages - b.totalWrites).toBeGreaterThanOrEqual(0);
    expect(b.checkedPages - b.totalWrites).toBeLessThanOrEqual(1);

    await pause(g);
    const file = readFileSync(path);
    const h = parseHeader(file);
    // A stopped guest's file is self-consistent: the version table sums to total_writes
    // (give or take the one write in flight).
    const sum = versionSum(file, h);
    if (h.inflightPage === NO_INFLIGHT) expect(sum).toBe(h.totalWrites);
    else expect(sum - h.totalWrites).toBeGreaterThanOrEqual(0);
    expect(h.metaErrors).toBe(0);
    expect(await stopGuest(g)).toBe(0);
    expect(readHeader(path).inflightPage).toBe(NO_INFLIGHT);
  });

  it('does not burst at start and keeps the rate smooth', async () => {
    const path = shmPath();
    const rate = 4 * MiB; // 1024 pages/s
    const g = startGuest([
      'run', '--memory-file', path, '--create', '--memory-bytes', String(8 * MiB), '--dirty-rate', String(rate),
    ]);
    await g.running;
    const t0 = performance.now();
    const early = readHeader(path).totalWrites;
    expect(early).toBeLessThanOrEqual(16); // at most 64 KiB right at the start
    const samples: number[] = [];
    for (let i = 0; i < 10; i++) {
      await sleep(50);
      samples.push(readHeader(path).totalWrites);
    }
    const elapsed = (performance.now() - t0) / 1000;
    const last = samples[samples.length - 1]!;
    expect(last).toBeGreaterThan((rate / PAGE) * elapsed * 0.75);
    expect(last).toBeLessThan((rate / PAGE) * elapsed * 1.25 + 16);
    expect(await stopGuest(g)).toBe(0);
  });

  it('resumes on a copy taken while stopped, checks every page and carries on', async () => {
    const path = shmPath();
    const g = startGuest([
      'run', '--memory-file', path, '--create', '--memory-bytes', String(16 * MiB),
      '--seed', '7', '--hot', '0.1', '--dirty-rate', String(16 * MiB),
    ]);
    await g.running;
    let current = g;
    let currentPath = path;
    // Two hops: original -> copy -> copy of the copy; each stop lands at an arbitrary point.
    for (const [hop, next] of [[1, `${path}.copy`], [2, `${path}.copy2`]] as const) {
      await sleep(300);
      await pause(current);
      copyFileSync(currentPath, next);
      const atCopy = readHeader(next);
      expect(await stopGuest(current)).toBe(0);

      const r = startGuest(['run', '--memory-file', next]);
      await r.running;
      expect(r.out()).toMatch(new RegExp(`^running pid=${r.pid} mono_ns=\\d+\n$`));
      const h = await waitFor('resume check', () => {
        const x = readHeader(next);
        return x.resumeCheckDone === x.resumes && x;
      });
      expect(h.resumes).toBe(hop);
      expect(h.resumeStalePages).toBe(0);
      expect(h.resumeCheckedPages).toBe(h.pageCount - h.firstDataPage);
      expect(h.stalePages).toBe(0);
      expect(h.metaErrors).toBe(0);
      expect(h.passesAtResume).toBeGreaterThanOrEqual(atCopy.passes);
      expect(h.passesAtResume).toBeLessThanOrEqual(atCopy.passes + 1);
      expect(h.dirtyRate).toBe(16 * MiB); // from the file
      const later = await waitFor('passes to increase', () => {
        const x = readHeader(next);
        return x.passes >= h.passesAtResume + 2 && x;
      });
      expect(later.stalePages).toBe(0);
      expect(later.metaErrors).toBe(0);
      current = r;
      currentPath = next;
    }
    expect(await stopGuest(current)).toBe(0);
  });

  describe('completes a write that a stop interrupted', () => {
    // A write goes: inflight set, page rewritten, version stored, total_writes++, inflight
    // cleared. Each case below is a file stopped at one of those points, with the page half
    // rewritten; the resumed guest must finish the write exactly once.
    const cases = [
      { name: 'before the version was stored', versionStored: false, totalCounted: false },
      { name: 'after the version, before the count', versionStored: true, totalCounted: false },
      { name: 'after the count, before clearing in-flight', versionStored: true, totalCounted: true },
    ];
    for (const c of cases) {
      it(c.name, async () => {
        const path = shmPath();
        await createGuestFile(path, ['--memory-bytes', String(8 * MiB), '--hot', '0.5']);
        const h = readHeader(path);
        const page = h.firstDataPage + 10;
        patchFile(path, 120, u32le(1)); // inflight_version
        patchFile(path, 112, u64le(BigInt(page))); // inflight_page
        patchFile(path, page * PAGE, randomBytes(PAGE / 2));
        if (c.versionStored) patchFile(path, PAGE + 4 * page, u32le(1));
        if (c.totalCounted) patchFile(path, 72, u64le(1n));

        const r = startGuest(['run', '--memory-file', path, '--dirty-rate', '0']);
        await r.running;
        const after = await waitFor('resume check', () => {
          const x = readHeader(path);
          return x.resumeCheckDone === x.resumes && x;
        });
        expect(after.inflightPage).toBe(NO_INFLIGHT);
        expect(after.totalWrites).toBe(1);
        expect(after.passCursor).toBe(1);
        expect(after.resumeStalePages).toBe(0);
        expect(after.metaErrors).toBe(0);
        expect(after.dirtyRate).toBe(0);
        expect(versionOf(readFileSync(path), page)).toBe(1);
        expect(await stopGuest(r)).toBe(0);
      });
    }
  });

  it('finds stale pages in a copy with a corrupted page', async () => {
    const path = shmPath();
    const g = startGuest([
      'run', '--memory-file', path, '--create', '--memory-bytes', String(8 * MiB), '--hot', '0.05',
      '--dirty-rate', String(8 * MiB),
    ]);
    await g.running;
    await sleep(200);
    await pause(g);
    const copy = `${path}.copy`;
    copyFileSync(path, copy);
    expect(await stopGuest(g)).toBe(0);
    // Flip one byte of a page the guest has rewritten (a hot page).
    const file = readFileSync(copy);
    const h = parseHeader(file);
    let victim = -1;
    for (let p = h.firstDataPage; p < h.pageCount && victim < 0; p++) if (versionOf(file, p) > 0) victim = p;
    expect(victim).toBeGreaterThan(0);
    const offset = victim * PAGE + 1234;
    patchFile(copy, offset, Buffer.from([file[offset]! ^ 0x5a]));

    const r = startGuest(['run', '--memory-file', copy]);
    await r.running;
    const after = await waitFor('resume check', () => {
      const x = readHeader(copy);
      return x.resumeCheckDone === x.resumes && x;
    });
    expect(after.resumeStalePages).toBe(1);
    expect(after.stalePages).toBeGreaterThanOrEqual(1);
    expect(await stopGuest(r)).toBe(0);
  });

  it('finds stale pages in a copy taken while the guest was running', async () => {
    const path = shmPath();
    const g = startGuest([
      'run', '--memory-file', path, '--create', '--memory-bytes', String(16 * MiB), '--hot', '0.02',
      '--dirty-rate', String(256 * MiB),
    ]);
    await g.running;
    await sleep(100);
    const copy = `${path}.copy`;
    let stale = 0;
    // The version table is copied before the data pages, so pages rewritten during the
    // copy no longer match their recorded versions; a few attempts rule out a lucky copy.
    for (let attempt = 0; attempt < 5 && stale === 0; attempt++) {
      copyFileSync(path, copy);
      const r = startGuest(['run', '--memory-file', copy, '--dirty-rate', '0']);
      await r.running;
      const after = await waitFor('resume check', () => {
        const x = readHeader(copy);
        return x.resumeCheckDone === x.resumes && x;
      });
      stale = after.resumeStalePages;
      expect(await stopGuest(r)).toBe(0);
    }
    expect(stale).toBeGreaterThan(0);
    expect(await stopGuest(g)).toBe(0);
  });

  describe('hot standby (--standby-fd)', () => {
    it('exits 0 on EOF without touching an existing file', async () => {
      const path = shmPath();
      const before = await createGuestFile(path, ['--memory-bytes', String(8 * MiB), '--dirty-rate', '1000000']);
      const mtime = statSync(path).mtimeMs;
      const s = startGuest(['run', '--memory-file', path, '--standby-fd', '3'], { standbyPipe: true });
      await sleep(200);
      expect(processState(s.pid)).toBe('S'); // blocked in read
      expect(s.out()).toBe('');
      (s.child.stdio[3] as NodeJS.WritableStream).end();
      const { code } = await s.exit;
      expect(code).toBe(0);
      expect(s.out()).toBe('');
      expect(statSync(path).mtimeMs).toBe(mtime);
      expect(readFileSync(path).equals(before)).toBe(true);
    });

    it('creates nothing on EOF with --create', async () => {
      const path = shmPath();
      const s = startGuest(
        ['run', '--memory-file', path, '--create', '--memory-bytes', String(8 * MiB), '--standby-fd', '3'],
        { standbyPipe: true },
      );
      await sleep(100);
      (s.child.stdio[3] as NodeJS.WritableStream).end();
      expect((await s.exit).code).toBe(0);
      expect(existsSync(path)).toBe(false);
    });

    it('resumes on one byte', async () => {
      const path = shmPath();
      await createGuestFile(path, ['--memory-bytes', String(8 * MiB)]);
      const s = startGuest(['run', '--memory-file', path, '--standby-fd', '3', '--dirty-rate', String(MiB)], {
        standbyPipe: true,
      });
      await sleep(100);
      expect(s.out()).toBe('');
      (s.child.stdio[3] as NodeJS.WritableStream).write(Buffer.from([1]));
      await s.running;
      const h = await waitFor('resume check', () => {
        const x = readHeader(path);
        return x.resumeCheckDone === 1 && x;
      });
      expect(h.resumes).toBe(1);
      expect(h.resumeStalePages).toBe(0);
      expect(h.dirtyRate).toBe(MiB);
      await waitFor('writes', () => readHeader(path).totalWrites > 10);
      expect(await stopGuest(s)).toBe(0);
    });
  });

  describe('command line', () => {
    const file = '/dev/shm/gangway-test-never-created';
    const usageErrors: [string[], string[]][] = [
      [['run'], ['--memory-file']],
      [['run', '--memory-file', file, '--create'], ['--memory-bytes']],
      [['run', '--memory-file', file, '--create', '--memory-bytes', '1000'], ['--memory-bytes', '1000', '4096']],
      [['run', '--memory-file', file, '--create', '--memory-bytes', '32768'], ['--memory-bytes', '32768']],
      [['run', '--memory-file', file, '--create', '--memory-bytes', '2199023255552'], ['--memory-bytes']],
      [['run', '--memory-file', file, '--create', '--memory-bytes', '8MiB'], ['--memory-bytes', '8MiB']],
      [['run', '--memory-file', file, '--create', '--memory-bytes', '65536', '--profile', 'banana'], ['--profile', 'banana', 'os-image']],
      [['run', '--memory-file', file, '--create', '--memory-bytes', '65536', '--hot', '1.5'], ['--hot', '1.5']],
      [['run', '--memory-file', file, '--create', '--memory-bytes', '65536', '--shared', 'abc'], ['--shared', 'abc']],
      [['run', '--memory-file', file, '--create', '--memory-bytes', '65536', '--seed', '-1'], ['--seed', '-1']],
      [['run', '--memory-file', file, '--dirty-rate', '10MiB'], ['--dirty-rate', '10MiB']],
      [['run', '--memory-file', file, '--frobnicate', '1'], ['--frobnicate']],
      [['run', '--memory-file', file, '--seed', '3'], ['--seed', '--create']],
      [['run', '--memory-file', file, '--profile', 'zero'], ['--profile', '--create']],
      [['run', '--memory-file', file, '--standby-fd', '999'], ['--standby-fd', '999']],
      [['run', '--memory-file'], ['--memory-file']],
      [['fly'], ['fly']],
      [['poke', '--memory-file', file], ['--memory-bytes']],
      [['poke', '--memory-file', file, '--memory-bytes', '65536', '--create'], ['--create']],
    ];
    for (const [args, words] of usageErrors) {
      it(`exits 2 for: ${args.join(' ')}`, () => {
        const r = spawnSync(guestBin, args, { encoding: 'utf8' });
        expect(r.status).toBe(2);
        for (const w of words) expect(r.stderr).toContain(w);
        expect(existsSync(file)).toBe(false);
      });
    }

    it('prints usage for --help', () => {
      const r = spawnSync(guestBin, ['--help'], { encoding: 'utf8' });
      expect(r.status).toBe(0);
      expect(r.stdout).toContain('gangway-guest run --memory-file PATH');
    });

    it('exits 3 for a missing, foreign or truncated memory file', async () => {
      const missing = spawnSync(guestBin, ['run', '--memory-file', file], { encoding: 'utf8' });
      expect(missing.status).toBe(3);
      expect(missing.stderr).toMatch(/No such file/);

      const foreign = shmPath();
      const fd = openSync(foreign, 'w');
      writeSync(fd, Buffer.alloc(64 * 1024));
      closeSync(fd);
      const bad = spawnSync(guestBin, ['run', '--memory-file', foreign], { encoding: 'utf8' });
      expect(bad.status).toBe(3);
      expect(bad.stderr).toContain('bad magic');

      const cut = shmPath();
      const image = await createGuestFile(cut, ['--memory-bytes', String(MiB)]);
      const fd2 = openSync(cut, 'w');
      writeSync(fd2, image.subarray(0, MiB / 2));
      closeSync(fd2);
      const truncated = spawnSync(guestBin, ['run', '--memory-file', cut], { encoding: 'utf8' });
      expect(truncated.status).toBe(3);
      expect(truncated.stderr).toContain('the file has 524288 bytes');
    });
  });

  describe('content profiles', () => {
    it('zero: mostly zero pages', async () => {
      const path = shmPath();
      const file = await createGuestFile(path, ['--memory-bytes', String(16 * MiB), '--profile', 'zero']);
      const h = parseHeader(file);
      let zero = 0;
      for (let p = h.firstDataPage; p < h.pageCount; p++) if (isZeroPage(file, p)) zero++;
      const fraction = zero / (h.pageCount - h.firstDataPage);
      expect(fraction).toBeGreaterThan(0.86);
      expect(fraction).toBeLessThan(0.94);
    });

    it('os-image: 20% zero pages, duplicates, and text that LZ4 halves', async () => {
      const path = shmPath();
      const file = await createGuestFile(path, ['--memory-bytes', String(16 * MiB), '--profile', 'os-image']);
      const h = parseHeader(file);
      const { nonZero, set } = pageHashes(file, h);
      const dataPages = h.pageCount - h.firstDataPage;
      expect(1 - nonZero.length / dataPages).toBeGreaterThan(0.16);
      expect(1 - nonZero.length / dataPages).toBeLessThan(0.24);
      // 10% of pages are copies of 16 common pages
      expect(nonZero.length - set.size).toBeGreaterThan(dataPages * 0.07);
      expect(nonZero.length - set.size).toBeLessThan(dataPages * 0.13);

      const sample: Buffer[] = [];
      for (let p = h.firstDataPage; p < h.pageCount && sample.length < 256; p++) {
        if (!isZeroPage(file, p)) sample.push(file.subarray(p * PAGE, (p + 1) * PAGE));
      }
      const mib = Buffer.concat(sample);
      expect(mib.length).toBe(MiB);
      const ratio = compressSync(mib).length / mib.length;
      expect(ratio).toBeGreaterThanOrEqual(0.35);
      expect(ratio).toBeLessThanOrEqual(0.65);
    });

    it('random: incompressible, no zero pages', async () => {
      const path = shmPath();
      const file = await createGuestFile(path, ['--memory-bytes', String(4 * MiB), '--profile', 'random']);
      const h = parseHeader(file);
      const { nonZero, set } = pageHashes(file, h);
      expect(nonZero.length).toBe(h.pageCount - h.firstDataPage);
      expect(set.size).toBe(nonZero.length);
      const mib = file.subarray(h.firstDataPage * PAGE, h.firstDataPage * PAGE + MiB);
      expect(compressSync(mib).length / MiB).toBeGreaterThan(0.99);
    });

    it('is deterministic: the same parameters give the same file', async () => {
      const a = shmPath();
      const b = shmPath();
      const args = ['--memory-bytes', String(4 * MiB), '--seed', '99', '--image-seed', '5', '--shared', '0.3'];
      expect((await createGuestFile(a, args)).equals(await createGuestFile(b, args))).toBe(true);
    });

    it('same image seed: about `shared` of the non-zero pages in common; different: almost none', async () => {
      const make = async (seed: number, imageSeed: number) => {
        const path = shmPath();
        const file = await createGuestFile(path, [
          '--memory-bytes', String(16 * MiB), '--seed', String(seed),
          '--image-seed', String(imageSeed), '--shared', '0.6',
        ]);
        return pageHashes(file, parseHeader(file));
      };
      const a = await make(11, 7);
      const b = await make(12, 7);
      const c = await make(13, 8);
      const sharedWith = (x: { nonZero: string[] }, y: { set: Set<string> }) =>
        x.nonZero.filter((hash) => y.set.has(hash)).length / x.nonZero.length;
      expect(sharedWith(a, b)).toBeGreaterThan(0.5);
      expect(sharedWith(a, b)).toBeLessThan(0.7);
      expect(sharedWith(b, a)).toBeGreaterThan(0.5);
      expect(sharedWith(b, a)).toBeLessThan(0.7);
      expect(sharedWith(a, c)).toBeLessThan(0.02);
    });
  });

  describe('memory regions and device state', () => {
    /** SIGUSR1: the guest saves its device state and stops itself. */
    async function pauseForMigration(g: Guest): Promise<void> {
      process.kill(g.pid, 'SIGUSR1');
      await waitFor('the guest to stop itself', () => processState(g.pid) === 'T');
    }

    async function resumed(path: string): Promise<Header> {
      return waitFor('resume check', () => {
        const x = readHeader(path);
        return x.resumeCheckDone === x.resumes && x;
      });
    }

    it('spreads one guest over several files, pages numbered on from one to the next, and resumes on copies of them all', async () => {
      const [a, b] = [shmPath(), shmPath()];
      const g = startGuest([
        'run', '--memory-file', a, '--memory-file', b, '--create', '--memory-bytes', `${MiB},${3 * MiB}`,
        '--seed', '5', '--hot', '0.5', '--dirty-rate', String(8 * MiB), '--device-state', `${a}.dev`,
      ]);
      await g.running;
      const h = readHeader(a);
      expect(h).toMatchObject({ layoutVersion: 2, regionCount: 2, regionBytes: [MiB, 3 * MiB], memoryBytes: 4 * MiB, pageCount: 1024 });
      expect(statSync(a).size).toBe(MiB);
      expect(statSync(b).size).toBe(3 * MiB);
      await sleep(300);
      await pauseForMigration(g);
      // Writes land in both files: the version table (in the first) covers pages of the second.
      const fileA = readFileSync(a);
      const fileB = readFileSync(b);
      const both = Buffer.concat([fileA, fileB]);
      let writtenInB = 0;
      for (let p = 256; p < 1024; p++) if (versionOf(fileA, p) > 0) writtenInB++;
      expect(writtenInB).toBeGreaterThan(0);
      expect(versionSum(both, readHeader(a))).toBe(readHeader(a).totalWrites);
      expect(statSync(`${a}.dev`).size).toBe(48);
      expect(statSync(`${a}.dev`).mode & 0o777).toBe(0o600);
      expect(readHeader(a).deviceSaves).toBe(1);
      copyFileSync(a, `${a}.copy`);
      copyFileSync(b, `${b}.copy`);
      copyFileSync(`${a}.dev`, `${a}.dev1`);
      expect(await stopGuest(g)).toBe(0);

      copyFileSync(`${a}.dev1`, `${a}.dev`);
      const r = startGuest(['run', '--memory-file', `${a}.copy`, '--memory-file', `${b}.copy`, '--device-state', `${a}.dev`]);
      await r.running;
      const after = await resumed(`${a}.copy`);
      expect(after).toMatchObject({ resumeStalePages: 0, stalePages: 0, metaErrors: 0, deviceLoads: 1, deviceErrors: 0 });
      expect(after.resumeCheckedPages).toBe(after.pageCount - after.firstDataPage);
      expect(existsSync(`${a}.dev`)).toBe(false); // taken back, and gone
      expect(await stopGuest(r)).toBe(0);
    });

    it('catches a lost, stale or foreign device state with its own check, as it catches a stale page', async () => {
      const [a, b] = [shmPath(), shmPath()];
      const dev = `${a}.dev`;
      const g = startGuest([
        'run', '--memory-file', a, '--memory-file', b, '--create', '--memory-bytes', `${MiB},${MiB}`,
        '--hot', '0.5', '--dirty-rate', String(8 * MiB), '--device-state', dev,
      ]);
      await g.running;
      await sleep(200);
      await pauseForMigration(g);
      copyFileSync(dev, `${a}.dev1`); // save 1
      process.kill(g.pid, 'SIGCONT');
      await sleep(200);
      await pauseForMigration(g);
      copyFileSync(a, `${a}.copy`); // the memory of save 2
      copyFileSync(b, `${b}.copy`);
      expect(await stopGuest(g)).toBe(0);
      const resumeWith = async (state: string | undefined, expected: RegExp) => {
        copyFileSync(a.concat('.copy'), `${a}.copy2`);
        createdFiles.add(`${b}.copy2`);
        copyFileSync(`${b}.copy`, `${b}.copy2`);
        const args = ['run', '--memory-file', `${a}.copy2`, '--memory-file', `${b}.copy2`];
        if (state !== undefined) {
          copyFileSync(state, dev);
          args.push('--device-state', dev);
        }
        const r = startGuest(args);
        await r.running;
        const h = await resumed(`${a}.copy2`);
        expect(h.deviceErrors).toBe(1);
        expect(h.deviceLoads).toBe(0);
        expect(h.resumeStalePages).toBe(0); // the memory itself is fine
        expect(await stopGuest(r)).toBe(0);
        expect(r.err()).toMatch(expected);
      };
      await resumeWith(`${a}.dev1`, /device state stale \(save 1 after \d+ writes; the memory goes with save 2/);
      await resumeWith(undefined, /device state lost \(the guest was started without --device-state\)/);
      // Another guest's state: a guest of another seed, paused once.
      const [c, d] = [shmPath(), shmPath()];
      const other = startGuest(['run', '--memory-file', c, '--memory-file', d, '--create', '--memory-bytes', `${MiB},${MiB}`, '--seed', '99', '--device-state', `${c}.dev`]);
      await other.running;
      await pauseForMigration(other);
      copyFileSync(`${c}.dev`, `${a}.dev2`);
      expect(await stopGuest(other)).toBe(0);
      await resumeWith(`${a}.dev2`, /another guest's \(seed 99/);
    });

    it('pauses at once when asked, also when idle', async () => {
      const [a] = [shmPath()];
      const g = startGuest(['run', '--memory-file', a, '--create', '--memory-bytes', String(MiB), '--device-state', `${a}.dev`]);
      await g.running;
      await sleep(100);
      const times: number[] = [];
      for (let i = 0; i < 5; i++) {
        const t0 = performance.now();
        await pauseForMigration(g);
        times.push(performance.now() - t0);
        process.kill(g.pid, 'SIGCONT');
        await sleep(20);
      }
      // The idle loop sleeps 50 ms at a time: a pause that waited for its end would show.
      expect(Math.min(...times)).toBeLessThan(25);
      expect(readHeader(a).deviceSaves).toBe(5);
      expect(await stopGuest(g)).toBe(0);
    });

    it('pauses within a few writes when it runs behind its rate, not after the credit it holds', async () => {
      // Asked for 64 GiB/s, the guest is always behind and holds 10 ms of credit: 167,772 pages.
      // It must look for the signal between writes, not only when the credit is spent.
      const [a] = [shmPath()];
      const g = startGuest([
        'run', '--memory-file', a, '--create', '--memory-bytes', String(16 * MiB), '--hot', '1',
        '--dirty-rate', String(64 * 1024 * MiB), '--device-state', `${a}.dev`,
      ]);
      await g.running;
      await sleep(100);
      const after: number[] = [];
      for (let i = 0; i < 5; i++) {
        const before = readHeader(a).totalWrites;
        await pauseForMigration(g);
        after.push(readHeader(a).totalWrites - before);
        process.kill(g.pid, 'SIGCONT');
        await sleep(20);
      }
      // 16 pages between looks, plus what it wrote between the read above and the kill
      // (a preempted test process: 2,000 pages is 10 ms of its writes here).
      expect(Math.min(...after), `writes after the ask: ${after.join(', ')}`).toBeLessThan(2000);
      expect(readHeader(a).deviceSaves).toBe(5);
      expect(await stopGuest(g)).toBe(0);
    });

    it('resumes a file of layout 1 (one region) and upgrades its header in place', async () => {
      const path = shmPath();
      await createGuestFile(path, ['--memory-bytes', String(MiB), '--dirty-rate', String(MiB)]);
      patchFile(path, 8, u32le(1));
      patchFile(path, 168, Buffer.alloc(328 - 168));
      const r = startGuest(['run', '--memory-file', path]);
      await r.running;
      const h = await resumed(path);
      expect(h).toMatchObject({ layoutVersion: 2, regionCount: 1, regionBytes: [MiB], resumeStalePages: 0, metaErrors: 0, deviceErrors: 0 });
      expect(await stopGuest(r)).toBe(0);
    });

    it('refuses sizes that do not match the files, and a first region too small for the header', () => {
      const [a, b] = [shmPath(), shmPath()];
      const cases: [string[], string][] = [
        [['--memory-file', a, '--memory-file', b, '--create', '--memory-bytes', String(MiB)], '1 sizes for 2 --memory-file'],
        [['--memory-file', a, '--memory-file', b, '--create', '--memory-bytes', `4096,${1024 * MiB}`], 'the first region (4096 bytes) must be larger'],
        [['--memory-file', a, '--create', '--memory-bytes', `${MiB},`], 'not a list of sizes'],
        [['--memory-file', a, '--create', '--memory-bytes', '65535'], 'not a positive multiple of 4096'],
      ];
      for (const [args, message] of cases) {
        const r = spawnSync(guestBin, ['run', ...args], { encoding: 'utf8' });
        expect(r.status).toBe(2);
        expect(r.stderr).toContain(message);
        expect(existsSync(a)).toBe(false);
      }
    });
  });

  it('poke: fill, touch and read pages on command', async () => {
    const path = shmPath();
    const g = startGuest(['poke', '--memory-file', path, '--memory-bytes', String(MiB)], { stdinPipe: true });
    await g.running;
    const send = async (cmd: string) => {
      const before = g.out().length;
      g.child.stdin!.write(`${cmd}\n`);
      await waitFor(`ok for ${cmd}`, () => g.out().slice(before) === 'ok\n');
    };
    await send('fill 3 171');
    await send('touch 3');
    await send('read 4');
    const file = readFileSync(path);
    expect(file.length).toBe(MiB);
    expect(file.subarray(3 * PAGE, 4 * PAGE).every((x) => x === 171)).toBe(true);
    expect(isZeroPage(file, 4)).toBe(true);
    g.child.stdin!.end();
    expect((await g.exit).code).toBe(0);
  });
});
