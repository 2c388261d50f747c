import { describe, expect, it } from 'vitest';
import { CodecChooser, emptyCodecMemory, type CodecMemory } from '../../agent/migration/codec-chooser.js';
import { CreditWindow, Pacer, SwitchoverGate, type Clock } from '../../agent/migration/flow.js';

function fakeClock(): Clock & { advance(ms: number): void; t: number } {
  const clock = {
    t: 0,
    now: () => clock.t,
    sleep: async (ms: number) => {
      clock.t += ms;
    },
    advance: (ms: number) => {
      clock.t += ms;
    },
  };
  return clock;
}

/** A session's memory: both codecs' `rates` measured at `at`, probes `exploitMs` apart. */
function recalled(rates: CodecMemory['rates'], at: number, exploitMs: number): CodecMemory {
  return { rates, measuredAt: { lz4: at, raw: at }, exploitMs };
}

describe('CreditWindow', () => {
  it('blocks past the window and releases in order as credit returns', async () => {
    const window = new CreditWindow(100);
    await window.take(60);
    const order: number[] = [];
    const a = window.take(60).then(() => order.push(1));
    const b = window.take(30).then(() => order.push(2));
    await Promise.resolve();
    expect(order).toEqual([]);
    window.grant(20);
    await a;
    expect(order).toEqual([1]);
    expect(window.availableBytes).toBe(0);
    window.grant(30);
    await b;
    expect(order).toEqual([1, 2]);
  });
  it('lets a frame bigger than the window through once the window is whole', async () => {
    const window = new CreditWindow(100);
    await window.take(150);
    expect(window.availableBytes).toBe(-50);
    let done = false;
    const next = window.take(10).then(() => (done = true));
    window.grant(50);
    await Promise.resolve();
    expect(done).toBe(false);
    window.grant(100);
    await next;
    expect(done).toBe(true);
  });
  it('reports drained once every byte sent is credited back', async () => {
    const window = new CreditWindow(100);
    await window.drained();
    await window.take(70);
    let drained = false;
    const waiting = window.drained().then(() => (drained = true));
    window.grant(60);
    await Promise.resolve();
    expect(drained).toBe(false);
    window.grant(10);
    await waiting;
    expect(drained).toBe(true);
  });

  it('fails every waiter when the session dies', async () => {
    const window = new CreditWindow(10);
    await window.take(10);
    const waiting = window.take(5);
    window.fail(new Error('gone'));
    await expect(waiting).rejects.toThrow('gone');
    await expect(window.take(1)).rejects.toThrow('gone');
  });
});

describe('Pacer', () => {
  it('holds the long-run rate to the cap', async () => {
    const clock = fakeClock();
    const pacer = new Pacer(10_000_000, 1_000_000, clock);
    for (let i = 0; i < 100; i++) await pacer.take(1_000_000);
    // 100 MB at 10 MB/s: 10 s, less the initial burst allowance of one batch.
    expect(clock.t).toBeGreaterThanOrEqual(9_800);
    expect(clock.t).toBeLessThanOrEqual(10_100);
  });
  it('takes a new rate at once', async () => {
    const clock = fakeClock();
    const pacer = new Pacer(1_000_000, 100_000, clock);
    for (let i = 0; i < 10; i++) await pacer.take(100_000);
    const before = clock.t;
    pacer.setRate(10_000_000);
    for (let i = 0; i < 100; i++) await pacer.take(100_000);
    expect(clock.t - before).toBeLessThan(1_200);
  });
});

describe('CodecChooser', () => {
  it('fixed modes never change', () => {
    expect(new CodecChooser({ mode: 'lz4' }).next()).toBe('lz4');
    expect(new CodecChooser({ mode: 'raw' }).next()).toBe('raw');
  });

  /**
   * A sender in front of a link: raw batches are ready at once, LZ4 ones after compressing;
   * up to `queueBatches` wait in front of the link (socket buffers, a shaper's queue) before
   * the sender blocks; the link carries each batch's wire bytes in order; the receiver's
   * credit for a batch comes back when the link has carried it.
   */
  function simulate(o: { linkBytesPerMs: number; compressBytesPerMs: number; ratio: number; queueBatches: number; batches: number; memory?: CodecMemory }) {
    const batchBytes = 1_000_000;
    let clock = o.memory ? Math.max(0, o.memory.measuredAt.lz4, o.memory.measuredAt.raw) : 0;
    const chooser = new CodecChooser({ mode: 'auto', windowBatches: 4, minWindowMs: 2, exploitMs: 10, now: () => clock, ...(o.memory ? { memory: o.memory } : {}) });
    const probes: number[] = [];
    const deliveries: number[] = [];
    const deliverUntil = (limit: number) => {
      while (deliveries.length > 0 && deliveries[0]! <= limit) {
        clock = deliveries.shift()!;
        chooser.delivered();
      }
    };
    const used = { lz4: 0, raw: 0 };
    let senderT = clock;
    let linkFree = clock;
    let previous: 'lz4' | 'raw' | undefined;
    for (let i = 0; i < o.batches; i++) {
      deliverUntil(senderT);
      if (deliveries.length >= o.queueBatches) {
        senderT = Math.max(senderT, deliveries[0]!);
        deliverUntil(senderT);
      }
      const codec = chooser.next();
      if (i > 0 && codec !== previous && codec === 'lz4') probes.push(clock);
      previous = codec;
      used[codec]++;
      if (codec === 'lz4') senderT += batchBytes / o.compressBytesPerMs;
      const wire = codec === 'lz4' ? batchBytes * o.ratio : batchBytes;
      linkFree = Math.max(senderT, linkFree) + wire / o.linkBytesPerMs;
      deliveries.push(linkFree);
      chooser.sent(batchBytes, codec);
    }
    deliverUntil(Infinity);
    return { used, rates: chooser.rates(), probes };
  }

  it('settles on raw when the link outruns the compressor', () => {
    const { used, rates } = simulate({ linkBytesPerMs: 2_000_000, compressBytesPerMs: 500_000, ratio: 0.5, queueBatches: 4, batches: 400 });
    expect(used.raw).toBeGreaterThan(used.lz4 * 2);
    expect(rates.raw!).toBeGreaterThan(rates.lz4!);
  });

  it("takes raw's rate from the channels: an explore moves on to LZ4, the faster wins, and a long exploit of raw probes LZ4", () => {
    let clock = 0;
    const chooser = new CodecChooser({ mode: 'auto', windowBatches: 2, minWindowMs: 1, exploitMs: 100, now: () => clock });
    expect(chooser.next()).toBe('raw');
    expect(chooser.measuring()).toBe(true);
    // The first raw piece on the channels: 2 GB/s. Explore goes on to LZ4.
    clock = 10;
    chooser.measuredOnChannels(2e9);
    expect(chooser.rates().raw).toBe(2e9);
    expect(chooser.next()).toBe('lz4');
    // LZ4 on the session measures 1 GB/s (2 MB per 2 ms): raw wins.
    for (let i = 0; i < 6; i++) chooser.sent(1e6, 'lz4');
    for (let i = 0; i < 6; i++) {
      clock += 1;
      chooser.delivered();
    }
    expect(chooser.rates().lz4).toBeGreaterThan(0);
    expect(chooser.rates().lz4!).toBeLessThan(2e9);
    expect(chooser.next()).toBe('raw');
    expect(chooser.measuring()).toBe(false);
    // Raw exploited on the channels for longer than exploitMs: LZ4 is probed again.
    clock += 50;
    chooser.measuredOnChannels(2e9);
    expect(chooser.next()).toBe('raw');
    clock += 100;
    chooser.measuredOnChannels(2e9);
    expect(chooser.next()).toBe('lz4');
    expect(chooser.measuring()).toBe(true);
    // A fixed codec ignores it.
    const fixed = new CodecChooser({ mode: 'raw' });
    fixed.measuredOnChannels(1e9);
    expect(fixed.rates().raw).toBeUndefined();
  });

  it('settles on lz4 when compression moves more guest bytes', () => {
    const { used } = simulate({ linkBytesPerMs: 125_000, compressBytesPerMs: 400_000, ratio: 0.5, queueBatches: 4, batches: 400 });
    expect(used.lz4).toBeGreaterThan(used.raw * 2);
  });

  it('is not fooled by a deep queue in front of a slow link (measures deliveries, not hand-offs)', () => {
    const { used, rates } = simulate({ linkBytesPerMs: 125_000, compressBytesPerMs: 400_000, ratio: 0.5, queueBatches: 40, batches: 400 });
    expect(used.lz4).toBeGreaterThan(used.raw * 2);
    expect(rates.lz4!).toBeGreaterThan(rates.raw! * 1.5);
  });

  it('needs a window to span minWindowMs: credit that comes back in a burst is no rate', () => {
    let clock = 0;
    const chooser = new CodecChooser({ mode: 'auto', windowBatches: 8, minWindowMs: 10, now: () => clock });
    expect(chooser.next()).toBe('raw');
    for (let i = 0; i < 16; i++) chooser.sent(1 << 20, 'raw');
    // Sixteen batches' credit within a millisecond: 8 of them made a 'rate' of 8 MiB per 0.5 ms.
    for (let i = 0; i < 16; i++) {
      clock += 1 / 16;
      chooser.delivered();
    }
    expect(chooser.rates().raw).toBeUndefined();
    expect(chooser.next()).toBe('raw');
    for (let i = 0; i < 5; i++) chooser.sent(1 << 20, 'raw');
    for (let i = 0; i < 5; i++) {
      clock += 2;
      chooser.delivered();
    }
    // The window closes 10 ms in, at its 21st delivery: 20 MiB over 11 - 1/16 ms, about
    // 2 GB/s; and the explore moves on to LZ4 (21 batches sent, fewer than its limit of 24).
    expect(chooser.rates().raw!).toBeCloseTo(((20 << 20) / (11 - 1 / 16)) * 1e3, -6);
    expect(chooser.next()).toBe('lz4');
  });

  it("ends LZ4's explore at its first batch when the compressor is far behind raw, after a window of batches when it is just behind", () => {
    let clock = 0;
    /** A chooser whose explore has measured raw (6 batches of 1 MiB, one delivered each ms) and moved on to LZ4. */
    const rawMeasured = () => {
      const chooser = new CodecChooser({ mode: 'auto', windowBatches: 4, minWindowMs: 1, now: () => clock });
      for (let i = 0; i < 6; i++) chooser.sent(1 << 20, 'raw');
      for (let i = 0; i < 6; i++) {
        clock += 1;
        chooser.delivered();
      }
      return chooser;
    };
    const chooser = rawMeasured();
    expect(chooser.rates().raw! / 1e9).toBeCloseTo(1.05, 1);
    expect(chooser.next()).toBe('lz4');
    // 1 MiB in 8 ms with 3 batches in flight all along (Little's law): at most 0.39 GB/s, under half of raw's 1.05.
    const first = chooser.compressing();
    const second = chooser.compressing();
    const third = chooser.compressing();
    clock += 8;
    second(1 << 20);
    expect(chooser.next()).toBe('raw');
    first(0);
    third(0);
    expect(chooser.next()).toBe('raw');
    expect(chooser.rates().lz4! / 1e9).toBeCloseTo(0.39, 2);

    // 0.66 GB/s is behind raw but not far: a cold first batch looks so. LZ4 goes on until a
    // window of batches (4) says the same.
    const near = rawMeasured();
    for (let batch = 1; batch <= 4; batch++) {
      const a = near.compressing();
      const b = near.compressing();
      const c = near.compressing();
      clock += 4;
      b(1 << 20);
      a(0);
      c(0);
      expect(near.next(), `after ${batch} batches`).toBe(batch < 4 ? 'lz4' : 'raw');
    }
    expect(near.rates().lz4! / 1e9).toBeCloseTo(0.79, 2);
    // A cold first batch, then warm ones that keep up: LZ4's try goes on.
    const cold = rawMeasured();
    const slow = cold.compressing();
    clock += 1.5;
    slow(1 << 20);
    for (let batch = 0; batch < 6; batch++) {
      const warm = cold.compressing();
      clock += 0.25;
      warm(1 << 20);
    }
    expect(cold.next()).toBe('lz4');
    expect(cold.rates().lz4).toBeUndefined();
    // A compressor that keeps up does not end it.
    const fast = rawMeasured();
    const done = fast.compressing();
    clock += 1;
    done(1 << 20);
    expect(fast.next()).toBe('lz4');
    // Nor does a batch timed while another migration's batches shared the compressor.
    const other = new CodecChooser({ mode: 'auto', windowBatches: 4, minWindowMs: 1, now: () => clock });
    const otherDone = other.compressing();
    const shared = chooser.compressing();
    clock += 100;
    shared(1 << 20);
    otherDone(1 << 20);
    expect(chooser.rates().lz4! / 1e9).toBeCloseTo(0.39, 2);

    // A first batch that compressed alone while the sender gathered the next three (they
    // joined it 3.6 ms in, 0.4 ms before it ended) had 1.3 batches beside it on average, not
    // 2.5 (the mean of the counts at its ends, 1 and 4): 0.34 GB/s, far behind raw's 1.05.
    const probe = rawMeasured();
    const lone = probe.compressing();
    clock += 3.6;
    const joined = [probe.compressing(), probe.compressing(), probe.compressing()];
    clock += 0.4;
    lone(1 << 20);
    expect(probe.next()).toBe('raw');
    expect(probe.rates().lz4! / 1e9).toBeCloseTo(0.34, 2);
    for (const done of joined) done(0);
  });

  it('probes the loser less often while it keeps losing', () => {
    const { probes, used } = simulate({ linkBytesPerMs: 2_000_000, compressBytesPerMs: 500_000, ratio: 0.5, queueBatches: 4, batches: 2000 });
    expect(used.raw).toBeGreaterThan(used.lz4 * 4);
    const gaps = probes.slice(1).map((t, i) => t - probes[i]!);
    expect(gaps.length).toBeGreaterThan(2);
    // Each probe that confirms raw doubles the wait (10, 20, 40 ms ... of exploit, plus the probe).
    for (let i = 1; i < gaps.length; i++) expect(gaps[i]!).toBeGreaterThan(gaps[i - 1]! * 1.5);
  });

  it("starts a session's later migration on what its link measured, without exploring", () => {
    const memory = emptyCodecMemory();
    const first = simulate({ linkBytesPerMs: 2_000_000, compressBytesPerMs: 500_000, ratio: 0.5, queueBatches: 4, batches: 200, memory });
    expect(first.used.lz4).toBeGreaterThan(0);
    expect(memory.rates.raw!).toBeGreaterThan(memory.rates.lz4!);
    const newest = Math.max(memory.measuredAt.lz4, memory.measuredAt.raw);
    let clock = newest + 1;
    const later = new CodecChooser({ mode: 'auto', windowBatches: 4, minWindowMs: 2, exploitMs: 10, now: () => clock, memory });
    expect(later.next()).toBe('raw');
    expect(later.rates()).toEqual(memory.rates);
    // Stale measurements are explored again.
    clock = newest + 10 * 60_000;
    expect(new CodecChooser({ mode: 'auto', now: () => clock, memory }).rates()).toEqual({ lz4: undefined, raw: undefined });
  });

  it("keeps to the session's probe schedule across short migrations: the loser is probed when its last measure is due, not at each start", () => {
    const memory = emptyCodecMemory();
    memory.rates = { lz4: 0.3e9, raw: 1e9 };
    memory.measuredAt = { lz4: 1_000, raw: 1_400 };
    memory.exploitMs = 2_000;
    let clock = 1_500;
    // LZ4 was measured 500 ms ago, the wait is 2 s: this migration sends raw.
    const early = new CodecChooser({ mode: 'auto', now: () => clock, memory });
    early.sent(1 << 20, 'raw');
    expect(early.next()).toBe('raw');
    // A later one, once LZ4's measure is 2 s old, probes it from its first batch (a wrong
    // winner recalled is found out within the wait).
    clock = 3_001;
    const due = new CodecChooser({ mode: 'auto', now: () => clock, memory });
    expect(due.next()).toBe('lz4');
    expect(due.measuring()).toBe(true);
  });

  it('a winner that falls below the loser\'s older rate (a stall) runs the loser only for the shortest wait, then measures the old winner again', () => {
    // The session's link: LZ4 at 200 MB/s against raw's 100, raw confirmed loser so often
    // that the wait between probes is at its longest.
    const memory = recalled({ lz4: 200e6, raw: 100e6 }, 0, 2_000);
    let clock = 100;
    const chooser = new CodecChooser({ mode: 'auto', windowBatches: 4, minWindowMs: 1, exploitMs: 10, now: () => clock, memory });
    expect(chooser.next()).toBe('lz4');
    // The link stalls: LZ4's deliveries come at 20 MB/s (1 MB per 50 ms), and its rate falls under raw's old one.
    for (let i = 0; i < 12 && chooser.next() === 'lz4'; i++) {
      chooser.sent(1e6, 'lz4');
      clock += 50;
      chooser.delivered();
    }
    expect(chooser.rates().lz4!).toBeLessThan(100e6);
    expect(chooser.next()).toBe('raw');
    const flippedAt = clock;
    // Raw goes on for the shortest wait (10 ms here), not the session's longest (2 s), then LZ4 is probed.
    chooser.sent(1e6, 'raw');
    expect(chooser.next()).toBe('raw');
    clock = flippedAt + 11;
    chooser.sent(1e6, 'raw');
    expect(chooser.next()).toBe('lz4');
    expect(chooser.measuring()).toBe(true);
    expect(memory.exploitMs).toBe(10);
  });

  it("after a stall, a probe of LZ4 is judged on its own batches: neither the stall's compressor samples nor its delivered rate hold it down", () => {
    const memory = recalled({ lz4: 200e6, raw: 100e6 }, 100, 2_000);
    let clock = 100;
    const chooser = new CodecChooser({ mode: 'auto', windowBatches: 4, minWindowMs: 1, exploitMs: 10, now: () => clock, memory });
    /** One batch as a sender does it: compressed in `compressMs` when the chooser says LZ4, delivered `deliverMs` later. */
    const batch = (compressMs: number, deliverMs: { lz4: number; raw: number }) => {
      const mode = chooser.next();
      if (mode === 'lz4') {
        const done = chooser.compressing();
        clock += compressMs;
        done(1e6);
      }
      chooser.sent(1e6, mode);
      clock += deliverMs[mode];
      chooser.delivered();
    };
    // LZ4 wins: compressed at 400 MB/s, delivered at 200 (raw's link does 100).
    for (let i = 0; i < 8; i++) batch(2.5, { lz4: 5, raw: 10 });
    expect(chooser.next()).toBe('lz4');
    // A stall (a busy host): LZ4 compresses and is delivered at 20 MB/s, under raw's rate.
    for (let i = 0; i < 12 && chooser.next() === 'lz4'; i++) batch(1e6 / 20e3, { lz4: 50, raw: 10 });
    expect(chooser.next()).toBe('raw');
    // The shortest wait later, LZ4 is probed; its first batch is still slow to compress (60 MB/s: behind raw, not far).
    clock += 11;
    batch(0, { lz4: 5, raw: 10 });
    expect(chooser.next()).toBe('lz4');
    batch(1e6 / 60e3, { lz4: 5, raw: 10 });
    // One batch is no verdict on the compressor: the probe goes on.
    expect(chooser.next()).toBe('lz4');
    // The host is quiet again: LZ4 wins back on what it delivers.
    for (let i = 0; i < 12; i++) batch(2.5, { lz4: 5, raw: 10 });
    expect(chooser.next()).toBe('lz4');
    expect(chooser.rates().lz4!).toBeGreaterThan(chooser.rates().raw!);
  });

  it('a probe of LZ4 that the compressor ends takes its rate from the compressor now, not from an older, lower delivered rate', () => {
    const memory = recalled({ lz4: 50e6, raw: 100e6 }, 0, 10);
    let clock = 100;
    // LZ4 is due for a probe: the migration starts with it.
    const chooser = new CodecChooser({ mode: 'auto', windowBatches: 4, minWindowMs: 1, exploitMs: 10, now: () => clock, memory });
    expect(chooser.next()).toBe('lz4');
    // Four batches compressed at 90 MB/s: just behind raw, so the probe ends at the window.
    for (let i = 0; i < 4; i++) {
      const done = chooser.compressing();
      clock += 1e6 / 90e3;
      done(1e6);
    }
    expect(chooser.next()).toBe('raw');
    expect(chooser.rates().lz4! / 1e6).toBeCloseTo(90, 0);
  });

  it("says a probe of LZ4 is judged by its deliveries unless the compressor, or before it LZ4's last rate, is far behind raw", () => {
    const probing = (lz4: number) => {
      const memory = recalled({ lz4, raw: 200e6 }, 0, 10);
      let clock = 11;
      // LZ4 is due for a probe: the migration starts with it.
      const chooser = new CodecChooser({ mode: 'auto', windowBatches: 4, minWindowMs: 1, now: () => clock, memory });
      expect(chooser.next()).toBe('lz4');
      return { chooser, advance: (ms: number) => (clock += ms) };
    };
    expect(probing(150e6).chooser.judgedByDeliveries()).toBe(true);
    expect(probing(90e6).chooser.judgedByDeliveries()).toBe(false);
    // The compressor's own rate, once it has one: 1 MB in 5 ms (200 MB/s) is not far behind.
    const { chooser, advance } = probing(90e6);
    const done = chooser.compressing();
    advance(5);
    done(1e6);
    expect(chooser.next()).toBe('lz4');
    expect(chooser.judgedByDeliveries()).toBe(true);
  });

  it('does not count a pause of the sender (a round ended) against the codec of the batches after it', () => {
    let clock = 0;
    const chooser = new CodecChooser({ mode: 'auto', windowBatches: 4, minWindowMs: 1, now: () => clock });
    const batch = () => {
      chooser.sent(1 << 20, 'raw');
      clock += 1;
      chooser.delivered();
    };
    for (let i = 0; i < 3; i++) batch();
    chooser.pause();
    clock += 200;
    for (let i = 0; i < 5; i++) batch();
    // 1 MiB a millisecond on either side of the pause, not 4 MiB over 203 ms.
    expect(chooser.rates().raw! / 1e9).toBeCloseTo(1.05, 1);
  });

  it('ignores batches without data to compress', () => {
    let clock = 0;
    const chooser = new CodecChooser({ mode: 'auto', windowBatches: 2, now: () => clock });
    for (let i = 0; i < 10; i++) {
      chooser.sent(1e9, 'none');
      clock += 1;
      chooser.delivered();
    }
    expect(chooser.rates()).toEqual({ lz4: undefined, raw: undefined });
  });
});

describe('SwitchoverGate round 0s', () => {
  it('holds switchovers until every member that started has sent its round 0 or ended', async () => {
    const gate = new SwitchoverGate();
    const a = gate.enterRoundZero();
    const b = gate.enterRoundZero();
    let done = false;
    const waiting = gate.roundZerosDone().then(() => (done = true));
    a();
    a(); // leaving twice counts once
    await Promise.resolve();
    expect(done).toBe(false);
    b();
    await waiting;
    expect(done).toBe(true);
    // Nobody in round 0: at once.
    await gate.roundZerosDone();
  });

  it('gives round 0 turns one at a time, in the order asked; ending a turn twice counts once', async () => {
    const gate = new SwitchoverGate();
    const order: string[] = [];
    const take = async (who: string) => {
      const end = await gate.roundZeroTurn();
      order.push(`${who} starts`);
      return end;
    };
    const a = take('a');
    const b = take('b');
    const c = take('c');
    const endA = await a;
    await new Promise((resolve) => setImmediate(resolve));
    expect(order).toEqual(['a starts']);
    endA();
    endA(); // ending twice lets one more through, not two
    await new Promise((resolve) => setImmediate(resolve));
    const endB = await b;
    await new Promise((resolve) => setImmediate(resolve));
    expect(order).toEqual(['a starts', 'b starts']);
    endB();
    (await c)();
    expect(order).toEqual(['a starts', 'b starts', 'c starts']);
    // A turn asked for after all ended comes at once.
    (await gate.roundZeroTurn())();
  });
});

