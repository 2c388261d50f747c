// Our NBD server against clients that break the rules, spoken to byte by byte over a unix
// socket: garbage, requests before GO, huge lengths, 10,000 options, requests the export
// cannot serve, a client that never reads its replies, one that vanishes mid-request. The
// server answers with an NBD error or hangs up on that client, never crashes, never holds
// more than its bounds, and goes on serving the next client.
import type { Socket } from 'node:net';
import { afterEach, describe, expect, test } from 'vitest';
import { ErrorCode, type GangwayError } from '../../protocol/errors.js';
import {
  ClientHandshake,
  type ClientNegotiated,
  CommandFlag,
  NBD_MAX_HANDSHAKE_OPTIONS,
  NBD_OPTS_MAGIC,
  NbdCommand,
  NbdErrno,
  NbdOption,
  ReplyDecoder,
  type ReplyFrame,
  encodeClientFlags,
  encodeOption,
  encodeRequest,
  exportNameData,
} from '../../protocol/nbd/index.js';
import { MemoryExport, type Served, collect, serve } from '../helpers/nbd.js';

const KiB = 1024;
const MiB = 1024 * KiB;

let served: Served | undefined;
afterEach(async () => {
  await served?.close();
  served = undefined;
});

async function start(exports = [new MemoryExport('disk0', MiB), new MemoryExport('ro', MiB, { readOnly: true, minBlockBytes: 512 })], more = {}): Promise<Served> {
  served = await serve({ exports, handshakeTimeoutMs: 2_000, ...more });
  return served;
}

const cat = (parts: Uint8Array[]) => Buffer.concat(parts);

interface Raw {
  socket: Socket;
  negotiated: ClientNegotiated;
  decoder: ReplyDecoder;
  /** Sends requests (registering them with the decoder) in one write. */
  send(requests: { command: number; flags?: number; cookie: bigint; offsetBytes: number; lengthBytes: number; payload?: Buffer }[]): void;
  /** Waits (bounded) for `count` final replies. */
  replies(count: number, timeoutMs?: number): Promise<ReplyFrame[]>;
}

/** A handshake by our own state machine over a raw socket, then raw requests. */
async function rawTransmission(s: Served, options: { exportName?: string; structuredReplies?: boolean; metaContexts?: string[] } = {}): Promise<Raw> {
  const socket = await s.raw();
  const hs = new ClientHandshake({ exportName: options.exportName ?? 'disk0', ...options });
  const frames: ReplyFrame[] = [];
  let decoder: ReplyDecoder | undefined;
  const negotiated = await new Promise<ClientNegotiated>((resolve, reject) => {
    socket.on('data', (chunk: Buffer) => {
      try {
        if (decoder !== undefined) return void frames.push(...decoder.push(chunk));
        const step = hs.push(chunk);
        for (const p of step.send) socket.write(p);
        if (step.done) {
          decoder = new ReplyDecoder({ structuredReplies: step.done.negotiated.structuredReplies });
          resolve(step.done.negotiated);
        }
      } catch (error) {
        reject(error);
      }
    });
  });
  const targets = new Map<bigint, Buffer>();
  return {
    socket,
    negotiated,
    decoder: decoder!,
    send(requests) {
      const parts: Uint8Array[] = [];
      for (const r of requests) {
        const target = r.command === NbdCommand.read ? Buffer.alloc(r.lengthBytes) : undefined;
        if (target) targets.set(r.cookie, target);
        if (r.command !== NbdCommand.disc) {
          decoder!.expect(r.cookie, { command: r.command, offsetBytes: r.offsetBytes, lengthBytes: r.lengthBytes, ...(target ? { target } : {}) });
        }
        parts.push(...encodeRequest({ flags: 0, ...r }, r.payload));
      }
      socket.write(cat(parts));
    },
    async replies(count, timeoutMs = 5_000) {
      const deadline = performance.now() + timeoutMs;
      const finals = () => frames.filter((f) => f.kind === 'simple' || f.done);
      while (finals().length < count) {
        if (performance.now() > deadline) throw new Error(`timed out waiting for ${count} replies, have ${finals().length}`);
        await new Promise((r) => setTimeout(r, 5));
      }
      return finals();
    },
  };
}

const errnoOf = (f: ReplyFrame) => (f.kind === 'simple' ? f.error : f.body.type === 'error' ? f.body.errno : 0);

async function expectClosedWith(s: Served, code: ErrorCode): Promise<GangwayError> {
  const [connection] = s.server.connections;
  const reason = (await connection!.closed) as GangwayError;
  expect(reason?.code).toBe(code);
  return reason;
}

/** The server still serves a well-behaved client. */
async function stillServes(s: Served): Promise<void> {
  const c = await s.connect({ exportName: 'disk0' });
  expect((await c.read(0, 4096)).length).toBe(4096);
  await c.close();
}

describe('before transmission', () => {
  test('garbage instead of client flags: hung up, next client served', async () => {
    const s = await start();
    const socket = await s.raw();
    const seen = collect(socket);
    await seen.until('the greeting', (b) => b.length >= 18);
    socket.write(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
    await expectClosedWith(s, ErrorCode.PROTOCOL);
    await seen.until('the close', () => seen.ended());
    await stillServes(s);
  });

  test('a transmission request before GO: hung up', async () => {
    const s = await start();
    const socket = await s.raw();
    socket.write(cat([encodeClientFlags(3), ...encodeRequest({ command: NbdCommand.read, flags: 0, cookie: 1n, offsetBytes: 0, lengthBytes: 512 })]));
    await expectClosedWith(s, ErrorCode.PROTOCOL_MAGIC);
    await stillServes(s);
  });

  test('an option claiming 4 GiB of data: hung up on its header', async () => {
    const s = await start();
    const socket = await s.raw();
    const header = Buffer.alloc(16);
    header.writeBigUInt64BE(NBD_OPTS_MAGIC, 0);
    header.writeUInt32BE(NbdOption.go, 8);
    header.writeUInt32BE(0xffffffff, 12);
    socket.write(cat([encodeClientFlags(3), header]));
    await expectClosedWith(s, ErrorCode.FRAME_TOO_LARGE);
  });

  test('10,000 options without reading the answers: the first ones answered, then hung up', async () => {
    const s = await start();
    const socket = await s.raw();
    const seen = collect(socket);
    const options = cat(Array.from({ length: 10_000 }, (_, i) => cat(encodeOption(i % 2 === 0 ? NbdOption.list : 4242))));
    socket.write(cat([encodeClientFlags(3), options]));
    const reason = await expectClosedWith(s, ErrorCode.LIMIT);
    expect(reason.message).toContain(`more than ${NBD_MAX_HANDSHAKE_OPTIONS} options`);
    await seen.until('the close', () => seen.ended());
    // Every option up to the limit was answered (LIST: 2 exports + ACK; unknown: UNSUP).
    const answers = seen.bytes();
    let count = 0;
    for (let at = 18; at + 20 <= answers.length; at += 20 + answers.readUInt32BE(at + 16)) count++;
    expect(count).toBe((NBD_MAX_HANDSHAKE_OPTIONS / 2) * 3 + NBD_MAX_HANDSHAKE_OPTIONS / 2);
    await stillServes(s);
  });

  test('a client that says nothing is dropped after the handshake timeout', async () => {
    const s = await start(undefined, { handshakeTimeoutMs: 150 });
    await s.raw();
    await expectClosedWith(s, ErrorCode.TIMEOUT);
  });

  test('NBD_OPT_EXPORT_NAME, the old way in, still works', async () => {
    const s = await start();
    const socket = await s.raw();
    const seen = collect(socket);
    socket.write(cat([encodeClientFlags(3), ...encodeOption(NbdOption.exportName, exportNameData('disk0'))]));
    const b = await seen.until('the export reply', (x) => x.length >= 18 + 10);
    expect([b.readBigUInt64BE(18), b.readUInt16BE(26)]).toEqual([BigInt(MiB), 0x6d]);
    socket.write(cat(encodeRequest({ command: NbdCommand.read, flags: 0, cookie: 9n, offsetBytes: 0, lengthBytes: 100 })));
    const r = await seen.until('the read reply', (x) => x.length >= 28 + 16 + 100);
    expect([r.readUInt32BE(28), r.readUInt32BE(32), r.readBigUInt64BE(36)]).toEqual([0x67446698, 0, 9n]);
  });
});

describe('in transmission', () => {
  test('requests the export cannot serve are answered with the spec\'s errors; the connection goes on', async () => {
    const s = await start();
    for (const structuredReplies of [true, false]) {
      const rw = await rawTransmission(s, { structuredReplies });
      rw.send([
        { command: NbdCommand.read, cookie: 1n, offsetBytes: MiB - 10, lengthBytes: 20 },
        { command: 42, cookie: 2n, offsetBytes: 0, lengthBytes: 0 },
        { command: NbdCommand.read, flags: CommandFlag.reqOne, cookie: 3n, offsetBytes: 0, lengthBytes: 1 },
        { command: NbdCommand.read, cookie: 4n, offsetBytes: 0, lengthBytes: 0 },
        { command: NbdCommand.blockStatus, cookie: 5n, offsetBytes: 0, lengthBytes: 512 },
        { command: NbdCommand.write, cookie: 6n, offsetBytes: MiB - 1, lengthBytes: 2, payload: Buffer.alloc(2) },
        { command: NbdCommand.writeZeroes, flags: CommandFlag.fastZero, cookie: 7n, offsetBytes: 0, lengthBytes: 1 },
        { command: NbdCommand.read, flags: CommandFlag.df, cookie: 8n, offsetBytes: 0, lengthBytes: 1 },
        { command: NbdCommand.read, cookie: 9n, offsetBytes: 2 ** 53, lengthBytes: 1 },
        { command: NbdCommand.read, cookie: 10n, offsetBytes: 512, lengthBytes: 512 },
      ]);
      const replies = await rw.replies(structuredReplies ? 10 : 10);
      const byCookie = new Map(replies.map((f) => [f.cookie, errnoOf(f)]));
      expect(Object.fromEntries([...byCookie].map(([k, v]) => [String(k), v]))).toEqual({
        1: NbdErrno.EINVAL,
        2: NbdErrno.EINVAL,
        3: NbdErrno.EINVAL,
        4: 0,
        5: NbdErrno.EINVAL,
        6: NbdErrno.ENOSPC,
        7: NbdErrno.EINVAL,
        8: structuredReplies ? 0 : NbdErrno.EINVAL,
        9: NbdErrno.EINVAL,
        10: 0,
      });
      if (structuredReplies) {
        const message = replies.find((f) => f.cookie === 1n) as Extract<ReplyFrame, { kind: 'chunk' }>;
        expect(message.body).toMatchObject({ message: `[${MiB - 10}, +20) is beyond the export's ${MiB} bytes` });
      }
      rw.socket.destroy();
    }
    const ro = await rawTransmission(s, { exportName: 'ro' });
    ro.send([
      { command: NbdCommand.write, cookie: 1n, offsetBytes: 0, lengthBytes: 512, payload: Buffer.alloc(512) },
      { command: NbdCommand.trim, cookie: 2n, offsetBytes: 0, lengthBytes: 512 },
      { command: NbdCommand.read, cookie: 3n, offsetBytes: 100, lengthBytes: 512 },
      { command: NbdCommand.read, cookie: 4n, offsetBytes: 512, lengthBytes: 100 },
      // Flushing a read-only export is harmless, and this one can.
      { command: NbdCommand.flush, cookie: 5n, offsetBytes: 0, lengthBytes: 0 },
      { command: NbdCommand.read, cookie: 6n, offsetBytes: 512, lengthBytes: 512 },
    ]);
    const errors = (await ro.replies(6)).map((f) => [f.cookie, errnoOf(f)]);
    expect(new Map(errors as [bigint, number][])).toEqual(
      new Map([
        [1n, NbdErrno.EPERM],
        [2n, NbdErrno.EPERM],
        [3n, NbdErrno.EINVAL],
        [4n, NbdErrno.EINVAL],
        [5n, 0],
        [6n, 0],
      ]),
    );
  });

  test('a READ over the maximum payload is EINVAL; a WRITE over it hangs up', async () => {
    const s = await start(undefined, { maxPayloadBytes: 64 * KiB });
    const rw = await rawTransmission(s);
    rw.send([{ command: NbdCommand.read, cookie: 1n, offsetBytes: 0, lengthBytes: 64 * KiB + 1 }]);
    expect(errnoOf((await rw.replies(1))[0]!)).toBe(NbdErrno.EINVAL);
    const header = cat(encodeRequest({ command: NbdCommand.write, flags: 0, cookie: 2n, offsetBytes: 0, lengthBytes: 1 }, Buffer.alloc(1))).subarray(0, 28);
    header.writeUInt32BE(0x7fffffff, 24);
    rw.socket.write(header);
    await expectClosedWith(s, ErrorCode.FRAME_TOO_LARGE);
    await stillServes(s);
  });

  test('garbage after GO: hung up', async () => {
    const s = await start();
    const rw = await rawTransmission(s);
    rw.socket.write(Buffer.alloc(64, 0xff));
    await expectClosedWith(s, ErrorCode.PROTOCOL_MAGIC);
  });

  test('a client that never reads: the server stops reading too, holding no more than its bounds', async () => {
    const e = new MemoryExport('disk0', 4 * MiB);
    // Data, not zeroes: zero granules would go as 32-byte hole chunks and fill no buffer.
    e.data.fill(0x77);
    const s = await start([e], { maxInFlight: 4 });
    const rw = await rawTransmission(s);
    const count = 1000;
    rw.socket.pause();
    rw.send(Array.from({ length: count }, (_, i) => ({ command: NbdCommand.read, cookie: BigInt(i + 1), offsetBytes: (i % 64) * 64 * KiB, lengthBytes: 64 * KiB })));
    await new Promise((r) => setTimeout(r, 300));
    const [connection] = s.server.connections;
    expect(connection!.inFlight).toBeLessThanOrEqual(4);
    expect(e.maxInFlightSeen).toBeLessThanOrEqual(4);
    // 1000 replies are 64 MiB. Served so far: what the kernel and the client's stream buffer
    // took, plus what the server holds: its bound, and a send buffer of at most its bound's replies.
    expect(e.reads).toBeLessThan(40);
    expect(connection!.sendBufferBytes).toBeLessThanOrEqual(5 * (64 * KiB + 64));
    rw.socket.resume();
    const replies = await rw.replies(count, 20_000);
    expect(replies.every((f) => errnoOf(f) === 0)).toBe(true);
    expect(e.reads).toBe(count);
  });

  test('a client that vanishes mid-request: the server closes that connection, nothing else', async () => {
    const e = new MemoryExport('disk0', MiB, { delayMs: () => 100 });
    const s = await start([e]);
    const rw = await rawTransmission(s);
    rw.send([{ command: NbdCommand.read, cookie: 1n, offsetBytes: 0, lengthBytes: 4096 }]);
    await new Promise((r) => setTimeout(r, 20));
    rw.socket.destroy();
    const [connection] = s.server.connections;
    expect(await connection!.closed).toBeUndefined();
    await new Promise((r) => setTimeout(r, 150));
    await stillServes(s);
  });

  test('DISC after a READ: the READ is answered, then the server closes', async () => {
    const e = new MemoryExport('disk0', MiB, { delayMs: () => 50 });
    e.data.fill(3, 0, 4096);
    const s = await start([e]);
    const rw = await rawTransmission(s);
    const seenEnd = new Promise<void>((resolve) => rw.socket.once('close', () => resolve()));
    rw.send([
      { command: NbdCommand.read, cookie: 1n, offsetBytes: 0, lengthBytes: 4096 },
      { command: NbdCommand.disc, cookie: 2n, offsetBytes: 0, lengthBytes: 0 },
      // Nothing after DISC counts.
      { command: NbdCommand.read, cookie: 3n, offsetBytes: 0, lengthBytes: 1 },
    ]);
    const [reply] = await rw.replies(1);
    expect(errnoOf(reply!)).toBe(0);
    await seenEnd;
    expect(rw.decoder.outstanding).toBe(1);
  });
});
