// The frames of the gangway protocol, as a discriminated union on `type` (the FrameType
// name; the wire carries its code), and their named constructors (`Frame.pages({...})`). Field limits are in limits.ts and are enforced by
// the codec in both directions (frame-schema.ts).
import type { Codec, FrameTypeName, GuestKind, RejectReason, Technique, Whereabouts } from './codes.js';
import { MAGIC, PROTOCOL_VERSION } from './limits.js';

/** First frame each side sends on a session. */
export interface HelloFrame {
  type: 'hello';
  magic: typeof MAGIC;
  version: number;
  agentId: string;
  /** The agent's software version (package.json's), for logs and mismatch messages. */
  agentVersion: string;
  /** Optional capabilities; a feature is used only when both hellos list it. */
  features: string[];
  /** The largest payload this agent accepts; the other side sends no larger frame. */
  maxPayloadBytes: number;
}

export interface RegionSpec {
  name: string;
  /** A positive multiple of pageSizeBytes. */
  lengthBytes: number;
  /** A power of two in [PAGE_SIZE_MIN, PAGE_SIZE_MAX]. */
  pageSizeBytes: number;
}

export type GuestConfigValue = string | number | boolean;

export interface GuestSpec {
  name: string;
  kind: GuestKind;
  /** Region i of this list is `region: i` in pages frames. */
  regions: RegionSpec[];
  /** Adapter settings needed to resume the guest (command line, QEMU machine, ...). */
  config: Record<string, GuestConfigValue>;
}

export interface OfferFrame {
  type: 'offer';
  migrationId: string;
  guest: GuestSpec;
  technique: Technique;
  downtimeBudgetMs: number;
  /** The codecs the source may use in pages frames. */
  codecs: Codec[];
  /**
   * Membership of a dedup group (opened by dedupOpen): refs in this migration's pages may
   * copy from any slot of the group, and region i of this guest is slot `slots[i]`.
   */
  dedup?: OfferDedup;
  /**
   * The source's plan reserves bandwidth at this priority (seed 003, Algorithm 2): the
   * destination reserves its inbound side for the migration likewise, when it can shape it.
   */
  priority?: 'high' | 'medium' | 'low';
}

export interface OfferDedup {
  group: string;
  /** One per region; below RESIDENT_SLOT_FLAG and unique in the group. */
  slots: number[];
}

export interface AcceptFrame {
  type: 'accept';
  migrationId: string;
  /** The initial flow-control window for this migration. */
  creditBytes: number;
  /**
   * Random bytes only the two agents know: a reattach must present them, so an agent that
   * learned or claims the source's id cannot carry on (and write into) this migration.
   */
  secret: Uint8Array;
}

export interface RejectFrame {
  type: 'reject';
  migrationId: string;
  reason: RejectReason;
  message: string;
}

export interface PagesFrame {
  type: 'pages';
  migrationId: string;
  /** Index into the offer's guest.regions. */
  region: number;
  round: number;
  codec: Codec;
  /**
   * Triples [kind, firstPage, pageCount] (EntryKind); data pages are packed in entry order
   * in the payload. Travels in the header as little-endian u32s.
   */
  entries: Uint32Array;
  /** Uncompressed payload length: data pages * page size. */
  rawBytes: number;
  /** The frame payload: raw pages, or an lz4-napi block with its u32 LE size prefix. */
  payload: Uint8Array;
  /**
   * One pair [slot, firstPage] per ref entry, in entry order: ref entry [3, p, n] copies
   * pages firstPage..firstPage+n-1 of that slot into pages p..p+n-1, one page at a time in
   * order, as the stream stands when the frame is applied. Travels as little-endian u32s.
   */
  refs?: Uint32Array;
}

export interface RoundEndFrame {
  type: 'roundEnd';
  migrationId: string;
  round: number;
  /** Pages sent in that round. */
  pageCount: number;
  /** The last round: sent after pause, followed by device state and verification. */
  final: boolean;
}

/** The source paused the guest; the final round follows. */
export interface PauseFrame {
  type: 'pause';
  migrationId: string;
}

/**
 * One chunk of the guest's device state (QEMU's device state; none for a process guest),
 * sent once the guest is paused. Chunks come in order: `offsetBytes` is what came before,
 * `totalBytes` the whole state's size (the same in every chunk, so the receiver checks it
 * against its limit before it allocates).
 */
export interface DeviceStateFrame {
  type: 'deviceState';
  migrationId: string;
  offsetBytes: number;
  totalBytes: number;
  /** The frame payload: this chunk's bytes. */
  state: Uint8Array;
}

export interface VerifyFrame {
  type: 'verify';
  migrationId: string;
  /** One DIGEST_BYTES digest per region, in region order. */
  digests: Uint8Array[];
}

export interface VerifiedFrame {
  type: 'verified';
  migrationId: string;
  match: boolean;
  /** The destination's digests, one per region. */
  digests: Uint8Array[];
  /** Post-copy: how the missing pages came, as the destination saw it. */
  postcopy?: PostcopyReport;
}

export interface PostcopyReport {
  missingPages: number;
  faults: number;
  fetchedPages: number;
  pushedPages: number;
  faultP50Ms: number;
  faultP99Ms: number;
  faultMaxMs: number;
}

export interface CommitFrame {
  type: 'commit';
  migrationId: string;
}

export interface CommittedFrame {
  type: 'committed';
  migrationId: string;
  /** Time the destination spent between the guest resuming and sending this frame. */
  resumeToSendMs: number;
}

export interface AbortFrame {
  type: 'abort';
  migrationId: string;
  /** An ErrorCode; a code this agent does not know is kept verbatim (see PeerError). */
  code: string;
  message: string;
}

export interface CreditFrame {
  type: 'credit';
  migrationId: string;
  bytes: number;
}

/** Session-level failure; the sender closes the session after it. */
export interface ErrorFrame {
  type: 'error';
  code: string;
  message: string;
}

/** Source: opens a dedup group on this session; the destination answers with dedupReady. */
export interface DedupOpenFrame {
  type: 'dedupOpen';
  group: string;
  /** Whether the destination should offer what it already runs (dedupResident frames). */
  resident: boolean;
}

/**
 * Destination: fingerprints of pages it already holds, as a resident slot of the group.
 * Refs to it are verified against these fingerprints when applied; a page that changed is
 * asked for again with want.
 */
export interface DedupResidentFrame {
  type: 'dedupResident';
  group: string;
  /** RESIDENT_SLOT_FLAG is set. */
  slot: number;
  /** The slot's size in pages (the same in every frame for the slot). */
  pageCount: number;
  pageSizeBytes: number;
  firstPage: number;
  /** The frame payload: FINGERPRINT_BYTES per page from firstPage. */
  fingerprints: Uint8Array;
}

/** Destination: every dedupResident of the group was sent; the group takes offers. */
export interface DedupReadyFrame {
  type: 'dedupReady';
  group: string;
  residentSlots: number;
  residentPages: number;
}

/** Source: no more migrations or refs in this group; the destination frees what it kept. */
export interface DedupCloseFrame {
  type: 'dedupClose';
  group: string;
}

/** Destination: send these pages again (a ref to resident content found it changed). */
export interface WantFrame {
  type: 'want';
  migrationId: string;
  region: number;
  /** Pairs [firstPage, pageCount]; travels as little-endian u32s. */
  runs: Uint32Array;
  /** Pairs [slot, page] of the resident pages (or a committed member's) that no longer hold what was offered. */
  stale: Uint32Array;
}

/**
 * Destination, after verified{match: false} when both hellos list 'repair': the
 * fingerprint of each page it holds, so the source can send the pages that differ.
 */
export interface PageFingerprintsFrame {
  type: 'pageFingerprints';
  migrationId: string;
  region: number;
  firstPage: number;
  /** The frame payload: FINGERPRINT_BYTES per page from firstPage. */
  fingerprints: Uint8Array;
}

/** Either side (feature 'traffic'): asks for the peer's measured uplink traffic; answered by trafficReport. */
export interface TrafficQueryFrame {
  type: 'trafficQuery';
  requestId: string;
}

/**
 * The answer to trafficQuery: the workload's smoothed rates on the agent's uplink, bytes per
 * second (migration traffic excluded where the agent can tell it apart). `measured` false:
 * the agent measures nothing (no uplink, not root, ...), the rates are 0 and `reason` says why.
 */
export interface TrafficReportFrame {
  type: 'trafficReport';
  requestId: string;
  measured: boolean;
  rxBytesPerSec: number;
  txBytesPerSec: number;
  /** The uplink's capacity, bytes per second; 0 when not configured. */
  linkBytesPerSec: number;
  reason: string;
}

/**
 * Source, paused, post-copy (offer.technique postcopy or hybrid): the pages of `region` the
 * destination does not hold, or holds stale (`missing`, [firstPage, pageCount] runs as the
 * payload). With `more`, further postcopy frames add runs; the last one (more: false)
 * starts the guest at the destination, which answers `committed` once it runs. From then
 * on the source pushes the missing pages and answers fetch frames first.
 */
export interface PostcopyFrame {
  type: 'postcopy';
  migrationId: string;
  region: number;
  more: boolean;
  /** The frame payload: little-endian u32 pairs [firstPage, pageCount]. */
  missing: Uint32Array;
}

/** Destination, post-copy: its guest faulted on these missing pages; send them first. */
export interface FetchFrame {
  type: 'fetch';
  migrationId: string;
  region: number;
  /** Pairs [firstPage, pageCount]; travels as little-endian u32s. */
  runs: Uint32Array;
}

/** Source: carry on post-copy migration `migrationId` on this session (see FrameType.reattach). */
export interface ReattachFrame {
  type: 'reattach';
  migrationId: string;
  /** The secret the destination's accept gave this migration. */
  secret: Uint8Array;
}

/** Source: what became of migration `migrationId` at this destination? */
export interface MigrationQueryFrame {
  type: 'migrationQuery';
  migrationId: string;
}

/**
 * Destination, when both hellos list 'standby-ready': the standby guest it started for the
 * migration is up and can take its device state (a QEMU: its QMP answers and its incoming
 * migration listens). The source's switchover waits for it, so that the guest's start
 * there never waits on the standby's own (a QEMU's took 40-70 ms, inside a post-copy's
 * downtime when the source paused right after the accept).
 */
export interface StandbyReadyFrame {
  type: 'standbyReady';
  migrationId: string;
}

/** Destination: the answer to a migrationQuery. */
export interface MigrationAnswerFrame {
  type: 'migrationAnswer';
  migrationId: string;
  whereabouts: Whereabouts;
}

export type Frame =
  | HelloFrame
  | OfferFrame
  | AcceptFrame
  | RejectFrame
  | PagesFrame
  | RoundEndFrame
  | PauseFrame
  | DeviceStateFrame
  | VerifyFrame
  | VerifiedFrame
  | CommitFrame
  | CommittedFrame
  | AbortFrame
  | CreditFrame
  | ErrorFrame
  | DedupOpenFrame
  | DedupResidentFrame
  | DedupReadyFrame
  | DedupCloseFrame
  | WantFrame
  | PageFingerprintsFrame
  | TrafficQueryFrame
  | TrafficReportFrame
  | PostcopyFrame
  | FetchFrame
  | ReattachFrame
  | MigrationQueryFrame
  | MigrationAnswerFrame
  | StandbyReadyFrame;

/** The frame of a given type name: FrameOf<'pages'> is PagesFrame. */
export type FrameOf<T extends FrameTypeName> = Extract<Frame, { type: T }>;

/** Frames that belong to one migration of the session. */
export type MigrationFrame = Extract<Frame, { migrationId: string }>;

type Fields<T extends Frame> = Omit<T, 'type'>;

export const Frame = {
  /** magic and version default to this agent's. */
  hello(fields: Omit<HelloFrame, 'type' | 'magic' | 'version'> & Partial<Pick<HelloFrame, 'magic' | 'version'>>): HelloFrame {
    return { ...fields, type: 'hello', magic: fields.magic ?? MAGIC, version: fields.version ?? PROTOCOL_VERSION };
  },
  offer: (fields: Fields<OfferFrame>): OfferFrame => ({ type: 'offer', ...fields }),
  accept: (fields: Fields<AcceptFrame>): AcceptFrame => ({ type: 'accept', ...fields }),
  reject: (fields: Fields<RejectFrame>): RejectFrame => ({ type: 'reject', ...fields }),
  pages: (fields: Fields<PagesFrame>): PagesFrame => ({ type: 'pages', ...fields }),
  roundEnd: (fields: Fields<RoundEndFrame>): RoundEndFrame => ({ type: 'roundEnd', ...fields }),
  pause: (fields: Fields<PauseFrame>): PauseFrame => ({ type: 'pause', ...fields }),
  deviceState: (fields: Fields<DeviceStateFrame>): DeviceStateFrame => ({ type: 'deviceState', ...fields }),
  verify: (fields: Fields<VerifyFrame>): VerifyFrame => ({ type: 'verify', ...fields }),
  verified: (fields: Fields<VerifiedFrame>): VerifiedFrame => ({ type: 'verified', ...fields }),
  commit: (fields: Fields<CommitFrame>): CommitFrame => ({ type: 'commit', ...fields }),
  committed: (fields: Fields<CommittedFrame>): CommittedFrame => ({ type: 'committed', ...fields }),
  abort: (fields: Fields<AbortFrame>): AbortFrame => ({ type: 'abort', ...fields }),
  credit: (fields: Fields<CreditFrame>): CreditFrame => ({ type: 'credit', ...fields }),
  error: (fields: Fields<ErrorFrame>): ErrorFrame => ({ type: 'error', ...fields }),
  dedupOpen: (fields: Fields<DedupOpenFrame>): DedupOpenFrame => ({ type: 'dedupOpen', ...fields }),
  dedupResident: (fields: Fields<DedupResidentFrame>): DedupResidentFrame => ({ type: 'dedupResident', ...fields }),
  dedupReady: (fields: Fields<DedupReadyFrame>): DedupReadyFrame => ({ type: 'dedupReady', ...fields }),
  dedupClose: (fields: Fields<DedupCloseFrame>): DedupCloseFrame => ({ type: 'dedupClose', ...fields }),
  want: (fields: Fields<WantFrame>): WantFrame => ({ type: 'want', ...fields }),
  pageFingerprints: (fields: Fields<PageFingerprintsFrame>): PageFingerprintsFrame => ({ type: 'pageFingerprints', ...fields }),
  trafficQuery: (fields: Fields<TrafficQueryFrame>): TrafficQueryFrame => ({ type: 'trafficQuery', ...fields }),
  trafficReport: (fields: Fields<TrafficReportFrame>): TrafficReportFrame => ({ type: 'trafficReport', ...fields }),
  postcopy: (fields: Fields<PostcopyFrame>): PostcopyFrame => ({ type: 'postcopy', ...fields }),
  fetch: (fields: Fields<FetchFrame>): FetchFrame => ({ type: 'fetch', ...fields }),
  reattach: (fields: Fields<ReattachFrame>): ReattachFrame => ({ type: 'reattach', ...fields }),
  migrationQuery: (fields: Fields<MigrationQueryFrame>): MigrationQueryFrame => ({ type: 'migrationQuery', ...fields }),
  migrationAnswer: (fields: Fields<MigrationAnswerFrame>): MigrationAnswerFrame => ({ type: 'migrationAnswer', ...fields }),
  standbyReady: (fields: Fields<StandbyReadyFrame>): StandbyReadyFrame => ({ type: 'standbyReady', ...fields }),
} as const;
