// The destination side of a migration: receives pages into an unnamed memory file (so a
// crash of this agent leaves nothing behind), checks the source's digests against its own,
// and on commit names the file and starts the guest from the hot-standby process.
import { closeSync, rmSync, statfsSync } from 'node:fs';
import { uncompress } from 'lz4-napi';
import type { Logger } from 'pino';
import { Codec, FrameType, GuestKind, RejectReason } from '../../protocol/codes.js';
import { ErrorCode, GangwayError, ProtocolError } from '../../protocol/errors.js';
import { Frame, validatePages } from '../../protocol/index.js';
import { initialMigrationState, transition, type MigrationEvent, type MigrationState } from '../../protocol/migration-state.js';
import { GUEST_PAGE_SIZE, readGuestHeader } from '../guest/guest-header.js';
import { launchProcessGuest, specFromHeader, type LaunchedGuest } from '../guest/process-guest.js';
import type { GuestRecord, GuestRegistry } from '../guest/registry.js';
import { loadNative, type RegionHandle } from '../native.js';
import type { AnyFrame, FrameHandler, OfferFrame, PeerSession } from '../peer/session.js';
import { creditCost } from './page-sender.js';
import { randomBytes } from 'node:crypto';
import type { AgentMetrics } from '../metrics.js';
import type { DestinationGroup } from '../dedup/dest-group.js';
import { ENTRY_DATA, ENTRY_REF } from '../native.js';
import { FINGERPRINT_BYTES, MAX_FINGERPRINTS_PER_FRAME, MAX_WANT_RUNS, REF_WORDS } from '../../protocol/limits.js';

/** Repairs of a digest mismatch this side allows before it gives the migration up. */
const MAX_REPAIRS = 2;

export interface DestinationContext {
  registry: GuestRegistry;
  memoryDir: string;
  creditBytes: number;
  maxPayloadBytes: number;
  log: Logger;
  /** Is the agent taking new migrations? */
  accepting: () => boolean;
  metrics?: AgentMetrics;
  /** The session's open dedup groups, by id. */
  groups?: Map<string, DestinationGroup>;
}

export interface IncomingResult {
  migrationId: string;
  guest: string;
  from: string;
  outcome: 'committed' | 'aborted';
  reason?: string;
  pages: number;
  rounds: number;
}

interface IncomingRegion {
  fd: number;
  handle: RegionHandle;
  pageCount: number;
  pageSizeBytes: number;
  lengthBytes: number;
}

export class DestinationMigration implements FrameHandler {
  private state: MigrationState = initialMigrationState();
  private readonly native = loadNative();
  private queue: Promise<void> = Promise.resolve();
  private regions: IncomingRegion[] = [];
  private standby: LaunchedGuest | undefined;
  private finished = false;
  private pagesReceived = 0;
  private roundsSeen = 0;
  private readonly memoryPath: string;
  private readonly files;
  /** The dedup group this migration belongs to (its frames are applied in the group's order). */
  private group: DestinationGroup | undefined;
  private mismatchScratch = new Uint32Array(0);
  private repairs = 0;
  readonly done: Promise<IncomingResult>;
  private resolveDone!: (result: IncomingResult) => void;

  private constructor(
    private readonly offer: OfferFrame,
    private readonly session: PeerSession,
    private readonly ctx: DestinationContext,
    private readonly log: Logger,
  ) {
    this.files = ctx.registry.filesFor(offer.guest.name, ctx.memoryDir, randomBytes(4).toString('hex'));
    this.memoryPath = this.files.memoryPath;
    this.done = new Promise((resolve) => (this.resolveDone = resolve));
  }

  /** Handles an offer: accepts (and returns the migration) or rejects (and returns undefined). */
  static start(offer: OfferFrame, session: PeerSession, ctx: DestinationContext): DestinationMigration | undefined {
    const log = ctx.log.child({ migrationId: offer.migrationId, guest: offer.guest.name });
    const reject = (reason: RejectReason, message: string) => {
      log.warn({ reason, message }, 'offer rejected');
      session.send(Frame.reject({ migrationId: offer.migrationId, reason, message }));
      return undefined;
    };
    if (!ctx.accepting()) return reject(RejectReason.shuttingDown, 'the destination agent is shutting down');
    const group = offer.dedup ? ctx.groups?.get(offer.dedup.group) : undefined;
    if (offer.dedup && (!group || group.isClosed)) {
      return reject(RejectReason.badSpec, `dedup group ${offer.dedup.group} is not open on this session (send dedupOpen first)`);
    }
    if (offer.guest.kind !== GuestKind.process) return reject(RejectReason.unsupported, 'only process guests are supported by this agent');
    const region = offer.guest.regions[0];
    if (offer.guest.regions.length !== 1 || !region || region.pageSizeBytes !== GUEST_PAGE_SIZE) {
      return reject(RejectReason.badSpec, `a process guest has one region of ${GUEST_PAGE_SIZE}-byte pages`);
    }
    try {
      ctx.registry.reserve(offer.guest.name);
    } catch (err) {
      return reject(RejectReason.guestExists, (err as Error).message);
    }
    const migration = new DestinationMigration(offer, session, ctx, log);
    try {
      const stats = statfsSync(ctx.memoryDir);
      const free = stats.bavail * stats.bsize;
      if (free < region.lengthBytes) {
        ctx.registry.release(offer.guest.name);
        return reject(RejectReason.noSpace, `${ctx.memoryDir} has ${free} bytes free, the guest needs ${region.lengthBytes}`);
      }
      migration.prepare();
    } catch (err) {
      migration.cleanup();
      return reject(RejectReason.noSpace, `cannot prepare the guest's memory: ${(err as Error).message}`);
    }
    if (group && offer.dedup) {
      try {
        migration.joinGroup(group, offer.dedup.slots);
      } catch (err) {
        migration.cleanup();
        return reject(RejectReason.badSpec, (err as Error).message);
      }
    }
    session.register(offer.migrationId, migration);
    migration.state = transition(migration.state, { type: 'sentAccept' });
    session.send(Frame.accept({ migrationId: offer.migrationId, creditBytes: ctx.creditBytes }));
    log.info({ memoryBytes: region.lengthBytes }, 'migration accepted');
    return migration;
  }

  private prepare(): void {
    for (const spec of this.offer.guest.regions) {
      const fd = this.native.tmpfileCreate(this.ctx.memoryDir, spec.lengthBytes);
      const handle = this.native.regionMap(fd, spec.lengthBytes, spec.pageSizeBytes, {
        writable: true,
        trackHashes: true,
        initiallyZero: true,
      });
      this.regions.push({ fd, handle, pageCount: spec.lengthBytes / spec.pageSizeBytes, pageSizeBytes: spec.pageSizeBytes, lengthBytes: spec.lengthBytes });
    }
    // A process started now and blocked on a pipe makes the resume a one-byte write.
    this.standby = launchProcessGuest({ files: this.files, standby: true });
  }

  private joinGroup(group: DestinationGroup, slots: number[]): void {
    this.regions.forEach((region, i) => {
      const { fd, handle } = region;
      group.addIncoming(slots[i]!, handle, region.pageCount, region.pageSizeBytes, () => {
        try {
          this.native.regionClose(handle);
        } catch {}
        try {
          closeSync(fd);
        } catch {}
      });
    });
    this.group = group;
    this.slots = slots;
  }

  private slots: number[] = [];

  onFrame(frame: AnyFrame, wireBytes: number): void {
    if (this.finished) return;
    try {
      this.state = transition(this.state, frame as unknown as MigrationEvent);
      this.handle(frame);
    } catch (err) {
      this.protocolFailure(err);
    }
    if (frame.type === 'pages') this.ctx.metrics?.receivedBytes.inc(wireBytes);
  }

  private handle(frame: AnyFrame): void {
    switch (frame.type) {
      case 'pages': {
        const pages = frame as ReturnType<typeof Frame.pages>;
        const region = this.regions[pages.region];
        if (!region) throw new ProtocolError(ErrorCode.BAD_PAGES, `pages for region ${pages.region}, the guest has ${this.regions.length}`);
        const counts = validatePages(pages, region.pageCount, region.pageSizeBytes, this.ctx.maxPayloadBytes);
        // Decompression starts now on the thread pool; writes are applied in stream order.
        const data: Promise<Uint8Array> = pages.codec === Codec.lz4 ? uncompress(pages.payload) : Promise.resolve(pages.payload);
        data.catch(() => {});
        const cost = creditCost(pages.payload.length, pages.entries.length / 3);
        this.enqueue(async () => {
          let raw: Uint8Array;
          try {
            raw = await data;
          } catch (cause) {
            throw new ProtocolError(ErrorCode.DECOMPRESS, `LZ4 payload does not decompress: ${(cause as Error).message}`, { cause });
          }
          if (raw.length !== pages.rawBytes) {
            throw new ProtocolError(ErrorCode.DECOMPRESS, `LZ4 payload decompressed to ${raw.length} bytes, expected ${pages.rawBytes}`);
          }
          if (pages.refs) this.applyWithRefs(pages.region, region, pages.entries, pages.refs, raw);
          else this.native.regionScatter(region.handle, pages.entries, pages.entries.length / 3, raw);
          this.pagesReceived += counts.dataPages + counts.zeroPages + counts.refPages;
          this.session.send(Frame.credit({ migrationId: this.offer.migrationId, bytes: cost }));
        });
        return;
      }
      case 'roundEnd':
        this.roundsSeen++;
        return;
      case 'pause':
      case 'deviceState':
        return;
      case 'verify': {
        const verify = frame as ReturnType<typeof Frame.verify>;
        this.enqueue(async () => {
          const digests = await Promise.all(this.regions.map((region) => this.native.regionDigest(region.handle, 'tracked')));
          const match =
            digests.length === verify.digests.length &&
            digests.every((digest, i) => digest.equals(Buffer.from(verify.digests[i]!)));
          const repair = !match && this.repairs < MAX_REPAIRS && (this.session.peer?.features.includes('repair') ?? false);
          this.session.send(Frame.verified({ migrationId: this.offer.migrationId, match, digests }));
          this.state = transition(this.state, { type: match ? 'sentVerified' : repair ? 'sentVerifiedMismatchRepair' : 'sentVerifiedMismatch' });
          if (match) return;
          if (!repair) {
            this.finish('aborted', 'memory digests differ');
            return;
          }
          // The source sends the pages that differ as one more final round.
          this.repairs++;
          this.log.warn({ attempt: this.repairs }, 'memory digests differ: sending page fingerprints for a repair');
          for (const [index, region] of this.regions.entries()) {
            for (let first = 0; first < region.pageCount; first += MAX_FINGERPRINTS_PER_FRAME) {
              const count = Math.min(MAX_FINGERPRINTS_PER_FRAME, region.pageCount - first);
              const fingerprints = new Uint8Array(count * FINGERPRINT_BYTES);
              this.native.regionFingerprints(region.handle, first, count, fingerprints);
              this.session.send(Frame.pageFingerprints({ migrationId: this.offer.migrationId, region: index, firstPage: first, fingerprints }));
            }
          }
        });
        return;
      }
      case 'commit':
        this.enqueue(() => this.commit());
        return;
      case 'abort': {
        const abort = frame as ReturnType<typeof Frame.abort>;
        this.finish('aborted', `the source aborted: ${abort.message}`);
        return;
      }
      default:
        throw new ProtocolError(ErrorCode.UNEXPECTED_FRAME, `frame type ${frame.type} is not expected by a destination`);
    }
  }

  /**
   * Applies entries in order: runs of zero and data entries through one scatter, each ref
   * through a copy from its slot (verified against the offered fingerprints when the slot is
   * resident). Pages whose resident source changed are asked for again, before the credit.
   */
  private applyWithRefs(regionIndex: number, region: IncomingRegion, entries: Uint32Array, refs: Uint32Array, raw: Uint8Array): void {
    const group = this.group;
    if (!group) throw new ProtocolError(ErrorCode.BAD_PAGES, 'refs in a migration that is not in a dedup group');
    const entryCount = entries.length / 3;
    // Check every ref before writing anything.
    const sources = [];
    for (let e = 0, r = 0; e < entryCount; e++) {
      if (entries[e * 3] !== ENTRY_REF) continue;
      sources.push(group.source(refs[r * REF_WORDS]!, refs[r * REF_WORDS + 1]!, entries[e * 3 + 2]!, region.pageSizeBytes));
      r++;
    }
    const want: number[] = [];
    const stale: number[] = [];
    let segmentStart = 0;
    let segmentBytes = 0;
    let offset = 0;
    const flush = (end: number) => {
      if (end > segmentStart) {
        this.native.regionScatter(region.handle, entries.subarray(segmentStart * 3, end * 3), end - segmentStart, raw.subarray(offset, offset + segmentBytes));
        offset += segmentBytes;
      }
      segmentBytes = 0;
    };
    for (let e = 0, r = 0; e < entryCount; e++) {
      const kind = entries[e * 3]!;
      const first = entries[e * 3 + 1]!;
      const count = entries[e * 3 + 2]!;
      if (kind === ENTRY_DATA) segmentBytes += count * region.pageSizeBytes;
      if (kind !== ENTRY_REF) continue;
      flush(e);
      segmentStart = e + 1;
      const source = sources[r]!;
      const sourcePage = refs[r * REF_WORDS + 1]!;
      r++;
      const expect = source.offered?.subarray(sourcePage * FINGERPRINT_BYTES, (sourcePage + count) * FINGERPRINT_BYTES) ?? null;
      if (expect && this.mismatchScratch.length < count) this.mismatchScratch = new Uint32Array(count);
      const mismatched = this.native.regionCopyPages(region.handle, first, source.region, sourcePage, count, expect, expect ? this.mismatchScratch : null);
      for (let i = 0; i < mismatched; i++) {
        const at = this.mismatchScratch[i]!;
        want.push(first + at);
        stale.push(source.slot, sourcePage + at);
      }
    }
    flush(entryCount);
    if (want.length > 0) this.sendWant(regionIndex, want, stale);
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
      this.session.send(
        Frame.want({
          migrationId: this.offer.migrationId,
          region: regionIndex,
          runs: Uint32Array.from(runs),
          stale: Uint32Array.from(stale.slice(first * 2, (first + MAX_WANT_RUNS) * 2)),
        }),
      );
    }
    this.log.debug({ pages: pages.length }, 'resident content changed; pages asked for again');
  }

  private enqueue(step: () => Promise<void>): void {
    const guarded = async () => {
      if (this.finished) return;
      try {
        await step();
      } catch (err) {
        this.protocolFailure(err);
      }
    };
    // In a dedup group, frames of every member are applied in arrival order.
    if (this.group) void this.group.enqueue(guarded);
    else this.queue = this.queue.then(guarded);
  }

  private async commit(): Promise<void> {
    const standby = this.standby!;
    try {
      // The guest is about to run: no ref may copy from its memory any more.
      for (const slot of this.slots) this.group?.closeSlot(slot);
      for (const region of this.regions) {
        this.native.tmpfileLink(region.fd, this.memoryPath);
        this.native.regionClose(region.handle);
        closeSync(region.fd);
      }
      this.regions = [];
      standby.go();
      const runningAt = await withTimeout(standby.running, 30_000, 'the guest did not start at the destination');
      const record: GuestRecord = {
        name: this.offer.guest.name,
        kind: 'process',
        pid: standby.pid,
        memoryBytes: this.offer.guest.regions[0]!.lengthBytes,
        pageSizeBytes: this.offer.guest.regions[0]!.pageSizeBytes,
        files: this.files,
        spec: specFromHeader(readGuestHeader(this.memoryPath)),
        origin: { kind: 'migrated', migrationId: this.offer.migrationId, from: this.session.peer?.agentId ?? 'unknown' },
        startedAt: new Date().toISOString(),
      };
      this.ctx.registry.add(record);
      this.state = transition(this.state, { type: 'sentCommitted' });
      this.session.send(Frame.committed({ migrationId: this.offer.migrationId, resumeToSendMs: performance.now() - runningAt }));
      this.log.info({ pid: standby.pid }, 'guest resumed here; migration committed');
      this.finish('committed');
    } catch (err) {
      // The guest did not start: the source must keep it. Remove what we made.
      const error = err instanceof GangwayError ? err : new GangwayError(ErrorCode.GUEST_FAILED, String(err));
      this.log.error({ err: error.message }, 'commit failed; the source keeps the guest');
      if (this.session.isOpen) {
        this.session.send(Frame.abort({ migrationId: this.offer.migrationId, code: ErrorCode.GUEST_FAILED, message: error.message.slice(0, 1024) }));
      }
      try {
        if (standby.pid > 0) process.kill(standby.pid, 'SIGKILL');
      } catch {}
      rmSync(this.memoryPath, { force: true });
      this.finish('aborted', error.message);
    }
  }

  private protocolFailure(err: unknown): void {
    const error =
      err instanceof GangwayError ? err : new ProtocolError(ErrorCode.PROTOCOL, err instanceof Error ? err.message : String(err));
    this.log.warn({ code: error.code, err: error.message }, 'migration failed on a bad frame');
    this.finish('aborted', error.message);
    this.session.fail(error);
  }

  onSessionClosed(err: GangwayError): void {
    if (!this.finished) this.finish('aborted', `session lost: ${err.message}`);
  }

  private finish(outcome: 'committed' | 'aborted', reason?: string): void {
    if (this.finished) return;
    this.finished = true;
    this.session.unregister(this.offer.migrationId);
    if (outcome === 'aborted') {
      this.log.warn({ reason }, 'incoming migration aborted; partial memory discarded');
      this.cleanup();
    }
    this.resolveDone({
      migrationId: this.offer.migrationId,
      guest: this.offer.guest.name,
      from: this.session.peer?.agentId ?? 'unknown',
      outcome,
      ...(reason ? { reason } : {}),
      pages: this.pagesReceived,
      rounds: this.roundsSeen,
    });
  }

  /** Drops everything this migration made: the unnamed files vanish with their last fd. */
  private cleanup(): void {
    // A group member's memory stays for refs already on their way; the group frees it.
    if (this.group) this.regions = [];
    for (const region of this.regions) {
      try {
        this.native.regionClose(region.handle);
      } catch {}
      try {
        closeSync(region.fd);
      } catch {}
    }
    this.regions = [];
    this.standby?.cancel();
    this.ctx.registry.release(this.offer.guest.name);
  }
}

async function withTimeout<T>(promise: Promise<T>, timeoutMs: number, message: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new GangwayError(ErrorCode.TIMEOUT, `${message} within ${timeoutMs} ms`)), timeoutMs);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}
