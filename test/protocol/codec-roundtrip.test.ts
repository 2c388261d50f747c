// Encode -> decode of every frame type, whole and split at every byte.
import { Unpackr } from 'msgpackr';
import { describe, expect, test } from 'vitest';
import { exampleFrames, largestFrames } from '../../protocol/examples.js';
import {
  Codec,
  EntryKind,
  FRAME_PREFIX_BYTES,
  Frame,
  FrameDecoder,
  FrameType,
  MAX_HEADER_BYTES,
  PROTOCOL_VERSION,
  type PagesFrame,
  encodeFrame,
} from '../../protocol/index.js';
import { plain, wire } from '../helpers/frames.js';
import { checkPlainMsgpack } from '../../protocol/msgpack-scan.js';

function decodeOne(bytes: Uint8Array, decoder = new FrameDecoder()): Frame {
  const frames = decoder.push(bytes);
  expect(frames).toHaveLength(1);
  expect(decoder.bufferedBytes).toBe(0);
  return frames[0]!;
}

const examples = exampleFrames();
const pagesExample = examples.find((f): f is PagesFrame => f.type === 'pages')!;

describe('round trip', () => {
  test('the examples cover every frame type', () => {
    const names = Object.keys(FrameType).filter((name) => name !== 'invalid');
    expect([...new Set(examples.map((f) => f.type))].sort()).toEqual([...names].sort());
    expect([...new Set(largestFrames().map((f) => f.type))].sort()).toEqual([...names].sort());
  });

  test.each(examples.map((f) => [f.type, f] as const))('%s', (_, frame) => {
    expect(plain(decodeOne(wire(frame)))).toEqual(plain(frame));
  });

  test.each(largestFrames().map((f) => [f.type, f] as const))('%s at its largest legal size', (_, frame) => {
    const bytes = wire(frame);
    expect(bytes.readUInt32BE(0)).toBeLessThanOrEqual(MAX_HEADER_BYTES);
    expect(plain(decodeOne(bytes))).toEqual(plain(frame));
  });

  test('the prefix holds the header and payload lengths, big-endian', () => {
    const [head, payload] = encodeFrame(pagesExample);
    expect(head.readUInt32BE(0)).toBe(head.length - FRAME_PREFIX_BYTES);
    expect(head.readUInt32BE(4)).toBe(pagesExample.payload.length);
    expect(payload).toBeDefined();
  });

  test('the encoder hands back the frame payload itself, never a copy', () => {
    const [, payload] = encodeFrame(pagesExample);
    expect(payload).toBe(pagesExample.payload);
    const state = new Uint8Array(10);
    expect(encodeFrame(Frame.deviceState({ migrationId: 'm', offsetBytes: 0, totalBytes: 10, state }))[1]).toBe(state);
  });

  test('a frame without payload bytes encodes to one buffer', () => {
    expect(encodeFrame(Frame.commit({ migrationId: 'm' }))).toHaveLength(1);
    expect(encodeFrame(Frame.postcopy({ migrationId: 'm', region: 0, more: false, missing: new Uint32Array(0) }))).toHaveLength(1);
    const zeroOnly = Frame.pages({
      migrationId: 'm',
      region: 0,
      round: 0,
      codec: Codec.raw,
      entries: Uint32Array.of(EntryKind.zero, 0, 100),
      rawBytes: 0,
      payload: new Uint8Array(0),
    });
    const [head, payload] = encodeFrame(zeroOnly);
    expect(payload).toBeUndefined();
    expect(plain(decodeOne(head))).toEqual(plain(zeroOnly));
  });

  test('the header is plain msgpack: no extension types, decodable by a generic unpacker', () => {
    for (const frame of [...examples, ...largestFrames()]) {
      const [head] = encodeFrame(frame);
      const header = head.subarray(FRAME_PREFIX_BYTES);
      expect(checkPlainMsgpack(header, 8)).toBeUndefined();
      const generic = new Unpackr({ mapsAsObjects: true }).unpack(header) as Record<string, unknown>;
      expect(generic['t']).toBe(FrameType[frame.type]);
    }
  });

  test('decodes a header written by another msgpack implementation (fixmap, fixstr)', () => {
    // {"t": 11, "migrationId": "m-1"} as a minimal encoder writes it.
    const header = Buffer.from([
      0x82, 0xa1, 0x74, 0x0b, 0xab, ...Buffer.from('migrationId'), 0xa3, ...Buffer.from('m-1'),
    ]);
    const prefix = Buffer.alloc(8);
    prefix.writeUInt32BE(header.length, 0);
    expect(decodeOne(Buffer.concat([prefix, header]))).toEqual(Frame.commit({ migrationId: 'm-1' }));
  });

  test('the decoded payload is a view of the received chunk (zero-copy)', () => {
    const bytes = wire(pagesExample);
    const frame = decodeOne(bytes) as PagesFrame;
    expect(frame.payload.buffer).toBe(bytes.buffer);
    expect(frame.payload.byteOffset).toBe(bytes.byteOffset + bytes.length - pagesExample.payload.length);
  });

  test('entries at an unaligned offset come back as an aligned Uint32Array copy', () => {
    const bytes = wire(pagesExample);
    for (let shift = 0; shift < 4; shift++) {
      const buffer = Buffer.alloc(bytes.length + shift);
      bytes.copy(buffer, shift);
      const frame = decodeOne(buffer.subarray(shift)) as PagesFrame;
      expect(frame.entries).toBeInstanceOf(Uint32Array);
      expect(frame.entries.byteOffset % 4).toBe(0);
      expect(Array.from(frame.entries)).toEqual(Array.from(pagesExample.entries));
    }
  });

  test('a plain Uint8Array chunk (not a Buffer) decodes the same', () => {
    const bytes = wire(pagesExample);
    const copy = new Uint8Array(bytes.length);
    copy.set(bytes);
    expect(plain(decodeOne(copy))).toEqual(plain(pagesExample));
  });

  test('hello fills in magic and version', () => {
    const hello = Frame.hello({ agentId: 'a', agentVersion: '0.1.0', features: [], maxPayloadBytes: 1 << 20 });
    expect(hello).toMatchObject({ type: 'hello', magic: 'GWAY', version: PROTOCOL_VERSION });
  });
});

describe('chunking', () => {
  test.each(examples.map((f) => [f.type, f] as const))('%s split at every byte offset', (_, frame) => {
    const bytes = wire(frame);
    const expected = plain(frame);
    for (let cut = 1; cut < bytes.length; cut++) {
      const decoder = new FrameDecoder();
      expect(decoder.push(bytes.subarray(0, cut))).toEqual([]);
      expect(decoder.bufferedBytes).toBe(cut);
      const frames = decoder.push(bytes.subarray(cut));
      expect(frames).toHaveLength(1);
      expect(plain(frames[0])).toEqual(expected);
      expect(decoder.bufferedBytes).toBe(0);
    }
  });

  test('three-way splits: every pair of cuts in a commit frame, a lattice of cuts in a pages frame', () => {
    const cases: [Frame, number][] = [
      [Frame.commit({ migrationId: 'mig-0001' }), 1],
      [pagesExample, 7],
    ];
    for (const [frame, step] of cases) {
      const bytes = wire(frame);
      const expected = plain(frame);
      for (let i = 1; i < bytes.length - 1; i += step) {
        for (let j = i + 1; j < bytes.length; j += step) {
          const decoder = new FrameDecoder();
          const frames = [
            ...decoder.push(bytes.subarray(0, i)),
            ...decoder.push(bytes.subarray(i, j)),
            ...decoder.push(bytes.subarray(j)),
          ];
          expect(frames).toHaveLength(1);
          expect(plain(frames[0])).toEqual(expected);
        }
      }
    }
  });

  test('many frames concatenated in one chunk come out in order', () => {
    const frames = [...examples, ...examples, ...examples];
    const decoder = new FrameDecoder();
    const out = decoder.push(Buffer.concat(frames.map(wire)));
    expect(out.map(plain)).toEqual(frames.map(plain));
    expect(decoder.bufferedBytes).toBe(0);
  });

  test('a stream fed one byte at a time', () => {
    const bytes = Buffer.concat(examples.map(wire));
    const decoder = new FrameDecoder();
    const out: Frame[] = [];
    for (let i = 0; i < bytes.length; i++) out.push(...decoder.push(bytes.subarray(i, i + 1)));
    expect(out.map(plain)).toEqual(examples.map(plain));
  });

  test('chunks that end mid-frame and start the next frame in the same chunk', () => {
    const bytes = Buffer.concat(examples.map(wire));
    // Deterministic uneven chunk sizes (1..97 bytes).
    let seed = 12345;
    const decoder = new FrameDecoder();
    const out: Frame[] = [];
    let largestBuffered = 0;
    for (let at = 0; at < bytes.length; ) {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      const size = 1 + (seed % 97);
      out.push(...decoder.push(bytes.subarray(at, at + size)));
      largestBuffered = Math.max(largestBuffered, decoder.bufferedBytes);
      at += size;
    }
    expect(out.map(plain)).toEqual(examples.map(plain));
    // Never more than one frame's bytes held.
    expect(largestBuffered).toBeLessThan(Math.max(...examples.map((f) => wire(f).length)));
  });

  test('an empty chunk is fine anywhere', () => {
    const bytes = wire(pagesExample);
    const decoder = new FrameDecoder();
    expect(decoder.push(new Uint8Array(0))).toEqual([]);
    expect(decoder.push(bytes.subarray(0, 20))).toEqual([]);
    expect(decoder.push(new Uint8Array(0))).toEqual([]);
    expect(decoder.push(bytes.subarray(20))).toHaveLength(1);
  });

  test('a split largest pages frame is reassembled into one buffer', () => {
    const frame = largestFrames().find((f) => f.type === 'pages')!;
    const bytes = wire(frame);
    const decoder = new FrameDecoder();
    const half = bytes.length >> 1;
    expect(decoder.push(bytes.subarray(0, half))).toEqual([]);
    expect(decoder.bufferedBytes).toBe(half);
    const out = decoder.push(bytes.subarray(half));
    expect(plain(out[0])).toEqual(plain(frame));
  });
});
