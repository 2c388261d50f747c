// The peer WebSocket's masking: the client's frames carry a zero mask, and ws (the version
// installed) then sends the payload as it is, without a masking pass over every page. A
// raw TCP server stands in for the peer so the test reads the bytes the client put on
// the wire, not what a WebSocket library makes of them.
import { createHash } from 'node:crypto';
import { createServer, type Server, type Socket } from 'node:net';
import pino from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import * as ws from 'ws';
import { connectPeer } from '../../agent/peer/session.js';
import { FrameDecoder } from '../../protocol/index.js';

const WS_GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
const servers: Server[] = [];
const sockets: Socket[] = [];

afterEach(async () => {
  for (const socket of sockets.splice(0)) socket.destroy();
  await Promise.all(servers.splice(0).map((server) => new Promise((resolve) => server.close(resolve))));
});

/** The first WebSocket frame a client sends after the upgrade, as raw bytes. */
function firstClientFrame(server: Server): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    server.once('connection', (socket) => {
      sockets.push(socket);
      let data = Buffer.alloc(0);
      let upgraded = false;
      socket.on('error', reject);
      socket.on('data', (chunk: Buffer) => {
        data = Buffer.concat([data, chunk]);
        if (!upgraded) {
          const end = data.indexOf('\r\n\r\n');
          if (end < 0) return;
          const key = /sec-websocket-key: *(\S+)/i.exec(data.subarray(0, end).toString())?.[1];
          if (!key) return reject(new Error('no Sec-WebSocket-Key in the upgrade request'));
          const accept = createHash('sha1').update(key + WS_GUID).digest('base64');
          socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`);
          upgraded = true;
          data = data.subarray(end + 4);
        }
        // Header: 2 bytes, the extended length (2 or 8), the 4-byte mask key when masked.
        if (data.length < 2) return;
        const short = data[1]! & 0x7f;
        const lengthBytes = short === 126 ? 2 : short === 127 ? 8 : 0;
        const headerBytes = 2 + lengthBytes + (data[1]! & 0x80 ? 4 : 0);
        if (data.length < headerBytes) return;
        const payloadBytes = short === 126 ? data.readUInt16BE(2) : short === 127 ? Number(data.readBigUInt64BE(2)) : short;
        if (data.length >= headerBytes + payloadBytes) resolve(data.subarray(0, headerBytes + payloadBytes));
      });
    });
  });
}

describe('peer WebSocket masking', () => {
  it('sends the hello with the mask bit set and an all-zero mask key, so its payload is the frame as encoded', async () => {
    const server = createServer();
    servers.push(server);
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as { port: number }).port;
    const captured = firstClientFrame(server);
    const session = connectPeer(`127.0.0.1:${port}`, { agentId: 'mask-test', features: [], maxPayloadBytes: 1 << 20, log: pino({ level: 'silent' }), helloTimeoutMs: 500 });
    session.catch(() => {}); // the stand-in peer never says hello
    const frame = await captured;
    // RFC 6455: a client's frames must be masked (bit 0x80 of byte 1); the key follows the length.
    expect(frame[0]! & 0x0f).toBe(0x2); // binary
    expect(frame[1]! & 0x80).toBe(0x80);
    const short = frame[1]! & 0x7f;
    const keyAt = 2 + (short === 126 ? 2 : short === 127 ? 8 : 0);
    expect([...frame.subarray(keyAt, keyAt + 4)]).toEqual([0, 0, 0, 0]);
    // XOR with zeros is the identity: the payload decodes as it stands.
    const [hello] = new FrameDecoder({ maxPayloadBytes: 1 << 20 }).push(frame.subarray(keyAt + 4));
    expect(hello).toMatchObject({ type: 'hello', agentId: 'mask-test' });
    await expect(session).rejects.toThrow();
  });

  it('relies on ws sending a zero-masked payload as it is: no masking pass, no copy', () => {
    const data = Buffer.alloc(1 << 20, 0xa5);
    const zero = (mask: Uint8Array) => mask.fill(0);
    const frameOf = (generateMask: (mask: Uint8Array) => void) =>
      // ws's Sender is what the client sends with: its frame() says whether data is masked in a copy.
      (ws as unknown as { Sender: { frame(data: Buffer, options: object): Buffer[] } }).Sender.frame(data, {
        fin: true, opcode: 2, mask: true, readOnly: true, rsv1: false, generateMask, maskBuffer: Buffer.alloc(4),
      });
    const zeroMasked = frameOf(zero);
    expect(zeroMasked).toHaveLength(2);
    expect(zeroMasked[1]).toBe(data);
    // A random mask, for contrast: the payload goes out as a masked copy.
    const masked = frameOf((mask) => mask.fill(0x5a));
    expect(masked.some((part) => part === data)).toBe(false);
  });
});
