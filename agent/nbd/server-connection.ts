// One NBD client connection on the server: the handshake (protocol/nbd ServerHandshake),
// then requests served from an export, several at once.
//
//   handshake ──GO──► transmission ──DISC / close()──► draining ──in flight done──► closed
//       │                  │
//       └──── a ProtocolError, a timeout, the socket going away ────────────────────► closed
//
// Requests are served concurrently and answered as they complete, in any order (the spec
// allows it). At most maxInFlight requests holding at most maxInFlightBytes (READ lengths,
// WRITE payloads) are in flight; requests decoded beyond that wait in a queue, and while
// anything waits, or the socket's send buffer is full, the socket is paused: a client that
// sends faster than it is served, or never reads its replies, is slowed down by TCP instead
// of growing this process.
//
// A request the export cannot serve is answered with an NBD error and the connection goes
// on; only a broken wire format (magic, a WRITE over the maximum payload) hangs up.
import type { Duplex } from 'node:stream';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import {
  ALLOWED_COMMAND_FLAGS,
  BASE_ALLOCATION,
  Chunk,
  CommandFlag,
  type DecodedRequest,
  type ExtentOut,
  NBD_MAX_EXTENTS_PER_CHUNK,
  NbdCommand,
  NbdErrno,
  RequestDecoder,
  ServerHandshake,
  type ServerNegotiated,
  encodeSimpleReply,
} from '../../protocol/nbd/index.js';
import { type Extent, type NbdExport, nbdErrnoOf } from './export.js';
import { ZERO_GRANULE_BYTES, isZero } from './zeroes.js';
import type { NbdServerLimits } from './server.js';

/** How long a connection we hung up on may take to send what it had answered. */
const FAIL_LINGER_MS = 1_000;
/** Largest extent length on the wire (u32), kept a multiple of 4 KiB so splits stay aligned. */
const MAX_EXTENT_BYTES = 0xffff_f000;

type State = 'handshake' | 'transmission' | 'draining' | 'closed';

/** A request the export could not serve: answered with `errno`, the connection goes on. */
class RequestFailure extends Error {
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
  }
}

export class NbdServerConnection {
  /** Resolves once the socket is closed, with why (undefined for a clean end). */
  readonly closed: Promise<Error | undefined>;
  #resolveClosed!: (reason: Error | undefined) => void;
  #state: State = 'handshake';
  #reason: Error | undefined;
  readonly #handshake: ServerHandshake;
  #decoder: RequestDecoder | undefined;
  #negotiated: ServerNegotiated | undefined;
  #export: NbdExport | undefined;
  readonly #queue: DecodedRequest[] = [];
  #inFlight = 0;
  #inFlightBytes = 0;
  #handshakeTimer: NodeJS.Timeout | undefined;
  #shuttingDown = false;
  /** Why we hung up, while the socket finishes closing. */
  #failed: Error | undefined;

  constructor(
    private readonly socket: Duplex,
    private readonly exports: ReadonlyMap<string, NbdExport>,
    handshake: ServerHandshake,
    private readonly limits: NbdServerLimits,
  ) {
    this.closed = new Promise((resolve) => (this.#resolveClosed = resolve));
    this.#handshake = handshake;
    socket.on('data', (chunk: Buffer) => this.#onData(chunk));
    socket.on('drain', () => this.#pump());
    socket.on('error', (error) => this.#close(error));
    socket.on('close', () => this.#close(undefined));
    this.#handshakeTimer = setTimeout(
      () => this.#fail(new GangwayError(ErrorCode.TIMEOUT, `NBD handshake not done within ${limits.handshakeTimeoutMs} ms`)),
      limits.handshakeTimeoutMs,
    );
    this.#send([handshake.greeting()]);
  }

  get state(): State {
    return this.#state;
  }

  /** What transmission was entered with (undefined during the handshake). */
  get negotiated(): ServerNegotiated | undefined {
    return this.#negotiated;
  }

  get inFlight(): number {
    return this.#inFlight;
  }

  /** Reply bytes written and not yet taken by the kernel (what a client that does not read makes us hold). */
  get sendBufferBytes(): number {
    return this.socket.writableLength;
  }

  /**
   * Server shutdown: the handshake answers NBD_REP_ERR_SHUTDOWN from now on; in transmission,
   * nothing more is read, requests not started are answered ESHUTDOWN, those in flight finish,
   * then the socket ends. After graceMs the socket is destroyed whatever is left.
   */
  async shutdown(graceMs: number): Promise<void> {
    this.#shuttingDown = true;
    this.#handshake.shuttingDown = true;
    if (this.#state === 'transmission') this.#drain();
    const timer = setTimeout(() => this.socket.destroy(), graceMs);
    await this.closed;
    clearTimeout(timer);
  }

  #onData(chunk: Buffer): void {
    try {
      if (this.#state === 'handshake') {
        const step = this.#handshake.push(chunk);
        this.#send(step.send);
        const outcome = step.outcome;
        if (outcome?.kind === 'close') {
          if (outcome.error !== undefined) return this.#fail(outcome.error);
          this.#state = 'draining';
          this.socket.end();
        } else if (outcome?.kind === 'transmission') {
          this.#enterTransmission(outcome.negotiated);
          for (const rest of outcome.rest) this.#takeRequests(rest);
        } else {
          // Options are answered as they come: one that never reads its answers is paused.
          this.#pump();
        }
      } else if (this.#state === 'transmission') {
        this.#takeRequests(chunk);
      }
      // 'draining': the client said DISC (it MUST NOT send more) or we shut down: ignored.
    } catch (error) {
      this.#fail(error as Error);
    }
  }

  #enterTransmission(negotiated: ServerNegotiated): void {
    clearTimeout(this.#handshakeTimer);
    this.#negotiated = negotiated;
    this.#export = this.exports.get(negotiated.export.name);
    this.#decoder = new RequestDecoder({ maxPayloadBytes: negotiated.export.blockSizes.maximumBytes });
    this.#state = 'transmission';
    if (this.#shuttingDown) this.#drain();
  }

  #takeRequests(chunk: Buffer): void {
    if (this.#state !== 'transmission') return;
    for (const request of this.#decoder!.push(chunk)) {
      if (request.command === NbdCommand.disc) {
        // Requests before it are served; nothing after it counts.
        this.#state = 'draining';
        break;
      }
      this.#queue.push(request);
    }
    this.#pump();
  }

  /** Starts queued requests while the bounds allow, and pauses or resumes the socket. */
  #pump(): void {
    // A client that does not read its replies stops getting requests served: replies wait
    // in the socket's send buffer, which is bounded by this check (plus what is in flight).
    const writeBlocked = () => (this.socket as { writableNeedDrain?: boolean }).writableNeedDrain === true;
    while (this.#queue.length > 0 && !writeBlocked()) {
      const next = this.#queue[0]!;
      const cost = costOf(next);
      const room = this.#inFlight < this.limits.maxInFlight && (this.#inFlight === 0 || this.#inFlightBytes + cost <= this.limits.maxInFlightBytes);
      if (!room) break;
      this.#queue.shift();
      if (this.#shuttingDown) {
        this.#answerError(next, NbdErrno.ESHUTDOWN, 'the server is shutting down');
        continue;
      }
      this.#inFlight++;
      this.#inFlightBytes += cost;
      // #serve answers every failure itself; should answering fail too, this client is dropped, not the process.
      void this.#serve(next)
        .catch((error: unknown) => this.#fail(error instanceof Error ? error : new Error(String(error))))
        .finally(() => {
          this.#inFlight--;
          this.#inFlightBytes -= cost;
          this.#pump();
        });
    }
    if (this.#state === 'closed') return;
    if (this.#state === 'draining') {
      if (this.#queue.length === 0 && this.#inFlight === 0 && !this.socket.writableEnded) this.socket.end();
      return;
    }
    if (this.#queue.length > 0 || writeBlocked()) this.socket.pause();
    else this.socket.resume();
  }

  /** Stop reading, answer what has not started with ESHUTDOWN, end once in-flight requests are done. */
  #drain(): void {
    this.#state = 'draining';
    this.socket.pause();
    this.#pump();
  }

  async #serve(request: DecodedRequest): Promise<void> {
    try {
      this.#check(request);
      switch (request.command) {
        case NbdCommand.read:
          return await this.#read(request);
        case NbdCommand.blockStatus:
          return await this.#blockStatus(request);
        default:
          await this.#effect(request);
          this.#send(encodeSimpleReply(request.cookie, 0));
      }
    } catch (error) {
      if (error instanceof RequestFailure) return this.#answerError(request, error.errno, error.message);
      // The export's own words travel; the errno is the reply's (the client names it).
      this.#answerError(request, nbdErrnoOf(error), error instanceof Error ? error.message : String(error));
    }
  }

  /** The checks the spec asks of a server before it touches the export. */
  #check(r: DecodedRequest): void {
    const e = this.#export!;
    const n = this.#negotiated!;
    const invalid = (why: string) => new RequestFailure(NbdErrno.EINVAL, why);
    const allowed = ALLOWED_COMMAND_FLAGS[r.command as NbdCommand];
    if (allowed === undefined) throw invalid(`unknown command ${r.command}`);
    if ((r.flags & ~allowed) !== 0) throw invalid(`flags 0x${r.flags.toString(16)} are not valid for this command`);
    if (r.command === NbdCommand.flush) {
      if (e.flush === undefined) throw invalid('FLUSH is not supported by this export');
      return;
    }
    const writes = r.command === NbdCommand.write || r.command === NbdCommand.writeZeroes || r.command === NbdCommand.trim;
    if (writes && (e.readOnly || e.write === undefined)) throw new RequestFailure(NbdErrno.EPERM, 'the export is read-only');
    if (r.command === NbdCommand.trim && e.trim === undefined) throw invalid('TRIM is not supported by this export');
    if (r.command === NbdCommand.writeZeroes) {
      if (e.writeZeroes === undefined) throw invalid('WRITE_ZEROES is not supported by this export');
      // We do not advertise NBD_FLAG_SEND_FAST_ZERO: the spec says EINVAL for the flag then.
      if ((r.flags & CommandFlag.fastZero) !== 0) throw invalid('FAST_ZERO was not advertised');
    }
    if (r.command === NbdCommand.read && (r.flags & CommandFlag.df) !== 0 && !n.structuredReplies) throw invalid('DF without structured replies');
    if (r.command === NbdCommand.blockStatus && n.metaContexts.size === 0) throw invalid('no metadata context was selected');
    if (r.offsetBytes + r.lengthBytes > e.sizeBytes) {
      // The spec: ENOSPC for writes beyond the end, EINVAL for the rest.
      const errno = r.command === NbdCommand.write || r.command === NbdCommand.writeZeroes ? NbdErrno.ENOSPC : NbdErrno.EINVAL;
      throw new RequestFailure(errno, `[${r.offsetBytes}, +${r.lengthBytes}) is beyond the export's ${e.sizeBytes} bytes`);
    }
    const min = n.export.blockSizes.minimumBytes;
    if (r.offsetBytes % min !== 0 || (r.lengthBytes % min !== 0 && r.offsetBytes + r.lengthBytes !== e.sizeBytes)) {
      throw invalid(`[${r.offsetBytes}, +${r.lengthBytes}) is not aligned to the minimum block size ${min}`);
    }
    if (r.command === NbdCommand.read && r.lengthBytes > n.export.blockSizes.maximumBytes) {
      throw invalid(`a READ of ${r.lengthBytes} bytes is over the maximum payload of ${n.export.blockSizes.maximumBytes}`);
    }
  }

  async #effect(r: DecodedRequest): Promise<void> {
    const e = this.#export!;
    const fua = (r.flags & CommandFlag.fua) !== 0;
    switch (r.command) {
      case NbdCommand.write:
        if (r.lengthBytes > 0) await e.write!(r.offsetBytes, r.payload!, { fua });
        return;
      case NbdCommand.writeZeroes:
        if (r.lengthBytes > 0) await e.writeZeroes!(r.offsetBytes, r.lengthBytes, { noHole: (r.flags & CommandFlag.noHole) !== 0, fua });
        return;
      case NbdCommand.trim:
        if (r.lengthBytes > 0) await e.trim!(r.offsetBytes, r.lengthBytes, { fua });
        return;
      case NbdCommand.flush:
        await e.flush!();
        return;
      case NbdCommand.cache:
        // A hint with no effect here; in range (checked), so it succeeds.
        return;
    }
  }

  async #read(r: DecodedRequest): Promise<void> {
    const data = r.lengthBytes === 0 ? Buffer.alloc(0) : await this.#export!.read(r.offsetBytes, r.lengthBytes);
    if (data.length !== r.lengthBytes) throw new RequestFailure(NbdErrno.EIO, `the export returned ${data.length} bytes for ${r.lengthBytes}`);
    if (!this.#negotiated!.structuredReplies) return this.#send(encodeSimpleReply(r.cookie, 0, data));
    if (data.length === 0) return this.#send([Chunk.none(r.cookie)]);
    if ((r.flags & CommandFlag.df) !== 0) return this.#send(Chunk.offsetData(r.cookie, r.offsetBytes, data, true));
    // Runs of whole zero granules go as holes: a sparse export costs its reader no bandwidth.
    const runs = zeroRuns(data, r.offsetBytes);
    const parts: Uint8Array[] = [];
    runs.forEach((run, i) => {
      const done = i === runs.length - 1;
      if (run.zero) parts.push(Chunk.offsetHole(r.cookie, r.offsetBytes + run.start, run.end - run.start, done));
      else parts.push(...Chunk.offsetData(r.cookie, r.offsetBytes + run.start, data.subarray(run.start, run.end), done));
    });
    this.#send(parts);
  }

  async #blockStatus(r: DecodedRequest): Promise<void> {
    const e = this.#export!;
    const reqOne = (r.flags & CommandFlag.reqOne) !== 0;
    const contexts = [...this.#negotiated!.metaContexts];
    if (r.lengthBytes === 0) throw new RequestFailure(NbdErrno.EINVAL, 'block status of length 0');
    const chunks: Buffer[] = [];
    for (const [i, [id, name]] of contexts.entries()) {
      let extents: Extent[];
      if (e.blockStatus !== undefined) extents = await e.blockStatus(name, r.offsetBytes, r.lengthBytes);
      else if (name === BASE_ALLOCATION) extents = [{ lengthBytes: r.lengthBytes, flags: 0 }];
      else throw new RequestFailure(NbdErrno.EINVAL, `no context ${name}`);
      chunks.push(Chunk.blockStatus(r.cookie, id, clipExtents(extents, r.lengthBytes, reqOne, name), i === contexts.length - 1));
    }
    this.#send(chunks);
  }

  #answerError(r: DecodedRequest, errno: number, message: string): void {
    // Structured replies let the message travel; a READ must be answered structured then.
    if (this.#negotiated?.structuredReplies) this.#send([Chunk.error(r.cookie, errno, message, true)]);
    else this.#send(encodeSimpleReply(r.cookie, errno));
  }

  #send(parts: Uint8Array[]): void {
    const s = this.socket;
    if (s.destroyed || s.writableEnded) return;
    s.cork();
    for (const p of parts) s.write(p);
    s.uncork();
  }

  /**
   * A hard disconnect: nothing more is read or started, what was already answered still goes
   * out (a client can see the replies to everything before its mistake), and the socket is
   * destroyed after FAIL_LINGER_MS whether or not the client reads it.
   */
  #fail(error: Error): void {
    if (this.#state === 'closed' || this.#failed !== undefined) return;
    this.#failed = error;
    clearTimeout(this.#handshakeTimer);
    this.#queue.length = 0;
    this.#state = 'draining';
    this.socket.pause();
    this.socket.end();
    setTimeout(() => this.socket.destroy(), FAIL_LINGER_MS).unref();
  }

  #close(reason: Error | undefined): void {
    if (this.#state === 'closed') return;
    clearTimeout(this.#handshakeTimer);
    this.#state = 'closed';
    this.#reason = this.#failed ?? reason;
    this.#queue.length = 0;
    if (!this.socket.destroyed) this.socket.destroy();
    this.#resolveClosed(this.#reason);
  }
}

function costOf(r: DecodedRequest): number {
  return r.command === NbdCommand.read ? r.lengthBytes : (r.payload?.length ?? 0);
}

interface Run {
  start: number;
  end: number;
  zero: boolean;
}

/** [start, end) runs of `data` (which starts at export offset `base`): whole zero granules, and the rest. */
export function zeroRuns(data: Buffer, base: number): Run[] {
  const runs: Run[] = [];
  for (let at = 0; at < data.length; ) {
    const next = Math.min(data.length, (Math.floor((base + at) / ZERO_GRANULE_BYTES) + 1) * ZERO_GRANULE_BYTES - base);
    const whole = next - at === ZERO_GRANULE_BYTES;
    const zero = whole && isZero(data.subarray(at, next));
    const last = runs.at(-1);
    if (last !== undefined && last.zero === zero) last.end = next;
    else runs.push({ start: at, end: next, zero });
    at = next;
  }
  return runs;
}

/**
 * An export's extents as the wire wants them: cut to the request (REQ_ONE: one extent, not
 * longer than the request), split where longer than a u32, at most NBD_MAX_EXTENTS_PER_CHUNK.
 * Throws EIO when the export broke the interface (no extent, or one of length 0).
 */
export function clipExtents(extents: readonly Extent[], lengthBytes: number, reqOne: boolean, context: string): ExtentOut[] {
  const out: ExtentOut[] = [];
  let covered = 0;
  for (const e of extents) {
    if (!Number.isSafeInteger(e.lengthBytes) || e.lengthBytes <= 0) {
      throw new RequestFailure(NbdErrno.EIO, `the export gave an extent of length ${e.lengthBytes} for ${context}`);
    }
    let left = Math.min(e.lengthBytes, lengthBytes - covered);
    while (left > 0) {
      const n = Math.min(left, MAX_EXTENT_BYTES);
      out.push({ lengthBytes: n, flags: e.flags >>> 0 });
      covered += n;
      left -= n;
      if (reqOne || out.length === NBD_MAX_EXTENTS_PER_CHUNK) return out;
    }
    if (covered >= lengthBytes) break;
  }
  if (out.length === 0) throw new RequestFailure(NbdErrno.EIO, `the export gave no extent for ${context}`);
  return out;
}
