// Reads the synthetic guest's header (page 0 of its first memory region). Mirrors
// native/src/guest-layout.h: fixed offsets, little-endian.
import { closeSync, openSync, readSync } from 'node:fs';

export const GUEST_MAGIC = 'GWGUEST1';
export const GUEST_PAGE_SIZE = 4096;
const HEADER_BYTES = 328;
/** Memory regions a synthetic guest may have (GUEST_MAX_REGIONS). */
export const GUEST_MAX_REGIONS = 16;

export const GuestProfile = { zero: 1, 'os-image': 2, random: 3 } as const;
export type GuestProfileName = keyof typeof GuestProfile;

export interface GuestHeader {
  memoryBytes: number;
  pageCount: number;
  pageSizeBytes: number;
  seed: number;
  imageSeed: number;
  sharedPermille: number;
  hotPermille: number;
  profile: GuestProfileName | 'unknown';
  dirtyRateBytesPerSec: number;
  totalWrites: number;
  passes: number;
  stalePages: number;
  checkedPages: number;
  resumes: number;
  resumeStalePages: number;
  resumeCheckedPages: number;
  resumeCheckDone: boolean;
  metaErrors: number;
  hotPageCount: number;
  passesAtResume: number;
  /** The size of each memory region (file), region 0 first. */
  regionBytes: number[];
  /** Device states taken back on resume, saved at pauses, and resumes whose device state was lost, stale, another guest's or corrupt. */
  deviceLoads: number;
  deviceSaves: number;
  deviceErrors: number;
}

export function parseGuestHeader(buf: Buffer): GuestHeader {
  if (buf.length < HEADER_BYTES || buf.toString('latin1', 0, 8) !== GUEST_MAGIC) {
    throw new Error('not a gangway guest memory file (bad magic)');
  }
  const u64 = (offset: number) => Number(buf.readBigUInt64LE(offset));
  const u32 = (offset: number) => buf.readUInt32LE(offset);
  const profileCode = u32(56);
  const profile = (Object.entries(GuestProfile).find(([, code]) => code === profileCode)?.[0] ??
    'unknown') as GuestHeader['profile'];
  const resumes = u32(124);
  const layout = u32(8);
  // Layout 1 was one region, with zeros where layout 2 keeps the regions.
  const regionCount = layout === 1 ? 1 : u32(168);
  if (regionCount < 1 || regionCount > GUEST_MAX_REGIONS) throw new Error(`the header names ${regionCount} memory regions`);
  const regionBytes = layout === 1 ? [u64(16)] : Array.from({ length: regionCount }, (_, r) => u64(200 + 8 * r));
  return {
    pageSizeBytes: u32(12),
    memoryBytes: u64(16),
    pageCount: u64(24),
    seed: u64(32),
    imageSeed: u64(40),
    sharedPermille: u32(48),
    hotPermille: u32(52),
    profile,
    dirtyRateBytesPerSec: u64(64),
    totalWrites: u64(72),
    passes: u64(80),
    stalePages: u64(96),
    checkedPages: u64(104),
    resumes,
    resumeStalePages: u64(128),
    resumeCheckedPages: u64(136),
    resumeCheckDone: u32(144) === resumes,
    metaErrors: u32(148),
    hotPageCount: u64(152),
    passesAtResume: u64(160),
    regionBytes,
    deviceLoads: layout === 1 ? 0 : u32(172),
    deviceSaves: layout === 1 ? 0 : u64(176),
    deviceErrors: layout === 1 ? 0 : u32(192),
  };
}

export function readGuestHeader(path: string): GuestHeader {
  const fd = openSync(path, 'r');
  try {
    const buf = Buffer.alloc(HEADER_BYTES);
    readSync(fd, buf, 0, HEADER_BYTES, 0);
    return parseGuestHeader(buf);
  } finally {
    closeSync(fd);
  }
}
