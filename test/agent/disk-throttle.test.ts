// When the guest's disk writes are held back so that pre-copy converges (disk-throttle.ts).
import { describe, expect, it } from 'vitest';
import { DISK_FINAL_ROUND_MS, diskHoldsStop, diskWriteLimit, MAX_DISK_EXTRA_ROUNDS, MIN_DISK_WRITE_LIMIT_BYTES_PER_SEC } from '../../agent/migration/disk-throttle.js';

const MiB = 1024 * 1024;
const base = { roundsDone: 2, converging: false, diskDirtyBytesPerSec: 40 * MiB, memoryDirtyBytesPerSec: 0, linkRateBytesPerSec: 20 * MiB, currentLimitBytesPerSec: undefined };

describe('diskWriteLimit', () => {
  it('leaves a guest alone while the rounds converge, before a round measured it, and when its disks are idle', () => {
    expect(diskWriteLimit({ ...base, converging: true })).toBeUndefined();
    expect(diskWriteLimit({ ...base, roundsDone: 0 })).toBeUndefined();
    expect(diskWriteLimit({ ...base, diskDirtyBytesPerSec: 0 })).toBeUndefined();
  });

  it('holds disk writes to the share of the link that memory leaves, or half their rate if that is less', () => {
    expect(diskWriteLimit(base)).toBe(10 * MiB);
    expect(diskWriteLimit({ ...base, memoryDirtyBytesPerSec: 4 * MiB })).toBe(6 * MiB);
    expect(diskWriteLimit({ ...base, diskDirtyBytesPerSec: 8 * MiB })).toBe(4 * MiB);
  });

  it('never below the minimum, and only ever tighter than the limit in force', () => {
    expect(diskWriteLimit({ ...base, memoryDirtyBytesPerSec: 30 * MiB })).toBe(MIN_DISK_WRITE_LIMIT_BYTES_PER_SEC);
    expect(diskWriteLimit({ ...base, currentLimitBytesPerSec: 11 * MiB })).toBeUndefined();
    expect(diskWriteLimit({ ...base, currentLimitBytesPerSec: 20 * MiB })).toBe(10 * MiB);
    expect(diskWriteLimit({ ...base, currentLimitBytesPerSec: MIN_DISK_WRITE_LIMIT_BYTES_PER_SEC })).toBeUndefined();
  });
});

describe('diskHoldsStop', () => {
  const stop = { diskPages: 2000, previousDiskPages: 10_000, diskFinalMs: 60, extraRounds: 0, roundsDone: 3, maxRounds: 30 };

  it('asks for another round while the disks\' last blocks would take more than their share of the downtime and the rounds shrink them', () => {
    expect(diskHoldsStop(stop)).toMatch(/2000 last blocks would take 60.0 ms of the downtime \(at most 20\): one more round/);
  });

  it('lets the switchover go when the blocks fit, are none, no longer shrink, or the disks had their extra rounds', () => {
    expect(diskHoldsStop({ ...stop, diskFinalMs: DISK_FINAL_ROUND_MS })).toBeUndefined();
    expect(diskHoldsStop({ ...stop, diskPages: 0 })).toBeUndefined();
    expect(diskHoldsStop({ ...stop, diskPages: 8001 })).toBeUndefined();
    expect(diskHoldsStop({ ...stop, extraRounds: MAX_DISK_EXTRA_ROUNDS })).toBeUndefined();
  });

  it('never takes the migration up to its round limit (that would fail it)', () => {
    expect(diskHoldsStop({ ...stop, roundsDone: 29 })).toBeUndefined();
    expect(diskHoldsStop({ ...stop, roundsDone: 28 })).toBeDefined();
  });
});
