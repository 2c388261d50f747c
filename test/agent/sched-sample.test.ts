// The scheduler counters on the switchover's timing lines: a step's time on a CPU and its
// time waiting for one, from /proc/thread-self/schedstat (this thread's, not the process's),
// and the time V8's collections paused the thread.
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { debugSched, schedSince } from '../../agent/migration/sched-sample.js';

const debug = { isLevelEnabled: (level: string) => level === 'debug' };

describe('debugSched and schedSince', () => {
  it('count time on a CPU while the thread works, and not while it sleeps', async () => {
    const before = debugSched(debug);
    expect(before).toBeDefined();
    const until = performance.now() + 30;
    while (performance.now() < until);
    const busy = schedSince(before);
    // On a CPU for most of the 30 ms; what it did not run, it waited for a CPU.
    expect(busy.cpuMs! + busy.waitMs!).toBeGreaterThan(25);
    expect(busy.cpuMs).toBeGreaterThan(5);
    const rested = debugSched(debug);
    await sleep(30);
    const idle = schedSince(rested);
    expect(idle.cpuMs).toBeLessThan(15);
  });

  it('count the collections in the window', () => {
    const before = debugSched(debug);
    // Garbage well past the young generation's size: scavenges.
    let kept = 0;
    for (let round = 0; round < 20; round++) {
      const held = Array.from({ length: 50_000 }, (_, i) => ({ i }));
      kept += held.length;
    }
    const span = schedSince(before);
    expect(kept).toBe(1_000_000);
    expect(span.gcs).toBeGreaterThan(0);
    expect(span.gcMs).toBeGreaterThan(0);
    expect(span.gcMs!).toBeLessThanOrEqual(span.cpuMs! + span.waitMs! + 1);
  });

  it('take no sample where the log writes no debug lines, and say nothing without one', () => {
    expect(debugSched({ isLevelEnabled: () => false })).toBeUndefined();
    expect(schedSince(undefined)).toEqual({});
  });
});
