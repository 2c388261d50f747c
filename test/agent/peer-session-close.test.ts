// A peer that refuses a session as soon as it reads our hello (an agent over its
// peers.maxSessionsPerPeer does) can have its own hello and its error frame reach us in one
// read. ws then hands both over in one turn, before the promise of the hello settles: the
// dialler must get the peer's reason, and a handler registered on the closed session must be
// told it closed, not wait for frames.
import { once } from 'node:events';
import type { Socket } from 'node:net';
import pino from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import { WebSocketServer, type WebSocket } from 'ws';
import { connectPeer } from '../../agent/peer/session.js';
import { ErrorCode } from '../../protocol/errors.js';
import { encodeFrame, Frame } from '../../protocol/index.js';

const servers: WebSocketServer[] = [];

afterEach(async () => {
  for (const server of servers.splice(0)) {
    for (const client of server.clients) client.terminate();
    await new Promise((resolve) => server.close(resolve));
  }
});

const wire = (frame: Parameters<typeof encodeFrame>[0]) => Buffer.concat(encodeFrame(frame).filter((part): part is Uint8Array => part !== undefined));

/** A peer that answers our hello with its own hello and an error frame: in one write, or the error `laterMs` after. */
async function refusingPeer(laterMs?: number): Promise<string> {
  const server = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  servers.push(server);
  await once(server, 'listening');
  server.on('connection', (ws: WebSocket & { _socket: Socket }) => {
    ws.once('message', () => {
      const socket = ws._socket;
      const refuse = () => ws.send(wire(Frame.error({ code: ErrorCode.LIMIT, message: 'this peer has 2 sessions open here already (peers.maxSessionsPerPeer = 2)' })));
      socket.cork();
      ws.send(wire(Frame.hello({ agentId: 'refuser', agentVersion: 'test', features: [], maxPayloadBytes: 1 << 20 })));
      if (laterMs === undefined) refuse();
      socket.uncork();
      if (laterMs !== undefined) setTimeout(refuse, laterMs);
    });
  });
  return `127.0.0.1:${(server.address() as { port: number }).port}`;
}

describe('a session the peer refuses at once', () => {
  it('rejects the dial with the peer reason, every time', async () => {
    const address = await refusingPeer();
    for (let i = 0; i < 20; i++) {
      const dial = connectPeer(address, { agentId: 'dialler', features: [], maxPayloadBytes: 1 << 20, log: pino({ level: 'silent' }), deadAfterMs: 0 });
      await expect(dial).rejects.toMatchObject({ code: ErrorCode.LIMIT, message: expect.stringMatching(/peers\.maxSessionsPerPeer = 2/) });
    }
  });

  it('tells a handler registered on the closed session that it closed', async () => {
    const session = await connectPeer(await refusingPeer(20), { agentId: 'dialler', features: [], maxPayloadBytes: 1 << 20, log: pino({ level: 'silent' }), deadAfterMs: 0 });
    await once(session, 'closed');
    const told = new Promise((resolve) => session.register('late', { onFrame: () => {}, onSessionClosed: resolve }));
    await expect(told).resolves.toMatchObject({ code: ErrorCode.LIMIT });
    expect(session.closedReason).toMatchObject({ code: ErrorCode.LIMIT });
  });
});
