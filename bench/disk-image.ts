// A test kernel's disk image as bench:disk gives it to a VM: the shared base image
// (agent/guest/testvm-disk.ts writeTestvmBaseImage, what the kernel checks from boot), then
// data of the VM's own (pseudo-random, seeded per VM, so neither dedup nor compression finds
// anything in it) in the blocks after the base, and holes everywhere else.
//
// The kernel (native/testvm/disk.c) checks only its base blocks and the blocks it wrote
// itself (must_check), so the VM's own data beyond the base is never checked, with one
// exception: a block of its hot set is read back before each rewrite and must then hold
// zeros (version 0 beyond the base). Those blocks are left out of the VM's own data. Which
// they are is the kernel's function of gw.seed and the disk's size (disk_setup: hot block j
// is (hot_a * j + hot_b) % blocks), computed here with the kernel's own hash
// (native/src/guest-content.h gw_mix64, gw_hash3, gw_coprime). The kernel would say a wrong
// guess at once: its rewrite of such a block counts it stale (status disk.staleBlocks).
import { createCipheriv } from 'node:crypto';
import { closeSync, openSync, writeSync } from 'node:fs';
import { TESTVM_DISK_BLOCK_BYTES, TESTVM_DISK_MAX_BLOCKS, writeTestvmBaseImage } from '../agent/guest/testvm-disk.js';

const MASK64 = (1n << 64n) - 1n;
/** guest-content.h GW_TAG_DISK_HOT. */
const GW_TAG_DISK_HOT = 0x6469736b686f74n;
const WRITE_CHUNK_BLOCKS = 256;

function mix64(value: bigint): bigint {
  let x = value & MASK64;
  x ^= x >> 30n;
  x = (x * 0xbf58476d1ce4e5b9n) & MASK64;
  x ^= x >> 27n;
  x = (x * 0x94d049bb133111ebn) & MASK64;
  x ^= x >> 31n;
  return x;
}

function hash3(a: bigint, b: bigint, c: bigint): bigint {
  return mix64(mix64(mix64(a ^ 0x9e3779b97f4a7c15n) ^ b) ^ c);
}

function gcd(a: bigint, b: bigint): bigint {
  while (b) [a, b] = [b, a % b];
  return a;
}

function coprime(n: bigint, r: bigint): bigint {
  if (n <= 2n) return 1n;
  let a = 1n + (r % (n - 1n));
  while (gcd(a, n) !== 1n) a = a + 1n === n ? 1n : a + 1n;
  return a;
}

/** The blocks the kernel of gw.seed=`seed` rewrites (gw.disk_hot=`hotBlocks`) on a disk of `blockCount` blocks. */
export function testvmDiskHotBlocks(seed: bigint, blockCount: number, hotBlocks: number): Set<number> {
  const count = Math.min(blockCount, TESTVM_DISK_MAX_BLOCKS);
  const n = BigInt(count);
  const a = coprime(n, hash3(seed, GW_TAG_DISK_HOT, 1n));
  const b = hash3(seed, GW_TAG_DISK_HOT, 2n) % n;
  const hot = new Set<number>();
  for (let j = 0n; j < BigInt(Math.min(hotBlocks, count)); j++) hot.add(Number((a * j + b) % n));
  return hot;
}

export interface DiskImageOptions {
  sizeBytes: number;
  /** gw.disk_base: blocks of the shared base image from block 0. */
  baseBlocks: number;
  /** gw.image_seed. */
  imageSeed: bigint;
  /** Bytes of the VM's own data after the base (whole blocks). */
  ownBytes: number;
  /** Seeds the VM's own data. */
  ownSeed: number;
  /** The kernel's gw.seed and gw.disk_hot: its hot blocks are left as holes. */
  kernelSeed: bigint;
  hotBlocks: number;
}

export interface DiskImage {
  /** Bytes holding data (not holes): the base image's non-zero blocks and the VM's own. */
  dataBytes: number;
  baseDataBytes: number;
  ownBytes: number;
}

/** Writes the image at `path` (replacing what is there); every block not written is a hole. */
export function writeDiskImage(path: string, options: DiskImageOptions): DiskImage {
  const { sizeBytes, baseBlocks, imageSeed, ownBytes, ownSeed, kernelSeed, hotBlocks } = options;
  const blockCount = sizeBytes / TESTVM_DISK_BLOCK_BYTES;
  const ownBlocks = ownBytes / TESTVM_DISK_BLOCK_BYTES;
  if (!Number.isInteger(ownBlocks) || ownBlocks < 0) throw new RangeError(`ownBytes ${ownBytes}: whole blocks of ${TESTVM_DISK_BLOCK_BYTES} bytes`);
  const base = writeTestvmBaseImage(path, { sizeBytes, baseBlocks, imageSeed });
  const hot = testvmDiskHotBlocks(kernelSeed, blockCount, hotBlocks);
  // AES-CTR over zeros: seeded, incompressible, about 1 GB/s.
  const key = Buffer.alloc(16);
  key.writeUInt32LE(ownSeed >>> 0, 0);
  key.write('gangway-disk', 4, 'latin1');
  const cipher = createCipheriv('aes-128-ctr', key, Buffer.alloc(16));
  const zeros = Buffer.alloc(WRITE_CHUNK_BLOCKS * TESTVM_DISK_BLOCK_BYTES);
  const fd = openSync(path, 'r+');
  try {
    let written = 0;
    let block = baseBlocks;
    while (written < ownBlocks) {
      // A run of blocks outside the hot set, at most a chunk long.
      while (block < blockCount && hot.has(block)) block++;
      let end = block;
      while (end < blockCount && end - block < Math.min(WRITE_CHUNK_BLOCKS, ownBlocks - written) && !hot.has(end)) end++;
      if (end === block) throw new RangeError(`${ownBytes} bytes of the VM's own data do not fit after ${baseBlocks} base blocks in ${sizeBytes} bytes`);
      const data = cipher.update(zeros.subarray(0, (end - block) * TESTVM_DISK_BLOCK_BYTES));
      for (let done = 0; done < data.length; ) done += writeSync(fd, data, done, data.length - done, block * TESTVM_DISK_BLOCK_BYTES + done);
      written += end - block;
      block = end;
    }
  } finally {
    closeSync(fd);
  }
  const baseDataBytes = base.dataBlocks * TESTVM_DISK_BLOCK_BYTES;
  return { dataBytes: baseDataBytes + ownBytes, baseDataBytes, ownBytes };
}
