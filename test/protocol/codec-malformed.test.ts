// Malformed input: every rejection is a ProtocolError with a specific code and a message
// naming the frame and field, and the decoder stays poisoned afterwards.
import { Packr } from 'msgpackr';
import { afterEach, describe, expect, test, vi } from 'vitest';
import { exampleFrames } from '../../protocol/examples.js';
import { frameToWire } from '../../protocol/frame-schema.js';
import {
  Codec,
  DEFAULT_MAX_PAYLOAD_BYTES,
  DIGEST_BYTES,
  ENTRY_BYTES,
  EntryKind,
  ErrorCode,
  Frame,
  FrameDecoder,
  GangwayError,
  MAX_ENTRIES_PER_BATCH,
  MAX_HEADER_BYTES,
  MAX_REGION_BYTES,
  MIN_MAX_PAYLOAD_BYTES,
  ProtocolError,
  encodeFrame,
} from '../../protocol/index.js';

const packr = new Packr({ useRecords: false });
const examples = exampleFrames();

function example<T extends Frame['type']>(type: T): Extract<Frame, { type: T }> {
  return examples.find((f) => f.type === type) as Extract<Frame, { type: T }>;
}

/** The wire header of an example frame, deep-copied so a test can break it. */
function headerOf(type: Frame['type']): Record<string, any> {
  return structuredClone(frameToWire(example(type)).header);
}

function prefix(headerLength: number, payloadLength: number): Buffer {
  const p = Buffer.alloc(8);
  p.writeUInt32BE(headerLength, 0);
  p.writeUInt32BE(payloadLength, 4);
  return p;
}

/** A frame with any header (packed by msgpackr, or raw bytes) and payload. */
function rawFrame(header: unknown, payload: Uint8Array = new Uint8Array(0)): Buffer {
  const headerBytes = header instanceof Uint8Array ? header : packr.pack(header);
  return Buffer.concat([prefix(headerBytes.length, payload.length), headerBytes, payload]);
}

function rawFrameFrom(type: Frame['type'], change: (header: Record<string, any>) => void): Buffer {
  const { payload } = frameToWire(example(type));
  const header = headerOf(type);
  change(header);
  return rawFrame(header, payload);
}

const valid = Buffer.concat(encodeFrame(Frame.commit({ migrationId: 'm' })) as Uint8Array[]);

/** Asserts the rejection, and that the decoder is poisoned with the same error after it. */
function expectRejected(
  bytes: Uint8Array,
  code: ErrorCode,
  messageParts: string[] = [],
  decoder = new FrameDecoder(),
): ProtocolError {
  let error: unknown;
  try {
    decoder.push(bytes);
  } catch (e) {
    error = e;
  }
  expect(error).toBeInstanceOf(ProtocolError);
  const protocolError = error as ProtocolError;
  expect(protocolError.code).toBe(code);
  for (const part of messageParts) expect(protocolError.message).toContain(part);
  expect(decoder.bufferedBytes).toBe(0);
  expect(() => decoder.push(valid)).toThrow(protocolError);
  try {
    decoder.push(valid);
  } catch (again) {
    expect(again).toBe(protocolError);
  }
  return protocolError;
}

afterEach(() => {
  vi.restoreAllMocks();
});

describe('framing', () => {
  test('an incomplete frame is not an error: it waits for more bytes', () => {
    const bytes = Buffer.concat(encodeFrame(example('offer')) as Uint8Array[]);
    const decoder = new FrameDecoder();
    expect(decoder.push(bytes.subarray(0, 20))).toEqual([]);
    expect(decoder.bufferedBytes).toBe(20);
  });

  test('a header cut short inside its declared length is malformed msgpack', () => {
    const header = packr.pack(headerOf('offer'));
    const cut = header.subarray(0, header.length - 5);
    expectRejected(rawFrame(cut), ErrorCode.PROTOCOL, ['frame header: malformed msgpack']);
  });

  test('bytes after the msgpack value inside the header are malformed', () => {
    const header = Buffer.concat([packr.pack(headerOf('commit')), Buffer.from([0xc0])]);
    expectRejected(rawFrame(header), ErrorCode.PROTOCOL, ['1 bytes after the end']);
  });

  test('header length over the limit throws on the prefix alone, before allocating', () => {
    const tiny = prefix(0xffffffff, 0);
    const allocUnsafe = vi.spyOn(Buffer, 'allocUnsafe');
    const allocUnsafeSlow = vi.spyOn(Buffer, 'allocUnsafeSlow');
    const alloc = vi.spyOn(Buffer, 'alloc');
    const error = expectRejected(tiny, ErrorCode.FRAME_TOO_LARGE, ['header of 4294967295 bytes']);
    expect(error.closeCode).toBe(1009);
    expect(allocUnsafe).not.toHaveBeenCalled();
    expect(allocUnsafeSlow).not.toHaveBeenCalled();
    expect(alloc).not.toHaveBeenCalled();
  });

  test('header length: the limit is accepted, one more is not', () => {
    const decoder = new FrameDecoder();
    expect(decoder.push(prefix(MAX_HEADER_BYTES, 0))).toEqual([]);
    expectRejected(prefix(MAX_HEADER_BYTES + 1, 0), ErrorCode.FRAME_TOO_LARGE);
  });

  test('header length 0', () => {
    expectRejected(prefix(0, 0), ErrorCode.PROTOCOL, ['header length 0']);
  });

  test('payload length over the limit throws on the prefix alone', () => {
    const prefixes = [prefix(10, 1001), prefix(10, DEFAULT_MAX_PAYLOAD_BYTES + 1), prefix(10, 0xffffffff)] as const;
    const allocUnsafe = vi.spyOn(Buffer, 'allocUnsafe');
    expectRejected(prefixes[0], ErrorCode.FRAME_TOO_LARGE, ['payload of 1001 bytes'], new FrameDecoder({ maxPayloadBytes: 1000 }));
    expectRejected(prefixes[1], ErrorCode.FRAME_TOO_LARGE);
    expectRejected(prefixes[2], ErrorCode.FRAME_TOO_LARGE);
    expect(allocUnsafe).not.toHaveBeenCalled();
  });

  test('a payload at the limit is accepted', () => {
    const frame = Frame.deviceState({ migrationId: 'm', offsetBytes: 0, totalBytes: 1000, state: new Uint8Array(1000) });
    const decoder = new FrameDecoder({ maxPayloadBytes: 1000 });
    expect(decoder.push(Buffer.concat(encodeFrame(frame) as Uint8Array[]))).toHaveLength(1);
  });

  test('decoder limits are checked', () => {
    expect(() => new FrameDecoder({ maxPayloadBytes: -1 })).toThrow(RangeError);
    expect(() => new FrameDecoder({ maxPayloadBytes: DEFAULT_MAX_PAYLOAD_BYTES + 1 })).toThrow(RangeError);
    expect(() => new FrameDecoder({ maxPayloadBytes: 1.5 })).toThrow(RangeError);
  });

  test('a bad frame after good ones in the same chunk still poisons the decoder', () => {
    const decoder = new FrameDecoder();
    expectRejected(Buffer.concat([valid, valid, prefix(0, 0)]), ErrorCode.PROTOCOL, [], decoder);
  });
});

describe('msgpack', () => {
  const cases: [string, number[], string][] = [
    ['the never-used byte 0xc1', [0xc1], 'not plain MessagePack'],
    ['a timestamp extension', [0xd6, 0xff, 0, 0, 0, 0], 'not plain MessagePack'],
    ["msgpackr's record definition extension", [0xd4, 0x72, 0x40], 'not plain MessagePack'],
    ['an ext 8', [0xc7, 1, 5, 0], 'not plain MessagePack'],
    ['a non-string map key', [0x81, 0x01, 0x02], 'map key'],
    ['a map claiming more entries than bytes', [0xdf, 0xff, 0xff, 0xff, 0xff], 'claims more items'],
    ['a string running past the end', [0x81, 0xa1, 0x74, 0xdb, 0, 0, 1, 0, 0x61], 'runs past the end'],
    ['nesting deeper than the limit', [...Array<number>(9).fill(0x91), 0x01], 'nesting deeper'],
    ['the key __proto__', [0x81, 0xa9, ...Buffer.from('__proto__'), 0x01], '__proto__'],
  ];
  test.each(cases)('%s', (_, bytes, message) => {
    expectRejected(rawFrame(Buffer.from(bytes)), ErrorCode.PROTOCOL, ['malformed msgpack', message]);
  });

  test('100,000 nested arrays are rejected without touching the stack', () => {
    const bytes = Buffer.alloc(100_001, 0x91);
    bytes[100_000] = 0x01;
    expectRejected(rawFrame(bytes), ErrorCode.PROTOCOL, ['nesting deeper']);
  });

  test.each([
    ['an array', [1, 2]],
    ['a number', 5],
    ['a string', 'hello'],
    ['nil', null],
    ['binary', new Uint8Array(4)],
  ])('a header that is %s, not a map', (_, header) => {
    expectRejected(rawFrame(header instanceof Uint8Array ? packr.pack(header) : header), ErrorCode.PROTOCOL, [
      'frame header: expected a map',
    ]);
  });
});

describe('frame type', () => {
  test("missing 't'", () => {
    expectRejected(rawFrame({ migrationId: 'm' }), ErrorCode.PROTOCOL, ["missing the frame type 't'"]);
  });
  test.each([['a string', 'commit'], ['a float', 11.5], ['a boolean', true]])("'t' is %s", (_, t) => {
    expectRejected(rawFrame({ t, migrationId: 'm' }), ErrorCode.PROTOCOL, ['header.t']);
  });
  test.each([0, 99, 255, 0xffffffff, -1])("'t' = %d is unknown", (t) => {
    expectRejected(rawFrame({ t, migrationId: 'm' }), ErrorCode.UNKNOWN_FRAME, [`(${t})`]);
  });
});

describe('enum fields: unknown codes and 0', () => {
  const cases: [string, Frame['type'], (h: Record<string, any>, code: number) => void, string][] = [
    ['offer.technique', 'offer', (h, c) => (h.technique = c), 'offer.technique'],
    ['offer.guest.kind', 'offer', (h, c) => (h.guest.kind = c), 'offer.guest.kind'],
    ['offer.codecs[1]', 'offer', (h, c) => (h.codecs[1] = c), 'offer.codecs[1]'],
    ['reject.reason', 'reject', (h, c) => (h.reason = c), 'reject.reason'],
    ['pages.codec', 'pages', (h, c) => (h.codec = c), 'pages.codec'],
  ];
  for (const [name, type, set, field] of cases) {
    test.each([0, 9, 255])(`${name} = %d`, (code) => {
      expectRejected(rawFrameFrom(type, (h) => set(h, code)), ErrorCode.PROTOCOL, [field, `(${code})`]);
    });
  }

  test.each([
    [0, 'invalid (0)'],
    [4, 'unknown (4)'],
    [0xffffffff, 'unknown (4294967295)'],
  ])('pages entry kind %d', (kind, message) => {
    const entries = Uint32Array.of(EntryKind.data, 0, 1, kind, 1, 1);
    const frame = rawFrameFrom('pages', (h) => (h.entries = new Uint8Array(entries.buffer)));
    expectRejected(frame, ErrorCode.BAD_PAGES, ['pages.entries', 'entry 1', message]);
  });
});

describe('field values', () => {
  const long = (n: number, c = 'a') => c.repeat(n);
  const cases: [string, Frame['type'], (h: Record<string, any>) => void, string, ErrorCode?][] = [
    // wrong types
    ['migrationId a number', 'commit', (h) => (h.migrationId = 5), 'commit.migrationId: expected a string'],
    ['creditBytes a string', 'accept', (h) => (h.creditBytes = '1'), 'accept.creditBytes: expected an integer'],
    ['creditBytes a float', 'accept', (h) => (h.creditBytes = 1.5), 'accept.creditBytes: expected an integer'],
    ['final a number', 'roundEnd', (h) => (h.final = 1), 'roundEnd.final: expected a boolean'],
    ['match a string', 'verified', (h) => (h.match = 'yes'), 'verified.match: expected a boolean'],
    ['digests a string', 'verify', (h) => (h.digests = 'x'), 'verify.digests: expected an array'],
    ['a digest a string', 'verify', (h) => (h.digests = ['x']), 'verify.digests[0]: expected binary'],
    ['entries an array', 'pages', (h) => (h.entries = [2, 0, 1]), 'pages.entries: expected binary', ErrorCode.BAD_PAGES],
    ['features a string', 'hello', (h) => (h.features = 'lz4'), 'hello.features: expected an array'],
    ['region a float', 'pages', (h) => (h.region = 0.5), 'pages.region: expected an integer'],
    ['guest a list', 'offer', (h) => (h.guest = []), 'offer.guest: expected a map'],
    ['a region not a map', 'offer', (h) => (h.guest.regions = [5]), 'offer.guest.regions[0]: expected a map'],
    ['resumeToSendMs a string', 'committed', (h) => (h.resumeToSendMs = '1'), 'committed.resumeToSendMs: expected a finite number'],
    ['resumeToSendMs NaN', 'committed', (h) => (h.resumeToSendMs = NaN), 'expected a finite number'],
    ['resumeToSendMs Infinity', 'committed', (h) => (h.resumeToSendMs = Infinity), 'expected a finite number'],
    ['config value a map', 'offer', (h) => (h.guest.config.x = {}), 'offer.guest.config["x"]: expected a string, number or boolean'],
    ['config value nil', 'offer', (h) => (h.guest.config.x = null), 'offer.guest.config["x"]'],
    ['config value an array', 'offer', (h) => (h.guest.config.x = [1]), 'offer.guest.config["x"]'],
    ['config value NaN', 'offer', (h) => (h.guest.config.x = NaN), 'expected a finite number'],
    ['config a list', 'offer', (h) => (h.guest.config = []), 'offer.guest.config: expected a map'],
    // strings over their limits or outside their alphabet
    ['migrationId of 65 chars', 'commit', (h) => (h.migrationId = long(65)), 'commit.migrationId: 65 chars'],
    ['empty migrationId', 'commit', (h) => (h.migrationId = ''), 'commit.migrationId: 0 chars'],
    ['migrationId with a space', 'commit', (h) => (h.migrationId = 'a b'), 'does not match'],
    ['agentId of 81 chars', 'hello', (h) => (h.agentId = long(81)), 'hello.agentId: 81 chars'],
    ['guest name of 65 chars', 'offer', (h) => (h.guest.name = long(65)), 'offer.guest.name: 65 chars'],
    ['guest name starting with a dot', 'offer', (h) => (h.guest.name = '.hidden'), 'offer.guest.name'],
    ['guest name starting with a dash', 'offer', (h) => (h.guest.name = '-rf'), 'offer.guest.name'],
    ['guest name with a slash', 'offer', (h) => (h.guest.name = 'a/b'), 'offer.guest.name'],
    ['region name of 65 chars', 'offer', (h) => (h.guest.regions[0].name = long(65)), 'offer.guest.regions[0].name: 65 chars'],
    ['region name with ..', 'offer', (h) => (h.guest.regions[0].name = '../x'), 'offer.guest.regions[0].name'],
    ['feature of 33 chars', 'hello', (h) => (h.features = [long(33)]), 'hello.features[0]: 33 chars'],
    ['empty feature', 'hello', (h) => (h.features = ['']), 'hello.features[0]: 0 chars'],
    ['reject message of 1025 chars', 'reject', (h) => (h.message = long(1025)), 'reject.message: 1025 chars'],
    ['abort message of 1025 chars', 'abort', (h) => (h.message = long(1025)), 'abort.message: 1025 chars'],
    ['error message of 1025 chars', 'error', (h) => (h.message = long(1025)), 'error.message: 1025 chars'],
    ['abort code not a gangway code', 'abort', (h) => (h.code = 'EPERM'), 'abort.code'],
    ['error code of 65 chars', 'error', (h) => (h.code = `GANGWAY_ERR_${long(53, 'X')}`), 'error.code: 65 chars'],
    ['config string of 1025 chars', 'offer', (h) => (h.guest.config.x = long(1025)), 'offer.guest.config["x"]: string of 1025 chars'],
    ['config key of 65 chars', 'offer', (h) => (h.guest.config[long(65)] = 1), 'key of 65 chars'],
    ['config with 65 keys', 'offer', (h) => { for (let i = 0; i < 65; i++) h.guest.config[`k${i}`] = i; }, 'offer.guest.config: 6'],
    // numbers out of range
    ['creditBytes 0', 'accept', (h) => (h.creditBytes = 0), 'accept.creditBytes: 0 is out of range'],
    ['creditBytes over 1 GiB', 'accept', (h) => (h.creditBytes = 2 ** 30 + 1), 'accept.creditBytes'],
    ['credit bytes 0', 'credit', (h) => (h.bytes = 0), 'credit.bytes'],
    // trafficQuery / trafficReport: a peer's rates are bounded numbers, its ids and reason bounded strings
    ['trafficQuery without a requestId', 'trafficQuery', (h) => delete h.requestId, 'trafficQuery.requestId: missing'],
    ['trafficQuery requestId of 65 chars', 'trafficQuery', (h) => (h.requestId = long(65)), 'trafficQuery.requestId: 65 chars'],
    ['trafficReport requestId with a space', 'trafficReport', (h) => (h.requestId = 'a b'), 'trafficReport.requestId'],
    ['trafficReport rate negative', 'trafficReport', (h) => (h.rxBytesPerSec = -1), 'trafficReport.rxBytesPerSec'],
    ['trafficReport rate NaN', 'trafficReport', (h) => (h.txBytesPerSec = NaN), 'trafficReport.txBytesPerSec'],
    ['trafficReport rate infinite', 'trafficReport', (h) => (h.txBytesPerSec = Infinity), 'trafficReport.txBytesPerSec'],
    ['trafficReport rate over 1 Tbit/s', 'trafficReport', (h) => (h.linkBytesPerSec = 1e12), 'trafficReport.linkBytesPerSec'],
    ['trafficReport rate a string', 'trafficReport', (h) => (h.rxBytesPerSec = '5'), 'trafficReport.rxBytesPerSec'],
    ['trafficReport measured a number', 'trafficReport', (h) => (h.measured = 1), 'trafficReport.measured'],
    ['trafficReport reason of 1025 chars', 'trafficReport', (h) => (h.reason = long(1025)), 'trafficReport.reason: 1025 chars'],
    ['trafficReport with an extra field', 'trafficReport', (h) => (h.guests = []), 'trafficReport'],
    ['downtimeBudgetMs 0', 'offer', (h) => (h.downtimeBudgetMs = 0), 'offer.downtimeBudgetMs'],
    ['downtimeBudgetMs 600001', 'offer', (h) => (h.downtimeBudgetMs = 600_001), 'offer.downtimeBudgetMs'],
    ['pageSizeBytes 256', 'offer', (h) => (h.guest.regions[0].pageSizeBytes = 256), 'pageSizeBytes: 256 is out of range'],
    ['pageSizeBytes 2 MiB', 'offer', (h) => (h.guest.regions[0].pageSizeBytes = 2 << 20), 'pageSizeBytes'],
    ['pageSizeBytes 3072', 'offer', (h) => (h.guest.regions[0].pageSizeBytes = 3072), 'not a power of two'],
    ['lengthBytes 0', 'offer', (h) => (h.guest.regions[0].lengthBytes = 0), 'lengthBytes: 0 is out of range'],
    ['lengthBytes not a page multiple', 'offer', (h) => (h.guest.regions[0].lengthBytes = 4097), 'not a multiple of the page size'],
    ['lengthBytes over 16 TiB', 'offer', (h) => (h.guest.regions[0].lengthBytes = MAX_REGION_BYTES + 4096), 'lengthBytes'],
    ['more than 2^32 pages', 'offer', (h) => Object.assign(h.guest.regions[0], { pageSizeBytes: 512, lengthBytes: MAX_REGION_BYTES }), 'more than page indices'],
    ['no regions', 'offer', (h) => (h.guest.regions = []), 'offer.guest.regions: 0 items'],
    ['17 regions', 'offer', (h) => (h.guest.regions = Array.from({ length: 17 }, (_, i) => ({ ...h.guest.regions[0], name: `r${i}` }))), 'offer.guest.regions: 17 items'],
    ['two regions with one name', 'offer', (h) => h.guest.regions.push({ ...h.guest.regions[0] }), 'same name'],
    ['no codecs', 'offer', (h) => (h.codecs = []), 'offer.codecs: 0 items'],
    ['a codec twice', 'offer', (h) => (h.codecs = [1, 1]), 'offer.codecs: lists a codec twice'],
    ['33 features', 'hello', (h) => (h.features = Array.from({ length: 33 }, (_, i) => `f${i}`)), 'hello.features: 33 items'],
    ['a feature twice', 'hello', (h) => (h.features = ['a', 'a']), 'twice'],
    ['maxPayloadBytes below 1 MiB', 'hello', (h) => (h.maxPayloadBytes = MIN_MAX_PAYLOAD_BYTES - 1), 'hello.maxPayloadBytes'],
    ['maxPayloadBytes over 16 MiB', 'hello', (h) => (h.maxPayloadBytes = DEFAULT_MAX_PAYLOAD_BYTES + 1), 'hello.maxPayloadBytes'],
    ['17 digests', 'verify', (h) => (h.digests = Array.from({ length: 17 }, () => new Uint8Array(DIGEST_BYTES))), 'verify.digests: 17 items'],
    ['no digests', 'verified', (h) => (h.digests = []), 'verified.digests: 0 items'],
    ['a 15-byte digest', 'verify', (h) => (h.digests = [new Uint8Array(15)]), 'verify.digests[0]: 15 bytes'],
    ['a 17-byte digest', 'verified', (h) => (h.digests = [new Uint8Array(17)]), 'verified.digests[0]: 17 bytes'],
    ['round 2^31', 'pages', (h) => (h.round = 2 ** 31), 'pages.round'],
    ['round -1', 'roundEnd', (h) => (h.round = -1), 'roundEnd.round'],
    ['region 16', 'pages', (h) => (h.region = 16), 'pages.region: 16 is out of range'],
    ['rawBytes beyond 2^53 (u64)', 'pages', (h) => (h.rawBytes = 2 ** 60), 'pages.rawBytes', ErrorCode.BAD_PAGES],
    ['rawBytes over the payload limit', 'pages', (h) => (h.rawBytes = DEFAULT_MAX_PAYLOAD_BYTES + 1), 'pages.rawBytes', ErrorCode.BAD_PAGES],
    ['no entries', 'pages', (h) => (h.entries = new Uint8Array(0)), 'pages.entries: 0 bytes', ErrorCode.BAD_PAGES],
    ['8193 entries', 'pages', (h) => (h.entries = new Uint8Array((MAX_ENTRIES_PER_BATCH + 1) * ENTRY_BYTES)), 'pages.entries', ErrorCode.BAD_PAGES],
    ['entries not a whole number of triples', 'pages', (h) => (h.entries = new Uint8Array(ENTRY_BYTES + 4)), 'not a whole number', ErrorCode.BAD_PAGES],
    ['an entry with pageCount 0', 'pages', (h) => (h.entries = new Uint8Array(Uint32Array.of(2, 0, 0).buffer)), 'entry 0 has pageCount 0', ErrorCode.BAD_PAGES],
    // dedup
    ['a resident slot without the resident flag', 'dedupResident', (h) => (h.slot = 5), 'dedupResident.slot'],
    ['resident fingerprints past the slot', 'dedupResident', (h) => (h.firstPage = 99), 'dedupResident.firstPage: 4 fingerprints from page 99'],
    ['an offer slot with the resident flag', 'offer', (h) => (h.dedup.slots = [2 ** 31]), 'offer.dedup.slots[0]'],
    ['an offer with a slot per region missing', 'offer', (h) => (h.dedup.slots = []), 'offer.dedup.slots: 0 items'],
    ['ref sources without ref entries', 'pages', (h) => (h.refs = new Uint8Array(8)), 'pages.refs: 8 bytes for 0 ref entries', ErrorCode.BAD_PAGES],
    ['a want run of 0 pages', 'want', (h) => (h.runs = new Uint8Array(Uint32Array.of(5, 0).buffer)), 'want.runs: run 0 has pageCount 0', ErrorCode.BAD_PAGES],
    // hello identity
    ['magic HTTP', 'hello', (h) => (h.magic = 'HTTP'), 'hello.magic', ErrorCode.PROTOCOL_MAGIC],
    ['magic missing', 'hello', (h) => delete h.magic, 'hello.magic', ErrorCode.PROTOCOL_MAGIC],
    ['version 4, named by its release', 'hello', (h) => ((h.version = 4), (h.agentVersion = '0.9.1')), 'the peer (gangway 0.9.1) speaks protocol version 4, this agent speaks 3: run the same gangway release on both hosts', ErrorCode.PROTOCOL_VERSION],
    ['version 2, which had no agentVersion', 'hello', (h) => ((h.version = 2), delete h.agentVersion), 'the peer speaks protocol version 2, this agent speaks 3', ErrorCode.PROTOCOL_VERSION],
    ['an agentVersion that is not one', 'hello', (h) => (h.agentVersion = 'v 1; rm'), 'hello.agentVersion'],
    ['version 0', 'hello', (h) => (h.version = 0), 'protocol version 0', ErrorCode.PROTOCOL_VERSION],
    // unknown fields
    ['an unknown top-level field', 'commit', (h) => (h.extra = 1), 'commit.extra: unknown field'],
    ['an unknown guest field', 'offer', (h) => (h.guest.disks = []), 'offer.guest.disks: unknown field'],
    ['a priority that is not one', 'offer', (h) => (h.priority = 'urgent'), 'offer.priority: expected high, medium or low'],
    ['an unknown region field', 'offer', (h) => (h.guest.regions[0].path = '/x'), 'offer.guest.regions[0].path: unknown field'],
  ];
  test.each(cases)('%s', (_, type, change, message, code = ErrorCode.PROTOCOL) => {
    expectRejected(rawFrameFrom(type, change), code, [message]);
  });

  const missing: [Frame['type'], string][] = examples.flatMap((frame) =>
    Object.keys(frameToWire(frame).header)
      // offer.dedup, pages.refs and verified.postcopy are optional: absent is legal.
      .filter(
        (key) =>
          key !== 't' &&
          !(frame.type === 'offer' && key === 'dedup') &&
          !(frame.type === 'offer' && key === 'priority') &&
          !(frame.type === 'pages' && key === 'refs') &&
          !(frame.type === 'verified' && key === 'postcopy'),
      )
      .map((key): [Frame['type'], string] => [frame.type, key]),
  );
  test.each(missing)('%s without %s', (type, key) => {
    const code = type === 'hello' && key === 'magic' ? ErrorCode.PROTOCOL_MAGIC : type === 'hello' && key === 'version' ? ErrorCode.PROTOCOL_VERSION : ErrorCode.PROTOCOL;
    const error = expectRejected(rawFrameFrom(type, (h) => delete h[key]), code, [`${type}.${key}`]);
    expect(error.message).toContain('missing');
  });

  test.each(['guest.name', 'guest.kind', 'guest.regions', 'guest.config', 'guest.regions[0].lengthBytes'])(
    'offer without %s',
    (path) => {
      const frame = rawFrameFrom('offer', (h) => {
        if (path.startsWith('guest.regions[0].')) delete h.guest.regions[0][path.slice('guest.regions[0].'.length)];
        else delete h.guest[path.slice('guest.'.length)];
      });
      expectRejected(frame, ErrorCode.PROTOCOL, [`offer.${path}: missing`]);
    },
  );
});

describe('payload presence', () => {
  const payloadless = examples.filter(
    (f) => f.type !== 'pages' && f.type !== 'deviceState' && f.type !== 'dedupResident' && f.type !== 'pageFingerprints' && f.type !== 'postcopy',
  );
  test.each(payloadless.map((f) => [f.type, f] as const))('%s with a payload', (type) => {
    const frame = rawFrame(headerOf(type), new Uint8Array([1]));
    expectRejected(frame, ErrorCode.PROTOCOL, [`${type}: unexpected payload of 1 bytes`]);
  });

  test('the payload of a payload-less frame is refused before it is buffered', () => {
    const header = packr.pack(headerOf('commit'));
    const decoder = new FrameDecoder();
    // Only prefix and header arrive; the 1 MiB payload never does.
    expectRejected(Buffer.concat([prefix(header.length, 1 << 20), header]), ErrorCode.PROTOCOL, ['unexpected payload'], decoder);
  });

  test('a bad pages header is refused before its payload is buffered', () => {
    const header = headerOf('pages');
    header.codec = 0;
    const headerBytes = packr.pack(header);
    expectRejected(Buffer.concat([prefix(headerBytes.length, 1 << 20), headerBytes]), ErrorCode.PROTOCOL, ['pages.codec']);
  });
});

describe('the encoder refuses what the decoder would reject', () => {
  const pages = example('pages');
  test.each([
    ['an unknown codec', Frame.pages({ ...pages, codec: 9 as Codec })],
    ['codec 0', Frame.pages({ ...pages, codec: Codec.invalid })],
    ['an unknown entry kind', Frame.pages({ ...pages, entries: Uint32Array.of(4, 0, 1) })],
    ['a ref entry without its source', Frame.pages({ ...pages, entries: Uint32Array.of(3, 0, 1), rawBytes: 0, payload: new Uint8Array(0) })],
    ['a 64-byte migration id... plus one', Frame.commit({ migrationId: 'x'.repeat(65) })],
    ['a digest of 8 bytes', Frame.verify({ migrationId: 'm', digests: [new Uint8Array(8)] })],
    ['a hello of another version', Frame.hello({ agentId: 'a', agentVersion: '9.0.0', features: [], maxPayloadBytes: 1 << 20, version: 99 })],
    ['a non-finite number', Frame.committed({ migrationId: 'm', resumeToSendMs: NaN })],
    ['a config key __proto__', Frame.offer({ ...example('offer'), guest: { ...example('offer').guest, config: JSON.parse('{"__proto__": 1}') } })],
    ['an unknown frame type', { type: 'bogus', migrationId: 'm' } as unknown as Frame],
  ])('%s', (_, frame) => {
    let error: unknown;
    try {
      encodeFrame(frame);
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(GangwayError);
    expect((error as GangwayError).code).toBe(ErrorCode.INTERNAL);
    expect((error as GangwayError).cause).toBeInstanceOf(ProtocolError);
  });

  test("a payload over the peer's announced limit", () => {
    const state = new Uint8Array(MIN_MAX_PAYLOAD_BYTES + 1);
    expect(() => encodeFrame(Frame.deviceState({ migrationId: 'm', offsetBytes: 0, totalBytes: state.length, state }), { maxPayloadBytes: MIN_MAX_PAYLOAD_BYTES })).toThrow(
      /over the peer's limit/,
    );
  });
});
