// A short fixed-seed chaos campaign (npm run chaos): three runs whose faults are a kill -9 of
// the source during a hybrid migration, a kill -9 of the destination during a pre-copy, and
// the destination's memory directory filled, and one of a QEMU VM with a disk with an agent
// killed, each followed by the campaign's invariant checks
// (every guest in exactly one place, its own check clean, nothing left behind). And the
// campaign's hosts leave nothing either: namespaces, the tmpfs, processes.
import { execa } from 'execa';
import { existsSync, readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { ChaosHosts } from '../../bench/chaos/campaign.js';
import { describePlan, planRun } from '../../bench/chaos/schedule.js';
import { builtAgent, mainJs } from '../helpers/cluster.js';

const root = process.getuid?.() === 0;
const reason = !builtAgent ? 'dist/agent/main.js is not built (npm run build)' : !root ? 'the campaign needs root (userfaultfd, namespaces, a tmpfs)' : undefined;

describe.skipIf(reason !== undefined)(`a short chaos campaign${reason ? ` (skipped: ${reason})` : ''}`, () => {
  let hosts: ChaosHosts;
  const notes: string[] = [];
  beforeAll(async () => {
    hosts = await ChaosHosts.create(mainJs, notes);
  }, 60_000);
  afterAll(async () => {
    await hosts?.close();
  }, 60_000);

  // Seeds 112-114 draw kill-source (hybrid), kill-destination (pre-copy) and memory-full (hybrid gang).
  test.each([112, 113, 114])('seed %i: no violation', async (seed) => {
    const plan = planRun(seed, { quick: true, faults: hosts.faults });
    const result = await hosts.runOne(plan);
    expect(result.violations, `${describePlan(plan)}: ${result.faultNote}; migrate: ${result.migrateErrors.join('; ')}`).toEqual([]);
    for (const outcome of Object.values(result.outcomes)) expect(['moved', 'stayed', 'stranded']).toContain(outcome);
  }, 300_000);

  // The first quick seed from 7000 with a VM that has a disk, and an agent killed.
  test('a VM with a disk, an agent killed: no violation', async (context) => {
    if (!hosts.vms) return context.skip(notes.find((note) => note.startsWith('no VMs')) ?? 'no VMs here');
    let seed = 7000;
    const wanted = (s: number) => {
      const plan = planRun(s, { quick: true, faults: hosts.faults, vms: true });
      return plan.guests.some((g) => g.kind === 'vm' && g.disk) && plan.fault.kind.startsWith('kill');
    };
    while (!wanted(seed)) seed++;
    const plan = planRun(seed, { quick: true, faults: hosts.faults, vms: true });
    const result = await hosts.runOne(plan);
    expect(result.violations, `${describePlan(plan)}: ${result.faultNote}; migrate: ${result.migrateErrors.join('; ')}`).toEqual([]);
    for (const outcome of Object.values(result.outcomes)) expect(['moved', 'stayed', 'stranded']).toContain(outcome);
  }, 300_000);

  test('the campaign removes its namespaces and its tmpfs', async () => {
    // Its own tmpfs only: another run on this host may have one mounted too.
    const mountPoints = () =>
      readFileSync('/proc/mounts', 'utf8')
        .split('\n')
        .filter((line) => line.startsWith('gangway-chaos '))
        .map((line) => line.split(' ')[1]!);
    const memoryDir = hosts.memoryDir;
    if (memoryDir) expect(mountPoints()).toContain(memoryDir);
    await hosts.close();
    if (memoryDir) {
      expect(mountPoints()).not.toContain(memoryDir);
      expect(existsSync(memoryDir)).toBe(false);
    }
    const namespaces = (await execa('ip', ['netns', 'list'], { reject: false })).stdout;
    expect(namespaces).not.toContain(`gw-c${process.pid % 100000}-`);
  }, 60_000);
});
