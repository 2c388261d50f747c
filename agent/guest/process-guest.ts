// The "process" guest adapter: a gangway-guest program whose state is its memory files (one
// per region) and a small device state. Pause is SIGUSR1 (the guest saves its device state
// and stops itself), resume at the source is SIGCONT, and resume at a destination is a new
// gangway-guest started (hot standby, see launch) on the migrated files and device state.
import type { ChildProcess } from 'node:child_process';
import { closeSync, fstatSync, openSync, readFileSync, readSync, rmSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { GangwayError, ErrorCode } from '../../protocol/errors.js';
import { GuestKind } from '../../protocol/codes.js';
import type { GuestDetails, GuestRegion, HostedGuest } from './adapter.js';
import { guestBinaryPath, trackShimPath } from '../native.js';
import type { DirtyTracker, TrackerKind } from '../tracker/dirty-tracker.js';
import { logTail } from './log-tail.js';
import { openShimTrackers, trackReportPathOf } from './shim-trackers.js';
import { vmSocketPaths } from './vm-spec.js';
import { spawnGuest } from './scope.js';
import { faultCrash } from '../migration/faults.js';

export { trackReportPathOf } from './shim-trackers.js';
import { GUEST_MAX_REGIONS, GUEST_PAGE_SIZE, readGuestHeader, type GuestHeader, type GuestProfileName } from './guest-header.js';

export interface ProcessGuestSpec {
  /** All regions together. */
  memoryBytes: number;
  /** Each region's bytes, when the guest has more than one (they add up to memoryBytes). */
  regionBytes?: number[];
  profile: GuestProfileName;
  dirtyRateBytesPerSec: number;
  seed: number;
  imageSeed: number;
  sharedFraction: number;
  hotFraction: number;
}

export interface GuestFiles {
  /** The guest's memory: a file per region, region 0 (with the guest's header) first. */
  memoryPaths: string[];
  /**
   * Where the guest saves its device state when it is paused for a migration, and finds
   * it when it resumes at a destination. Absent for a guest started by an agent that did
   * not know device state: that one is paused with SIGSTOP and has none.
   */
  deviceStatePath?: string;
  /** Where the tracking shim reports whether it registered uffd-wp (region 0; region i at PATH.i). */
  trackReportPath: string;
  /** The guest's stderr. */
  logPath: string;
  /** A VM's QMP socket (its device-state sockets are named after it). */
  qmpSocketPath?: string;
  /** A VM's serial console. */
  consolePath?: string;
  /** A VM's disks, in its definition's order: the operator's files, never removed with the guest's own (removeGuestFiles). */
  diskPaths?: string[];
}

export type TrackerPreference = 'auto' | TrackerKind;

export interface LaunchOptions {
  /** The guest's name (its scope is named after it). */
  name: string;
  files: GuestFiles;
  /** Create a new memory file with the spec, or continue on an existing one. */
  create?: ProcessGuestSpec;
  /** Override the dirty rate stored in the memory file (resume only). */
  dirtyRateBytesPerSec?: number;
  /** Start blocked until `go()` (hot standby for a migration's destination). */
  standby?: boolean;
  /**
   * Post-copy destination: the guest's end of a socket pair (becomes its fd 3). Its memory
   * file has holes where pages are still missing; the tracking shim registers the mapping
   * for missing-page faults and sends the userfaultfd over this socket.
   */
  postcopySocketFd?: number;
  readyTimeoutMs?: number;
}

export interface LaunchedGuest {
  pid: number;
  /** Resolves with the time (performance.now()) the guest printed `running`. */
  running: Promise<number>;
  /** Standby only: lets the guest map its memory and run. */
  go(): void;
  /** Standby only: the guest exits without touching its memory file; resolves once it has (killed after STANDBY_EXIT_MS). */
  cancel(): Promise<void>;
  /** Resolves when the process exits (only while this agent is its parent). */
  exited: Promise<number | null>;
}

/** The spec a guest was created with, as its memory file records it. */
export function specFromHeader(header: GuestHeader): ProcessGuestSpec {
  return {
    memoryBytes: header.memoryBytes,
    ...(header.regionBytes.length > 1 ? { regionBytes: header.regionBytes } : {}),
    profile: header.profile === 'unknown' ? 'os-image' : header.profile,
    dirtyRateBytesPerSec: header.dirtyRateBytesPerSec,
    seed: header.seed,
    imageSeed: header.imageSeed,
    sharedFraction: header.sharedPermille / 1000,
    hotFraction: header.hotPermille / 1000,
  };
}

/**
 * Why these region sizes cannot make a synthetic guest, or undefined: each a positive
 * multiple of the page, at most GUEST_MAX_REGIONS of them, and the first large enough for
 * the guest's header and its version table (4 bytes per page of the whole guest) with a
 * data page to spare (guest-options.c checks the same).
 */
export function regionSizesProblem(sizes: readonly number[]): string | undefined {
  if (sizes.length < 1 || sizes.length > GUEST_MAX_REGIONS) return `a guest has 1 to ${GUEST_MAX_REGIONS} memory regions, not ${sizes.length}`;
  const odd = sizes.find((size) => !Number.isSafeInteger(size) || size <= 0 || size % GUEST_PAGE_SIZE !== 0);
  if (odd !== undefined) return `a region of ${odd} bytes: each region is a positive multiple of ${GUEST_PAGE_SIZE} bytes`;
  const pages = sizes.reduce((sum, size) => sum + size, 0) / GUEST_PAGE_SIZE;
  const metaPages = 1 + Math.ceil(pages / (GUEST_PAGE_SIZE / 4));
  if (sizes[0]! / GUEST_PAGE_SIZE <= metaPages) {
    return `the first region (${sizes[0]} bytes) holds the guest's header and version table: it needs more than ${metaPages * GUEST_PAGE_SIZE} bytes for a guest of ${pages * GUEST_PAGE_SIZE}`;
  }
  return undefined;
}


/** How long a resume watches for a pause the guest took late (see resume()). */
const PAUSE_WATCH_MS = 30_000;

/** The largest device state a process guest has (it is 48 bytes): anything bigger is not its own. */
const MAX_PROCESS_DEVICE_STATE_BYTES = 4096;

function buildArgs(options: LaunchOptions): string[] {
  const args = ['run', ...options.files.memoryPaths.flatMap((path) => ['--memory-file', path])];
  if (options.files.deviceStatePath) args.push('--device-state', options.files.deviceStatePath);
  const spec = options.create;
  if (spec) {
    args.push(
      '--create',
      '--memory-bytes',
      (spec.regionBytes ?? [spec.memoryBytes]).join(','),
      '--profile',
      spec.profile,
      '--seed',
      String(spec.seed),
      '--hot',
      String(spec.hotFraction),
      '--dirty-rate',
      String(Math.round(spec.dirtyRateBytesPerSec)),
    );
    if (spec.sharedFraction > 0) {
      args.push('--image-seed', String(spec.imageSeed), '--shared', String(spec.sharedFraction));
    }
  } else if (options.dirtyRateBytesPerSec !== undefined) {
    args.push('--dirty-rate', String(Math.round(options.dirtyRateBytesPerSec)));
  }
  if (options.standby) args.push('--standby-fd', '0');
  if (options.postcopySocketFd !== undefined) args.push('--postcopy');
  return args;
}

/** Starts a gangway-guest detached from the agent (it outlives an agent restart). */
export function launchProcessGuest(options: LaunchOptions): LaunchedGuest {
  // The shim takes the regions as one ':'-separated list.
  const colon = options.files.memoryPaths.find((path) => path.includes(':'));
  if (colon !== undefined) {
    throw new GangwayError(ErrorCode.BAD_REQUEST, `memory file ${colon} has a ':' in its path, which the tracking shim takes as a separator: choose a memory directory without one`);
  }
  const logFd = openSync(options.files.logPath, 'a', 0o600);
  let child: ChildProcess;
  try {
    ({ child } = spawnGuest(
      options.name,
      guestBinaryPath,
      buildArgs(options),
      {
        stdio:
          options.postcopySocketFd === undefined
            ? [options.standby ? 'pipe' : 'ignore', 'pipe', logFd]
            : [options.standby ? 'pipe' : 'ignore', 'pipe', logFd, options.postcopySocketFd],
      },
      {
        LD_PRELOAD: trackShimPath,
        GANGWAY_TRACK_PATH: options.files.memoryPaths.join(':'),
        GANGWAY_TRACK_REPORT: options.files.trackReportPath,
        ...(options.postcopySocketFd === undefined ? {} : { GANGWAY_UFFD_SOCKET: '3' }),
      },
    ));
  } finally {
    closeSync(logFd);
  }
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const running = new Promise<number>((resolve, reject) => {
    let seen = '';
    const timeoutMs = options.readyTimeoutMs ?? 30_000;
    const timer = options.standby
      ? undefined
      : setTimeout(() => fail(`did not start within ${timeoutMs} ms`), timeoutMs);
    const fail = (why: string) => {
      clearTimeout(timer);
      const detail = logTail(options.files.logPath);
      reject(new GangwayError(ErrorCode.GUEST_FAILED, `guest ${why}${detail ? `: ${detail}` : ''}`));
    };
    child.once('error', (err) => fail(`could not be started (${err.message})`));
    child.once('exit', (code, signal) => fail(`exited (${signal ?? `code ${code}`}) before running`));
    child.stdout!.on('data', (data: Buffer) => {
      seen += data.toString('utf8');
      const announced = /running pid=\d+ mono_ns=(\d+)\n/.exec(seen);
      if (announced) {
        const at = runningAt(BigInt(announced[1]!));
        clearTimeout(timer);
        child.removeAllListeners('exit');
        child.stdout!.removeAllListeners('data');
        child.stdout!.destroy();
        child.unref();
        resolve(at);
      }
    });
  });
  running.catch(() => {});
  let cancelled: Promise<void> | undefined;
  return {
    pid: child.pid ?? -1,
    running,
    exited,
    go() {
      child.stdin?.end(Buffer.from([1]));
    },
    cancel() {
      cancelled ??= (async () => {
        // Its stdin closed before go(): it exits without mapping its memory.
        child.stdin?.end();
        if (await Promise.race([exited.then(() => true), sleep(STANDBY_EXIT_MS, false, { ref: false })])) return;
        child.kill('SIGKILL');
        await exited;
      })();
      return cancelled;
    },
  };
}

/** How long a cancelled standby guest has to exit on its own before it is killed. */
const STANDBY_EXIT_MS = 5_000;

export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** /proc/PID/stat's fields after the command's name (which may hold spaces and ')'): the state first. */
function statFields(stat: string): string[] {
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
}

function readStat(pid: number): string | undefined {
  try {
    return readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
}

/** The one-letter state of /proc/PID/stat ('R', 'S', 'T' stopped, 'Z' zombie, ...), or undefined. */
export function processState(pid: number): string | undefined {
  const stat = readStat(pid);
  return stat === undefined ? undefined : statFields(stat)[0];
}

/** The kernel's PF_EXITING, in /proc/PID/stat's flags: the task is in do_exit(). */
const PF_EXITING = 0x4;

/**
 * Whether a /proc/PID/stat line is a process that runs or can run again: not a zombie (or
 * dead), and not exiting. A process killed shows 'R' for a while after its memory is gone
 * (do_exit() tears the mm down before the zombie state), so its tracker and its sockets
 * fail before its state says it died: PF_EXITING is set first.
 */
export function statSaysAlive(stat: string): boolean {
  const fields = statFields(stat);
  const state = fields[0];
  if (state === undefined || state === 'Z' || state === 'X' || state === 'x') return false;
  // state ppid pgrp session tty_nr tpgid flags
  const flags = Number(fields[6]);
  return !Number.isInteger(flags) || (flags & PF_EXITING) === 0;
}

/** Whether process `pid` exists and is neither a zombie nor exiting (see statSaysAlive). */
export function processAlive(pid: number): boolean {
  const stat = readStat(pid);
  return stat !== undefined && statSaysAlive(stat);
}

/** pause(): how long it naps between looks at the guest's state (ms), and for how long it does so before looking once a millisecond. */
const NAP_MS = 0.05;
const NAP_PHASE_MS = 10;
const NAP = new Int32Array(new SharedArrayBuffer(4));

/**
 * The performance.now() of a CLOCK_MONOTONIC reading (the guest's `mono_ns`): Node's
 * high-resolution clock is CLOCK_MONOTONIC as well. Never later than now.
 */
export function runningAt(monoNs: bigint): number {
  const now = performance.now();
  const ago = Number(process.hrtime.bigint() - monoNs) / 1e6;
  return now - Math.max(0, ago);
}

/** A running process guest, as the migration engine sees it: its memory files and device state. */
export class ProcessGuest implements HostedGuest {
  readonly kind = GuestKind.process;
  readonly config = {};
  readonly pageSizeBytes = GUEST_PAGE_SIZE;
  readonly regions: readonly GuestRegion[];
  private paused = false;
  /** A SIGUSR1 went out and the guest has not been seen stopped since. */
  private pauseAsked = false;

  /** `regionBytes`: each region's size (one region of memoryBytes when absent). */
  constructor(
    readonly name: string,
    readonly pid: number,
    readonly memoryBytes: number,
    readonly files: GuestFiles,
    regionBytes: readonly number[] = [memoryBytes],
  ) {
    if (regionBytes.length !== files.memoryPaths.length || regionBytes.reduce((a, b) => a + b, 0) !== memoryBytes) {
      throw new GangwayError(ErrorCode.INTERNAL, `guest ${name}: ${files.memoryPaths.length} memory files for regions of ${regionBytes.join(', ')} bytes (${memoryBytes} in all)`);
    }
    this.regions = regionBytes.map((lengthBytes, i) => ({ name: i === 0 ? 'ram' : `ram${i}`, path: files.memoryPaths[i]!, lengthBytes, pageSizeBytes: GUEST_PAGE_SIZE }));
  }

  get isPaused(): boolean {
    return this.paused;
  }

  header(): GuestHeader {
    return readGuestHeader(this.files.memoryPaths[0]!);
  }

  /** Also while it exits: its memory and sockets go before its state says so (see statSaysAlive). */
  gone(): string | undefined {
    if (processAlive(this.pid)) return undefined;
    const tail = logTail(this.files.logPath);
    return `the guest process (pid ${this.pid}) exited${tail ? `; its log ends: ${tail}` : ''}`;
  }

  /** Stopped by the kernel's word, and the guest's own counters from the header in its memory. */
  async observe(): Promise<{ paused: boolean; details?: GuestDetails }> {
    const state = processState(this.pid);
    const paused = this.paused || state === 'T' || state === 't';
    let header: GuestHeader;
    try {
      header = this.header();
    } catch {
      return { paused };
    }
    const details: GuestDetails = {
      passes: header.passes,
      totalWrites: header.totalWrites,
      stalePages: header.stalePages,
      metaErrors: header.metaErrors,
      resumes: header.resumes,
      resumeCheckDone: header.resumeCheckDone,
      resumeStalePages: header.resumeStalePages,
      passesAtResume: header.passesAtResume,
      dirtyRateBytesPerSec: header.dirtyRateBytesPerSec,
      hotSetBytes: header.hotPageCount * GUEST_PAGE_SIZE,
      profile: header.profile,
      deviceLoads: header.deviceLoads,
      deviceSaves: header.deviceSaves,
      deviceErrors: header.deviceErrors,
    };
    return { paused, details };
  }

  alive(): boolean {
    const state = processState(this.pid);
    return state !== undefined && state !== 'Z';
  }

  /**
   * Stops the guest, and waits until the kernel reports it stopped. A guest that keeps a
   * device state is asked with SIGUSR1: it saves the state between two writes and stops
   * itself; one without gets SIGSTOP.
   */
  async pause(timeoutMs = 5_000): Promise<void> {
    const asked = Boolean(this.files.deviceStatePath);
    process.kill(this.pid, asked ? 'SIGUSR1' : 'SIGSTOP');
    this.paused = true;
    this.pauseAsked = asked;
    const asked0 = performance.now();
    const deadline = asked0 + timeoutMs;
    for (;;) {
      const state = processState(this.pid);
      if (state === 'T' || state === 't') {
        this.pauseAsked = false;
        return;
      }
      if (state === undefined || state === 'Z') {
        throw new GangwayError(ErrorCode.GUEST_FAILED, `guest ${this.name} (pid ${this.pid}) is gone`);
      }
      const now = performance.now();
      if (now > deadline) {
        throw new GangwayError(ErrorCode.TIMEOUT, `guest ${this.name} did not stop within ${timeoutMs} ms`);
      }
      // The guest needs a core to stop on: looking again at once, over and over, kept it
      // runnable but not running (a guest writing 50 MiB/s took 3.2 ms to stop, median of
      // 30; 0.5 ms with a 50 µs nap between looks). Past a few ms, look once a millisecond.
      if (now - asked0 < NAP_PHASE_MS) {
        Atomics.wait(NAP, 0, 0, NAP_MS);
        await new Promise((resolve) => setImmediate(resolve));
      } else {
        await sleep(1);
      }
    }
  }

  /**
   * SIGCONT: the guest carries on where it was paused. After a pause asked for (SIGUSR1)
   * that the guest had not taken when pause() gave up, the guest may still take it and stop
   * itself later: it is watched for that, and continued (for up to PAUSE_WATCH_MS).
   */
  async resume(): Promise<void> {
    if (isAlive(this.pid)) process.kill(this.pid, 'SIGCONT');
    this.paused = false;
    if (this.pauseAsked) {
      this.pauseAsked = false;
      void this.continueWhenStopped(PAUSE_WATCH_MS);
    }
  }

  private async continueWhenStopped(withinMs: number): Promise<void> {
    const deadline = performance.now() + withinMs;
    while (performance.now() < deadline && !this.paused) {
      const state = processState(this.pid);
      if (state === undefined || state === 'Z') return;
      // Whether the late pause came before or after the resume's SIGCONT cannot be told
      // apart from here: any stop in the window is continued, unless a new pause began.
      if (state === 'T' || state === 't') process.kill(this.pid, 'SIGCONT');
      await sleep(10);
    }
  }

  /** Ends the guest for good (after a committed migration); its memory file is left to the caller. */
  async terminate(timeoutMs = 5_000): Promise<void> {
    if (!isAlive(this.pid)) return;
    process.kill(this.pid, 'SIGKILL');
    const deadline = performance.now() + timeoutMs;
    while (this.alive() && performance.now() < deadline) await sleep(5);
  }

  /** Ends the guest for good (it runs elsewhere now) and removes its memory files, device state and tracking reports. */
  async discard(): Promise<void> {
    await this.terminate();
    faultCrash('source-guest-ended');
    removeGuestFiles(this.files);
  }

  /** Asks the guest to exit cleanly (SIGTERM, then SIGKILL after the timeout). */
  async stop(timeoutMs = 5_000): Promise<void> {
    if (!isAlive(this.pid)) return;
    if (this.paused) await this.resume();
    process.kill(this.pid, 'SIGTERM');
    const deadline = performance.now() + timeoutMs;
    while (this.alive() && performance.now() < deadline) await sleep(10);
    if (this.alive()) await this.terminate();
  }

  /**
   * The device state the paused guest saved (pause() waited for it to stop, which it does
   * once the state is written); the file goes, so that a later pause cannot be served a
   * stale one. Empty for a guest without device state.
   */
  async saveDeviceState(): Promise<Uint8Array> {
    const path = this.files.deviceStatePath;
    if (!path) return new Uint8Array(0);
    if (!this.paused) throw new GangwayError(ErrorCode.INTERNAL, `guest ${this.name}: device state asked for while it runs`);
    let fd: number;
    try {
      fd = openSync(path, 'r');
    } catch (err) {
      throw new GangwayError(ErrorCode.GUEST_FAILED, `guest ${this.name} saved no device state at ${path} (${(err as Error).message}); see its log ${this.files.logPath}`);
    }
    try {
      const size = fstatSync(fd).size;
      if (size > MAX_PROCESS_DEVICE_STATE_BYTES) throw new GangwayError(ErrorCode.GUEST_FAILED, `guest ${this.name}: its device state file ${path} has ${size} bytes, more than a process guest saves`);
      const state = Buffer.alloc(size);
      if (readSync(fd, state, 0, size, 0) !== size) throw new GangwayError(ErrorCode.GUEST_FAILED, `guest ${this.name}: short read of ${path}`);
      return state;
    } finally {
      closeSync(fd);
      rmSync(path, { force: true });
    }
  }

  /**
   * The pages a post-copy destination must hold before the guest starts: gangway-guest
   * reads its header (page 0 of region 0) with pread before it maps its memory, so a fault
   * cannot bring it in.
   */
  eagerRuns(): Uint32Array[] {
    return this.regions.map((_, i) => (i === 0 ? Uint32Array.of(0, 1) : new Uint32Array(0)));
  }

  /** uffd-wp on every region when the shim registered them all (unless told otherwise), else hash-scan. */
  openTrackers(preference: TrackerPreference): Promise<{ trackers: DirtyTracker[]; fallbackReason?: string }> {
    return openShimTrackers(this.pid, this.regions, this.files, preference);
  }
}

/**
 * Removes what a guest leaves on disk besides its log: memory files, device state, tracking
 * reports, and a VM's sockets and console.
 */
/**
 * Where a memory region's fingerprints of the pages as they arrived are named while the guest
 * still receives them by post-copy (destination-postcopy.ts): next to its memory file, in
 * memoryDir, of the agent's user alone (0600), for an agent restarted before the end.
 */
export function fingerprintsPathOf(memoryPath: string): string {
  return `${memoryPath}.fingerprints`;
}

export function removeGuestFiles(files: GuestFiles): void {
  for (const [i, path] of files.memoryPaths.entries()) {
    rmSync(path, { force: true });
    rmSync(fingerprintsPathOf(path), { force: true });
    rmSync(trackReportPathOf(files, i), { force: true });
  }
  if (files.deviceStatePath) rmSync(files.deviceStatePath, { force: true });
  if (files.qmpSocketPath) for (const path of vmSocketPaths(files.qmpSocketPath)) rmSync(path, { force: true });
  if (files.consolePath) rmSync(files.consolePath, { force: true });
}

/** Every file of the guest's own, its log included (not its disks: the operator's). */
export function guestFilePaths(files: GuestFiles): string[] {
  return [
    ...files.memoryPaths,
    ...files.memoryPaths.map((_, i) => trackReportPathOf(files, i)),
    files.logPath,
    ...(files.deviceStatePath ? [files.deviceStatePath] : []),
    ...(files.qmpSocketPath ? vmSocketPaths(files.qmpSocketPath) : []),
    ...(files.consolePath ? [files.consolePath] : []),
  ];
}
