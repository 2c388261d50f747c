// `gangway migrate`'s forecast: its first line (time, downtime, wire bytes of what is about to
// run, when --technique auto followed a forecast) and the ETA it starts from. Round 0 has no
// estimate of its own for the whole migration, so the ETA is the forecast's time left; once
// the rounds give the agent's estimate, that corrects it. Both go through one
// NonIncreasingEta per guest (the engine's), so the ETA shown never runs backwards: an
// estimate above the forecast's holds the ETA still rather than raise it.
import type { MigrationProgress } from '../migration/source.js';
import { NonIncreasingEta } from '../migration/rounds.js';
import { fmtMs, optionName, type OptionSummary } from '../planner/choose.js';
import { formatBytes } from '../units.js';

export function forecastFirstLine(forecast: OptionSummary): string {
  const n = forecast.guests.length;
  const who = n === 1 ? forecast.guests[0]!.name : `${n} guests`;
  return `forecast: ${who} by ${optionName(forecast, n)} in ${fmtMs(forecast.totalMs)}, downtime ${fmtMs(forecast.downtimeMs)}, ${formatBytes(forecast.wireBytes)} on the wire`;
}

export class ForecastEta {
  private readonly etas = new Map<string, NonIncreasingEta>();
  /** When each guest's first report came: a serial command's later guests start late. */
  private readonly startedAt = new Map<string, number>();

  constructor(private readonly forecast: OptionSummary) {}

  /**
   * The report as the command shows it: the agent's whole-migration ETA held to never run
   * backwards from the forecast's; before the agent has one (round 0), the forecast's time
   * left as a suffix for the line.
   */
  apply(progress: MigrationProgress, nowMs: number): { progress: MigrationProgress; suffix: string } {
    const eta = this.etaMs(progress, nowMs);
    if (eta === undefined) return { progress, suffix: '' };
    const c = progress.convergence;
    if (c) return { progress: { ...progress, convergence: { ...c, totalEtaMs: eta } }, suffix: '' };
    return { progress, suffix: ` · ETA ${fmtMs(eta)} (forecast)` };
  }

  /** The ETA to show for this progress report, ms; undefined: nothing to say (no forecast for this guest, not converging). */
  etaMs(progress: Pick<MigrationProgress, 'guest' | 'convergence'>, nowMs: number): number | undefined {
    const own = this.forecast.guests.find((g) => g.name === progress.guest);
    if (!own) return undefined;
    let eta = this.etas.get(progress.guest);
    if (!eta) {
      eta = new NonIncreasingEta();
      this.etas.set(progress.guest, eta);
      this.startedAt.set(progress.guest, nowMs);
    }
    const c = progress.convergence;
    if (c) return c.converging && c.totalEtaMs !== undefined ? eta.update(c.totalEtaMs) : undefined;
    return eta.update(Math.max(0, own.totalMs - (nowMs - this.startedAt.get(progress.guest)!)));
  }
}
