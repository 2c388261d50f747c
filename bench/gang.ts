// bench:gang — moving several guests built from one image: serial without dedup (the
// baseline: gangway one guest at a time, the adaptive codec) beside the same with LZ4 forced
// and without compression (what a hypervisor's own migration does), against serial and gang
// with dedup, gang without, and gang with dedup to a destination that already runs a guest of
// the same image. All in the same run, on loopback and through a 1 Gbit/s link
// (a shaped network-namespace pair when root; the sender's pacer otherwise).
//
// Each run's content floor is what no sender can avoid: the distinct non-zero pages of the
// guests moved (hashed from their memory files just before the migration; with a resident
// guest, less what it already holds at the destination), plus the pages the guests dirtied
// during the migration (every page sent after round 0). Wire bytes are reported against it;
// compression can take a run below it, so dedup's own efficiency is judged without (a gang
// with dedup and no compression).
//
//   npm run bench:gang [-- --quick] [-- --json] [-- --repeat N] [-- --link loopback|1gbit|both] [-- --cases all|codec]
//
// Times follow the seed paper (003): serial total time and downtime are sums over the
// guests, gang ones are maxima. Every run checks every guest: digests at the switchover and
// the guest's own check of every page after it resumes.
import { closeSync, openSync, readSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { initCa, issueHostCert, type CertResult } from '../agent/cli/certs.js';
import { waitForGuestProgress } from '../agent/cli/demo.js';
import { killGuestsOf, makeTempDir, startLocalAgent, type LocalAgent } from '../agent/local-agent.js';
import type { GroupSummary } from '../agent/migration/group-summary.js';
import { loadNative } from '../agent/native.js';
import { createShapedLink, netnsAvailable, type ShapedLink } from './netns-link.js';
import { barChartSvg, markdownTable, median, prefaultMemory, writeResults } from './report.js';
import { ExitSteps } from './exit.js';
import { benchArgs } from './args.js';

const MiB = 1024 * 1024;
const GBIT = 1e9;

const USAGE = `usage: npm run bench:gang -- [--quick] [--json] [--repeat N] [--link loopback|1gbit|both] [--cases all|codec]
  four guests of one image moved serial and gang, with and without dedup, each codec, against
  the content floor
  --cases codec   only serial without dedup, adaptive codec beside raw and LZ4 forced (the
                  codec target, in more repeats for the same time)
examples:
  npm run bench:gang -- --quick --link loopback
  npm run bench:gang -- --quick --cases codec --repeat 10
  npm run bench:gang -- --repeat 3 --json`;

const values = benchArgs('bench:gang', USAGE, {
  options: {
    quick: { type: 'boolean', default: false },
    json: { type: 'boolean', default: false },
    repeat: { type: 'string' },
    link: { type: 'string', default: 'both' },
    cases: { type: 'string', default: 'all' },
  },
});
if (!['all', 'codec'].includes(values.cases!)) {
  console.error(`--cases must be all or codec, got ${values.cases}`);
  process.exit(2);
}
const codecOnly = values.cases === 'codec';
if (!['loopback', '1gbit', 'both'].includes(values.link!)) {
  console.error(`--link must be loopback, 1gbit or both, got ${values.link}`);
  process.exit(2);
}
const repeat = Number(values.repeat ?? 1);
if (!Number.isInteger(repeat) || repeat < 1 || repeat > 20) {
  console.error(`--repeat must be an integer in 1..20, got ${values.repeat}`);
  process.exit(2);
}
const GUESTS = 4;
const memoryBytes = (values.quick ? 128 : 512) * MiB;
const SHARED = 0.6;
const DIRTY = 10 * MiB;
const IMAGE_SEED = 7;

interface Strategy {
  name: string;
  strategy: 'serial' | 'gang';
  dedup: boolean;
  /** The destination already runs a guest of the same image. */
  resident: boolean;
  /** A fixed codec: raw is a hypervisor's default migration (zero pages elided, nothing else); without it, the adaptive one. */
  codec?: 'raw' | 'lz4';
}
const BASELINE = 'serial, no dedup (baseline)';
const HYPERVISOR_DEFAULT = 'serial, no dedup, no compression (a hypervisor\'s default)';
const LZ4_FORCED = 'serial, no dedup, LZ4 forced';
/** Dedup alone (no compression), for its efficiency against the content floor (which compression would undercut). */
const GANG_DEDUP_RAW = 'gang, dedup, no compression';
const ALL_STRATEGIES: Strategy[] = [
  { name: BASELINE, strategy: 'serial', dedup: false, resident: false },
  { name: HYPERVISOR_DEFAULT, strategy: 'serial', dedup: false, resident: false, codec: 'raw' },
  { name: LZ4_FORCED, strategy: 'serial', dedup: false, resident: false, codec: 'lz4' },
  { name: 'serial, dedup', strategy: 'serial', dedup: true, resident: false },
  { name: 'gang, no dedup', strategy: 'gang', dedup: false, resident: false },
  { name: 'gang, dedup', strategy: 'gang', dedup: true, resident: false },
  { name: GANG_DEDUP_RAW, strategy: 'gang', dedup: true, resident: false, codec: 'raw' },
  { name: 'gang, dedup, resident guest at the destination', strategy: 'gang', dedup: true, resident: true },
];
/** The first three are the codec's: the adaptive one, raw and LZ4 forced. */
const strategies = codecOnly ? ALL_STRATEGIES.slice(0, 3) : ALL_STRATEGIES;
/** Each repeat's order is turned by this (coprime to the count, so every strategy leads in turn). */
const TURN = codecOnly ? 1 : 3;

interface Run {
  strategy: string;
  mode: 'serial' | 'gang';
  dedup: boolean;
  resident: boolean;
  link: string;
  repeat: number;
  wireBytes: number;
  memoryBytes: number;
  totalMs: number;
  elapsedMs: number;
  downtimeMs: number;
  maxDowntimeMs: number;
  downtimesMs: number[];
  /** Each guest's own total time and what its page data compressed to (1: sent raw), in order. */
  guestTotalsMs: number[];
  guestCompression: number[];
  dedupHits: GroupSummary['dedupStats']['hits'];
  wantedPages: number;
  /** Pages the switchovers sent again (missed by the dirty tracker, found by the repair). */
  repairedPages: number;
  /** Page bytes sent over page bytes before compression, over all guests. */
  compressionRatio: number;
  /** The content floor (see the header): distinct non-zero content not at the destination, plus what was dirtied. */
  floorBytes: number;
  distinctBytes: number;
  dirtiedBytes: number;
  verified: boolean;
}

/** 0.38 -> '38% fewer'; -0.2 -> '20% more'. */
function change(saved: number, less: string, more: string): string {
  return saved >= 0 ? `${(saved * 100).toFixed(0)}% ${less}` : `${(-saved * 100).toFixed(0)}% ${more}`;
}

function log(line: string) {
  if (!values.json) console.error(line);
}

/**
 * What to undo on the way out, also on Ctrl-C or SIGTERM: agents (and their guests), the
 * link. Each step runs once, whoever asks first (the signal or the normal way out).
 */
const exit = new ExitSteps('stopping the agents and guests, removing the link');
const onExit = (step: () => Promise<void>) => exit.add(step);
const cleanUp = () => exit.run();

let counter = 0;
async function startGuest(agent: LocalAgent, seed: number): Promise<string> {
  const name = `gang-${process.pid}-${counter++}`;
  await agent.client.call('POST', '/v1/guests', {
    name,
    memoryBytes,
    profile: 'os-image',
    dirtyRateBytesPerSec: DIRTY,
    seed,
    imageSeed: IMAGE_SEED,
    sharedFraction: SHARED,
    hotFraction: 0.25,
  });
  return name;
}

const native = loadNative();
const PAGE = 4096;
const ZERO_PAGE = Buffer.alloc(PAGE);

/** Adds the fingerprint of every non-zero page of the guest's memory file to `into`. */
function addContent(path: string, into: Set<string>): void {
  const fd = openSync(path, 'r');
  const chunk = Buffer.alloc(256 * PAGE);
  try {
    for (let offset = 0; ; offset += chunk.length) {
      const bytes = readSync(fd, chunk, 0, chunk.length, offset);
      for (let p = 0; p + PAGE <= bytes; p += PAGE) {
        const page = chunk.subarray(p, p + PAGE);
        if (!page.equals(ZERO_PAGE)) into.add(native.hash128(page).toString('latin1'));
      }
      if (bytes < chunk.length) return;
    }
  } finally {
    closeSync(fd);
  }
}

/** The distinct non-zero content of `moving`, less what `resident` holds already, in bytes. */
async function distinctContentBytes(source: LocalAgent, moving: readonly string[], destination: LocalAgent, resident: string | undefined): Promise<number> {
  const pathsOf = async (agent: LocalAgent, names: readonly string[]) => (await agent.status()).guests.filter((g) => names.includes(g.name)).map((g) => g.memoryPath);
  const there = new Set<string>();
  if (resident) for (const path of await pathsOf(destination, [resident])) addContent(path, there);
  const content = new Set<string>();
  for (const path of await pathsOf(source, moving)) addContent(path, content);
  let distinct = 0;
  for (const key of content) if (!there.has(key)) distinct++;
  return distinct * PAGE;
}

async function runOnce(source: LocalAgent, destination: LocalAgent, to: string, link: Link, s: Strategy, n: number): Promise<Run> {
  const names: string[] = [];
  let resident: string | undefined;
  try {
    for (let i = 0; i < GUESTS; i++) names.push(await startGuest(source, i + 1));
    if (s.resident) resident = await startGuest(destination, 100);
    // Let the guests build their memory and start dirtying it.
    await new Promise((resolve) => setTimeout(resolve, 1000));
    const distinctBytes = await distinctContentBytes(source, names, destination, resident);
    const summary = await source.client.migrate({
      guests: names,
      to,
      strategy: s.strategy,
      dedup: s.dedup,
      ...(s.codec ? { codec: s.codec } : {}),
      ...(link.pacedBytesPerSec ? { bandwidthBytesPerSec: link.pacedBytesPerSec } : {}),
    });
    let verified = summary.failed.length === 0 && summary.guests.every((g) => g.verified);
    for (const moved of summary.guests) {
      const check = await waitForGuestProgress(destination, moved.guest, 0, 120_000).catch(() => undefined);
      if (!check || check.resumeStalePages !== 0 || check.stalePages !== 0) verified = false;
    }
    for (const f of summary.failed) log(`  ${f.guest} did not move: ${f.code}: ${f.message}`);
    // What the guests dirtied while they moved: every page a round after round 0 sent.
    const dirtiedBytes = summary.guests.reduce((sum, g) => sum + g.rounds.filter((r) => r.round > 0).reduce((pages, r) => pages + r.pages, 0) * PAGE, 0);
    return {
      strategy: s.name,
      mode: s.strategy,
      dedup: s.dedup,
      resident: s.resident,
      link: link.name,
      repeat: n,
      wireBytes: summary.wireBytes,
      memoryBytes: summary.memoryBytes,
      totalMs: summary.totalMs,
      elapsedMs: summary.elapsedMs,
      downtimeMs: summary.downtimeMs,
      maxDowntimeMs: summary.maxDowntimeMs,
      downtimesMs: summary.guests.map((g) => g.downtimeMs),
      guestTotalsMs: summary.guests.map((g) => g.totalMs),
      guestCompression: summary.guests.map((g) => g.compressionRatio),
      dedupHits: summary.dedupStats.hits,
      wantedPages: summary.dedupStats.wantedPages,
      repairedPages: summary.repairedPages,
      compressionRatio:
        summary.guests.reduce((sum, g) => sum + g.rawDataBytes * g.compressionRatio, 0) /
        Math.max(1, summary.guests.reduce((sum, g) => sum + g.rawDataBytes, 0)),
      floorBytes: distinctBytes + dirtiedBytes,
      distinctBytes,
      dirtiedBytes,
      verified,
    };
  } finally {
    for (const [agent, list] of [
      [source, names],
      [destination, [...names, ...(resident ? [resident] : [])]],
    ] as const) {
      for (const name of list) await agent.client.call('DELETE', `/v1/guests/${name}`).catch(() => {});
    }
  }
}

interface Link {
  name: string;
  /** When the link is not shaped by tc: the sender's pacer rate. */
  pacedBytesPerSec?: number;
  shaped?: ShapedLink;
}

async function warmUp(source: LocalAgent, destination: LocalAgent, to: string, link: Link): Promise<void> {
  const name = await startGuest(source, 99);
  try {
    await source.client.migrate({ guests: [name], to, dedup: false, ...(link.pacedBytesPerSec ? { bandwidthBytesPerSec: link.pacedBytesPerSec } : {}) });
  } finally {
    for (const agent of [source, destination]) await agent.client.call('DELETE', `/v1/guests/${name}`).catch(() => {});
  }
}

async function withAgents<T>(link: Link, body: (source: LocalAgent, destination: LocalAgent, to: string) => Promise<T>): Promise<T> {
  const tmp = makeTempDir('gangway-bench-gang-');
  const agents: LocalAgent[] = [];
  const stopAll = onExit(async () => {
    for (const agent of agents) await killGuestsOf(agent);
    await Promise.all(agents.map((agent) => agent.stop()));
    rmSync(tmp, { recursive: true, force: true });
  });
  try {
    const shaped = link.shaped;
    // Agents on the netns link listen on non-loopback addresses, where only TLS is allowed;
    // both links run TLS so their numbers compare.
    const caDir = join(tmp, 'tls');
    await initCa({ dir: caDir, days: 1 });
    const sourceCert = await issueHostCert({ dir: caDir, name: 'source', sans: ['127.0.0.1', ...(shaped ? [shaped.addrA] : [])], validity: { days: 1 } });
    const destinationCert = await issueHostCert({ dir: caDir, name: 'destination', sans: ['127.0.0.1', ...(shaped ? [shaped.addrB] : [])], validity: { days: 1 } });
    const tls = (cert: CertResult, peer: CertResult) => ({ cert: cert.certPath, key: cert.keyPath, ca: cert.caPath, allow: [peer.fingerprint] });
    const source = await startLocalAgent({
      stateDir: `${tmp}/source`,
      tls: tls(sourceCert, destinationCert),
      ...(shaped ? { wrap: shaped.netnsExecPrefix(shaped.nsA), listen: `${shaped.addrA}:0` } : {}),
    });
    agents.push(source);
    // dedup.resident all: the case "resident guest at the destination" runs a guest started
    // there, which the default (from-peer: only guests the asking peer migrated here) would
    // not offer. And no limit to speak of on resident offers: serial runs open a group per
    // guest, repeats follow each other within the minute, and the bench measures dedup, not
    // the limiter.
    const destination = await startLocalAgent({
      stateDir: `${tmp}/destination`,
      tls: tls(destinationCert, sourceCert),
      env: { GANGWAY_DEDUP_RESIDENT: 'all', GANGWAY_DEDUP_RESIDENT_OFFERS_PER_MINUTE: '10000' },
      ...(shaped ? { wrap: shaped.netnsExecPrefix(shaped.nsB), listen: `${shaped.addrB}:0` } : {}),
    });
    agents.push(destination);
    return await body(source, destination, destination.listen);
  } finally {
    await stopAll();
  }
}

const links: Link[] = [];
let linkNote: string | undefined;
const runs: Run[] = [];
try {
  if (values.link !== '1gbit') links.push({ name: 'loopback' });
  if (values.link !== 'loopback') {
    const available = await netnsAvailable();
    if (available.ok) {
      const created = await createShapedLink({ name: `g${process.pid % 100000}`, rateBitsPerSec: GBIT });
      onExit(() => created.close());
      links.push({ name: '1 Gbit/s (tc, netns)', shaped: created });
    } else {
      linkNote = `no network namespaces (${available.reason}): the 1 Gbit/s link is the sender's pacer`;
      log(linkNote);
      links.push({ name: '1 Gbit/s (pacer)', pacedBytesPerSec: GBIT / 8 });
    }
  }
  const prefaultMs = prefaultMemory((2 * GUESTS + 1) * memoryBytes);
  log(`prefaulted ${((2 * GUESTS + 1) * memoryBytes) / MiB} MiB in ${(prefaultMs / 1000).toFixed(1)} s`);
  for (const link of links) {
    await withAgents(link, async (source, destination, to) => {
      // One unmeasured migration first (JIT, buffer pools, the session to the destination),
      // or the first strategy, the baseline, runs on cold agents: 1.04-1.16 of the same
      // strategy's time when it ran later (measured, same bytes on the wire).
      await warmUp(source, destination, to, link);
      for (let n = 0; n < repeat; n++) {
        // Every strategy once per repeat, interleaved, so drift hits them alike, and in an
        // order turned each repeat (TURN), so no strategy always follows the same one
        // (the first after the heaviest, five guests deleted, ran slower).
        for (const s of strategies.map((_, i) => strategies[(i + TURN * n) % strategies.length]!)) {
          if (exit.interrupted) return;
          const run = await runOnce(source, destination, to, link, s, n);
          runs.push(run);
          log(
            `${link.name} | ${s.name}: wire ${(run.wireBytes / MiB).toFixed(0)} MiB (${(run.wireBytes / run.floorBytes).toFixed(2)} of the content floor ${(run.floorBytes / MiB).toFixed(0)} MiB), total ${(run.totalMs / 1000).toFixed(2)} s, ` +
              `longest downtime ${run.maxDowntimeMs.toFixed(0)} ms, compressed to ${(run.compressionRatio * 100).toFixed(0)}%, ${run.repairedPages} pages repaired, verified ${run.verified}; ` +
              `per guest ${run.guestTotalsMs.map((ms, i) => `${ms.toFixed(0)} ms at ${(run.guestCompression[i]! * 100).toFixed(0)}%`).join(', ')}`,
          );
        }
      }
    });
  }
} finally {
  await cleanUp();
}

// Medians per (link, strategy), and the ratios against the same link's baseline.
const rows = links.flatMap((link) =>
  strategies.map((s) => {
    const mine = runs.filter((r) => r.link === link.name && r.strategy === s.name);
    const base = runs.filter((r) => r.link === link.name && r.strategy === strategies[0]!.name);
    const wire = median(mine.map((r) => r.wireBytes));
    const total = median(mine.map((r) => r.totalMs));
    return {
      link: link.name,
      strategy: s.name,
      wireBytes: wire,
      totalMs: total,
      elapsedMs: median(mine.map((r) => r.elapsedMs)),
      maxDowntimeMs: median(mine.map((r) => r.maxDowntimeMs)),
      floorBytes: median(mine.map((r) => r.floorBytes)),
      wireVsFloor: median(mine.map((r) => r.wireBytes / r.floorBytes)),
      wireSavedVsBaseline: 1 - wire / median(base.map((r) => r.wireBytes)),
      timeSavedVsBaseline: 1 - total / median(base.map((r) => r.totalMs)),
      verified: mine.every((r) => r.verified),
    };
  }),
);
const targets = links.map((link) => {
  const row = (name: string) => rows.find((r) => r.link === link.name && r.strategy === name)!;
  const auto = row(BASELINE);
  const plain = row(HYPERVISOR_DEFAULT);
  // Issue 16's: the adaptive codec within 5% of the better fixed codec, repeat by repeat (the
  // three ran within a minute of each other, so the drift of this shared machine over a run,
  // 20-40% over minutes, cancels out), and the median of those: a ratio of medians pairs
  // runs minutes apart, and one squeezed repeat of the adaptive codec decided it.
  const autoCodecVsBestFixedByRepeat = Array.from({ length: repeat }, (_, n) => {
    const time = (name: string) => runs.find((r) => r.link === link.name && r.strategy === name && r.repeat === n)?.totalMs ?? Number.NaN;
    return time(BASELINE) / Math.min(time(HYPERVISOR_DEFAULT), time(LZ4_FORCED));
  }).filter((ratio) => Number.isFinite(ratio));
  const autoCodecVsBestFixed = median(autoCodecVsBestFixedByRepeat);
  const codec = {
    link: link.name,
    autoCodecVsBestFixed,
    autoCodecVsBestFixedByRepeat,
    autoCodecVsBestFixedOfMedians: auto.totalMs / Math.min(plain.totalMs, row(LZ4_FORCED).totalMs),
    autoCodecTargetMet: autoCodecVsBestFixed <= 1.05,
  };
  if (codecOnly) return codec;
  const gang = row('gang, dedup');
  const serialDedup = row('serial, dedup');
  return {
    ...codec,
    wireSaved: gang.wireSavedVsBaseline,
    wireTargetMet: gang.wireSavedVsBaseline >= 0.55,
    timeSaved: gang.timeSavedVsBaseline,
    timeTargetMet: gang.timeSavedVsBaseline >= 0.35,
    // Against the published systems' baseline (QEMU/KVM's default: no compression, no dedup).
    wireSavedVsHypervisorDefault: 1 - gang.wireBytes / plain.wireBytes,
    timeSavedVsHypervisorDefault: 1 - gang.totalMs / plain.totalMs,
    // Issue 16's: a gang with dedup sends no more than serial with dedup and takes less time;
    // dedup within 1.15 of the floor. Gang against serial by the command's wall-clock time:
    // serial's total is the sum of its guests' times, which leaves out what comes between
    // them (each one's offer, set-up and resident fingerprints), and the operator waits for
    // that too.
    gangVsSerialDedupWire: gang.wireBytes / serialDedup.wireBytes,
    gangVsSerialDedupTime: gang.elapsedMs / serialDedup.elapsedMs,
    gangTargetMet: gang.wireBytes <= serialDedup.wireBytes && gang.elapsedMs < serialDedup.elapsedMs,
    gangWireVsFloor: row(GANG_DEDUP_RAW).wireVsFloor,
    floorTargetMet: row(GANG_DEDUP_RAW).wireVsFloor <= 1.15,
  };
});
const result = {
  bench: 'gang',
  date: new Date().toISOString(),
  guests: GUESTS,
  memoryBytes,
  sharedFraction: SHARED,
  dirtyRateBytesPerSec: DIRTY,
  repeat,
  ...(linkNote ? { linkNote } : {}),
  runs,
  summary: rows,
  targets,
};
const svg = barChartSvg(`gangway gang migration: wire bytes, ${GUESTS} x ${memoryBytes / MiB} MiB, ${SHARED * 100}% shared`, 'MiB', rows.map((r) => ({ label: `${r.link}: ${r.strategy}`, value: r.wireBytes / MiB })));
const path = writeResults('gang', result, svg);
if (values.json) console.log(JSON.stringify(result));
else {
  console.log(
    markdownTable(
      ['link', 'strategy', 'wire MiB', 'vs baseline', 'vs content floor', 'total s', 'vs baseline', 'wall-clock s', 'longest downtime ms', 'verified'],
      rows.map((r) => [
        r.link,
        r.strategy,
        (r.wireBytes / MiB).toFixed(0),
        `${(-r.wireSavedVsBaseline * 100).toFixed(0)}%`,
        `${r.wireVsFloor.toFixed(2)} of ${(r.floorBytes / MiB).toFixed(0)} MiB`,
        (r.totalMs / 1000).toFixed(2),
        `${(-r.timeSavedVsBaseline * 100).toFixed(0)}%`,
        (r.elapsedMs / 1000).toFixed(2),
        r.maxDowntimeMs.toFixed(0),
        String(r.verified),
      ]),
    ),
  );
  for (const t of targets) {
    console.log(
      `${t.link}: adaptive codec ${t.autoCodecVsBestFixed.toFixed(2)} of the better fixed codec's time, median of the repeats' ratios ` +
        `(target <= 1.05: ${t.autoCodecTargetMet ? 'met' : 'not met'}; by repeat ${t.autoCodecVsBestFixedByRepeat.map((x) => x.toFixed(2)).join(', ')}; ratio of the medians ${t.autoCodecVsBestFixedOfMedians.toFixed(2)})`,
    );
    if (!('gangTargetMet' in t)) continue;
    console.log(
      `${t.link}: gang with dedup sends ${change(t.wireSaved, 'fewer', 'more')} wire bytes (target 55% fewer: ${t.wireTargetMet ? 'met' : 'not met'}) ` +
        `and takes ${change(t.timeSaved, 'less', 'more')} total time (target 35% less: ${t.timeTargetMet ? 'met' : 'not met'}) than serial without dedup; ` +
        `against no dedup and no compression: ${change(t.wireSavedVsHypervisorDefault, 'fewer', 'more')} wire bytes, ${change(t.timeSavedVsHypervisorDefault, 'less', 'more')} time`,
    );
    console.log(
      `${t.link}: gang with dedup ${t.gangVsSerialDedupWire.toFixed(2)} of serial with dedup's wire bytes and ${t.gangVsSerialDedupTime.toFixed(2)} of its wall-clock time (target <= 1 and < 1: ${t.gangTargetMet ? 'met' : 'not met'}); ` +
        `without compression (dedup alone) its wire bytes are ${t.gangWireVsFloor.toFixed(2)} of the content floor (target <= 1.15: ${t.floorTargetMet ? 'met' : 'not met'})`,
    );
  }
  console.log(`\nresults: ${path}`);
}
if (runs.some((r) => !r.verified)) process.exitCode = 1;
