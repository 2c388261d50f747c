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
  /** The pages that may hold data, as runs: a sparse file's pages less its holes; every page when absent. */
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
  private readonly sparsePath: string | undefined;

  constructor(region: GuestRegion) {
    this.sparsePath = region.sparse ? region.path : undefined;
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

  /** A sparse file's data runs, read now (SEEK_DATA/SEEK_HOLE); every page of a memory region. */
  dataRuns(): Uint32Array {
    if (this.sparsePath === undefined) return Uint32Array.of(0, this.pageCount);
    const fd = openSync(this.sparsePath!, 'r');
    try {
      return this.native.fileDataRuns(fd, this.pageSizeBytes, this.pageCount);
    } finally {
      closeSync(fd);
    }
  }

  digest(): Promise<Buffer> {
    // A disk's holes are zero pages the digest need not read (8 GiB of them would go
    // through the page cache).
    return this.sparsePath === undefined ? this.native.regionDigest(this.handle, 'full') : this.native.regionDigest(this.handle, 'full', this.dataRuns());
  }

  close(): void {
    this.native.regionClose(this.handle);
  }
}

export const mapRegion = (region: GuestRegion): RegionReader => new MappedRegion(region);
