// The process guest adapter against a real gangway-guest: a pause asked for with SIGUSR1
// that the guest takes only after pause() gave up must not leave it stopped for good once
// the migration resumed it (nobody would continue it).
import { randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import { existsSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { readGuestHeader } from '../../agent/guest/guest-header.js';
import { launchProcessGuest, processAlive, processState, ProcessGuest, removeGuestFiles, runningAt, statSaysAlive, type GuestFiles } from '../../agent/guest/process-guest.js';
import { guestBinaryPath } from '../../agent/native.js';
import { waitFor } from '../helpers/wait.js';

const MiB = 1024 * 1024;

describe.skipIf(!existsSync(guestBinaryPath))('process guest adapter', () => {
  const cleanups: (() => void)[] = [];
  afterEach(() => {
    for (const cleanup of cleanups.splice(0)) cleanup();
  });

  async function started(): Promise<{ guest: ProcessGuest; files: GuestFiles }> {
    const id = randomBytes(6).toString('hex');
    const files: GuestFiles = {
      memoryPaths: [`/dev/shm/gangway-test-pg-${id}`, `/dev/shm/gangway-test-pg-${id}.r1`],
      deviceStatePath: join(tmpdir(), `gangway-test-pg-${id}.dev`),
      trackReportPath: join(tmpdir(), `gangway-test-pg-${id}.track`),
      logPath: join(tmpdir(), `gangway-test-pg-${id}.log`),
    };
    cleanups.push(() => {
      removeGuestFiles(files);
      rmSync(files.logPath, { force: true });
    });
    const launched = launchProcessGuest({
      name: 'regions',
      files,
      create: { memoryBytes: 2 * MiB, regionBytes: [MiB, MiB], profile: 'random', dirtyRateBytesPerSec: 4 * MiB, seed: 1, imageSeed: 0, sharedFraction: 0, hotFraction: 0.5 },
    });
    cleanups.push(() => {
      try {
        process.kill(launched.pid, 'SIGKILL');
      } catch {}
    });
    await launched.running;
    return { guest: new ProcessGuest('pg', launched.pid, 2 * MiB, files, [MiB, MiB]), files };
  }

  it('pauses with its device state saved, and resumes', async () => {
    const { guest, files } = await started();
    await guest.pause();
    expect(processState(guest.pid)).toBe('T');
    expect((await guest.saveDeviceState()).length).toBe(48);
    expect(existsSync(files.deviceStatePath!)).toBe(false); // taken, so a later pause is never served a stale one
    guest.resume();
    const writes = readGuestHeader(files.memoryPaths[0]!).totalWrites;
    await waitFor('writes to go on', () => readGuestHeader(files.memoryPaths[0]!).totalWrites > writes || undefined);
  });

  it('a pause the guest takes after pause() gave up is undone by the resume that followed', async () => {
    const { guest, files } = await started();
    // pause() gives up at its first look (a deadline already past), with the SIGUSR1 out.
    // The guest is often quicker than that look: then it paused, and the test tries again.
    let gaveUp: Error | undefined;
    for (let attempt = 0; attempt < 40 && !gaveUp; attempt++) {
      gaveUp = await guest.pause(-1).then(
        () => {
          guest.resume();
          return undefined;
        },
        (err: Error) => err,
      );
      if (!gaveUp) await sleep(20);
    }
    expect(gaveUp?.message).toMatch(/did not stop within -1 ms/);
    guest.resume();
    // The guest takes the pause late and stops itself after the resume's SIGCONT. Whether it
    // already did is a race: a stop here stands for it (the same state, 'T').
    process.kill(guest.pid, 'SIGSTOP');
    await sleep(300);
    expect(processState(guest.pid)).not.toBe('T');
    const writes = readGuestHeader(files.memoryPaths[0]!).totalWrites;
    await waitFor('writes to go on', () => readGuestHeader(files.memoryPaths[0]!).totalWrites > writes || undefined);
  });
});

describe('runningAt', () => {
  it("puts the guest's CLOCK_MONOTONIC reading on performance.now()'s clock, never later than now", () => {
    const fiveMsAgo = process.hrtime.bigint() - 5_000_000n;
    const at = runningAt(fiveMsAgo);
    const now = performance.now();
    expect(now - at).toBeGreaterThanOrEqual(5);
    expect(now - at).toBeLessThan(50);
    expect(runningAt(process.hrtime.bigint() + 1_000_000_000n)).toBeLessThanOrEqual(performance.now());
  });
});

describe('processAlive', () => {
  const stat = (state: string, flags: number) => `4242 (qemu-system-x86) ${state} 1 4242 4242 0 -1 ${flags} 100 0 0 0`;

  it('reads the state and the PF_EXITING flag of a stat line', () => {
    expect(statSaysAlive(stat('S', 0x400000))).toBe(true);
    expect(statSaysAlive(stat('T', 0))).toBe(true);
    expect(statSaysAlive(stat('R', 0x400004))).toBe(false);
    expect(statSaysAlive(stat('Z', 0))).toBe(false);
    expect(statSaysAlive(stat('X', 0))).toBe(false);
    // A name with spaces and parentheses: the fields count from the last ')'.
    expect(statSaysAlive('7 (a) b (c)) S 1 7 7 0 -1 4194560 1')).toBe(true);
  });

  it('a running process is alive; killed, it is not, before its parent reaps it as after', async () => {
    const child = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1000)'], { stdio: 'ignore' });
    const exited = new Promise((resolve) => child.once('exit', resolve));
    await waitFor('the child to run', () => processState(child.pid!) === 'S', 10_000);
    expect(processAlive(child.pid!)).toBe(true);
    process.kill(child.pid!, 'SIGKILL');
    // Synchronous: the event loop that would reap the child does not run meanwhile.
    const deadline = performance.now() + 5_000;
    while (processAlive(child.pid!) && performance.now() < deadline);
    expect(['Z', 'R', 'D']).toContain(processState(child.pid!));
    expect(processAlive(child.pid!)).toBe(false);
    await exited;
    expect(processAlive(child.pid!)).toBe(false);
  });
});
