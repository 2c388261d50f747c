// Human output of `gangway traffic` and `gangway plan`. Rates in bits per second, as links
// are rated.
import type { PlanAnswer } from '../planner/plan-answer.js';
import { fmtMs as formatMs, optionName, type PlanForecast } from '../planner/choose.js';
import { formatBytes } from '../units.js';
import type { TrafficStatus } from '../traffic/service.js';

export function formatBitRate(bytesPerSec: number | null | undefined): string {
  if (bytesPerSec === null || bytesPerSec === undefined) return '-';
  const bits = bytesPerSec * 8;
  if (bits >= 1e9) return `${(bits / 1e9).toFixed(2)} Gbit/s`;
  if (bits >= 1e6) return `${(bits / 1e6).toFixed(1)} Mbit/s`;
  return `${(bits / 1e3).toFixed(1)} kbit/s`;
}

const pair = (rates: { rxBytesPerSec: number | null; txBytesPerSec: number | null } | null) =>
  rates ? `rx ${formatBitRate(rates.rxBytesPerSec).padStart(13)}  tx ${formatBitRate(rates.txBytesPerSec).padStart(13)}` : 'not measured';

export function trafficText(t: TrafficStatus): string {
  const lines: string[] = [];
  const link = t.linkBytesPerSec === null ? 'capacity not configured' : formatBitRate(t.linkBytesPerSec);
  lines.push(t.uplink === null ? 'uplink: none configured' : `uplink ${t.uplink} (${link}), sampled every ${t.sampleIntervalMs} ms, ${t.samples} samples`);
  lines.push(`monitor: ${t.mode}${t.reason ? ` (${t.reason})` : ''}`);
  lines.push(`  nic         ${pair(t.nic)}`);
  lines.push(`  migration   ${pair(t.migration)}`);
  lines.push(`  workload    ${pair(t.workload)}${t.host ? `  ${t.host.direction}` : ''}`);
  lines.push(`  contention  ${t.contention ? `${t.contention.level}: ${t.contention.reason}` : 'unknown'}`);
  if (t.guests.length === 0) lines.push('  no guests');
  for (const g of t.guests) {
    const head = `  guest ${g.name}${g.tap ? ` (${g.tap})` : ''}`;
    lines.push(g.rxBytesPerSec === null ? `${head}: not measured: ${g.reason ?? 'unknown'}` : `${head}: ${pair(g)}  ${g.direction}`);
  }
  const s = t.shaper;
  if (!s.available) lines.push(`shaper: not available (${s.reason})`);
  else if (!s.active) lines.push('shaper: ready, not shaping (no migration running)');
  else {
    lines.push(
      `shaper: migration ${formatBitRate(s.active.migrationBytesPerSec)} to port ${s.active.peerPort} (${s.active.priority}), ` +
        `workload ${formatBitRate(s.active.workloadRateBytesPerSec)} up to ${formatBitRate(s.active.workloadCeilBytesPerSec)}`,
    );
    if (s.active.measured) lines.push(`  measured: migration ${formatBitRate(s.active.measured.migrationBytesPerSec)}, workload ${formatBitRate(s.active.measured.workloadBytesPerSec)}`);
    for (const reason of s.active.reasons) lines.push(`  - ${reason}`);
  }
  lines.push(`default priority: ${t.priorityDefault}`);
  return lines.join('\n');
}

export function planText(plan: PlanAnswer): string {
  const lines: string[] = [];
  const count = `${plan.guests.length} guest${plan.guests.length === 1 ? '' : 's'}`;
  lines.push(`migrate --technique auto would move ${count} to ${plan.to}: ${plan.strategy}, ${plan.priority} priority (nothing is migrated)`);
  if (plan.planner) {
    const { scenario, contention, contentionShare, reservation } = plan.planner;
    lines.push(`  scenario ${scenario}, contention ${contention}${contentionShare === null ? '' : ` (${(contentionShare * 100).toFixed(0)}% of the link)`}`);
    lines.push(
      reservation
        ? `  reservation: migration ${formatBitRate(reservation.migrationBytesPerSec)}, workload ${reservation.workloadCapBytesPerSec === null ? 'left alone' : `capped at ${formatBitRate(reservation.workloadCapBytesPerSec)}`}`
        : '  reservation: none (no link capacity configured)',
    );
  } else lines.push('  no plan: no traffic data');
  if (plan.pacedBytesPerSec !== null) lines.push(`  paced at ${formatBitRate(plan.pacedBytesPerSec)} by the sender`);
  for (const reason of plan.reasons) lines.push(`  - ${reason}`);
  if (plan.forecast) lines.push(...forecastLines(plan.forecast, plan.guests.length));
  for (const g of plan.guests) {
    lines.push(`${g.order + 1}. ${g.name}: ${g.technique}${g.reservedBytesPerSec === null ? '' : `, reserved ${formatBitRate(g.reservedBytesPerSec)}`}`);
    for (const reason of g.reasons) lines.push(`     - ${reason}`);
  }
  if (plan.assumptions.length > 0) {
    lines.push('assumptions:');
    for (const assumption of plan.assumptions) lines.push(`  - ${assumption}`);
  }
  return lines.join('\n');
}

/** Each option's forecast, fastest first, the one followed marked, then why it won. */
export function forecastLines(forecast: PlanForecast, guestCount: number): string[] {
  const lines = [`forecast (planner mode ${forecast.mode}):`];
  const chosen = forecast.chosen;
  for (const o of forecast.options) {
    const mark = chosen && o.technique === chosen.technique && o.strategy === chosen.strategy ? '*' : ' ';
    const verdict = !o.completes ? 'does not complete' : !o.keepsSla ? 'below the SLA' : !o.withinBudget ? 'over the downtime budget' : '';
    lines.push(
      `  ${mark} ${optionName(o, guestCount).padEnd(16)} ${o.completes ? `time ${formatMs(o.totalMs)}` : `gives up after ${formatMs(o.totalMs)}`}, downtime ${formatMs(o.downtimeMs)}, wire ${formatBytes(o.wireBytes)}${verdict ? ` (${verdict})` : ''}`,
    );
  }
  for (const why of forecast.why) lines.push(`  - ${why}`);
  for (const fact of forecast.measured) lines.push(`  - measured: ${fact}`);
  for (const assumption of forecast.assumptions) lines.push(`  - assumed: ${assumption}`);
  for (const note of forecast.calibration) lines.push(`  - model: ${note}`);
  return lines;
}
