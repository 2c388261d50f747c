// The source's channels of one migration (peer/channel.ts): pre-copy rounds go out on them,
// off the JS thread, while nothing asks more of a round than raw pages (no dedup, no
// compression, no pacer, no gang gate, memory only). A round's pages are cut into pieces
// dealt out to the channels, each channel sending its pieces in turn; then a barrier on every
// channel, so that the destination has written the whole round before the next one (or the
// session's roundEnd) goes out. Once a round goes the session's way the channels are done
// with: a page the session sent must not be overtaken by an older copy on a channel.
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { Channel } from '../peer/channel.js';
import type { ChannelTls, RegionHandle } from '../native.js';
import { hostOf } from '../peer/tls.js';
import type { Logger } from '../log.js';
import type { Lane, LaneRuns } from './lanes.js';
import { emptyCounters, type RoundCounters } from './page-sender.js';

/** Pages of one piece at most: a channel reports progress after each. */
const PIECE_BYTES = 64 * 1024 * 1024;

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

  private constructor(
    private readonly channels: Channel[],
    private readonly handles: RegionHandle[],
    /** Under mutual TLS. */
    readonly tls: boolean,
  ) {}

  get count(): number {
    return this.channels.length;
  }

  /**
   * Channels to the destination at `peerAddress` for a migration whose lanes they can all
   * carry; undefined when they cannot (the reason is logged), or when the channels' peer is
   * not the session's (its certificate).
   */
  static async open(
    settings: ChannelSettings,
    lanes: readonly Lane[],
    peerAddress: string,
    hello: { migrationId: string; secret: Uint8Array },
    sessionPeerSha256: string | undefined,
    log: Logger,
  ): Promise<SourceChannels | undefined> {
    const handles = lanes.map(channelHandle);
    if (handles.some((handle) => handle === undefined)) return undefined;
    const port = Number(peerAddress.slice(peerAddress.lastIndexOf(':') + 1));
    const host = hostOf(peerAddress);
    const opened = await Promise.allSettled(Array.from({ length: settings.count }, () => Channel.connect(host, port, settings.tls, hello)));
    const channels = opened.flatMap((o) => (o.status === 'fulfilled' ? [o.value] : []));
    try {
      const failed = opened.find((o) => o.status === 'rejected');
      if (failed) throw (failed as PromiseRejectedResult).reason;
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
    return new SourceChannels(channels, handles as RegionHandle[], settings.tls !== undefined);
  }

  /**
   * Round `round`'s pages on the channels, then a barrier on each: resolves once the
   * destination has written them all. `onPiece` hears of each piece sent (progress).
   */
  async sendRound(round: number, lanes: readonly Lane[], runs: LaneRuns, onPiece: (counters: RoundCounters) => void): Promise<RoundCounters> {
    const work: { lane: Lane; runs: Uint32Array }[] = [];
    for (const lane of lanes) {
      const laneRuns = runs[lane.index];
      if (!laneRuns || laneRuns.length === 0) continue;
      const maxPages = Math.max(1, Math.floor(PIECE_BYTES / lane.region.pageSizeBytes));
      for (const piece of pieces(laneRuns, maxPages)) work.push({ lane, runs: piece });
    }
    const counters = emptyCounters();
    let next = 0;
    const drain = async (channel: Channel) => {
      while (next < work.length) {
        const { lane, runs: piece } = work[next++]!;
        const sent = await channel.send(this.handles[lane.index]!, lane.index, round, piece);
        counters.pages += sent.pages;
        counters.dataPages += sent.dataPages;
        counters.zeroPages += sent.zeroPages;
        counters.rawBytes += sent.rawBytes;
        counters.payloadBytes += sent.rawBytes;
        counters.wireBytes += sent.wireBytes;
        counters.batches += sent.batches;
        onPiece(counters);
      }
    };
    await Promise.all(this.channels.map(drain));
    await Promise.all(this.channels.map((channel) => channel.barrier(round)));
    return counters;
  }

  /** The last message on every channel; resolves once they closed. */
  async close(): Promise<void> {
    this.usable = false;
    await Promise.all(this.channels.map((channel) => channel.bye()));
  }
}
