// The source's half of a dedup group: the mirror of what every destination page of the
// group holds, and the one order in which the group's pages frames reach the session.
//
// A group is the set of migrations to one destination whose pages may be sent as refs to
// one another's (a gang: all guests at once; serial: one guest plus what the destination
// already runs). Locations are dense ids over the group's slots: each incoming region
// (slot < RESIDENT_SLOT_FLAG, numbered by this side) and each resident memory the
// destination offered (slot with the flag, numbered by the destination).
//
// Why refs are right by construction: the mirror is updated when a batch is planned, and
// batches reach the session in the order they were planned (the outbox), and the
// destination applies a group's frames in arrival order. So when a ref is applied, the
// location it copies from holds what the mirror said when the ref was made. Two exceptions
// are handled explicitly:
// - resident memory belongs to guests that keep running: the destination verifies each
//   copied page against the fingerprint it offered, and asks for a page again (want) when
//   it changed. A location filled from resident content is therefore not recorded (its
//   content is not certain until then), and resident refs are not used in the final round,
//   where a want would cost a round trip of downtime;
// - a member whose guest starts at the destination (commit): the commit frame takes its
//   place in the outbox, so every ref made before it is applied before that guest runs.
//   From then on its pages change there. A destination with the feature 'dedup-committed'
//   keeps its memory as resident memory, offering what each page held at the commit (its
//   tracked fingerprints, which the switchover's digest checked, and which this mirror
//   holds too): the member's locations become resident ones (settleSlot). A destination
//   without it refuses refs to that memory: its locations are forgotten (forgetSlot).
// If a member fails with planned batches unsent, its locations are forgotten; a ref planned
// to one of those pages meanwhile would copy stale bytes, and the end-to-end digest check
// at the switchover refuses that guest (it resumes at the source). Nothing wrong ever runs.
import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { Frame } from '../../protocol/index.js';
import { FINGERPRINT_BYTES, RESIDENT_SLOT_FLAG } from '../../protocol/limits.js';
import { ENTRY_DATA, ENTRY_REF, ENTRY_ZERO, loadNative } from '../native.js';
import type { GroupFrame, PeerSession } from '../peer/session.js';
import { ContentIndex } from './content-index.js';
import { Outbox } from './outbox.js';

/**
 * What the planner did with pages (the same fields in the sender's round counters): pages
 * sent as refs, pages not sent at all because the destination page already holds them, and
 * hits by kind (refs, plus those unchanged pages as cross-round).
 */
export interface DedupCounters {
  refPages: number;
  unchangedPages: number;
  hitsIntra: number;
  hitsCrossRound: number;
  hitsCrossGuest: number;
  hitsResident: number;
}

export function emptyDedupCounters(): DedupCounters {
  return { refPages: 0, unchangedPages: 0, hitsIntra: 0, hitsCrossRound: 0, hitsCrossGuest: 0, hitsResident: 0 };
}

/** Bounds on what a destination may announce, so its frames cannot make this side allocate without limit. */
const MAX_RESIDENT_SLOTS = 4096;
const MAX_RESIDENT_PAGES = 64 * 1024 * 1024;

interface SlotInfo {
  slot: number;
  base: number;
  pageCount: number;
  resident: boolean;
  /** Forgotten (forgetSlot): never referred to again; its index entries are cleared lazily. */
  retired?: boolean;
}

/** Index locations a retired slot's clean-up clears per turn of the event loop. */
const RETIRE_CHUNK = 16_384;

/** A batch being built: entries, ref sources and the packed data pages. */
export interface BatchBuild {
  entries: Uint32Array;
  entryCount: number;
  refs: Uint32Array;
  refCount: number;
  payload: Buffer;
  /** Bytes of data pages packed so far. */
  payloadEnd: number;
}

export interface ChunkPlan {
  slot: number;
  round: number;
  /** Refs to resident content (verified at the destination, may cost a want). */
  allowResident: boolean;
  /** One gather call's output: its entries, and its data pages from `payloadOffset`. */
  entries: Uint32Array;
  entryCount: number;
  payloadOffset: number;
  /** XXH3-128 of each data page of the chunk, in order. */
  fps: Uint8Array;
  pageSizeBytes: number;
  /** The outbox place the planned frame takes (readBy). */
  frameTicket?: number;
}

export interface GroupMember {
  slot: number;
  pageCount: number;
}

export interface OpenGroupOptions {
  resident: boolean;
  members: GroupMember[];
  pageSizeBytes: number;
  timeoutMs?: number;
  log: Logger;
}

interface GroupRoute {
  onFrame(frame: GroupFrame): void;
  onClosed(err: GangwayError): void;
}

const routes = new WeakMap<PeerSession, Map<string, GroupRoute>>();

/** Group frames from a destination go to the group they name. */
function route(session: PeerSession, group: string, handler: GroupRoute): () => void {
  let table = routes.get(session);
  if (!table) {
    const created = new Map<string, GroupRoute>();
    table = created;
    routes.set(session, created);
    session.onGroupFrame = (frame) => created.get(frame.group)?.onFrame(frame);
    session.on('closed', (err: GangwayError) => {
      for (const handler of created.values()) handler.onClosed(err);
    });
  }
  table.set(group, handler);
  return () => table.delete(group);
}

/** Resident content a destination offered: a slot and the fingerprint of each of its pages. */
export interface ResidentContent {
  slot: number;
  pageCount: number;
  fps: Uint8Array;
}

/**
 * The mirror and the planning, without the session: what a group knows of the destination's
 * pages, and how a gathered chunk becomes data, refs and nothing.
 */
export class DedupPlanner {
  private readonly slots: SlotInfo[] = [];
  private readonly bySlot = new Map<number, SlotInfo>();
  private readonly index: ContentIndex;
  /** The round in which each location was last written, for telling intra from cross-round hits. */
  private readonly roundOf: Uint32Array;
  /**
   * For each location, the outbox place of the last frame with a ref that copies from it
   * (-1: none): a channel's piece that writes the location waits until that frame is applied.
   */
  private readonly readBy: Int32Array;
  private lastSlot: SlotInfo | undefined;
  readonly residentPages: number;
  /** The zero page's fingerprint, as four words. */
  private readonly zeroWords: Int32Array;

  /** `zeroFp`: the fingerprint of a zero page, whose resident holders are not indexed (zero pages travel as runs). */
  constructor(members: GroupMember[], resident: ResidentContent[], zeroFp: Uint8Array) {
    let base = 0;
    for (const member of members) {
      const info = { slot: member.slot, base, pageCount: member.pageCount, resident: false };
      base += member.pageCount;
      this.slots.push(info);
      this.bySlot.set(member.slot, info);
    }
    let residentPages = 0;
    for (const r of resident) {
      const info = { slot: r.slot, base, pageCount: r.pageCount, resident: true };
      base += r.pageCount;
      residentPages += r.pageCount;
      this.slots.push(info);
      this.bySlot.set(r.slot, info);
    }
    if (this.bySlot.size !== this.slots.length) throw new RangeError('dedup planner: a slot is listed twice');
    this.residentPages = residentPages;
    this.index = new ContentIndex({ locationCapacity: Math.max(base, 1) });
    this.roundOf = new Uint32Array(Math.max(base, 1));
    this.readBy = new Int32Array(Math.max(base, 1)).fill(-1);
    // Resident content first: later (incoming) holders of the same content head the list,
    // so lookups prefer locations that need no verification.
    const zero = Int32Array.from(new Int32Array(zeroFp.buffer, zeroFp.byteOffset, 4));
    this.zeroWords = zero;
    for (const r of resident) {
      const info = this.bySlot.get(r.slot)!;
      const words = new Int32Array(r.fps.buffer, r.fps.byteOffset, r.pageCount * 4);
      for (let page = 0; page < r.pageCount; page++) {
        const w = page * 4;
        const w0 = words[w]!, w1 = words[w + 1]!, w2 = words[w + 2]!, w3 = words[w + 3]!;
        if (w0 === zero[0] && w1 === zero[1] && w2 === zero[2] && w3 === zero[3]) continue;
        this.index.setWords(info.base + page, w0, w1, w2, w3);
      }
    }
  }

  /** Index size, for summaries and metrics. */
  get indexStats(): { locations: number; knownLocations: number; contents: number; memoryBytes: number } {
    return {
      locations: this.index.locationCapacity,
      knownLocations: this.index.knownLocationCount,
      contents: this.index.contentCount,
      memoryBytes: this.index.memoryBytes + this.roundOf.byteLength + this.readBy.byteLength,
    };
  }

  private slotOfLocation(location: number): SlotInfo {
    const last = this.lastSlot;
    if (last && location >= last.base && location < last.base + last.pageCount) return last;
    let lo = 0;
    let hi = this.slots.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.slots[mid]!.base <= location) lo = mid;
      else hi = mid - 1;
    }
    const found = this.slots[lo]!;
    this.lastSlot = found;
    return found;
  }

  /**
   * One data page of member `info` (page `p`, content w0..w3), as planChunk and planPiece
   * decide it: 'unchanged' when its destination page already holds the content; 'ref' when
   * the content is at another location a ref may copy from (emitted into `batch`; the
   * source location recorded as read by the frame at `frameTicket`); else 'send', and the
   * caller sends it. Counts the hits.
   */
  private planPage(
    info: SlotInfo,
    p: number,
    w0: number,
    w1: number,
    w2: number,
    w3: number,
    plan: { round: number; allowResident: boolean; frameTicket?: number | undefined },
    batch: BatchBuild,
    counters: DedupCounters,
  ): 'unchanged' | 'ref' | 'send' {
    const { index, roundOf } = this;
    const location = info.base + p;
    const found = index.lookupWords(w0, w1, w2, w3);
    if (found === location) {
      counters.unchangedPages++;
      counters.hitsCrossRound++;
      return 'unchanged';
    }
    const source = found >= 0 ? this.slotOfLocation(found) : undefined;
    if (!source || source.retired || (source.resident && !plan.allowResident)) return 'send';
    if (!source.resident) {
      if (source !== info) counters.hitsCrossGuest++;
      else if (roundOf[found]! < plan.round) counters.hitsCrossRound++;
      else counters.hitsIntra++;
      if (plan.frameTicket !== undefined) this.readBy[found] = plan.frameTicket;
      index.setWords(location, w0, w1, w2, w3);
      roundOf[location] = plan.round;
    } else {
      // A member's slot made resident at its commit (settleSlot) is another guest of the group.
      if (source.slot < RESIDENT_SLOT_FLAG) counters.hitsCrossGuest++;
      else counters.hitsResident++;
      // Verified only when applied: until then this page's content is not certain.
      index.clear(location);
    }
    counters.refPages++;
    emit(batch, ENTRY_REF, p, 1, source.slot, found - source.base);
    return 'ref';
  }

  /**
   * Plans one gathered chunk into the batch being built: each data page becomes nothing
   * (the destination page already holds it), a ref (the content is at the destination), or
   * data (packed after what the batch already holds; never ahead of where it was read).
   * Zero runs pass through. Updates the mirror page by page, in order.
   */
  planChunk(plan: ChunkPlan, batch: BatchBuild, counters: DedupCounters): void {
    const info = this.bySlot.get(plan.slot);
    if (!info || info.resident) throw new Error(`dedup planner: slot ${plan.slot} is not a member`);
    const { index, roundOf } = this;
    const ps = plan.pageSizeBytes;
    const base = info.base;
    const words = new Int32Array(plan.fps.buffer, plan.fps.byteOffset, plan.fps.length >> 2);
    let dataIndex = 0;
    for (let e = 0; e < plan.entryCount; e++) {
      const kind = plan.entries[e * 3]!;
      const first = plan.entries[e * 3 + 1]!;
      const count = plan.entries[e * 3 + 2]!;
      if (kind === ENTRY_ZERO) {
        for (let p = first; p < first + count; p++) index.clear(base + p);
        emit(batch, ENTRY_ZERO, first, count, 0, 0);
        continue;
      }
      for (let p = first; p < first + count; p++, dataIndex++) {
        const location = base + p;
        const w = dataIndex * 4;
        const w0 = words[w]!, w1 = words[w + 1]!, w2 = words[w + 2]!, w3 = words[w + 3]!;
        if (this.planPage(info, p, w0, w1, w2, w3, plan, batch, counters) !== 'send') continue;
        const from = plan.payloadOffset + dataIndex * ps;
        if (from !== batch.payloadEnd) batch.payload.copy(batch.payload, batch.payloadEnd, from, from + ps);
        batch.payloadEnd += ps;
        emit(batch, ENTRY_DATA, p, 1, 0, 0);
        index.setWords(location, w0, w1, w2, w3);
        roundOf[location] = plan.round;
      }
    }
  }

  /**
   * Plans a piece that a channel carries (source-channels.ts), from each page's fingerprint
   * read now (`fps`, 16 bytes per page of `runs`, in order): a page the destination already
   * holds in place is nothing, one whose content it holds elsewhere a ref (into `refs`, a
   * pages frame of ref entries for the session, which takes outbox place `frameTicket` when
   * it has any), every other page goes to the channel (`carried`), which reads it again as
   * it sends it. Those pages' locations hold nothing known until `delivered` says what the
   * channel sent and the destination wrote: no ref copies from them before. A ref planned
   * earlier may copy from one of them: `waitFor` is the outbox place of the last frame
   * with such a ref (-1: none), which must be applied before the piece goes.
   */
  planPiece(
    plan: { slot: number; round: number; allowResident: boolean; runs: Uint32Array; fps: Uint8Array; frameTicket: number },
    refs: BatchBuild,
    counters: DedupCounters,
  ): { carried: Uint32Array; waitFor: number } {
    const info = this.bySlot.get(plan.slot);
    if (!info || info.resident) throw new Error(`dedup planner: slot ${plan.slot} is not a member`);
    const { index, readBy } = this;
    const base = info.base;
    const words = new Int32Array(plan.fps.buffer, plan.fps.byteOffset, plan.fps.length >> 2);
    const out: number[] = [];
    let waitFor = -1;
    const toChannel = (page: number) => {
      const last = out.length - 2;
      if (last >= 0 && out[last]! + out[last + 1]! === page) out[last + 1]!++;
      else out.push(page, 1);
      index.clear(base + page);
      if (readBy[base + page]! > waitFor) waitFor = readBy[base + page]!;
    };
    let at = 0;
    for (let r = 0; r + 1 < plan.runs.length; r += 2) {
      const first = plan.runs[r]!;
      const end = first + plan.runs[r + 1]!;
      for (let p = first; p < end; p++, at++) {
        const w = at * 4;
        const w0 = words[w]!, w1 = words[w + 1]!, w2 = words[w + 2]!, w3 = words[w + 3]!;
        if (this.isZero(w0, w1, w2, w3) || this.planPage(info, p, w0, w1, w2, w3, plan, refs, counters) === 'send') toChannel(p);
      }
    }
    return { carried: Uint32Array.from(out), waitFor };
  }

  /**
   * A channel's piece is written at the destination: its pages hold what the channel sent
   * (`fps`, 16 bytes per page of `runs`, in order, as channelSend reports them); a zero
   * page is no source of refs.
   */
  delivered(slot: number, round: number, runs: Uint32Array, fps: Uint8Array): void {
    const info = this.bySlot.get(slot);
    if (!info || info.retired || info.resident) return;
    const words = new Int32Array(fps.buffer, fps.byteOffset, fps.length >> 2);
    let at = 0;
    for (let r = 0; r + 1 < runs.length; r += 2) {
      const first = runs[r]!;
      const end = first + runs[r + 1]!;
      for (let p = first; p < end; p++, at++) {
        const w = at * 4;
        const w0 = words[w]!, w1 = words[w + 1]!, w2 = words[w + 2]!, w3 = words[w + 3]!;
        if (this.isZero(w0, w1, w2, w3)) continue;
        this.index.setWords(info.base + p, w0, w1, w2, w3);
        this.roundOf[info.base + p] = round;
      }
    }
  }

  private isZero(w0: number, w1: number, w2: number, w3: number): boolean {
    const z = this.zeroWords;
    return w0 === z[0] && w1 === z[1] && w2 === z[2] && w3 === z[3];
  }

  /**
   * The member's guest is about to run at the destination, which keeps its memory as
   * resident (feature 'dedup-committed'): its locations keep what the mirror says they
   * hold, and a ref to them is verified there, as for resident memory.
   */
  settleSlot(slot: number, written?: () => Uint32Array): void {
    const info = this.bySlot.get(slot);
    if (!info || info.retired || info.resident) return;
    info.resident = true;
    // The pages its guest wrote while it migrated (`written`, runs) are the ones it will most
    // likely write again there: a ref to one would cost a want (the page and a round trip).
    // They leave the index, so that another holder of their content (a member still on its
    // way, whose destination pages only the stream writes) takes their place, or the
    // content is sent. Only while a member is still on its way to plan such a ref; after, a
    // chunk at a time (this runs inside a switchover's downtime); until a page is cleared a
    // ref to it is still verified there, as any resident one.
    const planning = this.slots.some((other) => other !== info && !other.resident && !other.retired);
    if (written && planning) this.clearLater(info, written, () => info.retired === true);
  }

  /**
   * Clears the index at the runs `of` gives (asked for once this turn is over) of `info`'s
   * pages, RETIRE_CHUNK pages per turn of the event loop, until the group closes or `stop`.
   */
  private clearLater(info: SlotInfo, of: () => Uint32Array, stop: () => boolean): void {
    let runs: Uint32Array | undefined;
    let run = 0;
    let page = 0;
    const step = () => {
      if (this.disposed || stop()) return;
      if (!runs) {
        runs = of();
        page = runs[0] ?? 0;
      }
      for (let budget = RETIRE_CHUNK; run + 1 < runs.length && budget > 0; ) {
        const end = Math.min(runs[run]! + runs[run + 1]!, info.pageCount);
        for (; page < end && budget > 0; page++, budget--) this.index.clear(info.base + page);
        if (page >= end) {
          run += 2;
          page = runs[run] ?? 0;
        }
      }
      if (run + 1 < runs.length) setImmediate(step);
    };
    setImmediate(step);
  }

  /** No ref may copy from this slot any more (its guest runs at the destination, or failed). */
  forgetSlot(slot: number): void {
    const info = this.bySlot.get(slot);
    if (!info || info.retired) return;
    // At once: no plan refers to it from now on (a lookup that lands on it is a miss).
    // Clearing its index entries is done a chunk at a time, after: a 1 GiB slot took 40 ms,
    // inside a switchover's downtime.
    info.retired = true;
    this.clearLater(info, () => Uint32Array.of(0, info.pageCount), () => false);
  }

  /** Set when the group closes: pending clean-ups stop. */
  protected disposed = false;

  /** What these pages of `slot` hold at the destination is not known any more (runs [firstPage, pageCount]). */
  forgetRuns(slot: number, runs: Uint32Array): void {
    const info = this.bySlot.get(slot);
    if (!info) return;
    for (let i = 0; i + 1 < runs.length; i += 2) {
      const end = Math.min(runs[i]! + runs[i + 1]!, info.pageCount);
      for (let page = runs[i]!; page < end; page++) this.index.clear(info.base + page);
    }
  }

  /** The destination found these resident pages changed ([slot, page] pairs). */
  forgetStale(pairs: Uint32Array): void {
    for (let i = 0; i + 1 < pairs.length; i += 2) {
      const info = this.bySlot.get(pairs[i]!);
      const page = pairs[i + 1]!;
      if (info?.resident && page < info.pageCount) this.index.clear(info.base + page);
    }
  }

}

/** A dedup group open on a session: the planner, plus the group's outbox and its frames. */
export class SourceDedupGroup extends DedupPlanner {
  readonly outbox = new Outbox();
  private closed = false;

  private constructor(
    readonly id: string,
    private readonly session: PeerSession,
    members: GroupMember[],
    resident: ResidentContent[],
    zeroFp: Uint8Array,
    private readonly unroute: () => void,
  ) {
    super(members, resident, zeroFp);
  }

  /** The destination keeps a committed member's memory as resident memory (feature 'dedup-committed'). */
  get keepsCommitted(): boolean {
    return this.session.peer?.features.includes('dedup-committed') ?? false;
  }

  /** A member's guest is about to run at the destination: its locations become resident ones there, or are forgotten. */
  committing(slot: number, written?: () => Uint32Array): void {
    if (this.keepsCommitted) this.settleSlot(slot, written);
    else this.forgetSlot(slot);
  }

  /**
   * Opens a group on the session: asks the destination what it already runs (when
   * `resident`), waits for dedupReady, and builds the mirror for the members and that
   * content. Fails with GANGWAY_ERR_TIMEOUT, PEER_GONE, or PROTOCOL for an announcement
   * out of bounds.
   */
  static async open(session: PeerSession, options: OpenGroupOptions): Promise<SourceDedupGroup> {
    const id = randomUUID();
    const resident = new Map<number, ResidentContent>();
    let residentPages = 0;
    const timeoutMs = options.timeoutMs ?? 60_000;
    let unroute: () => void = () => {};
    const ready = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new GangwayError(ErrorCode.TIMEOUT, `the destination did not open dedup group ${id} within ${timeoutMs} ms`)),
        timeoutMs,
      );
      const fail = (err: GangwayError) => {
        clearTimeout(timer);
        reject(err);
      };
      unroute = route(session, id, {
        onClosed: fail,
        onFrame: (frame) => {
          if (frame.type === 'dedupReady') {
            clearTimeout(timer);
            resolve();
            return;
          }
          if (frame.type !== 'dedupResident') return;
          // Content in another page size cannot be referred to; skip it.
          if (frame.pageSizeBytes !== options.pageSizeBytes) return;
          let slot = resident.get(frame.slot);
          if (!slot) {
            if (resident.size >= MAX_RESIDENT_SLOTS || residentPages + frame.pageCount > MAX_RESIDENT_PAGES) {
              fail(new GangwayError(ErrorCode.PROTOCOL, `the destination offered more resident content than ${MAX_RESIDENT_SLOTS} slots / ${MAX_RESIDENT_PAGES} pages`));
              return;
            }
            residentPages += frame.pageCount;
            slot = { slot: frame.slot, pageCount: frame.pageCount, fps: new Uint8Array(frame.pageCount * FINGERPRINT_BYTES) };
            resident.set(frame.slot, slot);
          } else if (slot.pageCount !== frame.pageCount) {
            fail(new GangwayError(ErrorCode.PROTOCOL, `resident slot ${frame.slot} changed its size from ${slot.pageCount} to ${frame.pageCount} pages`));
            return;
          }
          slot.fps.set(frame.fingerprints, frame.firstPage * FINGERPRINT_BYTES);
        },
      });
    });
    try {
      session.send(Frame.dedupOpen({ group: id, resident: options.resident }));
      await ready;
    } catch (err) {
      unroute();
      throw err;
    }
    const zeroFp = new Uint8Array(loadNative().hash128(new Uint8Array(options.pageSizeBytes)));
    const group = new SourceDedupGroup(id, session, options.members, [...resident.values()], zeroFp, unroute);
    options.log.info(
      { group: id, members: options.members.length, residentSlots: resident.size, residentPages, indexBytes: group.indexStats.memoryBytes },
      'dedup group open',
    );
    return group;
  }

  /** Tells the destination the group is over (it frees what it kept for refs). Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.disposed = true;
    this.unroute();
    if (this.session.isOpen) this.session.send(Frame.dedupClose({ group: this.id }));
  }

}

/** Appends one entry, extending the last one when it continues it (same kind, next page, next source page). */
function emit(batch: BatchBuild, kind: number, page: number, count: number, slot: number, sourcePage: number): void {
  const n = batch.entryCount;
  if (n > 0) {
    const at = (n - 1) * 3;
    const entries = batch.entries;
    if (entries[at] === kind && entries[at + 1]! + entries[at + 2]! === page) {
      if (kind !== ENTRY_REF) {
        entries[at + 2]! += count;
        return;
      }
      const r = (batch.refCount - 1) * 2;
      if (batch.refs[r] === slot && batch.refs[r + 1]! + entries[at + 2]! === sourcePage) {
        entries[at + 2]! += count;
        return;
      }
    }
  }
  const at = n * 3;
  batch.entries[at] = kind;
  batch.entries[at + 1] = page;
  batch.entries[at + 2] = count;
  batch.entryCount = n + 1;
  if (kind === ENTRY_REF) {
    batch.refs[batch.refCount * 2] = slot;
    batch.refs[batch.refCount * 2 + 1] = sourcePage;
    batch.refCount++;
  }
}
