// The zero share a forecast starts from: read from a sample of the guest's memory files, spread
// over every region, a sparse region (a disk) left out; and the shares round 0 found, kept in
// the history for the next forecast.
import { rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { makeTempDir } from '../../agent/local-agent.js';
import { sampleZeroShare } from '../../agent/guest/content-sample.js';
import type { GuestRegion } from '../../agent/guest/adapter.js';
import { contentShares } from '../../agent/planner/forecast-check.js';

const PAGE = 4096;

/** A memory file of `pages` pages, page p non-zero where `dataAt(p)` (one byte set: a page with a single byte is not zero). */
function memoryFile(dir: string, name: string, pages: number, dataAt: (p: number) => boolean): GuestRegion {
  const bytes = Buffer.alloc(pages * PAGE);
  for (let p = 0; p < pages; p++) if (dataAt(p)) bytes[p * PAGE + ((p * 37) % PAGE)] = 1;
  const path = join(dir, name);
  writeFileSync(path, bytes);
  return { name, path, lengthBytes: pages * PAGE, pageSizeBytes: PAGE };
}

describe('the zero share sampled from a guest memory', () => {
  let dir: string | undefined;
  afterEach(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
    dir = undefined;
  });

  it('reads every page of a small guest: the share is exact', async () => {
    dir = makeTempDir('gangway-sample-');
    const region = memoryFile(dir, 'ram', 1000, (p) => p % 4 === 0);
    expect(await sampleZeroShare([region])).toEqual({ zeroShare: 0.75, pages: 1000 });
  });

  it('spreads a bounded sample over every region, and leaves a sparse region out', async () => {
    dir = makeTempDir('gangway-sample-');
    // ram: all data; ram1 (three times larger): all zero. A disk of data is not memory.
    const ram = memoryFile(dir, 'ram', 4096, () => true);
    const ram1 = memoryFile(dir, 'ram1', 3 * 4096, () => false);
    const disk = { ...memoryFile(dir, 'disk0', 4096, () => true), sparse: true };
    const sample = (await sampleZeroShare([ram, disk, ram1], 1024))!;
    expect(sample.pages).toBe(1024);
    expect(sample.zeroShare).toBeCloseTo(0.75, 2);
  });

  it('a pattern finer than the reads: a page in eight holds data', async () => {
    dir = makeTempDir('gangway-sample-');
    const region = memoryFile(dir, 'ram', 64 * 1024, (p) => p % 8 === 3);
    const sample = (await sampleZeroShare([region], 2048))!;
    expect(sample.pages).toBe(2048);
    expect(sample.zeroShare).toBeCloseTo(7 / 8, 2);
  });

  it('nothing to read, or a file gone: not measured', async () => {
    dir = makeTempDir('gangway-sample-');
    expect(await sampleZeroShare([])).toBeUndefined();
    expect(await sampleZeroShare([{ name: 'ram', path: join(dir, 'gone'), lengthBytes: 4 * PAGE, pageSizeBytes: PAGE }])).toBeUndefined();
  });
});

describe("round 0's content shares", () => {
  const round = (round: number, pages: number, zeroPages: number, hitsIntra = 0, hitsCrossGuest = 0, hitsResident = 0) => ({ round, pages, zeroPages, hitsIntra, hitsCrossGuest, hitsResident });

  it('zero share always; repeats and sharing only where dedup ran', () => {
    const rounds = [round(0, 1000, 200, 100, 50, 25), round(1, 10, 0, 5)];
    expect(contentShares(rounds, true)).toEqual({ zeroShare: 0.2, duplicateShare: 0.1, sharedShare: 0.075 });
    expect(contentShares(rounds, false)).toEqual({ zeroShare: 0.2 });
  });

  it('no round 0 (post-copy from the start), or an empty one: nothing', () => {
    expect(contentShares([], true)).toBeUndefined();
    expect(contentShares([round(0, 0, 0)], true)).toBeUndefined();
  });
});
