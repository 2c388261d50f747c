// Post-copy at the source: pause, send the pages the guest needs before it can run, tell the
// destination which pages of each region it lacks, and once the guest runs there push those
// pages, answering its faults first. The source keeps every page until the destination has
// checked the memory it received against the digests of the paused memory here. A broken
// link does not end it: the destination's guest waits on its faults, this host reconnects,
// learns what is still missing there and carries on.
import { Codec } from '../../protocol/codes.js';
import { ErrorCode, GangwayError, PeerError } from '../../protocol/errors.js';
import { encodeFrame, Frame, type FrameOf } from '../../protocol/index.js';
import { MIGRATION_SECRET_BYTES } from '../../protocol/limits.js';
import type { DirtyTracker } from '../tracker/dirty-tracker.js';
import { mergeRuns, subtractRuns } from '../tracker/page-set.js';
import type { CodecChooser } from './codec-chooser.js';
import { CreditWindow, type Pacer } from './flow.js';
import { checkRuns, everyPage, laneOf, lanePages, mergeLaneRuns, noPages, type LaneRuns } from './lanes.js';
import { addCounters, BatchPool, creditCost, sendRegionRound, type RoundCounters } from './page-sender.js';
import { PostcopyScheduler, sendMissing, WindowTuner } from './postcopy.js';
import { collectDirty, type ProgressReporter, type RoundSender } from './rounds.js';
import type { SourceSession } from './source-link.js';
import type { MigrationSummary, SourceRun } from './source-types.js';
import { sameDigests } from './digests.js';
import { downtimeOf, hex, pauseForSwitchover, sendDeviceState } from './switchover.js';
import { debugSched, schedSince } from './sched-sample.js';

/**
 * Post-copy keeps few pushed bytes on their way (sent, not yet installed at the
 * destination): a faulted page goes out at once, but still travels behind them. The window
 * follows the link (WindowTuner): about 10 ms of it (at least two round trips), between
 * 256 KiB and 4 MiB, in batches of 128 KiB.
 */
const POSTCOPY_WINDOW = { initialBytes: 256 * 1024, minBytes: 256 * 1024, maxBytes: 4 * 1024 * 1024, periodMs: 100 };
const POSTCOPY_TARGET_DELAY_MS = 10;
const POSTCOPY_BATCH_BYTES = 128 * 1024;
const RECONNECT_FIRST_DELAY_MS = 200;
const RECONNECT_MAX_DELAY_MS = 5_000;
/**
 * Pages per background-push step: one batch. Pages the push has taken are not sent on a
 * fault (each page goes once), so a page taken long before its batch goes out would make
 * a fault on it wait for the whole step (a 2 MiB step: 160 ms at 100 Mbit/s, measured).
 */
const postcopyPushPages = (pageSize: number) => Math.max(1, Math.floor(POSTCOPY_BATCH_BYTES / pageSize));

/** Post-copy needs no dirty tracking (the guest is paused here): what the page sender calls does nothing. */
export const NO_TRACKER: DirtyTracker = {
  kind: 'uffd-wp',
  arm: async () => {},
  collect: async () => new Uint32Array(0),
  remark: () => {},
  noteSent: () => {},
  close: () => {},
};

/** What the destination still lacks, and the fault lane that answers its faults. */
export class PostcopyServer {
  private readonly schedulers: PostcopyScheduler[];
  private readonly payload: Buffer;
  private readonly entries: Uint32Array;
  private readonly out = new Uint32Array(2);
  /** Pages sent because the guest faulted on them (and the pre-paging windows after them). */
  faultPages = 0;
  wireBytes = 0;
  reattaches = 0;
  resentPages = 0;
  private closed = false;

  constructor(
    private readonly run: SourceRun,
    readonly round: number,
    missing: LaneRuns,
  ) {
    this.schedulers = run.lanes.map((lane) => new PostcopyScheduler(lane.pageCount, missing[lane.index] ?? new Uint32Array(0)));
    const serveBytes = Math.min(POSTCOPY_BATCH_BYTES, run.link.session.peerMaxPayloadBytes);
    const smallestPage = Math.min(...run.lanes.map((lane) => lane.region.pageSizeBytes));
    this.payload = Buffer.allocUnsafe(serveBytes);
    this.entries = new Uint32Array((serveBytes / smallestPage + 1) * 3);
    run.link.handlers.fetch = (frame) => this.onFetch(frame);
  }

  get remaining(): number {
    return this.schedulers.reduce((sum, scheduler) => sum + scheduler.remaining, 0);
  }

  get serveBytes(): number {
    return this.payload.length;
  }

  close(): void {
    this.closed = true;
    this.run.link.handlers.fetch = undefined;
  }

  /** The guest faulted on these pages: they go out now, alone, ahead of anything the push has not queued yet; the pre-paging window right behind them. */
  private onFetch(frame: FrameOf<'fetch'>): void {
    if (this.closed) return;
    const lane = laneOf(this.run.lanes, frame.region, 'fetch');
    checkRuns(lane, frame.runs, 'fetch');
    const { faulted, window } = this.schedulers[lane.index]!.onFault(frame.runs);
    this.sendNow(lane.index, faulted);
    this.sendNow(lane.index, window);
  }

  /** Sends `runs` of region `index` at once, raw, without waiting for credits or the pacer. */
  sendNow(index: number, runs: Uint32Array): void {
    if (runs.length === 0) return;
    const { link, lanes, options } = this.run;
    const reader = lanes[index]!.reader;
    const cursor = new Uint32Array(2);
    for (let done = false; !done; ) {
      done = reader.gather(runs, cursor, this.payload, this.entries, this.out);
      const entryCount = this.out[0]!;
      if (entryCount === 0) continue;
      const entries = this.entries.slice(0, entryCount * 3);
      const payload = this.payload.subarray(0, this.out[1]!);
      const frame = Frame.pages({ migrationId: options.migrationId, region: index, round: this.round, codec: Codec.raw, entries, rawBytes: payload.length, payload });
      const [head, body] = encodeFrame(frame);
      // Copied: the buffer is reused by the next fault before the socket is done with it.
      const message = Buffer.concat([head, ...(body ? [body] : [])]);
      link.credits?.force(creditCost(payload.length, payload.length, entryCount));
      link.check();
      this.wireBytes += link.session.sendMessage(message);
      for (let e = 0; e < entryCount; e++) this.faultPages += entries[e * 3 + 2]!;
    }
  }

  /**
   * Pushes what the destination lacks, region by region from wherever its guest last
   * faulted (faults are answered meanwhile), then asks for its verdict on the memory it
   * received. Reattaches when the link breaks.
   */
  async push(ctx: { pool: BatchPool; chooser: CodecChooser; pacer: Pacer | undefined; totals: RoundCounters; sourceDigests: Promise<Buffer[]>; progress: ProgressReporter }): Promise<{ verified: FrameOf<'verified'>; pushed: number }> {
    const { link, lanes, options, clock } = this.run;
    const missingPages = this.remaining;
    const pushStart = clock.now();
    let pushed = 0;
    const pushAndVerify = async (): Promise<FrameOf<'verified'>> => {
      for (const lane of lanes) {
        const scheduler = this.schedulers[lane.index]!;
        const pageSize = lane.region.pageSizeBytes;
        for (;;) {
          link.check();
          const chunk = scheduler.nextChunk(postcopyPushPages(pageSize));
          if (chunk.length === 0) break;
          const counters = await sendRegionRound(
            {
              sink: link.session,
              migrationId: options.migrationId,
              pageSizeBytes: pageSize,
              pool: ctx.pool,
              chooser: ctx.chooser,
              credits: link.credits!,
              pacer: ctx.pacer,
              pipelineDepth: 1,
              queueBytes: POSTCOPY_WINDOW.minBytes,
            },
            lane.index,
            lane.reader,
            NO_TRACKER,
            this.round,
            chunk,
          );
          addCounters(ctx.totals, counters);
          pushed += counters.pages;
          ctx.progress.report(this.round, missingPages, pushed + this.faultPages, pageSize, pushStart, ctx.totals.wireBytes + this.wireBytes);
        }
      }
      // The destination answers once it holds every page: its memory as received, checked
      // against the paused memory here.
      const digests = await ctx.sourceDigests;
      const verifiedP = link.expect('verified', 600_000, 'post-copy completion');
      link.send(Frame.verify({ migrationId: options.migrationId, digests }));
      return verifiedP;
    };
    for (;;) {
      try {
        return { verified: await pushAndVerify(), pushed };
      } catch (err) {
        const answer = await this.reattach(err);
        if (answer) return { verified: answer, pushed };
      }
    }
  }

  /**
   * Post-copy's end at the source: the destination's verdict on the memory it received must
   * match the paused memory here (else DIGEST_MISMATCH, and this copy stays); then the copy
   * goes.
   */
  async complete(verified: FrameOf<'verified'>, digests: Buffer[]): Promise<void> {
    if (!verified.match || !sameDigests(verified.digests, digests)) {
      throw new GangwayError(
        ErrorCode.DIGEST_MISMATCH,
        `the memory ${this.run.options.peerAddress} received differs from this host's at the switchover (source ${hex(digests)}, destination ${hex(verified.digests)})`,
      );
    }
    this.run.state.to('committed');
    this.close();
    await this.run.guest.discard();
  }

  /**
   * After the session broke (`err`): reconnects with backoff and carries the migration on
   * over the new session. Resolves with the destination's verdict when it already holds
   * every page, or undefined once the push can go on (the schedulers then hold what is
   * still missing there: pages lost on the way go again). Rethrows when `err` is not a
   * broken link, or when no session comes within the window.
   */
  async reattach(err: unknown): Promise<FrameOf<'verified'> | undefined> {
    const { options, link, clock, log, lanes } = this.run;
    const error = err instanceof GangwayError ? err : new GangwayError(ErrorCode.INTERNAL, err instanceof Error ? err.message : String(err));
    const linkLost = !(error instanceof PeerError) && (error.code === ErrorCode.PEER_GONE || error.code === ErrorCode.TIMEOUT || error.code === ErrorCode.PEER_UNREACHABLE);
    const reconnect = options.reconnect;
    if (!reconnect || !linkLost) throw error;
    const id = options.migrationId;
    const windowMs = options.reconnectWindowMs ?? 600_000;
    const deadline = clock.now() + windowMs;
    log.warn({ err: error.message, windowMs, remaining: this.remaining }, 'post-copy: the link to the destination broke; reconnecting');
    link.session.unregister(id);
    let delay = RECONNECT_FIRST_DELAY_MS;
    for (let attempt = 1; ; attempt++) {
      if (clock.now() + delay > deadline) {
        throw new GangwayError(ErrorCode.PEER_GONE, `no session to ${options.peerAddress} again within ${Math.round(windowMs / 1000)} s (${attempt - 1} attempts; first ${error.message})`, { cause: error });
      }
      await clock.sleep(delay);
      delay = Math.min(delay * 2, RECONNECT_MAX_DELAY_MS);
      let session: SourceSession;
      try {
        session = await reconnect();
      } catch (connectErr) {
        log.info({ attempt, err: (connectErr as Error).message }, 'post-copy: reconnect failed; trying again');
        continue;
      }
      // A fresh start on the new session: nothing of the old one counts any more.
      link.replaceSession(session, error);
      session.register(id, this.run.owner);
      link.credits = new CreditWindow(link.windowTuner?.bytes ?? POSTCOPY_WINDOW.initialBytes);
      const missing: Uint32Array[][] = lanes.map(() => []);
      let unlisten = () => {};
      const answer = new Promise<{ runs: LaneRuns } | { verified: FrameOf<'verified'> }>((resolve, reject) => {
        unlisten = link.onFail(reject);
        link.handlers.postcopy = (frame) => {
          const lane = laneOf(lanes, frame.region, 'postcopy');
          checkRuns(lane, frame.missing, 'postcopy');
          missing[lane.index]!.push(frame.missing);
          if (!frame.more) resolve({ runs: missing.map((chunks, i) => chunks.reduce((all, runs) => mergeRuns(all, runs, lanes[i]!.pageCount), new Uint32Array(0))) });
        };
        link.handlers.verified = (verified) => resolve({ verified });
        setTimeout(() => reject(new GangwayError(ErrorCode.TIMEOUT, 'no answer to the reattach within 30 s')), 30_000).unref();
      });
      try {
        session.send(Frame.reattach({ migrationId: id, secret: this.run.secretBytes() ?? new Uint8Array(MIGRATION_SECRET_BYTES) }));
        const got = await answer;
        this.reattaches++;
        if ('verified' in got) {
          log.info({ attempt }, 'post-copy: reattached; the destination had every page already');
          return got.verified;
        }
        const before = this.remaining;
        this.schedulers.forEach((scheduler, i) => scheduler.reset([got.runs[i] ?? new Uint32Array(0)]));
        this.resentPages += Math.max(0, this.remaining - before);
        log.info({ attempt, missingPages: this.remaining }, 'post-copy: reattached; pushing what the destination still lacks');
        return undefined;
      } catch (answerErr) {
        if (answerErr instanceof PeerError) {
          throw new GangwayError(ErrorCode.POSTCOPY_INTERRUPTED, `the destination refused to carry on: ${answerErr.message}`, { cause: answerErr });
        }
        log.info({ attempt, err: (answerErr as Error).message }, 'post-copy: reattach failed; trying again');
        session.unregister(id);
      } finally {
        unlisten();
        link.handlers.postcopy = undefined;
        link.handlers.verified = undefined;
      }
    }
  }
}

export type PostcopyResult = Pick<MigrationSummary, 'downtimeMs' | 'downtime' | 'deviceStateBytes' | 'postcopy'> & { digests: Buffer[]; committedAt: number; doneAt: number; wireBytes: number };

/**
 * The post-copy switchover from round `round`, with `pending` collected and not yet sent
 * (a pure post-copy sends everything, as it is once paused), then the push until the
 * destination holds every page. `reason`: why a hybrid went post-copy.
 */
export async function postcopySwitchover(run: SourceRun, sender: RoundSender, round: number, pending: LaneRuns, reason: string | undefined, gate: { held: (() => void) | undefined }): Promise<PostcopyResult> {
  const { options, guest, link, lanes, clock, log, state } = run;
  const eager = guest.eagerRuns();
  const serverFor = (stale: LaneRuns) => {
    const missing = lanes.map((lane) => subtractRuns(stale[lane.index] ?? new Uint32Array(0), eager[lane.index] ?? new Uint32Array(0), lane.pageCount));
    return { missing, missingPages: lanePages(missing), server: new PostcopyServer(run, round, missing) };
  };
  // A pure post-copy sends every page, and of a disk every block that holds data (the
  // sparse disk's data runs are read at the pause: a block the guest wrote into a hole
  // since the migration started is data too). A memory-only one's pages do not depend on
  // the pause: its server is made before it, not inside the downtime (its first one cost
  // 2 ms cold, and its allocations could start a collection there).
  const pure = (options.technique ?? 'precopy') === 'postcopy';
  const early = pure && !lanes.some((lane) => lane.region.sparse) ? serverFor(await everyPage(lanes, 'send')) : undefined;
  // The journal says 'postcopy' from before the pause: nothing is written to disk inside the downtime.
  let paused;
  try {
    paused = await pauseForSwitchover(run, gate, 'postcopy');
  } catch (err) {
    early?.server.close();
    throw err;
  }
  const { switchoverRttMs, pauseStart, pausedAt } = paused;
  const T: Record<string, number> = { paused: clock.now() };
  const sched = debugSched(log);
  const { missing, missingPages, server } = early ?? serverFor(pure ? await everyPage(lanes, 'send') : mergeLaneRuns(lanes, pending, await collectDirty(run)));
  T.subtract = clock.now();
  try {
    // From here on pages go out as they are needed: a window of its own (everything sent
    // before was credited: drained above), the pages the guest needs to start first.
    link.credits = new CreditWindow(POSTCOPY_WINDOW.initialBytes);
    const targetDelayMs = Math.max(POSTCOPY_TARGET_DELAY_MS, 2 * switchoverRttMs);
    link.windowTuner = new WindowTuner({ ...POSTCOPY_WINDOW, targetDelayMs }, clock.now());
    T.pre = clock.now();
    for (const lane of lanes) server.sendNow(lane.index, eager[lane.index] ?? new Uint32Array(0));
    T.eager = clock.now();
    // The guest cannot run there without its devices: they go before the switch.
    const deviceStateBytes = await sendDeviceState(run);
    T.deviceState = clock.now();
    server.faultPages = 0;
    // From here the destination may run the guest: the record has said so since before the
    // pause (pauseForSwitchover), so that nothing (an operator, this agent after a restart)
    // resumes this copy.
    state.to('postcopy-switch');
    const committedP = link.expect('committed', options.commitTimeoutMs, 'post-copy start confirmation');
    link.check();
    sendMissing(link.session, options.migrationId, missing);
    const switchSentAt = clock.now();
    T.sent = switchSentAt;
    const committed = await committedP;
    const committedAt = clock.now();
    T.committed = committedAt;
    log.debug({ ...Object.fromEntries(Object.entries(T).map(([k, v]) => [k, Math.round((v - T.paused!) * 100) / 100])), ...schedSince(sched), atMs: performance.timeOrigin + T.paused! }, 'post-copy switchover: ms after the pause');
    state.to('postcopy');
    gate.held?.();
    gate.held = undefined;
    const downtimeMs = downtimeOf(paused, committedAt, committed.resumeToSendMs);
    log.info({ downtimeMs: Math.round(downtimeMs * 10) / 10, missingPages, reason }, 'guest runs at the destination; pushing its missing pages');
    // The paused memory does not change any more: its digests can be taken at leisure.
    const sourceDigests = Promise.all(lanes.map((lane) => lane.reader.digest()));
    sourceDigests.catch(() => {});

    const { verified, pushed } = await server.push({
      pool: new BatchPool(server.serveBytes, 8192),
      chooser: sender.chooser,
      pacer: sender.pacer,
      totals: sender.totals,
      sourceDigests,
      progress: sender.progress,
    });
    const digests = await sourceDigests;
    const doneAt = clock.now();
    await server.complete(verified, digests);
    const report = verified.postcopy;
    log.info(
      { downtimeMs: Math.round(downtimeMs * 10) / 10, postcopyMs: Math.round(doneAt - committedAt), faults: report?.faults, faultP99Ms: report?.faultP99Ms },
      'post-copy migration complete',
    );
    return {
      digests,
      committedAt,
      doneAt,
      wireBytes: sender.totals.wireBytes + server.wireBytes,
      downtimeMs,
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
      postcopy: {
        ...(reason ? { reason } : {}),
        missingPages,
        durationMs: doneAt - committedAt,
        faultPages: server.faultPages,
        pushedPages: pushed,
        faults: report?.faults ?? 0,
        faultLatency: { p50Ms: report?.faultP50Ms ?? 0, p99Ms: report?.faultP99Ms ?? 0, maxMs: report?.faultMaxMs ?? 0 },
        reattaches: server.reattaches,
        resentPages: server.resentPages,
      },
    };
  } finally {
    server.close();
  }
}

/**
 * After this agent restarted: the guest runs at the destination since the post-copy
 * switchover and waits there for pages only this paused copy holds. Reattaches (the
 * destination says what it still lacks, or that it has everything), pushes that, and
 * completes as the original migration would have: on a matching digest the paused copy
 * goes.
 */
export async function resumeServing(run: SourceRun, chooser: CodecChooser, pacer: Pacer | undefined, progress: ProgressReporter, totals: RoundCounters): Promise<{ pushedPages: number; faultPages: number }> {
  const { link, lanes, clock, log } = run;
  run.state.to('postcopy');
  const server = new PostcopyServer(run, 0, noPages(lanes));
  try {
    link.windowTuner = new WindowTuner({ ...POSTCOPY_WINDOW, targetDelayMs: POSTCOPY_TARGET_DELAY_MS }, clock.now());
    const sourceDigests = Promise.all(lanes.map((lane) => lane.reader.digest()));
    sourceDigests.catch(() => {});
    const early = await server.reattach(new GangwayError(ErrorCode.PEER_GONE, 'this agent restarted during post-copy'));
    const { verified, pushed } = early
      ? { verified: early, pushed: 0 }
      : await server.push({ pool: new BatchPool(server.serveBytes, 8192), chooser, pacer, totals, sourceDigests, progress });
    await server.complete(verified, await sourceDigests);
    log.info({ pushedPages: pushed, faultPages: server.faultPages }, 'post-copy completed after this agent restarted; the paused copy is gone');
    return { pushedPages: pushed, faultPages: server.faultPages };
  } finally {
    server.close();
  }
}
