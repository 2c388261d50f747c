// The destination's channels of one migration (peer/channel.ts): a channel that names this
// migration is attached when it presents the migration's secret and, under TLS, the very
// certificate the session's source presented; its thread then writes the pre-copy pages it
// carries into the migration's regions. A channel that fails fails the migration.
import { ErrorCode, ProtocolError } from '../../protocol/errors.js';
import type { Channel, ChannelHelloIn } from '../peer/channel.js';
import type { RegionHandle } from '../native.js';

/** Channels one migration may have attached at once. */
export const MAX_CHANNELS_PER_MIGRATION = 4;

export interface IncomingChannelsContext {
  readonly migrationId: string;
  /** Whether a channel presents the secret the accept handed out (in constant time). */
  secretMatches(presented: Uint8Array): boolean;
  /** SHA-256 of the certificate the session's source presented (undefined without TLS). */
  peerSha256(): string | undefined;
  /** Why the migration takes no channel now (it is over, switching over, or not a pre-copy), or undefined. */
  refusal(): string | undefined;
  regions(): RegionHandle[];
  fail(err: ProtocolError): void;
}

export class IncomingChannels {
  private readonly channels = new Set<Channel>();
  /** Pages written by channels that have closed. */
  private closedPages = 0;
  /** close() was called: no channel is attached after. */
  private ended = false;

  constructor(private readonly ctx: IncomingChannelsContext) {}

  /** Attaches `channel`, or says why not. */
  attach(hello: ChannelHelloIn, channel: Channel): string | undefined {
    if (!this.ctx.secretMatches(hello.secret)) return `the wrong secret for migration ${this.ctx.migrationId}`;
    if (hello.peerSha256 !== this.ctx.peerSha256()) return `the channel's certificate is not the one the source's session presented`;
    const refusal = this.ended ? `migration ${this.ctx.migrationId} takes no more channels` : this.ctx.refusal();
    if (refusal) return refusal;
    if (this.channels.size >= MAX_CHANNELS_PER_MIGRATION) return `migration ${this.ctx.migrationId} has ${this.channels.size} channels already`;
    channel.attach(this.ctx.regions());
    this.channels.add(channel);
    void channel.closed.then(() => {
      this.channels.delete(channel);
      this.closedPages += channel.pagesWritten;
      const failure = channel.failed;
      if (failure && failure.code !== ErrorCode.ABORTED) this.ctx.fail(new ProtocolError(ErrorCode.PROTOCOL, failure.message));
    });
    return undefined;
  }

  /** Pages the channels wrote, as of their last barriers. */
  get pagesWritten(): number {
    let pages = this.closedPages;
    for (const channel of this.channels) pages += channel.pagesWritten;
    return pages;
  }

  /**
   * Ends every channel and takes no more: the switchover began (every round a channel
   * carried ended with its barrier, so nothing is lost; a page that still came would change
   * memory the switchover's check has read) or the migration is over. The threads let go of
   * the regions as they end.
   */
  close(): void {
    this.ended = true;
    for (const channel of this.channels) void channel.close();
  }
}
