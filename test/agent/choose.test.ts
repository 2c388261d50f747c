// Choosing by forecast: the fastest option within the downtime budget and the SLA wins, the
// paper's mode keeps Algorithm 1's choice with the forecasts beside it, and the plan that
// migrate follows carries the winner's technique, strategy and reserved rate.
import { describe, expect, test } from 'vitest';
import { chooseByForecast, forecastPlan, type ForecastPlanInput } from '../../agent/planner/choose.js';
import { forecastOptions, type ForecastInput, type GuestProfile } from '../../agent/planner/forecast.js';
import { followPlan } from '../../agent/planner/follow-plan.js';
import { planFor } from '../../agent/planner/plan-for.js';
import { DEFAULT_PLANNER_SETTINGS, type PlannerSettings } from '../../agent/planner/planner.js';

const MiB = 1024 * 1024;
const MB = 1e6;
const LINK = 125 * MB;
const settings: PlannerSettings = { ...DEFAULT_PLANNER_SETTINGS, linkBytesPerSec: LINK, slaLowerBytesPerSec: 12.5 * MB, slaUpperBytesPerSec: 62.5 * MB };
const MODEL = { linkEfficiency: 0.9, setupMs: 150, switchoverMs: 30, faultOverheadMs: 0.5 };
const LIMITS = { downtimeBudgetMs: 300, maxRounds: 30, maxBytesFactor: 3, force: false };

function profile(name: string, dirtyMiBPerSec: number): GuestProfile {
  return { name, memoryBytes: 128 * MiB, zeroShare: 0, duplicateShare: 0, sharedShare: 0, dirtyRateBytesPerSec: dirtyMiBPerSec * MiB, hotSetBytes: 128 * MiB };
}

function options(guests: GuestProfile[], overrides: Partial<ForecastInput> = {}) {
  return forecastOptions({ guests, availableBytesPerSec: 100 * MB, workload: undefined, limits: LIMITS, model: MODEL, ...overrides }, true);
}

describe('chooseByForecast', () => {
  test('an idle guest: every technique forecasts the same time; pre-copy, listed first, wins the tie', () => {
    const { chosen, why } = chooseByForecast(options([profile('vm1', 0)]), 300);
    expect(chosen?.technique).toBe('precopy');
    expect(why[0]).toMatch(/^precopy: forecast .*, the fastest of 3 options within the downtime budget 300 ms and the workload's SLA; next postcopy at .* \(\+0%\)$/);
  });

  test('a guest dirtying faster than the link: pre-copy is out (it does not complete); the fastest of the rest wins', () => {
    const all = options([profile('vm1', 200)]);
    const { chosen, why } = chooseByForecast(all, 300);
    const fastest = all.filter((o) => o.completes).sort((a, b) => a.totalMs - b.totalMs)[0]!;
    expect(chosen).toBe(fastest);
    expect(chosen?.technique).not.toBe('precopy');
    expect(why.some((w) => /^precopy: does not complete \(does not converge/.test(w))).toBe(true);
  });

  test('two dirtying guests go serially (a gang halves each one`s rate)', () => {
    const { chosen } = chooseByForecast(options([profile('a', 30), profile('b', 30)]), 300);
    expect(chosen?.strategy).toBe('serial');
  });

  test('no option keeps the budget: the least downtime, said so', () => {
    const { chosen, why } = chooseByForecast(options([profile('vm1', 0)], { model: { ...MODEL, switchoverMs: 500 } }), 300);
    expect(chosen).toBeDefined();
    expect(why[0]).toMatch(/no option keeps the downtime budget 300 ms; this one has the least forecast downtime, 500 ms/);
  });

  test('nothing completes within the SLA: no choice', () => {
    const all = options([profile('vm1', 0)], { availableBytesPerSec: 120 * MB, workload: { demandBytesPerSec: 50 * MB, slaLowerBytesPerSec: 12.5 * MB, linkBytesPerSec: LINK } });
    const { chosen, why } = chooseByForecast(all, 300);
    expect(chosen).toBeUndefined();
    expect(why[0]).toBe("no option is forecast to complete within the workload's SLA: the paper's plan stands");
  });
});

describe('forecastPlan: the plan migrate follows', () => {
  // Low contention: Algorithm 1 says pre-copy, parallel (a gang) for high priority.
  const paperPlan = () =>
    planFor({
      guests: [
        { name: 'a', traffic: { rates: { rxBytesPerSec: 1 * MB, txBytesPerSec: 1 * MB } } },
        { name: 'b', traffic: { rates: { rxBytesPerSec: 1 * MB, txBytesPerSec: 1 * MB } } },
      ],
      priority: 'high',
      source: { rates: { rxBytesPerSec: 1 * MB, txBytesPerSec: 1 * MB } },
      destination: { rates: { rxBytesPerSec: 1 * MB, txBytesPerSec: 1 * MB } },
      settings,
      dominanceRatio: settings.dominanceRatio,
    });
  const input = (mode: 'paper' | 'forecast'): ForecastPlanInput => ({
    mode,
    profiles: [profile('a', 30), profile('b', 30)],
    limits: LIMITS,
    model: MODEL,
    calibration: [],
    canPostcopy: true,
    manualBandwidthBytesPerSec: undefined,
    linkBytesPerSec: LINK,
    slaLowerBytesPerSec: settings.slaLowerBytesPerSec,
    measured: [],
    assumptions: [],
  });
  const follow = (plan: ReturnType<typeof paperPlan>) =>
    followPlan({ guests: ['a', 'b'], priority: 'high', requestedStrategy: 'gang', plan, peerFeatures: ['postcopy'], shaper: { applied: true, reason: 'shaper' }, linkBytesPerSec: LINK, manualBandwidthBytesPerSec: undefined });

  test("'paper' keeps Algorithm 1's pre-copy gang and shows the forecasts beside it", () => {
    const plan = forecastPlan(paperPlan(), input('paper'));
    expect(plan.guests.map((g) => [g.technique, g.strategy])).toEqual([['precopy', 'parallel'], ['precopy', 'parallel']]);
    expect(plan.forecast?.mode).toBe('paper');
    expect(plan.forecast?.chosen).toMatchObject({ technique: 'precopy', strategy: 'gang' });
    expect(plan.forecast?.options).toHaveLength(6);
    expect(plan.forecast?.why[0]).toMatch(/^planner mode 'paper': Algorithms 1 and 2 decide; .*\(the forecast would choose \w+ serial\)$/);
    expect(follow(plan).strategy).toBe('gang');
  });

  test("'forecast' follows the fastest option: serial, each guest with the whole reservation, and says why", () => {
    const paper = paperPlan();
    const plan = forecastPlan(paper, input('forecast'));
    const chosen = plan.forecast!.chosen!;
    expect(chosen.strategy).toBe('serial');
    expect(chosen.totalMs).toBe(Math.min(...plan.forecast!.options.filter((o) => o.withinBudget).map((o) => o.totalMs)));
    expect(plan.guests.every((g) => g.technique === chosen.technique && g.strategy === 'serial')).toBe(true);
    expect(plan.guests.map((g) => g.reservedBytesPerSec)).toEqual([paper.reservation!.migrationBytesPerSec, paper.reservation!.migrationBytesPerSec]);
    const followed = follow(plan);
    expect(followed.strategy).toBe('serial');
    expect(followed.guests.map((g) => g.technique)).toEqual([chosen.technique, chosen.technique]);
    expect(followed.reasons).toContain(`forecast: ${plan.forecast!.why[0]}`);
  });

  test('the migration is forecast at what the workload leaves of the link (the shaper lets it borrow), not only its reservation', () => {
    const paper = paperPlan();
    expect(paper.reservation!.migrationBytesPerSec).toBeLessThan(LINK - 1 * MB);
    const plan = forecastPlan(paper, input('forecast'));
    // The source's workload sends 1 MB/s and the destination receives 1 MB/s: the link less that.
    expect(plan.forecast!.chosen!.rateBytesPerSec).toBeCloseTo((LINK - 1 * MB) * MODEL.linkEfficiency, 3);
    // Given what the workload leaves, the workload keeps all it asks for: every option keeps the SLA.
    const busy = forecastPlan({ ...paper, sourceRates: { rxBytesPerSec: 0, txBytesPerSec: 0.1 } }, input('forecast'));
    expect(busy.forecast!.options.every((o) => o.keepsSla)).toBe(true);
    expect(busy.forecast!.chosen).not.toBeNull();
    // A manual rate is a ceiling.
    const manual = forecastPlan(paper, { ...input('forecast'), manualBandwidthBytesPerSec: 50 * MB });
    expect(manual.forecast!.chosen!.rateBytesPerSec).toBeCloseTo(50 * MB * MODEL.linkEfficiency, 3);
  });

  test('options come fastest first, each with time, downtime and wire bytes', () => {
    const totals = forecastPlan(paperPlan(), input('forecast')).forecast!.options.map((o) => o.totalMs);
    expect(totals).toEqual([...totals].sort((a, b) => a - b));
  });
});
