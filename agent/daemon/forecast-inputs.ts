// What the forecast (planner/forecast.ts) knows of each guest before its migration, from
// what this agent can see without starting one:
// - its memory, from its regions;
// - its zero share, from a sample of its pages read now (guest/content-sample.ts);
// - its dirty rate and hot set, from the guest itself (a process guest says both), else the
//   dirty rate from the tracker of its last migration from here (the history keeps it);
// - the share of its pages that repeat within it or that another guest carried, from what the
//   dedup index found in round 0 of its last migration from here (the history keeps it);
// - the model's constants, fitted to the history (planner/calibrate.ts).
// What it cannot see is taken as given, and said so. forecastedPlan puts these together with
// the request's limits and forecasts every option of a plan.
import { calibrate, type CalibrationSample } from '../planner/calibrate.js';
import { DEFAULT_FORECAST_MODEL, type ForecastModel, type GuestProfile } from '../planner/forecast.js';
import { DEFAULT_PLANNER_MODE, forecastPlan } from '../planner/choose.js';
import type { MigrationPlan } from '../planner/plan-for.js';
import { MIGRATE_DEFAULTS } from '../control/client.js';
import type { AgentConfig } from '../daemon.js';
import { sampleZeroShare } from '../guest/content-sample.js';
import type { GuestDetails } from '../guest/adapter.js';
import type { DiskSelection } from '../guest/qemu-disks.js';
import type { GuestRegistry } from '../guest/registry.js';
import type { TrafficService } from '../traffic/service.js';
import type { DecideRequest } from './outbound.js';
import type { HistoryEntry } from './outcome.js';

const MiB = 1024 * 1024;
const percent = (share: number) => `${(share * 100).toFixed(share > 0 && share < 0.01 ? 2 : 0)}%`;

/** Each guest's profile, in the order given, what was measured of them, and what was assumed. */
export async function guestProfiles(
  names: readonly string[],
  registry: GuestRegistry,
  disks: DiskSelection | undefined,
  history: readonly HistoryEntry[],
): Promise<{ profiles: GuestProfile[]; measured: string[]; assumptions: string[] }> {
  const measured: string[] = [];
  const assumptions: string[] = [];
  const unknownRate: string[] = [];
  const unknownRepeats: string[] = [];
  const profiles: GuestProfile[] = [];
  const sources = names.map((name) => {
    const { guest } = registry.get(name);
    return guest.forMigration?.({ disks: disks ?? 'all' }) ?? guest;
  });
  // Asked of every guest at once: a VM answers over QMP, and the plan is on migrate's critical path.
  const [observed, samples] = await Promise.all([
    Promise.all(
      names.map((name) =>
        registry
          .get(name)
          .guest.observe()
          .then((seen): GuestDetails | undefined => seen.details)
          .catch(() => undefined),
      ),
    ),
    Promise.all(sources.map((source) => sampleZeroShare(source.regions))),
  ]);
  for (const [i, name] of names.entries()) {
    // A disk's blocks go by pre-copy whatever is planned; its size says little of its data (holes).
    const memoryBytes = sources[i]!.regions.filter((region) => !region.sparse).reduce((sum, region) => sum + region.lengthBytes, 0);
    const own = observed[i];
    const past = [...history].reverse().filter((e) => e.direction === 'out' && e.guest === name);
    const lastRate = past.find((e) => e.dirtyRateBytesPerSec !== undefined)?.dirtyRateBytesPerSec;
    let dirtyRateBytesPerSec = 0;
    if (own?.dirtyRateBytesPerSec !== undefined && Number.isFinite(own.dirtyRateBytesPerSec)) dirtyRateBytesPerSec = own.dirtyRateBytesPerSec;
    else if (lastRate !== undefined) {
      dirtyRateBytesPerSec = lastRate;
      assumptions.push(`guest ${name} dirties ${(lastRate / MiB).toFixed(1)} MiB/s, as its last migration from here measured`);
    } else unknownRate.push(name);
    const hotSetBytes = own?.hotSetBytes !== undefined && own.hotSetBytes > 0 ? Math.min(own.hotSetBytes, memoryBytes) : memoryBytes;
    const sample = samples[i];
    const lastContent = past.find((e) => e.content !== undefined)?.content;
    const zeroShare = sample?.zeroShare ?? lastContent?.zeroShare ?? 0;
    if (sample) measured.push(`guest ${name}: ${percent(sample.zeroShare)} of its pages are zero (a sample of ${sample.pages} pages)`);
    else if (lastContent) assumptions.push(`guest ${name}: ${percent(lastContent.zeroShare)} of its pages are zero, as its last migration from here found (its memory could not be sampled)`);
    else assumptions.push(`guest ${name}: its memory could not be sampled; no page taken as zero`);
    const repeats = past.find((e) => e.content?.duplicateShare !== undefined)?.content;
    if (repeats) {
      measured.push(
        `guest ${name}: ${percent(repeats.duplicateShare!)} of its pages repeat within it and ${percent(repeats.sharedShare ?? 0)} were found sent by another guest or at the destination, as the dedup index found in its last migration from here`,
      );
    } else unknownRepeats.push(name);
    if (own?.hotSetBytes !== undefined) measured.push(`guest ${name}: its writes land in ${(hotSetBytes / MiB).toFixed(1)} MiB (its hot set, as the guest says)`);
    else assumptions.push(`guest ${name}: its hot set is not known; its writes taken as spread over all its memory`);
    profiles.push({
      name,
      memoryBytes,
      zeroShare,
      duplicateShare: repeats?.duplicateShare ?? 0,
      sharedShare: repeats?.sharedShare ?? 0,
      dirtyRateBytesPerSec,
      hotSetBytes,
    });
  }
  if (unknownRate.length > 0) assumptions.push(`the dirty rate of ${unknownRate.join(', ')} is not known before a migration from here measures it: taken as 0`);
  if (unknownRepeats.length > 0) assumptions.push(`pages that repeat or are shared are known only once a migration with dedup from here has found them: for ${unknownRepeats.join(', ')} every non-zero page taken as distinct`);
  return { profiles, measured, assumptions };
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

/** The guests whose disks would move with them (a VM's selected disks). */
export function movingDisks(registry: GuestRegistry, names: readonly string[], disks: DiskSelection | undefined): string[] {
  return names.filter((name) => registry.get(name).guest.forMigration?.({ disks: disks ?? 'all' }).regions.some((region) => region.sparse) ?? false);
}

/** What forecastedPlan reads of the agent (OutboundContext has it all). */
export interface ForecastContext {
  config: Pick<AgentConfig, 'traffic'>;
  registry: GuestRegistry;
  /** The traffic service, once the agent has started it: the link's capacity and SLA. */
  traffic: () => Pick<TrafficService, 'settings'>;
  /** This host's ended migrations (STATE/history.json), oldest first: the forecast's calibration. */
  history: () => readonly HistoryEntry[];
}

/** The plan with every option's forecast, and in the 'forecast' planner mode the best one to follow (planner/choose.ts). */
export async function forecastedPlan(plan: MigrationPlan, request: DecideRequest, peerFeatures: readonly string[], context: ForecastContext): Promise<MigrationPlan> {
  const settings = context.traffic().settings;
  if (!settings) return plan;
  const history = context.history();
  const { profiles, measured, assumptions } = await guestProfiles(request.guests, context.registry, request.disks, history);
  const { model, calibration } = calibratedModel(history);
  return forecastPlan(plan, {
    mode: context.config.traffic?.planner ?? DEFAULT_PLANNER_MODE,
    profiles,
    limits: {
      downtimeBudgetMs: request.downtimeMs ?? MIGRATE_DEFAULTS.downtimeMs,
      maxRounds: request.maxRounds ?? MIGRATE_DEFAULTS.maxRounds,
      maxBytesFactor: request.maxBytesFactor ?? MIGRATE_DEFAULTS.maxBytesFactor,
      force: request.force ?? MIGRATE_DEFAULTS.force,
      dedup: request.dedup ?? MIGRATE_DEFAULTS.dedup,
      ...(request.postcopyAfterRounds ? { postcopyAfterRounds: request.postcopyAfterRounds } : {}),
    },
    model,
    calibration,
    canPostcopy: peerFeatures.includes('postcopy') && movingDisks(context.registry, request.guests, request.disks).length === 0,
    manualBandwidthBytesPerSec: request.bandwidthBytesPerSec,
    linkBytesPerSec: settings.linkBytesPerSec,
    slaLowerBytesPerSec: settings.slaLowerBytesPerSec,
    measured,
    assumptions,
  });
}
