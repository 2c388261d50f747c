// The baseline for the page stream: raw TCP over loopback between two processes, in the
// same run. A child process receives and counts; this process sends 1 MiB writes.
import { fork } from 'node:child_process';
import { connect, createServer } from 'node:net';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';

const CHUNK = 1 << 20;

if (process.argv[2] === '--receiver') {
  const total = Number(process.argv[3]);
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

/** Sends `totalBytes` over loopback TCP to a child process; returns bytes per second. */
export async function nodeTcpLoopback(totalBytes: number): Promise<number> {
  const child = fork(fileURLToPath(import.meta.url), ['--receiver', String(totalBytes)], { stdio: 'ignore' });
  try {
    const port = await new Promise<number>((resolve) => child.once('message', (m: { port: number }) => resolve(m.port)));
    const socket = connect(port, '127.0.0.1');
    await new Promise((resolve) => socket.once('connect', resolve));
    socket.setNoDelay(true);
    const chunk = Buffer.alloc(CHUNK, 0xa5);
    const started = performance.now();
    const done = new Promise<void>((resolve) => socket.once('data', () => resolve()));
    let sent = 0;
    while (sent < totalBytes) {
      sent += CHUNK;
      if (!socket.write(chunk)) await new Promise((resolve) => socket.once('drain', resolve));
    }
    await done;
    const seconds = (performance.now() - started) / 1000;
    socket.destroy();
    return totalBytes / seconds;
  } finally {
    child.kill();
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
