// Property tests of the codec (fast-check): any valid frame survives any chunking, and no
// input makes the decoder throw anything but a ProtocolError.
import fc from 'fast-check';
import { Packr } from 'msgpackr';
import { describe, expect, test } from 'vitest';
import { exampleFrames } from '../../protocol/examples.js';
import {
  Codec,
  DEFAULT_MAX_PAYLOAD_BYTES,
  DIGEST_BYTES,
  EntryKind,
  Frame,
  FrameDecoder,
  GuestKind,
  MAX_REGION_BYTES,
  MAX_REGION_PAGES,
  MAX_ROUND,
  MIN_MAX_PAYLOAD_BYTES,
  ProtocolError,
  RejectReason,
  Technique,
  encodeFrame,
} from '../../protocol/index.js';
import { plain, wire } from '../helpers/frames.js';

// ---- arbitraries of valid frames ----------------------------------------------------------

const id = fc.stringMatching(/^[A-Za-z0-9._:-]{1,64}$/);
const name = fc.stringMatching(/^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$/);
const text = fc.string({ maxLength: 1024, unit: 'grapheme' }).filter((s) => s.length <= 1024);
const errorCode = fc.stringMatching(/^GANGWAY_ERR_[A-Z0-9_]{1,52}$/);
const digests = fc.array(fc.uint8Array({ minLength: DIGEST_BYTES, maxLength: DIGEST_BYTES }), { minLength: 1, maxLength: 16 });
const finite = (min: number, max: number) =>
  fc.double({ min, max, noNaN: true, noDefaultInfinity: true }).map((x) => (Object.is(x, -0) ? 0 : x));
const codeOf = <T extends Record<string, number>>(table: T) =>
  fc.constantFrom(...Object.values(table).filter((v) => v !== 0)) as fc.Arbitrary<Exclude<T[keyof T], 0>>;

const region = fc
  .record({ name, pageShift: fc.integer({ min: 9, max: 20 }), pages: fc.double({ min: 0, max: 1, noNaN: true }) })
  .map(({ name, pageShift, pages }) => {
    const pageSizeBytes = 2 ** pageShift;
    const maxPages = Math.min(MAX_REGION_PAGES, MAX_REGION_BYTES / pageSizeBytes);
    return { name, pageSizeBytes, lengthBytes: Math.max(1, Math.floor(pages * maxPages)) * pageSizeBytes };
  });

const configValue = fc.oneof(fc.string({ maxLength: 1024 }), finite(-1e300, 1e300), fc.integer(), fc.boolean());
const config = fc.dictionary(
  fc.string({ minLength: 1, maxLength: 64 }).filter((k) => k !== '__proto__'),
  configValue,
  { maxKeys: 64, noNullPrototype: true },
);

const entries = fc
  .array(
    fc.tuple(
      fc.constantFrom(EntryKind.zero, EntryKind.data),
      fc.integer({ min: 0, max: 0xffffffff }),
      fc.integer({ min: 1, max: 0xffffffff }),
    ),
    { minLength: 1, maxLength: 64 },
  )
  .map((triples) => Uint32Array.from(triples.flat()));

const frameArb: fc.Arbitrary<Frame> = fc.oneof(
  fc
    .record({
      agentId: id,
      agentVersion: fc.stringMatching(/^[0-9A-Za-z][0-9A-Za-z.+~-]{0,63}$/),
      features: fc.uniqueArray(fc.stringMatching(/^[A-Za-z0-9._-]{1,32}$/), { maxLength: 32 }),
      maxPayloadBytes: fc.integer({ min: MIN_MAX_PAYLOAD_BYTES, max: DEFAULT_MAX_PAYLOAD_BYTES }),
    })
    .map(Frame.hello),
  fc
    .record({
      migrationId: id,
      guest: fc.record({
        name,
        kind: codeOf(GuestKind),
        regions: fc.uniqueArray(region, { minLength: 1, maxLength: 16, selector: (r) => r.name }),
        config,
      }),
      technique: codeOf(Technique),
      downtimeBudgetMs: finite(1, 600_000),
      codecs: fc.uniqueArray(codeOf(Codec), { minLength: 1 }),
    })
    .map(Frame.offer),
  fc.record({ migrationId: id, creditBytes: fc.integer({ min: 1, max: 2 ** 30 }), secret: fc.uint8Array({ minLength: 32, maxLength: 32 }) }).map(Frame.accept),
  fc.record({ migrationId: id, reason: codeOf(RejectReason), message: text }).map(Frame.reject),
  fc
    .record({
      migrationId: id,
      region: fc.integer({ min: 0, max: 15 }),
      round: fc.integer({ min: 0, max: MAX_ROUND }),
      codec: codeOf(Codec),
      entries,
      rawBytes: fc.integer({ min: 0, max: DEFAULT_MAX_PAYLOAD_BYTES }),
      payload: fc.uint8Array({ maxLength: 2048 }),
    })
    .map(Frame.pages),
  fc
    .record({
      migrationId: id,
      round: fc.integer({ min: 0, max: MAX_ROUND }),
      pageCount: fc.integer({ min: 0, max: 2 ** 36 }),
      final: fc.boolean(),
    })
    .map(Frame.roundEnd),
  fc.record({ migrationId: id }).map(Frame.pause),
  fc
    .record({ migrationId: id, offsetBytes: fc.nat(1 << 20), after: fc.nat(1 << 20), state: fc.uint8Array({ minLength: 1, maxLength: 2048 }) })
    .map(({ after, ...f }) => Frame.deviceState({ ...f, totalBytes: f.offsetBytes + f.state.length + after })),
  fc.record({ migrationId: id, digests }).map(Frame.verify),
  fc.record({ migrationId: id, match: fc.boolean(), digests }).map(Frame.verified),
  fc.record({ migrationId: id }).map(Frame.commit),
  fc.record({ migrationId: id, resumeToSendMs: finite(0, 1e15) }).map(Frame.committed),
  fc.record({ migrationId: id, code: errorCode, message: text }).map(Frame.abort),
  fc.record({ migrationId: id, bytes: fc.integer({ min: 1, max: 2 ** 30 }) }).map(Frame.credit),
  fc.record({ code: errorCode, message: text }).map(Frame.error),
);

/** Feeds `bytes` in chunks of the given sizes (cycled); returns the frames. */
function pushChunked(bytes: Uint8Array, sizes: number[]): Frame[] {
  const decoder = new FrameDecoder();
  const out: Frame[] = [];
  for (let at = 0, i = 0; at < bytes.length; i++) {
    const size = sizes[i % sizes.length]!;
    out.push(...decoder.push(bytes.subarray(at, at + size)));
    at += size;
  }
  expect(decoder.bufferedBytes).toBe(0);
  return out;
}

/**
 * Pushes untrusted bytes: the only error allowed is a ProtocolError, and every frame that
 * comes out is valid (the encoder takes it back without complaint).
 */
function pushUntrusted(bytes: Uint8Array, chunkSize = bytes.length || 1): void {
  const decoder = new FrameDecoder();
  try {
    for (let at = 0; at < bytes.length; at += chunkSize) {
      for (const frame of decoder.push(bytes.subarray(at, at + chunkSize))) {
        expect(plain(new FrameDecoder().push(wire(frame))[0])).toEqual(plain(frame));
      }
    }
  } catch (error) {
    if (!(error instanceof ProtocolError)) throw error;
    expect(error.code).toMatch(/^GANGWAY_ERR_/);
  }
}

function withPrefix(header: Uint8Array, payloadLength = 0): Buffer {
  const prefix = Buffer.alloc(8);
  prefix.writeUInt32BE(header.length, 0);
  prefix.writeUInt32BE(payloadLength, 4);
  return Buffer.concat([prefix, header, Buffer.alloc(payloadLength, 0xab)]);
}

describe('valid frames', () => {
  test('round-trip under random chunkings', () => {
    fc.assert(
      fc.property(fc.array(frameArb, { minLength: 1, maxLength: 8 }), fc.array(fc.integer({ min: 1, max: 300 }), { minLength: 1, maxLength: 20 }), (frames, sizes) => {
        const bytes = Buffer.concat(frames.map(wire));
        expect(pushChunked(bytes, sizes).map(plain)).toEqual(frames.map(plain));
      }),
      { numRuns: 300 },
    );
  });
});

describe('untrusted bytes never throw anything but ProtocolError', () => {
  test('random bytes', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 512 }), fc.integer({ min: 1, max: 64 }), (bytes, chunk) => pushUntrusted(bytes, chunk)),
      { numRuns: 2000 },
    );
  });

  test('random bytes behind a well-formed prefix (they reach the msgpack decoder)', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 1, maxLength: 512 }), fc.nat({ max: 64 }), (header, payloadLength) =>
        pushUntrusted(withPrefix(header, payloadLength)),
      ),
      { numRuns: 3000 },
    );
  });

  test('random msgpack values as headers', () => {
    const value = fc.oneof(
      fc.anything({ withBoxedValues: false, withMap: true, withSet: true, withDate: true, withTypedArray: true, withBigInt: true, withNullPrototype: true }),
      fc.record({ t: fc.integer({ min: -2, max: 20 }) }, { requiredKeys: [] }).chain((base) =>
        fc.dictionary(fc.constantFrom('migrationId', 'region', 'round', 'codec', 'entries', 'rawBytes', 'digests', 'x'), fc.anything()).map((rest) => ({ ...rest, ...base })),
      ),
    );
    fc.assert(
      fc.property(value, fc.nat({ max: 16 }), (header, payloadLength) => {
        let bytes: Uint8Array;
        try {
          bytes = new Packr({ useRecords: false, structuredClone: true, moreTypes: true }).pack(header);
        } catch {
          return; // not packable at all
        }
        pushUntrusted(withPrefix(bytes, payloadLength));
      }),
      { numRuns: 2000 },
    );
  });

  test('valid frames with random bytes overwritten', () => {
    const frames = exampleFrames().map(wire);
    fc.assert(
      fc.property(
        fc.constantFrom(...frames),
        fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 6 }),
        (original, edits) => {
          const bytes = Buffer.from(original);
          for (const [at, value] of edits) bytes[at % bytes.length] = value;
          pushUntrusted(bytes);
        },
      ),
      { numRuns: 5000 },
    );
  });

  test('valid frames cut short and followed by another frame', () => {
    const frames = exampleFrames().map(wire);
    fc.assert(
      fc.property(fc.constantFrom(...frames), fc.constantFrom(...frames), fc.nat(), (a, b, cut) => {
        pushUntrusted(Buffer.concat([a.subarray(0, cut % a.length), b]));
      }),
      { numRuns: 1000 },
    );
  });
});
