// The QEMU baseline: QEMU 7.2's own live migration (pre-copy, multifd, post-copy) of VMs
// booted from gangway's test kernel (native/testvm), measured the way the gangway side is,
// so that bench/qemu.ts can put the two side by side. A module, no CLI.
//
// What a QEMU user gets, measured from outside QEMU where that is possible:
// - The destination starts with `-incoming defer` and no -S: QEMU's own flow starts the guest
//   by itself when the incoming migration completes, so no `cont` of ours sits in the downtime.
// - totalMs: from just before `migrate` to the last of the destination's RESUME and both
//   ends' MIGRATION completed events (QEMU's event timestamps, host wall clock): the VM runs
//   at the destination and needs nothing more from the source.
//   downtimeMs: the source's STOP to the destination's RESUME. QEMU's own total-time and
//   downtime (the source's view, which ends before the destination runs) go in the detail.
// - wireBytes: counted by the kernel (wire-counter.ts: iptables on loopback, veth counters
//   on a netns link), both directions; QEMU's ram.transferred goes in the detail.
// - CPU seconds: utime + stime of each QEMU process from just before `migrate` to when
//   completion was seen. Under TCG a QEMU also spends CPU running its guest, and that is in
//   the figure: the source's guest until it stops, the destination's once it runs.
// - stalePages, verified: QEMU 7.2's TCG pre-copy misses pages (on this project's machines
//   the kernel's status page and its top stack page were stale at the destination in 9 of
//   9 runs), so a result is never assumed clean. Once the destination runs, the kernel is
//   asked for a full check of its range (every page against the version it last wrote)
//   through the destination's memory file; stalePages is what that check found plus what
//   the kernel's rewrites found since the switchover. `verified` says the check completed.
//   The two pages named above lie below the range the kernel checks (the status block at
//   0x8000, the stack), and the kernel overwrites both as soon as it runs (the block is a
//   copy of counters it keeps elsewhere), so they cannot show up here: say so when quoting
//   a clean QEMU result.
// - A VM with a disk (QemuBaselineVm.disk, QemuRunOptions.diskFiles): QEMU moves it as
//   libvirt's --copy-storage-all does (qemu-storage.ts: an NBD mirror to the destination,
//   then the RAM migration, the mirror ended in sync at the pause before the switchover, and
//   the destination continued by `cont`, as libvirt does, so the destination starts with -S
//   here and the downtime includes ending the mirror). totalMs runs from the mirror's start;
//   the wire count includes the NBD stream; the kernel's full check covers its disk too
//   (staleDiskBlocks).
// - TLS (QemuRunOptions.tls): QEMU's own migration over TLS, as libvirt's --tls runs it
//   (tls-creds-x509 on both ends, the peer's certificate checked both ways), for comparing
//   like with like: gangway's agents always run mutual TLS between hosts.
//
// First touch: memory fresh to these machines costs about 3 s per GiB the first time it is
// touched, whoever touches it, which would make the baseline measure the host's page faults
// rather than QEMU. With `preTouch` (the default) both memory files are written with zeros
// before QEMU starts, so the destination's QEMU writes into memory the host already backs;
// the gangway side must do the same to its files. Post-copy undoes it at the destination:
// a QEMU that may take post-copy discards its RAM when the migration starts (init_range in
// migration/postcopy-ram.c; measured: a pre-touched 256 MiB file went down to 4 MiB
// allocated), so there the pages are faulted in afresh whatever was done before.
import { chmodSync, closeSync, copyFileSync, ftruncateSync, mkdirSync, mkdtempSync, openSync, readSync, rmSync, statSync } from 'node:fs';
import { createServer } from 'node:net';
import { basename, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import { initCa, issueHostCert } from '../agent/cli/certs.js';
import { testvmDir, testvmMissing, TESTVM_KERNEL_FILE } from '../agent/native.js';
import type { MigrationCapability, MigrationInfo, MigrationStatus } from '../agent/guest/qmp-schema.js';
import { readTestvmStatus, requestTestvmFullCheck, TESTVM_STATUS_ADDR, type TestvmStatus } from '../agent/guest/testvm-status.js';
import { qemuArgs, vmDiskNodes, type VmDefinition } from '../agent/guest/vm-spec.js';
import { ErrorCode } from '../protocol/errors.js';
import type { ShapedLink } from './netns-link.js';
import { createMemoryFile, eventMs, QEMU_BINARY, QemuBaselineError, QemuVm } from './qemu-vm.js';
import { exportIncomingDisk, finishIncomingDisk, finishMirror, startMirror, type MirrorDone, type MirrorReady, type NbdTarget } from './qemu-storage.js';
import { openIptablesCounter, openVethCounter, sum, type Endpoint, type WireBytes, type WireCounter } from './wire-counter.js';

export { QEMU_BINARY, QemuBaselineError };
const KERNEL_FILE = TESTVM_KERNEL_FILE;
export const TESTVM_IMAGES_DIR = testvmDir;

/** 7.2's default is 128 MiB/s, which would make the baseline a test of that default. */
export const MAX_BANDWIDTH_BYTES_PER_SEC = 1e11;
export const DEFAULT_DOWNTIME_LIMIT_MS = 300;
export const DEFAULT_MULTIFD_CHANNELS = 2;
const DEFAULT_HOT_PERMILLE = 250;
const MiB = 1024 * 1024;
/** The kernel works from 16 MiB up with paging off; file offset = guest-physical address holds below 2 GiB on q35. */
const MIN_MEMORY_MIB = 32;
const MAX_MEMORY_MIB = 2048;
const POLL_MS = 20;
const EVENT_TIMEOUT_MS = 10_000;
/** A running kernel changes its status block many times a second. */
const KERNEL_ALIVE_MS = 2_000;
/** sun_path holds 108 bytes with its NUL. */
const MAX_SOCKET_PATH_BYTES = 107;
/** NBD's registered port, plus the VM's index: the destinations' NBD servers in a link's namespace. */
const NBD_NETNS_PORT = 10809;

/** A VM of the test kernel: what its command line (gw.* keys, native/testvm/params.h) says. */
export interface QemuBaselineVm {
  memoryMiB: number;
  profile: 'os-image' | 'random' | 'zero';
  /** Page rewrites per second, in MiB (gw.rate is KiB/s). */
  dirtyRateMiBps: number;
  seed: number;
  imageSeed?: number;
  /** Pages holding blocks of the shared image, per mille (gw.shared). */
  sharedPermille?: number;
  /** Pages the kernel rewrites, per mille (gw.hot); 250 unless given, as bench:gang's guests. */
  hotPermille?: number;
  /** A disk the kernel works on (gw.disk_*); its image comes from QemuRunOptions.diskFiles. */
  disk?: QemuBaselineDisk;
}

/** The kernel's disk workload (native/testvm/params.h), in 4 KiB blocks. */
export interface QemuBaselineDisk {
  /** gw.disk_base: blocks of the base image the image starts with. */
  baseBlocks: number;
  /** gw.disk_hot. */
  hotBlocks: number;
  /** gw.disk_rate: block rewrites per second (0: none). */
  rateBlocksPerSec: number;
}

export type QemuMode = 'precopy' | 'multifd' | 'postcopy';

/**
 * x509 credentials in QEMU's layout (a directory of ca-cert.pem, server-cert.pem,
 * server-key.pem, client-cert.pem, client-key.pem), and the name the destination's
 * certificate carries, which the source checks (tls-hostname) instead of the address.
 */
export interface QemuTls {
  dir: string;
  hostname: string;
}

/** The id of the tls-creds-x509 object each QEMU of a TLS run is started with. */
const TLS_CREDS_ID = 'gw-tls';

/**
 * Makes a CA and two certificates in `dir` (mode 0700, made here) in QEMU's x509 layout:
 * the destination's (server) and the source's (client), both signed by the CA.
 */
export async function makeQemuTls(dir: string): Promise<QemuTls> {
  if (dir.includes(',')) throw new RangeError(`the TLS directory ${dir} holds a comma, which QEMU's -object syntax cannot carry`);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const caDir = join(dir, 'ca');
  await initCa({ dir: caDir, days: 1 });
  const hostname = 'qemu-destination';
  const server = await issueHostCert({ dir: caDir, name: hostname, validity: { days: 1 } });
  const client = await issueHostCert({ dir: caDir, name: 'qemu-source', validity: { days: 1 } });
  for (const [from, to] of [
    [server.caPath, 'ca-cert.pem'],
    [server.certPath, 'server-cert.pem'],
    [server.keyPath, 'server-key.pem'],
    [client.certPath, 'client-cert.pem'],
    [client.keyPath, 'client-key.pem'],
  ] as const) {
    copyFileSync(from, join(dir, to));
    chmodSync(join(dir, to), 0o600);
  }
  return { dir, hostname };
}

/** Loopback, or a shaped netns pair (bench/netns-link.ts): sources run in nsA, destinations in nsB. */
export type QemuLink = { kind: 'loopback' } | { kind: 'netns'; link: ShapedLink };

export interface QemuRunOptions {
  mode: QemuMode;
  link: QemuLink;
  /** multifd only; default 2. */
  multifdChannels?: number;
  downtimeLimitMs?: number;
  /** Post-copy only: switch this long after `migrate` instead of once the first pass is done. */
  postcopyAfterMs?: number;
  /** Write the memory files with zeros before QEMU starts (see the top of the file). Default true. */
  preTouch?: boolean;
  /** QMP sockets, serial logs: a run directory is made in it and removed at the end. */
  workDir: string;
  /**
   * With vm.disk: each VM's disk image (VM i: diskFiles[i]), fresh as the kernel expects it
   * at boot. The source QEMU writes to it; the caller removes it. The destination's disk is
   * an empty sparse file of the same size in the run directory (so put workDir where the
   * disks should be).
   */
  diskFiles?: readonly string[];
  /** Bounds each migration, `migrate` to completed (serial: each VM's); booting and the check have their own bounds. */
  timeoutMs: number;
  /** The migration stream over TLS (makeQemuTls): mutual, as libvirt's --tls. */
  tls?: QemuTls;
  log?: (line: string) => void;
  /** Aborts the run (then everything started is cleaned up); for a benchmark's Ctrl-C. */
  signal?: AbortSignal;
}

export interface QemuCheck {
  /** The kernel answered the full-check request. */
  done: boolean;
  checkMs: number;
  /** The kernel's state when the check ended or timed out. */
  state: TestvmStatus['state'];
  pages: number;
  /** Pages the full check found not holding their last write. */
  stalePages: number;
  /** Pages the kernel's rewrites found stale since the switchover (before the check). */
  staleByRewrites: number;
  /** The version table disagreed with the write count (the kernel's own bookkeeping broke). */
  metaErrors: number;
  /** With a disk: the blocks the full check read, those it found stale, and those the kernel's rewrites found stale since the switchover. */
  disk?: { blocks: number; staleBlocks: number; staleByRewrites: number; errors: number };
  /** Why the check is not done: no status block at the destination, the kernel failed or stopped answering. */
  problem?: string;
}

export interface QemuVmResult {
  name: string;
  status: 'completed';
  totalMs: number;
  downtimeMs: number;
  /** When the counter tells the VMs apart (iptables; a link's veth counters do not). */
  wireBytes?: number;
  cpuSecondsSource: number;
  cpuSecondsDestination: number;
  /** Post-copy: when migrate-start-postcopy was sent, after `migrate`; undefined if QEMU was done first. */
  postcopyStartedAfterMs?: number;
  /**
   * QEMU entered postcopy-active. Not always after migrate-start-postcopy: when what is left
   * fits in the downtime limit, QEMU stops and copies in pre-copy instead (small VMs do).
   */
  postcopyRan: boolean;
  /** With a disk: the mirror, and the kernel's disk writes while the VM ran at the source. */
  disk?: {
    ready: MirrorReady;
    done: MirrorDone;
    /** Block writes from the mirror's start to the stop, and that time. */
    writesWhileLive: number;
    liveMs: number;
  };
  /** QEMU's own figures (query-migrate on the source at the end). */
  qemu: {
    totalMs: number;
    downtimeMs: number;
    setupMs: number;
    transferredBytes: number;
    normalPages: number;
    /** Zero pages, sent as a flag. */
    duplicatePages: number;
    dirtySyncCount: number;
    precopyBytes: number;
    downtimeBytes: number;
    postcopyBytes: number;
    postcopyRequests: number;
    multifdBytes: number;
  };
  check: QemuCheck;
}

export interface QemuBaselineDetail {
  strategy: 'single' | 'parallel' | 'serial';
  qemuVersion: string;
  accel: 'tcg';
  memoryMiB: number;
  profile: QemuBaselineVm['profile'];
  wireBytesMethod: WireCounter['method'];
  wireBytesForward: number;
  wireBytesBack: number;
  /** Sum of QEMU's ram.transferred over the VMs. */
  qemuTransferredBytes: number;
  /** First `migrate` to last completion (serial: includes starting each destination and each check). */
  elapsedMs: number;
  preTouch: boolean;
  downtimeLimitMs: number;
  maxBandwidthBytesPerSec: number;
  multifdChannels?: number;
  /** The migration stream went over TLS. */
  tls: boolean;
  vms: QemuVmResult[];
}

export interface QemuBaselineRun {
  system: 'qemu';
  mode: QemuMode;
  link: 'loopback' | 'netns';
  /** Per VM. */
  dirtyRateMiBps: number;
  vms: number;
  /** One VM or parallel: first `migrate` to the last VM running at its destination; serial: the sum over the VMs. */
  totalMs: number;
  /** One VM or parallel: the longest; serial: the sum (as bench:gang counts serial moves). */
  downtimeMs: number;
  /** Both directions, as the kernel counted them (detail.wireBytesMethod). */
  wireBytes: number;
  stalePages: number;
  /** With a disk: blocks found stale by the full checks and by the kernel's rewrites since the switchover. */
  staleDiskBlocks?: number;
  /** Every VM's full check completed (stalePages says what they found). */
  verified: boolean;
  cpuSecondsSource: number;
  cpuSecondsDestination: number;
  detail: QemuBaselineDetail;
}

/** Why this host cannot run the baseline on `link`, or undefined. For tests and bench/qemu.ts to skip with. */
export async function qemuBaselineProblem(link: QemuLink['kind']): Promise<string | undefined> {
  const qemu = await execa(QEMU_BINARY, ['--version'], { reject: false, timeout: 10_000, stdin: 'ignore' });
  if (qemu.failed) return `${QEMU_BINARY} is not usable (Debian: apt-get install qemu-system-x86): ${qemu.shortMessage}`;
  const noKernel = testvmMissing();
  if (noKernel) return noKernel;
  if (process.getuid?.() !== 0) return `counting wire bytes (${link === 'loopback' ? 'iptables' : 'network namespaces'}) needs root`;
  if (link === 'loopback') {
    const iptables = await execa('iptables', ['-w', '5', '-S', 'OUTPUT'], { reject: false, timeout: 10_000, stdin: 'ignore' });
    if (iptables.failed) return `iptables is not usable: ${iptables.stderr || iptables.shortMessage}`;
  }
  return undefined;
}

/** QEMU's own migration of one VM. */
export async function runQemuMigration(options: QemuRunOptions & { vm: QemuBaselineVm }): Promise<QemuBaselineRun> {
  return runGang('single', options.vm, 1, options);
}

/**
 * A gang of `count` VMs of one image (seeds vm.seed, vm.seed + 1, ...; vm.imageSeed shared),
 * all running, all migrated by QEMU at once.
 */
export async function runQemuParallel(options: QemuRunOptions & { vm: QemuBaselineVm; count: number }): Promise<QemuBaselineRun> {
  return runGang('parallel', options.vm, options.count, options);
}

/** The same gang, all running, migrated by QEMU one after another. */
export async function runQemuSerial(options: QemuRunOptions & { vm: QemuBaselineVm; count: number }): Promise<QemuBaselineRun> {
  return runGang('serial', options.vm, options.count, options);
}

/** The kernel command line for `vm` (params.h). */
export function testvmAppend(vm: QemuBaselineVm): string {
  return [
    `gw.profile=${vm.profile}`,
    `gw.seed=${vm.seed}`,
    `gw.image_seed=${vm.imageSeed ?? 0}`,
    `gw.shared=${vm.sharedPermille ?? 0}`,
    `gw.hot=${vm.hotPermille ?? DEFAULT_HOT_PERMILLE}`,
    `gw.rate=${Math.round(vm.dirtyRateMiBps * 1024)}`,
    ...(vm.disk ? [`gw.disk_base=${vm.disk.baseBlocks}`, `gw.disk_hot=${vm.disk.hotBlocks}`, `gw.disk_rate=${vm.disk.rateBlocksPerSec}`] : []),
  ].join(' ');
}

function validateVm(vm: QemuBaselineVm): void {
  const problems: string[] = [];
  if (!Number.isInteger(vm.memoryMiB) || vm.memoryMiB < MIN_MEMORY_MIB || vm.memoryMiB > MAX_MEMORY_MIB) {
    problems.push(`memoryMiB ${vm.memoryMiB}: a whole number ${MIN_MEMORY_MIB}..${MAX_MEMORY_MIB} (the kernel runs with paging off and reads its status through the file below 2 GiB)`);
  }
  if (!['os-image', 'random', 'zero'].includes(vm.profile)) problems.push(`profile ${JSON.stringify(vm.profile)}: os-image, random or zero`);
  if (!Number.isFinite(vm.dirtyRateMiBps) || vm.dirtyRateMiBps < 0) problems.push(`dirtyRateMiBps ${vm.dirtyRateMiBps}: 0 or more`);
  for (const key of ['seed', 'imageSeed'] as const) {
    const value = vm[key] ?? 0;
    if (!Number.isSafeInteger(value) || value < 0) problems.push(`${key} ${value}: a whole number, 0 or more`);
  }
  for (const key of ['sharedPermille', 'hotPermille'] as const) {
    const value = vm[key] ?? 0;
    if (!Number.isInteger(value) || value < 0 || value > 1000) problems.push(`${key} ${value}: a whole per-mille, 0..1000`);
  }
  for (const [key, value] of Object.entries(vm.disk ?? {})) {
    if (!Number.isSafeInteger(value) || value < 0) problems.push(`disk.${key} ${value}: a whole number, 0 or more`);
  }
  if (problems.length) throw new RangeError(`QEMU baseline VM: ${problems.join('; ')}`);
}

function validateOptions(options: QemuRunOptions, vm: QemuBaselineVm, count: number): void {
  if (!['precopy', 'multifd', 'postcopy'].includes(options.mode)) throw new RangeError(`mode ${JSON.stringify(options.mode)}: precopy, multifd or postcopy`);
  if (vm.disk && options.diskFiles?.length !== count) throw new RangeError(`a VM with a disk needs a disk file per VM: ${options.diskFiles?.length ?? 0} for ${count}`);
  if (!vm.disk && options.diskFiles) throw new RangeError('diskFiles without vm.disk: the kernel would not be told about its disk');
  if (vm.disk && options.mode !== 'precopy') throw new RangeError(`a VM with a disk moves by pre-copy only here (libvirt's flow), not ${options.mode}`);
  if (!Number.isInteger(count) || count < 1 || count > 16) throw new RangeError(`count ${count}: 1..16 VMs`);
  if (!Number.isFinite(options.timeoutMs) || options.timeoutMs <= 0) throw new RangeError(`timeoutMs ${options.timeoutMs}: a positive number of milliseconds`);
  const channels = options.multifdChannels ?? DEFAULT_MULTIFD_CHANNELS;
  if (!Number.isInteger(channels) || channels < 1 || channels > 255) throw new RangeError(`multifdChannels ${channels}: 1..255`);
  if (options.tls && options.diskFiles) throw new RangeError("TLS with a disk: the disk's NBD mirror would still go in the clear here (not built)");
}

// ---------------------------------------------------------------------------------------
// A run: source VMs, their destinations, the migrations, the checks, and the way out.

interface Pair {
  index: number;
  vm: QemuBaselineVm;
  source: QemuVm;
  destination?: QemuVm;
  /** Where the destination listens: its migration port, then (with a disk) its NBD server. */
  endpoints?: Endpoint[];
  /** With a disk: the source's image, and the destination's export of its own. */
  diskFile?: string;
  nbd?: NbdTarget;
}

interface Migrated {
  pair: Pair;
  info: MigrationInfo;
  totalMs: number;
  downtimeMs: number;
  cpuSecondsSource: number;
  cpuSecondsDestination: number;
  postcopyStartedAfterMs?: number;
  postcopyRan: boolean;
  staleBefore: number;
  /** The kernel's disk counters at the source when the migration was issued. */
  diskBefore?: { writes: number; staleBlocks: number };
  disk?: QemuVmResult['disk'];
  /** performance.now() just before `migrate` (with a disk: the mirror), and when completion was seen. */
  issuedAt: number;
  completedAt: number;
  /** Wall clock just before `migrate` (with a disk: the mirror), and when the VM was running at its destination with QEMU done at both ends. */
  issuedWallMs: number;
  doneWallMs: number;
  wire?: WireBytes;
}

/** Sockets' and logs' directory, the QEMUs, the memory files, counters: what a run undoes, also on failure. */
class RunContext {
  readonly dir: string;
  readonly vms: QemuVm[] = [];
  readonly memoryFiles: string[] = [];
  readonly diskFiles: string[] = [];
  readonly counters: WireCounter[] = [];
  private static next = 0;
  readonly id = `${process.pid}-${RunContext.next++}`;

  constructor(
    readonly options: QemuRunOptions,
    readonly log: (line: string) => void,
  ) {
    this.dir = mkdtempSync(join(options.workDir, 'qb-'));
  }

  /**
   * Starts QEMU for `vm` (a destination: with `-incoming defer`), its memory file created
   * first. With `diskFile` (the source's image) the VM has a disk: the source's is that file,
   * a destination's an empty sparse file of its size, made here.
   */
  startVm(index: number, vm: QemuBaselineVm, role: 'src' | 'dst', diskFile?: string): QemuVm {
    const name = `qb-${this.id}-${index}-${role}`;
    const memPath = `/dev/shm/gangway-${name}`;
    const qmpPath = join(this.dir, `${index}-${role}.qmp`);
    if (Buffer.byteLength(qmpPath) > MAX_SOCKET_PATH_BYTES) {
      throw new RangeError(`the QMP socket ${qmpPath} is longer than a unix socket path may be (${MAX_SOCKET_PATH_BYTES} bytes): use a shorter workDir`);
    }
    const logPath = join(this.dir, `${index}-${role}.log`);
    this.memoryFiles.push(memPath);
    createMemoryFile(memPath, vm.memoryMiB * MiB, this.options.preTouch ?? true);
    let diskPath = diskFile;
    if (diskFile && role === 'dst') {
      diskPath = join(this.dir, `${index}-dst.raw`);
      this.diskFiles.push(diskPath);
      const fd = openSync(diskPath, 'wx', 0o600);
      try {
        ftruncateSync(fd, statSync(diskFile).size);
      } finally {
        closeSync(fd);
      }
    }
    const definition: VmDefinition = { machine: 'q35', cpus: 1, accel: 'tcg', kernel: KERNEL_FILE, append: testvmAppend(vm), ...(diskPath ? { disk0: basename(diskPath) } : {}) };
    const files = { memoryPaths: [memPath], qmpSocket: qmpPath, serialLog: logPath, ...(diskPath ? { diskPaths: [diskPath] } : {}) };
    // Without a disk, built as a running VM's and then made incoming without -S (qemuArgs'
    // `incoming` adds -S, gangway's flow): QEMU's own flow starts the destination when the
    // migration is done. With one, libvirt's flow continues the destination itself once the
    // disk is in sync (qemu-storage.ts), so it starts paused (-S).
    const args = qemuArgs(name, definition, [vm.memoryMiB * MiB], files, TESTVM_IMAGES_DIR, role === 'dst' && diskPath !== undefined);
    if (role === 'dst' && !diskPath) args.push('-incoming', 'defer');
    const { tls } = this.options;
    if (tls) args.push('-object', `tls-creds-x509,id=${TLS_CREDS_ID},dir=${tls.dir},endpoint=${role === 'src' ? 'client' : 'server'},verify-peer=on`);
    const link = this.options.link;
    const prefix = link.kind === 'netns' ? link.link.netnsExecPrefix(role === 'src' ? link.link.nsA : link.link.nsB) : [];
    const qemu = new QemuVm(name, memPath, qmpPath, logPath, [...prefix, QEMU_BINARY, ...args]);
    this.vms.push(qemu);
    return qemu;
  }

  async cleanUp(): Promise<string[]> {
    const problems: string[] = [];
    const attempt = async (what: string, step: () => Promise<unknown> | void) => {
      try {
        await step();
      } catch (err) {
        problems.push(`${what}: ${(err as Error).message}`);
      }
    };
    for (const counter of this.counters) await attempt('removing the wire counter', () => counter.close());
    await Promise.all(this.vms.map((vm) => attempt(`stopping ${vm.name}`, () => vm.stop())));
    for (const path of [...this.memoryFiles, ...this.diskFiles]) await attempt(`removing ${path}`, () => rmSync(path, { force: true }));
    await attempt(`removing ${this.dir}`, () => rmSync(this.dir, { recursive: true, force: true }));
    return problems;
  }
}

function bootTimeoutMs(vm: QemuBaselineVm, concurrent: number): number {
  // os-image boots at about 50 MiB/s of RAM under TCG on one core; margin for a busy host.
  return (15_000 + 60 * vm.memoryMiB) * Math.max(1, concurrent / 2);
}

function checkTimeoutMs(vm: QemuBaselineVm, concurrent: number): number {
  // A disk's full check reads its base and its written blocks: about 30 ms per MiB under TCG.
  const diskMiB = vm.disk ? ((vm.disk.baseBlocks + vm.disk.hotBlocks) * 4096) / MiB : 0;
  return (10_000 + 60 * vm.memoryMiB + 60 * diskMiB) * Math.max(1, concurrent / 2);
}

async function runGang(strategy: QemuBaselineDetail['strategy'], vm: QemuBaselineVm, count: number, options: QemuRunOptions): Promise<QemuBaselineRun> {
  validateVm(vm);
  validateOptions(options, vm, count);
  const log = options.log ?? (() => {});
  const ctx = new RunContext(options, log);
  let failure: unknown;
  try {
    const pairs: Pair[] = Array.from({ length: count }, (_, index) => {
      const pairVm = { ...vm, seed: vm.seed + index };
      const diskFile = options.diskFiles?.[index];
      return { index, vm: pairVm, source: ctx.startVm(index, pairVm, 'src', diskFile), ...(diskFile ? { diskFile } : {}) };
    });
    log(`qemu baseline: booting ${count} VM(s) of ${vm.memoryMiB} MiB (${vm.profile}, ${vm.dirtyRateMiBps} MiB/s of writes)`);
    await Promise.all(
      pairs.map(async (pair) => {
        await pair.source.connect(10_000, options.signal);
        await configure(pair.source, options, 'src');
        await pair.source.waitReady(bootTimeoutMs(pair.vm, count), options.signal);
      }),
    );
    const qemuVersion = (({ major, minor, micro }) => `${major}.${minor}.${micro}`)(pairs[0]!.source.qmp.version.qemu);

    const migrated: Migrated[] = [];
    const checks: QemuCheck[] = [];
    const waves: Wave[] = [];
    if (strategy === 'serial') {
      for (const pair of pairs) {
        await startDestination(ctx, pair);
        const wave = await migrateWave(ctx, [pair]);
        waves.push(wave);
        migrated.push(...wave.migrated);
        checks.push(await checkDestination(wave.migrated[0]!, checkTimeoutMs(pair.vm, count), options.signal));
        // The source is paused in postmigrate from now on; QEMU would refuse to migrate it again.
        await pair.source.stop();
      }
    } else {
      await Promise.all(pairs.map((pair) => startDestination(ctx, pair)));
      const wave = await migrateWave(ctx, pairs);
      waves.push(wave);
      migrated.push(...wave.migrated);
      checks.push(...(await Promise.all(wave.migrated.map((m) => checkDestination(m, checkTimeoutMs(m.pair.vm, count), options.signal)))));
    }
    const elapsedMs = Math.max(...migrated.map((m) => m.completedAt)) - Math.min(...migrated.map((m) => m.issuedAt));
    return summarize(strategy, options, vm, qemuVersion, waves, migrated, checks, elapsedMs);
  } catch (err) {
    failure = options.signal?.aborted && !(err instanceof QemuBaselineError)
      ? new QemuBaselineError(ErrorCode.ABORTED, `QEMU baseline aborted: ${String(options.signal.reason?.message ?? options.signal.reason)}`, undefined, { cause: err })
      : err;
    throw failure;
  } finally {
    const problems = await ctx.cleanUp();
    if (problems.length) {
      const message = `qemu baseline cleanup: ${problems.join('; ')}`;
      log(message);
      // A failed cleanup is reported, not hidden behind a result; the run's own error comes first.
      if (failure === undefined) throw new Error(message);
    }
  }
}

/**
 * Capabilities and parameters, the same on both sides (multifd's channel count must match);
 * with a disk, those libvirt always turns on (qemuMigrationParamsAlwaysOn): the source pauses
 * before the switchover, where the mirror is ended (qemu-storage.ts), the destination
 * activates its disks only when it runs.
 */
async function configure(qemu: QemuVm, options: QemuRunOptions, role: 'src' | 'dst'): Promise<void> {
  const capabilities: Partial<Record<MigrationCapability, boolean>> = { events: true };
  if (options.mode === 'multifd') capabilities.multifd = true;
  if (options.mode === 'postcopy') capabilities['postcopy-ram'] = true;
  if (options.diskFiles && role === 'src') capabilities['pause-before-switchover'] = true;
  if (options.diskFiles && role === 'dst') capabilities['late-block-activate'] = true;
  await qemu.qmp.migrateSetCapabilities(capabilities);
  await qemu.qmp.migrateSetParameters({
    'max-bandwidth': MAX_BANDWIDTH_BYTES_PER_SEC,
    'downtime-limit': options.downtimeLimitMs ?? DEFAULT_DOWNTIME_LIMIT_MS,
    ...(options.mode === 'multifd' ? { 'multifd-channels': options.multifdChannels ?? DEFAULT_MULTIFD_CHANNELS } : {}),
    ...(options.tls ? { 'tls-creds': TLS_CREDS_ID, ...(role === 'src' ? { 'tls-hostname': options.tls.hostname } : {}) } : {}),
  });
}

/** Starts the destination QEMU, configures it, and has it listen on a port of its choosing. */
async function startDestination(ctx: RunContext, pair: Pair): Promise<void> {
  const { link } = ctx.options;
  const destination = ctx.startVm(pair.index, pair.vm, 'dst', pair.diskFile);
  pair.destination = destination;
  await destination.connect(10_000, ctx.options.signal);
  await configure(destination, ctx.options, 'dst');
  // A loopback address per VM, so that iptables can tell the VMs' streams apart by address
  // and port without knowing the source's ephemeral port.
  const host = link.kind === 'netns' ? link.link.addrB : `127.0.0.${11 + pair.index}`;
  await destination.qmp.migrateIncoming(`tcp:${host}:0`);
  const info = (await destination.qmp.queryMigrate()) as MigrationInfo & { 'socket-address'?: { host: string; port: string }[] };
  const port = Number(info['socket-address']?.[0]?.port);
  if (!Number.isInteger(port) || port <= 0) throw new Error(`${destination.name} listens on no port QEMU reports: ${JSON.stringify(info)}`);
  pair.endpoints = [{ host, port }];
  if (pair.diskFile) {
    // QEMU 7.2 does not say which port an NBD server given port 0 took, so one is chosen
    // here: on loopback a port free on the VM's address; in the link's namespace, which
    // holds nothing else of this kind, a fixed one per VM.
    const nbdPort = link.kind === 'netns' ? NBD_NETNS_PORT + pair.index : await freePort(host);
    pair.nbd = { host, port: nbdPort, exportName: `mig-${vmDiskNodes(0).format}` };
    await exportIncomingDisk(destination.qmp, vmDiskNodes(0).format, pair.nbd);
    pair.endpoints.push({ host, port: nbdPort });
  }
}

/** A TCP port nobody listens on at `host` now (the kernel's choice for port 0). */
async function freePort(host: string): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve, reject) => server.once('error', reject).listen(0, host, resolve));
  const address = server.address();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  if (address === null || typeof address === 'string') throw new Error(`no port from a listener on ${host}`);
  return address.port;
}

/** VMs migrated at once, and the bytes the wire carried meanwhile. */
interface Wave {
  method: WireCounter['method'];
  wire: WireBytes;
  migrated: Migrated[];
}

/** Migrates every pair at once and follows each to completion; counts the wire meanwhile. */
async function migrateWave(ctx: RunContext, pairs: Pair[]): Promise<Wave> {
  const { options, log } = ctx;
  const endpoints = pairs.flatMap((pair) => pair.endpoints!);
  const counter = options.link.kind === 'loopback' ? await openIptablesCounter(endpoints) : await openVethCounter(options.link.link);
  ctx.counters.push(counter);
  try {
    const migrated = await Promise.all(pairs.map((pair) => migrateOne(ctx, pair)));
    const wire = await counter.read();
    // Each pair's endpoints, in the order given: the migration's, then its disk's.
    let first = 0;
    for (const m of migrated) {
      const own = wire.perEndpoint?.slice(first, first + m.pair.endpoints!.length);
      first += m.pair.endpoints!.length;
      m.wire = own ? sum(own) : pairs.length === 1 ? wire.total : undefined;
    }
    for (const m of migrated) {
      log(`qemu baseline: ${m.pair.source.name}: ${m.totalMs.toFixed(0)} ms, downtime ${m.downtimeMs.toFixed(0)} ms, QEMU sent ${m.info.ram?.transferred} B, wire ${m.wire ? m.wire.forwardBytes + m.wire.backBytes : '?'} B`);
    }
    return { method: counter.method, wire: wire.total, migrated };
  } finally {
    await counter.close();
  }
}

async function migrateOne(ctx: RunContext, pair: Pair): Promise<Migrated> {
  const source = pair.source;
  const destination = pair.destination!;
  try {
    return await migrateAndMeasure(ctx, pair);
  } catch (err) {
    if (err instanceof QemuBaselineError || ctx.options.signal?.aborted) throw err;
    // A QMP error alone rarely says why: a QEMU that exited says it on stderr.
    throw new QemuBaselineError(ErrorCode.GUEST_FAILED, `QEMU's migration of ${source.name}: ${(err as Error).message}; ${source.describe()}; ${destination.describe()}`, undefined, { cause: err });
  }
}

async function migrateAndMeasure(ctx: RunContext, pair: Pair): Promise<Migrated> {
  const { options } = ctx;
  const source = pair.source;
  const destination = pair.destination!;
  const before = readTestvmStatus(source.memPath);
  const staleBefore = before.stalePages;
  const sourceMark = source.qmp.eventMark();
  const destinationMark = destination.qmp.eventMark();
  const cpuSource = await source.cpuSeconds();
  const cpuDestination = await destination.cpuSeconds();
  const issuedWallMs = Date.now();
  const issuedAt = performance.now();
  const mirrorReady = pair.nbd ? await startMirror(source.qmp, vmDiskNodes(0).format, pair.nbd, { timeoutMs: options.timeoutMs, ...(options.signal ? { signal: options.signal } : {}) }) : undefined;
  // With a disk, the source pauses before the switchover (configure): as libvirt does, the
  // mirror is ended there, as soon as QEMU says so, and the migration continued.
  const switchover = new AbortController();
  let switchoverFailure: unknown;
  const mirrorDone = pair.nbd
    ? source.qmp
        .waitForEvent('MIGRATION', {
          since: sourceMark,
          predicate: (data) => data.status === 'pre-switchover',
          timeoutMs: options.timeoutMs,
          signal: options.signal ? AbortSignal.any([options.signal, switchover.signal]) : switchover.signal,
        })
        .then(async () => {
          const done = await finishMirror(source.qmp, options.signal);
          await source.qmp.exec('migrate-continue', { state: 'pre-switchover' });
          return done;
        })
    : undefined;
  mirrorDone?.catch((err: unknown) => (switchoverFailure ??= err));
  let postcopyStartedAfterMs: number | undefined;
  try {
    const migrationEndpoint = pair.endpoints![0]!;
    await source.qmp.migrate(`tcp:${migrationEndpoint.host}:${migrationEndpoint.port}`);
    ({ postcopyStartedAfterMs } = await followMigration(ctx, pair, issuedAt, () => switchoverFailure));
  } finally {
    switchover.abort();
  }
  let mirrorEnded: MirrorDone | undefined;
  if (mirrorDone) {
    mirrorEnded = await mirrorDone;
    await finishIncomingDisk(destination.qmp);
  }
  const completedAt = performance.now();
  const cpuSecondsSource = (await source.cpuSeconds()) - cpuSource;
  const cpuSecondsDestination = (await destination.cpuSeconds()) - cpuDestination;

  const wait = { timeoutMs: EVENT_TIMEOUT_MS, signal: options.signal };
  const isCompleted = (data: { status: MigrationStatus }) => data.status === 'completed';
  const stopped = await source.qmp.waitForEvent('STOP', { ...wait, since: sourceMark });
  const completed = await source.qmp.waitForEvent('MIGRATION', { ...wait, since: sourceMark, predicate: isCompleted });
  const resumed = await destination.qmp.waitForEvent('RESUME', { ...wait, since: destinationMark });
  // Until the destination's side is done too, post-copy may still be placing pages; the
  // check request must not land in a page QEMU has yet to fill.
  const received = await destination.qmp.waitForEvent('MIGRATION', { ...wait, since: destinationMark, predicate: isCompleted });
  const postcopyRan = source.qmp.recentEvents().some((e) => e.seq >= sourceMark && e.event === 'MIGRATION' && e.data.status === 'postcopy-active');
  const doneWallMs = Math.max(eventMs(completed), eventMs(resumed), eventMs(received));
  // The stopped source's counters are those the kernel had when it stopped.
  const atStop = mirrorReady && mirrorEnded ? readTestvmStatus(source.memPath).disk : undefined;
  return {
    pair,
    // Layout 2 has a disk part also without a disk (state none): only a VM given one is checked for it.
    ...(pair.diskFile && before.disk ? { diskBefore: { writes: before.disk.writes, staleBlocks: before.disk.staleBlocks } } : {}),
    ...(mirrorReady && mirrorEnded
      ? { disk: { ready: mirrorReady, done: mirrorEnded, writesWhileLive: (atStop?.writes ?? Number.NaN) - (before.disk?.writes ?? Number.NaN), liveMs: eventMs(stopped) - issuedWallMs } }
      : {}),
    info: await finalInfo(source, options.signal),
    totalMs: doneWallMs - issuedWallMs,
    downtimeMs: eventMs(resumed) - eventMs(stopped),
    cpuSecondsSource,
    cpuSecondsDestination,
    ...(postcopyStartedAfterMs === undefined ? {} : { postcopyStartedAfterMs }),
    postcopyRan,
    staleBefore,
    issuedAt,
    completedAt,
    issuedWallMs,
    doneWallMs,
  };
}

/**
 * Polls query-migrate until QEMU says completed; sends migrate-start-postcopy when due.
 * `failure`: what went wrong meanwhile in a step taken on an event (the switchover of a
 * migration with a disk), which would otherwise leave QEMU waiting for it.
 */
async function followMigration(ctx: RunContext, pair: Pair, issuedAt: number, failure: () => unknown = () => undefined): Promise<{ postcopyStartedAfterMs?: number }> {
  const { options } = ctx;
  const source = pair.source;
  let postcopyStartedAfterMs: number | undefined;
  for (;;) {
    const failed = failure();
    if (failed !== undefined) throw failed;
    const info = await source.qmp.queryMigrate({ signal: options.signal });
    const status: MigrationStatus | undefined = info.status;
    if (status === 'completed') return postcopyStartedAfterMs === undefined ? {} : { postcopyStartedAfterMs };
    if (status === 'failed' || status === 'cancelled') {
      throw new QemuBaselineError(ErrorCode.GUEST_FAILED, `QEMU's migration of ${source.name} ${status}: ${info['error-desc'] ?? 'no reason given'}; ${pair.destination!.describe()}`, info);
    }
    const sinceMs = performance.now() - issuedAt;
    if (options.mode === 'postcopy' && postcopyStartedAfterMs === undefined && status === 'active') {
      // dirty-sync-count 2: the bitmap was synced at the end of the first pass.
      const due = options.postcopyAfterMs !== undefined ? sinceMs >= options.postcopyAfterMs : (info.ram?.['dirty-sync-count'] ?? 0) >= 2;
      if (due) {
        await source.qmp.exec('migrate-start-postcopy');
        postcopyStartedAfterMs = sinceMs;
      }
    }
    if (sinceMs > options.timeoutMs) {
      throw new QemuBaselineError(
        status === 'active' ? ErrorCode.NON_CONVERGENCE : ErrorCode.TIMEOUT,
        `QEMU's migration of ${source.name} was not done within ${options.timeoutMs} ms: status ${status}, ` +
          `${info.ram?.['dirty-sync-count'] ?? 0} dirty syncs, expected downtime ${info['expected-downtime'] ?? '?'} ms against a limit of ${options.downtimeLimitMs ?? DEFAULT_DOWNTIME_LIMIT_MS} ms`,
        info,
      );
    }
    await sleep(POLL_MS, undefined, { signal: options.signal });
  }
}

/**
 * query-migrate once QEMU has filled in its times: 7.2 says completed a moment before it
 * computes total-time and downtime, and answers without them meanwhile.
 */
async function finalInfo(source: QemuVm, signal?: AbortSignal): Promise<MigrationInfo> {
  const deadline = performance.now() + EVENT_TIMEOUT_MS;
  for (;;) {
    const info = await source.qmp.queryMigrate({ signal });
    if (info['total-time'] !== undefined || performance.now() > deadline) return info;
    await sleep(POLL_MS, undefined, { signal });
  }
}

/** Asks the destination's kernel for a full check and waits for its answer (bounded). */
async function checkDestination(m: Migrated, timeoutMs: number, signal?: AbortSignal): Promise<QemuCheck> {
  const destination = m.pair.destination!;
  const started = performance.now();
  const unchecked = (problem: string, state: TestvmStatus['state'] = 'unknown'): QemuCheck => ({
    done: false,
    checkMs: performance.now() - started,
    state,
    pages: 0,
    stalePages: 0,
    staleByRewrites: 0,
    metaErrors: 0,
    problem,
  });
  let resumed: TestvmStatus;
  try {
    // A block that does not parse is a result, not an error of the benchmark: the page
    // holding it is one QEMU 7.2's TCG pre-copy is known to get wrong.
    resumed = readTestvmStatus(destination.memPath);
  } catch (err) {
    return unchecked(`the destination's status block: ${(err as Error).message} (bytes at 0x${TESTVM_STATUS_ADDR.toString(16)}: ${blockHead(destination.memPath)}, at the source: ${blockHead(m.pair.source.memPath)})`);
  }
  // The kernel publishes its counters every time round its loop, many times a second. One
  // whose block stands still did not survive the move, and is told apart from one that
  // stopped later, after the request was written.
  while (readTestvmStatus(destination.memPath).seq === resumed.seq) {
    if (performance.now() - started > KERNEL_ALIVE_MS) {
      return unchecked(`the kernel is not running at the destination: its status block did not change in ${KERNEL_ALIVE_MS} ms after the switchover (no check was requested); ${destination.describe()}`, resumed.state);
    }
    await sleep(POLL_MS, undefined, { signal });
  }
  const request = requestTestvmFullCheck(destination.memPath);
  const first = readTestvmStatus(destination.memPath);
  for (;;) {
    const status = readTestvmStatus(destination.memPath);
    const checkMs = performance.now() - started;
    const done = status.checkDone === request;
    if (done) {
      const disk = status.disk;
      // A kernel that gave its disk up (a request failed after a reset) checks nothing on it.
      const diskProblem = m.diskBefore && disk?.state !== 'running' ? `the kernel's disk is ${disk?.state ?? 'missing'} at the destination: ${destination.describe()}` : undefined;
      return {
        done: diskProblem === undefined,
        checkMs,
        state: status.state,
        pages: status.checkPages,
        stalePages: status.checkStalePages,
        staleByRewrites: Math.max(0, status.stalePages - m.staleBefore - status.checkStalePages),
        metaErrors: status.metaErrors,
        ...(m.diskBefore && disk
          ? {
              disk: {
                blocks: disk.checkBlocks,
                staleBlocks: disk.checkStaleBlocks,
                staleByRewrites: Math.max(0, disk.staleBlocks - m.diskBefore.staleBlocks - disk.checkStaleBlocks),
                errors: disk.errors,
              },
            }
          : {}),
        ...(diskProblem ? { problem: diskProblem } : {}),
      };
    }
    if (destination.exit) return unchecked(`QEMU exited before the check was done: ${destination.describe()}`, status.state);
    if (status.state !== 'running') return unchecked(`the kernel is ${status.state}: ${destination.describe()}`, status.state);
    if (checkMs > timeoutMs) {
      const moved = status.seq !== first.seq ? `its status block moved (uptime ${first.uptimeMs} -> ${status.uptimeMs} ms)` : 'its status block has not changed since the request: the kernel stopped running';
      return unchecked(`no answer to check request ${request} within ${timeoutMs.toFixed(0)} ms; ${moved}; ${destination.describe()}`, status.state);
    }
    await sleep(POLL_MS, undefined, { signal });
  }
}

/** The first 16 bytes of the status block's page in a memory file, in hex, for an error message. */
function blockHead(path: string): string {
  try {
    const fd = openSync(path, 'r');
    try {
      const head = Buffer.alloc(16);
      readSync(fd, head, 0, head.length, TESTVM_STATUS_ADDR);
      return head.toString('hex');
    } finally {
      closeSync(fd);
    }
  } catch (err) {
    return `unreadable (${(err as Error).message})`;
  }
}

function summarize(
  strategy: QemuBaselineDetail['strategy'],
  options: QemuRunOptions,
  vm: QemuBaselineVm,
  qemuVersion: string,
  waves: Wave[],
  migrated: Migrated[],
  checks: QemuCheck[],
  elapsedMs: number,
): QemuBaselineRun {
  const vms: QemuVmResult[] = migrated.map((m, i) => {
    const ram = m.info.ram;
    const check = checks[i]!;
    return {
      name: m.pair.source.name,
      status: 'completed',
      totalMs: m.totalMs,
      downtimeMs: m.downtimeMs,
      ...(m.wire ? { wireBytes: m.wire.forwardBytes + m.wire.backBytes } : {}),
      cpuSecondsSource: m.cpuSecondsSource,
      cpuSecondsDestination: m.cpuSecondsDestination,
      ...(m.postcopyStartedAfterMs === undefined ? {} : { postcopyStartedAfterMs: m.postcopyStartedAfterMs }),
      postcopyRan: m.postcopyRan,
      ...(m.disk ? { disk: m.disk } : {}),
      qemu: {
        totalMs: m.info['total-time'] ?? 0,
        downtimeMs: m.info.downtime ?? 0,
        setupMs: m.info['setup-time'] ?? 0,
        transferredBytes: ram?.transferred ?? 0,
        normalPages: ram?.normal ?? 0,
        duplicatePages: ram?.duplicate ?? 0,
        dirtySyncCount: ram?.['dirty-sync-count'] ?? 0,
        precopyBytes: ram?.['precopy-bytes'] ?? 0,
        downtimeBytes: ram?.['downtime-bytes'] ?? 0,
        postcopyBytes: ram?.['postcopy-bytes'] ?? 0,
        postcopyRequests: ram?.['postcopy-requests'] ?? 0,
        multifdBytes: ram?.['multifd-bytes'] ?? 0,
      },
      check,
    };
  });
  const wire = sum(waves.map((wave) => wave.wire));
  const total = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
  const serial = strategy === 'serial';
  return {
    system: 'qemu',
    mode: options.mode,
    link: options.link.kind,
    dirtyRateMiBps: vm.dirtyRateMiBps,
    vms: vms.length,
    totalMs: serial ? total(vms.map((v) => v.totalMs)) : Math.max(...migrated.map((m) => m.doneWallMs)) - Math.min(...migrated.map((m) => m.issuedWallMs)),
    downtimeMs: serial ? total(vms.map((v) => v.downtimeMs)) : Math.max(...vms.map((v) => v.downtimeMs)),
    wireBytes: wire.forwardBytes + wire.backBytes,
    stalePages: total(vms.map((v) => v.check.stalePages + v.check.staleByRewrites)),
    ...(vm.disk ? { staleDiskBlocks: total(vms.map((v) => (v.check.disk ? v.check.disk.staleBlocks + v.check.disk.staleByRewrites : 0))) } : {}),
    verified: vms.every((v) => v.check.done),
    cpuSecondsSource: total(vms.map((v) => v.cpuSecondsSource)),
    cpuSecondsDestination: total(vms.map((v) => v.cpuSecondsDestination)),
    detail: {
      strategy,
      qemuVersion,
      accel: 'tcg',
      memoryMiB: vm.memoryMiB,
      profile: vm.profile,
      wireBytesMethod: waves[0]!.method,
      wireBytesForward: wire.forwardBytes,
      wireBytesBack: wire.backBytes,
      qemuTransferredBytes: total(vms.map((v) => v.qemu.transferredBytes)),
      elapsedMs,
      preTouch: options.preTouch ?? true,
      downtimeLimitMs: options.downtimeLimitMs ?? DEFAULT_DOWNTIME_LIMIT_MS,
      maxBandwidthBytesPerSec: MAX_BANDWIDTH_BYTES_PER_SEC,
      ...(options.mode === 'multifd' ? { multifdChannels: options.multifdChannels ?? DEFAULT_MULTIFD_CHANNELS } : {}),
      tls: options.tls !== undefined,
      vms,
    },
  };
}
