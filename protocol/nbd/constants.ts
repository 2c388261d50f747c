// NBD's numbers, from NetworkBlockDevice/nbd doc/proto.md (the "Values" section) and QEMU's
// docs/interop/nbd.rst for the qemu: namespace. Nothing here is ours to choose.
//
// The house rule that 0 is reserved for "invalid" cannot hold here: NBD_CMD_READ,
// NBD_INFO_EXPORT and NBD_REPLY_TYPE_NONE are 0 on the wire. What protects NBD from a zeroed
// buffer is its magic numbers: every option, option reply, request and reply starts with one,
// and the decoders check it before anything else.

/** 'NBDMAGIC', first 8 bytes of the server's greeting (also called INIT_PASSWD). */
export const NBD_INIT_MAGIC = 0x4e42444d41474943n;
/** 'IHAVEOPT': second 8 bytes of a newstyle greeting, and the start of every option. */
export const NBD_OPTS_MAGIC = 0x49484156454f5054n;
/** The second magic of an oldstyle greeting (cliserv_magic): a server we do not speak to. */
export const NBD_OLDSTYLE_MAGIC = 0x00420281861253n;
/** Start of every option reply (fixed newstyle). */
export const NBD_REP_MAGIC = 0x3e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
/** Reserved by the EXTENDED_HEADERS extension, which this implementation does not speak. */
export const NBD_EXTENDED_REQUEST_MAGIC = 0x21e41c71;
export const NBD_EXTENDED_REPLY_MAGIC = 0x6e8a278c;

/** Handshake flags (16 bits, server's greeting). */
export const HandshakeFlag = { fixedNewstyle: 1 << 0, noZeroes: 1 << 1 } as const;
/** Client flags (32 bits, the client's answer to the greeting). */
export const ClientFlag = { fixedNewstyle: 1 << 0, noZeroes: 1 << 1 } as const;

/** Transmission flags (16 bits, in NBD_INFO_EXPORT or after NBD_OPT_EXPORT_NAME). */
export const TransmissionFlag = {
  hasFlags: 1 << 0,
  readOnly: 1 << 1,
  sendFlush: 1 << 2,
  sendFua: 1 << 3,
  rotational: 1 << 4,
  sendTrim: 1 << 5,
  sendWriteZeroes: 1 << 6,
  sendDf: 1 << 7,
  canMultiConn: 1 << 8,
  sendResize: 1 << 9,
  sendCache: 1 << 10,
  sendFastZero: 1 << 11,
  blockStatusPayload: 1 << 12,
} as const;

/** Option types of the handshake. 4 (PEEK_EXPORT) was withdrawn. */
export const NbdOption = {
  exportName: 1,
  abort: 2,
  list: 3,
  startTls: 5,
  info: 6,
  go: 7,
  structuredReply: 8,
  listMetaContext: 9,
  setMetaContext: 10,
  extendedHeaders: 11,
} as const;
export type NbdOption = (typeof NbdOption)[keyof typeof NbdOption];

const REP_ERR = 0x8000_0000;
/** Option reply types. Errors have bit 31 set. */
export const NbdRep = {
  ack: 1,
  server: 2,
  info: 3,
  metaContext: 4,
  errUnsup: REP_ERR + 1,
  errPolicy: REP_ERR + 2,
  errInvalid: REP_ERR + 3,
  errPlatform: REP_ERR + 4,
  errTlsReqd: REP_ERR + 5,
  errUnknown: REP_ERR + 6,
  errShutdown: REP_ERR + 7,
  errBlockSizeReqd: REP_ERR + 8,
  errTooBig: REP_ERR + 9,
  errExtHeaderReqd: REP_ERR + 10,
} as const;
export type NbdRep = (typeof NbdRep)[keyof typeof NbdRep];

export function isRepError(type: number): boolean {
  return type >= REP_ERR;
}

/** Information types in NBD_REP_INFO (and requested in NBD_OPT_INFO/GO). */
export const NbdInfo = { export: 0, name: 1, description: 2, blockSize: 3 } as const;
export type NbdInfo = (typeof NbdInfo)[keyof typeof NbdInfo];

/** Request types of the transmission phase. 8 (RESIZE) is an experimental extension we do not speak. */
export const NbdCommand = {
  read: 0,
  write: 1,
  disc: 2,
  flush: 3,
  trim: 4,
  cache: 5,
  writeZeroes: 6,
  blockStatus: 7,
} as const;
export type NbdCommand = (typeof NbdCommand)[keyof typeof NbdCommand];

/** Command flags (16 bits of every request). */
export const CommandFlag = {
  fua: 1 << 0,
  noHole: 1 << 1,
  df: 1 << 2,
  reqOne: 1 << 3,
  fastZero: 1 << 4,
  payloadLen: 1 << 5,
} as const;

/** Which command flags each command may carry (FUA on any, as the spec allows). */
export const ALLOWED_COMMAND_FLAGS: Readonly<Record<NbdCommand, number>> = {
  [NbdCommand.read]: CommandFlag.fua | CommandFlag.df,
  [NbdCommand.write]: CommandFlag.fua,
  [NbdCommand.disc]: CommandFlag.fua,
  [NbdCommand.flush]: CommandFlag.fua,
  [NbdCommand.trim]: CommandFlag.fua,
  [NbdCommand.cache]: CommandFlag.fua,
  [NbdCommand.writeZeroes]: CommandFlag.fua | CommandFlag.noHole | CommandFlag.fastZero,
  [NbdCommand.blockStatus]: CommandFlag.fua | CommandFlag.reqOne,
};

/** Structured reply flags. */
export const ReplyFlag = { done: 1 << 0 } as const;

const REPLY_ERR = 0x8000;
/** Structured reply chunk types. Error chunks have bit 15 set. */
export const ReplyType = {
  none: 0,
  offsetData: 1,
  offsetHole: 2,
  blockStatus: 5,
  error: REPLY_ERR + 1,
  errorOffset: REPLY_ERR + 2,
} as const;
export type ReplyType = (typeof ReplyType)[keyof typeof ReplyType];

export function isReplyTypeError(type: number): boolean {
  return (type & REPLY_ERR) !== 0;
}

/** Error values of replies (a restricted set of errno numbers). */
export const NbdErrno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;
export type NbdErrno = (typeof NbdErrno)[keyof typeof NbdErrno];

/** Extent flags of `base:allocation`. */
export const AllocationFlag = { hole: 1 << 0, zero: 1 << 1 } as const;
/** Extent flags of `qemu:dirty-bitmap:NAME`. */
export const DirtyFlag = { dirty: 1 << 0 } as const;

export const BASE_ALLOCATION = 'base:allocation';
export const QEMU_DIRTY_BITMAP_PREFIX = 'qemu:dirty-bitmap:';
export const QEMU_ALLOCATION_DEPTH = 'qemu:allocation-depth';

type Table = Readonly<Record<string, number>>;

/** The name of `code` in an NBD table, or undefined. Unlike codes.ts nameOf, 0 may be a real code. */
export function nbdName(table: Table, code: number): string | undefined {
  for (const [name, value] of Object.entries(table)) if (value === code) return name;
  return undefined;
}

/** For messages: 'errUnknown (2147483654)', 'unknown (12)'. */
export function describeNbd(table: Table, code: number): string {
  return `${nbdName(table, code) ?? 'unknown'} (${code})`;
}

/** The NBD errno's name ('EINVAL'), or 'E?<n>' for a value outside the spec's set. */
export function errnoName(errno: number): string {
  return nbdName(NbdErrno, errno) ?? `E?${errno}`;
}
