// Post-copy building blocks, kept pure so that every rule is tested on its own:
//
// - PostcopyScheduler (source): which missing page goes next. Faulted pages go first, alone,
//   then a pre-paging window after them; the background push carries on from the end of
//   that window. The window doubles while the guest faults just ahead of the last fault (a
//   sequential reader) and resets when it jumps (CRIU's lazy-pages does the same). Every
//   page is taken exactly once: a pushed page is never sent on a fault and the other way
//   round.
// - hybridSwitch: when a hybrid migration stops pre-copying and goes post-copy.
// - LatencySamples: fault latencies for p50/p99/max.
import type { ConvergenceDecision } from './convergence.js';
import { PageSet } from '../tracker/page-set.js';
import { Frame } from '../../protocol/index.js';
import type { PeerSession } from '../peer/session.js';

/** Pre-paging window after a fault, in pages: starts at the first size and doubles up to the second. */
export const PREPAGE_WINDOW_MIN = 8;
export const PREPAGE_WINDOW_MAX = 256;

export interface FaultResponse {
  /** The faulted pages still to send (each once), as runs: send these first, alone. */
  faulted: Uint32Array;
  /** The pre-paging window after them, as runs: send right behind. */
  window: Uint32Array;
}

export class PostcopyScheduler {
  private readonly pending: PageSet;
  private cursor = 0;
  private lastFault = -1;
  private windowPages = PREPAGE_WINDOW_MIN;

  /** `missing`: the pages the destination does not hold, as runs. */
  constructor(
    readonly pageCount: number,
    missing: Uint32Array,
  ) {
    this.pending = new PageSet(pageCount);
    this.pending.addRuns(missing);
  }

  /** Pages not sent yet. */
  get remaining(): number {
    return this.pending.size;
  }

  /** The current pre-paging window, in pages. */
  get window(): number {
    return this.windowPages;
  }

  /** The destination's guest faulted on `runs`: what to send now, taken out of the push. */
  onFault(runs: Uint32Array): FaultResponse {
    const faulted: number[] = [];
    let last = -1;
    for (let i = 0; i + 1 < runs.length; i += 2) {
      const first = runs[i]!;
      const end = Math.min(first + runs[i + 1]!, this.pageCount);
      for (let page = first; page < end; page++) {
        if (this.pending.delete(page)) push(faulted, page);
        last = Math.max(last, page);
      }
    }
    if (last < 0) return { faulted: new Uint32Array(0), window: new Uint32Array(0) };
    // A fault just ahead of the previous one (within twice the window) is a sequential
    // reader: widen the window. Anything else resets it.
    const sequential = this.lastFault >= 0 && last > this.lastFault && last - this.lastFault <= 2 * this.windowPages;
    this.windowPages = sequential ? Math.min(this.windowPages * 2, PREPAGE_WINDOW_MAX) : PREPAGE_WINDOW_MIN;
    this.lastFault = last;
    const window: number[] = [];
    const windowEnd = Math.min(last + 1 + this.windowPages, this.pageCount);
    for (let page = last + 1; page < windowEnd; page++) if (this.pending.delete(page)) push(window, page);
    // The push carries on where the guest is reading.
    this.cursor = windowEnd % this.pageCount;
    return { faulted: Uint32Array.from(faulted), window: Uint32Array.from(window) };
  }

  /**
   * The next pages of the background push, at most `maxPages`, from the cursor onwards
   * (wrapping around once), taken out of the pending set. Empty when nothing is left.
   */
  nextChunk(maxPages: number): Uint32Array {
    const out: number[] = [];
    let taken = 0;
    let page = this.pending.nextFrom(this.cursor) ?? this.pending.nextFrom(0);
    while (page !== undefined && taken < maxPages) {
      this.pending.delete(page);
      push(out, page);
      taken++;
      page = this.pending.nextFrom(page + 1) ?? this.pending.nextFrom(0);
    }
    if (out.length > 0) this.cursor = (out[out.length - 2]! + out[out.length - 1]!) % this.pageCount;
    return Uint32Array.from(out);
  }

  /** Pages to send again (a frame that was lost with a broken connection). */
  putBack(runs: Uint32Array): void {
    this.pending.addRuns(runs);
  }

  /** After a reattach: exactly the pages the destination says it still lacks are pending. */
  reset(missing: readonly Uint32Array[]): void {
    this.pending.clear();
    for (const runs of missing) this.pending.addRuns(runs);
  }
}

/** Appends `page` to ascending-or-not runs, extending the last run when it is adjacent. */
function push(runs: number[], page: number): void {
  const n = runs.length;
  if (n >= 2 && runs[n - 2]! + runs[n - 1]! === page) runs[n - 1]!++;
  else runs.push(page, 1);
}

export interface HybridPolicy {
  /** Go post-copy after this many pre-copy rounds (round 0 included) at the latest. */
  postcopyAfterRounds: number;
}

/**
 * After a pre-copy round of a hybrid migration: go post-copy (with the reason), or carry on
 * as the pre-copy decision says. Post-copy starts when the pre-copy would stop anyway but
 * does not fit its budget (a limit), when the guest dirties faster than the link (it cannot
 * converge: more rounds only resend the same pages), or after the policy's rounds. When the
 * final round fits the downtime budget, a plain stop-and-copy is better than post-copy: the
 * guest then never waits on a fault.
 */
export function hybridSwitch(decision: ConvergenceDecision, roundsDone: number, policy: HybridPolicy): { postcopy: boolean; reason: string } {
  if (decision.action === 'stop') return { postcopy: false, reason: `pre-copy converged: ${decision.reason}` };
  if (decision.action === 'limit') return { postcopy: true, reason: `pre-copy hit a limit: ${decision.reason}` };
  if (roundsDone >= 2 && !decision.converging) return { postcopy: true, reason: `pre-copy does not converge: ${decision.reason}` };
  if (roundsDone >= policy.postcopyAfterRounds) {
    return { postcopy: true, reason: `${roundsDone} pre-copy rounds done (hybrid switches after ${policy.postcopyAfterRounds}): ${decision.reason}` };
  }
  return { postcopy: false, reason: decision.reason };
}

/**
 * How many pushed bytes post-copy keeps on their way. A faulted page goes out at once but
 * travels behind whatever is already in the socket buffers, the link's queue and the
 * destination's decoder: at most this window. So the window is sized to the link: the
 * delivery rate (bytes credited back per second) times a target queueing delay (at least
 * twice the round trip, so the push still fills the link), with a quarter of headroom
 * that lets it grow when the link has room. Sampled every `periodMs`.
 */
export class WindowTuner {
  private windowBytes: number;
  private periodStart: number;
  private periodBytes = 0;

  constructor(
    private readonly options: { initialBytes: number; minBytes: number; maxBytes: number; targetDelayMs: number; periodMs: number },
    now: number,
  ) {
    this.windowBytes = options.initialBytes;
    this.periodStart = now;
  }

  get bytes(): number {
    return this.windowBytes;
  }

  /** Bytes credited back at `now`; returns the window for what follows. */
  delivered(bytes: number, now: number): number {
    this.periodBytes += bytes;
    const elapsed = now - this.periodStart;
    if (elapsed < this.options.periodMs) return this.windowBytes;
    const rate = (this.periodBytes * 1000) / elapsed;
    const { minBytes, maxBytes, targetDelayMs } = this.options;
    this.windowBytes = Math.round(Math.min(maxBytes, Math.max(minBytes, ((rate * targetDelayMs) / 1000) * 1.25)));
    this.periodStart = now;
    this.periodBytes = 0;
    return this.windowBytes;
  }
}

/** Latency samples (ms) for percentiles; keeps at most `limit` (the first ones). */
export class LatencySamples {
  private readonly values: number[] = [];
  private maxSeen = 0;
  private total = 0;
  constructor(private readonly limit = 1 << 20) {}

  add(ms: number): void {
    this.total++;
    this.maxSeen = Math.max(this.maxSeen, ms);
    if (this.values.length < this.limit) this.values.push(ms);
  }

  get count(): number {
    return this.total;
  }

  /** p50, p99 and max in ms (zeros when empty). */
  summary(): { p50Ms: number; p99Ms: number; maxMs: number } {
    if (this.values.length === 0) return { p50Ms: 0, p99Ms: 0, maxMs: 0 };
    const sorted = Float64Array.from(this.values).sort();
    const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)]!;
    return { p50Ms: at(0.5), p99Ms: at(0.99), maxMs: this.maxSeen };
  }
}

/** Sends `missing` of each region as postcopy frames: the last frame of all says `more: false`. */
export function sendMissing(session: Pick<PeerSession, 'send' | 'peerMaxPayloadBytes'>, migrationId: string, missing: readonly Uint32Array[]): void {
  const runsPerFrame = Math.max(1, Math.floor(Math.min(session.peerMaxPayloadBytes, 1 << 20) / 8));
  const frames: { region: number; missing: Uint32Array }[] = [];
  missing.forEach((runs, region) => {
    for (let at = 0; at < runs.length; at += runsPerFrame * 2) frames.push({ region, missing: runs.subarray(at, at + runsPerFrame * 2) });
  });
  if (frames.length === 0) frames.push({ region: 0, missing: new Uint32Array(0) });
  frames.forEach((frame, i) => session.send(Frame.postcopy({ migrationId, region: frame.region, more: i < frames.length - 1, missing: frame.missing })));
}
