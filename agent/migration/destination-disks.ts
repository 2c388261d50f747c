// The disks that arrive at the destination (their blocks come as any region's pages): their
// blocks to stable storage between rounds and before the source drops its copy, the names
// they got (removed again if the guest then fails to start here), and post-copy's export of
// them. A guest that starts here while some of its disks' blocks are still at the source reads
// and writes them through an NBD server of this agent, an export per disk (postcopy-disk.ts),
// until the disks are complete here and its drives are switched to their files; a switch that
// fails leaves the exports serving the guest until it exits.
import { closeSync, fdatasync, fsyncSync, openSync, rmSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { dirname } from 'node:path';
import { promisify } from 'node:util';
import type { Logger } from 'pino';
import type { HostedGuest, StandbyGuest } from '../guest/adapter.js';
import type { AgentMetrics } from '../metrics.js';
import type { NativeAddon } from '../native.js';
import { NbdServer } from '../nbd/server.js';
import type { IncomingRegion } from './destination-types.js';
import { PostcopyDisk } from './postcopy-disk.js';

/** What the destination's disks need of the migration. */
export interface DestinationDisksContext {
  readonly native: NativeAddon;
  readonly log: Logger;
  readonly metrics: AgentMetrics | undefined;
  /** The regions that are disks, and where each one's file is named. */
  readonly diskPaths: ReadonlyMap<number, string>;
  /** Region i's name in the offer (a disk's export goes by it). */
  readonly regionNames: readonly string[];
  /** The unix socket for the exports, for a guest kind whose drives can read them; undefined for one that cannot. */
  readonly exportSocket: (() => string) | undefined;
  /** The guest's regions as this side holds them. */
  regions(): readonly IncomingRegion[];
  /** The guest as this agent hosts it, once it runs here (it throws before). */
  hostedGuest(): HostedGuest;
  /** Resolves once the guest's process here exits. */
  guestExited(): Promise<number | null>;
}

export class DestinationDisks {
  private flushing: Promise<void> = Promise.resolve();
  /** Disks named at the commit: they go again if the guest then fails to start here. */
  private readonly linkedDisks: string[] = [];
  /** Post-copy of disks: each arriving disk's export, by region, which the guest reads and writes through until the switch to its file. */
  private readonly diskExports = new Map<number, PostcopyDisk>();
  /** The NBD server of those exports, on a unix socket the guest's drives connect to. */
  private diskServer: { nbd: NbdServer; listener: Server; socket: string } | undefined;
  /** The switch to the disks' files failed: the exports serve the guest until it exits. */
  private disksServedToEnd = false;

  constructor(private readonly ctx: DestinationDisksContext) {}

  /** The switch to the disks' files failed: the exports serve the guest (and keep the disks' files open) until it exits. */
  get servedToEnd(): boolean {
    return this.disksServedToEnd;
  }

  /** Region `index`'s export, when it is a disk the guest reaches through this agent. */
  exportOf(index: number): PostcopyDisk | undefined {
    return this.diskExports.get(index);
  }

  /** Region `index`'s file got its name: a disk's is removed again if the guest then fails to start here. */
  linked(index: number): void {
    const path = this.ctx.diskPaths.get(index);
    if (path !== undefined) this.linkedDisks.push(path);
  }

  /** The guest did not start here: the disks that arrived go, the source's copy is the guest's (shared ones are not touched). */
  removeLinked(): void {
    for (const path of this.linkedDisks) rmSync(path, { force: true });
  }

  /** fdatasync of every disk region, after any flush already under way; rejects if one fails. */
  flush(): Promise<void> {
    const fds = this.ctx.regions().filter((region) => region.disk).map((region) => region.fd);
    if (fds.length === 0) return Promise.resolve();
    const flushed = this.flushing
      .catch(() => {})
      .then(() => fdatasyncAll(fds));
    this.flushing = flushed;
    return flushed;
  }

  /** The disks' files `fds` on stable storage, after any flush under way, and the names they got with them. */
  async toStableStorage(fds: readonly number[]): Promise<void> {
    await this.flushing.catch(() => {});
    await fdatasyncAll(fds);
    for (const dir of new Set(this.linkedDisks.map((path) => dirname(path)))) syncDirectory(dir);
  }

  /**
   * Post-copy of disks: an export per arriving disk and their NBD server, listening before
   * the guest starts (its drives connect as it opens them). The path, or undefined without disks.
   */
  serve(): string | undefined {
    const { ctx } = this;
    if (ctx.diskPaths.size === 0 || !ctx.exportSocket) return undefined;
    for (const index of ctx.diskPaths.keys()) {
      this.diskExports.set(index, new PostcopyDisk(ctx.regionNames[index]!, ctx.regions()[index]!, ctx.native, ctx.metrics));
    }
    const socket = ctx.exportSocket();
    rmSync(socket, { force: true });
    const nbd = new NbdServer({ exports: [...this.diskExports.values()] });
    const listener = createServer((connection) => {
      if (!nbd.handle(connection)) connection.destroy();
    });
    listener.on('error', (err) => ctx.log.error({ err: err.message, socket }, "the disks' NBD server failed"));
    // Bound at once (listen on a path binds before it returns): the guest may connect right away.
    listener.listen(socket);
    this.diskServer = { nbd, listener, socket };
    return socket;
  }

  /** A hybrid that ended by stop-and-copy: its guest's drives are the exports, complete. */
  openComplete(): void {
    for (const disk of this.diskExports.values()) disk.openComplete();
  }

  /** Stops serving the disks (their requests waiting for blocks fail) and removes the socket. */
  close(): void {
    const server = this.diskServer;
    if (!server) return;
    this.diskServer = undefined;
    for (const disk of this.diskExports.values()) disk.close();
    server.listener.close();
    void server.nbd.close().catch(() => {});
    rmSync(server.socket, { force: true });
  }

  /**
   * The disks are complete here (post-copy's end, or a hybrid's stop-and-copy commit): on
   * stable storage with their names, then the guest's drives switched from the exports to
   * the files. A switch that fails leaves the exports serving the guest for as long as it
   * runs (it is not stopped for it), and says so.
   */
  async complete(): Promise<void> {
    const disks = this.ctx.regions().filter((region) => region.disk);
    if (disks.length === 0) return;
    await this.toStableStorage(disks.map((region) => region.fd));
    await this.useLocalDisks(disks.map((region) => region.fd));
  }

  /**
   * A stop-and-copy commit's disks are complete before the guest runs: its drives go to the
   * files then, before it starts, so that this agent dying after the start cannot leave the
   * guest with drives whose server is gone (its I/O would fail: chaos seed 7019). One try; a
   * switch QEMU refuses there is made again once the guest runs (useLocalDisks), as before.
   */
  async switchBeforeStart(standby: StandbyGuest): Promise<void> {
    if (!this.diskServer || !standby.useLocalDisks) return;
    try {
      const switched = await standby.useLocalDisks();
      this.ctx.log.info({ disks: switched }, "the guest's disks are complete here: it starts on their files");
      this.close();
    } catch (err) {
      this.ctx.log.warn({ err: (err as Error).message }, "the guest's drives could not be switched to its disks' files before it starts: they are switched once it runs");
    }
  }

  /** Switches the guest's drives to the disks' files; on failure `fds` (the disks') stay open for the exports until the guest exits. */
  async useLocalDisks(fds: readonly number[]): Promise<void> {
    if (!this.diskServer) return;
    let lastError: unknown;
    for (let attempt = 1; attempt <= 3; attempt++) {
      try {
        const guest = this.ctx.hostedGuest();
        const switched = (await guest.useLocalDisks?.()) ?? 0;
        this.ctx.log.info({ disks: switched }, "the guest's disks are complete here: it uses their files directly");
        this.close();
        return;
      } catch (err) {
        lastError = err;
        await new Promise((resolve) => setTimeout(resolve, 200 * attempt));
      }
    }
    this.disksServedToEnd = true;
    this.ctx.log.error(
      { err: (lastError as Error)?.message, socket: this.diskServer.socket },
      "the guest's drives could not be switched to its disks' files: this agent serves them until the guest exits",
    );
    void this.ctx.guestExited().then(() => {
      this.close();
      for (const fd of fds) {
        try {
          closeSync(fd);
        } catch {}
      }
    });
  }
}

/** fdatasync of each file, on the thread pool; rejects if one fails. */
async function fdatasyncAll(fds: readonly number[]): Promise<void> {
  await Promise.all(fds.map((fd) => promisify(fdatasync)(fd)));
}

/** fsync of a directory: a name just made in it survives a crash. */
function syncDirectory(dir: string): void {
  const fd = openSync(dir, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}
