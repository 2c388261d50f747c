// A disk is a sparse file: fileDataRuns finds its data (SEEK_DATA/SEEK_HOLE) and a full
// digest given those runs fingerprints the holes as zero pages without reading them, with
// the same value as a digest that reads every page.
import { closeSync, ftruncateSync, mkdtempSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ENTRY_DATA, ENTRY_ZERO, loadNative } from '../../agent/native.js';
import { holesOf } from '../../agent/tracker/page-set.js';

const native = loadNative();
const PAGE = 4096;
// Not /dev/shm or /tmp on tmpfs: the disks directory is a disk file system; the repo's is.
const dir = mkdtempSync(join(import.meta.dirname, '..', '..', 'dist', 'sparse-test-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function sparseFile(name: string, pages: number, writes: [page: number, offsetInPage: number, length: number, byte: number][]): number {
  const fd = openSync(join(dir, name), 'w+', 0o600);
  ftruncateSync(fd, pages * PAGE);
  for (const [page, offset, length, byte] of writes) writeSync(fd, Buffer.alloc(length, byte), 0, length, page * PAGE + offset);
  return fd;
}

describe('sparse files', () => {
  it('fileDataRuns: the pages that hold data, a partly written page whole, neighbours merged, nothing past pageCount', () => {
    const fd = sparseFile('a.raw', 4096, [
      [10, 0, PAGE, 1],
      [11, 0, PAGE, 2],
      [1000, 50, 100, 3],
      [4000, 0, 2 * PAGE, 4],
    ]);
    try {
      expect([...native.fileDataRuns(fd, PAGE, 4096)]).toEqual([10, 2, 1000, 1, 4000, 2]);
      // Only the first 1001 pages asked for: the run at 4000 is not reported.
      expect([...native.fileDataRuns(fd, PAGE, 1001)]).toEqual([10, 2, 1000, 1]);
      expect([...native.fileDataRuns(fd, PAGE, 0)]).toEqual([]);
      expect(() => native.fileDataRuns(-1, PAGE, 10)).toThrow();
      expect(() => native.fileDataRuns(fd, 1000, 10)).toThrow(RangeError);
    } finally {
      closeSync(fd);
    }
  });

  it('fileDataRuns with maxRuns: the last run of that many reaches to the end (the rest counts as data)', () => {
    const fd = sparseFile('cap.raw', 4096, [
      [10, 0, PAGE, 1],
      [1000, 0, PAGE, 3],
      [4000, 0, PAGE, 4],
    ]);
    try {
      expect([...native.fileDataRuns(fd, PAGE, 4096, 3)]).toEqual([10, 1, 1000, 1, 4000, 1]);
      expect([...native.fileDataRuns(fd, PAGE, 4096, 2)]).toEqual([10, 1, 1000, 3096]);
      expect([...native.fileDataRuns(fd, PAGE, 4096, 1)]).toEqual([10, 4086]);
      expect(() => native.fileDataRuns(fd, PAGE, 4096, 0)).toThrow(RangeError);
    } finally {
      closeSync(fd);
    }
  });

  it('fileDataRuns with maybeHoles looks only there: other pages count as data, and data written into a hole since is found', async () => {
    const fd = sparseFile('maybe.raw', 4096, [
      [10, 0, PAGE, 1],
      [1000, 0, PAGE, 3],
    ]);
    try {
      const holes = Uint32Array.of(0, 10, 11, 989, 1001, 3095);
      expect([...native.fileDataRuns(fd, PAGE, 4096, undefined, holes)]).toEqual([10, 1, 1000, 1]);
      // A hole found now, a page written since: only the page becomes data.
      writeSync(fd, Buffer.alloc(PAGE, 9), 0, PAGE, 3000 * PAGE);
      expect([...native.fileDataRuns(fd, PAGE, 4096, undefined, holes)]).toEqual([10, 1, 1000, 1, 3000, 1]);
      // Pages outside maybeHoles are data, holes or not (page 2000 is one).
      expect([...native.fileDataRuns(fd, PAGE, 4096, undefined, Uint32Array.of(0, 10, 2500, 1596))]).toEqual([10, 2490, 3000, 1]);
      // A hole of fewer than minHolePages pages between two runs is data; leading and trailing holes stay.
      expect([...native.fileDataRuns(fd, PAGE, 4096, undefined, undefined, 990)]).toEqual([10, 991, 3000, 1]);
      expect([...native.fileDataRuns(fd, PAGE, 4096, undefined, undefined, 989)]).toEqual([10, 1, 1000, 1, 3000, 1]);
      expect(() => native.fileDataRuns(fd, PAGE, 4096, undefined, undefined, 0)).toThrow(RangeError);
      // The cap holds here too.
      expect([...native.fileDataRuns(fd, PAGE, 4096, 2, holes)]).toEqual([10, 1, 1000, 3096]);
      expect(() => native.fileDataRuns(fd, PAGE, 4096, undefined, Uint32Array.of(5, 1, 2, 1))).toThrow(/out of order/);
      expect(() => native.fileDataRuns(fd, PAGE, 4096, undefined, Uint32Array.of(4000, 100))).toThrow(/past pageCount/);
      expect(() => native.fileDataRuns(fd, PAGE, 4096, undefined, Uint32Array.of(1))).toThrow(RangeError);
      // The same walk on the thread pool.
      expect([...(await native.fileDataRunsAsync(fd, PAGE, 4096, undefined, holes))]).toEqual([10, 1, 1000, 1, 3000, 1]);
      expect([...(await native.fileDataRunsAsync(fd, PAGE, 4096))]).toEqual([10, 1, 1000, 1, 3000, 1]);
      expect([...(await native.fileDataRunsAsync(fd, PAGE, 4096, 1))]).toEqual([10, 4086]);
      await expect(native.fileDataRunsAsync(fd, PAGE, 4096, undefined, Uint32Array.of(5, 1, 2, 1))).rejects.toThrow(/out of order/);
      await expect(native.fileDataRunsAsync(-1, PAGE, 4096)).rejects.toThrow();
    } finally {
      closeSync(fd);
    }
  });

  it('a tmpfs file allocated and never written is all holes, read or not by pread; a read through a mapping makes a page data (what the source of a migration must not do to memory it skips)', async () => {
    // A destination's memory file is made so (tmpfileCreate: fallocate), and a guest moved
    // there by pre-copy keeps a hole at each zero page that came as one.
    const fd = native.tmpfileCreate('/dev/shm', 64 * PAGE);
    try {
      expect([...native.fileDataRuns(fd, PAGE, 64)]).toEqual([]);
      writeSync(fd, Buffer.alloc(PAGE, 1), 0, PAGE, 5 * PAGE);
      readSync(fd, Buffer.alloc(PAGE), 0, PAGE, 20 * PAGE);
      expect([...native.fileDataRuns(fd, PAGE, 64)]).toEqual([5, 1]);
      const region = native.regionMap(fd, 64 * PAGE, PAGE, { writable: false, trackHashes: false, initiallyZero: false });
      try {
        const skipping = await native.regionDigest(region, 'full', native.fileDataRuns(fd, PAGE, 64));
        expect([...native.fileDataRuns(fd, PAGE, 64)]).toEqual([5, 1]);
        expect((await native.regionDigest(region, 'full')).equals(skipping)).toBe(true);
        expect([...native.fileDataRuns(fd, PAGE, 64)]).toEqual([0, 64]);
      } finally {
        native.regionClose(region);
      }
    } finally {
      closeSync(fd);
    }
  });

  it('a digest given the data runs of a large memory file (split over threads by its data) equals the digest that reads every page', async () => {
    // 40960 pages, data in runs of every length, holes between: enough data for the threads.
    const pages = 40960;
    const fd = native.tmpfileCreate('/dev/shm', pages * PAGE, true);
    try {
      const chunk = Buffer.alloc(64 * PAGE);
      for (let page = 0, k = 1; page < pages; k++) {
        const data = Math.min(k % 61, pages - page);
        for (let i = 0; i < data; i += 64) {
          const n = Math.min(64, data - i);
          chunk.fill(k & 0xff, 0, n * PAGE);
          chunk.writeUInt32LE(page + i, 0);
          writeSync(fd, chunk, 0, n * PAGE, (page + i) * PAGE);
        }
        page += data + (k % 5);
      }
      const runs = native.fileDataRuns(fd, PAGE, pages);
      let dataPages = 0;
      for (let i = 1; i < runs.length; i += 2) dataPages += runs[i]!;
      expect(dataPages).toBeGreaterThan(32768);
      expect(runs.length / 2).toBeGreaterThan(1000);
      const region = native.regionMap(fd, pages * PAGE, PAGE, { writable: false, trackHashes: false, initiallyZero: false });
      try {
        const skipping = await native.regionDigest(region, 'full', runs);
        // Given the holes to look in instead (and the file), the digest's thread walks them itself.
        expect((await native.regionDigest(region, 'full', holesOf(runs, pages), fd)).equals(skipping)).toBe(true);
        await expect(native.regionDigest(region, 'full', undefined, fd)).rejects.toThrow(/holesFd goes with/);
        await expect(native.regionDigest(region, 'full', Uint32Array.of(10, 1, 5, 1), fd)).rejects.toThrow(/ascending/);
        // The holes were not read: still holes (a read through the mapping makes them data).
        expect([...native.fileDataRuns(fd, PAGE, pages)]).toEqual([...runs]);
        expect(skipping.equals(await native.regionDigest(region, 'full'))).toBe(true);
      } finally {
        native.regionClose(region);
      }
    } finally {
      closeSync(fd);
    }
  });

  it('a digest given the data runs equals the digest that reads every page, and one changed byte changes it', async () => {
    const fd = sparseFile('b.raw', 8192, [
      [0, 0, PAGE, 7],
      [3000, 17, 1, 9],
      [8191, 0, PAGE, 5],
    ]);
    try {
      const region = native.regionMap(fd, 8192 * PAGE, PAGE, { writable: false, trackHashes: false, initiallyZero: false });
      try {
        const runs = native.fileDataRuns(fd, PAGE, 8192);
        const sparse = await native.regionDigest(region, 'full', runs);
        expect(sparse.equals(await native.regionDigest(region, 'full'))).toBe(true);
        writeSync(fd, Buffer.from([1]), 0, 1, 5000 * PAGE);
        const changed = await native.regionDigest(region, 'full', native.fileDataRuns(fd, PAGE, 8192));
        expect(changed.equals(sparse)).toBe(false);
        expect(changed.equals(await native.regionDigest(region, 'full'))).toBe(true);
        await expect(native.regionDigest(region, 'full', Uint32Array.of(8190, 5))).rejects.toThrow(/outside the region/);
        await expect(native.regionDigest(region, 'tracked', runs)).rejects.toThrow();
      } finally {
        native.regionClose(region);
      }
    } finally {
      closeSync(fd);
    }
  });

  it('a writable region with zeroHoles turns the zero pages it is given into holes: what the guest trimmed stays sparse here', async () => {
    const fd = sparseFile('c.raw', 1024, []);
    try {
      const region = native.regionMap(fd, 1024 * PAGE, PAGE, { writable: true, trackHashes: true, initiallyZero: true, zeroHoles: true });
      try {
        native.regionScatter(region, Uint32Array.of(ENTRY_DATA, 100, 4), 1, Buffer.alloc(4 * PAGE, 7));
        expect([...native.fileDataRuns(fd, PAGE, 1024)]).toEqual([100, 4]);
        native.regionScatter(region, Uint32Array.of(ENTRY_ZERO, 101, 2), 1, Buffer.alloc(0));
        expect([...native.fileDataRuns(fd, PAGE, 1024)]).toEqual([100, 1, 103, 1]);
        expect((await native.regionDigest(region, 'tracked')).equals(await native.regionDigest(region, 'full'))).toBe(true);
      } finally {
        native.regionClose(region);
      }
      expect(() => native.regionMap(fd, 1024 * PAGE, PAGE, { writable: false, trackHashes: false, initiallyZero: false, zeroHoles: true })).toThrow(/zeroHoles is for a writable region/);
    } finally {
      closeSync(fd);
    }
  });
});
