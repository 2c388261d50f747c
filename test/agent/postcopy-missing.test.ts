// The missing-page set an agent restarted during post-copy rebuilds from the guest's memory
// file: its holes. A page the guest has (arrived, or written by the guest after arriving) is
// data in the file, whatever its content, zeros included.
import { closeSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterEach, describe, expect, it } from 'vitest';
import { loadNative } from '../../agent/native.js';
import { missingPagesOf } from '../../agent/migration/postcopy-takeover.js';
import { holesOf } from '../../agent/tracker/page-set.js';

const PAGE = 4096;
const native = loadNative();
const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const cleanup of cleanups.splice(0).reverse()) cleanup();
});

/** The naive oracle: every page not covered by a data run. */
function holesNaive(dataRuns: number[], pageCount: number): number[] {
  const data = new Set<number>();
  for (let i = 0; i < dataRuns.length; i += 2) for (let p = dataRuns[i]!; p < dataRuns[i]! + dataRuns[i + 1]!; p++) data.add(p);
  const runs: number[] = [];
  for (let p = 0; p < pageCount; p++) {
    if (data.has(p)) continue;
    const n = runs.length;
    if (n >= 2 && runs[n - 2]! + runs[n - 1]! === p) runs[n - 1]!++;
    else runs.push(p, 1);
  }
  return runs;
}

describe('holesOf', () => {
  it('is every page outside the data runs, as ascending runs', () => {
    expect([...holesOf(new Uint32Array(0), 8)]).toEqual([0, 8]);
    expect([...holesOf(Uint32Array.of(0, 8), 8)]).toEqual([]);
    expect([...holesOf(Uint32Array.of(0, 1, 3, 2), 8)]).toEqual([1, 2, 5, 3]);
    // A data run past the end (a file longer than the region) stops at the region's end.
    expect([...holesOf(Uint32Array.of(6, 10), 8)]).toEqual([0, 6]);
  });

  it('matches the naive oracle on any data runs', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 300 }), fc.array(fc.tuple(fc.nat(299), fc.integer({ min: 1, max: 40 })), { maxLength: 12 }), (pageCount, pairs) => {
        // Ascending, non-overlapping runs, as SEEK_DATA yields them.
        const runs: number[] = [];
        let at = 0;
        for (const [gap, count] of pairs) {
          const first = at + (gap % 7);
          if (first >= pageCount) break;
          runs.push(first, count);
          at = first + count + 1;
        }
        expect([...holesOf(Uint32Array.from(runs), pageCount)]).toEqual(holesNaive(runs, pageCount));
      }),
    );
  });
});

describe('missingPagesOf a sparse memory file', () => {
  // memoryDir is a tmpfs: post-copy's missing faults are for shmem only.
  it('is its holes: pages written, zeros included, are present', () => {
    const dir = mkdtempSync('/dev/shm/gangway-test-missing-');
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const pageCount = 64;
    const fd = native.tmpfileCreate(dir, pageCount * PAGE, true);
    cleanups.push(() => closeSync(fd));
    expect([...missingPagesOf(native, fd, PAGE, pageCount)]).toEqual([0, pageCount]);
    writeSync(fd, Buffer.alloc(PAGE, 0xab), 0, PAGE, 3 * PAGE);
    // A page of zeros that arrived is present: the guest must not fault on it again.
    writeSync(fd, Buffer.alloc(2 * PAGE, 0), 0, 2 * PAGE, 10 * PAGE);
    writeSync(fd, Buffer.alloc(PAGE, 1), 0, PAGE, (pageCount - 1) * PAGE);
    expect([...missingPagesOf(native, fd, PAGE, pageCount)]).toEqual([0, 3, 4, 6, 12, pageCount - 13]);
    // A hole punched again (post-copy's switchover does so for stale pages) is missing again.
    native.punchHoles(fd, Uint32Array.of(10, 1), PAGE);
    expect([...missingPagesOf(native, fd, PAGE, pageCount)]).toEqual([0, 3, 4, 7, 12, pageCount - 13]);
  });

  it('takes a page with one byte written as present, and the rest as missing', () => {
    const dir = mkdtempSync('/dev/shm/gangway-test-missing-');
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const path = join(dir, 'memory');
    const fd = openSync(path, 'w+');
    cleanups.push(() => closeSync(fd));
    writeSync(fd, Buffer.alloc(1), 0, 1, 16 * PAGE - 1);
    // Only the last page holds a byte: the rest are missing.
    expect([...missingPagesOf(native, fd, PAGE, 16)]).toEqual([0, 15]);
  });
});
