// The destination's side of the "qemu" guest: the offered VM definition checked field by
// field (nothing a peer sends reaches QEMU's command line as it came), a QEMU started in
// standby on the memory files that are arriving (-S -incoming defer, its RAM mapped from this
// agent's descriptors of the unnamed files), its device state loaded with migrate-incoming
// before the switchover's check, and `cont` at the commit.
import { closeSync, constants, existsSync, lstatSync, openSync, realpathSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { GangwayError, ErrorCode } from '../../protocol/errors.js';
import type { GuestSpec } from '../../protocol/frames.js';
import type { GuestLauncher, StandbyGuest } from './adapter.js';
import type { Logger } from '../log.js';
import { armQemuIncoming, connectWhenReady, endQemu, launchQemu, loadQemuDeviceState, logTail, resolveKernel, VM_PAGE_SIZE, type ArmedIncoming, type QemuSettings } from './qemu-guest.js';
import type { QmpClient } from './qmp.js';
import { switchDiskToFile } from './qmp-block.js';
import { faultDelay } from '../migration/faults.js';
import { createVmTap, removeVmTap, tapNameFor } from './vm-tap.js';
import { diskRegionName, vmDiskExportSocket, MAX_MOVED_DISK_BYTES, kvmProblem, parseVmDefinition, VM_DISK_BLOCK_BYTES, vmDiskSizeProblem, vmDisks, vmRegionsProblem, vmSocketPathProblem, vmDiskNodes, vmStateSockets, type VmSpec } from './vm-spec.js';

/** Can KVM be used here? (The reason when not.) */
export function kvmAvailability(): string | undefined {
  return kvmProblem((path) => closeSync(openSync(path, constants.O_RDWR)));
}

/**
 * What `--accel auto` picks, and why: KVM where /dev/kvm can be used and runs guests at
 * speed. A host whose KVM is PVM (the kvm_pvm module: KVM inside a VM without hardware
 * virtualization) runs ordinary guests far slower than TCG (measured: about 70 times), so
 * there auto picks TCG.
 */
export function autoAccel(): { accel: 'kvm' | 'tcg'; why: string } {
  const problem = kvmAvailability();
  if (problem) return { accel: 'tcg', why: problem };
  if (existsSync('/sys/module/kvm_pvm')) return { accel: 'tcg', why: "this host's KVM is PVM (kvm_pvm), which runs ordinary guests far slower than TCG" };
  return { accel: 'kvm', why: '/dev/kvm is usable' };
}

/** The offered guest as a VM spec, or why it cannot be one here (a message for the peer). */
export function vmSpecOfOffer(guest: GuestSpec, settings: QemuSettings, kvm: () => string | undefined = kvmAvailability): { spec: VmSpec } | { problem: string } {
  const result = vmSpecOf(guest);
  if ('problem' in result) return result;
  const definition = result.spec;
  try {
    if (definition.kernel !== undefined) resolveKernel(settings.imagesDir, definition.kernel);
  } catch (err) {
    // The images directory is this host's business: the peer hears only that the kernel is not here.
    return { problem: `kernel ${definition.kernel} is not in this agent's images directory` };
  }
  if (definition.accel === 'kvm') {
    const why = kvm();
    if (why) return { problem: `the VM runs under KVM and ${why}` };
  }
  const moving = new Set(guest.regions.map((region) => region.name));
  let disksDir: string | undefined;
  for (const [index, file] of vmDisks(definition).entries()) {
    try {
      disksDir ??= realpathSync(settings.disksDir);
    } catch {
      return { problem: 'this agent has no usable disks directory (vm.disksDir) for the VM\'s disks' };
    }
    const path = join(disksDir, file);
    if (moving.has(diskRegionName(index))) {
      // A disk that moves arrives as a new file: one already there is somebody's data.
      if (lstatSync(path, { throwIfNoEntry: false })) return { problem: `disk ${file} already exists in this agent's disks directory: remove it, or migrate with --disks none if it is the same shared file` };
    } else {
      // A disk that does not move is on storage both hosts see (--disks none).
      const stats = statSync(path, { throwIfNoEntry: false });
      if (!stats?.isFile()) return { problem: `disk ${file} does not move with the VM and is not in this agent's disks directory: is the storage shared? (else migrate with --disks all)` };
    }
  }
  return result;
}

/** The VM's disks at this agent: where each is, and the offer's region it arrives as (absent: it is shared, and here already). */
export function vmDiskPlaces(guest: GuestSpec, settings: QemuSettings): { path: string; region?: number }[] {
  const parsed = parseVmDefinition(guest.config);
  if ('problem' in parsed) throw new GangwayError(ErrorCode.BAD_REQUEST, parsed.problem);
  const disks = vmDisks(parsed.definition);
  if (disks.length === 0) return [];
  const dir = realpathSync(settings.disksDir);
  return disks.map((file, index) => {
    const region = guest.regions.findIndex((r) => r.name === diskRegionName(index));
    return { path: join(dir, file), ...(region >= 0 ? { region } : {}) };
  });
}

/** The offered guest as a VM spec, by its fields alone (what this host has is vmSpecOfOffer's to check). */
function vmSpecOf(guest: GuestSpec): { spec: VmSpec } | { problem: string } {
  const parsed = parseVmDefinition(guest.config);
  if ('problem' in parsed) return { problem: `the VM definition does not pass: ${parsed.problem}` };
  // Memory regions ram, ram1, ..., then the disks that move, in the definition's order.
  const memory = guest.regions.filter((region) => !region.name.startsWith('disk'));
  const disks = guest.regions.slice(memory.length);
  const regionBytes = memory.map((region) => region.lengthBytes);
  const odd = memory.find((region, i) => region.pageSizeBytes !== VM_PAGE_SIZE || region.name !== (i === 0 ? 'ram' : `ram${i}`));
  if (odd) return { problem: `a VM's regions are ram, ram1, ... of ${VM_PAGE_SIZE}-byte pages, then its disks (got ${JSON.stringify(odd.name).slice(0, 40)} of ${odd.pageSizeBytes})` };
  const diskCount = vmDisks(parsed.definition).length;
  let lastDisk = -1;
  for (const region of disks) {
    const index = /^disk(\d)$/.exec(region.name) ? Number(region.name.slice(4)) : -1;
    if (index <= lastDisk || index >= diskCount) return { problem: `region ${JSON.stringify(region.name).slice(0, 40)}: the VM's disks are disk0..disk${diskCount - 1}, in order, after its memory` };
    if (region.pageSizeBytes !== VM_DISK_BLOCK_BYTES) return { problem: `disk region ${region.name} has ${region.pageSizeBytes}-byte blocks, not ${VM_DISK_BLOCK_BYTES}` };
    const size = vmDiskSizeProblem(region.lengthBytes);
    if (size) return { problem: `disk region ${region.name}: ${size}` };
    lastDisk = index;
  }
  const diskBytes = disks.reduce((sum, region) => sum + region.lengthBytes, 0);
  if (diskBytes > MAX_MOVED_DISK_BYTES) return { problem: `the disks that move have ${diskBytes} bytes in all; this agent takes at most ${MAX_MOVED_DISK_BYTES} in one migration (it keeps a fingerprint of every block): move the others with --disks none on shared storage, or one by one` };
  const regions = vmRegionsProblem(regionBytes);
  if (regions) return { problem: regions };
  return { spec: { ...parsed.definition, regionBytes } };
}

class QemuStandby implements StandbyGuest {
  readonly pid: number;
  readonly running: Promise<number>;
  readonly exited: Promise<number | null>;
  readonly ready: Promise<void>;
  private resolveRunning!: (at: number) => void;
  private rejectRunning!: (err: Error) => void;
  private qmpP: Promise<QmpClient> | undefined;
  private readonly launched;
  /** The TAP device made for this VM: it goes when the standby is cancelled. */
  private readonly tap: string | undefined;

  constructor(
    private readonly spec: VmSpec,
    private readonly files: Parameters<GuestLauncher['standby']>[0],
    launch: Parameters<typeof launchQemu>[0],
    private readonly log?: Logger,
  ) {
    if (launch.tap !== undefined) createVmTap(launch.tap, launch.settings.bridge);
    try {
      this.launched = launchQemu(launch);
    } catch (err) {
      if (launch.tap !== undefined) removeVmTap(launch.tap);
      throw err;
    }
    this.tap = launch.tap;
    this.pid = this.launched.pid;
    this.exited = this.launched.exited.then(({ code }) => code);
    this.running = new Promise((resolve, reject) => {
      this.resolveRunning = resolve;
      this.rejectRunning = reject;
    });
    this.running.catch(() => {});
    // It listens for its device state from as soon as it is up, not from the switchover on.
    this.armed = this.qmp().then((qmp) => armQemuIncoming(qmp, vmStateSockets(files.qmpSocketPath!).in));
    this.armed.catch(() => {});
    this.ready = this.armed.then(() => {});
    this.ready.catch(() => {});
  }

  /** The incoming migration of its device state, listening (armQemuIncoming). */
  private readonly armed: Promise<ArmedIncoming>;

  /** QMP, once QEMU is up (its memory mapped). */
  qmp(): Promise<QmpClient> {
    this.qmpP ??= connectWhenReady(this.launched, this.files);
    return this.qmpP;
  }

  go(): void {
    void (async () => {
      try {
        const qmp = await this.qmp();
        await qmp.cont({ timeoutMs: 10_000 });
        const at = performance.now();
        // It runs: from now on it outlives this agent (before, an agent's death ended it).
        this.launched.release();
        // QEMU serves one QMP client at a time: the registry's guest connects from here on.
        await qmp.close().catch(() => {});
        this.resolveRunning(at);
      } catch (err) {
        this.rejectRunning(err as Error);
      }
    })();
  }

  /** Before go(): the drives that read this agent's exports go to the disks' files, over the standby's QMP (QEMU serves one client). */
  async useLocalDisks(): Promise<number> {
    const paths = this.files.diskPaths ?? [];
    if (paths.length === 0) return 0;
    const qmp = await this.qmp();
    let switched = 0;
    for (const [index, path] of paths.entries()) if (await switchDiskToFile(qmp, vmDiskNodes(index), path)) switched++;
    return switched;
  }

  cancel(): Promise<void> {
    this.cancelled ??= (async () => {
      await faultDelay('standby-cancel', this.log);
      this.launched.abandon();
      const qmp = await Promise.race([this.qmp().catch(() => undefined), this.launched.exited.then(() => undefined)]);
      await endQemu(this.pid, qmp);
      await qmp?.close().catch(() => {});
      if (this.tap !== undefined) removeVmTap(this.tap);
    })().catch((err: Error) => this.log?.warn({ pid: this.pid, err: err.message }, 'the standby QEMU did not end cleanly'));
    return this.cancelled;
  }

  private cancelled: Promise<void> | undefined;

  async loadDeviceState(state: Uint8Array): Promise<void> {
    const qmp = await this.qmp();
    try {
      await loadQemuDeviceState(qmp, await this.armed, state);
    } catch (err) {
      const tail = logTail(this.files.logPath);
      throw new GangwayError(ErrorCode.GUEST_FAILED, `${(err as Error).message}${tail ? `; QEMU's log: ${tail}` : ''}`, { cause: err });
    }
    // The incoming migration ends paused (-S): nothing runs before go().
    const status = await qmp.queryStatus();
    if (status.running) throw new GangwayError(ErrorCode.GUEST_FAILED, `the destination VM runs before the commit (status ${status.status})`);
  }

}

export function qemuLauncher(settings: QemuSettings, log?: Logger): GuestLauncher {
  return {
    kind: 'qemu',
    loadsDeviceStateBeforeCheck: true,
    // QEMU maps its RAM as it starts, and the shim sends each mapping's userfaultfd then.
    handsOverMemoryAtStart: true,
    checkOffer(guest) {
      const result = vmSpecOfOffer(guest, settings);
      return 'problem' in result ? result.problem : undefined;
    },
    standby(files, { guest, regionFds, postcopySocketFd, diskExportSocket }) {
      const result = vmSpecOfOffer(guest, settings);
      if ('problem' in result) throw new GangwayError(ErrorCode.BAD_REQUEST, result.problem);
      const socketProblem = vmSocketPathProblem(files.qmpSocketPath!);
      if (socketProblem) throw new GangwayError(ErrorCode.BAD_REQUEST, socketProblem);
      // The regions' fds: memory first (QEMU's fds 4...), then the disks that arrive (after
      // them); a shared disk is opened by its path here.
      const memoryCount = result.spec.regionBytes.length;
      const diskFds = regionFds.slice(memoryCount);
      const places = vmDiskPlaces(guest, settings);
      const diskPaths = places.map((place) =>
        // Region i's fd is QEMU's fd 4 + i (launchQemu: the memory's, then extraFds).
        place.region === undefined ? place.path : `/proc/self/fd/${4 + place.region}`,
      );
      // Post-copy of disks: the arriving disks through this agent's exports.
      const exported = places.flatMap((place, index) => (place.region === undefined ? [] : [index]));
      const diskExports = diskExportSocket !== undefined && exported.length > 0 ? { socket: diskExportSocket, disks: exported } : undefined;
      return new QemuStandby(result.spec, files, {
        name: guest.name,
        spec: result.spec,
        files,
        settings,
        incoming: true,
        regionFds: regionFds.slice(0, memoryCount),
        extraFds: diskFds,
        diskPaths,
        ...(diskExports ? { diskExports } : {}),
        ...(result.spec.nic ? { tap: tapNameFor(files) } : {}),
        ...(postcopySocketFd === undefined ? {} : { postcopySocketFd }),
      }, log);
    },
    async loadDeviceState(standby, _files, state) {
      if (!(standby instanceof QemuStandby)) throw new GangwayError(ErrorCode.INTERNAL, 'a VM device state for a guest that is not a standby QEMU');
      await standby.loadDeviceState(state);
    },
    recordPart(files, guest) {
      // The offer passed checkOffer; the VM runs on the RAM that came, whatever the images
      // directory holds by now: only the fields are read here.
      const result = vmSpecOf(guest);
      if ('problem' in result) throw new GangwayError(ErrorCode.BAD_REQUEST, result.problem);
      return { kind: 'qemu', spec: result.spec, ...(result.spec.nic ? { tap: tapNameFor(files), tapCreated: true } : {}) };
    },
    disks(guest) {
      return vmDiskPlaces(guest, settings);
    },
    diskExportSocket(files) {
      return vmDiskExportSocket(files.qmpSocketPath!);
    },
  };
}
