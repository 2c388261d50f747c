// The one decision of what `gangway migrate --technique auto` runs: each guest's technique,
// the command's strategy and order, and whether the sender's pacer has to hold the
// reservation. `gangway plan` prints it, migrate auto runs it and `gangway drain` runs it per
// destination, all through followPlan, so what plan says is what migrate does (plan once
// said pre-copy, from a plan made of assumed-idle traffic, while migrate ran hybrid). Pure,
// so every branch is table-tested; every choice carries its reason, and the summary JSON
// carries them to the operator.
//
// - Technique: the planner's names are the migrate path's (precopy, postcopy, hybrid). A
//   destination that cannot post-copy (no 'postcopy' feature) gets pre-copy instead.
// - Strategy: the guests of one plan share one priority and so one strategy; parallel runs
//   them as a gang (one session, together), serial one after another. Were they mixed, serial
//   wins: it never loads the link more than the plan allowed for any guest.
// - Order: the plan's (high, medium, low; the order asked within a priority).
// - Rate: the traffic hold already applies Algorithm 2's reservation on the uplink when the
//   shaper is available. Otherwise the reservation goes to the sender's pacer, but only when
//   it is less than the link (a pacer at the link's rate would only add bursts).
// - Without traffic data (no uplink, or no capacity configured) nothing is planned: the
//   command runs as `auto` did before plans (hybrid where the destination can post-copy,
//   else pre-copy; the requested strategy and order), and the reasons say so.
// - A guest whose disks move goes by pre-copy whatever the plan says: a disk that waits on the
//   link while its guest runs there is slower than a guest throttled here.
import type { MigrationPlan } from './plan-for.js';
import type { PlannedTechnique, Priority, Strategy } from './planner.js';

export type Technique = PlannedTechnique;

export interface GuestPlanNote {
  technique: Technique;
  /** The planner's strategy for this guest; absent when nothing was planned. */
  strategy: Strategy | null;
  order: number;
  /** The migration's share of the reservation while this guest moves; null: nothing reserved. */
  reservedBytesPerSec: number | null;
  reasons: string[];
}

export interface FollowedPlan {
  /** false: no traffic data, the pre-plan default ran (see the reasons). */
  followed: boolean;
  priority: Priority;
  strategy: 'gang' | 'serial';
  /** In migration order. */
  guests: ({ name: string } & GuestPlanNote)[];
  /** The rate the sender's pacer holds the whole command to; undefined: not paced by the plan. */
  pacedBytesPerSec: number | undefined;
  /** Plan-wide reasons: the scenario, contention, reservation, strategy and rate choices. */
  reasons: string[];
  /** What the planner took as given because it was not measured. */
  assumptions: string[];
}

export interface FollowPlanInput {
  /** The guests as the request names them. */
  guests: readonly string[];
  priority: Priority;
  requestedStrategy: 'gang' | 'serial';
  /** The plan, or undefined with `noTrafficReason` when there is no traffic data. */
  plan: MigrationPlan | undefined;
  noTrafficReason?: string;
  peerFeatures: readonly string[];
  /** The traffic hold around the migration: whether the shaper applies the reservation, and why (not). */
  shaper: { applied: boolean; reason: string };
  linkBytesPerSec: number | undefined;
  /** --bandwidth was given: it caps the command, the plan's reservation does not. */
  manualBandwidthBytesPerSec: number | undefined;
  /** The guests whose disks move with them (VMs with --disks other than none). */
  movingDisks?: readonly string[];
}

/** What `auto` meant before plans, and still means without traffic data. */
export function defaultAutoTechnique(peerFeatures: readonly string[]): Technique {
  return peerFeatures.includes('postcopy') ? 'hybrid' : 'precopy';
}

/** A guest whose disks move goes by pre-copy (see the header). */
function withDisks(name: string, technique: Technique, reasons: string[], movingDisks: readonly string[] | undefined): { technique: Technique; reasons: string[] } {
  if (technique === 'precopy' || !movingDisks?.includes(name)) return { technique, reasons };
  return { technique: 'precopy', reasons: [...reasons, `its disks move with it: pre-copy instead of ${technique} (a disk waiting on the link would slow the guest more than a throttle here)`] };
}

export function followPlan(input: FollowPlanInput): FollowedPlan {
  const canPostcopy = input.peerFeatures.includes('postcopy');
  const plan = input.plan;
  if (!plan) {
    const technique = defaultAutoTechnique(input.peerFeatures);
    const why = `${technique}: ${canPostcopy ? 'the destination can post-copy, so hybrid (pre-copy rounds, post-copy only if they do not converge)' : 'the destination cannot post-copy'}`;
    return {
      followed: false,
      priority: input.priority,
      strategy: input.requestedStrategy,
      guests: input.guests.map((name, order) => ({ name, ...withDisks(name, technique, [why], input.movingDisks), strategy: null, order, reservedBytesPerSec: null })),
      pacedBytesPerSec: undefined,
      reasons: [
        `no traffic data (${input.noTrafficReason ?? 'not measured'}): no plan; auto runs as without a planner`,
        `technique ${why}`,
        `strategy ${input.requestedStrategy} and order as requested`,
        ...(input.manualBandwidthBytesPerSec !== undefined ? [`--bandwidth caps the migration at ${input.manualBandwidthBytesPerSec.toFixed(0)} bytes/s`] : []),
      ],
      assumptions: [],
    };
  }

  const ordered = [...plan.guests].sort((a, b) => a.order - b.order);
  const guests = ordered.map((guest, order) => {
    const reasons = [...guest.reasons];
    let technique: Technique = guest.technique;
    if (technique !== 'precopy' && !canPostcopy) {
      reasons.push(`the destination cannot post-copy (no 'postcopy' feature): pre-copy instead of ${technique}`);
      technique = 'precopy';
    }
    return { name: guest.name, ...withDisks(guest.name, technique, reasons, input.movingDisks), strategy: guest.strategy, order, reservedBytesPerSec: guest.reservedBytesPerSec };
  });
  const allParallel = guests.every((g) => g.strategy === 'parallel');
  const strategy = allParallel ? 'gang' : 'serial';
  const reasons = [...plan.reasons];
  if (guests.length > 1) {
    reasons.push(
      allParallel
        ? 'strategy: the plan migrates every guest in parallel, so they move as a gang'
        : guests.some((g) => g.strategy === 'parallel')
          ? 'strategy: the plan mixes parallel and serial guests; serial, which never loads the link more than planned'
          : 'strategy: the plan migrates the guests serially, one after another',
    );
  }
  if (plan.forecast) reasons.push(...plan.forecast.why.map((why) => `forecast: ${why}`));
  if (plan.reservation) reasons.push(`reservation: ${plan.reservation.reason}`);

  let pacedBytesPerSec: number | undefined;
  if (input.manualBandwidthBytesPerSec !== undefined) {
    reasons.push(`rate: --bandwidth ${input.manualBandwidthBytesPerSec.toFixed(0)} bytes/s caps the migration instead of the reservation`);
  } else if (input.shaper.applied) {
    reasons.push(`rate: the shaper holds the reservation on the uplink (${input.shaper.reason})`);
  } else if (!plan.reservation || input.linkBytesPerSec === undefined) {
    reasons.push('rate: nothing reserved, so not paced');
  } else if (plan.reservation.migrationBytesPerSec < input.linkBytesPerSec) {
    pacedBytesPerSec = plan.reservation.migrationBytesPerSec;
    reasons.push(`rate: the shaper is not applied (${input.shaper.reason}); the sender's pacer holds the migration to the reserved ${pacedBytesPerSec.toFixed(0)} bytes/s`);
  } else {
    reasons.push(`rate: the reservation is the whole link and the shaper is not applied (${input.shaper.reason}): not paced`);
  }
  return { followed: true, priority: plan.priority, strategy, guests, pacedBytesPerSec, reasons, assumptions: [...plan.assumptions] };
}
