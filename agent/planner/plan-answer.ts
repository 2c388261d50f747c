// What `gangway plan` answers: the decision migrate --technique auto runs (follow-plan.ts),
// in migrate's words (gang or serial, technique names), with the planner's view of the
// link beside it. The planner's own per-guest strategy (parallel or serial) is not shown:
// the command's strategy is the one that runs.
import type { FollowedPlan } from './follow-plan.js';
import type { MigrationPlan } from './plan-for.js';
import type { PlanForecast } from './choose.js';
import type { Contention, Priority, Scenario } from './planner.js';

export interface PlanAnswer {
  to: string;
  /** false: no traffic data, so auto runs its default (the reasons say why). */
  followed: boolean;
  priority: Priority;
  strategy: 'gang' | 'serial';
  /** In migration order. */
  guests: { name: string; order: number; technique: 'precopy' | 'postcopy' | 'hybrid'; reservedBytesPerSec: number | null; reasons: string[] }[];
  /** The rate the sender's pacer would hold the command to; null: not paced by the plan. */
  pacedBytesPerSec: number | null;
  reasons: string[];
  assumptions: string[];
  /** The planner's view of the link; null without traffic data (nothing was planned). */
  planner: {
    scenario: Scenario;
    contention: Contention;
    contentionShare: number | null;
    reservation: MigrationPlan['reservation'];
  } | null;
  /** Every option's forecast and why the winner won (the planner's mode says who chose); null without traffic data. */
  forecast: PlanForecast | null;
}

export function planAnswer(to: string, followed: FollowedPlan, plan: MigrationPlan | undefined): PlanAnswer {
  return {
    to,
    followed: followed.followed,
    priority: followed.priority,
    strategy: followed.strategy,
    guests: followed.guests.map((g) => ({ name: g.name, order: g.order, technique: g.technique, reservedBytesPerSec: g.reservedBytesPerSec, reasons: g.reasons })),
    pacedBytesPerSec: followed.pacedBytesPerSec ?? null,
    reasons: followed.reasons,
    assumptions: followed.assumptions,
    planner: plan ? { scenario: plan.scenario, contention: plan.contention, contentionShare: plan.contentionShare, reservation: plan.reservation } : null,
    forecast: plan?.forecast ?? null,
  };
}
