// The NBD handshake, both sides, in memory. A whole session (handshake, then requests and
// out-of-order replies) is recorded once, then each side is fed the other's bytes cut at
// every byte offset and one byte at a time, and must do exactly the same. Then each option
// and each refusal the spec describes, one at a time.
import { afterEach, describe, expect, test, vi } from 'vitest';
import { ErrorCode, ProtocolError } from '../../protocol/errors.js';
import {
  ClientHandshake,
  type ClientHandshakeOptions,
  type ClientNegotiated,
  Chunk,
  CommandFlag,
  type DecodedRequest,
  NBD_EXPORT_NAME_ZEROES,
  NBD_INIT_MAGIC,
  NBD_MAX_HANDSHAKE_OPTIONS,
  NBD_MAX_OPTION_DATA_BYTES,
  NBD_MAX_OPTION_REPLY_BYTES,
  NBD_OLDSTYLE_MAGIC,
  NBD_OPTS_MAGIC,
  type NbdCatalog,
  NbdCommand,
  NbdErrno,
  type NbdExportDescription,
  NbdInfo,
  NbdOption,
  NbdOptionError,
  NbdRep,
  ReplyDecoder,
  type ReplyFrame,
  RequestDecoder,
  ServerHandshake,
  type ServerHandshakeOutcome,
  TransmissionFlag,
  encodeClientFlags,
  encodeExportNameReply,
  encodeOption,
  encodeOptionReply,
  encodeRequest,
  encodeSimpleReply,
  exportNameData,
  goData,
  infoExportData,
  metaContextData,
  metaContextReplyData,
  parseInfoReply,
  parseMetaContextReply,
  parseServerReply,
} from '../../protocol/nbd/index.js';

const MiB = 1024 * 1024;
const exportsList: NbdExportDescription[] = [
  {
    name: 'disk0',
    description: 'the first disk',
    sizeBytes: 64 * MiB,
    transmissionFlags: TransmissionFlag.sendFlush | TransmissionFlag.sendFua | TransmissionFlag.sendWriteZeroes,
    blockSizes: { minimumBytes: 1, preferredBytes: 4096, maximumBytes: 32 * MiB },
    metaContexts: ['qemu:dirty-bitmap:bm0'],
  },
  {
    name: 'ro',
    sizeBytes: 4096,
    transmissionFlags: TransmissionFlag.readOnly,
    blockSizes: { minimumBytes: 512, preferredBytes: 4096, maximumBytes: MiB },
    metaContexts: [],
  },
];
const catalog: NbdCatalog = { find: (n) => exportsList.find((e) => e.name === n), list: () => exportsList };

const cat = (parts: Uint8Array[]) => Buffer.concat(parts);

// ---- a whole session, recorded ------------------------------------------------------------

const CLIENT_OPTIONS: ClientHandshakeOptions = { exportName: 'disk0', metaContexts: ['base:allocation', 'qemu:dirty-bitmap:bm0'] };

/** The handshake played between the two state machines, whole messages at a time. */
function recordHandshake(options: ClientHandshakeOptions): { c2s: Buffer; s2c: Buffer; negotiated: ClientNegotiated } {
  const server = new ServerHandshake(catalog);
  const client = new ClientHandshake(options);
  const c2s: Buffer[] = [];
  const s2c: Buffer[] = [server.greeting()];
  let toClient = [server.greeting()];
  for (let round = 0; round < 20; round++) {
    const cs = client.push(cat(toClient));
    c2s.push(...cs.send.map((b) => Buffer.from(b)));
    if (cs.done) return { c2s: cat(c2s), s2c: cat(s2c), negotiated: cs.done.negotiated };
    const ss = server.push(cat(cs.send));
    toClient = ss.send.map((b) => Buffer.from(b));
    s2c.push(...toClient);
  }
  throw new Error('handshake did not finish');
}

const payload = Buffer.from(Array.from({ length: 50 }, (_, i) => i));
const REQUESTS = [
  { command: NbdCommand.read, flags: 0, cookie: 1n, offsetBytes: 0, lengthBytes: 100 },
  { command: NbdCommand.write, flags: CommandFlag.fua, cookie: 2n, offsetBytes: 4096, lengthBytes: 50 },
  { command: NbdCommand.blockStatus, flags: 0, cookie: 3n, offsetBytes: 0, lengthBytes: MiB },
  { command: NbdCommand.read, flags: 0, cookie: 4n, offsetBytes: 8192, lengthBytes: 10 },
  { command: NbdCommand.flush, flags: 0, cookie: 5n, offsetBytes: 0, lengthBytes: 0 },
];
const readData = Buffer.alloc(60, 0xab);
/** Out of order, chunks of one reply interleaved with others. */
const REPLIES = cat([
  Chunk.blockStatus(3n, 1, [{ lengthBytes: 4096, flags: 0 }, { lengthBytes: MiB, flags: 3 }], false),
  ...Chunk.offsetData(1n, 0, readData, false),
  ...encodeSimpleReply(5n, 0),
  Chunk.offsetHole(1n, 60, 40, true),
  Chunk.blockStatus(3n, 2, [{ lengthBytes: MiB, flags: 1 }], true),
  ...encodeSimpleReply(2n, 0),
  Chunk.error(4n, NbdErrno.EIO, 'bad sector'),
]);

const recorded = recordHandshake(CLIENT_OPTIONS);
const C2S = cat([recorded.c2s, ...REQUESTS.map((r) => cat(encodeRequest(r, r.command === NbdCommand.write ? payload : undefined)))]);
const S2C = cat([recorded.s2c, REPLIES]);

interface ServerResult {
  sent: Buffer;
  outcome: ServerHandshakeOutcome | undefined;
  requests: DecodedRequest[];
}

function serverSide(chunks: Buffer[]): ServerResult {
  const hs = new ServerHandshake(catalog);
  const sent: Uint8Array[] = [hs.greeting()];
  let decoder: RequestDecoder | undefined;
  let outcome: ServerHandshakeOutcome | undefined;
  const requests: DecodedRequest[] = [];
  const take = (rs: DecodedRequest[]) => requests.push(...rs.map((r) => ({ ...r, ...(r.payload ? { payload: Buffer.from(r.payload) } : {}) })));
  for (const chunk of chunks) {
    if (decoder === undefined) {
      const step = hs.push(chunk);
      sent.push(...step.send);
      if (step.outcome !== undefined) {
        outcome = step.outcome;
        if (outcome.kind === 'transmission') {
          decoder = new RequestDecoder();
          for (const rest of outcome.rest) take(decoder.push(rest));
        }
      }
    } else {
      take(decoder.push(chunk));
    }
  }
  return { sent: cat(sent), outcome: outcome === undefined ? undefined : ({ ...outcome, rest: [] } as ServerHandshakeOutcome), requests };
}

interface ClientResult {
  sent: Buffer;
  negotiated: ClientNegotiated | undefined;
  frames: ReplyFrame[];
  reads: Map<bigint, Buffer>;
}

function clientSide(chunks: Buffer[]): ClientResult {
  const hs = new ClientHandshake(CLIENT_OPTIONS);
  const sent: Uint8Array[] = [];
  let decoder: ReplyDecoder | undefined;
  let negotiated: ClientNegotiated | undefined;
  const frames: ReplyFrame[] = [];
  const reads = new Map<bigint, Buffer>();
  for (const chunk of chunks) {
    if (decoder === undefined) {
      const step = hs.push(chunk);
      sent.push(...step.send);
      if (step.done !== undefined) {
        negotiated = step.done.negotiated;
        decoder = new ReplyDecoder({ structuredReplies: negotiated.structuredReplies });
        for (const r of REQUESTS) {
          const target = r.command === NbdCommand.read ? Buffer.alloc(r.lengthBytes, 0xee) : undefined;
          if (target) reads.set(r.cookie, target);
          decoder.expect(r.cookie, { command: r.command, offsetBytes: r.offsetBytes, lengthBytes: r.lengthBytes, ...(target ? { target } : {}) });
        }
        for (const rest of step.done.rest) frames.push(...decoder.push(rest));
      }
    } else {
      frames.push(...decoder.push(chunk));
    }
  }
  return { sent: cat(sent), negotiated, frames, reads };
}

describe('a whole session', () => {
  const serverRef = serverSide([C2S]);
  const clientRef = clientSide([S2C]);

  test('negotiates what both sides asked for', () => {
    expect(recorded.negotiated).toEqual({
      exportName: 'disk0',
      sizeBytes: 64 * MiB,
      transmissionFlags:
        TransmissionFlag.hasFlags | TransmissionFlag.sendFlush | TransmissionFlag.sendFua | TransmissionFlag.sendWriteZeroes | TransmissionFlag.sendDf,
      blockSizes: { minimumBytes: 1, preferredBytes: 4096, maximumBytes: 32 * MiB },
      structuredReplies: true,
      metaContexts: new Map([
        [1, 'base:allocation'],
        [2, 'qemu:dirty-bitmap:bm0'],
      ]),
      description: 'the first disk',
      via: 'go',
    });
    expect(serverRef.outcome?.kind).toBe('transmission');
    const n = (serverRef.outcome as Extract<ServerHandshakeOutcome, { kind: 'transmission' }>).negotiated;
    expect([n.export.name, n.structuredReplies, n.blockSizesRequested, [...n.metaContexts]]).toEqual([
      'disk0', true, true, [[1, 'base:allocation'], [2, 'qemu:dirty-bitmap:bm0']],
    ]);
    // The recording is what the server itself answers.
    expect(serverRef.sent.equals(recorded.s2c)).toBe(true);
  });

  test('the server reads the requests that follow GO, the WRITE with its data', () => {
    expect(serverRef.requests.map(({ payload: p, ...r }) => r)).toEqual(REQUESTS);
    expect(serverRef.requests[1]!.payload!.equals(payload)).toBe(true);
  });

  test('the client reassembles replies that came out of order', () => {
    expect(clientRef.sent.equals(recorded.c2s)).toBe(true);
    expect(clientRef.frames.map((f) => [f.kind, f.cookie, f.kind === 'chunk' ? f.body.type : f.error])).toEqual([
      ['chunk', 3n, 'blockStatus'],
      ['chunk', 1n, 'data'],
      ['simple', 5n, 0],
      ['chunk', 1n, 'hole'],
      ['chunk', 3n, 'blockStatus'],
      ['simple', 2n, 0],
      ['chunk', 4n, 'error'],
    ]);
    expect(clientRef.reads.get(1n)!.equals(Buffer.concat([readData, Buffer.alloc(40)]))).toBe(true);
    const error = clientRef.frames.at(-1) as Extract<ReplyFrame, { kind: 'chunk' }>;
    expect(error.body).toEqual({ type: 'error', replyType: 0x8001, errno: NbdErrno.EIO, message: 'bad sector' });
    const bs = clientRef.frames[0] as Extract<ReplyFrame, { kind: 'chunk' }>;
    expect(bs.body).toEqual({ type: 'blockStatus', contextId: 1, extents: Uint32Array.from([4096, 0, MiB, 3]) });
  });

  test('the client to server stream cut at every byte offset', () => {
    for (let k = 0; k <= C2S.length; k++) {
      const r = serverSide([C2S.subarray(0, k), C2S.subarray(k)]);
      expect(r.sent.equals(serverRef.sent), `cut at ${k}`).toBe(true);
      expect(r.requests, `cut at ${k}`).toEqual(serverRef.requests);
    }
  });

  test('the server to client stream cut at every byte offset', () => {
    for (let k = 0; k <= S2C.length; k++) {
      const r = clientSide([S2C.subarray(0, k), S2C.subarray(k)]);
      expect(r.sent.equals(clientRef.sent), `cut at ${k}`).toBe(true);
      expect(r.frames, `cut at ${k}`).toEqual(clientRef.frames);
      expect(r.reads, `cut at ${k}`).toEqual(clientRef.reads);
    }
  });

  test('both streams one byte at a time', () => {
    const bytes = (b: Buffer) => Array.from(b, (x) => Buffer.from([x]));
    const s = serverSide(bytes(C2S));
    expect(s.sent.equals(serverRef.sent)).toBe(true);
    expect(s.requests).toEqual(serverRef.requests);
    const c = clientSide(bytes(S2C));
    expect(c.frames).toEqual(clientRef.frames);
    expect(c.reads).toEqual(clientRef.reads);
  });
});

// ---- the server, option by option ----------------------------------------------------------

interface Reply {
  option: number;
  type: number;
  data: Buffer;
}

/** Splits a server's output (after the greeting) into option replies. */
function replies(bytes: Uint8Array[]): Reply[] {
  const b = cat(bytes);
  const out: Reply[] = [];
  for (let at = 0; at < b.length; ) {
    expect(b.readBigUInt64BE(at)).toBe(0x3e889045565a9n);
    const length = b.readUInt32BE(at + 16);
    out.push({ option: b.readUInt32BE(at + 8), type: b.readUInt32BE(at + 12), data: b.subarray(at + 20, at + 20 + length) });
    at += 20 + length;
  }
  return out;
}

/** A server past the client flags; `flags` defaults to FIXED_NEWSTYLE | NO_ZEROES. */
function freshServer(flags = 3): ServerHandshake {
  const s = new ServerHandshake(catalog);
  expect(s.push(encodeClientFlags(flags)).send).toEqual([]);
  return s;
}

const option = (o: number, data?: Uint8Array) => cat(encodeOption(o, data));
const types = (rs: Reply[]) => rs.map((r) => r.type);

/** The push ends the handshake with a 'close' outcome carrying a ProtocolError; pushing more throws. */
function expectServerRejects(s: ServerHandshake, bytes: Uint8Array, code: ErrorCode, ...parts: string[]): Uint8Array[] {
  const step = s.push(bytes);
  const outcome = step.outcome as Extract<ServerHandshakeOutcome, { kind: 'close' }>;
  expect(outcome?.kind).toBe('close');
  expect(outcome.error).toBeInstanceOf(ProtocolError);
  expect(outcome.error!.code).toBe(code);
  expect(outcome.reason).toBe(outcome.error!.message);
  for (const p of parts) expect(outcome.reason).toContain(p);
  expect(s.state).toBe('done');
  expect(() => s.push(Buffer.from([0]))).toThrow(ProtocolError);
  return step.send;
}

afterEach(() => {
  vi.restoreAllMocks();
});

describe('server options', () => {
  test('the greeting offers fixed newstyle and no zeroes', () => {
    const g = new ServerHandshake(catalog).greeting();
    expect([g.readBigUInt64BE(0), g.readBigUInt64BE(8), g.readUInt16BE(16)]).toEqual([NBD_INIT_MAGIC, NBD_OPTS_MAGIC, 3]);
  });

  test('an unknown option is answered UNSUP and the next one is read', () => {
    const s = freshServer();
    const step = s.push(cat([option(99, Buffer.from('whatever')), option(NbdOption.startTls), option(4), option(NbdOption.list)]));
    const rs = replies(step.send);
    expect(rs.map((r) => [r.option, r.type])).toEqual([
      [99, NbdRep.errUnsup],
      [NbdOption.startTls, NbdRep.errUnsup],
      [4, NbdRep.errUnsup],
      [NbdOption.list, NbdRep.server],
      [NbdOption.list, NbdRep.server],
      [NbdOption.list, NbdRep.ack],
    ]);
    expect(parseServerReply(rs[3]!.data)).toEqual({ exportName: 'disk0', description: 'the first disk' });
    expect(parseServerReply(rs[4]!.data)).toEqual({ exportName: 'ro', description: '' });
    expect(step.outcome).toBeUndefined();
  });

  test('LIST and STRUCTURED_REPLY take no data; STRUCTURED_REPLY once', () => {
    const s = freshServer();
    const rs = replies(s.push(cat([option(NbdOption.list, Buffer.from([1])), option(NbdOption.structuredReply, Buffer.from([1])), option(NbdOption.structuredReply), option(NbdOption.structuredReply)])).send);
    expect(types(rs)).toEqual([NbdRep.errInvalid, NbdRep.errInvalid, NbdRep.ack, NbdRep.errInvalid]);
    expect(rs[0]!.data.toString()).toContain('takes no data');
  });

  test('INFO answers export, block sizes, name and description, and stays in the handshake', () => {
    const s = freshServer();
    const step = s.push(option(NbdOption.info, goData('disk0', [NbdInfo.name, NbdInfo.description, NbdInfo.blockSize])));
    const rs = replies(step.send);
    expect(types(rs)).toEqual([NbdRep.info, NbdRep.info, NbdRep.info, NbdRep.info, NbdRep.ack]);
    expect(rs.slice(0, 4).map((r) => parseInfoReply(r.data))).toEqual([
      { info: 'export', sizeBytes: 64 * MiB, transmissionFlags: 0x4d },
      { info: 'blockSize', minimumBytes: 1, preferredBytes: 4096, maximumBytes: 32 * MiB },
      { info: 'name', name: 'disk0' },
      { info: 'description', description: 'the first disk' },
    ]);
    expect(step.outcome).toBeUndefined();
    expect(s.state).toBe('optionHeader');
  });

  test('INFO and GO for an unknown export: UNKNOWN, with the name', () => {
    const s = freshServer();
    const rs = replies(s.push(cat([option(NbdOption.info, goData('nope', [])), option(NbdOption.go, goData('nope', []))])).send);
    expect(types(rs)).toEqual([NbdRep.errUnknown, NbdRep.errUnknown]);
    expect(rs[1]!.data.toString()).toBe("no export named 'nope'");
  });

  test('malformed GO is INVALID and the session goes on', () => {
    const s = freshServer();
    const bad = goData('disk0', [1]).subarray(0, 10);
    const step = s.push(cat([option(NbdOption.go, bad), option(NbdOption.go, goData('ro', []))]));
    const rs = replies(step.send);
    expect(rs[0]!.type).toBe(NbdRep.errInvalid);
    expect(rs[0]!.data.toString()).toContain('NBD_OPT_GO');
    expect(step.outcome?.kind).toBe('transmission');
  });

  test('GO enters transmission; the flags say read-only, no DF without structured replies', () => {
    const s = freshServer();
    const step = s.push(option(NbdOption.go, goData('ro', [])));
    const rs = replies(step.send);
    expect(types(rs)).toEqual([NbdRep.info, NbdRep.info, NbdRep.ack]);
    expect(parseInfoReply(rs[0]!.data)).toEqual({ info: 'export', sizeBytes: 4096, transmissionFlags: TransmissionFlag.hasFlags | TransmissionFlag.readOnly });
    const outcome = step.outcome as Extract<ServerHandshakeOutcome, { kind: 'transmission' }>;
    expect([outcome.negotiated.structuredReplies, outcome.negotiated.blockSizesRequested, outcome.negotiated.metaContexts.size]).toEqual([false, false, 0]);
    expect(s.state).toBe('done');
    expect(() => s.push(Buffer.from([0]))).toThrow(ProtocolError);
  });

  test('SET_META_CONTEXT needs structured replies, gives ids from 1, and is replaced by the next SET', () => {
    const s = freshServer();
    const set = (queries: string[], name = 'disk0') => option(NbdOption.setMetaContext, metaContextData(name, queries));
    let rs = replies(s.push(set(['base:allocation'])).send);
    expect(types(rs)).toEqual([NbdRep.errInvalid]);
    s.push(option(NbdOption.structuredReply));
    rs = replies(s.push(set(['base:allocation', 'base:', 'qemu:dirty-bitmap:bm0', 'qemu:dirty-bitmap:nope', 'x-other:thing'])).send);
    expect(types(rs)).toEqual([NbdRep.metaContext, NbdRep.metaContext, NbdRep.ack]);
    expect(rs.slice(0, 2).map((r) => parseMetaContextReply(r.data))).toEqual([
      { contextId: 1, name: 'base:allocation' },
      { contextId: 2, name: 'qemu:dirty-bitmap:bm0' },
    ]);
    // Too many queries: TOO_BIG; and the earlier selection is gone (a failed SET replaces it too).
    rs = replies(s.push(set(Array.from({ length: 17 }, () => 'base:allocation'))).send);
    expect(types(rs)).toEqual([NbdRep.errTooBig]);
    const step = s.push(option(NbdOption.go, goData('disk0', [])));
    const outcome = step.outcome as Extract<ServerHandshakeOutcome, { kind: 'transmission' }>;
    expect(outcome.negotiated.metaContexts.size).toBe(0);
  });

  test('contexts selected for one export do not carry over to another', () => {
    const s = freshServer();
    s.push(option(NbdOption.structuredReply));
    s.push(option(NbdOption.setMetaContext, metaContextData('disk0', ['base:allocation'])));
    const outcome = s.push(option(NbdOption.go, goData('ro', []))).outcome as Extract<ServerHandshakeOutcome, { kind: 'transmission' }>;
    expect(outcome.negotiated.metaContexts.size).toBe(0);
    expect(outcome.negotiated.transmissionFlags & TransmissionFlag.sendDf).toBe(TransmissionFlag.sendDf);
  });

  test('LIST_META_CONTEXT lists with id 0; wildcards; unknown export; malformed', () => {
    const s = freshServer();
    const list = (queries: string[], name = 'disk0') => option(NbdOption.listMetaContext, metaContextData(name, queries));
    const names = (rs: Reply[]) => rs.filter((r) => r.type === NbdRep.metaContext).map((r) => parseMetaContextReply(r.data));
    expect(names(replies(s.push(list([])).send))).toEqual([
      { contextId: 0, name: 'base:allocation' },
      { contextId: 0, name: 'qemu:dirty-bitmap:bm0' },
    ]);
    expect(names(replies(s.push(list(['qemu:dirty-bitmap:'])).send))).toEqual([{ contextId: 0, name: 'qemu:dirty-bitmap:bm0' }]);
    expect(types(replies(s.push(list(['base:'], 'nope')).send))).toEqual([NbdRep.errUnknown]);
    expect(types(replies(s.push(option(NbdOption.listMetaContext, Buffer.from([0, 0, 0, 9]))).send))).toEqual([NbdRep.errInvalid]);
  });

  test('ABORT is acknowledged and ends the handshake', () => {
    const s = freshServer();
    const step = s.push(option(NbdOption.abort, Buffer.from('ignored')));
    expect(types(replies(step.send))).toEqual([NbdRep.ack]);
    expect(step.outcome).toEqual({ kind: 'close', reason: 'the client aborted the handshake' });
  });

  test('EXPORT_NAME: size and flags, 124 zeroes unless the client said NO_ZEROES; unknown name closes', () => {
    const noZeroes = freshServer(3).push(option(NbdOption.exportName, exportNameData('disk0')));
    expect(cat(noZeroes.send).equals(encodeExportNameReply(64 * MiB, 0x4d, false))).toBe(true);
    expect(noZeroes.outcome?.kind).toBe('transmission');
    const zeroes = freshServer(1).push(option(NbdOption.exportName, exportNameData('disk0')));
    expect(cat(zeroes.send).length).toBe(10 + NBD_EXPORT_NAME_ZEROES);
    const unknown = freshServer().push(option(NbdOption.exportName, exportNameData('nope')));
    expect(unknown.send).toEqual([]);
    expect(unknown.outcome).toEqual({ kind: 'close', reason: "no export named 'nope'" });
  });

  test('while shutting down, options are answered SHUTDOWN (ABORT still ACK)', () => {
    const s = freshServer();
    s.shuttingDown = true;
    expect(types(replies(s.push(cat([option(NbdOption.go, goData('disk0', [])), option(NbdOption.list)])).send))).toEqual([NbdRep.errShutdown, NbdRep.errShutdown]);
    expect(s.push(option(NbdOption.abort)).outcome?.kind).toBe('close');
  });
});

describe('server refusals that end the connection', () => {
  test('unknown client flags', () => {
    expectServerRejects(new ServerHandshake(catalog), encodeClientFlags(4), ErrorCode.PROTOCOL, 'unknown client flags 0x4');
  });

  test('a transmission request before GO is not an option', () => {
    const s = freshServer();
    expectServerRejects(s, cat(encodeRequest({ command: NbdCommand.read, flags: 0, cookie: 1n, offsetBytes: 0, lengthBytes: 512 })), ErrorCode.PROTOCOL_MAGIC, 'not IHAVEOPT');
  });

  test('option data over the limit, refused on the header before any allocation', () => {
    const s = freshServer();
    const header = Buffer.alloc(16);
    header.writeBigUInt64BE(NBD_OPTS_MAGIC, 0);
    header.writeUInt32BE(NbdOption.go, 8);
    header.writeUInt32BE(0xffffffff, 12);
    const allocUnsafe = vi.spyOn(Buffer, 'allocUnsafe');
    const alloc = vi.spyOn(Buffer, 'alloc');
    expectServerRejects(s, header, ErrorCode.FRAME_TOO_LARGE, '4294967295 bytes of data');
    expect(allocUnsafe).not.toHaveBeenCalled();
    expect(alloc).not.toHaveBeenCalled();
  });

  test('option data at the limit is read (and answered)', () => {
    const s = freshServer();
    const rs = replies(s.push(option(1234, Buffer.alloc(NBD_MAX_OPTION_DATA_BYTES))).send);
    expect(types(rs)).toEqual([NbdRep.errUnsup]);
    expectServerRejects(freshServer(), option(1234, Buffer.alloc(NBD_MAX_OPTION_DATA_BYTES + 1)), ErrorCode.FRAME_TOO_LARGE);
  });

  test(`more than ${NBD_MAX_HANDSHAKE_OPTIONS} options`, () => {
    const s = freshServer();
    const many = cat(Array.from({ length: NBD_MAX_HANDSHAKE_OPTIONS }, () => option(NbdOption.list)));
    expect(types(replies(s.push(many).send)).filter((t) => t === NbdRep.ack)).toHaveLength(NBD_MAX_HANDSHAKE_OPTIONS);
    expectServerRejects(s, option(NbdOption.list), ErrorCode.LIMIT, `more than ${NBD_MAX_HANDSHAKE_OPTIONS} options`);
  });

  test('the options before the one that breaks the rules are answered in the same step', () => {
    const sent = expectServerRejects(freshServer(), cat([option(NbdOption.list), option(99), Buffer.alloc(16)]), ErrorCode.PROTOCOL_MAGIC);
    expect(types(replies(sent))).toEqual([NbdRep.server, NbdRep.server, NbdRep.ack, NbdRep.errUnsup]);
  });
});

// ---- the client, reply by reply ------------------------------------------------------------

const greeting = (flags = 3, second = NBD_OPTS_MAGIC, first = NBD_INIT_MAGIC) => {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(first, 0);
  b.writeBigUInt64BE(second, 8);
  b.writeUInt16BE(flags, 16);
  return b;
};
const reply = (o: number, type: number, data?: Uint8Array) => cat(encodeOptionReply(o, type, data));

function expectClientRejects(c: ClientHandshake, bytes: Uint8Array, code: ErrorCode, ...parts: string[]): void {
  let error: unknown;
  try {
    c.push(bytes);
  } catch (e) {
    error = e;
  }
  expect(error).toBeInstanceOf(ProtocolError);
  expect((error as ProtocolError).code).toBe(code);
  for (const p of parts) expect((error as Error).message).toContain(p);
}

describe('client', () => {
  test('greetings it will not speak to', () => {
    expectClientRejects(new ClientHandshake({ exportName: 'x' }), greeting(3, NBD_OPTS_MAGIC, 1n), ErrorCode.PROTOCOL_MAGIC, 'not NBDMAGIC');
    expectClientRejects(new ClientHandshake({ exportName: 'x' }), greeting(3, NBD_OLDSTYLE_MAGIC), ErrorCode.PROTOCOL_VERSION, 'oldstyle');
    expectClientRejects(new ClientHandshake({ exportName: 'x' }), greeting(0), ErrorCode.PROTOCOL_VERSION, 'fixed newstyle');
    expectClientRejects(new ClientHandshake({ exportName: 'x' }), greeting(3, 5n), ErrorCode.PROTOCOL_MAGIC, 'not IHAVEOPT');
  });

  test('without NO_ZEROES from the server the client does not set it', () => {
    const step = new ClientHandshake({ exportName: 'x', structuredReplies: false }).push(greeting(1));
    expect(Buffer.from(step.send[0]!).readUInt32BE(0)).toBe(1);
  });

  test('a refused GO is an NbdOptionError with the server\'s message; ABORT is then the way out', () => {
    const c = new ClientHandshake({ exportName: 'nope', structuredReplies: false });
    c.push(greeting());
    let error: unknown;
    try {
      c.push(reply(NbdOption.go, NbdRep.errUnknown, Buffer.from("no export named 'nope'")));
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(NbdOptionError);
    expect((error as NbdOptionError).replyName).toBe('errUnknown');
    expect((error as NbdOptionError).serverMessage).toBe("no export named 'nope'");
    const abort = cat(c.abortBytes());
    expect([abort.readBigUInt64BE(0), abort.readUInt32BE(8), abort.readUInt32BE(12)]).toEqual([NBD_OPTS_MAGIC, NbdOption.abort, 0]);
  });

  test('a server without GO: EXPORT_NAME, and its reply with or without zeroes', () => {
    for (const noZeroes of [true, false]) {
      const c = new ClientHandshake({ exportName: 'disk0', structuredReplies: false });
      c.push(greeting(noZeroes ? 3 : 1));
      const step = c.push(reply(NbdOption.go, NbdRep.errUnsup));
      const sent = cat(step.send);
      expect([sent.readUInt32BE(8), sent.subarray(16).toString()]).toEqual([NbdOption.exportName, 'disk0']);
      const answer = encodeExportNameReply(MiB, 0x3, !noZeroes);
      expect(c.push(answer.subarray(0, answer.length - 1)).done).toBeUndefined();
      const done = c.push(answer.subarray(answer.length - 1)).done!;
      expect(done.negotiated).toMatchObject({ sizeBytes: MiB, transmissionFlags: 3, via: 'exportName', blockSizes: undefined });
    }
  });

  test('structured replies and contexts refused: simple replies, no contexts', () => {
    const c = new ClientHandshake({ exportName: 'disk0', metaContexts: ['base:allocation'] });
    c.push(greeting());
    const step = c.push(reply(NbdOption.structuredReply, NbdRep.errUnsup));
    expect(cat(step.send).readUInt32BE(8)).toBe(NbdOption.go);
    const done = c.push(cat([reply(NbdOption.go, NbdRep.info, infoExportData(4096, 1)), reply(NbdOption.go, NbdRep.ack)])).done!;
    expect([done.negotiated.structuredReplies, done.negotiated.metaContexts.size]).toEqual([false, 0]);
  });

  test('a refused SET_META_CONTEXT leaves no contexts, GO goes on', () => {
    const c = new ClientHandshake({ exportName: 'disk0', metaContexts: ['base:allocation'] });
    c.push(greeting());
    c.push(reply(NbdOption.structuredReply, NbdRep.ack));
    const step = c.push(cat([reply(NbdOption.setMetaContext, NbdRep.metaContext, metaContextReplyData(1, 'base:allocation')), reply(NbdOption.setMetaContext, NbdRep.errPolicy)]));
    expect(cat(step.send).readUInt32BE(8)).toBe(NbdOption.go);
    const done = c.push(cat([reply(NbdOption.go, NbdRep.info, infoExportData(4096, 1)), reply(NbdOption.go, NbdRep.ack)])).done!;
    expect(done.negotiated.metaContexts.size).toBe(0);
  });

  test('replies that break the exchange', () => {
    const atGo = () => {
      const c = new ClientHandshake({ exportName: 'disk0', structuredReplies: false });
      c.push(greeting());
      return c;
    };
    expectClientRejects(atGo(), reply(NbdOption.list, NbdRep.ack), ErrorCode.UNEXPECTED_FRAME, 'while go (7) was asked');
    expectClientRejects(atGo(), reply(NbdOption.go, NbdRep.ack), ErrorCode.PROTOCOL, 'ACK without NBD_INFO_EXPORT');
    expectClientRejects(atGo(), reply(NbdOption.go, NbdRep.server, Buffer.alloc(4)), ErrorCode.UNEXPECTED_FRAME, 'not an answer to go');
    const header = reply(NbdOption.go, NbdRep.info).subarray(0, 20);
    header.writeUInt32BE(NBD_MAX_OPTION_REPLY_BYTES + 1, 16);
    expectClientRejects(atGo(), header, ErrorCode.FRAME_TOO_LARGE, 'over the limit');
    expectClientRejects(atGo(), Buffer.alloc(20), ErrorCode.PROTOCOL_MAGIC);
    expectClientRejects(atGo(), cat([reply(NbdOption.go, NbdRep.info, infoExportData(1, 0)), reply(NbdOption.go, NbdRep.ack)]), ErrorCode.PROTOCOL, 'HAS_FLAGS');
    const atSet = new ClientHandshake({ exportName: 'disk0', metaContexts: ['base:allocation'] });
    atSet.push(greeting());
    atSet.push(reply(NbdOption.structuredReply, NbdRep.ack));
    expectClientRejects(atSet, reply(NbdOption.setMetaContext, NbdRep.metaContext, metaContextReplyData(1, 'qemu:dirty-bitmap:x')), ErrorCode.PROTOCOL, 'was not asked for');
  });

  test('options it refuses to send', () => {
    expect(() => new ClientHandshake({ exportName: 'x'.repeat(4097) })).toThrow(RangeError);
    expect(() => new ClientHandshake({ exportName: 'x', metaContexts: Array.from({ length: 17 }, (_, i) => `x-a:${i}`) })).toThrow(RangeError);
  });

  test('GO asks for block sizes and the description', () => {
    const c = new ClientHandshake({ exportName: 'disk0', structuredReplies: false });
    const sent = cat(c.push(greeting()).send);
    const go = sent.subarray(4 + 16);
    expect(go.equals(goData('disk0', [NbdInfo.blockSize, NbdInfo.description]))).toBe(true);
  });
});
