// One session with a peer agent: an ordered WebSocket stream of protocol frames carrying
// any number of concurrent migrations. The session does the hello exchange, decodes
// frames, routes them to the migration they name, and closes on a protocol violation with
// an error frame (the agent's other sessions are unaffected).
//
// Frames go out as one WebSocket message (and frame) each: a fragmented message costs the
// receiving ws a second copy. The page stream builds its messages in place (page-sender.ts).
import { EventEmitter } from 'node:events';
import type { Logger } from 'pino';
import type { ConnectionOptions } from 'node:tls';
import WebSocket from 'ws';
import { encodeFrame, Frame, FrameDecoder, type FrameOf } from '../../protocol/index.js';
import { ErrorCode, GangwayError, PeerError, ProtocolCloseCode, ProtocolError } from '../../protocol/errors.js';
import { PROTOCOL_VERSION } from '../../protocol/limits.js';
import { agentIdOf, describeIdentity, type CertIdentity } from './allowlist.js';
import { allowlistRefusal, clientConnectError, identityOfPeer, PEER_TLS_PROTOCOL, REFUSAL_HEADER, serverNotAllowed, type TlsMaterial } from './tls.js';
import { GANGWAY_VERSION } from '../version.js';
import { emptyCodecMemory, type CodecMemory } from '../migration/codec-chooser.js';

export type AnyFrame = ReturnType<FrameDecoder['push']>[number];
export type HelloFrame = FrameOf<'hello'>;
export type OfferFrame = FrameOf<'offer'>;
export type GroupFrame = Extract<AnyFrame, { group: string }>;
export type TrafficReport = Omit<FrameOf<'trafficReport'>, 'type' | 'requestId'>;

/** Traffic queries one session may have unanswered at once. */
const MAX_TRAFFIC_QUERIES = 16;

/** Frames that ask this agent for work outside a migration's own flow: rate-limited per session. */
const REQUEST_FRAMES: ReadonlySet<string> = new Set(['offer', 'reattach', 'migrationQuery', 'trafficQuery', 'dedupOpen', 'dedupClose']);

export interface FrameHandler {
  onFrame(frame: AnyFrame, wireBytes: number): void;
  /** The session ended (peer gone, protocol error, local close). */
  onSessionClosed(err: GangwayError): void;
}

export interface SessionOptions {
  role: 'client' | 'server';
  agentId: string;
  features: string[];
  maxPayloadBytes: number;
  log: Logger;
  helloTimeoutMs?: number;
  /**
   * The identity the peer's TLS certificate proved (mutual TLS). Its hello must then name the
   * agent id of that certificate (agentIdOf), or the session is refused: the peer is who its
   * certificate says. Without it (plain ws on loopback) the hello's agent id is a claim.
   */
  peerCertificate?: CertIdentity;
  /**
   * Session-level requests (offer, reattach, migrationQuery, trafficQuery, dedupOpen,
   * dedupClose) the peer may send: a token bucket of `burst` refilled at `perSecond`. A peer
   * beyond it is cut off (onLimit says so first).
   */
  requests?: { perSecond: number; burst: number };
  /** A peer hit a limit of this session (identity, requests): for the agent's log and metrics. */
  onLimit?: (limit: 'identity' | 'requests') => void;
  /**
   * A session that hears nothing from the peer (no frame, no pong) for this long is dead:
   * closed as PEER_GONE, so that a cut link is noticed without waiting for TCP to give up
   * (minutes). Pings go out at a third of it. Default 15 s; 0 turns it off.
   */
  deadAfterMs?: number;
}

export const DEFAULT_DEAD_AFTER_MS = 15_000;

/** Close codes (RFC 6455) used by gangway: the protocol's, plus the two for orderly ends. */
export const CloseCode = { ...ProtocolCloseCode, normal: 1000, goingAway: 1001 } as const;

export class PeerSession extends EventEmitter {
  readonly ready: Promise<HelloFrame>;
  private readonly decoder: FrameDecoder;
  private readonly handlers = new Map<string, FrameHandler>();
  private closedWith: GangwayError | undefined;
  private peerHello: HelloFrame | undefined;
  private resolveReady!: (hello: HelloFrame) => void;
  private rejectReady!: (err: Error) => void;
  /** Offers from the peer (server role). */
  onOffer: ((frame: OfferFrame, session: PeerSession) => void) | undefined;
  /** Dedup group frames (dedupOpen/dedupClose to a destination, dedupResident/dedupReady to a source). */
  onGroupFrame: ((frame: GroupFrame, wireBytes: number) => void) | undefined;
  /** Answers the peer's trafficQuery (feature 'traffic'); without it a query is a protocol error. */
  onTrafficQuery: (() => TrafficReport) | undefined;
  private readonly trafficQueries = new Map<string, { resolve: (report: TrafficReport) => void; reject: (err: Error) => void }>();
  private nextTrafficQuery = 1;
  /** A source carrying on a post-copy migration of a broken session here (server role). */
  onReattach: ((frame: FrameOf<'reattach'>, session: PeerSession) => void) | undefined;
  /** A source asking what became of a migration (server role). */
  onMigrationQuery: ((frame: FrameOf<'migrationQuery'>, session: PeerSession) => void) | undefined;
  private lastHeard = performance.now();
  readonly log: Logger;

  constructor(
    private readonly ws: WebSocket,
    private readonly options: SessionOptions,
  ) {
    super();
    this.log = options.log;
    this.requestTokens = options.requests?.burst ?? 0;
    this.decoder = new FrameDecoder({ maxPayloadBytes: options.maxPayloadBytes });
    this.ready = new Promise((resolve, reject) => {
      this.resolveReady = resolve;
      this.rejectReady = reject;
    });
    this.ready.catch(() => {});
    ws.binaryType = 'nodebuffer';
    // Every migration of a gang may have a ping in flight.
    ws.setMaxListeners(0);
    ws.on('message', (data: Buffer, isBinary: boolean) => {
      this.lastHeard = performance.now();
      this.receive(data, isBinary);
    });
    ws.on('pong', () => (this.lastHeard = performance.now()));
    const deadAfterMs = options.deadAfterMs ?? DEFAULT_DEAD_AFTER_MS;
    if (deadAfterMs > 0) {
      const keepalive = setInterval(() => {
        if (this.closedWith) return clearInterval(keepalive);
        const silentMs = performance.now() - this.lastHeard;
        if (silentMs > deadAfterMs) {
          clearInterval(keepalive);
          this.finish(new GangwayError(ErrorCode.PEER_GONE, `no word from the peer for ${Math.round(silentMs)} ms: the link or the peer is down`));
          this.ws.terminate();
          return;
        }
        if (this.ws.readyState === WebSocket.OPEN) this.ws.ping();
      }, Math.max(50, deadAfterMs / 3));
      keepalive.unref();
    }
    ws.on('close', (code, reason) => {
      this.finish(
        new GangwayError(
          ErrorCode.PEER_GONE,
          `the peer closed the session (${code}${reason.length ? `: ${reason.toString()}` : ''})`,
        ),
      );
    });
    ws.on('error', (err) => {
      this.finish(new GangwayError(ErrorCode.PEER_GONE, `session error: ${err.message}`, { cause: err }));
    });
    const timeoutMs = options.helloTimeoutMs ?? 10_000;
    const timer = setTimeout(
      () => this.fail(new ProtocolError(ErrorCode.PROTOCOL, `no hello within ${timeoutMs} ms`)),
      timeoutMs,
    );
    this.ready.then(
      () => clearTimeout(timer),
      () => clearTimeout(timer),
    );
    const send = () =>
      this.send(
        Frame.hello({
          agentId: options.agentId,
          agentVersion: GANGWAY_VERSION,
          features: options.features,
          maxPayloadBytes: options.maxPayloadBytes,
        }),
      );
    if (ws.readyState === WebSocket.OPEN) send();
    else ws.once('open', send);
  }

  get peer(): HelloFrame | undefined {
    return this.peerHello;
  }

  /** SHA-256 of the certificate the peer presented (lower-case hex), under mutual TLS. */
  get peerCertificateSha256(): string | undefined {
    return this.options.peerCertificate?.sha256;
  }

  /** Why the session closed; undefined while it is open. */
  get closedReason(): GangwayError | undefined {
    return this.closedWith;
  }

  get isOpen(): boolean {
    return this.closedWith === undefined && this.ws.readyState === WebSocket.OPEN;
  }

  /** The largest payload the peer accepts. */
  get peerMaxPayloadBytes(): number {
    return Math.min(this.peerHello?.maxPayloadBytes ?? this.options.maxPayloadBytes, this.options.maxPayloadBytes);
  }

  /** Round-trip time of a WebSocket ping, in ms. Pings carry an id, so concurrent ones are told apart. */
  measureRttMs(timeoutMs = 5_000): Promise<number> {
    return new Promise((resolve, reject) => {
      const id = Buffer.alloc(4);
      id.writeUInt32BE(this.nextPingId++ >>> 0);
      const started = performance.now();
      const onPong = (data: Buffer) => {
        if (!id.equals(data)) return;
        clearTimeout(timer);
        this.ws.off('pong', onPong);
        const ms = performance.now() - started;
        this.rttFloor = Math.min(this.rttFloor, ms);
        resolve(ms);
      };
      const timer = setTimeout(() => {
        this.ws.off('pong', onPong);
        reject(new GangwayError(ErrorCode.TIMEOUT, `no pong from the peer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.ws.on('pong', onPong);
      this.ws.ping(id);
    });
  }

  private nextPingId = 1;
  private rttFloor = Infinity;

  /** What the codec choosers of this session's migrations measured of its link (codec-chooser.ts). */
  readonly codecMemory: CodecMemory = emptyCodecMemory();

  /**
   * The smallest round trip measured on this session (one is taken as soon as the hello is
   * in, before any migration queues data in front of the pings): the latency a few small
   * frames pay on an idle session. Undefined before the first pong.
   */
  get rttFloorMs(): number | undefined {
    return Number.isFinite(this.rttFloor) ? this.rttFloor : undefined;
  }

  /** Asks the peer for its measured traffic (the peer's hello must list 'traffic'). */
  queryTraffic(timeoutMs = 5_000): Promise<TrafficReport> {
    if (this.closedWith) return Promise.reject(this.closedWith);
    if (this.trafficQueries.size >= MAX_TRAFFIC_QUERIES) {
      return Promise.reject(new GangwayError(ErrorCode.BAD_REQUEST, `${MAX_TRAFFIC_QUERIES} traffic queries to this peer are already waiting for an answer`));
    }
    const requestId = `traffic-${this.nextTrafficQuery++}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.trafficQueries.delete(requestId);
        reject(new GangwayError(ErrorCode.TIMEOUT, `the peer did not report its traffic within ${timeoutMs} ms`));
      }, timeoutMs);
      const done = () => {
        clearTimeout(timer);
        this.trafficQueries.delete(requestId);
      };
      this.trafficQueries.set(requestId, {
        resolve: (report) => (done(), resolve(report)),
        reject: (err) => (done(), reject(err)),
      });
      this.send(Frame.trafficQuery({ requestId }));
    });
  }

  register(migrationId: string, handler: FrameHandler): void {
    // A session that is already closed tells the handler so, as an open one would once it
    // closes: never a handler left waiting for frames that cannot come.
    const closed = this.closedWith;
    if (closed) {
      queueMicrotask(() => handler.onSessionClosed(closed));
      return;
    }
    this.handlers.set(migrationId, handler);
  }

  unregister(migrationId: string): void {
    this.handlers.delete(migrationId);
  }

  /** Queues a frame; `onWritten` runs once its bytes are handed to the socket. Returns its wire size. */
  send(frame: AnyFrame, onWritten?: (err?: Error) => void): number {
    const [head, payload] = encodeFrame(frame);
    return this.sendMessage(payload && payload.length > 0 ? Buffer.concat([head, payload]) : head, onWritten);
  }

  /** Queues one encoded frame as one WebSocket message. */
  sendMessage(message: Buffer, onWritten?: (err?: Error) => void): number {
    if (this.closedWith) {
      onWritten?.(this.closedWith);
      return 0;
    }
    const length = message.length;
    this.unwritten += length;
    this.ws.send(message, { binary: true }, (err) => {
      this.unwritten -= length;
      this.wakeWriters();
      onWritten?.(err);
    });
    return length;
  }

  /** Bytes queued on this side that the socket has not taken yet. */
  get unwrittenBytes(): number {
    return this.unwritten;
  }

  /**
   * Resolves once at most `limitBytes` are queued on this side (or the session is over).
   * Bulk senders wait on it so that what they measure is the link, not a queue in front of
   * it, and so that a switchover's frames do not wait behind seconds of queued pages.
   */
  writable(limitBytes: number): Promise<void> {
    if (this.unwritten <= limitBytes || this.closedWith) return Promise.resolve();
    return new Promise((resolve) => this.writers.push({ limitBytes, resolve }));
  }

  private wakeWriters(): void {
    if (this.writers.length === 0) return;
    const waiting = this.writers;
    this.writers = [];
    for (const writer of waiting) {
      if (this.unwritten <= writer.limitBytes || this.closedWith) writer.resolve();
      else this.writers.push(writer);
    }
  }

  private unwritten = 0;
  private writers: { limitBytes: number; resolve: () => void }[] = [];

  private receive(data: Buffer, isBinary: boolean): void {
    if (this.closedWith) return;
    let frames: AnyFrame[];
    try {
      if (!isBinary) throw new ProtocolError(ErrorCode.PROTOCOL, 'text message on a binary protocol');
      frames = this.decoder.push(data);
      if (frames.length !== 1 || this.decoder.bufferedBytes !== 0) {
        throw new ProtocolError(
          ErrorCode.PROTOCOL,
          `a message must carry exactly one frame (got ${frames.length}, ${this.decoder.bufferedBytes} bytes left over)`,
        );
      }
    } catch (err) {
      this.fail(toProtocolError(err));
      return;
    }
    const frame = frames[0]!;
    try {
      this.dispatch(frame, data.length);
    } catch (err) {
      this.fail(toProtocolError(err));
    }
  }

  private dispatch(frame: AnyFrame, wireBytes: number): void {
    if (!this.peerHello) {
      if (frame.type !== 'hello') {
        throw new ProtocolError(ErrorCode.UNEXPECTED_FRAME, `expected hello first, got frame type ${frame.type}`);
      }
      const hello = frame;
      if (hello.version !== PROTOCOL_VERSION) {
        throw new ProtocolError(
          ErrorCode.PROTOCOL_VERSION,
          `peer speaks protocol version ${hello.version}, this agent speaks ${PROTOCOL_VERSION}`,
        );
      }
      const certificate = this.options.peerCertificate;
      if (certificate && hello.agentId !== agentIdOf(certificate)) {
        this.options.onLimit?.('identity');
        throw new ProtocolError(
          ErrorCode.IDENTITY,
          `the peer's hello names agent ${JSON.stringify(hello.agentId)}, but its certificate (${describeIdentity(certificate)}) is agent ${JSON.stringify(agentIdOf(certificate))}`,
          { closeCode: CloseCode.policy },
        );
      }
      this.peerHello = hello;
      this.log.info({ peerAgent: hello.agentId, peerVersion: hello.agentVersion, features: hello.features }, 'session established');
      // The round trip of the idle session, before anything queues in front of it.
      this.measureRttMs().catch(() => {});
      this.resolveReady(hello);
      return;
    }
    if (REQUEST_FRAMES.has(frame.type)) this.takeRequest();
    switch (frame.type) {
      case 'hello':
        throw new ProtocolError(ErrorCode.UNEXPECTED_FRAME, 'second hello on a session');
      case 'error': {
        const error = frame;
        this.finish(new PeerError(error.code, error.message));
        this.ws.close(CloseCode.normal);
        return;
      }
      case 'offer':
        if (this.options.role !== 'server' || !this.onOffer) {
          throw new ProtocolError(ErrorCode.UNEXPECTED_FRAME, 'offer sent to the migrating side');
        }
        this.onOffer(frame, this);
        return;
      case 'migrationQuery':
        if (this.options.role !== 'server' || !this.onMigrationQuery) {
          throw new ProtocolError(ErrorCode.UNEXPECTED_FRAME, 'migrationQuery sent to the migrating side');
        }
        this.onMigrationQuery(frame, this);
        return;
      case 'reattach':
        if (this.options.role !== 'server' || !this.onReattach) {
          throw new ProtocolError(ErrorCode.UNEXPECTED_FRAME, 'reattach sent to the migrating side');
        }
        this.onReattach(frame, this);
        return;
      case 'dedupOpen':
      case 'dedupResident':
      case 'dedupReady':
      case 'dedupClose':
        if (!this.onGroupFrame) {
          throw new ProtocolError(ErrorCode.UNEXPECTED_FRAME, `${frame.type} on a session that has no dedup group handler (feature 'dedup' not offered)`);
        }
        this.onGroupFrame(frame, wireBytes);
        return;
      case 'trafficQuery': {
        if (!this.onTrafficQuery) {
          throw new ProtocolError(ErrorCode.UNEXPECTED_FRAME, "trafficQuery on a session that does not answer it (feature 'traffic' not offered)");
        }
        const { requestId } = frame;
        this.send(Frame.trafficReport({ requestId, ...this.onTrafficQuery() }));
        return;
      }
      case 'trafficReport': {
        const { type: _type, requestId, ...report } = frame;
        // An answer that arrives after its query timed out is dropped, like a frame racing an abort.
        const query = this.trafficQueries.get(requestId);
        if (query) query.resolve(report);
        else this.log.debug({ requestId }, 'trafficReport for no waiting query dropped');
        return;
      }
      default: {
        const migrationId = (frame as { migrationId?: string }).migrationId;
        const handler = migrationId === undefined ? undefined : this.handlers.get(migrationId);
        if (!handler) {
          // A frame can race an abort; it is dropped, not an error.
          this.log.debug({ migrationId, type: frame.type }, 'frame for an unknown migration dropped');
          return;
        }
        handler.onFrame(frame, wireBytes);
      }
    }
  }

  private requestTokens: number;
  private requestsRefilledAt = performance.now();

  /** One session-level request: a token from the bucket, or the session ends. */
  private takeRequest(): void {
    const limit = this.options.requests;
    if (!limit) return;
    const now = performance.now();
    this.requestTokens = Math.min(limit.burst, this.requestTokens + ((now - this.requestsRefilledAt) / 1000) * limit.perSecond);
    this.requestsRefilledAt = now;
    if (this.requestTokens < 1) {
      this.options.onLimit?.('requests');
      throw new ProtocolError(
        ErrorCode.LIMIT,
        `more than ${limit.burst} requests at once or ${limit.perSecond} per second (offer, reattach, migrationQuery, trafficQuery, dedupOpen, dedupClose): peers.requestsPerSecond / peers.requestBurst`,
        { closeCode: CloseCode.policy },
      );
    }
    this.requestTokens -= 1;
  }

  /**
   * The peer's agent id: proved by its certificate under TLS (known from the handshake on,
   * before the hello), claimed by its hello under plain ws (undefined before it).
   */
  get peerId(): string | undefined {
    const certificate = this.options.peerCertificate;
    return certificate ? agentIdOf(certificate) : this.peerHello?.agentId;
  }

  /** Ends the session with an error frame that tells the peer why. */
  fail(err: GangwayError): void {
    if (this.closedWith) return;
    this.log.warn({ code: err.code, err: err.message }, 'closing session');
    try {
      this.send(Frame.error({ code: err.code, message: err.message.slice(0, 1024) }));
    } catch {}
    const closeCode = err instanceof ProtocolError ? err.closeCode : CloseCode.policy;
    this.finish(err);
    this.ws.close(closeCode, err.code.slice(0, 100));
    // A peer that does not answer the close handshake is cut off.
    setTimeout(() => this.ws.terminate(), 2_000).unref();
  }

  close(): void {
    this.finish(new GangwayError(ErrorCode.SHUTTING_DOWN, 'session closed by this agent'));
    this.ws.close(CloseCode.goingAway);
    setTimeout(() => this.ws.terminate(), 2_000).unref();
  }

  private finish(err: GangwayError): void {
    if (this.closedWith) return;
    this.closedWith = err;
    this.rejectReady(err);
    this.wakeWriters();
    for (const handler of [...this.handlers.values()]) handler.onSessionClosed(err);
    for (const query of [...this.trafficQueries.values()]) query.reject(err);
    this.handlers.clear();
    this.emit('closed', err);
  }
}

function toProtocolError(err: unknown): GangwayError {
  if (err instanceof GangwayError) return err;
  return new ProtocolError(ErrorCode.PROTOCOL, err instanceof Error ? err.message : String(err), {
    cause: err,
  });
}

/**
 * The client's masking key: all zeros, which RFC 6455 allows (the key must be present, not
 * random for non-browser clients). Masking exists so that script in a browser cannot put
 * chosen bytes on the wire and poison an intermediary's cache; between two agents, over
 * mutual TLS or loopback, there is no such script and no such intermediary, so it buys
 * nothing. With a zero key ws (8.x, sender.js) sends the payload as it is, and the
 * receiving ws skips unmasking it: a real key would cost a masked copy of every page at
 * the source and an unmasking pass at the destination (test/agent/peer-mask.test.ts).
 */
const ZERO_MASK = (mask: Uint8Array) => mask.fill(0);

/** How connectPeer dials a peer agent. */
export interface ConnectOptions extends Omit<SessionOptions, 'role'> {
  /** Mutual TLS (wss): without it the peer is dialed with plain ws. */
  tls?: TlsMaterial;
}

/** Connects to a peer agent (the client side of a session; its frames carry ZERO_MASK). */
export function connectPeer(address: string, options: ConnectOptions): Promise<PeerSession> {
  return new Promise((resolve, reject) => {
    const { tls, ...sessionOptions } = options;
    // The server's certificate, as the TLS handshake proved it: its hello must match it.
    let serverIdentity: CertIdentity | undefined;
    const url = `${tls ? 'wss' : 'ws'}://${address}/gangway/v1`;
    // ws passes these through to tls.connect; its ClientOptions types checkServerIdentity
    // with the browser-style signature, so the TLS options are typed as node:tls's own.
    const tlsOptions: ConnectionOptions = tls
      ? {
          ...PEER_TLS_PROTOCOL,
          cert: tls.cert,
          key: tls.key,
          ca: tls.ca,
          rejectUnauthorized: true,
          // The allowlist replaces hostname matching (see tls.ts for why).
          checkServerIdentity: (_host, cert) => {
            const identity = identityOfPeer(cert);
            serverIdentity = identity;
            return allowlistRefusal(identity, tls.allow) ? serverNotAllowed(address, identity) : undefined;
          },
        }
      : {};
    const ws = new WebSocket(url, {
      perMessageDeflate: false,
      maxPayload: options.maxPayloadBytes + 256 * 1024,
      generateMask: ZERO_MASK,
      handshakeTimeout: 10_000,
      ...(tlsOptions as WebSocket.ClientOptions),
    });
    const onError = (err: Error) => reject(clientConnectError(address, err));
    ws.once('error', onError);
    ws.once('unexpected-response', (_req, res) => {
      // The peer finished the TLS handshake but refused the upgrade: 403 when it does not
      // list this agent. Its one-line reason comes in the body.
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => (body += chunk.slice(0, 1024 - body.length)));
      res.once('end', () => {
        ws.terminate();
        const reason = body.trim().split('\n')[0] ?? '';
        const refusal = res.headers[REFUSAL_HEADER];
        reject(
          res.statusCode === 403 && tls && refusal === 'not-listed'
            ? new GangwayError(ErrorCode.TLS, `the peer at ${address} does not list this agent (${describeIdentity(tls.self)}) in its tls.allow`)
            : res.statusCode === 403 && tls && refusal === 'certificate'
              ? new GangwayError(ErrorCode.TLS, `the peer at ${address} refused this agent's certificate: ${reason}`)
              : new GangwayError(ErrorCode.PEER_UNREACHABLE, `the agent at ${address} refused the WebSocket upgrade (HTTP ${res.statusCode}: ${reason})`),
        );
      });
    });
    ws.once('open', () => {
      ws.off('error', onError);
      if (tls && !serverIdentity) {
        ws.terminate();
        reject(new GangwayError(ErrorCode.TLS, `the peer at ${address} presented no certificate this agent could check`));
        return;
      }
      const session = new PeerSession(ws, { ...sessionOptions, role: 'client', ...(serverIdentity ? { peerCertificate: serverIdentity } : {}) });
      // The peer's hello and an error frame can come in one read (a peer that refuses the
      // session on our hello, as one over its session limit does): the session then closed
      // before this runs, and the caller gets the peer's reason, not a dead session.
      session.ready.then(
        () => (session.closedReason ? reject(session.closedReason) : resolve(session)),
        (err) => reject(err),
      );
    });
  });
}
