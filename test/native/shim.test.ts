// gangway-track.so, the LD_PRELOAD tracking shim, tested end to end without the addon: a
// tiny PAGEMAP_SCAN program, compiled here into a temp dir, reads-and-resets the pages
// the tracked process wrote, as the agent will.
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  closeSync,
  existsSync,
  ftruncateSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { processState } from '../../agent/guest/process-guest.js';
import { waitFor } from '../helpers/wait.js';
import { guestBinaryPath, nativeDir, trackShimPath } from '../../agent/native.js';

const guestBin = guestBinaryPath;
const shimLib = trackShimPath;
const built = existsSync(guestBin) && existsSync(shimLib);
const PAGE = 4096;
const MiB = 1 << 20;

// scan PID START LENGTH: PAGEMAP_SCAN over [START, START+LENGTH) of PID, write-protecting
// again what it reports. Prints one line per written range ("3" or "7-8", pages relative
// to START) and then "done"; on failure "error <ERRNO NAME> <message>" and exit 1.
const scanSource = String.raw`
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include "uapi-compat.h"

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: scan PID START LENGTH\n");
		return 2;
	}
	char path[64];
	snprintf(path, sizeof(path), "/proc/%s/pagemap", argv[1]);
	uint64_t start = strtoull(argv[2], NULL, 0);
	uint64_t end = start + strtoull(argv[3], NULL, 0);
	int fd = open(path, O_RDONLY);
	if (fd < 0) {
		printf("error %s open %s: %s\n", strerrorname_np(errno), path, strerror(errno));
		return 1;
	}
	struct page_region regions[64];
	uint64_t at = start;
	while (at < end) {
		struct pm_scan_arg arg;
		memset(&arg, 0, sizeof(arg));
		arg.size = sizeof(arg);
		arg.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
		arg.start = at;
		arg.end = end;
		arg.vec = (uint64_t)(uintptr_t)regions;
		arg.vec_len = 64;
		arg.category_mask = PAGE_IS_WRITTEN;
		arg.return_mask = PAGE_IS_WRITTEN;
		long n = ioctl(fd, PAGEMAP_SCAN, &arg);
		if (n < 0) {
			printf("error %s PAGEMAP_SCAN: %s\n", strerrorname_np(errno), strerror(errno));
			return 1;
		}
		for (long i = 0; i < n; i++) {
			uint64_t a = (regions[i].start - start) / 4096, b = (regions[i].end - start) / 4096 - 1;
			if (a == b)
				printf("%llu\n", (unsigned long long)a);
			else
				printf("%llu-%llu\n", (unsigned long long)a, (unsigned long long)b);
		}
		if (arg.walk_end <= at)
			break;
		at = arg.walk_end;
	}
	printf("done\n");
	return 0;
}
`;

let helperDir = '';
let scanBin = '';

/** Written pages since the last scan, as "[3] [7-8] [40]" ("" when none). */
function scan(pid: number, start: bigint, length: number): string {
  const out = execFileSync(scanBin, [String(pid), `0x${start.toString(16)}`, String(length)], { encoding: 'utf8' });
  const lines = out.trim().split('\n');
  expect(lines.pop()).toBe('done');
  return lines.map((l) => `[${l}]`).join(' ');
}

function scanPages(pid: number, start: bigint, length: number): Set<number> {
  const pages = new Set<number>();
  for (const range of scan(pid, start, length).split(' ').filter(Boolean)) {
    const [a, b] = range.slice(1, -1).split('-').map(Number);
    for (let p = a!; p <= (b ?? a!); p++) pages.add(p);
  }
  return pages;
}

function scanFailure(pid: number, start: bigint, length: number): string {
  const r = spawnSync(scanBin, [String(pid), `0x${start.toString(16)}`, String(length)], { encoding: 'utf8' });
  expect(r.status).toBe(1);
  return r.stdout;
}

/** The address range of PID's mapping of `path`, from /proc/PID/maps. */
function mappingOf(pid: number, path: string): { start: bigint; length: number } {
  const line = readFileSync(`/proc/${pid}/maps`, 'utf8')
    .split('\n')
    .find((l) => l.endsWith(` ${path}`));
  if (!line) throw new Error(`${path} is not mapped by ${pid}`);
  const [a, b] = line.split(' ')[0]!.split('-');
  return { start: BigInt(`0x${a}`), length: Number(BigInt(`0x${b}`) - BigInt(`0x${a}`)) };
}

function parseReport(path: string): { start: bigint; length: number; pid: number } {
  const text = readFileSync(path, 'utf8');
  const m = /^ok start=0x([0-9a-f]+) length=(\d+) pid=(\d+)\n$/.exec(text);
  if (!m) throw new Error(`unexpected shim report: ${JSON.stringify(text)}`);
  return { start: BigInt(`0x${m[1]}`), length: Number(m[2]), pid: Number(m[3]) };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// Everything a test starts or creates, released in afterEach even when the test fails.
const startedPids = new Set<number>();
const createdPaths = new Set<string>();

function shmFile(bytes: number): string {
  const path = `/dev/shm/gangway-test-${randomBytes(6).toString('hex')}`;
  createdPaths.add(path);
  const fd = openSync(path, 'w');
  ftruncateSync(fd, bytes);
  closeSync(fd);
  return path;
}

function testDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'gangway-shim-test-'));
  createdPaths.add(dir);
  return dir;
}

interface Proc {
  child: ChildProcess;
  pid: number;
  out(): string;
  err(): string;
  running: Promise<void>;
  exit: Promise<number | null>;
}

function startTracked(args: string[], env: Record<string, string>): Proc {
  const child = spawn(guestBin, args, {
    stdio: ['pipe', 'pipe', 'pipe'],
    env: { ...process.env, LD_PRELOAD: shimLib, ...env },
  });
  if (child.pid === undefined) throw new Error('spawn failed');
  startedPids.add(child.pid);
  let out = '';
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exit = new Promise<number | null>((res) => child.once('exit', (code) => res(code)));
  const running = new Promise<void>((res, rej) => {
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      if (/^running pid=\d+ mono_ns=\d+\n/.test(out)) res();
    });
    void exit.then((code) => rej(new Error(`exited (${code}) before running: ${err}`)));
  });
  running.catch(() => {});
  return { child, pid: child.pid, out: () => out, err: () => err, running, exit };
}

function startPoke(memory: string, env: Record<string, string>): Proc & { send(cmd: string): Promise<void> } {
  const p = startTracked(['poke', '--memory-file', memory, '--memory-bytes', String(MiB)], env);
  return {
    ...p,
    async send(cmd: string) {
      const before = p.out().length;
      p.child.stdin!.write(`${cmd}\n`);
      await waitFor(`ok for ${cmd}`, () => p.out().slice(before) === 'ok\n');
    },
  };
}

beforeAll(() => {
  if (!built) return;
  helperDir = mkdtempSync(join(tmpdir(), 'gangway-scan-'));
  writeFileSync(join(helperDir, 'scan.c'), scanSource);
  scanBin = join(helperDir, 'scan');
  execFileSync('cc', ['-O2', '-Wall', '-Wextra', '-I', join(nativeDir, 'src'), '-o', scanBin, join(helperDir, 'scan.c')]);
});

afterAll(() => {
  if (helperDir) rmSync(helperDir, { recursive: true, force: true });
});

afterEach(() => {
  for (const pid of startedPids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  startedPids.clear();
  for (const path of createdPaths) rmSync(path, { recursive: true, force: true });
  createdPaths.clear();
});

describe.skipIf(!built)(built ? 'gangway-track.so' : `gangway-track.so (skipped: ${shimLib} or ${guestBin} not built)`, () => {
  it('tracks writes to the mapped file: each scan reports what was written since the last', async () => {
    const memory = shmFile(MiB);
    const report = join(testDir(), 'track.report');
    const g = startPoke(memory, { GANGWAY_TRACK_PATH: memory, GANGWAY_TRACK_REPORT: report });
    await g.running;
    const r = parseReport(report);
    expect(r).toMatchObject({ length: MiB, pid: g.pid });
    expect(mappingOf(g.pid, memory)).toEqual({ start: r.start, length: MiB });
    expect(existsSync(`${report}.tmp`)).toBe(false);

    scan(g.pid, r.start, r.length); // whatever came before: reset
    for (const cmd of ['fill 3 1', 'fill 7 2', 'fill 8 3', 'fill 40 4']) await g.send(cmd);
    expect(scan(g.pid, r.start, r.length)).toBe('[3] [7-8] [40]');
    // reads are not writes; a write of an unchanged value is
    for (const cmd of ['fill 7 9', 'read 50', 'touch 50']) await g.send(cmd);
    expect(scan(g.pid, r.start, r.length)).toBe('[7] [50]');
    expect(scan(g.pid, r.start, r.length)).toBe('');
    await g.send('read 3');
    expect(scan(g.pid, r.start, r.length)).toBe('');
    expect(g.err()).toBe('');
    g.child.stdin!.end();
    expect(await g.exit).toBe(0);
  });

  it('matches the file by inode, not by the name it was opened with', async () => {
    const memory = shmFile(MiB);
    const dir = testDir();
    const link = join(dir, 'memory-link');
    symlinkSync(memory, link);
    const report = join(dir, 'track.report');
    const g = startPoke(link, { GANGWAY_TRACK_PATH: memory, GANGWAY_TRACK_REPORT: report });
    await g.running;
    const r = parseReport(report);
    expect(r.length).toBe(MiB);
    scan(g.pid, r.start, r.length);
    await g.send('fill 100 7');
    expect(scan(g.pid, r.start, r.length)).toBe('[100]');
  });

  it('leaves other files alone: no report, and PAGEMAP_SCAN refuses the untracked range', async () => {
    const memory = shmFile(MiB);
    const other = shmFile(MiB);
    const report = join(testDir(), 'track.report');
    const g = startPoke(memory, { GANGWAY_TRACK_PATH: other, GANGWAY_TRACK_REPORT: report });
    await g.running;
    await g.send('fill 3 1');
    expect(existsSync(report)).toBe(false);
    const m = mappingOf(g.pid, memory);
    expect(m.length).toBe(MiB);
    expect(scanFailure(g.pid, m.start, m.length)).toMatch(/^error EPERM PAGEMAP_SCAN/);
    expect(g.err()).toBe('');
  });

  it('does nothing at all without GANGWAY_TRACK_PATH', async () => {
    const memory = shmFile(MiB);
    const report = join(testDir(), 'track.report');
    const env: Record<string, string> = { GANGWAY_TRACK_REPORT: report };
    const g = startTracked(['poke', '--memory-file', memory, '--memory-bytes', String(MiB)], env);
    await g.running;
    expect(existsSync(report)).toBe(false);
    const m = mappingOf(g.pid, memory);
    expect(scanFailure(g.pid, m.start, m.length)).toMatch(/^error EPERM/);
  });

  it('tracks a running gangway-guest: the written data pages are exactly those whose version changed', async () => {
    const memory = `/dev/shm/gangway-test-${randomBytes(6).toString('hex')}`;
    createdPaths.add(memory);
    const report = join(testDir(), 'track.report');
    const bytes = 8 * MiB;
    const g = startTracked(
      ['run', '--memory-file', memory, '--create', '--memory-bytes', String(bytes), '--hot', '0.1',
        '--dirty-rate', String(2 * MiB)],
      { GANGWAY_TRACK_PATH: memory, GANGWAY_TRACK_REPORT: report },
    );
    await g.running;
    const r = parseReport(report);
    expect(r).toMatchObject({ length: bytes, pid: g.pid });

    const stop = async () => {
      process.kill(g.pid, 'SIGSTOP');
      await waitFor('stop', () => processState(g.pid) === 'T');
    };
    await sleep(100);
    await stop();
    scan(g.pid, r.start, r.length);
    expect(scan(g.pid, r.start, r.length)).toBe(''); // stopped: nothing new
    const before = readFileSync(memory);
    process.kill(g.pid, 'SIGCONT');
    await sleep(300);
    await stop();
    const after = readFileSync(memory);
    const written = scanPages(g.pid, r.start, r.length);

    const firstDataPage = after.readUInt32LE(60);
    const pageCount = bytes / PAGE;
    const changed = new Set<number>();
    for (let p = firstDataPage; p < pageCount; p++) {
      if (before.readUInt32LE(PAGE + 4 * p) !== after.readUInt32LE(PAGE + 4 * p)) changed.add(p);
    }
    // A stop can land inside a page write; that page may then show up on one side only.
    for (const snapshot of [before, after]) {
      const inflight = snapshot.readBigUInt64LE(112);
      if (inflight !== 0xffffffffffffffffn) {
        changed.delete(Number(inflight));
        written.delete(Number(inflight));
      }
    }
    expect(changed.size).toBeGreaterThan(50); // ~150 writes at 512 pages/s
    const writtenData = [...written].filter((p) => p >= firstDataPage).sort((a, b) => a - b);
    expect(writtenData).toEqual([...changed].sort((a, b) => a - b));
    expect(written.has(0)).toBe(true); // the header's counters
    process.kill(g.pid, 'SIGTERM');
    process.kill(g.pid, 'SIGCONT');
    expect(await g.exit).toBe(0);
  });
});
