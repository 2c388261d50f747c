// A pre-copy round in pieces on the migration's channels (source-channels.ts) and its
// session: those the codec sends raw go to the channels (up to one per channel at once),
// those it compresses on the session, in between; then the channels' pieces are all written
// at the destination. The chooser learns raw's rate from what the channels deliver together,
// LZ4's from the session's deliveries. With dedup, a piece is planned first
// (DedupPlanner.planPiece): its refs go on the session, the rest on a channel, which reports
// what it sent once it is written there.
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import type { BatchBuild } from '../dedup/source-group.js';
import type { ChannelSent } from '../native.js';
import { runsPageCount } from '../tracker/page-set.js';
import type { CodecChooser } from './codec-chooser.js';
import type { Lane, LaneRuns } from './lanes.js';
import { addCounters, emptyCounters, sendRefs, type PageSenderContext, type RoundCounters } from './page-sender.js';
import { SourceChannels } from './source-channels.js';
import type { SourceRun } from './source-types.js';

/** What a migration's channel rounds carry from one round to the next. */
export interface ChannelRoundState {
  /**
   * The earliest round whose session pieces may not all be applied at the destination yet: a
   * later round's channel piece waits for them (the same page may be in both).
   */
  sessionPiecesRound: number | undefined;
  /** The group's frames with refs up to this outbox place are applied at the destination (beforeChannelPiece). */
  refsAppliedThrough: number;
}

export function channelRoundState(): ChannelRoundState {
  return { sessionPiecesRound: undefined, refsAppliedThrough: -1 };
}

/** The channels as a round uses them. */
export type RoundChannels = Pick<SourceChannels, 'dispatch' | 'deliveredRate' | 'fingerprints' | 'settled' | 'opened'>;

export interface ChannelRoundContext {
  run: Pick<SourceRun, 'options' | 'link' | 'lanes' | 'owner'>;
  chooser: CodecChooser;
  channels: RoundChannels;
  /** A batch's payload (BatchPool.payloadBytes): an LZ4 probe holds a window of them and one more. */
  payloadBytes: number;
  state: ChannelRoundState;
  /** What the channels carried, all rounds together (added to here). */
  channelTotals: RoundCounters;
}

/**
 * Round `round` of `runs` in pieces; `onSession` sends a piece on the session (stopping where
 * `stop` says), `report` is told the round's counters as pieces end.
 */
export async function sendRoundOnChannels(
  ctx: ChannelRoundContext,
  round: number,
  runs: LaneRuns,
  counters: RoundCounters,
  onSession: (lane: Lane, runs: Uint32Array, stop?: PageSenderContext['stop']) => Promise<void>,
  report: (done: RoundCounters) => void,
): Promise<void> {
  const { run, chooser, channels, state } = ctx;
  const { options, link, lanes } = run;
  const dedup = options.dedup;
  const gate = options.gate;
  // An earlier round's session pieces are applied before a channel writes a page of this
  // one; waited for only then (a round on the session alone keeps its pipeline full). So
  // is a frame of the group (a gang member's too) with a ref that copies from a page the
  // piece writes (`refsUpTo`, from DedupPlanner.planPiece): the ref copies what the page
  // held when it was planned.
  const beforeChannelPiece = async (refsUpTo = -1) => {
    const earlier = state.sessionPiecesRound !== undefined && state.sessionPiecesRound < round;
    const refs = refsUpTo > state.refsAppliedThrough;
    if (!earlier && !refs) return;
    if (refs) await link.unlessFailed(dedup!.group.outbox.sentThrough(refsUpTo));
    await link.unlessFailed(gate && refs ? gate.drained() : link.credits!.drained());
    if (earlier) state.sessionPiecesRound = undefined;
    // Every frame before refsUpTo is applied too (sent before it, and drained).
    if (refs) state.refsAppliedThrough = refsUpTo;
  };
  /** A gang's gate: no new piece while another member switches over. */
  const gateOpen = async () => {
    if (!gate || gate.isOpenFor(run.owner)) return;
    const waitStart = performance.now();
    chooser.pause();
    await link.unlessFailed(gate.waitOpen(run.owner));
    counters.gateWaitMs += performance.now() - waitStart;
  };
  // This round's channel pieces, for the metrics (the session's pieces report their own batches).
  const onChannel = emptyCounters();
  const count = (piece: RoundCounters) => {
    const before = { ...onChannel };
    addCounters(onChannel, piece);
    addCounters(counters, piece);
    report(counters);
    options.metrics?.batchSent(before, onChannel, lanes[0]!.region.pageSizeBytes);
  };
  const done = (sent: ChannelSent) => {
    const piece = { ...emptyCounters(), pages: sent.pages, dataPages: sent.dataPages, zeroPages: sent.zeroPages, rawBytes: sent.rawBytes, payloadBytes: sent.rawBytes, wireBytes: sent.wireBytes, batches: sent.batches };
    addCounters(ctx.channelTotals, piece);
    const rate = channels.deliveredRate();
    if (options.codec === 'auto' && rate !== undefined) chooser.measuredOnChannels(rate);
    count(piece);
  };
  /** A piece on a channel; with dedup, its refs on the session first. */
  const toChannel = async (lane: Lane, piece: Uint32Array): Promise<void> => {
    // The channels open while the migration's first pieces go (SourceChannels.open). Ones
    // that could not leave this piece to the session, and the rounds after (not usable).
    if (!(await link.unlessFailed(channels.opened))) return onSession(lane, piece);
    const slot = lane.slot;
    if (!dedup || slot === undefined) {
      await beforeChannelPiece();
      await link.unlessFailed(channels.dispatch(lane, round, piece, done, { ready: gateOpen }));
      return;
    }
    const group = dedup.group;
    const pages = runsPageCount(piece);
    const refs: BatchBuild = { entries: new Uint32Array(pages * 3), entryCount: 0, refs: new Uint32Array(pages * 2), refCount: 0, payload: NO_PAYLOAD, payloadEnd: 0 };
    const planned = emptyCounters();
    // Outside a final round (which never goes on channels): resident refs are allowed.
    const frameTicket = group.outbox.nextTicket;
    const { carried, waitFor } = group.planPiece({ slot, round, allowResident: true, runs: piece, fps: channels.fingerprints(lane, piece), frameTicket }, refs, planned);
    planned.pages = planned.unchangedPages + planned.refPages;
    if (refs.entryCount > 0) {
      // Its place in the group's order is fixed now, when the mirror took its content.
      const ticket = group.outbox.take();
      if (ticket !== frameTicket) throw new GangwayError(ErrorCode.INTERNAL, `a piece's refs took place ${ticket} of the group's order, planned as ${frameTicket}`);
      // It writes pages too: the next round's channel pieces wait until it is applied.
      state.sessionPiecesRound ??= round;
      planned.wireBytes = await link.unlessFailed(sendRefs({ sink: link.session, migrationId: options.migrationId, credits: link.credits! }, group, ticket, lane.index, round, refs));
      planned.batches = 1;
    }
    if (planned.pages > 0) count(planned);
    if (carried.length === 0) return;
    await beforeChannelPiece(waitFor);
    await link.unlessFailed(
      channels.dispatch(
        lane,
        round,
        carried,
        (sent) => {
          // Written at the destination: what was sent there is a source of refs from now on.
          group.delivered(slot, round, carried, sent.fingerprints!);
          done(sent);
        },
        { fingerprints: true, ready: gateOpen },
      ),
    );
  };
  for (const lane of lanes) {
    const queue = SourceChannels.pieceRuns(lane, runs[lane.index] ?? new Uint32Array(0));
    for (let piece = queue.shift(); piece; piece = queue.shift()) {
      await gateOpen();
      if (options.codec === 'raw' || chooser.next() === 'raw') {
        // While raw is being measured, one small piece at a time: its rate comes once it is
        // written there, and more of a mode that may be the slower one costs.
        if (options.codec === 'auto' && chooser.measuring()) {
          const [probe, ...rest] = SourceChannels.probeRuns(lane, piece, chooser.rates().raw);
          queue.unshift(...rest);
          await toChannel(lane, probe!);
          await link.unlessFailed(channels.settled());
          continue;
        }
        await toChannel(lane, piece);
      } else {
        // While LZ4 is being measured, a probe's worth on the session: once its verdict is
        // in, the rest of the piece goes where the chooser says then. Its rate comes from a
        // window of deliveries, which a piece's end breaks (the sender pauses): a probe
        // holds a window's batches and one more, or LZ4 went unmeasured through a whole
        // explore of 4 MiB probes and raw was kept by default on a 1 Gbit/s link.
        if (options.codec === 'auto' && chooser.measuring()) {
          const [probe, ...rest] = SourceChannels.probeRuns(lane, piece, chooser.rates().lz4, (chooser.windowBatches + 1) * ctx.payloadBytes);
          queue.unshift(...rest);
          piece = probe!;
          // LZ4 is measured alone on the link: raw pieces still on the channels took part
          // of it from the probe's deliveries (85 MB/s of guest data where LZ4 alone does
          // 230 on 1 Gbit/s), and raw, once ahead, stayed ahead. The link does not idle
          // meanwhile: those pieces fill it. Where the compressor ends the try at its first
          // batch (loopback), the channels go on.
          if (chooser.judgedByDeliveries()) await link.unlessFailed(channels.settled());
        }
        state.sessionPiecesRound ??= round;
        // Once the codec turns to raw (a probe of it, or raw winning now), the rest of the
        // piece goes back to the queue, for the channels: as raw batches of this piece, a
        // probe was 12 MiB on the session (1.5 windows of 1 MiB batches), 6% of a 128 MiB
        // guest's time on the 1 Gbit/s link, where a channel's probe is 4 MiB.
        let rest: Uint32Array | undefined;
        await onSession(lane, piece, options.codec === 'auto' ? { before: () => chooser.next() === 'raw', rest: (runs) => (rest = runs) } : undefined);
        if (rest) queue.unshift(rest);
      }
    }
  }
  // Every piece ended with its barrier: the destination has written the round. A broken
  // session or a cancel ends the wait (the channels are closed after).
  await link.unlessFailed(channels.settled());
}

/** A refs-only batch's payload: none. */
const NO_PAYLOAD = Buffer.alloc(0);
