// `gangway agent --check-config` checks what a start would check on this host, and lists
// every problem at once: TLS files that cannot be read or do not belong together, directories
// that are missing, addresses in use, an agent already running on the state dir. It used to
// validate the settings only, and a start under systemd was the first to find the rest.
import { chmodSync, mkdirSync, rmSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { execa, execaSync } from 'execa';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { initCa, issueHostCert, type CertResult } from '../../agent/cli/certs.js';
import { makeTempDir } from '../../agent/local-agent.js';
import { builtAgent, Cluster, mainJs } from '../helpers/cluster.js';

const checkConfig = (args: string[], options: { asNobody?: boolean } = {}) => {
  const command = [process.execPath, mainJs, 'agent', '--check-config', ...args];
  return options.asNobody
    ? execa('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', ...command], { reject: false, timeout: 60_000, env: { GANGWAY_LISTEN: '' } })
    : execa(command[0]!, command.slice(1), { reject: false, timeout: 60_000, env: { GANGWAY_LISTEN: '' } });
};

/** The problem lines of "a start would fail:" (indented under it). */
const problemsOf = (stderr: string) => stderr.split('\n').filter((line) => line.startsWith('  ')).map((line) => line.trim().replace(/ \[GANGWAY_ERR_\w+\]$/, ''));

const nobodyCanRun =
  process.getuid?.() === 0 && execaSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, '-e', `require('fs').accessSync(${JSON.stringify(mainJs)})`], { reject: false }).exitCode === 0;

describe.skipIf(!builtAgent)('agent --check-config on this host', () => {
  // Made in beforeAll: a run that filters every test out runs no afterAll to remove it.
  let dir = '';
  const certs: Record<string, CertResult> = {};
  const servers: Server[] = [];
  let cluster: Cluster | undefined;

  beforeAll(async () => {
    dir = makeTempDir('gangway-check-');
    await initCa({ dir: join(dir, 'ca'), days: 30 });
    await initCa({ dir: join(dir, 'other-ca'), days: 30 });
    for (const name of ['host-a', 'host-b']) certs[name] = await issueHostCert({ dir: join(dir, 'ca'), name, sans: ['127.0.0.1'], validity: { days: 2 } });
    certs['stranger'] = await issueHostCert({ dir: join(dir, 'other-ca'), name: 'host-a', sans: ['127.0.0.1'], validity: { days: 2 } });
  });
  afterEach(async () => {
    for (const server of servers.splice(0)) server.close();
    await cluster?.cleanup();
    cluster = undefined;
  });
  afterAll(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  const ca = () => join(dir, 'ca', 'ca.crt');
  const tlsArgs = (cert: string, key: string, caPath = ca()) => ['--tls-cert', cert, '--tls-key', key, '--tls-ca', caPath, '--tls-allow', 'host-b'];
  const base = (name: string) => ['--state-dir', join(dir, name), '--listen', '127.0.0.1:0'];

  it('passes good TLS files and prints the settings', async () => {
    const run = await checkConfig([...base('good'), ...tlsArgs(certs['host-a']!.certPath, certs['host-a']!.keyPath)]);
    expect(run.exitCode, run.stderr).toBe(0);
    expect(JSON.parse(run.stdout).transport).toMatchObject({ kind: 'tls', certPath: certs['host-a']!.certPath });
  });

  it.each([
    ['a key that is not there', () => tlsArgs(certs['host-a']!.certPath, join(dir, 'missing.key')), () => `tls.key: cannot read ${join(dir, 'missing.key')} (ENOENT)`],
    ['a key of another certificate', () => tlsArgs(certs['host-a']!.certPath, certs['host-b']!.keyPath), () => `tls.key: ${certs['host-b']!.keyPath} does not belong to tls.cert ${certs['host-a']!.certPath}`],
    [
      'a certificate another CA signed',
      () => tlsArgs(certs['stranger']!.certPath, certs['stranger']!.keyPath),
      () => `tls.cert: ${certs['stranger']!.certPath} is not signed by tls.ca ${ca()}: peers that trust that CA refuse it (issue it with \`gangway certs issue\` from that CA)`,
    ],
  ])('refuses %s, naming the setting and the file', async (_what, args, problem) => {
    const run = await checkConfig([...base('tls'), ...args()]);
    expect(run.exitCode).toBe(1);
    expect(run.stderr).toMatch(/^gangway: a start would fail:\n/);
    expect(problemsOf(run.stderr)).toEqual([problem()]);
    // What a start would take is printed all the same.
    expect(JSON.parse(run.stdout).transport.kind).toBe('tls');
  });

  it.skipIf(!nobodyCanRun)('refuses a key the agent\'s user cannot read (the agent runs as nobody, the key is root\'s 0600)', async () => {
    // The certificates are readable by all, the key by root alone, as when a key is copied
    // without giving it to the service user.
    const shared = join(dir, 'shared');
    mkdirSync(shared, { mode: 0o755 });
    chmodSync(dir, 0o755);
    chmodSync(join(dir, 'ca'), 0o755);
    chmodSync(certs['host-a']!.certPath, 0o644);
    chmodSync(ca(), 0o644);
    expect(certs['host-a']!.keyPath.startsWith(join(dir, 'ca'))).toBe(true);
    const stateDir = join(shared, 'state');
    mkdirSync(stateDir, { mode: 0o700 });
    chmodSync(shared, 0o777);
    execaSync('chown', ['65534:65534', stateDir]);
    const run = await checkConfig(['--state-dir', stateDir, '--listen', '127.0.0.1:0', ...tlsArgs(certs['host-a']!.certPath, certs['host-a']!.keyPath)], { asNobody: true });
    expect(run.exitCode).toBe(1);
    expect(problemsOf(run.stderr)).toEqual([`tls.key: cannot read ${certs['host-a']!.keyPath} (EACCES)`]);
  });

  it('lists every problem at once: missing directories and an address in use', async () => {
    const taken = createServer();
    servers.push(taken);
    await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve));
    const address = `127.0.0.1:${(taken.address() as { port: number }).port}`;
    const run = await checkConfig([
      '--insecure-plaintext-loopback',
      '--state-dir', join(dir, 'state-many'),
      '--listen', '127.0.0.1:0',
      '--metrics-listen', address,
      '--memory-dir', join(dir, 'no-memory'),
      '--vm-disks-dir', join(dir, 'no-disks'),
    ]);
    expect(run.exitCode).toBe(1);
    expect(problemsOf(run.stderr)).toEqual([
      `memoryDir: ${join(dir, 'no-memory')} does not exist (create it, or set another directory)`,
      `vm.disksDir: ${join(dir, 'no-disks')} does not exist (create it, or set another directory)`,
      `metrics.listen: cannot listen on ${address}: the address is in use (another agent or program listens there); set another address with metrics.listen (--metrics-listen, GANGWAY_METRICS_LISTEN)`,
    ]);
    expect(run.stderr).not.toMatch(/    at |Unhandled/);
  });

  it('says when an agent already runs with the state dir and holds the address', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a');
    const run = await checkConfig(['--insecure-plaintext-loopback', '--state-dir', a.stateDir, '--listen', a.listen]);
    expect(run.exitCode).toBe(1);
    expect(problemsOf(run.stderr)).toEqual([
      `stateDir: an agent is already running with state dir ${a.stateDir} (it answers on ${a.stateDir}/control.sock)`,
      `listen: cannot listen on ${a.listen}: the address is in use (another agent or program listens there); set another address with listen (--listen, GANGWAY_LISTEN)`,
    ]);
    // The check took nothing from the running agent.
    expect((await a.status()).agent.listen).toBe(a.listen);
  });
});
