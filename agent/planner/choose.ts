// The planner's two policies, by name: 'paper' is seed paper 003's Algorithms 1 and 2 as
// planner.ts has them (reproducible, the seed's behaviour), 'forecast' (the default) runs the
// paper's plan for the scenario, contention and reservation, then replaces its technique and
// strategy by the candidate with the best forecast (forecast.ts). Pure: the plan and the
// forecasts in, the plan to follow out, with every option's forecast and why the winner won.
//
// The winner: the least forecast total time among the options that complete, keep the
// downtime budget and leave the workload its SLA lower limit; ties go to the lower downtime,
// then the fewer wire bytes. When none keeps the budget, the option that completes with the
// least downtime (the operator asked for a budget the link cannot give; the least harm).
// When none completes, the paper's plan stands and the reasons say so.
import type { GuestMigrationPlan, MigrationPlan } from './plan-for.js';
import { availableRate, forecastOptions, type ForecastInput, type ForecastLimits, type ForecastModel, type GuestProfile, type OptionForecast } from './forecast.js';

export const PLANNER_MODES = ['forecast', 'paper'] as const;
export type PlannerMode = (typeof PLANNER_MODES)[number];
export const DEFAULT_PLANNER_MODE: PlannerMode = 'forecast';

/** An option as plan and migrate show it. */
export interface OptionSummary {
  technique: OptionForecast['technique'];
  strategy: OptionForecast['strategy'];
  totalMs: number;
  downtimeMs: number;
  wireBytes: number;
  guestStallShare: number;
  workloadBytesPerSec: number | null;
  completes: boolean;
  withinBudget: boolean;
  keepsSla: boolean;
  /** The effective rate it assumed, bytes/s. */
  rateBytesPerSec: number;
  /** Per guest, in order: what calibration compares with the outcome afterwards. */
  guests: { name: string; totalMs: number; downtimeMs: number; wireBytes: number; faults: number; rounds: number; ending: string }[];
}

export interface PlanForecast {
  mode: PlannerMode;
  /** Every candidate's forecast, fastest first. */
  options: OptionSummary[];
  /** The option followed; null: the paper's plan stands (see why). */
  chosen: OptionSummary | null;
  why: string[];
  /** What was measured of the guests before the migration (their content, from a sample). */
  measured: string[];
  /** What the forecast took as given because it was not measured. */
  assumptions: string[];
  /** The constants used, and what calibration fitted of them. */
  model: ForecastModel;
  calibration: string[];
}

export function summarizeOption(option: OptionForecast): OptionSummary {
  return {
    technique: option.technique,
    strategy: option.strategy,
    totalMs: option.totalMs,
    downtimeMs: option.downtimeMs,
    wireBytes: option.wireBytes,
    guestStallShare: option.guestStallShare,
    workloadBytesPerSec: option.workloadBytesPerSec,
    completes: option.completes,
    withinBudget: option.withinBudget,
    keepsSla: option.keepsSla,
    rateBytesPerSec: option.rateBytesPerSec,
    guests: option.guests.map((g) => ({ name: g.name, totalMs: g.totalMs, downtimeMs: g.downtimeMs, wireBytes: g.wireBytes, faults: g.faults, rounds: g.rounds, ending: g.ending })),
  };
}

export function optionName(option: Pick<OptionSummary, 'technique' | 'strategy'>, guestCount: number): string {
  return guestCount > 1 ? `${option.technique} ${option.strategy}` : option.technique;
}

/** The winner among `options` (see the header) and why, in words an operator can check. */
export function chooseByForecast(options: readonly OptionForecast[], downtimeBudgetMs: number): { chosen: OptionForecast | undefined; why: string[] } {
  const n = options[0]?.guests.length ?? 0;
  const byTime = [...options].sort((a, b) => a.totalMs - b.totalMs || a.downtimeMs - b.downtimeMs || a.wireBytes - b.wireBytes);
  const feasible = byTime.filter((o) => o.completes && o.withinBudget && o.keepsSla);
  const why: string[] = [];
  for (const o of byTime) {
    if (!o.completes) why.push(`${optionName(o, n)}: does not complete (${o.guests.find((g) => !g.completes)?.ending ?? 'a limit'})`);
    else if (!o.keepsSla) why.push(`${optionName(o, n)}: would leave the workload ${fmtRate(o.workloadBytesPerSec ?? 0)}, below its SLA lower limit`);
    else if (!o.withinBudget) why.push(`${optionName(o, n)}: forecast downtime ${fmtMs(o.downtimeMs)} is over the budget ${fmtMs(downtimeBudgetMs)}`);
  }
  const winner = feasible[0];
  if (winner) {
    const runnerUp = feasible[1];
    why.unshift(
      `${optionName(winner, n)}: forecast ${fmtMs(winner.totalMs)}, downtime ${fmtMs(winner.downtimeMs)}, the fastest of ${feasible.length} option${feasible.length === 1 ? '' : 's'} within the downtime budget ${fmtMs(downtimeBudgetMs)} and the workload's SLA` +
        (runnerUp ? `; next ${optionName(runnerUp, n)} at ${fmtMs(runnerUp.totalMs)} (+${percent(runnerUp.totalMs, winner.totalMs)})` : ''),
    );
    return { chosen: winner, why };
  }
  const completing = byTime.filter((o) => o.completes && o.keepsSla).sort((a, b) => a.downtimeMs - b.downtimeMs || a.totalMs - b.totalMs);
  const least = completing[0];
  if (least) {
    why.unshift(`${optionName(least, n)}: no option keeps the downtime budget ${fmtMs(downtimeBudgetMs)}; this one has the least forecast downtime, ${fmtMs(least.downtimeMs)} (${fmtMs(least.totalMs)} in all)`);
    return { chosen: least, why };
  }
  why.unshift("no option is forecast to complete within the workload's SLA: the paper's plan stands");
  return { chosen: undefined, why };
}

/**
 * The paper's plan with the forecast's choice in it: every guest takes the chosen technique,
 * parallel for a gang or serial, and its share of the reservation accordingly. Without a
 * choice the plan is returned as it was, with the forecast beside it.
 */
export function withForecast(plan: MigrationPlan, forecast: PlanForecast): MigrationPlan {
  const chosen = forecast.chosen;
  if (!chosen || forecast.mode !== 'forecast') return { ...plan, forecast };
  const n = plan.guests.length;
  const strategy = chosen.strategy === 'gang' ? 'parallel' : 'serial';
  const reserved = plan.reservation?.migrationBytesPerSec;
  const guests = plan.guests.map((guest): GuestMigrationPlan => {
    // The paper's technique reasons give way to the forecast's; the guest's direction and order stay.
    const kept = guest.reasons.filter((reason, i) => i === 0 || /^order /.test(reason));
    const own = chosen.guests.find((g) => g.name === guest.name);
    const reasons = [...kept, `forecast: ${optionName(chosen, n)}${own ? `; this guest ${fmtMs(own.totalMs)}, downtime ${fmtMs(own.downtimeMs)}, ${own.ending}` : ''}`];
    if (reserved !== undefined) {
      reasons.push(
        strategy === 'parallel' && n > 1
          ? `reserved: 1/${n} of the migration's ${reserved.toFixed(0)} bytes/s, shared with the other guests of the gang`
          : `reserved: all of the migration's ${reserved.toFixed(0)} bytes/s while it moves`,
      );
    }
    return {
      ...guest,
      technique: chosen.technique,
      strategy,
      reservedBytesPerSec: reserved === undefined ? null : strategy === 'parallel' ? reserved / n : reserved,
      reasons,
    };
  });
  return { ...plan, guests, forecast };
}

export function fmtMs(ms: number): string {
  return ms >= 10_000 ? `${(ms / 1000).toFixed(1)} s` : ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(0)} ms`;
}

function fmtRate(bytesPerSec: number): string {
  return `${((bytesPerSec * 8) / 1e6).toFixed(1)} Mbit/s`;
}

function percent(value: number, base: number): string {
  return `${(((value - base) / base) * 100).toFixed(0)}%`;
}

export interface ForecastPlanInput {
  mode: PlannerMode;
  /** The guests as measured (forecast.ts), by name; the plan's order is used. */
  profiles: readonly GuestProfile[];
  limits: ForecastLimits;
  model: ForecastModel;
  /** What calibration fitted (calibrate.ts), for the operator. */
  calibration: string[];
  /** The destination can post-copy, and no guest's disks move (those go by pre-copy). */
  canPostcopy: boolean;
  /** --bandwidth: the rate instead of the reservation. */
  manualBandwidthBytesPerSec: number | undefined;
  /** The source uplink's capacity and the workload's SLA lower limit. */
  linkBytesPerSec: number;
  slaLowerBytesPerSec: number;
  /** What the profiles measured, and what they took as given. */
  measured: string[];
  assumptions: string[];
}

/**
 * Every option's forecast for `plan`, and the plan to follow: in 'forecast' mode the best
 * option's technique and strategy (withForecast), in 'paper' mode the paper's plan with the
 * forecasts beside it for comparison.
 */
export function forecastPlan(plan: MigrationPlan, input: ForecastPlanInput): MigrationPlan {
  const profiles = [...plan.guests].sort((a, b) => a.order - b.order).map((g) => input.profiles.find((p) => p.name === g.name)!);
  // The shaper's migration class borrows up to the link (controller.ts shaperConfig): the
  // migration gets what the workload leaves, never less than its reservation. A manual rate
  // is a ceiling.
  const reservation = plan.reservation?.migrationBytesPerSec ?? input.linkBytesPerSec;
  const leftByWorkload = plan.sourceRates ? input.linkBytesPerSec - plan.sourceRates.txBytesPerSec : reservation;
  const reserved = input.manualBandwidthBytesPerSec ?? Math.max(reservation, leftByWorkload);
  const assumptions = [...input.assumptions];
  if (plan.destinationRates) assumptions.push("the destination's link has the source's capacity");
  const forecastInput: ForecastInput = {
    guests: profiles,
    availableBytesPerSec: availableRate(
      reserved,
      plan.destinationRates
        ? {
            inboundBytesPerSec: plan.destinationRates.rxBytesPerSec,
            linkBytesPerSec: input.linkBytesPerSec,
            ...(plan.destinationReservation ? { reservedBytesPerSec: plan.destinationReservation.migrationBytesPerSec } : {}),
          }
        : undefined,
    ),
    workload: plan.sourceRates ? { demandBytesPerSec: plan.sourceRates.txBytesPerSec, slaLowerBytesPerSec: input.slaLowerBytesPerSec, linkBytesPerSec: input.linkBytesPerSec } : undefined,
    limits: input.limits,
    model: input.model,
  };
  const options = forecastOptions(forecastInput, input.canPostcopy);
  const { chosen, why } = chooseByForecast(options, input.limits.downtimeBudgetMs);
  const sorted = [...options].sort((a, b) => a.totalMs - b.totalMs);
  const base = { mode: input.mode, options: sorted.map(summarizeOption), measured: input.measured, assumptions, model: input.model, calibration: input.calibration };
  if (input.mode === 'paper') {
    const n = plan.guests.length;
    const paperStrategy = plan.guests.every((g) => g.strategy === 'parallel') ? 'gang' : 'serial';
    const uniform = plan.guests.every((g) => g.technique === plan.guests[0]!.technique);
    const paper = uniform ? options.find((o) => o.technique === plan.guests[0]!.technique && (n === 1 || o.strategy === paperStrategy)) : undefined;
    return withForecast(plan, {
      ...base,
      chosen: paper ? summarizeOption(paper) : null,
      why: [`planner mode 'paper': Algorithms 1 and 2 decide; the forecasts are shown for comparison${chosen ? ` (the forecast would choose ${optionName(chosen, n)})` : ''}`],
    });
  }
  return withForecast(plan, { ...base, chosen: chosen ? summarizeOption(chosen) : null, why });
}
