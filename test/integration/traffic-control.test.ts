// Bandwidth control on a real link, inside a shaped link's two network namespaces (the root
// namespace's qdiscs and iptables rules are never touched):
// - under high priority, a workload flow competing with a migration-class flow keeps at least
//   its SLA lower limit, while the migration gets its reservation;
// - an agent started inside a namespace with an uplink removes what a crashed run left,
//   measures the uplink, and removes its chain on SIGTERM.
// After each test no qdisc or chain of ours remains, also when it failed. Every flow is
// bounded in bytes and time; only processes started here are stopped, by PID.
// Needs root, iproute2 and iptables; without them the suite skips and its name says why.
import { createInterface } from 'node:readline';
import type { Readable } from 'node:stream';
import { execa, type ResultPromise } from 'execa';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { createShapedLink, netnsAvailable, type ShapedLink } from '../../bench/netns-link.js';
import { runner, type Runner } from '../../agent/traffic/exec.js';
import { AccountingChain } from '../../agent/traffic/iptables.js';
import { Shaper } from '../../agent/traffic/shaper.js';
import { TrafficService } from '../../agent/traffic/service.js';
import { resolveTrafficConfig } from '../../agent/config.js';
import { createLogger } from '../../agent/log.js';
import { startLocalAgent, makeTempDir, type LocalAgent } from '../../agent/local-agent.js';
import { builtAgent, mainJs } from '../helpers/cluster.js';
import { rmSync } from 'node:fs';

const MBIT = 1e6 / 8;
const LINK_BYTES_PER_SEC = 200 * MBIT;
const SLA_LOWER_BYTES_PER_SEC = 50 * MBIT;
const MIGRATION_PORT = 7401;
const WORKLOAD_PORT = 5001;
/** TCP payload per Ethernet frame as HTB counts it: 1448 / 1514. */
const FRAMING = 0.956;
const SEND_MS = 5_000;
/** Twice what the whole link carries in SEND_MS: a flow the shaper does not hold hits this early. */
const SEND_LIMIT_BYTES = (2 * LINK_BYTES_PER_SEC * SEND_MS) / 1000;
const CHILD_LIFETIME_MS = 30_000;
const SAMPLE_MS = 100;

// Accepts one connection on each of two ports, prints "listening", then every SAMPLE_MS
// "<Date.now()> <bytes on port 1> <bytes on port 2>", and exits once both ended.
const SINK = `
const net = require('node:net');
const [host, ...ports] = process.argv.slice(1);
setTimeout(() => process.exit(3), ${CHILD_LIFETIME_MS});
const bytes = ports.map(() => 0);
let ended = 0, listening = 0;
const sample = () => console.log(Date.now() + ' ' + bytes.join(' '));
const timer = setInterval(sample, ${SAMPLE_MS});
ports.forEach((port, i) => {
  const server = net.createServer((socket) => {
    server.close();
    socket.on('data', (chunk) => { bytes[i] += chunk.length; });
    socket.on('end', () => socket.end(() => { if (++ended === ports.length) { clearInterval(timer); sample(); process.exit(0); } }));
  });
  server.listen(Number(port), host, () => { if (++listening === ports.length) console.log('listening'); });
});
`;

// Writes 64 KiB chunks, respecting backpressure, until sendMs have passed or the byte limit.
const SENDER = `
const net = require('node:net');
const [host, port, sendMs, limitBytes] = process.argv.slice(1);
setTimeout(() => process.exit(3), ${CHILD_LIFETIME_MS});
let writtenBytes = 0;
const socket = net.connect(Number(port), host, async () => {
  const chunk = Buffer.alloc(64 * 1024, 0x5a);
  const started = performance.now();
  while (writtenBytes < Number(limitBytes) && performance.now() - started < Number(sendMs)) {
    writtenBytes += chunk.length;
    if (!socket.write(chunk)) await new Promise((resolve) => socket.once('drain', resolve));
  }
  socket.end();
});
socket.resume();
socket.on('end', () => { console.log(JSON.stringify({ writtenBytes })); process.exit(0); });
`;

interface Sample {
  atMs: number;
  bytes: number[];
}

/** Goodput, bytes per second, of flow `index` between the first sample at or after fromMs and the last at or before toMs. */
function goodput(samples: readonly Sample[], index: number, fromMs: number, toMs: number): number {
  const first = samples.find((s) => s.atMs >= fromMs);
  const last = samples.findLast((s) => s.atMs <= toMs);
  if (!first || !last || last.atMs - first.atMs < 1000) throw new Error(`too few samples between ${fromMs} and ${toMs}`);
  return ((last.bytes[index]! - first.bytes[index]!) * 1000) / (last.atMs - first.atMs);
}

/** Calls `onLine` for each line the stream prints. */
function onLines(stream: Readable, onLine: (line: string) => void): void {
  createInterface({ input: stream, crlfDelay: Infinity }).on('line', onLine);
}

const linkName = (purpose: string) => `${purpose}${process.pid.toString(36)}`;

async function iptablesMissing(): Promise<string | undefined> {
  const version = await execa('iptables', ['-V'], { reject: false, timeout: 10_000, stdin: 'ignore' });
  return version.failed ? `iptables is not usable: ${version.shortMessage}` : undefined;
}

const available = await netnsAvailable();
const skipReason = available.ok ? await iptablesMissing() : available.reason;

describe.skipIf(skipReason !== undefined)(`bandwidth control in network namespaces${skipReason ? ` (skipped: ${skipReason})` : ''}`, () => {
  let link: ShapedLink;
  let runA: Runner;
  const children: ResultPromise[] = [];
  const agents: LocalAgent[] = [];
  const dirs: string[] = [];

  const rootHandles = async () => (JSON.parse((await runA('tc', ['-j', 'qdisc', 'show', 'dev', link.nsA])) || '[]') as { handle: string }[]).map((q) => q.handle);
  const iptablesRules = () => runA('iptables', ['-S']);
  const readNic = async (device: string) => {
    const [rx, tx] = (await runA('cat', [`/sys/class/net/${device}/statistics/rx_bytes`, `/sys/class/net/${device}/statistics/tx_bytes`])).trim().split('\n').map(Number);
    return { rxBytes: rx!, txBytes: tx! };
  };

  function start(ns: string, script: string, args: string[]): ResultPromise {
    const [command, ...prefix] = link.netnsExecPrefix(ns);
    const child = execa(command!, [...prefix, process.execPath, '-e', script, ...args], { reject: false, timeout: CHILD_LIFETIME_MS, stdin: 'ignore' });
    children.push(child);
    return child;
  }

  /** Starts the sink on both ports in nsB; resolves with its samples once it listens. */
  async function startSink(): Promise<{ sink: ResultPromise; samples: Sample[] }> {
    const sink = start(link.nsB, SINK, [link.addrB, String(WORKLOAD_PORT), String(MIGRATION_PORT)]);
    const samples: Sample[] = [];
    await new Promise<void>((resolve, reject) => {
      onLines(sink.stdout!, (line) => {
        if (line === 'listening') return resolve();
        const [atMs, ...bytes] = line.split(' ').map(Number);
        samples.push({ atMs: atMs!, bytes });
      });
      sink.then((result) => reject(new Error(`sink exited before listening: ${String(result.stderr)}`)), reject);
    });
    return { sink, samples };
  }

  beforeAll(async () => {
    link = await createShapedLink({ name: linkName('bc'), rateBitsPerSec: 2e9 });
    runA = runner(link.netnsExecPrefix(link.nsA));
    // The link's own 2 Gbit/s HTB goes: gangway's shaper is the only one on nsA's egress.
    await runA('tc', ['qdisc', 'del', 'dev', link.nsA, 'root']);
  });

  afterEach(async () => {
    for (const agent of agents.splice(0)) await agent.kill();
    for (const child of children.splice(0)) {
      if (child.exitCode === null) child.kill('SIGKILL');
      await child;
    }
    for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
    // Whatever a test left (it may have failed half-way) is reported, then removed.
    const leftChains = await AccountingChain.removeLeftovers(runA);
    const leftQdisc = await Shaper.removeLeftovers(runA, link.nsA);
    expect(leftChains, 'GANGWAY_ chains left by the test').toEqual([]);
    expect(leftQdisc, 'a 6777: qdisc left by the test').toBe(false);
  });

  afterAll(async () => {
    await link?.close();
  });

  it('high priority: the competing workload keeps at least its SLA lower limit while the migration class runs', async () => {
    const service = new TrafficService({
      config: resolveTrafficConfig({ uplink: link.nsA, linkCapacity: LINK_BYTES_PER_SEC, slaLower: SLA_LOWER_BYTES_PER_SEC, slaUpper: 150 * MBIT, priority: 'high', sampleInterval: 500 }),
      peerPort: MIGRATION_PORT,
      guests: () => [],
      log: createLogger('error'),
      run: runA,
      isRoot: true,
      readNic,
    });
    try {
      await service.start({ timer: false });
      expect(service.monitor.mode).toBe('full');
      expect(await iptablesRules()).toMatch(/-A GANGWAY_ACCT -o \S+ -p tcp -m tcp --dport 7401/);
      const hold = await service.hold({ peerPort: MIGRATION_PORT, priority: 'high' });
      expect(hold.applied, hold.reason).toBe(true);
      const reserved = service.controller.status().active!;
      // The workload was idle: the migration gets the link less the workload's lower limit.
      expect(reserved.migrationBytesPerSec).toBe(LINK_BYTES_PER_SEC - SLA_LOWER_BYTES_PER_SEC);
      expect(reserved.workloadRateBytesPerSec).toBe(SLA_LOWER_BYTES_PER_SEC);

      const { sink, samples } = await startSink();
      const startedAt = Date.now();
      const workload = start(link.nsA, SENDER, [link.addrB, String(WORKLOAD_PORT), String(SEND_MS), String(SEND_LIMIT_BYTES)]);
      const migration = start(link.nsA, SENDER, [link.addrB, String(MIGRATION_PORT), String(SEND_MS), String(SEND_LIMIT_BYTES)]);
      for (const sender of [await workload, await migration]) expect(sender.exitCode, String(sender.stderr)).toBe(0);
      expect((await sink).exitCode).toBe(0);
      const stats = await service.controller.status();
      const classes = await new Shaper(runA, link.nsA).stats();
      await service.monitor.sample();

      // From a second in (slow start) to half a second before the senders stopped.
      const workloadRate = goodput(samples, 0, startedAt + 1000, startedAt + SEND_MS - 500);
      const migrationRate = goodput(samples, 1, startedAt + 1000, startedAt + SEND_MS - 500);
      console.info(`high priority: workload ${(workloadRate / MBIT).toFixed(1)} Mbit/s (SLA lower ${SLA_LOWER_BYTES_PER_SEC / MBIT}), migration ${(migrationRate / MBIT).toFixed(1)} Mbit/s (reserved ${reserved.migrationBytesPerSec / MBIT})`);
      expect(workloadRate).toBeGreaterThanOrEqual(SLA_LOWER_BYTES_PER_SEC * FRAMING * 0.95);
      expect(migrationRate).toBeGreaterThan(reserved.migrationBytesPerSec * FRAMING * 0.85);
      expect(migrationRate).toBeLessThan(reserved.migrationBytesPerSec * 1.05);
      // Both flows went through their own classes.
      expect(classes.migration.sentBytes).toBeGreaterThan(classes.workload.sentBytes);
      expect(classes.workload.sentBytes).toBeGreaterThan(SLA_LOWER_BYTES_PER_SEC);
      expect(stats.active?.priority).toBe('high');
      // The accounting chain saw the migration stream on the peer port.
      expect(service.monitor.snapshot().migration!.txBytesPerSec).toBeGreaterThan(0);

      await hold.stop();
      expect(await rootHandles()).not.toContain('6777:');
    } finally {
      await service.stop();
    }
    expect(await iptablesRules()).not.toMatch(/GANGWAY_/);
  });

  it.skipIf(!builtAgent)('an agent in the namespace removes a crashed run\'s leftovers, measures the uplink, and cleans up on SIGTERM', async () => {
    // What a crashed agent left: its shaper on the uplink and an old accounting chain.
    await new Shaper(runA, link.nsA).install({
      linkBitsPerSec: 200e6,
      migration: { rateBitsPerSec: 100e6, ceilBitsPerSec: 100e6, port: MIGRATION_PORT, direction: 'dport' },
      workload: { rateBitsPerSec: 100e6, ceilBitsPerSec: 200e6 },
    });
    await new AccountingChain(runA, 'GANGWAY_OLD').install([{ comment: 'old', match: ['-o', link.nsA] }], ['OUTPUT']);
    expect(await rootHandles()).toContain('6777:');

    const stateDir = makeTempDir('gangway-traffic-agent-');
    dirs.push(stateDir);
    const agent = await startLocalAgent({
      stateDir,
      mainPath: mainJs,
      wrap: link.netnsExecPrefix(link.nsA),
      args: ['--uplink', link.nsA, '--link-capacity', '200Mbit/s'],
      env: { GANGWAY_TRAFFIC_SAMPLE_INTERVAL: '200ms' },
    });
    agents.push(agent);
    expect(await rootHandles()).not.toContain('6777:');
    const rules = await iptablesRules();
    expect(rules).not.toMatch(/GANGWAY_OLD/);
    expect(rules).toMatch(/-A OUTPUT -j GANGWAY_ACCT/);

    // A bounded flow out of the uplink shows on the NIC and as workload.
    const { sink } = await startSink();
    const flow = start(link.nsA, SENDER, [link.addrB, String(WORKLOAD_PORT), '3000', String(50 * MBIT * 3)]);
    const other = start(link.nsA, SENDER, [link.addrB, String(MIGRATION_PORT), '3000', String(MBIT)]);
    let seen: { mode: string; nic: { txBytesPerSec: number } | null; workload: { txBytesPerSec: number } | null; contention: { level: string } | null } | undefined;
    const deadline = Date.now() + 10_000;
    while (Date.now() < deadline) {
      seen = await agent.client.call('GET', '/v1/traffic');
      if ((seen?.nic?.txBytesPerSec ?? 0) > 5 * MBIT) break;
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    expect(seen?.mode).toBe('full');
    expect(seen!.nic!.txBytesPerSec).toBeGreaterThan(5 * MBIT);
    expect(seen!.workload!.txBytesPerSec).toBeGreaterThan(0);
    expect(seen!.contention).not.toBeNull();
    for (const child of [await flow, await other, await sink]) expect(child.exitCode).toBe(0);

    await agent.stop();
    expect(agent.process.exitCode).toBe(0);
    expect(await iptablesRules()).not.toMatch(/GANGWAY_/);
    expect(await rootHandles()).not.toContain('6777:');
  });
});
