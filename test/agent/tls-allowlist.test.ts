// The allowlist and the transport rule, in memory: which certificate identities an entry
// matches, which entries are refused, and when an agent may run without TLS.
import { describe, expect, it } from 'vitest';
import { allowEntryProblem, commonNameOf, describeIdentity, isAllowed, parseAllowEntry } from '../../agent/peer/allowlist.js';
import { hostOf, isLoopbackHost } from '../../agent/peer/tls.js';
import { ConfigFileSchema, resolvePeerTransport } from '../../agent/config.js';

const FP = 'b7baedb1e1af164ba417963758994c27d2c2fb51c0485de8fe689b53f63319cf';
const withColons = FP.toUpperCase().match(/../g)!.join(':');
const hostA = { commonName: 'host-a', sha256: FP };

describe('tls.allow entries', () => {
  it.each([
    ['host-a', true],
    ['host-b', false],
    [`sha256:${FP}`, true],
    [`sha256:${withColons}`, true],
    [`SHA256:${FP.toUpperCase()}`, true],
    [`sha256:${'0'.repeat(64)}`, false],
  ])('%s matches host-a: %s', (entry, expected) => {
    expect(isAllowed(hostA, [parseAllowEntry(entry)])).toBe(expected);
  });

  it('matches a CN exactly: no case folding, no prefixes', () => {
    expect(isAllowed(hostA, [parseAllowEntry('HOST-A')])).toBe(false);
    expect(isAllowed(hostA, [parseAllowEntry('host')])).toBe(false);
    expect(isAllowed({ commonName: undefined, sha256: FP }, [parseAllowEntry('host-a')])).toBe(false);
  });

  it('an empty list allows nobody', () => {
    expect(isAllowed(hostA, [])).toBe(false);
  });

  it.each([
    ['sha256:abc', /64 hex digits/],
    [`sha256:${FP}00`, /64 hex digits/],
    [`sha256:${'g'.repeat(64)}`, /64 hex digits/],
    ['*.example.net', /wildcards are not allowed/],
    ['host a', /certificate CN/],
    ['', /certificate CN/],
  ])('refuses %j', (entry, message) => {
    expect(allowEntryProblem(entry)).toMatch(message);
    expect(() => parseAllowEntry(entry)).toThrow(message);
  });

  it('reads the CN from both forms node gives a subject in, and describes an identity as an allow entry', () => {
    expect(commonNameOf('C=DE\nCN=host-a')).toBe('host-a');
    expect(commonNameOf({ CN: 'host-a', O: 'x' })).toBe('host-a');
    expect(commonNameOf({ O: 'x' })).toBeUndefined();
    expect(describeIdentity(hostA)).toBe(`CN=host-a, sha256:${FP}`);
  });
});

describe('plain ws or TLS', () => {
  const tls = { cert: '/t/a.crt', key: '/t/a.key', ca: '/t/ca.crt', allow: ['host-b'] };

  it.each([
    ['127.0.0.1', true], ['127.1.2.3', true], ['localhost', true], ['::1', true], ['[::1]', true], ['::ffff:127.0.0.1', true],
    ['0.0.0.0', false], ['10.213.0.1', false], ['::', false], ['128.0.0.1', false], ['localhost.example.net', false],
  ])('%s is loopback: %s', (host, expected) => {
    expect(isLoopbackHost(host)).toBe(expected);
  });

  it('takes the host out of HOST:PORT', () => {
    expect(hostOf('[::1]:7401')).toBe('::1');
    expect(hostOf('10.213.0.2:7401')).toBe('10.213.0.2');
  });

  it('uses TLS whenever tls is set, on any address', () => {
    expect(resolvePeerTransport({ tls }, '10.213.0.1')).toEqual({ kind: 'tls', certPath: '/t/a.crt', keyPath: '/t/a.key', caPath: '/t/ca.crt', allow: ['host-b'] });
  });

  it('runs plain ws only when asked for by name and on loopback', () => {
    expect(resolvePeerTransport({ insecurePlaintextLoopback: true }, '127.0.0.1')).toEqual({ kind: 'plaintext-loopback' });
    expect(() => resolvePeerTransport({}, '127.0.0.1')).toThrow(/set 'tls.cert', 'tls.key', 'tls.ca' and 'tls.allow'/);
    expect(() => resolvePeerTransport({ insecurePlaintextLoopback: false }, '127.0.0.1')).toThrow(/peers need mutual TLS/);
    expect(() => resolvePeerTransport({ insecurePlaintextLoopback: true }, '0.0.0.0')).toThrow(/needs a loopback 'listen' .*got "0.0.0.0"/);
    expect(() => resolvePeerTransport({ insecurePlaintextLoopback: true, tls }, '127.0.0.1')).toThrow(/exclude each other/);
  });

  it('validates the tls section', () => {
    expect(ConfigFileSchema.safeParse({ tls }).success).toBe(true);
    expect(ConfigFileSchema.safeParse({ tls: { ...tls, allow: [] } }).success).toBe(false);
    expect(ConfigFileSchema.safeParse({ tls: { ...tls, extra: 1 } }).success).toBe(false);
    expect(ConfigFileSchema.safeParse({ tls: { ...tls, cert: 'a.crt' } }).success).toBe(false);
    expect(ConfigFileSchema.safeParse({ insecurePlaintextLoopback: 'yes' }).success).toBe(false);
  });
});
