// NBD (NetworkBlockDevice/nbd doc/proto.md): pure codecs and state machines for both sides,
// no I/O, no timers. Fixed newstyle handshake; simple and structured replies; metadata
// contexts base:allocation and qemu:dirty-bitmap:NAME. No TLS, no extended headers.
export * from './constants.js';
export * from './limits.js';
export { NbdCommandError, NbdOptionError } from './errors.js';
export {
  type BlockSizes,
  CLIENT_FLAGS_BYTES,
  EXPORT_NAME_REPLY_BYTES,
  type Encoded,
  GREETING_BYTES,
  type GoRequest,
  type InfoReply,
  type MetaContextRequest,
  OPTION_HEADER_BYTES,
  OPTION_REPLY_HEADER_BYTES,
  blockSizesProblem,
  encodeClientFlags,
  encodeExportNameReply,
  encodeGreeting,
  encodeOption,
  encodeOptionReply,
  exportNameData,
  goData,
  infoBlockSizeData,
  infoExportData,
  infoStringData,
  metaContextData,
  metaContextReplyData,
  parseGoData,
  parseInfoReply,
  parseMetaContextData,
  parseMetaContextReply,
  parseServerReply,
  serverReplyData,
} from './options.js';
export { dirtyBitmapContext, isKnownContextName, listContexts, selectContexts } from './meta-context.js';
export {
  type NbdCatalog,
  type NbdExportDescription,
  ServerHandshake,
  type ServerHandshakeOptions,
  type ServerHandshakeOutcome,
  type ServerHandshakeStep,
  type ServerNegotiated,
} from './server-handshake.js';
export {
  ClientHandshake,
  type ClientHandshakeOptions,
  type ClientHandshakeStep,
  type ClientNegotiated,
} from './client-handshake.js';
export {
  CHUNK_HEADER_BYTES,
  Chunk,
  type ExtentOut,
  type NbdRequest,
  REQUEST_HEADER_BYTES,
  SIMPLE_REPLY_BYTES,
  encodeRequest,
  encodeSimpleReply,
} from './transmission.js';
export { type DecodedRequest, RequestDecoder, type RequestDecoderLimits } from './request-decoder.js';
export { type ChunkBody, type ExpectedReply, ReplyDecoder, type ReplyDecoderOptions, type ReplyFrame } from './reply-decoder.js';
export { ByteQueue, decodeString, encodeString } from './wire.js';
