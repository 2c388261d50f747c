// The agent's bandwidth control in one place: the traffic monitor, the shaper's controller,
// their metrics, what this agent reports to a peer planning a migration, and plans. The
// daemon starts it after its peer listener is up (the peer port is known then), asks it for
// a hold around each outgoing migration, and stops it on shutdown, which removes everything
// it installed.
import type { TrafficConfig } from '../config.js';
import type { AgentMetrics } from '../metrics.js';
import type { Logger } from '../log.js';
import { DEFAULT_PLANNER_SETTINGS, type PlannerSettings, type Priority, type Reservation } from '../planner/planner.js';
import { planFor, type MeasuredRates, type MigrationPlan } from '../planner/plan-for.js';
import type { TrafficReport } from '../peer/session.js';
import { BandwidthController, type ControllerStatus, type Hold } from './controller.js';
import { runner, type Runner } from './exec.js';
import { TrafficMonitor, type MonitoredGuest, type NicCounters, type TrafficSnapshot } from './monitor.js';
import { IFB_DEVICE, IngressRedirect } from './ingress.js';

export interface TrafficServiceOptions {
  config: TrafficConfig;
  peerPort: number;
  guests: () => readonly MonitoredGuest[];
  log: Logger;
  metrics?: AgentMetrics;
  run?: Runner;
  isRoot?: boolean;
  now?: () => number;
  readNic?: (device: string) => NicCounters | Promise<NicCounters>;
}

export type TrafficStatus = TrafficSnapshot & { shaper: ControllerStatus; inbound: ControllerStatus; priorityDefault: Priority };

export class TrafficService {
  readonly monitor: TrafficMonitor;
  readonly controller: BandwidthController;
  /** The uplink's inbound side (through an ifb device): reservations for incoming migrations. */
  readonly inbound: BandwidthController;
  private readonly ingress: IngressRedirect | undefined;
  private inboundReason: string | null = 'not started';
  private readonly runCommand: Runner;
  readonly settings: PlannerSettings | undefined;

  constructor(private readonly options: TrafficServiceOptions) {
    const { config, log } = options;
    const run = options.run ?? runner();
    const isRoot = options.isRoot ?? process.getuid?.() === 0;
    this.settings =
      config.linkBytesPerSec === undefined
        ? undefined
        : {
            ...DEFAULT_PLANNER_SETTINGS,
            linkBytesPerSec: config.linkBytesPerSec,
            highContention: config.highContention,
            moderateContention: config.moderateContention,
            slaLowerBytesPerSec: config.slaLowerBytesPerSec!,
            slaUpperBytesPerSec: config.slaUpperBytesPerSec!,
          };
    this.monitor = new TrafficMonitor({
      run,
      uplink: config.uplink,
      peerPort: options.peerPort,
      linkBytesPerSec: config.linkBytesPerSec,
      highContention: config.highContention,
      moderateContention: config.moderateContention,
      dominanceRatio: DEFAULT_PLANNER_SETTINGS.dominanceRatio,
      sampleIntervalMs: config.sampleIntervalMs,
      isRoot,
      guests: options.guests,
      warn: (fields, message) => log.warn(fields, message),
      ...(options.now ? { now: options.now } : {}),
      ...(options.readNic ? { readNic: options.readNic } : {}),
    });
    this.controller = new BandwidthController({
      run,
      uplink: config.uplink,
      settings: this.settings,
      isRoot,
      sampleIntervalMs: config.sampleIntervalMs,
      workloadBytesPerSec: () => this.monitor.snapshot().workload?.txBytesPerSec ?? 0,
      log: (fields, message) => log.info(fields, message),
      ...(options.now ? { now: options.now } : {}),
    });
    this.runCommand = run;
    this.ingress = config.uplink !== undefined && isRoot && this.settings ? new IngressRedirect(run, config.uplink) : undefined;
    this.inbound = new BandwidthController({
      run,
      uplink: this.ingress ? IFB_DEVICE : undefined,
      settings: this.settings,
      isRoot,
      sampleIntervalMs: config.sampleIntervalMs,
      workloadBytesPerSec: () => this.monitor.snapshot().workload?.rxBytesPerSec ?? 0,
      log: (fields, message) => log.info({ ...fields, direction: 'inbound' }, message),
      ...(options.now ? { now: options.now } : {}),
      // The redirect goes in only while an incoming migration holds a reservation.
      ...(this.ingress ? { device: { setUp: () => this.ingress!.install(), tearDown: () => this.ingress!.remove() } } : {}),
    });
    if (options.metrics) this.monitor.on('sample', (snapshot: TrafficSnapshot) => this.export(snapshot));
  }

  /** Never throws for missing privileges or tools: status() says what runs and why. */
  async start(options: { timer?: boolean } = {}): Promise<void> {
    await this.monitor.start(options);
    await this.controller.init();
    if (this.ingress && this.controller.available) {
      // The redirect goes in only while an incoming migration holds a reservation; what a
      // crashed run left goes now.
      try {
        if (await IngressRedirect.removeLeftovers(this.runCommand, this.ingress.uplink)) this.options.log.info({ uplink: this.ingress.uplink }, 'removed the ingress redirect a previous run left');
        await this.inbound.init();
        this.inboundReason = this.inbound.available ? null : this.inbound.status().reason;
      } catch (err) {
        this.inboundReason = `inbound shaping is off: ${(err as Error).message}`;
      }
    } else {
      this.inboundReason = this.controller.status().reason ?? 'no uplink';
    }
    const { mode, reason } = this.monitor;
    this.options.log.info({ uplink: this.options.config.uplink ?? null, monitor: mode, monitorReason: reason, shaper: this.controller.available, shaperReason: this.controller.status().reason }, 'bandwidth control');
  }

  /** Removes the accounting chain and the shaper. */
  async stop(): Promise<void> {
    const results = await Promise.allSettled([this.monitor.stop(), this.controller.close(), this.inbound.close()]);
    for (const result of results) {
      if (result.status === 'rejected') this.options.log.warn({ err: (result.reason as Error).message }, 'removing the traffic rules failed');
    }
  }

  status(): TrafficStatus {
    const inbound = this.inbound.status();
    return {
      ...this.monitor.snapshot(),
      shaper: this.controller.status(),
      inbound: { ...inbound, reason: inbound.available ? inbound.reason : (this.inboundReason ?? inbound.reason) },
      priorityDefault: this.options.config.priority,
    };
  }

  /** What a peer planning a migration to or from this host is told (trafficReport). */
  report(): TrafficReport {
    const snapshot = this.monitor.snapshot();
    const link = this.options.config.linkBytesPerSec ?? 0;
    if (!snapshot.workload) {
      return { measured: false, rxBytesPerSec: 0, txBytesPerSec: 0, linkBytesPerSec: link, reason: snapshot.reason ?? 'not sampled yet' };
    }
    return { measured: true, ...snapshot.workload, linkBytesPerSec: link, reason: snapshot.mode === 'full' ? '' : (snapshot.reason ?? '') };
  }

  /** A plan for `guests` (names) at `priority`, with the destination's traffic as its agent reported it. */
  plan(guests: readonly string[], priority: Priority | undefined, destination: MeasuredRates): MigrationPlan {
    const snapshot = this.monitor.snapshot();
    const notMeasured = snapshot.reason ?? 'not sampled yet';
    return planFor({
      guests: guests.map((name) => {
        const measured = snapshot.guests.find((g) => g.name === name);
        return {
          name,
          traffic:
            measured && measured.rxBytesPerSec !== null && measured.txBytesPerSec !== null
              ? { rates: { rxBytesPerSec: measured.rxBytesPerSec, txBytesPerSec: measured.txBytesPerSec } }
              : { rates: undefined, reason: measured?.reason ?? notMeasured },
        };
      }),
      priority: priority ?? this.options.config.priority,
      source: snapshot.workload ? { rates: snapshot.workload } : { rates: undefined, reason: notMeasured },
      destination,
      settings: this.settings,
      dominanceRatio: DEFAULT_PLANNER_SETTINGS.dominanceRatio,
    });
  }

  /**
   * The hook around an outgoing migration to `peerPort`: a manual rate when given, else
   * Algorithm 2 at `priority` (default: traffic.priority). Call stop() on the hold when the
   * migration ends.
   */
  async hold(request: { peerPort: number; bandwidthBytesPerSec?: number | undefined; priority?: Priority | undefined }): Promise<Hold> {
    const hold = await this.controller.start(
      request.bandwidthBytesPerSec !== undefined
        ? { peerPort: request.peerPort, migrationBytesPerSec: request.bandwidthBytesPerSec }
        : { peerPort: request.peerPort, priority: request.priority ?? this.options.config.priority },
    );
    this.exportShaper();
    const stop = hold.stop;
    return { ...hold, stop: () => stop().finally(() => this.exportShaper()) };
  }

  /** gangway migrate-set --bandwidth: see BandwidthController.changeRate. */
  async changeRate(peerPort: number, migrationBytesPerSec: number): Promise<Reservation | undefined> {
    const changed = await this.controller.changeRate(peerPort, migrationBytesPerSec);
    this.exportShaper();
    return changed;
  }

  /**
   * The hook around an incoming migration whose source asked for a reservation at
   * `priority` (its plan): Algorithm 2 on this host's inbound side, the migration arriving
   * on `localPort`. A hold that is not applied says why.
   */
  async holdInbound(request: { localPort: number; priority: Priority }): Promise<Hold> {
    if (!this.ingress || !this.inbound.available) {
      return { applied: false, reservation: undefined, reason: this.inboundReason ?? 'inbound shaping is unavailable', stop: () => Promise.resolve() };
    }
    return this.inbound.start({ peerPort: request.localPort, priority: request.priority });
  }


  private export(snapshot: TrafficSnapshot): void {
    const metrics = this.options.metrics!;
    metrics.trafficRate.reset();
    const set = (scope: string, name: string, rates: { rxBytesPerSec: number | null; txBytesPerSec: number | null } | null) => {
      if (rates?.rxBytesPerSec == null || rates.txBytesPerSec == null) return;
      metrics.trafficRate.set({ scope, name, direction: 'rx' }, rates.rxBytesPerSec);
      metrics.trafficRate.set({ scope, name, direction: 'tx' }, rates.txBytesPerSec);
    };
    const uplink = snapshot.uplink ?? '';
    set('nic', uplink, snapshot.nic);
    set('migration', uplink, snapshot.migration);
    set('workload', uplink, snapshot.workload);
    for (const guest of snapshot.guests) set('guest', guest.name, guest);
    if (snapshot.contention) metrics.trafficContention.set(snapshot.contention.share);
    this.exportShaper();
  }

  private exportShaper(): void {
    const metrics = this.options.metrics;
    if (!metrics) return;
    const active = this.controller.status().active;
    metrics.shaperRate.set({ class: 'migration' }, active?.migrationBytesPerSec ?? 0);
    metrics.shaperRate.set({ class: 'workload' }, active?.workloadCeilBytesPerSec ?? 0);
  }
}
