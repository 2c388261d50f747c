// The QMP client against a real QEMU: qemu-system-x86_64 with TCG, 64 MiB and no devices,
// started with -S so no guest is needed (after `cont` its vCPUs run the firmware, which finds
// nothing to boot and waits). Each test starts its own QEMU; afterEach kills every QEMU
// started here by its PID and removes its socket, also when the test failed.
// Skips, saying why, when qemu-system-x86_64 is not installed.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import { afterEach, describe, expect, it } from 'vitest';
import { ErrorCode, type GangwayError } from '../../protocol/errors.js';
import { QmpClient, QmpCommandError, QmpConnectionError, type QmpEvent } from '../../agent/guest/qmp.js';

const QEMU = 'qemu-system-x86_64';
const TEST_TIMEOUT_MS = 15_000;

async function qemuMissing(): Promise<string | undefined> {
  const version = await execa(QEMU, ['--version'], { reject: false, timeout: 10_000, stdin: 'ignore' });
  return version.failed ? `${QEMU} is not usable: ${(version.shortMessage ?? 'failed').split('\n')[0]}` : undefined;
}

const skipReason = await qemuMissing();

interface Qemu {
  child: ChildProcess;
  pid: number;
  socketPath: string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stderr: () => string;
}

const started: Qemu[] = [];
const clients: QmpClient[] = [];
const dirs: string[] = [];

function startQemu(): Qemu {
  const dir = mkdtempSync(join(tmpdir(), 'gangway-qmp-'));
  dirs.push(dir);
  const socketPath = join(dir, 'qmp.sock');
  const child = spawn(
    QEMU,
    ['-accel', 'tcg', '-machine', 'q35', '-m', '64', '-nodefaults', '-display', 'none', '-serial', 'none', '-S', '-qmp', `unix:${socketPath},server=on,wait=off`],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  if (child.pid === undefined) throw new Error(`${QEMU} did not start`);
  const qemu = { child, pid: child.pid, socketPath, exited, stderr: () => stderr };
  started.push(qemu);
  return qemu;
}

/** Connects once QEMU has created its socket (it does so within a few hundred ms of starting). */
async function connect(qemu: Qemu): Promise<QmpClient> {
  const deadline = performance.now() + 5_000;
  for (;;) {
    try {
      const client = await QmpClient.connect(qemu.socketPath, { connectTimeoutMs: 2_000 });
      clients.push(client);
      return client;
    } catch (err) {
      if (qemu.child.exitCode !== null || performance.now() > deadline) {
        throw new Error(`could not connect to ${QEMU} (pid ${qemu.pid}): ${(err as Error).message}; its stderr: ${qemu.stderr()}`);
      }
      await sleep(20);
    }
  }
}

async function startAndConnect(): Promise<{ qemu: Qemu; client: QmpClient }> {
  const qemu = startQemu();
  return { qemu, client: await connect(qemu) };
}

function isRunning(qemu: Qemu): boolean {
  return qemu.child.exitCode === null && qemu.child.signalCode === null;
}

async function rejection(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected a rejection');
}

afterEach(async () => {
  for (const client of clients.splice(0)) await client.close();
  for (const qemu of started.splice(0)) {
    if (isRunning(qemu)) {
      // SIGKILL also ends a QEMU a test left stopped with SIGSTOP.
      process.kill(qemu.pid, 'SIGKILL');
    }
    await qemu.exited;
  }
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

describe.skipIf(skipReason !== undefined)(`QMP with a real QEMU${skipReason ? ` (skipped: ${skipReason})` : ''}`, () => {
  it('greets with its version, which query-version confirms', async () => {
    const { client } = await startAndConnect();
    expect(client.version.qemu.major).toBeGreaterThanOrEqual(7);
    expect(client.greeting.capabilities).toContain('oob');
    expect(await client.exec('query-version')).toEqual(client.version);
  }, TEST_TIMEOUT_MS);

  it('query-status follows cont and stop, with RESUME and STOP seen', async () => {
    const { client } = await startAndConnect();
    const seen: QmpEvent[] = [];
    client.on('event', (event) => seen.push(event));
    const before = await client.queryStatus();
    expect(['prelaunch', 'paused']).toContain(before.status);
    expect(before.running).toBe(false);

    const beforeCont = client.eventMark();
    await client.cont();
    expect(await client.queryStatus()).toMatchObject({ status: 'running', running: true });
    // QEMU sends RESUME before it answers cont: the mark taken before finds it.
    expect(await client.waitForEvent('RESUME', { since: beforeCont, timeoutMs: 2_000 })).toMatchObject({ event: 'RESUME', data: {} });

    const beforeStop = client.eventMark();
    await client.stop();
    expect(await client.queryStatus()).toMatchObject({ status: 'paused', running: false });
    const stopped = await client.waitForEvent('STOP', { since: beforeStop, timeoutMs: 2_000 });
    expect(stopped.seq).toBeGreaterThan(beforeCont);
    expect(seen.map((e) => e.event)).toEqual(['RESUME', 'STOP']);
  }, TEST_TIMEOUT_MS);

  it('a QMP error keeps its class and desc, and the connection goes on', async () => {
    const { client } = await startAndConnect();
    const notFound = await rejection(client.exec('no-such-command'));
    expect(notFound).toBeInstanceOf(QmpCommandError);
    expect(notFound).toMatchObject({ code: ErrorCode.QMP_COMMAND, command: 'no-such-command', errorClass: 'CommandNotFound' });
    expect((notFound as QmpCommandError).desc).toMatch(/no-such-command/);
    expect(notFound.message).toContain(client.socketPath);

    // A QEMU started without -incoming refuses migrate-incoming.
    const generic = await rejection(client.migrateIncoming('tcp:127.0.0.1:0'));
    expect(generic).toMatchObject({ errorClass: 'GenericError', command: 'migrate-incoming' });
    expect((generic as QmpCommandError).desc).toMatch(/-incoming/);

    expect((await client.queryStatus()).running).toBe(false);
  }, TEST_TIMEOUT_MS);

  it('a command QEMU does not answer in time times out; the connection stays usable and drops the late answer', async () => {
    const { qemu, client } = await startAndConnect();
    process.kill(qemu.pid, 'SIGSTOP');
    let error: Error;
    try {
      error = await rejection(client.queryStatus({ timeoutMs: 300 }));
    } finally {
      process.kill(qemu.pid, 'SIGCONT');
    }
    expect(error).toMatchObject({ code: ErrorCode.TIMEOUT });
    expect(error.message).toMatch(/did not answer `query-status` \(id \d+\) within 300 ms; it may still run it/);
    // QEMU answers the abandoned query first; the next command must get its own answer.
    expect(await client.exec('query-version')).toEqual(client.version);
    expect(await client.queryMigrate()).toEqual({});
    expect(client.isOpen).toBe(true);
  }, TEST_TIMEOUT_MS);

  it('concurrent commands get their own answers', async () => {
    const { client } = await startAndConnect();
    const rounds = 20;
    const results = await Promise.allSettled(
      Array.from({ length: rounds }, () => [client.queryStatus(), client.exec('query-version'), client.queryMigrate(), client.exec('no-such-command')]).flat(),
    );
    for (let i = 0; i < rounds; i++) {
      const [status, version, migrate, refused] = results.slice(i * 4, i * 4 + 4);
      expect(status).toMatchObject({ status: 'fulfilled', value: { running: false } });
      expect(version).toEqual({ status: 'fulfilled', value: client.version });
      expect(migrate).toEqual({ status: 'fulfilled', value: {} });
      expect(refused).toMatchObject({ status: 'rejected', reason: { errorClass: 'CommandNotFound' } });
    }
  }, TEST_TIMEOUT_MS);

  it('QEMU killed rejects the pending commands with an error naming the socket and each command', async () => {
    const { qemu, client } = await startAndConnect();
    const closed: GangwayError[] = [];
    client.on('close', (reason) => closed.push(reason));
    // Stopped, QEMU reads nothing: the commands are still pending when it is killed.
    process.kill(qemu.pid, 'SIGSTOP');
    // Caught now: they are rejected while the test still waits for QEMU's exit.
    const status = rejection(client.queryStatus());
    const stop = rejection(client.stop());
    const resumed = rejection(client.waitForEvent('RESUME', { timeoutMs: 10_000 }));
    await sleep(100);
    process.kill(qemu.pid, 'SIGKILL');
    expect((await qemu.exited).signal).toBe('SIGKILL');

    const [e1, e2, e3] = await Promise.all([status, stop, resumed]);
    for (const error of [e1, e2, e3]) {
      expect(error).toBeInstanceOf(QmpConnectionError);
      expect(error.message).toContain(qemu.socketPath);
    }
    expect(e1.message).toMatch(/^`query-status` \(id \d+\) got no answer, so it may or may not have run: the QMP connection to .* ended: QEMU (closed|reset) it/);
    expect(e2.message).toMatch(/^`stop` \(id \d+\) got no answer/);
    expect(e3.message).toMatch(/^no event RESUME came: /);
    expect(closed).toHaveLength(1);
    expect(closed[0]!.message).toMatch(/with `query-status` \(id \d+\), `stop` \(id \d+\) unanswered$/);
    expect((await rejection(client.queryStatus())).message).toMatch(/^`query-status` was not sent: /);
  }, TEST_TIMEOUT_MS);

  // A newline after `quit` that QEMU had not read when it exited made the kernel reset the connection.
  it('quit ends QEMU with a clean close, not a reset, and the client sees SHUTDOWN and the close', async () => {
    const { qemu, client } = await startAndConnect();
    const mark = client.eventMark();
    await client.quit();
    expect(client.isOpen).toBe(false);
    expect((await client.closed).message).toBe(`the QMP connection to ${qemu.socketPath} ended: QEMU closed it after \`quit\``);
    expect(await client.waitForEvent('SHUTDOWN', { since: mark, timeoutMs: 1_000 })).toMatchObject({ data: { guest: false, reason: 'host-qmp-quit' } });
    expect(await qemu.exited).toEqual({ code: 0, signal: null });
  }, TEST_TIMEOUT_MS);

  it('a second client is not greeted while the first holds the monitor, and is once it left', async () => {
    const { qemu, client } = await startAndConnect();
    const error = await rejection(QmpClient.connect(qemu.socketPath, { connectTimeoutMs: 300 }));
    expect(error).toMatchObject({ code: ErrorCode.TIMEOUT });
    expect(error.message).toMatch(/no QMP greeting \(is another client connected\? QEMU serves one at a time\)/);
    await client.close();
    const second = await QmpClient.connect(qemu.socketPath, { connectTimeoutMs: 2_000 });
    clients.push(second);
    expect((await second.queryStatus()).running).toBe(false);
  }, TEST_TIMEOUT_MS);

  it('a socket nobody listens on fails at once, naming it', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'gangway-qmp-'));
    dirs.push(dir);
    const error = await rejection(QmpClient.connect(join(dir, 'none.sock')));
    expect(error).toBeInstanceOf(QmpConnectionError);
    expect(error.message).toMatch(/^cannot connect to the QMP socket .*none\.sock: connect ENOENT/);
  }, TEST_TIMEOUT_MS);
});
