// An arriving guest's regions as files: each an unnamed file (O_TMPFILE) mapped for the pages
// to land in, in the memory directory, or beside its disk's name for a disk; for post-copy a
// memory region's fingerprints in an unnamed file of their own. The switchover names them
// (destination.ts commit, destination-postcopy.ts start); until then a crash of this agent
// leaves nothing behind.
import { closeSync } from 'node:fs';
import { dirname } from 'node:path';
import { FINGERPRINT_BYTES } from '../../protocol/limits.js';
import type { NativeAddon } from '../native.js';
import { fingerprintsPathOf, type IncomingRegion } from './destination-types.js';

export interface RegionFilesPlan {
  /** Each region's length and page size, as the offer gave them. */
  specs: readonly { lengthBytes: number; pageSizeBytes: number }[];
  /** Where each region is named at the switchover (a disk's path for a disk). */
  paths: readonly string[];
  /** The regions that are disks. */
  disks: ReadonlySet<number>;
  memoryDir: string;
  /** A pure post-copy: a memory file's holes are its missing pages. */
  holesAreMissing: boolean;
  /** Post-copy of either kind: memory regions keep their fingerprints in a file. */
  keepFingerprints: boolean;
}

/** Makes and maps every region's files; on a failure, closes what it made and throws. */
export function openIncomingRegions(native: NativeAddon, plan: RegionFilesPlan): IncomingRegion[] {
  const regions: IncomingRegion[] = [];
  try {
    for (const [index, spec] of plan.specs.entries()) regions.push(openRegion(native, plan, index, spec));
  } catch (err) {
    closeRegions(native, regions);
    throw err;
  }
  return regions;
}

function openRegion(native: NativeAddon, plan: RegionFilesPlan, index: number, spec: RegionFilesPlan['specs'][number]): IncomingRegion {
  // Pure post-copy: a sparse memory file, every page a hole (missing) until it arrives. A
  // disk is sparse always: what never arrives is a hole, as it was at the source.
  const disk = plan.disks.has(index);
  const holesAreMissing = !disk && plan.holesAreMissing;
  const dir = disk ? dirname(plan.paths[index]!) : plan.memoryDir;
  const fd = native.tmpfileCreate(dir, spec.lengthBytes, disk || holesAreMissing);
  const pageCount = spec.lengthBytes / spec.pageSizeBytes;
  // Post-copy keeps a memory region's fingerprints in a file of their own: they are the
  // only record of what arrived before the guest wrote over it, and must survive this agent.
  let fingerprintsFd: number | undefined;
  try {
    if (plan.keepFingerprints && !disk) fingerprintsFd = native.tmpfileCreate(plan.memoryDir, Math.max(1, pageCount * FINGERPRINT_BYTES));
    // Where holes are missing pages, none is a zero page already present: the fresh
    // fingerprints file (all zero bytes, no page's fingerprint) is kept as it is, so that
    // a zero page arriving before the switch (an eager one) is written, not skipped as
    // known: left a hole, the guest's fault on it would find it not missing and fault
    // again, forever. (Pure post-copy always keeps fingerprints, so the file is there.)
    const handle = native.regionMap(fd, spec.lengthBytes, spec.pageSizeBytes, {
      writable: true,
      trackHashes: true,
      initiallyZero: !holesAreMissing,
      ...(disk ? { zeroHoles: true } : {}),
      ...(fingerprintsFd === undefined ? {} : { fingerprintsFd }),
      ...(holesAreMissing ? { keepFingerprints: true } : {}),
    });
    return { fd, handle, pageCount, pageSizeBytes: spec.pageSizeBytes, lengthBytes: spec.lengthBytes, ...(disk ? { disk } : {}), ...(fingerprintsFd === undefined ? {} : { fingerprintsFd }) };
  } catch (err) {
    closeSync(fd);
    if (fingerprintsFd !== undefined) closeSync(fingerprintsFd);
    throw err;
  }
}

/** The files the switchover names, each with its descriptor now (for the arrival note). */
export function filesToName(regions: readonly IncomingRegion[], paths: readonly string[]): { path: string; fd: number }[] {
  return regions.flatMap((region, index) => [
    { path: paths[index]!, fd: region.fd },
    ...(region.fingerprintsFd === undefined ? [] : [{ path: fingerprintsPathOf(paths[index]!), fd: region.fingerprintsFd }]),
  ]);
}

/** Unmaps `regions` and closes their files, but the file of a region `keepFile` says goes on. */
export function closeRegions(native: NativeAddon, regions: readonly IncomingRegion[], keepFile: (region: IncomingRegion) => boolean = () => false): void {
  for (const region of regions) {
    try {
      native.regionClose(region.handle);
    } catch {}
    if (region.fingerprintsFd !== undefined) closeQuietly(region.fingerprintsFd);
    if (!keepFile(region)) closeQuietly(region.fd);
  }
}

/** Closes `fd`, if it is still open. */
export function closeQuietly(fd: number): void {
  try {
    closeSync(fd);
  } catch {}
}
