// What the source engine reads of a guest's memory region: batches of pages (zero pages as
// runs, data pages packed), a fingerprint per page, and a digest of the whole region. In
// the agent it is the addon's read-only mapping of the region's file; a unit test gives the
// engine a plain buffer instead (test/helpers/memory-migration.ts), so that a whole
// migration runs without the addon.
import { closeSync, openSync } from 'node:fs';
import type { GuestRegion } from '../guest/adapter.js';
import { loadNative, type RegionHandle } from '../native.js';
import { holesOf } from '../tracker/page-set.js';

export interface RegionReader {
  readonly pageSizeBytes: number;
  readonly pageCount: number;
  /**
   * The pages that may hold data, as runs: the file's pages less its holes (SEEK_DATA; pages
   * never written read as zeros); every page when absent. A disk's holes are exact. A memory
   * region's are a tmpfs file's pages never written (tmpfs fallocates without writing, so a
   * guest that came here by pre-copy has a hole at each zero page that came as one), those of
   * MEMORY_MIN_HOLE_BYTES or more, capped at MEMORY_HOLE_RUNS runs (the rest counts as data),
   * and they read as zeros only while nothing writes them: its caller arms the dirty tracker
   * first.
   */
  dataRuns?(): Promise<Uint32Array>;
  /**
   * Copies the pages of `runs` from `cursor` on into a batch, as the addon's regionGather
   * does (agent/native.ts): entries [kind, firstPage, pageCount], data pages packed in
   * `payload`, `out` = [entryCount, payloadBytes]; true once every run is consumed.
   */
  gather(runs: Uint32Array, cursor: Uint32Array, payload: Buffer, entries: Uint32Array, out: Uint32Array, fps?: Uint8Array): boolean;
  /** The 16-byte fingerprints of pages firstPage..firstPage+count-1, read now. */
  fingerprints(firstPage: number, count: number, out: Uint8Array): void;
  /** The region's 128-bit digest, read now (source and destination compute it alike). */
  digest(): Promise<Buffer>;
  close(): void;
}

/** The addon's read-only mapping of a region's file. */
export class MappedRegion implements RegionReader {
  private readonly native = loadNative();
  readonly pageSizeBytes: number;
  readonly pageCount: number;
  readonly handle: RegionHandle;
  private readonly path: string;
  private readonly sparse: boolean;
  /** A disk's holes are all wanted; a memory region's, up to MEMORY_HOLE_RUNS runs of MEMORY_MIN_HOLE_BYTES or more. */
  private readonly maxRuns: number | undefined;
  private readonly minHole: number | undefined;
  /** The holes the last dataRuns found: all the digest looks for holes in. */
  private holes: Uint32Array | undefined;

  constructor(region: GuestRegion) {
    this.path = region.path;
    this.sparse = region.sparse ?? false;
    this.maxRuns = region.sparse ? undefined : MEMORY_HOLE_RUNS;
    this.minHole = region.sparse ? undefined : Math.max(1, Math.floor(MEMORY_MIN_HOLE_BYTES / region.pageSizeBytes));
    this.pageSizeBytes = region.pageSizeBytes;
    this.pageCount = region.lengthBytes / region.pageSizeBytes;
    const fd = openSync(region.path, 'r');
    try {
      this.handle = this.native.regionMap(fd, region.lengthBytes, region.pageSizeBytes, { writable: false, trackHashes: false, initiallyZero: false });
    } finally {
      closeSync(fd);
    }
  }

  gather(runs: Uint32Array, cursor: Uint32Array, payload: Buffer, entries: Uint32Array, out: Uint32Array, fps?: Uint8Array): boolean {
    return this.native.regionGather(this.handle, runs, cursor, payload, entries, out, fps);
  }

  fingerprints(firstPage: number, count: number, out: Uint8Array): void {
    this.native.regionFingerprints(this.handle, firstPage, count, out);
  }

  /** The file's data runs, read now (SEEK_DATA/SEEK_HOLE, on the thread pool: on tmpfs a walk passes its data at 12 ms per GiB). */
  async dataRuns(): Promise<Uint32Array> {
    const runs = await this.fileDataRuns();
    this.holes = holesOf(runs, this.pageCount);
    return runs;
  }

  async digest(): Promise<Buffer> {
    // Holes are zero pages the digest need not read: 8 GiB of a disk's would go through the
    // page cache, and a tmpfs page never written is zeroed and allocated when read through
    // the mapping (about 0.35 s per GiB here), inside the downtime. It looks for them only
    // where dataRuns found holes, without walking the data between them, and on the digest's
    // own thread: a walk of its own first queued the digest behind the final round's
    // compressions. Pages found holes then read as zeros then, whatever the dirty tracker said.
    // A disk no round has walked yet (a post-copy taken over after a restart): its data now.
    if (this.holes === undefined && this.sparse) return this.native.regionDigest(this.handle, 'full', await this.fileDataRuns());
    if (this.holes === undefined || this.holes.length === 0) return this.native.regionDigest(this.handle, 'full');
    const fd = openSync(this.path, 'r');
    try {
      return await this.native.regionDigest(this.handle, 'full', this.holes, fd);
    } finally {
      closeSync(fd);
    }
  }

  private async fileDataRuns(): Promise<Uint32Array> {
    const fd = openSync(this.path, 'r');
    try {
      return await this.native.fileDataRunsAsync(fd, this.pageSizeBytes, this.pageCount, this.maxRuns, undefined, this.minHole);
    } finally {
      closeSync(fd);
    }
  }

  close(): void {
    this.native.regionClose(this.handle);
  }
}

/**
 * The most runs a memory region's dataRuns walks (two lseeks each, about 1 us): a file holed
 * at every other page would otherwise take seconds to walk at a switchover.
 */
export const MEMORY_HOLE_RUNS = 4096;
/**
 * A memory hole shorter than this is read as data: the digest of data runs a few pages long
 * took longer than reading every page (4325 runs of 32768 pages: 8-13 ms against 6), and a
 * small hole costs little to read.
 */
export const MEMORY_MIN_HOLE_BYTES = 256 * 1024;

export const mapRegion = (region: GuestRegion): RegionReader => new MappedRegion(region);
