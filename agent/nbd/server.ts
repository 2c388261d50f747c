// An NBD server: serves exports (agent/nbd/export.ts) to NBD clients — ours, QEMU's,
// libnbd's — over sockets the caller accepts. The caller owns the listener:
//
//     const nbd = new NbdServer({ exports: [await FileExport.open(path, { name: 'disk0' })] });
//     const listener = net.createServer((socket) => nbd.handle(socket)).listen(socketPath);
//     ...
//     listener.close(); await nbd.close();
//
// Each connection is an NbdServerConnection (server-connection.ts). close() shuts every one
// down as the spec asks: options get NBD_REP_ERR_SHUTDOWN, requests not started get
// ESHUTDOWN, requests in flight finish, then the sockets end (destroyed after graceMs).
import type { Duplex } from 'node:stream';
import type { Socket } from 'node:net';
import {
  NBD_DEFAULT_MAX_IN_FLIGHT,
  NBD_DEFAULT_MAX_IN_FLIGHT_BYTES,
  NBD_MAX_PAYLOAD_BYTES,
  type NbdCatalog,
  type NbdExportDescription,
  ServerHandshake,
  blockSizesProblem,
  encodeString,
  isKnownContextName,
} from '../../protocol/nbd/index.js';
import { type NbdExport, describeExport } from './export.js';
import { NbdServerConnection } from './server-connection.js';

export interface NbdServerLimits {
  /** Requests served at once per connection. */
  maxInFlight: number;
  /** Request bytes (READ lengths, WRITE payloads) held at once per connection. */
  maxInFlightBytes: number;
  /** A connection that has not entered transmission by then is closed. */
  handshakeTimeoutMs: number;
}

export interface NbdServerOptions extends Partial<NbdServerLimits> {
  exports: readonly NbdExport[];
  /** The maximum payload advertised and enforced (default and at most 32 MiB). */
  maxPayloadBytes?: number;
  /** How long close() lets requests in flight finish before it destroys the sockets. */
  shutdownGraceMs?: number;
}

export const DEFAULT_HANDSHAKE_TIMEOUT_MS = 10_000;
export const DEFAULT_SHUTDOWN_GRACE_MS = 5_000;

export class NbdServer {
  readonly #exports = new Map<string, NbdExport>();
  readonly #catalog: NbdCatalog;
  readonly #limits: NbdServerLimits;
  readonly #graceMs: number;
  readonly #connections = new Set<NbdServerConnection>();
  #closing = false;

  constructor(options: NbdServerOptions) {
    const maxPayloadBytes = options.maxPayloadBytes ?? NBD_MAX_PAYLOAD_BYTES;
    if (!Number.isSafeInteger(maxPayloadBytes) || maxPayloadBytes < 4096 || maxPayloadBytes > NBD_MAX_PAYLOAD_BYTES) {
      throw new RangeError(`maxPayloadBytes must be in 4096..${NBD_MAX_PAYLOAD_BYTES}, got ${maxPayloadBytes}`);
    }
    const descriptions = new Map<string, NbdExportDescription>();
    for (const e of options.exports) {
      encodeString(e.name, 'export name');
      if (this.#exports.has(e.name)) throw new RangeError(`two exports named '${e.name}'`);
      if (!Number.isSafeInteger(e.sizeBytes) || e.sizeBytes < 0) throw new RangeError(`export '${e.name}': size ${e.sizeBytes}`);
      const d = describeExport(e, maxPayloadBytes);
      const problem = blockSizesProblem(d.blockSizes);
      if (problem !== undefined) throw new RangeError(`export '${e.name}': ${problem}`);
      for (const c of d.metaContexts) if (!isKnownContextName(c)) throw new RangeError(`export '${e.name}': unknown metadata context '${c}'`);
      this.#exports.set(e.name, e);
      descriptions.set(e.name, d);
    }
    const list = [...descriptions.values()];
    this.#catalog = { find: (name) => descriptions.get(name), list: () => list };
    this.#limits = {
      maxInFlight: options.maxInFlight ?? NBD_DEFAULT_MAX_IN_FLIGHT,
      maxInFlightBytes: options.maxInFlightBytes ?? NBD_DEFAULT_MAX_IN_FLIGHT_BYTES,
      handshakeTimeoutMs: options.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS,
    };
    if (this.#limits.maxInFlight < 1) throw new RangeError('maxInFlight must be at least 1');
    this.#graceMs = options.shutdownGraceMs ?? DEFAULT_SHUTDOWN_GRACE_MS;
  }

  get connectionCount(): number {
    return this.#connections.size;
  }

  get connections(): readonly NbdServerConnection[] {
    return [...this.#connections];
  }

  /** Serves one accepted socket (unix or TCP); the connection owns it from now on. */
  handle(socket: Duplex): NbdServerConnection | undefined {
    if (this.#closing) {
      socket.destroy();
      return undefined;
    }
    // The spec: TCP peers SHOULD disable Nagle (a reply header must not wait for an ACK).
    (socket as Partial<Socket>).setNoDelay?.(true);
    const connection = new NbdServerConnection(socket, this.#exports, new ServerHandshake(this.#catalog), this.#limits);
    this.#connections.add(connection);
    void connection.closed.then(() => this.#connections.delete(connection));
    return connection;
  }

  /** Shuts every connection down (see the top of the file); resolves once all are closed. */
  async close(): Promise<void> {
    this.#closing = true;
    await Promise.all([...this.#connections].map((c) => c.shutdown(this.#graceMs)));
  }
}
