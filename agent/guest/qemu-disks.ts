// A VM's disks: raw files of the agent's disks directory, attached as virtio-blk devices.
//
// A migration moves a disk (`--disks all`, the default) as a region of the guest: a sparse
// file the engine reads through its mapping (holes are never read or sent), tracked by
// QEMU's dirty bitmap (qemu-disk-tracker.ts), written at the destination into an unnamed
// sparse file that is named at the commit; the source's file goes when the guest is
// discarded there. A disk on storage both hosts see (`--disks none`, or not named) does not
// move: the destination's QEMU opens the same file name in its own disks directory.
import { closeSync, openSync, readSync, realpathSync, rmSync, statSync } from 'node:fs';
import { basename, isAbsolute, join, relative } from 'node:path';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import type { DirtyTracker } from '../tracker/dirty-tracker.js';
import type { GuestRegion, SourceGuest } from './adapter.js';
import type { TrackerPreference } from './process-guest.js';
import { QemuDiskTracker } from './qemu-disk-tracker.js';
import { limitDeviceWrites, removeGangwayBlockObjects, startNbdServer, stopNbdServer, GANGWAY_PREFIX } from './qmp-block.js';
import type { QmpClient } from './qmp.js';
import { diskRegionName, MAX_MOVED_DISK_BYTES, vmDiskNodes, vmDiskSizeProblem, VM_DISK_BLOCK_BYTES } from './vm-spec.js';

/** A disk of a running VM. */
export interface VmDisk {
  /** Its place in the VM's definition (disk0, disk1, ...). */
  index: number;
  /** Its file name, the same in every host's disks directory. */
  file: string;
  path: string;
}

/** A disk with its size, read now (the file is the truth: an operator may have resized it). */
export function sizedDisk(disk: VmDisk): VmDisk & { sizeBytes: number } {
  const sizeBytes = statSync(disk.path).size;
  const problem = vmDiskSizeProblem(sizeBytes);
  if (problem) throw new GangwayError(ErrorCode.BAD_REQUEST, `disk ${disk.file}: ${problem}`);
  return { ...disk, sizeBytes };
}

/** Which disks a migration moves: all (the default), none (shared storage), or these (by file name or diskN). */
export type DiskSelection = 'all' | 'none' | readonly string[];

const QCOW2_MAGIC = Buffer.from([0x51, 0x46, 0x49, 0xfb]);
const FILE_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

/**
 * Disk `given` (a file name of the disks directory, or a path inside it) as its file name,
 * real path and size; throws BAD_REQUEST saying what is wrong with it. A raw file only:
 * qcow2 and the like would need reading through QEMU (not done yet).
 */
export function resolveDiskFile(disksDir: string, given: string): { file: string; path: string; sizeBytes: number } {
  let dir: string;
  try {
    dir = realpathSync(disksDir);
  } catch (err) {
    throw new GangwayError(ErrorCode.BAD_REQUEST, `the disks directory ${disksDir} cannot be used (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); set vm.disksDir (--vm-disks-dir)`);
  }
  const candidate = isAbsolute(given) ? given : join(dir, given);
  let path: string;
  try {
    path = realpathSync(candidate);
  } catch {
    throw new GangwayError(ErrorCode.BAD_REQUEST, `disk ${JSON.stringify(given)}: no such file in the disks directory ${dir} (create it there, e.g. truncate -s 8G ${join(dir, basename(given))})`);
  }
  const inside = relative(dir, path);
  if (inside === '' || inside.startsWith('..') || isAbsolute(inside) || inside.includes('/')) {
    throw new GangwayError(ErrorCode.BAD_REQUEST, `disk ${JSON.stringify(given)} is not a file of the disks directory ${dir} (vm.disksDir): a destination finds a disk by its file name there`);
  }
  if (!FILE_NAME.test(inside)) throw new GangwayError(ErrorCode.BAD_REQUEST, `disk file name ${JSON.stringify(inside)}: letters, digits, '.', '_', '-' only`);
  const stats = statSync(path);
  if (!stats.isFile()) throw new GangwayError(ErrorCode.BAD_REQUEST, `disk ${inside} is not a regular file (block devices are not supported yet)`);
  const problem = vmDiskSizeProblem(stats.size);
  if (problem) throw new GangwayError(ErrorCode.BAD_REQUEST, `disk ${inside}: ${problem}`);
  const head = Buffer.alloc(4);
  const fd = openSync(path, 'r');
  try {
    readSync(fd, head, 0, 4, 0);
  } finally {
    closeSync(fd);
  }
  if (head.equals(QCOW2_MAGIC)) throw new GangwayError(ErrorCode.BAD_REQUEST, `disk ${inside} is qcow2; gangway moves raw disks: qemu-img convert -O raw ${inside} ${inside}.raw`);
  return { file: inside, path, sizeBytes: stats.size };
}

/** The disks `selection` names among `disks`; throws BAD_REQUEST for a name that is not one of them. */
export function selectDisks(disks: readonly VmDisk[], selection: DiskSelection, guest: string): VmDisk[] {
  if (selection === 'all') return [...disks];
  if (selection === 'none') return [];
  const chosen = new Set<VmDisk>();
  for (const name of selection) {
    const disk = disks.find((d) => d.file === name || diskRegionName(d.index) === name);
    if (!disk) {
      const known = disks.map((d) => `${diskRegionName(d.index)} (${d.file})`).join(', ') || 'none';
      throw new GangwayError(ErrorCode.BAD_REQUEST, `--disks: guest ${guest} has no disk ${JSON.stringify(name)}; its disks: ${known}`);
    }
    chosen.add(disk);
  }
  return disks.filter((d) => chosen.has(d));
}

/** A disk as a region of the guest: 4 KiB blocks, sparse. */
export function diskRegion(disk: VmDisk & { sizeBytes: number }): GuestRegion {
  return { name: diskRegionName(disk.index), path: disk.path, lengthBytes: disk.sizeBytes, pageSizeBytes: VM_DISK_BLOCK_BYTES, sparse: true };
}

/** What a migrating view needs of its VM. */
export interface DiskVm extends SourceGuest {
  readonly disks: readonly VmDisk[];
  client(): Promise<QmpClient>;
  /** Where QEMU's NBD server listens while a migration reads its disks' bitmaps. */
  readonly nbdSocketPath: string;
}

/**
 * A VM as one migration moves it: its memory regions and the disks it moves (`moving`), in
 * that order. Disks it does not move stay where they are (shared storage); after the
 * commit the source's files of the moved disks go with the guest.
 */
export class MigratingVm implements SourceGuest {
  readonly regions: readonly GuestRegion[];
  private trackers: QemuDiskTracker[] = [];
  private openTrackerCount = 0;
  private nbdStarted = false;

  constructor(
    private readonly vm: DiskVm,
    readonly moving: readonly (VmDisk & { sizeBytes: number })[],
  ) {
    this.regions = [...vm.regions, ...moving.map(diskRegion)];
    const movingBytes = moving.reduce((sum, disk) => sum + disk.sizeBytes, 0);
    if (movingBytes > MAX_MOVED_DISK_BYTES) {
      throw new GangwayError(ErrorCode.BAD_REQUEST, `--disks: the disks of ${vm.name} that would move have ${movingBytes} bytes in all, more than the ${MAX_MOVED_DISK_BYTES} one migration takes: name fewer (--disks disk0,...), or --disks none on shared storage`);
    }
  }

  get name() {
    return this.vm.name;
  }
  get kind() {
    return this.vm.kind;
  }
  get config() {
    return this.vm.config;
  }
  get isPaused() {
    return this.vm.isPaused;
  }

  async openTrackers(preference: TrackerPreference): Promise<{ trackers: DirtyTracker[]; fallbackReason?: string }> {
    const memory = await this.vm.openTrackers(preference);
    if (this.moving.length === 0) return memory;
    try {
      const qmp = await this.vm.client();
      // What an earlier migration or a crashed agent left would collide with this one.
      await removeGangwayBlockObjects(qmp);
      rmSync(this.vm.nbdSocketPath, { force: true });
      await startNbdServer(qmp, this.vm.nbdSocketPath);
      this.nbdStarted = true;
      const prefix = `${GANGWAY_PREFIX}${Date.now().toString(36)}`;
      this.trackers = this.moving.map(
        (disk) =>
          new QemuDiskTracker({
            qmp: () => this.vm.client(),
            node: vmDiskNodes(disk.index).format,
            nbdSocketPath: this.vm.nbdSocketPath,
            namePrefix: `${prefix}-d${disk.index}`,
            blockBytes: VM_DISK_BLOCK_BYTES,
            blockCount: disk.sizeBytes / VM_DISK_BLOCK_BYTES,
            // The last disk tracker closed (the migration is over, whichever way): its objects go.
            onClosed: () => {
              if (--this.openTrackerCount === 0) void this.releaseDisks();
            },
          }),
      );
      this.openTrackerCount = this.trackers.length;
    } catch (err) {
      for (const tracker of memory.trackers) tracker.close();
      await this.releaseDisks();
      throw err;
    }
    return { trackers: [...memory.trackers, ...this.trackers], ...(memory.fallbackReason ? { fallbackReason: memory.fallbackReason } : {}) };
  }

  /** Removes every block object the migration made, and QEMU's NBD server. Never rejects. */
  private async releaseDisks(): Promise<void> {
    if (!this.nbdStarted && this.trackers.length === 0) return;
    await Promise.all(this.trackers.map((t) => t.settled()));
    try {
      const qmp = await this.vm.client();
      await removeGangwayBlockObjects(qmp);
      await stopNbdServer(qmp);
    } catch {
      // QEMU is gone (its objects with it), or will be cleaned up at its next migration or agent start.
    }
    this.nbdStarted = false;
    rmSync(this.vm.nbdSocketPath, { force: true });
  }

  /** QEMU's I/O limits on the moving disks' devices, the rate shared among them; lifted by releaseDisks. */
  async limitDiskWrites(bytesPerSec: number): Promise<void> {
    if (this.moving.length === 0) return;
    const qmp = await this.vm.client();
    for (const disk of this.moving) await limitDeviceWrites(qmp, vmDiskNodes(disk.index).device, bytesPerSec / this.moving.length);
  }

  pause(): Promise<void> {
    return this.vm.pause();
  }

  async resume(): Promise<void> {
    await this.vm.resume();
    // QEMU took its disks back (cont after a device-state save re-activates them): what
    // could not be removed while they were inactive goes now.
    await this.releaseDisks();
  }

  saveDeviceState(): Promise<Uint8Array> {
    return this.vm.saveDeviceState();
  }

  /** The end of QEMU's save inactivates the disk images the final round reads through its NBD export. */
  get saveAfterFinalRound(): boolean {
    return this.moving.length > 0;
  }

  async prepareDeviceStateSave(): Promise<void> {
    await this.vm.prepareDeviceStateSave?.();
  }

  /** The VM's (its memory regions come first); a disk's blocks are fetched as the guest asks. */
  eagerRuns(): Uint32Array[] {
    const vm = this.vm.eagerRuns();
    return this.regions.map((_, i) => vm[i] ?? new Uint32Array(0));
  }

  async discard(): Promise<void> {
    await this.vm.discard();
    // The disks that moved are the destination's now; those that did not are shared.
    for (const disk of this.moving) rmSync(disk.path, { force: true });
  }

  gone(): string | undefined {
    return this.vm.gone?.();
  }
}
