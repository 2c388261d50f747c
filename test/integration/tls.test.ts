// Mutual TLS between real agent processes on loopback: a listed peer migrates a guest over
// wss; a certificate from another CA, an unlisted peer and an expired certificate are
// refused with GANGWAY_ERR_TLS and a message that says which side refused and why, in both
// directions; plain ws is refused at start-up unless asked for by name on loopback.
import { readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { initCa, issueHostCert, type CertResult } from '../../agent/cli/certs.js';
import { makeTempDir, type LocalAgent } from '../../agent/local-agent.js';
import { builtAgent, Cluster, mainJs, uniqueName } from '../helpers/cluster.js';

const DAY_MS = 86_400_000;

describe.skipIf(!builtAgent)('mutual TLS between agents', () => {
  const dir = makeTempDir('gangway-tls-');
  const certs: Record<string, CertResult> = {};
  let cluster: Cluster | undefined;

  beforeAll(async () => {
    await initCa({ dir: join(dir, 'ca'), days: 30 });
    await initCa({ dir: join(dir, 'other-ca'), days: 30 });
    for (const name of ['host-a', 'host-b', 'host-c']) {
      certs[name] = await issueHostCert({ dir: join(dir, 'ca'), name, sans: ['127.0.0.1'], validity: { days: 2 } });
    }
    // Same CN as a listed peer, but signed by another CA: the CA check must catch it.
    certs['other-a'] = await issueHostCert({ dir: join(dir, 'other-ca'), name: 'host-a', sans: ['127.0.0.1'], validity: { days: 2 } });
    certs['expired'] = await issueHostCert({
      dir: join(dir, 'ca'),
      name: 'host-x',
      validity: { notBefore: new Date(Date.now() - 3 * DAY_MS), notAfter: new Date(Date.now() - DAY_MS) },
    });
  });
  afterEach(async () => {
    await cluster?.cleanup();
    cluster = undefined;
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  /** TLS settings for an agent with certificate `cert`, trusting the main CA, accepting `allow`. */
  const tls = (cert: string, allow: string[]) => ({ cert: certs[cert]!.certPath, key: certs[cert]!.keyPath, ca: join(dir, 'ca', 'ca.crt'), allow });

  /** Starts a guest on `from`, asks it to migrate to `to`; returns the CLI's JSON and stderr. */
  async function migrate(from: LocalAgent, to: LocalAgent | string, extra: string[] = []) {
    const name = uniqueName('vm');
    const start = await cluster!.cli(from, ['guest', 'start', name, '--memory', '16MiB', '--dirty-rate', '4MiB/s', '--json']);
    expect(start.exitCode, start.stderr).toBe(0);
    const run = await cluster!.cli(from, ['migrate', name, '--to', typeof to === 'string' ? to : to.listen, ...extra, '--json']);
    return { exitCode: run.exitCode, json: JSON.parse(run.stdout || '{}'), stderr: run.stderr, name };
  }

  it('sends raw pre-copy rounds on TLS channels, each side checking the other presented its session\'s certificate', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a', [], undefined, tls('host-a', ['host-b']));
    const b = await cluster.agent('b', [], undefined, tls('host-b', ['host-a']));
    const run = await migrate(a, b, ['--codec', 'raw', '--no-dedup']);
    expect(run.exitCode, run.stderr).toBe(0);
    expect(run.json.guests[0].verified).toBe(true);
    expect(run.json.guests[0].channels).toMatchObject({ count: 2, tls: true });
    // Every page of round 0 on them, but the guest's memory never written (holes: known zeros, not read).
    expect(run.json.guests[0].channels.pages + (run.json.guests[0].rounds[0].holePages ?? 0)).toBeGreaterThanOrEqual((16 * 1024 * 1024) / 4096);
    expect((await b.status()).guests.map((g) => g.name)).toContain(run.name);
  });

  it('speaks TLS 1.3 only: openssl s_client gets in with 1.3 and is refused with 1.2', async () => {
    cluster = new Cluster();
    const b = await cluster.agent('b', [], undefined, tls('host-b', ['host-a']));
    const client = (version: string) =>
      execa('openssl', ['s_client', '-connect', b.listen, version, '-cert', certs['host-a']!.certPath, '-key', certs['host-a']!.keyPath, '-CAfile', join(dir, 'ca', 'ca.crt')], { input: '', reject: false, timeout: 20_000 });
    const tls13 = await client('-tls1_3');
    expect(tls13.stdout).toMatch(/New, TLSv1\.3, Cipher is TLS_/);
    expect(tls13.stdout).toMatch(/Verify return code: 0 \(ok\)/);
    const tls12 = await client('-tls1_2');
    expect(tls12.exitCode).not.toBe(0);
    expect(tls12.stderr).toMatch(/protocol version/i);
    expect(tls12.stdout).toMatch(/Cipher is \(NONE\)/);
  });

  it('migrates a guest over wss between listed peers (by CN and by fingerprint), verified', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a', [], undefined, tls('host-a', ['host-b']));
    const b = await cluster.agent('b', [], undefined, tls('host-b', [certs['host-a']!.fingerprint.toUpperCase().replace('SHA256:', 'sha256:')]));
    const run = await migrate(a, b);
    expect(run.exitCode, run.stderr).toBe(0);
    expect(run.json.guests[0].verified).toBe(true);
    expect((await b.status()).guests.map((g) => g.name)).toContain(run.name);
  });

  it('refuses a certificate from another CA, and says which side refused', async () => {
    cluster = new Cluster();
    const b = await cluster.agent('b', [], undefined, tls('host-b', ['host-a']));
    // This agent trusts the right CA, but its own certificate comes from another one.
    const stranger = await cluster.agent('stranger', [], undefined, { ...tls('other-a', ['host-b']) });
    const out = await migrate(stranger, b);
    expect(out.exitCode).toBe(1);
    expect(out.json.error.code).toBe('GANGWAY_ERR_TLS');
    expect(out.json.error.message).toMatch(
      new RegExp(`^the peer at ${b.listen} refused this agent's certificate: .*not signed by tls.ca.*\\((UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT_LOCALLY)\\)$`),
    );
    expect(readFileSync(b.logPath, 'utf8')).toMatch(/"reason":"unable to .*"msg":"refused a peer's certificate"/);

    // The other direction: this agent dials a peer whose certificate it cannot verify.
    const a = await cluster.agent('a', [], undefined, tls('host-a', ['host-b']));
    const strangerServer = await cluster.agent('stranger-server', [], undefined, { ...tls('other-a', ['host-a']) });
    const back = await migrate(a, strangerServer);
    expect(back.json.error.code).toBe('GANGWAY_ERR_TLS');
    expect(back.json.error.message).toMatch(
      new RegExp(`this agent refused the certificate of the peer at ${strangerServer.listen}: .*\\((UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT_LOCALLY)\\)`),
    );
  });

  it('refuses an unlisted peer with a valid certificate, on either side', async () => {
    cluster = new Cluster();
    const b = await cluster.agent('b', [], undefined, tls('host-b', ['host-a']));
    const c = await cluster.agent('c', [], undefined, tls('host-c', ['host-b']));
    const out = await migrate(c, b);
    expect(out.json.error.code).toBe('GANGWAY_ERR_TLS');
    expect(out.json.error.message).toBe(`the peer at ${b.listen} does not list this agent (CN=host-c, ${certs['host-c']!.fingerprint}) in its tls.allow`);
    expect(readFileSync(b.logPath, 'utf8')).toMatch(/"reason":"CN=host-c, sha256:[0-9a-f]{64} is not in tls.allow".*"msg":"refused a peer"/);

    // b dials c, which c would accept, but b does not list c.
    const back = await migrate(b, c);
    expect(back.json.error.code).toBe('GANGWAY_ERR_TLS');
    expect(back.json.error.message).toBe(
      `this agent refused the peer at ${c.listen}: its certificate (CN=host-c, ${certs['host-c']!.fingerprint}) is not in this agent's tls.allow`,
    );
  });

  it('refuses an expired certificate, on either side', async () => {
    cluster = new Cluster();
    const b = await cluster.agent('b', [], undefined, tls('host-b', ['host-x']));
    const x = await cluster.agent('x', [], undefined, tls('expired', ['host-b']));
    const out = await migrate(x, b);
    expect(out.json.error.code).toBe('GANGWAY_ERR_TLS');
    expect(out.json.error.message).toBe(`the peer at ${b.listen} refused this agent's certificate: certificate has expired (CERT_HAS_EXPIRED)`);
    expect(readFileSync(x.logPath, 'utf8')).toMatch(/this agent's certificate has expired/);

    const back = await migrate(b, x);
    expect(back.json.error.code).toBe('GANGWAY_ERR_TLS');
    expect(back.json.error.message).toBe(`this agent refused the certificate of the peer at ${x.listen}: certificate has expired (CERT_HAS_EXPIRED)`);
  });

  it('refuses plain ws unless asked for by name on loopback, and a plaintext agent dials loopback only', async () => {
    const agent = (args: string[]) =>
      execa(process.execPath, [mainJs, 'agent', '--state-dir', join(dir, `state-${Math.random()}`), ...args], { reject: false, timeout: 30_000, env: { GANGWAY_LISTEN: '' } });
    const nonLoopback = await agent(['--insecure-plaintext-loopback', '--listen', '10.213.0.1:0']);
    expect(nonLoopback.exitCode).toBe(1);
    expect(nonLoopback.stderr).toMatch(/'insecurePlaintextLoopback' needs a loopback 'listen' \(127.0.0.0\/8, ::1 or localhost; got "10.213.0.1"\).*tls.cert.*GANGWAY_ERR_BAD_REQUEST/);
    const nothing = await agent(['--listen', '127.0.0.1:0']);
    expect(nothing.exitCode).toBe(1);
    expect(nothing.stderr).toMatch(/set 'tls.cert', 'tls.key', 'tls.ca' and 'tls.allow'.*'insecurePlaintextLoopback: true' \(--insecure-plaintext-loopback\)/);

    cluster = new Cluster();
    const plain = await cluster.agent('plain');
    const far = await migrate(plain, '10.213.0.1:7401');
    expect(far.json.error.code).toBe('GANGWAY_ERR_BAD_REQUEST');
    expect(far.json.error.message).toMatch(/dials loopback peers only; 10.213.0.1:7401 is not loopback/);
    // A TLS agent never falls back to plain ws.
    const a = await cluster.agent('a', [], undefined, tls('host-a', ['host-b']));
    const mixed = await migrate(a, plain);
    expect(mixed.json.error.code).toBe('GANGWAY_ERR_TLS');
    expect(mixed.json.error.message).toMatch(/does not speak TLS/);
  });

  it('gangway certs: keys at 0600, a certificate the CA verifies, never an overwrite, clear errors', async () => {
    const gangway = (args: string[]) => execa(process.execPath, [mainJs, 'certs', ...args], { reject: false, timeout: 30_000 });
    const caDir = join(dir, 'cli-ca');
    const init = await gangway(['init', '--dir', caDir, '--days', '10', '--json']);
    expect(init.exitCode, init.stderr).toBe(0);
    expect(statSync(join(caDir, 'ca.key')).mode & 0o777).toBe(0o600);
    const issue = await gangway(['issue', 'hv1.example.net', '--dir', caDir, '--san', '10.213.0.2', '--san', 'hv1', '--json']);
    expect(issue.exitCode, issue.stderr).toBe(0);
    const result = JSON.parse(issue.stdout);
    expect(result).toMatchObject({ name: 'hv1.example.net', certPath: join(caDir, 'hv1.example.net.crt'), caPath: join(caDir, 'ca.crt') });
    expect(result.fingerprint).toMatch(/^sha256:[0-9a-f]{64}$/);
    expect(result.subjectAltNames).toEqual(['DNS:hv1.example.net', 'IP Address:10.213.0.2', 'DNS:hv1']);
    expect(statSync(result.keyPath).mode & 0o777).toBe(0o600);
    const verify = await execa('openssl', ['verify', '-CAfile', result.caPath, '-purpose', 'sslclient', result.certPath], { reject: false });
    expect(verify.stdout, verify.stderr).toMatch(/: OK$/);

    for (const [args, message] of [
      [['init', '--dir', caDir], /ca.key and .*ca.crt already exist: this directory already holds a CA/],
      [['issue', 'hv1.example.net', '--dir', caDir], /already exist: a certificate for hv1.example.net was issued already/],
      [['issue', 'host_a', '--dir', caDir], /certificate name "host_a" must be a host name/],
      [['issue', 'host-a', '--dir', caDir, '--san', '10.0.0.1/24'], /--san "10.0.0.1\/24" is neither an IP address nor a DNS name/],
      [['issue', 'host-a', '--dir', join(dir, 'no-ca')], /no CA in .*no-ca \(ca.key and ca.crt\): create one with `gangway certs init --dir/],
      [['init', '--dir', join(dir, 'x'), '--days', '1.5'], /--days must be a whole number of days from 1 to 36500/],
    ] as const) {
      const run = await gangway([...args]);
      expect(run.exitCode).not.toBe(0);
      expect(run.stderr).toMatch(message);
    }
    // A refused issue leaves the existing files as they were.
    expect(readFileSync(result.certPath, 'utf8')).toContain('BEGIN CERTIFICATE');
  });
});
