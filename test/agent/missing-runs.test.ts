// The missing pages a post-copy destination takes from the source's postcopy frames: runs
// kept as they came, ascending across frames; a source that sends a run past the region or
// one that is not after the runs before it is refused (BAD_PAGES), whatever it sent before.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { MissingRuns } from '../../agent/migration/destination-postcopy.js';
import { ErrorCode } from '../../protocol/errors.js';
import { PageSet } from '../../agent/tracker/page-set.js';

describe('MissingRuns', () => {
  it('joins ascending runs from any number of frames into the runs a bitmap of them gives', () => {
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.nat(50), fc.integer({ min: 1, max: 50 })), { maxLength: 40 }), fc.array(fc.nat(40), { maxLength: 5 }), (gapsAndCounts, cuts) => {
        const flat: number[] = [];
        let at = 0;
        for (const [gap, count] of gapsAndCounts) {
          flat.push(at + gap, count);
          at += gap + count;
        }
        const pageCount = at + 10;
        const missing = new MissingRuns(0, pageCount);
        // The same runs cut into frames at arbitrary run boundaries.
        const bounds = [...new Set(cuts.map((c) => Math.min(c, gapsAndCounts.length)))].sort((a, b) => a - b);
        let from = 0;
        for (const to of [...bounds, gapsAndCounts.length]) {
          missing.add(Uint32Array.from(flat.slice(from * 2, to * 2)));
          from = Math.max(from, to);
        }
        const set = new PageSet(pageCount);
        set.addRuns(Uint32Array.from(flat));
        const pages = (runs: Uint32Array) => {
          const out: number[] = [];
          for (let i = 0; i < runs.length; i += 2) for (let p = runs[i]!; p < runs[i]! + runs[i + 1]!; p++) out.push(p);
          return out;
        };
        expect(pages(missing.runs())).toEqual(pages(set.toRuns()));
      }),
      { numRuns: 200 },
    );
  });

  it('refuses a run past the region, and one that overlaps or comes before the runs already given', () => {
    const missing = new MissingRuns(2, 100);
    missing.add(Uint32Array.of(10, 5, 20, 5));
    expect(() => missing.add(Uint32Array.of(90, 11))).toThrow(expect.objectContaining({ code: ErrorCode.BAD_PAGES, message: expect.stringMatching(/pages 90\.\.100 are past region 2's 100/) }));
    expect(() => missing.add(Uint32Array.of(24, 3))).toThrow(expect.objectContaining({ code: ErrorCode.BAD_PAGES, message: expect.stringMatching(/at 24 of region 2 is not after the runs before it \(they end at 25\)/) }));
    expect(() => missing.add(Uint32Array.of(0, 1))).toThrow(expect.objectContaining({ code: ErrorCode.BAD_PAGES }));
    // A frame refused part-way leaves nothing of itself behind.
    expect(() => missing.add(Uint32Array.of(30, 5, 32, 1))).toThrow(expect.objectContaining({ code: ErrorCode.BAD_PAGES }));
    missing.add(Uint32Array.of(25, 75));
    expect([...missing.runs()]).toEqual([10, 5, 20, 5, 25, 75]);
  });

  it('keeps its own copy of a frame\'s runs', () => {
    const missing = new MissingRuns(0, 100);
    const frame = Uint32Array.of(1, 2);
    missing.add(frame);
    frame.fill(0);
    expect([...missing.runs()]).toEqual([1, 2]);
  });
});
