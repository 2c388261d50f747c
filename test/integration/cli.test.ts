// The CLI as a user meets it: bad input gets a message that names the flag or the value and
// says what to do; the agent shuts down cleanly on SIGTERM and finds its guests on restart;
// the demo runs end to end and leaves nothing behind.
import { afterEach, describe, expect, it } from 'vitest';
import { existsSync, readdirSync } from 'node:fs';
import { execa } from 'execa';
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
  ])('rejects %j with a message naming the problem', async (args, message) => {
    const run = await gangway(args as string[]);
    expect(run.exitCode).not.toBe(0);
    expect(run.stderr).toMatch(message);
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
