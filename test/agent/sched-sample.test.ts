// The scheduler counters on the switchover's timing lines: a step's time on a CPU and its
// time waiting for one, from /proc/thread-self/schedstat (this thread's, not the process's).
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { schedSince, threadSched } from '../../agent/migration/sched-sample.js';

describe('threadSched', () => {
  it('counts time on a CPU while the thread works, and not while it sleeps', async () => {
    const before = threadSched();
    expect(before).toBeDefined();
    const until = performance.now() + 30;
    while (performance.now() < until);
    const busy = schedSince(before);
    // On a CPU for most of the 30 ms; what it did not run, it waited for a CPU.
    expect(busy.cpuMs! + busy.waitMs!).toBeGreaterThan(25);
    expect(busy.cpuMs).toBeGreaterThan(5);
    const rested = threadSched();
    await sleep(30);
    const idle = schedSince(rested);
    expect(idle.cpuMs).toBeLessThan(15);
  });

  it('says nothing without a first sample', () => {
    expect(schedSince(undefined)).toEqual({});
  });
});
