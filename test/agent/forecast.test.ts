// The forecast of each candidate, from tables: cases whose answer is known in closed form,
// monotonicity in the dirty rate, a pre-copy the engine's rule gives up on, gang against serial.
import { describe, expect, test } from 'vitest';
import {
  availableRate,
  contentWireBytes,
  forecastGuest,
  forecastOption,
  forecastOptions,
  PAGE_HEADER_BYTES,
  PAGE_SIZE_BYTES,
  PAUSE_LATENCY_MS,
  type ForecastInput,
  type ForecastLimits,
  type ForecastModel,
  type GuestProfile,
} from '../../agent/planner/forecast.js';

const MiB = 1024 * 1024;
const MODEL: ForecastModel = { linkEfficiency: 1, setupMs: 100, switchoverMs: 30, faultOverheadMs: 0.5 };
const LIMITS: ForecastLimits = { downtimeBudgetMs: 100, maxRounds: 30, maxBytesFactor: 3, force: false };
const RATE = 128 * MiB;
const WIRE_PAGE = PAGE_SIZE_BYTES + PAGE_HEADER_BYTES;

function guest(overrides: Partial<GuestProfile> = {}): GuestProfile {
  return { name: 'vm1', memoryBytes: 256 * MiB, zeroShare: 0, duplicateShare: 0, sharedShare: 0, dirtyRateBytesPerSec: 0, hotSetBytes: 256 * MiB, ...overrides };
}

function input(guests: GuestProfile[], overrides: Partial<ForecastInput> = {}): ForecastInput {
  return { guests, availableBytesPerSec: RATE, workload: undefined, limits: LIMITS, model: MODEL, ...overrides };
}

describe('one guest, answers known in closed form', () => {
  test('an idle guest: one round of its memory, then only the switchover', () => {
    const f = forecastGuest(guest(), 'precopy', RATE, false, LIMITS, MODEL);
    expect(f).toMatchObject({ rounds: 1, completes: true, faults: 0, wireBytes: 256 * MiB });
    expect(f.downtimeMs).toBeCloseTo(MODEL.switchoverMs, 6);
    expect(f.totalMs).toBeCloseTo(MODEL.setupMs + 2000 + MODEL.switchoverMs, 6);
  });

  test('zero and repeated pages cost a header each; repeated ones only where dedup runs (pre-copy, not --no-dedup)', () => {
    const g = guest({ zeroShare: 0.25, duplicateShare: 0.25 });
    const pages = g.memoryBytes / PAGE_SIZE_BYTES;
    expect(contentWireBytes(g, 'own')).toBeCloseTo((pages / 2) * PAGE_SIZE_BYTES + (pages / 2) * PAGE_HEADER_BYTES, 3);
    expect(contentWireBytes(g, 'off')).toBeCloseTo((pages * 3 / 4) * PAGE_SIZE_BYTES + (pages / 4) * PAGE_HEADER_BYTES, 3);
    expect(forecastGuest(g, 'precopy', RATE, false, LIMITS, MODEL).totalMs).toBeCloseTo(MODEL.setupMs + ((pages / 2) * (PAGE_SIZE_BYTES + PAGE_HEADER_BYTES) / RATE) * 1000 + MODEL.switchoverMs, 6);
    expect(forecastGuest(g, 'precopy', RATE, false, { ...LIMITS, dedup: false }, MODEL).wireBytes).toBeCloseTo(contentWireBytes(g, 'off'), 3);
    expect(forecastGuest(g, 'postcopy', RATE, false, LIMITS, MODEL).wireBytes).toBeCloseTo(contentWireBytes(g, 'off'), 3);
  });

  test('a dirtying guest: the geometric series of rounds, stopped where the engine stops', () => {
    // 256 MiB at 128 MiB/s: round 0 takes 2 s; dirtying 32 MiB/s leaves 64 MiB, then each
    // round ρ = 32·4112/(4096·128) of the one before. The rule stops once 1.5 × the final
    // round plus 30 ms fits 100 ms: after round 2 (~48 ms + 30 ms).
    const d = 32 * MiB;
    const f = forecastGuest(guest({ dirtyRateBytesPerSec: d }), 'precopy', RATE, false, LIMITS, MODEL);
    const t0 = 2;
    const t1 = (d * t0 * WIRE_PAGE) / PAGE_SIZE_BYTES / RATE;
    const t2 = (d * t1 * WIRE_PAGE) / PAGE_SIZE_BYTES / RATE;
    const finalBytes = ((d * (t2 + PAUSE_LATENCY_MS / 1000)) / PAGE_SIZE_BYTES) * WIRE_PAGE;
    expect(f.rounds).toBe(3);
    expect(f.completes).toBe(true);
    expect(f.downtimeMs).toBeCloseTo(MODEL.switchoverMs + (finalBytes / RATE) * 1000, 6);
    expect(f.totalMs).toBeCloseTo(MODEL.setupMs + (t0 + t1 + t2) * 1000 + f.downtimeMs, 6);
    expect(f.wireBytes).toBeCloseTo(256 * MiB + ((d * (t0 + t1)) / PAGE_SIZE_BYTES) * WIRE_PAGE + finalBytes, 0);
  });

  test('the hot set bounds the dirty set', () => {
    const small = forecastGuest(guest({ dirtyRateBytesPerSec: 1024 * MiB, hotSetBytes: 1 * MiB }), 'precopy', RATE, false, LIMITS, MODEL);
    // Round 0 leaves the hot set (1 MiB ≈ 8 ms at 128 MiB/s × 1.5 + 30 ms fits 100 ms): it stops.
    expect(small).toMatchObject({ rounds: 1, completes: true });
    expect(small.downtimeMs).toBeCloseTo(MODEL.switchoverMs + ((MiB / PAGE_SIZE_BYTES) * WIRE_PAGE / RATE) * 1000, 6);
  });

  test('post-copy: the switchover, the push, and half the touched hot pages as faults', () => {
    const d = 16 * MiB;
    const f = forecastGuest(guest({ dirtyRateBytesPerSec: d, hotSetBytes: 8 * MiB }), 'postcopy', RATE, false, LIMITS, MODEL);
    const faults = Math.min(8 * MiB, d * 2) / PAGE_SIZE_BYTES / 2;
    expect(f).toMatchObject({ rounds: 0, completes: true, wireBytes: 256 * MiB, downtimeMs: MODEL.switchoverMs });
    expect(f.faults).toBeCloseTo(faults, 6);
    expect(f.totalMs).toBeCloseTo(MODEL.setupMs + MODEL.switchoverMs + 2000 + faults * MODEL.faultOverheadMs, 6);
  });
});

describe('a pre-copy that does not converge', () => {
  const fast = guest({ dirtyRateBytesPerSec: 200 * MiB });

  test('is forecast as not completing, naming the limit', () => {
    const f = forecastGuest(fast, 'precopy', RATE, false, LIMITS, MODEL);
    expect(f.completes).toBe(false);
    expect(f.ending).toMatch(/^does not converge: the (rounds|bytes) limit/);
    const option = forecastOption(input([fast]), 'precopy', 'gang');
    expect(option).toMatchObject({ completes: false, withinBudget: false });
  });

  test('with --force it completes, over the downtime budget', () => {
    const f = forecastOption(input([fast], { limits: { ...LIMITS, force: true } }), 'precopy', 'gang');
    expect(f.completes).toBe(true);
    expect(f.withinBudget).toBe(false);
    expect(f.downtimeMs).toBeGreaterThan(LIMITS.downtimeBudgetMs);
  });

  test('hybrid goes post-copy after two rounds (the engine gives up on convergence there)', () => {
    const f = forecastGuest(fast, 'hybrid', RATE, false, LIMITS, MODEL);
    expect(f).toMatchObject({ completes: true, rounds: 2, downtimeMs: MODEL.switchoverMs, ending: 'post-copy after 2 rounds' });
  });
});

describe('monotonicity: more dirty rate never forecasts less time', () => {
  const rates = [0, 1, 4, 8, 16, 24, 32, 48, 64, 96, 120, 127, 128, 140, 200, 400].map((r) => r * MiB);
  for (const technique of ['precopy', 'postcopy'] as const) {
    for (const hotSetBytes of [4 * MiB, 64 * MiB, 256 * MiB]) {
      test(`${technique}, hot set ${hotSetBytes / MiB} MiB`, () => {
        const totals = rates.map((d) => {
          const f = forecastGuest(guest({ dirtyRateBytesPerSec: d, hotSetBytes }), technique, RATE, false, LIMITS, MODEL);
          return f.completes ? f.totalMs : Number.POSITIVE_INFINITY;
        });
        for (let i = 1; i < totals.length; i++) expect(totals[i]!, `${rates[i]! / MiB} MiB/s after ${rates[i - 1]! / MiB} MiB/s`).toBeGreaterThanOrEqual(totals[i - 1]!);
      });
    }
  }

  test('a slower link never forecasts less time', () => {
    const g = guest({ dirtyRateBytesPerSec: 16 * MiB });
    const totals = [512, 256, 128, 96, 64, 32].map((r) => forecastGuest(g, 'precopy', r * MiB, false, LIMITS, MODEL).totalMs);
    for (let i = 1; i < totals.length; i++) expect(totals[i]!).toBeGreaterThanOrEqual(totals[i - 1]!);
  });
});

describe('gang or serial', () => {
  test('idle guests: the same bytes, the gang pays one set-up', () => {
    const guests = [guest({ name: 'a' }), guest({ name: 'b' })];
    const gang = forecastOption(input(guests, { model: { ...MODEL, setupMs: 500 } }), 'precopy', 'gang');
    const serial = forecastOption(input(guests, { model: { ...MODEL, setupMs: 500 } }), 'precopy', 'serial');
    expect(gang.wireBytes).toBeCloseTo(serial.wireBytes, 0);
    // Serial: two set-ups and two switchovers; the gang: one set-up, two switchovers (one at the gate).
    expect(serial.totalMs - gang.totalMs).toBeCloseTo(500, 6);
  });

  test('dirtying guests: a gang halves each one`s rate, so each round is longer and more is dirtied; serial is faster', () => {
    const guests = [guest({ name: 'a', dirtyRateBytesPerSec: 40 * MiB }), guest({ name: 'b', dirtyRateBytesPerSec: 40 * MiB })];
    const gang = forecastOption(input(guests), 'precopy', 'gang');
    const serial = forecastOption(input(guests), 'precopy', 'serial');
    expect(serial.totalMs).toBeLessThan(gang.totalMs);
    expect(serial.wireBytes).toBeLessThan(gang.wireBytes);
  });

  test('shared content goes once: the second guest sends headers for it (pre-copy only)', () => {
    const guests = [guest({ name: 'a', sharedShare: 0.5 }), guest({ name: 'b', sharedShare: 0.5 })];
    const pre = forecastOption(input(guests), 'precopy', 'serial');
    const post = forecastOption(input(guests), 'postcopy', 'serial');
    expect(pre.guests.map((g) => g.wireBytes)).toEqual([256 * MiB, contentWireBytes(guests[1]!, 'across')]);
    expect(post.guests.map((g) => g.wireBytes)).toEqual([256 * MiB, 256 * MiB]);
  });

  test('the candidates: every technique by gang and serial; without post-copy only pre-copy; one guest has no strategy to choose', () => {
    const two = [guest({ name: 'a' }), guest({ name: 'b' })];
    expect(forecastOptions(input(two), true).map((o) => `${o.technique}/${o.strategy}`)).toEqual(['precopy/gang', 'precopy/serial', 'postcopy/gang', 'postcopy/serial', 'hybrid/gang', 'hybrid/serial']);
    expect(forecastOptions(input(two), false).map((o) => `${o.technique}/${o.strategy}`)).toEqual(['precopy/gang', 'precopy/serial']);
    expect(forecastOptions(input([guest()]), true).map((o) => o.technique)).toEqual(['precopy', 'postcopy', 'hybrid']);
  });
});

describe('rate and workload', () => {
  test('the destination`s inbound traffic takes from the reservation, down to a floor', () => {
    expect(availableRate(100, undefined)).toBe(100);
    expect(availableRate(100, { inboundBytesPerSec: 40, linkBytesPerSec: 125 })).toBe(85);
    expect(availableRate(100, { inboundBytesPerSec: 10, linkBytesPerSec: 125 })).toBe(100);
    expect(availableRate(100, { inboundBytesPerSec: 125, linkBytesPerSec: 125 })).toBe(5);
  });

  test('a destination that reserves for the migration gives it its reservation, or what its workload leaves if more; never more than the source gives', () => {
    // The inbound workload fills the link; the destination holds it to its SLA lower limit (25 of 125).
    expect(availableRate(100, { inboundBytesPerSec: 125, linkBytesPerSec: 125, reservedBytesPerSec: 100 })).toBe(100);
    expect(availableRate(80, { inboundBytesPerSec: 125, linkBytesPerSec: 125, reservedBytesPerSec: 100 })).toBe(80);
    // A light inbound workload leaves more than the reservation: the class borrows it.
    expect(availableRate(120, { inboundBytesPerSec: 10, linkBytesPerSec: 125, reservedBytesPerSec: 100 })).toBe(115);
  });

  test('an option that leaves the workload less than its SLA lower limit says so', () => {
    const keeps = forecastOption(input([guest()], { availableBytesPerSec: 100, workload: { demandBytesPerSec: 50, slaLowerBytesPerSec: 20, linkBytesPerSec: 125 } }), 'precopy', 'gang');
    expect(keeps).toMatchObject({ workloadBytesPerSec: 25, keepsSla: true });
    const starves = forecastOption(input([guest()], { availableBytesPerSec: 110, workload: { demandBytesPerSec: 50, slaLowerBytesPerSec: 20, linkBytesPerSec: 125 } }), 'precopy', 'gang');
    expect(starves).toMatchObject({ workloadBytesPerSec: 15, keepsSla: false });
  });

  test('link efficiency scales the rate the forecast uses', () => {
    const full = forecastOption(input([guest()]), 'precopy', 'gang');
    const half = forecastOption(input([guest()], { model: { ...MODEL, linkEfficiency: 0.5 } }), 'precopy', 'gang');
    expect(half.rateBytesPerSec).toBe(full.rateBytesPerSec / 2);
    expect(half.totalMs - MODEL.setupMs - MODEL.switchoverMs).toBeCloseTo(2 * (full.totalMs - MODEL.setupMs - MODEL.switchoverMs), 6);
  });
});
