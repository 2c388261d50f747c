// The client's side of the fixed newstyle handshake, as a state machine over bytes.
//
//   greeting ──18 bytes──► (flags sent) ─► structuredReply? ─► setMetaContext? ─► go ─ACK─► done
//                                                                                 │
//                                                 NBD_REP_ERR_UNSUP (an old server)┴─► exportName ──► done
//
// Each option waits for its final reply before the next is sent (the spec requires it).
// STRUCTURED_REPLY is asked for when wanted; a refusal means simple replies. SET_META_CONTEXT
// is asked for only with structured replies and at least one context; what the server
// selects is kept by its id (a refusal selects nothing). GO asks for NBD_INFO_BLOCK_SIZE, so
// the caller must honour the sizes it gets. A GO refused with anything but UNSUP throws
// NbdOptionError; abortBytes() is then the soft disconnect to send before hanging up.
//
// Everything the server sends is checked against the limits before it is buffered; a reply
// that breaks the format throws a ProtocolError (the spec: a hard disconnect).
import { ErrorCode, ProtocolError } from '../errors.js';
import {
  ClientFlag,
  HandshakeFlag,
  NBD_INIT_MAGIC,
  NBD_OLDSTYLE_MAGIC,
  NBD_OPTS_MAGIC,
  NBD_REP_MAGIC,
  NbdInfo,
  NbdOption,
  NbdRep,
  TransmissionFlag,
  describeNbd,
  isRepError,
  nbdName,
} from './constants.js';
import { NbdOptionError } from './errors.js';
import { NBD_EXPORT_NAME_ZEROES, NBD_MAX_META_CONTEXT_QUERIES, NBD_MAX_OPTION_REPLY_BYTES } from './limits.js';
import {
  type BlockSizes,
  type Encoded,
  EXPORT_NAME_REPLY_BYTES,
  GREETING_BYTES,
  OPTION_REPLY_HEADER_BYTES,
  encodeClientFlags,
  encodeOption,
  exportNameData,
  goData,
  metaContextData,
  parseInfoReply,
  parseMetaContextReply,
} from './options.js';
import { ByteQueue, encodeString } from './wire.js';

export interface ClientHandshakeOptions {
  exportName: string;
  /** Ask for structured replies (default true; needed for block status and sparse reads). */
  structuredReplies?: boolean;
  /** Metadata contexts to select ('base:allocation', 'qemu:dirty-bitmap:NAME', ...). */
  metaContexts?: readonly string[];
}

export interface ClientNegotiated {
  exportName: string;
  sizeBytes: number;
  transmissionFlags: number;
  /** What the server advertised, or undefined (then the spec's defaults apply). */
  blockSizes: BlockSizes | undefined;
  structuredReplies: boolean;
  /** Selected contexts by the server's ids. */
  metaContexts: ReadonlyMap<number, string>;
  description: string | undefined;
  /** How transmission was entered: 'go', or 'exportName' with a server that has no GO. */
  via: 'go' | 'exportName';
}

export interface ClientHandshakeStep {
  send: Uint8Array[];
  done?: { negotiated: ClientNegotiated; rest: Buffer[] };
}

type State = 'greeting' | 'replyHeader' | 'replyData' | 'exportNameReply' | 'done';

export class ClientHandshake {
  readonly exportName: string;
  readonly #wantStructured: boolean;
  readonly #wantContexts: readonly string[];
  readonly #queue = new ByteQueue();
  #state: State = 'greeting';
  /** The option whose replies are being read. */
  #option = 0;
  #replyType = 0;
  #replyLength = 0;
  #noZeroes = false;
  #structuredReplies = false;
  readonly #contexts = new Map<number, string>();
  #sizeBytes: number | undefined;
  #transmissionFlags = 0;
  #blockSizes: BlockSizes | undefined;
  #description: string | undefined;

  constructor(options: ClientHandshakeOptions) {
    encodeString(options.exportName, 'export name');
    this.exportName = options.exportName;
    this.#wantStructured = options.structuredReplies ?? true;
    const contexts = [...new Set(options.metaContexts ?? [])];
    if (contexts.length > NBD_MAX_META_CONTEXT_QUERIES) {
      throw new RangeError(`at most ${NBD_MAX_META_CONTEXT_QUERIES} meta contexts can be asked for, got ${contexts.length}`);
    }
    for (const c of contexts) encodeString(c, 'meta context');
    this.#wantContexts = contexts;
  }

  get state(): State {
    return this.#state;
  }

  /** NBD_OPT_ABORT: a soft disconnect, valid while options are being exchanged. */
  abortBytes(): Encoded {
    return encodeOption(NbdOption.abort);
  }

  push(chunk: Uint8Array): ClientHandshakeStep {
    if (this.#state === 'done') throw new ProtocolError(ErrorCode.UNEXPECTED_FRAME, 'NBD handshake: bytes after the handshake ended');
    this.#queue.push(chunk);
    const send: Uint8Array[] = [];
    for (;;) {
      switch (this.#state) {
        case 'greeting': {
          const b = this.#queue.take(GREETING_BYTES);
          if (b === undefined) return { send };
          this.#readGreeting(b, send);
          break;
        }
        case 'replyHeader': {
          const b = this.#queue.take(OPTION_REPLY_HEADER_BYTES);
          if (b === undefined) return { send };
          this.#readReplyHeader(b);
          break;
        }
        case 'replyData': {
          const data = this.#queue.take(this.#replyLength);
          if (data === undefined) return { send };
          this.#state = 'replyHeader';
          if (this.#readReply(data, send)) return this.#finish(send, 'go');
          break;
        }
        case 'exportNameReply': {
          const b = this.#queue.take(EXPORT_NAME_REPLY_BYTES + (this.#noZeroes ? 0 : NBD_EXPORT_NAME_ZEROES));
          if (b === undefined) return { send };
          const size = b.readBigUInt64BE(0);
          if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError(ErrorCode.PROTOCOL, `NBD export size ${size} is beyond 2^53`);
          this.#sizeBytes = Number(size);
          this.#transmissionFlags = b.readUInt16BE(8);
          return this.#finish(send, 'exportName');
        }
        default:
          return { send };
      }
    }
  }

  #finish(send: Uint8Array[], via: 'go' | 'exportName'): ClientHandshakeStep {
    this.#state = 'done';
    if ((this.#transmissionFlags & TransmissionFlag.hasFlags) === 0) {
      throw new ProtocolError(ErrorCode.PROTOCOL, 'NBD transmission flags lack NBD_FLAG_HAS_FLAGS');
    }
    return {
      send,
      done: {
        negotiated: {
          exportName: this.exportName,
          sizeBytes: this.#sizeBytes!,
          transmissionFlags: this.#transmissionFlags,
          blockSizes: this.#blockSizes,
          structuredReplies: this.#structuredReplies,
          metaContexts: this.#structuredReplies ? this.#contexts : new Map(),
          description: this.#description,
          via,
        },
        rest: this.#queue.drain(),
      },
    };
  }

  #readGreeting(b: Buffer, send: Uint8Array[]): void {
    const magic = b.readBigUInt64BE(0);
    if (magic !== NBD_INIT_MAGIC) throw new ProtocolError(ErrorCode.PROTOCOL_MAGIC, `NBD greeting: magic 0x${magic.toString(16)} is not NBDMAGIC`);
    const second = b.readBigUInt64BE(8);
    if (second === NBD_OLDSTYLE_MAGIC) throw new ProtocolError(ErrorCode.PROTOCOL_VERSION, 'NBD greeting: an oldstyle server (not supported)');
    if (second !== NBD_OPTS_MAGIC) throw new ProtocolError(ErrorCode.PROTOCOL_MAGIC, `NBD greeting: magic 0x${second.toString(16)} is not IHAVEOPT`);
    const flags = b.readUInt16BE(16);
    if ((flags & HandshakeFlag.fixedNewstyle) === 0) {
      throw new ProtocolError(ErrorCode.PROTOCOL_VERSION, 'NBD greeting: the server does not speak fixed newstyle');
    }
    this.#noZeroes = (flags & HandshakeFlag.noZeroes) !== 0;
    send.push(encodeClientFlags(ClientFlag.fixedNewstyle | (this.#noZeroes ? ClientFlag.noZeroes : 0)));
    if (this.#wantStructured) this.#send(NbdOption.structuredReply, send);
    else this.#sendGo(send);
  }

  #send(option: number, send: Uint8Array[], data?: Uint8Array): void {
    this.#option = option;
    this.#state = 'replyHeader';
    send.push(...encodeOption(option, data));
  }

  #sendGo(send: Uint8Array[]): void {
    this.#send(NbdOption.go, send, goData(this.exportName, [NbdInfo.blockSize, NbdInfo.description]));
  }

  #readReplyHeader(b: Buffer): void {
    const magic = b.readBigUInt64BE(0);
    if (magic !== NBD_REP_MAGIC) throw new ProtocolError(ErrorCode.PROTOCOL_MAGIC, `NBD option reply: magic 0x${magic.toString(16)} is not the reply magic`);
    const option = b.readUInt32BE(8);
    if (option !== this.#option) {
      throw new ProtocolError(
        ErrorCode.UNEXPECTED_FRAME,
        `NBD option reply: for ${describeNbd(NbdOption, option)} while ${describeNbd(NbdOption, this.#option)} was asked`,
      );
    }
    this.#replyType = b.readUInt32BE(12);
    this.#replyLength = b.readUInt32BE(16);
    if (this.#replyLength > NBD_MAX_OPTION_REPLY_BYTES) {
      throw new ProtocolError(
        ErrorCode.FRAME_TOO_LARGE,
        `NBD option reply: ${describeNbd(NbdRep, this.#replyType)} with ${this.#replyLength} bytes is over the limit of ${NBD_MAX_OPTION_REPLY_BYTES}`,
      );
    }
    this.#state = 'replyData';
  }

  /** Handles one reply; true when GO succeeded. */
  #readReply(data: Buffer, send: Uint8Array[]): boolean {
    const type = this.#replyType;
    const option = nbdName(NbdOption, this.#option) ?? String(this.#option);
    const unexpected = () =>
      new ProtocolError(ErrorCode.UNEXPECTED_FRAME, `NBD option reply: ${describeNbd(NbdRep, type)} is not an answer to ${option}`);
    if (isRepError(type)) {
      // An error's data is a message for people; decoded leniently, as it is only shown.
      const message = data.toString('utf8');
      switch (this.#option) {
        case NbdOption.structuredReply:
          this.#structuredReplies = false;
          this.#afterStructuredReply(send);
          return false;
        case NbdOption.setMetaContext:
          this.#contexts.clear();
          this.#sendGo(send);
          return false;
        case NbdOption.go:
          if (type === NbdRep.errUnsup) {
            // A server without GO: EXPORT_NAME is the spec's fallback (no errors possible there).
            this.#option = NbdOption.exportName;
            this.#state = 'exportNameReply';
            send.push(...encodeOption(NbdOption.exportName, exportNameData(this.exportName)));
            return false;
          }
          throw new NbdOptionError('go', type, message);
        default:
          throw unexpected();
      }
    }
    switch (this.#option) {
      case NbdOption.structuredReply:
        if (type !== NbdRep.ack) throw unexpected();
        this.#structuredReplies = true;
        this.#afterStructuredReply(send);
        return false;
      case NbdOption.setMetaContext:
        if (type === NbdRep.metaContext) {
          const { contextId, name } = parseMetaContextReply(data);
          if (this.#contexts.has(contextId)) throw new ProtocolError(ErrorCode.PROTOCOL, `NBD_REP_META_CONTEXT: id ${contextId} given twice`);
          // Only names we asked for, each once: the map never outgrows our own list.
          if (!this.#wantContexts.includes(name)) {
            throw new ProtocolError(ErrorCode.PROTOCOL, `NBD_REP_META_CONTEXT: '${name}' was not asked for`);
          }
          if ([...this.#contexts.values()].includes(name)) throw new ProtocolError(ErrorCode.PROTOCOL, `NBD_REP_META_CONTEXT: '${name}' given twice`);
          this.#contexts.set(contextId, name);
          return false;
        }
        if (type !== NbdRep.ack) throw unexpected();
        this.#sendGo(send);
        return false;
      case NbdOption.go:
        if (type === NbdRep.info) {
          const info = parseInfoReply(data);
          if (info.info === 'export') {
            this.#sizeBytes = info.sizeBytes;
            this.#transmissionFlags = info.transmissionFlags;
          } else if (info.info === 'blockSize') {
            this.#blockSizes = { minimumBytes: info.minimumBytes, preferredBytes: info.preferredBytes, maximumBytes: info.maximumBytes };
          } else if (info.info === 'description') {
            this.#description = info.description;
          }
          return false;
        }
        if (type !== NbdRep.ack) throw unexpected();
        if (this.#sizeBytes === undefined) throw new ProtocolError(ErrorCode.PROTOCOL, 'NBD_OPT_GO: ACK without NBD_INFO_EXPORT');
        return true;
      default:
        throw unexpected();
    }
  }

  #afterStructuredReply(send: Uint8Array[]): void {
    if (this.#structuredReplies && this.#wantContexts.length > 0) {
      this.#send(NbdOption.setMetaContext, send, metaContextData(this.exportName, this.#wantContexts));
    } else {
      this.#sendGo(send);
    }
  }
}
