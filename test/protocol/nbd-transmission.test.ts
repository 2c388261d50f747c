// The transmission decoders on their own: what each accepts, what each rejects (with which
// code), that a rejection poisons the decoder and frees what it held, and that lengths are
// refused before anything is allocated for them.
import { afterEach, describe, expect, test, vi } from 'vitest';
import { ErrorCode, ProtocolError } from '../../protocol/errors.js';
import {
  CHUNK_HEADER_BYTES,
  Chunk,
  NBD_EXTENDED_REQUEST_MAGIC,
  NBD_MAX_ERROR_CHUNK_BYTES,
  NBD_MAX_EXTENTS_PER_CHUNK,
  NBD_MAX_PAYLOAD_BYTES,
  NBD_STRUCTURED_REPLY_MAGIC,
  NbdCommand,
  NbdErrno,
  type ExpectedReply,
  ReplyDecoder,
  RequestDecoder,
  ReplyType,
  encodeRequest,
  encodeSimpleReply,
} from '../../protocol/nbd/index.js';

const cat = (parts: Uint8Array[]) => Buffer.concat(parts);

afterEach(() => {
  vi.restoreAllMocks();
});

function rejected(push: () => unknown): ProtocolError {
  let error: unknown;
  try {
    push();
  } catch (e) {
    error = e;
  }
  expect(error).toBeInstanceOf(ProtocolError);
  return error as ProtocolError;
}

describe('RequestDecoder', () => {
  const read = cat(encodeRequest({ command: NbdCommand.read, flags: 0, cookie: 1n, offsetBytes: 512, lengthBytes: 4096 }));

  test('a WRITE payload that arrives in one chunk is a view of it', () => {
    const data = Buffer.alloc(100, 7);
    const bytes = cat(encodeRequest({ command: NbdCommand.write, flags: 0, cookie: 2n, offsetBytes: 0, lengthBytes: 100 }, data));
    const [request] = new RequestDecoder().push(bytes);
    expect(request!.payload!.buffer).toBe(bytes.buffer);
    expect(request!.payload!.equals(data)).toBe(true);
  });

  test('unknown commands come out for the server to answer EINVAL; offsets beyond 2^53 read as 2^53', () => {
    const h = Buffer.from(read);
    h.writeUInt16BE(42, 6);
    h.writeBigUInt64BE(2n ** 63n, 16);
    expect(new RequestDecoder().push(h)).toEqual([{ command: 42, flags: 0, cookie: 1n, offsetBytes: 2 ** 53, lengthBytes: 4096 }]);
  });

  test('a WRITE of length 0 has an empty payload', () => {
    const [r] = new RequestDecoder().push(cat(encodeRequest({ command: NbdCommand.write, flags: 0, cookie: 3n, offsetBytes: 0, lengthBytes: 0 }, Buffer.alloc(0))));
    expect(r!.payload!.length).toBe(0);
  });

  test('bad magic and extended headers; the decoder stays poisoned and holds nothing', () => {
    const d = new RequestDecoder();
    d.push(read.subarray(0, 3));
    const bad = Buffer.from(read);
    bad.writeUInt32BE(0x12560953, 0);
    const first = new RequestDecoder();
    const e = rejected(() => first.push(bad));
    expect([e.code, e.message]).toEqual([ErrorCode.PROTOCOL_MAGIC, 'NBD request: magic 0x12560953 is not NBD_REQUEST_MAGIC']);
    expect(first.bufferedBytes).toBe(0);
    expect(rejected(() => first.push(read))).toBe(e);
    const ext = Buffer.from(read);
    ext.writeUInt32BE(NBD_EXTENDED_REQUEST_MAGIC, 0);
    expect(rejected(() => new RequestDecoder().push(ext)).code).toBe(ErrorCode.PROTOCOL_VERSION);
  });

  test('a WRITE over the maximum payload is refused on its header, before any allocation', () => {
    const h = cat(encodeRequest({ command: NbdCommand.write, flags: 0, cookie: 1n, offsetBytes: 0, lengthBytes: 1 }, Buffer.alloc(1))).subarray(0, 28);
    h.writeUInt32BE(0xffffffff, 24);
    const allocUnsafe = vi.spyOn(Buffer, 'allocUnsafe');
    const e = rejected(() => new RequestDecoder().push(h));
    expect(e.code).toBe(ErrorCode.FRAME_TOO_LARGE);
    expect(e.message).toContain(`maximum payload of ${NBD_MAX_PAYLOAD_BYTES}`);
    expect(allocUnsafe).not.toHaveBeenCalled();
  });

  test('a WRITE at the maximum is taken, one byte more is not', () => {
    const d = new RequestDecoder({ maxPayloadBytes: 1000 });
    const ok = cat(encodeRequest({ command: NbdCommand.write, flags: 0, cookie: 1n, offsetBytes: 0, lengthBytes: 1000 }, Buffer.alloc(1000)));
    expect(d.push(ok.subarray(0, 500))).toEqual([]);
    expect(d.bufferedBytes).toBe(500);
    expect(d.push(ok.subarray(500))).toHaveLength(1);
    const over = cat(encodeRequest({ command: NbdCommand.write, flags: 0, cookie: 1n, offsetBytes: 0, lengthBytes: 1001 }, Buffer.alloc(1001)));
    expect(rejected(() => d.push(over)).code).toBe(ErrorCode.FRAME_TOO_LARGE);
  });

  test('a READ of any length is the server\'s to judge, not the decoder\'s', () => {
    const h = Buffer.from(read);
    h.writeUInt32BE(0xffffffff, 24);
    expect(new RequestDecoder().push(h)[0]!.lengthBytes).toBe(0xffffffff);
  });

  test('limits are checked', () => {
    expect(() => new RequestDecoder({ maxPayloadBytes: 0 })).toThrow(RangeError);
    expect(() => new RequestDecoder({ maxPayloadBytes: NBD_MAX_PAYLOAD_BYTES + 1 })).toThrow(RangeError);
  });
});

/** A structured chunk header with any fields, and a payload. */
function chunk(type: number, cookie: bigint, payload: Buffer, flags = 1, length = payload.length): Buffer {
  const h = Buffer.alloc(CHUNK_HEADER_BYTES);
  h.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(cookie, 8);
  h.writeUInt32BE(length, 16);
  return cat([h, payload]);
}

function u64(n: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(n));
  return b;
}

function decoderWith(structured: boolean, ...expected: [bigint, ExpectedReply][]): ReplyDecoder {
  const d = new ReplyDecoder({ structuredReplies: structured });
  for (const [cookie, e] of expected) d.expect(cookie, e);
  return d;
}

const readAt = (offsetBytes: number, lengthBytes: number): ExpectedReply => ({
  command: NbdCommand.read,
  offsetBytes,
  lengthBytes,
  target: Buffer.alloc(lengthBytes, 0xee),
});

function expectReplyRejected(d: ReplyDecoder, bytes: Buffer, code: ErrorCode, ...parts: string[]): void {
  const e = rejected(() => d.push(bytes));
  expect(e.code).toBe(code);
  for (const p of parts) expect(e.message).toContain(p);
  expect(d.outstanding).toBe(0);
  expect(rejected(() => d.push(Buffer.alloc(1)))).toBe(e);
}

describe('ReplyDecoder', () => {
  test('simple replies: READ data into the target, split anywhere', () => {
    const exp = readAt(0, 10);
    const bytes = cat(encodeSimpleReply(1n, 0, Buffer.from('0123456789')));
    for (let k = 0; k <= bytes.length; k++) {
      exp.target!.fill(0);
      const d = decoderWith(false, [1n, exp]);
      const frames = [...d.push(bytes.subarray(0, k)), ...d.push(bytes.subarray(k))];
      expect(frames).toEqual([{ kind: 'simple', cookie: 1n, error: 0 }]);
      expect(Buffer.from(exp.target!).toString()).toBe('0123456789');
      expect(d.outstanding).toBe(0);
    }
  });

  test('a simple error to READ has no data', () => {
    const d = decoderWith(false, [1n, readAt(0, 10)], [2n, { command: NbdCommand.flush, offsetBytes: 0, lengthBytes: 0 }]);
    expect(d.push(cat([...encodeSimpleReply(1n, NbdErrno.EIO), ...encodeSimpleReply(2n, 0)]))).toEqual([
      { kind: 'simple', cookie: 1n, error: 5 },
      { kind: 'simple', cookie: 2n, error: 0 },
    ]);
  });

  test('a reply for a cookie not in flight, and for one already answered', () => {
    expectReplyRejected(decoderWith(false), cat(encodeSimpleReply(7n, 0)), ErrorCode.UNEXPECTED_FRAME, 'cookie 7, which is not in flight');
    const d = decoderWith(false, [1n, { command: NbdCommand.flush, offsetBytes: 0, lengthBytes: 0 }]);
    d.push(cat(encodeSimpleReply(1n, 0)));
    expectReplyRejected(d, cat(encodeSimpleReply(1n, 0)), ErrorCode.UNEXPECTED_FRAME);
  });

  test('structured replies that were not negotiated, and simple READ data after they were', () => {
    expectReplyRejected(decoderWith(false, [1n, readAt(0, 1)]), Chunk.none(1n), ErrorCode.PROTOCOL, 'not negotiated');
    expectReplyRejected(decoderWith(true, [1n, readAt(0, 1)]), cat(encodeSimpleReply(1n, 0)), ErrorCode.PROTOCOL, 'simple reply to READ after structured');
    expectReplyRejected(
      decoderWith(true, [1n, { command: NbdCommand.blockStatus, offsetBytes: 0, lengthBytes: 1 }]),
      cat(encodeSimpleReply(1n, 0)),
      ErrorCode.PROTOCOL,
      'simple reply to BLOCK_STATUS',
    );
  });

  test('bad magic', () => {
    expectReplyRejected(decoderWith(true), Buffer.from([0x12, 0x34, 0x56, 0x78]), ErrorCode.PROTOCOL_MAGIC, 'magic 0x12345678');
  });

  test('OFFSET_DATA: length and range are checked; data goes to its place', () => {
    const exp = readAt(4096, 100);
    const d = decoderWith(true, [1n, exp]);
    const frames = d.push(chunk(ReplyType.offsetData, 1n, cat([u64(4146), Buffer.alloc(50, 1)]), 0));
    expect(frames).toEqual([{ kind: 'chunk', cookie: 1n, done: false, body: { type: 'data', offsetBytes: 4146, lengthBytes: 50 } }]);
    expect(exp.target!.subarray(50).every((b) => b === 1)).toBe(true);
    expect(exp.target!.subarray(0, 50).every((b) => b === 0xee)).toBe(true);
    expect(d.outstanding).toBe(1);

    expectReplyRejected(decoderWith(true, [1n, readAt(0, 100)]), chunk(ReplyType.offsetData, 1n, u64(0)), ErrorCode.PROTOCOL, 'length 8 does not fit');
    expectReplyRejected(decoderWith(true, [1n, readAt(0, 100)]), chunk(ReplyType.offsetData, 1n, Buffer.alloc(0), 1, 8 + 101), ErrorCode.PROTOCOL, 'length 109');
    expectReplyRejected(decoderWith(true, [1n, readAt(4096, 100)]), chunk(ReplyType.offsetData, 1n, cat([u64(4095), Buffer.alloc(10)])), ErrorCode.PROTOCOL, 'outside the request');
    expectReplyRejected(decoderWith(true, [1n, readAt(4096, 100)]), chunk(ReplyType.offsetData, 1n, cat([u64(4187), Buffer.alloc(10)])), ErrorCode.PROTOCOL, 'outside the request');
    expectReplyRejected(
      decoderWith(true, [1n, { command: NbdCommand.write, offsetBytes: 0, lengthBytes: 10 }]),
      chunk(ReplyType.offsetData, 1n, cat([u64(0), Buffer.alloc(1)])),
      ErrorCode.PROTOCOL,
      'not an answer to write',
    );
  });

  test('OFFSET_HOLE zeroes its range; its length is 12 and its size nonzero', () => {
    const exp = readAt(0, 64);
    const d = decoderWith(true, [1n, exp]);
    const hole = Buffer.alloc(12);
    hole.writeUInt32BE(32, 8);
    expect(d.push(chunk(ReplyType.offsetHole, 1n, hole))).toEqual([{ kind: 'chunk', cookie: 1n, done: true, body: { type: 'hole', offsetBytes: 0, lengthBytes: 32 } }]);
    expect([...exp.target!.subarray(0, 33)]).toEqual([...Array(32).fill(0), 0xee]);
    expectReplyRejected(decoderWith(true, [1n, readAt(0, 64)]), chunk(ReplyType.offsetHole, 1n, Buffer.alloc(16)), ErrorCode.PROTOCOL, 'length 16, must be 12');
    expectReplyRejected(decoderWith(true, [1n, readAt(0, 64)]), chunk(ReplyType.offsetHole, 1n, Buffer.alloc(12)), ErrorCode.PROTOCOL, 'size 0');
  });

  test('BLOCK_STATUS: shape, extent lengths, and the extent count before any allocation', () => {
    const bs = { command: NbdCommand.blockStatus, offsetBytes: 0, lengthBytes: 1 << 20 };
    expectReplyRejected(decoderWith(true, [1n, bs]), chunk(ReplyType.blockStatus, 1n, Buffer.alloc(13)), ErrorCode.PROTOCOL, 'not 4 + a positive multiple of 8');
    expectReplyRejected(decoderWith(true, [1n, bs]), chunk(ReplyType.blockStatus, 1n, Buffer.alloc(4)), ErrorCode.PROTOCOL);
    expectReplyRejected(decoderWith(true, [1n, bs]), chunk(ReplyType.blockStatus, 1n, Buffer.alloc(12)), ErrorCode.PROTOCOL, 'extent 0 has length 0');
    expectReplyRejected(decoderWith(true, [1n, readAt(0, 1)]), Chunk.blockStatus(1n, 1, [{ lengthBytes: 1, flags: 0 }], true), ErrorCode.PROTOCOL, 'not an answer to read');
    const d = decoderWith(true, [1n, bs]);
    const huge = chunk(ReplyType.blockStatus, 1n, Buffer.alloc(0), 1, 4 + 8 * (NBD_MAX_EXTENTS_PER_CHUNK + 1));
    const allocUnsafe = vi.spyOn(Buffer, 'allocUnsafe');
    expectReplyRejected(d, huge, ErrorCode.FRAME_TOO_LARGE, `${NBD_MAX_EXTENTS_PER_CHUNK + 1} extents`);
    expect(allocUnsafe).not.toHaveBeenCalled();
  });

  test('NONE: empty and final', () => {
    const flush = { command: NbdCommand.flush, offsetBytes: 0, lengthBytes: 0 };
    expectReplyRejected(decoderWith(true, [1n, flush]), chunk(ReplyType.none, 1n, Buffer.alloc(0), 0), ErrorCode.PROTOCOL, 'without the DONE flag');
    expectReplyRejected(decoderWith(true, [1n, flush]), chunk(ReplyType.none, 1n, Buffer.alloc(4)), ErrorCode.PROTOCOL, 'length 4, must be 0');
  });

  test('error chunks: errno, message and offset read; what does not fit rejected', () => {
    const d = decoderWith(true, [1n, readAt(100, 100)], [2n, { command: NbdCommand.flush, offsetBytes: 0, lengthBytes: 0 }]);
    expect(d.push(cat([Chunk.errorOffset(1n, NbdErrno.EIO, 'bad', 150, true), Chunk.error(2n, NbdErrno.ENOSPC, '')]))).toEqual([
      { kind: 'chunk', cookie: 1n, done: true, body: { type: 'error', replyType: ReplyType.errorOffset, errno: 5, message: 'bad', offsetBytes: 150 } },
      { kind: 'chunk', cookie: 2n, done: true, body: { type: 'error', replyType: ReplyType.error, errno: 28, message: '' } },
    ]);
    const flush = { command: NbdCommand.flush, offsetBytes: 0, lengthBytes: 0 };
    const err = (errno: number, messageBytes: number, extra: Buffer = Buffer.alloc(0)) => {
      const b = Buffer.alloc(6);
      b.writeUInt32BE(errno, 0);
      b.writeUInt16BE(messageBytes, 4);
      return cat([b, extra]);
    };
    expectReplyRejected(decoderWith(true, [1n, flush]), chunk(ReplyType.error, 1n, err(0, 0)), ErrorCode.PROTOCOL, 'error 0');
    expectReplyRejected(decoderWith(true, [1n, flush]), chunk(ReplyType.error, 1n, err(5, 10, Buffer.alloc(3))), ErrorCode.PROTOCOL, 'a message of 10 bytes in 3');
    expectReplyRejected(decoderWith(true, [1n, flush]), chunk(ReplyType.error, 1n, Buffer.alloc(4)), ErrorCode.PROTOCOL, 'at least 6');
    expectReplyRejected(decoderWith(true, [1n, flush]), chunk(ReplyType.errorOffset, 1n, err(5, 0, u64(0))), ErrorCode.PROTOCOL, 'not an answer to flush');
    expectReplyRejected(decoderWith(true, [1n, readAt(100, 100)]), chunk(ReplyType.errorOffset, 1n, err(5, 0, u64(200))), ErrorCode.PROTOCOL, 'outside');
    const tooLong = chunk(ReplyType.error, 1n, Buffer.alloc(0), 1, NBD_MAX_ERROR_CHUNK_BYTES + 1);
    const allocUnsafe = vi.spyOn(Buffer, 'allocUnsafe');
    expectReplyRejected(decoderWith(true, [1n, flush]), tooLong, ErrorCode.FRAME_TOO_LARGE);
    expect(allocUnsafe).not.toHaveBeenCalled();
  });

  test('unknown chunk types: an error if bit 15 is set, else the connection is over', () => {
    const flush = { command: NbdCommand.flush, offsetBytes: 0, lengthBytes: 0 };
    const e = Buffer.alloc(8);
    e.writeUInt32BE(NbdErrno.EIO, 0);
    const d = decoderWith(true, [1n, flush]);
    expect(d.push(chunk(0x8003, 1n, e))).toEqual([{ kind: 'chunk', cookie: 1n, done: true, body: { type: 'error', replyType: 0x8003, errno: 5, message: '' } }]);
    expectReplyRejected(decoderWith(true, [1n, flush]), chunk(3, 1n, Buffer.alloc(0)), ErrorCode.UNKNOWN_FRAME, 'unknown chunk type 3');
    expectReplyRejected(decoderWith(true, [1n, flush]), chunk(6, 1n, Buffer.alloc(0)), ErrorCode.UNKNOWN_FRAME);
  });

  test('expect() refuses what would make replies undecodable', () => {
    const d = decoderWith(false, [1n, readAt(0, 1)]);
    expect(() => d.expect(1n, readAt(0, 1))).toThrow(RangeError);
    expect(() => d.expect(2n, { command: NbdCommand.read, offsetBytes: 0, lengthBytes: 2, target: Buffer.alloc(1) })).toThrow(RangeError);
    expect(() => d.expect(3n, readAt(0, NBD_MAX_PAYLOAD_BYTES + 1))).toThrow(RangeError);
  });
});
