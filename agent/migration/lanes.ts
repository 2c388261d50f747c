// A migration moves every region of its guest (memory, disks): each region is a lane, with its reader,
// its dirty tracker, its dedup slot and the pages the destination asked for again. A set of
// pages to send is runs per lane (LaneRuns), in the order of the guest's regions, which is
// the region index every frame carries. Convergence weighs pages by their bytes, so regions
// of different page sizes count for what they hold.
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { FINGERPRINT_BYTES } from '../../protocol/limits.js';
import type { GuestRegion } from '../guest/adapter.js';
import type { DirtyTracker } from '../tracker/dirty-tracker.js';
import { mergeRuns, PageSet, runsPageCount } from '../tracker/page-set.js';
import type { RegionReader } from './region-reader.js';

export interface Lane {
  index: number;
  region: GuestRegion;
  pageCount: number;
  reader: RegionReader;
  tracker: DirtyTracker;
  /** Dedup: this region's slot in the group. */
  slot: number | undefined;
  /** Dedup: pages the destination asked for again (want), for the next round. */
  wanted: PageSet | undefined;
  /** Dedup: pages the guest wrote since its tracker armed; at the commit, the ones it will likely write again there. */
  written: PageSet | undefined;
}

/** Runs [first, count, ...] for each lane, in lane order. */
export type LaneRuns = Uint32Array[];

/**
 * Every page of every lane that may hold data: a disk's holes are zeros the destination has
 * already. So are a memory region's when `memoryHoles` is 'skip': a pre-copy's destination
 * memory starts zeroed, while a post-copy's starts missing and must be sent every page.
 */
export const everyPage = (lanes: readonly Lane[], memoryHoles: 'skip' | 'send'): Promise<LaneRuns> =>
  Promise.all(lanes.map(async (lane) => (lane.region.sparse || memoryHoles === 'skip' ? await lane.reader.dataRuns?.() : undefined) ?? Uint32Array.of(0, lane.pageCount)));
export const noPages = (lanes: readonly Lane[]): LaneRuns => lanes.map(() => new Uint32Array(0));

export function mergeLaneRuns(lanes: readonly Lane[], a: LaneRuns, b: LaneRuns): LaneRuns {
  return lanes.map((lane, i) => mergeRuns(a[i] ?? new Uint32Array(0), b[i] ?? new Uint32Array(0), lane.pageCount));
}

/** Pages in `runs`, all lanes together. */
export function lanePages(runs: LaneRuns): number {
  return runs.reduce((sum, r) => sum + runsPageCount(r), 0);
}

/** Guest bytes in `runs`, all lanes together. */
export function laneBytes(lanes: readonly Lane[], runs: LaneRuns): number {
  return lanes.reduce((sum, lane, i) => sum + runsPageCount(runs[i] ?? new Uint32Array(0)) * lane.region.pageSizeBytes, 0);
}

/** The pages a lane's destination asked for again since the last call, as runs. */
export function takeWanted(lane: Lane): Uint32Array {
  if (!lane.wanted || lane.wanted.size === 0) return new Uint32Array(0);
  const runs = lane.wanted.toRuns();
  lane.wanted.clear();
  return runs;
}

/** Throws PROTOCOL when a peer's runs reach past the lane's pages (`what` names the frame). */
export function checkRuns(lane: Lane, runs: Uint32Array, what: string): void {
  for (let i = 0; i + 1 < runs.length; i += 2) {
    const first = runs[i]!;
    const count = runs[i + 1]!;
    if (first + count > lane.pageCount) {
      throw new GangwayError(ErrorCode.PROTOCOL, `${what} for pages ${first}..${first + count - 1} of region ${lane.index}, past its ${lane.pageCount}`);
    }
  }
}

/** The lane a peer's frame names, or UNEXPECTED_FRAME. */
export function laneOf(lanes: readonly Lane[], region: number, what: string): Lane {
  const lane = lanes[region];
  if (!lane) throw new GangwayError(ErrorCode.UNEXPECTED_FRAME, `${what} for region ${region}: the guest has ${lanes.length}`);
  return lane;
}

/** Pages whose 16-byte fingerprints differ between `a` and `b` (4-byte aligned), as runs. */
export function differingRuns(a: Uint8Array, b: Uint8Array): Uint32Array {
  const pages = Math.min(a.length, b.length) / FINGERPRINT_BYTES;
  const wa = new Int32Array(a.buffer, a.byteOffset, pages * 4);
  const wb = new Int32Array(b.buffer, b.byteOffset, pages * 4);
  const differing = new PageSet(pages);
  for (let page = 0, w = 0; page < pages; page++, w += 4) {
    if (wa[w] !== wb[w] || wa[w + 1] !== wb[w + 1] || wa[w + 2] !== wb[w + 2] || wa[w + 3] !== wb[w + 3]) differing.add(page);
  }
  return differing.toRuns();
}
