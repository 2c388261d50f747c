// validatePages: a pages frame checked against its region before anything is decompressed
// or written.
import { compressSync, uncompressSync } from 'lz4-napi';
import { describe, expect, test } from 'vitest';
import {
  Codec,
  EntryKind,
  ErrorCode,
  Frame,
  MAX_ENTRIES_PER_BATCH,
  type PagesFrame,
  ProtocolError,
  lz4CompressBound,
  validatePages,
} from '../../protocol/index.js';

const { zero: Z, data: D } = EntryKind;
const PAGE = 4096;
const REGION_PAGES = 1024;
const MAX_PAYLOAD = 1 << 20;

function pages(entries: number[], rawBytes: number, payload: Uint8Array, codec: Codec = Codec.raw, refs?: number[]): PagesFrame {
  return Frame.pages({
    migrationId: 'm',
    region: 0,
    round: 0,
    codec,
    entries: Uint32Array.from(entries),
    rawBytes,
    payload,
    ...(refs ? { refs: Uint32Array.from(refs) } : {}),
  });
}

/** An lz4 payload as lz4-napi writes it: u32 LE uncompressed size, then the block. */
function lz4Payload(raw: Uint8Array): Buffer {
  return compressSync(Buffer.from(raw.buffer, raw.byteOffset, raw.length));
}

function withPrefix(prefix: number, body: Uint8Array): Uint8Array {
  const out = Buffer.alloc(4 + body.length);
  out.writeUInt32LE(prefix, 0);
  out.set(body, 4);
  return out;
}

const twoPages = new Uint8Array(2 * PAGE).map((_, i) => (i * 7) & 0xff);
const incompressible = new Uint8Array(2 * PAGE).map((_, i) => (Math.imul(i + 1, 2654435761) >>> 24) & 0xff);

describe('accepted', () => {
  const R = EntryKind.ref;
  const cases: [string, PagesFrame, number, number, { dataPages: number; zeroPages: number; refPages: number }][] = [
    ['refs between data', pages([R, 0, 3, D, 3, 1, R, 4, 2], PAGE, new Uint8Array(PAGE), Codec.raw, [1, 10, 0, 0]), REGION_PAGES, PAGE, { dataPages: 1, zeroPages: 0, refPages: 5 }],
    ['one data page', pages([D, 0, 1], PAGE, new Uint8Array(PAGE)), REGION_PAGES, PAGE, { dataPages: 1, zeroPages: 0, refPages: 0 }],
    ['data and zero runs', pages([D, 0, 2, Z, 2, 100], 2 * PAGE, twoPages), REGION_PAGES, PAGE, { dataPages: 2, zeroPages: 100, refPages: 0 }],
    ['only zero pages, empty payload', pages([Z, 0, REGION_PAGES], 0, new Uint8Array(0)), REGION_PAGES, PAGE, { dataPages: 0, zeroPages: REGION_PAGES, refPages: 0 }],
    ['the last page of the region', pages([D, REGION_PAGES - 1, 1], PAGE, new Uint8Array(PAGE)), REGION_PAGES, PAGE, { dataPages: 1, zeroPages: 0, refPages: 0 }],
    ['a run ending exactly at 2^32', pages([Z, 0xffffffff, 1], 0, new Uint8Array(0)), 2 ** 32, PAGE, { dataPages: 0, zeroPages: 1, refPages: 0 }],
    ['lz4, compressible', pages([D, 0, 2], 2 * PAGE, lz4Payload(twoPages), Codec.lz4), REGION_PAGES, PAGE, { dataPages: 2, zeroPages: 0, refPages: 0 }],
    ['lz4, incompressible (within the worst case)', pages([D, 0, 2], 2 * PAGE, lz4Payload(incompressible), Codec.lz4), REGION_PAGES, PAGE, { dataPages: 2, zeroPages: 0, refPages: 0 }],
    ['lz4 exactly at the worst case', pages([D, 0, 2], 2 * PAGE, withPrefix(2 * PAGE, new Uint8Array(lz4CompressBound(2 * PAGE))), Codec.lz4), REGION_PAGES, PAGE, { dataPages: 2, zeroPages: 0, refPages: 0 }],
    ['rawBytes exactly the payload limit', pages([D, 0, MAX_PAYLOAD / PAGE], MAX_PAYLOAD, new Uint8Array(MAX_PAYLOAD)), REGION_PAGES, PAGE, { dataPages: 256, zeroPages: 0, refPages: 0 }],
    ['512-byte pages', pages([D, 5, 3], 3 * 512, new Uint8Array(3 * 512)), 10, 512, { dataPages: 3, zeroPages: 0, refPages: 0 }],
    ['the most entries a batch may have', pages(Array.from({ length: MAX_ENTRIES_PER_BATCH }, (_, i) => [Z, i, 1]).flat(), 0, new Uint8Array(0)), MAX_ENTRIES_PER_BATCH, PAGE, { dataPages: 0, zeroPages: MAX_ENTRIES_PER_BATCH, refPages: 0 }],
  ];
  test.each(cases)('%s', (_, frame, regionPageCount, pageSize, expected) => {
    expect(validatePages(frame, regionPageCount, pageSize, MAX_PAYLOAD)).toEqual(expected);
  });

  test('the lz4 payloads used here really are lz4-napi blocks that decompress to rawBytes', () => {
    for (const raw of [twoPages, incompressible]) {
      const payload = lz4Payload(raw);
      expect(payload.readUInt32LE(0)).toBe(raw.length);
      expect(uncompressSync(payload)).toEqual(Buffer.from(raw));
    }
  });
});

describe('rejected with GANGWAY_ERR_BAD_PAGES', () => {
  const cases: [string, PagesFrame, number, string][] = [
    ['an entry past the region', pages([D, REGION_PAGES - 1, 2], 2 * PAGE, new Uint8Array(2 * PAGE)), REGION_PAGES, 'past the region'],
    ['an entry starting past the region', pages([Z, REGION_PAGES, 1], 0, new Uint8Array(0)), REGION_PAGES, 'past the region'],
    ['a run that wraps u32 (0xffffffff + 2)', pages([Z, 0xffffffff, 2], 0, new Uint8Array(0)), 2 ** 32, 'past the region'],
    ['a run of 2^32-1 pages from page 2 (wraps to 1 in u32)', pages([Z, 2, 0xffffffff], 0, new Uint8Array(0)), 2 ** 32, 'past the region'],
    ['a zero page count', pages([D, 0, 1, Z, 5, 0], PAGE, new Uint8Array(PAGE)), REGION_PAGES, 'entry 1 has pageCount 0'],
    ['entry kind 0', pages([0, 0, 1], 0, new Uint8Array(0)), REGION_PAGES, 'invalid (0)'],
    ['entry kind 4', pages([4, 0, 1], 0, new Uint8Array(0)), REGION_PAGES, 'unknown (4)'],
    ['a ref entry without its source', pages([3, 0, 1], 0, new Uint8Array(0)), REGION_PAGES, '1 ref entries but 0 ref sources'],
    ['a ref source without its entry', pages([Z, 0, 1], 0, new Uint8Array(0), Codec.raw, [0, 0]), REGION_PAGES, '0 ref entries but 1 ref sources'],
    ['a ref entry past the region', pages([3, REGION_PAGES - 1, 2], 0, new Uint8Array(0), Codec.raw, [0, 0]), REGION_PAGES, 'past the region'],
    ['no entries', pages([], 0, new Uint8Array(0)), REGION_PAGES, 'expected 1..8192'],
    ['a partial entry', pages([Z, 0], 0, new Uint8Array(0)), REGION_PAGES, 'expected 1..8192'],
    ['too many entries', pages(Array.from({ length: MAX_ENTRIES_PER_BATCH + 1 }, (_, i) => [Z, i, 1]).flat(), 0, new Uint8Array(0)), 2 * MAX_ENTRIES_PER_BATCH, 'expected 1..8192'],
    ['rawBytes not the data pages', pages([D, 0, 2], PAGE, new Uint8Array(PAGE)), REGION_PAGES, 'rawBytes 4096 is not 2 data pages'],
    ['rawBytes for zero pages', pages([Z, 0, 2], 2 * PAGE, new Uint8Array(2 * PAGE)), REGION_PAGES, 'rawBytes 8192 is not 0 data pages'],
    ['rawBytes over the payload limit', pages([D, 0, 257], 257 * PAGE, new Uint8Array(0)), REGION_PAGES, 'out of range'],
    ['rawBytes negative', pages([Z, 0, 1], -1, new Uint8Array(0)), REGION_PAGES, 'out of range'],
    ['raw payload shorter than rawBytes', pages([D, 0, 1], PAGE, new Uint8Array(PAGE - 1)), REGION_PAGES, 'raw payload of 4095 bytes'],
    ['raw payload longer than rawBytes', pages([D, 0, 1], PAGE, new Uint8Array(PAGE + 1)), REGION_PAGES, 'raw payload of 4097 bytes'],
    ['lz4 size prefix not rawBytes', pages([D, 0, 2], 2 * PAGE, withPrefix(2 * PAGE + 1, lz4Payload(twoPages).subarray(4)), Codec.lz4), REGION_PAGES, 'lz4 size prefix 8193'],
    ['lz4 size prefix announcing a bomb', pages([D, 0, 1], PAGE, withPrefix(0xffffffff, new Uint8Array(10)), Codec.lz4), REGION_PAGES, 'lz4 size prefix 4294967295'],
    ['lz4 without a size prefix', pages([D, 0, 1], PAGE, new Uint8Array(3), Codec.lz4), REGION_PAGES, 'no size prefix'],
    ['lz4 one byte over the worst case', pages([D, 0, 2], 2 * PAGE, withPrefix(2 * PAGE, new Uint8Array(lz4CompressBound(2 * PAGE) + 1)), Codec.lz4), REGION_PAGES, 'over the worst case'],
    ['codec 0', pages([Z, 0, 1], 0, new Uint8Array(0), Codec.invalid), REGION_PAGES, 'codec invalid (0)'],
  ];
  test.each(cases)('%s', (_, frame, regionPageCount, message) => {
    let error: unknown;
    try {
      validatePages(frame, regionPageCount, PAGE, MAX_PAYLOAD);
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(ProtocolError);
    expect((error as ProtocolError).code).toBe(ErrorCode.BAD_PAGES);
    expect((error as ProtocolError).message).toContain('pages (migration m, region 0, round 0)');
    expect((error as ProtocolError).message).toContain(message);
  });
});
