// uffd-wp dirty tracker: the tracking shim (LD_PRELOADed into the guest) registered
// userfaultfd write-protect with UFFD_FEATURE_WP_ASYNC on the guest's mapping of its memory
// file; PAGEMAP_SCAN on /proc/PID/pagemap returns the written pages and write-protects
// them again in one ioctl. Cost is O(dirty pages), not O(memory).
//
// The shim write-protects the whole mapping once, on a thread of its own, after it reported
// `ok`. That pass marks clean whatever it reaches, so tracking starts (arm) only once it is
// over: a pass still running behind the first full round would turn a write made after that
// round read the page into a page never reported again (native/repro/README.md).
import { closeSync, openSync, readdirSync, readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { GangwayError, ErrorCode } from '../../protocol/errors.js';
import { loadNative } from '../native.js';
import type { DirtyTracker } from './dirty-tracker.js';
import { mergeRuns } from './page-set.js';

export interface ShimReport {
  startAddress: bigint;
  lengthBytes: number;
  pid: number;
  /** Post-copy: the descriptor the guest holds its userfaultfd on (a restarted agent takes it back). */
  uffdFd?: number;
}

/**
 * Parses the shim's report line: `ok start=0x.. length=N pid=P[ postcopy=1[ uffd=FD]]` or
 * `error stage=.. errno=.. message=..` (a guest started for post-copy tracks writes as well).
 */
export function parseShimReport(text: string): ShimReport {
  const line = text.trim();
  const ok = /^ok start=0x([0-9a-f]+) length=(\d+) pid=(\d+)(?: postcopy=1(?: uffd=(\d+))?)?$/i.exec(line);
  if (ok) {
    const report: ShimReport = { startAddress: BigInt(`0x${ok[1]}`), lengthBytes: Number(ok[2]), pid: Number(ok[3]) };
    if (ok[4] !== undefined) report.uffdFd = Number(ok[4]);
    return report;
  }
  const reason = line.startsWith('error') ? line.slice('error'.length).trim() : `unreadable report "${line}"`;
  throw new GangwayError(ErrorCode.TRACKER, `the tracking shim could not register uffd-wp: ${reason}`);
}

/** The name the shim's write-protect thread has while its pass runs (shim.c PROTECT_THREAD_NAME). */
export const PROTECT_THREAD_NAME = 'gangway-wp';

/** Whether a thread of `pid` is the shim's write-protect pass, still running. */
export function protectPassRunning(pid: number): boolean {
  let tasks: string[];
  try {
    tasks = readdirSync(`/proc/${pid}/task`);
  } catch {
    return false; // the process is gone: the next scan fails and says so
  }
  for (const tid of tasks) {
    try {
      if (readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trimEnd() === PROTECT_THREAD_NAME) return true;
    } catch {
      // that thread ended while we looked
    }
  }
  return false;
}

export interface UffdWpOptions {
  /** How long arm() waits for the shim's write-protect pass (it takes 2-30 ms per GiB). */
  protectTimeoutMs?: number;
}

const DEFAULT_PROTECT_TIMEOUT_MS = 60_000;

export class UffdWpTracker implements DirtyTracker {
  readonly kind = 'uffd-wp' as const;
  private readonly native = loadNative();
  private pagemapFd: number | undefined;
  private remarked: Uint32Array = new Uint32Array(0);

  private constructor(
    private readonly pid: number,
    private readonly reportPath: string,
    private readonly report: ShimReport,
    private readonly pageSizeBytes: number,
    private readonly pageCount: number,
    private readonly protectTimeoutMs: number,
  ) {}

  /** Opens tracking of a guest whose shim wrote `reportPath`; throws GANGWAY_ERR_TRACKER if unusable. */
  static open(
    pid: number,
    reportPath: string,
    lengthBytes: number,
    pageSizeBytes: number,
    options: UffdWpOptions = {},
  ): UffdWpTracker {
    let text: string;
    try {
      text = readFileSync(reportPath, 'utf8');
    } catch (cause) {
      throw new GangwayError(ErrorCode.TRACKER, `no tracking-shim report at ${reportPath}`, { cause });
    }
    const report = parseShimReport(text);
    if (report.pid !== pid) {
      throw new GangwayError(ErrorCode.TRACKER, `shim report is for pid ${report.pid}, guest is pid ${pid}`);
    }
    if (report.lengthBytes !== lengthBytes) {
      throw new GangwayError(
        ErrorCode.TRACKER,
        `shim tracks ${report.lengthBytes} bytes, the region has ${lengthBytes}`,
      );
    }
    const tracker = new UffdWpTracker(
      pid,
      reportPath,
      report,
      pageSizeBytes,
      lengthBytes / pageSizeBytes,
      options.protectTimeoutMs ?? DEFAULT_PROTECT_TIMEOUT_MS,
    );
    tracker.pagemapFd = openSync(`/proc/${pid}/pagemap`, 'r');
    return tracker;
  }

  private scan(): Uint32Array {
    if (this.pagemapFd === undefined) throw new Error('tracker is closed');
    try {
      return this.native.pagemapScan(
        this.pagemapFd,
        this.report.startAddress,
        this.report.lengthBytes,
        this.pageSizeBytes,
        true,
      );
    } catch (cause) {
      throw new GangwayError(ErrorCode.TRACKER, `dirty scan of pid ${this.pid} failed: ${String(cause)}`, {
        cause,
      });
    }
  }

  async arm(): Promise<void> {
    await this.untilProtected();
    this.scan();
    this.remarked = new Uint32Array(0);
  }

  /** Waits out the shim's write-protect pass; throws GANGWAY_ERR_TRACKER if it failed or hangs. */
  private async untilProtected(): Promise<void> {
    const deadline = performance.now() + this.protectTimeoutMs;
    while (protectPassRunning(this.pid)) {
      if (performance.now() > deadline) {
        throw new GangwayError(
          ErrorCode.TRACKER,
          `the tracking shim of pid ${this.pid} is still write-protecting after ${this.protectTimeoutMs} ms`,
        );
      }
      await sleep(2);
    }
    // The pass reports its failure by rewriting the report, maybe after open() read it.
    let text: string;
    try {
      text = readFileSync(this.reportPath, 'utf8');
    } catch (cause) {
      throw new GangwayError(ErrorCode.TRACKER, `no tracking-shim report at ${this.reportPath}`, { cause });
    }
    parseShimReport(text);
  }

  async collect(): Promise<Uint32Array> {
    const written = this.scan();
    const result = mergeRuns(written, this.remarked, this.pageCount);
    this.remarked = new Uint32Array(0);
    return result;
  }

  remark(runs: Uint32Array): void {
    this.remarked = mergeRuns(this.remarked, runs, this.pageCount);
  }

  noteSent(): void {}

  close(): void {
    if (this.pagemapFd !== undefined) closeSync(this.pagemapFd);
    this.pagemapFd = undefined;
  }
}
