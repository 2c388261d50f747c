// Human output of the CLI: progress lines and summaries.
import type { MigrationProgress, MigrationSummary } from '../migration/source.js';
import { formatBytes, formatRate } from '../units.js';

export function formatMs(ms: number): string {
  return ms >= 10_000 ? `${(ms / 1000).toFixed(1)} s` : ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(1)} ms`;
}

export function progressLine(p: MigrationProgress): string {
  const eta = p.etaMs === undefined ? '' : ` · ETA ${formatMs(p.etaMs)}`;
  const phase = p.phase === 'precopy' ? `round ${p.round}` : `${p.phase} (final round)`;
  return `${p.guest}: ${phase} · ${p.percent.toFixed(1)}% of ${p.roundPages} pages · ${formatRate(p.rateBytesPerSec)}${eta} · wire ${formatBytes(p.wireBytes)}`;
}

export function summaryText(s: MigrationSummary): string {
  const d = s.downtime;
  const rounds = s.rounds.map((r) => `${r.final ? 'final ' : ''}${r.pages}`).join(', ');
  return [
    `migrated ${s.guest} to ${s.to} in ${formatMs(s.totalMs)}: memory digests match (${s.digests.join(', ')})${s.forced ? ' [forced stop at a limit]' : ''}`,
    `  downtime     ${formatMs(s.downtimeMs)} (pause ${formatMs(d.pauseMs)}, final round ${formatMs(d.finalRoundMs)}, verify ${formatMs(d.verifyMs)}, commit ${formatMs(d.commitMs)}, rtt ${formatMs(d.rttMs)})`,
    `  rounds       ${s.rounds.length} (pages per round: ${rounds})`,
    `  wire         ${formatBytes(s.wireBytes)} for ${formatBytes(s.memoryBytes)} of memory; ${s.zeroPages} zero pages sent as runs; data compressed to ${(s.compressionRatio * 100).toFixed(1)}%`,
    `  link         ${formatRate(s.linkRateBytesPerSec)}; dirty tracking ${s.tracker}${s.trackerFallbackReason ? ` (${s.trackerFallbackReason})` : ''}`,
  ].join('\n');
}
