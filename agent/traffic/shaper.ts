// Shapes one device's egress so that migration traffic gets a rate of its own, changeable
// while the migration runs, and the guests' workload keeps what is left of the link:
//
//   6777:    HTB root, default class 6777:20 (everything unclassified is workload)
//   6777:1   the link: rate = ceil = linkBitsPerSec
//   6777:10  migration, prio 1 (served first when both have tokens), selected by a u32 filter
//            on the migration port (TCP over IPv4 and IPv6)
//   6777:20  workload, prio 2
//
// The root handle 6777: is gangway's mark: a root qdisc with it was put there by gangway
// (this run or a crashed one) and may be replaced or removed; any other non-default root is
// someone else's and is left alone unless the caller says otherwise.
//
// Classification is u32 on the port, never a firewall mark: this kernel has no fw or flower
// classifier, and `u32 match mark` is accepted but, without CLS_U32_MARK, matches every
// packet. The u32 port match reads the TCP header at a fixed offset, so it misses IPv4
// packets with options and IPv6 packets with extension headers; TCP sends neither here.
//
// `tc class change` must be given every HTB parameter: the ones left out are not kept but
// reset to their defaults (prio 0, burst and quantum derived from the rate).
import { ErrorCode, GangwayError } from '../../protocol/errors.js';
import type { Runner } from './exec.js';
import { type HtbClass, parseTcClasses } from './parse.js';

export interface ShaperConfig {
  linkBitsPerSec: number;
  migration: { rateBitsPerSec: number; ceilBitsPerSec: number; port: number; direction: 'sport' | 'dport' };
  workload: { rateBitsPerSec: number; ceilBitsPerSec: number };
}

export type ShaperClass = 'migration' | 'workload';

export interface ShaperStats {
  link: HtbClass;
  migration: HtbClass;
  workload: HtbClass;
}

/** The device's root qdisc is not gangway's, and the caller did not allow replacing it. */
export class ForeignQdiscError extends GangwayError {
  constructor(
    readonly device: string,
    readonly kind: string,
    readonly handle: string,
  ) {
    super(ErrorCode.HOST_COMMAND, `${device} already has a root qdisc ${kind} ${handle} that gangway did not install; pass { replaceForeign: true } to replace it`);
    this.name = 'ForeignQdiscError';
  }
}

const HANDLE = '6777:';
const CLASS_ID = { link: '6777:1', migration: '6777:10', workload: '6777:20' } as const;
const PRIO = { migration: '1', workload: '2' } as const;
/** The kernel's own default root qdiscs (noqueue, pfifo_fast, fq_codel, mq) have handle 0:. */
const DEFAULT_HANDLE = '0:';
/** An Ethernet frame at MTU 1500, as HTB counts it. */
const FRAME_BYTES = 1514;
/** HTB warns about, and clamps, a quantum above this. */
const MAX_QUANTUM_BYTES = 200_000;
const MIN_RATE_BITS_PER_SEC = 8_000;
const MAX_RATE_BITS_PER_SEC = 100e9;
const DEVICE_PATTERN = /^[A-Za-z0-9_.@:-]{1,15}$/;

export class Shaper {
  private config: ShaperConfig | undefined;

  constructor(
    private readonly run: Runner,
    readonly device: string,
  ) {
    validateDevice(device);
  }

  /**
   * Installs the HTB tree, replacing gangway's own root qdisc if there is one (its counters
   * start again from 0). A half-built tree is removed before the error is thrown.
   */
  async install(config: ShaperConfig, options: { replaceForeign?: boolean } = {}): Promise<void> {
    validateConfig(config);
    const root = await rootQdisc(this.run, this.device);
    if (root && root.handle !== HANDLE && root.handle !== DEFAULT_HANDLE && !options.replaceForeign) {
      throw new ForeignQdiscError(this.device, root.kind, root.handle);
    }
    if (root && root.handle !== DEFAULT_HANDLE) await this.tc(['qdisc', 'del', 'dev', this.device, 'root']);
    try {
      await this.tc(['qdisc', 'add', 'dev', this.device, 'root', 'handle', HANDLE, 'htb', 'default', '20']);
      await this.tc(['class', 'add', 'dev', this.device, 'parent', HANDLE, 'classid', CLASS_ID.link, 'htb',
        ...htbParameters(config.linkBitsPerSec, config.linkBitsPerSec)]);
      for (const name of ['migration', 'workload'] as const) {
        const { rateBitsPerSec, ceilBitsPerSec } = config[name];
        await this.tc(['class', 'add', 'dev', this.device, 'parent', CLASS_ID.link, 'classid', CLASS_ID[name], 'htb',
          ...htbParameters(rateBitsPerSec, ceilBitsPerSec), 'prio', PRIO[name]]);
      }
      const { port, direction } = config.migration;
      await this.tc(['filter', 'add', 'dev', this.device, 'parent', HANDLE, 'protocol', 'ip', 'prio', '1', 'u32',
        'match', 'ip', 'protocol', '6', '0xff', 'match', 'ip', direction, String(port), '0xffff', 'flowid', CLASS_ID.migration]);
      await this.tc(['filter', 'add', 'dev', this.device, 'parent', HANDLE, 'protocol', 'ipv6', 'prio', '2', 'u32',
        'match', 'ip6', 'protocol', '6', '0xff', 'match', 'ip6', direction, String(port), '0xffff', 'flowid', CLASS_ID.migration]);
    } catch (err) {
      await Shaper.removeLeftovers(this.run, this.device).catch(() => {});
      throw err;
    }
    this.config = structuredClone(config);
  }

  /** Changes one class's rate and ceil in place; traffic in flight is not interrupted. */
  async change(name: ShaperClass, rateBitsPerSec: number, ceilBitsPerSec: number): Promise<void> {
    const config = this.config;
    if (!config) throw new GangwayError(ErrorCode.INTERNAL, `the shaper on ${this.device} is not installed`);
    if (name !== 'migration' && name !== 'workload') throw new RangeError(`shaper class ${JSON.stringify(name)} is invalid: use migration or workload`);
    const next = structuredClone(config);
    next[name].rateBitsPerSec = rateBitsPerSec;
    next[name].ceilBitsPerSec = ceilBitsPerSec;
    validateConfig(next);
    await this.tc(['class', 'change', 'dev', this.device, 'parent', CLASS_ID.link, 'classid', CLASS_ID[name], 'htb',
      ...htbParameters(rateBitsPerSec, ceilBitsPerSec), 'prio', PRIO[name]]);
    this.config = next;
  }

  /** The three classes' rates and counters as the kernel reports them. */
  async stats(): Promise<ShaperStats> {
    const classes = parseTcClasses(await this.tc(['-s', 'class', 'show', 'dev', this.device]));
    const find = (classid: string): HtbClass => {
      const found = classes.find((c) => c.classid === classid);
      if (!found) throw new GangwayError(ErrorCode.HOST_COMMAND, `the shaper on ${this.device} has no class ${classid}: not installed, or removed by someone else`);
      return found;
    };
    return { link: find(CLASS_ID.link), migration: find(CLASS_ID.migration), workload: find(CLASS_ID.workload) };
  }

  /** Removes the HTB tree (the device gets its default qdisc back). Nothing to remove is fine. */
  async remove(): Promise<void> {
    await Shaper.removeLeftovers(this.run, this.device);
    this.config = undefined;
  }

  /**
   * Removes a root qdisc with gangway's handle from `device`, as a crashed run may have left
   * it; another root qdisc, or a device that no longer exists, is left alone. Returns whether
   * one was removed.
   */
  static async removeLeftovers(run: Runner, device: string): Promise<boolean> {
    validateDevice(device);
    const root = await rootQdisc(run, device, { missingDevice: 'absent' });
    if (root?.handle !== HANDLE) return false;
    await run('tc', ['qdisc', 'del', 'dev', device, 'root']);
    return true;
  }

  private tc(args: string[]): Promise<string> {
    return this.run('tc', args);
  }
}

interface QdiscEntry {
  kind: string;
  handle: string;
  root?: boolean;
}

/** The root qdisc of `device` (`tc -j qdisc show` is JSON in iproute2 6.1, unlike classes). */
async function rootQdisc(run: Runner, device: string, options: { missingDevice?: 'absent' } = {}): Promise<QdiscEntry | undefined> {
  let text: string;
  try {
    text = await run('tc', ['-j', 'qdisc', 'show', 'dev', device]);
  } catch (err) {
    // A device that is gone took its qdiscs with it.
    if (options.missingDevice === 'absent' && /Cannot find device/i.test((err as { stderr?: string }).stderr ?? '')) return undefined;
    throw err;
  }
  let entries: QdiscEntry[];
  try {
    entries = JSON.parse(text || '[]') as QdiscEntry[];
  } catch (cause) {
    throw new GangwayError(ErrorCode.HOST_COMMAND, `\`tc -j qdisc show dev ${device}\` printed no JSON: ${JSON.stringify(text.slice(0, 200))}`, { cause });
  }
  return entries.find((entry) => entry.root === true);
}

/** rate, ceil, bursts of 1 ms (at least two frames) and a quantum of 1 ms at the rate. */
function htbParameters(rateBitsPerSec: number, ceilBitsPerSec: number): string[] {
  const msOf = (bitsPerSec: number) => Math.max(2 * FRAME_BYTES, Math.ceil(bitsPerSec / 8 / 1000));
  // Excess bandwidth is lent in proportion to quanta, so the quantum follows the rate.
  const quantumBytes = Math.min(MAX_QUANTUM_BYTES, Math.max(FRAME_BYTES, Math.ceil(rateBitsPerSec / 8 / 1000)));
  return ['rate', `${Math.round(rateBitsPerSec)}bit`, 'ceil', `${Math.round(ceilBitsPerSec)}bit`,
    'burst', String(msOf(rateBitsPerSec)), 'cburst', String(msOf(ceilBitsPerSec)), 'quantum', String(quantumBytes)];
}

function validateDevice(device: string): void {
  if (typeof device !== 'string' || !DEVICE_PATTERN.test(device)) {
    throw new RangeError(`device name ${JSON.stringify(device)} is invalid: use 1 to 15 characters of A-Z, a-z, 0-9 and _.@:-`);
  }
}

function validateRate(what: string, bitsPerSec: number): void {
  if (typeof bitsPerSec !== 'number' || !Number.isFinite(bitsPerSec) || bitsPerSec < MIN_RATE_BITS_PER_SEC || bitsPerSec > MAX_RATE_BITS_PER_SEC) {
    throw new RangeError(`${what} ${bitsPerSec} is invalid: use ${MIN_RATE_BITS_PER_SEC} to ${MAX_RATE_BITS_PER_SEC} bit/s`);
  }
}

function validateConfig(config: ShaperConfig): void {
  validateRate('linkBitsPerSec', config.linkBitsPerSec);
  for (const name of ['migration', 'workload'] as const) {
    const { rateBitsPerSec, ceilBitsPerSec } = config[name];
    validateRate(`${name}.rateBitsPerSec`, rateBitsPerSec);
    validateRate(`${name}.ceilBitsPerSec`, ceilBitsPerSec);
    if (ceilBitsPerSec < rateBitsPerSec) throw new RangeError(`${name}.ceilBitsPerSec ${ceilBitsPerSec} is below its rateBitsPerSec ${rateBitsPerSec}`);
    if (ceilBitsPerSec > config.linkBitsPerSec) throw new RangeError(`${name}.ceilBitsPerSec ${ceilBitsPerSec} is above linkBitsPerSec ${config.linkBitsPerSec}`);
  }
  // HTB would accept more, but then neither class could be given its rate when both are busy.
  if (config.migration.rateBitsPerSec + config.workload.rateBitsPerSec > config.linkBitsPerSec) {
    throw new RangeError(`migration and workload rates (${config.migration.rateBitsPerSec} + ${config.workload.rateBitsPerSec} bit/s) exceed linkBitsPerSec ${config.linkBitsPerSec}`);
  }
  const { port, direction } = config.migration;
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new RangeError(`migration.port ${port} is invalid: use 1 to 65535`);
  if (direction !== 'sport' && direction !== 'dport') throw new RangeError(`migration.direction ${JSON.stringify(direction)} is invalid: use sport or dport`);
}
