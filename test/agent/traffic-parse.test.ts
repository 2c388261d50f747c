// Parsing what iptables and tc print on this kind of machine. The fixtures are real output
// (iptables 1.8.9 nf_tables and iproute2 6.1 in a network namespace, with traffic), except
// the refusal cases, which are cut from it.
import { describe, expect, test } from 'vitest';
import { parseIptablesChain, parseTcClasses, parseTcRate, ParseError, rateBetween, SmoothedRate } from '../../agent/traffic/parse.js';

const IPTABLES_ZEROING = `Chain GANGWAY_ACCT (2 references)
    pkts      bytes target     prot opt in     out     source               destination         
      14   124205            0    --  lo     *       0.0.0.0/0            0.0.0.0/0            /* vm1 rx */
       7   123828            6    --  *      lo      0.0.0.0/0            0.0.0.0/0            tcp spt:7401 /* peer out */
Zeroing chain \`GANGWAY_ACCT'
`;

const BUILT_IN_CHAIN = `Chain INPUT (policy ACCEPT 0 packets, 0 bytes)
`;

const TC_CLASSES = `class htb 1:10 parent 1:1 prio 1 rate 200Mbit ceil 200Mbit burst 1600b cburst 1600b 
 Sent 0 bytes 0 pkt (dropped 0, overlimits 0 requeues 0) 
 backlog 0b 0p requeues 0
 lended: 0 borrowed: 0 giants: 0
 tokens: 1000 ctokens: 1000

class htb 1:1 root rate 1Gbit ceil 1Gbit burst 1375b cburst 1375b 
 Sent 124467 bytes 15 pkt (dropped 0, overlimits 2 requeues 0) 
 backlog 0b 0p requeues 0
 lended: 9 borrowed: 0 giants: 0
 tokens: 178 ctokens: 178

class htb 1:20 parent 1:1 prio 0 rate 800Mbit ceil 1Gbit burst 1600b cburst 1375b 
 Sent 124467 bytes 15 pkt (dropped 0, overlimits 3 requeues 0) 
 backlog 0b 0p requeues 0
 lended: 5 borrowed: 9 giants: 0
 tokens: -1022 ctokens: 178
`;

describe('iptables -L -v -x -n', () => {
  test('reads every rule with its counters, interfaces and comment, with -Z trailer', () => {
    expect(parseIptablesChain(IPTABLES_ZEROING)).toEqual({
      chain: 'GANGWAY_ACCT',
      references: 2,
      rules: [
        { packets: 14, bytes: 124205, in: 'lo', out: '*', comment: 'vm1 rx' },
        { packets: 7, bytes: 123828, in: '*', out: 'lo', comment: 'peer out' },
      ],
    });
  });
  test('a rule with a target', () => {
    // The rule line as `iptables -L INPUT -v -x -n` printed it (trailing blanks included).
    const text = `Chain GANGWAY_JUMP (1 references)
    pkts      bytes target     prot opt in     out     source               destination         
       8     5432 GANGWAY_ACCT  0    --  *      *       0.0.0.0/0            0.0.0.0/0           
`;
    expect(parseIptablesChain(text).rules).toEqual([{ packets: 8, bytes: 5432, in: '*', out: '*', comment: '' }]);
  });
  test.each([
    ['a built-in chain (only gangway\'s own chains are read)', BUILT_IN_CHAIN, "expected 'Chain NAME (N references)'"],
    ['no -v', 'Chain X (1 references)\ntarget     prot opt source               destination\n', 'expected the -v column header'],
    ['a mangled rule', 'Chain X (1 references)\n    pkts      bytes target\n   12 lots\n', 'not a counted rule'],
  ])('refuses %s, quoting it', (_, text, message) => {
    expect(() => parseIptablesChain(text)).toThrow(ParseError);
    expect(() => parseIptablesChain(text)).toThrow(message);
  });
});

describe('tc -s class show', () => {
  test('reads HTB classes, rates and sent counters', () => {
    expect(parseTcClasses(TC_CLASSES)).toEqual([
      { classid: '1:10', parent: '1:1', rateBitsPerSec: 200e6, ceilBitsPerSec: 200e6, sentBytes: 0, sentPackets: 0, dropped: 0 },
      { classid: '1:1', parent: undefined, rateBitsPerSec: 1e9, ceilBitsPerSec: 1e9, sentBytes: 124467, sentPackets: 15, dropped: 0 },
      { classid: '1:20', parent: '1:1', rateBitsPerSec: 800e6, ceilBitsPerSec: 1e9, sentBytes: 124467, sentPackets: 15, dropped: 0 },
    ]);
  });
  test('skips classes of other kinds, refuses a broken HTB line', () => {
    expect(parseTcClasses('class fq_codel 8001:1 parent 8001:\n Sent 5 bytes 1 pkt (dropped 0, overlimits 0 requeues 0)\n')).toEqual([]);
    expect(() => parseTcClasses('class htb 1:10 parent 1:1 prio 1\n')).toThrow('an HTB class without rate and ceil');
  });
  test.each([
    ['1600bit', 1600],
    ['200Mbit', 200e6],
    ['1Gbit', 1e9],
    ['2.5Gbit', 2.5e9],
    ['64Kbit', 64e3],
  ])('rate %s', (text, bits) => expect(parseTcRate(text)).toBe(bits));
  test('refuses a rate it does not know', () => expect(() => parseTcRate('10MBps')).toThrow('tc rate'));
});

describe('rates', () => {
  test('between readings; a reset counter counts from zero', () => {
    expect(rateBetween(1000, 3000, 500)).toBe(4000);
    expect(rateBetween(5000, 200, 1000)).toBe(200);
    expect(rateBetween(0, 100, 0)).toBe(0);
  });
  test('smoothing moves toward new samples', () => {
    const rate = new SmoothedRate(0.5);
    expect(rate.add(100)).toBe(100);
    expect(rate.add(0)).toBe(50);
    expect(rate.current).toBe(50);
  });
});
