// gangway-testvm's disk: QEMU (TCG, q35) boots the test kernel with a legacy virtio-blk disk
// whose base image writeTestvmBaseImage wrote. The tests read the kernel's status block from
// its memory file, change blocks of the image file behind the kernel's back, and check that
// the kernel's own checks (its rewrites and the full check) find exactly those.
import { randomBytes } from 'node:crypto';
import { closeSync, openSync, readFileSync, readSync, rmSync, statSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { QmpClient } from '../../agent/guest/qmp.js';
import { qemuMissing } from '../../agent/guest/qemu-guest.js';
import { TESTVM_DISK_BLOCK_BYTES, writeTestvmBaseImage } from '../../agent/guest/testvm-disk.js';
import {
  readTestvmDiskVersions,
  readTestvmStatus,
  requestTestvmFullCheck,
  runTestvmFullCheck,
  type TestvmStatus,
} from '../../agent/guest/testvm-status.js';
import { loadNative, testvmMissing } from '../../agent/native.js';
import { bootTestvm, QEMU, serialLog, status, stopTestvms, type Vm } from '../helpers/testvm-qemu.js';
import { waitFor } from '../helpers/wait.js';

const MiB = 1 << 20;
const BLOCK = TESTVM_DISK_BLOCK_BYTES;
const DISK_BYTES = 64 * MiB;
const BASE_BLOCKS = (16 * MiB) / BLOCK;
const BOOT_TIMEOUT_MS = 15_000;
const CHECK_TIMEOUT_MS = 20_000;

const skipReason = qemuMissing(QEMU) ?? testvmMissing();

/** How QEMU attaches the image: the two ways gangway may, and one that fails the first write (blkdebug). */
type DiskSyntax = 'blockdev' | 'drive' | 'failing-write';

const files: string[] = [];

function uniquePath(dir: string, what: string): string {
  const path = join(dir, `gangway-testvm-disk-${process.pid}-${randomBytes(6).toString('hex')}.${what}`);
  files.push(path);
  return path;
}

function diskArgs(syntax: DiskSyntax, imagePath: string): string[] {
  const device = ['-device', 'virtio-blk-pci,drive=d0,disable-modern=on'];
  if (syntax === 'drive') return ['-drive', `if=none,id=d0,format=raw,file=${imagePath}`, ...device];
  if (syntax === 'failing-write') {
    const blkdebug = { driver: 'blkdebug', 'node-name': 'b0', image: 'f0', 'inject-error': [{ event: 'write_aio', errno: 5, once: true }] };
    return [
      '-blockdev', `driver=file,filename=${imagePath},node-name=f0`,
      '-blockdev', JSON.stringify(blkdebug),
      '-blockdev', 'driver=raw,file=b0,node-name=d0',
      ...device,
    ];
  }
  return [
    '-blockdev', `driver=file,filename=${imagePath},node-name=f0`,
    '-blockdev', 'driver=raw,file=f0,node-name=d0',
    ...device,
  ];
}

function boot(append: string, disk?: { syntax: DiskSyntax; imagePath: string }): Vm {
  return bootTestvm(append, disk ? diskArgs(disk.syntax, disk.imagePath) : []);
}

/** Waits for the kernel to run (or to fail, for a boot that must fail) and returns its status then. */
async function waitBooted(vm: Vm, state: 'running' | 'failed' = 'running'): Promise<TestvmStatus> {
  return waitFor(
    `the kernel to be ${state}`,
    () => {
      if (vm.exitCode !== undefined) throw new Error(`${QEMU} exited (${vm.exitCode}): ${vm.stderr}\n${serialLog(vm)}`);
      try {
        const s = status(vm);
        return s.state === state && s;
      } catch {
        return false; // no status block yet
      }
    },
    BOOT_TIMEOUT_MS,
  );
}

/** A raw disk image of DISK_BYTES with BASE_BLOCKS of base content of `imageSeed`. */
function baseImage(imageSeed: bigint) {
  const path = uniquePath(tmpdir(), 'img');
  return { path, written: writeTestvmBaseImage(path, { sizeBytes: DISK_BYTES, baseBlocks: BASE_BLOCKS, imageSeed }) };
}

function readBlock(path: string, block: number): Buffer {
  const buf = Buffer.alloc(BLOCK);
  const fd = openSync(path, 'r');
  try {
    readSync(fd, buf, 0, BLOCK, block * BLOCK);
  } finally {
    closeSync(fd);
  }
  return buf;
}

/** Overwrites the first sector of `block` in the image with bytes it does not hold. */
function alterBlock(path: string, block: number): void {
  const sector = readBlock(path, block).subarray(0, 512);
  for (let i = 0; i < sector.length; i++) sector[i] = (sector[i] ?? 0) ^ 0x5a;
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, sector, 0, sector.length, block * BLOCK);
  } finally {
    closeSync(fd);
  }
}

/** What the kernel's generator says block `block` holds at `version`. */
function expectedBlock(seed: bigint, imageSeed: bigint, block: number, version: number): Buffer {
  const out = Buffer.alloc(BLOCK);
  loadNative().testvmDiskBlocks(seed, imageSeed, BASE_BLOCKS, block, Uint32Array.of(version), out, new Uint8Array(1));
  return out;
}

afterEach(async (ctx) => {
  await stopTestvms(ctx.task.result?.state === 'fail');
  for (const path of files.splice(0)) rmSync(path, { force: true });
});

describe('the testvm base image writer (no VM)', () => {
  it('writes the base blocks the kernel generates, sparse, and nothing after them', () => {
    const { path, written } = baseImage(7n);
    expect(statSync(path).size).toBe(DISK_BYTES);
    expect(written.dataBlocks + written.zeroBlocks).toBe(BASE_BLOCKS);
    // os-image-like: about a fifth of the image's blocks are zero, left as holes with the rest.
    expect(written.zeroBlocks / BASE_BLOCKS).toBeGreaterThan(0.1);
    expect(written.zeroBlocks / BASE_BLOCKS).toBeLessThan(0.3);
    expect(statSync(path).blocks * 512).toBeLessThanOrEqual(written.dataBlocks * BLOCK + MiB);
    for (const block of [0, 1, 1234, BASE_BLOCKS - 1]) {
      expect(readBlock(path, block).equals(expectedBlock(0n, 7n, block, 0)), `block ${block}`).toBe(true);
    }
    expect(readBlock(path, BASE_BLOCKS).equals(Buffer.alloc(BLOCK))).toBe(true);
    // The same image seed gives the same base (clones of one image); another seed, another.
    const again = baseImage(7n);
    expect(readFileSync(again.path).equals(readFileSync(path))).toBe(true);
    expect(expectedBlock(0n, 8n, 1234, 0).equals(readBlock(path, 1234))).toBe(false);
    // Written versions are the kernel's seed's, never the base's.
    expect(expectedBlock(5n, 7n, 1234, 1).equals(readBlock(path, 1234))).toBe(false);
  });

  it('refuses a size that is not whole blocks or a base that does not fit', () => {
    const path = uniquePath(tmpdir(), 'img');
    expect(() => writeTestvmBaseImage(path, { sizeBytes: DISK_BYTES + 512, baseBlocks: 1, imageSeed: 1n })).toThrow(/multiple of 4096/);
    expect(() => writeTestvmBaseImage(path, { sizeBytes: MiB, baseBlocks: 257, imageSeed: 1n })).toThrow(/do not fit/);
  });
});

describe.skipIf(skipReason !== undefined)(`gangway-testvm's disk under QEMU TCG${skipReason ? ` (skipped: ${skipReason})` : ''}`, () => {
  it('with -blockdev: rewrites its hot blocks with none stale, a full check passes, and blocks changed while QEMU is stopped are found', async () => {
    const image = baseImage(7n);
    const vm = boot(
      `gw.seed=5 gw.image_seed=7 gw.hot=50 gw.rate=1024 gw.disk_base=${BASE_BLOCKS} gw.disk_hot=256 gw.disk_rate=400`,
      { syntax: 'blockdev', imagePath: image.path },
    );
    const first = await waitBooted(vm);
    expect(first.disk).toMatchObject({
      state: 'running',
      blockSizeBytes: BLOCK,
      capacityBytes: DISK_BYTES,
      blockCount: DISK_BYTES / BLOCK,
      baseBlocks: BASE_BLOCKS,
      hotBlocks: 256,
      rateBlocksPerSec: 400,
      staleBlocks: 0,
      errors: 0,
    });
    expect(serialLog(vm)).toMatch(/^virtio-blk at .* 67108864 bytes$/m);

    const later = await waitFor(
      '2 s of disk writes',
      () => {
        const s = status(vm);
        return s.uptimeMs >= first.uptimeMs + 2000 && s;
      },
      10_000,
    );
    const disk = later.disk!;
    const blocksPerSec = (disk.writes - first.disk!.writes) / ((later.uptimeMs - first.uptimeMs) / 1000);
    // Never above the knob; below it only as far as the host starves the guest: each block is a
    // read, a check and a write under TCG, and a loaded CI host once held it to 306 of 400 a second.
    expect(blocksPerSec).toBeGreaterThan(400 * 0.5);
    expect(blocksPerSec).toBeLessThan(400 * 1.1);
    expect(disk.passes).toBeGreaterThanOrEqual(2);
    expect(disk).toMatchObject({ staleBlocks: 0, errors: 0 });
    expect(disk.blocksChecked).toBeGreaterThanOrEqual(disk.writes);
    expect(later.stalePages).toBe(0);
    expect(serialLog(vm)).toMatch(/^t=\d+ pass=\d+ writes=\d+ stale=0 disk_writes=\d+ disk_stale=0$/m);

    const checked = await runTestvmFullCheck(vm.memPath, CHECK_TIMEOUT_MS);
    expect(checked).toMatchObject({ checkStalePages: 0, metaErrors: 0 });
    // Every base block and every block written beyond the base (hot blocks are spread over the disk).
    expect(checked.disk!.checkBlocks).toBeGreaterThan(BASE_BLOCKS);
    expect(checked.disk!.checkBlocks).toBeLessThanOrEqual(BASE_BLOCKS + checked.disk!.blocksWritten);
    expect(checked.disk!.checkStaleBlocks).toBe(0);
    expect(serialLog(vm)).toContain(`check ${checked.checkDone}: pages=${checked.pageCount} stale=0 disk_blocks=${checked.disk!.checkBlocks} disk_stale=0`);

    // Stopped by QEMU (so its requests are drained), two written blocks change in the image
    // file. Two, because one may be the block the kernel was about to rewrite (read back and
    // checked already), which it would then overwrite unseen; it cannot be both.
    const qmp = await QmpClient.connect(vm.qmpPath);
    try {
      await qmp.stop();
      const stopped = readTestvmStatus(vm.memPath);
      const versions = readTestvmDiskVersions(vm.memPath, stopped);
      const written = [...versions.keys()].filter((b) => versions[b]! > 0 && b !== stopped.disk!.inflightBlock);
      const victims = [written[0]!, written[written.length - 1]!];
      expect(victims[0]).not.toBe(victims[1]);
      for (const block of victims) {
        expect(readBlock(image.path, block).equals(expectedBlock(5n, 7n, block, versions[block]!)), `block ${block} as written`).toBe(true);
        alterBlock(image.path, block);
      }
      const request = requestTestvmFullCheck(vm.memPath);
      await qmp.cont();
      const found = await waitFor(
        'the full check after the change',
        () => {
          const s = status(vm);
          return s.checkDone === request && s;
        },
        CHECK_TIMEOUT_MS,
      );
      expect(found.disk!.checkStaleBlocks).toBeGreaterThanOrEqual(1);
      expect(found.disk!.checkStaleBlocks).toBeLessThanOrEqual(2);
      expect(found.disk!.staleBlocks).toBeGreaterThanOrEqual(1);
      expect(victims).toContain(found.disk!.lastStaleBlock);
      expect(found.checkStalePages).toBe(0);
      expect(serialLog(vm)).toMatch(new RegExp(`^stale disk block (${victims.join('|')}): not version \\d+ \\(full check\\)$`, 'm'));
    } finally {
      await qmp.close();
    }
  });

  it('with -drive: the base image the host wrote passes the full check, and one base block altered fails it', async () => {
    const image = baseImage(11n);
    const vm = boot(`gw.seed=2 gw.image_seed=11 gw.rate=0 gw.disk_base=${BASE_BLOCKS} gw.disk_rate=0`, {
      syntax: 'drive',
      imagePath: image.path,
    });
    const first = await waitBooted(vm);
    expect(first.disk).toMatchObject({ state: 'running', capacityBytes: DISK_BYTES, baseBlocks: BASE_BLOCKS, writes: 0 });

    const clean = await runTestvmFullCheck(vm.memPath, CHECK_TIMEOUT_MS);
    expect(clean.disk).toMatchObject({ checkBlocks: BASE_BLOCKS, checkStaleBlocks: 0, staleBlocks: 0, errors: 0 });

    // The kernel writes nothing (gw.disk_rate=0), so the image may change under it while it runs.
    const block = 1000;
    alterBlock(image.path, block);
    const altered = await runTestvmFullCheck(vm.memPath, CHECK_TIMEOUT_MS);
    expect(altered.disk).toMatchObject({ checkBlocks: BASE_BLOCKS, checkStaleBlocks: 1, lastStaleBlock: block });
    expect(serialLog(vm)).toContain(`stale disk block ${block}: not version 0 (full check)`);
  });

  it('a write the device fails is read back (old or new version, the in-flight rule), written again and counted as an error, not as stale', async () => {
    const image = baseImage(7n);
    const vm = boot(`gw.seed=5 gw.image_seed=7 gw.rate=0 gw.disk_base=${BASE_BLOCKS} gw.disk_hot=64 gw.disk_rate=200`, {
      syntax: 'failing-write',
      imagePath: image.path,
    });
    await waitBooted(vm);
    const after = await waitFor(
      'writes after the failed one',
      () => {
        const s = status(vm);
        return s.disk!.errors > 0 && s.disk!.writes >= 100 && s;
      },
      10_000,
    );
    // (Not inflightBlock: the kernel writes it outside seq, and it may be in a write now.)
    expect(after.disk).toMatchObject({ state: 'running', errors: 1, staleBlocks: 0 });
    const log = serialLog(vm);
    const failed = /^disk: write of 1 block\(s\) at (\d+) failed; resetting the device$/m.exec(log);
    expect(failed, log).not.toBeNull();
    expect(log).toContain(`disk: block ${failed![1]} still holds version`);
    const checked = await runTestvmFullCheck(vm.memPath, CHECK_TIMEOUT_MS);
    expect(checked.disk).toMatchObject({ checkStaleBlocks: 0 });
    expect(checked.metaErrors).toBe(0);
  });

  it('a gw.disk_ parameter without a disk stops the kernel at boot, saying why', async () => {
    const vm = boot('gw.rate=0 gw.disk_rate=10');
    const failed = await waitBooted(vm, 'failed');
    expect(failed.state).toBe('failed');
    expect(serialLog(vm)).toContain('error: gw.disk_ parameters were given, but the VM has no legacy virtio-blk disk');
  });
});
