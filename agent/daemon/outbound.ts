// Migrations leaving here: the migrate command (a plan followed for --technique auto, the
// bandwidth hold around it, gang or serial with their dedup groups, one SourceMigration per
// guest), plans and cancels, and the guests left at their switchover by a lost confirmation
// or a restart, whose destination is asked what became of them (switchover-in-doubt.ts).
import type { ChannelSettings } from '../migration/source-channels.js';
import { randomUUID } from 'node:crypto';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import type { AgentConfig } from '../daemon.js';
import { SourceDedupGroup } from '../dedup/source-group.js';
import { GUEST_PAGE_SIZE } from '../guest/guest-header.js';
import type { HostedGuest, SourceGuest } from '../guest/adapter.js';
import type { DiskSelection } from '../guest/qemu-disks.js';
import type { TrackerPreference } from '../guest/process-guest.js';
import type { GuestRegistry } from '../guest/registry.js';
import type { Logger } from '../log.js';
import type { AgentMetrics } from '../metrics.js';
import { CodecChooser, type CodecMode } from '../migration/codec-chooser.js';
import type { faultsFromEnv } from '../migration/faults.js';
import { Pacer, SwitchoverGate } from '../migration/flow.js';
import { outcomeOf, summarizeGroup, type GroupOutcome, type GroupSummary } from '../migration/group-summary.js';
import type { LiveSettings, SettingsChange } from '../migration/mid-flight.js';
import { SourceMigration, type MigrationProgress, type MigrationSummary } from '../migration/source.js';
import type { PeerSession } from '../peer/session.js';
import { defaultAutoTechnique, followPlan, type FollowedPlan } from '../planner/follow-plan.js';
import type { MigrationPlan } from '../planner/plan-for.js';
import type { OptionSummary } from '../planner/choose.js';
import { forecastedPlan, movingDisks } from './forecast-inputs.js';
import { forecastRecords, type ForecastRecord } from '../planner/forecast-check.js';
import type { HistoryEntry } from './outcome.js';
import type { Priority } from '../planner/planner.js';
import type { TrafficService } from '../traffic/service.js';
import type { MigrationRecords } from './records.js';
import type { SessionPool } from './session-pool.js';
import { MigrationSlots, type SlotSource } from './migration-slots.js';
import { InDoubtSwitchovers } from './switchover-in-doubt.js';

export interface MigrateRequest {
  guests: string[];
  to: string;
  strategy: 'gang' | 'serial';
  dedup: boolean;
  downtimeMs: number;
  force: boolean;
  maxRounds: number;
  maxBytesFactor: number;
  codec: CodecMode;
  bandwidthBytesPerSec?: number;
  tracker?: TrackerPreference;
  /** precopy when absent; auto: follow the plan (technique, strategy, order, rate) where there is traffic data. */
  technique?: 'precopy' | 'postcopy' | 'hybrid' | 'auto';
  /** The migration's priority for the plan and the bandwidth reservation; default traffic.priority. */
  priority?: Priority;
  /** hybrid: go post-copy after this many pre-copy rounds at the latest (default maxRounds). */
  postcopyAfterRounds?: number;
  /** A VM's disks: all move (the default), none (shared storage), or those named. */
  disks?: DiskSelection;
}

/** What the decision of --technique auto depends on in a request. */
export type DecideRequest = Pick<MigrateRequest, 'guests' | 'to' | 'strategy' | 'priority' | 'bandwidthBytesPerSec' | 'disks'> &
  Partial<Pick<MigrateRequest, 'downtimeMs' | 'maxRounds' | 'maxBytesFactor' | 'force' | 'postcopyAfterRounds' | 'dedup'>>;

/**
 * The technique of a request that does not follow a plan. auto without traffic data: hybrid
 * where the destination can post-copy (pre-copy first, post-copy only if that does not
 * converge), else pre-copy; with traffic data, auto follows the plan (OutboundMigrations.migrate).
 */
export function resolveTechnique(requested: MigrateRequest['technique'], peerFeatures: readonly string[]): 'precopy' | 'postcopy' | 'hybrid' {
  if (requested === undefined || requested === 'precopy') return 'precopy';
  if (requested === 'auto') return defaultAutoTechnique(peerFeatures);
  return requested;
}

/** What gangway migrate-set changed: the settings before and after; a gang's members that share the pacer's new rate. */
export interface SettingsAnswer {
  migrationId: string;
  guest: string;
  phase: string;
  /** The round under way (or just done) when the change was made; null before the first. */
  round: number | null;
  previous: LiveSettings;
  current: LiveSettings;
  pacerSharedWith: string[];
  /** What became of the uplink's shaper reservation for the migration's port; null: none holds one. */
  shaper: string | null;
}

/** What gangway postcopy asked for: post-copy at the next round boundary (asked before: nothing new). */
export interface PostcopyAnswer {
  migrationId: string;
  guest: string;
  phase: string;
  /** The round under way (or just done): post-copy starts when it ends (or the next one does); null before the first. */
  round: number | null;
  alreadyRequested: boolean;
}

export interface OutboundContext {
  config: Pick<AgentConfig, 'tracker' | 'batchBytes' | 'postcopyReattachMs' | 'migration' | 'traffic'>;
  /** This agent's id: a destination whose hello names it is this agent under another address. */
  agentId: string;
  registry: GuestRegistry;
  log: Logger;
  metrics: AgentMetrics;
  records: MigrationRecords;
  sessions: Pick<SessionPool, 'session'>;
  /** Fault injection for end-to-end tests (GANGWAY_FAULT_*), read once. */
  faults: ReturnType<typeof faultsFromEnv>;
  /** HOST:PORT this agent listens on for peers, once it does. */
  listenAddress: () => string;
  /** XXH3-128 throughput on this host, measured at start, for the convergence policy. */
  digestBytesPerSec: () => number;
  /** Is the agent shutting down? Then no migration starts and no switchover is asked after. */
  shuttingDown: () => boolean;
  /** The traffic service, once the agent has started it. */
  traffic: () => Pick<TrafficService, 'hold' | 'plan' | 'status' | 'settings' | 'monitor' | 'changeRate'>;
  /** This host's ended migrations (STATE/history.json), oldest first: the forecast's calibration. */
  history: () => readonly HistoryEntry[];
  /** Channels a migration may open for its pre-copy rounds (migration.channels), undefined for none. */
  channels: () => ChannelSettings | undefined;
}

export class OutboundMigrations {
  private readonly outgoing = new Map<string, SourceMigration>();
  /** Migrations waiting for a slot (migration.maxParallelOutbound), by id: their guest and how to cancel them. */
  private readonly queued = new Map<string, { guest: string; cancel: AbortController }>();
  private readonly slots: MigrationSlots;
  private readonly inDoubt: InDoubtSwitchovers;

  constructor(private readonly context: OutboundContext) {
    this.slots = new MigrationSlots(context.config.migration.maxParallelOutbound);
    this.inDoubt = new InDoubtSwitchovers({ ...context, isMigrating: (name) => this.isMigrating(name), outgoing: this.outgoing });
  }

  /** Migrations leaving here now. */
  get count(): number {
    return this.outgoing.size;
  }

  /** Is guest `name` leaving this host, or queued to? */
  isMigrating(name: string): boolean {
    return [...this.outgoing.values()].some((m) => m.guest.name === name) || [...this.queued.values()].some((q) => q.guest === name);
  }

  /** The migration of guest `name` leaving this host now, with its id. */
  outgoingOf(name: string): [migrationId: string, migration: SourceMigration] | undefined {
    return [...this.outgoing.entries()].find(([, m]) => m.guest.name === name);
  }

  /**
   * Migrates one or more guests to one destination. gang: all at once over one session,
   * in one dedup group; serial: one after another, each in its own group (so the guests
   * moved before it are resident content at the destination). Resolves with every guest's
   * summary and the totals when at least one guest moved; throws the first error when none did.
   */
  async migrate(request: MigrateRequest, onProgress: (progress: MigrationProgress) => void, onForecast?: (forecast: OptionSummary) => void): Promise<GroupSummary> {
    // auto: the plan is made from the traffic as the monitor last smoothed it, so the hold
    // below can be installed meanwhile (its tc commands took as long as the plan's round trip).
    // The bandwidth hook: the shaper applies --bandwidth, or Algorithm 2 at the request's
    // priority (default traffic.priority), on the uplink while the migration runs (a no-op
    // without root, tc or an uplink).
    const [planning, holding] = await Promise.allSettled([
      request.technique === 'auto' ? this.planForAuto(request) : Promise.resolve(undefined),
      this.context.traffic().hold({
        peerPort: Number(request.to.slice(request.to.lastIndexOf(':') + 1)),
        bandwidthBytesPerSec: request.bandwidthBytesPerSec,
        priority: request.priority,
      }),
    ]);
    if (holding.status === 'rejected') throw holding.reason;
    const hold = holding.value;
    if (planning.status === 'rejected') {
      // No migration after all: the reservation goes at once.
      await hold.stop().catch(() => {});
      throw planning.reason;
    }
    const planned = planning.value;
    if (hold.applied) this.context.log.info({ to: request.to, reason: hold.reason }, 'migration bandwidth reserved on the uplink');
    try {
      const followed = planned ? this.follow(request, planned, { applied: hold.applied, reason: hold.reason }) : undefined;
      if (followed) this.context.log.info({ followed: followed.followed, strategy: followed.strategy, guests: followed.guests.map((g) => `${g.name}:${g.technique}`), reasons: followed.reasons }, 'technique auto');
      const forecasts = planned?.plan?.forecast ? forecastRecords(planned.plan.forecast) : undefined;
      // Before anything moves: the forecast of what is about to run, for the command's first line and ETA.
      if (planned?.plan?.forecast?.chosen && forecasts?.size) onForecast?.(planned.plan.forecast.chosen);
      return await this.migrateGuests(request, followed, onProgress, forecasts);
    } finally {
      await hold.stop().catch((err: Error) => this.context.log.warn({ err: err.message }, 'releasing the bandwidth reservation failed'));
    }
  }

  /**
   * What --technique auto would run for `request` (gangway plan, drain): the same decision
   * migrate makes, with the shaper's hold predicted from whether it is available (migrate
   * installs the hold and decides from whether it took). Migrates nothing.
   */
  async decide(request: DecideRequest): Promise<{ followed: FollowedPlan; plan: MigrationPlan | undefined }> {
    if (new Set(request.guests).size !== request.guests.length) throw new GangwayError(ErrorCode.BAD_REQUEST, `a guest is named twice in ${request.guests.join(' ')}`);
    for (const name of request.guests) this.context.registry.get(name);
    if (request.to === this.context.listenAddress()) throw new GangwayError(ErrorCode.BAD_REQUEST, `--to ${request.to} is this agent itself`);
    const planned = await this.planForAuto(request);
    const shaper = this.context.traffic().status().shaper;
    const predicted = shaper.available
      ? { applied: true, reason: 'the shaper is available and will hold the reservation on the uplink' }
      : { applied: false, reason: shaper.reason ?? 'the shaper is not available' };
    return { followed: this.follow(request, planned, predicted), plan: planned.plan };
  }

  /** The one decision (follow-plan.ts) for `request`, given the plan or why there is none. */
  private follow(request: DecideRequest, planned: { plan: MigrationPlan | undefined; noTrafficReason?: string; peerFeatures: string[] }, shaper: { applied: boolean; reason: string }): FollowedPlan {
    return followPlan({
      guests: request.guests,
      priority: request.priority ?? this.context.traffic().status().priorityDefault,
      requestedStrategy: request.strategy,
      plan: planned.plan,
      ...(planned.noTrafficReason ? { noTrafficReason: planned.noTrafficReason } : {}),
      peerFeatures: planned.peerFeatures,
      shaper,
      linkBytesPerSec: this.context.traffic().settings?.linkBytesPerSec,
      manualBandwidthBytesPerSec: request.bandwidthBytesPerSec,
      movingDisks: movingDisks(this.context.registry, request.guests, request.disks),
    });
  }

  /** The plan behind --technique auto, or why there is none (no traffic data: no uplink or capacity). */
  private async planForAuto(request: DecideRequest): Promise<{ plan: MigrationPlan | undefined; noTrafficReason?: string; peerFeatures: string[] }> {
    const session = await this.context.sessions.session(request.to);
    this.refuseSelf(session, request.to);
    const peerFeatures = [...(session.peer?.features ?? [])];
    const monitor = this.context.traffic().monitor;
    if (monitor.mode === 'off') return { plan: undefined, noTrafficReason: monitor.reason ?? 'the traffic monitor is off', peerFeatures };
    if (!this.context.traffic().settings) return { plan: undefined, noTrafficReason: "the uplink's capacity is not configured ('traffic.linkCapacity')", peerFeatures };
    const plan = await this.planFor(request.guests, request.priority, request.to);
    return { plan: await forecastedPlan(plan, request, peerFeatures, this.context), peerFeatures };
  }

  private async migrateGuests(
    request: MigrateRequest,
    followed: FollowedPlan | undefined,
    onProgress: (progress: MigrationProgress) => void,
    forecasts?: Map<string, ForecastRecord>,
  ): Promise<GroupSummary> {
    if (this.context.shuttingDown()) throw new GangwayError(ErrorCode.SHUTTING_DOWN, 'the agent is shutting down');
    if (new Set(request.guests).size !== request.guests.length) {
      throw new GangwayError(ErrorCode.BAD_REQUEST, `a guest is named twice in ${request.guests.join(' ')}`);
    }
    // A followed plan may reorder the guests (high priority first), and asks the destination
    // to reserve its inbound side at the plan's priority too.
    const names = followed ? followed.guests.map((g) => g.name) : request.guests;
    const reservePriority = followed?.followed ? followed.priority : undefined;
    const guests = names.map((name) => {
      const { guest, record } = this.context.registry.get(name);
      if (record.incoming) {
        throw new GangwayError(
          ErrorCode.BAD_REQUEST,
          record.incoming.stranded
            ? `guest ${name} never received all of its memory from ${record.incoming.from} (${record.incoming.stranded}): it cannot move`
            : `guest ${name} is still receiving its memory from ${record.incoming.from} (post-copy): migrate it once that is done`,
        );
      }
      if (this.isMigrating(guest.name)) throw new GangwayError(ErrorCode.BAD_REQUEST, `guest ${guest.name} is already being migrated`);
      if (!guest.alive()) throw new GangwayError(ErrorCode.GUEST_FAILED, `guest ${guest.name} is not running`);
      return guest;
    });
    if (request.to === this.context.listenAddress()) {
      throw new GangwayError(ErrorCode.BAD_REQUEST, `--to ${request.to} is this agent itself`);
    }
    // Each guest as its migration moves it (a VM: its memory and the disks --disks selects).
    const sourceOf = new Map<HostedGuest, SourceGuest>();
    for (const guest of guests) {
      if (!guest.forMigration && Array.isArray(request.disks)) throw new GangwayError(ErrorCode.BAD_REQUEST, `--disks: guest ${guest.name} has no disks`);
      sourceOf.set(guest, guest.forMigration?.({ disks: request.disks ?? 'all' }) ?? guest);
    }
    const started = performance.now();
    const session = await this.context.sessions.session(request.to);
    this.refuseSelf(session, request.to);
    const requested = resolveTechnique(request.technique, session.peer?.features ?? []);
    // --technique auto: the decision's technique (a guest whose disks move goes by pre-copy there).
    const techniqueOf = (guest: HostedGuest) => followed?.guests.find((g) => g.name === guest.name)?.technique ?? requested;
    const strategy = followed?.strategy ?? request.strategy;
    // Dedup applies to pre-copy members only: a post-copy or hybrid member moves without it.
    const precopy = guests.filter((guest) => techniqueOf(guest) === 'precopy');
    if (precopy.length < guests.length && request.dedup && guests.length > 1) {
      this.context.log.info({ techniques: guests.map((g) => `${g.name}:${techniqueOf(g)}`) }, 'dedup applies to pre-copy migrations: post-copy and hybrid members move without it');
    }
    const dedup = request.dedup && precopy.length > 0 && (session.peer?.features.includes('dedup') ?? false);
    if (request.dedup && precopy.length > 0 && !dedup) this.context.log.warn({ to: request.to, guests: names }, 'the destination does not offer dedup; moving without it');
    const outcomes: GroupOutcome[] = [];
    // A guest's forecast holds for the technique and strategy it was made for (a guest whose disks move runs pre-copy instead).
    const forecastFor = (guest: HostedGuest, technique: string) => {
      const forecast = forecasts?.get(guest.name);
      return forecast && forecast.technique === technique && forecast.strategy === strategy ? forecast : undefined;
    };
    // --bandwidth caps the whole command: a gang shares one pacer. So does a followed plan's
    // reservation when the shaper cannot hold it (follow-plan.ts).
    const pacedBytesPerSec = request.bandwidthBytesPerSec ?? followed?.pacedBytesPerSec;
    const pacer = pacedBytesPerSec ? new Pacer(pacedBytesPerSec, this.context.config.batchBytes) : undefined;
    // A gang's members take turns at their switchovers, and choose their codec as one.
    const gate = strategy === 'gang' && guests.length > 1 ? new SwitchoverGate() : undefined;
    const chooser = gate ? new CodecChooser({ mode: request.codec, memory: session.codecMemory }) : undefined;
    const indexStats: GroupSummary['index'] = [];
    // Every region of every member is a slot of the group: numbered on from one guest to the next.
    const slotsOf = new Map<HostedGuest, number[]>();
    const openGroup = async (members: HostedGuest[]) => {
      let next = 0;
      for (const guest of members) slotsOf.set(guest, sourceOf.get(guest)!.regions.map(() => next++));
      const group = await SourceDedupGroup.open(session, {
        resident: true,
        members: members.flatMap((guest) => sourceOf.get(guest)!.regions.map((region, i) => ({ slot: slotsOf.get(guest)![i]!, pageCount: region.lengthBytes / region.pageSizeBytes }))),
        pageSizeBytes: GUEST_PAGE_SIZE,
        // Its migrations have no ids yet: the guests' names say whose group it is.
        log: this.context.log.child({ guests: members.map((guest) => guest.name), to: request.to }),
      });
      const { locations, memoryBytes } = group.indexStats;
      this.context.metrics.dedupIndexLocations.inc(locations);
      this.context.metrics.dedupIndexBytes.inc(memoryBytes);
      return group;
    };
    const closeGroup = (group: SourceDedupGroup | undefined) => {
      if (!group) return;
      const stats = group.indexStats;
      indexStats.push(stats);
      this.context.metrics.dedupIndexLocations.dec(stats.locations);
      this.context.metrics.dedupIndexBytes.dec(stats.memoryBytes);
      group.close();
    };
    if (strategy === 'gang') {
      const group = dedup ? await openGroup(precopy) : undefined;
      const slot = this.slots.gang(guests.length);
      try {
        const settled = await Promise.allSettled(
          guests.map((guest) => {
            const slots = slotsOf.get(guest);
            const forecast = forecastFor(guest, techniqueOf(guest));
            return this.migrateOne(sourceOf.get(guest)!, session, request, techniqueOf(guest), group && slots ? { group, slots } : undefined, { pacer, gate, chooser, reservePriority, slot, forecast, members: guests.length }, onProgress);
          }),
        );
        settled.forEach((result, i) => outcomes.push(outcomeOf(guests[i]!.name, result)));
      } finally {
        closeGroup(group);
      }
    } else {
      for (const guest of guests) {
        if (!session.isOpen) {
          outcomes.push({ guest: guest.name, error: { code: ErrorCode.PEER_GONE, message: 'the session to the destination closed before this guest' } });
          continue;
        }
        const technique = techniqueOf(guest);
        const group = dedup && technique === 'precopy' ? await openGroup([guest]) : undefined;
        try {
          const [result] = await Promise.allSettled([this.migrateOne(sourceOf.get(guest)!, session, request, technique, group ? { group, slots: slotsOf.get(guest)! } : undefined, { pacer, reservePriority, slot: this.slots.single(), forecast: forecastFor(guest, technique) }, onProgress)]);
          outcomes.push(outcomeOf(guest.name, result!));
        } finally {
          closeGroup(group);
        }
      }
    }
    const summary = summarizeGroup({ strategy, to: request.to }, dedup, this.context.listenAddress(), outcomes, performance.now() - started, indexStats);
    if (summary.guests.length === 0) {
      const first = outcomes.find((o) => o.error)!;
      const others = outcomes.filter((o) => o !== first && o.error).map((o) => `${o.guest}: ${o.error!.message}`);
      throw new GangwayError(first.error!.code as ErrorCode, first.error!.message + (others.length ? ` (also failed: ${others.join('; ')})` : ''));
    }
    if (followed) {
      summary.plan = {
        followed: followed.followed,
        priority: followed.priority,
        strategy: followed.strategy,
        pacedBytesPerSec: followed.pacedBytesPerSec ?? null,
        reasons: followed.reasons,
        assumptions: followed.assumptions,
      };
      for (const moved of summary.guests) {
        const note = followed.guests.find((g) => g.name === moved.guest);
        if (note) moved.plan = { technique: note.technique, strategy: note.strategy, order: note.order, reasons: note.reasons };
      }
    }
    return summary;
  }

  private async migrateOne(
    guest: SourceGuest,
    session: PeerSession,
    request: MigrateRequest,
    technique: 'precopy' | 'postcopy' | 'hybrid',
    dedup: { group: SourceDedupGroup; slots: number[] } | undefined,
    shared: { pacer?: Pacer | undefined; gate?: SwitchoverGate | undefined; chooser?: CodecChooser | undefined; reservePriority?: Priority | undefined; slot: SlotSource; forecast?: ForecastRecord | undefined; members?: number },
    onProgress: (progress: MigrationProgress) => void,
  ): Promise<MigrationSummary> {
    const migrationId = randomUUID();
    const log = this.context.log.child({ migrationId, guest: guest.name, to: request.to });
    const askedAt = new Date().toISOString();
    let base: { direction: 'out'; migrationId: string; guest: string; to: string; startedAt: string; queuedAt?: string } = { direction: 'out', migrationId, guest: guest.name, to: request.to, startedAt: askedAt };
    let migration: SourceMigration | undefined;
    let release: (() => void) | undefined;
    try {
      if (shared.slot.full()) {
        // Beyond migration.maxParallelOutbound: wait for a slot, listed as queued (cancel works).
        const cancel = new AbortController();
        this.queued.set(migrationId, { guest: guest.name, cancel });
        this.context.records.set(migrationId, { ...base, state: 'queued', queuedAt: askedAt });
        log.info({ limit: this.slots.limit, waiting: this.slots.queued }, 'migration queued: the outgoing limit is reached (migration.maxParallelOutbound)');
        try {
          release = await shared.slot.acquire(cancel.signal);
        } finally {
          this.queued.delete(migrationId);
        }
        base = { ...base, startedAt: new Date().toISOString(), queuedAt: askedAt };
        if (this.context.shuttingDown()) throw new GangwayError(ErrorCode.SHUTTING_DOWN, 'the agent is shutting down: the queued migration does not start');
        if (!session.isOpen) throw new GangwayError(ErrorCode.PEER_GONE, 'the session to the destination closed while the migration was queued');
      } else {
        release = await shared.slot.acquire(new AbortController().signal);
      }
      this.context.records.set(migrationId, { ...base, state: 'running' });
      // A gang's members share migration.channels (one each at least): they send at once.
      const settings = this.context.channels();
      const channels = settings && shared.gate ? { ...settings, count: Math.max(1, Math.floor(settings.count / (shared.members ?? 1))) } : settings;
      migration = new SourceMigration(
        guest,
        session,
        {
          migrationId,
          peerAddress: request.to,
          ...(channels ? { channels } : {}),
          downtimeBudgetMs: request.downtimeMs,
          maxRounds: request.maxRounds,
          maxWireBytes: request.maxBytesFactor * guest.regions.reduce((sum, region) => sum + region.lengthBytes, 0),
          force: request.force,
          codec: request.codec,
          ...(request.bandwidthBytesPerSec ? { bandwidthBytesPerSec: request.bandwidthBytesPerSec } : {}),
          ...(shared.pacer ? { pacer: shared.pacer } : {}),
          ...(shared.gate ? { gate: shared.gate } : {}),
          ...(shared.chooser ? { chooser: shared.chooser } : {}),
          tracker: request.tracker ?? this.context.config.tracker,
          batchBytes: this.context.config.batchBytes,
          digestBytesPerSec: this.context.digestBytesPerSec(),
          commitTimeoutMs: 30_000,
          metrics: this.context.metrics,
          ...(dedup ? { dedup } : {}),
          technique,
          ...(request.postcopyAfterRounds ? { hybrid: { postcopyAfterRounds: request.postcopyAfterRounds } } : {}),
          reconnect: () => this.context.sessions.session(request.to),
          registry: this.context.registry,
          ...(shared.reservePriority ? { reservePriority: shared.reservePriority } : {}),
          ...this.context.faults,
          reconnectWindowMs: this.context.config.postcopyReattachMs,
        },
        log,
      );
      this.outgoing.set(migrationId, migration);
      migration.on('phase', (phase: string) => this.context.records.notePhase(migrationId, phase));
      migration.on('progress', (progress: MigrationProgress) => {
        this.context.records.set(migrationId, { ...base, state: 'running', progress });
        onProgress(progress);
      });
      log.info({ downtimeMs: request.downtimeMs, codec: request.codec, dedup: dedup !== undefined, technique }, 'migration started');
      this.context.metrics.migrationsActive.inc({ direction: 'out' });
      const summary = await migration.run().finally(() => {
        this.context.metrics.migrationsActive.dec({ direction: 'out' });
        this.context.metrics.migrationEnded(migrationId, guest.name);
      });
      summary.from = this.context.listenAddress();
      this.context.metrics.migrations.inc({ direction: 'out', outcome: 'committed', technique: summary.technique });
      this.context.metrics.downtime.observe({ technique: summary.technique }, summary.downtimeMs / 1000);
      if (!summary.downtimeBudgetMet) this.context.metrics.downtimeOverBudget.inc({ technique: summary.technique });
      this.context.metrics.totalTime.observe(summary.totalMs / 1000);
      this.context.metrics.linkRate.set({ peer: request.to }, summary.linkRateBytesPerSec);
      if (shared.forecast) {
        summary.forecast = shared.forecast;
        this.context.metrics.forecastChecked(summary.technique, { totalMs: shared.forecast.totalMs, downtimeMs: shared.forecast.downtimeMs }, { totalMs: summary.totalMs, downtimeMs: summary.downtimeMs });
      }
      this.context.registry.remove(guest.name);
      this.context.records.set(migrationId, { ...base, state: 'committed', summary, endedAt: new Date().toISOString() });
      return summary;
    } catch (err) {
      const error = err instanceof GangwayError ? err : new GangwayError(ErrorCode.INTERNAL, String(err));
      const state = migration?.phase === 'in-doubt' ? 'in-doubt' : migration?.phase === 'interrupted' ? 'interrupted' : 'failed';
      // Once this migration is out of the books (finally, below), find out where the guest runs.
      if (state === 'in-doubt') setImmediate(() => void this.resolveOutgoing(guest.name));
      this.context.metrics.migrations.inc({ direction: 'out', outcome: state, technique });
      this.context.records.set(migrationId, { ...base, state, error: { code: error.code, message: error.message }, endedAt: new Date().toISOString() });
      throw error;
    } finally {
      release?.();
      this.outgoing.delete(migrationId);
      this.context.records.trim();
    }
  }

  /**
   * The plan for migrating `guests` to the agent at `to` (gangway plan): each guest's
   * technique, strategy, order and reserved rate with the planner's reasons, from this
   * agent's traffic and the destination's (asked over the peer session). Migrates nothing.
   */
  async planFor(guests: string[], priority: Priority | undefined, to: string): Promise<MigrationPlan> {
    if (new Set(guests).size !== guests.length) throw new GangwayError(ErrorCode.BAD_REQUEST, `a guest is named twice in ${guests.join(' ')}`);
    for (const name of guests) this.context.registry.get(name);
    if (to === this.context.listenAddress()) throw new GangwayError(ErrorCode.BAD_REQUEST, `--to ${to} is this agent itself`);
    const session = await this.context.sessions.session(to);
    let destination: { rates: { rxBytesPerSec: number; txBytesPerSec: number } | undefined; reason?: string };
    if (!session.peer?.features.includes('traffic')) {
      destination = { rates: undefined, reason: `the agent at ${to} does not report its traffic (no 'traffic' feature)` };
    } else {
      try {
        const report = await session.queryTraffic();
        destination = report.measured
          ? { rates: { rxBytesPerSec: report.rxBytesPerSec, txBytesPerSec: report.txBytesPerSec } }
          : { rates: undefined, reason: `the agent at ${to} measures nothing: ${report.reason}` };
      } catch (err) {
        destination = { rates: undefined, reason: `the agent at ${to} did not report its traffic: ${(err as Error).message}` };
      }
    }
    return this.context.traffic().plan(guests, priority, destination);
  }

  /**
   * The running outgoing migration `idOrPrefix` names (an id or a unique prefix of one), or a
   * refusal that says what became of it: ended, incoming (`where` says where to `action` it
   * instead), unknown, ambiguous.
   */
  private running(idOrPrefix: string, action: string): [string, SourceMigration] {
    const matches = [...this.outgoing.entries()].filter(([id]) => id.startsWith(idOrPrefix));
    if (matches.length === 0 || idOrPrefix.length === 0) {
      const known = this.context.records.get(idOrPrefix) ?? [...this.context.records.values()].find((r) => r.migrationId.startsWith(idOrPrefix));
      throw new GangwayError(
        ErrorCode.BAD_REQUEST,
        known
          ? `migration ${known.migrationId} is ${known.direction === 'in' ? `incoming: ${action} it on the source agent` : known.state}`
          : `no running outgoing migration has id ${idOrPrefix} (see gangway status)`,
      );
    }
    if (matches.length > 1) {
      throw new GangwayError(ErrorCode.BAD_REQUEST, `id prefix ${idOrPrefix} matches ${matches.length} migrations: give more of it`);
    }
    return matches[0]!;
  }

  /** Cancels an outgoing migration (running or queued) by id or unique id prefix; its guest keeps running here. */
  cancelMigration(idOrPrefix: string): string {
    const queued = [...this.queued.entries()].filter(([id]) => id.startsWith(idOrPrefix));
    if (queued.length === 1 && idOrPrefix.length > 0 && ![...this.outgoing.keys()].some((id) => id.startsWith(idOrPrefix))) {
      const [id, entry] = queued[0]!;
      this.context.records.noteCancelled(id);
      entry.cancel.abort();
      this.context.log.info({ migrationId: id }, 'queued migration cancelled');
      return id;
    }
    const [id, migration] = this.running(idOrPrefix, 'cancel');
    migration.cancel();
    this.context.records.noteCancelled(id);
    this.context.log.info({ migrationId: id }, 'migration cancelled');
    return id;
  }

  /** Cancels guest `name`'s outgoing migration, running or queued (a drain's cancel); false when it has none. */
  cancelGuest(name: string): boolean {
    const queued = [...this.queued.values()].find((q) => q.guest === name);
    if (queued) {
      queued.cancel.abort();
      return true;
    }
    const running = this.outgoingOf(name);
    if (!running) return false;
    running[1].cancel();
    return true;
  }

  /**
   * gangway migrate-set: a running migration's rate and downtime budget (see
   * SourceMigration.changeSettings). A gang's --bandwidth is one pacer for the gang: a new
   * rate is the gang's, and the answer names the other members. Where the uplink's shaper
   * (tc) holds a reservation for migrations to this destination's port, a new rate resizes
   * it too (the pacer and the shaper agree again; every migration to that port shares the class).
   */
  async changeSettings(idOrPrefix: string, change: SettingsChange): Promise<SettingsAnswer> {
    const [id, migration] = this.running(idOrPrefix, 'change');
    const { previous, current } = migration.changeSettings(change);
    const rate = change.bandwidthBytesPerSec;
    const sharedWith = rate === undefined ? [] : [...this.outgoing.values()].filter((other) => migration.sharesPacerWith(other)).map((other) => other.guest.name);
    let shaper: string | null = null;
    if (rate !== undefined) {
      const peerPort = Number(migration.options.peerAddress.slice(migration.options.peerAddress.lastIndexOf(':') + 1));
      try {
        const reservation = await this.context.traffic().changeRate(peerPort, rate);
        if (reservation) shaper = `the uplink's reservation for port ${peerPort} follows: ${reservation.reason}`;
      } catch (err) {
        // The pacer holds the new rate either way; the shaper's class keeps its old one.
        shaper = `the uplink's reservation for port ${peerPort} could not follow (${(err as Error).message}): its class keeps the rate it had, the pacer holds the new one`;
        this.context.log.warn({ migrationId: id, peerPort, err: (err as Error).message }, 'resizing the bandwidth reservation failed');
      }
    }
    return { migrationId: id, guest: migration.guest.name, phase: migration.phase, round: migration.round ?? null, previous, current, pacerSharedWith: sharedWith, shaper };
  }

  /** gangway postcopy: see SourceMigration.requestPostcopy. */
  startPostcopy(idOrPrefix: string): PostcopyAnswer {
    const [id, migration] = this.running(idOrPrefix, 'switch');
    const { alreadyRequested } = migration.requestPostcopy();
    return { migrationId: id, guest: migration.guest.name, phase: migration.phase, round: migration.round ?? null, alreadyRequested };
  }

  /**
   * A guest marked as at its switchover with nobody driving the migration any more: see
   * InDoubtSwitchovers.resolve.
   */
  resolveOutgoing(name: string): Promise<void> {
    return this.inDoubt.resolve(name);
  }

  /** A --to that reaches this agent under another name (localhost, another address of this host). */
  private refuseSelf(session: PeerSession, to: string): void {
    if (session.peerId === this.context.agentId) throw new GangwayError(ErrorCode.BAD_REQUEST, `--to ${to} is this agent itself (it listens on ${this.context.listenAddress()})`);
  }
}
