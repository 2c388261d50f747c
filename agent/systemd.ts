// systemd integration without libsystemd: sd_notify datagrams (READY=1, WATCHDOG=1,
// STOPPING=1, STATUS=...) to $NOTIFY_SOCKET, and watchdog pings at half of $WATCHDOG_USEC.
// Outside systemd (no NOTIFY_SOCKET) every call does nothing.
import type { Logger } from './log.js';
import { loadNative } from './native.js';

export class SystemdNotifier {
  private watchdog: NodeJS.Timeout | undefined;

  private constructor(
    private readonly socketPath: string | undefined,
    private readonly watchdogUsec: number | undefined,
    private readonly log: Logger,
  ) {}

  static fromEnv(log: Logger, env: NodeJS.ProcessEnv = process.env): SystemdNotifier {
    const socketPath = env.NOTIFY_SOCKET || undefined;
    const usec = Number(env.WATCHDOG_USEC);
    // WATCHDOG_PID names the process the watchdog is for; a child must not ping for us.
    const forUs = env.WATCHDOG_PID === undefined || Number(env.WATCHDOG_PID) === process.pid;
    const watchdogUsec = Number.isFinite(usec) && usec > 0 && forUs ? usec : undefined;
    return new SystemdNotifier(socketPath, watchdogUsec, log);
  }

  get enabled(): boolean {
    return this.socketPath !== undefined;
  }

  notify(message: string): void {
    if (!this.socketPath) return;
    try {
      loadNative().sdNotify(this.socketPath, message);
    } catch (err) {
      this.log.warn({ err: (err as Error).message }, 'sd_notify failed');
    }
  }

  ready(status: string): void {
    this.notify(`READY=1\nSTATUS=${status}\nMAINPID=${process.pid}`);
    this.startWatchdog();
  }

  stopping(status = 'shutting down'): void {
    this.stopWatchdog();
    this.notify(`STOPPING=1\nSTATUS=${status}`);
  }

  private startWatchdog(): void {
    if (!this.watchdogUsec || this.watchdog) return;
    const intervalMs = Math.max(this.watchdogUsec / 2000, 50);
    this.notify('WATCHDOG=1');
    this.watchdog = setInterval(() => this.notify('WATCHDOG=1'), intervalMs);
    this.watchdog.unref();
  }

  private stopWatchdog(): void {
    clearInterval(this.watchdog);
    this.watchdog = undefined;
  }
}
