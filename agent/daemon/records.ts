// What `gangway status` lists of this agent's migrations, in both directions: each running
// one, and the last hundred that ended. The agent's own accounts of them; the guests' state
// lives in the guest registry.
import type { IncomingResult } from '../migration/destination.js';
import type { MigrationProgress, MigrationSummary } from '../migration/source.js';

export type MigrationRecord =
  | { direction: 'out'; state: 'running'; migrationId: string; guest: string; to: string; startedAt: string; progress?: MigrationProgress }
  | { direction: 'out'; state: 'committed'; migrationId: string; guest: string; to: string; startedAt: string; summary: MigrationSummary }
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
  | { direction: 'out'; state: 'failed' | 'in-doubt' | 'interrupted'; migrationId: string; guest: string; to: string; startedAt: string; error: { code: string; message: string } }
  | { direction: 'in'; state: 'running' | 'committed' | 'aborted' | 'stranded'; migrationId: string; guest: string; from: string; startedAt: string; result?: IncomingResult };

/** How many ended migrations are remembered; running ones always are. */
const MAX_FINISHED_RECORDS = 100;

/** The records by migration id, oldest first (a record keeps its place when it is updated). */
export class MigrationRecords {
  private readonly byId = new Map<string, MigrationRecord>();

  get(migrationId: string): MigrationRecord | undefined {
    return this.byId.get(migrationId);
  }

  has(migrationId: string): boolean {
    return this.byId.has(migrationId);
  }

  set(migrationId: string, record: MigrationRecord): void {
    this.byId.set(migrationId, record);
  }

  values(): IterableIterator<MigrationRecord> {
    return this.byId.values();
  }

  /** Newest first, as status lists them. */
  newestFirst(): MigrationRecord[] {
    return [...this.byId.values()].reverse();
  }

  /** Forgets the oldest ended migrations beyond the last hundred. */
  trim(): void {
    const finished = [...this.byId.entries()].filter(([, r]) => r.state !== 'running');
    for (const [id] of finished.slice(0, Math.max(0, finished.length - MAX_FINISHED_RECORDS))) this.byId.delete(id);
  }
}
