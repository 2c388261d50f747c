// The injected faults the engine takes instead of reading the environment on its hot path.
import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { dropPages, DroppingTracker, faultsFromEnv } from '../../agent/migration/faults.js';
import type { DirtyTracker } from '../../agent/tracker/dirty-tracker.js';

const log = pino({ level: 'silent' });

/** A tracker that reports the given collects in turn and records what it was told. */
function scripted(collects: number[][]): DirtyTracker & { remarked: Uint32Array[]; closed: boolean } {
  const queue = collects.map((runs) => Uint32Array.from(runs));
  const tracker = {
    kind: 'uffd-wp' as const,
    remarked: [] as Uint32Array[],
    closed: false,
    arm: async () => {},
    collect: async () => queue.shift() ?? new Uint32Array(0),
    remark: (runs: Uint32Array) => void tracker.remarked.push(runs),
    noteSent: () => {},
    close: () => void (tracker.closed = true),
  };
  return tracker;
}

describe('dropPages', () => {
  it('drops the first pages of the runs, across runs', () => {
    expect([...dropPages(Uint32Array.of(10, 3, 20, 5), 4)]).toEqual([21, 4]);
    expect([...dropPages(Uint32Array.of(10, 3), 1)]).toEqual([11, 2]);
    expect([...dropPages(Uint32Array.of(10, 3), 9)]).toEqual([]);
  });
});

describe('DroppingTracker', () => {
  it('loses pages once, at the first collect that reports any; passes the rest through', async () => {
    const inner = scripted([[], [0, 8], [0, 8]]);
    const tracker = new DroppingTracker(inner, 5, log);
    expect([...(await tracker.collect())]).toEqual([]);
    expect([...(await tracker.collect())]).toEqual([5, 3]);
    expect([...(await tracker.collect())]).toEqual([0, 8]);
    tracker.remark(Uint32Array.of(1, 1));
    expect(inner.remarked).toHaveLength(1);
    tracker.close();
    expect(inner.closed).toBe(true);
    expect(tracker.kind).toBe('uffd-wp');
  });

  it('is built from GANGWAY_FAULT_DROP_DIRTY once, and not at all without it', async () => {
    expect(faultsFromEnv({}, log)).toEqual({});
    expect(faultsFromEnv({ GANGWAY_FAULT_DROP_DIRTY: '0' }, log)).toEqual({});
    const { wrapTracker } = faultsFromEnv({ GANGWAY_FAULT_DROP_DIRTY: '2' }, log);
    const wrapped = wrapTracker!(scripted([[4, 4]]));
    expect([...(await wrapped.collect())]).toEqual([6, 2]);
  });
});
