// What the forecast (planner/forecast.ts) knows of each guest before its migration, from
// what this agent can see without starting one: its memory from its regions, its dirty rate
// from the guest itself (a process guest's own rate) or else from the tracker of its last
// migration from here (the history keeps it), and the model's constants fitted to the
// history (planner/calibrate.ts). What it cannot see is taken as given and said so.
import { calibrate, type CalibrationSample } from '../planner/calibrate.js';
import { DEFAULT_FORECAST_MODEL, type ForecastModel, type GuestProfile } from '../planner/forecast.js';
import type { DiskSelection } from '../guest/qemu-disks.js';
import type { GuestRegistry } from '../guest/registry.js';
import type { HistoryEntry } from './outcome.js';

/** Each guest's profile, in the order given, and what was assumed for them. */
export async function guestProfiles(names: readonly string[], registry: GuestRegistry, disks: DiskSelection | undefined, history: readonly HistoryEntry[]): Promise<{ profiles: GuestProfile[]; assumptions: string[] }> {
  const assumptions: string[] = [];
  const unknownRate: string[] = [];
  const profiles: GuestProfile[] = [];
  // Asked of every guest at once: a VM answers over QMP, and the plan is on migrate's critical path.
  const observed = await Promise.all(
    names.map((name) =>
      registry
        .get(name)
        .guest.observe()
        .then((seen) => seen.details?.dirtyRateBytesPerSec)
        .catch(() => undefined),
    ),
  );
  for (const [i, name] of names.entries()) {
    const { guest } = registry.get(name);
    const source = guest.forMigration?.({ disks: disks ?? 'all' }) ?? guest;
    // A disk's blocks go by pre-copy whatever is planned; its size says little of its data (holes).
    const memoryBytes = source.regions.filter((region) => !region.sparse).reduce((sum, region) => sum + region.lengthBytes, 0);
    const own = observed[i];
    const last = [...history].reverse().find((e) => e.direction === 'out' && e.guest === name && e.dirtyRateBytesPerSec !== undefined)?.dirtyRateBytesPerSec;
    let dirtyRateBytesPerSec = 0;
    if (own !== undefined && Number.isFinite(own)) dirtyRateBytesPerSec = own;
    else if (last !== undefined) {
      dirtyRateBytesPerSec = last;
      assumptions.push(`guest ${name} dirties ${(last / 1048576).toFixed(1)} MiB/s, as its last migration from here measured`);
    } else unknownRate.push(name);
    profiles.push({ name, memoryBytes, zeroShare: 0, duplicateShare: 0, sharedShare: 0, dirtyRateBytesPerSec, hotSetBytes: memoryBytes });
  }
  if (unknownRate.length > 0) assumptions.push(`the dirty rate of ${unknownRate.join(', ')} is not known before a migration from here measures it: taken as 0`);
  assumptions.push('zero and shared pages are not known before the dedup index is built: every page taken as distinct; the hot set as the whole memory');
  return { profiles, assumptions };
}

/** The samples calibration fits: this host's outgoing migrations that ended with a forecast beside their outcome. */
export function calibrationSamples(history: readonly HistoryEntry[]): CalibrationSample[] {
  return history.flatMap((e): CalibrationSample[] => {
    if (e.direction !== 'out' || e.outcome !== 'completed' || !e.forecast || e.totalMs === undefined || e.downtimeMs === undefined || e.wireBytes === undefined || !e.technique) return [];
    return [
      {
        technique: e.technique,
        wentPostcopy: e.technique === 'postcopy' || e.wentPostcopy === true,
        totalMs: e.totalMs,
        downtimeMs: e.downtimeMs,
        wireBytes: e.wireBytes,
        nominalBytesPerSec: e.forecast.nominalBytesPerSec,
        forecastFaults: e.forecast.faults,
      },
    ];
  });
}

/** The model fitted to this host's history, and what was fitted. */
export function calibratedModel(history: readonly HistoryEntry[]): { model: ForecastModel; calibration: string[] } {
  const result = calibrate(calibrationSamples(history), DEFAULT_FORECAST_MODEL);
  return {
    model: result.model,
    calibration: result.fitted.length > 0 ? [`fitted to ${result.samples} past migrations from here: ${result.fitted.join('; ')}`] : [`the engine's defaults (${result.samples} past migrations with a forecast here; calibration needs at least 3)`],
  };
}
