// What `gangway status` lists of this agent's migrations, in both directions: each running
// one, and the last hundred that ended. The agent's own accounts of them; the guests' state
// lives in the guest registry.
import type { IncomingResult } from '../migration/destination.js';
import type { MigrationProgress, MigrationSummary } from '../migration/source.js';
import { entryOf, type HistoryEntry } from './outcome.js';

/**
 * An outgoing migration's times: `queuedAt` when it had to wait for a slot
 * (migration.maxParallelOutbound; startedAt is then when it got one), `endedAt` once it ended.
 */
interface OutTimes {
  queuedAt?: string;
  endedAt?: string;
}

export type MigrationRecord =
  | { direction: 'out'; state: 'queued'; migrationId: string; guest: string; to: string; startedAt: string; queuedAt: string }
  | ({ direction: 'out'; state: 'running'; migrationId: string; guest: string; to: string; startedAt: string; progress?: MigrationProgress } & OutTimes)
  | ({ direction: 'out'; state: 'committed'; migrationId: string; guest: string; to: string; startedAt: string; summary: MigrationSummary } & OutTimes)
  | {
      direction: 'out';
      state: 'resumed';
      migrationId: string;
      guest: string;
      to: string;
      startedAt: string;
      /** Post-copy completed by this agent after a restart. */
      resumed: { verified: boolean; pushedPages: number; faultPages: number };
    }
  | ({ direction: 'out'; state: 'failed' | 'in-doubt' | 'interrupted'; migrationId: string; guest: string; to: string; startedAt: string; error: { code: string; message: string } } & OutTimes)
  | { direction: 'in'; state: 'running' | 'committed' | 'aborted' | 'stranded'; migrationId: string; guest: string; from: string; startedAt: string; result?: IncomingResult };

/** How many ended migrations are remembered; running and queued ones always are. */
const MAX_FINISHED_RECORDS = 100;

/** What the agent does when a record starts, reports progress or ends (history, events). */
export interface RecordHooks {
  started?(record: MigrationRecord): void;
  progress?(record: MigrationRecord, progress: MigrationProgress): void;
  ended?(entry: HistoryEntry): void;
  /** An outgoing migration's source moved to `phase` (the switchover's steps among them). */
  phase?(record: MigrationRecord, phase: string): void;
}

/** A record as status lists it: an ended one says how it ended in the vocabulary of outcome.ts. */
export type ListedRecord = MigrationRecord & Partial<Pick<HistoryEntry, 'outcome' | 'cancelledBy'>>;

/** The records by migration id, oldest first (a record keeps its place when it is updated). */
export class MigrationRecords {
  private readonly byId = new Map<string, MigrationRecord>();
  /** How each ended record ended, by migration id. */
  private readonly endings = new Map<string, HistoryEntry>();
  /** Outgoing migrations this agent's operator cancelled (their records end as failed, with ABORTED). */
  private readonly cancelled = new Set<string>();

  constructor(private readonly hooks: RecordHooks = {}) {}

  get(migrationId: string): MigrationRecord | undefined {
    return this.byId.get(migrationId);
  }

  has(migrationId: string): boolean {
    return this.byId.has(migrationId);
  }

  set(migrationId: string, record: MigrationRecord): void {
    const before = this.byId.get(migrationId);
    this.byId.set(migrationId, record);
    // A queued migration (waiting for a slot, drain.ts) starts when it runs; it may also end
    // (a cancel) without having run.
    if (record.state === 'queued') return;
    if (record.state === 'running') {
      if (!before || before.state === 'queued') this.hooks.started?.(record);
      else if (record.direction === 'out' && record.progress) this.hooks.progress?.(record, record.progress);
      return;
    }
    if (before && before.state !== 'running' && before.state !== 'queued') return;
    const entry = entryOf(record, this.cancelled.has(migrationId));
    this.cancelled.delete(migrationId);
    this.endings.set(migrationId, entry);
    this.hooks.ended?.(entry);
  }

  /** An outgoing migration's phase changed. */
  notePhase(migrationId: string, phase: string): void {
    const record = this.byId.get(migrationId);
    if (record) this.hooks.phase?.(record, phase);
  }

  /** The operator asked to cancel this outgoing migration: if it fails now, it was cancelled. */
  noteCancelled(migrationId: string): void {
    this.cancelled.add(migrationId);
  }

  /** How the migration ended, once it has. */
  ending(migrationId: string): HistoryEntry | undefined {
    return this.endings.get(migrationId);
  }

  values(): IterableIterator<MigrationRecord> {
    return this.byId.values();
  }

  /** Newest first, as status lists them. */
  newestFirst(): ListedRecord[] {
    return [...this.byId.values()].reverse().map((record) => {
      const entry = this.endings.get(record.migrationId);
      return entry ? { ...record, outcome: entry.outcome, ...(entry.cancelledBy ? { cancelledBy: entry.cancelledBy } : {}) } : record;
    });
  }

  /** Forgets the oldest ended migrations beyond the last hundred. */
  trim(): void {
    const finished = [...this.byId.entries()].filter(([, r]) => r.state !== 'running' && r.state !== 'queued');
    for (const [id] of finished.slice(0, Math.max(0, finished.length - MAX_FINISHED_RECORDS))) {
      this.byId.delete(id);
      this.endings.delete(id);
    }
  }
}
