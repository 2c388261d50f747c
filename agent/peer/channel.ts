// Channels: a migration's bulk pre-copy pages on TCP connections of their own, each run by a
// native thread at both ends (native/src/addon/channel.h says what crosses one). The session
// keeps the control frames and everything else; a channel carries whole rounds of regions,
// raw, and a barrier per round tells the source that the destination wrote them all.
//
// A channel dials the peer port its session dialed, and says so with a plain preamble that
// the destination's peer port peeks for (peer-server.ts); then TLS (the agents' own
// certificates, as the session's), then the migration's id and the secret its accept
// handed out. Each side checks that the channel's peer presented the very certificate its
// session's peer did.
import { X509Certificate } from 'node:crypto';
import { connect, type Socket } from 'node:net';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { loadNative, type ChannelEvent, type ChannelHandle, type ChannelHello, type ChannelSent, type ChannelTls, type NativeAddon, type RegionHandle } from '../native.js';
import { normalizeFingerprint } from './allowlist.js';

/** What a channel's peer must tell it apart from TLS and HTTP clients: its first 8 bytes. */
export const CHANNEL_PREAMBLE = Buffer.from('GWCHAN1\n', 'latin1');

/** The destination's side: a channel's hello, for the migration it names to take or refuse. */
export interface ChannelHelloIn {
  migrationId: string;
  secret: Buffer;
  /** SHA-256 of the certificate the channel's peer presented (lower-case hex), under TLS. */
  peerSha256: string | undefined;
}

type Pending = { resolve: (value: never) => void; reject: (err: Error) => void; kind: 'sent' | 'barrier' };

/** The descriptor of a connected net.Socket (Node keeps it on the socket's handle), if it has one. */
export function socketFdOf(socket: Socket): number | undefined {
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : undefined;
}

function socketFd(socket: Socket): number {
  const fd = socketFdOf(socket);
  if (fd === undefined) throw new GangwayError(ErrorCode.INTERNAL, 'a channel needs a TCP socket with a descriptor');
  return fd;
}

function sha256Of(der: Buffer | undefined): string | undefined {
  return der ? normalizeFingerprint(new X509Certificate(der).fingerprint256) : undefined;
}

export class Channel {
  private readonly native: NativeAddon;
  private readonly handle: ChannelHandle;
  private pending: Pending | undefined;
  private failure: GangwayError | undefined;
  private isClosed = false;
  /** close() was called: no job starts after. */
  private closing = false;
  private resolveClosed!: () => void;
  /** Resolves once the channel's thread has ended (after close, bye, or a failure). */
  readonly closed = new Promise<void>((resolve) => (this.resolveClosed = resolve));
  private resolveReady!: (sha256: string | undefined) => void;
  private rejectReady!: (err: Error) => void;
  /** Source: resolves with the SHA-256 of the destination's certificate once the destination attached the channel. */
  readonly ready = new Promise<string | undefined>((resolve, reject) => {
    this.resolveReady = resolve;
    this.rejectReady = reject;
  });
  /** Destination: the channel's hello (attach or close it). */
  onHello: ((hello: ChannelHelloIn) => void) | undefined;
  /** Destination: pages written so far, as of the last barrier. */
  pagesWritten = 0;

  private constructor(socket: Socket, role: 'source' | 'destination', tls: ChannelTls | undefined, hello: ChannelHello | undefined, native: NativeAddon) {
    this.native = native;
    this.ready.catch(() => {});
    try {
      this.handle = native.channelOpen(socketFd(socket), role, tls ?? null, hello ?? null, (event, fields) => this.onEvent({ event, fields } as ChannelEvent));
    } finally {
      // The thread holds its own copy of the descriptor.
      socket.destroy();
    }
  }

  /** Source: a channel to the peer port at host:port, for migration `hello.migrationId`. */
  static async connect(host: string, port: number, tls: ChannelTls | undefined, hello: ChannelHello, native = loadNative()): Promise<Channel> {
    const socket = await new Promise<Socket>((resolve, reject) => {
      const socket = connect({ host, port, noDelay: true });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new GangwayError(ErrorCode.PEER_UNREACHABLE, `a channel to ${host}:${port} did not connect in 10 s`));
      }, 10_000);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.pause();
        resolve(socket);
      });
      socket.once('error', (err) => {
        clearTimeout(timer);
        reject(new GangwayError(ErrorCode.PEER_UNREACHABLE, `a channel to ${host}:${port}: ${err.message}`));
      });
    });
    return new Channel(socket, 'source', tls, hello, native);
  }

  /** Destination: a connection the peer port found the preamble on (nothing read from it yet). */
  static accept(socket: Socket, tls: ChannelTls | undefined, native = loadNative()): Channel {
    return new Channel(socket, 'destination', tls, undefined, native);
  }

  get failed(): GangwayError | undefined {
    return this.failure;
  }

  private onEvent(e: ChannelEvent): void {
    switch (e.event) {
      case 'ready':
        this.resolveReady(sha256Of(e.fields.peerCertificate));
        return;
      case 'hello':
        this.onHello?.({ migrationId: e.fields.migrationId, secret: e.fields.secret, peerSha256: sha256Of(e.fields.peerCertificate) });
        return;
      case 'sent':
        this.settle('sent', e.fields);
        return;
      case 'barrier':
        this.pagesWritten = e.fields.pages;
        this.settle('barrier', e.fields);
        return;
      case 'error':
        this.fail(new GangwayError(ErrorCode.PEER_UNREACHABLE, `channel: ${e.fields.message}`));
        return;
      case 'closed':
        this.isClosed = true;
        this.fail(new GangwayError(ErrorCode.ABORTED, 'the channel closed'));
        this.resolveClosed();
        return;
    }
  }

  private settle(kind: Pending['kind'], value: unknown): void {
    const pending = this.pending;
    if (pending?.kind !== kind) return;
    this.pending = undefined;
    pending.resolve(value as never);
  }

  private fail(err: GangwayError): void {
    this.failure ??= err;
    this.rejectReady(this.failure);
    const pending = this.pending;
    this.pending = undefined;
    pending?.reject(this.failure);
  }

  private job<T>(kind: Pending['kind'], start: () => void): Promise<T> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.closing) return Promise.reject(new GangwayError(ErrorCode.ABORTED, 'the channel closed'));
    if (this.pending) return Promise.reject(new GangwayError(ErrorCode.INTERNAL, 'a channel runs one job at a time'));
    return new Promise<T>((resolve, reject) => {
      this.pending = { resolve: resolve as (value: never) => void, reject, kind };
      try {
        start();
      } catch (err) {
        this.pending = undefined;
        reject(err);
      }
    });
  }

  /** Source: the pages of `runs` of region `regionIndex` (its read-only mapping `region`), written to the socket; with `fingerprints`, what each page was as sent. */
  send(region: RegionHandle, regionIndex: number, round: number, runs: Uint32Array, fingerprints = false): Promise<ChannelSent> {
    return this.job('sent', () => this.native.channelSend(this.handle, region, regionIndex, round, runs, fingerprints));
  }

  /** Source: resolves once the destination has written everything this channel sent before it. */
  barrier(round: number): Promise<{ round: number; pages: number }> {
    return this.job('barrier', () => this.native.channelBarrier(this.handle, round));
  }

  /** Destination: the migration's regions; the channel starts reading pages. */
  attach(regions: RegionHandle[]): void {
    this.native.channelAttach(this.handle, regions);
  }

  /** Source: the last message; resolves once the channel closed. */
  async bye(): Promise<void> {
    if (!this.failure && !this.isClosed) {
      try {
        this.native.channelBye(this.handle);
      } catch {
        this.close();
      }
    }
    await this.closed;
  }

  /** Ends the channel now; resolves once its thread has. */
  close(): Promise<void> {
    this.closing = true;
    if (!this.isClosed) this.native.channelClose(this.handle);
    return this.closed;
  }
}
