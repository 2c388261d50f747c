// bench:disk — VMs with local raw disks moved by gangway (pre-copy of RAM and disks through
// the agents) and by QEMU 7.2's own storage migration as libvirt drives it for `virsh
// migrate --copy-storage-all` (bench/qemu-storage.ts: NBD mirror, then RAM), in one run.
//
// The VMs: gangway-testvm (native/testvm) under TCG, os-image RAM (256 MiB; 64 with
// --quick) rewriting 1 MiB/s of its pages, and a raw disk of 2 GiB with 1 GiB written: 700
// MiB of a base image shared by every VM (one gw.image_seed; a fifth of its blocks are zero,
// so holes), then 300 MiB of the VM's own seeded random data after it (bench/disk-image.ts),
// the rest holes. --quick: 256 MiB with 128 MiB written, 80 MiB of them base. The kernel
// rewrites blocks of its hot set at 0 or 20 MiB/s (gw.disk_rate, 4 KiB blocks) if it can:
// under TCG it reaches less, and the rate it reached during the migration, from its own
// counters, is reported. Every run boots fresh VMs on fresh images (the kernel expects a
// fresh base image at boot; QEMU refuses a second migration from a source in postmigrate).
//
// For each link (loopback, and the 1 Gbit/s netns link of bench/netns-link.ts), each case
// (one VM; a gang of 4) and each disk write rate:
//   gangway:  two agents with mutual TLS and their own disks directories, `migrate` (gang,
//             dedup) of the VMs and their disks;
//   QEMU:     qemu-baseline.ts with a disk: one VM, or the 4 migrated in parallel;
//   gangway RAM only: the same VMs moved with --disks none between two agents sharing one
//             disks directory (shared storage, fine on one host): the downtime a disk should
//             not add to.
// Measured as bench:qemu measures: wire bytes counted by the kernel for both systems
// (iptables on loopback, the link's veth counters), total time and downtime (QEMU's from its
// STOP and RESUME events, from the mirror's start; gangway's from its summary), and each
// VM's own full check of its RAM and its disk after it resumed at the destination (stale
// disk blocks × 8 = stale sectors).
//
// Post-copy (--techniques, default both): gangway also moves the single VM by `--technique
// postcopy` between the same two agents. The VM runs at the destination from the pause on,
// its drive an NBD export of the destination agent that fetches a missing block from the
// source ahead of the push; the run ends when the last page and block are in, checked, and
// the drive switched to the disk's file. Its figures are the time until the disk is complete
// there (diskCompleteMs: the summary's total, which ends then; a pre-copy's disk is complete
// at the commit, which ends its total, and QEMU's when its mirror ends inside its downtime,
// so its total stands for it), the post-copy phase itself, the guest's faults and their p99,
// compared with QEMU's run and gangway's pre-copy of the same link and disk write rate.
// The RAM-only baseline and QEMU stay pre-copy (QEMU's storage migration, libvirt's flow, is
// pre-copy only). Not the gang: post-copy members take no part in dedup groups, so a gang
// in post-copy is four single post-copies sharing the link, while each gang run boots and
// fully checks four VMs under TCG on these 2 cores (minutes, over the --quick budget) to
// show nothing the single run does not.
//
// Disks and RAM live on /dev/shm: the runs write GiBs of images and copies, which on the
// virtual disk would be flushed under the next runs. First touch of fresh memory costs about
// 3 s per GiB on these machines: the bench touches and frees what the biggest run holds first
// (bench/report.ts prefaultMemory).
import { copyFileSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { TESTVM_DISK_BLOCK_BYTES } from '../agent/guest/testvm-disk.js';
import { readTestvmStatus, runTestvmFullCheck, type TestvmStatus } from '../agent/guest/testvm-status.js';
import { logTail } from '../agent/guest/log-tail.js';
import type { LocalAgent } from '../agent/local-agent.js';
import type { GroupSummary } from '../agent/migration/group-summary.js';
import { loadNative, TESTVM_KERNEL_FILE } from '../agent/native.js';
import { until, vmsOn, withAgents, type Agents } from './agent-pair.js';
import { writeDiskImage, type DiskImage } from './disk-image.js';
import { ExitSteps } from './exit.js';
import { createShapedLink, netnsAvailable, type ShapedLink } from './netns-link.js';
import { qemuBaselineProblem, runQemuMigration, runQemuParallel, testvmAppend, TESTVM_IMAGES_DIR, type QemuBaselineRun, type QemuBaselineVm, type QemuLink } from './qemu-baseline.js';
import { barChartSvg, markdownTable, prefaultMemory, resultsDir, writeResults } from './report.js';
import { openIptablesCounter, openVethCounter, type WireCounter } from './wire-counter.js';
import { benchArgs } from './args.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const GBIT = 1e9;
const SECTOR_BYTES = 512;
const BLOCKS_PER_MIB = MiB / TESTVM_DISK_BLOCK_BYTES;

const USAGE = `usage: npm run bench:disk -- [--quick] [--json] [--link loopback|1gbit|both] [--cases single|gang|both] [--techniques precopy|postcopy|both]
  VMs with disks moved by gangway and by QEMU's own storage migration, in one run
examples:
  npm run bench:disk -- --quick --link loopback --cases single`;

const values = benchArgs('bench:disk', USAGE, {
  options: {
    quick: { type: 'boolean', default: false },
    json: { type: 'boolean', default: false },
    link: { type: 'string', default: 'both' },
    cases: { type: 'string', default: 'both' },
    techniques: { type: 'string', default: 'both' },
  },
});
const GANG = 4;
if (!['single', 'gang', 'both'].includes(values.cases!)) {
  console.error(`--cases must be single (one VM), gang (${GANG} VMs of one base image) or both, got ${values.cases}`);
  process.exit(2);
}
if (!['loopback', '1gbit', 'both'].includes(values.link!)) {
  console.error(`--link must be loopback, 1gbit or both, got ${values.link}`);
  process.exit(2);
}
if (!['precopy', 'postcopy', 'both'].includes(values.techniques!)) {
  console.error(`--techniques must be precopy, postcopy (gangway's runs with disks; the single VM only) or both, got ${values.techniques}`);
  process.exit(2);
}
if (values.techniques === 'postcopy' && values.cases === 'gang') {
  console.error('--techniques postcopy runs the single VM only (see the header of bench/disk.ts): nothing to run with --cases gang');
  process.exit(2);
}
type Technique = 'precopy' | 'postcopy';
const TECHNIQUES: Technique[] = values.techniques === 'both' ? ['precopy', 'postcopy'] : [values.techniques as Technique];

// --quick is sized for about 10 minutes of the whole bench on a 2-core machine: the kernels'
// full checks (about 30 ms per MiB of disk base under TCG, every VM) and QEMU's mirror
// (about 50 MB/s here) dominate a run.
const DISK = values.quick
  ? { sizeBytes: 256 * MiB, writtenBytes: 128 * MiB, baseBytes: 80 * MiB, hotBlocks: 2048 }
  : { sizeBytes: 2 * GiB, writtenBytes: 1 * GiB, baseBytes: 700 * MiB, hotBlocks: 16384 };
const MEMORY_MIB = values.quick ? 64 : 256;
const DISK_RATES_MIBPS = [0, 20];
const IMAGE_SEED = 7;
/** The VMs' RAM: as bench:qemu's gang (os-image, 80% of its pages from the shared image), rewriting 1 MiB/s. */
const VM: Omit<QemuBaselineVm, 'disk'> = { memoryMiB: MEMORY_MIB, profile: 'os-image', dirtyRateMiBps: 1, seed: 1, imageSeed: IMAGE_SEED, sharedPermille: 800, hotPermille: 50 };
/** Bounds each migration (the mirror's start to the last VM running at the destination for QEMU). */
const MIGRATION_TIMEOUT_MS = values.quick ? 240_000 : 900_000;
const BOOT_TIMEOUT_MS = 300_000;
/**
 * A full check reads every base and written block (about 30 ms per MiB under TCG) and every
 * page; VMs checked at once share 2 cores, and a gang's kernels writing their disks flat out
 * took up to 40 s for what one idle VM checks in 4 s. A bound, with room.
 */
const CHECK_TIMEOUT_MS = (30_000 + 150 * (MEMORY_MIB + DISK.baseBytes / MiB + DISK.hotBlocks / BLOCKS_PER_MIB)) * (GANG / 2);
const DOWNTIME_TARGET_MS = 50;

function log(line: string) {
  if (!values.json) console.error(line);
}

type LinkName = 'loopback' | '1gbit';
type Mode = 'single' | 'gang';

export interface Run {
  system: 'gangway' | 'qemu';
  /** gangway's `--technique`; QEMU's storage migration and the RAM-only baseline are always pre-copy. */
  technique: Technique;
  mode: Mode;
  /** copied: the disks move with the VMs; shared: they stay on storage both hosts see (gangway --disks none), the RAM-only baseline. */
  storage: 'copied' | 'shared';
  link: LinkName;
  vms: number;
  /** Asked of each VM's kernel, MiB/s. */
  diskWriteRate: number;
  /**
   * What the kernels reached while their VMs ran during the migration (mean over the VMs),
   * MiB/s: at the source, and in a post-copy mostly at the destination, through its agent.
   */
  diskWriteRateReached: number;
  /**
   * Data on the VMs' disks (not holes) when the migration started, plus what the kernels
   * wrote during it (4 KiB a write); a post-copy's, up to when the destination listed the
   * guests as its own, seconds after its total (see runGangway).
   */
  diskWrittenBytes: number;
  /** Both directions, counted by the kernel (detail.wireMethod). */
  wireBytes: number;
  totalMs: number;
  /** The longest of the VMs'. */
  downtimeMs: number;
  /**
   * The migration's start to the disks complete at the destination, for runs that copied
   * them: the total. A post-copy's ends there (the last block in and checked, the drive on
   * its file), and a pre-copy's at the commit, when its disks are complete. QEMU's disks are
   * complete when its mirror ends, in the pause before the switchover: its total is later
   * by less than its downtime, and stands for it.
   */
  diskCompleteMs?: number;
  /** Post-copy: the guests running at the destination to the last page and block in and checked (the longest of the VMs'). */
  postcopyMs?: number;
  /** Post-copy: the guests' faults on missing pages and blocks as the destination saw them (all VMs), and the worst p99 of their latency. */
  faults?: number;
  faultP99Ms?: number;
  /** Disk blocks × 8 found stale at the destination: by the full check, and by the kernel's rewrites since the switchover. */
  staleSectors: number;
  stalePages: number;
  /** Every VM arrived and its full check (RAM and disk) completed; gangway's own verification passed. */
  verified: boolean;
  /** Why the run did not complete (then the figures are NaN). */
  error?: string;
  detail?: unknown;
}

const exit = new ExitSteps('stopping the agents and VMs, removing the link, the disks and the iptables chains');
const workDir = mkdtempSync('/dev/shm/gangway-bench-disk-');
exit.add(async () => rmSync(workDir, { recursive: true, force: true }));
/** Aborted on the way out: a QEMU run then stops its QEMUs and removes its chain itself (qemu-baseline.ts), and is waited for. */
const interrupt = new AbortController();
let qemuRunning: Promise<unknown> | undefined;
/** gangway's runs' iptables chain, while one is installed. */
let gangwayCounter: WireCounter | undefined;

/** The kernel's disk workload and the image of VM `index` of a case. */
function diskOf(rateMiBps: number): NonNullable<QemuBaselineVm['disk']> {
  return { baseBlocks: DISK.baseBytes / TESTVM_DISK_BLOCK_BYTES, hotBlocks: DISK.hotBlocks, rateBlocksPerSec: Math.round(rateMiBps * BLOCKS_PER_MIB) };
}

let imageCounter = 0;
function writeImage(path: string, vm: QemuBaselineVm): DiskImage {
  return writeDiskImage(path, {
    sizeBytes: DISK.sizeBytes,
    baseBlocks: vm.disk!.baseBlocks,
    imageSeed: BigInt(IMAGE_SEED),
    ownBytes: DISK.writtenBytes - DISK.baseBytes,
    ownSeed: 1000 + imageCounter++,
    kernelSeed: BigInt(vm.seed),
    hotBlocks: vm.disk!.hotBlocks,
  });
}

const vmOf = (seed: number, rateMiBps: number): QemuBaselineVm => ({ ...VM, seed, disk: diskOf(rateMiBps) });

// ── gangway's side ──────────────────────────────────────────────────────────────────────

interface GangwayPairs {
  /** Each agent its own disks directory: the disks move. */
  copying: Agents & { disksDirs: [string, string] };
  /** One disks directory for both: shared storage, RAM only. */
  sharing: Agents & { disksDirs: [string, string] };
}

/**
 * What each agent's log said last at warn level or above, for a failure's report; the whole
 * logs are kept under bench/results (the agents' directories go at the end of the run).
 */
function agentLogs(run: string, ...agents: LocalAgent[]): string[] {
  const keptDir = join(resultsDir, `disk-agent-logs-${process.pid}`);
  mkdirSync(keptDir, { recursive: true });
  return agents.map((agent, i) => {
    const kept = join(keptDir, `${run}-${i === 0 ? 'source' : 'destination'}.log`);
    copyFileSync(agent.logPath, kept);
    return `${kept}: ${logTail(agent.logPath, 400).split(' | ').filter((line) => /"level":("(warn|error|fatal)"|[456]0)/.test(line)).slice(-6).join(' | ') || '(nothing at warn or above)'}`;
  });
}

let vmCounter = 0;

async function runGangway(
  agents: Agents & { disksDirs: [string, string] },
  shaped: ShapedLink | undefined,
  link: LinkName,
  count: number,
  rateMiBps: number,
  storage: Run['storage'],
  technique: Technique,
): Promise<Run> {
  const { source, destination, to } = agents;
  const names = Array.from({ length: count }, () => `bd-${process.pid}-${vmCounter++}`);
  const vms = names.map((_, i) => vmOf(VM.seed + i, rateMiBps));
  const files = names.map((name) => `${name}.raw`);
  let counter: WireCounter | undefined;
  const started = performance.now();
  const seconds = () => ((performance.now() - started) / 1000).toFixed(1);
  try {
    const images = files.map((file, i) => writeImage(join(agents.disksDirs[0], file), vms[i]!));
    for (const [i, name] of names.entries()) {
      await source.client.call('POST', '/v1/vms', {
        name,
        definition: { machine: 'q35', cpus: 1, accel: 'tcg', kernel: TESTVM_KERNEL_FILE, append: testvmAppend(vms[i]!) },
        regionBytes: [MEMORY_MIB * MiB],
        disks: [files[i]],
      });
    }
    await until('the VMs to boot', async () => {
      const guests = await vmsOn(source, names);
      return guests.length === count && guests.every((g) => g.testvm?.state === 'running');
    }, BOOT_TIMEOUT_MS);
    const before = await vmsOn(source, names);
    const beforeAt = performance.now();
    log(`  gangway: ${count} VM(s) booted at ${seconds()} s; migrating ${storage === 'copied' ? 'with their disks' : 'RAM only (--disks none)'} by ${technique}`);
    counter = shaped ? await openVethCounter(shaped) : await openIptablesCounter([{ host: '127.0.0.1', port: Number(to.slice(to.lastIndexOf(':') + 1)) }]);
    gangwayCounter = counter;
    let summary: GroupSummary;
    const timeout = new AbortController();
    try {
      summary = await Promise.race([
        // Dedup is asked for the pre-copy only: the agent moves post-copy members without it anyway.
        source.client.migrate({ guests: names, to, technique, strategy: 'gang', dedup: technique === 'precopy', disks: storage === 'copied' ? 'all' : 'none' }),
        sleep(MIGRATION_TIMEOUT_MS, undefined, { signal: timeout.signal }).then(() => {
          throw new Error(`did not complete within ${MIGRATION_TIMEOUT_MS} ms`);
        }),
      ]);
    } finally {
      timeout.abort();
    }
    const wire = await counter.read();
    const failed = summary.failed.map((f) => `${f.guest}: ${f.code}: ${f.message}`);
    // A post-copy's summary comes with the destination's verdict, sent once the disks were
    // complete and the drives on their files; the destination forgets where the guests came
    // from just after. The full checks wait for that, so that they read the disks as the
    // guests keep them, with the agent out of their I/O path.
    let settledMs: number | undefined;
    if (technique === 'postcopy' && failed.length === 0) {
      const returned = performance.now();
      try {
        await until('the destination to hold every page and block', async () => (await vmsOn(destination, names)).every((g) => !g.incoming), 30_000);
        settledMs = performance.now() - returned;
      } catch (err) {
        failed.push((err as Error).message);
      }
    }
    const arrived = await vmsOn(destination, names);
    const arrivedAt = performance.now();
    log(`  gangway: migrated at ${seconds()} s; full checks at the destination`);
    const checks = await Promise.all(arrived.map((g) => fullCheck(g.memoryPath)));
    log(`  gangway: checked at ${seconds()} s`);
    const beforeOf = (i: number) => before.find((g) => g.name === arrived[i]!.name)?.testvm;
    const writesDuring = arrived.map((g, i) => (g.testvm?.disk?.writes ?? Number.NaN) - (beforeOf(i)?.disk?.writes ?? Number.NaN));
    // The writes counted are those between the two reads of the kernels' counters. A
    // pre-copy's total is most of that time. A post-copy's is not: in a first run here its
    // `migrate` took 5 s longer than its total, and the destination listed the guest as its
    // own 5 s after that, the kernel writing on all along; so its rate is taken over the
    // whole time between the reads.
    const liveMs = summary.guests.map((g) => (technique === 'postcopy' ? arrivedAt - beforeAt : g.totalMs) - g.downtimeMs);
    const staleBlocks = checks.map((c, i) =>
      c.status?.disk ? c.status.disk.checkStaleBlocks + Math.max(0, c.status.disk.staleBlocks - (beforeOf(i)?.disk?.staleBlocks ?? 0) - c.status.disk.checkStaleBlocks) : 0,
    );
    const stalePages = checks.map((c, i) => (c.status ? c.status.checkStalePages + Math.max(0, c.status.stalePages - (beforeOf(i)?.stalePages ?? 0) - c.status.checkStalePages) : 0));
    const problems = [...failed, ...checks.flatMap((c) => (c.problem ? [c.problem] : []))];
    if (arrived.length !== count) problems.push(`${arrived.length} of ${count} VMs at the destination`);
    const postcopies = summary.guests.flatMap((g) => (g.postcopy ? [g.postcopy] : []));
    if (technique === 'postcopy' && postcopies.length !== summary.guests.length) {
      problems.push(`${summary.guests.length - postcopies.length} of ${summary.guests.length} summaries without their post-copy`);
    }
    const verified = problems.length === 0 && summary.guests.every((g) => g.verified);
    return {
      system: 'gangway',
      technique,
      mode: count > 1 ? 'gang' : 'single',
      storage,
      link,
      vms: count,
      diskWriteRate: rateMiBps,
      diskWriteRateReached: meanRateMiBps(writesDuring, liveMs),
      diskWrittenBytes: sum(images.map((image) => image.dataBytes)) + sum(writesDuring) * TESTVM_DISK_BLOCK_BYTES,
      wireBytes: wire.total.forwardBytes + wire.total.backBytes,
      totalMs: summary.totalMs,
      downtimeMs: summary.maxDowntimeMs,
      ...(storage === 'copied' ? { diskCompleteMs: summary.totalMs } : {}),
      ...(technique === 'postcopy'
        ? {
            postcopyMs: max(postcopies.map((p) => p.durationMs)),
            faults: sum(postcopies.map((p) => p.faults)),
            faultP99Ms: max(postcopies.map((p) => p.faultLatency.p99Ms)),
          }
        : {}),
      staleSectors: (sum(staleBlocks) * TESTVM_DISK_BLOCK_BYTES) / SECTOR_BYTES,
      stalePages: sum(stalePages),
      verified,
      ...(problems.length ? { error: problems.join('; ').slice(0, 2000) } : {}),
      detail: {
        wireMethod: counter.method,
        wireForwardBytes: wire.total.forwardBytes,
        wireBackBytes: wire.total.backBytes,
        gangwayWireBytes: summary.wireBytes,
        /** The whole `migrate` command as the agent timed it, session set-up and the source's clean-up included. */
        commandMs: summary.elapsedMs,
        dedupStats: summary.dedupStats,
        imageDataBytes: images.map((image) => image.dataBytes),
        diskWritesDuring: writesDuring,
        rounds: summary.guests.map((g) => g.rounds.length),
        downtime: summary.guests.map((g) => g.downtime),
        repairedPages: summary.repairedPages,
        ...(technique === 'postcopy' ? { postcopy: postcopies, settledAfterSummaryMs: settledMs } : {}),
        checks: checks.map((c) => c.summary),
        ...(problems.length ? { agentLogs: agentLogs(names[0]!, source, destination) } : {}),
      },
    };
  } catch (err) {
    throw new Error(`${err instanceof Error ? err.message : String(err)}; ${agentLogs(names[0]!, source, destination).join('; ')}`, { cause: err });
  } finally {
    await counter?.close();
    gangwayCounter = undefined;
    for (const agent of [source, destination]) {
      for (const name of names) await agent.client.call('DELETE', `/v1/guests/${name}`).catch(() => {});
    }
    for (const dir of agents.disksDirs) for (const file of files) rmSync(join(dir, file), { force: true });
  }
}

/** The kernel's full check at the destination (its RAM file): the status that answers it, or why there is none. */
async function fullCheck(memoryPath: string): Promise<{ status?: TestvmStatus; problem?: string; summary: Record<string, unknown> }> {
  try {
    const status = await runTestvmFullCheck(memoryPath, CHECK_TIMEOUT_MS);
    const disk = status.disk;
    const problem = disk?.state !== 'running' ? `the kernel's disk is ${disk?.state ?? 'missing'} at the destination` : undefined;
    return {
      status,
      ...(problem ? { problem } : {}),
      summary: { pages: status.checkPages, stalePages: status.checkStalePages, blocks: disk?.checkBlocks, staleBlocks: disk?.checkStaleBlocks, diskErrors: disk?.errors, metaErrors: status.metaErrors },
    };
  } catch (err) {
    let state = '';
    try {
      const status = readTestvmStatus(memoryPath);
      state = `; then: kernel ${status.state}, uptime ${status.uptimeMs} ms, check request ${status.checkRequest} answered up to ${status.checkDone}, disk ${status.disk?.state} with ${status.disk?.writes} writes, ${status.disk?.staleBlocks} stale blocks and ${status.disk?.errors} errors`;
    } catch (readErr) {
      state = `; its status block: ${(readErr as Error).message}`;
    }
    const problem = `${memoryPath}: ${(err as Error).message}${state}`;
    return { problem, summary: { problem } };
  }
}

// ── QEMU's side ─────────────────────────────────────────────────────────────────────────

async function runQemu(qemuLink: QemuLink, link: LinkName, count: number, rateMiBps: number): Promise<Run> {
  const vm = vmOf(VM.seed, rateMiBps);
  const dir = mkdtempSync(join(workDir, 'q-'));
  try {
    // VM i runs with seed vm.seed + i (qemu-baseline's gang): its image leaves that kernel's hot set out.
    const diskFiles = Array.from({ length: count }, (_, i) => join(dir, `${i}-src.raw`));
    const images = diskFiles.map((file, i) => writeImage(file, { ...vm, seed: vm.seed + i }));
    const options = { vm, link: qemuLink, mode: 'precopy' as const, workDir: dir, diskFiles, timeoutMs: MIGRATION_TIMEOUT_MS, signal: interrupt.signal, log: (line: string) => log(`  ${line}`) };
    const running = count === 1 ? runQemuMigration(options) : runQemuParallel({ ...options, count });
    qemuRunning = running;
    const run: QemuBaselineRun = await running;
    const vms = run.detail.vms;
    const writesDuring = vms.map((v) => v.disk?.writesWhileLive ?? Number.NaN);
    const problems = vms.flatMap((v) => (v.check.problem ? [`${v.name}: ${v.check.problem}`] : []));
    return {
      system: 'qemu',
      technique: 'precopy',
      mode: count > 1 ? 'gang' : 'single',
      storage: 'copied',
      link,
      vms: count,
      diskWriteRate: rateMiBps,
      diskWriteRateReached: meanRateMiBps(writesDuring, vms.map((v) => v.disk?.liveMs ?? Number.NaN)),
      diskWrittenBytes: sum(images.map((image) => image.dataBytes)) + sum(writesDuring) * TESTVM_DISK_BLOCK_BYTES,
      wireBytes: run.wireBytes,
      totalMs: run.totalMs,
      downtimeMs: run.downtimeMs,
      diskCompleteMs: run.totalMs,
      staleSectors: ((run.staleDiskBlocks ?? Number.NaN) * TESTVM_DISK_BLOCK_BYTES) / SECTOR_BYTES,
      stalePages: run.stalePages,
      verified: run.verified,
      ...(problems.length ? { error: problems.join('; ').slice(0, 2000) } : {}),
      detail: {
        wireMethod: run.detail.wireBytesMethod,
        wireForwardBytes: run.detail.wireBytesForward,
        wireBackBytes: run.detail.wireBytesBack,
        qemuRamTransferredBytes: run.detail.qemuTransferredBytes,
        imageDataBytes: images.map((image) => image.dataBytes),
        diskWritesDuring: writesDuring,
        mirror: vms.map((v) => v.disk && { readyAfterMs: v.disk.ready.readyAfterMs, processedBytes: v.disk.done.offsetBytes, endedBy: v.disk.done.event, cancelMs: v.disk.done.cancelMs }),
        qemuDowntimeMs: vms.map((v) => v.qemu.downtimeMs),
        checks: vms.map((v) => ({ ...v.check.disk, pages: v.check.pages, stalePages: v.check.stalePages, done: v.check.done })),
      },
    };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

// ── the runs ────────────────────────────────────────────────────────────────────────────

const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
/** The largest, NaN for none (Math.max gives -Infinity, which JSON would write as null without saying why). */
const max = (xs: number[]) => (xs.length ? Math.max(...xs) : NaN);

/** Mean over the VMs of writes / live time, in MiB/s. */
function meanRateMiBps(writes: number[], liveMs: number[]): number {
  const rates = writes.map((w, i) => (w * TESTVM_DISK_BLOCK_BYTES) / MiB / (liveMs[i]! / 1000));
  return sum(rates) / rates.length;
}

function failedRun(base: Pick<Run, 'system' | 'technique' | 'mode' | 'storage' | 'link' | 'vms' | 'diskWriteRate'>, err: unknown): Run {
  const message = err instanceof Error ? err.message : String(err);
  log(`  ${base.system} ${base.storage} ${base.technique}: FAILED: ${message}`);
  return { ...base, diskWriteRateReached: NaN, diskWrittenBytes: NaN, wireBytes: NaN, totalMs: NaN, downtimeMs: NaN, staleSectors: NaN, stalePages: NaN, verified: false, error: message.slice(0, 4000) };
}

function logRun(run: Run): void {
  if (Number.isNaN(run.totalMs)) return;
  const postcopy = run.technique === 'postcopy' ? `, post-copy ${((run.postcopyMs ?? NaN) / 1000).toFixed(2)} s with ${run.faults} faults (p99 ${run.faultP99Ms?.toFixed(1)} ms)` : '';
  log(
    `  ${run.system} ${run.storage === 'shared' ? 'RAM only (shared disks)' : `with disks, ${run.technique}`}: total ${(run.totalMs / 1000).toFixed(2)} s, downtime ${run.downtimeMs.toFixed(0)} ms${postcopy}, ` +
      `wire ${(run.wireBytes / MiB).toFixed(0)} MiB of ${(run.diskWrittenBytes / MiB).toFixed(0)} MiB written, disk writes ${run.diskWriteRateReached.toFixed(1)} MiB/s, ` +
      `stale sectors ${run.staleSectors}, stale pages ${run.stalePages}${run.verified ? '' : ' NOT VERIFIED'}${run.error ? ` (${run.error})` : ''}`,
  );
}

const runs: Run[] = [];
let linkNote: string | undefined;
let postcopyNote: string | undefined;
/** The techniques gangway's runs with disks take: --techniques, less post-copy where this host cannot run it. */
let techniques = TECHNIQUES;

try {
  const links: { name: LinkName; shaped?: ShapedLink }[] = [];
  if (values.link !== '1gbit') {
    const problem = await qemuBaselineProblem('loopback');
    if (problem) throw new Error(`bench:disk cannot run: ${problem}`);
    links.push({ name: 'loopback' });
  }
  if (values.link !== 'loopback') {
    const available = await netnsAvailable();
    const problem = available.ok ? await qemuBaselineProblem('netns') : available.reason;
    if (problem) {
      linkNote = `no 1 Gbit/s netns link: ${problem}`;
      log(linkNote);
    } else {
      const shaped = await createShapedLink({ name: `d${process.pid % 100000}`, rateBitsPerSec: GBIT });
      exit.add(() => shaped.close());
      links.push({ name: '1gbit', shaped });
    }
  }
  // Runs first on the way out (steps run last-added first): what runs now stops before the agents and the link go.
  exit.add(async () => {
    interrupt.abort(new Error('interrupted'));
    await qemuRunning?.catch(() => {});
    await gangwayCounter?.close();
  });
  // The agents offer post-copy where userfaultfd works for them: these agents run here, as this process.
  if (techniques.includes('postcopy') && !loadNative().uffdProbe()) {
    const problem = 'userfaultfd does not work here, and the agents offer post-copy only where it does';
    if (!techniques.includes('precopy')) throw new Error(`bench:disk cannot run post-copy: ${problem}`);
    postcopyNote = `no post-copy runs: ${problem}`;
    log(postcopyNote);
    techniques = ['precopy'];
  }
  // The gang runs gangway by pre-copy only (the header says why): without it, its QEMU and
  // RAM-only runs would compare with nothing.
  const modes: Mode[] = (values.cases === 'both' ? (['single', 'gang'] as const) : [values.cases as Mode]).filter((m) => m === 'single' || techniques.includes('precopy'));
  if (values.cases === 'both' && !modes.includes('gang')) log('no gang runs: post-copy runs the single VM only');
  // The biggest run holds each VM's image and its copy, and RAM at both ends.
  const touch = Math.max(...modes.map((m) => (m === 'gang' ? GANG : 1))) * 2 * (DISK.writtenBytes + MEMORY_MIB * MiB);
  const prefaultMs = prefaultMemory(touch);
  log(`prefaulted ${touch / MiB} MiB in ${(prefaultMs / 1000).toFixed(1)} s (first touch of fresh memory is slow on this VM)`);

  for (const { name: link, shaped } of links) {
    if (exit.interrupted) break;
    const qemuLink: QemuLink = shaped ? { kind: 'netns', link: shaped } : { kind: 'loopback' };
    const dirs = ['src', 'dst', 'shared'].map((d) => join(workDir, `${link}-${d}`));
    for (const dir of dirs) mkdirSync(dir);
    const [srcDir, dstDir, sharedDir] = dirs as [string, string, string];
    const pairArgs = (disksDir: (role: 'source' | 'destination') => string) => (role: 'source' | 'destination') => ['--vm-images-dir', TESTVM_IMAGES_DIR, '--vm-disks-dir', disksDir(role)];
    await withAgents(exit, { tmpPrefix: 'gangway-bench-disk-', ...(shaped ? { shaped } : {}), args: pairArgs((role) => (role === 'source' ? srcDir : dstDir)) }, (copying) =>
      withAgents(exit, { tmpPrefix: 'gangway-bench-disk-', ...(shaped ? { shaped } : {}), args: pairArgs(() => sharedDir) }, async (sharing) => {
        const pairs: GangwayPairs = { copying: { ...copying, disksDirs: [srcDir, dstDir] }, sharing: { ...sharing, disksDirs: [sharedDir, sharedDir] } };
        for (const mode of modes) {
          const count = mode === 'gang' ? GANG : 1;
          for (const rate of DISK_RATES_MIBPS) {
            if (exit.interrupted) return;
            log(`${link}, ${count} VM(s) of ${MEMORY_MIB} MiB with a ${DISK.sizeBytes / MiB} MiB disk (${DISK.writtenBytes / MiB} MiB written, ${DISK.baseBytes / MiB} MiB shared base), disk writes ${rate} MiB/s:`);
            // Interleaved, so that drift on this shared machine hits both systems alike; the
            // post-copy last, so that the pre-copy runs go as they did before it was measured.
            const plan: [Run['system'], Technique, Run['storage'], () => Promise<Run>][] = [];
            if (techniques.includes('precopy')) plan.push(['gangway', 'precopy', 'copied', () => runGangway(pairs.copying, shaped, link, count, rate, 'copied', 'precopy')]);
            plan.push(['qemu', 'precopy', 'copied', () => runQemu(qemuLink, link, count, rate)]);
            plan.push(['gangway', 'precopy', 'shared', () => runGangway(pairs.sharing, shaped, link, count, rate, 'shared', 'precopy')]);
            if (techniques.includes('postcopy') && mode === 'single') plan.push(['gangway', 'postcopy', 'copied', () => runGangway(pairs.copying, shaped, link, count, rate, 'copied', 'postcopy')]);
            for (const [system, technique, storage, body] of plan) {
              if (exit.interrupted) return;
              let run: Run;
              try {
                run = await body();
              } catch (err) {
                run = failedRun({ system, technique, mode, storage, link, vms: count, diskWriteRate: rate }, err);
              }
              runs.push(run);
              logRun(run);
            }
          }
        }
      }),
    );
  }
} finally {
  await exit.run();
}

// ── report ──────────────────────────────────────────────────────────────────────────────

const completed = (r: Run | undefined): r is Run => r !== undefined && !Number.isNaN(r.totalMs);
/** Completed with every VM moved and checked: a run whose figures compare. */
const clean = (r: Run | undefined): r is Run => completed(r) && r.verified && r.error === undefined;
const comparisons: Record<string, unknown>[] = [];
for (const link of [...new Set(runs.map((r) => r.link))]) {
  for (const mode of ['single', 'gang'] as const) {
    for (const rate of DISK_RATES_MIBPS) {
      const find = (system: Run['system'], storage: Run['storage'], technique: Technique = 'precopy') =>
        runs.find((r) => r.link === link && r.mode === mode && r.diskWriteRate === rate && r.system === system && r.storage === storage && r.technique === technique);
      const ours = find('gangway', 'copied');
      const theirs = find('qemu', 'copied');
      const ramOnly = find('gangway', 'shared');
      const postcopy = find('gangway', 'copied', 'postcopy');
      if (!ours && !theirs && !postcopy) continue;
      const ratio = (a: number, b: number) => (b > 0 ? a / b : NaN);
      const both = clean(ours) && clean(theirs);
      /** Post-copy / `other` where both moved and checked every VM (NaN otherwise). */
      const postcopyRatios = (other: Run | undefined) => {
        const ok = clean(postcopy) && clean(other);
        return {
          downtime: ok ? ratio(postcopy.downtimeMs, other.downtimeMs) : NaN,
          total: ok ? ratio(postcopy.totalMs, other.totalMs) : NaN,
          diskComplete: ok ? ratio(postcopy.diskCompleteMs!, other.diskCompleteMs!) : NaN,
          wire: ok ? ratio(postcopy.wireBytes, other.wireBytes) : NaN,
        };
      };
      comparisons.push({
        link,
        mode,
        vms: ours?.vms ?? theirs?.vms ?? postcopy?.vms,
        diskWriteRate: rate,
        /** gangway / QEMU, from runs that moved and checked every VM (NaN otherwise). */
        ratios: {
          wire: both ? ratio(ours.wireBytes, theirs.wireBytes) : NaN,
          total: both ? ratio(ours.totalMs, theirs.totalMs) : NaN,
          downtime: both ? ratio(ours.downtimeMs, theirs.downtimeMs) : NaN,
        },
        /** Each null when a run it needs did not move and check every VM. */
        targets: {
          /** Sparse extents never sent: wire at most the disks' data written plus the VMs' RAM. */
          gangwayWireWithinWritten: clean(ours) ? ours.wireBytes <= ours.diskWrittenBytes + ours.vms * MEMORY_MIB * MiB : null,
          qemuWireWithinWritten: clean(theirs) ? theirs.wireBytes <= theirs.diskWrittenBytes + theirs.vms * MEMORY_MIB * MiB : null,
          /** The gang sends at most half of QEMU's bytes. */
          ...(mode === 'gang' ? { gangAtMostHalfOfQemu: both ? ours.wireBytes <= theirs.wireBytes / 2 : null } : {}),
          /** Downtime within 50 ms of the same VMs' RAM-only migration. */
          downtimeOverRamOnlyMs: clean(ours) && clean(ramOnly) ? ours.downtimeMs - ramOnly.downtimeMs : null,
          downtimeWithin50MsOfRamOnly: clean(ours) && clean(ramOnly) ? ours.downtimeMs - ramOnly.downtimeMs <= DOWNTIME_TARGET_MS : null,
          /** Every VM moved, nothing stale at the destination. */
          gangwayClean: ours ? clean(ours) && ours.staleSectors === 0 && ours.stalePages === 0 : null,
          qemuClean: theirs ? clean(theirs) && theirs.staleSectors === 0 && theirs.stalePages === 0 : null,
          ...(postcopy ? { gangwayPostcopyClean: clean(postcopy) && postcopy.staleSectors === 0 && postcopy.stalePages === 0 } : {}),
        },
        ...(postcopy
          ? {
              /** gangway's post-copy against QEMU's run and gangway's pre-copy of the same link, case and disk write rate. */
              postcopy: {
                diskCompleteMs: postcopy.diskCompleteMs ?? NaN,
                postcopyMs: postcopy.postcopyMs ?? NaN,
                faults: postcopy.faults ?? NaN,
                faultP99Ms: postcopy.faultP99Ms ?? NaN,
                overQemu: postcopyRatios(theirs),
                overPrecopy: postcopyRatios(ours),
              },
            }
          : {}),
      });
    }
  }
}

const result = {
  bench: 'disk',
  date: new Date().toISOString(),
  quick: values.quick,
  accel: 'tcg',
  vm: { ...VM, memoryMiB: MEMORY_MIB },
  disk: { ...DISK, ownBytes: DISK.writtenBytes - DISK.baseBytes, imageSeed: IMAGE_SEED, blockBytes: TESTVM_DISK_BLOCK_BYTES, on: '/dev/shm (tmpfs)' },
  gang: GANG,
  transport: 'gangway: mutual TLS; QEMU: plain tcp (RAM) and NBD (disk)',
  qemuStorage: "libvirt's --copy-storage-all flow: blockdev-mirror (sync full, defaults) to the destination's NBD export, pause-before-switchover, block-job-cancel, cont",
  techniques,
  ...(linkNote ? { linkNote } : {}),
  ...(postcopyNote ? { postcopyNote } : {}),
  runs,
  comparisons,
};
const label = (r: Run) => `${r.link} ${r.mode} ${r.diskWriteRate}MiB/s: ${r.system}${r.storage === 'shared' ? ' RAM only' : ''}${r.technique === 'postcopy' ? ' post-copy' : ''}`;
const svg = barChartSvg(
  `bench:disk wire MiB, ${DISK.sizeBytes / MiB} MiB disks (${DISK.writtenBytes / MiB} MiB written), gangway vs QEMU 7.2`,
  'MiB',
  runs.filter(completed).map((r) => ({ label: label(r), value: r.wireBytes / MiB })),
);
const path = writeResults('disk', result, svg);
if (values.json) console.log(JSON.stringify(result));
else {
  const fixed = (x: number, digits: number) => (Number.isNaN(x) ? '-' : x.toFixed(digits));
  console.log(
    markdownTable(
      [
        'link',
        'mode',
        'VMs',
        'disk MiB/s asked/reached',
        'system',
        'technique',
        'disks',
        'written MiB',
        'wire MiB',
        'total s',
        'downtime ms',
        'disk complete s',
        'post-copy s / faults / p99 ms',
        'stale sectors',
        'stale pages',
        'verified',
      ],
      runs.map((r) => [
        r.link,
        r.mode,
        r.vms,
        `${r.diskWriteRate}/${fixed(r.diskWriteRateReached, 1)}`,
        r.system,
        r.technique,
        r.storage === 'shared' ? 'shared (RAM only)' : 'copied',
        fixed(r.diskWrittenBytes / MiB, 0),
        Number.isNaN(r.wireBytes) ? 'failed' : fixed(r.wireBytes / MiB, 0),
        fixed(r.totalMs / 1000, 2),
        fixed(r.downtimeMs, 0),
        r.diskCompleteMs === undefined ? '' : fixed(r.diskCompleteMs / 1000, 2),
        r.technique === 'postcopy' ? `${fixed((r.postcopyMs ?? NaN) / 1000, 2)} / ${fixed(r.faults ?? NaN, 0)} / ${fixed(r.faultP99Ms ?? NaN, 1)}` : '',
        Number.isNaN(r.staleSectors) ? '-' : r.staleSectors,
        Number.isNaN(r.stalePages) ? '-' : r.stalePages,
        String(r.verified),
      ]),
    ),
  );
  console.log('');
  const yes = (v: unknown) => (v === null || v === undefined ? 'n/a' : v ? 'met' : 'MISSED');
  for (const c of comparisons) {
    const r = c.ratios as Record<string, number>;
    const t = c.targets as Record<string, unknown>;
    if (techniques.includes('precopy')) {
      console.log(
        `${c.link} ${c.mode} ${c.diskWriteRate} MiB/s: gangway/QEMU wire ${fixed(r.wire!, 2)}, total ${fixed(r.total!, 2)}, downtime ${fixed(r.downtime!, 2)}; ` +
          `targets: gangway wire <= written ${yes(t.gangwayWireWithinWritten)} (QEMU ${yes(t.qemuWireWithinWritten)})` +
          (c.mode === 'gang' ? `, gang <= half of QEMU ${yes(t.gangAtMostHalfOfQemu)}` : '') +
          `, downtime within ${DOWNTIME_TARGET_MS} ms of RAM only ${yes(t.downtimeWithin50MsOfRamOnly)}${typeof t.downtimeOverRamOnlyMs === 'number' ? ` (${t.downtimeOverRamOnlyMs >= 0 ? '+' : ''}${t.downtimeOverRamOnlyMs.toFixed(0)} ms)` : ''}` +
          `, every VM moved and nothing stale: gangway ${yes(t.gangwayClean)}, QEMU ${yes(t.qemuClean)}`,
      );
    }
    const p = c.postcopy as { diskCompleteMs: number; postcopyMs: number; faults: number; faultP99Ms: number; overQemu: Record<string, number>; overPrecopy: Record<string, number> } | undefined;
    if (p) {
      const ratios = (x: Record<string, number>) => `downtime ${fixed(x.downtime!, 2)}, total ${fixed(x.total!, 2)}, disk complete ${fixed(x.diskComplete!, 2)}, wire ${fixed(x.wire!, 2)}`;
      console.log(
        `${c.link} ${c.mode} ${c.diskWriteRate} MiB/s post-copy: disk complete at ${fixed(p.diskCompleteMs / 1000, 2)} s, ${fixed(p.postcopyMs / 1000, 2)} s of it after the switchover, ` +
          `${fixed(p.faults, 0)} faults (p99 ${fixed(p.faultP99Ms, 1)} ms); post-copy/QEMU ${ratios(p.overQemu)}; post-copy/pre-copy ${ratios(p.overPrecopy)}; ` +
          `every VM moved and nothing stale: ${yes(t.gangwayPostcopyClean)}`,
      );
    }
  }
  console.log(`\n"written" is the disks' data when the migration started plus what the kernels wrote during it; wire counts RAM too (at most ${MEMORY_MIB} MiB a VM).`);
  if (techniques.includes('postcopy')) console.log('"disk complete" runs from the start of the migration: a post-copy\'s total; a pre-copy\'s total too (gangway\'s disks are complete at the commit, QEMU\'s when its mirror ends, inside its downtime).');
  if (postcopyNote) console.log(postcopyNote);
  const failures = runs.filter((r) => r.error !== undefined);
  for (const r of failures) console.log(`FAILED ${label(r)}: ${r.error}`);
  console.log(`results: ${path}`);
}
if (runs.some((r) => r.system === 'gangway' && (!r.verified || r.staleSectors !== 0 || r.stalePages !== 0))) process.exitCode = 1;
