// NBD codec: the numbers are the spec's (doc/proto.md "Values"), every message encodes and
// parses back to itself, and the parsers reject what does not fit with a ProtocolError that
// names the field.
import { describe, expect, test } from 'vitest';
import { ErrorCode, ProtocolError } from '../../protocol/errors.js';
import {
  AllocationFlag,
  ByteQueue,
  ClientFlag,
  CommandFlag,
  DirtyFlag,
  HandshakeFlag,
  NBD_INIT_MAGIC,
  NBD_MAX_META_CONTEXT_QUERIES,
  NBD_MAX_OPTION_DATA_BYTES,
  NBD_MAX_STRING_BYTES,
  NBD_OPTS_MAGIC,
  NBD_REP_MAGIC,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  NbdCommand,
  NbdCommandError,
  NbdErrno,
  NbdInfo,
  NbdOption,
  NbdOptionError,
  NbdRep,
  ReplyFlag,
  ReplyType,
  TransmissionFlag,
  blockSizesProblem,
  describeNbd,
  encodeGreeting,
  encodeOption,
  encodeOptionReply,
  encodeRequest,
  encodeSimpleReply,
  errnoName,
  goData,
  infoBlockSizeData,
  infoExportData,
  infoStringData,
  listContexts,
  metaContextData,
  metaContextReplyData,
  parseGoData,
  parseInfoReply,
  parseMetaContextData,
  parseMetaContextReply,
  parseServerReply,
  selectContexts,
  serverReplyData,
  Chunk,
} from '../../protocol/nbd/index.js';

function expectProtocolError(f: () => unknown, code: ErrorCode, ...parts: string[]): void {
  let error: unknown;
  try {
    f();
  } catch (e) {
    error = e;
  }
  expect(error).toBeInstanceOf(ProtocolError);
  expect((error as ProtocolError).code).toBe(code);
  for (const part of parts) expect((error as Error).message).toContain(part);
}

describe('the numbers are the spec\'s', () => {
  test('magics', () => {
    expect(NBD_INIT_MAGIC).toBe(0x4e42444d41474943n);
    expect(Buffer.from(NBD_INIT_MAGIC.toString(16), 'hex').toString()).toBe('NBDMAGIC');
    expect(Buffer.from(NBD_OPTS_MAGIC.toString(16), 'hex').toString()).toBe('IHAVEOPT');
    expect(NBD_REP_MAGIC).toBe(0x3e889045565a9n);
    expect(NBD_REQUEST_MAGIC).toBe(0x25609513);
    expect(NBD_SIMPLE_REPLY_MAGIC).toBe(0x67446698);
    expect(NBD_STRUCTURED_REPLY_MAGIC).toBe(0x668e33ef);
  });

  test('handshake tables', () => {
    expect(HandshakeFlag).toEqual({ fixedNewstyle: 1, noZeroes: 2 });
    expect(ClientFlag).toEqual({ fixedNewstyle: 1, noZeroes: 2 });
    expect(NbdOption).toEqual({
      exportName: 1, abort: 2, list: 3, startTls: 5, info: 6, go: 7, structuredReply: 8, listMetaContext: 9, setMetaContext: 10, extendedHeaders: 11,
    });
    const err = 2 ** 31;
    expect(NbdRep).toEqual({
      ack: 1, server: 2, info: 3, metaContext: 4,
      errUnsup: err + 1, errPolicy: err + 2, errInvalid: err + 3, errPlatform: err + 4, errTlsReqd: err + 5,
      errUnknown: err + 6, errShutdown: err + 7, errBlockSizeReqd: err + 8, errTooBig: err + 9, errExtHeaderReqd: err + 10,
    });
    expect(NbdInfo).toEqual({ export: 0, name: 1, description: 2, blockSize: 3 });
  });

  test('transmission tables', () => {
    expect(TransmissionFlag).toEqual({
      hasFlags: 1, readOnly: 2, sendFlush: 4, sendFua: 8, rotational: 16, sendTrim: 32, sendWriteZeroes: 64, sendDf: 128,
      canMultiConn: 256, sendResize: 512, sendCache: 1024, sendFastZero: 2048, blockStatusPayload: 4096,
    });
    expect(NbdCommand).toEqual({ read: 0, write: 1, disc: 2, flush: 3, trim: 4, cache: 5, writeZeroes: 6, blockStatus: 7 });
    expect(CommandFlag).toEqual({ fua: 1, noHole: 2, df: 4, reqOne: 8, fastZero: 16, payloadLen: 32 });
    expect(ReplyFlag).toEqual({ done: 1 });
    expect(ReplyType).toEqual({ none: 0, offsetData: 1, offsetHole: 2, blockStatus: 5, error: 32769, errorOffset: 32770 });
    expect(NbdErrno).toEqual({ EPERM: 1, EIO: 5, ENOMEM: 12, EINVAL: 22, ENOSPC: 28, EOVERFLOW: 75, ENOTSUP: 95, ESHUTDOWN: 108 });
    expect(AllocationFlag).toEqual({ hole: 1, zero: 2 });
    expect(DirtyFlag).toEqual({ dirty: 1 });
  });

  test('tables have distinct values', () => {
    for (const table of [NbdOption, NbdRep, NbdInfo, NbdCommand, ReplyType, NbdErrno, TransmissionFlag, CommandFlag]) {
      const values = Object.values(table);
      expect(new Set(values).size).toBe(values.length);
    }
  });

  test('names for messages', () => {
    expect(describeNbd(NbdRep, NbdRep.errUnknown)).toBe('errUnknown (2147483654)');
    expect(describeNbd(NbdOption, 4)).toBe('unknown (4)');
    expect(errnoName(22)).toBe('EINVAL');
    expect(errnoName(99)).toBe('E?99');
  });

  test('errors keep the peer\'s code and text', () => {
    const e = NbdCommandError.of(NbdErrno.ENOSPC, NbdCommand.write, 'disk full', 4096);
    expect(e.code).toBe(ErrorCode.NBD_COMMAND);
    expect([e.errno, e.errnoName, e.command, e.serverMessage, e.offsetBytes]).toEqual([28, 'ENOSPC', 'write', 'disk full', 4096]);
    expect(e.message).toBe('NBD write failed at offset 4096: ENOSPC: disk full');
    const o = new NbdOptionError('go', NbdRep.errUnknown, 'no export named x');
    expect(o.code).toBe(ErrorCode.NBD_OPTION);
    expect(o.replyName).toBe('errUnknown');
    expect(o.message).toContain('no export named x');
  });
});

describe('handshake messages round-trip', () => {
  test('greeting', () => {
    const g = encodeGreeting(3);
    expect(g.length).toBe(18);
    expect(g.readBigUInt64BE(0)).toBe(NBD_INIT_MAGIC);
    expect(g.readBigUInt64BE(8)).toBe(NBD_OPTS_MAGIC);
    expect(g.readUInt16BE(16)).toBe(3);
  });

  test('option and reply headers keep the payload by reference', () => {
    const data = Buffer.from('payload');
    const [h, p] = encodeOption(NbdOption.go, data);
    expect(p).toBe(data);
    expect([h.readBigUInt64BE(0), h.readUInt32BE(8), h.readUInt32BE(12)]).toEqual([NBD_OPTS_MAGIC, 7, 7]);
    expect(encodeOption(NbdOption.abort)).toHaveLength(1);
    const [rh, rp] = encodeOptionReply(NbdOption.go, NbdRep.errUnknown, data);
    expect(rp).toBe(data);
    expect([rh.readBigUInt64BE(0), rh.readUInt32BE(8), rh.readUInt32BE(12), rh.readUInt32BE(16)]).toEqual([NBD_REP_MAGIC, 7, NbdRep.errUnknown, 7]);
  });

  test('GO / INFO data', () => {
    const data = goData('disk é', [NbdInfo.blockSize, NbdInfo.name]);
    expect(parseGoData(data)).toEqual({ exportName: 'disk é', infoRequests: [3, 1] });
    expect(parseGoData(goData('', []))).toEqual({ exportName: '', infoRequests: [] });
    // Duplicates are the client's error; we keep one of each.
    expect(parseGoData(goData('a', [3, 3, 1])).infoRequests).toEqual([3, 1]);
  });

  test('GO data that does not add up', () => {
    const good = goData('disk', [3]);
    expectProtocolError(() => parseGoData(good.subarray(0, good.length - 1)), ErrorCode.PROTOCOL, 'information requests need 2 bytes, 1 left');
    expectProtocolError(() => parseGoData(Buffer.concat([good, Buffer.from([0])])), ErrorCode.PROTOCOL, 'information requests');
    const long = Buffer.alloc(4);
    long.writeUInt32BE(NBD_MAX_STRING_BYTES + 1);
    expectProtocolError(() => parseGoData(long), ErrorCode.FRAME_TOO_LARGE, 'export name of 4097 bytes');
    const past = Buffer.alloc(6);
    past.writeUInt32BE(100);
    expectProtocolError(() => parseGoData(past), ErrorCode.PROTOCOL, 'export name needs 100 bytes');
    expectProtocolError(() => parseGoData(Buffer.from([0, 0, 0, 1, 0xff, 0, 0])), ErrorCode.PROTOCOL, 'not valid UTF-8');
    expectProtocolError(() => parseGoData(Buffer.from([0, 0, 0, 1, 0, 0, 0])), ErrorCode.PROTOCOL, 'contains NUL');
  });

  test('meta context data', () => {
    const queries = ['base:allocation', 'qemu:dirty-bitmap:bm0'];
    expect(parseMetaContextData(metaContextData('disk', queries))).toEqual({ exportName: 'disk', queries });
    expect(parseMetaContextData(metaContextData('disk', []))).toEqual({ exportName: 'disk', queries: [] });
  });

  test('meta context data: the query count is checked before the queries are read', () => {
    const b = Buffer.alloc(8);
    b.writeUInt32BE(0, 0);
    b.writeUInt32BE(NBD_MAX_META_CONTEXT_QUERIES + 1, 4);
    expectProtocolError(() => parseMetaContextData(b), ErrorCode.LIMIT, '17 queries');
    b.writeUInt32BE(0xffffffff, 4);
    expectProtocolError(() => parseMetaContextData(b), ErrorCode.LIMIT);
    const max = metaContextData('d', Array.from({ length: NBD_MAX_META_CONTEXT_QUERIES }, (_, i) => `x-q:${i}`));
    expect(parseMetaContextData(max).queries).toHaveLength(16);
    expectProtocolError(() => parseMetaContextData(Buffer.concat([metaContextData('d', ['a:b']), Buffer.from([1])])), ErrorCode.PROTOCOL, '1 bytes after the end');
  });

  test('the option limit fits the largest SET_META_CONTEXT exactly', () => {
    const name = 'n'.repeat(NBD_MAX_STRING_BYTES);
    const queries = Array.from({ length: NBD_MAX_META_CONTEXT_QUERIES }, (_, i) => `x-${i}:`.padEnd(NBD_MAX_STRING_BYTES, 'q'));
    expect(metaContextData(name, queries).length).toBe(NBD_MAX_OPTION_DATA_BYTES);
  });

  test('info replies', () => {
    expect(parseInfoReply(infoExportData(2 ** 40, 0x1ed))).toEqual({ info: 'export', sizeBytes: 2 ** 40, transmissionFlags: 0x1ed });
    const sizes = { minimumBytes: 512, preferredBytes: 4096, maximumBytes: 32 << 20 };
    expect(parseInfoReply(infoBlockSizeData(sizes))).toEqual({ info: 'blockSize', ...sizes });
    expect(parseInfoReply(infoStringData(NbdInfo.name, 'disk0'))).toEqual({ info: 'name', name: 'disk0' });
    expect(parseInfoReply(infoStringData(NbdInfo.description, 'a disk'))).toEqual({ info: 'description', description: 'a disk' });
    expect(parseInfoReply(Buffer.from([0, 9, 1, 2]))).toEqual({ info: 'unknown', infoType: 9 });
  });

  test('info replies that break the rules', () => {
    expectProtocolError(() => parseInfoReply(infoExportData(1, 1).subarray(0, 11)), ErrorCode.PROTOCOL, 'transmission flags');
    expectProtocolError(() => parseInfoReply(Buffer.concat([infoExportData(1, 1), Buffer.from([0])])), ErrorCode.PROTOCOL, 'after the end');
    const huge = infoExportData(0, 1);
    huge.writeBigUInt64BE(2n ** 60n, 2);
    expectProtocolError(() => parseInfoReply(huge), ErrorCode.PROTOCOL, 'beyond 2^53');
    expectProtocolError(() => parseInfoReply(infoBlockSizeData({ minimumBytes: 3, preferredBytes: 4096, maximumBytes: 1 << 20 })), ErrorCode.PROTOCOL, 'minimum block size 3');
    expectProtocolError(() => parseInfoReply(infoBlockSizeData({ minimumBytes: 1, preferredBytes: 256, maximumBytes: 1 << 20 })), ErrorCode.PROTOCOL, 'preferred');
    expectProtocolError(() => parseInfoReply(infoBlockSizeData({ minimumBytes: 1, preferredBytes: 4096, maximumBytes: 1024 })), ErrorCode.PROTOCOL, 'maximum payload');
  });

  test('block size rules', () => {
    expect(blockSizesProblem({ minimumBytes: 1, preferredBytes: 512, maximumBytes: 0xffffffff })).toBeUndefined();
    expect(blockSizesProblem({ minimumBytes: 65536, preferredBytes: 65536, maximumBytes: 65536 })).toBeUndefined();
    expect(blockSizesProblem({ minimumBytes: 131072, preferredBytes: 131072, maximumBytes: 131072 })).toContain('minimum');
  });

  test('meta context and server replies', () => {
    expect(parseMetaContextReply(metaContextReplyData(7, 'base:allocation'))).toEqual({ contextId: 7, name: 'base:allocation' });
    expectProtocolError(() => parseMetaContextReply(metaContextReplyData(1, 'nocolon')), ErrorCode.PROTOCOL, 'no namespace');
    expect(parseServerReply(serverReplyData('disk0', 'the first disk'))).toEqual({ exportName: 'disk0', description: 'the first disk' });
    expect(parseServerReply(serverReplyData('disk0'))).toEqual({ exportName: 'disk0', description: '' });
  });

  test('encoders refuse what a peer would reject', () => {
    expect(() => goData('x'.repeat(NBD_MAX_STRING_BYTES + 1), [])).toThrow(RangeError);
    expect(() => goData('a\0b', [])).toThrow(RangeError);
  });
});

describe('meta context queries', () => {
  const available = ['base:allocation', 'qemu:dirty-bitmap:a', 'qemu:dirty-bitmap:b'];

  test('SET selects exact names only, each once', () => {
    expect(selectContexts(available, ['base:allocation', 'qemu:dirty-bitmap:b', 'base:allocation'])).toEqual(['base:allocation', 'qemu:dirty-bitmap:b']);
    expect(selectContexts(available, ['base:', 'qemu:', 'qemu:dirty-bitmap:', 'other:x', 'nonamespace'])).toEqual([]);
  });

  test('LIST: no query is everything, a trailing colon is a wildcard', () => {
    expect(listContexts(available, [])).toEqual(available);
    expect(listContexts(available, ['base:'])).toEqual(['base:allocation']);
    expect(listContexts(available, ['qemu:dirty-bitmap:'])).toEqual(['qemu:dirty-bitmap:a', 'qemu:dirty-bitmap:b']);
    expect(listContexts(available, ['qemu:', 'base:allocation'])).toEqual(['qemu:dirty-bitmap:a', 'qemu:dirty-bitmap:b', 'base:allocation']);
    expect(listContexts(available, ['x-unknown:', 'nocolon'])).toEqual([]);
  });
});

describe('transmission messages', () => {
  test('a request header, and WRITE data by reference', () => {
    const payload = Buffer.from('0123456789');
    const [h, p] = encodeRequest({ command: NbdCommand.write, flags: CommandFlag.fua, cookie: 0xfedcba9876543210n, offsetBytes: 2 ** 40, lengthBytes: 10 }, payload);
    expect(p).toBe(payload);
    expect(h.length).toBe(28);
    expect([h.readUInt32BE(0), h.readUInt16BE(4), h.readUInt16BE(6), h.readBigUInt64BE(8), h.readBigUInt64BE(16), h.readUInt32BE(24)]).toEqual([
      NBD_REQUEST_MAGIC, 1, 1, 0xfedcba9876543210n, 2n ** 40n, 10,
    ]);
    expect(() => encodeRequest({ command: NbdCommand.write, flags: 0, cookie: 1n, offsetBytes: 0, lengthBytes: 11 }, payload)).toThrow(RangeError);
    expect(() => encodeRequest({ command: NbdCommand.read, flags: 0, cookie: 1n, offsetBytes: 0, lengthBytes: 10 }, payload)).toThrow(RangeError);
  });

  test('simple reply', () => {
    const data = Buffer.alloc(3, 1);
    const [h, p] = encodeSimpleReply(5n, 0, data);
    expect(p).toBe(data);
    expect([h.readUInt32BE(0), h.readUInt32BE(4), h.readBigUInt64BE(8)]).toEqual([NBD_SIMPLE_REPLY_MAGIC, 0, 5n]);
  });

  test('chunks', () => {
    const data = Buffer.alloc(5, 2);
    const [h, p] = Chunk.offsetData(9n, 4096, data, true);
    expect(p).toBe(data);
    expect([h.readUInt32BE(0), h.readUInt16BE(4), h.readUInt16BE(6), h.readBigUInt64BE(8), h.readUInt32BE(16), h.readBigUInt64BE(20)]).toEqual([
      NBD_STRUCTURED_REPLY_MAGIC, 1, 1, 9n, 13, 4096n,
    ]);
    const hole = Chunk.offsetHole(9n, 0, 512, false);
    expect([hole.readUInt16BE(4), hole.readUInt16BE(6), hole.readUInt32BE(16), hole.readUInt32BE(28)]).toEqual([0, 2, 12, 512]);
    const bs = Chunk.blockStatus(9n, 3, [{ lengthBytes: 4096, flags: 3 }, { lengthBytes: 512, flags: 0 }], true);
    expect([bs.readUInt16BE(6), bs.readUInt32BE(16), bs.readUInt32BE(20), bs.readUInt32BE(24), bs.readUInt32BE(28)]).toEqual([5, 20, 3, 4096, 3]);
    const err = Chunk.error(9n, NbdErrno.EIO, 'bad sector');
    expect([err.readUInt16BE(6), err.readUInt32BE(16), err.readUInt32BE(20), err.readUInt16BE(24), err.toString('utf8', 26)]).toEqual([
      ReplyType.error, 16, 5, 10, 'bad sector',
    ]);
    const eo = Chunk.errorOffset(9n, NbdErrno.EIO, 'x', 1234, false);
    expect([eo.readUInt16BE(6), eo.readUInt32BE(16), eo.readBigUInt64BE(27)]).toEqual([ReplyType.errorOffset, 15, 1234n]);
    expect(Chunk.none(9n).readUInt16BE(4)).toBe(1);
    expect(() => Chunk.offsetHole(1n, 0, 0, true)).toThrow(RangeError);
    expect(() => Chunk.blockStatus(1n, 1, [], true)).toThrow(RangeError);
    expect(() => Chunk.error(1n, 0, '')).toThrow(RangeError);
  });

  test('an error message over 4096 bytes is cut to fit, not refused', () => {
    const c = Chunk.error(1n, NbdErrno.EIO, 'é'.repeat(3000));
    const length = c.readUInt16BE(24);
    expect(length).toBeLessThanOrEqual(NBD_MAX_STRING_BYTES);
    expect(c.toString('utf8', 26, 26 + length)).toBe('é'.repeat(2048));
  });
});

describe('ByteQueue', () => {
  test('takes across chunks, views within one', () => {
    const q = new ByteQueue();
    const a = Buffer.from([1, 2, 3]);
    q.push(a);
    q.push(Buffer.from([4, 5]));
    expect(q.take(6)).toBeUndefined();
    const first = q.take(2)!;
    expect(first.buffer).toBe(a.buffer);
    expect([...first]).toEqual([1, 2]);
    expect([...q.take(2)!]).toEqual([3, 4]);
    expect(q.length).toBe(1);
    expect(q.drain().map((b) => [...b])).toEqual([[5]]);
    expect(q.length).toBe(0);
  });
});
