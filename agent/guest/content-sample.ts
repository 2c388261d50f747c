// A guest's share of zero pages, measured before its migration without the tracker or the
// dedup index (which exist only once a migration starts): a few thousand of its pages, spread
// evenly over its memory, read from its memory files. The forecast (planner/forecast.ts) takes
// a zero page as a header on the wire, so a guest that is mostly zeroes forecasts what it will
// really send. Reading a hole of a tmpfs file maps nothing: the sample costs the guest nothing.
import { open } from 'node:fs/promises';
import type { GuestRegion } from './adapter.js';

/** What the sample read: its zero share, and how many pages that rests on. */
export interface ZeroSample {
  zeroShare: number;
  pages: number;
}

/** Pages read at each sampled place: one read of 32 KiB instead of eight of a page. */
const PAGES_PER_READ = 8;

/**
 * The zero share of `regions` (not a sparse one: a disk's holes are never read), from at most
 * `maxPages` pages in runs of PAGES_PER_READ at evenly spaced places across all of them
 * (standard error at most 0.5/sqrt(places)). Undefined when there is nothing to read, or a
 * file cannot be read (the caller then says the share was not measured).
 */
export async function sampleZeroShare(regions: readonly GuestRegion[], maxPages = 4096): Promise<ZeroSample | undefined> {
  const memory = regions.filter((region) => !region.sparse && region.lengthBytes > 0);
  const pagesOf = (region: GuestRegion) => Math.floor(region.lengthBytes / region.pageSizeBytes);
  const total = memory.reduce((sum, region) => sum + pagesOf(region), 0);
  if (total === 0) return undefined;
  const places = Math.max(1, Math.min(Math.ceil(maxPages / PAGES_PER_READ), Math.ceil(total / PAGES_PER_READ)));
  let zero = 0;
  let read = 0;
  let start = 0;
  try {
    for (const region of memory) {
      const pages = pagesOf(region);
      const size = region.pageSizeBytes;
      const zeroPage = Buffer.alloc(size);
      const buffer = Buffer.alloc(size * PAGES_PER_READ);
      const file = await open(region.path, 'r');
      try {
        // The places that fall in this region: place i starts at page floor(i · total / places).
        for (let i = Math.ceil((start * places) / total); i < places; i++) {
          const page = Math.floor((i * total) / places) - start;
          if (page >= pages) break;
          const count = Math.min(PAGES_PER_READ, pages - page);
          const { bytesRead } = await file.read(buffer, 0, count * size, page * size);
          for (let p = 0; p + size <= bytesRead; p += size) {
            read++;
            if (buffer.subarray(p, p + size).equals(zeroPage)) zero++;
          }
        }
      } finally {
        await file.close();
      }
      start += pages;
    }
  } catch {
    return undefined;
  }
  return read > 0 ? { zeroShare: zero / read, pages: read } : undefined;
}
