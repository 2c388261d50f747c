// A VM disk's dirty tracker: QEMU's own dirty bitmap on the disk's node, read over NBD.
//
// Why this way (of the two stock-QEMU ways): QEMU records every write the guest completes in
// a bitmap, and the only way out for a bitmap's content is an NBD export's
// qemu:dirty-bitmap context. The agent then reads the blocks themselves from the raw file
// (the engine's mapping of it, like a memory region): QEMU opens the file without O_DIRECT,
// so every completed write is in the page cache the mapping reads. The guest's writes never
// wait on the agent or the link (a blockdev-mirror into an agent export would put the agent
// in the guest's write path), and the disk goes through the same rounds, convergence,
// dedup, codec and digest as memory.
//
// collect() rotates: one QMP transaction starts the next bitmap and freezes the current one,
// so no write falls between two rounds; the frozen one is exported read-only, its dirty
// extents read with NBD_CMD_BLOCK_STATUS, and it is removed. A write racing with the read
// of its block is in the next bitmap, so the block goes again in the next round; at the
// switchover the VM is stopped (QMP stop drains its I/O) before the last collect.
import { createConnection, type Socket } from 'node:net';
import { NbdClient } from '../nbd/client.js';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import type { DirtyTracker } from '../tracker/dirty-tracker.js';
import { mergeRuns, PageSet } from '../tracker/page-set.js';
import { addDirtyBitmap, addNbdExport, deleteNbdExport, removeDirtyBitmap, rotateDirtyBitmap } from './qmp-block.js';
import type { QmpClient } from './qmp.js';

/** NBD_STATE_DIRTY in a qemu:dirty-bitmap context. */
const NBD_STATE_DIRTY = 1;
const CONNECT_TIMEOUT_MS = 10_000;

export interface QemuDiskTrackerOptions {
  qmp: () => Promise<QmpClient>;
  /** The disk's format node (the device's drive). */
  node: string;
  /** QEMU's NBD server socket (the caller started it). */
  nbdSocketPath: string;
  /** Prefix of this migration's bitmap and export names (gangway's prefix first). */
  namePrefix: string;
  blockBytes: number;
  blockCount: number;
  /** Called once, after close() queued its QMP work. */
  onClosed?: () => void;
}

export class QemuDiskTracker implements DirtyTracker {
  readonly kind = 'qemu-bitmap' as const;
  private generation = 0;
  /** The bitmap recording writes now. */
  private current: string | undefined;
  /** Blocks handed back by remark(): the next collect reports them again. */
  private readonly remarked: PageSet;
  private closed = false;
  /** QMP work in order: close() cannot wait, the next migration's objects queue behind it. */
  private chain: Promise<unknown> = Promise.resolve();

  constructor(private readonly options: QemuDiskTrackerOptions) {
    this.remarked = new PageSet(options.blockCount);
  }

  private nextName(): string {
    return `${this.options.namePrefix}-${this.generation++}`;
  }

  async arm(): Promise<void> {
    const qmp = await this.options.qmp();
    const previous = this.current;
    this.current = this.nextName();
    await addDirtyBitmap(qmp, this.options.node, this.current, this.options.blockBytes);
    if (previous) await removeDirtyBitmap(qmp, this.options.node, previous);
    this.remarked.clear();
  }

  async collect(): Promise<Uint32Array> {
    if (!this.current) throw new GangwayError(ErrorCode.INTERNAL, `disk ${this.options.node}: collect() before arm()`);
    const qmp = await this.options.qmp();
    const frozen = this.current;
    const next = this.nextName();
    await rotateDirtyBitmap(qmp, this.options.node, frozen, next, this.options.blockBytes);
    this.current = next;
    let dirty: Uint32Array;
    try {
      dirty = await this.readBitmap(qmp, frozen);
    } catch (err) {
      // What the frozen bitmap held is not known: every block goes again rather than one lost.
      this.remarked.addRange(0, this.options.blockCount);
      throw err;
    } finally {
      await removeDirtyBitmap(qmp, this.options.node, frozen).catch(() => {});
    }
    const again = this.remarked.toRuns();
    this.remarked.clear();
    return mergeRuns(dirty, again, this.options.blockCount);
  }

  /** The dirty blocks of frozen bitmap `bitmap`, as runs, through an export that carries it. */
  private async readBitmap(qmp: QmpClient, bitmap: string): Promise<Uint32Array> {
    const { node, nbdSocketPath, blockBytes, blockCount } = this.options;
    await addNbdExport(qmp, bitmap, node, [bitmap]);
    let client: NbdClient | undefined;
    try {
      const socket = await connectUnix(nbdSocketPath);
      const context = `qemu:dirty-bitmap:${bitmap}`;
      client = await NbdClient.connect(socket, { exportName: bitmap, metaContexts: [context], connectTimeoutMs: CONNECT_TIMEOUT_MS });
      if (!client.metaContexts.includes(context)) throw new GangwayError(ErrorCode.GUEST_FAILED, `QEMU's NBD export ${bitmap} does not offer ${context}`);
      const sizeBytes = blockCount * blockBytes;
      if (client.sizeBytes < sizeBytes) throw new GangwayError(ErrorCode.GUEST_FAILED, `QEMU's NBD export of ${node} has ${client.sizeBytes} bytes, the disk ${sizeBytes}: was it resized?`);
      const extents = await client.blockStatus(context, 0, sizeBytes);
      const dirty = new PageSet(blockCount);
      let at = 0;
      for (const extent of extents) {
        if (extent.flags & NBD_STATE_DIRTY) {
          // A dirty extent covers every block it touches (QEMU's granularity is the block size, so it does not cut one).
          const first = Math.floor(at / blockBytes);
          const end = Math.min(blockCount, Math.ceil((at + extent.lengthBytes) / blockBytes));
          dirty.addRange(first, end - first);
        }
        at += extent.lengthBytes;
      }
      return dirty.toRuns();
    } finally {
      await client?.close().catch(() => client?.destroy());
      await deleteNbdExport(qmp, bitmap);
    }
  }

  remark(runs: Uint32Array): void {
    this.remarked.addRuns(runs);
  }

  noteSent(): void {}

  /** Removes the bitmap recording now (asynchronously, in order with this QEMU's other QMP work). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    const current = this.current;
    this.current = undefined;
    if (current) {
      this.chain = this.chain
        .then(async () => removeDirtyBitmap(await this.options.qmp(), this.options.node, current))
        .catch(() => {
          // A QEMU that is gone took the bitmap with it; one that is there and kept it is
          // cleaned up when its VM next migrates or its agent restarts (removeGangwayBlockObjects).
        });
    }
    this.options.onClosed?.();
  }

  /** Resolves once close()'s QMP work is done. */
  settled(): Promise<void> {
    return this.chain.then(() => undefined);
  }
}

function connectUnix(path: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = createConnection(path);
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new GangwayError(ErrorCode.TIMEOUT, `QEMU's NBD server at ${path} did not answer within ${CONNECT_TIMEOUT_MS} ms`));
    }, CONNECT_TIMEOUT_MS);
    socket.once('connect', () => {
      clearTimeout(timer);
      resolve(socket);
    });
    socket.once('error', (err) => {
      clearTimeout(timer);
      reject(new GangwayError(ErrorCode.GUEST_FAILED, `cannot reach QEMU's NBD server at ${path}: ${err.message}`));
    });
  });
}
