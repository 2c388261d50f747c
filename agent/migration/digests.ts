// The switchover's check of memory: a 128-bit digest per region on each side, compared (the
// source's reads its paused memory whole; the destination's is over the fingerprints of the
// pages as it wrote them) and, after a mismatch, every page's fingerprint, from which the
// source sends the pages that differ as one more final round (a repair).
import { Frame } from '../../protocol/index.js';
import { FINGERPRINT_BYTES, MAX_FINGERPRINTS_PER_FRAME } from '../../protocol/limits.js';
import type { NativeAddon } from '../native.js';
import type { PeerSession } from '../peer/session.js';
import type { IncomingRegion } from './destination-types.js';

export function sameDigests(a: readonly Uint8Array[], b: readonly Uint8Array[]): boolean {
  return a.length === b.length && a.every((digest, i) => Buffer.from(digest).equals(Buffer.from(b[i]!)));
}

/** Repairs of a digest mismatch the destination allows before it gives the migration up. */
export const MAX_REPAIRS = 2;

/**
 * Each region's digest: over the fingerprints this agent took of every page as it wrote it
 * (nothing else writes the memory before the guest runs here; a disk's holes are zeros in
 * them). Reading 1 GiB back took 60-70 ms of a switchover's downtime here.
 */
export function digestsHere(native: NativeAddon, regions: readonly IncomingRegion[]): Promise<Buffer[]> {
  return Promise.all(regions.map((region) => native.regionDigest(region.handle, 'tracked')));
}

/** Every page's fingerprint, read now from the memory, as pageFingerprints frames. */
export function sendPageFingerprints(native: NativeAddon, session: PeerSession, migrationId: string, regions: readonly IncomingRegion[]): void {
  for (const [index, region] of regions.entries()) {
    for (let first = 0; first < region.pageCount; first += MAX_FINGERPRINTS_PER_FRAME) {
      const count = Math.min(MAX_FINGERPRINTS_PER_FRAME, region.pageCount - first);
      const fingerprints = new Uint8Array(count * FINGERPRINT_BYTES);
      native.regionFingerprints(region.handle, first, count, fingerprints);
      session.send(Frame.pageFingerprints({ migrationId, region: index, firstPage: first, fingerprints }));
    }
  }
}
