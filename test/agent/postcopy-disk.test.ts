// PostcopyDisk: a disk in post-copy at the destination, served to the guest as an NBD export
// while its missing blocks arrive. Here on a real sparse file and the addon's region (the
// installs write and fingerprint as a migration's do); the source is the test.
import { closeSync, ftruncateSync, mkdtempSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ENTRY_DATA, ENTRY_ZERO, loadNative } from '../../agent/native.js';
import type { IncomingRegion } from '../../agent/migration/destination-types.js';
import { PostcopyDisk } from '../../agent/migration/postcopy-disk.js';
import { NbdCommandError, NbdErrno } from '../../protocol/nbd/index.js';

const native = loadNative();
const BLOCK = 4096;
const BLOCKS = 16;

/** A block of `byte`. */
const block = (byte: number, count = 1) => Buffer.alloc(BLOCK * count, byte);

/** Settles within a tick or two, or is still pending. */
async function settled<T>(promise: Promise<T>): Promise<'pending' | 'resolved' | 'rejected'> {
  let state: 'pending' | 'resolved' | 'rejected' = 'pending';
  promise.then(
    () => (state = 'resolved'),
    () => (state = 'rejected'),
  );
  for (let i = 0; i < 20; i++) await new Promise((resolve) => setImmediate(resolve));
  return state;
}

describe('PostcopyDisk', () => {
  let dir: string;
  let fd: number;
  let region: IncomingRegion;
  let fetches: number[][];
  let disk: PostcopyDisk;

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'gangway-pcdisk-'));
    fd = openSync(join(dir, 'disk.raw'), 'w+', 0o600);
    ftruncateSync(fd, BLOCK * BLOCKS);
    const handle = native.regionMap(fd, BLOCK * BLOCKS, BLOCK, { writable: true, trackHashes: true, initiallyZero: true, zeroHoles: true });
    region = { fd, handle, pageCount: BLOCKS, pageSizeBytes: BLOCK, lengthBytes: BLOCK * BLOCKS, disk: true };
    fetches = [];
    disk = new PostcopyDisk('disk0', region, native);
  });

  afterEach(() => {
    disk.close();
    native.regionClose(region.handle);
    closeSync(fd);
    rmSync(dir, { recursive: true, force: true });
  });

  const start = (missing: number[]) => disk.start(Uint32Array.from(missing), (runs) => fetches.push([...runs]));
  /** Installs `entries` ([kind, first, count]...) with `data`, as a pages frame's would be. */
  const install = (entries: number[], data: Buffer = Buffer.alloc(0)) => disk.install(Uint32Array.from(entries), data);
  const fileBlock = (index: number) => {
    const out = Buffer.alloc(BLOCK);
    readSync(fd, out, 0, BLOCK, index * BLOCK);
    return out;
  };

  it('before it opens, a read is served from the file as it is (QEMU reads while it opens its drive) and a write waits for the opening', async () => {
    writeSync(fd, block(7), 0, BLOCK, 0);
    expect(await disk.read(0, 512)).toEqual(Buffer.alloc(512, 7));
    const write = disk.write(BLOCK, block(9), { fua: false });
    expect(await settled(write)).toBe('pending');
    disk.openComplete();
    await write;
    expect(fileBlock(1)).toEqual(block(9));
    expect(fetches).toEqual([]);
  });

  it('a read of missing blocks asks the source once for them and waits until each arrived, by fetch or by push', async () => {
    start([2, 2, 8, 1]);
    const read = disk.read(2 * BLOCK + 100, BLOCK);
    const again = disk.read(3 * BLOCK, 16);
    expect(await settled(read)).toBe('pending');
    // Blocks 2 and 3 asked for once, in one run; the second read waits on what is asked already.
    expect(fetches).toEqual([[2, 2]]);
    install([ENTRY_DATA, 2, 1], block(0xa2));
    expect(await settled(read)).toBe('pending');
    install([ENTRY_DATA, 3, 1], block(0xa3));
    expect(await read).toEqual(Buffer.concat([Buffer.alloc(BLOCK - 100, 0xa2), Buffer.alloc(100, 0xa3)]));
    expect(await again).toEqual(Buffer.alloc(16, 0xa3));
    // Block 8 came by the push, without a request.
    install([ENTRY_DATA, 8, 1], block(0xa8));
    expect(disk.missingPages).toBe(0);
    await disk.whenComplete();
    expect(disk.stats()).toMatchObject({ missingPages: 3, faults: 2, fetchedPages: 2, pushedPages: 1 });
    // A block that was never missing is read at once.
    expect(await disk.read(0, BLOCK)).toEqual(block(0));
  });

  it('a late block never overwrites what the guest wrote since, and the fingerprints are those of the blocks as they arrived', async () => {
    start([5, 1]);
    install([ENTRY_DATA, 5, 1], block(0x51));
    await disk.write(5 * BLOCK, block(0x52), { fua: true });
    // The push's copy of block 5 comes after all (sent before the fetch was answered).
    install([ENTRY_DATA, 5, 1], block(0x53));
    expect(await disk.read(5 * BLOCK, BLOCK)).toEqual(block(0x52));
    expect(fileBlock(5)).toEqual(block(0x52));
    // The tracked digest is the disk as it arrived: block 5 as 0x51.
    const readFd = openSync(join(dir, 'disk.raw'), 'r');
    const expected = native.regionMap(readFd, BLOCK * BLOCKS, BLOCK, { writable: false, trackHashes: false, initiallyZero: false });
    closeSync(readFd);
    try {
      const arrived = await native.regionDigest(region.handle, 'tracked');
      writeSync(fd, block(0x51), 0, BLOCK, 5 * BLOCK);
      expect(arrived.equals(await native.regionDigest(expected, 'full'))).toBe(true);
    } finally {
      native.regionClose(expected);
    }
  });

  it('a write of part of a missing block waits for the block and lands on top of it', async () => {
    start([7, 1]);
    const write = disk.write(7 * BLOCK + 512, Buffer.alloc(512, 0xee), { fua: false });
    expect(await settled(write)).toBe('pending');
    expect(fetches).toEqual([[7, 1]]);
    install([ENTRY_DATA, 7, 1], block(0x77));
    await write;
    expect(fileBlock(7)).toEqual(Buffer.concat([Buffer.alloc(512, 0x77), Buffer.alloc(512, 0xee), Buffer.alloc(BLOCK - 1024, 0x77)]));
  });

  it('takes out of a frame only the blocks still missing, zero and data alike', async () => {
    start([0, 6]);
    install([ENTRY_DATA, 2, 1], block(0x22));
    await disk.write(2 * BLOCK, block(0x99), { fua: false });
    writeSync(fd, block(0x44), 0, BLOCK, 4 * BLOCK); // as if a zero block had data before the switchover
    // A frame: zeroes for 0..1, data for 2..4 (2 is here already), zeroes for 5.
    install([ENTRY_ZERO, 0, 2, ENTRY_DATA, 2, 3, ENTRY_ZERO, 5, 1], Buffer.concat([block(0x33), block(0x34), block(0x35)]));
    expect(disk.missingPages).toBe(0);
    expect([0, 1, 2, 3, 4, 5].map((i) => fileBlock(i)[0])).toEqual([0, 0, 0x99, 0x34, 0x35, 0]);
    expect(disk.stats()).toMatchObject({ missingPages: 6, fetchedPages: 0, pushedPages: 6 });
  });

  it('after a reattach, asks again for exactly the blocks requests still wait on, and lists what is missing', async () => {
    start([1, 3, 10, 2]);
    const read = disk.read(2 * BLOCK, BLOCK);
    expect(await settled(read)).toBe('pending');
    install([ENTRY_DATA, 1, 1], block(1));
    expect([...disk.missingRuns()]).toEqual([2, 2, 10, 2]);
    fetches = [];
    disk.refetch();
    expect(fetches).toEqual([[2, 1]]);
    install([ENTRY_DATA, 2, 1], block(2));
    expect(await read).toEqual(block(2));
  });

  it('zeroes and discards punch whole blocks and write zeroes at the edges; flush and FUA go to the file', async () => {
    disk.openComplete();
    await disk.write(0, block(0xff, 4), { fua: false });
    await disk.writeZeroes(BLOCK - 100, BLOCK + 200, { noHole: false, fua: true });
    expect(fileBlock(0).subarray(0, BLOCK - 100)).toEqual(Buffer.alloc(BLOCK - 100, 0xff));
    expect(fileBlock(0).subarray(BLOCK - 100)).toEqual(Buffer.alloc(100));
    expect(fileBlock(1)).toEqual(block(0));
    expect(fileBlock(2).subarray(0, 100)).toEqual(Buffer.alloc(100));
    expect(fileBlock(2).subarray(100)).toEqual(Buffer.alloc(BLOCK - 100, 0xff));
    await disk.trim(3 * BLOCK, BLOCK, { fua: false });
    expect(fileBlock(3)).toEqual(block(0));
    // Blocks 1 and 3 are holes now: only 0 and 2 hold data.
    expect([...native.fileDataRuns(fd, BLOCK, BLOCKS)]).toEqual([0, 1, 2, 1]);
    await disk.flush();
  });

  it('closed, requests still waiting fail with EIO; a complete disk serves on', async () => {
    start([4, 1]);
    const read = disk.read(4 * BLOCK, BLOCK);
    disk.close();
    const err = await read.catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdCommandError);
    expect((err as NbdCommandError).errno).toBe(NbdErrno.EIO);
    await expect(disk.read(4 * BLOCK, 1)).rejects.toThrow(/ended before its blocks arrived/);
    const whole = new PostcopyDisk('disk1', region, native);
    whole.openComplete();
    whole.close();
    expect(await whole.read(0, 16)).toEqual(Buffer.alloc(16));
  });
});
