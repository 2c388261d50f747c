// Every limit of our NBD codec, by name. A decoder checks a peer-supplied length or count
// against these before it buffers or allocates anything for it. Where the spec gives a
// number we take it; where it leaves the choice to the implementation the reason is given.

const KiB = 1024;
const MiB = 1024 * KiB;

/** Strings (export names, context names, messages): the spec's MUST ("no longer than 4096 bytes"). */
export const NBD_MAX_STRING_BYTES = 4096;

/**
 * Queries in one NBD_OPT_SET/LIST_META_CONTEXT, and contexts one SET may select. Our server
 * offers base:allocation plus what an export names (a dirty bitmap or two); QEMU and libnbd
 * clients ask for one to three. More is answered with NBD_REP_ERR_TOO_BIG, which the spec
 * allows for exactly this.
 */
export const NBD_MAX_META_CONTEXT_QUERIES = 16;

/**
 * Option data a server buffers: the largest option it parses at full size, a
 * SET/LIST_META_CONTEXT with a 4096-byte export name and 16 queries of 4096 bytes
 * (4 + 4096 + 4 + 16 × (4 + 4096) = 69,704 bytes). A GO's list of information requests fits
 * well inside. An option over this closes the connection (the spec lets a server treat a
 * denial of service so); below it, unknown options are read and answered NBD_REP_ERR_UNSUP.
 */
export const NBD_MAX_OPTION_DATA_BYTES = 4 + NBD_MAX_STRING_BYTES + 4 + NBD_MAX_META_CONTEXT_QUERIES * (4 + NBD_MAX_STRING_BYTES);

/**
 * Options one connection may send before it enters transmission. QEMU and libnbd send fewer
 * than ten; nbdinfo --list sends a few per export. Every option is answered, so memory never
 * grows with the count; the bound stops a client that would hold a connection in haggling
 * forever (the spec: a server MAY hard-disconnect a client it judges a denial of service).
 */
export const NBD_MAX_HANDSHAKE_OPTIONS = 1024;

/**
 * Data of one option reply a client buffers: the largest reply we know, NBD_REP_SERVER with a
 * name and a description of 4096 bytes each behind its 4-byte name length.
 */
export const NBD_MAX_OPTION_REPLY_BYTES = 4 + 2 * NBD_MAX_STRING_BYTES;

/** NBD_REP_SERVER / NBD_REP_META_CONTEXT replies a client takes for one LIST option (4 MiB of names at most). */
export const NBD_MAX_LIST_REPLIES = 1024;

/**
 * The largest READ or WRITE payload: 2^25, the spec's interoperable maximum (any payload up
 * to it SHOULD NOT be taken for a denial of service) and QEMU's NBD_MAX_BUFFER_SIZE. Our
 * server advertises it in NBD_INFO_BLOCK_SIZE; a WRITE over it closes the connection
 * (its payload cannot be skipped without reading it), a READ over it is answered EINVAL.
 */
export const NBD_MAX_PAYLOAD_BYTES = 32 * MiB;

/** The spec's bound on a minimum block size (a power of two, at most 2^16). */
export const NBD_MAX_MIN_BLOCK_BYTES = 64 * KiB;
/** The preferred block size our exports advertise: a page, the granularity of holes on Linux file systems. */
export const NBD_PREFERRED_BLOCK_BYTES = 4 * KiB;

/**
 * Extents in one NBD_REPLY_TYPE_BLOCK_STATUS chunk: the spec's "SHOULD NOT send more than
 * 2^20", so a client takes what any conforming server sends (an 8 MiB chunk at most).
 */
export const NBD_MAX_EXTENTS_PER_CHUNK = 2 ** 20;

/**
 * An error chunk: error (4) + message length (2) + a message of at most 4096 bytes + room for
 * the trailing fields of error types newer than NBD_REPLY_TYPE_ERROR_OFFSET (which has 8).
 */
export const NBD_MAX_ERROR_CHUNK_BYTES = 6 + NBD_MAX_STRING_BYTES + 64;

/** The 124 zero bytes after an NBD_OPT_EXPORT_NAME reply, unless both sides set NO_ZEROES. */
export const NBD_EXPORT_NAME_ZEROES = 124;

/**
 * Requests one connection has in flight, and the request bytes they may hold (READ lengths
 * plus WRITE payloads). 16 is QEMU's NBD_MAX_REQUESTS; 64 MiB lets two requests of the
 * maximum payload overlap while a hostile client holding its replies unread pins at most
 * that much. A single request is always admitted when none is in flight.
 */
export const NBD_DEFAULT_MAX_IN_FLIGHT = 16;
export const NBD_DEFAULT_MAX_IN_FLIGHT_BYTES = 64 * MiB;

/** Request lengths are u32: the largest effect a TRIM, WRITE_ZEROES or BLOCK_STATUS can name. */
export const NBD_MAX_REQUEST_LENGTH = 0xffff_ffff;
