// What the fuzzer feeds: each parser that faces the network, with the errors it may throw
// (anything else is a finding), what must hold of what it returns, the largest allocation it
// may make for one input, and seed inputs built with the protocol's own encoders.
//
// - frame: the peer frame decoder (protocol/codec.ts), as a session feeds it, cut anywhere;
//   every frame it returns must encode again, and a PAGES frame's payload goes through
//   validatePages as the destination checks it.
// - nbd-request: the NBD server's transmission decoder (a client's requests).
// - nbd-server-handshake: the NBD server's option haggling (a client's options).
// - nbd-reply: the NBD client's reply decoder (a server's replies to four requests in flight).
// - nbd-client-handshake: the NBD client's option haggling (a server's replies).
// - control: the control API over its unix socket, as raw HTTP: any request ends in a 4xx
//   that says why (or a close for bytes that are not HTTP), never a 500 from an exception.
//   The agent behind it is a stub whose every method refuses: what is fuzzed is the edge
//   (routing, parameters, content type, body limits, JSON, schemas), not the engine.
import { createConnection, type Server } from 'node:net';
import { ErrorCode, GangwayError, ProtocolError } from '../../protocol/errors.js';
import { encodeFrame, FrameDecoder, validatePages } from '../../protocol/codec.js';
import { exampleFrames } from '../../protocol/examples.js';
import { DEFAULT_MAX_PAYLOAD_BYTES, MAX_HEADER_BYTES } from '../../protocol/limits.js';
import type { Frame } from '../../protocol/frames.js';
import {
  Chunk,
  ClientHandshake,
  CommandFlag,
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
  ReplyDecoder,
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
import { chunked, Rng } from './mutator.js';

export interface FuzzTarget {
  name: string;
  /** Seed inputs (the corpus on disk is added to these). */
  seeds(): Buffer[];
  /** The largest input the fuzzer makes. */
  maxInputBytes: number;
  /** The largest single Buffer allocation one input may cause (the parser's own limits). */
  maxAllocationBytes: number;
  /** The scripts whose coverage steers the fuzzer (URLs of the built modules). */
  coverage: RegExp;
  /** Set-up before the first input (a server to talk to); returns the tear-down. */
  setUp?(): Promise<() => Promise<void>>;
  /** Feeds one input. Throws only errors `expected` accepts; returns a short outcome label. */
  run(input: Buffer): string | Promise<string>;
  expected(error: unknown): boolean;
}

const PROTOCOL_CODE = /\/dist\/protocol\/[^/]+\.js$/;
const NBD_CODE = /\/dist\/protocol\/nbd\//;
const CONTROL_CODE = /\/dist\/agent\/control\//;

const cat = (parts: readonly Uint8Array[]) => Buffer.concat(parts);

/** The chunking of an input is a function of its bytes: a finding replays exactly. */
function cutsOf(input: Buffer): Buffer[] {
  let hash = 0x811c9dc5;
  for (let i = 0; i < input.length; i += 1 + (input.length >> 10)) hash = Math.imul(hash ^ input[i]!, 0x01000193);
  return chunked(input, new Rng(hash ^ input.length));
}

// ---- frames -------------------------------------------------------------------------------

/** Pages frames are checked as the destination does, against a region this large. */
const FUZZ_REGION_PAGES = 1 << 16;

function checkFrame(frame: Frame): void {
  // A frame the decoder returns is a valid frame: it encodes again.
  encodeFrame(frame);
  if (frame.type === 'pages') validatePages(frame, FUZZ_REGION_PAGES, 4096, DEFAULT_MAX_PAYLOAD_BYTES);
}

const frameTarget: FuzzTarget = {
  name: 'frame',
  coverage: PROTOCOL_CODE,
  maxInputBytes: 64 * 1024,
  // One frame buffered at most: its header, or its payload (the limit the decoder was given).
  maxAllocationBytes: Math.max(MAX_HEADER_BYTES, 1024 * 1024),
  seeds: () => {
    const frames = exampleFrames();
    const one = frames.map((f) => cat(encodeFrame(f).filter((p): p is Uint8Array => p !== undefined)));
    return [...one, cat(one.slice(0, 4)), cat(one)];
  },
  run(input) {
    const decoder = new FrameDecoder({ maxPayloadBytes: 1024 * 1024 });
    let count = 0;
    for (const chunk of cutsOf(input)) {
      for (const frame of decoder.push(chunk)) {
        checkFrame(frame);
        count++;
      }
    }
    return count === 0 ? 'no frame' : 'frames';
  },
  expected: (error) => error instanceof ProtocolError,
};

// ---- NBD ----------------------------------------------------------------------------------

const nbdRequestTarget: FuzzTarget = {
  name: 'nbd-request',
  coverage: NBD_CODE,
  maxInputBytes: 16 * 1024,
  maxAllocationBytes: 4096,
  seeds: () => [
    cat(encodeRequest({ command: NbdCommand.write, flags: CommandFlag.fua, cookie: 1n, offsetBytes: 4096, lengthBytes: 16 }, Buffer.alloc(16, 7))),
    cat(encodeRequest({ command: NbdCommand.read, flags: 0, cookie: 2n, offsetBytes: 0, lengthBytes: 65536 })),
    cat([
      ...encodeRequest({ command: NbdCommand.blockStatus, flags: 0, cookie: 3n, offsetBytes: 0, lengthBytes: 1 << 30 }),
      ...encodeRequest({ command: NbdCommand.trim, flags: 0, cookie: 4n, offsetBytes: 8192, lengthBytes: 4096 }),
      ...encodeRequest({ command: NbdCommand.disc, flags: 0, cookie: 5n, offsetBytes: 0, lengthBytes: 0 }),
    ]),
  ],
  run(input) {
    const decoder = new RequestDecoder({ maxPayloadBytes: 4096 });
    let count = 0;
    for (const chunk of cutsOf(input)) {
      for (const request of decoder.push(chunk)) {
        if (request.payload !== undefined && request.payload.length !== request.lengthBytes) throw new Error(`WRITE of ${request.lengthBytes} bytes came with ${request.payload.length}`);
        count++;
      }
    }
    if (decoder.bufferedBytes > 28 + 4096) throw new Error(`the decoder holds ${decoder.bufferedBytes} bytes`);
    return count === 0 ? 'no request' : 'requests';
  },
  expected: (error) => error instanceof ProtocolError,
};

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

const nbdServerHandshakeTarget: FuzzTarget = {
  name: 'nbd-server-handshake',
  coverage: NBD_CODE,
  maxInputBytes: 96 * 1024,
  maxAllocationBytes: NBD_MAX_OPTION_DATA_BYTES,
  seeds: () => {
    const flags = encodeClientFlags(3);
    return [
      cat([flags, ...encodeOption(NbdOption.structuredReply), ...encodeOption(NbdOption.setMetaContext, metaContextData('d', ['base:allocation', 'qemu:dirty-bitmap:b'])), ...encodeOption(NbdOption.go, goData('d', [NbdInfo.blockSize]))]),
      cat([flags, ...encodeOption(NbdOption.list), ...encodeOption(NbdOption.listMetaContext, metaContextData('d', ['qemu:'])), ...encodeOption(NbdOption.info, goData('x', [NbdInfo.name, NbdInfo.description]))]),
      cat([flags, ...encodeOption(NbdOption.exportName, Buffer.from('d'))]),
      cat([flags, ...encodeOption(NbdOption.startTls), ...encodeOption(0x1234, Buffer.alloc(8)), ...encodeOption(NbdOption.abort)]),
    ];
  },
  run(input) {
    const handshake = new ServerHandshake(catalog);
    handshake.greeting();
    for (const chunk of cutsOf(input)) {
      if (handshake.state === 'done') return 'done';
      handshake.push(chunk);
    }
    return handshake.state;
  },
  expected: (error) => error instanceof ProtocolError,
};

/** The requests in flight when the replies come: a READ of 4 KiB, a BLOCK_STATUS, a FLUSH and a WRITE. */
const IN_FLIGHT = [
  { cookie: 1n, command: NbdCommand.read, offsetBytes: 0, lengthBytes: 4096 },
  { cookie: 2n, command: NbdCommand.blockStatus, offsetBytes: 0, lengthBytes: 1 << 30 },
  { cookie: 3n, command: NbdCommand.flush, offsetBytes: 0, lengthBytes: 0 },
  { cookie: 4n, command: NbdCommand.write, offsetBytes: 8192, lengthBytes: 512 },
] as const;

const nbdReplyTarget: FuzzTarget = {
  name: 'nbd-reply',
  coverage: NBD_CODE,
  maxInputBytes: 32 * 1024,
  maxAllocationBytes: Math.max(4 + 8 * NBD_MAX_EXTENTS_PER_CHUNK, NBD_MAX_ERROR_CHUNK_BYTES),
  seeds: () => [
    cat([
      ...Chunk.offsetData(1n, 0, Buffer.alloc(2048, 1), false),
      Chunk.offsetHole(1n, 2048, 2048, true),
      Chunk.blockStatus(2n, 1, [{ lengthBytes: 65536, flags: 0 }, { lengthBytes: 4096, flags: 3 }], true),
      ...encodeSimpleReply(3n, 0),
      Chunk.error(4n, NbdErrno.EIO, 'disk on fire'),
    ]),
    cat([Chunk.none(4n), ...encodeSimpleReply(3n, NbdErrno.ENOSPC), Chunk.offsetHole(1n, 0, 4096, true)]),
  ],
  run(input) {
    const decoder = new ReplyDecoder({ structuredReplies: true });
    for (const request of IN_FLIGHT) {
      decoder.expect(request.cookie, { ...request, ...(request.command === NbdCommand.read ? { target: Buffer.alloc(request.lengthBytes) } : {}) });
    }
    let count = 0;
    for (const chunk of cutsOf(input)) count += decoder.push(chunk).length;
    return count === 0 ? 'no reply' : decoder.outstanding === 0 ? 'all replied' : 'replies';
  },
  expected: (error) => error instanceof ProtocolError,
};

const nbdClientHandshakeTarget: FuzzTarget = {
  name: 'nbd-client-handshake',
  coverage: NBD_CODE,
  maxInputBytes: 32 * 1024,
  maxAllocationBytes: NBD_MAX_OPTION_REPLY_BYTES,
  seeds: () => [
    cat([
      encodeGreeting(3),
      ...encodeOptionReply(NbdOption.structuredReply, NbdRep.ack),
      ...encodeOptionReply(NbdOption.setMetaContext, NbdRep.metaContext, metaContextReplyData(1, 'base:allocation')),
      ...encodeOptionReply(NbdOption.setMetaContext, NbdRep.ack),
      ...encodeOptionReply(NbdOption.go, NbdRep.info, infoExportData(1 << 30, TransmissionFlag.sendFlush)),
      ...encodeOptionReply(NbdOption.go, NbdRep.info, infoBlockSizeData({ minimumBytes: 512, preferredBytes: 4096, maximumBytes: 1 << 20 })),
      ...encodeOptionReply(NbdOption.go, NbdRep.ack),
    ]),
    cat([encodeGreeting(3), ...encodeOptionReply(NbdOption.structuredReply, NbdRep.errUnsup, Buffer.from('no')), ...encodeOptionReply(NbdOption.go, NbdRep.errUnknown, Buffer.from('no such export'))]),
  ],
  run(input) {
    const handshake = new ClientHandshake({ exportName: 'd', metaContexts: ['base:allocation'] });
    for (const chunk of cutsOf(input)) {
      if (handshake.state === 'done') return 'done';
      handshake.push(chunk);
    }
    return handshake.state;
  },
  expected: (error) => error instanceof ProtocolError || error instanceof NbdOptionError,
};

// ---- the control API ----------------------------------------------------------------------

/**
 * An agent whose every method refuses, as any unknown guest would be refused: each call
 * throws GUEST_NOT_FOUND (a 404). A property read gives another such function, so routes
 * added later (agent.traffic.status(), agent.history()) need nothing here.
 */
function refusingAgent(): unknown {
  const refuse = (): never => {
    throw new GangwayError(ErrorCode.GUEST_NOT_FOUND, 'the fuzzing stub has no guests');
  };
  const handler: ProxyHandler<() => never> = {
    get: (_target, key) => (key === 'then' ? undefined : key === 'log' ? { debug() {}, info() {}, warn() {}, error() {} } : new Proxy(refuse, handler)),
    apply: refuse,
  };
  return new Proxy(refuse, handler);
}

const CONTROL_ANSWER_MS = 5000;
let controlSocket = '';

function http(method: string, path: string, body?: string, headers: string[] = []): Buffer {
  const lines = [`${method} ${path} HTTP/1.1`, 'host: agent', ...headers];
  if (body !== undefined) lines.push('content-type: application/json', `content-length: ${Buffer.byteLength(body)}`);
  return Buffer.from(`${lines.join('\r\n')}\r\n\r\n${body ?? ''}`);
}

const migrateBody = JSON.stringify({
  guests: ['vm1'],
  strategy: 'gang',
  dedup: true,
  to: '127.0.0.1:7402',
  downtimeMs: 300,
  force: false,
  maxRounds: 30,
  maxBytesFactor: 3,
  codec: 'auto',
  technique: 'hybrid',
  disks: ['disk0'],
});

/** Sends `request` on a fresh connection, half-closes, and resolves with all the server said. */
function exchange(request: Buffer): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const socket = createConnection(controlSocket);
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`the control server did not answer within ${CONTROL_ANSWER_MS} ms`));
    }, CONTROL_ANSWER_MS);
    socket.on('data', (chunk) => chunks.push(chunk));
    socket.on('error', () => {}); // a reset after a refusal: what was read is the answer
    socket.on('close', () => {
      clearTimeout(timer);
      resolve(Buffer.concat(chunks));
    });
    socket.end(request);
  });
}

const controlTarget: FuzzTarget = {
  name: 'control',
  coverage: CONTROL_CODE,
  maxInputBytes: 80 * 1024,
  maxAllocationBytes: 128 * 1024,
  seeds: () => [
    http('GET', '/v1/status'),
    http('GET', '/v1/traffic'),
    http('POST', '/v1/guests', JSON.stringify({ name: 'vm1', memoryBytes: 1 << 20, profile: 'os-image', dirtyRateBytesPerSec: 0, seed: 1, imageSeed: 1, sharedFraction: 0.5, hotFraction: 0.1 })),
    http('POST', '/v1/vms', JSON.stringify({ name: 'vm1', definition: { machine: 'q35', cpus: 1, accel: 'tcg', kernel: 'k' }, regionBytes: [1 << 26], disks: ['a.raw'] })),
    http('POST', '/v1/migrations', migrateBody),
    http('POST', '/v1/plan', JSON.stringify({ guests: ['vm1', 'vm2'], to: '[::1]:7402', priority: 'high' })),
    http('DELETE', '/v1/guests/vm1'),
    http('POST', '/v1/guests/vm%2e1/resume'),
    http('POST', '/v1/migrations/0a1b2c3d/cancel'),
    http('GET', '/v1/status', undefined, ['transfer-encoding: chunked']),
  ],
  async setUp() {
    const { mkdtempSync, rmSync } = await import('node:fs');
    const { tmpdir } = await import('node:os');
    const { join } = await import('node:path');
    const { createControlServer } = await import('../../agent/control/server.js');
    const dir = mkdtempSync(join(tmpdir(), 'gangway-fuzz-control-'));
    controlSocket = join(dir, 'control.sock');
    // Not startControlServer: its socket mode comes from process.umask(), which a worker
    // thread may not set; the directory is this process's own (0700).
    const server: Server = createControlServer(refusingAgent() as never, {});
    try {
      await new Promise<void>((resolve, reject) => server.once('error', reject).listen(controlSocket, () => resolve()));
    } catch (err) {
      rmSync(dir, { recursive: true, force: true });
      throw err;
    }
    return async () => {
      await new Promise<void>((resolve) => server.close(() => resolve()));
      rmSync(dir, { recursive: true, force: true });
    };
  },
  async run(input) {
    const answer = (await exchange(input)).toString('latin1');
    if (answer === '') return 'closed';
    const status = /^HTTP\/1\.1 (\d{3}) /.exec(answer);
    if (!status) throw new Error(`not an HTTP answer: ${JSON.stringify(answer.slice(0, 80))}`);
    const code = Number(status[1]);
    // 500 is what an exception in a handler becomes; the stub only ever refuses with 404.
    if (code >= 500) throw new Error(`HTTP ${code}: ${answer.slice(answer.indexOf('\r\n\r\n') + 4, answer.indexOf('\r\n\r\n') + 204)}`);
    return `HTTP ${code}`;
  },
  // Every failure of the control target is a finding: refusals are answers, not exceptions.
  expected: () => false,
};

export const TARGETS: readonly FuzzTarget[] = [frameTarget, nbdRequestTarget, nbdServerHandshakeTarget, nbdReplyTarget, nbdClientHandshakeTarget, controlTarget];

// ---- planted bugs: the fuzzer's own check ---------------------------------------------------

/**
 * Records of [type u8][length u16 BE][value], with a bug planted where only coverage leads:
 * in planted-throw, a record of type 2 (the seed's second) whose length field is 0xffff
 * throws a TypeError; in
 * planted-hang, a record of type 0x48 ('H') with a length of 0xff00 or more loops for ever.
 * The tests run the fuzzer on them: a fuzzer that does not find these would not find their
 * like in the real parsers. (It has no comparison tracing: a magic number that no seed holds
 * is found by chance only, so the real targets' seeds hold every magic and type code.)
 */
function plantedTarget(bug: 'throw' | 'hang'): FuzzTarget {
  return {
    name: `planted-${bug}`,
    coverage: /\/bench\/fuzz\/targets\.js$/,
    maxInputBytes: 256,
    maxAllocationBytes: 1024,
    seeds: () => [Buffer.from([0x01, 0x00, 0x02, 0xaa, 0xbb, 0x02, 0x00, 0x00])],
    run(input) {
      let at = 0;
      while (at + 3 <= input.length) {
        const type = input[at]!;
        const length = input.readUInt16BE(at + 1);
        if (type === 0x02) {
          if (bug === 'throw' && length === 0xffff) throw new TypeError('planted: a length the check forgot');
          if (length > input.length) throw new ProtocolError(ErrorCode.PROTOCOL, 'record longer than the input');
        }
        if (type === 0x48) {
          if (bug === 'hang' && length >= 0xff00) for (;;);
        }
        at += 3 + length;
      }
      return at === input.length ? 'records' : 'short';
    },
    expected: (error) => error instanceof ProtocolError,
  };
}

export function targetNamed(name: string): FuzzTarget | undefined {
  return [...TARGETS, plantedTarget('throw'), plantedTarget('hang')].find((t) => t.name === name);
}
