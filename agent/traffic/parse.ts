// Parsers for what the traffic monitor and the shaper read back from iptables and tc, as
// printed by the versions on Debian 12 (iptables 1.8.9 nf_tables, iproute2 6.1, whose
// `tc -j class show` ignores -j and prints text). Pure: text in, numbers out; a line that
// does not parse is an error that quotes it, never a silent zero.

export class ParseError extends Error {
  constructor(
    readonly what: string,
    readonly line: string,
    problem: string,
  ) {
    super(`${what}: ${problem}: ${JSON.stringify(line.slice(0, 200))}`);
  }
}

export interface ChainRule {
  packets: number;
  bytes: number;
  /** Input and output interface ('*' for any). */
  in: string;
  out: string;
  /** The rule's comment (gangway names each rule: "GUEST rx", "peer out", ...), or ''. */
  comment: string;
}

export interface ChainCounters {
  chain: string;
  references: number;
  rules: ChainRule[];
}

/**
 * `iptables -L CHAIN -v -x -n [-Z]` of one chain. With -Z, iptables adds a line
 * "Zeroing chain `CHAIN'" after the listing; it is accepted and ignored.
 */
export function parseIptablesChain(text: string): ChainCounters {
  const lines = text.split('\n').filter((line) => line.trim() !== '' && !line.startsWith('Zeroing chain'));
  const head = lines[0] ?? '';
  const m = /^Chain (\S+) \((\d+) references?\)/.exec(head);
  if (!m) throw new ParseError('iptables -L', head, "expected 'Chain NAME (N references)'");
  const columns = (lines[1] ?? '').trim().split(/\s+/);
  if (columns[0] !== 'pkts' || columns[1] !== 'bytes') throw new ParseError('iptables -L', lines[1] ?? '', 'expected the -v column header');
  const rules = lines.slice(2).map((line): ChainRule => {
    // pkts bytes target prot opt in out source destination [extra...]; target may be empty.
    const r = /^\s*(\d+)\s+(\d+)\s+(?:(\S+)\s+)??(\S+)\s+(--|-f|!f)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)(.*)$/.exec(line);
    if (!r) throw new ParseError('iptables -L', line, 'not a counted rule (was -v -x -n given?)');
    const comment = /\/\* (.*) \*\//.exec(r[10] ?? '');
    return { packets: Number(r[1]), bytes: Number(r[2]), in: r[6]!, out: r[7]!, comment: comment?.[1] ?? '' };
  });
  return { chain: m[1]!, references: Number(m[2]), rules };
}

export interface HtbClass {
  classid: string;
  parent: string | undefined;
  rateBitsPerSec: number;
  ceilBitsPerSec: number;
  sentBytes: number;
  sentPackets: number;
  dropped: number;
}

const UNITS: Record<string, number> = { bit: 1, kbit: 1e3, mbit: 1e6, gbit: 1e9, tbit: 1e12 };

/** tc's rate notation ('200Mbit', '1Gbit', '1600bit') in bits per second. */
export function parseTcRate(text: string): number {
  const m = /^(\d+(?:\.\d+)?)([KMGT]?bit)$/i.exec(text);
  const unit = m ? UNITS[m[2]!.toLowerCase()] : undefined;
  if (!m || unit === undefined) throw new ParseError('tc rate', text, "expected a number and bit, Kbit, Mbit, Gbit or Tbit");
  return Number(m[1]) * unit;
}

/** `tc -s class show dev DEV` (text, HTB classes; other kinds are skipped). */
export function parseTcClasses(text: string): HtbClass[] {
  const classes: HtbClass[] = [];
  let current: HtbClass | undefined;
  for (const line of text.split('\n')) {
    if (line.startsWith('class ')) {
      current = undefined;
      const m = /^class htb (\S+) (?:parent (\S+)|root)\b.*?\brate (\S+) ceil (\S+)/.exec(line);
      if (!m) {
        if (line.startsWith('class htb ')) throw new ParseError('tc -s class show', line, 'an HTB class without rate and ceil');
        continue;
      }
      current = { classid: m[1]!, parent: m[2], rateBitsPerSec: parseTcRate(m[3]!), ceilBitsPerSec: parseTcRate(m[4]!), sentBytes: 0, sentPackets: 0, dropped: 0 };
      classes.push(current);
      continue;
    }
    const sent = /^\s*Sent (\d+) bytes (\d+) pkt \(dropped (\d+)/.exec(line);
    if (sent && current) {
      current.sentBytes = Number(sent[1]);
      current.sentPackets = Number(sent[2]);
      current.dropped = Number(sent[3]);
    }
  }
  return classes;
}

/** Bytes per second between two readings of a counter; a counter that went backwards (reset) counts from 0. */
export function rateBetween(before: number, after: number, elapsedMs: number): number {
  if (elapsedMs <= 0) return 0;
  const delta = after >= before ? after - before : after;
  return (delta * 1000) / elapsedMs;
}

/** An exponentially smoothed rate: `alpha` of each new sample. */
export class SmoothedRate {
  private value: number | undefined;
  constructor(private readonly alpha = 0.3) {}
  add(sample: number): number {
    this.value = this.value === undefined ? sample : this.value * (1 - this.alpha) + sample * this.alpha;
    return this.value;
  }
  get current(): number {
    return this.value ?? 0;
  }
}
