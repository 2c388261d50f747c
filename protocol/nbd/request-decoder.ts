// The server's decoder of the transmission phase: chunks in, whole requests out.
//
//   header (28 bytes) ──WRITE with length > 0──► payload (length bytes) ──► header ...
//                    └─anything else──────────► header ...
//
// A WRITE's length is checked against the maximum payload on the header alone, before any
// byte of it is buffered; a payload that arrives whole within one chunk is handed out as a
// view of that chunk (zero-copy: the caller must not reuse a chunk's memory after pushing
// it). Other commands have no payload on the wire whatever their length says, so their
// lengths are the server's to judge (it answers EINVAL or EOVERFLOW), not the decoder's.
// Unknown command types come out as they are, for the server to answer EINVAL (the spec).
//
// Any violation throws a ProtocolError; the decoder is then poisoned and every later push()
// throws the same error (the connection is over).
import { ErrorCode, ProtocolError } from '../errors.js';
import { NBD_EXTENDED_REQUEST_MAGIC, NBD_REQUEST_MAGIC, NbdCommand } from './constants.js';
import { NBD_MAX_PAYLOAD_BYTES } from './limits.js';
import { type NbdRequest, REQUEST_HEADER_BYTES } from './transmission.js';
import { asBuffer, readOffset } from './wire.js';

export interface DecodedRequest extends NbdRequest {
  /** A WRITE's data (lengthBytes of it); absent for every other command. */
  payload?: Buffer;
}

export interface RequestDecoderLimits {
  /** The largest WRITE payload accepted (what the server advertised). */
  maxPayloadBytes?: number;
}

export class RequestDecoder {
  readonly maxPayloadBytes: number;
  readonly #header = Buffer.alloc(REQUEST_HEADER_BYTES);
  #headerFill = 0;
  /** A WRITE whose payload is being assembled. */
  #pending: DecodedRequest | undefined;
  #part: Buffer | undefined;
  #partFill = 0;
  #failure: ProtocolError | undefined;

  constructor(limits: RequestDecoderLimits = {}) {
    const max = limits.maxPayloadBytes ?? NBD_MAX_PAYLOAD_BYTES;
    if (!Number.isSafeInteger(max) || max < 1 || max > NBD_MAX_PAYLOAD_BYTES) {
      throw new RangeError(`maxPayloadBytes must be an integer in 1..${NBD_MAX_PAYLOAD_BYTES}, got ${max}`);
    }
    this.maxPayloadBytes = max;
  }

  /** Bytes of the request in progress received so far (0 between requests). */
  get bufferedBytes(): number {
    return this.#pending === undefined ? this.#headerFill : REQUEST_HEADER_BYTES + this.#partFill;
  }

  push(chunk: Uint8Array): DecodedRequest[] {
    if (this.#failure !== undefined) throw this.#failure;
    try {
      return this.#consume(asBuffer(chunk));
    } catch (error) {
      this.#failure =
        error instanceof ProtocolError
          ? error
          : new ProtocolError(ErrorCode.PROTOCOL, `NBD request decoder failed: ${(error as Error)?.message}`, { cause: error });
      this.#pending = undefined;
      this.#part = undefined;
      this.#headerFill = 0;
      this.#partFill = 0;
      throw this.#failure;
    }
  }

  #consume(chunk: Buffer): DecodedRequest[] {
    const out: DecodedRequest[] = [];
    let at = 0;
    while (at < chunk.length) {
      const pending = this.#pending;
      if (pending === undefined) {
        const n = Math.min(REQUEST_HEADER_BYTES - this.#headerFill, chunk.length - at);
        chunk.copy(this.#header, this.#headerFill, at, at + n);
        this.#headerFill += n;
        at += n;
        if (this.#headerFill < REQUEST_HEADER_BYTES) break;
        this.#headerFill = 0;
        const request = this.#readHeader(this.#header);
        if (request.command === NbdCommand.write && request.lengthBytes > 0) this.#pending = request;
        else out.push(request);
        continue;
      }
      const length = pending.lengthBytes;
      if (this.#partFill === 0 && chunk.length - at >= length) {
        pending.payload = chunk.subarray(at, at + length);
        at += length;
      } else {
        this.#part ??= Buffer.allocUnsafe(length);
        const n = Math.min(length - this.#partFill, chunk.length - at);
        chunk.copy(this.#part, this.#partFill, at, at + n);
        this.#partFill += n;
        at += n;
        if (this.#partFill < length) break;
        pending.payload = this.#part;
        this.#part = undefined;
        this.#partFill = 0;
      }
      this.#pending = undefined;
      out.push(pending);
    }
    return out;
  }

  #readHeader(h: Buffer): DecodedRequest {
    const magic = h.readUInt32BE(0);
    if (magic !== NBD_REQUEST_MAGIC) {
      if (magic === NBD_EXTENDED_REQUEST_MAGIC) {
        throw new ProtocolError(ErrorCode.PROTOCOL_VERSION, 'NBD request: extended header, which was not negotiated');
      }
      throw new ProtocolError(ErrorCode.PROTOCOL_MAGIC, `NBD request: magic 0x${magic.toString(16)} is not NBD_REQUEST_MAGIC`);
    }
    const request: DecodedRequest = {
      flags: h.readUInt16BE(4),
      command: h.readUInt16BE(6),
      cookie: h.readBigUInt64BE(8),
      offsetBytes: readOffset(h, 16),
      lengthBytes: h.readUInt32BE(24),
    };
    if (request.command === NbdCommand.write && request.lengthBytes > this.maxPayloadBytes) {
      // Its payload cannot be skipped without reading it: the spec lets a server hang up on a
      // payload it deems a denial of service, and ours is the spec's interoperable 2^25.
      throw new ProtocolError(
        ErrorCode.FRAME_TOO_LARGE,
        `NBD WRITE of ${request.lengthBytes} bytes is over the maximum payload of ${this.maxPayloadBytes}`,
      );
    }
    if (request.command === NbdCommand.write && request.lengthBytes === 0) request.payload = Buffer.alloc(0);
    return request;
  }
}
