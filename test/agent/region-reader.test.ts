// MappedRegion, what the source reads of a guest's memory file: a memory region's holes
// (pages never written) are skipped unread, and the switchover's digest looks for them again
// where round 0 found them, so a hole written since is read, whatever a dirty tracker said.
import { closeSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { MappedRegion, MEMORY_MIN_HOLE_BYTES } from '../../agent/migration/region-reader.js';
import { loadNative } from '../../agent/native.js';

const native = loadNative();
const PAGE = 4096;
const PAGES = 4096;
const MIN_HOLE = MEMORY_MIN_HOLE_BYTES / PAGE;

let dir: string | undefined;
const readers: MappedRegion[] = [];
afterEach(() => {
  for (const reader of readers.splice(0)) reader.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
  dir = undefined;
});

/** A memory file on tmpfs with data at `dataRuns` ([first, count]), a hole everywhere else. */
function memoryFile(dataRuns: [number, number][]): string {
  dir = mkdtempSync('/dev/shm/gangway-region-reader-');
  const path = join(dir, 'ram');
  const fd = openSync(path, 'w+', 0o600);
  try {
    writeSync(fd, Buffer.alloc(1), 0, 1, PAGES * PAGE - 1);
    for (const [first, count] of dataRuns) {
      for (let page = first; page < first + count; page++) writeSync(fd, Buffer.alloc(PAGE, (page % 251) + 1), 0, PAGE, page * PAGE);
    }
  } finally {
    closeSync(fd);
  }
  return path;
}

function reader(path: string, sparse = false): MappedRegion {
  const region = new MappedRegion({ name: sparse ? 'disk0' : 'ram', path, lengthBytes: PAGES * PAGE, pageSizeBytes: PAGE, ...(sparse ? { sparse } : {}) });
  readers.push(region);
  return region;
}

/** The digest of every page as it is now, read through a mapping of its own. */
async function fullDigest(path: string): Promise<Buffer> {
  const fd = openSync(path, 'r');
  try {
    const region = native.regionMap(fd, PAGES * PAGE, PAGE, { writable: false, trackHashes: false, initiallyZero: false });
    try {
      return await native.regionDigest(region, 'full');
    } finally {
      native.regionClose(region);
    }
  } finally {
    closeSync(fd);
  }
}

describe('MappedRegion of a memory or disk file', () => {
  it('finds its holes of MEMORY_MIN_HOLE_BYTES or more; a smaller hole is data (the last page, written to size the file, is data too)', async () => {
    const path = memoryFile([
      [0, 10],
      [10 + MIN_HOLE - 1, 5],
      [1000, 1],
    ]);
    const runs = await reader(path).dataRuns();
    expect([...runs]).toEqual([0, 10 + MIN_HOLE - 1 + 5, 1000, 1, PAGES - 1, 1]);
  });

  it('digests a hole written since dataRuns as the data it now holds, and leaves the holes unread', async () => {
    const path = memoryFile([
      [0, 100],
      [2000, 100],
    ]);
    const region = reader(path);
    const runs = await region.dataRuns();
    expect([...runs]).toEqual([0, 100, 2000, 100, PAGES - 1, 1]);
    // A page of a hole written since (the guest did; a tracker that missed it changes nothing here).
    const fd = openSync(path, 'r+');
    try {
      writeSync(fd, Buffer.alloc(PAGE, 0xab), 0, PAGE, 1500 * PAGE);
    } finally {
      closeSync(fd);
    }
    const digest = await region.digest();
    // The holes the digest skipped are holes still: it did not read them through its mapping.
    const fd2 = openSync(path, 'r');
    try {
      expect([...native.fileDataRuns(fd2, PAGE, PAGES)]).toEqual([0, 100, 1500, 1, 2000, 100, PAGES - 1, 1]);
    } finally {
      closeSync(fd2);
    }
    expect(digest.equals(await fullDigest(path))).toBe(true);
  });

  it('a disk no round walked yet (a post-copy taken over after a restart) is digested from its data now, its holes unread', async () => {
    const path = memoryFile([
      [5, 1],
      [3000, 3],
    ]);
    const digest = await reader(path, true).digest();
    const fd = openSync(path, 'r');
    try {
      expect([...native.fileDataRuns(fd, PAGE, PAGES)]).toEqual([5, 1, 3000, 3, PAGES - 1, 1]);
    } finally {
      closeSync(fd);
    }
    expect(digest.equals(await fullDigest(path))).toBe(true);
  });
});
