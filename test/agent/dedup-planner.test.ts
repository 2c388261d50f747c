// The dedup planner against a model destination that applies every batch the way the
// destination agent does (entries in order, refs copied page by page from the slot as the
// stream stands, resident refs verified against the offered fingerprint). Whatever the
// writes, rounds, resident changes and commits, every page a batch covers must hold the
// source's content once the batch is applied, except a page the destination asked for again,
// which the next batch delivers. A committed member's memory either leaves the group
// (forgetSlot) or stays as resident memory offered with what it held at the commit
// (settleSlot, a destination with 'dedup-committed'), while its guest writes on there.
import fc from 'fast-check';
import { describe, expect, test } from 'vitest';
import { DedupPlanner, emptyDedupCounters, type BatchBuild, type DedupCounters } from '../../agent/dedup/source-group.js';
import { ENTRY_DATA, ENTRY_REF, ENTRY_ZERO } from '../../agent/native.js';
import { RESIDENT_SLOT_FLAG } from '../../protocol/limits.js';

const PS = 64;
const PAGES = 24;
const MEMBERS = 3;
const RESIDENT_SLOT = RESIDENT_SLOT_FLAG + 5;

/** A 16-byte fingerprint per content id (0 is the zero page's). */
function fpOf(content: number): Uint8Array {
  const fp = new Uint8Array(16);
  new DataView(fp.buffer).setUint32(0, content, true);
  fp.fill(0xa5, 4);
  return fp;
}

/** A pages frame on the session, applied at the destination in the group's order. */
interface SessionFrame {
  ticket: number;
  slot: number;
  round: number;
  batch: BatchBuild;
  allowResident: boolean;
  /** What each page it covers held at the source when it was planned. */
  expected: Map<number, number>;
}

class Model {
  readonly source = Array.from({ length: MEMBERS }, () => new Array<number>(PAGES).fill(0));
  readonly dest = Array.from({ length: MEMBERS }, () => new Array<number>(PAGES).fill(0));
  readonly dirty = Array.from({ length: MEMBERS }, () => new Set<number>(Array.from({ length: PAGES }, (_, p) => p)));
  readonly wanted = Array.from({ length: MEMBERS }, () => new Set<number>());
  readonly rounds = new Array<number>(MEMBERS).fill(0);
  readonly committed = new Array<boolean>(MEMBERS).fill(false);
  /** What each settled member's pages held at its commit (the destination's offer). */
  readonly settledOffer = new Array<number[] | undefined>(MEMBERS);
  readonly resident: number[];
  readonly offered: number[];
  readonly planner: DedupPlanner;
  readonly counters: DedupCounters = emptyDedupCounters();
  /** The group's order: the next frame's place. */
  private nextTicket = 0;
  /** Frames sent on the session and not applied at the destination yet, in order. */
  readonly pending: SessionFrame[] = [];

  constructor(
    resident: number[],
    private readonly settles = false,
  ) {
    this.resident = [...resident];
    this.offered = [...resident];
    const fps = new Uint8Array(PAGES * 16);
    resident.forEach((content, page) => fps.set(fpOf(content), page * 16));
    this.planner = new DedupPlanner(
      Array.from({ length: MEMBERS }, (_, slot) => ({ slot, pageCount: PAGES })),
      [{ slot: RESIDENT_SLOT, pageCount: PAGES, fps }],
      fpOf(0),
    );
  }

  write(slot: number, page: number, content: number): void {
    if (this.committed[slot]) {
      // Its guest runs at the destination now, and writes there.
      this.dest[slot]![page] = content + 1000;
      return;
    }
    this.source[slot]![page] = content;
    this.dirty[slot]!.add(page);
  }

  /** The pages a round of `slot` covers: dirty and asked for again. */
  private roundPages(slot: number): { pages: number[]; round: number } {
    const pages = [...new Set([...this.dirty[slot]!, ...this.wanted[slot]!])].sort((a, b) => a - b);
    this.dirty[slot]!.clear();
    this.wanted[slot]!.clear();
    return { pages, round: this.rounds[slot]!++ };
  }

  private queue(slot: number, round: number, batch: BatchBuild, allowResident: boolean, pages: number[]): void {
    const ticket = this.nextTicket++;
    this.pending.push({ ticket, slot, round, batch, allowResident, expected: new Map(pages.map((page) => [page, this.source[slot]![page]!])) });
  }

  /** One round of `slot` on the session: gathered, planned, queued for the destination. */
  send(slot: number, allowResident: boolean): void {
    if (this.committed[slot]) return;
    const { pages, round } = this.roundPages(slot);
    if (pages.length === 0) return;
    // What gather produces: zero and data runs, data pages packed, a fingerprint each.
    const entries: number[] = [];
    const payload = Buffer.alloc(pages.length * PS);
    const fps = new Uint8Array(pages.length * 16);
    let data = 0;
    for (const page of pages) {
      const content = this.source[slot]![page]!;
      const kind = content === 0 ? ENTRY_ZERO : ENTRY_DATA;
      const last = entries.length - 3;
      if (last >= 0 && entries[last] === kind && entries[last + 1]! + entries[last + 2]! === page) entries[last + 2]!++;
      else entries.push(kind, page, 1);
      if (kind === ENTRY_DATA) {
        payload.fill(content, data * PS, (data + 1) * PS);
        fps.set(fpOf(content), data * 16);
        data++;
      }
    }
    const batch: BatchBuild = {
      entries: new Uint32Array(pages.length * 3),
      entryCount: 0,
      refs: new Uint32Array(pages.length * 2),
      refCount: 0,
      payload,
      payloadEnd: 0,
    };
    this.planner.planChunk(
      { slot, round, allowResident, entries: Uint32Array.from(entries), entryCount: entries.length / 3, payloadOffset: 0, fps, pageSizeBytes: PS, frameTicket: this.nextTicket },
      batch,
      this.counters,
    );
    this.queue(slot, round, batch, allowResident, pages);
  }

  /** One round on the session, applied at once. */
  sendNow(slot: number, allowResident: boolean): void {
    this.send(slot, allowResident);
    this.flush();
  }

  /** The destination applies the session's frames, in order, through place `upTo`. */
  flush(upTo = Number.POSITIVE_INFINITY): void {
    while (this.pending.length > 0 && this.pending[0]!.ticket <= upTo) this.apply(this.pending.shift()!);
  }

  /**
   * One round of `slot` as two channel pieces, A and B, the way two channels overlap with
   * the session: each is fingerprinted and planned, its refs queued on the session; before
   * a piece's channel writes, the frames it must wait for are applied (rounds.ts: what
   * planPiece's waitFor names, and the slot's frames of earlier rounds), no more. The guest
   * writes `meanwhile` after A is planned; B is planned while A is in flight; the channel
   * writes each page as it reads it then, and the planner hears what was sent once the
   * piece is written. `split`: the share of the round's pages in A.
   */
  sendPiece(slot: number, allowResident: boolean, meanwhile: { page: number; content: number }[], split = 1): void {
    if (this.committed[slot]) return;
    const { pages, round } = this.roundPages(slot);
    if (pages.length === 0) return;
    const cut = Math.round(pages.length * split);
    const plan = (part: number[]) => {
      const runs: number[] = [];
      for (const page of part) {
        const last = runs.length - 2;
        if (last >= 0 && runs[last]! + runs[last + 1]! === page) runs[last + 1]!++;
        else runs.push(page, 1);
      }
      const fps = new Uint8Array(part.length * 16);
      part.forEach((page, i) => fps.set(fpOf(this.source[slot]![page]!), i * 16));
      const refs: BatchBuild = { entries: new Uint32Array(part.length * 3), entryCount: 0, refs: new Uint32Array(part.length * 2), refCount: 0, payload: Buffer.alloc(0), payloadEnd: 0 };
      const { carried: onChannel, waitFor } = this.planner.planPiece({ slot, round, allowResident, runs: Uint32Array.from(runs), fps, frameTicket: this.nextTicket }, refs, this.counters);
      for (let e = 0; e < refs.entryCount; e++) expect(refs.entries[e * 3]).toBe(ENTRY_REF);
      if (refs.entryCount > 0) this.queue(slot, round, refs, allowResident, part);
      const carried: number[] = [];
      for (let i = 0; i + 1 < onChannel.length; i += 2) for (let p = onChannel[i]!; p < onChannel[i]! + onChannel[i + 1]!; p++) carried.push(p);
      expect(carried.every((page) => part.includes(page))).toBe(true);
      return { onChannel, carried, waitFor, sent: new Uint8Array(carried.length * 16) };
    };
    /** What the source waits for before the piece goes: then the channel reads each page as it is now and the destination writes it. */
    const write = (piece: ReturnType<typeof plan>) => {
      const earlier = this.pending.filter((frame) => frame.slot === slot && frame.round < round).map((frame) => frame.ticket);
      this.flush(Math.max(piece.waitFor, ...earlier));
      piece.carried.forEach((page, i) => {
        this.dest[slot]![page] = this.source[slot]![page]!;
        piece.sent.set(fpOf(this.source[slot]![page]!), i * 16);
      });
    };
    const a = plan(pages.slice(0, cut));
    for (const { page, content } of meanwhile) this.write(slot, page, content);
    const b = plan(pages.slice(cut));
    write(a);
    this.planner.delivered(slot, round, a.onChannel, a.sent);
    write(b);
    this.planner.delivered(slot, round, b.onChannel, b.sent);
  }

  /**
   * The destination applies a frame: entries in order; refs page by page; resident pages
   * verified. Every page it covers then holds what the source held when it was planned,
   * except one asked for again.
   */
  private apply(frame: SessionFrame): void {
    const { slot, batch } = frame;
    let data = 0;
    let ref = 0;
    const stale: number[] = [];
    for (let e = 0; e < batch.entryCount; e++) {
      const [kind, first, count] = [batch.entries[e * 3]!, batch.entries[e * 3 + 1]!, batch.entries[e * 3 + 2]!];
      for (let i = 0; i < count; i++) {
        const page = first + i;
        if (kind === ENTRY_ZERO) this.dest[slot]![page] = 0;
        else if (kind === ENTRY_DATA) this.dest[slot]![page] = batch.payload[(data++) * PS]!;
        else {
          expect(kind).toBe(ENTRY_REF);
          const sourceSlot = batch.refs[ref * 2]!;
          const sourcePage = batch.refs[ref * 2 + 1]! + i;
          const settled = this.settledOffer[sourceSlot];
          if (sourceSlot === RESIDENT_SLOT || settled) {
            expect(frame.allowResident, 'a resident ref in a round that allows none').toBe(true);
            const now = settled ? this.dest[sourceSlot]! : this.resident;
            const offered = settled ?? this.offered;
            if (now[sourcePage] === offered[sourcePage]) this.dest[slot]![page] = now[sourcePage]!;
            else {
              this.wanted[slot]!.add(page);
              stale.push(sourceSlot, sourcePage);
              continue;
            }
          } else {
            expect(this.committed[sourceSlot], `a ref to slot ${sourceSlot}, whose guest runs at the destination`).toBe(false);
            this.dest[slot]![page] = this.dest[sourceSlot]![sourcePage]!;
          }
        }
        expect(this.dest[slot]![page], `slot ${slot} page ${page}, frame ${frame.ticket} of round ${frame.round}`).toBe(frame.expected.get(page));
      }
      if (kind === ENTRY_REF) ref++;
    }
    expect(data * PS).toBe(batch.payloadEnd);
    expect(ref).toBe(batch.refCount);
    this.planner.forgetStale(Uint32Array.from(stale));
  }

  mutateResident(page: number, content: number): void {
    this.resident[page] = content;
  }

  /**
   * The guest of `slot` starts at the destination (after every frame is applied), and keeps
   * writing there; `written`: the pages its guest wrote while it migrated, as the source hands them over.
   */
  commit(slot: number, written: number[] = []): void {
    if (this.committed[slot]) return;
    this.flush();
    if (this.settles) {
      this.planner.settleSlot(slot, () => Uint32Array.from(written.flatMap((page) => [page, 1])));
      this.settledOffer[slot] = [...this.dest[slot]!];
    } else this.planner.forgetSlot(slot);
    this.committed[slot] = true;
    this.dest[slot] = this.dest[slot]!.map((content, page) => (page % 3 === 0 ? content + 100 : content));
  }

  /** The final rounds: no resident refs, everything pending delivered. */
  finish(): void {
    for (let slot = 0; slot < MEMBERS; slot++) {
      if (this.committed[slot]) continue;
      this.flush();
      this.send(slot, false);
      this.flush();
      expect(this.dest[slot]).toEqual(this.source[slot]);
    }
  }
}


// Few contents, so pages repeat one another often; zero among them, so pages get zeroed.
const content = fc.oneof(fc.integer({ min: 0, max: 3 }), fc.integer({ min: 0, max: 40 }));
const op = fc.oneof(
  { weight: 5, arbitrary: fc.record({ op: fc.constant('write' as const), slot: fc.nat(MEMBERS - 1), page: fc.nat(PAGES - 1), content }) },
  { weight: 3, arbitrary: fc.record({ op: fc.constant('send' as const), slot: fc.nat(MEMBERS - 1), resident: fc.boolean() }) },
  {
    weight: 3,
    arbitrary: fc.record({
      op: fc.constant('piece' as const),
      slot: fc.nat(MEMBERS - 1),
      resident: fc.boolean(),
      meanwhile: fc.array(fc.record({ page: fc.nat(PAGES - 1), content }), { maxLength: 3 }),
      split: fc.double({ min: 0, max: 1, noNaN: true }),
    }),
  },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('mutate' as const), page: fc.nat(PAGES - 1), content }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('commit' as const), slot: fc.nat(MEMBERS - 1) }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant('flush' as const), count: fc.nat(3) }) },
);

describe('dedup planner against a model destination', () => {
  test.each([
    ['its memory leaves the group', false],
    ['its memory stays as resident memory', true],
  ])('every page covered by a batch holds the source content once applied; the final rounds leave every guest identical (a committed member: %s)', (_, settles) => {
    fc.assert(
      fc.property(fc.array(content, { minLength: PAGES, maxLength: PAGES }), fc.array(op, { maxLength: 80 }), (resident, ops) => {
        const model = new Model(resident, settles);
        for (const step of ops) {
          if (step.op === 'write') model.write(step.slot, step.page, step.content);
          else if (step.op === 'send') model.send(step.slot, step.resident);
          else if (step.op === 'piece') model.sendPiece(step.slot, step.resident, step.meanwhile, step.split);
          else if (step.op === 'mutate') model.mutateResident(step.page, step.content);
          else if (step.op === 'flush') model.flush((model.pending[step.count - 1] ?? model.pending[model.pending.length - 1])?.ticket ?? -1);
          else model.commit(step.slot);
        }
        model.finish();
      }),
      { numRuns: 400 },
    );
  });

  test("a channel's pages are no source of refs until delivered, then are; refs go on the session", () => {
    const model = new Model(new Array(PAGES).fill(0));
    model.write(0, 1, 4);
    model.write(0, 2, 4);
    model.sendPiece(0, true, []);
    // Both went on the channel: page 2 could not refer to page 1, not yet written there.
    expect(model.counters.refPages).toBe(0);
    model.write(1, 3, 4);
    model.sendPiece(1, true, []);
    expect(model.counters.hitsCrossGuest).toBe(1);
    // A page changed after it was fingerprinted goes as it is when the channel reads it, and
    // the planner records that content, not the one it planned with.
    model.write(0, 5, 6);
    model.sendPiece(0, true, [{ page: 5, content: 7 }]);
    model.write(1, 8, 6);
    model.sendPiece(1, true, []);
    expect(model.counters.hitsCrossGuest).toBe(1);
    model.finish();
  });

  test("a piece waits for a queued ref (another member's) that copies from a page it writes, and only for that", () => {
    const model = new Model(new Array(PAGES).fill(0));
    model.write(0, 1, 4);
    model.sendPiece(0, true, []);
    model.flush();
    // Slot 1's page 2 refers to slot 0's page 1; the frame is not applied yet.
    model.write(1, 2, 4);
    model.send(1, true);
    expect(model.pending).toHaveLength(1);
    // Slot 0 writes page 3 on a channel: no ref copies from it, nothing to wait for.
    model.write(0, 3, 6);
    model.sendPiece(0, true, []);
    expect(model.pending).toHaveLength(1);
    // Page 1 changes: its piece waits until the ref copied the old content.
    model.write(0, 1, 5);
    model.sendPiece(0, true, []);
    expect(model.pending).toHaveLength(0);
    expect(model.counters.hitsCrossGuest).toBe(1);
    expect(model.dest[1]![2]).toBe(4);
    model.finish();
  });

  test('a page in flight on a channel is no source of refs for the next piece of the round', () => {
    const model = new Model(new Array(PAGES).fill(0));
    model.write(0, 1, 4);
    model.sendPiece(0, true, []);
    model.flush();
    // Page 1 goes on a channel with 5 (piece A) while piece B's page 9 holds the 4 page 1 had.
    model.write(0, 1, 5);
    model.write(0, 9, 4);
    model.sendPiece(0, true, [], 0.5);
    model.flush();
    expect(model.counters.refPages).toBe(0);
    expect([model.dest[0]![1], model.dest[0]![9]]).toEqual([5, 4]);
    model.finish();
  });

  test('a ref to a page that the same batch overwrites later copies the old content (applied in order)', () => {
    const model = new Model(new Array(PAGES).fill(0));
    model.write(0, 1, 4);
    model.sendNow(0, true);
    // Page 0 gets content 4 (now at page 1) and page 1 gets 5, in one batch: page 0 is a ref
    // to page 1, applied before page 1 is overwritten.
    model.write(0, 0, 4);
    model.write(0, 1, 5);
    model.sendNow(0, true);
    expect(model.counters.hitsCrossRound).toBeGreaterThan(0);
    expect(model.dest[0]!.slice(0, 2)).toEqual([4, 5]);
  });

  test('content overwritten by an earlier entry of the batch is not referred to', () => {
    const model = new Model(new Array(PAGES).fill(0));
    model.write(0, 0, 3);
    model.sendNow(0, true);
    // Page 0 changes to 4 first; page 5 takes content 3, which is nowhere any more.
    model.write(0, 0, 4);
    model.write(0, 5, 3);
    const refsBefore = model.counters.refPages;
    model.sendNow(0, true);
    expect(model.counters.refPages).toBe(refsBefore);
    expect([model.dest[0]![0], model.dest[0]![5]]).toEqual([4, 3]);
  });

  test('a page zeroed since is no longer a source of its old content', () => {
    const model = new Model(new Array(PAGES).fill(0));
    model.write(0, 4, 2);
    model.sendNow(0, true);
    model.write(0, 4, 0);
    model.sendNow(0, true);
    model.write(1, 9, 2);
    model.sendNow(1, true);
    expect(model.counters.refPages).toBe(0);
    expect(model.dest[1]![9]).toBe(2);
  });

  test('a page whose content is already in place is not sent; one of another guest travels as a ref', () => {
    const model = new Model(new Array(PAGES).fill(0));
    model.write(0, 2, 1);
    model.sendNow(0, true);
    model.write(0, 2, 1);
    model.sendNow(0, true);
    expect(model.counters.unchangedPages).toBe(1);
    model.write(1, 7, 1);
    model.sendNow(1, true);
    expect(model.counters.hitsCrossGuest).toBe(1);
  });

  test('resident content is used while it holds, asked for again once it changed', () => {
    const model = new Model(Array.from({ length: PAGES }, (_, p) => (p === 3 ? 2 : 0)));
    model.write(0, 0, 2);
    model.mutateResident(3, 1);
    model.sendNow(0, true);
    expect(model.counters.hitsResident).toBe(1);
    expect(model.wanted[0]!.has(0)).toBe(true);
    // The stale resident page is forgotten: the page travels as data this time.
    model.sendNow(0, true);
    expect(model.counters.hitsResident).toBe(1);
    expect(model.dest[0]![0]).toBe(2);
  });

  test("a committed member's pages serve refs while they hold what they held at its commit; none in a final round", () => {
    const model = new Model(new Array(PAGES).fill(0), true);
    model.write(0, 2, 7);
    model.write(0, 3, 8);
    model.sendNow(0, true);
    model.commit(0);
    // Its guest runs at the destination and writes page 3 there.
    model.write(0, 3, 9);
    model.write(1, 5, 7);
    model.write(1, 6, 8);
    model.sendNow(1, true);
    expect(model.counters.hitsCrossGuest).toBe(2);
    expect(model.dest[1]![5]).toBe(7);
    expect(model.wanted[1]).toEqual(new Set([6]));
    // Asked for again: it travels as data, as does everything in a final round.
    model.write(1, 7, 7);
    model.sendNow(1, false);
    expect(model.counters.hitsCrossGuest).toBe(2);
    expect(model.dest[1]!.slice(5, 8)).toEqual([7, 8, 7]);
  });

  test("the pages a committed member's guest wrote while it migrated serve no refs once the commit is settled: another holder does, or the page is sent", async () => {
    const run = async (written: number[]) => {
      const model = new Model(new Array(PAGES).fill(0), true);
      model.write(2, 4, 8);
      model.sendNow(2, true);
      // Member 0's page 3 takes content 8 last: it heads the content's holders.
      model.write(0, 2, 7);
      model.write(0, 3, 8);
      model.sendNow(0, true);
      model.commit(0, written);
      // The forgetting goes a chunk at a time, after the commit's turn.
      await new Promise((resolve) => setImmediate(resolve));
      // At the destination its guest writes page 3 (the model rewrites every third page).
      model.write(1, 5, 7);
      model.write(1, 6, 8);
      model.sendNow(1, true);
      return model;
    };
    // Told what it wrote: page 6 refers to member 2's page 4 (only the stream writes it),
    // page 5 travels as data (its one holder left the index), and nothing is asked for again.
    const told = await run([2, 3]);
    expect(told.dest[1]!.slice(5, 7)).toEqual([7, 8]);
    expect(told.wanted[1]).toEqual(new Set());
    expect(told.counters.hitsCrossGuest).toBe(2);
    // Not told: page 6 refers to member 0's page 3, which changed there, and is asked for again.
    const untold = await run([]);
    expect(untold.wanted[1]).toEqual(new Set([6]));
    expect(untold.counters.hitsCrossGuest).toBe(3);
  });
});
