// Human output of the CLI: progress lines and summaries.
import type { MigrationProgress, MigrationSummary } from '../migration/source.js';
import type { GroupSummary } from '../migration/group-summary.js';
import { UNREADABLE_RECORD_ADVICE, type UnreadableRecord } from '../guest/registry.js';
import { formatBytes, formatRate } from '../units.js';
import type { StartedMigrations } from '../control/client.js';

export function formatMs(ms: number): string {
  return ms >= 10_000 ? `${(ms / 1000).toFixed(1)} s` : ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(1)} ms`;
}

export function progressLine(p: MigrationProgress): string {
  // The whole migration's ETA once round 0 has ended (the policy's view); before, the round's own, named as such.
  const c = p.convergence;
  const eta = c
    ? ` · dirty ${formatRate(c.dirtyRateBytesPerSec)} · ${c.converging && c.totalEtaMs !== undefined ? `ETA ${formatMs(c.totalEtaMs)}` : 'not converging'}`
    : p.etaMs === undefined
      ? ''
      : ` · round ETA ${formatMs(p.etaMs)}`;
  const phase = p.phase === 'precopy' ? `round ${p.round}` : `${p.phase} (final round)`;
  const diskEta = p.disk?.etaMs === undefined ? '' : `, ETA ${formatMs(p.disk.etaMs)}`;
  const disk = p.disk && p.disk.roundBlocks > 0 ? ` (disks ${((100 * p.disk.roundBlocksSent) / p.disk.roundBlocks).toFixed(0)}% of ${p.disk.roundBlocks} blocks at ${formatRate(p.disk.rateBytesPerSec)}${diskEta})` : '';
  return `${p.guest}: ${phase} · ${p.percent.toFixed(1)}% of ${p.roundPages} pages${disk} · ${formatRate(p.rateBytesPerSec)}${eta} · wire ${formatBytes(p.wireBytes)}`;
}

/** What the operator changed while it ran (gangway migrate-set, gangway postcopy), in order. */
function operatorChangesText(changes: NonNullable<MigrationSummary['operatorChanges']>): string {
  return changes
    .map((c) => {
      const what = [
        ...(c.bandwidthBytesPerSec !== undefined ? [`bandwidth ${formatRate(c.bandwidthBytesPerSec)}`] : []),
        ...(c.downtimeMs !== undefined ? [`downtime budget ${c.downtimeMs} ms`] : []),
        ...(c.postcopy ? ['post-copy asked for'] : []),
      ];
      return `${what.join(', ')} at ${formatMs(c.afterMs)}`;
    })
    .join('; ');
}

export function summaryText(s: MigrationSummary): string {
  const d = s.downtime;
  const rounds = s.rounds.map((r) => `${r.final ? 'final ' : ''}${r.pages}`).join(', ');
  return [
    `migrated ${s.guest} to ${s.to} in ${formatMs(s.totalMs)}: memory digests match (${s.digests.join(', ')})${s.forced ? ' [forced stop at a limit]' : ''}`,
    `  downtime     ${formatMs(s.downtimeMs)} (pause ${formatMs(d.pauseMs)}, final round ${formatMs(d.finalRoundMs)}, verify ${formatMs(d.verifyMs)}, commit ${formatMs(d.commitMs)}, rtt ${formatMs(d.rttMs)}); ` +
      `budget ${formatMs(s.downtimeBudgetMs)} ${s.downtimeBudgetMet ? 'met' : 'EXCEEDED'}`,
    ...(s.rounds.length > 0 ? [`  rounds       ${s.rounds.length} (pages per round: ${rounds})`] : [`  rounds       none: post-copy from the start`]),
    `  wire         ${formatBytes(s.wireBytes)} for ${formatBytes(s.memoryBytes)} of memory${s.disks?.length ? ` and ${formatBytes(s.disks.reduce((sum, d) => sum + d.dataBytes, 0))} of disk data` : ''}; ${s.zeroPages} zero pages elided; data compressed to ${(s.compressionRatio * 100).toFixed(1)}%`,
    ...(s.disks ?? []).map(
      (d) => `  ${d.name.padEnd(12)} ${formatBytes(d.sizeBytes)}, ${formatBytes(d.dataBytes)} of data at the first round (holes never sent); ${d.blocksSent} blocks sent in ${d.rounds} rounds, ${formatBytes(d.wireBytes)} on the wire`,
    ),
    ...(s.diskWriteLimitBytesPerSec !== undefined
      ? [`  disk writes  held to ${formatRate(s.diskWriteLimitBytesPerSec)} during the migration (the guest wrote its disks faster than the link carried them); the limit is gone`]
      : []),
    s.linkRateBytesPerSec > 0
      ? `  link         ${formatRate(s.linkRateBytesPerSec)}; dirty tracking ${s.tracker}${s.trackerFallbackReason ? ` (${s.trackerFallbackReason})` : ''}`
      : `  dirty tracking ${s.tracker}${s.trackerFallbackReason ? ` (${s.trackerFallbackReason})` : ''}`,
    ...(s.dedup.enabled ? [`  dedup        ${dedupText(s.dedup.hits, s.dedup.savedBytes, s.dedup.wantedPages)}`] : []),
    ...(s.postcopy
      ? [
          `  post-copy    ${s.postcopy.missingPages} pages missing at the switchover${s.postcopy.reason ? ` (${s.postcopy.reason})` : ''}: ` +
            `${s.postcopy.faultPages} sent on ${s.postcopy.faults} faults (latency p50 ${formatMs(s.postcopy.faultLatency.p50Ms)}, p99 ${formatMs(s.postcopy.faultLatency.p99Ms)}, max ${formatMs(s.postcopy.faultLatency.maxMs)}), ` +
            `${s.postcopy.pushedPages} pushed, in ${formatMs(s.postcopy.durationMs)}` +
            (s.postcopy.reattaches > 0 ? `; the link broke and the migration carried on ${s.postcopy.reattaches}x (${s.postcopy.resentPages} pages sent again)` : ''),
        ]
      : []),
    ...(s.operatorChanges?.length ? [`  changed      ${operatorChangesText(s.operatorChanges)}`] : []),
    ...(s.plan ? [`  plan         ${s.plan.technique}${s.plan.strategy ? `, ${s.plan.strategy}` : ''}: ${s.plan.reasons.join('; ')}`] : []),
  ].join('\n');
}

function dedupText(hits: MigrationSummary['dedup']['hits'], savedBytes: number, wantedPages: number): string {
  return (
    `${formatBytes(savedBytes)} of pages not sent (hits: ${hits.intra} within a round, ${hits.crossRound} across rounds, ` +
    `${hits.crossGuest} across guests, ${hits.resident} resident at the destination)` +
    (wantedPages > 0 ? `; ${wantedPages} pages asked for again` : '')
  );
}

/** Progress of several guests on one line: the latest of each. */
export function groupProgressLine(latest: ReadonlyMap<string, MigrationProgress>): string {
  if (latest.size === 1) return progressLine([...latest.values()][0]!);
  return [...latest.values()]
    .map((p) => `${p.guest} ${p.phase === 'precopy' ? `r${p.round}` : p.phase} ${p.percent.toFixed(0)}%`)
    .join(' · ');
}

export function groupSummaryText(g: GroupSummary): string {
  const lines = g.guests.map(summaryText);
  if (g.guests.length + g.failed.length > 1) {
    const rule = g.strategy === 'serial' ? 'sums' : 'maxima';
    lines.push(
      `${g.strategy}: ${g.guests.length} of ${g.guests.length + g.failed.length} guests moved; total ${formatMs(g.totalMs)}, downtime ${formatMs(g.downtimeMs)} (${rule}; longest ${formatMs(g.maxDowntimeMs)})`,
      `  wire         ${formatBytes(g.wireBytes)} for ${formatBytes(g.memoryBytes)} of memory${g.diskDataBytes > 0 ? ` and ${formatBytes(g.diskDataBytes)} of disk data` : ''} (${(g.wireRatio * 100).toFixed(1)}%)`,
    );
    if (g.dedup) lines.push(`  dedup        ${dedupText(g.dedupStats.hits, g.dedupStats.savedBytes, g.dedupStats.wantedPages)}`);
  }
  if (g.plan) lines.push(`${g.plan.followed ? 'plan followed' : 'no plan'} (${g.plan.priority} priority, ${g.strategy}): ${[...g.plan.reasons, ...g.plan.assumptions].join('; ')}`);
  for (const f of g.failed) lines.push(`FAILED ${f.guest}: ${f.code}: ${f.message}`);
  return lines.join('\n');
}

/** `gangway status` lines for guest records the agent could not read: each, and what to do. */
export function unreadableRecordsText(records: readonly UnreadableRecord[]): string[] {
  return records.flatMap((r) => [
    `  UNREADABLE guest record ${r.file}: ${r.problem}`,
    `    guest "${r.name}" is refused (start, stop, migrate, migrations in) until you ${UNREADABLE_RECORD_ADVICE}`,
  ]);
}

/** How to follow or cancel migrations this command no longer waits for (`cancelled`: those whose cancel the agent accepted). */
export function detachedText(started: StartedMigrations, to: string, cancelled: ReadonlySet<string>): string {
  const goingOn = [...started.ids].filter(([id]) => !cancelled.has(id));
  const stopping = [...started.ids].filter(([id]) => cancelled.has(id)).map(([, guest]) => guest);
  const stays = stopping.length > 0 ? `; cancelled: ${stopping.join(', ')} ${stopping.length > 1 ? 'stay' : 'stays'} on this host` : '';
  if (goingOn.length === 0 && stopping.length > 0) return `${stays.slice(2)} (see \`gangway status\`)`;
  const ids = goingOn.map(([id, guest]) => `${guest}: ${id.slice(0, 8)}`);
  const cancelWith = goingOn.length === 1 ? goingOn[0]![0].slice(0, 8) : 'ID';
  return (
    `the migration to ${to} goes on in the agent${ids.length ? ` (${ids.join(', ')})` : ''}; ` +
    `follow it with \`gangway status\`, cancel it with \`gangway cancel ${cancelWith}\`${stays}`
  );
}

/** What `migrate --detach` prints: the migrations started (JSON with --json). */
export function detachedStartText(started: StartedMigrations, to: string, json: boolean): string {
  const migrations = [...started.ids].map(([migrationId, guest]) => ({ guest, migrationId }));
  const waiting = started.guests.filter((guest) => !migrations.some((m) => m.guest === guest));
  if (json) return JSON.stringify({ detached: true, to, migrations, waiting });
  return [
    ...migrations.map((m) => `migration ${m.migrationId}: ${m.guest} → ${to} started`),
    ...(waiting.length > 0 ? [`waiting their turn: ${waiting.join(', ')}`] : []),
    'follow with `gangway status`; cancel with `gangway cancel ID`',
  ].join('\n');
}
