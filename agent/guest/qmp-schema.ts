// The parts of QEMU's QMP schema that gangway drives, as QEMU 7.2 has them. Taken from
// `query-qmp-schema` of qemu-system-x86_64 7.2.22 (Debian 12), which is what the binary
// really accepts and returns, cross-read with qapi/run-state.json and qapi/migration.json.
// A field is optional here only where QEMU marks it optional; fields newer QEMUs added are
// left out rather than guessed, so that code written against these types runs on 7.2.
//
// Replies are not checked at run time against these types: QEMU is a local process the
// agent started, and a newer QEMU may add enum values (a run state, a migration status)
// that a strict check would turn into a failed migration. Code that switches on an enum
// keeps a default branch for that reason.

/** qapi/run-state.json RunState. */
export type RunState =
  | 'debug'
  | 'inmigrate'
  | 'internal-error'
  | 'io-error'
  | 'paused'
  | 'postmigrate'
  | 'prelaunch'
  | 'finish-migrate'
  | 'restore-vm'
  | 'running'
  | 'save-vm'
  | 'shutdown'
  | 'suspended'
  | 'watchdog'
  | 'guest-panicked'
  | 'colo';

/** The answer to `query-status` (StatusInfo). */
export interface StatusInfo {
  /** Whether the vCPUs run: true exactly when status is 'running'. */
  running: boolean;
  singlestep: boolean;
  status: RunState;
}

/** qapi/run-state.json ShutdownCause: why SHUTDOWN or RESET was sent. */
export type ShutdownCause =
  | 'none'
  | 'host-error'
  | 'host-qmp-quit'
  | 'host-qmp-system-reset'
  | 'host-signal'
  | 'host-ui'
  | 'guest-shutdown'
  | 'guest-reset'
  | 'guest-panic'
  | 'subsystem-reset'
  | 'snapshot-load';

/** qapi/migration.json MigrationStatus. */
export type MigrationStatus =
  | 'none'
  | 'setup'
  | 'cancelling'
  | 'cancelled'
  | 'active'
  | 'postcopy-active'
  | 'postcopy-paused'
  | 'postcopy-recover'
  | 'completed'
  | 'failed'
  | 'colo'
  | 'pre-switchover'
  | 'device'
  | 'wait-unplug';

/** qapi/migration.json MigrationCapability (7.2's list; later QEMUs renamed or dropped some). */
export type MigrationCapability =
  | 'xbzrle'
  | 'rdma-pin-all'
  | 'auto-converge'
  | 'zero-blocks'
  | 'compress'
  | 'events'
  | 'postcopy-ram'
  | 'x-colo'
  | 'release-ram'
  | 'block'
  | 'return-path'
  | 'pause-before-switchover'
  | 'multifd'
  | 'dirty-bitmaps'
  | 'postcopy-blocktime'
  | 'late-block-activate'
  | 'x-ignore-shared'
  | 'validate-uuid'
  | 'background-snapshot'
  | 'zero-copy-send'
  | 'postcopy-preempt';

export interface MigrationCapabilityStatus {
  capability: MigrationCapability;
  state: boolean;
}

/**
 * The parameters of `migrate-set-parameters` (MigrateSetParameters) that gangway may set.
 * All optional: QEMU changes only those given. Sizes are bytes, rates bytes per second,
 * times milliseconds, as QEMU takes them; the names stay QEMU's so that a value reads the
 * same here as in QEMU's documentation.
 */
export interface MigrateSetParameters {
  /** Bytes per second the migration stream may use (pre-copy). */
  'max-bandwidth'?: number;
  /** Milliseconds of downtime QEMU aims at when it decides to stop and copy. */
  'downtime-limit'?: number;
  /** Bytes per second during post-copy (0: unlimited). */
  'max-postcopy-bandwidth'?: number;
  'multifd-channels'?: number;
  'multifd-compression'?: 'none' | 'zlib' | 'zstd';
  'xbzrle-cache-size'?: number;
  'cpu-throttle-initial'?: number;
  'cpu-throttle-increment'?: number;
  'cpu-throttle-tailslow'?: boolean;
  'max-cpu-throttle'?: number;
  'throttle-trigger-threshold'?: number;
  /** null resets to the default (no TLS), as QEMU's StrOrNull allows. */
  'tls-creds'?: string | null;
  'tls-hostname'?: string | null;
  'tls-authz'?: string | null;
  'announce-initial'?: number;
  'announce-max'?: number;
  'announce-rounds'?: number;
  'announce-step'?: number;
}

/**
 * The arguments of `migrate` besides the URI. blk and inc (block migration) and detach
 * (ignored by QMP) are left out: gangway moves no disks through QEMU's migration stream.
 */
export interface MigrateOptions {
  /** Resume a paused post-copy migration (after postcopy-paused). */
  resume?: boolean;
}

/** qapi/migration.json MigrationStats: RAM (and disk) counters of `query-migrate`. All present when the object is. */
export interface MigrationStats {
  transferred: number;
  remaining: number;
  total: number;
  duplicate: number;
  skipped: number;
  normal: number;
  'normal-bytes': number;
  'dirty-pages-rate': number;
  /** Megabits per second of the last iteration. */
  mbps: number;
  'dirty-sync-count': number;
  'postcopy-requests': number;
  'page-size': number;
  'multifd-bytes': number;
  'pages-per-second': number;
  'precopy-bytes': number;
  'downtime-bytes': number;
  'postcopy-bytes': number;
  'dirty-sync-missed-zero-copy': number;
}

export interface XbzrleCacheStats {
  'cache-size': number;
  bytes: number;
  pages: number;
  'cache-miss': number;
  'cache-miss-rate': number;
  'encoding-rate': number;
  overflow: number;
}

/**
 * The answer to `query-migrate` (MigrationInfo). Every field is optional in the schema:
 * before any migration QEMU answers `{}`; which fields appear depends on the status.
 * Times are milliseconds.
 */
export interface MigrationInfo {
  status?: MigrationStatus;
  ram?: MigrationStats;
  disk?: MigrationStats;
  vfio?: { transferred: number };
  'xbzrle-cache'?: XbzrleCacheStats;
  'total-time'?: number;
  'expected-downtime'?: number;
  downtime?: number;
  'setup-time'?: number;
  'cpu-throttle-percentage'?: number;
  /** Why the migration failed (status 'failed'). */
  'error-desc'?: string;
  /** Why a migration cannot start now (for example a device that blocks it). */
  'blocked-reasons'?: string[];
  'postcopy-blocktime'?: number;
  'postcopy-vcpu-blocktime'?: number[];
}

/** The `data` of the events gangway waits for, by name. STOP, RESUME and POWERDOWN carry none. */
export interface QmpEventData {
  STOP: Record<string, never>;
  RESUME: Record<string, never>;
  POWERDOWN: Record<string, never>;
  SHUTDOWN: { guest: boolean; reason: ShutdownCause };
  RESET: { guest: boolean; reason: ShutdownCause };
  /** Sent on each status change, only while the 'events' capability is on. */
  MIGRATION: { status: MigrationStatus };
  /** Sent at the start of each pre-copy pass, only while the 'events' capability is on. */
  MIGRATION_PASS: { pass: number };
}

export type QmpEventName = keyof QmpEventData;
