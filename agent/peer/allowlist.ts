// Which peers an agent talks to: `tls.allow` lists certificate identities, either the
// subject CN (`host-b`) or the SHA-256 fingerprint of the whole certificate
// (`sha256:` + 64 hex digits, colons and case optional). Both sides check the other's
// certificate against their own list after the TLS handshake, which already proved that the
// certificate comes from `tls.ca`. Pure: no I/O, so every rule is testable in memory.

/** What identifies a certificate: its subject CN (if any) and its SHA-256 fingerprint (lower-case hex, no colons). */
export interface CertIdentity {
  commonName: string | undefined;
  sha256: string;
}

export type AllowEntry = { kind: 'cn'; commonName: string } | { kind: 'sha256'; sha256: string };

const CN_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$/;

/** Why `entry` is not a valid allow entry, or undefined when it is. */
export function allowEntryProblem(entry: string): string | undefined {
  if (/^sha256:/i.test(entry)) {
    const hex = entry.slice(7).replace(/:/g, '');
    return /^[0-9a-fA-F]{64}$/.test(hex) ? undefined : 'a sha256: entry needs 64 hex digits (colons optional)';
  }
  if (entry.includes('*')) return 'wildcards are not allowed: list each peer';
  return CN_PATTERN.test(entry) ? undefined : 'must be a certificate CN (e.g. host-b) or sha256: + the hex fingerprint';
}

export function parseAllowEntry(entry: string): AllowEntry {
  const problem = allowEntryProblem(entry);
  if (problem) throw new Error(`tls.allow entry ${JSON.stringify(entry)}: ${problem}`);
  if (/^sha256:/i.test(entry)) return { kind: 'sha256', sha256: entry.slice(7).replace(/:/g, '').toLowerCase() };
  return { kind: 'cn', commonName: entry };
}

/** Node's `fingerprint256` is upper-case hex with colons; identities compare in lower case without them. */
export function normalizeFingerprint(fingerprint: string): string {
  return fingerprint.replace(/:/g, '').toLowerCase();
}

/** The CN out of a subject as Node prints it ("C=DE\nCN=host-a") or parses it ({ CN: 'host-a' }). */
export function commonNameOf(subject: string | Record<string, string | string[] | undefined> | undefined): string | undefined {
  if (subject === undefined) return undefined;
  if (typeof subject === 'string') {
    const line = subject.split('\n').find((part) => part.startsWith('CN='));
    return line?.slice(3);
  }
  const cn = subject.CN;
  return Array.isArray(cn) ? cn[0] : cn;
}

export function isAllowed(identity: CertIdentity, allow: readonly AllowEntry[]): boolean {
  return allow.some((entry) =>
    entry.kind === 'cn' ? identity.commonName === entry.commonName : identity.sha256 === entry.sha256,
  );
}

/**
 * The agent id a certificate stands for: its CN, or `sha256:` and its fingerprint when it has
 * none. An agent with TLS goes by this id, and a peer's hello must name the id of the
 * certificate it presented, so that everything keyed by agent id (who opened a migration,
 * who may reattach or ask about it) is keyed by who the peer proved to be.
 */
export function agentIdOf(identity: CertIdentity): string {
  return identity.commonName ?? `sha256:${identity.sha256}`;
}

/** "CN=host-a, sha256:ab12...": what an operator pastes into tls.allow. */
export function describeIdentity(identity: CertIdentity): string {
  return `${identity.commonName === undefined ? 'no CN' : `CN=${identity.commonName}`}, sha256:${identity.sha256}`;
}
