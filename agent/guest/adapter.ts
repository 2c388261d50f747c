// What the migration engine needs of a guest, on each side, whatever kind of guest it is.
// The engine moves regions and device state; a guest kind says how its memory is laid out,
// how it is paused and resumed, and, at a destination, how a guest of its kind is started
// from the regions that arrived. Adding a kind means adding a launcher (and a source-side
// guest) under agent/guest/ and listing it in `launchers`, not editing the engine.
import type { RegionSpec } from '../../protocol/frames.js';
import type { GuestKind } from '../../protocol/codes.js';
import type { DirtyTracker } from '../tracker/dirty-tracker.js';
import type { GuestFiles, TrackerPreference } from './process-guest.js';
import type { GuestRecord } from './registry.js';

/** One memory region of a guest: a file the guest maps shared. */
export interface GuestRegion {
  /** Its name in the offer ('ram', 'ram1', ...). */
  name: string;
  path: string;
  lengthBytes: number;
  pageSizeBytes: number;
}

/** A guest at the source, as the migration engine drives it. */
export interface SourceGuest {
  readonly name: string;
  readonly kind: GuestKind;
  readonly regions: readonly GuestRegion[];
  readonly isPaused: boolean;
  /**
   * A dirty tracker for each region, in the order of `regions` (uffd-wp where it can, else
   * hash-scan for all of them: a migration tracks its guest one way).
   */
  openTrackers(preference: TrackerPreference): Promise<{ trackers: DirtyTracker[]; fallbackReason?: string }>;
  /** Stops the guest; resolves once it no longer runs. */
  pause(): Promise<void>;
  /** Lets a paused guest run on here (the migration did not come through). */
  resume(): void;
  /**
   * The guest's state outside its memory (a VM's devices), taken while it is paused; it
   * travels after the final round and is loaded at the destination before the guest runs.
   * Empty for a guest that keeps its whole state in memory.
   */
  saveDeviceState(): Promise<Uint8Array>;
  /** Pages a post-copy destination needs before the guest can run there: runs for each region, in the order of `regions`. */
  eagerRuns(): Uint32Array[];
  /** Ends this copy for good: the guest runs elsewhere now. */
  discard(): Promise<void>;
}

/** A guest of this kind, started at a destination ahead of the switchover and blocked until `go()`. */
export interface StandbyGuest {
  pid: number;
  /** Resolves with the time (performance.now()) the guest runs. */
  running: Promise<number>;
  /** Lets the guest take its memory and run. */
  go(): void;
  /** The guest ends without touching its memory: the migration did not come through. */
  cancel(): void;
  /** Resolves when the guest's process exits. */
  exited: Promise<number | null>;
}

/** The kind-specific part of a guest record (GuestRecord less what every kind has). */
export type KindRecord = Pick<GuestRecord, 'kind' | 'spec'>;

/** How a destination starts a guest of one kind from the regions it received. */
export interface GuestLauncher {
  /** The kind's name in records and messages ('process'). */
  readonly kind: GuestRecord['kind'];
  /** Why this agent cannot take guests with these regions (a reason for the reject), or undefined. */
  checkRegions(regions: readonly RegionSpec[]): string | undefined;
  /**
   * Starts the guest in standby on `files` (its memory not yet complete). Post-copy: the
   * guest's end of the socket its userfaultfd comes back over.
   */
  standby(files: GuestFiles, options: { postcopySocketFd?: number }): StandbyGuest;
  /**
   * Hands the device state that arrived to the standby guest, before go(). A kind without
   * it takes no device state: a migration that brings some is refused.
   */
  loadDeviceState?(guest: StandbyGuest, files: GuestFiles, state: Uint8Array): Promise<void>;
  /** The kind's part of the record of a guest that arrived here, once its memory is complete enough to read. */
  recordPart(files: GuestFiles): KindRecord;
}

/** The launchers this agent has, by the offer's guest kind. */
export type LauncherTable = Partial<Record<GuestKind, GuestLauncher>>;
