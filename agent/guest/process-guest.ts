// The "process" guest adapter: a gangway-guest program whose whole state is its memory
// file. Pause is SIGSTOP, resume at the source is SIGCONT, and resume at a destination is
// a new gangway-guest started (hot standby, see launch) on the migrated file.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, openSync, closeSync, readFileSync, rmSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { GangwayError, ErrorCode } from '../../protocol/errors.js';
import { GuestKind } from '../../protocol/codes.js';
import type { GuestRegion, SourceGuest } from './adapter.js';
import { guestBinaryPath, trackShimPath } from '../native.js';
import type { DirtyTracker, TrackerKind } from '../tracker/dirty-tracker.js';
import { HashScanTracker } from '../tracker/hash-scan.js';
import { UffdWpTracker } from '../tracker/uffd-wp.js';
import { GUEST_PAGE_SIZE, readGuestHeader, type GuestHeader, type GuestProfileName } from './guest-header.js';

export interface ProcessGuestSpec {
  memoryBytes: number;
  profile: GuestProfileName;
  dirtyRateBytesPerSec: number;
  seed: number;
  imageSeed: number;
  sharedFraction: number;
  hotFraction: number;
}

export interface GuestFiles {
  memoryPath: string;
  /** Where the tracking shim reports whether it registered uffd-wp. */
  trackReportPath: string;
  /** The guest's stderr. */
  logPath: string;
}

export type TrackerPreference = 'auto' | TrackerKind;

export interface LaunchOptions {
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
  /** Standby only: the guest exits without touching its memory file. */
  cancel(): void;
  /** Resolves when the process exits (only while this agent is its parent). */
  exited: Promise<number | null>;
}

/** The spec a guest was created with, as its memory file records it. */
export function specFromHeader(header: GuestHeader): ProcessGuestSpec {
  return {
    memoryBytes: header.memoryBytes,
    profile: header.profile === 'unknown' ? 'os-image' : header.profile,
    dirtyRateBytesPerSec: header.dirtyRateBytesPerSec,
    seed: header.seed,
    imageSeed: header.imageSeed,
    sharedFraction: header.sharedPermille / 1000,
    hotFraction: header.hotPermille / 1000,
  };
}

function buildArgs(options: LaunchOptions): string[] {
  const args = ['run', '--memory-file', options.files.memoryPath];
  const spec = options.create;
  if (spec) {
    args.push(
      '--create',
      '--memory-bytes',
      String(spec.memoryBytes),
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
  const logFd = openSync(options.files.logPath, 'a', 0o600);
  let child: ChildProcess;
  try {
    child = spawn(guestBinaryPath, buildArgs(options), {
      detached: true,
      stdio:
        options.postcopySocketFd === undefined
          ? [options.standby ? 'pipe' : 'ignore', 'pipe', logFd]
          : [options.standby ? 'pipe' : 'ignore', 'pipe', logFd, options.postcopySocketFd],
      env: {
        ...process.env,
        LD_PRELOAD: trackShimPath,
        GANGWAY_TRACK_PATH: options.files.memoryPath,
        GANGWAY_TRACK_REPORT: options.files.trackReportPath,
        ...(options.postcopySocketFd === undefined ? {} : { GANGWAY_UFFD_SOCKET: '3' }),
      },
    });
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
      let detail = '';
      try {
        detail = readFileSync(options.files.logPath, 'utf8').trim().split('\n').slice(-3).join(' | ');
      } catch {}
      reject(new GangwayError(ErrorCode.GUEST_FAILED, `guest ${why}${detail ? `: ${detail}` : ''}`));
    };
    child.once('error', (err) => fail(`could not be started (${err.message})`));
    child.once('exit', (code, signal) => fail(`exited (${signal ?? `code ${code}`}) before running`));
    child.stdout!.on('data', (data: Buffer) => {
      seen += data.toString('utf8');
      if (/running pid=\d+\n/.test(seen)) {
        const at = performance.now();
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
  return {
    pid: child.pid ?? -1,
    running,
    exited,
    go() {
      child.stdin?.end(Buffer.from([1]));
    },
    cancel() {
      child.stdin?.end();
    },
  };
}

export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** The one-letter state of /proc/PID/stat ('R', 'S', 'T' stopped, 'Z' zombie, ...), or undefined. */
export function processState(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
  } catch {
    return undefined;
  }
}

/** A running process guest, as the migration engine sees it: one region, its memory file. */
export class ProcessGuest implements SourceGuest {
  readonly kind = GuestKind.process;
  readonly pageSizeBytes = GUEST_PAGE_SIZE;
  readonly regions: readonly GuestRegion[];
  private paused = false;

  constructor(
    readonly name: string,
    readonly pid: number,
    readonly memoryBytes: number,
    readonly files: GuestFiles,
  ) {
    this.regions = [{ name: 'ram', path: files.memoryPath, lengthBytes: memoryBytes, pageSizeBytes: GUEST_PAGE_SIZE }];
  }

  get isPaused(): boolean {
    return this.paused;
  }

  header(): GuestHeader {
    return readGuestHeader(this.files.memoryPath);
  }

  alive(): boolean {
    const state = processState(this.pid);
    return state !== undefined && state !== 'Z';
  }

  /** SIGSTOP, and wait until the kernel reports the process stopped. */
  async pause(timeoutMs = 5_000): Promise<void> {
    process.kill(this.pid, 'SIGSTOP');
    this.paused = true;
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const state = processState(this.pid);
      if (state === 'T' || state === 't') return;
      if (state === undefined || state === 'Z') {
        throw new GangwayError(ErrorCode.GUEST_FAILED, `guest ${this.name} (pid ${this.pid}) is gone`);
      }
      if (performance.now() > deadline) {
        throw new GangwayError(ErrorCode.TIMEOUT, `guest ${this.name} did not stop within ${timeoutMs} ms`);
      }
      await new Promise((resolve) => setImmediate(resolve));
    }
  }

  /** SIGCONT: the guest carries on where it was paused. */
  resume(): void {
    if (isAlive(this.pid)) process.kill(this.pid, 'SIGCONT');
    this.paused = false;
  }

  /** Ends the guest for good (after a committed migration); its memory file is left to the caller. */
  async terminate(timeoutMs = 5_000): Promise<void> {
    if (!isAlive(this.pid)) return;
    process.kill(this.pid, 'SIGKILL');
    const deadline = performance.now() + timeoutMs;
    while (this.alive() && performance.now() < deadline) await sleep(5);
  }

  /** Ends the guest for good (it runs elsewhere now) and removes its memory file and tracking report. */
  async discard(): Promise<void> {
    await this.terminate();
    rmSync(this.files.memoryPath, { force: true });
    rmSync(this.files.trackReportPath, { force: true });
  }

  /** Asks the guest to exit cleanly (SIGTERM, then SIGKILL after the timeout). */
  async stop(timeoutMs = 5_000): Promise<void> {
    if (!isAlive(this.pid)) return;
    if (this.paused) this.resume();
    process.kill(this.pid, 'SIGTERM');
    const deadline = performance.now() + timeoutMs;
    while (this.alive() && performance.now() < deadline) await sleep(10);
    if (this.alive()) await this.terminate();
  }

  /**
   * The pages a post-copy destination must hold before the guest starts: gangway-guest
   * reads its header (page 0) with pread before it maps its memory, so a fault cannot
   * bring it in.
   */
  /** None: a process guest keeps its whole state in its memory. */
  async saveDeviceState(): Promise<Uint8Array> {
    return new Uint8Array(0);
  }

  eagerRuns(): Uint32Array {
    return Uint32Array.of(0, 1);
  }

  /** uffd-wp when the shim registered it (unless told otherwise), else hash-scan. */
  async openTracker(preference: TrackerPreference): Promise<{ tracker: DirtyTracker; fallbackReason?: string }> {
    let fallbackReason: string | undefined;
    if (preference !== 'hash-scan') {
      try {
        if (!existsSync(this.files.trackReportPath)) throw new Error('the tracking shim wrote no report');
        return {
          tracker: UffdWpTracker.open(this.pid, this.files.trackReportPath, this.memoryBytes, this.pageSizeBytes),
        };
      } catch (err) {
        if (preference === 'uffd-wp') throw err;
        fallbackReason = err instanceof Error ? err.message : String(err);
      }
    }
    const tracker = await HashScanTracker.open(this.files.memoryPath, this.memoryBytes, this.pageSizeBytes);
    return fallbackReason === undefined ? { tracker } : { tracker, fallbackReason };
  }
}
