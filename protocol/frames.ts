// The frames of the gangway protocol, as a discriminated union on `type` (the FrameType
// name; the wire carries its code), and their named constructors (`Frame.pages({...})`). Field limits are in limits.ts and are enforced by
// the codec in both directions (frame-schema.ts).
import type { Codec, FrameTypeName, GuestKind, RejectReason, Technique } from './codes.js';
import { MAGIC, PROTOCOL_VERSION } from './limits.js';

/** First frame each side sends on a session. */
export interface HelloFrame {
  type: 'hello';
  magic: typeof MAGIC;
  version: number;
  agentId: string;
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
}

export interface AcceptFrame {
  type: 'accept';
  migrationId: string;
  /** The initial flow-control window for this migration. */
  creditBytes: number;
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

export interface DeviceStateFrame {
  type: 'deviceState';
  migrationId: string;
  /** The frame payload: an opaque blob (empty for a process guest, QEMU's device state). */
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
  | ErrorFrame;

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
} as const;
