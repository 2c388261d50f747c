// The pre-copy convergence policy: after each round, decide whether to keep copying,
// to stop (pause the guest and send the last dirty pages), or that a limit was hit.
// One explicit, pure function (after Cloud Hypervisor's is_precopy_converged), so every
// branch is tested from a table and the engine has no policy of its own.

export interface ConvergenceLimits {
  /** Pre-copy rounds allowed, round 0 included; the stop-and-copy round is not counted. */
  maxRounds: number;
  /** Wire bytes the pre-copy may send before it is judged not to converge. */
  maxWireBytes: number;
}

export interface ConvergenceInput {
  /** Rounds completed so far (1 after round 0). */
  roundsDone: number;
  /** Dirty pages collected for the next round. */
  pendingPages: number;
  /** Measured wire bytes per page of recent rounds (compression and zero pages included). */
  wireBytesPerPage: number;
  /** Measured rate at which the link takes migration bytes. */
  linkRateBytesPerSec: number;
  /** Measured rate at which the guest dirties pages. */
  dirtyRatePagesPerSec: number;
  /** Time from this decision until the guest is paused (pages dirtied meanwhile join the final round). */
  pauseLatencyMs: number;
  /** Fixed switchover cost: digest, confirmation round trip, resume at the destination. */
  switchoverOverheadMs: number;
  /**
   * How much longer the final round may take than the recent rounds' rate says. It runs
   * under different conditions (scattered hot pages, the source digest competing for the
   * CPU, the destination draining its receive window), measured at ~1.3x here.
   */
  safetyFactor: number;
  downtimeBudgetMs: number;
  wireBytesSent: number;
  limits: ConvergenceLimits;
  /** Pages (units) the round just done sent: with pendingPages, whether rounds still shrink the dirty set. */
  roundPages?: number;
}

export type ConvergenceDecision =
  | { action: 'continue'; predictedDowntimeMs: number; converging: boolean; reason: string; /** The final round fit the budget: this round only shortens it. */ shrinking?: true }
  | { action: 'stop'; predictedDowntimeMs: number; converging: boolean; reason: string }
  | { action: 'limit'; limit: 'rounds' | 'bytes'; predictedDowntimeMs: number; converging: boolean; reason: string };

export const DEFAULT_SAFETY_FACTOR = 1.5;

/**
 * A final round that fits the budget is still worth another round when the last one cut
 * the dirty set to at most this share of what it sent: the next final round is then about
 * that much shorter. A 1 GiB guest dirtying 30 MiB/s on loopback stopped after round 0
 * with 60-90 MiB dirty (it fit the 300 ms budget with room to spare), and its downtime was
 * that final round, 95-161 ms; one more round left a few MiB.
 */
export const SHRINK_RATIO = 0.5;
/**
 * Below this a final round is left as it is: another round costs a scan, a round trip and a
 * decision, and cannot win back more than a few ms. Above it, another round pays even when
 * the final round would be over before the source's digest of the paused memory: both run
 * on the same cores and read the same memory. The rule that stopped once the final round
 * was shorter than the digest (1 GiB, 30 MiB/s, loopback; 6 interleaved pairs of
 * `bench:downtime --memory-mib 1024 --technique precopy --rates 30 --link loopback
 * --repeat 2`, 12 runs each way) left some 1,500 dirty pages and what the pause latency
 * adds, and its downtime was 68-103 ms (median 83), its digest 62-94 ms; going on to here,
 * 55-80 ms (median 69), digest 47-73 ms, in 3-5 rounds, for 1% more wire bytes and no more
 * total time (1.7-3.2 s against 1.8-3.5).
 */
export const SHRINK_MIN_FINAL_ROUND_MS = 5;

/** Predicted downtime if the guest were paused now: the final round plus the fixed costs. */
export function predictDowntimeMs(input: ConvergenceInput): number {
  const finalPages = input.pendingPages + (input.dirtyRatePagesPerSec * input.pauseLatencyMs) / 1000;
  const finalBytes = finalPages * input.wireBytesPerPage;
  const rate = Math.max(input.linkRateBytesPerSec, 1);
  return input.switchoverOverheadMs + (finalBytes / rate) * 1000 * input.safetyFactor;
}

export function isPrecopyConverged(input: ConvergenceInput): ConvergenceDecision {
  const predictedDowntimeMs = predictDowntimeMs(input);
  // The dirty set can only shrink round over round while the guest dirties bytes more
  // slowly than the link carries them.
  const dirtyBytesPerSec = input.dirtyRatePagesPerSec * input.wireBytesPerPage;
  const converging = dirtyBytesPerSec < input.linkRateBytesPerSec;
  const predicted = `predicted downtime ${predictedDowntimeMs.toFixed(1)} ms, budget ${input.downtimeBudgetMs} ms`;

  if (input.pendingPages === 0) {
    return { action: 'stop', predictedDowntimeMs, converging, reason: `no dirty pages left; ${predicted}` };
  }
  if (predictedDowntimeMs <= input.downtimeBudgetMs) {
    const shrinks = shrinksFurther(input, predictedDowntimeMs, converging);
    if (shrinks) return { action: 'continue', predictedDowntimeMs, converging, reason: `final round fits the budget, ${shrinks}; ${predicted}`, shrinking: true };
    return { action: 'stop', predictedDowntimeMs, converging, reason: `final round fits the budget: ${predicted}` };
  }
  if (input.roundsDone >= input.limits.maxRounds) {
    return {
      action: 'limit',
      limit: 'rounds',
      predictedDowntimeMs,
      converging,
      reason: `round limit ${input.limits.maxRounds} reached; ${predicted}`,
    };
  }
  if (input.wireBytesSent >= input.limits.maxWireBytes) {
    return {
      action: 'limit',
      limit: 'bytes',
      predictedDowntimeMs,
      converging,
      reason: `sent ${input.wireBytesSent} bytes, limit ${input.limits.maxWireBytes}; ${predicted}`,
    };
  }
  return {
    action: 'continue',
    predictedDowntimeMs,
    converging,
    reason: converging ? predicted : `guest dirties faster than the link; ${predicted}`,
  };
}

/**
 * Why one more round pays although the final round fits the budget, or undefined when it
 * does not: the final round would take more than SHRINK_MIN_FINAL_ROUND_MS, the guest
 * dirties more slowly than the link carries, the last round cut the dirty set to
 * SHRINK_RATIO of what it sent or less, and no limit is reached. The budget stays the
 * ceiling; this only buys a shorter downtime while rounds still buy one.
 */
function shrinksFurther(input: ConvergenceInput, predictedDowntimeMs: number, converging: boolean): string | undefined {
  if (input.roundPages === undefined || input.roundPages <= 0) return undefined;
  const finalRoundMs = predictedDowntimeMs - input.switchoverOverheadMs;
  if (!converging || finalRoundMs <= SHRINK_MIN_FINAL_ROUND_MS) return undefined;
  if (input.pendingPages > input.roundPages * SHRINK_RATIO) return undefined;
  if (input.roundsDone >= input.limits.maxRounds || input.wireBytesSent >= input.limits.maxWireBytes) return undefined;
  const share = Math.round((input.pendingPages / input.roundPages) * 100);
  return `but its ${finalRoundMs.toFixed(1)} ms would slow the digest of the paused memory it runs beside, and the last round left ${share}% of what it sent dirty: one more round`;
}

/**
 * A byte-weighted exponential moving average of a rate, fed with (bytes, elapsedMs) of each
 * round. A small round says little about the link: its time is latency and waiting (a few
 * round trips, other migrations' batches ahead of it on a shared session), so a round
 * smaller than `minSampleBytes` moves the estimate in proportion to its size. Weighting by
 * time instead let a gang's tail of tiny rounds drag the estimate to a fraction of the link,
 * predict seconds of downtime for a few hundred pages, and never stop.
 */
export class RateEstimator {
  private estimate: number | undefined;
  constructor(
    private readonly weight = 0.5,
    private readonly minSampleBytes = 4 * 1024 * 1024,
  ) {}

  add(bytes: number, elapsedMs: number): void {
    if (elapsedMs <= 0 || bytes <= 0) return;
    const sample = (bytes * 1000) / elapsedMs;
    if (this.estimate === undefined) {
      this.estimate = sample;
      return;
    }
    const w = this.weight * Math.min(1, bytes / this.minSampleBytes);
    this.estimate = this.estimate * (1 - w) + sample * w;
  }

  get value(): number | undefined {
    return this.estimate;
  }
}
