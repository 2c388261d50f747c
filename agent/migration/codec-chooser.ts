// "LZ4 where it pays": compression helps only while the link is slower than the
// compressor. Rather than model both, measure what matters, the bytes of data pages
// delivered per second (between the receiver's credits for consecutive batches; what the
// codec acts on), in windows of batches sent raw and sent compressed, and keep the faster;
// re-probe the other mode now and then because the link and the content change.
//
// Deliveries come back in bursts (the receiver returns credit for several batches at once),
// so a window closes only once it spans `minWindowMs` as well as its batches: windows of 8
// batches delivered within a millisecond measured 30-70 GB/s on loopback, and one such
// sample kept LZ4 on for a whole migration. Every probe of the loser is a window at the
// worse rate, so probes are spaced in time, not batches (on a fast link a count of batches
// is over in a blink), and each probe that confirms the winner doubles the wait before the
// next. What a session's link measured is shared by the migrations on it (CodecMemory): a
// later guest starts where the earlier one ended instead of exploring again.

export type CodecMode = 'auto' | 'lz4' | 'raw';
export type BatchCodec = 'lz4' | 'raw';

/** What the choosers of one session's migrations measured last (PeerSession.codecMemory). */
export interface CodecMemory {
  rates: Record<BatchCodec, number | undefined>;
  /** When each rate was last measured (the choosers' clock). */
  measuredAt: Record<BatchCodec, number>;
  /** The wait between probes, as the last probe left it (ms). */
  exploitMs: number | undefined;
}

export function emptyCodecMemory(): CodecMemory {
  return { rates: { lz4: undefined, raw: undefined }, measuredAt: { lz4: -Infinity, raw: -Infinity }, exploitMs: undefined };
}

/**
 * Batches being compressed, by chooser, in this process: how many now, and the integral of
 * that count over time (batch-milliseconds) up to `at`, from which a batch's average company
 * is read (Little's law, CodecChooser.compressing).
 */
interface Compressions {
  count: number;
  area: number;
  at: number;
}
const compressionsInFlight = new Map<CodecChooser, Compressions>();

/** Brings `c.area` up to `now`. */
function accrue(c: Compressions, now: number): void {
  c.area += c.count * (now - c.at);
  c.at = now;
}

/** A session's measurements older than this are explored again. */
const MEMORY_TTL_MS = 120_000;
/**
 * Explore and probe send a mode for at most this many windows of batches before moving on,
 * measured or not: the measurement comes back only after what is in flight, and waiting
 * for it would send all of that in the mode being tried (on a slow link with a deep queue,
 * a probe of the loser cost a tenth of the migration's time). A probe's rate then comes
 * back while the winner is sent again. The explore, once per session, waits longer.
 */
const EXPLORE_WINDOWS = 3;
const PROBE_WINDOWS = 1.5;
/**
 * A compressor this many times slower than raw's rate ends LZ4's try at its first batch; one
 * closer to raw takes a window of batches first. The first batches a process compresses are
 * cold (its thread pool starting, the code paging in): on the 1 Gbit/s link one measured
 * 98 MB/s against raw's 120, where warm ones do 240, and raw was kept for most of a migration.
 */
const FAR_BEHIND = 2;

/**
 * The longest wait between probes of the loser: a probe costs about 20 ms of a 1 Gbit/s link
 * (4 MiB raw where LZ4 wins) or 10 ms of loopback (a window of LZ4 where raw wins), 1% or
 * less of this; and a loser measured during a stall is measured again within it (at 8 s it
 * outlasted a serial run of four 128 MiB guests).
 */
const MAX_EXPLOIT_MS = 2_000;

export interface CodecChooserOptions {
  mode: CodecMode;
  /** Batches per measurement window (at least). */
  windowBatches?: number;
  /** A window spans at least this long (ms), whatever its batches. */
  minWindowMs?: number;
  /** Time on the winner before the first probe of the loser (ms); doubles while probes confirm it. */
  exploitMs?: number;
  /** The longest wait between probes (ms). */
  maxExploitMs?: number;
  now?: () => number;
  /** Shared with the session's other migrations: read at the start, updated with every sample. */
  memory?: CodecMemory;
}

type Phase = 'explore' | 'exploit' | 'probe';

export class CodecChooser {
  /** Batches per measurement window: a rate measured from deliveries needs this many in a row. */
  readonly windowBatches: number;
  private readonly minWindowMs: number;
  private readonly baseExploitMs: number;
  private readonly maxExploitMs: number;
  private exploitMs: number;
  private readonly now: () => number;
  private readonly rate: Record<BatchCodec, number | undefined> = { lz4: undefined, raw: undefined };
  private current: BatchCodec;
  /**
   * Explore: each mode until it is measured (raw first); exploit: the faster for
   * `exploitMs`; probe: the slower until it is measured again. What each mode achieves is
   * learned from deliveries, which lag by whatever is in flight.
   */
  private phase: Phase = 'explore';
  private phaseStart: number;
  private sentInPhase = 0;
  /** The loser a probe is measuring again, until its rate comes back. */
  private probing: BatchCodec | undefined;
  /** What the compressor takes in, guest bytes per second with the sender's parallelism (an upper bound on LZ4's rate). */
  private compressBound: number | undefined;
  /** Batches compressBound was taken from since LZ4's explore or probe began (the bound ends one only on its own batches). */
  private compressSamples = 0;
  /**
   * Batches sent and not yet delivered, oldest first: the mode tried for each (none: no
   * data to compress), and whether the sender had paused before it.
   */
  private readonly inflight: { guestBytes: number; mode: BatchCodec | 'none'; afterPause: boolean }[] = [];
  private paused = false;
  /** Consecutive deliveries of one mode: the first one starts the clock. */
  private window: { mode: BatchCodec | undefined; count: number; guestBytes: number; start: number } = {
    mode: undefined,
    count: 0,
    guestBytes: 0,
    start: 0,
  };

  constructor(private readonly options: CodecChooserOptions) {
    this.windowBatches = options.windowBatches ?? 8;
    this.minWindowMs = options.minWindowMs ?? 10;
    this.baseExploitMs = options.exploitMs ?? 500;
    this.maxExploitMs = options.maxExploitMs ?? MAX_EXPLOIT_MS;
    this.exploitMs = this.baseExploitMs;
    this.now = options.now ?? (() => performance.now());
    this.phaseStart = this.now();
    // Explore raw first: it is measured in a few batches on a fast link, and LZ4 then
    // costs only as long as it takes to find it cannot keep up (compressed()).
    this.current = options.mode === 'lz4' ? 'lz4' : 'raw';
    const memory = options.memory;
    const newest = memory ? Math.max(memory.measuredAt.lz4, memory.measuredAt.raw) : -Infinity;
    if (options.mode === 'auto' && memory && memory.rates.lz4 !== undefined && memory.rates.raw !== undefined && this.now() - newest <= MEMORY_TTL_MS) {
      // The session's link was measured lately: start on its winner, and go on with the
      // probes where the session's last migration left them, so that a run of short
      // migrations neither probes at each start nor never (a wrong winner recalled for good
      // kept raw on for a whole 1 Gbit/s migration, LZ4 for a loopback one).
      this.rate.lz4 = memory.rates.lz4;
      this.rate.raw = memory.rates.raw;
      this.exploitMs = Math.min(memory.exploitMs ?? this.baseExploitMs, this.maxExploitMs);
      this.enter('exploit');
      this.phaseStart = memory.measuredAt[this.current === 'lz4' ? 'raw' : 'lz4'];
      // Due already: the probe starts with the first batch or piece. A raw winner waited
      // for its first channel piece to be written (measuredOnChannels), two 16 MiB pieces
      // in flight: a quarter of a 128 MiB guest sent raw on a recalled rate that a stall
      // had left.
      if (this.now() - this.phaseStart >= this.exploitMs) this.probeLoser();
    }
  }

  /** The codec to try for the next batch. */
  next(): BatchCodec {
    return this.current;
  }

  /**
   * The codec `next()` names is being measured (an explore or a probe of it): a sender that
   * learns its rate only when a large piece completes (channels) sends one piece at a time
   * meanwhile, or it would send several of a mode that may be the slower one.
   */
  measuring(): boolean {
    return this.options.mode === 'auto' && this.phase !== 'exploit';
  }

  /**
   * LZ4 is being measured, and its deliveries will say how it does: the compressor is not
   * far behind raw's rate (FAR_BEHIND), which ends a try at its first batch. Raw still on
   * its way on other paths (channels) then takes part of the link from it, and a sender
   * lets that be written first (sendRoundOnChannels).
   */
  judgedByDeliveries(): boolean {
    if (!this.measuring() || this.current !== 'lz4') return false;
    // Before this migration compressed a batch: what LZ4 did last (the session's memory).
    const lz4 = this.compressBound ?? this.rate.lz4;
    const raw = this.rate.raw;
    return raw === undefined || lz4 === undefined || lz4 * FAR_BEHIND > raw;
  }

  /** Measured guest-bytes-per-second of each codec, for reports. */
  rates(): Readonly<Record<BatchCodec, number | undefined>> {
    return this.rate;
  }

  /**
   * A batch carrying `guestBytes` of data pages (before compression) went out, compressed
   * or not as `mode` said ('none': it held no data to compress, e.g. only zero runs).
   */
  sent(guestBytes: number, mode: BatchCodec | 'none'): void {
    if (this.options.mode !== 'auto') return;
    this.inflight.push({ guestBytes, mode, afterPause: this.paused });
    this.paused = false;
    if (mode !== this.current) return;
    this.sentInPhase++;
    if (this.phase === 'exploit') {
      if (this.now() - this.phaseStart >= this.exploitMs) this.probeLoser();
    } else if (this.sentInPhase >= this.windowBatches * (this.phase === 'probe' ? PROBE_WINDOWS : EXPLORE_WINDOWS)) {
      // Enough of this mode is on its way to be measured (its rate comes back later), or
      // deliveries carry no measure of it: go on.
      this.advance();
    }
  }

  /**
   * Raw pages went on the migration's channels (source-channels.ts) and the destination
   * wrote them at `bytesPerSec` of guest data, the channels together, over the time they
   * were sending: that is
   * raw's rate now (deliveries on the session say nothing of it). As sent() does, it moves
   * an exploit of raw that has lasted on to a probe of LZ4.
   */
  measuredOnChannels(bytesPerSec: number): void {
    if (this.options.mode !== 'auto') return;
    const previous = this.rate.raw;
    this.rate.raw = previous === undefined ? bytesPerSec : previous * 0.5 + bytesPerSec * 0.5;
    this.remember('raw', this.now());
    this.measured('raw');
    if (this.phase === 'exploit' && this.current === 'raw' && this.now() - this.phaseStart >= this.exploitMs) this.probeLoser();
  }

  /** The exploit's wait is over: the loser is measured again. */
  private probeLoser(): void {
    this.phase = 'probe';
    this.phaseStart = this.now();
    this.sentInPhase = 0;
    this.current = this.current === 'lz4' ? 'raw' : 'lz4';
    this.probing = this.current;
    this.compressSamples = 0;
  }

  /**
   * The sender stops for a while (its round ended, a gang's gate held it): the first batch
   * it sends next starts a window of its own, or the pause would count against its codec.
   */
  pause(): void {
    this.paused = true;
  }

  /**
   * A batch starts compressing; call the returned function with its size once it is done.
   * LZ4 delivers no more than the compressor takes in: once that bound is below raw's
   * measured rate, trying LZ4 further only costs, so its explore or probe ends then, with
   * the bound as its rate (at once when it is far behind, FAR_BEHIND). The bound is Little's
   * law over this chooser's batches: those in flight (queued on the thread pool or
   * compressing), averaged over a batch's time there, over that time. The average is over
   * time, not of the counts at the batch's start and end: a probe's first batch compresses
   * nearly alone while the sender gathers the next ones, and the counts at its ends (1, then
   * 4) made it 544 MB/s on loopback where the next one did 191. The probe's verdict then put
   * LZ4 at 368, and a later migration whose first raw pieces came slowly (134-221 MB/s)
   * turned to LZ4 on that rate and compressed 21 batches at 100-200 before its deliveries
   * turned it back. The bound holds only while these batches are all the process
   * compresses: another chooser's share the same cores.
   */
  compressing(): (rawBytes: number) => void {
    const start = this.now();
    let mine = compressionsInFlight.get(this);
    if (!mine) compressionsInFlight.set(this, (mine = { count: 0, area: 0, at: start }));
    accrue(mine, start);
    mine.count++;
    const areaAtStart = mine.area;
    const alone = compressionsInFlight.size === 1;
    return (rawBytes) => {
      // `mine` stays this chooser's entry until its count is back to zero, after this batch.
      const end = this.now();
      accrue(mine, end);
      const batchMs = mine.area - areaAtStart;
      if (--mine.count === 0) compressionsInFlight.delete(this);
      const ms = end - start;
      if (!alone || compressionsInFlight.size > 1 || this.options.mode !== 'auto' || ms <= 0 || rawBytes <= 0) return;
      // Batches beside it on average (batchMs / ms), times its own rate.
      this.compressedAt(((rawBytes * 1000) / ms) * (batchMs / ms));
    };
  }

  private compressedAt(bound: number): void {
    this.compressBound = this.compressBound === undefined ? bound : this.compressBound * 0.5 + bound * 0.5;
    this.compressSamples++;
    const raw = this.rate.raw;
    if (this.phase === 'exploit' || this.current !== 'lz4' || raw === undefined || this.compressBound >= raw) return;
    // Far behind: at once. Closer: once a window of batches says so (a first batch may be a cold one).
    if (this.compressBound * FAR_BEHIND > raw && this.compressSamples < this.windowBatches) return;
    // The bound is what LZ4 can do now. An older rate below it was LZ4 then (a stall, a busy
    // destination): kept as a floor, it let no probe raise LZ4 again, and a gang's busy
    // moment kept raw on at half LZ4's rate for the session's next migrations.
    this.rate.lz4 = this.compressBound;
    this.remember('lz4', this.now());
    this.measured('lz4');
  }

  /**
   * The receiver applied the oldest batch sent (its credit came back). Rates are taken
   * between deliveries, not hand-offs to the socket: queues in front of the link (socket
   * buffers, a shaper's queue) take the first batches at any speed and would make the
   * mode tried first look fast.
   */
  delivered(): void {
    const batch = this.inflight.shift();
    if (!batch || batch.mode === 'none') return;
    const now = this.now();
    const window = this.window;
    if (window.mode !== batch.mode || batch.afterPause) {
      this.window = { mode: batch.mode, count: 1, guestBytes: 0, start: now };
      return;
    }
    window.count++;
    window.guestBytes += batch.guestBytes;
    const elapsedMs = now - window.start;
    if (window.count < this.windowBatches || elapsedMs < this.minWindowMs || elapsedMs <= 0) return;
    // This delivery also starts the next window.
    this.window = { mode: batch.mode, count: 1, guestBytes: 0, start: now };
    const sample = (window.guestBytes * 1000) / elapsedMs;
    const previous = this.rate[batch.mode];
    this.rate[batch.mode] = previous === undefined ? sample : previous * 0.5 + sample * 0.5;
    this.remember(batch.mode, now);
    this.measured(batch.mode);
  }

  private remember(mode: BatchCodec, now: number): void {
    const memory = this.options.memory;
    if (!memory) return;
    memory.rates[mode] = this.rate[mode];
    memory.measuredAt[mode] = now;
  }

  /** `mode` has a (new) rate: a probe of it has its verdict, and the phase that waited for it ends. */
  private measured(mode: BatchCodec): void {
    if (this.probing === mode) {
      // The winner held (probe less often) or lost (probe as often as at first).
      this.exploitMs = this.best() !== mode ? Math.min(this.exploitMs * 2, this.maxExploitMs) : this.baseExploitMs;
      if (this.options.memory) this.options.memory.exploitMs = this.exploitMs;
      this.probing = undefined;
    }
    if (this.phase === 'exploit') {
      const best = this.best();
      if (best !== this.current) {
        // The winner fell below the loser on a fresh measure of its own against an older one
        // of the other (the link stalled, the content or the load changed): what the other
        // does now is not known. It goes on for the shortest wait, then the old winner is
        // measured again; at the longest wait, a stall's sample kept a 1 Gbit/s link on raw
        // at half LZ4's rate for four migrations in a row.
        this.exploitMs = this.baseExploitMs;
        if (this.options.memory) this.options.memory.exploitMs = this.exploitMs;
        this.phaseStart = this.now();
      }
      this.current = best;
    } else if (mode === this.current) this.advance();
  }

  /** Explore and probe end when their mode is measured, or after EXPLORE_WINDOWS (PROBE_WINDOWS) windows of batches without. */
  private advance(): void {
    if (this.phase === 'explore' && this.current === 'raw' && this.rate.lz4 === undefined) {
      this.current = 'lz4';
      this.sentInPhase = 0;
      this.compressSamples = 0;
    } else {
      this.enter('exploit');
    }
  }

  private enter(phase: Phase): void {
    this.phase = phase;
    this.phaseStart = this.now();
    this.sentInPhase = 0;
    this.current = this.best();
  }

  /** The faster mode measured so far (the one measured, while only one is). */
  private best(): BatchCodec {
    const { lz4, raw } = this.rate;
    if (lz4 === undefined || raw === undefined) return lz4 !== undefined ? 'lz4' : 'raw';
    return lz4 >= raw ? 'lz4' : 'raw';
  }
}
