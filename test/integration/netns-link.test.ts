// A shaped link between two network namespaces carries TCP at its rate in both directions,
// leaves no namespace behind, and carries an agent started inside it. Needs root and
// iproute2; without them the suite skips and its name says why.
import { readlinkSync, realpathSync, rmSync, statSync } from 'node:fs';
import type { Readable } from 'node:stream';
import { execa, type ResultPromise } from 'execa';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { initCa, issueHostCert } from '../../agent/cli/certs.js';
import { makeTempDir, startLocalAgent } from '../../agent/local-agent.js';
import { createShapedLink, netnsAvailable, type ShapedLink } from '../../bench/netns-link.js';
import { builtAgent, mainJs } from '../helpers/cluster.js';

const RATE_BITS_PER_SEC = 200e6;
const SEND_MS = 2_000;
/** Twice what 2 s at the rate can carry: an unshaped link hits this long before 2 s are up. */
const SEND_LIMIT_BYTES = (2 * RATE_BITS_PER_SEC * (SEND_MS / 1000)) / 8;
/** Neither child outlives this, even if the test never stops it. */
const CHILD_LIFETIME_MS = 30_000;

// Counts what one connection delivers, timed from the first chunk to the last (the first
// chunk's bytes are not counted: they arrived at the start of the interval), and answers
// with the count when the sender ends.
const SINK = `
const net = require('node:net');
setTimeout(() => process.exit(3), ${CHILD_LIFETIME_MS});
const server = net.createServer((socket) => {
  server.close();
  let bytes = 0, firstAt = 0, lastAt = 0;
  socket.on('data', (chunk) => {
    const now = performance.now();
    if (firstAt === 0) firstAt = now;
    else bytes += chunk.length;
    lastAt = now;
  });
  socket.on('end', () => socket.end(JSON.stringify({ bytes, durationMs: lastAt - firstAt }), () => process.exit(0)));
});
server.listen(0, process.argv[1], () => console.log(server.address().port));
`;

// Writes 64 KiB chunks, respecting backpressure, until SEND_MS have passed or the byte
// limit is reached; then prints the sink's answer.
const SENDER = `
const net = require('node:net');
const [host, port, sendMs, limitBytes] = process.argv.slice(1);
setTimeout(() => { console.error('sender: no answer from the sink in time'); process.exit(3); }, ${CHILD_LIFETIME_MS});
let answer = '';
const socket = net.connect(Number(port), host, async () => {
  const chunk = Buffer.alloc(64 * 1024, 0xa5);
  const started = performance.now();
  for (let sent = 0; sent < Number(limitBytes) && performance.now() - started < Number(sendMs); sent += chunk.length) {
    if (!socket.write(chunk)) await new Promise((resolve) => socket.once('drain', resolve));
  }
  socket.end();
});
socket.on('data', (data) => (answer += data));
socket.on('end', () => { console.log(answer); process.exit(0); });
`;

const CONNECT = `
const net = require('node:net');
const socket = net.connect(Number(process.argv[2]), process.argv[1], () => process.exit(0));
socket.on('error', (err) => { console.error(err.message); process.exit(1); });
setTimeout(() => process.exit(2), 5000);
`;

/** Link names: [a-z0-9], at most 10 characters, distinct per test process. */
const linkName = (purpose: string) => `${purpose}${process.pid.toString(36)}`;

async function namespaceNames(): Promise<string[]> {
  const { stdout } = await execa('ip', ['-j', 'netns', 'list']);
  return (JSON.parse(stdout || '[]') as { name: string }[]).map((entry) => entry.name);
}

function firstLine(stream: Readable, subprocess: ResultPromise, what: string): Promise<string> {
  return new Promise((resolve, reject) => {
    let text = '';
    stream.on('data', (data: Buffer) => {
      text += data.toString();
      const newline = text.indexOf('\n');
      if (newline >= 0) resolve(text.slice(0, newline));
    });
    subprocess.then(
      (result) => reject(new Error(`${what} exited before printing a line: ${String(result.stderr)}`)),
      (err: unknown) => reject(err),
    );
  });
}

const available = await netnsAvailable();
const skipReason = available.ok ? undefined : available.reason;

describe('createShapedLink input', () => {
  it.each(['Bad_Name', '', 'waytoolongname', 'a-b'])('rejects the name %j before touching the system', async (name) => {
    await expect(createShapedLink({ name, rateBitsPerSec: RATE_BITS_PER_SEC })).rejects.toThrow(/name .* is invalid: use 1 to 10 characters of a-z and 0-9/);
  });

  it.each([Number.NaN, 0, 1e22])('rejects the rate %d bit/s before touching the system', async (rateBitsPerSec) => {
    await expect(createShapedLink({ name: 'x', rateBitsPerSec })).rejects.toThrow(/rateBitsPerSec .* is invalid: use 8000 to 100000000000 bit\/s/);
  });
});

describe.skipIf(skipReason !== undefined)(`a shaped link between network namespaces${skipReason ? ` (skipped: ${skipReason})` : ''}`, () => {
  let link: ShapedLink | undefined;
  const cleanups: (() => unknown)[] = [];

  beforeAll(async () => {
    link = await createShapedLink({ name: linkName('r'), rateBitsPerSec: RATE_BITS_PER_SEC });
  });
  afterEach(async () => {
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
  });
  afterAll(async () => {
    await link?.close();
  });

  /** Starts a sink in `to` and sends from `from` for SEND_MS; the sink's count and interval. */
  async function measureGoodput(from: string, to: string, toAddr: string): Promise<{ bitsPerSec: number; durationMs: number }> {
    const [sinkCommand, ...sinkPrefix] = link!.netnsExecPrefix(to);
    const sink = execa(sinkCommand!, [...sinkPrefix, process.execPath, '-e', SINK, toAddr], { reject: false, timeout: CHILD_LIFETIME_MS });
    cleanups.push(async () => {
      sink.kill('SIGKILL');
      await sink;
    });
    const port = await firstLine(sink.stdout, sink, 'sink');
    const [senderCommand, ...senderPrefix] = link!.netnsExecPrefix(from);
    const sender = await execa(senderCommand!, [...senderPrefix, process.execPath, '-e', SENDER, toAddr, port, String(SEND_MS), String(SEND_LIMIT_BYTES)], {
      reject: false,
      timeout: CHILD_LIFETIME_MS,
    });
    expect(sender.exitCode, sender.stderr).toBe(0);
    const { bytes, durationMs } = JSON.parse(sender.stdout) as { bytes: number; durationMs: number };
    return { bitsPerSec: (bytes * 8) / (durationMs / 1000), durationMs };
  }

  it.each([
    ['A', 'B'],
    ['B', 'A'],
  ] as const)('carries TCP from ns%s to ns%s at 0.7x to 1.1x its rate', async (fromSide, toSide) => {
    const from = fromSide === 'A' ? link!.nsA : link!.nsB;
    const to = toSide === 'A' ? link!.nsA : link!.nsB;
    const toAddr = toSide === 'A' ? link!.addrA : link!.addrB;
    const goodput = await measureGoodput(from, to, toAddr);
    console.info(`${from} -> ${to}: ${(goodput.bitsPerSec / 1e6).toFixed(1)} Mbit/s of TCP goodput over ${goodput.durationMs.toFixed(0)} ms on a ${RATE_BITS_PER_SEC / 1e6} Mbit/s link`);
    expect(goodput.bitsPerSec).toBeGreaterThan(0.7 * RATE_BITS_PER_SEC);
    expect(goodput.bitsPerSec).toBeLessThan(1.1 * RATE_BITS_PER_SEC);
    // Sent for the time asked, not cut short by the byte limit.
    expect(goodput.durationMs).toBeGreaterThan(SEND_MS / 2);
  });

  it.skipIf(!builtAgent)('runs an agent inside nsB, listening on addrB, stopped by its pid', async () => {
    const stateDir = makeTempDir('gangway-netns-');
    cleanups.push(() => rmSync(stateDir, { recursive: true, force: true }));
    // Off loopback an agent runs only with TLS.
    await initCa({ dir: `${stateDir}/tls`, days: 1 });
    const cert = await issueHostCert({ dir: `${stateDir}/tls`, name: 'host-b', sans: [link!.addrB], validity: { days: 1 } });
    const tls = { cert: cert.certPath, key: cert.keyPath, ca: cert.caPath, allow: ['host-a'] };
    const agent = await startLocalAgent({ stateDir, mainPath: mainJs, wrap: link!.netnsExecPrefix(link!.nsB), listen: `${link!.addrB}:0`, tls });
    cleanups.push(() => agent.kill());

    const status = await agent.status();
    expect(status.agent.listen).toMatch(new RegExp(`^${link!.addrB.replaceAll('.', '\\.')}:\\d+$`));
    // `ip netns exec` execs in place: the spawned pid is the agent's node, and it is in nsB.
    expect(readlinkSync(`/proc/${agent.pid}/exe`)).toBe(realpathSync(process.execPath));
    expect(statSync(`/proc/${agent.pid}/ns/net`).ino).toBe(statSync(`/run/netns/${link!.nsB}`).ino);

    const port = status.agent.listen.split(':')[1]!;
    const [command, ...prefix] = link!.netnsExecPrefix(link!.nsA);
    const connect = await execa(command!, [...prefix, process.execPath, '-e', CONNECT, link!.addrB, port], { reject: false, timeout: 10_000 });
    expect(connect.exitCode, `connecting from nsA to the agent: ${connect.stderr}`).toBe(0);

    await agent.stop();
    // A clean exit means SIGTERM reached the agent itself, not a wrapper around it.
    expect(agent.process.exitCode).toBe(0);
  });

  it('removes both namespaces on close, and close twice is fine', async () => {
    const closing = await createShapedLink({ name: linkName('c'), rateBitsPerSec: RATE_BITS_PER_SEC });
    cleanups.push(() => closing.close());
    expect(await namespaceNames()).toEqual(expect.arrayContaining([closing.nsA, closing.nsB]));
    await closing.close();
    await closing.close();
    const names = await namespaceNames();
    expect(names).not.toContain(closing.nsA);
    expect(names).not.toContain(closing.nsB);
  });

  it('replaces namespaces a crashed run left with the same names', async () => {
    const name = linkName('s');
    await execa('ip', ['netns', 'add', `gw-${name}-a`]);
    cleanups.push(() => execa('ip', ['netns', 'del', `gw-${name}-a`], { reject: false }));
    const replaced = await createShapedLink({ name, rateBitsPerSec: RATE_BITS_PER_SEC });
    cleanups.push(() => replaced.close());
    const { stdout } = await execa('ip', ['-n', replaced.nsA, '-br', 'addr', 'show', 'dev', replaced.nsA]);
    expect(stdout).toContain(`${replaced.addrA}/30`);
  });

  it('ignores delayMs with a note when the kernel has no netem, or applies it', async () => {
    const delayed = await createShapedLink({ name: linkName('d'), rateBitsPerSec: RATE_BITS_PER_SEC, delayMs: 5 });
    cleanups.push(() => delayed.close());
    const { stdout } = await execa('tc', ['-n', delayed.nsA, 'qdisc', 'show', 'dev', delayed.nsA]);
    if (stdout.includes('netem')) {
      expect(delayed.delayMs).toBe(5);
      expect(delayed.note).toBeUndefined();
    } else {
      expect(delayed.delayMs).toBe(0);
      expect(delayed.note).toMatch(/delayMs 5 ignored: this kernel has no netem/);
    }
  });
});
