// Reads the status block of gangway-testvm, the multiboot test kernel, from a VM's RAM: a
// Buffer, or the QEMU memory-backend file, where guest-physical address = file offset for
// the first RAM region of a q35 machine (below 2 GiB). Mirrors native/testvm/status.h:
// fixed offsets, little-endian; the C side asserts every offset used here.
import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { GuestProfile, type GuestProfileName } from './guest-header.js';

export const TESTVM_STATUS_MAGIC = 'GWVMSTAT';
/** The layout this reader writes against; layout 1 (no disk fields) is still read. */
export const TESTVM_STATUS_LAYOUT = 2;
/** Guest-physical address of the block (also its offset in the memory file). */
export const TESTVM_STATUS_ADDR = 0x8000;
export const TESTVM_STATUS_BYTES = 336;
/** The block of layout 1, which kernels built before the disk wrote. */
const LAYOUT_1_BYTES = 192;
/** The kernel's pages start here (16 MiB) and run to the end of RAM or gw.mem. */
export const TESTVM_RANGE_START = 0x1000000;
export const TESTVM_PAGE_SIZE = 4096;

const SEQ_OFFSET = 16;
const CHECK_REQUEST_OFFSET = 168;
const CHECK_DONE_OFFSET = 172;
const RATE_UNLIMITED = 0xffffffffffffffffn;
const NO_BLOCK = 0xffffffffffffffffn;
const READ_ATTEMPTS = 1000;

export const TestvmState = { settingUp: 1, running: 2, failed: 3 } as const;
export type TestvmStateName = keyof typeof TestvmState | 'unknown';
/** The disk's state: none (no legacy virtio-blk device), running, or failed (a request failed after a reset too). */
export const TestvmDiskState = { none: 1, running: 2, failed: 3 } as const;
export type TestvmDiskStateName = keyof typeof TestvmDiskState | 'unknown';

/** The disk part of the block (layout 2; native/testvm/disk.c). Blocks are 4 KiB, numbered from 0. */
export interface TestvmDiskStatus {
  state: TestvmDiskStateName;
  blockSizeBytes: number;
  /** The device's capacity. */
  capacityBytes: number;
  /** Blocks the kernel works on: the capacity's, at most its version table's room (4 GiB). */
  blockCount: number;
  baseBlocks: number;
  hotBlocks: number;
  /** Infinity for gw.disk_rate=max. */
  rateBlocksPerSec: number;
  /** A u32 version per block. */
  versionTableAddr: number;
  passes: number;
  /** Block writes: the version table's sum. */
  writes: number;
  /** Distinct blocks written (version above 0). */
  blocksWritten: number;
  /** Blocks read back and compared, by rewrites and full checks. */
  blocksChecked: number;
  /** Blocks found not holding their last write (or their base content, or zeros). */
  staleBlocks: number;
  lastWrittenBlock: number | undefined;
  lastStaleBlock: number | undefined;
  /** The block a write is in flight to: it may hold its table version or `inflightVersion` (disk.c). */
  inflightBlock: number | undefined;
  inflightVersion: number;
  /** Requests the device failed or did not answer. */
  errors: number;
  /** The last full check's disk result. */
  checkBlocks: number;
  checkStaleBlocks: number;
}

export interface TestvmStatus {
  layoutVersion: number;
  state: TestvmStateName;
  /** Odd while the kernel was updating the counters: such a copy may be torn. */
  seq: number;
  pageSizeBytes: number;
  /** Guest-physical address of the first page the kernel works on. */
  rangeStartAddr: number;
  pageCount: number;
  seed: bigint;
  imageSeed: bigint;
  profile: GuestProfileName | 'unknown';
  sharedPermille: number;
  hotPermille: number;
  hotPageCount: number;
  /** Infinity for gw.rate=max. */
  dirtyRateBytesPerSec: number;
  /** A u32 version per page of the range. */
  versionTableAddr: number;
  /** A u32 page number (address / 4096) per page of the hot set. */
  hotListAddr: number;
  tscHz: number;
  uptimeMs: number;
  passes: number;
  pagesWritten: number;
  pagesChecked: number;
  /** Pages found not holding their last write, by rewrites and full checks. */
  stalePages: number;
  lastWrittenAddr: number;
  /** Undefined until a page is found stale. */
  lastStaleAddr: number | undefined;
  /** Stops the kernel saw by its clocks (3 s or more; see native/testvm/kmain.c). */
  resumes: number;
  metaErrors: number;
  /** The agent's last full-check request, and the one the kernel last answered. */
  checkRequest: number;
  checkDone: number;
  /** The last full check's result. */
  checkPages: number;
  checkStalePages: number;
  /** The disk's part (undefined from a layout-1 kernel, which has none). */
  disk: TestvmDiskStatus | undefined;
}

/** Parses the block at `offset` of `buf` (a copy of RAM or of the memory file). */
export function parseTestvmStatus(buf: Buffer, offset = 0): TestvmStatus {
  if (offset < 0 || buf.length < offset + LAYOUT_1_BYTES) {
    throw new Error(`testvm status: ${buf.length} bytes do not hold a ${LAYOUT_1_BYTES}-byte block at offset ${offset}`);
  }
  if (buf.toString('latin1', offset, offset + 8) !== TESTVM_STATUS_MAGIC) {
    throw new Error(`testvm status: no ${TESTVM_STATUS_MAGIC} block at offset ${offset} (not booted yet, or not gangway-testvm)`);
  }
  const layoutVersion = buf.readUInt32LE(offset + 8);
  if (layoutVersion !== 1 && layoutVersion !== TESTVM_STATUS_LAYOUT) {
    throw new Error(`testvm status: layout ${layoutVersion}, this reader knows 1 and ${TESTVM_STATUS_LAYOUT}`);
  }
  const size = layoutVersion === 1 ? LAYOUT_1_BYTES : TESTVM_STATUS_BYTES;
  if (buf.length < offset + size) {
    throw new Error(`testvm status: ${buf.length} bytes do not hold a ${size}-byte block at offset ${offset}`);
  }
  const b = buf.subarray(offset, offset + size);
  const u32 = (o: number) => b.readUInt32LE(o);
  const u64 = (o: number) => Number(b.readBigUInt64LE(o));
  const stateCode = u32(12);
  const profileCode = u32(56);
  const rate = b.readBigUInt64LE(72);
  const lastStale = u64(152);
  return {
    layoutVersion,
    state: (Object.entries(TestvmState).find(([, code]) => code === stateCode)?.[0] ?? 'unknown') as TestvmStateName,
    seq: u32(SEQ_OFFSET),
    pageSizeBytes: u32(20),
    rangeStartAddr: u64(24),
    pageCount: u64(32),
    seed: b.readBigUInt64LE(40),
    imageSeed: b.readBigUInt64LE(48),
    profile: (Object.entries(GuestProfile).find(([, code]) => code === profileCode)?.[0] ??
      'unknown') as TestvmStatus['profile'],
    sharedPermille: u32(60),
    hotPermille: u32(64),
    hotPageCount: u32(68),
    dirtyRateBytesPerSec: rate === RATE_UNLIMITED ? Infinity : Number(rate),
    versionTableAddr: u64(80),
    hotListAddr: u64(88),
    tscHz: u64(96),
    uptimeMs: u64(104),
    passes: u64(112),
    pagesWritten: u64(120),
    pagesChecked: u64(128),
    stalePages: u64(136),
    lastWrittenAddr: u64(144),
    lastStaleAddr: lastStale === 0 ? undefined : lastStale,
    resumes: u32(160),
    metaErrors: u32(164),
    checkRequest: u32(CHECK_REQUEST_OFFSET),
    checkDone: u32(CHECK_DONE_OFFSET),
    checkPages: u64(176),
    checkStalePages: u64(184),
    disk: layoutVersion === 1 ? undefined : parseDisk(b),
  };
}

function parseDisk(b: Buffer): TestvmDiskStatus {
  const u32 = (o: number) => b.readUInt32LE(o);
  const u64 = (o: number) => Number(b.readBigUInt64LE(o));
  const block = (o: number) => (b.readBigUInt64LE(o) === NO_BLOCK ? undefined : u64(o));
  const stateCode = u32(192);
  const rate = b.readBigUInt64LE(232);
  return {
    state: (Object.entries(TestvmDiskState).find(([, code]) => code === stateCode)?.[0] ?? 'unknown') as TestvmDiskStateName,
    blockSizeBytes: u32(196),
    capacityBytes: u64(200),
    blockCount: u64(208),
    baseBlocks: u64(216),
    hotBlocks: u64(224),
    rateBlocksPerSec: rate === RATE_UNLIMITED ? Infinity : Number(rate),
    versionTableAddr: u64(240),
    passes: u64(248),
    writes: u64(256),
    blocksWritten: u64(264),
    blocksChecked: u64(272),
    staleBlocks: u64(280),
    lastWrittenBlock: block(288),
    lastStaleBlock: block(296),
    inflightBlock: block(304),
    inflightVersion: u32(312),
    errors: u32(316),
    checkBlocks: u64(320),
    checkStaleBlocks: u64(328),
  };
}

function readExactly(fd: number, buf: Buffer, position: number): void {
  let done = 0;
  while (done < buf.length) {
    const n = readSync(fd, buf, done, buf.length - done, position + done);
    if (n === 0) throw new Error(`testvm status: the memory file ends before offset ${position + buf.length}`);
    done += n;
  }
}

function withFd<T>(file: number | string, flags: string, use: (fd: number) => T): T {
  if (typeof file === 'number') return use(file);
  const fd = openSync(file, flags);
  try {
    return use(fd);
  } finally {
    closeSync(fd);
  }
}

/**
 * Reads a whole copy of the block from a running VM's memory file (a path or an open fd):
 * copies it, then reads `seq` again, and takes the copy when both are the same even number.
 * A VM stopped while it updated the block would never give one: after `attempts` tries the
 * last copy is returned with its odd `seq`, for the caller to judge (fields that were not
 * being changed, like `lastWrittenAddr` of a stopped VM, are still right).
 */
export function readTestvmStatus(file: number | string, offset = TESTVM_STATUS_ADDR, attempts = READ_ATTEMPTS): TestvmStatus {
  return withFd(file, 'r', (fd) => {
    const buf = Buffer.alloc(TESTVM_STATUS_BYTES);
    const seqAgain = Buffer.alloc(4);
    for (let attempt = 1; ; attempt++) {
      readExactly(fd, buf, offset);
      readExactly(fd, seqAgain, offset + SEQ_OFFSET);
      const status = parseTestvmStatus(buf);
      if ((status.seq % 2 === 0 && seqAgain.readUInt32LE(0) === status.seq) || attempt >= attempts) return status;
    }
  });
}

/**
 * Asks the kernel for a full check (every page against its version; with a disk, every
 * base block and every block written too): writes check_done + 1 into check_request.
 * Returns that request number; the answer is in the block once `checkDone` equals it
 * (`checkPages`, `checkStalePages`, `disk.checkBlocks`, `disk.checkStaleBlocks`). Works on
 * a stopped VM too: the kernel sees the request when it runs again.
 */
export function requestTestvmFullCheck(file: number | string, offset = TESTVM_STATUS_ADDR): number {
  return withFd(file, 'r+', (fd) => {
    const word = Buffer.alloc(4);
    readExactly(fd, word, offset + CHECK_DONE_OFFSET);
    const request = (word.readUInt32LE(0) + 1) >>> 0;
    word.writeUInt32LE(request, 0);
    if (writeSync(fd, word, 0, 4, offset + CHECK_REQUEST_OFFSET) !== 4) {
      throw new Error('testvm status: short write of check_request');
    }
    return request;
  });
}

/**
 * Asks a running kernel for a full check and waits for its answer, reading the block from
 * the memory file every `pollMs`: resolves with the block that holds it (`checkPages`,
 * `checkStalePages`). Rejects after `timeoutMs`, saying whether the kernel still ran.
 */
export async function runTestvmFullCheck(file: string, timeoutMs: number, pollMs = 20): Promise<TestvmStatus> {
  const request = requestTestvmFullCheck(file);
  const first = readTestvmStatus(file);
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const status = readTestvmStatus(file);
    if (status.checkDone === request) return status;
    if (performance.now() > deadline) {
      const running = status.seq !== first.seq ? 'it still runs' : 'its status block has not changed since: it does not run';
      throw new Error(`the test kernel did not answer full check ${request} within ${timeoutMs} ms (${running})`);
    }
    await sleep(pollMs);
  }
}

/** A u32 table of the kernel's (the version table or the hot list), read from the memory file. */
function readTable(file: number | string, addr: number, count: number): Uint32Array {
  return withFd(file, 'r', (fd) => {
    const buf = Buffer.alloc(count * 4);
    readExactly(fd, buf, addr);
    return new Uint32Array(buf.buffer, buf.byteOffset, count);
  });
}

/** The hot set: page numbers (guest-physical address / 4096) the kernel rewrites. */
export function readTestvmHotPages(file: number | string, status: TestvmStatus): Uint32Array {
  return readTable(file, status.hotListAddr, status.hotPageCount);
}

/** The version the kernel last wrote to each page of its range, in page order. */
export function readTestvmVersions(file: number | string, status: TestvmStatus): Uint32Array {
  return readTable(file, status.versionTableAddr, status.pageCount);
}

/** The version the kernel last wrote to each block of its disk (0: base content or zeros); empty without a disk. */
export function readTestvmDiskVersions(file: number | string, status: TestvmStatus): Uint32Array {
  const disk = status.disk;
  if (!disk || disk.state === 'none' || disk.versionTableAddr === 0) return new Uint32Array(0);
  return readTable(file, disk.versionTableAddr, disk.blockCount);
}
