// The byte layout of a frame, and the encoder and incremental decoder for it.
//
//   [u32 BE headerLength][u32 BE payloadLength][header: msgpack map][payload]
//
// The header is a plain msgpack map: key 't' holds the FrameType, the other keys are the
// frame's fields except its payload (frame-schema.ts). Binary fields are msgpack bin.
// No msgpackr records or extensions, so a peer in any language decodes it with plain msgpack.
//
// The encoder returns [prefix + header, payload] so a large payload is never copied
// (ws lib/sender.js Sender.frame). The decoder takes chunks of any size and yields whole
// frames (js-libp2p-yamux src/decode.ts); it checks both lengths against its limits before
// it buffers or allocates anything, and a frame's header before its payload is buffered.
import { Packr, RESERVE_START_SPACE, Unpackr } from 'msgpackr';
import { ErrorCode, GangwayError, ProtocolError } from './errors.js';
import { frameToWire, readFrameHeader, withPayload } from './frame-schema.js';
import type { Frame } from './frames.js';
import { DEFAULT_MAX_PAYLOAD_BYTES, FRAME_PREFIX_BYTES, MAX_HEADER_BYTES, MAX_HEADER_DEPTH } from './limits.js';
import { checkPlainMsgpack } from './msgpack-scan.js';

export { validatePages, type PagesSummary } from './pages.js';

// useRecords: false keeps msgpackr from writing its record extension; structuredClone off
// keeps it from writing reference extensions. Uint8Array packs as bin.
const packr = new Packr({ useRecords: false, structuredClone: false });
// int64AsType 'number': a u64 beyond 2^53 becomes an unsafe integer the field checks reject,
// never a BigInt. Extension types never reach msgpackr (checkPlainMsgpack).
const unpackr = new Unpackr({ useRecords: false, mapsAsObjects: true, structuredClone: false, int64AsType: 'number' });

export interface EncodeLimits {
  /** The peer's announced maxPayloadBytes (its hello); defaults to DEFAULT_MAX_PAYLOAD_BYTES. */
  maxPayloadBytes?: number;
}

/**
 * Encodes a frame as [8-byte prefix + header, payload]. The payload is the frame's own
 * array, never copied, and is omitted when empty. Refuses (GangwayError
 * GANGWAY_ERR_INTERNAL) a frame the peer's decoder would reject: that is a bug on this
 * side, and sending it would only get the whole session closed.
 */
export function encodeFrame(frame: Frame, limits?: EncodeLimits): [Buffer, Uint8Array?] {
  const maxPayloadBytes = limits?.maxPayloadBytes ?? DEFAULT_MAX_PAYLOAD_BYTES;
  const name = String(frame.type);
  const { header, payload } = frameToWire(frame);
  try {
    if (!(payload instanceof Uint8Array)) {
      throw new ProtocolError(ErrorCode.PROTOCOL, `${name}: payload is not a Uint8Array`);
    }
    if (payload.length > maxPayloadBytes) {
      throw new ProtocolError(
        ErrorCode.FRAME_TOO_LARGE,
        `${name}: payload of ${payload.length} bytes is over the peer's limit of ${maxPayloadBytes}`,
      );
    }
    readFrameHeader(header, { payloadLength: payload.length, maxPayloadBytes });
  } catch (error) {
    throw new GangwayError(
      ErrorCode.INTERNAL,
      `refusing to send an invalid ${name} frame: ${(error as Error).message}`,
      { cause: error },
    );
  }
  // The prefix goes into space msgpackr reserves in front of the header: one buffer, no copy.
  const head = packr.pack(header, RESERVE_START_SPACE | FRAME_PREFIX_BYTES);
  const headerLength = head.length - FRAME_PREFIX_BYTES;
  if (headerLength > MAX_HEADER_BYTES) {
    throw new GangwayError(
      ErrorCode.INTERNAL,
      `refusing to send a ${name} frame with a ${headerLength}-byte header (limit ${MAX_HEADER_BYTES})`,
    );
  }
  head.writeUInt32BE(headerLength, 0);
  head.writeUInt32BE(payload.length, 4);
  return payload.length > 0 ? [head, payload] : [head];
}

export interface DecoderLimits {
  /** The largest payload accepted (what this agent announced in its hello). */
  maxPayloadBytes?: number;
}

type Stage = 'prefix' | 'header' | 'payload';

/**
 * Turns a byte stream into frames. push() accepts chunks split anywhere, several frames per
 * chunk, and returns the frames completed by that chunk. A payload that arrives whole
 * within one chunk is returned as a view of that chunk (zero-copy): the caller must not
 * reuse a chunk's memory after pushing it. At most one frame's bytes are buffered.
 *
 * Any violation throws a ProtocolError; the decoder is then poisoned and every later
 * push() throws the same error (the session is over).
 */
export class FrameDecoder {
  readonly maxPayloadBytes: number;
  #stage: Stage = 'prefix';
  readonly #prefix = new Uint8Array(FRAME_PREFIX_BYTES);
  readonly #prefixView = new DataView(this.#prefix.buffer);
  #prefixFill = 0;
  #headerLength = 0;
  #payloadLength = 0;
  /** The header or payload being assembled from several chunks. */
  #part: Buffer | undefined;
  #partFill = 0;
  /** A frame whose header is read, waiting for its payload. */
  #pending: Frame | undefined;
  #failure: ProtocolError | undefined;

  constructor(limits?: DecoderLimits) {
    const maxPayloadBytes = limits?.maxPayloadBytes ?? DEFAULT_MAX_PAYLOAD_BYTES;
    if (!Number.isSafeInteger(maxPayloadBytes) || maxPayloadBytes < 0 || maxPayloadBytes > DEFAULT_MAX_PAYLOAD_BYTES) {
      throw new RangeError(`maxPayloadBytes must be an integer in 0..${DEFAULT_MAX_PAYLOAD_BYTES}, got ${maxPayloadBytes}`);
    }
    this.maxPayloadBytes = maxPayloadBytes;
  }

  /** Bytes of the frame in progress received so far (0 between frames). */
  get bufferedBytes(): number {
    switch (this.#stage) {
      case 'prefix':
        return this.#prefixFill;
      case 'header':
        return FRAME_PREFIX_BYTES + this.#partFill;
      case 'payload':
        return FRAME_PREFIX_BYTES + this.#headerLength + this.#partFill;
    }
  }

  push(chunk: Uint8Array): Frame[] {
    if (this.#failure !== undefined) throw this.#failure;
    try {
      return this.#consume(chunk);
    } catch (error) {
      this.#failure =
        error instanceof ProtocolError
          ? error
          : new ProtocolError(ErrorCode.PROTOCOL, `frame decoder failed: ${(error as Error)?.message}`, { cause: error });
      // Drop what was buffered: a poisoned decoder holds no memory.
      this.#part = undefined;
      this.#pending = undefined;
      this.#stage = 'prefix';
      this.#prefixFill = 0;
      this.#partFill = 0;
      throw this.#failure;
    }
  }

  #consume(input: Uint8Array): Frame[] {
    // msgpackr and the payload views want a Buffer; this is a view, not a copy.
    const chunk = Buffer.isBuffer(input) ? input : Buffer.from(input.buffer, input.byteOffset, input.byteLength);
    const frames: Frame[] = [];
    let offset = 0;
    while (offset < chunk.length) {
      if (this.#stage === 'prefix') {
        const n = Math.min(FRAME_PREFIX_BYTES - this.#prefixFill, chunk.length - offset);
        this.#prefix.set(chunk.subarray(offset, offset + n), this.#prefixFill);
        this.#prefixFill += n;
        offset += n;
        if (this.#prefixFill === FRAME_PREFIX_BYTES) this.#readPrefix();
        continue;
      }
      const length = this.#stage === 'header' ? this.#headerLength : this.#payloadLength;
      let bytes: Buffer | undefined;
      if (this.#partFill === 0 && chunk.length - offset >= length) {
        bytes = chunk.subarray(offset, offset + length);
        offset += length;
      } else {
        this.#part ??= Buffer.allocUnsafe(length);
        const n = Math.min(length - this.#partFill, chunk.length - offset);
        chunk.copy(this.#part, this.#partFill, offset, offset + n);
        this.#partFill += n;
        offset += n;
        if (this.#partFill < length) continue;
        bytes = this.#part;
        this.#part = undefined;
        this.#partFill = 0;
      }
      if (this.#stage === 'header') {
        const frame = this.#readHeader(bytes);
        if (this.#payloadLength === 0) {
          frames.push(frame);
          this.#stage = 'prefix';
        } else {
          this.#pending = frame;
          this.#stage = 'payload';
        }
      } else {
        const frame = this.#pending;
        this.#pending = undefined;
        this.#stage = 'prefix';
        if (frame !== undefined) frames.push(withPayload(frame, bytes));
      }
    }
    return frames;
  }

  #readPrefix(): void {
    const headerLength = this.#prefixView.getUint32(0);
    const payloadLength = this.#prefixView.getUint32(4);
    if (headerLength === 0) throw new ProtocolError(ErrorCode.PROTOCOL, 'frame prefix: header length 0');
    if (headerLength > MAX_HEADER_BYTES) {
      throw new ProtocolError(
        ErrorCode.FRAME_TOO_LARGE,
        `frame prefix: header of ${headerLength} bytes is over the limit of ${MAX_HEADER_BYTES}`,
      );
    }
    if (payloadLength > this.maxPayloadBytes) {
      throw new ProtocolError(
        ErrorCode.FRAME_TOO_LARGE,
        `frame prefix: payload of ${payloadLength} bytes is over the limit of ${this.maxPayloadBytes}`,
      );
    }
    this.#headerLength = headerLength;
    this.#payloadLength = payloadLength;
    this.#prefixFill = 0;
    this.#stage = 'header';
  }

  #readHeader(bytes: Buffer): Frame {
    const problem = checkPlainMsgpack(bytes, MAX_HEADER_DEPTH);
    if (problem !== undefined) throw new ProtocolError(ErrorCode.PROTOCOL, `frame header: malformed msgpack: ${problem}`);
    let header: unknown;
    try {
      header = unpackr.unpack(bytes);
    } catch (error) {
      throw new ProtocolError(ErrorCode.PROTOCOL, `frame header: malformed msgpack: ${(error as Error)?.message}`, {
        cause: error,
      });
    }
    return readFrameHeader(header, { payloadLength: this.#payloadLength, maxPayloadBytes: this.maxPayloadBytes });
  }
}
