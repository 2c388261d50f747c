import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ControlClient } from '../../agent/control/client.js';

// An HTTP server in another process on the state dir's socket, closing idle connections after 2 s (it tells the client so: Keep-Alive: timeout=2).
const SERVER = `
const { createServer } = require('node:http');
let connections = 0;
const server = createServer((_req, res) => res.end(JSON.stringify({ connections })));
server.keepAliveTimeout = 2000;
server.on('connection', () => connections++);
server.listen(process.argv[1]);
`;

describe('ControlClient', () => {
  let server: ChildProcess | undefined;
  let dir: string | undefined;
  afterEach(() => {
    server?.kill();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('gets an answer after the agent closed an idle connection while this process was busy', async () => {
    dir = mkdtempSync(join(tmpdir(), 'gangway-client-'));
    const socketPath = join(dir, 'control.sock');
    server = spawn(process.execPath, ['-e', SERVER, socketPath], { stdio: 'ignore' });
    for (let i = 0; i < 100 && !existsSync(socketPath); i++) await new Promise((resolve) => setTimeout(resolve, 50));
    const client = new ControlClient(dir);
    expect(await client.call('GET', '/v1/status')).toEqual({ connections: 1 });
    // Busy past the server's keep-alive timeout: its FIN goes unread until the next request.
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 3500);
    expect(await client.call('POST', '/v1/guests', { name: 'x'.repeat(100) })).toEqual({ connections: 2 });
  });
});
