// --technique auto: what the migrate path runs for a plan, from tables. The plans are real
// (planFor on measured rates), so a change in the planner that changes what auto runs shows here.
import { describe, expect, test } from 'vitest';
import { DEFAULT_PLANNER_SETTINGS, type PlannerSettings, type Priority } from '../../agent/planner/planner.js';
import { planFor, type MigrationPlan } from '../../agent/planner/plan-for.js';
import { defaultAutoTechnique, followPlan, type FollowPlanInput } from '../../agent/planner/follow-plan.js';
import { planAnswer } from '../../agent/planner/plan-answer.js';

const MB = 1e6;
const LINK = 125 * MB;
const settings: PlannerSettings = { ...DEFAULT_PLANNER_SETTINGS, linkBytesPerSec: LINK, slaLowerBytesPerSec: 30 * MB, slaUpperBytesPerSec: 80 * MB };
const rates = (rx: number, tx: number) => ({ rates: { rxBytesPerSec: rx * MB, txBytesPerSec: tx * MB } });
const WITH_POSTCOPY = ['lz4', 'precopy', 'dedup', 'postcopy'];
const WITHOUT_POSTCOPY = ['lz4', 'precopy', 'dedup'];

/** A plan for vm1 (inbound) and vm2 (outbound) with the source sending `sourceTx` MB/s and the destination receiving `destinationRx`. */
function plan(priority: Priority, sourceTx: number, destinationRx: number): MigrationPlan {
  return planFor({
    guests: [
      { name: 'vm1', traffic: rates(20, 1) },
      { name: 'vm2', traffic: rates(1, 20) },
    ],
    priority,
    source: rates(1, sourceTx),
    destination: rates(destinationRx, 1),
    settings,
    dominanceRatio: settings.dominanceRatio,
  });
}

function input(overrides: Partial<FollowPlanInput>): FollowPlanInput {
  return {
    guests: ['vm1', 'vm2'],
    priority: 'medium',
    requestedStrategy: 'gang',
    plan: undefined,
    peerFeatures: WITH_POSTCOPY,
    shaper: { applied: true, reason: 'high priority: ...' },
    linkBytesPerSec: LINK,
    manualBandwidthBytesPerSec: undefined,
    ...overrides,
  };
}

describe('followPlan: technique, strategy and order', () => {
  test.each([
    // priority, source tx, destination rx, features, techniques (vm1, vm2), strategy
    ['high', 110, 1, WITH_POSTCOPY, ['postcopy', 'hybrid'], 'gang'],
    ['high', 110, 1, WITHOUT_POSTCOPY, ['precopy', 'precopy'], 'gang'],
    ['medium', 110, 1, WITH_POSTCOPY, ['hybrid', 'hybrid'], 'serial'],
    ['low', 50, 1, WITH_POSTCOPY, ['hybrid', 'hybrid'], 'serial'],
    ['low', 5, 1, WITH_POSTCOPY, ['precopy', 'precopy'], 'gang'],
    ['medium', 5, 100, WITH_POSTCOPY, ['hybrid', 'hybrid'], 'serial'],
  ] as const)('%s priority, source sends %d MB/s, destination receives %d MB/s, features %j', (priority, tx, rx, features, techniques, strategy) => {
    const p = plan(priority, tx, rx);
    const followed = followPlan(input({ priority, plan: p, peerFeatures: features }));
    expect(followed.followed).toBe(true);
    expect(followed.guests.map((g) => [g.name, g.technique])).toEqual([
      ['vm1', techniques[0]],
      ['vm2', techniques[1]],
    ]);
    expect(followed.strategy).toBe(strategy);
    // Every guest says why; a guest moved to pre-copy for want of post-copy says that too.
    for (const [i, guest] of followed.guests.entries()) {
      expect(guest.reasons.length).toBeGreaterThanOrEqual(4);
      const planned = p.guests.find((g) => g.name === guest.name)!.technique;
      if (planned !== guest.technique) expect(guest.reasons.at(-1)).toMatch(new RegExp(`cannot post-copy.*pre-copy instead of ${planned}`));
      expect(guest.order).toBe(i);
    }
    expect(followed.reasons.join('\n')).toMatch(/scenario/);
  });

  test('the plan\'s order, not the request\'s', () => {
    const p = plan('high', 110, 1);
    const reversed: MigrationPlan = { ...p, guests: p.guests.map((g) => ({ ...g, order: 1 - g.order })) };
    expect(followPlan(input({ plan: reversed })).guests.map((g) => g.name)).toEqual(['vm2', 'vm1']);
  });

  test('mixed parallel and serial guests move serially, and say why', () => {
    const p = plan('high', 110, 1);
    const mixed: MigrationPlan = { ...p, guests: [p.guests[0]!, { ...p.guests[1]!, strategy: 'serial' }] };
    const followed = followPlan(input({ plan: mixed }));
    expect(followed.strategy).toBe('serial');
    expect(followed.reasons.join('\n')).toMatch(/mixes parallel and serial/);
  });
});

describe('followPlan: the rate', () => {
  test.each([
    ['the shaper holds it', { applied: true, reason: 'reserved' }, undefined, 'high', undefined, /the shaper holds the reservation/],
    ['no shaper: the pacer holds a reservation below the link', { applied: false, reason: 'not running as root' }, undefined, 'high', LINK - 30 * MB, /pacer holds the migration to the reserved 95000000/],
    ['--bandwidth wins over the reservation', { applied: false, reason: 'not root' }, 10 * MB, 'high', undefined, /--bandwidth 10000000 bytes\/s caps/],
  ] as const)('%s', (_, shaper, manual, priority, paced, reason) => {
    const followed = followPlan(input({ plan: plan(priority, 110, 1), shaper, manualBandwidthBytesPerSec: manual }));
    expect(followed.pacedBytesPerSec).toBe(paced);
    expect(followed.reasons.join('\n')).toMatch(reason);
  });

  test('a reservation of the whole link is not paced', () => {
    const whole: MigrationPlan = { ...plan('low', 5, 1), reservation: { migrationBytesPerSec: LINK, workloadCapBytesPerSec: null, reason: 'all of it' } };
    const followed = followPlan(input({ plan: whole, shaper: { applied: false, reason: 'no tc' } }));
    expect(followed.pacedBytesPerSec).toBeUndefined();
    expect(followed.reasons.join('\n')).toMatch(/whole link .* not paced/);
  });
});

describe('followPlan without traffic data', () => {
  test.each([
    [WITH_POSTCOPY, 'hybrid'],
    [WITHOUT_POSTCOPY, 'precopy'],
  ] as const)('falls back to the default auto technique with features %j, keeps the requested strategy and order, and says why', (features, technique) => {
    const followed = followPlan(input({ guests: ['b', 'a'], requestedStrategy: 'serial', peerFeatures: features, noTrafficReason: 'no uplink is configured' }));
    expect(followed.followed).toBe(false);
    expect(defaultAutoTechnique(features)).toBe(technique);
    expect(followed.guests.map((g) => [g.name, g.technique, g.strategy])).toEqual([
      ['b', technique, null],
      ['a', technique, null],
    ]);
    expect(followed.strategy).toBe('serial');
    expect(followed.pacedBytesPerSec).toBeUndefined();
    expect(followed.reasons[0]).toMatch(/no traffic data \(no uplink is configured\)/);
  });
});

// The one decision: `gangway plan` answers what followPlan decides, and migrate --technique
// auto runs what followPlan decides, so the two cannot differ (the issue: plan said pre-copy
// from a plan of assumed-idle traffic while migrate ran hybrid, and "parallel" for "gang").
describe('the decision plan prints and migrate runs', () => {
  // Rows: traffic data or not, features, guests whose disks move, requested strategy → techniques (vm1, vm2), strategy, reserved.
  test.each([
    ['no traffic data, can post-copy', undefined, WITH_POSTCOPY, [], 'gang', ['hybrid', 'hybrid'], 'gang', [null, null]],
    ['no traffic data, cannot post-copy', undefined, WITHOUT_POSTCOPY, [], 'serial', ['precopy', 'precopy'], 'serial', [null, null]],
    ['no traffic data, vm2 moves its disks', undefined, WITH_POSTCOPY, ['vm2'], 'gang', ['hybrid', 'precopy'], 'gang', [null, null]],
    ['traffic data: high priority, busy source', plan('high', 110, 1), WITH_POSTCOPY, [], 'serial', ['postcopy', 'hybrid'], 'gang', [47.5 * MB, 47.5 * MB]],
    ['traffic data: low priority, idle link (the reservation held to the SLA lower limit, split over the gang)', plan('low', 5, 1), WITH_POSTCOPY, [], 'serial', ['precopy', 'precopy'], 'gang', [47.5 * MB, 47.5 * MB]],
    ['traffic data: medium priority, busy source, vm1 moves its disks', plan('medium', 110, 1), WITH_POSTCOPY, ['vm1'], 'gang', ['precopy', 'hybrid'], 'serial', [45 * MB, 45 * MB]],
  ] as const)('%s', (_, p, features, movingDisks, requested, techniques, strategy, reserved) => {
    const followed = followPlan(input({ plan: p, peerFeatures: features, movingDisks, requestedStrategy: requested, noTrafficReason: 'no uplink is configured' }));
    expect(followed.followed).toBe(p !== undefined);
    expect(followed.strategy).toBe(strategy);
    expect(followed.guests.map((g) => [g.name, g.technique, g.reservedBytesPerSec])).toEqual([
      ['vm1', techniques[0], reserved[0]],
      ['vm2', techniques[1], reserved[1]],
    ]);
    for (const name of movingDisks) expect(followed.guests.find((g) => g.name === name)!.reasons.at(-1)).toMatch(/its disks move with it: pre-copy/);
    // What gangway plan prints is that decision, word for word, in migrate's vocabulary.
    const answer = planAnswer('10.0.0.2:7401', followed, p);
    expect(answer.strategy).toBe(followed.strategy);
    expect(answer.guests.map((g) => [g.name, g.order, g.technique, g.reservedBytesPerSec, g.reasons])).toEqual(followed.guests.map((g) => [g.name, g.order, g.technique, g.reservedBytesPerSec, g.reasons]));
    expect(answer.reasons).toEqual(followed.reasons);
    expect(answer.planner === null).toBe(p === undefined);
    expect(JSON.stringify(answer)).not.toMatch(/"parallel"/);
  });
});
