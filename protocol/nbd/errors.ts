// Errors an NBD peer reports on the wire. The peer's code travels verbatim (its errno or
// its option reply type) beside a name for it, and its message is never dropped.
// Wire-format violations are ProtocolErrors (protocol/errors.ts), as for gangway's own protocol.
import { ErrorCode, GangwayError } from '../errors.js';
import { NbdCommand, NbdRep, describeNbd, errnoName, nbdName } from './constants.js';

/** An NBD server answered a command with an error (simple reply error or an error chunk). */
export class NbdCommandError extends GangwayError {
  /** 'EIO', 'EINVAL', ... ('E?<n>' for a value outside the spec's set). */
  readonly errnoName: string;

  constructor(
    /** The NBD error value as sent (NbdErrno). */
    readonly errno: number,
    /** The command's name ('read', 'write', ...). */
    readonly command: string,
    /** The server's own text (structured error chunks carry one); '' when it sent none. */
    readonly serverMessage = '',
    /** For NBD_REPLY_TYPE_ERROR_OFFSET: where the error was. */
    readonly offsetBytes?: number,
  ) {
    const name = errnoName(errno);
    const at = offsetBytes === undefined ? '' : ` at offset ${offsetBytes}`;
    super(ErrorCode.NBD_COMMAND, `NBD ${command} failed${at}: ${name}${serverMessage === '' ? '' : `: ${serverMessage}`}`);
    this.name = 'NbdCommandError';
    this.errnoName = name;
  }

  static of(errno: number, command: number, serverMessage?: string, offsetBytes?: number): NbdCommandError {
    return new NbdCommandError(errno, nbdName(NbdCommand, command) ?? `command ${command}`, serverMessage, offsetBytes);
  }
}

/** An NBD server refused an option of the handshake. */
export class NbdOptionError extends GangwayError {
  /** 'errUnknown', 'errPolicy', ... */
  readonly replyName: string;

  constructor(
    /** The option that was refused ('go', 'setMetaContext', ...). */
    readonly option: string,
    /** The reply type as sent (NbdRep). */
    readonly replyType: number,
    readonly serverMessage = '',
  ) {
    super(
      ErrorCode.NBD_OPTION,
      `NBD server refused ${option}: ${describeNbd(NbdRep, replyType)}${serverMessage === '' ? '' : `: ${serverMessage}`}`,
    );
    this.name = 'NbdOptionError';
    this.replyName = nbdName(NbdRep, replyType) ?? 'unknown';
  }
}
