// An agent restarted while a guest it was receiving by post-copy still lacked pages takes
// that migration back. The agent is not the guest's process: the guest ran on, holding its
// userfaultfd (the shim keeps its copy open, and names its number in its report), so its
// faults wait in the kernel's queue rather than reading holes as zeros. The restarted agent
//   - takes the descriptor back from the guest (pidfd_getfd) and reads the faults waiting;
//   - rebuilds which pages are missing from the memory file itself: a page is present
//     exactly when the file holds data there (SEEK_DATA / SEEK_HOLE). The file is a tmpfs
//     file and the guest's mapping is registered for missing faults, so the guest cannot
//     fill a hole itself, and every install (UFFDIO_COPY, and UFFDIO_ZEROPAGE, which on
//     shmem allocates a zeroed page too) puts a page in the file's page cache, which
//     SEEK_DATA sees. So the set is exact: nothing installed is asked for again, nothing
//     missing is taken for present;
//   - maps the fingerprints of the pages as they arrived, kept in a file next to the memory
//     (fingerprintsPathOf; written before each install, so a fingerprint is never older
//     than its page), so the check at post-copy's end still covers the whole memory as
//     received: the guest has written over pages since, their content now proves nothing;
//   - waits for the source, which reconnects within its reattach window and presents the
//     migration's secret (kept in the guest record), and carries on as DestinationPostcopy
//     does after a broken link: what is missing, the faults again, the push, the verdict.
import { closeSync, openSync, readFileSync, readlinkSync, rmSync } from 'node:fs';
import { ErrorCode, GangwayError, ProtocolError } from '../../protocol/errors.js';
import { Frame, type FrameOf } from '../../protocol/index.js';
import { transition, type MigrationEvent, type MigrationState } from '../../protocol/migration-state.js';
import type { GuestRecord, GuestRegistry } from '../guest/registry.js';
import { trackReportPathOf } from '../guest/shim-trackers.js';
import type { Logger } from '../log.js';
import type { AgentMetrics } from '../metrics.js';
import type { NativeAddon } from '../native.js';
import type { AnyFrame, FrameHandler, PeerSession } from '../peer/session.js';
import { parseShimReport } from '../tracker/uffd-wp.js';
import { holesOf } from '../tracker/page-set.js';
import { secretsMatch } from './destination.js';
import { DestinationPostcopy } from './destination-postcopy.js';
import { fingerprintsPathOf, type IncomingRegion, type IncomingResult } from './destination-types.js';
import { Slots } from './flow.js';
import { IncomingPages } from './incoming-pages.js';
import { PostcopyReceiver } from './postcopy-destination.js';
import { LatencySamples } from './postcopy.js';

/** The pages post-copy still has to bring into the memory file `fd`: its holes (see the top of this file for why that is exact). */
export function missingPagesOf(native: Pick<NativeAddon, 'fileDataRuns'>, fd: number, pageSizeBytes: number, pageCount: number): Uint32Array {
  return holesOf(native.fileDataRuns(fd, pageSizeBytes, pageCount), pageCount);
}

export interface TakeoverContext {
  readonly registry: GuestRegistry;
  readonly native: NativeAddon;
  readonly log: Logger;
  readonly metrics: AgentMetrics | undefined;
  readonly creditBytes: number;
  readonly maxPayloadBytes: number;
  /** How long the source has to come back (peers' postcopyReattach). */
  readonly reattachWindowMs: number | undefined;
}

/** LZ4 decompressions at once for a taken-back migration (its source's session is not known yet). */
const TAKEOVER_DECOMPRESSIONS = 2;

/** A post-copy migration into this host that an earlier run of this agent started and did not finish. */
export class TakenBackPostcopy implements FrameHandler {
  private state: MigrationState = { phase: 'postcopyRunning', round: 0 };
  private session: PeerSession | undefined;
  private finished = false;
  private queue: Promise<void> = Promise.resolve();
  private readonly pages: IncomingPages;
  private readonly postcopy: DestinationPostcopy;
  readonly done: Promise<IncomingResult>;
  private resolveDone!: (result: IncomingResult) => void;
  readonly secret: Buffer<ArrayBuffer>;
  /** Taken back after a restart, a post-copy promises no more memoryDir space: its file is as large as it gets. */
  readonly promisedBytes = 0;

  private constructor(
    private readonly record: GuestRecord & { incoming: NonNullable<GuestRecord['incoming']> },
    private regions: IncomingRegion[],
    private readonly ctx: TakeoverContext,
    private readonly log: Logger,
  ) {
    this.secret = Buffer.from(record.incoming.secret!, 'hex');
    const migrationId = record.incoming.migrationId;
    this.postcopy = new DestinationPostcopy({
      migrationId,
      native: ctx.native,
      log,
      metrics: ctx.metrics,
      reattachWindowMs: ctx.reattachWindowMs,
      memoryPaths: record.files.memoryPaths,
      regions: () => this.regions,
      session: () => this.session!,
      transition: (event) => this.step(event),
      finished: () => this.finished,
      journal: (incoming) => this.journal(incoming),
      disk: () => undefined,
      linked: () => {},
      disksComplete: async () => {},
      loadDeviceState: async () => {},
      finish: (outcome, reason) => this.finish(outcome, reason),
      startFailed: (err) => this.finish('stranded', (err as Error).message),
    });
    this.pages = new IncomingPages({
      migrationId,
      creditBytes: ctx.creditBytes,
      maxPayloadBytes: ctx.maxPayloadBytes,
      decompressions: new Slots(TAKEOVER_DECOMPRESSIONS),
      native: ctx.native,
      log,
      postcopy: this.postcopy,
      onCreditLimit: () => {},
      regions: () => this.regions,
      session: () => this.session!,
      finished: () => this.finished,
      group: () => undefined,
      enqueue: (step) => this.enqueue(step),
      fail: (err) => this.protocolFailure(err),
    });
    this.done = new Promise((resolve) => (this.resolveDone = resolve));
  }

  /**
   * Takes back guest `name`'s post-copy (its record says it is still receiving): its
   * userfaultfds, the pages it lacks, the fingerprints of what arrived; then waits for the
   * source. Throws a GangwayError saying what is missing when it cannot (the caller strands
   * the guest with that reason).
   */
  static takeBack(name: string, ctx: TakeoverContext): TakenBackPostcopy {
    const { record } = ctx.registry.get(name);
    const incoming = record.incoming;
    if (!incoming || incoming.stranded) throw new GangwayError(ErrorCode.INTERNAL, `guest ${name} is not receiving by post-copy`);
    const log = ctx.log.child({ migrationId: incoming.migrationId, guest: name });
    if (!incoming.secret) {
      throw new GangwayError(ErrorCode.GUEST_FAILED, "its record keeps no migration secret (an agent older than this one received it), so its source's reattach cannot be checked");
    }
    if (record.files.diskPaths?.length) {
      throw new GangwayError(ErrorCode.GUEST_FAILED, "its disks were served to it by the agent that died (post-copy of disks cannot be taken back)");
    }
    const sizes = record.spec.regionBytes ?? [record.memoryBytes];
    const regions: IncomingRegion[] = [];
    const receivers: PostcopyReceiver[] = [];
    const latency = new LatencySamples();
    let migration: TakenBackPostcopy | undefined;
    try {
      for (const [index, memoryPath] of record.files.memoryPaths.entries()) {
        const lengthBytes = sizes[index];
        if (lengthBytes === undefined) throw new GangwayError(ErrorCode.GUEST_FAILED, `its record names ${record.files.memoryPaths.length} memory files but ${sizes.length} region sizes`);
        regions.push(openRegion(ctx.native, memoryPath, lengthBytes, record.pageSizeBytes));
      }
      migration = new TakenBackPostcopy(record as GuestRecord & { incoming: typeof incoming }, regions, ctx, log);
      const self = migration;
      for (const [index, region] of regions.entries()) {
        const { uffd, start } = takeUffd(ctx.native, record, index, region.lengthBytes);
        const missing = missingPagesOf(ctx.native, region.fd, region.pageSizeBytes, region.pageCount);
        const receiver = new PostcopyReceiver(
          region,
          missing,
          (runs) => {
            // Faults read before the source is back are asked for again when it reattaches (refetch).
            if (self.session?.isOpen) self.session.send(Frame.fetch({ migrationId: incoming.migrationId, region: index, runs }));
          },
          () => self.finish('stranded', 'the guest exited during post-copy'),
          log,
          ctx.metrics,
          latency,
        );
        receivers.push(receiver);
        receiver.attach(uffd, start);
      }
    } catch (err) {
      for (const receiver of receivers) receiver.close();
      for (const region of regions) closeRegion(ctx.native, region);
      throw err instanceof GangwayError ? err : new GangwayError(ErrorCode.GUEST_FAILED, (err as Error).message);
    }
    const missingPages = receivers.reduce((sum, receiver) => sum + receiver.missingPages, 0);
    log.warn({ missingPages, from: incoming.from, pid: record.pid }, "post-copy taken back after this agent's restart: the guest's userfaultfd is here again; waiting for the source to reattach");
    migration.postcopy.adopt(receivers, new GangwayError(ErrorCode.PEER_GONE, 'this agent restarted during post-copy'));
    return migration;
  }

  get from(): string {
    return this.record.incoming.from;
  }

  get missingPages(): number | undefined {
    return this.postcopy.missingPages;
  }

  get verdict(): FrameOf<'verified'> | undefined {
    return this.postcopy.verdict;
  }

  isSource(session: PeerSession, secret: Uint8Array): boolean {
    return session.peerId === this.record.incoming.from && secretsMatch(secret, this.secret);
  }

  /** The source is back (the caller checked isSource): returns why it cannot carry on, or undefined. */
  reattach(session: PeerSession): string | undefined {
    if (this.finished) return `migration ${this.record.incoming.migrationId} is over`;
    this.step({ type: 'reattached' });
    if (this.session?.isOpen) {
      this.session.unregister(this.record.incoming.migrationId);
      this.session.close();
    }
    this.session = session;
    this.pages.restartCredit();
    session.register(this.record.incoming.migrationId, this);
    this.postcopy.reattached(session);
    return undefined;
  }

  onFrame(frame: AnyFrame, wireBytes: number): void {
    if (this.finished) return;
    try {
      this.step(frame as unknown as MigrationEvent);
      switch (frame.type) {
        case 'pages':
          this.pages.receive(frame);
          break;
        case 'verify':
          this.postcopy.verify(frame.digests);
          break;
        case 'abort':
          // The guest runs here on what arrived: the source's abort cannot take it back.
          this.finish('stranded', `the source aborted: ${frame.message}`);
          break;
        default:
          throw new ProtocolError(ErrorCode.UNEXPECTED_FRAME, `frame type ${frame.type} is not expected by a post-copy taken back after a restart`);
      }
    } catch (err) {
      this.protocolFailure(err);
    }
    if (frame.type === 'pages') this.ctx.metrics?.receivedBytes.inc(wireBytes);
  }

  onSessionClosed(err: GangwayError): void {
    if (this.finished) return;
    this.postcopy.detach(err);
  }

  private step(event: MigrationEvent): void {
    this.state = transition(this.state, event);
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

  private protocolFailure(err: unknown): void {
    const error = err instanceof GangwayError ? err : new ProtocolError(ErrorCode.PROTOCOL, err instanceof Error ? err.message : String(err));
    this.log.warn({ code: error.code, err: error.message }, 'taken-back post-copy failed on a bad frame');
    this.finish('stranded', error.message);
    this.session?.fail(error);
  }

  /** The record as post-copy goes on (with what is missing) or once it is over (without). */
  private journal(incoming?: { migrationId: string; missingPages: number }): void {
    const { incoming: _, ...rest } = this.record;
    this.ctx.registry.add(incoming ? { ...rest, incoming: { ...this.record.incoming, ...incoming } } : rest);
  }

  private finish(outcome: IncomingResult['outcome'], reason?: string): void {
    if (this.finished) return;
    this.finished = true;
    this.session?.unregister(this.record.incoming.migrationId);
    const missingPages = this.missingPages ?? 0;
    if (outcome === 'stranded') {
      this.log.error({ reason, missingPages }, 'post-copy did not complete: the guest stays here, paused on its missing pages');
      if (missingPages > 0) {
        try {
          process.kill(this.record.pid, 'SIGSTOP');
        } catch {}
      }
      try {
        const { secret: _, ...incoming } = this.record.incoming;
        this.ctx.registry.add({ ...this.record, incoming: { ...incoming, missingPages, stranded: reason ?? 'unknown' } });
      } catch {}
    }
    this.postcopy.close();
    for (const region of this.regions) closeRegion(this.ctx.native, region);
    this.regions = [];
    // No later restart needs them: post-copy is over, or cannot go on.
    for (const path of this.record.files.memoryPaths) rmSync(fingerprintsPathOf(path), { force: true });
    this.resolveDone({
      migrationId: this.record.incoming.migrationId,
      guest: this.record.name,
      from: this.record.incoming.from,
      outcome,
      ...(reason ? { reason } : {}),
      pages: this.pages.pagesReceived,
      rounds: 0,
      technique: 'postcopy',
    });
  }
}

/** Region `index`'s memory file and fingerprints, mapped as the receiving agent had them. */
function openRegion(native: NativeAddon, memoryPath: string, lengthBytes: number, pageSizeBytes: number): IncomingRegion {
  const fd = openSync(memoryPath, 'r+');
  let fingerprintsFd: number | undefined;
  try {
    fingerprintsFd = openSync(fingerprintsPathOf(memoryPath), 'r+');
    const handle = native.regionMap(fd, lengthBytes, pageSizeBytes, { writable: true, trackHashes: true, initiallyZero: false, fingerprintsFd, keepFingerprints: true });
    return { fd, handle, pageCount: lengthBytes / pageSizeBytes, pageSizeBytes, lengthBytes };
  } catch (err) {
    closeSync(fd);
    const code = (err as NodeJS.ErrnoException).code;
    throw new GangwayError(
      ErrorCode.GUEST_FAILED,
      code === 'ENOENT' ? `the fingerprints of what arrived are gone (${fingerprintsPathOf(memoryPath)}): the memory received cannot be checked` : `cannot map ${memoryPath}: ${(err as Error).message}`,
    );
  } finally {
    // The mapping keeps the fingerprints' file; the descriptor is not needed.
    if (fingerprintsFd !== undefined) closeSync(fingerprintsFd);
  }
}

function closeRegion(native: NativeAddon, region: IncomingRegion): void {
  try {
    native.regionClose(region.handle);
  } catch {}
  try {
    closeSync(region.fd);
  } catch {}
}

/**
 * The guest's userfaultfd for region `index`, taken from the guest: the shim's report says
 * where the region is mapped and which descriptor it keeps the userfaultfd on; the copy is
 * checked to be a userfaultfd, of the guest that wrote the report, for the region's length.
 */
function takeUffd(native: NativeAddon, record: GuestRecord, index: number, lengthBytes: number): { uffd: number; start: number } {
  const reportPath = trackReportPathOf(record.files, index);
  const report = parseShimReport(readFileSync(reportPath, 'utf8'));
  if (report.uffdFd === undefined) throw new GangwayError(ErrorCode.GUEST_FAILED, `the guest's shim report ${reportPath} names no userfaultfd (a shim older than this agent started it)`);
  if (report.pid !== record.pid || report.lengthBytes !== lengthBytes) {
    throw new GangwayError(ErrorCode.GUEST_FAILED, `the shim report ${reportPath} is of pid ${report.pid} and ${report.lengthBytes} bytes; the guest is pid ${record.pid} with ${lengthBytes} bytes in region ${index}`);
  }
  const uffd = native.pidfdGetfd(record.pid, report.uffdFd);
  let what: string;
  try {
    what = readlinkSync(`/proc/self/fd/${uffd}`);
  } catch (err) {
    what = (err as Error).message;
  }
  if (what !== 'anon_inode:[userfaultfd]') {
    closeSync(uffd);
    throw new GangwayError(ErrorCode.GUEST_FAILED, `descriptor ${report.uffdFd} of the guest (pid ${record.pid}) is ${what}, not its userfaultfd`);
  }
  return { uffd, start: Number(report.startAddress) };
}
