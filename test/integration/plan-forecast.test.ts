// `gangway plan` with the forecast, as an operator meets it: two agents (TLS, as deployed) in
// a 1 Gbit/s link's two network namespaces, each measuring its end of the veth as its uplink.
// plan prints every option's forecast (time, downtime, wire bytes), marks the one followed and
// says why it won; --json carries the same; migrate --technique auto then runs what plan said,
// prints the forecast in its first line, and its summary and history keep the forecast beside
// the outcome. The planner's mode is a setting
// (traffic.planner, --planner, GANGWAY_TRAFFIC_PLANNER) checked with --check-config.
// Processes are stopped by PID; guests, namespaces, temp dirs and /dev/shm files go, also on
// failure. Needs root and iproute2 for the link; without them that part skips and says why.
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createShapedLink, netnsAvailable, type ShapedLink } from '../../bench/netns-link.js';
import { initCa, issueHostCert } from '../../agent/cli/certs.js';
import { runner } from '../../agent/traffic/exec.js';
import { killGuestsOf, makeTempDir, startLocalAgent, type LocalAgent } from '../../agent/local-agent.js';
import type { PlanAnswer } from '../../agent/planner/plan-answer.js';
import { loadNative } from '../../agent/native.js';
import { builtAgent, mainJs, uniqueName } from '../helpers/cluster.js';

const PEER_PORT = 7401;
// The destination offers post-copy where userfaultfd works (the agents' features).
const canPostcopy = builtAgent && loadNative().uffdProbe();
const MiB = 1024 * 1024;

const gangway = (args: string[], env: Record<string, string> = {}) =>
  execa(process.execPath, [mainJs, ...args], { reject: false, timeout: 60_000, env: { GANGWAY_LISTEN: '', ...env } });

describe.skipIf(!builtAgent)('the planner mode setting', () => {
  it('is forecast by default, paper by flag or environment, and a bad value names the flag and the choices', async () => {
    const base = ['agent', '--check-config', '--insecure-plaintext-loopback', '--state-dir', '/tmp/gangway-check-planner'];
    const plain = await gangway(base);
    expect(plain.exitCode, plain.stderr).toBe(0);
    expect(JSON.parse(plain.stdout).traffic.planner).toBe('forecast');
    const flag = await gangway([...base, '--planner', 'paper']);
    expect(flag.exitCode, flag.stderr).toBe(0);
    expect(JSON.parse(flag.stdout).traffic.planner).toBe('paper');
    const env = await gangway(base, { GANGWAY_TRAFFIC_PLANNER: 'paper' });
    expect(JSON.parse(env.stdout).traffic.planner).toBe('paper');
    const bad = await gangway([...base, '--planner', 'rules']);
    expect(bad.exitCode).not.toBe(0);
    expect(bad.stderr).toMatch(/--planner.*'rules' is invalid.*forecast, paper/);
    const badEnv = await gangway(base, { GANGWAY_TRAFFIC_PLANNER: 'rules' });
    expect(badEnv.exitCode).not.toBe(0);
    expect(badEnv.stderr).toMatch(/GANGWAY_TRAFFIC_PLANNER .*"forecast"\|"paper" \(got "rules"\)/);
  });
});

const available = builtAgent ? await netnsAvailable() : { ok: false as const, reason: 'the agent is not built (npm run build)' };
const skipReason = available.ok ? undefined : available.reason;

describe.skipIf(skipReason !== undefined)(`gangway plan forecasts each option${skipReason ? ` (skipped: ${skipReason})` : ''}`, () => {
  let link: ShapedLink;
  let dir: string;
  let source: LocalAgent;
  let destination: LocalAgent;
  const memoryFiles: string[] = [];
  const to = () => `${link.addrB}:${PEER_PORT}`;

  const cli = (agent: LocalAgent, args: string[]) => execa(process.execPath, [mainJs, ...args, '--state-dir', agent.stateDir], { reject: false, timeout: 120_000 });

  async function startGuest(agent: LocalAgent, memory: string, dirtyRate: string, extra: string[] = ['--profile', 'random']): Promise<string> {
    const name = uniqueName('pf');
    const started = await cli(agent, ['guest', 'start', name, '--memory', memory, '--dirty-rate', dirtyRate, ...extra, '--json']);
    expect(started.exitCode, started.stderr + started.stdout).toBe(0);
    memoryFiles.push(JSON.parse(started.stdout).memoryPath);
    return name;
  }

  beforeAll(async () => {
    link = await createShapedLink({ name: `pf${process.pid.toString(36)}`, rateBitsPerSec: 1e9 });
    // The source's uplink carries only what gangway's shaper puts there (it refuses a root qdisc it did not install).
    await runner(link.netnsExecPrefix(link.nsA))('tc', ['qdisc', 'del', 'dev', link.nsA, 'root']);
    dir = makeTempDir('gangway-plan-forecast-');
    const caDir = join(dir, 'tls');
    await initCa({ dir: caDir, days: 1 });
    const sourceCert = await issueHostCert({ dir: caDir, name: 'source', sans: [link.addrA], validity: { days: 1 } });
    const destinationCert = await issueHostCert({ dir: caDir, name: 'destination', sans: [link.addrB], validity: { days: 1 } });
    const tls = (own: typeof sourceCert, peer: typeof sourceCert) => ({ cert: own.certPath, key: own.keyPath, ca: own.caPath, allow: [peer.fingerprint] });
    const env = { GANGWAY_TRAFFIC_SAMPLE_INTERVAL: '200ms' };
    source = await startLocalAgent({
      stateDir: join(dir, 'source'),
      mainPath: mainJs,
      wrap: link.netnsExecPrefix(link.nsA),
      listen: `${link.addrA}:${PEER_PORT}`,
      tls: tls(sourceCert, destinationCert),
      args: ['--uplink', link.nsA, '--link-capacity', '1Gbit/s'],
      env,
    });
    destination = await startLocalAgent({
      stateDir: join(dir, 'destination'),
      mainPath: mainJs,
      wrap: link.netnsExecPrefix(link.nsB),
      listen: `${link.addrB}:${PEER_PORT}`,
      tls: tls(destinationCert, sourceCert),
      args: ['--uplink', link.nsB, '--link-capacity', '1Gbit/s'],
      env,
    });
  });

  afterAll(async () => {
    for (const agent of [source, destination]) {
      if (!agent) continue;
      memoryFiles.push(...(await agent.status().catch(() => ({ guests: [] }))).guests.map((g) => g.memoryPath));
      await killGuestsOf(agent);
    }
    for (const agent of [source, destination]) await agent?.kill();
    for (const file of memoryFiles) rmSync(file, { force: true });
    if (dir) rmSync(dir, { recursive: true, force: true });
    await link?.close();
  });

  it('plan --json: every option with time, downtime and wire bytes; the fastest within the budget is followed, and why', async () => {
    const a = await startGuest(source, '64MiB', '1MiB/s');
    const b = await startGuest(source, '64MiB', '30MiB/s');
    const run = await cli(source, ['plan', a, b, '--to', to(), '--priority', 'high', '--json']);
    expect(run.exitCode, run.stderr).toBe(0);
    const plan = JSON.parse(run.stdout) as PlanAnswer;
    expect(plan.followed).toBe(true);
    const forecast = plan.forecast!;
    expect(forecast.mode).toBe('forecast');
    const techniques = canPostcopy ? ['hybrid', 'postcopy', 'precopy'] : ['precopy'];
    expect(forecast.options.map((o) => `${o.technique} ${o.strategy}`).sort()).toEqual(techniques.flatMap((t) => [`${t} gang`, `${t} serial`]));
    for (const o of forecast.options) {
      expect(o.totalMs).toBeGreaterThan(0);
      // Each guest's memory at least, once (random content: no page is zero, none repeats).
      expect(o.wireBytes).toBeGreaterThanOrEqual(2 * 64 * MiB);
      expect(o.downtimeMs).toBeGreaterThan(0);
    }
    // The dirty rates the guests were started with reached the forecast: the guest that dirties
    // more sends more by pre-copy.
    const precopySerial = forecast.options.find((o) => o.technique === 'precopy' && o.strategy === 'serial')!;
    const [first, second] = [a, b].map((name) => precopySerial.guests.find((g) => g.name === name)!);
    expect(second!.wireBytes).toBeGreaterThan(first!.wireBytes);
    const feasible = forecast.options.filter((o) => o.completes && o.withinBudget && o.keepsSla);
    const chosen = forecast.chosen!;
    expect(chosen.totalMs).toBe(Math.min(...feasible.map((o) => o.totalMs)));
    expect(plan.strategy).toBe(chosen.strategy);
    expect(plan.guests.map((g) => g.technique)).toEqual([chosen.technique, chosen.technique]);
    expect(forecast.why[0]).toMatch(new RegExp(`^${chosen.technique}( ${chosen.strategy})?: forecast .* the fastest of ${feasible.length} options? within the downtime budget 300 ms`));
    expect(plan.reasons).toContain(`forecast: ${forecast.why[0]}`);

    const text = await cli(source, ['plan', a, b, '--to', to(), '--priority', 'high']);
    expect(text.exitCode, text.stderr).toBe(0);
    console.info(text.stdout);
    const lines = text.stdout.split('\n');
    expect(lines).toContain('forecast (planner mode forecast):');
    const optionLines = lines.filter((l) => /^ {2}[* ] \w+ (gang|serial)\s+(time|gives up after) /.test(l));
    expect(optionLines).toHaveLength(forecast.options.length);
    expect(optionLines.every((l) => /, downtime [\d.]+ m?s, wire [\d.]+ \w+/.test(l))).toBe(true);
    expect(optionLines.filter((l) => l.startsWith('  * '))).toHaveLength(1);
    expect(text.stdout).toMatch(/^ {2}- \w+ (gang|serial): forecast .*, the fastest of/m);
    expect(text.stdout).toMatch(new RegExp(`^ {2}- measured: guest ${a}: 0% of its pages are zero \\(a sample of 4096 pages\\)$`, 'm'));
    await cli(source, ['guest', 'stop', a]);
    await cli(source, ['guest', 'stop', b]);
  }, 180_000);

  it("plan measures the guest before it moves (its zero pages from a sample, its hot set from the guest) and holds the options to migrate's limits as given", async () => {
    // 90% of a zero-profile guest's pages are zero; its writes land in a tenth of its memory.
    const guest = await startGuest(source, '64MiB', '1MiB/s', ['--profile', 'zero', '--hot', '0.1']);
    const run = await cli(source, ['plan', guest, '--to', to(), '--priority', 'high', '--json']);
    expect(run.exitCode, run.stderr).toBe(0);
    const forecast = (JSON.parse(run.stdout) as PlanAnswer).forecast!;
    const zero = forecast.measured.map((m) => new RegExp(`^guest ${guest}: (\\d+)% of its pages are zero \\(a sample of (\\d+) pages\\)$`).exec(m)).find(Boolean);
    expect(zero, forecast.measured.join('; ')).toBeDefined();
    // Less what the guest has written since it started: its hot pages stop being zero.
    expect(Number(zero![1])).toBeGreaterThanOrEqual(75);
    expect(Number(zero![2])).toBe(4096);
    expect(forecast.measured).toContain(`guest ${guest}: its writes land in 6.4 MiB (its hot set, as the guest says)`);
    expect(forecast.assumptions.join('; ')).not.toMatch(/hot set is not known/);
    // Zero pages cost a header: pre-copy's forecast sends a fraction of the memory.
    const precopy = forecast.options.find((o) => o.technique === 'precopy')!;
    expect(precopy.wireBytes).toBeLessThan(0.4 * 64 * MiB);
    // --downtime-ms: the budget every option is held to.
    const tight = await cli(source, ['plan', guest, '--to', to(), '--priority', 'high', '--downtime-ms', '1', '--json']);
    expect(tight.exitCode, tight.stderr).toBe(0);
    const held = (JSON.parse(tight.stdout) as PlanAnswer).forecast!;
    for (const o of held.options) expect(o.withinBudget).toBe(o.completes && o.downtimeMs <= 1);
    expect(held.options.some((o) => o.completes && !o.withinBudget)).toBe(true);
    // A bad value names the flag.
    const bad = await cli(source, ['plan', guest, '--to', to(), '--downtime-ms', '0']);
    expect(bad.exitCode).not.toBe(0);
    expect(bad.stderr).toMatch(/--downtime-ms/);
    await cli(source, ['guest', 'stop', guest]);
  }, 180_000);

  it('migrate --technique auto runs what plan said, and its summary keeps the forecast beside the outcome', async () => {
    const guest = await startGuest(source, '64MiB', '2MiB/s');
    const planned = JSON.parse((await cli(source, ['plan', guest, '--to', to(), '--priority', 'high', '--json'])).stdout) as PlanAnswer;
    const run = await cli(source, ['migrate', guest, '--to', to(), '--technique', 'auto', '--priority', 'high', '--json']);
    expect(run.exitCode, run.stderr + run.stdout).toBe(0);
    const summary = JSON.parse(run.stdout);
    expect(summary.guests[0]).toMatchObject({ guest, verified: true, technique: planned.guests[0]!.technique });
    const forecast = summary.guests[0].forecast;
    expect(forecast).toMatchObject({ technique: planned.forecast!.chosen!.technique, strategy: 'gang' });
    expect(forecast.totalMs).toBeGreaterThan(0);
    expect(forecast.wireBytes).toBeGreaterThanOrEqual(64 * MiB);
    // The outcome is in the history beside the forecast, for calibration.
    const history = JSON.parse((await cli(source, ['history', '--json'])).stdout);
    const entry = history.entries.find((e: { guest: string; direction: string }) => e.guest === guest && e.direction === 'out');
    expect(entry).toMatchObject({ outcome: 'completed', forecast: { technique: forecast.technique, totalMs: forecast.totalMs } });
    expect(entry.totalMs).toBeGreaterThan(0);
    // What round 0 found of the content, for the next forecast: random pages, none zero or repeated.
    expect(entry.content).toEqual({ zeroShare: expect.any(Number), duplicateShare: expect.any(Number), sharedShare: expect.any(Number) });
    expect(entry.content.zeroShare).toBeLessThan(0.01);
    await cli(destination, ['guest', 'stop', guest]);
  }, 180_000);

  it('migrate prints the forecast (time, downtime, bytes) in its first line before the guest moves', async () => {
    const guest = await startGuest(source, '64MiB', '2MiB/s');
    const run = await cli(source, ['migrate', guest, '--to', to(), '--technique', 'auto', '--priority', 'high']);
    expect(run.exitCode, run.stderr + run.stdout).toBe(0);
    const [first, ...rest] = run.stdout.split('\n');
    expect(first).toMatch(new RegExp(`^forecast: ${guest} by (precopy|postcopy|hybrid) in [\\d.]+ m?s, downtime [\\d.]+ m?s, [\\d.]+ \\w+ on the wire$`));
    // The summary follows, and the guest runs at the destination.
    expect(rest.join('\n')).toContain(guest);
    expect((await destination.status()).guests.map((g) => g.name)).toContain(guest);
    await cli(destination, ['guest', 'stop', guest]);
  }, 180_000);
});

