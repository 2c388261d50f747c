// The calling thread's scheduler counters, for the switchover's debug timing lines. A step
// that took long while its thread neither ran nor waited for a CPU was blocked in the kernel,
// or the whole machine stopped (a VM's vCPU descheduled by its host); one that waited was
// crowded out by this machine's own threads.
import { readFileSync } from 'node:fs';

export interface SchedSample {
  /** On a CPU. */
  cpuMs: number;
  /** Runnable, waiting for a CPU. */
  waitMs: number;
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
export function debugSched(log: { isLevelEnabled(level: string): boolean }): SchedSample | undefined {
  return log.isLevelEnabled('debug') ? threadSched() : undefined;
}

/** What the thread did since `from` (both from threadSched), rounded to 0.01 ms; empty without both. */
export function schedSince(from: SchedSample | undefined): Partial<SchedSample> {
  const now = from && threadSched();
  if (!from || !now) return {};
  return { cpuMs: Math.round((now.cpuMs - from.cpuMs) * 100) / 100, waitMs: Math.round((now.waitMs - from.waitMs) * 100) / 100 };
}
