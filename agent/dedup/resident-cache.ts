// Fingerprints of resident guests' memory, computed once and shared by every dedup group
// that offers that guest while they are young enough (dedup.residentMaxAge).
//
// Freshness is a matter of efficiency only, never of correctness: a destination copies a
// resident page for a ref only when the page still matches the fingerprint it offered
// (DestinationGroup.source hands the slot's `offered` fingerprints to
// IncomingPages.applyWithRefs, whose regionCopyPages compares each copied page to
// them), and asks the source for every page that no longer matches (want). Old fingerprints
// cost pages asked for again, never a wrong page.
//
// The agent owns one cache; the groups keep their own read-only mapping of each guest for
// the copies (a slot's RegionHandle), only the hashing is shared.
import { closeSync, openSync } from 'node:fs';
import { FINGERPRINT_BYTES, MAX_FINGERPRINTS_PER_FRAME } from '../../protocol/limits.js';
import { loadNative, type NativeAddon } from '../native.js';

/** A guest as the cache knows it: name, pid and memory file identify one incarnation of it. */
export interface ResidentGuest {
  name: string;
  pid: number;
  /** The region's file: a memory file, or a disk of the guest (`sparse`). */
  memoryPath: string;
  memoryBytes: number;
  pageSizeBytes: number;
  /** A sparse file (a VM's disk): its holes are zero pages, fingerprinted without reading them. */
  sparse?: boolean;
}

export interface ResidentFingerprints {
  /** FINGERPRINT_BYTES per page, in page order. Shared: never written after it is returned. */
  fingerprints: Uint8Array;
  /** When the hashing started (the cache's clock): every page was read after this. */
  takenAt: number;
}

/** Hashes every page of a guest's memory; the fingerprints come back whole. */
export type HashGuest = (guest: ResidentGuest) => Promise<Uint8Array>;

/**
 * What the cache may hold: 256 MiB of fingerprints cover 64 GiB of resident guest memory
 * at 4 KiB pages (16 bytes a page, 1/256 of the memory): a host's worth of small guests, or
 * a few large ones. Beyond it the oldest entries go and are hashed again when asked for,
 * which costs CPU and nothing else. Groups hold the arrays they offered until they close,
 * outside this budget (each group's own cost, bounded by peers.maxGroupsPerSession).
 */
export const DEFAULT_RESIDENT_CACHE_BYTES = 256 * 1024 * 1024;

export interface ResidentCacheOptions {
  maxAgeMs: number;
  budgetBytes?: number;
  /** Monotonic milliseconds; injected so tests drive time. */
  now?: () => number;
  hash?: HashGuest;
}

export function residentKey(guest: Pick<ResidentGuest, 'name' | 'pid' | 'memoryPath'>): string {
  return JSON.stringify([guest.name, guest.pid, guest.memoryPath]);
}

interface Entry {
  /** Set while the hashing runs: every request for the guest meanwhile waits for it. */
  pending?: Promise<ResidentFingerprints>;
  done?: ResidentFingerprints;
}

export class ResidentFingerprintCache {
  /** Insertion order is the order the fingerprints were taken in (an entry is re-inserted when done). */
  private readonly entries = new Map<string, Entry>();
  private heldBytes = 0;
  private readonly maxAgeMs: number;
  private readonly budgetBytes: number;
  private readonly now: () => number;
  private readonly hash: HashGuest;
  /** Hashing passes started (for tests and logs: how many requests did not reuse one). */
  computations = 0;

  constructor(options: ResidentCacheOptions) {
    this.maxAgeMs = options.maxAgeMs;
    this.budgetBytes = options.budgetBytes ?? DEFAULT_RESIDENT_CACHE_BYTES;
    this.now = options.now ?? (() => performance.now());
    this.hash = options.hash ?? hashGuestMemory(loadNative());
  }

  /**
   * The guest's fingerprints: those taken less than maxAgeMs ago, the pass under way, or a
   * new pass. A failed pass is not kept: the next request tries again.
   */
  get(guest: ResidentGuest): Promise<ResidentFingerprints> {
    const key = residentKey(guest);
    const entry = this.entries.get(key);
    if (entry?.pending) return entry.pending;
    if (entry?.done && this.now() - entry.done.takenAt < this.maxAgeMs) return Promise.resolve(entry.done);
    if (entry) this.drop(key);
    const takenAt = this.now();
    this.computations++;
    const fresh: Entry = {};
    const pending = this.hash(guest).then(
      (fingerprints) => {
        const result = { fingerprints, takenAt };
        // Only if the entry is still this pass's (retain() may have dropped the guest meanwhile).
        if (this.entries.get(key) === fresh) {
          this.entries.delete(key);
          fresh.pending = undefined;
          if (fingerprints.byteLength <= this.budgetBytes) {
            fresh.done = result;
            this.entries.set(key, fresh);
            this.heldBytes += fingerprints.byteLength;
            this.evict();
          }
        }
        return result;
      },
      (err: unknown) => {
        if (this.entries.get(key) === fresh) this.entries.delete(key);
        throw err;
      },
    );
    fresh.pending = pending;
    this.entries.set(key, fresh);
    return pending;
  }

  /** Forgets every guest not in `live` (guests that are gone, or came back as another process). */
  retain(live: Iterable<Pick<ResidentGuest, 'name' | 'pid' | 'memoryPath'>>): void {
    const keep = new Set<string>();
    for (const guest of live) keep.add(residentKey(guest));
    for (const key of [...this.entries.keys()]) if (!keep.has(key)) this.drop(key);
  }

  /** Fingerprint bytes held by finished entries. */
  get bytes(): number {
    return this.heldBytes;
  }

  /** Guests with fingerprints held or being taken. */
  get size(): number {
    return this.entries.size;
  }

  private drop(key: string): void {
    const entry = this.entries.get(key);
    if (!entry) return;
    if (entry.done) this.heldBytes -= entry.done.fingerprints.byteLength;
    this.entries.delete(key);
  }

  /** Drops the oldest finished entries until the held bytes fit the budget. */
  private evict(): void {
    for (const [key, entry] of this.entries) {
      if (this.heldBytes <= this.budgetBytes) return;
      if (entry.done) this.drop(key);
    }
  }
}

/**
 * The real hashing: maps the guest's memory file read-only and fingerprints it in chunks of
 * MAX_FINGERPRINTS_PER_FRAME pages, yielding to the event loop between chunks so sessions
 * and migrations keep moving meanwhile.
 */
export function hashGuestMemory(native: NativeAddon): HashGuest {
  return async (guest) => {
    const pageCount = guest.memoryBytes / guest.pageSizeBytes;
    const fd = openSync(guest.memoryPath, 'r');
    let region;
    let runs: Uint32Array;
    try {
      region = native.regionMap(fd, guest.memoryBytes, guest.pageSizeBytes, { writable: false, trackHashes: false, initiallyZero: false });
      runs = guest.sparse ? native.fileDataRuns(fd, guest.pageSizeBytes, pageCount) : Uint32Array.of(0, pageCount);
    } finally {
      closeSync(fd);
    }
    try {
      const fingerprints = new Uint8Array(pageCount * FINGERPRINT_BYTES);
      if (guest.sparse && pageCount > 0) {
        // A disk's holes: the zero page's fingerprint, doubled along the array, then its data read.
        fingerprints.set(native.hash128(new Uint8Array(guest.pageSizeBytes)));
        for (let filled = FINGERPRINT_BYTES; filled < fingerprints.length; filled *= 2) fingerprints.copyWithin(filled, 0, Math.min(filled, fingerprints.length - filled));
      }
      for (let i = 0; i + 1 < runs.length; i += 2) {
        const end = runs[i]! + runs[i + 1]!;
        for (let first = runs[i]!; first < end; first += MAX_FINGERPRINTS_PER_FRAME) {
          const count = Math.min(MAX_FINGERPRINTS_PER_FRAME, end - first);
          native.regionFingerprints(region, first, count, fingerprints.subarray(first * FINGERPRINT_BYTES, (first + count) * FINGERPRINT_BYTES));
          await new Promise((resolve) => setImmediate(resolve));
        }
      }
      return fingerprints;
    } finally {
      native.regionClose(region);
    }
  };
}
