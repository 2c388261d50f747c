// Post-copy at the destination: the switchover (the pages the source says are missing here
// become holes, the guest starts on its files and hands over a userfaultfd per region), the
// pages installed where they are still missing, and post-copy's end (every page here, the
// memory received checked against the source's digests, the verdict sent and kept). A broken
// link does not end it: the guest waits on its faults while the source has the reattach
// window to come back. Each region's faults and installs are a PostcopyReceiver
// (postcopy-destination.ts).
import { closeSync } from 'node:fs';
import { dirname } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import { ErrorCode, GangwayError, ProtocolError } from '../../protocol/errors.js';
import { Frame, type FrameOf } from '../../protocol/index.js';
import type { MigrationEvent } from '../../protocol/migration-state.js';
import type { StandbyGuest } from '../guest/adapter.js';
import type { AgentMetrics } from '../metrics.js';
import type { NativeAddon } from '../native.js';
import type { PeerSession } from '../peer/session.js';
import { runsPageCount } from '../tracker/page-set.js';
import { sameDigests } from './digests.js';
import { fingerprintsPathOf, withTimeout, type IncomingRegion } from './destination-types.js';
import { PostcopyReceiver, type PostcopyStats, type RegionReceiver } from './postcopy-destination.js';
import type { PostcopyDisk } from './postcopy-disk.js';
import type { PostcopyInstall } from './incoming-pages.js';
import { LatencySamples, sendMissing } from './postcopy.js';
import { faultCrash } from './faults.js';
import { debugSched, schedSince } from './sched-sample.js';

/** How long a guest waits for a source that went away, or for room in a full memory directory, without a setting. */
const DEFAULT_REATTACH_WINDOW_MS = 10 * 60_000;
/** How long the guest may take to hand over its memory, from the switch (or from its start, for a kind that sends it then). */
const HANDOVER_TIMEOUT_MS = 30_000;
const HANDOVER_AT_START_TIMEOUT_MS = 60_000;

/** A memory region's userfaultfd, as the guest's shim sent it. */
type UffdHandover = Awaited<ReturnType<NativeAddon['uffdReceive']>>;
/** Retries of a frame the full memory directory refused: the first after this, then doubling up to the max. */
const NO_SPACE_FIRST_DELAY_MS = 100;
const NO_SPACE_MAX_DELAY_MS = 2_000;

/** What post-copy at the destination needs of the migration. */
export interface DestinationPostcopyContext {
  readonly migrationId: string;
  readonly native: NativeAddon;
  readonly log: Logger;
  readonly metrics: AgentMetrics | undefined;
  /** How long to wait for the source to come back after the session broke. */
  readonly reattachWindowMs: number | undefined;
  /** Where each region's file is named when the guest starts on it. */
  readonly memoryPaths: readonly string[];
  /** The guest's regions as this side holds them. */
  regions(): readonly IncomingRegion[];
  /** The session the source sends on now (a reattach replaces it). */
  session(): PeerSession;
  /** Steps the migration's state machine (an out-of-order step is an error). */
  transition(event: MigrationEvent): void;
  finished(): boolean;
  /** Journals the guest as running here (its record), with the pages it lacks while post-copy lasts. */
  journal(incoming?: { migrationId: string; missingPages: number }): void;
  /** Region `index` is a disk the guest reaches through this agent's export: its receiver. */
  disk(index: number): PostcopyDisk | undefined;
  /** Region `index`'s file got its name (a disk is removed again if the guest then fails to start). */
  linked(index: number): void;
  /**
   * Every missing block of the disks is here and the memory checked: the disks go to stable
   * storage and the guest is switched to its files (the agent leaves its I/O path).
   */
  disksComplete(): Promise<void>;
  /** Hands the standby guest its device state, before it may run. */
  loadDeviceState(standby: StandbyGuest): Promise<void>;
  finish(outcome: 'committed' | 'stranded', reason?: string): void;
  /** The guest did not start here: tells the source, which keeps it, and removes what was made here. */
  startFailed(err: unknown, journaled: boolean, message: string): void;
}

export class DestinationPostcopy implements PostcopyInstall {
  /** The agent's end of the socket the guest sends its userfaultfd over. */
  private uffdSocket = -1;
  /** The guest's userfaultfds (one per memory region), being received or received, until the start attaches them. */
  private handover: Promise<UffdHandover[]> | undefined;
  /** The pages of each region the source says are missing here, as its postcopy frames bring them. */
  private missingIn: MissingRuns[] | undefined;
  /** A receiver per region, once the guest started here. */
  private receivers: RegionReceiver[] | undefined;
  private closed = false;
  /** Resolves once the guest's userfaultfd is attached: post-copy pages wait for it. */
  private attachedP: Promise<void> | undefined;
  private started = false;
  private startedAt = 0;
  /** Session broken: waiting for the source to reattach (the guest waits on its faults). */
  private detachedTimer: NodeJS.Timeout | undefined;
  /** Post-copy's end, once a verify came (a second verify after a reattach joins it). */
  private finishing: Promise<void> | undefined;
  /** The verdict, once sent (a source that reconnects may ask for it again). */
  private sentVerdict: FrameOf<'verified'> | undefined;

  constructor(private readonly ctx: DestinationPostcopyContext) {}

  /** Resolves once the guest's userfaultfds are attached; undefined before the switchover. */
  get attached(): Promise<void> | undefined {
    return this.attachedP;
  }

  /** The region receivers are there and take pages: from the attach on, until the start failed or post-copy closed. */
  get receiving(): boolean {
    return this.receivers !== undefined && !this.closed;
  }

  /** The guest started here on post-copy. */
  get guestStartedHere(): boolean {
    return this.started;
  }

  /** The guest runs here and its receivers wait on the source: a broken link waits for a reattach. */
  get underway(): boolean {
    return this.receivers !== undefined && this.started;
  }

  /** Pages still missing here (undefined before the guest started here). */
  get missingPages(): number | undefined {
    return this.receivers?.reduce((sum, receiver) => sum + receiver.missingPages, 0);
  }

  get verdict(): FrameOf<'verified'> | undefined {
    return this.sentVerdict;
  }

  /**
   * A socket pair for the guest's userfaultfds: returns the guest's end (the caller closes
   * it once the standby guest has it); this side keeps the other.
   */
  guestSocket(): number {
    const [agentEnd, guestEnd] = this.ctx.native.socketPair();
    this.uffdSocket = agentEnd;
    return guestEnd;
  }

  /**
   * Receives the guest's userfaultfds now rather than at the switch, for a standby that
   * sends them as it starts (QEMU). Received at the switch, on the thread pool beside the
   * final round's work, they came 2-22 ms after the switch frame, and the device state's
   * load, whose first touch of the guest's RAM faults, waited on them inside the downtime.
   */
  receiveHandoverNow(): void {
    this.handover ??= this.receiveHandover(HANDOVER_AT_START_TIMEOUT_MS);
    this.handover.catch(() => {});
  }

  /** The userfaultfd of each memory region (a disk has none), as the guest's shim sends them. */
  private async receiveHandover(timeoutMs: number): Promise<UffdHandover[]> {
    const { ctx } = this;
    const expected = ctx.regions().filter((_, index) => !ctx.disk(index)).length;
    const got: UffdHandover[] = [];
    try {
      while (got.length < expected) {
        got.push(
          await ctx.native.uffdReceive(this.uffdSocket, timeoutMs).catch((err: Error) => {
            throw new GangwayError(ErrorCode.GUEST_FAILED, `the guest did not hand over its memory for post-copy (${got.length} of ${expected} regions): ${err.message}`);
          }),
        );
      }
    } catch (err) {
      for (const handover of got) closeSync(handover.uffd);
      throw err;
    }
    return got;
  }

  /** A postcopy frame: pages of `region` the guest lacks here. */
  addMissing(frame: FrameOf<'postcopy'>): void {
    this.missingIn ??= this.ctx.regions().map((r, index) => new MissingRuns(index, r.pageCount));
    this.missingIn[frame.region]!.add(frame.missing);
  }

  /**
   * Installs a pages frame's entries into region `region` where they are still missing. A
   * frame that was still decompressing when post-copy ended is dropped: its receiver (and
   * the guest's userfaultfd it held) is gone, and the session it came on serves others.
   */
  async install(region: number, entries: Uint32Array, raw: Uint8Array): Promise<void> {
    let waitedMs = 0;
    let delayMs = NO_SPACE_FIRST_DELAY_MS;
    for (;;) {
      if (!this.receiving) return;
      try {
        this.receivers![region]!.install(entries, raw);
        if (waitedMs > 0) this.ctx.log.warn({ region, waitedMs }, 'post-copy: the memory directory has room again; pages are installed');
        return;
      } catch (err) {
        // The memory directory is full (its tmpfs: UFFDIO_COPY allocates the page there). The
        // guest keeps waiting on those pages and nothing is lost: the frame is held, its credit
        // with it (the source stops sending), and it is tried again once there is room, for as
        // long as a source that went away would be waited for. Pages installed before the
        // failure are found present on the retry and left as they are.
        const code = (err as NodeJS.ErrnoException).code;
        if (code !== 'ENOMEM' && code !== 'ENOSPC') throw err;
        const windowMs = this.ctx.reattachWindowMs ?? DEFAULT_REATTACH_WINDOW_MS;
        if (waitedMs >= windowMs) {
          throw new GangwayError(
            ErrorCode.POSTCOPY_INTERRUPTED,
            `post-copy: the memory directory (${dirname(this.ctx.memoryPaths[region] ?? this.ctx.memoryPaths[0]!)}) stayed full for ${Math.round(waitedMs / 1000)} s: ${(err as Error).message}; free space there, the guest waits on its missing pages`,
          );
        }
        if (waitedMs === 0) this.ctx.log.error({ region, err: (err as Error).message, waitForMs: windowMs }, 'post-copy: the memory directory is full; pages wait for room (the guest waits on them)');
        await sleep(delayMs);
        waitedMs += delayMs;
        delayMs = Math.min(delayMs * 2, NO_SPACE_MAX_DELAY_MS);
      }
    }
  }

  /**
   * The post-copy switchover: the missing pages become holes, the guest starts on the file
   * with its mapping registered for missing-page faults, and its userfaultfd comes here.
   * Once it runs, `committed` tells the source: from then on the guest is this host's, and
   * the source sends what is missing (faulted pages first).
   */
  async start(standby: StandbyGuest): Promise<void> {
    const { ctx } = this;
    const t: Record<string, number> = { start: performance.now() };
    const sched = debugSched(ctx.log);
    const missing = ctx.regions().map((_, i) => this.missingIn?.[i]?.runs() ?? new Uint32Array(0));
    this.missingIn = undefined;
    t.missing = performance.now();
    let journaled = false;
    const latency = new LatencySamples();
    const receivers: RegionReceiver[] = ctx.regions().map((region, index) => {
      const sendFetch = (runs: Uint32Array) => {
        const session = ctx.session();
        if (session.isOpen) session.send(Frame.fetch({ migrationId: ctx.migrationId, region: index, runs }));
      };
      const disk = ctx.disk(index);
      if (disk) {
        // The guest's requests on its disk wait for missing blocks from here on.
        disk.start(missing[index]!, sendFetch, latency);
        return disk;
      }
      // The guest died during post-copy: nothing is left to receive.
      return new PostcopyReceiver(region, missing[index]!, sendFetch, () => ctx.finish('stranded', 'the guest exited during post-copy'), ctx.log, ctx.metrics, latency);
    });
    t.receivers = performance.now();
    try {
      for (const [index, region] of ctx.regions().entries()) {
        ctx.native.punchHoles(region.fd, missing[index]!, region.pageSizeBytes);
        ctx.native.tmpfileLink(region.fd, ctx.memoryPaths[index]!);
        if (region.fingerprintsFd !== undefined) ctx.native.tmpfileLink(region.fingerprintsFd, fingerprintsPathOf(ctx.memoryPaths[index]!));
        ctx.linked(index);
      }
      t.linked = performance.now();
      faultCrash('dest-after-link', ctx.log);
      let attached!: () => void;
      this.attachedP = new Promise((resolve) => (attached = resolve));
      this.startedAt = performance.now();
      ctx.journal({ migrationId: ctx.migrationId, missingPages: missing.reduce((sum, runs) => sum + runsPageCount(runs), 0) });
      journaled = true;
      t.journaled = performance.now();
      // The guest's shim sends a userfaultfd for each region as it maps it: a process guest
      // after go(), QEMU when it starts (before its device state loads, which may touch RAM
      // and fault). So faults are served from the moment each one arrives.
      const handedOver = (async () => {
        const handover = this.handover ?? this.receiveHandover(HANDOVER_TIMEOUT_MS);
        this.handover = undefined;
        const all = await handover;
        for (const [at, got] of all.entries()) {
          const receiver = receivers[got.region];
          const region = ctx.regions()[got.region];
          if (!(receiver instanceof PostcopyReceiver) || !region || receiver.attached || got.length !== region.lengthBytes) {
            for (const unused of all.slice(at)) closeSync(unused.uffd);
            throw new GangwayError(
              ErrorCode.GUEST_FAILED,
              `the guest registered ${got.length} bytes of region ${got.region} for post-copy; its ${receivers.length} regions are ${ctx.regions().map((r) => r.lengthBytes).join(', ')} bytes${receiver?.attached ? ' (that region twice)' : ''}`,
            );
          }
          receiver.attach(got.uffd, got.start);
        }
        t.uffd = performance.now();
        closeSync(this.uffdSocket);
        this.uffdSocket = -1;
        this.receivers = receivers;
        attached();
      })();
      handedOver.catch(() => {});
      await ctx.loadDeviceState(standby);
      t.loaded = performance.now();
      standby.go();
      await handedOver;
      const runningAt = await withTimeout(standby.running, 30_000, 'the guest did not start at the destination');
      t.running = runningAt;
      ctx.log.debug({ ...Object.fromEntries(Object.entries(t).map(([k, v]) => [k, Math.round((v - t.start!) * 100) / 100])), ...schedSince(sched), atMs: performance.timeOrigin + t.start! }, 'post-copy start: ms after the switch frame');
      this.started = true;
      ctx.transition({ type: 'sentPostcopyRunning' });
      ctx.session().send(Frame.committed({ migrationId: ctx.migrationId, resumeToSendMs: performance.now() - runningAt }));
      ctx.log.info({ pid: standby.pid, missingPages: this.missingPages }, 'guest resumed here (post-copy); missing pages follow');
    } catch (err) {
      for (const receiver of receivers) receiver.close();
      this.receivers = undefined;
      ctx.startFailed(err, journaled, 'post-copy start failed; the source keeps the guest');
    }
  }

  /**
   * An agent restarted during post-copy took the guest's userfaultfds back (postcopy-takeover.ts):
   * `receivers` serve the guest from now on, and the source is given the reattach window
   * to come back, as after a broken link (`why`).
   */
  adopt(receivers: RegionReceiver[], why: GangwayError): void {
    this.receivers = receivers;
    this.attachedP = Promise.resolve();
    this.started = true;
    this.startedAt = performance.now();
    this.detach(why);
  }

  /** The source's verify: post-copy ends once every missing page is here (a second verify joins the first). */
  verify(sourceDigests: readonly Uint8Array[]): void {
    this.finishing ??= this.complete(sourceDigests).catch((err: unknown) => {
      // The guest runs here on what arrived; without a verdict the source keeps its copy.
      this.ctx.log.error({ err: (err as Error).message }, 'post-copy could not reach its verdict');
      this.ctx.finish('stranded', `post-copy could not check the memory it received: ${(err as Error).message}`);
    });
  }

  /** Post-copy's end: every missing page installed, the received memory checked against the source's digests. */
  private async complete(sourceDigests: readonly Uint8Array[]): Promise<void> {
    const { ctx } = this;
    const receivers = this.receivers!;
    await Promise.all(receivers.map((receiver) => receiver.whenComplete()));
    if (ctx.finished()) return;
    // The fingerprints kept are those of the pages as they arrived, whatever the guest has
    // written since: together they are the memory as it was at the switchover.
    const digests = await Promise.all(ctx.regions().map((region) => ctx.native.regionDigest(region.handle, 'tracked')));
    const match = sameDigests(digests, sourceDigests);
    // The source drops its copy on a matching verdict: the disks here must be durable first.
    if (match) await ctx.disksComplete();
    const stats = combinedStats(receivers);
    this.sentVerdict = Frame.verified({
      migrationId: ctx.migrationId,
      match,
      digests,
      postcopy: {
        missingPages: stats.missingPages,
        faults: stats.faults,
        fetchedPages: stats.fetchedPages,
        pushedPages: stats.pushedPages,
        faultP50Ms: stats.faultLatency.p50Ms,
        faultP99Ms: stats.faultLatency.p99Ms,
        faultMaxMs: stats.faultLatency.maxMs,
      },
    });
    const session = ctx.session();
    if (session.isOpen) session.send(this.sentVerdict);
    ctx.transition({ type: match ? 'sentVerified' : 'sentVerifiedMismatch' });
    ctx.metrics?.postcopyDuration.observe((performance.now() - this.startedAt) / 1000);
    ctx.log.info({ ...stats, ms: Math.round(performance.now() - this.startedAt), match }, 'post-copy complete');
    if (match) {
      ctx.journal();
      ctx.finish('committed');
    } else {
      const hexOf = (list: readonly Uint8Array[]) => list.map((d) => Buffer.from(d).toString('hex')).join(',');
      ctx.finish(
        'stranded',
        `the guest runs here, but the memory it received differs from the source's at the switchover (digests ${hexOf(digests)} here, ${hexOf(sourceDigests)} there); the source keeps its paused copy`,
      );
    }
  }

  /**
   * The link to the source broke: the guest runs on and waits on its faults (it is not
   * killed), everything stays as it is, and the source is given the reattach window to
   * come back with a new session.
   */
  detach(err: GangwayError): void {
    const windowMs = this.ctx.reattachWindowMs ?? DEFAULT_REATTACH_WINDOW_MS;
    this.ctx.log.warn(
      { err: err.message, missingPages: this.missingPages, reattachWindowMs: windowMs },
      'post-copy: the link to the source broke; the guest waits on its missing pages until the source reattaches',
    );
    clearTimeout(this.detachedTimer);
    this.detachedTimer = setTimeout(() => {
      this.detachedTimer = undefined;
      this.ctx.finish('stranded', `the source did not come back within ${Math.round(windowMs / 1000)} s after the link broke (${err.message})`);
    }, windowMs);
  }

  /** The source is back on `session` (the migration took it): the verdict again, or what is still missing. */
  reattached(session: PeerSession): void {
    clearTimeout(this.detachedTimer);
    this.detachedTimer = undefined;
    this.ctx.log.info({ missingPages: this.missingPages }, 'post-copy: the source reattached; asking again for the missing pages');
    if (this.sentVerdict) {
      session.send(this.sentVerdict);
      return;
    }
    const receivers = this.receivers!;
    sendMissing(session, this.ctx.migrationId, receivers.map((receiver) => receiver.missingRuns()));
    for (const receiver of receivers) receiver.refetch();
  }

  /** Stops waiting for a reattach and reading faults. */
  close(): void {
    this.closed = true;
    clearTimeout(this.detachedTimer);
    const socket = this.uffdSocket;
    this.uffdSocket = -1;
    const closeQuietly = (fd: number) => {
      try {
        closeSync(fd);
      } catch {}
    };
    const closeSocket = () => {
      if (socket >= 0) closeQuietly(socket);
    };
    // A handover received early and never attached (the migration ended before its switch):
    // its descriptors are closed, and the socket once the receive is over (a receive on the
    // thread pool polls it; the standby's end closes with the standby).
    const handover = this.handover;
    this.handover = undefined;
    if (handover) {
      handover.then(
        (all) => {
          for (const unused of all) closeQuietly(unused.uffd);
          closeSocket();
        },
        closeSocket,
      );
    } else {
      closeSocket();
    }
    for (const receiver of this.receivers ?? []) receiver.close();
  }
}

/** The post-copy statistics of a guest's regions together (their receivers share one latency record). */
function combinedStats(receivers: readonly RegionReceiver[]): PostcopyStats {
  const all = receivers.map((receiver) => receiver.stats());
  return {
    missingPages: all.reduce((sum, s) => sum + s.missingPages, 0),
    faults: all.reduce((sum, s) => sum + s.faults, 0),
    fetchedPages: all.reduce((sum, s) => sum + s.fetchedPages, 0),
    pushedPages: all.reduce((sum, s) => sum + s.pushedPages, 0),
    faultLatency: all[0]?.faultLatency ?? { p50Ms: 0, p99Ms: 0, maxMs: 0 },
  };
}

/**
 * A region's missing pages as the source's postcopy frames bring them: runs, ascending across
 * the frames, kept as they came. The switchover then makes no bitmap of them and reads none
 * back (a pass over every page of the guest, inside the downtime).
 */
export class MissingRuns {
  private readonly parts: Uint32Array[] = [];
  private end = 0;

  constructor(
    private readonly region: number,
    private readonly pageCount: number,
  ) {}

  /** A frame's runs (non-empty ones: the codec refuses others); BAD_PAGES past the region or not after the runs before. */
  add(runs: Uint32Array): void {
    let end = this.end;
    for (let i = 0; i + 1 < runs.length; i += 2) {
      const first = runs[i]!;
      const count = runs[i + 1]!;
      if (first + count > this.pageCount) {
        throw new ProtocolError(ErrorCode.BAD_PAGES, `postcopy.missing: pages ${first}..${first + count - 1} are past region ${this.region}'s ${this.pageCount}`);
      }
      if (first < end) {
        throw new ProtocolError(ErrorCode.BAD_PAGES, `postcopy.missing: the run of ${count} pages at ${first} of region ${this.region} is not after the runs before it (they end at ${end})`);
      }
      end = first + count;
    }
    this.end = end;
    // A copy: the frame's runs may be a view of a buffer the session reads into again.
    if (runs.length > 0) this.parts.push(runs.slice());
  }

  /** Every run so far, as one list. */
  runs(): Uint32Array {
    if (this.parts.length === 1) return this.parts[0]!;
    const all = new Uint32Array(this.parts.reduce((sum, part) => sum + part.length, 0));
    let at = 0;
    for (const part of this.parts) {
      all.set(part, at);
      at += part.length;
    }
    return all;
  }
}
