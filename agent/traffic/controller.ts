// Applies a migration's bandwidth reservation (seed paper 003, Algorithm 2) on the uplink
// through the shaper: the migration class gets the reserved rate, the workload class what
// the reservation leaves it. The migrate path holds the shaper for as long as migrations to
// one peer port run:
//
//   const hold = await controller.start({ peerPort, priority } | { peerPort, migrationBytesPerSec });
//   try { ...migrate... } finally { await hold.stop(); }
//
// High priority squeezes the workload to its SLA lower limit; medium caps it at its upper
// limit and, while the migration runs, gives the migration what the workload stops using
// (every `sampleIntervalMs`, from the classes' own byte counters) but never pushes the
// workload below its lower limit; low takes only what is free. A manual rate (--bandwidth)
// is applied as is, the workload keeping the rest.
//
// Without root, tc or an uplink the controller is unavailable and says why; the caller's
// token-bucket pacer then enforces a manual rate. One peer port is shaped at a time (the u32
// filter matches one port); a migration to another port while one runs is not shaped, and
// its hold says so.
import type { Runner } from './exec.js';
import { Shaper, type ShaperConfig } from './shaper.js';
import { SmoothedRate, rateBetween } from './parse.js';
import { guardedReservation } from '../planner/plan-for.js';
import { rebalanceMedium, type PlannerSettings, type Priority, type Reservation } from '../planner/planner.js';

export type ReservationRequest =
  | { peerPort: number; priority: Priority; migrationBytesPerSec?: undefined }
  | { peerPort: number; migrationBytesPerSec: number; priority?: undefined };

export interface Hold {
  /** Whether the shaper applies this reservation (false: not available, or busy with another port). */
  applied: boolean;
  reservation: Reservation | undefined;
  reason: string;
  stop(): Promise<void>;
}

export interface ControllerOptions {
  run: Runner;
  uplink: string | undefined;
  /** Planner settings (link capacity, SLA limits); undefined without a link capacity. */
  settings: PlannerSettings | undefined;
  isRoot: boolean;
  sampleIntervalMs: number;
  /** The workload's measured outbound rate when a reservation starts (the monitor's). */
  workloadBytesPerSec: () => number;
  /**
   * What the shaped device needs around a reservation: `setUp` before the first hold's
   * shaper goes in (e.g. the ingress redirect to an ifb device), `tearDown` after the last
   * one's comes out.
   */
  device?: { setUp(): Promise<void>; tearDown(): Promise<void> };
  now?: () => number;
  log?: (fields: Record<string, unknown>, message: string) => void;
}

export interface ControllerStatus {
  available: boolean;
  reason: string | null;
  active: {
    peerPort: number;
    priority: Priority | 'manual';
    migrationBytesPerSec: number;
    workloadRateBytesPerSec: number;
    workloadCeilBytesPerSec: number;
    holders: number;
    reasons: string[];
    /** Measured on the uplink's classes (smoothed), once sampled. */
    measured: { migrationBytesPerSec: number; workloadBytesPerSec: number } | null;
  } | null;
}

/** A class never gets less than this share of the link, so HTB always has a valid rate. */
const MIN_CLASS_SHARE = 0.01;
const MIN_CLASS_BITS_PER_SEC = 8_000;

interface Active {
  peerPort: number;
  priority: Priority | 'manual';
  reservation: Reservation;
  config: ShaperConfig;
  holders: number;
  reasons: string[];
  lastStats: { atMs: number; migration: number; workload: number } | undefined;
  measuredMigration: SmoothedRate;
  measuredWorkload: SmoothedRate;
  sampled: boolean;
  timer: NodeJS.Timeout | undefined;
}

export class BandwidthController {
  private shaper: Shaper | undefined;
  private unavailable: string | null = 'not initialised';
  private active: Active | undefined;
  /** Shaper commands run one at a time. */
  private queue: Promise<unknown> = Promise.resolve();
  private readonly now: () => number;

  constructor(private readonly options: ControllerOptions) {
    this.now = options.now ?? (() => performance.now());
  }

  /** Finds out whether the uplink can be shaped and removes a qdisc a crashed run left there. */
  async init(): Promise<void> {
    const { uplink, settings, isRoot, run } = this.options;
    if (uplink === undefined) return this.disable("no uplink is configured ('traffic.uplink')");
    if (!settings) return this.disable("the uplink's capacity is not configured ('traffic.linkCapacity')");
    if (!isRoot) return this.disable('not running as root: tc needs root, so a manual --bandwidth is enforced by the sender\'s pacer and plans are not applied');
    try {
      await run('tc', ['-V']);
      const removed = await Shaper.removeLeftovers(run, uplink);
      if (removed) this.options.log?.({ uplink }, 'removed the shaper a previous run left on the uplink');
      this.shaper = new Shaper(run, uplink);
      this.unavailable = null;
    } catch (err) {
      this.disable(`tc is unavailable: ${(err as Error).message}`);
    }
  }

  private disable(reason: string): void {
    this.unavailable = reason;
    this.shaper = undefined;
  }

  get available(): boolean {
    return this.shaper !== undefined;
  }

  /** Algorithm 2's reservation for `priority` at the workload's current rate (no shaping). */
  reservationFor(priority: Priority): Reservation | undefined {
    const settings = this.options.settings;
    return settings ? guardedReservation(priority, this.options.workloadBytesPerSec(), settings) : undefined;
  }

  /** Applies a reservation for a migration to `peerPort`; the hold's stop() releases it. */
  start(request: ReservationRequest): Promise<Hold> {
    return this.serial(async () => {
      const settings = this.options.settings;
      const notApplied = (reason: string, reservation?: Reservation): Hold => ({ applied: false, reservation, reason, stop: () => Promise.resolve() });
      if (!this.shaper || !settings) return notApplied(this.unavailable ?? 'the shaper is unavailable');
      if (this.active) {
        if (this.active.peerPort !== request.peerPort) {
          return notApplied(`the shaper already shapes migrations to port ${this.active.peerPort}; this one (port ${request.peerPort}) is not shaped`);
        }
        this.active.holders++;
        return this.holdOf(this.active, 'joined the running reservation');
      }
      const reservation = request.migrationBytesPerSec !== undefined
        ? manualReservation(request.migrationBytesPerSec, settings.linkBytesPerSec)
        : guardedReservation(request.priority, this.options.workloadBytesPerSec(), settings);
      const manual = request.migrationBytesPerSec !== undefined;
      const config = shaperConfig(reservation, settings.linkBytesPerSec, request.peerPort, manual ? 0 : settings.slaLowerBytesPerSec, { borrow: !manual });
      if (this.options.device) {
        try {
          await this.options.device.setUp();
        } catch (err) {
          return notApplied(`the device cannot be shaped: ${(err as Error).message}`, reservation);
        }
      }
      await this.shaper.install(config).catch(async (err: unknown) => {
        await this.options.device?.tearDown().catch(() => {});
        throw err;
      });
      const active: Active = {
        peerPort: request.peerPort,
        priority: request.priority ?? 'manual',
        reservation,
        config,
        holders: 1,
        reasons: [reservation.reason],
        lastStats: undefined,
        measuredMigration: new SmoothedRate(),
        measuredWorkload: new SmoothedRate(),
        sampled: false,
        timer: undefined,
      };
      this.active = active;
      this.options.log?.({ peerPort: request.peerPort, priority: active.priority, migrationBytesPerSec: reservation.migrationBytesPerSec, workloadCapBytesPerSec: reservation.workloadCapBytesPerSec }, 'bandwidth reserved');
      if (active.priority === 'medium') {
        active.timer = setInterval(() => void this.tick().catch((err: Error) => this.options.log?.({ err: err.message }, 'bandwidth rebalance failed')), this.options.sampleIntervalMs);
        active.timer.unref();
      }
      return this.holdOf(active, reservation.reason);
    });
  }

  private holdOf(active: Active, reason: string): Hold {
    let stopped = false;
    return {
      applied: true,
      reservation: active.reservation,
      reason,
      stop: () => {
        if (stopped) return Promise.resolve();
        stopped = true;
        return this.release(active);
      },
    };
  }

  private release(active: Active): Promise<void> {
    return this.serial(async () => {
      if (this.active !== active || --active.holders > 0) return;
      if (active.timer) clearInterval(active.timer);
      this.active = undefined;
      await this.shaper?.remove();
      await this.options.device?.tearDown();
      this.options.log?.({ peerPort: active.peerPort }, 'bandwidth reservation released');
    });
  }

  /**
   * One step of Algorithm 2's loop for medium priority (lines 20-28): measure both classes
   * on the uplink and give the migration what the workload no longer uses. Returns the new
   * reservation when it changed. The timer calls it every sample interval; tests call it.
   */
  tick(): Promise<Reservation | undefined> {
    return this.serial(async () => {
      const active = this.active;
      const settings = this.options.settings;
      if (!active || !this.shaper || !settings) return undefined;
      const stats = await this.shaper.stats();
      const atMs = this.now();
      const last = active.lastStats;
      active.lastStats = { atMs, migration: stats.migration.sentBytes, workload: stats.workload.sentBytes };
      if (!last || atMs <= last.atMs) return undefined;
      active.measuredMigration.add(rateBetween(last.migration, stats.migration.sentBytes, atMs - last.atMs));
      active.measuredWorkload.add(rateBetween(last.workload, stats.workload.sentBytes, atMs - last.atMs));
      active.sampled = true;
      if (active.priority !== 'medium') return undefined;
      const next = rebalanceMedium(
        active.reservation,
        { migrationBytesPerSec: active.measuredMigration.current, workloadBytesPerSec: active.measuredWorkload.current },
        settings,
      );
      if (!next) return undefined;
      const config = shaperConfig(next, settings.linkBytesPerSec, active.peerPort, settings.slaLowerBytesPerSec, { borrow: true });
      if (config.migration.rateBitsPerSec <= active.config.migration.rateBitsPerSec) return undefined;
      // The workload shrinks first, so the two rates never add up to more than the link.
      await this.shaper.change('workload', config.workload.rateBitsPerSec, config.workload.ceilBitsPerSec);
      await this.shaper.change('migration', config.migration.rateBitsPerSec, config.migration.ceilBitsPerSec);
      active.reservation = next;
      active.config = config;
      active.reasons.push(next.reason);
      this.options.log?.({ migrationBytesPerSec: next.migrationBytesPerSec, workloadCapBytesPerSec: next.workloadCapBytesPerSec }, 'bandwidth rebalanced');
      return next;
    });
  }

  /**
   * gangway migrate-set --bandwidth: the running reservation for `peerPort` becomes the manual
   * rate a --bandwidth would have made (Algorithm 2's rebalancing stops for it), its classes
   * resized in place, the side that shrinks first so the two never add up to more than the
   * link. Every migration to that port shares the class. Undefined when no reservation is
   * active for the port.
   */
  changeRate(peerPort: number, migrationBytesPerSec: number): Promise<Reservation | undefined> {
    return this.serial(async () => {
      const active = this.active;
      const settings = this.options.settings;
      if (!active || !this.shaper || !settings || active.peerPort !== peerPort) return undefined;
      const reservation = manualReservation(migrationBytesPerSec, settings.linkBytesPerSec);
      const config = shaperConfig(reservation, settings.linkBytesPerSec, peerPort, 0, { borrow: false });
      const order: ('workload' | 'migration')[] = config.migration.rateBitsPerSec > active.config.migration.rateBitsPerSec ? ['workload', 'migration'] : ['migration', 'workload'];
      for (const name of order) await this.shaper.change(name, config[name].rateBitsPerSec, config[name].ceilBitsPerSec);
      active.priority = 'manual';
      active.reservation = reservation;
      active.config = config;
      active.reasons.push(`changed mid-flight: ${reservation.reason}`);
      this.options.log?.({ peerPort, migrationBytesPerSec: reservation.migrationBytesPerSec }, 'bandwidth reservation changed');
      return reservation;
    });
  }

  status(): ControllerStatus {
    const active = this.active;
    return {
      available: this.shaper !== undefined,
      reason: this.unavailable,
      active: active
        ? {
            peerPort: active.peerPort,
            priority: active.priority,
            migrationBytesPerSec: active.config.migration.rateBitsPerSec / 8,
            workloadRateBytesPerSec: active.config.workload.rateBitsPerSec / 8,
            workloadCeilBytesPerSec: active.config.workload.ceilBitsPerSec / 8,
            holders: active.holders,
            reasons: [...active.reasons],
            measured: active.sampled ? { migrationBytesPerSec: active.measuredMigration.current, workloadBytesPerSec: active.measuredWorkload.current } : null,
          }
        : null,
    };
  }

  /** Removes the shaper whatever holds it (agent shutdown). */
  close(): Promise<void> {
    return this.serial(async () => {
      const active = this.active;
      if (active?.timer) clearInterval(active.timer);
      this.active = undefined;
      if (this.shaper) await this.shaper.remove();
      await this.options.device?.tearDown();
    });
  }

  private serial<T>(task: () => Promise<T>): Promise<T> {
    const next = this.queue.then(task, task);
    this.queue = next.catch(() => {});
    return next;
  }
}

function manualReservation(migrationBytesPerSec: number, linkBytesPerSec: number): Reservation {
  const capped = Math.min(migrationBytesPerSec, linkBytesPerSec);
  return {
    migrationBytesPerSec: capped,
    workloadCapBytesPerSec: undefined,
    reason: capped < migrationBytesPerSec
      ? `--bandwidth ${migrationBytesPerSec} bytes/s is above the link's ${linkBytesPerSec}: the migration gets the link, the workload what it does not use`
      : `--bandwidth: the migration gets ${capped} bytes/s, the workload the rest of the link`,
  };
}

/**
 * The HTB classes for a reservation. A manual rate (--bandwidth) is also the migration's
 * ceiling: it never takes more. A planned reservation (`borrow`) may borrow up to the link
 * what the workload leaves idle: HTB serves every class its own rate before it lends, so a
 * workload that picks up still gets the rate reserved for it, and an idle link is not left
 * idle (measured in bench:contention: a 1 Gbit/s link without traffic took 29% longer with
 * the ceiling at the reservation). A capped workload is held to its cap, an uncapped one is guaranteed
 * the rest of the link (at least its SLA lower limit, `slaLowerBytesPerSec`; 0 for a manual
 * --bandwidth, which the operator chose) and may borrow what the migration leaves unused. Each class keeps at
 * least MIN_CLASS_SHARE of the link, so a reservation of the whole link still leaves HTB a
 * valid rate for the other.
 */
export function shaperConfig(reservation: Reservation, linkBytesPerSec: number, peerPort: number, slaLowerBytesPerSec = 0, options: { borrow?: boolean } = {}): ShaperConfig {
  const linkBits = Math.round(linkBytesPerSec * 8);
  const minBits = Math.max(MIN_CLASS_BITS_PER_SEC, Math.ceil(linkBits * MIN_CLASS_SHARE));
  const clamp = (bits: number) => Math.min(Math.max(Math.round(bits), minBits), linkBits - minBits);
  // The workload's guaranteed rate is never below its SLA lower limit, even when it was idle
  // when the reservation was made: a workload that starts later still gets its floor.
  const migrationBits = Math.min(clamp(reservation.migrationBytesPerSec * 8), clamp(linkBits - slaLowerBytesPerSec * 8));
  const rest = linkBits - migrationBits;
  const workloadCeil = reservation.workloadCapBytesPerSec === undefined ? linkBits : clamp(reservation.workloadCapBytesPerSec * 8);
  return {
    linkBitsPerSec: linkBits,
    migration: { rateBitsPerSec: migrationBits, ceilBitsPerSec: options.borrow ? linkBits : migrationBits, port: peerPort, direction: 'dport' },
    workload: { rateBitsPerSec: Math.min(rest, workloadCeil), ceilBitsPerSec: workloadCeil },
  };
}
