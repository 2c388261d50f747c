// The sessions this agent opens to other agents: one per address, shared by every migration,
// plan and whereabouts query that goes there; a closed one is replaced at its next use.
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import type { Logger } from '../log.js';
import { connectPeer, type ConnectOptions, type PeerSession } from '../peer/session.js';
import { hostOf, isLoopbackHost, type TlsMaterial } from '../peer/tls.js';

export interface SessionPoolContext {
  /** Mutual TLS; without it only loopback peers are dialed. */
  tls: TlsMaterial | undefined;
  log: Logger;
  /** What every session of this agent runs with, in either role. */
  sessionOptions: (log: Logger) => Omit<ConnectOptions, 'tls'>;
}

export class SessionPool {
  private readonly sessions = new Map<string, Promise<PeerSession>>();

  constructor(private readonly context: SessionPoolContext) {}

  /** Sessions open or being opened. */
  get size(): number {
    return this.sessions.size;
  }

  async session(address: string): Promise<PeerSession> {
    const existing = this.sessions.get(address);
    if (existing) {
      const session = await existing.catch(() => undefined);
      if (session?.isOpen) return session;
      this.sessions.delete(address);
    }
    const { tls, log } = this.context;
    if (!tls && !isLoopbackHost(hostOf(address))) {
      throw new GangwayError(
        ErrorCode.BAD_REQUEST,
        `this agent runs without TLS (insecurePlaintextLoopback) and dials loopback peers only; ${address} is not loopback: set tls.cert, tls.key, tls.ca and tls.allow`,
      );
    }
    const pending = connectPeer(address, {
      ...(tls ? { tls } : {}),
      ...this.context.sessionOptions(log.child({ peer: address })),
    });
    this.sessions.set(address, pending);
    try {
      const session = await pending;
      session.on('closed', () => {
        if (this.sessions.get(address) === pending) this.sessions.delete(address);
      });
      return session;
    } catch (err) {
      this.sessions.delete(address);
      throw err;
    }
  }

  /** Closes every session (shutdown): what still runs over them is aborted. */
  async closeAll(): Promise<void> {
    for (const pending of this.sessions.values()) (await pending.catch(() => undefined))?.close();
  }
}
