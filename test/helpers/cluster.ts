// Real agent processes for integration tests: each on loopback with its own state dir, all
// stopped (by PID) and their guests and files removed after the test, also when it fails.
import { existsSync, readdirSync, rmSync } from 'node:fs';
import { resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import { killGuestsOf, makeTempDir, startLocalAgent, type LocalAgent, type LocalAgentOptions } from '../../agent/local-agent.js';

export const repoRoot = resolve(import.meta.dirname, '..', '..');
export const mainJs = resolve(repoRoot, 'dist', 'agent', 'main.js');
export const builtAgent = existsSync(mainJs);

export class Cluster {
  readonly dir = makeTempDir('gangway-test-');
  readonly agents: LocalAgent[] = [];

  async agent(name: string, args: string[] = [], env?: NodeJS.ProcessEnv, tls?: LocalAgentOptions['tls']): Promise<LocalAgent> {
    const agent = await startLocalAgent({ stateDir: `${this.dir}/${name}`, mainPath: mainJs, args, ...(env ? { env } : {}), ...(tls ? { tls } : {}) });
    this.agents.push(agent);
    return agent;
  }

  /** Runs the CLI against an agent; never throws on a non-zero exit. */
  cli(agent: LocalAgent, args: string[], timeoutMs = 120_000) {
    return execa(process.execPath, [mainJs, ...args, '--state-dir', agent.stateDir], { reject: false, timeout: timeoutMs });
  }

  async cleanup(): Promise<void> {
    try {
      // Bounded: an agent that does not answer must not keep the others (and their guests) alive.
      for (const agent of this.agents) await Promise.race([killGuestsOf(agent).catch(() => {}), sleep(10_000)]);
    } finally {
      await Promise.all(this.agents.map((agent) => agent.kill()));
      rmSync(this.dir, { recursive: true, force: true });
    }
  }
}

/** Guest memory files in /dev/shm whose name mentions `guest`. */
export function shmFilesOf(guest: string): string[] {
  return readdirSync('/dev/shm').filter((file) => file.startsWith(`gangway-${guest}-`));
}

export function uniqueName(prefix: string): string {
  return `${prefix}-${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
}
