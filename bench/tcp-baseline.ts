// The baseline for the page stream: raw TCP over loopback between two Node processes
// (started with the agents' Node flags, so both sides run alike), the same over mutual TLS
// 1.3 (node:tls, the OpenSSL the agents' channels use: what TLS itself costs on this host),
// and iperf3 where installed. A receiver child counts bytes; a sender child writes 1 MiB
// chunks and reports the rate once the receiver has everything.
import { fork, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { connect, createServer, type Socket } from 'node:net';
import { connect as tlsConnect, createServer as createTlsServer } from 'node:tls';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import { AGENT_NODE_FLAGS } from '../agent/node-flags.js';

const CHUNK = 1 << 20;
const self = fileURLToPath(import.meta.url);

/** Certificate, key and CA files (PEM) of one end of the TLS baseline. */
export interface TlsFiles {
  cert: string;
  key: string;
  ca: string;
}

const tlsOptions = (files: TlsFiles) => ({
  cert: readFileSync(files.cert),
  key: readFileSync(files.key),
  ca: readFileSync(files.ca),
  minVersion: 'TLSv1.3' as const,
});

async function receiver(total: number, tls?: TlsFiles): Promise<void> {
  const count = (socket: Socket) => {
    let got = 0;
    socket.on('data', (data: Buffer) => {
      got += data.length;
      if (got >= total) socket.end('done');
    });
  };
  const server = tls ? createTlsServer({ ...tlsOptions(tls), requestCert: true, rejectUnauthorized: true }, count) : createServer(count);
  server.listen(0, '127.0.0.1', () => {
    const address = server.address();
    process.send!({ port: typeof address === 'object' && address ? address.port : 0 });
  });
  process.on('disconnect', () => process.exit(0));
}

async function sender(total: number, port: number, tls?: TlsFiles): Promise<void> {
  const socket = tls ? tlsConnect({ ...tlsOptions(tls), host: '127.0.0.1', port }) : connect(port, '127.0.0.1');
  await new Promise((resolve) => socket.once(tls ? 'secureConnect' : 'connect', resolve));
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

const tlsArg = (at: number): TlsFiles | undefined => (process.argv[at] ? (JSON.parse(process.argv[at]!) as TlsFiles) : undefined);
if (process.argv[2] === '--receiver') await receiver(Number(process.argv[3]), tlsArg(4));
if (process.argv[2] === '--sender') await sender(Number(process.argv[3]), Number(process.argv[4]), tlsArg(5));

/**
 * Sends `totalBytes` over loopback TCP between two child processes; returns bytes per second.
 * With `tls` (the receiver's and the sender's files), over mutual TLS 1.3.
 */
export async function nodeTcpLoopback(totalBytes: number, tls?: { receiver: TlsFiles; sender: TlsFiles }): Promise<number> {
  const execArgv = [...AGENT_NODE_FLAGS];
  const rx = fork(self, ['--receiver', String(totalBytes), ...(tls ? [JSON.stringify(tls.receiver)] : [])], { stdio: 'ignore', execArgv });
  try {
    const { port } = await messageOf<{ port: number }>(rx, 'the receiver');
    const tx = fork(self, ['--sender', String(totalBytes), String(port), ...(tls ? [JSON.stringify(tls.sender)] : [])], { stdio: 'ignore', execArgv });
    try {
      const { bytesPerSec } = await messageOf<{ bytesPerSec: number }>(tx, 'the sender');
      return bytesPerSec;
    } finally {
      tx.kill();
    }
  } finally {
    rx.kill();
  }
}

/** The child's first message; rejects if it exits first (a failed handshake, say) instead of waiting for good. */
function messageOf<T>(child: ChildProcess, who: string): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const exited = (code: number | null) => reject(new Error(`${who} of the loopback baseline exited (code ${code}) before it reported`));
    child.once('exit', exited);
    child.once('message', (message) => {
      child.off('exit', exited);
      resolve(message as T);
    });
  });
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
