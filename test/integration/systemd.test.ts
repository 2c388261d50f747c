// sd_notify as systemd sees it: a test NOTIFY_SOCKET (a unix datagram socket, read by a
// small python3 receiver: Node has no datagram sockets) gets READY=1, then watchdog pings,
// then STOPPING=1 on SIGTERM, in that order.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execSync } from 'node:child_process';
import { afterEach, describe, expect, it } from 'vitest';
import { startLocalAgent, type LocalAgent } from '../../agent/local-agent.js';
import { builtAgent, mainJs } from '../helpers/cluster.js';
import { waitFor } from '../helpers/wait.js';

const RECEIVER = `
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
print("bound", flush=True)
while True:
    data = s.recv(4096)
    print(json.dumps(data.decode()), flush=True)
`;

function commandWorks(command: string): boolean {
  try {
    execSync(command, { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

const hasPython = commandWorks('python3 -c "import socket"');
const hasAnalyze = commandWorks('systemd-analyze --version');

describe.skipIf(!hasAnalyze)('the shipped unit file', () => {
  it('passes systemd-analyze verify', () => {
    const unit = join(import.meta.dirname, '..', '..', 'agent', 'systemd', 'gangway-agent.service');
    expect(() => execSync(`systemd-analyze verify ${unit}`, { stdio: 'pipe' })).not.toThrow();
  });
});

describe('sdNotify', () => {
  it('names the socket and the errno when nothing listens', async () => {
    const { loadNative } = await import('../../agent/native.js');
    expect(() => loadNative().sdNotify('/tmp/gangway-no-such-notify.sock', 'READY=1')).toThrow(/gangway-no-such-notify.sock.*ENOENT/);
  });
});

describe.skipIf(!builtAgent || !hasPython)('systemd notification', () => {
  const cleanups: (() => void | Promise<void>)[] = [];
  afterEach(async () => {
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
  });

  it('sends READY=1, WATCHDOG=1 pings and STOPPING=1, in order', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'gangway-sd-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const socketPath = join(dir, 'notify.sock');
    const receiver: ChildProcess = spawn('python3', ['-c', RECEIVER, socketPath], { stdio: ['ignore', 'pipe', 'inherit'] });
    cleanups.push(() => void receiver.kill('SIGKILL'));
    const lines: string[] = [];
    let raw = '';
    receiver.stdout!.on('data', (chunk: Buffer) => {
      raw += chunk.toString();
      const parts = raw.split('\n');
      raw = parts.pop()!;
      lines.push(...parts);
    });
    await waitFor('the receiver to bind', () => lines[0] === 'bound');

    const agent: LocalAgent = await startLocalAgent({
      stateDir: join(dir, 'state'),
      mainPath: mainJs,
      env: { NOTIFY_SOCKET: socketPath, WATCHDOG_USEC: '200000' },
    });
    cleanups.push(() => agent.kill());
    const messages = () => lines.slice(1).map((line) => JSON.parse(line) as string);
    await waitFor('READY=1', () => messages().some((m) => m.includes('READY=1')));
    await waitFor('three watchdog pings', () => messages().filter((m) => m === 'WATCHDOG=1').length >= 3, 5_000);
    await agent.stop();
    await waitFor('STOPPING=1', () => messages().some((m) => m.startsWith('STOPPING=1')), 5_000);

    const sequence = messages();
    const ready = sequence.findIndex((m) => m.includes('READY=1'));
    const firstPing = sequence.indexOf('WATCHDOG=1');
    const stopping = sequence.findIndex((m) => m.startsWith('STOPPING=1'));
    expect(ready).toBeGreaterThanOrEqual(0);
    expect(firstPing).toBeGreaterThan(ready);
    expect(stopping).toBeGreaterThan(firstPing);
    expect(sequence[ready]).toMatch(new RegExp(`STATUS=listening on ${agent.listen.replace(/\./g, '\\.')}`));
    expect(sequence[ready]).toMatch(new RegExp(`MAINPID=${agent.pid}`));
    // No ping after STOPPING.
    expect(sequence.slice(stopping + 1)).not.toContain('WATCHDOG=1');
  });
});
