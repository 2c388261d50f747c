// gangway drain as an operator meets it: one source agent, two destination agents, process
// guests. The guests spread over both peers; a guest that cannot move (its name is taken at
// every destination) stays and keeps running here; new guests and arriving migrations are
// refused while the drain runs, and taken again after; the exit code says whether every guest
// moved. Ctrl-C cancels: the guests not moved stay. And the per-host outgoing limit
// (migration.maxParallelOutbound) queues a migration beyond it instead of failing it.
//
// The destinations hold each commit for a while (GANGWAY_FAULT_DELAY=dest-commit:MS): that
// keeps the drain running long enough to try things during it, whatever the machine's speed.
import { afterEach, describe, expect, it } from 'vitest';
import { execa } from 'execa';
import { builtAgent, Cluster, mainJs, uniqueName } from '../helpers/cluster.js';
import { waitForAsync } from '../helpers/wait.js';
import type { LocalAgent } from '../../agent/local-agent.js';

type Guest = { name: string; state: string; stalePages?: number; metaErrors?: number; passes?: number };
type Migration = { direction: string; state: string; guest: string; migrationId: string; startedAt: string; queuedAt?: string; endedAt?: string };

const guestsOf = async (agent: LocalAgent) => (await agent.status()).guests as unknown as Guest[];
const migrationsOf = async (agent: LocalAgent) => (await agent.status()).migrations as unknown as Migration[];

/** The guest runs and its own check of its memory finds nothing wrong. */
function expectHealthy(guest: Guest | undefined, where: string): void {
  expect(guest, `${where}: guest missing`).toBeDefined();
  expect(guest!.state, `${where}: ${guest!.name}`).toBe('running');
  expect(guest!.stalePages, `${where}: ${guest!.name} stale pages`).toBe(0);
  expect(guest!.metaErrors, `${where}: ${guest!.name} meta errors`).toBe(0);
}

// Three agents and a dozen CLI runs each: more than the default minute on a loaded machine.
describe.skipIf(!builtAgent)('gangway drain', { timeout: 240_000 }, () => {
  let cluster: Cluster | undefined;
  afterEach(async () => {
    await cluster?.cleanup();
    cluster = undefined;
  });

  it('spreads four guests over two peers; the one whose name is taken at both stays and runs here; new guests are refused meanwhile', async () => {
    cluster = new Cluster();
    const delay = { GANGWAY_FAULT_DELAY: 'dest-commit:2500' };
    const a = await cluster.agent('a');
    const b = await cluster.agent('b', [], delay);
    const c = await cluster.agent('c', [], delay);
    const prefix = uniqueName('dr');
    const names = [1, 2, 3, 4].map((i) => `${prefix}-${i}`);
    for (const name of names) expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '16MiB', '--dirty-rate', '1MiB/s'])).exitCode).toBe(0);
    // The second guest's name is taken at both destinations: wherever it is dealt, it cannot land.
    const clash = names[1]!;
    for (const peer of [b, c]) expect((await cluster.cli(peer, ['guest', 'start', clash, '--memory', '8MiB'])).exitCode).toBe(0);

    const drain = cluster.cli(a, ['drain', '--to', `${b.listen},${c.listen}`, '--json']);
    await waitForAsync('a migration leaving a', async () => (await migrationsOf(a)).some((m) => m.direction === 'out'), 30_000);
    const refused = await cluster.cli(a, ['guest', 'start', uniqueName('new'), '--memory', '8MiB', '--json']);
    expect(refused.exitCode).toBe(1);
    expect(JSON.parse(refused.stdout).error).toEqual({
      code: 'GANGWAY_ERR_DRAINING',
      message: `this host is being drained (gangway drain --to ${b.listen},${c.listen}): it takes no new guests until the drain ends; use another host`,
    });
    // An arriving migration is refused too (b offers a its copy of the clashing guest).
    const arriving = await cluster.cli(b, ['migrate', clash, '--to', a.listen, '--json']);
    expect(arriving.exitCode).toBe(1);
    expect(JSON.parse(arriving.stdout).error.message).toMatch(/this host is being drained/);

    const run = await drain;
    expect(run.exitCode, run.stderr).toBe(1);
    const summary = JSON.parse(run.stdout);
    expect(summary).toMatchObject({ dryRun: false, cancelled: false, moved: 3, stayed: 1 });
    expect(summary.plan.guests.map((g: { name: string; to: string }) => [g.name, g.to])).toEqual([
      [names[0], b.listen],
      [names[1], c.listen],
      [names[2], b.listen],
      [names[3], c.listen],
    ]);
    const failed = summary.outcomes.find((o: { guest: string }) => o.guest === clash);
    expect(failed).toMatchObject({ moved: false, to: c.listen });
    expect(failed.error.message).toMatch(new RegExp(`a guest named "${clash}" already exists`));

    // The three others run at the destinations, over both; the clashing one runs here, sound.
    const atB = await guestsOf(b);
    const atC = await guestsOf(c);
    for (const name of [names[0]!, names[2]!]) expectHealthy(atB.find((g) => g.name === name), 'b');
    expectHealthy(atC.find((g) => g.name === names[3]), 'c');
    const atA = await guestsOf(a);
    expect(atA.map((g) => g.name)).toEqual([clash]);
    expectHealthy(atA[0], 'a');
    const passes = atA[0]!.passes!;
    await waitForAsync('the guest left here to keep writing', async () => ((await guestsOf(a))[0]!.passes ?? 0) > passes, 10_000);

    // The text output names each outcome; the drain is over, so a takes guests again.
    const started = await cluster.cli(a, ['guest', 'start', uniqueName('after'), '--memory', '8MiB']);
    expect(started.exitCode, started.stderr).toBe(0);
  });

  it('--dry-run prints the plan that gangway plan gives for each peer and moves nothing; bad --to is refused', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a');
    const b = await cluster.agent('b');
    const c = await cluster.agent('c');
    const prefix = uniqueName('dry');
    const names = [1, 2, 3].map((i) => `${prefix}-${i}`);
    for (const name of names) expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '8MiB'])).exitCode).toBe(0);
    const dry = await cluster.cli(a, ['drain', '--to', `${b.listen},${c.listen}`, '--dry-run', '--max-parallel', '3', '--json']);
    expect(dry.exitCode, dry.stderr).toBe(0);
    const summary = JSON.parse(dry.stdout);
    expect(summary).toMatchObject({ dryRun: true, moved: 0, stayed: 0, outcomes: [], plan: { maxParallel: 3, unmovable: [] } });
    // Each peer's share is decided as gangway plan decides it.
    const planB = JSON.parse((await cluster.cli(a, ['plan', names[0]!, names[2]!, '--to', b.listen, '--json'])).stdout);
    const planC = JSON.parse((await cluster.cli(a, ['plan', names[1]!, '--to', c.listen, '--json'])).stdout);
    expect(summary.plan.peers).toEqual([planB, planC]);
    expect(summary.plan.guests).toEqual([
      { name: names[0], to: b.listen, technique: planB.guests[0].technique },
      { name: names[1], to: c.listen, technique: planC.guests[0].technique },
      { name: names[2], to: b.listen, technique: planB.guests[1].technique },
    ]);
    const text = await cluster.cli(a, ['drain', '--to', `${b.listen},${c.listen}`, '--dry-run']);
    expect(text.stdout).toContain(`drain: 3 guests to ${b.listen}, ${c.listen}, at most 2 at once`);
    expect(text.stdout).toContain(`1. ${names[0]} -> ${b.listen}: ${planB.guests[0].technique}`);
    expect(text.stdout).toMatch(/dry run: nothing was moved$/m);
    expect((await guestsOf(a)).map((g) => g.name).sort()).toEqual(names);
    expect(await guestsOf(b)).toEqual([]);
    // Not draining after a dry run.
    expect((await cluster.cli(a, ['guest', 'start', uniqueName('new'), '--memory', '8MiB'])).exitCode).toBe(0);

    const twice = await cluster.cli(a, ['drain', '--to', `${b.listen},${b.listen}`]);
    expect(twice.exitCode).not.toBe(0);
    expect(twice.stderr).toMatch(/--to.*names a peer twice/);
    const bad = await cluster.cli(a, ['drain', '--to', `${b.listen},nowhere`]);
    expect(bad.stderr).toMatch(/"nowhere" is not an agent address: use HOST:PORT\[,HOST:PORT\.\.\.\]/);
    const self = await cluster.cli(a, ['drain', '--to', a.listen, '--json']);
    expect(self.exitCode).toBe(1);
    expect(JSON.parse(self.stdout).error.message).toMatch(/is this agent itself/);
  });

  it('Ctrl-C cancels the drain: the guests not moved stay here and run, and the host takes guests again', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a');
    const b = await cluster.agent('b', [], { GANGWAY_FAULT_DELAY: 'dest-commit:3000' });
    const prefix = uniqueName('cc');
    const names = [1, 2, 3].map((i) => `${prefix}-${i}`);
    for (const name of names) expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '8MiB'])).exitCode).toBe(0);
    const drain = cluster.cli(a, ['drain', '--to', b.listen, '--max-parallel', '1']);
    await waitForAsync('the first migration', async () => (await migrationsOf(a)).some((m) => m.direction === 'out'), 30_000);
    drain.kill('SIGINT');
    const run = await drain;
    expect(run.exitCode, run.stderr).toBe(130);
    expect(run.stderr).toMatch(/SIGINT: cancelling the drain/);
    expect(run.stdout).toMatch(/^drain cancelled: [01] of 3 guests moved; stayed here: /m);
    // The guests the drain had not started stay, and say so.
    for (const name of names.slice(1)) expect(run.stdout).toContain(`stayed ${name} here (was going to ${b.listen}): the drain was cancelled before it moved: it stays here`);
    const atA = await guestsOf(a);
    for (const name of names.slice(1)) expectHealthy(atA.find((g) => g.name === name), 'a');
    expect((await cluster.cli(a, ['guest', 'start', uniqueName('new'), '--memory', '8MiB'])).exitCode).toBe(0);
  });

  it('migration.maxParallelOutbound 1: a second migrate command is queued, listed so, and starts only once the first has ended', async () => {
    cluster = new Cluster();
    const a = await cluster.agent('a', [], { GANGWAY_MIGRATION_MAX_PARALLEL_OUTBOUND: '1' });
    const b = await cluster.agent('b', [], { GANGWAY_FAULT_DELAY: 'dest-commit:8000' });
    const vm1 = uniqueName('q');
    const vm2 = uniqueName('q');
    for (const name of [vm1, vm2]) expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '8MiB'])).exitCode).toBe(0);
    const first = cluster.cli(a, ['migrate', vm1, '--to', b.listen, '--json']);
    await waitForAsync('the first migration', async () => (await migrationsOf(a)).some((m) => m.guest === vm1), 30_000);
    // The first holds its slot for the 8 s its commit is held at b: long enough for a CLI to start.
    const migrate = cluster.cli(a, ['migrate', vm2, '--to', b.listen, '--json']);
    const queued = await waitForAsync('a queued migration in status', async () => (await migrationsOf(a)).find((m) => m.state === 'queued'), 30_000);
    expect(queued.guest).toBe(vm2);
    expect(queued.queuedAt).toBe(queued.startedAt);
    expect((await first).exitCode).toBe(0);
    const run = await migrate;
    expect(run.exitCode, run.stderr).toBe(0);
    expect(JSON.parse(run.stdout).guests.map((g: { guest: string }) => g.guest)).toEqual([vm2]);
    const records = (await migrationsOf(a)).filter((m) => m.direction === 'out');
    expect(records.map((m) => m.state)).toEqual(['committed', 'committed']);
    const second = records.find((m) => m.guest === vm2)!;
    const earlier = records.find((m) => m.guest === vm1)!;
    expect(earlier.queuedAt).toBeUndefined();
    expect(second.queuedAt).toBe(queued.queuedAt);
    // It ran only after the first had ended (the records' own times, not the test's clock).
    expect(Date.parse(second.startedAt)).toBeGreaterThanOrEqual(Date.parse(earlier.endedAt!));
    expect(Date.parse(second.startedAt)).toBeGreaterThan(Date.parse(second.queuedAt!));

  });

  it('migration.maxParallelOutbound and migration.channels come from the environment, bounded, naming the variable and the value', async () => {
    const check = (env: Record<string, string>) =>
      execa(process.execPath, [mainJs, 'agent', '--check-config', '--insecure-plaintext-loopback'], { reject: false, timeout: 60_000, env });
    const good = await check({ GANGWAY_MIGRATION_MAX_PARALLEL_OUTBOUND: '3' });
    expect(good.exitCode, good.stderr).toBe(0);
    expect(JSON.parse(good.stdout).migration).toEqual({ maxParallelOutbound: 3, channels: 2 });
    for (const [value, why] of [['0', 'must be at least 1'], ['many', 'must be a whole number from 1 to 256'], ['300', 'must be at most 256']]) {
      const bad = await check({ GANGWAY_MIGRATION_MAX_PARALLEL_OUTBOUND: value! });
      expect(bad.exitCode).not.toBe(0);
      expect(bad.stderr).toContain(`environment: GANGWAY_MIGRATION_MAX_PARALLEL_OUTBOUND ${why} (got "${value}")`);
    }
    const none = await check({ GANGWAY_MIGRATION_CHANNELS: '0' });
    expect(none.exitCode, none.stderr).toBe(0);
    expect(JSON.parse(none.stdout).migration).toEqual({ maxParallelOutbound: 2, channels: 0 });
    const bad = await check({ GANGWAY_MIGRATION_CHANNELS: '5' });
    expect(bad.exitCode).not.toBe(0);
    expect(bad.stderr).toContain('environment: GANGWAY_MIGRATION_CHANNELS must be at most 4 (got "5")');
  });
});
