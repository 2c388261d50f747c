// The planner (seed paper 003, Algorithms 1 and 2) from tables: every branch, and the full
// technique and strategy tables against an oracle written from the paper's text.
import { describe, expect, test } from 'vitest';
import {
  contentionOf,
  DEFAULT_PLANNER_SETTINGS,
  dominantDirection,
  planMigration,
  rebalanceMedium,
  reserveBandwidth,
  selectStrategy,
  selectTechnique,
  type Contention,
  type Direction,
  type PlannerSettings,
  type Priority,
  type Scenario,
} from '../../agent/planner/planner.js';

const MB = 1e6;
/** A 1 Gbit/s link (125 MB/s), SLA 30..80 MB/s. */
const settings: PlannerSettings = {
  ...DEFAULT_PLANNER_SETTINGS,
  linkBytesPerSec: 125 * MB,
  slaLowerBytesPerSec: 30 * MB,
  slaUpperBytesPerSec: 80 * MB,
};
const rates = (rx: number, tx: number) => ({ rxBytesPerSec: rx * MB, txBytesPerSec: tx * MB });

describe('predominant direction', () => {
  test.each([
    ['mostly received', rates(10, 1), 'inbound'],
    ['mostly sent', rates(1, 10), 'outbound'],
    ['exactly at the ratio, received', rates(12, 10), 'inbound'],
    ['about equal, more sent', rates(10, 11), 'outbound'],
    ['about equal, more received', rates(11, 10), 'inbound'],
    ['equal', rates(5, 5), 'inbound'],
    ['silent', rates(0, 0), 'inbound'],
  ] as const)('%s', (_, r, expected) => {
    const { direction, reason } = dominantDirection(r, settings.dominanceRatio);
    expect(direction).toBe(expected);
    expect(reason).toContain(expected);
  });
});

describe('contention', () => {
  test.each([
    ['source sends 90% of the link', rates(0, 112.5), rates(0, 0), 'high', "source's outbound"],
    ['destination receives 70%', rates(0, 10), rates(87.5, 0), 'high', "destination's inbound"],
    ['source sends 40%', rates(0, 50), rates(10, 0), 'moderate', "source's outbound"],
    ['just under moderate', rates(0, 37), rates(0, 0), 'low', "source's outbound"],
    ['source receiving does not compete with pre-copy', rates(120, 0), rates(0, 120), 'low', "source's outbound"],
  ] as const)('%s', (_, source, destination, level, which) => {
    const c = contentionOf(source, destination, settings);
    expect(c.level).toBe(level);
    expect(c.reason).toContain(which);
  });
});

/** The paper's rules, restated independently (section 3.4.1). */
function techniqueOracle(contention: Contention, priority: Priority, scenario: Scenario, direction: Direction) {
  if (contention === 'low') return 'precopy';
  if (contention === 'moderate') {
    const match = direction === 'inbound' ? scenario === 'in-in' : scenario === 'out-out';
    return match ? 'precopy' : 'hybrid';
  }
  if (priority !== 'high') return 'hybrid';
  return direction === 'inbound' && ['in-in', 'out-in'].includes(scenario) ? 'postcopy' : 'hybrid';
}

describe('technique (Algorithm 1, step 2)', () => {
  const contentions: Contention[] = ['high', 'moderate', 'low'];
  const priorities: Priority[] = ['high', 'medium', 'low'];
  const scenarios: Scenario[] = ['in-in', 'in-out', 'out-in', 'out-out'];
  const directions: Direction[] = ['inbound', 'outbound'];
  const all = contentions.flatMap((c) => priorities.flatMap((p) => scenarios.flatMap((s) => directions.map((d) => [c, p, s, d] as const))));
  test.each(all)('%s contention, %s priority, %s, %s guest', (c, p, s, d) => {
    const { technique, reason } = selectTechnique(c, p, s, d);
    expect(technique).toBe(techniqueOracle(c, p, s, d));
    expect(reason.length).toBeGreaterThan(10);
  });
  test('the table uses every technique', () => {
    expect(new Set(all.map(([c, p, s, d]) => selectTechnique(c, p, s, d).technique))).toEqual(new Set(['precopy', 'postcopy', 'hybrid']));
  });
});

describe('strategy (Algorithm 1, step 3)', () => {
  test.each([
    ['high', 'high', 'parallel'],
    ['high', 'moderate', 'parallel'],
    ['high', 'low', 'parallel'],
    ['medium', 'high', 'serial'],
    ['medium', 'moderate', 'serial'],
    ['medium', 'low', 'parallel'],
    ['low', 'high', 'serial'],
    ['low', 'moderate', 'serial'],
    ['low', 'low', 'parallel'],
  ] as const)('%s priority, %s contention: %s', (priority, contention, expected) => {
    expect(selectStrategy(contention, priority).strategy).toBe(expected);
  });
});

describe('the plan', () => {
  test('orders high, medium, low (stable within a priority) and explains each guest', () => {
    const plan = planMigration(
      [
        { name: 'a', priority: 'low', traffic: rates(1, 20) },
        { name: 'b', priority: 'high', traffic: rates(20, 1) },
        { name: 'c', priority: 'medium', traffic: rates(5, 5) },
        { name: 'd', priority: 'high', traffic: rates(1, 20) },
      ],
      { source: rates(5, 100), destination: rates(90, 5) },
      settings,
    );
    expect(plan.scenario).toBe('out-in');
    expect(plan.contention).toBe('high');
    expect(plan.guests.map((g) => [g.name, g.order])).toEqual([['b', 0], ['d', 1], ['c', 2], ['a', 3]]);
    const byName = Object.fromEntries(plan.guests.map((g) => [g.name, g]));
    expect(byName.b).toMatchObject({ direction: 'inbound', technique: 'postcopy', strategy: 'parallel' });
    expect(byName.d).toMatchObject({ direction: 'outbound', technique: 'hybrid', strategy: 'parallel' });
    expect(byName.c).toMatchObject({ technique: 'hybrid', strategy: 'serial' });
    expect(byName.a).toMatchObject({ technique: 'hybrid', strategy: 'serial' });
    for (const g of plan.guests) expect(g.reasons).toHaveLength(4);
    expect(plan.reasons.join(' ')).toContain('high contention');
  });

  test('a quiet network: pre-copy in parallel for everyone', () => {
    const plan = planMigration(
      [
        { name: 'x', priority: 'low', traffic: rates(1, 1) },
        { name: 'y', priority: 'medium', traffic: rates(1, 1) },
      ],
      { source: rates(1, 2), destination: rates(2, 1) },
      settings,
    );
    expect(plan.contention).toBe('low');
    expect(plan.guests.every((g) => g.technique === 'precopy' && g.strategy === 'parallel')).toBe(true);
  });
});

describe('bandwidth reservation (Algorithm 2)', () => {
  test.each([
    ['high, workload above the lower limit: squeezed to it', 'high', 100, 95, 30, 'lower limit'],
    ['high, workload within the lower limit: left alone', 'high', 20, 105, undefined, 'free'],
    ['medium, workload above the upper limit: capped at it', 'medium', 100, 45, 80, 'upper limit'],
    ['medium, workload within the upper limit: left alone', 'medium', 60, 65, undefined, 'free'],
    ['low: only what is free', 'low', 60, 65, undefined, 'free'],
    ['low, link nearly full: the floor', 'low', 124, 6.25, undefined, 'floor'],
  ] as const)('%s', (_, priority, workload, migration, cap, word) => {
    const r = reserveBandwidth(priority, workload * MB, settings);
    expect(r.migrationBytesPerSec / MB).toBeCloseTo(migration, 6);
    expect(r.workloadCapBytesPerSec === undefined ? undefined : r.workloadCapBytesPerSec / MB).toBe(cap);
    expect(r.reason).toContain(word);
  });

  test('never leaves the workload below its lower limit, whatever the priority', () => {
    for (const priority of ['high', 'medium', 'low'] as const) {
      for (let workload = 0; workload <= 125; workload += 5) {
        const r = reserveBandwidth(priority, workload * MB, settings);
        const leftForWorkload = settings.linkBytesPerSec - r.migrationBytesPerSec;
        if (priority !== 'low') expect(leftForWorkload).toBeGreaterThanOrEqual(Math.min(workload * MB, settings.slaLowerBytesPerSec) - 1e-6);
        if (r.workloadCapBytesPerSec !== undefined) expect(r.workloadCapBytesPerSec).toBeGreaterThanOrEqual(settings.slaLowerBytesPerSec);
      }
    }
  });

  const start = reserveBandwidth('medium', 60 * MB, settings); // migration 65 MB/s
  test.each([
    ['the migration is not using what it has: no change', 40, 50, undefined, undefined],
    ['the workload dropped to 40: the migration grows to 85', 40, 64, 85, 40],
    ['the workload dropped to 10: it keeps its lower limit 30, the migration gets 95', 10, 64, 95, 30],
    ['the workload grew: no change', 70, 64, undefined, undefined],
  ] as const)('medium while running: %s', (_, workload, migrationUse, migration, cap) => {
    const next = rebalanceMedium(start, { workloadBytesPerSec: workload * MB, migrationBytesPerSec: migrationUse * MB }, settings);
    if (migration === undefined) expect(next).toBeUndefined();
    else {
      expect(next!.migrationBytesPerSec / MB).toBeCloseTo(migration, 6);
      expect(next!.workloadCapBytesPerSec! / MB).toBeCloseTo(cap!, 6);
    }
  });
});
