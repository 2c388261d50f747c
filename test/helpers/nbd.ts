// NBD test plumbing: an in-memory export, our server on a unix socket in a temp dir, a
// raw socket for speaking bytes at it, and cleanup that runs also when a test failed.
import { mkdtempSync, rmSync } from 'node:fs';
import { type Server, type Socket, createConnection, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NbdClient, type NbdClientOptions } from '../../agent/nbd/client.js';
import type { Extent, NbdExport } from '../../agent/nbd/export.js';
import { NbdServer, type NbdServerOptions } from '../../agent/nbd/server.js';
import { AllocationFlag, BASE_ALLOCATION } from '../../protocol/nbd/index.js';

/** An export held in a Buffer; `delayMs(offset)` makes chosen requests slow (to reorder replies). */
export class MemoryExport implements NbdExport {
  readonly data: Buffer;
  readonly sizeBytes: number;
  readonly metaContexts: readonly string[];
  reads = 0;
  inFlight = 0;
  maxInFlightSeen = 0;
  dirty: Extent[] | undefined;

  constructor(
    readonly name: string,
    sizeBytes: number,
    readonly options: { readOnly?: boolean; minBlockBytes?: number; delayMs?: (offset: number) => number; dirtyBitmap?: string } = {},
  ) {
    this.sizeBytes = sizeBytes;
    this.data = Buffer.alloc(sizeBytes);
    this.metaContexts = options.dirtyBitmap === undefined ? [] : [`qemu:dirty-bitmap:${options.dirtyBitmap}`];
  }

  get readOnly(): boolean {
    return this.options.readOnly ?? false;
  }

  get minBlockBytes(): number | undefined {
    return this.options.minBlockBytes;
  }

  async #slow<T>(offset: number, f: () => T): Promise<T> {
    this.inFlight++;
    this.maxInFlightSeen = Math.max(this.maxInFlightSeen, this.inFlight);
    try {
      const ms = this.options.delayMs?.(offset) ?? 0;
      await new Promise((r) => setTimeout(r, ms));
      return f();
    } finally {
      this.inFlight--;
    }
  }

  read(offset: number, length: number): Promise<Buffer> {
    this.reads++;
    return this.#slow(offset, () => Buffer.from(this.data.subarray(offset, offset + length)));
  }

  write = (offset: number, data: Buffer): Promise<void> => this.#slow(offset, () => void data.copy(this.data, offset));

  writeZeroes = (offset: number, length: number): Promise<void> => this.#slow(offset, () => void this.data.fill(0, offset, offset + length));

  trim = (offset: number, length: number): Promise<void> => this.#slow(offset, () => void this.data.fill(0, offset, offset + length));

  flush = (): Promise<void> => this.#slow(0, () => undefined);

  async blockStatus(context: string, offset: number, length: number): Promise<Extent[]> {
    if (context === BASE_ALLOCATION) {
      // 4 KiB granules: zero ones are holes.
      const out: Extent[] = [];
      for (let at = offset; at < offset + length; ) {
        const next = Math.min(offset + length, (Math.floor(at / 4096) + 1) * 4096);
        const zero = this.data.subarray(at, next).every((b) => b === 0);
        const flags = zero ? AllocationFlag.hole | AllocationFlag.zero : 0;
        const last = out.at(-1);
        if (last?.flags === flags) last.lengthBytes += next - at;
        else out.push({ lengthBytes: next - at, flags });
        at = next;
      }
      return out;
    }
    // `dirty` describes the export from offset 0: the part from `offset` on is answered.
    const out: Extent[] = [];
    let at = 0;
    for (const e of this.dirty ?? [{ lengthBytes: this.sizeBytes, flags: 0 }]) {
      const start = Math.max(at, offset);
      if (at + e.lengthBytes > start) out.push({ lengthBytes: at + e.lengthBytes - start, flags: e.flags });
      at += e.lengthBytes;
    }
    return out;
  }
}

export interface Served {
  dir: string;
  socketPath: string;
  server: NbdServer;
  listener: Server;
  connect(options: NbdClientOptions): Promise<NbdClient>;
  raw(): Promise<Socket>;
  close(): Promise<void>;
}

/** Our server on a unix socket in a fresh temp dir; close() tears everything down. */
export async function serve(options: NbdServerOptions): Promise<Served> {
  const dir = mkdtempSync(join(tmpdir(), 'gangway-nbd-'));
  const socketPath = join(dir, 'nbd.sock');
  const server = new NbdServer(options);
  const sockets = new Set<Socket>();
  const clients = new Set<NbdClient>();
  const listener = createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    server.handle(socket);
  });
  await new Promise<void>((resolve) => listener.listen(socketPath, resolve));
  const raw = () =>
    new Promise<Socket>((resolve, reject) => {
      const s = createConnection({ path: socketPath });
      sockets.add(s);
      // Flowing, so a FIN from the server is seen (a test that wants a client that does not read pauses it).
      s.once('connect', () => resolve(s.resume()));
      s.once('error', reject);
    });
  return {
    dir,
    socketPath,
    server,
    listener,
    raw,
    async connect(clientOptions) {
      const client = await NbdClient.connect(await raw(), clientOptions);
      clients.add(client);
      return client;
    },
    async close() {
      // Every socket first: the listener's close waits for its connections to end.
      for (const c of clients) c.destroy();
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => listener.close(() => resolve()));
      await server.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Collects everything a socket receives; `until` waits (bounded) for a condition on it. */
export function collect(socket: Socket): { bytes: () => Buffer; ended: () => boolean; until(what: string, probe: (b: Buffer) => boolean, timeoutMs?: number): Promise<Buffer> } {
  const chunks: Buffer[] = [];
  let ended = false;
  socket.on('data', (c: Buffer) => chunks.push(c));
  socket.on('close', () => (ended = true));
  socket.on('error', () => (ended = true));
  const bytes = () => Buffer.concat(chunks);
  return {
    bytes,
    ended: () => ended,
    async until(what, probe, timeoutMs = 5_000) {
      const deadline = performance.now() + timeoutMs;
      while (!probe(bytes())) {
        if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}; got ${bytes().length} bytes, ended=${ended}`);
        await new Promise((r) => setTimeout(r, 5));
      }
      return bytes();
    },
  };
}
