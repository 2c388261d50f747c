// What a source migration is given and what it reports: its options, its summary, its
// progress, and the context its parts (pre-copy, switchover, post-copy) share.
import type { ChannelSettings } from './source-channels.js';
import type { ForecastRecord } from '../planner/forecast-check.js';
import type { Logger } from 'pino';
import type { SourceDedupGroup } from '../dedup/source-group.js';
import type { GuestRegion, SourceGuest } from '../guest/adapter.js';
import type { TrackerPreference } from '../guest/process-guest.js';
import type { GuestRegistry } from '../guest/registry.js';
import type { AgentMetrics } from '../metrics.js';
import type { FrameHandler, PeerSession } from '../peer/session.js';
import type { DirtyTracker, TrackerKind } from '../tracker/dirty-tracker.js';
import type { CodecChooser, CodecMode } from './codec-chooser.js';
import type { Clock, Pacer, SwitchoverGate } from './flow.js';
import type { Lane } from './lanes.js';
import type { MidFlightControls, OperatorChange } from './mid-flight.js';
import type { RoundCounters } from './page-sender.js';
import type { HybridPolicy } from './postcopy.js';
import type { RegionReader } from './region-reader.js';
import type { SourceLink } from './source-link.js';
import type { SourcePhase, SourceStateMachine } from './source-state.js';

export interface SourceOptions {
  migrationId: string;
  peerAddress: string;
  /** Channels for the pre-copy rounds where the destination takes them (source-channels.ts); none without. */
  channels?: ChannelSettings;
  downtimeBudgetMs: number;
  maxRounds: number;
  maxWireBytes: number;
  /** At a limit: fail (the default), or stop the guest anyway and finish with a longer downtime. */
  force: boolean;
  codec: CodecMode;
  /**
   * A chooser shared with the other members of a gang: they share one link, and a member's
   * own deliveries say little of its codec (the others' batches set its share), so the gang
   * measures and decides as one. Without it the migration has its own.
   */
  chooser?: CodecChooser;
  bandwidthBytesPerSec?: number;
  /** A pacer shared with other migrations (a gang's --bandwidth caps the group); else one of bandwidthBytesPerSec. */
  pacer?: Pacer;
  tracker: TrackerPreference;
  batchBytes: number;
  /** Measured XXH3-128 speed of this host, to predict the switchover's digest time. */
  digestBytesPerSec: number;
  commitTimeoutMs: number;
  clock?: Clock;
  metrics?: AgentMetrics;
  /** Member of a dedup group: the guest's region i is `slots[i]` of `group`. */
  dedup?: { group: SourceDedupGroup; slots: number[] };
  /** Member of a gang: switchovers take turns (see SwitchoverGate). */
  gate?: SwitchoverGate;
  /**
   * precopy (the default): rounds, then stop-and-copy. postcopy: stop at once, the guest
   * runs at the destination and its pages follow (faulted ones first). hybrid: pre-copy
   * rounds, then post-copy when the pre-copy does not converge or after `hybrid`'s rounds.
   */
  technique?: 'precopy' | 'postcopy' | 'hybrid';
  hybrid?: HybridPolicy;
  /**
   * Post-copy: a new session to the destination when the old one broke (the guest runs
   * there and waits for pages only this host has). Tried with backoff for reconnectWindowMs.
   */
  reconnect?: () => Promise<PeerSession>;
  reconnectWindowMs?: number;
  /** Where the guest's record lives: post-copy marks it as running at the destination. */
  registry?: GuestRegistry;
  /** The plan's priority: the destination reserves its inbound side for this migration at it. */
  reservePriority?: 'high' | 'medium' | 'low';
  /** Fault injection for tests: the tracker the migration uses for region `index`, around the guest's own (see faults.ts). */
  wrapTracker?: (tracker: DirtyTracker, index: number) => DirtyTracker;
  /** How the guest's regions are read (the addon's mapping of their files; a buffer in unit tests). */
  openRegion?: (region: GuestRegion) => RegionReader;
  /**
   * Serving the rest of a post-copy after a restart: the secret the destination's accept
   * gave this migration (from the guest's record); a reattach must present it.
   */
  secret?: Uint8Array;
}

export interface RoundRecord extends RoundCounters {
  round: number;
  final: boolean;
  durationMs: number;
  /** Guest bytes the round covered, every region together (pages of different sizes weigh what they hold). */
  guestBytes: number;
  /** Of its zero pages, memory never written (file holes): known zero without being read (round 0 of a pre-copy). */
  holePages?: number;
  /** Pages collected dirty after this round (the next round's size). */
  dirtyPagesAfter: number;
  decision?: string;
}

export interface MigrationSummary {
  migrationId: string;
  guest: string;
  technique: 'precopy' | 'postcopy' | 'hybrid';
  /** --technique auto: what the plan chose for this guest, and why (follow-plan.ts). */
  plan?: { technique: 'precopy' | 'postcopy' | 'hybrid'; strategy: 'parallel' | 'serial' | null; order: number; reasons: string[] };
  /** What the planner forecast for this guest's migration, when it made a forecast (planner/forecast-check.ts). */
  forecast?: ForecastRecord;
  /** Post-copy (postcopy, or a hybrid that went post-copy): how the missing pages came. */
  postcopy?: {
    /** Why a hybrid went post-copy. */
    reason?: string;
    /** The operator started it (gangway postcopy), not the hybrid's policy. */
    byOperator?: true;
    missingPages: number;
    /** Destination resume to the destination holding every page. */
    durationMs: number;
    /** Pages sent because the guest faulted on them (and the pre-paging window after them). */
    faultPages: number;
    /** Pages sent by the background push. */
    pushedPages: number;
    /** As the destination saw it: faults, and fault-to-page latency. */
    faults: number;
    faultLatency: { p50Ms: number; p99Ms: number; maxMs: number };
    /** Times the link broke and the migration carried on over a new session, and the pages sent again for it. */
    reattaches: number;
    resentPages: number;
  };
  from: string;
  to: string;
  tracker: TrackerKind;
  trackerFallbackReason?: string;
  verified: boolean;
  digests: string[];
  forced: boolean;
  downtimeMs: number;
  /** The budget this migration ended with (--downtime-ms, or gangway migrate-set's), and whether the downtime stayed within it. */
  downtimeBudgetMs: number;
  downtimeBudgetMet: boolean;
  /** Downtime's parts; deviceStateMs is within finalRoundMs (taking the guest's device state and sending it). */
  downtime: {
    pauseMs: number;
    finalRoundMs: number;
    deviceStateMs: number;
    verifyMs: number;
    commitMs: number;
    resumeToSendMs: number;
    rttMs: number;
    /** Stop-and-copy: the trackers' last scan, from the pause (inside finalRoundMs). */
    finalScanMs?: number;
    /** Stop-and-copy: the pause to the source's digest of the paused memory (it overlaps the final round). */
    sourceDigestMs?: number;
  };
  /** The guest's device state that travelled (0 for a guest without). */
  deviceStateBytes: number;
  totalMs: number;
  rounds: RoundRecord[];
  /** The guest's memory (its disks are in `disks`). */
  memoryBytes: number;
  /**
   * The disks that moved with it: size, the data they held at the first round (holes are
   * never sent), blocks sent over all rounds (data and zero, as refs or not) and their wire bytes.
   */
  disks?: { name: string; sizeBytes: number; dataBytes: number; blocksSent: number; dataBlocksSent: number; wireBytes: number; rounds: number }[];
  /** The guest wrote its disks faster than the link carried them: the limit its disk writes were held to (bytes/s). */
  diskWriteLimitBytesPerSec?: number;
  wireBytes: number;
  zeroPages: number;
  dataPages: number;
  /** Dedup: pages sent as refs, pages not sent at all, hits by kind, page bytes that did not travel. */
  dedup: {
    enabled: boolean;
    group?: string;
    refPages: number;
    unchangedPages: number;
    hits: { intra: number; crossRound: number; crossGuest: number; resident: number };
    savedBytes: number;
    /** Pages the destination asked for again (resident content that had changed). */
    wantedPages: number;
  };
  rawDataBytes: number;
  /** Pages sent again at the switchover because the destination's differed (missed by the dirty tracker). */
  /** The pre-copy rounds' pages that went on channels (source-channels.ts), when any did. */
  channels?: { count: number; tls: boolean; pages: number; wireBytes: number };
  repairedPages: number;
  compressionRatio: number;
  linkRateBytesPerSec: number;
  /** What the codec chooser measured of each codec: bytes of data pages delivered per second. */
  codecRates: { lz4?: number; raw?: number };
  /** The rate the sender's pacer held it to at the end (--bandwidth, or gangway migrate-set's); absent: not paced. */
  bandwidthBytesPerSec?: number;
  /** What the operator changed while it ran (gangway migrate-set, gangway postcopy), in order. */
  operatorChanges?: OperatorChange[];
}

export interface MigrationProgress {
  migrationId: string;
  guest: string;
  phase: SourcePhase;
  round: number;
  roundPages: number;
  roundPagesSent: number;
  percent: number;
  rateBytesPerSec: number;
  etaMs: number | undefined;
  wireBytes: number;
  /**
   * The moving disks apart: of the round's pages their blocks, and how many went so far; the
   * rate their blocks go at in this round (guest bytes); the time the round's remaining
   * blocks take at that rate, which never goes up from one report to the next (a round that
   * finds more blocks holds it rather than raising it); and blocks sent in all rounds.
   */
  disk?: { roundBlocks: number; roundBlocksSent: number; rateBytesPerSec: number; etaMs: number | undefined; blocksSent: number };
  /** Bytes on the wire per second in this round (compressed, deduplicated): `rateBytesPerSec` is guest memory. */
  wireRateBytesPerSec?: number;
  /**
   * The whole migration as the convergence policy saw it after the last round (absent before
   * round 0 ends): how fast the guest dirties memory, the downtime a stop would take now,
   * whether the rounds shrink at all, and the time until the guest runs at the destination,
   * which never goes up from one report to the next and is undefined while not converging.
   */
  convergence?: { dirtyRateBytesPerSec: number; predictedDowntimeMs: number; converging: boolean; totalEtaMs: number | undefined };
}

/** What the parts of one source migration share. */
export interface SourceRun {
  readonly options: SourceOptions;
  readonly guest: SourceGuest;
  readonly link: SourceLink;
  readonly lanes: Lane[];
  readonly clock: Clock;
  readonly log: Logger;
  readonly state: SourceStateMachine;
  /** The migration: the session's handler of its frames, and who a gang's gate knows. */
  readonly owner: FrameHandler;
  readonly emitProgress: (progress: MigrationProgress) => void;
  /** What the operator asked for while it runs (mid-flight.ts). */
  readonly controls: MidFlightControls;
  /**
   * Resolves once the destination says its standby guest is up ('standby-ready'); no
   * switchover pauses the guest before. Undefined: a destination that does not say so.
   */
  standbyReady(): Promise<unknown> | undefined;
  /** The destination's secret for this migration (a reattach presents it). */
  secretBytes(): Uint8Array | undefined;
  /** The same in hex, for the guest's record. */
  secretHex(): string | undefined;
}
