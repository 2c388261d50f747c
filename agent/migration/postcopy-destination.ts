// The destination's side of post-copy: the guest runs here while some of its pages are
// still at the source. Its first touch of a missing page is a userfaultfd fault (read by the
// addon's thread); the page is asked for at once with a fetch frame, and installed with
// UFFDIO_COPY when it arrives, by fetch or by the source's background push, whichever comes
// first. A page is installed only while it is missing, so a late duplicate never overwrites
// what the guest has written since.
import { closeSync } from 'node:fs';
import type { Logger } from 'pino';
import { MAX_FETCH_RUNS } from '../../protocol/limits.js';
import { loadNative, type MonitorHandle, type RegionHandle } from '../native.js';
import { PageSet } from '../tracker/page-set.js';
import { LatencySamples } from './postcopy.js';
import type { AgentMetrics } from '../metrics.js';

export interface PostcopyStats {
  /** Pages the destination did not hold when the guest started here. */
  missingPages: number;
  /** Faults on missing pages (each page asked for once). */
  faults: number;
  /** Missing pages that arrived because the guest faulted on them / by the background push. */
  fetchedPages: number;
  pushedPages: number;
  /** Fault to installed page, as the destination measures it. */
  faultLatency: { p50Ms: number; p99Ms: number; maxMs: number };
}

/**
 * What a region's receiver keeps of the pages its guest waited on: each asked for once and
 * when, fault latencies when they arrive, and how each missing page came (fetched because
 * the guest waited on it, or pushed), with the agent's metrics. Memory faults and disk
 * requests keep the same account.
 */
export class FaultLedger {
  private readonly requested: PageSet;
  private readonly faultAt = new Map<number, number>();
  private faults = 0;
  private fetched = 0;
  private pushed = 0;
  private pendingFetched = 0;
  private pendingPushed = 0;

  constructor(
    pageCount: number,
    /** Fault latencies, shared by the receivers of one guest's regions. */
    public latency: LatencySamples,
    private readonly metrics?: AgentMetrics,
  ) {
    this.requested = new PageSet(pageCount);
  }

  /** The guest waits on `page`: true the first time (ask the source for it), false once asked. */
  ask(page: number, now: number): boolean {
    if (this.requested.has(page)) return false;
    this.requested.add(page);
    this.faultAt.set(page, now);
    this.faults++;
    this.metrics?.postcopyFaults.inc();
    return true;
  }

  /** `page` arrived where it was missing; settle() reports what arrived to the metrics. */
  arrived(page: number, now: number): void {
    if (!this.requested.has(page)) {
      this.pendingPushed++;
      return;
    }
    this.pendingFetched++;
    const at = this.faultAt.get(page);
    if (at === undefined) return;
    const ms = now - at;
    this.latency.add(ms);
    this.metrics?.postcopyFaultLatency.observe(ms / 1000);
    this.faultAt.delete(page);
  }

  /** Counts what arrived since the last call (one install's pages). */
  settle(): void {
    this.fetched += this.pendingFetched;
    this.pushed += this.pendingPushed;
    if (this.pendingFetched > 0) this.metrics?.postcopyPages.inc({ how: 'fetched' }, this.pendingFetched);
    if (this.pendingPushed > 0) this.metrics?.postcopyPages.inc({ how: 'pushed' }, this.pendingPushed);
    this.pendingFetched = 0;
    this.pendingPushed = 0;
  }

  /** The pages the guest waits on that are still missing, ascending (to ask for again after a reattach). */
  waitingOn(missing: (page: number) => boolean): number[] {
    return [...this.faultAt.keys()].filter(missing).sort((a, b) => a - b);
  }

  stats(missingPages: number): PostcopyStats {
    return { missingPages, faults: this.faults, fetchedPages: this.fetched, pushedPages: this.pushed, faultLatency: this.latency.summary() };
  }
}

/** Appends `page` to ascending runs, extending the last run when it is adjacent. */
export function pushPage(runs: number[], page: number): void {
  const n = runs.length;
  if (n >= 2 && runs[n - 2]! + runs[n - 1]! === page) runs[n - 1]!++;
  else runs.push(page, 1);
}

/** Sends `runs` as fetch frames of at most MAX_FETCH_RUNS runs each. */
export function sendFetchRuns(runs: readonly number[], sendFetch: (runs: Uint32Array) => void): void {
  for (let i = 0; i < runs.length; i += MAX_FETCH_RUNS * 2) sendFetch(Uint32Array.from(runs.slice(i, i + MAX_FETCH_RUNS * 2)));
}

/** A region's side of post-copy at the destination: memory (PostcopyReceiver) or a disk (PostcopyDisk). */
export interface RegionReceiver {
  /** Pages still missing. */
  readonly missingPages: number;
  /** Takes pages (a memory region: once the guest's userfaultfd is here). */
  readonly attached: boolean;
  /** Installs a pages frame's entries where they are still missing. */
  install(entries: Uint32Array, raw: Uint8Array): void;
  /** Resolves once every missing page is installed. */
  whenComplete(): Promise<void>;
  /** Asks again for the pages the guest waits on (after a reattach). */
  refetch(): void;
  /** The pages still missing, as runs. */
  missingRuns(): Uint32Array;
  stats(): PostcopyStats;
  close(): void;
}

export class PostcopyReceiver implements RegionReceiver {
  private readonly native = loadNative();
  private readonly missing: PageSet;
  private readonly ledger: FaultLedger;
  private readonly initialMissing: number;
  private uffd = -1;
  private start = 0;
  private monitor: MonitorHandle | undefined;
  private readonly out = new Uint32Array(2);
  private completeWaiters: (() => void)[] = [];
  private closed = false;

  constructor(
    private readonly region: { handle: RegionHandle; pageCount: number; pageSizeBytes: number },
    missingRuns: Uint32Array,
    /** Sends a fetch frame for these runs. */
    private readonly sendFetch: (runs: Uint32Array) => void,
    /** The guest's descriptor failed (the guest is gone). */
    private readonly onGuestGone: () => void,
    private readonly log: Logger,
    metrics?: AgentMetrics,
    /** Fault latencies, shared by the receivers of one guest's regions. */
    latency?: LatencySamples,
  ) {
    this.ledger = new FaultLedger(region.pageCount, latency ?? new LatencySamples(), metrics);
    this.missing = new PageSet(region.pageCount);
    this.missing.addRuns(missingRuns);
    this.initialMissing = this.missing.size;
  }

  get missingPages(): number {
    return this.missing.size;
  }

  get attached(): boolean {
    return this.uffd >= 0;
  }

  /** Takes the guest's userfaultfd (mapping at `start`) and starts reading its faults. */
  attach(uffd: number, start: number): void {
    this.uffd = uffd;
    this.start = start;
    this.monitor = this.native.uffdMonitor(uffd, start, this.region.pageSizeBytes, this.region.pageCount, (pages) => this.onFaults(pages));
  }

  private onFaults(pages: Uint32Array | null): void {
    if (this.closed) return;
    if (pages === null) {
      this.onGuestGone();
      return;
    }
    const now = performance.now();
    const fetch: number[] = [];
    for (const page of pages) {
      if (!this.missing.has(page)) {
        // Installed between the fault and now: the install woke it, but make sure.
        this.native.uffdWake(this.uffd, this.start, this.region.pageSizeBytes, page, 1);
        continue;
      }
      if (this.ledger.ask(page, now)) pushPage(fetch, page);
    }
    sendFetchRuns(fetch, this.sendFetch);
  }

  /**
   * Installs a pages frame's zero and data entries (after decompression); counts what was
   * missing as fetched (the guest asked for it) or pushed.
   */
  install(entries: Uint32Array, raw: Uint8Array): void {
    const entryCount = entries.length / 3;
    this.native.uffdInstall(this.uffd, this.start, this.region.handle, entries, entryCount, raw, this.out);
    const now = performance.now();
    for (let e = 0; e < entryCount; e++) {
      const first = entries[e * 3 + 1]!;
      const end = first + entries[e * 3 + 2]!;
      for (let page = first; page < end; page++) if (this.missing.delete(page)) this.ledger.arrived(page, now);
    }
    this.ledger.settle();
    if (this.missing.size === 0) for (const resolve of this.completeWaiters.splice(0)) resolve();
  }

  /** Resolves once every missing page is installed. */
  whenComplete(): Promise<void> {
    if (this.missing.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.completeWaiters.push(resolve));
  }

  /** Asks again for the pages the guest faulted on that have not come (after a reattach). */
  refetch(): void {
    const runs: number[] = [];
    for (const page of this.ledger.waitingOn((page) => this.missing.has(page))) pushPage(runs, page);
    sendFetchRuns(runs, this.sendFetch);
  }

  /** The pages still missing, as runs (to ask the source for again after a reconnect). */
  missingRuns(): Uint32Array {
    return this.missing.toRuns();
  }

  stats(): PostcopyStats {
    return this.ledger.stats(this.initialMissing);
  }

  /** Stops reading faults and closes this agent's copy of the descriptor (the guest keeps its own). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.monitor) this.native.uffdMonitorClose(this.monitor);
    if (this.uffd >= 0) {
      try {
        closeSync(this.uffd);
      } catch {}
    }
    this.uffd = -1;
  }
}
