// A shaped link for tests and benchmarks that need a wire with a real rate rather than
// loopback's ~18 Gbit/s: two network namespaces joined by a veth pair, each end's egress
// shaped by HTB, so an agent in one namespace reaches an agent in the other at the rate a
// WAN link would give it.
//
// Why HTB and this burst (measured here with iperf3 over 3 s, kernel 6.18, iproute2 6.1):
// - HTB and tbf both gave 191.3 Mbit/s of TCP goodput at 200 Mbit/s, which is
//   200 × 1448/1514: the shaper counts Ethernet frames, goodput is TCP payload. At
//   10 Mbit/s tbf dropped (608 retransmits) where HTB queued instead; and an HTB class can
//   be changed mid-transfer (`tc class change`), which the shaper adapter relies on.
// - Burst is 1 ms at the rate, at least two full frames. A fixed 128 KiB inflated a 3 s
//   measurement at 10 Mbit/s by 3%; two frames capped 5 Gbit/s at 4.25 Gbit/s where 1 ms
//   gave 4.78.
import { execa } from 'execa';

export interface ShapedLinkOptions {
  /** 1 to 10 characters of [a-z0-9]: device names derived from it must fit IFNAMSIZ. */
  name: string;
  rateBitsPerSec: number;
  /** One-way delay added on each egress (so the round trip gets twice this), if netem exists. */
  delayMs?: number;
}

export interface ShapedLink {
  readonly nsA: string;
  readonly nsB: string;
  /** Address of nsA's end of the veth pair. */
  readonly addrA: string;
  readonly addrB: string;
  /** The shaped rate of each direction, counted in Ethernet frames (see the file header). */
  readonly rateBitsPerSec: number;
  /** The one-way delay in effect: 0 when none was asked for or netem is missing. */
  readonly delayMs: number;
  /** Why a requested delay was not applied; undefined when it was, or none was asked for. */
  readonly note?: string;
  /** A command prefix that runs a program inside `ns` (one of nsA, nsB). */
  netnsExecPrefix(ns: string): string[];
  /**
   * Deletes both namespaces, which removes the veths and qdiscs with them. Idempotent. Stop
   * the processes started inside first: one still running keeps its namespace (and its
   * end of the link) alive after the name is gone.
   */
  close(): Promise<void>;
}

/** A command the link needed failed: the command, its exit code and stderr. */
export class NetnsCommandError extends Error {
  constructor(
    readonly command: readonly string[],
    readonly exitCode: number | undefined,
    readonly stderr: string,
    options?: { cause?: unknown },
  ) {
    super(`\`${command.join(' ')}\` failed${exitCode === undefined ? '' : ` with exit code ${exitCode}`}: ${stderr.trim()}`, options);
    this.name = 'NetnsCommandError';
  }
}

const NAME_PATTERN = /^[a-z0-9]{1,10}$/;
const MIN_RATE_BITS_PER_SEC = 8_000;
/** Beyond what a veth carries; above it tc is handed numbers it cannot parse. */
const MAX_RATE_BITS_PER_SEC = 100e9;
const COMMAND_TIMEOUT_MS = 10_000;
/** An Ethernet frame at MTU 1500, as the shaper counts it. */
const FRAME_BYTES = 1514;

export async function run(command: readonly string[]): Promise<string> {
  const result = await execa(command[0]!, command.slice(1), { reject: false, timeout: COMMAND_TIMEOUT_MS, stdin: 'ignore' });
  if (result.failed) {
    throw new NetnsCommandError(command, result.exitCode, result.stderr || (result.shortMessage ?? ''), { cause: result.cause });
  }
  return result.stdout;
}

async function existingNamespaces(): Promise<Set<string>> {
  const listed = JSON.parse((await run(['ip', '-j', 'netns', 'list'])) || '[]') as { name: string }[];
  return new Set(listed.map((entry) => entry.name));
}

async function removeNamespaces(names: readonly string[]): Promise<void> {
  const existing = await existingNamespaces();
  for (const name of names) {
    if (existing.has(name)) await run(['ip', 'netns', 'del', name]);
  }
}

/**
 * The third octet of the link's 10.213.X.0/30. Each pair of namespaces is isolated, so two
 * links sharing X cannot interfere; deriving it from the name only makes a capture or a log
 * line say which link it came from.
 */
function subnetOctet(name: string): number {
  let hash = 0x811c9dc5;
  for (const char of name) hash = Math.imul(hash ^ char.charCodeAt(0), 0x01000193);
  return (hash >>> 0) % 256;
}

function validate(options: ShapedLinkOptions): { name: string; rateBitsPerSec: number; delayMs: number } {
  const { name, rateBitsPerSec, delayMs = 0 } = options;
  if (typeof name !== 'string' || !NAME_PATTERN.test(name)) {
    throw new RangeError(`shaped link name ${JSON.stringify(name)} is invalid: use 1 to 10 characters of a-z and 0-9 (it becomes part of namespace and device names)`);
  }
  if (!Number.isFinite(rateBitsPerSec) || rateBitsPerSec < MIN_RATE_BITS_PER_SEC || rateBitsPerSec > MAX_RATE_BITS_PER_SEC) {
    throw new RangeError(`rateBitsPerSec ${rateBitsPerSec} is invalid: use ${MIN_RATE_BITS_PER_SEC} to ${MAX_RATE_BITS_PER_SEC} bit/s`);
  }
  if (!Number.isFinite(delayMs) || delayMs < 0) {
    throw new RangeError(`delayMs ${delayMs} is invalid: use a finite number of milliseconds, 0 or more`);
  }
  return { name, rateBitsPerSec: Math.round(rateBitsPerSec), delayMs };
}

export async function shapeEgress(ns: string, device: string, rateBitsPerSec: number): Promise<void> {
  const burstBytes = Math.max(2 * FRAME_BYTES, Math.ceil(rateBitsPerSec / 8 / 1000));
  const rate = `${rateBitsPerSec}bit`;
  await run(['tc', '-n', ns, 'qdisc', 'add', 'dev', device, 'root', 'handle', '1:', 'htb', 'default', '1']);
  // One class never shares, so its quantum is irrelevant; it is given only because HTB
  // warns when it derives one from a high rate.
  await run(['tc', '-n', ns, 'class', 'add', 'dev', device, 'parent', '1:', 'classid', '1:1', 'htb',
    'rate', rate, 'ceil', rate, 'burst', String(burstBytes), 'cburst', String(burstBytes), 'quantum', '200000']);
}

/**
 * Adds the delay under the HTB class. Returns false when the kernel has no netem (this
 * machine's kernel is built without CONFIG_NET_SCH_NETEM); other failures throw.
 */
async function addDelay(ns: string, device: string, rateBitsPerSec: number, delayMs: number): Promise<boolean> {
  // netem holds a delay's worth of packets; its default of 1000 would drop at high rates.
  const inFlightFrames = Math.ceil((rateBitsPerSec / 8) * (delayMs / 1000) / FRAME_BYTES);
  const limit = String(1000 + 2 * inFlightFrames);
  try {
    await run(['tc', '-n', ns, 'qdisc', 'add', 'dev', device, 'parent', '1:1', 'handle', '10:', 'netem', 'delay', `${delayMs}ms`, 'limit', limit]);
    return true;
  } catch (err) {
    if (err instanceof NetnsCommandError && /kind is unknown|unknown qdisc/i.test(err.stderr)) return false;
    throw err;
  }
}

/**
 * Creates namespaces `gw-<name>-a` and `gw-<name>-b` joined by a veth pair (each end named
 * after its namespace) with 10.213.X.1/30 and 10.213.X.2/30, both directions shaped to
 * `rateBitsPerSec`. Namespaces left with these names by a crashed run are removed first.
 * On failure, whatever was created is removed before the error is thrown.
 */
export async function createShapedLink(options: ShapedLinkOptions): Promise<ShapedLink> {
  const { name, rateBitsPerSec, delayMs } = validate(options);
  const nsA = `gw-${name}-a`;
  const nsB = `gw-${name}-b`;
  const octet = subnetOctet(name);
  const addrA = `10.213.${octet}.1`;
  const addrB = `10.213.${octet}.2`;
  const names = [nsA, nsB];

  await removeNamespaces(names);
  let appliedDelayMs = 0;
  let note: string | undefined;
  try {
    await run(['ip', 'netns', 'add', nsA]);
    await run(['ip', 'netns', 'add', nsB]);
    // Created inside nsA with its peer moved straight to nsB, so neither end ever exists in
    // the root namespace, where its name could clash with a host device.
    await run(['ip', '-n', nsA, 'link', 'add', nsA, 'type', 'veth', 'peer', 'name', nsB, 'netns', nsB]);
    for (const [ns, addr] of [[nsA, addrA], [nsB, addrB]] as const) {
      await run(['ip', '-n', ns, 'addr', 'add', `${addr}/30`, 'dev', ns]);
      await run(['ip', '-n', ns, 'link', 'set', 'lo', 'up']);
      await run(['ip', '-n', ns, 'link', 'set', ns, 'up']);
      await shapeEgress(ns, ns, rateBitsPerSec);
    }
    // Both ends run on the same kernel, so nsA's answer on netem holds for nsB.
    if (delayMs > 0 && (await addDelay(nsA, nsA, rateBitsPerSec, delayMs))) {
      await addDelay(nsB, nsB, rateBitsPerSec, delayMs);
      appliedDelayMs = delayMs;
    } else if (delayMs > 0) {
      note = `delayMs ${delayMs} ignored: this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM), so the link adds no delay`;
    }
  } catch (err) {
    await removeNamespaces(names).catch(() => {});
    throw err;
  }

  let closing: Promise<void> | undefined;
  return {
    nsA,
    nsB,
    addrA,
    addrB,
    rateBitsPerSec,
    delayMs: appliedDelayMs,
    ...(note === undefined ? {} : { note }),
    netnsExecPrefix(ns: string) {
      if (ns !== nsA && ns !== nsB) throw new RangeError(`namespace ${ns} is not part of this link (${nsA}, ${nsB})`);
      return ['ip', 'netns', 'exec', ns];
    },
    close() {
      // A failed removal may be retried by calling close() again.
      closing ??= removeNamespaces(names).catch((err: unknown) => {
        closing = undefined;
        throw err;
      });
      return closing;
    },
  };
}

/**
 * Whether this process can create shaped links: root, iproute2's `ip` and `tc`, and a probe
 * namespace that takes an HTB qdisc (removed again). Tests and benchmarks skip with `reason`.
 */
export async function netnsAvailable(): Promise<{ ok: true } | { ok: false; reason: string }> {
  const uid = process.getuid?.();
  if (uid !== 0) return { ok: false, reason: `network namespaces need root; this process runs as uid ${uid ?? 'unknown'}` };
  for (const tool of ['ip', 'tc']) {
    const version = await execa(tool, ['-V'], { reject: false, timeout: COMMAND_TIMEOUT_MS, stdin: 'ignore' });
    if (version.failed) return { ok: false, reason: `\`${tool}\` (iproute2) is not usable: ${version.shortMessage}` };
  }
  const probe = `gw-probe-${process.pid}`;
  try {
    await run(['ip', 'netns', 'add', probe]);
    await run(['tc', '-n', probe, 'qdisc', 'add', 'dev', 'lo', 'root', 'handle', '1:', 'htb']);
    return { ok: true };
  } catch (err) {
    return { ok: false, reason: `cannot create a network namespace with an HTB qdisc: ${(err as Error).message}` };
  } finally {
    await removeNamespaces([probe]).catch(() => {});
  }
}
