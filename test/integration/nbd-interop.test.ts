// NBD against peers we did not write.
//  - Our client against QEMU's server (qemu-nbd 7.2) on a raw and on a qcow2 image: what it
//    reads, the allocation it reports and the dirty bitmap it exposes are checked against
//    QEMU's own view (qemu-img map, qemu-img convert, the file's bytes), and what it writes,
//    zeroes and trims is checked in the image after qemu-nbd has let go of it.
//  - Third-party clients against our server on a sparse file: libnbd's nbdinfo (--json,
//    --map, --list) and QEMU's NBD client (qemu-img map/convert/compare, qemu-io).
// Every test makes its own temp dir and kills the processes it started by their PIDs, also
// when it failed. A missing tool skips its part, saying which.
import { type ChildProcess, spawn } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { type Socket, createConnection } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import { afterEach, describe, expect, test } from 'vitest';
import { NbdClient } from '../../agent/nbd/client.js';
import type { Extent } from '../../agent/nbd/export.js';
import { FileExport } from '../../agent/nbd/file-export.js';
import { AllocationFlag, DirtyFlag } from '../../protocol/nbd/index.js';
import { type Served, serve } from '../helpers/nbd.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const TOOL_TIMEOUT_MS = 20_000;

async function missing(tools: string[]): Promise<string | undefined> {
  for (const tool of tools) {
    const r = await execa(tool, ['--version'], { reject: false, timeout: 10_000, stdin: 'ignore' });
    if (r.failed) return `${tool} is not usable: ${(r.shortMessage ?? 'failed').split('\n')[0]}`;
  }
  return undefined;
}

const qemuMissing = await missing(['qemu-nbd', 'qemu-img', 'qemu-io']);
const nbdinfoMissing = await missing(['nbdinfo']);
const skipped = (reason: string | undefined) => (reason === undefined ? '' : ` (skipped: ${reason})`);

// ---- cleanup, also after a failure ------------------------------------------------------

const dirs: string[] = [];
const children: ChildProcess[] = [];
const clients: NbdClient[] = [];
const servers: Served[] = [];
const exportsOpen: FileExport[] = [];

afterEach(async () => {
  for (const c of clients.splice(0)) c.destroy();
  for (const s of servers.splice(0)) await s.close();
  for (const e of exportsOpen.splice(0)) await e.close();
  for (const child of children.splice(0)) await stop(child);
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'gangway-nbd-interop-'));
  dirs.push(d);
  return d;
}

/** SIGTERM the child by its PID, SIGKILL it if it has not exited within 3 s. */
async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  process.kill(child.pid, 'SIGTERM');
  const timer = setTimeout(() => child.pid !== undefined && child.exitCode === null && process.kill(child.pid, 'SIGKILL'), 3_000);
  await exited;
  clearTimeout(timer);
}

async function run(tool: string, args: string[]): Promise<string> {
  const r = await execa(tool, args, { reject: false, timeout: TOOL_TIMEOUT_MS, stdin: 'ignore' });
  if (r.exitCode !== 0) throw new Error(`${tool} ${args.join(' ')} exited ${r.exitCode ?? r.signal}: ${r.stderr || r.stdout}`);
  return r.stdout;
}

/** Starts qemu-nbd serving `image` on a unix socket; resolves once it accepts connections. */
async function qemuNbd(dir: string, image: string, args: string[]): Promise<{ socketPath: string; connect: (contexts?: string[]) => Promise<NbdClient> }> {
  const socketPath = join(dir, 'qemu-nbd.sock');
  const child = spawn('qemu-nbd', ['--persistent', '-k', socketPath, ...args, image], { stdio: ['ignore', 'ignore', 'pipe'] });
  children.push(child);
  let stderr = '';
  child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
  const deadline = performance.now() + 5_000;
  for (;;) {
    const socket = await new Promise<Socket | undefined>((resolve) => {
      const s = createConnection({ path: socketPath });
      s.once('connect', () => resolve(s));
      s.once('error', () => resolve(undefined));
    });
    if (socket !== undefined) {
      socket.destroy();
      break;
    }
    if (child.exitCode !== null || performance.now() > deadline) throw new Error(`qemu-nbd (pid ${child.pid}) did not come up: ${stderr}`);
    await sleep(20);
  }
  const exportName = args[args.indexOf('-x') + 1]!;
  return {
    socketPath,
    async connect(contexts = ['base:allocation']) {
      const socket = createConnection({ path: socketPath });
      await new Promise((resolve, reject) => socket.once('connect', resolve).once('error', reject));
      const client = await NbdClient.connect(socket, { exportName, metaContexts: contexts });
      clients.push(client);
      return client;
    },
  };
}

interface MapEntry {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
}

/** qemu-img map's JSON, merged where neighbours say the same. */
function mergeMap(entries: MapEntry[]): { start: number; length: number; data: boolean }[] {
  const out: { start: number; length: number; data: boolean }[] = [];
  for (const e of entries) {
    const last = out.at(-1);
    if (last !== undefined && last.data === e.data) last.length += e.length;
    else out.push({ start: e.start, length: e.length, data: e.data });
  }
  return out;
}

/** Our extents in qemu-img map's terms: a hole is data: false. */
function asMap(extents: Extent[], flag: number, set: boolean): { start: number; length: number; data: boolean }[] {
  let at = 0;
  return mergeMap(
    extents.map((e) => {
      const entry = { start: at, length: e.lengthBytes, data: ((e.flags & flag) !== 0) === set, zero: false };
      at += e.lengthBytes;
      return entry;
    }),
  );
}

const qemuImgMap = async (args: string[]) => mergeMap(JSON.parse(await run('qemu-img', ['map', '--output=json', ...args])) as MapEntry[]);

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) b[i] = (i * 7 + seed) & 0xff;
  return b;
}

// ---- our client, QEMU's server ----------------------------------------------------------

describe.skipIf(qemuMissing !== undefined)(`our NBD client against qemu-nbd${skipped(qemuMissing)}`, () => {
  test('a sparse raw image: reads, allocation as qemu-img map sees it, then write, zeroes, trim and flush land in the file', async () => {
    const dir = tempDir();
    const image = join(dir, 'disk.raw');
    await run('qemu-img', ['create', '-f', 'raw', image, '16M']);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 1M 64k', '-c', 'write -P 0x22 5M 128k', image]);
    const nbd = await qemuNbd(dir, image, ['-f', 'raw', '-x', 'disk', '--discard=unmap', '--cache=none', '--aio=threads']);
    const client = await nbd.connect();
    expect([client.sizeBytes, client.structuredReplies, client.metaContexts]).toEqual([16 * MiB, true, ['base:allocation']]);

    const extents = await client.blockStatus('base:allocation', 0, client.sizeBytes);
    expect(asMap(extents, AllocationFlag.hole, false)).toEqual(await qemuImgMap(['-U', '-f', 'raw', image]));
    expect(asMap(extents, AllocationFlag.hole, false).filter((e) => e.data).map((e) => [e.start, e.length])).toContainEqual([MiB, 64 * KiB]);
    expect((await client.read(0, client.sizeBytes)).equals(readFileSync(image))).toBe(true);

    const written = pattern(70_000, 3);
    await client.write(8 * MiB + 1, written, { fua: true });
    await client.writeZeroes(MiB + 4 * KiB, 4 * KiB);
    await client.trim(5 * MiB, 128 * KiB);
    await client.flush();
    expect((await client.read(8 * MiB + 1, written.length)).equals(written)).toBe(true);
    await client.close();
    await stop(children.pop()!);

    const file = readFileSync(image);
    expect(file.subarray(8 * MiB + 1, 8 * MiB + 1 + written.length).equals(written)).toBe(true);
    expect(file.subarray(MiB, MiB + 4 * KiB).every((b) => b === 0x11)).toBe(true);
    expect(file.subarray(MiB + 4 * KiB, MiB + 8 * KiB).every((b) => b === 0)).toBe(true);
    expect(file.subarray(MiB + 8 * KiB, MiB + 64 * KiB).every((b) => b === 0x11)).toBe(true);
    // The trim punched a hole: zeroes, and no longer data in QEMU's map.
    expect(file.subarray(5 * MiB, 5 * MiB + 128 * KiB).every((b) => b === 0)).toBe(true);
    const after = await qemuImgMap(['-f', 'raw', image]);
    expect(after.find((e) => e.start <= 5 * MiB && e.start + e.length >= 5 * MiB + 128 * KiB)?.data).toBe(false);
  });

  test('a qcow2 image with a persistent dirty bitmap: qemu:dirty-bitmap as qemu-img reads it, and our writes mark it', async () => {
    const dir = tempDir();
    const image = join(dir, 'disk.qcow2');
    await run('qemu-img', ['create', '-f', 'qcow2', image, '16M']);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x01 0 64k', image]);
    await run('qemu-img', ['bitmap', '--add', image, 'bm0']);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x02 1M 64k', '-c', 'write -P 0x03 3M 128k', image]);
    const expectedContent = join(dir, 'before.raw');
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, expectedContent]);
    // -e 2: qemu-img map reads the bitmap over a second connection while ours is open.
    const nbd = await qemuNbd(dir, image, ['-f', 'qcow2', '-x', 'd2', '-B', 'bm0', '-e', '2', '--discard=unmap']);
    const client = await nbd.connect(['base:allocation', 'qemu:dirty-bitmap:bm0']);
    expect(client.metaContexts).toEqual(['base:allocation', 'qemu:dirty-bitmap:bm0']);

    const dirty = await client.blockStatus('qemu:dirty-bitmap:bm0', 0, client.sizeBytes);
    expect(dirty).toEqual([
      { lengthBytes: MiB, flags: 0 },
      { lengthBytes: 64 * KiB, flags: DirtyFlag.dirty },
      { lengthBytes: 2 * MiB - 64 * KiB, flags: 0 },
      { lengthBytes: 128 * KiB, flags: DirtyFlag.dirty },
      { lengthBytes: 13 * MiB - 128 * KiB, flags: 0 },
    ]);
    // qemu-img map shows a bitmap through x-dirty-bitmap inverted: dirty is data: false.
    const viaQemu = await qemuImgMap(['--image-opts', `driver=nbd,server.type=unix,server.path=${nbd.socketPath},export=d2,x-dirty-bitmap=qemu:dirty-bitmap:bm0`]);
    expect(asMap(dirty, DirtyFlag.dirty, false)).toEqual(viaQemu);

    const allocation = await client.blockStatus('base:allocation', 0, client.sizeBytes);
    expect(asMap(allocation, AllocationFlag.hole, false)).toEqual(await qemuImgMap(['-U', '-f', 'qcow2', image]));
    expect((await client.read(0, client.sizeBytes)).equals(readFileSync(expectedContent))).toBe(true);

    // Writes through our client: the export's content and its bitmap both change.
    await client.write(6 * MiB, pattern(64 * KiB, 9));
    await client.writeZeroes(0, 64 * KiB);
    await client.trim(3 * MiB, 128 * KiB);
    await client.flush();
    const dirtyAfter = await client.blockStatus('qemu:dirty-bitmap:bm0', 0, client.sizeBytes);
    const dirtyRanges = asMap(dirtyAfter, DirtyFlag.dirty, true).filter((e) => e.data).map((e) => [e.start, e.length]);
    expect(dirtyRanges).toEqual([
      [0, 64 * KiB],
      [MiB, 64 * KiB],
      [3 * MiB, 128 * KiB],
      [6 * MiB, 64 * KiB],
    ]);
    await client.close();
    await stop(children.pop()!);

    const content = join(dir, 'after.raw');
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, content]);
    const after = readFileSync(content);
    expect(after.subarray(6 * MiB, 6 * MiB + 64 * KiB).equals(pattern(64 * KiB, 9))).toBe(true);
    expect(after.subarray(0, 64 * KiB).every((b) => b === 0)).toBe(true);
    expect(after.subarray(3 * MiB, 3 * MiB + 128 * KiB).every((b) => b === 0)).toBe(true);
    expect(after.subarray(MiB, MiB + 64 * KiB).every((b) => b === 0x02)).toBe(true);
    // The trimmed clusters were freed in the qcow2.
    const map = await qemuImgMap(['-f', 'qcow2', image]);
    expect(map.find((e) => e.start <= 3 * MiB && e.start + e.length >= 3 * MiB + 128 * KiB)?.data).toBe(false);
  });

  test('an export qemu-nbd does not have: NbdOptionError errUnknown with its message', async () => {
    const dir = tempDir();
    const image = join(dir, 'disk.raw');
    await run('qemu-img', ['create', '-f', 'raw', image, '1M']);
    const nbd = await qemuNbd(dir, image, ['-f', 'raw', '-x', 'disk']);
    const socket = createConnection({ path: nbd.socketPath });
    await new Promise((resolve) => socket.once('connect', resolve));
    await expect(NbdClient.connect(socket, { exportName: 'nope' })).rejects.toMatchObject({ replyName: 'errUnknown' });
  });
});

// ---- their clients, our server ----------------------------------------------------------

/** A 16 MiB sparse file with data at 1 MiB (64 KiB) and 6 MiB (4 KiB), served by our server as 'disk'. */
async function ourServer(): Promise<{ dir: string; path: string; served: Served; url: string }> {
  const dir = tempDir();
  const path = join(dir, 'disk.raw');
  writeFileSync(path, '');
  truncateSync(path, 16 * MiB);
  const fd = openSync(path, 'r+');
  writeSync(fd, pattern(64 * KiB, 1), 0, 64 * KiB, MiB);
  writeSync(fd, pattern(4 * KiB, 2), 0, 4 * KiB, 6 * MiB);
  closeSync(fd);
  const disk = await FileExport.open(path, { name: 'disk', description: 'a sparse test disk' });
  const ro = await FileExport.open(path, { name: 'ro', readOnly: true });
  exportsOpen.push(disk, ro);
  const served = await serve({ exports: [disk, ro] });
  servers.push(served);
  return { dir, path, served, url: `nbd+unix:///disk?socket=${served.socketPath}` };
}

const EXPECTED_LAYOUT = [
  { start: 0, length: MiB, data: false },
  { start: MiB, length: 64 * KiB, data: true },
  { start: MiB + 64 * KiB, length: 5 * MiB - 64 * KiB, data: false },
  { start: 6 * MiB, length: 4 * KiB, data: true },
  { start: 6 * MiB + 4 * KiB, length: 10 * MiB - 4 * KiB, data: false },
];

describe.skipIf(nbdinfoMissing !== undefined)(`nbdinfo (libnbd) against our server${skipped(nbdinfoMissing)}`, () => {
  test('--json describes the export as we serve it', async () => {
    const { url } = await ourServer();
    const info = JSON.parse(await run('nbdinfo', ['--json', url])) as { protocol: string; structured: boolean; exports: Record<string, unknown>[] };
    expect([info.protocol, info.structured]).toEqual(['newstyle-fixed', true]);
    expect(info.exports[0]).toMatchObject({
      'export-name': 'disk',
      description: 'a sparse test disk',
      contexts: ['base:allocation'],
      is_read_only: false,
      can_flush: true,
      can_fua: true,
      can_zero: true,
      can_trim: false,
      can_df: true,
      block_size_minimum: 1,
      block_size_preferred: 4096,
      block_size_maximum: 32 * MiB,
      'export-size': 16 * MiB,
    });
  });

  test('--map shows the holes and the data where the file has them', async () => {
    const { url } = await ourServer();
    const map = JSON.parse(await run('nbdinfo', ['--map', '--json', url])) as { offset: number; length: number; type: number; description: string }[];
    expect(map.map((e) => ({ start: e.offset, length: e.length, data: (e.type & AllocationFlag.hole) === 0 }))).toEqual(EXPECTED_LAYOUT);
    expect(map.filter((e) => e.type !== 0).every((e) => e.description === 'hole,zero')).toBe(true);
  });

  test('--list lists both exports, the read-only one as such', async () => {
    const { served } = await ourServer();
    const list = JSON.parse(await run('nbdinfo', ['--list', '--json', `nbd+unix://?socket=${served.socketPath}`])) as { exports: Record<string, unknown>[] };
    expect(list.exports.map((e) => [e['export-name'], e.is_read_only])).toEqual([
      ['disk', false],
      ['ro', true],
    ]);
  });
});

describe.skipIf(qemuMissing !== undefined)(`QEMU's NBD client (qemu-img, qemu-io) against our server${skipped(qemuMissing)}`, () => {
  test('qemu-img map, convert and compare: holes seen, the copy byte-identical and sparse', async () => {
    const { dir, path, url } = await ourServer();
    expect(await qemuImgMap(['-f', 'raw', url])).toEqual(EXPECTED_LAYOUT);
    const copy = join(dir, 'copy.raw');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', url, copy]);
    expect(readFileSync(copy).equals(readFileSync(path))).toBe(true);
    // Only the data was written: the holes came across as holes.
    expect(statSync(copy).blocks * 512).toBeLessThanOrEqual(MiB);
    expect(await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', url, path])).toContain('Images are identical');
  });

  test('qemu-io writes, zeroes and verifies through our server; the bytes land in the file', async () => {
    const { path, url } = await ourServer();
    const out = await run('qemu-io', [
      '-f', 'raw',
      '-c', 'write -P 0x5a 2M 64k',
      // -u: zeroes that may unmap (NO_HOLE clear); without it QEMU sets NO_HOLE.
      '-c', 'write -z -u 6M 4k',
      '-c', 'write -z 1M 512',
      '-c', 'write -P 0x6b -f 3M 512',
      '-c', 'flush',
      '-c', 'read -P 0x5a 2M 64k',
      '-c', 'read -P 0 6M 4k',
      url,
    ]);
    expect(out).not.toContain('Pattern verification failed');
    const file = readFileSync(path);
    expect(file.subarray(2 * MiB, 2 * MiB + 64 * KiB).every((b) => b === 0x5a)).toBe(true);
    expect(file.subarray(6 * MiB, 6 * MiB + 4 * KiB).every((b) => b === 0)).toBe(true);
    expect(file.subarray(MiB, MiB + 512).every((b) => b === 0)).toBe(true);
    expect(file.subarray(MiB + 512, MiB + 64 * KiB).equals(pattern(64 * KiB, 1).subarray(512))).toBe(true);
    expect(file.subarray(3 * MiB, 3 * MiB + 512).every((b) => b === 0x6b)).toBe(true);
    // The read-only export: QEMU sees NBD_FLAG_READ_ONLY and will not open it for writing, but reads it.
    const roUrl = url.replace('/disk?', '/ro?');
    const ro = await execa('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 512', roUrl], { reject: false, timeout: TOOL_TIMEOUT_MS });
    expect(ro.exitCode).not.toBe(0);
    expect(ro.stderr).toContain('Permission denied');
    expect(await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x5a 2M 64k', roUrl])).not.toContain('Pattern verification failed');
  });
});
