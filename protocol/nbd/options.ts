// The handshake's messages: the greeting, options and option replies, and the payloads of
// the options and replies we speak. Encoders return [header, payload] (the payload is the
// caller's or a fresh small buffer, never copied again); parsers take a whole payload and
// throw a ProtocolError naming the field that does not fit.
//
//   S: u64 NBDMAGIC  u64 IHAVEOPT  u16 handshake flags            (greeting, 18 bytes)
//   C: u32 client flags                                             (4 bytes)
//   C: u64 IHAVEOPT  u32 option  u32 length  [data]                 (option, 16 + length)
//   S: u64 REP_MAGIC u32 option  u32 type  u32 length  [data]       (option reply, 20 + length)
//   S: u64 size  u16 transmission flags  [124 zero bytes]           (after NBD_OPT_EXPORT_NAME)
import { ErrorCode, ProtocolError } from '../errors.js';
import { NBD_INIT_MAGIC, NBD_OPTS_MAGIC, NBD_REP_MAGIC, NbdInfo } from './constants.js';
import { NBD_EXPORT_NAME_ZEROES, NBD_MAX_META_CONTEXT_QUERIES, NBD_MAX_MIN_BLOCK_BYTES } from './limits.js';
import { PayloadReader, encodeString } from './wire.js';

export const GREETING_BYTES = 18;
export const CLIENT_FLAGS_BYTES = 4;
export const OPTION_HEADER_BYTES = 16;
export const OPTION_REPLY_HEADER_BYTES = 20;
export const EXPORT_NAME_REPLY_BYTES = 10;

/** A header and, when there is one, the payload as the caller gave it. */
export type Encoded = [Buffer] | [Buffer, Uint8Array];

export function encodeGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.allocUnsafe(GREETING_BYTES);
  b.writeBigUInt64BE(NBD_INIT_MAGIC, 0);
  b.writeBigUInt64BE(NBD_OPTS_MAGIC, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

export function encodeClientFlags(clientFlags: number): Buffer {
  const b = Buffer.allocUnsafe(CLIENT_FLAGS_BYTES);
  b.writeUInt32BE(clientFlags >>> 0, 0);
  return b;
}

export function encodeOption(option: number, data?: Uint8Array): Encoded {
  const h = Buffer.allocUnsafe(OPTION_HEADER_BYTES);
  h.writeBigUInt64BE(NBD_OPTS_MAGIC, 0);
  h.writeUInt32BE(option >>> 0, 8);
  h.writeUInt32BE(data?.length ?? 0, 12);
  return data !== undefined && data.length > 0 ? [h, data] : [h];
}

export function encodeOptionReply(option: number, type: number, data?: Uint8Array): Encoded {
  const h = Buffer.allocUnsafe(OPTION_REPLY_HEADER_BYTES);
  h.writeBigUInt64BE(NBD_REP_MAGIC, 0);
  h.writeUInt32BE(option >>> 0, 8);
  h.writeUInt32BE(type >>> 0, 12);
  h.writeUInt32BE(data?.length ?? 0, 16);
  return data !== undefined && data.length > 0 ? [h, data] : [h];
}

/** The server's answer to NBD_OPT_EXPORT_NAME: size, flags and (unless NO_ZEROES) 124 zeroes. */
export function encodeExportNameReply(sizeBytes: number, transmissionFlags: number, zeroes: boolean): Buffer {
  const b = Buffer.alloc(EXPORT_NAME_REPLY_BYTES + (zeroes ? NBD_EXPORT_NAME_ZEROES : 0));
  b.writeBigUInt64BE(BigInt(sizeBytes), 0);
  b.writeUInt16BE(transmissionFlags, 8);
  return b;
}

// ---- option data ---------------------------------------------------------------------------

/** NBD_OPT_INFO / NBD_OPT_GO: u32 name length, name, u16 count, u16 × count information requests. */
export function goData(exportName: string, infoRequests: readonly number[]): Buffer {
  const name = encodeString(exportName, 'export name');
  const b = Buffer.allocUnsafe(4 + name.length + 2 + 2 * infoRequests.length);
  b.writeUInt32BE(name.length, 0);
  name.copy(b, 4);
  b.writeUInt16BE(infoRequests.length, 4 + name.length);
  infoRequests.forEach((info, i) => b.writeUInt16BE(info, 6 + name.length + 2 * i));
  return b;
}

export interface GoRequest {
  exportName: string;
  /** Distinct, in the order sent; the spec forbids duplicates, which are dropped. */
  infoRequests: number[];
}

export function parseGoData(data: Buffer, what = 'NBD_OPT_GO'): GoRequest {
  const r = new PayloadReader(data, what);
  const exportName = r.string32('export name');
  const count = r.u16('information request count');
  if (r.remaining !== 2 * count) {
    throw new ProtocolError(ErrorCode.PROTOCOL, `${what}: ${count} information requests need ${2 * count} bytes, ${r.remaining} left`);
  }
  const infoRequests: number[] = [];
  for (let i = 0; i < count; i++) {
    const info = r.u16('information request');
    if (!infoRequests.includes(info)) infoRequests.push(info);
  }
  return { exportName, infoRequests };
}

/** NBD_OPT_LIST/SET_META_CONTEXT: u32 name length, name, u32 query count, (u32 length, query) × count. */
export function metaContextData(exportName: string, queries: readonly string[]): Buffer {
  const name = encodeString(exportName, 'export name');
  const encoded = queries.map((q) => encodeString(q, 'meta context query'));
  const b = Buffer.allocUnsafe(8 + name.length + encoded.reduce((n, q) => n + 4 + q.length, 0));
  let at = b.writeUInt32BE(name.length, 0);
  at += name.copy(b, at);
  at = b.writeUInt32BE(encoded.length, at);
  for (const q of encoded) {
    at = b.writeUInt32BE(q.length, at);
    at += q.copy(b, at);
  }
  return b;
}

export interface MetaContextRequest {
  exportName: string;
  queries: string[];
}

/**
 * Throws ProtocolError LIMIT when the query count is over NBD_MAX_META_CONTEXT_QUERIES
 * (answered NBD_REP_ERR_TOO_BIG), another ProtocolError when the data is malformed
 * (NBD_REP_ERR_INVALID). The count is checked before any query is read.
 */
export function parseMetaContextData(data: Buffer, what = 'NBD_OPT_SET_META_CONTEXT'): MetaContextRequest {
  const r = new PayloadReader(data, what);
  const exportName = r.string32('export name');
  const count = r.u32('query count');
  if (count > NBD_MAX_META_CONTEXT_QUERIES) {
    throw new ProtocolError(ErrorCode.LIMIT, `${what}: ${count} queries is over the limit of ${NBD_MAX_META_CONTEXT_QUERIES}`);
  }
  const queries: string[] = [];
  for (let i = 0; i < count; i++) queries.push(r.string32('query'));
  r.end();
  return { exportName, queries };
}

export function exportNameData(exportName: string): Buffer {
  return encodeString(exportName, 'export name');
}

// ---- option reply data ---------------------------------------------------------------------

export interface BlockSizes {
  minimumBytes: number;
  preferredBytes: number;
  maximumBytes: number;
}

export type InfoReply =
  | { info: 'export'; sizeBytes: number; transmissionFlags: number }
  | { info: 'name'; name: string }
  | { info: 'description'; description: string }
  | ({ info: 'blockSize' } & BlockSizes)
  | { info: 'unknown'; infoType: number };

export function infoExportData(sizeBytes: number, transmissionFlags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(NbdInfo.export, 0);
  b.writeBigUInt64BE(BigInt(sizeBytes), 2);
  b.writeUInt16BE(transmissionFlags, 10);
  return b;
}

export function infoBlockSizeData(sizes: BlockSizes): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(NbdInfo.blockSize, 0);
  b.writeUInt32BE(sizes.minimumBytes, 2);
  b.writeUInt32BE(sizes.preferredBytes, 6);
  b.writeUInt32BE(sizes.maximumBytes, 10);
  return b;
}

export function infoStringData(info: typeof NbdInfo.name | typeof NbdInfo.description, text: string): Buffer {
  const s = encodeString(text, info === NbdInfo.name ? 'export name' : 'export description');
  const b = Buffer.allocUnsafe(2 + s.length);
  b.writeUInt16BE(info, 0);
  s.copy(b, 2);
  return b;
}

const isPowerOfTwo = (n: number) => n > 0 && (n & (n - 1)) === 0;

/** What is wrong with advertised block sizes (the spec's rules), or undefined. */
export function blockSizesProblem(s: BlockSizes): string | undefined {
  if (!isPowerOfTwo(s.minimumBytes) || s.minimumBytes > NBD_MAX_MIN_BLOCK_BYTES) {
    return `minimum block size ${s.minimumBytes} is not a power of 2 in 1..${NBD_MAX_MIN_BLOCK_BYTES}`;
  }
  if (!isPowerOfTwo(s.preferredBytes) || s.preferredBytes < Math.max(s.minimumBytes, 512)) {
    return `preferred block size ${s.preferredBytes} is not a power of 2 of at least max(minimum, 512)`;
  }
  if (s.maximumBytes < s.preferredBytes) return `maximum payload ${s.maximumBytes} is below the preferred block size ${s.preferredBytes}`;
  return undefined;
}

export function parseInfoReply(data: Buffer): InfoReply {
  const r = new PayloadReader(data, 'NBD_REP_INFO');
  const infoType = r.u16('information type');
  switch (infoType) {
    case NbdInfo.export: {
      const sizeBytes = r.u64('export size');
      const transmissionFlags = r.u16('transmission flags');
      r.end();
      return { info: 'export', sizeBytes, transmissionFlags };
    }
    case NbdInfo.name:
      return { info: 'name', name: r.rest('export name') };
    case NbdInfo.description:
      return { info: 'description', description: r.rest('export description') };
    case NbdInfo.blockSize: {
      const sizes = { minimumBytes: r.u32('minimum block size'), preferredBytes: r.u32('preferred block size'), maximumBytes: r.u32('maximum payload') };
      r.end();
      const problem = blockSizesProblem(sizes);
      if (problem !== undefined) throw new ProtocolError(ErrorCode.PROTOCOL, `NBD_INFO_BLOCK_SIZE: ${problem}`);
      return { info: 'blockSize', ...sizes };
    }
    default:
      return { info: 'unknown', infoType };
  }
}

/** NBD_REP_META_CONTEXT: u32 context id, name (the rest). */
export function metaContextReplyData(contextId: number, name: string): Buffer {
  const s = encodeString(name, 'meta context name');
  const b = Buffer.allocUnsafe(4 + s.length);
  b.writeUInt32BE(contextId, 0);
  s.copy(b, 4);
  return b;
}

export function parseMetaContextReply(data: Buffer): { contextId: number; name: string } {
  const r = new PayloadReader(data, 'NBD_REP_META_CONTEXT');
  const contextId = r.u32('context id');
  const name = r.rest('context name');
  if (!name.includes(':')) throw new ProtocolError(ErrorCode.PROTOCOL, `NBD_REP_META_CONTEXT: context name '${name}' has no namespace`);
  return { contextId, name };
}

/** NBD_REP_SERVER: u32 name length, name, then an optional description (the rest). */
export function serverReplyData(exportName: string, description = ''): Buffer {
  const name = encodeString(exportName, 'export name');
  const desc = encodeString(description, 'export description');
  const b = Buffer.allocUnsafe(4 + name.length + desc.length);
  b.writeUInt32BE(name.length, 0);
  name.copy(b, 4);
  desc.copy(b, 4 + name.length);
  return b;
}

export function parseServerReply(data: Buffer): { exportName: string; description: string } {
  const r = new PayloadReader(data, 'NBD_REP_SERVER');
  const exportName = r.string32('export name');
  return { exportName, description: r.rest('export description') };
}
