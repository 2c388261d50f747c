// The outgoing limit's queue: first come first served, a cancelled waiter leaves it, and a
// gang holds one slot for all its members until the last lets go.
import { describe, expect, test } from 'vitest';
import { MigrationSlots } from '../../agent/daemon/migration-slots.js';

const never = () => new AbortController().signal;
const settled = async () => {
  for (let i = 0; i < 5; i++) await Promise.resolve();
};

describe('MigrationSlots', () => {
  test('beyond the limit a migration waits, and the waiters start in the order they came', async () => {
    const slots = new MigrationSlots(1);
    const order: string[] = [];
    const first = await slots.acquire(never());
    expect(slots.full).toBe(true);
    const second = slots.acquire(never()).then((release) => (order.push('second'), release));
    const third = slots.acquire(never()).then((release) => (order.push('third'), release));
    await settled();
    expect(order).toEqual([]);
    expect(slots.queued).toBe(2);
    first();
    first(); // a second release of the same slot frees nothing more
    (await second)();
    (await third)();
    expect(order).toEqual(['second', 'third']);
    expect(slots.full).toBe(false);
  });

  test('a waiter cancelled leaves the queue with ABORTED and the next one gets the slot', async () => {
    const slots = new MigrationSlots(1);
    const first = await slots.acquire(never());
    const cancel = new AbortController();
    const cancelled = slots.acquire(cancel.signal);
    const next = slots.acquire(never());
    cancel.abort();
    await expect(cancelled).rejects.toMatchObject({ code: 'GANGWAY_ERR_ABORTED', message: expect.stringMatching(/cancelled while queued.*maxParallelOutbound/) });
    expect(slots.queued).toBe(1);
    first();
    (await next)();
    expect(slots.full).toBe(false);
  });

  test('a gang takes one slot for all its members and frees it when the last member lets go', async () => {
    const slots = new MigrationSlots(1);
    const gang = slots.gang(3);
    expect(gang.full()).toBe(false);
    const members = await Promise.all([gang.acquire(never()), gang.acquire(never()), gang.acquire(never())]);
    expect(slots.full).toBe(true);
    expect(gang.full()).toBe(false);
    const other = slots.acquire(never());
    let started = false;
    void other.then(() => (started = true));
    members[0]!();
    members[1]!();
    await settled();
    expect(started).toBe(false);
    members[2]!();
    (await other)();
    expect(started).toBe(true);
  });

  test('a gang queued behind another migration waits as a whole; its members cancelled free its place', async () => {
    const slots = new MigrationSlots(1);
    const first = await slots.acquire(never());
    const gang = slots.gang(2);
    expect(gang.full()).toBe(true);
    const cancels = [new AbortController(), new AbortController()];
    const members = cancels.map((c) => gang.acquire(c.signal));
    for (const c of cancels) c.abort();
    for (const member of members) await expect(member).rejects.toMatchObject({ code: 'GANGWAY_ERR_ABORTED' });
    first();
    // Nothing holds the slot: the gang left the queue.
    expect(slots.full).toBe(false);
    (await slots.acquire(never()))();
  });
});
