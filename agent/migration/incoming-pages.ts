// Applying the pages frames of an incoming migration. Each frame takes its cost of the
// credit the source holds (beyond it breaks the protocol), is decompressed in one of the
// session's LZ4 slots on the thread pool, and is written in stream order: zero and data
// entries through a scatter, refs copied from the dedup group's slots (pages whose resident
// copy changed are asked for again with a want); then its credit goes back. Once post-copy's
// switchover began, its receivers install each frame as soon as it is here instead.
import { uncompress } from 'lz4-napi';
import type { Logger } from 'pino';
import { Codec } from '../../protocol/codes.js';
import { ErrorCode, GangwayError, ProtocolCloseCode, ProtocolError } from '../../protocol/errors.js';
import { Frame, validatePages, type FrameOf } from '../../protocol/index.js';
import { MAX_WANT_RUNS, REF_WORDS } from '../../protocol/limits.js';
import type { DestinationGroup, GroupSlot } from '../dedup/dest-group.js';
import { ENTRY_REF, type NativeAddon } from '../native.js';
import type { PeerSession } from '../peer/session.js';
import type { IncomingRegion } from './destination-types.js';
import type { Slots } from './flow.js';
import { creditCost } from './page-sender.js';

/** Post-copy's side of the pages (destination-postcopy.ts). */
export interface PostcopyInstall {
  /** Resolves once the guest's userfaultfds are attached; undefined before the switchover. */
  readonly attached: Promise<void> | undefined;
  /** The region receivers are there: from the attach on, unless the start failed. */
  readonly receiving: boolean;
  /**
   * Installs a pages frame's entries into region `region` where they are still missing;
   * resolves once they are (a full memory directory holds the frame until there is room).
   */
  install(region: number, entries: Uint32Array, raw: Uint8Array): Promise<void>;
}

/** What applying pages needs of the migration. */
export interface IncomingPagesContext {
  readonly migrationId: string;
  /** The credit granted to each session of the source. */
  readonly creditBytes: number;
  readonly maxPayloadBytes: number;
  /** The session's LZ4 decompressions under way at once (shared by its migrations). */
  readonly decompressions: Slots;
  readonly native: NativeAddon;
  readonly log: Logger;
  /** Post-copy at this side (a post-copy or hybrid migration). */
  readonly postcopy: PostcopyInstall | undefined;
  /** The source sent pages beyond its credit: for the agent's log and metrics. */
  onCreditLimit(): void;
  /** The guest's regions as this side holds them. */
  regions(): readonly IncomingRegion[];
  /** The session the source sends on now (a post-copy reattach replaces it). */
  session(): PeerSession;
  finished(): boolean;
  /** The dedup group the migration belongs to, whose slots refs copy from. */
  group(): DestinationGroup | undefined;
  /** Runs `step` once everything queued before it has run (the migration's frames apply in order). */
  enqueue(step: () => Promise<void>): void;
  /** A post-copy install failed (outside the queue): the migration fails on it. */
  fail(err: unknown): void;
}

export class IncomingPages {
  /** Credit the source holds of this session's grant: pages beyond it break the protocol. */
  private creditLeft: number;
  private mismatchScratch = new Uint32Array(0);
  private received = 0;

  constructor(private readonly ctx: IncomingPagesContext) {
    this.creditLeft = ctx.creditBytes;
  }

  /** Pages written here (zero, data and refs), or installed by post-copy. */
  get pagesReceived(): number {
    return this.received;
  }

  /** A reattached source holds the whole grant again on its new session. */
  restartCredit(): void {
    this.creditLeft = this.ctx.creditBytes;
  }

  /** A pages frame: checked, its credit taken, then applied in order (or installed, in post-copy). */
  receive(pages: FrameOf<'pages'>): void {
    const regions = this.ctx.regions();
    const region = regions[pages.region];
    if (!region) throw new ProtocolError(ErrorCode.BAD_PAGES, `pages for region ${pages.region}, the guest has ${regions.length}`);
    const counts = validatePages(pages, region.pageCount, region.pageSizeBytes, this.ctx.maxPayloadBytes);
    const cost = creditCost(pages.payload.length, pages.rawBytes, pages.entries.length / 3);
    this.takeCredit(cost);
    // Decompression starts as soon as the session has a slot, on the thread pool; writes
    // are applied in stream order.
    const data: Promise<Uint8Array> = pages.codec === Codec.lz4 ? this.decompress(pages.payload) : Promise.resolve(pages.payload);
    data.catch(() => {});
    const postcopy = this.ctx.postcopy;
    if (postcopy?.attached) {
      if (pages.refs) throw new ProtocolError(ErrorCode.BAD_PAGES, 'refs in a post-copy frame');
      const via = this.ctx.session();
      // Post-copy: each frame is installed as soon as it is here (a fault's page must not
      // wait behind pushed ones); a page is only ever installed where it is missing.
      void Promise.all([data, postcopy.attached]).then(
        async ([raw]) => {
          if (this.ctx.finished() && !postcopy.receiving) return;
          if (raw.length !== pages.rawBytes) {
            throw new ProtocolError(ErrorCode.DECOMPRESS, `LZ4 payload decompressed to ${raw.length} bytes, expected ${pages.rawBytes}`);
          }
          await postcopy.install(pages.region, pages.entries, raw);
          this.received += counts.dataPages + counts.zeroPages;
          // Credits belong to the session the frame came on (a reattached source starts afresh).
          if (via === this.ctx.session() && via.isOpen) this.giveCredit(cost);
        },
        (cause: unknown) => {
          throw new ProtocolError(ErrorCode.DECOMPRESS, `LZ4 payload does not decompress: ${(cause as Error).message}`, { cause });
        },
      ).catch((err: unknown) => this.ctx.fail(err));
      return;
    }
    this.ctx.enqueue(async () => {
      let raw: Uint8Array;
      try {
        raw = await data;
      } catch (cause) {
        throw new ProtocolError(ErrorCode.DECOMPRESS, `LZ4 payload does not decompress: ${(cause as Error).message}`, { cause });
      }
      if (raw.length !== pages.rawBytes) {
        throw new ProtocolError(ErrorCode.DECOMPRESS, `LZ4 payload decompressed to ${raw.length} bytes, expected ${pages.rawBytes}`);
      }
      if (pages.refs) this.applyWithRefs(pages.region, region, pages.entries, pages.refs, counts.refPages, raw);
      else this.ctx.native.regionScatter(region.handle, pages.entries, pages.entries.length / 3, raw);
      this.received += counts.dataPages + counts.zeroPages + counts.refPages;
      this.giveCredit(cost);
    });
  }

  /**
   * Applies entries in order, in one native call (regionApplyRefs): runs of zero and data
   * entries as a scatter, each ref as a copy from its slot (verified against the offered
   * fingerprints when the slot is resident). A frame of a gang's round 0 holds thousands of
   * single-page refs, all applied on this agent's event loop: a native call per ref and a
   * scatter per run between them took 4.2-5.5 us a ref page, one call 2.8-3.3. Pages whose
   * resident source changed are asked for again, before the credit. `refPages`: the ref
   * pages validatePages counted (refs holds REF_WORDS words per ref entry, checked there).
   */
  private applyWithRefs(regionIndex: number, region: IncomingRegion, entries: Uint32Array, refs: Uint32Array, refPages: number, raw: Uint8Array): void {
    const group = this.ctx.group();
    if (!group) throw new ProtocolError(ErrorCode.BAD_PAGES, 'refs in a migration that is not in a dedup group');
    const entryCount = entries.length / 3;
    // Check every ref before writing anything; each slot is one source of the call.
    const sources: GroupSlot[] = [];
    const sourceIndex = new Map<GroupSlot, number>();
    const plan = new Uint32Array((2 * refs.length) / REF_WORDS);
    for (let e = 0, r = 0; e < entryCount; e++) {
      if (entries[e * 3] !== ENTRY_REF) continue;
      const sourcePage = refs[r * REF_WORDS + 1]!;
      const source = group.source(refs[r * REF_WORDS]!, sourcePage, entries[e * 3 + 2]!, region.pageSizeBytes);
      let index = sourceIndex.get(source);
      if (index === undefined) {
        index = sources.push(source) - 1;
        sourceIndex.set(source, index);
      }
      plan[2 * r] = index;
      plan[2 * r + 1] = sourcePage;
      r++;
    }
    if (this.mismatchScratch.length < 3 * refPages) this.mismatchScratch = new Uint32Array(3 * refPages);
    const mismatches = this.mismatchScratch;
    const missed = this.ctx.native.regionApplyRefs(
      region.handle,
      entries,
      entryCount,
      raw,
      plan,
      sources.map((source) => source.region),
      sources.map((source) => source.offered ?? null),
      mismatches,
    );
    if (missed === 0) return;
    const want: number[] = [];
    const stale: number[] = [];
    for (let i = 0; i < missed; i++) {
      want.push(mismatches[3 * i]!);
      stale.push(sources[mismatches[3 * i + 1]!]!.slot, mismatches[3 * i + 2]!);
    }
    this.sendWant(regionIndex, want, stale);
  }

  /**
   * Asks for `pages` again; `stale` holds the resident [slot, page] each one was copied
   * from, pair i for page i. A frame carries at most MAX_WANT_RUNS pages, so its runs and
   * its stale pairs both fit.
   */
  private sendWant(regionIndex: number, pages: number[], stale: number[]): void {
    for (let first = 0; first < pages.length; first += MAX_WANT_RUNS) {
      const runs: number[] = [];
      for (const page of pages.slice(first, first + MAX_WANT_RUNS)) {
        const last = runs.length - 2;
        if (last >= 0 && runs[last]! + runs[last + 1]! === page) runs[last + 1]!++;
        else runs.push(page, 1);
      }
      this.ctx.session().send(
        Frame.want({
          migrationId: this.ctx.migrationId,
          region: regionIndex,
          runs: Uint32Array.from(runs),
          stale: Uint32Array.from(stale.slice(first * 2, (first + MAX_WANT_RUNS) * 2)),
        }),
      );
    }
    this.ctx.log.debug({ pages: pages.length }, 'resident content changed; pages asked for again');
  }

  /**
   * A pages frame takes `cost` of the credit the source holds. More than it was granted is a
   * protocol error that ends the session: every frame in flight holds memory here (its
   * payload, and what it decompresses to), and the credit is what bounds it. A single frame
   * larger than the whole window is allowed when nothing else is in flight, as the sender's
   * CreditWindow sends it.
   */
  private takeCredit(cost: number): void {
    if (cost > this.creditLeft && this.creditLeft < this.ctx.creditBytes) {
      this.ctx.onCreditLimit();
      throw new ProtocolError(
        ErrorCode.FLOW_CONTROL,
        `pages beyond the granted credit: a frame of ${cost} credit bytes with ${Math.max(0, this.creditLeft)} of ${this.ctx.creditBytes} left (wait for credit frames)`,
        { closeCode: ProtocolCloseCode.policy },
      );
    }
    this.creditLeft -= cost;
  }

  private giveCredit(cost: number): void {
    this.creditLeft += cost;
    this.ctx.session().send(Frame.credit({ migrationId: this.ctx.migrationId, bytes: cost }));
  }

  /** LZ4 in a slot of the session's; work that waited past this migration's end is dropped unrun. */
  private async decompress(payload: Uint8Array): Promise<Uint8Array> {
    const release = await this.ctx.decompressions.acquire();
    try {
      if (this.ctx.finished()) throw new GangwayError(ErrorCode.ABORTED, 'the migration ended before its pages were decompressed');
      return await uncompress(payload);
    } finally {
      release();
    }
  }
}
