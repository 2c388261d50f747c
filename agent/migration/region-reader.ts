// What the source engine reads of a guest's memory region: batches of pages (zero pages as
// runs, data pages packed), a fingerprint per page, and a digest of the whole region. In
// the agent it is the addon's read-only mapping of the region's file; a unit test gives the
// engine a plain buffer instead (test/helpers/memory-migration.ts), so that a whole
// migration runs without the addon.
import { closeSync, openSync } from 'node:fs';
import type { GuestRegion } from '../guest/adapter.js';
import { loadNative, type RegionHandle } from '../native.js';

export interface RegionReader {
  readonly pageSizeBytes: number;
  readonly pageCount: number;
  /**
   * The pages that may hold data, as runs: the file's pages less its holes (SEEK_DATA; pages
   * never written read as zeros); every page when absent. A disk's holes are exact. A memory
   * region's are a tmpfs file's pages never written (tmpfs fallocates without writing, so a
   * guest that came here by pre-copy has a hole at each zero page that came as one), capped
   * at MEMORY_HOLE_RUNS runs (the rest counts as data), and the rest reads as zeros only
   * while nothing writes them: its caller arms the dirty tracker first.
   */
  dataRuns?(): Uint32Array;
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
  /** A disk's holes are all wanted; a memory region's, up to MEMORY_HOLE_RUNS runs. */
  private readonly maxRuns: number | undefined;

  constructor(region: GuestRegion) {
    this.path = region.path;
    this.maxRuns = region.sparse ? undefined : MEMORY_HOLE_RUNS;
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

  /** The file's data runs, read now (SEEK_DATA/SEEK_HOLE). */
  dataRuns(): Uint32Array {
    const fd = openSync(this.path, 'r');
    try {
      return this.native.fileDataRuns(fd, this.pageSizeBytes, this.pageCount, this.maxRuns);
    } finally {
      closeSync(fd);
    }
  }

  digest(): Promise<Buffer> {
    // Holes are zero pages the digest need not read: 8 GiB of a disk's would go through the
    // page cache, and reading a tmpfs page never written through the mapping zeroes it
    // first (about 0.35 s per GiB here), inside the downtime. The value is the same.
    return this.native.regionDigest(this.handle, 'full', this.dataRuns());
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

export const mapRegion = (region: GuestRegion): RegionReader => new MappedRegion(region);
