// The disk of gangway-testvm, the multiboot test kernel, on the host side: writes the base
// image the kernel expects at boot (gw.disk_base blocks of base content, zeros after them),
// sparse. The bytes come from the addon's testvmDiskBlocks, which runs the kernel's own
// generator (native/src/guest-content.h gw_disk_block), so a base image written here is
// exactly what the kernel's checks expect; base content depends on the image seed only, so
// the disks of VMs cloned from one base image hold the same blocks.
import { closeSync, ftruncateSync, openSync, rmSync, writeSync } from 'node:fs';
import { loadNative } from '../native.js';

/** The kernel works on its disk in blocks of this many bytes (8 sectors). */
export const TESTVM_DISK_BLOCK_BYTES = 4096;
/** Blocks the kernel keeps a version for (its table's room, 12-16 MiB of its RAM): the first 4 GiB of a disk. */
export const TESTVM_DISK_MAX_BLOCKS = 1 << 20;
/** Blocks generated per batch: 1 MiB. */
const BATCH_BLOCKS = 256;

export interface TestvmBaseImageOptions {
  /** The image file's size: a multiple of 4096 (the disk's capacity as the kernel sees it). */
  sizeBytes: number;
  /** Blocks 0..baseBlocks-1 get base content: the kernel's gw.disk_base. */
  baseBlocks: number;
  /** The kernel's gw.image_seed. */
  imageSeed: bigint;
}

export interface TestvmBaseImage {
  /** Base blocks written (the base image's non-zero blocks). */
  dataBlocks: number;
  /** Base blocks that are zero, left as holes like every block after the base. */
  zeroBlocks: number;
}

/**
 * Creates (or replaces) the raw image `path` of `sizeBytes`: base content in its first
 * `baseBlocks` blocks, zeros elsewhere. Only non-zero blocks are written, so everything else
 * is a hole. A file that cannot be written completely is removed, never left half written.
 */
export function writeTestvmBaseImage(path: string, options: TestvmBaseImageOptions): TestvmBaseImage {
  const { sizeBytes, baseBlocks, imageSeed } = options;
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % TESTVM_DISK_BLOCK_BYTES !== 0) {
    throw new RangeError(`testvm base image: sizeBytes ${sizeBytes} is not a positive multiple of ${TESTVM_DISK_BLOCK_BYTES}`);
  }
  if (!Number.isSafeInteger(baseBlocks) || baseBlocks < 0 || baseBlocks * TESTVM_DISK_BLOCK_BYTES > sizeBytes) {
    throw new RangeError(`testvm base image: ${baseBlocks} base blocks do not fit in ${sizeBytes} bytes`);
  }
  if (baseBlocks > TESTVM_DISK_MAX_BLOCKS) {
    throw new RangeError(`testvm base image: ${baseBlocks} base blocks; the kernel keeps versions for ${TESTVM_DISK_MAX_BLOCKS} at most`);
  }
  const native = loadNative();
  const fd = openSync(path, 'w', 0o644);
  let complete = false;
  try {
    ftruncateSync(fd, sizeBytes);
    const versions = new Uint32Array(BATCH_BLOCKS); // version 0: the base image
    const out = Buffer.alloc(BATCH_BLOCKS * TESTVM_DISK_BLOCK_BYTES);
    const zero = new Uint8Array(BATCH_BLOCKS);
    let dataBlocks = 0;
    for (let first = 0; first < baseBlocks; first += BATCH_BLOCKS) {
      const count = Math.min(BATCH_BLOCKS, baseBlocks - first);
      native.testvmDiskBlocks(0n, imageSeed, baseBlocks, first, versions.subarray(0, count), out, zero);
      // One write per run of non-zero blocks.
      for (let i = 0; i < count; ) {
        if (zero[i]) {
          i++;
          continue;
        }
        let end = i + 1;
        while (end < count && !zero[end]) end++;
        writeAll(fd, out.subarray(i * TESTVM_DISK_BLOCK_BYTES, end * TESTVM_DISK_BLOCK_BYTES), (first + i) * TESTVM_DISK_BLOCK_BYTES);
        dataBlocks += end - i;
        i = end;
      }
    }
    complete = true;
    return { dataBlocks, zeroBlocks: baseBlocks - dataBlocks };
  } finally {
    closeSync(fd);
    if (!complete) rmSync(path, { force: true });
  }
}

function writeAll(fd: number, data: Buffer, position: number): void {
  for (let done = 0; done < data.length; ) {
    done += writeSync(fd, data, done, data.length - done, position + done);
  }
}
