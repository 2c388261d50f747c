import { describe, expect, it } from 'vitest';
import { CodecChooser } from '../../agent/migration/codec-chooser.js';
import { CreditWindow, Pacer, type Clock } from '../../agent/migration/flow.js';

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

  function run(rawBytesPerMs: number, lz4BytesPerMs: number, batches: number) {
    let t = 0;
    const chooser = new CodecChooser({ mode: 'auto', windowBatches: 4, exploitWindows: 3, now: () => t });
    const used = { lz4: 0, raw: 0 };
    for (let i = 0; i < batches; i++) {
      const codec = chooser.next();
      used[codec]++;
      t += 1_000_000 / (codec === 'raw' ? rawBytesPerMs : lz4BytesPerMs);
      chooser.sent(1_000_000);
    }
    return { used, rates: chooser.rates() };
  }

  it('settles on raw when the link outruns the compressor', () => {
    const { used, rates } = run(2_000_000, 500_000, 400);
    expect(used.raw).toBeGreaterThan(used.lz4 * 2);
    expect(rates.raw!).toBeGreaterThan(rates.lz4!);
  });
  it('settles on lz4 when compression moves more guest bytes', () => {
    const { used } = run(125_000, 400_000, 400);
    expect(used.lz4).toBeGreaterThan(used.raw * 2);
  });
});
