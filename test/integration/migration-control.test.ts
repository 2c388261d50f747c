// gangway migrate-set and gangway postcopy on running migrations between two real agents,
// through the CLI: a rate raised mid-flight, a downtime budget that lets a migration finish,
// a hybrid switched to post-copy by the operator, and the refusals (what they say, the exit
// code, and the migration going on untouched after them).
import { afterEach, describe, expect, it } from 'vitest';
import { waitForGuestProgress } from '../../agent/cli/demo.js';
import type { LocalAgent } from '../../agent/local-agent.js';
import { loadNative } from '../../agent/native.js';
import type { MigrationRecord } from '../../agent/daemon/records.js';
import { builtAgent, Cluster, uniqueName } from '../helpers/cluster.js';
import { waitForAsync } from '../helpers/wait.js';

const MiB = 1024 * 1024;
const canPostcopy = builtAgent && loadNative().uffdProbe();
/**
 * A guest that rewrites its hot quarter at twice the rate --bandwidth lets through: every
 * pre-copy round finds it dirty again, and no final round fits 1 ms (the resume allowance
 * alone is 5), so a pre-copy goes on round after round until its (high) limits.
 */
const HOT_GUEST = ['--dirty-rate', '8MiB/s', '--profile', 'random'];
const NEVER_CONVERGES = ['--bandwidth', '4MiB/s', '--downtime-ms', '1', '--max-rounds', '10000', '--max-bytes-factor', '1000'];

type Running = Extract<MigrationRecord, { direction: 'out'; state: 'running' }>;

/** The running outgoing migration of `guest` once it has reached round `round`. */
async function runningOf(agent: LocalAgent, guest: string, round = 0): Promise<Running> {
  return waitForAsync(
    `the migration of ${guest} running at round ${round}`,
    async () => {
      const found = ((await agent.status()).migrations as MigrationRecord[]).find((m) => m.direction === 'out' && m.guest === guest && m.state === 'running') as Running | undefined;
      return found?.progress && found.progress.round >= round && found.progress.roundPagesSent > 0 ? found : undefined;
    },
    60_000,
  );
}

describe.skipIf(!builtAgent)('migrate-set and postcopy on a running migration (CLI, two agents)', () => {
  let cluster: Cluster;
  const clis: { kill(signal?: NodeJS.Signals): boolean }[] = [];
  afterEach(async () => {
    // A migrate command still waiting (a failed test) goes first, then the agents and guests.
    for (const cli of clis.splice(0)) cli.kill('SIGKILL');
    await cluster?.cleanup();
  });

  function migrate(a: LocalAgent, name: string, to: string, flags: string[]) {
    const run = cluster.cli(a, ['migrate', name, '--to', to, '--json', ...flags]);
    clis.push(run);
    return run;
  }

  it('a migration capped at 1 MiB/s is sped up by migrate-set --bandwidth and completes at the new rate', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const name = uniqueName('bw');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '32MiB', '--dirty-rate', '1MiB/s', '--profile', 'random'])).exitCode).toBe(0);
    const started = performance.now();
    // 32 MiB of random pages at 1 MiB/s: over 30 s at the first rate.
    const run = migrate(a, name, b.listen, ['--bandwidth', '1MiB/s', '--codec', 'raw']);
    const migration = await runningOf(a, name);

    const set = await cluster.cli(a, ['migrate-set', migration.migrationId.slice(0, 8), '--bandwidth', '1Gbit/s']);
    expect(set.exitCode, set.stderr).toBe(0);
    expect(set.stdout).toContain(`migration ${migration.migrationId} of ${name} (precopy, round 0): bandwidth 119.2 MiB/s, downtime budget 300 ms`);
    expect(set.stdout).toMatch(/\n {2}was {8}bandwidth 1\.0 MiB\/s, downtime budget 300 ms/);

    const done = await run;
    expect(done.exitCode, done.stderr).toBe(0);
    const summary = JSON.parse(done.stdout).guests[0];
    expect(summary.bandwidthBytesPerSec).toBe(125_000_000);
    expect(summary.operatorChanges).toEqual([{ afterMs: expect.any(Number), bandwidthBytesPerSec: 125_000_000 }]);
    expect(summary.verified).toBe(true);
    // The first rate would have needed 32 s for round 0 alone.
    expect(performance.now() - started).toBeLessThan(25_000);
    expect(summary.linkRateBytesPerSec).toBeGreaterThan(2 * MiB);
    expect((await b.status()).guests.find((g) => g.name === name)?.state).toBe('running');
  }, 180_000);

  it('--downtime-ms raised on a pre-copy that cannot meet 1 ms lets it stop and complete', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const name = uniqueName('dt');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '16MiB', ...HOT_GUEST])).exitCode).toBe(0);
    const run = migrate(a, name, b.listen, NEVER_CONVERGES);
    const migration = await runningOf(a, name, 3);

    const set = await cluster.cli(a, ['migrate-set', migration.migrationId, '--downtime-ms', '5000', '--json']);
    expect(set.exitCode, set.stderr).toBe(0);
    const answer = JSON.parse(set.stdout);
    expect(answer).toMatchObject({ migrationId: migration.migrationId, guest: name, previous: { downtimeMs: 1, bandwidthBytesPerSec: 4 * MiB }, current: { downtimeMs: 5000, bandwidthBytesPerSec: 4 * MiB }, pacerSharedWith: [] });

    const done = await run;
    expect(done.exitCode, done.stderr).toBe(0);
    const summary = JSON.parse(done.stdout).guests[0];
    expect(summary).toMatchObject({ downtimeBudgetMs: 5000, downtimeBudgetMet: true, verified: true, forced: false });
    expect(summary.operatorChanges).toEqual([{ afterMs: expect.any(Number), downtimeMs: 5000 }]);
    const decisions: string[] = summary.rounds.filter((r: { final: boolean }) => !r.final).map((r: { decision: string }) => r.decision);
    expect(decisions.length).toBeGreaterThanOrEqual(4);
    expect(decisions.slice(0, 3).every((d) => / budget 1 ms$/.test(d)), decisions.join('\n')).toBe(true);
    expect(decisions.at(-1)).toMatch(/^final round fits the budget: .*budget 5000 ms$/);
    const check = await waitForGuestProgress(b, name, 1, 60_000);
    expect(check.stalePages, JSON.stringify(check)).toBe(0);

    // Over: neither command changes it any more, and both say why.
    const after = await cluster.cli(a, ['migrate-set', migration.migrationId, '--downtime-ms', '5']);
    expect(after.exitCode).toBe(1);
    expect(after.stderr).toBe(`gangway: migration ${migration.migrationId} is committed [GANGWAY_ERR_BAD_REQUEST]`);
  }, 180_000);

  it('refusals: nothing to set, a bad rate, an unknown id, an incoming migration, post-copy of a pre-copy offer; the migration goes on', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const name = uniqueName('no');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '8MiB', ...HOT_GUEST])).exitCode).toBe(0);
    const run = migrate(a, name, b.listen, NEVER_CONVERGES);
    const { migrationId } = await runningOf(a, name, 1);

    // Independent refusals, asked at once (each is a CLI process).
    const [nothing, badRate, badBudget, unknown, incoming, incomingPostcopy, postcopy] = await Promise.all([
      cluster.cli(a, ['migrate-set', migrationId]),
      cluster.cli(a, ['migrate-set', migrationId, '--bandwidth', 'fast']),
      cluster.cli(a, ['migrate-set', migrationId, '--downtime-ms', '0']),
      cluster.cli(a, ['migrate-set', 'ffffffff', '--downtime-ms', '5', '--json']),
      cluster.cli(b, ['migrate-set', migrationId, '--downtime-ms', '5']),
      cluster.cli(b, ['postcopy', migrationId]),
      cluster.cli(a, ['postcopy', migrationId]),
    ]);
    expect(nothing.exitCode).toBe(1);
    expect(nothing.stderr).toMatch(/give --bandwidth RATE, --downtime-ms N or both: nothing to change/);
    expect(badRate.exitCode).toBe(1);
    expect(badRate.stderr).toMatch(/--bandwidth "fast" is not understood/);
    expect(badBudget.exitCode).toBe(1);
    expect(badBudget.stderr).toMatch(/--downtime-ms must be a number from 1 to 600000/);
    expect(unknown.exitCode).toBe(1);
    expect(JSON.parse(unknown.stdout)).toEqual({ error: { code: 'GANGWAY_ERR_BAD_REQUEST', message: 'no running outgoing migration has id ffffffff (see gangway status)' } });
    expect(incoming.exitCode).toBe(1);
    expect(incoming.stderr).toContain(`migration ${migrationId} is incoming: change it on the source agent`);
    expect(incomingPostcopy.exitCode).toBe(1);
    expect(incomingPostcopy.stderr).toContain(`migration ${migrationId} is incoming: switch it on the source agent`);
    expect(postcopy.exitCode).toBe(1);
    expect(postcopy.stderr).toMatch(
      canPostcopy ? /as pre-copy, so the destination prepared no post-copy for it .*Migrate with --technique hybrid/ : /cannot go post-copy: the destination .* cannot run post-copy/,
    );

    // The API's own checks: a body with nothing to set, a value out of bounds, an unknown field.
    const settings = `/v1/migrations/${migrationId}/settings`;
    await expect(a.client.call('POST', settings, {})).rejects.toThrow(/give bandwidthBytesPerSec, downtimeMs or both/);
    await expect(a.client.call('POST', settings, { downtimeMs: 0 })).rejects.toThrow(/downtimeMs: /);
    await expect(a.client.call('POST', settings, { downtimeMs: 5, speed: 1 })).rejects.toThrow(/unknown field "speed"/);

    // None of that touched it: still running under its 1 ms budget, until a budget it can meet.
    const still = await runningOf(a, name);
    expect(still.migrationId).toBe(migrationId);
    expect((await cluster.cli(a, ['migrate-set', migrationId, '--downtime-ms', '5000'])).exitCode).toBe(0);
    const done = await run;
    expect(done.exitCode, done.stderr).toBe(0);
    expect(JSON.parse(done.stdout).guests[0].operatorChanges).toEqual([{ afterMs: expect.any(Number), downtimeMs: 5000 }]);
  }, 180_000);

  it.skipIf(!canPostcopy)('postcopy switches a hybrid at the end of its round 0, before its own policy could: it completes by post-copy, the guest checks clean there (needs userfaultfd: root)', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const name = uniqueName('op');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '32MiB', '--dirty-rate', '16MiB/s', '--hot', '0.5', '--profile', 'random'])).exitCode).toBe(0);
    // Left to itself, a hybrid goes post-copy once a second round shows it does not converge
    // (hybridSwitch); asked during round 0 (held at 1 MiB/s until the rate is raised), it goes after it.
    const run = migrate(a, name, b.listen, ['--technique', 'hybrid', '--bandwidth', '1MiB/s', '--downtime-ms', '1']);
    const { migrationId } = await runningOf(a, name, 0);

    const switched = await cluster.cli(a, ['postcopy', migrationId.slice(0, 8)]);
    expect(switched.exitCode, switched.stderr).toBe(0);
    expect(switched.stdout).toBe(`migration ${migrationId} of ${name} (precopy, round 0): post-copy starts at the next round boundary; \`gangway status\` follows it`);
    const twice = await cluster.cli(a, ['postcopy', migrationId, '--json']);
    expect(twice.exitCode, twice.stderr).toBe(0);
    expect(JSON.parse(twice.stdout)).toEqual({ migrationId, guest: name, phase: 'precopy', round: 0, alreadyRequested: true });
    // The rest of round 0 and the post-copy push at a rate that keeps the test short.
    expect((await cluster.cli(a, ['migrate-set', migrationId, '--bandwidth', '64MiB/s'])).exitCode).toBe(0);

    const done = await run;
    expect(done.exitCode, done.stderr).toBe(0);
    const summary = JSON.parse(done.stdout).guests[0];
    expect(summary.technique).toBe('hybrid');
    expect(summary.verified).toBe(true);
    expect(summary.postcopy?.byOperator, JSON.stringify(summary.postcopy)).toBe(true);
    expect(summary.postcopy.reason).toMatch(/^started by the operator \(gangway postcopy\) after 1 pre-copy round; .*budget 1 ms$/);
    expect(summary.postcopy.faultPages + summary.postcopy.pushedPages).toBe(summary.postcopy.missingPages);
    expect(summary.rounds).toHaveLength(1);
    expect(summary.operatorChanges).toEqual([
      { afterMs: expect.any(Number), postcopy: true },
      { afterMs: expect.any(Number), bandwidthBytesPerSec: 64 * MiB },
    ]);
    expect(summary.bandwidthBytesPerSec).toBe(64 * MiB);
    const check = await waitForGuestProgress(b, name, 2, 60_000);
    expect(check.resumeStalePages, JSON.stringify(check)).toBe(0);
    expect(check.stalePages, JSON.stringify(check)).toBe(0);
    expect((await a.status()).guests.find((g) => g.name === name)).toBeUndefined();

    const again = await cluster.cli(a, ['postcopy', migrationId, '--json']);
    expect(again.exitCode).toBe(1);
    expect(JSON.parse(again.stdout).error.message).toBe(`migration ${migrationId} is committed`);
  }, 180_000);
});
