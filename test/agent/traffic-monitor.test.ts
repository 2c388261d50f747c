// The traffic monitor and the bandwidth controller against a fake host (in-memory iptables,
// tc and NIC counters) and a fake clock: the rates they compute, the smoothing, the traffic
// class and contention level, what they install and remove, and how they degrade.
import { describe, expect, test } from 'vitest';
import { TrafficMonitor, type MonitoredGuest, type NicCounters, type TrafficMonitorOptions } from '../../agent/traffic/monitor.js';
import { BandwidthController, shaperConfig } from '../../agent/traffic/controller.js';
import { DEFAULT_PLANNER_SETTINGS, type PlannerSettings } from '../../agent/planner/planner.js';
import { planFor } from '../../agent/planner/plan-for.js';
import { FakeHost } from '../helpers/fake-host.js';

const MBIT = 1e6 / 8;
const LINK = 1000 * MBIT;

function setup(overrides: Partial<TrafficMonitorOptions> = {}, guests: MonitoredGuest[] = [{ name: 'vm1', tap: 'tap1' }, { name: 'vm2', tap: 'tap2' }]) {
  const host = new FakeHost();
  let nowMs = 0;
  const nic: NicCounters = { rxBytes: 0, txBytes: 0 };
  const list = [...guests];
  const monitor = new TrafficMonitor({
    run: host.run,
    uplink: 'eth0',
    peerPort: 7401,
    linkBytesPerSec: LINK,
    highContention: 0.7,
    moderateContention: 0.3,
    dominanceRatio: 1.2,
    sampleIntervalMs: 1000,
    alpha: 0.5,
    isRoot: true,
    now: () => nowMs,
    readNic: () => ({ ...nic }),
    guests: () => list,
    ...overrides,
  });
  /** One second of traffic: bytes per rule comment and on the NIC, then a sample. */
  const second = (counted: Record<string, number>, nicBytes: { rx: number; tx: number }) => {
    for (const [comment, bytes] of Object.entries(counted)) host.counters.set(comment, (host.counters.get(comment) ?? 0) + bytes);
    nic.rxBytes += nicBytes.rx;
    nic.txBytes += nicBytes.tx;
    nowMs += 1000;
    return monitor.sample();
  };
  return { host, monitor, second, list, advance: (ms: number) => (nowMs += ms) };
}

describe('traffic monitor', () => {
  test('installs one counting rule per guest direction and the peer port, jumped to from INPUT, OUTPUT and FORWARD', async () => {
    const { host, monitor } = setup();
    await monitor.start({ timer: false });
    expect(monitor.mode).toBe('full');
    const rules = host.chains.get('GANGWAY_ACCT')!.map((r) => r.spec.join(' '));
    expect(rules).toContain('-i tap1 -m comment --comment guest vm1 tx');
    expect(rules).toContain('-o tap1 -m comment --comment guest vm1 rx');
    expect(rules).toContain('-o tap2 -m comment --comment guest vm2 rx');
    expect(rules).toContain('-o eth0 -p tcp --dport 7401 -m comment --comment peer tx dport');
    expect(rules).toContain('-i eth0 -p tcp --sport 7401 -m comment --comment peer rx sport');
    for (const hook of ['INPUT', 'OUTPUT', 'FORWARD']) expect(host.chains.get(hook)!.map((r) => r.spec.join(' '))).toEqual(['-j GANGWAY_ACCT']);
    // No rule has a target: accounting never decides a packet's fate.
    expect(host.chains.get('GANGWAY_ACCT')!.every((r) => !r.spec.includes('-j'))).toBe(true);
  });

  test('rates are bytes over the time since the previous read, smoothed with alpha; the chain is read, never zeroed', async () => {
    const { host, monitor, second } = setup();
    await monitor.start({ timer: false });
    // vm1 sends 10 MB/s and receives 1 MB/s; vm2 the reverse at 2 and 8.
    let s = await second({ 'guest vm1 tx': 10e6, 'guest vm1 rx': 1e6, 'guest vm2 tx': 2e6, 'guest vm2 rx': 8e6 }, { rx: 9e6, tx: 12e6 });
    expect(s.guests).toEqual([
      { name: 'vm1', tap: 'tap1', rxBytesPerSec: 1e6, txBytesPerSec: 10e6, direction: 'outbound' },
      { name: 'vm2', tap: 'tap2', rxBytesPerSec: 8e6, txBytesPerSec: 2e6, direction: 'inbound' },
    ]);
    expect(host.ran('iptables').filter((c) => c.includes('-L GANGWAY_ACCT -v -x -n'))).toHaveLength(1);
    expect(host.ran('iptables').filter((c) => c.includes('-Z'))).toHaveLength(0);
    // Next second vm1 sends nothing: EWMA with alpha 0.5 halves it.
    s = await second({ 'guest vm1 rx': 1e6 }, { rx: 1e6, tx: 0 });
    expect(s.guests[0]).toMatchObject({ txBytesPerSec: 5e6, rxBytesPerSec: 1e6, direction: 'outbound' });
  });

  test('a 2 s interval divides by 2 s', async () => {
    const { monitor, second, advance } = setup({ alpha: 1 });
    await monitor.start({ timer: false });
    advance(1000);
    const s = await second({ 'guest vm1 tx': 4e6 }, { rx: 0, tx: 8e6 });
    expect(s.guests[0]!.txBytesPerSec).toBe(2e6);
    expect(s.nic).toEqual({ rxBytesPerSec: 0, txBytesPerSec: 4e6 });
  });

  test('workload is the NIC less the peer port; contention follows the thresholds; the host class follows the workload', async () => {
    const { monitor, second } = setup({ alpha: 1 });
    await monitor.start({ timer: false });
    // NIC sends 900 Mbit/s, 400 of it migration: the workload's 500 is 50% of the link.
    let s = await second({ 'peer tx dport': 300 * MBIT, 'peer tx sport': 100 * MBIT, 'peer rx sport': 5 * MBIT }, { rx: 50 * MBIT, tx: 900 * MBIT });
    expect(s.migration).toEqual({ rxBytesPerSec: 5 * MBIT, txBytesPerSec: 400 * MBIT });
    expect(s.workload).toEqual({ rxBytesPerSec: 45 * MBIT, txBytesPerSec: 500 * MBIT });
    expect(s.contention).toMatchObject({ level: 'moderate', share: 0.5 });
    expect(s.host?.direction).toBe('outbound');
    s = await second({}, { rx: 750 * MBIT, tx: 10 * MBIT });
    expect(s.contention).toMatchObject({ level: 'high', share: 0.75 });
    expect(s.host?.direction).toBe('inbound');
    s = await second({}, { rx: 100 * MBIT, tx: 100 * MBIT });
    expect(s.contention?.level).toBe('low');
    // The peer port's totals add every read (the chain was zeroed by each).
    s = await second({ 'peer tx dport': 7, 'peer rx sport': 3 }, { rx: 100 * MBIT, tx: 100 * MBIT });
    expect(s.peerTotals).toMatchObject({ txBytes: 400 * MBIT + 7, rxBytes: 5 * MBIT + 3 });
  });

  test('a guest added later gets its rules; a guest without a TAP device says why it has no rates', async () => {
    const { host, monitor, second, list } = setup({}, [{ name: 'vm1', tap: 'tap1' }]);
    await monitor.start({ timer: false });
    list.push({ name: 'vm3', tap: 'tap3' }, { name: 'vm4', tap: undefined });
    const s = await second({}, { rx: 0, tx: 0 });
    expect(host.chains.get('GANGWAY_ACCT')!.map((r) => r.comment)).toContain('guest vm3 tx');
    expect(s.guests.find((g) => g.name === 'vm4')).toEqual({ name: 'vm4', tap: null, rxBytesPerSec: null, txBytesPerSec: null, direction: null, reason: 'no TAP device in its definition' });
    expect(s.guests.find((g) => g.name === 'vm3')).toMatchObject({ rxBytesPerSec: 0, txBytesPerSec: 0 });
  });

  test('removes chains a crashed run left at start, and its own chain and jumps at stop', async () => {
    const { host, monitor } = setup();
    host.chains.set('GANGWAY_OLD', [{ spec: ['-i', 'tap9'], comment: '' }]);
    host.chains.get('FORWARD')!.push({ spec: ['-j', 'GANGWAY_OLD'], comment: '' });
    host.chains.set('NOT_OURS', []);
    await monitor.start({ timer: false });
    expect(host.chains.has('GANGWAY_OLD')).toBe(false);
    expect(host.chains.has('NOT_OURS')).toBe(true);
    await monitor.stop();
    expect([...host.chains.keys()].filter((c) => c.startsWith('GANGWAY_'))).toEqual([]);
    for (const hook of ['INPUT', 'OUTPUT', 'FORWARD']) expect(host.chains.get(hook)).toEqual([]);
    await monitor.stop();
  });

  test('without root: NIC rates only, no iptables command, and the reason', async () => {
    const { host, monitor, second } = setup({ isRoot: false, alpha: 1 });
    await monitor.start({ timer: false });
    expect(monitor.mode).toBe('nic');
    expect(monitor.reason).toMatch(/not running as root/);
    const s = await second({ 'guest vm1 tx': 1e6 }, { rx: 2e6, tx: 3e6 });
    expect(s.nic).toEqual({ rxBytesPerSec: 2e6, txBytesPerSec: 3e6 });
    expect(s.workload).toEqual(s.nic);
    expect(s.migration).toBeNull();
    expect(s.peerTotals).toBeNull();
    expect(s.guests[0]).toMatchObject({ rxBytesPerSec: null, reason: expect.stringMatching(/root/) });
    expect(host.ran('iptables')).toEqual([]);
  });

  test('iptables failing: NIC rates only, the failed command in the reason, no throw', async () => {
    const { host, monitor, second } = setup();
    host.missing.add('iptables');
    await monitor.start({ timer: false });
    expect(monitor.mode).toBe('nic');
    expect(monitor.reason).toMatch(/iptables accounting is unavailable.*`iptables -w 5 -S` failed: spawn iptables ENOENT/);
    expect((await second({}, { rx: 1, tx: 1 })).nic).not.toBeNull();
  });

  test('no uplink, or one that cannot be read: nothing measured, and why', async () => {
    const none = setup({ uplink: undefined });
    await none.monitor.start({ timer: false });
    expect(none.monitor.snapshot()).toMatchObject({ mode: 'off', reason: expect.stringMatching(/no uplink is configured/), nic: null, contention: null });
    const gone = setup({ readNic: () => { throw new Error("ENOENT: no such file or directory, open '/sys/class/net/eth9/statistics/rx_bytes'"); } });
    await gone.monitor.start({ timer: false });
    expect(gone.monitor.mode).toBe('off');
    expect(gone.monitor.reason).toMatch(/the uplink eth0 cannot be read: ENOENT/);
    expect((await gone.monitor.sample()).samples).toBe(0);
    expect(gone.host.commands).toEqual([]);
  });
});

const SETTINGS: PlannerSettings = {
  ...DEFAULT_PLANNER_SETTINGS,
  linkBytesPerSec: LINK,
  slaLowerBytesPerSec: 200 * MBIT,
  slaUpperBytesPerSec: 600 * MBIT,
};

function controller(workloadBytesPerSec: number, overrides: { isRoot?: boolean } = {}) {
  const host = new FakeHost();
  let nowMs = 0;
  let workload = workloadBytesPerSec;
  const c = new BandwidthController({
    run: host.run,
    uplink: 'eth0',
    settings: SETTINGS,
    isRoot: overrides.isRoot ?? true,
    sampleIntervalMs: 60_000,
    workloadBytesPerSec: () => workload,
    now: () => nowMs,
  });
  /** One second in which the classes sent these many bytes, then a tick. */
  const second = (migrationBytes: number, workloadBytes: number) => {
    host.classes.get('6777:10')!.sentBytes += migrationBytes;
    host.classes.get('6777:20')!.sentBytes += workloadBytes;
    nowMs += 1000;
    return c.tick();
  };
  return { host, c, second, setWorkload: (w: number) => (workload = w) };
}

const rateOf = (host: FakeHost, classid: string) => host.classes.get(classid)!.rate / 8;

describe('bandwidth controller', () => {
  test('removes a shaper a crashed run left, at init', async () => {
    const { host, c } = controller(0);
    host.rootHandle = '6777:';
    await c.init();
    expect(host.rootHandle).toBeUndefined();
    expect(c.available).toBe(true);
  });

  test('high priority holds a busy workload to its SLA lower limit and gives the migration the rest', async () => {
    const { host, c } = controller(700 * MBIT);
    await c.init();
    const hold = await c.start({ peerPort: 7401, priority: 'high' });
    expect(hold.applied).toBe(true);
    expect(rateOf(host, '6777:10')).toBe(800 * MBIT);
    // The migration may borrow what the capped workload leaves idle, up to the link.
    expect(host.classes.get('6777:10')!.ceil / 8).toBe(1000 * MBIT);
    expect(host.classes.get('6777:20')!.ceil / 8).toBe(200 * MBIT);
    expect(host.ran('tc').some((line) => line.includes('match ip dport 7401 0xffff flowid 6777:10'))).toBe(true);
    await hold.stop();
    expect(host.rootHandle).toBeUndefined();
  });

  test('an idle workload still keeps its lower limit as a guaranteed rate (it may pick up later)', async () => {
    const { host, c } = controller(0);
    await c.init();
    const hold = await c.start({ peerPort: 7401, priority: 'high' });
    expect(rateOf(host, '6777:10')).toBe(800 * MBIT);
    expect(rateOf(host, '6777:20')).toBe(200 * MBIT);
    expect(hold.reason).toMatch(/keeps its SLA lower limit/);
    await hold.stop();
  });

  test('medium priority grows the migration as the workload drops, never below the lower limit, workload first', async () => {
    const { host, c, second } = controller(800 * MBIT);
    await c.init();
    const hold = await c.start({ peerPort: 7401, priority: 'medium' });
    expect(rateOf(host, '6777:10')).toBe(400 * MBIT);
    expect(host.classes.get('6777:20')!.ceil / 8).toBe(600 * MBIT);
    expect(await second(0, 0)).toBeUndefined(); // the first tick only takes the counters
    // Migration saturated (400), workload down to 300: the migration gets 700.
    const grown = await second(400 * MBIT, 300 * MBIT);
    expect(grown?.migrationBytesPerSec).toBe(700 * MBIT);
    expect(rateOf(host, '6777:10')).toBe(700 * MBIT);
    expect(host.classes.get('6777:20')!.ceil / 8).toBe(300 * MBIT);
    const changes = host.ran('tc').filter((line) => line.startsWith('class change'));
    expect(changes[0]).toContain('classid 6777:20');
    expect(changes[1]).toContain('classid 6777:10');
    // The workload almost stops; smoothed, it falls below the lower limit: the migration stops at 800.
    for (let i = 0; i < 6; i++) await second(host.classes.get('6777:10')!.rate / 8, 1 * MBIT);
    expect(rateOf(host, '6777:10')).toBe(800 * MBIT);
    expect(rateOf(host, '6777:20')).toBe(200 * MBIT);
    // A migration that does not use what it has gets no more.
    const before = host.ran('tc').length;
    await second(100 * MBIT, 1 * MBIT);
    expect(host.ran('tc').filter((line) => line.startsWith('class change')).length).toBe(host.ran('tc').slice(0, before).filter((line) => line.startsWith('class change')).length);
    expect(c.status().active?.reasons.length).toBeGreaterThanOrEqual(2);
    await hold.stop();
  });

  test('a rate changed mid-flight (gangway migrate-set) resizes the reservation as a manual rate, the shrinking class first', async () => {
    const { host, c, second } = controller(800 * MBIT);
    await c.init();
    const hold = await c.start({ peerPort: 7401, priority: 'medium' });
    expect(rateOf(host, '6777:10')).toBe(400 * MBIT);
    // Another port's migration has no reservation here: nothing changes.
    expect(await c.changeRate(7402, 100 * MBIT)).toBeUndefined();
    expect(host.ran('tc').filter((line) => line.startsWith('class change'))).toHaveLength(0);

    const slower = await c.changeRate(7401, 100 * MBIT);
    expect(slower?.migrationBytesPerSec).toBe(100 * MBIT);
    expect(rateOf(host, '6777:10')).toBe(100 * MBIT);
    // A manual rate is also the migration's ceiling; the workload gets the rest of the link.
    expect(host.classes.get('6777:10')!.ceil / 8).toBe(100 * MBIT);
    expect(rateOf(host, '6777:20')).toBe(900 * MBIT);
    let changes = host.ran('tc').filter((line) => line.startsWith('class change'));
    expect(changes[0]).toContain('classid 6777:10');
    expect(changes[1]).toContain('classid 6777:20');
    expect(c.status().active).toMatchObject({ priority: 'manual', migrationBytesPerSec: 100 * MBIT });
    expect(c.status().active?.reasons.at(-1)).toMatch(/^changed mid-flight: --bandwidth/);

    const faster = await c.changeRate(7401, 700 * MBIT);
    expect(faster?.migrationBytesPerSec).toBe(700 * MBIT);
    changes = host.ran('tc').filter((line) => line.startsWith('class change')).slice(2);
    expect(changes[0]).toContain('classid 6777:20');
    expect(changes[1]).toContain('classid 6777:10');
    expect(rateOf(host, '6777:10')).toBe(700 * MBIT);
    // Medium priority's rebalancing no longer moves a rate the operator set.
    await second(0, 0);
    await second(700 * MBIT, 1 * MBIT);
    expect(rateOf(host, '6777:10')).toBe(700 * MBIT);
    await hold.stop();
    expect(host.rootHandle).toBeUndefined();
  });

  test('low priority takes only what is free; a manual rate is applied as given', async () => {
    const low = controller(900 * MBIT);
    await low.c.init();
    const hold = await low.c.start({ peerPort: 7401, priority: 'low' });
    expect(rateOf(low.host, '6777:10')).toBe(100 * MBIT);
    expect(low.host.classes.get('6777:20')!.ceil / 8).toBe(LINK);
    await hold.stop();
    const manual = controller(900 * MBIT);
    await manual.c.init();
    const m = await manual.c.start({ peerPort: 7401, migrationBytesPerSec: 50 * MBIT });
    expect(rateOf(manual.host, '6777:10')).toBe(50 * MBIT);
    expect(rateOf(manual.host, '6777:20')).toBe(950 * MBIT);
    await m.stop();
  });

  test('holders of one port share the shaper, which goes with the last; another port is not shaped', async () => {
    const { host, c } = controller(0);
    await c.init();
    const a = await c.start({ peerPort: 7401, priority: 'high' });
    const b = await c.start({ peerPort: 7401, priority: 'low' });
    const other = await c.start({ peerPort: 7402, priority: 'high' });
    expect(b.applied).toBe(true);
    expect(other).toMatchObject({ applied: false, reason: expect.stringMatching(/already shapes migrations to port 7401/) });
    await a.stop();
    await a.stop();
    expect(host.rootHandle).toBe('6777:');
    await b.stop();
    expect(host.rootHandle).toBeUndefined();
  });

  test('without root or tc: not applied, with the reason, and nothing run', async () => {
    const { host, c } = controller(0, { isRoot: false });
    await c.init();
    const hold = await c.start({ peerPort: 7401, priority: 'high' });
    expect(hold).toMatchObject({ applied: false, reason: expect.stringMatching(/not running as root/) });
    expect(host.commands).toEqual([]);
    const noTc = controller(0);
    noTc.host.missing.add('tc');
    await noTc.c.init();
    expect(noTc.c.status()).toMatchObject({ available: false, reason: expect.stringMatching(/tc is unavailable.*ENOENT/) });
  });

  test('a planned reservation borrows up to the link what the workload leaves idle; a manual rate is its own ceiling', () => {
    const reservation = { migrationBytesPerSec: LINK * 0.8, workloadCapBytesPerSec: undefined, reason: '' };
    const planned = shaperConfig(reservation, LINK, 7401, LINK * 0.2, { borrow: true });
    expect(planned.migration).toMatchObject({ rateBitsPerSec: LINK * 0.8 * 8, ceilBitsPerSec: LINK * 8 });
    // The workload keeps its guaranteed rate, which HTB serves before it lends to the migration.
    expect(planned.workload.rateBitsPerSec).toBe(LINK * 0.2 * 8);
    const manual = shaperConfig(reservation, LINK, 7401);
    expect(manual.migration.ceilBitsPerSec).toBe(manual.migration.rateBitsPerSec);
  });

  test('shaperConfig keeps both classes valid at the extremes', () => {
    const all = shaperConfig({ migrationBytesPerSec: LINK, workloadCapBytesPerSec: undefined, reason: '' }, LINK, 7401);
    expect(all.migration.rateBitsPerSec + all.workload.rateBitsPerSec).toBe(all.linkBitsPerSec);
    expect(all.workload.rateBitsPerSec).toBeGreaterThanOrEqual(all.linkBitsPerSec * 0.01);
    const none = shaperConfig({ migrationBytesPerSec: 0, workloadCapBytesPerSec: LINK, reason: '' }, LINK, 7401);
    expect(none.migration.rateBitsPerSec).toBeGreaterThanOrEqual(8000);
  });
});

describe('planFor', () => {
  const measured = (rx: number, tx: number) => ({ rates: { rxBytesPerSec: rx, txBytesPerSec: tx } });

  test('parallel guests split the reservation, serial ones have all of it', () => {
    const high = planFor({
      guests: [{ name: 'a', traffic: measured(100 * MBIT, 1 * MBIT) }, { name: 'b', traffic: measured(1 * MBIT, 100 * MBIT) }],
      priority: 'high',
      source: measured(10 * MBIT, 800 * MBIT),
      destination: measured(10 * MBIT, 10 * MBIT),
      settings: SETTINGS,
      dominanceRatio: 1.2,
    });
    expect(high.contention).toBe('high');
    expect(high.reservation).toMatchObject({ migrationBytesPerSec: 800 * MBIT, workloadCapBytesPerSec: 200 * MBIT });
    expect(high.guests.map((g) => [g.name, g.strategy, g.reservedBytesPerSec])).toEqual([['a', 'parallel', 400 * MBIT], ['b', 'parallel', 400 * MBIT]]);
    // out-in: the inbound guest goes post-copy, the outbound one hybrid (Algorithm 1, high/high).
    expect(high.scenario).toBe('out-in');
    expect(high.guests.map((g) => g.technique)).toEqual(['postcopy', 'hybrid']);
    expect(high.assumptions).toEqual([]);
    const low = planFor({ ...highInput(), priority: 'low' });
    expect(low.guests.every((g) => g.strategy === 'serial' && g.reservedBytesPerSec === low.reservation!.migrationBytesPerSec)).toBe(true);
  });

  function highInput() {
    return {
      guests: [{ name: 'a', traffic: measured(1, 1) }, { name: 'b', traffic: measured(1, 1) }],
      priority: 'high' as const,
      source: measured(10 * MBIT, 800 * MBIT),
      destination: measured(10 * MBIT, 10 * MBIT),
      settings: SETTINGS,
      dominanceRatio: 1.2,
    };
  }

  test('what is not measured is taken as idle and listed; without a link capacity nothing is reserved', () => {
    const plan = planFor({
      guests: [{ name: 'a', traffic: { rates: undefined, reason: 'no TAP device in its definition' } }],
      priority: 'medium',
      source: { rates: undefined, reason: 'not running as root' },
      destination: { rates: undefined, reason: 'the agent at x:1 measures nothing' },
      settings: undefined,
      dominanceRatio: 1.2,
    });
    expect(plan.reservation).toBeNull();
    expect(plan.contentionShare).toBeNull();
    expect(plan.contention).toBe('low');
    expect(plan.guests[0]!.reservedBytesPerSec).toBeNull();
    expect(plan.assumptions).toEqual([
      'the source host: not measured (not running as root); taken as idle',
      'the destination host: not measured (the agent at x:1 measures nothing); taken as idle',
      'guest a: not measured (no TAP device in its definition); taken as idle',
      "the uplink's capacity is not configured ('traffic.linkCapacity'): contention is taken as low and no bandwidth is reserved",
    ]);
  });
});
