// hash-scan dirty tracker: the fallback for any memory file. Keeps a 64-bit fingerprint of
// every page's content AS SENT and reports pages whose current content differs. Comparing
// against what was sent (not against the previous scan) matters: a page that changes and
// changes back between a scan and its send would otherwise be missed. O(memory) per
// collect; 64-bit fingerprints are fine for change detection (not for content identity).
import { closeSync, openSync, readSync } from 'node:fs';
import xxhash from 'xxhash-wasm';
import { EntryKind } from '../../protocol/codes.js';
import type { DirtyTracker } from './dirty-tracker.js';
import { PageSet, mergeRuns } from './page-set.js';

const READ_CHUNK_BYTES = 1 << 20;

type Hasher = Awaited<ReturnType<typeof xxhash>>;
let hasherPromise: Promise<Hasher> | undefined;
function getHasher(): Promise<Hasher> {
  hasherPromise ??= xxhash();
  return hasherPromise;
}

export class HashScanTracker implements DirtyTracker {
  readonly kind = 'hash-scan' as const;
  private readonly baseline: BigUint64Array;
  private readonly pageCount: number;
  private fd: number | undefined;
  private remarked: Uint32Array = new Uint32Array(0);
  private readonly chunk = Buffer.allocUnsafe(READ_CHUNK_BYTES);
  private readonly zeroHash: bigint;

  private constructor(
    private readonly hasher: Hasher,
    path: string,
    lengthBytes: number,
    private readonly pageSizeBytes: number,
  ) {
    this.pageCount = lengthBytes / pageSizeBytes;
    this.baseline = new BigUint64Array(this.pageCount);
    this.fd = openSync(path, 'r');
    this.zeroHash = hasher.h64Raw(new Uint8Array(pageSizeBytes));
  }

  static async open(path: string, lengthBytes: number, pageSizeBytes: number): Promise<HashScanTracker> {
    return new HashScanTracker(await getHasher(), path, lengthBytes, pageSizeBytes);
  }

  /** Calls `visit(page, hash)` for every page's current content. */
  private scanAll(visit: (page: number, hash: bigint) => void): void {
    if (this.fd === undefined) throw new Error('tracker is closed');
    const pagesPerChunk = READ_CHUNK_BYTES / this.pageSizeBytes;
    for (let first = 0; first < this.pageCount; first += pagesPerChunk) {
      const pages = Math.min(pagesPerChunk, this.pageCount - first);
      const bytes = pages * this.pageSizeBytes;
      let got = 0;
      while (got < bytes) {
        const n = readSync(this.fd, this.chunk, got, bytes - got, first * this.pageSizeBytes + got);
        if (n === 0) throw new Error('memory file is shorter than the region');
        got += n;
      }
      for (let i = 0; i < pages; i++) {
        const view = this.chunk.subarray(i * this.pageSizeBytes, (i + 1) * this.pageSizeBytes);
        visit(first + i, this.hasher.h64Raw(view));
      }
    }
  }

  async arm(): Promise<void> {
    this.scanAll((page, hash) => {
      this.baseline[page] = hash;
    });
    this.remarked = new Uint32Array(0);
  }

  async collect(): Promise<Uint32Array> {
    const dirty = new PageSet(this.pageCount);
    this.scanAll((page, hash) => {
      if (this.baseline[page] !== hash) dirty.add(page);
    });
    const result = mergeRuns(dirty.toRuns(), this.remarked, this.pageCount);
    this.remarked = new Uint32Array(0);
    return result;
  }

  remark(runs: Uint32Array): void {
    this.remarked = mergeRuns(this.remarked, runs, this.pageCount);
  }

  noteSent(entries: Uint32Array, entryCount: number, payload: Uint8Array): void {
    let offset = 0;
    for (let e = 0; e < entryCount; e++) {
      const kind = entries[e * 3]!;
      const first = entries[e * 3 + 1]!;
      const count = entries[e * 3 + 2]!;
      for (let page = first; page < first + count; page++) {
        if (kind === EntryKind.data) {
          this.baseline[page] = this.hasher.h64Raw(payload.subarray(offset, offset + this.pageSizeBytes));
          offset += this.pageSizeBytes;
        } else {
          this.baseline[page] = this.zeroHash;
        }
      }
    }
  }

  close(): void {
    if (this.fd !== undefined) closeSync(this.fd);
    this.fd = undefined;
  }
}
