import { describe, expect, it } from 'vitest';
import { isPrecopyConverged, predictDowntimeMs, RateEstimator, SHRINK_MIN_FINAL_ROUND_MS, type ConvergenceInput } from '../../agent/migration/convergence.js';

const MiB = 1024 * 1024;
const PAGE = 4096;

function input(overrides: Partial<ConvergenceInput>): ConvergenceInput {
  return {
    roundsDone: 1,
    pendingPages: 1000,
    wireBytesPerPage: PAGE,
    linkRateBytesPerSec: 1000 * MiB,
    dirtyRatePagesPerSec: 0,
    pauseLatencyMs: 5,
    switchoverOverheadMs: 20,
    safetyFactor: 1,
    downtimeBudgetMs: 300,
    wireBytesSent: 512 * MiB,
    limits: { maxRounds: 30, maxWireBytes: 3 * 512 * MiB },
    ...overrides,
  };
}

describe('isPrecopyConverged', () => {
  // [case, overrides, action, limit?]
  const table: [string, Partial<ConvergenceInput>, 'continue' | 'stop' | 'limit', string?][] = [
    ['nothing dirty stops at once', { pendingPages: 0 }, 'stop'],
    ['4 MiB at 1000 MiB/s fits 300 ms', { pendingPages: 1024 }, 'stop'],
    ['512 MiB at 1000 MiB/s does not fit 300 ms', { pendingPages: 131072 }, 'continue'],
    ['512 MiB at 1000 MiB/s fits a 600 ms budget', { pendingPages: 131072, downtimeBudgetMs: 600 }, 'stop'],
    ['compression makes it fit', { pendingPages: 131072, wireBytesPerPage: 1024 }, 'stop'],
    ['a slow link does not fit', { pendingPages: 10_000, linkRateBytesPerSec: 10 * MiB }, 'continue'],
    ['fixed overhead alone can exceed the budget', { pendingPages: 1, switchoverOverheadMs: 400 }, 'continue'],
    ['round limit', { pendingPages: 131072, roundsDone: 30 }, 'limit', 'rounds'],
    ['byte limit', { pendingPages: 131072, wireBytesSent: 3 * 512 * MiB }, 'limit', 'bytes'],
    ['fitting wins over a reached limit', { pendingPages: 10, roundsDone: 30 }, 'stop'],
    ['dirtying before the pause counts', { pendingPages: 60_000, dirtyRatePagesPerSec: 2_000_000, pauseLatencyMs: 10 }, 'continue'],
    ['1 Gbit/s link, 40 MiB/s guest, 4 MiB pending', { pendingPages: 1024, linkRateBytesPerSec: 125e6, dirtyRatePagesPerSec: 10240 }, 'stop'],
  ];
  it.each(table)('%s', (_name, overrides, action, limit) => {
    const decision = isPrecopyConverged(input(overrides));
    expect(decision.action).toBe(action);
    if (limit) expect(decision).toMatchObject({ limit });
    expect(decision.reason.length).toBeGreaterThan(0);
  });

  describe('one more round while it still shortens the downtime', () => {
    // 1 GiB guest, 30 MiB/s, loopback at ~400 MiB/s: round 0 sent 262144 pages and left 64 MiB dirty.
    const afterRound0 = input({
      pendingPages: 16_384,
      roundPages: 262_144,
      linkRateBytesPerSec: 400 * MiB,
      dirtyRatePagesPerSec: 7_680,
      switchoverOverheadMs: 45,
      safetyFactor: 1.5,
    });
    it('a final round that fits the budget, after a round that shrank the dirty set: continue', () => {
      const decision = isPrecopyConverged(afterRound0);
      expect(decision.predictedDowntimeMs).toBeLessThanOrEqual(300);
      expect(decision.action).toBe('continue');
      expect(decision.reason).toMatch(/fits the budget, but its \d+\.\d ms would slow the digest of the paused memory it runs beside, and the last round left 6% of what it sent dirty: one more round/);
    });
    it('a final round shorter than the digest but over 5 ms: continue (they share the cores and the memory)', () => {
      // 1,000 pages: 15 ms with the margin, a third of the 45 ms switchover overhead.
      const decision = isPrecopyConverged({ ...afterRound0, pendingPages: 1_000, roundPages: 16_384 });
      expect(decision.predictedDowntimeMs - 45).toBeGreaterThan(SHRINK_MIN_FINAL_ROUND_MS);
      expect(decision.action).toBe('continue');
    });
    it('a final round of a few ms: stop (another round cannot win it back)', () => {
      const decision = isPrecopyConverged({ ...afterRound0, pendingPages: 100, roundPages: 1_000 });
      expect(decision.predictedDowntimeMs - 45).toBeLessThanOrEqual(SHRINK_MIN_FINAL_ROUND_MS);
      expect(decision.action).toBe('stop');
    });
    it('a round that did not shrink the dirty set (a hot set rewritten whole): stop', () => {
      expect(isPrecopyConverged({ ...afterRound0, pendingPages: 16_384, roundPages: 20_000 }).action).toBe('stop');
      expect(isPrecopyConverged({ ...afterRound0, pendingPages: 1_000, roundPages: 1_900 }).action).toBe('stop');
    });
    it('a guest dirtying faster than the link: stop (rounds cannot shrink it)', () => {
      expect(isPrecopyConverged({ ...afterRound0, dirtyRatePagesPerSec: 200_000, pendingPages: 10_000, downtimeBudgetMs: 10_000 }).action).toBe('stop');
    });
    it('at the round limit: stop', () => {
      expect(isPrecopyConverged({ ...afterRound0, roundsDone: 30 }).action).toBe('stop');
    });
    it('at the byte limit: stop', () => {
      expect(isPrecopyConverged({ ...afterRound0, wireBytesSent: 3 * 512 * MiB }).action).toBe('stop');
    });
    it('without the round size (callers that do not give it): stop, as before', () => {
      expect(isPrecopyConverged({ ...afterRound0, roundPages: undefined }).action).toBe('stop');
    });
  });

  it('predicts final bytes over link rate plus overhead', () => {
    const ms = predictDowntimeMs(input({ pendingPages: 25_600, wireBytesPerPage: 4096, linkRateBytesPerSec: 100 * MiB, switchoverOverheadMs: 10, dirtyRatePagesPerSec: 0 }));
    expect(ms).toBeCloseTo(10 + 1000, 5);
  });

  it('scales the transfer time, not the fixed overhead, by the safety factor', () => {
    const ms = predictDowntimeMs(input({ pendingPages: 25_600, linkRateBytesPerSec: 100 * MiB, switchoverOverheadMs: 10, safetyFactor: 1.5 }));
    expect(ms).toBeCloseTo(10 + 1500, 5);
    // 60 MiB at 275 MiB/s fits 300 ms on the raw estimate, not with the margin: another round.
    const demo = input({ pendingPages: 15_360, linkRateBytesPerSec: 275 * MiB, switchoverOverheadMs: 25 });
    expect(isPrecopyConverged(demo).action).toBe('stop');
    expect(isPrecopyConverged({ ...demo, safetyFactor: 1.5 }).action).toBe('continue');
  });

  it('flags a guest dirtying faster than the link as not converging', () => {
    const fast = isPrecopyConverged(input({ pendingPages: 131072, dirtyRatePagesPerSec: 300_000, linkRateBytesPerSec: 1000 * MiB }));
    expect(fast.converging).toBe(false);
    const slow = isPrecopyConverged(input({ pendingPages: 131072, dirtyRatePagesPerSec: 10_000, linkRateBytesPerSec: 1000 * MiB }));
    expect(slow.converging).toBe(true);
  });
});

/**
 * A fake-clock simulation of pre-copy: a guest dirtying `dirtyPagesPerSec` over a hot set,
 * a link of `linkBytesPerSec`; each round takes pending*page/link ms of simulated time.
 */
function simulate(memoryPages: number, hotPages: number, dirtyPagesPerSec: number, linkBytesPerSec: number, budgetMs: number) {
  let now = 0;
  const rate = new RateEstimator();
  let pending = memoryPages;
  let wire = 0;
  for (let round = 0; ; round++) {
    const ms = ((pending * PAGE) / linkBytesPerSec) * 1000;
    now += ms;
    wire += pending * PAGE;
    rate.add(pending * PAGE, ms);
    // Pages dirtied during the round, bounded by the hot set (a page dirtied twice counts once).
    const written = (dirtyPagesPerSec * ms) / 1000;
    pending = Math.round(hotPages * (1 - Math.exp(-written / hotPages)));
    const decision = isPrecopyConverged({
      roundsDone: round + 1,
      pendingPages: pending,
      wireBytesPerPage: PAGE,
      linkRateBytesPerSec: rate.value!,
      dirtyRatePagesPerSec: (pending * 1000) / ms,
      pauseLatencyMs: 5,
      switchoverOverheadMs: 20,
      safetyFactor: 1.5,
      downtimeBudgetMs: budgetMs,
      wireBytesSent: wire,
      limits: { maxRounds: 30, maxWireBytes: 3 * memoryPages * PAGE },
    });
    if (decision.action !== 'continue') return { decision, rounds: round + 1, elapsedMs: now };
  }
}

describe('pre-copy under a fake clock', () => {
  const pages = (512 * MiB) / PAGE;
  it.each([
    // [dirty MiB/s, link MiB/s, hot fraction, expected]
    [0, 1000, 0.25, 'stop'],
    [20, 1000, 0.25, 'stop'],
    [40, 1000, 0.25, 'stop'],
    [40, 119, 0.25, 'stop'],
    [200, 1000, 0.25, 'stop'],
    // A hot set the link moves within the budget ends it however fast the guest writes.
    [2000, 1000, 0.25, 'stop'],
    // Dirtying just under the link rate converges, slowly.
    [900, 1000, 1, 'stop'],
    [2000, 1000, 1, 'limit'],
    [100, 50, 0.25, 'limit'],
  ] as const)('dirtying %d MiB/s over a %d MiB/s link, hot %d, ends with %s', (dirtyMiB, linkMiB, hot, expected) => {
    const result = simulate(pages, pages * hot, (dirtyMiB * MiB) / PAGE, linkMiB * MiB, 300);
    expect(result.decision.action).toBe(expected);
    if (expected === 'stop') expect(result.decision.predictedDowntimeMs).toBeLessThanOrEqual(300);
  });
});

describe('RateEstimator', () => {
  it('starts at the first sample and moves toward later ones', () => {
    const rate = new RateEstimator(0.5, 4 * MiB);
    rate.add(100 * MiB, 100);
    expect(rate.value).toBeCloseTo(1000 * MiB);
    rate.add(50 * MiB, 100);
    expect(rate.value).toBeCloseTo(750 * MiB);
  });
  it('gives a small round little weight', () => {
    const rate = new RateEstimator(0.5, 4 * MiB);
    rate.add(100 * MiB, 100);
    rate.add(1, 1);
    expect(rate.value!).toBeGreaterThan(980 * MiB);
  });
  it('is not dragged down by many small rounds that spent their time waiting', () => {
    const rate = new RateEstimator(0.5, 4 * MiB);
    rate.add(100 * MiB, 100);
    // Thirty rounds of 100 KiB that took 50 ms each (2 MB/s if taken at face value).
    for (let i = 0; i < 30; i++) rate.add(100 * 1024, 50);
    expect(rate.value!).toBeGreaterThan(500 * MiB);
  });
});
