// Pre-copy's end, stop-and-copy: pause, the last dirty pages of every region, the device
// state, a 128-bit digest per region compared on both sides (with a repair of the pages a
// tracker missed), and a two-phase switchover: the destination starts the guest and
// confirms; only then is the source guest ended. The guest never runs on both hosts, and
// never runs at the destination on memory that differs from the paused source's.
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { Frame } from '../../protocol/index.js';
import { FINGERPRINT_BYTES, MAX_DEVICE_STATE_BYTES } from '../../protocol/limits.js';
import { runsPageCount } from '../tracker/page-set.js';
import { sameDigests } from './digests.js';
import { faultCrash } from './faults.js';
import { differingRuns, laneOf, lanePages, mergeLaneRuns, noPages, type LaneRuns } from './lanes.js';
import { collectDirty, type RoundSender } from './rounds.js';
import type { MigrationSummary, SourceRun } from './source-types.js';

/** Repair rounds after a digest mismatch before the migration fails (and the guest runs on here). */
const MAX_REPAIRS = 2;
/** Device state goes in chunks of this size at most (a frame each). */
const DEVICE_STATE_CHUNK_BYTES = 4 * 1024 * 1024;

/**
 * The paused guest's device state as deviceState chunks, none when it has none; returns
 * its size. The destination checks the total against its limit before it allocates.
 */
export async function sendDeviceState(run: SourceRun, saved?: Promise<Uint8Array>): Promise<number> {
  const state = await (saved ?? run.guest.saveDeviceState());
  const chunkBytes = Math.min(run.link.session.peerMaxPayloadBytes, MAX_DEVICE_STATE_BYTES, DEVICE_STATE_CHUNK_BYTES);
  for (let at = 0; at < state.length; at += chunkBytes) {
    run.link.send(Frame.deviceState({ migrationId: run.options.migrationId, offsetBytes: at, totalBytes: state.length, state: state.subarray(at, at + chunkBytes) }));
  }
  return state.length;
}

export function hex(digests: readonly Uint8Array[]): string {
  return digests.map((d) => Buffer.from(d).toString('hex')).join(',');
}

/** The destination's fingerprint of every page of every region, as its pageFingerprints frames bring them. */
function receiveFingerprints(run: SourceRun): { fingerprints: Promise<Uint8Array[]>; stop: () => void } {
  const { lanes, link } = run;
  const fps = lanes.map((lane) => new Uint8Array(lane.pageCount * FINGERPRINT_BYTES));
  let remaining = lanes.reduce((sum, lane) => sum + lane.pageCount, 0);
  let stop = () => {};
  const fingerprints = new Promise<Uint8Array[]>((resolve, reject) => {
    const unlisten = link.onFail(reject);
    stop = () => {
      unlisten();
      link.handlers.pageFingerprints = undefined;
    };
    link.handlers.pageFingerprints = (frame) => {
      const lane = laneOf(lanes, frame.region, 'pageFingerprints');
      const count = frame.fingerprints.length / FINGERPRINT_BYTES;
      const into = fps[lane.index]!;
      if ((frame.firstPage + count) * FINGERPRINT_BYTES > into.length) {
        throw new GangwayError(ErrorCode.UNEXPECTED_FRAME, `pageFingerprints (region ${frame.region}, from page ${frame.firstPage}) past the region's ${lane.pageCount} pages`);
      }
      into.set(frame.fingerprints, frame.firstPage * FINGERPRINT_BYTES);
      remaining -= count;
      if (remaining <= 0) {
        stop();
        resolve(fps);
      }
    };
  });
  fingerprints.catch(() => {});
  return { fingerprints, stop };
}

/** When the guest was paused, and the round trip the downtime measurement takes off. */
export interface Paused {
  switchoverRttMs: number;
  pauseStart: number;
  pausedAt: number;
}

/**
 * The start of every switchover (stop-and-copy and post-copy's): this migration's turn at a
 * gang's gate, the destination caught up, the round trip measured, the guest paused, and
 * the destination told.
 */
/**
 * The disks that move, for the journal: they are the destination's once the guest runs
 * there, and whoever resolves the switchover (resolveOutgoing) removes this host's copies.
 */
export function movedDisksOf(guest: SourceRun['guest']): { movedDisks?: string[] } {
  const movedDisks = guest.regions.filter((region) => region.sparse).map((region) => region.path);
  return movedDisks.length ? { movedDisks } : {};
}

/**
 * What the journal says while the guest is paused: 'paused' (a stop-and-copy: a restarted
 * agent resumes the guest without asking, since nothing may run there before the commit),
 * or 'postcopy' (written here, before the pause, rather than between the device state and
 * the switch frame, where a record write took 0.6-7.4 ms of a post-copy downtime of 10 ms
 * on this machine's ext4 under other engineers' builds). A restarted agent that finds
 * 'postcopy' asks the destination, which answers `unknown` for a switch that never reached
 * it (it journals nothing before its guest starts), and then resumes the guest here. The
 * cost: an agent killed in the few ms before the switch frame waits for the destination's
 * answer instead of resuming at once.
 */
export type PausedPhase = 'paused' | 'postcopy';

export async function pauseForSwitchover(run: SourceRun, gate: { held: (() => void) | undefined }, phase: PausedPhase = 'paused'): Promise<Paused> {
  const { options, guest, link, clock, state } = run;
  // The destination's standby guest must be up before the guest stops here: a pure
  // post-copy pauses right after the accept, and a QEMU standby took 40-70 ms to start,
  // which its device state's load waited out inside the downtime. (Before a gang's gate:
  // the others need not wait on this one's standby.)
  const standbyReady = run.standbyReady();
  if (standbyReady) await link.unlessFailed(standbyReady);
  // Let the destination catch up first, so the downtime does not include writing out a
  // receive window's worth of pre-copy pages (every gang member's window: the gate holds
  // the others back until this switchover is over).
  gate.held ??= await options.gate?.acquire(run.owner);
  await link.credits!.drained();
  // The round trip as it is now, for the downtime measurement: the one taken at the start
  // can be inflated by other migrations starting on the same session.
  const switchoverRttMs = await link.session.measureRttMs();
  link.check();
  // The journal, before the pause: an agent that dies from here until the commit (or the
  // post-copy switch) goes out finds its guest paused for a switchover that never reached
  // the destination, and resumes it (resolveOutgoing).
  const secret = phase === 'postcopy' ? { secret: run.secretHex() } : {};
  options.registry?.update(guest.name, { outgoing: { migrationId: options.migrationId, to: options.peerAddress, since: new Date().toISOString(), phase, ...secret, ...movedDisksOf(guest) } });
  // Outside the downtime: what the device state's save can do before the guest stops.
  await link.unlessFailed(guest.prepareDeviceStateSave?.() ?? Promise.resolve());
  state.to('stopping');
  const pauseStart = clock.now();
  await guest.pause();
  const pausedAt = clock.now();
  faultCrash('source-after-pause', run.log);
  link.send(Frame.pause({ migrationId: options.migrationId }));
  return { switchoverRttMs, pauseStart, pausedAt };
}

/**
 * The journal: from the commit on the guest may run there. A restarted agent that finds
 * this asks the destination before it does anything with the paused copy.
 */
function journalCommit(run: SourceRun): void {
  const { options, guest } = run;
  options.registry?.update(guest.name, { outgoing: { migrationId: options.migrationId, to: options.peerAddress, since: new Date().toISOString(), phase: 'commit', secret: run.secretHex(), ...movedDisksOf(guest) } });
}

/**
 * Downtime on the source's clock: pause to `committed`, less the time the destination says
 * passed between its guest running and its answer, less half the round trip.
 */
export function downtimeOf(paused: Paused, committedAt: number, resumeToSendMs: number): number {
  return Math.max(0, committedAt - paused.pauseStart - resumeToSendMs - paused.switchoverRttMs / 2);
}

export interface StopAndCopyResult {
  digests: Buffer[];
  deviceStateBytes: number;
  downtimeMs: number;
  downtime: MigrationSummary['downtime'];
  committedAt: number;
  repairedPages: number;
}

/**
 * Stop-and-copy after pre-copy round `round`, `runs` being the pages collected and not yet
 * sent. `gate.held` is this migration's turn at a gang's switchover gate, if it has it.
 */
export async function stopAndCopy(run: SourceRun, sender: RoundSender, round: number, runs: LaneRuns, gate: { held: (() => void) | undefined }): Promise<StopAndCopyResult> {
  const { options, guest, link, lanes, clock, log, state } = run;
  const dedup = options.dedup;
  const { switchoverRttMs, pauseStart, pausedAt } = await pauseForSwitchover(run, gate);
  // The pages collected when the policy said stop were never sent: they join the pages
  // written since (a write-protect tracker reported them once, and only once).
  // Every want about pages sent so far came in before their credits (drained above).
  // The source's digests read the paused memory on the thread pool while the final scan
  // and the final round go out: the memory no longer changes, and the digest is the
  // longest step of the switchover (35-45 ms per GiB here), so it starts first.
  let digestedAt = Number.NaN;
  const sourceDigests = Promise.all(lanes.map((lane) => lane.reader.digest())).then((digests) => {
    digestedAt = clock.now();
    return digests;
  });
  sourceDigests.catch(() => {});
  const finalRuns = mergeLaneRuns(lanes, runs, await collectDirty(run));
  const scannedAt = clock.now();
  // The device state is saved while the final round goes out, unless the guest says it
  // cannot be: the guest's own process writes it (QEMU's migration thread, x-ignore-shared:
  // none of the memory this side reads).
  const saved = guest.saveAfterFinalRound ? undefined : guest.saveDeviceState();
  saved?.catch(() => {});
  try {
    await sender.send(round + 1, finalRuns, true);
  } catch (err) {
    // The guest resumes here: not before QEMU's save is over (it takes no `cont` while migrating).
    await saved?.catch(() => {});
    throw err;
  }
  const deviceStateAt = clock.now();
  const deviceStateBytes = await sendDeviceState(run, saved);
  const finalSentAt = clock.now();

  state.to('verifying');
  const digests = await sourceDigests;
  // Verify; when the destination's pages differ (a write the tracker missed) and both sides
  // can repair, it sends every page's fingerprint, and the pages that differ go out as one
  // more final round (inside the downtime, so the guest never runs divergent).
  let verifiedAt: number;
  let repairedPages = 0;
  for (let attempt = 0; ; attempt++) {
    const repairable = attempt < MAX_REPAIRS && (link.session.peer?.features.includes('repair') ?? false);
    const theirs = repairable ? receiveFingerprints(run) : undefined;
    const verifiedP = link.expect('verified', 60_000, 'verification');
    link.send(Frame.verify({ migrationId: options.migrationId, digests }));
    // The journal's commit record goes in while the destination checks its memory, not
    // after its answer (a record write took 1-4 ms here, more under others' disk I/O). It
    // says only "ask the destination before touching this copy": until the commit frame
    // goes out this side still owns the guest, and a failure before it clears the record
    // and resumes the guest (MigrationSource.recover); a restarted agent that finds it asks
    // the destination, which answers `unknown` for a migration it never committed.
    if (attempt === 0) journalCommit(run);
    const verified = await verifiedP;
    verifiedAt = clock.now();
    if (verified.match && sameDigests(verified.digests, digests)) {
      theirs?.stop();
      break;
    }
    const mismatch = `memory digests differ after the final round (source ${hex(digests)}, destination ${hex(verified.digests)})`;
    if (!theirs) throw new GangwayError(ErrorCode.DIGEST_MISMATCH, mismatch);
    const theirFps = await theirs.fingerprints;
    const differing = noPages(lanes);
    for (const lane of lanes) {
      const ours = new Uint8Array(lane.pageCount * FINGERPRINT_BYTES);
      lane.reader.fingerprints(0, lane.pageCount, ours);
      differing[lane.index] = differingRuns(ours, theirFps[lane.index]!);
    }
    const pages = lanePages(differing);
    if (pages === 0) throw new GangwayError(ErrorCode.DIGEST_MISMATCH, `${mismatch}, yet every page's fingerprint agrees`);
    log.warn(
      { pages, attempt: attempt + 1, regions: differing.map((r, i) => ({ region: i, pages: runsPageCount(r), first: Array.from(r.subarray(0, 16)) })).filter((r) => r.pages > 0) },
      'pages differ at the switchover (a write the dirty tracker missed): sending them again',
    );
    repairedPages += pages;
    options.metrics?.repairedPages.inc(pages);
    // What the mirror says of those destination pages is wrong: forget it, send them plainly.
    if (dedup) for (const lane of lanes) if (lane.slot !== undefined) dedup.group.forgetRuns(lane.slot, differing[lane.index]!);
    await sender.send(round + 2 + attempt, differing, true, { plain: true });
  }

  state.to('committing');
  const committedP = link.expect('committed', options.commitTimeoutMs, 'commit confirmation');
  if (dedup) {
    // Once the guest runs there its pages change: a ref planned after this point copies
    // from them only as from resident memory (verified there), or not at all from a peer
    // that refuses those; everything planned before is applied before the guest starts.
    const ticket = dedup.group.outbox.take();
    for (const lane of lanes) if (lane.slot !== undefined) dedup.group.committing(lane.slot, lane.written && (() => lane.written!.toRuns()));
    await dedup.group.outbox.turn(ticket);
    try {
      link.send(Frame.commit({ migrationId: options.migrationId }));
    } finally {
      dedup.group.outbox.done(ticket);
    }
  } else {
    link.send(Frame.commit({ migrationId: options.migrationId }));
  }
  const commitSentAt = clock.now();
  faultCrash('source-after-commit', log);
  const committed = await committedP;
  const committedAt = clock.now();
  log.debug({ commitSendMs: commitSentAt - verifiedAt, confirmMs: committedAt - commitSentAt, atMs: performance.timeOrigin + verifiedAt }, 'commit: ms after verified');
  state.to('committed');
  gate.held?.();
  gate.held = undefined;

  // The destination runs the guest: end ours and free its memory.
  await guest.discard();

  return {
    digests,
    deviceStateBytes,
    downtimeMs: downtimeOf({ switchoverRttMs, pauseStart, pausedAt }, committedAt, committed.resumeToSendMs),
    downtime: {
      pauseMs: pausedAt - pauseStart,
      finalRoundMs: finalSentAt - pausedAt,
      deviceStateMs: finalSentAt - deviceStateAt,
      verifyMs: verifiedAt - finalSentAt,
      commitMs: committedAt - verifiedAt,
      resumeToSendMs: committed.resumeToSendMs,
      rttMs: switchoverRttMs,
      finalScanMs: scannedAt - pausedAt,
      sourceDigestMs: digestedAt - pausedAt,
    },
    committedAt,
    repairedPages,
  };
}
