// Ctrl-C on `gangway migrate` as an operator meets it, with real agents and a guest too
// busy to move quickly (64 MiB dirtying 8 MiB/s behind an 8 MiB/s cap). Named after the
// failure it pins: Ctrl-C used to detach silently (exit 130) while the migration went on.
import { afterEach, describe, expect, it } from 'vitest';
import { setTimeout as sleep } from 'node:timers/promises';
import { basename } from 'node:path';
import { execa } from 'execa';
import type { LocalAgent } from '../../agent/local-agent.js';
import { loadNative } from '../../agent/native.js';
import { builtAgent, Cluster, mainJs, shmFilesOf, uniqueName } from '../helpers/cluster.js';

/** Post-copy needs userfaultfd (root). */
const uffd = builtAgent && loadNative().uffdProbe();

type Status = Awaited<ReturnType<LocalAgent['status']>>;

/** The running outgoing migration of `guest`, once the agent lists it. */
async function runningMigration(agent: LocalAgent, guest: string, phase?: string, timeoutMs = 20_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const m = (await agent.status()).migrations.find((r) => r.direction === 'out' && r.guest === guest && r.state === 'running');
    // A little progress first, so that the CLI has seen the migration's id in its stream.
    if (m && 'progress' in m && m.progress && (phase === undefined || m.progress.phase === phase)) return m.migrationId;
    await sleep(50);
  }
  throw new Error(`no running migration of ${guest} at ${agent.listen}`);
}

const guestOf = (status: Status, name: string) => status.guests.find((g) => g.name === name);

describe.skipIf(!builtAgent)('gangway migrate, interrupted', () => {
  let cluster: Cluster | undefined;
  afterEach(async () => {
    await cluster?.cleanup();
    cluster = undefined;
  });

  async function slowMigration(profile = 'os-image') {
    cluster = new Cluster();
    const a = await cluster.agent('a');
    const b = await cluster.agent('b');
    const name = uniqueName('vm');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '64MiB', '--dirty-rate', '8MiB/s', '--profile', profile])).exitCode).toBe(0);
    return { a, b, name };
  }

  /** The guest runs at the source, nothing of it at the destination, and the migration is over. */
  async function expectStayed(a: LocalAgent, b: LocalAgent, name: string, migrationId: string) {
    const atA = await a.status();
    expect(guestOf(atA, name)?.state).toBe('running');
    expect(atA.migrations.find((m) => m.migrationId === migrationId)?.state).toBe('failed');
    const deadline = Date.now() + 10_000;
    let atB = await b.status();
    while (Date.now() < deadline && atB.migrations.some((m) => m.state === 'running')) {
      await sleep(50);
      atB = await b.status();
    }
    expect(guestOf(atB, name)).toBeUndefined();
    expect(atB.migrations.filter((m) => m.state === 'running')).toEqual([]);
    // No guest process or memory file of it but the source's (both agents share /dev/shm).
    const source = guestOf(atA, name)!;
    const guestPids = async () =>
      (await execa('pgrep', ['-f', `gangway-${name}-`], { reject: false })).stdout
        .split('\n')
        .filter(Boolean)
        .map(Number);
    while (Date.now() < deadline && (await guestPids()).length > 1) await sleep(50);
    expect(await guestPids()).toEqual([source.pid]);
    expect(shmFilesOf(name)).toEqual([basename(source.memoryPath)]);
  }

  it.each(['SIGINT', 'SIGTERM'] as const)('%s cancels the migration: exit 130, the guest stays at the source', async (signal) => {
    const { a, b, name } = await slowMigration();
    const migrating = cluster!.cli(a, ['migrate', name, '--to', b.listen, '--bandwidth', '8MiB/s']);
    const migrationId = await runningMigration(a, name);
    migrating.kill(signal);
    const run = await migrating;
    expect(run.exitCode, run.stderr).toBe(130);
    expect(run.stderr).toMatch(new RegExp(`${signal}: cancelling the migration of ${name}`));
    expect(run.stdout).toContain(`cancelled: ${name} stays on this host`);
    await expectStayed(a, b, name, migrationId);
  });

  // Found by the chaos campaign: the CLI printed only "aborted" when the agent died under it.
  it('the source agent killed under the command: it says the agent went away and where to look, not "aborted"', async () => {
    const { a, b, name } = await slowMigration();
    const migrating = cluster!.cli(a, ['migrate', name, '--to', b.listen, '--bandwidth', '8MiB/s']);
    await runningMigration(a, name);
    await a.kill();
    const run = await migrating;
    expect(run.exitCode).not.toBe(0);
    expect(run.stderr).toMatch(/the agent at .*control\.sock closed the connection before it finished answering/);
    expect(run.stderr).toContain('`gangway history`');
    expect(run.stderr).toContain('GANGWAY_ERR_PEER_GONE');
    expect(run.stderr).not.toMatch(/^gangway: aborted/m);
  });

  it('cancels every migration of a serial command, also those that start after the Ctrl-C', async () => {
    const { a, b, name } = await slowMigration();
    const second = uniqueName('vm');
    expect((await cluster!.cli(a, ['guest', 'start', second, '--memory', '64MiB', '--dirty-rate', '8MiB/s'])).exitCode).toBe(0);
    const migrating = cluster!.cli(a, ['migrate', name, second, '--to', b.listen, '--strategy', 'serial', '--bandwidth', '8MiB/s', '--json']);
    const first = await runningMigration(a, name);
    migrating.kill('SIGINT');
    const run = await migrating;
    expect(run.exitCode, run.stderr).toBe(130);
    const out = JSON.parse(run.stdout);
    expect(out.cancelled.map((c: { guest: string }) => c.guest)).toEqual([name, second]);
    await expectStayed(a, b, name, first);
    const next = out.cancelled[1].migrationId as string;
    await expectStayed(a, b, second, next);
  });

  it('says what it cancelled in JSON', async () => {
    const { a, b, name } = await slowMigration();
    const migrating = cluster!.cli(a, ['migrate', name, '--to', b.listen, '--bandwidth', '8MiB/s', '--json']);
    const migrationId = await runningMigration(a, name);
    migrating.kill('SIGINT');
    const run = await migrating;
    expect(run.exitCode, run.stderr).toBe(130);
    const out = JSON.parse(run.stdout);
    expect(out.error.code).toBe('GANGWAY_ERR_ABORTED');
    expect(out.cancelled).toEqual([{ guest: name, migrationId }]);
    await expectStayed(a, b, name, migrationId);
  });

  /** A post-copy past its switchover: the guest runs at `b` and its pages still flow from `a` (8 MiB/s, 64 MiB of random pages). */
  async function postcopyUnderWay() {
    const { a, b, name } = await slowMigration('random');
    const migrating = cluster!.cli(a, ['migrate', name, '--to', b.listen, '--technique', 'postcopy', '--bandwidth', '8MiB/s']);
    let stderr = '';
    migrating.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const migrationId = await runningMigration(a, name, 'postcopy');
    return { a, b, name, migrating, migrationId, stderr: () => stderr };
  }

  async function waitForText(what: () => string, text: string) {
    const deadline = Date.now() + 10_000;
    while (!what().includes(text)) {
      if (Date.now() > deadline) throw new Error(`no "${text}" in ${JSON.stringify(what())}`);
      await sleep(20);
    }
  }

  it.skipIf(!uffd)('a post-copy past its switchover is not cancelled: the CLI says so, follows it to the end and reports it', async () => {
    const { b, name, migrating, migrationId } = await postcopyUnderWay();
    migrating.kill('SIGINT');
    const run = await migrating;
    expect(run.stderr).toContain(`migration ${migrationId.slice(0, 8)} of ${name} cannot be cancelled: `);
    expect(run.stderr).toMatch(/since the post-copy switchover.*following it/);
    // It moved: the summary, and a success.
    expect(run.exitCode, run.stderr).toBe(0);
    expect(run.stdout).not.toContain('cancelled:');
    expect(guestOf(await b.status(), name)?.state).toBe('running');
  });

  it.skipIf(!uffd)('a second Ctrl-C detaches at once and says how to follow or cancel the migration, which goes on', async () => {
    const { a, b, name, migrating, migrationId, stderr } = await postcopyUnderWay();
    migrating.kill('SIGINT');
    await waitForText(stderr, 'cannot be cancelled');
    migrating.kill('SIGINT');
    const run = await migrating;
    expect(run.exitCode).toBe(130);
    expect(run.stderr).toMatch(new RegExp(`detached \\(SIGINT\\): the migration to ${b.listen.replace(/\./g, '\\.')} goes on in the agent \\(${name}: ${migrationId.slice(0, 8)}\\)`));
    expect(run.stderr).toContain(`cancel it with \`gangway cancel ${migrationId.slice(0, 8)}\``);
    expect(run.stderr).toContain('follow it with `gangway status`');
    // It goes on without the CLI, to the end.
    const deadline = Date.now() + 30_000;
    let state: string | undefined = 'running';
    while (Date.now() < deadline && state === 'running') {
      await sleep(100);
      state = (await a.status()).migrations.find((m) => m.migrationId === migrationId)?.state;
    }
    expect(state).toBe('committed');
    expect(guestOf(await b.status(), name)?.state).toBe('running');
  });

  it('--detach prints the migration id and returns; `gangway cancel ID` stops it', async () => {
    const { a, b, name } = await slowMigration();
    const started = Date.now();
    const run = await cluster!.cli(a, ['migrate', name, '--to', b.listen, '--bandwidth', '8MiB/s', '--detach', '--json']);
    expect(run.exitCode, run.stderr).toBe(0);
    expect(Date.now() - started).toBeLessThan(8_000);
    const out = JSON.parse(run.stdout);
    expect(out).toMatchObject({ detached: true, to: b.listen, waiting: [] });
    expect(out.migrations).toHaveLength(1);
    const { migrationId } = out.migrations[0];
    expect(out.migrations[0].guest).toBe(name);
    // It goes on without the CLI.
    await sleep(500);
    expect((await a.status()).migrations.find((m) => m.migrationId === migrationId)?.state).toBe('running');
    const cancel = await cluster!.cli(a, ['cancel', migrationId.slice(0, 8)]);
    expect(cancel.exitCode, cancel.stderr).toBe(0);
    expect(cancel.stdout).toContain(`migration ${migrationId} cancelled`);
    const deadline = Date.now() + 10_000;
    while (Date.now() < deadline && (await a.status()).migrations.find((m) => m.migrationId === migrationId)?.state === 'running') await sleep(50);
    await expectStayed(a, b, name, migrationId);
  });
});

describe.skipIf(!builtAgent)('gangway migrate --detach, text', () => {
  it('names the id and how to follow and cancel it', async () => {
    const cluster = new Cluster();
    try {
      const a = await cluster.agent('a');
      const b = await cluster.agent('b');
      const name = uniqueName('vm');
      expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '64MiB', '--dirty-rate', '8MiB/s'])).exitCode).toBe(0);
      const run = await execa(process.execPath, [mainJs, 'migrate', name, '--to', b.listen, '--bandwidth', '8MiB/s', '--detach', '--state-dir', a.stateDir], { reject: false });
      expect(run.exitCode, run.stderr).toBe(0);
      expect(run.stdout).toMatch(new RegExp(`^migration [0-9a-f-]{36}: ${name} → ${b.listen.replace(/\./g, '\\.')} started$`, 'm'));
      expect(run.stdout).toContain('gangway cancel ID');
    } finally {
      await cluster.cleanup();
    }
  });
});
