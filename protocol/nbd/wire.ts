// Byte-level helpers shared by the NBD codecs: a queue of received chunks for the handshake
// (whose messages are small and bounded), a bounds-checked reader for payloads, and string
// rules (UTF-8, no NUL, at most 4096 bytes).
import { ErrorCode, ProtocolError } from '../errors.js';
import { NBD_MAX_STRING_BYTES } from './limits.js';

export function asBuffer(input: Uint8Array): Buffer {
  return Buffer.isBuffer(input) ? input : Buffer.from(input.buffer, input.byteOffset, input.byteLength);
}

/**
 * Bytes received and not parsed yet. take(n) hands out the first n bytes once they are all
 * there: a view when they lie in one chunk, a copy of at most n bytes when they straddle
 * chunks. The caller bounds n (a limit is checked before a length from the peer is taken).
 */
export class ByteQueue {
  #chunks: Buffer[] = [];
  #length = 0;

  get length(): number {
    return this.#length;
  }

  push(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    this.#chunks.push(asBuffer(chunk));
    this.#length += chunk.length;
  }

  take(n: number): Buffer | undefined {
    if (n > this.#length) return undefined;
    if (n === 0) return Buffer.alloc(0);
    const first = this.#chunks[0]!;
    if (first.length >= n) {
      const out = first.subarray(0, n);
      if (first.length === n) this.#chunks.shift();
      else this.#chunks[0] = first.subarray(n);
      this.#length -= n;
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const chunk = this.#chunks[0]!;
      const m = Math.min(chunk.length, n - filled);
      chunk.copy(out, filled, 0, m);
      filled += m;
      if (m === chunk.length) this.#chunks.shift();
      else this.#chunks[0] = chunk.subarray(m);
    }
    this.#length -= n;
    return out;
  }

  /** Everything queued, removed (for handing over to the next phase's decoder). */
  drain(): Buffer[] {
    const chunks = this.#chunks;
    this.#chunks = [];
    this.#length = 0;
    return chunks;
  }
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** Decodes an NBD string: valid UTF-8, no NUL, at most 4096 bytes. Throws ProtocolError naming `what`. */
export function decodeString(bytes: Uint8Array, what: string): string {
  if (bytes.length > NBD_MAX_STRING_BYTES) {
    throw new ProtocolError(ErrorCode.FRAME_TOO_LARGE, `${what}: ${bytes.length} bytes is over the limit of ${NBD_MAX_STRING_BYTES}`);
  }
  let text: string;
  try {
    text = utf8.decode(bytes);
  } catch {
    throw new ProtocolError(ErrorCode.PROTOCOL, `${what}: not valid UTF-8`);
  }
  if (text.includes('\0')) throw new ProtocolError(ErrorCode.PROTOCOL, `${what}: contains NUL`);
  return text;
}

/** Encodes an NBD string, refusing (RangeError: a bug on this side) one the peer would reject. */
export function encodeString(text: string, what: string): Buffer {
  const bytes = Buffer.from(text, 'utf8');
  if (bytes.length > NBD_MAX_STRING_BYTES) throw new RangeError(`${what}: ${bytes.length} bytes is over NBD's limit of ${NBD_MAX_STRING_BYTES}`);
  if (text.includes('\0')) throw new RangeError(`${what}: NBD strings cannot contain NUL`);
  return bytes;
}

/** A u64 offset as a number; values above 2^53 read as 2^53, beyond any export we can serve. */
export function readOffset(buf: Buffer, at: number): number {
  const value = buf.readBigUInt64BE(at);
  return value > BigInt(Number.MAX_SAFE_INTEGER) ? 2 ** 53 : Number(value);
}

export function writeOffset(buf: Buffer, value: number, at: number): void {
  buf.writeBigUInt64BE(BigInt(value), at);
}

/**
 * Reads fields of a payload in order; any read past its end throws a ProtocolError naming
 * `what` (a server answers such an option NBD_REP_ERR_INVALID, a client hangs up).
 */
export class PayloadReader {
  #at = 0;

  constructor(
    readonly buf: Buffer,
    readonly what: string,
  ) {}

  get remaining(): number {
    return this.buf.length - this.#at;
  }

  #need(n: number, field: string): void {
    if (n > this.remaining) {
      throw new ProtocolError(ErrorCode.PROTOCOL, `${this.what}: ${field} needs ${n} bytes, ${this.remaining} left`);
    }
  }

  u16(field: string): number {
    this.#need(2, field);
    const v = this.buf.readUInt16BE(this.#at);
    this.#at += 2;
    return v;
  }

  u32(field: string): number {
    this.#need(4, field);
    const v = this.buf.readUInt32BE(this.#at);
    this.#at += 4;
    return v;
  }

  /** A u64 that must be a safe integer (sizes): larger ones are a ProtocolError. */
  u64(field: string): number {
    this.#need(8, field);
    const v = this.buf.readBigUInt64BE(this.#at);
    this.#at += 8;
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new ProtocolError(ErrorCode.PROTOCOL, `${this.what}: ${field} ${v} is beyond 2^53, which this implementation cannot address`);
    }
    return Number(v);
  }

  bytes(n: number, field: string): Buffer {
    this.#need(n, field);
    const out = this.buf.subarray(this.#at, this.#at + n);
    this.#at += n;
    return out;
  }

  /** A string whose u32 length comes first. The length is checked against the limit before it is read. */
  string32(field: string): string {
    const length = this.u32(`${field} length`);
    if (length > NBD_MAX_STRING_BYTES) {
      throw new ProtocolError(ErrorCode.FRAME_TOO_LARGE, `${this.what}: ${field} of ${length} bytes is over the limit of ${NBD_MAX_STRING_BYTES}`);
    }
    return decodeString(this.bytes(length, field), `${this.what}: ${field}`);
  }

  /** The rest of the payload as a string. */
  rest(field: string): string {
    return decodeString(this.bytes(this.remaining, field), `${this.what}: ${field}`);
  }

  end(): void {
    if (this.remaining !== 0) throw new ProtocolError(ErrorCode.PROTOCOL, `${this.what}: ${this.remaining} bytes after the end`);
  }
}
