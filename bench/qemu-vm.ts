// One QEMU process of the QEMU baseline (qemu-baseline.ts): started on the test kernel,
// maybe inside a network namespace, its QMP connected, its kernel's readiness and its CPU
// time read, and stopped for sure: `quit`, then SIGKILL to the pid it was started with.
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, ftruncateSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import { QmpClient, QmpConnectionError, type QmpEvent } from '../agent/guest/qmp.js';
import type { MigrationInfo } from '../agent/guest/qmp-schema.js';
import { readTestvmStatus, type TestvmStatus } from '../agent/guest/testvm-status.js';
import { ErrorCode, GangwayError } from '../protocol/errors.js';

export const QEMU_BINARY = 'qemu-system-x86_64';
const MiB = 1024 * 1024;
const POLL_MS = 20;
const QMP_COMMAND_TIMEOUT_MS = 5_000;
/** Events since a mark must outlive a long migration's MIGRATION_PASS events. */
const QMP_RECENT_EVENTS = 4096;
const QUIT_TIMEOUT_MS = 3_000;
const KILL_TIMEOUT_MS = 5_000;
const PRETOUCH_CHUNK_BYTES = 4 * MiB;
const TAIL_BYTES = 4096;

/** An error of the baseline, with QEMU's last word on the migration when there is one. */
export class QemuBaselineError extends GangwayError {
  constructor(
    code: ErrorCode,
    message: string,
    readonly lastInfo?: MigrationInfo,
    options?: { cause?: unknown },
  ) {
    super(code, message, options);
    this.name = 'QemuBaselineError';
  }
}

let clockTicks: Promise<number> | undefined;
/** Clock ticks per second of /proc/PID/stat's utime and stime (`getconf CLK_TCK`). */
export function clockTicksPerSec(): Promise<number> {
  clockTicks ??= execa('getconf', ['CLK_TCK'], { timeout: 10_000, stdin: 'ignore' }).then((result) => {
    const ticks = Number(result.stdout.trim());
    if (!Number.isInteger(ticks) || ticks <= 0) throw new Error(`getconf CLK_TCK said ${JSON.stringify(result.stdout)}`);
    return ticks;
  });
  return clockTicks;
}

/** utime + stime of process `pid` so far, in seconds (`ticks` per second); undefined once it is gone. */
export function readCpuSeconds(pid: number, ticks: number): number | undefined {
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  // Fields after the command name, which is in parentheses and may hold spaces: state is field 3, utime 14, stime 15.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / ticks;
}

/** A QEMU process this benchmark started; `stop()` ends it whatever state it is in. */
export class QemuVm {
  readonly child: ChildProcess;
  readonly pid: number;
  /** undefined while it runs. */
  exit: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  readonly exited: Promise<void>;
  private stderrTail = '';
  private client: QmpClient | undefined;

  constructor(
    readonly name: string,
    readonly memPath: string,
    readonly qmpPath: string,
    readonly logPath: string,
    command: readonly string[],
  ) {
    this.child = spawn(command[0]!, command.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });
    this.exited = new Promise((resolve) => {
      this.child.once('exit', (code, signal) => {
        this.exit = { code, signal };
        resolve();
      });
      this.child.once('error', (err) => {
        this.stderrTail += `\n${err.message}`;
        this.exit ??= { code: null, signal: null };
        resolve();
      });
    });
    this.child.stderr!.setEncoding('utf8').on('data', (chunk: string) => {
      this.stderrTail = (this.stderrTail + chunk).slice(-TAIL_BYTES);
    });
    // Without a pid the spawn failed; `error` says why, and `exited` has resolved.
    this.pid = this.child.pid ?? -1;
  }

  get qmp(): QmpClient {
    if (!this.client) throw new Error(`${this.name}: no QMP connection yet`);
    return this.client;
  }

  /** What QEMU said on stderr and the kernel on COM1, the last few KiB of each, for an error message. */
  describe(): string {
    let serial = '';
    try {
      serial = readFileSync(this.logPath, 'utf8').slice(-TAIL_BYTES);
    } catch {
      // No log yet.
    }
    const exit = this.exit ? `exited (${this.exit.signal ?? `code ${this.exit.code}`})` : 'running';
    return `${this.name} (pid ${this.pid}, ${exit}); stderr: ${this.stderrTail.trim() || '-'}; COM1: ${serial.trim().split('\n').slice(-8).join(' | ') || '-'}`;
  }

  private failIfExited(what: string): void {
    if (this.exit) throw new QemuBaselineError(ErrorCode.GUEST_FAILED, `QEMU exited while ${what}: ${this.describe()}`);
  }

  /** Connects to QMP once QEMU has made its socket. */
  async connect(timeoutMs: number, signal?: AbortSignal): Promise<QmpClient> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      this.failIfExited('starting');
      try {
        this.client = await QmpClient.connect(this.qmpPath, { commandTimeoutMs: QMP_COMMAND_TIMEOUT_MS, recentEventCount: QMP_RECENT_EVENTS });
        break;
      } catch (err) {
        const code = ((err as { cause?: NodeJS.ErrnoException }).cause)?.code;
        // QEMU makes its socket a moment after it starts.
        const notYet = err instanceof QmpConnectionError && (code === 'ENOENT' || code === 'ECONNREFUSED');
        if (!notYet) throw err;
        if (performance.now() > deadline) {
          throw new QemuBaselineError(ErrorCode.TIMEOUT, `no QMP socket from ${this.describe()} within ${timeoutMs} ms: ${(err as Error).message}`, undefined, { cause: err });
        }
      }
      await sleep(POLL_MS, undefined, { signal });
    }
    // `ip netns exec` execs QEMU in its own process, so the pid is QEMU's; were it not, the CPU figures would be ip's.
    const comm = readFileSync(`/proc/${this.pid}/comm`, 'utf8').trim();
    if (!comm.startsWith('qemu-system')) throw new Error(`pid ${this.pid} of ${this.name} is ${comm}, not QEMU: its CPU time would not be QEMU's`);
    return this.client;
  }

  /** utime + stime so far, in seconds. */
  async cpuSeconds(): Promise<number> {
    const seconds = readCpuSeconds(this.pid, await clockTicksPerSec());
    if (seconds === undefined) throw new Error(`QEMU pid ${this.pid} is gone`);
    return seconds;
  }

  /** Waits for the kernel to say it is ready (every page written), failing at once when it fails or QEMU exits. */
  async waitReady(timeoutMs: number, signal?: AbortSignal): Promise<TestvmStatus> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      this.failIfExited('booting');
      let status: TestvmStatus | undefined;
      try {
        status = readTestvmStatus(this.memPath);
      } catch {
        // The kernel has not written its block yet.
      }
      if (status?.state === 'running') return status;
      if (status?.state === 'failed') throw new QemuBaselineError(ErrorCode.GUEST_FAILED, `the test kernel failed: ${this.describe()}`);
      if (performance.now() > deadline) throw new QemuBaselineError(ErrorCode.TIMEOUT, `the test kernel was not ready within ${timeoutMs} ms: ${this.describe()}`);
      await sleep(50, undefined, { signal });
    }
  }

  /** Quits through QMP, then SIGKILL to this pid; waits for the exit either way (bounded). */
  async stop(): Promise<void> {
    if (!this.exit && this.client?.isOpen) {
      await this.client.quit({ timeoutMs: QUIT_TIMEOUT_MS }).catch(() => {});
      await Promise.race([this.exited, sleep(QUIT_TIMEOUT_MS, undefined, { ref: false })]);
    }
    await this.client?.close().catch(() => {});
    if (!this.exit && this.pid > 0) {
      this.child.kill('SIGKILL');
      await Promise.race([this.exited, sleep(KILL_TIMEOUT_MS, undefined, { ref: false })]);
      if (!this.exit) throw new Error(`QEMU pid ${this.pid} (${this.name}) did not exit after SIGKILL within ${KILL_TIMEOUT_MS} ms`);
    }
  }
}

/** Creates `path` (mode 0600; a leftover is replaced), sized `bytes`: written with zeros when `preTouch`, sparse otherwise. */
export function createMemoryFile(path: string, bytes: number, preTouch: boolean): void {
  rmSync(path, { force: true });
  const fd = openSync(path, 'wx', 0o600);
  try {
    if (!preTouch) return ftruncateSync(fd, bytes);
    const zeros = Buffer.alloc(PRETOUCH_CHUNK_BYTES);
    for (let at = 0; at < bytes; ) {
      at += writeSync(fd, zeros, 0, Math.min(zeros.length, bytes - at), at);
    }
  } finally {
    closeSync(fd);
  }
}

export function eventMs(event: QmpEvent): number {
  return event.timestamp.seconds * 1000 + event.timestamp.microseconds / 1000;
}
