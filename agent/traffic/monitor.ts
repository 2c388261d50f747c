// The traffic monitor (seed paper 003, section 3.3.1): what the guests and the host send and
// receive on the uplink, smoothed, and what it means for a migration: each guest's traffic
// class (inbound- or outbound-dominant) and the contention level.
//
// Sources, by what this agent is allowed to run:
//   full  root, iptables and an uplink: the accounting chain GANGWAY_ACCT counts each guest's
//         TAP device (`-i TAP` is what the guest sends, `-o TAP` what it receives) and the
//         peer port on the uplink; NIC counters from /sys/class/net/UPLINK/statistics.
//   nic   an uplink but no root or no iptables: NIC counters only (no per-guest rates, and
//         migration traffic cannot be told from the workload's).
//   off   no uplink configured, or it cannot be read: nothing is measured.
// The mode and the reason for it are part of every snapshot; nothing here throws because a
// tool is missing.
//
// The chain is read and zeroed in one command each interval, so every byte is counted once
// and a rate is bytes over the time since the previous read. Rates are smoothed with an EWMA
// (`alpha` of each new sample): a migration decision should follow the traffic's level, not
// one second's burst.
//
// Workload = NIC - migration traffic on the peer port. Contention here is the local view:
// max(workload sent, workload received) / link, since this host may be a migration's source
// (pre-copy competes with what it sends) or its destination (post-copy competes with what it
// receives). The planner combines both hosts' views (planner.ts contentionOf).
import { readFileSync } from 'node:fs';
import { EventEmitter } from 'node:events';
import type { Runner } from './exec.js';
import { AccountingChain, type AccountingRule } from './iptables.js';
import { rateBetween, SmoothedRate } from './parse.js';
import { contentionOf, dominantDirection, type Contention, type Direction, type Rates } from '../planner/planner.js';

export type MonitorMode = 'full' | 'nic' | 'off';

export interface MonitoredGuest {
  name: string;
  /** The guest's TAP device, or undefined when it has none (then it is not measured). */
  tap: string | undefined;
}

export interface NicCounters {
  rxBytes: number;
  txBytes: number;
}

export interface TrafficMonitorOptions {
  run: Runner;
  uplink: string | undefined;
  /** The agent's peer port: migration traffic, told apart from the workload. */
  peerPort: number;
  linkBytesPerSec: number | undefined;
  highContention: number;
  moderateContention: number;
  dominanceRatio: number;
  sampleIntervalMs: number;
  /** EWMA weight of each new sample (0..1]. */
  alpha?: number;
  /** Whether this process may change iptables (uid 0). */
  isRoot: boolean;
  /** Milliseconds, monotonic; injected so tests drive time. */
  now?: () => number;
  /** Default: /sys/class/net of this process's namespace (tests read another's through `ip netns exec`). */
  readNic?: (device: string) => NicCounters | Promise<NicCounters>;
  chain?: string;
  /** The guests to measure, asked before every sample (the chain follows their TAP devices). */
  guests: () => readonly MonitoredGuest[];
  /** Warnings a degraded mode or a failed sample is reported to. */
  warn?: (fields: Record<string, unknown>, message: string) => void;
}

export interface GuestTraffic {
  name: string;
  tap: string | null;
  rxBytesPerSec: number | null;
  txBytesPerSec: number | null;
  direction: Direction | null;
  /** Why the guest has no rates, when it has none. */
  reason?: string;
}

export interface TrafficSnapshot {
  mode: MonitorMode;
  /** Why the mode is not 'full'. */
  reason: string | null;
  uplink: string | null;
  linkBytesPerSec: number | null;
  sampleIntervalMs: number;
  /** Samples taken since start (rates need two NIC readings, so 0 means none yet). */
  samples: number;
  nic: Rates | null;
  /** Traffic on the peer port (migrations in and out); null unless mode is 'full'. */
  migration: Rates | null;
  /** NIC minus migration: what the guests and everything else on the host use. */
  workload: Rates | null;
  /**
   * What the accounting chain counted on the peer port since the monitor started, as of the
   * last sample (IP packets: IP headers included, Ethernet headers not); null unless mode is
   * 'full'. Totals let an operator (or a test) compare with the NIC's own counters. A chain
   * rebuilt for a TAP device added or gone loses what it counted since the last sample.
   */
  peerTotals: { rxBytes: number; txBytes: number; rxPackets: number; txPackets: number } | null;
  host: { direction: Direction; reason: string } | null;
  contention: { level: Contention; share: number; reason: string } | null;
  guests: GuestTraffic[];
}

const DEFAULT_CHAIN = 'GANGWAY_ACCT';
const DEFAULT_ALPHA = 0.3;

/** Rule comments: read() reports counters by them. */
const guestKey = (name: string, direction: 'rx' | 'tx') => `guest ${name} ${direction}`;
const PEER_KEYS = { rx: ['peer rx dport', 'peer rx sport'], tx: ['peer tx dport', 'peer tx sport'] } as const;

/** The byte counters of a network device, from sysfs. */
export function readSysfsNic(device: string): NicCounters {
  const read = (name: string) => {
    const value = Number(readFileSync(`/sys/class/net/${device}/statistics/${name}`, 'utf8').trim());
    if (!Number.isFinite(value)) throw new Error(`/sys/class/net/${device}/statistics/${name} does not hold a number`);
    return value;
  };
  return { rxBytes: read('rx_bytes'), txBytes: read('tx_bytes') };
}

class SmoothedRates {
  readonly rx: SmoothedRate;
  readonly tx: SmoothedRate;
  constructor(alpha: number) {
    this.rx = new SmoothedRate(alpha);
    this.tx = new SmoothedRate(alpha);
  }
  add(rxBytesPerSec: number, txBytesPerSec: number): void {
    this.rx.add(rxBytesPerSec);
    this.tx.add(txBytesPerSec);
  }
  get current(): Rates {
    return { rxBytesPerSec: this.rx.current, txBytesPerSec: this.tx.current };
  }
}

/** Emits 'sample' (the snapshot) after each sample. */
export class TrafficMonitor extends EventEmitter {
  private modeValue: MonitorMode = 'off';
  private reasonValue: string | null = 'not started';
  private chain: AccountingChain | undefined;
  private guests: MonitoredGuest[] = [];
  private installedKey = '';
  private readonly guestRates = new Map<string, SmoothedRates>();
  private readonly nicRates: SmoothedRates;
  private readonly peerRates: SmoothedRates;
  private lastNic: NicCounters | undefined;
  private readonly peerTotals = { rxBytes: 0, txBytes: 0, rxPackets: 0, txPackets: 0 };
  private lastAtMs: number | undefined;
  private samples = 0;
  private timer: NodeJS.Timeout | undefined;
  /** Chain changes and reads run one at a time. */
  private queue: Promise<unknown> = Promise.resolve();
  private readonly now: () => number;
  private readonly readNic: (device: string) => NicCounters | Promise<NicCounters>;
  private readonly alpha: number;

  constructor(private readonly options: TrafficMonitorOptions) {
    super();
    this.now = options.now ?? (() => performance.now());
    this.readNic = options.readNic ?? readSysfsNic;
    this.alpha = options.alpha ?? DEFAULT_ALPHA;
    if (!(this.alpha > 0 && this.alpha <= 1)) throw new RangeError(`alpha ${this.alpha} is invalid: use a number in (0, 1]`);
    this.nicRates = new SmoothedRates(this.alpha);
    this.peerRates = new SmoothedRates(this.alpha);
  }

  get mode(): MonitorMode {
    return this.modeValue;
  }

  get reason(): string | null {
    return this.reasonValue;
  }

  /**
   * Finds out what can be measured, removes the chains a crashed run left, installs the
   * accounting chain, and (unless `timer` is false) samples every interval. Never throws
   * for a missing tool or privilege: the mode and reason say what is measured.
   */
  async start(options: { timer?: boolean } = {}): Promise<void> {
    this.refreshGuests();
    const { uplink } = this.options;
    if (uplink === undefined) return this.degrade('off', "no uplink is configured (set 'traffic.uplink' and 'traffic.linkCapacity')");
    try {
      this.lastNic = await this.readNic(uplink);
      this.lastAtMs = this.now();
    } catch (err) {
      return this.degrade('off', `the uplink ${uplink} cannot be read: ${(err as Error).message}`);
    }
    if (!this.options.isRoot) {
      this.degrade('nic', 'not running as root: the iptables accounting chain needs root, so only NIC rates are measured (no per-guest or migration rates)');
    } else {
      try {
        this.chain = new AccountingChain(this.options.run, this.options.chain ?? DEFAULT_CHAIN);
        await AccountingChain.removeLeftovers(this.options.run);
        await this.installRules();
        this.modeValue = 'full';
        this.reasonValue = null;
      } catch (err) {
        this.chain = undefined;
        this.degrade('nic', `iptables accounting is unavailable, so only NIC rates are measured: ${(err as Error).message}`);
      }
    }
    if (options.timer !== false) {
      this.timer = setInterval(() => void this.sample().catch((err: Error) => this.options.warn?.({ err: err.message }, 'traffic sample failed')), this.options.sampleIntervalMs);
      this.timer.unref();
    }
  }

  private degrade(mode: MonitorMode, reason: string): void {
    this.modeValue = mode;
    this.reasonValue = reason;
    this.options.warn?.({ mode, reason }, 'traffic monitor degraded');
  }

  /** Takes the current guest list; a guest that left loses its smoothed rates. */
  private refreshGuests(): void {
    const guests = [...this.options.guests()];
    this.guests = guests;
    for (const name of this.guestRates.keys()) {
      if (!guests.some((g) => g.name === name)) this.guestRates.delete(name);
    }
  }

  private async installRules(): Promise<void> {
    const chain = this.chain!;
    const uplink = this.options.uplink!;
    const port = String(this.options.peerPort);
    const rules: AccountingRule[] = [];
    for (const guest of this.guests) {
      if (guest.tap === undefined) continue;
      rules.push({ comment: guestKey(guest.name, 'tx'), match: ['-i', guest.tap] });
      rules.push({ comment: guestKey(guest.name, 'rx'), match: ['-o', guest.tap] });
    }
    rules.push({ comment: PEER_KEYS.rx[0], match: ['-i', uplink, '-p', 'tcp', '--dport', port] });
    rules.push({ comment: PEER_KEYS.rx[1], match: ['-i', uplink, '-p', 'tcp', '--sport', port] });
    rules.push({ comment: PEER_KEYS.tx[0], match: ['-o', uplink, '-p', 'tcp', '--dport', port] });
    rules.push({ comment: PEER_KEYS.tx[1], match: ['-o', uplink, '-p', 'tcp', '--sport', port] });
    const key = JSON.stringify(rules);
    if (key === this.installedKey) return;
    await chain.install(rules, ['INPUT', 'OUTPUT', 'FORWARD']);
    this.installedKey = key;
  }

  /** Takes one sample: NIC counters, and in full mode the chain (read and zeroed). */
  sample(): Promise<TrafficSnapshot> {
    return this.serial(async () => {
      const uplink = this.options.uplink;
      this.refreshGuests();
      if (this.modeValue === 'off' || uplink === undefined || this.lastAtMs === undefined || this.lastNic === undefined) return this.snapshot();
      // A guest's TAP device added or gone: the chain is rebuilt first, which zeroes it, so
      // this one sample understates the rates (it never overstates them).
      if (this.chain) await this.installRules();
      const nic = await this.readNic(uplink);
      const counted = this.chain ? await this.chain.read() : undefined;
      const atMs = this.now();
      const elapsedMs = atMs - this.lastAtMs;
      if (elapsedMs <= 0) return this.snapshot();
      this.nicRates.add(rateBetween(this.lastNic.rxBytes, nic.rxBytes, elapsedMs), rateBetween(this.lastNic.txBytes, nic.txBytes, elapsedMs));
      this.lastNic = nic;
      this.lastAtMs = atMs;
      if (counted) {
        const bytes = (keys: readonly string[]) => keys.reduce((sum, key) => sum + (counted.get(key)?.bytes ?? 0), 0);
        const packets = (keys: readonly string[]) => keys.reduce((sum, key) => sum + (counted.get(key)?.packets ?? 0), 0);
        const perSec = (b: number) => (b * 1000) / elapsedMs;
        this.peerRates.add(perSec(bytes(PEER_KEYS.rx)), perSec(bytes(PEER_KEYS.tx)));
        this.peerTotals.rxBytes += bytes(PEER_KEYS.rx);
        this.peerTotals.txBytes += bytes(PEER_KEYS.tx);
        this.peerTotals.rxPackets += packets(PEER_KEYS.rx);
        this.peerTotals.txPackets += packets(PEER_KEYS.tx);
        for (const guest of this.guests) {
          if (guest.tap === undefined) continue;
          let rates = this.guestRates.get(guest.name);
          if (!rates) this.guestRates.set(guest.name, (rates = new SmoothedRates(this.alpha)));
          rates.add(perSec(bytes([guestKey(guest.name, 'rx')])), perSec(bytes([guestKey(guest.name, 'tx')])));
        }
      }
      this.samples++;
      const snapshot = this.snapshot();
      this.emit('sample', snapshot);
      return snapshot;
    });
  }

  /** The smoothed rates and what they mean, as of the last sample. */
  snapshot(): TrafficSnapshot {
    this.refreshGuests();
    const o = this.options;
    const measured = this.modeValue !== 'off' && this.samples > 0;
    const nic = measured ? this.nicRates.current : null;
    const migration = measured && this.modeValue === 'full' ? this.peerRates.current : null;
    const workload = nic
      ? {
          rxBytesPerSec: Math.max(0, nic.rxBytesPerSec - (migration?.rxBytesPerSec ?? 0)),
          txBytesPerSec: Math.max(0, nic.txBytesPerSec - (migration?.txBytesPerSec ?? 0)),
        }
      : null;
    const host = workload ? dominantDirection(workload, o.dominanceRatio) : null;
    const contention =
      workload && o.linkBytesPerSec !== undefined
        ? contentionOf(workload, workload, { linkBytesPerSec: o.linkBytesPerSec, highContention: o.highContention, moderateContention: o.moderateContention })
        : null;
    const guests = this.guests.map((guest): GuestTraffic => {
      const base = { name: guest.name, tap: guest.tap ?? null };
      if (guest.tap === undefined) return { ...base, rxBytesPerSec: null, txBytesPerSec: null, direction: null, reason: 'no TAP device in its definition' };
      const rates = this.guestRates.get(guest.name);
      if (this.modeValue !== 'full') return { ...base, rxBytesPerSec: null, txBytesPerSec: null, direction: null, reason: this.reasonValue ?? 'not measured' };
      if (!rates) return { ...base, rxBytesPerSec: null, txBytesPerSec: null, direction: null, reason: 'not sampled yet' };
      const current = rates.current;
      return { ...base, ...current, direction: dominantDirection(current, o.dominanceRatio).direction };
    });
    return {
      mode: this.modeValue,
      reason: this.reasonValue,
      uplink: o.uplink ?? null,
      linkBytesPerSec: o.linkBytesPerSec ?? null,
      sampleIntervalMs: o.sampleIntervalMs,
      samples: this.samples,
      nic,
      migration,
      workload,
      peerTotals: this.modeValue === 'full' ? { ...this.peerTotals } : null,
      host: host ? { direction: host.direction, reason: host.reason } : null,
      contention,
      guests,
    };
  }

  /** Stops sampling and removes the accounting chain. Safe to call twice. */
  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    await this.serial(async () => {
      const chain = this.chain;
      this.chain = undefined;
      this.installedKey = '';
      await chain?.remove();
    });
  }

  private serial<T>(task: () => Promise<T>): Promise<T> {
    const next = this.queue.then(task, task);
    this.queue = next.catch(() => {});
    return next;
  }
}
