// gangway-testvm booted straight in QEMU (TCG, q35, its RAM a /dev/shm file), without
// agents: for the tests of the kernel itself. Each VM is killed by its PID and its files
// removed by stopTestvms(), which a test file calls in afterEach (also when a test failed:
// then it prints the kernel's serial log).
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readTestvmStatus, type TestvmStatus } from '../../agent/guest/testvm-status.js';
import { testvmKernelPath } from '../../agent/native.js';

export const QEMU = 'qemu-system-x86_64';
export const TESTVM_MEMORY_MIB = 64;

export interface Vm {
  child: ChildProcess;
  pid: number;
  memPath: string;
  logPath: string;
  qmpPath: string;
  exitCode: number | null | undefined;
  stderr: string;
  exited: Promise<void>;
}

const vms: Vm[] = [];

/** Starts QEMU on the kernel with `append` as its parameters, a QMP socket, and `extraArgs` (a disk). */
export function bootTestvm(append: string, extraArgs: readonly string[] = []): Vm {
  const name = `gangway-testvm-${process.pid}-${randomBytes(6).toString('hex')}`;
  const memPath = `/dev/shm/${name}`;
  const logPath = join(tmpdir(), `${name}.log`);
  const qmpPath = join(tmpdir(), `${name}.qmp`);
  const args = [
    '-accel', 'tcg',
    '-machine', 'q35,memory-backend=mem0',
    '-m', String(TESTVM_MEMORY_MIB),
    '-object', `memory-backend-file,id=mem0,size=${TESTVM_MEMORY_MIB}M,mem-path=${memPath},share=on`,
    '-nodefaults',
    '-display', 'none',
    '-no-reboot',
    '-serial', `file:${logPath}`,
    '-qmp', `unix:${qmpPath},server=on,wait=off`,
    ...extraArgs,
    '-kernel', testvmKernelPath,
    '-append', append,
  ];
  const child = spawn(QEMU, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  if (child.pid === undefined) throw new Error(`${QEMU} did not start`);
  const vm: Vm = {
    child,
    pid: child.pid,
    memPath,
    logPath,
    qmpPath,
    exitCode: undefined,
    stderr: '',
    exited: new Promise((resolve) => child.once('exit', () => resolve())),
  };
  child.stderr?.setEncoding('utf8').on('data', (chunk: string) => (vm.stderr += chunk));
  child.once('exit', (code) => (vm.exitCode = code));
  vms.push(vm);
  return vm;
}

export function serialLog(vm: Vm): string {
  try {
    return readFileSync(vm.logPath, 'utf8');
  } catch {
    return '';
  }
}

export function status(vm: Vm): TestvmStatus {
  return readTestvmStatus(vm.memPath);
}

/** Kills every VM booted so far (by its PID: only the QEMUs these tests started) and removes its files. */
export async function stopTestvms(failed: boolean): Promise<void> {
  for (const vm of vms.splice(0)) {
    if (failed) console.log(`serial log of ${vm.memPath}:\n${serialLog(vm)}${vm.stderr}`);
    if (vm.exitCode === undefined) {
      vm.child.kill('SIGKILL');
      await vm.exited;
    }
    for (const path of [vm.memPath, vm.logPath, vm.qmpPath]) rmSync(path, { force: true });
  }
}
