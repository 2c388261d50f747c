// The summary of a `gangway migrate` of one or more guests, with the seed paper's
// definitions of a group's times (003, "serial vs parallel"): moved one after another, the
// total time and the downtime are the sums over the guests; moved together (gang), they are
// the maxima.
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import type { MigrationSummary } from './source.js';

export interface GroupOutcome {
  guest: string;
  summary?: MigrationSummary;
  error?: { code: string; message: string };
}

export interface GroupSummary {
  strategy: 'gang' | 'serial';
  /** Dedup was asked for and the destination offers it. */
  dedup: boolean;
  from: string;
  to: string;
  /** The guests that moved, in the order asked. */
  guests: MigrationSummary[];
  failed: { guest: string; code: string; message: string }[];
  /** By the strategy's definition: serial, the sum of the guests' times; gang, the maximum. */
  totalMs: number;
  downtimeMs: number;
  maxDowntimeMs: number;
  /** Wall-clock time of the whole command, session set-up included. */
  elapsedMs: number;
  memoryBytes: number;
  /** The data the moved disks held (their holes are never sent). */
  diskDataBytes: number;
  wireBytes: number;
  /** Wire bytes per byte of guest memory and disk data moved. */
  wireRatio: number;
  /** Pages sent again at the switchovers (the dirty tracker had missed writes to them). */
  repairedPages: number;
  dedupStats: {
    refPages: number;
    unchangedPages: number;
    hits: { intra: number; crossRound: number; crossGuest: number; resident: number };
    savedBytes: number;
    wantedPages: number;
  };
  /**
   * --technique auto: the plan followed (or why none was: followed false), with its reasons;
   * each guest's summary carries its own `plan`. Absent for a fixed technique.
   */
  plan?: {
    followed: boolean;
    priority: 'high' | 'medium' | 'low';
    strategy: 'gang' | 'serial';
    /** The rate the sender's pacer held the command to for the plan; null: not paced by the plan. */
    pacedBytesPerSec: number | null;
    reasons: string[];
    assumptions: string[];
  };
  /** The source's content index of each dedup group (one for gang, one per guest for serial). */
  index: { locations: number; knownLocations: number; contents: number; memoryBytes: number }[];
}

export function outcomeOf(guest: string, result: PromiseSettledResult<MigrationSummary>): GroupOutcome {
  if (result.status === 'fulfilled') return { guest, summary: result.value };
  const error = result.reason instanceof GangwayError ? result.reason : new GangwayError(ErrorCode.INTERNAL, String(result.reason));
  return { guest, error: { code: error.code, message: error.message } };
}

export function summarizeGroup(
  request: { strategy: 'gang' | 'serial'; to: string },
  dedup: boolean,
  from: string,
  outcomes: GroupOutcome[],
  elapsedMs: number,
  index: GroupSummary['index'],
): GroupSummary {
  const guests = outcomes.flatMap((o) => (o.summary ? [o.summary] : []));
  const failed = outcomes.flatMap((o) => (o.error ? [{ guest: o.guest, ...o.error }] : []));
  const sum = (f: (s: MigrationSummary) => number) => guests.reduce((total, s) => total + f(s), 0);
  const max = (f: (s: MigrationSummary) => number) => guests.reduce((most, s) => Math.max(most, f(s)), 0);
  const combine = request.strategy === 'serial' ? sum : max;
  const memoryBytes = sum((s) => s.memoryBytes);
  const diskDataBytes = sum((s) => (s.disks ?? []).reduce((total, d) => total + d.dataBytes, 0));
  const wireBytes = sum((s) => s.wireBytes);
  return {
    strategy: request.strategy,
    dedup,
    from,
    to: request.to,
    guests,
    failed,
    totalMs: combine((s) => s.totalMs),
    downtimeMs: combine((s) => s.downtimeMs),
    maxDowntimeMs: max((s) => s.downtimeMs),
    elapsedMs,
    memoryBytes,
    diskDataBytes,
    wireBytes,
    wireRatio: memoryBytes + diskDataBytes > 0 ? wireBytes / (memoryBytes + diskDataBytes) : 0,
    repairedPages: sum((s) => s.repairedPages),
    dedupStats: {
      refPages: sum((s) => s.dedup.refPages),
      unchangedPages: sum((s) => s.dedup.unchangedPages),
      hits: {
        intra: sum((s) => s.dedup.hits.intra),
        crossRound: sum((s) => s.dedup.hits.crossRound),
        crossGuest: sum((s) => s.dedup.hits.crossGuest),
        resident: sum((s) => s.dedup.hits.resident),
      },
      savedBytes: sum((s) => s.dedup.savedBytes),
      wantedPages: sum((s) => s.dedup.wantedPages),
    },
    index,
  };
}
