// The source side of a live pre-copy migration of one guest over a peer session.
//
// Round 0 sends every page (zero pages as runs); each later round sends the pages the dirty
// tracker collected, until the convergence policy says the final round fits the downtime
// budget (or a limit is hit: fail, or stop anyway with force). Then stop-and-copy: pause,
// the last dirty pages, device state, a 128-bit digest per region compared on both sides,
// and a two-phase switchover: the destination starts the guest and confirms; only then is
// the source guest ended. Any failure before the commit resumes the source guest.
import { EventEmitter } from 'node:events';
import { closeSync, openSync } from 'node:fs';
import type { Logger } from 'pino';
import { Codec, Technique } from '../../protocol/codes.js';
import { ErrorCode, GangwayError, PeerError } from '../../protocol/errors.js';
import { Frame, type FrameOf } from '../../protocol/index.js';
import type { TrackerPreference } from '../guest/process-guest.js';
import type { GuestRegion, SourceGuest } from '../guest/adapter.js';
import type { GuestRegistry } from '../guest/registry.js';
import { loadNative, type RegionHandle } from '../native.js';
import type { AnyFrame, FrameHandler, PeerSession } from '../peer/session.js';
import type { DirtyTracker, TrackerKind } from '../tracker/dirty-tracker.js';
import { mergeRuns, runsPageCount, subtractRuns } from '../tracker/page-set.js';
import { hybridSwitch, PostcopyScheduler, WindowTuner, type HybridPolicy } from './postcopy.js';
import { encodeFrame } from '../../protocol/index.js';
import { faultCrash } from './faults.js';
import { CodecChooser, type CodecMode } from './codec-chooser.js';
import { DEFAULT_SAFETY_FACTOR, isPrecopyConverged, RateEstimator, type ConvergenceDecision } from './convergence.js';
import { CreditWindow, Pacer, realClock, type Clock, type SwitchoverGate } from './flow.js';
import { addCounters, BatchPool, creditCost, emptyCounters, sendRegionRound, type RoundCounters } from './page-sender.js';
import { SourceStateMachine, type SourcePhase } from './source-state.js';
import type { AgentMetrics } from '../metrics.js';
import type { SourceDedupGroup } from '../dedup/source-group.js';
import { PageSet } from '../tracker/page-set.js';
import { FINGERPRINT_BYTES, MAX_DEVICE_STATE_BYTES, MIGRATION_SECRET_BYTES } from '../../protocol/limits.js';

export interface SourceOptions {
  migrationId: string;
  peerAddress: string;
  downtimeBudgetMs: number;
  maxRounds: number;
  maxWireBytes: number;
  /** At a limit: fail (the default), or stop the guest anyway and finish with a longer downtime. */
  force: boolean;
  codec: CodecMode;
  bandwidthBytesPerSec?: number;
  /** A pacer shared with other migrations (a gang's --bandwidth caps the group); else one of bandwidthBytesPerSec. */
  pacer?: Pacer;
  tracker: TrackerPreference;
  batchBytes: number;
  /** Measured XXH3-128 speed of this host, to predict the switchover's digest time. */
  digestBytesPerSec: number;
  commitTimeoutMs: number;
  clock?: Clock;
  metrics?: AgentMetrics;
  /** Member of a dedup group: the guest's memory is `slot` of `group`. */
  dedup?: { group: SourceDedupGroup; slot: number };
  /** Member of a gang: switchovers take turns (see SwitchoverGate). */
  gate?: SwitchoverGate;
  /**
   * precopy (the default): rounds, then stop-and-copy. postcopy: stop at once, the guest
   * runs at the destination and its pages follow (faulted ones first). hybrid: pre-copy
   * rounds, then post-copy when the pre-copy does not converge or after `hybrid`'s rounds.
   */
  technique?: 'precopy' | 'postcopy' | 'hybrid';
  hybrid?: HybridPolicy;
  /**
   * Post-copy: a new session to the destination when the old one broke (the guest runs
   * there and waits for pages only this host has). Tried with backoff for reconnectWindowMs.
   */
  reconnect?: () => Promise<PeerSession>;
  reconnectWindowMs?: number;
  /** Where the guest's record lives: post-copy marks it as running at the destination. */
  registry?: GuestRegistry;
  /** The plan's priority: the destination reserves its inbound side for this migration at it. */
  reservePriority?: 'high' | 'medium' | 'low';
  /** Fault injection for tests: the tracker the migration uses, around the guest's own (see faults.ts). */
  wrapTracker?: (tracker: DirtyTracker) => DirtyTracker;
  /**
   * Serving the rest of a post-copy after a restart: the secret the destination's accept
   * gave this migration (from the guest's record); a reattach must present it.
   */
  secret?: Uint8Array;
}

const RECONNECT_FIRST_DELAY_MS = 200;

/** Post-copy needs no dirty tracking (the guest is paused here): what the page sender calls does nothing. */
const NO_TRACKER: DirtyTracker = {
  kind: 'uffd-wp',
  arm: async () => {},
  collect: async () => new Uint32Array(0),
  remark: () => {},
  noteSent: () => {},
  close: () => {},
};
const RECONNECT_MAX_DELAY_MS = 5_000;

/**
 * Post-copy keeps few pushed bytes on their way (sent, not yet installed at the
 * destination): a faulted page goes out at once, but still travels behind them. The window
 * follows the link (WindowTuner): about 10 ms of it (at least two round trips), between
 * 256 KiB and 4 MiB, in batches of 128 KiB.
 */
const POSTCOPY_WINDOW = { initialBytes: 256 * 1024, minBytes: 256 * 1024, maxBytes: 4 * 1024 * 1024, periodMs: 100 };
const POSTCOPY_TARGET_DELAY_MS = 10;
const POSTCOPY_BATCH_BYTES = 128 * 1024;
/** Device state goes in chunks of this size at most (a frame each). */
const DEVICE_STATE_CHUNK_BYTES = 4 * 1024 * 1024;
/**
 * Pages per background-push step: one batch. Pages the push has taken are not sent on a
 * fault (each page goes once), so a page taken long before its batch goes out would make
 * a fault on it wait for the whole step (a 2 MiB step: 160 ms at 100 Mbit/s, measured).
 */
const postcopyPushPages = (pageSize: number) => Math.max(1, Math.floor(POSTCOPY_BATCH_BYTES / pageSize));

export interface RoundRecord extends RoundCounters {
  round: number;
  final: boolean;
  durationMs: number;
  /** Pages collected dirty after this round (the next round's size). */
  dirtyPagesAfter: number;
  decision?: string;
}

export interface MigrationSummary {
  migrationId: string;
  guest: string;
  technique: 'precopy' | 'postcopy' | 'hybrid';
  /** --technique auto: what the plan chose for this guest, and why (follow-plan.ts). */
  plan?: { technique: 'precopy' | 'postcopy' | 'hybrid'; strategy: 'parallel' | 'serial' | null; order: number; reasons: string[] };
  /** Post-copy (postcopy, or a hybrid that went post-copy): how the missing pages came. */
  postcopy?: {
    /** Why a hybrid went post-copy. */
    reason?: string;
    missingPages: number;
    /** Destination resume to the destination holding every page. */
    durationMs: number;
    /** Pages sent because the guest faulted on them (and the pre-paging window after them). */
    faultPages: number;
    /** Pages sent by the background push. */
    pushedPages: number;
    /** As the destination saw it: faults, and fault-to-page latency. */
    faults: number;
    faultLatency: { p50Ms: number; p99Ms: number; maxMs: number };
    /** Times the link broke and the migration carried on over a new session, and the pages sent again for it. */
    reattaches: number;
    resentPages: number;
  };
  from: string;
  to: string;
  tracker: TrackerKind;
  trackerFallbackReason?: string;
  verified: boolean;
  digests: string[];
  forced: boolean;
  downtimeMs: number;
  /** Downtime's parts; deviceStateMs is within finalRoundMs (taking the guest's device state and sending it). */
  downtime: { pauseMs: number; finalRoundMs: number; deviceStateMs: number; verifyMs: number; commitMs: number; resumeToSendMs: number; rttMs: number };
  /** The guest's device state that travelled (0 for a guest without). */
  deviceStateBytes: number;
  totalMs: number;
  rounds: RoundRecord[];
  memoryBytes: number;
  wireBytes: number;
  zeroPages: number;
  dataPages: number;
  /** Dedup: pages sent as refs, pages not sent at all, hits by kind, page bytes that did not travel. */
  dedup: {
    enabled: boolean;
    group?: string;
    refPages: number;
    unchangedPages: number;
    hits: { intra: number; crossRound: number; crossGuest: number; resident: number };
    savedBytes: number;
    /** Pages the destination asked for again (resident content that had changed). */
    wantedPages: number;
  };
  rawDataBytes: number;
  /** Pages sent again at the switchover because the destination's differed (missed by the dirty tracker). */
  repairedPages: number;
  compressionRatio: number;
  linkRateBytesPerSec: number;
  codecRates: { lz4?: number; raw?: number };
}

export interface MigrationProgress {
  migrationId: string;
  guest: string;
  phase: SourcePhase;
  round: number;
  roundPages: number;
  roundPagesSent: number;
  percent: number;
  rateBytesPerSec: number;
  etaMs: number | undefined;
  wireBytes: number;
}

const PAUSE_LATENCY_MS = 5;
/** Repair rounds after a digest mismatch before the migration fails (and the guest runs on here). */
const MAX_REPAIRS = 2;
const RESUME_ALLOWANCE_MS = 5;

export class SourceMigration extends EventEmitter implements FrameHandler {
  readonly state = new SourceStateMachine();
  private readonly clock: Clock;
  private readonly native = loadNative();
  private readonly waiters = new Map<string, { resolve: (frame: AnyFrame) => void; reject: (err: Error) => void }>();
  private failure: GangwayError | undefined;
  private credits: CreditWindow | undefined;
  private lastProgressAt = 0;
  private chooser: CodecChooser | undefined;
  /** Gives up this migration's turn at a gang's switchover gate. */
  private releaseGate: (() => void) | undefined;
  /** Pages the destination asked for again (want), for the next round. */
  private wanted: PageSet | undefined;
  private wantedPages = 0;
  private repairedPages = 0;
  /** Post-copy: what is still missing at the destination, and the buffers faulted pages go out in. */
  private postcopyServe:
    | { scheduler: PostcopyScheduler; round: number; region: RegionHandle; payload: Buffer; entries: Uint32Array; out: Uint32Array; faultPages: number; wireBytes: number }
    | undefined;
  /** Collects the destination's answer to a reattach: its missing pages, or its verdict. */
  private missingIn: { runs: Uint32Array[]; resolve: (runs: Uint32Array[]) => void } | undefined;
  private reattachAnswer: { resolve: (verified: FrameOf<'verified'>) => void; reject: (err: Error) => void } | undefined;
  private reattaches = 0;
  /** The destination's secret for this migration (its accept, or the record after a restart). */
  private secret: Uint8Array | undefined;

  /**
   * The paused guest's device state as deviceState chunks, none when it has none; returns
   * its size. The destination checks the total against its limit before it allocates.
   */
  private async sendDeviceState(): Promise<number> {
    const state = await this.guest.saveDeviceState();
    const chunkBytes = Math.min(this.session.peerMaxPayloadBytes, MAX_DEVICE_STATE_BYTES, DEVICE_STATE_CHUNK_BYTES);
    for (let at = 0; at < state.length; at += chunkBytes) {
      this.send(Frame.deviceState({ migrationId: this.options.migrationId, offsetBytes: at, totalBytes: state.length, state: state.subarray(at, at + chunkBytes) }));
    }
    return state.length;
  }

  private secretHex(): string | undefined {
    return this.secret ? Buffer.from(this.secret).toString('hex') : undefined;
  }
  /** Post-copy: sizes the credit window to the link. */
  private windowTuner: WindowTuner | undefined;
  private resentPages = 0;
  /** Collects the destination's page fingerprints during a repair. */
  private fingerprintsIn: { fps: Uint8Array; received: number; resolve: (fps: Uint8Array) => void; reject: (err: Error) => void } | undefined;

  constructor(
    readonly guest: SourceGuest,
    private session: PeerSession,
    readonly options: SourceOptions,
    private readonly log: Logger,
  ) {
    super();
    this.clock = options.clock ?? realClock;
    this.secret = options.secret;
    if (guest.regions.length !== 1) {
      throw new GangwayError(ErrorCode.BAD_REQUEST, `guest ${guest.name} has ${guest.regions.length} memory regions: this engine moves guests of one region yet`);
    }
    this.ram = guest.regions[0]!;
  }

  /** The guest's memory: the one region this engine moves yet. */
  private readonly ram: GuestRegion;

  get phase(): SourcePhase {
    return this.state.phase;
  }

  /** Whether cancel() can still stop it: the guest is still this host's. */
  get cancellable(): boolean {
    return this.state.sourceOwnsGuest;
  }

  // ── frames from the destination ────────────────────────────────────────────────────
  onFrame(frame: AnyFrame): void {
    switch (frame.type) {
      case 'credit': {
        // One credit per pages frame, in order: the batch was applied at the destination.
        const bytes = frame.bytes;
        this.chooser?.delivered();
        this.credits?.grant(bytes);
        if (this.windowTuner && this.credits) {
          const window = this.windowTuner.delivered(bytes, this.clock.now());
          if (window !== this.credits.windowBytes) this.credits.resize(window);
        }
        return;
      }
      case 'pageFingerprints': {
                const into = this.fingerprintsIn;
        const count = frame.fingerprints.length / FINGERPRINT_BYTES;
        if (!into || frame.region !== 0 || (frame.firstPage + count) * FINGERPRINT_BYTES > into.fps.length) {
          this.fail(new GangwayError(ErrorCode.UNEXPECTED_FRAME, `pageFingerprints (region ${frame.region}, from page ${frame.firstPage}) that were not asked for`));
          return;
        }
        into.fps.set(frame.fingerprints, frame.firstPage * FINGERPRINT_BYTES);
        into.received += count;
        if (into.received * FINGERPRINT_BYTES >= into.fps.length) {
          this.fingerprintsIn = undefined;
          into.resolve(into.fps);
        }
        return;
      }
      case 'want': {
        const want = frame;
        if (!this.options.dedup || !this.wanted || want.region !== 0) {
          this.fail(new GangwayError(ErrorCode.UNEXPECTED_FRAME, `want for region ${want.region} of a migration that sent no refs there`));
          return;
        }
        const pageCount = this.ram.lengthBytes / this.ram.pageSizeBytes;
        for (let i = 0; i < want.runs.length; i += 2) {
          const first = want.runs[i]!;
          const count = want.runs[i + 1]!;
          if (first + count > pageCount) {
            this.fail(new GangwayError(ErrorCode.PROTOCOL, `want for pages ${first}..${first + count - 1}, past the guest's ${pageCount}`));
            return;
          }
          this.wanted.addRange(first, count);
          this.wantedPages += count;
          this.options.metrics?.dedupWantedPages.inc(count);
        }
        this.options.dedup.group.forgetStale(want.stale);
        return;
      }
      case 'postcopy': {
        // The destination's missing pages, after a reattach.
        const postcopy = frame;
        const into = this.missingIn;
        if (!into || postcopy.region !== 0) {
          this.fail(new GangwayError(ErrorCode.UNEXPECTED_FRAME, `postcopy from the destination outside a reattach (phase ${this.phase})`));
          return;
        }
        into.runs.push(postcopy.missing);
        if (!postcopy.more) {
          this.missingIn = undefined;
          into.resolve(into.runs);
        }
        return;
      }
      case 'fetch': {
        const fetch = frame;
        const serve = this.postcopyServe;
        if (!serve || fetch.region !== 0) {
          this.fail(new GangwayError(ErrorCode.UNEXPECTED_FRAME, `fetch for region ${fetch.region} outside post-copy (phase ${this.phase})`));
          return;
        }
        const pageCount = this.ram.lengthBytes / this.ram.pageSizeBytes;
        for (let i = 0; i < fetch.runs.length; i += 2) {
          if (fetch.runs[i]! + fetch.runs[i + 1]! > pageCount) {
            this.fail(new GangwayError(ErrorCode.PROTOCOL, `fetch for pages ${fetch.runs[i]}..${fetch.runs[i]! + fetch.runs[i + 1]! - 1}, past the guest's ${pageCount}`));
            return;
          }
        }
        // The faulted pages go out now, alone, ahead of anything the push has not queued yet;
        // the pre-paging window right behind them.
        const { faulted, window } = serve.scheduler.onFault(fetch.runs);
        try {
          this.sendNow(serve, faulted);
          this.sendNow(serve, window);
        } catch (err) {
          this.fail(err instanceof GangwayError ? err : new GangwayError(ErrorCode.INTERNAL, String(err)));
        }
        return;
      }
      case 'abort': {
        const abort = frame;
        this.fail(new PeerError(abort.code, `the destination aborted: ${abort.message}`));
        return;
      }
      case 'reject': {
        const reject = frame;
        this.fail(new GangwayError(ErrorCode.REJECTED, `the destination refused the migration: ${reject.message}`));
        return;
      }
      default: {
        if (frame.type === 'verified' && this.reattachAnswer) {
          this.reattachAnswer.resolve(frame);
          return;
        }
        const waiter = this.waiters.get(frame.type);
        if (!waiter) {
          this.fail(new GangwayError(ErrorCode.UNEXPECTED_FRAME, `unexpected frame type ${frame.type} in phase ${this.phase}`));
          return;
        }
        this.waiters.delete(frame.type);
        waiter.resolve(frame);
      }
    }
  }

  onSessionClosed(err: GangwayError): void {
    this.fail(err);
  }

  /**
   * Post-copy: pushes what the destination lacks, from wherever its guest last faulted
   * (faults are answered meanwhile, in onFrame), then asks for its verdict on the memory it
   * received. A broken link does not end it: the destination's guest waits on its faults,
   * this host reconnects, learns what is still missing there and carries on.
   */
  private async pushMissing(ctx: {
    scheduler: PostcopyScheduler;
    round: number;
    region: RegionHandle;
    pool: BatchPool;
    chooser: CodecChooser;
    pacer: Pacer | undefined;
    tracker: DirtyTracker;
    missingPages: number;
    totals: RoundCounters;
    sourceDigests: Promise<Buffer[]>;
  }): Promise<{ verified: FrameOf<'verified'>; pushed: number }> {
    const { scheduler, round, totals } = ctx;
    const pageSize = this.ram.pageSizeBytes;
    const pushStart = this.clock.now();
    let pushed = 0;
    const pushAndVerify = async (): Promise<FrameOf<'verified'>> => {
      for (;;) {
        this.check();
        const chunk = scheduler.nextChunk(postcopyPushPages(pageSize));
        if (chunk.length === 0) break;
        const counters = await sendRegionRound(
          {
            session: this.session,
            migrationId: this.options.migrationId,
            pageSizeBytes: pageSize,
            pool: ctx.pool,
            chooser: ctx.chooser,
            credits: this.credits!,
            pacer: ctx.pacer,
            pipelineDepth: 1,
            queueBytes: POSTCOPY_WINDOW.minBytes,
          },
          0,
          ctx.region,
          ctx.tracker,
          round,
          chunk,
        );
        addCounters(totals, counters);
        pushed += counters.pages;
        const sent = pushed + (this.postcopyServe?.faultPages ?? 0);
        this.progress(round, ctx.missingPages, { ...counters, pages: sent }, pushStart, totals.wireBytes + (this.postcopyServe?.wireBytes ?? 0));
      }
      // The destination answers once it holds every page: its memory as received, checked
      // against the paused memory here.
      const digests = await ctx.sourceDigests;
      const verifiedP = this.expect<FrameOf<'verified'>>('verified', 600_000, 'post-copy completion');
      this.send(Frame.verify({ migrationId: this.options.migrationId, digests }));
      return verifiedP;
    };
    for (;;) {
      try {
        return { verified: await pushAndVerify(), pushed };
      } catch (err) {
        const answer = await this.reattach(err, scheduler);
        if (answer) return { verified: answer, pushed };
      }
    }
  }

  /**
   * Post-copy's end at the source: the destination's verdict on the memory it received must
   * match the paused memory here (else DIGEST_MISMATCH, and this copy stays); then the copy
   * goes. Returns what the fault lane sent.
   */
  private async completePostcopy(verified: FrameOf<'verified'>, digests: Buffer[]): Promise<{ faultPages: number; wireBytes: number }> {
    if (!verified.match || !sameDigests(verified.digests, digests)) {
      throw new GangwayError(
        ErrorCode.DIGEST_MISMATCH,
        `the memory ${this.options.peerAddress} received differs from this host's at the switchover (source ${hex(digests)}, destination ${hex(verified.digests)})`,
      );
    }
    this.state.to('committed');
    const served = { faultPages: this.postcopyServe?.faultPages ?? 0, wireBytes: this.postcopyServe?.wireBytes ?? 0 };
    this.postcopyServe = undefined;
    await this.guest.discard();
    return served;
  }

  /**
   * After this agent restarted: the guest runs at the destination since the post-copy
   * switchover and waits there for pages only this paused copy holds. Reattaches (the
   * destination says what it still lacks, or that it has everything), pushes that, and
   * completes as the original migration would have: on a matching digest the paused copy
   * goes. Rejects with POSTCOPY_INTERRUPTED when the destination cannot carry on.
   */
  async resumePostcopy(): Promise<{ verified: boolean; pushedPages: number; faultPages: number }> {
    const { ram, options } = this;
    const pageSize = ram.pageSizeBytes;
    const pageCount = ram.lengthBytes / pageSize;
    const fd = openSync(ram.path, 'r');
    let region: RegionHandle;
    try {
      region = this.native.regionMap(fd, ram.lengthBytes, pageSize, { writable: false, trackHashes: false, initiallyZero: false });
    } finally {
      closeSync(fd);
    }
    this.state.to('postcopy');
    try {
      const scheduler = new PostcopyScheduler(pageCount, new Uint32Array(0));
      const serveBytes = Math.min(POSTCOPY_BATCH_BYTES, this.session.peerMaxPayloadBytes);
      this.postcopyServe = {
        scheduler,
        round: 0,
        region,
        payload: Buffer.allocUnsafe(serveBytes),
        entries: new Uint32Array((serveBytes / pageSize + 1) * 3),
        out: new Uint32Array(2),
        faultPages: 0,
        wireBytes: 0,
      };
      this.windowTuner = new WindowTuner({ ...POSTCOPY_WINDOW, targetDelayMs: POSTCOPY_TARGET_DELAY_MS }, this.clock.now());
      const sourceDigests = Promise.all([this.native.regionDigest(region, 'full')]);
      sourceDigests.catch(() => {});
      const early = await this.reattach(new GangwayError(ErrorCode.PEER_GONE, 'this agent restarted during post-copy'), scheduler);
      const totals = emptyCounters();
      const missingPages = scheduler.remaining;
      const { verified, pushed } = early
        ? { verified: early, pushed: 0 }
        : await this.pushMissing({
            scheduler,
            round: this.postcopyServe.round,
            region,
            pool: new BatchPool(serveBytes, 8192),
            chooser: new CodecChooser({ mode: options.codec, now: () => this.clock.now() }),
            pacer: options.bandwidthBytesPerSec ? new Pacer(options.bandwidthBytesPerSec, options.batchBytes, this.clock) : undefined,
            tracker: NO_TRACKER,
            missingPages,
            totals,
            sourceDigests,
          });
      const { faultPages } = await this.completePostcopy(verified, await sourceDigests);
      this.log.info({ pushedPages: pushed, faultPages }, 'post-copy completed after this agent restarted; the paused copy is gone');
      return { verified: true, pushedPages: pushed, faultPages };
    } finally {
      this.session.unregister(options.migrationId);
      this.native.regionClose(region);
    }
  }

  /**
   * Post-copy, after the session broke (`err`): reconnects with backoff and carries the
   * migration on over the new session. Resolves with the destination's verdict when it
   * already holds every page, or undefined once the push can go on (the scheduler then
   * holds what is still missing there: pages lost on the way go again). Rethrows when
   * `err` is not a broken link, or when no session comes within the window.
   */
  private async reattach(err: unknown, scheduler: PostcopyScheduler): Promise<FrameOf<'verified'> | undefined> {
    const error = err instanceof GangwayError ? err : new GangwayError(ErrorCode.INTERNAL, err instanceof Error ? err.message : String(err));
    const linkLost = !(error instanceof PeerError) && (error.code === ErrorCode.PEER_GONE || error.code === ErrorCode.TIMEOUT || error.code === ErrorCode.PEER_UNREACHABLE);
    const reconnect = this.options.reconnect;
    if (!reconnect || !linkLost) throw error;
    const id = this.options.migrationId;
    const windowMs = this.options.reconnectWindowMs ?? 600_000;
    const deadline = this.clock.now() + windowMs;
    this.log.warn({ err: error.message, windowMs, remaining: scheduler.remaining }, 'post-copy: the link to the destination broke; reconnecting');
    this.session.unregister(id);
    let delay = RECONNECT_FIRST_DELAY_MS;
    for (let attempt = 1; ; attempt++) {
      if (this.clock.now() + delay > deadline) {
        throw new GangwayError(ErrorCode.PEER_GONE, `no session to ${this.options.peerAddress} again within ${Math.round(windowMs / 1000)} s (${attempt - 1} attempts; first ${error.message})`, { cause: error });
      }
      await this.clock.sleep(delay);
      delay = Math.min(delay * 2, RECONNECT_MAX_DELAY_MS);
      let session: PeerSession;
      try {
        session = await reconnect();
      } catch (connectErr) {
        this.log.info({ attempt, err: (connectErr as Error).message }, 'post-copy: reconnect failed; trying again');
        continue;
      }
      // A fresh start on the new session: nothing of the old one counts any more.
      this.failure = undefined;
      for (const waiter of this.waiters.values()) waiter.reject(error);
      this.waiters.clear();
      this.session = session;
      session.register(id, this);
      this.credits = new CreditWindow(this.windowTuner?.bytes ?? POSTCOPY_WINDOW.initialBytes);
      const answer = new Promise<{ runs: Uint32Array[] } | { verified: FrameOf<'verified'> }>((resolve, reject) => {
        this.missingIn = { runs: [], resolve: (runs) => resolve({ runs }) };
        this.reattachAnswer = { resolve: (verified) => resolve({ verified }), reject };
        setTimeout(() => reject(new GangwayError(ErrorCode.TIMEOUT, 'no answer to the reattach within 30 s')), 30_000).unref();
      });
      try {
        session.send(Frame.reattach({ migrationId: id, secret: this.secret ?? new Uint8Array(MIGRATION_SECRET_BYTES) }));
        const got = await answer;
        this.reattaches++;
        if ('verified' in got) {
          this.log.info({ attempt }, 'post-copy: reattached; the destination had every page already');
          return got.verified;
        }
        const before = scheduler.remaining;
        scheduler.reset(got.runs);
        this.resentPages += Math.max(0, scheduler.remaining - before);
        this.log.info({ attempt, missingPages: scheduler.remaining }, 'post-copy: reattached; pushing what the destination still lacks');
        return undefined;
      } catch (answerErr) {
        if (answerErr instanceof PeerError) {
          throw new GangwayError(ErrorCode.POSTCOPY_INTERRUPTED, `the destination refused to carry on: ${answerErr.message}`, { cause: answerErr });
        }
        this.log.info({ attempt, err: (answerErr as Error).message }, 'post-copy: reattach failed; trying again');
        session.unregister(id);
      } finally {
        this.missingIn = undefined;
        this.reattachAnswer = undefined;
      }
    }
  }

  /** Post-copy: sends `runs` at once, raw, without waiting for credits or the pacer. */
  private sendNow(serve: NonNullable<SourceMigration['postcopyServe']>, runs: Uint32Array): void {
    if (runs.length === 0) return;
    const cursor = new Uint32Array(2);
    for (let done = false; !done; ) {
      done = this.native.regionGather(serve.region, runs, cursor, serve.payload, serve.entries, serve.out);
      const entryCount = serve.out[0]!;
      if (entryCount === 0) continue;
      const entries = serve.entries.slice(0, entryCount * 3);
      const payload = serve.payload.subarray(0, serve.out[1]!);
      const frame = Frame.pages({ migrationId: this.options.migrationId, region: 0, round: serve.round, codec: Codec.raw, entries, rawBytes: payload.length, payload });
      const [head, body] = encodeFrame(frame);
      // Copied: the buffer is reused by the next fault before the socket is done with it.
      const message = Buffer.concat([head, ...(body ? [body] : [])]);
      this.credits?.force(creditCost(payload.length, payload.length, entryCount));
      serve.wireBytes += this.session.sendMessage(message);
      for (let e = 0; e < entryCount; e++) serve.faultPages += entries[e * 3 + 2]!;
    }
  }

  /** The destination's fingerprint of every page, as pageFingerprints frames bring them. */
  private receiveFingerprints(pageCount: number): Promise<Uint8Array> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.fingerprintsIn = { fps: new Uint8Array(pageCount * FINGERPRINT_BYTES), received: 0, resolve, reject };
    });
  }

  private fail(err: GangwayError): void {
    if (this.failure) return;
    this.failure = err;
    this.reattachAnswer?.reject(err);
    this.fingerprintsIn?.reject(err);
    this.fingerprintsIn = undefined;
    this.credits?.fail(err);
    for (const waiter of this.waiters.values()) waiter.reject(err);
    this.waiters.clear();
  }

  private expect<T extends AnyFrame>(type: AnyFrame['type'], timeoutMs: number, what: string): Promise<T> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.delete(type);
        reject(new GangwayError(ErrorCode.TIMEOUT, `no ${what} from the destination within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiters.set(type, {
        resolve: (frame) => {
          clearTimeout(timer);
          resolve(frame as T);
        },
        reject: (err) => {
          clearTimeout(timer);
          reject(err);
        },
      });
    });
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
    this.fail(new GangwayError(ErrorCode.ABORTED, reason));
  }

  private check(): void {
    if (this.failure) throw this.failure;
  }

  private send(frame: AnyFrame): void {
    this.check();
    this.session.send(frame);
  }

  // ── the migration ─────────────────────────────────────────────────────────────────
  async run(): Promise<MigrationSummary> {
    const started = this.clock.now();
    const { guest, options } = this;
    const regions: RegionHandle[] = [];
    let tracker: DirtyTracker | undefined;
    let trackerFallbackReason: string | undefined;
    this.session.register(options.migrationId, this);
    try {
      const opened = await guest.openTracker(options.tracker);
      tracker = options.wrapTracker ? options.wrapTracker(opened.tracker) : opened.tracker;
      trackerFallbackReason = opened.fallbackReason;
      if (trackerFallbackReason) this.log.warn({ reason: trackerFallbackReason }, 'uffd-wp unavailable; hash-scan tracking');
      const fd = openSync(this.ram.path, 'r');
      try {
        regions.push(
          this.native.regionMap(fd, this.ram.lengthBytes, this.ram.pageSizeBytes, { writable: false, trackHashes: false, initiallyZero: false }),
        );
      } finally {
        closeSync(fd);
      }
      const summary = await this.migrate(started, regions, tracker, trackerFallbackReason);
      return summary;
    } catch (err) {
      throw await this.recover(err);
    } finally {
      this.releaseGate?.();
      if (this.credits) options.gate?.leave(this.credits);
      this.session.unregister(options.migrationId);
      tracker?.close();
      for (const region of regions) this.native.regionClose(region);
    }
  }

  /** After a failure: resume the source guest if it is still ours, tell the peer, explain. */
  private async recover(err: unknown): Promise<GangwayError> {
    const error =
      err instanceof GangwayError
        ? err
        : new GangwayError(ErrorCode.INTERNAL, err instanceof Error ? err.message : String(err), { cause: err });
    this.fail(error);
    // Nothing more may refer to this guest's pages at the destination.
    this.options.dedup?.group.forgetSlot(this.options.dedup.slot);
    const phase = this.state.phase;
    if (this.state.sourceOwnsGuest) {
      if (this.guest.isPaused) this.guest.resume();
      this.state.to('failed');
      if (this.session.isOpen && !(error instanceof PeerError)) {
        this.session.send(Frame.abort({ migrationId: this.options.migrationId, code: error.code, message: error.message.slice(0, 1024) }));
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
      this.postcopyServe = undefined;
      this.state.to('interrupted');
      try {
        const marked = this.options.registry?.get(this.guest.name).record.outgoing;
        if (marked) this.options.registry?.update(this.guest.name, { outgoing: { ...marked, interrupted: error.message.slice(0, 300) } });
      } catch {}
      this.log.error({ err: error.message, code: error.code }, 'post-copy interrupted: the guest runs at the destination; its missing pages stay here');
      return new GangwayError(
        ErrorCode.POSTCOPY_INTERRUPTED,
        `post-copy of ${this.guest.name} to ${this.options.peerAddress} was interrupted (${error.message}). The guest runs there and waits for pages ` +
          `that only this host holds: its paused copy stays here (${this.ram.path}). Do not resume it here; check \`gangway status\` on both hosts.`,
        { cause: error },
      );
    }
    if (phase === 'committing' || phase === 'postcopy-switch') {
      this.postcopyServe = undefined;
      if (error instanceof PeerError) {
        // The destination answered: it did not start the guest, so ours is still the one.
        try {
          this.options.registry?.update(this.guest.name, { outgoing: undefined });
        } catch {}
        this.guest.resume();
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

  private async migrate(
    started: number,
    regions: RegionHandle[],
    tracker: DirtyTracker,
    trackerFallbackReason: string | undefined,
  ): Promise<MigrationSummary> {
    const { guest, options, ram } = this;
    const pageSize = ram.pageSizeBytes;
    const pageCount = ram.lengthBytes / pageSize;
    const dedup = options.dedup;
    const technique = options.technique ?? 'precopy';
    if (technique !== 'precopy' && dedup) {
      throw new GangwayError(ErrorCode.BAD_REQUEST, 'post-copy and hybrid migrations do not take part in dedup groups');
    }
    if (technique !== 'precopy' && !(this.session.peer?.features.includes('postcopy') ?? false)) {
      throw new GangwayError(ErrorCode.REJECTED, `the destination ${options.peerAddress} cannot run post-copy (it needs root and userfaultfd); use --technique precopy`);
    }
    if (dedup) this.wanted = new PageSet(pageCount);
    /** The pages asked for again since the last call, as runs. */
    const takeWanted = (): Uint32Array => {
      if (!this.wanted || this.wanted.size === 0) return new Uint32Array(0);
      const runs = this.wanted.toRuns();
      this.wanted.clear();
      return runs;
    };

    // Offer.
    const acceptP = this.expect<FrameOf<'accept'>>('accept', 30_000, 'accept');
    this.send(
      Frame.offer({
        migrationId: options.migrationId,
        guest: {
          name: guest.name,
          kind: guest.kind,
          regions: guest.regions.map(({ name, lengthBytes, pageSizeBytes }) => ({ name, lengthBytes, pageSizeBytes })),
          config: {},
        },
        technique: technique === 'postcopy' ? Technique.postcopy : technique === 'hybrid' ? Technique.hybrid : Technique.precopy,
        downtimeBudgetMs: options.downtimeBudgetMs,
        codecs: options.codec === 'raw' ? [Codec.raw] : [Codec.raw, Codec.lz4],
        ...(options.dedup ? { dedup: { group: options.dedup.group.id, slots: [options.dedup.slot] } } : {}),
        ...(options.reservePriority ? { priority: options.reservePriority } : {}),
      }),
    );
    const accept = await acceptP;
    this.secret = accept.secret;
    this.credits = new CreditWindow(accept.creditBytes);
    options.gate?.join(this.credits);
    this.state.to('precopy');

    // The round trip's floor: a ping waits behind whatever is queued on the session (a
    // gang's other members, this migration's own window), so the smallest seen is the
    // latency the switchover's few small frames will pay. Sampled again after every round.
    let minRttMs = await this.session.measureRttMs();
    const sampleRtt = () => {
      this.session.measureRttMs().then(
        (rtt) => (minRttMs = Math.min(minRttMs, rtt)),
        () => {},
      );
    };
    const chooser = new CodecChooser({ mode: options.codec, now: () => this.clock.now() });
    this.chooser = chooser;
    const pool = new BatchPool(Math.min(options.batchBytes, this.session.peerMaxPayloadBytes), 8192);
    const pacer =
      options.pacer ?? (options.bandwidthBytesPerSec ? new Pacer(options.bandwidthBytesPerSec, options.batchBytes, this.clock) : undefined);
    const rounds: RoundRecord[] = [];
    const totals = emptyCounters();
    const linkRate = new RateEstimator();
    let wireBytesPerPage = pageSize;
    const switchoverOverheadMs = () => (ram.lengthBytes / options.digestBytesPerSec) * 1000 + 2 * minRttMs + RESUME_ALLOWANCE_MS;

    const sendRound = async (round: number, runs: Uint32Array, final: boolean, how: { plain?: boolean; noRoundEnd?: boolean } = {}): Promise<RoundRecord> => {
      const t0 = this.clock.now();
      const roundPages = runsPageCount(runs);
      let reported = emptyCounters();
      const counters = await sendRegionRound(
        {
          session: this.session,
          migrationId: options.migrationId,
          pageSizeBytes: pageSize,
          pool,
          chooser,
          credits: this.credits!,
          pacer,
          pipelineDepth: 4,
          // Resident refs are verified at the destination and may be asked for again:
          // not in the final round, where that would be a round trip of downtime.
          ...(dedup && !how.plain ? { dedup: { group: dedup.group, slot: dedup.slot, allowResident: !final } } : {}),
          ...(options.gate ? { gate: { gate: options.gate, owner: this } } : {}),
          onBatch: (c) => {
            this.progress(round, roundPages, c, t0, totals.wireBytes + c.wireBytes);
            options.metrics?.batchSent(reported, c, pageSize);
            reported = { ...c };
          },
        },
        0,
        regions[0]!,
        tracker,
        round,
        runs,
      );
      if (!how.noRoundEnd) this.send(Frame.roundEnd({ migrationId: options.migrationId, round, pageCount: counters.pages, final }));
      addCounters(totals, counters);
      options.metrics?.rounds.inc();
      const record: RoundRecord = { round, final, durationMs: this.clock.now() - t0, dirtyPagesAfter: 0, ...counters };
      rounds.push(record);
      return record;
    };

    /**
     * Post-copy: pause, send the pages the guest needs before it can run, tell the
     * destination which pages it lacks, and once the guest runs there push those pages,
     * answering its faults first. The source keeps every page until the destination has
     * checked the memory it received against the digest of the paused memory here.
     */
    const postcopyRun = async (round: number, pending: Uint32Array, reason: string | undefined): Promise<MigrationSummary> => {
      this.releaseGate ??= await options.gate?.acquire(this);
      await this.credits!.drained();
      const switchoverRttMs = await this.session.measureRttMs();
      this.check();
      this.state.to('stopping');
      const pauseStart = this.clock.now();
      await guest.pause();
      const pausedAt = this.clock.now();
      this.send(Frame.pause({ migrationId: options.migrationId }));
      const T: Record<string, number> = { paused: this.clock.now() };
      const stale = technique === 'postcopy' ? pending : mergeRuns(mergeRuns(pending, await this.collect(tracker), pageCount), takeWanted(), pageCount);
      const eager = guest.eagerRuns();
      const missing = subtractRuns(stale, eager, pageCount);
      const missingPages = runsPageCount(missing);
      T.subtract = this.clock.now();
      const scheduler = new PostcopyScheduler(pageCount, missing);
      T.scheduler = this.clock.now();
      const serveBytes = Math.min(POSTCOPY_BATCH_BYTES, this.session.peerMaxPayloadBytes);
      this.postcopyServe = {
        scheduler,
        round,
        region: regions[0]!,
        payload: Buffer.allocUnsafe(serveBytes),
        entries: new Uint32Array((serveBytes / pageSize + 1) * 3),
        out: new Uint32Array(2),
        faultPages: 0,
        wireBytes: 0,
      };
      // From here on pages go out as they are needed: a window of its own (everything sent
      // before was credited: drained above), the pages the guest needs to start first.
      this.credits = new CreditWindow(POSTCOPY_WINDOW.initialBytes);
      const targetDelayMs = Math.max(POSTCOPY_TARGET_DELAY_MS, 2 * switchoverRttMs);
      this.windowTuner = new WindowTuner({ ...POSTCOPY_WINDOW, targetDelayMs }, this.clock.now());
      T.pre = this.clock.now();
      this.sendNow(this.postcopyServe, eager);
      T.eager = this.clock.now();
      // The guest cannot run there without its devices: they go before the switch.
      const deviceStateBytes = await this.sendDeviceState();
      T.deviceState = this.clock.now();
      this.postcopyServe.faultPages = 0;
      this.state.to('postcopy-switch');
      // From here the destination may run the guest: the record says so, so that nothing
      // (an operator, this agent after a restart) resumes this copy.
      options.registry?.update(guest.name, { outgoing: { migrationId: options.migrationId, to: options.peerAddress, since: new Date().toISOString(), phase: 'postcopy', secret: this.secretHex() } });
      T.journal = this.clock.now();
      const committedP = this.expect<FrameOf<'committed'>>('committed', options.commitTimeoutMs, 'post-copy start confirmation');
      const runsPerFrame = Math.max(1, Math.floor(Math.min(this.session.peerMaxPayloadBytes, 1 << 20) / 8));
      for (let at = 0; at === 0 || at < missing.length; at += runsPerFrame * 2) {
        const chunk = missing.subarray(at, at + runsPerFrame * 2);
        this.send(Frame.postcopy({ migrationId: options.migrationId, region: 0, more: at + runsPerFrame * 2 < missing.length, missing: chunk }));
      }
      const switchSentAt = this.clock.now();
      T.sent = switchSentAt;
      this.log.debug(Object.fromEntries(Object.entries(T).map(([k, v]) => [k, Math.round((v - T.paused!) * 100) / 100])), 'post-copy switchover: ms after the pause');
      const committed = await committedP;
      const committedAt = this.clock.now();
      this.state.to('postcopy');
      this.releaseGate?.();
      this.releaseGate = undefined;
      const downtimeMs = Math.max(0, committedAt - pauseStart - committed.resumeToSendMs - switchoverRttMs / 2);
      this.log.info({ downtimeMs: Math.round(downtimeMs * 10) / 10, missingPages, reason }, 'guest runs at the destination; pushing its missing pages');
      // The paused memory does not change any more: its digest can be taken at leisure.
      const sourceDigests = Promise.all(regions.map((region) => this.native.regionDigest(region, 'full')));
      sourceDigests.catch(() => {});

      const { verified, pushed } = await this.pushMissing({
        scheduler,
        round,
        region: regions[0]!,
        pool: new BatchPool(serveBytes, 8192),
        chooser,
        pacer,
        tracker,
        missingPages,
        totals,
        sourceDigests,
      });
      const digests = await sourceDigests;
      const doneAt = this.clock.now();
      const { faultPages, wireBytes: serveWireBytes } = await this.completePostcopy(verified, digests);
      const wireBytes = totals.wireBytes + serveWireBytes;
      const report = verified.postcopy;
      const summary: MigrationSummary = {
        ...baseSummary(digests, downtimeMs, committedAt - started, wireBytes, tracker, trackerFallbackReason, false),
        deviceStateBytes,
        downtime: {
          pauseMs: pausedAt - pauseStart,
          finalRoundMs: switchSentAt - pausedAt,
          deviceStateMs: T.deviceState - T.eager,
          verifyMs: 0,
          commitMs: committedAt - switchSentAt,
          resumeToSendMs: committed.resumeToSendMs,
          rttMs: switchoverRttMs,
        },
        totalMs: doneAt - started,
        postcopy: {
          ...(reason ? { reason } : {}),
          missingPages,
          durationMs: doneAt - committedAt,
          faultPages,
          pushedPages: pushed,
          faults: report?.faults ?? 0,
          faultLatency: { p50Ms: report?.faultP50Ms ?? 0, p99Ms: report?.faultP99Ms ?? 0, maxMs: report?.faultMaxMs ?? 0 },
          reattaches: this.reattaches,
          resentPages: this.resentPages,
        },
      };
      this.log.info(
        { downtimeMs: Math.round(downtimeMs * 10) / 10, totalMs: Math.round(summary.totalMs), postcopyMs: Math.round(doneAt - committedAt), faults: report?.faults, faultP99Ms: report?.faultP99Ms },
        'post-copy migration complete',
      );
      return summary;
    };

    /** The fields every summary shares. */
    const baseSummary = (
      digests: Uint8Array[],
      downtimeMs: number,
      totalMs: number,
      wireBytes: number,
      tracker_: DirtyTracker,
      fallback: string | undefined,
      forced_: boolean,
    ): Omit<MigrationSummary, 'downtime' | 'deviceStateBytes'> => ({
      migrationId: options.migrationId,
      guest: guest.name,
      technique,
      from: 'local',
      to: options.peerAddress,
      tracker: tracker_.kind,
      ...(fallback ? { trackerFallbackReason: fallback } : {}),
      verified: true,
      digests: digests.map((d) => Buffer.from(d).toString('hex')),
      forced: forced_,
      downtimeMs,
      totalMs,
      rounds,
      memoryBytes: ram.lengthBytes,
      wireBytes,
      zeroPages: totals.zeroPages,
      dataPages: totals.dataPages,
      dedup: {
        enabled: dedup !== undefined,
        ...(dedup ? { group: dedup.group.id } : {}),
        refPages: totals.refPages,
        unchangedPages: totals.unchangedPages,
        hits: { intra: totals.hitsIntra, crossRound: totals.hitsCrossRound, crossGuest: totals.hitsCrossGuest, resident: totals.hitsResident },
        savedBytes: (totals.refPages + totals.unchangedPages) * pageSize,
        wantedPages: this.wantedPages,
      },
      repairedPages: this.repairedPages,
      rawDataBytes: totals.rawBytes,
      compressionRatio: totals.rawBytes > 0 ? totals.payloadBytes / totals.rawBytes : 1,
      linkRateBytesPerSec: linkRate.value ?? 0,
      codecRates: chooserRates(chooser),
    });

    if (technique === 'postcopy') return postcopyRun(0, Uint32Array.of(0, pageCount), undefined);

    // Pre-copy rounds.
    await tracker.arm();
    let runs: Uint32Array = Uint32Array.of(0, pageCount);
    let round = 0;
    let lastCollect = this.clock.now();
    let forced = false;
    let decision: ConvergenceDecision;
    for (;;) {
      const record = await sendRound(round, runs, false);
      // Time held at a gang's switchover gate says nothing about the link.
      linkRate.add(record.wireBytes, record.durationMs - record.gateWaitMs);
      if (record.dataPages > 0) {
        const sample = round === 0 ? (record.payloadBytes / record.dataPages) + 16 : record.wireBytes / record.pages;
        wireBytesPerPage = round <= 1 ? sample : wireBytesPerPage * 0.5 + sample * 0.5;
      }
      sampleRtt();
      runs = mergeRuns(await this.collect(tracker), takeWanted(), pageCount);
      const now = this.clock.now();
      const pending = runsPageCount(runs);
      const dirtyRatePagesPerSec = (pending * 1000) / Math.max(now - lastCollect, 1);
      lastCollect = now;
      record.dirtyPagesAfter = pending;
      const decide = (pendingPages: number) =>
        isPrecopyConverged({
          roundsDone: round + 1,
          pendingPages,
          wireBytesPerPage,
          linkRateBytesPerSec: linkRate.value ?? 1,
          dirtyRatePagesPerSec,
          pauseLatencyMs: PAUSE_LATENCY_MS,
          switchoverOverheadMs: switchoverOverheadMs(),
          safetyFactor: DEFAULT_SAFETY_FACTOR,
          downtimeBudgetMs: options.downtimeBudgetMs,
          wireBytesSent: totals.wireBytes,
          limits: { maxRounds: options.maxRounds, maxWireBytes: options.maxWireBytes },
        });
      decision = decide(pending);
      if (decision.action === 'stop' && options.gate && !this.releaseGate) {
        // A gang member's turn: the others hold back until its switchover is over. Its
        // guest kept writing while it waited for the turn: decide again on what is dirty
        // now, and if that no longer fits, copy another round with the link to itself.
        this.releaseGate = await options.gate.acquire(this);
        runs = mergeRuns(runs, mergeRuns(await this.collect(tracker), takeWanted(), pageCount), pageCount);
        record.dirtyPagesAfter = runsPageCount(runs);
        decision = decide(record.dirtyPagesAfter);
      }
      record.decision = decision.reason;
      this.log.info(
        { round, pages: record.pages, wireBytes: record.wireBytes, ms: Math.round(record.durationMs), dirtyPages: record.dirtyPagesAfter, decision: decision.action, reason: decision.reason },
        'round done',
      );
      if (technique === 'hybrid') {
        const choice = hybridSwitch(decision, round + 1, options.hybrid ?? { postcopyAfterRounds: options.maxRounds });
        if (choice.postcopy) {
          record.decision = choice.reason;
          this.log.info({ round, reason: choice.reason }, 'hybrid: going post-copy');
          return postcopyRun(round + 1, runs, choice.reason);
        }
      }
      if (decision.action === 'stop') break;
      if (decision.action === 'limit') {
        if (!options.force) {
          throw new GangwayError(
            ErrorCode.NON_CONVERGENCE,
            `pre-copy does not converge: ${decision.reason}. Raise --downtime-ms, cap the guest's dirty rate, or pass --force to stop it anyway`,
          );
        }
        forced = true;
        this.log.warn({ reason: decision.reason }, 'limit reached; stopping the guest anyway (--force)');
        break;
      }
      this.check();
      round++;
    }

    // Stop-and-copy. Let the destination catch up first, so the downtime does not include
    // writing out a receive window's worth of pre-copy pages (every gang member's window:
    // the gate holds the others back until this switchover is over).
    this.releaseGate ??= await options.gate?.acquire(this);
    await this.credits.drained();
    // The round trip as it is now, for the downtime measurement: the one taken at the start
    // can be inflated by other migrations starting on the same session.
    const switchoverRttMs = await this.session.measureRttMs();
    this.check();
    this.state.to('stopping');
    const pauseStart = this.clock.now();
    await guest.pause();
    const pausedAt = this.clock.now();
    this.send(Frame.pause({ migrationId: options.migrationId }));
    // The pages collected when the policy said stop were never sent: they join the pages
    // written since (a write-protect tracker reported them once, and only once).
    // Every want about pages sent so far came in before their credits (drained above).
    const finalRuns = mergeRuns(mergeRuns(runs, await this.collect(tracker), pageCount), takeWanted(), pageCount);
    // The source's digest reads the paused memory on the thread pool while the final round goes out.
    const sourceDigests = Promise.all(regions.map((region) => this.native.regionDigest(region, 'full')));
    sourceDigests.catch(() => {});
    await sendRound(round + 1, finalRuns, true);
    const deviceStateAt = this.clock.now();
    const deviceStateBytes = await this.sendDeviceState();
    const finalSentAt = this.clock.now();

    this.state.to('verifying');
    const digests = await sourceDigests;
    // Verify; when the destination's pages differ (a write the tracker missed) and both
    // sides can repair, it sends every page's fingerprint, and the pages that differ go out
    // as one more final round (inside the downtime, so the guest never runs divergent).
    let verifiedAt: number;
    for (let attempt = 0; ; attempt++) {
      const repairable = attempt < MAX_REPAIRS && (this.session.peer?.features.includes('repair') ?? false);
      const theirs = repairable ? this.receiveFingerprints(pageCount) : undefined;
      theirs?.catch(() => {});
      const verifiedP = this.expect<FrameOf<'verified'>>('verified', 60_000, 'verification');
      this.send(Frame.verify({ migrationId: options.migrationId, digests }));
      const verified = await verifiedP;
      verifiedAt = this.clock.now();
      if (verified.match && sameDigests(verified.digests, digests)) {
        this.fingerprintsIn = undefined;
        break;
      }
      const mismatch = `memory digests differ after the final round (source ${hex(digests)}, destination ${hex(verified.digests)})`;
      if (!theirs) throw new GangwayError(ErrorCode.DIGEST_MISMATCH, mismatch);
      const ours = new Uint8Array(pageCount * FINGERPRINT_BYTES);
      this.native.regionFingerprints(regions[0]!, 0, pageCount, ours);
      const differing = differingRuns(ours, await theirs);
      const pages = runsPageCount(differing);
      if (pages === 0) throw new GangwayError(ErrorCode.DIGEST_MISMATCH, `${mismatch}, yet every page's fingerprint agrees`);
      this.log.warn({ pages, attempt: attempt + 1 }, 'pages differ at the switchover (a write the dirty tracker missed): sending them again');
      this.repairedPages += pages;
      options.metrics?.repairedPages.inc(pages);
      // What the mirror says of those destination pages is wrong: forget it, send them plainly.
      dedup?.group.forgetRuns(dedup.slot, differing);
      await sendRound(round + 2 + attempt, differing, true, { plain: true });
    }

    this.state.to('committing');
    // The journal: from the commit on the guest may run there. A restarted agent that finds
    // this asks the destination before it does anything with the paused copy.
    options.registry?.update(guest.name, { outgoing: { migrationId: options.migrationId, to: options.peerAddress, since: new Date().toISOString(), phase: 'commit', secret: this.secretHex() } });
    const committedP = this.expect<FrameOf<'committed'>>('committed', options.commitTimeoutMs, 'commit confirmation');
    if (dedup) {
      // Once the guest runs there its pages change: nothing planned after this point may
      // copy from them, and everything planned before is applied before it starts.
      const ticket = dedup.group.outbox.take();
      dedup.group.forgetSlot(dedup.slot);
      await dedup.group.outbox.turn(ticket);
      try {
        this.send(Frame.commit({ migrationId: options.migrationId }));
      } finally {
        dedup.group.outbox.done(ticket);
      }
    } else {
      this.send(Frame.commit({ migrationId: options.migrationId }));
    }
    const commitSentAt = this.clock.now();
    faultCrash('source-after-commit', this.log);
    const committed = await committedP;
    const committedAt = this.clock.now();
    this.log.debug({ journalMs: commitSentAt - verifiedAt, confirmMs: committedAt - commitSentAt }, 'commit: ms after verified');
    this.state.to('committed');
    this.releaseGate?.();
    this.releaseGate = undefined;

    // The destination runs the guest: end ours and free its memory.
    await guest.discard();

    const downtimeMs = Math.max(0, committedAt - pauseStart - committed.resumeToSendMs - switchoverRttMs / 2);
    const summary: MigrationSummary = {
      ...baseSummary(digests, downtimeMs, committedAt - started, totals.wireBytes, tracker, trackerFallbackReason, forced),
      deviceStateBytes,
      downtime: {
        pauseMs: pausedAt - pauseStart,
        finalRoundMs: finalSentAt - pausedAt,
        deviceStateMs: finalSentAt - deviceStateAt,
        verifyMs: verifiedAt - finalSentAt,
        commitMs: committedAt - verifiedAt,
        resumeToSendMs: committed.resumeToSendMs,
        rttMs: switchoverRttMs,
      },
    };
    this.log.info({ downtimeMs: Math.round(downtimeMs), totalMs: Math.round(summary.totalMs), rounds: rounds.length, wireBytes: totals.wireBytes }, 'migration committed');
    return summary;
  }

  private async collect(tracker: DirtyTracker): Promise<Uint32Array> {
    const started = this.clock.now();
    const runs = await tracker.collect();
    this.options.metrics?.dirtyScan.observe({ tracker: tracker.kind }, (this.clock.now() - started) / 1000);
    return runs;
  }

  private progress(round: number, roundPages: number, counters: RoundCounters, roundStart: number, wireBytes: number): void {
    const now = this.clock.now();
    if (now - this.lastProgressAt < 100 && counters.pages < roundPages) return;
    this.lastProgressAt = now;
    const elapsedMs = now - roundStart;
    const rateBytesPerSec = elapsedMs > 0 ? (counters.pages * this.ram.pageSizeBytes * 1000) / elapsedMs : 0;
    const remaining = roundPages - counters.pages;
    const progress: MigrationProgress = {
      migrationId: this.options.migrationId,
      guest: this.guest.name,
      phase: this.phase,
      round,
      roundPages,
      roundPagesSent: counters.pages,
      percent: roundPages > 0 ? (100 * counters.pages) / roundPages : 100,
      rateBytesPerSec,
      etaMs: rateBytesPerSec > 0 ? (remaining * this.ram.pageSizeBytes * 1000) / rateBytesPerSec : undefined,
      wireBytes,
    };
    this.emit('progress', progress);
  }
}

function chooserRates(chooser: CodecChooser): { lz4?: number; raw?: number } {
  const rates = chooser.rates();
  return {
    ...(rates.lz4 !== undefined ? { lz4: rates.lz4 } : {}),
    ...(rates.raw !== undefined ? { raw: rates.raw } : {}),
  };
}

function sameDigests(a: readonly Uint8Array[], b: readonly Uint8Array[]): boolean {
  return a.length === b.length && a.every((digest, i) => Buffer.from(digest).equals(Buffer.from(b[i]!)));
}

function hex(digests: readonly Uint8Array[]): string {
  return digests.map((d) => Buffer.from(d).toString('hex')).join(',');
}

/** Pages whose 16-byte fingerprints differ between `a` and `b` (4-byte aligned), as runs. */
export function differingRuns(a: Uint8Array, b: Uint8Array): Uint32Array {
  const pages = Math.min(a.length, b.length) / FINGERPRINT_BYTES;
  const wa = new Int32Array(a.buffer, a.byteOffset, pages * 4);
  const wb = new Int32Array(b.buffer, b.byteOffset, pages * 4);
  const differing = new PageSet(pages);
  for (let page = 0, w = 0; page < pages; page++, w += 4) {
    if (wa[w] !== wb[w] || wa[w + 1] !== wb[w + 1] || wa[w + 2] !== wb[w + 2] || wa[w + 3] !== wb[w + 3]) differing.add(page);
  }
  return differing.toRuns();
}

/** `runs` without their first `count` pages. */

