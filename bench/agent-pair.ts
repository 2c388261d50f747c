// Two gangway agents for a benchmark that migrates between them: mutual TLS as in
// production, on loopback or each in one namespace of a shaped link (bench/netns-link.ts),
// stopped with their guests on the way out (also on Ctrl-C, through the bench's ExitSteps);
// and the small waits such a benchmark needs around them.
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { initCa, issueHostCert, type CertResult } from '../agent/cli/certs.js';
import { killGuestsOf, makeTempDir, startLocalAgent, type AgentStatus, type LocalAgent } from '../agent/local-agent.js';
import type { ExitSteps } from './exit.js';
import type { ShapedLink } from './netns-link.js';

export interface Agents {
  source: LocalAgent;
  destination: LocalAgent;
  /** The destination's peer address, for `migrate --to`. */
  to: string;
}

export interface AgentPairOptions {
  /** Their state and certificates go in a temporary directory of this prefix, removed at the end. */
  tmpPrefix: string;
  /** The source in its nsA, the destination in its nsB; loopback without. */
  shaped?: ShapedLink;
  /** `gangway agent` flags of each. */
  args: (role: 'source' | 'destination') => string[];
}

/** Runs `body` with two fresh agents, then stops them and their guests and removes their directory. */
export async function withAgents<T>(exit: ExitSteps, options: AgentPairOptions, body: (agents: Agents) => Promise<T>): Promise<T> {
  const { shaped } = options;
  const tmp = makeTempDir(options.tmpPrefix);
  const agents: LocalAgent[] = [];
  const stopAll = exit.add(async () => {
    for (const agent of agents) await killGuestsOf(agent);
    await Promise.all(agents.map((agent) => agent.stop()));
    rmSync(tmp, { recursive: true, force: true });
  });
  try {
    const caDir = join(tmp, 'tls');
    await initCa({ dir: caDir, days: 1 });
    const sourceCert = await issueHostCert({ dir: caDir, name: 'source', sans: ['127.0.0.1', ...(shaped ? [shaped.addrA] : [])], validity: { days: 1 } });
    const destinationCert = await issueHostCert({ dir: caDir, name: 'destination', sans: ['127.0.0.1', ...(shaped ? [shaped.addrB] : [])], validity: { days: 1 } });
    const tls = (cert: CertResult, peer: CertResult) => ({ cert: cert.certPath, key: cert.keyPath, ca: cert.caPath, allow: [peer.fingerprint] });
    const source = await startLocalAgent({
      stateDir: `${tmp}/source`,
      args: options.args('source'),
      tls: tls(sourceCert, destinationCert),
      ...(shaped ? { wrap: shaped.netnsExecPrefix(shaped.nsA), listen: `${shaped.addrA}:0` } : {}),
    });
    agents.push(source);
    const destination = await startLocalAgent({
      stateDir: `${tmp}/destination`,
      args: options.args('destination'),
      tls: tls(destinationCert, sourceCert),
      ...(shaped ? { wrap: shaped.netnsExecPrefix(shaped.nsB), listen: `${shaped.addrB}:0` } : {}),
    });
    agents.push(destination);
    return await body({ source, destination, to: destination.listen });
  } finally {
    await stopAll();
  }
}

export type GuestView = AgentStatus['guests'][number];

/** The guests named, as `agent` lists them, in the order named (those it does not list left out). */
export async function vmsOn(agent: LocalAgent, names: readonly string[]): Promise<GuestView[]> {
  const guests = (await agent.status()).guests;
  return names.map((name) => guests.find((g) => g.name === name)).filter((g): g is GuestView => g !== undefined);
}

/** Polls `probe` every 100 ms until it gives a value; throws after `timeoutMs`. */
export async function until<T>(what: string, probe: () => Promise<T | undefined | false>, timeoutMs: number): Promise<T> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what} (${timeoutMs} ms)`);
    await sleep(100);
  }
}
