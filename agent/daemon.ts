// The agent: one per host. Listens for peer agents (WebSocket sessions carrying
// migrations), serves the local control API to the CLI over a unix socket in the state
// dir, keeps the guest registry, and runs migrations in both directions.
import { randomBytes, randomUUID } from 'node:crypto';
import { connect } from 'node:net';
import { chmodSync, existsSync, lstatSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ErrorCode, GangwayError } from '../protocol/errors.js';
import { Whereabouts } from '../protocol/codes.js';
import { setTimeout as sleep } from 'node:timers/promises';
import { warmUpSwitchover } from './migration/warmup.js';
import { faultsFromEnv } from './migration/faults.js';
import { Frame } from '../protocol/index.js';
import { DEFAULT_MAX_PAYLOAD_BYTES } from '../protocol/limits.js';
import { GUEST_PAGE_SIZE } from './guest/guest-header.js';
import { launchProcessGuest, processState, type ProcessGuestSpec, type TrackerPreference } from './guest/process-guest.js';
import { GuestRegistry, UNREADABLE_RECORD_ADVICE, type GuestRecord } from './guest/registry.js';
import type { Logger } from './log.js';
import { loadNative } from './native.js';
import type { CodecMode } from './migration/codec-chooser.js';
import { SourceMigration, type MigrationProgress, type MigrationSummary } from './migration/source.js';
import { outcomeOf, summarizeGroup, type GroupOutcome, type GroupSummary } from './migration/group-summary.js';
import { SourceDedupGroup } from './dedup/source-group.js';
import { Pacer, SwitchoverGate } from './migration/flow.js';
import type { ProcessGuest } from './guest/process-guest.js';
import { agentIdOf } from './peer/allowlist.js';
import { DEFAULT_DEAD_AFTER_MS, type PeerSession } from './peer/session.js';
import { parseShimReport } from './tracker/uffd-wp.js';
import { AgentMetrics } from './metrics.js';
import { MigrationRecords } from './daemon/records.js';
import { SessionPool } from './daemon/session-pool.js';
import { PeerServer } from './daemon/peer-server.js';
import { InboundMigrations } from './daemon/inbound.js';
import { CONFIG_DEFAULTS, DEDUP_POLICY_DEFAULTS, PEER_LIMIT_DEFAULTS, resolveTrafficConfig, type DedupPolicy, type PeerLimits, type TrafficConfig } from './config.js';
import { TrafficService } from './traffic/service.js';
import type { Priority } from './planner/planner.js';
import type { MigrationPlan } from './planner/plan-for.js';
import { defaultAutoTechnique, followPlan, type FollowedPlan } from './planner/follow-plan.js';
import { loadTlsMaterial, type PeerTransport, type TlsMaterial } from './peer/tls.js';

/** What this agent offers in its hello; a feature is used when both sides list it. */
/** The options of a SourceMigration that only serves the rest of a post-copy (they are not used). */
const MIGRATION_OPTION_DEFAULTS = {
  downtimeBudgetMs: 300,
  maxRounds: 1,
  force: false,
  codec: 'auto',
  commitTimeoutMs: 30_000,
} as const;

/** What this agent does, as its hello says; 'postcopy' only where the guest's memory can take userfaultfd. */
const AGENT_FEATURES = ['lz4', 'precopy', 'dedup', 'repair', 'traffic', ...(loadNative().uffdProbe() ? ['postcopy'] : [])];

/**
 * The technique of a request that does not follow a plan. auto without traffic data: hybrid
 * where the destination can post-copy (pre-copy first, post-copy only if that does not
 * converge), else pre-copy; with traffic data, auto follows the plan (Agent.migrate).
 */
export function resolveTechnique(requested: MigrateRequest['technique'], peerFeatures: readonly string[]): 'precopy' | 'postcopy' | 'hybrid' {
  if (requested === undefined || requested === 'precopy') return 'precopy';
  if (requested === 'auto') return defaultAutoTechnique(peerFeatures);
  return requested;
}

export interface AgentConfig {
  listenHost: string;
  listenPort: number;
  stateDir: string;
  memoryDir: string;
  tracker: TrackerPreference;
  /** Receive window granted to each incoming migration. */
  creditBytes: number;
  maxPayloadBytes: number;
  batchBytes: number;
  /** How long SIGTERM waits for running migrations before aborting them. */
  shutdownGraceMs: number;
  /** Mutual TLS with an allowlist, or plain ws on loopback (asked for by name). */
  transport: PeerTransport;
  /** Bandwidth control (uplink, capacity, SLA); without it nothing is measured or shaped. */
  traffic?: TrafficConfig;
  /** A peer session silent this long is dead (see SessionOptions.deadAfterMs). */
  peerTimeoutMs: number;
  /** How long a post-copy destination whose source link broke waits for the source to come back. */
  postcopyReattachMs: number;
  /** What one peer may make this agent do (sessions, incoming migrations, requests, memory). */
  peers: PeerLimits;
  /** Whose resident guests a peer's dedup group may see, and how often. */
  dedup: DedupPolicy;
}

export const DEFAULT_AGENT_CONFIG: Omit<AgentConfig, 'listenHost' | 'listenPort' | 'stateDir' | 'transport'> = {
  memoryDir: CONFIG_DEFAULTS.memoryDir,
  tracker: CONFIG_DEFAULTS.tracker,
  creditBytes: 32 * 1024 * 1024,
  maxPayloadBytes: DEFAULT_MAX_PAYLOAD_BYTES,
  batchBytes: 1024 * 1024,
  shutdownGraceMs: CONFIG_DEFAULTS.shutdownGrace,
  peerTimeoutMs: DEFAULT_DEAD_AFTER_MS,
  postcopyReattachMs: 10 * 60_000,
  peers: PEER_LIMIT_DEFAULTS,
  dedup: DEDUP_POLICY_DEFAULTS,
};

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
}

export type { MigrationRecord } from './daemon/records.js';

export function controlSocketPath(stateDir: string): string {
  return join(stateDir, 'control.sock');
}

export class Agent {
  readonly id: string;
  readonly registry: GuestRegistry;
  private readonly peerServer: PeerServer;
  /** Loaded at start when the transport is TLS. */
  private tls: TlsMaterial | undefined;
  private readonly sessionsOut: SessionPool;
  private readonly outgoing = new Map<string, SourceMigration>();
  private readonly inbound: InboundMigrations;
  private readonly records = new MigrationRecords();
  private shuttingDown = false;
  private digestBytesPerSec = 8e9;
  private readonly startedAt = Date.now();
  readonly metrics = new AgentMetrics();
  /** Fault injection for end-to-end tests (GANGWAY_FAULT_*), read once. */
  private readonly faults: ReturnType<typeof faultsFromEnv>;
  /** The traffic monitor and shaper; created by start() once the peer port is known. */
  traffic!: TrafficService;
  listenAddress = '';
  /** The port of listenAddress (the one picked when listenPort was 0). */
  private get peerPort(): number {
    return Number(this.listenAddress.slice(this.listenAddress.lastIndexOf(':') + 1));
  }
  /** Where /metrics is served, once it is. */
  metricsAddress: string | undefined;
  /** The loopback TCP control port (HOST:PORT), when control.listen is set. */
  controlAddress: string | undefined;

  constructor(
    readonly config: AgentConfig,
    readonly log: Logger,
  ) {
    mkdirSync(config.stateDir, { recursive: true, mode: 0o750 });
    this.faults = faultsFromEnv(process.env, log);
    // With TLS the agent is who its certificate says (agentIdOf): peers check its hello
    // against the certificate it presents. Without, an id of its own, kept in the state dir.
    this.tls = config.transport.kind === 'tls' ? loadTlsMaterial(config.transport) : undefined;
    this.id = this.tls ? agentIdOf(this.tls.self) : this.loadOrCreateId();
    this.registry = new GuestRegistry(config.stateDir);
    this.sessionsOut = new SessionPool({ tls: this.tls, log, sessionOptions: (sessionLog) => this.sessionOptions(sessionLog) });
    this.inbound = new InboundMigrations({
      config,
      registry: this.registry,
      log,
      metrics: this.metrics,
      records: this.records,
      accepting: () => !this.shuttingDown,
      isMigrating: (name) => this.isMigrating(name),
      peerPort: () => this.peerPort,
      traffic: () => this.traffic,
      onLimit: (limit) => this.limitHit(limit),
    });
    this.peerServer = new PeerServer({
      config,
      tls: this.tls,
      log,
      sessionOptions: (sessionLog) => this.sessionOptions(sessionLog),
      onLimit: (limit) => this.limitHit(limit),
      routes: {
        onOffer: (offer, session, shared) => this.inbound.onOffer(offer, session, shared),
        onGroupFrame: (frame, session, groups) => this.inbound.onGroupFrame(frame, session, groups),
        onReattach: (frame, session) => this.inbound.onReattach(frame, session),
        onMigrationQuery: (frame, session) => void this.inbound.answerQuery(frame.migrationId, session),
        onTrafficQuery: () => this.traffic.report(),
      },
    });
  }

  private loadOrCreateId(): string {
    const path = join(this.config.stateDir, 'agent.json');
    if (existsSync(path)) {
      // An older agent wrote it world-readable.
      chmodSync(path, 0o600);
      try {
        const saved = JSON.parse(readFileSync(path, 'utf8')) as { agentId?: unknown };
        if (typeof saved.agentId === 'string' && saved.agentId.length > 0) return saved.agentId;
      } catch {}
    }
    const agentId = `agent-${randomBytes(6).toString('hex')}`;
    writeFileSync(path, JSON.stringify({ agentId }, null, 2), { mode: 0o600 });
    chmodSync(path, 0o600);
    return agentId;
  }

  async start(): Promise<void> {
    const dead = this.registry.load();
    if (dead.length > 0) this.log.warn({ guests: dead }, 'guests in the registry are no longer running; dropped');
    for (const { file, name, problem } of this.registry.unreadableRecords()) {
      this.log.error({ guest: name, file, problem }, `guest record cannot be read; kept, and guest "${name}" is refused until it is dealt with: ${UNREADABLE_RECORD_ADVICE}`);
    }
    this.calibrateDigest();
    warmUpSwitchover();
    this.listenAddress = await this.peerServer.listen();
    this.traffic = new TrafficService({
      config: this.config.traffic ?? resolveTrafficConfig(undefined),
      peerPort: this.peerPort,
      guests: () => this.registry.list().map(({ record }) => ({ name: record.name, tap: record.tap })),
      log: this.log.child({ component: 'traffic' }),
      metrics: this.metrics,
    });
    await this.traffic.start();
    this.log.info({ agentId: this.id, listen: this.listenAddress, stateDir: this.config.stateDir }, 'agent listening');
    // Guests whose migration was at its switchover when the previous run of this agent
    // ended: ask their destination what became of them before anything else happens.
    for (const { record } of this.registry.list()) if (record.outgoing) void this.resolveOutgoing(record.name);
  }

  /** Asks `to` what became of `migrationId` (a short-lived handler on the session). */
  private async askWhereabouts(to: string, migrationId: string): Promise<Whereabouts> {
    const session = await this.sessionsOut.session(to);
    return new Promise<Whereabouts>((resolve, reject) => {
      const timer = setTimeout(() => {
        session.unregister(migrationId);
        reject(new GangwayError(ErrorCode.TIMEOUT, `no answer from ${to} within 10 s`));
      }, 10_000);
      session.register(migrationId, {
        onFrame: (frame) => {
          if (frame.type !== 'migrationAnswer') return;
          clearTimeout(timer);
          session.unregister(migrationId);
          resolve((frame as ReturnType<typeof Frame.migrationAnswer>).whereabouts);
        },
        onSessionClosed: (err) => {
          clearTimeout(timer);
          reject(err);
        },
      });
      session.send(Frame.migrationQuery({ migrationId }));
    });
  }

  private readonly resolving = new Set<string>();

  /**
   * Serves the rest of a post-copy this agent was in the middle of when it stopped. True
   * once the destination holds every page (this copy is then gone).
   */
  private async resumePostcopy(name: string, out: NonNullable<GuestRecord['outgoing']>): Promise<boolean> {
    const { guest } = this.registry.get(name);
    const log = this.log.child({ migrationId: out.migrationId, guest: name, to: out.to });
    const session = await this.sessionsOut.session(out.to);
    const migration = new SourceMigration(
      guest,
      session,
      {
        ...MIGRATION_OPTION_DEFAULTS,
        migrationId: out.migrationId,
        peerAddress: out.to,
        maxWireBytes: 3 * guest.memoryBytes,
        tracker: this.config.tracker,
        batchBytes: this.config.batchBytes,
        digestBytesPerSec: this.digestBytesPerSec,
        metrics: this.metrics,
        technique: 'postcopy',
        ...(out.secret ? { secret: Buffer.from(out.secret, 'hex') } : {}),
        reconnect: () => this.sessionsOut.session(out.to),
        reconnectWindowMs: this.config.postcopyReattachMs,
        registry: this.registry,
      },
      log,
    );
    this.outgoing.set(out.migrationId, migration);
    log.warn('post-copy was under way when this agent stopped: serving the pages the destination still lacks');
    try {
      const result = await migration.resumePostcopy();
      this.registry.remove(name);
      this.records.set(out.migrationId, { direction: 'out', state: 'resumed', migrationId: out.migrationId, guest: name, to: out.to, startedAt: out.since, resumed: result });
      return true;
    } catch (err) {
      const message = err instanceof Error ? err.message : String(err);
      log.error({ err: message }, 'serving the rest of the post-copy failed; this paused copy stays');
      this.registry.update(name, { outgoing: { ...out, interrupted: message.slice(0, 300) } });
      return false;
    } finally {
      this.outgoing.delete(out.migrationId);
    }
  }

  /**
   * A guest marked as at its switchover (the commit was sent, or post-copy started) with
   * nobody driving the migration any more (this agent restarted, or the confirmation was
   * lost): ask the destination until it answers. Running there: this paused copy goes.
   * Unknown there: the guest never ran there, so it resumes here. Receiving or stranded
   * there: this copy holds what the destination lacks; it stays paused, and says so.
   */
  private async resolveOutgoing(name: string): Promise<void> {
    if (this.resolving.has(name)) return;
    this.resolving.add(name);
    try {
      let delay = 500;
      while (!this.shuttingDown) {
        let entry;
        try {
          entry = this.registry.get(name);
        } catch {
          return;
        }
        const out = entry.record.outgoing;
        if (!out || this.isMigrating(name)) return;
        let whereabouts: Whereabouts | undefined;
        try {
          whereabouts = await this.askWhereabouts(out.to, out.migrationId);
        } catch (err) {
          this.log.info({ guest: name, to: out.to, err: (err as Error).message }, 'switchover in doubt: the destination does not answer yet');
        }
        if (whereabouts === Whereabouts.running) {
          this.log.warn({ guest: name, to: out.to, migrationId: out.migrationId }, 'switchover resolved: the guest runs at the destination; this paused copy is removed');
          await entry.guest.discard();
          this.registry.remove(name);
          return;
        }
        if (whereabouts === Whereabouts.unknown) {
          this.log.warn({ guest: name, to: out.to, migrationId: out.migrationId }, 'switchover resolved: the guest never ran at the destination; it resumes here');
          this.registry.update(name, { outgoing: undefined });
          entry.guest.resume();
          return;
        }
        if (whereabouts === Whereabouts.receiving && out.phase === 'postcopy') {
          // The guest runs there and waits for pages only this copy holds: serve them.
          if (await this.resumePostcopy(name, out)) return;
        }
        if (whereabouts === Whereabouts.receiving || whereabouts === Whereabouts.stranded) {
          const why =
            whereabouts === Whereabouts.stranded
              ? 'the destination gave up waiting for its missing pages'
              : 'the destination runs the guest and waits for pages this copy holds';
          this.log.error({ guest: name, to: out.to, migrationId: out.migrationId }, `post-copy interrupted: ${why}; this paused copy stays`);
          this.registry.update(name, { outgoing: { ...out, interrupted: why } });
          return;
        }
        await sleep(delay, undefined, { ref: false });
        delay = Math.min(delay * 2, 10_000);
      }
    } finally {
      this.resolving.delete(name);
    }
  }

  /** A --to that reaches this agent under another name (localhost, another address of this host). */
  private refuseSelf(session: PeerSession, to: string): void {
    if (session.peerId === this.id) throw new GangwayError(ErrorCode.BAD_REQUEST, `--to ${to} is this agent itself (it listens on ${this.listenAddress})`);
  }

  /** A peer hit one of the peers.* limits (or broke the credit or identity rules): counted. */
  private limitHit(limit: string): void {
    this.metrics.peerLimit.inc({ limit });
  }

  /** What every session of this agent runs with, in either role. */
  private sessionOptions(log: Logger) {
    return {
      agentId: this.id,
      features: AGENT_FEATURES,
      maxPayloadBytes: this.config.maxPayloadBytes,
      log,
      deadAfterMs: this.config.peerTimeoutMs,
      helloTimeoutMs: this.config.peers.handshakeTimeoutMs,
      requests: { perSecond: this.config.peers.requestsPerSecond, burst: this.config.peers.requestBurst },
      onLimit: (limit: string) => this.limitHit(limit),
    };
  }

  /** Measures XXH3-128 on this host so the convergence policy can predict the switchover's digest time. */
  private calibrateDigest(): void {
    const native = loadNative();
    const sample = Buffer.alloc(16 * 1024 * 1024, 0x5a);
    native.hash128(sample);
    const t0 = performance.now();
    native.hash128(sample);
    const ms = performance.now() - t0;
    if (ms > 0) this.digestBytesPerSec = (sample.length * 1000) / ms;
  }

  // ── guests ─────────────────────────────────────────────────────────────────────────
  async startGuest(name: string, spec: ProcessGuestSpec, tap?: string): Promise<{ name: string; pid: number; memoryPath: string }> {
    if (this.shuttingDown) throw new GangwayError(ErrorCode.SHUTTING_DOWN, 'the agent is shutting down');
    const tapOwner = tap === undefined ? undefined : this.registry.list().find(({ record }) => record.tap === tap);
    if (tapOwner) throw new GangwayError(ErrorCode.BAD_REQUEST, `TAP device ${tap} is already guest ${tapOwner.record.name}'s`);
    if (spec.memoryBytes % GUEST_PAGE_SIZE !== 0) {
      throw new GangwayError(ErrorCode.BAD_REQUEST, `memory size ${spec.memoryBytes} is not a multiple of ${GUEST_PAGE_SIZE} bytes`);
    }
    this.registry.reserve(name);
    const files = this.registry.filesFor(name, this.config.memoryDir, randomBytes(4).toString('hex'));
    // The guest refuses a path that exists (O_EXCL): whatever is there is not ours to remove below.
    if (lstatSync(files.memoryPath, { throwIfNoEntry: false })) {
      this.registry.release(name);
      throw new GangwayError(ErrorCode.GUEST_FAILED, `${files.memoryPath} exists already: something else made it; remove it or start the guest again (a new name is picked each time)`);
    }
    try {
      const launched = launchProcessGuest({ files, create: spec });
      await launched.running;
      this.registry.add({
        name,
        kind: 'process',
        pid: launched.pid,
        memoryBytes: spec.memoryBytes,
        pageSizeBytes: GUEST_PAGE_SIZE,
        files,
        spec,
        origin: { kind: 'started' },
        startedAt: new Date().toISOString(),
        ...(tap === undefined ? {} : { tap }),
      });
      this.log.info({ guest: name, pid: launched.pid, memoryBytes: spec.memoryBytes }, 'guest started');
      return { name, pid: launched.pid, memoryPath: files.memoryPath };
    } catch (err) {
      this.registry.release(name);
      rmSync(files.memoryPath, { force: true });
      rmSync(files.trackReportPath, { force: true });
      throw err;
    }
  }

  async stopGuest(name: string): Promise<void> {
    const { guest } = this.registry.get(name);
    if (this.isMigrating(name)) {
      const [id, running] = [...this.outgoing.entries()].find(([, m]) => m.guest.name === name) ?? [];
      // Past its switchover a migration can no longer be cancelled: then waiting is the advice.
      const cancel = id && running?.cancellable ? ` (to ${running.options.peerAddress}), or cancel it with \`gangway cancel ${id.slice(0, 8)}\`: the guest then stays on this host` : '';
      throw new GangwayError(ErrorCode.BAD_REQUEST, `guest ${name} is being migrated; wait for the migration to end${cancel}`);
    }
    await guest.stop();
    rmSync(guest.files.memoryPath, { force: true });
    rmSync(guest.files.trackReportPath, { force: true });
    this.registry.remove(name);
    this.log.info({ guest: name }, 'guest stopped');
  }

  /** SIGCONT a paused guest (after a switchover left in doubt, once the operator has checked). */
  resumeGuest(name: string): void {
    const { guest, record } = this.registry.get(name);
    if (record.outgoing?.phase === 'postcopy') {
      throw new GangwayError(
        ErrorCode.BAD_REQUEST,
        `guest ${name} runs at ${record.outgoing.to} since the post-copy switchover of migration ${record.outgoing.migrationId}; ` +
          'this paused copy holds the pages it may still lack there, so it must not run here. Check `gangway status` on the destination; ' +
          `once the guest is complete there, \`gangway guest stop ${name}\` frees this copy`,
      );
    }
    if (record.outgoing) {
      throw new GangwayError(
        ErrorCode.BAD_REQUEST,
        `guest ${name} may run at ${record.outgoing.to}: the commit of migration ${record.outgoing.migrationId} was sent and not confirmed. ` +
          'This agent asks the destination until it answers, then removes this copy or resumes it, so that the guest runs in exactly one place',
      );
    }
    if (record.incoming?.stranded) {
      throw new GangwayError(
        ErrorCode.BAD_REQUEST,
        `guest ${name} never received all of its memory from ${record.incoming.from} (${record.incoming.stranded}); resuming it would let it read missing pages as zeros`,
      );
    }
    if (this.isMigrating(name)) {
      throw new GangwayError(ErrorCode.BAD_REQUEST, `guest ${name} is being migrated`);
    }
    guest.resume();
  }

  private isMigrating(name: string): boolean {
    return [...this.outgoing.values()].some((m) => m.guest.name === name);
  }

  guestStatus() {
    return this.registry.list().map(({ record, guest }) => {
      let tracker: { kind: string; reason?: string };
      try {
        parseShimReport(readFileSync(record.files.trackReportPath, 'utf8'));
        tracker = { kind: this.config.tracker === 'hash-scan' ? 'hash-scan' : 'uffd-wp' };
      } catch (err) {
        tracker = { kind: 'hash-scan', reason: (err as Error).message };
      }
      let header;
      try {
        header = guest.header();
      } catch {}
      return {
        name: record.name,
        pid: record.pid,
        state: !guest.alive() ? 'dead' : guest.isPaused || processState(record.pid) === 'T' ? 'paused' : 'running',
        memoryBytes: record.memoryBytes,
        memoryPath: record.files.memoryPath,
        origin: record.origin,
        tracker,
        ...(record.outgoing ? { outgoing: record.outgoing } : {}),
        ...(record.incoming ? { incoming: { ...record.incoming, missingPages: this.inbound.missingPages(record.incoming.migrationId) ?? record.incoming.missingPages } } : {}),
        ...(header
          ? {
              passes: header.passes,
              totalWrites: header.totalWrites,
              stalePages: header.stalePages,
              metaErrors: header.metaErrors,
              resumes: header.resumes,
              resumeCheckDone: header.resumeCheckDone,
              resumeStalePages: header.resumeStalePages,
              passesAtResume: header.passesAtResume,
              dirtyRateBytesPerSec: header.dirtyRateBytesPerSec,
              profile: header.profile,
            }
          : {}),
      };
    });
  }

  status() {
    return {
      agent: {
        id: this.id,
        listen: this.listenAddress,
        stateDir: this.config.stateDir,
        memoryDir: this.config.memoryDir,
        pid: process.pid,
        uptimeMs: Date.now() - this.startedAt,
        trackerPreference: this.config.tracker,
        metrics: this.metricsAddress ?? null,
        controlPort: this.controlAddress ?? null,
        digestBytesPerSec: Math.round(this.digestBytesPerSec),
        shuttingDown: this.shuttingDown,
        sessions: { in: this.peerServer.sessionCount, out: this.sessionsOut.size },
        /** What this agent offers peers in its hello (postcopy only where userfaultfd works). */
        features: AGENT_FEATURES,
      },
      guests: this.guestStatus(),
      /** Guest records that could not be read at start: kept on disk, their names refused (see UNREADABLE_RECORD_ADVICE). */
      unreadableRecords: this.registry.unreadableRecords(),
      migrations: this.records.newestFirst(),
    };
  }

  // ── outgoing migrations ───────────────────────────────────────────────────────────
  /**
   * Migrates one or more guests to one destination. gang: all at once over one session,
   * in one dedup group; serial: one after another, each in its own group (so the guests
   * moved before it are resident content at the destination). Resolves with every guest's
   * summary and the totals when at least one guest moved; throws the first error when none did.
   */
  async migrate(request: MigrateRequest, onProgress: (progress: MigrationProgress) => void): Promise<GroupSummary> {
    // auto: the plan is made from the traffic as the monitor last smoothed it, so the hold
    // below can be installed meanwhile (its tc commands took as long as the plan's round trip).
    // The bandwidth hook: the shaper applies --bandwidth, or Algorithm 2 at the request's
    // priority (default traffic.priority), on the uplink while the migration runs (a no-op
    // without root, tc or an uplink).
    const [planning, holding] = await Promise.allSettled([
      request.technique === 'auto' ? this.planForAuto(request) : Promise.resolve(undefined),
      this.traffic.hold({
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
    if (hold.applied) this.log.info({ to: request.to, reason: hold.reason }, 'migration bandwidth reserved on the uplink');
    try {
      const followed = planned
        ? followPlan({
            guests: request.guests,
            priority: request.priority ?? this.traffic.status().priorityDefault,
            requestedStrategy: request.strategy,
            plan: planned.plan,
            ...(planned.noTrafficReason ? { noTrafficReason: planned.noTrafficReason } : {}),
            peerFeatures: planned.peerFeatures,
            shaper: { applied: hold.applied, reason: hold.reason },
            linkBytesPerSec: this.traffic.settings?.linkBytesPerSec,
            manualBandwidthBytesPerSec: request.bandwidthBytesPerSec,
          })
        : undefined;
      if (followed) this.log.info({ followed: followed.followed, strategy: followed.strategy, guests: followed.guests.map((g) => `${g.name}:${g.technique}`), reasons: followed.reasons }, 'technique auto');
      return await this.migrateGuests(request, followed, onProgress);
    } finally {
      await hold.stop().catch((err: Error) => this.log.warn({ err: err.message }, 'releasing the bandwidth reservation failed'));
    }
  }

  /** The plan behind --technique auto, or why there is none (no traffic data: no uplink or capacity). */
  private async planForAuto(request: MigrateRequest): Promise<{ plan: MigrationPlan | undefined; noTrafficReason?: string; peerFeatures: string[] }> {
    const session = await this.sessionsOut.session(request.to);
    this.refuseSelf(session, request.to);
    const peerFeatures = [...(session.peer?.features ?? [])];
    const monitor = this.traffic.monitor;
    if (monitor.mode === 'off') return { plan: undefined, noTrafficReason: monitor.reason ?? 'the traffic monitor is off', peerFeatures };
    if (!this.traffic.settings) return { plan: undefined, noTrafficReason: "the uplink's capacity is not configured ('traffic.linkCapacity')", peerFeatures };
    return { plan: await this.planFor(request.guests, request.priority, request.to), peerFeatures };
  }

  private async migrateGuests(request: MigrateRequest, followed: FollowedPlan | undefined, onProgress: (progress: MigrationProgress) => void): Promise<GroupSummary> {
    if (this.shuttingDown) throw new GangwayError(ErrorCode.SHUTTING_DOWN, 'the agent is shutting down');
    if (new Set(request.guests).size !== request.guests.length) {
      throw new GangwayError(ErrorCode.BAD_REQUEST, `a guest is named twice in ${request.guests.join(' ')}`);
    }
    // A followed plan may reorder the guests (high priority first), and asks the destination
    // to reserve its inbound side at the plan's priority too.
    const names = followed ? followed.guests.map((g) => g.name) : request.guests;
    const reservePriority = followed?.followed ? followed.priority : undefined;
    const guests = names.map((name) => {
      const { guest, record } = this.registry.get(name);
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
    if (request.to === this.listenAddress) {
      throw new GangwayError(ErrorCode.BAD_REQUEST, `--to ${request.to} is this agent itself`);
    }
    const started = performance.now();
    const session = await this.sessionsOut.session(request.to);
    this.refuseSelf(session, request.to);
    const requested = resolveTechnique(request.technique, session.peer?.features ?? []);
    const techniqueOf = (guest: ProcessGuest) => followed?.guests.find((g) => g.name === guest.name)?.technique ?? requested;
    const strategy = followed?.strategy ?? request.strategy;
    // Dedup applies to pre-copy members only: a post-copy or hybrid member moves without it.
    const precopy = guests.filter((guest) => techniqueOf(guest) === 'precopy');
    if (precopy.length < guests.length && request.dedup && guests.length > 1) {
      this.log.info({ techniques: guests.map((g) => `${g.name}:${techniqueOf(g)}`) }, 'dedup applies to pre-copy migrations: post-copy and hybrid members move without it');
    }
    const dedup = request.dedup && precopy.length > 0 && (session.peer?.features.includes('dedup') ?? false);
    if (request.dedup && precopy.length > 0 && !dedup) this.log.warn({ to: request.to }, 'the destination does not offer dedup; moving without it');
    const outcomes: GroupOutcome[] = [];
    // --bandwidth caps the whole command: a gang shares one pacer. So does a followed plan's
    // reservation when the shaper cannot hold it (follow-plan.ts).
    const pacedBytesPerSec = request.bandwidthBytesPerSec ?? followed?.pacedBytesPerSec;
    const pacer = pacedBytesPerSec ? new Pacer(pacedBytesPerSec, this.config.batchBytes) : undefined;
    // A gang's members take turns at their switchovers.
    const gate = strategy === 'gang' && guests.length > 1 ? new SwitchoverGate() : undefined;
    const indexStats: GroupSummary['index'] = [];
    const openGroup = async (members: ProcessGuest[]) => {
      const group = await SourceDedupGroup.open(session, {
        resident: true,
        members: members.map((guest, slot) => ({ slot, pageCount: guest.memoryBytes / guest.pageSizeBytes })),
        pageSizeBytes: GUEST_PAGE_SIZE,
        log: this.log,
      });
      const { locations, memoryBytes } = group.indexStats;
      this.metrics.dedupIndexLocations.inc(locations);
      this.metrics.dedupIndexBytes.inc(memoryBytes);
      return group;
    };
    const closeGroup = (group: SourceDedupGroup | undefined) => {
      if (!group) return;
      const stats = group.indexStats;
      indexStats.push(stats);
      this.metrics.dedupIndexLocations.dec(stats.locations);
      this.metrics.dedupIndexBytes.dec(stats.memoryBytes);
      group.close();
    };
    if (strategy === 'gang') {
      const group = dedup ? await openGroup(precopy) : undefined;
      try {
        const settled = await Promise.allSettled(
          guests.map((guest) => {
            const slot = precopy.indexOf(guest);
            return this.migrateOne(guest, session, request, techniqueOf(guest), group && slot >= 0 ? { group, slot } : undefined, { pacer, gate, reservePriority }, onProgress);
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
          const [result] = await Promise.allSettled([this.migrateOne(guest, session, request, technique, group ? { group, slot: 0 } : undefined, { pacer, reservePriority }, onProgress)]);
          outcomes.push(outcomeOf(guest.name, result!));
        } finally {
          closeGroup(group);
        }
      }
    }
    const summary = summarizeGroup({ strategy, to: request.to }, dedup, this.listenAddress, outcomes, performance.now() - started, indexStats);
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
    guest: ProcessGuest,
    session: PeerSession,
    request: MigrateRequest,
    technique: 'precopy' | 'postcopy' | 'hybrid',
    dedup: { group: SourceDedupGroup; slot: number } | undefined,
    shared: { pacer?: Pacer | undefined; gate?: SwitchoverGate | undefined; reservePriority?: Priority | undefined },
    onProgress: (progress: MigrationProgress) => void,
  ): Promise<MigrationSummary> {
    const migrationId = randomUUID();
    const log = this.log.child({ migrationId, guest: guest.name, to: request.to });
    const startedAt = new Date().toISOString();
    const base = { direction: 'out' as const, migrationId, guest: guest.name, to: request.to, startedAt };
    this.records.set(migrationId, { ...base, state: 'running' });
    let migration: SourceMigration | undefined;
    try {
      migration = new SourceMigration(
        guest,
        session,
        {
          migrationId,
          peerAddress: request.to,
          downtimeBudgetMs: request.downtimeMs,
          maxRounds: request.maxRounds,
          maxWireBytes: request.maxBytesFactor * guest.memoryBytes,
          force: request.force,
          codec: request.codec,
          ...(request.bandwidthBytesPerSec ? { bandwidthBytesPerSec: request.bandwidthBytesPerSec } : {}),
          ...(shared.pacer ? { pacer: shared.pacer } : {}),
          ...(shared.gate ? { gate: shared.gate } : {}),
          tracker: request.tracker ?? this.config.tracker,
          batchBytes: this.config.batchBytes,
          digestBytesPerSec: this.digestBytesPerSec,
          commitTimeoutMs: 30_000,
          metrics: this.metrics,
          ...(dedup ? { dedup } : {}),
          technique,
          ...(request.postcopyAfterRounds ? { hybrid: { postcopyAfterRounds: request.postcopyAfterRounds } } : {}),
          reconnect: () => this.sessionsOut.session(request.to),
          registry: this.registry,
          ...(shared.reservePriority ? { reservePriority: shared.reservePriority } : {}),
          ...this.faults,
          reconnectWindowMs: this.config.postcopyReattachMs,
        },
        log,
      );
      this.outgoing.set(migrationId, migration);
      migration.on('progress', (progress: MigrationProgress) => {
        this.records.set(migrationId, { ...base, state: 'running', progress });
        onProgress(progress);
      });
      log.info({ downtimeMs: request.downtimeMs, codec: request.codec, dedup: dedup !== undefined, technique }, 'migration started');
      this.metrics.migrationsActive.inc({ direction: 'out' });
      const summary = await migration.run().finally(() => this.metrics.migrationsActive.dec({ direction: 'out' }));
      summary.from = this.listenAddress;
      this.metrics.migrations.inc({ direction: 'out', outcome: 'committed', technique: summary.technique });
      this.metrics.downtime.observe({ technique: summary.technique }, summary.downtimeMs / 1000);
      this.metrics.totalTime.observe(summary.totalMs / 1000);
      this.metrics.linkRate.set({ peer: request.to }, summary.linkRateBytesPerSec);
      this.registry.remove(guest.name);
      this.records.set(migrationId, { ...base, state: 'committed', summary });
      return summary;
    } catch (err) {
      const error = err instanceof GangwayError ? err : new GangwayError(ErrorCode.INTERNAL, String(err));
      const state = migration?.phase === 'in-doubt' ? 'in-doubt' : migration?.phase === 'interrupted' ? 'interrupted' : 'failed';
      // Once this migration is out of the books (finally, below), find out where the guest runs.
      if (state === 'in-doubt') setImmediate(() => void this.resolveOutgoing(guest.name));
      this.metrics.migrations.inc({ direction: 'out', outcome: state, technique });
      this.records.set(migrationId, { ...base, state, error: { code: error.code, message: error.message } });
      throw error;
    } finally {
      this.outgoing.delete(migrationId);
      this.records.trim();
    }
  }

  /**
   * The plan for migrating `guests` to the agent at `to` (gangway plan): each guest's
   * technique, strategy, order and reserved rate with the planner's reasons, from this
   * agent's traffic and the destination's (asked over the peer session). Migrates nothing.
   */
  async planFor(guests: string[], priority: Priority | undefined, to: string): Promise<MigrationPlan> {
    if (new Set(guests).size !== guests.length) throw new GangwayError(ErrorCode.BAD_REQUEST, `a guest is named twice in ${guests.join(' ')}`);
    for (const name of guests) this.registry.get(name);
    if (to === this.listenAddress) throw new GangwayError(ErrorCode.BAD_REQUEST, `--to ${to} is this agent itself`);
    const session = await this.sessionsOut.session(to);
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
    return this.traffic.plan(guests, priority, destination);
  }

  /** Cancels an outgoing migration by id or unique id prefix; its guest keeps running here. */
  cancelMigration(idOrPrefix: string): string {
    const matches = [...this.outgoing.entries()].filter(([id]) => id.startsWith(idOrPrefix));
    if (matches.length === 0 || idOrPrefix.length === 0) {
      const known = this.records.get(idOrPrefix) ?? [...this.records.values()].find((r) => r.migrationId.startsWith(idOrPrefix));
      throw new GangwayError(
        ErrorCode.BAD_REQUEST,
        known
          ? `migration ${known.migrationId} is ${known.direction === 'in' ? 'incoming: cancel it on the source agent' : known.state}`
          : `no running outgoing migration has id ${idOrPrefix} (see gangway status)`,
      );
    }
    if (matches.length > 1) {
      throw new GangwayError(ErrorCode.BAD_REQUEST, `id prefix ${idOrPrefix} matches ${matches.length} migrations: give more of it`);
    }
    const [id, migration] = matches[0]!;
    migration.cancel();
    this.log.info({ migrationId: id }, 'migration cancelled');
    return id;
  }

  // ── shutdown ──────────────────────────────────────────────────────────────────────
  /** Refuses new work, lets running migrations finish for the grace period, then closes. */
  async stop(): Promise<void> {
    if (this.shuttingDown) return;
    this.shuttingDown = true;
    this.log.info({ running: this.outgoing.size + this.inbound.count }, 'shutting down');
    const deadline = Date.now() + this.config.shutdownGraceMs;
    while (this.outgoing.size + this.inbound.count > 0 && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    // A post-copy arriving here cannot be handed over: its guest runs here and the fault
    // reader is this process. Closing would leave the guest waiting for pages nobody can
    // install, so those are waited for (systemd's stop timeout still applies).
    const postcopyDeadline = Date.now() + this.config.postcopyReattachMs;
    if (this.inbound.postcopyCount > 0) this.log.warn({ migrations: this.inbound.postcopyCount }, 'waiting for post-copy migrations arriving here to complete');
    while (this.inbound.postcopyCount > 0 && Date.now() < postcopyDeadline) await new Promise((resolve) => setTimeout(resolve, 50));
    // Whatever still runs is aborted by closing its session: sources resume their guests (a
    // post-copy leaving from here is carried on by this agent's next start).
    await this.sessionsOut.closeAll();
    this.peerServer.closeSessions();
    while (this.outgoing.size > 0 && Date.now() < deadline + 5_000) {
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    await this.peerServer.close();
    // The accounting chain and the shaper go with the agent.
    await this.traffic?.stop();
    this.log.info('agent stopped');
  }
}

/** True if something answers on the control socket (another agent owns this state dir). */
export function controlSocketInUse(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    if (!existsSync(path)) return resolve(false);
    const socket = connect(path);
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}
