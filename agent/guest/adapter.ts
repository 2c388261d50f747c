// What the migration engine needs of a guest, on each side, whatever kind of guest it is.
// The engine moves regions and device state; a guest kind says how its memory is laid out,
// how it is paused and resumed, and, at a destination, how a guest of its kind is started
// from the regions that arrived. Adding a kind means adding a launcher (and a source-side
// guest) under agent/guest/ and listing it in `launchers`, not editing the engine.
import type { GuestConfigValue, GuestSpec } from '../../protocol/frames.js';
import type { GuestKind } from '../../protocol/codes.js';
import type { DirtyTracker } from '../tracker/dirty-tracker.js';
import type { GuestFiles, TrackerPreference } from './process-guest.js';
import type { GuestRecord } from './registry.js';
import type { DiskSelection } from './qemu-disks.js';

/** One region of a guest: a memory file the guest maps shared, or a disk (a raw file). */
export interface GuestRegion {
  /** Its name in the offer ('ram', 'ram1', ..., 'disk0', ...). */
  name: string;
  path: string;
  lengthBytes: number;
  /** The page (or disk block) size: the unit it is tracked, sent and deduplicated in. */
  pageSizeBytes: number;
  /**
   * A sparse file (a disk): its holes read as zeros and are never read or sent (the first
   * round covers the pages that hold data; the digest takes a hole for a zero page).
   */
  sparse?: boolean;
}

/** A guest at the source, as the migration engine drives it. */
export interface SourceGuest {
  readonly name: string;
  readonly kind: GuestKind;
  readonly regions: readonly GuestRegion[];
  /** What the destination needs to start a guest like it (the offer's guest.config; empty for a process guest). */
  readonly config: Record<string, GuestConfigValue>;
  readonly isPaused: boolean;
  /**
   * A dirty tracker for each region, in the order of `regions` (uffd-wp where it can, else
   * hash-scan for all of them: a migration tracks its guest one way).
   */
  openTrackers(preference: TrackerPreference): Promise<{ trackers: DirtyTracker[]; fallbackReason?: string }>;
  /** Stops the guest; resolves once it no longer runs. */
  pause(): Promise<void>;
  /**
   * Lets a paused guest run on here (the migration did not come through). Never rejects: a
   * guest that cannot be resumed says so in the agent's log, and `gangway status` shows it
   * paused.
   */
  resume(): Promise<void>;
  /**
   * The guest's state outside its memory (a VM's devices), taken while it is paused; it
   * travels after the final round and is loaded at the destination before the guest runs.
   * Empty for a guest that keeps its whole state in memory.
   */
  saveDeviceState(): Promise<Uint8Array>;
  /**
   * Its device state is saved only once the final round has read every region (a VM whose
   * moving disks the final round reads through QEMU, whose save ends by taking the disk
   * images from it); otherwise the save goes on while the final round goes out.
   */
  readonly saveAfterFinalRound?: boolean;
  /** Readies saveDeviceState while the guest still runs, so that less of it falls inside the downtime (a VM: its migration capabilities). */
  prepareDeviceStateSave?(): Promise<void>;
  /** Pages a post-copy destination needs before the guest can run there: runs for each region, in the order of `regions`. */
  eagerRuns(): Uint32Array[];
  /** Ends this copy for good: the guest runs elsewhere now. */
  discard(): Promise<void>;
  /** Why the guest no longer runs here (its process exited, with what it said last), or undefined while it is there. */
  gone?(): string | undefined;
  /**
   * Holds the guest's writes to the disks this migration moves to `bytesPerSec` in all (a
   * guest with disks). The limit goes when the migration ends, whichever way.
   */
  limitDiskWrites?(bytesPerSec: number): Promise<void>;
}

/** A guest this agent runs (in its registry), whatever its kind: what the daemon does with it besides migrating it. */
export interface HostedGuest extends SourceGuest {
  readonly pid: number;
  readonly memoryBytes: number;
  readonly files: GuestFiles;
  /** Is its process there (not gone, not a zombie)? */
  alive(): boolean;
  /** Ends the guest at the operator's request; its files are left to the caller. */
  stop(): Promise<void>;
  /**
   * What `gangway status` shows of a live guest, from one look at it: whether it is stopped
   * (whoever stopped it: the agent, an operator, QEMU's own pause) and its own counters.
   */
  observe(): Promise<{ paused: boolean; details?: GuestDetails }>;
  /**
   * The guest as a migration sees it when that is more than its memory (a VM's disks: those
   * `disks` selects are regions too). Absent: the guest itself.
   */
  forMigration?(options: { disks: DiskSelection }): SourceGuest;
  /**
   * Removes what a migration of this guest made in it and an agent that died left behind (a
   * VM's dirty bitmaps, NBD exports and server), so that the next migration starts clean.
   * Resolves with what it removed.
   */
  removeMigrationLeftovers?(): Promise<string[]>;
  /**
   * After a post-copy of its disks: the guest's drives go from this agent's NBD exports to
   * the disks' files (already complete and named). Resolves with the disks it switched.
   */
  useLocalDisks?(): Promise<number>;
}

/** A guest's own counters as `gangway status` shows them: a process guest's header, a VM's QEMU state and test kernel. */
export interface GuestDetails {
  // gangway-guest (its header, guest-header.ts)
  passes?: number;
  totalWrites?: number;
  stalePages?: number;
  metaErrors?: number;
  resumes?: number;
  resumeCheckDone?: boolean;
  resumeStalePages?: number;
  passesAtResume?: number;
  dirtyRateBytesPerSec?: number;
  /** The memory the guest's writes land in (its hot set), as the guest itself says. */
  hotSetBytes?: number;
  profile?: string;
  deviceLoads?: number;
  deviceSaves?: number;
  deviceErrors?: number;
  // a VM
  accel?: string;
  cpus?: number;
  kernel?: string;
  /** QEMU's run state (query-status), 'unknown' when QMP does not answer. */
  vmStatus?: string;
  qmpError?: string;
  /** gangway-testvm's status block, when the VM runs it. */
  testvm?: {
    state: string;
    passes: number;
    pagesWritten: number;
    stalePages: number;
    resumes: number;
    checkDone: number;
    checkStalePages: number;
    /** When the VM has a disk the kernel works on. */
    disk?: { state: string; writes: number; staleBlocks: number; checkStaleBlocks: number };
  };
}

/** A guest of this kind, started at a destination ahead of the switchover and blocked until `go()`. */
export interface StandbyGuest {
  pid: number;
  /** Resolves with the time (performance.now()) the guest runs. */
  running: Promise<number>;
  /**
   * Resolves once the guest can take its device state and run (a QEMU: its QMP answers and
   * its incoming migration listens); rejects if it cannot. Undefined: ready once started.
   */
  ready?: Promise<void>;
  /** Lets the guest take its memory and run. */
  go(): void;
  /**
   * The guest ends without touching its memory: the migration did not come through. Resolves
   * (never rejects) once its process is gone, and with it whatever it could still have made
   * (a QEMU's sockets and console); a second call gets the same promise.
   */
  cancel(): Promise<void>;
  /** Resolves when the guest's process exits. */
  exited: Promise<number | null>;
  /**
   * Before go(): switches the drives that read this agent's disk exports to the disks' files
   * (complete here); resolves with how many were switched. A kind without such drives has none.
   */
  useLocalDisks?(): Promise<number>;
}

/** The kind-specific part of a guest record (GuestRecord less what every kind has). */
export type KindRecord = (GuestRecord extends infer R ? (R extends GuestRecord ? Pick<R, 'kind' | 'spec'> : never) : never) & Partial<Pick<GuestRecord, 'tap' | 'tapCreated'>>;

/** How a destination starts a guest of one kind from the regions it received. */
export interface GuestLauncher {
  /** The kind's name in records and messages ('process'). */
  readonly kind: GuestRecord['kind'];
  /**
   * Why this agent cannot take the offered guest (a reason for the reject, safe to send to
   * the peer), or undefined. Everything the kind reads of the offer (regions, config) is
   * checked here, before anything is allocated or started.
   */
  checkOffer(guest: GuestSpec): string | undefined;
  /**
   * Starts the guest in standby on `files` (its memory not yet complete). `regionFds`: this
   * agent's descriptors of the regions' memory files (unnamed until the commit), for a kind
   * that maps its memory before the commit. Post-copy: the guest's end of the socket its
   * userfaultfd comes back over. `diskExportSocket`: the guest reaches the disks that arrive
   * through this agent's NBD exports on that socket (named by their regions), not their files
   * (post-copy of disks; the agent switches it to the files once they are complete).
   */
  standby(files: GuestFiles, options: { guest: GuestSpec; regionFds: readonly number[]; postcopySocketFd?: number; diskExportSocket?: string }): StandbyGuest;
  /**
   * Hands the device state that arrived to the standby guest, before go(). A kind without
   * it takes no device state: a migration that brings some is refused.
   */
  loadDeviceState?(guest: StandbyGuest, files: GuestFiles, state: Uint8Array): Promise<void>;
  /**
   * The device state is loaded before the switchover's check answers (after every page, as
   * QEMU's own migration loads RAM, then devices), so that a state the guest refuses
   * refuses the migration while the source still owns the guest; otherwise at the commit.
   * Loading it writes none of the memory this agent wrote (QEMU: test/integration/
   * qemu-standby-ram.test.ts), so the check's fingerprints of the pages as written stand.
   */
  readonly loadsDeviceStateBeforeCheck?: boolean;
  /**
   * A standby of this kind hands over its userfaultfds (post-copy) as it starts, not when it
   * is told to go: the destination receives them then, outside the downtime.
   */
  readonly handsOverMemoryAtStart?: boolean;
  /** The kind's part of the record of a guest that arrived here, once its memory is complete enough to read. */
  recordPart(files: GuestFiles, guest: GuestSpec): KindRecord;
  /**
   * The guest's disks at this agent (a kind with disks), in its order. One that arrives as
   * offer region `region` becomes a sparse file, at `path` once the migration commits
   * (before, an unnamed file in its directory), written as blocks arrive; one without a
   * region is there already (shared storage). Regions that are no disk's are memory, in
   * memoryDir. Called after checkOffer.
   */
  disks?(guest: GuestSpec): { path: string; region?: number }[];
  /** Where this agent serves the disks of a guest in post-copy (beside its other sockets). */
  diskExportSocket?(files: GuestFiles): string;
}

/** The launchers this agent has, by the offer's guest kind. */
export type LauncherTable = Partial<Record<GuestKind, GuestLauncher>>;
