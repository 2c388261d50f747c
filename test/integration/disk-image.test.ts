// bench/disk-image.ts leaves the test kernel's hot blocks out of a VM's own data, computing
// the hot set as the kernel does: the kernel, writing flat out until every hot block was
// rewritten, writes only blocks of that set and finds none of them holding anything but
// zeros or its own last write. Needs QEMU and the test kernel.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { qemuMissing } from '../../agent/guest/qemu-guest.js';
import { readTestvmDiskVersions, readTestvmStatus } from '../../agent/guest/testvm-status.js';
import { qemuArgs } from '../../agent/guest/vm-spec.js';
import { testvmDir, testvmMissing, TESTVM_KERNEL_FILE } from '../../agent/native.js';
import { testvmDiskHotBlocks, writeDiskImage } from '../../bench/disk-image.js';
import { createMemoryFile, QEMU_BINARY, QemuVm } from '../../bench/qemu-vm.js';

const MiB = 1024 * 1024;
const skip = qemuMissing() ?? testvmMissing();

describe.skipIf(skip)(skip ? `disk image (skipped: ${skip})` : 'disk image', () => {
  let dir: string;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'gw-di-'));
  });
  afterEach(() => {
    rmSync(dir, { recursive: true, force: true });
  });

  it("the kernel's rewrites land in the hot set computed here, never on the VM's own data", async () => {
    const seed = 5n;
    const image = join(dir, 'd.raw');
    const hotBlocks = 1024;
    // The VM's own data fills most of what follows the base: many hot blocks fall in that stretch and must be skipped.
    const written = writeDiskImage(image, { sizeBytes: 32 * MiB, baseBlocks: 2048, imageSeed: 7n, ownBytes: 20 * MiB, ownSeed: 3, kernelSeed: seed, hotBlocks });
    expect(written.ownBytes).toBe(20 * MiB);
    const memPath = `/dev/shm/gw-di-${process.pid}`;
    createMemoryFile(memPath, 64 * MiB, false);
    const definition = { machine: 'q35', cpus: 1, accel: 'tcg', kernel: TESTVM_KERNEL_FILE, append: `gw.profile=zero gw.seed=${seed} gw.image_seed=7 gw.disk_base=2048 gw.disk_hot=${hotBlocks} gw.disk_rate=max`, disk0: 'd.raw' } as const;
    const args = qemuArgs(`gw-di-${process.pid}`, definition, [64 * MiB], { memoryPaths: [memPath], qmpSocket: join(dir, 'qmp'), serialLog: join(dir, 'com1.log'), diskPaths: [image] }, testvmDir, false);
    const qemu = new QemuVm('disk-image', memPath, join(dir, 'qmp'), join(dir, 'com1.log'), [QEMU_BINARY, ...args]);
    try {
      await qemu.waitReady(30_000);
      // A pass rewrites every hot block once.
      for (let waited = 0; (readTestvmStatus(memPath).disk?.passes ?? 0) < 1; waited += 100) {
        if (waited > 30_000) throw new Error(`the kernel did not finish a pass of its hot set: ${qemu.describe()}`);
        await sleep(100);
      }
      const status = readTestvmStatus(memPath);
      expect(status.disk).toMatchObject({ state: 'running', staleBlocks: 0, errors: 0 });
      const hot = testvmDiskHotBlocks(seed, (32 * MiB) / 4096, hotBlocks);
      const versions = readTestvmDiskVersions(memPath, status);
      const rewritten = [...versions.keys()].filter((block) => versions[block]! > 0);
      expect(rewritten.length).toBe(hotBlocks);
      expect(rewritten.filter((block) => !hot.has(block))).toEqual([]);
    } finally {
      await qemu.stop();
      rmSync(memPath, { force: true });
    }
  });
});
