// A migration plan for named guests from what the two agents measured: Algorithm 1 (per
// guest technique, strategy and order) and Algorithm 2 (the reservation) joined, with the
// assumptions made where a measurement is missing. Pure: `gangway plan` and the migrate path
// both call it with the monitor's numbers.
//
// Reserved rates per guest: the guests of one plan share one priority, so Algorithm 2 makes
// one reservation; guests that migrate in parallel split it evenly, a guest that migrates
// serially has all of it while it runs.
import {
  planMigration,
  reserveBandwidth,
  type Contention,
  type Direction,
  type PlannedTechnique,
  type PlannerSettings,
  type Priority,
  type Rates,
  type Reservation,
  type Scenario,
  type Strategy,
} from './planner.js';
import type { PlanForecast } from './choose.js';

export interface MeasuredRates {
  /** undefined: not measured; `reason` says why. */
  rates: Rates | undefined;
  reason?: string;
}

export interface PlanForInput {
  guests: { name: string; traffic: MeasuredRates }[];
  priority: Priority;
  /** This host's workload (its uplink traffic less migrations). */
  source: MeasuredRates;
  /** The destination's, as its agent reported it. */
  destination: MeasuredRates;
  /** undefined when the uplink's capacity is not configured: no contention share, no reservation. */
  settings: PlannerSettings | undefined;
  /** Settings that hold without a link capacity (dominance ratio). */
  dominanceRatio: number;
}

export interface GuestMigrationPlan {
  name: string;
  priority: Priority;
  direction: Direction;
  technique: PlannedTechnique;
  strategy: Strategy;
  order: number;
  /** The migration's share of the reservation while this guest moves; null without a link capacity. */
  reservedBytesPerSec: number | null;
  /** The cap on the workload while it moves; null: left alone (or no link capacity). */
  workloadCapBytesPerSec: number | null;
  reasons: string[];
}

export interface MigrationPlan {
  priority: Priority;
  scenario: Scenario;
  contention: Contention;
  contentionShare: number | null;
  reservation: { migrationBytesPerSec: number; workloadCapBytesPerSec: number | null; reason: string } | null;
  /**
   * Algorithm 2 on the destination's inbound side, as the destination applies it to a
   * migration that follows this plan (it reserves at the plan's priority, inbound.ts); taken
   * with this host's link settings. null without a link capacity or the destination's traffic.
   */
  destinationReservation: { migrationBytesPerSec: number; workloadCapBytesPerSec: number | null; reason: string } | null;
  guests: GuestMigrationPlan[];
  reasons: string[];
  /** What was taken as given because it was not measured. */
  assumptions: string[];
  /** The traffic the plan was made from: the source's workload and the destination's; null: not measured. */
  sourceRates: Rates | null;
  destinationRates: Rates | null;
  /** Every option's forecast and the choice (choose.ts); absent until the forecast is made. */
  forecast?: PlanForecast;
}

const IDLE: Rates = { rxBytesPerSec: 0, txBytesPerSec: 0 };

/** A reservation as the plan carries it (null: none). */
function planned(r: ReturnType<typeof guardedReservation> | undefined): MigrationPlan['reservation'] {
  return r ? { migrationBytesPerSec: r.migrationBytesPerSec, workloadCapBytesPerSec: r.workloadCapBytesPerSec ?? null, reason: r.reason } : null;
}

export function planFor(input: PlanForInput): MigrationPlan {
  const assumptions: string[] = [];
  const known = (what: string, measured: MeasuredRates): Rates => {
    if (measured.rates) return measured.rates;
    assumptions.push(`${what}: not measured (${measured.reason ?? 'no reason given'}); taken as idle`);
    return IDLE;
  };
  const source = known('the source host', input.source);
  const destination = known('the destination host', input.destination);
  const guests = input.guests.map((guest) => ({ name: guest.name, priority: input.priority, traffic: known(`guest ${guest.name}`, guest.traffic) }));
  if (!input.settings) {
    assumptions.push("the uplink's capacity is not configured ('traffic.linkCapacity'): contention is taken as low and no bandwidth is reserved");
  }
  // Without a capacity, an infinite link makes every share 0: low contention.
  const settings: PlannerSettings = input.settings ?? {
    linkBytesPerSec: Number.POSITIVE_INFINITY,
    highContention: 1,
    moderateContention: 1,
    dominanceRatio: input.dominanceRatio,
    slaLowerBytesPerSec: 0,
    slaUpperBytesPerSec: 0,
    saturatedShare: 1,
    minMigrationShare: 0,
  };
  const plan = planMigration(guests, { source, destination }, settings);
  // The source's outbound workload competes with the migration on the source's uplink.
  const reservation = input.settings ? guardedReservation(input.priority, source.txBytesPerSec, input.settings) : undefined;
  // The destination's inbound workload competes with it there; the destination reserves too.
  const atDestination = input.settings && input.destination.rates ? guardedReservation(input.priority, input.destination.rates.rxBytesPerSec, input.settings) : undefined;
  const parallel = plan.guests.filter((g) => g.strategy === 'parallel').length;
  return {
    priority: input.priority,
    scenario: plan.scenario,
    contention: plan.contention,
    contentionShare: input.settings ? plan.contentionShare : null,
    reservation: planned(reservation),
    destinationReservation: planned(atDestination),
    guests: plan.guests.map((guest) => {
      const share = guest.strategy === 'parallel' ? parallel : 1;
      const reasons = [...guest.reasons];
      if (reservation) {
        reasons.push(
          share > 1
            ? `reserved: 1/${share} of the migration's ${reservation.migrationBytesPerSec.toFixed(0)} bytes/s, shared with the other parallel guests`
            : `reserved: all of the migration's ${reservation.migrationBytesPerSec.toFixed(0)} bytes/s while it moves`,
        );
      }
      return {
        name: guest.name,
        priority: guest.priority,
        direction: guest.direction,
        technique: guest.technique,
        strategy: guest.strategy,
        order: guest.order,
        reservedBytesPerSec: reservation ? reservation.migrationBytesPerSec / share : null,
        workloadCapBytesPerSec: reservation?.workloadCapBytesPerSec ?? null,
        reasons,
      };
    }),
    reasons: input.settings ? plan.reasons : plan.reasons.filter((reason) => !/of the link/.test(reason)),
    assumptions,
    sourceRates: input.source.rates ?? null,
    destinationRates: input.destination.rates ?? null,
  };
}

/**
 * Algorithm 2's reservation, never leaving the workload less than its SLA lower limit: the
 * paper gives the migration everything the workload does not use when it starts, which
 * would starve a workload that picks up later. The shaper applies the same bound
 * (controller.ts shaperConfig).
 */
export function guardedReservation(priority: Priority, workloadBytesPerSec: number, settings: PlannerSettings): Reservation {
  const reservation = reserveBandwidth(priority, workloadBytesPerSec, settings);
  const ceiling = settings.linkBytesPerSec - Math.min(settings.slaLowerBytesPerSec, settings.linkBytesPerSec);
  if (reservation.migrationBytesPerSec <= ceiling) return reservation;
  return {
    ...reservation,
    migrationBytesPerSec: ceiling,
    reason: `${reservation.reason}; held to ${ceiling.toFixed(0)} bytes/s so the workload keeps its SLA lower limit if it picks up`,
  };
}
