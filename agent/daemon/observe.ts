// What the agent makes of its migration records as they change: each ended migration goes
// into the history file, and starts, round ends, switchovers and ends go out as events.
import type { Logger } from '../log.js';
import type { MigrationProgress } from '../migration/source.js';
import type { EventBus } from './events.js';
import type { MigrationHistory } from './history.js';
import type { RecordHooks } from './records.js';

/** The phases a source goes through at its switchover, each reported once. */
const SWITCHOVER_PHASES = new Set(['stopping', 'verifying', 'committing', 'postcopy-switch', 'postcopy']);

export function recordHooks(events: EventBus, history: MigrationHistory, log: Logger): RecordHooks {
  // The last round reported as ended, by migration: a round's last progress report comes
  // with all of its pages sent, and a report of a later round means it ended too.
  const roundsEnded = new Map<string, number>();
  return {
    started(record) {
      events.publish({ type: 'migration-started', migrationId: record.migrationId, direction: record.direction, guest: record.guest, peer: record.direction === 'out' ? record.to : record.from });
    },
    progress(record, progress: MigrationProgress) {
      if (progress.phase !== 'precopy' || progress.roundPagesSent < progress.roundPages) return;
      if ((roundsEnded.get(record.migrationId) ?? -1) >= progress.round) return;
      roundsEnded.set(record.migrationId, progress.round);
      const c = progress.convergence;
      events.publish({
        type: 'round-ended',
        migrationId: record.migrationId,
        guest: record.guest,
        round: progress.round,
        pages: progress.roundPages,
        wireBytes: progress.wireBytes,
        ...(c ? { dirtyRateBytesPerSec: c.dirtyRateBytesPerSec, predictedDowntimeMs: c.predictedDowntimeMs, converging: c.converging, ...(c.totalEtaMs !== undefined ? { totalEtaMs: c.totalEtaMs } : {}) } : {}),
      });
    },
    phase(record, phase) {
      if (SWITCHOVER_PHASES.has(phase)) events.publish({ type: 'switchover', migrationId: record.migrationId, guest: record.guest, phase });
    },
    ended(entry) {
      roundsEnded.delete(entry.migrationId);
      try {
        history.add(entry);
      } catch (err) {
        // The migration's end is still in status and the event; only the file missed it.
        log.error({ migrationId: entry.migrationId, file: history.path, err: (err as Error).message }, 'could not write the migration history');
      }
      events.publish({ type: 'migration-ended', entry });
    },
  };
}
