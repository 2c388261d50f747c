// What the switchover's check rests on for a QEMU VM: the destination's digest is over the
// fingerprints of the pages as its agent wrote them, so nothing else may write that RAM
// before the guest runs. A real QEMU, as gangway starts one (qemuArgs), is stopped and its
// device state saved with x-ignore-shared; its RAM file is copied; a standby QEMU started on
// the copy (-S -incoming defer) loads the device state; the copy must still equal the
// source's RAM byte for byte, and the standby must then run; a state it refuses fails the
// load with QEMU's reason. QEMU runs under TCG, booting
// gangway-testvm, which writes its pages. Every QEMU started here is killed by its PID.
import { spawn, type ChildProcess } from 'node:child_process';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { armQemuIncoming, loadQemuDeviceState, prepareQemuDeviceStateSave, qemuMissing, saveQemuDeviceState } from '../../agent/guest/qemu-guest.js';
import { QmpClient } from '../../agent/guest/qmp.js';
import { qemuArgs, VM_MACHINES, type VmDefinition } from '../../agent/guest/vm-spec.js';
import { testvmDir, testvmMissing, TESTVM_KERNEL_FILE } from '../../agent/native.js';
import { waitForAsync } from '../helpers/wait.js';

const MiB = 1024 * 1024;
const RAM_BYTES = 64 * MiB;
const skip = qemuMissing() ?? testvmMissing();
if (skip) console.warn(`qemu standby RAM tests skipped: ${skip}`);

const started: ChildProcess[] = [];
const clients: QmpClient[] = [];
const dirs: string[] = [];

afterEach(async () => {
  for (const client of clients.splice(0)) await client.close().catch(() => {});
  for (const child of started.splice(0)) {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL');
      await new Promise((resolve) => child.once('exit', resolve));
    }
  }
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

function startQemu(dir: string, role: string, machine: VmDefinition['machine'], ramPath: string, incoming: boolean): { child: ChildProcess; qmpSocket: string; serialLog: string } {
  const qmpSocket = join(dir, `${role}.qmp`);
  const serialLog = join(dir, `${role}.serial`);
  writeFileSync(serialLog, '');
  const definition = { machine, cpus: 1, accel: 'tcg', kernel: TESTVM_KERNEL_FILE, append: 'gw.profile=random gw.seed=5 gw.rate=4096' } as VmDefinition;
  const args = qemuArgs(`qs-${role}`, definition, [RAM_BYTES], { memoryPaths: [ramPath], qmpSocket, serialLog }, testvmDir, incoming);
  const child = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  started.push(child);
  child.stderr!.resume();
  return { child, qmpSocket, serialLog };
}

async function connect(qmpSocket: string, child: ChildProcess): Promise<QmpClient> {
  const client = await waitForAsync(
    `QEMU's QMP socket ${qmpSocket}`,
    async () => {
      if (child.exitCode !== null) throw new Error(`QEMU exited with code ${child.exitCode}`);
      return QmpClient.connect(qmpSocket, { connectTimeoutMs: 1_000 }).catch(() => undefined);
    },
    10_000,
  );
  clients.push(client);
  return client;
}

describe.skipIf(skip !== undefined)('a standby QEMU writes none of the RAM gangway brings it', () => {
  for (const machine of VM_MACHINES) {
    it(`${machine}: its start (-incoming defer) and its device-state load leave the arriving RAM as written`, async () => {
      const dir = mkdtempSync(join(tmpdir(), 'gangway-standby-'));
      dirs.push(dir);
      const sourceRam = join(dir, 'source.ram');
      const destinationRam = join(dir, 'destination.ram');
      writeFileSync(sourceRam, '');
      truncateSync(sourceRam, RAM_BYTES);

      const source = startQemu(dir, 'source', machine, sourceRam, false);
      const sourceQmp = await connect(source.qmpSocket, source.child);
      // Until the kernel has set up and rewrites its pages.
      await waitForAsync('the test kernel to report its writes', async () => /writes=[1-9]/.test(readFileSync(source.serialLog, 'utf8')), 60_000);
      await sourceQmp.stop();
      await prepareQemuDeviceStateSave(sourceQmp);
      const state = await saveQemuDeviceState(sourceQmp, join(dir, 'save.sock'));
      expect(state.length).toBeGreaterThan(1000);
      const ram = readFileSync(sourceRam);
      expect(ram.some((byte) => byte !== 0)).toBe(true);

      // The destination's RAM holds every page the source's does, as gangway's rounds leave it.
      copyFileSync(sourceRam, destinationRam);
      const standby = startQemu(dir, 'destination', machine, destinationRam, true);
      const standbyQmp = await connect(standby.qmpSocket, standby.child);
      // Its start-up is over once QMP answers; then the device state goes in.
      expect((await standbyQmp.queryStatus()).status).toBe('inmigrate');
      const info = await loadQemuDeviceState(standbyQmp, await armQemuIncoming(standbyQmp, join(dir, 'load.sock')), state);
      expect(info.status).toBe('completed');

      const after = readFileSync(destinationRam);
      let differing = 0;
      for (let page = 0; page < RAM_BYTES; page += 4096) if (after.compare(ram, page, page + 4096, page, page + 4096) !== 0) differing++;
      expect(differing).toBe(0);

      // And it was a real load: the standby runs the guest on from there.
      await standbyQmp.cont();
      await sleep(200);
      expect((await standbyQmp.queryStatus()).status).toBe('running');

      // A state QEMU refuses: its MIGRATION event says so, and the error carries QEMU's reason.
      const refusing = startQemu(dir, 'refusing', machine, destinationRam, true);
      const refusingQmp = await connect(refusing.qmpSocket, refusing.child);
      const armed = await armQemuIncoming(refusingQmp, join(dir, 'refuse.sock'));
      const broken = Buffer.from(state);
      broken.fill(0xee, 64, 4096);
      await expect(loadQemuDeviceState(refusingQmp, armed, broken)).rejects.toThrow(/QEMU's device-state load failed/);
    });
  }
});
