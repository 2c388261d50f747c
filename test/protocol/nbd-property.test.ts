// Property tests of the NBD codec (fast-check): valid traffic survives any chunking, and
// traffic with bytes overwritten at random makes each decoder and state machine throw
// nothing but a ProtocolError (the client's handshake also NbdOptionError: a server may
// refuse GO), while no allocation exceeds the limits it was given.
import fc from 'fast-check';
import { afterEach, describe, expect, test, vi } from 'vitest';
import { ProtocolError } from '../../protocol/errors.js';
import {
  Chunk,
  ClientHandshake,
  CommandFlag,
  type ExpectedReply,
  NBD_MAX_ERROR_CHUNK_BYTES,
  NBD_MAX_EXTENTS_PER_CHUNK,
  NBD_MAX_OPTION_DATA_BYTES,
  NBD_MAX_OPTION_REPLY_BYTES,
  type NbdCatalog,
  NbdCommand,
  NbdErrno,
  NbdInfo,
  NbdOption,
  NbdOptionError,
  NbdRep,
  type NbdRequest,
  ReplyDecoder,
  type ReplyFrame,
  RequestDecoder,
  ServerHandshake,
  TransmissionFlag,
  encodeClientFlags,
  encodeGreeting,
  encodeOption,
  encodeOptionReply,
  encodeRequest,
  encodeSimpleReply,
  goData,
  infoBlockSizeData,
  infoExportData,
  metaContextData,
  metaContextReplyData,
} from '../../protocol/nbd/index.js';

const cat = (parts: readonly Uint8Array[]) => Buffer.concat(parts);

/** Cuts `bytes` at the given fractions (sorted, deduplicated). */
function cut(bytes: Buffer, fractions: number[]): Buffer[] {
  const points = [...new Set(fractions.map((f) => Math.floor(f * bytes.length)))].sort((a, b) => a - b);
  const out: Buffer[] = [];
  let at = 0;
  for (const p of points) {
    out.push(bytes.subarray(at, p));
    at = p;
  }
  out.push(bytes.subarray(at));
  return out;
}

const cuts = fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 12 });

/** Overwrites bytes at random places (positions as fractions of the length). */
const mutations = fc.array(fc.tuple(fc.double({ min: 0, max: 1, noNaN: true, maxExcluded: true }), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 6 });
function mutate(bytes: Buffer, changes: [number, number][]): Buffer {
  const out = Buffer.from(bytes);
  for (const [at, value] of changes) if (out.length > 0) out[Math.floor(at * out.length)] = value;
  return out;
}

/** Records the largest allocation made while `f` runs. */
function largestAllocation(f: () => void): number {
  let largest = 0;
  const spies = (['alloc', 'allocUnsafe', 'allocUnsafeSlow'] as const).map((name) => {
    const original = Buffer[name].bind(Buffer) as (size: number, ...rest: unknown[]) => Buffer;
    return vi.spyOn(Buffer, name).mockImplementation(((size: number, ...rest: unknown[]) => {
      largest = Math.max(largest, size);
      return original(size, ...rest);
    }) as never);
  });
  try {
    f();
  } finally {
    for (const s of spies) s.mockRestore();
  }
  return largest;
}

afterEach(() => {
  vi.restoreAllMocks();
});

// ---- requests --------------------------------------------------------------------------

const MAX_TEST_PAYLOAD = 4096;
const cookie = fc.bigInt({ min: 0n, max: 2n ** 64n - 1n });
const offset = fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER });
const request: fc.Arbitrary<{ request: NbdRequest; payload?: Buffer }> = fc.oneof(
  fc
    .record({ cookie, offsetBytes: offset, data: fc.uint8Array({ maxLength: 300 }), flags: fc.constantFrom(0, CommandFlag.fua) })
    .map(({ cookie, offsetBytes, data, flags }) => ({
      request: { command: NbdCommand.write, flags, cookie, offsetBytes, lengthBytes: data.length },
      payload: Buffer.from(data),
    })),
  fc
    .record({
      command: fc.constantFrom(NbdCommand.read, NbdCommand.flush, NbdCommand.trim, NbdCommand.cache, NbdCommand.writeZeroes, NbdCommand.blockStatus, 9, 0xffff),
      flags: fc.integer({ min: 0, max: 0xffff }),
      cookie,
      offsetBytes: offset,
      lengthBytes: fc.integer({ min: 0, max: 0xffffffff }),
    })
    .map((request) => ({ request })),
);

describe('RequestDecoder', () => {
  test('any requests, any chunking: the same requests, WRITE data intact', () => {
    fc.assert(
      fc.property(fc.array(request, { maxLength: 20 }), cuts, (requests, fractions) => {
        const stream = cat(requests.flatMap((r) => encodeRequest(r.request, r.payload)));
        const d = new RequestDecoder();
        const out = cut(stream, fractions).flatMap((c) => d.push(c).map((r) => ({ ...r, ...(r.payload ? { payload: Buffer.from(r.payload) } : {}) })));
        expect(out).toEqual(requests.map((r) => (r.payload ? { ...r.request, payload: r.payload } : r.request)));
        expect(d.bufferedBytes).toBe(0);
      }),
      { numRuns: 300 },
    );
  });

  test('damaged request streams: ProtocolError or requests, allocations within the maximum payload', () => {
    fc.assert(
      fc.property(fc.array(request, { minLength: 1, maxLength: 8 }), mutations, cuts, (requests, changes, fractions) => {
        const stream = mutate(cat(requests.flatMap((r) => encodeRequest(r.request, r.payload))), changes);
        const d = new RequestDecoder({ maxPayloadBytes: MAX_TEST_PAYLOAD });
        const largest = largestAllocation(() => {
          try {
            for (const c of cut(stream, fractions)) d.push(c);
          } catch (error) {
            expect(error).toBeInstanceOf(ProtocolError);
          }
        });
        expect(largest).toBeLessThanOrEqual(MAX_TEST_PAYLOAD);
      }),
      { numRuns: 500 },
    );
  });
});

// ---- replies ---------------------------------------------------------------------------

interface Script {
  expected: [bigint, ExpectedReply][];
  stream: Buffer;
}

/** A READ answered by data and hole chunks in a shuffled order, the last one DONE. */
const readScript = (c: bigint) =>
  fc
    .record({
      offsetBytes: fc.integer({ min: 0, max: 2 ** 40 }),
      pieces: fc.array(fc.tuple(fc.integer({ min: 1, max: 64 }), fc.boolean()), { minLength: 1, maxLength: 6 }),
      order: fc.array(fc.nat(), { minLength: 6, maxLength: 6 }),
      seed: fc.integer({ min: 0, max: 255 }),
    })
    .map(({ offsetBytes, pieces, order, seed }) => {
      let at = offsetBytes;
      const chunks = pieces.map(([length, hole], i) => {
        const start = at;
        at += length;
        return { start, length, hole, data: Buffer.alloc(length, (seed + i) & 0xff) };
      });
      const shuffled = chunks.map((ch, i) => ({ ch, key: order[i] ?? 0 })).sort((a, b) => a.key - b.key).map((x) => x.ch);
      const lengthBytes = at - offsetBytes;
      // One buffer per chunk: chunks of different replies interleave, a chunk's own bytes do not.
      const parts: Uint8Array[] = shuffled.map((ch, i) => {
        const done = i === shuffled.length - 1;
        return ch.hole ? Chunk.offsetHole(c, ch.start, ch.length, done) : cat(Chunk.offsetData(c, ch.start, ch.data, done));
      });
      return { expect: { command: NbdCommand.read, offsetBytes, lengthBytes } as ExpectedReply, parts };
    });

const blockStatusScript = (c: bigint) =>
  fc
    .record({
      contexts: fc.integer({ min: 1, max: 3 }),
      extents: fc.array(fc.record({ lengthBytes: fc.integer({ min: 1, max: 0xffffffff }), flags: fc.integer({ min: 0, max: 0xffffffff }) }), { minLength: 1, maxLength: 10 }),
    })
    .map(({ contexts, extents }) => ({
      expect: { command: NbdCommand.blockStatus, offsetBytes: 0, lengthBytes: 1 << 30 } as ExpectedReply,
      parts: Array.from({ length: contexts }, (_, i) => Chunk.blockStatus(c, i + 1, extents, i === contexts - 1)) as Uint8Array[],
    }));

const otherScript = (c: bigint) =>
  fc.oneof(
    fc.constant({ expect: { command: NbdCommand.flush, offsetBytes: 0, lengthBytes: 0 } as ExpectedReply, parts: [cat(encodeSimpleReply(c, 0))] as Uint8Array[] }),
    fc.constant({ expect: { command: NbdCommand.write, offsetBytes: 0, lengthBytes: 1 } as ExpectedReply, parts: [Chunk.none(c)] as Uint8Array[] }),
    fc.string({ maxLength: 100 }).map((m) => ({
      expect: { command: NbdCommand.trim, offsetBytes: 0, lengthBytes: 1 } as ExpectedReply,
      parts: [Chunk.error(c, NbdErrno.EIO, m)] as Uint8Array[],
    })),
  );

const script: fc.Arbitrary<Script> = fc
  .array(fc.constantFrom('read', 'blockStatus', 'other'), { minLength: 1, maxLength: 6 })
  .chain((kinds) =>
    fc.tuple(...kinds.map((k, i) => (k === 'read' ? readScript(BigInt(i + 1)) : k === 'blockStatus' ? blockStatusScript(BigInt(i + 1)) : otherScript(BigInt(i + 1))))),
  )
  .chain((replies) =>
    // Interleave the replies' parts while keeping each reply's own order.
    fc.array(fc.nat({ max: replies.length - 1 }), { minLength: 40, maxLength: 40 }).map((picks) => {
      const queues = replies.map((r) => [...r.parts]);
      const parts: Uint8Array[] = [];
      for (const p of picks) {
        const q = queues[p]!.length > 0 ? queues[p]! : queues.find((x) => x.length > 0);
        if (q) parts.push(q.shift()!);
      }
      for (const q of queues) parts.push(...q);
      return { expected: replies.map((r, i) => [BigInt(i + 1), r.expect] as [bigint, ExpectedReply]), stream: cat(parts) };
    }),
  );

function decodeReplies(s: Script, chunks: Buffer[]): { frames: ReplyFrame[]; targets: Buffer[] } {
  const d = new ReplyDecoder({ structuredReplies: true });
  const targets: Buffer[] = [];
  for (const [c, e] of s.expected) {
    const target = e.command === NbdCommand.read ? Buffer.alloc(e.lengthBytes, 0x5a) : undefined;
    if (target) targets.push(target);
    d.expect(c, { ...e, ...(target ? { target } : {}) });
  }
  const frames = chunks.flatMap((c) => d.push(c));
  expect(d.outstanding).toBe(0);
  return { frames, targets };
}

describe('ReplyDecoder', () => {
  test('any interleaving of replies, any chunking: the same frames and the same data', () => {
    fc.assert(
      fc.property(script, cuts, (s, fractions) => {
        const whole = decodeReplies(s, [s.stream]);
        const chunked = decodeReplies(s, cut(s.stream, fractions));
        expect(chunked).toEqual(whole);
      }),
      { numRuns: 300 },
    );
  });

  test('damaged reply streams: ProtocolError or frames, allocations within the limits', () => {
    const bound = Math.max(4 + 8 * NBD_MAX_EXTENTS_PER_CHUNK, NBD_MAX_ERROR_CHUNK_BYTES);
    fc.assert(
      fc.property(script, mutations, cuts, (s, changes, fractions) => {
        const damaged = { ...s, stream: mutate(s.stream, changes) };
        const largest = largestAllocation(() => {
          const d = new ReplyDecoder({ structuredReplies: true });
          for (const [c, e] of damaged.expected) d.expect(c, { ...e, ...(e.command === NbdCommand.read ? { target: Buffer.alloc(e.lengthBytes) } : {}) });
          try {
            for (const c of cut(damaged.stream, fractions)) d.push(c);
          } catch (error) {
            expect(error).toBeInstanceOf(ProtocolError);
          }
        });
        // Targets are the test's own (at most 6 × 64 × 6 bytes); the decoder adds at most a chunk within its limits.
        expect(largest).toBeLessThanOrEqual(bound);
      }),
      { numRuns: 500 },
    );
  });
});

// ---- handshakes ------------------------------------------------------------------------

const catalog: NbdCatalog = (() => {
  const e = {
    name: 'd',
    sizeBytes: 1 << 20,
    transmissionFlags: TransmissionFlag.sendFlush,
    blockSizes: { minimumBytes: 1, preferredBytes: 4096, maximumBytes: 1 << 25 },
    metaContexts: ['qemu:dirty-bitmap:b'],
  };
  return { find: (n: string) => (n === 'd' ? e : undefined), list: () => [e] };
})();

const name = fc.oneof(fc.constant('d'), fc.string({ maxLength: 20 }));
const queries = fc.array(fc.oneof(fc.constantFrom('base:allocation', 'base:', 'qemu:', 'qemu:dirty-bitmap:b'), fc.string({ maxLength: 20 })), { maxLength: 5 });
const clientOption: fc.Arbitrary<Buffer> = fc.oneof(
  fc.tuple(fc.constantFrom(NbdOption.info, NbdOption.go), name, fc.array(fc.integer({ min: 0, max: 5 }), { maxLength: 5 })).map(([o, n, infos]) => cat(encodeOption(o, goData(n.replace(/\0/g, ''), infos)))),
  fc.tuple(fc.constantFrom(NbdOption.listMetaContext, NbdOption.setMetaContext), name, queries).map(([o, n, q]) =>
    cat(encodeOption(o, metaContextData(n.replace(/\0/g, ''), q.map((x) => x.replace(/\0/g, ''))))),
  ),
  fc.constantFrom(NbdOption.list, NbdOption.structuredReply, NbdOption.startTls, NbdOption.abort).map((o) => cat(encodeOption(o))),
  fc.tuple(fc.integer({ min: 0, max: 0xffffffff }), fc.uint8Array({ maxLength: 64 })).map(([o, data]) => cat(encodeOption(o, data))),
);

describe('ServerHandshake', () => {
  test('any options, damaged or not: replies or a ProtocolError, allocations within the option limit', () => {
    fc.assert(
      fc.property(fc.array(clientOption, { maxLength: 12 }), fc.option(mutations, { nil: undefined }), cuts, (options, changes, fractions) => {
        let stream: Buffer = cat([encodeClientFlags(3), ...options]);
        if (changes !== undefined) stream = mutate(stream, changes);
        const s = new ServerHandshake(catalog);
        const largest = largestAllocation(() => {
          try {
            for (const c of cut(stream, fractions)) {
              if (s.state === 'done') break;
              s.push(c);
            }
          } catch (error) {
            expect(error).toBeInstanceOf(ProtocolError);
          }
        });
        expect(largest).toBeLessThanOrEqual(NBD_MAX_OPTION_DATA_BYTES);
      }),
      { numRuns: 500 },
    );
  });
});

const serverReply: fc.Arbitrary<Buffer> = fc.oneof(
  fc.constant(cat(encodeOptionReply(NbdOption.structuredReply, NbdRep.ack))),
  fc.constant(cat(encodeOptionReply(NbdOption.setMetaContext, NbdRep.metaContext, metaContextReplyData(1, 'base:allocation')))),
  fc.constant(cat(encodeOptionReply(NbdOption.setMetaContext, NbdRep.ack))),
  fc.integer({ min: 0, max: 2 ** 53 }).map((size) => cat(encodeOptionReply(NbdOption.go, NbdRep.info, infoExportData(size, 1)))),
  fc.constant(cat(encodeOptionReply(NbdOption.go, NbdRep.info, infoBlockSizeData({ minimumBytes: 512, preferredBytes: 4096, maximumBytes: 1 << 20 })))),
  fc.constant(cat(encodeOptionReply(NbdOption.go, NbdRep.ack))),
  fc.constantFrom(NbdRep.errUnsup, NbdRep.errUnknown, NbdRep.errPolicy).map((t) => cat(encodeOptionReply(NbdOption.go, t, Buffer.from('no')))),
  fc.tuple(fc.integer({ min: 0, max: 0xffffffff }), fc.integer({ min: 0, max: 0xffffffff }), fc.uint8Array({ maxLength: 64 })).map(([o, t, d]) => cat(encodeOptionReply(o, t, d))),
);

describe('ClientHandshake', () => {
  test('any server replies, damaged or not: done, a ProtocolError or an NbdOptionError; allocations within the reply limit', () => {
    fc.assert(
      fc.property(fc.array(serverReply, { maxLength: 10 }), fc.option(mutations, { nil: undefined }), cuts, (replies, changes, fractions) => {
        let stream: Buffer = cat([encodeGreeting(3), ...replies]);
        if (changes !== undefined) stream = mutate(stream, changes);
        const c = new ClientHandshake({ exportName: 'd', metaContexts: ['base:allocation'] });
        const largest = largestAllocation(() => {
          try {
            for (const piece of cut(stream, fractions)) {
              if (c.state === 'done') break;
              c.push(piece);
            }
          } catch (error) {
            expect(error instanceof ProtocolError || error instanceof NbdOptionError).toBe(true);
          }
        });
        expect(largest).toBeLessThanOrEqual(NBD_MAX_OPTION_REPLY_BYTES);
      }),
      { numRuns: 500 },
    );
  });

  test('a GO with the block size asked for is what the client sends', () => {
    const c = new ClientHandshake({ exportName: 'd', structuredReplies: false });
    const sent = cat(c.push(encodeGreeting(3)).send);
    expect(sent.subarray(20).equals(goData('d', [NbdInfo.blockSize, NbdInfo.description]))).toBe(true);
  });
});
