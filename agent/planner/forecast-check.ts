// A migration's forecast kept beside its outcome (the summary, STATE/history.json, the
// metrics), and how far off it was: what calibrate.ts learns from and what an operator checks.
import type { PlanForecast } from './choose.js';
import { PAGE_SIZE_BYTES } from './forecast.js';

/** What was forecast for one guest's migration. */
export interface ForecastRecord {
  technique: 'precopy' | 'postcopy' | 'hybrid';
  strategy: 'gang' | 'serial';
  totalMs: number;
  downtimeMs: number;
  wireBytes: number;
  /** The rate the forecast started from, before the model's link efficiency (calibration's x axis). */
  nominalBytesPerSec: number;
  faults: number;
  rounds: number;
}

/** Relative error of a forecast: (forecast − actual) / actual; null when nothing happened to compare with. */
export function relativeError(forecast: number, actual: number): number | null {
  if (!(actual > 0) || !Number.isFinite(forecast)) return null;
  return (forecast - actual) / actual;
}

/**
 * The guest's dirty rate as the tracker saw it in the pre-copy rounds: the pages found dirty
 * after each round over the rounds' time, the last (stop-and-copy) round left out. Undefined
 * without a pre-copy round of any length.
 */
export function measuredDirtyRate(rounds: readonly { final: boolean; durationMs: number; dirtyPagesAfter: number }[]): number | undefined {
  const precopy = rounds.filter((r) => !r.final && r.durationMs > 0);
  const ms = precopy.reduce((sum, r) => sum + r.durationMs, 0);
  if (ms <= 0) return undefined;
  return (precopy.reduce((sum, r) => sum + r.dirtyPagesAfter, 0) * PAGE_SIZE_BYTES * 1000) / ms;
}

/** What a migration's round 0 found of the guest's content (history.json keeps it for the next forecast). */
export interface ContentShares {
  /** Zero pages over the pages round 0 covered. */
  zeroShare: number;
  /** With dedup: pages that repeated another of the same guest. */
  duplicateShare?: number;
  /** With dedup: pages whose content another guest of the command sent, or the destination already held. */
  sharedShare?: number;
}

/**
 * The shares of round 0, which covers every page the guest holds (post-copy has no round 0:
 * undefined). Repeats and sharing only count where dedup ran; without it they went whole.
 */
export function contentShares(
  rounds: readonly { round: number; pages: number; zeroPages: number; hitsIntra: number; hitsCrossGuest: number; hitsResident: number }[],
  dedup: boolean,
): ContentShares | undefined {
  const first = rounds.find((r) => r.round === 0);
  if (!first || first.pages <= 0) return undefined;
  const share = (pages: number) => Math.min(1, Math.max(0, pages / first.pages));
  return {
    zeroShare: share(first.zeroPages),
    ...(dedup ? { duplicateShare: share(first.hitsIntra), sharedShare: share(first.hitsCrossGuest + first.hitsResident) } : {}),
  };
}

/** Each guest's forecast in the option a plan follows, by name; empty when the plan followed none. */
export function forecastRecords(forecast: PlanForecast): Map<string, ForecastRecord> {
  const chosen = forecast.chosen;
  if (!chosen) return new Map();
  const nominalBytesPerSec = chosen.rateBytesPerSec / forecast.model.linkEfficiency;
  return new Map(
    chosen.guests.map((g) => [
      g.name,
      { technique: chosen.technique, strategy: chosen.strategy, totalMs: g.totalMs, downtimeMs: g.downtimeMs, wireBytes: g.wireBytes, nominalBytesPerSec, faults: g.faults, rounds: g.rounds },
    ]),
  );
}
