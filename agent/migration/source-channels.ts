// The source's channels of one migration (peer/channel.ts): pre-copy rounds go out on them,
// off the JS thread, when the migration's pages go raw or deduplicated (no pacer, no gang
// gate, memory only). A round's pages are cut into pieces; a piece the codec sends raw goes
// to the next idle channel, one it compresses on the session (rounds.ts). Every piece ends
// with a barrier, so once a round's pieces are settled the destination has written them all,
// before the next round (or the session's roundEnd); and a round's session pieces are all
// applied before the next round's first channel piece. With dedup, a piece's refs go on the
// session ahead of it, and its pages become a source of refs only once written there
// (DedupPlanner.planPiece). Once a final round or a repair goes the session's way, the
// channels are done with.
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { Channel } from '../peer/channel.js';
import { FINGERPRINT_BYTES } from '../../protocol/limits.js';
import { loadNative, type ChannelSent, type ChannelTls, type RegionHandle } from '../native.js';
import { runsPageCount } from '../tracker/page-set.js';
import { hostOf } from '../peer/tls.js';
import type { Logger } from '../log.js';
import type { Lane } from './lanes.js';

/** A piece of a round: what a channel sends at a time, and what the codec is chosen for. */
const PIECE_BYTES = 16 * 1024 * 1024;
/**
 * A piece that measures raw's rate takes about this long at raw's last known rate, and is
 * no smaller than PROBE_MIN_BYTES (34 ms at 1 Gbit/s): a piece of a few milliseconds
 * measures the round trips around it more than the stream.
 */
const PROBE_MS = 25;
const PROBE_MIN_BYTES = 4 * 1024 * 1024;

/** Runs cut after their first `pages` pages: [head, tail]. */
function splitRuns(runs: Uint32Array, pages: number): [Uint32Array, Uint32Array] {
  let left = pages;
  for (let i = 0; i + 1 < runs.length; i += 2) {
    const count = runs[i + 1]!;
    if (count < left) {
      left -= count;
      continue;
    }
    const head = Uint32Array.from([...runs.subarray(0, i), runs[i]!, left]);
    const tail = count === left ? runs.slice(i + 2) : Uint32Array.from([runs[i]! + left, count - left, ...runs.subarray(i + 2)]);
    return [head, tail];
  }
  return [runs, new Uint32Array(0)];
}

/** What the daemon gives a migration to open channels with. */
export interface ChannelSettings {
  /** Channels per migration (1-4). */
  count: number;
  /** The agent's own certificate material (the session's); absent between plain loopback agents. */
  tls: ChannelTls | undefined;
}

/** A lane a channel can send: a read-only mapping of memory. */
function channelHandle(lane: Lane): RegionHandle | undefined {
  if (lane.region.sparse || lane.tracker.kind === 'hash-scan') return undefined;
  return (lane.reader as { handle?: RegionHandle }).handle;
}

/** Runs [first, count, ...] cut into pieces of at most `maxPages` pages each. */
export function pieces(runs: Uint32Array, maxPages: number): Uint32Array[] {
  const out: Uint32Array[] = [];
  let current: number[] = [];
  let pages = 0;
  for (let i = 0; i + 1 < runs.length; i += 2) {
    let first = runs[i]!;
    let count = runs[i + 1]!;
    while (count > 0) {
      const take = Math.min(count, maxPages - pages);
      current.push(first, take);
      pages += take;
      first += take;
      count -= take;
      if (pages === maxPages) {
        out.push(Uint32Array.from(current));
        current = [];
        pages = 0;
      }
    }
  }
  if (current.length > 0) out.push(Uint32Array.from(current));
  return out;
}

export class SourceChannels {
  /** False once a round went the session's way: the channels carry no more. */
  usable = true;
  /**
   * True once the channels are open; false if they could not be (why is logged), and the
   * rounds go on the session. A round's first piece for them waits for this.
   */
  readonly opened: Promise<boolean>;
  private channels: Channel[] = [];

  private constructor(
    private readonly handles: RegionHandle[],
    /** Under mutual TLS. */
    readonly tls: boolean,
    connecting: Promise<Channel[] | undefined>,
  ) {
    this.opened = connecting.then((channels) => {
      if (!channels) {
        this.usable = false;
        return false;
      }
      this.channels = channels;
      this.idle.push(...channels);
      return true;
    });
  }

  /** A lane's runs in pieces: a channel takes a piece at a time, and the codec is chosen per piece. */
  static pieceRuns(lane: Lane, runs: Uint32Array): Uint32Array[] {
    return pieces(runs, Math.max(1, Math.floor(PIECE_BYTES / lane.region.pageSizeBytes)));
  }

  /**
   * A piece cut for measuring a codec's rate: what its last known rate sends in PROBE_MS
   * (between `minBytes`, PROBE_MIN_BYTES unless said, and a whole piece) first, then what is
   * left of it.
   */
  static probeRuns(lane: Lane, runs: Uint32Array, bytesPerSec: number | undefined, minBytes = PROBE_MIN_BYTES): Uint32Array[] {
    const bytes = Math.min(PIECE_BYTES, Math.max(minBytes, ((bytesPerSec ?? 0) * PROBE_MS) / 1000));
    const [probe, rest] = splitRuns(runs, Math.max(1, Math.floor(bytes / lane.region.pageSizeBytes)));
    return rest.length === 0 ? [probe] : [probe, rest];
  }

  get count(): number {
    return this.channels.length;
  }

  /**
   * Starts opening channels to the destination at `peerAddress` for a migration whose lanes
   * they can all carry, and returns them at once (undefined when a lane cannot go on them);
   * `opened` says when they are up, or that they cannot be (their peer is not the session's,
   * by its certificate, or a connection failed). The rounds start meanwhile: opening took
   * 12-31 ms per migration on the 1 Gbit/s netns link (median 19, TLS), and pages that go
   * compressed on the session need no channel.
   */
  static open(
    settings: ChannelSettings,
    lanes: readonly Lane[],
    peerAddress: string,
    hello: { migrationId: string; secret: Uint8Array },
    sessionPeerSha256: string | undefined,
    log: Logger,
  ): SourceChannels | undefined {
    const handles = lanes.map(channelHandle);
    if (handles.some((handle) => handle === undefined)) return undefined;
    const port = Number(peerAddress.slice(peerAddress.lastIndexOf(':') + 1));
    const host = hostOf(peerAddress);
    const connecting = (async (): Promise<Channel[] | undefined> => {
      const opened = await Promise.allSettled(Array.from({ length: settings.count }, () => Channel.connect(host, port, settings.tls, hello)));
      const channels = opened.flatMap((o) => (o.status === 'fulfilled' ? [o.value] : []));
      try {
        const failed = opened.find((o) => o.status === 'rejected');
        if (failed) throw failed.reason;
        const peers = await Promise.all(channels.map((channel) => channel.ready));
        if (peers.some((sha256) => sha256 !== sessionPeerSha256)) {
          throw new GangwayError(ErrorCode.TLS, "a channel's peer presented another certificate than the session's");
        }
      } catch (err) {
        log.warn({ err: (err as Error).message }, 'no channels: the pre-copy rounds go on the session');
        await Promise.all(channels.map((channel) => channel.close()));
        return undefined;
      }
      log.debug({ channels: channels.length, tls: settings.tls !== undefined }, 'channels open');
      return channels;
    })();
    return new SourceChannels(handles as RegionHandle[], settings.tls !== undefined, connecting);
  }

  /** Channels not sending a piece now. */
  private readonly idle: Channel[] = [];
  private readonly idleWaiters: (() => void)[] = [];
  /** Pieces sent and not yet settled. */
  private readonly inFlight = new Set<Promise<void>>();
  private failure: unknown;
  /** For the rate the channels deliver: raw bytes written there, over the time any was busy. */
  private bytesDone = 0;
  private busyMs = 0;
  private busySince: number | undefined;

  /**
   * Sends a piece of a round (a lane's runs) on the next idle channel, waiting for one, and
   * then for `how.ready`; `done` hears what it carried once the destination has written it
   * (with `how.fingerprints`, what each page was as sent). A failed piece fails the next
   * call and `settled`.
   */
  async dispatch(lane: Lane, round: number, piece: Uint32Array, done: (sent: ChannelSent) => void, how: { fingerprints?: boolean; ready?: () => Promise<void> } = {}): Promise<void> {
    if (!(await this.opened)) throw new GangwayError(ErrorCode.INTERNAL, 'a piece was dispatched to channels that did not open');
    if (this.failure) throw this.failure;
    while (this.idle.length === 0) await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
    if (this.failure) throw this.failure;
    const channel = this.idle.pop()!;
    if (how.ready) {
      // With the channel in hand, what the piece waits for (a gang's gate): it goes as soon as
      // that resolves, with nothing in between.
      try {
        await how.ready();
      } catch (err) {
        this.idle.push(channel);
        this.idleWaiters.shift()?.();
        throw err;
      }
      if (this.failure) {
        this.idle.push(channel);
        throw this.failure;
      }
    }
    if (this.inFlight.size === 0) this.busySince = performance.now();
    // Each piece ends with a barrier: `done` hears of it once the destination wrote it, so a
    // rate taken from it is what was delivered, not what the socket buffers took in.
    const sending: Promise<void> = (async () => {
      const sent = await channel.send(this.handles[lane.index]!, lane.index, round, piece, how.fingerprints ?? false);
      await channel.barrier(round);
      return sent;
    })().then(
      (sent) => {
        this.inFlight.delete(sending);
        this.bytesDone += sent.rawBytes;
        if (this.inFlight.size === 0 && this.busySince !== undefined) {
          this.busyMs += performance.now() - this.busySince;
          this.busySince = undefined;
        }
        this.idle.push(channel);
        this.idleWaiters.shift()?.();
        done(sent);
      },
      (err: unknown) => {
        this.inFlight.delete(sending);
        this.failure ??= err;
        for (const wake of this.idleWaiters.splice(0)) wake();
      },
    );
    this.inFlight.add(sending);
  }

  /** Each page's fingerprint as the lane's mapping holds it now (16 bytes per page of `runs`, in order). */
  fingerprints(lane: Lane, runs: Uint32Array): Uint8Array {
    const out = new Uint8Array(runsPageCount(runs) * FINGERPRINT_BYTES);
    const native = loadNative();
    let at = 0;
    for (let i = 0; i + 1 < runs.length; i += 2) {
      native.regionFingerprints(this.handles[lane.index]!, runs[i]!, runs[i + 1]!, out.subarray(at * FINGERPRINT_BYTES));
      at += runs[i + 1]!;
    }
    return out;
  }

  /**
   * Raw guest bytes per second the channels delivered (written at the destination), over the
   * time any of them was sending: what raw on the channels achieves, whatever the session
   * did in between. Undefined before a piece completed.
   */
  deliveredRate(): number | undefined {
    const ms = this.busyMs + (this.busySince === undefined ? 0 : performance.now() - this.busySince);
    return this.bytesDone > 0 && ms > 0 ? (this.bytesDone * 1000) / ms : undefined;
  }

  /**
   * Resolves once every piece dispatched so far is written at the destination (each ended
   * with its barrier), or rejects with the first failure.
   */
  async settled(): Promise<void> {
    while (this.inFlight.size > 0) await Promise.all([...this.inFlight]);
    if (this.failure) throw this.failure;
  }

  /** The last message on every channel; resolves once they closed. */
  async close(): Promise<void> {
    this.usable = false;
    if (!(await this.opened)) return;
    await Promise.all(this.channels.map((channel) => channel.bye()));
  }
}
