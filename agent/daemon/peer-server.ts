// The peer port: where other agents open sessions to this one, over mutual TLS with an
// allowlist or plain ws on loopback. It decides who may connect (certificate, handshake time,
// sessions per peer) and hands each session's requests to the part of the agent that serves
// them (PeerRoutes).
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { createServer as createNetServer, type Server as NetServer, type Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import { WebSocketServer } from 'ws';
import { ErrorCode, GangwayError, ProtocolCloseCode, ProtocolError } from '../../protocol/errors.js';
import type { FrameOf } from '../../protocol/index.js';
import type { AgentConfig } from '../daemon.js';
import type { DestinationGroup } from '../dedup/dest-group.js';
import type { Logger } from '../log.js';
import { Slots } from '../migration/flow.js';
import { loadNative } from '../native.js';
import { Channel, CHANNEL_PREAMBLE, socketFdOf, type ChannelHelloIn } from '../peer/channel.js';
import { PeerSession, type GroupFrame, type OfferFrame, type SessionOptions, type TrafficReport } from '../peer/session.js';
import { describeTlsError, identityOfPeer, isLoopbackHost, PEER_TLS_PROTOCOL, REFUSAL_HEADER, refusePeer, type Refusal, type TlsMaterial } from '../peer/tls.js';

/** What the migrations of one incoming session share: its dedup groups and its decompression slots. */
export interface SessionShare {
  groups: Map<string, DestinationGroup>;
  decompressions: Slots;
}

/** Who serves what a peer asks for on a session it opened here. */
export interface PeerRoutes {
  onOffer(offer: OfferFrame, session: PeerSession, shared: SessionShare): void;
  onGroupFrame(frame: GroupFrame, session: PeerSession, groups: Map<string, DestinationGroup>): void;
  onReattach(frame: FrameOf<'reattach'>, session: PeerSession): void;
  onMigrationQuery(frame: FrameOf<'migrationQuery'>, session: PeerSession): void;
  onTrafficQuery(): TrafficReport;
  /** A channel's hello: attach the channel to the migration it names, or refuse it (a reason for the log). */
  onChannel(hello: ChannelHelloIn, channel: Channel): string | undefined;
}

/** Channels that connected and have not been attached or refused yet, at most. */
const MAX_PENDING_CHANNELS = 32;
/** Connections that have not sent their first bytes yet, at most (the rest are dropped). */
const MAX_AT_DOOR = 128;

export interface PeerServerContext {
  config: Pick<AgentConfig, 'transport' | 'listenHost' | 'listenPort' | 'maxPayloadBytes' | 'peers'>;
  /** Loaded at start when the transport is TLS. */
  tls: TlsMaterial | undefined;
  log: Logger;
  /** What every session of this agent runs with, in either role. */
  sessionOptions: (log: Logger) => Omit<SessionOptions, 'role'>;
  /** A peer hit one of the peers.* limits: counted. */
  onLimit: (limit: string) => void;
  routes: PeerRoutes;
}

export class PeerServer {
  private server: Server | undefined;
  private door: NetServer | undefined;
  private wss: WebSocketServer | undefined;
  private pendingChannels = 0;
  private readonly sessions = new Set<PeerSession>();

  constructor(private readonly context: PeerServerContext) {}

  /** Sessions peers have open here. */
  get sessionCount(): number {
    return this.sessions.size;
  }

  /** Listens on listenHost:listenPort; resolves with HOST:PORT (the port picked when it was 0). */
  listen(): Promise<string> {
    const { config, tls, routes } = this.context;
    const transport = config.transport;
    if (transport.kind === 'plaintext-loopback' && !isLoopbackHost(config.listenHost)) {
      throw new GangwayError(ErrorCode.BAD_REQUEST, `plain ws listens on loopback only (got "${config.listenHost}"): set tls.cert, tls.key, tls.ca and tls.allow`);
    }
    if (tls && tls.validTo.getTime() < Date.now()) {
      this.context.log.warn({ cert: transport.kind === 'tls' ? transport.certPath : undefined, validTo: tls.validTo.toISOString() }, "this agent's certificate has expired: peers will refuse it");
    }
    // After the handshake, on every request: the client certificate must pass the CA check and be listed.
    const refusal = (req: IncomingMessage): Refusal | undefined => (tls ? refusePeer(req.socket as TLSSocket, tls.allow) : undefined);
    const refuse = (req: IncomingMessage, why: Refusal) => {
      this.context.log.warn({ peer: `${req.socket.remoteAddress}:${req.socket.remotePort}`, reason: why.reason }, why.kind === 'certificate' ? "refused a peer's certificate" : 'refused a peer');
      return { [REFUSAL_HEADER]: why.kind, 'content-type': 'text/plain' };
    };
    // From its TCP (plain) or TLS connection on, a peer has handshakeTimeout to finish its
    // WebSocket upgrade; a connection that sends nothing (or dribbles) is dropped then.
    const limits = config.peers;
    const upgradeTimers = new WeakMap<object, NodeJS.Timeout>();
    const armUpgradeTimer = (socket: Socket) => {
      const timer = setTimeout(() => {
        this.context.onLimit('handshake');
        this.context.log.warn({ peer: `${socket.remoteAddress}:${socket.remotePort}`, timeoutMs: limits.handshakeTimeoutMs }, 'dropped a peer connection that did not finish its handshake in time (peers.handshakeTimeout)');
        socket.destroy();
      }, limits.handshakeTimeoutMs);
      timer.unref();
      upgradeTimers.set(socket, timer);
      socket.once('close', () => clearTimeout(timer));
    };
    const disarmUpgradeTimer = (socket: object) => clearTimeout(upgradeTimers.get(socket));
    const onRequest = (req: IncomingMessage, res: ServerResponse) => {
      disarmUpgradeTimer(req.socket);
      const why = refusal(req);
      if (why) res.writeHead(403, refuse(req, why)).end(`${why.reason}\n`);
      else res.writeHead(426, { 'content-type': 'text/plain' }).end('gangway peer port: WebSocket only\n');
    };
    const server: Server = tls
      ? createHttpsServer({ ...PEER_TLS_PROTOCOL, cert: tls.cert, key: tls.key, ca: tls.ca, requestCert: true, rejectUnauthorized: false, handshakeTimeout: limits.handshakeTimeoutMs }, onRequest)
      : createServer(onRequest);
    server.on(tls ? 'secureConnection' : 'connection', armUpgradeTimer);
    if (tls) {
      server.on('tlsClientError', (err: NodeJS.ErrnoException, socket: TLSSocket) => {
        if (err.code === 'ERR_TLS_HANDSHAKE_TIMEOUT') this.context.onLimit('handshake');
        this.context.log.warn({ peer: `${socket.remoteAddress}:${socket.remotePort}`, reason: describeTlsError(err) }, "refused a peer's TLS handshake");
      });
    }
    const wss = new WebSocketServer({
      server,
      path: '/gangway/v1',
      perMessageDeflate: false,
      maxPayload: config.maxPayloadBytes + 256 * 1024,
      verifyClient: (info, done) => {
        const why = refusal(info.req);
        if (!why) return done(true);
        done(false, 403, why.reason, refuse(info.req, why));
      },
    });
    wss.on('connection', (ws, req) => {
      disarmUpgradeTimer(req.socket);
      const remote = `${req.socket.remoteAddress}:${req.socket.remotePort}`;
      const log = this.context.log.child({ peer: remote });
      // The certificate the handshake proved (verifyClient refused any other): the peer's hello must name it.
      const certificate = tls ? identityOfPeer((req.socket as TLSSocket).getPeerCertificate()) : undefined;
      const session = new PeerSession(ws, {
        ...this.context.sessionOptions(log),
        role: 'server',
        ...(certificate ? { peerCertificate: certificate } : {}),
      });
      // What the session's migrations share: its dedup groups and its decompression slots.
      const groups = new Map<string, DestinationGroup>();
      const decompressions = new Slots(limits.decompressionsPerSession);
      this.sessions.add(session);
      session.on('closed', () => {
        this.sessions.delete(session);
        for (const group of groups.values()) void group.close();
      });
      // Sessions per peer: under TLS the certificate names the peer at once, under plain ws
      // its hello does.
      const countSessions = () => {
        const peer = session.peerId;
        const open = [...this.sessions].filter((other) => other.peerId === peer).length;
        if (peer === undefined || open <= limits.maxSessionsPerPeer) return;
        this.context.onLimit('sessions');
        session.fail(new ProtocolError(ErrorCode.LIMIT, `this peer has ${open - 1} sessions open here already (peers.maxSessionsPerPeer = ${limits.maxSessionsPerPeer})`, { closeCode: ProtocolCloseCode.policy }));
      };
      if (certificate) countSessions();
      else session.ready.then(countSessions, () => {});
      session.onOffer = (offer) => routes.onOffer(offer, session, { groups, decompressions });
      session.onGroupFrame = (frame) => routes.onGroupFrame(frame, session, groups);
      session.onTrafficQuery = () => routes.onTrafficQuery();
      session.onReattach = (frame) => routes.onReattach(frame, session);
      session.onMigrationQuery = (frame) => routes.onMigrationQuery(frame, session);
    });
    this.server = server;
    this.wss = wss;
    // The port's door: a channel (peer/channel.ts) says so with its first bytes; every other
    // connection goes on to the HTTP(S) server, which reads it from its first byte.
    // Connections the door is still peeking at: each costs a timer, so there is a cap.
    let atDoor = 0;
    const door = createNetServer({ pauseOnConnect: true }, (socket) => {
      socket.on('error', () => {});
      if (atDoor >= MAX_AT_DOOR) {
        this.context.onLimit('handshake');
        this.context.log.warn({ peer: `${socket.remoteAddress}:${socket.remotePort}`, waiting: atDoor }, 'dropped a peer connection: too many connections have sent nothing yet');
        socket.destroy();
        return;
      }
      atDoor++;
      let counted = true;
      const leave = () => {
        if (counted) atDoor--;
        counted = false;
      };
      socket.once('close', leave);
      sortConnection(socket, limits.handshakeTimeoutMs, {
        channel: (socket) => {
          leave();
          this.acceptChannel(socket);
        },
        other: (socket) => {
          leave();
          server.emit('connection', socket);
          // Paused at the door: the HTTP server would never read it (the TLS server does either way).
          socket.resume();
        },
        timeout: (socket) => {
          this.context.onLimit('handshake');
          this.context.log.warn({ peer: `${socket.remoteAddress}:${socket.remotePort}`, timeoutMs: limits.handshakeTimeoutMs }, 'dropped a peer connection that sent nothing in time (peers.handshakeTimeout)');
          socket.destroy();
        },
      });
    });
    this.door = door;
    return new Promise((resolve, reject) => {
      // ws re-emits the server's errors on the WebSocketServer: without a listener there, a
      // port in use crashed the agent with a stack trace instead of failing start().
      const ignore = () => {};
      wss.once('error', ignore);
      door.once('error', (err: NodeJS.ErrnoException) => {
        const why =
          err.code === 'EADDRINUSE'
            ? 'the address is in use (another agent or program listens there)'
            : err.code === 'EADDRNOTAVAIL'
              ? 'no interface of this host has that address'
              : err.code === 'EACCES'
                ? 'permission denied (a port below 1024 needs root or CAP_NET_BIND_SERVICE)'
                : err.message;
        reject(new GangwayError(ErrorCode.BAD_REQUEST, `cannot listen for peers on ${config.listenHost}:${config.listenPort}: ${why}; set another address with listen (--listen, GANGWAY_LISTEN)`));
      });
      door.listen(config.listenPort, config.listenHost, () => {
        wss.off('error', ignore);
        const address = door.address();
        const port = typeof address === 'object' && address ? address.port : config.listenPort;
        resolve(`${config.listenHost}:${port}`);
      });
    });
  }

  /** Closes every session peers have open here (shutdown): what runs over them is aborted. */
  closeSessions(): void {
    for (const session of this.sessions) session.close();
  }

  /**
   * A connection that began with a channel's preamble: its hello goes to the migration it
   * names (routes.onChannel), which attaches it or refuses it.
   */
  private acceptChannel(socket: Socket): void {
    const log = this.context.log.child({ peer: `${socket.remoteAddress}:${socket.remotePort}` });
    if (this.pendingChannels >= MAX_PENDING_CHANNELS) {
      this.context.onLimit('channels');
      log.warn({ pending: this.pendingChannels }, 'refused a channel: too many channels wait for their hello');
      socket.destroy();
      return;
    }
    const tls = this.context.tls;
    let channel: Channel;
    try {
      channel = Channel.accept(socket, tls ? { cert: tls.cert, key: tls.key, ca: tls.ca } : undefined);
    } catch (err) {
      log.warn({ err: (err as Error).message }, 'could not take a channel');
      return;
    }
    this.pendingChannels++;
    let pending = true;
    const settle = () => {
      if (pending) this.pendingChannels--;
      pending = false;
    };
    void channel.closed.then(() => {
      settle();
      const failure = channel.failed;
      if (failure && failure.code !== ErrorCode.ABORTED) log.warn({ err: failure.message }, 'a channel failed');
    });
    channel.onHello = (hello) => {
      settle();
      const refusal = this.context.routes.onChannel(hello, channel);
      if (refusal === undefined) return;
      this.context.onLimit('channels');
      log.warn({ migrationId: hello.migrationId, reason: refusal }, 'refused a channel');
      void channel.close();
    };
  }

  /** Stops listening; resolves once the server is closed. */
  close(): Promise<void> {
    this.wss?.close();
    const closing = [this.door, this.server].map((server) => new Promise<void>((resolve) => (server ? server.close(() => resolve()) : resolve())));
    return Promise.all(closing).then(() => {});
  }
}

/**
 * Peeks at a paused connection until its first bytes tell: a channel's preamble, or anything
 * else (a TLS ClientHello, an HTTP request), which is left unread for the server. A
 * connection that sends nothing within `timeoutMs` is given to `timeout`.
 */
export function sortConnection(
  socket: Socket,
  timeoutMs: number,
  to: { channel: (socket: Socket) => void; other: (socket: Socket) => void; timeout: (socket: Socket) => void },
): void {
  const fd = socketFdOf(socket);
  if (fd === undefined) {
    to.other(socket);
    return;
  }
  const native = loadNative();
  const deadline = performance.now() + timeoutMs;
  let waitMs = 1;
  const look = () => {
    if (socket.destroyed) return;
    let head: Buffer | null;
    try {
      head = native.socketPeek(fd, CHANNEL_PREAMBLE.length);
    } catch {
      socket.destroy();
      return;
    }
    if (head === null) {
      socket.destroy();
      return;
    }
    if (head.length > 0 && !head.equals(CHANNEL_PREAMBLE.subarray(0, head.length))) return to.other(socket);
    if (head.length === CHANNEL_PREAMBLE.length) return to.channel(socket);
    if (performance.now() >= deadline) return to.timeout(socket);
    setTimeout(look, waitMs).unref();
    waitMs = Math.min(waitMs * 2, 25);
  };
  look();
}
