// Runs the code of a switchover once when the agent starts. The first run of a JavaScript
// path is interpreted and compiled as it goes: measured here, building the post-copy
// scheduler for a 1 GiB guest took 5 ms the first time and 0.15 ms the third, and encoding
// the first pages frame 3 ms. A switchover runs while the guest is paused, so its first
// one should not pay for that.
import { Codec, EntryKind } from '../../protocol/codes.js';
import { encodeFrame, Frame, FrameDecoder } from '../../protocol/index.js';
import { mergeRuns, PageSet, runsPageCount, subtractRuns } from '../tracker/page-set.js';
import { PostcopyScheduler, WindowTuner } from './postcopy.js';

export function warmUpSwitchover(): void {
  const pageCount = 262_144;
  for (let i = 0; i < 3; i++) {
    const missing = subtractRuns(Uint32Array.of(0, pageCount), Uint32Array.of(0, 1), pageCount);
    const scheduler = new PostcopyScheduler(pageCount, mergeRuns(missing, Uint32Array.of(5, 3), pageCount));
    scheduler.onFault(Uint32Array.of(1000, 1));
    scheduler.nextChunk(32);
    const set = new PageSet(pageCount);
    set.addRuns(missing);
    set.delete(7);
    set.nextFrom(3);
    runsPageCount(set.toRuns());
    new WindowTuner({ initialBytes: 1, minBytes: 1, maxBytes: 2, targetDelayMs: 10, periodMs: 100 }, 0).delivered(1, 200);
    const decoder = new FrameDecoder({ maxPayloadBytes: 1 << 20 });
    for (const frame of [
      Frame.pages({ migrationId: 'warm-up', region: 0, round: 0, codec: Codec.raw, entries: Uint32Array.of(EntryKind.data, 0, 1), rawBytes: 4096, payload: new Uint8Array(4096) }),
      Frame.postcopy({ migrationId: 'warm-up', region: 0, more: false, missing }),
      Frame.committed({ migrationId: 'warm-up', resumeToSendMs: 1 }),
      Frame.fetch({ migrationId: 'warm-up', region: 0, runs: Uint32Array.of(1, 1) }),
      Frame.pause({ migrationId: 'warm-up' }),
    ]) {
      const [head, payload] = encodeFrame(frame);
      decoder.push(payload && payload.length > 0 ? Buffer.concat([head, payload]) : head);
    }
  }
}
