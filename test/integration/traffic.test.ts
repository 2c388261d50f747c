// The traffic adapters on a real link: the shaper caps the migration stream at its class's
// rate and changes it mid-transfer, the accounting chain counts the stream's bytes, and both
// leave nothing behind (also after a crash). Everything happens inside a shaped link's two
// network namespaces; the root namespace's qdiscs and iptables rules are never touched.
// Needs root, iproute2 and iptables; without them the suite skips and its name says why.
import { createInterface } from 'node:readline';
import type { Readable } from 'node:stream';
import { execa, type ResultPromise } from 'execa';
import { afterAll, beforeAll, describe, expect, it, onTestFinished } from 'vitest';
import { createShapedLink, netnsAvailable, type ShapedLink } from '../../bench/netns-link.js';
import { runner, type Runner } from '../../agent/traffic/exec.js';
import { AccountingChain } from '../../agent/traffic/iptables.js';
import { ForeignQdiscError, Shaper, type ShaperConfig } from '../../agent/traffic/shaper.js';

/** The link itself is far faster than the classes, so only the shaper's classes bind. */
const LINK_BITS_PER_SEC = 2e9;
const PORT = 4444;
const FIRST_RATE_BITS_PER_SEC = 100e6;
const SECOND_RATE_BITS_PER_SEC = 200e6;
/** TCP payload per Ethernet frame as HTB counts it: 1448 / 1514. */
const FRAMING = 0.956;
const SEND_MS = 6_000;
/** When the rate is changed, counted from the first byte the sink receives. */
const CHANGE_AT_MS = 2_500;
/** Twice what SEND_MS at the higher rate can carry: a class that does not bind hits this early. */
const SEND_LIMIT_BYTES = (2 * SECOND_RATE_BITS_PER_SEC * (SEND_MS / 1000)) / 8;
/** Neither child outlives this, even if the test never stops it. */
const CHILD_LIFETIME_MS = 30_000;
const SAMPLE_MS = 100;

const CONFIG: ShaperConfig = {
  linkBitsPerSec: 1e9,
  migration: { rateBitsPerSec: FIRST_RATE_BITS_PER_SEC, ceilBitsPerSec: FIRST_RATE_BITS_PER_SEC, port: PORT, direction: 'dport' },
  workload: { rateBitsPerSec: 500e6, ceilBitsPerSec: 1e9 },
};

// Accepts one connection on HOST:PORT, prints "listening", then every SAMPLE_MS a line
// "<Date.now()> <bytes received so far>", and a last such line when the sender ends.
const SINK = `
const net = require('node:net');
const [host, port] = process.argv.slice(1);
setTimeout(() => process.exit(3), ${CHILD_LIFETIME_MS});
let bytes = 0;
const sample = () => console.log(Date.now() + ' ' + bytes);
const server = net.createServer((socket) => {
  server.close();
  const timer = setInterval(sample, ${SAMPLE_MS});
  socket.on('data', (chunk) => { bytes += chunk.length; });
  socket.on('end', () => { clearInterval(timer); sample(); socket.end(() => process.exit(0)); });
});
server.listen(Number(port), host, () => console.log('listening'));
`;

// Writes 64 KiB chunks, respecting backpressure, until sendMs have passed or the byte limit
// is reached; prints how many bytes it wrote once the sink has them all.
const SENDER = `
const net = require('node:net');
const [host, port, sendMs, limitBytes] = process.argv.slice(1);
setTimeout(() => { console.error('sender: no answer from the sink in time'); process.exit(3); }, ${CHILD_LIFETIME_MS});
let writtenBytes = 0;
const socket = net.connect(Number(port), host, async () => {
  const chunk = Buffer.alloc(64 * 1024, 0xa5);
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
  bytes: number;
}

/** Bits per second the sink received between the first sample at or after `fromMs` and the last at or before `toMs`. */
function rateBetween(samples: readonly Sample[], fromMs: number, toMs: number): number {
  const first = samples.find((s) => s.atMs >= fromMs);
  const last = samples.findLast((s) => s.atMs <= toMs);
  if (!first || !last || last.atMs - first.atMs < 500) throw new Error(`too few samples between ${fromMs} and ${toMs}: ${JSON.stringify(samples)}`);
  return ((last.bytes - first.bytes) * 8) / ((last.atMs - first.atMs) / 1000);
}

/** Link names: [a-z0-9], at most 10 characters, distinct per test process. */
const linkName = (purpose: string) => `${purpose}${process.pid.toString(36)}`;

async function iptablesMissing(): Promise<string | undefined> {
  const version = await execa('iptables', ['-V'], { reject: false, timeout: 10_000, stdin: 'ignore' });
  return version.failed ? `iptables is not usable: ${version.shortMessage}` : undefined;
}

const available = await netnsAvailable();
const skipReason = available.ok ? await iptablesMissing() : available.reason;

describe.skipIf(skipReason !== undefined)(`traffic adapters on a shaped link${skipReason ? ` (skipped: ${skipReason})` : ''}`, () => {
  let link: ShapedLink;
  let runA: Runner;
  const children: ResultPromise[] = [];

  async function rootQdiscHandles(): Promise<string[]> {
    const text = await runA('tc', ['-j', 'qdisc', 'show', 'dev', link.nsA]);
    return (JSON.parse(text || '[]') as { handle: string }[]).map((q) => q.handle);
  }
  const iptablesRules = () => runA('iptables', ['-S']);

  function start(ns: string, script: string, args: string[]): ResultPromise {
    const [command, ...prefix] = link.netnsExecPrefix(ns);
    const child = execa(command!, [...prefix, process.execPath, '-e', script, ...args], { reject: false, timeout: CHILD_LIFETIME_MS, stdin: 'ignore' });
    children.push(child);
    return child;
  }

  beforeAll(async () => {
    link = await createShapedLink({ name: linkName('tr'), rateBitsPerSec: LINK_BITS_PER_SEC });
    runA = runner(link.netnsExecPrefix(link.nsA));
  });

  afterAll(async () => {
    // `ip netns exec` execs in place, so each child's pid is its node process.
    for (const child of children) {
      if (child.exitCode === null) child.kill('SIGKILL');
      await child;
    }
    if (link) {
      await AccountingChain.removeLeftovers(runA).catch(() => {});
      await Shaper.removeLeftovers(runA, link.nsA).catch(() => {});
      await link.close();
    }
  });

  it("refuses to replace the link's own root qdisc unless told to", async () => {
    const shaper = new Shaper(runA, link.nsA);
    const refused = await shaper.install(CONFIG).catch((err: unknown) => err);
    expect(refused).toBeInstanceOf(ForeignQdiscError);
    expect((refused as Error).message).toMatch(/already has a root qdisc htb 1: that gangway did not install/);
    expect(await rootQdiscHandles()).toContain('1:');
  });

  it('caps migration at 100 Mbit/s, changes it to 200 Mbit/s within a second, and counts every byte', async () => {
    const shaper = new Shaper(runA, link.nsA);
    const chain = new AccountingChain(runA, 'GANGWAY_ACCT');
    // Removed also when an expectation below fails: the next test counts what is left.
    onTestFinished(async () => {
      await shaper.remove().catch(() => {});
      await chain.remove().catch(() => {});
    });
    await shaper.install(CONFIG, { replaceForeign: true });
    expect(await rootQdiscHandles()).toContain('6777:');
    await chain.install(
      [
        { comment: 'migration out', match: ['-o', link.nsA, '-p', 'tcp', '--dport', String(PORT)] },
        { comment: 'migration acks', match: ['-i', link.nsA, '-p', 'tcp', '--sport', String(PORT)] },
      ],
      ['OUTPUT', 'INPUT'],
    );
    // Installing twice leaves one jump per hook.
    await chain.install(
      [
        { comment: 'migration out', match: ['-o', link.nsA, '-p', 'tcp', '--dport', String(PORT)] },
        { comment: 'migration acks', match: ['-i', link.nsA, '-p', 'tcp', '--sport', String(PORT)] },
      ],
      ['OUTPUT', 'INPUT'],
    );
    expect((await iptablesRules()).match(/-j GANGWAY_ACCT$/gm)).toHaveLength(2);
    const txBefore = await txBytes(link.nsA);

    const sink = start(link.nsB, SINK, [link.addrB, String(PORT)]);
    const samples: Sample[] = [];
    let firstByteAtMs: number | undefined;
    const listening = new Promise<void>((resolve, reject) => {
      onLines(sink.stdout!, (line) => {
        if (line === 'listening') return resolve();
        const [atMs, bytes] = line.split(' ').map(Number) as [number, number];
        samples.push({ atMs, bytes });
        if (bytes > 0) firstByteAtMs ??= atMs;
      });
      sink.then((result) => reject(new Error(`sink exited before listening: ${String(result.stderr)}`)), reject);
    });
    await listening;
    const sender = start(link.nsA, SENDER, [link.addrB, String(PORT), String(SEND_MS), String(SEND_LIMIT_BYTES)]);

    // Change the class once the sink has been receiving for CHANGE_AT_MS (bounded wait).
    const deadline = Date.now() + 10_000;
    while ((firstByteAtMs === undefined || Date.now() < firstByteAtMs + CHANGE_AT_MS) && Date.now() < deadline && sender.exitCode === null) {
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    expect(firstByteAtMs, 'the sink received nothing').toBeDefined();
    await shaper.change('migration', SECOND_RATE_BITS_PER_SEC, SECOND_RATE_BITS_PER_SEC);
    const changedAtMs = Date.now();

    const sent = await sender;
    expect(sent.exitCode, String(sent.stderr)).toBe(0);
    const { writtenBytes } = JSON.parse(String(sent.stdout)) as { writtenBytes: number };
    expect((await sink).exitCode).toBe(0);
    const received = samples.at(-1)!.bytes;
    const txDelta = (await txBytes(link.nsA)) - txBefore;
    const counted = await chain.read();
    const stats = await shaper.stats();

    // (a) The first rate, measured after half a second of slow start, up to the change.
    const before = rateBetween(samples, firstByteAtMs! + 500, changedAtMs);
    // (b) The second rate, from a second after the change to half a second before the sender stopped.
    const after = rateBetween(samples, changedAtMs + 1000, firstByteAtMs! + SEND_MS - 500);
    console.info(`migration class: ${(before / 1e6).toFixed(1)} Mbit/s at ${FIRST_RATE_BITS_PER_SEC / 1e6}, ${(after / 1e6).toFixed(1)} Mbit/s a second after the change to ${SECOND_RATE_BITS_PER_SEC / 1e6}; ${writtenBytes} bytes written, ${counted.get('migration out')?.bytes} counted, ${txDelta} on the veth`);
    // The cap holds from above; from below the rate only shows the class is the one asked
    // for (a unit slip is 8x or 1000x off): a loaded CI host held the sender to 0.88 of it.
    expect(before / (FRAMING * FIRST_RATE_BITS_PER_SEC)).toBeGreaterThan(0.75);
    expect(before / (FRAMING * FIRST_RATE_BITS_PER_SEC)).toBeLessThan(1.1);
    expect(after / (FRAMING * SECOND_RATE_BITS_PER_SEC)).toBeGreaterThan(0.75);
    expect(after / (FRAMING * SECOND_RATE_BITS_PER_SEC)).toBeLessThan(1.1);
    expect(stats.migration.rateBitsPerSec).toBe(SECOND_RATE_BITS_PER_SEC);
    expect(stats.migration.ceilBitsPerSec).toBe(SECOND_RATE_BITS_PER_SEC);
    // The stream went through the migration class, not the default one.
    expect(stats.migration.sentBytes).toBeGreaterThan(writtenBytes);
    expect(stats.workload.sentBytes).toBeLessThan(writtenBytes / 100);

    // (c) iptables counts IP packets: the payload plus headers (well under 1% with GSO),
    // and no more than the veth sent with its Ethernet headers.
    expect(received).toBe(writtenBytes);
    const migrationOut = counted.get('migration out')!.bytes;
    expect(migrationOut).toBeGreaterThanOrEqual(writtenBytes);
    expect(migrationOut).toBeLessThanOrEqual(writtenBytes * 1.01);
    expect(migrationOut).toBeLessThanOrEqual(txDelta);
    expect(migrationOut).toBeGreaterThan(txDelta * 0.99);
    expect(counted.get('migration acks')!.packets).toBeGreaterThan(0);
    // read() zeroed the counters.
    expect((await chain.read()).get('migration out')).toEqual({ packets: 0, bytes: 0 });

    // (d) remove() leaves neither qdisc nor chain, and a second remove() is fine.
    await shaper.remove();
    await chain.remove();
    await shaper.remove();
    await chain.remove();
    expect(await rootQdiscHandles()).not.toContain('6777:');
    expect(await iptablesRules()).not.toMatch(/GANGWAY_/);
  });

  it('removeLeftovers removes the chains, jumps and qdisc a crashed run left, and nothing else', async () => {
    // A crashed run: a shaper and a chain installed and never removed, plus an older chain
    // whose jump carries a quoted comment, beside a chain that is not gangway's.
    await new Shaper(runA, link.nsA).install(CONFIG, { replaceForeign: true });
    await new AccountingChain(runA, 'GANGWAY_CRASHED').install([{ comment: 'guest "vm1" rx', match: ['-i', link.nsA] }], ['INPUT', 'FORWARD']);
    await runA('iptables', ['-N', 'GANGWAY_OLD']);
    await runA('iptables', ['-A', 'FORWARD', '-m', 'comment', '--comment', 'left by a "crash"', '-j', 'GANGWAY_OLD']);
    await runA('iptables', ['-N', 'NOT_OURS']);
    await runA('iptables', ['-A', 'OUTPUT', '-j', 'NOT_OURS']);
    expect(await rootQdiscHandles()).toContain('6777:');

    expect((await AccountingChain.removeLeftovers(runA)).sort()).toEqual(['GANGWAY_CRASHED', 'GANGWAY_OLD']);
    expect(await Shaper.removeLeftovers(runA, link.nsA)).toBe(true);

    expect(await rootQdiscHandles()).not.toContain('6777:');
    const rules = await iptablesRules();
    expect(rules).not.toMatch(/GANGWAY_/);
    expect(rules).toContain('-A OUTPUT -j NOT_OURS');
    // Nothing left: a second pass removes nothing and does not fail.
    expect(await AccountingChain.removeLeftovers(runA)).toEqual([]);
    expect(await Shaper.removeLeftovers(runA, link.nsA)).toBe(false);
  });
});

describe('traffic adapter input', () => {
  const noRun: Runner = () => Promise.reject(new Error('must not run'));

  it.each(['ACCT', 'GANGWAY_', 'GANGWAY_a', 'GANGWAY_WAY_TOO_LONG_FOR_IPTABLES'])('rejects the chain name %j', (name) => {
    expect(() => new AccountingChain(noRun, name)).toThrow(/accounting chain name .* is invalid/);
  });

  it('rejects duplicate comments and targets in accounting rules before running anything', async () => {
    const chain = new AccountingChain(noRun, 'GANGWAY_X');
    await expect(chain.install([{ comment: 'a', match: [] }, { comment: 'a', match: [] }], ['INPUT'])).rejects.toThrow(/used twice/);
    await expect(chain.install([{ comment: 'a', match: ['-j', 'ACCEPT'] }], ['INPUT'])).rejects.toThrow(/no -j or -g/);
    await expect(chain.install([{ comment: 'a */', match: [] }], ['INPUT'])).rejects.toThrow(/comment .* is invalid/);
  });

  it('rejects shaper rates that do not fit the link before running anything', async () => {
    const shaper = new Shaper(noRun, 'mig0');
    await expect(shaper.install({ ...CONFIG, migration: { ...CONFIG.migration, ceilBitsPerSec: 2e9 } })).rejects.toThrow(/above linkBitsPerSec/);
    await expect(shaper.install({ ...CONFIG, migration: { ...CONFIG.migration, rateBitsPerSec: 600e6, ceilBitsPerSec: 600e6 } })).rejects.toThrow(/exceed linkBitsPerSec/);
    await expect(shaper.install({ ...CONFIG, migration: { ...CONFIG.migration, port: 0 } })).rejects.toThrow(/migration.port 0 is invalid/);
    await expect(shaper.change('migration', 1e6, 1e6)).rejects.toThrow(/not installed/);
  });

  it('reports a failed command with its command line, exit code and stderr', async () => {
    const run = runner([process.execPath, '-e', 'process.stderr.write("no such class"); process.exit(2)', '--']);
    await expect(run('tc', ['class', 'change'])).rejects.toThrow(/`.* -e .* -- tc class change` failed with exit code 2: no such class/);
  });
});

async function txBytes(ns: string): Promise<number> {
  const { stdout } = await execa('ip', ['-n', ns, '-j', '-s', 'link', 'show', 'dev', ns]);
  return (JSON.parse(stdout) as { stats64: { tx: { bytes: number } } }[])[0]!.stats64.tx.bytes;
}

/** Calls `onLine` for each line the stream prints. */
function onLines(stream: Readable, onLine: (line: string) => void): void {
  createInterface({ input: stream, crlfDelay: Infinity }).on('line', onLine);
}
