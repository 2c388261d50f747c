// The baseline for the page stream: raw TCP over loopback between two Node processes
// (started with the agents' Node flags, so both sides run alike), and iperf3 where
// installed. A receiver child counts bytes; a sender child writes 1 MiB chunks and reports
// the rate once the receiver has everything.
import { fork } from 'node:child_process';
import { connect, createServer } from 'node:net';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import { AGENT_NODE_FLAGS } from '../agent/local-agent.js';

const CHUNK = 1 << 20;
const self = fileURLToPath(import.meta.url);

async function receiver(total: number): Promise<void> {
  const server = createServer((socket) => {
    let got = 0;
    socket.on('data', (data) => {
      got += data.length;
      if (got >= total) socket.end('done');
    });
  });
  server.listen(0, '127.0.0.1', () => {
    const address = server.address();
    process.send!({ port: typeof address === 'object' && address ? address.port : 0 });
  });
  process.on('disconnect', () => process.exit(0));
}

async function sender(total: number, port: number): Promise<void> {
  const socket = connect(port, '127.0.0.1');
  await new Promise((resolve) => socket.once('connect', resolve));
  socket.setNoDelay(true);
  const chunk = Buffer.alloc(CHUNK, 0xa5);
  const started = performance.now();
  const done = new Promise<void>((resolve) => socket.once('data', () => resolve()));
  for (let sent = 0; sent < total; sent += CHUNK) {
    if (!socket.write(chunk)) await new Promise((resolve) => socket.once('drain', resolve));
  }
  await done;
  process.send!({ bytesPerSec: total / ((performance.now() - started) / 1000) });
  socket.destroy();
  process.disconnect();
}

if (process.argv[2] === '--receiver') await receiver(Number(process.argv[3]));
if (process.argv[2] === '--sender') await sender(Number(process.argv[3]), Number(process.argv[4]));

/** Sends `totalBytes` over loopback TCP between two child processes; returns bytes per second. */
export async function nodeTcpLoopback(totalBytes: number): Promise<number> {
  const execArgv = [...AGENT_NODE_FLAGS];
  const rx = fork(self, ['--receiver', String(totalBytes)], { stdio: 'ignore', execArgv });
  try {
    const { port } = await new Promise<{ port: number }>((resolve) => rx.once('message', resolve as never));
    const tx = fork(self, ['--sender', String(totalBytes), String(port)], { stdio: 'ignore', execArgv });
    const { bytesPerSec } = await new Promise<{ bytesPerSec: number }>((resolve) => tx.once('message', resolve as never));
    tx.kill();
    return bytesPerSec;
  } finally {
    rx.kill();
  }
}

/** iperf3 over loopback for `seconds`, if installed; bytes per second, or undefined. */
export async function iperf3Loopback(seconds: number): Promise<number | undefined> {
  const which = await execa('which', ['iperf3'], { reject: false });
  if (which.exitCode !== 0) return undefined;
  const port = 15201 + Math.floor(Math.random() * 1000);
  const server = execa('iperf3', ['-s', '-1', '-p', String(port), '-B', '127.0.0.1'], { reject: false });
  try {
    await new Promise((resolve) => setTimeout(resolve, 300));
    const client = await execa('iperf3', ['-c', '127.0.0.1', '-p', String(port), '-t', String(seconds), '-J'], { reject: false, timeout: (seconds + 10) * 1000 });
    if (client.exitCode !== 0) return undefined;
    const report = JSON.parse(client.stdout) as { end?: { sum_received?: { bits_per_second?: number } } };
    const bits = report.end?.sum_received?.bits_per_second;
    return bits ? bits / 8 : undefined;
  } finally {
    server.kill();
  }
}
