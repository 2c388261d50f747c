// Post-copy's pure parts: the scheduler (faults first, pre-paging window, each page once),
// the hybrid switch policy, the latency summary, and the page-set operations they rest on.
import fc from 'fast-check';
import { describe, expect, it, test } from 'vitest';
import type { ConvergenceDecision } from '../../agent/migration/convergence.js';
import { hybridSwitch, LatencySamples, PostcopyScheduler, PREPAGE_WINDOW_MAX, PREPAGE_WINDOW_MIN, WindowTuner } from '../../agent/migration/postcopy.js';
import { PageSet, runsPageCount, subtractRuns } from '../../agent/tracker/page-set.js';

const pagesOf = (runs: Uint32Array): number[] => {
  const out: number[] = [];
  for (let i = 0; i < runs.length; i += 2) for (let p = runs[i]!; p < runs[i]! + runs[i + 1]!; p++) out.push(p);
  return out;
};

describe('PageSet', () => {
  it('addRange counts whole bytes and edges alike, delete and nextFrom agree with a Set', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 300 }),
        fc.array(fc.tuple(fc.boolean(), fc.nat(300), fc.nat(40)), { maxLength: 30 }),
        (pageCount, ops) => {
          const set = new PageSet(pageCount);
          const oracle = new Set<number>();
          for (const [add, first, count] of ops) {
            if (add) {
              set.addRange(first, count);
              for (let p = first; p < Math.min(first + count, pageCount); p++) oracle.add(p);
            } else {
              expect(set.delete(first)).toBe(oracle.delete(first) && first < pageCount);
            }
            expect(set.size).toBe(oracle.size);
          }
          const sorted = [...oracle].sort((a, b) => a - b);
          expect(pagesOf(set.toRuns())).toEqual(sorted);
          for (let from = 0; from <= pageCount; from += 7) expect(set.nextFrom(from)).toBe(sorted.find((p) => p >= from));
        },
      ),
      { numRuns: 300 },
    );
  });

  it('toRuns and size agree with a Set over bitmaps of many blocks, whole blocks clear, set and mixed (property)', () => {
    // Long ranges make blocks of 4096 pages all set; gaps leave them all clear; deletes and
    // short ranges mix them; a range may start the set empty or add to what is there.
    fc.assert(
      fc.property(
        fc.integer({ min: 4000, max: 20_000 }),
        fc.array(fc.tuple(fc.constantFrom('range', 'long', 'edge', 'delete'), fc.nat(20_000), fc.nat(60)), { maxLength: 25 }),
        (pageCount, ops) => {
          const set = new PageSet(pageCount);
          const oracle = new Set<number>();
          for (const [op, first, n] of ops) {
            if (op === 'delete') {
              expect(set.delete(first)).toBe(oracle.delete(first) && first < pageCount);
              continue;
            }
            // 'edge': a range that starts and ends a few pages either side of block boundaries.
            const start = op === 'edge' ? Math.max(0, Math.round(first / 4096) * 4096 + (n % 17) - 8) : first;
            const count = op === 'long' ? n * 300 : op === 'edge' ? 4096 * (1 + (n % 3)) + (n % 13) - 6 : n;
            set.addRange(start, count);
            for (let p = start; p < Math.min(start + count, pageCount); p++) oracle.add(p);
            expect(set.size).toBe(oracle.size);
          }
          const sorted = [...oracle].sort((a, b) => a - b);
          const runs = set.toRuns();
          expect(pagesOf(runs)).toEqual(sorted);
          // Runs are coalesced: none touches the next.
          for (let i = 2; i < runs.length; i += 2) expect(runs[i]!).toBeGreaterThan(runs[i - 2]! + runs[i - 1]!);
        },
      ),
      { numRuns: 200 },
    );
  });

  it('subtractRuns agrees with a set difference (property)', () => {
    const runsOf = (pages: number[]) => {
      const set = new PageSet(400);
      for (const p of pages) set.add(p);
      return set.toRuns();
    };
    fc.assert(
      fc.property(fc.array(fc.nat(399)), fc.array(fc.nat(399)), (a, b) => {
        const expected = [...new Set(a)].filter((p) => !b.includes(p)).sort((x, y) => x - y);
        expect(pagesOf(subtractRuns(runsOf(a), runsOf(b), 400))).toEqual(expected);
      }),
      { numRuns: 300 },
    );
  });

  it('subtractRuns', () => {
    expect([...subtractRuns(Uint32Array.of(0, 10, 20, 5), Uint32Array.of(0, 1, 8, 14), 30)]).toEqual([1, 7, 22, 3]);
    expect(runsPageCount(subtractRuns(Uint32Array.of(0, 100), Uint32Array.of(0, 100), 100))).toBe(0);
  });
});

describe('PostcopyScheduler', () => {
  it('a fault is answered with the faulted page alone, then a window after it; the push resumes behind the window', () => {
    const s = new PostcopyScheduler(1000, Uint32Array.of(0, 1000));
    const first = s.onFault(Uint32Array.of(500, 1));
    expect([...first.faulted]).toEqual([500, 1]);
    expect([...first.window]).toEqual([501, PREPAGE_WINDOW_MIN]);
    expect([...s.nextChunk(4)]).toEqual([501 + PREPAGE_WINDOW_MIN, 4]);
    expect(s.remaining).toBe(1000 - 1 - PREPAGE_WINDOW_MIN - 4);
  });

  it('the window doubles while faults follow each other closely, up to its maximum, and resets on a jump', () => {
    const s = new PostcopyScheduler(100_000, Uint32Array.of(0, 100_000));
    let at = 1000;
    let expected = PREPAGE_WINDOW_MIN;
    s.onFault(Uint32Array.of(at, 1));
    for (let i = 0; i < 10; i++) {
      at += s.window + 1; // just past the window the scheduler already sent
      const { window } = s.onFault(Uint32Array.of(at, 1));
      expected = Math.min(expected * 2, PREPAGE_WINDOW_MAX);
      expect(s.window).toBe(expected);
      expect(runsPageCount(window)).toBe(expected);
    }
    s.onFault(Uint32Array.of(10, 1)); // backwards: a jump
    expect(s.window).toBe(PREPAGE_WINDOW_MIN);
    s.onFault(Uint32Array.of(90_000, 1)); // far ahead: a jump
    expect(s.window).toBe(PREPAGE_WINDOW_MIN);
  });

  it('a page already pushed is not sent again on a fault, and a faulted page is not pushed', () => {
    const s = new PostcopyScheduler(64, Uint32Array.of(0, 64));
    expect([...s.nextChunk(10)]).toEqual([0, 10]);
    const again = s.onFault(Uint32Array.of(5, 1));
    expect(again.faulted.length).toBe(0); // in flight with the push already
    const later = s.onFault(Uint32Array.of(40, 1));
    expect([...later.faulted]).toEqual([40, 1]);
    const rest: number[] = [];
    for (let chunk = s.nextChunk(7); chunk.length > 0; chunk = s.nextChunk(7)) rest.push(...pagesOf(chunk));
    expect(rest).not.toContain(40);
    expect(rest).not.toContain(5);
  });

  it('only pages that are missing are ever sent', () => {
    const s = new PostcopyScheduler(100, Uint32Array.of(10, 5, 50, 5));
    expect(s.onFault(Uint32Array.of(0, 1)).faulted.length).toBe(0);
    const { faulted, window } = s.onFault(Uint32Array.of(11, 1));
    expect(pagesOf(window)).toEqual([12, 13, 14]);
    const sent = [...pagesOf(faulted), ...pagesOf(window)];
    for (let chunk = s.nextChunk(3); chunk.length > 0; chunk = s.nextChunk(3)) sent.push(...pagesOf(chunk));
    expect(sent.sort((a, b) => a - b)).toEqual([10, 11, 12, 13, 14, 50, 51, 52, 53, 54]);
  });

  it('every missing page goes out exactly once, whatever the faults (property)', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 2000 }),
        fc.array(fc.tuple(fc.nat(2100), fc.integer({ min: 1, max: 20 })), { maxLength: 12 }),
        fc.array(fc.oneof(fc.record({ fault: fc.nat(2100) }), fc.record({ push: fc.integer({ min: 1, max: 300 }) })), { maxLength: 60 }),
        (pageCount, missingRuns, steps) => {
          const missing = new PageSet(pageCount);
          for (const [first, count] of missingRuns) missing.addRange(first, count);
          const s = new PostcopyScheduler(pageCount, missing.toRuns());
          const sent: number[] = [];
          for (const step of steps) {
            if ('fault' in step) {
              const { faulted, window } = s.onFault(Uint32Array.of(Math.min(step.fault, pageCount - 1), 1));
              sent.push(...pagesOf(faulted), ...pagesOf(window));
            } else {
              sent.push(...pagesOf(s.nextChunk(step.push)));
            }
          }
          for (let chunk = s.nextChunk(500); chunk.length > 0; chunk = s.nextChunk(500)) sent.push(...pagesOf(chunk));
          expect(s.remaining).toBe(0);
          expect(sent.length).toBe(new Set(sent).size);
          expect(sent.sort((a, b) => a - b)).toEqual(pagesOf(missing.toRuns()));
        },
      ),
      { numRuns: 300 },
    );
  });

  it('putBack makes lost pages pending again', () => {
    const s = new PostcopyScheduler(20, Uint32Array.of(0, 20));
    const chunk = s.nextChunk(20);
    expect(s.remaining).toBe(0);
    s.putBack(chunk.subarray(0, 2));
    expect(s.remaining).toBe(20);
  });
});

describe('hybridSwitch', () => {
  const decision = (action: ConvergenceDecision['action'], converging: boolean): ConvergenceDecision =>
    action === 'limit'
      ? { action, limit: 'rounds', converging, predictedDowntimeMs: 900, reason: 'r' }
      : { action, converging, predictedDowntimeMs: 900, reason: 'r' };
  const policy = { postcopyAfterRounds: 5 };
  test.each([
    // action, converging, roundsDone, post-copy?, reason
    ['stop', true, 1, false, /converged/],
    ['stop', false, 9, false, /converged/],
    ['limit', true, 3, true, /limit/],
    ['limit', false, 1, true, /limit/],
    ['continue', false, 1, false, /^r$/],
    ['continue', false, 2, true, /does not converge/],
    ['continue', true, 2, false, /^r$/],
    ['continue', true, 4, false, /^r$/],
    ['continue', true, 5, true, /5 pre-copy rounds/],
  ] as const)('%s, converging %s, after %i rounds: post-copy %s', (action, converging, rounds, postcopy, reason) => {
    const choice = hybridSwitch(decision(action, converging), rounds, policy);
    expect(choice.postcopy).toBe(postcopy);
    expect(choice.reason).toMatch(reason);
  });
});

describe('LatencySamples', () => {
  it('p50, p99 and max', () => {
    const samples = new LatencySamples();
    expect(samples.summary()).toEqual({ p50Ms: 0, p99Ms: 0, maxMs: 0 });
    for (let i = 1; i <= 1000; i++) samples.add(i);
    expect(samples.summary()).toEqual({ p50Ms: 500, p99Ms: 990, maxMs: 1000 });
    expect(samples.count).toBe(1000);
  });
});

describe('WindowTuner', () => {
  const options = { initialBytes: 256 * 1024, minBytes: 256 * 1024, maxBytes: 4 * 1024 * 1024, targetDelayMs: 10, periodMs: 100 };
  it('holds the window until a period has passed, then sizes it to the delivery rate with a quarter of headroom', () => {
    const tuner = new WindowTuner(options, 0);
    expect(tuner.delivered(1_000_000, 50)).toBe(256 * 1024);
    // 12.5 MB in 100 ms: 125 MB/s (1 Gbit/s) x 10 ms x 1.25.
    expect(tuner.delivered(11_500_000, 100)).toBe(Math.round(125e6 * 0.01 * 1.25));
  });
  it('stays between its bounds', () => {
    const tuner = new WindowTuner(options, 0);
    expect(tuner.delivered(1_000, 100)).toBe(256 * 1024); // a slow link: the floor
    expect(tuner.delivered(1e9, 200)).toBe(4 * 1024 * 1024); // loopback: the ceiling
  });
  it('grows while the window, not the link, limits the delivery rate', () => {
    // A link of 1 Gbit/s with a 1 ms round trip: the window delivers window/RTT until that
    // reaches the link; each period it grows by the headroom over the target delay.
    const tuner = new WindowTuner(options, 0);
    let window = tuner.bytes;
    for (let t = 100; t <= 2000; t += 100) {
      const rate = Math.min(125e6, window / 0.001);
      window = tuner.delivered(rate * 0.1, t);
    }
    expect(window).toBe(Math.round(125e6 * 0.01 * 1.25));
  });
});
