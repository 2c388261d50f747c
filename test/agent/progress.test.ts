// Progress as a migration reports it and the CLI prints it: the disks apart, with an ETA that
// never goes up.
import { describe, expect, it } from 'vitest';
import { progressLine } from '../../agent/cli/format.js';
import { NonIncreasingEta } from '../../agent/migration/rounds.js';
import type { MigrationProgress } from '../../agent/migration/source-types.js';

const MiB = 1024 * 1024;

describe('NonIncreasingEta', () => {
  it('takes each estimate that is lower and holds the last one when a new one is higher', () => {
    const eta = new NonIncreasingEta();
    expect(eta.value).toBeUndefined();
    expect([5000, 4000, 6000, 4500, 1000, 0, 20].map((ms) => eta.update(ms))).toEqual([5000, 4000, 4000, 4000, 1000, 0, 0]);
    expect(eta.value).toBe(0);
  });
});

describe('progressLine', () => {
  const base: MigrationProgress = {
    migrationId: 'm',
    guest: 'vm1',
    phase: 'precopy',
    round: 2,
    roundPages: 3000,
    roundPagesSent: 1500,
    percent: 50,
    rateBytesPerSec: 100 * MiB,
    etaMs: 60,
    wireBytes: 300 * MiB,
  };

  it("shows the disks' blocks, their rate and their ETA apart from the round's", () => {
    const line = progressLine({ ...base, disk: { roundBlocks: 2000, roundBlocksSent: 500, rateBytesPerSec: 20 * MiB, etaMs: 1500, blocksSent: 70_000 } });
    expect(line).toBe('vm1: round 2 · 50.0% of 3000 pages (disks 25% of 2000 blocks at 20.0 MiB/s, ETA 1.50 s) · 100.0 MiB/s · ETA 60.0 ms · wire 300.0 MiB');
    expect(progressLine(base)).not.toMatch(/disks/);
  });
});
