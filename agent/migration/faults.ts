// Fault injection for tests that must hit a point no timing can. The engine takes injected
// wrappers (a tracker that loses dirty pages); an agent process under test builds them once
// at start from GANGWAY_FAULT_* variables (faultsFromEnv), so end-to-end tests can reach them.
import type { Logger } from 'pino';
import type { DirtyTracker } from '../tracker/dirty-tracker.js';

/**
 * Fault injection for restart tests (GANGWAY_FAULT_CRASH=point): the agent dies here as
 * with kill -9, at a point a test could not hit by timing.
 */
export function faultCrash(point: string, log?: Logger): void {
  if (process.env.GANGWAY_FAULT_CRASH !== point) return;
  log?.error({ point }, 'fault injection: the agent dies here (GANGWAY_FAULT_CRASH)');
  process.kill(process.pid, 'SIGKILL');
}

/**
 * Fault injection for races (GANGWAY_FAULT_DELAY=point:ms): the agent waits here that long,
 * so that what races with this point (a session closing) reliably comes first.
 */
export async function faultDelay(point: string, log?: Logger): Promise<void> {
  const match = /^([a-z-]+):(\d{1,5})$/.exec(process.env.GANGWAY_FAULT_DELAY ?? '');
  if (!match || match[1] !== point) return;
  log?.error({ point, ms: Number(match[2]) }, 'fault injection: the agent waits here (GANGWAY_FAULT_DELAY)');
  await new Promise((resolve) => setTimeout(resolve, Number(match[2])));
}

/** `runs` without their first `count` pages. */
export function dropPages(runs: Uint32Array, count: number): Uint32Array {
  const out: number[] = [];
  let left = count;
  for (let i = 0; i + 1 < runs.length; i += 2) {
    const take = Math.min(left, runs[i + 1]!);
    left -= take;
    if (take < runs[i + 1]!) out.push(runs[i]! + take, runs[i + 1]! - take);
  }
  return Uint32Array.from(out);
}

/**
 * A tracker that misses writes: the first collect that reports dirty pages loses `pages` of
 * them, as uffd-wp did when it missed a write. The switchover's digest must catch it and the
 * repair send them.
 */
export class DroppingTracker implements DirtyTracker {
  private dropped = false;

  constructor(
    private readonly inner: DirtyTracker,
    private readonly pages: number,
    private readonly log: Logger,
  ) {}

  get kind() {
    return this.inner.kind;
  }

  arm(): Promise<void> {
    return this.inner.arm();
  }

  async collect(): Promise<Uint32Array> {
    const runs = await this.inner.collect();
    if (this.dropped || runs.length === 0) return runs;
    this.dropped = true;
    this.log.warn({ pages: this.pages }, 'fault injection: dirty pages dropped');
    return dropPages(runs, this.pages);
  }

  remark(runs: Uint32Array): void {
    this.inner.remark(runs);
  }

  noteSent(entries: Uint32Array, entryCount: number, payload: Uint8Array): void {
    this.inner.noteSent(entries, entryCount, payload);
  }

  close(): void {
    this.inner.close();
  }
}

/** The faults an agent injects, read once at start: GANGWAY_FAULT_DROP_DIRTY=N loses N dirty pages in each migration. */
export function faultsFromEnv(env: NodeJS.ProcessEnv, log: Logger): { wrapTracker?: (tracker: DirtyTracker) => DirtyTracker } {
  const drop = Number(env.GANGWAY_FAULT_DROP_DIRTY ?? 0);
  if (!(drop > 0)) return {};
  log.warn({ pages: drop }, 'fault injection on: every outgoing migration loses dirty pages (GANGWAY_FAULT_DROP_DIRTY)');
  return { wrapTracker: (tracker) => new DroppingTracker(tracker, drop, log) };
}
