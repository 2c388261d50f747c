// Regression: a write made while the addon's pagemapScan was between two PAGEMAP_SCAN ioctls
// was lost for good (bench:gang repaired pages, all in the upper half of the mapping). With
// more written runs than the kernel's bounce buffer holds (512) but fewer than the addon's
// vector (1024), the first ioctl walks to the end and returns every run, yet its walk_end is
// where the bounce buffer first filled. The addon scanned from there again, the second ioctl
// reported (and write-protected) a page written meanwhile below the last run already held,
// and the accumulator, which took every run to come in address order, dropped it.
// native/repro/README.md has the story, native/repro/scan-split.c the standalone reproducer.
//
// Here the guest (gangway-guest poke under the shim) writes 600 separate pages at the start
// of its mapping and its last page, so that each scan splits at page 1024, and then one
// page Q just above that, sent right before the scan: the first ioctl has passed Q before
// the guest gets to it, and it walks the rest of a 32 GiB sparse mapping before the second
// ioctl comes back to Q. Q must be in that scan's result or a later one.
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterEach, describe, expect, it } from 'vitest';
import { guestBinaryPath, trackShimPath } from '../../agent/native.js';
import { UffdWpTracker } from '../../agent/tracker/uffd-wp.js';

const PAGE = 4096;
const GiB = 1024 ** 3;
const MAPPING_BYTES = 32 * GiB; // sparse: only the written pages take memory
const LAST_PAGE = MAPPING_BYTES / PAGE - 1;
const RUNS = Array.from({ length: 600 }, (_, i) => 2 * i); // 600 runs of one page: pages 0..1198
const TRIALS = 12;
const LATE_WRITES = Array.from({ length: TRIALS }, (_, i) => 1300 + 2 * i);
const built = existsSync(guestBinaryPath) && existsSync(trackShimPath);

const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const clean of cleanups.splice(0).reverse()) clean();
});

interface Poke {
  pid: number;
  /** Sends commands without waiting. */
  write(commands: string[]): void;
  /** Waits for `count` answers, each `ok`. */
  oks(count: number): Promise<void>;
}

async function startPoke(memoryPath: string, reportPath: string): Promise<Poke> {
  const child: ChildProcess = spawn(
    guestBinaryPath,
    ['poke', '--memory-file', memoryPath, '--memory-bytes', String(MAPPING_BYTES)],
    {
      stdio: ['pipe', 'pipe', 'inherit'],
      env: { ...process.env, LD_PRELOAD: trackShimPath, GANGWAY_TRACK_PATH: memoryPath, GANGWAY_TRACK_REPORT: reportPath },
    },
  );
  cleanups.push(() => child.kill('SIGKILL'));
  const lines = createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
  const next = async (): Promise<string> => {
    const line = await lines.next();
    if (line.done) throw new Error('gangway-guest poke ended early');
    return line.value;
  };
  expect(await next()).toMatch(/^running pid=\d+ mono_ns=\d+$/);
  return {
    pid: child.pid!,
    write(commands) {
      child.stdin!.write(commands.map((c) => `${c}\n`).join(''));
    },
    async oks(count) {
      for (let i = 0; i < count; i++) expect(await next()).toBe('ok');
    },
  };
}

/** Adds the pages of `runs`, which must be in address order and apart (mergeRuns relies on it). */
function addPages(into: Set<number>, runs: Uint32Array): void {
  for (let i = 2; i + 1 < runs.length; i += 2) {
    expect(runs[i]!, `run ${i / 2} starts after the end of the one before`).toBeGreaterThan(runs[i - 2]! + runs[i - 1]!);
  }
  for (let i = 0; i + 1 < runs.length; i += 2) for (let p = runs[i]!; p < runs[i]! + runs[i + 1]!; p++) into.add(p);
}

describe.skipIf(!built)(
  built ? 'uffd-wp scan split over two ioctls' : `uffd-wp scan split over two ioctls (skipped: ${trackShimPath} or ${guestBinaryPath} not built)`,
  () => {
    it('a page written between the ioctls of one scan, below runs already reported, is reported', async (ctx) => {
      const dir = mkdtempSync(join(tmpdir(), 'gangway-split-scan-'));
      const memoryPath = `/dev/shm/gangway-test-${randomBytes(6).toString('hex')}`;
      cleanups.push(() => {
        rmSync(dir, { recursive: true, force: true });
        rmSync(memoryPath, { force: true });
      });
      const reportPath = join(dir, 'track.report');
      const poke = await startPoke(memoryPath, reportPath);
      const report = readFileSync(reportPath, 'utf8');
      if (!report.startsWith('ok ')) ctx.skip(`userfaultfd write-protect is unavailable here: ${report.trim()}`);

      const tracker = UffdWpTracker.open(poke.pid, reportPath, MAPPING_BYTES, PAGE);
      cleanups.push(() => tracker.close());
      await tracker.arm();

      const reported = new Set<number>();
      let splitScans = 0;
      for (const [trial, late] of LATE_WRITES.entries()) {
        const runs = [...RUNS.map((p) => `fill ${p} ${trial}`), `fill ${LAST_PAGE} ${trial}`];
        poke.write(runs);
        await poke.oks(runs.length);
        poke.write([`fill ${late} 9`]);
        const scan = new Set<number>();
        addPages(scan, await tracker.collect());
        // The condition of the failure: this scan had more runs than the bounce buffer.
        if (RUNS.every((p) => scan.has(p)) && scan.has(LAST_PAGE)) splitScans++;
        scan.forEach((p) => reported.add(p));
        await poke.oks(1);
      }
      addPages(reported, await tracker.collect());

      expect(splitScans, 'scans that had all 601 runs to report').toBe(TRIALS);
      expect(
        LATE_WRITES.filter((p) => !reported.has(p)),
        'written between the ioctls of a scan, never reported',
      ).toEqual([]);
    });
  },
);
