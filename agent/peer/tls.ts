// Mutual TLS between agents: the certificate material an agent runs with, the checks both
// sides make after the handshake, and the translation of handshake failures into errors
// that say which side refused and why.
//
// Peers are checked against `tls.allow` instead of by hostname: agents address each other
// by IP:port (often an address on a migration network, behind NAT or renumbered), a private
// CA signs nothing but agent certificates, and the question that matters is "is this one of
// the hosts I migrate with", which the allowlist answers for both directions alike. The CA
// check still happens in the handshake (rejectUnauthorized), the allowlist comes on top.
import { createPrivateKey, X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { isIPv4 } from 'node:net';
import { createSecureContext, type PeerCertificate, type TLSSocket } from 'node:tls';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { commonNameOf, describeIdentity, isAllowed, normalizeFingerprint, parseAllowEntry, type AllowEntry, type CertIdentity } from './allowlist.js';

/** How an agent talks to peers: mutual TLS, or plain ws on loopback when asked for by name. */
export type PeerTransport =
  | { kind: 'tls'; certPath: string; keyPath: string; caPath: string; allow: string[] }
  | { kind: 'plaintext-loopback' };

/**
 * Both ends of a peer connection speak TLS 1.3 only: every peer is a gangway agent, and 1.3
 * leaves out what 1.2 still negotiates (renegotiation, static-RSA and CBC suites, a
 * handshake whose certificates travel in clear). The suites stay OpenSSL's (AES-256-GCM
 * first): AES-128-GCM first measured no faster in bench:stream on this host (3 interleaved
 * runs each way, 0.73-0.90 against 0.80-0.87 GB/s), its cipher being a small part of what TLS
 * costs the stream.
 */
export const PEER_TLS_PROTOCOL = { minVersion: 'TLSv1.3' } as const;

/** What the TLS server and client run with, loaded and checked at start-up. */
export interface TlsMaterial {
  cert: Buffer;
  key: Buffer;
  ca: Buffer;
  allow: AllowEntry[];
  /** This agent's own identity, for messages about what a peer must list. */
  self: CertIdentity;
  /** When this agent's certificate stops being valid. */
  validTo: Date;
}

/** 127.0.0.0/8, ::1 and localhost: the only listen hosts plain ws may use. */
export function isLoopbackHost(host: string): boolean {
  const bare = host.replace(/^\[|\]$/g, '').toLowerCase();
  if (bare === 'localhost' || bare === '::1' || bare === '0:0:0:0:0:0:0:1') return true;
  const v4 = bare.startsWith('::ffff:') ? bare.slice(7) : bare;
  return isIPv4(v4) && v4.startsWith('127.');
}

/** The host part of HOST:PORT (brackets of an IPv6 literal removed). */
export function hostOf(address: string): string {
  const colon = address.lastIndexOf(':');
  return (colon < 0 ? address : address.slice(0, colon)).replace(/^\[|\]$/g, '');
}

function readSetting(key: string, path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new GangwayError(ErrorCode.BAD_REQUEST, `${key}: cannot read ${path} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
  }
}

export function identityOfX509(cert: X509Certificate): CertIdentity {
  return { commonName: commonNameOf(cert.subject), sha256: normalizeFingerprint(cert.fingerprint256) };
}

export function identityOfPeer(cert: PeerCertificate): CertIdentity {
  return { commonName: commonNameOf(cert.subject as unknown as Record<string, string>), sha256: normalizeFingerprint(cert.fingerprint256) };
}

/** Reads and checks tls.cert, tls.key, tls.ca and tls.allow; every problem names the setting and the file. */
export function loadTlsMaterial(transport: Extract<PeerTransport, { kind: 'tls' }>): TlsMaterial {
  const cert = readSetting('tls.cert', transport.certPath);
  const key = readSetting('tls.key', transport.keyPath);
  const ca = readSetting('tls.ca', transport.caPath);
  let x509: X509Certificate;
  try {
    x509 = new X509Certificate(cert);
  } catch (err) {
    throw new GangwayError(ErrorCode.BAD_REQUEST, `tls.cert: ${transport.certPath} is not a PEM certificate (${(err as Error).message})`);
  }
  try {
    new X509Certificate(ca);
  } catch (err) {
    throw new GangwayError(ErrorCode.BAD_REQUEST, `tls.ca: ${transport.caPath} is not a PEM certificate (${(err as Error).message})`);
  }
  let privateKey;
  try {
    privateKey = createPrivateKey(key);
  } catch (err) {
    throw new GangwayError(ErrorCode.BAD_REQUEST, `tls.key: ${transport.keyPath} is not a PEM private key (${(err as Error).message})`);
  }
  if (!x509.checkPrivateKey(privateKey)) {
    throw new GangwayError(ErrorCode.BAD_REQUEST, `tls.key: ${transport.keyPath} does not belong to tls.cert ${transport.certPath}`);
  }
  try {
    createSecureContext({ cert, key, ca });
  } catch (err) {
    throw new GangwayError(ErrorCode.BAD_REQUEST, `tls: cannot use tls.cert ${transport.certPath}, tls.key ${transport.keyPath} and tls.ca ${transport.caPath} together: ${(err as Error).message}`);
  }
  let allow: AllowEntry[];
  try {
    allow = transport.allow.map(parseAllowEntry);
  } catch (err) {
    throw new GangwayError(ErrorCode.BAD_REQUEST, (err as Error).message);
  }
  return { cert, key, ca, allow, self: identityOfX509(x509), validTo: new Date(x509.validTo) };
}

/** Why a peer's certificate is refused (one line, for logs and the HTTP 403 body), or undefined when it is listed. */
export function allowlistRefusal(identity: CertIdentity, allow: readonly AllowEntry[]): string | undefined {
  return isAllowed(identity, allow) ? undefined : `${describeIdentity(identity)} is not in tls.allow`;
}

/** OpenSSL's words for the verification results a peer's certificate most often gets. */
const VERIFY_REASONS: Record<string, string> = {
  CERT_HAS_EXPIRED: 'certificate has expired',
  CERT_NOT_YET_VALID: 'certificate is not yet valid',
  UNABLE_TO_VERIFY_LEAF_SIGNATURE: 'unable to verify the first certificate (not signed by tls.ca)',
  UNABLE_TO_GET_ISSUER_CERT_LOCALLY: 'unable to get local issuer certificate (not signed by tls.ca)',
  DEPTH_ZERO_SELF_SIGNED_CERT: 'self-signed certificate',
  SELF_SIGNED_CERT_IN_CHAIN: 'self-signed certificate in certificate chain',
  CERT_SIGNATURE_FAILURE: 'certificate signature failure',
  INVALID_PURPOSE: 'unsupported certificate purpose',
};

/** Why the TLS server refuses a client: its certificate failed the CA check, or it is not listed. */
export type Refusal = { kind: 'certificate' | 'not-listed'; reason: string };

/** Header that tells the refused peer which of the two it was, so its error can say so. */
export const REFUSAL_HEADER = 'x-gangway-refusal';

/**
 * The server's check of a client, made on every request after the handshake. The TLS
 * layer requests the client certificate but does not reject it itself: Node's server would
 * then just close the socket (under TLS 1.3 after the client has finished its handshake),
 * and the peer would see "socket hang up". Refusing here answers with HTTP 403 and the
 * reason instead; nothing is served to an unverified client either way.
 */
export function refusePeer(socket: TLSSocket, allow: readonly AllowEntry[]): Refusal | undefined {
  const cert = socket.getPeerCertificate();
  if (!cert || !cert.fingerprint256) return { kind: 'certificate', reason: 'it sent no certificate' };
  if (!socket.authorized) {
    const code = String(socket.authorizationError);
    return { kind: 'certificate', reason: `${VERIFY_REASONS[code] ?? code.toLowerCase().replace(/_/g, ' ')} (${code})` };
  }
  const reason = allowlistRefusal(identityOfPeer(cert), allow);
  return reason ? { kind: 'not-listed', reason } : undefined;
}

/** The error a checkServerIdentity hook returns: this agent refused the server it dialed. */
export function serverNotAllowed(address: string, identity: CertIdentity): GangwayError {
  return new GangwayError(
    ErrorCode.TLS,
    `this agent refused the peer at ${address}: its certificate (${describeIdentity(identity)}) is not in this agent's tls.allow`,
  );
}

/** Verification results OpenSSL reports when this side rejects the other's certificate (node's tls docs). */
const VERIFY_CODES = new Set([
  'UNABLE_TO_GET_ISSUER_CERT', 'UNABLE_TO_GET_CRL', 'UNABLE_TO_DECRYPT_CERT_SIGNATURE', 'UNABLE_TO_DECRYPT_CRL_SIGNATURE',
  'UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY', 'CERT_SIGNATURE_FAILURE', 'CRL_SIGNATURE_FAILURE', 'CERT_NOT_YET_VALID', 'CERT_HAS_EXPIRED',
  'CRL_NOT_YET_VALID', 'CRL_HAS_EXPIRED', 'ERROR_IN_CERT_NOT_BEFORE_FIELD', 'ERROR_IN_CERT_NOT_AFTER_FIELD',
  'DEPTH_ZERO_SELF_SIGNED_CERT', 'SELF_SIGNED_CERT_IN_CHAIN', 'UNABLE_TO_GET_ISSUER_CERT_LOCALLY', 'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'CERT_CHAIN_TOO_LONG', 'CERT_REVOKED', 'INVALID_CA', 'PATH_LENGTH_EXCEEDED', 'INVALID_PURPOSE', 'CERT_UNTRUSTED', 'CERT_REJECTED',
]);

/** Why this agent's TLS server refused a client's handshake, for its log: "certificate has expired (CERT_HAS_EXPIRED)". */
export function describeTlsError(err: NodeJS.ErrnoException): string {
  const alert = /^ERR_SSL_(?:SSLV3|TLSV1|TLSV13)_ALERT_(.+)$/.exec(err.code ?? '');
  if (alert) return `TLS alert: ${alert[1]!.toLowerCase().replace(/_/g, ' ')}`;
  const reason = (err as { reason?: string }).reason ?? err.message;
  return err.code ? `${reason} (${err.code})` : reason;
}

/**
 * Turns a failed wss connection into an error that says which side refused and why:
 * - this agent rejected the peer's certificate (OpenSSL verification result, or not listed);
 * - the peer rejected this agent's certificate (a TLS alert from the peer);
 * - the peer is not a TLS agent; otherwise: unreachable.
 */
export function clientConnectError(address: string, err: NodeJS.ErrnoException): GangwayError {
  if (err instanceof GangwayError) return err;
  const code = err.code ?? '';
  if (VERIFY_CODES.has(code)) {
    const reason = err.message.replace(/\.$/, '');
    return new GangwayError(ErrorCode.TLS, `this agent refused the certificate of the peer at ${address}: ${reason} (${code})`, { cause: err });
  }
  const alert = /^ERR_SSL_(?:SSLV3|TLSV1|TLSV13)_ALERT_(.+)$/.exec(code);
  if (alert) {
    const name = alert[1]!.toLowerCase().replace(/_/g, ' ');
    const aboutCert = /certificate|unknown ca|access denied/.test(name);
    return new GangwayError(
      ErrorCode.TLS,
      aboutCert
        ? `the peer at ${address} refused this agent's certificate (TLS alert: ${name}); check its tls.ca and this agent's tls.cert`
        : `the peer at ${address} ended the TLS handshake (TLS alert: ${name})`,
      { cause: err },
    );
  }
  if (/wrong version number|packet length too long|http request/i.test(`${code} ${err.message}`)) {
    return new GangwayError(ErrorCode.TLS, `the agent at ${address} does not speak TLS (it may run with insecurePlaintextLoopback); this agent dials peers only over TLS`, { cause: err });
  }
  return new GangwayError(ErrorCode.PEER_UNREACHABLE, `cannot reach the agent at ${address}: ${err.message}`, { cause: err });
}
