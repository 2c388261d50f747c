// Every limit of the wire format, by name. A receiver checks a peer-supplied length against
// these before it allocates anything for it.

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const TiB = 1024 * GiB;

/** Carried by hello: a peer that does not send it is not a gangway agent. */
export const MAGIC = 'GWAY';
/**
 * 2: accept carries the migration's secret and reattach must present it (a post-copy can be
 * carried on only by the agent the destination accepted it from).
 * 3: hello carries the agent's software version (agentVersion), for logs and for the message
 * a version mismatch gives.
 */
export const PROTOCOL_VERSION = 3;
/** A software version as hello carries it ("0.1.0", "1.2.3-rc.1+deb12"). */
export const AGENT_VERSION_PATTERN = /^[0-9A-Za-z][0-9A-Za-z.+~-]{0,63}$/;

/** The per-migration secret a destination hands out in its accept (random bytes). */
export const MIGRATION_SECRET_BYTES = 32;

/** [u32 BE headerLength][u32 BE payloadLength] before every frame. */
export const FRAME_PREFIX_BYTES = 8;
/** Room for the largest pages header: 8192 entries (96 KiB) and 8192 ref sources (64 KiB). */
export const MAX_HEADER_BYTES = 192 * KiB;
/** Nesting of maps and arrays in a header; the deepest legal one (offer) needs 4. */
export const MAX_HEADER_DEPTH = 8;

/** The largest payload a peer accepts; each side may announce less in its hello. */
export const DEFAULT_MAX_PAYLOAD_BYTES = 16 * MiB;
/** The smallest maxPayloadBytes a hello may announce: one page of PAGE_SIZE_MAX must fit. */
export const MIN_MAX_PAYLOAD_BYTES = 1 * MiB;

/** Entries are triples of u32 [kind, firstPage, pageCount]. */
export const ENTRY_WORDS = 3;
export const ENTRY_BYTES = ENTRY_WORDS * 4;
export const MAX_ENTRIES_PER_BATCH = 8192;

/** A ref entry's source: [slot, firstPage], two u32 in pages.refs. */
export const REF_WORDS = 2;
/**
 * Slots name the memories of a dedup group that refs copy from. The source numbers its
 * incoming regions below this bit; the destination numbers what it already runs (resident
 * content, which it verifies before copying) with this bit set.
 */
export const RESIDENT_SLOT_FLAG = 0x8000_0000;
/** Content fingerprints (XXH3-128 class) in dedupResident payloads. */
export const FINGERPRINT_BYTES = 16;
/** Fingerprints per dedupResident or pageFingerprints frame: 1 MiB of payload. */
export const MAX_FINGERPRINTS_PER_FRAME = 65_536;
/** Runs ([firstPage, pageCount]) per want frame. */
export const MAX_WANT_RUNS = 8192;
/** Runs per fetch frame (post-copy faults). */
export const MAX_FETCH_RUNS = 1024;

export const MAX_REGIONS = 16;
/** Guest names and region names (they may become file names at the destination). */
export const MAX_NAME_LENGTH = 64;
/** Agent ids and migration ids. */
export const MAX_ID_LENGTH = 64;
/** Room for an agent id that is `sha256:` and a certificate's 64 hex digits (agentIdOf). */
export const MAX_AGENT_ID_LENGTH = 80;
export const MAX_FEATURES = 32;
export const MAX_FEATURE_LENGTH = 32;
export const MAX_CONFIG_KEYS = 64;
export const MAX_CONFIG_KEY_LENGTH = 64;
export const MAX_CONFIG_STRING_LENGTH = 1024;
/** Human-readable text in reject, abort and error frames. */
export const MAX_MESSAGE_LENGTH = 1024;
/** A traffic rate in a trafficReport: 1 Tbit/s, well above any NIC, bytes per second. */
export const MAX_TRAFFIC_BYTES_PER_SEC = 1e12 / 8;
export const MAX_ERROR_CODE_LENGTH = 64;
export const MAX_DEVICE_STATE_BYTES = 16 * MiB;
/**
 * The largest device state the protocol can describe (its chunks' totalBytes); an agent
 * takes at most its configured maximum (default 256 MiB), checked before it allocates.
 */
export const MAX_DEVICE_STATE_TOTAL_BYTES = 4 * 1024 * MiB;

/** Page sizes in bytes: a power of two in [PAGE_SIZE_MIN, PAGE_SIZE_MAX]. */
export const PAGE_SIZE_MIN = 512;
export const PAGE_SIZE_MAX = 1 * MiB;
export const MAX_REGION_BYTES = 16 * TiB;
/** Page indices travel as u32, so a region has at most 2^32 pages (16 TiB of 4 KiB pages). */
export const MAX_REGION_PAGES = 2 ** 32;

/** A 128-bit digest (XXH3-128 class) per region. */
export const DIGEST_BYTES = 16;
/** Flow-control windows: accept.creditBytes and credit.bytes. */
export const MAX_CREDIT_BYTES = 1 * GiB;
/** Rounds fit a signed 32-bit integer so peers in any language can hold them. */
export const MAX_ROUND = 2 ** 31 - 1;
export const MIN_DOWNTIME_BUDGET_MS = 1;
export const MAX_DOWNTIME_BUDGET_MS = 600_000;
export const MAX_OFFER_CODECS = 8;

/** lz4-napi's block format starts with the uncompressed length as u32 LE. */
export const LZ4_SIZE_PREFIX_BYTES = 4;

/** LZ4_COMPRESSBOUND: the most an LZ4 block of `rawBytes` input can take. */
export function lz4CompressBound(rawBytes: number): number {
  return rawBytes + Math.floor(rawBytes / 255) + 16;
}

/** Agent ids and migration ids. */
export const ID_PATTERN = /^[A-Za-z0-9._:@-]+$/;
/** Guest and region names: safe as a file name, never hidden, never an option. */
export const NAME_PATTERN = /^[A-Za-z0-9_][A-Za-z0-9._-]*$/;
export const FEATURE_PATTERN = /^[A-Za-z0-9._-]+$/;
/** Error codes on the wire; a newer peer's code is accepted so it is reported, not dropped. */
export const ERROR_CODE_PATTERN = /^GANGWAY_ERR_[A-Z0-9_]+$/;
