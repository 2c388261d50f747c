// Bytes a migration put on the wire, counted by the kernel rather than taken from the
// migrating program's own claim (QEMU's ram.transferred counts its stream, not what TCP and
// IP add, and a baseline should not be judged by its own report).
//
// - Loopback: an iptables chain of this benchmark's own in the filter table, jumped to from
//   OUTPUT. Every packet a local process sends passes OUTPUT once (loopback included; INPUT
//   would see it a second time), and each rule counts the IP packets (headers included) of
//   one migration endpoint: to it (`-d ADDR --dport PORT`) and from it (`-s ADDR --sport
//   PORT`). The chain is named GWQB_*, not GANGWAY_*: a gangway agent's traffic monitor
//   removes every GANGWAY_* chain when it starts, and one may start while a baseline runs.
// - A netns link (bench/netns-link.ts): the veth counters of each namespace's end, which
//   count Ethernet frames (14 bytes more per frame than iptables' IP bytes). They count
//   everything the namespace sends, so the namespaces must carry nothing else meanwhile.
import { runner, type Runner } from '../agent/traffic/exec.js';
import { parseIptablesChain } from '../agent/traffic/parse.js';
import type { ShapedLink } from './netns-link.js';

export interface WireBytes {
  /** Toward the destination (the migration stream). */
  forwardBytes: number;
  /** Back toward the source (ACKs; the return path: post-copy's page requests). */
  backBytes: number;
}

export interface WireCount {
  total: WireBytes;
  /** Per endpoint, in the order given, when the counter tells them apart. */
  perEndpoint?: WireBytes[];
}

export interface WireCounter {
  readonly method: 'iptables' | 'veth';
  /** Bytes since the counter was opened. */
  read(): Promise<WireCount>;
  /** Removes what the counter installed. Idempotent; call it also after a failure. */
  close(): Promise<void>;
}

/** Where a destination listens: its address and TCP port. */
export interface Endpoint {
  host: string;
  port: number;
}

/** xtables chain names are at most 28 characters. */
const CHAIN_PATTERN = /^GWQB_[A-Z0-9_]{1,23}$/;
const LOCK_WAIT = ['-w', '5'];

let chainCounter = 0;

/**
 * Installs a chain counting the traffic to and from each endpoint on loopback. The chain's
 * counters start at zero (a new chain, or a leftover of this process id flushed).
 */
export async function openIptablesCounter(endpoints: readonly Endpoint[], run: Runner = runner()): Promise<WireCounter> {
  const chain = `GWQB_${process.pid}_${chainCounter++}`;
  if (!CHAIN_PATTERN.test(chain)) throw new RangeError(`iptables chain name ${chain} is too long`);
  const iptables = (args: string[]) => run('iptables', [...LOCK_WAIT, ...args]);
  const removeChain = async () => {
    const listing = (await iptables(['-S'])).split('\n').map((line) => line.trim());
    // The jump first: a chain still referenced cannot be deleted.
    if (listing.includes(`-A OUTPUT -j ${chain}`)) await iptables(['-D', 'OUTPUT', '-j', chain]);
    if (listing.includes(`-N ${chain}`)) {
      await iptables(['-F', chain]);
      await iptables(['-X', chain]);
    }
  };
  // A chain of this name is a leftover of an earlier process with this pid: ours to remove.
  await removeChain();
  try {
    await iptables(['-N', chain]);
    for (const [i, { host, port }] of endpoints.entries()) {
      await iptables(['-A', chain, '-p', 'tcp', '-d', host, '--dport', String(port), '-m', 'comment', '--comment', `${i} forward`]);
      await iptables(['-A', chain, '-p', 'tcp', '-s', host, '--sport', String(port), '-m', 'comment', '--comment', `${i} back`]);
    }
    await iptables(['-I', 'OUTPUT', '1', '-j', chain]);
  } catch (err) {
    await removeChain().catch(() => {});
    throw err;
  }
  let closing: Promise<void> | undefined;
  return {
    method: 'iptables',
    async read() {
      const listing = parseIptablesChain(await iptables(['-L', chain, '-v', '-x', '-n']));
      const perEndpoint = endpoints.map(() => ({ forwardBytes: 0, backBytes: 0 }));
      for (const rule of listing.rules) {
        const m = /^(\d+) (forward|back)$/.exec(rule.comment);
        const counts = m ? perEndpoint[Number(m[1])] : undefined;
        if (!m || !counts) throw new Error(`iptables chain ${chain} holds a rule this counter did not add (comment ${JSON.stringify(rule.comment)})`);
        if (m[2] === 'forward') counts.forwardBytes += rule.bytes;
        else counts.backBytes += rule.bytes;
      }
      return { total: sum(perEndpoint), perEndpoint };
    },
    close() {
      // A failed removal may be retried by calling close() again.
      closing ??= removeChain().catch((err: unknown) => {
        closing = undefined;
        throw err;
      });
      return closing;
    },
  };
}

/** Counts on the link's veth ends: nsA's sends are forward (the source runs in nsA), nsB's back. */
export async function openVethCounter(link: ShapedLink, run: Runner = runner()): Promise<WireCounter> {
  const txBytes = async (ns: string) => {
    const stats = JSON.parse(await run('ip', ['-n', ns, '-s', '-j', 'link', 'show', 'dev', ns])) as { stats64?: { tx?: { bytes?: number } } }[];
    const bytes = stats[0]?.stats64?.tx?.bytes;
    if (typeof bytes !== 'number') throw new Error(`\`ip -n ${ns} -s -j link show dev ${ns}\` gave no tx byte count`);
    return bytes;
  };
  const start = { forward: await txBytes(link.nsA), back: await txBytes(link.nsB) };
  return {
    method: 'veth',
    async read() {
      return { total: { forwardBytes: (await txBytes(link.nsA)) - start.forward, backBytes: (await txBytes(link.nsB)) - start.back } };
    },
    // Nothing installed: the counters belong to the link, which its owner removes.
    async close() {},
  };
}

export function sum(counts: readonly WireBytes[]): WireBytes {
  return counts.reduce((a, b) => ({ forwardBytes: a.forwardBytes + b.forwardBytes, backBytes: a.backBytes + b.backBytes }), { forwardBytes: 0, backBytes: 0 });
}
