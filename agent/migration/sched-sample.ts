// The calling thread's scheduler counters, for the switchover's debug timing lines. A step
// that took long while its thread neither ran nor waited for a CPU was blocked in the kernel,
// or the whole machine stopped (a VM's vCPU descheduled by its host); one that waited was
// crowded out by this machine's own threads. A debug sample also counts the garbage
// collections of the thread's V8 heap over its window: a pause there is neither.
import { readFileSync } from 'node:fs';
import { GCProfiler } from 'node:v8';

export interface SchedSample {
  /** On a CPU. */
  cpuMs: number;
  /** Runnable, waiting for a CPU. */
  waitMs: number;
}

/** A first sample for a debug line: the counters, and the collections from then on. */
export interface DebugSample extends SchedSample {
  gc: GCProfiler;
}

/** What a debug line carries: the thread's counters since the first sample, and V8's collections then. */
export interface SchedSpan extends SchedSample {
  /** Time in V8's collections (pauses of this thread), and how many there were. */
  gcMs: number;
  gcs: number;
}

/** /proc/thread-self/schedstat: ns on a CPU, ns waiting on a run queue, time slices. Undefined where it cannot be read. */
export function threadSched(): SchedSample | undefined {
  try {
    const [cpuNs, waitNs] = readFileSync('/proc/thread-self/schedstat', 'utf8').split(' ').map(Number);
    if (!Number.isFinite(cpuNs) || !Number.isFinite(waitNs)) return undefined;
    return { cpuMs: cpuNs! / 1e6, waitMs: waitNs! / 1e6 };
  } catch {
    return undefined;
  }
}

/** A first sample for a debug line: none unless `log` writes debug lines (the read is a syscall). */
export function debugSched(log: { isLevelEnabled(level: string): boolean }): DebugSample | undefined {
  if (!log.isLevelEnabled('debug')) return undefined;
  const sample = threadSched();
  if (!sample) return undefined;
  const gc = new GCProfiler();
  gc.start();
  return { ...sample, gc };
}

const round2 = (ms: number) => Math.round(ms * 100) / 100;

/** What the thread did since `from` (debugSched's), rounded to 0.01 ms; empty without it. Ends `from`'s count of collections. */
export function schedSince(from: DebugSample | undefined): Partial<SchedSpan> {
  if (!from) return {};
  // GCProfiler's cost is in microseconds.
  const collections = from.gc.stop()?.statistics ?? [];
  const now = threadSched();
  if (!now) return {};
  return {
    cpuMs: round2(now.cpuMs - from.cpuMs),
    waitMs: round2(now.waitMs - from.waitMs),
    gcMs: round2(collections.reduce((sum, gc) => sum + gc.cost, 0) / 1000),
    gcs: collections.length,
  };
}
