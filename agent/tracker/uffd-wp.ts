// uffd-wp dirty tracker: the tracking shim (LD_PRELOADed into the guest) registered
// userfaultfd write-protect with UFFD_FEATURE_WP_ASYNC on the guest's mapping of its memory
// file; PAGEMAP_SCAN on /proc/PID/pagemap returns the written pages and write-protects
// them again in one ioctl. Cost is O(dirty pages), not O(memory).
import { closeSync, openSync, readFileSync } from 'node:fs';
import { GangwayError, ErrorCode } from '../../protocol/errors.js';
import { loadNative } from '../native.js';
import type { DirtyTracker } from './dirty-tracker.js';
import { mergeRuns } from './page-set.js';

export interface ShimReport {
  startAddress: bigint;
  lengthBytes: number;
  pid: number;
}

/** Parses the shim's report line: `ok start=0x.. length=N pid=P` or `error stage=.. errno=.. message=..`. */
export function parseShimReport(text: string): ShimReport {
  const line = text.trim();
  const ok = /^ok start=0x([0-9a-f]+) length=(\d+) pid=(\d+)$/i.exec(line);
  if (ok) return { startAddress: BigInt(`0x${ok[1]}`), lengthBytes: Number(ok[2]), pid: Number(ok[3]) };
  const reason = line.startsWith('error') ? line.slice('error'.length).trim() : `unreadable report "${line}"`;
  throw new GangwayError(ErrorCode.TRACKER, `the tracking shim could not register uffd-wp: ${reason}`);
}

export class UffdWpTracker implements DirtyTracker {
  readonly kind = 'uffd-wp' as const;
  private readonly native = loadNative();
  private pagemapFd: number | undefined;
  private remarked: Uint32Array = new Uint32Array(0);

  private constructor(
    private readonly pid: number,
    private readonly report: ShimReport,
    private readonly pageSizeBytes: number,
    private readonly pageCount: number,
  ) {}

  /** Opens tracking of a guest whose shim wrote `reportPath`; throws GANGWAY_ERR_TRACKER if unusable. */
  static open(pid: number, reportPath: string, lengthBytes: number, pageSizeBytes: number): UffdWpTracker {
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
    const tracker = new UffdWpTracker(pid, report, pageSizeBytes, lengthBytes / pageSizeBytes);
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
    this.scan();
    this.remarked = new Uint32Array(0);
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
