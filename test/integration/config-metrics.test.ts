// Operator-facing configuration and observability: each kind of config mistake gets its own
// clear error; file < environment < flags; /metrics moves during a migration and parses as
// the Prometheus text format.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { execa } from 'execa';
import { setTimeout as sleep } from 'node:timers/promises';
import { builtAgent, Cluster, mainJs, uniqueName } from '../helpers/cluster.js';
import { PROTOCOL_VERSION } from '../../protocol/limits.js';

const dir = mkdtempSync(join(tmpdir(), 'gangway-config-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function configFile(name: string, text: string): string {
  const path = join(dir, name);
  writeFileSync(path, text);
  return path;
}

const checkConfig = (args: string[], env: Record<string, string> = {}) =>
  execa(process.execPath, [mainJs, 'agent', '--check-config', ...args], { reject: false, env: { GANGWAY_LISTEN: '', ...env } });

describe.skipIf(!builtAgent)('agent configuration', () => {
  it.each([
    // A typo used to get the whole list of every section's settings.
    ['a mistyped key', 'lisen: 127.0.0.1:7401\n', /'lisen' is not a setting: did you mean 'listen'\? \[/],
    ['a mistyped nested key', 'traffic:\n  contention:\n    hihg: 0.5\n', /'traffic.contention.hihg' is not a setting: did you mean 'traffic.contention.high'\?/],
    ['a key like no setting', 'colour: blue\n', /'colour' is not a setting \(the top level takes listen, stateDir, memoryDir, tracker, shutdownGrace, peerTimeout, postcopyReattach, logLevel, metrics, control, tls/],
    ['a value of the wrong kind', 'listen: 7401\n', /'listen'.*\(got 7401\)/],
    ['a bad address', 'listen: localhost\n', /'listen' must be HOST:PORT/],
    ['a port out of range', 'listen: 127.0.0.1:70000\n', /'listen' port must be at most 65535/],
    ['a relative path', 'stateDir: var/lib/gangway\n', /'stateDir' must be an absolute path \(got "var\/lib\/gangway"\)/],
    ['an unknown choice', 'tracker: magic\n', /'tracker'.*"auto".*"uffd-wp".*"hash-scan".*\(got "magic"\)/],
    ['a bad duration', 'shutdownGrace: soon\n', /'shutdownGrace' duration "soon" is not understood/],
    ['an unknown nested key', 'metrics:\n  port: 9464\n', /'metrics.port' is not a setting \(metrics takes listen\)/],
    ['broken YAML', 'listen: [1\n', /not valid YAML at line 2/],
    ['a list instead of settings', '- listen\n', /must be a mapping of settings/],
    ['a duplicated key', 'listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\n', /not valid YAML.*(unique|Map keys)/i],
    ['a bad allow entry', 'tls:\n  cert: /a\n  key: /b\n  ca: /c\n  allow: [sha256:abc]\n', /'tls.allow.0' a sha256: entry needs 64 hex digits \(colons optional\) \(got "sha256:abc"\)/],
    ['an empty allow list', 'tls:\n  cert: /a\n  key: /b\n  ca: /c\n  allow: []\n', /'tls.allow' must list at least one peer/],
    ['a relative certificate path', 'tls:\n  cert: a.crt\n  key: /b\n  ca: /c\n  allow: [host-b]\n', /'tls.cert' must be an absolute path \(got "a.crt"\)/],
    ['an incomplete tls section', 'tls:\n  cert: /a\n  allow: [host-b]\n', /'tls.key' is missing \(tls needs cert, key, ca and allow\)/],
    ['an unknown tls key', 'tls:\n  crt: /a\n', /'tls.crt' is not a setting: did you mean 'tls.cert'\?/],
    ['a peer timeout below a second', 'peerTimeout: 500ms\n', /'peerTimeout' must be at least 1s \(got "500ms"\)/],
    ['a post-copy reattach window that is not a duration', 'postcopyReattach: forever\n', /'postcopyReattach' duration "forever" is not understood/],
    ['plaintext as a word', 'insecurePlaintextLoopback: yes\n', /'insecurePlaintextLoopback' must be true or false \(got "yes"\)/],
    ['plaintext on a non-loopback address', 'insecurePlaintextLoopback: true\nlisten: 0.0.0.0:7401\n', /'insecurePlaintextLoopback' needs a loopback 'listen'.*got "0.0.0.0"/],
    ['both tls and plaintext', 'insecurePlaintextLoopback: true\ntls:\n  cert: /a\n  key: /b\n  ca: /c\n  allow: [host-b]\n', /'tls' and 'insecurePlaintextLoopback' exclude each other/],
  ])('rejects %s with its own message', async (_kind, text, message) => {
    const run = await checkConfig(['--config', configFile(`c${Math.random()}.yaml`, text)]);
    expect(run.exitCode).toBe(1);
    expect(run.stderr).toMatch(message);
    expect(run.stderr).toMatch(/GANGWAY_ERR_BAD_REQUEST/);
    // One section's settings at most, never every section's.
    expect(run.stderr).not.toMatch(/dedup takes|allowed:/);
  });

  it('names the file when it cannot be read, the variable for a bad environment value, and the flag for a bad flag', async () => {
    expect((await checkConfig(['--config', join(dir, 'missing.yaml')])).stderr).toMatch(/missing.yaml: cannot be read \(ENOENT\)/);
    expect((await checkConfig([], { GANGWAY_TRACKER: 'fast' })).stderr).toMatch(/environment: GANGWAY_TRACKER .*\(got "fast"\)/);
    expect((await checkConfig(['--shutdown-grace', 'later'])).stderr).toMatch(/--shutdown-grace: duration "later"/);
  });

  it('takes the file, then the environment, then flags', async () => {
    const path = configFile('layers.yaml', 'listen: 127.0.0.1:7001\nmemoryDir: /tmp\nlogLevel: warn\nshutdownGrace: 2s\ninsecurePlaintextLoopback: true\n');
    const run = await checkConfig(['--config', path, '--log-level', 'debug'], { GANGWAY_LISTEN: '127.0.0.1:7002', GANGWAY_LOG_LEVEL: 'error' });
    expect(run.exitCode, run.stderr).toBe(0);
    expect(JSON.parse(run.stdout)).toMatchObject({ listen: '127.0.0.1:7002', memoryDir: '/tmp', logLevel: 'debug', shutdownGraceMs: 2000, transport: { kind: 'plaintext-loopback' } });
  });

  it('accepts the shipped agent.yaml (TLS on a non-loopback address), reporting only what this host lacks for it', async () => {
    const run = await checkConfig(['--config', join(import.meta.dirname, '..', '..', 'agent', 'systemd', 'agent.yaml')]);
    // Its settings are valid; this host has neither its certificate nor its address.
    expect(run.exitCode).toBe(1);
    const problems = run.stderr.split('\n').filter((line) => line.startsWith('  '));
    expect(problems[0]).toBe('  tls.cert: cannot read /etc/gangway/tls/host-a.crt (ENOENT)');
    for (const line of problems) expect(line).toMatch(/^  (tls\.cert|listen|metrics\.listen): /);
  });

  it('takes peerTimeout and postcopyReattach from the file, the environment and flags', async () => {
    const path = configFile('timeouts.yaml', 'insecurePlaintextLoopback: true\nlisten: 127.0.0.1:0\npeerTimeout: 20s\npostcopyReattach: 5min\n');
    const fromFile = await checkConfig(['--config', path, '--state-dir', join(dir, 'state-timeouts')]);
    expect(fromFile.exitCode, fromFile.stderr).toBe(0);
    expect(JSON.parse(fromFile.stdout)).toMatchObject({ peerTimeoutMs: 20_000, postcopyReattachMs: 300_000 });
    const layered = await checkConfig(['--config', path, '--state-dir', join(dir, 'state-timeouts'), '--postcopy-reattach', '90s'], { GANGWAY_PEER_TIMEOUT: '3s', GANGWAY_POSTCOPY_REATTACH: '1min' });
    expect(layered.exitCode, layered.stderr).toBe(0);
    expect(JSON.parse(layered.stdout)).toMatchObject({ peerTimeoutMs: 3000, postcopyReattachMs: 90_000 });
    const bad = await checkConfig(['--insecure-plaintext-loopback'], { GANGWAY_PEER_TIMEOUT: 'soon' });
    expect(bad.exitCode).toBe(1);
    expect(bad.stderr).toMatch(/environment: GANGWAY_PEER_TIMEOUT duration "soon" is not understood/);
    expect((await checkConfig(['--insecure-plaintext-loopback', '--peer-timeout', '20min'])).stderr).toMatch(/--peer-timeout: must be at most 10min \(got "20min"\)/);
  });

  it('takes tls flags over the file, one setting at a time, and names a flag that is wrong', async () => {
    const path = configFile('tls.yaml', 'tls:\n  cert: /etc/gangway/tls/host-a.crt\n  key: /etc/gangway/tls/host-a.key\n  ca: /etc/gangway/tls/ca.crt\n  allow: [host-b]\n');
    const run = await checkConfig(['--config', path, '--tls-allow', 'host-c', '--tls-allow', 'sha256:' + 'AB:'.repeat(31) + 'AB']);
    // The settings are printed even though this host has none of these files.
    expect(run.stderr).toMatch(/a start would fail:\n  tls.cert: cannot read \/etc\/gangway\/tls\/host-a.crt \(ENOENT\)/);
    expect(JSON.parse(run.stdout).transport).toEqual({
      kind: 'tls',
      certPath: '/etc/gangway/tls/host-a.crt',
      keyPath: '/etc/gangway/tls/host-a.key',
      caPath: '/etc/gangway/tls/ca.crt',
      allow: ['host-c', 'sha256:' + 'AB:'.repeat(31) + 'AB'],
    });
    expect((await checkConfig(['--tls-allow', 'host b'])).stderr).toMatch(/--tls-allow: must be a certificate CN/);
    expect((await checkConfig(['--tls-cert', '/a.crt'])).stderr).toMatch(/tls.key: is missing \(tls needs cert, key, ca and allow\) \(set it in the config file, with GANGWAY_TLS_KEY or with --tls-key\)/);
  });

  const TLS_ENV = { GANGWAY_TLS_CERT: '/etc/gangway/tls/host-a.crt', GANGWAY_TLS_KEY: '/etc/gangway/tls/host-a.key', GANGWAY_TLS_CA: '/etc/gangway/tls/ca.crt', GANGWAY_TLS_ALLOW: 'host-b, host-c' };

  it('takes tls settings from GANGWAY_TLS_*, each over the file and under the flags', async () => {
    const fromEnv = await checkConfig([], TLS_ENV);
    expect(fromEnv.stderr).toMatch(/a start would fail:\n  tls.cert: cannot read/);
    expect(JSON.parse(fromEnv.stdout).transport).toEqual({
      kind: 'tls',
      certPath: TLS_ENV.GANGWAY_TLS_CERT,
      keyPath: TLS_ENV.GANGWAY_TLS_KEY,
      caPath: TLS_ENV.GANGWAY_TLS_CA,
      allow: ['host-b', 'host-c'],
    });
    const path = configFile('tls-env.yaml', 'tls:\n  cert: /file/a.crt\n  key: /file/a.key\n  ca: /file/ca.crt\n  allow: [host-x]\n');
    const layered = await checkConfig(['--config', path, '--tls-key', '/flag/a.key'], { GANGWAY_TLS_ALLOW: 'host-y,sha256:' + 'ab'.repeat(32), GANGWAY_TLS_KEY: '/env/a.key', GANGWAY_TLS_CA: '/env/ca.crt' });
    expect(layered.stderr).toMatch(/a start would fail:\n  tls.cert: cannot read \/file\/a.crt/);
    expect(JSON.parse(layered.stdout).transport).toEqual({ kind: 'tls', certPath: '/file/a.crt', keyPath: '/flag/a.key', caPath: '/env/ca.crt', allow: ['host-y', 'sha256:' + 'ab'.repeat(32)] });
  });

  it.each([
    ['a relative path', { ...TLS_ENV, GANGWAY_TLS_KEY: 'host-a.key' }, /environment: GANGWAY_TLS_KEY must be an absolute path \(got "host-a.key"\)/],
    ['a bad allow entry, by its place in the list', { ...TLS_ENV, GANGWAY_TLS_ALLOW: 'host-b,host c' }, /environment: GANGWAY_TLS_ALLOW entry 2 must be a certificate CN .*\(got "host c"\)/],
    ['an empty allow entry', { ...TLS_ENV, GANGWAY_TLS_ALLOW: 'host-b,,host-c' }, /environment: GANGWAY_TLS_ALLOW entry 2 is empty .*\(got ""\)/],
    ['a short fingerprint', { ...TLS_ENV, GANGWAY_TLS_ALLOW: 'sha256:abcd' }, /GANGWAY_TLS_ALLOW entry 1 a sha256: entry needs 64 hex digits/],
    ['a wildcard', { ...TLS_ENV, GANGWAY_TLS_ALLOW: 'host-*' }, /GANGWAY_TLS_ALLOW entry 1 wildcards are not allowed/],
    ['an incomplete set', { GANGWAY_TLS_CERT: '/a.crt', GANGWAY_TLS_ALLOW: 'host-b' }, /tls.key: is missing .*GANGWAY_TLS_KEY[\s\S]*tls.ca: is missing .*GANGWAY_TLS_CA/],
  ])('names the variable for %s in GANGWAY_TLS_*', async (_what, env, message) => {
    const run = await checkConfig([], env);
    expect(run.exitCode).toBe(1);
    expect(run.stderr).toMatch(message);
    expect(run.stderr).toMatch(/GANGWAY_ERR_BAD_REQUEST/);
  });

  it('refuses GANGWAY_TLS_* together with --insecure-plaintext-loopback', async () => {
    const run = await checkConfig(['--insecure-plaintext-loopback'], TLS_ENV);
    expect(run.exitCode).toBe(1);
    expect(run.stderr).toMatch(/'tls' and 'insecurePlaintextLoopback' exclude each other/);
  });
});

/** Checks every line of a Prometheus text exposition; returns the samples by series. */
function parseExposition(text: string): Map<string, number> {
  const samples = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line === '') continue;
    if (line.startsWith('#')) {
      expect(line).toMatch(/^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+$/);
      continue;
    }
    // prom-client writes an empty event-loop histogram's mean as "Nan"; Prometheus reads
    // values with Go's ParseFloat, which takes NaN in any case.
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})?) (-?[0-9.eE+-]+|NaN|Nan|[+-]Inf)( \d+)?$/.exec(line);
    expect(match, `not a sample line: ${line}`).not.toBeNull();
    samples.set(match![1]!, Number(match![2]));
  }
  return samples;
}

describe.skipIf(!builtAgent)('Prometheus metrics', () => {
  let cluster: Cluster | undefined;
  afterEach(async () => {
    await cluster?.cleanup();
  });

  it('move while a migration runs and parse as the text format', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a', ['--metrics-listen', '127.0.0.1:0']);
    const b = await cluster.agent('b');
    const metricsAt = (await a.status()).agent.metrics;
    expect(metricsAt).toMatch(/^127\.0\.0\.1:\d+$/);
    const scrape = async () => {
      const res = await fetch(`http://${metricsAt}/metrics`);
      expect(res.headers.get('content-type')).toMatch(/text\/plain/);
      return parseExposition(await res.text());
    };
    const name = uniqueName('vm');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '48MiB', '--dirty-rate', '2MiB/s'])).exitCode).toBe(0);
    const migrating = cluster.cli(a, ['migrate', name, '--to', b.listen, '--bandwidth', '16MiB/s', '--codec', 'raw', '--json']);
    // The CLI's start takes a while on a loaded machine: scrape once the migration sends.
    for (const deadline = Date.now() + 20_000; Date.now() < deadline; await sleep(50)) {
      if ((await a.status()).migrations.some((m) => m.direction === 'out' && m.state === 'running' && (m.progress?.wireBytes ?? 0) > 0)) break;
    }
    const first = await scrape();
    const running = (await a.status()).migrations.find((m) => m.direction === 'out' && m.state === 'running')!;
    const labels = `{migration_id="${running.migrationId}",guest="${name}"}`;
    // Before its first round ends, the migration has all of the guest to send.
    expect(first.get(`gangway_migration_remaining_bytes${labels}`)).toBe(48 * 1024 * 1024);
    await sleep(800);
    const second = await scrape();
    const wire = 'gangway_migration_bytes_total{kind="wire"}';
    expect(first.get('gangway_migrations_active{direction="out"}')).toBe(1);
    // The migration's dedup group is open: its content index is counted.
    expect(first.get('gangway_dedup_index_locations')).toBe((48 * 1024 * 1024) / 4096);
    expect(first.get('gangway_dedup_index_bytes')!).toBeGreaterThan(0);
    expect(first.get(wire)!).toBeGreaterThan(0);
    expect(second.get(wire)!).toBeGreaterThan(first.get(wire)!);
    expect(second.get('gangway_migration_pages_total{kind="data"}')!).toBeGreaterThan(first.get('gangway_migration_pages_total{kind="data"}')!);

    // After round 0 (48 MiB at 16 MiB/s), the round's dirty rate and the policy's prediction.
    let afterRound: Map<string, number> | undefined;
    for (const deadline = Date.now() + 30_000; Date.now() < deadline && !afterRound; await sleep(200)) {
      const now = await scrape();
      if (now.has(`gangway_migration_expected_downtime_seconds${labels}`)) afterRound = now;
    }
    expect(afterRound, 'the in-flight gauges after a round').toBeDefined();
    expect(afterRound!.get(`gangway_migration_remaining_bytes${labels}`)!).toBeLessThan(48 * 1024 * 1024);
    expect(afterRound!.get(`gangway_migration_dirty_rate_bytes_per_second${labels}`)!).toBeGreaterThan(0);
    expect(afterRound!.get(`gangway_migration_expected_downtime_seconds${labels}`)!).toBeGreaterThan(0);

    const run = await migrating;
    expect(run.exitCode, run.stderr).toBe(0);
    const summary = JSON.parse(run.stdout).guests[0];
    const done = await scrape();
    // The migration's series went with it.
    expect([...done.keys()].filter((series) => series.includes(running.migrationId))).toEqual([]);
    expect(done.get('gangway_migrations_total{direction="out",outcome="committed",technique="precopy"}')).toBe(1);
    expect(done.get('gangway_migrations_active{direction="out"}')).toBe(0);
    expect(done.get('gangway_migration_downtime_seconds_count{technique="precopy"}')).toBe(1);
    expect(done.get(wire)).toBe(summary.wireBytes);
    expect(done.get('gangway_migration_rounds_total')).toBe(summary.rounds.length);
    expect(done.get('gangway_dirty_scan_seconds_count{tracker="uffd-wp"}')!).toBeGreaterThanOrEqual(2);
    const hits = ['intra', 'crossRound', 'crossGuest', 'resident'].map((kind) => done.get(`gangway_dedup_hits_total{kind="${kind}"}`) ?? 0);
    const summaryHits = summary.dedup.hits;
    expect(hits).toEqual([summaryHits.intra, summaryHits.crossRound, summaryHits.crossGuest, summaryHits.resident]);
    expect(done.get('gangway_dedup_saved_bytes_total') ?? 0).toBe(summary.dedup.savedBytes);
    expect(done.get('gangway_dedup_index_locations')).toBe(0);
  });
  it('say which build this is (--version, status, gangway_build_info) and answer probes on /healthz and /readyz', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a', ['--metrics-listen', '127.0.0.1:0']);
    const { agent } = await a.status();
    const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
    expect(agent).toMatchObject({ version: pkg.version, protocolVersion: PROTOCOL_VERSION });
    const cli = await cluster.cli(a, ['--version']);
    expect(cli.exitCode).toBe(0);
    expect(cli.stdout.trim()).toBe(`${pkg.version} (protocol ${PROTOCOL_VERSION}, node ${process.version})`);
    const get = (path: string) => fetch(`http://${agent.metrics}${path}`);
    expect([(await get('/healthz')).status, (await get('/readyz')).status]).toEqual([200, 200]);
    expect((await get('/nope')).status).toBe(404);
    const text = await (await get('/metrics')).text();
    const metrics = parseExposition(text);
    expect(metrics.get(`gangway_build_info{version="${pkg.version}",protocol="${PROTOCOL_VERSION}",node="${process.version}"}`)).toBe(1);
    expect(text).toContain('gangway_process_cpu_seconds_total');
    expect(text).not.toContain('gangway_process_process_');
  });
});
