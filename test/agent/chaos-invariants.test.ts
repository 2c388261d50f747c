// The chaos campaign's rules (bench/chaos/invariants.ts) and its schedule (schedule.ts): what
// counts as a violation after a run, and that a run is a function of its seed.
import { describe, expect, test } from 'vitest';
import { judgePlacement, leftoverViolations, settled, type GuestView } from '../../bench/chaos/invariants.js';
import { FAULT_KINDS, planRun } from '../../bench/chaos/schedule.js';
import type { AgentStatus } from '../../agent/local-agent.js';

const view = (over: Partial<GuestView>): GuestView => ({ name: 'g', state: 'running', stalePages: 0, metaErrors: 0, deviceErrors: 0, ...over }) as GuestView;

describe('judgePlacement', () => {
  test.each([
    ['moved: runs at the destination only', undefined, view({}), 'moved', []],
    ['stayed: runs at the source only', view({}), undefined, 'stayed', []],
    ['split brain', view({}), view({}), undefined, [/runs in two places/]],
    ['lost: listed nowhere', undefined, undefined, undefined, [/runs nowhere \(no agent lists it\)/]],
    ['lost: paused at the source, nothing at the destination', view({ state: 'paused' }), undefined, undefined, [/runs nowhere \(paused at the source\)/]],
    ['stranded and reported: not a violation', view({ state: 'paused' }), view({ state: 'paused', incoming: { migrationId: 'm', from: 'a', missingPages: 7, stranded: 'the source did not come back' } } as never), 'stranded', []],
    ['a paused copy left at the source', view({ state: 'paused' }), view({}), 'moved', [/the source still holds a paused copy/]],
    ['stale pages where it runs', undefined, view({ stalePages: 3 }), 'moved', [/found 3 stale pages at the destination/]],
    ['a dead process', view({ state: 'dead' }), view({}), 'moved', [/process at the source is dead/, /source still holds a dead copy/]],
    ['device state lost', view({ deviceErrors: 1 }), undefined, 'stayed', [/device state was lost or corrupt on 1 resumes at the source/]],
  ] as const)('%s', (_what, source, destination, outcome, patterns) => {
    const verdict = judgePlacement({ name: 'g', source, destination });
    expect(verdict.outcome).toBe(outcome);
    expect(verdict.violations).toHaveLength(patterns.length);
    patterns.forEach((pattern, i) => expect(verdict.violations[i]).toMatch(pattern));
  });
});

describe('settled', () => {
  const status = (over: Partial<AgentStatus>): AgentStatus => ({ guests: [], migrations: [], ...over }) as unknown as AgentStatus;
  test('a running migration or a guest between two places is not settled; a stranded one is', () => {
    expect(settled(status({}), ['g'])).toBe(true);
    expect(settled(status({ migrations: [{ state: 'running', guest: 'g' }] } as never), ['g'])).toBe(false);
    expect(settled(status({ migrations: [{ state: 'running', guest: 'other' }] } as never), ['g'])).toBe(true);
    expect(settled(status({ guests: [view({ outgoing: { phase: 'commit' } } as never)] }), ['g'])).toBe(false);
    expect(settled(status({ guests: [view({ incoming: { missingPages: 3 } } as never)] }), ['g'])).toBe(false);
    expect(settled(status({ guests: [view({ incoming: { missingPages: 3, stranded: 'gone' } } as never)] }), ['g'])).toBe(true);
    // The source's paused copy of a stranded post-copy: marked interrupted, it is done (it keeps the pages).
    expect(settled(status({ guests: [view({ state: 'paused', outgoing: { phase: 'postcopy' } } as never)] }), ['g'])).toBe(false);
    expect(settled(status({ guests: [view({ state: 'paused', outgoing: { phase: 'postcopy', interrupted: 'the destination gave up waiting for its missing pages' } } as never)] }), ['g'])).toBe(true);
  });
});

test('leftovers are each a violation', () => {
  expect(leftoverViolations({ processes: ['12 gangway-guest run /dev/shm/gangway-g-x'], memoryFiles: ['/dev/shm/gangway-g-x'], records: [] })).toEqual([
    'left behind after the guests were stopped: process 12 gangway-guest run /dev/shm/gangway-g-x',
    'left behind after the guests were stopped: memory file /dev/shm/gangway-g-x',
  ]);
  expect(leftoverViolations({ processes: [], memoryFiles: [], records: [] })).toEqual([]);
});

describe('planRun', () => {
  test('a run is a function of its seed, and draws only the faults it is given', () => {
    expect(planRun(42, { quick: true, faults: FAULT_KINDS })).toEqual(planRun(42, { quick: true, faults: FAULT_KINDS }));
    const seen = new Set<string>();
    for (let seed = 0; seed < 300; seed++) {
      const plan = planRun(seed, { quick: true, faults: ['none', 'cancel'] });
      seen.add(plan.fault.kind);
      expect(plan.guests.length).toBeGreaterThanOrEqual(1);
      expect(plan.guests.length).toBeLessThanOrEqual(2);
      expect(new Set(plan.guests.map((g) => g.name)).size).toBe(plan.guests.length);
    }
    expect([...seen].sort()).toEqual(['cancel', 'none']);
    const kinds = new Set(Array.from({ length: 500 }, (_, seed) => planRun(seed, { quick: false, faults: FAULT_KINDS }).fault.kind));
    expect(kinds.size).toBe(FAULT_KINDS.length);
  });
});
