// Starts a gangway agent as a child process on loopback with its own state dir: used by the
// demo, the integration tests and the benchmarks, which all need real agent processes.
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { ControlClient } from './control/client.js';
import type { Agent } from './daemon.js';
import { fingerprintsPathOf } from './guest/process-guest.js';
import { AGENT_NODE_FLAGS } from './node-flags.js';

export type AgentStatus = Awaited<ReturnType<Agent['status']>>;

export interface LocalAgent {
  pid: number;
  stateDir: string;
  listen: string;
  client: ControlClient;
  logPath: string;
  process: ChildProcess;
  status(): Promise<AgentStatus>;
  /** SIGTERM, then SIGKILL after `timeoutMs`. */
  stop(timeoutMs?: number): Promise<void>;
  /** SIGKILL at once (a crash). */
  kill(): Promise<void>;
}

const mainJs = resolve(dirname(fileURLToPath(import.meta.url)), 'main.js');

export function makeTempDir(prefix: string): string {
  return mkdtempSync(join(tmpdir(), prefix));
}

export interface LocalAgentOptions {
  stateDir: string;
  /** Extra `gangway agent` flags. */
  args?: string[];
  env?: NodeJS.ProcessEnv;
  /** Flags for node itself (e.g. --cpu-prof when profiling). */
  nodeArgs?: string[];
  /** The compiled main.js, when this module runs from source (tests). */
  mainPath?: string;
  /**
   * A command prefix the agent runs under, e.g. `['ip', 'netns', 'exec', 'gw-x-a']`. It must
   * exec the agent in place (as `ip netns exec` does), so that `pid`, stop() and kill() reach
   * the agent itself.
   */
  wrap?: string[];
  /** HOST:PORT for `--listen`; default 127.0.0.1:0. */
  listen?: string;
  /**
   * Mutual TLS (absolute paths, allow entries as in tls.allow). Without it the agent runs
   * with --insecure-plaintext-loopback, which it accepts only on a loopback `listen`.
   */
  tls?: { cert: string; key: string; ca: string; allow: string[] };
}

/** The `gangway agent` flags for a peer transport: TLS settings, or plain ws on loopback. */
export function transportArgs(tls: LocalAgentOptions['tls']): string[] {
  if (!tls) return ['--insecure-plaintext-loopback'];
  return ['--tls-cert', tls.cert, '--tls-key', tls.key, '--tls-ca', tls.ca, ...tls.allow.flatMap((entry) => ['--tls-allow', entry])];
}

export async function startLocalAgent(options: LocalAgentOptions): Promise<LocalAgent> {
  mkdirSync(options.stateDir, { recursive: true });
  const logPath = join(options.stateDir, 'agent.log');
  const logFd = openSync(logPath, 'a', 0o600);
  let child: ChildProcess;
  try {
    const command = [...(options.wrap ?? []), process.execPath];
    child = spawn(
      command[0]!,
      [...command.slice(1), ...AGENT_NODE_FLAGS, ...(options.nodeArgs ?? []), options.mainPath ?? mainJs, 'agent', '--listen', options.listen ?? '127.0.0.1:0', '--state-dir', options.stateDir, ...transportArgs(options.tls), ...(options.args ?? [])],
      { stdio: ['ignore', logFd, logFd], env: { ...process.env, ...options.env } },
    );
  } finally {
    closeSync(logFd);
  }
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const client = new ControlClient(options.stateDir);
  const deadline = Date.now() + 20_000;
  let status: AgentStatus | undefined;
  while (!status) {
    if (child.exitCode !== null) throw new Error(`agent exited with code ${child.exitCode}; see ${logPath}`);
    try {
      status = await client.call<AgentStatus>('GET', '/v1/status');
    } catch {
      if (Date.now() > deadline) {
        child.kill('SIGKILL');
        throw new Error(`agent did not come up within 20 s; see ${logPath}`);
      }
      await sleep(50);
    }
  }
  const agent: LocalAgent = {
    pid: child.pid!,
    stateDir: options.stateDir,
    listen: status.agent.listen,
    client,
    logPath,
    process: child,
    status: () => client.call<AgentStatus>('GET', '/v1/status'),
    async stop(timeoutMs = 15_000) {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
      await exited;
      clearTimeout(timer);
    },
    async kill() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGKILL');
      await exited;
    },
  };
  return agent;
}

/**
 * Stops (SIGKILL) the guests an agent's registry lists and removes their memory files. An
 * agent that does not answer (killed by a test) is read from its state directory's records
 * instead; a recorded pid is stopped only while its command line names its memory file (so
 * a pid the system has since given to another process is left alone).
 */
export async function killGuestsOf(agent: LocalAgent): Promise<void> {
  let guests: { pid: number; memoryPaths: string[]; names?: string[] }[];
  try {
    guests = (await agent.status()).guests;
  } catch {
    guests = recordedGuests(agent.stateDir);
  }
  for (const guest of guests) {
    if (!guest.names || commandLineNames(guest.pid, guest.names)) {
      try {
        process.kill(guest.pid, 'SIGKILL');
      } catch {}
    }
    // A guest still receiving by post-copy has its fingerprints' file next to its memory.
    for (const path of guest.memoryPaths) for (const file of [path, fingerprintsPathOf(path)]) rmSync(file, { force: true });
  }
}

/**
 * The guests an agent's state directory has records of, whatever it can read: pid, memory
 * files, and the paths their command line names (memory files, QMP socket, device state).
 */
function recordedGuests(stateDir: string): { pid: number; memoryPaths: string[]; names: string[] }[] {
  const dir = join(stateDir, 'guests');
  let files: string[];
  try {
    files = readdirSync(dir).filter((file) => file.endsWith('.json'));
  } catch {
    return [];
  }
  return files.flatMap((file) => {
    try {
      const record = JSON.parse(readFileSync(join(dir, file), 'utf8')) as { pid?: unknown; files?: Record<string, unknown> };
      const files = record.files ?? {};
      const isPath = (path: unknown): path is string => typeof path === 'string' && path.startsWith('/');
      const memoryPaths = (Array.isArray(files.memoryPaths) ? files.memoryPaths : [files.memoryPath]).filter(isPath);
      const names = [...memoryPaths, files.qmpSocketPath, files.deviceStatePath].filter(isPath);
      return typeof record.pid === 'number' && Number.isSafeInteger(record.pid) && record.pid > 1 ? [{ pid: record.pid, memoryPaths, names }] : [];
    } catch {
      return [];
    }
  });
}

/** Does process `pid`'s command line name one of `paths`? */
function commandLineNames(pid: number, paths: readonly string[]): boolean {
  try {
    const args = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    return paths.some((path) => args.includes(path));
  } catch {
    return false;
  }
}
