// Errors with stable codes (after undici lib/core/errors.js). A code is part of the API: it
// travels on the wire in abort and error frames and users match on it, so codes are only
// ever added, never renamed or reused.

export const ErrorCode = {
  /** A frame or stream that breaks the wire format (the generic case). */
  PROTOCOL: 'GANGWAY_ERR_PROTOCOL',
  /** The peer speaks another protocol version. */
  PROTOCOL_VERSION: 'GANGWAY_ERR_PROTOCOL_VERSION',
  /** The hello frame does not carry the gangway magic: not a gangway peer. */
  PROTOCOL_MAGIC: 'GANGWAY_ERR_PROTOCOL_MAGIC',
  /** A header or payload over its limit. */
  FRAME_TOO_LARGE: 'GANGWAY_ERR_FRAME_TOO_LARGE',
  /** A frame type code this agent does not know (or 0). */
  UNKNOWN_FRAME: 'GANGWAY_ERR_UNKNOWN_FRAME',
  /** A well-formed frame at the wrong moment. */
  UNEXPECTED_FRAME: 'GANGWAY_ERR_UNEXPECTED_FRAME',
  /** A pages frame whose entries, sizes or payload do not agree with each other or the region. */
  BAD_PAGES: 'GANGWAY_ERR_BAD_PAGES',
  DECOMPRESS: 'GANGWAY_ERR_DECOMPRESS',
  DIGEST_MISMATCH: 'GANGWAY_ERR_DIGEST_MISMATCH',
  NON_CONVERGENCE: 'GANGWAY_ERR_NON_CONVERGENCE',
  PEER_UNREACHABLE: 'GANGWAY_ERR_PEER_UNREACHABLE',
  PEER_GONE: 'GANGWAY_ERR_PEER_GONE',
  REJECTED: 'GANGWAY_ERR_REJECTED',
  ABORTED: 'GANGWAY_ERR_ABORTED',
  GUEST_NOT_FOUND: 'GANGWAY_ERR_GUEST_NOT_FOUND',
  GUEST_EXISTS: 'GANGWAY_ERR_GUEST_EXISTS',
  GUEST_FAILED: 'GANGWAY_ERR_GUEST_FAILED',
  BAD_REQUEST: 'GANGWAY_ERR_BAD_REQUEST',
  TIMEOUT: 'GANGWAY_ERR_TIMEOUT',
  /** The commit was sent but its outcome is unknown: the guest may run on either side. */
  SWITCHOVER_IN_DOUBT: 'GANGWAY_ERR_SWITCHOVER_IN_DOUBT',
  /**
   * Post-copy stopped after the switchover: the guest runs at the destination, paused on
   * pages only the source holds (it keeps them).
   */
  POSTCOPY_INTERRUPTED: 'GANGWAY_ERR_POSTCOPY_INTERRUPTED',
  INTERNAL: 'GANGWAY_ERR_INTERNAL',
  /** A control-API request without the right token. */
  UNAUTHORIZED: 'GANGWAY_ERR_UNAUTHORIZED',
  SHUTTING_DOWN: 'GANGWAY_ERR_SHUTTING_DOWN',
  /** The host is being drained (gangway drain): it takes no new guests or arriving migrations until the drain ends. */
  DRAINING: 'GANGWAY_ERR_DRAINING',
  TRACKER: 'GANGWAY_ERR_TRACKER',
  /** A system command the agent drives (iptables, tc) failed, or its state is not what gangway installed. */
  HOST_COMMAND: 'GANGWAY_ERR_HOST_COMMAND',
  /** A TLS handshake between agents failed or a peer is not in tls.allow; the message says which side refused. */
  TLS: 'GANGWAY_ERR_TLS',
  /** A peer's hello names an agent its TLS certificate does not belong to. */
  IDENTITY: 'GANGWAY_ERR_IDENTITY',
  /** A peer sent pages beyond the credit it was granted. */
  FLOW_CONTROL: 'GANGWAY_ERR_FLOW_CONTROL',
  /** A peer hit one of the agent's peers.* limits (sessions, migrations, groups, requests). */
  LIMIT: 'GANGWAY_ERR_LIMIT',
  /** QEMU answered a QMP command with an error; the error keeps QMP's class and desc. */
  QMP_COMMAND: 'GANGWAY_ERR_QMP_COMMAND',
  /** A QMP connection to QEMU could not be made, was lost, or carried something that is not QMP. */
  QMP_CONNECTION: 'GANGWAY_ERR_QMP_CONNECTION',
  /** An NBD server answered a command with an error; the error keeps NBD's errno and message. */
  NBD_COMMAND: 'GANGWAY_ERR_NBD_COMMAND',
  /** An NBD server refused an option of the handshake (no such export, policy, ...); the error keeps the reply type. */
  NBD_OPTION: 'GANGWAY_ERR_NBD_OPTION',
} as const;

export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

const knownCodes: ReadonlySet<string> = new Set(Object.values(ErrorCode));

export function isErrorCode(s: unknown): s is ErrorCode {
  return typeof s === 'string' && knownCodes.has(s);
}

export class GangwayError extends Error {
  readonly code: ErrorCode;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'GangwayError';
    this.code = code;
  }
}

/** WebSocket close codes a protocol error maps to (RFC 6455 section 7.4.1). */
export const ProtocolCloseCode = {
  protocol: 1002,
  policy: 1008,
  tooBig: 1009,
} as const;

export type ProtocolCloseCode = (typeof ProtocolCloseCode)[keyof typeof ProtocolCloseCode];

/**
 * The peer broke the wire format or the frame order. The session that saw it sends an
 * error frame and closes with `closeCode`; other sessions are unaffected.
 */
export class ProtocolError extends GangwayError {
  readonly closeCode: ProtocolCloseCode;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown; closeCode?: ProtocolCloseCode }) {
    super(code, message, options);
    this.name = 'ProtocolError';
    this.closeCode =
      options?.closeCode ??
      (code === ErrorCode.FRAME_TOO_LARGE ? ProtocolCloseCode.tooBig : ProtocolCloseCode.protocol);
  }
}

/**
 * An error the remote agent reported (abort or error frame). `remoteCode` and
 * `remoteMessage` are kept verbatim; `code` is the remote code when this agent knows it,
 * else GANGWAY_ERR_INTERNAL (a newer peer's code is still visible in `remoteCode`).
 */
export class PeerError extends GangwayError {
  readonly remoteCode: string;
  readonly remoteMessage: string;

  constructor(remoteCode: string, remoteMessage: string, options?: { cause?: unknown }) {
    super(
      isErrorCode(remoteCode) ? remoteCode : ErrorCode.INTERNAL,
      `peer reported ${remoteCode}: ${remoteMessage}`,
      options,
    );
    this.name = 'PeerError';
    this.remoteCode = remoteCode;
    this.remoteMessage = remoteMessage;
  }
}
