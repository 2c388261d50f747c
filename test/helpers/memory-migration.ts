// A source migration without sockets or the addon: a guest whose regions are buffers, a
// tracker per region that the test's writes mark, and an in-memory destination that decodes
// every frame the engine sends (the real codec), applies pages into buffers of its own and
// answers as an agent would (accept, credit, verified, fingerprints for a repair, committed).
// The source engine cannot tell it from a peer session.
import { createHash } from 'node:crypto';
import { uncompressSync } from 'lz4-napi';
import { Codec, EntryKind, GuestKind } from '../../protocol/codes.js';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { encodeFrame, Frame, FrameDecoder, validatePages, type FrameOf } from '../../protocol/index.js';
import { FINGERPRINT_BYTES } from '../../protocol/limits.js';
import type { GuestRegion, SourceGuest } from '../../agent/guest/adapter.js';
import { creditCost } from '../../agent/migration/page-sender.js';
import type { RegionReader } from '../../agent/migration/region-reader.js';
import type { SourceSession } from '../../agent/migration/source-link.js';
import type { AnyFrame, FrameHandler } from '../../agent/peer/session.js';
import type { DirtyTracker } from '../../agent/tracker/dirty-tracker.js';
import { PageSet } from '../../agent/tracker/page-set.js';

/** A page's fingerprint here: any function both sides share will do (the addon uses XXH3-128). */
function fingerprint(page: Uint8Array): Buffer {
  return createHash('sha256').update(page).digest().subarray(0, FINGERPRINT_BYTES);
}

function digestOf(memory: Buffer, pageSize: number): Buffer {
  const all = createHash('sha256');
  for (let at = 0; at < memory.length; at += pageSize) all.update(fingerprint(memory.subarray(at, at + pageSize)));
  return all.digest().subarray(0, 16);
}

function isZero(page: Uint8Array): boolean {
  for (let i = 0; i < page.length; i++) if (page[i] !== 0) return false;
  return true;
}

/** A region's memory as a buffer, read as the addon's regionGather reads a mapping. */
export class BufferRegion implements RegionReader {
  readonly pageCount: number;
  closed = false;

  constructor(
    readonly memory: Buffer,
    readonly pageSizeBytes: number,
  ) {
    this.pageCount = memory.length / pageSizeBytes;
  }

  private page(n: number): Buffer {
    return this.memory.subarray(n * this.pageSizeBytes, (n + 1) * this.pageSizeBytes);
  }

  gather(runs: Uint32Array, cursor: Uint32Array, payload: Buffer, entries: Uint32Array, out: Uint32Array, fps?: Uint8Array): boolean {
    const ps = this.pageSizeBytes;
    const maxEntries = Math.floor(entries.length / 3);
    let e = 0;
    let bytes = 0;
    let run = cursor[0]!;
    let done = cursor[1]!;
    const stop = (finished: boolean) => {
      cursor[0] = run;
      cursor[1] = done;
      out[0] = e;
      out[1] = bytes;
      return finished;
    };
    for (; run * 2 < runs.length; run++, done = 0) {
      const first = runs[run * 2]!;
      const count = runs[run * 2 + 1]!;
      if (first + count > this.pageCount) throw new RangeError(`run ${first}+${count} is past the region's ${this.pageCount} pages`);
      for (; done < count; done++) {
        const n = first + done;
        const page = this.page(n);
        const kind = isZero(page) ? EntryKind.zero : EntryKind.data;
        const last = e - 1;
        const extend = e > 0 && entries[last * 3] === kind && entries[last * 3 + 1]! + entries[last * 3 + 2]! === n;
        if (!extend && e >= maxEntries) return stop(false);
        if (kind === EntryKind.data) {
          if (bytes + ps > payload.length) return stop(false);
          page.copy(payload, bytes);
          fps?.set(fingerprint(page), (bytes / ps) * FINGERPRINT_BYTES);
          bytes += ps;
        }
        if (extend) entries[last * 3 + 2]!++;
        else {
          entries[e * 3] = kind;
          entries[e * 3 + 1] = n;
          entries[e * 3 + 2] = 1;
          e++;
        }
      }
    }
    return stop(true);
  }

  fingerprints(firstPage: number, count: number, out: Uint8Array): void {
    for (let i = 0; i < count; i++) out.set(fingerprint(this.page(firstPage + i)), i * FINGERPRINT_BYTES);
  }

  /** As the addon's, it takes a while (it reads the whole region on the thread pool): frames arrive meanwhile. */
  async digest(): Promise<Buffer> {
    await new Promise((resolve) => setTimeout(resolve, 2));
    return digestOf(this.memory, this.pageSizeBytes);
  }

  close(): void {
    this.closed = true;
  }
}

/** A tracker that reports the pages the test wrote (MemoryGuest.write), like uffd-wp reports a guest's writes. */
export class MarkingTracker implements DirtyTracker {
  readonly kind = 'uffd-wp' as const;
  private dirty: PageSet;
  private armed = false;
  closed = false;
  /** Called at every collect, before the dirty set is taken: the guest "runs" between rounds. */
  beforeCollect: (() => void) | undefined;

  constructor(readonly pageCount: number) {
    this.dirty = new PageSet(pageCount);
  }

  mark(page: number): void {
    if (this.armed) this.dirty.add(page);
  }

  async arm(): Promise<void> {
    this.armed = true;
    this.dirty.clear();
  }

  async collect(): Promise<Uint32Array> {
    this.beforeCollect?.();
    const runs = this.dirty.toRuns();
    this.dirty.clear();
    return runs;
  }

  remark(runs: Uint32Array): void {
    this.dirty.addRuns(runs);
  }

  noteSent(): void {}

  close(): void {
    this.closed = true;
  }
}

/** A guest whose regions are buffers; the test writes pages, pauses are counted, device state is given. */
export class MemoryGuest implements SourceGuest {
  readonly kind = GuestKind.process;
  readonly config = {};
  readonly regions: GuestRegion[];
  readonly memories: Buffer[];
  readonly trackers: MarkingTracker[];
  readonly readers: BufferRegion[] = [];
  paused = false;
  pauses = 0;
  resumes = 0;
  discarded = false;

  constructor(
    readonly name: string,
    regionBytes: number[],
    readonly deviceState: Uint8Array = new Uint8Array(0),
    readonly pageSizeBytes = 4096,
  ) {
    this.regions = regionBytes.map((lengthBytes, i) => ({ name: `ram${i}`, path: `/nonexistent/${name}.${i}`, lengthBytes, pageSizeBytes }));
    this.memories = regionBytes.map((bytes) => Buffer.alloc(bytes));
    this.trackers = this.memories.map((memory) => new MarkingTracker(memory.length / pageSizeBytes));
  }

  get isPaused(): boolean {
    return this.paused;
  }

  /** The guest writes `byte` over page `page` of region `region` (refused while paused: a paused guest does not write). */
  write(region: number, page: number, byte: number): void {
    if (this.paused) throw new Error('a paused guest does not write');
    this.memories[region]!.fill(byte, page * this.pageSizeBytes, (page + 1) * this.pageSizeBytes);
    this.trackers[region]!.mark(page);
  }

  /** The reader the engine maps region `region` with. */
  openRegion = (region: GuestRegion): RegionReader => {
    const index = this.regions.indexOf(region);
    const reader = new BufferRegion(this.memories[index]!, this.pageSizeBytes);
    this.readers.push(reader);
    return reader;
  };

  async openTrackers(): Promise<{ trackers: DirtyTracker[] }> {
    return { trackers: this.trackers };
  }

  async pause(): Promise<void> {
    this.paused = true;
    this.pauses++;
  }

  async resume(): Promise<void> {
    this.paused = false;
    this.resumes++;
  }

  async saveDeviceState(): Promise<Uint8Array> {
    if (!this.paused) throw new Error('device state taken from a running guest');
    return this.deviceState;
  }

  eagerRuns(): Uint32Array[] {
    return this.regions.map((_, i) => (i === 0 ? Uint32Array.of(0, 1) : new Uint32Array(0)));
  }

  async discard(): Promise<void> {
    this.discarded = true;
  }
}

export interface MemoryDestinationOptions {
  features?: string[];
  creditBytes?: number;
  maxPayloadBytes?: number;
  /** The session breaks when the destination has received this many pages (a sink that fails mid-round). */
  breakAfterPages?: number;
  /** The destination refuses the device state (as one over peers.maxDeviceState): it aborts the migration. */
  refuseDeviceState?: boolean;
  /**
   * With the feature 'standby-ready': ms after the accept until it says its standby guest is
   * up (default 0), or 'fails' (it aborts the migration instead, as a standby that did not start).
   */
  standbyReady?: number | 'fails';
}

/**
 * The destination as the source engine meets it, in memory: a SourceSession whose frames are
 * encoded, decoded and answered. Its regions fill from the pages frames; `verify` is answered
 * with the digests of what it holds.
 */
export class MemoryDestination implements SourceSession {
  readonly peer: SourceSession['peer'];
  readonly peerMaxPayloadBytes: number;
  isOpen = true;
  memories: Buffer[] = [];
  pageSize = 4096;
  deviceState: Buffer | undefined;
  pagesReceived = 0;
  readonly frames: AnyFrame['type'][] = [];
  aborted: FrameOf<'abort'> | undefined;
  committed = false;
  /** How many frames had come in when this destination sent standbyReady. */
  framesBeforeStandbyReady: number | undefined;
  private handler: FrameHandler | undefined;
  private readonly decoder: FrameDecoder;
  private readonly creditBytes: number;

  constructor(private readonly options: MemoryDestinationOptions = {}) {
    this.peerMaxPayloadBytes = options.maxPayloadBytes ?? 16 << 20;
    this.peer = Frame.hello({ agentId: 'memory-destination', agentVersion: '0.0.0-test', features: options.features ?? ['repair'], maxPayloadBytes: this.peerMaxPayloadBytes });
    this.decoder = new FrameDecoder({ maxPayloadBytes: this.peerMaxPayloadBytes });
    this.creditBytes = options.creditBytes ?? 8 << 20;
  }

  register(_migrationId: string, handler: FrameHandler): void {
    this.handler = handler;
  }

  unregister(): void {
    this.handler = undefined;
  }

  async measureRttMs(): Promise<number> {
    return 0.05;
  }

  readonly rttFloorMs = 0.05;

  async writable(): Promise<void> {}

  send(frame: AnyFrame): number {
    const [head, payload] = encodeFrame(frame as never);
    return this.sendMessage(payload && payload.length > 0 ? Buffer.concat([head, payload]) : head);
  }

  sendMessage(message: Buffer, onWritten?: (err?: Error) => void): number {
    if (!this.isOpen) throw new GangwayError(ErrorCode.PEER_GONE, 'the session is closed');
    // A copy, as a socket would take it: the sender reuses its buffer once onWritten runs.
    for (const frame of this.decoder.push(Buffer.from(message))) this.receive(frame as AnyFrame);
    onWritten?.();
    return message.length;
  }

  /** The session breaks: the engine learns it as a closed session. */
  breakSession(): void {
    if (!this.isOpen) return;
    this.isOpen = false;
    const handler = this.handler;
    queueMicrotask(() => handler?.onSessionClosed(new GangwayError(ErrorCode.PEER_GONE, 'the in-memory session broke')));
  }

  private reply(frame: AnyFrame): void {
    const handler = this.handler;
    // As from a socket: later, never inside the sender's call.
    setImmediate(() => {
      if (this.isOpen) handler?.onFrame(frame, 0);
    });
  }

  private receive(frame: AnyFrame): void {
    this.frames.push(frame.type);
    switch (frame.type) {
      case 'offer':
        this.memories = frame.guest.regions.map((region) => Buffer.alloc(region.lengthBytes));
        this.pageSize = frame.guest.regions[0]!.pageSizeBytes;
        this.reply(Frame.accept({ migrationId: frame.migrationId, creditBytes: this.creditBytes, secret: new Uint8Array(32) }));
        if (this.peer?.features.includes('standby-ready')) {
          const migrationId = frame.migrationId;
          const ready = this.options.standbyReady ?? 0;
          setTimeout(() => {
            if (!this.isOpen) return;
            if (ready === 'fails') {
              this.handler?.onFrame(Frame.abort({ migrationId, code: ErrorCode.GUEST_FAILED, message: "the guest's qemu process at the destination did not come up" }), 0);
              return;
            }
            this.framesBeforeStandbyReady = this.frames.length;
            this.handler?.onFrame(Frame.standbyReady({ migrationId }), 0);
          }, ready === 'fails' ? 50 : ready);
        }
        return;
      case 'pages': {
        // The protocol's own checks of a pages frame, as a destination agent makes them.
        validatePages(frame, this.memories[frame.region]!.length / this.pageSize, this.pageSize, this.peerMaxPayloadBytes);
        const raw = frame.codec === Codec.lz4 ? uncompressSync(Buffer.from(frame.payload)) : Buffer.from(frame.payload);
        const memory = this.memories[frame.region]!;
        let offset = 0;
        for (let e = 0; e < frame.entries.length; e += 3) {
          const [kind, first, count] = [frame.entries[e]!, frame.entries[e + 1]!, frame.entries[e + 2]!];
          const at = first * this.pageSize;
          const bytes = count * this.pageSize;
          if (kind === EntryKind.zero) memory.fill(0, at, at + bytes);
          else if (kind === EntryKind.data) {
            raw.copy(memory, at, offset, offset + bytes);
            offset += bytes;
          } else throw new Error(`entry kind ${kind} is not taken here`);
          this.pagesReceived += count;
        }
        if (this.options.breakAfterPages !== undefined && this.pagesReceived >= this.options.breakAfterPages) {
          this.breakSession();
          return;
        }
        this.reply(Frame.credit({ migrationId: frame.migrationId, bytes: creditCost(frame.payload.length, frame.rawBytes, frame.entries.length / 3) }));
        return;
      }
      case 'deviceState': {
        if (this.options.refuseDeviceState) {
          this.reply(Frame.abort({ migrationId: frame.migrationId, code: ErrorCode.LIMIT, message: `the guest's device state of ${frame.totalBytes} bytes is over this agent's maximum` }));
          return;
        }
        this.deviceState ??= Buffer.alloc(frame.totalBytes);
        Buffer.from(frame.state).copy(this.deviceState, frame.offsetBytes);
        return;
      }
      case 'verify': {
        const digests = this.memories.map((memory) => digestOf(memory, this.pageSize));
        const match = digests.every((d, i) => d.equals(Buffer.from(frame.digests[i]!)));
        this.reply(Frame.verified({ migrationId: frame.migrationId, match, digests }));
        if (!match && this.peer?.features.includes('repair')) {
          this.memories.forEach((memory, region) => {
            const pages = memory.length / this.pageSize;
            const fps = new Uint8Array(pages * FINGERPRINT_BYTES);
            for (let p = 0; p < pages; p++) fps.set(fingerprint(memory.subarray(p * this.pageSize, (p + 1) * this.pageSize)), p * FINGERPRINT_BYTES);
            this.reply(Frame.pageFingerprints({ migrationId: frame.migrationId, region, firstPage: 0, fingerprints: fps }));
          });
        }
        return;
      }
      case 'commit':
        this.committed = true;
        this.reply(Frame.committed({ migrationId: frame.migrationId, resumeToSendMs: 0 }));
        return;
      case 'abort':
        this.aborted = frame;
        return;
      case 'roundEnd':
      case 'pause':
        return;
      default:
        throw new Error(`the in-memory destination does not take ${frame.type}`);
    }
  }
}
