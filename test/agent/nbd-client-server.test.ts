// Our NBD client against our NBD server over unix sockets in a temp dir: reads and writes
// (structured and simple replies), splitting at the maximum payload, pipelining with replies
// out of order, the bounds on requests in flight on both sides, block status of two
// contexts, errors with NBD's errno names, timeouts and aborts, and clean closes (DISC,
// server shutdown). The file-backed export on a sparse file is checked here too.
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { createConnection, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, test } from 'vitest';
import { NbdClient } from '../../agent/nbd/client.js';
import { FileExport } from '../../agent/nbd/file-export.js';
import { clipExtents, zeroRuns } from '../../agent/nbd/server-connection.js';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { AllocationFlag, NbdCommandError, NbdErrno, NbdOptionError, TransmissionFlag } from '../../protocol/nbd/index.js';
import { MemoryExport, type Served, serve } from '../helpers/nbd.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const HOLE_ZERO = AllocationFlag.hole | AllocationFlag.zero;

let served: Served[] = [];
const cleanups: (() => void | Promise<void>)[] = [];

afterEach(async () => {
  for (const s of served) await s.close();
  served = [];
  for (const c of cleanups.splice(0)) await c();
});

async function start(...args: Parameters<typeof serve>): Promise<Served> {
  const s = await serve(...args);
  served.push(s);
  return s;
}

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) b[i] = (i * 31 + seed) & 0xff;
  return b;
}

describe.each([true, false])('structured replies: %s', (structuredReplies) => {
  test('write, read back, zero, flush', async () => {
    const e = new MemoryExport('disk0', 4 * MiB);
    const s = await start({ exports: [e] });
    const c = await s.connect({ exportName: 'disk0', structuredReplies });
    expect([c.sizeBytes, c.structuredReplies, c.readOnly]).toEqual([4 * MiB, structuredReplies, false]);
    expect(c.transmissionFlags & TransmissionFlag.sendDf).toBe(structuredReplies ? TransmissionFlag.sendDf : 0);
    const data = pattern(300 * KiB, 1);
    await c.write(12345, data, { fua: true });
    expect(e.data.subarray(12345, 12345 + data.length).equals(data)).toBe(true);
    expect((await c.read(12345, data.length)).equals(data)).toBe(true);
    await c.writeZeroes(20000, 5000);
    expect((await c.read(20000, 5000)).every((b) => b === 0)).toBe(true);
    await c.trim(0, 4096);
    await c.flush();
    expect((await c.read(0, 0)).length).toBe(0);
    await c.close();
    expect(await c.closed).toBeUndefined();
  });
});

test('a READ or WRITE over the maximum payload goes as several requests, and comes back whole', async () => {
  const e = new MemoryExport('disk0', 4 * MiB);
  const s = await start({ exports: [e], maxPayloadBytes: 64 * KiB });
  const c = await s.connect({ exportName: 'disk0' });
  expect(c.blockSizes).toEqual({ minimumBytes: 1, preferredBytes: 4096, maximumBytes: 64 * KiB });
  const data = pattern(MiB + 17, 2);
  await c.write(3, data);
  expect(e.data.subarray(3, 3 + data.length).equals(data)).toBe(true);
  e.reads = 0;
  expect((await c.read(3, data.length)).equals(data)).toBe(true);
  expect(e.reads).toBe(Math.ceil(data.length / (64 * KiB)));
});

test('pipelined requests are answered as they complete, out of order, and each lands in its place', async () => {
  // The first 64 KiB is slow: its reply comes after the others'.
  const e = new MemoryExport('disk0', MiB, { delayMs: (offset) => (offset < 64 * KiB ? 150 : 0) });
  e.data.set(pattern(MiB, 3));
  const s = await start({ exports: [e] });
  const c = await s.connect({ exportName: 'disk0' });
  const order: number[] = [];
  const reads = Array.from({ length: 16 }, (_, i) => c.read(i * 64 * KiB, 64 * KiB).then((b) => (order.push(i), b)));
  const results = await Promise.all(reads);
  results.forEach((b, i) => expect(b.equals(e.data.subarray(i * 64 * KiB, (i + 1) * 64 * KiB))).toBe(true));
  expect(order.at(-1)).toBe(0);
  expect(e.maxInFlightSeen).toBeGreaterThan(1);
});

test('the client keeps at most maxInFlight requests on the wire', async () => {
  const e = new MemoryExport('disk0', MiB, { delayMs: () => 5 });
  const s = await start({ exports: [e] });
  const c = await s.connect({ exportName: 'disk0', maxInFlight: 2 });
  await Promise.all(Array.from({ length: 20 }, (_, i) => c.read(i * 4096, 4096)));
  expect(e.maxInFlightSeen).toBe(2);
});

test('the server serves at most its maxInFlight at once, whatever the client sends', async () => {
  const e = new MemoryExport('disk0', MiB, { delayMs: () => 5 });
  const s = await start({ exports: [e], maxInFlight: 3 });
  const c = await s.connect({ exportName: 'disk0', maxInFlight: 16 });
  await Promise.all(Array.from({ length: 40 }, (_, i) => c.read(i * 4096, 4096)));
  expect(e.maxInFlightSeen).toBe(3);
});

test('block status of two contexts: each by its id, merged over requests, cut to the range', async () => {
  const e = new MemoryExport('disk0', MiB, { dirtyBitmap: 'bm0' });
  e.data.fill(1, 8192, 12288);
  e.dirty = [
    { lengthBytes: 64 * KiB, flags: 1 },
    { lengthBytes: 2 * MiB, flags: 0 },
  ];
  const s = await start({ exports: [e] });
  const c = await s.connect({ exportName: 'disk0', metaContexts: ['base:allocation', 'qemu:dirty-bitmap:bm0', 'qemu:dirty-bitmap:nope'] });
  expect(c.metaContexts).toEqual(['base:allocation', 'qemu:dirty-bitmap:bm0']);
  expect(await c.blockStatus('base:allocation', 0, MiB)).toEqual([
    { lengthBytes: 8192, flags: HOLE_ZERO },
    { lengthBytes: 4096, flags: 0 },
    { lengthBytes: MiB - 12288, flags: HOLE_ZERO },
  ]);
  expect(await c.blockStatus('qemu:dirty-bitmap:bm0', 4096, 100 * KiB)).toEqual([
    { lengthBytes: 60 * KiB, flags: 1 },
    { lengthBytes: 40 * KiB, flags: 0 },
  ]);
  const all = await c.blockStatusAll(0, 16 * KiB);
  expect([...all.keys()]).toEqual(['base:allocation', 'qemu:dirty-bitmap:bm0']);
  expect(all.get('qemu:dirty-bitmap:bm0')).toEqual([{ lengthBytes: 16 * KiB, flags: 1 }]);
  expect(await c.blockStatus('base:allocation', 0, MiB, { reqOne: true })).toEqual(await c.blockStatus('base:allocation', 0, MiB));
  await expect(c.blockStatus('qemu:dirty-bitmap:nope', 0, 1)).rejects.toThrow("context 'qemu:dirty-bitmap:nope' was not selected");
});

test('errors: the server\'s become NbdCommandError with the errno name; what the server does not offer is refused before sending', async () => {
  const e = new MemoryExport('disk0', MiB);
  e.read = async () => {
    throw Object.assign(new Error('the disk is on fire'), { code: 'EIO' });
  };
  const ro = new MemoryExport('ro', MiB, { readOnly: true });
  const s = await start({ exports: [e, ro] });
  const c = await s.connect({ exportName: 'disk0' });
  const error = await c.read(0, 512).catch((x: unknown) => x);
  expect(error).toBeInstanceOf(NbdCommandError);
  expect((error as NbdCommandError).errnoName).toBe('EIO');
  expect((error as NbdCommandError).serverMessage).toBe('the disk is on fire');
  expect((error as Error).message).toBe('NBD read failed: EIO: the disk is on fire');
  expect((error as NbdCommandError).code).toBe(ErrorCode.NBD_COMMAND);
  // The connection goes on.
  await c.write(0, Buffer.alloc(10, 1));
  await expect(c.read(MiB - 1, 2)).rejects.toThrow(RangeError);

  const r = await s.connect({ exportName: 'ro' });
  expect(r.readOnly).toBe(true);
  await expect(r.write(0, Buffer.alloc(1))).rejects.toMatchObject({ errnoName: 'EPERM' });
  await expect(r.trim(0, 1)).rejects.toMatchObject({ errnoName: 'EPERM' });
  const simple = await s.connect({ exportName: 'disk0', structuredReplies: false });
  await expect(simple.read(0, 512)).rejects.toMatchObject({ errnoName: 'EIO', serverMessage: '' });
});

test('an unknown export: NbdOptionError, and the client says ABORT before it hangs up', async () => {
  const s = await start({ exports: [new MemoryExport('disk0', MiB)] });
  const error = await s.connect({ exportName: 'nope' }).catch((x: unknown) => x);
  expect(error).toBeInstanceOf(NbdOptionError);
  expect((error as NbdOptionError).replyName).toBe('errUnknown');
  expect((error as Error).message).toContain("no export named 'nope'");
  const [connection] = s.server.connections;
  if (connection) expect(await connection.closed).toBeUndefined();
});

test('a request that times out is rejected; its slot comes back when its late reply does', async () => {
  let slow = true;
  const e = new MemoryExport('disk0', MiB, { delayMs: () => (slow ? 300 : 0) });
  const s = await start({ exports: [e] });
  const c = await s.connect({ exportName: 'disk0', maxInFlight: 1 });
  const error = await c.read(0, 512, { timeoutMs: 50 }).catch((x: unknown) => x);
  expect((error as GangwayError).code).toBe(ErrorCode.TIMEOUT);
  expect(c.inFlight).toBe(1);
  slow = false;
  // Waits for the slot, which the late reply frees.
  expect((await c.read(0, 512)).length).toBe(512);
  expect(c.inFlight).toBe(0);
  const controller = new AbortController();
  slow = true;
  const aborted = c.read(0, 512, { signal: controller.signal });
  controller.abort();
  await expect(aborted).rejects.toMatchObject({ code: ErrorCode.ABORTED });
});

test('the handshake is bounded: a server that never greets', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'gangway-nbd-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, 'silent.sock');
  const silent = createServer(() => undefined);
  await new Promise<void>((resolve) => silent.listen(path, resolve));
  cleanups.push(() => new Promise<void>((resolve) => silent.close(() => resolve())));
  const socket = createConnection({ path });
  const started = performance.now();
  const error = await NbdClient.connect(socket, { exportName: 'x', connectTimeoutMs: 100 }).catch((x: unknown) => x);
  expect((error as GangwayError).code).toBe(ErrorCode.TIMEOUT);
  expect(performance.now() - started).toBeLessThan(2_000);
  expect(socket.destroyed).toBe(true);
  const controller = new AbortController();
  const socket2 = createConnection({ path });
  const pending = NbdClient.connect(socket2, { exportName: 'x', signal: controller.signal });
  controller.abort();
  await expect(pending).rejects.toMatchObject({ code: ErrorCode.ABORTED });
});

test('close() waits for requests in flight, sends DISC; the server closes cleanly', async () => {
  const e = new MemoryExport('disk0', MiB, { delayMs: () => 50 });
  const s = await start({ exports: [e] });
  const c = await s.connect({ exportName: 'disk0' });
  const [connection] = s.server.connections;
  const read = c.read(0, 4096);
  const closing = c.close();
  await expect(c.read(0, 1)).rejects.toMatchObject({ code: ErrorCode.SHUTTING_DOWN });
  expect((await read).length).toBe(4096);
  await closing;
  expect(await connection!.closed).toBeUndefined();
  expect(s.server.connectionCount).toBe(0);
});

test('server shutdown: the request in flight finishes, the client is told ESHUTDOWN or sees the end', async () => {
  const e = new MemoryExport('disk0', MiB, { delayMs: () => 100 });
  const s = await start({ exports: [e], shutdownGraceMs: 2_000 });
  const c = await s.connect({ exportName: 'disk0' });
  const inFlight = c.read(0, 4096);
  await new Promise((r) => setTimeout(r, 20));
  const shutdown = s.server.close();
  expect((await inFlight).length).toBe(4096);
  await shutdown;
  expect(s.server.connectionCount).toBe(0);
  const reason = await c.closed;
  expect(reason === undefined || (reason as GangwayError).code === ErrorCode.PEER_GONE).toBe(true);
  await expect(c.read(0, 1)).rejects.toBeInstanceOf(GangwayError);
  // A server that is closing takes no new connections.
  await expect(s.connect({ exportName: 'disk0', connectTimeoutMs: 1_000 })).rejects.toBeInstanceOf(GangwayError);
});

describe('the file-backed export', () => {
  function sparseFile(sizeBytes: number): string {
    const dir = mkdtempSync(join(tmpdir(), 'gangway-nbd-file-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const path = join(dir, 'disk.raw');
    writeFileSync(path, '');
    truncateSync(path, sizeBytes);
    return path;
  }

  test('serves a sparse file: holes as holes, data as data; writes, zeroes and FUA reach the file', async () => {
    const path = sparseFile(8 * MiB);
    const fd = openSync(path, 'r+');
    writeSync(fd, pattern(64 * KiB, 4), 0, 64 * KiB, MiB);
    closeSync(fd);
    const e = await FileExport.open(path, { name: 'disk0', description: 'a sparse file' });
    cleanups.push(() => e.close());
    const s = await start({ exports: [e] });
    const c = await s.connect({ exportName: 'disk0', metaContexts: ['base:allocation'] });
    expect([c.sizeBytes, c.description, c.blockSizes.minimumBytes]).toEqual([8 * MiB, 'a sparse file', 1]);
    expect(c.transmissionFlags & (TransmissionFlag.sendTrim | TransmissionFlag.sendWriteZeroes | TransmissionFlag.sendFlush)).toBe(
      TransmissionFlag.sendWriteZeroes | TransmissionFlag.sendFlush,
    );
    expect(await c.blockStatus('base:allocation', 0, 8 * MiB)).toEqual([
      { lengthBytes: MiB, flags: HOLE_ZERO },
      { lengthBytes: 64 * KiB, flags: 0 },
      { lengthBytes: 7 * MiB - 64 * KiB, flags: HOLE_ZERO },
    ]);
    const all = await c.read(0, 8 * MiB);
    expect(all.subarray(MiB, MiB + 64 * KiB).equals(pattern(64 * KiB, 4))).toBe(true);
    expect(all.subarray(0, MiB).every((b) => b === 0)).toBe(true);
    await c.write(5 * MiB + 1, Buffer.from('written through NBD'), { fua: true });
    await c.writeZeroes(MiB + 4096, 4096, { noHole: true });
    await c.flush();
    await c.close();
    const file = readFileSync(path);
    expect(file.toString('utf8', 5 * MiB + 1, 5 * MiB + 20)).toBe('written through NBD');
    expect(file.subarray(MiB + 4096, MiB + 8192).every((b) => b === 0)).toBe(true);
    expect(file.subarray(MiB, MiB + 4096).equals(pattern(4096, 4))).toBe(true);
    expect(statSync(path).size).toBe(8 * MiB);
  });

  test('a file with no blocks at all is one hole without being read; read-only has no write methods', async () => {
    const path = sparseFile(3 * MiB + 100);
    const e = await FileExport.open(path, { name: 'ro', readOnly: true });
    cleanups.push(() => e.close());
    expect([e.write, e.writeZeroes]).toEqual([undefined, undefined]);
    expect(await e.blockStatus('base:allocation', 100, 3 * MiB)).toEqual([{ lengthBytes: 3 * MiB, flags: HOLE_ZERO }]);
    await expect(e.blockStatus('qemu:dirty-bitmap:x', 0, 1)).rejects.toMatchObject({ code: 'EINVAL' });
  });
});

describe('server helpers', () => {
  test('zeroRuns: whole zero granules (aligned to the export) are holes, partial ones data', () => {
    const data = Buffer.alloc(5 * 4096);
    data[4096 + 5] = 1;
    // Starts 100 bytes before a granule boundary.
    expect(zeroRuns(data, 4096 - 100)).toEqual([
      { start: 0, end: 100 + 4096, zero: false },
      { start: 100 + 4096, end: 100 + 4 * 4096, zero: true },
      { start: 100 + 4 * 4096, end: 5 * 4096, zero: false },
    ]);
  });

  test('clipExtents: cut to the request, split past u32, one for REQ_ONE; an export that breaks the interface is EIO', () => {
    expect(clipExtents([{ lengthBytes: 100, flags: 1 }, { lengthBytes: 1000, flags: 0 }], 500, false, 'c')).toEqual([
      { lengthBytes: 100, flags: 1 },
      { lengthBytes: 400, flags: 0 },
    ]);
    expect(clipExtents([{ lengthBytes: 100, flags: 1 }, { lengthBytes: 1000, flags: 0 }], 500, true, 'c')).toEqual([{ lengthBytes: 100, flags: 1 }]);
    expect(clipExtents([{ lengthBytes: 2 ** 33, flags: 3 }], 0xffffffff, false, 'c')).toEqual([
      { lengthBytes: 0xfffff000, flags: 3 },
      { lengthBytes: 0xfff, flags: 3 },
    ]);
    expect(() => clipExtents([], 10, false, 'c')).toThrow('no extent');
    expect(() => clipExtents([{ lengthBytes: 0, flags: 0 }], 10, false, 'c')).toThrow('length 0');
    expect(NbdErrno.EIO).toBe(5);
  });
});
