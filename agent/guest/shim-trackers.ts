// Dirty trackers for a guest whose process runs with the tracking shim (gangway-track.so)
// preloaded: gangway-guest and QEMU alike. uffd-wp on every region when the shim registered
// them all, else hash-scan for all of them (a migration tracks its guest one way).
import { existsSync } from 'node:fs';
import type { DirtyTracker } from '../tracker/dirty-tracker.js';
import { HashScanTracker } from '../tracker/hash-scan.js';
import { UffdWpTracker } from '../tracker/uffd-wp.js';
import type { GuestRegion } from './adapter.js';
import type { GuestFiles, TrackerPreference } from './process-guest.js';

/** The tracking shim's report for region `index` (shim.c: PATH for region 0, PATH.i after). */
export function trackReportPathOf(files: Pick<GuestFiles, 'trackReportPath'>, index: number): string {
  return index === 0 ? files.trackReportPath : `${files.trackReportPath}.${index}`;
}

export async function openShimTrackers(
  pid: number,
  regions: readonly GuestRegion[],
  files: Pick<GuestFiles, 'trackReportPath'>,
  preference: TrackerPreference,
): Promise<{ trackers: DirtyTracker[]; fallbackReason?: string }> {
  let fallbackReason: string | undefined;
  if (preference !== 'hash-scan') {
    const trackers: DirtyTracker[] = [];
    try {
      for (const [i, region] of regions.entries()) {
        const report = trackReportPathOf(files, i);
        if (!existsSync(report)) throw new Error(`the tracking shim wrote no report for region ${i} (${report})`);
        trackers.push(UffdWpTracker.open(pid, report, region.lengthBytes, region.pageSizeBytes));
      }
      return { trackers };
    } catch (err) {
      for (const tracker of trackers) tracker.close();
      if (preference === 'uffd-wp') throw err;
      fallbackReason = err instanceof Error ? err.message : String(err);
    }
  }
  const trackers: DirtyTracker[] = [];
  try {
    for (const region of regions) trackers.push(await HashScanTracker.open(region.path, region.lengthBytes, region.pageSizeBytes));
  } catch (err) {
    for (const tracker of trackers) tracker.close();
    throw err;
  }
  return fallbackReason === undefined ? { trackers } : { trackers, fallbackReason };
}
