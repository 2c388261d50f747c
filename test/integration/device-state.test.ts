// A guest's device state travels once it is paused, in chunks, and a destination checks its
// total against peers.maxDeviceState before it allocates anything: over the limit the
// migration is refused, not the session, nothing of it stays there and the guest runs on at
// the source. Played through the real protocol against real agents.
import { randomUUID } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import type { LocalAgent } from '../../agent/local-agent.js';
import { ErrorCode } from '../../protocol/errors.js';
import { Frame } from '../../protocol/index.js';
import { Attacker, offerOf } from '../helpers/attacker.js';
import { builtAgent, Cluster, shmFilesOf, uniqueName } from '../helpers/cluster.js';
import { waitForAsync } from '../helpers/wait.js';

const MiB = 1024 * 1024;

describe.skipIf(!builtAgent)('device state at the destination', () => {
  let cluster: Cluster | undefined;
  const peers: Attacker[] = [];
  afterEach(async () => {
    for (const peer of peers.splice(0)) peer.close();
    await cluster?.cleanup();
    cluster = undefined;
  });

  /** A migration offered and taken to its final round, paused, ready for its device state. */
  async function pausedMigration(agent: LocalAgent) {
    const peer = await Attacker.connect({ address: agent.listen, agentId: 'state-source' });
    peers.push(peer);
    const migrationId = randomUUID();
    const name = uniqueName('dev');
    peer.watch(migrationId);
    peer.send(offerOf(migrationId, name, 1 * MiB));
    await peer.next(migrationId, 'accept');
    peer.send(Frame.pause({ migrationId }));
    peer.send(Frame.roundEnd({ migrationId, round: 0, pageCount: 0, final: true }));
    return { peer, migrationId, name };
  }

  async function expectAborted(agent: LocalAgent, migrationId: string, name: string) {
    await waitForAsync('the migration to be aborted', async () => ((await agent.status()).migrations.find((m) => m.migrationId === migrationId)?.state === 'aborted' ? true : undefined));
    expect(shmFilesOf(name)).toHaveLength(0);
    expect((await agent.status()).guests).toHaveLength(0);
  }

  it('refuses a device state over peers.maxDeviceState before allocating it; the session goes on', async () => {
    cluster = new Cluster();
    const b = await cluster.agent('b', [], { GANGWAY_PEERS_MAX_DEVICE_STATE: '1MiB' });
    const { peer, migrationId, name } = await pausedMigration(b);
    // Announces 1 GiB in a 16-byte chunk: the agent must not allocate the gigabyte.
    peer.send(Frame.deviceState({ migrationId, offsetBytes: 0, totalBytes: 1024 * MiB, state: new Uint8Array(16) }));
    const abort = await peer.next(migrationId, 'abort');
    expect(abort.code).toBe(ErrorCode.LIMIT);
    expect(abort.message).toBe(`the guest's device state of ${1024 * MiB} bytes is over this agent's maximum of ${MiB} (peers.maxDeviceState)`);
    await expectAborted(b, migrationId, name);
    expect(peer.closedWith).toBeUndefined();
  });

  it('a process guest of two regions moves with its device state, and takes it back at the destination', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b')];
    const name = uniqueName('vm');
    const started = await cluster.cli(a, ['guest', 'start', name, '--memory', '8MiB,8MiB', '--dirty-rate', '2MiB/s', '--json']);
    expect(started.exitCode, started.stderr).toBe(0);
    expect(JSON.parse(started.stdout).memoryPaths).toHaveLength(2);
    const run = await cluster.cli(a, ['migrate', name, '--to', b.listen, '--json']);
    expect(run.exitCode, run.stderr).toBe(0);
    const summary = JSON.parse(run.stdout).guests[0];
    expect(summary.deviceStateBytes).toBe(48); // the synthetic guest's state (guest-layout.h)
    expect(summary.digests).toHaveLength(2);
    expect(summary.downtime.deviceStateMs).toBeGreaterThanOrEqual(0);
    expect(summary.downtime.deviceStateMs).toBeLessThanOrEqual(summary.downtime.finalRoundMs);
    const there = await waitForAsync('the guest to check itself at the destination', async () => {
      const guest = (await b.status()).guests.find((g) => g.name === name);
      return guest?.resumeCheckDone ? guest : undefined;
    });
    expect(there).toMatchObject({ state: 'running', regionBytes: [8 * MiB, 8 * MiB], resumeStalePages: 0, deviceLoads: 1, deviceErrors: 0, deviceSaves: 1 });
  });

  it('a device state over the destination\'s maximum fails the migration with the limit named, and the guest runs on at the source', async () => {
    cluster = new Cluster();
    const [a, b] = [await cluster.agent('a'), await cluster.agent('b', [], { GANGWAY_PEERS_MAX_DEVICE_STATE: '32B' })];
    const name = uniqueName('vm');
    expect((await cluster.cli(a, ['guest', 'start', name, '--memory', '16MiB', '--dirty-rate', '2MiB/s'])).exitCode).toBe(0);
    const run = await cluster.cli(a, ['migrate', name, '--to', b.listen, '--json']);
    expect(run.exitCode).not.toBe(0);
    const error = JSON.parse(run.stdout).error ?? JSON.parse(run.stdout);
    expect(JSON.stringify(error)).toMatch(/device state of 48 bytes is over this agent's maximum of 32 \(peers.maxDeviceState\)/);
    const here = (await a.status()).guests.find((g) => g.name === name)!;
    expect(here.state).toBe('running');
    expect((await b.status()).guests).toHaveLength(0);
    expect(shmFilesOf(name).length).toBeGreaterThan(0); // only the source's files
  });
});
