// Untrusted peers: a malformed frame closes that session with a protocol error; the agent
// keeps serving its other sessions and migrations.
import { afterEach, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { encodeFrame, Frame, FrameDecoder } from '../../protocol/index.js';
import { builtAgent, Cluster, uniqueName } from '../helpers/cluster.js';
import { waitForAsync } from '../helpers/wait.js';

interface RawPeer {
  ws: WebSocket;
  frames: ReturnType<FrameDecoder['push']>;
  closed: Promise<{ code: number; reason: string }>;
}

async function rawPeer(address: string, agentId: string): Promise<RawPeer> {
  const ws = new WebSocket(`ws://${address}/gangway/v1`);
  const decoder = new FrameDecoder();
  const peer: RawPeer = {
    ws,
    frames: [],
    closed: new Promise((resolve) => ws.once('close', (code, reason) => resolve({ code, reason: reason.toString() }))),
  };
  ws.on('message', (data: Buffer) => peer.frames.push(...decoder.push(data)));
  await new Promise((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('error', reject);
  });
  const [head] = encodeFrame(Frame.hello({ agentId, agentVersion: '0.0.0-test', features: [], maxPayloadBytes: 1 << 20 }));
  ws.send(head);
  const deadline = Date.now() + 5_000;
  while (!peer.frames.some((f) => f.type === 'hello') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
  expect(peer.frames[0]?.type).toBe('hello');
  return peer;
}

describe.skipIf(!builtAgent)('a misbehaving peer', () => {
  let cluster: Cluster;
  afterEach(async () => {
    await cluster?.cleanup();
  });

  it.each([
    ['garbage bytes', Buffer.from('this is not a gangway frame at all')],
    ['a header length over the limit', Buffer.from([0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0])],
    ['an unknown frame type', Buffer.concat([Buffer.from([0, 0, 0, 3, 0, 0, 0, 0]), Buffer.from([0x81, 0xa1, 0x74, 0x63])])],
  ])('closes the session that sent %s and keeps serving the others', async (_what, bytes) => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const good = await rawPeer(b.listen, 'good-peer');
    const bad = await rawPeer(b.listen, 'bad-peer');
    bad.ws.send(bytes);
    const closed = await bad.closed;
    expect([1002, 1008, 1009]).toContain(closed.code);
    const error = bad.frames.find((f) => f.type === 'error');
    expect(error).toBeDefined();
    expect((error as { code: string }).code).toMatch(/^GANGWAY_ERR_/);

    // The other session is untouched, and the agent still migrates guests.
    expect(good.ws.readyState).toBe(WebSocket.OPEN);
    good.ws.close();
    const name = uniqueName('vm');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '16MiB', '--dirty-rate', '4MiB/s'])).exitCode).toBe(0);
    const run = await cluster.cli(a, ['migrate', name, '--to', b.listen, '--json']);
    expect(run.exitCode, run.stderr).toBe(0);
    expect(JSON.parse(run.stdout).guests[0].verified).toBe(true);
  });

  it('rejects an offer with pages outside the region without harming the agent', async () => {
    cluster = new Cluster();
    const b = await cluster.agent('b');
    const peer = await rawPeer(b.listen, 'liar');
    const migrationId = 'm-1';
    const send = (frame: Parameters<typeof encodeFrame>[0]) => {
      const [head, payload] = encodeFrame(frame);
      peer.ws.send(payload ? Buffer.concat([head, payload]) : head);
    };
    send(
      Frame.offer({
        migrationId,
        guest: { name: uniqueName('liar'), kind: 1, regions: [{ name: 'ram', lengthBytes: 1 << 20, pageSizeBytes: 4096 }], config: {} },
        technique: 1,
        downtimeBudgetMs: 300,
        codecs: [1],
      }),
    );
    const deadline = Date.now() + 5_000;
    while (!peer.frames.some((f) => f.type === 'accept') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    expect(peer.frames.some((f) => f.type === 'accept')).toBe(true);
    // Page 1000 of a 256-page region.
    send(Frame.pages({ migrationId, region: 0, round: 0, codec: 1, entries: Uint32Array.of(2, 1000, 1), rawBytes: 4096, payload: new Uint8Array(4096) }));
    const closed = await peer.closed;
    expect(closed.code).toBe(1002);
    expect(peer.frames.find((f) => f.type === 'error')).toMatchObject({ code: 'GANGWAY_ERR_BAD_PAGES' });
    // The migration is over at the destination once its standby guest is gone (a loaded
    // machine takes a moment to end it): not before, as CI once found it still running.
    const status = await waitForAsync('the destination to end the migration', async () => {
      const now = await b.status();
      return now.migrations.every((m) => m.state !== 'running') && now;
    });
    expect(status.guests).toHaveLength(0);
    expect(status.migrations[0]).toMatchObject({ direction: 'in', state: 'aborted' });
  });

  it.each([
    ['a slot the group does not have', Uint32Array.of(77, 0), 'no such slot'],
    ['pages past the slot', Uint32Array.of(0, 250), "past the slot's 256 pages"],
  ])('closes a session whose refs point at %s, and the agent carries on', async (_what, refs, message) => {
    cluster = new Cluster();
    const b = await cluster.agent('b');
    const peer = await rawPeer(b.listen, 'ref-liar');
    const send = (frame: Parameters<typeof encodeFrame>[0]) => {
      const [head, payload] = encodeFrame(frame);
      peer.ws.send(payload ? Buffer.concat([head, payload]) : head);
    };
    const waitFor = async (type: string) => {
      const deadline = Date.now() + 5_000;
      while (!peer.frames.some((f) => f.type === type) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
      expect(peer.frames.some((f) => f.type === type), type).toBe(true);
    };
    send(Frame.dedupOpen({ group: 'g-1', resident: false }));
    await waitFor('dedupReady');
    send(
      Frame.offer({
        migrationId: 'm-1',
        guest: { name: uniqueName('liar'), kind: 1, regions: [{ name: 'ram', lengthBytes: 1 << 20, pageSizeBytes: 4096 }], config: {} },
        technique: 1,
        downtimeBudgetMs: 300,
        codecs: [1],
        dedup: { group: 'g-1', slots: [0] },
      }),
    );
    await waitFor('accept');
    // 16 pages copied from wherever the refs say.
    send(Frame.pages({ migrationId: 'm-1', region: 0, round: 0, codec: 1, entries: Uint32Array.of(3, 0, 16), rawBytes: 0, payload: new Uint8Array(0), refs }));
    const closed = await peer.closed;
    expect(closed.code).toBe(1002);
    const error = peer.frames.find((f) => f.type === 'error') as { code: string; message: string } | undefined;
    expect(error).toMatchObject({ code: 'GANGWAY_ERR_BAD_PAGES' });
    expect(error!.message).toContain(message);
    // The migration is over at the destination once its standby guest is gone (a loaded
    // machine takes a moment to end it): not before, as CI once found it still running.
    const status = await waitForAsync('the destination to end the migration', async () => {
      const now = await b.status();
      return now.migrations.every((m) => m.state !== 'running') && now;
    });
    expect(status.guests).toHaveLength(0);
    expect(status.migrations[0]).toMatchObject({ direction: 'in', state: 'aborted' });
  });

  it('refuses an offer naming a dedup group that was never opened', async () => {
    cluster = new Cluster();
    const b = await cluster.agent('b');
    const peer = await rawPeer(b.listen, 'no-group');
    const [head] = encodeFrame(
      Frame.offer({
        migrationId: 'm-2',
        guest: { name: uniqueName('nogroup'), kind: 1, regions: [{ name: 'ram', lengthBytes: 1 << 20, pageSizeBytes: 4096 }], config: {} },
        technique: 1,
        downtimeBudgetMs: 300,
        codecs: [1],
        dedup: { group: 'never-opened', slots: [0] },
      }),
    );
    peer.ws.send(head);
    const deadline = Date.now() + 5_000;
    while (!peer.frames.some((f) => f.type === 'reject') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    expect(peer.frames.find((f) => f.type === 'reject')).toMatchObject({ message: expect.stringContaining('dedup group never-opened is not open') });
    expect(peer.ws.readyState).toBe(WebSocket.OPEN);
  });
});
