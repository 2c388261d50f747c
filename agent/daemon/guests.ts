// The guests of this host as the control API sees them: started, stopped, resumed after a
// switchover in doubt, and their status (tracker, shim counters, where they came from or
// are going). Migrations move them; this is everything else done to them.
import { randomBytes } from 'node:crypto';
import { lstatSync, readFileSync, rmSync, statSync } from 'node:fs';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import type { AgentConfig } from '../daemon.js';
import { GUEST_PAGE_SIZE } from '../guest/guest-header.js';
import { launchProcessGuest, regionSizesProblem, removeGuestFiles, type ProcessGuestSpec } from '../guest/process-guest.js';
import { connectWhenReady, createVmMemoryFiles, endQemu, launchQemu, resolveKernel, VM_PAGE_SIZE, type LaunchedQemu } from '../guest/qemu-guest.js';
import { autoAccel, kvmAvailability } from '../guest/qemu-launcher.js';
import type { QmpClient } from '../guest/qmp.js';
import type { GuestRegistry } from '../guest/registry.js';
import { isTapDevice } from '../guest/vm-tap.js';
import { resolveDiskFile } from '../guest/qemu-disks.js';

/** A VM's disk as `gangway status` shows it: its size, and what it takes on the file system (sparse). */
function diskStatus(path: string): { path: string; sizeBytes?: number; allocatedBytes?: number; problem?: string } {
  try {
    const stats = statSync(path);
    return { path, sizeBytes: stats.size, allocatedBytes: stats.blocks * 512 };
  } catch (err) {
    return { path, problem: (err as NodeJS.ErrnoException).code ?? (err as Error).message };
  }
}
import { parseVmDefinition, randomVmMac, vmDiskFields, vmRegionsProblem, vmSocketPathProblem, type AccelChoice, type VmDefinition, type VmSpec } from '../guest/vm-spec.js';
import type { Logger } from '../log.js';
import type { SourceMigration } from '../migration/source.js';
import { parseShimReport } from '../tracker/uffd-wp.js';

export interface GuestServiceContext {
  config: Pick<AgentConfig, 'memoryDir' | 'tracker' | 'vm'>;
  registry: GuestRegistry;
  log: Logger;
  /** Is the agent shutting down? Then no guest starts. */
  shuttingDown: () => boolean;
  /** Is guest `name` leaving this host? */
  isMigrating: (name: string) => boolean;
  /** The migration of guest `name` leaving this host now, with its id. */
  outgoingOf: (name: string) => [migrationId: string, migration: Pick<SourceMigration, 'cancellable' | 'options'>] | undefined;
  /** Pages a post-copy migration arriving here still lacks (undefined once it is over). */
  incomingMissingPages: (migrationId: string) => number | undefined;
}

export class GuestService {
  constructor(private readonly context: GuestServiceContext) {}

  /** A guest may start: the agent is not shutting down, and its TAP device is no other guest's. */
  private checkStartable(tap: string | undefined): void {
    if (this.context.shuttingDown()) throw new GangwayError(ErrorCode.SHUTTING_DOWN, 'the agent is shutting down');
    const tapOwner = tap === undefined ? undefined : this.context.registry.list().find(({ record }) => record.tap === tap);
    if (tapOwner) throw new GangwayError(ErrorCode.BAD_REQUEST, `TAP device ${tap} is already guest ${tapOwner.record.name}'s`);
  }

  async startGuest(name: string, spec: ProcessGuestSpec, tap?: string): Promise<{ name: string; pid: number; memoryPath: string; memoryPaths: string[] }> {
    this.checkStartable(tap);
    if (spec.memoryBytes % GUEST_PAGE_SIZE !== 0) {
      throw new GangwayError(ErrorCode.BAD_REQUEST, `memory size ${spec.memoryBytes} is not a multiple of ${GUEST_PAGE_SIZE} bytes`);
    }
    const regions = spec.regionBytes ?? [spec.memoryBytes];
    const problem = regionSizesProblem(regions);
    if (problem) throw new GangwayError(ErrorCode.BAD_REQUEST, `memory regions ${regions.join(', ')}: ${problem}`);
    this.context.registry.reserve(name);
    const files = this.context.registry.filesFor(name, this.context.config.memoryDir, randomBytes(4).toString('hex'), regions.length);
    // The guest refuses a path that exists (O_EXCL): whatever is there is not ours to remove below.
    const taken = [...files.memoryPaths, files.deviceStatePath!].find((path) => lstatSync(path, { throwIfNoEntry: false }));
    if (taken) {
      this.context.registry.release(name);
      throw new GangwayError(ErrorCode.GUEST_FAILED, `${taken} exists already: something else made it; remove it or start the guest again (a new name is picked each time)`);
    }
    try {
      const launched = launchProcessGuest({ name, files, create: spec });
      await launched.running;
      this.context.registry.add({
        name,
        kind: 'process',
        pid: launched.pid,
        memoryBytes: spec.memoryBytes,
        pageSizeBytes: GUEST_PAGE_SIZE,
        files,
        spec,
        origin: { kind: 'started' },
        startedAt: new Date().toISOString(),
        ...(tap === undefined ? {} : { tap }),
      });
      this.context.log.info({ guest: name, pid: launched.pid, memoryBytes: spec.memoryBytes }, 'guest started');
      return { name, pid: launched.pid, memoryPath: files.memoryPaths[0]!, memoryPaths: files.memoryPaths };
    } catch (err) {
      this.context.registry.release(name);
      removeGuestFiles(files);
      throw err;
    }
  }

  /**
   * Starts a QEMU VM from a definition (checked here as an offer's would be): its RAM in
   * memory files of the agent's own, QEMU with the tracking shim, ready once QMP answers.
   */
  async startVm(
    name: string,
    request: { definition: Omit<VmDefinition, 'accel' | `disk${0 | 1 | 2 | 3}`> & { accel: AccelChoice }; regionBytes: number[]; disks?: string[] },
    tap?: string,
  ) {
    this.checkStartable(tap);
    const settings = this.context.config.vm;
    let accelNote: string | undefined;
    let accel = request.definition.accel;
    if (accel === 'auto') {
      const picked = autoAccel();
      accel = picked.accel;
      accelNote = `${picked.accel}: ${picked.why}`;
    } else if (accel === 'kvm') {
      const why = kvmAvailability();
      if (why) throw new GangwayError(ErrorCode.BAD_REQUEST, `--accel kvm: ${why}; use --accel tcg (or auto)`);
    }
    // A NIC is backed by the operator's TAP device here; its MAC is made once and moves with the VM.
    const wantsNic = request.definition.nic !== undefined || tap !== undefined;
    if (wantsNic && tap === undefined) throw new GangwayError(ErrorCode.BAD_REQUEST, `--nic ${request.definition.nic}: a NIC needs its TAP device here: pass --tap DEVICE (make one with \`ip tuntap add dev DEVICE mode tap\`)`);
    if (tap !== undefined && !isTapDevice(tap)) throw new GangwayError(ErrorCode.BAD_REQUEST, `--tap ${tap}: this host has no TAP device of that name; make it with \`ip tuntap add dev ${tap} mode tap\` (and put it on your bridge)`);
    const nic = wantsNic ? { nic: request.definition.nic ?? 'virtio-net-pci', mac: request.definition.mac ?? randomVmMac(randomBytes) } : {};
    // Disks: raw files of the disks directory, by name there (a destination finds them by it).
    const disks = (request.disks ?? []).map((given) => resolveDiskFile(settings.disksDir, given));
    const parsed = parseVmDefinition({ ...request.definition, accel, ...nic, ...vmDiskFields(disks.map((disk) => disk.file)) });
    if ('problem' in parsed) throw new GangwayError(ErrorCode.BAD_REQUEST, `VM definition: ${parsed.problem}`);
    const regionProblem = vmRegionsProblem(request.regionBytes);
    if (regionProblem) throw new GangwayError(ErrorCode.BAD_REQUEST, `--memory ${request.regionBytes.join(',')}: ${regionProblem}`);
    if (parsed.definition.kernel !== undefined) resolveKernel(settings.imagesDir, parsed.definition.kernel);
    const spec: VmSpec = { ...parsed.definition, regionBytes: request.regionBytes };
    const inUse = disks.find((disk) => this.context.registry.list().some(({ record }) => record.files.diskPaths?.includes(disk.path)));
    if (inUse) throw new GangwayError(ErrorCode.BAD_REQUEST, `disk ${inUse.file} is already a disk of another guest here`);
    this.context.registry.reserve(name);
    const files = {
      ...this.context.registry.filesFor(name, this.context.config.memoryDir, randomBytes(4).toString('hex'), spec.regionBytes.length, 'qemu'),
      ...(disks.length ? { diskPaths: disks.map((disk) => disk.path) } : {}),
    };
    const socketProblem = vmSocketPathProblem(files.qmpSocketPath!);
    if (socketProblem) {
      this.context.registry.release(name);
      throw new GangwayError(ErrorCode.BAD_REQUEST, socketProblem);
    }
    let launched: LaunchedQemu | undefined;
    let qmp: QmpClient | undefined;
    try {
      createVmMemoryFiles(files.memoryPaths, spec.regionBytes);
      launched = launchQemu({ name, spec, files, settings, incoming: false, ...(tap === undefined ? {} : { tap }) });
      qmp = await connectWhenReady(launched, files);
      const status = await qmp.queryStatus();
      if (!status.running) throw new GangwayError(ErrorCode.GUEST_FAILED, `QEMU started but its VM is ${status.status}, not running`);
      // QEMU serves one QMP client: the registry's guest connects when it needs to.
      await qmp.close();
      this.context.registry.add({
        name,
        kind: 'qemu',
        pid: launched.pid,
        memoryBytes: spec.regionBytes.reduce((sum, size) => sum + size, 0),
        pageSizeBytes: VM_PAGE_SIZE,
        files,
        spec,
        origin: { kind: 'started' },
        startedAt: new Date().toISOString(),
        ...(tap === undefined ? {} : { tap }),
      });
      this.context.log.info({ guest: name, pid: launched.pid, memoryBytes: spec.regionBytes, accel: spec.accel, accelNote }, 'VM started');
      return {
        name,
        pid: launched.pid,
        accel: spec.accel,
        ...(accelNote ? { accelNote } : {}),
        memoryPaths: files.memoryPaths,
        ...(disks.length ? { diskPaths: disks.map((disk) => disk.path) } : {}),
        qmpSocket: files.qmpSocketPath!,
        console: files.consolePath!,
      };
    } catch (err) {
      this.context.registry.release(name);
      if (launched) await endQemu(launched.pid, qmp);
      await qmp?.close().catch(() => {});
      removeGuestFiles(files);
      throw err;
    }
  }

  async stopGuest(name: string): Promise<void> {
    const { guest } = this.context.registry.get(name);
    if (this.context.isMigrating(name)) {
      const [id, running] = this.context.outgoingOf(name) ?? [];
      // Past its switchover a migration can no longer be cancelled: then waiting is the advice.
      const cancel = id && running?.cancellable ? ` (to ${running.options.peerAddress}), or cancel it with \`gangway cancel ${id.slice(0, 8)}\`: the guest then stays on this host` : '';
      throw new GangwayError(ErrorCode.BAD_REQUEST, `guest ${name} is being migrated; wait for the migration to end${cancel}`);
    }
    await guest.stop();
    // A deleted guest leaves nothing behind, its log included.
    removeGuestFiles(guest.files);
    rmSync(guest.files.logPath, { force: true });
    this.context.registry.remove(name);
    this.context.log.info({ guest: name }, 'guest stopped');
  }

  /** SIGCONT a paused guest (after a switchover left in doubt, once the operator has checked). */
  async resumeGuest(name: string): Promise<void> {
    const { guest, record } = this.context.registry.get(name);
    if (record.outgoing?.phase === 'postcopy') {
      throw new GangwayError(
        ErrorCode.BAD_REQUEST,
        `guest ${name} runs at ${record.outgoing.to} since the post-copy switchover of migration ${record.outgoing.migrationId}; ` +
          'this paused copy holds the pages it may still lack there, so it must not run here. Check `gangway status` on the destination; ' +
          `once the guest is complete there, \`gangway guest stop ${name}\` frees this copy`,
      );
    }
    if (record.outgoing && record.outgoing.phase !== 'paused') {
      throw new GangwayError(
        ErrorCode.BAD_REQUEST,
        `guest ${name} may run at ${record.outgoing.to}: the commit of migration ${record.outgoing.migrationId} was sent and not confirmed. ` +
          'This agent asks the destination until it answers, then removes this copy or resumes it, so that the guest runs in exactly one place',
      );
    }
    if (record.incoming?.stranded) {
      throw new GangwayError(
        ErrorCode.BAD_REQUEST,
        `guest ${name} never received all of its memory from ${record.incoming.from} (${record.incoming.stranded}); resuming it would let it read missing pages as zeros`,
      );
    }
    if (this.context.isMigrating(name)) {
      throw new GangwayError(ErrorCode.BAD_REQUEST, `guest ${name} is being migrated`);
    }
    // Paused for a switchover that never reached the destination (the agent stopped then).
    if (record.outgoing) this.context.registry.update(name, { outgoing: undefined });
    await guest.resume();
  }

  async guestStatus() {
    return Promise.all(
      this.context.registry.list().map(async ({ record, guest }) => {
        let tracker: { kind: string; reason?: string };
        try {
          parseShimReport(readFileSync(record.files.trackReportPath, 'utf8'));
          tracker = { kind: this.context.config.tracker === 'hash-scan' ? 'hash-scan' : 'uffd-wp' };
        } catch (err) {
          tracker = { kind: 'hash-scan', reason: (err as Error).message };
        }
        const alive = guest.alive();
        const seen = alive ? await guest.observe() : undefined;
        return {
          name: record.name,
          kind: record.kind,
          pid: record.pid,
          state: !seen ? 'dead' : seen.paused ? 'paused' : 'running',
          memoryBytes: record.memoryBytes,
          /** Region 0's file (kept for scripts written before guests had regions). */
          memoryPath: record.files.memoryPaths[0]!,
          memoryPaths: record.files.memoryPaths,
          regionBytes: guest.regions.map((region) => region.lengthBytes),
          origin: record.origin,
          tracker,
          ...(record.files.qmpSocketPath ? { qmpSocket: record.files.qmpSocketPath, console: record.files.consolePath } : {}),
          ...(record.files.diskPaths?.length ? { disks: record.files.diskPaths.map(diskStatus) } : {}),
          ...(record.outgoing ? { outgoing: record.outgoing } : {}),
          ...(record.incoming ? { incoming: { ...record.incoming, missingPages: this.context.incomingMissingPages(record.incoming.migrationId) ?? record.incoming.missingPages } } : {}),
          ...seen?.details,
        };
      }),
    );
  }
}
