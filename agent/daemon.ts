// The agent: one per host. Listens for peer agents (WebSocket sessions carrying
// migrations), serves the local control API to the CLI over a unix socket in the state
// dir, keeps the guest registry, and runs migrations in both directions.
//
// This file builds the agent from its parts in agent/daemon/ (peer port, outgoing session
// pool, inbound and outbound migrations, guest service, migration records), wires them to
// each other, and owns what belongs to the whole: its id, start, stop and status.
import type { OptionSummary } from './planner/choose.js';
import { randomBytes } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { DEFAULT_MAX_PAYLOAD_BYTES } from '../protocol/limits.js';
import { RejectReason } from '../protocol/codes.js';
import { Frame } from '../protocol/index.js';
import { CONFIG_DEFAULTS, DEDUP_POLICY_DEFAULTS, MIGRATION_LIMIT_DEFAULTS, PEER_LIMIT_DEFAULTS, resolveTrafficConfig, type DedupPolicy, type MigrationLimits, type PeerLimits, type TrafficConfig } from './config.js';
import { GuestService } from './daemon/guests.js';
import { InboundMigrations } from './daemon/inbound.js';
import { OutboundMigrations, type DecideRequest, type MigrateRequest, type PostcopyAnswer, type SettingsAnswer } from './daemon/outbound.js';
import type { SettingsChange } from './migration/mid-flight.js';
import { planAnswer, type PlanAnswer } from './planner/plan-answer.js';
import { HostDrain, type DrainEvent, type DrainRequest, type DrainSummary } from './daemon/drain.js';
import { PeerServer } from './daemon/peer-server.js';
import { MigrationRecords } from './daemon/records.js';
import { EventBus } from './daemon/events.js';
import { MigrationHistory } from './daemon/history.js';
import { recordHooks } from './daemon/observe.js';
import { SessionPool } from './daemon/session-pool.js';
import type { ProcessGuestSpec, TrackerPreference } from './guest/process-guest.js';
import { launcherTable } from './guest/kinds.js';
import { DEFAULT_QEMU_SETTINGS, type QemuSettings } from './guest/qemu-guest.js';
import { GuestRegistry, UNREADABLE_RECORD_ADVICE } from './guest/registry.js';
import type { Logger } from './log.js';
import { AgentMetrics } from './metrics.js';
import { faultsFromEnv } from './migration/faults.js';
import type { GroupSummary } from './migration/group-summary.js';
import type { MigrationProgress } from './migration/source.js';
import { warmUpSwitchover } from './migration/warmup.js';
import { loadNative } from './native.js';
import { agentIdOf } from './peer/allowlist.js';
import { DEFAULT_DEAD_AFTER_MS } from './peer/session.js';
import { loadTlsMaterial, type PeerTransport, type TlsMaterial } from './peer/tls.js';
import type { MigrationPlan } from './planner/plan-for.js';
import type { Priority } from './planner/planner.js';
import { TrafficService } from './traffic/service.js';
import { GANGWAY_VERSION, PROTOCOL_VERSION } from './version.js';

/**
 * What this agent offers in its hello; a feature is used when both sides list it. 'postcopy'
 * only where the guest's memory can take userfaultfd.
 */
const AGENT_FEATURES = ['lz4', 'precopy', 'dedup', 'dedup-committed', 'repair', 'traffic', 'channels', 'standby-ready', ...(loadNative().uffdProbe() ? ['postcopy'] : [])];

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
  /** How many migrations may leave this host at once (the others wait their turn). */
  migration: MigrationLimits;
  /** Whose resident guests a peer's dedup group may see, and how often. */
  dedup: DedupPolicy;
  /** QEMU and the kernels its VMs boot. */
  vm: QemuSettings;
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
  migration: MIGRATION_LIMIT_DEFAULTS,
  dedup: DEDUP_POLICY_DEFAULTS,
  vm: DEFAULT_QEMU_SETTINGS,
};

export type { MigrationRecord } from './daemon/records.js';
export { resolveTechnique, type MigrateRequest } from './daemon/outbound.js';

export function controlSocketPath(stateDir: string): string {
  return join(stateDir, 'control.sock');
}

export class Agent {
  readonly id: string;
  readonly registry: GuestRegistry;
  readonly metrics = new AgentMetrics();
  /** The traffic monitor and shaper; created by start() once the peer port is known. */
  traffic!: TrafficService;
  listenAddress = '';
  /** Where /metrics is served, once it is. */
  metricsAddress: string | undefined;
  /** The loopback TCP control port (HOST:PORT), when control.listen is set. */
  controlAddress: string | undefined;
  /** Loaded at start when the transport is TLS. */
  private readonly tls: TlsMaterial | undefined;
  /** Fault injection for end-to-end tests (GANGWAY_FAULT_*), read once. */
  private readonly faults: ReturnType<typeof faultsFromEnv>;
  private shuttingDown = false;
  private digestBytesPerSec = 8e9;
  private readonly startedAt = Date.now();
  /** What `gangway events` streams. */
  readonly events = new EventBus();
  /** Ended migrations, kept in the state dir across restarts. */
  readonly history: MigrationHistory;
  private readonly records: MigrationRecords;
  private readonly sessionsOut: SessionPool;
  private readonly peerServer: PeerServer;
  private readonly inbound: InboundMigrations;
  private readonly outbound: OutboundMigrations;
  private readonly guests: GuestService;
  private readonly drain: HostDrain;

  /** The port of listenAddress (the one picked when listenPort was 0). */
  private get peerPort(): number {
    return Number(this.listenAddress.slice(this.listenAddress.lastIndexOf(':') + 1));
  }

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
    this.registry = new GuestRegistry(config.stateDir, log);
    this.history = new MigrationHistory(config.stateDir);
    this.records = new MigrationRecords(recordHooks(this.events, this.history, log));
    // The parts read what start() sets up later (the peer port, the traffic service, the
    // digest rate) and each other's state through functions, called when they need it.
    this.sessionsOut = new SessionPool({ tls: this.tls, log, sessionOptions: (sessionLog) => this.sessionOptions(sessionLog) });
    this.inbound = new InboundMigrations({
      config,
      registry: this.registry,
      launchers: launcherTable(config.vm, log),
      log,
      metrics: this.metrics,
      records: this.records,
      accepting: () => !this.shuttingDown,
      isMigrating: (name) => this.outbound.isMigrating(name),
      peerPort: () => this.peerPort,
      traffic: () => this.traffic,
      onLimit: (limit) => this.limitHit(limit),
    });
    this.outbound = new OutboundMigrations({
      config,
      agentId: this.id,
      registry: this.registry,
      log,
      metrics: this.metrics,
      records: this.records,
      sessions: this.sessionsOut,
      faults: this.faults,
      listenAddress: () => this.listenAddress,
      digestBytesPerSec: () => this.digestBytesPerSec,
      shuttingDown: () => this.shuttingDown,
      channels: () => (config.migration.channels > 0 ? { count: config.migration.channels, tls: this.tls ? { cert: this.tls.cert, key: this.tls.key, ca: this.tls.ca } : undefined } : undefined),
      traffic: () => this.traffic,
      history: () => this.history.list(),
    });
    this.guests = new GuestService({
      config,
      registry: this.registry,
      log,
      shuttingDown: () => this.shuttingDown,
      isMigrating: (name) => this.outbound.isMigrating(name),
      outgoingOf: (name) => this.outbound.outgoingOf(name),
      incomingMissingPages: (migrationId) => this.inbound.missingPages(migrationId),
    });
    this.drain = new HostDrain({ registry: this.registry, outbound: this.outbound, maxParallelOutbound: config.migration.maxParallelOutbound, log });
    this.peerServer = new PeerServer({
      config,
      tls: this.tls,
      log,
      sessionOptions: (sessionLog) => this.sessionOptions(sessionLog),
      onLimit: (limit) => this.limitHit(limit),
      routes: {
        onOffer: (offer, session, shared) => {
          // A host being drained takes no guests: the source is told why (busy, as at a limit).
          const draining = this.drain.refusal();
          if (draining) return void session.send(Frame.reject({ migrationId: offer.migrationId, reason: RejectReason.busy, message: draining }));
          this.inbound.onOffer(offer, session, shared);
        },
        onGroupFrame: (frame, session, groups) => this.inbound.onGroupFrame(frame, session, groups),
        onReattach: (frame, session) => this.inbound.onReattach(frame, session),
        onMigrationQuery: (frame, session) => void this.inbound.answerQuery(frame.migrationId, session),
        onTrafficQuery: () => this.traffic.report(),
        onChannel: (hello, channel) => this.inbound.onChannel(hello, channel),
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
    this.history.load();
    if (this.history.unreadable) {
      this.log.error({ ...this.history.unreadable }, 'the migration history cannot be read: kept under another name, and a new history started');
    }
    const dead = this.registry.load();
    if (dead.length > 0) this.log.warn({ guests: dead }, 'guests in the registry are no longer running; dropped');
    const strays = this.registry.removeStrays();
    if (strays.length > 0) this.log.warn({ files: strays }, 'removed files of the guests directory that no guest owns (a migration in when the agent last stopped, guests no longer running)');
    for (const { file, name, problem } of this.registry.unreadableRecords()) {
      this.log.error({ guest: name, file, problem }, `guest record cannot be read; kept, and guest "${name}" is refused until it is dealt with: ${UNREADABLE_RECORD_ADVICE}`);
    }
    this.calibrateDigest();
    warmUpSwitchover();
    // Guests that were arriving by post-copy: their faults wait for this agent, and their
    // sources reattach as soon as it listens (an unknown migration's reattach is refused).
    for (const { record } of this.registry.list()) if (record.incoming && !record.incoming.stranded) this.inbound.takeBack(record.name);
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
    for (const { record } of this.registry.list()) if (record.outgoing) void this.outbound.resolveOutgoing(record.name);
    // What a migration of a guest made in it and the previous run did not remove (it died):
    // gone before the guest's next migration needs the names.
    for (const { guest, record } of this.registry.list()) {
      if (!guest.removeMigrationLeftovers || record.outgoing) continue;
      void guest.removeMigrationLeftovers().then(
        (removed) => removed.length > 0 && this.log.warn({ guest: guest.name, removed }, 'removed what an earlier migration of this guest left in it'),
        (err: Error) => this.log.warn({ guest: guest.name, err: err.message }, "could not check the guest for an earlier migration's leftovers"),
      );
    }
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
  /** See GuestService.startGuest. */
  async startGuest(name: string, spec: ProcessGuestSpec, tap?: string): Promise<{ name: string; pid: number; memoryPath: string }> {
    this.drain.refuseNewGuest();
    const started = await this.guests.startGuest(name, spec, tap);
    this.events.publish({ type: 'guest-started', guest: name, pid: started.pid });
    return started;
  }

  /** See GuestService.stopGuest. */
  async stopGuest(name: string): Promise<void> {
    await this.guests.stopGuest(name);
    this.events.publish({ type: 'guest-stopped', guest: name });
  }

  /** See GuestService.startVm. */
  async startVm(...args: Parameters<GuestService['startVm']>) {
    this.drain.refuseNewGuest();
    const started = await this.guests.startVm(...args);
    this.events.publish({ type: 'guest-started', guest: args[0], pid: started.pid });
    return started;
  }

  /** Ended migrations, newest first, and the history file if it could not be read at start. */
  migrationHistory() {
    return { entries: [...this.history.list()].reverse(), unreadable: this.history.unreadable ?? null };
  }

  /** See GuestService.resumeGuest. */
  resumeGuest(name: string): Promise<void> {
    return this.guests.resumeGuest(name);
  }

  /** See GuestService.guestStatus. */
  guestStatus() {
    return this.guests.guestStatus();
  }

  /** Whether the agent takes migrations: started and not shutting down (the metrics listener's /readyz). */
  get ready(): boolean {
    return this.listenAddress !== '' && !this.shuttingDown;
  }

  async status() {
    return {
      agent: {
        id: this.id,
        version: GANGWAY_VERSION,
        protocolVersion: PROTOCOL_VERSION,
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
      guests: await this.guests.guestStatus(),
      /** Guest records that could not be read at start: kept on disk, their names refused (see UNREADABLE_RECORD_ADVICE). */
      unreadableRecords: this.registry.unreadableRecords(),
      migrations: this.records.newestFirst(),
    };
  }

  // ── outgoing migrations ───────────────────────────────────────────────────────────
  /** See OutboundMigrations.migrate. */
  migrate(request: MigrateRequest, onProgress: (progress: MigrationProgress) => void, onForecast?: (forecast: OptionSummary) => void): Promise<GroupSummary> {
    return this.outbound.migrate(request, onProgress, onForecast);
  }

  /** What `migrate --technique auto` would run (OutboundMigrations.decide), for gangway plan. */
  async planFor(request: DecideRequest): Promise<PlanAnswer> {
    const { followed, plan } = await this.outbound.decide(request);
    return planAnswer(request.to, followed, plan);
  }

  /** See HostDrain.run. */
  drainHost(request: DrainRequest, onEvent: (event: DrainEvent) => void): Promise<DrainSummary> {
    return this.drain.run(request, onEvent);
  }

  /** See HostDrain.cancel. */
  cancelDrain(): boolean {
    return this.drain.cancel();
  }

  /** See OutboundMigrations.cancelMigration. */
  cancelMigration(idOrPrefix: string): string {
    return this.outbound.cancelMigration(idOrPrefix);
  }

  /** See OutboundMigrations.changeSettings. */
  changeMigrationSettings(idOrPrefix: string, change: SettingsChange): Promise<SettingsAnswer> {
    return this.outbound.changeSettings(idOrPrefix, change);
  }

  /** See OutboundMigrations.startPostcopy. */
  startPostcopy(idOrPrefix: string): PostcopyAnswer {
    return this.outbound.startPostcopy(idOrPrefix);
  }

  // ── shutdown ──────────────────────────────────────────────────────────────────────
  /** Refuses new work, lets running migrations finish for the grace period, then closes. */
  async stop(): Promise<void> {
    if (this.shuttingDown) return;
    this.shuttingDown = true;
    this.log.info({ running: this.outbound.count + this.inbound.count }, 'shutting down');
    const deadline = Date.now() + this.config.shutdownGraceMs;
    while (this.outbound.count + this.inbound.count > 0 && Date.now() < deadline) {
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
    while (this.outbound.count > 0 && Date.now() < deadline + 5_000) {
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
