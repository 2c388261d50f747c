// Byte accounting with an iptables chain of gangway's own (filter table). Rules in the chain
// have no target: each one only counts what it matches and lets the packet continue, so the
// chain can be jumped to from INPUT, OUTPUT and FORWARD without changing what the host
// accepts. Every chain gangway creates is named GANGWAY_*, which is how a later run finds and
// removes what a crashed one left behind.
//
// Existence is checked with `iptables -S`, not `-L CHAIN`: iptables 1.8.9 (nf_tables) answers
// a missing chain with "chain ... is incompatible, use 'nft' tool", exit code 1, which cannot
// be told apart from a real failure.
import type { Runner } from './exec.js';
import { parseIptablesChain } from './parse.js';

export type Hook = 'INPUT' | 'OUTPUT' | 'FORWARD';

export interface AccountingRule {
  /** The key `read()` reports the rule's counters under; unique within the chain. */
  comment: string;
  /** iptables match arguments, e.g. `['-o', 'mig0', '-p', 'tcp', '--dport', '4444']`. */
  match: string[];
}

export interface Counters {
  packets: number;
  bytes: number;
}

const HOOKS: readonly Hook[] = ['INPUT', 'OUTPUT', 'FORWARD'];
/** iptables chain names are at most 28 characters (XT_EXTENSION_MAXNAMELEN less the NUL). */
const CHAIN_PATTERN = /^GANGWAY_[A-Z0-9_]{1,20}$/;
const PREFIX = 'GANGWAY_';
/** The comment match takes at most 255 characters. */
const MAX_COMMENT_LENGTH = 255;
/** With the legacy backend, wait up to this long for the xtables lock instead of failing at once. */
const LOCK_WAIT = ['-w', '5'];

export class AccountingChain {
  /** Each rule's counters at the last read (the chain is never zeroed: read() returns differences). */
  private lastTotals = new Map<string, Counters>();

  constructor(
    private readonly run: Runner,
    readonly chain: string,
  ) {
    if (!CHAIN_PATTERN.test(chain)) {
      throw new RangeError(`accounting chain name ${JSON.stringify(chain)} is invalid: use GANGWAY_ and 1 to 20 characters of A-Z, 0-9 and _`);
    }
  }

  /**
   * Creates the chain (or flushes it when it exists, which zeroes its counters), adds one
   * counting rule per entry, and makes each hook jump to it exactly once, first in the hook
   * so that no earlier ACCEPT or DROP hides a packet from the count. Jumps from hooks not
   * listed, left by an earlier install, are removed.
   */
  async install(rules: readonly AccountingRule[], hooks: readonly Hook[]): Promise<void> {
    validateRules(rules);
    for (const hook of hooks) {
      if (!HOOKS.includes(hook)) throw new RangeError(`hook ${JSON.stringify(hook)} is invalid: use INPUT, OUTPUT or FORWARD`);
    }
    const before = await listRules(this.run);
    if (before.chains.has(this.chain)) await this.iptables(['-F', this.chain]);
    else await this.iptables(['-N', this.chain]);
    // The rules made now count from zero.
    this.lastTotals = new Map();
    for (const rule of rules) {
      await this.iptables(['-A', this.chain, ...rule.match, '-m', 'comment', '--comment', rule.comment]);
    }
    // One plain jump per requested hook survives; duplicates and jumps from hooks no longer
    // requested go.
    const kept = new Set<string>();
    for (const jump of before.jumpsTo(this.chain)) {
      if (hooks.includes(jump.from as Hook) && isPlainJump(jump.spec, this.chain) && !kept.has(jump.from)) kept.add(jump.from);
      else await this.iptables(['-D', jump.from, ...jump.spec]);
    }
    for (const hook of new Set(hooks)) {
      if (!kept.has(hook)) await this.iptables(['-I', hook, '1', '-j', this.chain]);
    }
  }

  /**
   * Each rule's counters since the previous read (or install), keyed by comment: the
   * counters are read, never zeroed, and the difference to the last read is returned. (`-L
   * -Z` lists and then zeroes: with the nf_tables backend those are two steps, and the
   * packets counted between them were lost: 1.3% of a migration's bytes under load.)
   */
  async read(): Promise<Map<string, Counters>> {
    const listing = parseIptablesChain(await this.iptables(['-L', this.chain, '-v', '-x', '-n']));
    const totals = new Map<string, Counters>();
    for (const rule of listing.rules) {
      const previous = totals.get(rule.comment);
      totals.set(rule.comment, {
        packets: (previous?.packets ?? 0) + rule.packets,
        bytes: (previous?.bytes ?? 0) + rule.bytes,
      });
    }
    const counters = new Map<string, Counters>();
    for (const [comment, total] of totals) {
      const last = this.lastTotals.get(comment);
      // A counter that went back was zeroed by somebody else: all it holds is new.
      const fresh = !last || total.bytes < last.bytes || total.packets < last.packets;
      counters.set(comment, fresh ? total : { packets: total.packets - last.packets, bytes: total.bytes - last.bytes });
    }
    this.lastTotals = totals;
    return counters;
  }

  /** Deletes every jump to the chain, then the chain. Nothing to remove is not an error. */
  async remove(): Promise<void> {
    await removeChains(this.run, (chain) => chain === this.chain);
  }

  /** Removes every GANGWAY_* chain and the jumps to it, as a crashed run may have left them. */
  static async removeLeftovers(run: Runner): Promise<string[]> {
    return removeChains(run, (chain) => chain.startsWith(PREFIX));
  }

  private iptables(args: string[]): Promise<string> {
    return this.run('iptables', [...LOCK_WAIT, ...args]);
  }
}

function validateRules(rules: readonly AccountingRule[]): void {
  const seen = new Set<string>();
  for (const { comment, match } of rules) {
    // The comment comes back between /* and */ in `iptables -L`, one line per rule.
    if (typeof comment !== 'string' || comment === '' || comment.length > MAX_COMMENT_LENGTH || comment.includes('*/') || /[\0-\x1f\x7f]/.test(comment)) {
      throw new RangeError(`accounting rule comment ${JSON.stringify(comment)} is invalid: use 1 to ${MAX_COMMENT_LENGTH} printable characters without */`);
    }
    if (seen.has(comment)) throw new RangeError(`accounting rule comment ${JSON.stringify(comment)} is used twice: read() reports counters by comment`);
    seen.add(comment);
    // A target would make the rule decide a packet's fate; accounting only counts.
    if (!Array.isArray(match) || match.some((arg) => typeof arg !== 'string' || arg === '-j' || arg === '-g' || arg === '--jump' || arg === '--goto')) {
      throw new RangeError(`accounting rule ${JSON.stringify(comment)} has an invalid match: give match arguments only, no -j or -g`);
    }
  }
}

interface Jump {
  /** The chain the jump is in. */
  from: string;
  /** The rule after `-A FROM`, as `-D FROM` takes it. */
  spec: string[];
}

interface RuleListing {
  chains: Set<string>;
  jumpsTo(chain: string): Jump[];
}

async function listRules(run: Runner): Promise<RuleListing> {
  const chains = new Set<string>();
  const appends: Jump[] = [];
  for (const line of (await run('iptables', [...LOCK_WAIT, '-S'])).split('\n')) {
    const words = splitRuleLine(line);
    if (words[0] === '-N' && words[1] !== undefined) chains.add(words[1]);
    else if (words[0] === '-A' && words[1] !== undefined) appends.push({ from: words[1], spec: words.slice(2) });
  }
  return {
    chains,
    jumpsTo: (chain) => appends.filter((rule) => targetOf(rule.spec) === chain),
  };
}

function targetOf(spec: readonly string[]): string | undefined {
  const at = spec.findIndex((word) => word === '-j' || word === '-g');
  return at < 0 ? undefined : spec[at + 1];
}

function isPlainJump(spec: readonly string[], chain: string): boolean {
  return spec.length === 2 && spec[0] === '-j' && spec[1] === chain;
}

/**
 * Deletes the jumps to each matching chain (from any chain, built-in or not), then flushes
 * and deletes the chains. A GANGWAY_ chain jumping to another is flushed before any is
 * deleted, so the order among them does not matter.
 */
async function removeChains(run: Runner, matches: (chain: string) => boolean): Promise<string[]> {
  const listing = await listRules(run);
  const chains = [...listing.chains].filter(matches);
  for (const chain of chains) {
    for (const jump of listing.jumpsTo(chain)) {
      if (!chains.includes(jump.from)) await run('iptables', [...LOCK_WAIT, '-D', jump.from, ...jump.spec]);
    }
  }
  for (const chain of chains) await run('iptables', [...LOCK_WAIT, '-F', chain]);
  for (const chain of chains) await run('iptables', [...LOCK_WAIT, '-X', chain]);
  return chains;
}

/**
 * Splits one line of `iptables -S` into words. iptables quotes a word containing spaces or
 * quotes in double quotes, escaping `"` and `\` with a backslash (a comment "mig \"out\" x").
 */
export function splitRuleLine(line: string): string[] {
  const words: string[] = [];
  let word = '';
  let inWord = false;
  let quoted = false;
  for (let i = 0; i < line.length; i++) {
    const char = line[i]!;
    if (quoted) {
      if (char === '\\' && i + 1 < line.length) word += line[++i];
      else if (char === '"') quoted = false;
      else word += char;
    } else if (char === '"') {
      quoted = true;
      inWord = true;
    } else if (char === ' ' || char === '\t') {
      if (inWord) words.push(word);
      word = '';
      inWord = false;
    } else {
      word += char;
      inWord = true;
    }
  }
  if (inWord) words.push(word);
  return words;
}
