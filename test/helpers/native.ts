// What the native addon's tests share: the addon, the regions and fds a test opened
// (released by releaseNativeResources() in each file's afterEach, also when a test fails),
// whole-buffer file I/O, region mapping, and deterministic content.
import * as fs from 'node:fs';
import { loadNative, type RegionHandle } from '../../agent/native.js';

export const native = loadNative();
/** The addon with its types erased, for feeding it deliberately wrong arguments. */
export const loose = native as unknown as Record<string, (...args: unknown[]) => unknown>;

export const openRegions = new Set<RegionHandle>();
export const openFds = new Set<number>();

/** Closes every region and fd a test left open. */
export function releaseNativeResources(): void {
  for (const region of openRegions) {
    try {
      native.regionClose(region);
    } catch {
      /* already closed */
    }
  }
  openRegions.clear();
  for (const fd of openFds) {
    try {
      fs.closeSync(fd);
    } catch {
      /* already closed */
    }
  }
  openFds.clear();
}

export function writeAll(fd: number, data: Buffer, position: number): void {
  let done = 0;
  while (done < data.length) done += fs.writeSync(fd, data, done, data.length - done, position + done);
}

export interface MapOptions {
  writable: boolean;
  trackHashes: boolean;
  initiallyZero: boolean;
}

/** A region closed after the test. */
export function track(region: RegionHandle): RegionHandle {
  openRegions.add(region);
  return region;
}

export function mapFd(fd: number, length: number, pageSize: number, options: Partial<MapOptions> = {}): RegionHandle {
  return track(
    native.regionMap(fd, length, pageSize, {
      writable: options.writable ?? false,
      trackHashes: options.trackHashes ?? false,
      initiallyZero: options.initiallyZero ?? false,
    }),
  );
}

export function closeRegion(region: RegionHandle): void {
  native.regionClose(region);
  openRegions.delete(region);
}

/** Deterministic pseudo-random bytes (xorshift32). */
export function fillPseudoRandom(buf: Buffer, seed: number): void {
  let x = (seed | 0) || 0x9e3779b9;
  for (let i = 0; i < buf.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    buf[i] = x & 0xff;
  }
}
