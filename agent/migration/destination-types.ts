// What a destination migration is given and what it reports, and what its parts (here
// destination.ts, incoming-pages.ts, incoming-device-state.ts, destination-postcopy.ts,
// destination-disks.ts) share: the regions as this side holds them, and the timeout on a
// guest's start.
import type { Logger } from 'pino';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import type { DestinationGroup } from '../dedup/dest-group.js';
import type { LauncherTable } from '../guest/adapter.js';
import type { GuestRegistry } from '../guest/registry.js';
import type { AgentMetrics } from '../metrics.js';
import type { RegionHandle } from '../native.js';
import type { Slots } from './flow.js';

export { fingerprintsPathOf } from '../guest/process-guest.js';

export interface DestinationContext {
  registry: GuestRegistry;
  /** The guest kinds this agent takes, by the offer's kind. */
  launchers: LauncherTable;
  memoryDir: string;
  creditBytes: number;
  maxPayloadBytes: number;
  log: Logger;
  /** Is the agent taking new migrations? */
  accepting: () => boolean;
  metrics?: AgentMetrics;
  /** The session's open dedup groups, by id. */
  groups: Map<string, DestinationGroup>;
  /** Post-copy: how long to wait for the source to come back after the session broke. */
  reattachWindowMs?: number;
  /**
   * memoryDir space promised to migrations already accepted that have not taken it yet (a
   * post-copy's sparse file fills as pages come), and the space always kept free: an offer is
   * accepted only when what is free covers both and the new guest.
   */
  space: { reservedBytes: number; headroomBytes: number };
  /** The session's LZ4 decompressions under way at once (shared by its migrations). */
  decompressions: Slots;
  /** The largest device state this agent takes (peers.maxDeviceState). */
  maxDeviceStateBytes: number;
  /** A peer broke a limit (credit): for the agent's log and metrics. */
  onLimit?: (limit: 'credit' | 'space' | 'device-state') => void;
}

export interface IncomingResult {
  migrationId: string;
  guest: string;
  from: string;
  /**
   * committed: the guest runs here, complete. aborted: it never ran here (the source kept
   * it). stranded: post-copy, the guest started here but some of its pages never came (it
   * waits on them, paused), or its memory failed the check against the source's.
   */
  outcome: 'committed' | 'aborted' | 'stranded';
  reason?: string;
  /** aborted by the source's abort frame: its error code (ABORTED when the source cancelled). */
  sourceCode?: string;
  pages: number;
  rounds: number;
  technique: 'precopy' | 'postcopy' | 'hybrid';
}

/** A region of the incoming guest: its unnamed memory file, and this agent's mapping of it. */
export interface IncomingRegion {
  fd: number;
  handle: RegionHandle;
  pageCount: number;
  pageSizeBytes: number;
  lengthBytes: number;
  /** A disk (a sparse file in the disks directory, that no guest writes before it runs here). */
  disk?: boolean;
  /**
   * Post-copy, a memory region: the file its fingerprints of the pages as they arrived live
   * in (named at the switchover, fingerprintsPathOf), for an agent restarted before the end.
   */
  fingerprintsFd?: number;
}

export async function withTimeout<T>(promise: Promise<T>, timeoutMs: number, message: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new GangwayError(ErrorCode.TIMEOUT, `${message} within ${timeoutMs} ms`)), timeoutMs);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}
