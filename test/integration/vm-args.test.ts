// The argument vector qemuArgs builds, run by QEMU 7.2 itself: the test kernel boots on one
// memory region or on two NUMA nodes, writes its status block into the first region's file,
// and answers QMP on the socket the arguments name; an incoming QEMU waits, paused.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { QmpClient } from '../../agent/guest/qmp.js';
import { readTestvmStatus } from '../../agent/guest/testvm-status.js';
import { qemuArgs, type VmDefinition } from '../../agent/guest/vm-spec.js';
import { testvmKernelPath } from '../../agent/native.js';
import { waitFor, waitForAsync } from '../helpers/wait.js';

const kernel = testvmKernelPath;
const qemuThere = spawnSync('qemu-system-x86_64', ['--version']).status === 0;
const skip = !qemuThere ? 'qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)' : !existsSync(kernel) ? `the test kernel is not built (${kernel}): node native/build.mjs` : undefined;
const MiB = 2 ** 20;
const definition: VmDefinition = { machine: 'q35', cpus: 1, accel: 'tcg', kernel: 'gangway-testvm.elf', append: 'gw.profile=random gw.rate=2048 gw.hot=100' };

describe.skipIf(skip)(skip ? `QEMU runs qemuArgs (skipped: ${skip})` : 'QEMU runs qemuArgs', () => {
  const started: { child: ChildProcess; paths: string[] }[] = [];
  afterEach(async () => {
    for (const { child, paths } of started.splice(0)) {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGKILL');
        await new Promise((resolve) => child.once('exit', resolve));
      }
      for (const path of paths) rmSync(path, { force: true });
    }
  });

  function launch(regions: number[], incoming: boolean) {
    const tag = `gangway-vmargs-${process.pid}-${randomBytes(4).toString('hex')}`;
    const files = { memoryPaths: regions.map((_, i) => `/dev/shm/${tag}.${i}`), qmpSocket: join(tmpdir(), `${tag}.qmp`), serialLog: join(tmpdir(), `${tag}.serial`) };
    const args = qemuArgs('vmargs', definition, regions, files, dirname(kernel), incoming);
    const child = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    started.push({ child, paths: [...files.memoryPaths, files.qmpSocket, files.serialLog] });
    return { files, child, stderr: () => stderr };
  }

  async function qmpOf(vm: ReturnType<typeof launch>): Promise<QmpClient> {
    await waitFor('the QMP socket', () => existsSync(vm.files.qmpSocket) || (vm.child.exitCode !== null ? (() => { throw new Error(`QEMU exited: ${vm.stderr()}`); })() : undefined));
    return QmpClient.connect(vm.files.qmpSocket);
  }

  for (const regions of [[64 * MiB], [48 * MiB, 16 * MiB]]) {
    it(`boots the test kernel on ${regions.length} region(s) and is driven over QMP`, async () => {
      const vm = launch(regions, false);
      const qmp = await qmpOf(vm);
      try {
        expect((await qmp.queryStatus()).status).toBe('running');
        regions.forEach((bytes, i) => expect(statSync(vm.files.memoryPaths[i]!).size).toBe(bytes));
        const running = await waitForAsync('the kernel to run and write', async () => {
          if (!existsSync(vm.files.serialLog) || !readFileSync(vm.files.serialLog, 'utf8').includes('ready')) return undefined; // the block exists from then on
          const status = readTestvmStatus(vm.files.memoryPaths[0]!);
          return status.state === 'running' && status.pagesWritten > 50 ? status : undefined;
        }, 15_000);
        expect(running.stalePages).toBe(0);
        await qmp.stop();
        expect((await qmp.queryStatus()).status).toBe('paused');
        const frozen = readTestvmStatus(vm.files.memoryPaths[0]!).pagesWritten;
        await new Promise((resolve) => setTimeout(resolve, 300));
        expect(readTestvmStatus(vm.files.memoryPaths[0]!).pagesWritten).toBe(frozen);
        await qmp.cont();
        await waitFor('writes to go on', () => readTestvmStatus(vm.files.memoryPaths[0]!).pagesWritten > frozen || undefined, 10_000);
        await qmp.quit();
      } finally {
        await qmp.close();
      }
    });
  }

  it('an incoming QEMU waits paused for its state (-S -incoming defer)', async () => {
    const vm = launch([64 * MiB], true);
    const qmp = await qmpOf(vm);
    try {
      expect((await qmp.queryStatus()).status).toBe('inmigrate');
      await qmp.quit();
    } finally {
      await qmp.close();
    }
  });
});
