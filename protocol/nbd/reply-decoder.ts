// The client's decoder of the transmission phase: chunks in, replies out.
//
//   head (16 bytes simple / 20 structured) ─┬─ simple, READ ok ────────► data (request length) ─► head
//                                           ├─ OFFSET_DATA ─► offset (8) ─► data (length - 8) ─► head
//                                           ├─ HOLE, BLOCK_STATUS, errors ─► payload ────────────► head
//                                           └─ simple otherwise, NONE ─────────────────────────► head
//
// A simple reply to READ carries no length: only the request says how much data follows. So
// the client tells the decoder about every request before sending it (expect(cookie, ...)),
// and the decoder knows each cookie's command, range and, for READ, the caller's buffer.
// READ data is copied from the received chunks straight into that buffer (no intermediate
// copy); a hole's range is zeroed there. Replies then only say which range was filled.
//
// Every length is checked before anything is buffered: data against the request's range,
// BLOCK_STATUS against NBD_MAX_EXTENTS_PER_CHUNK, error chunks against
// NBD_MAX_ERROR_CHUNK_BYTES. A reply for a cookie not in flight, a chunk type that does not
// answer the command, a structured reply that was not negotiated, or a chunk outside the
// request's range throws a ProtocolError (the spec: the client hangs up), and poisons the
// decoder. An unknown chunk type with the error bit set is still read as an error (the spec).
import { ErrorCode, ProtocolError } from '../errors.js';
import {
  NBD_EXTENDED_REPLY_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  NbdCommand,
  ReplyFlag,
  ReplyType,
  describeNbd,
  isReplyTypeError,
} from './constants.js';
import { NBD_MAX_ERROR_CHUNK_BYTES, NBD_MAX_EXTENTS_PER_CHUNK, NBD_MAX_PAYLOAD_BYTES } from './limits.js';
import { CHUNK_HEADER_BYTES, SIMPLE_REPLY_BYTES } from './transmission.js';
import { asBuffer, readOffset } from './wire.js';

export interface ExpectedReply {
  command: number;
  offsetBytes: number;
  lengthBytes: number;
  /** READ only, and required there: where the data goes (exactly lengthBytes long). */
  target?: Uint8Array;
}

export type ChunkBody =
  | { type: 'none' }
  /** Data of [offsetBytes, +lengthBytes) is now in the READ's target. */
  | { type: 'data'; offsetBytes: number; lengthBytes: number }
  /** [offsetBytes, +lengthBytes) reads as zeroes and is zeroed in the READ's target. */
  | { type: 'hole'; offsetBytes: number; lengthBytes: number }
  /** Extents as pairs [length, flags, length, flags, ...] starting at the request's offset. */
  | { type: 'blockStatus'; contextId: number; extents: Uint32Array }
  | { type: 'error'; replyType: number; errno: number; message: string; offsetBytes?: number };

export type ReplyFrame =
  /** For a successful READ, the data is in its target. */
  | { kind: 'simple'; cookie: bigint; error: number }
  | { kind: 'chunk'; cookie: bigint; done: boolean; body: ChunkBody };

export interface ReplyDecoderOptions {
  structuredReplies: boolean;
  /** The largest READ the client may ask for (what the server advertised). */
  maxPayloadBytes?: number;
}

type Stage = 'head' | 'collect' | 'stream';

/** Where error chunks with offsets may appear (the spec's list for NBD_REPLY_TYPE_ERROR_OFFSET). */
const ERROR_OFFSET_COMMANDS: readonly number[] = [
  NbdCommand.read,
  NbdCommand.write,
  NbdCommand.trim,
  NbdCommand.cache,
  NbdCommand.writeZeroes,
  NbdCommand.blockStatus,
];

export class ReplyDecoder {
  readonly structuredReplies: boolean;
  readonly maxPayloadBytes: number;
  readonly #expected = new Map<bigint, ExpectedReply>();
  readonly #head = Buffer.alloc(CHUNK_HEADER_BYTES);
  #headFill = 0;
  #stage: Stage = 'head';
  /** The reply being read. */
  #cookie = 0n;
  #exp: ExpectedReply | undefined;
  #flags = 0;
  #type = 0;
  #length = 0;
  /** collect: bytes wanted, the part assembled, and what to do with them. */
  #need = 0;
  #part: Buffer | undefined;
  #partFill = 0;
  #then: (bytes: Buffer) => ReplyFrame | undefined = () => undefined;
  /** stream: where in the target, how much is left, and the frame once done. */
  #streamAt = 0;
  #streamLeft = 0;
  #streamDone: () => ReplyFrame = () => ({ kind: 'simple', cookie: 0n, error: 0 });
  #failure: ProtocolError | undefined;

  constructor(options: ReplyDecoderOptions) {
    this.structuredReplies = options.structuredReplies;
    this.maxPayloadBytes = options.maxPayloadBytes ?? NBD_MAX_PAYLOAD_BYTES;
  }

  /** Requests whose final reply has not come yet. */
  get outstanding(): number {
    return this.#expected.size;
  }

  /** Registers a request before it is sent. Throws RangeError (a bug here) on a reused cookie or a READ without a fitting target. */
  expect(cookie: bigint, expected: ExpectedReply): void {
    if (this.#failure !== undefined) throw this.#failure;
    if (this.#expected.has(cookie)) throw new RangeError(`NBD cookie ${cookie} is already in flight`);
    if (expected.command === NbdCommand.read) {
      if (expected.target?.length !== expected.lengthBytes) throw new RangeError('NBD READ: the target must be exactly the request length');
      if (!this.structuredReplies && expected.lengthBytes > this.maxPayloadBytes) {
        throw new RangeError(`NBD READ of ${expected.lengthBytes} bytes is over the server's maximum payload of ${this.maxPayloadBytes}`);
      }
    }
    this.#expected.set(cookie, expected);
  }

  push(chunk: Uint8Array): ReplyFrame[] {
    if (this.#failure !== undefined) throw this.#failure;
    try {
      return this.#consume(asBuffer(chunk));
    } catch (error) {
      this.#failure =
        error instanceof ProtocolError
          ? error
          : new ProtocolError(ErrorCode.PROTOCOL, `NBD reply decoder failed: ${(error as Error)?.message}`, { cause: error });
      this.#part = undefined;
      this.#exp = undefined;
      this.#expected.clear();
      throw this.#failure;
    }
  }

  #consume(chunk: Buffer): ReplyFrame[] {
    const out: ReplyFrame[] = [];
    let at = 0;
    while (at < chunk.length) {
      if (this.#stage === 'head') {
        const need = this.#headFill < 4 ? 4 : this.#headBytes();
        const n = Math.min(need - this.#headFill, chunk.length - at);
        chunk.copy(this.#head, this.#headFill, at, at + n);
        this.#headFill += n;
        at += n;
        if (this.#headFill === 4) this.#checkMagic();
        if (this.#headFill === this.#headBytes()) {
          this.#headFill = 0;
          const frame = this.#readHead();
          if (frame !== undefined) this.#emit(frame, out);
        }
      } else if (this.#stage === 'collect') {
        let bytes: Buffer | undefined;
        if (this.#partFill === 0 && chunk.length - at >= this.#need) {
          bytes = chunk.subarray(at, at + this.#need);
          at += this.#need;
        } else {
          this.#part ??= Buffer.allocUnsafe(this.#need);
          const n = Math.min(this.#need - this.#partFill, chunk.length - at);
          chunk.copy(this.#part, this.#partFill, at, at + n);
          this.#partFill += n;
          at += n;
          if (this.#partFill < this.#need) continue;
          bytes = this.#part;
          this.#part = undefined;
          this.#partFill = 0;
        }
        this.#stage = 'head';
        const frame = this.#then(bytes);
        if (frame !== undefined) this.#emit(frame, out);
      } else {
        const target = this.#exp!.target!;
        const n = Math.min(this.#streamLeft, chunk.length - at);
        target.set(chunk.subarray(at, at + n), this.#streamAt);
        this.#streamAt += n;
        this.#streamLeft -= n;
        at += n;
        if (this.#streamLeft === 0) {
          this.#stage = 'head';
          this.#emit(this.#streamDone(), out);
        }
      }
    }
    // A reply that needs no bytes after its head (NONE, a zero-length stream) is already out.
    return out;
  }

  #emit(frame: ReplyFrame, out: ReplyFrame[]): void {
    if (frame.kind === 'simple' || frame.done) this.#expected.delete(frame.cookie);
    out.push(frame);
  }

  #magic(): number {
    return this.#head.readUInt32BE(0);
  }

  #headBytes(): number {
    return this.#magic() === NBD_STRUCTURED_REPLY_MAGIC ? CHUNK_HEADER_BYTES : SIMPLE_REPLY_BYTES;
  }

  #checkMagic(): void {
    const magic = this.#magic();
    if (magic === NBD_SIMPLE_REPLY_MAGIC || magic === NBD_STRUCTURED_REPLY_MAGIC) return;
    if (magic === NBD_EXTENDED_REPLY_MAGIC) throw new ProtocolError(ErrorCode.PROTOCOL_VERSION, 'NBD reply: extended header, which was not negotiated');
    throw new ProtocolError(ErrorCode.PROTOCOL_MAGIC, `NBD reply: magic 0x${magic.toString(16)} is neither a simple nor a structured reply`);
  }

  #lookup(cookie: bigint): ExpectedReply {
    const exp = this.#expected.get(cookie);
    if (exp === undefined) throw new ProtocolError(ErrorCode.UNEXPECTED_FRAME, `NBD reply for cookie ${cookie}, which is not in flight`);
    this.#cookie = cookie;
    this.#exp = exp;
    return exp;
  }

  #readHead(): ReplyFrame | undefined {
    const h = this.#head;
    if (this.#magic() === NBD_SIMPLE_REPLY_MAGIC) {
      const error = h.readUInt32BE(4);
      const cookie = h.readBigUInt64BE(8);
      const exp = this.#lookup(cookie);
      if (error === 0 && exp.command === NbdCommand.blockStatus) {
        throw new ProtocolError(ErrorCode.PROTOCOL, 'NBD reply: a simple reply to BLOCK_STATUS (it must be structured)');
      }
      if (error === 0 && exp.command === NbdCommand.read) {
        // With structured replies a simple reply to READ is forbidden, and its data could
        // not be told from the next reply; without them, the request's length follows.
        if (this.structuredReplies) throw new ProtocolError(ErrorCode.PROTOCOL, 'NBD reply: a simple reply to READ after structured replies were negotiated');
        return this.#stream(0, exp.lengthBytes, () => ({ kind: 'simple', cookie, error: 0 }));
      }
      return { kind: 'simple', cookie, error };
    }
    if (!this.structuredReplies) throw new ProtocolError(ErrorCode.PROTOCOL, 'NBD reply: a structured reply that was not negotiated');
    this.#flags = h.readUInt16BE(4);
    this.#type = h.readUInt16BE(6);
    const cookie = h.readBigUInt64BE(8);
    this.#length = h.readUInt32BE(16);
    const exp = this.#lookup(cookie);
    const done = (this.#flags & ReplyFlag.done) !== 0;
    const chunk = (body: ChunkBody): ReplyFrame => ({ kind: 'chunk', cookie, done, body });
    const length = this.#length;
    const bad = (why: string) => new ProtocolError(ErrorCode.PROTOCOL, `NBD ${describeNbd(ReplyType, this.#type)} chunk: ${why}`);
    const onlyFor = (command: number) => {
      if (exp.command !== command) throw bad(`not an answer to ${describeNbd(NbdCommand, exp.command)}`);
    };

    switch (this.#type) {
      case ReplyType.none:
        if (length !== 0) throw bad(`length ${length}, must be 0`);
        if (!done) throw bad('without the DONE flag');
        return chunk({ type: 'none' });
      case ReplyType.offsetData:
        onlyFor(NbdCommand.read);
        if (length < 9 || length - 8 > exp.lengthBytes) throw bad(`length ${length} does not fit a READ of ${exp.lengthBytes} bytes`);
        return this.#collect(8, (b) => {
          const offset = readOffset(b, 0);
          const dataBytes = length - 8;
          this.#checkRange(offset, dataBytes, bad);
          return this.#stream(offset - exp.offsetBytes, dataBytes, () => chunk({ type: 'data', offsetBytes: offset, lengthBytes: dataBytes }));
        });
      case ReplyType.offsetHole:
        onlyFor(NbdCommand.read);
        if (length !== 12) throw bad(`length ${length}, must be 12`);
        return this.#collect(12, (b) => {
          const offset = readOffset(b, 0);
          const size = b.readUInt32BE(8);
          if (size === 0) throw bad('a hole of size 0');
          this.#checkRange(offset, size, bad);
          exp.target!.fill(0, offset - exp.offsetBytes, offset - exp.offsetBytes + size);
          return chunk({ type: 'hole', offsetBytes: offset, lengthBytes: size });
        });
      case ReplyType.blockStatus: {
        onlyFor(NbdCommand.blockStatus);
        const count = (length - 4) / 8;
        if (length < 12 || !Number.isInteger(count)) throw bad(`length ${length} is not 4 + a positive multiple of 8`);
        if (count > NBD_MAX_EXTENTS_PER_CHUNK) throw new ProtocolError(ErrorCode.FRAME_TOO_LARGE, `NBD block status: ${count} extents is over the limit of ${NBD_MAX_EXTENTS_PER_CHUNK}`);
        return this.#collect(length, (b) => {
          const contextId = b.readUInt32BE(0);
          const extents = new Uint32Array(2 * count);
          for (let i = 0; i < 2 * count; i += 2) {
            extents[i] = b.readUInt32BE(4 + 4 * i);
            extents[i + 1] = b.readUInt32BE(8 + 4 * i);
            if (extents[i] === 0) throw bad(`extent ${i / 2} has length 0`);
          }
          return chunk({ type: 'blockStatus', contextId, extents });
        });
      }
      default: {
        if (!isReplyTypeError(this.#type)) {
          throw new ProtocolError(ErrorCode.UNKNOWN_FRAME, `NBD reply: unknown chunk type ${this.#type}`);
        }
        const withOffset = this.#type === ReplyType.errorOffset;
        if (withOffset && !ERROR_OFFSET_COMMANDS.includes(exp.command)) throw bad(`not an answer to ${describeNbd(NbdCommand, exp.command)}`);
        const fixed = withOffset ? 14 : 6;
        if (length < fixed) throw bad(`length ${length}, must be at least ${fixed}`);
        if (length > NBD_MAX_ERROR_CHUNK_BYTES) throw new ProtocolError(ErrorCode.FRAME_TOO_LARGE, `NBD error chunk of ${length} bytes is over the limit of ${NBD_MAX_ERROR_CHUNK_BYTES}`);
        const replyType = this.#type;
        return this.#collect(length, (b) => {
          const errno = b.readUInt32BE(0);
          const messageBytes = b.readUInt16BE(4);
          if (errno === 0) throw bad('error 0');
          if (messageBytes > length - fixed) throw bad(`a message of ${messageBytes} bytes in ${length - fixed}`);
          // For people only: decoded leniently.
          const message = b.toString('utf8', 6, 6 + messageBytes);
          if (!withOffset) return chunk({ type: 'error', replyType, errno, message });
          const offset = readOffset(b, 6 + messageBytes);
          this.#checkRange(offset, 1, bad);
          return chunk({ type: 'error', replyType, errno, message, offsetBytes: offset });
        });
      }
    }
  }

  /** [offset, +length) must lie within the request's range. */
  #checkRange(offset: number, length: number, bad: (why: string) => ProtocolError): void {
    const exp = this.#exp!;
    if (offset < exp.offsetBytes || offset + length > exp.offsetBytes + exp.lengthBytes) {
      throw bad(`[${offset}, +${length}) is outside the request's [${exp.offsetBytes}, +${exp.lengthBytes})`);
    }
  }

  #collect(length: number, then: (bytes: Buffer) => ReplyFrame | undefined): undefined {
    this.#stage = 'collect';
    this.#need = length;
    this.#then = then;
    return undefined;
  }

  /** Streams `length` bytes into the READ's target at `at`; `done` makes the frame. */
  #stream(at: number, length: number, done: () => ReplyFrame): ReplyFrame | undefined {
    if (length === 0) return done();
    this.#stage = 'stream';
    this.#streamAt = at;
    this.#streamLeft = length;
    this.#streamDone = done;
    return undefined;
  }
}
