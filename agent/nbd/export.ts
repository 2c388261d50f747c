// What an NBD server serves: a range of bytes behind a small interface (the page_xfer model:
// the server does not know whether a file, a guest's disk or memory is behind it).
import {
  type NbdErrno,
  NbdCommandError,
  NbdErrno as Errno,
  NBD_MAX_PAYLOAD_BYTES,
  NBD_PREFERRED_BLOCK_BYTES,
  TransmissionFlag,
  type BlockSizes,
  type NbdExportDescription,
} from '../../protocol/nbd/index.js';

/** A run of bytes with the same status flags in one metadata context. */
export interface Extent {
  lengthBytes: number;
  flags: number;
}

export interface NbdExport {
  readonly name: string;
  readonly description?: string;
  readonly sizeBytes: number;
  /** The smallest addressable unit, a power of 2 up to 64 KiB (default 1: any offset). */
  readonly minBlockBytes?: number;
  readonly readOnly: boolean;
  /** Metadata contexts besides base:allocation that blockStatus answers (e.g. 'qemu:dirty-bitmap:bm0'). */
  readonly metaContexts?: readonly string[];

  /** Exactly lengthBytes of data (the server checked the range). */
  read(offsetBytes: number, lengthBytes: number): Promise<Buffer>;
  /** Without it the export is served read-only. `fua`: the data is durable when this resolves. */
  write?(offsetBytes: number, data: Buffer, options: { fua: boolean }): Promise<void>;
  /** Without it NBD_FLAG_SEND_WRITE_ZEROES is not advertised. `noHole`: the range must stay allocated. */
  writeZeroes?(offsetBytes: number, lengthBytes: number, options: { noHole: boolean; fua: boolean }): Promise<void>;
  /** Without it NBD_FLAG_SEND_TRIM is not advertised. A hint: the data may be discarded. */
  trim?(offsetBytes: number, lengthBytes: number, options: { fua: boolean }): Promise<void>;
  /** Without it NBD_FLAG_SEND_FLUSH and SEND_FUA are not advertised. */
  flush?(): Promise<void>;
  /**
   * Extents of `context` from offsetBytes on, consecutive, each nonzero. They may cover less
   * than lengthBytes (the client asks again from where they end) or more (the server cuts
   * them). Without it base:allocation is answered "allocated, contents unknown" (flags 0),
   * which the spec says is always safe, and no other context is offered.
   */
  blockStatus?(context: string, offsetBytes: number, lengthBytes: number): Promise<Extent[]>;
}

/** The handshake's view of an export: its flags and sizes, computed once. */
export function describeExport(e: NbdExport, maxPayloadBytes = NBD_MAX_PAYLOAD_BYTES): NbdExportDescription {
  const minimumBytes = e.minBlockBytes ?? 1;
  const blockSizes: BlockSizes = {
    minimumBytes,
    preferredBytes: Math.max(minimumBytes, NBD_PREFERRED_BLOCK_BYTES),
    maximumBytes: maxPayloadBytes,
  };
  const writable = !e.readOnly && e.write !== undefined;
  let flags = 0;
  if (!writable) flags |= TransmissionFlag.readOnly;
  if (e.flush !== undefined) flags |= TransmissionFlag.sendFlush | TransmissionFlag.sendFua;
  if (writable && e.trim !== undefined) flags |= TransmissionFlag.sendTrim;
  if (writable && e.writeZeroes !== undefined) flags |= TransmissionFlag.sendWriteZeroes;
  return {
    name: e.name,
    ...(e.description === undefined ? {} : { description: e.description }),
    sizeBytes: e.sizeBytes,
    transmissionFlags: flags,
    blockSizes,
    metaContexts: e.blockStatus === undefined ? [] : [...(e.metaContexts ?? [])],
  };
}

/** Node's errno codes as NBD's restricted set (the spec: EDQUOT and EFBIG are ENOSPC). */
const NODE_TO_NBD: Readonly<Record<string, NbdErrno>> = {
  EPERM: Errno.EPERM,
  EACCES: Errno.EPERM,
  EROFS: Errno.EPERM,
  ENOSPC: Errno.ENOSPC,
  EDQUOT: Errno.ENOSPC,
  EFBIG: Errno.ENOSPC,
  EINVAL: Errno.EINVAL,
  ENOMEM: Errno.ENOMEM,
  EOVERFLOW: Errno.EOVERFLOW,
  ENOTSUP: Errno.ENOTSUP,
  EOPNOTSUPP: Errno.ENOTSUP,
};

/** The NBD error to answer for what an export threw: its own NbdCommandError's, a mapped errno, else EIO. */
export function nbdErrnoOf(error: unknown): NbdErrno {
  if (error instanceof NbdCommandError) return error.errno as NbdErrno;
  const code = (error as { code?: unknown })?.code;
  return (typeof code === 'string' ? NODE_TO_NBD[code] : undefined) ?? Errno.EIO;
}
