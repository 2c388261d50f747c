// The QEMU block objects a disk migration makes and removes: dirty bitmaps on a VM's disk
// nodes, the NBD server they are read through, an NBD export per read, and I/O limits on a
// guest that writes its disks faster than the link carries them. Every object
// gangway makes is named with GANGWAY_PREFIX, so an agent that restarts after a crash finds
// and removes what its previous run left (an export or a bitmap left behind makes the next
// migration of the VM fail: libvirt and LXD operators meet that as "duplicate node name").
import { z } from 'zod';
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import { QmpCommandError, type QmpClient } from './qmp.js';

export const GANGWAY_PREFIX = 'gw-';
const EXPORT_GONE_TIMEOUT_MS = 5_000;

const BlockExportsSchema = z.array(z.object({ id: z.string(), 'node-name': z.string(), 'shutting-down': z.boolean() }));
const NamedNodesSchema = z.array(
  z.object({
    'node-name': z.string(),
    'dirty-bitmaps': z.array(z.object({ name: z.string().optional(), busy: z.boolean().optional() })).optional(),
  }),
);

/** A new, enabled bitmap on `node` that tracks writes in `granularityBytes` blocks (not persistent: it dies with QEMU). */
export async function addDirtyBitmap(qmp: QmpClient, node: string, name: string, granularityBytes: number): Promise<void> {
  await qmp.exec('block-dirty-bitmap-add', { node, name, granularity: granularityBytes, persistent: false });
}

/**
 * Atomically (one transaction, no write falls between) starts bitmap `next` and freezes
 * `current`: `current` then holds exactly the writes since it was started, and `next`
 * everything after. A frozen bitmap can be exported read-only.
 */
export async function rotateDirtyBitmap(qmp: QmpClient, node: string, current: string, next: string, granularityBytes: number): Promise<void> {
  await qmp.exec('transaction', {
    actions: [
      { type: 'block-dirty-bitmap-add', data: { node, name: next, granularity: granularityBytes, persistent: false } },
      { type: 'block-dirty-bitmap-disable', data: { node, name: current } },
    ],
  });
}

export async function removeDirtyBitmap(qmp: QmpClient, node: string, name: string): Promise<void> {
  await qmp.exec('block-dirty-bitmap-remove', { node, name });
}

/** Starts QEMU's NBD server on a unix socket (one per QEMU; the exports come and go). */
export async function startNbdServer(qmp: QmpClient, socketPath: string): Promise<void> {
  await qmp.exec('nbd-server-start', { addr: { type: 'unix', data: { path: socketPath } } });
}

/** Stops QEMU's NBD server; a server that is not running is no error. */
export async function stopNbdServer(qmp: QmpClient): Promise<void> {
  try {
    await qmp.exec('nbd-server-stop');
  } catch (err) {
    if (!(err instanceof QmpCommandError && /not running/i.test(err.desc))) throw err;
  }
}

/** A read-only NBD export of `node` named `id` (export name = id), carrying `bitmaps` as qemu:dirty-bitmap:NAME contexts. */
export async function addNbdExport(qmp: QmpClient, id: string, node: string, bitmaps: readonly string[]): Promise<void> {
  await qmp.exec('block-export-add', { type: 'nbd', id, 'node-name': node, name: id, writable: false, bitmaps });
}

/**
 * Removes export `id` (its clients are cut off: mode hard) and waits until QEMU has let it
 * go: until then the bitmaps it carries are busy and cannot be removed.
 */
export async function deleteNbdExport(qmp: QmpClient, id: string): Promise<void> {
  try {
    await qmp.exec('block-export-del', { id, mode: 'hard' });
  } catch (err) {
    if (err instanceof QmpCommandError && /not found|no such|cannot find/i.test(err.desc)) return;
    throw err;
  }
  const deadline = performance.now() + EXPORT_GONE_TIMEOUT_MS;
  for (;;) {
    const exports = BlockExportsSchema.parse(await qmp.exec('query-block-exports'));
    if (!exports.some((e) => e.id === id)) return;
    if (performance.now() > deadline) throw new GangwayError(ErrorCode.TIMEOUT, `QEMU kept NBD export ${id} for ${EXPORT_GONE_TIMEOUT_MS} ms after block-export-del`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}

const BlockInfoSchema = z.array(z.object({ qdev: z.string().optional(), inserted: z.object({ group: z.string().optional() }).passthrough().optional() }).passthrough());
const NO_LIMITS = { bps: 0, bps_rd: 0, bps_wr: 0, iops: 0, iops_rd: 0, iops_wr: 0 };

/**
 * Holds the writes of virtio-blk device `device` (its qdev id) to `bytesPerSec`, in a
 * throttle group of gangway's own name (so a restarted agent knows the limit for its own and
 * lifts it). The limit is on the device's block backend, which QEMU names by its QOM path.
 */
export async function limitDeviceWrites(qmp: QmpClient, device: string, bytesPerSec: number): Promise<void> {
  await qmp.exec('block_set_io_throttle', {
    id: `/machine/peripheral/${device}/virtio-backend`,
    ...NO_LIMITS,
    bps_wr: Math.max(1, Math.floor(bytesPerSec)),
    group: `${GANGWAY_PREFIX}throttle-${device}`,
  });
}

/** Lifts every I/O limit gangway set in this QEMU (those in its throttle groups); returns the devices. */
export async function liftGangwayLimits(qmp: QmpClient): Promise<string[]> {
  const devices = BlockInfoSchema.parse(await qmp.exec('query-block'))
    .filter((b) => b.qdev && b.inserted?.group?.startsWith(GANGWAY_PREFIX))
    .map((b) => b.qdev!);
  for (const device of devices) await qmp.exec('block_set_io_throttle', { id: device, ...NO_LIMITS });
  return devices;
}

/** gangway's block objects in this QEMU: its exports and its dirty bitmaps (by node). */
export async function gangwayBlockObjects(qmp: QmpClient): Promise<{ exports: string[]; bitmaps: { node: string; name: string }[]; limited: string[] }> {
  const exports = BlockExportsSchema.parse(await qmp.exec('query-block-exports'))
    .map((e) => e.id)
    .filter((id) => id.startsWith(GANGWAY_PREFIX));
  const nodes = NamedNodesSchema.parse(await qmp.exec('query-named-block-nodes', { flat: true }));
  const bitmaps = nodes.flatMap((node) =>
    (node['dirty-bitmaps'] ?? []).filter((b) => b.name?.startsWith(GANGWAY_PREFIX)).map((b) => ({ node: node['node-name'], name: b.name! })),
  );
  const limited = BlockInfoSchema.parse(await qmp.exec('query-block'))
    .filter((b) => b.qdev && b.inserted?.group?.startsWith(GANGWAY_PREFIX))
    .map((b) => b.qdev!);
  return { exports, bitmaps, limited };
}

/**
 * Removes every block object gangway made in this QEMU (exports, then the bitmaps they held,
 * then the NBD server): what a migration that ended, failed, or whose agent died left.
 * Returns what it removed.
 */
export async function removeGangwayBlockObjects(qmp: QmpClient): Promise<{ exports: string[]; bitmaps: string[]; limited: string[] }> {
  const found = await gangwayBlockObjects(qmp);
  for (const id of found.exports) await deleteNbdExport(qmp, id);
  await stopNbdServer(qmp);
  for (const { node, name } of found.bitmaps) await removeDirtyBitmap(qmp, node, name);
  const limited = await liftGangwayLimits(qmp);
  return { exports: found.exports, bitmaps: found.bitmaps.map((b) => b.name), limited };
}

/** The names of the block nodes QEMU has (query-named-block-nodes). */
export async function blockNodeNames(qmp: QmpClient): Promise<Set<string>> {
  return new Set(NamedNodesSchema.parse(await qmp.exec('query-named-block-nodes', { flat: true })).map((node) => node['node-name']));
}

/**
 * A drive that reads and writes through NBD client node `exportNode` goes to the file at
 * `path` instead: a file node `fileNode` is added, the raw format node `formatNode` (the
 * device's drive) is reopened on it (blockdev-reopen drains the requests in flight first:
 * none is lost), and the NBD node is deleted. The guest runs on throughout. A drive already
 * on its file is left alone; false then.
 */
export async function switchDiskToFile(qmp: QmpClient, nodes: { file: string; format: string; export: string }, path: string): Promise<boolean> {
  let names = await blockNodeNames(qmp);
  if (!names.has(nodes.export)) return false;
  // A switch cut short (the agent died between its steps) left the file node: it is reused.
  if (!names.has(nodes.file)) {
    await qmp.exec('blockdev-add', { driver: 'file', 'node-name': nodes.file, filename: path, cache: { direct: false }, discard: 'unmap' });
  }
  await qmp.exec('blockdev-reopen', { options: [{ driver: 'raw', 'node-name': nodes.format, file: nodes.file, discard: 'unmap' }] });
  await qmp.exec('blockdev-del', { 'node-name': nodes.export });
  names = await blockNodeNames(qmp);
  if (names.has(nodes.export)) throw new GangwayError(ErrorCode.GUEST_FAILED, `QEMU kept node ${nodes.export} after blockdev-del`);
  return true;
}
