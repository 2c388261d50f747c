// The destination side of a migration: receives each region's pages into an unnamed memory
// file (so a crash of this agent leaves nothing behind), checks the source's digests against
// its own, and on commit names the files and starts the guest from the hot-standby process,
// its device state handed over first.
//
// The parts: the offer's checks (admission.ts) and its acceptance, the frames in the order the receive state machine
// allows (protocol/migration-state.ts), verify with repair, the commit and the migration's
// end (here); pages frames (incoming-pages.ts: credit, decompression, scatter, refs); the
// device state (incoming-device-state.ts); the standby guest's start and watch
// (standby-start.ts); post-copy's switchover, installs, verdict and reattach
// (destination-postcopy.ts); the disks that arrive: their flushes, their names and
// post-copy's export of them (destination-disks.ts). What they share is in destination-types.ts.
import { randomBytes, timingSafeEqual } from 'node:crypto';
import { closeSync, rmSync, statfsSync } from 'node:fs';
import { removeGuestFiles } from '../guest/process-guest.js';
import type { Logger } from 'pino';
import { GuestKind, nameOf, RejectReason, Technique } from '../../protocol/codes.js';
import { ErrorCode, GangwayError, ProtocolError } from '../../protocol/errors.js';
import { Frame, type FrameOf } from '../../protocol/index.js';
import { FINGERPRINT_BYTES, MIGRATION_SECRET_BYTES } from '../../protocol/limits.js';
import { initialMigrationState, transition, type MigrationEvent, type MigrationState } from '../../protocol/migration-state.js';
import type { DestinationGroup } from '../dedup/dest-group.js';
import type { GuestLauncher, StandbyGuest } from '../guest/adapter.js';
import type { GuestRecord } from '../guest/registry.js';
import { loadNative, type RegionHandle } from '../native.js';
import type { AnyFrame, FrameHandler, OfferFrame, PeerSession } from '../peer/session.js';
import { admitOffer, spaceShortfall } from './admission.js';
import { DestinationDisks } from './destination-disks.js';
import { DestinationPostcopy } from './destination-postcopy.js';
import { fingerprintsPathOf, withTimeout, type DestinationContext, type IncomingRegion, type IncomingResult } from './destination-types.js';
import { digestsHere, MAX_REPAIRS, sameDigests, sendPageFingerprints } from './digests.js';
import { faultCrash, faultDelay } from './faults.js';
import { IncomingDeviceState } from './incoming-device-state.js';
import { IncomingChannels } from './incoming-channels.js';
import type { Channel, ChannelHelloIn } from '../peer/channel.js';
import { IncomingPages } from './incoming-pages.js';
import { closeQuietly, closeRegions, filesToName, openIncomingRegions } from './incoming-regions.js';
import { debugSched, schedSince, type DebugSample } from './sched-sample.js';
import { startStandby } from './standby-start.js';

export type { DestinationContext, IncomingResult } from './destination-types.js';

/** A presented migration secret against the one handed out, in constant time. */
export function secretsMatch(presented: Uint8Array, expected: Uint8Array): boolean {
  return presented.length === expected.length && timingSafeEqual(presented, expected);
}


export class DestinationMigration implements FrameHandler {
  private state: MigrationState = initialMigrationState();
  private readonly native = loadNative();
  private queue: Promise<void> = Promise.resolve();
  private regions: IncomingRegion[] = [];
  private standby: StandbyGuest | undefined;
  private finished = false;
  /** The switchover began here (the guest's device state is loading or it is starting): its standby's exit is the switchover's to handle. */
  private switching = false;
  private roundsSeen = 0;
  private readonly files;
  /** Where region i's file is named at the commit: memory files, then the disks that arrive. */
  private readonly regionPaths: string[];
  /** Regions that are disks. */
  private readonly diskRegions: Set<number>;
  /** The disks that arrive: their flushes, their names and post-copy's export of them. */
  private readonly disks: DestinationDisks;
  /** The dedup group this migration belongs to (its frames are applied in the group's order). */
  private group: DestinationGroup | undefined;
  /** This migration's slots in the group, region by region. */
  private slots: number[] = [];
  private repairs = 0;
  /** Post-copy at this side, for a post-copy or hybrid migration. */
  private readonly postcopy: DestinationPostcopy | undefined;
  /** The source's commit arrived: the guest starts here, whatever becomes of the session. */
  private commitReceived = false;
  private pauseFrameAt = 0;
  private pauseFrameSched: DebugSample | undefined;
  /** The source agent (a reattaching session must come from it). */
  private readonly sourceAgentId: string;
  /** Handed to the source in the accept: a reattach must present it (the daemon keeps it with a post-copy's verdict). */
  readonly secret = randomBytes(MIGRATION_SECRET_BYTES);
  /** The source's channels: pre-copy pages off the session (peer/channel.ts). */
  private readonly channels: IncomingChannels;
  /** The guest's device state as its chunks arrive. */
  private readonly deviceState: IncomingDeviceState;
  /** Applies the pages frames (or hands them to post-copy's installs). */
  private readonly pages: IncomingPages;
  readonly done: Promise<IncomingResult>;
  private resolveDone!: (result: IncomingResult) => void;

  private constructor(
    private readonly offer: OfferFrame,
    private session: PeerSession,
    private readonly ctx: DestinationContext,
    private readonly launcher: GuestLauncher,
    private readonly log: Logger,
  ) {
    this.sourceAgentId = session.peer?.agentId ?? 'unknown';
    // Regions are memory (files of memoryDir) and, for a kind with disks, the disks that move.
    const disks = launcher.disks?.(offer.guest) ?? [];
    const diskRegions = new Map(disks.flatMap((disk) => (disk.region === undefined ? [] : [[disk.region, disk.path] as const])));
    const memoryFiles = ctx.registry.filesFor(offer.guest.name, ctx.memoryDir, randomBytes(4).toString('hex'), offer.guest.regions.length - diskRegions.size, launcher.kind);
    this.files = disks.length ? { ...memoryFiles, diskPaths: disks.map((disk) => disk.path) } : memoryFiles;
    let memoryIndex = 0;
    this.regionPaths = offer.guest.regions.map((_, i) => diskRegions.get(i) ?? memoryFiles.memoryPaths[memoryIndex++]!);
    this.diskRegions = new Set(diskRegions.keys());
    this.disks = new DestinationDisks({
      native: this.native,
      log,
      metrics: ctx.metrics,
      diskPaths: diskRegions,
      regionNames: offer.guest.regions.map((region) => region.name),
      exportSocket: launcher.diskExportSocket ? () => launcher.diskExportSocket!(this.files) : undefined,
      regions: () => this.regions,
      hostedGuest: () => ctx.registry.get(offer.guest.name).guest,
      guestExited: () => this.standby!.exited,
    });
    this.deviceState = new IncomingDeviceState(launcher, this.files, ctx.maxDeviceStateBytes, () => ctx.onLimit?.('device-state'));
    this.channels = new IncomingChannels({
      migrationId: offer.migrationId,
      secretMatches: (presented) => secretsMatch(presented, this.secret),
      peerSha256: () => this.session.peerCertificateSha256,
      // A disk's blocks and post-copy's pages are the session's to carry.
      refusal: () =>
        this.finished || this.switching || this.commitReceived
          ? `migration ${offer.migrationId} takes no more pages`
          : this.offer.technique !== Technique.precopy || this.diskRegions.size > 0
            ? `migration ${offer.migrationId} is not a pre-copy of memory only`
            : undefined,
      regions: () => this.regions.map((region) => region.handle),
      fail: (err) => this.protocolFailure(err),
    });
    this.postcopy =
      offer.technique === Technique.precopy
        ? undefined
        : new DestinationPostcopy({
            migrationId: offer.migrationId,
            native: this.native,
            log,
            metrics: ctx.metrics,
            reattachWindowMs: ctx.reattachWindowMs,
            memoryPaths: this.regionPaths,
            regions: () => this.regions,
            session: () => this.session,
            transition: (event) => (this.state = transition(this.state, event)),
            finished: () => this.finished,
            journal: (incoming) => ctx.registry.add(this.guestRecord(this.standby!.pid, incoming)),
            loadDeviceState: (standby) => this.deviceState.load(standby),
            disk: (index) => this.disks.exportOf(index),
            linked: (index) => this.disks.linked(index),
            disksComplete: () => this.disks.complete(),
            finish: (outcome, reason) => this.finish(outcome, reason),
            startFailed: (err, journaled, message) => this.startFailed(err, journaled, message),
          });
    this.pages = new IncomingPages({
      migrationId: offer.migrationId,
      creditBytes: ctx.creditBytes,
      maxPayloadBytes: ctx.maxPayloadBytes,
      decompressions: ctx.decompressions,
      native: this.native,
      log,
      postcopy: this.postcopy,
      onCreditLimit: () => ctx.onLimit?.('credit'),
      regions: () => this.regions,
      session: () => this.session,
      finished: () => this.finished,
      group: () => this.group,
      enqueue: (step) => this.enqueue(step),
      fail: (err) => this.protocolFailure(err),
    });
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
    const admission = admitOffer(offer, ctx, log);
    if (!admission.admitted) return reject(admission.reason, admission.message);
    const { launcher, group } = admission;
    const migration = new DestinationMigration(offer, session, ctx, launcher, log);
    try {
      const stats = statfsSync(ctx.memoryDir);
      const short = spaceShortfall(stats.bavail * stats.bsize, migration.spaceBytes, ctx.space);
      if (short) {
        ctx.registry.release(offer.guest.name);
        ctx.onLimit?.('space');
        return reject(RejectReason.noSpace, short);
      }
      migration.prepare();
    } catch (err) {
      void migration.cleanup();
      return reject(RejectReason.noSpace, `cannot prepare the guest's memory: ${(err as Error).message}`);
    }
    if (group && offer.dedup) {
      try {
        migration.joinGroup(group, offer.dedup.slots);
      } catch (err) {
        void migration.cleanup();
        return reject(RejectReason.badSpec, (err as Error).message);
      }
    }
    session.register(offer.migrationId, migration);
    migration.state = transition(migration.state, { type: 'sentAccept' });
    session.send(Frame.accept({ migrationId: offer.migrationId, creditBytes: ctx.creditBytes, secret: migration.secret }));
    log.info({ memoryBytes: migration.spaceBytes, regions: offer.guest.regions.length }, 'migration accepted');
    return migration;
  }

  /** The bytes of memoryDir this guest's memory takes (its disks are elsewhere, and sparse). */
  get spaceBytes(): number {
    return this.offer.guest.regions.reduce((sum, region, i) => sum + (this.diskRegions.has(i) ? 0 : region.lengthBytes), 0);
  }

  /**
   * The bytes of memoryDir this migration may still take beyond what it holds already: a
   * pure post-copy's file is sparse and fills as pages come (the rest allocate at once).
   */
  get promisedBytes(): number {
    return this.offer.technique === Technique.postcopy && !this.finished ? this.spaceBytes : 0;
  }

  /** The agent the migration came from (its certificate's under TLS). */
  get from(): string {
    return this.sourceAgentId;
  }

  /** Post-copy: pages still missing here (undefined before the guest started here). */
  get missingPages(): number | undefined {
    return this.postcopy?.missingPages;
  }

  /** The post-copy verdict, once sent (a source that reconnects may ask for it again). */
  get verdict(): FrameOf<'verified'> | undefined {
    return this.postcopy?.verdict;
  }

  private get guestStartedHere(): boolean {
    return this.postcopy?.guestStartedHere ?? false;
  }

  private get technique(): 'precopy' | 'postcopy' | 'hybrid' {
    return this.offer.technique === Technique.postcopy ? 'postcopy' : this.offer.technique === Technique.hybrid ? 'hybrid' : 'precopy';
  }

  private prepare(): void {
    this.regions = openIncomingRegions(this.native, {
      specs: this.offer.guest.regions,
      paths: this.regionPaths,
      disks: this.diskRegions,
      memoryDir: this.ctx.memoryDir,
      holesAreMissing: this.offer.technique === Technique.postcopy,
      keepFingerprints: this.postcopy !== undefined,
    });
    // The files the switchover will name, noted before any can be (see arrival-note.ts).
    this.ctx.registry.noteArrival(this.offer.guest.name, filesToName(this.regions, this.regionPaths));
    // A guest started now and blocked until go() makes the resume one step.
    this.standby = startStandby({
      offer: this.offer,
      files: this.files,
      launcher: this.launcher,
      regions: this.regions,
      postcopy: this.postcopy,
      disks: this.disks,
      session: () => this.session,
      log: this.log,
      finished: () => this.finished,
      switching: () => this.switching,
      refuse: (code, message) => this.refuse(code, message),
    });
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
      case 'pages':
        this.pages.receive(frame);
        return;
      case 'roundEnd':
        this.roundsSeen++;
        // The disks' blocks go to stable storage between rounds, so the commit's flush has
        // little left; not after the final round, inside the downtime, where it would compete
        // with the switchover's own work (the commit flushes once the guest runs here).
        if (!frame.final && this.regions.some((region) => region.disk)) this.disks.flush().catch(() => {});
        return;
      case 'pause':
        this.pauseFrameAt = performance.now();
        this.pauseFrameSched = debugSched(this.log);
        // The source's rounds on channels are over (each ended with its barrier).
        this.channels.close();
        return;
      case 'deviceState': {
        const refusal = this.deviceState.receive(frame);
        if (refusal) this.refuse(refusal.code, refusal.message);
        // Loaded as soon as it is all here, after the pages before it: the check's answer
        // then waits for no load when the source's digest of its memory is the longer step.
        else if (this.launcher.loadsDeviceStateBeforeCheck && this.technique === 'precopy' && this.deviceState.complete) {
          this.enqueue(async () => {
            await this.loadBeforeCheck();
          });
        }
        return;
      }
      case 'postcopy': {
        const postcopy = this.postcopy;
        const region = this.regions[frame.region];
        if (!region || !postcopy) {
          throw new ProtocolError(ErrorCode.UNEXPECTED_FRAME, `postcopy for region ${frame.region} of a ${this.technique} migration`);
        }
        postcopy.addMissing(frame);
        if (!frame.more) {
          const switchFrameAt = performance.now();
          this.log.debug({ switchFrame: switchFrameAt - this.pauseFrameAt, ...schedSince(this.pauseFrameSched), atMs: performance.timeOrigin + this.pauseFrameAt }, 'post-copy switch frame: ms after the pause frame');
          this.deviceState.checkComplete();
          this.switching = true;
          this.enqueue(() => postcopy.start(this.standby!));
        }
        return;
      }
      case 'verify': {
        const verify = frame;
        if (this.postcopy?.receiving) {
          this.postcopy.verify(verify.digests);
          return;
        }
        this.deviceState.checkComplete();
        this.enqueue(async () => {
          // A kind that loads its device state before the check has it loaded by now (begun
          // once it arrived, after every page before it, as QEMU's own migration loads RAM,
          // then devices): a state it refuses refuses the migration while the source still
          // owns the guest.
          const verifyStart = performance.now();
          if (this.launcher.loadsDeviceStateBeforeCheck && !(await this.loadBeforeCheck())) return;
          const loadedAt = performance.now();
          // The fingerprints of the pages as this agent wrote them, kept as it wrote them:
          // the source's digest reads its paused memory whole (it trusts no dirty tracker),
          // and this one costs no read of the memory inside the downtime.
          const digests = await digestsHere(this.native, this.regions);
          this.log.debug({ deviceStateLoadMs: Math.round((loadedAt - verifyStart) * 100) / 100, digestMs: Math.round((performance.now() - loadedAt) * 100) / 100 }, 'verify: ms');
          const match = sameDigests(digests, verify.digests);
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
          sendPageFingerprints(this.native, this.session, this.offer.migrationId, this.regions);
        });
        return;
      }
      case 'commit':
        this.commitReceived = true;
        this.enqueue(() => this.commit());
        return;
      case 'abort': {
        const abort = frame;
        this.finish('aborted', `the source aborted: ${abort.message}`, abort.code);
        return;
      }
      default:
        throw new ProtocolError(ErrorCode.UNEXPECTED_FRAME, `frame type ${frame.type} is not expected by a destination`);
    }
  }

  /** The device state's load before the check (GuestLauncher.loadsDeviceStateBeforeCheck): false once it failed. */
  private deviceStateLoaded: Promise<boolean> | undefined;

  /** Loads the device state into the standby guest, once; a state it refuses refuses the migration. */
  private loadBeforeCheck(): Promise<boolean> {
    this.deviceStateLoaded ??= (async () => {
      this.switching = true;
      try {
        await this.deviceState.load(this.standby!);
        return true;
      } catch (err) {
        this.log.error({ err: (err as Error).message, log: this.files.logPath }, "the guest's device state did not load");
        this.refuse(ErrorCode.GUEST_FAILED, `the destination could not load the guest's device state: ${(err as Error).message}`);
        return false;
      }
    })();
    return this.deviceStateLoaded;
  }

  /** Ends this migration before its guest ran here, telling the source why (its guest runs on there). */
  private refuse(code: ErrorCode, message: string): void {
    this.log.warn({ code, reason: message }, 'incoming migration refused');
    if (this.session.isOpen) this.session.send(Frame.abort({ migrationId: this.offer.migrationId, code, message }));
    this.finish('aborted', message);
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

  private guestRecord(pid: number, incoming?: { migrationId: string; missingPages: number }): GuestRecord {
    return {
      name: this.offer.guest.name,
      pid,
      memoryBytes: this.spaceBytes,
      pageSizeBytes: this.offer.guest.regions[0]!.pageSizeBytes,
      files: this.files,
      ...this.launcher.recordPart(this.files, this.offer.guest),
      origin: { kind: 'migrated', migrationId: this.offer.migrationId, from: this.session.peer?.agentId ?? 'unknown' },
      startedAt: new Date().toISOString(),
      ...(incoming ? { incoming: { ...incoming, from: this.session.peer?.agentId ?? 'unknown', secret: this.secret.toString('hex') } } : {}),
    };
  }

  private async commit(): Promise<void> {
    await faultDelay('dest-commit', this.log);
    const standby = this.standby!;
    this.switching = true;
    let journaled = false;
    const t: Record<string, number> = { start: performance.now() };
    // A disk's fd stays open until its blocks are on stable storage (below).
    const diskFds: number[] = [];
    // This agent's mappings go once the guest runs (letting them go is no part of the downtime).
    const mappings: { handle: RegionHandle; slot: number | undefined; pageCount: number }[] = [];
    try {
      for (const [index, region] of this.regions.entries()) {
        this.native.tmpfileLink(region.fd, this.regionPaths[index]!);
        mappings.push({ handle: region.handle, slot: this.slots[index], pageCount: region.pageCount });
        // A hybrid that ended by stop-and-copy: its fingerprints' file goes unnamed with its
        // fd once the mapping is closed (the munmap keeps nothing of it).
        if (region.fingerprintsFd !== undefined) closeQuietly(region.fingerprintsFd);
        if (region.disk) {
          this.disks.linked(index);
          diskFds.push(region.fd);
        } else closeSync(region.fd);
      }
      this.regions = [];
      // A hybrid that ended by stop-and-copy: its guest's drives are the exports, complete.
      this.disks.openComplete();
      t.closed = performance.now();
      faultCrash('dest-after-link', this.log);
      // The journal: the record goes in before the guest may run, so that an agent restarted
      // from here on knows it (a guest that never started is dropped as dead on load).
      this.ctx.registry.add(this.guestRecord(standby.pid));
      journaled = true;
      t.journaled = performance.now();
      await this.deviceState.load(standby);
      t.loaded = performance.now();
      await this.disks.switchBeforeStart(standby);
      t.switched = performance.now();
      standby.go();
      const runningAt = await withTimeout(standby.running, 30_000, 'the guest did not start at the destination');
      t.running = runningAt;
      faultCrash('dest-after-go', this.log);
      this.letGo(mappings.splice(0));
      // A disk must survive this host's crash once the source drops its copy, which it does
      // on our `committed`: its blocks on stable storage, then its name. The guest runs
      // meanwhile (outside the downtime); until `committed` the source keeps its paused copy
      // and its disk, so a crash here costs the guest only the time it ran here.
      await this.disks.toStableStorage(diskFds);
      t.flushed = performance.now();
      // Switched before the start unless QEMU refused it then (a no-op once switched).
      await this.disks.useLocalDisks(diskFds);
      // The exports serve the guest to its end: their files stay open.
      if (this.disks.servedToEnd) diskFds.splice(0);
      this.log.debug({ ...Object.fromEntries(Object.entries(t).map(([k, v]) => [k, Math.round((v - t.start!) * 100) / 100])), atMs: performance.timeOrigin + t.start! }, 'commit: ms after the commit frame');
      faultCrash('dest-after-start', this.log);
      this.state = transition(this.state, { type: 'sentCommitted' });
      this.session.send(Frame.committed({ migrationId: this.offer.migrationId, resumeToSendMs: performance.now() - runningAt }));
      this.log.info({ pid: standby.pid }, 'guest resumed here; migration committed');
      this.finish('committed');
    } catch (err) {
      this.startFailed(err, journaled, 'commit failed; the source keeps the guest');
    } finally {
      this.letGo(mappings.splice(0));
      for (const fd of diskFds.splice(0)) closeSync(fd);
    }
  }

  /**
   * Unmaps this agent's view of a committed guest's memory, or, in a dedup group, hands it to
   * the group: a ref copies from it from now on only while a page holds what it held at the
   * commit (its tracked fingerprints, which the digest checked, and which the guest's own
   * writes leave as they were). Called inside the commit's step of the group's queue, so
   * before any ref planned after the commit is applied.
   */
  private letGo(mappings: readonly { handle: RegionHandle; slot: number | undefined; pageCount: number }[]): void {
    for (const { handle, slot, pageCount } of mappings) {
      if (this.group && slot !== undefined) {
        const fingerprints = new Uint8Array(pageCount * FINGERPRINT_BYTES);
        this.native.regionTrackedFingerprints(handle, fingerprints);
        this.group.settleSlot(slot, handle, fingerprints);
      } else this.native.regionClose(handle);
    }
  }

  /**
   * The guest did not start here (commit or post-copy start): the source must keep it.
   * Tells it so, and removes what was made here (the standby process, the journal record
   * when `journaled`, the named memory file).
   */
  private startFailed(err: unknown, journaled: boolean, message: string): void {
    const error = err instanceof GangwayError ? err : new GangwayError(ErrorCode.GUEST_FAILED, String(err));
    this.log.error({ err: error.message }, message);
    if (this.session.isOpen) {
      this.session.send(Frame.abort({ migrationId: this.offer.migrationId, code: ErrorCode.GUEST_FAILED, message: error.message.slice(0, 1024) }));
    }
    try {
      if (this.standby && this.standby.pid > 0) process.kill(this.standby.pid, 'SIGKILL');
    } catch {}
    // The rest of the standby (a VM's TAP device, what it made as it ended) goes in cleanup().
    if (journaled) this.ctx.registry.remove(this.offer.guest.name);
    // The guest's files go in cleanup(), which finish('aborted') runs.
    this.removeFingerprints();
    // The disks that arrived: the source's copy is the guest's (shared ones are not touched).
    this.disks.removeLinked();
    this.finish('aborted', error.message);
  }

  private protocolFailure(err: unknown): void {
    const error =
      err instanceof GangwayError ? err : new ProtocolError(ErrorCode.PROTOCOL, err instanceof Error ? err.message : String(err));
    this.log.warn({ code: error.code, err: error.message }, 'migration failed on a bad frame');
    this.finish(this.guestStartedHere ? 'stranded' : 'aborted', error.message);
    this.session.fail(error);
  }

  onSessionClosed(err: GangwayError): void {
    if (this.finished) return;
    if (this.postcopy?.underway) {
      this.postcopy.detach(err);
      return;
    }
    if (this.commitReceived) {
      // The source committed (it journaled so before it sent the commit): the guest starts
      // here all the same, and the source, or the source agent restarted, asks what became
      // of it (migrationQuery) rather than resuming its copy. Aborting here instead would
      // race with the commit already under way.
      this.log.warn({ err: err.message }, 'the session to the source closed after its commit: the commit goes on');
      return;
    }
    this.finish(this.guestStartedHere ? 'stranded' : 'aborted', `session lost: ${err.message}`);
  }

  /** A channel's hello that names this migration: attached, or why not. */
  attachChannel(hello: ChannelHelloIn, channel: Channel): string | undefined {
    return this.channels.attach(hello, channel);
  }

  /** Is `session`, presenting `secret`, the source this migration was accepted from? */
  isSource(session: PeerSession, secret: Uint8Array): boolean {
    return session.peerId === this.sourceAgentId && secretsMatch(secret, this.secret);
  }

  /**
   * A new session from the source for this post-copy migration (the caller checked
   * isSource); returns why it cannot carry on, or undefined.
   */
  reattach(session: PeerSession): string | undefined {
    if (this.finished) return `migration ${this.offer.migrationId} is over`;
    const postcopy = this.postcopy;
    if (!postcopy?.underway) return `migration ${this.offer.migrationId} is not in post-copy`;
    this.state = transition(this.state, { type: 'reattached' });
    if (this.session.isOpen) {
      // The old session looks alive here but the source gave up on it: that one wins.
      this.session.unregister(this.offer.migrationId);
      this.session.close();
    }
    this.session = session;
    // The new session's source starts with a fresh window; what was in flight on the old one
    // gets no credit back.
    this.pages.restartCredit();
    session.register(this.offer.migrationId, this);
    postcopy.reattached(session);
    return undefined;
  }

  private finish(outcome: IncomingResult['outcome'], reason?: string, sourceCode?: string): void {
    if (this.finished) return;
    this.finished = true;
    this.channels.close();
    this.session.unregister(this.offer.migrationId);
    if (!this.disks.servedToEnd) this.disks.close();
    let cleaned: Promise<void> | undefined;
    if (outcome === 'aborted') {
      this.log.warn({ reason }, 'incoming migration aborted; partial memory discarded');
      cleaned = this.cleanup();
    } else if (outcome === 'stranded') {
      // The guest started here: it is the only running copy, so nothing of it is removed.
      // Pages still missing can only come from the source, which keeps them.
      const missingPages = this.missingPages ?? 0;
      this.log.error({ reason, missingPages }, 'post-copy did not complete: the guest stays here, paused on its missing pages');
      if (missingPages > 0) {
        try {
          process.kill(this.standby!.pid, 'SIGSTOP');
        } catch {}
      }
      try {
        this.ctx.registry.add({
          ...this.guestRecord(this.standby!.pid),
          incoming: { migrationId: this.offer.migrationId, from: this.session.peer?.agentId ?? 'unknown', missingPages, stranded: reason ?? 'unknown' },
        });
      } catch {}
      this.closePostcopy();
    } else {
      this.closePostcopy();
    }
    // Its files are named by its record now, or gone.
    this.ctx.registry.arrived(this.offer.guest.name);
    const result: IncomingResult = {
      migrationId: this.offer.migrationId,
      guest: this.offer.guest.name,
      from: this.session.peer?.agentId ?? 'unknown',
      outcome,
      ...(reason ? { reason } : {}),
      ...(sourceCode ? { sourceCode } : {}),
      pages: this.pages.pagesReceived + this.channels.pagesWritten,
      rounds: this.roundsSeen,
      technique: this.technique,
    };
    // An aborted migration is over once its standby is gone and nothing of it is left.
    if (cleaned) void cleaned.then(() => this.resolveDone(result));
    else this.resolveDone(result);
  }

  /** After post-copy: stop reading faults, and drop this agent's view of the memory (and its fingerprints' files). */
  private closePostcopy(): void {
    const received = this.postcopy?.receiving ?? false;
    this.postcopy?.close();
    if (!received) return;
    closeRegions(this.native, this.regions, (region) => region.disk === true && this.disks.servedToEnd);
    this.regions = [];
    this.removeFingerprints();
  }

  /** The post-copy fingerprints' files named at the switchover: no restarted agent needs them once post-copy is over. */
  private removeFingerprints(): void {
    if (!this.postcopy) return;
    for (const [index, path] of this.regionPaths.entries()) if (!this.diskRegions.has(index)) rmSync(fingerprintsPathOf(path), { force: true });
  }

  /**
   * Drops everything this migration made: the unnamed files vanish with their last fd.
   * Resolves once the standby guest is gone and what it made as it ended is removed too.
   */
  private cleanup(): Promise<void> {
    this.postcopy?.close();
    // A group member's memory stays for refs already on their way; the group frees it.
    if (this.group) this.regions = [];
    closeRegions(this.native, this.regions);
    this.regions = [];
    const gone = this.standby?.cancel();
    // The guest never ran here: its log, tracking reports and device state go with it (a
    // peer offering and dropping migrations must not leave a file each time).
    const removeFiles = () => {
      rmSync(this.files.logPath, { force: true });
      removeGuestFiles(this.files);
    };
    removeFiles();
    // The name is free at once: another migration of it gets files of its own.
    this.ctx.registry.arrived(this.offer.guest.name);
    this.ctx.registry.release(this.offer.guest.name);
    // A standby still starting makes files after the removal above (a QEMU its QMP socket
    // and console; the tracking shim its report): they go once it has ended.
    if (!gone) return Promise.resolve();
    const removeLate = () => {
      try {
        removeFiles();
      } catch (err) {
        this.log.warn({ err: (err as Error).message }, 'could not remove what the standby guest left');
      }
    };
    return gone.then(removeLate, removeLate);
  }
}
