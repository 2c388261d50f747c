// A round in pieces on channels and session (channel-round.ts), with channels that hold each
// piece until the test says it is written at the destination: which piece goes where, and
// when the session's LZ4 probe may start.
import { describe, expect, it } from 'vitest';
import { channelRoundState, sendRoundOnChannels, type ChannelRoundContext, type RoundChannels } from '../../agent/migration/channel-round.js';
import { CodecChooser, emptyCodecMemory } from '../../agent/migration/codec-chooser.js';
import type { Lane } from '../../agent/migration/lanes.js';
import { emptyCounters } from '../../agent/migration/page-sender.js';
import type { ChannelSent } from '../../agent/native.js';
import { runsPageCount } from '../../agent/tracker/page-set.js';

const PAGE = 4096;
const MiB = 1 << 20;

/** Two channels; a piece is written once the test calls `write()` (oldest first). */
function heldChannels(rateBytesPerSec: number, opened = true) {
  const pending: { pages: number; done: (sent: ChannelSent) => void; written: () => void }[] = [];
  let idle = 2;
  const idleWaiters: (() => void)[] = [];
  const inFlight = new Set<Promise<void>>();
  const channels: RoundChannels = {
    async dispatch(_lane, _round, piece, done) {
      while (idle === 0) await new Promise<void>((resolve) => idleWaiters.push(resolve));
      idle--;
      let written!: () => void;
      const promise = new Promise<void>((resolve) => (written = resolve));
      inFlight.add(promise);
      void promise.then(() => inFlight.delete(promise));
      pending.push({ pages: runsPageCount(piece), done, written });
    },
    deliveredRate: () => rateBytesPerSec,
    fingerprints: () => Buffer.alloc(0),
    async settled() {
      while (inFlight.size > 0) await Promise.all([...inFlight]);
    },
    opened: Promise.resolve(opened),
  };
  const write = async () => {
    const piece = pending.shift()!;
    piece.done({ pages: piece.pages, dataPages: piece.pages, zeroPages: 0, rawBytes: piece.pages * PAGE, wireBytes: piece.pages * PAGE, batches: 1 });
    idle++;
    idleWaiters.shift()?.();
    piece.written();
    await flush();
  };
  return { channels, pending, write };
}

const flush = () => new Promise((resolve) => setImmediate(resolve));

/** Raw wins on this session's link (200 MB/s against LZ4's 150, close enough for deliveries to judge), due for a probe of LZ4 once 10 ms have passed; a 64 MiB round (four 16 MiB pieces) under way. */
function roundUnderWay(before?: (chooser: CodecChooser, advance: (ms: number) => void) => void, opened = true) {
  let clock = 1_000;
  const memory = emptyCodecMemory();
  memory.rates = { lz4: 150e6, raw: 200e6 };
  memory.measuredAt = { lz4: clock, raw: clock };
  memory.exploitMs = 10;
  const chooser = new CodecChooser({ mode: 'auto', windowBatches: 4, minWindowMs: 1, exploitMs: 10, now: () => clock, memory });
  before?.(chooser, (ms) => (clock += ms));
  const { channels, pending, write } = heldChannels(200e6, opened);
  const lane = { index: 0, slot: undefined, region: { pageSizeBytes: PAGE, sparse: false } } as unknown as Lane;
  const ctx: ChannelRoundContext = {
    run: {
      options: { codec: 'auto', migrationId: 'm' },
      link: { unlessFailed: <T>(p: Promise<T>) => p, credits: { drained: async () => {} } },
      lanes: [lane],
      owner: {},
    } as unknown as ChannelRoundContext['run'],
    chooser,
    channels,
    payloadBytes: MiB,
    state: channelRoundState(),
    channelTotals: emptyCounters(),
  };
  /** The session's pieces, with the channels' pieces not yet written when each began. */
  const onSession: { pages: number; channelPiecesInFlight: number }[] = [];
  const round = sendRoundOnChannels(ctx, 1, [Uint32Array.of(0, (64 * MiB) / PAGE)], emptyCounters(), async (_lane, runs) => {
    onSession.push({ pages: runsPageCount(runs), channelPiecesInFlight: pending.length });
  }, () => {});
  return { chooser, ctx, pending, write, onSession, round, advance: (ms: number) => (clock += ms) };
}

describe('a round on channels and session', () => {
  it("starts the session's probe of LZ4 only once the raw pieces on the channels are written: it is measured alone on the link", async () => {
    const { chooser, ctx, pending, write, onSession, round, advance } = roundUnderWay();
    await flush();
    // Raw, the winner: a piece on each channel; the third waits for one of them.
    expect(pending.length).toBe(2);
    expect(chooser.next()).toBe('raw');
    expect(chooser.judgedByDeliveries()).toBe(false);
    // The first is written after the probe falls due: the third piece takes its channel, and the chooser turns to LZ4.
    advance(20);
    await write();
    expect(chooser.next()).toBe('lz4');
    expect(chooser.judgedByDeliveries()).toBe(true);
    expect(pending.length).toBe(2);
    // The fourth piece is LZ4's probe: it waits while raw pieces are on their way.
    expect(onSession).toEqual([]);
    await write();
    expect(onSession).toEqual([]);
    await write();
    // A window's batches and one more (4 + 1 of 1 MiB), with the link to itself; then the rest of the piece.
    expect(onSession[0]).toEqual({ pages: (5 * MiB) / PAGE, channelPiecesInFlight: 0 });
    await round;
    const sent = onSession.reduce((sum, s) => sum + s.pages, 0);
    expect(sent).toBe((16 * MiB) / PAGE);
    expect(ctx.channelTotals.pages).toBe((48 * MiB) / PAGE);
  });

  it('does not hold the channels for a probe the compressor ends at its first batch (far behind raw, as on loopback)', async () => {
    // The compressor took 1 MiB in 20 ms: 52 MB/s, under half of raw's 200.
    const { chooser, pending, write, onSession, round, advance } = roundUnderWay((chooser, advance) => {
      const done = chooser.compressing();
      advance(20);
      done(MiB);
    });
    await flush();
    expect(pending.length).toBe(2);
    advance(20);
    await write();
    expect(chooser.next()).toBe('lz4');
    expect(chooser.judgedByDeliveries()).toBe(false);
    // The probe goes on the session beside the two raw pieces on their way.
    expect(onSession[0]).toEqual({ pages: (5 * MiB) / PAGE, channelPiecesInFlight: 2 });
    while (pending.length > 0) await write();
    await round;
  });

  it('sends every piece on the session when the channels did not open', async () => {
    const { ctx, pending, onSession, round } = roundUnderWay(undefined, false);
    await round;
    expect(pending).toEqual([]);
    // Raw, the winner, piece by piece on the session: the whole round, each page once.
    expect(onSession.map((s) => s.pages)).toEqual([4096, 4096, 4096, 4096]);
    expect(ctx.channelTotals.pages).toBe(0);
  });
});
