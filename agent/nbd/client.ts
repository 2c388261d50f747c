// An NBD client over a connected stream (unix or TCP socket): the handshake with NBD_OPT_GO,
// structured replies and metadata contexts when the server has them, then reads, writes,
// zeroing, trimming, flushing and block status, pipelined.
//
//     const client = await NbdClient.connect(socket, { exportName: 'disk0', metaContexts: ['base:allocation'] });
//     const data = await client.read(0, 1 << 20);
//     const extents = await client.blockStatus('base:allocation', 0, client.sizeBytes);
//     await client.close();
//
// Requests are pipelined: at most maxInFlight, holding at most maxInFlightBytes (a READ's
// length, a WRITE's payload), are in flight; more wait for room. A READ or WRITE larger than
// the server's maximum payload goes out as several requests; TRIM, WRITE_ZEROES and block
// status are split at 2 GiB (their lengths are u32). READ data lands straight in the buffer
// handed back (protocol/nbd ReplyDecoder writes into it), with no intermediate copy.
//
// Every wait is bounded: the handshake by connectTimeoutMs (and an optional signal), each
// request by its timeoutMs or signal, close() by its own bound. A request that times out is
// rejected with GANGWAY_ERR_TIMEOUT but stays in flight on the wire (NBD cannot cancel one):
// its slot is given back when its reply comes, and the reply is dropped.
//
// An error reply becomes an NbdCommandError carrying NBD's errno name and the server's
// message; the connection goes on. A server that breaks the protocol fails the connection
// (ProtocolError), as does losing the socket (GANGWAY_ERR_PEER_GONE); every request in
// flight is rejected with that error. On ESHUTDOWN the client disconnects (the spec's MUST).
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { ErrorCode, GangwayError, ProtocolError } from '../../protocol/errors.js';
import {
  type BlockSizes,
  ClientHandshake,
  type ClientNegotiated,
  CommandFlag,
  NBD_DEFAULT_MAX_IN_FLIGHT,
  NBD_DEFAULT_MAX_IN_FLIGHT_BYTES,
  NBD_MAX_PAYLOAD_BYTES,
  NbdCommand,
  NbdCommandError,
  NbdErrno,
  NbdOptionError,
  NBD_PREFERRED_BLOCK_BYTES,
  type ReplyFrame,
  ReplyDecoder,
  TransmissionFlag,
  encodeRequest,
  nbdName,
} from '../../protocol/nbd/index.js';
import { Coverage } from './coverage.js';
import type { Extent } from './export.js';

export const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
export const DEFAULT_REQUEST_TIMEOUT_MS = 60_000;
export const DEFAULT_CLOSE_TIMEOUT_MS = 10_000;
/** Effect-only requests (TRIM, WRITE_ZEROES, BLOCK_STATUS) are split here: a power of 2 below 2^32, aligned to any block size. */
export const EFFECT_SPLIT_BYTES = 2 ** 31;

export interface NbdClientOptions {
  exportName: string;
  /** Contexts to select ('base:allocation', 'qemu:dirty-bitmap:NAME'); those the server refuses are simply absent. */
  metaContexts?: readonly string[];
  /** Ask for structured replies (default true). */
  structuredReplies?: boolean;
  maxInFlight?: number;
  maxInFlightBytes?: number;
  /** Bounds the handshake (default 10 s). */
  connectTimeoutMs?: number;
  /** Abandons the handshake. */
  signal?: AbortSignal;
  /** The default bound on each request (60 s). */
  requestTimeoutMs?: number;
}

export interface NbdRequestOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface NbdWriteOptions extends NbdRequestOptions {
  /** Durable when the promise resolves (NBD_CMD_FLAG_FUA, or a FLUSH after it). */
  fua?: boolean;
}

export interface NbdZeroOptions extends NbdWriteOptions {
  /** The range must stay allocated (NBD_CMD_FLAG_NO_HOLE). */
  noHole?: boolean;
  /** Fail with ENOTSUP unless zeroing is faster than writing (needs NBD_FLAG_SEND_FAST_ZERO). */
  fastZero?: boolean;
}

export interface NbdBlockStatusOptions extends NbdRequestOptions {
  /** One extent per request (NBD_CMD_FLAG_REQ_ONE). */
  reqOne?: boolean;
}

interface Pending {
  command: number;
  offsetBytes: number;
  lengthBytes: number;
  cost: number;
  resolve: (extents: Map<number, Uint32Array> | undefined) => void;
  reject: (error: Error) => void;
  coverage: Coverage | undefined;
  errors: NbdCommandError[];
  extents: Map<number, Uint32Array>;
}

interface Waiter {
  cost: number;
  grant: () => void;
  reject: (error: Error) => void;
}

export class NbdClient {
  readonly exportName: string;
  readonly sizeBytes: number;
  readonly transmissionFlags: number;
  /** What the server advertised, or the spec's defaults (1, 4096, 32 MiB) when it did not. */
  readonly blockSizes: BlockSizes;
  readonly structuredReplies: boolean;
  /** The contexts the server selected, by name. */
  readonly metaContexts: readonly string[];
  readonly description: string | undefined;
  /** Resolves (never rejects) once the connection is over: undefined after close(), else why. */
  readonly closed: Promise<Error | undefined>;
  #resolveClosed!: (reason: Error | undefined) => void;
  readonly #socket: Duplex;
  readonly #decoder: ReplyDecoder;
  readonly #contextIds = new Map<string, number>();
  readonly #pending = new Map<bigint, Pending>();
  readonly #waiters: Waiter[] = [];
  /** close() waiting for the requests in flight to finish. */
  readonly #idleWaiters: (() => void)[] = [];
  readonly #maxInFlight: number;
  readonly #maxInFlightBytes: number;
  readonly #requestTimeoutMs: number;
  /** The largest READ/WRITE this client sends: the server's maximum, at most 32 MiB, a multiple of the minimum block. */
  readonly #maxDataBytes: number;
  #inFlight = 0;
  #inFlightBytes = 0;
  #nextCookie = 1n;
  #failure: Error | undefined;
  #closing: Promise<void> | undefined;
  #done = false;

  /** Connects over `socket` (already connected), or rejects and destroys it. */
  static async connect(socket: Duplex, options: NbdClientOptions): Promise<NbdClient> {
    const handshake = new ClientHandshake({
      exportName: options.exportName,
      ...(options.structuredReplies === undefined ? {} : { structuredReplies: options.structuredReplies }),
      ...(options.metaContexts === undefined ? {} : { metaContexts: options.metaContexts }),
    });
    (socket as Partial<Socket>).setNoDelay?.(true);
    const timeoutMs = options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const signals = [AbortSignal.timeout(timeoutMs), ...(options.signal === undefined ? [] : [options.signal])];
    const signal = AbortSignal.any(signals);
    return new Promise<NbdClient>((resolve, reject) => {
      const cleanup = () => {
        socket.off('data', onData);
        socket.off('close', onClose);
        socket.off('error', onError);
        signal.removeEventListener('abort', onAbort);
      };
      const failWith = (error: Error, soft = false) => {
        cleanup();
        if (soft && !socket.destroyed) {
          // A refused option: the spec's soft disconnect, NBD_OPT_ABORT, then hang up.
          for (const part of handshake.abortBytes()) socket.write(part);
          socket.end();
          setTimeout(() => socket.destroy(), 1_000).unref();
        } else {
          socket.destroy();
        }
        reject(error);
      };
      const onData = (chunk: Buffer) => {
        try {
          const step = handshake.push(chunk);
          for (const part of step.send) socket.write(part);
          if (step.done !== undefined) {
            cleanup();
            resolve(new NbdClient(socket, step.done.negotiated, step.done.rest, options));
          }
        } catch (error) {
          failWith(error as Error, error instanceof NbdOptionError);
        }
      };
      const onClose = () => {
        const why = handshake.state === 'exportNameReply' ? ` (export '${options.exportName}' unknown to a server without NBD_OPT_GO?)` : '';
        failWith(new GangwayError(ErrorCode.PEER_GONE, `NBD server closed the connection during the handshake${why}`));
      };
      const onError = (error: Error) =>
        failWith(new GangwayError(ErrorCode.PEER_GONE, `NBD connection failed during the handshake: ${error.message}`, { cause: error }));
      const onAbort = () => {
        const timedOut = signals[0]!.aborted;
        failWith(
          timedOut
            ? new GangwayError(ErrorCode.TIMEOUT, `NBD handshake with export '${options.exportName}' not done within ${timeoutMs} ms`)
            : new GangwayError(ErrorCode.ABORTED, 'NBD handshake aborted', { cause: signal.reason }),
        );
      };
      if (signal.aborted) return onAbort();
      socket.on('data', onData);
      socket.on('close', onClose);
      socket.on('error', onError);
      signal.addEventListener('abort', onAbort);
    });
  }

  private constructor(socket: Duplex, negotiated: ClientNegotiated, rest: Buffer[], options: NbdClientOptions) {
    this.#socket = socket;
    this.exportName = negotiated.exportName;
    this.sizeBytes = negotiated.sizeBytes;
    this.transmissionFlags = negotiated.transmissionFlags;
    this.blockSizes = negotiated.blockSizes ?? { minimumBytes: 1, preferredBytes: NBD_PREFERRED_BLOCK_BYTES, maximumBytes: NBD_MAX_PAYLOAD_BYTES };
    this.structuredReplies = negotiated.structuredReplies;
    this.description = negotiated.description;
    for (const [id, name] of negotiated.metaContexts) this.#contextIds.set(name, id);
    this.metaContexts = [...this.#contextIds.keys()];
    const min = this.blockSizes.minimumBytes;
    this.#maxDataBytes = Math.floor(Math.min(this.blockSizes.maximumBytes, NBD_MAX_PAYLOAD_BYTES) / min) * min;
    this.#decoder = new ReplyDecoder({ structuredReplies: this.structuredReplies, maxPayloadBytes: this.#maxDataBytes });
    this.#maxInFlight = options.maxInFlight ?? NBD_DEFAULT_MAX_IN_FLIGHT;
    this.#maxInFlightBytes = options.maxInFlightBytes ?? NBD_DEFAULT_MAX_IN_FLIGHT_BYTES;
    this.#requestTimeoutMs = options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
    this.closed = new Promise((resolve) => (this.#resolveClosed = resolve));
    socket.on('data', (chunk: Buffer) => this.#onData(chunk));
    socket.on('error', (error) => this.#fail(new GangwayError(ErrorCode.PEER_GONE, `NBD connection failed: ${error.message}`, { cause: error })));
    socket.on('close', () => this.#onClose());
    for (const chunk of rest) this.#onData(chunk);
  }

  #has(flag: number): boolean {
    return (this.transmissionFlags & flag) !== 0;
  }

  get readOnly(): boolean {
    return this.#has(TransmissionFlag.readOnly);
  }

  /** Requests sent and not yet answered (timed-out ones included until their reply comes). */
  get inFlight(): number {
    return this.#inFlight;
  }

  async read(offsetBytes: number, lengthBytes: number, options: NbdRequestOptions = {}): Promise<Buffer> {
    this.#checkRange('read', offsetBytes, lengthBytes);
    const out = Buffer.allocUnsafe(lengthBytes);
    await Promise.all(
      this.#pieces(offsetBytes, lengthBytes, this.#maxDataBytes).map(([at, n]) =>
        this.#request(NbdCommand.read, 0, at, n, { target: out.subarray(at - offsetBytes, at - offsetBytes + n) }, options),
      ),
    );
    return out;
  }

  async write(offsetBytes: number, data: Uint8Array, options: NbdWriteOptions = {}): Promise<void> {
    this.#checkWritable('write');
    this.#checkRange('write', offsetBytes, data.length);
    const fua = this.#fuaFlag(options);
    await Promise.all(
      this.#pieces(offsetBytes, data.length, this.#maxDataBytes).map(([at, n]) =>
        this.#request(NbdCommand.write, fua, at, n, { payload: data.subarray(at - offsetBytes, at - offsetBytes + n) }, options),
      ),
    );
    await this.#flushForFua(options);
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options: NbdZeroOptions = {}): Promise<void> {
    this.#checkWritable('writeZeroes');
    this.#need(TransmissionFlag.sendWriteZeroes, 'writeZeroes');
    if (options.fastZero) this.#need(TransmissionFlag.sendFastZero, 'writeZeroes with fastZero');
    this.#checkRange('writeZeroes', offsetBytes, lengthBytes);
    const flags = this.#fuaFlag(options) | (options.noHole ? CommandFlag.noHole : 0) | (options.fastZero ? CommandFlag.fastZero : 0);
    await Promise.all(this.#pieces(offsetBytes, lengthBytes, EFFECT_SPLIT_BYTES).map(([at, n]) => this.#request(NbdCommand.writeZeroes, flags, at, n, {}, options)));
    await this.#flushForFua(options);
  }

  async trim(offsetBytes: number, lengthBytes: number, options: NbdWriteOptions = {}): Promise<void> {
    this.#checkWritable('trim');
    this.#need(TransmissionFlag.sendTrim, 'trim');
    this.#checkRange('trim', offsetBytes, lengthBytes);
    const fua = this.#fuaFlag(options);
    await Promise.all(this.#pieces(offsetBytes, lengthBytes, EFFECT_SPLIT_BYTES).map(([at, n]) => this.#request(NbdCommand.trim, fua, at, n, {}, options)));
    await this.#flushForFua(options);
  }

  async flush(options: NbdRequestOptions = {}): Promise<void> {
    this.#need(TransmissionFlag.sendFlush, 'flush');
    await this.#request(NbdCommand.flush, 0, 0, 0, {}, options);
  }

  /** A prefetch hint (NBD_CMD_CACHE); servers that do not advertise it may still accept it. */
  async cache(offsetBytes: number, lengthBytes: number, options: NbdRequestOptions = {}): Promise<void> {
    this.#checkRange('cache', offsetBytes, lengthBytes);
    await Promise.all(this.#pieces(offsetBytes, lengthBytes, EFFECT_SPLIT_BYTES).map(([at, n]) => this.#request(NbdCommand.cache, 0, at, n, {}, options)));
  }

  /**
   * Extents of one selected context over exactly [offset, +length): requests are repeated
   * from where the server's answer ended, extents beyond the range are cut, and neighbours
   * with the same flags are merged.
   */
  async blockStatus(context: string, offsetBytes: number, lengthBytes: number, options: NbdBlockStatusOptions = {}): Promise<Extent[]> {
    const id = this.#contextId(context);
    this.#checkRange('blockStatus', offsetBytes, lengthBytes);
    const out: Extent[] = [];
    const end = offsetBytes + lengthBytes;
    for (let at = offsetBytes; at < end; ) {
      const n = Math.min(end - at, EFFECT_SPLIT_BYTES);
      const replies = (await this.#request(NbdCommand.blockStatus, options.reqOne ? CommandFlag.reqOne : 0, at, n, {}, options))!;
      const extents = replies.get(id)!;
      for (let i = 0; i < extents.length && at < end; i += 2) {
        const length = Math.min(extents[i]!, end - at);
        const flags = extents[i + 1]!;
        const last = out.at(-1);
        if (last !== undefined && last.flags === flags) last.lengthBytes += length;
        else out.push({ lengthBytes: length, flags });
        at += length;
      }
    }
    return out;
  }

  /** One BLOCK_STATUS request: every selected context's extents as the server sent them (cut to the range), by name. */
  async blockStatusAll(offsetBytes: number, lengthBytes: number, options: NbdBlockStatusOptions = {}): Promise<Map<string, Extent[]>> {
    if (this.#contextIds.size === 0) throw new GangwayError(ErrorCode.BAD_REQUEST, 'NBD block status: no metadata context was selected');
    this.#checkRange('blockStatus', offsetBytes, lengthBytes);
    const n = Math.min(lengthBytes, EFFECT_SPLIT_BYTES);
    const replies = (await this.#request(NbdCommand.blockStatus, options.reqOne ? CommandFlag.reqOne : 0, offsetBytes, n, {}, options))!;
    const out = new Map<string, Extent[]>();
    for (const [name, id] of this.#contextIds) {
      const extents = replies.get(id)!;
      const list: Extent[] = [];
      for (let i = 0, at = 0; i < extents.length && at < n; i += 2) {
        const length = Math.min(extents[i]!, n - at);
        list.push({ lengthBytes: length, flags: extents[i + 1]! });
        at += length;
      }
      out.set(name, list);
    }
    return out;
  }

  /**
   * The spec's soft disconnect: waits (at most timeoutMs) for requests in flight, sends
   * NBD_CMD_DISC, ends the socket and waits for it to close; past the bound it is destroyed.
   * New requests are refused from the start.
   */
  close(options: { timeoutMs?: number } = {}): Promise<void> {
    this.#closing ??= this.#close(options.timeoutMs ?? DEFAULT_CLOSE_TIMEOUT_MS);
    return this.#closing;
  }

  async #close(timeoutMs: number): Promise<void> {
    if (this.#done) return;
    const deadline = setTimeout(() => this.#socket.destroy(), timeoutMs);
    try {
      await this.#idle();
      if (!this.#done && !this.#socket.destroyed) {
        for (const part of encodeRequest({ command: NbdCommand.disc, flags: 0, cookie: this.#nextCookie++, offsetBytes: 0, lengthBytes: 0 })) {
          this.#socket.write(part);
        }
        this.#socket.end();
      }
      await this.closed;
    } finally {
      clearTimeout(deadline);
    }
  }

  /** Hangs up at once; requests in flight are rejected. */
  destroy(): void {
    this.#fail(new GangwayError(ErrorCode.ABORTED, 'NBD client destroyed'));
  }

  #idle(): Promise<void> {
    if (this.#done || (this.#inFlight === 0 && this.#waiters.length === 0)) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  // ---- requests --------------------------------------------------------------------------

  async #request(
    command: number,
    flags: number,
    offsetBytes: number,
    lengthBytes: number,
    data: { payload?: Uint8Array; target?: Buffer },
    options: NbdRequestOptions,
  ): Promise<Map<number, Uint32Array> | undefined> {
    const name = nbdName(NbdCommand, command) ?? String(command);
    const timeoutMs = options.timeoutMs ?? this.#requestTimeoutMs;
    const signals = [AbortSignal.timeout(timeoutMs), ...(options.signal === undefined ? [] : [options.signal])];
    const signal = AbortSignal.any(signals);
    const abandoned = () =>
      signals[0]!.aborted
        ? new GangwayError(ErrorCode.TIMEOUT, `NBD ${name} of [${offsetBytes}, +${lengthBytes}) not answered within ${timeoutMs} ms`)
        : new GangwayError(ErrorCode.ABORTED, `NBD ${name} aborted`, { cause: signal.reason });
    const cost = command === NbdCommand.read || command === NbdCommand.write ? lengthBytes : 0;
    await this.#acquire(cost, signal, abandoned);
    if (this.#failure !== undefined || signal.aborted) {
      // Given up between getting the slot and sending: nothing went out.
      this.#release(cost);
      throw this.#failure ?? abandoned();
    }
    return new Promise((resolve, reject) => {
      const cookie = this.#nextCookie++;
      const onAbort = () => reject(abandoned());
      const pending: Pending = {
        command,
        offsetBytes,
        lengthBytes,
        cost,
        resolve: (v) => {
          signal.removeEventListener('abort', onAbort);
          resolve(v);
        },
        reject: (e) => {
          signal.removeEventListener('abort', onAbort);
          reject(e);
        },
        coverage: command === NbdCommand.read && this.structuredReplies ? new Coverage() : undefined,
        errors: [],
        extents: new Map(),
      };
      try {
        this.#decoder.expect(cookie, { command, offsetBytes, lengthBytes, ...(data.target === undefined ? {} : { target: data.target }) });
      } catch (error) {
        this.#release(cost);
        return reject(error as Error);
      }
      this.#pending.set(cookie, pending);
      // Past this point the request is on the wire: an abort only stops waiting for it.
      signal.addEventListener('abort', onAbort);
      const parts = encodeRequest({ command, flags, cookie, offsetBytes, lengthBytes }, data.payload);
      this.#socket.cork();
      for (const part of parts) this.#socket.write(part);
      this.#socket.uncork();
    });
  }

  #acquire(cost: number, signal: AbortSignal, abandoned: () => Error): Promise<void> {
    if (this.#failure !== undefined) return Promise.reject(this.#failure);
    if (this.#closing !== undefined) return Promise.reject(new GangwayError(ErrorCode.SHUTTING_DOWN, 'NBD client is closing'));
    if (signal.aborted) return Promise.reject(abandoned());
    if (this.#fits(cost) && this.#waiters.length === 0) {
      this.#take(cost);
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => {
      const onAbort = () => {
        const i = this.#waiters.indexOf(waiter);
        if (i >= 0) this.#waiters.splice(i, 1);
        reject(abandoned());
        this.#wake();
      };
      const waiter: Waiter = {
        cost,
        grant: () => {
          signal.removeEventListener('abort', onAbort);
          this.#take(cost);
          resolve();
        },
        reject: (error) => {
          signal.removeEventListener('abort', onAbort);
          reject(error);
        },
      };
      signal.addEventListener('abort', onAbort);
      this.#waiters.push(waiter);
    });
  }

  #fits(cost: number): boolean {
    return this.#inFlight < this.#maxInFlight && (this.#inFlight === 0 || this.#inFlightBytes + cost <= this.#maxInFlightBytes);
  }

  #take(cost: number): void {
    this.#inFlight++;
    this.#inFlightBytes += cost;
  }

  #release(cost: number): void {
    this.#inFlight--;
    this.#inFlightBytes -= cost;
    this.#wake();
    if (this.#inFlight === 0 && this.#waiters.length === 0) for (const notify of this.#idleWaiters.splice(0)) notify();
  }

  /** Grants waiters in order while they fit (first come, first served: a big READ is not starved). */
  #wake(): void {
    while (this.#waiters.length > 0 && this.#fits(this.#waiters[0]!.cost)) this.#waiters.shift()!.grant();
  }

  // ---- replies ---------------------------------------------------------------------------

  #onData(chunk: Buffer): void {
    if (this.#done) return;
    let frames: ReplyFrame[];
    try {
      frames = this.#decoder.push(chunk);
    } catch (error) {
      return this.#fail(error as Error);
    }
    for (const frame of frames) {
      try {
        this.#onFrame(frame);
      } catch (error) {
        return this.#fail(error as Error);
      }
    }
  }

  #onFrame(frame: ReplyFrame): void {
    const p = this.#pending.get(frame.cookie)!;
    if (frame.kind === 'simple') {
      this.#finish(frame.cookie, p, frame.error === 0 ? [] : [NbdCommandError.of(frame.error, p.command)]);
      return;
    }
    const body = frame.body;
    const protocol = (why: string) => new ProtocolError(ErrorCode.PROTOCOL, `NBD ${nbdName(NbdCommand, p.command)} reply: ${why}`);
    switch (body.type) {
      case 'data':
      case 'hole':
        if (!p.coverage!.add(body.offsetBytes, body.offsetBytes + body.lengthBytes)) throw protocol(`chunk [${body.offsetBytes}, +${body.lengthBytes}) overlaps an earlier one`);
        break;
      case 'blockStatus':
        if (![...this.#contextIds.values()].includes(body.contextId)) throw protocol(`context id ${body.contextId} was not selected`);
        if (p.extents.has(body.contextId)) throw protocol(`two chunks for context id ${body.contextId}`);
        p.extents.set(body.contextId, body.extents);
        break;
      case 'error':
        p.errors.push(NbdCommandError.of(body.errno, p.command, body.message, body.offsetBytes));
        break;
      case 'none':
        break;
    }
    if (!frame.done) return;
    if (p.errors.length === 0) {
      if (p.coverage !== undefined && p.coverage.coveredBytes !== p.lengthBytes) {
        throw protocol(`DONE after ${p.coverage.coveredBytes} of ${p.lengthBytes} bytes`);
      }
      if (p.command === NbdCommand.blockStatus && p.extents.size !== this.#contextIds.size) {
        throw protocol(`${p.extents.size} status chunks for ${this.#contextIds.size} contexts`);
      }
    }
    this.#finish(frame.cookie, p, p.errors);
  }

  #finish(cookie: bigint, p: Pending, errors: NbdCommandError[]): void {
    this.#pending.delete(cookie);
    this.#release(p.cost);
    const first = errors[0];
    if (first === undefined) return p.resolve(p.command === NbdCommand.blockStatus ? p.extents : undefined);
    p.reject(first);
    // The spec: a client that receives ESHUTDOWN MUST initiate a soft disconnect.
    if (errors.some((e) => e.errno === NbdErrno.ESHUTDOWN)) void this.close().catch(() => undefined);
  }

  #onClose(): void {
    if (this.#closing !== undefined && this.#pending.size === 0) {
      this.#done = true;
      this.#rejectAll(new GangwayError(ErrorCode.SHUTTING_DOWN, 'NBD client closed'));
      this.#resolveClosed(undefined);
      return;
    }
    this.#fail(new GangwayError(ErrorCode.PEER_GONE, 'NBD server closed the connection'));
  }

  #fail(error: Error): void {
    if (this.#done) return;
    this.#done = true;
    this.#failure = error;
    this.#socket.destroy();
    this.#rejectAll(error);
    this.#resolveClosed(error);
  }

  #rejectAll(error: Error): void {
    for (const p of this.#pending.values()) p.reject(error);
    this.#pending.clear();
    for (const w of this.#waiters.splice(0)) w.reject(error);
    for (const notify of this.#idleWaiters.splice(0)) notify();
  }

  // ---- checks ----------------------------------------------------------------------------

  #checkRange(what: string, offsetBytes: number, lengthBytes: number): void {
    if (!Number.isSafeInteger(offsetBytes) || !Number.isSafeInteger(lengthBytes) || offsetBytes < 0 || lengthBytes < 0) {
      throw new RangeError(`NBD ${what}: offset ${offsetBytes} and length ${lengthBytes} must be non-negative integers`);
    }
    if (offsetBytes + lengthBytes > this.sizeBytes) {
      throw new RangeError(`NBD ${what}: [${offsetBytes}, +${lengthBytes}) is beyond the export's ${this.sizeBytes} bytes`);
    }
    const min = this.blockSizes.minimumBytes;
    const end = offsetBytes + lengthBytes;
    if (offsetBytes % min !== 0 || (end % min !== 0 && end !== this.sizeBytes)) {
      throw new RangeError(`NBD ${what}: [${offsetBytes}, +${lengthBytes}) is not aligned to the server's minimum block size ${min}`);
    }
  }

  #checkWritable(what: string): void {
    if (this.readOnly) throw new NbdCommandError(NbdErrno.EPERM, what, 'the export is read-only (refused before sending)');
  }

  #need(flag: number, what: string): void {
    if (!this.#has(flag)) throw new NbdCommandError(NbdErrno.ENOTSUP, what, 'the server does not offer it (refused before sending)');
  }

  #fuaFlag(options: NbdWriteOptions): number {
    return options.fua && this.#has(TransmissionFlag.sendFua) ? CommandFlag.fua : 0;
  }

  /** FUA asked of a server without SEND_FUA: a FLUSH after the write gives the same promise. */
  async #flushForFua(options: NbdWriteOptions): Promise<void> {
    if (!options.fua || this.#has(TransmissionFlag.sendFua)) return;
    await this.flush(options);
  }

  #contextId(context: string): number {
    const id = this.#contextIds.get(context);
    if (id === undefined) {
      throw new GangwayError(ErrorCode.BAD_REQUEST, `NBD block status: context '${context}' was not selected (selected: ${this.metaContexts.join(', ') || 'none'})`);
    }
    return id;
  }

  /** [offset, length] pieces of at most `max` bytes (at least one, for a length of 0). */
  #pieces(offsetBytes: number, lengthBytes: number, max: number): [number, number][] {
    const out: [number, number][] = [];
    for (let at = offsetBytes; at < offsetBytes + lengthBytes; at += max) out.push([at, Math.min(max, offsetBytes + lengthBytes - at)]);
    if (out.length === 0) out.push([offsetBytes, 0]);
    return out;
  }
}
