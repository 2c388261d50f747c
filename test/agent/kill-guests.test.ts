// A test's clean-up of an agent's guests when the agent no longer answers (a test killed it):
// its state directory's records say which guests were its own, and a recorded pid is stopped
// only while its command line names that guest's files.
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { once } from 'node:events';
import { afterEach, describe, expect, it } from 'vitest';
import { killGuestsOf, type LocalAgent } from '../../agent/local-agent.js';

describe('killGuestsOf an agent that does not answer', () => {
  const cleanups: (() => void)[] = [];
  afterEach(() => {
    for (const cleanup of cleanups.splice(0)) cleanup();
  });

  it("stops the recorded guests whose command line names their files, removes their memory files, and leaves a pid that is now another process's", async () => {
    const stateDir = mkdtempSync(join(tmpdir(), 'gangway-killguests-'));
    cleanups.push(() => rmSync(stateDir, { recursive: true, force: true }));
    mkdirSync(join(stateDir, 'guests'));
    const memoryPath = join(stateDir, 'gangway-g1-00000000.mem');
    writeFileSync(memoryPath, '');
    // A "guest": a process whose arguments name its memory file, as QEMU's and gangway-guest's do.
    const guest = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 60000)', memoryPath], { stdio: 'ignore' });
    cleanups.push(() => guest.kill('SIGKILL'));
    const exited = once(guest, 'exit');
    const record = (name: string, pid: number, path: string) =>
      writeFileSync(join(stateDir, 'guests', `${name}.json`), JSON.stringify({ name, pid, files: { memoryPaths: [path], logPath: join(stateDir, `${name}.log`) } }));
    record('g1', guest.pid!, memoryPath);
    // A record whose pid is this test's own process: its command line names no guest file.
    record('g2', process.pid, join(stateDir, 'gangway-g2-00000000.mem'));
    const agent = { stateDir, status: () => Promise.reject(new Error('the agent is gone')) } as unknown as LocalAgent;
    await killGuestsOf(agent);
    const [code, signal] = await exited;
    expect({ code, signal }).toEqual({ code: null, signal: 'SIGKILL' });
    expect(existsSync(memoryPath)).toBe(false);
  });
});
