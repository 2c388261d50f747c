// A fake host for the traffic adapters: an in-memory iptables (filter table: chains, rules,
// counters keyed by rule comment, `-S` and `-L -v -x -n -Z` printed as iptables 1.8.9 prints
// them) and tc (one device's root qdisc and HTB classes, `-s class show` as iproute2 6.1
// prints it). Each command is recorded, so a test can check what was run and in what order.
import type { Runner } from '../../agent/traffic/exec.js';
import { CommandError } from '../../agent/traffic/exec.js';

interface Rule {
  spec: string[];
  comment: string;
}

export class FakeHost {
  readonly commands: string[][] = [];
  readonly chains = new Map<string, Rule[]>([['INPUT', []], ['OUTPUT', []], ['FORWARD', []]]);
  /** Bytes counted per rule comment since the rule was made (or the last -Z), set by the test. */
  readonly counters = new Map<string, number>();
  /** tc: the root qdisc handle of the shaped device, and its classes' rates and sent bytes. */
  rootHandle: string | undefined;
  readonly classes = new Map<string, { rate: number; ceil: number; sentBytes: number }>();
  /** Commands whose first word is listed fail as if missing. */
  readonly missing = new Set<string>();

  readonly run: Runner = async (cmd, args) => {
    this.commands.push([cmd, ...args]);
    if (this.missing.has(cmd)) throw new CommandError([cmd, ...args], undefined, `spawn ${cmd} ENOENT`);
    if (cmd === 'iptables') return this.iptables(args.filter((a, i) => !(a === '-w' || args[i - 1] === '-w')));
    if (cmd === 'tc') return this.tc(args);
    throw new CommandError([cmd, ...args], 127, `${cmd}: not faked`);
  };

  /** Commands of one tool, joined with spaces. */
  ran(cmd: string): string[] {
    return this.commands.filter((c) => c[0] === cmd).map((c) => c.slice(1).join(' '));
  }

  private iptables(args: string[]): string {
    const [op, chain] = args;
    const rules = chain === undefined ? undefined : this.chains.get(chain);
    switch (op) {
      case '-S': {
        const lines = ['-P INPUT ACCEPT', '-P FORWARD ACCEPT', '-P OUTPUT ACCEPT'];
        for (const name of this.chains.keys()) if (!['INPUT', 'OUTPUT', 'FORWARD'].includes(name)) lines.push(`-N ${name}`);
        for (const [name, list] of this.chains) for (const rule of list) lines.push(`-A ${name} ${rule.spec.map(quote).join(' ')}`);
        return lines.join('\n');
      }
      case '-N':
        this.chains.set(chain!, []);
        return '';
      case '-F':
        if (!rules) throw new CommandError(['iptables', ...args], 1, `iptables: No chain/target/match by that name.`);
        // Rules made again count from zero, as iptables's do.
        for (const rule of rules) this.counters.delete(rule.comment);
        rules.length = 0;
        return '';
      case '-X':
        this.chains.delete(chain!);
        return '';
      case '-A':
      case '-I': {
        const spec = args.slice(op === '-I' ? 3 : 2);
        const at = spec.indexOf('--comment');
        const rule = { spec, comment: at >= 0 ? spec[at + 1]! : '' };
        if (op === '-I') rules!.unshift(rule);
        else rules!.push(rule);
        return '';
      }
      case '-D': {
        const spec = args.slice(2).join(' ');
        const index = rules!.findIndex((r) => r.spec.join(' ') === spec);
        if (index < 0) throw new CommandError(['iptables', ...args], 1, 'iptables: Bad rule (does a matching rule exist in that chain?).');
        rules!.splice(index, 1);
        return '';
      }
      case '-L': {
        if (!rules) throw new CommandError(['iptables', ...args], 1, `iptables v1.8.9 (nf_tables): chain '${chain}' in table 'filter' is incompatible, use 'nft' tool.`);
        const references = [...this.chains.values()].flat().filter((r) => r.spec.includes(chain!)).length;
        const lines = [`Chain ${chain} (${references} references)`, '    pkts      bytes target     prot opt in     out     source               destination         '];
        for (const rule of rules) {
          const word = (flag: string) => {
            const i = rule.spec.indexOf(flag);
            return i >= 0 ? rule.spec[i + 1]! : '*';
          };
          const bytes = this.counters.get(rule.comment) ?? 0;
          const prot = rule.spec.includes('tcp') ? '6' : '0';
          lines.push(`${String(Math.ceil(bytes / 1500)).padStart(8)} ${String(bytes).padStart(10)}            ${prot}    --  ${word('-i').padEnd(6)} ${word('-o').padEnd(6)}  0.0.0.0/0            0.0.0.0/0            /* ${rule.comment} */`);
        }
        if (args.includes('-Z')) {
          for (const rule of rules) this.counters.delete(rule.comment);
          lines.push(`Zeroing chain \`${chain}'`);
        }
        return `${lines.join('\n')}\n`;
      }
      default:
        throw new CommandError(['iptables', ...args], 2, `unknown option ${op}`);
    }
  }

  private tc(args: string[]): string {
    const line = args.join(' ');
    if (line === '-V') return 'tc utility, iproute2-6.1.0, libbpf 1.1.0';
    if (/^-j qdisc show dev \S+$/.test(line)) {
      return JSON.stringify(this.rootHandle ? [{ kind: 'htb', handle: this.rootHandle, root: true }] : [{ kind: 'noqueue', handle: '0:', root: true }]);
    }
    if (/^qdisc del dev \S+ root$/.test(line)) {
      this.rootHandle = undefined;
      this.classes.clear();
      return '';
    }
    let m = /^qdisc add dev \S+ root handle (\S+) htb/.exec(line);
    if (m) {
      this.rootHandle = m[1];
      return '';
    }
    m = /^class (add|change) dev \S+ parent \S+ classid (\S+) htb rate (\d+)bit ceil (\d+)bit/.exec(line);
    if (m) {
      const previous = this.classes.get(m[2]!);
      if (m[1] === 'change' && !previous) throw new CommandError(['tc', ...args], 2, 'RTNETLINK answers: No such file or directory');
      this.classes.set(m[2]!, { rate: Number(m[3]), ceil: Number(m[4]), sentBytes: previous?.sentBytes ?? 0 });
      return '';
    }
    if (/^filter add /.test(line)) return '';
    if (/^-s class show dev \S+$/.test(line)) {
      return [...this.classes.entries()]
        .map(([id, c]) => `class htb ${id} ${id === '6777:1' ? 'root' : 'parent 6777:1 prio 1'} rate ${c.rate}bit ceil ${c.ceil}bit burst 1600b cburst 1600b \n Sent ${c.sentBytes} bytes 1 pkt (dropped 0, overlimits 0 requeues 0) \n`)
        .join('\n');
    }
    throw new CommandError(['tc', ...args], 1, `not faked: ${line}`);
  }
}

function quote(word: string): string {
  return /[\s"]/.test(word) ? `"${word.replace(/(["\\])/g, '\\$1')}"` : word;
}
