// The migration planner of seed paper 003 (section 3.4): Algorithm 1 chooses, per guest, a
// technique (pre-copy, post-copy, hybrid) and a strategy (parallel or serial) from the live
// traffic and the migration's priority, and orders the guests high, medium, low; Algorithm 2
// splits the uplink between the workload and the migration within the workload's SLA.
// Pure functions: traffic in, decisions out, each with the reason a reader can check against
// the paper. Where the paper is vague, the choice is a named, configurable setting:
//
// - "Predominant traffic" of a guest or host: inbound when its received rate is at least
//   `dominanceRatio` times its sent rate, outbound when the reverse holds, and otherwise
//   (roughly equal) the direction of the larger rate, ties inbound.
// - Contention: the share of the uplink that the traffic the migration competes with takes.
//   Pre-copy competes with the source host's outbound traffic, post-copy with the
//   destination's inbound traffic (paper 1.1.5), so contention = max(source sent, destination
//   received) / link; high from `highContention`, moderate from `moderateContention`.
// - Medium priority, which Algorithm 1 names only for ordering, takes the low-priority
//   technique and strategy rules; Algorithm 2 gives it its own reservation.
// - "Scenario matches the cluster" (moderate contention): in-in for an inbound guest,
//   out-out for an outbound one.
// - "transfer_bw ≈ avail_bw" (Algorithm 2, medium): the migration uses at least
//   `saturatedShare` of what it was given.
// - Low priority takes what is free but never less than `minMigrationShare` of the link, so it
//   always progresses.

export type Direction = 'inbound' | 'outbound';
export type Priority = 'high' | 'medium' | 'low';
export type Contention = 'high' | 'moderate' | 'low';
export type PlannedTechnique = 'precopy' | 'postcopy' | 'hybrid';
export type Strategy = 'parallel' | 'serial';
/** Source host's predominant direction, then the destination host's: 'in-out' etc. */
export type Scenario = `${'in' | 'out'}-${'in' | 'out'}`;

/** Bytes per second in each direction, as seen from the guest or host itself. */
export interface Rates {
  rxBytesPerSec: number;
  txBytesPerSec: number;
}

export interface GuestInput {
  name: string;
  priority: Priority;
  /** The guest's own traffic (its TAP device). */
  traffic: Rates;
}

export interface PlannerSettings {
  /** The uplink's capacity, bytes per second. */
  linkBytesPerSec: number;
  /** Shares of the link (0..1) from which contention is high, and moderate. */
  highContention: number;
  moderateContention: number;
  /** How much larger one direction must be to be predominant (≥ 1). */
  dominanceRatio: number;
  /** The workload's SLA, bytes per second: never squeezed below lower; medium priority caps it at upper. */
  slaLowerBytesPerSec: number;
  slaUpperBytesPerSec: number;
  /** Algorithm 2, medium: the migration counts as using all it was given at this share of it. */
  saturatedShare: number;
  /** Low priority's floor, as a share of the link. */
  minMigrationShare: number;
}

export const DEFAULT_PLANNER_SETTINGS: Omit<PlannerSettings, 'linkBytesPerSec' | 'slaLowerBytesPerSec' | 'slaUpperBytesPerSec'> = {
  highContention: 0.7,
  moderateContention: 0.3,
  dominanceRatio: 1.2,
  saturatedShare: 0.9,
  minMigrationShare: 0.05,
};

export interface GuestPlan {
  name: string;
  priority: Priority;
  direction: Direction;
  technique: PlannedTechnique;
  strategy: Strategy;
  /** Position in the migration order (0 first). */
  order: number;
  reasons: string[];
}

export interface Plan {
  scenario: Scenario;
  contention: Contention;
  /** The competing traffic's share of the link that set the contention level. */
  contentionShare: number;
  guests: GuestPlan[];
  reasons: string[];
}

const PRIORITY_ORDER: Record<Priority, number> = { high: 0, medium: 1, low: 2 };

/** The predominant direction of `rates` (see the header). */
export function dominantDirection(rates: Rates, dominanceRatio: number): { direction: Direction; reason: string } {
  const { rxBytesPerSec: rx, txBytesPerSec: tx } = rates;
  if (rx >= tx * dominanceRatio && rx > 0) return { direction: 'inbound', reason: `receives ${fmt(rx)} vs sends ${fmt(tx)}: inbound` };
  if (tx >= rx * dominanceRatio && tx > 0) return { direction: 'outbound', reason: `sends ${fmt(tx)} vs receives ${fmt(rx)}: outbound` };
  const direction: Direction = tx > rx ? 'outbound' : 'inbound';
  return { direction, reason: `receives ${fmt(rx)}, sends ${fmt(tx)}: about equal, taken as ${direction}` };
}

/** Contention from the traffic a migration competes with (see the header). */
export function contentionOf(
  source: Rates,
  destination: Rates,
  settings: Pick<PlannerSettings, 'linkBytesPerSec' | 'highContention' | 'moderateContention'>,
): { level: Contention; share: number; reason: string } {
  const competing = Math.max(source.txBytesPerSec, destination.rxBytesPerSec);
  const share = competing / settings.linkBytesPerSec;
  const level: Contention = share >= settings.highContention ? 'high' : share >= settings.moderateContention ? 'moderate' : 'low';
  const which = source.txBytesPerSec >= destination.rxBytesPerSec ? "the source's outbound" : "the destination's inbound";
  return { level, share, reason: `${which} traffic takes ${(share * 100).toFixed(0)}% of the link: ${level} contention` };
}

/** Algorithm 1, step 2: the technique for one guest. */
export function selectTechnique(
  contention: Contention,
  priority: Priority,
  scenario: Scenario,
  direction: Direction,
): { technique: PlannedTechnique; reason: string } {
  if (contention === 'high') {
    if (priority === 'high') {
      if (direction === 'inbound' && (scenario === 'in-in' || scenario === 'out-in')) {
        return { technique: 'postcopy', reason: `high contention, high priority, inbound guest in ${scenario}: post-copy keeps downtime lowest` };
      }
      return { technique: 'hybrid', reason: `high contention, high priority, ${direction} guest in ${scenario}: hybrid balances time and load` };
    }
    return { technique: 'hybrid', reason: `high contention, ${priority} priority: hybrid by default` };
  }
  if (contention === 'moderate') {
    const matches = (direction === 'inbound' && scenario === 'in-in') || (direction === 'outbound' && scenario === 'out-out');
    return matches
      ? { technique: 'precopy', reason: `moderate contention, ${scenario} matches the ${direction} guest: pre-copy has the lower network impact` }
      : { technique: 'hybrid', reason: `moderate contention, ${scenario} does not match the ${direction} guest: hybrid` };
  }
  return { technique: 'precopy', reason: 'low contention: pre-copy' };
}

/** Algorithm 1, step 3: parallel or serial for one guest. */
export function selectStrategy(contention: Contention, priority: Priority): { strategy: Strategy; reason: string } {
  if (priority === 'high') return { strategy: 'parallel', reason: 'high priority: parallel' };
  if (contention === 'low') return { strategy: 'parallel', reason: `${priority} priority, low contention: parallel` };
  return { strategy: 'serial', reason: `${priority} priority, ${contention} contention: serial, to spare the workload` };
}

/** Algorithm 1: technique, strategy and order for every guest. */
export function planMigration(
  guests: GuestInput[],
  hosts: { source: Rates; destination: Rates },
  settings: PlannerSettings,
): Plan {
  const sourceDir = dominantDirection(hosts.source, settings.dominanceRatio);
  const destinationDir = dominantDirection(hosts.destination, settings.dominanceRatio);
  const scenario = `${sourceDir.direction === 'inbound' ? 'in' : 'out'}-${destinationDir.direction === 'inbound' ? 'in' : 'out'}` as Scenario;
  const contention = contentionOf(hosts.source, hosts.destination, settings);
  const ordered = guests
    .map((guest, index) => ({ guest, index }))
    .sort((a, b) => PRIORITY_ORDER[a.guest.priority] - PRIORITY_ORDER[b.guest.priority] || a.index - b.index);
  const plans = ordered.map(({ guest }, order): GuestPlan => {
    const direction = dominantDirection(guest.traffic, settings.dominanceRatio);
    const technique = selectTechnique(contention.level, guest.priority, scenario, direction.direction);
    const strategy = selectStrategy(contention.level, guest.priority);
    return {
      name: guest.name,
      priority: guest.priority,
      direction: direction.direction,
      technique: technique.technique,
      strategy: strategy.strategy,
      order,
      reasons: [`the guest ${direction.reason}`, technique.reason, strategy.reason, `order ${order + 1}: ${guest.priority} priority`],
    };
  });
  return {
    scenario,
    contention: contention.level,
    contentionShare: contention.share,
    guests: plans,
    reasons: [`source host ${sourceDir.reason}`, `destination host ${destinationDir.reason}`, `scenario ${scenario}`, contention.reason],
  };
}

export interface Reservation {
  /** The migration's rate. */
  migrationBytesPerSec: number;
  /** A cap on the workload's rate, or undefined: left alone. */
  workloadCapBytesPerSec: number | undefined;
  reason: string;
}

/** Algorithm 2: the split of the link when a migration of `priority` starts. */
export function reserveBandwidth(priority: Priority, workloadBytesPerSec: number, settings: PlannerSettings): Reservation {
  const total = settings.linkBytesPerSec;
  const lower = Math.min(settings.slaLowerBytesPerSec, total);
  const upper = Math.min(Math.max(settings.slaUpperBytesPerSec, lower), total);
  const workload = Math.min(Math.max(workloadBytesPerSec, 0), total);
  if (priority !== 'low') {
    // High priority squeezes the workload down to its SLA lower limit, medium to its upper.
    const [limit, which] = priority === 'high' ? [lower, 'lower'] : [upper, 'upper'];
    if (workload > limit) {
      return {
        migrationBytesPerSec: total - limit,
        workloadCapBytesPerSec: limit,
        reason: `${priority} priority: the workload (${fmt(workload)}) is held to its SLA ${which} limit ${fmt(limit)}; the migration takes the other ${fmt(total - limit)}`,
      };
    }
    return {
      migrationBytesPerSec: total - workload,
      workloadCapBytesPerSec: undefined,
      reason: `${priority} priority: the workload (${fmt(workload)}) is within its ${which} limit; the migration takes the free ${fmt(total - workload)}`,
    };
  }
  const floor = total * settings.minMigrationShare;
  const free = total - workload;
  return {
    migrationBytesPerSec: Math.max(free, floor),
    workloadCapBytesPerSec: undefined,
    reason:
      free >= floor
        ? `low priority: the migration takes only the free ${fmt(free)}; the workload is left alone`
        : `low priority: the link is nearly full; the migration keeps its floor of ${fmt(floor)} (${(settings.minMigrationShare * 100).toFixed(0)}% of the link)`,
  };
}

/**
 * Algorithm 2, medium priority while the migration runs (its lines 20-28): when the
 * migration uses what it was given and the workload now takes less, the migration gets the
 * difference, never pushing the workload below its lower limit. Returns undefined when
 * nothing should change.
 */
export function rebalanceMedium(
  current: Reservation,
  measured: { workloadBytesPerSec: number; migrationBytesPerSec: number },
  settings: PlannerSettings,
): Reservation | undefined {
  const total = settings.linkBytesPerSec;
  const lower = Math.min(settings.slaLowerBytesPerSec, total);
  const saturated = measured.migrationBytesPerSec >= current.migrationBytesPerSec * settings.saturatedShare;
  if (!saturated) return undefined;
  const workloadShare = Math.max(measured.workloadBytesPerSec, lower);
  const migration = total - workloadShare;
  if (migration <= current.migrationBytesPerSec) return undefined;
  return {
    migrationBytesPerSec: migration,
    workloadCapBytesPerSec: workloadShare,
    reason:
      measured.workloadBytesPerSec < lower
        ? `medium priority: the workload dropped to ${fmt(measured.workloadBytesPerSec)}; the migration grows to ${fmt(migration)}, the workload keeps its lower limit ${fmt(lower)}`
        : `medium priority: the workload dropped to ${fmt(measured.workloadBytesPerSec)}; the migration grows to ${fmt(migration)}`,
  };
}

function fmt(bytesPerSec: number): string {
  const bits = bytesPerSec * 8;
  return bits >= 1e9 ? `${(bits / 1e9).toFixed(2)} Gbit/s` : `${(bits / 1e6).toFixed(1)} Mbit/s`;
}
