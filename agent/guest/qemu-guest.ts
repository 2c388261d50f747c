// The "qemu" guest adapter: a QEMU VM whose RAM is one memory-backend-file per region (in the
// memory directory, shared), so that the agent reads, tracks and writes it as it does a
// process guest's memory, with the tracking shim preloaded into QEMU. QEMU itself moves only
// its device state, with the x-ignore-shared capability: its `migrate` skips the shared RAM
// and sends the ROMs and the devices (about 200 KB), through a unix socket this agent serves
// (source) or QEMU serves (destination), and the bytes travel as the migration's deviceState.
//
// Pause is QMP `stop`, resume at the source `cont`; a destination's QEMU is started ahead of
// the switchover with -S -incoming defer on the memory files that are arriving, loads the
// device state with migrate-incoming, and runs on `cont` at the commit. QEMU outlives the
// agent, like a process guest: the agent finds it again by its QMP socket.
import { spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, ftruncateSync, openSync, realpathSync, rmSync, statSync } from 'node:fs';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { relative, isAbsolute, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { GuestKind } from '../../protocol/codes.js';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import type { Logger } from '../log.js';
import { trackShimPath } from '../native.js';
import type { DirtyTracker } from '../tracker/dirty-tracker.js';
import type { GuestDetails, GuestRegion, HostedGuest } from './adapter.js';
import { isAlive, processAlive, processState, removeGuestFiles, type GuestFiles, type TrackerPreference } from './process-guest.js';
import { QmpClient, QmpConnectionError } from './qmp.js';
import type { MigrationInfo } from './qmp-schema.js';
import { logTail } from './log-tail.js';
import { openShimTrackers } from './shim-trackers.js';
import { removeVmTap } from './vm-tap.js';
import { readTestvmStatus, TESTVM_STATUS_ADDR } from './testvm-status.js';
import { MigratingVm, selectDisks, sizedDisk, type DiskSelection, type VmDisk } from './qemu-disks.js';
import { removeGangwayBlockObjects, switchDiskToFile } from './qmp-block.js';
import { qemuArgs, vmDiskFields, vmDiskNodes, vmDisks, vmNbdSocketPath, vmStateSockets, type VmDefinition, type VmSpec } from './vm-spec.js';
import { spawnGuest } from './scope.js';

/** Where QEMU and the kernels it boots are, on this agent. */
export interface QemuSettings {
  /** qemu-system-x86_64, by name (looked up in PATH) or path. */
  binary: string;
  /** Kernels a VM definition names, by file name. */
  imagesDir: string;
  /** VMs' disks (raw files), by file name: a migrated disk arrives here under its name. */
  disksDir: string;
  /** The bridge the TAP devices of arriving VMs join (none: they are left unattached, up). */
  bridge?: string;
}

export const DEFAULT_QEMU_SETTINGS: QemuSettings = { binary: 'qemu-system-x86_64', imagesDir: '/var/lib/gangway/images', disksDir: '/var/lib/gangway/disks' };

/** Why `binary` cannot be run here (not installed), or undefined. */
export function qemuMissing(binary = DEFAULT_QEMU_SETTINGS.binary): string | undefined {
  const run = spawnSync(binary, ['--version'], { encoding: 'utf8', timeout: 10_000 });
  if (!run.error && run.status === 0) return undefined;
  return `${binary} is not usable (${run.error?.message ?? `exit ${run.status}`}; Debian: apt-get install qemu-system-x86)`;
}

export const VM_PAGE_SIZE = 4096;
/** QEMU's device state with x-ignore-shared is ROMs plus devices: some hundred KB. More than this is not one. */
export const MAX_QEMU_DEVICE_STATE_BYTES = 64 * 1024 * 1024;
const DEVICE_STATE_TIMEOUT_MS = 30_000;
const QMP_READY_TIMEOUT_MS = 30_000;
const QUIT_TIMEOUT_MS = 5_000;

/**
 * The kernel file `name` of the images directory, as a real path inside it (a link that
 * leads out of it is refused), or throws with what is wrong.
 */
export function resolveKernel(imagesDir: string, name: string): string {
  let dir: string;
  let path: string;
  try {
    dir = realpathSync(imagesDir);
  } catch (err) {
    throw new GangwayError(ErrorCode.BAD_REQUEST, `the images directory ${imagesDir} cannot be used (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); set vm.imagesDir (--vm-images-dir)`);
  }
  try {
    path = realpathSync(join(dir, name));
  } catch {
    throw new GangwayError(ErrorCode.BAD_REQUEST, `no kernel named ${JSON.stringify(name)} in the images directory ${dir}`);
  }
  const inside = relative(dir, path);
  if (inside === '' || inside.startsWith('..') || isAbsolute(inside)) {
    throw new GangwayError(ErrorCode.BAD_REQUEST, `kernel ${JSON.stringify(name)} leads out of the images directory ${dir}`);
  }
  if (!statSync(path).isFile()) throw new GangwayError(ErrorCode.BAD_REQUEST, `kernel ${JSON.stringify(name)} in ${dir} is not a regular file`);
  return path;
}

/** The PC's option-ROM window, in the RAM at guest-physical 0 (region 0: the machine's RAM, or NUMA node 0's). */
const OPTION_ROM_START = 0xc0000;
const OPTION_ROM_END = 0xe0000;

/** A VM's regions as the engine sees them: 'ram', 'ram1', ... */
export function vmRegions(files: Pick<GuestFiles, 'memoryPaths'>, regionBytes: readonly number[]): GuestRegion[] {
  return regionBytes.map((lengthBytes, i) => ({ name: i === 0 ? 'ram' : `ram${i}`, path: files.memoryPaths[i]!, lengthBytes, pageSizeBytes: VM_PAGE_SIZE }));
}

/** The definition as an offer's guest.config carries it. */
export function vmConfig(definition: VmDefinition): Record<string, string | number> {
  const { machine, cpus, accel, kernel, append, nic, mac } = definition;
  return { machine, cpus, accel, ...(kernel !== undefined ? { kernel } : {}), append, ...(nic && mac ? { nic, mac } : {}), ...vmDiskFields(vmDisks(definition)) };
}

/** Creates a VM's memory files, the agent's own (0600, never through something left at the path), each its region's size. */
export function createVmMemoryFiles(paths: readonly string[], regionBytes: readonly number[]): void {
  for (const [i, path] of paths.entries()) {
    const fd = openSync(path, 'wx', 0o600);
    try {
      ftruncateSync(fd, regionBytes[i]!);
    } finally {
      closeSync(fd);
    }
  }
}

export { logTail } from './log-tail.js';

export interface QemuLaunchOptions {
  name: string;
  spec: VmSpec;
  files: GuestFiles;
  settings: QemuSettings;
  /** A destination's QEMU: paused (-S), waiting for its device state (-incoming defer). */
  incoming: boolean;
  /**
   * The regions' memory files as descriptors of this agent (a destination's files are
   * unnamed until the commit): QEMU gets them as fds 4... and maps /proc/self/fd/N.
   */
  regionFds?: readonly number[];
  /** Post-copy: QEMU's end of the socket its userfaultfds go back over (becomes its fd 3). */
  postcopySocketFd?: number;
  /** The TAP device behind the VM's NIC, when its definition has one. */
  tap?: string;
  /** The disks' files as QEMU opens them, when not files.diskPaths (a destination's arriving disks: /proc/self/fd/N of extraFds). */
  diskPaths?: readonly string[];
  /** More descriptors for QEMU, after the regions' (fds 4 + regionFds.length ...). */
  extraFds?: readonly number[];
  /** Disks QEMU reaches through the agent's NBD exports (post-copy of disks). */
  diskExports?: { socket: string; disks: readonly number[] };
}

export interface LaunchedQemu {
  pid: number;
  /** A standby (incoming) QEMU: it may outlive this agent from now on (it runs). */
  release(): void;
  /** A standby QEMU: it is killed (by the shim) as if this agent had died. */
  abandon(): void;
  /** Resolves with the exit code or signal when QEMU exits (while this agent is its parent). */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Starts QEMU detached from the agent (it outlives an agent restart), with the tracking shim preloaded. */
export function launchQemu(options: QemuLaunchOptions): LaunchedQemu {
  const { files, spec } = options;
  if (!files.qmpSocketPath || !files.consolePath) throw new GangwayError(ErrorCode.INTERNAL, `VM ${options.name}: files without a QMP socket or console`);
  const FIRST_REGION_FD = 4;
  const memoryPaths = options.regionFds ? options.regionFds.map((_, i) => `/proc/self/fd/${FIRST_REGION_FD + i}`) : files.memoryPaths;
  const colon = memoryPaths.find((path) => path.includes(':'));
  if (colon !== undefined) {
    throw new GangwayError(ErrorCode.BAD_REQUEST, `memory file ${colon} has a ':' in its path, which the tracking shim takes as a separator: choose a memory directory without one`);
  }
  const { regionBytes, ...definition } = spec;
  // A destination's arriving disks are unnamed files too: fds after the memory's.
  const diskPaths = options.diskPaths ?? files.diskPaths ?? [];
  const args = qemuArgs(
    options.name,
    definition,
    regionBytes,
    {
      memoryPaths,
      qmpSocket: files.qmpSocketPath,
      serialLog: files.consolePath,
      diskPaths,
      ...(options.tap === undefined ? {} : { tap: options.tap }),
      ...(options.diskExports ? { diskExports: options.diskExports } : {}),
    },
    options.settings.imagesDir,
    options.incoming,
  );
  rmSync(files.qmpSocketPath, { force: true });
  const logFd = openSync(files.logPath, 'a', 0o600);
  let child: ChildProcess;
  try {
    ({ child } = spawnGuest(
      options.name,
      options.settings.binary,
      args,
      { stdio: [options.incoming ? 'pipe' : 'ignore', logFd, logFd, options.postcopySocketFd ?? 'ignore', ...(options.regionFds ?? []), ...(options.extraFds ?? [])] },
      {
        // A standby QEMU dies with the pipe from this agent unless released (shim.c).
        ...(options.incoming ? { GANGWAY_STANDBY_FD: '0' } : {}),
        LD_PRELOAD: trackShimPath,
        GANGWAY_TRACK_PATH: memoryPaths.join(':'),
        GANGWAY_TRACK_REPORT: files.trackReportPath,
        ...(options.postcopySocketFd === undefined ? {} : { GANGWAY_UFFD_SOCKET: '3' }),
      },
    ));
  } finally {
    closeSync(logFd);
  }
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }));
    child.once('error', () => resolve({ code: null, signal: null }));
  });
  child.unref();
  const standbyPipe = child.stdin;
  standbyPipe?.on('error', () => {});
  return {
    pid: child.pid ?? -1,
    exited,
    release() {
      standbyPipe?.end(Buffer.from([1]));
    },
    abandon() {
      standbyPipe?.end();
    },
  };
}

/** How a QEMU that is gone ended, for messages: "exited with code 1: <log lines>". */
async function exitDescription(launched: LaunchedQemu, logPath: string): Promise<string> {
  const ended = await Promise.race([launched.exited, sleep(100).then(() => undefined)]);
  const how = ended ? (ended.signal ? `was killed by ${ended.signal}` : `exited with code ${ended.code}`) : 'is gone';
  const tail = logTail(logPath);
  return `${how}${tail ? `: ${tail}` : ''}`;
}

/**
 * Connects to a QEMU that is starting: its QMP socket appears once it has set up (the
 * memory is mapped by then). Fails with QEMU's exit and log when it dies first.
 */
export async function connectWhenReady(launched: LaunchedQemu, files: GuestFiles, timeoutMs = QMP_READY_TIMEOUT_MS): Promise<QmpClient> {
  const deadline = performance.now() + timeoutMs;
  let gone = false;
  void launched.exited.then(() => (gone = true));
  for (;;) {
    if (gone) throw new GangwayError(ErrorCode.GUEST_FAILED, `QEMU ${await exitDescription(launched, files.logPath)}`);
    try {
      return await QmpClient.connect(files.qmpSocketPath!, { connectTimeoutMs: Math.max(1_000, deadline - performance.now()) });
    } catch (err) {
      if (!(err instanceof QmpConnectionError) || performance.now() > deadline) {
        const tail = logTail(files.logPath);
        throw new GangwayError(ErrorCode.GUEST_FAILED, `QEMU did not answer on ${files.qmpSocketPath} within ${timeoutMs} ms: ${(err as Error).message}${tail ? `; its log: ${tail}` : ''}`);
      }
    }
    await sleep(20);
  }
}

/**
 * The capabilities of a device-state migration: RAM, shared, stays out; and MIGRATION events,
 * so that its end is seen when QEMU says so rather than at the next poll (a save and a load
 * are each a few ms of a switchover's downtime; polling took 1-2 ms more of each).
 */
const DEVICE_STATE_CAPABILITIES = { 'x-ignore-shared': true, events: true } as const;

/** Sets the capabilities of a device-state save ahead, while the VM still runs: a round trip less inside the downtime. */
export async function prepareQemuDeviceStateSave(qmp: QmpClient): Promise<void> {
  await qmp.migrateSetCapabilities(DEVICE_STATE_CAPABILITIES);
}

/**
 * Waits for the migration QEMU runs to end, by its MIGRATION events since `mark`
 * (qmp.eventMark() taken before the command that started it): 'completed', or throws with
 * QEMU's error.
 */
async function migrationEnd(qmp: QmpClient, what: string, timeoutMs: number, mark: number): Promise<MigrationInfo> {
  let ended;
  try {
    ended = await qmp.waitForEvent('MIGRATION', { since: mark, predicate: (data) => data.status === 'completed' || data.status === 'failed' || data.status === 'cancelled', timeoutMs });
  } catch (err) {
    if (err instanceof GangwayError && err.code === ErrorCode.TIMEOUT) {
      const info = await qmp.queryMigrate().catch(() => undefined);
      throw new GangwayError(ErrorCode.TIMEOUT, `QEMU's ${what} did not complete within ${timeoutMs} ms (status ${info?.status ?? 'none'})`);
    }
    throw err;
  }
  if (ended.data.status === 'completed') return { status: 'completed' };
  const info = await qmp.queryMigrate().catch(() => undefined);
  throw new GangwayError(ErrorCode.GUEST_FAILED, `QEMU's ${what} ${ended.data.status}${info?.['error-desc'] ? `: ${info['error-desc']}` : ''}`);
}

/**
 * A stopped VM's device state: QEMU migrates to a unix socket this agent listens on, with
 * x-ignore-shared (its RAM, shared, stays out; prepareQemuDeviceStateSave set it). Bounded
 * in size and time.
 */
export async function saveQemuDeviceState(qmp: QmpClient, socketPath: string, maxBytes = MAX_QEMU_DEVICE_STATE_BYTES): Promise<Buffer> {
  rmSync(socketPath, { force: true });
  const chunks: Buffer[] = [];
  let received = 0;
  let server: Server | undefined;
  let peer: Socket | undefined;
  try {
    const streamEnded = new Promise<void>((resolve, reject) => {
      server = createServer((socket) => {
        if (peer) {
          socket.destroy();
          return;
        }
        peer = socket;
        socket.on('data', (chunk: Buffer) => {
          received += chunk.length;
          if (received > maxBytes) {
            socket.destroy();
            reject(new GangwayError(ErrorCode.GUEST_FAILED, `QEMU's device state is over ${maxBytes} bytes: not a device state gangway moves (is some RAM not shared?)`));
            return;
          }
          chunks.push(chunk);
        });
        socket.once('end', resolve);
        socket.once('error', reject);
      });
    });
    streamEnded.catch(() => {});
    await new Promise<void>((resolve, reject) => {
      server!.once('error', reject);
      server!.listen(socketPath, resolve);
    });
    const mark = qmp.eventMark();
    await qmp.migrate(`unix:${socketPath}`);
    await Promise.race([
      Promise.all([streamEnded, migrationEnd(qmp, 'device-state save', DEVICE_STATE_TIMEOUT_MS, mark)]),
      sleep(DEVICE_STATE_TIMEOUT_MS).then(() => {
        throw new GangwayError(ErrorCode.TIMEOUT, `QEMU's device state did not arrive within ${DEVICE_STATE_TIMEOUT_MS} ms`);
      }),
    ]);
    return Buffer.concat(chunks, received);
  } finally {
    peer?.destroy();
    if (server) await new Promise((resolve) => server!.close(resolve));
    rmSync(socketPath, { force: true });
  }
}

/** A QEMU started with -incoming defer, listening at `socket` for its device state since event `mark` (armQemuIncoming). */
export interface ArmedIncoming {
  socketPath: string;
  mark: number;
}

/** Has a QEMU started with -incoming defer listen for its device state at `socketPath`: ahead of the switchover, a few round trips less inside it. */
export async function armQemuIncoming(qmp: QmpClient, socketPath: string): Promise<ArmedIncoming> {
  rmSync(socketPath, { force: true });
  await qmp.migrateSetCapabilities(DEVICE_STATE_CAPABILITIES);
  const mark = qmp.eventMark();
  await qmp.migrateIncoming(`unix:${socketPath}`);
  return { socketPath, mark };
}

/** Loads a device state into a QEMU that armQemuIncoming made listen for it (this agent writes). */
export async function loadQemuDeviceState(qmp: QmpClient, armed: ArmedIncoming, state: Uint8Array): Promise<MigrationInfo> {
  const { socketPath, mark } = armed;
  const socket = await new Promise<Socket>((resolve, reject) => {
    const socket = createConnection(socketPath);
    socket.once('connect', () => resolve(socket));
    socket.once('error', (err) => reject(new GangwayError(ErrorCode.GUEST_FAILED, `cannot hand QEMU its device state at ${socketPath}: ${err.message}`)));
  });
  try {
    const written = new Promise<void>((resolve, reject) => {
      socket.once('error', (err) => reject(new GangwayError(ErrorCode.GUEST_FAILED, `QEMU stopped reading its device state: ${err.message}`)));
      socket.end(state, resolve);
    });
    written.catch(() => {});
    const ended = migrationEnd(qmp, 'device-state load', DEVICE_STATE_TIMEOUT_MS, mark);
    ended.catch(() => {});
    try {
      await written;
    } catch (err) {
      // QEMU stopped reading because it refused the state: its own reason says why.
      await ended;
      throw err;
    }
    return await ended;
  } finally {
    socket.destroy();
    rmSync(socketPath, { force: true });
  }
}

/** Ends a QEMU: `quit`, then SIGKILL when it has not exited within the timeout. */
export async function endQemu(pid: number, qmp: QmpClient | undefined, timeoutMs = QUIT_TIMEOUT_MS): Promise<void> {
  if (!isAlive(pid)) return;
  if (qmp) await qmp.quit({ timeoutMs }).catch(() => {});
  const gone = () => {
    const state = processState(pid);
    return state === undefined || state === 'Z';
  };
  const deadline = performance.now() + timeoutMs;
  while (!gone() && performance.now() < deadline) await sleep(10);
  if (!gone()) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {}
    const killDeadline = performance.now() + timeoutMs;
    while (!gone() && performance.now() < killDeadline) await sleep(10);
  }
}

/** A running VM, as the migration engine and the daemon see it. */
export class QemuGuest implements HostedGuest {
  readonly kind = GuestKind.qemu;
  readonly regions: readonly GuestRegion[];
  readonly config: Record<string, string | number>;
  readonly memoryBytes: number;
  readonly disks: readonly VmDisk[];
  readonly nbdSocketPath: string;
  private paused = false;
  private qmp: QmpClient | undefined;
  private connecting: Promise<QmpClient> | undefined;

  constructor(
    readonly name: string,
    readonly pid: number,
    readonly files: GuestFiles,
    readonly spec: VmSpec,
    private readonly log?: Logger,
    /** The TAP device this agent made for the VM (it arrived here): removed with it. */
    private readonly createdTap?: string,
  ) {
    if (!files.qmpSocketPath || files.memoryPaths.length !== spec.regionBytes.length) {
      throw new GangwayError(ErrorCode.INTERNAL, `VM ${name}: ${files.memoryPaths.length} memory files for ${spec.regionBytes.length} regions${files.qmpSocketPath ? '' : ', and no QMP socket'}`);
    }
    this.regions = vmRegions(files, spec.regionBytes);
    this.config = vmConfig(spec);
    this.memoryBytes = spec.regionBytes.reduce((sum, size) => sum + size, 0);
    const diskFiles = vmDisks(spec);
    if (diskFiles.length !== (files.diskPaths?.length ?? 0)) throw new GangwayError(ErrorCode.INTERNAL, `VM ${name}: ${diskFiles.length} disks, ${files.diskPaths?.length ?? 0} disk files`);
    this.disks = diskFiles.map((file, index) => ({ index, file, path: files.diskPaths![index]! }));
    this.nbdSocketPath = vmNbdSocketPath(files.qmpSocketPath);
  }

  async removeMigrationLeftovers(): Promise<string[]> {
    if (this.disks.length === 0) return [];
    const removed = await removeGangwayBlockObjects(await this.client());
    rmSync(this.nbdSocketPath, { force: true });
    return [...removed.exports.map((id) => `NBD export ${id}`), ...removed.bitmaps.map((name) => `dirty bitmap ${name}`), ...removed.limited.map((device) => `write limit on ${device}`)];
  }

  async useLocalDisks(): Promise<number> {
    if (this.disks.length === 0) return 0;
    const qmp = await this.client();
    let switched = 0;
    for (const disk of this.disks) if (await switchDiskToFile(qmp, vmDiskNodes(disk.index), disk.path)) switched++;
    return switched;
  }

  /** The VM as a migration moving `disks` sees it: its memory and those disks (their size now), as regions. */
  forMigration(options: { disks: DiskSelection }): MigratingVm {
    return new MigratingVm(this, selectDisks(this.disks, options.disks, this.name).map(sizedDisk));
  }

  get isPaused(): boolean {
    return this.paused;
  }

  /** The QMP connection, made again when it was lost (QEMU serves one client at a time: this agent). */
  async client(): Promise<QmpClient> {
    if (this.qmp?.isOpen) return this.qmp;
    this.connecting ??= QmpClient.connect(this.files.qmpSocketPath!)
      .then((qmp) => {
        this.qmp = qmp;
        return qmp;
      })
      .catch((err: Error) => {
        if (!processAlive(this.pid)) {
          const tail = logTail(this.files.logPath);
          throw new GangwayError(ErrorCode.GUEST_FAILED, `VM ${this.name}: QEMU (pid ${this.pid}) is gone${tail ? `: ${tail}` : ''}`);
        }
        throw err;
      })
      .finally(() => (this.connecting = undefined));
    return this.connecting;
  }

  alive(): boolean {
    const state = processState(this.pid);
    return state !== undefined && state !== 'Z';
  }

  /** Also while it exits: its memory and sockets go before its state says so (see statSaysAlive). */
  gone(): string | undefined {
    if (processAlive(this.pid)) return undefined;
    const tail = logTail(this.files.logPath);
    return `QEMU (pid ${this.pid}) exited${tail ? `; its log ends: ${tail}` : ' (its log says nothing: killed?)'}`;
  }


  /** QMP `stop`: QEMU answers once the vCPUs no longer run. */
  async pause(): Promise<void> {
    const qmp = await this.client();
    this.paused = true;
    await qmp.stop({ timeoutMs: 5_000 });
  }

  /** QMP `cont`, also from QEMU's postmigrate (a device-state save that led nowhere). */
  async resume(): Promise<void> {
    this.paused = false;
    for (let attempt = 1; ; attempt++) {
      try {
        await (await this.client()).cont({ timeoutMs: 5_000 });
        return;
      } catch (err) {
        if (attempt >= 3 || !this.alive()) {
          this.log?.error({ guest: this.name, pid: this.pid, err: (err as Error).message }, 'the VM could not be resumed: `gangway guest resume` tries again');
          return;
        }
        await sleep(100);
      }
    }
  }

  async saveDeviceState(): Promise<Uint8Array> {
    if (!this.paused) throw new GangwayError(ErrorCode.INTERNAL, `VM ${this.name}: device state asked for while it runs`);
    if (!this.savePrepared) await this.prepareDeviceStateSave();
    return saveQemuDeviceState(await this.client(), vmStateSockets(this.files.qmpSocketPath!).out);
  }

  /** The save's capabilities are set in this QEMU (they stay set). */
  private savePrepared = false;

  async prepareDeviceStateSave(): Promise<void> {
    await prepareQemuDeviceStateSave(await this.client());
    this.savePrepared = true;
  }

  /**
   * The option-ROM window (0xC0000-0xDFFFF) of the region at guest-physical 0: QEMU reads it
   * while its device state loads (kvmvapic's post-load reads the ROM's state there), before
   * the VM runs. Left missing, those reads faulted inside the downtime, a round trip to the
   * source each (2 faults, 3-5 ms each, on a 256 MiB q35 VM under TCG). Zero pages in it
   * cost a 12-byte entry; the rest is a few pages of ROM.
   */
  eagerRuns(): Uint32Array[] {
    return this.regions.map((region, i) =>
      i === 0 && region.lengthBytes >= OPTION_ROM_END ? Uint32Array.of(OPTION_ROM_START / VM_PAGE_SIZE, (OPTION_ROM_END - OPTION_ROM_START) / VM_PAGE_SIZE) : new Uint32Array(0),
    );
  }

  openTrackers(preference: TrackerPreference): Promise<{ trackers: DirtyTracker[]; fallbackReason?: string }> {
    return openShimTrackers(this.pid, this.regions, this.files, preference);
  }

  async stop(): Promise<void> {
    let qmp: QmpClient | undefined;
    try {
      qmp = await this.client();
    } catch {}
    await endQemu(this.pid, qmp);
    await this.qmp?.close().catch(() => {});
    if (this.createdTap !== undefined) removeVmTap(this.createdTap);
  }

  async discard(): Promise<void> {
    await this.stop();
    removeGuestFiles(this.files);
  }

  /** QEMU's run state (one query-status) and, for the test kernel, its own counters (from its status block in RAM). */
  async observe(): Promise<{ paused: boolean; details?: GuestDetails }> {
    const details: GuestDetails = { accel: this.spec.accel, cpus: this.spec.cpus, ...(this.spec.kernel !== undefined ? { kernel: this.spec.kernel } : {}) };
    let paused = this.paused;
    try {
      const status = await (await this.client()).queryStatus({ timeoutMs: 2_000 });
      details.vmStatus = status.status;
      paused ||= !status.running;
    } catch (err) {
      details.vmStatus = 'unknown';
      details.qmpError = (err as Error).message;
      const state = processState(this.pid);
      paused ||= state === 'T' || state === 't';
    }
    try {
      const status = readTestvmStatus(this.files.memoryPaths[0]!, TESTVM_STATUS_ADDR, 3);
      details.testvm = {
        state: status.state,
        passes: status.passes,
        pagesWritten: status.pagesWritten,
        stalePages: status.stalePages,
        resumes: status.resumes,
        checkDone: status.checkDone,
        checkStalePages: status.checkStalePages,
      };
      const disk = status.disk;
      if (disk && disk.state !== 'none') {
        details.testvm.disk = { state: disk.state, writes: disk.writes, staleBlocks: disk.staleBlocks, checkStaleBlocks: disk.checkStaleBlocks };
      }
    } catch {
      // Not the test kernel (no GWVMSTAT block): nothing more to show.
    }
    return { paused, details };
  }
}
