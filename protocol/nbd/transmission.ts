// The transmission phase's messages and their encoders.
//
//   C: u32 REQUEST_MAGIC u16 flags u16 type u64 cookie u64 offset u32 length [WRITE data]   (28 + data)
//   S: u32 SIMPLE_REPLY_MAGIC u32 error u64 cookie [READ data]                            (16 + data)
//   S: u32 STRUCTURED_REPLY_MAGIC u16 flags u16 type u64 cookie u32 length [payload]      (20 + payload)
//
// Encoders return [header, payload] with the caller's payload as the second element, never
// copied (ws lib/sender.js Sender.frame): a 32 MiB WRITE or READ goes out as it is.
import {
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  NbdCommand,
  ReplyFlag,
  ReplyType,
} from './constants.js';
import { NBD_MAX_STRING_BYTES } from './limits.js';
import type { Encoded } from './options.js';

export const REQUEST_HEADER_BYTES = 28;
export const SIMPLE_REPLY_BYTES = 16;
export const CHUNK_HEADER_BYTES = 20;

export interface NbdRequest {
  /** NbdCommand, or an unknown number from a peer (answered EINVAL). */
  command: number;
  flags: number;
  /** Opaque to the server; the client's way to match replies. */
  cookie: bigint;
  offsetBytes: number;
  lengthBytes: number;
}

/** A request; WRITE carries `payload` (exactly lengthBytes), nothing else does. */
export function encodeRequest(request: NbdRequest, payload?: Uint8Array): Encoded {
  if ((request.command === NbdCommand.write) !== (payload !== undefined)) {
    throw new RangeError('NBD request: a WRITE carries a payload and nothing else does');
  }
  if (payload !== undefined && payload.length !== request.lengthBytes) {
    throw new RangeError(`NBD WRITE: payload of ${payload.length} bytes for a length of ${request.lengthBytes}`);
  }
  const h = Buffer.allocUnsafe(REQUEST_HEADER_BYTES);
  h.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  h.writeUInt16BE(request.flags, 4);
  h.writeUInt16BE(request.command, 6);
  h.writeBigUInt64BE(request.cookie, 8);
  h.writeBigUInt64BE(BigInt(request.offsetBytes), 16);
  h.writeUInt32BE(request.lengthBytes, 24);
  return payload !== undefined && payload.length > 0 ? [h, payload] : [h];
}

/** A simple reply; `data` only for a successful READ (exactly the request's length). */
export function encodeSimpleReply(cookie: bigint, error: number, data?: Uint8Array): Encoded {
  const h = Buffer.allocUnsafe(SIMPLE_REPLY_BYTES);
  h.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  h.writeUInt32BE(error, 4);
  h.writeBigUInt64BE(cookie, 8);
  return data !== undefined && data.length > 0 ? [h, data] : [h];
}

function chunkHeader(cookie: bigint, type: number, done: boolean, payloadBytes: number, extra = 0): Buffer {
  const h = Buffer.allocUnsafe(CHUNK_HEADER_BYTES + extra);
  h.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  h.writeUInt16BE(done ? ReplyFlag.done : 0, 4);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(cookie, 8);
  h.writeUInt32BE(payloadBytes, 16);
  return h;
}

export interface ExtentOut {
  lengthBytes: number;
  flags: number;
}

function messageBytes(message: string): Buffer {
  // Error messages are for people: a long one is cut to the spec's string limit rather than refused.
  let bytes = Buffer.from(message.replaceAll('\0', ' '), 'utf8');
  if (bytes.length > NBD_MAX_STRING_BYTES) bytes = Buffer.from(bytes.subarray(0, NBD_MAX_STRING_BYTES).toString('utf8').replace(/\uFFFD+$/, ''), 'utf8');
  return bytes;
}

/** Structured reply chunks, by type. */
export const Chunk = {
  none(cookie: bigint): Buffer {
    return chunkHeader(cookie, ReplyType.none, true, 0);
  },

  /** [header + offset, data]: the data is the caller's, not copied. */
  offsetData(cookie: bigint, offsetBytes: number, data: Uint8Array, done: boolean): Encoded {
    if (data.length === 0) throw new RangeError('NBD_REPLY_TYPE_OFFSET_DATA needs at least one byte');
    const h = chunkHeader(cookie, ReplyType.offsetData, done, 8 + data.length, 8);
    h.writeBigUInt64BE(BigInt(offsetBytes), CHUNK_HEADER_BYTES);
    return [h, data];
  },

  offsetHole(cookie: bigint, offsetBytes: number, lengthBytes: number, done: boolean): Buffer {
    if (lengthBytes === 0) throw new RangeError('NBD_REPLY_TYPE_OFFSET_HOLE needs a nonzero size');
    const h = chunkHeader(cookie, ReplyType.offsetHole, done, 12, 12);
    h.writeBigUInt64BE(BigInt(offsetBytes), CHUNK_HEADER_BYTES);
    h.writeUInt32BE(lengthBytes, CHUNK_HEADER_BYTES + 8);
    return h;
  },

  blockStatus(cookie: bigint, contextId: number, extents: readonly ExtentOut[], done: boolean): Buffer {
    if (extents.length === 0) throw new RangeError('NBD_REPLY_TYPE_BLOCK_STATUS needs at least one extent');
    const h = chunkHeader(cookie, ReplyType.blockStatus, done, 4 + 8 * extents.length, 4 + 8 * extents.length);
    let at = h.writeUInt32BE(contextId, CHUNK_HEADER_BYTES);
    for (const e of extents) {
      if (e.lengthBytes === 0) throw new RangeError('NBD block status: an extent of length 0');
      at = h.writeUInt32BE(e.lengthBytes, at);
      at = h.writeUInt32BE(e.flags >>> 0, at);
    }
    return h;
  },

  error(cookie: bigint, errno: number, message: string, done = true): Buffer {
    if (errno === 0) throw new RangeError('NBD error chunk: error must be nonzero');
    const m = messageBytes(message);
    const h = chunkHeader(cookie, ReplyType.error, done, 6 + m.length, 6 + m.length);
    h.writeUInt32BE(errno, CHUNK_HEADER_BYTES);
    h.writeUInt16BE(m.length, CHUNK_HEADER_BYTES + 4);
    m.copy(h, CHUNK_HEADER_BYTES + 6);
    return h;
  },

  errorOffset(cookie: bigint, errno: number, message: string, offsetBytes: number, done: boolean): Buffer {
    if (errno === 0) throw new RangeError('NBD error chunk: error must be nonzero');
    const m = messageBytes(message);
    const h = chunkHeader(cookie, ReplyType.errorOffset, done, 14 + m.length, 14 + m.length);
    h.writeUInt32BE(errno, CHUNK_HEADER_BYTES);
    h.writeUInt16BE(m.length, CHUNK_HEADER_BYTES + 4);
    m.copy(h, CHUNK_HEADER_BYTES + 6);
    h.writeBigUInt64BE(BigInt(offsetBytes), CHUNK_HEADER_BYTES + 6 + m.length);
    return h;
  },
} as const;
