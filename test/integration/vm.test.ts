// QEMU VMs moved by gangway between two real agents: RAM through the agents, device state
// through QEMU (x-ignore-shared). The VMs boot gangway-testvm, which rewrites its pages and
// checks each one it revisits; after every move the test asks it for a full check of every
// page (in the destination's memory file, which is its RAM) and expects 0 stale pages, its
// passes going on, and QEMU running in exactly one place. QEMU runs under TCG.
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { isAlive, processState } from '../../agent/guest/process-guest.js';
import { runTestvmFullCheck } from '../../agent/guest/testvm-status.js';
import { loadNative, testvmDir, testvmMissing, TESTVM_KERNEL_FILE } from '../../agent/native.js';
import { qemuMissing } from '../../agent/guest/qemu-guest.js';
import { Codec, GuestKind, Technique } from '../../protocol/codes.js';
import { Frame } from '../../protocol/index.js';
import { Attacker } from '../helpers/attacker.js';
import { waitForAsync } from '../helpers/wait.js';
import { execa } from 'execa';
import { builtAgent, Cluster, mainJs, shmFilesOf, uniqueName } from '../helpers/cluster.js';

type Agent = Awaited<ReturnType<Cluster['agent']>>;
const MiB = 1024 * 1024;
const imagesDir = testvmDir;
const KERNEL = TESTVM_KERNEL_FILE;

function skipReason(): string | undefined {
  if (!builtAgent) return 'the agent is not built (npm run build)';
  const missing = qemuMissing() ?? testvmMissing();
  if (missing) return missing;
  if (!loadNative().uffdProbe()) return 'userfaultfd is not usable here (the tracking shim and post-copy need it)';
  return undefined;
}
const skip = skipReason();
if (skip) console.warn(`vm tests skipped: ${skip}`);

async function guestOn(agent: Agent, name: string) {
  return (await agent.status()).guests.find((g) => g.name === name);
}


/** QEMU processes of guest `name` (their command line names it). */
function qemuPidsOf(name: string): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const args = readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0');
      if (args[0]?.endsWith('qemu-system-x86_64') && args.includes(`guest=${name}`) && processState(Number(entry)) !== 'Z') pids.push(Number(entry));
    } catch {}
  }
  return pids;
}

async function startVm(cluster: Cluster, agent: Agent, name: string, memory = '64MiB', append = 'gw.profile=random gw.seed=3 gw.rate=2048'): Promise<void> {
  const run = await cluster.cli(agent, ['vm', 'start', name, '--memory', memory, '--kernel', KERNEL, '--accel', 'tcg', '--append', append, '--json']);
  expect(run.exitCode, run.stderr).toBe(0);
  await waitForAsync(`VM ${name} to boot its kernel`, async () => (await guestOn(agent, name))?.testvm?.state === 'running', 60_000);
}

async function migrate(cluster: Cluster, agent: Agent, args: string[], ok = true) {
  const run = await cluster.cli(agent, ['migrate', ...args, '--json']);
  if (ok) expect(run.exitCode, run.stderr + run.stdout).toBe(0);
  return { run, result: run.stdout ? JSON.parse(run.stdout) : undefined };
}

/** The kernel's full check of every page of its RAM (the memory file): its stale pages. */
async function fullCheck(memoryPath: string): Promise<{ checkPages: number; checkStalePages: number; stalePages: number }> {
  const status = await runTestvmFullCheck(memoryPath, 30_000);
  return { checkPages: status.checkPages, checkStalePages: status.checkStalePages, stalePages: status.stalePages };
}

/** The VM runs on `here` (QMP says running, its kernel's passes go on, a full check finds no stale page) and not on `there`. */
async function runsOnlyOn(here: Agent, there: Agent, name: string): Promise<void> {
  expect(await guestOn(there, name)).toBeUndefined();
  const guest = (await guestOn(here, name))!;
  expect(guest).toMatchObject({ kind: 'qemu', state: 'running', vmStatus: 'running' });
  expect(qemuPidsOf(name)).toEqual([guest.pid]);
  const passes = guest.testvm!.passes;
  await waitForAsync('the kernel to make a pass', async () => (await guestOn(here, name))!.testvm!.passes > passes, 30_000);
  const check = await fullCheck(guest.memoryPath);
  expect(check.checkPages).toBeGreaterThan(0);
  expect(check.checkStalePages, JSON.stringify(check)).toBe(0);
  expect(check.stalePages, JSON.stringify(check)).toBe(0);
  expect(shmFilesOf(name)).toHaveLength(1);
}

describe.skipIf(skip !== undefined)('QEMU VMs (TCG)', () => {
  let cluster: Cluster;
  afterEach(async () => {
    await cluster?.cleanup();
  });

  async function twoAgents(envA?: NodeJS.ProcessEnv, envB?: NodeJS.ProcessEnv): Promise<[Agent, Agent]> {
    cluster = new Cluster();
    return [await cluster.agent('a', ['--vm-images-dir', imagesDir], envA), await cluster.agent('b', ['--vm-images-dir', imagesDir], envB)];
  }

  it('pre-copy, post-copy, hybrid and pre-copy on channels: each verified, device state through QEMU, the kernel finds no stale page', async () => {
    const [a, b] = await twoAgents();
    const name = uniqueName('vm');
    await startVm(cluster, a, name);
    const sourcePid = (await guestOn(a, name))!.pid;
    const { result } = await migrate(cluster, a, [name, '--to', b.listen]);
    const summary = result.guests[0];
    expect(summary).toMatchObject({ verified: true, technique: 'precopy', memoryBytes: 64 * MiB, repairedPages: 0 });
    // QEMU's own part: ROMs and devices, not the RAM (x-ignore-shared).
    expect(summary.deviceStateBytes).toBeGreaterThan(16 * 1024);
    expect(summary.deviceStateBytes).toBeLessThan(4 * MiB);
    await waitForAsync('the source QEMU to quit', async () => !isAlive(sourcePid) || processState(sourcePid) === 'Z', 30_000);
    await runsOnlyOn(b, a, name);
    for (const [from, to, technique] of [[b, a, 'postcopy'], [a, b, 'hybrid']] as const) {
      const { result: moved } = await migrate(cluster, from, [name, '--to', to.listen, '--technique', technique, ...(technique === 'hybrid' ? ['--postcopy-after-rounds', '1'] : [])]);
      expect(moved.guests[0]).toMatchObject({ verified: true, technique, repairedPages: 0 });
      await runsOnlyOn(to, from, name);
    }
    // Without dedup the VM's RAM goes on channels, read from QEMU's memory files by the threads.
    const { result: onChannels } = await migrate(cluster, b, [name, '--to', a.listen, '--no-dedup', '--codec', 'raw']);
    expect(onChannels.guests[0]).toMatchObject({ verified: true, technique: 'precopy', repairedPages: 0, channels: { count: 2, tls: false } });
    // Every page of round 0 on them, but its memory never written (holes of the file: read as zeros, skipped).
    expect(onChannels.guests[0].channels.pages + (onChannels.guests[0].rounds[0].holePages ?? 0)).toBeGreaterThanOrEqual((64 * MiB) / 4096);
    await runsOnlyOn(a, b, name);
  });

  it('a VM moved there and back by pre-copy: on the way back the memory its kernel never wrote there (holes of the file the first destination made) is skipped unread, and the kernel finds no stale page', async () => {
    const [a, b] = await twoAgents();
    const name = uniqueName('vm');
    await startVm(cluster, a, name, '64MiB', 'gw.profile=zero gw.seed=3 gw.rate=1024');
    const { result: there } = await migrate(cluster, a, [name, '--to', b.listen]);
    expect(there.guests[0]).toMatchObject({ verified: true, technique: 'precopy', repairedPages: 0 });
    const { result: back } = await migrate(cluster, b, [name, '--to', a.listen]);
    const round0 = back.guests[0].rounds[0];
    // The final check looked for holes again (the kernel writes some meanwhile): nothing to repair.
    expect(back.guests[0], JSON.stringify(round0)).toMatchObject({ verified: true, technique: 'precopy', repairedPages: 0 });
    // Its zero pages came as zero runs and were not written there: much of its memory (a
    // quarter here; its kernel touches the rest).
    expect(round0.holePages, JSON.stringify(round0)).toBeGreaterThan((64 * MiB) / 4096 / 8);
    expect(round0.zeroPages).toBeGreaterThanOrEqual(round0.holePages);
    await runsOnlyOn(a, b, name);
  });

  it('a gang of three VMs of one image: dedup sends fewer bytes, each VM verified', async () => {
    const [a, b] = await twoAgents();
    const names = [0, 1, 2].map((i) => uniqueName(`vg${i}`));
    for (const [i, name] of names.entries()) {
      await startVm(cluster, a, name, '64MiB', `gw.profile=os-image gw.seed=${10 + i} gw.image_seed=7 gw.shared=800 gw.hot=50 gw.rate=256`);
    }
    // One fixed codec both ways: what the adaptive one picks on a loaded machine moved the
    // ratio below from 0.51 to 0.85 across runs, and this compares dedup, not codecs.
    const without = (await migrate(cluster, a, [...names, '--to', b.listen, '--no-dedup', '--codec', 'raw'])).result;
    const withDedup = (await migrate(cluster, b, [...names, '--to', a.listen, '--codec', 'raw'])).result;
    for (const summary of [...without.guests, ...withDedup.guests]) expect(summary).toMatchObject({ verified: true, repairedPages: 0 });
    expect(withDedup.dedupStats.hits.crossGuest).toBeGreaterThan(1000);
    expect(without.dedupStats.hits.crossGuest).toBe(0);
    expect(withDedup.wireBytes).toBeLessThan(without.wireBytes * 0.8);
    for (const name of names) await runsOnlyOn(a, b, name);
  });

  it('the destination QEMU killed before the commit: the migration fails saying so, the VM runs on at the source', async () => {
    const [a, b] = await twoAgents();
    const name = uniqueName('vk');
    await startVm(cluster, a, name);
    const running = cluster.cli(a, ['migrate', name, '--to', b.listen, '--bandwidth', '8MiB/s', '--json']);
    const standby = await waitForAsync('the standby QEMU at the destination', async () => qemuPidsOf(name).length === 2 && qemuPidsOf(name), 30_000);
    const sourcePid = (await guestOn(a, name))!.pid;
    const destinationPid = standby.find((pid) => pid !== sourcePid)!;
    process.kill(destinationPid, 'SIGKILL');
    const run = await running;
    expect(run.exitCode).not.toBe(0);
    expect(run.stderr).toMatch(/exited|QEMU/);
    expect(run.stderr).toMatch(/keeps running on this host|resumed on this host/);
    await runsOnlyOn(a, b, name);
  });

  it('a migration that ends while the standby QEMU starts leaves nothing of it at the destination: its QMP socket and console, made after the abort, go once it is gone', async () => {
    // The source agent dies on the accept, when the destination's QEMU has only just been
    // started; the destination holds that QEMU's end for 15 s, so the QEMU makes its files
    // after the migration was dropped and its files first removed.
    const [a, b] = await twoAgents({ GANGWAY_FAULT_CRASH: 'source-after-accept' }, { GANGWAY_FAULT_DELAY: 'standby-cancel:15000' });
    const name = uniqueName('vc');
    await startVm(cluster, a, name);
    const sourcePid = (await guestOn(a, name))!.pid;
    const guestsDir = join(b.stateDir, 'guests');
    const made = () => readdirSync(guestsDir).filter((file) => !file.endsWith('.json'));
    // Watched from the start: the CLI may take seconds to hear of its agent's death on a loaded machine.
    const migrating = cluster.cli(a, ['migrate', name, '--to', b.listen, '--json']);
    // The standby is held 15 s after the abort, which comes after the CLI, the source and the
    // accept: 12 s from the CLI's start ran out once in CI on a loaded machine.
    await waitForAsync('the standby QEMU to make its QMP socket after the abort', async () => made().some((file) => file.endsWith('.qmp')), 25_000);
    expect((await migrating).exitCode).not.toBe(0);
    // The migration is over at the destination only once its standby is gone, and nothing of it is left.
    await waitForAsync('the destination to drop the migration', async () => (await b.status()).migrations.every((m) => m.state !== 'running'), 30_000);
    expect(made()).toEqual([]);
    expect(qemuPidsOf(name)).toEqual([sourcePid]);
    expect((await b.status()).migrations).toMatchObject([{ direction: 'in', state: 'aborted' }]);
    // The source's agent, started again, finds its VM running.
    const source = await cluster.agent('a', ['--vm-images-dir', imagesDir]);
    await runsOnlyOn(source, b, name);
  }, 120_000);

  it('a source QEMU that dies during a migration fails it, saying QEMU exited, and nothing is resumed or left at the destination', async () => {
    const [a, b] = await twoAgents();
    const name = uniqueName('vx');
    await startVm(cluster, a, name);
    const sourcePid = (await guestOn(a, name))!.pid;
    const running = cluster.cli(a, ['migrate', name, '--to', b.listen, '--bandwidth', '8MiB/s', '--json']);
    await waitForAsync('the standby QEMU at the destination', async () => qemuPidsOf(name).length === 2, 30_000);
    process.kill(sourcePid, 'SIGKILL');
    const run = await running;
    expect(run.exitCode).not.toBe(0);
    expect(JSON.parse(run.stdout).error.code).toBe('GANGWAY_ERR_GUEST_FAILED');
    expect(run.stderr).toMatch(new RegExp(`QEMU \\(pid ${sourcePid}\\) exited.*does not run anywhere`));
    expect(run.stderr).not.toMatch(/keeps running on this host/);
    await waitForAsync('the destination to drop its standby', async () => qemuPidsOf(name).length === 0, 15_000);
    expect(await guestOn(b, name)).toBeUndefined();
    expect((await guestOn(a, name))?.state).toBe('dead');
  });

  it('a standby QEMU does not outlive its agent: the destination agent killed before the switchover takes its QEMU with it', async () => {
    const [a, b] = await twoAgents();
    const name = uniqueName('vd');
    await startVm(cluster, a, name);
    const sourcePid = (await guestOn(a, name))!.pid;
    const running = cluster.cli(a, ['migrate', name, '--to', b.listen, '--bandwidth', '8MiB/s', '--json']);
    await waitForAsync('the standby QEMU at the destination', async () => qemuPidsOf(name).length === 2, 30_000);
    await b.kill();
    await waitForAsync('the standby QEMU to die with its agent', async () => qemuPidsOf(name).length === 1, 10_000);
    const run = await running;
    expect(run.exitCode).not.toBe(0);
    expect(qemuPidsOf(name)).toEqual([sourcePid]);
    await waitForAsync('the VM to run on at the source', async () => (await guestOn(a, name))?.vmStatus === 'running', 30_000);
    const check = await fullCheck((await guestOn(a, name))!.memoryPath);
    expect(check.checkStalePages).toBe(0);
  });

  it('kill -9 of the destination agent during post-copy: restarted, it takes the VM back (its userfaultfd from QEMU) and the migration completes, the kernel finds no stale page', async () => {
    const [a] = await twoAgents();
    let b = cluster.agents[1]!;
    const name = uniqueName('vt');
    await startVm(cluster, a, name);
    const sourcePid = (await guestOn(a, name))!.pid;
    const migrating = migrate(cluster, a, [name, '--to', b.listen, '--technique', 'postcopy', '--bandwidth', '8MiB/s']);
    // The VM runs there (the source has its `committed`) and pages are still missing.
    await waitForAsync('post-copy under way', async () => (await a.status()).migrations.some((m) => m.direction === 'out' && 'progress' in m && m.progress?.phase === 'postcopy'), 60_000);
    expect((await guestOn(b, name))?.incoming?.missingPages).toBeGreaterThan(0);
    const qemuPid = (await guestOn(b, name))!.pid;
    const listen = b.listen;
    await b.kill();
    expect(isAlive(qemuPid)).toBe(true);
    b = await cluster.agent('b', ['--vm-images-dir', imagesDir, '--listen', listen]);
    const { result } = await migrating;
    expect(result.guests[0]).toMatchObject({ verified: true, technique: 'postcopy' });
    expect(result.guests[0].postcopy.reattaches).toBeGreaterThanOrEqual(1);
    await waitForAsync('the destination to hold every page', async () => !(await guestOn(b, name))?.incoming, 60_000);
    expect((await guestOn(b, name))!.pid).toBe(qemuPid);
    await waitForAsync('the source QEMU to quit', async () => !isAlive(sourcePid) || processState(sourcePid) === 'Z', 30_000);
    await runsOnlyOn(b, a, name);
  });

  it('kill -9 of the source agent right after the commit, and of the destination agent right after the VM started there: the VM runs in exactly one place', async () => {
    // Source dies after sending the commit: restarted, it learns the VM runs there and quits its paused copy.
    const [a, b] = await twoAgents({ GANGWAY_FAULT_CRASH: 'source-after-commit' });
    const name = uniqueName('vr');
    await startVm(cluster, a, name);
    const sourcePid = (await guestOn(a, name))!.pid;
    const first = await migrate(cluster, a, [name, '--to', b.listen], false);
    expect(first.run.exitCode).not.toBe(0);
    await waitForAsync('the destination to run the VM', async () => (await guestOn(b, name))?.vmStatus === 'running', 30_000);
    const a2 = await cluster.agent('a', ['--vm-images-dir', imagesDir]);
    await waitForAsync('the restarted source to drop its copy', async () => !(await guestOn(a2, name)), 60_000);
    await waitForAsync('the source QEMU to quit', async () => !isAlive(sourcePid) || processState(sourcePid) === 'Z', 30_000);
    await runsOnlyOn(b, a2, name);
    // Destination dies right after the VM started there: the source waits in doubt, then drops its copy.
    const listen = a2.listen;
    await a2.kill();
    const a3 = await cluster.agent('a', ['--vm-images-dir', imagesDir, '--listen', listen], { GANGWAY_FAULT_CRASH: 'dest-after-start' });
    const bPid = (await guestOn(b, name))!.pid;
    const second = await migrate(cluster, b, [name, '--to', a3.listen], false);
    expect(second.run.exitCode).not.toBe(0);
    expect(JSON.parse(second.run.stdout).error.code).toBe('GANGWAY_ERR_SWITCHOVER_IN_DOUBT');
    const a4 = await cluster.agent('a', ['--vm-images-dir', imagesDir, '--listen', listen]);
    await waitForAsync('the source to drop its copy', async () => !(await guestOn(b, name)), 60_000);
    await waitForAsync('the old QEMU to quit', async () => !isAlive(bPid) || processState(bPid) === 'Z', 30_000);
    await runsOnlyOn(a4, b, name);
  });

  it.skipIf(!existsSync('/dev/net/tun'))('a VM with a NIC: on the operator\'s TAP here, on a TAP the destination makes (on its bridge) there, removed with the VM', async () => {
    const suffix = `${process.pid % 100000}`;
    const sourceTap = `gwst${suffix}`;
    const bridge = `gwbr${suffix}`;
    const ip = (...args: string[]) => execa('ip', args, { reject: false });
    await ip('tuntap', 'add', 'dev', sourceTap, 'mode', 'tap');
    await ip('link', 'add', bridge, 'type', 'bridge');
    try {
      cluster = new Cluster();
      const a = await cluster.agent('a', ['--vm-images-dir', imagesDir]);
      const b = await cluster.agent('b', ['--vm-images-dir', imagesDir, '--vm-bridge', bridge]);
      const name = uniqueName('vn');
      // A NIC without its TAP is refused, saying how to make one.
      const noTap = await cluster.cli(a, ['vm', 'start', name, '--memory', '64MiB', '--kernel', KERNEL, '--nic', 'e1000']);
      expect(noTap.exitCode).not.toBe(0);
      expect(noTap.stderr).toMatch(/needs its TAP device here: pass --tap DEVICE.*ip tuntap add/);
      const missing = await cluster.cli(a, ['vm', 'start', name, '--memory', '64MiB', '--kernel', KERNEL, '--tap', 'gwnothere0']);
      expect(missing.stderr).toMatch(/no TAP device of that name/);
      const run = await cluster.cli(a, ['vm', 'start', name, '--memory', '64MiB', '--kernel', KERNEL, '--accel', 'tcg', '--tap', sourceTap, '--append', 'gw.profile=random gw.rate=1024', '--json']);
      expect(run.exitCode, run.stderr).toBe(0);
      await waitForAsync('the VM to boot', async () => (await guestOn(a, name))?.testvm?.state === 'running', 60_000);
      const cmdline = (pid: number) => readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      const sourceArgs = cmdline((await guestOn(a, name))!.pid);
      expect(sourceArgs).toContain(`tap,id=net0,ifname=${sourceTap},script=no,downscript=no`);
      const mac = sourceArgs.find((arg) => arg.startsWith('virtio-net-pci,'))!.match(/mac=([0-9a-f:]+)/)![1]!;
      await migrate(cluster, a, [name, '--to', b.listen]);
      await runsOnlyOn(b, a, name);
      const there = (await b.status()).guests.find((g) => g.name === name)!;
      const destinationTap = readdirSync('/sys/class/net').find((dev) => cmdline(there.pid).includes(`tap,id=net0,ifname=${dev},script=no,downscript=no`));
      expect(destinationTap).toMatch(/^gw[0-9a-f]{8}$/);
      // The same NIC, MAC and all: the device state that came expects it.
      expect(cmdline(there.pid)).toContain(`virtio-net-pci,netdev=net0,mac=${mac}`);
      expect(readFileSync(`/sys/class/net/${destinationTap}/master/uevent`, 'utf8')).toMatch(new RegExp(`INTERFACE=${bridge}`));
      // The operator's TAP stays; the one the destination made goes with the VM.
      expect(existsSync(`/sys/class/net/${sourceTap}`)).toBe(true);
      expect((await cluster.cli(b, ['guest', 'stop', name])).exitCode).toBe(0);
      expect(existsSync(`/sys/class/net/${destinationTap}`)).toBe(false);
    } finally {
      await cluster?.cleanup();
      await ip('link', 'del', sourceTap);
      await ip('link', 'del', bridge);
    }
  });

  it('demo --vm moves a VM between two agents of its own and leaves nothing behind', async () => {
    cluster = new Cluster();
    const qemuBefore = qemuPidsOf('vm1');
    const shmBefore = readdirSync('/dev/shm').filter((file) => file.startsWith('gangway-vm1-'));
    const run = await execa(process.execPath, [mainJs, 'demo', '--vm', '--memory', '64MiB', '--json'], { reject: false, timeout: 120_000 });
    expect(run.exitCode, run.stderr).toBe(0);
    const [migration] = JSON.parse(run.stdout).migrations;
    expect(migration).toMatchObject({ guest: 'vm1', verified: true, memoryBytes: 64 * MiB, guestCheck: { stalePages: 0 } });
    expect(migration.guestCheck.passesAfterResume).toBeGreaterThan(0);
    expect(qemuPidsOf('vm1')).toEqual(qemuBefore);
    expect(readdirSync('/dev/shm').filter((file) => file.startsWith('gangway-vm1-'))).toEqual(shmBefore);
  });

  it('kill -9 of the source agent with the VM paused for the switchover, before the commit: restarted, it resumes the VM here', async () => {
    const [a, b] = await twoAgents({ GANGWAY_FAULT_CRASH: 'source-after-pause' });
    const name = uniqueName('vp');
    await startVm(cluster, a, name);
    const first = await migrate(cluster, a, [name, '--to', b.listen], false);
    expect(first.run.exitCode).not.toBe(0);
    const again = await cluster.agent('a', ['--vm-images-dir', imagesDir]);
    await waitForAsync('the restarted source to resume the VM', async () => (await guestOn(again, name))?.vmStatus === 'running', 30_000);
    expect((await guestOn(again, name))?.outgoing).toBeUndefined();
    await waitForAsync('the destination to drop its standby', async () => qemuPidsOf(name).length === 1, 15_000);
    await runsOnlyOn(again, b, name);
  });

  it('an agent restarted under a running VM finds it by its QMP socket, shows it and moves it', async () => {
    const [a, b] = await twoAgents();
    const name = uniqueName('vs');
    await startVm(cluster, a, name);
    const pid = (await guestOn(a, name))!.pid;
    await a.stop();
    expect(isAlive(pid)).toBe(true);
    const again = await cluster.agent('a', ['--vm-images-dir', imagesDir]);
    expect(await guestOn(again, name)).toMatchObject({ pid, kind: 'qemu', state: 'running', vmStatus: 'running' });
    await migrate(cluster, again, [name, '--to', b.listen]);
    await runsOnlyOn(b, again, name);
    // guest stop quits QEMU and leaves nothing of the VM behind.
    const stop = await cluster.cli(b, ['guest', 'stop', name]);
    expect(stop.exitCode, stop.stderr).toBe(0);
    expect(qemuPidsOf(name)).toEqual([]);
    expect(shmFilesOf(name)).toEqual([]);
    expect(readdirSync(join(b.stateDir, 'guests')).filter((file) => file.includes(name) || file.endsWith('.qmp'))).toEqual([]);
  });
});

describe.skipIf(!builtAgent)('hostile VM definitions in an offer', () => {
  let cluster: Cluster;
  afterEach(async () => {
    await cluster?.cleanup();
  });

  it('are rejected with the reason, and the destination starts nothing', async () => {
    cluster = new Cluster();
    const b = await cluster.agent('b', ['--vm-images-dir', imagesDir]);
    const attacker = await Attacker.connect({ address: b.listen, agentId: 'attacker' });
    try {
      const base = { machine: 'q35', cpus: 1, accel: 'tcg', kernel: KERNEL, append: '' };
      const cases: [Record<string, string | number>, RegExp, number?][] = [
        [{ ...base, kernel: '../../../etc/passwd' }, /kernel: a file name in the images directory/],
        [{ ...base, kernel: 'vmlinuz-not-here' }, /not in this agent's images directory/],
        [{ ...base, append: 'x; touch /tmp/pwned' }, /append/],
        [{ ...base, append: 'a,b=c' }, /append/],
        [{ ...base, machine: 'pc-i440fx-7.2' }, /machine: must be one of: q35/],
        [{ ...base, device: 'e1000' }, /device/],
        [{ ...base, cpus: 4096 }, /cpus: at most 16/],
        [base, /more than/, 2 * 1024 ** 4],
        [base, /whole MiB/, 64 * MiB + 4096],
      ];
      for (const [i, [config, reason, lengthBytes]] of cases.entries()) {
        const migrationId = `00000000-0000-4000-8000-00000000000${i}`;
        const name = `hostile${i}`;
        attacker.watch(migrationId);
        attacker.send(
          Frame.offer({
            migrationId,
            guest: { name, kind: GuestKind.qemu, regions: [{ name: 'ram', lengthBytes: lengthBytes ?? 64 * MiB, pageSizeBytes: 4096 }], config },
            technique: Technique.precopy,
            downtimeBudgetMs: 300,
            codecs: [Codec.raw],
          }),
        );
        const reject = await attacker.next(migrationId, 'reject');
        expect(reject.message, JSON.stringify(config)).toMatch(reason);
        expect(qemuPidsOf(name)).toEqual([]);
        expect(shmFilesOf(name)).toEqual([]);
      }
      expect(readdirSync(join(b.stateDir, 'guests'))).toEqual([]);
      expect(existsSync('/tmp/pwned')).toBe(false);
    } finally {
      attacker.close();
    }
  });
});
