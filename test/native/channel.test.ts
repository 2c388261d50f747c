// Channels (native/src/addon/channel.c) between two real TCP endpoints on loopback, plain and
// under mutual TLS with certificates from `gangway certs`: pages arrive bit-identical (zero
// pages as zeros), a barrier answers only after they are written, and a peer that sends
// garbage, the wrong certificate or nothing gets a bounded error, never a crash.
import { randomBytes } from 'node:crypto';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { initCa, issueHostCert } from '../../agent/cli/certs.js';
import { loadNative, type ChannelTls, type RegionHandle } from '../../agent/native.js';
import { Channel, CHANNEL_PREAMBLE, type ChannelHelloIn } from '../../agent/peer/channel.js';

const native = loadNative();
const PAGE = 4096;
const PAGES = 1024;
let dir: string;
let tlsA: ChannelTls;
let tlsB: ChannelTls;
let tlsStranger: ChannelTls;
const secret = randomBytes(32);

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'gangway-channel-'));
  await initCa({ dir: join(dir, 'ca'), days: 1 });
  await initCa({ dir: join(dir, 'other'), days: 1 });
  const load = async (caDir: string, name: string): Promise<ChannelTls> => {
    const c = await issueHostCert({ dir: join(dir, caDir), name, sans: ['127.0.0.1'], validity: { days: 1 } });
    return { cert: readFileSync(c.certPath), key: readFileSync(c.keyPath), ca: readFileSync(c.caPath) };
  };
  tlsA = await load('ca', 'host-a');
  tlsB = await load('ca', 'host-b');
  tlsStranger = await load('other', 'host-a');
}, 60_000);

afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A source region (read-only mapping of a file of random pages, every 7th zero) and an empty destination region. */
function regions(): { source: RegionHandle; destination: RegionHandle; sourcePath: string; destinationPath: string; close: () => void } {
  const content = randomBytes(PAGES * PAGE);
  for (let p = 0; p < PAGES; p += 7) content.fill(0, p * PAGE, (p + 1) * PAGE);
  const sourcePath = join(dir, `src-${randomBytes(4).toString('hex')}`);
  const destinationPath = `${sourcePath}.dst`;
  writeFileSync(sourcePath, content);
  writeFileSync(destinationPath, Buffer.alloc(PAGES * PAGE, 0xee));
  const sfd = openSync(sourcePath, 'r');
  const dfd = openSync(destinationPath, 'r+');
  const source = native.regionMap(sfd, PAGES * PAGE, PAGE, { writable: false, trackHashes: false, initiallyZero: false });
  const destination = native.regionMap(dfd, PAGES * PAGE, PAGE, { writable: true, trackHashes: true, initiallyZero: false });
  closeSync(sfd);
  closeSync(dfd);
  return {
    source,
    destination,
    sourcePath,
    destinationPath,
    close: () => {
      native.regionClose(source);
      native.regionClose(destination);
    },
  };
}

/** A listener whose connections become destination channels; `take` decides each hello. */
async function listener(tls: ChannelTls | undefined, take: (hello: ChannelHelloIn, channel: Channel) => void): Promise<{ server: Server; port: number; accepted: Channel[] }> {
  const accepted: Channel[] = [];
  const server = createServer({ pauseOnConnect: true }, (socket) => {
    const channel = Channel.accept(socket, tls);
    accepted.push(channel);
    channel.onHello = (hello) => take(hello, channel);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { server, port: (server.address() as { port: number }).port, accepted };
}

describe.each([
  ['plain TCP', undefined, undefined],
  ['mutual TLS', () => tlsA, () => tlsB],
])('channel over %s', (_name, sourceTls, destinationTls) => {
  it('moves a round bit-identical, the barrier after the writes, then says bye', async () => {
    const r = regions();
    const hellos: ChannelHelloIn[] = [];
    const { server, port, accepted } = await listener(destinationTls?.(), (hello, channel) => {
      hellos.push(hello);
      channel.attach([r.destination]);
    });
    try {
      const channel = await Channel.connect('127.0.0.1', port, sourceTls?.(), { migrationId: 'm-1', secret });
      const peer = await channel.ready;
      expect(hellos).toHaveLength(1);
      expect(hellos[0]!.migrationId).toBe('m-1');
      expect(Buffer.compare(hellos[0]!.secret, secret)).toBe(0);
      if (sourceTls) {
        expect(peer).toMatch(/^[0-9a-f]{64}$/);
        expect(hellos[0]!.peerSha256).toMatch(/^[0-9a-f]{64}$/);
        expect(hellos[0]!.peerSha256).not.toBe(peer);
      } else {
        expect(peer).toBeUndefined();
      }
      // Two jobs, out of page order: the region is whole after the barrier.
      const first = await channel.send(r.source, 0, 0, Uint32Array.of(512, 512));
      const second = await channel.send(r.source, 0, 0, Uint32Array.of(0, 512));
      expect(first.pages + second.pages).toBe(PAGES);
      const zeros = Math.ceil(PAGES / 7);
      expect(first.zeroPages + second.zeroPages).toBe(zeros);
      expect(first.rawBytes + second.rawBytes).toBe((PAGES - zeros) * PAGE);
      const barrier = await channel.barrier(0);
      expect(barrier).toEqual({ round: 0, pages: PAGES });
      expect(readFileSync(r.destinationPath).equals(readFileSync(r.sourcePath))).toBe(true);
      // The destination's fingerprints were kept as the pages were written.
      const digests = await Promise.all([native.regionDigest(r.destination, 'tracked'), native.regionDigest(r.source, 'full')]);
      expect(digests[0].equals(digests[1])).toBe(true);
      await channel.bye();
      await accepted[0]!.closed;
      expect(accepted[0]!.failed?.message).toBe('the channel closed');
    } finally {
      server.close();
      r.close();
    }
  }, 30_000);

  it("with fingerprints: copies the pages and says what each page was as sent, in the runs' order", async () => {
    const r = regions();
    const { server, port } = await listener(destinationTls?.(), (_hello, channel) => channel.attach([r.destination]));
    try {
      const channel = await Channel.connect('127.0.0.1', port, sourceTls?.(), { migrationId: 'm-f', secret });
      await channel.ready;
      // Runs out of page order, one of them past a message's worth of data.
      const runs = Uint32Array.of(700, 324, 0, 300, 300, 400);
      const sent = await channel.send(r.source, 0, 3, runs, true);
      expect(sent.pages).toBe(PAGES);
      expect(sent.batches).toBeGreaterThan(1);
      const expected = Buffer.alloc(PAGES * 16);
      let at = 0;
      for (let i = 0; i < runs.length; i += 2) {
        native.regionFingerprints(r.source, runs[i]!, runs[i + 1]!, expected.subarray(at * 16));
        at += runs[i + 1]!;
      }
      expect(sent.fingerprints?.length).toBe(PAGES * 16);
      expect(sent.fingerprints!.equals(expected)).toBe(true);
      // A zero page's is the zero page's fingerprint (page 700 is every 7th).
      expect(sent.fingerprints!.subarray(0, 16).equals(native.hash128(new Uint8Array(PAGE)))).toBe(true);
      expect(await channel.barrier(3)).toEqual({ round: 3, pages: PAGES });
      expect(readFileSync(r.destinationPath).equals(readFileSync(r.sourcePath))).toBe(true);
      // Without asking, none.
      expect((await channel.send(r.source, 0, 4, Uint32Array.of(0, 8))).fingerprints).toBeUndefined();
      // Runs that do not fit the region cannot be fingerprinted: refused before anything is sent.
      await expect(channel.send(r.source, 0, 4, Uint32Array.of(PAGES - 1, 2), true)).rejects.toThrow(/outside the region/);
      await expect(channel.send(r.source, 0, 4, Uint32Array.of(0, PAGES, 0, 1), true)).rejects.toThrow(/more than the region's/);
      await channel.bye();
    } finally {
      server.close();
      r.close();
    }
  }, 30_000);
});

describe('channel refusals', () => {
  it('a refused hello fails the source with the reason, and nothing is written', async () => {
    const r = regions();
    const { server, port } = await listener(undefined, (_hello, channel) => void channel.close());
    try {
      const channel = await Channel.connect('127.0.0.1', port, undefined, { migrationId: 'm-2', secret });
      await expect(channel.ready).rejects.toThrow(/the destination did not take the channel/);
      await channel.closed;
    } finally {
      server.close();
      r.close();
    }
  }, 30_000);

  it('either end closing mid-round fails the other with a bounded error, and both threads end', async () => {
    for (const closer of ['destination', 'source'] as const) {
      const r = regions();
      const { server, port, accepted } = await listener(undefined, (_hello, channel) => channel.attach([r.destination]));
      try {
        const channel = await Channel.connect('127.0.0.1', port, undefined, { migrationId: 'm-5', secret });
        await channel.ready;
        // Ten rounds of the whole region: more than the socket buffers hold.
        const sending = (async () => {
          for (let round = 0; round < 10; round++) await channel.send(r.source, 0, round, Uint32Array.of(0, PAGES));
        })();
        sending.catch(() => {});
        await (closer === 'destination' ? accepted[0]!.close() : channel.close());
        await expect(sending).rejects.toThrow(closer === 'destination' ? /channel: (write|TLS write)|the channel closed/ : /the channel (was )?closed/);
        await Promise.all([channel.closed, accepted[0]!.closed]);
        if (closer === 'source') expect(accepted[0]!.failed?.message).toMatch(/the peer closed the channel|the channel closed|read: /);
      } finally {
        server.close();
        r.close();
      }
    }
  }, 30_000);

  it("a certificate from another CA fails the handshake at both ends", async () => {
    const hellos: ChannelHelloIn[] = [];
    const { server, port, accepted } = await listener(tlsB, (hello) => hellos.push(hello));
    try {
      const channel = await Channel.connect('127.0.0.1', port, tlsStranger, { migrationId: 'm-3', secret });
      await expect(channel.ready).rejects.toThrow(/TLS handshake/);
      await accepted[0]!.closed;
      expect(accepted[0]!.failed?.message).toMatch(/TLS handshake/);
      expect(hellos).toHaveLength(0);
    } finally {
      server.close();
    }
  }, 30_000);

  it.each([
    ['pages for a region the guest does not have', [1, 5, 0, 1, 0], /pages for region 5, the guest has 1/],
    ['a batch past the region', [1, 0, 0, 1, PAGE, 2, PAGES, 1], /outside the region/],
    ['more entries than a batch may hold', [1, 0, 0, 100_000, 0], /a batch of 100000 entries/],
    ['an unknown message', [9, 0, 0, 0, 0], /unknown channel message kind 9/],
  ])('a destination fed %s fails with a bounded error', async (_name, words, why) => {
    const r = regions();
    const { server, port, accepted } = await listener(undefined, (_hello, channel) => channel.attach([r.destination]));
    const socket: Socket = connect({ host: '127.0.0.1', port });
    try {
      await new Promise<void>((resolve) => socket.once('connect', () => resolve()));
      const id = Buffer.from('m-4');
      const hello = Buffer.alloc(20);
      hello.writeUInt32LE(5, 0);
      hello.writeUInt32LE(id.length, 4);
      socket.write(Buffer.concat([CHANNEL_PREAMBLE, hello, id, secret, Buffer.from(Uint32Array.from(words).buffer)]));
      while (accepted.length === 0) await new Promise((resolve) => setTimeout(resolve, 5));
      await accepted[0]!.closed;
      expect(accepted[0]!.failed?.message).toMatch(why);
      expect(readFileSync(r.destinationPath).every((b) => b === 0xee)).toBe(true);
    } finally {
      socket.destroy();
      server.close();
      r.close();
    }
  }, 30_000);
});
