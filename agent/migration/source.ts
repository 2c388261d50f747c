// The source side of a live migration of one guest over a peer session: every memory region
// of the guest, and its device state.
//
// The parts, in the order a page meets them: the offer and the choice of technique (here);
// pre-copy rounds (rounds.ts: each region's pages through page-sender.ts into the session);
// stop-and-copy with verification, repair and the two-phase commit (switchover.ts); or the
// post-copy switchover and push (source-postcopy.ts). Frames from the destination come in
// through the link (source-link.ts). Any failure before the commit resumes the source guest
// (recover, here).
import { EventEmitter } from 'node:events';
import type { Logger } from 'pino';
import { Codec, Technique } from '../../protocol/codes.js';
import { ErrorCode, GangwayError, PeerError } from '../../protocol/errors.js';
import { Frame } from '../../protocol/index.js';
import type { SourceGuest } from '../guest/adapter.js';
import type { AnyFrame, FrameHandler, PeerSession } from '../peer/session.js';
import type { DirtyTracker } from '../tracker/dirty-tracker.js';
import { PageSet } from '../tracker/page-set.js';
import { CodecChooser } from './codec-chooser.js';
import { SourceChannels } from './source-channels.js';
import { CreditWindow, Pacer, realClock, type Clock } from './flow.js';
import { checkRuns, everyPage, laneOf, noPages, type Lane, type LaneRuns } from './lanes.js';
import { BatchPool, emptyCounters } from './page-sender.js';
import { mapRegion } from './region-reader.js';
import { precopyRounds, ProgressReporter, RoundSender, type GateHold } from './rounds.js';
import { MidFlightControls, postcopyRefusal, settingsRefusal, type LiveSettings, type SettingsChange } from './mid-flight.js';
import { SourceLink, type SourceSession } from './source-link.js';
import { NO_TRACKER, postcopySwitchover, resumeServing } from './source-postcopy.js';
import { SourceStateMachine, type SourcePhase } from './source-state.js';
import type { MigrationProgress, MigrationSummary, SourceOptions, SourceRun } from './source-types.js';
import { faultCrash } from './faults.js';
import { stopAndCopy } from './switchover.js';

export type { MigrationProgress, MigrationSummary, RoundRecord, SourceOptions } from './source-types.js';
export { differingRuns } from './lanes.js';

/** How long a destination may take to start the guest it will run (it refuses the migration if it cannot). */
const STANDBY_READY_TIMEOUT_MS = 120_000;

export class SourceMigration extends EventEmitter implements FrameHandler {
  /** Emits 'phase' on each transition. */
  readonly state = new SourceStateMachine((phase) => this.emit('phase', phase));
  private readonly clock: Clock;
  private readonly link: SourceLink;
  private lanes: Lane[] = [];
  /** Gives up this migration's turn at a gang's switchover gate. */
  private readonly gate: GateHold = { held: undefined };
  private wantedPages = 0;
  /** The destination's secret for this migration (its accept, or the record after a restart). */
  private secret: Uint8Array | undefined;
  /** The destination's standbyReady, awaited before the pause ('standby-ready'). */
  private standbyReadyP: Promise<unknown> | undefined;
  /** What the operator changed or asked for while it runs (gangway migrate-set, gangway postcopy). */
  readonly controls = new MidFlightControls();
  /** The pacer of its pages (a gang's shared one, or its own); gangway migrate-set may install one. */
  private pacer: Pacer | undefined;
  private sender: RoundSender | undefined;
  private readonly startedAt: number;
  /** The round its last progress report was of (undefined before the first). */
  private lastRound: number | undefined;

  constructor(
    readonly guest: SourceGuest,
    session: PeerSession | SourceSession,
    readonly options: SourceOptions,
    private readonly log: Logger,
  ) {
    super();
    this.clock = options.clock ?? realClock;
    this.secret = options.secret;
    this.link = new SourceLink(session, this.clock, () => this.phase);
    this.pacer = options.pacer ?? (options.bandwidthBytesPerSec ? new Pacer(options.bandwidthBytesPerSec, options.batchBytes, this.clock) : undefined);
    this.startedAt = this.clock.now();
    if (guest.regions.length === 0) throw new GangwayError(ErrorCode.BAD_REQUEST, `guest ${guest.name} has no memory regions`);
    if (options.dedup && options.dedup.slots.length !== guest.regions.length) {
      throw new GangwayError(ErrorCode.INTERNAL, `guest ${guest.name}: ${options.dedup.slots.length} dedup slots for ${guest.regions.length} regions`);
    }
  }

  get phase(): SourcePhase {
    return this.state.phase;
  }

  /** Whether cancel() can still stop it: the guest is still this host's. */
  get cancellable(): boolean {
    return this.state.sourceOwnsGuest;
  }

  onFrame(frame: AnyFrame): void {
    this.link.onFrame(frame);
  }

  onSessionClosed(err: GangwayError): void {
    this.link.fail(err);
  }

  /**
   * Stops the migration at the next step and resumes the source guest: allowed until the
   * commit is sent. From then on the destination may be running the guest, and the
   * switchover (milliseconds) must finish.
   */
  cancel(reason = 'cancelled by the operator'): void {
    if (!this.state.sourceOwnsGuest) {
      throw new GangwayError(
        ErrorCode.BAD_REQUEST,
        `migration ${this.options.migrationId} is ${this.phase}: ${
          this.phase === 'committing' || this.phase === 'postcopy-switch'
            ? 'the switchover is under way and cannot be cancelled safely'
            : this.phase === 'postcopy'
              ? 'the guest runs at the destination since the post-copy switchover, and only this host can send the pages it still lacks: stopping now would strand it'
              : 'it is over'
        }`,
      );
    }
    this.link.fail(new GangwayError(ErrorCode.ABORTED, reason));
  }

  /** The settings it runs with now. */
  get settings(): LiveSettings {
    return { bandwidthBytesPerSec: this.pacer?.rate ?? null, downtimeMs: this.options.downtimeBudgetMs };
  }

  /** The round its last progress report was of: the one under way, or just done. */
  get round(): number | undefined {
    return this.lastRound;
  }

  /** Whether it and `other` take turns at one pacer (a gang's --bandwidth caps the group). */
  sharesPacerWith(other: SourceMigration): boolean {
    return other !== this && this.pacer !== undefined && this.pacer === other.pacer;
  }

  /**
   * gangway migrate-set: a new rate takes effect at the pacer's next batch (a first cap at the
   * next region's round), a new downtime budget at the next round's decision. Refused at the
   * switchover and after (mid-flight.ts says why).
   */
  changeSettings(change: SettingsChange): { previous: LiveSettings; current: LiveSettings } {
    const refusal = settingsRefusal(this.phase, change, this.pacer !== undefined);
    if (refusal) throw new GangwayError(ErrorCode.BAD_REQUEST, `migration ${this.options.migrationId} of ${this.guest.name} ${refusal}`);
    const previous = this.settings;
    if (change.downtimeMs !== undefined) this.options.downtimeBudgetMs = change.downtimeMs;
    const rate = change.bandwidthBytesPerSec;
    if (rate !== undefined) {
      if (this.pacer) {
        this.pacer.setRate(rate);
      } else {
        this.pacer = new Pacer(rate, this.options.batchBytes, this.clock);
        if (this.sender) this.sender.pacer = this.pacer;
      }
    }
    this.controls.changes.push({ afterMs: Math.round(this.clock.now() - this.startedAt), ...change });
    this.log.info({ previous, current: this.settings }, 'settings changed by the operator');
    return { previous, current: this.settings };
  }

  /**
   * gangway postcopy: the pre-copy ends at the next round boundary and post-copy starts,
   * whatever the convergence policy says. Only where the destination prepared post-copy at
   * the offer (a hybrid migration); refused in and after the switchover (mid-flight.ts).
   * Asking again before the boundary changes nothing.
   */
  requestPostcopy(): { alreadyRequested: boolean } {
    const refusal = postcopyRefusal({
      phase: this.phase,
      technique: this.options.technique ?? 'precopy',
      peerCanPostcopy: this.link.session.peer?.features.includes('postcopy') ?? false,
      peerAddress: this.options.peerAddress,
    });
    if (refusal) throw new GangwayError(ErrorCode.BAD_REQUEST, `migration ${this.options.migrationId} of ${this.guest.name} ${refusal}`);
    if (this.controls.postcopyRequested) return { alreadyRequested: true };
    this.controls.postcopyRequested = true;
    this.controls.changes.push({ afterMs: Math.round(this.clock.now() - this.startedAt), postcopy: true });
    this.log.info('post-copy asked for by the operator: it starts at the next round boundary');
    return { alreadyRequested: false };
  }

  /** What the parts of this migration share. */
  private context(): SourceRun {
    return {
      options: this.options,
      guest: this.guest,
      link: this.link,
      lanes: this.lanes,
      clock: this.clock,
      log: this.log,
      state: this.state,
      owner: this,
      emitProgress: (progress: MigrationProgress) => {
        this.lastRound = progress.round;
        this.emit('progress', progress);
      },
      controls: this.controls,
      standbyReady: () => this.standbyReadyP,
      secretBytes: () => this.secret,
      secretHex: () => (this.secret ? Buffer.from(this.secret).toString('hex') : undefined),
    };
  }

  /** Maps every region and gives each its tracker (none after a restart: the guest is paused). */
  private openLanes(trackers: readonly DirtyTracker[] | undefined): void {
    const open = this.options.openRegion ?? mapRegion;
    const dedup = this.options.dedup;
    for (const [index, region] of this.guest.regions.entries()) {
      const base = trackers?.[index] ?? NO_TRACKER;
      const tracker = trackers && this.options.wrapTracker ? this.options.wrapTracker(base, index) : base;
      const lane: Lane = { index, region, pageCount: region.lengthBytes / region.pageSizeBytes, reader: open(region), tracker, slot: dedup?.slots[index], wanted: undefined, written: undefined };
      if (dedup?.slots[index] !== undefined) lane.written = new PageSet(lane.pageCount);
      this.lanes.push(lane);
    }
  }

  private closeLanes(): void {
    for (const lane of this.lanes) {
      lane.tracker.close();
      lane.reader.close();
    }
  }

  // ── the migration ─────────────────────────────────────────────────────────────────
  async run(): Promise<MigrationSummary> {
    const started = this.clock.now();
    const { guest, options } = this;
    let trackers: DirtyTracker[] | undefined;
    let trackerFallbackReason: string | undefined;
    this.link.session.register(options.migrationId, this);
    // A gang member with pre-copy rounds and dedup: its content must stay a source of refs
    // for the others' round 0s. A destination that keeps a committed member's memory as
    // resident ('dedup-committed') lets members take turns at their round 0s, each then
    // converging and switching over while the next sends its own; one that does not holds
    // every switchover until each member's round 0 is out (SwitchoverGate.enterRoundZero).
    if (options.gate && options.dedup && options.technique !== 'postcopy') {
      if (options.dedup.group.keepsCommitted) this.gate.roundZeroTurn = true;
      else this.gate.leaveRoundZero = options.gate.enterRoundZero();
    }
    try {
      const opened = await guest.openTrackers(options.tracker);
      trackers = opened.trackers;
      trackerFallbackReason = opened.fallbackReason;
      if (trackerFallbackReason) this.log.warn({ reason: trackerFallbackReason }, 'uffd-wp unavailable; hash-scan tracking');
      this.openLanes(trackers);
      trackers = undefined; // the lanes own them now
      return await this.migrate(started, trackerFallbackReason);
    } catch (err) {
      throw await this.recover(err);
    } finally {
      this.gate.leaveRoundZero?.();
      this.gate.endTurn?.();
      this.gate.held?.();
      if (this.link.credits) options.gate?.leave(this.link.credits);
      this.link.session.unregister(options.migrationId);
      for (const tracker of trackers ?? []) tracker.close();
      this.closeLanes();
    }
  }

  /**
   * After this agent restarted: the guest runs at the destination since the post-copy
   * switchover and waits there for pages only this paused copy holds. Reattaches, pushes
   * what is missing and completes as the original migration would have. Rejects with
   * POSTCOPY_INTERRUPTED when the destination cannot carry on.
   */
  async resumePostcopy(): Promise<{ verified: boolean; pushedPages: number; faultPages: number }> {
    const { options } = this;
    this.openLanes(undefined);
    try {
      const run = this.context();
      const chooser = new CodecChooser({ mode: options.codec, now: () => this.clock.now() });
      const served = await resumeServing(run, chooser, this.pacer, new ProgressReporter(run), emptyCounters());
      return { verified: true, ...served };
    } finally {
      this.link.session.unregister(options.migrationId);
      this.closeLanes();
    }
  }

  /** After a failure: resume the source guest if it is still ours, tell the peer, explain. */
  private async recover(err: unknown): Promise<GangwayError> {
    const error =
      err instanceof GangwayError
        ? err
        : new GangwayError(ErrorCode.INTERNAL, err instanceof Error ? err.message : String(err), { cause: err });
    this.link.fail(error);
    // Nothing more may refer to this guest's pages at the destination.
    const dedup = this.options.dedup;
    if (dedup) for (const slot of dedup.slots) dedup.group.forgetSlot(slot);
    const phase = this.state.phase;
    const session = this.link.session;
    if (this.state.sourceOwnsGuest) {
      // A guest that died under the migration (a QEMU killed or crashed) is not resumed, and
      // the failure says so instead of a tracker's or a socket's error.
      const gone = this.guest.gone?.();
      // Paused for a switchover that never reached the destination: no longer in doubt (a
      // post-copy's record says 'postcopy' from before its pause: the switch did not go either).
      try {
        if (this.options.registry?.get(this.guest.name).record.outgoing) this.options.registry.update(this.guest.name, { outgoing: undefined });
      } catch {}
      if (!gone && this.guest.isPaused) await this.guest.resume();
      this.state.to('failed');
      if (session.isOpen && !(error instanceof PeerError)) {
        session.send(Frame.abort({ migrationId: this.options.migrationId, code: error.code, message: error.message.slice(0, 1024) }));
      }
      if (gone) {
        this.log.error({ err: error.message, phase, gone }, 'migration failed: the guest died on this host');
        return new GangwayError(
          ErrorCode.GUEST_FAILED,
          `migration of ${this.guest.name} to ${this.options.peerAddress} failed during ${phase}: ${gone} (${error.message}). ` +
            `The guest does not run anywhere; its record stays on this host until \`gangway guest stop ${this.guest.name}\` removes it.`,
          { cause: error },
        );
      }
      this.log.warn({ code: error.code, err: error.message, phase }, 'migration failed; the guest runs on here');
      return new GangwayError(
        error.code,
        `migration of ${this.guest.name} to ${this.options.peerAddress} failed during ${phase}: ${error.message}. The guest keeps running on this host.`,
        { cause: error },
      );
    }
    if (phase === 'postcopy') {
      // The guest runs at the destination and waits there for pages only this host has:
      // keep the paused guest and its memory, whatever happens.
      this.state.to('interrupted');
      try {
        const marked = this.options.registry?.get(this.guest.name).record.outgoing;
        if (marked) this.options.registry?.update(this.guest.name, { outgoing: { ...marked, interrupted: error.message.slice(0, 300) } });
      } catch {}
      this.log.error({ err: error.message, code: error.code }, 'post-copy interrupted: the guest runs at the destination; its missing pages stay here');
      return new GangwayError(
        ErrorCode.POSTCOPY_INTERRUPTED,
        `post-copy of ${this.guest.name} to ${this.options.peerAddress} was interrupted (${error.message}). The guest runs there and waits for pages ` +
          `that only this host holds: its paused copy stays here (${this.guest.regions.map((region) => region.path).join(', ')}). Do not resume it here; check \`gangway status\` on both hosts.`,
        { cause: error },
      );
    }
    if (phase === 'committing' || phase === 'postcopy-switch') {
      if (error instanceof PeerError) {
        // The destination answered: it did not start the guest, so ours is still the one.
        try {
          this.options.registry?.update(this.guest.name, { outgoing: undefined });
        } catch {}
        await this.guest.resume();
        this.state.to('failed');
        return new GangwayError(
          error.code,
          `the destination could not start ${this.guest.name}: ${error.message}. The guest was resumed on this host.`,
          { cause: error },
        );
      }
      this.state.to('in-doubt');
      this.log.error({ err: error.message }, 'switchover in doubt: the guest stays paused here');
      return new GangwayError(
        ErrorCode.SWITCHOVER_IN_DOUBT,
        `the commit of ${this.guest.name} was sent to ${this.options.peerAddress} but not confirmed (${error.message}). ` +
          'The guest may be running there: it stays paused here while this agent asks the destination what became of it, ' +
          'then removes this copy (it runs there) or resumes it (it never ran there). `gangway status` shows where it stands.',
        { cause: error },
      );
    }
    return error;
  }

  private budget(downtimeMs: number): { downtimeBudgetMs: number; downtimeBudgetMet: boolean } {
    const budget = budgetOf(downtimeMs, this.options.downtimeBudgetMs);
    if (!budget.downtimeBudgetMet) {
      this.log.warn({ downtimeMs: Math.round(downtimeMs * 10) / 10, budgetMs: budget.downtimeBudgetMs }, 'the downtime went over its budget');
    }
    return budget;
  }

  /** Pages the destination asks for again (a resident ref whose content had changed): they join the next round. */
  private onWant(frame: Parameters<NonNullable<SourceLink['handlers']['want']>>[0]): void {
    const lane = laneOf(this.lanes, frame.region, 'want');
    if (!this.options.dedup || !lane.wanted) throw new GangwayError(ErrorCode.UNEXPECTED_FRAME, `want for region ${frame.region} of a migration that sent no refs there`);
    checkRuns(lane, frame.runs, 'want');
    for (let i = 0; i + 1 < frame.runs.length; i += 2) {
      lane.wanted.addRange(frame.runs[i]!, frame.runs[i + 1]!);
      this.wantedPages += frame.runs[i + 1]!;
      this.options.metrics?.dedupWantedPages.inc(frame.runs[i + 1]!);
    }
    this.options.dedup.group.forgetStale(frame.stale);
  }

  private async migrate(started: number, trackerFallbackReason: string | undefined): Promise<MigrationSummary> {
    const { guest, options, link, lanes } = this;
    const dedup = options.dedup;
    const technique = options.technique ?? 'precopy';
    if (technique !== 'precopy' && dedup) {
      throw new GangwayError(ErrorCode.BAD_REQUEST, 'post-copy and hybrid migrations do not take part in dedup groups');
    }
    if (technique !== 'precopy' && !(link.session.peer?.features.includes('postcopy') ?? false)) {
      throw new GangwayError(ErrorCode.REJECTED, `the destination ${options.peerAddress} cannot run post-copy (it needs root and userfaultfd); use --technique precopy`);
    }
    if (dedup) {
      for (const lane of lanes) lane.wanted = new PageSet(lane.pageCount);
      link.handlers.want = (frame) => this.onWant(frame);
    }

    // Offer.
    const acceptP = link.expect('accept', 30_000, 'accept');
    // A destination that says when its standby guest is up says so soon after its accept
    // (or refuses the migration): the timeout only bounds one that never does.
    if (link.session.peer?.features.includes('standby-ready')) {
      this.standbyReadyP = link.expect('standbyReady', STANDBY_READY_TIMEOUT_MS, 'standbyReady (its standby guest up)');
    }
    link.send(
      Frame.offer({
        migrationId: options.migrationId,
        guest: {
          name: guest.name,
          kind: guest.kind,
          regions: guest.regions.map(({ name, lengthBytes, pageSizeBytes }) => ({ name, lengthBytes, pageSizeBytes })),
          config: guest.config,
        },
        technique: technique === 'postcopy' ? Technique.postcopy : technique === 'hybrid' ? Technique.hybrid : Technique.precopy,
        downtimeBudgetMs: options.downtimeBudgetMs,
        codecs: options.codec === 'raw' ? [Codec.raw] : [Codec.raw, Codec.lz4],
        ...(dedup ? { dedup: { group: dedup.group.id, slots: dedup.slots } } : {}),
        ...(options.reservePriority ? { priority: options.reservePriority } : {}),
      }),
    );
    const accept = await acceptP;
    faultCrash('source-after-accept', this.log);
    this.secret = accept.secret;
    link.credits = new CreditWindow(accept.creditBytes);
    options.gate?.join(link.credits);
    this.state.to('precopy');

    // The round trip's floor: a ping waits behind whatever is queued on the session (a
    // gang's other members, this migration's own window), so the smallest seen is the
    // latency the switchover's few small frames will pay (they go once the window is
    // drained). Sampled again after every round, and never above the session's own floor:
    // a gang member that starts behind the others' round 0 would otherwise predict its
    // switchover from a queue, and burn its rounds on a downtime it never gets.
    let minRttMs = await link.session.measureRttMs();
    const rtt = {
      min: () => Math.min(minRttMs, link.session.rttFloorMs ?? Infinity),
      sample: () => {
        link.session.measureRttMs().then(
          (ms) => (minRttMs = Math.min(minRttMs, ms)),
          () => {},
        );
      },
    };
    const run = this.context();
    // The session's link as earlier migrations on it measured it (a clock of its own, as a test's, shares nothing).
    const memory = this.clock === realClock ? link.session.codecMemory : undefined;
    const chooser = options.chooser ?? new CodecChooser({ mode: options.codec, now: () => this.clock.now(), ...(memory ? { memory } : {}) });
    link.chooser = chooser;
    const sender = new RoundSender(run, new BatchPool(Math.min(options.batchBytes, link.session.peerMaxPayloadBytes), 8192), chooser, this.pacer, new ProgressReporter(run));
    this.sender = sender;
    const memoryBytes = lanes.reduce((sum, lane) => sum + (lane.region.sparse ? 0 : lane.region.lengthBytes), 0);
    const diskLanes = lanes.filter((lane) => lane.region.sparse);
    const disks = () =>
      diskLanes.map((lane) => {
        const totals = sender.laneTotals[lane.index];
        return {
          name: lane.region.name,
          sizeBytes: lane.region.lengthBytes,
          dataBytes: (sender.laneFirstRoundPages[lane.index] ?? 0) * lane.region.pageSizeBytes,
          blocksSent: totals?.pages ?? 0,
          dataBlocksSent: totals?.dataPages ?? 0,
          wireBytes: totals?.wireBytes ?? 0,
          rounds: sender.rounds.length,
        };
      });
    const trackerKind = lanes[0]!.tracker.kind;

    /** The fields every summary shares. */
    const baseSummary = (
      digests: Uint8Array[],
      totalMs: number,
      wireBytes: number,
      forced: boolean,
      repairedPages: number,
    ): Omit<MigrationSummary, 'downtime' | 'deviceStateBytes' | 'downtimeMs' | 'downtimeBudgetMs' | 'downtimeBudgetMet'> => {
      const totals = sender.totals;
      return {
        migrationId: options.migrationId,
        guest: guest.name,
        technique,
        from: 'local',
        to: options.peerAddress,
        tracker: trackerKind,
        ...(trackerFallbackReason ? { trackerFallbackReason } : {}),
        verified: true,
        digests: digests.map((d) => Buffer.from(d).toString('hex')),
        forced,
        totalMs,
        rounds: sender.rounds,
        memoryBytes,
        ...(diskLanes.length ? { disks: disks() } : {}),
        ...(sender.diskWriteLimitBytesPerSec !== undefined ? { diskWriteLimitBytesPerSec: sender.diskWriteLimitBytesPerSec } : {}),
        wireBytes,
        zeroPages: totals.zeroPages,
        dataPages: totals.dataPages,
        dedup: {
          enabled: dedup !== undefined,
          ...(dedup ? { group: dedup.group.id } : {}),
          refPages: totals.refPages,
          unchangedPages: totals.unchangedPages,
          hits: { intra: totals.hitsIntra, crossRound: totals.hitsCrossRound, crossGuest: totals.hitsCrossGuest, resident: totals.hitsResident },
          savedBytes: sender.rounds.reduce((sum, r) => sum + (r.pages > 0 ? ((r.refPages + r.unchangedPages) * r.guestBytes) / r.pages : 0), 0),
          wantedPages: this.wantedPages,
        },
        repairedPages,
        ...(sender.channels && sender.channelTotals.pages > 0
          ? { channels: { count: sender.channels.count, tls: sender.channels.tls, pages: sender.channelTotals.pages, wireBytes: sender.channelTotals.wireBytes } }
          : {}),
        rawDataBytes: totals.rawBytes,
        compressionRatio: totals.rawBytes > 0 ? totals.payloadBytes / totals.rawBytes : 1,
        linkRateBytesPerSec: sender.linkRate.value ?? 0,
        codecRates: chooserRates(chooser),
        ...(this.pacer ? { bandwidthBytesPerSec: this.pacer.rate } : {}),
        ...(this.controls.changes.length > 0 ? { operatorChanges: this.controls.changes } : {}),
      };
    };

    const postcopy = async (round: number, pending: LaneRuns, reason: string | undefined): Promise<MigrationSummary> => {
      const result = await postcopySwitchover(run, sender, round, pending, reason, this.gate);
      return {
        ...baseSummary(result.digests, result.doneAt - started, result.wireBytes, false, 0),
        ...this.budget(result.downtimeMs),
        downtimeMs: result.downtimeMs,
        downtime: result.downtime,
        deviceStateBytes: result.deviceStateBytes,
        ...(result.postcopy ? { postcopy: { ...result.postcopy, ...(this.controls.postcopyRequested ? { byOperator: true as const } : {}) } } : {}),
      };
    };

    if (technique === 'postcopy') return postcopy(0, noPages(lanes), undefined);
    // Raw or adaptive pages, deduplicated or not, at the link's own pace: the rounds may go on
    // channels. A gang's switchover waits for its members' pieces as for their windows.
    if (options.channels && technique === 'precopy' && options.codec !== 'lz4' && !this.pacer && link.session.peer?.features.includes('channels')) {
      // Not waited for: a round's first piece for the channels waits until they are open.
      sender.channels = SourceChannels.open(options.channels, lanes, options.peerAddress, { migrationId: options.migrationId, secret: accept.secret }, link.session.peerCertificateSha256, this.log);
      if (sender.channels) options.gate?.joinWork(sender.channels);
    }
    let outcome: Awaited<ReturnType<typeof precopyRounds>>;
    try {
      outcome = await precopyRounds(run, sender, rtt, this.gate);
    } finally {
      // Every round they carried was written at the destination (each ended with a barrier).
      if (sender.channels) {
        options.gate?.leaveWork(sender.channels);
        void sender.channels.close();
      }
    }
    if (outcome.next === 'postcopy') return postcopy(outcome.round, outcome.runs, outcome.reason);
    const result = await stopAndCopy(run, sender, outcome.round, outcome.runs, this.gate);
    const summary: MigrationSummary = {
      ...baseSummary(result.digests, result.committedAt - started, sender.totals.wireBytes, outcome.forced, result.repairedPages),
      ...this.budget(result.downtimeMs),
      downtimeMs: result.downtimeMs,
      downtime: result.downtime,
      deviceStateBytes: result.deviceStateBytes,
    };
    this.log.info({ downtimeMs: Math.round(summary.downtimeMs), totalMs: Math.round(summary.totalMs), rounds: sender.rounds.length, wireBytes: summary.wireBytes }, 'migration committed');
    return summary;
  }
}

/** Whether `downtimeMs` kept to the budget; over it is said in the log (and the summary, and the metrics). */
function budgetOf(downtimeMs: number, budgetMs: number): { downtimeBudgetMs: number; downtimeBudgetMet: boolean } {
  return { downtimeBudgetMs: budgetMs, downtimeBudgetMet: downtimeMs <= budgetMs };
}

function chooserRates(chooser: CodecChooser): { lz4?: number; raw?: number } {
  const rates = chooser.rates();
  return {
    ...(rates.lz4 !== undefined ? { lz4: rates.lz4 } : {}),
    ...(rates.raw !== undefined ? { raw: rates.raw } : {}),
  };
}
