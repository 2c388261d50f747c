// The destination's half of a dedup group (see source-group.ts for the protocol's reasoning).
//
// The group holds the memories refs may copy from, by slot: the incoming regions of its
// migrations, and the memories of guests already running here (resident). It applies the
// whole group's frames through one queue, in arrival order, since a ref in one migration's
// frame may copy what another migration's earlier frame wrote. Incoming memories stay
// mapped until the group closes, even when their migration aborts, so a ref into them is
// never a dangling handle; a committed guest's memory leaves the group at its commit.
import { closeSync, openSync } from 'node:fs';
import type { Logger } from 'pino';
import { ErrorCode, ProtocolError } from '../../protocol/errors.js';
import { Frame } from '../../protocol/index.js';
import { FINGERPRINT_BYTES, MAX_FINGERPRINTS_PER_FRAME, RESIDENT_SLOT_FLAG } from '../../protocol/limits.js';
import type { GuestRegistry } from '../guest/registry.js';
import { loadNative, type RegionHandle } from '../native.js';
import type { PeerSession } from '../peer/session.js';

export interface GroupSlot {
  slot: number;
  region: RegionHandle;
  pageCount: number;
  pageSizeBytes: number;
  /** Resident: the fingerprints offered; a page is copied only while it still matches. */
  offered?: Uint8Array;
  /** Refs may no longer copy from it (its guest runs here now). */
  closed: boolean;
  /** Frees the memory when the group ends. */
  release: () => void;
}

/** How many groups one session may hold open, so a peer cannot pin memory without bound. */
export const MAX_GROUPS_PER_SESSION = 16;

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
    this.slots.set(slot, { slot, region, pageCount, pageSizeBytes, closed: false, release });
  }

  /** The slot's guest runs here now: refs to it are refused from now on. Its memory is no longer the group's to free. */
  closeSlot(slot: number): void {
    const entry = this.slots.get(slot);
    if (!entry) return;
    entry.closed = true;
    entry.release = () => {};
  }

  /**
   * Where a ref entry copies from: checks that the slot is in the group and open, that its
   * page size matches, and that the pages lie inside it.
   */
  source(slot: number, firstPage: number, count: number, pageSizeBytes: number): GroupSlot {
    const entry = this.slots.get(slot);
    const fail = (problem: string): never => {
      throw new ProtocolError(ErrorCode.BAD_PAGES, `ref to slot ${slot} page ${firstPage} (+${count}) of dedup group ${this.id}: ${problem}`);
    };
    if (!entry) return fail('no such slot');
    if (entry.closed) return fail('that guest already runs here');
    if (entry.pageSizeBytes !== pageSizeBytes) return fail(`page size ${entry.pageSizeBytes}, the target's is ${pageSizeBytes}`);
    if (firstPage + count > entry.pageCount) return fail(`past the slot's ${entry.pageCount} pages`);
    return entry;
  }

  /**
   * Offers the memory of every guest running here (and not being migrated) as resident
   * slots: fingerprints in dedupResident frames, then dedupReady. Hashing yields to the
   * event loop between frames.
   */
  async offerResident(session: PeerSession, registry: GuestRegistry, busy: (name: string) => boolean): Promise<{ slots: number; pages: number }> {
    let next = RESIDENT_SLOT_FLAG;
    let pages = 0;
    let slots = 0;
    for (const { record, guest } of registry.list()) {
      if (this.ended || !session.isOpen) break;
      if (busy(record.name) || !guest.alive()) continue;
      let region: RegionHandle;
      try {
        const fd = openSync(record.files.memoryPath, 'r');
        try {
          region = this.native.regionMap(fd, record.memoryBytes, record.pageSizeBytes, { writable: false, trackHashes: false, initiallyZero: false });
        } finally {
          closeSync(fd);
        }
      } catch (err) {
        this.log.warn({ guest: record.name, err: (err as Error).message }, 'cannot offer a resident guest');
        continue;
      }
      const slot = next++;
      const pageCount = record.memoryBytes / record.pageSizeBytes;
      const offered = new Uint8Array(pageCount * FINGERPRINT_BYTES);
      this.slots.set(slot, {
        slot,
        region,
        pageCount,
        pageSizeBytes: record.pageSizeBytes,
        offered,
        closed: false,
        release: () => this.native.regionClose(region),
      });
      for (let first = 0; first < pageCount; first += MAX_FINGERPRINTS_PER_FRAME) {
        const count = Math.min(MAX_FINGERPRINTS_PER_FRAME, pageCount - first);
        const fps = offered.subarray(first * FINGERPRINT_BYTES, (first + count) * FINGERPRINT_BYTES);
        this.native.regionFingerprints(region, first, count, fps);
        if (!session.isOpen || this.ended) break;
        session.send(Frame.dedupResident({ group: this.id, slot, pageCount, pageSizeBytes: record.pageSizeBytes, firstPage: first, fingerprints: fps }));
        await new Promise((resolve) => setImmediate(resolve));
      }
      slots++;
      pages += pageCount;
      this.log.info({ group: this.id, guest: record.name, slot, pageCount }, 'resident guest offered for dedup');
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
