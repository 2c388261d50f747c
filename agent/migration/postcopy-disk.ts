// A disk in post-copy at the destination: the VM runs here while some of its disk's blocks
// are still at the source. QEMU reaches the disk through an NBD export of this agent (its
// drive is an NBD client node on a unix socket), and every request is served from the disk's
// file here, once the blocks it touches are here: a request on a missing block asks the
// source for it with a fetch frame (as a memory fault does) and waits; the blocks arrive by
// that fetch or by the background push, whichever comes first. A block is installed only
// while it is missing, and the guest reads or writes a block only once it is here, so a late
// block never overwrites what the guest wrote since, and the fingerprints kept are those of
// the blocks as they arrived (the disk at the switchover: post-copy's verdict).
//
// Before post-copy starts (a hybrid still pre-copying, a standby QEMU opening its drives)
// only reads are served, from the file as it is (the guest does not run yet); a hybrid that
// ends by stop-and-copy opens the disk complete. Once the last block is here the
// destination switches QEMU's drive to the file itself (switchDiskToFile): the agent is no
// longer in the guest's I/O path.
import { fdatasync, read, write } from 'node:fs';
import { promisify } from 'node:util';
import { NbdCommandError, NbdErrno } from '../../protocol/nbd/index.js';
import type { AgentMetrics } from '../metrics.js';
import { ENTRY_DATA, type NativeAddon } from '../native.js';
import type { NbdExport } from '../nbd/export.js';
import { ZEROES } from '../nbd/zeroes.js';
import { PageSet } from '../tracker/page-set.js';
import type { IncomingRegion } from './destination-types.js';
import { LatencySamples } from './postcopy.js';
import { FaultLedger, pushPage, sendFetchRuns, type PostcopyStats, type RegionReceiver } from './postcopy-destination.js';

const readAsync = promisify(read);
const writeAsync = promisify(write);
const fdatasyncAsync = promisify(fdatasync);

/** A guest request waiting for `left` of its blocks. */
interface Waiter {
  left: number;
  resolve: () => void;
  reject: (err: Error) => void;
}

export class PostcopyDisk implements NbdExport, RegionReceiver {
  readonly readOnly = false;
  /** QEMU addresses a disk in 512-byte sectors. */
  readonly minBlockBytes = 512;
  readonly sizeBytes: number;
  /** The blocks not here yet; undefined until post-copy starts (or the disk opens complete). */
  private missing: PageSet | undefined;
  private readonly ledger: FaultLedger;
  private readonly waiting = new Map<number, Waiter[]>();
  private sendFetch: (runs: Uint32Array) => void = () => {};
  private readonly openWaiters: Waiter[] = [];
  private completeWaiters: (() => void)[] = [];
  private initialMissing = 0;
  private closed = false;

  constructor(
    /** The export's name: QEMU's NBD node asks for it. */
    readonly name: string,
    private readonly region: IncomingRegion,
    private readonly native: Pick<NativeAddon, 'regionScatter' | 'punchHoles'>,
    metrics?: AgentMetrics,
  ) {
    this.sizeBytes = region.lengthBytes;
    this.ledger = new FaultLedger(region.pageCount, new LatencySamples(), metrics);
  }

  /** Post-copy started: `missingRuns` are at the source; a request on them asks `sendFetch` and waits. */
  start(missingRuns: Uint32Array, sendFetch: (runs: Uint32Array) => void, latency?: LatencySamples): void {
    this.missing = new PageSet(this.region.pageCount);
    this.missing.addRuns(missingRuns);
    this.initialMissing = this.missing.size;
    this.sendFetch = sendFetch;
    if (latency) this.ledger.latency = latency;
    for (const waiter of this.openWaiters.splice(0)) waiter.resolve();
  }

  /** The disk is here whole (a stop-and-copy commit): requests go straight to the file. */
  openComplete(): void {
    this.start(new Uint32Array(0), () => {});
  }

  // ── the receiver's side: blocks from the source ─────────────────────────────────
  get attached(): boolean {
    return this.missing !== undefined;
  }

  get missingPages(): number {
    return this.missing?.size ?? 0;
  }

  /**
   * Writes a pages frame's zero and data entries (after decompression) where their blocks
   * are still missing, and wakes the requests that waited for them.
   */
  install(entries: Uint32Array, raw: Uint8Array): void {
    const missing = this.missing;
    if (!missing || this.closed) return;
    const pageSize = this.region.pageSizeBytes;
    const kept: number[] = [];
    const keptData: Uint8Array[] = [];
    let offset = 0;
    const arrived: number[] = [];
    for (let e = 0; e < entries.length; e += 3) {
      const kind = entries[e]!;
      const first = entries[e + 1]!;
      const count = entries[e + 2]!;
      const data = kind === ENTRY_DATA;
      for (let page = first; page < first + count; page++) {
        if (missing.has(page)) {
          const n = kept.length;
          // A run of the same kind goes on (and its data with it).
          if (n >= 3 && kept[n - 3] === kind && kept[n - 2]! + kept[n - 1]! === page) kept[n - 1]!++;
          else kept.push(kind, page, 1);
          if (data) keptData.push(raw.subarray(offset, offset + pageSize));
          arrived.push(page);
        }
        if (data) offset += pageSize;
      }
    }
    if (arrived.length === 0) return;
    const payload = keptData.length === 0 ? new Uint8Array(0) : keptData.length * pageSize === raw.length ? raw : Buffer.concat(keptData);
    this.native.regionScatter(this.region.handle, Uint32Array.from(kept), kept.length / 3, payload);
    const now = performance.now();
    for (const page of arrived) {
      missing.delete(page);
      this.ledger.arrived(page, now);
      const waiters = this.waiting.get(page);
      if (!waiters) continue;
      this.waiting.delete(page);
      for (const waiter of waiters) if (--waiter.left === 0) waiter.resolve();
    }
    this.ledger.settle();
    if (missing.size === 0) for (const resolve of this.completeWaiters.splice(0)) resolve();
  }

  whenComplete(): Promise<void> {
    if (this.missing?.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.completeWaiters.push(resolve));
  }

  /** Asks again for the blocks requests wait on (after a reattach). */
  refetch(): void {
    this.fetch(this.ledger.waitingOn((page) => this.missing?.has(page) ?? false));
  }

  missingRuns(): Uint32Array {
    return this.missing?.toRuns() ?? new Uint32Array(0);
  }

  stats(): PostcopyStats {
    return this.ledger.stats(this.initialMissing);
  }

  /** Requests still waiting fail (EIO): nothing will bring their blocks any more. A complete disk serves on. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    const gone = new NbdCommandError(NbdErrno.EIO, 'the disk migration ended before the block arrived');
    for (const waiter of this.openWaiters.splice(0)) waiter.reject(gone);
    for (const waiters of this.waiting.values()) for (const waiter of waiters) waiter.reject(gone);
    this.waiting.clear();
  }

  // ── the export's side: the guest's requests ─────────────────────────────────────
  async read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    await this.present(offsetBytes, lengthBytes, true);
    const out = Buffer.allocUnsafe(lengthBytes);
    for (let done = 0; done < lengthBytes; ) {
      const { bytesRead } = await readAsync(this.region.fd, out, done, lengthBytes - done, offsetBytes + done);
      if (bytesRead === 0) {
        out.fill(0, done);
        break;
      }
      done += bytesRead;
    }
    return out;
  }

  async write(offsetBytes: number, data: Buffer, options: { fua: boolean }): Promise<void> {
    await this.present(offsetBytes, data.length);
    await this.writeAll(data, offsetBytes);
    if (options.fua) await fdatasyncAsync(this.region.fd);
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options: { noHole: boolean; fua: boolean }): Promise<void> {
    await this.present(offsetBytes, lengthBytes);
    const whole = this.wholeBlocks(offsetBytes, lengthBytes);
    if (!options.noHole && whole.count > 0) {
      // Whole blocks become holes (sparse stays sparse); the edges are written.
      this.native.punchHoles(this.region.fd, Uint32Array.of(whole.first, whole.count), this.region.pageSizeBytes);
      await this.zero(offsetBytes, whole.startBytes - offsetBytes);
      await this.zero(whole.endBytes, offsetBytes + lengthBytes - whole.endBytes);
    } else {
      await this.zero(offsetBytes, lengthBytes);
    }
    if (options.fua) await fdatasyncAsync(this.region.fd);
  }

  /** A discard: the whole blocks inside the range become holes (a hint: the edges stay). */
  async trim(offsetBytes: number, lengthBytes: number, options: { fua: boolean }): Promise<void> {
    await this.present(offsetBytes, lengthBytes);
    const whole = this.wholeBlocks(offsetBytes, lengthBytes);
    if (whole.count > 0) this.native.punchHoles(this.region.fd, Uint32Array.of(whole.first, whole.count), this.region.pageSizeBytes);
    if (options.fua) await fdatasyncAsync(this.region.fd);
  }

  async flush(): Promise<void> {
    await fdatasyncAsync(this.region.fd);
  }

  /**
   * Resolves once every block of the range is here, asking the source for those that are
   * not. Before the disk opens, a read is served from the file as it is: QEMU reads the
   * first sector as it opens and activates the drive, while its guest does not run yet (and
   * must not wait: that read blocks QEMU's main loop). Anything else waits for the opening.
   */
  private async present(offsetBytes: number, lengthBytes: number, read = false): Promise<void> {
    if (!this.missing) {
      if (read && !this.closed) return;
      if (this.closed) throw new NbdCommandError(NbdErrno.EIO, 'the disk migration ended before the disk opened here');
      await new Promise<void>((resolve, reject) => this.openWaiters.push({ left: 1, resolve, reject }));
    }
    const missing = this.missing!;
    if (missing.size === 0 || lengthBytes === 0) return;
    if (this.closed) throw new NbdCommandError(NbdErrno.EIO, 'the disk migration ended before its blocks arrived');
    const pageSize = this.region.pageSizeBytes;
    const first = Math.floor(offsetBytes / pageSize);
    const end = Math.ceil((offsetBytes + lengthBytes) / pageSize);
    const absent: number[] = [];
    for (let page = missing.nextFrom(first); page !== undefined && page < end; page = missing.nextFrom(page + 1)) absent.push(page);
    if (absent.length === 0) return;
    const now = performance.now();
    const ask = absent.filter((page) => this.ledger.ask(page, now));
    await new Promise<void>((resolve, reject) => {
      const waiter = { left: absent.length, resolve, reject };
      for (const page of absent) {
        const list = this.waiting.get(page);
        if (list) list.push(waiter);
        else this.waiting.set(page, [waiter]);
      }
      this.fetch(ask);
    });
  }

  /** Sends fetch frames for ascending `pages`, as runs. */
  private fetch(pages: readonly number[]): void {
    const runs: number[] = [];
    for (const page of pages) pushPage(runs, page);
    sendFetchRuns(runs, this.sendFetch);
  }

  private wholeBlocks(offsetBytes: number, lengthBytes: number): { first: number; count: number; startBytes: number; endBytes: number } {
    const pageSize = this.region.pageSizeBytes;
    const first = Math.ceil(offsetBytes / pageSize);
    const end = Math.floor((offsetBytes + lengthBytes) / pageSize);
    const count = Math.max(0, end - first);
    return { first, count, startBytes: first * pageSize, endBytes: count > 0 ? end * pageSize : first * pageSize };
  }

  private async zero(offsetBytes: number, lengthBytes: number): Promise<void> {
    for (let done = 0; done < lengthBytes; ) {
      const n = Math.min(ZEROES.length, lengthBytes - done);
      await this.writeAll(ZEROES.subarray(0, n), offsetBytes + done);
      done += n;
    }
  }

  private async writeAll(data: Uint8Array, offsetBytes: number): Promise<void> {
    for (let done = 0; done < data.length; ) {
      const { bytesWritten } = await writeAsync(this.region.fd, data, done, data.length - done, offsetBytes + done);
      done += bytesWritten;
    }
  }
}
