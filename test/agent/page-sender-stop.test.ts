// sendRegionRound told to stop (PageSenderContext.stop): the batches gathered go out, the
// pages not gathered come back as runs, and together they are the round's runs exactly.
import { describe, expect, it } from 'vitest';
import { FrameDecoder } from '../../protocol/index.js';
import { CodecChooser } from '../../agent/migration/codec-chooser.js';
import { CreditWindow } from '../../agent/migration/flow.js';
import { BatchPool, runsFrom, sendRegionRound, type PageSink } from '../../agent/migration/page-sender.js';
import { NO_TRACKER } from '../../agent/migration/source-postcopy.js';
import { BufferRegion } from '../helpers/memory-migration.js';

const PAGE = 4096;

/** Pages of ascending runs [first, count, ...], one by one. */
function pagesOf(runs: Uint32Array): number[] {
  const pages: number[] = [];
  for (let i = 0; i + 1 < runs.length; i += 2) for (let p = 0; p < runs[i + 1]!; p++) pages.push(runs[i]! + p);
  return pages;
}

/** Sends `runs` of a 64-page region of data in batches of 4 pages, stopping once `batches` were gathered. */
async function sendStopping(runs: Uint32Array, batches: number) {
  const memory = Buffer.alloc(64 * PAGE);
  for (let p = 0; p < 64; p++) memory.fill(p + 1, p * PAGE, (p + 1) * PAGE);
  const sent: number[] = [];
  const decoder = new FrameDecoder();
  const sink: PageSink = {
    sendMessage(message: Buffer, onWritten?: (err?: Error) => void) {
      for (const frame of decoder.push(Buffer.from(message))) {
        if (frame.type !== 'pages') continue;
        const entries = (frame as unknown as { entries: Uint32Array }).entries;
        for (let e = 0; e < entries.length; e += 3) for (let p = 0; p < entries[e + 2]!; p++) sent.push(entries[e + 1]! + p);
      }
      onWritten?.();
      return message.length;
    },
    writable: async () => {},
  };
  let gathered = 0;
  let rest: Uint32Array | undefined;
  const counters = await sendRegionRound(
    {
      sink,
      migrationId: 'm',
      pageSizeBytes: PAGE,
      pool: new BatchPool(4 * PAGE, 64),
      chooser: new CodecChooser({ mode: 'raw' }),
      credits: new CreditWindow(1 << 30),
      pacer: undefined,
      pipelineDepth: 2,
      stop: { before: () => gathered++ >= batches, rest: (runs) => (rest = runs) },
    },
    0,
    new BufferRegion(memory, PAGE),
    NO_TRACKER,
    0,
    runs,
  );
  return { sent, rest, counters };
}

describe('a round told to stop', () => {
  it('sends what it gathered and hands back the rest, across run boundaries', async () => {
    for (const [runs, batches] of [
      [[0, 64], 3],
      [[0, 5, 10, 20, 40, 3], 2],
      [[0, 5, 10, 20, 40, 3], 0],
      [[2, 4, 8, 4], 1],
      [[2, 4, 8, 4], 2],
    ] as const) {
      const all = Uint32Array.from(runs);
      const { sent, rest, counters } = await sendStopping(all, batches);
      const expected = pagesOf(all);
      expect(sent, `${runs} after ${batches}`).toEqual(expected.slice(0, Math.min(expected.length, batches * 4)));
      expect(counters.pages).toBe(sent.length);
      if (batches * 4 >= expected.length) expect(rest).toBeUndefined();
      else expect(pagesOf(rest!), `${runs} after ${batches}`).toEqual(expected.slice(batches * 4));
    }
  });

  it('runsFrom: the runs from a gather cursor on', () => {
    const runs = Uint32Array.from([0, 5, 10, 20, 40, 3]);
    expect(Array.from(runsFrom(runs, Uint32Array.from([0, 0])))).toEqual([0, 5, 10, 20, 40, 3]);
    expect(Array.from(runsFrom(runs, Uint32Array.from([0, 5])))).toEqual([10, 20, 40, 3]);
    expect(Array.from(runsFrom(runs, Uint32Array.from([1, 7])))).toEqual([17, 13, 40, 3]);
    expect(Array.from(runsFrom(runs, Uint32Array.from([2, 3])))).toEqual([]);
    expect(Array.from(runsFrom(runs, Uint32Array.from([3, 0])))).toEqual([]);
  });
});
