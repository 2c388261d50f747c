// Pre-copy: rounds of pages while the guest runs. Round 0 sends every page of every region
// (zero pages as runs); each later round sends what the trackers collected since, until the
// convergence policy says the final round fits the downtime budget (or a limit is hit). The
// RoundSender sends one round over all the regions (one pages stream per region, one
// roundEnd for the round) and keeps the counts the summary reports.
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { Frame } from '../../protocol/index.js';
import type { CodecChooser } from './codec-chooser.js';
import { DEFAULT_SAFETY_FACTOR, isPrecopyConverged, RateEstimator, type ConvergenceDecision } from './convergence.js';
import type { Pacer } from './flow.js';
import { everyPage, laneBytes, lanePages, mergeLaneRuns, takeWanted, type Lane, type LaneRuns } from './lanes.js';
import type { SourceChannels } from './source-channels.js';
import { channelRoundState, sendRoundOnChannels } from './channel-round.js';
import { addCounters, emptyCounters, sendRegionRound, type BatchPool, type PageSenderContext, type RoundCounters } from './page-sender.js';
import { diskHoldsStop, diskWriteLimit } from './disk-throttle.js';
import { hybridSwitch } from './postcopy.js';
import type { MigrationProgress, RoundRecord, SourceRun } from './source-types.js';
import { mergeRuns, runsPageCount } from '../tracker/page-set.js';

const PAUSE_LATENCY_MS = 5;
const RESUME_ALLOWANCE_MS = 5;

/** Progress events, at most every 100 ms (and at the end of each round). */
/**
 * An ETA that never goes up from one report to the next: each estimate is taken when it is
 * lower, and the last one is held when it is not (a progress bar that runs backwards is
 * what operators complain of; one that holds still says as much).
 */
export class NonIncreasingEta {
  private last: number | undefined;

  get value(): number | undefined {
    return this.last;
  }

  update(estimateMs: number): number {
    this.last = this.last === undefined ? estimateMs : Math.min(this.last, estimateMs);
    return this.last;
  }
}

export class ProgressReporter {
  private lastAt = 0;
  /** Wire bytes sent before the current round, for its wire rate. */
  private roundWireStartBytes = 0;
  /** What the policy said after the last round; the whole migration's ETA follows from it. */
  private policy: { dirtyRateBytesPerSec: number; predictedDowntimeMs: number; converging: boolean } | undefined;
  private readonly totalEta = new NonIncreasingEta();

  constructor(private readonly run: SourceRun) {}

  startRound(wireBytesBefore: number): void {
    this.roundWireStartBytes = wireBytesBefore;
  }

  /** After each pre-copy round: the dirty rate (guest bytes) and the policy's prediction. */
  decided(dirtyRateBytesPerSec: number, decision: Pick<ConvergenceDecision, 'predictedDowntimeMs' | 'converging'>): void {
    this.policy = { dirtyRateBytesPerSec, predictedDowntimeMs: decision.predictedDowntimeMs, converging: decision.converging };
  }

  /**
   * The time until the guest runs at the destination: this round's rest, then the pages the
   * guest dirties meanwhile, sent at the same rate (a geometric series, q = dirty / send
   * rate), then the switchover. Undefined while the rounds do not shrink.
   */
  private wholeEta(remainingBytes: number, rateBytesPerSec: number): MigrationProgress['convergence'] {
    const policy = this.policy;
    if (!policy) return undefined;
    const q = rateBytesPerSec > 0 ? policy.dirtyRateBytesPerSec / rateBytesPerSec : 1;
    if (!policy.converging || q >= 1 || rateBytesPerSec <= 0) return { ...policy, converging: false, totalEtaMs: undefined };
    const estimateMs = ((remainingBytes / rateBytesPerSec) * 1000) / (1 - q) + policy.predictedDowntimeMs;
    return { ...policy, totalEtaMs: this.totalEta.update(estimateMs) };
  }

  report(round: number, roundPages: number, sentPages: number, bytesPerPage: number, roundStart: number, wireBytes: number, disk?: MigrationProgress['disk']): void {
    const now = this.run.clock.now();
    if (now - this.lastAt < 100 && sentPages < roundPages) return;
    this.lastAt = now;
    const elapsedMs = now - roundStart;
    const rateBytesPerSec = elapsedMs > 0 ? (sentPages * bytesPerPage * 1000) / elapsedMs : 0;
    const wireRateBytesPerSec = elapsedMs > 0 ? (Math.max(0, wireBytes - this.roundWireStartBytes) * 1000) / elapsedMs : 0;
    const convergence = this.run.state.phase === 'precopy' ? this.wholeEta((roundPages - sentPages) * bytesPerPage, rateBytesPerSec) : undefined;
    const progress: MigrationProgress = {
      migrationId: this.run.options.migrationId,
      guest: this.run.guest.name,
      phase: this.run.state.phase,
      round,
      roundPages,
      roundPagesSent: sentPages,
      percent: roundPages > 0 ? (100 * sentPages) / roundPages : 100,
      rateBytesPerSec,
      etaMs: rateBytesPerSec > 0 ? ((roundPages - sentPages) * bytesPerPage * 1000) / rateBytesPerSec : undefined,
      wireBytes,
      ...(disk ? { disk } : {}),
      wireRateBytesPerSec,
      ...(convergence ? { convergence } : {}),
    };
    this.run.emitProgress(progress);
  }
}

/** Sends rounds over every region, and keeps the rounds and their totals. */
export class RoundSender {
  readonly rounds: RoundRecord[] = [];
  readonly totals = emptyCounters();
  /** Each lane's own totals, by lane index (a disk's are reported apart from memory's). */
  readonly laneTotals: RoundCounters[] = [];
  /** Pages each lane had in round 0: for a disk, the blocks that held data then. */
  readonly laneFirstRoundPages: number[] = [];
  /** The migration's channels, while its rounds may go on them (source-channels.ts). */
  channels: SourceChannels | undefined;
  /** What the channels carried, all rounds together. */
  readonly channelTotals = emptyCounters();
  /** What its channel rounds carry from one round to the next. */
  private readonly channelState = channelRoundState();
  /** The limit the guest's disk writes are held to (disk-throttle.ts), once one was set. */
  diskWriteLimitBytesPerSec: number | undefined;
  /** The rate the link takes this migration's bytes at, as pre-copy rounds measure it. */
  readonly linkRate = new RateEstimator();
  /** Disk blocks sent in the rounds before this one, and the disks' ETA (never up). */
  private diskBlocksSent = 0;
  private readonly diskEta = new NonIncreasingEta();

  /** The disks' part of a progress report: `sent` of the round's `blocks` (of `blockBytes`) since `start`. */
  private diskProgress(blocks: number, sent: number, blockBytes: number, start: number | undefined): NonNullable<MigrationProgress['disk']> {
    const elapsedMs = start === undefined ? 0 : this.run.clock.now() - start;
    const rateBytesPerSec = elapsedMs > 0 ? (sent * blockBytes * 1000) / elapsedMs : 0;
    const etaMs = rateBytesPerSec > 0 ? this.diskEta.update((((blocks - sent) * blockBytes) / rateBytesPerSec) * 1000) : this.diskEta.value;
    return { roundBlocks: blocks, roundBlocksSent: sent, rateBytesPerSec, etaMs, blocksSent: this.diskBlocksSent + sent };
  }

  constructor(
    private readonly run: SourceRun,
    readonly pool: BatchPool,
    readonly chooser: CodecChooser,
    /** Read at every region's round: gangway migrate-set may install one mid-flight. */
    public pacer: Pacer | undefined,
    readonly progress: ProgressReporter,
  ) {}

  /**
   * One round: `runs` of each region, region by region, then its roundEnd. `plain`: no
   * dedup (a repair's pages go as they are); `final`: no resident refs (asking for one
   * again would be a round trip of downtime).
   */
  async send(round: number, runs: LaneRuns, final: boolean, how: { plain?: boolean; holes?: { pages: number; bytes: number } } = {}): Promise<RoundRecord> {
    const { options, link, lanes, clock } = this.run;
    const t0 = clock.now();
    const roundPages = lanePages(runs);
    const guestBytes = laneBytes(lanes, runs) + (how.holes?.bytes ?? 0);
    const bytesPerPage = roundPages > 0 ? guestBytes / roundPages : lanes[0]!.region.pageSizeBytes;
    const counters = emptyCounters();
    const dedup = options.dedup;
    this.progress.startRound(this.totals.wireBytes);
    // The disks' share of the round, reported apart (their lanes come after memory's).
    const diskLanes = lanes.filter((lane) => lane.region.sparse);
    const diskRoundBlocks = diskLanes.reduce((sum, lane) => sum + runsPageCount(runs[lane.index] ?? new Uint32Array(0)), 0);
    let diskSent = 0;
    let diskStart: number | undefined;
    /** `laneRuns` of `lane` on the session (batches gathered, compressed as the codec says, credited). */
    const onSession = async (lane: Lane, laneRuns: Uint32Array, stop?: PageSenderContext['stop']): Promise<void> => {
      const before = { ...counters };
      const diskBefore = diskSent;
      let reported = emptyCounters();
      const laneCounters = await sendRegionRound(
        {
          sink: link.session,
          migrationId: options.migrationId,
          pageSizeBytes: lane.region.pageSizeBytes,
          pool: this.pool,
          chooser: this.chooser,
          credits: link.credits!,
          pacer: this.pacer,
          pipelineDepth: 4,
          // Resident refs are verified at the destination and may be asked for again:
          // not in the final round, where that would be a round trip of downtime.
          ...(dedup && !how.plain && lane.slot !== undefined ? { dedup: { group: dedup.group, slot: lane.slot, allowResident: !final } } : {}),
          ...(options.gate ? { gate: { gate: options.gate, owner: this.run.owner } } : {}),
          ...(stop ? { stop } : {}),
          onBatch: (c) => {
            if (lane.region.sparse) {
              diskStart ??= clock.now();
              diskSent = diskBefore + c.pages;
            }
            const disk = diskLanes.length > 0 ? this.diskProgress(diskRoundBlocks, diskSent, diskLanes[0]!.region.pageSizeBytes, diskStart) : undefined;
            this.progress.report(round, roundPages, before.pages + c.pages, bytesPerPage, t0, this.totals.wireBytes + before.wireBytes + c.wireBytes, disk);
            options.metrics?.batchSent(reported, c, lane.region.pageSizeBytes, lane.region.sparse);
            reported = { ...c };
          },
        },
        lane.index,
        lane.reader,
        lane.tracker,
        round,
        laneRuns,
      );
      addCounters(counters, laneCounters);
      if (lane.region.sparse) this.diskBlocksSent += laneCounters.pages;
      addCounters((this.laneTotals[lane.index] ??= emptyCounters()), laneCounters);
      if (round === 0) this.laneFirstRoundPages[lane.index] = (this.laneFirstRoundPages[lane.index] ?? 0) + laneCounters.pages;
    };
    // A final round, a repair or a pacer installed mid-flight: the session from here on.
    const channels = this.channels;
    if (channels?.usable && (final || how.plain || this.pacer)) channels.usable = false;
    if (channels?.usable) {
      const ctx = { run: this.run, chooser: this.chooser, channels, payloadBytes: this.pool.payloadBytes, state: this.channelState, channelTotals: this.channelTotals };
      await sendRoundOnChannels(ctx, round, runs, counters, onSession, (done) => this.progress.report(round, roundPages, done.pages, bytesPerPage, t0, this.totals.wireBytes + done.wireBytes));
    } else {
      for (const lane of lanes) {
        const laneRuns = runs[lane.index]!;
        if (laneRuns.length > 0) await onSession(lane, laneRuns);
      }
    }
    // Memory holes (everyPage) are zero pages the destination has: the round covered them, unread.
    if (how.holes) {
      counters.pages += how.holes.pages;
      counters.zeroPages += how.holes.pages;
    }
    link.send(Frame.roundEnd({ migrationId: options.migrationId, round, pageCount: counters.pages, final }));
    addCounters(this.totals, counters);
    options.metrics?.rounds.inc();
    const record: RoundRecord = { round, final, durationMs: clock.now() - t0, guestBytes, dirtyPagesAfter: 0, ...counters, ...(how.holes ? { holePages: how.holes.pages } : {}) };
    this.rounds.push(record);
    return record;
  }
}

/**
 * Disks written faster than the link carries them: QEMU's I/O limits hold the guest's disk
 * writes to what lets the rounds converge (disk-throttle.ts says how much).
 */
async function limitDiskWrites(run: SourceRun, sender: RoundSender, lanes: readonly Lane[], runs: LaneRuns, intervalMs: number, converging: boolean, roundsDone: number): Promise<void> {
  let diskBytes = 0;
  let memoryBytes = 0;
  lanes.forEach((lane, i) => {
    const bytes = runsPageCount(runs[i]!) * lane.region.pageSizeBytes;
    if (lane.region.sparse) diskBytes += bytes;
    else memoryBytes += bytes;
  });
  const limit = diskWriteLimit({
    roundsDone,
    converging,
    diskDirtyBytesPerSec: (diskBytes * 1000) / intervalMs,
    memoryDirtyBytesPerSec: (memoryBytes * 1000) / intervalMs,
    linkRateBytesPerSec: sender.linkRate.value ?? 0,
    currentLimitBytesPerSec: sender.diskWriteLimitBytesPerSec,
  });
  if (limit === undefined) return;
  await run.guest.limitDiskWrites!(limit);
  sender.diskWriteLimitBytesPerSec = limit;
  run.log.info({ limitBytesPerSec: limit, diskDirtyBytes: diskBytes, intervalMs: Math.round(intervalMs) }, "the guest writes its disks faster than the link carries them: its disk writes are limited until the migration ends");
}

/** Pages written since the last collect in every region, with the pages the destination asked for again. */
export async function collectDirty(run: SourceRun): Promise<LaneRuns> {
  // All at once: a disk's collect is QMP and NBD round trips to QEMU, which a memory scan
  // need not wait for (at the switchover both are downtime).
  return Promise.all(
    run.lanes.map(async (lane) => {
      const started = run.clock.now();
      const written = await lane.tracker.collect();
      lane.written?.addRuns(written);
      run.options.metrics?.dirtyScan.observe({ tracker: lane.tracker.kind }, (run.clock.now() - started) / 1000);
      return mergeRuns(written, takeWanted(lane), lane.pageCount);
    }),
  );
}

export type PrecopyOutcome =
  /** Stop-and-copy next: `runs` are the pages collected and not yet sent. */
  | { next: 'stop'; round: number; runs: LaneRuns; forced: boolean }
  /** A hybrid goes post-copy from round `round` on `runs`. */
  | { next: 'postcopy'; round: number; runs: LaneRuns; reason: string };

/** What a gang member holds of its gang's gate (SwitchoverGate), given up when it ends. */
export interface GateHold {
  /** Its switchover's hold on the gate. */
  held: (() => void) | undefined;
  /** Its place among the members still sending their round 0. */
  leaveRoundZero?: (() => void) | undefined;
  /** It sends its round 0 in its turn (SwitchoverGate.roundZeroTurn). */
  roundZeroTurn?: boolean;
  /** Ends its round 0's turn. */
  endTurn?: (() => void) | undefined;
}

/**
 * Pre-copy rounds until the policy says stop (or a hybrid goes post-copy). `minRttMs` is
 * the round trip's floor so far (the switchover's few small frames pay it); `sampleRtt`
 * measures it again after each round.
 */
export async function precopyRounds(
  run: SourceRun,
  sender: RoundSender,
  rtt: { min: () => number; sample: () => void },
  releaseGate: GateHold,
): Promise<PrecopyOutcome> {
  const { options, lanes, link, clock, log } = run;
  const technique = options.technique ?? 'precopy';
  // Its guest's writes before its turn cost nothing: round 0 reads what they wrote.
  if (releaseGate.roundZeroTurn && options.gate) {
    const turn = options.gate.roundZeroTurn();
    try {
      releaseGate.endTurn = await link.unlessFailed(turn);
    } catch (err) {
      // Failed while it waited: its turn, when it comes, ends at once.
      void turn.then((end) => end());
      throw err;
    }
  }
  for (const lane of lanes) await lane.tracker.arm();
  // After the trackers armed: a hole the guest writes from now on is collected dirty.
  let runs: LaneRuns = await everyPage(lanes, technique === 'precopy' ? 'skip' : 'send');
  const holes = { pages: 0, bytes: 0 };
  for (const lane of lanes) {
    if (lane.region.sparse) continue;
    const pages = lane.pageCount - runsPageCount(runs[lane.index]!);
    holes.pages += pages;
    holes.bytes += pages * lane.region.pageSizeBytes;
  }
  // The switchover's digest reads what holds data then: of a disk, its data now; of memory, all of it (a hole may be written meanwhile).
  const digestBytes = lanes.reduce((sum, lane, i) => sum + (lane.region.sparse ? runsPageCount(runs[i]!) * lane.region.pageSizeBytes : lane.region.lengthBytes), 0);
  // Pages weigh what they hold: convergence counts units of the first region's page size.
  const unitBytes = lanes[0]!.region.pageSizeBytes;
  const units = (runs: LaneRuns) => laneBytes(lanes, runs) / unitBytes;
  const linkRate = sender.linkRate;
  let wireBytesPerUnit = unitBytes;
  const digestMs = (digestBytes / options.digestBytesPerSec) * 1000;
  const switchoverOverheadMs = () => digestMs + 2 * rtt.min() + RESUME_ALLOWANCE_MS;
  let lastCollect = clock.now();
  options.metrics?.migrationInFlight(options.migrationId, run.guest.name, { remainingBytes: units(runs) * unitBytes });
  // The disks' blocks the previous round left to send (round 0: all their data), and the rounds they added after a stop.
  let previousDiskPages = lanePages(runs.map((r, i) => (lanes[i]!.region.sparse ? r : new Uint32Array(0))));
  let diskExtraRounds = 0;
  /** The last round ran only to shorten a final round that already fit the budget. */
  let shrinkRound = false;
  for (let round = 0; ; round++) {
    const record = await sender.send(round, runs, false, round === 0 && holes.pages > 0 ? { holes } : {});
    if (round === 0) {
      releaseGate.leaveRoundZero?.();
      releaseGate.endTurn?.();
    }
    // Time held at a gang's switchover gate says nothing about the link.
    linkRate.add(record.wireBytes, record.durationMs - record.gateWaitMs);
    if (record.dataPages > 0) {
      const sample = round === 0 ? record.payloadBytes / (record.rawBytes / unitBytes) + 16 : record.wireBytes / (record.guestBytes / unitBytes);
      wireBytesPerUnit = round <= 1 ? sample : wireBytesPerUnit * 0.5 + sample * 0.5;
    }
    rtt.sample();
    runs = await collectDirty(run);
    const now = clock.now();
    const pending = units(runs);
    const intervalMs = Math.max(now - lastCollect, 1);
    const dirtyRatePerSec = (pending * 1000) / intervalMs;
    lastCollect = now;
    record.dirtyPagesAfter = lanePages(runs);
    const decide = (pendingUnits: number): ConvergenceDecision =>
      isPrecopyConverged({
        roundsDone: round + 1,
        pendingPages: pendingUnits,
        wireBytesPerPage: wireBytesPerUnit,
        linkRateBytesPerSec: linkRate.value ?? 1,
        dirtyRatePagesPerSec: dirtyRatePerSec,
        pauseLatencyMs: PAUSE_LATENCY_MS,
        switchoverOverheadMs: switchoverOverheadMs(),
        safetyFactor: DEFAULT_SAFETY_FACTOR,
        downtimeBudgetMs: options.downtimeBudgetMs,
        wireBytesSent: sender.totals.wireBytes,
        limits: { maxRounds: options.maxRounds, maxWireBytes: options.maxWireBytes },
        roundPages: record.guestBytes / unitBytes,
      });
    let decision = decide(pending);
    if (decision.action === 'stop' && options.gate && !releaseGate.held) {
      // A gang member's turn, once every member has sent its round 0 (its content stays a
      // source of refs until then: SwitchoverGate.enterRoundZero); the others hold back
      // until its switchover is over. Its guest kept writing while it waited: decide again
      // on what is dirty now, and if that no longer fits, copy another round first.
      await link.unlessFailed(options.gate.roundZerosDone());
      releaseGate.held = await options.gate.acquire(run.owner);
      runs = mergeLaneRuns(lanes, runs, await collectDirty(run));
      record.dirtyPagesAfter = lanePages(runs);
      decision = decide(units(runs));
    }
    if (shrinkRound && decision.action !== 'stop' && !('shrinking' in decision && decision.shrinking)) {
      // The round before fit the budget and this one only had to shorten it: when the
      // estimates now say otherwise (a link rate dragged down by a small round, a busy
      // host), stop as the round before would have, rather than be held to a limit.
      decision = { action: 'stop', predictedDowntimeMs: decision.predictedDowntimeMs, converging: decision.converging, reason: `the round before fit the budget and this one only shortened it; ${decision.reason}` };
    }
    shrinkRound = decision.action === 'continue' && decision.shrinking === true;
    // The disks' last blocks: another round while they would weigh on the downtime and the rounds still shrink them.
    const diskPages = lanePages(runs.map((r, i) => (lanes[i]!.region.sparse ? r : new Uint32Array(0))));
    if (decision.action === 'stop' && diskPages > 0) {
      const diskUnits = units(runs.map((r, i) => (lanes[i]!.region.sparse ? r : new Uint32Array(0))));
      const hold = diskHoldsStop({
        diskPages,
        previousDiskPages,
        diskFinalMs: ((diskUnits * wireBytesPerUnit) / Math.max(linkRate.value ?? 1, 1)) * 1000 * DEFAULT_SAFETY_FACTOR,
        extraRounds: diskExtraRounds,
        roundsDone: round + 1,
        maxRounds: options.maxRounds,
      });
      if (hold) {
        diskExtraRounds++;
        decision = { ...decision, action: 'continue', reason: `${decision.reason}; ${hold}` };
      }
    }
    previousDiskPages = diskPages;
    record.decision = decision.reason;
    sender.progress.decided(dirtyRatePerSec * unitBytes, decision);
    if (decision.action === 'continue' && run.guest.limitDiskWrites) {
      // A hot set rewritten whole every round looks slower than the link (the dirty count
      // stops at its size) and still never shrinks: that is not converging either.
      const shrinking = round === 0 || record.dirtyPagesAfter < record.pages * 0.9;
      await limitDiskWrites(run, sender, lanes, runs, intervalMs, decision.converging && shrinking, round + 1);
    }
    options.metrics?.migrationInFlight(options.migrationId, run.guest.name, {
      remainingBytes: units(runs) * unitBytes,
      dirtyBytesPerSec: dirtyRatePerSec * unitBytes,
      expectedDowntimeMs: decision.predictedDowntimeMs,
    });
    log.info(
      { round, pages: record.pages, wireBytes: record.wireBytes, ms: Math.round(record.durationMs), dirtyPages: record.dirtyPagesAfter, decision: decision.action, reason: decision.reason },
      'round done',
    );
    if (run.controls.postcopyRequested) {
      // gangway postcopy: whatever the policy says, as QEMU's migrate-start-postcopy.
      const reason = `started by the operator (gangway postcopy) after ${round + 1} pre-copy round${round === 0 ? '' : 's'}; ${decision.reason}`;
      record.decision = reason;
      log.info({ round, reason }, 'going post-copy: the operator asked for it');
      return { next: 'postcopy', round: round + 1, runs, reason };
    }
    if (technique === 'hybrid') {
      const choice = hybridSwitch(decision, round + 1, options.hybrid ?? { postcopyAfterRounds: options.maxRounds });
      if (choice.postcopy) {
        record.decision = choice.reason;
        log.info({ round, reason: choice.reason }, 'hybrid: going post-copy');
        return { next: 'postcopy', round: round + 1, runs, reason: choice.reason };
      }
    }
    if (decision.action === 'stop') return { next: 'stop', round, runs, forced: false };
    if (decision.action === 'limit') {
      if (!options.force) {
        throw new GangwayError(
          ErrorCode.NON_CONVERGENCE,
          `pre-copy does not converge: ${decision.reason}. Raise --downtime-ms, cap the guest's dirty rate, or pass --force to stop it anyway`,
        );
      }
      log.warn({ reason: decision.reason }, 'limit reached; stopping the guest anyway (--force)');
      return { next: 'stop', round, runs, forced: true };
    }
    link.check();
  }
}
