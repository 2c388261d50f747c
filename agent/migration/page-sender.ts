// Streams one round of pages of one region: gathers ~1 MiB batches from the region (zero
// pages become runs, data pages are packed), compresses them on the thread pool with a few
// batches in flight (a batch that does not shrink goes raw), and sends them in order within
// the receiver's credit window and the pacer's rate.
import { compress } from 'lz4-napi';
import { Codec } from '../../protocol/codes.js';
import { encodeFrame, Frame, FRAME_PREFIX_BYTES, MAX_HEADER_BYTES } from '../../protocol/index.js';
import { FINGERPRINT_BYTES } from '../../protocol/limits.js';
import { ENTRY_REF, ENTRY_ZERO } from '../native.js';
import type { BatchBuild, DedupCounters, SourceDedupGroup } from '../dedup/source-group.js';
import type { DirtyTracker } from '../tracker/dirty-tracker.js';
import type { CodecChooser } from './codec-chooser.js';
import type { CreditWindow, Pacer, SwitchoverGate } from './flow.js';
import type { PeerSession } from '../peer/session.js';
import type { RegionReader } from './region-reader.js';

/**
 * Where a round's pages frames go, already encoded: the peer session, or in unit tests an
 * in-memory destination. `writable` holds the sender while more than `limitBytes` wait
 * in front of the transport; sendMessage returns the bytes it puts on the wire.
 */
export type PageSink = Pick<PeerSession, 'sendMessage' | 'writable'>;

export interface RoundCounters extends DedupCounters {
  pages: number;
  dataPages: number;
  zeroPages: number;
  /** Bytes of data pages before compression. */
  rawBytes: number;
  /** Bytes of data pages as sent (after compression). */
  payloadBytes: number;
  /** Frame bytes on the wire (headers included). */
  wireBytes: number;
  batches: number;
  compressedBatches: number;
  /** Payload bytes of the batches that went out compressed. */
  compressedBytes: number;
  /** Time spent held at a gang's switchover gate (another member was switching over). */
  gateWaitMs: number;
}

export function emptyCounters(): RoundCounters {
  return {
    pages: 0, dataPages: 0, zeroPages: 0, rawBytes: 0, payloadBytes: 0, wireBytes: 0, batches: 0, compressedBatches: 0, compressedBytes: 0,
    refPages: 0, unchangedPages: 0, hitsIntra: 0, hitsCrossRound: 0, hitsCrossGuest: 0, hitsResident: 0, gateWaitMs: 0,
  };
}

export function addCounters(into: RoundCounters, from: RoundCounters): void {
  for (const key of Object.keys(into) as (keyof RoundCounters)[]) into[key] += from[key];
}

interface BatchBuffer {
  /** HEADROOM bytes for the frame's prefix and header, then the payload. */
  whole: Buffer;
  payload: Buffer;
  entries: Uint32Array;
  /** Ref sources, [slot, firstPage] per ref entry (dedup). */
  refs: Uint32Array;
}

/**
 * Room before the payload for the frame prefix and header, so a raw batch goes out as one
 * WebSocket frame without a copy: fragmenting it instead costs the receiver a second copy
 * (measured here: 1.1 GB/s fragmented, 2.1 GB/s as one frame).
 */
const HEADROOM = FRAME_PREFIX_BYTES + MAX_HEADER_BYTES;

/** Reusable batch buffers: a fresh 1 MiB allocation costs page faults on every batch. */
export class BatchPool {
  private readonly free: BatchBuffer[] = [];
  constructor(
    readonly payloadBytes: number,
    readonly maxEntries: number,
  ) {}
  acquire(): BatchBuffer {
    const reused = this.free.pop();
    if (reused) return reused;
    const whole = Buffer.allocUnsafeSlow(HEADROOM + this.payloadBytes);
    return { whole, payload: whole.subarray(HEADROOM), entries: new Uint32Array(this.maxEntries * 3), refs: new Uint32Array(this.maxEntries * 2) };
  }
  release(buffer: BatchBuffer): void {
    if (this.free.length < 16) this.free.push(buffer);
  }
}

interface Prepared {
  buffer: BatchBuffer;
  /** The codec the chooser picked (lz4 may still go out raw when it does not shrink the batch). */
  tried: 'lz4' | 'raw';
  entries: Uint32Array;
  refs: Uint32Array | undefined;
  /** The batch's place in the dedup group's outbox. */
  ticket: number | undefined;
  codec: Codec;
  payload: Uint8Array;
  rawBytes: number;
  /** This batch's share of the round's counters (pages by kind, dedup hits); the rest is filled in when it is sent. */
  counts: RoundCounters;
}

export interface PageSenderContext {
  sink: PageSink;
  migrationId: string;
  pageSizeBytes: number;
  pool: BatchPool;
  chooser: CodecChooser;
  credits: CreditWindow;
  pacer: Pacer | undefined;
  /** Batches being compressed ahead of the one being sent. */
  pipelineDepth: number;
  /** Called after every batch handed to the socket. */
  onBatch?: (counters: RoundCounters) => void;
  /** Content dedup: this region is `slot` of the group. */
  dedup?: { group: SourceDedupGroup; slot: number; allowResident: boolean };
  /** A gang's switchover gate: no new batches while another member switches over. */
  gate?: { gate: SwitchoverGate; owner: object };
  /** At most this much queued in front of the socket (default SEND_QUEUE_BYTES). */
  queueBytes?: number;
  /**
   * Asked before each batch is gathered: true ends the gathering there (the batches gathered
   * still go out), and `rest` is handed the pages not gathered. A round on channels takes
   * raw pieces there, not as raw batches of a session piece (sendRoundOnChannels).
   */
  stop?: { before: () => boolean; rest: (runs: Uint32Array) => void };
}

/** The runs from `cursor` (a gather's: run index, pages of it done) to their end. */
export function runsFrom(runs: Uint32Array, cursor: Uint32Array): Uint32Array {
  const run = cursor[0]!;
  const done = cursor[1]!;
  if (run * 2 >= runs.length) return new Uint32Array(0);
  const left = runs.slice(run * 2);
  left[0]! += done;
  left[1]! -= done;
  return left[1] === 0 ? left.subarray(2) : left;
}

const LZ4_KEEP_RATIO = 0.875;
/**
 * At most this much queued in front of the socket: on a slow link a credit window's worth
 * would sit here for seconds, hiding the link's rate from the codec chooser and putting
 * every later frame (a switchover's too) behind it.
 */
const SEND_QUEUE_BYTES = 4 * 1024 * 1024;

export async function sendRegionRound(
  ctx: PageSenderContext,
  regionIndex: number,
  region: RegionReader,
  tracker: DirtyTracker,
  round: number,
  runs: Uint32Array,
): Promise<RoundCounters> {
  const counters = emptyCounters();
  const cursor = new Uint32Array(2);
  const out = new Uint32Array(2);
  const pending: Promise<Prepared>[] = [];
  const dedup = ctx.dedup;
  const ps = ctx.pageSizeBytes;
  const maxEntries = ctx.pool.maxEntries;
  // Per gather call with dedup: its entries, and a fingerprint per data page.
  const chunkEntries = dedup ? new Uint32Array(maxEntries * 3) : undefined;
  const chunkFps = dedup ? new Uint8Array((ctx.pool.payloadBytes / ps) * FINGERPRINT_BYTES) : undefined;
  let done = runs.length === 0;

  /** Gathers one batch: pages as they are, or planned against the group's mirror (counted in `counts`). */
  const fill = (buffer: BatchBuffer, counts: RoundCounters): { entryCount: number; rawBytes: number; refCount: number } => {
    if (!dedup) {
      done = region.gather(runs, cursor, buffer.payload, buffer.entries, out);
      const entryCount = out[0]!;
      if (entryCount > 0) tracker.noteSent(buffer.entries, entryCount, buffer.payload.subarray(0, out[1]!));
      return { entryCount, rawBytes: out[1]!, refCount: 0 };
    }
    // Gather chunks into the free end of the batch until it is full: refs and unchanged
    // pages take no payload, so a batch may cover many more pages than it carries.
    const batch: BatchBuild = { entries: buffer.entries, entryCount: 0, refs: buffer.refs, refCount: 0, payload: buffer.payload, payloadEnd: 0 };
    while (!done) {
      const roomPages = Math.floor((buffer.payload.length - batch.payloadEnd) / ps);
      // Planning turns each page into at most one entry: keep room for every page of the chunk.
      const entryRoom = maxEntries - batch.entryCount - roomPages;
      if (roomPages < 1 || entryRoom < 1) break;
      const at = batch.payloadEnd;
      done = region.gather(runs, cursor, buffer.payload.subarray(at), chunkEntries!.subarray(0, entryRoom * 3), out, chunkFps!);
      const entryCount = out[0]!;
      if (entryCount === 0) break;
      tracker.noteSent(chunkEntries!, entryCount, buffer.payload.subarray(at, at + out[1]!));
      dedup.group.planChunk(
        // The batch takes the group's next place right after it is planned (gatherOne).
        { slot: dedup.slot, round, allowResident: dedup.allowResident, entries: chunkEntries!, entryCount, payloadOffset: at, fps: chunkFps!, pageSizeBytes: ps, frameTicket: dedup.group.outbox.nextTicket },
        batch,
        counts,
      );
    }
    return { entryCount: batch.entryCount, rawBytes: batch.payloadEnd, refCount: batch.refCount };
  };

  const gatherOne = (): Promise<Prepared> | undefined => {
    const buffer = ctx.pool.acquire();
    const counts = emptyCounters();
    const { entryCount, rawBytes, refCount } = fill(buffer, counts);
    // Pages already in place at the destination are covered, though nothing is sent for them.
    counts.pages = counts.unchangedPages;
    const entries = buffer.entries.subarray(0, entryCount * 3);
    for (let e = 0; e < entryCount; e++) {
      const count = entries[e * 3 + 2]!;
      counts.pages += count;
      const kind = entries[e * 3];
      if (kind === ENTRY_ZERO) counts.zeroPages += count;
      else if (kind === ENTRY_REF) continue; // counted by the planner
      else counts.dataPages += count;
    }
    if (entryCount === 0) {
      ctx.pool.release(buffer);
      addCounters(counters, counts);
      return undefined;
    }
    counts.rawBytes = rawBytes;
    const refs = refCount > 0 ? buffer.refs.subarray(0, refCount * 2) : undefined;
    const raw = buffer.payload.subarray(0, rawBytes);
    // The batch's place in the group's order is fixed now, when the mirror took its content.
    const ticket = dedup?.group.outbox.take();
    const base = { buffer, entries, refs, ticket, rawBytes, counts };
    if (rawBytes === 0 || ctx.chooser.next() === 'raw') {
      return Promise.resolve({ ...base, tried: 'raw' as const, codec: Codec.raw, payload: raw });
    }
    const compressed = ctx.chooser.compressing();
    return compress(raw).then(
      (packed) => {
        compressed(rawBytes);
        return packed.length <= rawBytes * LZ4_KEEP_RATIO
          ? { ...base, tried: 'lz4' as const, codec: Codec.lz4, payload: packed }
          : { ...base, tried: 'lz4' as const, codec: Codec.raw, payload: raw };
      },
      (err: unknown) => {
        compressed(0);
        // The batch holds a place in the group's order: give it back before failing.
        if (ticket !== undefined) dedup!.group.outbox.drop(ticket);
        throw err;
      },
    );
  };

  let sending: Prepared | undefined;
  let stopped = false;
  const stopsHere = () => (stopped ||= ctx.stop?.before() ?? false);
  try {
    const gate = ctx.gate;
    while ((!done && !stopped) || pending.length > 0) {
      while (!done && pending.length < ctx.pipelineDepth && (!gate || gate.gate.isOpenFor(gate.owner)) && !stopsHere()) {
        const next = gatherOne();
        if (next) pending.push(next);
      }
      const head = pending.shift();
      if (!head) {
        if (gate && !done && !stopped) {
          const waitStart = performance.now();
          ctx.chooser.pause();
          await gate.gate.waitOpen(gate.owner);
          counters.gateWaitMs += performance.now() - waitStart;
        }
        continue;
      }
      const batch = await head;
      sending = batch;
      const frame = Frame.pages({
        migrationId: ctx.migrationId,
        region: regionIndex,
        round,
        codec: batch.codec,
        entries: batch.entries,
        rawBytes: batch.rawBytes,
        payload: batch.payload,
        ...(batch.refs ? { refs: batch.refs } : {}),
      });
      if (batch.ticket !== undefined) await dedup!.group.outbox.turn(batch.ticket);
      const cost = creditCost(batch.payload.length, batch.rawBytes, batch.entries.length / 3);
      await ctx.credits.take(cost);
      // The pacer holds the link's bytes: a compressed batch costs what it puts on the wire.
      if (ctx.pacer) await ctx.pacer.take(wireCost(batch.payload.length, batch.entries.length / 3));
      await ctx.sink.writable(ctx.queueBytes ?? SEND_QUEUE_BYTES);
      const buffer = batch.buffer;
      const [frameHead] = encodeFrame(frame);
      let message: Buffer;
      if (batch.codec === Codec.raw) {
        // The payload already sits in `whole` right after the headroom: put the head before it.
        const start = HEADROOM - frameHead.length;
        frameHead.copy(buffer.whole, start);
        message = buffer.whole.subarray(start, HEADROOM + batch.payload.length);
      } else {
        message = Buffer.concat([frameHead, batch.payload]);
      }
      const wire = ctx.sink.sendMessage(message, () => ctx.pool.release(buffer));
      if (batch.ticket !== undefined) dedup!.group.outbox.done(batch.ticket);
      sending = undefined;
      const counts = batch.counts;
      counts.payloadBytes = batch.payload.length;
      counts.wireBytes = wire;
      counts.batches = 1;
      if (batch.codec === Codec.lz4) {
        counts.compressedBatches = 1;
        counts.compressedBytes = batch.payload.length;
      }
      addCounters(counters, counts);
      // Its data pages only: zero runs, refs and pages already in place cost next to nothing
      // either way, and a window rich in them made whichever codec it was look fast.
      ctx.chooser.sent(batch.rawBytes, batch.rawBytes === 0 ? 'none' : batch.tried);
      ctx.onBatch?.(counters);
    }
  } catch (err) {
    // What was not acknowledged must be sent again by whoever retries; the places the
    // unsent batches held in the group's order are given up.
    tracker.remark(runs);
    if (sending?.ticket !== undefined) dedup!.group.outbox.drop(sending.ticket);
    for (const settled of await Promise.allSettled(pending)) {
      if (settled.status === 'fulfilled' && settled.value.ticket !== undefined) dedup!.group.outbox.drop(settled.value.ticket);
    }
    throw err;
  }
  if (stopped && !done) ctx.stop!.rest(runsFrom(runs, cursor));
  ctx.chooser.pause();
  return counters;
}

/**
 * A pages frame of ref entries only, for a piece a channel carries the rest of
 * (DedupPlanner.planPiece), at `ticket`'s place in the group's order and within the credit
 * window. Returns its bytes on the wire. On failure its place is given up.
 */
export async function sendRefs(
  ctx: Pick<PageSenderContext, 'sink' | 'migrationId' | 'credits' | 'queueBytes'>,
  group: SourceDedupGroup,
  ticket: number,
  regionIndex: number,
  round: number,
  batch: BatchBuild,
): Promise<number> {
  try {
    const entries = batch.entries.subarray(0, batch.entryCount * 3);
    const frame = Frame.pages({ migrationId: ctx.migrationId, region: regionIndex, round, codec: Codec.raw, entries, rawBytes: 0, payload: new Uint8Array(0), refs: batch.refs.subarray(0, batch.refCount * 2) });
    await group.outbox.turn(ticket);
    await ctx.credits.take(creditCost(0, 0, batch.entryCount));
    await ctx.sink.writable(ctx.queueBytes ?? SEND_QUEUE_BYTES);
    // No payload: the head is the whole frame.
    const [head] = encodeFrame(frame);
    const wire = ctx.sink.sendMessage(head);
    group.outbox.done(ticket);
    return wire;
  } catch (err) {
    group.outbox.drop(ticket);
    throw err;
  }
}

/**
 * The credit cost of a pages frame: the larger of its payload and what the payload
 * decompresses to, plus entries plus a fixed allowance for the rest of the header, so both
 * sides agree without re-encoding. Counting the decompressed size is what bounds the
 * destination's memory: a 64 KiB LZ4 payload may stand for 16 MiB of pages.
 */
export function creditCost(payloadBytes: number, rawBytes: number, entryCount: number): number {
  return wireCost(Math.max(payloadBytes, rawBytes), entryCount);
}

/** A pages frame's bytes on the wire, as the credit cost counts them: its payload, entries and header allowance. */
function wireCost(payloadBytes: number, entryCount: number): number {
  return payloadBytes + entryCount * 12 + 256;
}
