// The typed face of native/ (built by node-gyp at install): the N-API addon, the tracking
// shim and the synthetic guest program. The TypeScript side never guesses at C layouts:
// every buffer's shape is spelled out here and checked in C.
import { createRequire } from 'node:module';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { EntryKind } from '../protocol/codes.js';

/** Opaque handle to a memory region mapped MAP_SHARED by the addon. */
export interface RegionHandle {
  readonly __brand: 'RegionHandle';
}

/** Page-entry kinds shared by gather/scatter and the wire format: the protocol's EntryKind. */
export const ENTRY_ZERO = EntryKind.zero;
export const ENTRY_DATA = EntryKind.data;
/** Copy-ref entry: applied with `regionCopyPages`, not handled by gather/scatter. */
export const ENTRY_REF = EntryKind.ref;

export interface NativeAddon {
  /**
   * Maps `lengthBytes` of the open file `fd` (from offset 0) MAP_SHARED. The file must
   * already be at least that long. `lengthBytes` must be a positive multiple of
   * `pageSizeBytes`. With `trackHashes`, the region keeps a 16-byte XXH3-128 fingerprint
   * per page, updated by `regionScatter`; `initiallyZero` says the file is known to be all
   * zeroes (a fresh file), so fingerprints start as the zero page's without reading.
   * `zeroHoles` (writable only, a disk): zero pages a scatter applies become holes (a sparse
   * disk stays sparse), written as zeros where the file system cannot punch them, and data
   * pages are handed to writeback at once (sync_file_range), not left to pile up dirty.
   * `fingerprintsFd` (with trackHashes): the fingerprints live in that file (16 bytes per
   * page, mapped shared), so they outlive this process: post-copy's destination keeps them
   * there for an agent restarted before the guest has every page. With `keepFingerprints`
   * (not initiallyZero) the file's fingerprints are taken as they are, nothing is read.
   * The fd may be closed afterwards. Throws on mmap failure with errno text.
   */
  regionMap(
    fd: number,
    lengthBytes: number,
    pageSizeBytes: number,
    options: { writable: boolean; trackHashes: boolean; initiallyZero: boolean; zeroHoles?: boolean; fingerprintsFd?: number; keepFingerprints?: boolean },
  ): RegionHandle;
  /** Unmaps. Any later call with this handle throws. Idempotent. */
  regionClose(region: RegionHandle): void;
  /**
   * Source side: copies pages listed in `runs` (pairs [firstPage, pageCount]) into a
   * batch. Starts at `cursor` ([runIndex, pagesDoneInRun], updated in place) and stops
   * when every run is consumed, `payload` has no room for one more data page, or `entries`
   * has no room for one more entry (zero pages need no payload room). Runs are checked as
   * they are reached; a bad one throws leaving `cursor` and `out` unchanged. Zero pages are not copied: they become ENTRY_ZERO
   * entries. Writes entries as triples [kind, firstPage, pageCount] (adjacent pages of
   * the same kind coalesce), data pages packed in entry order into `payload`.
   * `out` receives [entryCount, payloadBytes]. Returns true when all runs are consumed.
   * With `fps` (undefined or null means none), the k-th data page of the payload gets its
   * XXH3-128 fingerprint, in `hash128`'s canonical form, at fps[16k, 16k + 16), hashed
   * from the payload copy (the bytes sent); zero pages get none. `fps` must hold at least
   * 16 bytes per page of `payload` (RangeError otherwise, checked before gathering).
   */
  regionGather(
    region: RegionHandle,
    runs: Uint32Array,
    cursor: Uint32Array,
    payload: Buffer,
    entries: Uint32Array,
    out: Uint32Array,
    fps?: Uint8Array,
  ): boolean;
  /**
   * Destination side: applies `entryCount` entries from `entries` with `payload`
   * (exactly the data pages, in entry order). ENTRY_ZERO zeroes pages (skipping pages
   * whose tracked fingerprint is already the zero page's), ENTRY_DATA copies pages and
   * updates fingerprints. Throws RangeError, writing nothing, if any entry is out of
   * bounds, has an unknown kind or a zero count, or the payload length is not exactly the
   * data pages' bytes.
   */
  regionScatter(region: RegionHandle, entries: Uint32Array, entryCount: number, payload: Uint8Array): void;
  /**
   * Destination side of a copy-ref (ENTRY_REF): pages dstFirst..dstFirst+count-1 of `dst`
   * get the content of pages srcFirst..srcFirst+count-1 of `src`, with exactly the result
   * of copying single pages in order i = 0..count-1, also when `dst` and `src` are the
   * same region (or file) and the ranges overlap: then with dstFirst > srcFirst a later
   * page reads what an earlier step wrote, so the pattern repeats. `dst` must be writable
   * (written with pwrite, as regionScatter); `src` may be writable (read with pread) or
   * read-only (read from its mapping). `expect`: null, or at least 16 × count bytes of
   * the src pages' expected fingerprints (hash128's canonical form): each src page is
   * hashed as it is copied, and a page whose hash differs is not copied, its index i
   * appended to `mismatches` (then required, length ≥ count). Returns the number of
   * mismatched pages (0 without `expect`). A tracking `dst` gets the fingerprint of each
   * copied page: the hash computed when `expect` is given, else src's tracked one when src
   * tracks (and is not another region of dst's file), else the hash of the bytes read.
   * Throws, writing nothing, if `dst` is read-only (Error), the page sizes differ, count
   * is 0, a range is outside its region, or `expect`/`mismatches` are too short
   * (RangeError); a failed read or write throws with errno text, some pages copied.
   */
  regionCopyPages(
    dst: RegionHandle,
    dstFirst: number,
    src: RegionHandle,
    srcFirst: number,
    count: number,
    expect: Uint8Array | null,
    mismatches: Uint32Array | null,
  ): number;
  /**
   * A pages frame with refs in one call, with the result of applying its entries in order:
   * zero and data entries as `regionScatter` (the payload holds the data pages in entry
   * order), each ENTRY_REF as `regionCopyPages` from `sources[refs[2k]]`, its first page
   * `refs[2k + 1]` (k: the ref entry's rank among the frame's refs). `expects[i]` (or null)
   * holds the fingerprints sources[i]'s pages should have, 16 bytes a page; a ref page whose
   * source differs is not written and goes to `mismatches` as [dstPage, sourceIndex,
   * sourcePage] (room for three words per ref page). Returns how many. Checks the whole
   * frame before writing (RangeError/TypeError: bad kinds, ranges, lengths, page sizes); a
   * failed read or write throws with errno text, earlier entries applied.
   */
  regionApplyRefs(
    dst: RegionHandle,
    entries: Uint32Array,
    entryCount: number,
    payload: Uint8Array,
    refs: Uint32Array,
    sources: readonly RegionHandle[],
    expects: readonly (Uint8Array | null)[],
    mismatches: Uint32Array,
  ): number;
  /**
   * Writes the XXH3-128 fingerprints (hash128's canonical form, 16 bytes each) of pages
   * firstPage..firstPage+count-1 into out[0, 16 × count), read now from the mapping of a
   * read-only region or through 1 MiB preads of a writable one (never the tracked
   * fingerprints). count may be 0. Throws RangeError if the pages are outside the region
   * or `out` is too short. Synchronous: callers chunk large ranges.
   */
  regionFingerprints(region: RegionHandle, firstPage: number, count: number, out: Uint8Array): void;
  /**
   * Copies a tracking region's fingerprints as they are (16 bytes per page, every page) into
   * `out`: what its scatters and copies wrote, nothing read from the mapping. Throws when the
   * region does not track them, RangeError when `out` is too short.
   */
  regionTrackedFingerprints(region: RegionHandle, out: Uint8Array): void;
  /**
   * 128-bit region digest: XXH3-128 over the concatenated XXH3-128 fingerprints of every
   * page, in page order (16 bytes each, XXH128's big-endian canonical form). 'full' reads
   * the memory now; 'tracked' uses the fingerprints kept by a trackHashes region. Runs on
   * the libuv thread pool; bad arguments reject. A scatter into the region while a digest
   * runs is memory-safe but makes that digest's value meaningless. `dataRuns` (mode 'full'
   * of a read-only region of a sparse file, from fileDataRuns): pages outside them are holes,
   * fingerprinted as zero pages without being read; the value is the same. With `holesFd`
   * (open until it settles), `dataRuns` are instead the pages that may be holes in that file
   * (ascending; an earlier fileDataRuns' holes): the same thread walks them first
   * (fileDataRuns' maybeHoles) and takes every other page as data.
   */
  regionDigest(region: RegionHandle, mode: 'full' | 'tracked', dataRuns?: Uint32Array, holesFd?: number): Promise<Buffer>;
  /** XXH3-128 of `data` in canonical (big-endian) form, 16 bytes. */
  hash128(data: Uint8Array): Buffer;
  /**
   * PAGEMAP_SCAN over [startAddress, startAddress + lengthBytes) of the process whose
   * /proc/PID/pagemap is open as `pagemapFd`: returns pages written since the last scan
   * as pairs [pageIndex relative to startAddress, pageCount], in address order, no two
   * touching (a run a re-issued ioctl returns out of order is merged in). With `reprotect` (the
   * normal mode) the scan write-protects them again atomically (PM_SCAN_WP_MATCHING |
   * PM_SCAN_CHECK_WPASYNC), so each write is reported exactly once. Loops over
   * walk_end until the whole range is covered. Throws with errno text (EPERM when the
   * range is not registered for async write-protect).
   */
  pagemapScan(
    pagemapFd: number,
    startAddress: bigint,
    lengthBytes: number,
    pageSizeBytes: number,
    reprotect: boolean,
  ): Uint32Array;
  /**
   * Creates an unnamed file in `dir` (O_TMPFILE, mode 0600) of `lengthBytes`; returns its fd.
   * The memory is reserved now (fallocate: ENOSPC here, not SIGBUS later) unless `sparse`:
   * then every page is a hole (post-copy: a hole is a page that has not arrived).
   */
  tmpfileCreate(dir: string, lengthBytes: number, sparse?: boolean): number;
  /** Gives the unnamed file `fd` the name `path` (linkat AT_SYMLINK_FOLLOW via /proc/self/fd). */
  tmpfileLink(fd: number, path: string): void;
  /** One datagram to a unix socket (systemd's NOTIFY_SOCKET; '@' = abstract namespace). Throws with errno text. */
  sdNotify(socketPath: string, message: string): void;

  // ── post-copy: the destination guest's userfaultfd ──
  /** Whether a userfaultfd with post-copy's features (missing faults on shmem, async WP) can be opened here. */
  uffdProbe(): boolean;
  /** A connected AF_UNIX SOCK_SEQPACKET pair [agentFd, guestFd], both close-on-exec. */
  socketPair(): [number, number];
  /**
   * Waits (on the thread pool) up to `timeoutMs` for the guest's tracking shim to send its
   * userfaultfd over `fd`, with the registered mapping's address and length. Rejects with a
   * message naming what went wrong (timeout, socket closed, malformed message).
   */
  uffdReceive(fd: number, timeoutMs: number): Promise<{ uffd: number; start: number; length: number; pid: number; region: number }>;
  /**
   * Starts a thread reading page faults from `uffd` (a mapping of `pageCount` pages at
   * `start`): `onFaults` gets the faulting pages' numbers on the JS thread, or null once
   * the descriptor fails (the guest is gone). The uffd stays the caller's to close.
   */
  uffdMonitor(uffd: number, start: number, pageSize: number, pageCount: number, onFaults: (pages: Uint32Array | null) => void): MonitorHandle;
  /** Stops the fault thread (faults already read are still delivered). Idempotent. */
  uffdMonitorClose(monitor: MonitorHandle): void;
  /**
   * Installs ENTRY_ZERO / ENTRY_DATA entries (with `payload`, as regionScatter) into the
   * guest mapping at `start` with UFFDIO_ZEROPAGE / UFFDIO_COPY: each page only if it is
   * still missing (one already there is left alone, its waiters woken). A tracking `region`
   * (the same file, the agent's view) gets the fingerprint of every page installed.
   * out[0] = pages installed, out[1] = pages that were there already. Bad entries throw
   * before anything is installed; a failed ioctl throws with errno text.
   */
  uffdInstall(uffd: number, start: number, region: RegionHandle, entries: Uint32Array, entryCount: number, payload: Uint8Array, out: Uint32Array): void;
  /** Wakes threads waiting on pages [firstPage, firstPage + count) of the mapping at `start`. */
  uffdWake(uffd: number, start: number, pageSize: number, firstPage: number, count: number): void;
  /**
   * This process's copy of descriptor `targetFd` of process `pid` (pidfd_open + pidfd_getfd,
   * Linux 5.6+, needs ptrace access: root). Throws with errno text (ESRCH: the process is
   * gone; EBADF: it has no such descriptor).
   */
  pidfdGetfd(pid: number, targetFd: number): number;
  /**
   * A channel (native/src/addon/channel.h): connected TCP socket `fd` (duplicated; the caller
   * closes its own) run by a thread of its own, TLS 1.3 with `tls` (PEM), plain without. The
   * source gives its `hello`; the destination gets it in a 'hello' event and attaches the
   * migration's regions or closes the channel. Events come to `onEvent`, 'closed' last.
   */
  channelOpen(fd: number, role: 'source' | 'destination', tls: ChannelTls | null, hello: ChannelHello | null, onEvent: (event: ChannelEvent['event'], fields: never) => void): ChannelHandle;
  /** Destination: the migration's writable regions, by region index (held until 'closed'). */
  channelAttach(channel: ChannelHandle, regions: RegionHandle[]): void;
  /**
   * Source: the pages of `runs` of `region` (read-only mapping) in batches; 'sent' once
   * written. Data pages go straight from the mapping; with `fingerprints` they are copied
   * first, and 'sent' carries each page's XXH3-128 fingerprint of the bytes sent (16 bytes
   * per page of the runs, in order; a zero page's is the zero page's). Throws when the
   * channel is busy, RangeError when fingerprints are asked for runs outside the region or
   * of more pages than it has.
   */
  channelSend(channel: ChannelHandle, region: RegionHandle, regionIndex: number, round: number, runs: Uint32Array, fingerprints?: boolean): void;
  /** Source: 'barrier' once the destination has written everything sent before it. */
  channelBarrier(channel: ChannelHandle, round: number): void;
  /** Source: the last message; the channel closes at both ends. */
  channelBye(channel: ChannelHandle): void;
  /** Ends the channel's thread now (its socket shut down); idempotent. */
  channelClose(channel: ChannelHandle): void;
  /** The first bytes waiting on socket `fd` (up to `length` <= 64), without reading them; null at EOF. */
  socketPeek(fd: number, length: number): Buffer | null;
  /** Punches holes for the pages of `runs` ([first, count] pairs) in the file `fd`. */
  punchHoles(fd: number, runs: Uint32Array, pageSize: number): void;
  /**
   * The pages among the first `pageCount` of file `fd` that hold data, as [first, count]
   * pairs (SEEK_DATA / SEEK_HOLE; a page partly data counts whole); the rest are holes. A
   * file system without SEEK_DATA says the whole file is data. With `maxRuns` (>= 1), the
   * last run of that many reaches to the end (two lseeks a run). With `maybeHoles` (pairs,
   * ascending), only those pages are looked at and every other page counts as data: on tmpfs
   * a walk costs about 50 ns per data page it passes, and this one passes only the data
   * written into the holes an earlier walk found. With `minHolePages`, a hole of fewer pages
   * between two runs counts as data.
   */
  fileDataRuns(fd: number, pageSize: number, pageCount: number, maxRuns?: number, maybeHoles?: Uint32Array, minHolePages?: number): Uint32Array;
  /** fileDataRuns on the libuv thread pool; `fd` must stay open until it settles. */
  fileDataRunsAsync(fd: number, pageSize: number, pageCount: number, maxRuns?: number, maybeHoles?: Uint32Array, minHolePages?: number): Promise<Uint32Array>;
  /**
   * The disk content of gangway-testvm (guest-content.h gw_disk_block, what the kernel checks
   * against): block firstBlock + i at version versions[i] goes to out[4096 i, 4096 (i + 1)],
   * and zero[i] says whether it is all zeros (version 0 beyond `baseBlocks`, or a zero block
   * of the base image). Version 0 of a block below `baseBlocks` is the base image's block (of
   * `imageSeed`), a version above 0 the kernel's write (of `seed`). Throws RangeError, writing
   * nothing, if `out` has less than 4096 bytes or `zero` less than one entry per version.
   */
  testvmDiskBlocks(
    seed: bigint,
    imageSeed: bigint,
    baseBlocks: number,
    firstBlock: number,
    versions: Uint32Array,
    out: Uint8Array,
    zero: Uint8Array,
  ): void;
}

/** Opaque handle to a channel (channelOpen). */
export interface ChannelHandle {
  readonly __brand: 'ChannelHandle';
}

export interface ChannelTls {
  cert: Buffer;
  key: Buffer;
  ca: Buffer;
}

export interface ChannelHello {
  migrationId: string;
  secret: Uint8Array;
}

/** What a channel sent: its counts, as page-sender's round counters name them. */
export interface ChannelSent {
  pages: number;
  dataPages: number;
  zeroPages: number;
  rawBytes: number;
  wireBytes: number;
  batches: number;
  /** With channelSend's `fingerprints`: each page's, in the runs' order. */
  fingerprints?: Buffer;
}

/** A channel's events, by name, with their fields. */
export type ChannelEvent =
  | { event: 'ready'; fields: { peerCertificate: Buffer | undefined } }
  | { event: 'hello'; fields: { migrationId: string; secret: Buffer; peerCertificate: Buffer | undefined } }
  | { event: 'sent'; fields: ChannelSent }
  | { event: 'barrier'; fields: { round: number; pages: number } }
  | { event: 'error'; fields: { message: string } }
  | { event: 'closed'; fields: Record<string, never> };

/** Opaque handle to a fault-reading thread (uffdMonitor). */
export interface MonitorHandle {
  readonly __brand: 'MonitorHandle';
}

const here = dirname(fileURLToPath(import.meta.url));
/** native/ in the source tree, whether this file runs from agent/ or dist/agent/. */
function findNativeDir(): string {
  for (const candidate of [resolve(here, '..', 'native'), resolve(here, '..', '..', 'native')]) {
    if (existsSync(join(candidate, 'binding.gyp'))) return candidate;
  }
  throw new Error(`native/ not found near ${here}`);
}

export const nativeDir = findNativeDir();
export const nativeBuildDir = join(nativeDir, 'build', 'Release');
/** The synthetic guest program. */
export const guestBinaryPath = join(nativeBuildDir, 'gangway-guest');
/** The LD_PRELOAD tracking shim. */
export const trackShimPath = join(nativeBuildDir, 'gangway-track.so');
/** The multiboot test kernel for QEMU VMs (native/testvm), and the directory it is built in: an images directory of one. */
export const testvmDir = join(nativeDir, 'build', 'testvm');
export const TESTVM_KERNEL_FILE = 'gangway-testvm.elf';
export const testvmKernelPath = join(testvmDir, TESTVM_KERNEL_FILE);

/** Why the test kernel is not there (its build writes the reason to skipped.txt), or undefined. */
export function testvmMissing(): string | undefined {
  if (existsSync(testvmKernelPath)) return undefined;
  let why = 'run node native/build.mjs';
  try {
    why = readFileSync(join(testvmDir, 'skipped.txt'), 'utf8').trim() || why;
  } catch {}
  return `the test kernel ${testvmKernelPath} was not built: ${why}`;
}

let addon: NativeAddon | undefined;
export function loadNative(): NativeAddon {
  if (addon) return addon;
  const path = join(nativeBuildDir, 'gangway.node');
  if (!existsSync(path)) {
    throw new Error(`the native addon is not built (${path} is missing): run \`npm ci\` or \`npm run build\``);
  }
  addon = createRequire(import.meta.url)(path) as NativeAddon;
  return addon;
}
