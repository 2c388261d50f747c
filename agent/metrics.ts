// Prometheus metrics (prom-client), served on a configurable address. Migration counters
// move while a migration runs (per batch), not only when it ends.
import { createServer, type Server } from 'node:http';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { RoundCounters } from './migration/page-sender.js';
import { GANGWAY_VERSION, PROTOCOL_VERSION } from './version.js';
import { relativeError } from './planner/forecast-check.js';

const DURATION_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300];

export class AgentMetrics {
  readonly registry = new Registry();
  readonly migrations = new Counter({
    name: 'gangway_migrations_total',
    help: 'Migrations that ended, by direction, outcome and technique',
    labelNames: ['direction', 'outcome', 'technique'] as const,
    registers: [this.registry],
  });
  readonly migrationsActive = new Gauge({
    name: 'gangway_migrations_active',
    help: 'Migrations running now, by direction',
    labelNames: ['direction'] as const,
    registers: [this.registry],
  });
  readonly bytes = new Counter({
    name: 'gangway_migration_bytes_total',
    help: 'Bytes sent by outgoing migrations, by kind: data (page bytes before compression), zero (page bytes sent as zero runs), compressed (LZ4 payload of compressed batches), wire (frames on the wire)',
    labelNames: ['kind'] as const,
    registers: [this.registry],
  });
  readonly pages = new Counter({
    name: 'gangway_migration_pages_total',
    help: 'Pages sent by outgoing migrations, by kind (data, zero, ref)',
    labelNames: ['kind'] as const,
    registers: [this.registry],
  });
  readonly diskBytes = new Counter({
    name: 'gangway_disk_bytes_total',
    help: "Of gangway_migration_bytes_total, the bytes of VM disks' blocks, by kind: data (block bytes before compression), zero (block bytes sent as zero runs), wire (frames on the wire)",
    labelNames: ['kind'] as const,
    registers: [this.registry],
  });
  readonly diskBlocks = new Counter({
    name: 'gangway_disk_blocks_total',
    help: "Of gangway_migration_pages_total, VM disks' blocks sent by outgoing migrations, by kind (data, zero, ref)",
    labelNames: ['kind'] as const,
    registers: [this.registry],
  });
  readonly receivedBytes = new Counter({
    name: 'gangway_received_bytes_total',
    help: 'Page-frame bytes received by incoming migrations',
    registers: [this.registry],
  });
  readonly rounds = new Counter({
    name: 'gangway_migration_rounds_total',
    help: 'Pre-copy rounds completed (the final round included)',
    registers: [this.registry],
  });
  readonly downtime = new Histogram({
    name: 'gangway_migration_downtime_seconds',
    help: 'Guest downtime of committed migrations (source pause to destination resume), by technique',
    labelNames: ['technique'] as const,
    buckets: [0.001, 0.0025, ...DURATION_BUCKETS],
    registers: [this.registry],
  });
  readonly downtimeOverBudget = new Counter({
    name: 'gangway_migration_downtime_over_budget_total',
    help: 'Committed migrations whose downtime went over their budget (--downtime-ms), by technique',
    labelNames: ['technique'] as const,
    registers: [this.registry],
  });
  readonly postcopyDuration = new Histogram({
    name: 'gangway_postcopy_duration_seconds',
    help: 'Post-copy phase of committed migrations: destination resume to the last missing page',
    buckets: DURATION_BUCKETS,
    registers: [this.registry],
  });
  readonly postcopyPages = new Counter({
    name: 'gangway_postcopy_pages_total',
    help: 'Missing pages installed at a post-copy destination, by how they came: pushed, or fetched on a fault',
    labelNames: ['how'] as const,
    registers: [this.registry],
  });
  readonly postcopyFaults = new Counter({
    name: 'gangway_postcopy_faults_total',
    help: 'Faults of post-copy guests on missing pages (each page asked for once)',
    registers: [this.registry],
  });
  readonly postcopyFaultLatency = new Histogram({
    name: 'gangway_postcopy_fault_latency_seconds',
    help: 'Post-copy fault to installed page, at the destination',
    buckets: [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1],
    registers: [this.registry],
  });
  readonly totalTime = new Histogram({
    name: 'gangway_migration_duration_seconds',
    help: 'Total time of committed migrations',
    buckets: DURATION_BUCKETS,
    registers: [this.registry],
  });
  readonly forecastError = new Histogram({
    name: 'gangway_migration_forecast_error_ratio',
    help: "How far the planner's forecast was off, (forecast - actual) / actual, of committed migrations that had one, by quantity (total_time, downtime) and technique",
    labelNames: ['quantity', 'technique'] as const,
    buckets: [-1, -0.5, -0.2, -0.1, -0.05, 0, 0.05, 0.1, 0.2, 0.5, 1, 2, 5],
    registers: [this.registry],
  });
  readonly forecastErrorLast = new Gauge({
    name: 'gangway_migration_forecast_error_last_ratio',
    help: "The latest committed migration's forecast error, (forecast - actual) / actual, by quantity (total_time, downtime)",
    labelNames: ['quantity'] as const,
    registers: [this.registry],
  });
  readonly dirtyScan = new Histogram({
    name: 'gangway_dirty_scan_seconds',
    help: 'Time of one dirty-page collection, by tracker',
    labelNames: ['tracker'] as const,
    buckets: [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1],
    registers: [this.registry],
  });
  readonly linkRate = new Gauge({
    name: 'gangway_link_rate_bytes_per_second',
    help: 'Link rate measured by the latest outgoing migration, by peer',
    labelNames: ['peer'] as const,
    registers: [this.registry],
  });
  readonly dedupHits = new Counter({
    name: 'gangway_dedup_hits_total',
    help: 'Pages whose content was already at the destination, by kind: intra (same guest, same round), crossRound (an earlier round; includes pages already in place, not sent at all), crossGuest (another guest of the gang), resident (a guest the destination runs)',
    labelNames: ['kind'] as const,
    registers: [this.registry],
  });
  readonly dedupSavedBytes = new Counter({
    name: 'gangway_dedup_saved_bytes_total',
    help: 'Page bytes not sent because the content was already at the destination',
    registers: [this.registry],
  });
  readonly dedupWantedPages = new Counter({
    name: 'gangway_dedup_wanted_pages_total',
    help: 'Pages the destination asked for again: resident content had changed before it was copied',
    registers: [this.registry],
  });
  readonly repairedPages = new Counter({
    name: 'gangway_switchover_repaired_pages_total',
    help: 'Pages sent again at a switchover because the destination held a different version (a write the dirty tracker missed)',
    registers: [this.registry],
  });
  readonly dedupIndexLocations = new Gauge({
    name: 'gangway_dedup_index_locations',
    help: 'Destination pages mirrored by the open dedup groups (their content indexes)',
    registers: [this.registry],
  });
  readonly dedupIndexBytes = new Gauge({
    name: 'gangway_dedup_index_bytes',
    help: 'Memory of the open dedup groups\' content indexes',
    registers: [this.registry],
  });
  readonly dedupResidentOffers = new Counter({
    name: 'gangway_dedup_resident_offers_total',
    help: 'Peers\' requests for resident content (dedupOpen with resident), by outcome: offered, refused-policy (dedup.resident leaves that peer no guest to see), rate-limited (over dedup.residentOffersPerMinute)',
    labelNames: ['outcome'] as const,
    registers: [this.registry],
  });

  readonly trafficRate = new Gauge({
    name: 'gangway_traffic_rate_bytes_per_second',
    help: 'Smoothed traffic rates, by scope (nic: the uplink; migration: the peer port on it; workload: nic less migration; guest: a guest\'s TAP device, as the guest sees it), name (the uplink or the guest) and direction (rx, tx)',
    labelNames: ['scope', 'name', 'direction'] as const,
    registers: [this.registry],
  });
  readonly trafficContention = new Gauge({
    name: 'gangway_traffic_contention_share',
    help: 'Share of the uplink the workload takes in its busier direction (the local contention level\'s measure)',
    registers: [this.registry],
  });
  readonly shaperRate = new Gauge({
    name: 'gangway_shaper_rate_bytes_per_second',
    help: 'The shaper\'s current rates on the uplink, by class (migration: its rate; workload: its ceiling); 0 when not shaping',
    labelNames: ['class'] as const,
    registers: [this.registry],
  });
  readonly controlUnauthorized = new Counter({
    name: 'gangway_control_unauthorized_total',
    help: 'Requests to the TCP control port refused for their bearer token, by reason (missing, wrong)',
    labelNames: ['reason'] as const,
    registers: [this.registry],
  });

  readonly peerLimit = new Counter({
    name: 'gangway_peer_limit_total',
    help: 'Times a peer hit one of the peers.* limits (sessions, incoming, groups, requests, credit, space, handshake, identity) and was refused',
    labelNames: ['limit'] as const,
    registers: [this.registry],
  });

  // One series per outgoing migration while it runs, removed when it ends (migrationEnded):
  // a scrape shows where each one stands without waiting for its summary.
  readonly inFlightRemaining = new Gauge({
    name: 'gangway_migration_remaining_bytes',
    help: 'Outgoing migrations under way: the guest bytes their last pre-copy round left to send (at the start: all of them), by migration_id and guest',
    labelNames: ['migration_id', 'guest'] as const,
    registers: [this.registry],
  });
  readonly inFlightDirtyRate = new Gauge({
    name: 'gangway_migration_dirty_rate_bytes_per_second',
    help: 'Outgoing migrations under way: how fast the guest dirtied its memory during the last pre-copy round, by migration_id and guest',
    labelNames: ['migration_id', 'guest'] as const,
    registers: [this.registry],
  });
  readonly inFlightExpectedDowntime = new Gauge({
    name: 'gangway_migration_expected_downtime_seconds',
    help: 'Outgoing migrations under way: the downtime the convergence policy predicted after the last pre-copy round (it stops when this fits the budget), by migration_id and guest',
    labelNames: ['migration_id', 'guest'] as const,
    registers: [this.registry],
  });

  readonly buildInfo = new Gauge({
    name: 'gangway_build_info',
    help: 'Always 1: the version of this agent, the peer protocol it speaks and the Node.js it runs on, as labels',
    labelNames: ['version', 'protocol', 'node'] as const,
    registers: [this.registry],
  });

  constructor() {
    // prom-client's names already start with process_ and nodejs_: the prefix is ours alone.
    collectDefaultMetrics({ register: this.registry, prefix: 'gangway_' });
    this.buildInfo.set({ version: GANGWAY_VERSION, protocol: String(PROTOCOL_VERSION), node: process.version }, 1);
  }

  /** Batches handed to the link: the difference between two cumulative round counters. */
  batchSent(before: RoundCounters, after: RoundCounters, pageSizeBytes: number, disk = false): void {
    if (disk) {
      this.diskBytes.inc({ kind: 'data' }, after.rawBytes - before.rawBytes);
      this.diskBytes.inc({ kind: 'zero' }, (after.zeroPages - before.zeroPages) * pageSizeBytes);
      this.diskBytes.inc({ kind: 'wire' }, after.wireBytes - before.wireBytes);
      this.diskBlocks.inc({ kind: 'data' }, after.dataPages - before.dataPages);
      this.diskBlocks.inc({ kind: 'zero' }, after.zeroPages - before.zeroPages);
      this.diskBlocks.inc({ kind: 'ref' }, after.refPages - before.refPages);
    }
    this.bytes.inc({ kind: 'data' }, after.rawBytes - before.rawBytes);
    this.bytes.inc({ kind: 'zero' }, (after.zeroPages - before.zeroPages) * pageSizeBytes);
    this.bytes.inc({ kind: 'compressed' }, after.compressedBytes - before.compressedBytes);
    this.bytes.inc({ kind: 'wire' }, after.wireBytes - before.wireBytes);
    this.pages.inc({ kind: 'data' }, after.dataPages - before.dataPages);
    this.pages.inc({ kind: 'zero' }, after.zeroPages - before.zeroPages);
    this.pages.inc({ kind: 'ref' }, after.refPages - before.refPages);
    this.dedupHits.inc({ kind: 'intra' }, after.hitsIntra - before.hitsIntra);
    this.dedupHits.inc({ kind: 'crossRound' }, after.hitsCrossRound - before.hitsCrossRound);
    this.dedupHits.inc({ kind: 'crossGuest' }, after.hitsCrossGuest - before.hitsCrossGuest);
    this.dedupHits.inc({ kind: 'resident' }, after.hitsResident - before.hitsResident);
    this.dedupSavedBytes.inc((after.refPages + after.unchangedPages - before.refPages - before.unchangedPages) * pageSizeBytes);
  }

  /** Where an outgoing migration stands: at its start the bytes to send, after each pre-copy round all three. */
  migrationInFlight(migrationId: string, guest: string, state: { remainingBytes: number; dirtyBytesPerSec?: number; expectedDowntimeMs?: number }): void {
    const labels = { migration_id: migrationId, guest };
    this.inFlightRemaining.set(labels, state.remainingBytes);
    if (state.dirtyBytesPerSec !== undefined) this.inFlightDirtyRate.set(labels, state.dirtyBytesPerSec);
    if (state.expectedDowntimeMs !== undefined) this.inFlightExpectedDowntime.set(labels, state.expectedDowntimeMs / 1000);
  }

  /** A committed migration's forecast against what happened: the error of its total time and of its downtime. */
  forecastChecked(technique: string, forecast: { totalMs: number; downtimeMs: number }, actual: { totalMs: number; downtimeMs: number }): void {
    for (const [quantity, predicted, happened] of [
      ['total_time', forecast.totalMs, actual.totalMs],
      ['downtime', forecast.downtimeMs, actual.downtimeMs],
    ] as const) {
      const error = relativeError(predicted, happened);
      if (error === null) continue;
      this.forecastError.observe({ quantity, technique }, error);
      this.forecastErrorLast.set({ quantity }, error);
    }
  }

  /** The migration ended (whatever its outcome): its series go, or every migration ever run would stay in each scrape. */
  migrationEnded(migrationId: string, guest: string): void {
    const labels = { migration_id: migrationId, guest };
    this.inFlightRemaining.remove(labels);
    this.inFlightDirtyRate.remove(labels);
    this.inFlightExpectedDowntime.remove(labels);
  }

  /**
   * Serves /metrics, and for probes /healthz (the process answers) and /readyz (`ready()`:
   * the agent takes migrations; 503 while it starts or shuts down).
   */
  serve(host: string, port: number, ready: () => boolean = () => true): Promise<Server> {
    const server = createServer((req, res) => {
      if (req.url === '/healthz') {
        res.writeHead(200, { 'content-type': 'text/plain' }).end('ok\n');
        return;
      }
      if (req.url === '/readyz') {
        const isReady = ready();
        res.writeHead(isReady ? 200 : 503, { 'content-type': 'text/plain' }).end(isReady ? 'ready\n' : 'not ready: starting or shutting down\n');
        return;
      }
      if (req.url !== '/metrics') {
        res.writeHead(404).end('metrics are at /metrics (probes: /healthz, /readyz)\n');
        return;
      }
      this.registry.metrics().then(
        (text) => res.writeHead(200, { 'content-type': this.registry.contentType }).end(text),
        (err) => res.writeHead(500).end(String(err)),
      );
    });
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => resolve(server));
    });
  }
}
