// The CLI as a user meets it: bad input gets a message that names the flag or the value and
// says what to do; the agent shuts down cleanly on SIGTERM and finds its guests on restart;
// the demo runs end to end and leaves nothing behind.
import { afterEach, describe, expect, it } from 'vitest';
import { chmodSync, existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa, execaSync } from 'execa';
import { startLocalAgent } from '../../agent/local-agent.js';
import { loadNative } from '../../agent/native.js';
import { builtAgent, Cluster, mainJs, uniqueName } from '../helpers/cluster.js';

const gangway = (args: string[], env: Record<string, string> = {}) =>
  execa(process.execPath, [mainJs, ...args], { reject: false, timeout: 120_000, env });

describe.skipIf(!builtAgent)('gangway CLI', () => {
  let cluster: Cluster | undefined;
  afterEach(async () => {
    await cluster?.cleanup();
    cluster = undefined;
  });

  it.each([
    [['guest', 'start', 'vm1', '--memory', 'lots'], /--memory.*"lots" is not understood/],
    [['guest', 'start', 'vm1', '--dirty-rate', '40MB/x'], /--dirty-rate/],
    [['guest', 'start', 'vm1', '--profile', 'windows'], /--profile.*windows.*(zero|os-image|random)/s],
    [['guest', 'start', 'vm1', '--shared', '1.5'], /--shared must be a number from 0 to 1/],
    [['migrate', 'vm1'], /--to/],
    [['migrate', 'vm1', '--to', '127.0.0.1:1', '--downtime-ms', '-5'], /--downtime-ms/],
    [['agent', '--listen', 'nowhere'], /HOST:PORT/],
    // "10Mbps" used to cap at 10 megabytes per second; a bare "Mb" or "MB" is now refused with both readings.
    [['migrate', 'vm1', '--to', '127.0.0.1:1', '--bandwidth', '10Mb'], /--bandwidth "10Mb" could be bits or bytes per second: did you mean 10Mbit\/s \(bits\) or 10MB\/s \(bytes\)\?/],
    [['migrate', 'vm1', '--to', '127.0.0.1:1', '--bandwidth', '10MB'], /--bandwidth "10MB" .*did you mean 10Mbit\/s \(bits\) or 10MB\/s \(bytes\)\?/],
    [['guest', 'start', 'vm1', '--dirty-rate', '40MiB'], /--dirty-rate "40MiB" is a size, not a rate: did you mean 40MiB\/s\?/],
    // A bare number was read as bytes: --memory 64 asked for a 64-byte guest.
    [['guest', 'start', 'vm1', '--memory', '64'], /--memory "64" has no unit: did you mean 64MiB\?/],
    [['demo', '--memory', '512'], /--memory "512" has no unit: did you mean 512MiB\?/],
    [['agent', '--check-config', '--insecure-plaintext-loopback', '--uplink', 'lo', '--link-capacity', '1Gb'], /--link-capacity: rate "1Gb" .*did you mean 1Gbit\/s \(bits\) or 1GB\/s \(bytes\)\? \(got "1Gb"\)/],
    // Was "Invalid URL ... [GANGWAY_ERR_INTERNAL]" from deep inside the agent.
    [['migrate', 'vm1', '--to', '127.0.0.1:99999'], /option '--to <host:port>' argument '127\.0\.0\.1:99999' is invalid\. .*port from 1 to 65535/],
    [['plan', 'vm1', '--to', '127.0.0.1:0'], /option '--to <host:port>' argument '127\.0\.0\.1:0' is invalid\. .*port from 1 to 65535/],
  ])('rejects %j with a message naming the problem', async (args, message) => {
    const run = await gangway(args as string[]);
    expect(run.exitCode).not.toBe(0);
    expect(run.stderr).toMatch(message);
    expect(run.stderr).not.toMatch(/GANGWAY_ERR_INTERNAL|Invalid URL/);
  });

  it('reads rates in bits where networking writes bits: --link-capacity 10Mbps is 1.25 MB/s', async () => {
    const run = await gangway(['agent', '--check-config', '--insecure-plaintext-loopback', '--state-dir', '/tmp/gangway-check-units', '--uplink', 'lo', '--link-capacity', '10Mbps']);
    expect(run.exitCode, run.stderr).toBe(0);
    expect(JSON.parse(run.stdout).traffic.linkBytesPerSec).toBe(1_250_000);
  });

  it.each([
    ['the environment', { GANGWAY_TRAFFIC_LINK_CAPACITY: '1GB' }, '', /environment: GANGWAY_TRAFFIC_LINK_CAPACITY rate "1GB" .*did you mean 1Gbit\/s \(bits\) or 1GB\/s \(bytes\)\?/],
    ['the config file', {}, 'traffic:\n  linkCapacity: 100Mb\n', /'traffic\.linkCapacity' rate "100Mb" .*did you mean 100Mbit\/s \(bits\) or 100MB\/s \(bytes\)\?/],
    ['a size in the environment', { GANGWAY_PEERS_MEMORY_HEADROOM: '64' }, '', /GANGWAY_PEERS_MEMORY_HEADROOM size "64" has no unit: did you mean 64MiB\?/],
  ])('refuses an ambiguous quantity in %s, naming where it came from', async (_, env, file, message) => {
    const dir = mkdtempSync(join(tmpdir(), 'gangway-units-'));
    try {
      const args = ['agent', '--check-config', '--insecure-plaintext-loopback', '--state-dir', dir, '--uplink', 'lo'];
      if (file) {
        writeFileSync(join(dir, 'agent.yaml'), file);
        args.push('--config', join(dir, 'agent.yaml'));
      } else args.push('--link-capacity', '1Gbit/s');
      const run = await gangway(args, env);
      expect(run.exitCode).toBe(1);
      expect(run.stderr).toMatch(message);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('keeps a YAML number as bytes where a config file gives one', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'gangway-units-'));
    try {
      writeFileSync(join(dir, 'agent.yaml'), 'insecurePlaintextLoopback: true\npeers:\n  memoryHeadroom: 1048576\n');
      const run = await gangway(['agent', '--check-config', '--config', join(dir, 'agent.yaml'), '--state-dir', dir]);
      expect(run.exitCode, run.stderr).toBe(0);
      expect(JSON.parse(run.stdout).peers.memoryHeadroomBytes).toBe(1_048_576);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it.each([
    [['guest', 'start', 'vm1', '--memory', '256MiB,'], /--memory "256MiB," has an empty item/],
    [['guest', 'start', 'vm1', '--memory', '16KiB,64MiB'], /--memory "16KiB,64MiB": the first region \(16384 bytes\) holds the guest's header and version table/],
    [['guest', 'start', 'vm1', '--memory', '64MiB,6000B'], /a region of 6000 bytes: each region is a positive multiple of 4096 bytes/],
  ])('rejects memory regions %j, saying why', async (args, message) => {
    const run = await gangway(args as string[]);
    expect(run.exitCode).not.toBe(0);
    expect(run.stderr).toMatch(message);
  });

  // A user outside the agent's control group used to be told that no agent was running.
  const nobodyCanRun = process.getuid?.() === 0 && execaSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, '-e', `require('fs').accessSync(${JSON.stringify(mainJs)})`], { reject: false }).exitCode === 0;
  it.skipIf(!nobodyCanRun)('a user who may not use the control socket is told it is a permission problem and what to do', async () => {
    cluster = new Cluster();
    // A control group nobody is not in, named as the group database names it.
    const [groupName, , gid] = execaSync('getent', ['group', 'daemon']).stdout.trim().split(':');
    const a = await cluster.agent('a', ['--control-group', 'daemon']);
    // As /var/lib is: anyone may look up the state dir, not into it.
    chmodSync(cluster.dir, 0o755);
    const run = await execa('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, mainJs, 'status', '--state-dir', a.stateDir], { reject: false, timeout: 20_000 });
    expect(run.exitCode).not.toBe(0);
    expect(run.stderr).toContain(`cannot reach the agent at ${a.stateDir}/control.sock: permission denied:`);
    expect(run.stderr).toContain(`join group ${groupName} (gid ${gid}) (the agent's control.group, --control-group; log in again after joining)`);
    expect(run.stderr).not.toMatch(/no agent is running/);
  });

  it('guest stop deletes the guest: its memory regions, device state, tracking reports, record and log', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a');
    const name = uniqueName('del');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '8MiB,8MiB', '--dirty-rate', '1MiB/s'])).exitCode).toBe(0);
    const guestsDir = join(a.stateDir, 'guests');
    expect(readdirSync(guestsDir).filter((f) => f.startsWith(name)).length).toBeGreaterThan(1);
    const stop = await cluster.cli(a, ['guest', 'stop', name]);
    expect(stop.exitCode, stop.stderr).toBe(0);
    expect(readdirSync(guestsDir).filter((f) => f.startsWith(name))).toEqual([]);
    expect(readdirSync('/dev/shm').filter((f) => f.includes(`-${name}-`))).toEqual([]);
  });

  it('--listen without a port: one line that says what to write', async () => {
    const run = await gangway(['agent', '--listen', '127.0.0.1', '--insecure-plaintext-loopback', '--state-dir', '/tmp/gangway-check-listen']);
    expect(run.exitCode).toBe(1);
    expect(run.stderr.trim().split('\n')).toEqual(['gangway: --listen: must be HOST:PORT, e.g. 127.0.0.1:7401 (got "127.0.0.1") [GANGWAY_ERR_BAD_REQUEST]']);
  });

  it('a port in use: names the address and the setting, no stack trace', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a');
    const other = `${cluster.dir}/other`;
    const peer = await gangway(['agent', '--listen', a.listen, '--insecure-plaintext-loopback', '--state-dir', other]);
    expect(peer.exitCode).toBe(1);
    expect(peer.stderr).toContain(`cannot listen for peers on ${a.listen}: the address is in use (another agent or program listens there); set another address with listen (--listen, GANGWAY_LISTEN)`);
    expect(peer.stderr + peer.stdout).not.toMatch(/Unhandled|    at /);
    const fromEnv = await gangway(['agent', '--insecure-plaintext-loopback', '--state-dir', other], { GANGWAY_LISTEN: a.listen });
    expect(fromEnv.stderr).toContain(`cannot listen for peers on ${a.listen}: the address is in use`);
    const metrics = await gangway(['agent', '--listen', '127.0.0.1:0', '--metrics-listen', a.listen, '--insecure-plaintext-loopback', '--state-dir', other]);
    expect(metrics.exitCode).toBe(1);
    expect(metrics.stderr).toContain(`cannot serve metrics on ${a.listen}: the address is in use (another agent or program listens there); set another address with metrics.listen (--metrics-listen, GANGWAY_METRICS_LISTEN)`);
    const control = await gangway(['agent', '--listen', '127.0.0.1:0', '--control-listen', a.listen, '--insecure-plaintext-loopback', '--state-dir', other]);
    expect(control.exitCode).toBe(1);
    expect(control.stderr).toContain(`cannot serve the control API on ${a.listen}: the address is in use`);
    expect(control.stderr).toContain('control.listen (--control-listen, GANGWAY_CONTROL_LISTEN)');
  });

  it('--to naming this agent by another spelling says so (was "duplicate migration id")', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a');
    const port = a.listen.slice(a.listen.lastIndexOf(':') + 1);
    const name = uniqueName('vm');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '8MiB'])).exitCode).toBe(0);
    for (const to of [`localhost:${port}`, a.listen]) {
      const run = await cluster.cli(a, ['migrate', name, '--to', to, '--json']);
      expect(run.exitCode).toBe(1);
      expect(run.stderr).toContain(`--to ${to} is this agent itself (it listens on ${a.listen})`);
      expect(JSON.parse(run.stdout).error.code).toBe('GANGWAY_ERR_BAD_REQUEST');
    }
    const plan = await cluster.cli(a, ['plan', name, '--to', `localhost:${port}`]);
    expect(plan.stderr).toContain(`--to localhost:${port} is this agent itself`);
    expect((await a.status()).guests.find((g) => g.name === name)?.state).toBe('running');
  });

  it('caps --bandwidth 80Mbps at 10 MB/s, not 80 MB/s', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a');
    const b = await cluster.agent('b');
    const name = uniqueName('vm');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '16MiB', '--profile', 'random'])).exitCode).toBe(0);
    const run = await cluster.cli(a, ['migrate', name, '--to', b.listen, '--bandwidth', '80Mbps', '--codec', 'raw', '--json']);
    expect(run.exitCode, run.stderr).toBe(0);
    const moved = JSON.parse(run.stdout).guests[0];
    const bytesPerSec = (moved.wireBytes * 1000) / moved.totalMs;
    expect(bytesPerSec).toBeLessThan(12e6);
    expect(bytesPerSec).toBeGreaterThan(5e6);
  });

  it('guest stop during a migration names `gangway cancel ID`', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a');
    const b = await cluster.agent('b');
    const name = uniqueName('vm');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '64MiB', '--dirty-rate', '8MiB/s'])).exitCode).toBe(0);
    const run = await cluster.cli(a, ['migrate', name, '--to', b.listen, '--bandwidth', '8MiB/s', '--detach', '--json']);
    const { migrationId } = JSON.parse(run.stdout).migrations[0];
    const stop = await cluster.cli(a, ['guest', 'stop', name]);
    expect(stop.exitCode).toBe(1);
    expect(stop.stderr).toContain(`guest ${name} is being migrated`);
    expect(stop.stderr).toContain(`cancel it with \`gangway cancel ${migrationId.slice(0, 8)}\``);
    expect((await cluster.cli(a, ['cancel', migrationId])).exitCode).toBe(0);
  });

  // Was "... a guest named "X" already exists on this host. The guest keeps running on this
  // host.": the host with the name was the destination, not this one.
  it('a name taken at the destination says it is taken there', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a');
    const b = await cluster.agent('b');
    const name = uniqueName('vm');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '8MiB'])).exitCode).toBe(0);
    expect((await cluster.cli(b, ['guest', 'start', name, '--memory', '8MiB'])).exitCode).toBe(0);
    const run = await cluster.cli(a, ['migrate', name, '--to', b.listen, '--json']);
    expect(run.exitCode).toBe(1);
    expect(run.stderr).toContain(
      `migration of ${name} to ${b.listen} failed during offering: the destination refused the migration: a guest named "${name}" already exists at the destination: ` +
        `stop it there (\`gangway guest stop ${name}\` on that host) or migrate to another agent. The guest keeps running on this host.`,
    );
    expect(run.stderr).not.toContain('exists on this host');
    expect(JSON.parse(run.stdout).error.code).toBe('GANGWAY_ERR_REJECTED');
    // Both guests run on where they were.
    expect((await a.status()).guests.find((g) => g.name === name)?.state).toBe('running');
    expect((await b.status()).guests.filter((g) => g.name === name).map((g) => g.state)).toEqual(['running']);
  });

  it('says how to start an agent when none is running', async () => {
    const run = await gangway(['status', '--state-dir', '/tmp/gangway-no-such-agent', '--json']);
    expect(run.exitCode).toBe(1);
    expect(run.stderr).toMatch(/no agent is running.*gangway agent --state-dir/);
    expect(JSON.parse(run.stdout).error.code).toBe('GANGWAY_ERR_PEER_UNREACHABLE');
  });

  it('reports unknown guests, taken names and unreachable peers with stable codes', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a');
    const missing = await cluster.cli(a, ['migrate', 'ghost', '--to', '127.0.0.1:9', '--json']);
    expect(JSON.parse(missing.stdout).error.code).toBe('GANGWAY_ERR_GUEST_NOT_FOUND');
    const name = uniqueName('vm');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '8MiB'])).exitCode).toBe(0);
    const again = await cluster.cli(a, ['guest', 'start', name, '--memory', '8MiB', '--json']);
    expect(JSON.parse(again.stdout).error.code).toBe('GANGWAY_ERR_GUEST_EXISTS');
    // Port 9 (discard) on loopback: nothing listens there.
    const nowhere = await cluster.cli(a, ['migrate', name, '--to', '127.0.0.1:9', '--json']);
    expect(nowhere.exitCode).toBe(1);
    expect(JSON.parse(nowhere.stdout).error.code).toBe('GANGWAY_ERR_PEER_UNREACHABLE');
    expect(nowhere.stderr).toMatch(/cannot reach the agent at 127.0.0.1:9/);
    const status = JSON.parse((await cluster.cli(a, ['status', '--json'])).stdout);
    expect(status.guests.find((g: { name: string }) => g.name === name).state).toBe('running');
  });

  it('shuts down on SIGTERM leaving guests running, and a restarted agent finds them', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a');
    const name = uniqueName('vm');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '8MiB', '--dirty-rate', '1MiB/s'])).exitCode).toBe(0);
    const pid = (await a.status()).guests[0]!.pid;
    await a.stop();
    expect(a.process.exitCode).toBe(0);
    expect(existsSync(`${a.stateDir}/control.sock`)).toBe(false);
    process.kill(pid, 0); // the guest outlived its agent

    const again = await startLocalAgent({ stateDir: a.stateDir, mainPath: mainJs });
    cluster.agents.push(again);
    const guest = (await again.status()).guests.find((g) => g.name === name);
    expect(guest).toMatchObject({ pid, state: 'running', tracker: { kind: 'uffd-wp' } });
    expect(guest!.stalePages).toBe(0);
  });

  it('runs the demo end to end and leaves no process or file behind', async () => {
    const before = new Set(readdirSync('/dev/shm'));
    const run = await gangway(['demo', '--json', '--memory', '64MiB', '--dirty-rate', '8MiB/s']);
    expect(run.exitCode, run.stderr).toBe(0);
    const result = JSON.parse(run.stdout);
    expect(result.migrations).toHaveLength(1);
    const m = result.migrations[0];
    expect(m).toMatchObject({ guest: 'vm1', technique: 'precopy', verified: true, memoryBytes: 64 * 1024 * 1024 });
    expect(m.guestCheck.stalePages).toBe(0);
    expect(m.guestCheck.passesAfterResume).toBeGreaterThanOrEqual(2);
    expect(m.downtimeMs).toBeGreaterThan(0);
    expect(m.rounds).toBeGreaterThanOrEqual(2);
    expect(m.wireBytes).toBeGreaterThan(0);
    expect(m.zeroPages).toBeGreaterThan(0);
    // The demo's guest is vm1; other gangway files may come and go (tests running beside this one).
    expect(readdirSync('/dev/shm').filter((f) => !before.has(f) && f.startsWith('gangway-vm1-'))).toEqual([]);
    const leftovers = await execa('pgrep', ['-f', 'gangway-demo-'], { reject: false });
    expect(leftovers.stdout.trim()).toBe('');
  });

  it.skipIf(!loadNative().uffdProbe())('runs the demo by post-copy (needs userfaultfd: root)', async () => {
    const run = await gangway(['demo', '--json', '--memory', '64MiB', '--dirty-rate', '8MiB/s', '--technique', 'postcopy']);
    expect(run.exitCode, run.stderr).toBe(0);
    const m = JSON.parse(run.stdout).migrations[0];
    expect(m).toMatchObject({ guest: 'vm1', technique: 'postcopy', verified: true, rounds: 0 });
    expect(m.guestCheck.stalePages).toBe(0);
    expect(m.downtimeMs).toBeGreaterThan(0);
  });
});
