// `gangway traffic`, `gangway plan`, `guest start --tap` and the traffic settings as a user
// meets them: bad input names the flag or key, the value and what is allowed; --json has a
// stable shape; plan asks the destination agent over the peer session and migrates nothing.
// These agents run in the root namespace without an uplink, so they install nothing (the
// netns tests in traffic-control.test.ts cover measuring and shaping).
import { afterEach, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { builtAgent, Cluster, mainJs, uniqueName } from '../helpers/cluster.js';

const gangway = (args: string[], env: Record<string, string> = {}) =>
  execa(process.execPath, [mainJs, ...args], { reject: false, timeout: 60_000, env: { GANGWAY_LISTEN: '', ...env } });

describe.skipIf(!builtAgent)('gangway traffic and plan', () => {
  let cluster: Cluster | undefined;
  afterEach(async () => {
    await cluster?.cleanup();
    cluster = undefined;
  });

  it.each([
    [['plan', 'vm1', '--to', '127.0.0.1:1', '--priority', 'urgent'], /--priority.*'urgent' is invalid.*high, medium, low/],
    [['plan', 'vm1', '--to', 'nowhere'], /--to.*"nowhere" is not an agent address: use HOST:PORT/],
    [['plan', 'vm1', '--to', '127.0.0.1:70000'], /--to.*not an agent address/],
    [['plan', 'vm1'], /--to/],
    [['migrate', 'vm1', '--to', '127.0.0.1:1', '--priority', 'urgent'], /--priority.*'urgent' is invalid.*high, medium, low/],
    [['guest', 'start', 'vm1', '--tap', 'tap/0'], /--tap.*"tap\/0" is not an interface name: use 1 to 15/],
    [['guest', 'start', 'vm1', '--tap', 'a-very-long-tap-name'], /--tap.*not an interface name/],
    [['agent', '--check-config', '--link-capacity', 'fast'], /--link-capacity: rate "fast" is not understood/],
    [['agent', '--check-config', '--uplink', 'eth 0'], /--uplink: must be an interface name/],
    [['agent', '--check-config', '--insecure-plaintext-loopback', '--uplink', 'eth0'], /'traffic.linkCapacity' is missing: 'traffic.uplink' \(eth0\) needs its capacity/],
  ])('rejects %j naming the flag, the value and what is allowed', async (args, message) => {
    const run = await gangway(args as string[]);
    expect(run.exitCode).not.toBe(0);
    expect(run.stderr).toMatch(message);
  });

  it.each([
    ['SLA limits the wrong way round', 'traffic:\n  linkCapacity: 1Gbit/s\n  slaLower: 600Mbit/s\n  slaUpper: 200Mbit/s\n', /'traffic.slaLower' \(75000000 bytes\/s\) is above 'traffic.slaUpper' \(25000000 bytes\/s\)/],
    ['an upper limit above the link', 'traffic:\n  linkCapacity: 100Mbit/s\n  slaUpper: 1Gbit/s\n', /'traffic.slaUpper' .* is above 'traffic.linkCapacity'/],
    ['thresholds the wrong way round', 'traffic:\n  contention:\n    high: 0.3\n    moderate: 0.5\n', /'traffic.contention.moderate' \(0.5\) must be below 'traffic.contention.high' \(0.3\)/],
    ['a threshold of 1', 'traffic:\n  contention:\n    high: 1\n', /'traffic.contention.high' must be a number above 0 and below 1.*\(got 1\)/],
    ['an unknown priority', 'traffic:\n  priority: urgent\n', /'traffic.priority'.*"high".*"medium".*"low".*\(got "urgent"\)/],
    ['a mistyped traffic key', 'traffic:\n  uplnk: eth0\n', /'traffic.uplnk' is not a setting: did you mean 'traffic.uplink'\?/],
    ['an unknown traffic key', 'traffic:\n  nic: eth0\n', /'traffic.nic' is not a setting \(traffic takes uplink, linkCapacity/],
    ['a sample interval too short', 'traffic:\n  sampleInterval: 10ms\n', /'traffic.sampleInterval' must be at least 100ms/],
  ])('rejects a config with %s', async (_kind, text, message) => {
    const dir = mkdtempSync(join(tmpdir(), 'gangway-traffic-config-'));
    try {
      writeFileSync(join(dir, 'agent.yaml'), `insecurePlaintextLoopback: true\n${text}`);
      const run = await gangway(['agent', '--check-config', '--config', join(dir, 'agent.yaml')]);
      expect(run.exitCode).toBe(1);
      expect(run.stderr).toMatch(message);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('takes traffic settings from the file, the environment (one key at a time) and flags', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'gangway-traffic-config-'));
    try {
      writeFileSync(join(dir, 'agent.yaml'), 'insecurePlaintextLoopback: true\ntraffic:\n  uplink: eth0\n  linkCapacity: 1Gbit/s\n  slaLower: 100Mbit/s\n  contention:\n    high: 0.8\n');
      const run = await gangway(['agent', '--check-config', '--config', join(dir, 'agent.yaml'), '--uplink', 'eth1'], {
        GANGWAY_TRAFFIC_CONTENTION_MODERATE: '0.4',
        GANGWAY_TRAFFIC_PRIORITY: 'high',
      });
      expect(run.exitCode, run.stderr).toBe(0);
      expect(JSON.parse(run.stdout).traffic).toEqual({
        uplink: 'eth1',
        linkBytesPerSec: 125_000_000,
        slaLowerBytesPerSec: 12_500_000,
        slaUpperBytesPerSec: 62_500_000,
        highContention: 0.8,
        moderateContention: 0.4,
        priority: 'high',
        sampleIntervalMs: 1000,
        planner: 'forecast',
      });
      const bad = await gangway(['agent', '--check-config', '--insecure-plaintext-loopback'], { GANGWAY_TRAFFIC_CONTENTION_HIGH: 'lots' });
      expect(bad.stderr).toMatch(/environment: GANGWAY_TRAFFIC_CONTENTION_HIGH must be a number above 0 and below 1.*\(got "lots"\)/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('traffic --json says what is measured and why; plan --json asks the destination and migrates nothing', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a');
    const b = await cluster.agent('b');
    const traffic = await cluster.cli(a, ['traffic', '--json']);
    expect(traffic.exitCode, traffic.stderr).toBe(0);
    expect(JSON.parse(traffic.stdout)).toMatchObject({
      mode: 'off',
      reason: expect.stringMatching(/no uplink is configured/),
      uplink: null,
      nic: null,
      guests: [],
      shaper: { available: false, reason: expect.stringMatching(/no uplink/), active: null },
      priorityDefault: 'medium',
    });
    expect((await cluster.cli(a, ['traffic'])).stdout).toMatch(/monitor: off \(no uplink is configured/);

    const vm1 = uniqueName('vm');
    const vm2 = uniqueName('vm');
    expect((await cluster.cli(a, ['guest', 'start', vm1, '--memory', '8MiB', '--tap', 'tapx0'])).exitCode).toBe(0);
    expect((await cluster.cli(a, ['guest', 'start', vm2, '--memory', '8MiB'])).exitCode).toBe(0);
    const taken = await cluster.cli(a, ['guest', 'start', uniqueName('vm'), '--memory', '8MiB', '--tap', 'tapx0', '--json']);
    expect(JSON.parse(taken.stdout).error.message).toMatch(/TAP device tapx0 is already guest .*'s/);
    expect(JSON.parse((await cluster.cli(a, ['traffic', '--json'])).stdout).guests).toEqual([
      { name: vm1, tap: 'tapx0', rxBytesPerSec: null, txBytesPerSec: null, direction: null, reason: expect.stringMatching(/no uplink/) },
      { name: vm2, tap: null, rxBytesPerSec: null, txBytesPerSec: null, direction: null, reason: 'no TAP device in its definition' },
    ]);

    // Without traffic data plan says what migrate --technique auto runs: its default, in migrate's words.
    const features = (await b.status()).agent.features as string[];
    const technique = features.includes('postcopy') ? 'hybrid' : 'precopy';
    const plan = await cluster.cli(a, ['plan', vm2, vm1, '--to', b.listen, '--priority', 'low', '--json']);
    expect(plan.exitCode, plan.stderr).toBe(0);
    const parsed = JSON.parse(plan.stdout);
    expect(parsed).toMatchObject({ to: b.listen, followed: false, priority: 'low', strategy: 'gang', pacedBytesPerSec: null, planner: null });
    expect(parsed.guests.map((g: { name: string; order: number; technique: string; reservedBytesPerSec: number | null }) => [g.name, g.order, g.technique, g.reservedBytesPerSec])).toEqual([
      [vm2, 0, technique, null],
      [vm1, 1, technique, null],
    ]);
    expect(parsed.reasons[0]).toMatch(/^no traffic data \(no uplink is configured.*\): no plan; auto runs as without a planner$/);
    expect(parsed.guests[0].reasons[0]).toMatch(new RegExp(`^${technique}: the destination can`));
    const serial = JSON.parse((await cluster.cli(a, ['plan', vm1, '--to', b.listen, '--strategy', 'serial', '--json'])).stdout);
    expect(serial.strategy).toBe('serial');
    const text = await cluster.cli(a, ['plan', vm1, '--to', b.listen]);
    expect(text.stdout).toMatch(new RegExp(`migrate --technique auto would move 1 guest to ${b.listen.replace(/\./g, '\\.')}: gang, medium priority \\(nothing is migrated\\)`));
    expect(text.stdout).toMatch(new RegExp(`1\\. vm-.*: ${technique}\n`));
    expect(text.stdout).not.toMatch(/parallel/);
    // Nothing moved.
    expect((await a.status()).guests.map((g) => g.name).sort()).toEqual([vm1, vm2].sort());
    expect((await b.status()).guests).toEqual([]);

    const unknown = await cluster.cli(a, ['plan', 'ghost', '--to', b.listen, '--json']);
    expect(JSON.parse(unknown.stdout).error.code).toBe('GANGWAY_ERR_GUEST_NOT_FOUND');
    const api = await a.client.call('POST', '/v1/plan', { guests: [vm1], to: b.listen, priority: 'urgent' }).catch((err: Error) => err);
    expect((api as Error).message).toMatch(/priority: .*"high"\|"medium"\|"low"|priority: Invalid option/);
  });

  it('migrate --technique auto without traffic data runs as before plans and says so in the summary', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a');
    const b = await cluster.agent('b');
    const vm1 = uniqueName('vm');
    const vm2 = uniqueName('vm');
    for (const name of [vm1, vm2]) expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '8MiB', '--dirty-rate', '1MiB/s'])).exitCode).toBe(0);
    const planned = JSON.parse((await cluster.cli(a, ['plan', vm1, vm2, '--to', b.listen, '--strategy', 'serial', '--priority', 'high', '--json'])).stdout);
    const run = await cluster.cli(a, ['migrate', vm1, vm2, '--to', b.listen, '--technique', 'auto', '--strategy', 'serial', '--priority', 'high', '--json']);
    expect(run.exitCode, run.stderr).toBe(0);
    const summary = JSON.parse(run.stdout);
    const features = (await b.status()).agent.features as string[];
    const technique = features.includes('postcopy') ? 'hybrid' : 'precopy';
    expect(summary.strategy).toBe('serial');
    expect(summary.plan).toMatchObject({ followed: false, priority: 'high', strategy: 'serial', pacedBytesPerSec: null });
    expect(summary.plan.reasons[0]).toMatch(/no traffic data \(no uplink is configured.*\): no plan/);
    expect(summary.guests.map((g: { guest: string; technique: string; plan: { technique: string } }) => [g.guest, g.technique, g.plan.technique])).toEqual([
      [vm1, technique, technique],
      [vm2, technique, technique],
    ]);
    expect(summary.guests.every((g: { verified: boolean }) => g.verified)).toBe(true);
    // gangway plan said exactly this beforehand: technique per guest, strategy, order and why.
    expect(planned.strategy).toBe(summary.strategy);
    expect(planned.reasons).toEqual(summary.plan.reasons);
    expect(planned.guests.map((g: { name: string; technique: string; order: number }) => [g.name, g.technique, g.order])).toEqual(
      summary.guests.map((g: { guest: string; technique: string; plan: { order: number } }) => [g.guest, g.technique, g.plan.order]),
    );
  });
});
