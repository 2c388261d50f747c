// The server's side of the fixed newstyle handshake, as a state machine over bytes.
//
//   greeting() ──► clientFlags ──4 bytes──► options ─┬─ GO (ACK) / EXPORT_NAME ──► transmission
//                                                    ├─ ABORT (ACK) ─────────────► close
//                                                    ├─ EXPORT_NAME, no export ──► close (it cannot be answered)
//                                                    └─ any other option: a reply, back to options
//
// push() takes chunks split anywhere and returns what to send and, once the handshake is
// over, the outcome plus the bytes that came after the last option (the first requests of
// the transmission phase, for the request decoder). Exports are looked up in a catalog of
// plain descriptions, so the whole exchange runs in memory.
//
// A malformed option is answered NBD_REP_ERR_INVALID, an unknown one NBD_REP_ERR_UNSUP (the
// baseline requires it), too many meta context queries NBD_REP_ERR_TOO_BIG. What cannot be
// answered (bad magic, unknown client flags, an option over NBD_MAX_OPTION_DATA_BYTES, more
// than NBD_MAX_HANDSHAKE_OPTIONS options) ends the handshake with a 'close' outcome carrying
// the ProtocolError: the caller hangs up, after sending the replies to the options before
// it (returned in the same step, so a client sees how far it got). Pushing after the end
// throws.
import { ErrorCode, ProtocolError } from '../errors.js';
import {
  BASE_ALLOCATION,
  ClientFlag,
  HandshakeFlag,
  NBD_OPTS_MAGIC,
  NbdInfo,
  NbdOption,
  NbdRep,
  TransmissionFlag,
  describeNbd,
} from './constants.js';
import { NBD_MAX_HANDSHAKE_OPTIONS, NBD_MAX_OPTION_DATA_BYTES } from './limits.js';
import { listContexts, selectContexts } from './meta-context.js';
import {
  type BlockSizes,
  CLIENT_FLAGS_BYTES,
  OPTION_HEADER_BYTES,
  encodeExportNameReply,
  encodeGreeting,
  encodeOptionReply,
  infoBlockSizeData,
  infoExportData,
  infoStringData,
  metaContextReplyData,
  parseGoData,
  parseMetaContextData,
  serverReplyData,
} from './options.js';
import { ByteQueue, decodeString, encodeString } from './wire.js';

/** What the handshake needs to know of an export. */
export interface NbdExportDescription {
  name: string;
  description?: string;
  sizeBytes: number;
  /** The export's capabilities (readOnly, sendFlush, ...); HAS_FLAGS and SEND_DF are the handshake's to add. */
  transmissionFlags: number;
  blockSizes: BlockSizes;
  /** Metadata contexts offered besides base:allocation (which every export offers). */
  metaContexts: readonly string[];
}

export interface NbdCatalog {
  find(name: string): NbdExportDescription | undefined;
  list(): readonly NbdExportDescription[];
}

export interface ServerNegotiated {
  export: NbdExportDescription;
  /** As sent in NBD_INFO_EXPORT (or the EXPORT_NAME reply). */
  transmissionFlags: number;
  structuredReplies: boolean;
  /** Selected contexts by the ids we gave them (1, 2, ...). Empty unless SET named this export. */
  metaContexts: ReadonlyMap<number, string>;
  /** Whether the client asked for NBD_INFO_BLOCK_SIZE in its GO (and so honours the sizes). */
  blockSizesRequested: boolean;
}

export type ServerHandshakeOutcome =
  | { kind: 'transmission'; negotiated: ServerNegotiated; rest: Buffer[] }
  /** `error`: the client broke the protocol (else it aborted, or named no export we have). */
  | { kind: 'close'; reason: string; error?: ProtocolError };

export interface ServerHandshakeStep {
  send: Uint8Array[];
  outcome?: ServerHandshakeOutcome;
}

export interface ServerHandshakeOptions {
  maxOptions?: number;
}

type State = 'clientFlags' | 'optionHeader' | 'optionData' | 'done';
/** An outcome before the leftover bytes are attached. */
type Ending = { kind: 'transmission'; negotiated: ServerNegotiated } | { kind: 'close'; reason: string; error?: ProtocolError };

const CLIENT_FLAGS_KNOWN = ClientFlag.fixedNewstyle | ClientFlag.noZeroes;

export class ServerHandshake {
  readonly handshakeFlags = HandshakeFlag.fixedNewstyle | HandshakeFlag.noZeroes;
  #state: State = 'clientFlags';
  readonly #queue = new ByteQueue();
  readonly #maxOptions: number;
  #optionCount = 0;
  #option = 0;
  #optionLength = 0;
  #noZeroes = false;
  #structuredReplies = false;
  /** The last SET_META_CONTEXT: for which export, and what it selected (by our ids). */
  #selected: { exportName: string; contexts: Map<number, string> } | undefined;
  /** Set by the server while it shuts down: options are answered NBD_REP_ERR_SHUTDOWN. */
  shuttingDown = false;

  constructor(
    readonly catalog: NbdCatalog,
    options: ServerHandshakeOptions = {},
  ) {
    this.#maxOptions = options.maxOptions ?? NBD_MAX_HANDSHAKE_OPTIONS;
  }

  get state(): State {
    return this.#state;
  }

  /** NBDMAGIC, IHAVEOPT and our handshake flags: the first thing sent. */
  greeting(): Buffer {
    return encodeGreeting(this.handshakeFlags);
  }

  push(chunk: Uint8Array): ServerHandshakeStep {
    if (this.#state === 'done') throw new ProtocolError(ErrorCode.UNEXPECTED_FRAME, 'NBD handshake: bytes after the handshake ended');
    this.#queue.push(chunk);
    const send: Uint8Array[] = [];
    try {
      return this.#consume(send);
    } catch (error) {
      if (!(error instanceof ProtocolError)) throw error;
      this.#state = 'done';
      this.#queue.drain();
      return { send, outcome: { kind: 'close', reason: error.message, error } };
    }
  }

  #consume(send: Uint8Array[]): ServerHandshakeStep {
    for (;;) {
      if (this.#state === 'clientFlags') {
        const b = this.#queue.take(CLIENT_FLAGS_BYTES);
        if (b === undefined) return { send };
        this.#readClientFlags(b.readUInt32BE(0));
      } else if (this.#state === 'optionHeader') {
        const b = this.#queue.take(OPTION_HEADER_BYTES);
        if (b === undefined) return { send };
        this.#readOptionHeader(b);
      } else if (this.#state === 'optionData') {
        const data = this.#queue.take(this.#optionLength);
        if (data === undefined) return { send };
        this.#state = 'optionHeader';
        const outcome = this.#answer(this.#option, data, send);
        if (outcome !== undefined) {
          this.#state = 'done';
          return { send, outcome: outcome.kind === 'transmission' ? { ...outcome, rest: this.#queue.drain() } : outcome };
        }
      } else {
        return { send };
      }
    }
  }

  #readClientFlags(flags: number): void {
    // The spec: the server MUST drop the connection on a flag it does not know or did not offer.
    if ((flags & ~CLIENT_FLAGS_KNOWN) !== 0) {
      throw new ProtocolError(ErrorCode.PROTOCOL, `NBD handshake: unknown client flags 0x${flags.toString(16)}`);
    }
    // A client without C_FIXED_NEWSTYLE gets fixed newstyle all the same (the spec allows it):
    // a non-fixed client sends only EXPORT_NAME, which is answered the same either way.
    this.#noZeroes = (flags & ClientFlag.noZeroes) !== 0;
    this.#state = 'optionHeader';
  }

  #readOptionHeader(b: Buffer): void {
    const magic = b.readBigUInt64BE(0);
    if (magic !== NBD_OPTS_MAGIC) {
      throw new ProtocolError(ErrorCode.PROTOCOL_MAGIC, `NBD handshake: option magic 0x${magic.toString(16)} is not IHAVEOPT`);
    }
    this.#optionCount++;
    if (this.#optionCount > this.#maxOptions) {
      throw new ProtocolError(ErrorCode.LIMIT, `NBD handshake: more than ${this.#maxOptions} options`);
    }
    this.#option = b.readUInt32BE(8);
    this.#optionLength = b.readUInt32BE(12);
    if (this.#optionLength > NBD_MAX_OPTION_DATA_BYTES) {
      throw new ProtocolError(
        ErrorCode.FRAME_TOO_LARGE,
        `NBD handshake: ${describeNbd(NbdOption, this.#option)} with ${this.#optionLength} bytes of data is over the limit of ${NBD_MAX_OPTION_DATA_BYTES}`,
      );
    }
    this.#state = 'optionData';
  }

  #answer(option: number, data: Buffer, send: Uint8Array[]): Ending | undefined {
    const reply = (type: number, payload?: Uint8Array) => send.push(...encodeOptionReply(option, type, payload));
    const fail = (type: number, message: string) => reply(type, encodeString(message.slice(0, 1024), 'error message'));

    if (option === NbdOption.abort) {
      reply(NbdRep.ack);
      return { kind: 'close', reason: 'the client aborted the handshake' };
    }
    if (option === NbdOption.exportName) return this.#exportName(data, send);
    if (this.shuttingDown) {
      fail(NbdRep.errShutdown, 'the server is shutting down');
      return undefined;
    }
    try {
      switch (option) {
        case NbdOption.list:
          if (data.length !== 0) return void fail(NbdRep.errInvalid, 'NBD_OPT_LIST takes no data');
          for (const e of this.catalog.list()) reply(NbdRep.server, serverReplyData(e.name, e.description ?? ''));
          reply(NbdRep.ack);
          return undefined;
        case NbdOption.structuredReply:
          if (data.length !== 0) return void fail(NbdRep.errInvalid, 'NBD_OPT_STRUCTURED_REPLY takes no data');
          if (this.#structuredReplies) return void fail(NbdRep.errInvalid, 'structured replies are already negotiated');
          this.#structuredReplies = true;
          reply(NbdRep.ack);
          return undefined;
        case NbdOption.listMetaContext:
        case NbdOption.setMetaContext:
          this.#metaContext(option, data, reply, fail);
          return undefined;
        case NbdOption.info:
        case NbdOption.go:
          return this.#infoOrGo(option, data, reply, fail);
        default:
          // STARTTLS included: this server has no TLS (NOTLS mode answers it UNSUP or POLICY).
          fail(NbdRep.errUnsup, `option ${option} is not supported`);
          return undefined;
      }
    } catch (error) {
      if (!(error instanceof ProtocolError)) throw error;
      // Malformed option data is the option's failure, not the connection's.
      fail(error.code === ErrorCode.LIMIT ? NbdRep.errTooBig : NbdRep.errInvalid, error.message);
      return undefined;
    }
  }

  #exportName(data: Buffer, send: Uint8Array[]): Ending {
    let name: string;
    try {
      name = decodeString(data, 'NBD_OPT_EXPORT_NAME');
    } catch (error) {
      return { kind: 'close', reason: (error as Error).message };
    }
    const found = this.shuttingDown ? undefined : this.catalog.find(name);
    // EXPORT_NAME cannot be answered with an error: the spec says to terminate the session.
    if (found === undefined) return { kind: 'close', reason: this.shuttingDown ? 'the server is shutting down' : `no export named '${name}'` };
    const negotiated = this.#negotiated(found, false);
    send.push(encodeExportNameReply(found.sizeBytes, negotiated.transmissionFlags, !this.#noZeroes));
    return { kind: 'transmission', negotiated };
  }

  #metaContext(
    option: number,
    data: Buffer,
    reply: (type: number, payload?: Uint8Array) => void,
    fail: (type: number, message: string) => void,
  ): void {
    const set = option === NbdOption.setMetaContext;
    // SET replaces the selection "including when this command fails".
    if (set) this.#selected = undefined;
    if (set && !this.#structuredReplies) return fail(NbdRep.errInvalid, 'NBD_OPT_SET_META_CONTEXT needs structured replies first');
    const request = parseMetaContextData(data, set ? 'NBD_OPT_SET_META_CONTEXT' : 'NBD_OPT_LIST_META_CONTEXT');
    const found = this.catalog.find(request.exportName);
    if (found === undefined) return fail(NbdRep.errUnknown, `no export named '${request.exportName}'`);
    const available = [BASE_ALLOCATION, ...found.metaContexts];
    if (!set) {
      // The spec: context ids in LIST replies are reserved, SHOULD be 0.
      for (const name of listContexts(available, request.queries)) reply(NbdRep.metaContext, metaContextReplyData(0, name));
      return reply(NbdRep.ack);
    }
    const contexts = new Map<number, string>();
    selectContexts(available, request.queries).forEach((name, i) => {
      // Ids from 1: a zeroed id never names a context.
      contexts.set(i + 1, name);
      reply(NbdRep.metaContext, metaContextReplyData(i + 1, name));
    });
    this.#selected = { exportName: request.exportName, contexts };
    reply(NbdRep.ack);
  }

  #infoOrGo(
    option: number,
    data: Buffer,
    reply: (type: number, payload?: Uint8Array) => void,
    fail: (type: number, message: string) => void,
  ): { kind: 'transmission'; negotiated: ServerNegotiated } | undefined {
    const go = option === NbdOption.go;
    const request = parseGoData(data, go ? 'NBD_OPT_GO' : 'NBD_OPT_INFO');
    const found = this.catalog.find(request.exportName);
    if (found === undefined) {
      fail(NbdRep.errUnknown, `no export named '${request.exportName}'`);
      return undefined;
    }
    const blockSizesRequested = request.infoRequests.includes(NbdInfo.blockSize);
    const negotiated = this.#negotiated(found, blockSizesRequested);
    reply(NbdRep.info, infoExportData(found.sizeBytes, negotiated.transmissionFlags));
    // Sent whether asked or not (the spec allows unrequested information; clients ignore what
    // they did not ask for): a client that did not ask still learns our maximum payload.
    reply(NbdRep.info, infoBlockSizeData(found.blockSizes));
    if (request.infoRequests.includes(NbdInfo.name)) reply(NbdRep.info, infoStringData(NbdInfo.name, found.name));
    if (request.infoRequests.includes(NbdInfo.description) && found.description !== undefined) {
      reply(NbdRep.info, infoStringData(NbdInfo.description, found.description));
    }
    reply(NbdRep.ack);
    return go ? { kind: 'transmission', negotiated } : undefined;
  }

  #negotiated(found: NbdExportDescription, blockSizesRequested: boolean): ServerNegotiated {
    let flags = (found.transmissionFlags | TransmissionFlag.hasFlags) & ~TransmissionFlag.sendDf;
    // DF is only allowed with structured replies; honouring it costs nothing (one
    // OFFSET_DATA chunk with the zeroes in it instead of data and hole chunks).
    if (this.#structuredReplies) flags |= TransmissionFlag.sendDf;
    const contexts = this.#selected?.exportName === found.name ? this.#selected.contexts : new Map<number, string>();
    return {
      export: found,
      transmissionFlags: flags,
      structuredReplies: this.#structuredReplies,
      metaContexts: contexts,
      blockSizesRequested,
    };
  }
}
