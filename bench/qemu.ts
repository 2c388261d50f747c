// bench:qemu — the same VM moved by gangway and by QEMU 7.2's own migration, in one run.
//
// The VM: gangway-testvm (native/testvm) under TCG, 1 GiB (256 MiB with --quick), os-image
// and random content, rewriting 0 or about 50 MiB/s of its pages (the kernel does what it
// can: os-image content is slow to generate under TCG, so the rate it reached is reported).
// Each run boots fresh VMs (QEMU refuses a second migration from a source in postmigrate).
//   gangway: two agents with mutual TLS (as in production), `gangway vm start`, `migrate
//            --technique precopy|postcopy`: RAM through the agents, device state through
//            QEMU's x-ignore-shared migration.
//   QEMU:    bench/qemu-baseline.ts: precopy over tcp (max-bandwidth unlimited,
//            downtime-limit 300 ms), multifd with 2 channels, postcopy (postcopy-ram,
//            migrate-start-postcopy), the destination started the way QEMU's users do;
//            pre-copy and multifd also over mutual TLS (libvirt's --tls), since gangway's
//            agents always run mutual TLS: like is compared with like, and with plain tcp.
// Both on loopback and through the 1 Gbit/s netns link (bench/netns-link.ts). And a gang
// of 4 VMs of one image: gangway's gang with dedup against QEMU moving them in parallel and
// one after another.
//
// For each run: total time, downtime (QEMU's from its STOP and RESUME events; gangway's as
// it measures it), bytes on the wire counted by the kernel for both (iptables on loopback,
// the veth counters on the link: never a side's own claim), CPU seconds of the sending and
// receiving side (gangway: agent + QEMU; QEMU: its two processes; under TCG both include
// running the guest), and the VM's own full check of every page after it resumed.
//
// First touch: fresh memory costs about 3 s per GiB on these machines the first time it is
// touched. The bench touches and frees enough memory first (bench/report.ts prefaultMemory),
// so neither system pays it; the QEMU baseline also zero-fills its memory files.
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { runTestvmFullCheck } from '../agent/guest/testvm-status.js';
import { TESTVM_KERNEL_FILE } from '../agent/native.js';
import { makeTempDir } from '../agent/local-agent.js';
import type { GroupSummary } from '../agent/migration/group-summary.js';
import { until, vmsOn, withAgents as withAgentPair, type Agents } from './agent-pair.js';
import { ExitSteps } from './exit.js';
import { createShapedLink, netnsAvailable, type ShapedLink } from './netns-link.js';
import {
  qemuBaselineProblem,
  runQemuMigration,
  runQemuParallel,
  runQemuSerial,
  makeQemuTls,
  testvmAppend,
  TESTVM_IMAGES_DIR,
  type QemuBaselineRun,
  type QemuBaselineVm,
  type QemuLink,
  type QemuMode,
  type QemuTls,
} from './qemu-baseline.js';
import { barChartSvg, markdownTable, prefaultMemory, writeResults } from './report.js';
import { clockTicksPerSec, readCpuSeconds } from './qemu-vm.js';
import { openIptablesCounter, openVethCounter, type WireCounter } from './wire-counter.js';
import { benchArgs } from './args.js';

const MiB = 1024 * 1024;
const GBIT = 1e9;
const KERNEL = TESTVM_KERNEL_FILE;

const USAGE = `usage: npm run bench:qemu -- [--quick] [--json] [--link loopback|1gbit|both] [--cases single|gang|both]
  the same VM moved by gangway and by QEMU's own migration, in one run
examples:
  npm run bench:qemu -- --quick --link loopback --cases single`;

const values = benchArgs('bench:qemu', USAGE, {
  options: {
    quick: { type: 'boolean', default: false },
    json: { type: 'boolean', default: false },
    link: { type: 'string', default: 'both' },
    cases: { type: 'string', default: 'both' },
  },
});
if (!['single', 'gang', 'both'].includes(values.cases!)) {
  console.error(`--cases must be single (one VM), gang (${4} VMs of one image) or both, got ${values.cases}`);
  process.exit(2);
}
if (!['loopback', '1gbit', 'both'].includes(values.link!)) {
  console.error(`--link must be loopback, 1gbit or both, got ${values.link}`);
  process.exit(2);
}
const MEMORY_MIB = values.quick ? 256 : 1024;
const CONTENTS = ['os-image', 'random'] as const;
const DIRTY_RATES_MIBPS = [0, 50];
const GANG = 4;
const GANG_MEMORY_MIB = values.quick ? 128 : 512;
const GANG_VM: Omit<QemuBaselineVm, 'memoryMiB'> = { profile: 'os-image', dirtyRateMiBps: 1, seed: 11, imageSeed: 7, sharedPermille: 800, hotPermille: 50 };
/** Bounds each migration; a run that does not end in it is reported as failed. */
const MIGRATION_TIMEOUT_MS = values.quick ? 120_000 : 300_000;
const BOOT_TIMEOUT_MS = 300_000;

function log(line: string) {
  if (!values.json) console.error(line);
}

/** A run of either system, measured as the QEMU baseline's are (qemu-baseline.ts QemuBaselineRun). */
export type Run = Omit<QemuBaselineRun, 'system' | 'mode' | 'detail'> & {
  system: 'gangway' | 'qemu';
  mode: string;
  content: QemuBaselineVm['profile'];
  /** Why the run did not complete (then the figures are NaN). */
  error?: string;
  detail?: unknown;
};

const exit = new ExitSteps('stopping the agents and VMs, removing the link');

// ── gangway's side ──────────────────────────────────────────────────────────────────────

const withAgents = <T>(shaped: ShapedLink | undefined, body: (agents: Agents) => Promise<T>): Promise<T> =>
  withAgentPair(exit, { tmpPrefix: 'gangway-bench-qemu-', ...(shaped ? { shaped } : {}), args: () => ['--vm-images-dir', TESTVM_IMAGES_DIR] }, body);

/** Every page checked by the VM's kernel at `memoryPath`: stale pages found, or why the check did not complete. */
async function kernelCheck(memoryPath: string): Promise<{ stalePages: number; problem?: string }> {
  try {
    const status = await runTestvmFullCheck(memoryPath, 120_000);
    return { stalePages: status.checkStalePages + status.stalePages };
  } catch (err) {
    return { stalePages: Number.NaN, problem: (err as Error).message };
  }
}

let vmCounter = 0;

async function runGangway(agents: Agents, shaped: ShapedLink | undefined, vm: QemuBaselineVm, count: number, technique: 'precopy' | 'postcopy'): Promise<Omit<Run, 'content'>> {
  const { source, destination, to } = agents;
  const ticks = await clockTicksPerSec();
  const cpuSeconds = (pid: number) => readCpuSeconds(pid, ticks);
  const names = Array.from({ length: count }, () => `bq-${process.pid}-${vmCounter++}`);
  let counter: WireCounter | undefined;
  try {
    for (const [i, name] of names.entries()) {
      await source.client.call('POST', '/v1/vms', {
        name,
        definition: { machine: 'q35', cpus: 1, accel: 'tcg', kernel: KERNEL, append: testvmAppend({ ...vm, seed: vm.seed + i }) },
        regionBytes: [vm.memoryMiB * MiB],
      });
    }
    await until('the VMs to boot', async () => (await vmsOn(source, names)).every((g) => g.testvm?.state === 'running'), BOOT_TIMEOUT_MS);
    const before = await vmsOn(source, names);
    await sleep(1000);
    const after = await vmsOn(source, names);
    const reachedDirtyRateMiBps = ((after[0]!.testvm!.pagesWritten - before[0]!.testvm!.pagesWritten) * 4096) / MiB;
    const qemuPids = after.map((g) => g.pid);
    const agentCpu0 = [cpuSeconds(source.pid) ?? 0, cpuSeconds(destination.pid) ?? 0];
    const sourceQemuCpu0 = qemuPids.map((pid) => cpuSeconds(pid) ?? 0);
    const sourceQemuCpu = [...sourceQemuCpu0];
    const sampler = setInterval(() => qemuPids.forEach((pid, i) => (sourceQemuCpu[i] = cpuSeconds(pid) ?? sourceQemuCpu[i]!)), 20);
    counter = shaped ? await openVethCounter(shaped) : await openIptablesCounter([{ host: '127.0.0.1', port: Number(to.slice(to.lastIndexOf(':') + 1)) }]);
    let summary: GroupSummary;
    // Cancelled once the migration ends: a pending timer would keep the bench alive for
    // MIGRATION_TIMEOUT_MS after its last run.
    const timeout = new AbortController();
    try {
      summary = await Promise.race([
        source.client.migrate({ guests: names, to, technique, strategy: 'gang', dedup: true }),
        sleep(MIGRATION_TIMEOUT_MS, undefined, { signal: timeout.signal }).then(() => {
          throw new Error(`did not complete within ${MIGRATION_TIMEOUT_MS} ms`);
        }),
      ]);
    } finally {
      timeout.abort();
      clearInterval(sampler);
    }
    const wire = await counter.read();
    const arrived = await vmsOn(destination, names);
    const destinationQemuCpu = arrived.reduce((sum, g) => sum + (cpuSeconds(g.pid) ?? 0), 0);
    const agentCpu1 = [cpuSeconds(source.pid) ?? 0, cpuSeconds(destination.pid) ?? 0];
    const checks = await Promise.all(arrived.map((g) => kernelCheck(g.memoryPath)));
    const failed = summary.failed.map((f) => `${f.guest}: ${f.message}`);
    return {
      system: 'gangway',
      mode: count > 1 ? `${technique} gang, dedup` : technique,
      link: shaped ? 'netns' : 'loopback',
      dirtyRateMiBps: vm.dirtyRateMiBps,
      vms: count,
      totalMs: summary.totalMs,
      downtimeMs: summary.maxDowntimeMs,
      wireBytes: wire.total.forwardBytes + wire.total.backBytes,
      stalePages: checks.reduce((sum, c) => sum + c.stalePages, 0),
      verified: failed.length === 0 && arrived.length === count && summary.guests.every((g) => g.verified) && checks.every((c) => c.problem === undefined),
      cpuSecondsSource: agentCpu1[0]! - agentCpu0[0]! + sourceQemuCpu.reduce((sum, cpu, i) => sum + cpu - sourceQemuCpu0[i]!, 0),
      cpuSecondsDestination: agentCpu1[1]! - agentCpu0[1]! + destinationQemuCpu,
      ...(failed.length ? { error: failed.join('; ') } : {}),
      detail: {
        reachedDirtyRateMiBps,
        wireMethod: counter.method,
        wireForwardBytes: wire.total.forwardBytes,
        wireBackBytes: wire.total.backBytes,
        gangwayWireBytes: summary.wireBytes,
        cpuSecondsAgents: [agentCpu1[0]! - agentCpu0[0]!, agentCpu1[1]! - agentCpu0[1]!],
        deviceStateBytes: summary.guests.map((g) => g.deviceStateBytes),
        repairedPages: summary.repairedPages,
        rounds: summary.guests.map((g) => g.rounds.length),
        downtime: summary.guests.map((g) => g.downtime),
        checks,
      },
    };
  } finally {
    await counter?.close();
    for (const agent of [source, destination]) {
      for (const name of names) await agent.client.call('DELETE', `/v1/guests/${name}`).catch(() => {});
    }
  }
}

// ── the runs ────────────────────────────────────────────────────────────────────────────

function failedRun(base: Pick<Run, 'system' | 'mode' | 'link' | 'content' | 'dirtyRateMiBps' | 'vms'>, err: unknown): Run {
  const message = err instanceof Error ? err.message : String(err);
  log(`  ${base.system} ${base.mode}: FAILED: ${message}`);
  return { ...base, totalMs: NaN, downtimeMs: NaN, wireBytes: NaN, stalePages: NaN, verified: false, cpuSecondsSource: NaN, cpuSecondsDestination: NaN, error: message.slice(0, 500) };
}

function fromQemu(run: QemuBaselineRun, content: Run['content'], mode: string): Run {
  return { ...run, mode, content };
}

function logRun(run: Run): void {
  if (run.error && Number.isNaN(run.totalMs)) return;
  log(
    `  ${run.system} ${run.mode}: total ${(run.totalMs / 1000).toFixed(2)} s, downtime ${run.downtimeMs.toFixed(0)} ms, wire ${(run.wireBytes / MiB).toFixed(0)} MiB, ` +
      `stale ${run.stalePages}, CPU ${run.cpuSecondsSource.toFixed(2)}/${run.cpuSecondsDestination.toFixed(2)} s${run.verified ? '' : ' NOT VERIFIED'}${run.error ? ` (${run.error})` : ''}`,
  );
}

const runs: Run[] = [];
const workDir = makeTempDir('gangway-bench-qemu-work-');
exit.add(async () => rmSync(workDir, { recursive: true, force: true }));
/** QEMU's runs over TLS say so in their mode. */
const TLS_MODE = ', TLS';
let qemuTls!: QemuTls;
let linkNote: string | undefined;

try {
  qemuTls = await makeQemuTls(join(workDir, 'tls'));
  const links: { name: 'loopback' | 'netns'; shaped?: ShapedLink }[] = [];
  if (values.link !== '1gbit') {
    const problem = await qemuBaselineProblem('loopback');
    if (problem) throw new Error(`bench:qemu cannot run: ${problem}`);
    links.push({ name: 'loopback' });
  }
  if (values.link !== 'loopback') {
    const available = await netnsAvailable();
    const problem = available.ok ? await qemuBaselineProblem('netns') : available.reason;
    if (problem) {
      linkNote = `no 1 Gbit/s netns link: ${problem}`;
      log(linkNote);
    } else {
      const shaped = await createShapedLink({ name: `q${process.pid % 100000}`, rateBitsPerSec: GBIT });
      exit.add(() => shaped.close());
      links.push({ name: 'netns', shaped });
    }
  }
  const touch = 2 * Math.max(MEMORY_MIB, GANG * GANG_MEMORY_MIB) * MiB;
  const prefaultMs = prefaultMemory(touch);
  log(`prefaulted ${touch / MiB} MiB in ${(prefaultMs / 1000).toFixed(1)} s (first touch of fresh memory is slow on this VM)`);

  for (const { name: linkName, shaped } of links) {
    const qemuLink: QemuLink = shaped ? { kind: 'netns', link: shaped } : { kind: 'loopback' };
    await withAgents(shaped, async (agents) => {
      for (const content of values.cases === 'gang' ? [] : CONTENTS) {
        for (const dirtyRateMiBps of DIRTY_RATES_MIBPS) {
          if (exit.interrupted) return;
          const vm: QemuBaselineVm = { memoryMiB: MEMORY_MIB, profile: content, dirtyRateMiBps, seed: 1, imageSeed: 0 };
          log(`${linkName}, ${MEMORY_MIB} MiB ${content}, dirty ${dirtyRateMiBps} MiB/s:`);
          const qemu = (mode: QemuMode, label: string, tls?: QemuTls) => async () =>
            fromQemu(await runQemuMigration({ vm, mode, ...(mode === 'multifd' ? { multifdChannels: 2 } : {}), link: qemuLink, workDir, timeoutMs: MIGRATION_TIMEOUT_MS, ...(tls ? { tls } : {}) }), content, label);
          // Interleaved, so that drift on this shared machine hits both systems alike.
          const plan: [Run['system'], string, () => Promise<Run>][] = [
            ['gangway', 'precopy', async () => ({ content, ...(await runGangway(agents, shaped, vm, 1, 'precopy')) })],
            ['qemu', 'precopy', qemu('precopy', 'precopy')],
            ['qemu', 'multifd 2 channels', qemu('multifd', 'multifd 2 channels')],
            ['qemu', `precopy${TLS_MODE}`, qemu('precopy', `precopy${TLS_MODE}`, qemuTls)],
            ['qemu', `multifd 2 channels${TLS_MODE}`, qemu('multifd', `multifd 2 channels${TLS_MODE}`, qemuTls)],
            ['gangway', 'postcopy', async () => ({ content, ...(await runGangway(agents, shaped, vm, 1, 'postcopy')) })],
            ['qemu', 'postcopy', qemu('postcopy', 'postcopy')],
          ];
          for (const [system, mode, body] of plan) {
            if (exit.interrupted) return;
            let run: Run;
            try {
              run = await body();
            } catch (err) {
              run = failedRun({ system, mode, link: linkName, content, dirtyRateMiBps, vms: 1 }, err);
            }
            runs.push(run);
            logRun(run);
          }
        }
      }
      // The gang: 4 VMs of one image.
      if (values.cases === 'single') return;
      const gangVm: QemuBaselineVm = { ...GANG_VM, memoryMiB: GANG_MEMORY_MIB };
      log(`${linkName}, gang of ${GANG} x ${GANG_MEMORY_MIB} MiB of one image (${(GANG_VM.sharedPermille ?? 0) / 10}% shared):`);
      const base = { link: linkName, content: gangVm.profile, dirtyRateMiBps: gangVm.dirtyRateMiBps, vms: GANG };
      const gangPlan: [Run['system'], string, () => Promise<Run>][] = [
        ['gangway', 'precopy gang, dedup', async () => ({ content: gangVm.profile, ...(await runGangway(agents, shaped, gangVm, GANG, 'precopy')) })],
        ['qemu', 'precopy, parallel', async () => fromQemu(await runQemuParallel({ vm: gangVm, count: GANG, mode: 'precopy', link: qemuLink, workDir, timeoutMs: MIGRATION_TIMEOUT_MS }), gangVm.profile, 'precopy, parallel')],
        ['qemu', 'precopy, serial', async () => fromQemu(await runQemuSerial({ vm: gangVm, count: GANG, mode: 'precopy', link: qemuLink, workDir, timeoutMs: MIGRATION_TIMEOUT_MS }), gangVm.profile, 'precopy, serial')],
        ['qemu', `precopy, parallel${TLS_MODE}`, async () => fromQemu(await runQemuParallel({ vm: gangVm, count: GANG, mode: 'precopy', link: qemuLink, workDir, timeoutMs: MIGRATION_TIMEOUT_MS, tls: qemuTls }), gangVm.profile, `precopy, parallel${TLS_MODE}`)],
      ];
      for (const [system, mode, body] of gangPlan) {
        if (exit.interrupted) return;
        let run: Run;
        try {
          run = await body();
        } catch (err) {
          run = failedRun({ ...base, system, mode }, err);
        }
        runs.push(run);
        logRun(run);
      }
    });
  }
} finally {
  await exit.run();
}

// ── report ──────────────────────────────────────────────────────────────────────────────

/** gangway against QEMU's best of its own modes, per case: ratios below 1 favour gangway. */
const comparisons: Record<string, unknown>[] = [];
const keyOf = (r: Run) => `${r.link}|${r.content}|${r.dirtyRateMiBps}|${r.vms}`;
for (const key of [...new Set(runs.map(keyOf))]) {
  // A run that damaged its VM (stale pages, or a check that did not complete) is no one's best.
  const here = runs.filter((r) => keyOf(r) === key && !Number.isNaN(r.totalMs) && r.verified && r.stalePages === 0);
  const damaged = runs.filter((r) => keyOf(r) === key && r.system === 'qemu' && !Number.isNaN(r.totalMs) && (!r.verified || r.stalePages !== 0)).map((r) => r.mode);
  const ours = here.filter((r) => r.system === 'gangway');
  const theirs = here.filter((r) => r.system === 'qemu');
  if (ours.length === 0 || theirs.length === 0) continue;
  const best = (rs: Run[], field: 'totalMs' | 'wireBytes' | 'downtimeMs') => rs.reduce((a, b) => (b[field] < a[field] ? b : a));
  /** gangway's best of each figure against the best of `qemu`'s runs (undefined without any). */
  const against = (qemu: Run[]) => {
    if (qemu.length === 0) return undefined;
    const pair = (field: 'totalMs' | 'wireBytes' | 'downtimeMs', show: (r: Run) => string) => {
      const a = best(ours, field);
      const b = best(qemu, field);
      return { gangway: `${a.mode} ${show(a)}`, qemu: `${b.mode} ${show(b)}`, ratio: a[field] / b[field] };
    };
    return {
      time: pair('totalMs', (r) => `${r.totalMs.toFixed(0)} ms`),
      wire: pair('wireBytes', (r) => String(r.wireBytes)),
      downtime: pair('downtimeMs', (r) => `${r.downtimeMs.toFixed(1)} ms`),
    };
  };
  const [link, content, rate, vms] = key.split('|');
  comparisons.push({
    link,
    content,
    dirtyRateMiBps: Number(rate),
    vms: Number(vms),
    // Against QEMU's best over plain tcp and TLS alike, then against its TLS runs only (like with like).
    ...against(theirs)!,
    tls: against(theirs.filter((r) => r.mode.endsWith(TLS_MODE))),
    /** QEMU's runs of this case whose VM came out damaged (left out of its best). */
    qemuDamaged: damaged,
  });
}

const result = {
  bench: 'qemu',
  date: new Date().toISOString(),
  quick: values.quick,
  memoryMiB: MEMORY_MIB,
  gang: { vms: GANG, memoryMiB: GANG_MEMORY_MIB, ...GANG_VM },
  accel: 'tcg',
  transport: `gangway: mutual TLS; QEMU: plain tcp, and mutual TLS in the modes marked "${TLS_MODE.slice(2)}"`,
  ...(linkNote ? { linkNote } : {}),
  runs,
  comparisons,
};
const svg = barChartSvg(
  `bench:qemu total time (s), ${MEMORY_MIB} MiB VM, gangway vs QEMU 7.2`,
  's',
  runs.filter((r) => !Number.isNaN(r.totalMs)).map((r) => ({ label: `${r.link} ${r.content} ${r.dirtyRateMiBps}MiB/s x${r.vms}: ${r.system} ${r.mode}`, value: r.totalMs / 1000 })),
);
const path = writeResults('qemu', result, svg);
if (values.json) console.log(JSON.stringify(result));
else {
  console.log(
    markdownTable(
      ['link', 'content', 'dirty MiB/s', 'VMs', 'system', 'mode', 'total s', 'downtime ms', 'wire MiB', 'stale pages', 'CPU s src/dst', 'verified'],
      runs.map((r) => [
        r.link,
        r.content,
        r.dirtyRateMiBps,
        r.vms,
        r.system,
        r.mode,
        Number.isNaN(r.totalMs) ? 'failed' : (r.totalMs / 1000).toFixed(2),
        Number.isNaN(r.downtimeMs) ? '-' : r.downtimeMs.toFixed(1),
        Number.isNaN(r.wireBytes) ? '-' : (r.wireBytes / MiB).toFixed(0),
        Number.isNaN(r.stalePages) ? '-' : r.stalePages,
        Number.isNaN(r.cpuSecondsSource) ? '-' : `${r.cpuSecondsSource.toFixed(2)}/${r.cpuSecondsDestination.toFixed(2)}`,
        String(r.verified),
      ]),
    ),
  );
  for (const c of comparisons) {
    const ratio = (x: unknown) => ((x as { ratio: number }).ratio).toFixed(2);
    const damaged = c.qemuDamaged as string[];
    const tls = c.tls as Record<string, unknown> | undefined;
    console.log(
      `${c.link} ${c.content} ${c.dirtyRateMiBps} MiB/s x${c.vms}: gangway/QEMU best — time ${ratio(c.time)}, wire ${ratio(c.wire)}, downtime ${ratio(c.downtime)}` +
        (tls ? `; against QEMU over TLS — time ${ratio(tls.time)}, wire ${ratio(tls.wire)}, downtime ${ratio(tls.downtime)}` : '') +
        (damaged.length ? ` (QEMU's ${damaged.join(', ')} damaged the VM: left out)` : ''),
    );
  }
  console.log(`\nresults: ${path}`);
}
if (runs.some((r) => r.system === 'gangway' && (!r.verified || r.stalePages !== 0))) process.exitCode = 1;
