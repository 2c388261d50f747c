// How a migration ended, in the one vocabulary both sides use (status, history, events):
// the source's record states (committed, resumed, failed, in-doubt, interrupted) and the
// destination's (committed, aborted, stranded) mapped to what happened to the migration.
// A cancel is a cancel on both sides: the source's operator cancelled it there, and the
// destination saw the source's cancel; neither reads as a failure.
import { contentShares, measuredDirtyRate, type ContentShares, type ForecastRecord } from '../planner/forecast-check.js';
import { ErrorCode } from '../../protocol/errors.js';
import type { MigrationRecord } from './records.js';

export const OUTCOMES = [
  /** The guest runs at the destination, complete (a post-copy finished after a restart too). */
  'completed',
  /** Stopped on purpose before the switchover; the guest runs on at the source. */
  'cancelled',
  /** Ended by an error before the switchover; the guest runs on at the source. */
  'failed',
  /** The commit went out unconfirmed: the source asks the destination where the guest runs. */
  'in-doubt',
  /** Post-copy: the link broke while the destination ran the guest and lacked pages the source keeps. */
  'interrupted',
  /** Post-copy at the destination: the guest started here and some of its pages never came. */
  'stranded',
] as const;
export type Outcome = (typeof OUTCOMES)[number];

export const CANCELLERS = ['operator', 'source'] as const;
/** Who cancelled: this host's operator (at the source), or the source (as its destination saw it). */
export type Canceller = (typeof CANCELLERS)[number];

/** One ended migration: what `gangway history` lists and the history file keeps. */
export interface HistoryEntry {
  migrationId: string;
  direction: 'out' | 'in';
  guest: string;
  /** The destination's address (out) or the source agent's id (in). */
  peer: string;
  startedAt: string;
  endedAt: string;
  outcome: Outcome;
  cancelledBy?: Canceller;
  /** Why it did not complete, once (not repeated in a message of its own). */
  error?: { code: string; message: string };
  technique?: 'precopy' | 'postcopy' | 'hybrid';
  totalMs?: number;
  downtimeMs?: number;
  wireBytes?: number;
  memoryBytes?: number;
  rounds?: number;
  /** A hybrid that went post-copy (post-copy and pre-copy say so by their technique). */
  wentPostcopy?: boolean;
  /** The guest's dirty rate as the tracker measured it in the pre-copy rounds. */
  dirtyRateBytesPerSec?: number;
  /** Shares of round 0's pages that were zero, and (with dedup) repeated or found elsewhere: see contentShares. */
  content?: ContentShares;
  /** What the planner forecast, beside what happened (calibration fits the one to the other). */
  forecast?: ForecastRecord;
}

/** The history entry of an ended record; `cancelled`: this agent's operator cancelled it. */
export function entryOf(record: Exclude<MigrationRecord, { state: 'running' | 'queued' }>, cancelled: boolean, endedAt = new Date().toISOString()): HistoryEntry {
  const base = { migrationId: record.migrationId, direction: record.direction, guest: record.guest, startedAt: record.startedAt, endedAt };
  if (record.direction === 'in') {
    const result = record.result;
    const facts = { ...base, peer: record.from, ...(result ? { technique: result.technique, rounds: result.rounds } : {}) };
    if (record.state === 'committed') return { ...facts, outcome: 'completed' };
    if (record.state === 'stranded') return { ...facts, outcome: 'stranded', error: { code: ErrorCode.ABORTED, message: result?.reason ?? 'post-copy did not complete' } };
    if (result?.sourceCode === ErrorCode.ABORTED) return { ...facts, outcome: 'cancelled', cancelledBy: 'source' };
    return { ...facts, outcome: 'failed', error: { code: result?.sourceCode ?? ErrorCode.ABORTED, message: result?.reason ?? 'aborted' } };
  }
  const facts = { ...base, peer: record.to };
  switch (record.state) {
    case 'committed': {
      const s = record.summary;
      const dirtyRateBytesPerSec = measuredDirtyRate(s.rounds);
      const content = contentShares(s.rounds, s.dedup.enabled);
      return {
        ...facts,
        outcome: 'completed',
        technique: s.technique,
        totalMs: s.totalMs,
        downtimeMs: s.downtimeMs,
        wireBytes: s.wireBytes,
        memoryBytes: s.memoryBytes,
        rounds: s.rounds.length,
        ...(s.technique === 'hybrid' ? { wentPostcopy: s.postcopy !== undefined } : {}),
        ...(dirtyRateBytesPerSec !== undefined ? { dirtyRateBytesPerSec } : {}),
        ...(content ? { content } : {}),
        ...(s.forecast ? { forecast: s.forecast } : {}),
      };
    }
    case 'resumed':
      return { ...facts, outcome: 'completed', technique: 'postcopy' };
    case 'failed':
      return cancelled ? { ...facts, outcome: 'cancelled', cancelledBy: 'operator' } : { ...facts, outcome: 'failed', error: record.error };
    default:
      return { ...facts, outcome: record.state, error: record.error };
  }
}

/** One line of text for an entry (history, watch, status). */
export function outcomeText(entry: Pick<HistoryEntry, 'outcome' | 'cancelledBy' | 'error' | 'direction'>): string {
  if (entry.outcome === 'cancelled') {
    return entry.cancelledBy === 'operator' ? 'cancelled by the operator' : entry.direction === 'in' ? 'cancelled at the source' : 'cancelled';
  }
  return entry.error ? `${entry.outcome}: ${entry.error.message} [${entry.error.code}]` : entry.outcome;
}
