// A VM's disks moved by gangway between two real agents: a raw disk file is a region of the
// guest (4 KiB blocks, sparse), its dirty blocks come from QEMU's own dirty bitmap read over
// NBD, and it arrives as a sparse file named at the commit. QEMU runs under TCG.
import { createHash } from 'node:crypto';
import { closeSync, existsSync, ftruncateSync, mkdirSync, openSync, readdirSync, readFileSync, readlinkSync, readSync, rmSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { qemuMissing } from '../../agent/guest/qemu-guest.js';
import { QmpClient } from '../../agent/guest/qmp.js';
import { gangwayBlockObjects } from '../../agent/guest/qmp-block.js';
import { isAlive, processState } from '../../agent/guest/process-guest.js';
import { loadNative, testvmDir, testvmMissing, TESTVM_KERNEL_FILE } from '../../agent/native.js';
import { writeTestvmBaseImage } from '../../agent/guest/testvm-disk.js';
import { runTestvmFullCheck } from '../../agent/guest/testvm-status.js';
import { waitForAsync } from '../helpers/wait.js';
import { builtAgent, Cluster, uniqueName } from '../helpers/cluster.js';

type Agent = Awaited<ReturnType<Cluster['agent']>>;
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

function skipReason(): string | undefined {
  if (!builtAgent) return 'the agent is not built (npm run build)';
  const missing = qemuMissing() ?? testvmMissing();
  if (missing) return missing;
  if (!loadNative().uffdProbe()) return 'userfaultfd is not usable here (the tracking shim needs it)';
  return undefined;
}
const skip = skipReason();
if (skip) console.warn(`vm disk tests skipped: ${skip}`);

async function guestOn(agent: Agent, name: string) {
  return (await agent.status()).guests.find((g) => g.name === name);
}

/** Writes `chunks` of 1 MiB of seeded pseudo-random bytes at scattered offsets of a sparse file of `sizeBytes`; returns the SHA-256 of the whole file's content as the test wrote it. */
function writeSparseDisk(path: string, sizeBytes: number, chunks: number, seed: number): string {
  const fd = openSync(path, 'wx', 0o600);
  try {
    ftruncateSync(fd, sizeBytes);
    const stride = Math.floor(sizeBytes / MiB / chunks) * MiB;
    for (let i = 0; i < chunks; i++) writeSync(fd, seededBytes(MiB, seed * 1000 + i), 0, MiB, i * stride);
  } finally {
    closeSync(fd);
  }
  return fileSha256(path);
}

function seededBytes(length: number, seed: number): Buffer {
  const out = Buffer.alloc(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out.writeUInt32LE(x >>> 0, i);
  }
  return out;
}

/**
 * SHA-256 of a file's content, whatever its holes: over the index and bytes of each page
 * that is not all zeros (a hole and a page of written zeros are the same content). Reads
 * only what holds data (SEEK_DATA), so a sparse 8 GiB file takes as long as its data.
 */
function fileSha256(path: string): string {
  const hash = createHash('sha256');
  const fd = openSync(path, 'r');
  const page = 4096;
  const buffer = Buffer.alloc(MiB);
  const index = Buffer.alloc(8);
  try {
    const runs = loadNative().fileDataRuns(fd, page, Math.ceil(statSync(path).size / page));
    for (let i = 0; i < runs.length; i += 2) {
      for (let first = runs[i]!, left = runs[i + 1]!; left > 0; ) {
        const count = Math.min(left, buffer.length / page);
        const n = readSync(fd, buffer, 0, count * page, first * page);
        for (let p = 0; p * page < n; p++) {
          const bytes = buffer.subarray(p * page, (p + 1) * page);
          if (bytes.every((b) => b === 0)) continue;
          index.writeBigUInt64LE(BigInt(first + p));
          hash.update(index).update(bytes);
        }
        first += count;
        left -= count;
      }
    }
  } finally {
    closeSync(fd);
  }
  return hash.digest('hex');
}

/** Bytes a file takes on disk (du). */
const allocatedBytes = (path: string): number => statSync(path).blocks * 512;

describe.skipIf(skip !== undefined)('VM disks (TCG)', () => {
  let cluster: Cluster;
  afterEach(async () => {
    await cluster?.cleanup();
  });

  /** Agents a and b of a new cluster, each with its disks directory (one for both when `shared`), with extra environment and flags. */
  async function twoAgents(shared = false, extra: { envA?: NodeJS.ProcessEnv; envB?: NodeJS.ProcessEnv; argsB?: string[] } = {}): Promise<{ a: Agent; b: Agent; disksA: string; disksB: string }> {
    cluster = new Cluster();
    const disksA = join(cluster.dir, 'disks-a');
    const disksB = shared ? disksA : join(cluster.dir, 'disks-b');
    mkdirSync(disksA, { recursive: true });
    mkdirSync(disksB, { recursive: true });
    disksOf.set('a', disksA).set('b', disksB);
    return { a: await agentNamed('a', extra.envA), b: await agentNamed('b', extra.envB, extra.argsB), disksA, disksB };
  }

  const disksOf = new Map<string, string>();
  /** Agent `name` (a or b) of the cluster, started (again) with its disks directory. */
  const agentNamed = (name: string, env?: NodeJS.ProcessEnv, args: string[] = []) => cluster.agent(name, ['--vm-images-dir', testvmDir, '--vm-disks-dir', disksOf.get(name)!, ...args], env);

  async function startVm(agent: Agent, name: string, disks: string[], append = 'gw.profile=random gw.seed=3 gw.rate=512'): Promise<void> {
    const run = await cluster.cli(agent, ['vm', 'start', name, '--memory', '64MiB', '--kernel', TESTVM_KERNEL_FILE, '--accel', 'tcg', '--append', append, ...disks.flatMap((d) => ['--disk', d]), '--json']);
    expect(run.exitCode, run.stderr).toBe(0);
    await waitForAsync(`VM ${name} to boot its kernel`, async () => (await guestOn(agent, name))?.testvm?.state === 'running', 60_000);
  }

  async function migrate(from: Agent, args: string[]) {
    const run = await cluster.cli(from, ['migrate', ...args, '--json']);
    return { run, result: run.exitCode === 0 ? JSON.parse(run.stdout) : undefined };
  }

  it('a sparse 8 GiB disk with 64 MiB written moves about 64 MiB and takes about 64 MiB at the destination, byte for byte', async () => {
    const { a, b, disksA, disksB } = await twoAgents();
    const name = uniqueName('vd');
    const file = `${name}.raw`;
    const digest = writeSparseDisk(join(disksA, file), 8 * GiB, 64, 1);
    await startVm(a, name, [file]);
    const sourcePid = (await guestOn(a, name))!.pid;
    const { run, result } = await migrate(a, [name, '--to', b.listen]);
    expect(run.exitCode, run.stderr + run.stdout).toBe(0);
    const summary = result.guests[0];
    expect(summary).toMatchObject({ verified: true, technique: 'precopy', repairedPages: 0, memoryBytes: 64 * MiB });
    // The disk on its own: 64 MiB of data when round 0 read it, every block of it sent.
    expect(summary.disks).toEqual([expect.objectContaining({ name: 'disk0', sizeBytes: 8 * GiB, dataBytes: 64 * MiB })]);
    expect(summary.disks[0].blocksSent).toBeGreaterThanOrEqual((64 * MiB) / 4096);
    expect(summary.disks[0].wireBytes).toBeGreaterThan(64 * MiB);
    expect(result.diskDataBytes).toBe(64 * MiB);
    // RAM: 64 MiB, mostly the kernel's random pages; the disk: 64 MiB of random data. The 8 GiB of holes never travel.
    expect(summary.wireBytes).toBeGreaterThan(64 * MiB);
    expect(summary.wireBytes).toBeLessThan(64 * MiB + 64 * MiB + 16 * MiB);
    await waitForAsync('the source QEMU to quit', async () => !isAlive(sourcePid) || processState(sourcePid) === 'Z', 30_000);
    const arrived = join(disksB, file);
    expect(statSync(arrived).size).toBe(8 * GiB);
    expect(allocatedBytes(arrived)).toBeGreaterThanOrEqual(64 * MiB);
    expect(allocatedBytes(arrived)).toBeLessThan(64 * MiB + 8 * MiB);
    expect(statSync(arrived).mode & 0o777).toBe(0o600);
    // The source's copy went with its guest; the destination's is the same bytes.
    expect(existsSync(join(disksA, file))).toBe(false);
    expect(fileSha256(arrived)).toBe(digest);
    const guest = (await guestOn(b, name))!;
    expect(guest).toMatchObject({ state: 'running', vmStatus: 'running', disks: [{ path: arrived, sizeBytes: 8 * GiB }] });
    expect(guest.disks![0]!.allocatedBytes).toBeLessThan(72 * MiB);
    expect(await guestOn(a, name)).toBeUndefined();
    // And back: the next migration of the same VM works, and leaves nothing in QEMU.
    const back = await migrate(b, [name, '--to', a.listen]);
    expect(back.run.exitCode, back.run.stderr + back.run.stdout).toBe(0);
    expect(back.result.guests[0]).toMatchObject({ verified: true });
    expect(fileSha256(join(disksA, file))).toBe(digest);
    expect(existsSync(arrived)).toBe(false);
    expect(await blockLeftovers(a, 'a', name)).toEqual({ exports: [], bitmaps: [], limited: [], jobs: [] });
  }, 180_000);

  /** gangway's block objects in the VM's QEMU and its block jobs, asked with the agent stopped (QEMU serves one QMP client). */
  async function blockLeftovers(agent: Agent, agentName: string, name: string) {
    const { pid, qmpSocket } = (await guestOn(agent, name))!;
    await agent.stop();
    expect(isAlive(pid)).toBe(true);
    const qmp = await QmpClient.connect(qmpSocket!);
    try {
      return { ...(await gangwayBlockObjects(qmp)), jobs: await qmp.exec('query-block-jobs') };
    } finally {
      await qmp.close();
      // Started again, it finds its VM, and the clean-up stops it.
      await agentNamed(agentName);
    }
  }

  it.each(['source', 'destination', 'cancel', 'cancel-hybrid'] as const)('%s: a disk migration ended in the middle leaves nothing in QEMU, the VM runs on at the source, and the next migration succeeds', async (how) => {
    const { a, b, disksA, disksB } = await twoAgents();
    const name = uniqueName(`vk${how[0]}`);
    const file = `${name}.raw`;
    const digest = writeSparseDisk(join(disksA, file), 256 * MiB, 48, 6);
    await startVm(a, name, [file]);
    const pid = (await guestOn(a, name))!.pid;
    // A hybrid's destination QEMU reaches the disk through the agent's export from the start.
    const migrating = cluster.cli(a, ['migrate', name, '--to', b.listen, '--bandwidth', '16MiB/s', ...(how === 'cancel-hybrid' ? ['--technique', 'hybrid'] : []), '--json']);
    let id = '';
    let progress: { round: number; disk?: { roundBlocks: number; roundBlocksSent: number } } | undefined;
    await waitForAsync('round 0 under way', async () => {
      const out = (await a.status()).migrations.find((m) => m.direction === 'out' && m.state === 'running' && 'progress' in m && m.progress);
      id = out?.migrationId ?? '';
      progress = out && 'progress' in out ? out.progress : undefined;
      return out !== undefined;
    }, 30_000);
    // Progress counts the disk apart: round 0 covers its 48 MiB of data, not its 256 MiB.
    expect(progress).toMatchObject({ round: 0, disk: { roundBlocks: (48 * MiB) / 4096 } });
    let source = a;
    if (how === 'source') {
      await a.kill();
      await migrating;
      source = await agentNamed('a');
    } else if (how === 'destination') {
      await b.kill();
      expect((await migrating).exitCode).not.toBe(0);
    } else {
      expect((await cluster.cli(a, ['cancel', id])).exitCode).toBe(0);
      expect((await migrating).exitCode).not.toBe(0);
    }
    const destination = how === 'destination' ? await agentNamed('b') : b;
    await waitForAsync('the destination to drop the migration', async () => (await destination.status()).migrations.every((m) => m.state !== 'running'), 30_000);
    // A hybrid's standby QEMU handed over its RAM's userfaultfd as it started: the agent
    // closed it with the migration (and its socket once the standby went).
    if (how === 'cancel-hybrid') await waitForAsync('no userfaultfd left open in the destination agent', async () => userfaultfdsOf(destination.pid) === 0, 10_000);
    // No export socket (a hybrid's) nor anything else of the migration is left in the destination's state directory.
    expect(readdirSync(join(destination.stateDir, 'guests')).filter((f) => !f.endsWith('.json'))).toEqual([]);
    // Nothing arrived at the destination (its file was never named), the source's disk is whole.
    expect(existsSync(join(disksB, file))).toBe(false);
    await waitForAsync('the VM to run at the source', async () => (await guestOn(source, name))?.vmStatus === 'running', 30_000);
    expect((await guestOn(source, name))!.pid).toBe(pid);
    expect(await guestOn(destination, name)).toBeUndefined();
    // The restarted source removed what the dead one left (it says so); the others, their own.
    if (how === 'source') await waitForAsync('the leftovers removed', async () => /removed what an earlier migration of this guest left/.test(readFileSync(source.logPath, 'utf8')), 30_000);
    const again = await migrate(source, [name, '--to', destination.listen]);
    expect(again.run.exitCode, again.run.stderr + again.run.stdout).toBe(0);
    expect(fileSha256(join(disksB, file))).toBe(digest);
    expect(await blockLeftovers(destination, 'b', name)).toEqual({ exports: [], bitmaps: [], limited: [], jobs: [] });
  }, 180_000);

  /** How many userfaultfds process `pid` holds open. */
  function userfaultfdsOf(pid: number): number {
    return readdirSync(`/proc/${pid}/fd`).filter((fd) => {
      try {
        return readlinkSync(`/proc/${pid}/fd/${fd}`) === 'anon_inode:[userfaultfd]';
      } catch {
        return false;
      }
    }).length;
  }

  /** The kernel's full check of its RAM and its disk, on the agent where the VM runs: no stale page, no stale block, and its disk writes go on. */
  async function kernelFindsNothingStale(agent: Agent, name: string, writing = true): Promise<void> {
    const guest = (await guestOn(agent, name))!;
    const writes = guest.testvm!.disk!.writes;
    if (writing) await waitForAsync('the kernel to write its disk', async () => (await guestOn(agent, name))!.testvm!.disk!.writes > writes, 30_000);
    const status = await runTestvmFullCheck(guest.memoryPath, 60_000);
    expect(status.checkPages).toBeGreaterThan(0);
    expect(status.disk!.checkBlocks).toBeGreaterThan(0);
    expect({ pages: status.checkStalePages, blocks: status.disk!.checkStaleBlocks, seenPages: status.stalePages, seenBlocks: status.disk!.staleBlocks, errors: status.disk!.errors }).toEqual({ pages: 0, blocks: 0, seenPages: 0, seenBlocks: 0, errors: 0 });
  }

  it('a VM writing its disk while it moves, there and back: digests match and its kernel finds no stale block and no stale page', async () => {
    const { a, b, disksA } = await twoAgents();
    const name = uniqueName('vw');
    const file = `${name}.raw`;
    writeTestvmBaseImage(join(disksA, file), { sizeBytes: 64 * MiB, baseBlocks: 2048, imageSeed: 7n });
    await startVm(a, name, [file], 'gw.profile=random gw.seed=5 gw.rate=512 gw.image_seed=7 gw.disk_base=2048 gw.disk_hot=512 gw.disk_rate=400');
    for (const [from, to] of [[a, b], [b, a]] as const) {
      const { run, result } = await migrate(from, [name, '--to', to.listen]);
      expect(run.exitCode, run.stderr + run.stdout).toBe(0);
      expect(result.guests[0]).toMatchObject({ verified: true, repairedPages: 0 });
      // The kernel wrote its disk during the rounds: a later round carried blocks of the bitmap.
      expect(result.guests[0].rounds.length).toBeGreaterThan(1);
      await kernelFindsNothingStale(to, name);
      expect(await guestOn(from, name)).toBeUndefined();
    }
  }, 180_000);

  /**
   * The VM's drive nodes (node name -> driver and file) and gangway's block objects and jobs in
   * its QEMU, asked with the agent stopped (QEMU serves one QMP client); the agent started again.
   */
  async function driveNodes(agent: Agent, agentName: string, name: string) {
    const { pid, qmpSocket } = (await guestOn(agent, name))!;
    await agent.stop();
    expect(isAlive(pid)).toBe(true);
    const qmp = await QmpClient.connect(qmpSocket!);
    let nodes: Record<string, string>;
    let leftovers;
    try {
      const named = (await qmp.exec('query-named-block-nodes', { flat: true })) as { 'node-name': string; drv: string; file: string }[];
      nodes = Object.fromEntries(named.map((node) => [node['node-name'], `${node.drv} ${node.file}`]));
      leftovers = { ...(await gangwayBlockObjects(qmp)), jobs: await qmp.exec('query-block-jobs') };
    } finally {
      await qmp.close();
    }
    return { nodes, leftovers, agent: await agentNamed(agentName) };
  }

  it.each(['postcopy', 'hybrid'] as const)(
    '%s: a VM writing its disk runs at the destination before its disk is there, reads and writes it through the agent, then uses its file directly; there and back, nothing stale',
    async (technique) => {
      const { a, b, disksA, disksB } = await twoAgents();
      const agents: Record<'a' | 'b', Agent> = { a, b };
      const disks = { a: disksA, b: disksB };
      const name = uniqueName(`v${technique[0]}`);
      const file = `${name}.raw`;
      writeTestvmBaseImage(join(disksA, file), { sizeBytes: 64 * MiB, baseBlocks: 2048, imageSeed: 9n });
      await startVm(a, name, [file], 'gw.profile=random gw.seed=6 gw.rate=512 gw.image_seed=9 gw.disk_base=2048 gw.disk_hot=512 gw.disk_rate=400');
      for (const [fromName, toName] of [['a', 'b'], ['b', 'a']] as const) {
        const from = agents[fromName];
        const to = agents[toName];
        // Slow enough that the guest runs there for a while before its last block is in. A
        // hybrid goes post-copy after its first round there (no final round fits 1 ms), and
        // back it converges (the guest's drive is the export all the same, complete at the
        // commit).
        const hybridSwitches = technique === 'hybrid' && toName === 'b';
        const { run, result } = await migrate(from, [name, '--to', to.listen, '--technique', technique, '--bandwidth', '32MiB/s', ...(hybridSwitches ? ['--postcopy-after-rounds', '1', '--downtime-ms', '1'] : [])]);
        expect(run.exitCode, run.stderr + run.stdout).toBe(0);
        const summary = result.guests[0];
        expect(summary).toMatchObject({ verified: true, technique });
        if (hybridSwitches) expect(summary.postcopy?.missingPages).toBeGreaterThan(0);
        if (technique === 'postcopy') {
          // Every data block of the disk (8 MiB of base image at least) was missing when the guest started there.
          expect(summary.postcopy.missingPages).toBeGreaterThan(2048);
          expect(summary.postcopy.pushedPages + summary.postcopy.faultPages).toBeGreaterThanOrEqual(summary.postcopy.missingPages);
        }
        await kernelFindsNothingStale(to, name);
        expect(await guestOn(from, name)).toBeUndefined();
        expect(existsSync(join(disks[fromName], file))).toBe(false);
        // The agent left the guest's I/O path: its drive is the file, no NBD node is left, nor anything else.
        const { nodes, leftovers, agent } = await driveNodes(to, toName, name);
        agents[toName] = agent;
        const path = join(disks[toName], file);
        expect(nodes).toMatchObject({ 'gw-disk0': `raw ${path}`, 'gw-file0': `file ${path}` });
        expect(Object.keys(nodes).filter((node) => node.startsWith('gw-nbd'))).toEqual([]);
        expect(leftovers).toEqual({ exports: [], bitmaps: [], limited: [], jobs: [] });
      }
    },
    240_000,
  );

  it('source killed during the post-copy of a disk: restarted, it serves the blocks the destination still lacks, and the VM completes there with nothing stale', async () => {
    const { a, b, disksA, disksB } = await twoAgents(false, { argsB: ['--postcopy-reattach', '60s'] });
    const name = uniqueName('vq');
    const file = `${name}.raw`;
    writeTestvmBaseImage(join(disksA, file), { sizeBytes: 128 * MiB, baseBlocks: 16384, imageSeed: 11n });
    await startVm(a, name, [file], 'gw.profile=random gw.seed=8 gw.rate=256 gw.image_seed=11 gw.disk_base=16384 gw.disk_hot=256 gw.disk_rate=200');
    const migrating = cluster.cli(a, ['migrate', name, '--to', b.listen, '--technique', 'postcopy', '--bandwidth', '8MiB/s', '--json']);
    await waitForAsync('post-copy under way', async () => (await guestOn(b, name))?.incoming !== undefined, 60_000);
    await new Promise((resolve) => setTimeout(resolve, 500));
    await a.kill();
    await migrating;
    expect((await guestOn(b, name))?.incoming?.missingPages ?? 0).toBeGreaterThan(0);
    const again = await agentNamed('a');
    await waitForAsync('the destination to hold every page and block', async () => {
      const there = await guestOn(b, name);
      return there !== undefined && !there.incoming;
    }, 90_000);
    await waitForAsync('the source to drop its copy', async () => !(await guestOn(again, name)), 30_000);
    expect(existsSync(join(disksA, file))).toBe(false);
    await kernelFindsNothingStale(b, name);
    const { nodes } = await driveNodes(b, 'b', name);
    expect(nodes).toMatchObject({ 'gw-disk0': `raw ${join(disksB, file)}` });
  }, 240_000);

  it('a VM writing its disk faster than the link carries it: its disk writes are limited, the migration converges, and the limit stays behind', async () => {
    const { a, b, disksA } = await twoAgents();
    const name = uniqueName('vt');
    const file = `${name}.raw`;
    writeTestvmBaseImage(join(disksA, file), { sizeBytes: 64 * MiB, baseBlocks: 2048, imageSeed: 7n });
    // A hot set of 16 MiB rewritten as fast as the kernel can (about 10 MB/s under TCG), through a 4 MiB/s link.
    // Without compression: the blocks it writes are text, which LZ4 halves, and a link that
    // carried 8 MiB/s of them let a TCG guest on a loaded CI host converge with no limit.
    await startVm(a, name, [file], 'gw.profile=zero gw.seed=5 gw.rate=0 gw.image_seed=7 gw.disk_base=2048 gw.disk_hot=4096 gw.disk_rate=max');
    const { run, result } = await migrate(a, [name, '--to', b.listen, '--bandwidth', '4MiB/s', '--codec', 'raw']);
    expect(run.exitCode, run.stderr + run.stdout).toBe(0);
    const summary = result.guests[0];
    // It converged (a round fit the budget) instead of hitting the round limit.
    expect(summary).toMatchObject({ verified: true, repairedPages: 0 });
    expect(summary.rounds.at(-2).decision).toMatch(/final round fits the budget/);
    expect(summary.diskWriteLimitBytesPerSec).toBeGreaterThan(0);
    expect(summary.diskWriteLimitBytesPerSec).toBeLessThan(4 * MiB);
    // At the destination the guest writes on, and no limit came with it: QEMU there reports no
    // I/O limit on any drive. (Its write rate is no proof: a TCG guest on a loaded 2-core CI
    // host can write below the source's limit with none set.)
    const before = (await guestOn(b, name))!.testvm!.disk!.writes;
    await waitForAsync('the guest to write its disk at the destination', async () => (await guestOn(b, name))!.testvm!.disk!.writes > before, 30_000);
    await kernelFindsNothingStale(b, name);
    const { pid, qmpSocket } = (await guestOn(b, name))!;
    await b.stop();
    expect(isAlive(pid)).toBe(true);
    const qmp = await QmpClient.connect(qmpSocket!);
    try {
      const drives = (await qmp.exec('query-block')) as { qdev?: string; inserted?: Record<string, unknown> }[];
      const limits = drives.filter((d) => d.inserted).map((d) => ({ qdev: d.qdev, group: d.inserted!.group, bps_wr: d.inserted!.bps_wr, bps: d.inserted!.bps, iops_wr: d.inserted!.iops_wr }));
      expect(limits.length).toBeGreaterThan(0);
      for (const limit of limits) expect(limit).toEqual({ qdev: limit.qdev, group: undefined, bps_wr: 0, bps: 0, iops_wr: 0 });
    } finally {
      await qmp.close();
      await agentNamed('b');
    }
  }, 180_000);

  it('a gang of VMs cloned from one base disk image sends their shared blocks once', async () => {
    const { a, b, disksA } = await twoAgents();
    const names = [0, 1, 2].map((i) => uniqueName(`vc${i}`));
    // 16 MiB of base image each (os-image-like text, as a cloned OS disk), the kernels idle on their disks.
    for (const [i, name] of names.entries()) {
      writeTestvmBaseImage(join(disksA, `${name}.raw`), { sizeBytes: 64 * MiB, baseBlocks: 4096, imageSeed: 9n });
      await startVm(a, name, [`${name}.raw`], `gw.profile=zero gw.seed=${20 + i} gw.rate=64 gw.image_seed=9 gw.disk_base=4096 gw.disk_rate=0`);
    }
    // Both without compression: the wire bytes then tell what dedup saved, not what the
    // adaptive codec chose for each run (raw or LZ4, by what it measured on loopback).
    const without = (await migrate(a, [...names, '--to', b.listen, '--no-dedup', '--codec', 'raw'])).result;
    const withDedup = (await migrate(b, [...names, '--to', a.listen, '--codec', 'raw'])).result;
    for (const summary of [...without.guests, ...withDedup.guests]) expect(summary).toMatchObject({ verified: true, repairedPages: 0 });
    // The second and third copies of the base image's blocks go as refs to the first.
    expect(withDedup.dedupStats.hits.crossGuest).toBeGreaterThan(4096);
    // And the wire carries that much less: each ref is a block not sent (the VMs' own
    // memory and their blocks off the image go either way).
    expect(without.wireBytes - withDedup.wireBytes).toBeGreaterThan(0.9 * withDedup.dedupStats.hits.crossGuest * 4096);
    expect(withDedup.wireBytes).toBeLessThan(without.wireBytes * 0.6);
    for (const name of names) await kernelFindsNothingStale(a, name, false);
  }, 240_000);

  it("a disk cloned from the base image of a VM already at the destination: its blocks come from that VM's disk there, not over the link", async () => {
    const { a, b, disksA } = await twoAgents();
    const [first, second] = [uniqueName('vb0'), uniqueName('vb1')];
    for (const [i, name] of [first, second].entries()) {
      writeTestvmBaseImage(join(disksA, `${name}.raw`), { sizeBytes: 64 * MiB, baseBlocks: 4096, imageSeed: 11n });
      await startVm(a, name, [`${name}.raw`], `gw.profile=zero gw.seed=${30 + i} gw.rate=64 gw.image_seed=11 gw.disk_base=4096 gw.disk_hot=64 gw.disk_rate=20`);
    }
    // The first goes ahead: at the destination it is content this peer sent (dedup.resident from-peer).
    expect((await migrate(a, [first, '--to', b.listen])).run.exitCode).toBe(0);
    const { run, result } = await migrate(a, [second, '--to', b.listen]);
    expect(run.exitCode, run.stderr + run.stdout).toBe(0);
    const summary = result.guests[0];
    expect(summary).toMatchObject({ verified: true, repairedPages: 0 });
    expect(summary.dedup.hits.resident).toBeGreaterThan(3000);
    expect(summary.disks[0].wireBytes).toBeLessThan(summary.disks[0].dataBytes * 0.15);
    // Blocks copied from the other VM's disk are the right ones: the kernel checks its base blocks.
    await kernelFindsNothingStale(b, second);
    await kernelFindsNothingStale(b, first);
  }, 180_000);

  it("a disk cloned from a base image in the destination's dedup.baseImages (no VM there uses it): its blocks come from that file, not over the link", async () => {
    cluster = new Cluster();
    const disksA = join(cluster.dir, 'disks-a');
    const disksB = join(cluster.dir, 'disks-b');
    const base = join(cluster.dir, 'base');
    for (const dir of [disksA, disksB, base]) mkdirSync(dir);
    disksOf.set('a', disksA).set('b', disksB);
    writeTestvmBaseImage(join(base, 'testvm-base.raw'), { sizeBytes: 64 * MiB, baseBlocks: 4096, imageSeed: 13n });
    const baseDigest = fileSha256(join(base, 'testvm-base.raw'));
    const a = await agentNamed('a');
    // dedup.resident none: only the base image is offered.
    const b = await agentNamed('b', { GANGWAY_DEDUP_BASE_IMAGES: base, GANGWAY_DEDUP_RESIDENT: 'none' });
    const name = uniqueName('vi');
    writeTestvmBaseImage(join(disksA, `${name}.raw`), { sizeBytes: 64 * MiB, baseBlocks: 4096, imageSeed: 13n });
    await startVm(a, name, [`${name}.raw`], 'gw.profile=zero gw.seed=41 gw.rate=64 gw.image_seed=13 gw.disk_base=4096 gw.disk_hot=64 gw.disk_rate=20');
    const { run, result } = await migrate(a, [name, '--to', b.listen]);
    expect(run.exitCode, run.stderr + run.stdout).toBe(0);
    const summary = result.guests[0];
    expect(summary).toMatchObject({ verified: true, repairedPages: 0 });
    expect(summary.dedup.hits.resident).toBeGreaterThan(3000);
    expect(summary.disks[0].wireBytes).toBeLessThan(summary.disks[0].dataBytes * 0.15);
    await kernelFindsNothingStale(b, name);
    // The base image is read, never written.
    expect(fileSha256(join(base, 'testvm-base.raw'))).toBe(baseDigest);
  }, 180_000);

  it('source killed right after the commit: restarted, it finds the VM running at the destination and removes its own copy of the disk too', async () => {
    const { a, b, disksA, disksB } = await twoAgents(false, { envA: { GANGWAY_FAULT_CRASH: 'source-after-commit' } });
    const name = uniqueName('vx');
    const file = `${name}.raw`;
    const digest = writeSparseDisk(join(disksA, file), 256 * MiB, 16, 8);
    await startVm(a, name, [file]);
    const sourcePid = (await guestOn(a, name))!.pid;
    const { run } = await migrate(a, [name, '--to', b.listen]);
    expect(run.exitCode).not.toBe(0); // the agent died under the CLI
    await waitForAsync('the destination to run the VM', async () => (await guestOn(b, name))?.vmStatus === 'running', 30_000);
    const again = await agentNamed('a');
    await waitForAsync('the source to drop its copy', async () => !(await guestOn(again, name)), 30_000);
    await waitForAsync('the source QEMU to quit', async () => !isAlive(sourcePid) || processState(sourcePid) === 'Z', 30_000);
    expect(existsSync(join(disksA, file))).toBe(false);
    expect(fileSha256(join(disksB, file))).toBe(digest);
  }, 180_000);

  it('destination killed right after a hybrid VM with a disk starts there by stop-and-copy: its drive is already its file, so its disk I/O goes on; restarted, the source drops its copy', async () => {
    // Before, the VM started on the agent's disk export and was switched to the file after: an
    // agent dying in between left it with a dead drive (its kernel saw I/O errors; chaos seed 7019).
    const { a, b, disksA, disksB } = await twoAgents(false, { envB: { GANGWAY_FAULT_CRASH: 'dest-after-go' } });
    const name = uniqueName('vh');
    const file = `${name}.raw`;
    writeTestvmBaseImage(join(disksA, file), { sizeBytes: 64 * MiB, baseBlocks: 2048, imageSeed: 5n });
    await startVm(a, name, [file], 'gw.profile=random gw.seed=4 gw.rate=256 gw.image_seed=5 gw.disk_base=2048 gw.disk_hot=256 gw.disk_rate=200');
    const { run } = await migrate(a, [name, '--to', b.listen, '--technique', 'hybrid']);
    expect(run.exitCode).not.toBe(0); // the destination died before it confirmed
    // Where the source will ask for it again.
    const again = await agentNamed('b', undefined, ['--listen', b.listen]);
    await waitForAsync('the destination to list the VM running', async () => (await guestOn(again, name))?.vmStatus === 'running', 30_000);
    await waitForAsync('the source to drop its copy', async () => !(await guestOn(a, name)), 60_000);
    // The kernel went on writing its disk through the agent's death: no I/O error, nothing stale.
    await kernelFindsNothingStale(again, name);
    expect(readFileSync(again.logPath, 'utf8')).toMatch(/the guest's disks are complete here: it starts on their files/);
    expect(existsSync(join(disksA, file))).toBe(false);
    expect(existsSync(join(disksB, file))).toBe(true);
  }, 180_000);

  it('--disks none on shared storage: only RAM and device state move, the VM runs on the same disk file', async () => {
    const { a, b, disksA } = await twoAgents(true);
    const name = uniqueName('vs');
    const file = `${name}.raw`;
    const digest = writeSparseDisk(join(disksA, file), 256 * MiB, 8, 2);
    await startVm(a, name, [file]);
    const { run, result } = await migrate(a, [name, '--to', b.listen, '--disks', 'none']);
    expect(run.exitCode, run.stderr + run.stdout).toBe(0);
    expect(result.guests[0]).toMatchObject({ verified: true });
    // 64 MiB of RAM at most: the disk's 8 MiB did not travel, and its file stayed.
    expect(result.guests[0].wireBytes).toBeLessThan(72 * MiB);
    expect(fileSha256(join(disksA, file))).toBe(digest);
    expect((await guestOn(b, name))!).toMatchObject({ state: 'running', vmStatus: 'running' });
  });

  /**
   * A disk whose boot sector (16-bit code the BIOS runs) prints GWBOOT on the serial port, then
   * a dot every few million loop turns, for ever; the rest seeded data a migration must keep.
   */
  function writeBootDisk(path: string, sizeBytes: number): void {
    // cli; ds = 0; si = message; dx = COM1; print it; then: bx = 0x200 turns of cx = 0xffff loops, '.', again.
    const code = Buffer.from([
      0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0xbe, 0x23, 0x7c, 0xba, 0xf8, 0x03, 0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8,
      0xbb, 0x00, 0x02, 0xb9, 0xff, 0xff, 0xe2, 0xfe, 0x4b, 0x75, 0xf8, 0xb0, 0x2e, 0xee, 0xeb, 0xf0,
    ]);
    const sector = Buffer.alloc(512);
    Buffer.concat([code, Buffer.from('GWBOOT\r\n\0')]).copy(sector);
    sector.writeUInt16LE(0xaa55, 510);
    const fd = openSync(path, 'wx', 0o600);
    try {
      ftruncateSync(fd, sizeBytes);
      writeSync(fd, sector, 0, 512, 0);
      for (let i = 0; i < 4; i++) writeSync(fd, seededBytes(MiB, 70 + i), 0, MiB, (1 + 3 * i) * MiB);
    } finally {
      closeSync(fd);
    }
  }

  /** Resolves once the VM's serial console on `agent` shows dots it printed there (it runs). */
  async function printsDots(agent: Agent, name: string): Promise<string> {
    const path = (await guestOn(agent, name))!.console!;
    let text = '';
    await waitForAsync(`VM ${name} to print on its console at ${agent.listen}`, async () => {
      text = existsSync(path) ? readFileSync(path, 'latin1') : '';
      return /\.{3}/.test(text);
    }, 60_000);
    return text;
  }

  it('a VM without a kernel boots from its first disk, and moves with it by pre-copy and by post-copy: it runs on at the destination, its disk byte for byte', async () => {
    const { a, b, disksA, disksB } = await twoAgents();
    const name = uniqueName('vo');
    const file = `${name}.raw`;
    writeBootDisk(join(disksA, file), 64 * MiB);
    const digest = fileSha256(join(disksA, file));
    const started = await cluster.cli(a, ['vm', 'start', name, '--memory', '64MiB', '--accel', 'tcg', '--disk', file, '--json']);
    expect(started.exitCode, started.stderr).toBe(0);
    expect(await printsDots(a, name)).toMatch(/^GWBOOT\r\n\./);
    expect((await cluster.cli(a, ['status'])).stdout).toMatch(/booted from its disk/);
    // Neither a kernel nor a disk to boot: refused, saying what to give.
    const neither = await cluster.cli(a, ['vm', 'start', uniqueName('vn'), '--memory', '64MiB', '--accel', 'tcg']);
    expect(neither.exitCode).not.toBe(0);
    expect(neither.stderr).toMatch(/pass --kernel FILE .* or --disk FILE with a boot sector/);
    for (const [from, to, technique, disks] of [[a, b, 'precopy', disksB], [b, a, 'postcopy', disksA]] as const) {
      const { run, result } = await migrate(from, [name, '--to', to.listen, '--technique', technique]);
      expect(run.exitCode, run.stderr + run.stdout).toBe(0);
      expect(result.guests[0]).toMatchObject({ verified: true, technique });
      // It goes on where it arrived: its console there fills with its dots.
      await printsDots(to, name);
      expect((await guestOn(to, name))!.vmStatus).toBe('running');
      expect(fileSha256(join(disks, file))).toBe(digest);
      expect(await guestOn(from, name)).toBeUndefined();
    }
  }, 180_000);

  it('refuses what it cannot do, saying why: a disk already at the destination, a disk outside the disks directory', async () => {
    const { a, b, disksA, disksB } = await twoAgents();
    const name = uniqueName('vr');
    const file = `${name}.raw`;
    writeSparseDisk(join(disksA, file), 64 * MiB, 1, 3);
    const outside = join(cluster.dir, 'outside.raw');
    writeSparseDisk(outside, 64 * MiB, 1, 4);
    const stray = await cluster.cli(a, ['vm', 'start', uniqueName('vx'), '--memory', '64MiB', '--kernel', TESTVM_KERNEL_FILE, '--accel', 'tcg', '--disk', outside]);
    expect(stray.exitCode).not.toBe(0);
    expect(stray.stderr).toMatch(/not a file of the disks directory/);
    await startVm(a, name, [file]);
    writeSparseDisk(join(disksB, file), 64 * MiB, 1, 5);
    const taken = await migrate(a, [name, '--to', b.listen]);
    expect(taken.run.exitCode).not.toBe(0);
    expect(taken.run.stderr + taken.run.stdout).toMatch(/already exists in this agent's disks directory/);
    // Neither attempt cost the VM anything: it runs here, its disk untouched.
    expect((await guestOn(a, name))!).toMatchObject({ state: 'running', vmStatus: 'running' });
    expect(existsSync(join(disksA, file))).toBe(true);
    // --technique auto takes pre-copy for a VM whose disks move.
    rmSync(join(disksB, file));
    const auto = await migrate(a, [name, '--to', b.listen, '--technique', 'auto']);
    expect(auto.run.exitCode, auto.run.stderr + auto.run.stdout).toBe(0);
    expect(auto.result.guests[0]).toMatchObject({ verified: true, technique: 'precopy' });
  });
});
