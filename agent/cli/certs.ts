// `gangway certs init` and `gangway certs issue HOST`: a small CA and host certificates for
// operators without a PKI. All the cryptography is the openssl CLI's; this file only
// chooses the options, keeps private keys at 0600 and never overwrites a file.
import { X509Certificate } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { execa } from 'execa';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { normalizeFingerprint } from '../peer/allowlist.js';

export const CA_KEY_FILE = 'ca.key';
export const CA_CERT_FILE = 'ca.crt';
export const DEFAULT_CA_DAYS = 3650;
export const DEFAULT_HOST_DAYS = 825;
const MAX_DAYS = 36_500;

export interface CertResult {
  /** The certificate's subject CN. */
  name: string;
  certPath: string;
  keyPath: string;
  /** The CA certificate every agent puts in tls.ca. */
  caPath: string;
  /** `sha256:` + hex: an allow entry that pins exactly this certificate. */
  fingerprint: string;
  subjectAltNames: string[];
  notBefore: string;
  notAfter: string;
}

/** The validity period: `days` from now, or explicit dates (tests make expired certificates with them). */
export type Validity = { days: number } | { notBefore: Date; notAfter: Date };

const HOST_NAME = /^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;

function bad(message: string): GangwayError {
  return new GangwayError(ErrorCode.BAD_REQUEST, message);
}

export function checkDays(days: number, what = '--days'): number {
  if (!Number.isInteger(days) || days < 1 || days > MAX_DAYS) throw bad(`${what} must be a whole number of days from 1 to ${MAX_DAYS} (got ${days})`);
  return days;
}

/** NAME becomes the CN and the file names: a host name (letters, digits, '-', '.'). */
export function checkName(name: string): string {
  if (!HOST_NAME.test(name)) throw bad(`certificate name ${JSON.stringify(name)} must be a host name: letters, digits, '-' and '.', e.g. host-a or hv1.example.net`);
  return name;
}

/** A --san value as an openssl subjectAltName entry: an IP address or a DNS name. */
export function sanEntry(value: string): string {
  const bare = value.replace(/^\[|\]$/g, '');
  if (isIP(bare)) return `IP:${bare}`;
  if (HOST_NAME.test(value)) return `DNS:${value}`;
  throw bad(`--san ${JSON.stringify(value)} is neither an IP address nor a DNS name`);
}

async function openssl(args: string[], input?: string): Promise<string> {
  const run = await execa('openssl', args, { reject: false, ...(input === undefined ? {} : { input }) });
  if (run.failed || run.exitCode !== 0) {
    const detail = (String(run.stderr ?? '') || (run.message ?? '')).trim().split('\n').slice(0, 4).join('; ');
    throw new GangwayError(ErrorCode.INTERNAL, `openssl ${args[0]} failed (exit ${run.exitCode ?? 'none'}): ${detail}`);
  }
  return run.stdout;
}

/** A new P-256 private key, written with mode 0600; refuses to replace an existing file. */
async function writeNewKey(path: string): Promise<void> {
  const pem = await openssl(['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256']);
  writeFileSync(path, `${pem.trim()}\n`, { mode: 0o600, flag: 'wx' });
  // The mode above is filtered by the umask; a key must never be more than 0600.
  chmodSync(path, 0o600);
}

function refuseExisting(paths: string[], hint: string): void {
  const existing = paths.filter((path) => existsSync(path));
  if (existing.length > 0) throw bad(`${existing.join(' and ')} already exist${existing.length === 1 ? 's' : ''}: ${hint}`);
}

/** openssl's date form for `ca -startdate/-enddate`: YYYYMMDDHHMMSSZ. */
function opensslDate(date: Date): string {
  return `${date.toISOString().replace(/[-:T]/g, '').slice(0, 14)}Z`;
}

function describe(name: string, certPath: string, keyPath: string, caPath: string): CertResult {
  const cert = new X509Certificate(readFileSync(certPath));
  return {
    name,
    certPath,
    keyPath,
    caPath,
    fingerprint: `sha256:${normalizeFingerprint(cert.fingerprint256)}`,
    subjectAltNames: cert.subjectAltName ? cert.subjectAltName.split(', ') : [],
    notBefore: new Date(cert.validFrom).toISOString(),
    notAfter: new Date(cert.validTo).toISOString(),
  };
}

/** Creates DIR/ca.key (0600) and a self-signed DIR/ca.crt; refuses when either exists. */
export async function initCa(options: { dir: string; days?: number; name?: string }): Promise<CertResult> {
  const dir = resolve(options.dir);
  const days = checkDays(options.days ?? DEFAULT_CA_DAYS);
  const name = options.name ?? 'gangway-ca';
  const keyPath = join(dir, CA_KEY_FILE);
  const certPath = join(dir, CA_CERT_FILE);
  mkdirSync(dir, { recursive: true, mode: 0o750 });
  refuseExisting([keyPath, certPath], `this directory already holds a CA (issue host certificates with \`gangway certs issue HOST --dir ${dir}\`, or choose another --dir)`);
  await writeNewKey(keyPath);
  try {
    const config = ['[req]', 'distinguished_name = dn', 'prompt = no', '[dn]', `CN = ${name}`, '[ext]',
      'basicConstraints = critical, CA:TRUE, pathlen:0', 'keyUsage = critical, keyCertSign, cRLSign', 'subjectKeyIdentifier = hash'].join('\n');
    const work = mkdtempSync(join(tmpdir(), 'gangway-certs-'));
    try {
      writeFileSync(join(work, 'req.cnf'), config);
      await openssl(['req', '-new', '-x509', '-config', join(work, 'req.cnf'), '-extensions', 'ext', '-key', keyPath, '-days', String(days), '-sha256', '-out', certPath]);
    } finally {
      rmSync(work, { recursive: true, force: true });
    }
  } catch (err) {
    rmSync(keyPath, { force: true });
    rmSync(certPath, { force: true });
    throw err;
  }
  return describe(name, certPath, keyPath, certPath);
}

/**
 * Creates DIR/NAME.key (0600) and DIR/NAME.crt signed by DIR's CA: CN=NAME, usable as TLS
 * server and client (agents are both), with NAME (when a DNS name) and every --san as
 * subjectAltName. Refuses when the files exist or the CA is missing.
 */
export async function issueHostCert(options: { dir: string; name: string; sans?: string[]; validity?: Validity }): Promise<CertResult> {
  const dir = resolve(options.dir);
  const name = checkName(options.name);
  const validity = options.validity ?? { days: DEFAULT_HOST_DAYS };
  if ('days' in validity) checkDays(validity.days);
  else if (!(validity.notBefore < validity.notAfter)) throw bad('the certificate must start before it ends');
  const sans = [...new Set([`DNS:${name}`, ...(options.sans ?? []).map(sanEntry)])];
  const caKey = join(dir, CA_KEY_FILE);
  const caCert = join(dir, CA_CERT_FILE);
  if (!existsSync(caKey) || !existsSync(caCert)) {
    throw bad(`no CA in ${dir} (${CA_KEY_FILE} and ${CA_CERT_FILE}): create one with \`gangway certs init --dir ${dir}\``);
  }
  const keyPath = join(dir, `${name}.key`);
  const certPath = join(dir, `${name}.crt`);
  refuseExisting([keyPath, certPath], `a certificate for ${name} was issued already (remove both files to issue a new one)`);
  const work = mkdtempSync(join(tmpdir(), 'gangway-certs-'));
  try {
    await writeNewKey(keyPath);
    const csr = join(work, 'host.csr');
    await openssl(['req', '-new', '-key', keyPath, '-subj', `/CN=${name}`, '-out', csr]);
    // `openssl ca` (unlike `x509 -req` in 3.0) takes explicit start and end dates; its
    // database lives in the throwaway work directory, so DIR holds only keys and certificates.
    const notBefore = 'days' in validity ? new Date(Date.now() - 5 * 60_000) : validity.notBefore;
    const notAfter = 'days' in validity ? new Date(Date.now() + validity.days * 86_400_000) : validity.notAfter;
    writeFileSync(join(work, 'index.txt'), '');
    writeFileSync(join(work, 'serial'), `${randomSerial()}\n`);
    const config = [
      '[ca]', 'default_ca = gw', '[gw]', `database = ${join(work, 'index.txt')}`, `new_certs_dir = ${work}`, `serial = ${join(work, 'serial')}`,
      'default_md = sha256', 'policy = policy', 'unique_subject = no', 'copy_extensions = none', 'x509_extensions = ext',
      '[policy]', 'commonName = supplied', '[ext]', 'basicConstraints = critical, CA:FALSE', 'keyUsage = critical, digitalSignature, keyEncipherment',
      'extendedKeyUsage = serverAuth, clientAuth', 'subjectKeyIdentifier = hash', 'authorityKeyIdentifier = keyid', `subjectAltName = ${sans.join(', ')}`,
    ].join('\n');
    writeFileSync(join(work, 'ca.cnf'), config);
    await openssl(['ca', '-batch', '-notext', '-config', join(work, 'ca.cnf'), '-cert', caCert, '-keyfile', caKey, '-in', csr, '-out', certPath,
      '-startdate', opensslDate(notBefore), '-enddate', opensslDate(notAfter)]);
  } catch (err) {
    rmSync(keyPath, { force: true });
    rmSync(certPath, { force: true });
    throw err;
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
  return describe(name, certPath, keyPath, caCert);
}

/** 16 random bytes, positive: a serial no other certificate of this CA shares. */
function randomSerial(): string {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  bytes[0] = (bytes[0]! & 0x7f) | 0x10;
  return Buffer.from(bytes).toString('hex');
}
