// The destination's half of a dedup group (see source-group.ts for the protocol's reasoning).
//
// The group holds the memories refs may copy from, by slot: the incoming regions of its
// migrations, and the memories of guests already running here (resident). It applies the
// whole group's frames through one queue, in arrival order, since a ref in one migration's
// frame may copy what another migration's earlier frame wrote. Incoming memories stay
// mapped until the group closes, even when their migration aborts, so a ref into them is
// never a dangling handle; a committed guest's memory stays in the group, as resident memory
// whose pages a ref copies only while they hold what they held at the commit (settleSlot).
import { closeSync, openSync } from 'node:fs';
import type { Logger } from 'pino';
import { ErrorCode, ProtocolError } from '../../protocol/errors.js';
import { Frame } from '../../protocol/index.js';
import { FINGERPRINT_BYTES, MAX_FINGERPRINTS_PER_FRAME, RESIDENT_SLOT_FLAG } from '../../protocol/limits.js';
import { loadNative, type RegionHandle } from '../native.js';
import type { PeerSession } from '../peer/session.js';
import type { ResidentFingerprintCache, ResidentGuest } from './resident-cache.js';

export interface GroupSlot {
  slot: number;
  region: RegionHandle;
  pageCount: number;
  pageSizeBytes: number;
  /** Resident: the fingerprints offered; a page is copied only while it still matches. */
  offered?: Uint8Array;
  /** Frees the memory when the group ends. */
  release: () => void;
}

export class DestinationGroup {
  private readonly slots = new Map<number, GroupSlot>();
  private tail: Promise<void> = Promise.resolve();
  private ended = false;
  private readonly native = loadNative();

  constructor(
    readonly id: string,
    private readonly log: Logger,
  ) {}

  /** Runs `step` after every step queued before it, in the group's arrival order. */
  enqueue(step: () => Promise<void> | void): Promise<void> {
    const run = this.tail.then(step);
    this.tail = run.catch(() => {});
    return run;
  }

  /** An incoming region joins; throws a ProtocolError when the slot is taken. */
  addIncoming(slot: number, region: RegionHandle, pageCount: number, pageSizeBytes: number, release: () => void): void {
    if (this.ended) throw new ProtocolError(ErrorCode.UNEXPECTED_FRAME, `dedup group ${this.id} is closed`);
    if (this.slots.has(slot)) throw new ProtocolError(ErrorCode.PROTOCOL, `dedup group ${this.id}: slot ${slot} is already in use`);
    this.slots.set(slot, { slot, region, pageCount, pageSizeBytes, release });
  }

  /**
   * The slot's guest is about to run here (its commit): from now on the slot is like a
   * resident one, a ref copies a page only while it still holds what it held at the commit
   * (`fingerprints`, the region's tracked ones, checked by the switchover's digest), and
   * asks for it again otherwise. The group keeps `region` mapped (it becomes the group's to
   * close) until it ends. The source makes such refs only to a peer with the feature
   * 'dedup-committed', outside a final round, as for resident memory.
   */
  settleSlot(slot: number, region: RegionHandle, fingerprints: Uint8Array): void {
    const entry = this.slots.get(slot);
    if (!entry || entry.offered) {
      this.native.regionClose(region);
      return;
    }
    if (fingerprints.byteLength !== entry.pageCount * FINGERPRINT_BYTES) throw new RangeError(`dedup group ${this.id}: slot ${slot} settles with ${fingerprints.byteLength} bytes of fingerprints for ${entry.pageCount} pages`);
    entry.region = region;
    entry.offered = fingerprints;
    entry.release = () => this.native.regionClose(region);
  }

  /**
   * Where a ref entry copies from: checks that the slot is in the group, that its
   * page size matches, and that the pages lie inside it.
   */
  source(slot: number, firstPage: number, count: number, pageSizeBytes: number): GroupSlot {
    const entry = this.slots.get(slot);
    const fail = (problem: string): never => {
      throw new ProtocolError(ErrorCode.BAD_PAGES, `ref to slot ${slot} page ${firstPage} (+${count}) of dedup group ${this.id}: ${problem}`);
    };
    if (!entry) return fail('no such slot');
    if (entry.pageSizeBytes !== pageSizeBytes) return fail(`page size ${entry.pageSizeBytes}, the target's is ${pageSizeBytes}`);
    if (firstPage + count > entry.pageCount) return fail(`past the slot's ${entry.pageCount} pages`);
    return entry;
  }

  /**
   * Offers `guests` (chosen by the resident policy) as resident slots: fingerprints in
   * dedupResident frames, then the caller sends dedupReady. The fingerprints come from the
   * agent's shared cache; the group maps each guest itself, read-only, for the copies. A
   * guest that cannot be mapped or hashed (it just ended) is left out.
   */
  async offerResident(session: PeerSession, guests: readonly ResidentGuest[], cache: ResidentFingerprintCache): Promise<{ slots: number; pages: number }> {
    let next = RESIDENT_SLOT_FLAG;
    let pages = 0;
    let slots = 0;
    for (const guest of guests) {
      if (this.ended || !session.isOpen) break;
      let region: RegionHandle;
      try {
        const fd = openSync(guest.memoryPath, 'r');
        try {
          region = this.native.regionMap(fd, guest.memoryBytes, guest.pageSizeBytes, { writable: false, trackHashes: false, initiallyZero: false });
        } finally {
          closeSync(fd);
        }
      } catch (err) {
        this.log.warn({ guest: guest.name, err: (err as Error).message }, 'cannot offer a resident guest');
        continue;
      }
      let offered: Uint8Array;
      try {
        ({ fingerprints: offered } = await cache.get(guest));
      } catch (err) {
        this.native.regionClose(region);
        this.log.warn({ guest: guest.name, err: (err as Error).message }, 'cannot offer a resident guest');
        continue;
      }
      const pageCount = guest.memoryBytes / guest.pageSizeBytes;
      if (this.ended || !session.isOpen || offered.byteLength !== pageCount * FINGERPRINT_BYTES) {
        this.native.regionClose(region);
        continue;
      }
      const slot = next++;
      this.slots.set(slot, {
        slot,
        region,
        pageCount,
        pageSizeBytes: guest.pageSizeBytes,
        offered,
        release: () => this.native.regionClose(region),
      });
      for (let first = 0; first < pageCount; first += MAX_FINGERPRINTS_PER_FRAME) {
        const count = Math.min(MAX_FINGERPRINTS_PER_FRAME, pageCount - first);
        if (!session.isOpen || this.ended) break;
        const fingerprints = offered.subarray(first * FINGERPRINT_BYTES, (first + count) * FINGERPRINT_BYTES);
        session.send(Frame.dedupResident({ group: this.id, slot, pageCount, pageSizeBytes: guest.pageSizeBytes, firstPage: first, fingerprints }));
        await new Promise((resolve) => setImmediate(resolve));
      }
      slots++;
      pages += pageCount;
      this.log.info({ group: this.id, guest: guest.name, slot, pageCount }, 'resident guest offered for dedup');
    }
    return { slots, pages };
  }

  /** Frees every memory the group kept, once its queued steps are done. Idempotent. */
  close(): Promise<void> {
    if (this.ended) return this.tail;
    this.ended = true;
    return this.enqueue(() => {
      for (const entry of this.slots.values()) {
        try {
          entry.release();
        } catch {}
      }
      this.slots.clear();
    });
  }

  get isClosed(): boolean {
    return this.ended;
  }
}
