// Text of what the CLI shows of migrations as they go and after they end: a running
// migration's line (status, progress on a non-TTY stderr), events, history entries.
import type { AgentEvent } from '../daemon/events.js';
import { outcomeText, type HistoryEntry } from '../daemon/outcome.js';
import type { MigrationProgress } from '../migration/source.js';
import { formatBytes, formatRate } from '../units.js';
import { formatMs } from './format.js';

/**
 * A running migration in one line: its round and how far, both rates (guest memory and
 * wire, named: compression and dedup make them differ), the guest's dirty rate, the
 * downtime a stop would take now, and the whole migration's ETA (never up), or that it
 * does not converge.
 */
export function liveProgressLine(p: MigrationProgress): string {
  const where = p.phase === 'precopy' ? `round ${p.round}, ${p.percent.toFixed(1)}% of ${p.roundPages} pages` : `${p.phase}, ${p.percent.toFixed(1)}% of ${p.roundPages} pages`;
  const rates = `memory ${formatRate(p.rateBytesPerSec)}, wire ${formatRate(p.wireRateBytesPerSec ?? 0)}`;
  const c = p.convergence;
  const policy = c
    ? `, dirty ${formatRate(c.dirtyRateBytesPerSec)}, expected downtime ${formatMs(c.predictedDowntimeMs)}, ${c.converging && c.totalEtaMs !== undefined ? `ETA ${formatMs(c.totalEtaMs)}` : 'not converging'}`
    : ', ETA after round 0';
  return `${p.guest}: ${where}; ${rates}${policy}; ${formatBytes(p.wireBytes)} sent`;
}

/** Emits progress lines at most every `intervalMs`, and at once when a new round starts. */
export class ProgressThrottle {
  private lastAt = -Infinity;
  private readonly rounds = new Map<string, string>();

  constructor(private readonly intervalMs = 2000) {}

  /** Whether to show this report. */
  take(p: MigrationProgress, nowMs = performance.now()): boolean {
    const step = `${p.phase}:${p.round}`;
    const newStep = this.rounds.get(p.migrationId) !== step;
    this.rounds.set(p.migrationId, step);
    if (!newStep && nowMs - this.lastAt < this.intervalMs) return false;
    this.lastAt = nowMs;
    return true;
  }
}

export function historyEntryText(e: HistoryEntry): string {
  const peer = e.direction === 'out' ? `→ ${e.peer}` : `← ${e.peer}`;
  const facts = [
    e.technique,
    e.totalMs !== undefined ? `total ${formatMs(e.totalMs)}` : undefined,
    e.downtimeMs !== undefined ? `downtime ${formatMs(e.downtimeMs)}` : undefined,
    e.rounds !== undefined ? `${e.rounds} round${e.rounds === 1 ? '' : 's'}` : undefined,
    e.wireBytes !== undefined ? `${formatBytes(e.wireBytes)} on the wire` : undefined,
  ].filter((f) => f !== undefined);
  return `${e.endedAt} migration ${e.migrationId.slice(0, 8)} ${e.guest} ${peer}: ${outcomeText(e)}${facts.length ? ` (${facts.join(', ')})` : ''}`;
}

export function eventText(e: AgentEvent): string {
  const id = 'migrationId' in e ? e.migrationId.slice(0, 8) : '';
  switch (e.type) {
    case 'migration-started':
      return `${e.at} migration ${id} started: ${e.guest} ${e.direction === 'out' ? '→' : '←'} ${e.peer}`;
    case 'round-ended': {
      const policy =
        e.predictedDowntimeMs !== undefined
          ? `; dirty ${formatRate(e.dirtyRateBytesPerSec ?? 0)}, expected downtime ${formatMs(e.predictedDowntimeMs)}, ${e.converging && e.totalEtaMs !== undefined ? `ETA ${formatMs(e.totalEtaMs)}` : e.converging ? 'converging' : 'not converging'}`
          : '';
      return `${e.at} migration ${id} ${e.guest}: round ${e.round} ended, ${e.pages} pages, ${formatBytes(e.wireBytes)} sent${policy}`;
    }
    case 'switchover':
      return `${e.at} migration ${id} ${e.guest}: switchover, ${e.phase}`;
    case 'migration-ended':
      return `${e.at} migration ${e.entry.migrationId.slice(0, 8)} ${e.entry.guest} ${e.entry.direction === 'out' ? '→' : '←'} ${e.entry.peer}: ${outcomeText(e.entry)}`;
    case 'guest-started':
      return `${e.at} guest ${e.guest} started (pid ${e.pid})`;
    case 'guest-stopped':
      return `${e.at} guest ${e.guest} stopped`;
    case 'subscribed':
      return `${e.at} following the events of agent ${e.agentId}`;
    case 'error':
      return `${e.at} error: ${e.error.message} [${e.error.code}]`;
  }
}

/** The exit code a command following a migration ends with: 0 completed, 130 cancelled (as migrate), else 1. */
export function exitCodeOf(entry: Pick<HistoryEntry, 'outcome'>): number {
  return entry.outcome === 'completed' ? 0 : entry.outcome === 'cancelled' ? 130 : 1;
}
