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

export interface DestinationContext {
  registry: GuestRegistry;
  memoryDir: string;
  creditBytes: number;
  maxPayloadBytes: number;
  log: Logger;
  /** Is the agent taking new migrations? */
  accepting: () => boolean;
  metrics?: AgentMetrics;
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
          this.native.regionScatter(region.handle, pages.entries, pages.entries.length / 3, raw);
          this.pagesReceived += counts.dataPages + counts.zeroPages;
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
          this.session.send(Frame.verified({ migrationId: this.offer.migrationId, match, digests }));
          this.state = transition(this.state, { type: match ? 'sentVerified' : 'sentVerifiedMismatch' });
          if (!match) this.finish('aborted', 'memory digests differ');
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

  private enqueue(step: () => Promise<void>): void {
    this.queue = this.queue.then(async () => {
      if (this.finished) return;
      try {
        await step();
      } catch (err) {
        this.protocolFailure(err);
      }
    });
  }

  private async commit(): Promise<void> {
    const standby = this.standby!;
    try {
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
