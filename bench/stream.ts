// bench:stream — how fast one agent streams guest memory to another on loopback, against
// raw TCP loopback measured in the same run (node:net between two processes, and iperf3
// where installed; with the mutual-TLS cases, node:tls between two processes too, the same
// OpenSSL the agents' channels run: what TLS alone allows on this host). Cases: unique incompressible pages without compression, the same with
// content dedup on (its cost: it finds nothing to share), and the same between two agents
// talking mutual TLS (wss, certificates from `gangway certs`: what TLS costs the stream);
// OS-image-like pages with LZ4 forced and with the adaptive codec. Where the migration can, its
// rounds go on channels (README: Channels); "session only" is the same from a source that
// opens none, side by side.
//
// Beside the rates, the CPU time each agent spent per GiB of guest memory it moved (utime +
// stime from /proc/PID/stat around the migration): on a machine whose cores both agents
// and other work share, the rate says what the stream got, the CPU seconds what it costs.
//
//   npm run bench:stream [-- --quick] [-- --json] [-- --repeat N] [-- --case SUBSTRING]
//     [-- --cpu-prof DIR]   (V8 CPU profiles of the agents, written when they stop)
import { killGuestsOf, makeTempDir, startLocalAgent, type LocalAgent } from '../agent/local-agent.js';
import type { MigrationSummary } from '../agent/migration/source.js';
import { readFileSync, rmSync } from 'node:fs';
import { loadavg } from 'node:os';
import { barChartSvg, markdownTable, median, prefaultMemory, writeResults } from './report.js';
import { iperf3Loopback, nodeTcpLoopback } from './tcp-baseline.js';
import { initCa, issueHostCert } from '../agent/cli/certs.js';
import { clockTicksPerSec, readCpuSeconds } from './qemu-vm.js';
import { benchArgs } from './args.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const GB = 1e9;

const USAGE = `usage: npm run bench:stream -- [--quick] [--json] [--repeat N] [--case TEXT]... [--cpu-prof DIR]
  guest memory streamed between two agents on loopback, against iperf3 and node:net in the same run
examples:
  npm run bench:stream -- --quick --repeat 3
  npm run bench:stream -- --case 'mutual TLS' --cpu-prof /tmp/prof`;

const values = benchArgs('bench:stream', USAGE, {
  options: {
    quick: { type: 'boolean', default: false },
    json: { type: 'boolean', default: false },
    repeat: { type: 'string' },
    case: { type: 'string', multiple: true },
    'cpu-prof': { type: 'string' },
  },
});
const memoryBytes = (values.quick ? 256 : 1024) * MiB;
const repeat = Number(values.repeat ?? (values.quick ? 1 : 3));

interface Case {
  name: string;
  profile: 'random' | 'os-image';
  codec: 'raw' | 'lz4' | 'auto';
  /** Content dedup on (fingerprints and the content index on every page); off elsewhere, to measure the stream itself. */
  dedup?: boolean;
  /** Between the pair of agents that talk mutual TLS. */
  tls?: boolean;
  /** From a source with migration.channels 0: every page on the session (the path channels replace). */
  sessionOnly?: boolean;
}
const allCases: Case[] = [
  { name: 'incompressible, no compression', profile: 'random', codec: 'raw' },
  { name: 'incompressible, no compression, session only', profile: 'random', codec: 'raw', sessionOnly: true },
  { name: 'incompressible, no compression, dedup', profile: 'random', codec: 'raw', dedup: true },
  { name: 'incompressible, no compression, dedup, session only', profile: 'random', codec: 'raw', dedup: true, sessionOnly: true },
  { name: 'incompressible, no compression, mutual TLS', profile: 'random', codec: 'raw', tls: true },
  { name: 'incompressible, no compression, mutual TLS, session only', profile: 'random', codec: 'raw', tls: true, sessionOnly: true },
  { name: 'OS-image-like, LZ4', profile: 'os-image', codec: 'lz4' },
  { name: 'OS-image-like, adaptive codec', profile: 'os-image', codec: 'auto' },
];
// --case picks cases by a substring of their name (a profile of one case, a quicker look).
const cases = values.case ? allCases.filter((c) => values.case!.some((part) => c.name.includes(part))) : allCases;
if (cases.length === 0) {
  console.error(`--case ${values.case!.map((part) => JSON.stringify(part)).join(', ')} is in no case's name; give part of one of: ${allCases.map((c) => c.name).join('; ')}`);
  process.exit(2);
}
const nodeArgs = values['cpu-prof'] ? ['--cpu-prof', '--cpu-prof-dir', values['cpu-prof']] : [];
const ticksPerSec = await clockTicksPerSec();

function log(line: string) {
  if (!values.json) console.error(line);
}

interface Measured {
  summary: MigrationSummary;
  /** CPU seconds each agent spent during the migration. */
  cpuSecondsSource: number;
  cpuSecondsDestination: number;
  minorFaultsSource: number;
  minorFaultsDestination: number;
}

/** Minor page faults of process `pid` so far (field 10 of /proc/PID/stat): fresh memory the stream touched, which CPU time on a busy machine hides. */
function minorFaultsOf(agent: LocalAgent): number {
  const stat = readFileSync(`/proc/${agent.pid}/stat`, 'utf8');
  return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[7]);
}

function cpuSecondsOf(agent: LocalAgent): number {
  const seconds = readCpuSeconds(agent.pid, ticksPerSec);
  if (seconds === undefined) throw new Error(`agent ${agent.pid} is gone; see ${agent.logPath}`);
  return seconds;
}

async function migrateOnce(pair: { source: LocalAgent; destination: LocalAgent }, c: Case, n: number): Promise<Measured> {
  const { source, destination } = pair;
  const name = `bench-${c.profile}-${c.codec}-${n}`;
  await source.client.call('POST', '/v1/guests', {
    name,
    memoryBytes,
    profile: c.profile,
    dirtyRateBytesPerSec: 0,
    seed: n + 1,
    imageSeed: 0,
    sharedFraction: 0,
    hotFraction: 0,
  });
  const cpuSource = cpuSecondsOf(source);
  const cpuDestination = cpuSecondsOf(destination);
  const faultsSource = minorFaultsOf(source);
  const faultsDestination = minorFaultsOf(destination);
  // The destination's memory file comes from what was freed last: backed, not cold (report.ts).
  prefaultMemory(memoryBytes);
  const group = await source.client.migrate({ guests: [name], to: destination.listen, codec: c.codec, dedup: c.dedup ?? false });
  const cpuSecondsSource = cpuSecondsOf(source) - cpuSource;
  const cpuSecondsDestination = cpuSecondsOf(destination) - cpuDestination;
  const minorFaultsSource = minorFaultsOf(source) - faultsSource;
  const minorFaultsDestination = minorFaultsOf(destination) - faultsDestination;
  const summary = group.guests[0]!;
  await destination.client.call('DELETE', `/v1/guests/${name}`);
  return { summary, cpuSecondsSource, cpuSecondsDestination, minorFaultsSource, minorFaultsDestination };
}

const tmp = makeTempDir('gangway-bench-');
const agents: LocalAgent[] = [];
try {
  const source = await startLocalAgent({ stateDir: `${tmp}/source`, nodeArgs });
  agents.push(source);
  const destination = await startLocalAgent({ stateDir: `${tmp}/destination`, nodeArgs });
  agents.push(destination);
  // The same pair again, talking wss with client certificates.
  await initCa({ dir: `${tmp}/tls`, days: 1 });
  const certs = await Promise.all(['bench-a', 'bench-b'].map((name) => issueHostCert({ dir: `${tmp}/tls`, name, sans: ['127.0.0.1'], validity: { days: 1 } })));
  const tls = (own: number) => ({ cert: certs[own]!.certPath, key: certs[own]!.keyPath, ca: certs[own]!.caPath, allow: [own === 0 ? 'bench-b' : 'bench-a'] });
  const tlsSource = await startLocalAgent({ stateDir: `${tmp}/tls-source`, tls: tls(0), nodeArgs });
  agents.push(tlsSource);
  const tlsDestination = await startLocalAgent({ stateDir: `${tmp}/tls-destination`, tls: tls(1), nodeArgs });
  agents.push(tlsDestination);
  // Sources that open no channels, to the same destinations.
  const noChannels = { GANGWAY_MIGRATION_CHANNELS: '0' };
  const sessionSource = await startLocalAgent({ stateDir: `${tmp}/session-source`, nodeArgs, env: noChannels });
  agents.push(sessionSource);
  const tlsSessionSource = await startLocalAgent({ stateDir: `${tmp}/tls-session-source`, tls: tls(0), nodeArgs, env: noChannels });
  agents.push(tlsSessionSource);
  const pairOf = (c: Case) =>
    c.tls ? { source: c.sessionOnly ? tlsSessionSource : tlsSource, destination: tlsDestination } : { source: c.sessionOnly ? sessionSource : source, destination };

  const prefaultMs = prefaultMemory(4 * memoryBytes);
  log(`prefaulted ${(4 * memoryBytes) / MiB} MiB of memory in ${(prefaultMs / 1000).toFixed(1)} s`);
  // One unmeasured migration per case warms the agents (JIT, buffer pools).
  for (const c of cases) await migrateOnce(pairOf(c), c, 100);

  const tcp: number[] = [];
  const tlsRuns: number[] = [];
  const tlsFiles = (own: number) => ({ cert: certs[own]!.certPath, key: certs[own]!.keyPath, ca: certs[own]!.caPath });
  const iperfRuns: number[] = [];
  const byCase = new Map<string, { rate: number[]; wire: number[]; total: number[]; cpuSource: number[]; cpuDestination: number[]; faultsSource: number[]; faultsDestination: number[]; channels: number }>();
  for (let n = 0; n < repeat; n++) {
    // Interleave baseline and cases so drift on a shared machine hits both alike.
    tcp.push(await nodeTcpLoopback(memoryBytes));
    log(`run ${n + 1}/${repeat}: node:net loopback ${(tcp.at(-1)! / GB).toFixed(2)} GB/s`);
    if (cases.some((c) => c.tls)) {
      tlsRuns.push(await nodeTcpLoopback(memoryBytes, { receiver: tlsFiles(1), sender: tlsFiles(0) }));
      log(`run ${n + 1}/${repeat}: node:tls loopback (mutual TLS 1.3) ${(tlsRuns.at(-1)! / GB).toFixed(2)} GB/s`);
    }
    const iperfRun = await iperf3Loopback(values.quick ? 2 : 4);
    if (iperfRun) {
      iperfRuns.push(iperfRun);
      log(`run ${n + 1}/${repeat}: iperf3 loopback ${(iperfRun / GB).toFixed(2)} GB/s`);
    }
    for (const c of cases) {
      const { summary, cpuSecondsSource, cpuSecondsDestination, minorFaultsSource, minorFaultsDestination } = await migrateOnce(pairOf(c), c, n);
      const round0 = summary.rounds[0]!;
      const rate = (round0.pages * 4096 * 1000) / round0.durationMs;
      const entry = byCase.get(c.name) ?? { rate: [], wire: [], total: [], cpuSource: [], cpuDestination: [], faultsSource: [], faultsDestination: [], channels: 0 };
      entry.channels = summary.channels?.count ?? 0;
      entry.rate.push(rate);
      entry.wire.push(summary.wireBytes);
      entry.total.push(summary.totalMs);
      entry.cpuSource.push(cpuSecondsSource / (memoryBytes / GiB));
      entry.cpuDestination.push(cpuSecondsDestination / (memoryBytes / GiB));
      entry.faultsSource.push(minorFaultsSource / (memoryBytes / GiB));
      entry.faultsDestination.push(minorFaultsDestination / (memoryBytes / GiB));
      byCase.set(c.name, entry);
      log(
        `run ${n + 1}/${repeat}: ${c.name}: ${(rate / GB).toFixed(2)} GB/s of guest memory, ${(summary.wireBytes / MiB).toFixed(0)} MiB on the wire, ` +
          `CPU ${entry.cpuSource.at(-1)!.toFixed(2)} s/GiB at the source, ${entry.cpuDestination.at(-1)!.toFixed(2)} s/GiB at the destination, ` +
          `${Math.round(entry.faultsSource.at(-1)!)} / ${Math.round(entry.faultsDestination.at(-1)!)} minor faults per GiB`,
      );
    }
  }
  const iperf = iperfRuns.length > 0 ? median(iperfRuns) : undefined;
  const tcpRate = median(tcp);
  const tlsRate = tlsRuns.length > 0 ? median(tlsRuns) : undefined;
  const rows = [...byCase.entries()].map(([name, e]) => ({
    case: name,
    guestBytesPerSec: median(e.rate),
    ratioToNodeTcp: median(e.rate) / tcpRate,
    ratioToIperf3: iperf ? median(e.rate) / iperf : null,
    /** Mutual TLS cases: against node:tls between two processes on this host, the same run (what TLS itself allows here). */
    ratioToNodeTls: tlsRate && cases.find((c) => c.name === name)?.tls ? median(e.rate) / tlsRate : null,
    wireBytes: median(e.wire),
    memoryBytes,
    totalMs: median(e.total),
    cpuSecondsPerGiBSource: median(e.cpuSource),
    cpuSecondsPerGiBDestination: median(e.cpuDestination),
    minorFaultsPerGiBSource: median(e.faultsSource),
    minorFaultsPerGiBDestination: median(e.faultsDestination),
    /** Channels the last run's round 0 went on (0: the session). */
    channels: e.channels,
  }));
  const result = {
    bench: 'stream',
    date: new Date().toISOString(),
    memoryBytes,
    repeat,
    prefaultMs,
    /** The load average (1 min) at the end: the machine's other work, which the rates share it with. */
    loadAverage1m: loadavg()[0]!,
    baseline: { nodeTcpLoopbackBytesPerSec: tcpRate, nodeTlsLoopbackBytesPerSec: tlsRate ?? null, iperf3LoopbackBytesPerSec: iperf ?? null },
    cases: rows,
  };
  const svg = barChartSvg(`gangway page stream vs TCP loopback (${memoryBytes / MiB} MiB guests)`, 'GB/s', [
    ...(iperf ? [{ label: 'iperf3 TCP loopback', value: iperf / GB }] : []),
    { label: 'node:net TCP loopback', value: tcpRate / GB },
    ...(tlsRate ? [{ label: 'node:tls loopback', value: tlsRate / GB }] : []),
    ...rows.map((r) => ({ label: r.case, value: r.guestBytesPerSec / GB })),
  ]);
  const path = writeResults('stream', result, svg);
  if (values.json) console.log(JSON.stringify(result));
  else {
    console.log(
      markdownTable(
        ['case', 'guest GB/s', 'vs node:net TCP', 'vs iperf3', 'CPU s/GiB source', 'CPU s/GiB destination', 'wire MiB', 'memory MiB', 'channels'],
        [
          ['node:net TCP loopback (baseline)', (tcpRate / GB).toFixed(2), '1.00', iperf ? (tcpRate / iperf).toFixed(2) : 'n/a', '', '', '', '', ''],
          ...(iperf ? [['iperf3 TCP loopback', (iperf / GB).toFixed(2), (iperf / tcpRate).toFixed(2), '1.00', '', '', '', '', '']] : []),
          ...(tlsRate ? [['node:tls loopback, mutual TLS 1.3', (tlsRate / GB).toFixed(2), (tlsRate / tcpRate).toFixed(2), iperf ? (tlsRate / iperf).toFixed(2) : 'n/a', '', '', '', '', '']] : []),
          ...rows.map((r) => [
            r.case,
            (r.guestBytesPerSec / GB).toFixed(2),
            r.ratioToNodeTcp.toFixed(2),
            r.ratioToIperf3 === null ? 'n/a' : r.ratioToIperf3.toFixed(2),
            r.cpuSecondsPerGiBSource.toFixed(2),
            r.cpuSecondsPerGiBDestination.toFixed(2),
            (r.wireBytes / MiB).toFixed(0),
            (memoryBytes / MiB).toFixed(0),
            String(r.channels),
          ]),
        ],
      ),
    );
    for (const r of rows) if (r.ratioToNodeTls !== null) console.log(`${r.case}: ${r.ratioToNodeTls.toFixed(2)} of node:tls loopback in the same run`);
    console.log(`\nload average ${result.loadAverage1m.toFixed(2)} (1 min) at the end; results: ${path}`);
  }
} finally {
  for (const agent of agents) await killGuestsOf(agent);
  await Promise.all(agents.map((agent) => agent.stop()));
  rmSync(tmp, { recursive: true, force: true });
}
