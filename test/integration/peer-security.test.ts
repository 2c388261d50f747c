// A peer is who its certificate says and gets only what it is owed. Each case plays the
// attacker through the real protocol against real agent processes: an allowlisted third
// peer (mutual TLS) or a loopback client (plain ws) that lies in its hello, tries to take
// over another host's post-copy, floods pages past its credit, floods offers, or leans on
// the session limits. Each time the real migration completes clean, and the agent keeps
// serving others.
import { randomBytes, randomUUID } from 'node:crypto';
import { readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { compressSync } from 'lz4-napi';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { waitForGuestProgress } from '../../agent/cli/demo.js';
import { initCa, issueHostCert, type CertResult } from '../../agent/cli/certs.js';
import { makeTempDir, type LocalAgent } from '../../agent/local-agent.js';
import { loadNative } from '../../agent/native.js';
import { creditCost } from '../../agent/migration/page-sender.js';
import { Codec, EntryKind, RejectReason, Technique, Whereabouts } from '../../protocol/codes.js';
import { ErrorCode } from '../../protocol/errors.js';
import { Frame } from '../../protocol/index.js';
import { Attacker, offerOf } from '../helpers/attacker.js';
import { Channel } from '../../agent/peer/channel.js';
import { builtAgent, Cluster, shmFilesOf, uniqueName } from '../helpers/cluster.js';
import { mountTmpfs } from '../helpers/tmpfs.js';
import { waitFor, waitForAsync } from '../helpers/wait.js';

const MiB = 1024 * 1024;
const canPostcopy = builtAgent && loadNative().uffdProbe();

/** Peak and current resident memory of a process, from /proc (bytes). */
function memoryOf(pid: number): { peakBytes: number; rssBytes: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kib = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status)![1]) * 1024;
  return { peakBytes: kib('VmHWM'), rssBytes: kib('VmRSS') };
}

/** Resets a process's peak RSS (VmHWM) to its current RSS (proc(5): clear_refs 5). */
function resetPeak(pid: number): void {
  writeFileSync(`/proc/${pid}/clear_refs`, '5');
}

/** The id of the post-copy under way to `agent` for guest `name`, once its guest runs there. */
async function incomingMigration(agent: LocalAgent, name: string): Promise<string> {
  for (const deadline = Date.now() + 30_000; Date.now() < deadline; await sleep(20)) {
    const guest = (await agent.status()).guests.find((g) => g.name === name) as { incoming?: { migrationId: string } } | undefined;
    if (guest?.incoming) return guest.incoming.migrationId;
  }
  throw new Error(`no post-copy of ${name} started at ${agent.listen}`);
}

/** A metric's value from the agent's /metrics, 0 when absent. */
async function metric(agent: LocalAgent, name: string, labels: string): Promise<number> {
  const address = (await agent.status()).agent.metrics;
  const text = await (await fetch(`http://${address}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name}{${labels}}`));
  return line ? Number(line.slice(line.lastIndexOf(' ') + 1)) : 0;
}

/** The processes whose command line mentions `text` (guests are detached: found by name). */
function processesMentioning(text: string): number[] {
  const found: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (readFileSync(`/proc/${entry}/cmdline`, 'utf8').includes(text)) found.push(Number(entry));
    } catch {}
  }
  return found;
}

describe.skipIf(!builtAgent)('a peer gets only what it is owed', () => {
  const dir = makeTempDir('gangway-peersec-');
  const certs: Record<string, CertResult> = {};
  let cluster: Cluster | undefined;
  const attackers: Attacker[] = [];

  beforeAll(async () => {
    await initCa({ dir: join(dir, 'ca'), days: 30 });
    for (const name of ['host-a', 'host-b', 'host-evil']) {
      certs[name] = await issueHostCert({ dir: join(dir, 'ca'), name, sans: ['127.0.0.1'], validity: { days: 2 } });
    }
  });
  afterEach(async () => {
    for (const attacker of attackers.splice(0)) attacker.close();
    await cluster?.cleanup();
    cluster = undefined;
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const tls = (cert: string, allow: string[]) => ({ cert: certs[cert]!.certPath, key: certs[cert]!.keyPath, ca: join(dir, 'ca', 'ca.crt'), allow });

  async function attacker(options: Parameters<typeof Attacker.connect>[0]): Promise<Attacker> {
    const a = await Attacker.connect(options);
    attackers.push(a);
    return a;
  }

  it('refuses a hello whose agent id is not the one its certificate proves', async () => {
    cluster = new Cluster();
    const b = await cluster.agent('b', ['--metrics-listen', '127.0.0.1:0'], undefined, tls('host-b', ['host-a', 'host-evil']));
    expect((await b.status()).agent.id).toBe('host-b');
    // host-evil is listed, but claims to be host-a.
    const why = await Attacker.refusal({ address: b.listen, agentId: 'host-a', tls: tls('host-evil', ['host-b']) });
    expect(why.code).toBe(ErrorCode.IDENTITY);
    expect(why.message).toMatch(/names agent "host-a", but its certificate \(CN=host-evil, sha256:[0-9a-f]{64}\) is agent "host-evil"/);
    expect(await metric(b, 'gangway_peer_limit_total', 'limit="identity"')).toBe(1);
    // The same certificate telling the truth is served.
    const honest = await attacker({ address: b.listen, agentId: 'host-evil', tls: tls('host-evil', ['host-b']) });
    const id = randomUUID();
    honest.watch(id);
    honest.send(Frame.migrationQuery({ migrationId: id }));
    expect((await honest.next(id, 'migrationAnswer')).whereabouts).toBe(Whereabouts.unknown);
    expect(honest.closedWith).toBeUndefined();
  });

  describe.skipIf(!canPostcopy)('a post-copy cannot be taken over (needs userfaultfd: root)', () => {
    for (const transport of ['tls', 'plaintext'] as const) {
      it(`an impostor's reattach, migrationQuery and abort are refused and reveal nothing; the real migration completes clean (${transport})`, async () => {
        cluster = new Cluster();
        const a = await cluster.agent('a', [], undefined, transport === 'tls' ? tls('host-a', ['host-b']) : undefined);
        const b = await cluster.agent('b', ['--metrics-listen', '127.0.0.1:0'], undefined, transport === 'tls' ? tls('host-b', ['host-a', 'host-evil']) : undefined);
        const sourceId = (await a.status()).agent.id;
        const name = uniqueName('pc');
        const start = await cluster.cli(a, ['guest', 'start', name, '--memory', '64MiB', '--dirty-rate', '32MiB/s', '--hot', '0.5']);
        expect(start.exitCode, start.stderr).toBe(0);
        const run = cluster.cli(a, ['migrate', name, '--to', b.listen, '--technique', 'postcopy', '--bandwidth', '12MiB/s', '--json']);
        // The guest runs at b and waits for pages from a: the moment a hijack would pay.
        const migrationId = await incomingMigration(b, name);
        // Under TLS the impostor is another listed host; under plain ws it claims the source's id.
        const impostor = await attacker(
          transport === 'tls' ? { address: b.listen, agentId: 'host-evil', tls: tls('host-evil', ['host-b']) } : { address: b.listen, agentId: sourceId },
        );
        const nobody = randomUUID();
        impostor.watch(migrationId);
        impostor.watch(nobody);
        impostor.send(Frame.reattach({ migrationId, secret: randomBytes(32) }));
        impostor.send(Frame.reattach({ migrationId: nobody, secret: randomBytes(32) }));
        const refused = await impostor.next(migrationId, 'abort');
        const unknown = await impostor.next(nobody, 'abort');
        // The same words as for an id that never existed: no agent id, no hint that it exists.
        expect(refused.message.replace(migrationId, 'ID')).toBe(unknown.message.replace(nobody, 'ID'));
        expect(refused.message).not.toContain(sourceId);
        expect(refused.message).not.toContain('host-a');
        impostor.send(Frame.migrationQuery({ migrationId }));
        const answer = (await impostor.next(migrationId, 'migrationAnswer')).whereabouts;
        // Under TLS another host is told nothing. Under plain ws the hello's agent id is only a
        // claim (the README's weaker mode): one claiming the source's id is told where the
        // guest is, but without the migration's secret it still cannot act on it.
        expect(answer).toBe(transport === 'tls' ? Whereabouts.unknown : Whereabouts.receiving);
        // Frames of a migration that is not this session's are not this session's to act on.
        impostor.send(Frame.abort({ migrationId, code: ErrorCode.ABORTED, message: 'cancelled by someone else' }));
        impostor.send(
          Frame.pages({ migrationId, region: 0, round: 0, codec: Codec.raw, entries: Uint32Array.of(EntryKind.data, 1, 1), rawBytes: 4096, payload: Buffer.alloc(4096, 0xee) }),
        );

        const done = await run;
        expect(done.exitCode, done.stderr).toBe(0);
        const summary = JSON.parse(done.stdout).guests[0];
        expect(summary.verified).toBe(true);
        expect(summary.postcopy.reattaches).toBe(0);
        expect(await metric(b, 'gangway_peer_limit_total', 'limit="reattach"')).toBe(1);
        const check = await waitForGuestProgress(b, name, 2, 60_000);
        expect(check.resumeStalePages, JSON.stringify(check)).toBe(0);
        expect(check.stalePages, JSON.stringify(check)).toBe(0);
        // The source itself still gets its answer.
        expect((await b.status()).migrations.find((m) => m.migrationId === migrationId)?.state).toBe('committed');
      });
    }
  });

  it("takes a channel only with its migration's secret and its session's certificate; the real pre-copy completes on its own channels", async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a', [], undefined, tls('host-a', ['host-b']));
    const b = await cluster.agent('b', ['--metrics-listen', '127.0.0.1:0'], undefined, tls('host-b', ['host-a', 'host-evil']));
    const material = (name: string) => ({ cert: readFileSync(certs[name]!.certPath), key: readFileSync(certs[name]!.keyPath), ca: readFileSync(join(dir, 'ca', 'ca.crt')) });
    // host-evil opens a migration of its own at b: it knows that migration's id and secret.
    const evil = await attacker({ address: b.listen, agentId: 'host-evil', tls: tls('host-evil', ['host-b']) });
    const migrationId = randomUUID();
    evil.watch(migrationId);
    evil.send(offerOf(migrationId, uniqueName('evil'), 16 * MiB));
    const accept = await evil.next(migrationId, 'accept');
    const [host, port] = [b.listen.slice(0, b.listen.lastIndexOf(':')), Number(b.listen.slice(b.listen.lastIndexOf(':') + 1))];
    const tryChannel = async (as: string, secret: Uint8Array) => {
      const channel = await Channel.connect(host, port, material(as), { migrationId, secret });
      try {
        await channel.ready;
        return 'attached';
      } catch (err) {
        return (err as Error).message;
      } finally {
        await channel.close();
      }
    };
    // Another listed host's certificate (host-a's) with the right secret, and the right
    // certificate with a wrong secret: both refused before a page is read.
    expect(await tryChannel('host-a', accept.secret)).toMatch(/the destination did not take the channel/);
    expect(await tryChannel('host-evil', randomBytes(32))).toMatch(/the destination did not take the channel/);
    expect(await tryChannel('host-evil', accept.secret)).toBe('attached');
    expect(await metric(b, 'gangway_peer_limit_total', 'limit="channels"')).toBe(2);
    // The agent serves a real migration on its channels all the same.
    const name = uniqueName('vm');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '32MiB', '--dirty-rate', '8MiB/s'])).exitCode).toBe(0);
    const run = await cluster.cli(a, ['migrate', name, '--to', b.listen, '--codec', 'raw', '--no-dedup', '--json']);
    expect(run.exitCode, run.stderr).toBe(0);
    const summary = JSON.parse(run.stdout).guests[0];
    expect(summary.verified).toBe(true);
    expect(summary.channels).toMatchObject({ count: 2, tls: true });
    const check = await waitForGuestProgress(b, name, 1, 60_000);
    expect(check.stalePages, JSON.stringify(check)).toBe(0);
  });

  it('cuts off a peer that sends pages past its credit, with memory under the bound, and serves another peer after', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a', [], undefined, tls('host-a', ['host-b']));
    const b = await cluster.agent('b', ['--metrics-listen', '127.0.0.1:0'], undefined, tls('host-b', ['host-a', 'host-evil']));
    const pid = (await b.status()).agent.pid;
    const flooder = await attacker({ address: b.listen, agentId: 'host-evil', tls: tls('host-evil', ['host-b']) });
    const migrationId = randomUUID();
    const name = uniqueName('flood');
    flooder.watch(migrationId);
    flooder.send(offerOf(migrationId, name, 256 * MiB));
    const accept = await flooder.next(migrationId, 'accept');
    // 16 MiB of pages in a 64 KiB LZ4 payload: each frame makes the agent decompress 256x its size.
    const rawBytes = 16 * MiB;
    const payload = compressSync(Buffer.alloc(rawBytes));
    const cost = creditCost(payload.length, rawBytes, 1);
    expect(cost).toBeLessThan(accept.creditBytes);
    resetPeak(pid);
    const before = memoryOf(pid).rssBytes;
    for (let i = 0; i < 400 && !flooder.closedWith; i++) {
      flooder.send(Frame.pages({ migrationId, region: 0, round: 0, codec: Codec.lz4, entries: Uint32Array.of(EntryKind.data, (i * 4096) % 65536, 4096), rawBytes, payload }));
      if (i % 50 === 0) await sleep(1);
    }
    const why = await flooder.closed();
    expect(why.code).toBe(ErrorCode.FLOW_CONTROL);
    expect(why.message).toMatch(/beyond the granted credit/);
    // The bound the README states for one migration: its credit twice over (payloads and
    // what they decompress to) plus a message of the largest size in the socket; 64 MiB for
    // the agent's own churn. Before the fix this flood took an agent to a 5.4 GiB peak.
    const bound = 2 * accept.creditBytes + 2 * 16 * MiB + 64 * MiB;
    const peak = memoryOf(pid).peakBytes;
    expect(peak - before, `peak ${peak}, before ${before}`).toBeLessThan(bound);
    expect(await metric(b, 'gangway_peer_limit_total', 'limit="credit"')).toBe(1);
    // Nothing of the aborted migration stays.
    await waitForAsync('the flood migration to be dropped', async () => (await b.status()).migrations.find((m) => m.migrationId === migrationId)?.state === 'aborted' || undefined);
    expect(shmFilesOf(name)).toHaveLength(0);
    // And the agent serves its real peer.
    const guest = uniqueName('vm');
    expect((await cluster.cli(a, ['guest', 'start', guest, '--memory', '32MiB', '--dirty-rate', '4MiB/s'])).exitCode).toBe(0);
    const moved = await cluster.cli(a, ['migrate', guest, '--to', b.listen, '--json']);
    expect(moved.exitCode, moved.stderr).toBe(0);
    expect(JSON.parse(moved.stdout).guests[0].verified).toBe(true);
  });

  it('stops 1000 offers at the per-peer cap, refuses the rest as busy, and leaves nothing behind', async () => {
    cluster = new Cluster();
    const b = await cluster.agent('b', ['--metrics-listen', '127.0.0.1:0'], { GANGWAY_PEERS_MAX_INCOMING_PER_PEER: '8' });
    const flooder = await attacker({ address: b.listen, agentId: 'offer-flood' });
    const prefix = uniqueName('offer');
    const ids = Array.from({ length: 1000 }, () => randomUUID());
    ids.forEach((id) => flooder.watch(id));
    ids.forEach((id, i) => flooder.send(offerOf(id, `${prefix}-${i}`, 1 * MiB)));
    const answers = await waitFor('an answer to every offer', () => {
      const got = ids.map((id) => flooder.frames.get(id)!.find((f) => f.type === 'accept' || f.type === 'reject'));
      return got.every(Boolean) ? got : undefined;
    }, 60_000);
    const accepted = answers.filter((f) => f!.type === 'accept').length;
    const busy = answers.filter((f) => f!.type === 'reject' && f!.reason === RejectReason.busy);
    expect(accepted).toBe(8);
    expect(busy).toHaveLength(992);
    expect((busy[0] as { message: string }).message).toMatch(/peers\.maxIncomingPerPeer = 8/);
    expect(await metric(b, 'gangway_peer_limit_total', 'limit="incoming-per-peer"')).toBe(992);
    expect(flooder.closedWith).toBeUndefined();
    // The peer goes: its accepted migrations abort, and nothing of them stays.
    flooder.close();
    await waitForAsync('every accepted offer to be aborted', async () => {
      const states = (await b.status()).migrations.filter((m) => m.direction === 'in').map((m) => m.state);
      return states.length === 8 && states.every((s) => s === 'aborted') ? true : undefined;
    }, 30_000);
    await waitFor('no guest process of the offers', () => processesMentioning(prefix).length === 0 || undefined, 10_000);
    expect(readdirSync('/dev/shm').filter((f) => f.includes(prefix))).toHaveLength(0);
    expect(readdirSync(join(b.stateDir, 'guests')).filter((f) => f.includes(prefix))).toHaveLength(0);
    expect((await b.status()).guests).toHaveLength(0);
  });

  it('limits sessions per peer, requests per session, the handshake time and the connections that have sent nothing yet; each is counted', async () => {
    cluster = new Cluster();
    const b = await cluster.agent('b', ['--metrics-listen', '127.0.0.1:0'], {
      GANGWAY_PEERS_MAX_SESSIONS_PER_PEER: '2',
      GANGWAY_PEERS_REQUEST_BURST: '20',
      GANGWAY_PEERS_REQUESTS_PER_SECOND: '5',
      // Long enough for a hello on a loaded machine, short enough to wait for below.
      GANGWAY_PEERS_HANDSHAKE_TIMEOUT: '3s',
      GANGWAY_PEERS_MAX_GROUPS_PER_SESSION: '2',
    });
    const first = await attacker({ address: b.listen, agentId: 'many' });
    const second = await attacker({ address: b.listen, agentId: 'many' });
    const why = await Attacker.refusal({ address: b.listen, agentId: 'many' });
    expect(why.code).toBe(ErrorCode.LIMIT);
    expect(why.message).toMatch(/peers\.maxSessionsPerPeer = 2/);
    expect(first.closedWith).toBeUndefined();
    expect(second.closedWith).toBeUndefined();
    expect(await metric(b, 'gangway_peer_limit_total', 'limit="sessions"')).toBe(1);

    // 40 requests at once against a burst of 20: cut off.
    for (let i = 0; i < 40 && !first.closedWith; i++) first.send(Frame.migrationQuery({ migrationId: randomUUID() }));
    const flooded = await first.closed();
    expect(flooded.code).toBe(ErrorCode.LIMIT);
    expect(flooded.message).toMatch(/peers\.requestsPerSecond/);
    expect(await metric(b, 'gangway_peer_limit_total', 'limit="requests"')).toBe(1);
    // Within the rate, the other session is served.
    for (let i = 0; i < 5; i++) {
      const id = randomUUID();
      second.watch(id);
      second.send(Frame.migrationQuery({ migrationId: id }));
      await second.next(id, 'migrationAnswer');
    }
    expect(second.closedWith).toBeUndefined();

    // Dedup groups pin memory: a third on one session is refused.
    const grouper = await attacker({ address: b.listen, agentId: 'groups' });
    for (const group of ['g1', 'g2', 'g3']) grouper.send(Frame.dedupOpen({ group, resident: false }));
    const groupsWhy = await grouper.closed();
    expect(groupsWhy.code).toBe(ErrorCode.LIMIT);
    expect(groupsWhy.message).toMatch(/more than 2 dedup groups open on one session \(peers\.maxGroupsPerSession\)/);
    expect(await metric(b, 'gangway_peer_limit_total', 'limit="groups"')).toBe(1);

    // A connection that never sends its upgrade request is dropped after the handshake timeout.
    const [host, port] = [b.listen.slice(0, b.listen.lastIndexOf(':')), Number(b.listen.slice(b.listen.lastIndexOf(':') + 1))];
    const started = performance.now();
    const closedAfterMs = await new Promise<number>((resolve, reject) => {
      const socket = connect(port, host);
      socket.on('error', () => {});
      socket.once('close', () => resolve(performance.now() - started));
      setTimeout(() => {
        socket.destroy();
        reject(new Error('the silent connection was not dropped within 12 s'));
      }, 12_000);
    });
    expect(closedAfterMs).toBeGreaterThan(2_500);
    expect(closedAfterMs).toBeLessThan(9_000);
    expect(await metric(b, 'gangway_peer_limit_total', 'limit="handshake"')).toBe(1);

    // The door peeks at connections that have sent nothing yet: 128 at most, the rest dropped at once.
    const silent = Array.from({ length: 130 }, () => {
      const socket = connect(port, host);
      socket.on('error', () => {});
      const closed = new Promise<number>((resolve) => socket.once('close', () => resolve(performance.now())));
      return { socket, closed };
    });
    try {
      const openedAt = performance.now();
      const firstClosed = await Promise.race(silent.map((s) => s.closed));
      expect(firstClosed - openedAt).toBeLessThan(2_000);
      expect(await metric(b, 'gangway_peer_limit_total', 'limit="handshake"')).toBeGreaterThanOrEqual(2);
      // And a real session is served once they are gone (the agent has seen them close).
      for (const s of silent) s.socket.destroy();
      await Promise.all(silent.map((s) => s.closed));
      let served: Attacker | undefined;
      for (let attempt = 0; !served; attempt++) {
        try {
          served = await attacker({ address: b.listen, agentId: 'after' });
        } catch (err) {
          if (attempt >= 20) throw err;
          await sleep(100);
        }
      }
      const id = randomUUID();
      served.watch(id);
      served.send(Frame.migrationQuery({ migrationId: id }));
      expect((await served.next(id, 'migrationAnswer')).whereabouts).toBe(Whereabouts.unknown);
    } finally {
      for (const s of silent) s.socket.destroy();
    }
  });

  describe.skipIf(!canPostcopy)('memoryDir space is reserved across offers (root: a small tmpfs)', () => {
    it('refuses a post-copy offer whose sparse file the accepted ones have already promised away', async () => {
      const tmpfs = await mountTmpfs(64);
      const mount = tmpfs.path;
      try {
        cluster = new Cluster();
        const b = await cluster.agent('b', ['--memory-dir', mount], { GANGWAY_PEERS_MEMORY_HEADROOM: '8MiB' });
        const peer = await attacker({ address: b.listen, agentId: 'space' });
        const answers = [];
        for (let i = 0; i < 3; i++) {
          const id = randomUUID();
          peer.watch(id);
          peer.send(offerOf(id, uniqueName(`sparse${i}`), 24 * MiB, Technique.postcopy));
          answers.push(await waitFor(`an answer to offer ${i}`, () => peer.frames.get(id)!.find((f) => f.type === 'accept' || f.type === 'reject')));
        }
        expect(answers.slice(0, 2).map((f) => f.type)).toEqual(['accept', 'accept']);
        const third = answers[2]!;
        expect(third.type).toBe('reject');
        expect(third.type === 'reject' && third.reason).toBe(RejectReason.noSpace);
        expect(third.type === 'reject' && third.message).toMatch(/50331648 are promised to migrations under way and 8388608 are kept free \(peers\.memoryHeadroom\)/);
        peer.close();
        await waitForAsync('the accepted offers to be dropped', async () => ((await b.status()).migrations.filter((m) => m.state === 'aborted').length === 2 ? true : undefined), 30_000);
        await cluster.cleanup();
        cluster = undefined;
      } finally {
        await tmpfs.remove();
      }
    });
  });
});
