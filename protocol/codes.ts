// Numeric code tables of the wire format. Value 0 is reserved "invalid" in every table so a
// zeroed buffer never means anything (Cloud Hypervisor vm-migration/src/protocol.rs).
// Codes are only ever added; a number once used keeps its meaning.

export const FrameType = {
  invalid: 0,
  hello: 1,
  offer: 2,
  accept: 3,
  reject: 4,
  pages: 5,
  roundEnd: 6,
  pause: 7,
  deviceState: 8,
  verify: 9,
  verified: 10,
  commit: 11,
  committed: 12,
  abort: 13,
  credit: 14,
  error: 15,
  // Content deduplication (feature 'dedup'): a group is the set of migrations whose pages
  // may refer to one another's, plus what the destination already runs.
  dedupOpen: 16,
  dedupResident: 17,
  dedupReady: 18,
  dedupClose: 19,
  want: 20,
  // Repair (feature 'repair'): after a digest mismatch the destination sends the
  // fingerprint of every page, and the source sends the pages that differ.
  pageFingerprints: 21,
  /** Post-copy switchover: the pages the destination does not have; the guest starts there. */
  postcopy: 22,
  /** Post-copy: pages the destination's guest faulted on, to be sent first. */
  fetch: 23,
  // Traffic (feature 'traffic'): a planner asks the peer agent for its measured traffic.
  trafficQuery: 24,
  trafficReport: 25,
  /**
   * Source, on a new session after the old one broke during post-copy: continue migration
   * X here. The destination answers with postcopy frames of the pages it still lacks (or
   * with verified, when it already has them all).
   */
  reattach: 26,
  /** Source, after a restart or a lost commit confirmation: what became of migration X there? */
  migrationQuery: 27,
  /** Destination: the answer (Whereabouts). */
  migrationAnswer: 28,
  /**
   * Destination (feature 'standby-ready'): the guest it started for the migration can take
   * its device state and run; the source pauses its guest only after this.
   */
  standbyReady: 29,
} as const;
export type FrameType = (typeof FrameType)[keyof typeof FrameType];
export type FrameTypeName = Exclude<keyof typeof FrameType, 'invalid'>;

export const Technique = { invalid: 0, precopy: 1, postcopy: 2, hybrid: 3 } as const;
export type Technique = (typeof Technique)[keyof typeof Technique];

export const Codec = { invalid: 0, raw: 1, lz4: 2 } as const;

/**
 * What a destination knows of a migration it was asked about (migrationAnswer):
 * unknown: no guest of it runs here (it never started, or it is gone);
 * running: its guest runs here, complete; receiving: its guest runs here while post-copy
 * pages are still coming; stranded: its guest started here but post-copy never completed.
 */
export const Whereabouts = { invalid: 0, unknown: 1, running: 2, receiving: 3, stranded: 4 } as const;
export type Whereabouts = (typeof Whereabouts)[keyof typeof Whereabouts];
export type Codec = (typeof Codec)[keyof typeof Codec];

/**
 * Kinds of a pages-frame entry. The numbers are shared with the native addon: agent/native.ts
 * re-exports them as ENTRY_ZERO, ENTRY_DATA and ENTRY_REF, and native/src/addon/region.h
 * defines ENTRY_ZERO = 1 and ENTRY_DATA = 2 for the C side.
 * ref: "copy this content from slot S, page P onwards" (pages.refs); only in a frame of a
 * migration that belongs to a dedup group, i.e. after both hellos listed 'dedup'.
 */
export const EntryKind = { invalid: 0, zero: 1, data: 2, ref: 3 } as const;
export type EntryKind = (typeof EntryKind)[keyof typeof EntryKind];

export const RejectReason = {
  invalid: 0,
  busy: 1,
  guestExists: 2,
  noSpace: 3,
  unsupported: 4,
  badSpec: 5,
  shuttingDown: 6,
  versionMismatch: 7,
} as const;
export type RejectReason = (typeof RejectReason)[keyof typeof RejectReason];

export const GuestKind = { invalid: 0, process: 1, qemu: 2 } as const;
export type GuestKind = (typeof GuestKind)[keyof typeof GuestKind];

/** Any of the tables above. */
export type CodeTable = Readonly<Record<string, number>>;

/** The name of `code` in `table` ('invalid' for 0), or undefined when the table has no such code. */
export function nameOf(table: CodeTable, code: number): string | undefined {
  for (const [name, value] of Object.entries(table)) {
    if (value === code) return name;
  }
  return undefined;
}

/** True when `code` is a usable value of `table`: known and not the reserved 0. */
export function isValidCode<T extends CodeTable>(table: T, code: unknown): code is T[keyof T] {
  return typeof code === 'number' && code !== 0 && nameOf(table, code) !== undefined;
}

/** For messages: 'lz4 (2)', 'unknown (9)'. */
export function describeCode(table: CodeTable, code: number): string {
  return `${nameOf(table, code) ?? 'unknown'} (${code})`;
}

/** The usable codes of `table` for messages: 'raw (1), lz4 (2)'. */
export function listCodes(table: CodeTable): string {
  return Object.entries(table)
    .filter(([, value]) => value !== 0)
    .map(([name, value]) => `${name} (${value})`)
    .join(', ');
}

const frameTypeNames: ReadonlyMap<number, FrameTypeName> = new Map(
  Object.entries(FrameType)
    .filter(([, value]) => value !== 0)
    .map(([name, value]) => [value, name as FrameTypeName]),
);

/** The frame type name of a wire code, or undefined for 0 and unknown codes. */
export function frameTypeName(code: number): FrameTypeName | undefined {
  return frameTypeNames.get(code);
}
