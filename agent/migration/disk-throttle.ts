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

/**
 * The part of the downtime a disk's last blocks may take, beyond what the same VM's
 * RAM-only switchover costs: its final blocks at the link's rate. The downtime budget alone
 * would let a guest writing its disk stop with up to the whole budget of blocks to send.
 */
export const DISK_FINAL_ROUND_MS = 20;
/** Extra rounds the disks may ask for after the policy said stop. */
export const MAX_DISK_EXTRA_ROUNDS = 4;
/** A round must leave at most this share of the disk blocks the previous one left, or another does not pay. */
const DISK_SHRINK = 0.8;

export interface DiskStopInput {
  /** The disks' blocks the final round would send now, and what the round before left. */
  diskPages: number;
  previousDiskPages: number;
  /** Time those blocks would take on the link, as the policy predicts it (safety factor included). */
  diskFinalMs: number;
  /** Rounds the disks have already added after a stop. */
  extraRounds: number;
  /** Rounds done, and allowed (an extra round never reaches the limit: it would fail the migration). */
  roundsDone: number;
  maxRounds: number;
}

/**
 * When the policy says stop: another round first (with the reason), or undefined to stop.
 * Another round while the disks' final blocks would take more than DISK_FINAL_ROUND_MS and
 * the rounds still shrink them (a round that does not is what the write limit is for),
 * at most MAX_DISK_EXTRA_ROUNDS times and never up to the round limit.
 */
export function diskHoldsStop(input: DiskStopInput): string | undefined {
  if (input.diskPages === 0 || input.diskFinalMs <= DISK_FINAL_ROUND_MS) return undefined;
  if (input.extraRounds >= MAX_DISK_EXTRA_ROUNDS || input.roundsDone + 1 >= input.maxRounds) return undefined;
  if (input.diskPages > input.previousDiskPages * DISK_SHRINK) return undefined;
  return `the disks' ${input.diskPages} last blocks would take ${input.diskFinalMs.toFixed(1)} ms of the downtime (at most ${DISK_FINAL_ROUND_MS}): one more round`;
}
