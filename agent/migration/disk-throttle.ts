// A guest that writes its disks faster than the link carries them never lets pre-copy
// converge: every round finds as many dirty blocks as it sent. Memory has no brake here, but
// a disk does: QEMU's I/O limits slow the guest's disk writes. One explicit, pure function
// says when and how much, from what the rounds measured; the engine applies it through the
// guest (SourceGuest.limitDiskWrites) and the limit goes when the migration ends.

/** The least write rate a disk is ever held to: the guest slows down, it does not stop. */
export const MIN_DISK_WRITE_LIMIT_BYTES_PER_SEC = 1024 * 1024;
/** The share of the link the guest's writes (memory and disk) may take for the rounds to shrink quickly. */
const DIRTY_SHARE_OF_LINK = 0.5;
/** A new limit is set only when it is this much below the one in force (no churn of QMP calls). */
const TIGHTEN_BELOW = 0.8;

export interface DiskThrottleInput {
  /** Rounds completed (1 after round 0). */
  roundsDone: number;
  /** Do the rounds converge (the policy's view, and the dirty set shrinking round over round)? */
  converging: boolean;
  /** Guest bytes written to the moving disks per second, and to memory, over the last round. */
  diskDirtyBytesPerSec: number;
  memoryDirtyBytesPerSec: number;
  linkRateBytesPerSec: number;
  /** The limit in force (bytes/s of guest disk writes), if any. */
  currentLimitBytesPerSec: number | undefined;
}

/**
 * The write rate to hold the guest's disks to from now on, or undefined to leave things as
 * they are: only when the rounds do not converge and the disks are writing, at the share of
 * the link memory leaves them (never below the minimum), and only ever tighter.
 */
export function diskWriteLimit(input: DiskThrottleInput): number | undefined {
  if (input.roundsDone < 1 || input.converging || input.diskDirtyBytesPerSec <= 0) return undefined;
  const room = input.linkRateBytesPerSec * DIRTY_SHARE_OF_LINK - input.memoryDirtyBytesPerSec;
  const target = Math.max(MIN_DISK_WRITE_LIMIT_BYTES_PER_SEC, Math.min(room, input.diskDirtyBytesPerSec * DIRTY_SHARE_OF_LINK));
  const current = input.currentLimitBytesPerSec;
  if (current !== undefined && target >= current * TIGHTEN_BELOW) return undefined;
  if (current !== undefined && current <= MIN_DISK_WRITE_LIMIT_BYTES_PER_SEC) return undefined;
  return Math.floor(target);
}
