// Error classes and code tables: the stable parts of the API.
import { describe, expect, test } from 'vitest';
import {
  Codec,
  EntryKind,
  ErrorCode,
  FrameType,
  GangwayError,
  GuestKind,
  PeerError,
  ProtocolError,
  RejectReason,
  Technique,
  describeCode,
  frameTypeName,
  isErrorCode,
  isValidCode,
  nameOf,
} from '../../protocol/index.js';
import { ENTRY_DATA, ENTRY_REF, ENTRY_ZERO } from '../../agent/native.js';
import { checkPlainMsgpack } from '../../protocol/msgpack-scan.js';

describe('error codes', () => {
  test('every code is a distinct GANGWAY_ERR_ string', () => {
    const values = Object.values(ErrorCode);
    expect(new Set(values).size).toBe(values.length);
    for (const value of values) expect(value).toMatch(/^GANGWAY_ERR_[A-Z_]+$/);
    for (const [key, value] of Object.entries(ErrorCode)) expect(value).toBe(`GANGWAY_ERR_${key}`);
  });

  test('the codes the brief asks for exist', () => {
    for (const name of [
      'PROTOCOL', 'PROTOCOL_VERSION', 'PROTOCOL_MAGIC', 'FRAME_TOO_LARGE', 'UNKNOWN_FRAME', 'UNEXPECTED_FRAME',
      'BAD_PAGES', 'DECOMPRESS', 'DIGEST_MISMATCH', 'NON_CONVERGENCE', 'PEER_UNREACHABLE', 'PEER_GONE', 'REJECTED',
      'ABORTED', 'GUEST_NOT_FOUND', 'GUEST_EXISTS', 'GUEST_FAILED', 'BAD_REQUEST', 'TIMEOUT', 'SWITCHOVER_IN_DOUBT',
      'INTERNAL', 'SHUTTING_DOWN', 'TRACKER',
    ]) {
      expect(isErrorCode(`GANGWAY_ERR_${name}`)).toBe(true);
    }
  });

  test('isErrorCode', () => {
    expect(isErrorCode('GANGWAY_ERR_TIMEOUT')).toBe(true);
    expect(isErrorCode('GANGWAY_ERR_NOPE')).toBe(false);
    expect(isErrorCode('TIMEOUT')).toBe(false);
    expect(isErrorCode(5)).toBe(false);
  });

  test('GangwayError keeps code and cause', () => {
    const cause = new Error('disk full');
    const error = new GangwayError(ErrorCode.INTERNAL, 'could not write', { cause });
    expect(error).toBeInstanceOf(Error);
    expect(error.code).toBe('GANGWAY_ERR_INTERNAL');
    expect(error.cause).toBe(cause);
    expect(error.name).toBe('GangwayError');
  });

  test('ProtocolError carries a WebSocket close code', () => {
    expect(new ProtocolError(ErrorCode.PROTOCOL, 'x').closeCode).toBe(1002);
    expect(new ProtocolError(ErrorCode.UNKNOWN_FRAME, 'x').closeCode).toBe(1002);
    expect(new ProtocolError(ErrorCode.FRAME_TOO_LARGE, 'x').closeCode).toBe(1009);
    expect(new ProtocolError(ErrorCode.PROTOCOL, 'x', { closeCode: 1008 }).closeCode).toBe(1008);
    expect(new ProtocolError(ErrorCode.PROTOCOL, 'x')).toBeInstanceOf(GangwayError);
  });

  test("PeerError keeps the remote's code and message verbatim", () => {
    const known = new PeerError('GANGWAY_ERR_GUEST_EXISTS', 'guest web-1 already runs here');
    expect(known.code).toBe(ErrorCode.GUEST_EXISTS);
    expect(known.remoteCode).toBe('GANGWAY_ERR_GUEST_EXISTS');
    expect(known.remoteMessage).toBe('guest web-1 already runs here');
    expect(known.message).toContain('guest web-1 already runs here');
    const newer = new PeerError('GANGWAY_ERR_FROM_THE_FUTURE', 'hm');
    expect(newer.code).toBe(ErrorCode.INTERNAL);
    expect(newer.remoteCode).toBe('GANGWAY_ERR_FROM_THE_FUTURE');
  });
});

describe('code tables', () => {
  const tables = { FrameType, Technique, Codec, EntryKind, RejectReason, GuestKind };

  test.each(Object.entries(tables))('%s reserves 0 as invalid and has distinct values', (_, table) => {
    expect(table.invalid).toBe(0);
    expect(isValidCode(table, 0)).toBe(false);
    const values = Object.values(table);
    expect(new Set(values).size).toBe(values.length);
  });

  test('the numbers the brief fixes', () => {
    expect(FrameType).toEqual({
      invalid: 0, hello: 1, offer: 2, accept: 3, reject: 4, pages: 5, roundEnd: 6, pause: 7, deviceState: 8,
      verify: 9, verified: 10, commit: 11, committed: 12, abort: 13, credit: 14, error: 15,
      dedupOpen: 16, dedupResident: 17, dedupReady: 18, dedupClose: 19, want: 20, pageFingerprints: 21, postcopy: 22, fetch: 23,
      trafficQuery: 24, trafficReport: 25, reattach: 26, migrationQuery: 27, migrationAnswer: 28, standbyReady: 29,
    });
    expect(Technique).toEqual({ invalid: 0, precopy: 1, postcopy: 2, hybrid: 3 });
    expect(Codec).toEqual({ invalid: 0, raw: 1, lz4: 2 });
    expect(RejectReason).toEqual({
      invalid: 0, busy: 1, guestExists: 2, noSpace: 3, unsupported: 4, badSpec: 5, shuttingDown: 6, versionMismatch: 7,
    });
    expect(GuestKind).toEqual({ invalid: 0, process: 1, qemu: 2 });
  });

  test('entry kinds match the native addon (ENTRY_ZERO = 1, ENTRY_DATA = 2, ENTRY_REF = 3)', () => {
    expect(EntryKind).toEqual({ invalid: 0, zero: 1, data: 2, ref: 3 });
    expect([ENTRY_ZERO, ENTRY_DATA, ENTRY_REF]).toEqual([EntryKind.zero, EntryKind.data, EntryKind.ref]);
    expect(isValidCode(EntryKind, 4)).toBe(false);
  });

  test('name lookups', () => {
    expect(nameOf(Codec, 2)).toBe('lz4');
    expect(nameOf(Codec, 0)).toBe('invalid');
    expect(nameOf(Codec, 7)).toBeUndefined();
    expect(describeCode(RejectReason, 3)).toBe('noSpace (3)');
    expect(describeCode(RejectReason, 42)).toBe('unknown (42)');
    expect(frameTypeName(5)).toBe('pages');
    expect(frameTypeName(0)).toBeUndefined();
    expect(frameTypeName(16)).toBe('dedupOpen');
    expect(frameTypeName(23)).toBe('fetch');
    expect(frameTypeName(24)).toBe('trafficQuery');
    expect(frameTypeName(25)).toBe('trafficReport');
    expect(frameTypeName(26)).toBe('reattach');
    expect(frameTypeName(27)).toBe('migrationQuery');
    expect(frameTypeName(28)).toBe('migrationAnswer');
    expect(frameTypeName(29)).toBe('standbyReady');
    expect(frameTypeName(30)).toBeUndefined();
    expect(isValidCode(Codec, 1.5)).toBe(false);
    expect(isValidCode(Codec, '1')).toBe(false);
  });
});

describe('checkPlainMsgpack', () => {
  const ok: [string, number[]][] = [
    ['a positive fixint', [0x05]],
    ['nil, booleans', [0x93, 0xc0, 0xc2, 0xc3]],
    ['floats and 64-bit ints', [0x93, 0xca, 0, 0, 0, 0, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0xcf, 0, 0, 0, 0, 0, 0, 0, 1]],
    ['an empty map and array', [0x92, 0x80, 0x90]],
    ['map16 with a str8 key and bin8 value', [0xde, 0, 1, 0xd9, 1, 0x61, 0xc4, 2, 1, 2]],
    ['negative fixint', [0xff]],
  ];
  test.each(ok)('accepts %s', (_, bytes) => {
    expect(checkPlainMsgpack(Uint8Array.from(bytes), 8)).toBeUndefined();
  });

  const bad: [string, number[], string][] = [
    ['nothing', [], 'truncated'],
    ['fixext 4', [0xd6, 1, 0, 0, 0, 0], 'not plain'],
    ['ext 32', [0xc9, 0, 0, 0, 1, 5, 0], 'not plain'],
    ['a truncated float', [0xcb, 0, 0], 'runs past'],
    ['a truncated length', [0xdb, 0, 0], 'truncated'],
    ['two values', [0x01, 0x02], 'bytes after the end'],
    ['a binary map key', [0x81, 0xc4, 1, 0x61, 0x01], 'map key'],
    ['an array map key', [0x81, 0x90, 0x01], 'map key'],
    ['depth 3 with a limit of 2', [0x91, 0x91, 0x91, 0x01], 'nesting deeper than 2'],
  ];
  test.each(bad)('rejects %s', (_, bytes, message) => {
    expect(checkPlainMsgpack(Uint8Array.from(bytes), 2)).toContain(message);
  });

  test('depth at the limit is fine', () => {
    expect(checkPlainMsgpack(Uint8Array.from([0x91, 0x91, 0x01]), 2)).toBeUndefined();
  });
});
