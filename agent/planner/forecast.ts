// What each way of moving a set of guests would cost, before it starts: total time, downtime,
// wire bytes and how much the guests and the workload suffer, for every candidate (pre-copy,
// post-copy, hybrid; gang or serial). Pure functions of measured inputs and a few constants
// that calibrate.ts fits from this host's history, so `gangway plan`, migrate --technique auto
// and drain can choose by forecast and every migration can check its forecast afterwards.
//
// Assumptions (each is a place where the forecast can be wrong, and what calibration absorbs):
// - Rate: the migration gets `availableBytesPerSec` (the reservation under the uplink's shaper,
//   and what the destination's inbound side gives it: see availableRate) times
//   `linkEfficiency` (framing, TCP and the pacer's gaps), constant for the whole migration.
// - Pre-copy rounds form the usual geometric series: round 0 sends the guest's content, each
//   later round the pages dirtied while the previous one ran. The guest dirties
//   `dirtyRateBytesPerSec` uniformly within its hot set, so a round of t seconds leaves
//   min(hot set, rate × t) to send. Whether to stop, go on, or give up is decided by the
//   engine's own rule (isPrecopyConverged, and hybridSwitch for hybrid), fed as rounds.ts
//   feeds it, so a forecast pre-copy stops where the engine would.
// - Downtime of a pre-copy is its final round (the pages left when the rule stops, at the
//   rounds' rate, without the rule's safety factor) plus `switchoverMs`; of post-copy and of
//   hybrid's switch, `switchoverMs`.
// - A pre-copy that hits a limit without --force does not complete: its totalMs is the time
//   until the engine gives up, and `completes` is false.
// - More dirty rate never forecasts less time for pre-copy or post-copy. Hybrid is not
//   monotone, because the engine's rule is not: a guest dirtying just faster than the link
//   goes post-copy after round 2, one just slower keeps copying rounds up to the limit.
// - Content: a zero page costs a page header on the wire. With dedup (pre-copy only, as
//   outbound.ts runs it; on unless --no-dedup) so does a page that repeats another of the same
//   guest, and a page whose content another guest of the same command carries, except for the
//   first guest in the order, which sends it. Dirtied pages are sent whole (they seldom stay
//   zero).
// - Post-copy pushes the guest's content once. The guest faults on the pages of its hot set it
//   touches before they arrive: of the hot pages it touches during the push, half on average
//   come before their page; each fault stalls the guest `faultOverheadMs` and, the stalled
//   guest's fault being served ahead of the push, adds that much to the total time.
// - Gang: the members run at once and share the rate evenly; the total is the slowest
//   member's, plus one switchover per other member (the gate lets one switch at a time), and
//   the set-up is paid once. Serial: each member has the whole rate, one after another, and
//   each pays its own set-up. The order (priority, then as asked) does not change the total
//   in this model, so it is not a dimension of the search.
// - Workload: during the migration the workload keeps what the migration leaves of the link,
//   up to what it asks for; the option keeps the SLA when that is at least the SLA's lower limit
//   (or all the workload asks for).
import { DEFAULT_SAFETY_FACTOR, isPrecopyConverged, type ConvergenceDecision } from '../migration/convergence.js';
import { hybridSwitch } from '../migration/postcopy.js';
import type { PlannedTechnique } from './planner.js';

export type ForecastStrategy = 'gang' | 'serial';

/** One guest as measured before its migration. */
export interface GuestProfile {
  name: string;
  memoryBytes: number;
  /** Shares of its pages (0..1) that are zero, and that repeat another page of the same guest. */
  zeroShare: number;
  duplicateShare: number;
  /** Share of its pages whose content another guest of the same command carries (dedup across guests). */
  sharedShare: number;
  dirtyRateBytesPerSec: number;
  /** The memory the guest keeps dirtying: the dirty set never grows beyond it. */
  hotSetBytes: number;
}

/** The model's constants: calibrate.ts fits them from this host's history; defaults from the engine's constants. */
export interface ForecastModel {
  /** Share of the available rate the migration's payload gets (0..1]. */
  linkEfficiency: number;
  /** Per migration, before round 0's bytes: the offer, the destination's set-up, the trackers armed. */
  setupMs: number;
  /** Fixed switchover cost: pause, digest, confirmation round trip, resume at the destination. */
  switchoverMs: number;
  /** Per post-copy fault: how long the faulting guest waits beyond its page's push. */
  faultOverheadMs: number;
}

export const DEFAULT_FORECAST_MODEL: ForecastModel = {
  linkEfficiency: 0.9,
  setupMs: 150,
  switchoverMs: 30,
  faultOverheadMs: 0.5,
};

/** The migrate settings a forecast must respect (the request's, else MIGRATE_DEFAULTS). */
export interface ForecastLimits {
  downtimeBudgetMs: number;
  maxRounds: number;
  /** Pre-copy's wire bytes limit, as a multiple of the guest's memory (--max-bytes-factor). */
  maxBytesFactor: number;
  /** hybrid: post-copy after this many rounds at the latest (default maxRounds). */
  postcopyAfterRounds?: number;
  /** --force: a pre-copy that hits a limit stops anyway instead of failing. */
  force: boolean;
  /** --no-dedup: false (pre-copy then sends repeated and shared pages whole). Default true. */
  dedup?: boolean;
}

export interface WorkloadInput {
  /** What the source's workload asks of the uplink. */
  demandBytesPerSec: number;
  slaLowerBytesPerSec: number;
  linkBytesPerSec: number;
}

export interface ForecastInput {
  /** In migration order. */
  guests: GuestProfile[];
  /** The rate the migration may use (availableRate). */
  availableBytesPerSec: number;
  workload: WorkloadInput | undefined;
  limits: ForecastLimits;
  model: ForecastModel;
}

export interface GuestForecast {
  name: string;
  technique: PlannedTechnique;
  totalMs: number;
  downtimeMs: number;
  wireBytes: number;
  /** Pre-copy rounds forecast (round 0 included; the stop-and-copy round not). */
  rounds: number;
  /** Post-copy faults forecast (pre-copy: 0). */
  faults: number;
  /** false: the engine's rule gives up (a limit without --force); the migration would fail, totalMs is when. */
  completes: boolean;
  /** How the migration ends: stop-and-copy, post-copy, or the limit it hits. */
  ending: string;
}

export interface OptionForecast {
  technique: PlannedTechnique;
  strategy: ForecastStrategy;
  /** The guests in order. */
  order: string[];
  totalMs: number;
  /** The longest downtime of any guest. */
  downtimeMs: number;
  wireBytes: number;
  /** Share (0..1) of the migration's time the guests do not run: downtime and post-copy fault stalls, worst guest. */
  guestStallShare: number;
  /** What the workload keeps of the uplink meanwhile; null without a workload measurement. */
  workloadBytesPerSec: number | null;
  /** The workload keeps at least its SLA lower limit (or all it asks for); true without a measurement. */
  keepsSla: boolean;
  /** Every guest completes and none exceeds the downtime budget. */
  withinBudget: boolean;
  completes: boolean;
  /** The effective rate the forecast used, bytes/s (calibrate.ts needs it afterwards). */
  rateBytesPerSec: number;
  guests: GuestForecast[];
}

/** rounds.ts's time from the stop decision to the pause (its PAUSE_LATENCY_MS). */
export const PAUSE_LATENCY_MS = 5;
export const PAGE_SIZE_BYTES = 4096;
/** What a zero, repeated or deduplicated page costs on the wire: its header. */
export const PAGE_HEADER_BYTES = 16;

/**
 * The rate a migration may use: the source's reservation (or the link), and at the
 * destination what its inbound side gives it. A destination that reserves for the migration
 * (a followed plan: Algorithm 2 at the plan's priority) gives it its reservation, and more
 * where its inbound workload leaves more (the migration's class borrows up to the link, as at
 * the source). One that does not reserve leaves it what the workload leaves, never less than
 * `floorShare` of the source's reservation.
 */
export function availableRate(
  reservedBytesPerSec: number,
  destination: { inboundBytesPerSec: number; linkBytesPerSec: number; reservedBytesPerSec?: number } | undefined,
  floorShare = 0.05,
): number {
  if (!destination) return reservedBytesPerSec;
  const headroom = destination.linkBytesPerSec - destination.inboundBytesPerSec;
  if (destination.reservedBytesPerSec !== undefined) return Math.min(reservedBytesPerSec, Math.max(destination.reservedBytesPerSec, headroom));
  return Math.min(reservedBytesPerSec, Math.max(headroom, reservedBytesPerSec * floorShare));
}

/**
 * How far dedup reaches for a guest: 'off' (post-copy, hybrid, --no-dedup), 'own' (pages that
 * repeat within the guest), 'across' (also what another guest of the command sent first).
 */
export type DedupReach = 'off' | 'own' | 'across';

/** Bytes round 0 sends (and post-copy pushes) for a guest: its content, less what zero pages and dedup spare. */
export function contentWireBytes(guest: GuestProfile, dedup: DedupReach): number {
  const pages = guest.memoryBytes / PAGE_SIZE_BYTES;
  const spared = clampShare(guest.zeroShare + (dedup === 'off' ? 0 : guest.duplicateShare) + (dedup === 'across' ? guest.sharedShare : 0));
  return pages * (1 - spared) * PAGE_SIZE_BYTES + pages * spared * PAGE_HEADER_BYTES;
}

/** Pages the guest dirties in `seconds`, within its hot set. */
function dirtiedPages(guest: GuestProfile, seconds: number): number {
  const hotPages = Math.max(guest.hotSetBytes, 0) / PAGE_SIZE_BYTES;
  return Math.min(hotPages, (Math.max(guest.dirtyRateBytesPerSec, 0) * seconds) / PAGE_SIZE_BYTES);
}

/** Post-copy of `pushBytes` at `rateBytesPerSec`: push time, faults and their cost. */
function postcopyPart(guest: GuestProfile, pushBytes: number, rateBytesPerSec: number, model: ForecastModel): { pushMs: number; faults: number; stallMs: number } {
  const pushMs = (pushBytes / rateBytesPerSec) * 1000;
  const faults = dirtiedPages(guest, pushMs / 1000) / 2;
  return { pushMs, faults, stallMs: faults * model.faultOverheadMs };
}

/**
 * One guest's migration by `technique` at `rateBytesPerSec` (already the effective rate).
 * `dedup`: this guest's shared content is already at the destination or sent by another.
 */
export function forecastGuest(guest: GuestProfile, technique: PlannedTechnique, rateBytesPerSec: number, dedup: boolean, limits: ForecastLimits, model: ForecastModel): GuestForecast {
  const rate = Math.max(rateBytesPerSec, 1);
  // Post-copy and hybrid members move without dedup (outbound.ts).
  const reach: DedupReach = technique !== 'precopy' || limits.dedup === false ? 'off' : dedup ? 'across' : 'own';
  const content = contentWireBytes(guest, reach);
  const base = { name: guest.name, technique };
  if (technique === 'postcopy') {
    const push = postcopyPart(guest, content, rate, model);
    return {
      ...base,
      totalMs: model.setupMs + model.switchoverMs + push.pushMs + push.stallMs,
      downtimeMs: model.switchoverMs,
      wireBytes: content,
      rounds: 0,
      faults: push.faults,
      completes: true,
      ending: 'post-copy from the start',
    };
  }
  const wireBytesPerPage = PAGE_SIZE_BYTES + PAGE_HEADER_BYTES;
  const maxWireBytes = guest.memoryBytes * limits.maxBytesFactor;
  let elapsedMs = model.setupMs;
  let wireBytes = 0;
  let roundBytes = content;
  for (let round = 0; ; round++) {
    const roundMs = (roundBytes / rate) * 1000;
    elapsedMs += roundMs;
    wireBytes += roundBytes;
    const pendingPages = dirtiedPages(guest, roundMs / 1000);
    // As rounds.ts: the dirty rate is what the round left over its duration.
    const decision: ConvergenceDecision = isPrecopyConverged({
      roundsDone: round + 1,
      pendingPages,
      wireBytesPerPage,
      linkRateBytesPerSec: rate,
      dirtyRatePagesPerSec: roundMs > 0 ? (pendingPages * 1000) / roundMs : 0,
      pauseLatencyMs: PAUSE_LATENCY_MS,
      switchoverOverheadMs: model.switchoverMs,
      safetyFactor: DEFAULT_SAFETY_FACTOR,
      downtimeBudgetMs: limits.downtimeBudgetMs,
      wireBytesSent: wireBytes,
      limits: { maxRounds: limits.maxRounds, maxWireBytes },
    });
    if (technique === 'hybrid') {
      const choice = hybridSwitch(decision, round + 1, { postcopyAfterRounds: limits.postcopyAfterRounds ?? limits.maxRounds });
      if (choice.postcopy) {
        const push = postcopyPart(guest, pendingPages * wireBytesPerPage, rate, model);
        return {
          ...base,
          totalMs: elapsedMs + model.switchoverMs + push.pushMs + push.stallMs,
          downtimeMs: model.switchoverMs,
          wireBytes: wireBytes + pendingPages * wireBytesPerPage,
          rounds: round + 1,
          faults: push.faults,
          completes: true,
          ending: `post-copy after ${round + 1} round${round === 0 ? '' : 's'}`,
        };
      }
    }
    // Pages dirtied until the pause join the final round, still within the hot set.
    const finalPages = dirtiedPages(guest, (roundMs + PAUSE_LATENCY_MS) / 1000);
    // The rule stops on a prediction with a safety factor (its margin against a slow final
    // round); the forecast is the final round at the rate the rounds ran, so that a guest that
    // dirties more never forecasts less (the margin would make stopping one round earlier
    // look longer than a round more).
    const downtimeMs = model.switchoverMs + ((finalPages * wireBytesPerPage) / rate) * 1000;
    const stop = (ending: string, completes: boolean): GuestForecast => ({
      ...base,
      totalMs: elapsedMs + downtimeMs,
      downtimeMs,
      wireBytes: wireBytes + finalPages * wireBytesPerPage,
      rounds: round + 1,
      faults: 0,
      completes,
      ending,
    });
    if (decision.action === 'stop') return stop(`stop-and-copy after ${round + 1} round${round === 0 ? '' : 's'}`, true);
    if (decision.action === 'limit') {
      return limits.force
        ? stop(`the ${decision.limit} limit, stopped anyway (--force)`, true)
        : { ...stop(`does not converge: the ${decision.limit} limit (${decision.reason})`, false), downtimeMs: 0 };
    }
    roundBytes = pendingPages * wireBytesPerPage;
  }
}

/** Every member of the command by `technique` and `strategy`, joined into one forecast. */
export function forecastOption(input: ForecastInput, technique: PlannedTechnique, strategy: ForecastStrategy): OptionForecast {
  const n = input.guests.length;
  const effective = Math.max(input.availableBytesPerSec * input.model.linkEfficiency, 1);
  const perGuestRate = strategy === 'gang' ? effective / n : effective;
  // The first guest in the order sends the shared content; the others find it there.
  const guests = input.guests.map((guest, i) => forecastGuest(guest, technique, perGuestRate, i > 0, input.limits, input.model));
  let totalMs: number;
  if (strategy === 'gang') {
    // One set-up for the whole gang: it is inside every member's total, counted once in the max.
    totalMs = Math.max(...guests.map((g) => g.totalMs)) + (n - 1) * input.model.switchoverMs;
  } else {
    totalMs = guests.reduce((sum, g) => sum + g.totalMs, 0);
  }
  const downtimeMs = Math.max(...guests.map((g) => g.downtimeMs));
  const completes = guests.every((g) => g.completes);
  const stall = Math.max(...guests.map((g) => (g.downtimeMs + g.faults * input.model.faultOverheadMs) / Math.max(g.totalMs, 1)));
  let workloadBytesPerSec: number | null = null;
  let keepsSla = true;
  if (input.workload) {
    const w = input.workload;
    // The migration takes the rate it was given while it runs (the shaper reserves it whole).
    workloadBytesPerSec = Math.max(0, Math.min(w.demandBytesPerSec, w.linkBytesPerSec - input.availableBytesPerSec));
    // A byte per second of slack: a migration given exactly what the workload leaves (link −
    // demand) leaves it link − (link − demand), which floating point may put a hair below demand.
    keepsSla = workloadBytesPerSec + 1 >= Math.min(w.demandBytesPerSec, w.slaLowerBytesPerSec);
  }
  return {
    technique,
    strategy,
    order: input.guests.map((g) => g.name),
    totalMs,
    downtimeMs,
    wireBytes: guests.reduce((sum, g) => sum + g.wireBytes, 0),
    guestStallShare: Math.min(1, stall),
    workloadBytesPerSec,
    keepsSla,
    withinBudget: completes && downtimeMs <= input.limits.downtimeBudgetMs,
    completes,
    rateBytesPerSec: effective,
    guests,
  };
}

/**
 * Every candidate for the command: each technique the destination can take, gang and serial
 * (one guest: gang only, they are the same). `canPostcopy` false leaves pre-copy alone.
 */
export function forecastOptions(input: ForecastInput, canPostcopy: boolean): OptionForecast[] {
  const techniques: PlannedTechnique[] = canPostcopy ? ['precopy', 'postcopy', 'hybrid'] : ['precopy'];
  const strategies: ForecastStrategy[] = input.guests.length > 1 ? ['gang', 'serial'] : ['gang'];
  return techniques.flatMap((technique) => strategies.map((strategy) => forecastOption(input, technique, strategy)));
}

function clampShare(share: number): number {
  return Math.min(Math.max(share, 0), 1);
}
