// The QEMU baseline (bench/qemu-baseline.ts) runs QEMU 7.2's own pre-copy of a test-kernel VM
// on loopback: the bytes iptables counted carry at least every page QEMU says it sent whole,
// the destination's kernel checked its pages, and neither a run nor a failed one leaves a
// QEMU, a chain or a memory file behind. With a disk, QEMU's storage migration as libvirt
// drives it (bench/qemu-storage.ts) moves it while the kernel writes it, and the kernel's
// check at the destination finds every block. Needs root, QEMU and the test kernel.
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ErrorCode } from '../../protocol/errors.js';
import { writeDiskImage } from '../../bench/disk-image.js';
import { makeQemuTls, QemuBaselineError, qemuBaselineProblem, runQemuMigration, type QemuBaselineVm } from '../../bench/qemu-baseline.js';

const MiB = 1024 * 1024;
const PAGE = 4096;
const skip = await qemuBaselineProblem('loopback');
const vm: QemuBaselineVm = { memoryMiB: 64, profile: 'random', dirtyRateMiBps: 4, seed: 1 };

/** What a run of this process may leave: QEMUs it started, GWQB_<pid>_ chains, /dev/shm files. */
async function leftovers(): Promise<string[]> {
  const tag = `qb-${process.pid}-`;
  const found: string[] = [];
  for (const pid of readdirSync('/proc').filter((entry) => /^\d+$/.test(entry))) {
    let cmdline = '';
    try {
      cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    } catch {
      continue; // exited meanwhile
    }
    if (cmdline.includes(tag)) found.push(`process ${pid}: ${cmdline.split('\0').slice(0, 3).join(' ')}`);
  }
  const rules = (await execa('iptables', ['-w', '5', '-S'])).stdout;
  found.push(...rules.split('\n').filter((line) => line.includes(`GWQB_${process.pid}_`)));
  found.push(...readdirSync('/dev/shm').filter((name) => name.includes(tag)));
  return found;
}

describe.skipIf(skip)(skip ? `QEMU baseline (skipped: ${skip})` : 'QEMU baseline', () => {
  let workDir: string;
  beforeEach(() => {
    workDir = mkdtempSync(join(tmpdir(), 'gw-qb-'));
  });
  afterEach(() => {
    rmSync(workDir, { recursive: true, force: true });
  });

  it('migrates a 64 MiB VM with pre-copy on loopback, counts the wire with iptables, and has the kernel check it', async () => {
    const lines: string[] = [];
    const run = await runQemuMigration({ vm, mode: 'precopy', link: { kind: 'loopback' }, workDir, timeoutMs: 20_000, log: (line) => lines.push(line) });
    const [one] = run.detail.vms;
    expect(run).toMatchObject({ system: 'qemu', mode: 'precopy', link: 'loopback', vms: 1, dirtyRateMiBps: 4 });
    expect(run.detail.vms).toHaveLength(1);
    expect(one!.status).toBe('completed');
    expect(run.totalMs).toBeGreaterThan(0);
    expect(run.downtimeMs).toBeGreaterThan(0);
    expect(run.downtimeMs).toBeLessThan(run.totalMs);

    // The random profile fills 48 MiB from 16 MiB up with incompressible pages: QEMU sends
    // those whole (ram.normal), and every such byte is on the wire with TCP/IP on top.
    expect(run.detail.wireBytesMethod).toBe('iptables');
    expect(one!.qemu.normalPages * PAGE).toBeGreaterThan(40 * MiB);
    expect(run.detail.wireBytesForward).toBeGreaterThanOrEqual(one!.qemu.normalPages * PAGE);
    expect(run.wireBytes).toBeGreaterThan(16 * MiB);
    expect(run.wireBytes).toBeLessThan(2 * one!.qemu.transferredBytes);
    expect(one!.wireBytes).toBe(run.wireBytes);

    expect(run.cpuSecondsSource).toBeGreaterThan(0);
    expect(run.cpuSecondsDestination).toBeGreaterThan(0);

    // The kernel at the destination checked every page of its range (64 MiB less the 16 MiB
    // below it and what QEMU keeps at the top), and stalePages is what it found.
    expect(run.verified).toBe(true);
    expect(one!.check).toMatchObject({ done: true, state: 'running', metaErrors: 0 });
    expect(one!.check.pages).toBeGreaterThan(47 * (MiB / PAGE));
    expect(run.stalePages).toBe(one!.check.stalePages + one!.check.staleByRewrites);
    expect(lines.some((line) => line.includes('QEMU sent'))).toBe(true);
    expect(await leftovers()).toEqual([]);
  });

  it("a VM writing its disk moves with QEMU's NBD mirror, ended at the pause before the switchover; the kernel finds every block at the destination", async () => {
    // 64 MiB: 16 MiB of base image, 8 MiB of the VM's own, holes; 400 block writes/s over a hot set of 2048.
    const disk = { baseBlocks: 4096, hotBlocks: 2048, rateBlocksPerSec: 400 };
    const diskVm: QemuBaselineVm = { ...vm, seed: 3, imageSeed: 7, dirtyRateMiBps: 1, disk };
    const image = join(workDir, 'src.raw');
    const written = writeDiskImage(image, { sizeBytes: 64 * MiB, baseBlocks: disk.baseBlocks, imageSeed: 7n, ownBytes: 8 * MiB, ownSeed: 1, kernelSeed: 3n, hotBlocks: disk.hotBlocks });
    const run = await runQemuMigration({ vm: diskVm, mode: 'precopy', link: { kind: 'loopback' }, workDir, diskFiles: [image], timeoutMs: 60_000 });
    const [one] = run.detail.vms;
    expect(run.verified).toBe(true);
    expect(run.staleDiskBlocks).toBe(0);
    expect(run.stalePages).toBe(0);
    expect(one!.check.disk).toMatchObject({ staleBlocks: 0, staleByRewrites: 0, errors: 0 });
    // Every base block, and the blocks written before and during the move.
    expect(one!.check.disk!.blocks).toBeGreaterThan(disk.baseBlocks);
    // The job counts the whole disk once, then every chunk the guest dirtied again.
    expect(one!.disk!.ready.lengthBytes).toBeGreaterThanOrEqual(64 * MiB);
    expect(one!.disk!.writesWhileLive).toBeGreaterThan(0);
    // The mirror's NBD stream is on the wire too: the disk's data and the RAM.
    expect(run.wireBytes).toBeGreaterThan(written.dataBytes + one!.qemu.transferredBytes);
    expect(await leftovers()).toEqual([]);
  });

  it("moves the VM over mutual TLS when asked (libvirt's --tls), and a destination certificate that names another host fails the migration", async () => {
    const tls = await makeQemuTls(join(workDir, 'tls'));
    const run = await runQemuMigration({ vm: { ...vm, seed: 4 }, mode: 'multifd', multifdChannels: 2, link: { kind: 'loopback' }, workDir, timeoutMs: 60_000, tls });
    const [one] = run.detail.vms;
    expect(run.detail.tls).toBe(true);
    expect(run.verified).toBe(true);
    expect(run.stalePages).toBe(0);
    expect(one!.qemu.normalPages * PAGE).toBeGreaterThan(40 * MiB);
    // The pages went through TLS records: their bytes and the records' framing on top.
    expect(run.detail.wireBytesForward).toBeGreaterThan(one!.qemu.normalPages * PAGE);
    // The source checks the destination's certificate against tls-hostname: another name fails the handshake.
    const failed = await runQemuMigration({ vm: { ...vm, seed: 5 }, mode: 'precopy', link: { kind: 'loopback' }, workDir, timeoutMs: 30_000, tls: { ...tls, hostname: 'not-the-destination' } }).catch((err: unknown) => err);
    expect(failed).toBeInstanceOf(QemuBaselineError);
    expect((failed as Error).message).toMatch(/certificate|hostname/i);
    expect(await leftovers()).toEqual([]);
  });

  it('a migration that runs out of time fails with QEMU\'s status and leaves nothing behind', async () => {
    const failed = await runQemuMigration({ vm: { ...vm, seed: 2 }, mode: 'precopy', link: { kind: 'loopback' }, workDir, timeoutMs: 1 }).catch((err: unknown) => err);
    expect(failed).toBeInstanceOf(QemuBaselineError);
    expect([ErrorCode.NON_CONVERGENCE, ErrorCode.TIMEOUT]).toContain((failed as QemuBaselineError).code);
    expect((failed as Error).message).toMatch(/was not done within 1 ms: status/);
    expect(await leftovers()).toEqual([]);
  });
});
